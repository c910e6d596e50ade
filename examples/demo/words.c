#include <ctype.h>
#include "demo.h"

size_t next_word(const char **text, char *out, size_t cap) {
    const char *p = *text;
    while (*p && !isalpha((unsigned char)*p)) p++;
    size_t n = 0;
    while (*p && isalpha((unsigned char)*p)) {
        if (n + 1 < cap) out[n++] = (char)tolower((unsigned char)*p);
        p++;
    }
    out[n] = '\0';
    *text = p;
    return n;
}
