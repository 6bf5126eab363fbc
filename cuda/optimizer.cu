/* StableAdamW with fully decoupled weight decay over many tensors at once (spec §5.3; the CPU version and the exact
 * formulas are in src/train/stableadamw.h). Per tensor θ with gradient g, moments m, v, step t:
 *   β̂ = β(1 − β^(t−1))/(1 − β^t)  (host, double),  m ← lerp(m, g, 1 − β̂1),  v ← β̂2·v + (1 − β̂2)·g²
 *   RMS = sqrt(mean(g² / max(v, ε²))),  η = lr / max(1, RMS)
 *   θ ← θ·(1 − (η/max_lr)·λ) (decayed tensors),  θ ← θ − η·m/(sqrt(v) + ε),  θ_bf16 = bf16(θ)
 * Global grad norm: sqrt(Σ g²) over all tensors.
 *
 * Multi-tensor: the tensors are cut into fixed chunks of kChunk elements; a chunk table (tensor, offset) built once at
 * creation lets one launch cover every tensor. A step is three launches and no host round trip:
 *   1. moments: update m, v per chunk and write the chunk's Σ g²/max(v, ε²) (double) to a partial array;
 *   2. scalars: one block per tensor adds its chunks' partials in chunk order → RMS, η and the decay factor;
 *   3. params:  apply decay and the Adam step with the tensor's η, refresh the bf16 copy.
 * The elementwise arithmetic uses explicitly rounded fp32 intrinsics (no FMA contraction) in the CPU's operation
 * order, so m and v match the CPU bit for bit; only the order of the double RMS sum differs. Every sum has a fixed
 * order: results are bit-reproducible. */
#include <stdlib.h>

#include "common.cuh"
#include "ops.h"

namespace {

constexpr int kChunk = 1 << 16, kThreads = 256;

struct device_tensor {
    float *param;
    const float *grad;
    float *m, *v;
    mb::bf16 *param_bf16;
    size_t numel;
    int decay;
    int first_chunk, chunk_count;
};

struct chunk_ref {
    int tensor;
    size_t offset;
};

/* Per-tensor scalars produced by stage 2 for stage 3. */
struct tensor_step {
    float neg_lr;       /* −η */
    float decay_factor; /* 1 − (η/max_lr)·λ, or 1 */
    int apply_decay;
};

/* torch.lerp: exact at both ends (same formula as the CPU, explicitly rounded). */
__device__ __forceinline__ float lerp_rn(float start, float end, float weight) {
    float diff = __fsub_rn(end, start);
    return fabsf(weight) < 0.5f ? __fadd_rn(start, __fmul_rn(weight, diff))
                                : __fsub_rn(end, __fmul_rn(diff, __fsub_rn(1.0f, weight)));
}

__global__ void __launch_bounds__(kThreads)
    adamw_moments_kernel(double *chunk_partial, const device_tensor *tensors, const chunk_ref *chunks,
                         float beta1_comp, float beta2_hat, float beta2_comp, float eps_sq) {
    __shared__ double reduce[32];
    chunk_ref chunk = chunks[blockIdx.x];
    const device_tensor t = tensors[chunk.tensor];
    size_t end = chunk.offset + kChunk < t.numel ? chunk.offset + kChunk : t.numel;
    double sum = 0.0;
    for (size_t i = chunk.offset + threadIdx.x; i < end; i += blockDim.x) {
        float g = t.grad[i], g2 = __fmul_rn(g, g);
        t.m[i] = lerp_rn(t.m[i], g, beta1_comp);
        float v = __fadd_rn(__fmul_rn(t.v[i], beta2_hat), __fmul_rn(beta2_comp, g2));
        t.v[i] = v;
        sum += (double)__fdiv_rn(g2, fmaxf(v, eps_sq));
    }
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) chunk_partial[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kThreads)
    adamw_scalars_kernel(tensor_step *steps, double *rms_out, const double *chunk_partial,
                         const device_tensor *tensors, double lr, double max_lr, double weight_decay) {
    __shared__ double reduce[32];
    const device_tensor t = tensors[blockIdx.x];
    double sum = 0.0;
    for (int c = threadIdx.x; c < t.chunk_count; c += blockDim.x) sum += chunk_partial[t.first_chunk + c];
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x != 0) return;
    double rms = sqrt(sum / (double)t.numel);
    rms_out[blockIdx.x] = rms;
    double step_size = lr / fmax(1.0, rms); /* fmax(1, NaN) = 1, as the CPU */
    int apply_decay = t.decay && weight_decay != 0.0;
    steps[blockIdx.x].neg_lr = (float)-step_size;
    steps[blockIdx.x].decay_factor = apply_decay ? (float)(1.0 - (step_size / max_lr) * weight_decay) : 1.0f;
    steps[blockIdx.x].apply_decay = apply_decay;
}

__global__ void __launch_bounds__(kThreads)
    adamw_params_kernel(const device_tensor *tensors, const chunk_ref *chunks, const tensor_step *steps, float eps) {
    chunk_ref chunk = chunks[blockIdx.x];
    const device_tensor t = tensors[chunk.tensor];
    const tensor_step s = steps[chunk.tensor];
    size_t end = chunk.offset + kChunk < t.numel ? chunk.offset + kChunk : t.numel;
    for (size_t i = chunk.offset + threadIdx.x; i < end; i += blockDim.x) {
        float theta = t.param[i];
        if (s.apply_decay) theta = __fmul_rn(theta, s.decay_factor);
        float denom = __fadd_rn(__fsqrt_rn(t.v[i]), eps);
        theta = __fadd_rn(theta, __fmul_rn(s.neg_lr, __fdiv_rn(t.m[i], denom)));
        t.param[i] = theta;
        if (t.param_bf16 != nullptr) t.param_bf16[i] = mb::to_bf16(theta);
    }
}

__global__ void __launch_bounds__(kThreads)
    grad_squares_kernel(double *chunk_partial, const device_tensor *tensors, const chunk_ref *chunks) {
    __shared__ double reduce[32];
    chunk_ref chunk = chunks[blockIdx.x];
    const device_tensor t = tensors[chunk.tensor];
    size_t end = chunk.offset + kChunk < t.numel ? chunk.offset + kChunk : t.numel;
    double sum = 0.0;
    for (size_t i = chunk.offset + threadIdx.x; i < end; i += blockDim.x) sum += (double)t.grad[i] * t.grad[i];
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) chunk_partial[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(1024) sum_sqrt_kernel(double *norm, const double *partial, int count) {
    __shared__ double reduce[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partial[i];
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) *norm = sqrt(sum);
}

__global__ void to_bf16_kernel(mb::bf16 *dst, const float *src, size_t count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = mb::to_bf16(src[i]);
}

int check_hyperparameters(const mb_stableadamw *opt, double lr, mb_error *err) {
    MB_REQUIRE(err, opt->beta1 >= 0.0 && opt->beta1 < 1.0 && opt->beta2 >= 0.0 && opt->beta2 < 1.0,
               "stableadamw: betas must be in [0, 1), got %g, %g", opt->beta1, opt->beta2);
    MB_REQUIRE(err, opt->eps >= 0.0 && isfinite(opt->eps), "stableadamw: eps must be >= 0, got %g", opt->eps);
    MB_REQUIRE(err, lr >= 0.0 && isfinite(lr), "stableadamw: lr must be finite and >= 0, got %g", lr);
    MB_REQUIRE(err, opt->weight_decay >= 0.0 && isfinite(opt->weight_decay),
               "stableadamw: weight_decay must be >= 0, got %g", opt->weight_decay);
    MB_REQUIRE(err, opt->weight_decay == 0.0 || (opt->max_lr > 0.0 && isfinite(opt->max_lr)),
               "stableadamw: max_lr must be > 0 when weight_decay is set, got %g", opt->max_lr);
    MB_REQUIRE(err, opt->step >= 0 && opt->step < INT64_MAX, "stableadamw: invalid step counter %lld",
               (long long)opt->step);
    return 0;
}

/* β̂ = (β^t − β)/(β^t − 1), as optimi's debias_beta and the CPU step. */
double debias_beta(double beta, int64_t t) {
    double beta_t = pow(beta, (double)t);
    return (beta_t - beta) / (beta_t - 1.0);
}

}  // namespace

struct mb_cuda_adamw {
    int tensor_count, chunk_count;
    device_tensor *tensors; /* device */
    chunk_ref *chunks;      /* device */
    double *chunk_partial;  /* device [chunk_count] */
    tensor_step *steps;     /* device [tensor_count] */
    double *rms;            /* device [tensor_count] */
};

extern "C" void mb_cuda_adamw_destroy(mb_cuda_adamw *a) {
    if (a == nullptr) return;
    cudaFree(a->tensors);
    cudaFree(a->chunks);
    cudaFree(a->chunk_partial);
    cudaFree(a->steps);
    cudaFree(a->rms);
    free(a);
}

static int upload_tables(mb_cuda_adamw *a, const mb_cuda_adamw_tensor *tensors, mb_error *err) {
    device_tensor *host_tensors = static_cast<device_tensor *>(calloc((size_t)a->tensor_count, sizeof(device_tensor)));
    chunk_ref *host_chunks = static_cast<chunk_ref *>(calloc((size_t)a->chunk_count, sizeof(chunk_ref)));
    if (host_tensors == nullptr || host_chunks == nullptr) {
        free(host_tensors);
        free(host_chunks);
        return mb_fail(err, "stableadamw: out of host memory for the chunk table");
    }
    int chunk = 0;
    for (int i = 0; i < a->tensor_count; i++) {
        const mb_cuda_adamw_tensor *src = &tensors[i];
        device_tensor *t = &host_tensors[i];
        t->param = src->param;
        t->grad = src->grad;
        t->m = src->m;
        t->v = src->v;
        t->param_bf16 = reinterpret_cast<mb::bf16 *>(src->param_bf16);
        t->numel = src->numel;
        t->decay = src->decay;
        t->first_chunk = chunk;
        t->chunk_count = (int)mb::ceil_div(src->numel, (size_t)kChunk);
        for (int c = 0; c < t->chunk_count; c++) host_chunks[chunk++] = {i, (size_t)c * kChunk};
    }
    cudaError_t status = cudaMemcpy(a->tensors, host_tensors, (size_t)a->tensor_count * sizeof(device_tensor),
                                    cudaMemcpyHostToDevice);
    if (status == cudaSuccess)
        status = cudaMemcpy(a->chunks, host_chunks, (size_t)a->chunk_count * sizeof(chunk_ref), cudaMemcpyHostToDevice);
    free(host_tensors);
    free(host_chunks);
    if (status != cudaSuccess) return mb_fail(err, "stableadamw: uploading the tensor table: %s", cudaGetErrorString(status));
    return 0;
}

extern "C" int mb_cuda_adamw_create(mb_cuda_adamw **out, const mb_cuda_adamw_tensor *tensors, int count,
                                    mb_error *err) {
    *out = nullptr;
    MB_REQUIRE(err, tensors != nullptr && count > 0, "stableadamw: no tensors");
    size_t chunks = 0;
    for (int i = 0; i < count; i++) {
        const mb_cuda_adamw_tensor *t = &tensors[i];
        MB_REQUIRE(err, t->numel > 0, "stableadamw: tensor %d: numel is 0", i);
        MB_REQUIRE(err, t->param && t->grad && t->m && t->v, "stableadamw: tensor %d: missing param/grad/m/v", i);
        chunks += mb::ceil_div(t->numel, (size_t)kChunk);
    }
    MB_REQUIRE(err, chunks < (1u << 31), "stableadamw: %zu chunks are too many", chunks);
    mb_cuda_adamw *a = static_cast<mb_cuda_adamw *>(calloc(1, sizeof(mb_cuda_adamw)));
    if (a == nullptr) return mb_fail(err, "stableadamw: out of host memory");
    a->tensor_count = count;
    a->chunk_count = (int)chunks;
    cudaError_t status = cudaMalloc(&a->tensors, (size_t)count * sizeof(device_tensor));
    if (status == cudaSuccess) status = cudaMalloc(&a->chunks, chunks * sizeof(chunk_ref));
    if (status == cudaSuccess) status = cudaMalloc(&a->chunk_partial, chunks * sizeof(double));
    if (status == cudaSuccess) status = cudaMalloc(&a->steps, (size_t)count * sizeof(tensor_step));
    if (status == cudaSuccess) status = cudaMalloc(&a->rms, (size_t)count * sizeof(double));
    if (status != cudaSuccess) {
        mb_cuda_adamw_destroy(a);
        return mb_fail(err, "stableadamw: cudaMalloc: %s", cudaGetErrorString(status));
    }
    if (upload_tables(a, tensors, err) != 0) {
        mb_cuda_adamw_destroy(a);
        return -1;
    }
    *out = a;
    return 0;
}

extern "C" int mb_cuda_adamw_step(mb_cuda_adamw *a, mb_stableadamw *opt, double lr, cudaStream_t stream,
                                  mb_error *err) {
    MB_REQUIRE(err, a != nullptr && opt != nullptr, "stableadamw: missing optimizer");
    if (check_hyperparameters(opt, lr, err) != 0) return -1;
    MB_NVTX_RANGE("stableadamw_step");
    int64_t t = opt->step + 1;
    double beta1_hat = debias_beta(opt->beta1, t), beta2_hat = debias_beta(opt->beta2, t);
    float eps = (float)opt->eps, eps_sq = (float)(opt->eps * opt->eps);
    adamw_moments_kernel<<<a->chunk_count, kThreads, 0, stream>>>(a->chunk_partial, a->tensors, a->chunks,
                                                                 (float)(1.0 - beta1_hat), (float)beta2_hat,
                                                                 (float)(1.0 - beta2_hat), eps_sq);
    MB_CUDA_CHECK_LAUNCH(err, "adamw_moments_kernel");
    adamw_scalars_kernel<<<a->tensor_count, kThreads, 0, stream>>>(a->steps, a->rms, a->chunk_partial, a->tensors, lr,
                                                                  opt->max_lr, opt->weight_decay);
    MB_CUDA_CHECK_LAUNCH(err, "adamw_scalars_kernel");
    adamw_params_kernel<<<a->chunk_count, kThreads, 0, stream>>>(a->tensors, a->chunks, a->steps, eps);
    MB_CUDA_CHECK_LAUNCH(err, "adamw_params_kernel");
    opt->step = t;
    return 0;
}

extern "C" const double *mb_cuda_adamw_rms(const mb_cuda_adamw *a) { return a->rms; }

extern "C" int mb_cuda_grad_norm(mb_cuda_adamw *a, double *norm, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, a != nullptr && norm != nullptr, "grad_norm: missing optimizer or output");
    grad_squares_kernel<<<a->chunk_count, kThreads, 0, stream>>>(a->chunk_partial, a->tensors, a->chunks);
    MB_CUDA_CHECK_LAUNCH(err, "grad_squares_kernel");
    sum_sqrt_kernel<<<1, 1024, 0, stream>>>(norm, a->chunk_partial, a->chunk_count);
    MB_CUDA_CHECK_LAUNCH(err, "sum_sqrt_kernel");
    return 0;
}

extern "C" int mb_cuda_to_bf16(mb_bf16 *dst, const float *src, size_t count, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, dst && src, "to_bf16: missing dst or src");
    if (count == 0) return 0;
    int blocks = (int)(count / 256 + 1 < 65536 ? count / 256 + 1 : 65536);
    to_bf16_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<mb::bf16 *>(dst), src, count);
    MB_CUDA_CHECK_LAUNCH(err, "to_bf16_kernel");
    return 0;
}
