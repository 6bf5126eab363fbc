/* FlashAttention-3-style attention backward on Hopper (wgmma, sm_90a): global layers (window < 0) at head_dim 64.
 * The math, the contract and the design are at the top of cuda/attention_wgmma_bwd.cu and in
 * docs/kernels/attention_wgmma_bwd.md. C++ linkage (called from attention.cu's dispatch), except the self-test. */
#ifndef MB_CUDA_ATTENTION_WGMMA_BWD_H
#define MB_CUDA_ATTENTION_WGMMA_BWD_H

#include "attention_common.cuh"

/* Keys per block: the tile size of the plan handed to mb_attention_wgmma_backward (two consumer warpgroups of 64
 * keys each, one 128-key K/V tile resident in shared memory; queries are visited in steps of 128). */
constexpr int kWgmmaBackwardTile = 128;
constexpr int kWgmmaBackwardStep = 128; /* queries per step of the query loop */

/* True when this kernel can run the call: head_dim 64, a global layer (window < 0), the current device is compute
 * capability 9.x and the kernel was built with sm_90a code (binaryVersion >= 90). Queries the device every call. */
bool mb_attention_wgmma_backward_supports(int head_dim, int window);

/* This kernel's dQ accumulator layout (the other backward kernels use [n, H]): head-major, [heads][rows][64] fp32
 * with rows = n + kWgmmaDqPadRows, so that each warp adds its 16 query rows of a head with ONE bulk reduce-add of
 * 4 KB (rows past a sequence's end receive exact zeros; the pad keeps the last sequence's 16 rows inside the buffer;
 * pad rows are never read). Within a row, the eight 32-byte blocks of 8 floats are permuted: block b of token t is
 * stored at block b ^ (t % 4), which makes the warp's 64-bit staging stores in shared memory conflict-free (the staged
 * bytes are copied as they are). mb_wgmma_dq_offset gives the float offset of elements d8..d8+7 (d8 % 8 == 0). */
constexpr int kWgmmaDqPadRows = 16;

__host__ __device__ inline size_t mb_wgmma_dq_rows(int n) { return (size_t)n + kWgmmaDqPadRows; }

__host__ __device__ inline size_t mb_wgmma_dq_offset(size_t token, int head, int d8, size_t rows) {
    return ((size_t)head * rows + token) * 64 + 8 * (size_t)((d8 / 8) ^ (int)(token % 4));
}

/* The tail split (session 17). A persistent grid of G blocks walks `items` work items in rounds of G; when items > G
 * and the last round holds only t = items mod G of them, those t items are cut into P pieces each (t·P <= G, so the
 * last round runs pieces about 1/P as long). Piece p takes the item's query steps p, p + P, p + 2P, ... A piece adds
 * its queries' dQ as any item does; its dK and dV (fp32) go to a partial slot, and the last piece of an item to finish
 * (a counter per item) sums the item's partials in piece order and stores dK and dV.
 * P = min(G / t, kWgmmaSplitMaxPieces, kWgmmaSplitCapacity / t, the fewest query steps of a tail item); P < 2 leaves
 * the tail whole. Uniform lengths (the benchmark, the 8192 phase) split; a tail of short sequences (sorted last)
 * mostly does not.
 * The plan kernel (attention.cu) writes the split words for the grid the backward will launch: [0] the first split
 * item (items when none), [1] P, [2] the grid it was planned for, [3] t, [4 .. 4 + t) the counters, zeroed. The
 * launcher refuses a split planned for another grid (wgmma_split::grid): pieces must fit in one round. */
constexpr int kWgmmaSplitMaxPieces = 4;
constexpr int kWgmmaSplitCapacity = 160;                   /* piece slots: t·P <= 160 */
constexpr int kWgmmaSplitWords = 4 + kWgmmaSplitCapacity;  /* int32 */
constexpr size_t kWgmmaSplitSlotFloats = 2 * 128 * 64;     /* one piece's dK and dV of a 128-key tile, fp32 */

/* Where the split lives (workspace of attention.cu): words [kWgmmaSplitWords] and partials [kWgmmaSplitCapacity]
 * [kWgmmaSplitSlotFloats]; grid: the blocks it was planned for (host side). words == nullptr: no split. */
struct wgmma_split {
    int32_t *words;
    float *partials;
    unsigned grid;
};

/* P for t = tail items of a grid of `grid` blocks, before the query-step limit (1: no split). */
__host__ __device__ inline int mb_wgmma_split_pieces(unsigned tail, unsigned grid) {
    if (tail == 0) return 1;
    unsigned pieces = grid / tail;
    if (pieces > (unsigned)kWgmmaSplitMaxPieces) pieces = kWgmmaSplitMaxPieces;
    if (pieces > kWgmmaSplitCapacity / tail) pieces = kWgmmaSplitCapacity / tail;
    return pieces < 1 ? 1 : (int)pieces;
}

/* t: the items of the last round, when there are more items than blocks (0: none). */
__host__ __device__ inline unsigned mb_wgmma_split_tail(unsigned items, unsigned grid) {
    return items > grid ? items % grid : 0;
}

/* Words [0, 4) for `items` work items on `grid` blocks whose tail items have at least fewest_steps query steps each
 * (the plan kernel, and the self-test's host plan); returns P (1: no split). The counters are the caller's. */
__host__ __device__ inline int mb_wgmma_split_words(int32_t *words, unsigned items, unsigned grid, int fewest_steps) {
    const unsigned tail = mb_wgmma_split_tail(items, grid);
    int pieces = mb_wgmma_split_pieces(tail, grid);
    if (fewest_steps < pieces) pieces = fewest_steps;
    const bool split = pieces > 1;
    words[0] = (int32_t)(split ? items - tail : items);
    words[1] = split ? pieces : 1;
    words[2] = (int32_t)grid;
    words[3] = (int32_t)tail;
    return split ? pieces : 1;
}

/* The grid mb_attention_wgmma_backward(_rows) launches for a plan of plan_blocks work items: one block per SM, or
 * one per item with MB_ATTENTION_WGMMA_BWD=per_tile. */
int mb_attention_wgmma_backward_grid(unsigned plan_blocks, unsigned *grid, mb_error *err);

/* Writes the dK and dV blocks of dqkv [n, 3H] for every token (dK = scale·Σ_i dS_ij q_i, dV = Σ_i P_ij dO_i, bf16)
 * and ADDS the unscaled Σ_j dS_ij k_j into dq_accum (the layout above, mb_wgmma_dq_rows(n) rows per head, zeroed by
 * the caller in rows < n; the caller's convert kernel writes dQ = scale·dq_accum). P_ij = exp(s_ij − lse_i),
 * dS = P ∘ (dP − delta_i), dP = dO·Vᵀ. `plan` must be built for tiles of kWgmmaBackwardTile tokens. With a rope
 * table (mb_cuda_rope_table, else nullptr) dK is stored with RoPE's backward applied (dQ's is the convert kernel's).
 * Returns 0, or -1 with err filled (bad arguments, failed launch). */
int mb_attention_wgmma_backward(mb::bf16 *dqkv, float *dq_accum, const mb::bf16 *dout, const float *lse,
                                const float *delta, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                                mb::attention_plan plan, wgmma_split split, int num_seqs, int n, int heads,
                                int head_dim, int window, const float2 *rope, cudaStream_t stream, mb_error *err);

/* The same for a subset of the query rows (the last layer on the head's rows, cuda/backend_cuda.cu): the queries of
 * sequence s are rows [cu_queries[s], cu_queries[s + 1]) of q (row stride heads·64, rotated by RoPE), of dout, lse and
 * delta, and of dq_accum (mb_wgmma_dq_rows(rows) rows per head, zeroed by the caller in rows < rows); its keys rows
 * [cu_seqlens[s], cu_seqlens[s + 1]) of qkv. dK and dV are written for the keys of every sequence with queries; the
 * rows of a sequence without any are not written (the caller zeroes them). `plan` is built over cu_seqlens. */
int mb_attention_wgmma_backward_rows(mb::bf16 *dqkv, float *dq_accum, const mb::bf16 *dout, const float *lse,
                                     const float *delta, const mb::bf16 *q, const mb::bf16 *qkv,
                                     const int32_t *cu_seqlens, const int32_t *cu_queries, mb::attention_plan plan,
                                     wgmma_split split, int num_seqs, int n, int rows, int heads, int head_dim,
                                     int window, const float2 *rope, cudaStream_t stream, mb_error *err);

/* Device self-test (synchronizes; allocates its own buffers). Part 1 runs the kernel's three wgmma tile products
 * (K-major m64n128 Sᵀ = X·Yᵀ, the register-A dV-style product over 8 k-steps with N-major B, and the dQ product with
 * M-major A and N-major B) on exact small-integer inputs and compares with a host loop (the error must be 0); part 2
 * runs the whole kernel on a packed batch (lengths 200, 65, 1, 130, 520; 2 heads) against a double-precision host
 * reference.
 * Writes a readable summary (max errors, first wrong row/column) into report. Returns 0 when everything matches,
 * 1 on a mismatch, 2 when the device or build cannot run sm_90a code (skipped), -1 on a CUDA error. */
extern "C" int mb_cuda_attention_wgmma_backward_selftest(char *report, size_t size);

#endif
