/* cp.async (sm_80+): global -> shared copies that bypass registers, for the kernels that stage rows or tiles in
 * shared memory (attention, LayerNorm backward). Each thread commits its copies in groups and waits for its own
 * groups; a barrier (or an mbarrier) then publishes the data to the other threads. The `valid` forms pass a source
 * size of 0 for rows past a sequence, which writes zeros without reading the source.
 *
 * Everything here is internal to the including .cu file (anonymous namespace). */
#ifndef MB_CUDA_CP_ASYNC_CUH
#define MB_CUDA_CP_ASYNC_CUH

#include <stdint.h>

namespace {

/* 16 bytes to a shared-space address (the wgmma producers keep 32-bit addresses); zeros when !valid. */
__device__ __forceinline__ void cp_async_16_to(uint32_t shared_address, const void *global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address), "l"(global),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

/* The same to a generic pointer into shared memory. */
__device__ __forceinline__ void cp_async_16(void *shared, const void *global, bool valid) {
    cp_async_16_to(static_cast<uint32_t>(__cvta_generic_to_shared(shared)), global, valid);
}

/* 16 bytes whose source is known to be valid (no source-size operand): the wgmma producers' copies of whole tiles. */
__device__ __forceinline__ void cp_async_16_whole(uint32_t shared_address, const void *global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address), "l"(global) : "memory");
}

/* The same to a generic pointer into shared memory (the LayerNorm backward's rows). */
__device__ __forceinline__ void cp_async_16_whole(void *shared, const void *global) {
    cp_async_16_whole(static_cast<uint32_t>(__cvta_generic_to_shared(shared)), global);
}

/* 4 bytes (cached in L1: .ca); zeros when !valid. */
__device__ __forceinline__ void cp_async_4(void *shared, const void *global, bool valid) {
    uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(address), "l"(global), "r"(bytes) : "memory");
}

/* 4 bytes whose source is known to be valid. */
__device__ __forceinline__ void cp_async_4_whole(void *shared, const void *global) {
    uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(address), "l"(global) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

/* Waits until at most `kPending` of this thread's committed groups are still in flight. */
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace

#endif
