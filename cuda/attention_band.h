/* Sliding-window ("band") attention for local layers: for query i of sequence [b, e) the visible keys are
 * j ∈ [b, e) with |i − j| <= window, 0 <= window <= 128 (64 at head_dim 128). Same math and layouts as
 * cuda/attention.cu (qkv [n, 3H] bf16 Q|K|V, out/dout [n, H] bf16, lse and delta [n, heads] fp32, lse in natural log,
 * s = q·k/sqrt(d)); every block visits only the key (query) strip its 64 tokens can see, loaded once.
 * Design and figures: docs/kernels/attention_band.md.
 *
 * The launchers take the tile plan that attention.cu builds for tiles of kBandTile tokens (plan.tile must equal it;
 * plan.blocks is the grid) and queue their kernels on `stream`; they return 0, or -1 with a message in err (bad
 * arguments, a shape that mb_attention_band_supports rejects, a failed launch). No workspace, no atomics: the backward
 * writes every element of dqkv exactly once, in a fixed order (bit-identical across runs). */
#ifndef MB_CUDA_ATTENTION_BAND_H
#define MB_CUDA_ATTENTION_BAND_H

#include "attention_common.cuh"

constexpr int kBandTile = 64; /* tokens per plan tile: one block = 64 tokens (4 warps × 16 rows) × one head */

/* Whether the band kernels handle this shape: head_dim 32 or 64 with 0 <= window <= 128, head_dim 128 with
 * 0 <= window <= 64 (a wider strip would not fit the registers / shared memory of one block). */
bool mb_attention_band_supports(int head_dim, int window);

/* out [n, heads·head_dim] and lse [n, heads] from qkv [n, 3·heads·head_dim]. */
int mb_attention_band_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                              mb::attention_plan plan, int num_seqs, int n, int heads, int head_dim, int window,
                              cudaStream_t stream, mb_error *err);

/* Writes all of dqkv (dQ | dK | dV) from dout, the forward's lse and delta = Σ_d dout·out [n, heads]; with a rope
 * table (mb_cuda_rope_table, else nullptr) dQ and dK come out with RoPE's backward applied (rope_back). */
int mb_attention_band_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                               const mb::bf16 *qkv, const int32_t *cu_seqlens, mb::attention_plan plan,
                               int num_seqs, int n, int heads, int head_dim, int window, const float2 *rope,
                               cudaStream_t stream, mb_error *err);

/* The Hopper kernels for the production shape (cuda/attention_band_wgmma.cu): head_dim 64, 0 <= window <= 64, on a
 * compute capability 9.x device with the sm_90a build, unless MB_ATTENTION_BAND_BWD=mma (backward) or
 * MB_ATTENTION_BAND_FWD=mma (forward), read per call, keeps the mma.sync kernels. MB_ATTENTION_BAND_BWD=recompute_ds
 * takes the ring backward in which both warpgroups form P and dS (the default forms them once).
 * mb_attention_band_forward and mb_attention_band_backward take them by themselves where they apply. */
bool mb_attention_band_wgmma_supports(int head_dim, int window, bool backward);

/* What mb_attention_band_forward computes, with one wgmma kernel that walks runs of consecutive tiles through a
 * ring of 64-token Q/K/V segments; arguments as there, head_dim 64. */
int mb_attention_band_wgmma_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                                    mb::attention_plan plan, int num_seqs, int heads, int window, cudaStream_t stream,
                                    mb_error *err);

/* What mb_attention_band_backward computes, with one wgmma kernel that walks runs of consecutive tiles through a
 * ring of 64-token segments (cuda/attention_band_wgmma.cu); arguments as there, head_dim 64. Deterministic, no
 * workspace. */
int mb_attention_band_wgmma_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                                     const mb::bf16 *qkv, const int32_t *cu_seqlens, mb::attention_plan plan,
                                     int num_seqs, int heads, int window, const float2 *rope, cudaStream_t stream,
                                     mb_error *err);

#endif
