/* Sliding-window (band) attention on Hopper tensor cores (wgmma), head_dim 64, window <= 64: the local layers of
 * ModernBERT on sm_90a, forward and backward. Same math as cuda/attention_band.cu:
 *   forward:  s_ij = q_i·k_j·scale, lse_i = log Σ_j exp(s_ij), o_i = Σ_j exp(s_ij − lse_i) v_j
 *   backward: p_ij = exp(s_ij − lse_i), dp_ij = do_i · v_j, ds_ij = p_ij (dp_ij − D_i)   (D_i = do_i · o_i)
 *             dq_i = scale Σ_j ds_ij k_j,  dk_j = scale Σ_i ds_ij q_i,  dv_j = Σ_i p_ij do_i
 * over |i − j| <= w in one sequence.
 *
 * Geometry: a sequence is cut into 64-token SEGMENTS (tiles). Tile i's partners are segments i − 1, i, i + 1 (its
 * three CHUNKS c = 0, 1, 2); chunks outside the sequence are skipped (the forward computes them on its own segment
 * and masks them whole), rows past its end are zero-filled and masked.
 *
 * Schedule (a segment ring): a block walks consecutive tiles of one head (block_work: one run of kRunTiles tiles per
 * block in the backward, an equal share per resident block in the forward), cut into PIECES at sequence and head
 * boundaries. A producer warp loads each segment the piece needs once (Q, K, V, and for the backward dO, lse, D, as
 * 128-byte-swizzled 64-row tiles, and the RoPE angles its stores need) into a ring of kRing slots and publishes it on
 * the slot's `full` mbarrier; after tile i the consumers hand segment i − 1 back (`empty`) and the producer refills
 * its slot with segment i + 3. Each segment crosses L2→SM once per piece (plus one halo segment at each end), against
 * three times per tile for one-block-per-tile kernels, and the loads run ahead of the products.
 *  - Backward (band_ring_backward_shared_ds_kernel, the default since session 14; one block per SM): warpgroup 0
 *    forms dK, dV of tile i (per chunk Sᵀ = K·Q_cᵀ, dPᵀ = V·dO_cᵀ, Pᵀ and dSᵀ in registers, dV += Pᵀ·dO_c,
 *    dK += dSᵀ·Q_c) and hands each chunk's dSᵀ whose query segment the block owns to warpgroup 1 through shared
 *    memory; warpgroup 1 adds dQ += dS·K_c into three rolling accumulators (5 products per pair), and forms the two
 *    chunks at a piece's ends itself (their key tiles belong to the neighbouring pieces). band_ring_backward_kernel
 *    (MB_ATTENTION_BAND_BWD=recompute_ds) has warpgroup 1 form its own S, dP, P and dS (7 products per pair). Every
 *    element of dqkv is written once, by the warpgroup owning its row: no workspace, no atomics, bit-identical runs.
 *  - Forward (band_ring_forward_kernel, two blocks per SM): one warpgroup, chunk by chunk with the online softmax.
 *
 * Masks: d = (row token) − (chunk token) = r − x + 64 − 64c for tile row r and chunk column x; chunks 0 and 2 always
 * need the triangle |d| <= w, chunk 1 only for w < 63 or a short last tile. Masked P is exactly 0, so is its dS.
 * Design and figures: docs/kernels/attention_band.md ("segment ring"). */
#include "attention_band.h"

#include "attention_mma.cuh"
#include "wgmma.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int kHeadDim = 64;
constexpr int kRows = kBandTile;   /* 64: a segment, and the warpgroups' M */
constexpr int kRing = 4;           /* three in use, one loading */
constexpr int kRunTiles = 16;      /* consecutive tiles of one head in the work order (block_work) */
constexpr int kMaxWindow = kRows;  /* chunks 0 and 2 hold every partner of |d| <= 64 */
constexpr int kThreads = 3 * 128;  /* dK/dV warpgroup, dQ warpgroup, producer warpgroup (one warp copies) */

/* One ring slot: Q, dO, K, V tiles (64 rows of 64 bf16, 128-byte swizzle, 8 KB each), then lse and D (64 floats
 * each), then (when the backward applies RoPE's backward in its stores) the segment's RoPE angles, 64 rows of 32
 * (cos, sin) pairs (kAngleRowBytes each, see slot_angle_offset); slots 1024-aligned. */
constexpr uint32_t kTileBytes = kRows * 128;
constexpr uint32_t kSegLse = 4 * kTileBytes, kSegDelta = kSegLse + kRows * 4;
constexpr uint32_t kAngleRowBytes = kHeadDim / 2 * 8;
constexpr uint32_t kSegAngles = (kSegDelta + kRows * 4 + 1023) / 1024 * 1024;
constexpr uint32_t kSlotBytes = kSegAngles + kRows * kAngleRowBytes;
constexpr size_t kSharedBytes = kRing * (size_t)kSlotBytes + 1024; /* + alignment slack */
static_assert(kSharedBytes + 1024 <= 227 * 1024, "one block per SM");

/* The shared-dS backward (the default; MB_ATTENTION_BAND_BWD=recompute_ds keeps the one before it): the ring, then
 * three dSᵀ chunk buffers of [64 keys][64 queries] bf16 (128-byte swizzle) that the dK/dV warpgroup fills and the dQ
 * warpgroup reads. */
constexpr uint32_t kDsBufferBytes = kTileBytes;
constexpr size_t kSharedDsBytes = kRing * (size_t)kSlotBytes + 3 * kDsBufferBytes + 1024;
static_assert(kSlotBytes % 1024 == 0 && kSharedDsBytes + 1024 <= 227 * 1024, "one shared-dS block per SM");

/* The forward's ring slot: Q, K, V tiles only (24 KB). Its block is one consumer warpgroup and the producer warp,
 * two blocks per SM, so that one block's softmax overlaps the other's products. */
constexpr uint32_t kFwdSlotBytes = 3 * kTileBytes;
constexpr int kFwdThreads = 128 + 32, kFwdBlocksPerSm = 2;
constexpr size_t kFwdSharedBytes = kRing * (size_t)kFwdSlotBytes + 1024;
static_assert(kFwdBlocksPerSm * (kFwdSharedBytes + 1024 + 64) <= 228 * 1024, "two forward blocks per SM");

struct ring_args {
    const int32_t *cu_seqlens, *seq_first, *tile_seq;
    int num_seqs, heads, window;
    float scale, scale_log2; /* 1/sqrt(64) and scale·log2 e */
    const float2 *rope;      /* RoPE's backward on dQ and dK in their stores, or nullptr */
    int equal_shares;        /* 1: each block of a resident grid takes an equal share; 0: one run per block */
};

#if MB_WGMMA_SM90 || !defined(__CUDA_ARCH__)

constexpr int kChunks = 3; /* segments i − 1, i, i + 1 */
constexpr int kConsumerWarps = 8;
/* setmaxnreg only moves registers between a block's warpgroups: the block launches with 168 per thread (65536 / 384,
 * in units of 8), and an increase that the decreases have not paid for waits for ever. So each kernel's three
 * warpgroup budgets sum to at most 3 · 168. */
constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8;
constexpr int kProducerRegisters = 40, kConsumerRegisters = 224;
static_assert(kProducerRegisters + 2 * kConsumerRegisters <= 3 * kLaunchRegisters, "registers at launch");
/* The shared-dS backward: warpgroup 0 keeps dK, dV and the in-flight fragments while it stores dSᵀ (at 224 ptxas
 * serializes its wgmmas, C7512, and at 248); warpgroup 1 holds three dQ accumulators (8 bytes of spill at 208). */
constexpr int kSharedDsRegistersA = 256, kSharedDsRegistersB = 208;
static_assert(kProducerRegisters + kSharedDsRegistersA + kSharedDsRegistersB <= 3 * kLaunchRegisters,
              "registers at launch");
constexpr uint32_t kSegQ = 0, kSegDO = kTileBytes, kSegK = 2 * kTileBytes, kSegV = 3 * kTileBytes;
constexpr uint32_t kFwdSegQ = 0, kFwdSegK = kTileBytes, kFwdSegV = 2 * kTileBytes;

/* The work, (head, plan tile) pairs, in the order u = (run · heads + head) · kRunTiles + r for tile run · kRunTiles
 * + r: runs of kRunTiles consecutive tiles of one head, the heads of one run next to each other, so that blocks
 * running at once read the same tokens' rows for different heads (DRAM pages, L2 lines). A block takes [u, u_end):
 *  - the backward: one run per block (384 blocks at 1024 tokens × 32 sequences, 2.9 waves at one per SM);
 *  - the forward: an equal share per block of a resident grid (two per SM): one run per block left 1.45 waves
 *    (0.110 against 0.103 ms), while equal shares cost the backward 3-5 % (0.272 against 0.265 ms: concurrent
 *    blocks then cover a third of the heads of a token range, measured on an H200). */

struct work_range {
    int u, u_end, total_tiles;
};

/* This block's share of the work (empty for spare blocks). Uniform over the block. */
__device__ __forceinline__ work_range block_work(const ring_args &a) {
    const int total_tiles = a.seq_first[a.num_seqs];
    const int total = (total_tiles + kRunTiles - 1) / kRunTiles * a.heads * kRunTiles; /* the last runs padded */
    const int share = a.equal_shares ? (total + (int)gridDim.x - 1) / (int)gridDim.x : kRunTiles;
    const int u = min((int)blockIdx.x * share, total);
    return {u, min(u + share, total), total_tiles};
}

/* A piece: consecutive tiles [first, last] of one sequence and one head (local tile numbers) and the segments it
 * loads, [seg_lo, seg_hi] = its tiles ± 1 inside the sequence. */
struct piece {
    int head, first, last, seg_lo, seg_hi, seq_begin, seq_end;
};

/* The next piece of the block's work, advancing w->u past it. Uniform over the block. */
__device__ __forceinline__ bool next_piece(piece *p, work_range *w, const ring_args &a) {
    int run, t;
    for (;;) { /* skip the padding past the last tile */
        if (w->u >= w->u_end) return false;
        run = w->u / kRunTiles;
        t = run / a.heads * kRunTiles + w->u % kRunTiles;
        if (t < w->total_tiles) break;
        w->u = (run + 1) * kRunTiles;
    }
    /* The plan places sequences longest bucket first, so seq_first[s + 1] is not where sequence s ends: its tile
     * count comes from its length. */
    const int s = a.tile_seq[t], s_first = a.seq_first[s];
    p->head = run % a.heads;
    p->seq_begin = a.cu_seqlens[s];
    p->seq_end = a.cu_seqlens[s + 1];
    const int s_tiles = (p->seq_end - p->seq_begin + kRows - 1) / kRows;
    const int run_end = t - w->u % kRunTiles + kRunTiles;
    const int end = min(min(t + (w->u_end - w->u), run_end), s_first + s_tiles); /* the share's, run's or sequence's */
    p->first = t - s_first;
    p->last = end - 1 - s_first;
    p->seg_lo = max(p->first - 1, 0);
    p->seg_hi = min(p->last + 1, s_tiles - 1);
    w->u += end - t;
    return true;
}

/* ---- the producer warp ---- */

/* Byte offset in a slot's angle rows of the 16-byte chunk holding pairs 2·chunk, 2·chunk + 1 of segment row `row`:
 * odd rows have chunk bit 2 flipped, so that the 8 lanes of a 16-byte shared load phase (rows r, r + 1, four quads
 * each reading chunk 4·dt + quad) fall on 32 different banks. */
__device__ __forceinline__ uint32_t slot_angle_offset(int row, int chunk) {
    return (uint32_t)row * kAngleRowBytes + (uint32_t)((chunk ^ ((row & 1) << 2)) * 16);
}

/* One warp queues the RoPE angles of rows [first, first + 64) ∩ [.., end) (the table's 256-byte rows) into the slot:
 * lane l copies chunk l % 16 of rows l / 16 + 2·it; rows past end are left alone (their dQ and dK are never stored). */
__device__ __forceinline__ void warp_load_angles(uint32_t angles, const float2 *rope, int first, int end) {
    const int lane = threadIdx.x % mb::kWarpSize, chunk = lane % 16;
    for (int row = lane / 16; row < kRows && first + row < end; row += 2)
        cp_async_16_whole(angles + slot_angle_offset(row, chunk),
                          rope + (size_t)(first + row) * (kHeadDim / 2) + 2 * chunk);
}

/* Fills the ring with every segment of the run in order: the backward's Q, dO, K, V, lse and D (kBackward), or the
 * forward's Q, K and V (dout, lse and delta unused). */
template <bool kBackward>
__device__ void produce(uint32_t ring, uint32_t full, uint32_t empty, const mb::bf16 *qkv, const mb::bf16 *dout,
                        const float *lse, const float *delta, work_range w, const ring_args &a) {
    constexpr uint32_t slot_bytes = kBackward ? kSlotBytes : kFwdSlotBytes;
    const int hidden = a.heads * kHeadDim;
    const size_t qkv_stride = 3 * (size_t)hidden;
    int g = 0; /* ring position: slot g % kRing, its (g / kRing)-th use */
    publisher publish; /* the forward's */
    piece p;
    while (next_piece(&p, &w, a)) {
        const int head = p.head;
        const mb::bf16 *q = qkv + head * kHeadDim, *k = q + hidden, *v = q + 2 * hidden;
        for (int j = p.seg_lo; j <= p.seg_hi; j++, g++) {
            const int slot = g % kRing, first = p.seq_begin + kRows * j;
            if (g >= kRing) mbarrier_wait(empty + 8 * slot, ((g / kRing) - 1) & 1);
            const uint32_t base = ring + slot * slot_bytes;
            const int end = p.seq_end;
            if constexpr (kBackward) {
                warp_load_rows<kRows>(shared_pointer<char>(base + kSegQ), q, qkv_stride, first, end);
                warp_load_rows<kRows>(shared_pointer<char>(base + kSegDO), dout + head * kHeadDim, hidden, first, end);
                warp_load_rows<kRows>(shared_pointer<char>(base + kSegK), k, qkv_stride, first, end);
                warp_load_rows<kRows>(shared_pointer<char>(base + kSegV), v, qkv_stride, first, end);
                warp_load_floats<kRows>(shared_pointer<float>(base + kSegLse), lse + head, a.heads, first, end);
                warp_load_floats<kRows>(shared_pointer<float>(base + kSegDelta), delta + head, a.heads, first, end);
                if (a.rope != nullptr) warp_load_angles(base + kSegAngles, a.rope, first, end);
            } else {
                warp_load_rows<kRows>(shared_pointer<char>(base + kFwdSegQ), q, qkv_stride, first, end);
                warp_load_rows<kRows>(shared_pointer<char>(base + kFwdSegK), k, qkv_stride, first, end);
                warp_load_rows<kRows>(shared_pointer<char>(base + kFwdSegV), v, qkv_stride, first, end);
            }
            /* The backward publishes a segment as soon as it lands. Published one commit late (after the next
             * segment is queued, which waits for a free slot, i.e. for both warpgroups to finish the tile before),
             * the faster dQ warpgroup could not start tile i + 1 before the dK/dV warpgroup had finished tile i:
             * 0.283 -> 0.281 ms at 1024, 0.294 -> 0.292 at 8192 (H200, session 13). The forward (one warpgroup, two
             * blocks per SM) measured 1-2 % slower that way and keeps the lag-one publisher. */
            if constexpr (kBackward) {
                cp_async_arrive_noinc(full + 8 * slot); /* this lane's arrival once its copies have landed */
            } else {
                cp_async_commit();
                publish.committed(full + 8 * slot);
            }
        }
    }
    if constexpr (kBackward)
        cp_async_wait<0>(); /* the last segments' copies land before the warp exits */
    else
        publish.flush();
}

/* ---- the tile products (one warpgroup) ---- */

/* acc[64 × 64] = A·Bᵀ over the 64 head dims: A [64 rows][64 d], B [64 rows][64 d], both K-major swizzled tiles. */
__device__ __forceinline__ void issue_rows_by_rows(float (&acc)[32], uint32_t a, uint32_t b) {
    const uint64_t desc_a = sw128_descriptor(a), desc_b = sw128_descriptor(b);
    wgmma_m64n64_ss_first<0, 0>(acc, desc_a, desc_b);
#pragma unroll
    for (int ks = 1; ks < 4; ks++)
        wgmma_m64n64_ss<0, 0>(acc, desc_a + descriptor_offset(32 * ks), desc_b + descriptor_offset(32 * ks), 1);
}

/* acc[64 × 64] += X·Y (or = X·Y with overwrite): X [64 × 64] as register A fragments, Y [64 k rows][64 d] read
 * N-major (+2048 bytes = 16 rows per k-step). */
__device__ __forceinline__ void issue_accumulate(float (&acc)[32], const uint32_t (&x)[4][4], uint32_t y,
                                                 bool overwrite = false) {
    const uint64_t descriptor_y = sw128_descriptor(y);
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
        wgmma_m64n64_rs<1>(acc, x[kk], descriptor_y + descriptor_offset(2048 * kk), kk == 0 && overwrite ? 0 : 1);
}

/* bf16 A fragments of a 64 × 64 accumulator (k-step kk = accumulator columns 16kk .. 16kk + 15). */
__device__ __forceinline__ void pack_fragments(uint32_t (&x)[4][4], const float (&acc)[32]) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++) x[kk][r] = mb::pack_bf16x2(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
}

/* Thread's first accumulator row (16·warp + lane/4 within its warpgroup) and column (2·(lane % 4)); element 4j + e
 * is row + 8·(e/2), column 8j + col + (e % 2). */
struct fragment {
    int row, col;
};
__device__ __forceinline__ fragment my_fragment() {
    const int lane = threadIdx.x % mb::kWarpSize, warp = (threadIdx.x / mb::kWarpSize) % 4;
    return {16 * warp + lane / 4, 2 * (lane % 4)};
}

/* Sets to `fill` (0 for P in the backward, −inf for the forward's scores) the elements of chunk c whose pair is
 * invisible: |d| > window (d = r − x + 64 − 64c) or the chunk token (t0 − 64 + 64c + x for column x) outside
 * [seq_begin, seq_end). Per row that leaves columns lo..hi. */
__device__ __forceinline__ void mask_chunk(float (&p)[32], fragment f, int c, int window, int t0, int seq_begin,
                                           int seq_end, float fill = 0.0f) {
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
                if (x < lo || x > hi) p[4 * j + 2 * h + c2] = fill;
            }
    }
}

/* Whether chunk c of the tile [t0, t_end) has any invisible pair (uniform). */
__device__ __forceinline__ bool chunk_needs_mask(int c, int window, int t0, int t_end) {
    return c != 1 || window < kRows - 1 || t_end < t0 + kRows;
}

/* The ring position of segment j in a piece whose first loaded segment (seg_lo) sits at position g_base. */
struct ring_view {
    uint32_t ring, full, slot_bytes;
    int g_base, seg_lo;
    __device__ uint32_t slot(int j) const { return ring + ((g_base + j - seg_lo) % kRing) * slot_bytes; }
    __device__ void wait(int j) const {
        const int g = g_base + j - seg_lo;
        mbarrier_wait(full + 8 * (g % kRing), (g / kRing) & 1);
    }
};

/* The RoPE angles of the thread's accumulator elements: rows row_a and row_a + 8, n-tiles dt and dt + 4 share the
 * angle of column 8·dt + 2·(lane % 4) + {0, 1} (one float4). The producer queues each segment's angles into its slot
 * with the tiles, so the stores read them from shared memory. Loaded from the table by the stores themselves (dQ's
 * at the tile's start into 32 registers, dK's from L1 after a prefetch), RoPE in the stores took the backward from
 * 0.266 to 0.342 ms per layer; from the slots it takes 0.285 ms (bench attention --rope, H200s, 1024-token
 * documents; docs/kernels/attention_band.md, "Session 11"). */
struct row_angles {
    float4 cs[2][kHeadDim / 16];
};

/* The angles of rows local_row and local_row + 8 of the segment whose slot is `slot` (rows past the sequence end
 * hold stale values and are never stored). */
__device__ __forceinline__ void slot_angles(row_angles &angles, uint32_t slot, int local_row) {
    const int quad = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++)
#pragma unroll
        for (int dt = 0; dt < kHeadDim / 16; dt++)
            angles.cs[half][dt] =
                *shared_pointer<float4>(slot + kSegAngles + slot_angle_offset(local_row + 8 * half, 4 * dt + quad));
}

/* The dQ and dK stores: RoPE's backward with the segment's angles from its slot (store_rows_rotated,
 * attention_mma.cuh), or none (uniform). */
__device__ __forceinline__ void store_rotated(mb::bf16 *dst, size_t row_stride, const float (&acc)[32], int row_a,
                                              int row_end, const ring_args &a, uint32_t slot, int local_row) {
    const auto rows = reinterpret_cast<const float(*)[4]>(acc);
    if (a.rope != nullptr) {
        row_angles angles;
        slot_angles(angles, slot, local_row);
        store_rows_rotated<kHeadDim>(dst, row_stride, rows, row_a, row_end, a.scale, [&](int half, int dt, int c) {
            const float4 cs = angles.cs[half][dt];
            return c == 0 ? make_float2(cs.x, cs.y) : make_float2(cs.z, cs.w);
        });
    } else {
        store_rows<kHeadDim>(dst, row_stride, rows, row_a, row_end, a.scale);
    }
}

/* ---- the shared-dS backward's hand-off: warpgroup 0 stores each chunk's dSᵀ, warpgroup 1 multiplies it by K ----
 * Buffer c holds chunk c's dSᵀ of the current tile ([64 keys][64 queries], the A fragments' 8 × 8 matrices stored
 * with stmatrix, as the global backward's store_score_gradients). `full[c]`: the 128 threads of warpgroup 0 (each after
 * its own stores and proxy fence); `empty[c]`: the 4 warps of warpgroup 1 once their wgmma read the buffer. Only
 * chunks whose query segment the piece owns ([first, last]) are handed over; both sides count the uses per buffer
 * (phase = use & 1). */
struct ds_exchange {
    uint32_t buffers, full, empty;
    int uses[kChunks];
};

__device__ __forceinline__ void store_ds_chunk(uint32_t buffer, const uint32_t (&ds)[4][4]) {
    const int lane = threadIdx.x % mb::kWarpSize, warp = (threadIdx.x / mb::kWarpSize) % 4, matrix = lane / 8;
    const int row = 16 * warp + lane % 8 + 8 * (matrix & 1);
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        const uint32_t address = buffer + swizzled_offset(row, 2 * kk + (matrix >> 1));
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
                     "r"(ds[kk][0]), "r"(ds[kk][1]), "r"(ds[kk][2]), "r"(ds[kk][3])
                     : "memory");
    }
}

/* Whether the piece owns query segment j (its dQ is stored by this block). */
__device__ __forceinline__ bool owns_segment(const piece &p, int j) { return j >= p.first && j <= p.last; }

/* ---- warpgroup 0: dK, dV of tile i (and, with an exchange, the owned chunks' dSᵀ for warpgroup 1) ---- */

template <bool kShareDs = false>
__device__ __forceinline__ void tile_dkdv(mb::bf16 *dqkv, const ring_view &r, const piece &p, int i,
                                          const ring_args &a, ds_exchange *x = nullptr) {
    const int head = p.head;
    const fragment f = my_fragment();
    const int t0 = p.seq_begin + kRows * i, t_end = min(t0 + kRows, p.seq_end);
    r.wait(i); /* the tile's own K and V feed every chunk's products, chunk 0's included */
    const uint32_t own = r.slot(i);
    float s[32], dp[32], dk[32], dv[32];
    uint32_t p_frag[4][4], ds_frag[4][4];
#pragma unroll
    for (int e = 0; e < 32; e++) dk[e] = dv[e] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        const int j = i - 1 + c;
        if (j < p.seg_lo || j > p.seg_hi) continue; /* outside the sequence (uniform) */
        r.wait(j);
        const uint32_t chunk = r.slot(j);
        fence_registers(dk);
        fence_registers(dv);
        wgmma_fence();
        issue_rows_by_rows(s, own + kSegK, chunk + kSegQ);
        wgmma_commit();
        issue_rows_by_rows(dp, own + kSegV, chunk + kSegDO);
        wgmma_commit();
        wgmma_wait<1>(); /* Sᵀ, and the previous chunk's dV, dK products (the fragments may be rewritten) */
        fence_registers(s);
        fence_registers(dk);
        fence_registers(dv);
        const float *chunk_lse = reinterpret_cast<const float *>(__cvta_shared_to_generic(chunk + kSegLse));
        const float *chunk_delta = reinterpret_cast<const float *>(__cvta_shared_to_generic(chunk + kSegDelta));
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
            const float2 l = *reinterpret_cast<const float2 *>(chunk_lse + 8 * jj + f.col);
            const float shift[2] = {l.x * kLog2e, l.y * kLog2e};
#pragma unroll
            for (int e = 0; e < 4; e++)
                s[4 * jj + e] = fast_exp2(fmaf(s[4 * jj + e], a.scale_log2, -shift[e & 1]));
        }
        if (chunk_needs_mask(c, a.window, t0, t_end)) mask_chunk(s, f, c, a.window, t0, p.seq_begin, p.seq_end);
        pack_fragments(p_frag, s);
        wgmma_fence();
        issue_accumulate(dv, p_frag, chunk + kSegDO); /* runs while dSᵀ is formed */
        wgmma_commit();
        wgmma_wait<1>(); /* dPᵀ */
        fence_registers(dp);
        fence_registers(dv);
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
            const float2 dl = *reinterpret_cast<const float2 *>(chunk_delta + 8 * jj + f.col);
#pragma unroll
            for (int e = 0; e < 4; e++)
                dp[4 * jj + e] = s[4 * jj + e] * (dp[4 * jj + e] - ((e & 1) ? dl.y : dl.x));
        }
        pack_fragments(ds_frag, dp);
        if (kShareDs && owns_segment(p, j)) { /* before the dK product, so that warpgroup 1 waits less */
            const int use = x->uses[c]++;
            if (use >= 1) mbarrier_wait(x->empty + 8 * c, (use - 1) & 1);
            store_ds_chunk(x->buffers + c * kDsBufferBytes, ds_frag);
            fence_proxy_async();
            mbarrier_arrive(x->full + 8 * c);
        }
        wgmma_fence();
        issue_accumulate(dk, ds_frag, chunk + kSegQ);
        wgmma_commit();
    }
    wgmma_wait<0>();
    fence_registers(dk);
    fence_registers(dv);
    const int hidden = a.heads * kHeadDim;
    const size_t qkv_stride = 3 * (size_t)hidden;
    store_rotated(dqkv + hidden + head * kHeadDim, qkv_stride, dk, t0 + f.row, t_end, a, own, f.row);
    store_rows<kHeadDim>(dqkv + 2 * hidden + head * kHeadDim, qkv_stride, reinterpret_cast<const float(*)[4]>(dv),
                         t0 + f.row, t_end, 1.0f);
}

/* ---- warpgroup 1: dQ of tile i ---- */

/* The lse·log2 e and D of the thread's two rows of segment i (zero-filled past the sequence). */
struct row_statistics {
    float lse2[2], delta[2];
};
__device__ __forceinline__ row_statistics own_row_statistics(uint32_t own, fragment f) {
    const float *own_lse = reinterpret_cast<const float *>(__cvta_shared_to_generic(own + kSegLse));
    const float *own_delta = reinterpret_cast<const float *>(__cvta_shared_to_generic(own + kSegDelta));
    row_statistics rows;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        rows.lse2[h] = own_lse[f.row + 8 * h] * kLog2e;
        rows.delta[h] = own_delta[f.row + 8 * h];
    }
    return rows;
}

/* dQ of the tile's queries (segment i) += dS·K_j for chunk c of tile i, formed from the slots: S = Q·K_jᵀ,
 * dP = dO·V_jᵀ, P, dS. The dQ product is left in flight (committed); the previous chunk's completes here. */
__device__ __forceinline__ void issue_chunk_dq(float (&dq)[32], const ring_view &r, const piece &p, int i, int c,
                                               const row_statistics &rows, const ring_args &a) {
    const fragment f = my_fragment();
    const int t0 = p.seq_begin + kRows * i, t_end = min(t0 + kRows, p.seq_end), j = i - 1 + c;
    const uint32_t own = r.slot(i), chunk = r.slot(j);
    float s[32], dp[32];
    uint32_t ds[4][4];
    r.wait(j);
    fence_registers(dq);
    wgmma_fence();
    issue_rows_by_rows(s, own + kSegQ, chunk + kSegK);
    wgmma_commit();
    issue_rows_by_rows(dp, own + kSegDO, chunk + kSegV);
    wgmma_commit();
    wgmma_wait<1>(); /* S (and the previous chunk's dQ product: ds may be rewritten); dP may still run */
    fence_registers(s);
    fence_registers(dq);
#pragma unroll
    for (int e = 0; e < 32; e++) s[e] = fast_exp2(fmaf(s[e], a.scale_log2, -rows.lse2[(e >> 1) & 1]));
    if (chunk_needs_mask(c, a.window, t0, t_end)) mask_chunk(s, f, c, a.window, t0, p.seq_begin, p.seq_end);
    wgmma_wait<0>();
    fence_registers(dp);
#pragma unroll
    for (int e = 0; e < 32; e++) s[e] *= dp[e] - rows.delta[(e >> 1) & 1];
    pack_fragments(ds, s);
    wgmma_fence();
    issue_accumulate(dq, ds, chunk + kSegK);
    wgmma_commit();
}

__device__ __forceinline__ void tile_dq(mb::bf16 *dqkv, const ring_view &r, const piece &p, int i,
                                        const ring_args &a) {
    const fragment f = my_fragment();
    const int t0 = p.seq_begin + kRows * i, t_end = min(t0 + kRows, p.seq_end);
    r.wait(i);
    const uint32_t own = r.slot(i);
    const row_statistics rows = own_row_statistics(own, f);
    float dq[32];
#pragma unroll
    for (int e = 0; e < 32; e++) dq[e] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        const int j = i - 1 + c;
        if (j < p.seg_lo || j > p.seg_hi) continue; /* outside the sequence (uniform) */
        issue_chunk_dq(dq, r, p, i, c, rows, a);
    }
    wgmma_wait<0>();
    fence_registers(dq);
    const size_t qkv_stride = 3 * (size_t)a.heads * kHeadDim;
    store_rotated(dqkv + p.head * kHeadDim, qkv_stride, dq, t0 + f.row, t_end, a, own, f.row);
}

/* ---- warpgroup 1 of the shared-dS backward ----
 * dQ of segment j sums three chunk products, dS(j, keys j − 1)·K_{j−1} + dS(j, keys j)·K_j + dS(j, keys j + 1)·K_{j+1},
 * which warpgroup 0 forms at tiles j − 1 (chunk 2), j (chunk 1) and j + 1 (chunk 0). So this warpgroup keeps three
 * accumulators, segment j in acc[j % 3], and stores segment i − 1 after tile i's chunk 0. The piece's first and last
 * segments also need keys of the neighbouring pieces' tiles (first − 1, last + 1): those two chunks it forms itself,
 * as band_ring_backward_kernel's tile_dq does for every chunk (dq_recompute_chunk). */

/* dQ of the tile's queries (segment i) += dS·K_j for chunk c of tile i, formed here from the slots (S, P, dP, dS),
 * and completed. */
__device__ __forceinline__ void dq_recompute_chunk(float (&dq)[32], const ring_view &r, const piece &p, int i, int c,
                                                   const ring_args &a) {
    issue_chunk_dq(dq, r, p, i, c, own_row_statistics(r.slot(i), my_fragment()), a);
    wgmma_wait<0>();
    fence_registers(dq);
}

/* acc += dS·K over the 64 keys of a chunk: A = the dSᵀ buffer [64 keys][64 queries] read M-major, B = the K tile
 * [64 keys][64 d] read N-major; k-step kk = keys 16kk.. (+2048 bytes in both). */
__device__ __forceinline__ void issue_dq_from_ds(float (&acc)[32], uint32_t ds_buffer, uint32_t k_tile) {
    const uint64_t descriptor_ds = sw128_descriptor(ds_buffer), descriptor_k = sw128_descriptor(k_tile);
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
        wgmma_m64n64_ss<1, 1>(acc, descriptor_ds + descriptor_offset(2048 * kk),
                              descriptor_k + descriptor_offset(2048 * kk), 1);
}

/* Segment j's dQ (rows [seq_begin + 64 j, ..)) with RoPE's backward from its slot. */
__device__ __forceinline__ void store_dq_segment(mb::bf16 *dqkv, const float (&acc)[32], const ring_view &r,
                                                 const piece &p, int j, const ring_args &a) {
    const fragment f = my_fragment();
    const int t0 = p.seq_begin + kRows * j, t_end = min(t0 + kRows, p.seq_end);
    const size_t qkv_stride = 3 * (size_t)a.heads * kHeadDim;
    store_rotated(dqkv + p.head * kHeadDim, qkv_stride, acc, t0 + f.row, t_end, a, r.slot(j), f.row);
}

/* Tile i with segment j's accumulator at acc[j % 3] (kRot = i % 3, so that every index is a constant). */
template <int kRot>
__device__ __forceinline__ void tile_dq_shared(mb::bf16 *dqkv, float (&acc)[3][32], const ring_view &r,
                                               const piece &p, int i, const ring_args &a, ds_exchange &x) {
    constexpr int kPrevious = (kRot + 2) % 3, kOwn = kRot, kNext = (kRot + 1) % 3;
    r.wait(i);
    const uint32_t own = r.slot(i);
    if (i == p.first) { /* the piece's first segment starts here */
#pragma unroll
        for (int e = 0; e < 32; e++) acc[kOwn][e] = 0.0f;
        if (p.seg_lo < p.first) dq_recompute_chunk(acc[kOwn], r, p, i, 0, a); /* keys of tile first − 1 */
    }
    if (i + 1 <= p.last) {
#pragma unroll
        for (int e = 0; e < 32; e++) acc[kNext][e] = 0.0f; /* held segment i − 2, stored at tile i − 1 */
    }
#pragma unroll
    for (int c = 0; c < kChunks; c++) {
        const int j = i - 1 + c;
        if (j < p.seg_lo || j > p.seg_hi || !owns_segment(p, j)) continue; /* uniform, as warpgroup 0 decides */
        const int use = x.uses[c]++;
        mbarrier_wait(x.full + 8 * c, use & 1);
        float (&target)[32] = c == 0 ? acc[kPrevious] : (c == 1 ? acc[kOwn] : acc[kNext]);
        fence_registers(target);
        wgmma_fence();
        issue_dq_from_ds(target, x.buffers + c * kDsBufferBytes, own + kSegK);
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(target);
        warp_arrive(x.empty + 8 * c);
        if (c == 0) store_dq_segment(dqkv, target, r, p, j, a); /* segment i − 1 has all three contributions */
    }
    if (i == p.last) { /* the piece's last segment ends here */
        if (p.seg_hi > p.last) dq_recompute_chunk(acc[kOwn], r, p, i, 2, a); /* keys of tile last + 1 */
        store_dq_segment(dqkv, acc[kOwn], r, p, i, a);
    }
}

/* A consumer warpgroup walks the run's pieces and tiles in the producer's order, calling tile(r, p, i) for each;
 * after tile i it hands segment i − 1 back, after a piece's last tile the piece's remaining segments. */
template <class TileFunction>
__device__ __forceinline__ void consume(uint32_t ring, uint32_t full, uint32_t empty, uint32_t slot_bytes,
                                       work_range w, const ring_args &a, TileFunction tile) {
    ring_view r = {ring, full, slot_bytes, 0, 0};
    piece p;
    while (next_piece(&p, &w, a)) {
        r.seg_lo = p.seg_lo;
        for (int i = p.first; i <= p.last; i++) {
            tile(r, p, i);
            if (i - 1 >= p.seg_lo) warp_arrive(empty + 8 * ((r.g_base + i - 1 - p.seg_lo) % kRing));
        }
        for (int j = p.last; j <= p.seg_hi; j++) warp_arrive(empty + 8 * ((r.g_base + j - p.seg_lo) % kRing));
        r.g_base += p.seg_hi - p.seg_lo + 1;
    }
}

/* ---- the forward: out and lse of tile i (one warpgroup) ---- */

/* Max (kMax) or sum of a quad's values: the four threads holding one accumulator row. */
template <bool kMax>
__device__ __forceinline__ float quad_reduce(float x) {
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, x, offset);
        x = kMax ? fmaxf(x, other) : x + other;
    }
    return x;
}

/* S_c = Q·K_jᵀ for the tile's chunk held by segment j. */
__device__ __forceinline__ void issue_chunk_scores(float (&s)[32], const ring_view &r, uint32_t own, int j) {
    r.wait(j);
    wgmma_fence();
    issue_rows_by_rows(s, own + kFwdSegQ, r.slot(j) + kFwdSegK);
    wgmma_commit();
}

/* Chunk by chunk, with the online softmax: S_c = Q·K_cᵀ for the chunks inside the sequence (the tile's own first),
 * masked to −inf; running row max m (scaled: shift = m·scale·log2 e) and sum l; O and l rescaled by 2^(shift_old −
 * shift_new) when the max grows; P = 2^(S·scale·log2 e − shift), O += P·V_c. Then out = O / l and lse = (shift +
 * log2 l)·ln 2. The next chunk's S is issued before this chunk's softmax (two score buffers), so the tensor cores
 * work while the warpgroup does the exponentials. One or two chunks' scores at a time keep the warpgroup under 168
 * registers (two blocks per SM): holding all three for a one-pass softmax took 240 and serialized the wgmmas at that
 * limit (ptxas C7512).
 * A chunk outside the sequence (first and last tiles) is still computed, on the tile's own segment, and masked
 * whole (its tokens fail the sequence bounds, so P = 0): every tile issues the same wgmma groups, which ptxas needs
 * to pipeline them (with the chunks skipped it serialized them, C7514). */
__device__ __forceinline__ void tile_forward(mb::bf16 *out, float *lse, const ring_view &r, const piece &p, int i,
                                             const ring_args &a) {
    const int head = p.head;
    const fragment f = my_fragment();
    const int t0 = p.seq_begin + kRows * i, t_end = min(t0 + kRows, p.seq_end);
    /* the segment of each chunk in processing order: own chunk first (it holds every row's diagonal), then the one
     * before and the one after, or the own segment where those leave the sequence (masked whole) */
    const auto segment = [&](int k) { return k == 0 ? i : k == 1 ? max(i - 1, p.seg_lo) : min(i + 1, p.seg_hi); };
    r.wait(i);
    const uint32_t own = r.slot(i);
    float s[2][32], o[32], row_sum[2] = {0.0f, 0.0f}, row_max[2] = {-INFINITY, -INFINITY};
    /* the exponent shift of a row max (0 while a row has seen only masked scores: rows past the sequence's end) */
    const auto shift_of = [&](float m) { return m == -INFINITY ? 0.0f : m * a.scale_log2; };
    uint32_t p_frag[4][4];
    issue_chunk_scores(s[0], r, own, i);
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
        const int c = k == 0 ? 1 : k == 1 ? 0 : 2;
        float(&sc)[32] = s[k % 2];
        if (k + 1 < kChunks) {
            fence_registers(s[(k + 1) % 2]);
            issue_chunk_scores(s[(k + 1) % 2], r, own, segment(k + 1));
            wgmma_wait<1>(); /* S_c, and the previous chunk's P·V; the next S may still run */
        } else {
            wgmma_wait<0>();
        }
        fence_registers(sc);
        if (k > 0) fence_registers(o);
        if (chunk_needs_mask(c, a.window, t0, t_end))
            mask_chunk(sc, f, c, a.window, t0, p.seq_begin, p.seq_end, -INFINITY);
        float grown[2], shift[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float chunk_max = -INFINITY;
#pragma unroll
            for (int jj = 0; jj < 8; jj++)
                chunk_max = fmaxf(chunk_max, fmaxf(sc[4 * jj + 2 * h], sc[4 * jj + 2 * h + 1]));
            const float new_max = fmaxf(row_max[h], quad_reduce<true>(chunk_max));
            shift[h] = shift_of(new_max);
            grown[h] = fast_exp2(shift_of(row_max[h]) - shift[h]);
            row_max[h] = new_max;
            row_sum[h] *= grown[h];
        }
        if (k > 0) {
#pragma unroll
            for (int e = 0; e < 32; e++) o[e] *= grown[(e >> 1) & 1];
        }
#pragma unroll
        for (int e = 0; e < 32; e++) {
            sc[e] = fast_exp2(fmaf(sc[e], a.scale_log2, -shift[(e >> 1) & 1]));
            row_sum[(e >> 1) & 1] += sc[e];
        }
        pack_fragments(p_frag, sc);
        fence_registers(o);
        wgmma_fence();
        issue_accumulate(o, p_frag, r.slot(segment(k)) + kFwdSegV, k == 0);
        wgmma_commit();
    }
    float inverse[2], row_lse[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        row_sum[h] = quad_reduce<false>(row_sum[h]);
        inverse[h] = row_sum[h] > 0.0f ? 1.0f / row_sum[h] : 0.0f;
        row_lse[h] = (shift_of(row_max[h]) + __log2f(row_sum[h])) * kLn2;
    }
    wgmma_wait<0>();
    fence_registers(o);
    const int hidden = a.heads * kHeadDim;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = t0 + f.row + 8 * h;
        if (row >= t_end) continue;
        mb::bf16 *dst = out + (size_t)row * hidden + head * kHeadDim + f.col;
#pragma unroll
        for (int jj = 0; jj < 8; jj++)
            *reinterpret_cast<mb::bf162 *>(dst + 8 * jj) =
                __floats2bfloat162_rn(o[4 * jj + 2 * h] * inverse[h], o[4 * jj + 2 * h + 1] * inverse[h]);
        if (f.col == 0) lse[(size_t)row * a.heads + head] = row_lse[h];
    }
}

/* A ring kernel's shared memory: the 1024-aligned slots and the mbarriers. */
struct ring_memory {
    uint32_t ring, full, empty; /* shared addresses: the slots, full[kRing], empty[kRing] */
};

/* Thread 0 initialises the barriers (full: the producer warp's 32 lanes; empty: consumer_warps arrivals), then the
 * block synchronises. */
__device__ __forceinline__ ring_memory setup_ring(unsigned char *shared_raw, uint64_t (&barriers)[2 * kRing],
                                                  int consumer_warps) {
    const ring_memory m = {(shared_address(shared_raw) + 1023u) & ~1023u, shared_address(barriers),
                           shared_address(barriers) + 8 * kRing};
    if (threadIdx.x == 0) {
        for (int s = 0; s < kRing; s++) {
            mbarrier_init(m.full + 8 * s, mb::kWarpSize);
            mbarrier_init(m.empty + 8 * s, consumer_warps);
        }
    }
    __syncthreads();
    return m;
}

#endif /* MB_WGMMA_SM90 || host pass */

__global__ void __launch_bounds__(kThreads, 1)
    band_ring_backward_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                              const mb::bf16 *qkv, ring_args a) {
#if MB_WGMMA_SM90
    __shared__ __align__(8) uint64_t barriers[2 * kRing];
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    const work_range w = block_work(a);
    if (w.u >= w.u_end) return; /* spare block (uniform) */
    const auto [ring, full, empty] = setup_ring(shared_raw, barriers, kConsumerWarps);
    const int group = threadIdx.x / 128;
    if (group == 2) {
        registers_decrease<kProducerRegisters>();
        if (threadIdx.x % 128 < mb::kWarpSize)
            produce<true>(ring, full, empty, qkv, dout, lse, delta, w, a);
    } else {
        registers_increase<kConsumerRegisters>();
        if (group == 0)
            consume(ring, full, empty, kSlotBytes, w, a,
                    [&](const ring_view &r, const piece &p, int i) { tile_dkdv(dqkv, r, p, i, a); });
        else
            consume(ring, full, empty, kSlotBytes, w, a,
                    [&](const ring_view &r, const piece &p, int i) { tile_dq(dqkv, r, p, i, a); });
    }
#endif
}

/* The shared-dS backward (the default since session 14; docs/kernels/attention_band.md): warpgroup 0 forms P and dS
 * once per pair and hands each owned chunk's dSᵀ to warpgroup 1, which only multiplies it by K (and forms the two
 * chunks at the piece's ends that another block's warpgroup 0 forms). 0.279 → 0.261 ms at 1024 and 0.289 → 0.270 at
 * 8192 against band_ring_backward_kernel (H200, session 14 call 2). */
__global__ void __launch_bounds__(kThreads, 1)
    band_ring_backward_shared_ds_kernel(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                                        const mb::bf16 *qkv, ring_args a) {
#if MB_WGMMA_SM90
    __shared__ __align__(8) uint64_t barriers[2 * kRing];
    __shared__ __align__(8) uint64_t ds_barriers[2 * kChunks]; /* full[3], empty[3] */
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    const work_range w = block_work(a);
    if (w.u >= w.u_end) return; /* spare block (uniform) */
    const uint32_t ds_full = shared_address(ds_barriers), ds_empty = ds_full + 8 * kChunks;
    if (threadIdx.x == 0) {
        for (int c = 0; c < kChunks; c++) {
            mbarrier_init(ds_full + 8 * c, 128);
            mbarrier_init(ds_empty + 8 * c, 4);
        }
    }
    /* setup_ring's __syncthreads also covers the dS barriers' initialization */
    const auto [ring, full, empty] = setup_ring(shared_raw, barriers, kConsumerWarps);
    ds_exchange x = {ring + kRing * kSlotBytes, ds_full, ds_empty, {0, 0, 0}};
    const int group = threadIdx.x / 128;
    if (group == 2) {
        registers_decrease<kProducerRegisters>();
        if (threadIdx.x % 128 < mb::kWarpSize)
            produce<true>(ring, full, empty, qkv, dout, lse, delta, w, a);
    } else if (group == 0) {
        registers_increase<kSharedDsRegistersA>();
        consume(ring, full, empty, kSlotBytes, w, a,
                [&](const ring_view &r, const piece &p, int i) { tile_dkdv<true>(dqkv, r, p, i, a, &x); });
    } else {
        registers_increase<kSharedDsRegistersB>();
        float acc[3][32];
        consume(ring, full, empty, kSlotBytes, w, a, [&](const ring_view &r, const piece &p, int i) {
            switch (i % 3) {
            case 0: tile_dq_shared<0>(dqkv, acc, r, p, i, a, x); break;
            case 1: tile_dq_shared<1>(dqkv, acc, r, p, i, a, x); break;
            default: tile_dq_shared<2>(dqkv, acc, r, p, i, a, x); break;
            }
        });
    }
#endif
}

/* Two blocks per SM: the launch bounds hold the kernel to 168 registers (8 bytes of the piece loop spill). At its
 * natural 182 only one block fits (the SM's quarters hold 3 of the 10 warps each), and the forward took 0.130 ms
 * against 0.103 (H200, 1024-token sequences). */
__global__ void __launch_bounds__(kFwdThreads, kFwdBlocksPerSm)
    band_ring_forward_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, ring_args a) {
#if MB_WGMMA_SM90
    __shared__ __align__(8) uint64_t barriers[2 * kRing];
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    const work_range w = block_work(a);
    if (w.u >= w.u_end) return; /* spare block (uniform) */
    const auto [ring, full, empty] = setup_ring(shared_raw, barriers, 4); /* one consumer warpgroup */
    if (threadIdx.x >= 128)
        produce<false>(ring, full, empty, qkv, nullptr, nullptr, nullptr, w, a);
    else
        consume(ring, full, empty, kFwdSlotBytes, w, a,
                [&](const ring_view &r, const piece &p, int i) { tile_forward(out, lse, r, p, i, a); });
#endif
}

/* The grid of a ring kernel with equal shares: every block resident at once (as many per SM as the occupancy
 * calculator allows for its registers and shared memory); no more blocks than plan.blocks, the (tile, head) count's
 * upper bound. */
int resident_grid(unsigned *grid, const mb::attention_plan &plan, const void *kernel, int threads, size_t shared,
                  mb_error *err) {
    int sm_count = 0, blocks_per_sm = 0;
    if (current_sm_count(&sm_count, err) != 0) return -1;
    MB_CUDA_CHECK(err, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, shared));
    MB_REQUIRE(err, blocks_per_sm >= 1, "attention band ring kernel: no block fits on an SM");
    *grid = std::min(plan.blocks, (unsigned)(blocks_per_sm * sm_count));
    return 0;
}

}  // namespace

bool mb_attention_band_wgmma_supports(int head_dim, int window, bool backward) {
    if (head_dim != kHeadDim || window < 0 || window > kMaxWindow ||
        env_is(backward ? "MB_ATTENTION_BAND_BWD" : "MB_ATTENTION_BAND_FWD", "mma"))
        return false;
    return sm90a_kernel_runs(backward ? (const void *)band_ring_backward_shared_ds_kernel
                                      : (const void *)band_ring_forward_kernel);
}

int mb_attention_band_wgmma_backward(mb::bf16 *dqkv, const mb::bf16 *dout, const float *lse, const float *delta,
                                     const mb::bf16 *qkv, const int32_t *cu_seqlens, mb::attention_plan plan,
                                     int num_seqs, int heads, int window, const float2 *rope, cudaStream_t stream,
                                     mb_error *err) {
    MB_REQUIRE(err, window >= 0 && window <= kMaxWindow, "attention_band_wgmma_backward: window %d outside 0..%d",
               window, kMaxWindow);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(dout) % 16 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0,
               "attention_band_wgmma_backward: qkv and dout must be 16-byte aligned");
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(rope) % 16 == 0,
               "attention_band_wgmma_backward: the RoPE table must be 16-byte aligned");
    if (plan.blocks == 0) return 0;
    const float scale = 1.0f / sqrtf((float)kHeadDim);
    const ring_args args = {cu_seqlens, plan.seq_first, plan.tile_seq, num_seqs, heads, window, scale,
                            scale * kLog2e, rope, 0};
    /* one block per run: plan.blocks = (an upper bound of the tile count) × heads; spare blocks return at once */
    const unsigned grid = (plan.blocks / (unsigned)heads + kRunTiles - 1) / kRunTiles * (unsigned)heads;
    /* the default forms P and dS once per pair; recompute_ds: each warpgroup its own (the kernel before session 14) */
    const bool shared_ds = !env_is("MB_ATTENTION_BAND_BWD", "recompute_ds");
    const auto kernel = shared_ds ? band_ring_backward_shared_ds_kernel : band_ring_backward_kernel;
    const size_t shared = shared_ds ? kSharedDsBytes : kSharedBytes;
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared));
    kernel<<<grid, kThreads, shared, stream>>>(dqkv, dout, lse, delta, qkv, args);
    MB_CUDA_CHECK_LAUNCH(err, shared_ds ? "band_ring_backward_shared_ds_kernel" : "band_ring_backward_kernel");
    return 0;
}

int mb_attention_band_wgmma_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                                    mb::attention_plan plan, int num_seqs, int heads, int window, cudaStream_t stream,
                                    mb_error *err) {
    MB_REQUIRE(err, window >= 0 && window <= kMaxWindow, "attention_band_wgmma_forward: window %d outside 0..%d",
               window, kMaxWindow);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0,
               "attention_band_wgmma_forward: qkv must be 16-byte aligned and out 4-byte aligned");
    if (plan.blocks == 0) return 0;
    const float scale = 1.0f / sqrtf((float)kHeadDim);
    const ring_args args = {cu_seqlens, plan.seq_first, plan.tile_seq, num_seqs, heads, window, scale,
                            scale * kLog2e, nullptr, 1};
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(band_ring_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)kFwdSharedBytes));
    unsigned grid = 0;
    if (resident_grid(&grid, plan, (const void *)band_ring_forward_kernel, kFwdThreads, kFwdSharedBytes, err) != 0)
        return -1;
    band_ring_forward_kernel<<<grid, kFwdThreads, kFwdSharedBytes, stream>>>(out, lse, qkv, args);
    MB_CUDA_CHECK_LAUNCH(err, "band_ring_forward_kernel");
    return 0;
}
