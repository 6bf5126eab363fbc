/* Reading the transformers fixtures (tests/fixtures/hf/<case>/expected.safetensors, made by tools/hf_fixtures.py)
 * and comparing against them: shared by the CPU parity suite and the GPU whole-model suite. */
#ifndef MB_TEST_HF_FIXTURE_H
#define MB_TEST_HF_FIXTURE_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>

#include "io/safetensors.h"

/* ‖a − b‖ / ‖b‖ (‖a − b‖ when b is all zeros), summed in double. */
static inline double relative_error(const float *a, const float *b, size_t count) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < count; i++) {
        diff += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        norm += (double)b[i] * b[i];
    }
    return norm > 0 ? sqrt(diff / norm) : sqrt(diff);
}

/* The fixture's tensor `name` as `count` fp32 values (malloc'ed); fails the test when it is missing or its size
 * differs. */
static inline float *expected_tensor(const mb_safetensors *st, const char *name, size_t count) {
    const mb_st_tensor *t = mb_st_find(st, name);
    cr_assert_not_null(t, "expected.safetensors has no '%s'", name);
    cr_assert_eq((size_t)mb_st_numel(t), count, "'%s': %lld elements, the model has %zu", name,
                 (long long)mb_st_numel(t), count);
    float *data = malloc(count * sizeof(float));
    mb_error err;
    cr_assert_eq(mb_st_read_f32(st, t, data, (int64_t)count, &err), 0, "%s", err.message);
    return data;
}

#endif
