/* The CUDA backend: the whole ModernBERT training step on one GPU behind the backend boundary (model/backend.h).
 *
 * Precision: bf16 activations, residual stream and GEMM operands; fp32 LayerNorm statistics, softmax, losses and
 * reductions; fp32 master weights (with a bf16 copy for the GEMMs), fp32 gradients accumulated across micro-batches,
 * fp32 optimizer moments. Memory: one device arena for the model state and one for activations, carved by tables
 * computed from the config and a token / sequence / head-row budget that grows only when a batch exceeds it.
 * The design is written down at the top of cuda/backend_cuda.cu. */
#ifndef MB_BACKEND_CUDA_H
#define MB_BACKEND_CUDA_H

#ifdef __cplusplus
extern "C" {
#endif

/* inside extern "C": the C headers below have no guards of their own */
#include "model/backend.h"

/* Creates the CUDA backend on the current device. Parameters, gradients and optimizer state start at zero. Fails
 * with a message when no device is usable or the config needs something the kernels lack (head_dim 32, 64, 128). */
int mb_backend_create_cuda(mb_backend **backend, const mb_config *config, mb_error *err);

/* Optional: sizes the activation arena for micro-batches of up to max_tokens tokens, max_sequences sequences and
 * max_head_rows head rows (labelled tokens for MLM, sequences for a classifier), so that the first steps do not
 * re-carve it. forward() grows it by itself when a batch exceeds the budget. */
int mb_backend_cuda_reserve(mb_backend *backend, int max_tokens, int max_sequences, int max_head_rows, mb_error *err);

#ifdef __cplusplus
}
#endif

#endif
