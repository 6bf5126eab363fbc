/* Backend selection: "cpu" (the fp32 reference), "cuda" (the GPU backend, cuda/backend_cuda.cu) or "auto" (cuda when
 * the binary carries the CUDA backend and a GPU is usable, else cpu).
 *
 * The core library is compiled without CUDA. It carries weak stand-ins for the two CUDA entry points it needs; the
 * CUDA static library (linked whole into CUDA builds, cuda/meson.build) provides the strong definitions, which the
 * linker prefers. A binary without the CUDA library therefore links and reports "built without CUDA". */
#include <stdio.h>
#include <string.h>

#include "model/backend.h"
#include "model/flops.h"

/* Weak fallbacks: replaced by cuda/backend_cuda.cu and cuda/device.cu when the CUDA library is linked. The
 * prototypes match cuda/backend_cuda.h and cuda/device.h (not includable here: the core has no CUDA include path). */
int mb_backend_create_cuda(mb_backend **backend, const mb_config *config, mb_error *err);
int mb_cuda_device_count(mb_error *err);

__attribute__((weak)) int mb_backend_create_cuda(mb_backend **backend, const mb_config *config, mb_error *err) {
    (void)backend;
    (void)config;
    return mb_fail(err, "the CUDA backend is not available: this binary was built without CUDA "
                        "(configure with nvcc present or -Dcuda=enabled)");
}

__attribute__((weak)) int mb_cuda_device_count(mb_error *err) {
    mb_fail(err, "this binary was built without CUDA (configure with nvcc present or -Dcuda=enabled)");
    return 0;
}

/* No weak stand-in for mb_cuda_device_describe here on purpose: the CUDA build forces device.cu's object in through
 * that symbol (-Wl,--undefined, cuda/meson.build), which is what makes its strong mb_cuda_device_count win. The device
 * name reaches the core through the backend's optional device_name op instead. */
double mb_backend_peak_flops(mb_backend *backend) {
    if (backend->ops->device_name == NULL) return 0.0;
    char name[256];
    if (backend->ops->device_name(backend, name, sizeof name) != 0) return 0.0;
    return mb_device_peak_flops(name);
}

int mb_backend_create(mb_backend **backend, const char *name, const mb_config *config, mb_error *err) {
    if (strcmp(name, "cpu") == 0) return mb_backend_create_cpu(backend, config, err);
    if (strcmp(name, "cuda") == 0) {
        mb_error device_err = {{0}};
        if (mb_cuda_device_count(&device_err) == 0)
            return mb_fail(err, "backend cuda is not usable: %s", device_err.message);
        return mb_backend_create_cuda(backend, config, err);
    }
    if (strcmp(name, "auto") == 0) {
        mb_error device_err = {{0}};
        if (mb_cuda_device_count(&device_err) > 0) return mb_backend_create_cuda(backend, config, err);
        return mb_backend_create_cpu(backend, config, err);
    }
    return mb_fail(err, "unknown backend '%s' (cpu, cuda or auto)", name);
}

int mb_backend_set_recompute(mb_backend *backend, mb_recompute level, mb_error *err) {
    if (level < MB_RECOMPUTE_NONE || level > MB_RECOMPUTE_MLP)
        return mb_fail(err, "recompute level %d is not one of none, norms, mlp", (int)level);
    if (backend->ops->set_recompute == NULL) return 0;
    return backend->ops->set_recompute(backend, level, err);
}

int mb_backend_synchronize(mb_backend *backend, mb_error *err) {
    return backend->ops->synchronize == NULL ? 0 : backend->ops->synchronize(backend, err);
}

static const char *const recompute_names[] = {"none", "norms", "mlp"};

int mb_recompute_from_name(const char *name, mb_recompute *level) {
    for (int k = 0; k <= MB_RECOMPUTE_MLP; k++)
        if (strcmp(name, recompute_names[k]) == 0) {
            *level = (mb_recompute)k;
            return 0;
        }
    return -1;
}

const char *mb_recompute_name(mb_recompute level) {
    return level >= MB_RECOMPUTE_NONE && level <= MB_RECOMPUTE_MLP ? recompute_names[level] : "?";
}
