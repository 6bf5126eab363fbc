/* Rotary position embedding, rotate-half form, in place on the Q and K blocks of a bf16 qkv buffer (src/cpu/rope.c).
 *
 * inv_freq[k] = 1 / θ^(2k/d) (k < d/2),  angle = position · inv_freq[k],  c = cos(angle), s = direction · sin(angle)
 * per head vector x = [x1 | x2] (halves of d/2):  x1' = x1·c − x2·s,  x2' = x2·c + x1·s
 * direction +1 is the forward; −1 rotates dQ and dK back (the rotation is orthogonal). V is never touched.
 * The angle arithmetic is fp32 in the same order as the CPU reference (accurate powf/sinf/cosf: no fast-math), the
 * rotation is fp32 and the result is rounded to bf16 once.
 *
 * Layout of the work: a block takes a few consecutive tokens. It first computes c and s for its tokens' d/2
 * frequencies into shared memory (one powf, cosf and sinf per (token, k), the same float expressions as the v1
 * kernel that evaluated them per element, so the results are unchanged), then rotates every head of Q and K: a
 * thread takes kVec consecutive k of one head vector (Q heads then K heads are 2·heads consecutive head vectors of
 * the row) and moves them with one load and one store per half: 16 bytes when d/2 % 8 == 0 (head_dim 16, 32, 64,
 * 128, ...), 4 bytes when d/2 is even, else 2. Index math is 32-bit except the row offset. */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kRopeThreads = 256;
constexpr int kMaxTokensPerBlock = 8;
constexpr int kMaxHeadDim = 8192; /* shared table: 2 · (d/2) floats per token of the block */

/* positions[i] = i − cu_seqlens[s], s the sequence holding i (binary search in cu_seqlens). */
__global__ void positions_kernel(int32_t *positions, const int32_t *cu_seqlens, int num_seqs, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int lo = 0, hi = num_seqs; /* find the last s with cu_seqlens[s] <= i */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (cu_seqlens[mid] <= i) lo = mid;
        else hi = mid;
    }
    positions[i] = i - cu_seqlens[lo];
}

/* kVec consecutive bf16 as floats, and back (16, 4 or 2 bytes per access). */
template <int kVec>
__device__ __forceinline__ void load_vec(const mb::bf16 *address, float out[kVec]) {
    if constexpr (kVec == 8) {
        mb::unpack_bf16x8(mb::load_bf16x8(address), out);
    } else if constexpr (kVec == 2) {
        float2 pair = __bfloat1622float2(*reinterpret_cast<const mb::bf162 *>(address));
        out[0] = pair.x, out[1] = pair.y;
    } else {
        out[0] = mb::to_float(*address);
    }
}

template <int kVec>
__device__ __forceinline__ void store_vec(mb::bf16 *address, const float in[kVec]) {
    if constexpr (kVec == 8) {
        mb::store_bf16x8(address, mb::pack_bf16x8(in));
    } else if constexpr (kVec == 2) {
        *reinterpret_cast<mb::bf162 *>(address) = __floats2bfloat162_rn(in[0], in[1]);
    } else {
        *address = mb::to_bf16(in[0]);
    }
}

/* The rotation angle of frequency k at `position` (fp32, the CPU reference's order): one expression for the rotating
 * kernel and the table of mb_cuda_rope_table, whose values the fused backward relies on being the same. */
__device__ __forceinline__ float rope_angle(int position, int k, int head_dim, float theta) {
    float inv_freq = 1.0f / powf(theta, (float)(2 * k) / (float)head_dim);
    return (float)position * inv_freq;
}

/* Block b rotates tokens [b·tokens_per_block, +tokens_per_block). Shared: cos then sin, [tokens_per_block][d/2]. */
template <int kVec>
__global__ void __launch_bounds__(kRopeThreads)
    rope_kernel(mb::bf16 *qkv, const int32_t *positions, int n, int heads, int head_dim, int tokens_per_block,
                float theta, float direction) {
    extern __shared__ float rope_table[];
    int half = head_dim / 2, first = blockIdx.x * tokens_per_block;
    int tokens = min(tokens_per_block, n - first);
    float *cos_table = rope_table, *sin_table = rope_table + tokens_per_block * half;
    for (int i = threadIdx.x; i < tokens * half; i += blockDim.x) {
        int t = i / half, k = i - t * half;
        float angle = rope_angle(positions[first + t], k, head_dim, theta);
        cos_table[i] = cosf(angle);
        sin_table[i] = direction * sinf(angle);
    }
    __syncthreads();

    int groups = half / kVec, per_token = 2 * heads * groups, row_width = 3 * heads * head_dim;
    for (int i = threadIdx.x; i < tokens * per_token; i += blockDim.x) {
        int t = i / per_token, rest = i - t * per_token;
        int vector = rest / groups, k0 = (rest - vector * groups) * kVec;
        mb::bf16 *x = qkv + (size_t)(first + t) * row_width + vector * head_dim + k0;
        float x1[kVec], x2[kVec], out1[kVec], out2[kVec];
        load_vec<kVec>(x, x1);
        load_vec<kVec>(x + half, x2);
        const float *c = cos_table + t * half + k0, *s = sin_table + t * half + k0;
#pragma unroll
        for (int j = 0; j < kVec; j++) {
            out1[j] = x1[j] * c[j] - x2[j] * s[j];
            out2[j] = x2[j] * c[j] + x1[j] * s[j];
        }
        store_vec<kVec>(x, out1);
        store_vec<kVec>(x + half, out2);
    }
}

/* table[i·half + k] = (cos, sin) of token i's angle for frequency k, as rope_kernel's table. */
__global__ void rope_table_kernel(float2 *table, const int32_t *positions, int n, int head_dim, float theta) {
    int half = head_dim / 2;
    size_t count = (size_t)n * half;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(i / half), k = (int)(i - (size_t)t * half);
        float angle = rope_angle(positions[t], k, head_dim, theta);
        table[i] = make_float2(cosf(angle), sinf(angle));
    }
}

}  // namespace

extern "C" int mb_cuda_rope_table(float *table, const int32_t *positions, int n, int head_dim, double theta,
                                  cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, table && positions, "rope_table: missing table or positions");
    MB_REQUIRE(err, n >= 0 && head_dim > 0 && head_dim % 2 == 0, "rope_table: bad shape n %d, head_dim %d", n,
               head_dim);
    MB_REQUIRE(err, theta > 0.0, "rope_table: theta must be > 0, got %g", theta);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(table) % 8 == 0, "rope_table: table must be 8-byte aligned");
    if (n == 0) return 0;
    size_t count = (size_t)n * (head_dim / 2);
    rope_table_kernel<<<mb::grid_stride_blocks(count), 256, 0, stream>>>(reinterpret_cast<float2 *>(table), positions,
                                                                         n, head_dim, (float)theta);
    MB_CUDA_CHECK_LAUNCH(err, "rope_table_kernel");
    return 0;
}

extern "C" int mb_cuda_positions(int32_t *positions, const int32_t *cu_seqlens, int num_seqs, int n,
                                 cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, positions && cu_seqlens, "positions: missing positions or cu_seqlens");
    MB_REQUIRE(err, num_seqs >= 1 && n >= 0, "positions: bad shape num_seqs %d, n %d", num_seqs, n);
    if (n == 0) return 0;
    positions_kernel<<<mb::ceil_div(n, 256), 256, 0, stream>>>(positions, cu_seqlens, num_seqs, n);
    MB_CUDA_CHECK_LAUNCH(err, "positions_kernel");
    return 0;
}

extern "C" int mb_cuda_rope(mb_bf16 *qkv, const int32_t *positions, int n, int heads, int head_dim, double theta,
                            int direction, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, qkv && positions, "rope: missing qkv or positions");
    MB_REQUIRE(err, n >= 0 && heads > 0 && head_dim > 0 && head_dim % 2 == 0,
               "rope: bad shape n %d, heads %d, head_dim %d (must be even)", n, heads, head_dim);
    MB_REQUIRE(err, head_dim <= kMaxHeadDim, "rope: head_dim %d exceeds %d", head_dim, kMaxHeadDim);
    MB_REQUIRE(err, direction == 1 || direction == -1, "rope: direction must be +1 or -1, got %d", direction);
    MB_REQUIRE(err, theta > 0.0, "rope: theta must be > 0, got %g", theta);
    if (n == 0) return 0;
    MB_NVTX_RANGE("rope");
    int half = head_dim / 2;
    /* enough tokens per block to give each thread a few vectors (ModernBERT-base: 8 tokens × 96 vectors of 16 bytes
     * per half for 256 threads), and a table of at most 2 · 1024 floats unless one token needs more */
    int tokens_per_block = 1024 / half;
    tokens_per_block = tokens_per_block < 1 ? 1 : (tokens_per_block > kMaxTokensPerBlock ? kMaxTokensPerBlock
                                                                                         : tokens_per_block);
    size_t table_bytes = 2 * (size_t)tokens_per_block * half * sizeof(float);
    int blocks = mb::ceil_div(n, tokens_per_block);
    mb::bf16 *qkv_bf = reinterpret_cast<mb::bf16 *>(qkv);
    uintptr_t address = reinterpret_cast<uintptr_t>(qkv);
    if (half % 8 == 0 && address % 16 == 0)
        rope_kernel<8><<<blocks, kRopeThreads, table_bytes, stream>>>(qkv_bf, positions, n, heads, head_dim,
                                                                      tokens_per_block, (float)theta,
                                                                      (float)direction);
    else if (half % 2 == 0 && address % 4 == 0)
        rope_kernel<2><<<blocks, kRopeThreads, table_bytes, stream>>>(qkv_bf, positions, n, heads, head_dim,
                                                                      tokens_per_block, (float)theta,
                                                                      (float)direction);
    else
        rope_kernel<1><<<blocks, kRopeThreads, table_bytes, stream>>>(qkv_bf, positions, n, heads, head_dim,
                                                                      tokens_per_block, (float)theta,
                                                                      (float)direction);
    MB_CUDA_CHECK_LAUNCH(err, "rope_kernel");
    return 0;
}
