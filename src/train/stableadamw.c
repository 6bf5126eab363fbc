/* StableAdamW step and global gradient norm on fp32 host tensors (math in stableadamw.h, spec §5.3).
 *
 * Per tensor, two passes: (1) update m and v and accumulate g²/max(v, ε²) in REDUCE_BLOCKS fixed blocks; (2) with
 * the clipped step size η, apply the decoupled decay and the Adam step. Block boundaries depend only on numel, so
 * the double sums (and therefore every result) are the same for any number of OpenMP threads. */
#include "train/stableadamw.h"

#include <math.h>
#include <string.h>

enum {
    REDUCE_BLOCKS = 64,          /* fixed partition of each tensor for the deterministic reduction */
    PARALLEL_MIN_NUMEL = 1 << 15 /* below this, threads cost more than they save */
};

void mb_stableadamw_init(mb_stableadamw *opt, double max_lr, double weight_decay) {
    opt->beta1 = 0.9;
    opt->beta2 = 0.98;
    opt->eps = 1e-6;
    opt->weight_decay = weight_decay;
    opt->max_lr = max_lr;
    opt->step = 0;
}

bool mb_param_decays(const char *name, int ndim) {
    static const char suffix[] = ".bias";
    size_t length = strlen(name), suffix_length = sizeof suffix - 1;
    bool is_bias = length >= suffix_length && strcmp(name + length - suffix_length, suffix) == 0;
    return ndim >= 2 && !is_bias;
}

/* β̂ = (β^t − β)/(β^t − 1) = β(1 − β^(t−1))/(1 − β^t), as optimi's debias_beta (double). */
static double debias_beta(double beta, int64_t t) {
    double beta_t = pow(beta, (double)t);
    return (beta_t - beta) / (beta_t - 1.0);
}

/* torch's lerp: exact at both ends, weight in fp32. */
static inline float lerp_f32(float start, float end, float weight) {
    return fabsf(weight) < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

static void block_range(size_t numel, int block, size_t *begin, size_t *end) {
    size_t per_block = (numel + REDUCE_BLOCKS - 1) / REDUCE_BLOCKS;
    size_t b = (size_t)block * per_block, e = b + per_block;
    *begin = b < numel ? b : numel;
    *end = e < numel ? e : numel;
}

static double sum_blocks(const double *partial) {
    double total = 0.0;
    for (int b = 0; b < REDUCE_BLOCKS; b++) total += partial[b];
    return total;
}

/* Pass 1: moments and Σ g²/max(v, ε²) with the new v. */
static double update_moments(const mb_adamw_param *p, float beta1_comp, float beta2_hat, float beta2_comp,
                             float eps_sq) {
    double partial[REDUCE_BLOCKS];
    const float *grad = p->grad;
    float *m = p->m, *v = p->v;
#pragma omp parallel for schedule(static) if (p->numel >= PARALLEL_MIN_NUMEL)
    for (int block = 0; block < REDUCE_BLOCKS; block++) {
        size_t begin, end;
        block_range(p->numel, block, &begin, &end);
        double sum = 0.0;
        for (size_t i = begin; i < end; i++) {
            float g = grad[i], g2 = g * g;
            m[i] = lerp_f32(m[i], g, beta1_comp);
            float vi = v[i] * beta2_hat;
            vi = vi + beta2_comp * g2;
            v[i] = vi;
            sum += (double)(g2 / fmaxf(vi, eps_sq));
        }
        partial[block] = sum;
    }
    return sum_blocks(partial);
}

/* Pass 2: θ ← θ·decay_factor (when decaying), θ ← θ + neg_lr·m/(sqrt(v) + ε). */
static void update_params(const mb_adamw_param *p, bool apply_decay, float decay_factor, float neg_lr, float eps) {
    float *param = p->param;
    const float *m = p->m, *v = p->v;
#pragma omp parallel for schedule(static) if (p->numel >= PARALLEL_MIN_NUMEL)
    for (int block = 0; block < REDUCE_BLOCKS; block++) {
        size_t begin, end;
        block_range(p->numel, block, &begin, &end);
        for (size_t i = begin; i < end; i++) {
            float theta = param[i];
            if (apply_decay) theta = theta * decay_factor;
            float denom = sqrtf(v[i]) + eps;
            param[i] = theta + neg_lr * (m[i] / denom);
        }
    }
}

static int check_step(const mb_stableadamw *opt, const mb_adamw_param *params, size_t n_params, double lr,
                      mb_error *err) {
    if (!(opt->beta1 >= 0.0 && opt->beta1 < 1.0) || !(opt->beta2 >= 0.0 && opt->beta2 < 1.0))
        return mb_fail(err, "stableadamw: betas must be in [0, 1), got %g, %g", opt->beta1, opt->beta2);
    if (!(opt->eps >= 0.0) || !isfinite(opt->eps))
        return mb_fail(err, "stableadamw: eps must be >= 0, got %g", opt->eps);
    if (!(lr >= 0.0) || !isfinite(lr)) return mb_fail(err, "stableadamw: lr must be finite and >= 0, got %g", lr);
    if (!(opt->weight_decay >= 0.0) || !isfinite(opt->weight_decay))
        return mb_fail(err, "stableadamw: weight_decay must be >= 0, got %g", opt->weight_decay);
    if (opt->weight_decay != 0.0 && !(opt->max_lr > 0.0 && isfinite(opt->max_lr)))
        return mb_fail(err, "stableadamw: max_lr must be > 0 when weight_decay is set, got %g", opt->max_lr);
    if (opt->step < 0 || opt->step == INT64_MAX) return mb_fail(err, "stableadamw: invalid step counter %lld",
                                                              (long long)opt->step);
    for (size_t i = 0; i < n_params; i++) {
        const mb_adamw_param *p = &params[i];
        const char *name = p->name ? p->name : "?";
        if (p->numel == 0) return mb_fail(err, "stableadamw: tensor %zu (%s): numel is 0", i, name);
        if (!p->param || !p->grad || !p->m || !p->v)
            return mb_fail(err, "stableadamw: tensor %zu (%s): missing param/grad/m/v buffer", i, name);
    }
    return 0;
}

int mb_stableadamw_step(mb_stableadamw *opt, const mb_adamw_param *params, size_t n_params, double lr,
                        double *rms_out, mb_error *err) {
    if (check_step(opt, params, n_params, lr, err) != 0) return -1;
    int64_t t = ++opt->step;
    double beta1_hat = debias_beta(opt->beta1, t), beta2_hat = debias_beta(opt->beta2, t);
    float beta1_comp = (float)(1.0 - beta1_hat);
    float beta2_hat_f = (float)beta2_hat, beta2_comp = (float)(1.0 - beta2_hat);
    float eps = (float)opt->eps, eps_sq = (float)(opt->eps * opt->eps);
    for (size_t i = 0; i < n_params; i++) {
        const mb_adamw_param *p = &params[i];
        double ratio_sum = update_moments(p, beta1_comp, beta2_hat_f, beta2_comp, eps_sq);
        double rms = sqrt(ratio_sum / (double)p->numel);
        if (rms_out != NULL) rms_out[i] = rms;
        double step_size = lr / fmax(1.0, rms);                  /* η; fmax(1, NaN) = 1 like Python's max */
        bool apply_decay = p->decay && opt->weight_decay != 0.0;
        double decay_factor = apply_decay ? 1.0 - (step_size / opt->max_lr) * opt->weight_decay : 1.0;
        update_params(p, apply_decay, (float)decay_factor, (float)-step_size, eps);
    }
    return 0;
}

double mb_grad_norm(const mb_adamw_param *params, size_t n_params) {
    double total = 0.0;
    for (size_t t = 0; t < n_params; t++) {
        const mb_adamw_param *p = &params[t];
        double partial[REDUCE_BLOCKS];
        const float *grad = p->grad;
#pragma omp parallel for schedule(static) if (p->numel >= PARALLEL_MIN_NUMEL)
        for (int block = 0; block < REDUCE_BLOCKS; block++) {
            size_t begin, end;
            block_range(p->numel, block, &begin, &end);
            double sum = 0.0;
            for (size_t i = begin; i < end; i++) sum += (double)grad[i] * (double)grad[i];
            partial[block] = sum;
        }
        total += sum_blocks(partial);
    }
    return sqrt(total);
}
