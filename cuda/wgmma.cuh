/* Hopper (sm_90a) primitives shared by the wgmma attention kernels (attention_wgmma_fwd.cu, attention_wgmma_bwd.cu,
 * attention_band_wgmma.cu):
 * the 128-byte swizzle offset, shared addresses, the generic-to-async proxy fence, mbarrier init, arrive and wait,
 * setmaxnreg, wgmma fence / commit / wait with the register fences that keep the compiler away from accumulators in
 * flight, and the wgmma instructions themselves (m64n128 and m64n64, shared- or register-A). The asm exists in the
 * sm_90a pass only; elsewhere (the sm_80 pass, which compiles those kernels with empty bodies, and the host pass) the
 * functions are empty, so code that calls them still parses. The mbarrier wait here is bounded (the backward kernels:
 * attention_wgmma_bwd.cu, attention_band_wgmma.cu); the forward keeps its own plain spin (mbarrier_spin_wait). */
#ifndef MB_CUDA_WGMMA_CUH
#define MB_CUDA_WGMMA_CUH

#include <cstdint>

#include "attention_common.cuh" /* cp.async */

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MB_WGMMA_SM90 1
#else
#define MB_WGMMA_SM90 0
#endif

namespace {

/* Whether a kernel of the sm_90a kernels can run here: a compute capability 9.x device and an sm_90a binary of it in
 * this build (host side; a failed query leaves no error behind for the next launch check). */
inline bool sm90a_kernel_runs(const void *kernel) {
    int device = 0, major = 0;
    cudaFuncAttributes attributes;
    const bool ok = cudaGetDevice(&device) == cudaSuccess &&
                    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                    major == 9 && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
                    attributes.binaryVersion >= 90;
    (void)cudaGetLastError();
    return ok;
}

/* Byte offset of 16-byte chunk `chunk` (8 bf16, 0..7) of row `row` in a 1024-byte aligned tile of 128-byte rows with
 * the 128-byte swizzle: the chunk index is XORed with row % 8 (CUTLASS Swizzle<3,4,3> on byte addresses, the
 * SWIZZLE_128B of wgmma descriptors and TMA). */
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
    return (uint32_t)(row * 128 + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ uint32_t shared_address(const void *pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

/* Orders this thread's generic-proxy shared-memory writes (st.shared, stmatrix, waited-for cp.async) before later
 * async-proxy accesses (wgmma operands, bulk copies): each writing thread fences before the barrier that publishes. */
__device__ __forceinline__ void fence_proxy_async() {
#if MB_WGMMA_SM90
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
#if MB_WGMMA_SM90
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
#if MB_WGMMA_SM90
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
#endif
}

/* One test of the phase of the given parity (try_wait may suspend the thread for a short system-dependent time). */
__device__ __forceinline__ bool mbarrier_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 1;
#if MB_WGMMA_SM90
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#endif
    return done != 0;
}

/* A wait that lasts this long (~0.5 s at 2 GHz; a legitimate one lasts microseconds) is a deadlock (a parity or
 * arrival-count bug): the wait gives up and the kernel finishes with wrong results, which the self-test reports,
 * instead of hanging the test run (a trap here costs the consumers a 72-byte stack frame and spills). */
constexpr long long kHangCycles = 1000000000LL;

/* Blocks until the phase of the given parity has completed (safe while arrivals run at most one phase ahead of
 * the waiter, which the callers' barriers guarantee). */
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
    if (mbarrier_try_wait(bar, parity)) return;
    const long long start = clock64();
    while (!mbarrier_try_wait(bar, parity))
        if (clock64() - start > kHangCycles) break;
}

/* One arrival per warp, after every lane got here (for a consumer warp: its lanes' wgmma reads of the stage are
 * complete, so the arrival hands it back: write-after-read). */
__device__ __forceinline__ void warp_arrive(uint32_t bar) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(bar);
}

/* ---- the producer warps' copies (cp.async into 128-byte-swizzled tiles) and their publishing ---- */

/* One warp queues rows [r0, r0 + kRows) of a [*, 64] bf16 slice (row stride in elements) into the swizzled tile
 * `tile` (shared memory): lane l copies chunk l % 8 of rows l / 8 + 4·it (4 whole 128-byte rows per instruction);
 * rows >= r_end become zeros (source never read). Generic pointers, as the global backward always had them: with
 * 32-bit shared addresses its ptxas allocation changed (C7519) and it ran 0.8 % slower at 1024 tokens. */
template <int kRows>
__device__ __forceinline__ void warp_load_rows(char *tile, const mb::bf16 *src, size_t row_stride, int r0,
                                               int r_end) {
    const int lane = threadIdx.x % mb::kWarpSize, chunk = lane % 8;
    if (r0 + kRows <= r_end) { /* whole tile inside the sequence (uniform): no predicates, ~3 instr. a copy */
        const int row = lane / 8; /* rows row + 4·it: even and odd it differ by 4 in row % 8, row + 8 is +1024 B */
        const uint32_t base = shared_address(tile);
        const uint32_t even = base + swizzled_offset(row, chunk), odd = base + swizzled_offset(row + 4, chunk);
        const char *from = reinterpret_cast<const char *>(src + (size_t)(r0 + row) * row_stride + chunk * 8);
        const size_t four_rows = 4 * row_stride * sizeof(mb::bf16);
#pragma unroll
        for (int m = 0; m < kRows / 8; m++) {
            cp_async_16_whole(even + 1024 * m, from);
            cp_async_16_whole(odd + 1024 * m, from + four_rows);
            from += 2 * four_rows;
        }
        return;
    }
#pragma unroll 2 /* producers run in 24-40 registers */
    for (int it = 0; it < kRows / 4; it++) {
        const int row = lane / 8 + 4 * it;
        const bool valid = r0 + row < r_end;
        cp_async_16(tile + swizzled_offset(row, chunk), valid ? src + (size_t)(r0 + row) * row_stride + chunk * 8 : src,
                    valid);
    }
}

/* One warp queues the kRows floats of rows [r0, r0 + kRows) (element stride `stride`) to `dst` (shared memory),
 * zeros past r_end. */
template <int kRows>
__device__ __forceinline__ void warp_load_floats(float *dst, const float *src, int stride, int r0, int r_end) {
    const int lane = threadIdx.x % mb::kWarpSize;
#pragma unroll
    for (int r = lane; r < kRows; r += mb::kWarpSize) {
        const bool valid = r0 + r < r_end;
        cp_async_4(dst + r, valid ? src + (size_t)(r0 + r) * stride : src, valid);
    }
}

/* The generic pointer of a shared-space address (the ring kernels keep 32-bit addresses). */
template <class T>
__device__ __forceinline__ T *shared_pointer(uint32_t address) {
    return reinterpret_cast<T *>(__cvta_shared_to_generic(address));
}

/* This lane's arrival on an mbarrier (counted in its init count: .noinc), made by the hardware once every cp.async
 * the lane issued before it has landed: the producer publishes a tile without waiting for it (CUTLASS's sm90 cp.async
 * GMMA mainloop publishes the same way, with no proxy fence on either side). */
__device__ __forceinline__ void cp_async_arrive_noinc(uint32_t bar) {
#if MB_WGMMA_SM90
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}

/* Lag-one publishing of the producer's cp.async groups: a group's barrier gets this lane's arrival once the group
 * has landed, checked after the next group has been queued (two groups in flight) or at flush. A barrier that
 * expects 32 arrivals per phase is completed by the warp's 32 lanes. */
struct publisher {
    uint32_t barrier = 0;
    bool pending = false;
    __device__ void committed(uint32_t next) {
        if (pending) {
            cp_async_wait<1>();
            fence_proxy_async();
            mbarrier_arrive(barrier);
        }
        barrier = next;
        pending = true;
    }
    __device__ void flush() {
        if (pending) {
            cp_async_wait<0>();
            fence_proxy_async();
            mbarrier_arrive(barrier);
        }
        pending = false;
    }
};

/* wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format") of a 1024-byte aligned tile of 128-byte
 * rows with the 128-byte swizzle: start address >> 4 in bits 0-13, leading-dimension byte offset >> 4 in 16-29,
 * stride-dimension byte offset >> 4 in 32-45, base offset 0 (in-row start offsets such as +32 bytes per k-step keep
 * bits 7-9 of the start), swizzle mode in 62-63 (1 = 128-byte). K-major and MN-major alike: SBO = 1024 bytes (the
 * next group of 8 rows); LBO is unused (K-major swizzled: "assumed 1"; MN-major: the next 64-element block, absent
 * since M and N of these tiles never exceed 64) and set to 1. */
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t address) {
    constexpr uint64_t kLeading = 1, kStride = 1024 >> 4, kSwizzle128 = 1;
    return (uint64_t)((address & 0x3FFFF) >> 4) | (kLeading << 16) | (kStride << 32) | (kSwizzle128 << 62);
}

/* What a byte offset adds to a descriptor: sw128_descriptor(address + offset) == sw128_descriptor(address) +
 * descriptor_offset(offset) for offsets that are multiples of 16 and stay inside the block's shared memory (< 256 KB:
 * the 14-bit start field never carries). Products step through a tile by adding this to one descriptor, so that the
 * descriptor is not rebuilt (mask, shift, or, two R2UR) for every wgmma. */
__device__ __forceinline__ constexpr uint64_t descriptor_offset(uint32_t offset) { return offset >> 4; }

/* setmaxnreg: the producer warpgroup gives registers back, the consumer warpgroups take them. */
template <int kRegisters>
__device__ __forceinline__ void registers_decrease() {
#if MB_WGMMA_SM90
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

template <int kRegisters>
__device__ __forceinline__ void registers_increase() {
#if MB_WGMMA_SM90
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

/* Orders this thread's earlier register accesses before the warpgroup's next wgmma (all 128 threads execute it). */
__device__ __forceinline__ void wgmma_fence() {
#if MB_WGMMA_SM90
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if MB_WGMMA_SM90
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

/* Waits until at most kPending of this warpgroup's committed wgmma groups are in flight (groups finish in order). */
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if MB_WGMMA_SM90
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

/* Compiler-only fences on registers that an in-flight wgmma reads or writes (CUTLASS warpgroup_fence_operand): the
 * compiler must neither read an accumulator before the wgmma.wait_group that completes it nor reuse an A-fragment
 * register before that wait. */
template <int kCount>
__device__ __forceinline__ void fence_registers(float (&x)[kCount]) {
#pragma unroll
    for (int i = 0; i < kCount; i++) asm volatile("" : "+f"(x[i])::"memory");
}

template <int kSteps>
__device__ __forceinline__ void fence_registers(uint32_t (&x)[kSteps][4]) {
#pragma unroll
    for (int i = 0; i < kSteps; i++)
#pragma unroll
        for (int k = 0; k < 4; k++) asm volatile("" : "+r"(x[i][k])::"memory");
}

/* ---- wgmma.mma_async m64nNk16, bf16 × bf16 → fp32 (PTX ISA "Asynchronous Warpgroup Level Matrix
 * Multiply-Accumulate") ----
 * _ss: A and B from shared memory (matrix descriptors); _rs: A from registers (the register-A fragment, 4 × bf16x2),
 * B from shared memory. kTransA / kTransB = 1: A M-major / B N-major (the imm-trans operands). accumulate = 0
 * overwrites d (scale-d false). The _first forms always overwrite and take d write-only: with the read-write form the
 * compiler keeps d's previous values alive up to the wgmma (in the backward that kept a step's 64 Pᵀ and 64 dSᵀ values
 * across the whole step: ptxas spilled and serialized the wgmmas, C7512). Accumulator layout (CLayout_64xN): warp w of
 * the warpgroup owns rows 16w..16w+15; d[4j + 2h + c] is row 16w + lane/4 + 8h, column 8j + 2(lane%4) + c. */

/* The operand lists of these wrappers: the accumulator d[0..N) with constraint c ("+f" read and written, "=f"
 * written only), and the matching placeholders %0..%N-1 of the asm text. */
#define MB_WGMMA_D8(c, i) \
    c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), c(d[i + 4]), c(d[i + 5]), c(d[i + 6]), c(d[i + 7])
#define MB_WGMMA_D32(c) MB_WGMMA_D8(c, 0), MB_WGMMA_D8(c, 8), MB_WGMMA_D8(c, 16), MB_WGMMA_D8(c, 24)
#define MB_WGMMA_D64(c) \
    MB_WGMMA_D32(c), MB_WGMMA_D8(c, 32), MB_WGMMA_D8(c, 40), MB_WGMMA_D8(c, 48), MB_WGMMA_D8(c, 56)
#define MB_WGMMA_REGS32                                                                                                \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31}"
#define MB_WGMMA_REGS64                                                                                                \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
    "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
    "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n128_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#if MB_WGMMA_SM90
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " MB_WGMMA_REGS64
                 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
                 : MB_WGMMA_D64("+f")
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));
#endif
}

template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n128_ss_first(float (&d)[64], uint64_t desc_a, uint64_t desc_b) {
#if MB_WGMMA_SM90
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " MB_WGMMA_REGS64
                 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
                 : MB_WGMMA_D64("=f")
                 : "l"(desc_a), "l"(desc_b), "r"(0), "n"(kTransA), "n"(kTransB));
#endif
}

template <int kTransB>
__device__ __forceinline__ void wgmma_m64n128_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                 int accumulate) {
#if MB_WGMMA_SM90
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " MB_WGMMA_REGS64
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : MB_WGMMA_D64("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB));
#endif
}

template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n64_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#if MB_WGMMA_SM90
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MB_WGMMA_REGS32
                 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : MB_WGMMA_D32("+f")
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));
#endif
}

template <int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n64_ss_first(float (&d)[32], uint64_t desc_a, uint64_t desc_b) {
#if MB_WGMMA_SM90
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MB_WGMMA_REGS32
                 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : MB_WGMMA_D32("=f")
                 : "l"(desc_a), "l"(desc_b), "r"(0), "n"(kTransA), "n"(kTransB));
#endif
}

template <int kTransB>
__device__ __forceinline__ void wgmma_m64n64_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                int accumulate) {
#if MB_WGMMA_SM90
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MB_WGMMA_REGS32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : MB_WGMMA_D32("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB));
#endif
}

#undef MB_WGMMA_D8
#undef MB_WGMMA_D32
#undef MB_WGMMA_D64
#undef MB_WGMMA_REGS32
#undef MB_WGMMA_REGS64

}  // namespace

#endif
