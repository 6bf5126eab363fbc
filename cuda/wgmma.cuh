/* Hopper (sm_90a) primitives shared by the wgmma attention kernels (attention_wgmma_fwd.cu, attention_wgmma_bwd.cu):
 * the 128-byte swizzle offset, shared addresses, the generic-to-async proxy fence, mbarrier init and arrive,
 * setmaxnreg, and wgmma fence / commit / wait with the register fences that keep the compiler away from accumulators
 * in flight. The asm exists in the sm_90a pass only; elsewhere (the sm_80 pass, which compiles those kernels with
 * empty bodies, and the host pass) the functions are empty, so code that calls them still parses. The waits differ
 * between the two kernels (a spin in the forward, a bounded wait in the backward) and stay in their files. */
#ifndef MB_CUDA_WGMMA_CUH
#define MB_CUDA_WGMMA_CUH

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MB_WGMMA_SM90 1
#else
#define MB_WGMMA_SM90 0
#endif

namespace {

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

}  // namespace

#endif
