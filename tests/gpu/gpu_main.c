/* The entry point of the GPU suites: without a usable CUDA device the whole executable reports "skipped" to Meson
 * (exit code 77) with the reason, so a machine without a GPU shows the GPU tests as skipped rather than passed; with
 * a device it runs the Criterion tests as usual (arguments such as --verbose and --filter work). */
#include <criterion/criterion.h>
#include <stdio.h>

#include "cuda/device.h"

int main(int argc, char *argv[]) {
    mb_error err = {{0}};
    if (mb_cuda_device_count(&err) == 0) {
        printf("GPU tests skipped: %s\n", err.message[0] ? err.message : "no CUDA device");
        return 77;
    }
    struct criterion_test_set *tests = criterion_initialize();
    int result = 0;
    if (criterion_handle_args(argc, argv, true)) result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    return result;
}
