/* Scaled dot-product attention over a packed variable-length batch, as src/cpu/attention.c, on tensor cores.
 *
 * For query i of sequence [b, e) and head h the visible keys are j ∈ [b, e) with |i − j| <= window (window < 0: all).
 * scale = 1/sqrt(d).
 * forward:  s_ij = (q_i · k_j)·scale,  lse_i = log Σ_j exp(s_ij),  o_i = Σ_j exp(s_ij − lse_i) v_j
 * backward: p_ij = exp(s_ij − lse_i),  dp_ij = do_i · v_j,  D_i = do_i · o_i,  ds_ij = p_ij (dp_ij − D_i)
 *           dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i,  dv_j = Σ_i p_ij do_i
 *
 * Layout: qkv [n, 3H] bf16 (Q | K | V, heads contiguous), out/dout [n, H] bf16, lse [n, heads] fp32 (natural log).
 *
 * Tiling (FlashAttention-2 style; v4, design and floors in docs/kernels/attention.md). v4 gives each warp kRB = 2
 * row blocks of 16 (32 rows) so that every K/V (forward) or Q/dO (backward) fragment from shared memory feeds two
 * MMAs per n-tile: forward <D, 4, 2> and atomic backward <D, 4, 2> (128-key blocks) for head_dim <= 64; kRB = 1 is
 * v3 (8 × 16 forward rows, 4 × 16 backward keys), kept for head_dim 128, local layers' backward, and selectable per
 * call with MB_ATTENTION_FWD=v3 / MB_ATTENTION_BWD=v3. The v3 description below reads per row block:
 *  - Sequences are cut into tiles (128 tokens for the forward, 64 for the backward) that never straddle a sequence.
 *    A one-block plan kernel orders the sequences longest first (buckets of
 *    floor(log2(tiles)), index order inside a bucket) and writes, per sequence, its first tile and, per tile, its
 *    sequence. Block x of a launch is (tile x / heads, head x % heads): all heads of the longest tiles start first.
 *    The grid is sized from n and num_seqs alone (ceil(n/tile) + num_seqs bounds the tile count): no host read-back.
 *  - Warps own 16 rows each. Products use mma.sync m16n8k16 (bf16 in, fp32 accumulate) with operands from shared
 *    memory through ldmatrix (rows padded by 16 bytes: conflict-free); score accumulators are re-packed in registers
 *    as the A operand of the next product (P·V, dS·K, ...). Global -> shared copies are cp.async (16 bytes, zero-fill
 *    past the sequence), double-buffered: the next tile loads while the current one is multiplied.
 *  - Forward: 8 warps, 128 queries per block, Q fragments held in registers; 64-key tiles over the visible key range
 *    [max(b, q0 − w), min(e, q1 + w)); a warp skips key tiles outside its own rows' window; masks only on boundary
 *    tiles; online softmax in fp32 with exp2 (scores times scale·log2 e folded into one FMA).
 *  - Backward, deterministic = 0 (FlashAttention-2, v3): one block of 4 warps per 64-key tile (3 blocks per SM at
 *    head_dim 64) owns dK and dV in registers and loops over 32-query steps of the queries that see it (5 tile
 *    products, 2 barriers per step); Pᵀ and dSᵀ are packed to bf16 in registers, dSᵀ goes to shared memory as
 *    [key][query] and the block's contribution dS·K to dQ is added with 16-byte vector reductions
 *    (red.global.add.v4.f32) into an fp32 [n, H] accumulator (zeroed by the D_i kernel), which a last kernel scales
 *    and converts into the dQ block of dqkv. A 128-key, 8-warp instantiation is kept for benchmarks.
 *  - Backward, deterministic = 1 (no atomics): one kernel per 64-key tile owns dK and dV, a second per 64-query tile
 *    owns dQ and recomputes P and dP (7 tile products). Every element of dqkv is written exactly once.
 *  - head_dim 32, 64 and 128 (template); any sequence length, tails masked and zero-filled. */
#include <cstdlib>
#include <cstring>

#include "attention_band.h"
#include "attention_mma.cuh"
#include "attention_wgmma_bwd.h"
#include "attention_wgmma_fwd.h"
#include "ops.h"

namespace {

constexpr int kPlanThreads = 1024;
constexpr int kMinTile = 64;                  /* smallest tile of any launch: sizes the tile -> sequence map */
constexpr int kFwdQueries = 128, kKeyTile = 64; /* forward: queries per block, keys per K/V tile */
constexpr int kDetWarps = 4, kDetTile = 16 * kDetWarps;

/* ---- the tile plan: longest sequences first ---- */

/* Exclusive scan of `local` over the block (kPlanThreads threads); *total gets the block sum. `warp_totals` holds 32
 * ints; the leading barrier lets the function be called in a loop. */
__device__ void plan_scan(int local, int *exclusive, int *total, int *warp_totals) {
    int lane = threadIdx.x % mb::kWarpSize, warp = threadIdx.x / mb::kWarpSize;
    int inclusive = local;
#pragma unroll
    for (int offset = 1; offset < mb::kWarpSize; offset <<= 1) {
        int value = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += value;
    }
    __syncthreads(); /* the previous call's readers are done with warp_totals */
    if (lane == mb::kWarpSize - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int sum = warp_totals[lane];
#pragma unroll
        for (int offset = 1; offset < mb::kWarpSize; offset <<= 1) {
            int value = __shfl_up_sync(0xffffffffu, sum, offset);
            if (lane >= offset) sum += value;
        }
        warp_totals[lane] = sum;
    }
    __syncthreads();
    *exclusive = inclusive - local + (warp > 0 ? warp_totals[warp - 1] : 0);
    *total = warp_totals[kPlanThreads / mb::kWarpSize - 1];
}

__device__ __forceinline__ int tile_count(const int32_t *cu_seqlens, int s, int tile) {
    return mb::ceil_div(cu_seqlens[s + 1] - cu_seqlens[s], tile);
}

/* Length bucket: floor(log2(tiles)), tiles >= 1. Larger buckets are placed first. */
__device__ __forceinline__ int length_bucket(int tiles) { return 31 - __clz(tiles); }

/* What the wgmma backward's plan adds: its tail split (attention_wgmma_bwd.h) for a grid of `grid` blocks, the
 * pieces limited by the query steps (kWgmmaBackwardStep queries, counted in cu_queries) of every tail item. */
struct split_request {
    int32_t *words; /* [kWgmmaSplitWords], or nullptr: no split planned */
    const int32_t *cu_queries;
    int heads;
    unsigned grid;
};

/* The split words for `tiles` planned tiles (all threads of the plan kernel; tile_seq written by the block). */
__device__ void plan_split(const split_request &split, const int32_t *tile_seq, int tiles) {
    __shared__ int fewest_steps, planned_pieces;
    const unsigned items = (unsigned)tiles * split.heads, grid = split.grid;
    const unsigned tail = mb_wgmma_split_tail(items, grid);
    if (threadIdx.x == 0) fewest_steps = kWgmmaSplitMaxPieces;
    __syncthreads(); /* also: every thread's tile_seq writes are visible */
    const int pieces = mb_wgmma_split_pieces(tail, grid);
    for (unsigned k = threadIdx.x; pieces > 1 && k < tail; k += blockDim.x) {
        const int s = tile_seq[(items - tail + k) / split.heads];
        atomicMin(&fewest_steps, mb::ceil_div(split.cu_queries[s + 1] - split.cu_queries[s], kWgmmaBackwardStep));
    }
    __syncthreads();
    if (threadIdx.x == 0) planned_pieces = mb_wgmma_split_words(split.words, items, grid, fewest_steps);
    __syncthreads();
    for (unsigned k = threadIdx.x; planned_pieces > 1 && k < tail; k += blockDim.x)
        split.words[4 + k] = 0; /* the counters */
}

/* seq_first[s] = the first tile of sequence s in launch order, seq_first[num_seqs] = the tile count;
 * tile_seq[x] = the sequence of tile x. Sequences in descending length buckets, index order inside a bucket. With a
 * split request, also the wgmma backward's split words. */
__global__ void __launch_bounds__(kPlanThreads)
    tile_plan_kernel(int32_t *seq_first, int32_t *tile_seq, const int32_t *cu_seqlens, int num_seqs, int tile,
                     split_request split) {
    static_assert(kPlanThreads == mb::kWarpSize * mb::kWarpSize, "plan_scan scans 32 warp totals in one warp");
    __shared__ int warp_totals[kPlanThreads / mb::kWarpSize];
    __shared__ unsigned present;
    if (threadIdx.x == 0) present = 0;
    __syncthreads();
    int per_thread = mb::ceil_div(num_seqs, kPlanThreads);
    int begin = min(num_seqs, (int)threadIdx.x * per_thread), end = min(num_seqs, begin + per_thread);
    unsigned mine = 0;
    for (int s = begin; s < end; s++) { /* an empty sequence (no asked-for rows, the _rows calls) gets no tile */
        int tiles = tile_count(cu_seqlens, s, tile);
        if (tiles > 0) mine |= 1u << length_bucket(tiles);
        else seq_first[s] = 0; /* never read: no tile names s */
    }
    if (mine != 0) atomicOr(&present, mine);
    __syncthreads();
    unsigned buckets = present; /* the same in every thread */
    int placed = 0;             /* tiles of the buckets already placed */
    while (buckets != 0) {
        int bucket = 31 - __clz(buckets);
        buckets &= ~(1u << bucket);
        int local = 0;
        for (int s = begin; s < end; s++) {
            int tiles = tile_count(cu_seqlens, s, tile);
            if (tiles > 0 && length_bucket(tiles) == bucket) local += tiles;
        }
        int exclusive, total;
        plan_scan(local, &exclusive, &total, warp_totals);
        int running = placed + exclusive;
        for (int s = begin; s < end; s++) {
            int tiles = tile_count(cu_seqlens, s, tile);
            if (tiles == 0 || length_bucket(tiles) != bucket) continue;
            seq_first[s] = running;
            for (int t = 0; t < tiles; t++) tile_seq[running + t] = s;
            running += tiles;
        }
        placed += total;
    }
    if (threadIdx.x == 0) seq_first[num_seqs] = placed;
    if (split.words != nullptr) plan_split(split, tile_seq, placed); /* uniform */
}

/* ---- forward ---- */

/* Forward block shapes: 128 queries (kFwdQueries) = kWarps warps × kRB row blocks of 16. v4 (<4, 2>, head_dim <= 64):
 * 4 warps of 32 rows, every K/V fragment feeds two row blocks, up to 255 registers (2 blocks per SM); v3 (<8, 1>,
 * head_dim 128 and MB_ATTENTION_FWD=v3): 8 warps of 16 rows, 2 blocks per SM at head_dim <= 64 (128 registers). */
template <int D, int kWarps, int kRB>
struct fwd_shape {
    static_assert(kWarps * 16 * kRB == kFwdQueries, "a forward block covers kFwdQueries rows");
    static constexpr int kThreads = kWarps * mb::kWarpSize;
    static constexpr int kMinBlocks = kRB == 2 ? 2 : (D <= 64 ? 2 : 1);
};

template <int D, int kWarps, int kRB>
__global__ void __launch_bounds__(fwd_shape<D, kWarps, kRB>::kThreads, fwd_shape<D, kWarps, kRB>::kMinBlocks)
    attention_forward_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                             const int32_t *seq_first, const int32_t *tile_seq, int num_seqs, int heads, int window,
                             float scale_log2) {
    constexpr int kThreads = fwd_shape<D, kWarps, kRB>::kThreads, kStride = shape<D>::stride, kN = kKeyTile / 8;
    constexpr int kRows = 16 * kRB; /* rows per warp */
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *kv_tiles = q_tile + kFwdQueries * kStride; /* [stage][K, V][kKeyTile rows] */
    tile_position t;
    int head;
    if (!find_tile(&t, &head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kFwdQueries)) return;
    const int hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    int key_lo, key_hi;
    partner_range(t, window, &key_lo, &key_hi);
    const int key_tiles = mb::ceil_div(key_hi - key_lo, kKeyTile);

    /* group 0: the query tile and the first key/value tile */
    load_rows_async<D, kThreads>(q_tile, q_base, qkv_stride, t.start, t.end, kFwdQueries);
    load_rows_async<D, kThreads>(kv_tiles, k_base, qkv_stride, key_lo, key_hi, kKeyTile);
    load_rows_async<D, kThreads>(kv_tiles + kKeyTile * kStride, v_base, qkv_stride, key_lo, key_hi, kKeyTile);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize, quad = lane % 4;
    /* row block rb of this warp: rows row0 + 16·rb ..; this thread's rows row_a + 16·rb (+ 8 for the upper half) */
    const int row0 = t.start + warp * kRows, row_a = row0 + lane / 4, row_last = min(row0 + kRows - 1, t.end - 1);
    const bool warp_rows = row0 < t.end; /* false: this warp's rows are past the tile (a short tile) */
    uint32_t q_frag[kRB][shape<D>::k_steps][4];
    float o[kRB][shape<D>::d_tiles][4];
    float row_max[kRB][2], row_sum[kRB][2]; /* row_max in scaled (log2) units */
#pragma unroll
    for (int rb = 0; rb < kRB; rb++) {
        zero<shape<D>::d_tiles>(o[rb]);
        row_max[rb][0] = row_max[rb][1] = -INFINITY;
        row_sum[rb][0] = row_sum[rb][1] = 0.0f;
    }

    for (int i = 0; i < key_tiles; i++) {
        const int k0 = key_lo + i * kKeyTile;
        if (i + 1 < key_tiles) { /* prefetch the next key/value tile into the other stage */
            mb::bf16 *next = kv_tiles + ((i + 1) & 1) * 2 * kKeyTile * kStride;
            load_rows_async<D, kThreads>(next, k_base, qkv_stride, k0 + kKeyTile, key_hi, kKeyTile);
            load_rows_async<D, kThreads>(next + kKeyTile * kStride, v_base, qkv_stride, k0 + kKeyTile, key_hi,
                                         kKeyTile);
        }
        cp_async_commit(); /* possibly empty: keeps "all but the newest group" meaning tile i */
        cp_async_wait<1>();
        __syncthreads();
        if (i == 0) {
#pragma unroll
            for (int rb = 0; rb < kRB; rb++)
#pragma unroll
                for (int ks = 0; ks < shape<D>::k_steps; ks++)
                    load_a<kStride>(q_frag[rb][ks], q_tile, warp * kRows + 16 * rb, ks * 16);
        }
        const mb::bf16 *k_tile = kv_tiles + (i & 1) * 2 * kKeyTile * kStride, *v_tile = k_tile + kKeyTile * kStride;
        const int k_last = k0 + kKeyTile - 1;
        if (warp_rows && blocks_meet(row0, row_last, k0, k_last, window)) {
            float s[kRB][kN][4];
#pragma unroll
            for (int rb = 0; rb < kRB; rb++) zero<kN>(s[rb]);
            scores_reg_rb<D, kN, kRB>(s, q_frag, k_tile);
            if (k_last >= key_hi || !blocks_inside(row0, row_last, k0, k_last, window)) {
#pragma unroll
                for (int rb = 0; rb < kRB; rb++)
#pragma unroll
                    for (int j = 0; j < kN; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int query = row_a + 16 * rb + 8 * (e / 2), key = k0 + j * 8 + 2 * quad + (e & 1);
                            if (!(key < key_hi && visible(query, key, window))) s[rb][j][e] = -INFINITY;
                        }
            }
#pragma unroll
            for (int rb = 0; rb < kRB; rb++)
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    float tile_max = -INFINITY;
#pragma unroll
                    for (int j = 0; j < kN; j++)
                        tile_max = fmaxf(tile_max, fmaxf(s[rb][j][2 * half], s[rb][j][2 * half + 1]));
                    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
                    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
                    float new_max = fmaxf(row_max[rb][half], tile_max * scale_log2);
                    float reference = new_max == -INFINITY ? 0.0f : new_max; /* a row with nothing visible yet */
                    float correction = fast_exp2(row_max[rb][half] - reference);
                    row_sum[rb][half] *= correction;
#pragma unroll
                    for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
                        o[rb][dt][2 * half] *= correction;
                        o[rb][dt][2 * half + 1] *= correction;
                    }
#pragma unroll
                    for (int j = 0; j < kN; j++)
#pragma unroll
                        for (int e = 2 * half; e < 2 * half + 2; e++) {
                            /* scale and max folded into one FMA; -inf (masked) -> 0 */
                            float p = fast_exp2(fmaf(s[rb][j][e], scale_log2, -reference));
                            s[rb][j][e] = p;
                            row_sum[rb][half] += p;
                        }
                    row_max[rb][half] = new_max;
                }
            accumulate_pv_rb<D, kN, kRB>(o, s, v_tile);
        }
        __syncthreads(); /* the stage read here is refilled by the next iteration's prefetch */
    }

#pragma unroll
    for (int rb = 0; rb < kRB; rb++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float sum = row_sum[rb][half];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            int query = row_a + 16 * rb + 8 * half;
            if (query >= t.end) continue;
            float inverse = 1.0f / sum;
#pragma unroll
            for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
                mb::bf162 pair =
                    __floats2bfloat162_rn(o[rb][dt][2 * half] * inverse, o[rb][dt][2 * half + 1] * inverse);
                *reinterpret_cast<mb::bf162 *>(out + (size_t)query * hidden + head * D + dt * 8 + 2 * quad) = pair;
            }
            if (quad == 0) lse[(size_t)query * heads + head] = (row_max[rb][half] + log2f(sum)) * kLn2;
        }
}

/* ---- backward ---- */

/* D_i = do_i · o_i per (token, head) = pair (dout and out are [pairs, D]): one thread per 8 elements (16-byte loads),
 * the D/8 threads of a pair summed by shuffles in a fixed order. With dq_accum, also zeroes the pair's D floats of
 * the dQ accumulator of the atomic backward (two 16-byte stores per thread): at [n, H] (dq_rows 0) or in the
 * head-major layout of the wgmma backward (dq_rows rows per head; a pair's row is zeroed whole, so the block
 * permutation inside it does not matter). */
template <int D>
__global__ void attention_delta_kernel(float *delta, float *dq_accum, const mb::bf16 *dout, const mb::bf16 *out,
                                       size_t pairs, int heads, size_t dq_rows) {
    constexpr int kLanes = D / 8; /* 4, 8 or 16: a pair's threads sit inside one warp */
    static_assert(mb::kWarpSize % kLanes == 0, "a pair's threads must share a warp");
    size_t g = blockIdx.x * (size_t)blockDim.x + threadIdx.x, pair = g / kLanes, element = g * 8;
    float sum = 0.0f;
    if (pair < pairs) {
        float x[8], y[8];
        mb::unpack_bf16x8(mb::load_bf16x8(dout + element), x);
        mb::unpack_bf16x8(mb::load_bf16x8(out + element), y);
#pragma unroll
        for (int k = 0; k < 8; k++) sum = fmaf(x[k], y[k], sum);
        if (dq_accum != nullptr) {
            const size_t pair_row = dq_rows == 0 ? pair : (pair % heads) * dq_rows + pair / heads;
            float4 *to = reinterpret_cast<float4 *>(dq_accum + pair_row * D + (g % kLanes) * 8);
            to[0] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            to[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (pair < pairs && g % kLanes == 0) delta[pair] = sum;
}

/* Deterministic dQ for one 64-query tile: loops over the visible key tiles (double-buffered), recomputing P and dP. */
template <int D>
__global__ void __launch_bounds__(kDetWarps *mb::kWarpSize)
    attention_dq_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                        const mb::bf16 *qkv, const int32_t *cu_seqlens, const int32_t *seq_first,
                        const int32_t *tile_seq, int num_seqs, int heads, int window, float scale, float scale_log2) {
    constexpr int kThreads = kDetWarps * mb::kWarpSize, kStride = shape<D>::stride, kN = kDetTile / 8;
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *do_tile = q_tile + kDetTile * kStride;
    mb::bf16 *kv_tiles = do_tile + kDetTile * kStride; /* [stage][K, V][kDetTile rows] */
    tile_position t;
    int head;
    if (!find_tile(&t, &head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kDetTile)) return;
    const int hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    int key_lo, key_hi;
    partner_range(t, window, &key_lo, &key_hi);
    const int key_tiles = mb::ceil_div(key_hi - key_lo, kDetTile);
    load_rows_async<D, kThreads>(q_tile, q_base, qkv_stride, t.start, t.end, kDetTile);
    load_rows_async<D, kThreads>(do_tile, dout + head * D, hidden, t.start, t.end, kDetTile);
    load_rows_async<D, kThreads>(kv_tiles, k_base, qkv_stride, key_lo, key_hi, kDetTile);
    load_rows_async<D, kThreads>(kv_tiles + kDetTile * kStride, v_base, qkv_stride, key_lo, key_hi, kDetTile);
    cp_async_commit();

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const int quad = lane % 4, row_a = t.start + warp * 16 + lane / 4;
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int query = row_a + 8 * half;
        bool valid = query < t.end;
        row_lse[half] = valid ? lse[(size_t)query * heads + head] * kLog2e : 0.0f;
        row_delta[half] = valid ? delta[(size_t)query * heads + head] : 0.0f;
    }
    float dq[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dq);

    for (int i = 0; i < key_tiles; i++) {
        const int k0 = key_lo + i * kDetTile;
        if (i + 1 < key_tiles) {
            mb::bf16 *next = kv_tiles + ((i + 1) & 1) * 2 * kDetTile * kStride;
            load_rows_async<D, kThreads>(next, k_base, qkv_stride, k0 + kDetTile, key_hi, kDetTile);
            load_rows_async<D, kThreads>(next + kDetTile * kStride, v_base, qkv_stride, k0 + kDetTile, key_hi,
                                         kDetTile);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const mb::bf16 *k_tile = kv_tiles + (i & 1) * 2 * kDetTile * kStride, *v_tile = k_tile + kDetTile * kStride;
        float s[kN][4], dp[kN][4];
        zero<kN>(s);
        zero<kN>(dp);
        scores<D, kN>(s, q_tile, warp * 16, k_tile);
        scores<D, kN>(dp, do_tile, warp * 16, v_tile);
#pragma unroll
        for (int j = 0; j < kN; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int half = e / 2, query = row_a + 8 * half, key = k0 + j * 8 + 2 * quad + (e & 1);
                bool ok = query < t.end && key < key_hi && visible(query, key, window);
                float p = ok ? fast_exp2(s[j][e] * scale_log2 - row_lse[half]) : 0.0f;
                s[j][e] = p * (dp[j][e] - row_delta[half]); /* dS */
            }
        accumulate_pv<D, kN>(dq, s, k_tile);
        __syncthreads();
    }
    store_rows<D>(dqkv + head * D, qkv_stride, dq, row_a, t.end, scale);
}

/* What both dK/dV kernels know of their key tile: where it is, the queries that see it ([query_lo, query_hi) in
 * query_steps steps of kQ), and the tensors its head's rows are read from (the kernel's arguments: the row bases are
 * formed where they are used, as the kernels did before this struct, which keeps their register counts). */
struct key_tile {
    tile_position t;
    int head, heads, query_lo, query_hi, query_steps;
    const mb::bf16 *qkv, *dout;
    const float *lse, *delta;
};

/* The block's tile of kKeys keys; false for the spare blocks past the last tile (uniform over the block). */
template <int kKeys, int kQ>
__device__ __forceinline__ bool find_key_tile(key_tile *k, const mb::bf16 *qkv, const mb::bf16 *dout, const float *lse,
                                              const float *delta, const int32_t *cu_seqlens, const int32_t *seq_first,
                                              const int32_t *tile_seq, int num_seqs, int heads, int window) {
    if (!find_tile(&k->t, &k->head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kKeys)) return false;
    k->heads = heads;
    k->qkv = qkv;
    k->dout = dout;
    k->lse = lse;
    k->delta = delta;
    partner_range(k->t, window, &k->query_lo, &k->query_hi);
    k->query_steps = mb::ceil_div(k->query_hi - k->query_lo, kQ);
    return true;
}

/* Shared-memory layout of the query side of the dK/dV kernels: per stage Q and dO tiles [kQ rows], then per stage
 * lse and D_i [kQ floats]. */
template <int D, int kQueries = shape<D>::dkdv_queries>
struct query_stages {
    static constexpr int kQ = kQueries;
    static constexpr int kRows = kQ * shape<D>::stride; /* bf16 per tile */
    static constexpr size_t bytes = 2 * 2 * shape<D>::tile_bytes(kQ) + 2 * 2 * kQ * sizeof(float);
    mb::bf16 *base;
    float *floats;
    __device__ explicit query_stages(mb::bf16 *start) : base(start), floats(reinterpret_cast<float *>(start + 4 * kRows)) {}
    /* computed, not indexed arrays: a run-time index into a pointer array would live in local memory */
    __device__ mb::bf16 *q(int stage) const { return base + 2 * stage * kRows; }
    __device__ mb::bf16 *dout(int stage) const { return base + (2 * stage + 1) * kRows; }
    __device__ float *lse(int stage) const { return floats + 2 * stage * kQ; }
    __device__ float *delta(int stage) const { return floats + (2 * stage + 1) * kQ; }
    /* queues Q, dO, lse and D_i of the tile's query step `step` (zeros past query_hi) into stage step % 2 */
    template <int kThreads>
    __device__ void load(int step, const key_tile &k) const {
        const int stage = step & 1, q0 = k.query_lo + step * kQ, hidden = k.heads * D;
        load_rows_async<D, kThreads>(q(stage), k.qkv + k.head * D, 3 * (size_t)hidden, q0, k.query_hi, kQ);
        load_rows_async<D, kThreads>(dout(stage), k.dout + k.head * D, hidden, q0, k.query_hi, kQ);
        load_floats_async<kThreads>(lse(stage), k.lse + k.head, k.heads, q0, k.query_hi, kQ);
        load_floats_async<kThreads>(delta(stage), k.delta + k.head, k.heads, q0, k.query_hi, kQ);
    }
    /* Before the loop: the tile's K and V rows and query step 0, one cp.async group. */
    template <int kThreads, int kKeys>
    __device__ void start(const key_tile &k, mb::bf16 *k_tile, mb::bf16 *v_tile) const {
        const int hidden = k.heads * D;
        const mb::bf16 *k_base = k.qkv + hidden + k.head * D, *v_base = k_base + hidden;
        load_rows_async<D, kThreads>(k_tile, k_base, 3 * (size_t)hidden, k.t.start, k.t.end, kKeys);
        load_rows_async<D, kThreads>(v_tile, v_base, 3 * (size_t)hidden, k.t.start, k.t.end, kKeys);
        load<kThreads>(0, k);
        cp_async_commit();
    }
    /* At the top of query step i: queues step i + 1 (if any) into the other stage, waits for step i, then the
     * block's barrier. The stage refilled here was last read before the previous step's last barrier. */
    template <int kThreads>
    __device__ void next(int i, const key_tile &k) const {
        if (i + 1 < k.query_steps) load<kThreads>(i + 1, k);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
    }
};

/* Deterministic dK and dV for one 64-key tile: loops over the query tiles that see it (double-buffered). */
template <int D>
__global__ void __launch_bounds__(kDetWarps *mb::kWarpSize)
    attention_dkdv_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                          const mb::bf16 *qkv, const int32_t *cu_seqlens, const int32_t *seq_first,
                          const int32_t *tile_seq, int num_seqs, int heads, int window, float scale,
                          float scale_log2) {
    constexpr int kThreads = kDetWarps * mb::kWarpSize, kStride = shape<D>::stride, kQ = shape<D>::dkdv_queries;
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *k_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *v_tile = k_tile + kDetTile * kStride;
    query_stages<D> stages(v_tile + kDetTile * kStride);
    key_tile k;
    if (!find_key_tile<kDetTile, kQ>(&k, qkv, dout, lse, delta, cu_seqlens, seq_first, tile_seq, num_seqs, heads,
                                        window))
        return;
    const tile_position &t = k.t;
    const int query_hi = k.query_hi;
    stages.template start<kThreads, kDetTile>(k, k_tile, v_tile);

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const int quad = lane % 4, key_a = t.start + warp * 16 + lane / 4;
    float dk[shape<D>::d_tiles][4], dv[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dk);
    zero<shape<D>::d_tiles>(dv);

    for (int i = 0; i < k.query_steps; i++) {
        const int q0 = k.query_lo + i * kQ;
        stages.template next<kThreads>(i, k);
        const mb::bf16 *q_tile = stages.q(i & 1), *do_tile = stages.dout(i & 1);
        const float *lse_tile = stages.lse(i & 1), *delta_tile = stages.delta(i & 1);
        float s[kQ / 8][4], dp[kQ / 8][4]; /* transposed: rows are this warp's keys, columns the queries */
        zero<kQ / 8>(s);
        zero<kQ / 8>(dp);
        scores<D, kQ / 8>(s, k_tile, warp * 16, q_tile);
        scores<D, kQ / 8>(dp, v_tile, warp * 16, do_tile);
#pragma unroll
        for (int j = 0; j < kQ / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = key_a + 8 * (e / 2), column = j * 8 + 2 * quad + (e & 1), query = q0 + column;
                bool ok = query < query_hi && key < t.end && visible(query, key, window);
                float p = ok ? fast_exp2(fmaf(s[j][e], scale_log2, -lse_tile[column] * kLog2e)) : 0.0f;
                s[j][e] = p;
                dp[j][e] = p * (dp[j][e] - delta_tile[column]); /* dSᵀ */
            }
        accumulate_pv<D, kQ / 8>(dv, s, do_tile);
        accumulate_pv<D, kQ / 8>(dk, dp, q_tile);
        __syncthreads();
    }
    const int hidden = heads * D;
    store_rows<D>(dqkv + hidden + k.head * D, 3 * (size_t)hidden, dk, key_a, t.end, scale);
    store_rows<D>(dqkv + 2 * hidden + k.head * D, 3 * (size_t)hidden, dv, key_a, t.end, 1.0f);
}

/* Adds four consecutive floats (16-byte aligned) to global memory without reading them back: one vector reduction
 * on sm_90 (red.global.add.v4.f32), four scalar ones before. */
__device__ __forceinline__ void reduce_add4(float *address, float x, float y, float z, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(address), "f"(x), "f"(y), "f"(z), "f"(w)
                 : "memory");
#else
    atomicAdd(address, x);
    atomicAdd(address + 1, y);
    atomicAdd(address + 2, z);
    atomicAdd(address + 3, w);
#endif
}

/* A fragment (16×16) at (row0, col0) of the TRANSPOSE of a row-major shared tile: element (r, c) of the fragment is
 * tile[col0 + c][row0 + r] (ldmatrix .trans; the row addresses are those of load_b_rows). */
template <int kStride>
__device__ __forceinline__ void load_a_trans(uint32_t a[4], const mb::bf16 *tile, int row0, int col0) {
    int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4_trans(a, tile + (col0 + (lane & 7) + ((lane >> 4) << 3)) * kStride + row0 + ((lane >> 3) & 1) * 8);
}

/* The atomic backward's shape: kWarps warps of kRB row blocks of 16 keys (16·kRB·kWarps keys per block), query steps
 * of kQ (register budget: S and dP hold kRB·kQ/2 floats each per thread), kMinBlocks blocks per SM (caps the registers
 * at 65536 / (kMinBlocks·32·kWarps)); the dQ product dS[kQ × keys]·K[keys × D] is split over the warps: each owns a
 * 16-query chunk and n_cols columns of D. Instances: <D, 4, 2> v4 default for head_dim <= 64 (128 keys, 32 per warp);
 * <D, 4, 1> v3 (64 keys; default at head_dim 128, MB_ATTENTION_BWD=v3 elsewhere); <D, 8, 1> the 128-key 8-warp
 * variant (MB_ATTENTION_BWD_KEYS=128). */
template <int D, int kWarps, int kRB>
struct bwd_shape {
    static constexpr int kRows = 16 * kRB; /* keys per warp */
    static constexpr int kKeys = kRows * kWarps, kQ = kWarps == 4 ? 32 : shape<D>::dkdv_queries, kDsStride = kQ + 8;
    static constexpr int kMinBlocks =
        kRB == 2 ? (D <= 32 ? 3 : 2) : (kWarps == 4 ? (D <= 32 ? 4 : D <= 64 ? 3 : 2) : 1);
    static constexpr int m_chunks = kQ / 16, n_parts = kWarps / m_chunks, n_cols = D / n_parts;
    static_assert(kWarps % m_chunks == 0 && D % n_parts == 0 && n_cols % 16 == 0, "dQ split of the warps");
    static constexpr size_t shared_bytes() {
        return 2 * shape<D>::tile_bytes(kKeys) + (size_t)kKeys * kDsStride * sizeof(mb::bf16) +
               query_stages<D, kQ>::bytes;
    }
};

/* FlashAttention-2 backward (v3 / v4) for one key tile of kKeys keys: dK and dV in registers over the query steps
 * that see the tile (Q, dO, lse, D_i double-buffered); per step dSᵀ goes to shared memory as [key][query] bf16
 * (paired 32-bit stores) and the block adds dS·K (A fragments by ldmatrix .trans) into the fp32 dQ accumulator [n, H]
 * (unscaled; the convert kernel applies the scale) with 16-byte vector reductions. Two barriers per step. With
 * kRB = 2 each Q / dO fragment read from shared memory feeds both of a warp's 16-key row blocks. */
template <int D, int kWarps, int kRB>
__global__ void __launch_bounds__(kWarps *mb::kWarpSize, bwd_shape<D, kWarps, kRB>::kMinBlocks)
    attention_backward_kernel(mb::bf16 *dqkv, float *dq_accum, const mb::bf16 *dout, const float *lse,
                              const float *delta, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                              const int32_t *seq_first, const int32_t *tile_seq, int num_seqs, int heads, int window,
                              float scale, float scale_log2) {
    using config = bwd_shape<D, kWarps, kRB>;
    constexpr int kThreads = kWarps * mb::kWarpSize, kKeys = config::kKeys, kStride = shape<D>::stride;
    constexpr int kQ = config::kQ, kDsStride = config::kDsStride, kNq = kQ / 8, kRows = config::kRows;
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *k_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *v_tile = k_tile + kKeys * kStride, *ds_tile = v_tile + kKeys * kStride; /* ds: [kKeys][kDsStride] */
    query_stages<D, kQ> stages(ds_tile + kKeys * kDsStride);
    key_tile k;
    if (!find_key_tile<kKeys, kQ>(&k, qkv, dout, lse, delta, cu_seqlens, seq_first, tile_seq, num_seqs, heads,
                                     window))
        return;
    const tile_position &t = k.t;
    const int head = k.head, hidden = heads * D, query_hi = k.query_hi;
    const size_t qkv_stride = 3 * (size_t)hidden;
    stages.template start<kThreads, kKeys>(k, k_tile, v_tile);

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize, quad = lane % 4;
    /* row block rb: keys key0 + 16·rb ..; this thread's keys key_a + 16·rb (+ 8 for the upper half) */
    const int key0 = t.start + warp * kRows, key_a = key0 + lane / 4, key_last = min(key0 + kRows - 1, t.end - 1);
    const bool warp_keys = key0 < t.end; /* false: this warp's keys are past the tile (a short tile) */
    const int m0 = (warp % config::m_chunks) * 16, n0 = (warp / config::m_chunks) * config::n_cols;
    mb::bf16 *ds_rows = ds_tile + (warp * kRows + lane / 4) * kDsStride + 2 * quad; /* this thread's dSᵀ row, pair */
    float dk[kRB][shape<D>::d_tiles][4], dv[kRB][shape<D>::d_tiles][4];
#pragma unroll
    for (int rb = 0; rb < kRB; rb++) {
        zero<shape<D>::d_tiles>(dk[rb]);
        zero<shape<D>::d_tiles>(dv[rb]);
    }

    for (int i = 0; i < k.query_steps; i++) {
        const int q0 = k.query_lo + i * kQ, q_last = q0 + kQ - 1;
        /* ds_tile is rewritten only after this step's first barrier (in stages.next), which every warp reaches after
         * its dQ product of the previous step: two barriers per step suffice. */
        stages.template next<kThreads>(i, k);
        const mb::bf16 *q_tile = stages.q(i & 1), *do_tile = stages.dout(i & 1);
        const float *lse_tile = stages.lse(i & 1), *delta_tile = stages.delta(i & 1);
        /* Sᵀ, then Pᵀ packed to bf16 pairs (the A operand of dV += Pᵀ·dO) so that only half the registers of it live
         * while dPᵀ is computed; dSᵀ = Pᵀ(dPᵀ − D) from the bf16 Pᵀ, packed likewise for dK += dSᵀ·Q and the dS
         * store. [rb][n-tile][row half]: bf16 pairs of columns 2·quad, 2·quad + 1. */
        uint32_t p_pk[kRB][kNq][2], ds_pk[kRB][kNq][2];
        if (warp_keys && blocks_meet(key0, key_last, q0, q_last, window)) {
            {
                float s[kRB][kNq][4]; /* transposed: rows are this warp's keys, columns the queries */
#pragma unroll
                for (int rb = 0; rb < kRB; rb++) zero<kNq>(s[rb]);
                scores_rb<D, kNq, kRB>(s, k_tile, warp * kRows, q_tile);
                if (q_last >= query_hi || key0 + kRows - 1 >= t.end ||
                    !blocks_inside(key0, key_last, q0, q_last, window)) { /* warp-uniform: boundary steps only */
#pragma unroll
                    for (int rb = 0; rb < kRB; rb++)
#pragma unroll
                        for (int j = 0; j < kNq; j++)
#pragma unroll
                            for (int e = 0; e < 4; e++) {
                                int key = key_a + 16 * rb + 8 * (e / 2), query = q0 + j * 8 + 2 * quad + (e & 1);
                                if (!(query < query_hi && key < t.end && visible(query, key, window)))
                                    s[rb][j][e] = -INFINITY; /* exp2 -> +0 */
                            }
                }
#pragma unroll
                for (int j = 0; j < kNq; j++) {
                    const float lse0 = lse_tile[j * 8 + 2 * quad] * kLog2e, lse1 = lse_tile[j * 8 + 2 * quad + 1] * kLog2e;
#pragma unroll
                    for (int rb = 0; rb < kRB; rb++)
#pragma unroll
                        for (int half = 0; half < 2; half++)
                            p_pk[rb][j][half] =
                                mb::pack_bf16x2(fast_exp2(fmaf(s[rb][j][2 * half], scale_log2, -lse0)),
                                                fast_exp2(fmaf(s[rb][j][2 * half + 1], scale_log2, -lse1)));
                }
            }
            accumulate_packed_rb<D, kNq, kRB>(dv, p_pk, do_tile);
            float dp[kRB][kNq][4];
#pragma unroll
            for (int rb = 0; rb < kRB; rb++) zero<kNq>(dp[rb]);
            scores_rb<D, kNq, kRB>(dp, v_tile, warp * kRows, do_tile);
#pragma unroll
            for (int j = 0; j < kNq; j++) {
                const float delta0 = delta_tile[j * 8 + 2 * quad], delta1 = delta_tile[j * 8 + 2 * quad + 1];
#pragma unroll
                for (int rb = 0; rb < kRB; rb++)
#pragma unroll
                    for (int half = 0; half < 2; half++) {
                        float2 p = __bfloat1622float2(*reinterpret_cast<const mb::bf162 *>(&p_pk[rb][j][half]));
                        ds_pk[rb][j][half] = mb::pack_bf16x2(p.x * (dp[rb][j][2 * half] - delta0),
                                                             p.y * (dp[rb][j][2 * half + 1] - delta1));
                    }
            }
            accumulate_packed_rb<D, kNq, kRB>(dk, ds_pk, q_tile);
        } else {
#pragma unroll
            for (int rb = 0; rb < kRB; rb++)
#pragma unroll
                for (int j = 0; j < kNq; j++) ds_pk[rb][j][0] = ds_pk[rb][j][1] = 0u;
        }
        /* dSᵀ (zeros for a warp that skipped) -> ds_tile[key][query], two queries per 32-bit store */
#pragma unroll
        for (int rb = 0; rb < kRB; rb++)
#pragma unroll
            for (int j = 0; j < kNq; j++)
#pragma unroll
                for (int half = 0; half < 2; half++)
                    *reinterpret_cast<uint32_t *>(ds_rows + (16 * rb + 8 * half) * kDsStride + j * 8) =
                        ds_pk[rb][j][half];
        __syncthreads();
        /* dQ[q0 + m0 .., n0 ..] += dS[m0 .., all keys] · K[all keys, n0 ..]; skipped (exactly: those dS rows are zero)
         * when the warp's 16 queries are past the sequence or see none of the tile's keys (warp-uniform). */
        const int chunk0 = q0 + m0;
        if (chunk0 < query_hi && blocks_meet(chunk0, chunk0 + 15, t.start, t.end - 1, window)) {
            float dq[config::n_cols / 8][4];
            zero<config::n_cols / 8>(dq);
#pragma unroll
            for (int ks = 0; ks < kKeys / 16; ks++) {
                uint32_t a[4];
                load_a_trans<kDsStride>(a, ds_tile, m0, ks * 16);
#pragma unroll
                for (int nt = 0; nt < config::n_cols / 8; nt += 2) {
                    uint32_t b[4];
                    load_b_cols<kStride>(b, k_tile, ks * 16, n0 + nt * 8);
                    mb::mma_bf16_16816(dq[nt], a, b[0], b[1]);
                    mb::mma_bf16_16816(dq[nt + 1], a, b[2], b[3]);
                }
            }
            /* Lane pairs (quad 2c, 2c + 1) swap halves: the even lane gets row g, columns 4c..4c+3 of each n-tile,
             * the odd lane row g + 8, the same columns; then one 16-byte reduction per n-tile. */
            const bool odd = quad & 1;
            const int query = chunk0 + lane / 4 + (odd ? 8 : 0);
            float *row = dq_accum + (size_t)query * hidden + head * D + n0 + 2 * (quad & ~1);
#pragma unroll
            for (int nt = 0; nt < config::n_cols / 8; nt++) {
                float send0 = odd ? dq[nt][0] : dq[nt][2], send1 = odd ? dq[nt][1] : dq[nt][3];
                float got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
                if (query < query_hi) {
                    if (odd) reduce_add4(row + nt * 8, got0, got1, dq[nt][2], dq[nt][3]);
                    else reduce_add4(row + nt * 8, dq[nt][0], dq[nt][1], got0, got1);
                }
            }
        }
    }
#pragma unroll
    for (int rb = 0; rb < kRB; rb++) {
        store_rows<D>(dqkv + hidden + head * D, qkv_stride, dk[rb], key_a + 16 * rb, t.end, scale);
        store_rows<D>(dqkv + 2 * hidden + head * D, qkv_stride, dv[rb], key_a + 16 * rb, t.end, 1.0f);
    }
}

/* Float offset of dQ elements d8..d8 + 7 (d8 % 8 == 0) of (token, head) in dq_accum: [n, H] when dq_rows is 0, else
 * the wgmma backward's head-major layout (attention_wgmma_bwd.h; head_dim 64). */
__device__ __forceinline__ size_t dq_accum_offset(size_t token, int head, int d8, int head_dim, int heads,
                                                  size_t dq_rows) {
    if (dq_rows == 0) return token * heads * head_dim + (size_t)head * head_dim + d8;
    return mb_wgmma_dq_offset(token, head, d8, dq_rows);
}

/* dQ block of dqkv = bf16(scale · dq_accum), eight elements per thread. Row r of the accumulator is token
 * row_tokens[r] of dqkv (the _rows backward), or token r (row_tokens nullptr). */
__global__ void attention_dq_convert_kernel(mb::bf16 *dqkv, const float *dq_accum, const int32_t *row_tokens,
                                            size_t groups, int heads, int head_dim, size_t dq_rows, float scale) {
    size_t g = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (g >= groups) return;
    const int hidden = heads * head_dim;
    size_t element = g * 8, row = element / hidden, column = element % hidden;
    const size_t token = row_tokens != nullptr ? (size_t)row_tokens[row] : row;
    const int head = (int)(column / head_dim), d8 = (int)(column % head_dim);
    const float4 *from =
        reinterpret_cast<const float4 *>(dq_accum + dq_accum_offset(row, head, d8, head_dim, heads, dq_rows));
    float4 lo = from[0], hi = from[1];
    float values[8] = {lo.x * scale, lo.y * scale, lo.z * scale, lo.w * scale,
                       hi.x * scale, hi.y * scale, hi.z * scale, hi.w * scale};
    mb::store_bf16x8(dqkv + token * 3 * hidden + column, mb::pack_bf16x8(values));
}

/* The same with RoPE's backward: a thread converts elements d0..d0+7 of one head vector and their partners d0 + D/2
 * (d0 < D/2), rotating each pair with the token's angles from `rope` (mb_cuda_rope_table) before rounding. */
__global__ void attention_dq_convert_rope_kernel(mb::bf16 *dqkv, const float *dq_accum, const int32_t *row_tokens,
                                                 const float2 *rope, size_t groups, int heads, int head_dim,
                                                 size_t dq_rows, float scale) {
    size_t g = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (g >= groups) return;
    const int half = head_dim / 2, per_head = half / 8, hidden = heads * head_dim;
    const size_t row = g / ((size_t)heads * per_head);
    const size_t token = row_tokens != nullptr ? (size_t)row_tokens[row] : row;
    const int rest = (int)(g - row * heads * per_head), head = rest / per_head, d0 = (rest % per_head) * 8;
    const float2 *angles = rope + token * half + d0;
    const float4 *x1_from =
        reinterpret_cast<const float4 *>(dq_accum + dq_accum_offset(row, head, d0, head_dim, heads, dq_rows));
    const float4 *x2_from =
        reinterpret_cast<const float4 *>(dq_accum + dq_accum_offset(row, head, d0 + half, head_dim, heads, dq_rows));
    const float4 a0 = x1_from[0], a1 = x1_from[1], b0 = x2_from[0], b1 = x2_from[1];
    float x1[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
    float x2[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
    for (int k = 0; k < 8; k++) {
        x1[k] *= scale;
        x2[k] *= scale;
        rope_back(x1[k], x2[k], angles[k]);
    }
    mb::bf16 *out = dqkv + token * 3 * hidden + (size_t)head * head_dim + d0;
    mb::store_bf16x8(out, mb::pack_bf16x8(x1));
    mb::store_bf16x8(out + half, mb::pack_bf16x8(x2));
}

/* ---- launch helpers ---- */

struct workspace_layout {
    int32_t *seq_first; /* [num_seqs + 1] */
    int32_t *tile_seq;  /* [max_tiles(n, num_seqs, kMinTile)] */
    float *delta;       /* [n, heads] */
    wgmma_split split;  /* the wgmma backward's tail split: words and partials (attention_wgmma_bwd.h) */
    float *dq_accum;    /* [n, heads·head_dim], or head-major for the wgmma backward (mb_wgmma_dq_rows(n) per head) */
};

size_t align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

int max_tiles(int n, int num_seqs, int tile) { return mb::ceil_div(n, tile) + num_seqs; }

size_t seq_first_bytes(int num_seqs) { return align256((size_t)(num_seqs + 1) * sizeof(int32_t)); }
size_t tile_seq_bytes(int n, int num_seqs) { return align256((size_t)max_tiles(n, num_seqs, kMinTile) * sizeof(int32_t)); }
size_t delta_bytes(int n, int heads) { return align256((size_t)n * heads * sizeof(float)); }
constexpr size_t kSplitWordBytes = (kWgmmaSplitWords * sizeof(int32_t) + 255) / 256 * 256;
constexpr size_t kSplitPartialBytes = kWgmmaSplitCapacity * kWgmmaSplitSlotFloats * sizeof(float);

workspace_layout carve_workspace(void *base, int n, int num_seqs, int heads) {
    char *p = static_cast<char *>(base);
    workspace_layout w;
    w.seq_first = reinterpret_cast<int32_t *>(p);
    p += seq_first_bytes(num_seqs);
    w.tile_seq = reinterpret_cast<int32_t *>(p);
    p += tile_seq_bytes(n, num_seqs);
    w.delta = reinterpret_cast<float *>(p);
    p += delta_bytes(n, heads);
    w.split.words = reinterpret_cast<int32_t *>(p);
    p += kSplitWordBytes;
    w.split.partials = reinterpret_cast<float *>(p);
    w.split.grid = 0; /* set by plan_wgmma_backward */
    p += kSplitPartialBytes;
    w.dq_accum = reinterpret_cast<float *>(p);
    return w;
}

/* The 1-D grid of a launch over tiles of `tile` tokens: (tile, head) pairs, heads fastest. */
unsigned grid_blocks(int n, int num_seqs, int heads, int tile) { return (unsigned)max_tiles(n, num_seqs, tile) * heads; }

template <typename Kernel>
int set_shared_limit(Kernel kernel, size_t bytes, mb_error *err) {
    if (bytes <= 48 * 1024) return 0;
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return 0;
}

int check_arguments(const char *what, const void *qkv, const int32_t *cu_seqlens, const void *workspace,
                    int num_seqs, int n, int heads, int head_dim, mb_error *err) {
    MB_REQUIRE(err, qkv && cu_seqlens && workspace, "%s: missing qkv, cu_seqlens or workspace", what);
    MB_REQUIRE(err, num_seqs >= 1 && n >= num_seqs && heads >= 1 && heads <= 65535,
               "%s: bad shape num_seqs %d, n %d, heads %d", what, num_seqs, n, heads);
    MB_REQUIRE(err, head_dim == 32 || head_dim == 64 || head_dim == 128,
               "%s: head_dim %d is not supported (32, 64 or 128)", what, head_dim);
    MB_REQUIRE(err, (size_t)max_tiles(n, num_seqs, kMinTile) * heads <= 0x7fffffffu,
               "%s: n %d × heads %d is too large for one launch", what, n, heads);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(workspace) % 16 == 0,
               "%s: qkv and workspace must be 16-byte aligned", what);
    return 0;
}

int plan_tiles(workspace_layout w, const int32_t *cu_seqlens, int num_seqs, int tile, cudaStream_t stream,
               mb_error *err, split_request split = {nullptr, nullptr, 0, 0}) {
    tile_plan_kernel<<<1, kPlanThreads, 0, stream>>>(w.seq_first, w.tile_seq, cu_seqlens, num_seqs, tile, split);
    MB_CUDA_CHECK_LAUNCH(err, "tile_plan_kernel");
    return 0;
}

template <int D, int kWarps, int kRB>
int launch_forward_shape(mb::bf16 *out, float *lse, workspace_layout w, const mb::bf16 *qkv,
                         const int32_t *cu_seqlens, int num_seqs, int n, int heads, int window, cudaStream_t stream,
                         mb_error *err) {
    if (plan_tiles(w, cu_seqlens, num_seqs, kFwdQueries, stream, err) != 0) return -1;
    size_t shared = shape<D>::tile_bytes(kFwdQueries) + 4 * shape<D>::tile_bytes(kKeyTile);
    auto kernel = attention_forward_kernel<D, kWarps, kRB>;
    if (set_shared_limit(kernel, shared, err) != 0) return -1;
    float scale_log2 = kLog2e / sqrtf((float)D);
    kernel<<<grid_blocks(n, num_seqs, heads, kFwdQueries), fwd_shape<D, kWarps, kRB>::kThreads, shared, stream>>>(
        out, lse, qkv, cu_seqlens, w.seq_first, w.tile_seq, num_seqs, heads, window, scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "attention_forward_kernel");
    return 0;
}

/* The plan of the kernel families beside this file (attention_common.cuh), built for their tile size. */
int plan_for(mb::attention_plan *plan, workspace_layout w, const int32_t *cu_seqlens, int num_seqs, int n, int heads,
             int tile, cudaStream_t stream, mb_error *err) {
    if (plan_tiles(w, cu_seqlens, num_seqs, tile, stream, err) != 0) return -1;
    *plan = mb::attention_plan{w.seq_first, w.tile_seq, tile, grid_blocks(n, num_seqs, heads, tile)};
    return 0;
}

/* The wgmma backward's plan (over cu_seqlens, its queries counted in cu_queries) and its tail split for the grid it
 * will launch; *split is the workspace's, or none with MB_ATTENTION_WGMMA_SPLIT=0 (for comparisons). */
int plan_wgmma_backward(mb::attention_plan *plan, wgmma_split *split, workspace_layout w, const int32_t *cu_seqlens,
                        const int32_t *cu_queries, int num_seqs, int n, int heads, cudaStream_t stream,
                        mb_error *err) {
    const unsigned blocks = grid_blocks(n, num_seqs, heads, kWgmmaBackwardTile);
    unsigned grid = 0;
    if (mb_attention_wgmma_backward_grid(blocks, &grid, err) != 0) return -1;
    *split = env_is("MB_ATTENTION_WGMMA_SPLIT", "0") ? wgmma_split{nullptr, nullptr, 0} : w.split;
    split->grid = grid;
    const split_request request = {split->words, cu_queries, heads, grid};
    if (plan_tiles(w, cu_seqlens, num_seqs, kWgmmaBackwardTile, stream, err, request) != 0) return -1;
    *plan = mb::attention_plan{w.seq_first, w.tile_seq, kWgmmaBackwardTile, blocks};
    return 0;
}

/* Kernel families by layer kind (the mma.sync kernels of this file are the fallback for everything else):
 *   sliding-window layers: the band kernels (attention_band.cu) forward and backward, deterministic by construction,
 *     unless MB_ATTENTION_LOCAL=mma;
 *   global layers at head_dim 64 on sm_90a: the wgmma kernels (attention_wgmma_fwd.cu, attention_wgmma_bwd.cu),
 *     unless MB_ATTENTION_FWD=v3|v4 / MB_ATTENTION_BWD=v3|v4; the wgmma backward adds dQ with atomics, so
 *     deterministic = 1 keeps the ordered mma.sync kernels.
 * Overrides are read per call (benchmarks compare families in one process). */
bool use_band(int head_dim, int window) {
    return window >= 0 && !env_is("MB_ATTENTION_LOCAL", "mma") && mb_attention_band_supports(head_dim, window);
}

bool use_wgmma_forward(int head_dim, int window) {
    return window < 0 && !env_is("MB_ATTENTION_FWD", "v3") && !env_is("MB_ATTENTION_FWD", "v4") &&
           mb_attention_wgmma_forward_supports(head_dim, window);
}

/* v4 (4 warps × 32 rows) for global layers at head_dim <= 64 unless MB_ATTENTION_FWD=v3 (read per call); head_dim
 * 128 keeps v3's 8 warps × 16 rows (two 16 × 128 fp32 O blocks per warp would not fit the registers), and so do
 * sliding-window layers (measured on an H200 at window 64: v3 0.195 ms, v4 0.258 ms; MB_ATTENTION_FWD=v4 forces v4). */
constexpr int kLocalForwardMaxWindow = 256;

template <int D>
int launch_forward(mb::bf16 *out, float *lse, workspace_layout w, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                   int num_seqs, int n, int heads, int window, cudaStream_t stream, mb_error *err) {
    mb::attention_plan plan;
    if (use_band(D, window)) {
        if (plan_for(&plan, w, cu_seqlens, num_seqs, n, heads, kBandTile, stream, err) != 0) return -1;
        return mb_attention_band_forward(out, lse, qkv, cu_seqlens, plan, num_seqs, n, heads, D, window, stream, err);
    }
    if (use_wgmma_forward(D, window)) {
        if (plan_for(&plan, w, cu_seqlens, num_seqs, n, heads, kWgmmaForwardTile, stream, err) != 0) return -1;
        return mb_attention_wgmma_forward(out, lse, qkv, cu_seqlens, plan, num_seqs, n, heads, D, window, stream,
                                          err);
    }
    if constexpr (D <= 64) {
        const bool local = window >= 0 && window <= kLocalForwardMaxWindow;
        if (env_is("MB_ATTENTION_FWD", "v4") || (!local && !env_is("MB_ATTENTION_FWD", "v3")))
            return launch_forward_shape<D, 4, 2>(out, lse, w, qkv, cu_seqlens, num_seqs, n, heads, window, stream,
                                                 err);
    }
    return launch_forward_shape<D, 8, 1>(out, lse, w, qkv, cu_seqlens, num_seqs, n, heads, window, stream, err);
}

template <int D>
int launch_backward_deterministic(mb::bf16 *dqkv, workspace_layout w, const mb::bf16 *dout, const float *lse,
                                  const mb::bf16 *qkv, const int32_t *cu_seqlens, int num_seqs, int n, int heads,
                                  int window, cudaStream_t stream, mb_error *err) {
    float scale = 1.0f / sqrtf((float)D), scale_log2 = kLog2e * scale;
    if (plan_tiles(w, cu_seqlens, num_seqs, kDetTile, stream, err) != 0) return -1;
    unsigned blocks = grid_blocks(n, num_seqs, heads, kDetTile);
    size_t dq_shared = 6 * shape<D>::tile_bytes(kDetTile);
    if (set_shared_limit(attention_dq_kernel<D>, dq_shared, err) != 0) return -1;
    attention_dq_kernel<D><<<blocks, kDetWarps * mb::kWarpSize, dq_shared, stream>>>(
        dqkv, dout, lse, w.delta, qkv, cu_seqlens, w.seq_first, w.tile_seq, num_seqs, heads, window, scale,
        scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "attention_dq_kernel");
    size_t dkdv_shared = 2 * shape<D>::tile_bytes(kDetTile) + query_stages<D>::bytes;
    if (set_shared_limit(attention_dkdv_kernel<D>, dkdv_shared, err) != 0) return -1;
    attention_dkdv_kernel<D><<<blocks, kDetWarps * mb::kWarpSize, dkdv_shared, stream>>>(
        dqkv, dout, lse, w.delta, qkv, cu_seqlens, w.seq_first, w.tile_seq, num_seqs, heads, window, scale,
        scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "attention_dkdv_kernel");
    return 0;
}

/* D_i = do_i · o_i for `pairs` (row, head) pairs into w.delta, and the rows' dQ accumulator zeroed when dq_accum is
 * given (dq_rows: its layout, as attention_delta_kernel). */
int launch_delta(workspace_layout w, float *dq_accum, const mb::bf16 *dout, const mb::bf16 *out, size_t pairs,
                 int heads, int head_dim, size_t dq_rows, cudaStream_t stream, mb_error *err) {
    unsigned blocks = (unsigned)mb::ceil_div(pairs * head_dim / 8, (size_t)256);
    auto delta_kernel = head_dim == 32 ? attention_delta_kernel<32>
                        : head_dim == 64 ? attention_delta_kernel<64>
                                         : attention_delta_kernel<128>;
    delta_kernel<<<blocks, 256, 0, stream>>>(w.delta, dq_accum, dout, out, pairs, heads, dq_rows);
    MB_CUDA_CHECK_LAUNCH(err, "attention_delta_kernel");
    return 0;
}

/* dQ = scale · dq_accum into the Q block of dqkv (after an atomic backward), rotated back by RoPE's backward when a
 * rope table is given. dq_rows: 0 for the [n, H] accumulator, else the wgmma backward's rows per head. n rows of the
 * accumulator; row r is token row_tokens[r] (the _rows backward) or r (nullptr). */
int convert_dq(mb::bf16 *dqkv, workspace_layout w, int n, int heads, int head_dim, size_t dq_rows, const float2 *rope,
               cudaStream_t stream, mb_error *err, const int32_t *row_tokens = nullptr) {
    int hidden = heads * head_dim;
    size_t groups = (size_t)n * hidden / 8;
    float scale = 1.0f / sqrtf((float)head_dim);
    if (rope != nullptr) {
        groups /= 2; /* a thread takes a pair of 8-element groups */
        attention_dq_convert_rope_kernel<<<(unsigned)mb::ceil_div(groups, (size_t)256), 256, 0, stream>>>(
            dqkv, w.dq_accum, row_tokens, rope, groups, heads, head_dim, dq_rows, scale);
        MB_CUDA_CHECK_LAUNCH(err, "attention_dq_convert_rope_kernel");
        return 0;
    }
    attention_dq_convert_kernel<<<(unsigned)mb::ceil_div(groups, (size_t)256), 256, 0, stream>>>(
        dqkv, w.dq_accum, row_tokens, groups, heads, head_dim, dq_rows, scale);
    MB_CUDA_CHECK_LAUNCH(err, "attention_dq_convert_kernel");
    return 0;
}

template <int D, int kWarps, int kRB>
int launch_backward_atomic(mb::bf16 *dqkv, workspace_layout w, const mb::bf16 *dout, const float *lse,
                           const mb::bf16 *qkv, const int32_t *cu_seqlens, int num_seqs, int n, int heads, int window,
                           cudaStream_t stream, mb_error *err) {
    using config = bwd_shape<D, kWarps, kRB>;
    float scale = 1.0f / sqrtf((float)D), scale_log2 = kLog2e * scale;
    if (plan_tiles(w, cu_seqlens, num_seqs, config::kKeys, stream, err) != 0) return -1;
    size_t shared = config::shared_bytes();
    auto kernel = attention_backward_kernel<D, kWarps, kRB>;
    if (set_shared_limit(kernel, shared, err) != 0) return -1;
    kernel<<<grid_blocks(n, num_seqs, heads, config::kKeys), kWarps * mb::kWarpSize, shared, stream>>>(
        dqkv, w.dq_accum, dout, lse, w.delta, qkv, cu_seqlens, w.seq_first, w.tile_seq, num_seqs, heads, window,
        scale, scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "attention_backward_kernel");
    return convert_dq(dqkv, w, n, heads, D, 0, nullptr, stream, err);
}

/* Which backward runs. deterministic = 1: the ordered kernels. deterministic = 0: the atomic kernel, v4 (4 warps ×
 * 32 keys, 128-key blocks) on global layers, v3 (4 warps × 16 keys, 64-key blocks: less work outside a narrow band)
 * on local layers (0 <= window <= kLocalMaxWindow), or the ordered kernels there when kLocalPrefersOrdered; head_dim
 * 128 always takes v3 (v4's dK/dV would not fit the registers). Overrides (docs/kernels/attention.md), read per call:
 * MB_ATTENTION_BWD=v3|v4 forces the atomic kernel's version on every layer, MB_ATTENTION_BWD_LOCAL=ordered|atomic
 * picks the local layers' path, MB_ATTENTION_BWD_KEYS=128 the 8-warp, 128-key blocks of v3 (benchmarks). */
enum class backward_path { ordered, atomic_v3, atomic_v3_128, atomic_v4, band, wgmma };

constexpr bool kLocalPrefersOrdered = false; /* v3: ordered 0.669 ms vs atomic 0.506 at window 64 (1024 tokens) */
constexpr int kLocalMaxWindow = 256;

backward_path choose_backward(int head_dim, int window, int deterministic) {
    if (use_band(head_dim, window)) return backward_path::band;
    if (deterministic) return backward_path::ordered;
    if (window < 0 && !env_is("MB_ATTENTION_BWD", "v3") && !env_is("MB_ATTENTION_BWD", "v4") &&
        !env_is("MB_ATTENTION_BWD_KEYS", "128") && mb_attention_wgmma_backward_supports(head_dim, window))
        return backward_path::wgmma;
    const bool local = window >= 0 && window <= kLocalMaxWindow;
    if (local) {
        bool ordered = env_is("MB_ATTENTION_BWD_LOCAL", "ordered") ||
                       (kLocalPrefersOrdered && !env_is("MB_ATTENTION_BWD_LOCAL", "atomic"));
        if (ordered) return backward_path::ordered;
    }
    if (env_is("MB_ATTENTION_BWD_KEYS", "128")) return backward_path::atomic_v3_128;
    if (env_is("MB_ATTENTION_BWD", "v3")) return backward_path::atomic_v3;
    if (env_is("MB_ATTENTION_BWD", "v4")) return backward_path::atomic_v4;
    return local ? backward_path::atomic_v3 : backward_path::atomic_v4;
}

/* rope: RoPE's backward in the stores (band and wgmma paths only; the caller checked). */
template <int D>
int launch_backward(mb::bf16 *dqkv, workspace_layout w, const mb::bf16 *dout, const float *lse, const mb::bf16 *qkv,
                    const int32_t *cu_seqlens, int num_seqs, int n, int heads, int window, backward_path path,
                    const float2 *rope, cudaStream_t stream, mb_error *err) {
    mb::attention_plan plan;
    switch (path) {
    case backward_path::band:
        if (plan_for(&plan, w, cu_seqlens, num_seqs, n, heads, kBandTile, stream, err) != 0) return -1;
        return mb_attention_band_backward(dqkv, dout, lse, w.delta, qkv, cu_seqlens, plan, num_seqs, n, heads, D,
                                          window, rope, stream, err);
    case backward_path::wgmma: {
        wgmma_split split;
        if (plan_wgmma_backward(&plan, &split, w, cu_seqlens, cu_seqlens, num_seqs, n, heads, stream, err) != 0)
            return -1;
        if (mb_attention_wgmma_backward(dqkv, w.dq_accum, dout, lse, w.delta, qkv, cu_seqlens, plan, split, num_seqs,
                                        n, heads, D, window, rope, stream, err) != 0)
            return -1;
        return convert_dq(dqkv, w, n, heads, D, mb_wgmma_dq_rows(n), rope, stream, err);
    }
    case backward_path::ordered:
        return launch_backward_deterministic<D>(dqkv, w, dout, lse, qkv, cu_seqlens, num_seqs, n, heads, window,
                                                stream, err);
    case backward_path::atomic_v3_128:
        return launch_backward_atomic<D, 8, 1>(dqkv, w, dout, lse, qkv, cu_seqlens, num_seqs, n, heads, window,
                                               stream, err);
    case backward_path::atomic_v4:
        if constexpr (D <= 64)
            return launch_backward_atomic<D, 4, 2>(dqkv, w, dout, lse, qkv, cu_seqlens, num_seqs, n, heads, window,
                                                   stream, err);
        [[fallthrough]];
    default:
        return launch_backward_atomic<D, 4, 1>(dqkv, w, dout, lse, qkv, cu_seqlens, num_seqs, n, heads, window,
                                               stream, err);
    }
}

}  // namespace

extern "C" size_t mb_cuda_attention_workspace_bytes(int n, int num_seqs, int heads, int head_dim) {
    /* dq_accum: [n, H], or the wgmma backward's head-major layout with its pad rows (the larger) */
    return seq_first_bytes(num_seqs) + tile_seq_bytes(n, num_seqs) + delta_bytes(n, heads) + kSplitWordBytes +
           kSplitPartialBytes + align256(mb_wgmma_dq_rows(n) * heads * head_dim * sizeof(float));
}

extern "C" int mb_cuda_attention_backward_split(const void *workspace, int n, int num_seqs, int heads,
                                                int *first_item, int *pieces, mb_error *err) {
    MB_REQUIRE(err, workspace && first_item && pieces, "attention_backward_split: missing argument");
    const workspace_layout w = carve_workspace(const_cast<void *>(workspace), n, num_seqs, heads);
    int32_t words[2];
    MB_CUDA_CHECK(err, cudaMemcpy(words, w.split.words, sizeof words, cudaMemcpyDeviceToHost));
    *first_item = words[0], *pieces = words[1];
    return 0;
}

extern "C" int mb_cuda_attention_forward(mb_bf16 *out, float *lse, void *workspace, const mb_bf16 *qkv,
                                         const int32_t *cu_seqlens, int num_seqs, int n, int heads, int head_dim,
                                         int window, cudaStream_t stream, mb_error *err) {
    if (check_arguments("attention_forward", qkv, cu_seqlens, workspace, num_seqs, n, heads, head_dim, err) != 0)
        return -1;
    MB_REQUIRE(err, out && lse, "attention_forward: missing out or lse");
    MB_NVTX_RANGE("attention_forward");
    workspace_layout w = carve_workspace(workspace, n, num_seqs, heads);
    mb::bf16 *o = reinterpret_cast<mb::bf16 *>(out);
    const mb::bf16 *x = reinterpret_cast<const mb::bf16 *>(qkv);
    switch (head_dim) {
    case 32: return launch_forward<32>(o, lse, w, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    case 64: return launch_forward<64>(o, lse, w, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    default: return launch_forward<128>(o, lse, w, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    }
}

namespace {

/* The backward of either entry point; rope (may be nullptr) only on the band and wgmma paths. */
int attention_backward(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout, const mb_bf16 *out, const float *lse,
                       const mb_bf16 *qkv, const int32_t *cu_seqlens, int num_seqs, int n, int heads, int head_dim,
                       int window, int deterministic, const float2 *rope, cudaStream_t stream, mb_error *err) {
    if (check_arguments("attention_backward", qkv, cu_seqlens, workspace, num_seqs, n, heads, head_dim, err) != 0)
        return -1;
    MB_REQUIRE(err, dqkv && dout && out && lse, "attention_backward: missing dqkv, dout, out or lse");
    MB_REQUIRE(err,
               reinterpret_cast<uintptr_t>(dout) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dqkv) % 16 == 0,
               "attention_backward: dout, out and dqkv must be 16-byte aligned");
    MB_NVTX_RANGE("attention_backward");
    workspace_layout w = carve_workspace(workspace, n, num_seqs, heads);
    backward_path path = choose_backward(head_dim, window, deterministic);
    MB_REQUIRE(err, rope == nullptr || path == backward_path::band || path == backward_path::wgmma,
               "attention_backward_rope: head_dim %d, window %d, deterministic %d takes a path without RoPE in its "
               "stores (ask mb_cuda_attention_backward_fuses_rope)",
               head_dim, window, deterministic);
    MB_REQUIRE(err, rope == nullptr || reinterpret_cast<uintptr_t>(rope) % 16 == 0,
               "attention_backward_rope: the rope table must be 16-byte aligned");
    float *dq_accum = path == backward_path::ordered || path == backward_path::band ? nullptr : w.dq_accum;
    const size_t dq_rows = path == backward_path::wgmma ? mb_wgmma_dq_rows(n) : 0;
    const mb::bf16 *g = reinterpret_cast<const mb::bf16 *>(dout), *o = reinterpret_cast<const mb::bf16 *>(out);
    if (launch_delta(w, dq_accum, g, o, (size_t)n * heads, heads, head_dim, dq_rows, stream, err) != 0) return -1;
    mb::bf16 *d = reinterpret_cast<mb::bf16 *>(dqkv);
    const mb::bf16 *x = reinterpret_cast<const mb::bf16 *>(qkv);
    switch (head_dim) {
    case 32:
        return launch_backward<32>(d, w, g, lse, x, cu_seqlens, num_seqs, n, heads, window, path, rope, stream, err);
    case 64:
        return launch_backward<64>(d, w, g, lse, x, cu_seqlens, num_seqs, n, heads, window, path, rope, stream, err);
    default:
        return launch_backward<128>(d, w, g, lse, x, cu_seqlens, num_seqs, n, heads, window, path, rope, stream,
                                    err);
    }
}

}  // namespace

extern "C" int mb_cuda_attention_backward(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout, const mb_bf16 *out,
                                          const float *lse, const mb_bf16 *qkv, const int32_t *cu_seqlens,
                                          int num_seqs, int n, int heads, int head_dim, int window, int deterministic,
                                          cudaStream_t stream, mb_error *err) {
    return attention_backward(dqkv, workspace, dout, out, lse, qkv, cu_seqlens, num_seqs, n, heads, head_dim, window,
                              deterministic, nullptr, stream, err);
}

extern "C" int mb_cuda_attention_backward_fuses_rope(int head_dim, int window, int deterministic) {
    backward_path path = choose_backward(head_dim, window, deterministic);
    return path == backward_path::band || path == backward_path::wgmma;
}

extern "C" int mb_cuda_attention_backward_rope(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout,
                                               const mb_bf16 *out, const float *lse, const mb_bf16 *qkv,
                                               const int32_t *cu_seqlens, int num_seqs, int n, int heads,
                                               int head_dim, int window, int deterministic, const float *rope_table,
                                               cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, rope_table != nullptr, "attention_backward_rope: missing the rope table");
    return attention_backward(dqkv, workspace, dout, out, lse, qkv, cu_seqlens, num_seqs, n, heads, head_dim, window,
                              deterministic, reinterpret_cast<const float2 *>(rope_table), stream, err);
}

/* ---- attention for a subset of the query rows (the sparse last layer, cuda/backend_cuda.cu) ----
 * Global layers at head_dim 64 on sm_90a, training's atomic backward: the wgmma kernels take their queries from a
 * gathered Q (attention_wgmma_fwd.h, attention_wgmma_bwd.h); every other case runs the whole batch instead. */

extern "C" int mb_cuda_attention_rows_supported(int head_dim, int window, int deterministic) {
    return use_wgmma_forward(head_dim, window) &&
           choose_backward(head_dim, window, deterministic) == backward_path::wgmma;
}

namespace {

int check_rows_arguments(const char *what, const void *q_rows, const void *qkv, const int32_t *cu_seqlens,
                         const int32_t *cu_rows, const void *workspace, int num_seqs, int n, int rows, int heads,
                         int head_dim, int window, mb_error *err) {
    MB_REQUIRE(err, q_rows && qkv && cu_seqlens && cu_rows && workspace,
               "%s: missing q_rows, qkv, cu_seqlens, cu_rows or workspace", what);
    MB_REQUIRE(err, num_seqs >= 1 && n >= num_seqs && rows >= 0 && rows <= n && heads >= 1,
               "%s: bad shape num_seqs %d, n %d, rows %d, heads %d", what, num_seqs, n, rows, heads);
    MB_REQUIRE(err, mb_cuda_attention_rows_supported(head_dim, window, 0),
               "%s: head_dim %d, window %d has no kernel for a subset of the queries (global layers at head_dim 64 "
               "on sm_90a; ask mb_cuda_attention_rows_supported)",
               what, head_dim, window);
    MB_REQUIRE(err,
               reinterpret_cast<uintptr_t>(q_rows) % 16 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(workspace) % 16 == 0,
               "%s: q_rows, qkv and workspace must be 16-byte aligned", what);
    return 0;
}

}  // namespace

extern "C" int mb_cuda_attention_forward_rows(mb_bf16 *out_rows, float *lse_rows, void *workspace,
                                              const mb_bf16 *q_rows, const mb_bf16 *qkv, const int32_t *cu_seqlens,
                                              const int32_t *cu_rows, int num_seqs, int n, int rows, int heads,
                                              int head_dim, int window, cudaStream_t stream, mb_error *err) {
    if (check_rows_arguments("attention_forward_rows", q_rows, qkv, cu_seqlens, cu_rows, workspace, num_seqs, n, rows,
                             heads, head_dim, window, err) != 0)
        return -1;
    MB_REQUIRE(err, out_rows && lse_rows, "attention_forward_rows: missing out_rows or lse_rows");
    if (rows == 0) return 0;
    MB_NVTX_RANGE("attention_forward_rows");
    workspace_layout w = carve_workspace(workspace, n, num_seqs, heads);
    mb::attention_plan plan;
    if (plan_for(&plan, w, cu_rows, num_seqs, rows, heads, kWgmmaForwardTile, stream, err) != 0) return -1;
    return mb_attention_wgmma_forward_rows(reinterpret_cast<mb::bf16 *>(out_rows), lse_rows,
                                           reinterpret_cast<const mb::bf16 *>(q_rows),
                                           reinterpret_cast<const mb::bf16 *>(qkv), cu_seqlens, cu_rows, plan,
                                           num_seqs, heads, head_dim, window, stream, err);
}

extern "C" int mb_cuda_attention_backward_rows(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout_rows,
                                               const mb_bf16 *out_rows, const float *lse_rows, const mb_bf16 *q_rows,
                                               const mb_bf16 *qkv, const int32_t *cu_seqlens, const int32_t *cu_rows,
                                               const int32_t *row_tokens, int num_seqs, int n, int rows, int heads,
                                               int head_dim, int window, const float *rope_table, cudaStream_t stream,
                                               mb_error *err) {
    if (check_rows_arguments("attention_backward_rows", q_rows, qkv, cu_seqlens, cu_rows, workspace, num_seqs, n,
                             rows, heads, head_dim, window, err) != 0)
        return -1;
    MB_REQUIRE(err, dqkv && dout_rows && out_rows && lse_rows && row_tokens && rope_table,
               "attention_backward_rows: missing dqkv, dout_rows, out_rows, lse_rows, row_tokens or rope_table");
    MB_REQUIRE(err,
               reinterpret_cast<uintptr_t>(dout_rows) % 16 == 0 && reinterpret_cast<uintptr_t>(out_rows) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dqkv) % 16 == 0 && reinterpret_cast<uintptr_t>(rope_table) % 16 == 0,
               "attention_backward_rows: dout_rows, out_rows, dqkv and rope_table must be 16-byte aligned");
    MB_NVTX_RANGE("attention_backward_rows");
    /* the Q rows nobody asked for, and the K/V rows of sequences without asked-for rows, get no gradient */
    MB_CUDA_CHECK(err, cudaMemsetAsync(dqkv, 0, (size_t)n * 3 * heads * head_dim * sizeof(mb_bf16), stream));
    if (rows == 0) return 0;
    workspace_layout w = carve_workspace(workspace, n, num_seqs, heads);
    const size_t dq_rows = mb_wgmma_dq_rows(rows);
    const mb::bf16 *g = reinterpret_cast<const mb::bf16 *>(dout_rows), *o = reinterpret_cast<const mb::bf16 *>(out_rows);
    if (launch_delta(w, w.dq_accum, g, o, (size_t)rows * heads, heads, head_dim, dq_rows, stream, err) != 0) return -1;
    mb::attention_plan plan;
    wgmma_split split;
    if (plan_wgmma_backward(&plan, &split, w, cu_seqlens, cu_rows, num_seqs, n, heads, stream, err) != 0) return -1;
    mb::bf16 *d = reinterpret_cast<mb::bf16 *>(dqkv);
    const float2 *rope = reinterpret_cast<const float2 *>(rope_table);
    if (mb_attention_wgmma_backward_rows(d, w.dq_accum, g, lse_rows, w.delta, reinterpret_cast<const mb::bf16 *>(q_rows),
                                         reinterpret_cast<const mb::bf16 *>(qkv), cu_seqlens, cu_rows, plan, split,
                                         num_seqs, n, rows, heads, head_dim, window, rope, stream, err) != 0)
        return -1;
    return convert_dq(d, w, rows, heads, head_dim, dq_rows, rope, stream, err, row_tokens);
}
