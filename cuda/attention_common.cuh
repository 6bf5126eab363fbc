/* Device pieces shared by every attention kernel family (cuda/attention.cu: mma.sync v3/v4; the sliding-window and
 * sm_90a kernels beside it): row copies by cp.async (its primitives are in cp_async.cuh), the tile a block owns in
 * the launch plan, window tests, exp2.
 *
 * The plan (built by attention.cu's tile_plan_kernel for a tile size T): sequences are cut into tiles of T tokens that
 * never straddle a sequence, longest sequences first; block x of a launch owns (tile x / heads, head x % heads).
 * seq_first[s] is the first tile of sequence s in launch order (seq_first[num_seqs] = the tile count) and tile_seq[x]
 * the sequence of tile x. A launch has (ceil(n / T) + num_seqs) · heads blocks; the spare ones return at once.
 *
 * Only attention .cu files include this header; everything here is internal (anonymous namespace per file). */
#ifndef MB_CUDA_ATTENTION_COMMON_CUH
#define MB_CUDA_ATTENTION_COMMON_CUH

#include "common.cuh"
#include "cp_async.cuh"

#include <cstdlib>
#include <cstring>

namespace mb {
/* What a launcher beside attention.cu receives (external linkage: the launchers live in other files): the plan for
 * its tile size and the grid that covers it. */
struct attention_plan {
    const int32_t *seq_first, *tile_seq;
    int tile;        /* tokens per tile */
    unsigned blocks; /* (ceil(n / tile) + num_seqs) · heads */
};
}  // namespace mb

namespace {

/* Whether environment variable `name` is set to `value`: the attention files' kernel switches, read per call (host). */
inline bool env_is(const char *name, const char *value) {
    const char *set = getenv(name);
    return set != nullptr && strcmp(set, value) == 0;
}

/* *count = the current device's SM count (host): the persistent attention kernels size their grids by it. */
inline int current_sm_count(int *count, mb_error *err) {
    int device = 0;
    MB_CUDA_CHECK(err, cudaGetDevice(&device));
    MB_CUDA_CHECK(err, cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
    return 0;
}

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

/* RoPE's backward on one head vector's elements d and d + head_dim/2 (x1, x2), fp32, with (cos, sin) = rope[d] of the
 * token's row of mb_cuda_rope_table: mb_cuda_rope's direction −1 (x1·c + x2·s, x2·c − x1·s) before rounding. The
 * stores of dQ and dK apply it when their kernel is given a table (mb_cuda_attention_backward_rope); every layout
 * here keeps d and d + head_dim/2 in the same thread (the m16n8 and wgmma accumulators hold columns 8j + 2·(lane % 4)
 * + {0, 1} for every 8-column block j). */
__device__ __forceinline__ void rope_back(float &x1, float &x2, float2 cs) {
    const float y1 = x1 * cs.x + x2 * cs.y, y2 = x2 * cs.x - x1 * cs.y;
    x1 = y1;
    x2 = y2;
}

/* Queues rows [r0, r0 + rows) of a [*, D] slice (row stride in elements) into shared memory (kStride bf16 per
 * shared row); rows >= r_end become
 * zeros, so tails never read past the sequence (their source address is the slice start, which is never read). */
template <int D, int kThreads, int kStride = D + 8>
__device__ __forceinline__ void load_rows_async(mb::bf16 *dst, const mb::bf16 *src, size_t row_stride, int r0,
                                                int r_end, int rows) {
    constexpr int pieces = D / 8;
    for (int c = threadIdx.x; c < rows * pieces; c += kThreads) {
        int r = c / pieces, k = c % pieces;
        bool valid = r0 + r < r_end;
        const mb::bf16 *from = valid ? src + (size_t)(r0 + r) * row_stride + k * 8 : src;
        cp_async_16(dst + r * kStride + k * 8, from, valid);
    }
}

/* The same for one float per row (lse or D_i of one head: element stride `stride`). */
template <int kThreads>
__device__ __forceinline__ void load_floats_async(float *dst, const float *src, int stride, int r0, int r_end,
                                                  int rows) {
    for (int r = threadIdx.x; r < rows; r += kThreads) {
        bool valid = r0 + r < r_end;
        cp_async_4(dst + r, valid ? src + (size_t)(r0 + r) * stride : src, valid);
    }
}

/* Where a global layer's queries come from (the wgmma forward and backward): rows [cu_queries[s], cu_queries[s + 1])
 * of q (row stride q_stride elements) for sequence s. A whole batch: qkv's Q block (stride 3H) and cu_seqlens; the
 * sparse last layer: the head's rows gathered (stride H) and their per-sequence offsets. */
struct query_rows {
    const mb::bf16 *q;
    int q_stride;
    const int32_t *cu_queries;
};

struct tile_position {
    int seq_begin, seq_end, start, end; /* the tile is [start, end) inside [seq_begin, seq_end) */
    int seq;                            /* the sequence's index */
};

/* Work item `item` of a launch plan: (tile item / heads, head item % heads); false past the last tile. */
__device__ __forceinline__ bool find_tile_at(unsigned item, tile_position *t, int *head, const int32_t *seq_first,
                                             const int32_t *tile_seq, const int32_t *cu_seqlens, int num_seqs,
                                             int heads, int tile) {
    int x = (int)(item / (unsigned)heads);
    *head = (int)(item % (unsigned)heads);
    if (x >= seq_first[num_seqs]) return false;
    int s = tile_seq[x];
    t->seq = s;
    t->seq_begin = cu_seqlens[s];
    t->seq_end = cu_seqlens[s + 1];
    t->start = t->seq_begin + (x - seq_first[s]) * tile;
    t->end = min(t->start + tile, t->seq_end);
    return true;
}

/* Which (tile, head) this block owns; false for the spare blocks past the last tile. Uniform over the block. */
__device__ bool find_tile(tile_position *t, int *head, const int32_t *seq_first, const int32_t *tile_seq,
                          const int32_t *cu_seqlens, int num_seqs, int heads, int tile) {
    return find_tile_at(blockIdx.x, t, head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, tile);
}

/* Range of tokens [lo, hi) of the sequence that the tile [start, end) interacts with (symmetric window). */
__device__ __forceinline__ void partner_range(const tile_position &t, int window, int *lo, int *hi) {
    *lo = window < 0 ? t.seq_begin : max(t.seq_begin, t.start - window);
    *hi = window < 0 ? t.seq_end : min(t.seq_end, t.end - 1 + window + 1);
}

__device__ __forceinline__ bool visible(int query, int key, int window) {
    return window < 0 || abs(query - key) <= window;
}

/* Whether rows [r0, r_last] and columns [c0, c_last] hold any pair within the window. */
__device__ __forceinline__ bool blocks_meet(int r0, int r_last, int c0, int c_last, int window) {
    return window < 0 || (c0 <= r_last + window && c_last >= r0 - window);
}

/* Whether every pair of rows [r0, r_last] and columns [c0, c_last] is within the window. */
__device__ __forceinline__ bool blocks_inside(int r0, int r_last, int c0, int c_last, int window) {
    return window < 0 || (r_last - c0 <= window && c_last - r0 <= window);
}

/* 2^x in one MUFU.EX2: ex2.approx.ftz (relative error ~2^-22, results below 2^-126 flush to 0, far under the bf16
 * tolerance; -inf -> +0 as masks need). exp2f without --use_fast_math adds a denormal range fix-up around it. */
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace

#endif
