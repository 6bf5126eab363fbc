/* Token embedding (bf16 table, fp32 gradient), as src/cpu/embedding.c.
 *
 * forward:  out[i, :] = table[ids[i], :]
 * backward: dtable[v, :] += Σ_{i : ids[i] = v} dout[i, :] for every v ≠ pad_id (nn.Embedding(padding_idx) never
 *           accumulates into the pad row).
 *
 * Deterministic backward without float atomics: the (id, token) pairs are sorted by id with CUB's radix sort, which
 * is stable, so each id's tokens stay in token order (the sort's key width is cut to the bits the vocabulary needs).
 * Every run of equal ids then has exactly one owner of each of its columns, which adds in a fixed order:
 *   - short runs (≤ kShortMax tokens; with random ids nearly all): one warp per sorted position. The warp reads the 32
 *     ids around its position at once: not a run start (or the pad id) → it returns; else one ballot gives the run's
 *     end. It adds the run's rows in token order onto the dtable row (h % 8 == 0: 4 columns per lane and load, so a
 *     warp's loads and stores are contiguous), exactly the CPU's sequence of fp32 additions.
 *   - long runs (a frequent word, [MASK]): the warp finds the end by a 32-way search and queues the run as items, each
 *     a slice of its columns sized to ~kItemWork (row × 8-column) pieces; the item queue's order depends on timing
 *     (an integer atomicAdd) but not its contents. The second kernel spreads items over blocks: row lanes sum strided
 *     rows in increasing order, a fixed tree adds the row lanes, and the total is added to dtable once.
 * Memory floor (h = 768, 32768 random tokens over 50368 ids, ~24.5k distinct): dout 50 MB read once + ~24.5k dtable
 * rows read and written (150 MB) ≈ 200 MB ≈ 42 µs at 4.8 TB/s; skewed ids touch fewer dtable rows. */
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "ops.h"

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kShortWarps = 4;    /* warps (sorted positions) per block of the short-run kernel */
constexpr int kShortMax = 16;     /* longest run one warp adds; ids at lanes 2..kShortMax+1 decide */
constexpr int kLaneColumns = 32;  /* columns per lane per pass of a short run (W = 4, 8): 1024 per warp */
constexpr int kRowBatch = 2;      /* rows of a short run loaded before they are added */
constexpr int kLongThreads = 256; /* threads of a long-run item block */
constexpr int kLongBatch = 8;     /* rows per row lane loaded before they are added */
constexpr int kItemWork = 2048;   /* (row, piece) pairs per item: ~8 loads per thread */
constexpr int kMinItemRows = 8;   /* a run makes at most ⌈length / 8⌉ items: bounds the queue */
constexpr int kLongGrid = 512;    /* blocks of the long-run kernel (they stride over the queued items) */

/* Most items the queue can receive for n sorted tokens: a long run of L > kShortMax tokens makes at most
 * ⌈L / kMinItemRows⌉ ≤ (L + 7) / 8 items, Σ over runs ≤ (n + 7n / 17) / 8 < n / 4. */
__host__ __device__ constexpr int max_items(int n) { return n / 4 + 1; }

/* A row piece: W columns; 8 (one 16-byte load of bf16; two float4 of the fp32 table), 4 (8 bytes of bf16; one float4:
 * a warp's loads and stores of a row are contiguous) or 1 (any width, any alignment). */
template <int W>
struct piece_io;

template <>
struct piece_io<8> {
    typedef uint4 raw;
    static __device__ __forceinline__ raw load(const mb::bf16 *row, int piece) {
        return __ldg(reinterpret_cast<const uint4 *>(row) + piece);
    }
    static __device__ __forceinline__ void add(float acc[8], const raw &value) {
        float x[8];
        mb::unpack_bf16x8(*reinterpret_cast<const mb::bf16x8 *>(&value), x);
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] += x[k];
    }
    static __device__ __forceinline__ void load_sum(const float *row, int piece, float acc[8]) {
        const float4 *words = reinterpret_cast<const float4 *>(row) + 2 * piece;
        float4 a = words[0], b = words[1];
        acc[0] = a.x, acc[1] = a.y, acc[2] = a.z, acc[3] = a.w, acc[4] = b.x, acc[5] = b.y, acc[6] = b.z, acc[7] = b.w;
    }
    static __device__ __forceinline__ void store_sum(float *row, int piece, const float acc[8]) {
        float4 *words = reinterpret_cast<float4 *>(row) + 2 * piece;
        words[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        words[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
};

template <>
struct piece_io<4> {
    typedef uint2 raw;
    static __device__ __forceinline__ raw load(const mb::bf16 *row, int piece) {
        return __ldg(reinterpret_cast<const uint2 *>(row) + piece);
    }
    static __device__ __forceinline__ void add(float acc[4], const raw &value) {
        float2 low = __bfloat1622float2(*reinterpret_cast<const mb::bf162 *>(&value.x));
        float2 high = __bfloat1622float2(*reinterpret_cast<const mb::bf162 *>(&value.y));
        acc[0] += low.x, acc[1] += low.y, acc[2] += high.x, acc[3] += high.y;
    }
    static __device__ __forceinline__ void load_sum(const float *row, int piece, float acc[4]) {
        float4 a = reinterpret_cast<const float4 *>(row)[piece];
        acc[0] = a.x, acc[1] = a.y, acc[2] = a.z, acc[3] = a.w;
    }
    static __device__ __forceinline__ void store_sum(float *row, int piece, const float acc[4]) {
        reinterpret_cast<float4 *>(row)[piece] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    }
};

template <>
struct piece_io<1> {
    typedef mb::bf16 raw;
    static __device__ __forceinline__ raw load(const mb::bf16 *row, int piece) { return row[piece]; }
    static __device__ __forceinline__ void add(float acc[1], const raw &value) { acc[0] += mb::to_float(value); }
    static __device__ __forceinline__ void load_sum(const float *row, int piece, float acc[1]) { acc[0] = row[piece]; }
    static __device__ __forceinline__ void store_sum(float *row, int piece, const float acc[1]) { row[piece] = acc[0]; }
};

/* Copies rows (table rows table_stride pieces apart); when h and the stride are multiples of 8, in 16-byte pieces. */
template <typename Piece>
__global__ void gather_rows_kernel(Piece *out, const int32_t *ids, const Piece *table, size_t table_stride, int n,
                                   int pieces_per_row) {
    size_t total = (size_t)n * pieces_per_row;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total; k += (size_t)gridDim.x * blockDim.x) {
        size_t row = k / pieces_per_row, piece = k % pieces_per_row;
        out[k] = table[(size_t)ids[row] * table_stride + piece];
    }
}

/* values[i] = i (the token indices the sort carries along); also empties the long-run item queue. */
__global__ void iota_kernel(int32_t *values, int n, int *item_count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) values[i] = i;
    if (i == 0) *item_count = 0;
}

/* First position q in [lo, hi] with q == hi or ids[q] != id, given ids[lo − 1] == id in the sorted ids (so the run
 * of id is contiguous): each round the 32 lanes probe 32 evenly spaced positions, shrinking the range 32-fold. */
__device__ int warp_run_end(const int32_t *__restrict__ ids, int lo, int hi, int id) {
    const int lane = threadIdx.x % mb::kWarpSize;
    while (lo < hi) {
        int step = (hi - lo + 31) / 32, q = lo + lane * step;
        unsigned differs = __ballot_sync(kFullMask, q >= hi || ids[q] != id);
        if (differs == 0) { /* all 32 probes inside the run: the end lies after the last one */
            lo += 31 * step + 1;
            continue;
        }
        int first = __ffs(differs) - 1;
        if (first == 0) return lo;
        hi = min(lo + first * step, hi);
        lo += (first - 1) * step + 1;
    }
    return lo;
}

/* The run of sorted positions [start, end) (> kShortMax tokens) goes to the item queue as `used` column slices of
 * `width` pieces: about kItemWork (row, piece) pairs each, at most `pieces` and ⌈length / kMinItemRows⌉ slices. */
__device__ void queue_long_run(int *__restrict__ item_count, int4 *__restrict__ items, int start, int end, int pieces) {
    const int lane = threadIdx.x % mb::kWarpSize, length = end - start;
    long long by_work = ((long long)length * pieces + kItemWork - 1) / kItemWork;
    int parts = min(pieces, (length + kMinItemRows - 1) / kMinItemRows);
    parts = (int)min((long long)parts, by_work);
    int width = (pieces + parts - 1) / parts, used = (pieces + width - 1) / width;
    int base = 0;
    if (lane == 0) base = atomicAdd(item_count, used);
    base = __shfl_sync(kFullMask, base, 0);
    for (int j = lane; j < used; j += mb::kWarpSize)
        items[base + j] = make_int4(start, end, j * width, min(width, pieces - j * width));
}

/* table_row += the `length` (≤ kShortMax) rows whose tokens lanes 1..length hold, added in token order. */
template <int W>
__device__ void add_short_run(float *__restrict__ table_row, const mb::bf16 *__restrict__ dout, int h, int lane_token,
                              int length) {
    typedef piece_io<W> io;
    constexpr int kLanePieces = W == 1 ? 4 : kLaneColumns / W;
    const int lane = threadIdx.x % mb::kWarpSize, pieces = h / W;
    for (int first = 0; first < pieces; first += mb::kWarpSize * kLanePieces) { /* uniform: lanes shuffle inside */
        float acc[kLanePieces][W];
#pragma unroll
        for (int k = 0; k < kLanePieces; k++) {
            int piece = first + k * mb::kWarpSize + lane;
            if (piece < pieces) io::load_sum(table_row, piece, acc[k]);
        }
        for (int r = 0; r < length; r += kRowBatch) {
            typename io::raw raw[kRowBatch][kLanePieces];
#pragma unroll
            for (int j = 0; j < kRowBatch; j++) {
                int token = __shfl_sync(kFullMask, lane_token, (r + j + 1) % mb::kWarpSize);
                const mb::bf16 *row = dout + (size_t)token * h;
#pragma unroll
                for (int k = 0; k < kLanePieces; k++) {
                    int piece = first + k * mb::kWarpSize + lane;
                    if (r + j < length && piece < pieces) raw[j][k] = io::load(row, piece);
                }
            }
#pragma unroll
            for (int j = 0; j < kRowBatch; j++) {
#pragma unroll
                for (int k = 0; k < kLanePieces; k++) {
                    int piece = first + k * mb::kWarpSize + lane;
                    if (r + j < length && piece < pieces) io::add(acc[k], raw[j][k]);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < kLanePieces; k++) {
            int piece = first + k * mb::kWarpSize + lane;
            if (piece < pieces) io::store_sum(table_row, piece, acc[k]);
        }
    }
}

/* Warp w of the grid owns sorted position p = w: if a run of a non-pad id starts there, it adds the run (short) or
 * queues it (long). Lane l reads position p − 1 + l (id −1 outside [0, n), never a real id). */
template <int W>
__global__ void __launch_bounds__(kShortWarps *mb::kWarpSize, 5)
    embedding_short_runs_kernel(float *__restrict__ dtable, const mb::bf16 *__restrict__ dout,
                                const int32_t *__restrict__ sorted_ids, const int32_t *__restrict__ sorted_tokens,
                                int n, int h, int pad_id, int *__restrict__ item_count, int4 *__restrict__ items) {
    const int lane = threadIdx.x % mb::kWarpSize, p = blockIdx.x * kShortWarps + threadIdx.x / mb::kWarpSize;
    if (p >= n) return; /* uniform over the warp */
    const int q = p - 1 + lane;
    const bool inside = q >= 0 && q < n;
    const int lane_id = inside ? sorted_ids[q] : -1, lane_token = inside ? sorted_tokens[q] : 0;
    const int id = __shfl_sync(kFullMask, lane_id, 1);
    if (__shfl_sync(kFullMask, lane_id, 0) == id || id == pad_id) return; /* not a run start, or the pad row */
    const unsigned differs = __ballot_sync(kFullMask, lane >= 2 && lane <= kShortMax + 1 && lane_id != id);
    if (differs == 0) { /* positions p..p+kShortMax all hold id */
        constexpr int kLongW = W == 1 ? 1 : 8; /* the long-run kernel's piece width (16-byte pieces when vector) */
        queue_long_run(item_count, items, p, warp_run_end(sorted_ids, p + kShortMax + 1, n, id), h / kLongW);
        return;
    }
    add_short_run<W>(dtable + (size_t)id * h, dout, h, lane_token, __ffs(differs) - 2); /* first other id at lane l:
                                                                                        run length l − 1 */
}

/* acc += dout rows first, first + stride, … < end at `piece`, in increasing order. */
template <int W>
__device__ __forceinline__ void sum_strided_rows(float acc[W], const mb::bf16 *__restrict__ dout,
                                                 const int32_t *__restrict__ sorted_tokens, int first, int end,
                                                 int stride, int piece, int h) {
    typedef piece_io<W> io;
    for (int r = first; r < end; r += stride * kLongBatch) {
        int token[kLongBatch];
        typename io::raw raw[kLongBatch];
#pragma unroll
        for (int j = 0; j < kLongBatch; j++)
            if (r + j * stride < end) token[j] = __ldg(sorted_tokens + r + j * stride);
#pragma unroll
        for (int j = 0; j < kLongBatch; j++)
            if (r + j * stride < end) raw[j] = io::load(dout + (size_t)token[j] * h, piece);
#pragma unroll
        for (int j = 0; j < kLongBatch; j++)
            if (r + j * stride < end) io::add(acc, raw[j]);
    }
}

/* Block b adds queued items b, b + gridDim.x, …: item (start, end, first piece, width). Threads = piece lanes ×
 * row lanes; row lane k sums rows start + k, start + k + row_lanes, …; a fixed tree adds the row lanes. */
template <int W>
__global__ void __launch_bounds__(kLongThreads, 2)
    embedding_long_runs_kernel(float *__restrict__ dtable, const mb::bf16 *__restrict__ dout,
                               const int32_t *__restrict__ sorted_ids, const int32_t *__restrict__ sorted_tokens,
                               int h, const int *__restrict__ item_count, const int4 *__restrict__ items) {
    typedef piece_io<W> io;
    __shared__ float partial[W][kLongThreads];
    const int count = *item_count;
    for (int g = blockIdx.x; g < count; g += gridDim.x) {
        const int4 item = items[g]; /* x start, y end, z first piece, w width (pieces) */
        const int id = sorted_ids[item.x];
        const int piece_lanes = min(item.w, kLongThreads), row_lanes = kLongThreads / piece_lanes;
        const int column = threadIdx.x % piece_lanes, row_lane = threadIdx.x / piece_lanes;
        int tree = 1;
        while (tree < row_lanes) tree *= 2;
        for (int done = 0; done < item.w; done += piece_lanes) {
            const int piece = item.z + done + column;
            const bool active = row_lane < row_lanes && done + column < item.w;
            float *table_row = dtable + (size_t)id * h, acc[W], total[W];
            if (active && row_lane == 0) io::load_sum(table_row, piece, total); /* in flight with the rows */
#pragma unroll
            for (int c = 0; c < W; c++) acc[c] = 0.0f;
            if (active) sum_strided_rows<W>(acc, dout, sorted_tokens, item.x + row_lane, item.y, row_lanes, piece, h);
#pragma unroll
            for (int c = 0; c < W; c++) partial[c][threadIdx.x] = acc[c];
            __syncthreads();
            for (int half = tree / 2; half > 0; half /= 2) {
                if (active && row_lane < half && row_lane + half < row_lanes) {
#pragma unroll
                    for (int c = 0; c < W; c++) partial[c][threadIdx.x] += partial[c][threadIdx.x + half * piece_lanes];
                }
                __syncthreads();
            }
            if (active && row_lane == 0) {
#pragma unroll
                for (int c = 0; c < W; c++) total[c] += partial[c][threadIdx.x];
                io::store_sum(table_row, piece, total);
            }
            __syncthreads(); /* partial is reused */
        }
    }
}

int key_bits(int vocab) {
    int bits = 1;
    while (bits < 31 && (1 << bits) < vocab) bits++;
    return bits;
}

size_t align256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

/* Scratch layout: sorted ids [n] | token indices [n] | sorted token indices [n] | item count | items
 * [max_items(n)] | CUB temporary storage, each part 256-byte aligned. */
struct scratch_layout {
    int32_t *sorted_ids, *tokens, *sorted_tokens;
    int *item_count;
    int4 *items;
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
    layout->item_count = reinterpret_cast<int *>(p + 3 * ints);
    layout->items = reinterpret_cast<int4 *>(p + 3 * ints + 256);
    size_t queue = 256 + align256((size_t)max_items(n) * sizeof(int4));
    layout->cub_temp = p + 3 * ints + queue;
    layout->total = 3 * ints + queue + align256(layout->cub_bytes);
    return 0;
}

}  // namespace

extern "C" int mb_cuda_gather_rows(mb_bf16 *out, const int32_t *rows, const mb_bf16 *in, size_t in_stride, int n,
                                   int h, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, out && rows && in, "gather_rows: missing out, rows or in");
    MB_REQUIRE(err, n >= 0 && h > 0 && in_stride >= (size_t)h, "gather_rows: bad shape n %d, h %d, stride %zu", n, h,
               in_stride);
    if (n == 0) return 0;
    MB_NVTX_RANGE("gather_rows");
    bool vector = h % 8 == 0 && in_stride % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(in) % 16 == 0;
    int pieces = vector ? h / 8 : h;
    unsigned blocks = mb::grid_stride_blocks((size_t)n * pieces);
    if (vector)
        gather_rows_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<uint4 *>(out), rows,
                                                       reinterpret_cast<const uint4 *>(in), in_stride / 8, n, pieces);
    else
        gather_rows_kernel<<<blocks, 256, 0, stream>>>(out, rows, in, in_stride, n, pieces);
    MB_CUDA_CHECK_LAUNCH(err, "gather_rows_kernel");
    return 0;
}

extern "C" int mb_cuda_embedding_forward(mb_bf16 *out, const int32_t *ids, const mb_bf16 *table, int n, int h,
                                         cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, out && ids && table, "embedding_forward: missing out, ids or table");
    MB_REQUIRE(err, n >= 0 && h > 0, "embedding_forward: bad shape n %d, h %d", n, h);
    MB_NVTX_RANGE("embedding_forward");
    return mb_cuda_gather_rows(out, ids, table, (size_t)h, n, h, stream, err);
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
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(scratch) % 16 == 0,
               "embedding_backward: scratch is not 16-byte aligned");
    iota_kernel<<<mb::ceil_div(n, 256), 256, 0, stream>>>(layout.tokens, n, layout.item_count);
    MB_CUDA_CHECK_LAUNCH(err, "iota_kernel");
    MB_CUDA_CHECK(err, cub::DeviceRadixSort::SortPairs(layout.cub_temp, layout.cub_bytes, ids, layout.sorted_ids,
                                                       layout.tokens, layout.sorted_tokens, n, 0, key_bits(vocab),
                                                       stream));
    const mb::bf16 *dout16 = reinterpret_cast<const mb::bf16 *>(dout);
    bool vector = h % 8 == 0 && reinterpret_cast<uintptr_t>(dout) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(dtable) % 16 == 0;
    int short_blocks = mb::ceil_div(n, kShortWarps), long_blocks = min(max_items(n), kLongGrid);
    if (vector)
        embedding_short_runs_kernel<4><<<short_blocks, kShortWarps * mb::kWarpSize, 0, stream>>>(
            dtable, dout16, layout.sorted_ids, layout.sorted_tokens, n, h, pad_id, layout.item_count, layout.items);
    else
        embedding_short_runs_kernel<1><<<short_blocks, kShortWarps * mb::kWarpSize, 0, stream>>>(
            dtable, dout16, layout.sorted_ids, layout.sorted_tokens, n, h, pad_id, layout.item_count, layout.items);
    MB_CUDA_CHECK_LAUNCH(err, "embedding_short_runs_kernel");
    if (n <= kShortMax) return 0; /* no run can be long */
    if (vector)
        embedding_long_runs_kernel<8><<<long_blocks, kLongThreads, 0, stream>>>(
            dtable, dout16, layout.sorted_ids, layout.sorted_tokens, h, layout.item_count, layout.items);
    else
        embedding_long_runs_kernel<1><<<long_blocks, kLongThreads, 0, stream>>>(
            dtable, dout16, layout.sorted_ids, layout.sorted_tokens, h, layout.item_count, layout.items);
    MB_CUDA_CHECK_LAUNCH(err, "embedding_long_runs_kernel");
    return 0;
}
