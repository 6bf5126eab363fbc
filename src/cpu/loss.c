/* Losses. Cross-entropy per row: ℓ = logsumexp(z) − z_t; gradient (softmax(z) − onehot(t)) · scale.
 * The forward returns the SUM over rows; the caller divides by the number of labelled rows of the whole (global)
 * batch and passes 1/that as grad_scale, so gradient accumulation over micro-batches gives the global mean.
 * MSE: ℓ = Σ (p − t)², gradient 2(p − t) · scale. */
#include <math.h>
#include <stdlib.h>

#include "cpu/ops.h"

static double row_logsumexp(const float *z, int classes) {
    float max_value = z[0];
    for (int c = 1; c < classes; c++)
        if (z[c] > max_value) max_value = z[c];
    double sum = 0.0;
    for (int c = 0; c < classes; c++) sum += expf(z[c] - max_value);
    return max_value + log(sum);
}

double mb_cpu_cross_entropy_forward(const float *logits, const int32_t *targets, int rows, int classes) {
    /* per-row losses first, then one sequential sum: the result does not depend on the thread count */
    double *row_loss = malloc((size_t)(rows > 0 ? rows : 1) * sizeof(double));
    if (row_loss == NULL) return NAN;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        const float *z = logits + (size_t)row * classes;
        row_loss[row] = row_logsumexp(z, classes) - z[targets[row]];
    }
    double total = 0.0;
    for (int row = 0; row < rows; row++) total += row_loss[row];
    free(row_loss);
    return total;
}

void mb_cpu_cross_entropy_backward(float *logits, const int32_t *targets, int rows, int classes, float grad_scale) {
#pragma omp parallel for schedule(static)
    for (int row = 0; row < rows; row++) {
        float *z = logits + (size_t)row * classes;
        double lse = row_logsumexp(z, classes);
        float shift = (float)lse;
        for (int c = 0; c < classes; c++) z[c] = expf(z[c] - shift) * grad_scale;
        z[targets[row]] -= grad_scale;
    }
}

double mb_cpu_mse_forward(const float *predictions, const float *targets, int rows) {
    double total = 0.0;
    for (int row = 0; row < rows; row++) {
        double diff = (double)predictions[row] - targets[row];
        total += diff * diff;
    }
    return total;
}

void mb_cpu_mse_backward(float *dpredictions, const float *predictions, const float *targets, int rows,
                         float grad_scale) {
    for (int row = 0; row < rows; row++) dpredictions[row] = 2.0f * (predictions[row] - targets[row]) * grad_scale;
}
