#include "common/clock.h"

double mb_clock_seconds(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

double mb_monotonic_seconds(void) { return mb_clock_seconds(CLOCK_MONOTONIC); }
