/* Shared pieces of the CUDA kernels: return-code checks that turn CUDA / cuBLASLt / NCCL failures into mb_error
 * messages (no exit() in library code), bf16 <-> fp32 helpers and 16-byte packed loads, warp and block reductions
 * whose summation order is fixed by the block shape (so results are bit-reproducible), the tensor-core fragments
 * used by attention (mma.sync m16n8k16 bf16 -> fp32, ldmatrix), and NVTX ranges for profiling.
 *
 * Only .cu files include this header; the C-callable interface is ops.h. */
#ifndef MB_CUDA_COMMON_CUH
#define MB_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <nvtx3/nvToolsExt.h>
#include <stdint.h>

extern "C" {
#include "common/error.h" /* a C header without extern "C" guards of its own */
}

/* ---- return-code checks: each makes the enclosing function `return mb_fail(err, ...)` (i.e. -1) ---- */

#define MB_CUDA_CHECK(err, call)                                                                                  \
    do {                                                                                                          \
        cudaError_t mb_status_ = (call);                                                                          \
        if (mb_status_ != cudaSuccess)                                                                            \
            return mb_fail((err), "%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(mb_status_));   \
    } while (0)

#define MB_CUBLAS_CHECK(err, call)                                                                                \
    do {                                                                                                          \
        cublasStatus_t mb_status_ = (call);                                                                       \
        if (mb_status_ != CUBLAS_STATUS_SUCCESS)                                                                  \
            return mb_fail((err), "%s:%d: %s: %s", __FILE__, __LINE__, #call, cublasLtGetStatusString(mb_status_)); \
    } while (0)

#define MB_NCCL_CHECK(err, call)                                                                                  \
    do {                                                                                                          \
        ncclResult_t mb_status_ = (call);                                                                         \
        if (mb_status_ != ncclSuccess)                                                                            \
            return mb_fail((err), "%s:%d: %s: %s", __FILE__, __LINE__, #call, ncclGetErrorString(mb_status_));    \
    } while (0)

/* After a <<<...>>> launch: reports a bad configuration or an earlier asynchronous fault (does not synchronize). */
#define MB_CUDA_CHECK_LAUNCH(err, what)                                                                           \
    do {                                                                                                          \
        cudaError_t mb_status_ = cudaGetLastError();                                                              \
        if (mb_status_ != cudaSuccess)                                                                            \
            return mb_fail((err), "%s:%d: launching %s: %s", __FILE__, __LINE__, (what),                          \
                           cudaGetErrorString(mb_status_));                                                       \
    } while (0)

/* Argument checks at the top of each launcher. */
#define MB_REQUIRE(err, condition, ...)                                                                           \
    do {                                                                                                          \
        if (!(condition)) return mb_fail((err), __VA_ARGS__);                                                     \
    } while (0)

namespace mb {

constexpr int kWarpSize = 32;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

/* Blocks of 256 threads for a grid-stride loop over `items`: one item per thread, at most 65536 blocks. */
inline unsigned grid_stride_blocks(size_t items) {
    return (unsigned)(items / 256 + 1 < 65536 ? items / 256 + 1 : 65536);
}

/* ---- bf16 ---- */

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }

/* Eight bf16 in one 16-byte word: one LDG.128 / STG.128 per thread. */
struct alignas(16) bf16x8 {
    bf162 pair[4];
};

__device__ __forceinline__ bf16x8 load_bf16x8(const bf16 *address) {
    uint4 raw = *reinterpret_cast<const uint4 *>(address);
    return *reinterpret_cast<bf16x8 *>(&raw);
}

__device__ __forceinline__ void store_bf16x8(bf16 *address, const bf16x8 &value) {
    *reinterpret_cast<uint4 *>(address) = *reinterpret_cast<const uint4 *>(&value);
}

__device__ __forceinline__ void unpack_bf16x8(const bf16x8 &packed, float out[8]) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 f = __bfloat1622float2(packed.pair[k]);
        out[2 * k] = f.x;
        out[2 * k + 1] = f.y;
    }
}

__device__ __forceinline__ bf16x8 pack_bf16x8(const float in[8]) {
    bf16x8 packed;
#pragma unroll
    for (int k = 0; k < 4; k++) packed.pair[k] = __floats2bfloat162_rn(in[2 * k], in[2 * k + 1]);
    return packed;
}

/* Two floats as one 32-bit register of bf16 (lower half = first element), the operand format of mma.sync. */
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    bf162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&pair);
}

/* ---- reductions (fixed order for a fixed block shape) ---- */

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

/* Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
 * `shared` holds 32 values of T. Contains __syncthreads: call it from all threads. */
template <typename T>
__device__ T block_sum(T value, T *shared) {
    int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
    value = warp_sum(value);
    __syncthreads(); /* `shared` may still be read by a previous call */
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    T total = lane < warps ? shared[lane] : T(0);
    return warp_sum(total);
}

__device__ __forceinline__ float block_max(float value, float *shared) {
    int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
    value = warp_max(value);
    __syncthreads();
    if (lane == 0) shared[warp] = value;
    __syncthreads();
    float total = lane < warps ? shared[lane] : -INFINITY;
    return warp_max(total);
}

/* ---- deterministic column sums: dst_s[c] += Σ_rows f_s(row, c) for up to two sums s ----
 * Stage 1: grid (column tiles of 32, row chunks); each thread sums a fixed strided subset of its chunk's rows, then
 * the 8 row lanes of a block are added in lane order into partial[s][chunk][c]. Stage 2: one thread per column adds
 * the chunk partials in chunk order. The partition depends on the row count only, so results are bit-reproducible.
 * The functor is `__device__ void operator()(int row, int col, float &sum0, float &sum1) const`. */

constexpr int kColumnTile = 32, kColumnRowLanes = 8;

__host__ __device__ inline int column_sum_chunks(int rows) {
    int chunks = ceil_div(rows, 128);
    return chunks < 1 ? 1 : (chunks > 128 ? 128 : chunks);
}

/* floats of scratch for `sums` column sums over [rows, cols] */
inline size_t column_sum_scratch_floats(int rows, int cols, int sums) {
    return (size_t)sums * (size_t)column_sum_chunks(rows) * (size_t)cols;
}

template <int kSums, typename F>
__global__ void __launch_bounds__(kColumnTile *kColumnRowLanes)
    column_sums_partial_kernel(float *partial, F f, int rows, int cols) {
    __shared__ float lanes[kSums][kColumnRowLanes][kColumnTile];
    int col = blockIdx.x * kColumnTile + threadIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
    int rows_per_chunk = ceil_div(rows, chunks);
    int begin = chunk * rows_per_chunk, end = min(rows, begin + rows_per_chunk);
    float sum[2] = {0.0f, 0.0f};
    if (col < cols)
        for (int row = begin + threadIdx.y; row < end; row += kColumnRowLanes) f(row, col, sum[0], sum[1]);
#pragma unroll
    for (int s = 0; s < kSums; s++) lanes[s][threadIdx.y][threadIdx.x] = sum[s];
    __syncthreads();
    if (threadIdx.y != 0 || col >= cols) return;
#pragma unroll
    for (int s = 0; s < kSums; s++) {
        float total = 0.0f;
        for (int lane = 0; lane < kColumnRowLanes; lane++) total += lanes[s][lane][threadIdx.x];
        partial[((size_t)s * chunks + chunk) * cols + col] = total;
    }
}

template <typename T>
__global__ void column_sums_finish_kernel(T *dst, const T *partial, int chunks, int cols) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    T total = 0;
    for (int chunk = 0; chunk < chunks; chunk++) total += partial[(size_t)chunk * cols + col];
    dst[col] += total;
}

/* The term of column_sums<1> for Σ_rows of a row-major bf16 matrix [rows, cols] (bias gradients). */
struct bf16_column_term {
    const bf16 *values;
    int cols;
    __device__ void operator()(int row, int col, float &sum, float &) const {
        sum += to_float(values[(size_t)row * cols + col]);
    }
};

/* Queues both stages; dst0/dst1 may be NULL to skip a sum (kSums counts the slots in scratch). */
template <int kSums, typename F>
int column_sums(float *dst0, float *dst1, float *scratch, F f, int rows, int cols, cudaStream_t stream,
                mb_error *err) {
    if (rows <= 0 || cols <= 0) return 0;
    int chunks = column_sum_chunks(rows);
    dim3 grid(ceil_div(cols, kColumnTile), chunks), block(kColumnTile, kColumnRowLanes);
    column_sums_partial_kernel<kSums><<<grid, block, 0, stream>>>(scratch, f, rows, cols);
    MB_CUDA_CHECK_LAUNCH(err, "column_sums_partial_kernel");
    float *dst[2] = {dst0, dst1};
    for (int s = 0; s < kSums; s++) {
        if (dst[s] == nullptr) continue;
        column_sums_finish_kernel<<<ceil_div(cols, 256), 256, 0, stream>>>(dst[s], scratch + (size_t)s * chunks * cols,
                                                                             chunks, cols);
        MB_CUDA_CHECK_LAUNCH(err, "column_sums_finish_kernel");
    }
    return 0;
}

/* ---- tensor-core fragments (sm_80+): mma.sync.m16n8k16 with bf16 operands and fp32 accumulators ----
 * Fragment layout (PTX ISA), lane = 4·group + quad:
 *   A 16×16 row-major: a0 (row group, cols 2quad..+1), a1 (row group+8), a2 (row group, cols 8+2quad..), a3 (row group+8, cols 8+..)
 *   B 16×8 "col":      b0 (k rows 2quad..+1, col group), b1 (k rows 8+2quad..+1, col group)
 *   C 16×8 fp32:       c0,c1 (row group, cols 2quad..+1), c2,c3 (row group+8, same cols) */

__device__ __forceinline__ void mma_bf16_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Four 8×8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i. */
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *shared_address) {
    uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared_address));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *shared_address) {
    uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared_address));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

/* ---- NVTX: `MB_NVTX_RANGE("attention_forward");` marks the rest of the scope in Nsight timelines ---- */

class nvtx_range {
  public:
    explicit nvtx_range(const char *name) { nvtxRangePushA(name); }
    ~nvtx_range() { nvtxRangePop(); }
    nvtx_range(const nvtx_range &) = delete;
    nvtx_range &operator=(const nvtx_range &) = delete;
};

}  // namespace mb

#define MB_NVTX_CONCAT_INNER(a, b) a##b
#define MB_NVTX_CONCAT(a, b) MB_NVTX_CONCAT_INNER(a, b)
#define MB_NVTX_RANGE(name) ::mb::nvtx_range MB_NVTX_CONCAT(mb_nvtx_range_, __LINE__)(name)

#endif
