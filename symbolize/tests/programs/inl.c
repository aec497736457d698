/* C with static inline chains, a noinline helper and a cold path (test input). */
#include <stdio.h>
#include <stdlib.h>

static inline int square(int x) { return x * x + (rand() & 1); }
static inline int pair(int x) { return square(x) + square(x + 1); }
__attribute__((noinline)) static int cold_path(int v) {
    if (v == 42) { fprintf(stderr, "unlikely %d\n", v); abort(); }
    return v / 3;
}
int work(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) {
        s += pair(i);
        if (__builtin_expect(s == 42, 0)) s += cold_path(s);
    }
    return s;
}
int main(int argc, char **argv) { (void)argv; return work(argc * 1000) & 0xff; }
