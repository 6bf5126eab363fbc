/* Rotary position embedding, rotate-half form, in place on the Q and K blocks of a bf16 qkv buffer (src/cpu/rope.c).
 *
 * inv_freq[k] = 1 / θ^(2k/d) (k < d/2),  angle = position · inv_freq[k],  c = cos(angle), s = direction · sin(angle)
 * per head vector x = [x1 | x2] (halves of d/2):  x1' = x1·c − x2·s,  x2' = x2·c + x1·s
 * direction +1 is the forward; −1 rotates dQ and dK back (the rotation is orthogonal). V is never touched.
 * The angle arithmetic is fp32 in the same order as the CPU reference (accurate sinf/cosf: no fast-math), the
 * rotation is fp32 and the result is rounded to bf16 once. */
#include "common.cuh"
#include "ops.h"

namespace {

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

/* One thread per (token, Q or K, head, k < d/2): rotates the pair (k, k + d/2). */
__global__ void rope_kernel(mb::bf16 *qkv, const int32_t *positions, int n, int heads, int head_dim, float theta,
                            float direction) {
    int half = head_dim / 2, hidden = heads * head_dim;
    size_t total = (size_t)n * 2 * heads * half;
    for (size_t index = blockIdx.x * (size_t)blockDim.x + threadIdx.x; index < total;
         index += (size_t)gridDim.x * blockDim.x) {
        int k = (int)(index % half);
        size_t rest = index / half;
        int head = (int)(rest % heads);
        rest /= heads;
        int block = (int)(rest % 2);
        size_t token = rest / 2;
        float inv_freq = 1.0f / powf(theta, (float)(2 * k) / (float)head_dim);
        float angle = (float)positions[token] * inv_freq;
        float c = cosf(angle), s = direction * sinf(angle);
        mb::bf16 *x = qkv + token * 3 * hidden + (size_t)block * hidden + (size_t)head * head_dim;
        float x1 = mb::to_float(x[k]), x2 = mb::to_float(x[k + half]);
        x[k] = mb::to_bf16(x1 * c - x2 * s);
        x[k + half] = mb::to_bf16(x2 * c + x1 * s);
    }
}

}  // namespace

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
    MB_REQUIRE(err, direction == 1 || direction == -1, "rope: direction must be +1 or -1, got %d", direction);
    MB_REQUIRE(err, theta > 0.0, "rope: theta must be > 0, got %g", theta);
    if (n == 0) return 0;
    MB_NVTX_RANGE("rope");
    size_t total = (size_t)n * heads * head_dim; /* pairs: n · 2 blocks · heads · d/2 */
    int blocks = (int)(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
    rope_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<mb::bf16 *>(qkv), positions, n, heads, head_dim,
                                            (float)theta, (float)direction);
    MB_CUDA_CHECK_LAUNCH(err, "rope_kernel");
    return 0;
}
