/* Token embedding (bf16 table, fp32 gradient), as src/cpu/embedding.c.
 *
 * forward:  out[i, :] = table[ids[i], :]
 * backward: dtable[v, :] += Σ_{i : ids[i] = v} dout[i, :] for every v ≠ pad_id (nn.Embedding(padding_idx) never
 *           accumulates into the pad row).
 *
 * Deterministic backward without atomics: the (id, token) pairs are sorted by id with CUB's radix sort, which is
 * stable, so each id's tokens stay in token order; then one block per run of equal ids sums that run's rows in a fixed
 * order (16 row lanes, each a fixed stride of the run, added lane by lane) and adds the total to the id's row, which
 * no other block touches. The sort's key width is cut to the bits the vocabulary needs. */
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kColumnLanes = 32, kRowLanes = 16, kColumnsPerLane = 16;
constexpr int kSuperTile = kColumnLanes * kColumnsPerLane; /* columns a block sums per pass over its run */

/* Copies rows; when h is a multiple of 8, in 16-byte pieces. */
template <typename Piece>
__global__ void gather_rows_kernel(Piece *out, const int32_t *ids, const Piece *table, int n, int pieces_per_row) {
    size_t total = (size_t)n * pieces_per_row;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total; k += (size_t)gridDim.x * blockDim.x) {
        size_t row = k / pieces_per_row, piece = k % pieces_per_row;
        out[k] = table[(size_t)ids[row] * pieces_per_row + piece];
    }
}

__global__ void iota_kernel(int32_t *values, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) values[i] = i;
}

/* Block p handles the run of equal ids that starts at sorted position p (other blocks return at once). */
__global__ void __launch_bounds__(kColumnLanes *kRowLanes)
    embedding_backward_runs_kernel(float *dtable, const mb::bf16 *dout, const int32_t *sorted_ids,
                                   const int32_t *sorted_tokens, int n, int h, int pad_id) {
    __shared__ float lane_sums[kRowLanes][kSuperTile];
    int start = blockIdx.x, id = sorted_ids[start];
    if ((start > 0 && sorted_ids[start - 1] == id) || id == pad_id) return; /* uniform over the block */
    int lo = start + 1, hi = n; /* first position after the run: binary search in the sorted ids */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (sorted_ids[mid] == id) lo = mid + 1;
        else hi = mid;
    }
    int end = lo, tx = threadIdx.x, ty = threadIdx.y;
    for (int base = 0; base < h; base += kSuperTile) {
        float sum[kColumnsPerLane];
#pragma unroll
        for (int k = 0; k < kColumnsPerLane; k++) sum[k] = 0.0f;
        for (int r = start + ty; r < end; r += kRowLanes) {
            const mb::bf16 *row = dout + (size_t)sorted_tokens[r] * h;
#pragma unroll
            for (int k = 0; k < kColumnsPerLane; k++) {
                int col = base + tx + kColumnLanes * k;
                if (col < h) sum[k] += mb::to_float(row[col]);
            }
        }
#pragma unroll
        for (int k = 0; k < kColumnsPerLane; k++) lane_sums[ty][tx + kColumnLanes * k] = sum[k];
        __syncthreads();
        int column_in_tile = ty * kColumnLanes + tx, col = base + column_in_tile;
        if (col < h) {
            float total = 0.0f;
            for (int lane = 0; lane < kRowLanes; lane++) total += lane_sums[lane][column_in_tile];
            dtable[(size_t)id * h + col] += total;
        }
        __syncthreads();
    }
}

int key_bits(int vocab) {
    int bits = 1;
    while (bits < 31 && (1 << bits) < vocab) bits++;
    return bits;
}

size_t align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

/* Scratch layout: sorted ids [n] | token indices [n] | sorted token indices [n] | CUB temporary storage. */
struct scratch_layout {
    int32_t *sorted_ids, *tokens, *sorted_tokens;
    void *cub_temp;
    size_t cub_bytes, total;
};

int plan_scratch(scratch_layout *layout, void *base, int n, int vocab, mb_error *err) {
    size_t ints = align256((size_t)n * sizeof(int32_t));
    layout->cub_bytes = 0;
    cudaError_t status = cub::DeviceRadixSort::SortPairs(nullptr, layout->cub_bytes, (const int32_t *)nullptr,
                                                         (int32_t *)nullptr, (const int32_t *)nullptr,
                                                         (int32_t *)nullptr, n, 0, key_bits(vocab));
    if (status != cudaSuccess)
        return mb_fail(err, "embedding_backward: sizing the radix sort of %d ids: %s", n, cudaGetErrorString(status));
    char *p = static_cast<char *>(base);
    layout->sorted_ids = reinterpret_cast<int32_t *>(p);
    layout->tokens = reinterpret_cast<int32_t *>(p + ints);
    layout->sorted_tokens = reinterpret_cast<int32_t *>(p + 2 * ints);
    layout->cub_temp = p + 3 * ints;
    layout->total = 3 * ints + align256(layout->cub_bytes);
    return 0;
}

}  // namespace

extern "C" int mb_cuda_embedding_forward(mb_bf16 *out, const int32_t *ids, const mb_bf16 *table, int n, int h,
                                         cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, out && ids && table, "embedding_forward: missing out, ids or table");
    MB_REQUIRE(err, n >= 0 && h > 0, "embedding_forward: bad shape n %d, h %d", n, h);
    if (n == 0) return 0;
    MB_NVTX_RANGE("embedding_forward");
    bool vector = h % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(table) % 16 == 0;
    int pieces = vector ? h / 8 : h;
    size_t total = (size_t)n * pieces;
    int blocks = (int)(total / 256 + 1 < 65536 ? total / 256 + 1 : 65536);
    if (vector)
        gather_rows_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<uint4 *>(out), ids,
                                                       reinterpret_cast<const uint4 *>(table), n, pieces);
    else
        gather_rows_kernel<<<blocks, 256, 0, stream>>>(out, ids, table, n, pieces);
    MB_CUDA_CHECK_LAUNCH(err, "gather_rows_kernel");
    return 0;
}

extern "C" int mb_cuda_embedding_backward_scratch_bytes(size_t *bytes, int n, int vocab, mb_error *err) {
    MB_REQUIRE(err, n >= 0 && vocab > 0, "embedding_backward: bad shape n %d, vocab %d", n, vocab);
    scratch_layout layout;
    if (plan_scratch(&layout, nullptr, n, vocab, err) != 0) return -1;
    *bytes = layout.total;
    return 0;
}

extern "C" int mb_cuda_embedding_backward(float *dtable, void *scratch, size_t scratch_bytes, const mb_bf16 *dout,
                                          const int32_t *ids, int n, int h, int vocab, int pad_id, cudaStream_t stream,
                                          mb_error *err) {
    MB_REQUIRE(err, dtable && scratch && dout && ids, "embedding_backward: missing dtable, scratch, dout or ids");
    MB_REQUIRE(err, n >= 0 && h > 0 && vocab > 0, "embedding_backward: bad shape n %d, h %d, vocab %d", n, h, vocab);
    if (n == 0) return 0;
    MB_NVTX_RANGE("embedding_backward");
    scratch_layout layout;
    if (plan_scratch(&layout, scratch, n, vocab, err) != 0) return -1;
    MB_REQUIRE(err, scratch_bytes >= layout.total, "embedding_backward: scratch holds %zu bytes, needs %zu",
               scratch_bytes, layout.total);
    iota_kernel<<<mb::ceil_div(n, 256), 256, 0, stream>>>(layout.tokens, n);
    MB_CUDA_CHECK_LAUNCH(err, "iota_kernel");
    MB_CUDA_CHECK(err, cub::DeviceRadixSort::SortPairs(layout.cub_temp, layout.cub_bytes, ids, layout.sorted_ids,
                                                       layout.tokens, layout.sorted_tokens, n, 0, key_bits(vocab),
                                                       stream));
    embedding_backward_runs_kernel<<<n, dim3(kColumnLanes, kRowLanes), 0, stream>>>(
        dtable, reinterpret_cast<const mb::bf16 *>(dout), layout.sorted_ids, layout.sorted_tokens, n, h, pad_id);
    MB_CUDA_CHECK_LAUNCH(err, "embedding_backward_runs_kernel");
    return 0;
}
