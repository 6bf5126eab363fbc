/* mma.sync tile products shared by the attention kernels built on m16n8k16 (cuda/attention.cu v3/v4 and the
 * sliding-window band kernels): shared-memory tile shapes (rows padded by 16 bytes: ldmatrix is conflict-free),
 * A/B fragment loads, score and P·V products for one or kRB row blocks of 16 rows per warp, and row stores.
 * Accumulator layout (m16n8): c0/c1 at row (lane / 4), columns 2·(lane % 4) + {0, 1}; c2/c3 at row + 8. */
#ifndef MB_CUDA_ATTENTION_MMA_CUH
#define MB_CUDA_ATTENTION_MMA_CUH

#include "attention_common.cuh"

namespace {

template <int D>
struct shape {
    static constexpr int stride = D + 8;         /* bf16 per shared-memory row: 16-byte pad */
    static constexpr int d_tiles = D / 8;        /* n-tiles of 8 columns over the head dimension */
    static constexpr int k_steps = D / 16;       /* k-steps of 16 over the head dimension */
    static constexpr int dkdv_queries = D > 64 ? 32 : 64; /* query step of the dK/dV kernels (register budget) */
    static constexpr size_t tile_bytes(int rows) { return (size_t)rows * stride * sizeof(mb::bf16); }
};

/* ---- tensor-core fragments (v1 layouts; kStride = bf16 elements per shared-memory row) ---- */

/* A fragment (16×16) at (row0, col0) of a row-major shared tile. */
template <int kStride>
__device__ __forceinline__ void load_a(uint32_t a[4], const mb::bf16 *tile, int row0, int col0) {
    int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4(a, tile + (row0 + (lane & 15)) * kStride + col0 + (lane >> 4) * 8);
}

/* B fragments of two n-tiles (rows n0..n0+15 of the tile are the N dimension, columns k0..k0+15 the K dimension):
 * for S = X·Yᵀ with Y stored row-major [N, K]. b[0..1] for n-tile n0, b[2..3] for n0 + 8. */
template <int kStride>
__device__ __forceinline__ void load_b_rows(uint32_t b[4], const mb::bf16 *tile, int n0, int k0) {
    int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * kStride + k0 + ((lane >> 3) & 1) * 8);
}

/* B fragments of two n-tiles for O = P·Y with Y stored row-major [K, N] (rows k0..k0+15, columns n0..n0+15). */
template <int kStride>
__device__ __forceinline__ void load_b_cols(uint32_t b[4], const mb::bf16 *tile, int k0, int n0) {
    int lane = threadIdx.x % mb::kWarpSize;
    mb::ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + n0 + (lane >> 4) * 8);
}

/* acc[16 × 8·kN] += X[warp rows] · Y[rows 0..8·kN)ᵀ over the head dimension, X and Y in shared memory. */
template <int D, int kN>
__device__ __forceinline__ void scores(float acc[kN][4], const mb::bf16 *x_tile, int x_row0, const mb::bf16 *y_tile) {
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++) {
        uint32_t a[4];
        load_a<shape<D>::stride>(a, x_tile, x_row0, ks * 16);
#pragma unroll
        for (int j = 0; j < kN; j += 2) {
            uint32_t b[4];
            load_b_rows<shape<D>::stride>(b, y_tile, j * 8, ks * 16);
            mb::mma_bf16_16816(acc[j], a, b[0], b[1]);
            mb::mma_bf16_16816(acc[j + 1], a, b[2], b[3]);
        }
    }
}

/* The same with X's A fragments already in registers (x[k-step][4], loaded once by load_a). */
template <int D, int kN>
__device__ __forceinline__ void scores_reg(float acc[kN][4], const uint32_t x[shape<D>::k_steps][4],
                                           const mb::bf16 *y_tile) {
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++)
#pragma unroll
        for (int j = 0; j < kN; j += 2) {
            uint32_t b[4];
            load_b_rows<shape<D>::stride>(b, y_tile, j * 8, ks * 16);
            mb::mma_bf16_16816(acc[j], x[ks], b[0], b[1]);
            mb::mma_bf16_16816(acc[j + 1], x[ks], b[2], b[3]);
        }
}

/* out[16 × D] += P[16 × 8·kN] · Y[8·kN × D], P given as score-layout accumulators (re-packed to bf16 A fragments). */
template <int D, int kN>
__device__ __forceinline__ void accumulate_pv(float out[shape<D>::d_tiles][4], const float p[kN][4],
                                              const mb::bf16 *y_tile) {
#pragma unroll
    for (int kk = 0; kk < kN / 2; kk++) {
        uint32_t a[4] = {mb::pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), mb::pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                         mb::pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                         mb::pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt += 2) {
            uint32_t b[4];
            load_b_cols<shape<D>::stride>(b, y_tile, kk * 16, dt * 8);
            mb::mma_bf16_16816(out[dt], a, b[0], b[1]);
            mb::mma_bf16_16816(out[dt + 1], a, b[2], b[3]);
        }
    }
}

/* The same with P already packed: pk[n-tile][0] = bf16 pair of row group (columns 2·quad, +1), [1] of row group + 8. */
template <int D, int kN>
__device__ __forceinline__ void accumulate_packed(float out[shape<D>::d_tiles][4], const uint32_t pk[kN][2],
                                                  const mb::bf16 *y_tile) {
#pragma unroll
    for (int kk = 0; kk < kN / 2; kk++) {
        uint32_t a[4] = {pk[2 * kk][0], pk[2 * kk][1], pk[2 * kk + 1][0], pk[2 * kk + 1][1]};
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt += 2) {
            uint32_t b[4];
            load_b_cols<shape<D>::stride>(b, y_tile, kk * 16, dt * 8);
            mb::mma_bf16_16816(out[dt], a, b[0], b[1]);
            mb::mma_bf16_16816(out[dt + 1], a, b[2], b[3]);
        }
    }
}

/* ---- v4: kRB row blocks of 16 per warp. Every B fragment loaded by ldmatrix feeds kRB row blocks (2·kRB MMAs),
 * which halves the shared-memory traffic per MMA at kRB = 2 and gives each warp twice the independent MMA chains;
 * with kRB = 1 these are the v3 products above. ---- */

/* acc[rb][16 × 8·kN] += X[x_row0 + 16·rb ..] · Y[rows 0..8·kN)ᵀ over the head dimension, X and Y in shared memory. */
template <int D, int kN, int kRB>
__device__ __forceinline__ void scores_rb(float acc[kRB][kN][4], const mb::bf16 *x_tile, int x_row0,
                                          const mb::bf16 *y_tile) {
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++) {
        uint32_t a[kRB][4];
#pragma unroll
        for (int rb = 0; rb < kRB; rb++) load_a<shape<D>::stride>(a[rb], x_tile, x_row0 + 16 * rb, ks * 16);
#pragma unroll
        for (int j = 0; j < kN; j += 2) {
            uint32_t b[4];
            load_b_rows<shape<D>::stride>(b, y_tile, j * 8, ks * 16);
#pragma unroll
            for (int rb = 0; rb < kRB; rb++) {
                mb::mma_bf16_16816(acc[rb][j], a[rb], b[0], b[1]);
                mb::mma_bf16_16816(acc[rb][j + 1], a[rb], b[2], b[3]);
            }
        }
    }
}

/* The same with X's A fragments in registers (x[rb][k-step][4]). */
template <int D, int kN, int kRB>
__device__ __forceinline__ void scores_reg_rb(float acc[kRB][kN][4], const uint32_t x[kRB][shape<D>::k_steps][4],
                                              const mb::bf16 *y_tile) {
#pragma unroll
    for (int ks = 0; ks < shape<D>::k_steps; ks++)
#pragma unroll
        for (int j = 0; j < kN; j += 2) {
            uint32_t b[4];
            load_b_rows<shape<D>::stride>(b, y_tile, j * 8, ks * 16);
#pragma unroll
            for (int rb = 0; rb < kRB; rb++) {
                mb::mma_bf16_16816(acc[rb][j], x[rb][ks], b[0], b[1]);
                mb::mma_bf16_16816(acc[rb][j + 1], x[rb][ks], b[2], b[3]);
            }
        }
}

/* out[rb] += P[rb] · Y[8·kN × D], P as score-layout fp32 accumulators (re-packed to bf16 A fragments). */
template <int D, int kN, int kRB>
__device__ __forceinline__ void accumulate_pv_rb(float out[kRB][shape<D>::d_tiles][4], const float p[kRB][kN][4],
                                                 const mb::bf16 *y_tile) {
#pragma unroll
    for (int kk = 0; kk < kN / 2; kk++) {
        uint32_t a[kRB][4];
#pragma unroll
        for (int rb = 0; rb < kRB; rb++) {
            a[rb][0] = mb::pack_bf16x2(p[rb][2 * kk][0], p[rb][2 * kk][1]);
            a[rb][1] = mb::pack_bf16x2(p[rb][2 * kk][2], p[rb][2 * kk][3]);
            a[rb][2] = mb::pack_bf16x2(p[rb][2 * kk + 1][0], p[rb][2 * kk + 1][1]);
            a[rb][3] = mb::pack_bf16x2(p[rb][2 * kk + 1][2], p[rb][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt += 2) {
            uint32_t b[4];
            load_b_cols<shape<D>::stride>(b, y_tile, kk * 16, dt * 8);
#pragma unroll
            for (int rb = 0; rb < kRB; rb++) {
                mb::mma_bf16_16816(out[rb][dt], a[rb], b[0], b[1]);
                mb::mma_bf16_16816(out[rb][dt + 1], a[rb], b[2], b[3]);
            }
        }
    }
}

/* The same with P already packed (pk[rb][n-tile][row half], as accumulate_packed). */
template <int D, int kN, int kRB>
__device__ __forceinline__ void accumulate_packed_rb(float out[kRB][shape<D>::d_tiles][4], const uint32_t pk[kRB][kN][2],
                                                     const mb::bf16 *y_tile) {
#pragma unroll
    for (int kk = 0; kk < kN / 2; kk++) {
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt += 2) {
            uint32_t b[4];
            load_b_cols<shape<D>::stride>(b, y_tile, kk * 16, dt * 8);
#pragma unroll
            for (int rb = 0; rb < kRB; rb++) {
                uint32_t a[4] = {pk[rb][2 * kk][0], pk[rb][2 * kk][1], pk[rb][2 * kk + 1][0], pk[rb][2 * kk + 1][1]};
                mb::mma_bf16_16816(out[rb][dt], a, b[0], b[1]);
                mb::mma_bf16_16816(out[rb][dt + 1], a, b[2], b[3]);
            }
        }
    }
}

template <int kN>
__device__ __forceinline__ void zero(float acc[kN][4]) {
#pragma unroll
    for (int j = 0; j < kN; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
}

/* Writes a warp's 16 × D accumulator rows (row index row_a for c0/c1, row_a + 8 for c2/c3) times `scale` as bf16. */
template <int D>
__device__ __forceinline__ void store_rows(mb::bf16 *dst, size_t row_stride, const float acc[shape<D>::d_tiles][4],
                                           int row_a, int row_end, float scale) {
    int quad = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = row_a + 8 * half;
        if (row >= row_end) continue;
#pragma unroll
        for (int dt = 0; dt < shape<D>::d_tiles; dt++) {
            mb::bf162 pair = __floats2bfloat162_rn(acc[dt][2 * half] * scale, acc[dt][2 * half + 1] * scale);
            *reinterpret_cast<mb::bf162 *>(dst + (size_t)row * row_stride + dt * 8 + 2 * quad) = pair;
        }
    }
}

/* store_rows with RoPE's backward (rope_back) on each row's pairs (d, d + D/2) = n-tiles (dt, dt + D/16);
 * angle(half, dt, c) is the (cos, sin) of row row_a + 8·half, column dt·8 + 2·(lane % 4) + c (rows are tokens). */
template <int D, class Angle>
__device__ __forceinline__ void store_rows_rotated(mb::bf16 *dst, size_t row_stride,
                                                   const float acc[shape<D>::d_tiles][4], int row_a, int row_end,
                                                   float scale, Angle angle) {
    constexpr int kHalfTiles = D / 16;
    int quad = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int row = row_a + 8 * half;
        if (row >= row_end) continue;
        mb::bf16 *out = dst + (size_t)row * row_stride;
#pragma unroll
        for (int dt = 0; dt < kHalfTiles; dt++) {
            float x1[2], x2[2];
#pragma unroll
            for (int c = 0; c < 2; c++) {
                x1[c] = acc[dt][2 * half + c] * scale;
                x2[c] = acc[dt + kHalfTiles][2 * half + c] * scale;
                rope_back(x1[c], x2[c], angle(half, dt, c));
            }
            *reinterpret_cast<mb::bf162 *>(out + dt * 8 + 2 * quad) = __floats2bfloat162_rn(x1[0], x1[1]);
            *reinterpret_cast<mb::bf162 *>(out + D / 2 + dt * 8 + 2 * quad) = __floats2bfloat162_rn(x2[0], x2[1]);
        }
    }
}

/* store_rows_rotated with the angles read from rope = the table of mb_cuda_rope_table ([token][D/2] (cos, sin)). */
template <int D>
__device__ __forceinline__ void store_rows_rope_back(mb::bf16 *dst, size_t row_stride,
                                                     const float acc[shape<D>::d_tiles][4], int row_a, int row_end,
                                                     float scale, const float2 *rope) {
    const int quad = threadIdx.x % 4;
    store_rows_rotated<D>(dst, row_stride, acc, row_a, row_end, scale, [&](int half, int dt, int c) {
        return rope[(size_t)(row_a + 8 * half) * (D / 2) + dt * 8 + 2 * quad + c];
    });
}

/* store_rows, or store_rows_rope_back when a table is given (uniform). */
template <int D>
__device__ __forceinline__ void store_rows_maybe_rope(mb::bf16 *dst, size_t row_stride,
                                                      const float acc[shape<D>::d_tiles][4], int row_a, int row_end,
                                                      float scale, const float2 *rope) {
    if (rope != nullptr)
        store_rows_rope_back<D>(dst, row_stride, acc, row_a, row_end, scale, rope);
    else
        store_rows<D>(dst, row_stride, acc, row_a, row_end, scale);
}

}  // namespace

#endif
