/* Losses, as src/cpu/loss.c, reading bf16 predictions and computing in fp32.
 *
 * cross-entropy per row r with target t: ℓ_r = logsumexp(z_r) − z_r[t]; gradient (softmax(z_r) − onehot(t))·scale,
 *   written over the bf16 logits in place. One block per row: pass 1 keeps a running (max, Σ exp) per thread
 *   (online softmax), combined over the block; pass 2 writes the gradient. Only the row's logits are touched, so the
 *   fp32 logits of the batch never exist (the bf16 buffer is the only copy). A negative target marks an ignored row:
 *   loss 0 and, when writing, a zero gradient row.
 * MSE per row: ℓ_r = (p_r − t_r)², gradient 2(p_r − t_r)·scale.
 * The batch loss is Σ_r ℓ_r, summed by mb_cuda_sum in double in an order fixed by the block shape. */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kLossThreads = 256, kSumThreads = 1024;

__global__ void __launch_bounds__(kLossThreads)
    cross_entropy_kernel(mb::bf16 *logits, float *row_loss, const int32_t *targets, int classes, float grad_scale,
                         int write_dlogits) {
    __shared__ float reduce[32];
    mb::bf16 *z = logits + (size_t)blockIdx.x * classes;
    int target = targets[blockIdx.x];
    bool ignored = target < 0 || target >= classes;
    float target_logit = ignored ? 0.0f : mb::to_float(z[target]); /* read before any thread overwrites it */
    float running_max = -INFINITY, running_sum = 0.0f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        float value = mb::to_float(z[c]);
        if (value > running_max) {
            running_sum = running_sum * expf(running_max - value) + 1.0f;
            running_max = value;
        } else {
            running_sum += expf(value - running_max);
        }
    }
    float row_max = mb::block_max(running_max, reduce);
    float scaled = running_max == -INFINITY ? 0.0f : running_sum * expf(running_max - row_max);
    float lse = row_max + logf(mb::block_sum(scaled, reduce));
    if (threadIdx.x == 0) row_loss[blockIdx.x] = ignored ? 0.0f : lse - target_logit;
    if (!write_dlogits) return;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        float grad = ignored ? 0.0f : (expf(mb::to_float(z[c]) - lse) - (c == target ? 1.0f : 0.0f)) * grad_scale;
        z[c] = mb::to_bf16(grad);
    }
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

}  // namespace

extern "C" int mb_cuda_cross_entropy(mb_bf16 *logits_to_dlogits, float *row_loss, const int32_t *targets, int rows,
                                     int classes, float grad_scale, int write_dlogits, cudaStream_t stream,
                                     mb_error *err) {
    MB_REQUIRE(err, logits_to_dlogits && row_loss && targets, "cross_entropy: missing logits, row_loss or targets");
    MB_REQUIRE(err, rows >= 0 && classes > 0, "cross_entropy: bad shape rows %d, classes %d", rows, classes);
    if (rows == 0) return 0;
    MB_NVTX_RANGE("cross_entropy");
    cross_entropy_kernel<<<rows, kLossThreads, 0, stream>>>(reinterpret_cast<mb::bf16 *>(logits_to_dlogits), row_loss,
                                                             targets, classes, grad_scale, write_dlogits);
    MB_CUDA_CHECK_LAUNCH(err, "cross_entropy_kernel");
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
