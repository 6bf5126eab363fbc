/* A packed micro-batch: B sequences concatenated without padding, delimited by cu_seqlens. */
#ifndef MB_BATCH_H
#define MB_BATCH_H

#include <stdint.h>

typedef struct mb_batch {
    int token_count;                /* n = cu_seqlens[B] */
    int sequence_count;             /* B */
    const int32_t *input_ids;       /* [n] */
    const int32_t *cu_seqlens;      /* [B + 1], cu_seqlens[0] = 0, strictly increasing */
    const int32_t *labels;          /* [n] MLM targets, -100 = not labelled (masked-LM head) */
    const float *sequence_labels;   /* [B] class index or regression target (sequence-classifier head) */
} mb_batch;

#endif
