/* MLM masking (modernbert-spec.md §5.2): choose ~rate of the eligible positions as prediction targets.
 *
 * Per position i one uniform draw r_i in [0, 1) (mb_rng_uniform's 53-bit grid), then
 *     r_i <  0.8·rate            → input becomes [MASK]
 *     0.8·rate <= r_i < 0.9·rate → input becomes a random id, uniform over the non-special ids of [0, vocab)
 *     0.9·rate <= r_i < rate     → input kept
 *     otherwise                  → not a target
 * labels_i = original id on the three chosen kinds, else MB_IGNORE_INDEX (-100). A draw is made for every position,
 * eligible or not, so the stream depends only on the position count; a random replacement takes one extra draw.
 * Not eligible (never a target, input never changed): every special id, except [CLS]/[SEP] when include_cls_sep is set
 * (what ModernBERT's packer did). [PAD] is never eligible. Deterministic given the mb_rng state. */
#ifndef MB_MASKING_H
#define MB_MASKING_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/rng.h"

#define MB_IGNORE_INDEX (-100)

typedef struct mb_masking_config {
    double rate;                 /* fraction of eligible positions that become targets; 0.30 */
    int32_t vocab_size;          /* ids must lie in [0, vocab_size) */
    int32_t mask_id;             /* [MASK] */
    int32_t cls_id, sep_id, pad_id;  /* -1 when the vocabulary has none */
    const int32_t *special_ids;  /* every other special id (may repeat the four above); copied by init */
    size_t special_count;
    int include_cls_sep;         /* 1: [CLS]/[SEP] may be masked and predicted */
} mb_masking_config;

/* ModernBERT's values: rate 0.30, vocab 50368, [MASK] 50284, [CLS] 50281, [SEP] 50282, [PAD] 50283, no extra list. */
void mb_masking_config_default(mb_masking_config *config);

typedef struct mb_masker {
    int32_t vocab_size;
    int32_t mask_id;
    uint64_t *excluded;          /* bitmap over [0, vocab): 1 = never a target */
    int32_t *replacement_ids;    /* the non-special ids, drawn from uniformly */
    int32_t replacement_count;
    uint64_t threshold[3];       /* r·2^53 thresholds of the mask / random / keep bands (integer compare) */
} mb_masker;

int mb_masker_init(mb_masker *masker, const mb_masking_config *config, mb_error *err);
void mb_masker_free(mb_masker *masker);

/* Masks ids[0..count) into masked[] and labels[] (masked may equal ids: in place). *label_count (may be NULL) gets
 * the number of targets. Fails, naming the position, on an id outside [0, vocab). */
int mb_masker_apply(const mb_masker *masker, mb_rng *rng, const int32_t *ids, size_t count, int32_t *masked,
                    int32_t *labels, size_t *label_count, mb_error *err);

#endif
