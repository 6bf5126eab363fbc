/* The whole-model CUDA backend against the CPU fp32 backend and against transformers, through the backend boundary.
 *
 * Every case runs the same parameters (fp32 host arena, written with write_params) and the same packed batch on both
 * backends: forward, backward(1 / loss_count), read_grads. The CUDA backend computes in bf16 (activations, residual
 * stream, GEMM operands, a bf16 copy of the weights), so it is compared with bf16 thresholds, per tensor as
 * ‖gpu − ref‖ / ‖ref‖ (the worst value of each case is logged so the margins can be read off):
 *   LOSS_TOLERANCE   1e-2   the mean loss, relative (vs the CPU backend and vs transformers' fp32 value)
 *   LOGIT_TOLERANCE  2e-2   logits (one bf16 rounding of the output plus the bf16 path before it; measured on an
 *                           H200: worst 1.18e-2, the 4-value regression output of cls_pool_mean_regression)
 *   GRAD_TOLERANCE   2e-2   every parameter gradient (bf16 dlogits and residual-stream gradients add roundings
 *                           per layer on top of the 1e-2 of a single op)
 *   EXACT                   read/write of parameters and optimizer state round trip bit for bit
 * Cases: every fixture of tests/fixtures/hf (MLM tied and untied, head_dim 32 and 64, windows, cls/mean pooling,
 * 3-label classification, regression); the "tiny" preset with one 8192-token sequence beside many short ones
 * (1024 under MB_GPU_TEST_SMALL=1, for compute-sanitizer); gradient accumulation over two micro-batches; a few
 * StableAdamW steps tracking the CPU backend's losses; a RoPE theta change. Without a CUDA device every test skips. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "cuda/backend_cuda.h"
#include "cuda/device.h"
#include "cuda/ops.h"
#include "io/batch_file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "../support/hf_fixture.h"

#define LOSS_TOLERANCE 1e-2
#define LOGIT_TOLERANCE 2e-2
#define GRAD_TOLERANCE 2e-2

static void require_gpu(void) {
    mb_error err = {{0}};
    if (mb_cuda_device_count(&err) == 0) cr_skip_test("no CUDA device: %s", err.message);
}

static bool small_mode(void) {
    const char *value = getenv("MB_GPU_TEST_SMALL");
    return value != NULL && value[0] != '\0' && strcmp(value, "0") != 0;
}

/* The repository root: $MB_SOURCE_DIR when set (the GPU machine runs binaries built in another checkout), else the
 * build's source root. */
static const char *source_dir(void) {
    const char *dir = getenv("MB_SOURCE_DIR");
    return dir != NULL && dir[0] != '\0' ? dir : MB_SOURCE_DIR;
}

/* A fixture of tests/fixtures/hf: the model and, when batch is not NULL, its batch.safetensors. */
static void load_fixture(const char *name, mb_model *model, mb_batch_file *batch) {
    char dir[1024], path[1200];
    mb_error err = {{0}};
    snprintf(dir, sizeof dir, "%s/tests/fixtures/hf/%s", source_dir(), name);
    cr_assert_eq(mb_model_load_hf(model, dir, &err), 0, "%s", err.message);
    if (batch == NULL) return;
    snprintf(path, sizeof path, "%s/batch.safetensors", dir);
    cr_assert_eq(mb_batch_file_load(batch, path, &model->config, &err), 0, "%s", err.message);
}

static bool all_finite(const float *a, size_t count) {
    for (size_t i = 0; i < count; i++)
        if (!isfinite(a[i])) return false;
    return true;
}

/* ---- one forward + backward on a backend ---- */

typedef struct step_output {
    double loss;      /* mean */
    int loss_count;
    float *logits;    /* copy, NULL when the backend returned none */
    int logit_rows, logit_cols;
    float *grads;     /* table.total_numel */
} step_output;

static void step_output_free(step_output *o) {
    free(o->logits);
    free(o->grads);
}

static mb_backend *make_backend(const char *name, const mb_config *config, const float *params) {
    mb_error err = {{0}};
    mb_backend *backend = NULL;
    cr_assert_eq(mb_backend_create(&backend, name, config, &err), 0, "create %s: %s", name, err.message);
    cr_assert_str_eq(backend->ops->name, name);
    cr_assert_eq(backend->ops->write_params(backend, params, &err), 0, "%s", err.message);
    return backend;
}

static void forward_backward(mb_backend *backend, const mb_batch *batch, step_output *out) {
    mb_error err = {{0}};
    mb_forward_result result;
    memset(out, 0, sizeof *out);
    cr_assert_eq(backend->ops->zero_grads(backend, &err), 0, "%s", err.message);
    cr_assert_eq(backend->ops->forward(backend, batch, &result, &err), 0, "%s forward: %s", backend->ops->name,
                 err.message);
    cr_assert_gt(result.loss_count, 0, "no loss rows");
    out->loss = result.loss_sum / result.loss_count;
    out->loss_count = result.loss_count;
    out->logit_rows = result.logit_rows;
    out->logit_cols = result.logit_cols;
    if (result.logits != NULL) {
        size_t count = (size_t)result.logit_rows * result.logit_cols;
        out->logits = malloc(count * sizeof(float));
        memcpy(out->logits, result.logits, count * sizeof(float));
    }
    cr_assert_eq(backend->ops->backward(backend, (float)(1.0 / result.loss_count), &err), 0, "%s backward: %s",
                 backend->ops->name, err.message);
    out->grads = malloc(backend->table.total_numel * sizeof(float));
    cr_assert_eq(backend->ops->read_grads(backend, out->grads, &err), 0, "%s", err.message);
}

/* Compares every gradient tensor; returns the worst relative error. */
static double compare_grads(const char *what, const mb_param_table *table, const float *gpu, const float *ref) {
    double worst = 0.0;
    const char *worst_name = "";
    for (int i = 0; i < table->count; i++) {
        const mb_param_info *p = &table->params[i];
        cr_expect(all_finite(gpu + p->offset, p->numel), "%s: %s has non-finite gradients", what, p->name);
        double error = relative_error(gpu + p->offset, ref + p->offset, p->numel);
        cr_expect(error < GRAD_TOLERANCE, "%s: grad %s relative error %.3g", what, p->name, error);
        if (error > worst) {
            worst = error;
            worst_name = p->name;
        }
    }
    cr_log_info("%s: worst gradient relative error %.2e (%s) over %d tensors", what, worst, worst_name, table->count);
    return worst;
}

static void expect_loss(const char *what, double gpu, double ref) {
    double error = fabs(gpu - ref) / fmax(fabs(ref), 1e-12);
    cr_expect(error < LOSS_TOLERANCE, "%s: loss %.6f vs %.6f (relative %.3g)", what, gpu, ref, error);
}

/* ---- fixtures: CPU backend and transformers ---- */

/* A fixture of tests/fixtures/hf with its batch, on the CPU reference and on the CUDA backend (both written with the
 * fixture's parameters): the set-up of the tests that compare the two backends on one fixture. */
typedef struct fixture_backends {
    mb_model model;
    mb_batch_file batch;
    mb_backend *cpu, *gpu;
} fixture_backends;

static void fixture_backends_make(fixture_backends *fb, const char *name) {
    load_fixture(name, &fb->model, &fb->batch);
    fb->cpu = make_backend("cpu", &fb->model.config, fb->model.params);
    fb->gpu = make_backend("cuda", &fb->model.config, fb->model.params);
}

static void fixture_backends_free(fixture_backends *fb) {
    mb_backend_destroy(fb->cpu);
    mb_backend_destroy(fb->gpu);
    mb_batch_file_free(&fb->batch);
    mb_model_free(&fb->model);
}

static void check_fixture(const char *name) {
    require_gpu();
    mb_error err = {{0}};
    fixture_backends fb;
    fixture_backends_make(&fb, name);
    step_output ref, out;
    forward_backward(fb.cpu, &fb.batch.batch, &ref);
    forward_backward(fb.gpu, &fb.batch.batch, &out);

    char path[1200];
    mb_safetensors expected;
    snprintf(path, sizeof path, "%s/tests/fixtures/hf/%s/expected.safetensors", source_dir(), name);
    cr_assert_eq(mb_st_open(&expected, path, &err), 0, "%s", err.message);
    float *hf_loss = expected_tensor(&expected, "loss", 1);
    cr_assert_eq(out.loss_count, ref.loss_count);
    expect_loss(name, out.loss, ref.loss);
    expect_loss(name, out.loss, *hf_loss);

    size_t logit_count = (size_t)ref.logit_rows * ref.logit_cols;
    cr_assert_not_null(out.logits, "%s: small batches must return logits", name);
    cr_assert_eq(out.logit_rows, ref.logit_rows);
    cr_assert_eq(out.logit_cols, ref.logit_cols);
    float *hf_logits = expected_tensor(&expected, "logits", logit_count);
    double logit_error = relative_error(out.logits, ref.logits, logit_count);
    double logit_error_hf = relative_error(out.logits, hf_logits, logit_count);
    cr_expect(logit_error < LOGIT_TOLERANCE, "%s: logits relative error %.3g vs cpu", name, logit_error);
    cr_expect(logit_error_hf < LOGIT_TOLERANCE, "%s: logits relative error %.3g vs transformers", name, logit_error_hf);

    char what[256];
    snprintf(what, sizeof what, "%s vs cpu", name);
    compare_grads(what, &fb.model.table, out.grads, ref.grads);
    float *hf_grads = malloc(fb.model.table.total_numel * sizeof(float));
    for (int i = 0; i < fb.model.table.count; i++) {
        const mb_param_info *p = &fb.model.table.params[i];
        char grad_name[160];
        snprintf(grad_name, sizeof grad_name, "grad.%s", p->name);
        float *g = expected_tensor(&expected, grad_name, p->numel);
        memcpy(hf_grads + p->offset, g, p->numel * sizeof(float));
        free(g);
    }
    snprintf(what, sizeof what, "%s vs transformers", name);
    compare_grads(what, &fb.model.table, out.grads, hf_grads);
    cr_log_info("%s: loss gpu %.6f cpu %.6f transformers %.6f, logits rel err %.2e (cpu) %.2e (transformers)", name,
                out.loss, ref.loss, *hf_loss, logit_error, logit_error_hf);

    char report[512];
    fb.gpu->ops->memory_report(fb.gpu, report, sizeof report);
    cr_expect(strstr(report, "peak") != NULL, "memory report: %s", report);
    cr_log_info("%s", report);

    free(hf_grads);
    free(hf_logits);
    free(hf_loss);
    mb_st_close(&expected);
    step_output_free(&ref);
    step_output_free(&out);
    fixture_backends_free(&fb);
}

Test(gpu_model, fixture_mlm_head_dim_32_small_window) { check_fixture("mlm_hd32_window_small_every2"); }
Test(gpu_model, fixture_mlm_head_dim_64_large_window) { check_fixture("mlm_hd64_window_large_every3"); }
Test(gpu_model, fixture_mlm_biases_untied_silu) { check_fixture("mlm_biases_untied_silu_every3"); }
Test(gpu_model, fixture_classifier_cls_pooling_3_labels) { check_fixture("cls_pool_cls_3labels"); }
Test(gpu_model, fixture_regression_mean_pooling) { check_fixture("cls_pool_mean_regression"); }

/* ---- random batches ---- */

typedef struct random_batch {
    int32_t *ids, *cu, *labels;
    mb_batch batch;
} random_batch;

/* Sequences of the given lengths; ~30% of the tokens labelled with random targets (MLM). */
static void random_batch_make(random_batch *rb, const mb_config *config, const int *lengths, int count,
                              uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    int n = 0;
    for (int s = 0; s < count; s++) n += lengths[s];
    rb->ids = malloc((size_t)n * sizeof(int32_t));
    rb->labels = malloc((size_t)n * sizeof(int32_t));
    rb->cu = malloc((size_t)(count + 1) * sizeof(int32_t));
    rb->cu[0] = 0;
    for (int s = 0; s < count; s++) rb->cu[s + 1] = rb->cu[s] + lengths[s];
    for (int i = 0; i < n; i++) {
        rb->ids[i] = (int32_t)mb_rng_below(&rng, (uint64_t)config->vocab_size);
        rb->labels[i] = mb_rng_uniform(&rng) < 0.3 ? (int32_t)mb_rng_below(&rng, (uint64_t)config->vocab_size) : -100;
    }
    for (int s = 0; s < count; s++) { /* every sequence starts with cls, some tokens are pad (skipped by the lookup) */
        rb->ids[rb->cu[s]] = config->cls_token_id;
        if (lengths[s] > 2) rb->ids[rb->cu[s + 1] - 1] = config->pad_token_id;
    }
    rb->labels[0] = 7; /* at least one labelled row */
    rb->batch = (mb_batch){n, count, rb->ids, rb->cu, rb->labels, NULL};
}

static void random_batch_free(random_batch *rb) {
    free(rb->ids);
    free(rb->cu);
    free(rb->labels);
}

static float *random_params(const mb_config *config, mb_param_table *table, uint64_t seed) {
    mb_error err = {{0}};
    cr_assert_eq(mb_param_table_build(table, config, &err), 0, "%s", err.message);
    float *params = malloc(table->total_numel * sizeof(float));
    mb_params_init(table, config, params, seed);
    return params;
}

/* The tiny preset: one long sequence (8192 tokens) beside many short ones, including length 1. */
Test(gpu_model, tiny_long_sequence_beside_short_ones, .timeout = 900) {
    require_gpu();
    mb_error err = {{0}};
    mb_config config;
    cr_assert_eq(mb_config_preset(&config, "tiny", &err), 0, "%s", err.message);
    config.max_position_embeddings = 8192;
    mb_param_table table;
    float *params = random_params(&config, &table, 11);
    int lengths[48];
    int count = 0;
    lengths[count++] = small_mode() ? 1024 : 8192;
    mb_rng rng;
    mb_rng_seed(&rng, 5);
    lengths[count++] = 1;
    while (count < (small_mode() ? 8 : 48)) lengths[count++] = 1 + (int)mb_rng_below(&rng, 200);
    random_batch rb;
    random_batch_make(&rb, &config, lengths, count, 3);

    mb_backend *cpu = make_backend("cpu", &config, params);
    mb_backend *gpu = make_backend("cuda", &config, params);
    step_output ref, out;
    forward_backward(cpu, &rb.batch, &ref);
    forward_backward(gpu, &rb.batch, &out);
    cr_assert_eq(out.loss_count, ref.loss_count);
    expect_loss("tiny long", out.loss, ref.loss);
    compare_grads("tiny long vs cpu", &table, out.grads, ref.grads);
    char report[512];
    gpu->ops->memory_report(gpu, report, sizeof report);
    cr_log_info("tiny long: %d tokens, %d sequences, %d labelled; loss gpu %.6f cpu %.6f; %s", rb.batch.token_count,
                count, ref.loss_count, out.loss, ref.loss, report);

    /* a smaller batch afterwards reuses the arena (no growth) and still matches */
    step_output small_ref, small_out;
    random_batch rb2;
    random_batch_make(&rb2, &config, lengths + 1, count - 1, 4);
    forward_backward(cpu, &rb2.batch, &small_ref);
    forward_backward(gpu, &rb2.batch, &small_out);
    expect_loss("tiny short ones", small_out.loss, small_ref.loss);
    compare_grads("tiny short ones vs cpu", &table, small_out.grads, small_ref.grads);
    char report2[512];
    gpu->ops->memory_report(gpu, report2, sizeof report2);
    cr_expect(strstr(report, "activations") != NULL, "%s", report);
    /* the activation budget part of the report is unchanged by a smaller batch */
    cr_expect(strncmp(report, report2, (size_t)(strstr(report, "; device") - report)) == 0,
              "the arena changed for a smaller batch:\n%s\n%s", report, report2);

    random_batch_free(&rb2);
    step_output_free(&small_ref);
    step_output_free(&small_out);
    random_batch_free(&rb);
    step_output_free(&ref);
    step_output_free(&out);
    mb_backend_destroy(cpu);
    mb_backend_destroy(gpu);
    free(params);
    mb_param_table_free(&table);
}

/* Parameters and optimizer state go through write/read unchanged; the backend starts at zero. */
Test(gpu_model, params_and_optimizer_state_round_trip_exactly) {
    require_gpu();
    mb_error err = {{0}};
    mb_config config;
    cr_assert_eq(mb_config_preset(&config, "tiny", &err), 0, "%s", err.message);
    mb_param_table table;
    float *params = random_params(&config, &table, 21);
    size_t n = table.total_numel;
    mb_backend *gpu = NULL;
    cr_assert_eq(mb_backend_create(&gpu, "cuda", &config, &err), 0, "%s", err.message);
    float *back = malloc(n * sizeof(float)), *m = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
    cr_assert_eq(gpu->ops->read_params(gpu, back, &err), 0, "%s", err.message);
    for (size_t k = 0; k < n; k++) cr_assert_eq(back[k], 0.0f, "fresh parameters must be zero at %zu", k);
    cr_assert_eq(gpu->ops->write_params(gpu, params, &err), 0, "%s", err.message);
    cr_assert_eq(gpu->ops->read_params(gpu, back, &err), 0, "%s", err.message);
    cr_assert_eq(memcmp(back, params, n * sizeof(float)), 0, "read_params differs from write_params");
    mb_rng rng;
    mb_rng_seed(&rng, 9);
    for (size_t k = 0; k < n; k++) {
        m[k] = (float)mb_rng_normal(&rng);
        v[k] = (float)mb_rng_uniform(&rng);
    }
    cr_assert_eq(gpu->ops->write_optimizer_state(gpu, m, v, &err), 0, "%s", err.message);
    float *m2 = malloc(n * sizeof(float)), *v2 = malloc(n * sizeof(float));
    cr_assert_eq(gpu->ops->read_optimizer_state(gpu, m2, v2, &err), 0, "%s", err.message);
    cr_assert_eq(memcmp(m, m2, n * sizeof(float)), 0, "optimizer m differs after a round trip");
    cr_assert_eq(memcmp(v, v2, n * sizeof(float)), 0, "optimizer v differs after a round trip");
    free(m2);
    free(v2);
    free(m);
    free(v);
    free(back);
    free(params);
    mb_backend_destroy(gpu);
    mb_param_table_free(&table);
}

/* Two backward passes accumulate: the gradient of two identical micro-batches is twice that of one. */
Test(gpu_model, gradients_accumulate_across_micro_batches) {
    require_gpu();
    mb_error err = {{0}};
    mb_model model;
    mb_batch_file batch;
    load_fixture("mlm_biases_untied_silu_every3", &model, &batch);
    mb_backend *gpu = make_backend("cuda", &model.config, model.params);
    step_output once;
    forward_backward(gpu, &batch.batch, &once);
    mb_forward_result result;
    cr_assert_eq(gpu->ops->forward(gpu, &batch.batch, &result, &err), 0, "%s", err.message);
    cr_assert_eq(gpu->ops->backward(gpu, (float)(1.0 / result.loss_count), &err), 0, "%s", err.message);
    cr_assert_eq(gpu->ops->backward(gpu, 1.0f, &err), -1, "a second backward without forward must fail");
    size_t n = model.table.total_numel;
    float *twice = malloc(n * sizeof(float));
    cr_assert_eq(gpu->ops->read_grads(gpu, twice, &err), 0, "%s", err.message);
    for (size_t k = 0; k < n; k++) once.grads[k] *= 2.0f;
    double error = relative_error(twice, once.grads, n);
    cr_expect(error < 1e-6, "accumulated gradient differs from 2x by %.3g", error);
    cr_assert_eq(gpu->ops->zero_grads(gpu, &err), 0, "%s", err.message);
    cr_assert_eq(gpu->ops->read_grads(gpu, twice, &err), 0, "%s", err.message);
    for (size_t k = 0; k < n; k++) cr_assert_eq(twice[k], 0.0f, "zero_grads left %g at %zu", twice[k], k);
    free(twice);
    step_output_free(&once);
    mb_backend_destroy(gpu);
    mb_batch_file_free(&batch);
    mb_model_free(&model);
}

/* A few StableAdamW steps on both backends: the losses track within bf16 noise, the step counters agree. */
Test(gpu_model, optimizer_steps_track_the_cpu_backend) {
    require_gpu();
    mb_error err = {{0}};
    fixture_backends fb;
    fixture_backends_make(&fb, "mlm_hd64_window_large_every3");
    mb_backend *backends[2] = {fb.cpu, fb.gpu};
    mb_stableadamw opt[2];
    double losses[2][6], norms[2][6];
    for (int k = 0; k < 2; k++) {
        mb_stableadamw_init(&opt[k], 1e-3, 1e-2);
        for (int step = 0; step < 6; step++) {
            step_output out;
            forward_backward(backends[k], &fb.batch.batch, &out);
            losses[k][step] = out.loss;
            cr_assert_eq(backends[k]->ops->grad_norm(backends[k], &norms[k][step], &err), 0, "%s", err.message);
            cr_assert_eq(backends[k]->ops->optimizer_step(backends[k], &opt[k], 1e-3, &err), 0, "%s", err.message);
            step_output_free(&out);
        }
    }
    for (int step = 0; step < 6; step++) {
        cr_log_info("step %d: loss cpu %.6f gpu %.6f, grad norm cpu %.6f gpu %.6f", step, losses[0][step],
                    losses[1][step], norms[0][step], norms[1][step]);
        expect_loss("optimizer steps", losses[1][step], losses[0][step]);
        cr_expect(fabs(norms[1][step] - norms[0][step]) < GRAD_TOLERANCE * norms[0][step],
                  "step %d: grad norm gpu %.6f cpu %.6f", step, norms[1][step], norms[0][step]);
    }
    cr_expect(losses[0][5] < losses[0][0] - 1e-3, "the CPU loss must fall on a repeated batch");
    cr_expect(losses[1][5] < losses[1][0] - 1e-3, "the GPU loss must fall on a repeated batch");
    cr_assert_eq(opt[0].step, 6);
    cr_assert_eq(opt[1].step, 6, "the CUDA optimizer step must keep opt->step in sync");
    /* the master weights moved the same way: updated parameters agree far better than the update size */
    size_t n = fb.model.table.total_numel;
    float *p_cpu = malloc(n * sizeof(float)), *p_gpu = malloc(n * sizeof(float));
    cr_assert_eq(backends[0]->ops->read_params(backends[0], p_cpu, &err), 0, "%s", err.message);
    cr_assert_eq(backends[1]->ops->read_params(backends[1], p_gpu, &err), 0, "%s", err.message);
    double moved = relative_error(p_cpu, fb.model.params, n), apart = relative_error(p_gpu, p_cpu, n);
    cr_log_info("parameters moved %.3e (relative) on the CPU; GPU and CPU parameters differ by %.3e", moved, apart);
    cr_expect(moved > 1e-3, "the optimizer did not move the parameters (%.3g)", moved);
    cr_expect(apart < 0.5 * moved, "GPU parameters differ from the CPU's by %.3g, the updates moved %.3g", apart,
              moved);
    free(p_cpu);
    free(p_gpu);
    fixture_backends_free(&fb);
}

/* A phase change of the RoPE thetas changes the loss, the same way on both backends. */
Test(gpu_model, rope_theta_change_matches_cpu) {
    require_gpu();
    mb_error err = {{0}};
    fixture_backends fb;
    fixture_backends_make(&fb, "mlm_hd32_window_small_every2");
    step_output before, ref, out;
    forward_backward(fb.gpu, &fb.batch.batch, &before);
    cr_assert_eq(fb.cpu->ops->set_rope_theta(fb.cpu, 10.0, 3.0, &err), 0, "%s", err.message);
    cr_assert_eq(fb.gpu->ops->set_rope_theta(fb.gpu, 10.0, 3.0, &err), 0, "%s", err.message);
    cr_assert_eq(fb.gpu->ops->set_rope_theta(fb.gpu, 0.0, 3.0, &err), -1, "theta 0 must be refused");
    forward_backward(fb.cpu, &fb.batch.batch, &ref);
    forward_backward(fb.gpu, &fb.batch.batch, &out);
    cr_expect(fabs(out.loss - before.loss) > 1e-4, "the theta change did not change the loss (%.6f)", out.loss);
    expect_loss("rope theta", out.loss, ref.loss);
    compare_grads("rope theta vs cpu", &fb.model.table, out.grads, ref.grads);
    step_output_free(&before);
    step_output_free(&ref);
    step_output_free(&out);
    fixture_backends_free(&fb);
}

/* Activation bytes from the backend's memory report ("activations X MiB for ..."). */
static double activation_mib(mb_backend *backend) {
    char report[1024];
    backend->ops->memory_report(backend, report, sizeof report);
    const char *at = strstr(report, "activations ");
    cr_assert_not_null(at, "no activation figure in \"%s\"", report);
    return atof(at + strlen("activations "));
}

/* run.recompute: every level gives bit-identical losses and gradients (the rebuilt activations are the forward's
 * own values), and each level keeps less activation memory than the one before. MB_DETERMINISTIC=1 so that the
 * attention backward itself is bit-reproducible; the model has biases (the Wi bias is part of the rebuilt product)
 * and sequences of lengths 1 to 300. */
Test(gpu_model, recompute_levels_are_bit_identical_and_smaller) {
    require_gpu();
    setenv("MB_DETERMINISTIC", "1", 1);
    mb_error err = {{0}};
    mb_model model;
    load_fixture("mlm_biases_untied_silu_every3", &model, NULL);
    static const int lengths[] = {1, 37, 300, 2, 129, 64};
    random_batch rb;
    random_batch_make(&rb, &model.config, lengths, 6, 5);
    mb_backend *gpu = make_backend("cuda", &model.config, model.params);
    step_output keep;
    forward_backward(gpu, &rb.batch, &keep);
    double keep_mib = activation_mib(gpu), previous_mib = keep_mib;
    static const mb_recompute levels[] = {MB_RECOMPUTE_NORMS, MB_RECOMPUTE_MLP};
    for (int k = 0; k < 2; k++) {
        cr_assert_eq(mb_backend_set_recompute(gpu, levels[k], &err), 0, "%s", err.message);
        step_output again;
        forward_backward(gpu, &rb.batch, &again);
        const char *name = mb_recompute_name(levels[k]);
        cr_expect_eq(again.loss, keep.loss, "recompute %s: loss %.9f vs %.9f", name, again.loss, keep.loss);
        size_t differing = 0;
        for (size_t i = 0; i < model.table.total_numel; i++) differing += again.grads[i] != keep.grads[i];
        cr_expect_eq(differing, 0, "recompute %s: %zu of %zu gradients differ from keeping everything", name,
                     differing, model.table.total_numel);
        double mib = activation_mib(gpu);
        cr_expect_lt(mib, previous_mib, "recompute %s keeps %.2f MiB, not less than %.2f", name, mib, previous_mib);
        cr_log_info("recompute %s: %.2f MiB of activations (none: %.2f)", name, mib, keep_mib);
        previous_mib = mib;
        step_output_free(&again);
    }
    cr_assert_eq(mb_backend_set_recompute(gpu, (mb_recompute)7, &err), -1, "level 7 must be refused");
    step_output_free(&keep);
    mb_backend_destroy(gpu);
    random_batch_free(&rb);
    mb_model_free(&model);
    unsetenv("MB_DETERMINISTIC");
}

/* The MLM decoder in chunks of labelled rows (MB_DECODER_CHUNK_ROWS=7 here; 8192 in training): the loss and
 * gradients match the CPU reference, and the chunked run matches the unchunked one up to the summation order of the
 * decoder's gradient and bf16 rounding; with recompute=norms the chunks' logits are rebuilt in the backward, bit-identically. */
Test(gpu_model, decoder_chunks_match_cpu_and_unchunked) {
    require_gpu();
    setenv("MB_DETERMINISTIC", "1", 1);
    mb_error err = {{0}};
    mb_model model;
    mb_batch_file batch;
    load_fixture("mlm_biases_untied_silu_every3", &model, &batch);
    mb_backend *whole = make_backend("cuda", &model.config, model.params);
    setenv("MB_DECODER_CHUNK_ROWS", "7", 1);
    mb_backend *chunked = make_backend("cuda", &model.config, model.params);
    unsetenv("MB_DECODER_CHUNK_ROWS");
    mb_backend *cpu = make_backend("cpu", &model.config, model.params);
    step_output ref, one, many, rebuilt;
    forward_backward(cpu, &batch.batch, &ref);
    forward_backward(whole, &batch.batch, &one);
    forward_backward(chunked, &batch.batch, &many);
    cr_assert_gt(many.loss_count, 14, "the fixture batch needs more than two chunks of 7 rows (has %d)",
                 many.loss_count);
    expect_loss("chunked decoder vs cpu", many.loss, ref.loss);
    compare_grads("chunked decoder vs cpu", &model.table, many.grads, ref.grads);
    /* the chunks' GEMMs may round the bf16 head gradient differently from the whole-batch GEMM */
    double error = relative_error(many.grads, one.grads, model.table.total_numel);
    cr_log_info("chunked vs whole decoder: gradients differ by %.3g", error);
    cr_expect(error < 5e-3, "chunked vs whole decoder: gradients differ by %.3g", error);
    cr_expect(fabs(many.loss - one.loss) <= 1e-3 * fabs(one.loss), "chunked vs whole loss %.9f vs %.9f", many.loss,
              one.loss);
    cr_expect_not_null(many.logits, "the chunked decoder keeps every chunk's logits: they are returned");
    cr_assert_eq(mb_backend_set_recompute(chunked, MB_RECOMPUTE_NORMS, &err), 0, "%s", err.message);
    forward_backward(chunked, &batch.batch, &rebuilt);
    cr_expect_null(rebuilt.logits, "with rebuilt chunks only the last chunk's logits exist: none may be returned");
    size_t differing = 0;
    for (size_t i = 0; i < model.table.total_numel; i++) differing += rebuilt.grads[i] != many.grads[i];
    cr_expect_eq(differing, 0, "rebuilding the chunks' logits changed %zu gradients", differing);
    cr_expect_eq(rebuilt.loss, many.loss, "rebuilt chunks: loss %.9f vs %.9f", rebuilt.loss, many.loss);
    step_output_free(&ref), step_output_free(&one), step_output_free(&many), step_output_free(&rebuilt);
    mb_backend_destroy(whole), mb_backend_destroy(chunked), mb_backend_destroy(cpu);
    mb_batch_file_free(&batch);
    mb_model_free(&model);
    unsetenv("MB_DETERMINISTIC");
}

/* The MLM head pads its labelled rows with ignored ones (MB_HEAD_ROW_MULTIPLE, default 256) so that its GEMM shapes
 * recur. The padding must not show: the same loss and row count, the same logits for the real rows, gradients that
 * match the CPU's and the unpadded run's (the padded GEMMs may sum in other blocks), and no padding row scattered
 * over token 0's gradient (token 0 is labelled here). */
Test(gpu_model, head_row_padding_is_invisible) {
    require_gpu();
    mb_model model;
    mb_batch_file batch;
    load_fixture("mlm_biases_untied_silu_every3", &model, &batch);
    cr_assert_neq(batch.batch.labels[0], -100, "the fixture batch must label token 0 for this test");
    setenv("MB_HEAD_ROW_MULTIPLE", "1", 1);
    mb_backend *unpadded = make_backend("cuda", &model.config, model.params);
    setenv("MB_HEAD_ROW_MULTIPLE", "64", 1);
    mb_backend *padded = make_backend("cuda", &model.config, model.params);
    unsetenv("MB_HEAD_ROW_MULTIPLE");
    mb_backend *cpu = make_backend("cpu", &model.config, model.params);
    step_output ref, plain, pad;
    forward_backward(cpu, &batch.batch, &ref);
    forward_backward(unpadded, &batch.batch, &plain);
    forward_backward(padded, &batch.batch, &pad);
    cr_assert_eq(pad.loss_count, ref.loss_count, "padded head: %d loss rows, the batch has %d", pad.loss_count,
                 ref.loss_count);
    cr_assert(pad.loss_count % 64 != 0, "the fixture's %d labelled rows need padding for this test", pad.loss_count);
    cr_expect_eq(pad.loss, plain.loss, "padded vs unpadded loss %.9f vs %.9f", pad.loss, plain.loss);
    cr_assert_eq(pad.logit_rows, plain.logit_rows, "padded head returned %d logit rows, unpadded %d", pad.logit_rows,
                 plain.logit_rows);
    cr_assert_not_null(pad.logits);
    cr_assert_not_null(plain.logits);
    size_t logit_count = (size_t)pad.logit_rows * pad.logit_cols, differing = 0;
    for (size_t i = 0; i < logit_count; i++) differing += pad.logits[i] != plain.logits[i];
    cr_expect_eq(differing, 0, "padding changed %zu of %zu logits", differing, logit_count);
    expect_loss("padded head vs cpu", pad.loss, ref.loss);
    compare_grads("padded head vs cpu", &model.table, pad.grads, ref.grads);
    double error = relative_error(pad.grads, plain.grads, model.table.total_numel);
    cr_log_info("padded vs unpadded head: gradients differ by %.3g", error);
    cr_expect(error < 5e-3, "padded vs unpadded head: gradients differ by %.3g", error);
    step_output_free(&ref), step_output_free(&plain), step_output_free(&pad);
    mb_backend_destroy(unpadded), mb_backend_destroy(padded), mb_backend_destroy(cpu);
    mb_batch_file_free(&batch);
    mb_model_free(&model);
}

/* The last layer after its attention runs on the head's rows only (MB_SPARSE_LAST_LAYER, on by default): its output
 * projection, MLP and the final norm see the labelled (or cls) rows, padding rows included. The rows no head reads
 * must not show: against the whole-batch run the same loss rows and, up to the GEMMs' blocking over fewer rows, the
 * same loss, logits and gradients; against the CPU reference the usual thresholds. The profile proves the sparse path
 * ran (the gather of the last layer's rows). MLM: padded to 64 rows (128 of 255 tokens), token 0 labelled, so a
 * padding row repeats a real one; classifier: cls pooling, one row per sequence. */
static void check_sparse_last_layer(const char *fixture, bool attention_too) {
    mb_model model;
    mb_batch_file batch;
    load_fixture(fixture, &model, &batch);
    setenv("MB_HEAD_ROW_MULTIPLE", "64", 1);
    setenv("MB_SPARSE_LAST_LAYER", "0", 1);
    mb_backend *whole = make_backend("cuda", &model.config, model.params);
    unsetenv("MB_SPARSE_LAST_LAYER");
    setenv("MB_PROFILE", "1", 1);
    mb_backend *sparse = make_backend("cuda", &model.config, model.params);
    unsetenv("MB_PROFILE");
    unsetenv("MB_HEAD_ROW_MULTIPLE");
    mb_backend *cpu = make_backend("cpu", &model.config, model.params);
    step_output ref, full, part;
    forward_backward(cpu, &batch.batch, &ref);
    forward_backward(whole, &batch.batch, &full);
    forward_backward(sparse, &batch.batch, &part);

    char profile[8192];
    cr_assert_eq(sparse->ops->profile(sparse, 0, profile, sizeof profile), 0, "no profile");
    cr_expect(strstr(profile, "gather (last layer)") != NULL, "%s: the sparse last layer did not run:\n%s", fixture,
              profile);
    bool rows_attention = strstr(profile, "attention fwd (last layer, head rows)") != NULL;
    cr_expect_eq(rows_attention, attention_too, "%s: the last layer's attention %s on the head's rows:\n%s", fixture,
                 rows_attention ? "ran" : "did not run", profile);
    cr_assert_eq(part.loss_count, full.loss_count, "%s: %d loss rows, the whole batch has %d", fixture,
                 part.loss_count, full.loss_count);
    cr_expect(fabs(part.loss - full.loss) <= 1e-3 * fabs(full.loss), "%s: sparse vs whole loss %.9f vs %.9f", fixture,
              part.loss, full.loss);
    cr_assert_not_null(part.logits);
    cr_assert_not_null(full.logits);
    cr_assert_eq(part.logit_rows, full.logit_rows);
    size_t logit_count = (size_t)part.logit_rows * part.logit_cols;
    double logit_error = relative_error(part.logits, full.logits, logit_count);
    double grad_error = relative_error(part.grads, full.grads, model.table.total_numel);
    cr_log_info("%s: sparse vs whole last layer: logits differ by %.3g, gradients by %.3g", fixture, logit_error,
                grad_error);
    cr_expect(logit_error < 5e-3, "%s: sparse vs whole logits differ by %.3g", fixture, logit_error);
    cr_expect(grad_error < 5e-3, "%s: sparse vs whole gradients differ by %.3g", fixture, grad_error);
    char what[256];
    snprintf(what, sizeof what, "%s, sparse last layer vs cpu", fixture);
    expect_loss(what, part.loss, ref.loss);
    compare_grads(what, &model.table, part.grads, ref.grads);
    step_output_free(&ref), step_output_free(&full), step_output_free(&part);
    mb_backend_destroy(whole), mb_backend_destroy(sparse), mb_backend_destroy(cpu);
    mb_batch_file_free(&batch);
    mb_model_free(&model);
}

/* The last layer is local here (layers 1 and 2 of 3 slide): its attention runs whole. */
Test(gpu_model, sparse_last_layer_mlm_matches_whole_batch) {
    require_gpu();
    check_sparse_last_layer("mlm_biases_untied_silu_every3", false);
}

Test(gpu_model, sparse_last_layer_classifier_matches_whole_batch) {
    require_gpu();
    check_sparse_last_layer("cls_pool_cls_3labels", false); /* head_dim 32: no kernel for a subset of the queries */
}

/* The last of 4 layers is global at head_dim 64: on sm_90a its attention runs for the head's rows too
 * (mb_cuda_attention_rows_supported), elsewhere whole. */
Test(gpu_model, sparse_last_layer_attention_matches_whole_batch) {
    require_gpu();
    check_sparse_last_layer("mlm_hd64_window_large_every3", mb_cuda_attention_rows_supported(64, -1, 0) != 0);
}
