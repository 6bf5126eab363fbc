/* Elementwise activations and the gated linear unit of the MLP (GeGLU with the exact GELU), as src/cpu/activation.c.
 * bf16 in and out, fp32 inside.
 *
 * gelu(x)      = ½x(1 + erf(x/√2)),                     gelu'(x) = Φ(x) + x·φ(x),  φ(x) = e^{−x²/2}/√(2π)
 * gelu_tanh(x) = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³)
 * silu(x)      = x·σ(x),                                 silu'(x) = σ(x)(1 + x(1 − σ(x)))
 * relu(x)      = max(x, 0)
 * GLU: u = [a | g] (first `inner` columns activated, the rest the gate), y = act(a) ⊙ g
 *      da = dy ⊙ g ⊙ act'(a),  dg = dy ⊙ act(a)   (one thread reads a and g and writes both: du may alias u) */
#include "common.cuh"
#include "ops.h"

namespace {

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;

__device__ __forceinline__ float activate(mb_activation activation, float x) {
    switch (activation) {
    case MB_ACT_GELU: return 0.5f * x * (1.0f + erff(x * kSqrtHalf));
    case MB_ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
    case MB_ACT_SILU: return x / (1.0f + expf(-x));
    case MB_ACT_RELU: return x > 0.0f ? x : 0.0f;
    }
    return x;
}

__device__ __forceinline__ float derivative(mb_activation activation, float x) {
    switch (activation) {
    case MB_ACT_GELU: return 0.5f * (1.0f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    case MB_ACT_GELU_TANH: {
        float t = tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x));
        float du = kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * x * x);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case MB_ACT_SILU: {
        float sigma = 1.0f / (1.0f + expf(-x));
        return sigma * (1.0f + x * (1.0f - sigma));
    }
    case MB_ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
    }
    return 1.0f;
}

__global__ void activation_forward_kernel(mb::bf16 *y, const mb::bf16 *x, size_t count, mb_activation activation) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        y[i] = mb::to_bf16(activate(activation, mb::to_float(x[i])));
}

__global__ void activation_backward_kernel(mb::bf16 *dx, const mb::bf16 *dy, const mb::bf16 *x, size_t count,
                                           mb_activation activation) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        dx[i] = mb::to_bf16(mb::to_float(dy[i]) * derivative(activation, mb::to_float(x[i])));
}

__global__ void glu_forward_kernel(mb::bf16 *y, const mb::bf16 *u, int n, int inner, mb_activation activation) {
    size_t total = (size_t)n * inner;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / inner, col = i % inner;
        const mb::bf16 *input = u + row * 2 * inner;
        y[i] = mb::to_bf16(activate(activation, mb::to_float(input[col])) * mb::to_float(input[inner + col]));
    }
}

__global__ void glu_backward_kernel(mb::bf16 *du, const mb::bf16 *dy, const mb::bf16 *u, int n, int inner,
                                    mb_activation activation) {
    size_t total = (size_t)n * inner;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / inner, col = i % inner;
        const mb::bf16 *input = u + row * 2 * inner;
        float a = mb::to_float(input[col]), gate = mb::to_float(input[inner + col]), grad = mb::to_float(dy[i]);
        mb::bf16 *dinput = du + row * 2 * inner;
        dinput[col] = mb::to_bf16(grad * gate * derivative(activation, a));
        dinput[inner + col] = mb::to_bf16(grad * activate(activation, a));
    }
}

int grid_for(size_t count) { return (int)(count / 256 + 1 < 65536 ? count / 256 + 1 : 65536); }

bool known_activation(mb_activation activation) {
    return activation == MB_ACT_GELU || activation == MB_ACT_GELU_TANH || activation == MB_ACT_SILU ||
           activation == MB_ACT_RELU;
}

}  // namespace

extern "C" int mb_cuda_activation_forward(mb_bf16 *y, const mb_bf16 *x, size_t count, mb_activation activation,
                                          cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, y && x, "activation_forward: missing y or x");
    MB_REQUIRE(err, known_activation(activation), "activation_forward: unknown activation %d", (int)activation);
    if (count == 0) return 0;
    activation_forward_kernel<<<grid_for(count), 256, 0, stream>>>(
        reinterpret_cast<mb::bf16 *>(y), reinterpret_cast<const mb::bf16 *>(x), count, activation);
    MB_CUDA_CHECK_LAUNCH(err, "activation_forward_kernel");
    return 0;
}

extern "C" int mb_cuda_activation_backward(mb_bf16 *dx, const mb_bf16 *dy, const mb_bf16 *x, size_t count,
                                           mb_activation activation, cudaStream_t stream, mb_error *err) {
    MB_REQUIRE(err, dx && dy && x, "activation_backward: missing dx, dy or x");
    MB_REQUIRE(err, known_activation(activation), "activation_backward: unknown activation %d", (int)activation);
    if (count == 0) return 0;
    activation_backward_kernel<<<grid_for(count), 256, 0, stream>>>(
        reinterpret_cast<mb::bf16 *>(dx), reinterpret_cast<const mb::bf16 *>(dy),
        reinterpret_cast<const mb::bf16 *>(x), count, activation);
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
    glu_forward_kernel<<<grid_for((size_t)n * inner), 256, 0, stream>>>(
        reinterpret_cast<mb::bf16 *>(y), reinterpret_cast<const mb::bf16 *>(u), n, inner, activation);
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
    glu_backward_kernel<<<grid_for((size_t)n * inner), 256, 0, stream>>>(
        reinterpret_cast<mb::bf16 *>(du), reinterpret_cast<const mb::bf16 *>(dy),
        reinterpret_cast<const mb::bf16 *>(u), n, inner, activation);
    MB_CUDA_CHECK_LAUNCH(err, "glu_backward_kernel");
    return 0;
}
