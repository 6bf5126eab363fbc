/* StableAdamW against an independent double-precision reference written from the textbook form of the algorithm:
 * bias correction as β(1 − β^(t−1))/(1 − β^t) (the optimizer uses the (β^t − β)/(β^t − 1) form), plus a check of
 * the debiased first moment against ordinary Adam's m̂ = (1−β1)Σ β1^(t−k) g_k / (1 − β1^t). */
#include <criterion/criterion.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "train/stableadamw.h"

typedef struct reference {
    double param[16], m[16], v[16];
    size_t n;
    int t;
} reference;

/* One step of the reference in double. Returns the RMS. */
static double reference_step(reference *r, const double *g, double lr, double max_lr, double wd, bool decay) {
    const double b1 = 0.9, b2 = 0.98, eps = 1e-6;
    r->t++;
    double b1h = b1 * (1 - pow(b1, r->t - 1)) / (1 - pow(b1, r->t));
    double b2h = b2 * (1 - pow(b2, r->t - 1)) / (1 - pow(b2, r->t));
    double mean = 0;
    for (size_t i = 0; i < r->n; i++) {
        r->m[i] = b1h * r->m[i] + (1 - b1h) * g[i];
        r->v[i] = b2h * r->v[i] + (1 - b2h) * g[i] * g[i];
        mean += g[i] * g[i] / fmax(r->v[i], eps * eps) / (double)r->n;
    }
    double rms = sqrt(mean);
    double eta = rms > 1 ? lr / rms : lr;
    for (size_t i = 0; i < r->n; i++) {
        if (decay) r->param[i] *= 1 - eta / max_lr * wd;
        r->param[i] -= eta * r->m[i] / (sqrt(r->v[i]) + eps);
    }
    return rms;
}

typedef struct tensor {
    float param[16], grad[16], m[16], v[16];
} tensor;

static mb_adamw_param bind(tensor *x, size_t n, bool decay, const char *name) {
    memset(x->m, 0, sizeof x->m);
    memset(x->v, 0, sizeof x->v);
    return (mb_adamw_param){.name = name, .param = x->param, .grad = x->grad, .m = x->m, .v = x->v, .numel = n,
                            .decay = decay};
}

static void assert_close(double got, double want, double abs_tol, double rel_tol, const char *what, size_t i) {
    cr_assert(fabs(got - want) <= abs_tol + rel_tol * fabs(want), "%s[%zu]: got %.9g want %.9g", what, i, got, want);
}

Test(stableadamw, first_step_is_lr_times_sign) {
    const double g[6] = {0.5, -2.0, 1e-3, -1e-2, 3.0, -7e-4};
    tensor x;
    for (int i = 0; i < 6; i++) {
        x.param[i] = (float)(0.1 * (i + 1));
        x.grad[i] = (float)g[i];
    }
    mb_adamw_param p = bind(&x, 6, false, "w");
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, 1e-3, 0.0);
    double rms;
    mb_error err = {{0}};
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, 1e-3, &rms, &err), 0, "%s", err.message);
    cr_assert_eq(opt.step, 1);
    cr_assert(fabs(rms - 1.0) < 1e-6, "rms %g", rms);      /* v = g² at t = 1, all |g| >> eps */
    for (int i = 0; i < 6; i++) {
        double before = 0.1 * (i + 1), sign = g[i] > 0 ? 1 : -1;
        double exact = before - 1e-3 * g[i] / (fabs(g[i]) + 1e-6);
        assert_close(x.param[i], exact, 1e-9, 1e-6, "param", (size_t)i);
        /* ≈ lr·sign(g): off by lr·eps/|g| at most */
        assert_close(x.param[i], before - 1e-3 * sign, 1e-3 * 1e-6 / fabs(g[i]) + 1e-7, 0, "sign", (size_t)i);
        cr_assert_eq(x.m[i], (float)g[i], "m = g exactly at t = 1");
        cr_assert_eq(x.v[i], (float)g[i] * (float)g[i], "v = g² exactly at t = 1");
    }
}

Test(stableadamw, three_steps_match_reference_and_adam_bias_correction) {
    const size_t n = 5;
    const double grads[3][5] = {{0.3, -0.2, 0.05, 1.5, -0.7}, {-0.1, -0.4, 0.2, 1.0, 0.3}, {0.25, 0.1, -0.6, 0.8, 0.0}};
    const double lr = 2e-3, max_lr = 4e-3, wd = 0.1;
    reference r = {.n = n};
    tensor x;
    for (size_t i = 0; i < n; i++) x.param[i] = (float)(r.param[i] = 0.5 - 0.2 * (double)i);
    mb_adamw_param p = bind(&x, n, true, "encoder.layers.0.attn.Wqkv.weight");
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, max_lr, wd);
    mb_error err = {{0}};
    for (int step = 0; step < 3; step++) {
        for (size_t i = 0; i < n; i++) x.grad[i] = (float)grads[step][i];
        double rms, want_rms = reference_step(&r, grads[step], lr, max_lr, wd, true);
        cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, lr, &rms, &err), 0, "%s", err.message);
        assert_close(rms, want_rms, 0, 1e-6, "rms", (size_t)step);
        for (size_t i = 0; i < n; i++) {
            assert_close(x.m[i], r.m[i], 1e-7, 1e-5, "m", i);
            assert_close(x.v[i], r.v[i], 1e-9, 1e-5, "v", i);
            assert_close(x.param[i], r.param[i], 1e-7, 1e-6, "param", i);
        }
    }
    /* The folded debias makes m the bias-corrected Adam first moment. */
    for (size_t i = 0; i < n; i++) {
        double raw = 0;
        for (int k = 0; k < 3; k++) raw += 0.1 * pow(0.9, 2 - k) * grads[k][i];
        assert_close(x.m[i], raw / (1 - pow(0.9, 3)), 1e-7, 1e-5, "adam m-hat", i);
    }
    cr_assert_eq(opt.step, 3);
}

Test(stableadamw, update_and_decay_use_the_clipped_step_when_rms_exceeds_one) {
    const size_t n = 4;
    const double small[4] = {1e-3, -1e-3, 2e-3, 1e-3}, big[4] = {10.0, -10.0, 5.0, 8.0};
    const double lr = 1e-2, wd = 0.2;
    reference r = {.n = n};
    tensor x;
    for (size_t i = 0; i < n; i++) x.param[i] = (float)(r.param[i] = 1.0);
    mb_adamw_param p = bind(&x, n, true, "w");
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, lr, wd);
    mb_error err = {{0}};
    double rms;
    for (size_t i = 0; i < n; i++) x.grad[i] = (float)small[i];
    reference_step(&r, small, lr, lr, wd, true);
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, lr, &rms, &err), 0, "%s", err.message);
    for (size_t i = 0; i < n; i++) x.grad[i] = (float)big[i];
    double want_rms = reference_step(&r, big, lr, lr, wd, true);
    float before[4];
    memcpy(before, x.param, sizeof before);
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, lr, &rms, &err), 0, "%s", err.message);
    cr_assert(want_rms > 1.3, "the test needs a clipped step (reference rms %g)", want_rms);
    assert_close(rms, want_rms, 0, 1e-6, "rms", 0);
    double eta = lr / want_rms;
    for (size_t i = 0; i < n; i++) {
        assert_close(x.param[i], r.param[i], 1e-7, 1e-6, "param", i);
        /* decay by (1 - (η/max_lr)·λ) and a step of η times the Adam direction, both with the clipped η */
        double direction = x.m[i] / (sqrt(x.v[i]) + 1e-6);
        double want = before[i] * (1 - eta / lr * wd) - eta * direction;
        assert_close(x.param[i], want, 1e-7, 1e-6, "clipped step", i);
    }
}

Test(stableadamw, decay_only_on_flagged_tensors) {
    const size_t n = 3;
    tensor a, b, z;
    for (size_t i = 0; i < n; i++) {
        a.param[i] = b.param[i] = z.param[i] = (float)(1.0 + (double)i);
        a.grad[i] = b.grad[i] = (float)(0.5 - (double)i);
        z.grad[i] = 0.0f;
    }
    mb_adamw_param params[3] = {bind(&a, n, true, "w_decay"), bind(&b, n, false, "w_nodecay"),
                                bind(&z, n, true, "zero_grad")};
    const double lr = 0.05, max_lr = 0.1, wd = 0.5;
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, max_lr, wd);
    mb_error err = {{0}};
    cr_assert_eq(mb_stableadamw_step(&opt, params, 3, lr, NULL, &err), 0, "%s", err.message);
    double factor = 1 - lr / max_lr * wd;                        /* 0.75 */
    for (size_t i = 0; i < n; i++) {
        double theta = 1.0 + (double)i, g = 0.5 - (double)i;
        double adam = lr * g / (fabs(g) + 1e-6);
        assert_close(a.param[i], theta * factor - adam, 1e-7, 1e-6, "decayed", i);
        assert_close(b.param[i], theta - adam, 1e-7, 1e-6, "not decayed", i);
        /* zero gradient: only the decay acts */
        cr_assert_eq(z.param[i], (float)theta * (float)factor, "zero-grad decay %zu: %.9g", i, z.param[i]);
    }
}

Test(stableadamw, eps_behaviour_at_zero_and_tiny_gradients) {
    tensor x;
    const size_t n = 4;
    for (size_t i = 0; i < n; i++) {
        x.param[i] = 0.25f * (float)(i + 1);
        x.grad[i] = i < 2 ? 0.0f : 1e-7f;                       /* two zeros, two below eps */
    }
    mb_adamw_param p = bind(&x, n, false, "w");
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, 1e-3, 0.0);
    mb_error err = {{0}};
    double rms;
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, 1e-3, &rms, &err), 0, "%s", err.message);
    /* ratio g²/max(v, eps²) = 0 for zeros and (1e-7)²/(1e-6)² = 0.01 for the others -> rms = sqrt(0.02/4) */
    assert_close(rms, sqrt(0.02 / 4), 0, 1e-4, "rms", 0);
    for (size_t i = 0; i < n; i++) {
        cr_assert(isfinite(x.param[i]) && isfinite(x.m[i]) && isfinite(x.v[i]));
        double theta = 0.25 * (double)(i + 1);
        if (i < 2) {
            cr_assert_eq(x.param[i], (float)theta, "zero gradient must not move the parameter");
            cr_assert_eq(x.m[i], 0.0f);
            cr_assert_eq(x.v[i], 0.0f);
        } else {
            assert_close(x.param[i], theta - 1e-3 * 1e-7 / (1e-7 + 1e-6), 1e-9, 1e-6, "tiny", i);
        }
    }
}

Test(stableadamw, resume_from_saved_state_is_bit_identical) {
    enum { N = 7 };
    tensor straight, resumed;
    float grads[4][N];
    for (int s = 0; s < 4; s++)
        for (int i = 0; i < N; i++) grads[s][i] = (float)sin(1.7 * s + 0.9 * i);
    for (int i = 0; i < N; i++) straight.param[i] = (float)cos(0.3 * i);
    mb_adamw_param p = bind(&straight, N, true, "w");
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, 8e-4, 1e-2);
    mb_error err = {{0}};
    for (int s = 0; s < 4; s++) {
        if (s == 2) {                                      /* "checkpoint": copy params, moments and the counter */
            resumed = straight;
        }
        memcpy(straight.grad, grads[s], sizeof grads[s]);
        cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, 8e-4 * (s + 1) / 4, NULL, &err), 0, "%s", err.message);
    }
    mb_stableadamw opt2;
    mb_stableadamw_init(&opt2, 8e-4, 1e-2);
    opt2.step = 2;
    mb_adamw_param q = {.name = "w", .param = resumed.param, .grad = resumed.grad, .m = resumed.m, .v = resumed.v,
                        .numel = N, .decay = true};
    for (int s = 2; s < 4; s++) {
        memcpy(resumed.grad, grads[s], sizeof grads[s]);
        cr_assert_eq(mb_stableadamw_step(&opt2, &q, 1, 8e-4 * (s + 1) / 4, NULL, &err), 0, "%s", err.message);
    }
    cr_assert_eq(memcmp(straight.param, resumed.param, sizeof(float) * N), 0);
    cr_assert_eq(memcmp(straight.m, resumed.m, sizeof(float) * N), 0);
    cr_assert_eq(memcmp(straight.v, resumed.v, sizeof(float) * N), 0);
}

/* Runs 2 steps on a tensor big enough to use threads; returns a malloc'ed copy of param, m, v and the two RMS. */
static float *run_big(int threads, size_t n, double rms_out[2]) {
    omp_set_num_threads(threads);
    float *buffer = calloc(4 * n, sizeof(float));
    float *param = buffer, *grad = buffer + n, *m = buffer + 2 * n, *v = buffer + 3 * n;
    for (size_t i = 0; i < n; i++) param[i] = (float)sin(0.001 * (double)i);
    mb_adamw_param p = {.name = "big", .param = param, .grad = grad, .m = m, .v = v, .numel = n, .decay = true};
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, 1e-3, 1e-5);
    for (int s = 0; s < 2; s++) {
        for (size_t i = 0; i < n; i++) grad[i] = (float)(cos(0.37 * (double)i + s) * (1 + (double)(i % 97)));
        cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, 1e-3, &rms_out[s], NULL), 0);
    }
    return buffer;
}

Test(stableadamw, bit_identical_for_any_thread_count) {
    const size_t n = 200003;                                   /* not a multiple of the block count */
    double rms1[2], rms4[2], rms3[2];
    float *one = run_big(1, n, rms1), *four = run_big(4, n, rms4), *three = run_big(3, n, rms3);
    cr_assert_eq(memcmp(rms1, rms4, sizeof rms1), 0);
    cr_assert_eq(memcmp(rms1, rms3, sizeof rms1), 0);
    cr_assert_eq(memcmp(one, four, 4 * n * sizeof(float)), 0);
    cr_assert_eq(memcmp(one, three, 4 * n * sizeof(float)), 0);
    cr_assert(rms1[1] > 0 && rms1[1] != rms1[0]);
    free(one);
    free(four);
    free(three);
}

Test(stableadamw, grad_norm_is_global_l2) {
    tensor a, b;
    a.grad[0] = 3.0f;
    a.grad[1] = 4.0f;
    b.grad[0] = -12.0f;
    mb_adamw_param params[2] = {bind(&a, 2, true, "a"), bind(&b, 1, false, "b")};
    cr_assert_eq(mb_grad_norm(params, 2), 13.0);
    cr_assert_eq(mb_grad_norm(params, 1), 5.0);
    b.grad[0] = NAN;
    cr_assert(isnan(mb_grad_norm(params, 2)));
    b.grad[0] = INFINITY;
    cr_assert(!isfinite(mb_grad_norm(params, 2)));
}

Test(stableadamw, weight_decay_rule) {
    cr_assert(mb_param_decays("model.embeddings.tok_embeddings.weight", 2));
    cr_assert(mb_param_decays("model.layers.0.attn.Wqkv.weight", 2));
    cr_assert(mb_param_decays("head.dense.weight", 2));
    cr_assert(!mb_param_decays("model.layers.0.attn_norm.weight", 1));
    cr_assert(!mb_param_decays("decoder.bias", 1));
    cr_assert(!mb_param_decays("head.dense.bias", 2));       /* a 2-D ".bias" would still be excluded */
    cr_assert(mb_param_decays("bias", 2));                   /* no dot: not the ".bias" suffix */
    cr_assert(mb_param_decays("x.unbias", 2));
}

Test(stableadamw, invalid_settings_fail_without_side_effects) {
    tensor x;
    x.param[0] = 1.0f;
    x.grad[0] = 1.0f;
    mb_adamw_param p = bind(&x, 1, true, "w");
    mb_stableadamw opt;
    mb_stableadamw_init(&opt, 1e-3, 1e-5);
    mb_error err = {{0}};
    opt.beta1 = 1.0;
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, 1e-3, NULL, &err), -1);
    cr_assert(strstr(err.message, "betas") != NULL, "%s", err.message);
    opt.beta1 = 0.9;
    opt.max_lr = 0.0;
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, 1e-3, NULL, &err), -1);
    cr_assert(strstr(err.message, "max_lr") != NULL, "%s", err.message);
    opt.max_lr = 1e-3;
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, NAN, NULL, &err), -1);
    p.m = NULL;
    cr_assert_eq(mb_stableadamw_step(&opt, &p, 1, 1e-3, NULL, &err), -1);
    cr_assert(strstr(err.message, "(w)") != NULL, "%s", err.message);
    cr_assert_eq(opt.step, 0);
    cr_assert_eq(x.param[0], 1.0f);
}
