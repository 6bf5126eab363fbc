/* Reading clocks as seconds in a double (and sleeping for a number of seconds): wall-clock intervals (CLOCK_MONOTONIC) for progress, throughput and ETAs,
 * and any other POSIX clock (e.g. CLOCK_PROCESS_CPUTIME_ID for CPU time in benchmarks). */
#ifndef MB_CLOCK_H
#define MB_CLOCK_H

#include <time.h>

double mb_clock_seconds(clockid_t clock);
/* mb_clock_seconds(CLOCK_MONOTONIC): only differences mean anything. */
double mb_monotonic_seconds(void);
/* Sleeps for `seconds` (>= 0), resuming after signal interruptions. */
void mb_sleep_seconds(double seconds);

#endif
