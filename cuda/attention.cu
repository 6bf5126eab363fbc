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
 * Tiling (FlashAttention-2 style, v1: correctness first):
 *  - Every sequence is cut into tiles of 64 tokens that never straddle sequences; a tiny plan kernel writes the
 *    exclusive scan of tiles per sequence, and block x of a launch binary-searches it for its (sequence, tile).
 *    The grid is sized from n and num_seqs alone (ceil(n/64) + num_seqs bounds the tile count), so nothing is read
 *    back to the host.
 *  - A block is 4 warps; each warp owns 16 rows of the tile. Products use mma.sync m16n8k16 (bf16 in, fp32
 *    accumulate) with operands from shared memory through ldmatrix (rows padded by 16 bytes: conflict-free).
 *    The score accumulators are re-packed in registers as the A operand of the next product (P·V, dS·K, ...).
 *  - Forward: per 64-query tile, loop over 64-key tiles of the visible key range [max(b, q0 − w), min(e, q1 + w));
 *    online softmax in fp32 with exp2 (scores pre-multiplied by scale·log2 e); keys outside the window or the
 *    sequence get −inf. Output normalised at the end; lse saved per (token, head).
 *  - Backward without atomics (deterministic): a preprocess kernel computes D_i; one kernel per key tile owns dK and
 *    dV in registers and loops over the query tiles that can see it; a second kernel per query tile owns dQ and loops
 *    over key tiles (recomputing P and dP: 7 tile products instead of 5, the price of determinism in v1).
 *  - head_dim 32, 64 and 128 (template); any sequence length, tails masked and zero-filled. */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kTile = 64;     /* tokens per tile (queries or keys) */
constexpr int kWarps = 4;     /* 16 rows each */
constexpr int kThreads = kWarps * mb::kWarpSize;
constexpr int kPlanThreads = 1024;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

template <int D>
struct shape {
    static constexpr int stride = D + 8;         /* bf16 per shared-memory row: 16-byte pad */
    static constexpr int d_tiles = D / 8;        /* n-tiles of 8 columns over the head dimension */
    static constexpr int k_steps = D / 16;       /* k-steps of 16 over the head dimension */
    static constexpr int dkdv_queries = D > 64 ? 32 : 64; /* query step of the dK/dV kernel (register budget) */
    static constexpr size_t tile_bytes(int rows) { return (size_t)rows * stride * sizeof(mb::bf16); }
};

/* ---- the tile plan ---- */

__global__ void __launch_bounds__(kPlanThreads)
    tile_plan_kernel(int32_t *tile_offsets, const int32_t *cu_seqlens, int num_seqs) {
    __shared__ int warp_totals[kPlanThreads / mb::kWarpSize];
    int per_thread = mb::ceil_div(num_seqs, kPlanThreads);
    int begin = min(num_seqs, (int)threadIdx.x * per_thread), end = min(num_seqs, begin + per_thread);
    int local = 0;
    for (int s = begin; s < end; s++) local += mb::ceil_div(cu_seqlens[s + 1] - cu_seqlens[s], kTile);
    int lane = threadIdx.x % mb::kWarpSize, warp = threadIdx.x / mb::kWarpSize;
    int inclusive = local;
#pragma unroll
    for (int offset = 1; offset < mb::kWarpSize; offset <<= 1) {
        int value = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += value;
    }
    if (lane == mb::kWarpSize - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int total = warp_totals[lane];
#pragma unroll
        for (int offset = 1; offset < mb::kWarpSize; offset <<= 1) {
            int value = __shfl_up_sync(0xffffffffu, total, offset);
            if (lane >= offset) total += value;
        }
        warp_totals[lane] = total;
    }
    __syncthreads();
    int running = inclusive - local + (warp > 0 ? warp_totals[warp - 1] : 0);
    for (int s = begin; s < end; s++) {
        tile_offsets[s] = running;
        running += mb::ceil_div(cu_seqlens[s + 1] - cu_seqlens[s], kTile);
    }
    if (threadIdx.x == kPlanThreads - 1) tile_offsets[num_seqs] = running;
}

struct tile_position {
    int seq_begin, seq_end, start, end; /* the tile is [start, end) inside [seq_begin, seq_end) */
};

/* Which tile this block owns; false for the spare blocks past the last tile. Uniform over the block. */
__device__ bool find_tile(tile_position *tile, const int32_t *tile_offsets, const int32_t *cu_seqlens,
                          int num_seqs) {
    int b = blockIdx.x;
    if (b >= tile_offsets[num_seqs]) return false;
    int lo = 0, hi = num_seqs; /* last s with tile_offsets[s] <= b */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (tile_offsets[mid] <= b) lo = mid;
        else hi = mid;
    }
    tile->seq_begin = cu_seqlens[lo];
    tile->seq_end = cu_seqlens[lo + 1];
    tile->start = tile->seq_begin + (b - tile_offsets[lo]) * kTile;
    tile->end = min(tile->start + kTile, tile->seq_end);
    return true;
}

/* Range of tokens [lo, hi) of the sequence that the tile [start, end) interacts with (symmetric window). */
__device__ __forceinline__ void partner_range(const tile_position &t, int window, int *lo, int *hi) {
    *lo = window < 0 ? t.seq_begin : max(t.seq_begin, t.start - window);
    *hi = window < 0 ? t.seq_end : min(t.seq_end, t.end - 1 + window + 1);
}

__device__ __forceinline__ bool visible(int query, int key, int window) {
    return window < 0 || abs(query - key) <= window;
}

/* Copies rows [r0, r0 + rows) of a [*, D] slice (row stride in elements) into shared memory; rows >= r_end get
 * zeros, so tails never read past the sequence. 16-byte pieces. */
template <int D>
__device__ __forceinline__ void load_rows(mb::bf16 *dst, const mb::bf16 *src, size_t row_stride, int r0, int r_end,
                                          int rows) {
    constexpr int pieces = D / 8;
    for (int c = threadIdx.x; c < rows * pieces; c += kThreads) {
        int r = c / pieces, k = c % pieces;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (r0 + r < r_end) value = *reinterpret_cast<const uint4 *>(src + (size_t)(r0 + r) * row_stride + k * 8);
        *reinterpret_cast<uint4 *>(dst + r * shape<D>::stride + k * 8) = value;
    }
}

/* A fragment (16×16) at (row0, col0) of a row-major shared tile. */
template <int D>
__device__ __forceinline__ void load_a(uint32_t a[4], const mb::bf16 *tile, int row0, int col0) {
    int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4(a, tile + (row0 + (lane & 15)) * shape<D>::stride + col0 + (lane >> 4) * 8);
}

/* B fragments of two n-tiles (rows n0..n0+15 of the tile are the N dimension, columns k0..k0+15 the K dimension):
 * for S = X·Yᵀ with Y stored row-major [N, K]. b[0..1] for n-tile n0, b[2..3] for n0 + 8. */
template <int D>
__device__ __forceinline__ void load_b_rows(uint32_t b[4], const mb::bf16 *tile, int n0, int k0) {
    int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * shape<D>::stride + k0 + ((lane >> 3) & 1) * 8);
}

/* B fragments of two n-tiles for O = P·Y with Y stored row-major [K, N] (rows k0..k0+15, columns n0..n0+15). */
template <int D>
__device__ __forceinline__ void load_b_cols(uint32_t b[4], const mb::bf16 *tile, int k0, int n0) {
    int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * shape<D>::stride + n0 + (lane >> 4) * 8);
}

/* acc[16 × 8·kN] += X[warp rows] · Y[rows 0..8·kN)ᵀ over the head dimension, X and Y in shared memory. */
template <int D, int kN>
__device__ __forceinline__ void scores(float acc[kN][4], const mb::bf16 *x_tile, int x_row0, const mb::bf16 *y_tile) {
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++) {
        uint32_t a[4];
        load_a<D>(a, x_tile, x_row0, ks * 16);
#pragma unroll
        for (int j = 0; j < kN; j += 2) {
            uint32_t b[4];
            load_b_rows<D>(b, y_tile, j * 8, ks * 16);
            mb::mma_bf16_16816(acc[j], a, b[0], b[1]);
            mb::mma_bf16_16816(acc[j + 1], a, b[2], b[3]);
        }
    }
}

/* out[16 × D] += P[16 × 8·kN] · Y[8·kN × D], P given as score-layout accumulators (re-packed to bf16 A fragments). */
template <int D, int kN>
__device__ __forceinline__ void accumulate_pv(float out[shape<D>::d_tiles][4], const float p[kN][4],
                                              const mb::bf16 *y_tile) {
#pragma unroll
    for (int kk = 0; kk < kN / 2; kk++) {
        uint32_t a[4] = {mb::pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), mb::pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                         mb::pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                         mb::pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt += 2) {
            uint32_t b[4];
            load_b_cols<D>(b, y_tile, kk * 16, dt * 8);
            mb::mma_bf16_16816(out[dt], a, b[0], b[1]);
            mb::mma_bf16_16816(out[dt + 1], a, b[2], b[3]);
        }
    }
}

template <int kN>
__device__ __forceinline__ void zero(float acc[kN][4]) {
#pragma unroll
    for (int j = 0; j < kN; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
}

/* Writes a warp's 16 × D accumulator rows (row index row_a for c0/c1, row_a + 8 for c2/c3) times `scale` as bf16. */
template <int D>
__device__ __forceinline__ void store_rows(mb::bf16 *dst, size_t row_stride, const float acc[shape<D>::d_tiles][4],
                                           int row_a, int row_end, float scale) {
    int quad = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = row_a + 8 * half;
        if (row >= row_end) continue;
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
            mb::bf162 pair = __floats2bfloat162_rn(acc[dt][2 * half] * scale, acc[dt][2 * half + 1] * scale);
            *reinterpret_cast<mb::bf162 *>(dst + (size_t)row * row_stride + dt * 8 + 2 * quad) = pair;
        }
    }
}

/* ---- forward ---- */

template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                             const int32_t *tile_offsets, int num_seqs, int heads, int window, float scale_log2) {
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *k_tile = q_tile + kTile * shape<D>::stride, *v_tile = k_tile + kTile * shape<D>::stride;
    tile_position t;
    if (!find_tile(&t, tile_offsets, cu_seqlens, num_seqs)) return;
    const int head = blockIdx.y, hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    int key_lo, key_hi;
    partner_range(t, window, &key_lo, &key_hi);
    load_rows<D>(q_tile, q_base, qkv_stride, t.start, t.end, kTile);

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const int quad = lane % 4, row_a = t.start + warp * 16 + lane / 4;
    float o[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(o);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

    for (int k0 = key_lo; k0 < key_hi; k0 += kTile) {
        __syncthreads(); /* the previous key tile is no longer read */
        load_rows<D>(k_tile, k_base, qkv_stride, k0, key_hi, kTile);
        load_rows<D>(v_tile, v_base, qkv_stride, k0, key_hi, kTile);
        __syncthreads();
        float s[kTile / 8][4];
        zero<kTile / 8>(s);
        scores<D, kTile / 8>(s, q_tile, warp * 16, k_tile);
#pragma unroll
        for (int half = 0; half < 2; half++) {
            int query = row_a + 8 * half;
            float tile_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < kTile / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int key = k0 + j * 8 + 2 * quad + e;
                    float value = key < key_hi && visible(query, key, window) ? s[j][2 * half + e] * scale_log2
                                                                               : -INFINITY;
                    s[j][2 * half + e] = value;
                    tile_max = fmaxf(tile_max, value);
                }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            float new_max = fmaxf(row_max[half], tile_max);
            float reference = new_max == -INFINITY ? 0.0f : new_max; /* a row with nothing visible yet */
            float correction = exp2f(row_max[half] - reference);
            row_sum[half] *= correction;
#pragma unroll
            for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
                o[dt][2 * half] *= correction;
                o[dt][2 * half + 1] *= correction;
            }
#pragma unroll
            for (int j = 0; j < kTile / 8; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float p = exp2f(s[j][2 * half + e] - reference);
                    s[j][2 * half + e] = p;
                    row_sum[half] += p;
                }
            row_max[half] = new_max;
        }
        accumulate_pv<D, kTile / 8>(o, s, v_tile);
    }

#pragma unroll
    for (int half = 0; half < 2; half++) {
        row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
        row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
    }
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int query = row_a + 8 * half;
        if (query >= t.end) continue;
        float inverse = 1.0f / row_sum[half];
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
            mb::bf162 pair = __floats2bfloat162_rn(o[dt][2 * half] * inverse, o[dt][2 * half + 1] * inverse);
            *reinterpret_cast<mb::bf162 *>(out + (size_t)query * hidden + head * D + dt * 8 + 2 * quad) = pair;
        }
        if (quad == 0) lse[(size_t)query * heads + head] = (row_max[half] + log2f(row_sum[half])) * kLn2;
    }
}

/* ---- backward ---- */

/* D_i = do_i · o_i per (token, head): one warp each. */
__global__ void attention_delta_kernel(float *delta, const mb::bf16 *dout, const mb::bf16 *out, int n, int heads,
                                       int head_dim) {
    size_t pair = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / mb::kWarpSize;
    int lane = threadIdx.x % mb::kWarpSize;
    if (pair >= (size_t)n * heads) return;
    size_t token = pair / heads, head = pair % heads, base = token * heads * head_dim + head * head_dim;
    float sum = 0.0f;
    for (int d = lane; d < head_dim; d += mb::kWarpSize) sum += mb::to_float(dout[base + d]) * mb::to_float(out[base + d]);
    sum = mb::warp_sum(sum);
    if (lane == 0) delta[pair] = sum;
}

/* dQ for one query tile: loops over the visible key tiles, recomputing P and dP. */
template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_dq_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                        const mb::bf16 *qkv, const int32_t *cu_seqlens, const int32_t *tile_offsets, int num_seqs,
                        int heads, int window, float scale, float scale_log2) {
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *q_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *do_tile = q_tile + kTile * shape<D>::stride;
    mb::bf16 *k_tile = do_tile + kTile * shape<D>::stride, *v_tile = k_tile + kTile * shape<D>::stride;
    tile_position t;
    if (!find_tile(&t, tile_offsets, cu_seqlens, num_seqs)) return;
    const int head = blockIdx.y, hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    int key_lo, key_hi;
    partner_range(t, window, &key_lo, &key_hi);
    load_rows<D>(q_tile, q_base, qkv_stride, t.start, t.end, kTile);
    load_rows<D>(do_tile, dout + head * D, hidden, t.start, t.end, kTile);

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

    for (int k0 = key_lo; k0 < key_hi; k0 += kTile) {
        __syncthreads();
        load_rows<D>(k_tile, k_base, qkv_stride, k0, key_hi, kTile);
        load_rows<D>(v_tile, v_base, qkv_stride, k0, key_hi, kTile);
        __syncthreads();
        float s[kTile / 8][4], dp[kTile / 8][4];
        zero<kTile / 8>(s);
        zero<kTile / 8>(dp);
        scores<D, kTile / 8>(s, q_tile, warp * 16, k_tile);
        scores<D, kTile / 8>(dp, do_tile, warp * 16, v_tile);
#pragma unroll
        for (int j = 0; j < kTile / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int half = e / 2, query = row_a + 8 * half, key = k0 + j * 8 + 2 * quad + (e & 1);
                bool ok = query < t.end && key < key_hi && visible(query, key, window);
                float p = ok ? exp2f(s[j][e] * scale_log2 - row_lse[half]) : 0.0f;
                s[j][e] = p * (dp[j][e] - row_delta[half]); /* dS */
            }
        accumulate_pv<D, kTile / 8>(dq, s, k_tile);
    }
    store_rows<D>(dqkv + head * D, qkv_stride, dq, row_a, t.end, scale);
}

/* dK and dV for one key tile: loops over the query tiles that see it. */
template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_dkdv_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                          const mb::bf16 *qkv, const int32_t *cu_seqlens, const int32_t *tile_offsets, int num_seqs,
                          int heads, int window, float scale, float scale_log2) {
    constexpr int kQ = shape<D>::dkdv_queries;
    extern __shared__ uint4 shared_raw[];
    mb::bf16 *k_tile = reinterpret_cast<mb::bf16 *>(shared_raw);
    mb::bf16 *v_tile = k_tile + kTile * shape<D>::stride, *q_tile = v_tile + kTile * shape<D>::stride;
    mb::bf16 *do_tile = q_tile + kQ * shape<D>::stride;
    float *lse_tile = reinterpret_cast<float *>(do_tile + kQ * shape<D>::stride), *delta_tile = lse_tile + kQ;
    tile_position t;
    if (!find_tile(&t, tile_offsets, cu_seqlens, num_seqs)) return;
    const int head = blockIdx.y, hidden = heads * D;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * D, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    int query_lo, query_hi;
    partner_range(t, window, &query_lo, &query_hi);
    load_rows<D>(k_tile, k_base, qkv_stride, t.start, t.end, kTile);
    load_rows<D>(v_tile, v_base, qkv_stride, t.start, t.end, kTile);

    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const int quad = lane % 4, key_a = t.start + warp * 16 + lane / 4;
    float dk[shape<D>::d_tiles][4], dv[shape<D>::d_tiles][4];
    zero<shape<D>::d_tiles>(dk);
    zero<shape<D>::d_tiles>(dv);

    for (int q0 = query_lo; q0 < query_hi; q0 += kQ) {
        __syncthreads();
        load_rows<D>(q_tile, q_base, qkv_stride, q0, query_hi, kQ);
        load_rows<D>(do_tile, dout + head * D, hidden, q0, query_hi, kQ);
        for (int r = threadIdx.x; r < kQ; r += kThreads) {
            bool valid = q0 + r < query_hi;
            lse_tile[r] = valid ? lse[(size_t)(q0 + r) * heads + head] * kLog2e : 0.0f;
            delta_tile[r] = valid ? delta[(size_t)(q0 + r) * heads + head] : 0.0f;
        }
        __syncthreads();
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
                float p = ok ? exp2f(s[j][e] * scale_log2 - lse_tile[column]) : 0.0f;
                s[j][e] = p;
                dp[j][e] = p * (dp[j][e] - delta_tile[column]); /* dSᵀ */
            }
        accumulate_pv<D, kQ / 8>(dv, s, do_tile);
        accumulate_pv<D, kQ / 8>(dk, dp, q_tile);
    }
    store_rows<D>(dqkv + hidden + head * D, qkv_stride, dk, key_a, t.end, scale);
    store_rows<D>(dqkv + 2 * hidden + head * D, qkv_stride, dv, key_a, t.end, 1.0f);
}

/* ---- launch helpers ---- */

struct workspace_layout {
    int32_t *tile_offsets;
    float *delta;
};

size_t align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

workspace_layout carve_workspace(void *base, int num_seqs) {
    char *p = static_cast<char *>(base);
    workspace_layout w;
    w.tile_offsets = reinterpret_cast<int32_t *>(p);
    w.delta = reinterpret_cast<float *>(p + align256((size_t)(num_seqs + 1) * sizeof(int32_t)));
    return w;
}

int max_tiles(int n, int num_seqs) { return mb::ceil_div(n, kTile) + num_seqs; }

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
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(qkv) % 16 == 0, "%s: qkv must be 16-byte aligned", what);
    return 0;
}

int plan_tiles(workspace_layout w, const int32_t *cu_seqlens, int num_seqs, cudaStream_t stream, mb_error *err) {
    tile_plan_kernel<<<1, kPlanThreads, 0, stream>>>(w.tile_offsets, cu_seqlens, num_seqs);
    MB_CUDA_CHECK_LAUNCH(err, "tile_plan_kernel");
    return 0;
}

template <int D>
int launch_forward(mb::bf16 *out, float *lse, workspace_layout w, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                   int num_seqs, int n, int heads, int window, cudaStream_t stream, mb_error *err) {
    size_t shared = 3 * shape<D>::tile_bytes(kTile);
    if (set_shared_limit(attention_forward_kernel<D>, shared, err) != 0) return -1;
    float scale_log2 = kLog2e / sqrtf((float)D);
    attention_forward_kernel<D><<<dim3(max_tiles(n, num_seqs), heads), kThreads, shared, stream>>>(
        out, lse, qkv, cu_seqlens, w.tile_offsets, num_seqs, heads, window, scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "attention_forward_kernel");
    return 0;
}

template <int D>
int launch_backward(mb::bf16 *dqkv, workspace_layout w, const mb::bf16 *dout, const float *lse, const mb::bf16 *qkv,
                    const int32_t *cu_seqlens, int num_seqs, int n, int heads, int window, cudaStream_t stream,
                    mb_error *err) {
    float scale = 1.0f / sqrtf((float)D), scale_log2 = kLog2e * scale;
    dim3 grid(max_tiles(n, num_seqs), heads);
    size_t dq_shared = 4 * shape<D>::tile_bytes(kTile);
    if (set_shared_limit(attention_dq_kernel<D>, dq_shared, err) != 0) return -1;
    attention_dq_kernel<D><<<grid, kThreads, dq_shared, stream>>>(dqkv, dout, lse, w.delta, qkv, cu_seqlens,
                                                                  w.tile_offsets, num_seqs, heads, window, scale,
                                                                  scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "attention_dq_kernel");
    constexpr int kQ = shape<D>::dkdv_queries;
    size_t dkdv_shared = 2 * shape<D>::tile_bytes(kTile) + 2 * shape<D>::tile_bytes(kQ) + 2 * kQ * sizeof(float);
    if (set_shared_limit(attention_dkdv_kernel<D>, dkdv_shared, err) != 0) return -1;
    attention_dkdv_kernel<D><<<grid, kThreads, dkdv_shared, stream>>>(dqkv, dout, lse, w.delta, qkv, cu_seqlens,
                                                                      w.tile_offsets, num_seqs, heads, window, scale,
                                                                      scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "attention_dkdv_kernel");
    return 0;
}

}  // namespace

extern "C" size_t mb_cuda_attention_workspace_bytes(int n, int num_seqs, int heads) {
    return align256((size_t)(num_seqs + 1) * sizeof(int32_t)) + align256((size_t)n * heads * sizeof(float));
}

extern "C" int mb_cuda_attention_forward(mb_bf16 *out, float *lse, void *workspace, const mb_bf16 *qkv,
                                         const int32_t *cu_seqlens, int num_seqs, int n, int heads, int head_dim,
                                         int window, cudaStream_t stream, mb_error *err) {
    if (check_arguments("attention_forward", qkv, cu_seqlens, workspace, num_seqs, n, heads, head_dim, err) != 0)
        return -1;
    MB_REQUIRE(err, out && lse, "attention_forward: missing out or lse");
    MB_NVTX_RANGE("attention_forward");
    workspace_layout w = carve_workspace(workspace, num_seqs);
    if (plan_tiles(w, cu_seqlens, num_seqs, stream, err) != 0) return -1;
    mb::bf16 *o = reinterpret_cast<mb::bf16 *>(out);
    const mb::bf16 *x = reinterpret_cast<const mb::bf16 *>(qkv);
    switch (head_dim) {
    case 32: return launch_forward<32>(o, lse, w, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    case 64: return launch_forward<64>(o, lse, w, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    default: return launch_forward<128>(o, lse, w, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    }
}

extern "C" int mb_cuda_attention_backward(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout, const mb_bf16 *out,
                                          const float *lse, const mb_bf16 *qkv, const int32_t *cu_seqlens,
                                          int num_seqs, int n, int heads, int head_dim, int window,
                                          cudaStream_t stream, mb_error *err) {
    if (check_arguments("attention_backward", qkv, cu_seqlens, workspace, num_seqs, n, heads, head_dim, err) != 0)
        return -1;
    MB_REQUIRE(err, dqkv && dout && out && lse, "attention_backward: missing dqkv, dout, out or lse");
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(dout) % 16 == 0, "attention_backward: dout must be 16-byte aligned");
    MB_NVTX_RANGE("attention_backward");
    workspace_layout w = carve_workspace(workspace, num_seqs);
    if (plan_tiles(w, cu_seqlens, num_seqs, stream, err) != 0) return -1;
    size_t pairs = (size_t)n * heads;
    attention_delta_kernel<<<(unsigned)mb::ceil_div(pairs * mb::kWarpSize, (size_t)256), 256, 0, stream>>>(
        w.delta, reinterpret_cast<const mb::bf16 *>(dout), reinterpret_cast<const mb::bf16 *>(out), n, heads,
        head_dim);
    MB_CUDA_CHECK_LAUNCH(err, "attention_delta_kernel");
    mb::bf16 *d = reinterpret_cast<mb::bf16 *>(dqkv);
    const mb::bf16 *g = reinterpret_cast<const mb::bf16 *>(dout), *x = reinterpret_cast<const mb::bf16 *>(qkv);
    switch (head_dim) {
    case 32: return launch_backward<32>(d, w, g, lse, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    case 64: return launch_backward<64>(d, w, g, lse, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    default: return launch_backward<128>(d, w, g, lse, x, cu_seqlens, num_seqs, n, heads, window, stream, err);
    }
}
