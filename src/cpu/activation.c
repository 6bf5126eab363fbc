/* Activations and the gated linear unit of ModernBERT's MLP (GeGLU with the exact GELU).
 *
 * gelu(x)      = x·Φ(x) = ½x(1 + erf(x/√2)),            gelu'(x) = Φ(x) + x·φ(x),  φ(x) = e^{−x²/2}/√(2π)
 * gelu_tanh(x) = ½x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³)
 * silu(x)      = x·σ(x),                                  silu'(x) = σ(x)(1 + x(1 − σ(x)))
 * relu(x)      = max(x, 0)
 * GLU: u = [a | g] (a = first `inner` columns, the activated input; g = the gate),  y = act(a) ⊙ g
 *      da = dy ⊙ g ⊙ act'(a),  dg = dy ⊙ act(a)   (written back in the [a | g] layout of Wi's output) */
#include <math.h>

#include "cpu/ops.h"

static const double kSqrtHalf = 0.70710678118654752440;
static const double kInvSqrt2Pi = 0.39894228040143267794;
static const double kSqrt2OverPi = 0.79788456080286535588;

float mb_activation_forward(mb_activation activation, float x) {
    double v = x;
    switch (activation) {
    case MB_ACT_GELU: return (float)(0.5 * v * (1.0 + erf(v * kSqrtHalf)));
    case MB_ACT_GELU_TANH: return (float)(0.5 * v * (1.0 + tanh(kSqrt2OverPi * (v + 0.044715 * v * v * v))));
    case MB_ACT_SILU: return (float)(v / (1.0 + exp(-v)));
    case MB_ACT_RELU: return x > 0.0f ? x : 0.0f;
    }
    return x;
}

float mb_activation_derivative(mb_activation activation, float x) {
    double v = x;
    switch (activation) {
    case MB_ACT_GELU: return (float)(0.5 * (1.0 + erf(v * kSqrtHalf)) + v * kInvSqrt2Pi * exp(-0.5 * v * v));
    case MB_ACT_GELU_TANH: {
        double u = kSqrt2OverPi * (v + 0.044715 * v * v * v);
        double t = tanh(u);
        double du = kSqrt2OverPi * (1.0 + 3.0 * 0.044715 * v * v);
        return (float)(0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
    }
    case MB_ACT_SILU: {
        double sigma = 1.0 / (1.0 + exp(-v));
        return (float)(sigma * (1.0 + v * (1.0 - sigma)));
    }
    case MB_ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
    }
    return 1.0f;
}

void mb_cpu_activation_forward(float *y, const float *x, size_t count, mb_activation activation) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) y[i] = mb_activation_forward(activation, x[i]);
}

void mb_cpu_activation_backward(float *dx, const float *dy, const float *x, size_t count, mb_activation activation) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < count; i++) dx[i] = dy[i] * mb_activation_derivative(activation, x[i]);
}

void mb_cpu_glu_forward(float *y, const float *u, int n, int inner, mb_activation activation) {
#pragma omp parallel for schedule(static)
    for (int row = 0; row < n; row++) {
        const float *input = u + (size_t)row * 2 * inner, *gate = input + inner;
        float *out = y + (size_t)row * inner;
        for (int j = 0; j < inner; j++) out[j] = mb_activation_forward(activation, input[j]) * gate[j];
    }
}

void mb_cpu_glu_backward(float *du, const float *dy, const float *u, int n, int inner, mb_activation activation) {
#pragma omp parallel for schedule(static)
    for (int row = 0; row < n; row++) {
        const float *input = u + (size_t)row * 2 * inner, *gate = input + inner;
        const float *grad = dy + (size_t)row * inner;
        float *dinput = du + (size_t)row * 2 * inner, *dgate = dinput + inner;
        for (int j = 0; j < inner; j++) {
            dinput[j] = grad[j] * gate[j] * mb_activation_derivative(activation, input[j]);
            dgate[j] = grad[j] * mb_activation_forward(activation, input[j]);
        }
    }
}
