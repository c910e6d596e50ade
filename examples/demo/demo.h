#ifndef DEMO_H
#define DEMO_H
#include <stddef.h>
#include <stdint.h>

#define TABLE_SIZE 1024
#define MAX_WORD 64

struct entry {
    char word[MAX_WORD];
    unsigned count;
    int used;
};

size_t next_word(const char **text, char *out, size_t cap);
void table_add(struct entry *table, const char *word);
size_t table_top(const struct entry *table, const struct entry **top, size_t n);
uint32_t checksum(const void *data, size_t len);
#endif
