/* LayerNorm over the last dimension (bf16 in and out, fp32 statistics and fp32 weight/bias), as src/cpu/layernorm.c.
 *
 * forward:  μ = mean(x), σ² = mean((x − μ)²) (biased), r = 1/sqrt(σ² + eps), x̂ = (x − μ)·r, y = x̂ ⊙ w (+ b)
 * backward: g = dy ⊙ w,  dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))
 *           dw += Σ_rows dy ⊙ x̂,  db += Σ_rows dy      (summed in an order fixed by n and h: bit-reproducible)
 *
 * Register-resident path (h % 8 == 0, h <= 2048, 16-byte aligned pointers: every ModernBERT width): lane l of a
 * warp owns the columns [256c + 8l, 256c + 8l + 8) of chunk c < ceil(h/256) of a row, moved as 16-byte bf16x8.
 *   - forward: one warp per row; the row is loaded into registers once, the variance is the two-pass formula.
 *   - backward (one fused pass): a persistent grid whose warps loop over rows, staging each row in shared memory by
 *     cp.async one row ahead; per row the warp reduces mean(g) and mean(g ⊙ x̂), writes (or adds to) dx, and adds
 *     dy ⊙ x̂ and dy of its columns into per-lane fp32 partials held in registers across its rows. Blocks then add
 *     their warps in warp order and write one partial row per sum; a small kernel adds the blocks in block order
 *     into dw/db. Bytes over HBM: x, dy (and the old dx) read once, dx written once, + 2·264·h floats of partials.
 * General fallback (any h): one warp per row, scalar loads strided by 32, the row re-read for each pass (from
 * L1/L2); the parameter gradients are the separate two-stage column sums of common.cuh.
 *
 * Aliasing: a row is read and written by one warp only, and all its loads land before its stores (every store
 * depends on the warp reductions over the row), so dx may alias dy; the rows staged ahead are other rows, which no
 * other warp writes. (The fallback queues the column sums before dx is written, for the same reason.) */
#include "common.cuh"
#include "cp_async.cuh"
#include "ops.h"

namespace {

constexpr int kRowsPerBlock = 8;               /* fallback: one warp each */
constexpr int kResidentRowsPerBlock = 4;       /* register-resident forward: small blocks, so that 50-100 registers
                                                  per thread still leave ~20 warps per SM */
constexpr int kChunkWidth = 8 * mb::kWarpSize; /* 256 columns: one bf16x8 per lane */
constexpr int kMaxChunks = 8;                  /* register-resident rows up to 2048 wide */

/* ---------------------------------------------------------------------------------- register-resident rows */

__device__ __forceinline__ void load_floats8(const float *address, float out[8]) {
    float4 lo = *reinterpret_cast<const float4 *>(address), hi = *reinterpret_cast<const float4 *>(address + 4);
    out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
    out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
}

/* x̂ = x·rstd + shift and dy of one lane's 8 columns, from the staged bf16 row. */
__device__ __forceinline__ void chunk_values(const mb::bf16 *x, const mb::bf16 *dy, float rstd, float shift,
                                             float (&xhat)[8], float (&dyv)[8]) {
    mb::unpack_bf16x8(mb::load_bf16x8(x), xhat);
    mb::unpack_bf16x8(mb::load_bf16x8(dy), dyv);
#pragma unroll
    for (int k = 0; k < 8; k++) xhat[k] = fmaf(xhat[k], rstd, shift);
}

/* sum[0..8) = (first ? 0 : sum) + part, as two 16-byte shared-memory accesses. */
__device__ __forceinline__ void add_floats8(float *sum, const float *part, bool first) {
    float4 *sum4 = reinterpret_cast<float4 *>(sum);
#pragma unroll
    for (int q = 0; q < 2; q++) {
        float4 v = first ? make_float4(0.0f, 0.0f, 0.0f, 0.0f) : sum4[q];
        v.x += part[4 * q], v.y += part[4 * q + 1], v.z += part[4 * q + 2], v.w += part[4 * q + 3];
        sum4[q] = v;
    }
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


/* ------------------------------------------------------------ backward: dx and the dw/db partials in one pass
 * A persistent grid of fused_blocks(n) blocks of kFusedWarps warps; warp t of the grid (t = block·kFusedWarps + warp)
 * owns rows t, t + T, t + 2T, ... (T = warps in the grid). Each row is staged in shared memory by cp.async,
 * kFusedStages rows ahead, so every warp keeps 1-2 rows of loads in flight without spending registers on them;
 * lane l reads only the 16-byte pieces it copied itself (columns [256c + 8l, 256c + 8l + 8)), so no barrier is
 * needed. Lane l keeps
 * the running sums of dy·x̂ and dy of its columns in registers over all the rows its warp owns; at the end the
 * block adds its warps in warp order into shared memory and writes one partial row per sum to scratch, and
 * layernorm_param_finish_kernel adds the blocks in block order into dw/db. The partition depends on n only. */

constexpr int kFusedWarps = 8;       /* warps per block */
constexpr int kFusedStages = 2;      /* rows staged per warp: the one being computed and the next */
constexpr int kFusedMaxBlocks = 264; /* 2 blocks per SM on a 132-SM H100/H200: one resident wave */
constexpr int kFinishLanes = 16;     /* row lanes of the finishing kernel */

/* Blocks of the fused backward for n rows (shape-only, so the summation order is the same on every GPU). */
__host__ __device__ constexpr int fused_blocks(int n) {
    return n <= kFusedWarps ? 1 : (mb::ceil_div(n, kFusedWarps) < kFusedMaxBlocks ? mb::ceil_div(n, kFusedWarps)
                                                                                   : kFusedMaxBlocks);
}

/* Shared-memory layout of one staged row: x, dy (and the old dx when accumulating) as bf16 rows of chunks·256
 * elements, indexed by column, then mean and rstd (copied by lanes 0 and 1; a __syncwarp after the wait makes them
 * visible to the whole warp). */
__host__ __device__ constexpr int staged_tensors(bool accumulate) { return accumulate ? 3 : 2; }
__host__ __device__ constexpr int stage_stats_offset(int chunks, bool accumulate) { /* bytes, a multiple of 512 */
    return staged_tensors(accumulate) * chunks * kChunkWidth * (int)sizeof(mb::bf16);
}
__host__ __device__ constexpr int stage_bytes(int chunks, bool accumulate) {
    return stage_stats_offset(chunks, accumulate) + 16; /* mean, rstd (16 bytes keep the next stage aligned) */
}
/* dynamic shared memory per block: the stages of every warp */
__host__ __device__ constexpr int fused_dynamic_bytes(int chunks, bool accumulate) {
    return kFusedWarps * kFusedStages * stage_bytes(chunks, accumulate);
}
/* static shared memory per block (at most): the block's dw and db partial rows */
__host__ __device__ constexpr int fused_static_bytes(int chunks) {
    return 2 * chunks * kChunkWidth * (int)sizeof(float);
}

/* Queues this lane's share of row `row` into `stage` (nothing past n) and commits one group, possibly empty, so that
 * "all but the newest kFusedStages − 1 groups" always means the row about to be computed. */
template <int kChunks, bool kAccumulate>
__device__ __forceinline__ void stage_row(unsigned char *stage, int row, int n, int h, const mb::bf16 *x,
                                          const mb::bf16 *dy, const mb::bf16 *old_dx, const float *mean,
                                          const float *rstd, int lane) {
    constexpr int kRowElements = kChunks * kChunkWidth;
    if (row < n) {
        size_t offset = (size_t)row * h;
        mb::bf16 *tiles = reinterpret_cast<mb::bf16 *>(stage);
#pragma unroll
        for (int c = 0; c < kChunks; c++) {
            int col = chunk_column(c, lane);
            if (col >= h) continue;
            cp_async_16_whole(tiles + col, x + offset + col);
            cp_async_16_whole(tiles + kRowElements + col, dy + offset + col);
            if constexpr (kAccumulate) cp_async_16_whole(tiles + 2 * kRowElements + col, old_dx + offset + col);
        }
        float *stats = reinterpret_cast<float *>(stage + stage_stats_offset(kChunks, kAccumulate));
        if (lane < 2) cp_async_4_whole(stats + lane, (lane == 0 ? mean : rstd) + row); /* read by every lane */
    }
    cp_async_commit();
}

/* kWriteDx: write (kAccumulate: add to) dx. kSums: 0 none, 1 dw, 2 dw and db partials into
 * partial[s][block][h] (s = 0 dw, 1 db). */
template <int kChunks, bool kWriteDx, bool kAccumulate, int kSums>
__global__ void __launch_bounds__(kFusedWarps *mb::kWarpSize, kChunks <= 4 ? 2 : 1)
    layernorm_backward_fused_kernel(mb::bf16 *dx, float *partial, const mb::bf16 *dy, const mb::bf16 *x,
                                    const float *mean_in, const float *rstd_in, const float *weight, int n, int h) {
    constexpr int kRowElements = kChunks * kChunkWidth, kStageBytes = stage_bytes(kChunks, kAccumulate);
    extern __shared__ __align__(16) unsigned char fused_shared[];
    __shared__ __align__(16) float block_sums[kSums > 0 ? kSums * kRowElements : 1];
    int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    int warps_in_grid = gridDim.x * kFusedWarps;
    unsigned char *stages = fused_shared + (size_t)warp * kFusedStages * kStageBytes;

    constexpr int kOwned = kChunks * 8; /* columns this lane owns (some may be >= h) */
    constexpr bool kKeepRow = kWriteDx && kChunks <= 3 && kSums <= 1; /* more would spill (ptxas) */
    float dw_part[kSums >= 1 ? kOwned : 1], db_part[kSums >= 2 ? kOwned : 1];
    float lane_weight[kWriteDx ? kOwned : 1]; /* this lane's weights, loaded once for all its rows */
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        const int col = chunk_column(c, lane);
        if constexpr (kWriteDx) {
            if (col < h) load_floats8(weight + col, lane_weight + 8 * c);
            else
#pragma unroll
                for (int k = 0; k < 8; k++) lane_weight[8 * c + k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if constexpr (kSums >= 1) dw_part[8 * c + k] = 0.0f;
            if constexpr (kSums >= 2) db_part[8 * c + k] = 0.0f;
        }
    }

    int row = blockIdx.x * kFusedWarps + warp;
#pragma unroll
    for (int s = 0; s < kFusedStages; s++)
        stage_row<kChunks, kAccumulate>(stages + s * kStageBytes, row + s * warps_in_grid, n, h, x, dy, dx,
                                        mean_in, rstd_in, lane);

    for (int step = 0; row < n; row += warps_in_grid, step++) {
        cp_async_wait<kFusedStages - 1>(); /* this lane's copies of the row have landed */
        __syncwarp();                      /* ... and every other lane's (mean and rstd are copied by lanes 0, 1) */
        unsigned char *stage = stages + (step % kFusedStages) * kStageBytes;
        const mb::bf16 *xs = reinterpret_cast<const mb::bf16 *>(stage), *dys = xs + kRowElements;
        const float *stats = reinterpret_cast<const float *>(stage + stage_stats_offset(kChunks, kAccumulate));
        const float mean = stats[0], rstd = stats[1], shift = -mean * rstd; /* x̂ = x·rstd + shift */

        /* x̂ and dy of the lane's columns; rows up to 768 wide keep them in registers for the second pass, wider
         * ones read them again from shared memory (the registers would spill) */
        float kept_xhat[kKeepRow ? kOwned : 1], kept_dy[kKeepRow ? kOwned : 1];
        float scale_g = 0.0f, shift_g = 0.0f, scale_xhat = 0.0f; /* dx = g·scale_g + shift_g + x̂·scale_xhat */
        if constexpr (kWriteDx) {
            float sum_g = 0.0f, sum_g_xhat = 0.0f;
#pragma unroll
            for (int c = 0; c < kChunks; c++) {
                const int col = chunk_column(c, lane);
                if (col >= h) continue;
                float xhat[8], dyv[8];
                chunk_values(xs + col, dys + col, rstd, shift, xhat, dyv);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    if constexpr (kKeepRow) kept_xhat[8 * c + k] = xhat[k], kept_dy[8 * c + k] = dyv[k];
                    const float g = dyv[k] * lane_weight[8 * c + k];
                    sum_g += g;
                    sum_g_xhat = fmaf(g, xhat[k], sum_g_xhat);
                }
            }
            const float mean_g = mb::warp_sum(sum_g) / (float)h, mean_g_xhat = mb::warp_sum(sum_g_xhat) / (float)h;
            scale_g = rstd, shift_g = -rstd * mean_g, scale_xhat = -rstd * mean_g_xhat;
        }

        size_t offset = (size_t)row * h;
#pragma unroll
        for (int c = 0; c < kChunks; c++) {
            int col = chunk_column(c, lane);
            if (col >= h) continue;
            float xhat[8], dyv[8];
            if constexpr (kKeepRow) {
#pragma unroll
                for (int k = 0; k < 8; k++) xhat[k] = kept_xhat[8 * c + k], dyv[k] = kept_dy[8 * c + k];
            } else {
                chunk_values(xs + col, dys + col, rstd, shift, xhat, dyv);
            }
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if constexpr (kSums >= 1) dw_part[8 * c + k] = fmaf(dyv[k], xhat[k], dw_part[8 * c + k]);
                if constexpr (kSums >= 2) db_part[8 * c + k] += dyv[k];
            }
            if constexpr (kWriteDx) {
                float out[8];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    out[k] = fmaf(xhat[k], scale_xhat, fmaf(dyv[k] * lane_weight[8 * c + k], scale_g, shift_g));
                if constexpr (kAccumulate) {
                    float previous[8];
                    mb::unpack_bf16x8(mb::load_bf16x8(xs + 2 * kRowElements + col), previous);
#pragma unroll
                    for (int k = 0; k < 8; k++) out[k] += previous[k];
                }
                mb::store_bf16x8(dx + offset + col, mb::pack_bf16x8(out));
            }
        }
        /* refill the stage just read with the row kFusedStages ahead; cp.async is not ordered after earlier loads
         * of the same lane by itself, and lanes 0 and 1 refill the statistics every lane read, so a warp barrier
         * goes first. */
        __syncwarp();
        stage_row<kChunks, kAccumulate>(stage, row + kFusedStages * warps_in_grid, n, h, x, dy, dx, mean_in,
                                        rstd_in, lane);
    }
    cp_async_wait<0>();

    if constexpr (kSums > 0) {
        /* block partial = warp 0 + warp 1 + ... in warp order */
        for (int w = 0; w < kFusedWarps; w++) {
            if (warp == w) {
#pragma unroll
                for (int c = 0; c < kChunks; c++) {
                    int col = chunk_column(c, lane);
                    if (col >= h) continue;
                    if constexpr (kSums >= 1) add_floats8(block_sums + col, dw_part + 8 * c, w == 0);
                    if constexpr (kSums >= 2) add_floats8(block_sums + kRowElements + col, db_part + 8 * c, w == 0);
                }
            }
            __syncthreads();
        }
        for (int i = threadIdx.x; i < kSums * h; i += blockDim.x) {
            int s = i / h, col = i - s * h;
            partial[((size_t)s * gridDim.x + blockIdx.x) * h + col] = block_sums[s * kRowElements + col];
        }
    }
}

/* dst_s[col] += Σ_blocks partial[s][block][col], blocks added in block order (row lane y takes blocks y, y + 16, ...,
 * then the 16 lanes are added in lane order). blockIdx.y = s; a NULL destination skips its sum. */
__global__ void __launch_bounds__(mb::kWarpSize *kFinishLanes)
    layernorm_param_finish_kernel(float *dweight, float *dbias, const float *partial, int blocks, int h) {
    __shared__ float lanes[kFinishLanes][mb::kWarpSize];
    float *dst = blockIdx.y == 0 ? dweight : dbias;
    if (dst == nullptr) return; /* the whole block */
    int col = blockIdx.x * mb::kWarpSize + threadIdx.x;
    const float *rows = partial + (size_t)blockIdx.y * blocks * h;
    float sum = 0.0f;
    if (col < h)
        for (int b = threadIdx.y; b < blocks; b += kFinishLanes) sum += rows[(size_t)b * h + col];
    lanes[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y != 0 || col >= h) return;
    float total = 0.0f;
    for (int lane = 0; lane < kFinishLanes; lane++) total += lanes[lane][threadIdx.x];
    dst[col] += total;
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

/* Arguments of one fused backward launch. */
struct fused_args {
    mb::bf16 *dx;
    float *partial;
    const mb::bf16 *dy, *x;
    const float *mean, *rstd, *weight;
    int n, h, sums; /* sums: 0, 1 (dw) or 2 (dw and db) */
    bool write_dx, accumulate;
};

template <int kChunks, bool kWriteDx, bool kAccumulate, int kSums>
int launch_fused_variant(const fused_args &a, cudaStream_t stream, mb_error *err) {
    auto kernel = layernorm_backward_fused_kernel<kChunks, kWriteDx, kAccumulate, kSums>;
    constexpr int bytes = fused_dynamic_bytes(kChunks, kAccumulate);
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    kernel<<<fused_blocks(a.n), kFusedWarps * mb::kWarpSize, bytes, stream>>>(a.dx, a.partial, a.dy, a.x, a.mean,
                                                                               a.rstd, a.weight, a.n, a.h);
    MB_CUDA_CHECK_LAUNCH(err, "layernorm_backward_fused_kernel");
    return 0;
}

template <int kChunks, bool kWriteDx, bool kAccumulate>
int launch_fused_sums(const fused_args &a, cudaStream_t stream, mb_error *err) {
    switch (a.sums) {
    case 0: return launch_fused_variant<kChunks, kWriteDx, kAccumulate, 0>(a, stream, err);
    case 1: return launch_fused_variant<kChunks, kWriteDx, kAccumulate, 1>(a, stream, err);
    default: return launch_fused_variant<kChunks, kWriteDx, kAccumulate, 2>(a, stream, err);
    }
}

template <int kChunks>
int launch_fused(const fused_args &a, cudaStream_t stream, mb_error *err) {
    if (!a.write_dx) /* parameter gradients only (sums > 0) */
        return a.sums == 1 ? launch_fused_variant<kChunks, false, false, 1>(a, stream, err)
                           : launch_fused_variant<kChunks, false, false, 2>(a, stream, err);
    return a.accumulate ? launch_fused_sums<kChunks, true, true>(a, stream, err)
                        : launch_fused_sums<kChunks, true, false>(a, stream, err);
}

/* The fused backward for 1..kMaxChunks chunks, then the finish of the parameter gradients. */
int fused_backward(int chunks, const fused_args &a, float *dweight, float *dbias, cudaStream_t stream,
                   mb_error *err) {
    int rc;
    switch (chunks) {
    case 1: rc = launch_fused<1>(a, stream, err); break;
    case 2: rc = launch_fused<2>(a, stream, err); break;
    case 3: rc = launch_fused<3>(a, stream, err); break;
    case 4: rc = launch_fused<4>(a, stream, err); break;
    case 5: rc = launch_fused<5>(a, stream, err); break;
    case 6: rc = launch_fused<6>(a, stream, err); break;
    case 7: rc = launch_fused<7>(a, stream, err); break;
    default: rc = launch_fused<8>(a, stream, err); break;
    }
    if (rc != 0 || a.sums == 0) return rc;
    dim3 grid(mb::ceil_div(a.h, mb::kWarpSize), a.sums), block(mb::kWarpSize, kFinishLanes);
    layernorm_param_finish_kernel<<<grid, block, 0, stream>>>(dweight, dbias, a.partial, fused_blocks(a.n), a.h);
    MB_CUDA_CHECK_LAUNCH(err, "layernorm_param_finish_kernel");
    return 0;
}

/* Whether this device grants the fused kernel's shared memory (the widest rows need ~210 KB per block: GPUs
 * with less take the fallback). */
int fused_fits(int chunks, bool accumulate, bool *fits, mb_error *err) {
    int device = 0, limit = 0;
    MB_CUDA_CHECK(err, cudaGetDevice(&device));
    MB_CUDA_CHECK(err, cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    *fits = fused_dynamic_bytes(chunks, accumulate) + fused_static_bytes(chunks) <= limit;
    return 0;
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

/* The larger of the two paths' needs: the fused kernel's partial rows (2 × fused_blocks(n) × h floats) and the
 * fallback's column-sum chunks. */
extern "C" size_t mb_cuda_layernorm_backward_scratch_bytes(int n, int h) {
    size_t fused = 2 * (size_t)fused_blocks(n) * (size_t)h, fallback = mb::column_sum_scratch_floats(n, h, 2);
    return (fused > fallback ? fused : fallback) * sizeof(float);
}

extern "C" int mb_cuda_layernorm_backward(mb_bf16 *dx, float *dweight, float *dbias, void *scratch, const mb_bf16 *dy,
                                          const mb_bf16 *x, const float *mean, const float *rstd, const float *weight,
                                          int n, int h, int accumulate_dx, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, dy && x && mean && rstd, "layernorm_backward: missing dy, x, mean or rstd");
    MB_REQUIRE(err, dx == nullptr || weight != nullptr, "layernorm_backward: dx needs the weight");
    MB_REQUIRE(err, (dweight == nullptr && dbias == nullptr) || scratch != nullptr,
               "layernorm_backward: parameter gradients need scratch");
    MB_REQUIRE(err, n >= 0 && h > 0, "layernorm_backward: bad shape n %d, h %d", n, h);
    int sums = dbias != nullptr ? 2 : (dweight != nullptr ? 1 : 0);
    if (n == 0 || (dx == nullptr && sums == 0)) return 0;
    MB_NVTX_RANGE("layernorm_backward");
    const mb::bf16 *dy_bf = reinterpret_cast<const mb::bf16 *>(dy), *x_bf = reinterpret_cast<const mb::bf16 *>(x);
    mb::bf16 *dx_bf = reinterpret_cast<mb::bf16 *>(dx);

    int chunks = resident_chunks(h, dx, dy, x, weight); /* a NULL dx or weight counts as aligned */
    bool fits = false;
    if (chunks > 0 && fused_fits(chunks, dx != nullptr && accumulate_dx, &fits, err) != 0) return -1;
    if (chunks > 0 && fits) {
        fused_args args = {dx_bf, static_cast<float *>(scratch), dy_bf, x_bf, mean, rstd, weight, n, h, sums,
                           dx != nullptr, dx != nullptr && accumulate_dx != 0};
        return fused_backward(chunks, args, dweight, dbias, stream, err);
    }

    if (sums > 0) { /* before dx: dx may overwrite dy */
        layernorm_param_terms terms = {dy_bf, x_bf, mean, rstd, h};
        if (mb::column_sums<2>(dweight, dbias, static_cast<float *>(scratch), terms, n, h, stream, err) != 0)
            return -1;
    }
    if (dx == nullptr) return 0;
    layernorm_input_grad_kernel<<<mb::ceil_div(n, kRowsPerBlock), kRowsPerBlock * mb::kWarpSize, 0, stream>>>(
        dx_bf, dy_bf, x_bf, mean, rstd, weight, n, h, accumulate_dx);
    MB_CUDA_CHECK_LAUNCH(err, "layernorm_input_grad_kernel");
    return 0;
}
