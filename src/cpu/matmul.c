/* Linear layers on the CPU through BLAS (OpenBLAS sgemm).
 *
 * forward:  y[n, out] = x[n, in] · W[out, in]^T + b[out]
 * backward: dx[n, in] = dy[n, out] · W          (written, or added when accumulate_dx)
 *           dW[out, in] += dy^T · x
 *           db[out]     += Σ_rows dy            (summed in row order: independent of the thread count) */
#include <cblas.h>
#include <string.h>

#include "cpu/ops.h"

void mb_cpu_linear_forward(float *y, const float *x, const float *weight, const float *bias, int n, int in, int out) {
    if (n == 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, weight, in, 0.0f, y, out);
    if (bias == NULL) return;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < n; row++)
        for (int col = 0; col < out; col++) y[(size_t)row * out + col] += bias[col];
}

static void column_sums_accumulate(float *sums, const float *matrix, int rows, int cols) {
    const int block = 64;
#pragma omp parallel for schedule(static)
    for (int start = 0; start < cols; start += block) {
        int end = start + block < cols ? start + block : cols;
        double partial[64] = {0};
        for (int row = 0; row < rows; row++)
            for (int col = start; col < end; col++) partial[col - start] += matrix[(size_t)row * cols + col];
        for (int col = start; col < end; col++) sums[col] += (float)partial[col - start];
    }
}

void mb_cpu_linear_backward(float *dx, float *dweight, float *dbias, const float *dy, const float *x,
                            const float *weight, int n, int in, int out, int accumulate_dx) {
    if (n == 0) {
        return;
    }
    if (dx != NULL)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, weight, in,
                    accumulate_dx ? 1.0f : 0.0f, dx, in);
    if (dweight != NULL)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 1.0f, dweight, in);
    if (dbias != NULL) column_sums_accumulate(dbias, dy, n, out);
}
