#include "demo.h"

uint32_t checksum(const void *data, size_t len) {
    const unsigned char *p = data;
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < len; i++) {
        a = (a + p[i]) % 65521;
        b = (b + a) % 65521;
    }
    return (b << 16) | a;
}
