/* FlashAttention-3-style forward on Hopper (sm_90a wgmma), global layers at head_dim 64 (math and interface in
 * attention_wgmma_fwd.h; design, register/shared budgets and measurements in docs/kernels/attention_wgmma.md).
 *
 * Block = 384 threads: warps 0..7 are two consumer warpgroups of 64 query rows each (128-query tile = the plan's
 * tile), warps 8..11 the producer warpgroup, of which warp 8 copies and the rest leave (setmaxnreg hands their
 * registers to the consumers: 240 each). The producer copies 128-key K and V tiles with cp.async into a ring of kStages
 * shared-memory stages (128-byte swizzled rows) and publishes each with an mbarrier ("full"); consumers hand a stage
 * back through a second mbarrier ("empty") once the tensor cores are done with it. There is no block-wide barrier
 * in the main loop, so the two consumer warpgroups drift apart and one's softmax overlaps the other's wgmma; with
 * MB_ATTENTION_WGMMA_PINGPONG=1 they take turns explicitly (FA3's ping-pong, the kernel's kPingPong instance).
 *
 * Per consumer warpgroup and key tile i (FA3's intra-warpgroup overlap):
 *   S_i = Q·K_iᵀ       wgmma m64n128k16, A = Q in registers (loaded once), B = K_i from shared memory (K-major)
 *   O  += P_{i-1}·V_{i-1}  wgmma m64n64k16, A = P in registers (bf16), B = V from shared memory (MN-major, trans-b)
 *                      issued right behind S_i, so it runs while the softmax of S_i executes
 *   online softmax of S_i in fp32 registers (exp2, scale·log2 e folded into one FMA); once P_{i-1}·V_{i-1} has
 *   completed, O is rescaled and P_i packed to bf16 (FA3's order: P's registers are rewritten only after the wgmma
 *   that reads them is done).
 * Masks only on the sequence's last key tile (keys >= the sequence end get −inf; those rows are zero-filled).
 *
 * Every sm_90 / sm_90a instruction (wgmma, setmaxnreg, fence.proxy.async, mbarrier try_wait) is inside
 * MB_WGMMA_FWD_SM90 so that the sm_80 pass of the build compiles the kernels with empty bodies. */
#include "attention_wgmma_fwd.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MB_WGMMA_FWD_SM90 1
#endif

namespace {

constexpr int kHeadDim = 64;
constexpr int kKeyTile = 128;                                    /* keys per K/V tile (N of the score wgmma) */
constexpr int kConsumerWarps = 8, kProducerWarp = kConsumerWarps; /* warps 0..7 consume, warp 8 produces */
constexpr int kThreads = (kConsumerWarps + 4) * mb::kWarpSize;  /* + the producer's whole warpgroup (setmaxnreg) */
/* Register split (setmaxnreg): the kernel starts at 65536 / 384 = 168 per thread; the producer warpgroup drops to
 * 24 and the consumers rise to 240 (128·24 + 256·240 = 64512 <= 65536), FA3's split for two consumer warpgroups. */
constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;
constexpr int kRowsPerWarpgroup = 64;
constexpr int kStages = 4;                     /* >= 3: the producer publishes tile i−1 after queueing tile i */
constexpr int kRowBytes = kHeadDim * 2;        /* 128: one 128-byte swizzle atom row per key */
constexpr int kTileBytes = kKeyTile * kRowBytes; /* 16 KB: K (or V) of one stage */
constexpr int kStageBytes = 2 * kTileBytes;      /* K then V */
constexpr size_t kSharedBytes = (size_t)kStages * kStageBytes + 1024; /* + slack to align the ring to 1024 bytes */
static_assert(kStages >= 3, "the producer's lagged publish deadlocks with 2 stages");
static_assert(kWgmmaForwardTile == 2 * kRowsPerWarpgroup, "two consumer warpgroups of 64 rows");
static_assert(kProducerRegisters * 128 + kConsumerRegisters * 2 * 128 <= 65536 && kConsumerRegisters % 8 == 0 &&
                  kProducerRegisters % 8 == 0,
              "setmaxnreg split must fit the register file");
static_assert(kProducerWarp * mb::kWarpSize + 128 == kThreads, "the producer warp leads the last warpgroup");

#ifdef MB_WGMMA_FWD_SM90

/* ---- shared memory, barriers, copies ---- */

__device__ __forceinline__ uint32_t shared_address(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}

/* Blocks until the barrier's phase with the given parity has completed. */
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT_AGAIN:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_AGAIN;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

/* Orders this thread's generic-proxy shared-memory writes (cp.async results included, once waited for) before
 * later async-proxy reads (wgmma operands). */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void copy_16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

template <int kRegisters>
__device__ __forceinline__ void registers_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

template <int kRegisters>
__device__ __forceinline__ void registers_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

/* Byte offset of 16-byte chunk `chunk` (8 bf16) of row `row` in a 128-byte-swizzled tile whose base is
 * 1024-byte aligned: the chunk index is XORed with row % 8 (CUTLASS Swizzle<3,4,3> on byte addresses, the
 * SWIZZLE_128B of wgmma descriptors / TMA; cute/atom/mma_traits_sm90_gmma.hpp Layout_K_SW128_Atom). */
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
    return (uint32_t)(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

/* One warp queues keys [k0, k0 + kKeyTile) of K and V into a stage (K at +0, V at +kTileBytes), rows >= key_end
 * zero-filled (their source is never read). Lane l copies chunk l % 8 of rows l / 8 + 4·it: each instruction moves
 * 4 whole 128-byte rows (coalesced). */
__device__ __forceinline__ void load_kv_tile(uint32_t stage, const mb::bf16 *k_base, const mb::bf16 *v_base,
                                             size_t row_stride, int k0, int key_end) {
    const int lane = threadIdx.x % mb::kWarpSize, chunk = lane % 8;
#pragma unroll 2 /* the producer runs in 24 registers */
    for (int it = 0; it < kKeyTile / 4; it++) {
        const int row = lane / 8 + 4 * it;
        const bool valid = k0 + row < key_end;
        const size_t offset = valid ? (size_t)(k0 + row) * row_stride + chunk * 8 : 0;
        const uint32_t dst = stage + swizzled_offset(row, chunk);
        copy_16(dst, k_base + offset, valid);
        copy_16(dst + kTileBytes, v_base + offset, valid);
    }
}

/* ---- wgmma (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"; operand layouts as CUTLASS
 * cute/atom/mma_traits_sm90_gmma.hpp) ---- */

/* Shared-memory matrix descriptor, 128-byte swizzle (layout type 1 in bits 62-63), fields in 16-byte units: start
 * address bits 0-13, leading byte offset 16-29, stride byte offset 32-45, base offset 0 (tiles 1024-aligned).
 * K-major (K tile for S = Q·Kᵀ): rows of 64 bf16, 8-row groups SBO = 1024 bytes apart, LBO unused by swizzled
 * K-major layouts (1 by convention). MN-major (V tile for O = P·V): the N = 64 columns are one 128-byte atom row,
 * 8-key groups SBO = 1024 bytes apart, LBO (the next 64-column atom) unused at N = 64. */
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t address, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return (uint64_t)((address & 0x3FFFF) >> 4) | ((uint64_t)((lbo_bytes >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((sbo_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

/* Keeps the compiler from moving accesses of wgmma accumulators across the asynchronous window (CUTLASS
 * warpgroup_fence_operand). */
template <int kCount>
__device__ __forceinline__ void fence_registers(float (&x)[kCount]) {
#pragma unroll
    for (int i = 0; i < kCount; i++) asm volatile("" : "+f"(x[i])::"memory");
}

/* d[64 × 128] (+)= a[64 × 16] · B[16 × 128]: A from registers (bf16 pairs), B K-major from shared memory.
 * scale_d = 0 overwrites d. Accumulator layout (CLayout_64xN): warp w of the warpgroup owns rows 16w..16w+15;
 * d[4j + 2h + c] is row 16w + lane/4 + 8h, column 8j + 2(lane%4) + c. */
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                 int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16\n"
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},\n"
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

/* d[64 × 64] (+)= a[64 × 16] · B[16 × 64]: A from registers, B MN-major from shared memory (imm-trans-b = 1). */
__device__ __forceinline__ void wgmma_m64n64k16_trans_b(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                        int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16\n"
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},\n"
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

/* ---- the three tile products and the softmax (separate so that the self-test runs the same code) ---- */

/* A fragments of this warp's 16 query rows (row_a = row of lanes' first half, row_a + 8 the second) over the 64
 * head dimensions, straight from global memory; rows >= row_end are zeros. The wgmma A register layout
 * (ALayout_64x16 = CLayout_64x16) is per warp the mma.sync m16n8k16 A layout: q[ks][0] = (row_a, 16ks + 2·quad..+1),
 * [1] = (row_a + 8, same columns), [2] = (row_a, 16ks + 8 + 2·quad..), [3] = (row_a + 8, 16ks + 8 + 2·quad..). */
__device__ __forceinline__ void load_q_fragments(uint32_t (&q)[4][4], const mb::bf16 *q_base, size_t row_stride,
                                                 int row_a, int row_end) {
    const int quad = threadIdx.x % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = row_a + 8 * half;
        const bool valid = row < row_end;
        const uint32_t *src = reinterpret_cast<const uint32_t *>(q_base + (valid ? (size_t)row * row_stride : 0));
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            q[ks][half] = valid ? src[8 * ks + quad] : 0u;
            q[ks][2 + half] = valid ? src[8 * ks + 4 + quad] : 0u;
        }
    }
}

/* Queues S[64 × 128] = Q · K_tileᵀ (4 k-steps of 16 head dimensions: +32 bytes inside the swizzle atom). One commit
 * group. The caller waits. */
__device__ __forceinline__ void issue_scores(float (&s)[64], const uint32_t (&q)[4][4], uint32_t k_tile) {
    const uint64_t desc = sw128_descriptor(k_tile, 16, 1024);
#pragma unroll
    for (int ks = 0; ks < 4; ks++) wgmma_m64n128k16(s, q[ks], desc + (uint64_t)(2 * ks), ks > 0);
}

/* Queues O[64 × 64] += P[64 × 128] · V_tile[128 × 64] (8 k-steps of 16 keys: +2048 bytes = two 8-row groups). */
__device__ __forceinline__ void issue_pv(float (&o)[32], const uint32_t (&p)[8][4], uint32_t v_tile) {
    const uint64_t desc = sw128_descriptor(v_tile, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < 8; kk++) wgmma_m64n64k16_trans_b(o, p[kk], desc + (uint64_t)(128 * kk), 1);
}

/* Score accumulators -> bf16 A fragments of the P·V product: key step kk covers S columns 16kk..16kk+15, i.e.
 * n-tiles 2kk (p[kk][0], p[kk][1]: rows +0 / +8) and 2kk + 1 (p[kk][2], p[kk][3]); FA3's accumulator -> A mapping. */
__device__ __forceinline__ void pack_p(uint32_t (&p)[8][4], const float (&s)[64]) {
#pragma unroll
    for (int kk = 0; kk < 8; kk++)
#pragma unroll
        for (int r = 0; r < 4; r++) p[kk][r] = mb::pack_bf16x2(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
}

/* Keys >= key_end of the tile starting at k0 get −inf (only called on a sequence's last key tile). */
__device__ __forceinline__ void mask_tail(float (&s)[64], int k0, int key_end) {
    const int quad = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
        for (int c = 0; c < 2; c++)
            if (k0 + 8 * j + 2 * quad + c >= key_end) s[4 * j + c] = s[4 * j + 2 + c] = -INFINITY;
}

/* Online softmax of one score tile for this thread's two rows (h = 0: lane/4, h = 1: +8): new running max (log2
 * units), correction[h] = exp2(old max − new max) for O and the running sum, s -> exp2(s·scale_log2 − max) in place,
 * the running sum updated (per-thread partial; the quad's partials are added at the end). pack_p follows once the
 * previous P·V product has completed: redefining P's registers while a wgmma still reads them would make ptxas
 * serialize every wgmma (C7513). */
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                             float (&correction)[2], float scale_log2) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < 16; j++) tile_max = fmaxf(tile_max, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[h], tile_max * scale_log2);
        const float reference = new_max == -INFINITY ? 0.0f : new_max; /* nothing visible yet: keep zeros */
        correction[h] = fast_exp2(row_max[h] - reference);
        float sum = row_sum[h] * correction[h];
#pragma unroll
        for (int j = 0; j < 16; j++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int e = 4 * j + 2 * h + c;
                s[e] = fast_exp2(fmaf(s[e], scale_log2, -reference));
                sum += s[e];
            }
        row_sum[h] = sum;
        row_max[h] = new_max;
    }
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

/* The producer warp: tile i goes to stage i % kStages once the consumers have released its previous use; tile i−1
 * is published (cp.async complete, proxy fence, mbarrier arrive by all 32 lanes) right after tile i is queued, so
 * two tiles are in flight. */
__device__ void produce(uint32_t ring, uint32_t full, uint32_t empty, const mb::bf16 *k_base, const mb::bf16 *v_base,
                        size_t row_stride, int key_lo, int key_hi, int key_tiles) {
    for (int i = 0; i < key_tiles; i++) {
        const int stage = i % kStages;
        if (i >= kStages) mbarrier_wait(empty + 8 * stage, ((i / kStages) - 1) & 1);
        load_kv_tile(ring + stage * kStageBytes, k_base, v_base, row_stride, key_lo + i * kKeyTile, key_hi);
        cp_async_commit();
        if (i >= 1) {
            cp_async_wait<1>();
            fence_proxy_async();
            mbarrier_arrive(full + 8 * ((i - 1) % kStages));
        }
    }
    cp_async_wait<0>();
    fence_proxy_async();
    mbarrier_arrive(full + 8 * ((key_tiles - 1) % kStages));
}

/* Turn-taking of the two consumer warpgroups (FA3's UseSchedulerBarrier "ping-pong"), kOn = false: no-ops.
 * Named barrier 1 + w is warpgroup w's turn (256 threads: its own 128 wait with bar.sync, the other's 128 arrive with
 * bar.arrive). A warpgroup waits for its turn before issuing a batch of wgmma and passes the turn right after, so the
 * batches alternate 0, 1, 0, 1, ... and one warpgroup's softmax runs while the other's products occupy the tensor
 * cores. Warpgroup 1 grants the first turn; both issue the same number of batches (same key tiles), so warpgroup 1
 * skips passing after its last batch and every barrier ends balanced. Inactive warpgroups (rows past a short tile)
 * take their turns like the others. */
template <bool kOn>
struct turns {
    int warpgroup;
    __device__ explicit turns(int wg) : warpgroup(wg) {
        if (kOn && warpgroup == 1) asm volatile("bar.arrive 1, 256;\n" ::: "memory");
    }
    __device__ void wait() const {
        if (!kOn) return;
        if (warpgroup == 0)
            asm volatile("bar.sync 1, 256;\n" ::: "memory");
        else
            asm volatile("bar.sync 2, 256;\n" ::: "memory");
    }
    __device__ void pass(bool last_batch) const {
        if (!kOn) return;
        if (warpgroup == 0)
            asm volatile("bar.arrive 2, 256;\n" ::: "memory");
        else if (!last_batch)
            asm volatile("bar.arrive 1, 256;\n" ::: "memory");
    }
};

/* Hands stage `stage` back to the producer (one arrival per consumer warp, after the warp's wgmma reads of it have
 * completed). */
__device__ __forceinline__ void release(uint32_t empty, int stage) {
    __syncwarp();
    if (threadIdx.x % mb::kWarpSize == 0) mbarrier_arrive(empty + 8 * stage);
}

/* One consumer warpgroup's work: 64 query rows against every key tile of the sequence (see the file comment). */
template <bool kPingPong>
__device__ __forceinline__ void consume(mb::bf16 *out, float *lse, const mb::bf16 *q_base, size_t qkv_stride,
                                       uint32_t ring, uint32_t full, uint32_t empty, const tile_position &t, int head,
                                       int heads, int key_lo, int key_hi, int key_tiles, float scale_log2) {
    const int warp = threadIdx.x / mb::kWarpSize, hidden = heads * kHeadDim;
    const int warpgroup = warp / 4, lane = threadIdx.x % mb::kWarpSize;
    const int row_a = t.start + warpgroup * kRowsPerWarpgroup + (warp % 4) * 16 + lane / 4;
    /* A warpgroup whose rows are all past a short tile computes on zero rows and stores nothing: keeping every
     * wgmma out of divergent branches is what lets ptxas pipeline them (C7518 otherwise). */
    const turns<kPingPong> turn(warpgroup);
    uint32_t q[4][4], p[8][4];
    float s[64], o[32];
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f}, correction[2];
#pragma unroll
    for (int e = 0; e < 64; e++) s[e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 32; e++) o[e] = 0.0f;
    load_q_fragments(q, q_base, qkv_stride, row_a, t.end);

    /* tile 0: scores and softmax only (O is still zero) */
    mbarrier_wait(full, 0);
    turn.wait();
    wgmma_fence();
    issue_scores(s, q, ring);
    wgmma_commit();
    turn.pass(false);
    wgmma_wait<0>();
    fence_registers(s);
    if (key_lo + kKeyTile > key_hi) mask_tail(s, key_lo, key_hi);
    softmax_tile(s, row_max, row_sum, correction, scale_log2);
    pack_p(p, s);
    for (int i = 1; i < key_tiles; i++) {
        const int stage = i % kStages, previous = (i - 1) % kStages, k0 = key_lo + i * kKeyTile;
        mbarrier_wait(full + 8 * stage, (i / kStages) & 1);
        turn.wait();
        fence_registers(o);
        wgmma_fence();
        issue_scores(s, q, ring + stage * kStageBytes);
        wgmma_commit();
        issue_pv(o, p, ring + previous * kStageBytes + kTileBytes);
        wgmma_commit();
        turn.pass(false);
        wgmma_wait<1>(); /* S_i done; P_{i-1}·V_{i-1} may still run */
        fence_registers(s);
        if (k0 + kKeyTile > key_hi) mask_tail(s, k0, key_hi);
        softmax_tile(s, row_max, row_sum, correction, scale_log2);
        wgmma_wait<0>(); /* P_{i-1}·V_{i-1} done: O and P's registers are free */
        fence_registers(o);
        rescale(o, correction);
        pack_p(p, s);
        release(empty, previous);
    }
    turn.wait();
    fence_registers(o);
    wgmma_fence();
    issue_pv(o, p, ring + ((key_tiles - 1) % kStages) * kStageBytes + kTileBytes);
    wgmma_commit();
    turn.pass(true);
    wgmma_wait<0>();
    fence_registers(o);
    release(empty, (key_tiles - 1) % kStages); /* symmetric bookkeeping; the producer may already be gone */
    store_rows(out, lse, o, row_max, row_sum, row_a, t.end, hidden, heads, head);
}

#endif /* MB_WGMMA_FWD_SM90 */

template <bool kPingPong>
__global__ void __launch_bounds__(kThreads, 1)
    wgmma_forward_kernel(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                         const int32_t *seq_first, const int32_t *tile_seq, int num_seqs, int heads,
                         float scale_log2) {
#ifdef MB_WGMMA_FWD_SM90
    __shared__ __align__(8) uint64_t barriers[2 * kStages]; /* full[kStages], then empty[kStages] */
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    tile_position t;
    int head;
    if (!find_tile(&t, &head, seq_first, tile_seq, cu_seqlens, num_seqs, heads, kWgmmaForwardTile)) return;
    const uint32_t ring = (shared_address(shared_raw) + 1023u) & ~1023u;
    const uint32_t full = shared_address(barriers), empty = full + 8 * kStages;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; s++) {
            mbarrier_init(full + 8 * s, mb::kWarpSize);
            mbarrier_init(empty + 8 * s, kConsumerWarps);
        }
    }
    __syncthreads();
    const int hidden = heads * kHeadDim;
    const size_t qkv_stride = 3 * (size_t)hidden;
    const mb::bf16 *q_base = qkv + head * kHeadDim, *k_base = q_base + hidden, *v_base = q_base + 2 * hidden;
    const int key_lo = t.seq_begin, key_hi = t.seq_end; /* global layer: the whole sequence */
    const int key_tiles = mb::ceil_div(key_hi - key_lo, kKeyTile);
    const int warp = threadIdx.x / mb::kWarpSize;
    if (warp >= kConsumerWarps) { /* the producer warpgroup: one warp copies, three leave */
        registers_decrease<kProducerRegisters>();
        if (warp == kProducerWarp) produce(ring, full, empty, k_base, v_base, qkv_stride, key_lo, key_hi, key_tiles);
    } else {
        registers_increase<kConsumerRegisters>();
        consume<kPingPong>(out, lse, q_base, qkv_stride, ring, full, empty, t, head, heads, key_lo, key_hi,
                           key_tiles, scale_log2);
    }
#endif
}

/* ---- self-test kernel: one warpgroup runs the two tile products on fixed operands ----
 * q [64 × 64], k [128 × 64], v [128 × 64] bf16 row-major; p [64 × 128] fp32; results s [64 × 128], o [64 × 64]. */
__global__ void __launch_bounds__(128)
    wgmma_products_selftest_kernel(float *s_out, float *o_out, const mb::bf16 *q_in, const mb::bf16 *k_in,
                                   const mb::bf16 *v_in, const float *p_in) {
#ifdef MB_WGMMA_FWD_SM90
    extern __shared__ __align__(1024) unsigned char shared_raw[];
    const uint32_t stage = (shared_address(shared_raw) + 1023u) & ~1023u;
    const int warp = threadIdx.x / mb::kWarpSize, lane = threadIdx.x % mb::kWarpSize, quad = lane % 4;
    if (warp == 0) {
        load_kv_tile(stage, k_in, v_in, kHeadDim, 0, kKeyTile);
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();
    }
    __syncthreads();
    const int row_a = warp * 16 + lane / 4;
    uint32_t q[4][4], p[8][4];
    float s[64], o[32], p_values[64];
    for (int e = 0; e < 64; e++) s[e] = 0.0f;
    for (int e = 0; e < 32; e++) o[e] = 0.0f;
    load_q_fragments(q, q_in, kHeadDim, row_a, 64);
    wgmma_fence();
    issue_scores(s, q, stage);
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
    if (head_dim != kHeadDim || window >= 0) return false;
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major != 9) {
        (void)cudaGetLastError(); /* a failed query must not leave an error for the next launch check */
        return false;
    }
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, wgmma_forward_kernel<false>) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return attributes.binaryVersion >= 90;
}

int mb_attention_wgmma_forward(mb::bf16 *out, float *lse, const mb::bf16 *qkv, const int32_t *cu_seqlens,
                               mb::attention_plan plan, int num_seqs, int n, int heads, int head_dim, int window,
                               cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, out && lse && qkv && cu_seqlens && plan.seq_first && plan.tile_seq,
               "attention_wgmma_forward: missing out, lse, qkv, cu_seqlens or plan");
    MB_REQUIRE(err, head_dim == kHeadDim && window < 0,
               "attention_wgmma_forward: head_dim %d, window %d not supported (head_dim 64, global layers only)",
               head_dim, window);
    MB_REQUIRE(err, plan.tile == kWgmmaForwardTile,
               "attention_wgmma_forward: plan built for tile %d, this kernel needs %d", plan.tile, kWgmmaForwardTile);
    MB_REQUIRE(err, num_seqs >= 1 && n >= num_seqs && heads >= 1, "attention_wgmma_forward: bad shape num_seqs %d, "
               "n %d, heads %d", num_seqs, n, heads);
    MB_REQUIRE(err, reinterpret_cast<uintptr_t>(qkv) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0,
               "attention_wgmma_forward: qkv must be 16-byte aligned, out 4-byte aligned");
    MB_REQUIRE(err, mb_attention_wgmma_forward_supports(head_dim, window),
               "attention_wgmma_forward: needs a compute capability 9.x device and the sm_90a build");
    if (plan.blocks == 0) return 0;
    /* MB_ATTENTION_WGMMA_PINGPONG=1 (read per call) turns on the consumer warpgroups' turn-taking (tuning, off by
     * default until measured) */
    const char *ping_pong = getenv("MB_ATTENTION_WGMMA_PINGPONG");
    auto kernel = ping_pong != nullptr && strcmp(ping_pong, "1") == 0 ? wgmma_forward_kernel<true>
                                                                      : wgmma_forward_kernel<false>;
    MB_CUDA_CHECK(err, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSharedBytes));
    const float scale_log2 = kLog2e / sqrtf((float)kHeadDim);
    kernel<<<plan.blocks, kThreads, kSharedBytes, stream>>>(out, lse, qkv, cu_seqlens, plan.seq_first, plan.tile_seq,
                                                            num_seqs, heads, scale_log2);
    MB_CUDA_CHECK_LAUNCH(err, "wgmma_forward_kernel");
    return 0;
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

/* (1) and (2): the two tile products of one warpgroup against exact host sums. */
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
    const size_t shared = kStageBytes + 1024;
    SELFTEST_CUDA(cudaFuncSetAttribute(wgmma_products_selftest_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)shared));
    wgmma_products_selftest_kernel<<<1, 128, shared>>>(ds.as<float>(), dout.as<float>(), dq.as<mb::bf16>(),
                                                       dk.as<mb::bf16>(), dv.as<mb::bf16>(), dp.as<float>());
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

/* (3): the whole forward through mb_attention_wgmma_forward on a small packed batch against a double reference. */
int selftest_forward(char *report, size_t size, mismatch *outs, mismatch *lses) {
    const int lengths[] = {200, 1, 130, 64}, num_seqs = 4, heads = 2, hidden = heads * kHeadDim;
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
    SELFTEST_CUDA(cudaMemset(d_out.ptr, 0xFF, out.size() * sizeof(mb::bf16))); /* NaN: unwritten rows fail */
    SELFTEST_CUDA(cudaMemset(d_lse.ptr, 0xFF, lse.size() * sizeof(float)));
    mb::attention_plan plan;
    plan.seq_first = d_first.as<int32_t>();
    plan.tile_seq = d_tiles.as<int32_t>();
    plan.tile = kWgmmaForwardTile;
    plan.blocks = (unsigned)((mb::ceil_div(n, kWgmmaForwardTile) + num_seqs) * heads);
    mb_error err;
    memset(&err, 0, sizeof err);
    if (mb_attention_wgmma_forward(d_out.as<mb::bf16>(), d_lse.as<float>(), d_qkv.as<mb::bf16>(), d_cu.as<int32_t>(),
                                   plan, num_seqs, n, heads, kHeadDim, -1, 0, &err) != 0) {
        snprintf(report, size, "wgmma forward self-test: launch failed: %s", err.message);
        return -1;
    }
    SELFTEST_CUDA(cudaDeviceSynchronize());
    SELFTEST_CUDA(cudaMemcpy(out.data(), d_out.ptr, out.size() * sizeof(mb::bf16), cudaMemcpyDeviceToHost));
    SELFTEST_CUDA(cudaMemcpy(lse.data(), d_lse.ptr, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
    const size_t stride = 3 * (size_t)hidden;
    std::vector<double> score(n), value(kHeadDim);
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
                for (int d = 0; d < kHeadDim; d++) value[d] = 0.0;
                for (int j = cu[s]; j < cu[s + 1]; j++) {
                    const double w = std::exp(score[j] - top);
                    total += w;
                    const float *vj = &qkv_f[j * stride + 2 * hidden + h * kHeadDim];
                    for (int d = 0; d < kHeadDim; d++) value[d] += w * vj[d];
                }
                for (int d = 0; d < kHeadDim; d++) {
                    const double want = value[d] / total;
                    const long index = (long)i * hidden + h * kHeadDim + d;
                    outs->check(index, __bfloat162float(out[index]), want, 1e-2 + 1e-2 * std::fabs(want));
                }
                const double want_lse = top + std::log(total);
                lses->check((long)i * heads + h, lse[(size_t)i * heads + h], want_lse,
                            1e-3 * (1.0 + std::fabs(want_lse)));
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
    mismatch scores, values, outs, lses;
    if (selftest_products(report, size, &scores, &values) != 0) return -1;
    if (selftest_forward(report, size, &outs, &lses) != 0) return -1;
    const bool pass = scores.first_bad < 0 && values.first_bad < 0 && outs.first_bad < 0 && lses.first_bad < 0;
    /* first bad element as (row, column) of its matrix; -1 when none */
    const long s_row = scores.first_bad < 0 ? -1 : scores.first_bad / kKeyTile;
    const long s_col = scores.first_bad < 0 ? -1 : scores.first_bad % kKeyTile;
    const long o_row = values.first_bad < 0 ? -1 : values.first_bad / kHeadDim;
    const long o_col = values.first_bad < 0 ? -1 : values.first_bad % kHeadDim;
    const long f_token = outs.first_bad < 0 ? -1 : outs.first_bad / (2 * kHeadDim);
    const long f_head = outs.first_bad < 0 ? -1 : (outs.first_bad / kHeadDim) % 2;
    const long f_dim = outs.first_bad < 0 ? -1 : outs.first_bad % kHeadDim;
    const long l_token = lses.first_bad < 0 ? -1 : lses.first_bad / 2;
    const long l_head = lses.first_bad < 0 ? -1 : lses.first_bad % 2;
    snprintf(report, size,
             "wgmma forward self-test %s: S=Q*K^T [64x128] max err %.3g (first bad row %ld col %ld: got %.6g want "
             "%.6g); O=P*V [64x64] max err %.3g (first bad row %ld col %ld: got %.6g want %.6g); forward out "
             "(lengths 200,1,130,64; 2 heads) max err %.3g (first bad token %ld head %ld dim %ld: got %.6g want "
             "%.6g); lse max err %.3g (first bad token %ld head %ld: got %.6g want %.6g)",
             pass ? "passed" : "FAILED", scores.max_error, s_row, s_col, scores.got, scores.want, values.max_error,
             o_row, o_col, values.got, values.want, outs.max_error, f_token, f_head, f_dim, outs.got, outs.want,
             lses.max_error, l_token, l_head, lses.got, lses.want);
    return pass ? 0 : -1;
}
