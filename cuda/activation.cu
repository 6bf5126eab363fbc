/* Elementwise activations and the gated linear unit of the MLP (GeGLU with the exact GELU), as src/cpu/activation.c.
 * bf16 in and out, fp32 inside.
 *
 * gelu(x)      = ½x(1 + erf(x/√2)),                     gelu'(x) = Φ(x) + x·φ(x),  φ(x) = e^{−x²/2}/√(2π)
 * gelu_tanh(x) = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³)
 * silu(x)      = x·σ(x),                                 silu'(x) = σ(x)(1 + x(1 − σ(x)))
 * relu(x)      = max(x, 0)
 * GLU: u = [a | g] (first `inner` columns activated, the rest the gate), y = act(a) ⊙ g
 *      da = dy ⊙ g ⊙ act'(a),  dg = dy ⊙ act(a)   (one thread reads a and g and writes both: du may alias u)
 *
 * Kernels: the activation is a template parameter (no switch per element), the backward evaluates the shared parts
 * of act and act' once (erf, tanh or the sigmoid). Vector path: one thread moves 8 consecutive columns with 16-byte
 * loads and stores (GLU: inner % 8 == 0; elementwise: any count, the last count % 8 elements one per thread), 32-bit
 * index math when the tensor has fewer than 2^31 elements. GLU widths that are not a multiple of 8, or unaligned
 * pointers, take the scalar kernels (one element per thread). The GELU is the exact erf form unless the config
 * asks for gelu_tanh: the same functions as the CPU reference, in fp32. */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr int kThreads = 256;

template <mb_activation kAct>
__device__ __forceinline__ float activate(float x) {
    if constexpr (kAct == MB_ACT_GELU) {
        return 0.5f * x * (1.0f + erff(x * kSqrtHalf));
    } else if constexpr (kAct == MB_ACT_GELU_TANH) {
        return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
    } else if constexpr (kAct == MB_ACT_SILU) {
        return x / (1.0f + expf(-x));
    } else {
        return x > 0.0f ? x : 0.0f;
    }
}

/* act(x) and act'(x) together. */
template <mb_activation kAct>
__device__ __forceinline__ void activate_with_slope(float x, float &value, float &slope) {
    if constexpr (kAct == MB_ACT_GELU) {
        float cdf = 0.5f * (1.0f + erff(x * kSqrtHalf));
        value = x * cdf;
        slope = cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    } else if constexpr (kAct == MB_ACT_GELU_TANH) {
        float t = tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x));
        float du = kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * x * x);
        value = 0.5f * x * (1.0f + t);
        slope = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    } else if constexpr (kAct == MB_ACT_SILU) {
        float sigma = 1.0f / (1.0f + expf(-x));
        value = x * sigma;
        slope = sigma * (1.0f + x * (1.0f - sigma));
    } else {
        value = x > 0.0f ? x : 0.0f;
        slope = x > 0.0f ? 1.0f : 0.0f;
    }
}

template <mb_activation kAct>
__device__ __forceinline__ float slope_of(float x) {
    float value, slope;
    activate_with_slope<kAct>(x, value, slope);
    return slope;
}

/* ---- elementwise: y = act(x), dx = dy ⊙ act'(x). Thread i < vectors takes elements [8i, 8i + 8) (16-byte
 * accesses), thread vectors + j the single element 8·vectors + j; vectors = 0 when a pointer is not 16-byte aligned. */

template <mb_activation kAct, typename Index>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(mb::bf16 *y, const mb::bf16 *x, Index count, Index vectors) {
    Index i = (Index)blockIdx.x * kThreads + threadIdx.x;
    if (i < vectors) {
        float v[8];
        mb::unpack_bf16x8(mb::load_bf16x8(x + 8 * i), v);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = activate<kAct>(v[k]);
        mb::store_bf16x8(y + 8 * i, mb::pack_bf16x8(v));
        return;
    }
    Index j = 8 * vectors + (i - vectors);
    if (j < count) y[j] = mb::to_bf16(activate<kAct>(mb::to_float(x[j])));
}

template <mb_activation kAct, typename Index>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(mb::bf16 *dx, const mb::bf16 *dy, const mb::bf16 *x, Index count, Index vectors) {
    Index i = (Index)blockIdx.x * kThreads + threadIdx.x;
    if (i < vectors) {
        float v[8], grad[8];
        mb::unpack_bf16x8(mb::load_bf16x8(x + 8 * i), v);
        mb::unpack_bf16x8(mb::load_bf16x8(dy + 8 * i), grad);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = grad[k] * slope_of<kAct>(v[k]);
        mb::store_bf16x8(dx + 8 * i, mb::pack_bf16x8(v));
        return;
    }
    Index j = 8 * vectors + (i - vectors);
    if (j < count) dx[j] = mb::to_bf16(mb::to_float(dy[j]) * slope_of<kAct>(mb::to_float(x[j])));
}

/* ---- GLU, vector path: thread i takes columns [8c, 8c + 8) of row r, i = r·(inner/8) + c ---- */

template <mb_activation kAct, typename Index>
__global__ void __launch_bounds__(kThreads)
    glu_forward_vec_kernel(mb::bf16 *y, const mb::bf16 *u, Index vectors, Index row_vectors, Index inner) {
    Index i = (Index)blockIdx.x * kThreads + threadIdx.x;
    if (i >= vectors) return;
    Index row = i / row_vectors, col = (i - row * row_vectors) * 8;
    const mb::bf16 *input = u + row * 2 * inner + col;
    float a[8], gate[8];
    mb::unpack_bf16x8(mb::load_bf16x8(input), a);
    mb::unpack_bf16x8(mb::load_bf16x8(input + inner), gate);
#pragma unroll
    for (int k = 0; k < 8; k++) a[k] = activate<kAct>(a[k]) * gate[k];
    mb::store_bf16x8(y + 8 * i, mb::pack_bf16x8(a));
}

template <mb_activation kAct, typename Index>
__global__ void __launch_bounds__(kThreads)
    glu_backward_vec_kernel(mb::bf16 *du, const mb::bf16 *dy, const mb::bf16 *u, Index vectors, Index row_vectors,
                            Index inner) {
    Index i = (Index)blockIdx.x * kThreads + threadIdx.x;
    if (i >= vectors) return;
    Index row = i / row_vectors, offset = row * 2 * inner + (i - row * row_vectors) * 8;
    float a[8], gate[8], grad[8], da[8], dgate[8];
    mb::unpack_bf16x8(mb::load_bf16x8(u + offset), a);
    mb::unpack_bf16x8(mb::load_bf16x8(u + offset + inner), gate);
    mb::unpack_bf16x8(mb::load_bf16x8(dy + 8 * i), grad);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float value, slope;
        activate_with_slope<kAct>(a[k], value, slope);
        da[k] = grad[k] * gate[k] * slope;
        dgate[k] = grad[k] * value;
    }
    mb::store_bf16x8(du + offset, mb::pack_bf16x8(da));
    mb::store_bf16x8(du + offset + inner, mb::pack_bf16x8(dgate));
}

/* ---- GLU, scalar path (inner % 8 != 0 or unaligned): one element of y per thread ---- */

template <mb_activation kAct, typename Index>
__global__ void __launch_bounds__(kThreads)
    glu_forward_kernel(mb::bf16 *y, const mb::bf16 *u, Index total, Index inner) {
    Index i = (Index)blockIdx.x * kThreads + threadIdx.x;
    if (i >= total) return;
    Index row = i / inner, col = i - row * inner;
    const mb::bf16 *input = u + row * 2 * inner;
    y[i] = mb::to_bf16(activate<kAct>(mb::to_float(input[col])) * mb::to_float(input[inner + col]));
}

template <mb_activation kAct, typename Index>
__global__ void __launch_bounds__(kThreads)
    glu_backward_kernel(mb::bf16 *du, const mb::bf16 *dy, const mb::bf16 *u, Index total, Index inner) {
    Index i = (Index)blockIdx.x * kThreads + threadIdx.x;
    if (i >= total) return;
    Index row = i / inner, col = i - row * inner;
    const mb::bf16 *input = u + row * 2 * inner;
    float a = mb::to_float(input[col]), gate = mb::to_float(input[inner + col]), grad = mb::to_float(dy[i]);
    float value, slope;
    activate_with_slope<kAct>(a, value, slope);
    mb::bf16 *dinput = du + row * 2 * inner;
    dinput[col] = mb::to_bf16(grad * gate * slope);
    dinput[inner + col] = mb::to_bf16(grad * value);
}

/* ---- dispatch ---- */

bool known_activation(mb_activation activation) {
    return activation == MB_ACT_GELU || activation == MB_ACT_GELU_TANH || activation == MB_ACT_SILU ||
           activation == MB_ACT_RELU;
}

bool aligned16(const void *pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

/* 32-bit indices when every element index of the largest tensor touched fits. */
bool fits_int32(size_t elements) { return elements < (size_t)INT32_MAX; }

/* Blocks for `threads` threads, one per work item. */
unsigned blocks_for(size_t threads) { return (unsigned)((threads + kThreads - 1) / kThreads); }

/* Calls launch.run<activation, Index>() with the index type chosen by `small` (32-bit) or not (size_t). */
template <typename Index, typename Launch>
void with_index(mb_activation activation, const Launch &launch) {
    switch (activation) {
    case MB_ACT_GELU: launch.template run<MB_ACT_GELU, Index>(); break;
    case MB_ACT_GELU_TANH: launch.template run<MB_ACT_GELU_TANH, Index>(); break;
    case MB_ACT_SILU: launch.template run<MB_ACT_SILU, Index>(); break;
    case MB_ACT_RELU: launch.template run<MB_ACT_RELU, Index>(); break;
    }
}

template <typename Launch>
void with_activation(mb_activation activation, bool small, const Launch &launch) {
    if (small) with_index<uint32_t>(activation, launch);
    else with_index<size_t>(activation, launch);
}

/* Work items of the elementwise kernels: 16-byte vectors when aligned, then single elements. */
size_t elementwise_vectors(size_t count, bool aligned) { return aligned ? count / 8 : 0; }

struct activation_forward_launch {
    mb::bf16 *y;
    const mb::bf16 *x;
    size_t count, vectors;
    cudaStream_t stream;
    template <mb_activation kAct, typename Index>
    void run() const {
        activation_forward_kernel<kAct, Index><<<blocks_for(vectors + count - 8 * vectors), kThreads, 0, stream>>>(
            y, x, (Index)count, (Index)vectors);
    }
};

struct activation_backward_launch {
    mb::bf16 *dx;
    const mb::bf16 *dy, *x;
    size_t count, vectors;
    cudaStream_t stream;
    template <mb_activation kAct, typename Index>
    void run() const {
        activation_backward_kernel<kAct, Index><<<blocks_for(vectors + count - 8 * vectors), kThreads, 0, stream>>>(
            dx, dy, x, (Index)count, (Index)vectors);
    }
};

struct glu_forward_launch {
    mb::bf16 *y;
    const mb::bf16 *u;
    int n, inner;
    bool vector;
    cudaStream_t stream;
    template <mb_activation kAct, typename Index>
    void run() const {
        size_t total = (size_t)n * inner;
        if (vector)
            glu_forward_vec_kernel<kAct, Index><<<blocks_for(total / 8), kThreads, 0, stream>>>(
                y, u, (Index)(total / 8), (Index)(inner / 8), (Index)inner);
        else
            glu_forward_kernel<kAct, Index><<<blocks_for(total), kThreads, 0, stream>>>(y, u, (Index)total,
                                                                                       (Index)inner);
    }
};

struct glu_backward_launch {
    mb::bf16 *du;
    const mb::bf16 *dy, *u;
    int n, inner;
    bool vector;
    cudaStream_t stream;
    template <mb_activation kAct, typename Index>
    void run() const {
        size_t total = (size_t)n * inner;
        if (vector)
            glu_backward_vec_kernel<kAct, Index><<<blocks_for(total / 8), kThreads, 0, stream>>>(
                du, dy, u, (Index)(total / 8), (Index)(inner / 8), (Index)inner);
        else
            glu_backward_kernel<kAct, Index><<<blocks_for(total), kThreads, 0, stream>>>(du, dy, u, (Index)total,
                                                                                        (Index)inner);
    }
};

}  // namespace

extern "C" int mb_cuda_activation_forward(mb_bf16 *y, const mb_bf16 *x, size_t count, mb_activation activation,
                                          cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, y && x, "activation_forward: missing y or x");
    MB_REQUIRE(err, known_activation(activation), "activation_forward: unknown activation %d", (int)activation);
    if (count == 0) return 0;
    activation_forward_launch launch = {reinterpret_cast<mb::bf16 *>(y), reinterpret_cast<const mb::bf16 *>(x), count,
                                        elementwise_vectors(count, aligned16(y) && aligned16(x)), stream};
    with_activation(activation, fits_int32(count), launch);
    MB_CUDA_CHECK_LAUNCH(err, "activation_forward_kernel");
    return 0;
}

extern "C" int mb_cuda_activation_backward(mb_bf16 *dx, const mb_bf16 *dy, const mb_bf16 *x, size_t count,
                                           mb_activation activation, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, dx && dy && x, "activation_backward: missing dx, dy or x");
    MB_REQUIRE(err, known_activation(activation), "activation_backward: unknown activation %d", (int)activation);
    if (count == 0) return 0;
    bool aligned = aligned16(dx) && aligned16(dy) && aligned16(x);
    activation_backward_launch launch = {reinterpret_cast<mb::bf16 *>(dx), reinterpret_cast<const mb::bf16 *>(dy),
                                         reinterpret_cast<const mb::bf16 *>(x), count,
                                         elementwise_vectors(count, aligned), stream};
    with_activation(activation, fits_int32(count), launch);
    MB_CUDA_CHECK_LAUNCH(err, "activation_backward_kernel");
    return 0;
}

extern "C" int mb_cuda_glu_forward(mb_bf16 *y, const mb_bf16 *u, int n, int inner, mb_activation activation,
                                   cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, y && u, "glu_forward: missing y or u");
    MB_REQUIRE(err, n >= 0 && inner > 0, "glu_forward: bad shape n %d, inner %d", n, inner);
    MB_REQUIRE(err, known_activation(activation), "glu_forward: unknown activation %d", (int)activation);
    if (n == 0) return 0;
    MB_NVTX_RANGE("glu_forward");
    bool vector = inner % 8 == 0 && aligned16(y) && aligned16(u);
    glu_forward_launch launch = {reinterpret_cast<mb::bf16 *>(y), reinterpret_cast<const mb::bf16 *>(u), n, inner,
                                 vector, stream};
    with_activation(activation, fits_int32((size_t)n * 2 * inner), launch);
    MB_CUDA_CHECK_LAUNCH(err, "glu_forward_kernel");
    return 0;
}

extern "C" int mb_cuda_glu_backward(mb_bf16 *du, const mb_bf16 *dy, const mb_bf16 *u, int n, int inner,
                                    mb_activation activation, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, du && dy && u, "glu_backward: missing du, dy or u");
    MB_REQUIRE(err, n >= 0 && inner > 0, "glu_backward: bad shape n %d, inner %d", n, inner);
    MB_REQUIRE(err, known_activation(activation), "glu_backward: unknown activation %d", (int)activation);
    if (n == 0) return 0;
    MB_NVTX_RANGE("glu_backward");
    bool vector = inner % 8 == 0 && aligned16(du) && aligned16(dy) && aligned16(u);
    glu_backward_launch launch = {reinterpret_cast<mb::bf16 *>(du), reinterpret_cast<const mb::bf16 *>(dy),
                                  reinterpret_cast<const mb::bf16 *>(u), n, inner, vector, stream};
    with_activation(activation, fits_int32((size_t)n * 2 * inner), launch);
    MB_CUDA_CHECK_LAUNCH(err, "glu_backward_kernel");
    return 0;
}
