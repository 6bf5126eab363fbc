#include "common/clock.h"

#include <errno.h>

double mb_clock_seconds(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

double mb_monotonic_seconds(void) { return mb_clock_seconds(CLOCK_MONOTONIC); }

void mb_sleep_seconds(double seconds) {
    if (!(seconds > 0)) return;
    struct timespec left = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
}
