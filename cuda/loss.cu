/* Losses, as src/cpu/loss.c, reading bf16 predictions and computing in fp32.
 *
 * cross-entropy per row r with target t: ℓ_r = logsumexp(z_r) − z_r[t]; gradient (softmax(z_r) − onehot(t))·scale,
 *   written over the bf16 logits in place. One block per row: pass 1 keeps a running (max, Σ exp) per thread
 *   (online softmax, one rescale per 8 logits), combined over the block; pass 2 writes the gradient. Only the row's
 *   logits are touched, so the fp32 logits of the batch never exist (the bf16 buffer is the only copy). The forward
 *   can keep lse_r, so that the backward (mb_cuda_cross_entropy_backward) is one read and one write of the logits
 *   instead of two reads and a write: for the MLM head (11 k rows × 50,304 bf16 = 1.1 GB per 32 k-token step) the
 *   pair of passes is ~3× its memory floor with scalar loads and a recomputed lse; with 16-byte loads, 4 in flight
 *   per thread, and the kept lse it is one read forward and one read + write backward (docs/kernels/elementwise.md).
 *   Rows of a multiple of 8 classes take the 16-byte path; others (classifier heads) the scalar one. A negative target
 *   marks an ignored row: loss 0, lse 0 and, when writing, a zero gradient row.
 * MSE per row: ℓ_r = (p_r − t_r)², gradient 2(p_r − t_r)·scale.
 * The batch loss is Σ_r ℓ_r, summed by mb_cuda_sum in double in an order fixed by the block shape. */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kLossThreads = 256, kSumThreads = 1024;
constexpr int kUnroll = 4; /* 16-byte loads in flight per thread */
constexpr float kLog2e = 1.4426950408889634f;

/* 2^x in one MUFU.EX2 (relative error ~2^-22; -inf -> 0). */
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Online softmax state of one thread: Σ exp(z − run_max) over the logits seen so far. */
struct softmax_state {
    float run_max = -INFINITY, run_sum = 0.0f;
    __device__ __forceinline__ void absorb(const float *values, int count) {
        float local = values[0];
        for (int k = 1; k < count; k++) local = fmaxf(local, values[k]);
        if (local > run_max) {
            run_sum *= fast_exp2((run_max - local) * kLog2e); /* run_max = −inf: 0 · 0 */
            run_max = local;
        }
        for (int k = 0; k < count; k++) run_sum += fast_exp2((values[k] - run_max) * kLog2e);
    }
};

/* Calls visit(chunk, values) for every 8-logit chunk of the row this thread owns (chunks threadIdx.x, + blockDim.x,
 * ...), kUnroll 16-byte loads in flight before the first use. */
template <typename Visit>
__device__ __forceinline__ void for_each_chunk(const mb::bf16 *z, int chunks, Visit visit) {
    const int stride = blockDim.x * kUnroll;
    for (int c0 = threadIdx.x; c0 < chunks; c0 += stride) {
        mb::bf16x8 packed[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
            if (c0 + u * blockDim.x < chunks) packed[u] = mb::load_bf16x8(z + (size_t)(c0 + u * blockDim.x) * 8);
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            int chunk = c0 + u * blockDim.x;
            if (chunk >= chunks) continue;
            float values[8];
            mb::unpack_bf16x8(packed[u], values);
            visit(chunk, values);
        }
    }
}

/* logsumexp of the row (block-wide); every thread gets it. */
template <bool kVector>
__device__ float row_logsumexp(const mb::bf16 *z, int classes, float *reduce) {
    softmax_state state;
    if constexpr (kVector) {
        for_each_chunk(z, classes / 8, [&](int, const float *values) { state.absorb(values, 8); });
    } else {
        for (int c = threadIdx.x; c < classes; c += blockDim.x) {
            float value = mb::to_float(z[c]);
            state.absorb(&value, 1);
        }
    }
    float row_max = mb::block_max(state.run_max, reduce);
    float scaled = state.run_max == -INFINITY ? 0.0f : state.run_sum * fast_exp2((state.run_max - row_max) * kLog2e);
    return row_max + logf(mb::block_sum(scaled, reduce));
}

/* (exp(z − lse) − onehot(target))·scale, or 0 for an ignored row. */
__device__ __forceinline__ float logit_gradient(float z, float lse, bool is_target, bool ignored, float scale) {
    return ignored ? 0.0f : (fast_exp2((z - lse) * kLog2e) - (is_target ? 1.0f : 0.0f)) * scale;
}

/* z ← its gradient over the row. */
template <bool kVector>
__device__ void write_row_gradient(mb::bf16 *z, int classes, float lse, int target, bool ignored, float scale) {
    if constexpr (kVector) {
        for_each_chunk(z, classes / 8, [&](int chunk, float *values) {
#pragma unroll
            for (int k = 0; k < 8; k++) values[k] = logit_gradient(values[k], lse, chunk * 8 + k == target, ignored, scale);
            mb::store_bf16x8(z + (size_t)chunk * 8, mb::pack_bf16x8(values));
        });
    } else {
        for (int c = threadIdx.x; c < classes; c += blockDim.x)
            z[c] = mb::to_bf16(logit_gradient(mb::to_float(z[c]), lse, c == target, ignored, scale));
    }
}

template <bool kVector>
__global__ void __launch_bounds__(kLossThreads)
    cross_entropy_kernel(mb::bf16 *logits, float *row_loss, float *row_lse, const int32_t *targets, int classes,
                         float grad_scale, int write_dlogits) {
    __shared__ float reduce[32];
    mb::bf16 *z = logits + (size_t)blockIdx.x * classes;
    int target = targets[blockIdx.x];
    bool ignored = target < 0 || target >= classes;
    float target_logit = ignored ? 0.0f : mb::to_float(z[target]); /* read before any thread overwrites it */
    float lse = row_logsumexp<kVector>(z, classes, reduce);
    if (threadIdx.x == 0) {
        row_loss[blockIdx.x] = ignored ? 0.0f : lse - target_logit;
        if (row_lse != nullptr) row_lse[blockIdx.x] = ignored ? 0.0f : lse;
    }
    if (write_dlogits) write_row_gradient<kVector>(z, classes, lse, target, ignored, grad_scale);
}

template <bool kVector>
__global__ void __launch_bounds__(kLossThreads)
    cross_entropy_backward_kernel(mb::bf16 *logits, const float *row_lse, const int32_t *targets, int classes,
                                  float grad_scale) {
    int target = targets[blockIdx.x];
    bool ignored = target < 0 || target >= classes;
    write_row_gradient<kVector>(logits + (size_t)blockIdx.x * classes, classes, row_lse[blockIdx.x], target, ignored,
                                grad_scale);
}

/* The gradient of cross_entropy_backward_kernel, tiled for column sums: block (column slice of 8 × kLossThreads
 * classes, row chunk of column_sum_chunks' partition); each thread rewrites its 8 classes of every row of the chunk
 * and adds the bf16-rounded values (what the decoder's GEMMs then read) into partial[chunk][class], row by row in
 * order. column_sums_finish_kernel then adds the chunks in order: the bias gradient without reading the gradient
 * back from memory, bit-reproducible. Needs a multiple of 8 classes and 16-byte rows. */
__global__ void __launch_bounds__(kLossThreads)
    cross_entropy_backward_bias_kernel(mb::bf16 *logits, float *partial, const float *row_lse,
                                       const int32_t *targets, int rows, int classes, float grad_scale) {
    int chunk = blockIdx.y, chunks = gridDim.y, rows_per_chunk = mb::ceil_div(rows, chunks);
    int begin = chunk * rows_per_chunk, end = min(rows, begin + rows_per_chunk);
    int first = (blockIdx.x * kLossThreads + threadIdx.x) * 8; /* this thread's 8 classes */
    if (first >= classes) return;
    float sums[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int r0 = begin; r0 < end; r0 += kUnroll) {
        mb::bf16x8 packed[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
            if (r0 + u < end) packed[u] = mb::load_bf16x8(logits + (size_t)(r0 + u) * classes + first);
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            int row = r0 + u;
            if (row >= end) continue;
            int target = targets[row];
            bool ignored = target < 0 || target >= classes;
            float lse = row_lse[row], values[8];
            mb::unpack_bf16x8(packed[u], values);
#pragma unroll
            for (int k = 0; k < 8; k++) values[k] = logit_gradient(values[k], lse, first + k == target, ignored, grad_scale);
            mb::bf16x8 gradient = mb::pack_bf16x8(values);
            mb::store_bf16x8(logits + (size_t)row * classes + first, gradient);
            mb::unpack_bf16x8(gradient, values);
#pragma unroll
            for (int k = 0; k < 8; k++) sums[k] += values[k];
        }
    }
#pragma unroll
    for (int k = 0; k < 8; k++) partial[(size_t)chunk * classes + first + k] = sums[k];
}

__global__ void mse_kernel(mb::bf16 *dpredictions, float *row_loss, const mb::bf16 *predictions,
                           const float *targets, int rows, float grad_scale) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float diff = mb::to_float(predictions[r]) - targets[r];
    row_loss[r] = diff * diff;
    if (dpredictions != nullptr) dpredictions[r] = mb::to_bf16(2.0f * diff * grad_scale);
}

__global__ void __launch_bounds__(kSumThreads) sum_kernel(double *total, const float *values, int count) {
    __shared__ double reduce[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += (double)values[i];
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) *total = sum;
}

/* 16-byte rows: a multiple of 8 classes on a 16-byte aligned buffer. */
bool vector_rows(const void *logits, int classes) {
    return classes % 8 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
}

}  // namespace

extern "C" int mb_cuda_cross_entropy(mb_bf16 *logits_to_dlogits, float *row_loss, float *row_lse,
                                     const int32_t *targets, int rows, int classes, float grad_scale,
                                     int write_dlogits, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, logits_to_dlogits && row_loss && targets, "cross_entropy: missing logits, row_loss or targets");
    MB_REQUIRE(err, rows >= 0 && classes > 0, "cross_entropy: bad shape rows %d, classes %d", rows, classes);
    if (rows == 0) return 0;
    MB_NVTX_RANGE("cross_entropy");
    mb::bf16 *z = reinterpret_cast<mb::bf16 *>(logits_to_dlogits);
    if (vector_rows(z, classes))
        cross_entropy_kernel<true><<<rows, kLossThreads, 0, stream>>>(z, row_loss, row_lse, targets, classes,
                                                                      grad_scale, write_dlogits);
    else
        cross_entropy_kernel<false><<<rows, kLossThreads, 0, stream>>>(z, row_loss, row_lse, targets, classes,
                                                                       grad_scale, write_dlogits);
    MB_CUDA_CHECK_LAUNCH(err, "cross_entropy_kernel");
    return 0;
}

extern "C" int mb_cuda_cross_entropy_backward(mb_bf16 *logits_to_dlogits, const float *row_lse,
                                              const int32_t *targets, int rows, int classes, float grad_scale,
                                              cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, logits_to_dlogits && row_lse && targets, "cross_entropy_backward: missing logits, lse or targets");
    MB_REQUIRE(err, rows >= 0 && classes > 0, "cross_entropy_backward: bad shape rows %d, classes %d", rows, classes);
    if (rows == 0) return 0;
    MB_NVTX_RANGE("cross_entropy_backward");
    mb::bf16 *z = reinterpret_cast<mb::bf16 *>(logits_to_dlogits);
    if (vector_rows(z, classes))
        cross_entropy_backward_kernel<true><<<rows, kLossThreads, 0, stream>>>(z, row_lse, targets, classes,
                                                                               grad_scale);
    else
        cross_entropy_backward_kernel<false><<<rows, kLossThreads, 0, stream>>>(z, row_lse, targets, classes,
                                                                                grad_scale);
    MB_CUDA_CHECK_LAUNCH(err, "cross_entropy_backward_kernel");
    return 0;
}

extern "C" size_t mb_cuda_cross_entropy_backward_bias_scratch_bytes(int rows, int classes) {
    return mb::column_sum_scratch_floats(rows, classes, 1) * sizeof(float);
}

extern "C" int mb_cuda_cross_entropy_backward_bias(mb_bf16 *logits_to_dlogits, float *dbias, void *scratch,
                                                   const float *row_lse, const int32_t *targets, int rows, int classes,
                                                   float grad_scale, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, logits_to_dlogits && dbias && scratch && row_lse && targets,
               "cross_entropy_backward_bias: missing logits, dbias, scratch, lse or targets");
    MB_REQUIRE(err, rows >= 0 && classes > 0, "cross_entropy_backward_bias: bad shape rows %d, classes %d", rows,
               classes);
    if (rows == 0) return 0;
    mb::bf16 *z = reinterpret_cast<mb::bf16 *>(logits_to_dlogits);
    if (!vector_rows(z, classes)) { /* scalar rows (a classifier's few labels): the gradient, then its column sums */
        if (mb_cuda_cross_entropy_backward(logits_to_dlogits, row_lse, targets, rows, classes, grad_scale, stream,
                                           err) != 0)
            return -1;
        return mb::column_sums<1>(dbias, nullptr, static_cast<float *>(scratch), mb::bf16_column_term{z, classes}, rows,
                                  classes, stream, err);
    }
    MB_NVTX_RANGE("cross_entropy_backward_bias");
    int chunks = mb::column_sum_chunks(rows);
    dim3 grid(mb::ceil_div(classes, 8 * kLossThreads), chunks);
    float *partial = static_cast<float *>(scratch);
    cross_entropy_backward_bias_kernel<<<grid, kLossThreads, 0, stream>>>(z, partial, row_lse, targets, rows, classes,
                                                                          grad_scale);
    MB_CUDA_CHECK_LAUNCH(err, "cross_entropy_backward_bias_kernel");
    mb::column_sums_finish_kernel<<<mb::ceil_div(classes, 256), 256, 0, stream>>>(dbias, partial, chunks, classes);
    MB_CUDA_CHECK_LAUNCH(err, "column_sums_finish_kernel");
    return 0;
}

extern "C" int mb_cuda_mse(mb_bf16 *dpredictions, float *row_loss, const mb_bf16 *predictions, const float *targets,
                           int rows, float grad_scale, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, row_loss && predictions && targets, "mse: missing row_loss, predictions or targets");
    MB_REQUIRE(err, rows >= 0, "mse: bad row count %d", rows);
    if (rows == 0) return 0;
    mse_kernel<<<mb::ceil_div(rows, 256), 256, 0, stream>>>(reinterpret_cast<mb::bf16 *>(dpredictions), row_loss,
                                                             reinterpret_cast<const mb::bf16 *>(predictions), targets,
                                                             rows, grad_scale);
    MB_CUDA_CHECK_LAUNCH(err, "mse_kernel");
    return 0;
}

extern "C" int mb_cuda_sum(double *total, const float *values, int count, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, total && (values || count == 0), "sum: missing total or values");
    MB_REQUIRE(err, count >= 0, "sum: bad count %d", count);
    sum_kernel<<<1, kSumThreads, 0, stream>>>(total, values, count);
    MB_CUDA_CHECK_LAUNCH(err, "sum_kernel");
    return 0;
}
