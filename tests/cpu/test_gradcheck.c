/* Finite-difference checks of every CPU op's backward and of whole tiny models (MLM and classifier heads).
 *
 * For an op f and a fixed random upstream gradient g, L(x) = Σ g ⊙ f(x); the analytic gradient from the backward
 * must match central differences (L(x + h) − L(x − h)) / 2h on sampled coordinates. The comparison is per tensor:
 * ‖analytic − numeric‖ / ‖numeric‖ < 2e-2 (float32 differences limit the accuracy of the numeric side). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "cpu/model_cpu.h"
#include "cpu/ops.h"
#include "model/model.h"

#define FD_TOLERANCE 2e-2

typedef double (*objective_fn)(void *context);

static float *random_floats(mb_rng *rng, size_t count, float scale) {
    float *data = malloc(count * sizeof(float));
    for (size_t i = 0; i < count; i++) data[i] = (float)(mb_rng_normal(rng) * scale);
    return data;
}

static double weighted_sum(const float *values, const float *weights, size_t count) {
    double sum = 0.0;
    for (size_t i = 0; i < count; i++) sum += (double)values[i] * weights[i];
    return sum;
}

/* Compares analytic[i] with the central difference of objective over variable[i] for up to `samples` indices. */
static void expect_gradient(const char *what, float *variable, const float *analytic, size_t count,
                            objective_fn objective, void *context, int samples, float step, mb_rng *rng) {
    double diff = 0.0, norm = 0.0;
    int visits = samples < (int)count ? samples : (int)count;
    for (int s = 0; s < visits; s++) {
        size_t i = visits == (int)count ? (size_t)s : (size_t)mb_rng_below(rng, count);
        float saved = variable[i];
        float h = step * fmaxf(1.0f, fabsf(saved));
        variable[i] = saved + h;
        double plus = objective(context);
        variable[i] = saved - h;
        double minus = objective(context);
        variable[i] = saved;
        double numeric = (plus - minus) / (2.0 * h);
        diff += (numeric - analytic[i]) * (numeric - analytic[i]);
        norm += numeric * numeric;
    }
    double error = sqrt(diff / (norm > 1e-30 ? norm : 1e-30));
    cr_expect(error < FD_TOLERANCE, "%s: relative error %.3g (|numeric| %.3g)", what, error, sqrt(norm));
}

/* ---- linear ---- */
typedef struct linear_case {
    float *x, *w, *b, *y, *g;
    int n, in, out;
} linear_case;

static double linear_objective(void *context) {
    linear_case *c = context;
    mb_cpu_linear_forward(c->y, c->x, c->w, c->b, c->n, c->in, c->out);
    return weighted_sum(c->y, c->g, (size_t)c->n * c->out);
}

Test(gradcheck, linear) {
    mb_rng rng;
    mb_rng_seed(&rng, 1);
    linear_case c = {.n = 7, .in = 12, .out = 9};
    c.x = random_floats(&rng, 7 * 12, 1.0f);
    c.w = random_floats(&rng, 9 * 12, 0.3f);
    c.b = random_floats(&rng, 9, 0.3f);
    c.y = malloc(7 * 9 * sizeof(float));
    c.g = random_floats(&rng, 7 * 9, 1.0f);
    float *dx = calloc(7 * 12, sizeof(float)), *dw = calloc(9 * 12, sizeof(float)), *db = calloc(9, sizeof(float));
    mb_cpu_linear_backward(dx, dw, db, c.g, c.x, c.w, c.n, c.in, c.out, 0);
    expect_gradient("linear dx", c.x, dx, 7 * 12, linear_objective, &c, 84, 1e-2f, &rng);
    expect_gradient("linear dW", c.w, dw, 9 * 12, linear_objective, &c, 108, 1e-2f, &rng);
    expect_gradient("linear db", c.b, db, 9, linear_objective, &c, 9, 1e-2f, &rng);
    /* accumulate_dx adds; parameter gradients always accumulate */
    mb_cpu_linear_backward(dx, dw, NULL, c.g, c.x, c.w, c.n, c.in, c.out, 1);
    float *once = calloc(7 * 12, sizeof(float));
    mb_cpu_linear_backward(once, NULL, NULL, c.g, c.x, c.w, c.n, c.in, c.out, 0);
    for (int i = 0; i < 7 * 12; i++) cr_assert_float_eq(dx[i], 2 * once[i], 1e-5f);
}

/* ---- layernorm ---- */
typedef struct layernorm_case {
    float *x, *w, *b, *y, *mean, *rstd, *g;
    int n, h;
} layernorm_case;

static double layernorm_objective(void *context) {
    layernorm_case *c = context;
    mb_cpu_layernorm_forward(c->y, c->mean, c->rstd, c->x, c->w, c->b, c->n, c->h, 1e-5f);
    return weighted_sum(c->y, c->g, (size_t)c->n * c->h);
}

Test(gradcheck, layernorm_with_and_without_bias) {
    mb_rng rng;
    mb_rng_seed(&rng, 2);
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        layernorm_case c = {.n = 5, .h = 70};
        c.x = random_floats(&rng, 5 * 70, 2.0f);
        c.w = random_floats(&rng, 70, 1.0f);
        c.b = with_bias ? random_floats(&rng, 70, 1.0f) : NULL;
        c.y = malloc(5 * 70 * sizeof(float));
        c.mean = malloc(5 * sizeof(float));
        c.rstd = malloc(5 * sizeof(float));
        c.g = random_floats(&rng, 5 * 70, 1.0f);
        layernorm_objective(&c);
        float *dx = calloc(5 * 70, sizeof(float)), *dw = calloc(70, sizeof(float)), *db = calloc(70, sizeof(float));
        mb_cpu_layernorm_backward(dx, dw, with_bias ? db : NULL, c.g, c.x, c.mean, c.rstd, c.w, c.n, c.h, 0);
        expect_gradient("layernorm dx", c.x, dx, 350, layernorm_objective, &c, 350, 1e-2f, &rng);
        expect_gradient("layernorm dw", c.w, dw, 70, layernorm_objective, &c, 70, 1e-2f, &rng);
        if (with_bias) expect_gradient("layernorm db", c.b, db, 70, layernorm_objective, &c, 70, 1e-2f, &rng);
    }
}

Test(gradcheck, embedding_backward_skips_pad_and_sums_repeats) {
    int ids[] = {4, 1, 4, 3, 0, 4};
    float dout[6 * 2];
    for (int i = 0; i < 12; i++) dout[i] = (float)(i + 1);
    float dtable[5 * 2] = {0};
    mb_cpu_embedding_backward(dtable, dout, ids, 6, 2, 3);
    float want[5 * 2] = {9, 10, 3, 4, 0, 0, 0, 0, 1 + 5 + 11, 2 + 6 + 12};
    for (int i = 0; i < 10; i++) cr_assert_float_eq(dtable[i], want[i], 0.0f, "dtable[%d]", i);
    float table[5 * 2] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, out[6 * 2];
    mb_cpu_embedding_forward(out, ids, table, 6, 2);
    cr_assert_float_eq(out[0], 8.0f, 0.0f);
    cr_assert_float_eq(out[7], 7.0f, 0.0f);
}

/* ---- RoPE: the backward is rotation by -angle; check against differences of the forward ---- */
typedef struct rope_case {
    float *qkv, *work, *g;
    int32_t *positions;
    int n, heads, head_dim;
    double theta;
} rope_case;

static double rope_objective(void *context) {
    rope_case *c = context;
    size_t count = (size_t)c->n * 3 * c->heads * c->head_dim;
    memcpy(c->work, c->qkv, count * sizeof(float));
    mb_cpu_rope(c->work, c->positions, c->n, c->heads, c->head_dim, c->theta, +1);
    return weighted_sum(c->work, c->g, count);
}

Test(gradcheck, rope_positions_restart_per_sequence) {
    mb_rng rng;
    mb_rng_seed(&rng, 3);
    int32_t cu[] = {0, 1, 5, 12};
    rope_case c = {.n = 12, .heads = 2, .head_dim = 8, .theta = 10000.0};
    size_t count = 12 * 3 * 16;
    c.positions = malloc(12 * sizeof(int32_t));
    mb_cpu_positions(c.positions, cu, 3);
    cr_assert_eq(c.positions[0], 0);
    cr_assert_eq(c.positions[1], 0);
    cr_assert_eq(c.positions[4], 3);
    cr_assert_eq(c.positions[5], 0);
    c.qkv = random_floats(&rng, count, 1.0f);
    c.work = malloc(count * sizeof(float));
    c.g = random_floats(&rng, count, 1.0f);
    float *grad = malloc(count * sizeof(float));
    memcpy(grad, c.g, count * sizeof(float));
    mb_cpu_rope(grad, c.positions, c.n, c.heads, c.head_dim, c.theta, -1);
    expect_gradient("rope dqkv", c.qkv, grad, count, rope_objective, &c, (int)count, 1e-2f, &rng);
    /* position 0 is the identity; V is never rotated */
    memcpy(c.work, c.qkv, count * sizeof(float));
    mb_cpu_rope(c.work, c.positions, c.n, c.heads, c.head_dim, c.theta, +1);
    for (int k = 0; k < 3 * 16; k++) cr_assert_float_eq(c.work[k], c.qkv[k], 0.0f);
    for (size_t k = 2 * 16; k < count; k += 48)
        for (int j = 0; j < 16; j++) cr_assert_float_eq(c.work[k + j], c.qkv[k + j], 0.0f);
}

/* ---- attention ---- */
typedef struct attention_case {
    float *qkv, *out, *lse, *g;
    int32_t *cu;
    int sequences, n, heads, head_dim, window;
} attention_case;

static double attention_objective(void *context) {
    attention_case *c = context;
    mb_cpu_attention_forward(c->out, c->lse, c->qkv, c->cu, c->sequences, c->heads, c->head_dim, c->window);
    return weighted_sum(c->out, c->g, (size_t)c->n * c->heads * c->head_dim);
}

static void attention_gradcheck(int window, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    int32_t cu[] = {0, 1, 11, 14, 40};
    attention_case c = {.cu = cu, .sequences = 4, .n = 40, .heads = 2, .head_dim = 8, .window = window};
    size_t hidden = 16, count = 40 * 3 * hidden;
    c.qkv = random_floats(&rng, count, 1.0f);
    c.out = malloc(40 * hidden * sizeof(float));
    c.lse = malloc(40 * 2 * sizeof(float));
    c.g = random_floats(&rng, 40 * hidden, 1.0f);
    attention_objective(&c);
    float *dqkv = malloc(count * sizeof(float));
    mb_cpu_attention_backward(dqkv, c.g, c.out, c.lse, c.qkv, c.cu, c.sequences, c.heads, c.head_dim, c.window);
    expect_gradient(window < 0 ? "global attention dqkv" : "local attention dqkv", c.qkv, dqkv, count,
                    attention_objective, &c, 600, 1e-2f, &rng);
}

Test(gradcheck, attention_global) { attention_gradcheck(-1, 4); }
Test(gradcheck, attention_local_window_3) { attention_gradcheck(3, 5); }
Test(gradcheck, attention_window_0_is_identity_on_v) {
    /* window 0: each token sees only itself, so the output is its own V; sequences never mix */
    mb_rng rng;
    mb_rng_seed(&rng, 6);
    int32_t cu[] = {0, 3, 5};
    float *qkv = random_floats(&rng, 5 * 3 * 4, 1.0f), out[5 * 4], lse[5 * 2];
    mb_cpu_attention_forward(out, lse, qkv, cu, 2, 2, 2, 0);
    for (int i = 0; i < 5; i++)
        for (int k = 0; k < 4; k++) cr_assert_float_eq(out[i * 4 + k], qkv[i * 12 + 8 + k], 1e-6f);
}

Test(gradcheck, attention_never_crosses_sequences) {
    mb_rng rng;
    mb_rng_seed(&rng, 7);
    int32_t cu[] = {0, 6, 10};
    float *qkv = random_floats(&rng, 10 * 3 * 8, 1.0f), out[10 * 8], again[10 * 8], lse[10 * 2];
    mb_cpu_attention_forward(out, lse, qkv, cu, 2, 2, 4, -1);
    for (int k = 0; k < 24; k++) qkv[7 * 24 + k] += 5.0f;  /* change a token of the second sequence */
    mb_cpu_attention_forward(again, lse, qkv, cu, 2, 2, 4, -1);
    for (int i = 0; i < 6 * 8; i++) cr_assert_float_eq(out[i], again[i], 0.0f, "first sequence changed at %d", i);
}

/* ---- activations and GLU ---- */
typedef struct glu_case {
    float *u, *y, *g;
    int n, inner;
    mb_activation activation;
} glu_case;

static double glu_objective(void *context) {
    glu_case *c = context;
    mb_cpu_glu_forward(c->y, c->u, c->n, c->inner, c->activation);
    return weighted_sum(c->y, c->g, (size_t)c->n * c->inner);
}

typedef struct activation_case {
    float *x, *y, *g;
    size_t count;
    mb_activation activation;
} activation_case;

static double activation_objective(void *context) {
    activation_case *c = context;
    mb_cpu_activation_forward(c->y, c->x, c->count, c->activation);
    return weighted_sum(c->y, c->g, c->count);
}

Test(gradcheck, activations_and_glu) {
    mb_rng rng;
    mb_rng_seed(&rng, 8);
    mb_activation all[] = {MB_ACT_GELU, MB_ACT_GELU_TANH, MB_ACT_SILU, MB_ACT_RELU};
    for (int a = 0; a < 4; a++) {
        activation_case c = {.count = 64, .activation = all[a]};
        c.x = random_floats(&rng, 64, 2.0f);
        c.y = malloc(64 * sizeof(float));
        c.g = random_floats(&rng, 64, 1.0f);
        float *dx = malloc(64 * sizeof(float));
        mb_cpu_activation_backward(dx, c.g, c.x, 64, c.activation);
        expect_gradient(mb_activation_name(all[a]), c.x, dx, 64, activation_objective, &c, 64, 1e-3f, &rng);
        glu_case gc = {.n = 3, .inner = 10, .activation = all[a]};
        gc.u = random_floats(&rng, 60, 2.0f);
        gc.y = malloc(30 * sizeof(float));
        gc.g = random_floats(&rng, 30, 1.0f);
        float *du = malloc(60 * sizeof(float));
        mb_cpu_glu_backward(du, gc.g, gc.u, 3, 10, gc.activation);
        expect_gradient("glu du", gc.u, du, 60, glu_objective, &gc, 60, 1e-3f, &rng);
    }
    /* exact GELU values: gelu(1) = 0.8413447460685429, gelu(-2) = -0.04550026389635842 */
    cr_assert_float_eq(mb_activation_forward(MB_ACT_GELU, 1.0f), 0.8413447460685429f, 1e-7f);
    cr_assert_float_eq(mb_activation_forward(MB_ACT_GELU, -2.0f), -0.04550026389635842f, 1e-8f);
}

/* ---- losses ---- */
typedef struct loss_case {
    float *logits;
    int32_t *targets;
    float *float_targets;
    int rows, classes;
} loss_case;

static double cross_entropy_objective(void *context) {
    loss_case *c = context;
    return mb_cpu_cross_entropy_forward(c->logits, c->targets, c->rows, c->classes) * 0.25;
}

static double mse_objective(void *context) {
    loss_case *c = context;
    return mb_cpu_mse_forward(c->logits, c->float_targets, c->rows) * 0.25;
}

Test(gradcheck, cross_entropy_and_mse) {
    mb_rng rng;
    mb_rng_seed(&rng, 9);
    int32_t targets[] = {0, 6, 3, 3};
    loss_case c = {.targets = targets, .rows = 4, .classes = 7};
    c.logits = random_floats(&rng, 28, 3.0f);
    float *grad = malloc(28 * sizeof(float));
    memcpy(grad, c.logits, 28 * sizeof(float));
    mb_cpu_cross_entropy_backward(grad, targets, 4, 7, 0.25f);
    expect_gradient("cross entropy", c.logits, grad, 28, cross_entropy_objective, &c, 28, 1e-3f, &rng);
    /* uniform logits: loss = log(classes) per row */
    float uniform[7] = {0};
    int32_t one = 2;
    cr_assert_float_eq(mb_cpu_cross_entropy_forward(uniform, &one, 1, 7), log(7.0), 1e-6);
    float targets_f[] = {1.0f, -2.0f, 0.5f, 3.0f};
    c.float_targets = targets_f;
    float *dmse = malloc(4 * sizeof(float));
    mb_cpu_mse_backward(dmse, c.logits, targets_f, 4, 0.25f);
    expect_gradient("mse", c.logits, dmse, 4, mse_objective, &c, 4, 1e-3f, &rng);
}

/* ---- whole tiny models ---- */
typedef struct model_case {
    mb_model model;
    mb_cpu_model *cpu;
    mb_batch batch;
} model_case;

static double model_objective(void *context) {
    model_case *c = context;
    mb_forward_result result;
    mb_error err;
    cr_assert_eq(mb_cpu_forward(c->cpu, &c->batch, &result, &err), 0, "%s", err.message);
    return result.loss_sum / result.loss_count;
}

static void whole_model_gradcheck(mb_head_kind head, int num_labels, mb_pooling pooling, uint64_t seed) {
    mb_config config;
    mb_error err;
    cr_assert_eq(mb_config_preset(&config, "tiny", &err), 0);
    config.vocab_size = 50;
    config.hidden_size = 16;
    config.num_attention_heads = 2;
    config.intermediate_size = 24;
    config.num_hidden_layers = 3;
    config.local_attention = 4;
    config.pad_token_id = 3;
    config.head = head;
    config.num_labels = num_labels;
    config.classifier_pooling = pooling;
    config.initializer_range = 0.3;
    cr_assert_eq(mb_config_finalize(&config, &err), 0, "%s", err.message);
    model_case c;
    cr_assert_eq(mb_model_create(&c.model, &config, &err), 0);
    mb_params_init(&c.model.table, &config, c.model.params, seed);
    float *grads = calloc(c.model.table.total_numel, sizeof(float));
    cr_assert_eq(mb_cpu_model_create(&c.cpu, &config, &c.model.table, c.model.params, grads, &err), 0);
    int32_t cu[] = {0, 1, 8, 13};
    int32_t ids[13], labels[13];
    float sequence_labels[3] = {1, 0, num_labels > 1 ? 2 : 0.7f};
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    for (int i = 0; i < 13; i++) {
        ids[i] = (int32_t)mb_rng_below(&rng, 50);
        labels[i] = (i % 3 == 0) ? (int32_t)mb_rng_below(&rng, 50) : -100;
    }
    ids[5] = 3;
    if (num_labels == 1) sequence_labels[0] = 2.5f;
    c.batch = (mb_batch){13, 3, ids, cu, labels, sequence_labels};
    mb_forward_result result;
    cr_assert_eq(mb_cpu_forward(c.cpu, &c.batch, &result, &err), 0, "%s", err.message);
    cr_assert_eq(mb_cpu_backward(c.cpu, (float)(1.0 / result.loss_count), &err), 0, "%s", err.message);
    for (int i = 0; i < c.model.table.count; i++) {
        const mb_param_info *p = &c.model.table.params[i];
        expect_gradient(p->name, c.model.params + p->offset, grads + p->offset, p->numel, model_objective, &c, 24,
                        1e-2f, &rng);
    }
    mb_cpu_model_free(c.cpu);
    free(grads);
    mb_model_free(&c.model);
}

Test(gradcheck, whole_model_masked_lm) { whole_model_gradcheck(MB_HEAD_MASKED_LM, 2, MB_POOLING_MEAN, 11); }
Test(gradcheck, whole_model_classifier_cls) { whole_model_gradcheck(MB_HEAD_SEQUENCE_CLASSIFIER, 3, MB_POOLING_CLS, 12); }
Test(gradcheck, whole_model_regression_mean) {
    whole_model_gradcheck(MB_HEAD_SEQUENCE_CLASSIFIER, 1, MB_POOLING_MEAN, 13);
}
