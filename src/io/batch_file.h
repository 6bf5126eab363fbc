/* Batch files: one packed micro-batch in safetensors form, the format of `modernbert check` and of step-by-step
 * comparison runs. input_ids I32 [N], cu_seqlens I32 [B+1] (starting at 0), labels: I32 [N] with -100 for
 * unlabelled tokens (masked LM) or I32/F32 [B] per sequence (classifier). I64 is accepted for every integer tensor. */
#ifndef MB_BATCH_FILE_H
#define MB_BATCH_FILE_H

#include "common/error.h"
#include "model/batch.h"
#include "model/config.h"

typedef struct mb_batch_file {
    int32_t *input_ids, *cu_seqlens, *labels;
    float *sequence_labels;
    mb_batch batch;  /* points into the arrays above */
} mb_batch_file;

/* Reads and validates the batch against the model config (errors name the file and tensor). */
int mb_batch_file_load(mb_batch_file *batch, const char *path, const mb_config *config, mb_error *err);
void mb_batch_file_free(mb_batch_file *batch);

#endif
