/* LayerNorm over the last dimension (bf16 in and out, fp32 statistics and fp32 weight/bias), as src/cpu/layernorm.c.
 *
 * forward:  μ = mean(x), σ² = mean((x − μ)²) (biased), r = 1/sqrt(σ² + eps), x̂ = (x − μ)·r, y = x̂ ⊙ w (+ b)
 * backward: g = dy ⊙ w,  dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))
 *           dw += Σ_rows dy ⊙ x̂,  db += Σ_rows dy      (deterministic column sums, common.cuh)
 *
 * One warp per row; the row is read again for each pass (from L1/L2), which keeps any width h legal. The parameter
 * gradients are summed before dx is written, so dx may alias dy. */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kRowsPerBlock = 8; /* one warp each */

__global__ void __launch_bounds__(kRowsPerBlock *mb::kWarpSize)
    layernorm_forward_kernel(mb::bf16 *y, float *mean_out, float *rstd_out, const mb::bf16 *x, const float *weight,
                             const float *bias, int n, int h, float eps) {
    int row = blockIdx.x * kRowsPerBlock + threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    if (row >= n) return;
    const mb::bf16 *xr = x + (size_t)row * h;
    float sum = 0.0f;
    for (int j = lane; j < h; j += mb::kWarpSize) sum += mb::to_float(xr[j]);
    float mean = mb::warp_sum(sum) / (float)h;
    float squares = 0.0f;
    for (int j = lane; j < h; j += mb::kWarpSize) {
        float centered = mb::to_float(xr[j]) - mean;
        squares += centered * centered;
    }
    float rstd = 1.0f / sqrtf(mb::warp_sum(squares) / (float)h + eps);
    mb::bf16 *yr = y + (size_t)row * h;
    for (int j = lane; j < h; j += mb::kWarpSize) {
        float normalized = (mb::to_float(xr[j]) - mean) * rstd;
        yr[j] = mb::to_bf16(normalized * weight[j] + (bias != nullptr ? bias[j] : 0.0f));
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

__global__ void __launch_bounds__(kRowsPerBlock *mb::kWarpSize)
    layernorm_input_grad_kernel(mb::bf16 *dx, const mb::bf16 *dy, const mb::bf16 *x, const float *mean_in,
                                const float *rstd_in, const float *weight, int n, int h, int accumulate_dx) {
    int row = blockIdx.x * kRowsPerBlock + threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    if (row >= n) return;
    const mb::bf16 *xr = x + (size_t)row * h, *dyr = dy + (size_t)row * h;
    float mean = mean_in[row], rstd = rstd_in[row];
    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for (int j = lane; j < h; j += mb::kWarpSize) {
        float g = mb::to_float(dyr[j]) * weight[j];
        sum_g += g;
        sum_g_xhat += g * (mb::to_float(xr[j]) - mean) * rstd;
    }
    float mean_g = mb::warp_sum(sum_g) / (float)h, mean_g_xhat = mb::warp_sum(sum_g_xhat) / (float)h;
    mb::bf16 *dxr = dx + (size_t)row * h;
    for (int j = lane; j < h; j += mb::kWarpSize) {
        float xhat = (mb::to_float(xr[j]) - mean) * rstd;
        float value = rstd * (mb::to_float(dyr[j]) * weight[j] - mean_g - xhat * mean_g_xhat);
        if (accumulate_dx) value += mb::to_float(dxr[j]);
        dxr[j] = mb::to_bf16(value);
    }
}

/* Column-sum terms: sum0 = dy ⊙ x̂ (for dw), sum1 = dy (for db). */
struct layernorm_param_terms {
    const mb::bf16 *dy, *x;
    const float *mean, *rstd;
    int h;
    __device__ void operator()(int row, int col, float &dw, float &db) const {
        size_t index = (size_t)row * h + col;
        float grad = mb::to_float(dy[index]);
        dw += grad * ((mb::to_float(x[index]) - mean[row]) * rstd[row]);
        db += grad;
    }
};

}  // namespace

extern "C" int mb_cuda_layernorm_forward(mb_bf16 *y, float *mean, float *rstd, const mb_bf16 *x, const float *weight,
                                         const float *bias, int n, int h, float eps, cudaStream_t stream,
                                         mb_error *err) {
    MB_REQUIRE(err, y && mean && rstd && x && weight, "layernorm_forward: missing y, mean, rstd, x or weight");
    MB_REQUIRE(err, n >= 0 && h > 0, "layernorm_forward: bad shape n %d, h %d", n, h);
    if (n == 0) return 0;
    MB_NVTX_RANGE("layernorm_forward");
    layernorm_forward_kernel<<<mb::ceil_div(n, kRowsPerBlock), kRowsPerBlock * mb::kWarpSize, 0, stream>>>(
        reinterpret_cast<mb::bf16 *>(y), mean, rstd, reinterpret_cast<const mb::bf16 *>(x), weight, bias, n, h, eps);
    MB_CUDA_CHECK_LAUNCH(err, "layernorm_forward_kernel");
    return 0;
}

extern "C" size_t mb_cuda_layernorm_backward_scratch_bytes(int n, int h) {
    return mb::column_sum_scratch_floats(n, h, 2) * sizeof(float);
}

extern "C" int mb_cuda_layernorm_backward(mb_bf16 *dx, float *dweight, float *dbias, void *scratch, const mb_bf16 *dy,
                                          const mb_bf16 *x, const float *mean, const float *rstd, const float *weight,
                                          int n, int h, int accumulate_dx, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, dy && x && mean && rstd, "layernorm_backward: missing dy, x, mean or rstd");
    MB_REQUIRE(err, dx == nullptr || weight != nullptr, "layernorm_backward: dx needs the weight");
    MB_REQUIRE(err, (dweight == nullptr && dbias == nullptr) || scratch != nullptr,
               "layernorm_backward: parameter gradients need scratch");
    MB_REQUIRE(err, n >= 0 && h > 0, "layernorm_backward: bad shape n %d, h %d", n, h);
    if (n == 0) return 0;
    MB_NVTX_RANGE("layernorm_backward");
    const mb::bf16 *dy_bf = reinterpret_cast<const mb::bf16 *>(dy), *x_bf = reinterpret_cast<const mb::bf16 *>(x);
    if (dweight != nullptr || dbias != nullptr) {
        layernorm_param_terms terms = {dy_bf, x_bf, mean, rstd, h};
        if (mb::column_sums<2>(dweight, dbias, static_cast<float *>(scratch), terms, n, h, stream, err) != 0)
            return -1;
    }
    if (dx != nullptr) {
        layernorm_input_grad_kernel<<<mb::ceil_div(n, kRowsPerBlock), kRowsPerBlock * mb::kWarpSize, 0, stream>>>(
            reinterpret_cast<mb::bf16 *>(dx), dy_bf, x_bf, mean, rstd, weight, n, h, accumulate_dx);
        MB_CUDA_CHECK_LAUNCH(err, "layernorm_input_grad_kernel");
    }
    return 0;
}
