/* FlashAttention-3-style attention backward on Hopper (wgmma, sm_90a) for global layers at head_dim 64.
 *
 * For query i and key j of one sequence (scale = 1/8, s_ij = scale·q_i·k_j, lse_i = log Σ_j exp s_ij from the
 * forward, delta_i = do_i·o_i):
 *   P_ij = exp(s_ij − lse_i),  dP_ij = do_i·v_j,  dS_ij = P_ij (dP_ij − delta_i)
 *   dV_j = Σ_i P_ij do_i,  dK_j = scale Σ_i dS_ij q_i  (written, bf16),  dq_accum_i += Σ_j dS_ij k_j  (fp32, unscaled)
 *
 * Work item = one 128-key tile of the plan and one head. A persistent grid (one block per SM, session 12) walks the
 * items with stride gridDim.x; MB_ATTENTION_WGMMA_BWD=per_tile launches one block per item instead. The items of a
 * short last round are cut into pieces by query steps, their dK / dV summed by the last piece (the tail split of
 * attention_wgmma_bwd.h, session 17; MB_ATTENTION_WGMMA_SPLIT=0 turns it off). A block has 384
 * threads: warpgroups 0 and 1 consume, warpgroup 2's first warp produces (setmaxnreg 240 / 24). Warpgroup g owns
 * keys 64g..64g+63 of the tile and holds their dK and dV (64 × 64 fp32 each) in registers. The block loops over the
 * sequence's queries in steps of 128 (FlashAttention-3's hdim-64 tile); per step and warpgroup (m64nNk16 = one wgmma,
 * bf16 in, fp32 accumulate):
 *   Sᵀ  = K_g·Qᵀ        4 × m64n128k16, A = K (smem, K-major), B = Q (smem, K-major)
 *   dPᵀ = V_g·dOᵀ       4 × m64n128k16, A = V, B = dO
 *   Pᵀ, dSᵀ in fp32 registers (exp2 with scale·log2 e folded in), packed to bf16 A fragments in registers
 *   dSᵀ -> smem [key][query] (two 64-query halves) before the next two products: the other group's dQ waits for it
 *   dV += Pᵀ·dO         8 × m64n64k16, A = Pᵀ (registers), B = dO (smem, N-major: the transpose bit)
 *   dK += dSᵀ·Q         8 × m64n64k16, A = dSᵀ (registers), B = Q (N-major)
 *   dQ[64g.., :] = dS·K 8 × m64n64k16 over the 128 keys (both groups' dSᵀ rows), A = half g of dSᵀ (M-major), B = K
 *                       (N-major); issued at the start of the NEXT step, added to dq_accum while that step's Sᵀ runs:
 *                       each warp stages its 16 rows in shared memory and adds them with one 4 KB bulk reduce-add
 *                       (cp.reduce.async.bulk) into the head-major dq_accum of attention_wgmma_bwd.h.
 * Every shared tile has rows of 64 bf16 = 128 bytes stored with the 128-byte swizzle (CUTLASS Swizzle<3,4,3>: the
 * 16-byte chunk index, address bits [4,7), is XORed with the row index mod 8, bits [7,10)), 1024-byte aligned, so one
 * buffer serves as a K-major operand ([row][d] with d the reduction) and as an MN-major one ([k][n] with the rows the
 * reduction) — the layouts of the PTX ISA "Shared Memory Matrix Layout" section (canonical layouts
 * ((8,m),(T,2k)):((8T,SBO),(1,T)) K-major and ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)) MN-major, T = 8 bf16).
 *
 * Pipeline: the producer warp copies Q, dO, lse and delta of each step (cp.async, zero-filled past the sequence) into
 * a 2-stage ring and publishes a step as soon as it has landed (mbarrier `full`); the consumers hand a stage back
 * (`empty`) once dV and dK have read it. The dSᵀ exchange between the warpgroups goes through two more mbarrier pairs
 * (ds_full / ds_empty per dSᵀ stage), so a warpgroup may run up to one step ahead of the other and one's exp/dS work
 * overlaps the other's wgmmas. There is no block barrier in the loop. The ring, and the dSᵀ stages, run on across a
 * block's items (their phases count the block's steps). Between items the consumers meet once (named barrier): both
 * groups' last dQ has read K, so the next item's K and V are queued and land while the finished item's last dQ adds
 * and dK / dV stores go out.
 *
 * History (docs/kernels/attention_wgmma_bwd.md): round 1 (64-query steps, two block barriers per step) and round 2
 * (the producer warp and mbarriers, 64-query steps, dQ split by columns with red.global.add.v4) were replaced in
 * session 5 by this kernel (128-query steps, dQ split by rows, bulk reduce-adds); both were measured beside it first.
 *
 * Tails: the tile's keys past the sequence end and the last step's queries past it are zero-filled on load and their
 * P is set to 0 (masks on those steps only), so their dQ rows are exact zeros; the one write outside [seq_begin,
 * seq_end) is those zeros, added onto the (up to 15) dq_accum rows after a sequence's last query, which belong to the
 * next sequence or to the pad (a no-op on the sum). The sm_80 pass
 * compiles an empty kernel body; mb_attention_wgmma_backward_supports refuses anything but an sm_90a binary. */
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "attention_wgmma_bwd.h"
#include "ops.h" /* mb_bf16 host conversions (self-test) */
#include "wgmma.cuh"

extern "C" {
#include "common/rng.h" /* a C header without extern "C" guards of its own */
}

namespace {

constexpr int kHeadDim = 64;
constexpr int kBlockKeys = kWgmmaBackwardTile; /* 128 keys per block */
constexpr int kGroupKeys = 64;                 /* keys per consumer warpgroup (the M of every wgmma) */
constexpr int kStepQueries = kWgmmaBackwardStep; /* queries per step */
constexpr int kSteps16 = kStepQueries / 16;    /* k-steps of the dV and dK products */
constexpr int kScores = kStepQueries / 2;      /* Sᵀ or dPᵀ elements per thread: 64 × 128 over a warpgroup */
static_assert(kSteps16 * 16 == kStepQueries && kScores == 8 * kSteps16, "whole k-steps, 8 elements per k-step");
constexpr int kRowBytes = kHeadDim * 2;        /* one tile row: 64 bf16 = one 128-byte swizzle row */
constexpr int kSwizzleAtom = 8 * kRowBytes;    /* 8 rows: the 1024-byte repeat of the 128-byte swizzle */
constexpr uint32_t kKeyTileBytes = kBlockKeys * kRowBytes, kStepTileBytes = kStepQueries * kRowBytes;
constexpr uint32_t kDsStageBytes = 2 * kKeyTileBytes; /* dSᵀ: two [128 keys][64 queries] halves */
constexpr int kStages = 2; /* Q / dO / lse / delta ring; each step is published as soon as it lands (3: no faster) */

constexpr int kConsumerThreads = 2 * 128;        /* warpgroups 0 and 1 */
constexpr int kThreads = kConsumerThreads + 128; /* + the producer warpgroup (warp 8 copies, 9..11 leave) */
constexpr int kProducerWarp = kConsumerThreads / mb::kWarpSize;
/* setmaxnreg split as the forward (FA3's for two consumer warpgroups): 384 threads start at 168 registers; the
 * producer group drops to 24 and frees exactly what the consumers' rise to 240 takes. */
constexpr int kLaunchRegisters = 65536 / kThreads / 8 * 8; /* 168: what __launch_bounds__(384, 1) gives */
constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;
static_assert((kLaunchRegisters - kProducerRegisters) * 128 ==
                  (kConsumerRegisters - kLaunchRegisters) * kConsumerThreads,
              "the consumers' setmaxnreg.inc must be covered by the producer's dec");

/* dQ staging for the bulk reductions: per consumer warp its 16 rows of 64 fp32 exactly as the head-major dq_accum
 * holds them (256-byte rows, 32-byte blocks permuted by token % 4: the 8 rows a warp's 64-bit stores touch at once
 * fall into disjoint bank ranges, two wavefronts per store). */
constexpr uint32_t kDqRowBytes = kHeadDim * 4, kDqWarpBytes = 16 * kDqRowBytes;

/* Shared memory, byte offsets from a 1024-byte aligned base. */
constexpr uint32_t kTileK = 0;                                   /* K [128 keys][64 d] */
constexpr uint32_t kTileV = kTileK + kKeyTileBytes;              /* V [128 keys][64 d] */
constexpr uint32_t kTileQ = kTileV + kKeyTileBytes;              /* Q [stage][128 queries][64 d] */
constexpr uint32_t kTileDO = kTileQ + kStages * kStepTileBytes;  /* dO [stage][128 queries][64 d] */
constexpr uint32_t kTileDS = kTileDO + kStages * kStepTileBytes; /* dSᵀ [2][half][128 keys][64 queries] */
constexpr uint32_t kLse = kTileDS + 2 * kDsStageBytes;           /* lse [stage][128] fp32 */
constexpr uint32_t kDelta = kLse + kStages * kStepQueries * 4;   /* delta [stage][128] fp32 */
constexpr uint32_t kBarriers = kDelta + kStages * kStepQueries * 4; /* full[S] empty[S] ds_full[2] ds_empty[2] */
constexpr uint32_t kSplitFlag = kBarriers + 8 * (2 * kStages + 4); /* int: this piece is its item's last */
constexpr uint32_t kDqStaging = (kSplitFlag + 4 + 255) / 256 * 256; /* [8 warps][16][256 B] */
constexpr uint32_t kSharedUsed = kDqStaging + 8 * kDqWarpBytes;
constexpr size_t kSharedBytes = kSharedUsed + kSwizzleAtom; /* slack to align the base to 1024 bytes */
static_assert(kTileQ % kSwizzleAtom == 0 && kTileDO % kSwizzleAtom == 0 && kTileDS % kSwizzleAtom == 0 &&
                  kDqStaging % kDqRowBytes == 0 && kDqRowBytes == 256 &&
                  kStepTileBytes % kSwizzleAtom == 0 && kBarriers % 8 == 0 && kBlockKeys == 2 * kGroupKeys &&
                  kProducerWarp * mb::kWarpSize == kConsumerThreads && kSharedBytes <= 227 * 1024,
              "swizzled tiles on 1024-byte boundaries, mbarriers on 8, inside the 227 KB an sm_90 block may use");

/* Everything the kernel reads besides the plan. */
struct backward_args {
    mb::bf16 *dqkv;
    float *dq_accum;
    const mb::bf16 *dout, *qkv;
    const float *lse, *delta;
    const int32_t *cu_seqlens;
    query_rows queries; /* their rows also index dout, lse, delta and dq_accum */
    int num_seqs, heads;
    size_t dq_rows; /* rows per head of dq_accum: mb_wgmma_dq_rows(n) */
    float scale, scale_log2;
    const float2 *rope; /* RoPE's backward on dK in its store (table of mb_cuda_rope_table), or nullptr */
    wgmma_split split;  /* the tail split (attention_wgmma_bwd.h); words == nullptr: none */
};

/* The device helpers exist in the host and sm_90a passes only: the sm_80 pass compiles empty kernel bodies. */
#if MB_WGMMA_SM90 || !defined(__CUDA_ARCH__)

/* ---- tile products (one warpgroup; the accumulator layout, PTX ISA figure "WGMMA .m64nNk16 register fragment layout
 * for accumulator matrix D": warp w of the group owns rows 16w..16w+15; element 4j + e of a thread is row
 * 16w + lane/4 + 8·(e/2), column 8j + 2·(lane%4) + (e%2) — per 8-column block the layout of mma.sync m16n8) ---- */

/* acc[64 × 64] += A·Y: A [64 × 128] in registers (a[k-step], pack_a_fragments), Y = [128 k rows][64 n] at y read
 * N-major (transpose bit); k-step kk starts 16 rows (2048 bytes) further. Used for dV += Pᵀ·dO and dK += dSᵀ·Q. */
__device__ __forceinline__ void issue_accumulate(float (&acc)[32], const uint32_t (&a)[kSteps16][4], uint32_t y) {
    const uint64_t descriptor_y = sw128_descriptor(y);
#pragma unroll
    for (int kk = 0; kk < kSteps16; kk++)
        wgmma_m64n64_rs<1>(acc, a[kk], descriptor_y + descriptor_offset(16 * kRowBytes * kk), 1);
}

/* bf16 A fragments of a 64 × 128 accumulator for the next product (register-A wgmma, PTX ISA figure "WGMMA .m64nNk16
 * register fragment layout for matrix A"): k-step kk covers accumulator columns 16kk..16kk+15, i.e. elements
 * 8kk..8kk+7: {row r, cols c, c+1}, {row r+8, ...}, {row r, cols c+8, c+9}, {row r+8, ...}. */
__device__ __forceinline__ void pack_a_fragments(uint32_t (&a)[kSteps16][4], const float (&acc)[kScores]) {
#pragma unroll
    for (int kk = 0; kk < kSteps16; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++) a[kk][r] = mb::pack_bf16x2(acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]);
}

/* The thread's place in a warpgroup's accumulators: first row (16·warp + lane/4) and first column (2·(lane%4)). */
struct fragment_position {
    int row, col;
};

__device__ __forceinline__ fragment_position my_fragment() {
    int lane = threadIdx.x % mb::kWarpSize, warp = (threadIdx.x / mb::kWarpSize) % 4;
    return {16 * warp + lane / 4, 2 * (lane % 4)};
}

/* ---- the backward's elementwise steps ---- */

/* Queues rows [r0, r0 + kRows) of a [*, 64] bf16 slice (row stride in elements) into a swizzled tile; rows >= r_end
 * become zeros (their source address is the slice start, never read). */
template <int kRows>
__device__ __forceinline__ void load_tile_async(char *tile, const mb::bf16 *src, size_t row_stride, int r0, int r_end) {
    for (int c = threadIdx.x; c < kRows * 8; c += kConsumerThreads) {
        int r = c / 8, chunk = c % 8;
        bool valid = r0 + r < r_end;
        const mb::bf16 *from = valid ? src + (size_t)(r0 + r) * row_stride + chunk * 8 : src;
        cp_async_16(tile + swizzled_offset(r, chunk), from, valid);
    }
}

/* Pᵀ = exp2(Sᵀ·scale·log2 e − lse·log2 e) in place; with kMask, entries of keys >= key_end or queries >= query_hi
 * become 0. key0 = the thread's first key, query0 = the step's first query. The mask is a template argument, taken
 * by a block-uniform branch (probabilities_masked_if): as a run-time flag ptxas computed it for every element and
 * selected (~100 of a step's 870 instructions per warp, ncu, session 4). */
template <bool kMask>
__device__ __forceinline__ void probabilities(float (&s)[kScores], const float *lse_tile, fragment_position f,
                                              float scale_log2, int key0, int key_end, int query0, int query_hi) {
#pragma unroll
    for (int j = 0; j < kScores / 4; j++) {
        const float2 lse = *reinterpret_cast<const float2 *>(lse_tile + 8 * j + f.col);
        const float shift[2] = {lse.x * kLog2e, lse.y * kLog2e};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = fast_exp2(fmaf(s[4 * j + e], scale_log2, -shift[e & 1]));
            if (kMask) {
                int key = key0 + 8 * (e >> 1), query = query0 + 8 * j + f.col + (e & 1);
                if (key >= key_end || query >= query_hi) p = 0.0f;
            }
            s[4 * j + e] = p;
        }
    }
}

/* probabilities<true> on tail steps (`mask`, uniform over the block), probabilities<false> on all others. */
__device__ __forceinline__ void probabilities_masked_if(bool mask, float (&s)[kScores], const float *lse_tile,
                                                        fragment_position f, float scale_log2, int key0, int key_end,
                                                        int query0, int query_hi) {
    if (mask)
        probabilities<true>(s, lse_tile, f, scale_log2, key0, key_end, query0, query_hi);
    else
        probabilities<false>(s, lse_tile, f, scale_log2, key0, key_end, query0, query_hi);
}

/* dSᵀ = Pᵀ ∘ (dPᵀ − delta) in place in dp. */
__device__ __forceinline__ void score_gradients(float (&dp)[kScores], const float (&p)[kScores],
                                                const float *delta_tile, fragment_position f) {
#pragma unroll
    for (int j = 0; j < kScores / 4; j++) {
        const float2 delta = *reinterpret_cast<const float2 *>(delta_tile + 8 * j + f.col);
#pragma unroll
        for (int e = 0; e < 4; e++) dp[4 * j + e] = p[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? delta.y : delta.x));
    }
}

/* dSᵀ A fragments -> the swizzled [key][query] tiles of the step, 128 queries as two halves of 64 (rows: the
 * warp's 16 keys from warp_row0 = the group's first key row + 16·warp). Fragment a[kk][r] is an 8 × 8 bf16 matrix in
 * the mma layout: rows lane/4 (+8 for odd r) of the warp's 16, query columns 8·(2kk + r/2) + 2·(lane%4), +1. One
 * stmatrix.x4 per k-step stores all four (lane l gives the address of row l % 8 of matrix l / 8; the swizzle keeps
 * the 8 rows of a matrix in 8 different 16-byte chunks: no bank conflicts): 8 instructions instead of 32 32-bit
 * stores. */
__device__ __forceinline__ void store_score_gradients(char *ds_tile, const uint32_t (&a)[kSteps16][4], int warp_row0) {
    const int lane = threadIdx.x % mb::kWarpSize, matrix = lane / 8;
    const int row = warp_row0 + lane % 8 + 8 * (matrix & 1);
    const uint32_t tiles = shared_address(ds_tile);
#pragma unroll
    for (int kk = 0; kk < kSteps16; kk++) {
        const int chunk = 2 * kk + (matrix >> 1);
        const uint32_t address = tiles + (chunk >> 3) * kKeyTileBytes + swizzled_offset(row, chunk & 7);
#if MB_WGMMA_SM90
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
                     "r"(a[kk][0]), "r"(a[kk][1]), "r"(a[kk][2]), "r"(a[kk][3])
                     : "memory");
#else
        (void)address;
#endif
    }
}

/* Rows key0 (+8) of a 64 × 64 accumulator, times scale, as bf16 pairs into a [*, 64] slice (row stride in elements);
 * keys >= key_end are skipped. With a rope table (uniform), RoPE's backward on each row first: columns d and d + 32
 * are blocks j and j + 4 of the same thread (rope_back). */
__device__ __forceinline__ void store_key_rows(mb::bf16 *slice, size_t row_stride, const float (&acc)[32], int key0,
                                               int key_end, int col, float scale, const float2 *rope) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
        int key = key0 + 8 * half;
        if (key >= key_end) continue;
        mb::bf16 *row = slice + (size_t)key * row_stride;
        if (rope != nullptr) {
            const float2 *angles = rope + (size_t)key * (kHeadDim / 2);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float x1[2], x2[2];
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    x1[c] = acc[4 * j + 2 * half + c] * scale;
                    x2[c] = acc[4 * (j + 4) + 2 * half + c] * scale;
                    rope_back(x1[c], x2[c], angles[8 * j + col + c]);
                }
                *reinterpret_cast<mb::bf162 *>(row + 8 * j + col) = __floats2bfloat162_rn(x1[0], x1[1]);
                *reinterpret_cast<mb::bf162 *>(row + 32 + 8 * j + col) = __floats2bfloat162_rn(x2[0], x2[1]);
            }
            continue;
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
            *reinterpret_cast<mb::bf162 *>(row + 8 * j + col) =
                __floats2bfloat162_rn(acc[4 * j + 2 * half] * scale, acc[4 * j + 2 * half + 1] * scale);
    }
}

__device__ __forceinline__ char *aligned_shared(uint4 *raw) {
    uint32_t address = shared_address(raw);
    return reinterpret_cast<char *>(raw) + ((kSwizzleAtom - address % kSwizzleAtom) % kSwizzleAtom);
}

/* Where work index w of the grid lies: an item of the plan, or a piece of a split tail item (attention_wgmma_bwd.h):
 * its tile, head and queries. Piece p of P takes the item's query steps p, p + P, p + 2P, ...: queries from query_lo
 * (the sequence's first + 128·p) below query_hi (the sequence's end) in strides of 128·P. The tail's work indices
 * are piece-major (w = first + p·t + k for tail item first + k), so neither mapping divides. */
struct work_position {
    tile_position t;
    int head, query_lo, query_hi, query_stride;
    int piece, pieces, slot; /* slot: the item's place k in the tail (its counter and partials) */
};

/* What a block knows about its tile, fixed over the query loop: the work item (work_position, from consumer_tile)
 * and what the consumers derive from it once. */
struct block_context {
    work_position item;
    int hidden, steps, key_a; /* key_a: this thread's first key (the other: key_a + 8) */
    bool tail_keys;           /* the tile ends before 128 keys: mask every step */
    uint32_t base, k_rows, v_rows; /* shared addresses */
    float *dq_head;                /* the head's [dq_rows][64] block of dq_accum */
    fragment_position f;
    int group;
};

/* ---- the producer warp and the mbarrier ring ---- */

/* mbarrier addresses (shared::cta). Arrival counts: full = the producer's 32 lanes (each publishes its own
 * cp.async); empty and ds_empty = the 8 consumer warps (write-after-read only: one lane per warp after the warp's
 * wgmma reads completed); ds_full = the 256 consumer threads (each publishes its own dSᵀ stores). */
struct ring {
    uint32_t full, empty, ds_full, ds_empty;
};

/* Named barrier 1 over the two consumer warpgroups (barrier 0 is __syncthreads; the producer never joins). */
__device__ __forceinline__ void consumers_sync() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
}

/* The split's first work index (attention_wgmma_bwd.h), or UINT_MAX without a split. Read once a block is past its
 * first item: a split tail starts at or after item gridDim.x. */
__device__ __forceinline__ unsigned split_first(const backward_args &a) {
    if (a.split.words == nullptr || __ldg(a.split.words + 1) < 2) return UINT_MAX;
    return (unsigned)__ldg(a.split.words);
}

/* Tile, head and queries of item `item` as a whole item (piece 0 of 1); false past the last item. */
__device__ __forceinline__ bool item_at(unsigned item, work_position *p, const backward_args &a,
                                        const mb::attention_plan &plan) {
    if (!find_tile_at(item, &p->t, &p->head, plan.seq_first, plan.tile_seq, a.cu_seqlens, a.num_seqs, a.heads,
                      kBlockKeys))
        return false;
    p->query_lo = a.queries.cu_queries[p->t.seq];
    p->query_hi = a.queries.cu_queries[p->t.seq + 1];
    p->query_stride = kStepQueries;
    p->piece = 0, p->pieces = 1, p->slot = 0;
    return true;
}

/* Work index w as a whole item: false past the last item and at or past the split's first index. */
__device__ __forceinline__ bool whole_item_at(unsigned w, work_position *p, const backward_args &a,
                                              const mb::attention_plan &plan) {
    if (w >= gridDim.x && w >= split_first(a)) return false;
    return item_at(w, p, a, plan);
}

/* Work index w >= the split's first as a piece (the tail's indices are piece-major, w = first + p·t + k for tail item
 * first + k, so nothing divides); false past the tail's pieces or without a split. */
__device__ __forceinline__ bool piece_at(unsigned w, work_position *p, const backward_args &a,
                                         const mb::attention_plan &plan) {
    const unsigned first = split_first(a);
    if (w < first || first == UINT_MAX) return false;
    static_assert(kWgmmaSplitMaxPieces <= 4, "the piece of a work index is found by three comparisons");
    const unsigned pieces = (unsigned)__ldg(a.split.words + 1), tail = (unsigned)__ldg(a.split.words + 3);
    const unsigned j = w - first;
    if (j >= pieces * tail) return false;
    const int piece = (int)(j >= tail) + (int)(j >= 2 * tail) + (int)(j >= 3 * tail);
    const unsigned k = j - piece * tail;
    if (!item_at(first + k, p, a, plan)) return false;
    p->query_lo += piece * kStepQueries; /* steps piece, piece + P, ...: the plan gave each tail item >= P steps */
    p->query_stride = (int)pieces * kStepQueries;
    p->piece = piece, p->pieces = (int)pieces, p->slot = (int)k;
    return true;
}

/* The producer warp, one work item's (or piece's) query steps: step i goes to stage i % kStages once the consumers
 * released its previous use (step i − kStages) and is published (its cp.async complete, proxy fence, 32 arrivals on
 * `full`) as soon as it has landed. With two stages the consumers work on step i − 1 meanwhile. (Round 2 published
 * one step late with three stages; publishing later than that measured slower in both kernels.) `step` counts the
 * block's steps over all its items. */
__device__ __forceinline__ void produce_item(char *smem, const ring &b, const backward_args &a, const work_position &p,
                                             int &step) {
    const int hidden = a.heads * kHeadDim, head = p.head, query_hi = p.query_hi, query_stride = p.query_stride;
    const mb::bf16 *q = a.queries.q + head * kHeadDim, *g = a.dout + head * kHeadDim;
    for (int q0 = p.query_lo; q0 < query_hi; q0 += query_stride, step++) { /* none: the consumers skip it too */
        const int stage = step % kStages;
        if (step >= kStages) mbarrier_wait(b.empty + 8 * stage, ((step / kStages) - 1) & 1);
        warp_load_rows<kStepQueries>(smem + kTileQ + stage * kStepTileBytes, q, (size_t)a.queries.q_stride, q0,
                                     query_hi);
        warp_load_rows<kStepQueries>(smem + kTileDO + stage * kStepTileBytes, g, hidden, q0, query_hi);
        warp_load_floats<kStepQueries>(reinterpret_cast<float *>(smem + kLse) + stage * kStepQueries, a.lse + head,
                                       a.heads, q0, query_hi);
        warp_load_floats<kStepQueries>(reinterpret_cast<float *>(smem + kDelta) + stage * kStepQueries,
                                       a.delta + head, a.heads, q0, query_hi);
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();
        mbarrier_arrive(b.full + 8 * stage);
    }
}

/* The producer: the block's whole items, then its piece of the split tail if it has one (a piece is a block's last
 * work: the tail's t·P pieces fit in one round). */
__device__ void produce(char *smem, const ring &b, const backward_args &a, const mb::attention_plan &plan) {
    int step = 0; /* the block's step count over all its tiles: the ring's stages and phases run on across tiles */
    unsigned w = blockIdx.x;
    work_position p;
    for (; whole_item_at(w, &p, a, plan); w += gridDim.x) produce_item(smem, b, a, p, step);
    if (piece_at(w, &p, a, plan)) produce_item(smem, b, a, p, step);
}

/* ---- the products of a 128-query step ---- */

/* acc[64 × 128] = X·Yᵀ over d: X = 64 rows at x, Y = 128 rows at y, both K-major swizzled tiles (k-step ks starts
 * 32 bytes further into each row). Sᵀ = K_g·Qᵀ and dPᵀ = V_g·dOᵀ. */
__device__ __forceinline__ void issue_scores(float (&acc)[kScores], uint32_t x, uint32_t y) {
    const uint64_t descriptor_x = sw128_descriptor(x), descriptor_y = sw128_descriptor(y);
    wgmma_m64n128_ss_first<0, 0>(acc, descriptor_x, descriptor_y);
#pragma unroll
    for (int ks = 1; ks < kHeadDim / 16; ks++)
        wgmma_m64n128_ss<0, 0>(acc, descriptor_x + descriptor_offset(32 * ks),
                               descriptor_y + descriptor_offset(32 * ks), 1);
}

/* acc[64 queries × 64 d] = dS[queries][keys]·K over the 128 keys: A = one dSᵀ half [128 keys][64 queries] at
 * ds_half read M-major, B = the K tile [128 keys][64 d] read N-major; k-step kk = keys 16kk.. (+2048 bytes). */
__device__ __forceinline__ void issue_dq_rows(float (&acc)[32], uint32_t ds_half, uint32_t k_tile) {
    const uint64_t descriptor_ds = sw128_descriptor(ds_half), descriptor_k = sw128_descriptor(k_tile);
    wgmma_m64n64_ss_first<1, 1>(acc, descriptor_ds, descriptor_k);
#pragma unroll
    for (int kk = 1; kk < kBlockKeys / 16; kk++)
        wgmma_m64n64_ss<1, 1>(acc, descriptor_ds + descriptor_offset(16 * kRowBytes * kk),
                              descriptor_k + descriptor_offset(16 * kRowBytes * kk), 1);
}

/* The block's shared addresses for step i (stage i % kStages). */
struct step_tiles {
    uint32_t q, dout;
    const float *lse, *delta;
    __device__ step_tiles(char *smem, uint32_t base, int stage) {
        q = base + kTileQ + stage * kStepTileBytes;
        dout = base + kTileDO + stage * kStepTileBytes;
        lse = reinterpret_cast<const float *>(smem + kLse) + stage * kStepQueries;
        delta = reinterpret_cast<const float *>(smem + kDelta) + stage * kStepQueries;
    }
};

/* dQ(step) for this warpgroup's 64 query rows, queued as one commit group once both groups' dSᵀ(step) are stored. */
__device__ __forceinline__ void issue_step_dq(int step, const block_context &c, const ring &b, float (&dq)[32]) {
    const int ds_stage = step & 1;
    mbarrier_wait(b.ds_full + 8 * ds_stage, (step >> 1) & 1);
    wgmma_fence();
    issue_dq_rows(dq, c.base + kTileDS + ds_stage * kDsStageBytes + c.group * kKeyTileBytes, c.base + kTileK);
    wgmma_commit();
}

/* ---- dQ into dq_accum: bulk reduce-adds of staged rows ---- */

/* One bulk reduce-add of `bytes` (multiple of 16) fp32 values from shared memory onto global memory (TMA engine,
 * PTX "cp.reduce.async.bulk"), committed as this thread's next bulk group. */
__device__ __forceinline__ void bulk_reduce_add(float *global, uint32_t shared, uint32_t bytes) {
#if MB_WGMMA_SM90
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(global),
                 "r"(shared), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}

/* Waits until this thread's bulk operations have read their shared-memory sources (the staging may be rewritten). */
__device__ __forceinline__ void bulk_wait_reads() {
#if MB_WGMMA_SM90
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}

/* Two fp32 values to a shared address (8-byte aligned). */
__device__ __forceinline__ void store_shared_f32x2(uint32_t address, float x, float y) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(address), "f"(x), "f"(y) : "memory");
}

/* dq_accum[rows query0 + 0..63 of this warpgroup, the head's 64 columns] += acc (this warpgroup's dQ accumulator).
 * Each warp stages its own 16 rows (row = 16·warp + lane/4 (+8), 64-bit stores) in the byte layout of the head-major
 * dq_accum (attention_wgmma_bwd.h: 32-byte block j of token t at block j ^ (t % 4)) and lane 0 adds all 16 rows with
 * one 4 KB bulk reduce-add; rows past the sequence hold exact zeros (their P was masked), and a warp whose first row
 * is past it adds nothing. Nothing is shared between warps, so a __syncwarp orders the stores before the bulk read,
 * and lane 0 waits for its previous bulk's reads before the staging is rewritten.
 * (Session 5 laid dq_accum out as [n, H]: 16 bulk adds of one 256-byte row per warp, which ptxas issues one lane
 * after another (ELECT, R2UR, UBLKRED per row; ~18 % of the stall samples in ncu). Round 2's per-thread
 * red.global.add.v4 after a lane-pair exchange took 27 %.) */
__device__ __forceinline__ void add_dq(char *smem, const block_context &c, const float (&acc)[32], int query0) {
    const int lane = threadIdx.x % mb::kWarpSize, warp = threadIdx.x / mb::kWarpSize;
    char *staging = smem + kDqStaging + warp * kDqWarpBytes;
    const int row0 = query0 + 16 * (warp % 4);
    if (lane == 0) bulk_wait_reads();
    __syncwarp();
    /* Block j of the thread's row lane/4 goes to byte (32·j) ^ (32·key) + 4·col of the row: the row's address has bits
     * 5..7 clear (256-byte rows from a 256-aligned staging, 4·col < 32), so the block's address is one LOP3,
     * (row | 32·j) ^ 32·key, and row + 8 (the same token % 4) is 2048 bytes further. */
    const uint32_t row = shared_address(staging) + (lane / 4) * kDqRowBytes + c.f.col * 4;
    const uint32_t key_bits = 32u * (uint32_t)((row0 + lane / 4) % 4);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const uint32_t block = (row | (32u * j)) ^ key_bits;
#pragma unroll
        for (int half = 0; half < 2; half++)
            store_shared_f32x2(block + half * 8 * kDqRowBytes, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
    }
    fence_proxy_async();
    __syncwarp();
    if (lane == 0 && row0 < c.item.query_hi)
        bulk_reduce_add(c.dq_head + (size_t)row0 * kHeadDim, shared_address(staging), kDqWarpBytes);
}

/* One consumer step i (warpgroup g = keys 64g..64g+63 of the tile). Commit groups, in order: [dQ(i−1)], Sᵀ(i),
 * dPᵀ(i), dV(i), dK(i), each waited for inside this call (ptxas serializes every wgmma, C7514, when an accumulator of
 * a group committed in an earlier loop iteration is read after a partial wait).
 * Registers: Sᵀ and dPᵀ are 64 fp32 each, dK and dV 32 each, 192 live while a step's scores are worked on; so dQ(i−1)
 * (32 more) is issued BEFORE Sᵀ(i) and added to dq_accum before dPᵀ(i) is issued, and Pᵀ and dSᵀ are packed to bf16
 * only after both are formed in fp32 (the fp32 and bf16 copies are never live together).
 * Cross-warpgroup traffic:
 *   dQ(i−1) reads both groups' dSᵀ(i−1): wait ds_full[(i−1)&1] (phase (i−1)>>1);
 *   dSᵀ(i) overwrites the stage that dQ(i−2) of both groups read: wait ds_empty[i&1] (phase (i−2)>>1);
 *   the Q/dO stage i % kStages goes back to the producer once dV(i) and dK(i) are done (empty).
 * A group can thus run up to about one step ahead of the other, never two (a barrier's next phase needs the slower
 * group's arrivals, which come after its wait of the current phase), so the parity waits are unambiguous. */
template <bool kHasPrevious>
__device__ __forceinline__ void consume_step(int i, int step, char *smem, const backward_args &a,
                                             const block_context &c, const ring &b, float (&s)[kScores],
                                             float (&dp)[kScores], float (&dk)[32], float (&dv)[32], float (&dq)[32]) {
    const int q0 = c.item.query_lo + i * c.item.query_stride, stage = step % kStages, ds_stage = step & 1;
    if (kHasPrevious) issue_step_dq(step - 1, c, b, dq);
    mbarrier_wait(b.full + 8 * stage, (step / kStages) & 1);
    const step_tiles t(smem, c.base, stage);

    wgmma_fence();
    issue_scores(s, c.k_rows, t.q); /* Sᵀ */
    wgmma_commit();
    if (kHasPrevious) {
        wgmma_wait<1>(); /* dQ(i−1); Sᵀ may still run */
        fence_registers(dq);
        add_dq(smem, c, dq, q0 - c.item.query_stride + kGroupKeys * c.group);
        warp_arrive(b.ds_empty + 8 * (ds_stage ^ 1));
    }
    wgmma_fence();
    issue_scores(dp, c.v_rows, t.dout); /* dPᵀ */
    wgmma_commit();
    wgmma_wait<1>(); /* Sᵀ */
    fence_registers(s);
    const bool mask = c.tail_keys || q0 + kStepQueries > c.item.query_hi; /* uniform */
    probabilities_masked_if(mask, s, t.lse, c.f, a.scale_log2, c.key_a, c.item.t.end, q0, c.item.query_hi);
    wgmma_wait<0>(); /* dPᵀ */
    fence_registers(dp);
    score_gradients(dp, s, t.delta, c.f);
    uint32_t p_frag[kSteps16][4], ds_frag[kSteps16][4];
    pack_a_fragments(p_frag, s);
    pack_a_fragments(ds_frag, dp);
    /* dSᵀ(i) goes to shared memory before dV and dK are issued: the other group's dQ(i) waits for it (ds_full), and
     * storing it behind the two products kept that group waiting (session 13: 4.94 -> 4.78 ms at 8192) */
    if (step >= 2) mbarrier_wait(b.ds_empty + 8 * ds_stage, ((step - 2) >> 1) & 1);
    const int warp_row0 = c.group * kGroupKeys + c.f.row - c.f.row % 16; /* the warp's first key row in the tile */
    store_score_gradients(smem + kTileDS + ds_stage * kDsStageBytes, ds_frag, warp_row0);
    fence_proxy_async();
    mbarrier_arrive(b.ds_full + 8 * ds_stage);
    wgmma_fence();
    issue_accumulate(dv, p_frag, t.dout); /* dV += Pᵀ·dO */
    wgmma_commit();
    issue_accumulate(dk, ds_frag, t.q); /* dK += dSᵀ·Q (unscaled) */
    wgmma_commit();
    wgmma_wait<0>(); /* this step's reads of Q, dO and the P / dS fragments are done */
    fence_registers(dv);
    fence_registers(dk);
    fence_registers(p_frag);
    fence_registers(ds_frag);
    warp_arrive(b.empty + 8 * stage);
}

/* Asks L1 for the RoPE angles of the warpgroup's 64 keys (thread k: the 128-byte line k % 2 of key k / 2; a key's 32
 * angles are 256 bytes) one step before the dK store, so that the store does not wait a DRAM round trip with the SM
 * idle (H200, in-step: −0.23 ms per base step at 1024, −0.16 at 8192). */
__device__ __forceinline__ void prefetch_key_angles(const float2 *rope, const block_context &c) {
    const int k = threadIdx.x % 128, key = c.item.t.start + kGroupKeys * c.group + k / 2;
    if (rope != nullptr && key < c.item.t.end)
        asm volatile("prefetch.global.L1 [%0];\n" ::"l"(rope + (size_t)key * (kHeadDim / 2) + 16 * (k % 2)));
}

/* The consumers' context for the first work item of the plan at or after *w (stepping by gridDim.x) whose sequence
 * has queries (false: none is left). Items without queries (a sequence none of whose rows is asked for) are skipped
 * here and take no steps in the producer; their dK and dV rows stay as the caller left them. The fields set once per
 * block (base, group, f, hidden, k_rows, v_rows) are kept. */
__device__ __forceinline__ bool consumer_tile(block_context *c, unsigned *w, const backward_args &a,
                                              const mb::attention_plan &plan) {
    for (work_position p;; *w += gridDim.x) {
        if (!whole_item_at(*w, &p, a, plan) && !piece_at(*w, &p, a, plan)) return false;
        if (p.query_hi > p.query_lo) {
            c->item = p;
            break;
        }
    }
    c->steps = mb::ceil_div(c->item.query_hi - c->item.query_lo, c->item.query_stride);
    c->key_a = c->item.t.start + kGroupKeys * c->group + c->f.row;
    c->tail_keys = c->item.t.start + kBlockKeys > c->item.t.end;
    c->dq_head = a.dq_accum + (size_t)c->item.head * a.dq_rows * kHeadDim;
    return true;
}

/* Queues the tile's K and V rows into shared memory (all 256 consumer threads, one commit group). */
__device__ __forceinline__ void load_key_tiles(char *smem, const backward_args &a, const block_context &c) {
    const size_t qkv_stride = 3 * (size_t)c.hidden;
    const tile_position &t = c.item.t;
    load_tile_async<kBlockKeys>(smem + kTileK, a.qkv + c.hidden + c.item.head * kHeadDim, qkv_stride, t.start, t.end);
    load_tile_async<kBlockKeys>(smem + kTileV, a.qkv + 2 * c.hidden + c.item.head * kHeadDim, qkv_stride, t.start,
                                t.end);
    cp_async_commit();
}

/* The tile's dK (scaled, RoPE's backward when the table is given) and dV rows into dqkv. */
__device__ __forceinline__ void store_tile_rows(const backward_args &a, const block_context &c, const float (&dk)[32],
                                                const float (&dv)[32]) {
    const size_t qkv_stride = 3 * (size_t)c.hidden;
    const work_position &p = c.item;
    store_key_rows(a.dqkv + c.hidden + p.head * kHeadDim, qkv_stride, dk, c.key_a, p.t.end, c.f.col, a.scale, a.rope);
    store_key_rows(a.dqkv + 2 * c.hidden + p.head * kHeadDim, qkv_stride, dv, c.key_a, p.t.end, c.f.col, 1.0f,
                   nullptr);
}

/* acc[e] += part[e · 256] (a partial slot's 32 values of this thread; the 32 loads in flight together). */
__device__ __forceinline__ void add_partial(float (&acc)[32], const float *part) {
    float x[32];
#pragma unroll
    for (int e = 0; e < 32; e++) x[e] = __ldcg(part + e * kConsumerThreads);
#pragma unroll
    for (int e = 0; e < 32; e++) acc[e] += x[e];
}

/* A piece of a split tail item (attention_wgmma_bwd.h): the thread's dK and dV go to the piece's partial slot
 * ([value][thread]: coalesced) instead of dqkv. */
__device__ __forceinline__ void store_partial(const backward_args &a, const block_context &c, const float (&dk)[32],
                                              const float (&dv)[32]) {
    const work_position &p = c.item;
    float *mine = a.split.partials + ((size_t)p.slot * p.pieces + p.piece) * kWgmmaSplitSlotFloats + threadIdx.x;
#pragma unroll
    for (int e = 0; e < 32; e++) {
        __stcg(mine + e * kConsumerThreads, dk[e]);
        __stcg(mine + (32 + e) * kConsumerThreads, dv[e]);
    }
}

/* After a block's piece (its last work, partial stored): the item's last piece to arrive (its counter) sums the
 * item's partials in piece order — the same sum whichever piece arrives last — and stores the tile's dK and dV rows.
 * Every consumer thread calls it (two named barriers); it runs after the block's loop, so nothing else is live. */
__device__ __forceinline__ void finish_split_item(char *smem, const backward_args &a, const block_context &c) {
    __threadfence(); /* the partials are visible before the counter counts this piece */
    consumers_sync();
    volatile int *last = reinterpret_cast<volatile int *>(smem + kSplitFlag);
    if (threadIdx.x == 0) *last = atomicAdd(a.split.words + 4 + c.item.slot, 1) == c.item.pieces - 1;
    consumers_sync();
    if (!*last) return;
    __threadfence();
    float dk[32], dv[32];
#pragma unroll
    for (int e = 0; e < 32; e++) dk[e] = dv[e] = 0.0f;
    const float *slots = a.split.partials + (size_t)c.item.slot * c.item.pieces * kWgmmaSplitSlotFloats + threadIdx.x;
    for (int piece = 0; piece < c.item.pieces; piece++) {
        add_partial(dk, slots + (size_t)piece * kWgmmaSplitSlotFloats);
        add_partial(dv, slots + (size_t)piece * kWgmmaSplitSlotFloats + 32 * kConsumerThreads);
    }
    store_tile_rows(a, c, dk, dv);
}

/* A consumer warpgroup's loop over one tile (K and V in shared memory), then its last dQ and dK / dV rows (for a
 * piece of a split item its partials: finish_split_item sums them after the kernel's loop). `step` counts the block's
 * steps over all its tiles (the ring's and the dSᵀ stages' phases); `w` is the tile's work item. Once both groups'
 * last dQ has read K, the next item's K and V are queued (its context replaces c) and land while this tile's dq_accum
 * adds and dK / dV stores go out. Returns whether there is a next item. */
__device__ __forceinline__ bool consume_tile(char *smem, const backward_args &a, const mb::attention_plan &plan,
                                             block_context &c, const ring &b, int &step, unsigned &w) {
    float dk[32], dv[32], s[kScores], dp[kScores], dq[32];
#pragma unroll
    for (int e = 0; e < kScores; e++) s[e] = dp[e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 32; e++) dk[e] = dv[e] = dq[e] = 0.0f;
    if (c.steps == 1) prefetch_key_angles(a.rope, c);
    consume_step<false>(0, step, smem, a, c, b, s, dp, dk, dv, dq);
    for (int i = 1; i < c.steps; i++) {
        if (i == c.steps - 1) prefetch_key_angles(a.rope, c);
        consume_step<true>(i, step + i, smem, a, c, b, s, dp, dk, dv, dq);
    }
    const int last = c.steps - 1, last_step = step + last;
    issue_step_dq(last_step, c, b, dq);
    wgmma_wait<0>();
    fence_registers(dq);
    step += c.steps;
    consumers_sync(); /* both groups' wgmma reads of this tile's K and V are complete */
    w += gridDim.x;
    block_context next = c;
    const bool more = consumer_tile(&next, &w, a, plan);
    if (more) load_key_tiles(smem, a, next);
    add_dq(smem, c, dq, c.item.query_lo + last * c.item.query_stride + kGroupKeys * c.group);
    warp_arrive(b.ds_empty + 8 * (last_step & 1)); /* the dSᵀ stage of the last step is free (as in consume_step) */
    /* the staging must stay until the block's last bulk add has read it; the adds themselves land before the grid
     * completes (the next kernel reads dq_accum), as TMA stores do, so the block need not wait for them */
    if (!more && threadIdx.x % mb::kWarpSize == 0) bulk_wait_reads();
    if (c.item.pieces > 1) /* a piece: its partial; the kernel sums the item's pieces after the loop */
        store_partial(a, c, dk, dv);
    else
        store_tile_rows(a, c, dk, dv);
    c = next;
    return more;
}

#endif /* device helpers */

/* The kernel, persistent: block b takes the plan's work items b, b + gridDim.x, ... (longest sequences first).
 * Warpgroups 0 and 1 load each tile's K and V and consume it (consume_tile); warpgroup 2's first warp produces the
 * query steps of all the block's tiles into one ring. A grid of plan.blocks gives every block one item at most. */
__global__ void __launch_bounds__(kThreads, 1) wgmma_backward_kernel(backward_args a, mb::attention_plan plan) {
#if MB_WGMMA_SM90
    extern __shared__ uint4 shared_raw[];
    char *smem = aligned_shared(shared_raw);
    block_context c;
    c.base = shared_address(smem);
    const uint32_t barriers = c.base + kBarriers;
    const ring b = {barriers, barriers + 8 * kStages, barriers + 16 * kStages, barriers + 16 * kStages + 16};
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbarrier_init(b.full + 8 * s, mb::kWarpSize);
            mbarrier_init(b.empty + 8 * s, kConsumerThreads / mb::kWarpSize);
        }
        for (int s = 0; s < 2; s++) {
            mbarrier_init(b.ds_full + 8 * s, kConsumerThreads);
            mbarrier_init(b.ds_empty + 8 * s, kConsumerThreads / mb::kWarpSize);
        }
    }
    __syncthreads();
    const int warp = threadIdx.x / mb::kWarpSize;
    if (warp >= kProducerWarp) {
        registers_decrease<kProducerRegisters>();
        if (warp == kProducerWarp) produce(smem, b, a, plan);
    } else {
        registers_increase<kConsumerRegisters>();
        c.hidden = a.heads * kHeadDim;
        c.group = threadIdx.x / 128;
        c.f = my_fragment();
        c.k_rows = c.base + kTileK + c.group * kGroupKeys * kRowBytes;
        c.v_rows = c.base + kTileV + c.group * kGroupKeys * kRowBytes;
        unsigned w = blockIdx.x;
        if (!consumer_tile(&c, &w, a, plan)) return;
        load_key_tiles(smem, a, c);
        int step = 0;
        do {
            cp_async_wait<0>();
            fence_proxy_async();
            consumers_sync(); /* K and V of both groups' threads are in shared memory */
        } while (consume_tile(smem, a, plan, c, b, step, w));
        if (c.item.pieces > 1) finish_split_item(smem, a, c); /* c: the block's last work, a piece */
    }
#endif
}

/* ---- self-test part 1: the three tile products on exact inputs ---- */

/* The small integers of exact_value (host), for A fragments built on the device. */
[[maybe_unused]] __device__ __forceinline__ float exact_value_device(int row, int col, int salt) {
    return (float)(((row * 7 + col * 3 + salt) % 17) - 8) / 16.0f;
}

/* The kernel's products. x, y: [128][64] bf16, z: [128][128] bf16. Group g writes out_scores [128][128] rows 64g.. =
 * X[64g..]·Yᵀ (m64n128, both K-major); out_accumulate [128][64] rows 64g.. = A·Y with A[r][k] = exact_value(r, k, 3)
 * over 128 k (register A, 8 k-steps, N-major Y); out_dq [128][64] rows 64g.. = Z[:, 64g..]ᵀ·X (M-major A = the
 * second index of Z, N-major X). */
__global__ void __launch_bounds__(kConsumerThreads, 1)
    wgmma_products_kernel(float *out_scores, float *out_accumulate, float *out_dq, const mb::bf16 *x,
                             const mb::bf16 *y, const mb::bf16 *z) {
#if MB_WGMMA_SM90
    extern __shared__ uint4 shared_raw[];
    char *smem = aligned_shared(shared_raw);
    constexpr uint32_t kX = 0, kY = kKeyTileBytes, kZ = 2 * kKeyTileBytes; /* Z: two [128][64] halves */
    load_tile_async<kBlockKeys>(smem + kX, x, kHeadDim, 0, kBlockKeys);
    load_tile_async<kBlockKeys>(smem + kY, y, kHeadDim, 0, kBlockKeys);
    load_tile_async<kBlockKeys>(smem + kZ, z, 2 * kHeadDim, 0, kBlockKeys);
    load_tile_async<kBlockKeys>(smem + kZ + kKeyTileBytes, z + kHeadDim, 2 * kHeadDim, 0, kBlockKeys);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    const int group = threadIdx.x / 128;
    const fragment_position f = my_fragment();
    const uint32_t base = shared_address(smem);
    float s[kScores], acc[32], dq[32];
#pragma unroll
    for (int i = 0; i < kScores; i++) {
        int row = group * kGroupKeys + f.row + 8 * ((i % 4) >> 1), col = 8 * (i / 4) + f.col + (i & 1);
        s[i] = exact_value_device(row, col, 3); /* A in the accumulator layout, as Pᵀ would be */
    }
#pragma unroll
    for (int i = 0; i < 32; i++) acc[i] = dq[i] = 0.0f;
    uint32_t a_frag[kSteps16][4];
    pack_a_fragments(a_frag, s);
    wgmma_fence();
    issue_scores(s, base + kX + group * kGroupKeys * kRowBytes, base + kY);
    wgmma_commit();
    issue_accumulate(acc, a_frag, base + kY);
    wgmma_commit();
    issue_dq_rows(dq, base + kZ + group * kKeyTileBytes, base + kX);
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(s);
    fence_registers(acc);
    fence_registers(dq);
    fence_registers(a_frag);
#pragma unroll
    for (int i = 0; i < kScores; i++) {
        int row = group * kGroupKeys + f.row + 8 * ((i % 4) >> 1), col = 8 * (i / 4) + f.col + (i & 1);
        out_scores[row * kBlockKeys + col] = s[i];
    }
#pragma unroll
    for (int i = 0; i < 32; i++) {
        int row = group * kGroupKeys + f.row + 8 * ((i % 4) >> 1), col = 8 * (i / 4) + f.col + (i & 1);
        out_accumulate[row * kHeadDim + col] = acc[i];
        out_dq[row * kHeadDim + col] = dq[i];
    }
#endif
}

}  // namespace

bool mb_attention_wgmma_backward_supports(int head_dim, int window) {
    return head_dim == kHeadDim && window < 0 && sm90a_kernel_runs((const void *)wgmma_backward_kernel);
}

namespace {

int launch_backward(mb::bf16 *dqkv, float *dq_accum, const mb::bf16 *dout,
                    const float *lse, const float *delta, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                    query_rows queries, int rows, mb::attention_plan plan, wgmma_split split, int num_seqs, int n,
                    int heads, int head_dim, int window, const float2 *rope, unsigned max_blocks, cudaStream_t stream,
                    mb_error *err) {
    MB_REQUIRE(err, head_dim == kHeadDim && window < 0,
               "attention_wgmma_backward: head_dim %d, window %d (only head_dim 64, global layers)", head_dim, window);
    MB_REQUIRE(err, plan.tile == kWgmmaBackwardTile, "attention_wgmma_backward: plan tile %d, expected %d", plan.tile,
               kWgmmaBackwardTile);
    MB_REQUIRE(err,
               dqkv && dq_accum && dout && lse && delta && qkv && cu_seqlens && queries.q && queries.cu_queries &&
                   plan.seq_first && plan.tile_seq,
               "attention_wgmma_backward: missing pointer");
    MB_REQUIRE(err, num_seqs >= 1 && n >= num_seqs && heads >= 1,
               "attention_wgmma_backward: bad shape num_seqs %d, n %d, heads %d", num_seqs, n, heads);
    MB_REQUIRE(err,
               reinterpret_cast<uintptr_t>(dqkv) % 16 == 0 && reinterpret_cast<uintptr_t>(dq_accum) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dout) % 16 == 0 && reinterpret_cast<uintptr_t>(qkv) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(queries.q) % 16 == 0,
               "attention_wgmma_backward: dqkv, dq_accum, dout, qkv and q must be 16-byte aligned");
    MB_REQUIRE(err, split.words == nullptr || split.partials != nullptr,
               "attention_wgmma_backward: split words without partials");
    if (plan.blocks == 0) return 0;
    MB_REQUIRE(err, max_blocks >= 1, "attention_wgmma_backward: max_blocks must be >= 1");
    const unsigned blocks = plan.blocks < max_blocks ? plan.blocks : max_blocks;
    MB_REQUIRE(err, split.words == nullptr || split.grid == blocks,
               "attention_wgmma_backward: a tail split planned for %u blocks, launched with %u", split.grid, blocks);
    float scale = 1.0f / sqrtf((float)kHeadDim);
    backward_args args = {dqkv,  dq_accum, dout,  qkv, lse, delta, cu_seqlens, queries, num_seqs, heads,
                          mb_wgmma_dq_rows(rows), scale, kLog2e * scale, rope, split};
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(wgmma_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)kSharedBytes));
    wgmma_backward_kernel<<<blocks, kThreads, kSharedBytes, stream>>>(args, plan);
    MB_CUDA_CHECK_LAUNCH(err, "wgmma_backward_kernel");
    return 0;
}

}  // namespace

/* One block per SM walking the plan; MB_ATTENTION_WGMMA_BWD=per_tile launches one block per work item (the schedule
 * before session 12, for comparisons). */
int mb_attention_wgmma_backward_grid(unsigned plan_blocks, unsigned *grid, mb_error *err) {
    *grid = plan_blocks;
    if (env_is("MB_ATTENTION_WGMMA_BWD", "per_tile")) return 0;
    int sm_count = 0;
    if (current_sm_count(&sm_count, err) != 0) return -1;
    *grid = (unsigned)sm_count < plan_blocks ? (unsigned)sm_count : plan_blocks;
    return 0;
}

int mb_attention_wgmma_backward(mb::bf16 *dqkv, float *dq_accum, const mb::bf16 *dout, const float *lse,
                                const float *delta, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                                mb::attention_plan plan, wgmma_split split, int num_seqs, int n, int heads,
                                int head_dim, int window, const float2 *rope, cudaStream_t stream, mb_error *err) {
    unsigned max_blocks = 0;
    if (mb_attention_wgmma_backward_grid(plan.blocks, &max_blocks, err) != 0) return -1;
    const query_rows queries = {qkv, 3 * heads * kHeadDim, cu_seqlens};
    return launch_backward(dqkv, dq_accum, dout, lse, delta, qkv, cu_seqlens, queries, n, plan, split, num_seqs, n,
                           heads, head_dim, window, rope, max_blocks, stream, err);
}

int mb_attention_wgmma_backward_rows(mb::bf16 *dqkv, float *dq_accum, const mb::bf16 *dout, const float *lse,
                                     const float *delta, const mb::bf16 *q, const mb::bf16 *qkv,
                                     const int32_t *cu_seqlens, const int32_t *cu_queries, mb::attention_plan plan,
                                     wgmma_split split, int num_seqs, int n, int rows, int heads, int head_dim,
                                     int window, const float2 *rope, cudaStream_t stream, mb_error *err) {
    unsigned max_blocks = 0;
    if (mb_attention_wgmma_backward_grid(plan.blocks, &max_blocks, err) != 0) return -1;
    const query_rows queries = {q, heads * kHeadDim, cu_queries};
    return launch_backward(dqkv, dq_accum, dout, lse, delta, qkv, cu_seqlens, queries, rows, plan, split, num_seqs, n,
                           heads, head_dim, window, rope, max_blocks, stream, err);
}

/* ---- self-test ---- */

namespace {

/* report writer: appends formatted text, never overflows */
struct report_text {
    char *text;
    size_t size, used;
    void add(const char *format, ...) __attribute__((format(printf, 2, 3))) {
        if (text == nullptr || size == 0 || used + 1 >= size) return;
        va_list args;
        va_start(args, format);
        int written = vsnprintf(text + used, size - used, format, args);
        va_end(args);
        if (written > 0) used = used + (size_t)written < size ? used + (size_t)written : size - 1;
    }
};

/* Compares got with want ([rows][cols]); returns true when max |got − want| <= tolerance and reports the largest
 * error and the first element past the tolerance. */
bool compare(report_text &r, const char *what, const float *got, const double *want, int rows, int cols,
             double tolerance) {
    double worst = 0.0;
    int first_row = -1, first_col = -1;
    for (int i = 0; i < rows; i++)
        for (int k = 0; k < cols; k++) {
            double error = fabs((double)got[i * cols + k] - want[i * cols + k]);
            if (!(error <= tolerance) && first_row < 0) first_row = i, first_col = k;
            if (!(error <= worst)) worst = error;
        }
    if (first_row < 0) {
        r.add("%s: ok (max error %.3g)\n", what, worst);
        return true;
    }
    r.add("%s: MISMATCH max error %.3g; first wrong (row %d, col %d): got %.6g want %.6g\n", what, worst, first_row,
          first_col, got[first_row * cols + first_col], want[first_row * cols + first_col]);
    return false;
}

/* Small integers / 16: every product and sum of part 1 is exact in fp32, so any error is a layout bug. */
float exact_value(int row, int col, int salt) {
    return (float)(((row * 7 + col * 3 + salt) % 17) - 8) / 16.0f;
}

float bf16_round(float value) {
    return mb_bf16_to_float(mb_bf16_from_float(value));
}

/* cudaMalloc'd buffers freed on scope exit */
struct device_buffers {
    std::vector<void *> pointers;
    ~device_buffers() {
        for (void *p : pointers) cudaFree(p);
    }
    template <typename T>
    cudaError_t allocate(T **pointer, size_t count) {
        void *p = nullptr;
        cudaError_t status = cudaMalloc(&p, count * sizeof(T));
        if (status == cudaSuccess) pointers.push_back(p);
        *pointer = static_cast<T *>(p);
        return status;
    }
};

#define SELFTEST_CUDA(call)                                                                            \
    do {                                                                                               \
        cudaError_t selftest_status_ = (call);                                                         \
        if (selftest_status_ != cudaSuccess) {                                                         \
            r.add("%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(selftest_status_)); \
            return -1;                                                                                 \
        }                                                                                              \
    } while (0)

/* The kernel's three product forms (wgmma_products_kernel) against host loops; exact inputs, so the error must be 0. */
int selftest_products(report_text &r) {
    constexpr int kRows = kBlockKeys, kCols = kHeadDim, kWide = 2 * kHeadDim;
    std::vector<mb_bf16> x(kRows * kCols), y(kRows * kCols), z(kRows * kWide);
    std::vector<float> xf(x.size()), yf(y.size()), zf(z.size());
    for (int i = 0; i < kRows; i++) {
        for (int k = 0; k < kCols; k++) {
            x[i * kCols + k] = mb_bf16_from_float(xf[i * kCols + k] = exact_value(i, k, 1));
            y[i * kCols + k] = mb_bf16_from_float(yf[i * kCols + k] = exact_value(k, i, 5));
        }
        for (int k = 0; k < kWide; k++) z[i * kWide + k] = mb_bf16_from_float(zf[i * kWide + k] = exact_value(i, k, 9));
    }
    std::vector<double> want_scores(kRows * kRows, 0.0), want_accumulate(kRows * kCols, 0.0),
        want_dq(kRows * kCols, 0.0);
    for (int i = 0; i < kRows; i++)
        for (int k = 0; k < kRows; k++)
            for (int d = 0; d < kCols; d++) want_scores[i * kRows + k] += (double)xf[i * kCols + d] * yf[k * kCols + d];
    for (int i = 0; i < kRows; i++)
        for (int c = 0; c < kCols; c++)
            for (int k = 0; k < kRows; k++) {
                want_accumulate[i * kCols + c] += (double)exact_value(i, k, 3) * yf[k * kCols + c];
                want_dq[i * kCols + c] += (double)zf[k * kWide + i] * xf[k * kCols + c];
            }

    device_buffers buffers;
    mb::bf16 *dx, *dy, *dz;
    float *scores, *accumulate, *dq;
    SELFTEST_CUDA(buffers.allocate(&dx, x.size()));
    SELFTEST_CUDA(buffers.allocate(&dy, y.size()));
    SELFTEST_CUDA(buffers.allocate(&dz, z.size()));
    SELFTEST_CUDA(buffers.allocate(&scores, want_scores.size()));
    SELFTEST_CUDA(buffers.allocate(&accumulate, want_accumulate.size()));
    SELFTEST_CUDA(buffers.allocate(&dq, want_dq.size()));
    SELFTEST_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(dy, y.data(), y.size() * 2, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(dz, z.data(), z.size() * 2, cudaMemcpyHostToDevice));
    constexpr size_t kBytes = 4 * kKeyTileBytes + kSwizzleAtom;
    SELFTEST_CUDA(
        cudaFuncSetAttribute(wgmma_products_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kBytes));
    wgmma_products_kernel<<<1, kConsumerThreads, kBytes>>>(scores, accumulate, dq, dx, dy, dz);
    SELFTEST_CUDA(cudaGetLastError());
    SELFTEST_CUDA(cudaDeviceSynchronize());
    std::vector<float> got_scores(want_scores.size()), got_accumulate(want_accumulate.size()), got_dq(want_dq.size());
    SELFTEST_CUDA(cudaMemcpy(got_scores.data(), scores, got_scores.size() * 4, cudaMemcpyDeviceToHost));
    SELFTEST_CUDA(cudaMemcpy(got_accumulate.data(), accumulate, got_accumulate.size() * 4, cudaMemcpyDeviceToHost));
    SELFTEST_CUDA(cudaMemcpy(got_dq.data(), dq, got_dq.size() * 4, cudaMemcpyDeviceToHost));
    bool ok = compare(r, "scores X·Yt (SS m64n128, K-major A and B)", got_scores.data(), want_scores.data(), kRows,
                      kRows, 1e-5);
    ok &= compare(r, "accumulate A·Y (RS, 8 k-steps, N-major B)", got_accumulate.data(), want_accumulate.data(),
                  kRows, kCols, 1e-5);
    ok &= compare(r, "dq Z[:, 64g..]t·X (SS m64n64, M-major A, N-major B)", got_dq.data(), want_dq.data(), kRows,
                  kCols, 1e-5);
    return ok ? 0 : 1;
}

/* Double-precision reference backward of one head over one sequence [b, e): dq (scaled), dk, dv of every token. */
void reference_backward(std::vector<double> &dq, std::vector<double> &dk, std::vector<double> &dv,
                        std::vector<float> &lse, std::vector<float> &delta, const std::vector<float> &qkv,
                        const std::vector<float> &dout, int b, int e, int head, int heads) {
    const int hidden = heads * kHeadDim, stride = 3 * hidden, len = e - b;
    const double scale = 1.0 / sqrt((double)kHeadDim);
    auto q = [&](int i, int d) { return (double)qkv[(size_t)i * stride + head * kHeadDim + d]; };
    auto k = [&](int i, int d) { return (double)qkv[(size_t)i * stride + hidden + head * kHeadDim + d]; };
    auto v = [&](int i, int d) { return (double)qkv[(size_t)i * stride + 2 * hidden + head * kHeadDim + d]; };
    auto g = [&](int i, int d) { return (double)dout[(size_t)i * hidden + head * kHeadDim + d]; };
    std::vector<double> p(len), dp(len);
    for (int i = b; i < e; i++) {
        double top = -INFINITY;
        for (int j = b; j < e; j++) {
            double s = 0.0;
            for (int d = 0; d < kHeadDim; d++) s += q(i, d) * k(j, d);
            p[j - b] = s * scale;
            top = fmax(top, p[j - b]);
        }
        double sum = 0.0;
        for (int j = 0; j < len; j++) sum += exp(p[j] - top);
        double log_sum = top + log(sum), di = 0.0;
        for (int j = 0; j < len; j++) p[j] = exp(p[j] - log_sum);
        for (int d = 0; d < kHeadDim; d++) {
            double o = 0.0;
            for (int j = 0; j < len; j++) o += p[j] * v(b + j, d);
            di += g(i, d) * o;
        }
        lse[(size_t)i * heads + head] = (float)log_sum;
        delta[(size_t)i * heads + head] = (float)di;
        for (int j = 0; j < len; j++) {
            double x = 0.0;
            for (int d = 0; d < kHeadDim; d++) x += g(i, d) * v(b + j, d);
            dp[j] = p[j] * (x - di); /* dS */
        }
        for (int j = 0; j < len; j++)
            for (int d = 0; d < kHeadDim; d++) {
                dq[(size_t)i * hidden + head * kHeadDim + d] += scale * dp[j] * k(b + j, d);
                dk[(size_t)(b + j) * hidden + head * kHeadDim + d] += scale * dp[j] * q(i, d);
                dv[(size_t)(b + j) * hidden + head * kHeadDim + d] += p[j] * g(i, d);
            }
    }
}

/* ‖got − want‖ / ‖want‖ over a [n, hidden] block, with the largest element error and its place. */
bool compare_relative(report_text &r, const char *what, const std::vector<float> &got, const std::vector<double> &want,
                      int hidden, double tolerance) {
    double diff = 0.0, norm = 0.0, worst = 0.0;
    size_t worst_at = 0;
    bool finite = true;
    for (size_t i = 0; i < want.size(); i++) {
        double error = fabs((double)got[i] - want[i]);
        if (!std::isfinite(got[i])) finite = false;
        diff += error * error;
        norm += want[i] * want[i];
        if (!(error <= worst)) worst = error, worst_at = i;
    }
    double relative = sqrt(diff) / (sqrt(norm) + 1e-30);
    bool ok = finite && relative <= tolerance;
    r.add("%s: %s relative error %.3g, max abs error %.3g at (token %zu, col %zu) got %.5g want %.5g\n", what,
          ok ? "ok" : "MISMATCH", relative, worst, worst_at / hidden, worst_at % hidden, got[worst_at], want[worst_at]);
    return ok;
}

/* The kernel's dq_accum (head-major, unscaled) and dK / dV rows of dqkv against the reference. */
bool check_kernel_outputs(report_text &r, const float *d_dq, const mb::bf16 *d_dqkv, const std::vector<double> &want_dq,
                          const std::vector<double> &want_dk, const std::vector<double> &want_dv, int n, int heads,
                          size_t dq_rows, const char *batch, unsigned max_blocks, const char *split) {
    const int hidden = heads * kHeadDim;
    const size_t dq_floats = (size_t)heads * dq_rows * kHeadDim;
    std::vector<float> head_major(dq_floats), got_dq(want_dq.size());
    std::vector<mb_bf16> got_bits((size_t)n * 3 * hidden);
    if (cudaMemcpy(head_major.data(), d_dq, dq_floats * 4, cudaMemcpyDeviceToHost) != cudaSuccess) {
        r.add("copying dq_accum back failed\n");
        return false;
    }
    for (int i = 0; i < n; i++) /* the head-major, block-permuted layout back to [n, H] */
        for (int h = 0; h < heads; h++)
            for (int d = 0; d < kHeadDim; d++)
                got_dq[(size_t)i * hidden + h * kHeadDim + d] =
                    head_major[mb_wgmma_dq_offset(i, h, d - d % 8, dq_rows) + d % 8];
    if (cudaMemcpy(got_bits.data(), d_dqkv, got_bits.size() * 2, cudaMemcpyDeviceToHost) != cudaSuccess) {
        r.add("copying dqkv back failed\n");
        return false;
    }
    std::vector<float> got_dk(want_dk.size()), got_dv(want_dv.size());
    const float scale = 1.0f / sqrtf((float)kHeadDim);
    for (int i = 0; i < n; i++)
        for (int c = 0; c < hidden; c++) {
            got_dq[(size_t)i * hidden + c] *= scale;
            got_dk[(size_t)i * hidden + c] = mb_bf16_to_float(got_bits[(size_t)i * 3 * hidden + hidden + c]);
            got_dv[(size_t)i * hidden + c] = mb_bf16_to_float(got_bits[(size_t)i * 3 * hidden + 2 * hidden + c]);
        }
    r.add("whole kernel, lengths %s, 2 heads, at most %u blocks%s:\n", batch, max_blocks, split);
    bool ok = compare_relative(r, "  dQ", got_dq, want_dq, hidden, 1e-2);
    ok &= compare_relative(r, "  dK", got_dk, want_dk, hidden, 1e-2);
    ok &= compare_relative(r, "  dV", got_dv, want_dv, hidden, 1e-2);
    return ok;
}

/* The split words that attention.cu's plan kernel writes (attention_wgmma_bwd.h), computed here from the host's plan
 * for a grid of `grid` blocks. Returns the pieces per tail item (1: no split). */
int host_split_words(std::vector<int32_t> &words, const std::vector<int32_t> &tile_seq,
                     const std::vector<int32_t> &cu_seqlens, int heads, unsigned grid) {
    const unsigned items = (unsigned)tile_seq.size() * heads, tail = mb_wgmma_split_tail(items, grid);
    int fewest_steps = kWgmmaSplitMaxPieces;
    for (unsigned item = items - tail; item < items; item++) {
        const int s = tile_seq[item / heads];
        const int steps = (cu_seqlens[s + 1] - cu_seqlens[s] + kStepQueries - 1) / kStepQueries;
        fewest_steps = steps < fewest_steps ? steps : fewest_steps;
    }
    words.assign(kWgmmaSplitWords, 0); /* the counters zeroed */
    return mb_wgmma_split_words(words.data(), items, grid, fewest_steps);
}

/* Runs the kernel on a packed batch against the double-precision reference, with at most `grids` blocks each. With
 * `split`, the tail items are cut into pieces where the host's split words say so (the counters zeroed per run). */
int selftest_kernel(report_text &r, const std::vector<int> &lengths, const char *batch,
                    const std::vector<unsigned> &grids, bool split) {
    const int heads = 2, hidden = heads * kHeadDim, num_seqs = (int)lengths.size();
    std::vector<int32_t> cu_seqlens(1, 0), seq_first(1, 0), tile_seq;
    for (int s = 0; s < num_seqs; s++) {
        cu_seqlens.push_back(cu_seqlens.back() + lengths[s]);
        int tiles = (lengths[s] + kBlockKeys - 1) / kBlockKeys;
        for (int x = 0; x < tiles; x++) tile_seq.push_back(s);
        seq_first.push_back(seq_first.back() + tiles);
    }
    const int n = cu_seqlens.back();
    mb_rng rng;
    mb_rng_seed(&rng, 20240611);
    std::vector<float> qkv((size_t)n * 3 * hidden), dout((size_t)n * hidden);
    std::vector<mb_bf16> qkv_bits(qkv.size()), dout_bits(dout.size());
    for (size_t i = 0; i < qkv.size(); i++)
        qkv_bits[i] = mb_bf16_from_float(qkv[i] = bf16_round((float)mb_rng_normal(&rng)));
    for (size_t i = 0; i < dout.size(); i++)
        dout_bits[i] = mb_bf16_from_float(dout[i] = bf16_round((float)mb_rng_normal(&rng) * 0.5f));
    const size_t elements = (size_t)n * hidden;
    std::vector<double> want_dq(elements, 0.0), want_dk(elements, 0.0), want_dv(elements, 0.0);
    std::vector<float> lse((size_t)n * heads), delta((size_t)n * heads);
    for (int s = 0; s < num_seqs; s++)
        for (int h = 0; h < heads; h++)
            reference_backward(want_dq, want_dk, want_dv, lse, delta, qkv, dout, cu_seqlens[s], cu_seqlens[s + 1], h,
                               heads);

    device_buffers buffers;
    mb::bf16 *d_qkv, *d_dout, *d_dqkv;
    float *d_lse, *d_delta, *d_dq;
    int32_t *d_cu, *d_first, *d_tiles, *d_words;
    float *d_partials;
    SELFTEST_CUDA(buffers.allocate(&d_qkv, qkv.size()));
    SELFTEST_CUDA(buffers.allocate(&d_dqkv, qkv.size()));
    SELFTEST_CUDA(buffers.allocate(&d_dout, dout.size()));
    SELFTEST_CUDA(buffers.allocate(&d_lse, lse.size()));
    SELFTEST_CUDA(buffers.allocate(&d_delta, delta.size()));
    const size_t dq_rows = mb_wgmma_dq_rows(n), dq_floats = (size_t)heads * dq_rows * kHeadDim;
    SELFTEST_CUDA(buffers.allocate(&d_dq, dq_floats));
    SELFTEST_CUDA(buffers.allocate(&d_cu, cu_seqlens.size()));
    SELFTEST_CUDA(buffers.allocate(&d_first, seq_first.size()));
    SELFTEST_CUDA(buffers.allocate(&d_tiles, tile_seq.size()));
    SELFTEST_CUDA(buffers.allocate(&d_words, (size_t)kWgmmaSplitWords));
    SELFTEST_CUDA(buffers.allocate(&d_partials, kWgmmaSplitCapacity * kWgmmaSplitSlotFloats));
    SELFTEST_CUDA(cudaMemcpy(d_qkv, qkv_bits.data(), qkv.size() * 2, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_dout, dout_bits.data(), dout.size() * 2, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_lse, lse.data(), lse.size() * 4, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_delta, delta.data(), delta.size() * 4, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_cu, cu_seqlens.data(), cu_seqlens.size() * 4, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_first, seq_first.data(), seq_first.size() * 4, cudaMemcpyHostToDevice));
    SELFTEST_CUDA(cudaMemcpy(d_tiles, tile_seq.data(), tile_seq.size() * 4, cudaMemcpyHostToDevice));
    const mb::attention_plan plan = {d_first, d_tiles, kBlockKeys,
                                     (unsigned)(((n + kBlockKeys - 1) / kBlockKeys + num_seqs) * heads)};
    bool ok = true;
    for (unsigned grid : grids) {
        const unsigned max_blocks = grid == 0 ? plan.blocks : grid; /* 0: one block per work item */
        wgmma_split words = {nullptr, nullptr, 0};
        char split_text[64] = "";
        if (split) {
            std::vector<int32_t> host_words;
            const int pieces = host_split_words(host_words, tile_seq, cu_seqlens, heads, max_blocks);
            SELFTEST_CUDA(cudaMemcpy(d_words, host_words.data(), host_words.size() * 4, cudaMemcpyHostToDevice));
            words = {d_words, d_partials, max_blocks};
            snprintf(split_text, sizeof split_text, ", tail split in %d pieces from item %d", pieces, host_words[0]);
        }
        SELFTEST_CUDA(cudaMemset(d_dqkv, 0xff, qkv.size() * 2)); /* NaN: a token the kernel forgets stays NaN */
        SELFTEST_CUDA(cudaMemset(d_dq, 0, dq_floats * 4));
        mb_error err;
        err.message[0] = '\0';
        const query_rows queries = {d_qkv, 3 * heads * kHeadDim, d_cu};
        if (launch_backward(d_dqkv, d_dq, d_dout, d_lse, d_delta, d_qkv, d_cu, queries, n, plan, words, num_seqs, n,
                            heads, kHeadDim, -1, nullptr, max_blocks, nullptr, &err) != 0) {
            r.add("launch: %s\n", err.message);
            return -1;
        }
        SELFTEST_CUDA(cudaDeviceSynchronize());
        ok &= check_kernel_outputs(r, d_dq, d_dqkv, want_dq, want_dk, want_dv, n, heads, dq_rows, batch, max_blocks,
                                   split_text);
    }
    return ok ? 0 : 1;
}

}  // namespace

extern "C" int mb_cuda_attention_wgmma_backward_selftest(char *report, size_t size) {
    report_text r = {report, size, 0};
    if (report != nullptr && size > 0) report[0] = '\0';
    if (!mb_attention_wgmma_backward_supports(kHeadDim, -1)) {
        r.add("skipped: the device is not compute capability 9.x or the build has no sm_90a code\n");
        return 2;
    }
    int products = selftest_products(r);
    if (products < 0) return -1;
    /* a 520-token sequence takes 5 query steps: the 2-stage ring and the two dSᵀ stages wrap twice; grids: one block
     * per work item; 3 blocks, each walking 7-8 tiles of different lengths (the 1-token sequence's included); one
     * block walking all 22 */
    int kernel = selftest_kernel(r, {200, 65, 1, 130, 520}, "200 65 1 130 520", {0, 3, 1}, false);
    if (kernel < 0) return -1;
    /* the tail split: 32 items; 10 blocks leave the last 2 (the 300-token sequence's 44-key tile) to 3 pieces of one
     * step, 13 blocks the last 6 to 2 pieces, 5 blocks the last 2 to 2 pieces (attention_wgmma_bwd.h) */
    int split = selftest_kernel(r, {520, 260, 520, 300}, "520 260 520 300", {10, 13, 5}, true);
    if (split < 0) return -1;
    return products == 0 && kernel == 0 && split == 0 ? 0 : 1;
}
