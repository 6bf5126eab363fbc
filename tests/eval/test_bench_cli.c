/* `modernbert bench train` end to end on the CPU backend: the step it times is --accumulate micro-batches and one
 * optimizer step, tokens/s counts every micro-batch, and bad options are refused with a message. No timing is
 * asserted: the figures only have to be there and be positive. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../support/run_command.h"

static int run(const char *arguments, char *output, size_t output_size) {
    char command[4096];
    snprintf(command, sizeof command, "%s/modernbert bench train %s 2>&1", MB_BUILD_DIR, arguments);
    return run_command(command, output, output_size);
}

/* The figure before " tokens/s" on the step line, or -1 when there is none. */
static double tokens_per_second(const char *output) {
    const char *unit = strstr(output, " tokens/s");
    if (unit == NULL) return -1.0;
    const char *start = unit;
    while (start > output && start[-1] != ' ') start--;
    return atof(start);
}

/* The step time in seconds ("step time X s"), or -1 when there is none. */
static double step_seconds(const char *output) {
    const char *label = strstr(output, "step time ");
    return label == NULL ? -1.0 : atof(label + strlen("step time "));
}

Test(bench_cli, accumulated_step_counts_every_micro_batch) {
    static char output[16384];
    int status = run("--backend cpu --model tiny --seq 64 --tokens 128 --accumulate 3 --steps 2 --warmup 1", output,
                     sizeof output);
    cr_assert_eq(status, 0, "bench train failed:\n%s", output);
    cr_assert_not_null(strstr(output, "3 micro-batches of 128 tokens per step"), "no accumulation in:\n%s", output);
    cr_assert_not_null(strstr(output, "2 timed steps after 1 warm-up steps"), "%s", output);
    double rate = tokens_per_second(output), seconds = step_seconds(output);
    cr_assert_gt(rate, 0.0, "no tokens/s in:\n%s", output);
    cr_assert_gt(seconds, 0.0, "no step time in:\n%s", output);
    /* tokens/s is the step's 3 × 128 tokens over its time; both are printed rounded (to a token per second and
     * to the millisecond) */
    cr_assert_float_eq(rate * seconds / 384.0, 1.0, 1e-6 + 0.5 / rate + 0.0005 / seconds,
                       "%.0f tokens/s, %.3f s:\n%s", rate, seconds, output);
}

Test(bench_cli, one_micro_batch_keeps_the_plain_line) {
    static char output[16384];
    int status = run("--backend cpu --model tiny --seq 64 --tokens 128 --steps 1 --warmup 0", output, sizeof output);
    cr_assert_eq(status, 0, "bench train failed:\n%s", output);
    cr_assert_not_null(strstr(output, ", 128 tokens per step,"), "%s", output);
    cr_assert_null(strstr(output, "micro-batches"), "%s", output);
    cr_assert_gt(tokens_per_second(output), 0.0, "no tokens/s in:\n%s", output);
}

Test(bench_cli, bad_options_are_refused) {
    static char output[16384];
    const char *bad[] = {"--backend cpu --model tiny --accumulate 0", "--backend cpu --model tiny --steps 0",
                         "--backend cpu --model tiny --seq 64 --tokens 32"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int status = run(bad[i], output, sizeof output);
        cr_assert_eq(status, 2, "'%s' exited %d:\n%s", bad[i], status, output);
        cr_assert_not_null(strstr(output, "--accumulate >= 1"), "'%s' gave no usage line:\n%s", bad[i], output);
    }
}
