/* Hopper (sm_90a) primitives of the wgmma attention kernels (attention_wgmma_fwd.cu, attention_wgmma_bwd.cu):
 * 128-byte-swizzled shared tiles of 64-bf16 rows and their wgmma matrix descriptors, the wgmma.mma_async shapes the
 * kernels issue (bf16 × bf16 -> fp32), the wgmma fence / commit / wait wrappers and register fences, mbarrier
 * hand-offs, setmaxnreg, and one warp's cp.async of whole rows into a swizzled tile.
 *
 * MB_WGMMA_SM90 is 1 only in the sm_90a device pass; everything below that executes an sm_90 / sm_90a instruction
 * (wgmma, setmaxnreg, fence.proxy.async, mbarrier try_wait / test_wait) is defined only there, so the sm_80 pass of
 * the build (gpu_gencode) compiles the kernels with empty bodies (they guard their bodies with the same macro).
 *
 * Internal to the two kernel files: anonymous namespace, included after attention_common.cuh (cp.async). */
#ifndef MB_CUDA_WGMMA_CUH
#define MB_CUDA_WGMMA_CUH

#include "attention_common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MB_WGMMA_SM90 1
#else
#define MB_WGMMA_SM90 0
#endif

namespace {

/* The 128-byte swizzle: a tile row is 128 bytes (64 bf16 = one head_dim-64 row) and the pattern repeats every
 * 8 rows (1024 bytes); tiles start on 1024-byte boundaries (descriptor base offset 0). */
constexpr int kSwizzleRowBytes = 128, kSwizzleAtomBytes = 8 * kSwizzleRowBytes;

#if MB_WGMMA_SM90

__device__ __forceinline__ uint32_t shared_address(const void *pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

/* Byte offset of 16-byte chunk `chunk` (8 bf16, 0..7) of row `row` in a 128-byte-swizzled tile: the chunk index
 * (address bits [4,7)) is XORed with row % 8 (bits [7,10)): CUTLASS Swizzle<3,4,3> on byte addresses, the
 * SWIZZLE_128B of wgmma descriptors / TMA (cute/atom/mma_traits_sm90_gmma.hpp Layout_K_SW128_Atom). A warp's
 * 8 rows at one chunk index land in 8 different 16-byte bank groups. */
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
    return (uint32_t)(row * kSwizzleRowBytes + ((chunk ^ (row & 7)) << 4));
}

/* wgmma shared-memory matrix descriptor of a 128-byte-swizzled tile (PTX ISA "Matrix Descriptor Format"): start
 * address >> 4 in bits 0-13, leading-dimension byte offset >> 4 in 16-29, stride-dimension byte offset >> 4 in
 * 32-45, base offset 0 in 49-51 (tiles 1024-aligned; in-row start offsets such as +32 bytes per k-step keep bits 7-9
 * of the start), swizzle mode in 62-63 (1 = 128-byte). K-major and MN-major alike (the PTX ISA canonical layouts
 * ((8,m),(T,2k)):((8T,SBO),(1,T)) and ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 bf16): SBO = 1024 bytes (the next
 * group of 8 rows); LBO is unused (K-major swizzled: "assumed 1"; MN-major: the next 64-element MN block, absent
 * while M and N stay <= 64 per operand row) and set to 1 (16 bytes). Adding k to the descriptor moves its start by
 * 16·k bytes. */
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t address) {
    constexpr uint64_t kLeading = 1, kStride = kSwizzleAtomBytes >> 4, kSwizzle128 = 1;
    return (uint64_t)((address & 0x3FFFF) >> 4) | (kLeading << 16) | (kStride << 32) | (kSwizzle128 << 62);
}

/* ---- wgmma (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"); all 128 threads of the warpgroup
 * execute each. Accumulator layout (PTX ISA figure "WGMMA .m64nNk16 register fragment layout for accumulator
 * matrix D", CUTLASS CLayout_64xN): warp w of the group owns rows 16w..16w+15; element 4j + 2h + c of a thread is
 * row 16w + lane/4 + 8h, column 8j + 2·(lane%4) + c. ---- */

/* Orders this thread's earlier register accesses before the warpgroup's next wgmma. */
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

/* Waits until at most kPending of this warpgroup's committed wgmma groups are in flight (groups finish in order). */
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

/* Compiler-only fences on registers an in-flight wgmma reads or writes (CUTLASS warpgroup_fence_operand): the
 * compiler must neither read an accumulator before the wgmma.wait_group that completes it nor reuse an A-fragment
 * register before that wait. */
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}

template <int M, int N>
__device__ __forceinline__ void fence_registers(uint32_t (&r)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; i++)
#pragma unroll
        for (int k = 0; k < N; k++) asm volatile("" : "+r"(r[i][k])::"memory");
}

/* Shared memory written by ordinary stores or cp.async (once waited for) and read next by wgmma (the async proxy):
 * each writing thread fences before the barrier that publishes the data. */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* The accumulator operands "+f"(d[i]) .. "+f"(d[i + 7]). */
#define MB_WGMMA_D8(i)                                                                                           \
    "+f"(d[(i)]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]),       \
        "+f"(d[(i) + 6]), "+f"(d[(i) + 7])

/* d[64 × N] (+)= A[64 × 16] · B[16 × N], A and B from shared memory (descriptors), N = 2·(size of d): 128, 64 or 32.
 * scale_d = 0 overwrites d. kTransA = 1: A M-major; kTransB = 1: B N-major (0: K-major). */
template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16\n"
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},\n"
        "%64, %65, p, 1, 1, %67, %68;\n}\n"
        : MB_WGMMA_D8(0), MB_WGMMA_D8(8), MB_WGMMA_D8(16), MB_WGMMA_D8(24), MB_WGMMA_D8(32), MB_WGMMA_D8(40),
          MB_WGMMA_D8(48), MB_WGMMA_D8(56)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
}

template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16\n"
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},\n"
        "%32, %33, p, 1, 1, %35, %36;\n}\n"
        : MB_WGMMA_D8(0), MB_WGMMA_D8(8), MB_WGMMA_D8(16), MB_WGMMA_D8(24)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
}

template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16\n"
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15},\n"
        "%16, %17, p, 1, 1, %19, %20;\n}\n"
        : MB_WGMMA_D8(0), MB_WGMMA_D8(8)
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB));
}

/* d[64 × 64] (+)= a[64 × 16] · B[16 × 64]: A from registers (bf16 pairs, ALayout_64x16: per warp the mma.sync
 * m16n8k16 A layout), B from shared memory; kTransB = 1: B N-major. */
template <int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16\n"
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31},\n"
        "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : MB_WGMMA_D8(0), MB_WGMMA_D8(8), MB_WGMMA_D8(16), MB_WGMMA_D8(24)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB));
}

#undef MB_WGMMA_D8

/* ---- mbarriers (shared::cta, 8 bytes each) and setmaxnreg ---- */

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}

/* One arrival per warp, after every lane got here (so the lanes' earlier reads are done: write-after-read). */
__device__ __forceinline__ void warp_arrive(uint32_t bar) {
    __syncwarp();
    if (threadIdx.x % mb::kWarpSize == 0) mbarrier_arrive(bar);
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

/* One test of the phase with the given parity (try_wait may suspend the thread for a short system-dependent time). */
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

/* Whether the barrier's phase with the given parity has completed (test_wait: never suspends). */
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

/* setmaxnreg: a producer warpgroup lowers its register limit, the consumer warpgroups raise theirs by what it
 * freed (all threads of a warpgroup execute it). */
template <int kRegisters>
__device__ __forceinline__ void registers_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

template <int kRegisters>
__device__ __forceinline__ void registers_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

/* ---- copies ---- */

/* cp.async of 16 bytes to a shared address; valid = false writes 16 zero bytes (the source is not read). */
__device__ __forceinline__ void cp_async_16_at(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

/* One warp queues rows [r0, r0 + kRows) of a [*, 64] bf16 slice (row stride in elements) into the swizzled tile at
 * `tile`; rows >= r_end become zeros (their source is never read). Lane l copies chunk l % 8 of rows l / 8 + 4·it:
 * each instruction moves 4 whole 128-byte rows (coalesced). Unrolled by 2 only: producers run in 24 registers. */
template <int kRows>
__device__ __forceinline__ void warp_load_rows(uint32_t tile, const mb::bf16 *src, size_t row_stride, int r0,
                                               int r_end) {
    const int lane = threadIdx.x % mb::kWarpSize, chunk = lane % 8;
#pragma unroll 2
    for (int it = 0; it < kRows / 4; it++) {
        const int row = lane / 8 + 4 * it;
        const bool valid = r0 + row < r_end;
        const size_t offset = valid ? (size_t)(r0 + row) * row_stride + chunk * 8 : 0;
        cp_async_16_at(tile + swizzled_offset(row, chunk), src + offset, valid);
    }
}

#endif /* MB_WGMMA_SM90 */

}  // namespace

#endif
