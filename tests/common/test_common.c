#include <criterion/criterion.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/rng.h"

Test(rng, same_seed_same_stream_and_state_restores) {
    mb_rng a, b;
    mb_rng_seed(&a, 42);
    mb_rng_seed(&b, 42);
    for (int i = 0; i < 100; i++) cr_assert_eq(mb_rng_next_u64(&a), mb_rng_next_u64(&b));
    mb_rng saved = a;
    uint64_t next = mb_rng_next_u64(&a);
    cr_assert_eq(mb_rng_next_u64(&saved), next);
    mb_rng c;
    mb_rng_seed(&c, 43);
    cr_assert_neq(mb_rng_next_u64(&c), mb_rng_next_u64(&b));
}

Test(rng, truncated_normal_bounds_and_moments) {
    mb_rng rng;
    mb_rng_seed(&rng, 7);
    double sum = 0, sum_sq = 0;
    const int n = 200000;
    for (int i = 0; i < n; i++) {
        float x = mb_rng_truncated_normal(&rng, 0.02f, 2.0f);
        cr_assert(x >= -0.04f && x <= 0.04f);
        sum += x;
        sum_sq += (double)x * x;
    }
    double mean = sum / n, std = sqrt(sum_sq / n - mean * mean);
    /* std of a normal truncated at +-2 sigma is 0.8796 sigma */
    cr_assert(fabs(mean) < 2e-4, "mean %g", mean);
    cr_assert(fabs(std - 0.02 * 0.8796) < 2e-4, "std %g", std);
}

Test(rng, below_is_in_range_and_uniform) {
    mb_rng rng;
    mb_rng_seed(&rng, 1);
    int counts[10] = {0};
    for (int i = 0; i < 100000; i++) counts[mb_rng_below(&rng, 10)]++;
    for (int i = 0; i < 10; i++) cr_assert(counts[i] > 9500 && counts[i] < 10500, "bucket %d: %d", i, counts[i]);
}

Test(fileio, atomic_write_replaces_and_abort_keeps_old) {
    char dir[] = "/tmp/mb_test_fileio_XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char path[512];
    snprintf(path, sizeof path, "%s/a/b/file.txt", dir);
    mb_error err;
    char parent[512];
    snprintf(parent, sizeof parent, "%s/a/b", dir);
    cr_assert_eq(mb_make_dirs(parent, &err), 0, "%s", err.message);
    cr_assert_eq(mb_write_file_atomic(path, "first", 5, &err), 0, "%s", err.message);
    mb_atomic_file file;
    cr_assert_eq(mb_atomic_file_open(&file, path, &err), 0);
    cr_assert_eq(mb_atomic_file_write(&file, "second", 6, &err), 0);
    mb_atomic_file_abort(&file);
    char *data;
    size_t size;
    cr_assert_eq(mb_read_file(path, &data, &size, &err), 0, "%s", err.message);
    cr_assert_eq(size, 5);
    cr_assert_str_eq(data, "first");
    free(data);
    cr_assert_neq(mb_read_file("/nonexistent/x", &data, &size, &err), 0);
    cr_assert(strstr(err.message, "/nonexistent/x") != NULL);
}
