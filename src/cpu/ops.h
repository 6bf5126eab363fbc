/* The CPU reference ops (fp32). Each op family lives in its own file, which states the math of forward and backward
 * at its top. These are the executable specification: the CUDA kernels are tested against these functions.
 *
 * Conventions: activations are row-major [tokens, features]; a Linear weight is [out, in] (y = x W^T + b), as in
 * PyTorch; a packed batch of B sequences is described by cu_seqlens[B+1] (cu_seqlens[0] = 0, cu_seqlens[B] = n).
 * Backward functions ACCUMULATE into parameter gradients (so micro-batches add up) and WRITE input gradients unless
 * their `accumulate_dx` flag says to add. Reductions over tokens run in a fixed order, so results do not depend on
 * the number of threads. */
#ifndef MB_CPU_OPS_H
#define MB_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "model/config.h"

/* matmul.c — Linear layers through BLAS. */
void mb_cpu_linear_forward(float *y, const float *x, const float *weight, const float *bias, int n, int in, int out);
void mb_cpu_linear_backward(float *dx, float *dweight, float *dbias, const float *dy, const float *x,
                            const float *weight, int n, int in, int out, int accumulate_dx);

/* layernorm.c — LayerNorm with optional bias (ModernBERT has none). mean/rstd are saved per row. */
void mb_cpu_layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *weight,
                              const float *bias, int n, int h, float eps);
void mb_cpu_layernorm_backward(float *dx, float *dweight, float *dbias, const float *dy, const float *x,
                               const float *mean, const float *rstd, const float *weight, int n, int h,
                               int accumulate_dx);

/* embedding.c — token embedding lookup; the backward skips pad_id (-1: skip nothing). */
void mb_cpu_embedding_forward(float *out, const int32_t *ids, const float *table, int n, int h);
void mb_cpu_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int n, int h, int pad_id);

/* rope.c — rotate-half RoPE on the Q and K blocks of a fused [n, 3H] qkv buffer, in place. positions[i] restarts at
 * 0 for each sequence. direction +1 rotates by +angle (forward), -1 by -angle (the backward of dQ and dK). */
void mb_cpu_positions(int32_t *positions, const int32_t *cu_seqlens, int num_seqs);
void mb_cpu_rope(float *qkv, const int32_t *positions, int n, int heads, int head_dim, double theta, int direction);

/* attention.c — softmax attention inside each sequence of a packed batch; window < 0: global (whole sequence),
 * else keys with |i - j| <= window. qkv is [n, 3H] (Q | K | V, heads contiguous), out [n, H], lse [n, heads]. */
void mb_cpu_attention_forward(float *out, float *lse, const float *qkv, const int32_t *cu_seqlens, int num_seqs,
                              int heads, int head_dim, int window);
void mb_cpu_attention_backward(float *dqkv, const float *dout, const float *out, const float *lse, const float *qkv,
                               const int32_t *cu_seqlens, int num_seqs, int heads, int head_dim, int window);

/* activation.c — elementwise activations and the GLU: y = act(u[:, :I]) * u[:, I:]. */
float mb_activation_forward(mb_activation activation, float x);
float mb_activation_derivative(mb_activation activation, float x);
void mb_cpu_activation_forward(float *y, const float *x, size_t count, mb_activation activation);
void mb_cpu_activation_backward(float *dx, const float *dy, const float *x, size_t count, mb_activation activation);
void mb_cpu_glu_forward(float *y, const float *u, int n, int inner, mb_activation activation);
void mb_cpu_glu_backward(float *du, const float *dy, const float *u, int n, int inner, mb_activation activation);

/* loss.c — cross-entropy over rows of logits (returns the SUM of per-row losses, in double), and its gradient
 * (softmax - onehot) * grad_scale written over the logits in place; MSE likewise with gradient 2 (p - t) * scale. */
double mb_cpu_cross_entropy_forward(const float *logits, const int32_t *targets, int rows, int classes);
void mb_cpu_cross_entropy_backward(float *logits_to_dlogits, const int32_t *targets, int rows, int classes,
                                   float grad_scale);
double mb_cpu_mse_forward(const float *predictions, const float *targets, int rows);
void mb_cpu_mse_backward(float *dpredictions, const float *predictions, const float *targets, int rows,
                         float grad_scale);

#endif
