/* Model FLOPs, the project's convention (docs/performance.md), and the dense bf16 peaks MFU is measured against.
 *   matmuls    6 · L · (H·3H + H·H + H·2I + I·H) per token
 *   attention  12 · H · (keys each token really attends to), per layer: global = its document's length,
 *              local = keys with |i − j| ≤ local_attention/2 inside the document; padding never counts
 *   MLM head   6 · (H·H + H·V) per labelled row */
#ifndef MB_FLOPS_H
#define MB_FLOPS_H

#include <stdint.h>

#include "model/batch.h"
#include "model/config.h"

/* FLOPs of one training step (forward + backward) over a packed batch with `labelled_rows` MLM rows. */
double mb_batch_model_flops(const mb_config *config, const mb_batch *batch, int64_t labelled_rows);
/* The same for documents of one length (benchmarks), per token, with a labelled fraction. */
double mb_model_flops_per_token(const mb_config *config, int seq_len, double labelled_fraction);
/* Datasheet dense bf16 peak in FLOP/s for a CUDA device name (H100/H200 SXM 989e12, A100 312e12); 0 if unknown. */
double mb_device_peak_flops(const char *device_name);

#endif
