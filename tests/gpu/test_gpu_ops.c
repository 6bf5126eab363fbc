/* Every CUDA op kernel (cuda/ops.h) against the CPU reference op (src/cpu/ops.h) on fresh seeded random inputs.
 *
 * Method: inputs are drawn in fp32, rounded to bf16 for the GPU, and the SAME rounded values (as floats) go to the
 * CPU reference, so the comparison measures only the kernel's own arithmetic. Outputs are poisoned with NaN
 * (0xFF bytes: NaN in bf16 and fp32) before each run and every element is checked finite afterwards, so an unwritten
 * element fails. Accumulated outputs (parameter gradients) start from random values on both sides.
 *
 * Thresholds, per tensor, as ‖gpu − cpu‖ / ‖cpu‖ (written down here, see also docs/kernels/):
 *   BF16_TOLERANCE   1e-2   outputs stored in bf16 (one rounding of 2^-9, plus bf16 P / dS inside attention)
 *   FP32_TOLERANCE   1e-4   fp32 outputs of bf16 inputs (LayerNorm statistics, lse, row losses, fp32 weight and
 *                           bias gradients), where only the summation order differs from the CPU
 *   OPT_TOLERANCE    1e-6   optimizer state, parameter updates and per-tensor RMS (same fp32 operation order as
 *                           the CPU; only the order of the double RMS sum differs)
 *   SUM_TOLERANCE    1e-10  double sums (loss total over fp32 values, grad norm)
 * Copies (embedding forward) and the bf16 copy of the master weights must match exactly, and the embedding and
 * attention backward must be bit-identical between two runs (the kernels are deterministic by construction).
 *
 * Sizes include length-1 sequences, lengths that are not multiples of the 64-token tiles, and an 8192-token sequence
 * beside many short ones (attention, global and window 64). MB_GPU_TEST_SMALL=1 shrinks every size so that
 * compute-sanitizer (memcheck, racecheck) finishes quickly. Without a CUDA device every test skips. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <omp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "cpu/ops.h"
#include "cuda/device.h"
#include "cuda/ops.h"
#include "train/stableadamw.h"

#define BF16_TOLERANCE 1e-2
#define FP32_TOLERANCE 1e-4
#define OPT_TOLERANCE 1e-6
#define SUM_TOLERANCE 1e-10

/* ---- environment ---- */

static cudaStream_t test_stream;

static void require_gpu(void) {
    mb_error err = {{0}};
    if (mb_cuda_device_count(&err) == 0) cr_skip_test("no CUDA device: %s", err.message);
    cr_assert_eq(cudaStreamCreate(&test_stream), cudaSuccess, "cudaStreamCreate failed");
}

static bool small_mode(void) {
    const char *value = getenv("MB_GPU_TEST_SMALL");
    return value != NULL && value[0] != '\0' && strcmp(value, "0") != 0;
}

/* `full` normally, `small` under MB_GPU_TEST_SMALL. */
static int size_for(int full, int small) { return small_mode() ? small : full; }

static void sync_ok(const char *what) {
    cudaError_t status = cudaStreamSynchronize(test_stream);
    cr_assert_eq(status, cudaSuccess, "%s: %s", what, cudaGetErrorString(status));
}

static void launched(int rc, const mb_error *err, const char *what) {
    cr_assert_eq(rc, 0, "%s failed: %s", what, err->message);
    sync_ok(what);
}

/* ---- device buffers ---- */

static void *dev_alloc(size_t bytes) {
    void *pointer = NULL;
    cudaError_t status = cudaMalloc(&pointer, bytes ? bytes : 16);
    cr_assert_eq(status, cudaSuccess, "cudaMalloc(%zu): %s", bytes, cudaGetErrorString(status));
    return pointer;
}

static void dev_poison(void *pointer, size_t bytes) {
    cr_assert_eq(cudaMemset(pointer, 0xFF, bytes), cudaSuccess, "cudaMemset failed");
}

static void *to_device(const void *host, size_t bytes) {
    void *pointer = dev_alloc(bytes);
    cr_assert_eq(cudaMemcpy(pointer, host, bytes, cudaMemcpyHostToDevice), cudaSuccess, "upload failed");
    return pointer;
}

static void upload(void *device, const void *host, size_t bytes) {
    cr_assert_eq(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), cudaSuccess, "upload failed");
}

static void download(void *host, const void *device, size_t bytes) {
    sync_ok("before download");
    cudaError_t status = cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost);
    cr_assert_eq(status, cudaSuccess, "download: %s", cudaGetErrorString(status));
}

static float *download_bf16(const mb_bf16 *device, size_t count) {
    mb_bf16 *raw = malloc(count * sizeof(mb_bf16) + 1);
    float *values = malloc(count * sizeof(float) + 1);
    download(raw, device, count * sizeof(mb_bf16));
    for (size_t i = 0; i < count; i++) values[i] = mb_bf16_to_float(raw[i]);
    free(raw);
    return values;
}

static float *download_floats(const float *device, size_t count) {
    float *values = malloc(count * sizeof(float) + 1);
    download(values, device, count * sizeof(float));
    return values;
}

/* ---- random inputs ---- */

static float *random_floats(mb_rng *rng, size_t count, double mean, double std) {
    float *values = malloc(count * sizeof(float) + 1);
    for (size_t i = 0; i < count; i++) values[i] = (float)(mean + std * mb_rng_normal(rng));
    return values;
}

/* Random values rounded to bf16: *host_out gets the float copy the CPU sees, the return value is on the device. */
static mb_bf16 *random_bf16(mb_rng *rng, size_t count, double mean, double std, float **host_out) {
    float *values = random_floats(rng, count, mean, std);
    mb_bf16 *raw = malloc(count * sizeof(mb_bf16) + 1);
    for (size_t i = 0; i < count; i++) {
        raw[i] = mb_bf16_from_float(values[i]);
        values[i] = mb_bf16_to_float(raw[i]);
    }
    mb_bf16 *device = to_device(raw, count * sizeof(mb_bf16));
    free(raw);
    *host_out = values;
    return device;
}

static float *copy_floats(const float *values, size_t count) {
    float *copy = malloc(count * sizeof(float) + 1);
    memcpy(copy, values, count * sizeof(float));
    return copy;
}

/* ---- comparisons ---- */

static size_t count_nonfinite(const float *values, size_t count) {
    size_t bad = 0;
    for (size_t i = 0; i < count; i++) bad += !isfinite(values[i]);
    return bad;
}

/* Per-tensor relative error ‖got − want‖ / ‖want‖; fails on unwritten (non-finite) values and on a zero reference. */
static void expect_close(const char *what, const float *got, const float *want, size_t count, double tolerance) {
    size_t bad = count_nonfinite(got, count);
    cr_expect_eq(bad, 0, "%s: %zu of %zu values are not finite (unwritten or NaN)", what, bad, count);
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < count; i++) {
        double d = (double)got[i] - want[i];
        diff += d * d;
        norm += (double)want[i] * want[i];
    }
    cr_expect(norm > 0.0, "%s: the reference is all zeros, the comparison would prove nothing", what);
    double error = sqrt(diff / (norm > 0.0 ? norm : 1.0));
    cr_expect(error <= tolerance, "%s: relative error %.3g exceeds %.1g", what, error, tolerance);
    cr_log_info("%s: relative error %.3g (%zu values)\n", what, error, count);
}

static void expect_same_bits(const char *what, const void *a, const void *b, size_t bytes) {
    cr_expect(memcmp(a, b, bytes) == 0, "%s: the two runs differ (not bit-identical)", what);
}

/* ==================================================================================================== linear */

typedef struct linear_case {
    int n, in, out, bias, residual; /* residual: 0 none, 1 separate buffer, 2 in place (y holds it) */
    int accumulate_dx;
} linear_case;

/* A matmul context (its tuning as MB_GEMM_TUNE or the default; tests that depend on it set it themselves). */
static mb_cuda_matmul *create_matmul(void) {
    mb_error err = {{0}};
    mb_cuda_matmul *matmul = NULL;
    cr_assert_eq(mb_cuda_matmul_create(&matmul, &err), 0, "matmul_create: %s", err.message);
    return matmul;
}

static void run_linear(mb_cuda_matmul *matmul, linear_case c, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    size_t nx = (size_t)c.n * c.in, nw = (size_t)c.out * c.in, ny = (size_t)c.n * c.out;
    float *x, *w, *b = NULL, *r = NULL, *dy;
    mb_bf16 *d_x = random_bf16(&rng, nx, 0.0, 1.0, &x);
    mb_bf16 *d_w = random_bf16(&rng, nw, 0.0, 1.0 / sqrt((double)c.in), &w);
    mb_bf16 *d_b = c.bias ? random_bf16(&rng, (size_t)c.out, 0.0, 0.5, &b) : NULL;
    mb_bf16 *d_r = c.residual ? random_bf16(&rng, ny, 0.0, 1.0, &r) : NULL;
    mb_bf16 *d_y = c.residual == 2 ? d_r : dev_alloc(ny * sizeof(mb_bf16));
    if (c.residual != 2) dev_poison(d_y, ny * sizeof(mb_bf16));
    launched(mb_cuda_linear_forward(matmul, d_y, d_x, d_w, d_b, c.residual ? d_r : NULL, c.n, c.in, c.out,
                                    test_stream, &err), &err, "linear_forward");
    float *y_ref = malloc(ny * sizeof(float) + 1);
    mb_cpu_linear_forward(y_ref, x, w, b, c.n, c.in, c.out);
    for (size_t i = 0; c.residual && i < ny; i++) y_ref[i] += r[i];
    float *y = download_bf16(d_y, ny);
    char what[160];
    snprintf(what, sizeof what, "linear y (n %d, in %d, out %d, bias %d, residual %d)", c.n, c.in, c.out, c.bias,
             c.residual);
    expect_close(what, y, y_ref, ny, BF16_TOLERANCE);

    /* backward: dx written or accumulated, dW and db accumulated onto random fp32 values */
    mb_bf16 *d_dy = random_bf16(&rng, ny, 0.0, 1.0, &dy);
    float *dx_ref = NULL;
    mb_bf16 *d_dx;
    if (c.accumulate_dx) {
        d_dx = random_bf16(&rng, nx, 0.0, 1.0, &dx_ref);
    } else {
        dx_ref = malloc(nx * sizeof(float) + 1);
        d_dx = dev_alloc(nx * sizeof(mb_bf16));
        dev_poison(d_dx, nx * sizeof(mb_bf16));
    }
    float *dw_ref = random_floats(&rng, nw, 0.0, 1.0), *db_ref = random_floats(&rng, (size_t)c.out, 0.0, 1.0);
    float *d_dw = to_device(dw_ref, nw * sizeof(float)), *d_db = to_device(db_ref, (size_t)c.out * sizeof(float));
    void *scratch = dev_alloc(mb_cuda_linear_backward_scratch_bytes(c.n, c.out));
    launched(mb_cuda_linear_backward(matmul, d_dx, d_dw, d_db, scratch, d_dy, d_x, d_w, c.n, c.in, c.out,
                                     c.accumulate_dx, test_stream, &err), &err, "linear_backward");
    mb_cpu_linear_backward(dx_ref, dw_ref, db_ref, dy, x, w, c.n, c.in, c.out, c.accumulate_dx);
    float *dx = download_bf16(d_dx, nx), *dw = download_floats(d_dw, nw), *db = download_floats(d_db, (size_t)c.out);
    snprintf(what, sizeof what, "linear dx (n %d, in %d, out %d, accumulate %d)", c.n, c.in, c.out, c.accumulate_dx);
    expect_close(what, dx, dx_ref, nx, BF16_TOLERANCE);
    snprintf(what, sizeof what, "linear dW (n %d, in %d, out %d)", c.n, c.in, c.out);
    expect_close(what, dw, dw_ref, nw, FP32_TOLERANCE);
    snprintf(what, sizeof what, "linear db (n %d, out %d)", c.n, c.out);
    expect_close(what, db, db_ref, (size_t)c.out, FP32_TOLERANCE);

    free(x), free(w), free(b), free(r), free(dy), free(y_ref), free(y), free(dx_ref), free(dw_ref), free(db_ref);
    free(dx), free(dw), free(db);
    cudaFree(d_x), cudaFree(d_w), cudaFree(d_b), cudaFree(d_r), cudaFree(d_dy), cudaFree(d_dx), cudaFree(d_dw);
    cudaFree(d_db), cudaFree(scratch);
    if (c.residual != 2) cudaFree(d_y);
}

Test(gpu_ops, linear) {
    require_gpu();
    mb_cuda_matmul *matmul = create_matmul();
    linear_case cases[] = {
        {1, 64, 96, 1, 0, 0},                                 /* one row */
        {37, 64, 96, 1, 1, 1},                                /* rows not a tile multiple, residual, += dx */
        {size_for(257, 33), 768, 2304, 0, 2, 0},              /* Wqkv shape, residual added in place */
        {size_for(300, 20), 1152, 768, 0, 0, 1},              /* MLP Wo shape */
        {5, 32, 3, 1, 0, 0},                                  /* classifier with 3 labels: odd leading dimension */
        {size_for(70, 9), 64, size_for(50368, 4096), 1, 0, 0} /* MLM decoder width */
    };
    for (int fallback = 0; fallback <= 1; fallback++) {
        mb_cuda_matmul_force_fallback(matmul, fallback); /* cuBLASLt, then the simple kernel for odd shapes */
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_linear(matmul, cases[i], 100 + i);
    }
    mb_cuda_matmul_destroy(matmul);
}

/* More distinct shapes than the algorithm cache keeps (its limit is 2048; packed batches give a few hundred, unpacked
 * fine-tuning batches any number): every shape's output matches the CPU, and a second pass over the same shapes
 * (cache hits, then uncached shapes past the limit) repeats the first pass's bits. */
Test(gpu_ops, linear_more_shapes_than_the_cache) {
    require_gpu();
    mb_error err = {{0}};
    mb_cuda_matmul *matmul = create_matmul();
    mb_cuda_matmul_set_tuning(matmul, 0); /* tuning is tested below; here only the cache */
    mb_rng rng;
    mb_rng_seed(&rng, 47);
    const int width = 16, shapes = size_for(2200, 2100);
    float *x, *w;
    mb_bf16 *d_x = random_bf16(&rng, (size_t)shapes * width, 0.0, 1.0, &x);
    mb_bf16 *d_w = random_bf16(&rng, (size_t)width * width, 0.0, 0.25, &w);
    float *want = malloc((size_t)shapes * width * sizeof(float));
    mb_cpu_linear_forward(want, x, w, NULL, shapes, width, width);
    mb_bf16 *d_y = dev_alloc((size_t)shapes * width * sizeof(mb_bf16));
    mb_bf16 *first = malloc((size_t)shapes * width * sizeof(mb_bf16)), *again = malloc(width * sizeof(mb_bf16));
    size_t mismatched_rows = 0, repeat_differs = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int n = 1; n <= shapes; n++) { /* n rows: a new (m, n, k) shape each */
            launched(mb_cuda_linear_forward(matmul, d_y, d_x, d_w, NULL, NULL, n, width, width, test_stream, &err),
                     &err, "linear_forward");
            mb_bf16 *last_row = pass == 0 ? first + (size_t)(n - 1) * width : again;
            download(last_row, d_y + (size_t)(n - 1) * width, width * sizeof(mb_bf16));
            if (pass == 1) {
                repeat_differs += memcmp(again, first + (size_t)(n - 1) * width, width * sizeof(mb_bf16)) != 0;
                continue;
            }
            double diff = 0.0, norm = 0.0;
            for (int j = 0; j < width; j++) {
                double d = (double)mb_bf16_to_float(last_row[j]) - want[(size_t)(n - 1) * width + j];
                diff += d * d;
                norm += (double)want[(size_t)(n - 1) * width + j] * want[(size_t)(n - 1) * width + j];
            }
            mismatched_rows += !(sqrt(diff / norm) <= BF16_TOLERANCE);
        }
    cr_expect_eq(mismatched_rows, 0, "%zu of %d shapes gave a last row away from the CPU's", mismatched_rows, shapes);
    cr_expect_eq(repeat_differs, 0, "%zu of %d shapes gave other bits the second time", repeat_differs, shapes);
    free(x), free(w), free(want), free(first), free(again);
    cudaFree(d_x), cudaFree(d_w), cudaFree(d_y);
    mb_cuda_matmul_destroy(matmul);
}

/* The outputs of one linear forward (residual added in place) and backward (dx and dW accumulated) on inputs drawn
 * from `seed`, run `calls` times from the same starting buffers; the last call's y, dx and dW bytes into *bytes_out. */
static unsigned char *linear_output_bytes(mb_cuda_matmul *matmul, int n, int in, int out, uint64_t seed, int calls,
                                          size_t *bytes_out) {
    size_t nx = (size_t)n * in, nw = (size_t)out * in, ny = (size_t)n * out;
    size_t y_bytes = ny * sizeof(mb_bf16), dx_bytes = nx * sizeof(mb_bf16), dw_bytes = nw * sizeof(float);
    unsigned char *bytes = malloc(y_bytes + dx_bytes + dw_bytes);
    mb_error err = {{0}};
    for (int call = 0; call < calls; call++) {
        mb_rng rng;
        mb_rng_seed(&rng, seed);
        float *x, *w, *y0, *dy, *dx0;
        mb_bf16 *d_x = random_bf16(&rng, nx, 0.0, 1.0, &x), *d_w = random_bf16(&rng, nw, 0.0, 0.05, &w);
        mb_bf16 *d_y = random_bf16(&rng, ny, 0.0, 1.0, &y0), *d_dy = random_bf16(&rng, ny, 0.0, 1.0, &dy);
        mb_bf16 *d_dx = random_bf16(&rng, nx, 0.0, 1.0, &dx0);
        float *dw0 = random_floats(&rng, nw, 0.0, 1.0), *d_dw = to_device(dw0, dw_bytes);
        launched(mb_cuda_linear_forward(matmul, d_y, d_x, d_w, NULL, d_y, n, in, out, test_stream, &err), &err,
                 "linear_forward");
        launched(mb_cuda_linear_backward(matmul, d_dx, d_dw, NULL, NULL, d_dy, d_x, d_w, n, in, out, 1, test_stream,
                                         &err), &err, "linear_backward");
        download(bytes, d_y, y_bytes);
        download(bytes + y_bytes, d_dx, dx_bytes);
        download(bytes + y_bytes + dx_bytes, d_dw, dw_bytes);
        free(x), free(w), free(y0), free(dy), free(dx0), free(dw0);
        cudaFree(d_x), cudaFree(d_w), cudaFree(d_y), cudaFree(d_dy), cudaFree(d_dx), cudaFree(d_dw);
    }
    *bytes_out = y_bytes + dx_bytes + dw_bytes;
    return bytes;
}

/* GEMM tuning (a shape's MB_CUDA_GEMM_TUNE_SIGHTING-th sighting) keeps only candidates whose output is bit-identical
 * to cuBLASLt's first choice, and runs them into scratch memory: the tuned call must give exactly the untuned
 * context's bits, with the in-place residual, dx and dW accumulated once. One call fewer tunes nothing. */
Test(gpu_ops, linear_tuning_is_bit_identical) {
    require_gpu();
    mb_cuda_matmul *tuned = create_matmul(), *plain = create_matmul();
    mb_cuda_matmul_set_tuning(tuned, 8);
    mb_cuda_matmul_set_tuning(plain, 0);
    int shapes[][3] = {{4096, 768, 2304}, {4096, 1152, 768}, {size_for(2051, 301), 768, 768}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int n = shapes[i][0], in = shapes[i][1], out = shapes[i][2];
        size_t bytes = 0, plain_bytes = 0;
        unsigned char *want = linear_output_bytes(plain, n, in, out, 40 + i, 1, &plain_bytes);
        unsigned char *got = linear_output_bytes(tuned, n, in, out, 40 + i, MB_CUDA_GEMM_TUNE_SIGHTING, &bytes);
        char what[96];
        snprintf(what, sizeof what, "tuned linear (n %d, in %d, out %d)", n, in, out);
        cr_assert_eq(bytes, plain_bytes);
        expect_same_bits(what, got, want, bytes);
        free(want), free(got);
    }
    int tuned_shapes = 0, changed = 0, plain_tuned = 0;
    mb_cuda_matmul_tuning_counts(plain, &plain_tuned, &changed);
    cr_expect_eq(plain_tuned, 0, "tuning set to 0 candidates still tuned %d shapes", plain_tuned);
    mb_cuda_matmul_tuning_counts(tuned, &tuned_shapes, &changed);
    cr_expect(tuned_shapes >= 3, "only %d of the 9 GEMM shapes were tuned: the test would prove little", tuned_shapes);
    cr_log_info("linear tuning: %d shapes tuned, %d run another candidate than cuBLASLt's first\n", tuned_shapes,
                changed);
    mb_cuda_matmul_destroy(tuned);
    mb_cuda_matmul_destroy(plain);
}

/* Packing gives the layers a new token count in most micro-batches: a shape is tuned only once it recurs, on its
 * MB_CUDA_GEMM_TUNE_SIGHTING-th call, never before, and then once (the fourth call compares no candidates). */
Test(gpu_ops, linear_tuning_waits_for_recurring_shapes) {
    require_gpu();
    mb_cuda_matmul *matmul = create_matmul();
    mb_cuda_matmul_set_tuning(matmul, 8);
    int tuned = 0, changed = 0;
    for (int call = 1; call <= MB_CUDA_GEMM_TUNE_SIGHTING + 1; call++) {
        size_t bytes = 0;
        free(linear_output_bytes(matmul, 4096, 768, 2304, 77, 1, &bytes)); /* 3 GEMM shapes: y, dx, dW */
        mb_cuda_matmul_tuning_counts(matmul, &tuned, &changed);
        cr_log_info("after call %d: %d shapes tuned\n", call, tuned);
        if (call < MB_CUDA_GEMM_TUNE_SIGHTING)
            cr_expect_eq(tuned, 0, "call %d of a shape already tuned %d GEMM shapes", call, tuned);
        else
            cr_expect(tuned >= 1 && tuned <= 3, "after call %d: %d of the 3 GEMM shapes tuned", call, tuned);
    }
    mb_cuda_matmul_destroy(matmul);
}

/* ================================================================================================= layernorm */

static void run_layernorm(int n, int h, int with_bias, int accumulate_dx, int dx_aliases_dy, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    size_t count = (size_t)n * h;
    float *x, *dy, *dx_ref = NULL;
    mb_bf16 *d_x = random_bf16(&rng, count, 0.5, 2.0, &x);
    float *weight = random_floats(&rng, (size_t)h, 1.0, 0.2), *bias = with_bias ? random_floats(&rng, (size_t)h, 0.0, 0.3) : NULL;
    float *d_weight = to_device(weight, (size_t)h * sizeof(float));
    float *d_bias = with_bias ? to_device(bias, (size_t)h * sizeof(float)) : NULL;
    mb_bf16 *d_y = dev_alloc(count * sizeof(mb_bf16));
    float *d_mean = dev_alloc((size_t)n * sizeof(float)), *d_rstd = dev_alloc((size_t)n * sizeof(float));
    dev_poison(d_y, count * sizeof(mb_bf16));
    dev_poison(d_mean, (size_t)n * sizeof(float));
    dev_poison(d_rstd, (size_t)n * sizeof(float));
    launched(mb_cuda_layernorm_forward(d_y, d_mean, d_rstd, d_x, d_weight, d_bias, n, h, 1e-5f, test_stream, &err),
             &err, "layernorm_forward");
    float *y_ref = malloc(count * sizeof(float) + 1), *mean_ref = malloc((size_t)n * sizeof(float) + 1);
    float *rstd_ref = malloc((size_t)n * sizeof(float) + 1);
    mb_cpu_layernorm_forward(y_ref, mean_ref, rstd_ref, x, weight, bias, n, h, 1e-5f);
    float *y = download_bf16(d_y, count), *mean = download_floats(d_mean, (size_t)n);
    float *rstd = download_floats(d_rstd, (size_t)n);
    char what[128];
    snprintf(what, sizeof what, "layernorm y (n %d, h %d, bias %d)", n, h, with_bias);
    expect_close(what, y, y_ref, count, BF16_TOLERANCE);
    expect_close("layernorm mean", mean, mean_ref, (size_t)n, FP32_TOLERANCE);
    expect_close("layernorm rstd", rstd, rstd_ref, (size_t)n, FP32_TOLERANCE);

    mb_bf16 *d_dy = random_bf16(&rng, count, 0.0, 1.0, &dy);
    mb_bf16 *d_dx;
    if (dx_aliases_dy) {
        d_dx = d_dy;
        dx_ref = malloc(count * sizeof(float) + 1);
    } else if (accumulate_dx) {
        d_dx = random_bf16(&rng, count, 0.0, 1.0, &dx_ref);
    } else {
        dx_ref = malloc(count * sizeof(float) + 1);
        d_dx = dev_alloc(count * sizeof(mb_bf16));
        dev_poison(d_dx, count * sizeof(mb_bf16));
    }
    float *dw_ref = random_floats(&rng, (size_t)h, 0.0, 1.0), *db_ref = random_floats(&rng, (size_t)h, 0.0, 1.0);
    float *d_dw = to_device(dw_ref, (size_t)h * sizeof(float)), *d_db = to_device(db_ref, (size_t)h * sizeof(float));
    void *scratch = dev_alloc(mb_cuda_layernorm_backward_scratch_bytes(n, h));
    launched(mb_cuda_layernorm_backward(d_dx, d_dw, with_bias ? d_db : NULL, scratch, d_dy, d_x, d_mean, d_rstd,
                                        d_weight, n, h, accumulate_dx, test_stream, &err),
             &err, "layernorm_backward");
    mb_cpu_layernorm_backward(dx_ref, dw_ref, with_bias ? db_ref : NULL, dy, x, mean, rstd, weight, n, h,
                              accumulate_dx);
    float *dx = download_bf16(d_dx, count), *dw = download_floats(d_dw, (size_t)h), *db = download_floats(d_db, (size_t)h);
    snprintf(what, sizeof what, "layernorm dx (n %d, h %d, accumulate %d, aliased %d)", n, h, accumulate_dx,
             dx_aliases_dy);
    expect_close(what, dx, dx_ref, count, BF16_TOLERANCE);
    expect_close("layernorm dweight", dw, dw_ref, (size_t)h, FP32_TOLERANCE);
    if (with_bias) expect_close("layernorm dbias", db, db_ref, (size_t)h, FP32_TOLERANCE);

    free(x), free(dy), free(dx_ref), free(weight), free(bias), free(y_ref), free(mean_ref), free(rstd_ref), free(y);
    free(mean), free(rstd), free(dw_ref), free(db_ref), free(dx), free(dw), free(db);
    cudaFree(d_x), cudaFree(d_weight), cudaFree(d_bias), cudaFree(d_y), cudaFree(d_mean), cudaFree(d_rstd);
    cudaFree(d_dy), cudaFree(d_dw), cudaFree(d_db), cudaFree(scratch);
    if (!dx_aliases_dy) cudaFree(d_dx);
}

Test(gpu_ops, layernorm) {
    require_gpu();
    run_layernorm(1, 768, 0, 0, 0, 1);
    run_layernorm(size_for(67, 13), 768, 1, 1, 0, 2);
    run_layernorm(size_for(1000, 40), 96, 0, 0, 1, 3);
    run_layernorm(33, 1000, 1, 0, 0, 4); /* width not a multiple of 32 */
    run_layernorm(size_for(4100, 300), 1024, 0, 1, 0, 5);
    /* register-resident kernels (h % 8 == 0, h <= 2048): every chunk count's edge, both accumulate modes, aliasing */
    run_layernorm(size_for(300, 30), 768, 0, 0, 1, 6);   /* ModernBERT-base width, dx written over dy */
    run_layernorm(size_for(300, 30), 768, 0, 1, 0, 7);   /* ModernBERT-base width, += dx (the residual stream) */
    run_layernorm(17, 1024, 1, 0, 1, 8);                 /* ModernBERT-large width, aliased, with bias */
    run_layernorm(9, 2048, 0, 1, 0, 9);                  /* widest register-resident row: 8 chunks */
    run_layernorm(9, 264, 1, 1, 0, 10);                  /* one full chunk and one of a single lane */
    /* general fallback: widths not a multiple of 8, or wider than 2048 */
    run_layernorm(size_for(70, 11), 100, 1, 1, 0, 11);
    run_layernorm(size_for(70, 11), 100, 0, 0, 1, 12);
    run_layernorm(5, 2056, 0, 0, 0, 13);
}

/* The backward's optional outputs and its repeatability at one width: dx only (no parameter gradients, no scratch),
 * dw and db only (dx NULL), db without dw, and two identical calls writing identical bits (dx, dw, db). */
static void run_layernorm_backward_parts(int n, int h, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    size_t count = (size_t)n * h, row_bytes = (size_t)h * sizeof(float);
    float *x, *dy;
    mb_bf16 *d_x = random_bf16(&rng, count, 0.5, 2.0, &x), *d_dy = random_bf16(&rng, count, 0.0, 1.0, &dy);
    float *weight = random_floats(&rng, (size_t)h, 1.0, 0.2), *d_weight = to_device(weight, row_bytes);
    mb_bf16 *d_y = dev_alloc(count * sizeof(mb_bf16));
    float *d_mean = dev_alloc((size_t)n * sizeof(float)), *d_rstd = dev_alloc((size_t)n * sizeof(float));
    launched(mb_cuda_layernorm_forward(d_y, d_mean, d_rstd, d_x, d_weight, NULL, n, h, 1e-5f, test_stream, &err),
             &err, "layernorm_forward");
    float *mean = download_floats(d_mean, (size_t)n), *rstd = download_floats(d_rstd, (size_t)n);
    float *dw_init = random_floats(&rng, (size_t)h, 0.0, 1.0), *db_init = random_floats(&rng, (size_t)h, 0.0, 1.0);
    float *dx_ref = malloc(count * sizeof(float) + 1), *dw_ref = copy_floats(dw_init, (size_t)h);
    float *db_ref = copy_floats(db_init, (size_t)h);
    mb_cpu_layernorm_backward(dx_ref, dw_ref, db_ref, dy, x, mean, rstd, weight, n, h, 0);
    mb_bf16 *d_dx = dev_alloc(count * sizeof(mb_bf16));
    float *d_dw = to_device(dw_init, row_bytes), *d_db = to_device(db_init, row_bytes);
    void *scratch = dev_alloc(mb_cuda_layernorm_backward_scratch_bytes(n, h));
    char what[128];

    dev_poison(d_dx, count * sizeof(mb_bf16)); /* dx only */
    launched(mb_cuda_layernorm_backward(d_dx, NULL, NULL, NULL, d_dy, d_x, d_mean, d_rstd, d_weight, n, h, 0,
                                        test_stream, &err),
             &err, "layernorm_backward (dx only)");
    float *dx = download_bf16(d_dx, count);
    snprintf(what, sizeof what, "layernorm dx only (n %d, h %d)", n, h);
    expect_close(what, dx, dx_ref, count, BF16_TOLERANCE);

    launched(mb_cuda_layernorm_backward(NULL, d_dw, d_db, scratch, d_dy, d_x, d_mean, d_rstd, NULL, n, h, 0,
                                        test_stream, &err),
             &err, "layernorm_backward (dw, db only)");
    float *dw = download_floats(d_dw, (size_t)h), *db = download_floats(d_db, (size_t)h);
    snprintf(what, sizeof what, "layernorm dweight without dx (n %d, h %d)", n, h);
    expect_close(what, dw, dw_ref, (size_t)h, FP32_TOLERANCE);
    snprintf(what, sizeof what, "layernorm dbias without dx (n %d, h %d)", n, h);
    expect_close(what, db, db_ref, (size_t)h, FP32_TOLERANCE);

    upload(d_db, db_init, row_bytes); /* db without dw */
    launched(mb_cuda_layernorm_backward(NULL, NULL, d_db, scratch, d_dy, d_x, d_mean, d_rstd, NULL, n, h, 0,
                                        test_stream, &err),
             &err, "layernorm_backward (db only)");
    free(db);
    db = download_floats(d_db, (size_t)h);
    snprintf(what, sizeof what, "layernorm dbias alone (n %d, h %d)", n, h);
    expect_close(what, db, db_ref, (size_t)h, FP32_TOLERANCE);

    float *runs[2][3]; /* dx, dw, db of two identical calls */
    for (int run = 0; run < 2; run++) {
        dev_poison(d_dx, count * sizeof(mb_bf16));
        upload(d_dw, dw_init, row_bytes);
        upload(d_db, db_init, row_bytes);
        launched(mb_cuda_layernorm_backward(d_dx, d_dw, d_db, scratch, d_dy, d_x, d_mean, d_rstd, d_weight, n, h, 0,
                                            test_stream, &err),
                 &err, "layernorm_backward (repeat)");
        runs[run][0] = download_bf16(d_dx, count);
        runs[run][1] = download_floats(d_dw, (size_t)h);
        runs[run][2] = download_floats(d_db, (size_t)h);
    }
    expect_close("layernorm dweight (repeat)", runs[0][1], dw_ref, (size_t)h, FP32_TOLERANCE);
    expect_same_bits("layernorm dx", runs[0][0], runs[1][0], count * sizeof(float));
    expect_same_bits("layernorm dweight", runs[0][1], runs[1][1], row_bytes);
    expect_same_bits("layernorm dbias", runs[0][2], runs[1][2], row_bytes);

    for (int run = 0; run < 2; run++)
        for (int i = 0; i < 3; i++) free(runs[run][i]);
    free(x), free(dy), free(weight), free(mean), free(rstd), free(dw_init), free(db_init), free(dx_ref);
    free(dw_ref), free(db_ref), free(dx), free(dw), free(db);
    cudaFree(d_x), cudaFree(d_dy), cudaFree(d_weight), cudaFree(d_y), cudaFree(d_mean), cudaFree(d_rstd);
    cudaFree(d_dx), cudaFree(d_dw), cudaFree(d_db), cudaFree(scratch);
}

Test(gpu_ops, layernorm_backward_parts) {
    require_gpu();
    /* more rows than the fused backward's 264 × 8 warps: each warp loops over several rows (staged two ahead) */
    run_layernorm_backward_parts(size_for(5000, 2500), 768, 21);
    run_layernorm_backward_parts(size_for(2113, 2113), 1024, 22); /* one warp with a second row */
    run_layernorm_backward_parts(3, 264, 23);                     /* fewer rows than warps in a block */
    run_layernorm_backward_parts(size_for(300, 40), 100, 24);     /* general fallback: column sums + dx kernel */
}

/* ================================================================================================= embedding */

static void run_embedding(int n, int h, int vocab, int pad_id, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    int32_t *ids = malloc((size_t)n * sizeof(int32_t));
    const int frequent = vocab / 3; /* plays [MASK]: about 30% of the tokens share it */
    for (int i = 0; i < n; i++) {
        double u = mb_rng_uniform(&rng);
        ids[i] = u < 0.3 ? frequent : (u < 0.4 && pad_id >= 0 ? pad_id : (int32_t)mb_rng_below(&rng, (uint64_t)vocab));
    }
    ids[n - 1] = vocab - 1; /* the last row of the table is reachable */
    float *table;
    mb_bf16 *d_table = random_bf16(&rng, (size_t)vocab * h, 0.0, 1.0, &table);
    int32_t *d_ids = to_device(ids, (size_t)n * sizeof(int32_t));
    size_t count = (size_t)n * h;
    mb_bf16 *d_out = dev_alloc(count * sizeof(mb_bf16));
    dev_poison(d_out, count * sizeof(mb_bf16));
    launched(mb_cuda_embedding_forward(d_out, d_ids, d_table, n, h, test_stream, &err), &err, "embedding_forward");
    float *out = download_bf16(d_out, count), *out_ref = malloc(count * sizeof(float) + 1);
    mb_cpu_embedding_forward(out_ref, ids, table, n, h);
    cr_expect(memcmp(out, out_ref, count * sizeof(float)) == 0, "embedding forward (h %d) is not an exact copy", h);
    /* mb_cuda_gather_rows on a strided view (what the sparse last layer does with qkv's Q block): the first half of
     * each table row, rows h apart (16-byte pieces when h / 2 is a multiple of 8, else element by element) */
    int half = h / 2;
    size_t half_count = (size_t)n * half, differing = 0;
    mb_bf16 *d_half = dev_alloc(half_count * sizeof(mb_bf16) + 2);
    dev_poison(d_half, half_count * sizeof(mb_bf16));
    launched(mb_cuda_gather_rows(d_half, d_ids, d_table, (size_t)h, n, half, test_stream, &err), &err, "gather_rows");
    float *half_out = download_bf16(d_half, half_count);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < half; k++) differing += half_out[(size_t)i * half + k] != table[(size_t)ids[i] * h + k];
    cr_expect_eq(differing, 0, "gather_rows (width %d of %d): %zu elements differ from the table", half, h, differing);
    free(half_out);
    cudaFree(d_half);

    float *dout;
    mb_bf16 *d_dout = random_bf16(&rng, count, 0.0, 1.0, &dout);
    size_t table_count = (size_t)vocab * h, scratch_bytes = 0;
    cr_assert_eq(mb_cuda_embedding_backward_scratch_bytes(&scratch_bytes, n, vocab, &err), 0, "%s", err.message);
    void *scratch = dev_alloc(scratch_bytes);
    float *dtable_init = random_floats(&rng, table_count, 0.0, 1.0);
    float *dtable_ref = copy_floats(dtable_init, table_count);
    mb_cpu_embedding_backward(dtable_ref, dout, ids, n, h, pad_id);
    float *d_dtable = to_device(dtable_init, table_count * sizeof(float));
    float *runs[2];
    for (int run = 0; run < 2; run++) {
        upload(d_dtable, dtable_init, table_count * sizeof(float));
        dev_poison(scratch, scratch_bytes);
        launched(mb_cuda_embedding_backward(d_dtable, scratch, scratch_bytes, d_dout, d_ids, n, h, vocab, pad_id,
                                            test_stream, &err), &err, "embedding_backward");
        runs[run] = download_floats(d_dtable, table_count);
    }
    char what[128];
    snprintf(what, sizeof what, "embedding dtable (n %d, h %d, vocab %d)", n, h, vocab);
    expect_close(what, runs[0], dtable_ref, table_count, FP32_TOLERANCE);
    expect_same_bits("embedding backward", runs[0], runs[1], table_count * sizeof(float));
    if (pad_id >= 0)
        cr_expect(memcmp(runs[0] + (size_t)pad_id * h, dtable_init + (size_t)pad_id * h, (size_t)h * sizeof(float)) == 0,
                  "embedding backward changed the pad row %d", pad_id);

    free(ids), free(table), free(out), free(out_ref), free(dout), free(dtable_init), free(dtable_ref);
    free(runs[0]), free(runs[1]);
    cudaFree(d_table), cudaFree(d_ids), cudaFree(d_out), cudaFree(d_dout), cudaFree(scratch), cudaFree(d_dtable);
}

Test(gpu_ops, embedding) {
    require_gpu();
    run_embedding(1, 64, 10, -1, 11);                                      /* one token */
    run_embedding(size_for(4000, 300), 96, 1000, 3, 12);                   /* 16-byte copy path */
    run_embedding(size_for(777, 100), 100, 500, 7, 13);                    /* width not a multiple of 8 */
    run_embedding(size_for(8192, 512), size_for(768, 64), 50368, 50283, 14); /* ModernBERT vocabulary and pad id */
}

/* ====================================================================================================== rope */

/* Sequence lengths: 1, tile-sized and odd ones, then random. */
static int32_t *make_cu_seqlens(const int *lengths, int num_seqs) {
    int32_t *cu = malloc((size_t)(num_seqs + 1) * sizeof(int32_t));
    cu[0] = 0;
    for (int s = 0; s < num_seqs; s++) cu[s + 1] = cu[s] + lengths[s];
    return cu;
}

static void run_rope(const int *lengths, int num_seqs, int heads, int head_dim, double theta, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    int32_t *cu = make_cu_seqlens(lengths, num_seqs);
    int n = cu[num_seqs];
    int32_t *positions_ref = malloc((size_t)n * sizeof(int32_t)), *positions = malloc((size_t)n * sizeof(int32_t));
    mb_cpu_positions(positions_ref, cu, num_seqs);
    int32_t *d_cu = to_device(cu, (size_t)(num_seqs + 1) * sizeof(int32_t));
    int32_t *d_positions = dev_alloc((size_t)n * sizeof(int32_t));
    dev_poison(d_positions, (size_t)n * sizeof(int32_t));
    launched(mb_cuda_positions(d_positions, d_cu, num_seqs, n, test_stream, &err), &err, "positions");
    download(positions, d_positions, (size_t)n * sizeof(int32_t));
    cr_expect(memcmp(positions, positions_ref, (size_t)n * sizeof(int32_t)) == 0, "positions differ from the CPU");

    size_t count = (size_t)n * 3 * heads * head_dim;
    float *qkv;
    mb_bf16 *d_qkv = random_bf16(&rng, count, 0.0, 1.0, &qkv);
    for (int direction = 1; direction >= -1; direction -= 2) {
        float *before = download_bf16(d_qkv, count);
        launched(mb_cuda_rope(d_qkv, d_positions, n, heads, head_dim, theta, direction, test_stream, &err), &err,
                 "rope");
        mb_cpu_rope(before, positions_ref, n, heads, head_dim, theta, direction);
        float *after = download_bf16(d_qkv, count);
        char what[128];
        snprintf(what, sizeof what, "rope (direction %+d, head_dim %d, theta %g)", direction, head_dim, theta);
        expect_close(what, after, before, count, BF16_TOLERANCE);
        size_t hidden = (size_t)heads * head_dim, v_mismatch = 0;
        for (int i = 0; i < n; i++)
            v_mismatch += memcmp(after + (size_t)i * 3 * hidden + 2 * hidden, before + (size_t)i * 3 * hidden + 2 * hidden,
                                 hidden * sizeof(float)) != 0;
        cr_expect_eq(v_mismatch, 0, "rope changed V in %zu rows", v_mismatch);
        free(before), free(after);
    }
    free(cu), free(positions_ref), free(positions), free(qkv);
    cudaFree(d_cu), cudaFree(d_positions), cudaFree(d_qkv);
}

Test(gpu_ops, rope) {
    require_gpu();
    int lengths[] = {1, 64, 65, 3, 130, 1, 500};
    run_rope(lengths, 7, 3, 64, 160000.0, 21);
    run_rope(lengths, 5, 2, 32, 10000.0, 22);
    int long_one[] = {size_for(8192, 600), 5};
    run_rope(long_one, 2, 2, 64, 160000.0, 23);
    run_rope(lengths, 7, 2, 128, 160000.0, 24); /* 16-byte path, head_dim 128 */
    run_rope(lengths, 4, 3, 12, 10000.0, 25);   /* d/2 = 6: the 4-byte (bf16x2) path */
    run_rope(lengths, 4, 2, 6, 10000.0, 26);    /* d/2 = 3: the 2-byte path */
}

/* ================================================================================================= attention */

/* Columns [block·H, (block + 1)·H) of a [n, 3H] matrix, as a contiguous [n, H] copy. */
static float *qkv_block(const float *qkv, int n, int hidden, int block) {
    float *out = malloc((size_t)n * hidden * sizeof(float) + 1);
    for (int i = 0; i < n; i++)
        memcpy(out + (size_t)i * hidden, qkv + (size_t)i * 3 * hidden + (size_t)block * hidden,
               (size_t)hidden * sizeof(float));
    return out;
}

/* A row-parallel restatement of src/cpu/attention.c (same formulas, double accumulation). The CPU op runs one thread
 * per (sequence, head), which takes minutes on an 8192-token sequence; this one spreads the rows of a sequence over
 * the OpenMP threads. It is checked against the CPU op on every short case (anchoring it to the specification) and
 * stands in for it on the long ones. */
typedef struct reference_shape {
    const int32_t *cu;
    int num_seqs, heads, head_dim, window, hidden, stride;
    double scale;
} reference_shape;

static void reference_range(const reference_shape *r, int i, int *lo, int *hi) {
    int a = 0, b = r->num_seqs; /* last s with cu[s] <= i */
    while (b - a > 1) {
        int mid = (a + b) / 2;
        if (r->cu[mid] <= i) a = mid;
        else b = mid;
    }
    *lo = r->cu[a];
    *hi = r->cu[a + 1];
    if (r->window < 0) return;
    if (i - r->window > *lo) *lo = i - r->window;
    if (i + r->window + 1 < *hi) *hi = i + r->window + 1;
}

static double reference_dot(const float *a, const float *b, int length) {
    double sum[4] = {0.0, 0.0, 0.0, 0.0}; /* four independent chains: the compiler may vectorize them */
    int k = 0;
    for (; k + 4 <= length; k += 4)
        for (int lane = 0; lane < 4; lane++) sum[lane] += (double)a[k + lane] * b[k + lane];
    for (; k < length; k++) sum[0] += (double)a[k] * b[k];
    return (sum[0] + sum[1]) + (sum[2] + sum[3]);
}

static void reference_attention_forward(float *out, float *lse, const float *qkv, const reference_shape *r, int n) {
#pragma omp parallel for schedule(dynamic, 8)
    for (int i = 0; i < n; i++) {
        int lo, hi;
        reference_range(r, i, &lo, &hi);
        double *scores = malloc((size_t)(hi - lo) * sizeof(double)), *acc = calloc((size_t)r->head_dim, sizeof(double));
        for (int h = 0; h < r->heads; h++) {
            const float *q = qkv + (size_t)i * r->stride + h * r->head_dim;
            double max_score = -INFINITY, sum = 0.0;
            for (int j = lo; j < hi; j++) {
                scores[j - lo] = reference_dot(q, qkv + (size_t)j * r->stride + r->hidden + h * r->head_dim, r->head_dim) * r->scale;
                if (scores[j - lo] > max_score) max_score = scores[j - lo];
            }
            for (int j = lo; j < hi; j++) sum += exp(scores[j - lo] - max_score);
            double log_sum = max_score + log(sum);
            memset(acc, 0, (size_t)r->head_dim * sizeof(double));
            for (int j = lo; j < hi; j++) {
                double p = exp(scores[j - lo] - log_sum);
                const float *v = qkv + (size_t)j * r->stride + 2 * r->hidden + h * r->head_dim;
                for (int k = 0; k < r->head_dim; k++) acc[k] += p * v[k];
            }
            for (int k = 0; k < r->head_dim; k++) out[(size_t)i * r->hidden + h * r->head_dim + k] = (float)acc[k];
            lse[(size_t)i * r->heads + h] = (float)log_sum;
        }
        free(scores);
        free(acc);
    }
}

/* dQ row by row; dK and dV are scattered into per-thread double accumulators (token i as the query adds to its keys'
 * rows) and summed over the threads afterwards. */
static void reference_attention_backward(float *dqkv, const float *dout, const float *out, const float *lse,
                                         const float *qkv, const reference_shape *r, int n) {
    size_t kv_count = (size_t)n * 2 * r->hidden; /* per token: dK | dV */
    int threads = omp_get_max_threads();
    double **partial = calloc((size_t)threads, sizeof(double *));
#pragma omp parallel
    {
        double *kv = calloc(kv_count, sizeof(double)), *dq = malloc((size_t)r->head_dim * sizeof(double));
        partial[omp_get_thread_num()] = kv;
#pragma omp for schedule(dynamic, 8)
        for (int i = 0; i < n; i++) {
            int lo, hi;
            reference_range(r, i, &lo, &hi);
            for (int h = 0; h < r->heads; h++) {
                size_t offset = (size_t)h * r->head_dim;
                const float *q = qkv + (size_t)i * r->stride + offset, *g = dout + (size_t)i * r->hidden + offset;
                double delta = reference_dot(g, out + (size_t)i * r->hidden + offset, r->head_dim);
                double log_sum = lse[(size_t)i * r->heads + h];
                memset(dq, 0, (size_t)r->head_dim * sizeof(double));
                for (int j = lo; j < hi; j++) {
                    const float *k_j = qkv + (size_t)j * r->stride + r->hidden + offset;
                    const float *v_j = qkv + (size_t)j * r->stride + 2 * r->hidden + offset;
                    double p = exp(reference_dot(q, k_j, r->head_dim) * r->scale - log_sum);
                    double ds = p * (reference_dot(g, v_j, r->head_dim) - delta) * r->scale;
                    double *dk = kv + (size_t)j * 2 * r->hidden + offset, *dv = dk + r->hidden;
                    for (int k = 0; k < r->head_dim; k++) {
                        dq[k] += ds * k_j[k];
                        dk[k] += ds * q[k];
                        dv[k] += p * g[k];
                    }
                }
                for (int k = 0; k < r->head_dim; k++) dqkv[(size_t)i * r->stride + offset + k] = (float)dq[k];
            }
        }
        free(dq);
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++)
        for (int k = 0; k < 2 * r->hidden; k++) {
            double sum = 0.0;
            for (int t = 0; t < threads; t++)
                if (partial[t] != NULL) sum += partial[t][(size_t)i * 2 * r->hidden + k];
            dqkv[(size_t)i * r->stride + r->hidden + k] = (float)sum;
        }
    for (int t = 0; t < threads; t++) free(partial[t]);
    free(partial);
}

/* ---- the set-up every attention test starts from ---- */

/* Sequences of the given lengths and the packed random qkv over them. The rng stays in the case: the test draws its
 * other inputs (dO, the asked rows) from the same seeded stream, in its own order around attention_case_draw_qkv. */
typedef struct attention_case {
    mb_rng rng;
    int32_t *cu, *d_cu;          /* cumulative sequence lengths [num_seqs + 1], host and device */
    int n, hidden;               /* tokens, heads · head_dim */
    size_t qkv_count, out_count; /* n · 3 · hidden (packed Q | K | V), n · hidden */
    float *qkv;                  /* the float copy of d_qkv the CPU sees; NULL until attention_case_draw_qkv */
    mb_bf16 *d_qkv;
} attention_case;

/* The shape and cu_seqlens (host and device) with the rng seeded; draws nothing yet, so that a test may draw from
 * the rng before the qkv (run_attention_rows picks its asked rows first). */
static attention_case attention_case_start(const int *lengths, int num_seqs, int heads, int head_dim, uint64_t seed) {
    attention_case c = {0};
    mb_rng_seed(&c.rng, seed);
    c.cu = make_cu_seqlens(lengths, num_seqs);
    c.n = c.cu[num_seqs];
    c.hidden = heads * head_dim;
    c.qkv_count = (size_t)c.n * 3 * c.hidden;
    c.out_count = (size_t)c.n * c.hidden;
    c.d_cu = to_device(c.cu, (size_t)(num_seqs + 1) * sizeof(int32_t));
    return c;
}

/* The random qkv (N(0, 1), rounded to bf16): the case's next draws from its rng. */
static void attention_case_draw_qkv(attention_case *c) {
    c->d_qkv = random_bf16(&c->rng, c->qkv_count, 0.0, 1.0, &c->qkv);
}

static void attention_case_free(attention_case *c) {
    free(c->cu), free(c->qkv);
    cudaFree(c->d_cu), cudaFree(c->d_qkv);
}

static void run_attention(const char *name, const int *lengths, int num_seqs, int heads, int head_dim, int window,
                          uint64_t seed) {
    attention_case c = attention_case_start(lengths, num_seqs, heads, head_dim, seed);
    attention_case_draw_qkv(&c);
    mb_error err = {{0}};
    size_t lse_count = (size_t)c.n * heads;
    float *dout;
    void *workspace = dev_alloc(mb_cuda_attention_workspace_bytes(c.n, num_seqs, heads, head_dim));
    mb_bf16 *d_out = dev_alloc(c.out_count * sizeof(mb_bf16));
    float *d_lse = dev_alloc(lse_count * sizeof(float));
    dev_poison(d_out, c.out_count * sizeof(mb_bf16));
    dev_poison(d_lse, lse_count * sizeof(float));
    launched(mb_cuda_attention_forward(d_out, d_lse, workspace, c.d_qkv, c.d_cu, num_seqs, c.n, heads, head_dim, window,
                                       test_stream, &err), &err, "attention_forward");
    float *out = download_bf16(d_out, c.out_count), *lse = download_floats(d_lse, lse_count);
    float *out_ref = malloc(c.out_count * sizeof(float) + 1), *lse_ref = malloc(lse_count * sizeof(float) + 1);
    reference_shape shape = {c.cu, num_seqs, heads, head_dim, window, c.hidden, 3 * c.hidden,
                             1.0 / sqrt((double)head_dim)};
    int longest = 0;
    for (int s = 0; s < num_seqs; s++) longest = lengths[s] > longest ? lengths[s] : longest;
    bool use_cpu_op = window >= 0 || longest <= 1024; /* else the row-parallel restatement (see above) */
    char what[200];
    if (use_cpu_op) {
        mb_cpu_attention_forward(out_ref, lse_ref, c.qkv, c.cu, num_seqs, heads, head_dim, window);
        float *out_check = malloc(c.out_count * sizeof(float) + 1), *lse_check = malloc(lse_count * sizeof(float) + 1);
        reference_attention_forward(out_check, lse_check, c.qkv, &shape, c.n);
        snprintf(what, sizeof what, "attention reference vs CPU op, %s out (window %d)", name, window);
        expect_close(what, out_check, out_ref, c.out_count, 1e-4);
        expect_close("attention reference vs CPU op, lse", lse_check, lse_ref, lse_count, 1e-4);
        free(out_check), free(lse_check);
    } else {
        reference_attention_forward(out_ref, lse_ref, c.qkv, &shape, c.n);
    }
    snprintf(what, sizeof what, "attention %s out (n %d, head_dim %d, window %d)", name, c.n, head_dim, window);
    expect_close(what, out, out_ref, c.out_count, BF16_TOLERANCE);
    snprintf(what, sizeof what, "attention %s lse", name);
    expect_close(what, lse, lse_ref, lse_count, FP32_TOLERANCE);

    /* backward from the GPU's own out and lse (checked above), on both sides; both modes: deterministic = 1 twice
     * (must be bit-identical), deterministic = 0 (fp32 atomics into dQ) once */
    mb_bf16 *d_dout = random_bf16(&c.rng, c.out_count, 0.0, 1.0, &dout);
    mb_bf16 *d_dqkv = dev_alloc(c.qkv_count * sizeof(mb_bf16));
    float *runs[3];
    static const int run_deterministic[3] = {1, 1, 0};
    for (int run = 0; run < 3; run++) {
        dev_poison(d_dqkv, c.qkv_count * sizeof(mb_bf16));
        dev_poison(workspace, mb_cuda_attention_workspace_bytes(c.n, num_seqs, heads, head_dim));
        launched(mb_cuda_attention_backward(d_dqkv, workspace, d_dout, d_out, d_lse, c.d_qkv, c.d_cu, num_seqs, c.n,
                                            heads, head_dim, window, run_deterministic[run], test_stream, &err),
                 &err, "attention_backward");
        runs[run] = download_bf16(d_dqkv, c.qkv_count);
    }
    float *dqkv_ref = malloc(c.qkv_count * sizeof(float) + 1);
    if (use_cpu_op) {
        mb_cpu_attention_backward(dqkv_ref, dout, out, lse, c.qkv, c.cu, num_seqs, heads, head_dim, window);
        float *dqkv_check = malloc(c.qkv_count * sizeof(float) + 1);
        reference_attention_backward(dqkv_check, dout, out, lse, c.qkv, &shape, c.n);
        snprintf(what, sizeof what, "attention reference vs CPU op, %s dqkv (window %d)", name, window);
        expect_close(what, dqkv_check, dqkv_ref, c.qkv_count, 1e-4);
        free(dqkv_check);
    } else {
        reference_attention_backward(dqkv_ref, dout, out, lse, c.qkv, &shape, c.n);
    }
    static const char *block_names[3] = {"dQ", "dK", "dV"};
    for (int run = 1; run < 3; run++)
        for (int block = 0; block < 3; block++) {
            float *got = qkv_block(runs[run], c.n, c.hidden, block), *want = qkv_block(dqkv_ref, c.n, c.hidden, block);
            snprintf(what, sizeof what, "attention %s %s (window %d, deterministic %d)", name, block_names[block],
                     window, run_deterministic[run]);
            expect_close(what, got, want, c.out_count, BF16_TOLERANCE);
            free(got), free(want);
        }
    snprintf(what, sizeof what, "attention %s deterministic backward (window %d)", name, window);
    expect_same_bits(what, runs[0], runs[1], c.qkv_count * sizeof(float));

    attention_case_free(&c);
    free(dout), free(out), free(lse), free(out_ref), free(lse_ref), free(runs[0]), free(runs[1]), free(runs[2]);
    free(dqkv_ref);
    cudaFree(workspace), cudaFree(d_out), cudaFree(d_lse), cudaFree(d_dout), cudaFree(d_dqkv);
}

static const int kShortLengths[] = {1, 2, 63, 64, 65, 130, 1, 200, 17, 129};

Test(gpu_ops, attention_short_d64) {
    require_gpu();
    int count = (int)(sizeof kShortLengths / sizeof kShortLengths[0]);
    run_attention("short", kShortLengths, count, 2, 64, -1, 31);
    run_attention("short", kShortLengths, count, 2, 64, 64, 32);
    run_attention("short", kShortLengths, count, 2, 64, 3, 33);
    run_attention("short", kShortLengths, count, 2, 64, 1, 34); /* three keys per query */
}

Test(gpu_ops, attention_d32_d128) {
    require_gpu();
    int lengths[] = {1, 100, 64, 129, 7};
    run_attention("d32", lengths, 5, 3, 32, -1, 41);
    run_attention("d32", lengths, 5, 3, 32, 5, 42);
    run_attention("d128", lengths, 5, 2, 128, -1, 43);
    run_attention("d128", lengths, 5, 2, 128, 64, 44);
}

/* One long sequence (8192 tokens, 640 under MB_GPU_TEST_SMALL) between many short ones of random length. */
static int *long_mix(int *num_seqs, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    int shorts = size_for(60, 6);
    int *lengths = malloc((size_t)(shorts + 1) * sizeof(int));
    for (int s = 0; s <= shorts; s++) lengths[s] = 1 + (int)mb_rng_below(&rng, 300);
    lengths[shorts / 3] = size_for(8192, 640);
    lengths[0] = 1;
    *num_seqs = shorts + 1;
    return lengths;
}

Test(gpu_ops, attention_long_global, .timeout = 600) {
    require_gpu();
    int num_seqs;
    int *lengths = long_mix(&num_seqs, 51);
    run_attention("long", lengths, num_seqs, 2, 64, -1, 52);
    free(lengths);
}

/* The two Hopper global forwards, each forced (the default picks by mean sequence length, wide_pays): the wide one
 * (192 × 192 tiles, P in shared memory, TMA loads) on the short lengths (tiles straddling into the next sequence,
 * 1-token sequences) and the long mix (one 8192-token-class sequence beside short ones), 2 and 12 heads; the
 * persistent one on the long mix, which its default choice no longer gives it for 8192-token batches. */
Test(gpu_ops, attention_wgmma_wide, .timeout = 600) {
    require_gpu();
    setenv("MB_ATTENTION_WGMMA_FWD", "wide", 1);
    int count = (int)(sizeof kShortLengths / sizeof kShortLengths[0]);
    run_attention("wide", kShortLengths, count, 2, 64, -1, 53);
    run_attention("wide, 12 heads", kShortLengths, count, 12, 64, -1, 54);
    int num_seqs;
    int *lengths = long_mix(&num_seqs, 55);
    run_attention("wide long", lengths, num_seqs, 2, 64, -1, 56);
    setenv("MB_ATTENTION_WGMMA_FWD", "persistent", 1);
    run_attention("persistent long", lengths, num_seqs, 2, 64, -1, 57);
    free(lengths);
    unsetenv("MB_ATTENTION_WGMMA_FWD");
}

Test(gpu_ops, attention_long_local) {
    require_gpu();
    int num_seqs;
    int *lengths = long_mix(&num_seqs, 61);
    run_attention("long", lengths, num_seqs, 2, 64, 64, 62);
    free(lengths);
}

/* The backward variants that only the benchmark overrides select (cuda/attention.cu, docs/kernels/attention.md):
 * the atomic kernel with 128-key blocks of 8 warps, and local layers routed to the ordered kernels under
 * deterministic = 0 (the dQ accumulator then stays unused). Each process of this test sets its own environment;
 * MB_ATTENTION_LOCAL=mma keeps sliding windows on the mma.sync kernels instead of the band kernels. */
Test(gpu_ops, attention_backward_variants) {
    require_gpu();
    int count = (int)(sizeof kShortLengths / sizeof kShortLengths[0]);
    int lengths[] = {1, 100, 64, 129, 7, 300};
    setenv("MB_ATTENTION_LOCAL", "mma", 1);
    setenv("MB_ATTENTION_BWD_KEYS", "128", 1);
    run_attention("keys128", kShortLengths, count, 2, 64, -1, 71);
    run_attention("keys128", kShortLengths, count, 2, 64, 3, 72);
    run_attention("keys128 d32", lengths, 6, 3, 32, 5, 73);
    run_attention("keys128 d128", lengths, 6, 2, 128, -1, 74);
    unsetenv("MB_ATTENTION_BWD_KEYS");
    setenv("MB_ATTENTION_BWD_LOCAL", "ordered", 1);
    run_attention("local ordered", kShortLengths, count, 2, 64, 64, 75);
    unsetenv("MB_ATTENTION_BWD_LOCAL");
    run_attention("window 150", lengths, 6, 2, 64, 150, 76); /* windows wider than a 64-key tile's step */
    unsetenv("MB_ATTENTION_LOCAL");
}

/* Attention v4 against v3 (cuda/attention.cu): by default global layers run the 32-rows-per-warp forward and
 * backward (head_dim <= 64) and local layers the v3 forward and backward; MB_ATTENTION_FWD=v4 and MB_ATTENTION_BWD=v4
 * put local windows (narrow and wide) and head_dim 32 / 128 (which falls back to v3) through the v4 kernels,
 * MB_ATTENTION_FWD=v3 and MB_ATTENTION_BWD=v3 keep the v3 kernels tested on global layers. */
Test(gpu_ops, attention_v4_variants) {
    require_gpu();
    int count = (int)(sizeof kShortLengths / sizeof kShortLengths[0]);
    int lengths[] = {1, 100, 64, 129, 7, 300, 257, 128};
    setenv("MB_ATTENTION_LOCAL", "mma", 1);
    setenv("MB_ATTENTION_BWD", "v4", 1);
    setenv("MB_ATTENTION_FWD", "v4", 1);
    run_attention("v4 local", kShortLengths, count, 2, 64, 64, 81);
    run_attention("v4 local", kShortLengths, count, 2, 64, 5, 82);
    run_attention("v4 local", kShortLengths, count, 2, 64, 1, 83);
    run_attention("v4 window 150", lengths, 8, 2, 64, 150, 84);
    run_attention("v4 d32", lengths, 8, 3, 32, 3, 85);
    run_attention("v4 d128", lengths, 8, 2, 128, 64, 86);
    unsetenv("MB_ATTENTION_BWD");
    unsetenv("MB_ATTENTION_FWD");
    setenv("MB_ATTENTION_FWD", "v3", 1);
    setenv("MB_ATTENTION_BWD", "v3", 1);
    run_attention("v3", kShortLengths, count, 2, 64, -1, 87);
    run_attention("v3 d32", lengths, 8, 3, 32, -1, 88);
    unsetenv("MB_ATTENTION_FWD");
    unsetenv("MB_ATTENTION_BWD");
    unsetenv("MB_ATTENTION_LOCAL");
    /* the mma.sync default where no sm_90a kernel applies (v4 for global layers at head_dim <= 64) */
    setenv("MB_ATTENTION_FWD", "v4", 1);
    setenv("MB_ATTENTION_BWD", "v4", 1);
    run_attention("v4 global", lengths, 8, 4, 64, -1, 89); /* 257, 300: tiles of 128 with short tails */
    unsetenv("MB_ATTENTION_FWD");
    unsetenv("MB_ATTENTION_BWD");
}

/* The band kernels (attention_band.cu) at the edges of what they take: windows 2, 16 and 17
 * (where the strip's padding changes), 127 and 128
 * (the widest strip at head_dim <= 64), 64 at head_dim 128, and head_dim 32; lengths around the 64-token tile. */
Test(gpu_ops, attention_band_edges) {
    require_gpu();
    int lengths[] = {1, 65, 64, 129, 2, 300, 191, 192, 193, 63};
    run_attention("band", lengths, 10, 2, 64, 2, 91);
    run_attention("band", lengths, 10, 2, 64, 16, 96); /* the strip widths' boundaries: 16 | 17 */
    run_attention("band", lengths, 10, 2, 64, 17, 97);
    run_attention("band", lengths, 10, 2, 64, 127, 92);
    run_attention("band", lengths, 10, 2, 64, 128, 93);
    run_attention("band d128", lengths, 10, 2, 128, 64, 94);
    run_attention("band d32", lengths, 10, 3, 32, 100, 95);
}

/* The Hopper band kernels (cuda/attention_band_wgmma.cu) walk runs of 16 plan tiles and cut them at sequence
 * boundaries; the plan places longer sequences first, so lengths here rise (the launch order is not the index
 * order). Sequences end just before, at and after a run's 1024 tokens, one spans three runs, short ones sit between;
 * windows 64 (ModernBERT), 63 (the widest that needs no mask in a tile's own segment), 40 and 1 (window 0 makes dQ
 * and dK exactly zero, P = 1 on the diagonal and dP = D, so only rounding is left to compare). Then the same lengths
 * on the mma.sync band kernels, which those replace on Hopper (elsewhere both halves test the same kernels). */
Test(gpu_ops, attention_band_runs) {
    require_gpu();
    int lengths[] = {1, 3, 64, 65, 700, 1023, 5, 1024, 1025, 1088, 2100, 130};
    int count = (int)(sizeof lengths / sizeof lengths[0]);
    run_attention("band runs", lengths, count, 3, 64, 64, 101);
    run_attention("band runs", lengths, count, 2, 64, 63, 102);
    run_attention("band runs", lengths, count, 2, 64, 40, 103);
    run_attention("band runs", lengths, count, 2, 64, 1, 104);
    setenv("MB_ATTENTION_BAND_FWD", "mma", 1);
    setenv("MB_ATTENTION_BAND_BWD", "mma", 1);
    run_attention("band runs, mma.sync", lengths, count, 3, 64, 64, 106);
    run_attention("band runs, mma.sync", lengths, count, 2, 64, 40, 107);
    unsetenv("MB_ATTENTION_BAND_FWD");
    unsetenv("MB_ATTENTION_BAND_BWD");
    /* the ring backward whose warpgroups each form P and dS (the default forms them once and hands dSᵀ over) */
    setenv("MB_ATTENTION_BAND_BWD", "recompute_ds", 1);
    run_attention("band runs, dS formed twice", lengths, count, 3, 64, 64, 108);
    run_attention("band runs, dS formed twice", lengths, count, 2, 64, 1, 111);
    unsetenv("MB_ATTENTION_BAND_BWD");
}

/* The sm_90a kernels' own device self-tests (tile products through their shared-memory descriptors, then the whole
 * kernel against a double-precision reference); they skip on devices without sm_90a. */
Test(gpu_ops, attention_wgmma_selftests) {
    require_gpu();
    char report[8192];
    int rc = mb_cuda_attention_wgmma_fwd_selftest(report, sizeof report);
    cr_log_info("wgmma forward self-test: %s", report);
    cr_expect(rc == 0 || rc == 1, "wgmma forward self-test failed: %s", report);
    rc = mb_cuda_attention_wgmma_backward_selftest(report, sizeof report);
    cr_log_info("wgmma backward self-test: %s", report);
    cr_expect(rc == 0 || rc == 2, "wgmma backward self-test failed: %s", report);
}

/* ================================================================================================ activation */

static const mb_activation kActivations[] = {MB_ACT_GELU, MB_ACT_GELU_TANH, MB_ACT_SILU, MB_ACT_RELU};

static void run_glu(int n, int inner, mb_activation activation, int in_place, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    size_t u_count = (size_t)n * 2 * inner, y_count = (size_t)n * inner;
    float *u, *dy;
    mb_bf16 *d_u = random_bf16(&rng, u_count, 0.0, 1.5, &u);
    mb_bf16 *d_y = dev_alloc(y_count * sizeof(mb_bf16));
    dev_poison(d_y, y_count * sizeof(mb_bf16));
    launched(mb_cuda_glu_forward(d_y, d_u, n, inner, activation, test_stream, &err), &err, "glu_forward");
    float *y = download_bf16(d_y, y_count), *y_ref = malloc(y_count * sizeof(float) + 1);
    mb_cpu_glu_forward(y_ref, u, n, inner, activation);
    char what[128];
    snprintf(what, sizeof what, "glu y (%s, n %d, inner %d)", mb_activation_name(activation), n, inner);
    expect_close(what, y, y_ref, y_count, BF16_TOLERANCE);

    mb_bf16 *d_dy = random_bf16(&rng, y_count, 0.0, 1.0, &dy);
    mb_bf16 *d_du = in_place ? d_u : dev_alloc(u_count * sizeof(mb_bf16));
    if (!in_place) dev_poison(d_du, u_count * sizeof(mb_bf16));
    launched(mb_cuda_glu_backward(d_du, d_dy, d_u, n, inner, activation, test_stream, &err), &err, "glu_backward");
    float *du = download_bf16(d_du, u_count), *du_ref = malloc(u_count * sizeof(float) + 1);
    mb_cpu_glu_backward(du_ref, dy, u, n, inner, activation);
    snprintf(what, sizeof what, "glu du (%s, in place %d)", mb_activation_name(activation), in_place);
    expect_close(what, du, du_ref, u_count, BF16_TOLERANCE);
    free(u), free(dy), free(y), free(y_ref), free(du), free(du_ref);
    cudaFree(d_u), cudaFree(d_y), cudaFree(d_dy);
    if (!in_place) cudaFree(d_du);
}

static void run_activation(size_t count, mb_activation activation, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    float *x, *dy;
    mb_bf16 *d_x = random_bf16(&rng, count, 0.0, 2.0, &x), *d_dy = random_bf16(&rng, count, 0.0, 1.0, &dy);
    mb_bf16 *d_y = dev_alloc(count * sizeof(mb_bf16)), *d_dx = dev_alloc(count * sizeof(mb_bf16));
    dev_poison(d_y, count * sizeof(mb_bf16));
    dev_poison(d_dx, count * sizeof(mb_bf16));
    launched(mb_cuda_activation_forward(d_y, d_x, count, activation, test_stream, &err), &err, "activation_forward");
    launched(mb_cuda_activation_backward(d_dx, d_dy, d_x, count, activation, test_stream, &err), &err,
             "activation_backward");
    float *y = download_bf16(d_y, count), *dx = download_bf16(d_dx, count);
    float *y_ref = malloc(count * sizeof(float) + 1), *dx_ref = malloc(count * sizeof(float) + 1);
    mb_cpu_activation_forward(y_ref, x, count, activation);
    mb_cpu_activation_backward(dx_ref, dy, x, count, activation);
    char what[128];
    snprintf(what, sizeof what, "activation y (%s)", mb_activation_name(activation));
    expect_close(what, y, y_ref, count, BF16_TOLERANCE);
    snprintf(what, sizeof what, "activation dx (%s)", mb_activation_name(activation));
    expect_close(what, dx, dx_ref, count, BF16_TOLERANCE);
    free(x), free(dy), free(y), free(dx), free(y_ref), free(dx_ref);
    cudaFree(d_x), cudaFree(d_dy), cudaFree(d_y), cudaFree(d_dx);
}

Test(gpu_ops, activation) {
    require_gpu();
    for (int a = 0; a < 4; a++) {
        run_glu(size_for(37, 5), 1152, kActivations[a], 0, 70 + (uint64_t)a);
        run_glu(5, 13, kActivations[a], 1, 80 + (uint64_t)a);
        run_activation((size_t)size_for(10007, 999), kActivations[a], 90 + (uint64_t)a);
        run_glu(size_for(33, 4), 1152, kActivations[a], 1, 150 + (uint64_t)a); /* 16-byte path, du over u */
        run_glu(7, 24, kActivations[a], 0, 160 + (uint64_t)a);                 /* 16-byte path, 3 vectors a row */
        run_glu(6, 100, kActivations[a], 0, 170 + (uint64_t)a);                /* inner % 8 != 0: scalar path */
        run_activation(4096, kActivations[a], 180 + (uint64_t)a);              /* whole 16-byte vectors only */
        run_activation(5, kActivations[a], 190 + (uint64_t)a);                 /* shorter than one vector */
    }
}

/* ====================================================================================================== loss */

static void run_cross_entropy(int rows, int classes, int write_dlogits, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    size_t count = (size_t)rows * classes;
    float *logits;
    mb_bf16 *d_logits = random_bf16(&rng, count, 0.0, 2.0, &logits);
    int32_t *targets = malloc((size_t)rows * sizeof(int32_t));
    for (int r = 0; r < rows; r++) targets[r] = (int32_t)mb_rng_below(&rng, (uint64_t)classes);
    if (rows > 2) targets[1] = -100; /* ignored rows */
    if (rows > 5) targets[rows - 1] = -100;
    int32_t *d_targets = to_device(targets, (size_t)rows * sizeof(int32_t));
    float *d_loss = dev_alloc((size_t)rows * sizeof(float));
    double *d_total = dev_alloc(sizeof(double));
    dev_poison(d_loss, (size_t)rows * sizeof(float));
    float scale = 1.0f / (float)rows;
    float *d_lse = dev_alloc((size_t)rows * sizeof(float));
    mb_bf16 *d_copy = dev_alloc(count * sizeof(mb_bf16));
    cr_assert_eq(cudaMemcpy(d_copy, d_logits, count * sizeof(mb_bf16), cudaMemcpyDeviceToDevice), cudaSuccess);
    launched(mb_cuda_cross_entropy(d_logits, d_loss, d_lse, d_targets, rows, classes, scale, write_dlogits,
                                   test_stream, &err),
             &err, "cross_entropy");
    /* the split path (forward keeps lse, the backward writes the gradient) gives the same bits */
    launched(mb_cuda_cross_entropy_backward(d_copy, d_lse, d_targets, rows, classes, scale, test_stream, &err), &err,
             "cross_entropy_backward");
    if (write_dlogits) {
        float *split = download_bf16(d_copy, count), *fused = download_bf16(d_logits, count);
        expect_same_bits("cross_entropy_backward from the kept lse", split, fused, count * sizeof(float));
        free(split), free(fused);
    }
    launched(mb_cuda_sum(d_total, d_loss, rows, test_stream, &err), &err, "sum");
    float *loss = download_floats(d_loss, (size_t)rows), *result = download_bf16(d_logits, count);
    double total;
    download(&total, d_total, sizeof total);

    /* CPU reference on the labelled rows only (the CPU op has no ignored rows) */
    int labelled = 0;
    float *kept = malloc(count * sizeof(float) + 1), *kept_result = malloc(count * sizeof(float) + 1);
    float *loss_ref = calloc((size_t)rows, sizeof(float)), *kept_loss = malloc((size_t)rows * sizeof(float) + 1);
    int32_t *kept_targets = malloc((size_t)rows * sizeof(int32_t));
    size_t ignored_nonzero = 0;
    for (int r = 0; r < rows; r++) {
        const float *row = result + (size_t)r * classes;
        if (targets[r] < 0) {
            for (int c = 0; write_dlogits && c < classes; c++) ignored_nonzero += row[c] != 0.0f;
            cr_expect_eq(loss[r], 0.0f, "cross_entropy: ignored row %d has loss %g", r, loss[r]);
            continue;
        }
        memcpy(kept + (size_t)labelled * classes, logits + (size_t)r * classes, (size_t)classes * sizeof(float));
        memcpy(kept_result + (size_t)labelled * classes, row, (size_t)classes * sizeof(float));
        kept_loss[labelled] = loss[r];
        kept_targets[labelled++] = targets[r];
    }
    cr_expect_eq(ignored_nonzero, 0, "cross_entropy: %zu gradient values of ignored rows are not 0", ignored_nonzero);
    double total_ref = 0.0;
    for (int r = 0; r < labelled; r++) {
        loss_ref[r] = (float)mb_cpu_cross_entropy_forward(kept + (size_t)r * classes, kept_targets + r, 1, classes);
        total_ref += loss_ref[r];
    }
    char what[128];
    snprintf(what, sizeof what, "cross_entropy row losses (rows %d, classes %d)", rows, classes);
    expect_close(what, kept_loss, loss_ref, (size_t)labelled, FP32_TOLERANCE);
    cr_expect(fabs(total - total_ref) <= FP32_TOLERANCE * fabs(total_ref), "cross_entropy total %.9g, CPU %.9g", total,
              total_ref);
    if (write_dlogits) {
        mb_cpu_cross_entropy_backward(kept, kept_targets, labelled, classes, scale);
        snprintf(what, sizeof what, "cross_entropy dlogits (rows %d, classes %d)", rows, classes);
        expect_close(what, kept_result, kept, (size_t)labelled * classes, BF16_TOLERANCE);
    } else {
        cr_expect(memcmp(result, logits, count * sizeof(float)) == 0, "cross_entropy changed the logits");
    }
    free(logits), free(targets), free(loss), free(result), free(kept), free(kept_result), free(loss_ref);
    free(kept_loss), free(kept_targets);
    cudaFree(d_logits), cudaFree(d_targets), cudaFree(d_loss), cudaFree(d_total), cudaFree(d_lse), cudaFree(d_copy);
}

Test(gpu_ops, cross_entropy) {
    require_gpu();
    run_cross_entropy(size_for(37, 7), size_for(50368, 5000), 1, 101);
    run_cross_entropy(1, 50368, 1, 102);
    run_cross_entropy(size_for(100, 10), 3, 1, 103);
    run_cross_entropy(9, 1000, 0, 104); /* loss only: the logits stay untouched */
    run_cross_entropy(5, 1003, 1, 105); /* a row length that is not a multiple of 8: the scalar path */
}

/* The fused gradient + bias column sums: the gradient bit-identical to mb_cuda_cross_entropy_backward's, the bias
 * gradient equal to db0 + Σ_rows of that (bf16) gradient, and the same bits when run again. */
static void run_cross_entropy_bias(int rows, int classes, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    size_t count = (size_t)rows * classes, bytes = count * sizeof(mb_bf16);
    float *logits;
    mb_bf16 *d_plain = random_bf16(&rng, count, 0.0, 2.0, &logits);
    int32_t *targets = malloc((size_t)rows * sizeof(int32_t));
    for (int r = 0; r < rows; r++) targets[r] = (int32_t)mb_rng_below(&rng, (uint64_t)classes);
    if (rows > 2) targets[1] = -100; /* ignored rows: zero gradient */
    if (rows > 5) targets[rows - 1] = -1;
    int32_t *d_targets = to_device(targets, (size_t)rows * sizeof(int32_t));
    float *d_loss = dev_alloc((size_t)rows * sizeof(float)), *d_lse = dev_alloc((size_t)rows * sizeof(float));
    float scale = 1.0f / (float)rows;
    launched(mb_cuda_cross_entropy(d_plain, d_loss, d_lse, d_targets, rows, classes, scale, 0, test_stream, &err), &err,
             "cross_entropy");
    mb_bf16 *d_fused[2] = {dev_alloc(bytes), dev_alloc(bytes)};
    float *db0 = random_floats(&rng, (size_t)classes, 0.0, 1.0), *db[2];
    void *scratch = dev_alloc(mb_cuda_cross_entropy_backward_bias_scratch_bytes(rows, classes));
    cr_assert_leq(mb_cuda_cross_entropy_backward_bias_scratch_bytes(rows, classes),
                  mb_cuda_linear_backward_scratch_bytes(rows, classes));
    for (int run = 0; run < 2; run++) {
        cr_assert_eq(cudaMemcpy(d_fused[run], d_plain, bytes, cudaMemcpyDeviceToDevice), cudaSuccess);
        float *d_db = to_device(db0, (size_t)classes * sizeof(float));
        launched(mb_cuda_cross_entropy_backward_bias(d_fused[run], d_db, scratch, d_lse, d_targets, rows, classes,
                                                     scale, test_stream, &err), &err, "cross_entropy_backward_bias");
        db[run] = download_floats(d_db, (size_t)classes);
        cudaFree(d_db);
    }
    launched(mb_cuda_cross_entropy_backward(d_plain, d_lse, d_targets, rows, classes, scale, test_stream, &err), &err,
             "cross_entropy_backward");
    mb_bf16 *want = malloc(bytes), *got = malloc(bytes);
    download(want, d_plain, bytes);
    download(got, d_fused[0], bytes);
    char what[128];
    snprintf(what, sizeof what, "fused cross-entropy gradient (rows %d, classes %d)", rows, classes);
    expect_same_bits(what, got, want, bytes);
    float *db_ref = malloc((size_t)classes * sizeof(float));
    for (int c = 0; c < classes; c++) {
        double sum = db0[c];
        for (int r = 0; r < rows; r++) sum += mb_bf16_to_float(want[(size_t)r * classes + c]);
        db_ref[c] = (float)sum;
    }
    snprintf(what, sizeof what, "fused bias gradient (rows %d, classes %d)", rows, classes);
    expect_close(what, db[0], db_ref, (size_t)classes, FP32_TOLERANCE);
    snprintf(what, sizeof what, "fused bias gradient, second run (rows %d, classes %d)", rows, classes);
    expect_same_bits(what, db[1], db[0], (size_t)classes * sizeof(float));
    free(logits), free(targets), free(db0), free(db[0]), free(db[1]), free(want), free(got), free(db_ref);
    cudaFree(d_plain), cudaFree(d_targets), cudaFree(d_loss), cudaFree(d_lse), cudaFree(d_fused[0]);
    cudaFree(d_fused[1]), cudaFree(scratch);
}

Test(gpu_ops, cross_entropy_backward_bias) {
    require_gpu();
    run_cross_entropy_bias(1, 50368, 131);                                /* one row, the MLM width */
    run_cross_entropy_bias(size_for(300, 130), size_for(50368, 2056), 132); /* several row chunks, a partial slice */
    run_cross_entropy_bias(size_for(1031, 140), 24, 133);                  /* a few classes: most threads idle */
    run_cross_entropy_bias(37, 1003, 134);                                 /* not a multiple of 8: the scalar path */
}

Test(gpu_ops, mse) {
    require_gpu();
    mb_rng rng;
    mb_rng_seed(&rng, 111);
    mb_error err = {{0}};
    int rows = size_for(1000, 50);
    float *predictions, *targets = random_floats(&rng, (size_t)rows, 0.0, 1.0);
    mb_bf16 *d_pred = random_bf16(&rng, (size_t)rows, 0.0, 1.0, &predictions);
    float *d_targets = to_device(targets, (size_t)rows * sizeof(float)), *d_loss = dev_alloc((size_t)rows * sizeof(float));
    mb_bf16 *d_grad = dev_alloc((size_t)rows * sizeof(mb_bf16));
    dev_poison(d_loss, (size_t)rows * sizeof(float));
    dev_poison(d_grad, (size_t)rows * sizeof(mb_bf16));
    float scale = 0.25f;
    launched(mb_cuda_mse(d_grad, d_loss, d_pred, d_targets, rows, scale, test_stream, &err), &err, "mse");
    float *loss = download_floats(d_loss, (size_t)rows), *grad = download_bf16(d_grad, (size_t)rows);
    float *loss_ref = malloc((size_t)rows * sizeof(float)), *grad_ref = malloc((size_t)rows * sizeof(float));
    for (int r = 0; r < rows; r++) loss_ref[r] = (float)mb_cpu_mse_forward(predictions + r, targets + r, 1);
    mb_cpu_mse_backward(grad_ref, predictions, targets, rows, scale);
    expect_close("mse row losses", loss, loss_ref, (size_t)rows, FP32_TOLERANCE);
    expect_close("mse gradient", grad, grad_ref, (size_t)rows, BF16_TOLERANCE);
    /* in place: the gradient overwrites the predictions */
    launched(mb_cuda_mse(d_pred, d_loss, d_pred, d_targets, rows, scale, test_stream, &err), &err, "mse in place");
    float *grad_in_place = download_bf16(d_pred, (size_t)rows);
    expect_close("mse gradient in place", grad_in_place, grad_ref, (size_t)rows, BF16_TOLERANCE);
    free(predictions), free(targets), free(loss), free(grad), free(loss_ref), free(grad_ref), free(grad_in_place);
    cudaFree(d_pred), cudaFree(d_targets), cudaFree(d_loss), cudaFree(d_grad);
}

Test(gpu_ops, sum) {
    require_gpu();
    mb_rng rng;
    mb_rng_seed(&rng, 121);
    mb_error err = {{0}};
    int count = size_for(1000003, 5000);
    float *values = random_floats(&rng, (size_t)count, 0.5, 3.0);
    float *d_values = to_device(values, (size_t)count * sizeof(float));
    double *d_total = dev_alloc(sizeof(double)), totals[2];
    for (int run = 0; run < 2; run++) {
        dev_poison(d_total, sizeof(double));
        launched(mb_cuda_sum(d_total, d_values, count, test_stream, &err), &err, "sum");
        download(&totals[run], d_total, sizeof(double));
    }
    double reference = 0.0;
    for (int i = 0; i < count; i++) reference += values[i];
    cr_expect(fabs(totals[0] - reference) <= SUM_TOLERANCE * fabs(reference), "sum %.17g, CPU %.17g", totals[0],
              reference);
    expect_same_bits("sum", &totals[0], &totals[1], sizeof(double));
    free(values);
    cudaFree(d_values), cudaFree(d_total);
}

/* ================================================================================================= optimizer */

Test(gpu_ops, stableadamw) {
    require_gpu();
    mb_rng rng;
    mb_rng_seed(&rng, 131);
    mb_error err = {{0}};
    /* one element, a LayerNorm width, just over one chunk (65536), two exact chunks, several chunks */
    size_t sizes[] = {1, 768, 70001, 131072, (size_t)size_for(600007, 200003)};
    enum { kTensors = 5, kSteps = 3 };
    mb_adamw_param cpu[kTensors];
    mb_cuda_adamw_tensor gpu[kTensors];
    float *host_param[kTensors];
    for (int t = 0; t < kTensors; t++) {
        size_t numel = sizes[t];
        host_param[t] = random_floats(&rng, numel, 0.0, 0.02);
        cpu[t] = (mb_adamw_param){"tensor", copy_floats(host_param[t], numel), NULL, calloc(numel, sizeof(float)),
                                  calloc(numel, sizeof(float)), numel, t % 2 == 0};
        gpu[t] = (mb_cuda_adamw_tensor){to_device(host_param[t], numel * sizeof(float)), dev_alloc(numel * sizeof(float)),
                                        dev_alloc(numel * sizeof(float)), dev_alloc(numel * sizeof(float)),
                                        dev_alloc(numel * sizeof(mb_bf16)), numel, t % 2 == 0, t};
        cudaMemset(gpu[t].m, 0, numel * sizeof(float));
        cudaMemset(gpu[t].v, 0, numel * sizeof(float));
        dev_poison(gpu[t].param_bf16, numel * sizeof(mb_bf16));
    }
    mb_cuda_adamw *adamw = NULL;
    cr_assert_eq(mb_cuda_adamw_create(&adamw, gpu, kTensors, &err), 0, "adamw_create: %s", err.message);
    mb_stableadamw opt_cpu, opt_gpu;
    mb_stableadamw_init(&opt_cpu, 1e-3, 0.05);
    mb_stableadamw_init(&opt_gpu, 1e-3, 0.05);
    double *d_norm = dev_alloc(sizeof(double));
    for (int step = 0; step < kSteps; step++) {
        for (int t = 0; t < kTensors; t++) {
            /* step 2 multiplies tensor 0's and 2's gradients by 100: their RMS exceeds 1 and the update is clipped */
            double scale = step == 1 && (t == 0 || t == 2) ? 0.1 : 1e-3;
            float *grad = random_floats(&rng, sizes[t], 0.0, scale);
            free((void *)cpu[t].grad);
            cpu[t].grad = grad;
            upload((void *)gpu[t].grad, grad, sizes[t] * sizeof(float));
        }
        launched(mb_cuda_grad_norm(adamw, d_norm, test_stream, &err), &err, "grad_norm");
        double norm;
        download(&norm, d_norm, sizeof norm);
        double norm_ref = mb_grad_norm(cpu, kTensors);
        cr_expect(fabs(norm - norm_ref) <= SUM_TOLERANCE * norm_ref, "grad norm %.17g, CPU %.17g", norm, norm_ref);
        double lr = 1e-3 * (1.0 - 0.2 * step), rms_ref[kTensors], rms[kTensors];
        cr_assert_eq(mb_stableadamw_step(&opt_cpu, cpu, kTensors, lr, rms_ref, &err), 0, "%s", err.message);
        launched(mb_cuda_adamw_step(adamw, &opt_gpu, lr, test_stream, &err), &err, "adamw_step");
        cr_expect_eq(opt_gpu.step, opt_cpu.step, "step counters differ");
        download(rms, mb_cuda_adamw_rms(adamw), sizeof rms);
        for (int t = 0; t < kTensors; t++) {
            cr_expect(fabs(rms[t] - rms_ref[t]) <= OPT_TOLERANCE * rms_ref[t], "step %d tensor %d: RMS %.17g, CPU %.17g",
                      step + 1, t, rms[t], rms_ref[t]);
            if (step == 1 && (t == 0 || t == 2)) cr_expect(rms_ref[t] > 1.0, "tensor %d was meant to be clipped", t);
        }
    }
    for (int t = 0; t < kTensors; t++) {
        size_t numel = sizes[t];
        float *param = download_floats(gpu[t].param, numel), *m = download_floats(gpu[t].m, numel);
        float *v = download_floats(gpu[t].v, numel);
        mb_bf16 *copy = malloc(numel * sizeof(mb_bf16));
        download(copy, gpu[t].param_bf16, numel * sizeof(mb_bf16));
        float *delta = malloc(numel * sizeof(float)), *delta_ref = malloc(numel * sizeof(float));
        size_t copy_mismatch = 0;
        for (size_t i = 0; i < numel; i++) {
            delta[i] = param[i] - host_param[t][i];
            delta_ref[i] = cpu[t].param[i] - host_param[t][i];
            copy_mismatch += copy[i] != mb_bf16_from_float(param[i]);
        }
        char what[96];
        snprintf(what, sizeof what, "stableadamw tensor %d (%zu) update", t, numel);
        expect_close(what, delta, delta_ref, numel, OPT_TOLERANCE);
        snprintf(what, sizeof what, "stableadamw tensor %d m", t);
        expect_close(what, m, cpu[t].m, numel, OPT_TOLERANCE);
        snprintf(what, sizeof what, "stableadamw tensor %d v", t);
        expect_close(what, v, cpu[t].v, numel, OPT_TOLERANCE);
        cr_expect_eq(copy_mismatch, 0, "tensor %d: %zu bf16 copies differ from round-to-nearest", t, copy_mismatch);
        free(param), free(m), free(v), free(copy), free(delta), free(delta_ref);
        free(cpu[t].param), free((void *)cpu[t].grad), free(cpu[t].m), free(cpu[t].v), free(host_param[t]);
        cudaFree(gpu[t].param), cudaFree((void *)gpu[t].grad), cudaFree(gpu[t].m), cudaFree(gpu[t].v);
        cudaFree(gpu[t].param_bf16);
    }
    mb_cuda_adamw_destroy(adamw);
    cudaFree(d_norm);
}

Test(gpu_ops, to_bf16) {
    require_gpu();
    mb_rng rng;
    mb_rng_seed(&rng, 141);
    mb_error err = {{0}};
    size_t count = 100003;
    float *values = random_floats(&rng, count, 0.0, 10.0);
    values[0] = 1e-40f; /* subnormal */
    values[1] = INFINITY;
    values[2] = -0.0f;
    values[3] = 3.0e38f;
    float *d_values = to_device(values, count * sizeof(float));
    mb_bf16 *d_out = dev_alloc(count * sizeof(mb_bf16)), *out = malloc(count * sizeof(mb_bf16));
    dev_poison(d_out, count * sizeof(mb_bf16));
    launched(mb_cuda_to_bf16(d_out, d_values, count, test_stream, &err), &err, "to_bf16");
    download(out, d_out, count * sizeof(mb_bf16));
    size_t mismatch = 0;
    for (size_t i = 0; i < count; i++) mismatch += out[i] != mb_bf16_from_float(values[i]);
    cr_expect_eq(mismatch, 0, "%zu of %zu conversions differ from round-to-nearest-even", mismatch, count);
    free(values), free(out);
    cudaFree(d_values), cudaFree(d_out);
}

/* ---- embedding backward: runs around the one-warp limit, pad runs, misaligned rows ---- */

static bool same_row(const float *a, const float *b, int row, int h) {
    return memcmp(a + (size_t)row * h, b + (size_t)row * h, (size_t)h * sizeof(float)) == 0;
}

/* Run lengths 1..40 around the one-warp limit (16), one run spread over many blocks, a long pad run, dout rows off a
 * 16-byte boundary. Runs of at most 16 tokens are added by one warp in token order, the CPU's own sequence of fp32
 * additions: their rows must match the CPU bit for bit. Ids never drawn keep their rows. */
static void run_embedding_runs(int h, int misalign, int pad_id, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    const int vocab = 64, big = size_for(3000, 400), pad_run = 20;
    int n = big + pad_run, at = 0;
    for (int k = 0; k < 40; k++) n += k + 1;
    int32_t *ids = malloc((size_t)n * sizeof(int32_t));
    for (int k = 0; k < 40; k++)
        for (int j = 0; j <= k; j++) ids[at++] = k;
    for (int j = 0; j < big; j++) ids[at++] = 40;
    for (int j = 0; j < pad_run; j++) ids[at++] = 41;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)mb_rng_below(&rng, (uint64_t)i + 1);
        int32_t swap = ids[i];
        ids[i] = ids[j], ids[j] = swap;
    }
    size_t count = (size_t)n * h, table_count = (size_t)vocab * h, scratch_bytes = 0;
    float *dout;
    mb_bf16 *d_dout = random_bf16(&rng, count + 1, 0.0, 1.0, &dout);
    float *dtable_init = random_floats(&rng, table_count, 0.0, 1.0);
    float *dtable_ref = copy_floats(dtable_init, table_count);
    mb_cpu_embedding_backward(dtable_ref, dout + misalign, ids, n, h, pad_id);
    int32_t *d_ids = to_device(ids, (size_t)n * sizeof(int32_t));
    cr_assert_eq(mb_cuda_embedding_backward_scratch_bytes(&scratch_bytes, n, vocab, &err), 0, "%s", err.message);
    void *scratch = dev_alloc(scratch_bytes);
    float *d_dtable = dev_alloc(table_count * sizeof(float)), *runs[2];
    for (int run = 0; run < 2; run++) {
        upload(d_dtable, dtable_init, table_count * sizeof(float));
        dev_poison(scratch, scratch_bytes);
        launched(mb_cuda_embedding_backward(d_dtable, scratch, scratch_bytes, d_dout + misalign, d_ids, n, h, vocab,
                                            pad_id, test_stream, &err), &err, "embedding_backward");
        runs[run] = download_floats(d_dtable, table_count);
    }
    char what[128];
    snprintf(what, sizeof what, "embedding runs dtable (h %d, misalign %d, pad %d)", h, misalign, pad_id);
    expect_close(what, runs[0], dtable_ref, table_count, FP32_TOLERANCE);
    expect_same_bits(what, runs[0], runs[1], table_count * sizeof(float));
    size_t short_mismatch = 0, untouched_changed = 0;
    for (int k = 0; k < 16; k++) short_mismatch += !same_row(runs[0], dtable_ref, k, h);
    for (int v = 42; v < vocab; v++) untouched_changed += !same_row(runs[0], dtable_init, v, h);
    cr_expect_eq(short_mismatch, 0, "%s: %zu rows of runs <= 16 tokens differ from the CPU's bits", what,
                 short_mismatch);
    cr_expect_eq(untouched_changed, 0, "%s: %zu rows of ids not in the batch changed", what, untouched_changed);
    if (pad_id >= 0) cr_expect(same_row(runs[0], dtable_init, pad_id, h), "%s: the pad row changed", what);
    free(ids), free(dout), free(dtable_init), free(dtable_ref), free(runs[0]), free(runs[1]);
    cudaFree(d_dout), cudaFree(d_ids), cudaFree(scratch), cudaFree(d_dtable);
}

Test(gpu_ops, embedding_runs) {
    require_gpu();
    run_embedding_runs(768, 0, -1, 15); /* 16-byte pieces; the pad-less id 41 is a 20-token run */
    run_embedding_runs(768, 0, 41, 16); /* a long pad run never accumulates */
    run_embedding_runs(72, 0, 41, 17);  /* 9 pieces: uneven column slices of the long run */
    run_embedding_runs(768, 1, -1, 18); /* dout off a 16-byte boundary: the element path */
}

/* ---- StableAdamW over tensors packed off 16-byte boundaries ---- */

/* Tensors packed back to back in one arena per role (the backend pads them to 64 bytes; ZeRO pieces and odd-sized
 * tensors need not be): most start off a 16-byte boundary. shift[] moves each role's arena (param, grad, m, v in
 * floats, the bf16 copy in bf16 elements): equal shifts keep one phase (peel up to 3 elements, then 16-byte words),
 * different shifts force the element path. m and v must match the CPU bit for bit either way. */
static void run_stableadamw_packed(const int shift[5], uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    mb_error err = {{0}};
    enum { kTensors = 7, kSteps = 2 };
    const size_t sizes[kTensors] = {3, 1, 70001, 5, 768, (size_t)size_for(131075, 65539), 2};
    size_t offset[kTensors], total = 0;
    for (int t = 0; t < kTensors; t++) offset[t] = total, total += sizes[t];
    size_t bytes = (total + 4) * sizeof(float);
    float *param_ref = random_floats(&rng, total, 0.0, 0.02), *param_start = copy_floats(param_ref, total);
    float *m_ref = calloc(total, sizeof(float)), *v_ref = calloc(total, sizeof(float));
    float *d_param = (float *)dev_alloc(bytes) + shift[0], *d_grad = (float *)dev_alloc(bytes) + shift[1];
    float *d_m = (float *)dev_alloc(bytes) + shift[2], *d_v = (float *)dev_alloc(bytes) + shift[3];
    mb_bf16 *d_copy = (mb_bf16 *)dev_alloc((total + 4) * sizeof(mb_bf16)) + shift[4];
    upload(d_param, param_ref, total * sizeof(float));
    cr_assert_eq(cudaMemset(d_m, 0, total * sizeof(float)), cudaSuccess, "memset");
    cr_assert_eq(cudaMemset(d_v, 0, total * sizeof(float)), cudaSuccess, "memset");
    dev_poison(d_copy, total * sizeof(mb_bf16));
    float *grad = NULL;
    mb_adamw_param cpu[kTensors];
    mb_cuda_adamw_tensor gpu[kTensors];
    for (int t = 0; t < kTensors; t++) {
        size_t o = offset[t];
        cpu[t] = (mb_adamw_param){"packed", param_ref + o, NULL, m_ref + o, v_ref + o, sizes[t], t % 2 == 0};
        gpu[t] = (mb_cuda_adamw_tensor){d_param + o, d_grad + o, d_m + o, d_v + o, t == 3 ? NULL : d_copy + o,
                                        sizes[t], t % 2 == 0, t};
    }
    mb_cuda_adamw *adamw = NULL;
    cr_assert_eq(mb_cuda_adamw_create(&adamw, gpu, kTensors, &err), 0, "adamw_create: %s", err.message);
    mb_stableadamw opt_cpu, opt_gpu;
    mb_stableadamw_init(&opt_cpu, 1e-3, 0.05);
    mb_stableadamw_init(&opt_gpu, 1e-3, 0.05);
    for (int step = 0; step < kSteps; step++) {
        free(grad);
        grad = random_floats(&rng, total, 0.0, 1e-3);
        for (int t = 0; t < kTensors; t++) cpu[t].grad = grad + offset[t];
        upload(d_grad, grad, total * sizeof(float));
        cr_assert_eq(mb_stableadamw_step(&opt_cpu, cpu, kTensors, 1e-3, NULL, &err), 0, "%s", err.message);
        launched(mb_cuda_adamw_step(adamw, &opt_gpu, 1e-3, test_stream, &err), &err, "adamw_step");
    }
    float *param = download_floats(d_param, total), *m = download_floats(d_m, total), *v = download_floats(d_v, total);
    mb_bf16 *copy = malloc(total * sizeof(mb_bf16));
    download(copy, d_copy, total * sizeof(mb_bf16));
    char what[96];
    snprintf(what, sizeof what, "packed stableadamw (shifts %d %d %d %d %d)", shift[0], shift[1], shift[2], shift[3],
             shift[4]);
    cr_expect(memcmp(m, m_ref, total * sizeof(float)) == 0, "%s: m differs from the CPU's bits", what);
    cr_expect(memcmp(v, v_ref, total * sizeof(float)) == 0, "%s: v differs from the CPU's bits", what);
    size_t copy_mismatch = 0;
    for (int t = 0; t < kTensors; t++)
        for (size_t i = offset[t]; i < offset[t] + sizes[t]; i++) /* tensor 3 has no copy: its poison must stay */
            copy_mismatch += copy[i] != (t == 3 ? (mb_bf16)0xFFFF : mb_bf16_from_float(param[i]));
    cr_expect_eq(copy_mismatch, 0, "%s: %zu bf16 copies wrong", what, copy_mismatch);
    for (size_t i = 0; i < total; i++) param[i] -= param_start[i], param_ref[i] -= param_start[i];
    expect_close(what, param, param_ref, total, OPT_TOLERANCE);
    mb_cuda_adamw_destroy(adamw);
    free(grad), free(param_ref), free(param_start), free(m_ref), free(v_ref), free(param), free(m), free(v), free(copy);
    cudaFree(d_param - shift[0]), cudaFree(d_grad - shift[1]), cudaFree(d_m - shift[2]), cudaFree(d_v - shift[3]);
    cudaFree(d_copy - shift[4]);
}

Test(gpu_ops, stableadamw_packed) {
    require_gpu();
    run_stableadamw_packed((const int[5]){0, 0, 0, 0, 0}, 151); /* one phase: peeled heads, 16-byte words */
    run_stableadamw_packed((const int[5]){1, 1, 1, 1, 1}, 152); /* shifted by one element everywhere: still one phase */
    run_stableadamw_packed((const int[5]){0, 1, 2, 3, 1}, 153); /* phases differ: the element path */
}

/* ---- RoPE's backward inside the attention backward's stores (mb_cuda_attention_backward_rope) ---- */

/* The fused call against the two separate ones (attention backward, then mb_cuda_rope with direction −1), both
 * checked against the CPU elsewhere: dQ and dK agree up to the separate path's second bf16 rounding, dV is the same
 * kernel's output bit for bit. A wrong angle, sign or pairing shows as an O(1) error. */
static void run_attention_rope_fused(const int *lengths, int num_seqs, int heads, int head_dim, int window,
                                     double theta, uint64_t seed) {
    if (!mb_cuda_attention_backward_fuses_rope(head_dim, window, 0)) {
        cr_log_info("attention rope fused: head_dim %d, window %d has no fused path on this device: skipped",
                    head_dim, window);
        return;
    }
    attention_case c = attention_case_start(lengths, num_seqs, heads, head_dim, seed);
    attention_case_draw_qkv(&c);
    mb_error err = {{0}};
    size_t workspace_bytes = mb_cuda_attention_workspace_bytes(c.n, num_seqs, heads, head_dim);
    float *dout;
    mb_bf16 *d_dout = random_bf16(&c.rng, c.out_count, 0.0, 1.0, &dout);
    int32_t *d_positions = dev_alloc((size_t)c.n * sizeof(int32_t));
    float *d_table = dev_alloc((size_t)c.n * head_dim * sizeof(float));
    void *workspace = dev_alloc(workspace_bytes);
    mb_bf16 *d_out = dev_alloc(c.out_count * sizeof(mb_bf16)), *d_dqkv = dev_alloc(c.qkv_count * sizeof(mb_bf16));
    float *d_lse = dev_alloc((size_t)c.n * heads * sizeof(float));
    launched(mb_cuda_positions(d_positions, c.d_cu, num_seqs, c.n, test_stream, &err), &err, "positions");
    launched(mb_cuda_rope_table(d_table, d_positions, c.n, head_dim, theta, test_stream, &err), &err, "rope_table");
    launched(mb_cuda_attention_forward(d_out, d_lse, workspace, c.d_qkv, c.d_cu, num_seqs, c.n, heads, head_dim, window,
                                       test_stream, &err), &err, "attention_forward");
    float *separate, *fused;
    dev_poison(d_dqkv, c.qkv_count * sizeof(mb_bf16));
    launched(mb_cuda_attention_backward(d_dqkv, workspace, d_dout, d_out, d_lse, c.d_qkv, c.d_cu, num_seqs, c.n, heads,
                                        head_dim, window, 0, test_stream, &err), &err, "attention_backward");
    launched(mb_cuda_rope(d_dqkv, d_positions, c.n, heads, head_dim, theta, -1, test_stream, &err), &err, "rope");
    separate = download_bf16(d_dqkv, c.qkv_count);
    dev_poison(d_dqkv, c.qkv_count * sizeof(mb_bf16));
    launched(mb_cuda_attention_backward_rope(d_dqkv, workspace, d_dout, d_out, d_lse, c.d_qkv, c.d_cu, num_seqs, c.n,
                                             heads, head_dim, window, 0, d_table, test_stream, &err),
             &err, "attention_backward_rope");
    fused = download_bf16(d_dqkv, c.qkv_count);
    static const char *block_names[3] = {"dQ", "dK", "dV"};
    char what[160];
    for (int block = 0; block < 3; block++) {
        float *got = qkv_block(fused, c.n, c.hidden, block), *want = qkv_block(separate, c.n, c.hidden, block);
        snprintf(what, sizeof what, "attention rope fused %s (n %d, head_dim %d, window %d)", block_names[block], c.n,
                 head_dim, window);
        cr_expect_eq(count_nonfinite(got, c.out_count), 0, "%s: non-finite or unwritten values", what);
        if (block < 2)
            expect_close(what, got, want, c.out_count, BF16_TOLERANCE);
        else
            expect_same_bits(what, got, want, c.out_count * sizeof(float));
        free(got), free(want);
    }
    attention_case_free(&c);
    free(dout), free(separate), free(fused);
    cudaFree(d_dout), cudaFree(d_positions), cudaFree(d_table), cudaFree(workspace);
    cudaFree(d_out), cudaFree(d_dqkv), cudaFree(d_lse);
}

Test(gpu_ops, attention_rope_fused) {
    require_gpu();
    int count = (int)(sizeof kShortLengths / sizeof kShortLengths[0]);
    const int long_beside_short[] = {size_for(8192, 1030), 1, 65, 3, 200, 130};
    run_attention_rope_fused(kShortLengths, count, 2, 64, -1, 160000.0, 41); /* global layers (wgmma on sm_90a) */
    run_attention_rope_fused(kShortLengths, count, 2, 64, 64, 10000.0, 42);  /* local layers (band) */
    run_attention_rope_fused(long_beside_short, 6, 3, 64, -1, 160000.0, 43);
    run_attention_rope_fused(long_beside_short, 6, 3, 64, 64, 10000.0, 44);
    setenv("MB_ATTENTION_BAND_BWD", "recompute_ds", 1); /* the older ring backward's RoPE'd dQ stores */
    run_attention_rope_fused(long_beside_short, 6, 3, 64, 64, 10000.0, 47);
    unsetenv("MB_ATTENTION_BAND_BWD");
    run_attention_rope_fused(kShortLengths, count, 2, 32, 64, 10000.0, 45);  /* band at head_dim 32 and 128 */
    run_attention_rope_fused(kShortLengths, count, 2, 128, 64, 10000.0, 46);
    /* a path without fusion refuses a table instead of ignoring it */
    mb_error err = {{0}};
    if (!mb_cuda_attention_backward_fuses_rope(64, -1, 1)) {
        /* never dereferenced: the path check comes before any launch */
        void *fake = (void *)(uintptr_t)4096;
        int rc = mb_cuda_attention_backward_rope(fake, fake, fake, fake, fake, fake, fake, 1, 1, 1, 64, -1, 1, fake,
                                                 test_stream, &err);
        cr_expect_eq(rc, -1, "the deterministic global path must refuse a rope table");
        cr_expect(strstr(err.message, "fuses_rope") != NULL, "refusal names the check to ask: %s", err.message);
    }
}

/* ---- attention for a subset of the queries (mb_cuda_attention_forward_rows / _backward_rows) ---- */

/* Which rows a case asks for: sequence 1 none and sequence 2 all, the others ~30 % (MLM), or the first row of every
 * sequence but sequence 1 (cls pooling: one query per sequence). */
enum asked_rows { kAskedMlm, kAskedFirst, kAskedAllButLast };

/* The sparse last layer's attention: queries are the asked-for rows only (asked_rows: the MLM pattern, with 1-token
 * sequences asked and not, or one row per sequence, or all but each sequence's last), keys every token of their
 * sequence. Sequence 1 never has asked rows. *split_pieces (when given) gets the tail split the backward planned. Against the CPU reference
 * on the whole batch: out and lse of the asked rows; dQ, dK, dV of the whole-batch backward with dO zero on the other
 * rows, then RoPE's backward by the CPU op (the rows backward applies it in its stores) — dQ of the other rows and
 * dK/dV of sequences without asked rows must be exact zeros. */
static void run_attention_rows(const char *name, const int *lengths, int num_seqs, int heads, double theta,
                               enum asked_rows pattern, uint64_t seed, int *split_pieces) {
    const int head_dim = 64;
    if (!mb_cuda_attention_rows_supported(head_dim, -1, 0)) {
        cr_log_info("attention rows: no kernel for a subset of the queries on this device: skipped");
        return;
    }
    attention_case c = attention_case_start(lengths, num_seqs, heads, head_dim, seed);
    mb_error err = {{0}};
    /* the asked rows, in token order (pattern above); their draws come before the qkv's */
    int32_t *rows_of = malloc((size_t)c.n * sizeof(int32_t));
    int32_t *cu_rows = malloc((size_t)(num_seqs + 1) * sizeof(int32_t));
    int32_t *positions = malloc((size_t)c.n * sizeof(int32_t));
    int rows = 0;
    cu_rows[0] = 0;
    for (int s = 0; s < num_seqs; s++) {
        for (int i = c.cu[s]; i < c.cu[s + 1]; i++) {
            positions[i] = i - c.cu[s];
            bool asked = s == 1                       ? false
                         : pattern == kAskedFirst      ? i == c.cu[s]
                         : pattern == kAskedAllButLast ? i + 1 < c.cu[s + 1]
                         : s == 2                      ? true
                                                       : mb_rng_below(&c.rng, 10) < 3;
            if (asked) rows_of[rows++] = i;
        }
        cu_rows[s + 1] = rows;
    }
    cr_assert(rows > 0 && cu_rows[2] == cu_rows[1], "the test needs asked rows and an unasked sequence");
    attention_case_draw_qkv(&c);
    float *dout_rows;
    mb_bf16 *d_dout = random_bf16(&c.rng, (size_t)rows * c.hidden, 0.0, 1.0, &dout_rows);
    /* Q of the asked rows, gathered on the host from the same bf16 values */
    mb_bf16 *q_host = malloc((size_t)rows * c.hidden * sizeof(mb_bf16));
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < c.hidden; k++)
            q_host[(size_t)r * c.hidden + k] = mb_bf16_from_float(c.qkv[(size_t)rows_of[r] * 3 * c.hidden + k]);
    mb_bf16 *d_q = to_device(q_host, (size_t)rows * c.hidden * sizeof(mb_bf16));
    int32_t *d_cu_rows = to_device(cu_rows, (size_t)(num_seqs + 1) * sizeof(int32_t));
    int32_t *d_rows = to_device(rows_of, (size_t)rows * sizeof(int32_t));
    int32_t *d_positions = to_device(positions, (size_t)c.n * sizeof(int32_t));
    float *d_table = dev_alloc((size_t)c.n * head_dim * sizeof(float));
    void *workspace = dev_alloc(mb_cuda_attention_workspace_bytes(c.n, num_seqs, heads, head_dim));
    mb_bf16 *d_out = dev_alloc((size_t)rows * c.hidden * sizeof(mb_bf16));
    mb_bf16 *d_dqkv = dev_alloc(c.qkv_count * sizeof(mb_bf16));
    float *d_lse = dev_alloc((size_t)rows * heads * sizeof(float));
    dev_poison(d_out, (size_t)rows * c.hidden * sizeof(mb_bf16));
    dev_poison(d_lse, (size_t)rows * heads * sizeof(float));
    dev_poison(d_dqkv, c.qkv_count * sizeof(mb_bf16));
    launched(mb_cuda_rope_table(d_table, d_positions, c.n, head_dim, theta, test_stream, &err), &err, "rope_table");
    launched(mb_cuda_attention_forward_rows(d_out, d_lse, workspace, d_q, c.d_qkv, c.d_cu, d_cu_rows, num_seqs, c.n,
                                            rows, heads, head_dim, -1, test_stream, &err),
             &err, "attention_forward_rows");
    launched(mb_cuda_attention_backward_rows(d_dqkv, workspace, d_dout, d_out, d_lse, d_q, c.d_qkv, c.d_cu, d_cu_rows,
                                             d_rows, num_seqs, c.n, rows, heads, head_dim, -1, d_table, test_stream,
                                             &err), &err, "attention_backward_rows");
    if (split_pieces != NULL) {
        int first = 0;
        launched(mb_cuda_attention_backward_split(workspace, c.n, num_seqs, heads, &first, split_pieces, &err), &err,
                 "attention_backward_split");
    }
    float *out = download_bf16(d_out, (size_t)rows * c.hidden), *lse = download_floats(d_lse, (size_t)rows * heads);
    float *dqkv = download_bf16(d_dqkv, c.qkv_count);

    /* the reference on the whole batch */
    reference_shape shape = {c.cu, num_seqs, heads, head_dim, -1, c.hidden, 3 * c.hidden, 1.0 / sqrt((double)head_dim)};
    float *out_ref = malloc(c.out_count * sizeof(float)), *lse_ref = malloc((size_t)c.n * heads * sizeof(float));
    reference_attention_forward(out_ref, lse_ref, c.qkv, &shape, c.n);
    float *out_want = calloc((size_t)rows * c.hidden, sizeof(float));
    float *lse_want = calloc((size_t)rows * heads, sizeof(float));
    for (int r = 0; r < rows; r++) {
        memcpy(out_want + (size_t)r * c.hidden, out_ref + (size_t)rows_of[r] * c.hidden, c.hidden * sizeof(float));
        memcpy(lse_want + (size_t)r * heads, lse_ref + (size_t)rows_of[r] * heads, heads * sizeof(float));
    }
    char what[200];
    snprintf(what, sizeof what, "attention rows %s out (%d of %d rows)", name, rows, c.n);
    expect_close(what, out, out_want, (size_t)rows * c.hidden, BF16_TOLERANCE);
    snprintf(what, sizeof what, "attention rows %s lse", name);
    expect_close(what, lse, lse_want, (size_t)rows * heads, FP32_TOLERANCE);
    /* backward: dO zero on the other rows; out and lse of the asked rows the GPU's own (as run_attention) */
    float *dout_full = calloc(c.out_count, sizeof(float)), *dqkv_ref = malloc(c.qkv_count * sizeof(float));
    for (int r = 0; r < rows; r++) {
        memcpy(dout_full + (size_t)rows_of[r] * c.hidden, dout_rows + (size_t)r * c.hidden, c.hidden * sizeof(float));
        memcpy(out_ref + (size_t)rows_of[r] * c.hidden, out + (size_t)r * c.hidden, c.hidden * sizeof(float));
        memcpy(lse_ref + (size_t)rows_of[r] * heads, lse + (size_t)r * heads, heads * sizeof(float));
    }
    reference_attention_backward(dqkv_ref, dout_full, out_ref, lse_ref, c.qkv, &shape, c.n);
    mb_cpu_rope(dqkv_ref, positions, c.n, heads, head_dim, theta, -1);
    static const char *block_names[3] = {"dQ", "dK", "dV"};
    for (int block = 0; block < 3; block++) {
        float *got = qkv_block(dqkv, c.n, c.hidden, block), *want = qkv_block(dqkv_ref, c.n, c.hidden, block);
        snprintf(what, sizeof what, "attention rows %s %s", name, block_names[block]);
        cr_expect_eq(count_nonfinite(got, c.out_count), 0, "%s: non-finite or unwritten values", what);
        expect_close(what, got, want, c.out_count, BF16_TOLERANCE);
        size_t nonzero = 0; /* the unasked sequence: no gradient at all; other unasked rows: no dQ */
        for (int i = c.cu[1]; i < c.cu[2]; i++)
            for (int k = 0; k < c.hidden; k++) nonzero += got[(size_t)i * c.hidden + k] != 0.0f;
        cr_expect_eq(nonzero, 0, "%s: %zu nonzero values in the sequence without asked rows", what, nonzero);
        free(got), free(want);
    }
    attention_case_free(&c);
    free(rows_of), free(cu_rows), free(positions), free(dout_rows), free(q_host), free(out), free(lse), free(dqkv);
    free(out_ref), free(lse_ref), free(out_want), free(lse_want), free(dout_full), free(dqkv_ref);
    cudaFree(d_dout), cudaFree(d_q), cudaFree(d_cu_rows), cudaFree(d_rows);
    cudaFree(d_positions), cudaFree(d_table), cudaFree(workspace), cudaFree(d_out), cudaFree(d_dqkv), cudaFree(d_lse);
}

Test(gpu_ops, attention_rows, .timeout = 600) {
    require_gpu();
    int count = (int)(sizeof kShortLengths / sizeof kShortLengths[0]);
    run_attention_rows("short", kShortLengths, count, 2, 160000.0, kAskedMlm, 81, NULL);
    const int long_beside_short[] = {1, 65, size_for(8192, 1030), 3, 200, 130};
    run_attention_rows("long beside short", long_beside_short, 6, 3, 160000.0, kAskedMlm, 82, NULL);
    run_attention_rows("short, 12 heads", kShortLengths, count, 12, 10000.0, kAskedMlm, 83, NULL);
    run_attention_rows("first rows (cls)", long_beside_short, 6, 12, 160000.0, kAskedFirst, 84, NULL);
}

/* The sm_90a global backward's tail split (cuda/attention_wgmma_bwd.h): uniform 384-token sequences (3 key tiles, 3
 * query steps), 4 heads, as many as leave the grid's last round a few items (with 132 SMs: 12 sequences, 144 items,
 * 12 in the last round, cut into 3 pieces). The split backward against the CPU reference (run_attention: its
 * deterministic = 0 run is the split one); the rows backward of the sparse last layer, split too, against the CPU
 * (run_attention_rows, all rows but each sequence's last); the planned splits read back; and the whole-batch backward
 * unsplit (MB_ATTENTION_WGMMA_SPLIT=0) against the split one. */
Test(gpu_ops, attention_wgmma_tail_split, .timeout = 600) {
    require_gpu();
    if (!mb_cuda_attention_rows_supported(64, -1, 0)) {
        cr_log_info("attention_wgmma_tail_split: skipped, no sm_90a global backward on this device");
        return;
    }
    int device = 0, sm_count = 0;
    cr_assert(cudaGetDevice(&device) == cudaSuccess);
    cr_assert(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess);
    const int heads = 4, length = 384, items_per_seq = heads * 3, steps = 3;
    int num_seqs = sm_count / items_per_seq + 1, tail = 0;
    for (;; num_seqs++) { /* the first count whose last round takes at most half the grid */
        tail = (num_seqs * items_per_seq) % sm_count;
        if (tail > 0 && 2 * tail <= sm_count) break;
    }
    int expected_pieces = sm_count / tail; /* min(grid / t, 4 pieces, 160 slots / t, the steps) */
    expected_pieces = expected_pieces > 4 ? 4 : expected_pieces;
    expected_pieces = expected_pieces > 160 / tail ? 160 / tail : expected_pieces;
    expected_pieces = expected_pieces > steps ? steps : expected_pieces;
    int *lengths = malloc((size_t)num_seqs * sizeof(int) + 1);
    cr_assert(lengths != NULL && num_seqs > 0);
    for (int s = 0; s < num_seqs; s++) lengths[s] = length;
    cr_log_info("tail split: %d SMs, %d sequences of %d, %d items, %d in the last round, %d pieces expected", sm_count,
                num_seqs, length, num_seqs * items_per_seq, tail, expected_pieces);
    run_attention("tail split", lengths, num_seqs, heads, 64, -1, 71);
    /* the rows backward (the sparse last layer) splits by the asked rows' steps: 383 of 384 rows, 3 steps */
    int rows_pieces = 0;
    run_attention_rows("tail split", lengths, num_seqs, heads, 160000.0, kAskedAllButLast, 73, &rows_pieces);
    cr_expect(rows_pieces == expected_pieces, "rows backward: tail split in %d pieces, expected %d", rows_pieces,
              expected_pieces);

    attention_case c = attention_case_start(lengths, num_seqs, heads, 64, 72);
    attention_case_draw_qkv(&c);
    mb_error err = {{0}};
    float *dout;
    mb_bf16 *d_dout = random_bf16(&c.rng, c.out_count, 0.0, 1.0, &dout);
    void *workspace = dev_alloc(mb_cuda_attention_workspace_bytes(c.n, num_seqs, heads, 64));
    mb_bf16 *d_out = dev_alloc(c.out_count * sizeof(mb_bf16)), *d_dqkv = dev_alloc(c.qkv_count * sizeof(mb_bf16));
    float *d_lse = dev_alloc((size_t)c.n * heads * sizeof(float));
    launched(mb_cuda_attention_forward(d_out, d_lse, workspace, c.d_qkv, c.d_cu, num_seqs, c.n, heads, 64, -1,
                                       test_stream, &err),
             &err, "attention_forward");
    float *runs[2];
    for (int run = 0; run < 2; run++) {
        if (run == 1) setenv("MB_ATTENTION_WGMMA_SPLIT", "0", 1);
        dev_poison(d_dqkv, c.qkv_count * sizeof(mb_bf16));
        launched(mb_cuda_attention_backward(d_dqkv, workspace, d_dout, d_out, d_lse, c.d_qkv, c.d_cu, num_seqs, c.n,
                                            heads, 64, -1, 0, test_stream, &err),
                 &err, "attention_backward");
        runs[run] = download_bf16(d_dqkv, c.qkv_count);
        if (run == 0) {
            int first = -1, pieces = -1;
            launched(mb_cuda_attention_backward_split(workspace, c.n, num_seqs, heads, &first, &pieces, &err), &err,
                     "attention_backward_split");
            cr_expect(pieces == expected_pieces && first == num_seqs * items_per_seq - tail,
                      "tail split planned from item %d in %d pieces, expected from item %d in %d", first, pieces,
                      num_seqs * items_per_seq - tail, expected_pieces);
        }
    }
    unsetenv("MB_ATTENTION_WGMMA_SPLIT");
    static const char *block_names[3] = {"dQ", "dK", "dV"};
    for (int block = 0; block < 3; block++) {
        float *split = qkv_block(runs[0], c.n, c.hidden, block), *whole = qkv_block(runs[1], c.n, c.hidden, block);
        char what[120];
        snprintf(what, sizeof what, "tail split %s against the unsplit backward", block_names[block]);
        expect_close(what, split, whole, c.out_count, BF16_TOLERANCE);
        free(split), free(whole);
    }
    attention_case_free(&c);
    free(runs[0]), free(runs[1]), free(lengths), free(dout);
    cudaFree(d_dout), cudaFree(workspace), cudaFree(d_out), cudaFree(d_dqkv), cudaFree(d_lse);
}
