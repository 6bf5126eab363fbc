/* sm_90a (Hopper) attention forward in the style of FlashAttention-3, for global layers (window < 0) at head_dim 64:
 * for query i of sequence [b, e) and head h,  s_ij = (q_i · k_j)/sqrt(64) over all j in [b, e),
 * lse_i = log Σ_j exp(s_ij) (natural log),  o_i = Σ_j exp(s_ij − lse_i) v_j  (bf16 out, fp32 softmax).
 * Same layouts and tile plan as cuda/attention.cu (qkv [n, 3H], out [n, H], lse [n, heads]); design notes in
 * docs/kernels/attention_wgmma.md. attention.cu decides when to call it (mb_attention_wgmma_forward_supports). */
#ifndef MB_CUDA_ATTENTION_WGMMA_FWD_H
#define MB_CUDA_ATTENTION_WGMMA_FWD_H

#include "attention_common.cuh"

/* The tile size of the plan attention.cu builds for this kernel (the kernel's 192-query work items take the plan's
 * slots t with 192·t inside the sequence; the others are skipped). */
constexpr int kWgmmaForwardTile = 128;

/* Whether the wgmma forward handles this call: head_dim 64, a global layer (window < 0), the current device of
 * compute capability 9.x and this binary carrying the kernel's sm_90a code. Queried on every call (no caching). */
bool mb_attention_wgmma_forward_supports(int head_dim, int window);

/* out [n, heads·64] bf16 and lse [n, heads] fp32 from qkv [n, 3·heads·64]; plan built for kWgmmaForwardTile.
 * Returns 0, or -1 with *err filled (unsupported shape, launch failure). Asynchronous on `stream`. One persistent
 * kernel (192-query work items over the plan's 128-query slots). */
int mb_attention_wgmma_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                               mb::attention_plan plan, int num_seqs, int n, int heads, int head_dim, int window,
                               cudaStream_t stream, mb_error *err);

/* The same for a subset of the query rows (the last layer on the head's rows, cuda/backend_cuda.cu): the queries of
 * sequence s are rows [cu_queries[s], cu_queries[s + 1]) of q (row stride heads·64: already rotated by RoPE), its keys
 * and values rows [cu_seqlens[s], cu_seqlens[s + 1]) of qkv. out [rows, heads·64] and lse [rows, heads] are indexed
 * like q; plan built over cu_queries for kWgmmaForwardTile. Always the persistent kernel. */
int mb_attention_wgmma_forward_rows(mb::bf16 *out, float *lse, const mb::bf16 *q, const mb::bf16 *qkv,
                                    const int32_t *cu_seqlens, const int32_t *cu_queries, mb::attention_plan plan,
                                    int num_seqs, int heads, int head_dim, int window, cudaStream_t stream,
                                    mb_error *err);

/* Device self-test of the kernel's building blocks, for debugging on a new machine: (1) S = Q·Kᵀ (64 × 128 over
 * d 64, Q and K through the swizzled shared layout and K-major descriptors), (2) O = P·V (64 × 64 over 128 keys, V
 * through the MN-major descriptors, P packed from accumulator registers), both against exact host sums, and (3) the
 * whole forward on a small packed batch (lengths 200, 1, 130, 64, 700; 2 heads), with a block per work item and with
 * 1 and 3 blocks walking all items, against a double-precision host reference.
 * Writes a one-paragraph report (max errors, first wrong element) into report[size]. Returns 0 when all pass,
 * -1 when one fails or a CUDA call fails, 1 when skipped (no sm_90a device / code). Synchronizes the device. */
extern "C" int mb_cuda_attention_wgmma_fwd_selftest(char *report, size_t size);

#endif
