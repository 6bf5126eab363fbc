/* The whole ModernBERT forward and backward on the CPU in fp32: the reference every other backend is checked against.
 *
 * The model reads parameters from, and accumulates gradients into, arenas laid out by the parameter table
 * (model/params.h); it owns only its activations. forward() keeps what backward() needs; backward() must follow the
 * forward() of the same batch. */
#ifndef MB_MODEL_CPU_H
#define MB_MODEL_CPU_H

#include "common/error.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/params.h"

typedef struct mb_cpu_model mb_cpu_model;

typedef struct mb_forward_result {
    double loss_sum;     /* summed over labelled rows (MLM) or sequences (classifier) */
    int loss_count;      /* number of terms in loss_sum; loss = loss_sum / loss_count */
    const float *logits; /* [logit_rows, logit_cols], valid until the next forward/backward */
    int logit_rows, logit_cols;
} mb_forward_result;

int mb_cpu_model_create(mb_cpu_model **model, const mb_config *config, const mb_param_table *table, float *params,
                        float *grads, mb_error *err);
void mb_cpu_model_free(mb_cpu_model *model);

/* Checks ids, cu_seqlens and labels against the config (errors name the field and index). */
int mb_batch_validate(const mb_batch *batch, const mb_config *config, mb_error *err);

int mb_cpu_forward(mb_cpu_model *model, const mb_batch *batch, mb_forward_result *result, mb_error *err);
/* Accumulates d(loss_sum · grad_scale)/dθ into the gradient arena. */
int mb_cpu_backward(mb_cpu_model *model, float grad_scale, mb_error *err);

/* Changes the RoPE thetas (a context-extension phase change). */
void mb_cpu_model_set_rope_theta(mb_cpu_model *model, double global_theta, double local_theta);

/* The final hidden states [n, H] of the last forward (for pooling tests and embeddings export). */
const float *mb_cpu_last_hidden(const mb_cpu_model *model);

#endif
