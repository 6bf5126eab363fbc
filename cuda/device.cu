#include "device.h"

#include <cuda_runtime.h>
#include <stdio.h>

extern "C" int mb_cuda_device_count(mb_error *err) {
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        mb_fail(err, "no usable CUDA device: %s", cudaGetErrorString(status));
        cudaGetLastError();
        return 0;
    }
    if (count == 0) mb_fail(err, "no CUDA device found");
    return count;
}

extern "C" int mb_cuda_device_describe(int index, char *out, int out_size, mb_error *err) {
    cudaDeviceProp prop;
    cudaError_t status = cudaGetDeviceProperties(&prop, index);
    if (status != cudaSuccess) return mb_fail(err, "cudaGetDeviceProperties(%d): %s", index, cudaGetErrorString(status));
    snprintf(out, (size_t)out_size, "%s, CC %d.%d, %d SMs, %.1f GiB", prop.name, prop.major, prop.minor,
             prop.multiProcessorCount, (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return 0;
}
