/* LayerNorm over the last dimension, weight and optional bias (ModernBERT: no bias), statistics in double.
 *
 * forward:  μ = mean(x), σ² = mean((x − μ)²) (biased), r = 1/sqrt(σ² + eps), x̂ = (x − μ)·r, y = x̂ ⊙ w (+ b)
 * backward: g = dy ⊙ w
 *           dx = r · (g − mean(g) − x̂ · mean(g ⊙ x̂))
 *           dw += Σ_rows dy ⊙ x̂,  db += Σ_rows dy   (column sums in row order, thread-count independent) */
#include <math.h>
#include <string.h>

#include "cpu/ops.h"

void mb_cpu_layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *weight,
                              const float *bias, int n, int h, float eps) {
#pragma omp parallel for schedule(static)
    for (int row = 0; row < n; row++) {
        const float *xr = x + (size_t)row * h;
        float *yr = y + (size_t)row * h;
        double sum = 0.0;
        for (int j = 0; j < h; j++) sum += xr[j];
        double mu = sum / h;
        double var = 0.0;
        for (int j = 0; j < h; j++) var += (xr[j] - mu) * (xr[j] - mu);
        var /= h;
        double r = 1.0 / sqrt(var + eps);
        for (int j = 0; j < h; j++) {
            float normalized = (float)((xr[j] - mu) * r);
            yr[j] = normalized * weight[j] + (bias != NULL ? bias[j] : 0.0f);
        }
        mean[row] = (float)mu;
        rstd[row] = (float)r;
    }
}

static void layernorm_input_grad(float *dx, const float *dy, const float *x, const float *mean, const float *rstd,
                                 const float *weight, int n, int h, int accumulate_dx) {
#pragma omp parallel for schedule(static)
    for (int row = 0; row < n; row++) {
        const float *xr = x + (size_t)row * h, *dyr = dy + (size_t)row * h;
        float *dxr = dx + (size_t)row * h;
        double mu = mean[row], r = rstd[row];
        double sum_g = 0.0, sum_g_xhat = 0.0;
        for (int j = 0; j < h; j++) {
            double g = (double)dyr[j] * weight[j];
            sum_g += g;
            sum_g_xhat += g * (xr[j] - mu) * r;
        }
        double mean_g = sum_g / h, mean_g_xhat = sum_g_xhat / h;
        for (int j = 0; j < h; j++) {
            double xhat = (xr[j] - mu) * r;
            float value = (float)(r * ((double)dyr[j] * weight[j] - mean_g - xhat * mean_g_xhat));
            dxr[j] = accumulate_dx ? dxr[j] + value : value;
        }
    }
}

static void layernorm_param_grads(float *dweight, float *dbias, const float *dy, const float *x, const float *mean,
                                  const float *rstd, int n, int h) {
    const int block = 64;
#pragma omp parallel for schedule(static)
    for (int start = 0; start < h; start += block) {
        int end = start + block < h ? start + block : h;
        double dw[64] = {0}, db[64] = {0};
        for (int row = 0; row < n; row++) {
            const float *xr = x + (size_t)row * h, *dyr = dy + (size_t)row * h;
            double mu = mean[row], r = rstd[row];
            for (int j = start; j < end; j++) {
                dw[j - start] += (double)dyr[j] * ((xr[j] - mu) * r);
                db[j - start] += dyr[j];
            }
        }
        for (int j = start; j < end; j++) {
            if (dweight != NULL) dweight[j] += (float)dw[j - start];
            if (dbias != NULL) dbias[j] += (float)db[j - start];
        }
    }
}

void mb_cpu_layernorm_backward(float *dx, float *dweight, float *dbias, const float *dy, const float *x,
                               const float *mean, const float *rstd, const float *weight, int n, int h,
                               int accumulate_dx) {
    if (dx != NULL) layernorm_input_grad(dx, dy, x, mean, rstd, weight, n, h, accumulate_dx);
    if (dweight != NULL || dbias != NULL) layernorm_param_grads(dweight, dbias, dy, x, mean, rstd, n, h);
}
