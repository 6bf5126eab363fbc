/* FlashAttention-3-style forward on Hopper (sm_90a wgmma), global layers at head_dim 64 (math and interface in
 * attention_wgmma_fwd.h; design, register/shared budgets and measurements in docs/kernels/attention_wgmma.md).
 *
 * A persistent kernel (described before wgmma_forward_persistent_kernel): one block per SM walks the plan's work
 * list; three consumer warpgroups of 64 queries (192-query items) read Q from shared memory; one producer warp
 * copies K/V tiles with cp.async into a 5-stage ring that runs on across items, and each item's Q tile into one of
 * two Q buffers, publishing them through mbarriers ("full", "q_full"); the consumers hand stages back ("empty",
 * "q_empty"). There is no block-wide barrier in the main loop, so the warpgroups drift apart and one's softmax
 * overlaps the others' wgmma.
 *
 * Per consumer warpgroup and key tile i (FA3's intra-warpgroup overlap):
 *   S_i = Q·K_iᵀ       wgmma m64n128k16, A = Q from shared memory (K-major), B = K_i from shared memory (K-major)
 *   O  += P_{i-1}·V_{i-1}  wgmma m64n64k16, A = P in registers (bf16), B = V from shared memory (MN-major, trans-b)
 *                      issued right behind S_i, so it runs while the softmax of S_i executes
 *   online softmax of S_i in fp32 registers (exp2, scale·log2 e folded into one FMA); once P_{i-1}·V_{i-1} has
 *   completed, O is rescaled and P_i packed to bf16 (FA3's order: P's registers are rewritten only after the wgmma
 *   that reads them is done).
 * Masks only on the sequence's last key tile (keys >= the sequence end get −inf; those rows are zero-filled).
 *
 * The wide kernel (wgmma_forward_wide_kernel, FA3's current head_dim-64 shape, session 14): 192 × 192 tiles, S by
 * m64n192k16, P through shared memory (stmatrix, then an SS wgmma for P·V), Q, K and V by TMA in two stages. It is
 * taken when the batch's sequences average 2048 tokens or more (wide_pays; 1.82 against 1.88 ms at 8192, H200).
 *
 * Round 1 (one 128-query block per plan tile, Q in registers, an optional ping-pong instance) and the two-warpgroup
 * persistent instance were measured beside this kernel in sessions 3 and 4 and removed in session 6 (git history:
 * commit 2ce48eb has them; docs/kernels/attention_wgmma.md keeps their design and figures).
 *
 * Every sm_90 / sm_90a instruction (wgmma, setmaxnreg, fence.proxy.async, mbarrier try_wait) is inside
 * MB_WGMMA_SM90 (wgmma.cuh) so that the sm_80 pass of the build compiles the kernel with an empty body; the primitives
 * both wgmma kernels use are in wgmma.cuh. */
#include "attention_wgmma_fwd.h"
#include "wgmma.cuh"

#include <cuda.h>          /* CUtensorMap (the wide kernel's TMA loads) */
#include <cudaTypedefs.h>  /* PFN_cuTensorMapEncodeTiled */

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int kHeadDim = 64;
constexpr int kKeyTile = 128;                                    /* keys per K/V tile (N of the score wgmma) */
constexpr int kRowsPerWarpgroup = 64;
constexpr int kRowBytes = kHeadDim * 2;        /* 128: one 128-byte swizzle atom row per key */
constexpr int kTileBytes = kKeyTile * kRowBytes; /* 16 KB: K (or V) of one stage */
constexpr int kStageBytes = 2 * kTileBytes;      /* K then V */
/* The block shape: three consumer warpgroups of 64 query rows (192-query work items) and the producer warpgroup;
 * FA3's register split for three consumer warpgroups (32 / 160); two Q tiles and a 5-stage K/V ring (209 KB: one
 * block per SM). */
constexpr int kPersistentStages = 5;
struct persistent_shape {
    static constexpr int kGroups = 3;
    static constexpr int kRows = kGroups * kRowsPerWarpgroup; /* query rows per work item */
    static constexpr int kConsumerWarps = 4 * kGroups;
    static constexpr int kThreads = (kGroups + 1) * 128;
    static constexpr int kProducerRegisters = 32;
    static constexpr int kConsumerRegisters = 160;
    static constexpr int kQBytes = kRows * kRowBytes; /* 24 KB */
    static constexpr size_t kSharedBytes = 2 * (size_t)kQBytes + (size_t)kPersistentStages * kStageBytes + 1024;
    static_assert(kProducerRegisters * 128 + kConsumerRegisters * kGroups * 128 <= 65536,
                  "setmaxnreg split must fit the register file");
    static_assert(kQBytes % 1024 == 0 && kRows >= kWgmmaForwardTile, "Q tiles stay 1024-aligned; rows >= plan tile");
    static_assert(kThreads == (kConsumerWarps + 4) * mb::kWarpSize, "consumer warps, then the producer warpgroup");
    static_assert(kSharedBytes + 1024 <= 227 * 1024, "fits one block per SM");
};

#if MB_WGMMA_SM90

/* ---- shared memory, barriers, copies ---- */

/* Blocks until the barrier's phase with the given parity has completed. */
__device__ __forceinline__ void mbarrier_spin_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT_AGAIN:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_AGAIN;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

/* Whether the barrier's phase with the given parity has completed (non-blocking). */
__device__ __forceinline__ bool mbarrier_ready(uint32_t bar, uint32_t parity) {
    uint32_t ready;
    asm volatile(
        "{\n.reg .pred done;\n"
        "mbarrier.test_wait.parity.shared::cta.b64 done, [%1], %2;\n"
        "selp.u32 %0, 1, 0, done;\n"
        "}\n"
        : "=r"(ready)
        : "r"(bar), "r"(parity)
        : "memory");
    return ready != 0;
}

/* load_kv_tile for a tile wholly inside the sequence: no per-row predicates or multiplies. Lane l copies chunk l % 8
 * of rows l / 8 + 4·it; rows of even and odd it differ by 4 in row % 8, so two swizzled bases serve every row (row
 * + 8 is 1024 bytes further, an immediate), and the K and V sources step by 4 rows. ~3 instructions per copy
 * instead of ~13: the producer warp shares its scheduler with three consumer warps, and ncu (session 4) had the
 * consumers waiting for K/V tiles in a quarter of their stall samples with the general loop below. */
__device__ __forceinline__ void load_kv_tile_full(uint32_t stage, const mb::bf16 *k_base, const mb::bf16 *v_base,
                                                  size_t row_stride, int k0) {
    const int lane = threadIdx.x % mb::kWarpSize, chunk = lane % 8, row = lane / 8;
    const uint32_t even = stage + swizzled_offset(row, chunk), odd = stage + swizzled_offset(row + 4, chunk);
    const size_t first = (size_t)(k0 + row) * row_stride + chunk * 8;
    const char *k_src = reinterpret_cast<const char *>(k_base + first);
    const char *v_src = reinterpret_cast<const char *>(v_base + first);
    const size_t four_rows = 4 * row_stride * sizeof(mb::bf16);
#pragma unroll
    for (int m = 0; m < kKeyTile / 8; m++) {
        cp_async_16_whole(even + 1024 * m, k_src);
        cp_async_16_whole(even + 1024 * m + kTileBytes, v_src);
        k_src += four_rows;
        v_src += four_rows;
        cp_async_16_whole(odd + 1024 * m, k_src);
        cp_async_16_whole(odd + 1024 * m + kTileBytes, v_src);
        k_src += four_rows;
        v_src += four_rows;
    }
}

/* One warp queues keys [k0, k0 + kKeyTile) of K and V into a stage (K at +0, V at +kTileBytes), rows >= key_end
 * zero-filled (their source is never read). Lane l copies chunk l % 8 of rows l / 8 + 4·it: each instruction moves
 * 4 whole 128-byte rows (coalesced). */
__device__ __forceinline__ void load_kv_tile(uint32_t stage, const mb::bf16 *k_base, const mb::bf16 *v_base,
                                             size_t row_stride, int k0, int key_end) {
    if (k0 + kKeyTile <= key_end) { /* uniform over the warp */
        load_kv_tile_full(stage, k_base, v_base, row_stride, k0);
        return;
    }
    const int lane = threadIdx.x % mb::kWarpSize, chunk = lane % 8;
#pragma unroll 2 /* the producer runs in 24 registers */
    for (int it = 0; it < kKeyTile / 4; it++) {
        const int row = lane / 8 + 4 * it;
        const bool valid = k0 + row < key_end;
        const size_t offset = valid ? (size_t)(k0 + row) * row_stride + chunk * 8 : 0;
        const uint32_t dst = stage + swizzled_offset(row, chunk);
        cp_async_16_to(dst, k_base + offset, valid);
        cp_async_16_to(dst + kTileBytes, v_base + offset, valid);
    }
}

/* ---- wgmma (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"; operand layouts as CUTLASS
 * cute/atom/mma_traits_sm90_gmma.hpp) ---- */

/* ---- the three tile products and the softmax (separate so that the self-test runs the same code) ---- */

/* Queues O[64 × 64] += P[64 × 128] · V_tile[128 × 64] (8 k-steps of 16 keys: +2048 bytes = two 8-row groups). */
__device__ __forceinline__ void issue_pv(float (&o)[32], const uint32_t (&p)[8][4], uint32_t v_tile) {
    const uint64_t desc = sw128_descriptor(v_tile);
#pragma unroll
    for (int kk = 0; kk < 8; kk++) wgmma_m64n64_rs<1>(o, p[kk], desc + descriptor_offset(2048 * kk), 1);
}

/* Score accumulators -> bf16 A fragments of the P·V product: key step kk covers S columns 16kk..16kk+15, i.e.
 * n-tiles 2kk (p[kk][0], p[kk][1]: rows +0 / +8) and 2kk + 1 (p[kk][2], p[kk][3]); FA3's accumulator -> A mapping. */
__device__ __forceinline__ void pack_p(uint32_t (&p)[8][4], const float (&s)[64]) {
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++) p[kk][r] = mb::pack_bf16x2(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

/* Keys >= key_end of the tile starting at k0 get −inf (only called on a sequence's last key tile; 128 keys for the
 * persistent kernel, 192 for the wide one). */
template <int kCount>
__device__ __forceinline__ void mask_tail(float (&s)[kCount], int k0, int key_end) {
    const int quad = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < kCount / 4; j++)
#pragma unroll
        for (int c = 0; c < 2; c++)
            if (k0 + 8 * j + 2 * quad + c >= key_end) s[4 * j + c] = s[4 * j + 2 + c] = -INFINITY;
}

__device__ __forceinline__ void rescale(float (&o)[32], const float (&correction)[2]) {
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[4 * j + e] *= correction[e / 2];
}

/* O / row sum as bf16 and lse = ln Σ exp(s) for this thread's rows below row_end. */
__device__ __forceinline__ void store_rows(mb::bf16 *out, float *lse, const float (&o)[32], const float (&row_max)[2],
                                           const float (&row_sum)[2], int row_a, int row_end, int hidden, int heads,
                                           int head) {
    const int quad = threadIdx.x % 4;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float sum = row_sum[h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int row = row_a + 8 * h;
        if (row >= row_end) continue;
        const float inverse = 1.0f / sum;
        mb::bf16 *dst = out + (size_t)row * hidden + head * kHeadDim + 2 * quad;
#pragma unroll
        for (int j = 0; j < 8; j++)
            *reinterpret_cast<mb::bf162 *>(dst + 8 * j) =
                __floats2bfloat162_rn(o[4 * j + 2 * h] * inverse, o[4 * j + 2 * h + 1] * inverse);
        if (quad == 0) lse[(size_t)row * heads + head] = (row_max[h] + log2f(sum)) * kLn2;
    }
}

/* ---- the persistent schedule ----
 *
 * Why (docs/kernels/attention_wgmma.md, "Round 2"): round 1 gave each SM one block of 128 queries that paid its
 * prologue (Q from global, the first K/V tile's latency, a scores product nothing overlaps) and epilogue unhidden, and
 * per 128-key tile only two consumer warps per SM sub-partition to hide the softmax's dependency chains (max ->
 * shuffles -> exp -> sum) behind the other warpgroup's wgmma. This kernel (FA3's shape for head_dim 64: 192 × 128
 * tiles, three consumer warpgroups at 160 registers, Q read by the tensor cores from shared memory):
 *  - a grid of (at most) one block per SM walks the plan's (tile, head) list with stride gridDim.x (longest first);
 *    the producer warp fetches the next work item's bounds and its Q tile (double-buffered, own mbarriers) while the
 *    consumers still work on the current one, and its K/V ring (5 stages) runs on across items without a drain;
 *  - 192-query items. The plan is built for 128-query tiles (attention.cu); slot t of a sequence becomes the 192-query
 *    item t when 192·t < length, the other slots are skipped (ceil(L/128) >= ceil(L/192) slots, so every row is
 *    covered, longest-first order kept). A warpgroup whose 64 rows lie past a short item only follows the barrier
 *    protocol (waits each tile, hands it back) instead of computing on zero rows;
 *  - S = Q·Kᵀ as an SS wgmma (A = the Q tile through a K-major 128-byte-swizzle descriptor, the same layout as K);
 *  - the softmax reduces the row max as a tree and sums the exponentials in four partial sums (shorter chains). */

struct work_item {
    int start, end;     /* query rows [start, end) */
    int key_lo, key_hi; /* its sequence = the keys it attends to */
    int head;           /* < 0: this block has no more work */
};

/* The first work item at or after list index *w (stepping by `step`); false when the list is exhausted. Item w is
 * (plan slot w / heads, head w % heads); slot t of sequence s starts at query row t·rows of the sequence and is
 * skipped when that is past its end (rows > plan.tile). The query rows of sequence s are [cu_queries[s],
 * cu_queries[s + 1]) (the plan is built over them), its keys [cu_keys[s], cu_keys[s + 1]); the same array for a
 * whole-batch forward, the head's rows for mb_attention_wgmma_forward_rows. Uniform over the warp. */
__device__ bool next_work_item(work_item *item, unsigned *w, unsigned step, const int32_t *seq_first,
                               const int32_t *tile_seq, const int32_t *cu_queries, const int32_t *cu_keys,
                               int total_tiles, int heads, int rows) {
    for (;; *w += step) {
        const unsigned x = *w / (unsigned)heads;
        if (x >= (unsigned)total_tiles) return false;
        const int s = tile_seq[x];
        const int begin = cu_queries[s], end = cu_queries[s + 1];
        const int start = begin + ((int)x - seq_first[s]) * rows;
        if (start >= end) continue;
        item->start = start;
        item->end = min(start + rows, end);
        item->key_lo = cu_keys[s];
        item->key_hi = cu_keys[s + 1];
        item->head = (int)(*w % (unsigned)heads);
        return true;
    }
}

/* One warp queues query rows [r0, r0 + kRows) into a 128-byte-swizzled tile (as load_kv_tile), rows >= r_end
 * zero-filled. */
template <int kRows>
__device__ __forceinline__ void load_q_tile(uint32_t dst, const mb::bf16 *q_base, size_t row_stride, int r0,
                                            int r_end) {
    const int lane = threadIdx.x % mb::kWarpSize, chunk = lane % 8;
#pragma unroll 2
    for (int it = 0; it < kRows / 4; it++) {
        const int row = lane / 8 + 4 * it;
        const bool valid = r0 + row < r_end;
        const size_t offset = valid ? (size_t)(r0 + row) * row_stride + chunk * 8 : 0;
        cp_async_16_to(dst + swizzled_offset(row, chunk), q_base + offset, valid);
    }
}

/* Queues S[64 × 128] = Q · K_tileᵀ with Q (this warpgroup's 64 rows, 1024-aligned) from shared memory: the A
 * descriptor has the K tile's form (K-major, 8-row groups 1024 bytes apart, +32 bytes per k-step of 16). */
__device__ __forceinline__ void issue_scores(float (&s)[64], uint32_t q_tile, uint32_t k_tile) {
    const uint64_t desc_a = sw128_descriptor(q_tile), desc_b = sw128_descriptor(k_tile);
#pragma unroll
    for (int ks = 0; ks < 4; ks++)
        wgmma_m64n128_ss<0, 0>(s, desc_a + descriptor_offset(32 * ks), desc_b + descriptor_offset(32 * ks), ks > 0);
}

/* The online softmax of a 64 × 8·kTiles score tile with short dependency chains: the row max in four interleaved
 * chains joined by a tree (depth 5 instead of a chain of 16 at 16 n-tiles) and the exponentials summed into kSums
 * partial sums (four for the persistent kernel's 128 keys; two for the wide kernel's 192, where four spilled at 160
 * registers). */
template <int kTiles, int kSums>
__device__ __forceinline__ void softmax_rows(float (&s)[4 * kTiles], float (&row_max)[2], float (&row_sum)[2],
                                             float (&correction)[2], float scale_log2) {
    static_assert(kSums == 2 || kSums == 4, "two or four partial sums");
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float m[4]; /* four chains over n-tiles j ≡ k (mod 4), then a tree (8 temporaries spill at 160 registers) */
#pragma unroll
        for (int k = 0; k < 4; k++) m[k] = fmaxf(s[4 * k + 2 * h], s[4 * k + 2 * h + 1]);
#pragma unroll
        for (int j = 4; j < kTiles; j++) m[j % 4] = fmaxf(m[j % 4], fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
        float tile_max = fmaxf(fmaxf(m[0], m[1]), fmaxf(m[2], m[3]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[h], tile_max * scale_log2);
        const float reference = new_max == -INFINITY ? 0.0f : new_max; /* nothing visible yet: keep zeros */
        correction[h] = fast_exp2(row_max[h] - reference);
        float sum[kSums] = {};
#pragma unroll
        for (int j = 0; j < kTiles; j++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int e = 4 * j + 2 * h + c;
                s[e] = fast_exp2(fmaf(s[e], scale_log2, -reference));
                sum[j % kSums] += s[e];
            }
        float total;
        if constexpr (kSums == 4)
            total = (sum[0] + sum[1]) + (sum[2] + sum[3]);
        else
            total = sum[0] + sum[1];
        row_sum[h] = row_sum[h] * correction[h] + total;
        row_max[h] = new_max;
    }
}

/* The persistent kernel's 128-key tiles (16 n-tiles). */
__device__ __forceinline__ void softmax_tile_tree(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                                  float (&correction)[2], float scale_log2) {
    softmax_rows<16, 4>(s, row_max, row_sum, correction, scale_log2);
}

/* scale·log2 e at head_dim 64 (1/8 · log2 e): a constant, so that it takes no register in the 160-register budget. */
constexpr float kScaleLog2 = kLog2e * 0.125f;
static_assert(kHeadDim == 64, "kScaleLog2 is 1/sqrt(64) · log2 e");

/* A work item's end for one consumer warpgroup (its O complete): the last K/V stage handed back, O and lse stored,
 * then the Q buffer handed back (after the last read of *slot and, long before, of the Q tile). */
__device__ __forceinline__ void finish_item(mb::bf16 *out, float *lse, const float (&o)[32], const float (&row_max)[2],
                                            const float (&row_sum)[2], const work_item *slot, uint32_t stage_empty,
                                            uint32_t q_release, int heads) {
    warp_arrive(stage_empty);
    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize;
    const int row_a = slot->start + (warp / 4) * kRowsPerWarpgroup + (warp % 4) * 16 + lane / 4;
    store_rows(out, lse, o, row_max, row_sum, row_a, slot->end, heads * kHeadDim, heads, slot->head);
    warp_arrive(q_release);
}

/* One consumer warpgroup, one work item (bounds in *slot, Q tile at q_tile): its 64 rows against the item's key
 * tiles, which are the block's ring tiles g .. g + key_tiles − 1 (stage = tile % kPersistentStages, parity = (tile /
 * kPersistentStages) & 1). The same intra-warpgroup overlap as v1's consume. The item's bounds are read from shared
 * memory where needed (registers are the limit at 160 per thread), and the Q buffer with its slot is handed back
 * (q_release) after the rows are stored. */
__device__ __forceinline__ void attend_item(mb::bf16 *out, float *lse, const work_item *slot, uint32_t q_tile,
                                            uint32_t ring, uint32_t full, uint32_t empty, uint32_t q_release, int g,
                                            int key_tiles, int heads) {
    /* keys of the last tile inside the sequence (1..128); only the last tile can need a mask */
    const int last_keys = slot->key_hi - slot->key_lo - (key_tiles - 1) * kKeyTile;
    uint32_t p[8][4];
    float s[64], o[32];
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f}, correction[2];
#pragma unroll
    for (int e = 0; e < 64; e++) s[e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 32; e++) o[e] = 0.0f;

    /* tile 0: scores and softmax only (O is still zero) */
    int stage = g % kPersistentStages;
    mbarrier_spin_wait(full + 8 * stage, (g / kPersistentStages) & 1);
    wgmma_fence();
    issue_scores(s, q_tile, ring + stage * kStageBytes);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(s);
    if (key_tiles == 1 && last_keys < kKeyTile) mask_tail(s, 0, last_keys);
    softmax_tile_tree(s, row_max, row_sum, correction, kScaleLog2);
    pack_p(p, s);
    for (int i = 1; i < key_tiles; i++) {
        const int previous = stage;
        stage = (g + i) % kPersistentStages;
        mbarrier_spin_wait(full + 8 * stage, ((g + i) / kPersistentStages) & 1);
        fence_registers(o);
        wgmma_fence();
        issue_scores(s, q_tile, ring + stage * kStageBytes);
        wgmma_commit();
        issue_pv(o, p, ring + previous * kStageBytes + kTileBytes);
        wgmma_commit();
        wgmma_wait<1>(); /* S_i done; P_{i-1}·V_{i-1} may still run */
        fence_registers(s);
        if (i == key_tiles - 1 && last_keys < kKeyTile) mask_tail(s, 0, last_keys);
        softmax_tile_tree(s, row_max, row_sum, correction, kScaleLog2);
        wgmma_wait<0>(); /* P_{i-1}·V_{i-1} done: O and P's registers are free */
        fence_registers(o);
        rescale(o, correction);
        pack_p(p, s);
        warp_arrive(empty + 8 * previous);
    }
    fence_registers(o);
    wgmma_fence();
    issue_pv(o, p, ring + stage * kStageBytes + kTileBytes);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(o);
    finish_item(out, lse, o, row_max, row_sum, slot, empty + 8 * stage, q_release, heads);
}

/* A warpgroup with no rows in this item keeps the barrier protocol: it hands the Q buffer back and every key tile
 * after it has been published (an arrival before that could complete the previous phase early). kStages: the ring's
 * (the persistent kernel's 5, the wide kernel's 2). */
template <int kStages>
__device__ __forceinline__ void pass_item(uint32_t full, uint32_t empty, uint32_t q_release, int g, int key_tiles) {
    warp_arrive(q_release);
    for (int i = 0; i < key_tiles; i++) {
        const int stage = (g + i) % kStages;
        mbarrier_spin_wait(full + 8 * stage, ((g + i) / kStages) & 1);
        warp_arrive(empty + 8 * stage);
    }
}

/* The producer warp: per work item c (Q buffer c % 2, reused once the consumers handed item c − 2's back), the item's
 * bounds into items[c % 2] (lane 0; published by the Q barrier's release) and its Q tile, then its K/V tiles into the
 * ring; after the last item a sentinel (head −1) tells the consumers to leave. */
__device__ void produce_persistent(uint32_t q_tiles, uint32_t ring, uint32_t full, uint32_t empty, uint32_t q_full,
                                   uint32_t q_empty, work_item *items, const mb::bf16 *qkv, query_rows queries,
                                   const int32_t *cu_seqlens, const int32_t *seq_first, const int32_t *tile_seq,
                                   int num_seqs, int heads) {
    using shape = persistent_shape;
    const int hidden = heads * kHeadDim;
    const size_t row_stride = 3 * (size_t)hidden;
    const int total_tiles = seq_first[num_seqs];
    unsigned w = blockIdx.x;
    publisher publish;
    int g = 0; /* the block's key tiles so far (ring position) */
    for (int c = 0;; c++, w += gridDim.x) {
        const int buf = c & 1;
        if (c >= 2) {
            const uint32_t parity = ((c >> 1) - 1) & 1;
            /* Q buffer still in use (item c − 2 not stored yet, e.g. short items): publish the pending tile (the
             * last of item c − 1) before blocking, so that the consumers are not kept from it meanwhile */
            const bool ready = __shfl_sync(0xffffffffu, mbarrier_ready(q_empty + 8 * buf, parity), 0); /* uniform */
            if (!ready) publish.flush();
            mbarrier_spin_wait(q_empty + 8 * buf, parity);
        }
        work_item item = {0, 0, 0, 0, -1};
        const bool found = next_work_item(&item, &w, gridDim.x, seq_first, tile_seq, queries.cu_queries, cu_seqlens,
                                          total_tiles, heads, shape::kRows);
        if (threadIdx.x % mb::kWarpSize == 0) items[buf] = item;
        if (!found) {
            publish.flush();
            mbarrier_arrive(q_full + 8 * buf); /* the sentinel: no copies behind it */
            return;
        }
        const mb::bf16 *kv_base = qkv + item.head * kHeadDim;
        load_q_tile<shape::kRows>(q_tiles + buf * shape::kQBytes, queries.q + item.head * kHeadDim,
                                  (size_t)queries.q_stride, item.start, item.end);
        cp_async_commit();
        publish.committed(q_full + 8 * buf);
        const int key_tiles = mb::ceil_div(item.key_hi - item.key_lo, kKeyTile);
        for (int i = 0; i < key_tiles; i++, g++) {
            const int stage = g % kPersistentStages;
            if (g >= kPersistentStages) mbarrier_spin_wait(empty + 8 * stage, ((g / kPersistentStages) - 1) & 1);
            load_kv_tile(ring + stage * kStageBytes, kv_base + hidden, kv_base + 2 * hidden, row_stride,
                         item.key_lo + i * kKeyTile, item.key_hi);
            cp_async_commit();
            publish.committed(full + 8 * stage);
        }
    }
}

/* A consumer warpgroup's walk over the work items (both forwards): per item c, wait for its bounds and Q tile (Q
 * buffer c % 2), then item(slot, buffer, g, key tiles of kKeys) with g the ring position of its first key tile;
 * until the producer's sentinel (head −1). */
template <int kKeys, class ItemFunction>
__device__ __forceinline__ void walk_items(uint32_t q_full, const work_item *items, ItemFunction item) {
    int g = 0;
    for (int c = 0;; c++) {
        const int buf = c & 1;
        mbarrier_spin_wait(q_full + 8 * buf, (c >> 1) & 1);
        const work_item *slot = &items[buf];
        if (slot->head < 0) return;
        const int key_tiles = mb::ceil_div(slot->key_hi - slot->key_lo, kKeys);
        item(slot, buf, g, key_tiles);
        g += key_tiles;
    }
}

/* The consumer warpgroups: per work item, wait for its bounds and Q tile, then attend (or pass, rows past a short
 * item), until the sentinel. */
__device__ void consume_persistent(mb::bf16 *out, float *lse, uint32_t q_tiles, uint32_t ring, uint32_t full,
                                   uint32_t empty, uint32_t q_full, uint32_t q_empty, const work_item *items,
                                   int heads) {
    using shape = persistent_shape;
    const int group = threadIdx.x / (4 * mb::kWarpSize);
    walk_items<kKeyTile>(q_full, items, [&](const work_item *slot, int buf, int g, int key_tiles) {
        if (slot->start + group * kRowsPerWarpgroup < slot->end)
            attend_item(out, lse, slot, q_tiles + buf * shape::kQBytes + group * kRowsPerWarpgroup * kRowBytes, ring,
                        full, empty, q_empty + 8 * buf, g, key_tiles, heads);
        else
            pass_item<kPersistentStages>(full, empty, q_empty + 8 * buf, g, key_tiles);
    });
}

#endif /* MB_WGMMA_SM90 */

__global__ void __launch_bounds__(persistent_shape::kThreads, 1)
    wgmma_forward_persistent_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, query_rows queries,
                                    const int32_t *cu_seqlens, const int32_t *seq_first, const int32_t *tile_seq,
                                    int num_seqs, int heads) {
#if MB_WGMMA_SM90
    using shape = persistent_shape;
    /* full[stages], empty[stages], q_full[2], q_empty[2] */
    __shared__ __align__(8) uint64_t barriers[2 * kPersistentStages + 4];
    __shared__ work_item items[2];
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    const uint32_t q_tiles = (shared_address(shared_raw) + 1023u) & ~1023u; /* two Q tiles, then the K/V ring */
    const uint32_t ring = q_tiles + 2 * shape::kQBytes;
    const uint32_t full = shared_address(barriers), empty = full + 8 * kPersistentStages;
    const uint32_t q_full = empty + 8 * kPersistentStages, q_empty = q_full + 16;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kPersistentStages; s++) {
            mbarrier_init(full + 8 * s, mb::kWarpSize);
            mbarrier_init(empty + 8 * s, shape::kConsumerWarps);
        }
        for (int b = 0; b < 2; b++) {
            mbarrier_init(q_full + 8 * b, mb::kWarpSize);
            mbarrier_init(q_empty + 8 * b, shape::kConsumerWarps);
        }
    }
    __syncthreads();
    const int warp = threadIdx.x / mb::kWarpSize;
    if (warp >= shape::kConsumerWarps) { /* the producer warpgroup: one warp copies, three leave */
        registers_decrease<shape::kProducerRegisters>();
        if (warp == shape::kConsumerWarps)
            produce_persistent(q_tiles, ring, full, empty, q_full, q_empty, items, qkv, queries, cu_seqlens,
                               seq_first, tile_seq, num_seqs, heads);
    } else {
        registers_increase<shape::kConsumerRegisters>();
        consume_persistent(out, lse, q_tiles, ring, full, empty, q_full, q_empty, items, heads);
    }
#endif
}

/* ---- the wide forward: FlashAttention-3's current head_dim-64 shape ----
 * 192 × 192 tiles, P through shared memory (SS wgmma for P·V), K/V/Q by TMA with two stages
 * (docs/kernels/attention_wgmma.md, "The wide forward"). Taken for batches of long sequences (wide_pays). */
namespace wide {
constexpr int kKeys = 192;                                  /* keys per K/V tile (N of the score wgmma) */
constexpr int kTile = kKeys * kRowBytes;                    /* 24 KB: K or V of one stage */
constexpr int kStage = 2 * kTile;                           /* K then V */
constexpr int kStages = 2;                                  /* TMA publishes on landing: no lag-one stage */
constexpr int kGroups = 3, kRows = kGroups * kRowsPerWarpgroup; /* 192 query rows per work item */
constexpr int kQBytes = kRows * kRowBytes;                  /* 24 KB */
constexpr int kPBytes = kRowsPerWarpgroup * kKeys * 2; /* a warpgroup's P: 3 column blocks of 64 keys, 8 KB each */
constexpr int kPBlockBytes = kRowsPerWarpgroup * kRowBytes; /* 8 KB */
constexpr int kThreads = (kGroups + 1) * 128, kConsumerWarps = 4 * kGroups;
constexpr int kProducerRegisters = 32, kConsumerRegisters = 160;
constexpr int kSteps = kKeys / 16;                          /* k-steps of P·V */
constexpr size_t kShared = 2 * (size_t)kQBytes + kGroups * (size_t)kPBytes + kStages * (size_t)kStage + 1024;
static_assert(kShared + 1024 <= 227 * 1024, "one block per SM");
static_assert(kQBytes % 1024 == 0 && kPBytes % 1024 == 0 && kStage % 1024 == 0, "1024-aligned swizzled tiles");
static_assert(kPBytes == kKeys / 64 * kPBlockBytes && kSteps * 16 == kKeys, "P as 64-key column blocks, k-steps of 16");
static_assert(kThreads == (kConsumerWarps + 4) * mb::kWarpSize, "consumer warps, then the producer warpgroup");
static_assert(kProducerRegisters + kGroups * kConsumerRegisters <= (kGroups + 1) * (65536 / kThreads / 8 * 8),
              "setmaxnreg moves only the registers the block launched with");
} // namespace wide

#if MB_WGMMA_SM90

#define MB_WGMMA_W8(c, i) \
    c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), c(d[i + 4]), c(d[i + 5]), c(d[i + 6]), c(d[i + 7])
#define MB_WGMMA_W96(c)                                                                                            \
    MB_WGMMA_W8(c, 0), MB_WGMMA_W8(c, 8), MB_WGMMA_W8(c, 16), MB_WGMMA_W8(c, 24), MB_WGMMA_W8(c, 32),              \
        MB_WGMMA_W8(c, 40), MB_WGMMA_W8(c, 48), MB_WGMMA_W8(c, 56), MB_WGMMA_W8(c, 64), MB_WGMMA_W8(c, 72),        \
        MB_WGMMA_W8(c, 80), MB_WGMMA_W8(c, 88)
#define MB_WGMMA_REGS96 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, " \
    "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, " \
    "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
    "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}"

/* d[64 × 192] (+)= A·B, both from shared memory, K-major (scale-d from `accumulate`). */
__device__ __forceinline__ void wgmma_m64n192_ss(float (&d)[96], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 " MB_WGMMA_REGS96
                 ", %96, %97, p, 1, 1, 0, 0;\n}\n"
                 : MB_WGMMA_W96("+f")
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
#undef MB_WGMMA_W8
#undef MB_WGMMA_W96
#undef MB_WGMMA_REGS96

/* One thread's TMA copy of the box at (x elements, y rows) of the map into shared memory, counted on `bar`. */
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap *map, int x, int y, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
                 : "memory");
}

/* This thread's arrival on `bar`, announcing `bytes` of TMA traffic the phase also waits for. */
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

/* Named barrier 2 + group over one consumer warpgroup's 128 threads (its P rows are stored by four warps and read
 * by one warpgroup-wide wgmma). */
__device__ __forceinline__ void warpgroup_sync(int group) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + group) : "memory");
}

/* S[64 × 192] = Q·K_tileᵀ (Q from shared memory, as issue_scores). */
__device__ __forceinline__ void wide_scores(float (&s)[96], uint32_t q_tile, uint32_t k_tile) {
    const uint64_t desc_a = sw128_descriptor(q_tile), desc_b = sw128_descriptor(k_tile);
#pragma unroll
    for (int ks = 0; ks < 4; ks++)
        wgmma_m64n192_ss(s, desc_a + descriptor_offset(32 * ks), desc_b + descriptor_offset(32 * ks), ks > 0);
}

/* O[64 × 64] += P[64 × 192]·V_tile[192 × 64]: A = P from shared memory (K-major, three 8 KB column blocks of 64
 * keys; k-step kk is block kk / 4, +32 bytes per k-step inside it), B = V read N-major (+2048 bytes per 16 keys). */
__device__ __forceinline__ void wide_pv(float (&o)[32], uint32_t p_tile, uint32_t v_tile) {
    const uint64_t desc_p = sw128_descriptor(p_tile), desc_v = sw128_descriptor(v_tile);
#pragma unroll
    for (int kk = 0; kk < wide::kSteps; kk++)
        wgmma_m64n64_ss<0, 1>(o, desc_p + descriptor_offset((kk / 4) * wide::kPBlockBytes + (kk % 4) * 32),
                              desc_v + descriptor_offset(2048 * kk), 1);
}

/* The warpgroup's P (the fp32 scores after the softmax) as bf16 into its shared P tile: per k-step of 16 keys one
 * stmatrix.x4 (lane l gives row l % 8 of matrix l / 8: rows +0 / +8, keys +0 / +8), the swizzle of K-major tiles. */
__device__ __forceinline__ void wide_store_p(uint32_t p_tile, const float (&s)[96]) {
    const int lane = threadIdx.x % mb::kWarpSize, warp = (threadIdx.x / mb::kWarpSize) % 4, matrix = lane / 8;
    const int row = 16 * warp + lane % 8 + 8 * (matrix & 1);
#pragma unroll
    for (int kk = 0; kk < wide::kSteps; kk++) {
        uint32_t x[4];
#pragma unroll
        for (int r = 0; r < 4; r++) x[r] = mb::pack_bf16x2(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
        const int chunk = 2 * kk + (matrix >> 1);
        const uint32_t address = p_tile + (chunk / 8) * wide::kPBlockBytes + swizzled_offset(row, chunk % 8);
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(x[0]),
                     "r"(x[1]), "r"(x[2]), "r"(x[3])
                     : "memory");
    }
}

/* The wide kernel's 192-key tiles (24 n-tiles). */
__device__ __forceinline__ void wide_softmax(float (&s)[96], float (&row_max)[2], float (&row_sum)[2],
                                             float (&correction)[2]) {
    softmax_rows<24, 2>(s, row_max, row_sum, correction, kScaleLog2);
}

/* One consumer warpgroup, one work item: its 64 rows against the item's 192-key tiles (ring tiles g ..; stage
 * tile % 2, parity (tile / 2) & 1). P_{i−1}·V_{i−1} runs while the softmax of S_i executes (FA3's intra-warpgroup
 * overlap); P_i is written to shared memory only after that product completed. */
__device__ __forceinline__ void wide_attend(mb::bf16 *out, float *lse, const work_item *slot, uint32_t q_tile,
                                            uint32_t p_tile, uint32_t ring, uint32_t full, uint32_t empty,
                                            uint32_t q_release, int g, int key_tiles, int heads, int group) {
    float s[96], o[32];
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f}, correction[2];
#pragma unroll
    for (int e = 0; e < 32; e++) o[e] = 0.0f;
    int stage = g % wide::kStages;
    mbarrier_spin_wait(full + 8 * stage, (g / wide::kStages) & 1);
    wgmma_fence();
    wide_scores(s, q_tile, ring + stage * wide::kStage);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(s);
    if (key_tiles == 1) mask_tail(s, 0, slot->key_hi - slot->key_lo); /* no-op for a whole tile */
    wide_softmax(s, row_max, row_sum, correction);
    wide_store_p(p_tile, s);
    fence_proxy_async();
    warpgroup_sync(group);
    for (int i = 1; i < key_tiles; i++) {
        const int previous = stage;
        stage = (g + i) % wide::kStages;
        mbarrier_spin_wait(full + 8 * stage, ((g + i) / wide::kStages) & 1);
        fence_registers(o);
        wgmma_fence();
        wide_scores(s, q_tile, ring + stage * wide::kStage);
        wgmma_commit();
        wide_pv(o, p_tile, ring + previous * wide::kStage + wide::kTile);
        wgmma_commit();
        wgmma_wait<1>(); /* S_i done; P_{i−1}·V_{i−1} may still run */
        fence_registers(s);
        if (i == key_tiles - 1) /* the last tile: keys past the sequence (re-read: registers are the limit) */
            mask_tail(s, 0, slot->key_hi - slot->key_lo - i * wide::kKeys);
        wide_softmax(s, row_max, row_sum, correction);
        wgmma_wait<0>(); /* P_{i−1}·V_{i−1} done: O and the P tile are free */
        fence_registers(o);
        rescale(o, correction);
        warp_arrive(empty + 8 * previous);
        wide_store_p(p_tile, s);
        fence_proxy_async();
        warpgroup_sync(group);
    }
    fence_registers(o);
    wgmma_fence();
    wide_pv(o, p_tile, ring + stage * wide::kStage + wide::kTile);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(o);
    finish_item(out, lse, o, row_max, row_sum, slot, empty + 8 * stage, q_release, heads);
}

/* The producer thread: per work item its bounds (items[c % 2]) and Q tile by TMA, then its K and V tiles. Every
 * barrier it fills expects one arrival (its own expect_tx) and the TMA bytes. */
__device__ void wide_produce(uint32_t q_tiles, uint32_t ring, uint32_t full, uint32_t empty, uint32_t q_full,
                             uint32_t q_empty, work_item *items, const CUtensorMap *map, const int32_t *cu_seqlens,
                             const int32_t *seq_first, const int32_t *tile_seq, int num_seqs, int heads) {
    const int hidden = heads * kHeadDim, total_tiles = seq_first[num_seqs];
    unsigned w = blockIdx.x;
    int g = 0;
    for (int c = 0;; c++, w += gridDim.x) {
        const int buf = c & 1;
        if (c >= 2) mbarrier_spin_wait(q_empty + 8 * buf, ((c >> 1) - 1) & 1);
        work_item item = {0, 0, 0, 0, -1};
        const bool found =
            next_work_item(&item, &w, gridDim.x, seq_first, tile_seq, cu_seqlens, cu_seqlens, total_tiles, heads,
                           wide::kRows);
        items[buf] = item;
        if (!found) {
            mbarrier_arrive(q_full + 8 * buf); /* the sentinel */
            return;
        }
        mbarrier_arrive_expect_tx(q_full + 8 * buf, wide::kQBytes);
        tma_load_2d(q_tiles + buf * wide::kQBytes, map, item.head * kHeadDim, item.start, q_full + 8 * buf);
        const int key_tiles = mb::ceil_div(item.key_hi - item.key_lo, wide::kKeys);
        for (int i = 0; i < key_tiles; i++, g++) {
            const int stage = g % wide::kStages;
            if (g >= wide::kStages) mbarrier_spin_wait(empty + 8 * stage, ((g / wide::kStages) - 1) & 1);
            const uint32_t base = ring + stage * wide::kStage, bar = full + 8 * stage;
            const int k0 = item.key_lo + i * wide::kKeys;
            mbarrier_arrive_expect_tx(bar, wide::kStage);
            tma_load_2d(base, map, hidden + item.head * kHeadDim, k0, bar);
            tma_load_2d(base + wide::kTile, map, 2 * hidden + item.head * kHeadDim, k0, bar);
        }
    }
}

/* The consumers: per work item, wait for its bounds and Q tile, then attend or pass, until the sentinel. */
__device__ void wide_consume(mb::bf16 *out, float *lse, uint32_t q_tiles, uint32_t full, const work_item *items,
                             int heads) {
    /* every other address is a constant offset from these two (registers are the limit at 160) */
    const uint32_t p_tiles = q_tiles + 2 * wide::kQBytes, ring = p_tiles + wide::kGroups * wide::kPBytes;
    const uint32_t empty = full + 8 * wide::kStages, q_full = empty + 8 * wide::kStages, q_empty = q_full + 16;
    const int group = threadIdx.x / 128;
    walk_items<wide::kKeys>(q_full, items, [&](const work_item *slot, int buf, int g, int key_tiles) {
        if (slot->start + group * kRowsPerWarpgroup < slot->end)
            wide_attend(out, lse, slot, q_tiles + buf * wide::kQBytes + group * kRowsPerWarpgroup * kRowBytes,
                        p_tiles + group * wide::kPBytes, ring, full, empty, q_empty + 8 * buf, g, key_tiles, heads,
                        group);
        else
            pass_item<wide::kStages>(full, empty, q_empty + 8 * buf, g, key_tiles);
    });
}

#endif /* MB_WGMMA_SM90 */

__global__ void __launch_bounds__(wide::kThreads, 1)
    wgmma_forward_wide_kernel(mb::bf16 *out, float *lse, const __grid_constant__ CUtensorMap map,
                              const int32_t *cu_seqlens, const int32_t *seq_first, const int32_t *tile_seq,
                              int num_seqs, int heads) {
#if MB_WGMMA_SM90
    __shared__ __align__(8) uint64_t barriers[2 * wide::kStages + 4];
    __shared__ work_item items[2];
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    const uint32_t q_tiles = (shared_address(shared_raw) + 1023u) & ~1023u; /* two Q tiles, the P tiles, the ring */
    const uint32_t p_tiles = q_tiles + 2 * wide::kQBytes, ring = p_tiles + wide::kGroups * wide::kPBytes;
    const uint32_t full = shared_address(barriers), empty = full + 8 * wide::kStages;
    const uint32_t q_full = empty + 8 * wide::kStages, q_empty = q_full + 16;
    if (threadIdx.x == 0) {
        for (int s = 0; s < wide::kStages; s++) {
            mbarrier_init(full + 8 * s, 1);
            mbarrier_init(empty + 8 * s, wide::kConsumerWarps);
        }
        for (int b = 0; b < 2; b++) {
            mbarrier_init(q_full + 8 * b, 1);
            mbarrier_init(q_empty + 8 * b, wide::kConsumerWarps);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); /* visible to the TMA unit */
    }
    __syncthreads();
    const int warp = threadIdx.x / mb::kWarpSize;
    if (warp >= wide::kConsumerWarps) {
        registers_decrease<wide::kProducerRegisters>();
        if (threadIdx.x == wide::kConsumerWarps * mb::kWarpSize)
            wide_produce(q_tiles, ring, full, empty, q_full, q_empty, items, &map, cu_seqlens, seq_first, tile_seq,
                         num_seqs, heads);
    } else {
        registers_increase<wide::kConsumerRegisters>();
        wide_consume(out, lse, q_tiles, full, items, heads);
    }
#endif
}

/* ---- self-test kernel: one warpgroup runs the tile products on fixed operands ----
 * q [64 × 64], k [128 × 64], v [128 × 64] bf16 row-major; p [64 × 128] fp32; results s [64 × 128] (Q from the
 * swizzled shared tile, as the kernel reads it), o [64 × 64]. Shared: K/V stage, then Q. */
constexpr size_t kSelftestSharedBytes = kStageBytes + kRowsPerWarpgroup * kRowBytes + 1024;
__global__ void __launch_bounds__(128)
    wgmma_products_selftest_kernel(float *s_out, float *o_out, const mb::bf16 *q_in, const mb::bf16 *k_in,
                                   const mb::bf16 *v_in, const float *p_in) {
#if MB_WGMMA_SM90
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    const uint32_t stage = (shared_address(shared_raw) + 1023u) & ~1023u, q_tile = stage + kStageBytes;
    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize, quad = lane % 4;
    if (warp == 0) {
        load_kv_tile(stage, k_in, v_in, kHeadDim, 0, kKeyTile);
        load_q_tile<kRowsPerWarpgroup>(q_tile, q_in, kHeadDim, 0, kRowsPerWarpgroup);
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();
    }
    __syncthreads();
    const int row_a = warp * 16 + lane / 4;
    uint32_t p[8][4];
    float s[64], o[32], p_values[64];
    for (int e = 0; e < 64; e++) s[e] = 0.0f;
    for (int e = 0; e < 32; e++) o[e] = 0.0f;
    wgmma_fence();
    issue_scores(s, q_tile, stage);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(s);
    for (int j = 0; j < 16; j++)
        for (int e = 0; e < 4; e++) {
            const int row = row_a + 8 * (e / 2), col = 8 * j + 2 * quad + (e & 1);
            s_out[row * kKeyTile + col] = s[4 * j + e];
            p_values[4 * j + e] = p_in[row * kKeyTile + col];
        }
    pack_p(p, p_values);
    wgmma_fence();
    issue_pv(o, p, stage + kTileBytes);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(o);
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) {
            const int row = row_a + 8 * (e / 2), col = 8 * j + 2 * quad + (e & 1);
            o_out[row * kHeadDim + col] = o[4 * j + e];
        }
#endif
}

}  // namespace

bool mb_attention_wgmma_forward_supports(int head_dim, int window) {
    return head_dim == kHeadDim && window < 0 && sm90a_kernel_runs((const void *)wgmma_forward_persistent_kernel);
}

namespace {

/* The launch: min(plan.blocks, max_blocks) persistent blocks (the SM count, or fewer in the self-test so that each
 * block walks many items). Arguments checked by the caller; the plan is built over queries.cu_queries. */
int launch_persistent(mb::bf16 *out, float *lse, const mb::bf16 *qkv, query_rows queries, const int32_t *cu_seqlens,
                      const mb::attention_plan &plan, int num_seqs, int heads, unsigned max_blocks,
                      cudaStream_t stream, mb_error *err) {
    if (plan.blocks == 0) return 0;
    using shape = persistent_shape;
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(wgmma_forward_persistent_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shape::kSharedBytes));
    const unsigned blocks = plan.blocks < max_blocks ? plan.blocks : max_blocks;
    wgmma_forward_persistent_kernel<<<blocks, shape::kThreads, shape::kSharedBytes, stream>>>(
        out, lse, qkv, queries, cu_seqlens, plan.seq_first, plan.tile_seq, num_seqs, heads);
    MB_CUDA_CHECK_LAUNCH(err, "wgmma_forward_persistent_kernel");
    return 0;
}

}  // namespace

namespace {

/* The wide kernel's launch. The tensor map covers qkv as a 2-D bf16 array [n rows][3·hidden] with
 * 128-byte-swizzled boxes of 192 rows × 64 columns; rows past n come back as zeros. cuTensorMapEncodeTiled comes
 * from the driver through the runtime's entry-point query (no link against libcuda). */
int launch_wide(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                const mb::attention_plan &plan, int num_seqs, int n, int heads, unsigned max_blocks,
                cudaStream_t stream, mb_error *err) {
    if (plan.blocks == 0) return 0;
    void *entry = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    MB_CUDA_CHECK(err, cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault,
                                                        &found));
    MB_REQUIRE(err, found == cudaDriverEntryPointSuccess && entry != nullptr,
               "attention_wgmma_forward (wide): the driver has no cuTensorMapEncodeTiled");
    const auto encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(entry);
    const cuuint64_t dims[2] = {(cuuint64_t)(3 * heads * kHeadDim), (cuuint64_t)n};
    const cuuint64_t strides[1] = {(cuuint64_t)(3 * heads * kHeadDim) * sizeof(mb::bf16)};
    const cuuint32_t box[2] = {(cuuint32_t)kHeadDim, (cuuint32_t)wide::kKeys}, unit[2] = {1, 1};
    CUtensorMap map;
    const CUresult made = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<mb::bf16 *>(qkv), dims, strides,
                                 box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    MB_REQUIRE(err, made == CUDA_SUCCESS, "attention_wgmma_forward (wide): cuTensorMapEncodeTiled failed (%d)",
               (int)made);
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(wgmma_forward_wide_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)wide::kShared));
    const unsigned blocks = plan.blocks < max_blocks ? plan.blocks : max_blocks;
    wgmma_forward_wide_kernel<<<blocks, wide::kThreads, wide::kShared, stream>>>(
        out, lse, map, cu_seqlens, plan.seq_first, plan.tile_seq, num_seqs, heads);
    MB_CUDA_CHECK_LAUNCH(err, "wgmma_forward_wide_kernel");
    return 0;
}

/* Whether the wide forward (192 × 192 tiles) beats the persistent one (128-row items) on this batch. Its tiles waste
 * more rows at a short sequence's end, and it has fewer items to balance: H200, 32,768 tokens of equal sequences,
 * persistent / wide ms: 0.295 / 0.315 at 1024, 0.504 / 0.494 at 2048, 0.970 / 0.944 at 4096, 1.88 / 1.82 at 8192
 * (session 14 call 2). So: sequences of 2048 tokens or more on average. MB_ATTENTION_WGMMA_FWD=wide|persistent
 * overrides (tests, benchmarks). */
bool wide_pays(int n, int num_seqs) {
    if (env_is("MB_ATTENTION_WGMMA_FWD", "wide")) return true;
    if (env_is("MB_ATTENTION_WGMMA_FWD", "persistent")) return false;
    return n >= 2048 * num_seqs;
}

}  // namespace

namespace {

/* The checks both entry points share (`what` names the caller; q: the queries' rows, qkv's Q block or gathered). */
int check_forward(const char *what, const mb::bf16 *out, const float *lse, const mb::bf16 *q, const mb::bf16 *qkv,
                  const int32_t *cu_seqlens, const int32_t *cu_queries, const mb::attention_plan &plan, int num_seqs,
                  int heads, int head_dim, int window, mb_error *err) {
    MB_REQUIRE(err, out && lse && q && qkv && cu_seqlens && cu_queries && plan.seq_first && plan.tile_seq,
               "%s: missing out, lse, q, qkv, cu_seqlens, cu_queries or plan", what);
    MB_REQUIRE(err, head_dim == kHeadDim && window < 0,
               "%s: head_dim %d, window %d not supported (head_dim 64, global layers only)", what, head_dim, window);
    MB_REQUIRE(err, plan.tile == kWgmmaForwardTile, "%s: plan built for tile %d, this kernel needs %d", what,
               plan.tile, kWgmmaForwardTile);
    MB_REQUIRE(err, num_seqs >= 1 && heads >= 1, "%s: bad shape num_seqs %d, heads %d", what, num_seqs, heads);
    MB_REQUIRE(err,
               reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 4 == 0,
               "%s: qkv and q must be 16-byte aligned, out 4-byte aligned", what);
    MB_REQUIRE(err, mb_attention_wgmma_forward_supports(head_dim, window),
               "%s: needs a compute capability 9.x device and the sm_90a build", what);
    return 0;
}

}  // namespace

int mb_attention_wgmma_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                               mb::attention_plan plan, int num_seqs, int n, int heads, int head_dim, int window,
                               cudaStream_t stream, mb_error *err) {
    if (check_forward("attention_wgmma_forward", out, lse, qkv, qkv, cu_seqlens, cu_seqlens, plan, num_seqs, heads,
                      head_dim, window, err) != 0)
        return -1;
    MB_REQUIRE(err, n >= num_seqs, "attention_wgmma_forward: bad shape num_seqs %d, n %d", num_seqs, n);
    int sm_count = 0;
    if (current_sm_count(&sm_count, err) != 0) return -1;
    if (wide_pays(n, num_seqs))
        return launch_wide(out, lse, qkv, cu_seqlens, plan, num_seqs, n, heads, (unsigned)sm_count, stream, err);
    const query_rows queries = {qkv, 3 * heads * kHeadDim, cu_seqlens};
    return launch_persistent(out, lse, qkv, queries, cu_seqlens, plan, num_seqs, heads, (unsigned)sm_count, stream,
                             err);
}

int mb_attention_wgmma_forward_rows(mb::bf16 *out, float *lse, const mb::bf16 *q, const mb::bf16 *qkv,
                                    const int32_t *cu_seqlens, const int32_t *cu_queries, mb::attention_plan plan,
                                    int num_seqs, int heads, int head_dim, int window, cudaStream_t stream,
                                    mb_error *err) {
    if (check_forward("attention_wgmma_forward_rows", out, lse, q, qkv, cu_seqlens, cu_queries, plan, num_seqs, heads,
                      head_dim, window, err) != 0)
        return -1;
    int sm_count = 0;
    if (current_sm_count(&sm_count, err) != 0) return -1;
    const query_rows queries = {q, heads * kHeadDim, cu_queries};
    return launch_persistent(out, lse, qkv, queries, cu_seqlens, plan, num_seqs, heads, (unsigned)sm_count, stream,
                             err);
}

/* ---- self-test (host side) ---- */

namespace {

/* cudaMalloc'd buffer freed on every return path of the self-test. */
struct device_buffer {
    void *ptr = nullptr;
    ~device_buffer() {
        if (ptr != nullptr) cudaFree(ptr);
    }
    cudaError_t allocate(size_t bytes) { return cudaMalloc(&ptr, bytes); }
    template <typename T>
    T *as() const {
        return static_cast<T *>(ptr);
    }
};

/* Small exact operands: multiples of 1/8 (1/16 for P) in [-1, 1], so every product and every fp32 sum of 64 or
 * 128 of them is exact and the expected results are exact. Distinct periods per operand expose transposed or
 * permuted layouts. */
float selftest_q(int r, int d) { return (float)((r * 7 + d * 3) % 13 - 6) / 8.0f; }
float selftest_k(int c, int d) { return (float)((c * 5 + d * 11) % 17 - 8) / 8.0f; }
float selftest_v(int k, int n) { return (float)((k * 3 + n * 13) % 11 - 5) / 8.0f; }
float selftest_p(int r, int k) { return (float)((r * 11 + k * 7) % 9) / 16.0f; }

/* Deterministic value in [-1, 1) for the whole-forward check (integer hash of the element index). */
float selftest_hash(uint32_t i) {
    i ^= i >> 16;
    i *= 0x7feb352du;
    i ^= i >> 15;
    i *= 0x846ca68bu;
    i ^= i >> 16;
    return (float)(i & 0xFFFFu) / 32768.0f - 1.0f;
}

struct mismatch {
    double max_error = 0.0;
    long first_bad = -1; /* flat index of the first element over tolerance, -1 if none */
    double got = 0.0, want = 0.0;
    void check(long index, double value, double expected, double tolerance) {
        double error = std::fabs(value - expected);
        if (!(error <= max_error)) max_error = std::isnan(error) ? INFINITY : std::fmax(max_error, error);
        if (!(error <= tolerance) && first_bad < 0) {
            first_bad = index;
            got = value;
            want = expected;
        }
    }
};

#define SELFTEST_CUDA(call)                                                                                       \
    do {                                                                                                          \
        cudaError_t status_ = (call);                                                                             \
        if (status_ != cudaSuccess) {                                                                             \
            snprintf(report, size, "wgmma forward self-test: %s:%d: %s: %s", __FILE__, __LINE__, #call,          \
                     cudaGetErrorString(status_));                                                                \
            return -1;                                                                                            \
        }                                                                                                         \
    } while (0)

/* (1) and (2): the tile products of one warpgroup against exact host sums: S with Q from the swizzled shared tile,
 * O = P·V. */
int selftest_products(char *report, size_t size, mismatch *scores, mismatch *values) {
    std::vector<mb::bf16> q(64 * kHeadDim), k(kKeyTile * kHeadDim), v(kKeyTile * kHeadDim);
    std::vector<float> p(64 * kKeyTile), s_got(64 * kKeyTile), o_got(64 * kHeadDim);
    for (int r = 0; r < 64; r++)
        for (int d = 0; d < kHeadDim; d++) q[r * kHeadDim + d] = __float2bfloat16(selftest_q(r, d));
    for (int c = 0; c < kKeyTile; c++)
        for (int d = 0; d < kHeadDim; d++) {
            k[c * kHeadDim + d] = __float2bfloat16(selftest_k(c, d));
            v[c * kHeadDim + d] = __float2bfloat16(selftest_v(c, d));
        }
    for (int r = 0; r < 64; r++)
        for (int c = 0; c < kKeyTile; c++) p[r * kKeyTile + c] = selftest_p(r, c);
    device_buffer dq, dk, dv, dp, ds, dout;
    SELFTEST_CUDA(dq.allocate(q.size() * sizeof(mb::bf16)));
    SELFTEST_CUDA(dk.allocate(k.size() * sizeof(mb::bf16)));
    SELFTEST_CUDA(dv.allocate(v.size() * sizeof(mb::bf16)));
    SELFTEST_CUDA(dp.allocate(p.size() * sizeof(float)));
    SELFTEST_CUDA(ds.allocate(s_got.size() * sizeof(float)));
    SELFTEST_CUDA(dout.allocate(o_got.size() * sizeof(float)));
    SELFTEST_CUDA(cudaMemcpy(dq.ptr, q.data(), q.size() * sizeof(mb::bf16), cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(dk.ptr, k.data(), k.size() * sizeof(mb::bf16), cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(dv.ptr, v.data(), v.size() * sizeof(mb::bf16), cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(dp.ptr, p.data(), p.size() * sizeof(float), cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemset(ds.ptr, 0xFF, s_got.size() * sizeof(float))); /* NaN: unwritten entries fail */
    SELFTEST_CUDA(cudaMemset(dout.ptr, 0xFF, o_got.size() * sizeof(float)));
    SELFTEST_CUDA(cudaFuncSetAttribute(wgmma_products_selftest_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)kSelftestSharedBytes));
    wgmma_products_selftest_kernel<<<1, 128, kSelftestSharedBytes>>>(ds.as<float>(), dout.as<float>(),
                                                                     dq.as<mb::bf16>(), dk.as<mb::bf16>(),
                                                                     dv.as<mb::bf16>(), dp.as<float>());
    SELFTEST_CUDA(cudaGetLastError());
    SELFTEST_CUDA(cudaDeviceSynchronize());
    SELFTEST_CUDA(cudaMemcpy(s_got.data(), ds.ptr, s_got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    SELFTEST_CUDA(cudaMemcpy(o_got.data(), dout.ptr, o_got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (int r = 0; r < 64; r++)
        for (int c = 0; c < kKeyTile; c++) {
            double want = 0.0;
            for (int d = 0; d < kHeadDim; d++) want += (double)selftest_q(r, d) * selftest_k(c, d);
            scores->check(r * kKeyTile + c, s_got[r * kKeyTile + c], want, 1e-3);
        }
    for (int r = 0; r < 64; r++)
        for (int n = 0; n < kHeadDim; n++) {
            double want = 0.0;
            for (int c = 0; c < kKeyTile; c++) want += (double)selftest_p(r, c) * selftest_v(c, n);
            values->check(r * kHeadDim + n, o_got[r * kHeadDim + n], want, 1e-3);
        }
    return 0;
}

/* The whole-forward runs of (3): a block per item, and 1 or 3 blocks so that one block walks many work items (Q
 * buffers and the K/V ring wrap across items). */
struct forward_run {
    const char *name;
    unsigned max_blocks;
};
constexpr forward_run kForwardRuns[] = {{"all-blocks", 1u << 30}, {"1blk", 1}, {"3blk", 3}};
constexpr int kForwardRunCount = (int)(sizeof kForwardRuns / sizeof kForwardRuns[0]);

/* (3): the whole forward of each run on a small packed batch against a double-precision reference. Lengths: 700
 * (6 key tiles: the 5-stage ring wraps inside an item; 192-query items of 192, 192, 192, 124 rows), 200 (a 192 + 8
 * split: two warpgroups pass the second item), 1, 130, 64. */
int selftest_forward(char *report, size_t size, mismatch (&outs)[kForwardRunCount],
                     mismatch (&lses)[kForwardRunCount]) {
    const int lengths[] = {200, 1, 130, 64, 700}, num_seqs = 5, heads = 2, hidden = heads * kHeadDim;
    std::vector<int32_t> cu(num_seqs + 1, 0), seq_first(num_seqs + 1, 0), tile_seq;
    for (int s = 0; s < num_seqs; s++) {
        cu[s + 1] = cu[s] + lengths[s];
        seq_first[s] = (int32_t)tile_seq.size();
        for (int x = 0; x < mb::ceil_div(lengths[s], kWgmmaForwardTile); x++) tile_seq.push_back(s);
    }
    seq_first[num_seqs] = (int32_t)tile_seq.size();
    const int n = cu[num_seqs];
    std::vector<mb::bf16> qkv((size_t)n * 3 * hidden), out((size_t)n * hidden);
    std::vector<float> qkv_f(qkv.size()), lse((size_t)n * heads);
    for (size_t i = 0; i < qkv.size(); i++) {
        qkv[i] = __float2bfloat16(2.0f * selftest_hash((uint32_t)i)); /* scores of a few units: a real softmax */
        qkv_f[i] = __bfloat162float(qkv[i]);
    }
    /* the reference, once */
    const size_t stride = 3 * (size_t)hidden;
    std::vector<double> want_out((size_t)n * hidden), want_lse((size_t)n * heads), score(n);
    for (int s = 0; s < num_seqs; s++)
        for (int i = cu[s]; i < cu[s + 1]; i++)
            for (int h = 0; h < heads; h++) {
                const float *qi = &qkv_f[i * stride + h * kHeadDim];
                double top = -INFINITY;
                for (int j = cu[s]; j < cu[s + 1]; j++) {
                    const float *kj = &qkv_f[j * stride + hidden + h * kHeadDim];
                    double dot = 0.0;
                    for (int d = 0; d < kHeadDim; d++) dot += (double)qi[d] * kj[d];
                    score[j] = dot / 8.0;
                    top = std::fmax(top, score[j]);
                }
                double total = 0.0;
                double *value = &want_out[(size_t)i * hidden + h * kHeadDim];
                for (int j = cu[s]; j < cu[s + 1]; j++) {
                    const double w = std::exp(score[j] - top);
                    total += w;
                    const float *vj = &qkv_f[j * stride + 2 * hidden + h * kHeadDim];
                    for (int d = 0; d < kHeadDim; d++) value[d] += w * vj[d];
                }
                for (int d = 0; d < kHeadDim; d++) value[d] /= total;
                want_lse[(size_t)i * heads + h] = top + std::log(total);
            }
    device_buffer d_qkv, d_out, d_lse, d_cu, d_first, d_tiles;
    SELFTEST_CUDA(d_qkv.allocate(qkv.size() * sizeof(mb::bf16)));
    SELFTEST_CUDA(d_out.allocate(out.size() * sizeof(mb::bf16)));
    SELFTEST_CUDA(d_lse.allocate(lse.size() * sizeof(float)));
    SELFTEST_CUDA(d_cu.allocate(cu.size() * sizeof(int32_t)));
    SELFTEST_CUDA(d_first.allocate(seq_first.size() * sizeof(int32_t)));
    SELFTEST_CUDA(d_tiles.allocate(tile_seq.size() * sizeof(int32_t)));
    SELFTEST_CUDA(cudaMemcpy(d_qkv.ptr, qkv.data(), qkv.size() * sizeof(mb::bf16), cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_cu.ptr, cu.data(), cu.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_first.ptr, seq_first.data(), seq_first.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_tiles.ptr, tile_seq.data(), tile_seq.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice));
    mb::attention_plan plan;
    plan.seq_first = d_first.as<int32_t>();
    plan.tile_seq = d_tiles.as<int32_t>();
    plan.tile = kWgmmaForwardTile;
    plan.blocks = (unsigned)((mb::ceil_div(n, kWgmmaForwardTile) + num_seqs) * heads);
    for (int r = 0; r < kForwardRunCount; r++) {
        SELFTEST_CUDA(cudaMemset(d_out.ptr, 0xFF, out.size() * sizeof(mb::bf16))); /* NaN: unwritten rows fail */
        SELFTEST_CUDA(cudaMemset(d_lse.ptr, 0xFF, lse.size() * sizeof(float)));
        mb_error err;
        memset(&err, 0, sizeof err);
        const query_rows queries = {d_qkv.as<mb::bf16>(), 3 * heads * kHeadDim, d_cu.as<int32_t>()};
        if (launch_persistent(d_out.as<mb::bf16>(), d_lse.as<float>(), d_qkv.as<mb::bf16>(), queries,
                              d_cu.as<int32_t>(), plan, num_seqs, heads, kForwardRuns[r].max_blocks, 0, &err) != 0) {
            snprintf(report, size, "wgmma forward self-test: %s launch failed: %s", kForwardRuns[r].name,
                     err.message);
            return -1;
        }
        SELFTEST_CUDA(cudaDeviceSynchronize());
        SELFTEST_CUDA(cudaMemcpy(out.data(), d_out.ptr, out.size() * sizeof(mb::bf16), cudaMemcpyDeviceToHost));
        SELFTEST_CUDA(cudaMemcpy(lse.data(), d_lse.ptr, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
        for (size_t index = 0; index < out.size(); index++)
            outs[r].check((long)index, __bfloat162float(out[index]), want_out[index],
                          1e-2 + 1e-2 * std::fabs(want_out[index]));
        for (size_t index = 0; index < lse.size(); index++)
            lses[r].check((long)index, lse[index], want_lse[index], 1e-3 * (1.0 + std::fabs(want_lse[index])));
    }
    return 0;
}

}  // namespace

extern "C" int mb_cuda_attention_wgmma_fwd_selftest(char *report, size_t size) {
    if (report == nullptr || size == 0) return -1;
    report[0] = '\0';
    if (!mb_attention_wgmma_forward_supports(kHeadDim, -1)) {
        snprintf(report, size, "wgmma forward self-test: skipped (needs a compute capability 9.x device and the "
                               "sm_90a build)");
        return 1;
    }
    mismatch scores, values, outs[kForwardRunCount], lses[kForwardRunCount];
    if (selftest_products(report, size, &scores, &values) != 0) return -1;
    if (selftest_forward(report, size, outs, lses) != 0) return -1;
    bool pass = scores.first_bad < 0 && values.first_bad < 0;
    int first_failed = -1; /* the first whole-forward run with a bad element */
    for (int r = 0; r < kForwardRunCount; r++)
        if ((outs[r].first_bad >= 0 || lses[r].first_bad >= 0) && first_failed < 0) first_failed = r;
    pass = pass && first_failed < 0;
    /* first bad element as (row, column) of its matrix; -1 when none */
    auto row_of = [](const mismatch &m, long cols) { return m.first_bad < 0 ? -1 : m.first_bad / cols; };
    auto col_of = [](const mismatch &m, long cols) { return m.first_bad < 0 ? -1 : m.first_bad % cols; };
    size_t used = (size_t)snprintf(
        report, size,
        "wgmma forward self-test %s: S=Q*K^T [64x128] max err %.3g (first bad row %ld col %ld: got %.6g want "
        "%.6g); O=P*V [64x64] max err %.3g (first bad row %ld col %ld: got %.6g want %.6g); forward (lengths "
        "200,1,130,64,700; 2 heads) max err out/lse:",
        pass ? "passed" : "FAILED", scores.max_error, row_of(scores, kKeyTile), col_of(scores, kKeyTile), scores.got,
        scores.want, values.max_error, row_of(values, kHeadDim), col_of(values, kHeadDim), values.got, values.want);
    for (int r = 0; r < kForwardRunCount && used < size; r++)
        used += (size_t)snprintf(report + used, size - used, " %s %.3g/%.3g%s", kForwardRuns[r].name,
                                 outs[r].max_error, lses[r].max_error,
                                 outs[r].first_bad >= 0 || lses[r].first_bad >= 0 ? " BAD" : "");
    if (first_failed >= 0 && used < size) {
        const mismatch &o = outs[first_failed], &l = lses[first_failed];
        snprintf(report + used, size - used,
                 "; first failing run %s: out first bad token %ld head %ld dim %ld (got %.6g want %.6g), lse first "
                 "bad token %ld head %ld (got %.6g want %.6g)",
                 kForwardRuns[first_failed].name, row_of(o, 2 * kHeadDim), col_of(o, 2 * kHeadDim) / kHeadDim,
                 col_of(o, kHeadDim), o.got, o.want, row_of(l, 2), col_of(l, 2), l.got, l.want);
    }
    return pass ? 0 : -1;
}
