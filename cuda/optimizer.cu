/* StableAdamW with fully decoupled weight decay over many tensors at once (spec §5.3; the CPU version and the exact
 * formulas are in src/train/stableadamw.h). Per tensor θ with gradient g, moments m, v, step t:
 *   β̂ = β(1 − β^(t−1))/(1 − β^t)  (host, double),  m ← lerp(m, g, 1 − β̂1),  v ← β̂2·v + (1 − β̂2)·g²
 *   RMS = sqrt(mean(g² / max(v, ε²))),  η = lr / max(1, RMS)
 *   θ ← θ·(1 − (η/max_lr)·λ) (decayed tensors),  θ ← θ − η·m/(sqrt(v) + ε),  θ_bf16 = bf16(θ)
 * Global grad norm: sqrt(Σ g²) over all tensors.
 *
 * Multi-tensor: the tensors are cut into fixed chunks of kChunk elements; a chunk table (tensor, offset) built once at
 * creation lets one launch cover every tensor. A step is four launches and no host round trip:
 *   1. moments: update m, v per chunk and write the chunk's Σ g²/max(v, ε²) (double) to a partial array;
 *   2. group sums: one block per group (a parameter tensor) adds its chunks' partials in chunk order;
 *   3. scalars: RMS over the group's full size, η and the decay factor per group;
 *   4. params:  apply decay and the Adam step with the group's η, refresh the bf16 copy.
 * Groups exist for ZeRO-1 (model/zero_plan.h): a rank then holds only pieces of each tensor, and the data-parallel
 * caller sums the group sums over all ranks between stages 2 and 3 (mb_cuda_adamw_moments / _apply), so the RMS, and
 * with it the update, is the one a single GPU would compute. Without groups each tensor is its own group.
 * The elementwise arithmetic uses explicitly rounded fp32 intrinsics (no FMA contraction) in the CPU's operation
 * order, so m and v match the CPU bit for bit; only the order of the double RMS sum differs. Every sum has a fixed
 * order: results are bit-reproducible. Stages 1 and 4 are memory-bound (20 and 18 bytes per element): they move
 * 16-byte words, several per thread in flight (see "vector access" below). */
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
    int group;
    int first_chunk, chunk_count;
};

/* A parameter tensor as the RMS sees it: all its pieces, on every rank. */
struct device_group {
    size_t numel;
    int decay;
    int first_chunk, chunk_count; /* this rank's chunks of the group's pieces (consecutive) */
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

/* ---- vector access: the kernels stream 16-byte float4 words (8-byte words of 4 bf16) with kUnroll words of every
 * operand in flight per thread; the elements of a chunk before the first aligned word and after the last whole word
 * go element by element. Chunk offsets are multiples of 4 elements, so a tensor whose pointers share one alignment
 * phase vectorizes every chunk; pointers whose phases differ (a ZeRO piece, a tensor behind an odd-sized one) run
 * element by element, with the same arithmetic. */

constexpr int kUnroll = 4;

/* Elements from `address` up to the next multiple of `vector_bytes`; −1 if it is not even element-aligned. */
__device__ __forceinline__ int lead_elements(const void *address, int element_bytes, int vector_bytes) {
    int misaligned = (int)(reinterpret_cast<uintptr_t>(address) % (uintptr_t)vector_bytes);
    if (misaligned % element_bytes != 0) return -1;
    return (vector_bytes - misaligned) % vector_bytes / element_bytes;
}

__device__ __forceinline__ int float_lead(const float *address) { return lead_elements(address, 4, 16); }
__device__ __forceinline__ int bf16_lead(const mb::bf16 *address) { return lead_elements(address, 2, 8); }
/* The lead all pointers share, or −1 (no common phase: no vectors). */
__device__ __forceinline__ int same_lead(int a, int b) { return a == b ? a : -1; }

/* A chunk [begin, end): whole 4-element vectors over [vector_begin, vector_end), single elements elsewhere. */
struct chunk_span {
    size_t begin, vector_begin, vector_end, end;
    __device__ int vectors() const { return (int)((vector_end - vector_begin) / 4); }
};

__device__ __forceinline__ chunk_span split_chunk(size_t begin, size_t numel, int lead) {
    size_t end = begin + kChunk < numel ? begin + kChunk : numel;
    chunk_span span{begin, end, end, end}; /* all single elements */
    if (lead >= 0 && (size_t)lead < end - begin) {
        span.vector_begin = begin + (size_t)lead;
        span.vector_end = span.vector_begin + (end - span.vector_begin) / 4 * 4;
    }
    return span;
}

__device__ __forceinline__ float &component(float4 &x, int k) {
    return k == 0 ? x.x : k == 1 ? x.y : k == 2 ? x.z : x.w;
}

/* Four bf16 = bf16(x) (round to nearest even, element by element) in one 8-byte store. */
__device__ __forceinline__ void store_bf16x4(mb::bf16 *address, const float4 &x) {
    mb::bf162 low = __halves2bfloat162(mb::to_bf16(x.x), mb::to_bf16(x.y));
    mb::bf162 high = __halves2bfloat162(mb::to_bf16(x.z), mb::to_bf16(x.w));
    uint2 raw = make_uint2(*reinterpret_cast<uint32_t *>(&low), *reinterpret_cast<uint32_t *>(&high));
    __stcg(reinterpret_cast<uint2 *>(address), raw);
}

/* Words base + u·kThreads (u < kUnroll, those below `vectors`) of three arrays, every load issued before any use. */
__device__ __forceinline__ void load_words(float4 (&a)[kUnroll], float4 (&b)[kUnroll], float4 (&c)[kUnroll],
                                           const float4 *a_words, const float4 *b_words, const float4 *c_words,
                                           int base, int vectors) {
#pragma unroll
    for (int u = 0; u < kUnroll; u++) {
        int j = base + u * kThreads;
        if (j < vectors) a[u] = __ldcg(a_words + j), b[u] = __ldcg(b_words + j), c[u] = __ldcg(c_words + j);
    }
}

/* ---- per-element arithmetic (the CPU's operation order, every operation explicitly rounded) ---- */

struct moment_rule {
    float beta1_comp, beta2_hat, beta2_comp, eps_sq;
    /* m ← lerp(m, g, 1 − β̂1), v ← β̂2·v + (1 − β̂2)·g²; returns the element's g²/max(v, ε²). */
    __device__ __forceinline__ double apply(float g, float &m, float &v) const {
        float g2 = __fmul_rn(g, g);
        m = lerp_rn(m, g, beta1_comp);
        v = __fadd_rn(__fmul_rn(v, beta2_hat), __fmul_rn(beta2_comp, g2));
        return (double)__fdiv_rn(g2, fmaxf(v, eps_sq));
    }
};

struct param_rule {
    tensor_step step;
    float eps;
    /* θ·decay (decayed tensors), then θ − η·m/(sqrt(v) + ε). */
    __device__ __forceinline__ float apply(float theta, float m, float v) const {
        if (step.apply_decay) theta = __fmul_rn(theta, step.decay_factor);
        float denom = __fadd_rn(__fsqrt_rn(v), eps);
        return __fadd_rn(theta, __fmul_rn(step.neg_lr, __fdiv_rn(m, denom)));
    }
};

/* Sums of one thread, in a fixed order: its vectors (u, then x y z w), then its leading, then its trailing elements.
 * The block adds the threads' sums in a fixed tree (block_sum): the chunk partial is bit-reproducible. */
__global__ void __launch_bounds__(kThreads)
    adamw_moments_kernel(double *chunk_partial, const device_tensor *tensors, const chunk_ref *chunks,
                         float beta1_comp, float beta2_hat, float beta2_comp, float eps_sq) {
    __shared__ double reduce[32];
    const chunk_ref chunk = chunks[blockIdx.x];
    const device_tensor t = tensors[chunk.tensor];
    const float *__restrict__ grad = t.grad;
    float *__restrict__ m = t.m;
    float *__restrict__ v = t.v;
    const size_t at = chunk.offset;
    const chunk_span span =
        split_chunk(at, t.numel, same_lead(same_lead(float_lead(grad + at), float_lead(m + at)), float_lead(v + at)));
    const moment_rule rule{beta1_comp, beta2_hat, beta2_comp, eps_sq};
    const float4 *grad4 = reinterpret_cast<const float4 *>(grad + span.vector_begin);
    float4 *m4 = reinterpret_cast<float4 *>(m + span.vector_begin);
    float4 *v4 = reinterpret_cast<float4 *>(v + span.vector_begin);
    const int vectors = span.vectors();
    double sum = 0.0;
    for (int base = threadIdx.x; base < vectors; base += kUnroll * kThreads) {
        float4 gu[kUnroll], mu[kUnroll], vu[kUnroll];
        load_words(gu, mu, vu, grad4, m4, v4, base, vectors);
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            int j = base + u * kThreads;
            if (j >= vectors) continue;
#pragma unroll
            for (int k = 0; k < 4; k++)
                sum += rule.apply(component(gu[u], k), component(mu[u], k), component(vu[u], k));
            __stcg(m4 + j, mu[u]);
            __stcg(v4 + j, vu[u]);
        }
    }
    for (size_t i = span.begin + threadIdx.x; i < span.vector_begin; i += kThreads)
        sum += rule.apply(grad[i], m[i], v[i]);
    for (size_t i = span.vector_end + threadIdx.x; i < span.end; i += kThreads)
        sum += rule.apply(grad[i], m[i], v[i]);
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) chunk_partial[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kThreads)
    adamw_group_sums_kernel(double *group_sums, const double *chunk_partial, const device_group *groups) {
    __shared__ double reduce[32];
    const device_group g = groups[blockIdx.x];
    double sum = 0.0;
    for (int c = threadIdx.x; c < g.chunk_count; c += blockDim.x) sum += chunk_partial[g.first_chunk + c];
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) group_sums[blockIdx.x] = sum;
}

__global__ void adamw_scalars_kernel(tensor_step *steps, double *rms_out, const double *group_sums,
                                     const device_group *groups, int group_count, double lr, double max_lr,
                                     double weight_decay) {
    int index = blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= group_count) return;
    const device_group g = groups[index];
    double rms = sqrt(group_sums[index] / (double)g.numel);
    rms_out[index] = rms;
    double step_size = lr / fmax(1.0, rms); /* fmax(1, NaN) = 1, as the CPU */
    int apply_decay = g.decay && weight_decay != 0.0;
    steps[index].neg_lr = (float)-step_size;
    steps[index].decay_factor = apply_decay ? (float)(1.0 - (step_size / max_lr) * weight_decay) : 1.0f;
    steps[index].apply_decay = apply_decay;
}

__device__ __forceinline__ void param_element(const param_rule &rule, float *param, const float *m, const float *v,
                                              mb::bf16 *param_bf16, size_t i) {
    float theta = rule.apply(param[i], m[i], v[i]);
    param[i] = theta;
    if (param_bf16 != nullptr) param_bf16[i] = mb::to_bf16(theta);
}

__global__ void __launch_bounds__(kThreads, 3)
    adamw_params_kernel(const device_tensor *tensors, const chunk_ref *chunks, const tensor_step *steps, float eps) {
    const chunk_ref chunk = chunks[blockIdx.x];
    const device_tensor t = tensors[chunk.tensor];
    const param_rule rule{steps[t.group], eps};
    float *__restrict__ param = t.param;
    const float *__restrict__ m = t.m;
    const float *__restrict__ v = t.v;
    mb::bf16 *__restrict__ param_bf16 = t.param_bf16;
    const size_t at = chunk.offset;
    int lead = same_lead(same_lead(float_lead(param + at), float_lead(m + at)), float_lead(v + at));
    if (param_bf16 != nullptr) lead = same_lead(lead, bf16_lead(param_bf16 + at));
    const chunk_span span = split_chunk(at, t.numel, lead);
    float4 *param4 = reinterpret_cast<float4 *>(param + span.vector_begin);
    const float4 *m4 = reinterpret_cast<const float4 *>(m + span.vector_begin);
    const float4 *v4 = reinterpret_cast<const float4 *>(v + span.vector_begin);
    mb::bf16 *copy = param_bf16 != nullptr ? param_bf16 + span.vector_begin : nullptr;
    const int vectors = span.vectors();
    for (int base = threadIdx.x; base < vectors; base += kUnroll * kThreads) {
        float4 pu[kUnroll], mu[kUnroll], vu[kUnroll];
        load_words(pu, mu, vu, param4, m4, v4, base, vectors);
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            int j = base + u * kThreads;
            if (j >= vectors) continue;
#pragma unroll
            for (int k = 0; k < 4; k++)
                component(pu[u], k) = rule.apply(component(pu[u], k), component(mu[u], k), component(vu[u], k));
            __stcg(param4 + j, pu[u]);
            if (copy != nullptr) store_bf16x4(copy + 4 * (size_t)j, pu[u]);
        }
    }
    for (size_t i = span.begin + threadIdx.x; i < span.vector_begin; i += kThreads)
        param_element(rule, param, m, v, param_bf16, i);
    for (size_t i = span.vector_end + threadIdx.x; i < span.end; i += kThreads)
        param_element(rule, param, m, v, param_bf16, i);
}

/* Σ g² in double (exact squares of floats), summed in the moments kernel's order. */
__global__ void __launch_bounds__(kThreads)
    grad_squares_kernel(double *chunk_partial, const device_tensor *tensors, const chunk_ref *chunks) {
    __shared__ double reduce[32];
    const chunk_ref chunk = chunks[blockIdx.x];
    const device_tensor t = tensors[chunk.tensor];
    const float *__restrict__ grad = t.grad;
    const chunk_span span = split_chunk(chunk.offset, t.numel, float_lead(grad + chunk.offset));
    const float4 *grad4 = reinterpret_cast<const float4 *>(grad + span.vector_begin);
    const int vectors = span.vectors();
    double sum = 0.0;
    for (int base = threadIdx.x; base < vectors; base += kUnroll * kThreads) {
        float4 gu[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            int j = base + u * kThreads;
            if (j < vectors) gu[u] = __ldcg(grad4 + j);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            if (base + u * kThreads >= vectors) continue;
#pragma unroll
            for (int k = 0; k < 4; k++) sum += (double)component(gu[u], k) * component(gu[u], k);
        }
    }
    for (size_t i = span.begin + threadIdx.x; i < span.vector_begin; i += kThreads) sum += (double)grad[i] * grad[i];
    for (size_t i = span.vector_end + threadIdx.x; i < span.end; i += kThreads) sum += (double)grad[i] * grad[i];
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) chunk_partial[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(1024) sum_sqrt_kernel(double *norm, const double *partial, int count, int root) {
    __shared__ double reduce[32];
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partial[i];
    sum = mb::block_sum(sum, reduce);
    if (threadIdx.x == 0) *norm = root ? sqrt(sum) : sum;
}

__global__ void sqrt_kernel(double *value) { *value = sqrt(*value); }

/* vector (src 16-byte and dst 8-byte aligned): count / 4 whole vectors, then the last count % 4 elements. */
__global__ void to_bf16_kernel(mb::bf16 *dst, const float *src, size_t count, int vector) {
    size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t vectors = vector ? count / 4 : 0;
    const float4 *src4 = reinterpret_cast<const float4 *>(src);
    for (size_t k = first; k < vectors; k += stride) store_bf16x4(dst + 4 * k, __ldcg(src4 + k));
    for (size_t i = 4 * vectors + first; i < count; i += stride) dst[i] = mb::to_bf16(src[i]);
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
    int tensor_count, chunk_count, group_count;
    device_tensor *tensors; /* device */
    chunk_ref *chunks;      /* device */
    device_group *groups;   /* device [group_count] */
    double *chunk_partial;  /* device [chunk_count] */
    double *group_sums;     /* device [group_count] */
    tensor_step *steps;     /* device [group_count] */
    double *rms;            /* device [group_count] */
};

extern "C" void mb_cuda_adamw_destroy(mb_cuda_adamw *a) {
    if (a == nullptr) return;
    cudaFree(a->tensors);
    cudaFree(a->chunks);
    cudaFree(a->groups);
    cudaFree(a->chunk_partial);
    cudaFree(a->group_sums);
    cudaFree(a->steps);
    cudaFree(a->rms);
    free(a);
}

/* Host copies of the tables; pieces of one group must be consecutive (their chunks then are too). */
static int build_tables(mb_cuda_adamw *a, const mb_cuda_adamw_tensor *tensors, const mb_cuda_adamw_group *groups,
                        device_tensor *host_tensors, chunk_ref *host_chunks, device_group *host_groups, mb_error *err) {
    for (int g = 0; g < a->group_count; g++) host_groups[g] = device_group{groups[g].numel, groups[g].decay, 0, 0};
    int chunk = 0, previous_group = -1;
    for (int i = 0; i < a->tensor_count; i++) {
        const mb_cuda_adamw_tensor *src = &tensors[i];
        device_tensor *t = &host_tensors[i];
        MB_REQUIRE(err, src->group >= 0 && src->group < a->group_count, "stableadamw: piece %d: group %d of %d", i,
                   src->group, a->group_count);
        device_group *g = &host_groups[src->group];
        MB_REQUIRE(err, src->group == previous_group || g->chunk_count == 0,
                   "stableadamw: the pieces of group %d are not consecutive", src->group);
        *t = device_tensor{src->param, src->grad, src->m, src->v, reinterpret_cast<mb::bf16 *>(src->param_bf16),
                           src->numel, src->group, chunk, (int)mb::ceil_div(src->numel, (size_t)kChunk)};
        if (g->chunk_count == 0) g->first_chunk = chunk;
        g->chunk_count += t->chunk_count;
        for (int c = 0; c < t->chunk_count; c++) host_chunks[chunk++] = {i, (size_t)c * kChunk};
        previous_group = src->group;
    }
    return 0;
}

static int upload_tables(mb_cuda_adamw *a, const mb_cuda_adamw_tensor *tensors, const mb_cuda_adamw_group *groups,
                         mb_error *err) {
    device_tensor *host_tensors = static_cast<device_tensor *>(calloc((size_t)a->tensor_count, sizeof(device_tensor)));
    chunk_ref *host_chunks = static_cast<chunk_ref *>(calloc((size_t)a->chunk_count, sizeof(chunk_ref)));
    device_group *host_groups = static_cast<device_group *>(calloc((size_t)a->group_count, sizeof(device_group)));
    int rc = 0;
    if (host_tensors == nullptr || host_chunks == nullptr || host_groups == nullptr)
        rc = mb_fail(err, "stableadamw: out of host memory for the chunk table");
    if (rc == 0) rc = build_tables(a, tensors, groups, host_tensors, host_chunks, host_groups, err);
    cudaError_t status = cudaSuccess;
    if (rc == 0)
        status = cudaMemcpy(a->tensors, host_tensors, (size_t)a->tensor_count * sizeof(device_tensor),
                            cudaMemcpyHostToDevice);
    if (rc == 0 && status == cudaSuccess)
        status = cudaMemcpy(a->chunks, host_chunks, (size_t)a->chunk_count * sizeof(chunk_ref), cudaMemcpyHostToDevice);
    if (rc == 0 && status == cudaSuccess)
        status = cudaMemcpy(a->groups, host_groups, (size_t)a->group_count * sizeof(device_group),
                            cudaMemcpyHostToDevice);
    free(host_tensors);
    free(host_chunks);
    free(host_groups);
    if (rc != 0) return -1;
    if (status != cudaSuccess) return mb_fail(err, "stableadamw: uploading the tensor table: %s", cudaGetErrorString(status));
    return 0;
}

static int allocate_tables(mb_cuda_adamw *a, mb_error *err) {
    size_t tensors = (size_t)a->tensor_count, chunks = (size_t)a->chunk_count, groups = (size_t)a->group_count;
    cudaError_t status = cudaMalloc(&a->tensors, (tensors ? tensors : 1) * sizeof(device_tensor));
    if (status == cudaSuccess) status = cudaMalloc(&a->chunks, (chunks ? chunks : 1) * sizeof(chunk_ref));
    if (status == cudaSuccess) status = cudaMalloc(&a->groups, groups * sizeof(device_group));
    if (status == cudaSuccess) status = cudaMalloc(&a->chunk_partial, (chunks ? chunks : 1) * sizeof(double));
    if (status == cudaSuccess) status = cudaMalloc(&a->group_sums, groups * sizeof(double));
    if (status == cudaSuccess) status = cudaMalloc(&a->steps, groups * sizeof(tensor_step));
    if (status == cudaSuccess) status = cudaMalloc(&a->rms, groups * sizeof(double));
    if (status != cudaSuccess) return mb_fail(err, "stableadamw: cudaMalloc: %s", cudaGetErrorString(status));
    return 0;
}

extern "C" int mb_cuda_adamw_create_grouped(mb_cuda_adamw **out, const mb_cuda_adamw_tensor *tensors, int count,
                                            const mb_cuda_adamw_group *groups, int group_count, mb_error *err) {
    *out = nullptr;
    MB_REQUIRE(err, tensors != nullptr || count == 0, "stableadamw: no tensors");
    MB_REQUIRE(err, count >= 0 && groups != nullptr && group_count > 0, "stableadamw: no groups");
    size_t chunks = 0;
    for (int i = 0; i < count; i++) {
        const mb_cuda_adamw_tensor *t = &tensors[i];
        MB_REQUIRE(err, t->numel > 0, "stableadamw: tensor %d: numel is 0", i);
        MB_REQUIRE(err, t->param && t->grad && t->m && t->v, "stableadamw: tensor %d: missing param/grad/m/v", i);
        chunks += mb::ceil_div(t->numel, (size_t)kChunk);
    }
    for (int g = 0; g < group_count; g++) MB_REQUIRE(err, groups[g].numel > 0, "stableadamw: group %d is empty", g);
    MB_REQUIRE(err, chunks < (1u << 31), "stableadamw: %zu chunks are too many", chunks);
    mb_cuda_adamw *a = static_cast<mb_cuda_adamw *>(calloc(1, sizeof(mb_cuda_adamw)));
    if (a == nullptr) return mb_fail(err, "stableadamw: out of host memory");
    a->tensor_count = count;
    a->chunk_count = (int)chunks;
    a->group_count = group_count;
    if (allocate_tables(a, err) != 0 || (count > 0 && upload_tables(a, tensors, groups, err) != 0)) {
        mb_cuda_adamw_destroy(a);
        return -1;
    }
    *out = a;
    return 0;
}

extern "C" int mb_cuda_adamw_create(mb_cuda_adamw **out, const mb_cuda_adamw_tensor *tensors, int count,
                                    mb_error *err) {
    *out = nullptr;
    MB_REQUIRE(err, tensors != nullptr && count > 0, "stableadamw: no tensors");
    mb_cuda_adamw_tensor *pieces = static_cast<mb_cuda_adamw_tensor *>(calloc((size_t)count, sizeof *pieces));
    mb_cuda_adamw_group *groups = static_cast<mb_cuda_adamw_group *>(calloc((size_t)count, sizeof *groups));
    int rc = pieces && groups ? 0 : mb_fail(err, "stableadamw: out of host memory");
    for (int i = 0; rc == 0 && i < count; i++) {
        pieces[i] = tensors[i];
        pieces[i].group = i;
        groups[i] = mb_cuda_adamw_group{tensors[i].numel, tensors[i].decay};
    }
    if (rc == 0) rc = mb_cuda_adamw_create_grouped(out, pieces, count, groups, count, err);
    free(pieces);
    free(groups);
    return rc;
}

extern "C" int mb_cuda_adamw_moments(mb_cuda_adamw *a, const mb_stableadamw *opt, cudaStream_t stream,
                                     mb_error *err) {
    MB_REQUIRE(err, a != nullptr && opt != nullptr, "stableadamw: missing optimizer");
    if (check_hyperparameters(opt, 0.0, err) != 0) return -1;
    MB_NVTX_RANGE("stableadamw_moments");
    int64_t t = opt->step + 1;
    double beta1_hat = debias_beta(opt->beta1, t), beta2_hat = debias_beta(opt->beta2, t);
    float eps_sq = (float)(opt->eps * opt->eps);
    if (a->chunk_count > 0) {
        adamw_moments_kernel<<<a->chunk_count, kThreads, 0, stream>>>(a->chunk_partial, a->tensors, a->chunks,
                                                                     (float)(1.0 - beta1_hat), (float)beta2_hat,
                                                                     (float)(1.0 - beta2_hat), eps_sq);
        MB_CUDA_CHECK_LAUNCH(err, "adamw_moments_kernel");
    }
    adamw_group_sums_kernel<<<a->group_count, kThreads, 0, stream>>>(a->group_sums, a->chunk_partial, a->groups);
    MB_CUDA_CHECK_LAUNCH(err, "adamw_group_sums_kernel");
    return 0;
}

extern "C" double *mb_cuda_adamw_group_sums(mb_cuda_adamw *a) { return a->group_sums; }

extern "C" int mb_cuda_adamw_apply(mb_cuda_adamw *a, mb_stableadamw *opt, double lr, cudaStream_t stream,
                                   mb_error *err) {
    MB_REQUIRE(err, a != nullptr && opt != nullptr, "stableadamw: missing optimizer");
    if (check_hyperparameters(opt, lr, err) != 0) return -1;
    MB_NVTX_RANGE("stableadamw_apply");
    adamw_scalars_kernel<<<mb::ceil_div(a->group_count, kThreads), kThreads, 0, stream>>>(
        a->steps, a->rms, a->group_sums, a->groups, a->group_count, lr, opt->max_lr, opt->weight_decay);
    MB_CUDA_CHECK_LAUNCH(err, "adamw_scalars_kernel");
    if (a->chunk_count > 0) {
        adamw_params_kernel<<<a->chunk_count, kThreads, 0, stream>>>(a->tensors, a->chunks, a->steps,
                                                                    (float)opt->eps);
        MB_CUDA_CHECK_LAUNCH(err, "adamw_params_kernel");
    }
    opt->step++;
    return 0;
}

extern "C" int mb_cuda_adamw_step(mb_cuda_adamw *a, mb_stableadamw *opt, double lr, cudaStream_t stream,
                                  mb_error *err) {
    if (mb_cuda_adamw_moments(a, opt, stream, err) != 0) return -1;
    return mb_cuda_adamw_apply(a, opt, lr, stream, err);
}

extern "C" const double *mb_cuda_adamw_rms(const mb_cuda_adamw *a) { return a->rms; }

static int grad_squares(mb_cuda_adamw *a, double *out, int root, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, a != nullptr && out != nullptr, "grad_norm: missing optimizer or output");
    if (a->chunk_count > 0) {
        grad_squares_kernel<<<a->chunk_count, kThreads, 0, stream>>>(a->chunk_partial, a->tensors, a->chunks);
        MB_CUDA_CHECK_LAUNCH(err, "grad_squares_kernel");
    }
    sum_sqrt_kernel<<<1, 1024, 0, stream>>>(out, a->chunk_partial, a->chunk_count, root);
    MB_CUDA_CHECK_LAUNCH(err, "sum_sqrt_kernel");
    return 0;
}

extern "C" int mb_cuda_grad_norm(mb_cuda_adamw *a, double *norm, cudaStream_t stream, mb_error *err) {
    return grad_squares(a, norm, 1, stream, err);
}

extern "C" int mb_cuda_grad_square_sum(mb_cuda_adamw *a, double *sum, cudaStream_t stream, mb_error *err) {
    return grad_squares(a, sum, 0, stream, err);
}

extern "C" int mb_cuda_sqrt_in_place(double *value, cudaStream_t stream, mb_error *err) {
    sqrt_kernel<<<1, 1, 0, stream>>>(value);
    MB_CUDA_CHECK_LAUNCH(err, "sqrt_kernel");
    return 0;
}

extern "C" int mb_cuda_to_bf16(mb_bf16 *dst, const float *src, size_t count, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, dst && src, "to_bf16: missing dst or src");
    if (count == 0) return 0;
    int vector = reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0;
    size_t items = vector ? count / 4 + 1 : count;
    to_bf16_kernel<<<mb::grid_stride_blocks(items), 256, 0, stream>>>(reinterpret_cast<mb::bf16 *>(dst), src, count,
                                                                      vector);
    MB_CUDA_CHECK_LAUNCH(err, "to_bf16_kernel");
    return 0;
}
