#include <string.h>
#include "demo.h"

static unsigned hash_word(const char *w) {
    unsigned h = 2166136261u;
    while (*w) h = (h ^ (unsigned char)*w++) * 16777619u;
    return h;
}

void table_add(struct entry *table, const char *word) {
    unsigned i = hash_word(word) % TABLE_SIZE;
    while (table[i].used && strcmp(table[i].word, word) != 0) i = (i + 1) % TABLE_SIZE;
    if (!table[i].used) {
        strncpy(table[i].word, word, MAX_WORD - 1);
        table[i].used = 1;
    }
    table[i].count++;
}

size_t table_top(const struct entry *table, const struct entry **top, size_t n) {
    size_t have = 0;
    for (size_t i = 0; i < TABLE_SIZE; i++) {
        if (!table[i].used) continue;
        size_t j = have < n ? have++ : n;
        if (j == n && table[i].count <= top[n - 1]->count) continue;
        if (j == n) j = n - 1;
        while (j > 0 && (top[j - 1]->count < table[i].count ||
                         (top[j - 1]->count == table[i].count &&
                          strcmp(top[j - 1]->word, table[i].word) > 0))) {
            top[j] = top[j - 1];
            j--;
        }
        top[j] = &table[i];
    }
    return have;
}
