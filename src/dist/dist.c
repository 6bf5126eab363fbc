/* The stand-in for the NCCL group in binaries built without CUDA (the strong definition is in cuda/comm.cu; see
 * src/model/backend.c for how weak stand-ins and the CUDA library fit together). */
#include "dist/dist.h"

__attribute__((weak)) int mb_dist_create_nccl(mb_dist **dist, const mb_dist_env *env, double timeout_seconds,
                                              mb_error *err) {
    (void)timeout_seconds;
    *dist = NULL;
    return mb_fail(err, "data parallelism over %d processes needs NCCL: this binary was built without CUDA "
                        "(configure with nvcc present or -Dcuda=enabled)", env->world_size);
}
