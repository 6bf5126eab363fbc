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
 * Forward (band_forward_kernel, every shape): three cp.async groups: Q + the K rows of the first kN1 n-tiles, the rest
 * of K, then V (lands during QKᵀ and the softmax). Each warp holds its 16 × 8kN scores in registers: one pass, no
 * online rescaling (max, exp2, sum, then P·V); lse_i = (max·scale·log2 e + log2 Σ) · ln 2.
 *
 * Backward (one kernel per shape, no atomics): the strip of Q, dO, lse, D and K, V serves both halves of the tile's
 * work, because the symmetric window makes "keys seen by the tile's queries" and "queries that see the tile's keys"
 * the same strip. Phase 1 (dK, dV of the tile's 64 keys): loop over chunks of kC query n-tiles: Sᵀ = K·Qᵀ,
 * Pᵀ = exp2(Sᵀ·scale·log2 e − lse·log2 e), dPᵀ = V·dOᵀ, dSᵀ = Pᵀ(dPᵀ − D), dV += Pᵀ·dO, dK += dSᵀ·Q. Phase 2 (dQ of
 * the tile's 64 queries): S = Q·Kᵀ, P, dP = dO·Vᵀ, dS, dQ += dS·K. Each element of dqkv is written once, by the warp
 * owning its row. Two kernels:
 *  - band_backward_centre_kernel (head_dim <= 64, window > 16: kPad >= 64, so every warp's strip covers the whole
 *    64 × 64 centre of the tile's own queries and keys): phase 1 keeps its dSᵀ of the centre in shared memory and
 *    phase 2 recomputes only the key groups outside it; three cp.async groups (K, V of the tile's rows + the first
 *    Q, dO rows + lse, D; the rest of Q, dO; K, V outside the tile), K, V fragments of phase 1 in registers.
 *  - band_backward_recompute_kernel (the other shapes: head_dim 128, or window <= 16): phase 2 recomputes P and dS
 *    for every pair (7 tile products per pair); two cp.async groups (what phase 1 reads; K, V outside the tile);
 *    head_dim 128 re-reads phase 1's K, V fragments from shared memory per chunk (registers).
 *
 * Grid: the plan of cuda/attention_common.cuh for tiles of kBandTile tokens (block x = tile x / heads, head x % heads,
 * longest sequences first); spare blocks return at once. */
#include "attention_band.h"

#include "attention_mma.cuh"

#include <type_traits>

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

/* What every band kernel receives besides its tensors: the launch plan and the constants of the call. */
struct band_args {
    const int32_t *cu_seqlens, *seq_first, *tile_seq;
    int num_seqs, heads, window;
    float scale, scale_log2; /* 1/sqrt(d) (backward only) and scale·log2 e */
    const float2 *rope;      /* backward: RoPE's backward on dQ and dK in their stores (table of mb_cuda_rope_table), or
                                nullptr */
};

/* ---- the block's tile and its strips ---- */

/* The (tile, head) a block owns and the global slices its strips come from. */
struct band_tile {
    tile_position t;
    int head, hidden;          /* hidden = heads·D */
    size_t qkv_stride;         /* 3·hidden: row stride of qkv and dqkv */
    const mb::bf16 *q, *k, *v; /* the head's columns of Q, K and V in qkv */
    int base;                  /* token of strip row 0: t.start − kPad */
};

/* false for the spare blocks past the last tile (uniform over the block). */
template <int D, int kPad>
__device__ __forceinline__ bool find_band_tile(band_tile *bt, const mb::bf16 *qkv, const band_args &a) {
    if (!find_tile(&bt->t, &bt->head, a.seq_first, a.tile_seq, a.cu_seqlens, a.num_seqs, a.heads, kBandTile))
        return false;
    bt->hidden = a.heads * D;
    bt->qkv_stride = 3 * (size_t)bt->hidden;
    bt->q = qkv + bt->head * D;
    bt->k = bt->q + bt->hidden;
    bt->v = bt->q + 2 * bt->hidden;
    bt->base = bt->t.start - kPad;
    return true;
}

/* Queues rows [r_begin, r_end) of a strip whose row r holds token base + r of a [*, D] slice (row stride in
 * elements); tokens outside [lo, hi) become zeros (src-size 0: their source, the slice start, is never read). Thread t
 * always copies the 16 bytes at column 8·(t % (D/8)); rows step by kBandThreads / (D/8). */
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

/* load_strip_rows for the block's strip (row 0 = token bt.base). */
template <int D>
__device__ __forceinline__ void load_tile_strip(const band_tile &bt, mb::bf16 *dst, const mb::bf16 *src,
                                                size_t row_stride, int r_begin, int r_end) {
    load_strip_rows<D>(dst, src, row_stride, bt.base, bt.t.seq_begin, bt.t.seq_end, r_begin, r_end);
}

/* The same for one float per token (lse or D of one head: element stride `stride`), strip rows [0, rows). */
__device__ __forceinline__ void load_strip_floats_async(float *dst, const float *src, int stride, const band_tile &bt,
                                                        int rows) {
    for (int r = threadIdx.x; r < rows; r += kBandThreads) {
        int token = bt.base + r;
        bool valid = token >= bt.t.seq_begin && token < bt.t.seq_end;
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
 * farther than `window` from the row; with kRowsToo also where the row is past the sequence (the centre kernel's
 * phase-1 keys, whose dSᵀ reaches dQ). Otherwise rows past the tile are left alone: they are never stored. Rows past
 * the sequence make the warp non-interior, so the unmasked path is the same either way. */
template <int kPad, int kN, bool kRowsToo = false>
__device__ __forceinline__ void mask_band(float s[kN][4], int j0, const warp_band &b, int window) {
    const int lane = threadIdx.x % mb::kWarpSize, quad = lane % 4, row_a = b.row0 + lane / 4;
#pragma unroll
    for (int j = 0; j < kN; j++) {
        if (!tile_needs_mask<kPad>(j0 + j, window, b.interior)) continue;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int row = row_a + 8 * (e / 2), column = b.strip0 + 8 * (j0 + j) + 2 * quad + (e & 1);
            if (!(column >= b.seq_begin && column < b.seq_end && (!kRowsToo || row < b.seq_end) &&
                  abs(column - row) <= window))
                s[j][e] = -INFINITY;
        }
    }
}

/* ---- forward ---- */

template <int D, int kPad>
__global__ void __launch_bounds__(kBandThreads, band<D, kPad>::fwd_blocks)
    band_forward_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, band_args a) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kN = geo::n_tiles;
    constexpr int kN1 = ((kN / 2) + 1) & ~1; /* n-tiles of the first QKᵀ part (even: products in pairs) */
    constexpr int kRows1 = 16 * (kBandWarps - 1) + 8 * kN1; /* K strip rows they read (warp 3: from row 48) */
    static_assert(kN1 < kN && kRows1 <= geo::strip, "two QKᵀ parts inside the strip");
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *k_strip = q_tile + kBandTile * kStride, *v_strip = k_strip + geo::strip * kStride;
    band_tile bt;
    if (!find_band_tile<D, kPad>(&bt, qkv, a)) return;
    const tile_position &t = bt.t;
    /* group 0: Q and the K rows of the first QKᵀ part; group 1: the rest of K; group 2: V */
    load_strip_rows<D>(q_tile, bt.q, bt.qkv_stride, t.start, t.seq_begin, t.seq_end, 0, kBandTile);
    load_tile_strip<D>(bt, k_strip, bt.k, bt.qkv_stride, 0, kRows1);
    cp_async_commit();
    load_tile_strip<D>(bt, k_strip, bt.k, bt.qkv_stride, kRows1, geo::strip);
    cp_async_commit();
    load_tile_strip<D>(bt, v_strip, bt.v, bt.qkv_stride, 0, geo::strip);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const warp_band b = make_warp_band<kPad, kN>(t, warp);
    const bool active = b.row0 < t.end; /* false: the warp's rows are past a short tile */
    float s[kN][4];                     /* scores, then P (fp32) */
    float row_sum[2], row_ref[2];       /* per row half: Σ p and the subtracted max (log2 units) */
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
        mask_band<kPad, kN>(s, 0, b, a.window);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float row_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < kN; j++) row_max = fmaxf(row_max, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
            /* a row with nothing visible (only rows past the sequence, never stored) subtracts 0 */
            const float reference = row_max == -INFINITY ? 0.0f : row_max * a.scale_log2;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < kN; j++)
#pragma unroll
                for (int e = 2 * half; e < 2 * half + 2; e++) {
                    float p = fast_exp2(fmaf(s[j][e], a.scale_log2, -reference)); /* −inf (masked) -> 0 */
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
            lse[(size_t)query * a.heads + bt.head] = (row_ref[half] + log2f(row_sum[half])) * kLn2;
    }
    store_rows<D>(out + bt.head * D, bt.hidden, o, row_a, t.end, 1.0f);
}

/* ---- backward pieces (both kernels) ---- */

constexpr int kCentreStride = kBandTile + 8; /* bf16 per row of the centre kernel's dSᵀ [key][query] (16-byte pad) */

/* The backward's shared memory: strips of Q, dO, K, V (bf16, kStride per row) and of lse, D (fp32). */
struct backward_strips {
    mb::bf16 *q, *dout, *k, *v;
    float *lse, *delta;
};

template <int D, int kPad>
__device__ __forceinline__ backward_strips carve_backward_strips(uint4 *shared) {
    constexpr int kRows = band<D, kPad>::strip * band<D, kPad>::stride;
    backward_strips s;
    s.q = reinterpret_cast<mb::bf16 *>(shared);
    s.dout = s.q + kRows;
    s.k = s.dout + kRows;
    s.v = s.k + kRows;
    s.lse = reinterpret_cast<float *>(s.v + kRows);
    s.delta = s.lse + band<D, kPad>::strip;
    return s;
}

/* Strip rows [r_begin, r_end) of the Q and dO strips. */
template <int D>
__device__ __forceinline__ void load_q_do(const backward_strips &s, const band_tile &bt, const mb::bf16 *dout,
                                          int r_begin, int r_end) {
    load_tile_strip<D>(bt, s.q, bt.q, bt.qkv_stride, r_begin, r_end);
    load_tile_strip<D>(bt, s.dout, dout + bt.head * D, bt.hidden, r_begin, r_end);
}

/* What phase 1 reads first: K, V of the tile's own rows, Q and dO strip rows [0, q_rows), all of lse and D. */
template <int D, int kPad>
__device__ __forceinline__ void load_phase1(const backward_strips &s, const band_tile &bt, const mb::bf16 *dout,
                                            const float *lse, const float *delta, int heads, int q_rows) {
    load_tile_strip<D>(bt, s.k, bt.k, bt.qkv_stride, kPad, kPad + kBandTile);
    load_tile_strip<D>(bt, s.v, bt.v, bt.qkv_stride, kPad, kPad + kBandTile);
    load_q_do<D>(s, bt, dout, 0, q_rows);
    load_strip_floats_async(s.lse, lse + bt.head, heads, bt, band<D, kPad>::strip);
    load_strip_floats_async(s.delta, delta + bt.head, heads, bt, band<D, kPad>::strip);
}

/* What only phase 2 reads: the K, V strip rows outside the tile. */
template <int D, int kPad>
__device__ __forceinline__ void load_kv_outside(const backward_strips &s, const band_tile &bt) {
    constexpr int kStrip = band<D, kPad>::strip;
    load_tile_strip<D>(bt, s.k, bt.k, bt.qkv_stride, 0, kPad);
    load_tile_strip<D>(bt, s.k, bt.k, bt.qkv_stride, kPad + kBandTile, kStrip);
    load_tile_strip<D>(bt, s.v, bt.v, bt.qkv_stride, 0, kPad);
    load_tile_strip<D>(bt, s.v, bt.v, bt.qkv_stride, kPad + kBandTile, kStrip);
}

/* Phase 1, one chunk: query n-tiles [j0, j0 + kC) of the warp's columns (strip rows 16·warp + 8·j0 ...) against its
 * 16 keys (strip rows kPad + 16·warp: K, V fragments in registers, or read from s.k, s.v when !kv_in_registers).
 * kCentre (centre kernel): keys past the sequence are masked too, and the dSᵀ of the centre's queries goes to
 * ds_rows[query − t0] (ds_rows: this thread's key row and column pair of the [key][query] centre). */
template <int D, int kPad, bool kCentre>
__device__ __forceinline__ void dkdv_chunk(float dk[][4], float dv[][4], const uint32_t k_frag[][4],
                                           const uint32_t v_frag[][4], const backward_strips &s, const warp_band &b,
                                           int warp, int j0, mb::bf16 *ds_rows, int window, float scale_log2) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kC = geo::chunk, kDsStride = kCentreStride;
    const int quad = threadIdx.x % mb::kWarpSize % 4;
    const int own_row = kPad + 16 * warp; /* strip row of the warp's first key */
    const float *lse_cols = s.lse + 16 * warp + 2 * quad, *delta_cols = s.delta + 16 * warp + 2 * quad;
    const mb::bf16 *q_rows = s.q + (16 * warp + 8 * j0) * kStride;
    const mb::bf16 *do_rows = s.dout + (16 * warp + 8 * j0) * kStride;
    float st[kC][4], dpt[kC][4]; /* transposed: rows are the warp's keys, columns the chunk's queries */
    zero<kC>(st);
    zero<kC>(dpt);
    if constexpr (geo::kv_in_registers) scores_reg<D, kC>(st, k_frag, q_rows);
    else scores<D, kC>(st, s.k, own_row, q_rows);
    mask_band<kPad, kC, kCentre>(st, j0, b, window);
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
    else scores<D, kC>(dpt, s.v, own_row, do_rows);
#pragma unroll
    for (int j = 0; j < kC; j++) {
        const float delta0 = delta_cols[8 * (j0 + j)], delta1 = delta_cols[8 * (j0 + j) + 1];
#pragma unroll
        for (int half = 0; half < 2; half++)
            ds_pk[j][half] = mb::pack_bf16x2(st[j][2 * half] * (dpt[j][2 * half] - delta0),
                                             st[j][2 * half + 1] * (dpt[j][2 * half + 1] - delta1));
        if constexpr (kCentre) {
            /* query strip row 16·warp + 8·(j0 + j) + 2·quad: in the centre when kPad <= it < kPad + 64 */
            const int centre_column = 16 * warp + 8 * (j0 + j) - kPad;
            if (centre_column >= 0 && centre_column < kBandTile) {
                *reinterpret_cast<uint32_t *>(ds_rows + centre_column) = ds_pk[j][0];
                *reinterpret_cast<uint32_t *>(ds_rows + 8 * kDsStride + centre_column) = ds_pk[j][1];
            }
        }
    }
    accumulate_packed<D, kC>(dv, p_pk, do_rows);
    accumulate_packed<D, kC>(dk, ds_pk, q_rows);
}

/* Phase 2's per-warp operands: Q and dO fragments of the warp's 16 queries (strip rows kPad + 16·warp), their lse in
 * log2 units and D (zero-filled past the sequence: those rows are never stored). */
template <int D>
struct dq_operands {
    uint32_t q[shape<D>::k_steps][4], dout[shape<D>::k_steps][4];
    float lse[2], delta[2]; /* rows lane/4 and lane/4 + 8 */
};

template <int D, int kPad>
__device__ __forceinline__ void load_dq_operands(dq_operands<D> &x, const backward_strips &s, int warp) {
    constexpr int kStride = band<D, kPad>::stride;
    const int lane = threadIdx.x % mb::kWarpSize;
    const int own_row = kPad + 16 * warp; /* strip row of the warp's first query */
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++) {
        load_a<kStride>(x.q[ks], s.q, own_row, ks * 16);
        load_a<kStride>(x.dout[ks], s.dout, own_row, ks * 16);
    }
#pragma unroll
    for (int half = 0; half < 2; half++) {
        x.lse[half] = s.lse[own_row + lane / 4 + 8 * half] * kLog2e;
        x.delta[half] = s.delta[own_row + lane / 4 + 8 * half];
    }
}

/* Phase 2, one chunk: dq += dS·K over key n-tiles [j0, j0 + kN) of the warp's columns (strip rows 16·warp + 8·j0 ...),
 * recomputing S, P, dP and dS. */
template <int D, int kPad, int kN>
__device__ __forceinline__ void dq_chunk(float dq[][4], const dq_operands<D> &x, const backward_strips &s,
                                         const warp_band &b, int warp, int j0, int window, float scale_log2) {
    constexpr int kStride = band<D, kPad>::stride;
    const mb::bf16 *k_rows = s.k + (16 * warp + 8 * j0) * kStride;
    const mb::bf16 *v_rows = s.v + (16 * warp + 8 * j0) * kStride;
    float sc[kN][4], dp[kN][4];
    zero<kN>(sc);
    zero<kN>(dp);
    scores_reg<D, kN>(sc, x.q, k_rows);
    mask_band<kPad, kN>(sc, j0, b, window);
    scores_reg<D, kN>(dp, x.dout, v_rows);
#pragma unroll
    for (int j = 0; j < kN; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int half = e / 2;
            float p = fast_exp2(fmaf(sc[j][e], scale_log2, -x.lse[half]));
            sc[j][e] = p * (dp[j][e] - x.delta[half]); /* dS */
        }
    accumulate_pv<D, kN>(dq, sc, k_rows);
}

/* dK (times scale) and dV of the warp's 16 keys, rows past the tile skipped. */
template <int D>
__device__ __forceinline__ void store_dkdv(mb::bf16 *dqkv, const band_tile &bt, const warp_band &b,
                                           const float dk[][4], const float dv[][4], float scale, const float2 *rope) {
    const int key_a = b.row0 + threadIdx.x % mb::kWarpSize / 4;
    store_rows_maybe_rope<D>(dqkv + bt.hidden + bt.head * D, bt.qkv_stride, dk, key_a, bt.t.end, scale, rope);
    store_rows<D>(dqkv + 2 * bt.hidden + bt.head * D, bt.qkv_stride, dv, key_a, bt.t.end, 1.0f);
}

/* ---- backward, recomputing phase 2 (head_dim 128, or window <= 16) ---- */

template <int D, int kPad>
__global__ void __launch_bounds__(kBandThreads, band<D, kPad>::bwd_blocks)
    band_backward_recompute_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                                   const mb::bf16 *qkv, band_args a) {
    using geo = band<D, kPad>;
    constexpr int kStride = geo::stride, kN = geo::n_tiles, kC = geo::chunk;
    extern __shared__ uint4 shared_raw[];
    const backward_strips s = carve_backward_strips<D, kPad>(shared_raw);
    band_tile bt;
    if (!find_band_tile<D, kPad>(&bt, qkv, a)) return;
    /* group 0: what phase 1 reads (the query side of the strip, K and V of the tile's own 64 rows) */
    load_phase1<D, kPad>(s, bt, dout, lse, delta, a.heads, geo::strip);
    cp_async_commit();
    /* group 1: the rest of the K and V strips (phase 2) */
    load_kv_outside<D, kPad>(s, bt);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const warp_band b = make_warp_band<kPad, kN>(bt.t, warp);
    const bool active = b.row0 < bt.t.end; /* false: the warp's rows are past a short tile */
    cp_async_wait<1>();
    __syncthreads();
    if (active) {
        /* phase 1: dK, dV of the warp's 16 keys */
        constexpr int kFrags = geo::kv_in_registers ? shape<D>::k_steps : 1;
        uint32_t k_frag[kFrags][4], v_frag[kFrags][4];
        if constexpr (geo::kv_in_registers) {
#pragma unroll
            for (int ks = 0; ks < shape<D>::k_steps; ks++) {
                load_a<kStride>(k_frag[ks], s.k, kPad + 16 * warp, ks * 16);
                load_a<kStride>(v_frag[ks], s.v, kPad + 16 * warp, ks * 16);
            }
        }
        float dk[shape<D>::d_tiles][4], dv[shape<D>::d_tiles][4];
        zero<shape<D>::d_tiles>(dk);
        zero<shape<D>::d_tiles>(dv);
#pragma unroll
        for (int j0 = 0; j0 < kN; j0 += kC)
            dkdv_chunk<D, kPad, false>(dk, dv, k_frag, v_frag, s, b, warp, j0, nullptr, a.window, a.scale_log2);
        store_dkdv<D>(dqkv, bt, b, dk, dv, a.scale, a.rope);
    }
    cp_async_wait<0>();
    __syncthreads();
    if (!active) return;
    /* phase 2: dQ of the warp's 16 queries over the keys of strip rows [16·warp, 16·warp + 8·kN) */
    dq_operands<D> x;
    load_dq_operands<D, kPad>(x, s, warp);
    float dq[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dq);
#pragma unroll
    for (int j0 = 0; j0 < kN; j0 += kC) dq_chunk<D, kPad, kC>(dq, x, s, b, warp, j0, a.window, a.scale_log2);
    store_rows_maybe_rope<D>(dqkv + bt.head * D, bt.qkv_stride, dq, b.row0 + lane / 4, bt.t.end, a.scale, a.rope);
}

/* ---- backward reusing the centre's dS (head_dim <= 64, window > 16) ----
 * Phase 1 stores its dSᵀ for the centre (bf16, [key][query]) in shared memory (over V's centre rows at head_dim 64:
 * phase 1 holds V's fragments in registers and phase 2 needs V only outside the centre), and phase 2 reads it back
 * as A fragments (ldmatrix .trans) for dQ += dS·K. Per warp at w = 64: 440 tile products instead of 504, 40
 * exponentials instead of 72 in phase 2. dS is formed once per pair (from fp32 P) and rounded to bf16 once: the
 * centre's dQ uses the bf16 values the recompute kernel would form, up to the order of the sums in S and dP. */

/* Shapes the centre kernel takes (the others use the recompute kernel). */
template <int D, int kPad>
__host__ __device__ constexpr bool centre_supported() {
    return D <= 64 && kPad >= 64 && band<D, kPad>::kv_in_registers;
}

template <int D, int kPad>
struct centre {
    using geo = band<D, kPad>;
    static constexpr int chunks = geo::n_tiles / geo::chunk;
    static_assert(geo::n_tiles % geo::chunk == 0, "whole chunks");
    static constexpr int early_chunks = (chunks + 2) / 3; /* phase-1 chunks that need only cp.async group 0 */
    /* strip rows those chunks read: warp 3's columns start at row 48 */
    static constexpr int early_rows = 16 * (kBandWarps - 1) + 8 * geo::chunk * early_chunks;
    static_assert(early_rows <= geo::strip, "group 0 inside the strip");
    static constexpr int ds_stride = kCentreStride;
    static constexpr bool ds_overlay = geo::stride == ds_stride;    /* dSᵀ centre over V's centre rows (D = 64) */
    static constexpr size_t ds_bytes = (size_t)kBandTile * ds_stride * sizeof(mb::bf16);
    static constexpr size_t bytes = geo::bwd_bytes + (ds_overlay ? 0 : ds_bytes);
    static constexpr int off_groups = (2 * kPad + 16 - kBandTile) / 16; /* 16-key groups outside the centre */
};

/* A fragment (16×16) of A = Tᵀ at (row0, col0), T stored row-major [col][row] (A's columns are T's rows). */
template <int kStride>
__device__ __forceinline__ void load_a_transposed(uint32_t a[4], const mb::bf16 *tile, int row0, int col0) {
    const int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4_trans(a, tile + (col0 + (lane & 7) + ((lane >> 4) << 3)) * kStride + row0 + ((lane >> 3) & 1) * 8);
}

/* Phase 2 of the centre kernel: dQ of the warp's 16 queries. Key groups of 16 outside the centre (left: strip rows
 * [16·warp, kPad), right: [kPad + 64, 16·warp + 16 + 2·kPad)) recompute S, P, dP, dS; the centre's 4 groups read
 * phase 1's dSᵀ. */
template <int D, int kPad>
__device__ __forceinline__ void centre_dq(mb::bf16 *dqkv, const band_tile &bt, const warp_band &b,
                                          const backward_strips &s, const mb::bf16 *ds_centre, int warp, int window,
                                          float scale, float scale_log2, const float2 *rope) {
    constexpr int kStride = band<D, kPad>::stride, kDsStride = centre<D, kPad>::ds_stride;
    const int lane = threadIdx.x % mb::kWarpSize;
    dq_operands<D> x;
    load_dq_operands<D, kPad>(x, s, warp);
    float dq[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dq);
    const int left_groups = kPad / 16 - warp;
#pragma unroll
    for (int g = 0; g < centre<D, kPad>::off_groups; g++) {
        const int j0 = 2 * g + (g >= left_groups ? kBandTile / 8 : 0); /* n-tile of the warp's columns */
        dq_chunk<D, kPad, 2>(dq, x, s, b, warp, j0, window, scale_log2);
    }
#pragma unroll
    for (int g = 0; g < kBandTile / 16; g++) {
        uint32_t a[4];
        load_a_transposed<kDsStride>(a, ds_centre, 16 * warp, 16 * g);
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt += 2) {
            uint32_t bf[4];
            load_b_cols<kStride>(bf, s.k, kPad + 16 * g, dt * 8);
            mb::mma_bf16_16816(dq[dt], a, bf[0], bf[1]);
            mb::mma_bf16_16816(dq[dt + 1], a, bf[2], bf[3]);
        }
    }
    store_rows_maybe_rope<D>(dqkv + bt.head * D, bt.qkv_stride, dq, b.row0 + lane / 4, bt.t.end, scale, rope);
}

template <int D, int kPad>
__global__ void __launch_bounds__(kBandThreads, band<D, kPad>::bwd_blocks)
    band_backward_centre_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                                const mb::bf16 *qkv, band_args a) {
    using geo = band<D, kPad>;
    using cg = centre<D, kPad>;
    constexpr int kStride = geo::stride, kStrip = geo::strip, kN = geo::n_tiles, kC = geo::chunk;
    static_assert(centre_supported<D, kPad>(), "the centre kernel needs head_dim <= 64 and kPad >= 64");
    extern __shared__ uint4 shared_raw[];
    const backward_strips s = carve_backward_strips<D, kPad>(shared_raw);
    mb::bf16 *ds_centre = cg::ds_overlay ? s.v + kPad * kStride : reinterpret_cast<mb::bf16 *>(s.delta + kStrip);
    band_tile bt;
    if (!find_band_tile<D, kPad>(&bt, qkv, a)) return;
    /* group 0: what the early phase-1 chunks read; group 1: the rest of the Q, dO strips (the later chunks);
     * group 2: K, V outside the tile's rows (phase 2) */
    load_phase1<D, kPad>(s, bt, dout, lse, delta, a.heads, cg::early_rows);
    cp_async_commit();
    load_q_do<D>(s, bt, dout, cg::early_rows, kStrip);
    cp_async_commit();
    load_kv_outside<D, kPad>(s, bt);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const warp_band b = make_warp_band<kPad, kN>(bt.t, warp);
    const bool active = b.row0 < bt.t.end;
    /* this thread's key row and column pair of the centre's dSᵀ */
    mb::bf16 *ds_rows = ds_centre + (16 * warp + lane / 4) * cg::ds_stride + 2 * (lane % 4);
    uint32_t k_frag[shape<D>::k_steps][4], v_frag[shape<D>::k_steps][4];
    float dk[shape<D>::d_tiles][4], dv[shape<D>::d_tiles][4];
    cp_async_wait<2>();
    __syncthreads();
    if (active) {
#pragma unroll
        for (int ks = 0; ks < shape<D>::k_steps; ks++) {
            load_a<kStride>(k_frag[ks], s.k, kPad + 16 * warp, ks * 16);
            load_a<kStride>(v_frag[ks], s.v, kPad + 16 * warp, ks * 16);
        }
    }
    /* every warp holds its V fragments before anyone writes dSᵀ over V's centre rows */
    __syncthreads();
    if (active) {
        zero<shape<D>::d_tiles>(dk);
        zero<shape<D>::d_tiles>(dv);
#pragma unroll
        for (int c = 0; c < cg::early_chunks; c++)
            dkdv_chunk<D, kPad, true>(dk, dv, k_frag, v_frag, s, b, warp, c * kC, ds_rows, a.window, a.scale_log2);
    } else {
        /* keys past a short tile: their dSᵀ rows are 0 (phase 2 reads every centre row) */
        constexpr int pieces = kBandTile / 8; /* 16-byte pieces per dSᵀ row */
        for (int c = lane; c < 16 * pieces; c += mb::kWarpSize)
            *reinterpret_cast<uint4 *>(ds_centre + (16 * warp + c / pieces) * cg::ds_stride + 8 * (c % pieces)) =
                make_uint4(0u, 0u, 0u, 0u);
    }
    cp_async_wait<1>();
    __syncthreads();
    if (active) {
#pragma unroll
        for (int c = cg::early_chunks; c < cg::chunks; c++)
            dkdv_chunk<D, kPad, true>(dk, dv, k_frag, v_frag, s, b, warp, c * kC, ds_rows, a.window, a.scale_log2);
        store_dkdv<D>(dqkv, bt, b, dk, dv, a.scale, a.rope);
    }
    cp_async_wait<0>();
    __syncthreads();
    if (active) centre_dq<D, kPad>(dqkv, bt, b, s, ds_centre, warp, a.window, a.scale, a.scale_log2,
                                      a.rope);
}

/* ---- launchers ---- */

struct band_call {
    mb::attention_plan plan;
    cudaStream_t stream;
    band_args args; /* scale and scale_log2 are set per direction */
};

/* Raises the kernel's dynamic shared memory limit where needed, then launches it on the plan's grid. */
template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), size_t shared, const char *name, const band_call &c, mb_error *err,
           Args... args) {
    if (shared > 48 * 1024)
        MB_CUDA_CHECK(err, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared));
    kernel<<<c.plan.blocks, kBandThreads, shared, c.stream>>>(args...);
    MB_CUDA_CHECK_LAUNCH(err, name);
    return 0;
}

template <int D, int kPad>
int launch_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, band_call c, mb_error *err) {
    c.args.scale_log2 = kLog2e / sqrtf((float)D);
    return launch(band_forward_kernel<D, kPad>, band<D, kPad>::fwd_bytes, "band_forward_kernel", c, err, out, lse,
                  qkv, c.args);
}

template <int D, int kPad>
int launch_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta, const mb::bf16 *qkv,
                    band_call c, mb_error *err) {
    c.args.scale = 1.0f / sqrtf((float)D);
    c.args.scale_log2 = kLog2e * c.args.scale;
    if constexpr (centre_supported<D, kPad>())
        return launch(band_backward_centre_kernel<D, kPad>, centre<D, kPad>::bytes, "band_backward_centre_kernel", c,
                      err, dqkv, dout, lse, delta, qkv, c.args);
    else
        return launch(band_backward_recompute_kernel<D, kPad>, band<D, kPad>::bwd_bytes,
                      "band_backward_recompute_kernel", c, err, dqkv, dout, lse, delta, qkv, c.args);
}

/* The strip pad for a window: 16, 64 or 128 (the smallest >= window; 0 if none fits). */
int pad_for(int head_dim, int window) {
    if (window < 0) return 0;
    if (window <= 16) return 16;
    if (window <= 64) return 64;
    if (window <= 128 && head_dim <= 64) return 128;
    return 0;
}

/* Calls launch(D, kPad) with D and kPad as std::integral_constant for a shape that mb_attention_band_supports. */
template <typename Launch>
int with_shape(int head_dim, int window, Launch launch_shape) {
    using d32 = std::integral_constant<int, 32>;
    using d64 = std::integral_constant<int, 64>;
    using d128 = std::integral_constant<int, 128>;
    using p16 = std::integral_constant<int, 16>;
    const int pad = pad_for(head_dim, window);
    switch (head_dim) {
    case 32:
        return pad == 16 ? launch_shape(d32{}, p16{})
               : pad == 64 ? launch_shape(d32{}, d64{})
                           : launch_shape(d32{}, d128{});
    case 64:
        return pad == 16 ? launch_shape(d64{}, p16{})
               : pad == 64 ? launch_shape(d64{}, d64{})
                           : launch_shape(d64{}, d128{});
    default:
        return pad == 16 ? launch_shape(d128{}, p16{}) : launch_shape(d128{}, d64{});
    }
}

int check_call(const char *what, const void *qkv, const band_call &c, int n, int head_dim, mb_error *err) {
    const band_args &a = c.args;
    MB_REQUIRE(err, qkv && a.cu_seqlens && c.plan.seq_first && c.plan.tile_seq, "%s: missing qkv, cu_seqlens or plan",
               what);
    MB_REQUIRE(err, a.num_seqs >= 1 && n >= a.num_seqs && a.heads >= 1, "%s: bad shape num_seqs %d, n %d, heads %d",
               what, a.num_seqs, n, a.heads);
    MB_REQUIRE(err, mb_attention_band_supports(head_dim, a.window),
               "%s: head_dim %d with window %d is not supported (head_dim 32/64: window 0..128, 128: 0..64)", what,
               head_dim, a.window);
    MB_REQUIRE(err, c.plan.tile == kBandTile, "%s: plan.tile is %d, the band kernels need %d", what, c.plan.tile,
               kBandTile);
    MB_REQUIRE(err, c.plan.blocks >= (unsigned)a.heads && c.plan.blocks % (unsigned)a.heads == 0,
               "%s: plan.blocks %u is not a multiple of heads %d", what, c.plan.blocks, a.heads);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(qkv) % 16 == 0, "%s: qkv must be 16-byte aligned", what);
    return 0;
}

band_call make_call(const int32_t *cu_seqlens, mb::attention_plan plan, int num_seqs, int heads, int window,
                    cudaStream_t stream) {
    return {plan, stream, {cu_seqlens, plan.seq_first, plan.tile_seq, num_seqs, heads, window, 0.0f, 0.0f, nullptr}};
}

}  // namespace

bool mb_attention_band_supports(int head_dim, int window) {
    return (head_dim == 32 || head_dim == 64 || head_dim == 128) && pad_for(head_dim, window) != 0;
}

int mb_attention_band_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                              mb::attention_plan plan, int num_seqs, int n, int heads, int head_dim, int window,
                              cudaStream_t stream, mb_error *err) {
    const band_call c = make_call(cu_seqlens, plan, num_seqs, heads, window, stream);
    if (check_call("attention_band_forward", qkv, c, n, head_dim, err) != 0) return -1;
    MB_REQUIRE(err, out && lse, "attention_band_forward: missing out or lse");
    MB_NVTX_RANGE("attention_band_forward");
    if (mb_attention_band_wgmma_supports(head_dim, window, false))
        return mb_attention_band_wgmma_forward(out, lse, qkv, cu_seqlens, plan, num_seqs, heads, window, stream, err);
    return with_shape(head_dim, window, [&](auto d, auto pad) {
        return launch_forward<decltype(d)::value, decltype(pad)::value>(out, lse, qkv, c, err);
    });
}

int mb_attention_band_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                               const mb::bf16 *qkv, const int32_t *cu_seqlens, mb::attention_plan plan,
                               int num_seqs, int n, int heads, int head_dim, int window, const float2 *rope,
                               cudaStream_t stream, mb_error *err) {
    band_call c = make_call(cu_seqlens, plan, num_seqs, heads, window, stream);
    c.args.rope = rope;
    if (check_call("attention_band_backward", qkv, c, n, head_dim, err) != 0) return -1;
    MB_REQUIRE(err, dqkv && dout && lse && delta, "attention_band_backward: missing dqkv, dout, lse or delta");
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(dout) % 16 == 0, "attention_band_backward: dout must be 16-byte aligned");
    MB_NVTX_RANGE("attention_band_backward");
    if (mb_attention_band_wgmma_supports(head_dim, window, true))
        return mb_attention_band_wgmma_backward(dqkv, dout, lse, delta, qkv, cu_seqlens, plan, num_seqs, heads, window,
                                                rope, stream, err);
    return with_shape(head_dim, window, [&](auto d, auto pad) {
        return launch_backward<decltype(d)::value, decltype(pad)::value>(dqkv, dout, lse, delta, qkv, c, err);
    });
}
