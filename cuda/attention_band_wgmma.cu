/* Sliding-window (band) attention backward on Hopper tensor cores (wgmma), head_dim 64, window <= 64: the local
 * layers' backward of ModernBERT on sm_90a. Same math as cuda/attention_band.cu:
 *   p_ij = exp(s_ij − lse_i), dp_ij = do_i · v_j, ds_ij = p_ij (dp_ij − D_i)   (s = q·k·scale, D_i = do_i · o_i)
 *   dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i,  dv_j = Σ_i p_ij do_i     over |i − j| <= w in one sequence
 *
 * Geometry. A block is one warpgroup (128 threads) and owns one plan tile [t0, t0 + 64) × one head, like the band
 * kernels. Its STRIP is the 192 tokens [t0 − 64, t0 + 128) in three CHUNKS of 64 (chunk c = tokens t0 − 64 + 64c ..);
 * tokens outside the sequence are zero-filled and masked. Every 64 × 64 product is one wgmma chain m64n64k16 × 4
 * (the warpgroup's 64 rows are the tile's tokens), operands in 128-byte-swizzled shared tiles (cuda/wgmma.cuh):
 *   band_wgmma_dq_kernel   (rows = queries): per chunk S = Q·K_cᵀ, dP = dO·V_cᵀ (shared A and B), P, dS in registers,
 *                          dQ += dS·K_c (register A);                                           3 products per chunk
 *   band_wgmma_dkdv_kernel (rows = keys):    per chunk Sᵀ = K·Q_cᵀ, dPᵀ = V·dO_cᵀ, Pᵀ, dSᵀ, dV += Pᵀ·dO_c,
 *                          dK += dSᵀ·Q_c;                                                      4 products per chunk
 * Two kernels recompute P and dS for every pair (7 products against 5 with a dQ reduction), so that each element of
 * dqkv is written once by the block owning its row: no workspace, no atomics, bit-identical runs.
 *
 * Masks: d = (row token) − (strip token) = r − x + 64 − 64c for tile row r and chunk column x. Chunk 1 is the tile
 * itself (|d| <= 63: visible unless w < 63 or the tile is a sequence's short last tile); chunks 0 and 2 always need
 * the triangle |d| <= w. Masked P is exactly 0, so are its dS; zero-filled rows never reach a stored output.
 *
 * Loads: every thread queues cp.async copies of its share of the rows in three groups (the tile's two own tensors +
 * chunk 0 + the strip's lse and D, then chunk 1, then chunk 2), so chunk 0's products start while the rest lands;
 * before a chunk is read each thread waits for its groups, fences the async proxy and the block synchronizes.
 * Design and figures: docs/kernels/attention_band.md ("wgmma backward"). */
#include "attention_band.h"

#include "attention_mma.cuh"
#include "wgmma.cuh"

#include <cstdlib>
#include <cstring>

namespace {

constexpr int kHeadDim = 64;
constexpr int kRows = kBandTile;                 /* 64: the warpgroup's M */
constexpr int kChunks = 3;                       /* strip = [t0 − 64, t0 + 128) */
constexpr int kStrip = kChunks * kRows;          /* 192 tokens */
constexpr int kThreads = 128;                    /* one warpgroup */
constexpr uint32_t kTileBytes = kRows * 128;     /* 64 rows of 64 bf16 (one 128-byte swizzle row each) */
constexpr uint32_t kStripBytes = kChunks * kTileBytes;
constexpr int kMaxWindow = kRows;                /* chunks 0 and 2 hold every partner of |d| <= 64 */

/* Shared layout (bytes from a 1024-aligned base): own tiles A, B, strips X, Y (3 chunks each), then for the dK/dV
 * kernel the strip's lse and D. */
constexpr uint32_t kStripX = 2 * kTileBytes, kStripY = kStripX + kStripBytes; /* own tiles A, B at 0, kTileBytes */
constexpr uint32_t kFloats = kStripY + kStripBytes;
constexpr size_t kDqSharedBytes = kFloats + 1024;                                 /* + alignment slack */
constexpr size_t kDkdvSharedBytes = kFloats + 2 * kStrip * sizeof(float) + 1024;

struct wgmma_band_args {
    const int32_t *cu_seqlens, *seq_first, *tile_seq;
    int num_seqs, heads, window;
    float scale, scale_log2; /* 1/sqrt(64) and scale·log2 e */
    const float2 *rope;      /* RoPE's backward on dQ and dK in their stores, or nullptr */
};

#if MB_WGMMA_SM90 || !defined(__CUDA_ARCH__)

constexpr uint32_t kOwnA = 0, kOwnB = kTileBytes;

/* Queues the 64 rows of a tile whose row r is token `first` + r of a [*, 64] slice (row stride in elements) into
 * a swizzled tile; tokens outside [lo, hi) become zeros (their source, the slice start, is never read). A tile wholly
 * inside [lo, hi) (uniform) takes the fast path: thread t copies chunk t % 8 of rows t / 8 + 16m, whose swizzled
 * place is 2048 bytes apart (row % 8 does not change), ~2 instructions per copy. */
__device__ __forceinline__ void load_rows(char *tile, const mb::bf16 *src, size_t row_stride, int first, int lo,
                                          int hi) {
    constexpr int rows = kRows;
    if (first >= lo && first + rows <= hi) {
        const int chunk = threadIdx.x % 8, r0 = threadIdx.x / 8;
        const char *from = reinterpret_cast<const char *>(src + (size_t)(first + r0) * row_stride + chunk * 8);
        const uint32_t to = shared_address(tile) + swizzled_offset(r0, chunk);
        const size_t step = 16 * row_stride * sizeof(mb::bf16);
#pragma unroll
        for (int m = 0; m < rows / 16; m++) cp_async_16_whole(to + 2048 * m, from + m * step);
        return;
    }
    for (int i = threadIdx.x; i < rows * 8; i += kThreads) {
        const int r = i / 8, chunk = i % 8, token = first + r;
        const bool valid = token >= lo && token < hi;
        const mb::bf16 *from = valid ? src + (size_t)token * row_stride + chunk * 8 : src;
        cp_async_16(tile + swizzled_offset(r, chunk), from, valid);
    }
}

/* The same for one float per token (lse or D of one head: element stride `stride`). */
__device__ __forceinline__ void load_floats(float *dst, const float *src, int stride, int first, int rows, int lo,
                                            int hi) {
    for (int r = threadIdx.x; r < rows; r += kThreads) {
        const int token = first + r;
        const bool valid = token >= lo && token < hi;
        cp_async_4(dst + r, valid ? src + (size_t)token * stride : src, valid);
    }
}

/* Waits for this thread's copies up to group `chunk` (of three), publishes them to the tensor cores' async proxy and
 * to the other threads. */
__device__ __forceinline__ void wait_chunk(int chunk) {
    if (chunk == 0) cp_async_wait<2>();
    else if (chunk == 1) cp_async_wait<1>();
    else cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
}

/* acc[64 × 64] = A·Bᵀ over the 64 head dims: A [64 rows][64 d], B [64 rows][64 d], both K-major swizzled tiles. */
__device__ __forceinline__ void issue_rows_by_rows(float (&acc)[32], uint32_t a, uint32_t b) {
    const uint64_t desc_a = sw128_descriptor(a), desc_b = sw128_descriptor(b);
    wgmma_m64n64_ss_first<0, 0>(acc, desc_a, desc_b);
#pragma unroll
    for (int ks = 1; ks < 4; ks++) wgmma_m64n64_ss<0, 0>(acc, desc_a + 2 * ks, desc_b + 2 * ks, 1);
}

/* acc[64 × 64] += X·Y: X [64 × 64] as register A fragments, Y [64 k rows][64 d] read N-major (+2048 bytes = 16 rows
 * per k-step). */
__device__ __forceinline__ void issue_accumulate(float (&acc)[32], const uint32_t (&x)[4][4], uint32_t y) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) wgmma_m64n64_rs<1>(acc, x[kk], sw128_descriptor(y + 2048 * kk), 1);
}

/* bf16 A fragments of a 64 × 64 accumulator (k-step kk = accumulator columns 16kk .. 16kk + 15). */
__device__ __forceinline__ void pack_fragments(uint32_t (&x)[4][4], const float (&acc)[32]) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++) x[kk][r] = mb::pack_bf16x2(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
}

/* Thread's first accumulator row (16·warp + lane/4) and column (2·(lane % 4)); element 4j + e is row + 8·(e/2),
 * column 8j + col + (e % 2). */
struct fragment {
    int row, col;
};
__device__ __forceinline__ fragment my_fragment() {
    const int lane = threadIdx.x % mb::kWarpSize, warp = threadIdx.x / mb::kWarpSize;
    return {16 * warp + lane / 4, 2 * (lane % 4)};
}

/* Zeroes the elements of chunk c whose pair is invisible: |d| > window (d = r − x + 64 − 64c) or the strip token
 * (t0 − 64 + 64c + x for column x) outside [seq_begin, seq_end). Per row that leaves columns lo..hi; the comparisons
 * are against the thread's column offsets, so each element costs two compares and a select. */
__device__ __forceinline__ void mask_chunk(float (&p)[32], fragment f, int c, int window, int t0, int seq_begin,
                                           int seq_end) {
    const int chunk_first = t0 - kRows + kRows * c;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int centre = f.row + 8 * h + kRows - kRows * c; /* column of d = 0 */
        const int lo = max(centre - window, seq_begin - chunk_first) - f.col;
        const int hi = min(centre + window, seq_end - 1 - chunk_first) - f.col;
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int c2 = 0; c2 < 2; c2++) {
                const int x = 8 * j + c2;
                if (x < lo || x > hi) p[4 * j + 2 * h + c2] = 0.0f;
            }
    }
}

/* Whether chunk c of this tile has any invisible pair (uniform): chunks 0 and 2 always, the tile's own chunk only
 * for windows under 63 or a short last tile. */
__device__ __forceinline__ bool chunk_needs_mask(int c, int window, const tile_position &t) {
    return c != 1 || window < kRows - 1 || t.end < t.start + kRows;
}

#endif /* MB_WGMMA_SM90 || host pass */

/* ---- dQ: rows are the tile's queries ---- */

__global__ void __launch_bounds__(kThreads, 3)
    band_wgmma_dq_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                         const mb::bf16 *qkv, wgmma_band_args a) {
#if MB_WGMMA_SM90
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    char *smem = reinterpret_cast<char *>(((uintptr_t)shared_raw + 1023) & ~(uintptr_t)1023);
    const uint32_t base = shared_address(smem);
    tile_position t;
    int head;
    if (!find_tile(&t, &head, a.seq_first, a.tile_seq, a.cu_seqlens, a.num_seqs, a.heads, kBandTile)) return;
    const int hidden = a.heads * kHeadDim, first = t.start - kRows;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q = qkv + head * kHeadDim, *k = q + hidden, *v = q + 2 * hidden, *d_out = dout + head * kHeadDim;
    load_rows(smem + kOwnA, q, qkv_stride, t.start, t.seq_begin, t.end);
    load_rows(smem + kOwnB, d_out, hidden, t.start, t.seq_begin, t.end);
    for (int c = 0; c < kChunks; c++) {
        load_rows(smem + kStripX + c * kTileBytes, k, qkv_stride, first + kRows * c, t.seq_begin, t.seq_end);
        load_rows(smem + kStripY + c * kTileBytes, v, qkv_stride, first + kRows * c, t.seq_begin, t.seq_end);
        cp_async_commit();
    }
    const fragment f = my_fragment();
    float lse2[2], row_delta[2]; /* lse·log2 e and D of the thread's two rows (0 past the tile: never stored) */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int token = t.start + f.row + 8 * h;
        const bool valid = token < t.end;
        lse2[h] = valid ? lse[(size_t)token * a.heads + head] * kLog2e : 0.0f;
        row_delta[h] = valid ? delta[(size_t)token * a.heads + head] : 0.0f;
    }
    float s[32], dp[32], dq[32];
    uint32_t ds[4][4];
#pragma unroll
    for (int e = 0; e < 32; e++) dq[e] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        const int chunk_first = first + kRows * c;
        if (chunk_first + kRows <= t.seq_begin || chunk_first >= t.seq_end) continue; /* uniform */
        wait_chunk(c);
        const uint32_t k_chunk = base + kStripX + c * kTileBytes, v_chunk = base + kStripY + c * kTileBytes;
        fence_registers(dq);
        wgmma_fence();
        issue_rows_by_rows(s, base + kOwnA, k_chunk);
        wgmma_commit();
        issue_rows_by_rows(dp, base + kOwnB, v_chunk);
        wgmma_commit();
        wgmma_wait<1>(); /* S (and the previous chunk's dQ product: ds may be rewritten); dP may still run */
        fence_registers(s);
        fence_registers(dq);
#pragma unroll
        for (int e = 0; e < 32; e++) s[e] = fast_exp2(fmaf(s[e], a.scale_log2, -lse2[(e >> 1) & 1]));
        if (chunk_needs_mask(c, a.window, t)) mask_chunk(s, f, c, a.window, t.start, t.seq_begin, t.seq_end);
        wgmma_wait<0>();
        fence_registers(dp);
#pragma unroll
        for (int e = 0; e < 32; e++) s[e] *= dp[e] - row_delta[(e >> 1) & 1];
        pack_fragments(ds, s);
        wgmma_fence();
        issue_accumulate(dq, ds, k_chunk);
        wgmma_commit();
    }
    wgmma_wait<0>();
    fence_registers(dq);
    const int lane_row = t.start + f.row;
    store_rows_maybe_rope<kHeadDim>(dqkv + head * kHeadDim, qkv_stride, reinterpret_cast<const float(*)[4]>(dq),
                                    lane_row, t.end, a.scale, a.rope);
#endif
}

/* ---- dK, dV: rows are the tile's keys ---- */

__global__ void __launch_bounds__(kThreads, 2) /* 3 blocks: ptxas serializes the wgmmas (C7512) */
    band_wgmma_dkdv_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                           const mb::bf16 *qkv, wgmma_band_args a) {
#if MB_WGMMA_SM90
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    char *smem = reinterpret_cast<char *>(((uintptr_t)shared_raw + 1023) & ~(uintptr_t)1023);
    const uint32_t base = shared_address(smem);
    float *strip_lse = reinterpret_cast<float *>(smem + kFloats), *strip_delta = strip_lse + kStrip;
    tile_position t;
    int head;
    if (!find_tile(&t, &head, a.seq_first, a.tile_seq, a.cu_seqlens, a.num_seqs, a.heads, kBandTile)) return;
    const int hidden = a.heads * kHeadDim, first = t.start - kRows;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q = qkv + head * kHeadDim, *k = q + hidden, *v = q + 2 * hidden, *d_out = dout + head * kHeadDim;
    load_rows(smem + kOwnA, k, qkv_stride, t.start, t.seq_begin, t.end);
    load_rows(smem + kOwnB, v, qkv_stride, t.start, t.seq_begin, t.end);
    load_floats(strip_lse, lse + head, a.heads, first, kStrip, t.seq_begin, t.seq_end);
    load_floats(strip_delta, delta + head, a.heads, first, kStrip, t.seq_begin, t.seq_end);
    for (int c = 0; c < kChunks; c++) {
        load_rows(smem + kStripX + c * kTileBytes, q, qkv_stride, first + kRows * c, t.seq_begin, t.seq_end);
        load_rows(smem + kStripY + c * kTileBytes, d_out, hidden, first + kRows * c, t.seq_begin, t.seq_end);
        cp_async_commit();
    }
    const fragment f = my_fragment();
    float s[32], dp[32], dk[32], dv[32];
    uint32_t p_frag[4][4], ds_frag[4][4];
#pragma unroll
    for (int e = 0; e < 32; e++) dk[e] = dv[e] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        const int chunk_first = first + kRows * c;
        if (chunk_first + kRows <= t.seq_begin || chunk_first >= t.seq_end) continue; /* uniform */
        wait_chunk(c);
        const uint32_t q_chunk = base + kStripX + c * kTileBytes, do_chunk = base + kStripY + c * kTileBytes;
        fence_registers(dk);
        fence_registers(dv);
        wgmma_fence();
        issue_rows_by_rows(s, base + kOwnA, q_chunk);
        wgmma_commit();
        issue_rows_by_rows(dp, base + kOwnB, do_chunk);
        wgmma_commit();
        wgmma_wait<1>(); /* Sᵀ, and the previous chunk's dV, dK products (the fragments may be rewritten) */
        fence_registers(s);
        fence_registers(dk);
        fence_registers(dv);
        const float *chunk_lse = strip_lse + kRows * c, *chunk_delta = strip_delta + kRows * c;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float2 l = *reinterpret_cast<const float2 *>(chunk_lse + 8 * j + f.col);
            const float shift[2] = {l.x * kLog2e, l.y * kLog2e};
#pragma unroll
            for (int e = 0; e < 4; e++) s[4 * j + e] = fast_exp2(fmaf(s[4 * j + e], a.scale_log2, -shift[e & 1]));
        }
        if (chunk_needs_mask(c, a.window, t)) mask_chunk(s, f, c, a.window, t.start, t.seq_begin, t.seq_end);
        pack_fragments(p_frag, s);
        wgmma_fence();
        issue_accumulate(dv, p_frag, do_chunk); /* runs while dSᵀ is formed */
        wgmma_commit();
        wgmma_wait<1>(); /* dPᵀ */
        fence_registers(dp);
        fence_registers(dv);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float2 dl = *reinterpret_cast<const float2 *>(chunk_delta + 8 * j + f.col);
#pragma unroll
            for (int e = 0; e < 4; e++) dp[4 * j + e] = s[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? dl.y : dl.x));
        }
        pack_fragments(ds_frag, dp);
        wgmma_fence();
        issue_accumulate(dk, ds_frag, q_chunk);
        wgmma_commit();
    }
    wgmma_wait<0>();
    fence_registers(dk);
    fence_registers(dv);
    const int lane_row = t.start + f.row;
    store_rows_maybe_rope<kHeadDim>(dqkv + hidden + head * kHeadDim, qkv_stride,
                                    reinterpret_cast<const float(*)[4]>(dk), lane_row, t.end, a.scale, a.rope);
    store_rows<kHeadDim>(dqkv + 2 * hidden + head * kHeadDim, qkv_stride, reinterpret_cast<const float(*)[4]>(dv),
                         lane_row, t.end, 1.0f);
#endif
}

bool env_is(const char *name, const char *value) {
    const char *set = getenv(name);
    return set != nullptr && strcmp(set, value) == 0;
}

}  // namespace

bool mb_attention_band_wgmma_supports(int head_dim, int window) {
    if (head_dim != kHeadDim || window < 0 || window > kMaxWindow || env_is("MB_ATTENTION_BAND_BWD", "mma"))
        return false;
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major != 9) {
        (void)cudaGetLastError(); /* a failed query must not leave an error for the next launch check */
        return false;
    }
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, band_wgmma_dq_kernel) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return attributes.binaryVersion >= 90;
}

int mb_attention_band_wgmma_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                                     const mb::bf16 *qkv, const int32_t *cu_seqlens, mb::attention_plan plan,
                                     int num_seqs, int heads, int window, const float2 *rope, cudaStream_t stream,
                                     mb_error *err) {
    MB_REQUIRE(err, window >= 0 && window <= kMaxWindow, "attention_band_wgmma_backward: window %d outside 0..%d",
               window, kMaxWindow);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(dout) % 16 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0,
               "attention_band_wgmma_backward: qkv and dout must be 16-byte aligned");
    if (plan.blocks == 0) return 0;
    const float scale = 1.0f / sqrtf((float)kHeadDim);
    const wgmma_band_args args = {cu_seqlens, plan.seq_first, plan.tile_seq, num_seqs, heads, window,
                                  scale,      scale * kLog2e, rope};
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(band_wgmma_dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)kDqSharedBytes));
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(band_wgmma_dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)kDkdvSharedBytes));
    band_wgmma_dq_kernel<<<plan.blocks, kThreads, kDqSharedBytes, stream>>>(dqkv, dout, lse, delta, qkv, args);
    MB_CUDA_CHECK_LAUNCH(err, "band_wgmma_dq_kernel");
    band_wgmma_dkdv_kernel<<<plan.blocks, kThreads, kDkdvSharedBytes, stream>>>(dqkv, dout, lse, delta, qkv, args);
    MB_CUDA_CHECK_LAUNCH(err, "band_wgmma_dkdv_kernel");
    return 0;
}
