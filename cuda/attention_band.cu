/* Sliding-window (band) attention on tensor cores, forward and deterministic backward, for local layers.
 *
 * For query i of sequence [b, e) the visible keys are j ∈ [b, e) with |i − j| <= w; scale = 1/sqrt(d).
 * forward:  s_ij = (q_i · k_j)·scale,  lse_i = log Σ_j exp(s_ij),  o_i = Σ_j exp(s_ij − lse_i) v_j
 * backward: p_ij = exp(s_ij − lse_i),  dp_ij = do_i · v_j,  ds_ij = p_ij (dp_ij − D_i)  (D_i = do_i · o_i, given)
 *           dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i,  dv_j = Σ_i p_ij do_i
 *
 * Geometry. A block owns one plan tile [t0, t0 + 64) of a sequence (never straddling it) and one head; 4 warps own
 * 16 rows each. kPad (16, 64 or 128: the smallest >= w) fixes the STRIP: tokens [t0 − kPad, t0 + 64 + kPad), whose
 * row r is token t0 − kPad + r, rows outside the sequence zero-filled by cp.async. Warp k's rows t0 + 16k .. + 15
 * see only strip rows [16k, 16k + 16 + 2·kPad) (= tokens row − kPad .. row + 15 + kPad), i.e. kN = 2 + kPad/4
 * n-tiles of 8: at w = 64, 144 keys per 16 rows, of which 16·129 pairs are visible (90 %). Masks (−inf before the
 * exponential) are applied only on n-tiles that cross the window edge or, for warps near a sequence end, everywhere.
 * Products are mma.sync m16n8k16 (bf16 in, fp32 accumulate) through cuda/attention_mma.cuh.
 *
 * Forward (one kernel): Q tile + K strip (cp.async group 0), V strip (group 1, lands during QKᵀ and the softmax).
 * Each warp holds its 16 × 8kN scores in registers: one pass, no online rescaling (max, exp2, sum, then P·V);
 * lse_i = (max·scale·log2 e + log2 Σ) · ln 2.
 *
 * Backward (one kernel, no atomics): the strip of Q, dO, lse, D and K, V serves both halves of the tile's work,
 * because the symmetric window makes "keys seen by the tile's queries" and "queries that see the tile's keys" the same
 * strip. Phase 1 (dK, dV of the tile's 64 keys): K, V fragments of the warp's 16 keys in registers, loop over chunks
 * of kC query n-tiles: Sᵀ = K·Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2 e − lse·log2 e), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ(dPᵀ − D),
 * dV += Pᵀ·dO, dK += dSᵀ·Q. Phase 2 (dQ of the tile's 64 queries): S = Q·Kᵀ, P, dP = dO·Vᵀ, dS, dQ += dS·K. P is
 * thus computed twice per pair (7 tile products in all) instead of reduced across blocks. cp.async group 0 holds
 * what phase 1 reads (Q, dO, lse, D strips, K and V of the tile's own rows); group 1 the rest of the K, V strips,
 * landing during phase 1. Each element of dqkv is written once, by the warp owning its row.
 *
 * Grid: the plan of cuda/attention_common.cuh for tiles of kBandTile tokens (block x = tile x / heads, head x % heads,
 * longest sequences first); spare blocks return at once.
 *
 * Versions: v2 (default) = band2_forward_kernel (three cp.async groups) and, at head_dim <= 64 with window > 16,
 * band2_backward_kernel (phase 2 reuses phase 1's dS of the tile's own 64 × 64 centre); MB_ATTENTION_BAND=v1 (read per
 * call) selects the round-1 kernels band_forward_kernel / band_backward_kernel. */
#include "attention_band.h"

#include "attention_mma.cuh"

#include <stdlib.h>
#include <string.h>

namespace {

constexpr int kBandWarps = kBandTile / 16; /* one warp per 16 rows */
constexpr int kBandThreads = kBandWarps * mb::kWarpSize;
static_assert(kBandTile % 16 == 0, "warps own 16 rows each");

/* Shared memory per SM and per-block reservation on sm_90 (228 KiB, 1 KiB): used only to pick the launch-bounds
 * block count (the register cap); sm_80 runs fewer blocks per SM with the same code. */
constexpr size_t kSharedPerSm = 228 * 1024, kSharedReserved = 1024;

/* Blocks per SM that both the shared memory and an estimate of the registers per thread allow (1..4): the
 * __launch_bounds__ minimum, i.e. a register cap of 65536 / (blocks · 128). */
constexpr int blocks_per_sm(size_t shared_bytes, int registers) {
    int by_shared = (int)(kSharedPerSm / (shared_bytes + kSharedReserved));
    int by_registers = 65536 / (kBandThreads * registers);
    int blocks = by_shared < by_registers ? by_shared : by_registers;
    return blocks < 1 ? 1 : (blocks > 4 ? 4 : blocks);
}

template <int D, int kPad>
struct band {
    static_assert(kPad % 8 == 0 && kPad >= 8, "the strip pad is whole n-tile pairs");
    static constexpr int stride = shape<D>::stride;             /* bf16 per shared row (16-byte pad) */
    static constexpr int strip = kBandTile + 2 * kPad;          /* rows of a strip */
    static constexpr int n_tiles = (16 + 2 * kPad) / 8;         /* strip n-tiles one warp's 16 rows meet */
    static_assert(n_tiles % 2 == 0, "P·V consumes n-tiles in pairs");
    /* backward: query / key n-tiles per chunk (kC·4 fp32 each of S and dP live at once) */
    static constexpr int chunk = D > 64 ? 2 : (n_tiles % 6 == 0 ? 6 : 2);
    static constexpr bool kv_in_registers = D <= 64; /* phase 1's K, V fragments (D = 128: re-read per chunk) */
    static constexpr size_t fwd_bytes = (size_t)(kBandTile + 2 * strip) * stride * sizeof(mb::bf16);
    static constexpr size_t bwd_bytes = 4 * (size_t)strip * stride * sizeof(mb::bf16) + 2 * (size_t)strip * sizeof(float);
    /* register estimates (accumulators + fragments + ~40 for addresses and temporaries) */
    static constexpr int fwd_registers = 4 * n_tiles + D / 2 + D / 4 + 40;
    static constexpr int bwd_registers = D + (kv_in_registers ? D / 2 : 0) + 10 * chunk + 40;
    static constexpr int fwd_blocks = blocks_per_sm(fwd_bytes, fwd_registers);
    static constexpr int bwd_blocks = blocks_per_sm(bwd_bytes, bwd_registers);
};

/* ---- loads ---- */

/* Queues rows [r_begin, r_end) of a strip whose row r holds token base + r of a [*, D] slice (row stride in
 * elements); tokens outside [lo, hi) become zeros (src-size 0: their source, the slice start, is never read). */
template <int D>
__device__ __forceinline__ void load_strip_async(mb::bf16 *dst, const mb::bf16 *src, size_t row_stride, int base,
                                                 int lo, int hi, int r_begin, int r_end) {
    constexpr int pieces = D / 8;
    const int count = (r_end - r_begin) * pieces;
    for (int c = threadIdx.x; c < count; c += kBandThreads) {
        int r = r_begin + c / pieces, k = c % pieces, token = base + r;
        bool valid = token >= lo && token < hi;
        const mb::bf16 *from = valid ? src + (size_t)token * row_stride + k * 8 : src;
        cp_async_16(dst + r * shape<D>::stride + k * 8, from, valid);
    }
}

/* The same for one float per token (lse or D of one head: element stride `stride`), rows [0, rows). */
__device__ __forceinline__ void load_strip_floats_async(float *dst, const float *src, int stride, int base, int lo,
                                                        int hi, int rows) {
    for (int r = threadIdx.x; r < rows; r += kBandThreads) {
        int token = base + r;
        bool valid = token >= lo && token < hi;
        cp_async_4(dst + r, valid ? src + (size_t)token * stride : src, valid);
    }
}

/* ---- one warp's part of the band ---- */

/* A warp's 16 rows (queries in the forward and dQ phase, keys in the dK/dV phase) and the strip columns they meet:
 * column c (0 <= c < 8·kN) is token strip0 + c. */
struct warp_band {
    int row0;      /* token of the warp's first row */
    int strip0;    /* token of its first strip column: row0 − kPad */
    int seq_begin, seq_end;
    bool interior; /* every strip column of the warp is inside the sequence */
};

template <int kPad, int kN>
__device__ __forceinline__ warp_band make_warp_band(const tile_position &t, int warp) {
    warp_band b;
    b.row0 = t.start + 16 * warp;
    b.strip0 = b.row0 - kPad;
    b.seq_begin = t.seq_begin;
    b.seq_end = t.seq_end;
    b.interior = b.strip0 >= t.seq_begin && b.strip0 + 8 * kN <= t.seq_end;
    return b;
}

/* Whether n-tile j (columns strip0 + 8j .. + 7) against rows row0 .. row0 + 15 holds a pair outside the window or a
 * column outside the sequence. column − row = 8j + x − kPad − r with x ∈ [0, 8), r ∈ [0, 16). Warp-uniform. */
template <int kPad>
__device__ __forceinline__ bool tile_needs_mask(int j, int window, bool interior) {
    return !interior || 8 * j + 7 - kPad > window || kPad + 15 - 8 * j > window;
}

/* s[j] (n-tiles j0 + j of the warp's strip, accumulator layout) = −inf where the column is outside the sequence or
 * farther than `window` from the row. Rows past the tile are left alone: they are never stored. */
template <int kPad, int kN>
__device__ __forceinline__ void mask_band(float s[kN][4], int j0, const warp_band &b, int window) {
    const int lane = threadIdx.x % mb::kWarpSize, quad = lane % 4, row_a = b.row0 + lane / 4;
#pragma unroll
    for (int j = 0; j < kN; j++) {
        if (!tile_needs_mask<kPad>(j0 + j, window, b.interior)) continue;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int row = row_a + 8 * (e / 2), column = b.strip0 + 8 * (j0 + j) + 2 * quad + (e & 1);
            if (!(column >= b.seq_begin && column < b.seq_end && abs(column - row) <= window)) s[j][e] = -INFINITY;
        }
    }
}

/* ---- forward ---- */

template <int D, int kPad>
__global__ void __launch_bounds__(kBandThreads, band<D, kPad>::fwd_blocks)
    band_forward_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                        const int32_t *seq_first, const int32_t *tile_seq, int num_seqs, int heads, int window,
                        float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kN = geo::n_tiles;
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *k_strip = q_tile + kBandTile * kStride, *v_strip = k_strip + geo::strip * kStride;
    tile_position t;
    int head;
    if (!find_tile(&t, &head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kBandTile)) return;
    const int hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    const int base = t.start - kPad; /* token of strip row 0 */
    load_strip_async<D>(q_tile, q_base, qkv_stride, t.start, t.seq_begin, t.seq_end, 0, kBandTile);
    load_strip_async<D>(k_strip, k_base, qkv_stride, base, t.seq_begin, t.seq_end, 0, geo::strip);
    cp_async_commit();
    load_strip_async<D>(v_strip, v_base, qkv_stride, base, t.seq_begin, t.seq_end, 0, geo::strip);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const warp_band b = make_warp_band<kPad, kN>(t, warp);
    const bool active = b.row0 < t.end; /* false: the warp's rows are past a short tile */
    float s[kN][4];                     /* scores, then P (fp32) */
    float row_sum[2], row_ref[2];       /* per row half: Σ p and the subtracted max (log2 units) */
    zero<kN>(s);
    row_sum[0] = row_sum[1] = 1.0f;
    row_ref[0] = row_ref[1] = 0.0f;

    cp_async_wait<1>(); /* Q and K */
    __syncthreads();
    if (active) {
        uint32_t q_frag[shape<D>::k_steps][4];
#pragma unroll
        for (int ks = 0; ks < shape<D>::k_steps; ks++) load_a<kStride>(q_frag[ks], q_tile, 16 * warp, ks * 16);
        scores_reg<D, kN>(s, q_frag, k_strip + 16 * warp * kStride);
        mask_band<kPad, kN>(s, 0, b, window);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float row_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < kN; j++) row_max = fmaxf(row_max, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
            /* a row with nothing visible (only rows past the sequence, never stored) subtracts 0 */
            const float reference = row_max == -INFINITY ? 0.0f : row_max * scale_log2;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < kN; j++)
#pragma unroll
                for (int e = 2 * half; e < 2 * half + 2; e++) {
                    float p = fast_exp2(fmaf(s[j][e], scale_log2, -reference)); /* −inf (masked) -> 0 */
                    s[j][e] = p;
                    sum += p;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            row_sum[half] = sum;
            row_ref[half] = reference;
        }
    }
    cp_async_wait<0>(); /* V */
    __syncthreads();
    if (!active) return; /* no barrier follows */
    float o[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(o);
    accumulate_pv<D, kN>(o, s, v_strip + 16 * warp * kStride);
    const int row_a = b.row0 + lane / 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const float inverse = 1.0f / row_sum[half];
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
            o[dt][2 * half] *= inverse;
            o[dt][2 * half + 1] *= inverse;
        }
        const int query = row_a + 8 * half;
        if (query < t.end && lane % 4 == 0)
            lse[(size_t)query * heads + head] = (row_ref[half] + log2f(row_sum[half])) * kLn2;
    }
    store_rows<D>(out + head * D, hidden, o, row_a, t.end, 1.0f);
}

/* ---- backward ---- */

/* Phase 1: dK and dV of the warp's 16 keys (rows kPad + 16·warp of the K, V strips) over the queries of strip rows
 * [16·warp, 16·warp + 8·kN), chunk by chunk. */
template <int D, int kPad>
__device__ __forceinline__ void band_dkdv(mb::bf16 *dk_out, mb::bf16 *dv_out, size_t row_stride, const warp_band &b,
                                          int row_end, const mb::bf16 *q_strip, const mb::bf16 *do_strip,
                                          const mb::bf16 *k_strip, const mb::bf16 *v_strip, const float *lse_strip,
                                          const float *delta_strip, int warp, int window, float scale,
                                          float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kN = geo::n_tiles, kC = geo::chunk;
    const int lane = threadIdx.x % mb::kWarpSize, quad = lane % 4;
    const int own_row = kPad + 16 * warp; /* strip row of the warp's first key */
    uint32_t k_frag[geo::kv_in_registers ? shape<D>::k_steps : 1][4], v_frag[geo::kv_in_registers ? shape<D>::k_steps : 1][4];
    if constexpr (geo::kv_in_registers) {
#pragma unroll
        for (int ks = 0; ks < shape<D>::k_steps; ks++) {
            load_a<kStride>(k_frag[ks], k_strip, own_row, ks * 16);
            load_a<kStride>(v_frag[ks], v_strip, own_row, ks * 16);
        }
    }
    float dk[shape<D>::d_tiles][4], dv[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dk);
    zero<shape<D>::d_tiles>(dv);
    const float *lse_cols = lse_strip + 16 * warp + 2 * quad, *delta_cols = delta_strip + 16 * warp + 2 * quad;
#pragma unroll
    for (int j0 = 0; j0 < kN; j0 += kC) {
        const mb::bf16 *q_rows = q_strip + (16 * warp + 8 * j0) * kStride;
        const mb::bf16 *do_rows = do_strip + (16 * warp + 8 * j0) * kStride;
        float st[kC][4], dpt[kC][4]; /* transposed: rows are the warp's keys, columns the chunk's queries */
        zero<kC>(st);
        zero<kC>(dpt);
        if constexpr (geo::kv_in_registers) scores_reg<D, kC>(st, k_frag, q_rows);
        else scores<D, kC>(st, k_strip, own_row, q_rows);
        mask_band<kPad, kC>(st, j0, b, window);
        uint32_t p_pk[kC][2], ds_pk[kC][2];
#pragma unroll
        for (int j = 0; j < kC; j++) {
            const float lse0 = lse_cols[8 * (j0 + j)] * kLog2e, lse1 = lse_cols[8 * (j0 + j) + 1] * kLog2e;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                st[j][2 * half] = fast_exp2(fmaf(st[j][2 * half], scale_log2, -lse0));
                st[j][2 * half + 1] = fast_exp2(fmaf(st[j][2 * half + 1], scale_log2, -lse1));
                p_pk[j][half] = mb::pack_bf16x2(st[j][2 * half], st[j][2 * half + 1]);
            }
        }
        if constexpr (geo::kv_in_registers) scores_reg<D, kC>(dpt, v_frag, do_rows);
        else scores<D, kC>(dpt, v_strip, own_row, do_rows);
#pragma unroll
        for (int j = 0; j < kC; j++) {
            const float delta0 = delta_cols[8 * (j0 + j)], delta1 = delta_cols[8 * (j0 + j) + 1];
#pragma unroll
            for (int half = 0; half < 2; half++)
                ds_pk[j][half] = mb::pack_bf16x2(st[j][2 * half] * (dpt[j][2 * half] - delta0),
                                                 st[j][2 * half + 1] * (dpt[j][2 * half + 1] - delta1));
        }
        accumulate_packed<D, kC>(dv, p_pk, do_rows);
        accumulate_packed<D, kC>(dk, ds_pk, q_rows);
    }
    const int key_a = b.row0 + lane / 4;
    store_rows<D>(dk_out, row_stride, dk, key_a, row_end, scale);
    store_rows<D>(dv_out, row_stride, dv, key_a, row_end, 1.0f);
}

/* Phase 2: dQ of the warp's 16 queries (rows kPad + 16·warp of the Q, dO, lse, D strips) over the keys of strip rows
 * [16·warp, 16·warp + 8·kN), chunk by chunk. */
template <int D, int kPad>
__device__ __forceinline__ void band_dq(mb::bf16 *dq_out, size_t row_stride, const warp_band &b, int row_end,
                                        const mb::bf16 *q_strip, const mb::bf16 *do_strip, const mb::bf16 *k_strip,
                                        const mb::bf16 *v_strip, const float *lse_strip, const float *delta_strip,
                                        int warp, int window, float scale, float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kN = geo::n_tiles, kC = geo::chunk;
    const int lane = threadIdx.x % mb::kWarpSize;
    const int own_row = kPad + 16 * warp; /* strip row of the warp's first query */
    uint32_t q_frag[shape<D>::k_steps][4], do_frag[shape<D>::k_steps][4];
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++) {
        load_a<kStride>(q_frag[ks], q_strip, own_row, ks * 16);
        load_a<kStride>(do_frag[ks], do_strip, own_row, ks * 16);
    }
    float row_lse[2], row_delta[2]; /* zero-filled past the sequence: those rows are never stored */
#pragma unroll
    for (int half = 0; half < 2; half++) {
        row_lse[half] = lse_strip[own_row + lane / 4 + 8 * half] * kLog2e;
        row_delta[half] = delta_strip[own_row + lane / 4 + 8 * half];
    }
    float dq[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dq);
#pragma unroll
    for (int j0 = 0; j0 < kN; j0 += kC) {
        const mb::bf16 *k_rows = k_strip + (16 * warp + 8 * j0) * kStride;
        const mb::bf16 *v_rows = v_strip + (16 * warp + 8 * j0) * kStride;
        float s[kC][4], dp[kC][4];
        zero<kC>(s);
        zero<kC>(dp);
        scores_reg<D, kC>(s, q_frag, k_rows);
        mask_band<kPad, kC>(s, j0, b, window);
        scores_reg<D, kC>(dp, do_frag, v_rows);
#pragma unroll
        for (int j = 0; j < kC; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int half = e / 2;
                float p = fast_exp2(fmaf(s[j][e], scale_log2, -row_lse[half]));
                s[j][e] = p * (dp[j][e] - row_delta[half]); /* dS */
            }
        accumulate_pv<D, kC>(dq, s, k_rows);
    }
    store_rows<D>(dq_out, row_stride, dq, b.row0 + lane / 4, row_end, scale);
}

template <int D, int kPad>
__global__ void __launch_bounds__(kBandThreads, band<D, kPad>::bwd_blocks)
    band_backward_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                         const mb::bf16 *qkv, const int32_t *cu_seqlens, const int32_t *seq_first,
                         const int32_t *tile_seq, int num_seqs, int heads, int window, float scale, float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kStrip = geo::strip, kN = geo::n_tiles;
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_strip = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *do_strip = q_strip + kStrip * kStride, *k_strip = do_strip + kStrip * kStride;
    mb::bf16 *v_strip = k_strip + kStrip * kStride;
    float *lse_strip = reinterpret_cast<float *>(v_strip + kStrip * kStride), *delta_strip = lse_strip + kStrip;
    tile_position t;
    int head;
    if (!find_tile(&t, &head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kBandTile)) return;
    const int hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    const int base = t.start - kPad, lo = t.seq_begin, hi = t.seq_end;
    /* group 0: what phase 1 reads (the query side of the strip, K and V of the tile's own 64 rows) */
    load_strip_async<D>(q_strip, q_base, qkv_stride, base, lo, hi, 0, kStrip);
    load_strip_async<D>(do_strip, dout + head * D, hidden, base, lo, hi, 0, kStrip);
    load_strip_async<D>(k_strip, k_base, qkv_stride, base, lo, hi, kPad, kPad + kBandTile);
    load_strip_async<D>(v_strip, v_base, qkv_stride, base, lo, hi, kPad, kPad + kBandTile);
    load_strip_floats_async(lse_strip, lse + head, heads, base, lo, hi, kStrip);
    load_strip_floats_async(delta_strip, delta + head, heads, base, lo, hi, kStrip);
    cp_async_commit();
    /* group 1: the rest of the K and V strips (phase 2) */
    load_strip_async<D>(k_strip, k_base, qkv_stride, base, lo, hi, 0, kPad);
    load_strip_async<D>(k_strip, k_base, qkv_stride, base, lo, hi, kPad + kBandTile, kStrip);
    load_strip_async<D>(v_strip, v_base, qkv_stride, base, lo, hi, 0, kPad);
    load_strip_async<D>(v_strip, v_base, qkv_stride, base, lo, hi, kPad + kBandTile, kStrip);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize;
    const warp_band b = make_warp_band<kPad, kN>(t, warp);
    const bool active = b.row0 < t.end; /* false: the warp's rows are past a short tile */
    cp_async_wait<1>();
    __syncthreads();
    if (active)
        band_dkdv<D, kPad>(dqkv + hidden + head * D, dqkv + 2 * hidden + head * D, qkv_stride, b, t.end, q_strip,
                           do_strip, k_strip, v_strip, lse_strip, delta_strip, warp, window, scale, scale_log2);
    cp_async_wait<0>();
    __syncthreads();
    if (active)
        band_dq<D, kPad>(dqkv + head * D, qkv_stride, b, t.end, q_strip, do_strip, k_strip, v_strip, lse_strip,
                         delta_strip, warp, window, scale, scale_log2);
}

/* ---- backward v2 (default; MB_ATTENTION_BAND=v1 selects the kernel above) ----
 * The same two phases, with three changes (head_dim <= 64, kPad >= 64: every warp's strip then covers the whole
 * centre, the 64 × 64 block of the tile's own queries and keys):
 *  - phase 2 does not recompute the centre: phase 1 stores its dSᵀ for the centre (bf16, [key][query]) in shared
 *    memory (over V's centre rows at head_dim 64: phase 1 holds V's fragments in registers and phase 2 needs V only
 *    outside the centre), and phase 2 reads it back as A fragments (ldmatrix .trans) for dQ += dS·K. Per warp at
 *    w = 64: 440 tile products instead of 504, 40 exponentials instead of 72 in phase 2;
 *  - three cp.async groups: the first phase-1 chunks run while the rest of the Q, dO strips land;
 *  - loads issue one cp.async per 16 bytes with a fixed column per thread (fewer integer instructions).
 * dS is formed once per pair (from fp32 P, as in v1) and rounded to bf16 once: the centre's dQ uses the same bf16
 * values the v1 kernel would have formed, up to the order of the sums in S and dP. */

/* Shapes the v2 backward takes (the others keep v1). */
template <int D, int kPad>
__host__ __device__ constexpr bool band2_supported() { return D <= 64 && kPad >= 64 && band<D, kPad>::kv_in_registers; }

template <int D, int kPad>
struct band2 {
    using geo = band<D, kPad>;
    static constexpr int chunks = geo::n_tiles / geo::chunk;
    static_assert(geo::n_tiles % geo::chunk == 0, "whole chunks");
    static constexpr int early_chunks = (chunks + 2) / 3; /* phase-1 chunks that need only cp.async group 0 */
    /* strip rows those chunks read: warp 3's columns start at row 48 */
    static constexpr int early_rows = 16 * (kBandWarps - 1) + 8 * geo::chunk * early_chunks;
    static_assert(early_rows <= geo::strip, "group 0 inside the strip");
    static constexpr int ds_stride = kBandTile + 8;                 /* bf16 per dSᵀ row (16-byte pad) */
    static constexpr bool ds_overlay = geo::stride == ds_stride;    /* dSᵀ centre over V's centre rows (D = 64) */
    static constexpr size_t ds_bytes = (size_t)kBandTile * ds_stride * sizeof(mb::bf16);
    static constexpr size_t bytes = geo::bwd_bytes + (ds_overlay ? 0 : ds_bytes);
    static constexpr int off_groups = (2 * kPad + 16 - kBandTile) / 16; /* 16-key groups outside the centre */
};

/* Rows [r_begin, r_end) of a strip whose row r holds token base + r (zeros outside [lo, hi)): thread t always copies
 * the 16 bytes at column 8·(t % (D/8)), rows step by kBandThreads / (D/8). */
template <int D>
__device__ __forceinline__ void load_strip_rows(mb::bf16 *dst, const mb::bf16 *src, size_t row_stride, int base,
                                                int lo, int hi, int r_begin, int r_end) {
    constexpr int pieces = D / 8, step = kBandThreads / pieces;
    static_assert(kBandThreads % pieces == 0, "whole rows per pass");
    const int column = (threadIdx.x % pieces) * 8;
    int r = r_begin + threadIdx.x / pieces;
    int64_t offset = (int64_t)(base + r) * (int64_t)row_stride + column;
    const int64_t advance = (int64_t)step * (int64_t)row_stride;
#pragma unroll 4
    for (; r < r_end; r += step, offset += advance) {
        const int token = base + r;
        const bool valid = token >= lo && token < hi;
        cp_async_16(dst + r * shape<D>::stride + column, valid ? src + offset : src, valid);
    }
}

/* A fragment (16×16) of A = Tᵀ at (row0, col0), T stored row-major [col][row] (A's columns are T's rows). */
template <int kStride>
__device__ __forceinline__ void load_a_transposed(uint32_t a[4], const mb::bf16 *tile, int row0, int col0) {
    const int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4_trans(a, tile + (col0 + (lane & 7) + ((lane >> 4) << 3)) * kStride + row0 + ((lane >> 3) & 1) * 8);
}

/* mask_band, plus rows (the phase-1 keys) past the sequence: their dSᵀ reaches dQ through the centre, so it must be
 * exactly 0 there (v1 never used those rows). Such rows make the warp non-interior, so the unmasked path is unchanged. */
template <int kPad, int kN>
__device__ __forceinline__ void mask_band_rows(float s[kN][4], int j0, const warp_band &b, int window) {
    const int lane = threadIdx.x % mb::kWarpSize, quad = lane % 4, row_a = b.row0 + lane / 4;
#pragma unroll
    for (int j = 0; j < kN; j++) {
        if (!tile_needs_mask<kPad>(j0 + j, window, b.interior)) continue;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int row = row_a + 8 * (e / 2), column = b.strip0 + 8 * (j0 + j) + 2 * quad + (e & 1);
            if (!(column >= b.seq_begin && column < b.seq_end && row < b.seq_end && abs(column - row) <= window))
                s[j][e] = -INFINITY;
        }
    }
}

/* Phase 1, chunks [kFirst, kLast) of the warp's 16 keys: as band_dkdv (K, V fragments in registers), and the dSᵀ of
 * the centre's queries goes to ds_centre[key − t0][query − t0]. */
template <int D, int kPad, int kFirst, int kLast>
__device__ __forceinline__ void band2_dkdv_chunks(float dk[][4], float dv[][4], const uint32_t k_frag[][4],
                                                  const uint32_t v_frag[][4], const warp_band &b,
                                                  const mb::bf16 *q_strip, const mb::bf16 *do_strip,
                                                  const float *lse_strip, const float *delta_strip,
                                                  mb::bf16 *ds_centre, int warp, int window, float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kC = geo::chunk, kDsStride = band2<D, kPad>::ds_stride;
    const int lane = threadIdx.x % mb::kWarpSize, quad = lane % 4;
    const float *lse_cols = lse_strip + 16 * warp + 2 * quad, *delta_cols = delta_strip + 16 * warp + 2 * quad;
    mb::bf16 *ds_rows = ds_centre + (16 * warp + lane / 4) * kDsStride + 2 * quad; /* this thread's key, pair */
#pragma unroll
    for (int c = kFirst; c < kLast; c++) {
        const int j0 = c * kC;
        const mb::bf16 *q_rows = q_strip + (16 * warp + 8 * j0) * kStride;
        const mb::bf16 *do_rows = do_strip + (16 * warp + 8 * j0) * kStride;
        float st[kC][4], dpt[kC][4];
        zero<kC>(st);
        zero<kC>(dpt);
        scores_reg<D, kC>(st, k_frag, q_rows);
        mask_band_rows<kPad, kC>(st, j0, b, window);
        uint32_t p_pk[kC][2], ds_pk[kC][2];
#pragma unroll
        for (int j = 0; j < kC; j++) {
            const float lse0 = lse_cols[8 * (j0 + j)] * kLog2e, lse1 = lse_cols[8 * (j0 + j) + 1] * kLog2e;
#pragma unroll
            for (int half = 0; half < 2; half++) {
                st[j][2 * half] = fast_exp2(fmaf(st[j][2 * half], scale_log2, -lse0));
                st[j][2 * half + 1] = fast_exp2(fmaf(st[j][2 * half + 1], scale_log2, -lse1));
                p_pk[j][half] = mb::pack_bf16x2(st[j][2 * half], st[j][2 * half + 1]);
            }
        }
        scores_reg<D, kC>(dpt, v_frag, do_rows);
#pragma unroll
        for (int j = 0; j < kC; j++) {
            const float delta0 = delta_cols[8 * (j0 + j)], delta1 = delta_cols[8 * (j0 + j) + 1];
#pragma unroll
            for (int half = 0; half < 2; half++)
                ds_pk[j][half] = mb::pack_bf16x2(st[j][2 * half] * (dpt[j][2 * half] - delta0),
                                                 st[j][2 * half + 1] * (dpt[j][2 * half + 1] - delta1));
            /* query strip row 16·warp + 8·(j0 + j) + 2·quad: in the centre when kPad <= it < kPad + 64 */
            const int centre_column = 16 * warp + 8 * (j0 + j) - kPad;
            if (centre_column >= 0 && centre_column < kBandTile) {
                *reinterpret_cast<uint32_t *>(ds_rows + centre_column) = ds_pk[j][0];
                *reinterpret_cast<uint32_t *>(ds_rows + 8 * kDsStride + centre_column) = ds_pk[j][1];
            }
        }
        accumulate_packed<D, kC>(dv, p_pk, do_rows);
        accumulate_packed<D, kC>(dk, ds_pk, q_rows);
    }
}

/* Phase 2: dQ of the warp's 16 queries. Key groups of 16 outside the centre (left: strip rows [16·warp, kPad), right:
 * [kPad + 64, 16·warp + 16 + 2·kPad)) recompute S, P, dP, dS as v1; the centre's 4 groups read phase 1's dSᵀ. */
template <int D, int kPad>
__device__ __forceinline__ void band2_dq(mb::bf16 *dq_out, size_t row_stride, const warp_band &b, int row_end,
                                         const mb::bf16 *q_strip, const mb::bf16 *do_strip, const mb::bf16 *k_strip,
                                         const mb::bf16 *v_strip, const float *lse_strip, const float *delta_strip,
                                         const mb::bf16 *ds_centre, int warp, int window, float scale,
                                         float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kDsStride = band2<D, kPad>::ds_stride;
    const int lane = threadIdx.x % mb::kWarpSize;
    const int own_row = kPad + 16 * warp;
    uint32_t q_frag[shape<D>::k_steps][4], do_frag[shape<D>::k_steps][4];
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++) {
        load_a<kStride>(q_frag[ks], q_strip, own_row, ks * 16);
        load_a<kStride>(do_frag[ks], do_strip, own_row, ks * 16);
    }
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        row_lse[half] = lse_strip[own_row + lane / 4 + 8 * half] * kLog2e;
        row_delta[half] = delta_strip[own_row + lane / 4 + 8 * half];
    }
    float dq[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dq);
    const int left_groups = kPad / 16 - warp;
#pragma unroll
    for (int g = 0; g < band2<D, kPad>::off_groups; g++) {
        const int j0 = 2 * g + (g >= left_groups ? kBandTile / 8 : 0); /* n-tile of the warp's columns */
        const mb::bf16 *k_rows = k_strip + (16 * warp + 8 * j0) * kStride;
        const mb::bf16 *v_rows = v_strip + (16 * warp + 8 * j0) * kStride;
        float s[2][4], dp[2][4];
        zero<2>(s);
        zero<2>(dp);
        scores_reg<D, 2>(s, q_frag, k_rows);
        mask_band<kPad, 2>(s, j0, b, window);
        scores_reg<D, 2>(dp, do_frag, v_rows);
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int half = e / 2;
                float p = fast_exp2(fmaf(s[j][e], scale_log2, -row_lse[half]));
                s[j][e] = p * (dp[j][e] - row_delta[half]);
            }
        accumulate_pv<D, 2>(dq, s, k_rows);
    }
#pragma unroll
    for (int g = 0; g < kBandTile / 16; g++) {
        uint32_t a[4];
        load_a_transposed<kDsStride>(a, ds_centre, 16 * warp, 16 * g);
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt += 2) {
            uint32_t bf[4];
            load_b_cols<kStride>(bf, k_strip, kPad + 16 * g, dt * 8);
            mb::mma_bf16_16816(dq[dt], a, bf[0], bf[1]);
            mb::mma_bf16_16816(dq[dt + 1], a, bf[2], bf[3]);
        }
    }
    store_rows<D>(dq_out, row_stride, dq, b.row0 + lane / 4, row_end, scale);
}

template <int D, int kPad>
__global__ void __launch_bounds__(kBandThreads, band<D, kPad>::bwd_blocks)
    band2_backward_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                          const mb::bf16 *qkv, const int32_t *cu_seqlens, const int32_t *seq_first,
                          const int32_t *tile_seq, int num_seqs, int heads, int window, float scale,
                          float scale_log2) {
    using geo = band<D, kPad>;
    using v2 = band2<D, kPad>;
    constexpr int kStride = geo::stride, kStrip = geo::strip, kN = geo::n_tiles, kEarly = v2::early_rows;
    static_assert(band2_supported<D, kPad>(), "band2 needs head_dim <= 64 and kPad >= 64");
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_strip = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *do_strip = q_strip + kStrip * kStride, *k_strip = do_strip + kStrip * kStride;
    mb::bf16 *v_strip = k_strip + kStrip * kStride;
    float *lse_strip = reinterpret_cast<float *>(v_strip + kStrip * kStride), *delta_strip = lse_strip + kStrip;
    mb::bf16 *ds_centre = v2::ds_overlay ? v_strip + kPad * kStride
                                         : reinterpret_cast<mb::bf16 *>(delta_strip + kStrip);
    tile_position t;
    int head;
    if (!find_tile(&t, &head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kBandTile)) return;
    const int hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    const mb::bf16 *do_base = dout + head * D;
    const int base = t.start - kPad, lo = t.seq_begin, hi = t.seq_end;
    /* group 0: what the early phase-1 chunks read */
    load_strip_rows<D>(k_strip, k_base, qkv_stride, base, lo, hi, kPad, kPad + kBandTile);
    load_strip_rows<D>(v_strip, v_base, qkv_stride, base, lo, hi, kPad, kPad + kBandTile);
    load_strip_rows<D>(q_strip, q_base, qkv_stride, base, lo, hi, 0, kEarly);
    load_strip_rows<D>(do_strip, do_base, hidden, base, lo, hi, 0, kEarly);
    load_strip_floats_async(lse_strip, lse + head, heads, base, lo, hi, kStrip);
    load_strip_floats_async(delta_strip, delta + head, heads, base, lo, hi, kStrip);
    cp_async_commit();
    /* group 1: the rest of the Q, dO strips (the later phase-1 chunks) */
    load_strip_rows<D>(q_strip, q_base, qkv_stride, base, lo, hi, kEarly, kStrip);
    load_strip_rows<D>(do_strip, do_base, hidden, base, lo, hi, kEarly, kStrip);
    cp_async_commit();
    /* group 2: K, V outside the tile's rows (phase 2) */
    load_strip_rows<D>(k_strip, k_base, qkv_stride, base, lo, hi, 0, kPad);
    load_strip_rows<D>(k_strip, k_base, qkv_stride, base, lo, hi, kPad + kBandTile, kStrip);
    load_strip_rows<D>(v_strip, v_base, qkv_stride, base, lo, hi, 0, kPad);
    load_strip_rows<D>(v_strip, v_base, qkv_stride, base, lo, hi, kPad + kBandTile, kStrip);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const warp_band b = make_warp_band<kPad, kN>(t, warp);
    const bool active = b.row0 < t.end;
    uint32_t k_frag[shape<D>::k_steps][4], v_frag[shape<D>::k_steps][4];
    float dk[shape<D>::d_tiles][4], dv[shape<D>::d_tiles][4];
    cp_async_wait<2>();
    __syncthreads();
    if (active) {
#pragma unroll
        for (int ks = 0; ks < shape<D>::k_steps; ks++) {
            load_a<kStride>(k_frag[ks], k_strip, kPad + 16 * warp, ks * 16);
            load_a<kStride>(v_frag[ks], v_strip, kPad + 16 * warp, ks * 16);
        }
    }
    /* every warp holds its V fragments before anyone writes dSᵀ over V's centre rows */
    __syncthreads();
    if (active) {
        zero<shape<D>::d_tiles>(dk);
        zero<shape<D>::d_tiles>(dv);
        band2_dkdv_chunks<D, kPad, 0, v2::early_chunks>(dk, dv, k_frag, v_frag, b, q_strip, do_strip, lse_strip,
                                                       delta_strip, ds_centre, warp, window, scale_log2);
    } else {
        /* keys past a short tile: their dSᵀ rows are 0 (phase 2 reads every centre row) */
        constexpr int pieces = kBandTile / 8; /* 16-byte pieces per dSᵀ row */
        for (int c = lane; c < 16 * pieces; c += mb::kWarpSize)
            *reinterpret_cast<uint4 *>(ds_centre + (16 * warp + c / pieces) * v2::ds_stride + 8 * (c % pieces)) =
                make_uint4(0u, 0u, 0u, 0u);
    }
    cp_async_wait<1>();
    __syncthreads();
    if (active) {
        band2_dkdv_chunks<D, kPad, v2::early_chunks, v2::chunks>(dk, dv, k_frag, v_frag, b, q_strip, do_strip,
                                                                lse_strip, delta_strip, ds_centre, warp, window,
                                                                scale_log2);
        const int key_a = b.row0 + lane / 4;
        store_rows<D>(dqkv + hidden + head * D, qkv_stride, dk, key_a, t.end, scale);
        store_rows<D>(dqkv + 2 * hidden + head * D, qkv_stride, dv, key_a, t.end, 1.0f);
    }
    cp_async_wait<0>();
    __syncthreads();
    if (active)
        band2_dq<D, kPad>(dqkv + head * D, qkv_stride, b, t.end, q_strip, do_strip, k_strip, v_strip, lse_strip,
                          delta_strip, ds_centre, warp, window, scale, scale_log2);
}

/* ---- forward v2 (default; MB_ATTENTION_BAND=v1 selects the kernel above) ----
 * v1's math with three cp.async groups instead of two: Q and the K rows of the first kN1 n-tiles (group 0), the rest
 * of the K strip (group 1), V (group 2), so that QKᵀ starts after 64 + 48 + 8·kN1 rows instead of 64 + strip; loads
 * through load_strip_rows (one fixed column per thread). */
template <int D, int kPad>
__global__ void __launch_bounds__(kBandThreads, band<D, kPad>::fwd_blocks)
    band2_forward_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                         const int32_t *seq_first, const int32_t *tile_seq, int num_seqs, int heads, int window,
                         float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kN = geo::n_tiles;
    constexpr int kN1 = ((kN / 2) + 1) & ~1;           /* n-tiles of the first QKᵀ part (even: products in pairs) */
    constexpr int kRows1 = 16 * (kBandWarps - 1) + 8 * kN1; /* K strip rows they read (warp 3 starts at row 48) */
    static_assert(kN1 < kN && kRows1 <= geo::strip, "two QKᵀ parts inside the strip");
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *k_strip = q_tile + kBandTile * kStride, *v_strip = k_strip + geo::strip * kStride;
    tile_position t;
    int head;
    if (!find_tile(&t, &head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kBandTile)) return;
    const int hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    const int base = t.start - kPad;
    load_strip_rows<D>(q_tile, q_base, qkv_stride, t.start, t.seq_begin, t.seq_end, 0, kBandTile);
    load_strip_rows<D>(k_strip, k_base, qkv_stride, base, t.seq_begin, t.seq_end, 0, kRows1);
    cp_async_commit();
    load_strip_rows<D>(k_strip, k_base, qkv_stride, base, t.seq_begin, t.seq_end, kRows1, geo::strip);
    cp_async_commit();
    load_strip_rows<D>(v_strip, v_base, qkv_stride, base, t.seq_begin, t.seq_end, 0, geo::strip);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const warp_band b = make_warp_band<kPad, kN>(t, warp);
    const bool active = b.row0 < t.end;
    float s[kN][4];
    float row_sum[2], row_ref[2];
    uint32_t q_frag[shape<D>::k_steps][4];
    zero<kN>(s);
    row_sum[0] = row_sum[1] = 1.0f;
    row_ref[0] = row_ref[1] = 0.0f;

    cp_async_wait<2>(); /* Q, first K rows */
    __syncthreads();
    if (active) {
#pragma unroll
        for (int ks = 0; ks < shape<D>::k_steps; ks++) load_a<kStride>(q_frag[ks], q_tile, 16 * warp, ks * 16);
        scores_reg<D, kN1>(s, q_frag, k_strip + 16 * warp * kStride);
    }
    cp_async_wait<1>(); /* the rest of K */
    __syncthreads();
    if (active) {
        scores_reg<D, kN - kN1>(s + kN1, q_frag, k_strip + (16 * warp + 8 * kN1) * kStride);
        mask_band<kPad, kN>(s, 0, b, window);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float row_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < kN; j++) row_max = fmaxf(row_max, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
            const float reference = row_max == -INFINITY ? 0.0f : row_max * scale_log2;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < kN; j++)
#pragma unroll
                for (int e = 2 * half; e < 2 * half + 2; e++) {
                    float p = fast_exp2(fmaf(s[j][e], scale_log2, -reference));
                    s[j][e] = p;
                    sum += p;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            row_sum[half] = sum;
            row_ref[half] = reference;
        }
    }
    cp_async_wait<0>(); /* V */
    __syncthreads();
    if (!active) return; /* no barrier follows */
    float o[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(o);
    accumulate_pv<D, kN>(o, s, v_strip + 16 * warp * kStride);
    const int row_a = b.row0 + lane / 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const float inverse = 1.0f / row_sum[half];
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
            o[dt][2 * half] *= inverse;
            o[dt][2 * half + 1] *= inverse;
        }
        const int query = row_a + 8 * half;
        if (query < t.end && lane % 4 == 0)
            lse[(size_t)query * heads + head] = (row_ref[half] + log2f(row_sum[half])) * kLn2;
    }
    store_rows<D>(out + head * D, hidden, o, row_a, t.end, 1.0f);
}

/* ---- launchers ---- */

template <typename Kernel>
int allow_shared(Kernel kernel, size_t bytes, mb_error *err) {
    if (bytes <= 48 * 1024) return 0;
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return 0;
}

struct band_call {
    const int32_t *cu_seqlens;
    mb::attention_plan plan;
    int num_seqs, heads, window;
    cudaStream_t stream;
};

/* MB_ATTENTION_BAND=v1 (read per call) selects the round-1 kernels: both forward and backward. Otherwise v2: the
 * forward everywhere, the backward where band2_supported (head_dim <= 64 with window > 16; v1 elsewhere). */
bool band_v1_requested() {
    const char *set = getenv("MB_ATTENTION_BAND");
    return set != nullptr && strcmp(set, "v1") == 0;
}

template <int D, int kPad>
int launch_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const band_call &c, mb_error *err) {
    const bool v1 = band_v1_requested();
    auto kernel = v1 ? band_forward_kernel<D, kPad> : band2_forward_kernel<D, kPad>;
    const size_t shared = band<D, kPad>::fwd_bytes;
    if (allow_shared(kernel, shared, err) != 0) return -1;
    const float scale_log2 = kLog2e / sqrtf((float)D);
    kernel<<<c.plan.blocks, kBandThreads, shared, c.stream>>>(out, lse, qkv, c.cu_seqlens, c.plan.seq_first,
                                                              c.plan.tile_seq, c.num_seqs, c.heads, c.window,
                                                              scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, v1 ? "band_forward_kernel" : "band2_forward_kernel");
    return 0;
}

template <int D, int kPad>
int launch_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta, const mb::bf16 *qkv,
                    const band_call &c, mb_error *err) {
    const float scale = 1.0f / sqrtf((float)D), scale_log2 = kLog2e * scale;
    if constexpr (band2_supported<D, kPad>()) {
        if (!band_v1_requested()) {
            auto kernel2 = band2_backward_kernel<D, kPad>;
            const size_t shared2 = band2<D, kPad>::bytes;
            if (allow_shared(kernel2, shared2, err) != 0) return -1;
            kernel2<<<c.plan.blocks, kBandThreads, shared2, c.stream>>>(dqkv, dout, lse, delta, qkv, c.cu_seqlens,
                                                                        c.plan.seq_first, c.plan.tile_seq, c.num_seqs,
                                                                        c.heads, c.window, scale, scale_log2);
            MB_CUDA_CHECK_LAUNCH(err, "band2_backward_kernel");
            return 0;
        }
    }
    auto kernel = band_backward_kernel<D, kPad>;
    const size_t shared = band<D, kPad>::bwd_bytes;
    if (allow_shared(kernel, shared, err) != 0) return -1;
    kernel<<<c.plan.blocks, kBandThreads, shared, c.stream>>>(dqkv, dout, lse, delta, qkv, c.cu_seqlens,
                                                              c.plan.seq_first, c.plan.tile_seq, c.num_seqs, c.heads,
                                                              c.window, scale, scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "band_backward_kernel");
    return 0;
}

/* The strip pad for a window: 16, 64 or 128 (the smallest >= window; 0 if none fits). */
int pad_for(int head_dim, int window) {
    if (window < 0) return 0;
    if (window <= 16) return 16;
    if (window <= 64) return 64;
    if (window <= 128 && head_dim <= 64) return 128;
    return 0;
}

int check_call(const char *what, const void *qkv, const int32_t *cu_seqlens, const band_call &c, int n,
               int head_dim, mb_error *err) {
    MB_REQUIRE(err, qkv && cu_seqlens && c.plan.seq_first && c.plan.tile_seq, "%s: missing qkv, cu_seqlens or plan",
               what);
    MB_REQUIRE(err, c.num_seqs >= 1 && n >= c.num_seqs && c.heads >= 1, "%s: bad shape num_seqs %d, n %d, heads %d",
               what, c.num_seqs, n, c.heads);
    MB_REQUIRE(err, mb_attention_band_supports(head_dim, c.window),
               "%s: head_dim %d with window %d is not supported (head_dim 32/64: window 0..128, 128: 0..64)", what,
               head_dim, c.window);
    MB_REQUIRE(err, c.plan.tile == kBandTile, "%s: plan.tile is %d, the band kernels need %d", what, c.plan.tile,
               kBandTile);
    MB_REQUIRE(err, c.plan.blocks >= (unsigned)c.heads && c.plan.blocks % (unsigned)c.heads == 0,
               "%s: plan.blocks %u is not a multiple of heads %d", what, c.plan.blocks, c.heads);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(qkv) % 16 == 0, "%s: qkv must be 16-byte aligned", what);
    return 0;
}

}  // namespace

bool mb_attention_band_supports(int head_dim, int window) {
    return (head_dim == 32 || head_dim == 64 || head_dim == 128) && pad_for(head_dim, window) != 0;
}

int mb_attention_band_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                              mb::attention_plan plan, int num_seqs, int n, int heads, int head_dim, int window,
                              cudaStream_t stream, mb_error *err) {
    const band_call c = {cu_seqlens, plan, num_seqs, heads, window, stream};
    if (check_call("attention_band_forward", qkv, cu_seqlens, c, n, head_dim, err) != 0) return -1;
    MB_REQUIRE(err, out && lse, "attention_band_forward: missing out or lse");
    MB_NVTX_RANGE("attention_band_forward");
    const int pad = pad_for(head_dim, window);
    switch (head_dim) {
    case 32:
        return pad == 16 ? launch_forward<32, 16>(out, lse, qkv, c, err)
               : pad == 64 ? launch_forward<32, 64>(out, lse, qkv, c, err)
                           : launch_forward<32, 128>(out, lse, qkv, c, err);
    case 64:
        return pad == 16 ? launch_forward<64, 16>(out, lse, qkv, c, err)
               : pad == 64 ? launch_forward<64, 64>(out, lse, qkv, c, err)
                           : launch_forward<64, 128>(out, lse, qkv, c, err);
    default:
        return pad == 16 ? launch_forward<128, 16>(out, lse, qkv, c, err) : launch_forward<128, 64>(out, lse, qkv, c, err);
    }
}

int mb_attention_band_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                               const mb::bf16 *qkv, const int32_t *cu_seqlens, mb::attention_plan plan,
                               int num_seqs, int n, int heads, int head_dim, int window, cudaStream_t stream,
                               mb_error *err) {
    const band_call c = {cu_seqlens, plan, num_seqs, heads, window, stream};
    if (check_call("attention_band_backward", qkv, cu_seqlens, c, n, head_dim, err) != 0) return -1;
    MB_REQUIRE(err, dqkv && dout && lse && delta, "attention_band_backward: missing dqkv, dout, lse or delta");
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(dout) % 16 == 0, "attention_band_backward: dout must be 16-byte aligned");
    MB_NVTX_RANGE("attention_band_backward");
    const int pad = pad_for(head_dim, window);
    switch (head_dim) {
    case 32:
        return pad == 16 ? launch_backward<32, 16>(dqkv, dout, lse, delta, qkv, c, err)
               : pad == 64 ? launch_backward<32, 64>(dqkv, dout, lse, delta, qkv, c, err)
                           : launch_backward<32, 128>(dqkv, dout, lse, delta, qkv, c, err);
    case 64:
        return pad == 16 ? launch_backward<64, 16>(dqkv, dout, lse, delta, qkv, c, err)
               : pad == 64 ? launch_backward<64, 64>(dqkv, dout, lse, delta, qkv, c, err)
                           : launch_backward<64, 128>(dqkv, dout, lse, delta, qkv, c, err);
    default:
        return pad == 16 ? launch_backward<128, 16>(dqkv, dout, lse, delta, qkv, c, err)
                         : launch_backward<128, 64>(dqkv, dout, lse, delta, qkv, c, err);
    }
}
