/* StableAdamW with fully decoupled weight decay (spec §5.3; optimi/ModernBERT `decoupled_stableadamw`), CPU, fp32.
 *
 * One call = one optimizer step t (t = 1, 2, ...; one counter for the whole optimizer). For every tensor θ with
 * gradient g, first moment m and second moment v (fp32, zero before the first step):
 *   β̂1 = β1(1 − β1^(t−1))/(1 − β1^t),  β̂2 likewise        (debiasing folded into the betas; β̂ = 0 at t = 1)
 *   m   ← lerp(m, g, 1 − β̂1)                               (torch lerp formula)
 *   v   ← β̂2·v + (1 − β̂2)·g²
 *   RMS = sqrt(mean(g² / max(v, ε²)))                      (new v; ratios in fp32, the sum in double)
 *   η   = lr / max(1, RMS)                                  (per-tensor update clipping)
 *   θ   ← θ·(1 − (η/max_lr)·λ)                              (only tensors with decay = true, and λ ≠ 0)
 *   θ   ← θ − η·m/(sqrt(v) + ε)
 * Elementwise work is fp32 in the same operation order as the PyTorch foreach implementation (scalars computed in
 * double, rounded to float when applied). Results are bit-identical for any OpenMP thread count: each tensor is
 * reduced in 64 fixed contiguous blocks (sequential double sums), and the block sums are added in block order.
 * No gradient clipping: the per-tensor RMS clipping replaces it (spec §5.3).
 *
 * Decisions (spec leaves them open):
 *   - max_lr is the peak learning rate of the CURRENT phase: the trainer sets opt->max_lr = phase peak lr when a
 *     phase starts (so the effective per-step decay is exactly λ at the phase's peak and λ·lr_t/peak otherwise).
 *   - opt->step is NOT reset at a phase change (the original restores the optimizer state, and its
 *     restart_override only overwrites lr and weight_decay); it is part of the checkpoint together with m and v.
 *   - weight decay applies iff mb_param_decays(name, ndim): ndim >= 2 and the name does not end in ".bias"
 *     (original `param_groups_weight_decay` with filter_bias_norm_wd: LayerNorm weights and biases get λ = 0). */
#ifndef MB_STABLEADAMW_H
#define MB_STABLEADAMW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mb_adamw_param {
    const char *name;        /* for messages */
    float *param;            /* θ, fp32 master weights */
    const float *grad;       /* g (not modified) */
    float *m, *v;            /* moments, numel floats each, zero-initialised by the caller before step 1 */
    size_t numel;
    bool decay;              /* apply weight decay to this tensor (see mb_param_decays) */
} mb_adamw_param;

typedef struct mb_stableadamw {
    double beta1, beta2;     /* 0.9, 0.98 */
    double eps;              /* 1e-6 */
    double weight_decay;     /* λ for tensors with decay = true (1e-5 base recipe) */
    double max_lr;           /* decay normaliser: the peak lr of the current phase */
    int64_t step;            /* steps done so far; the next call uses t = step + 1 (checkpoint this) */
} mb_stableadamw;

/* Sets betas 0.9/0.98, eps 1e-6, the given max_lr and λ, step 0. */
void mb_stableadamw_init(mb_stableadamw *opt, double max_lr, double weight_decay);

/* One step with learning rate lr (= peak lr × schedule multiplier) over n_params tensors. rms_out, when non-NULL,
 * receives the per-tensor RMS (n_params doubles; > 1 means the tensor's update was clipped).
 * Fails (changing nothing) on invalid hyperparameters or tensors. Gradients must be finite: check mb_grad_norm
 * first and skip the step when it is not (a NaN gradient would propagate into m and v). */
int mb_stableadamw_step(mb_stableadamw *opt, const mb_adamw_param *params, size_t n_params, double lr,
                        double *rms_out, mb_error *err);

/* Global L2 norm of all gradients, sqrt(Σ g²) over every tensor, summed in double in a fixed order
 * (deterministic for any thread count). NaN/Inf if any gradient is non-finite. */
double mb_grad_norm(const mb_adamw_param *params, size_t n_params);

/* Weight-decay rule: true iff ndim >= 2 and name does not end in ".bias". */
bool mb_param_decays(const char *name, int ndim);

#ifdef __cplusplus
}
#endif

#endif
