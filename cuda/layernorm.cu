/* LayerNorm over the last dimension (bf16 in and out, fp32 statistics and fp32 weight/bias), as src/cpu/layernorm.c.
 *
 * forward:  μ = mean(x), σ² = mean((x − μ)²) (biased), r = 1/sqrt(σ² + eps), x̂ = (x − μ)·r, y = x̂ ⊙ w (+ b)
 * backward: g = dy ⊙ w,  dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))
 *           dw += Σ_rows dy ⊙ x̂,  db += Σ_rows dy      (deterministic column sums, common.cuh)
 *
 * Two kernels per direction, one warp per row in both:
 *   - register-resident (h % 8 == 0, h <= 2048, 16-byte aligned pointers: every ModernBERT width): lane l holds the
 *     columns [256c + 8l, 256c + 8l + 8) of chunk c < ceil(h/256) as packed bf16x8, loaded with one 16-byte load
 *     each, all issued before any arithmetic. The row crosses global memory once (read x, dy and, when accumulating,
 *     the old dx; write y or dx), and the variance is the two-pass formula over the registers.
 *   - general fallback (any h): scalar loads strided by 32, the row re-read for each pass (from L1/L2).
 * Likely cause of v1's (the fallback's) ~13x slowdown with accumulate_dx (ncu, h = 768: ~750 µs vs 57 µs; not yet
 * confirmed by a profile): dx is not restrict (it may alias dy), so in the second pass no load may move above the
 * previous iteration's store (the PTX shows load-load-load-store chains, unrolled but serialized). Without accumulation the chain's loads hit L1 (the first
 * pass just read x and dy); with it, every iteration also waits for the old dx, cold from DRAM: 24 dependent DRAM
 * round trips per row with one 64-byte request in flight per warp. The register-resident kernel issues every load
 * of its row at once (3 × 16 bytes per lane and tensor at h = 768), so accumulating costs one more read stream.
 *
 * Aliasing: a row is read and written by one warp only, and all its loads feed the warp reductions that every store
 * depends on, so dx may alias dy (and the parameter gradients are summed before dx is written). */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kRowsPerBlock = 8;               /* fallback: one warp each */
constexpr int kResidentRowsPerBlock = 4;       /* register-resident: small blocks, so that 70-100 registers per
                                                  thread still leave ~20 warps per SM */
constexpr int kChunkWidth = 8 * mb::kWarpSize; /* 256 columns: one bf16x8 per lane */
constexpr int kMaxChunks = 8;                  /* register-resident rows up to 2048 wide */

/* ---------------------------------------------------------------------------------- register-resident rows */

__device__ __forceinline__ void load_floats8(const float *address, float out[8]) {
    float4 lo = *reinterpret_cast<const float4 *>(address), hi = *reinterpret_cast<const float4 *>(address + 4);
    out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
    out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
}

/* First column of this lane in chunk c. */
__device__ __forceinline__ int chunk_column(int c, int lane) { return c * kChunkWidth + lane * 8; }

template <int kChunks>
__global__ void __launch_bounds__(kResidentRowsPerBlock *mb::kWarpSize)
    layernorm_forward_rows_kernel(mb::bf16 *y, float *mean_out, float *rstd_out, const mb::bf16 *x,
                                  const float *weight, const float *bias, int n, int h, float eps) {
    int row = blockIdx.x * kResidentRowsPerBlock + threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    if (row >= n) return;
    const mb::bf16 *xr = x + (size_t)row * h;
    mb::bf16x8 xs[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; c++)
        if (chunk_column(c, lane) < h) xs[c] = mb::load_bf16x8(xr + chunk_column(c, lane));

    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        if (chunk_column(c, lane) >= h) continue;
        float v[8];
        mb::unpack_bf16x8(xs[c], v);
#pragma unroll
        for (int k = 0; k < 8; k++) sum += v[k];
    }
    float mean = mb::warp_sum(sum) / (float)h;
    float squares = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        if (chunk_column(c, lane) >= h) continue;
        float v[8];
        mb::unpack_bf16x8(xs[c], v);
#pragma unroll
        for (int k = 0; k < 8; k++) squares += (v[k] - mean) * (v[k] - mean);
    }
    float rstd = 1.0f / sqrtf(mb::warp_sum(squares) / (float)h + eps);

    mb::bf16 *yr = y + (size_t)row * h;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        int col = chunk_column(c, lane);
        if (col >= h) continue;
        float v[8], w[8], b[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        mb::unpack_bf16x8(xs[c], v);
        load_floats8(weight + col, w);
        if (bias != nullptr) load_floats8(bias + col, b);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = (v[k] - mean) * rstd * w[k] + b[k];
        mb::store_bf16x8(yr + col, mb::pack_bf16x8(v));
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

template <int kChunks, bool kAccumulate>
__global__ void __launch_bounds__(kResidentRowsPerBlock *mb::kWarpSize)
    layernorm_input_grad_rows_kernel(mb::bf16 *dx, const mb::bf16 *dy, const mb::bf16 *x, const float *mean_in,
                                     const float *rstd_in, const float *weight, int n, int h) {
    int row = blockIdx.x * kResidentRowsPerBlock + threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    if (row >= n) return;
    size_t offset = (size_t)row * h;
    const mb::bf16 *xr = x + offset, *dyr = dy + offset;
    mb::bf16 *dxr = dx + offset;
    mb::bf16x8 xs[kChunks], dys[kChunks], old_dx[kAccumulate ? kChunks : 1];
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        int col = chunk_column(c, lane);
        if (col >= h) continue;
        xs[c] = mb::load_bf16x8(xr + col);
        dys[c] = mb::load_bf16x8(dyr + col);
        if constexpr (kAccumulate) old_dx[c] = mb::load_bf16x8(dxr + col);
    }
    float mean = mean_in[row], rstd = rstd_in[row];

    float sum_g = 0.0f, sum_g_xhat = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        int col = chunk_column(c, lane);
        if (col >= h) continue;
        float xv[8], dyv[8], w[8];
        mb::unpack_bf16x8(xs[c], xv);
        mb::unpack_bf16x8(dys[c], dyv);
        load_floats8(weight + col, w);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float g = dyv[k] * w[k];
            sum_g += g;
            sum_g_xhat += g * (xv[k] - mean) * rstd;
        }
    }
    float mean_g = mb::warp_sum(sum_g) / (float)h, mean_g_xhat = mb::warp_sum(sum_g_xhat) / (float)h;

#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        int col = chunk_column(c, lane);
        if (col >= h) continue;
        float xv[8], dyv[8], w[8], out[8];
        mb::unpack_bf16x8(xs[c], xv);
        mb::unpack_bf16x8(dys[c], dyv);
        load_floats8(weight + col, w);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float xhat = (xv[k] - mean) * rstd;
            out[k] = rstd * (dyv[k] * w[k] - mean_g - xhat * mean_g_xhat);
        }
        if constexpr (kAccumulate) {
            float previous[8];
            mb::unpack_bf16x8(old_dx[c], previous);
#pragma unroll
            for (int k = 0; k < 8; k++) out[k] += previous[k];
        }
        mb::store_bf16x8(dxr + col, mb::pack_bf16x8(out));
    }
}

/* ------------------------------------------------------------------------------------------ general fallback */

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

/* ------------------------------------------------------------------------------------------------ dispatch */

bool aligned16(const void *pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

/* Chunks of 256 columns for the register-resident kernels, or 0 when the row must take the fallback. */
int resident_chunks(int h, const void *a, const void *b, const void *c, const void *d) {
    if (h % 8 != 0 || h > kMaxChunks * kChunkWidth) return 0;
    if (!aligned16(a) || !aligned16(b) || !aligned16(c) || !aligned16(d)) return 0;
    return mb::ceil_div(h, kChunkWidth);
}

template <int kChunks>
void launch_forward_rows(mb::bf16 *y, float *mean, float *rstd, const mb::bf16 *x, const float *weight,
                         const float *bias, int n, int h, float eps, cudaStream_t stream) {
    dim3 grid(mb::ceil_div(n, kResidentRowsPerBlock)), block(kResidentRowsPerBlock * mb::kWarpSize);
    layernorm_forward_rows_kernel<kChunks><<<grid, block, 0, stream>>>(y, mean, rstd, x, weight, bias, n, h, eps);
}

template <int kChunks>
void launch_input_grad_rows(mb::bf16 *dx, const mb::bf16 *dy, const mb::bf16 *x, const float *mean,
                            const float *rstd, const float *weight, int n, int h, int accumulate_dx,
                            cudaStream_t stream) {
    dim3 grid(mb::ceil_div(n, kResidentRowsPerBlock)), block(kResidentRowsPerBlock * mb::kWarpSize);
    if (accumulate_dx)
        layernorm_input_grad_rows_kernel<kChunks, true>
            <<<grid, block, 0, stream>>>(dx, dy, x, mean, rstd, weight, n, h);
    else
        layernorm_input_grad_rows_kernel<kChunks, false>
            <<<grid, block, 0, stream>>>(dx, dy, x, mean, rstd, weight, n, h);
}

/* Calls launch<kChunks>(args...) for the runtime chunk count 1..kMaxChunks. */
#define MB_LAYERNORM_DISPATCH(chunks, launch, ...)                                                               \
    switch (chunks) {                                                                                             \
    case 1: launch<1>(__VA_ARGS__); break;                                                                        \
    case 2: launch<2>(__VA_ARGS__); break;                                                                        \
    case 3: launch<3>(__VA_ARGS__); break;                                                                        \
    case 4: launch<4>(__VA_ARGS__); break;                                                                        \
    case 5: launch<5>(__VA_ARGS__); break;                                                                        \
    case 6: launch<6>(__VA_ARGS__); break;                                                                        \
    case 7: launch<7>(__VA_ARGS__); break;                                                                        \
    default: launch<8>(__VA_ARGS__); break;                                                                       \
    }

}  // namespace

extern "C" int mb_cuda_layernorm_forward(mb_bf16 *y, float *mean, float *rstd, const mb_bf16 *x, const float *weight,
                                         const float *bias, int n, int h, float eps, cudaStream_t stream,
                                         mb_error *err) {
    MB_REQUIRE(err, y && mean && rstd && x && weight, "layernorm_forward: missing y, mean, rstd, x or weight");
    MB_REQUIRE(err, n >= 0 && h > 0, "layernorm_forward: bad shape n %d, h %d", n, h);
    if (n == 0) return 0;
    MB_NVTX_RANGE("layernorm_forward");
    mb::bf16 *y_bf = reinterpret_cast<mb::bf16 *>(y);
    const mb::bf16 *x_bf = reinterpret_cast<const mb::bf16 *>(x);
    int chunks = resident_chunks(h, y, x, weight, bias != nullptr ? bias : weight);
    if (chunks > 0) {
        MB_LAYERNORM_DISPATCH(chunks, launch_forward_rows, y_bf, mean, rstd, x_bf, weight, bias, n, h, eps, stream);
        MB_CUDA_CHECK_LAUNCH(err, "layernorm_forward_rows_kernel");
        return 0;
    }
    layernorm_forward_kernel<<<mb::ceil_div(n, kRowsPerBlock), kRowsPerBlock * mb::kWarpSize, 0, stream>>>(
        y_bf, mean, rstd, x_bf, weight, bias, n, h, eps);
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
    if (dweight != nullptr || dbias != nullptr) { /* before dx: dx may overwrite dy */
        layernorm_param_terms terms = {dy_bf, x_bf, mean, rstd, h};
        if (mb::column_sums<2>(dweight, dbias, static_cast<float *>(scratch), terms, n, h, stream, err) != 0)
            return -1;
    }
    if (dx == nullptr) return 0;
    mb::bf16 *dx_bf = reinterpret_cast<mb::bf16 *>(dx);
    int chunks = resident_chunks(h, dx, dy, x, weight);
    if (chunks > 0) {
        MB_LAYERNORM_DISPATCH(chunks, launch_input_grad_rows, dx_bf, dy_bf, x_bf, mean, rstd, weight, n, h,
                              accumulate_dx, stream);
        MB_CUDA_CHECK_LAUNCH(err, "layernorm_input_grad_rows_kernel");
        return 0;
    }
    layernorm_input_grad_kernel<<<mb::ceil_div(n, kRowsPerBlock), kRowsPerBlock * mb::kWarpSize, 0, stream>>>(
        dx_bf, dy_bf, x_bf, mean, rstd, weight, n, h, accumulate_dx);
    MB_CUDA_CHECK_LAUNCH(err, "layernorm_input_grad_kernel");
    return 0;
}
