#include <stdio.h>
#include <string.h>
#include "demo.h"

static const char *TEXT =
    "the quick brown fox jumps over the lazy dog the dog sleeps "
    "and the fox runs while the quick dog barks at the brown fox";

int main(void) {
    static struct entry table[TABLE_SIZE];
    const char *p = TEXT;
    char word[MAX_WORD];
    while (next_word(&p, word, sizeof word) > 0) {
        table_add(table, word);
    }
    const struct entry *top[3];
    size_t n = table_top(table, top, 3);
    for (size_t i = 0; i < n; i++) {
        printf("%-6s %u\n", top[i]->word, top[i]->count);
    }
    printf("checksum %08x\n", checksum(TEXT, strlen(TEXT)));
    return 0;
}
