/* GPU discovery, callable from C. Present in every build: without CUDA these report that no GPU exists. */
#ifndef MB_CUDA_DEVICE_H
#define MB_CUDA_DEVICE_H

#ifdef __cplusplus
extern "C" {
#endif

#include "common/error.h" /* inside extern "C": error.h has no guards of its own, and .cu files include this */

/* Number of usable CUDA devices; 0 (and a reason in err) when there is no driver, no device, or no CUDA build. */
int mb_cuda_device_count(mb_error *err);
/* Writes "NAME, CC x.y, N SMs, M GiB" for device `index` into out. */
int mb_cuda_device_describe(int index, char *out, int out_size, mb_error *err);

#ifdef __cplusplus
}
#endif

#endif
