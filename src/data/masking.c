/* MLM masking: one uniform draw per position split into mask / random / keep bands (see masking.h for the math). */
#include "data/masking.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void mb_masking_config_default(mb_masking_config *config) {
    memset(config, 0, sizeof *config);
    config->rate = 0.30;
    config->vocab_size = 50368;
    config->mask_id = 50284;
    config->cls_id = 50281;
    config->sep_id = 50282;
    config->pad_id = 50283;
}

static void bit_set(uint64_t *bits, int32_t id) { bits[id >> 6] |= 1ULL << (id & 63); }
static void bit_clear(uint64_t *bits, int32_t id) { bits[id >> 6] &= ~(1ULL << (id & 63)); }
static int bit_get(const uint64_t *bits, int32_t id) { return (int)((bits[id >> 6] >> (id & 63)) & 1); }

static int check_id(int32_t id, int32_t vocab, const char *field, int allow_absent, mb_error *err) {
    if (allow_absent && id == -1) return 0;
    if (id < 0 || id >= vocab) return mb_fail(err, "masking config: %s = %d is outside [0, vocab_size = %d)", field, id, vocab);
    return 0;
}

/* Threshold t with  (u·2^-53 < p)  <=>  (u < t)  for every 53-bit integer u: t = ceil(p·2^53). */
static uint64_t uniform_threshold(double p) { return (uint64_t)ceil(p * 0x1p53); }

int mb_masker_init(mb_masker *masker, const mb_masking_config *config, mb_error *err) {
    memset(masker, 0, sizeof *masker);
    int32_t vocab = config->vocab_size;
    if (vocab <= 0) return mb_fail(err, "masking config: vocab_size = %d must be positive", vocab);
    if (!(config->rate >= 0.0 && config->rate <= 1.0))
        return mb_fail(err, "masking config: rate = %g must lie in [0, 1]", config->rate);
    if (check_id(config->mask_id, vocab, "mask_id", 0, err) || check_id(config->cls_id, vocab, "cls_id", 1, err) ||
        check_id(config->sep_id, vocab, "sep_id", 1, err) || check_id(config->pad_id, vocab, "pad_id", 1, err))
        return -1;
    for (size_t i = 0; i < config->special_count; i++)
        if (config->special_ids[i] < 0 || config->special_ids[i] >= vocab)
            return mb_fail(err, "masking config: special_ids[%zu] = %d is outside [0, vocab_size = %d)", i,
                           config->special_ids[i], vocab);

    /* special = the list plus the four named ids; these are never random replacements. */
    size_t words = ((size_t)vocab + 63) / 64;
    uint64_t *special = calloc(words, sizeof *special);
    masker->excluded = calloc(words, sizeof *masker->excluded);
    masker->replacement_ids = malloc((size_t)vocab * sizeof *masker->replacement_ids);
    if (!special || !masker->excluded || !masker->replacement_ids) {
        free(special);
        mb_masker_free(masker);
        return mb_fail(err, "masking: out of memory for a vocabulary of %d ids", vocab);
    }
    const int32_t named[4] = {config->mask_id, config->cls_id, config->sep_id, config->pad_id};
    for (int i = 0; i < 4; i++)
        if (named[i] >= 0) bit_set(special, named[i]);
    for (size_t i = 0; i < config->special_count; i++) bit_set(special, config->special_ids[i]);

    memcpy(masker->excluded, special, words * sizeof *special);
    if (config->include_cls_sep) {
        if (config->cls_id >= 0) bit_clear(masker->excluded, config->cls_id);
        if (config->sep_id >= 0) bit_clear(masker->excluded, config->sep_id);
    }
    if (config->pad_id >= 0) bit_set(masker->excluded, config->pad_id);

    for (int32_t id = 0; id < vocab; id++)
        if (!bit_get(special, id)) masker->replacement_ids[masker->replacement_count++] = id;
    free(special);
    if (masker->replacement_count == 0) {
        mb_masker_free(masker);
        return mb_fail(err, "masking config: every id of [0, %d) is special; no id left for random replacement", vocab);
    }
    masker->vocab_size = vocab;
    masker->mask_id = config->mask_id;
    masker->threshold[0] = uniform_threshold(config->rate * 0.8);
    masker->threshold[1] = uniform_threshold(config->rate * 0.9);
    masker->threshold[2] = uniform_threshold(config->rate);
    return 0;
}

void mb_masker_free(mb_masker *masker) {
    free(masker->excluded);
    free(masker->replacement_ids);
    memset(masker, 0, sizeof *masker);
}

int mb_masker_apply(const mb_masker *masker, mb_rng *rng, const int32_t *ids, size_t count, int32_t *masked,
                    int32_t *labels, size_t *label_count, mb_error *err) {
    const uint64_t t_mask = masker->threshold[0], t_random = masker->threshold[1], t_keep = masker->threshold[2];
    const uint64_t *excluded = masker->excluded;
    const uint32_t vocab = (uint32_t)masker->vocab_size;
    size_t targets = 0;
    for (size_t i = 0; i < count; i++) {
        int32_t id = ids[i];
        uint64_t u = mb_rng_next_u64(rng) >> 11;  /* the 53-bit integer behind mb_rng_uniform */
        if ((uint32_t)id >= vocab)
            return mb_fail(err, "masking: position %zu holds id %d outside [0, vocab_size = %u)", i, id, vocab);
        if (u >= t_keep || bit_get(excluded, id)) {
            masked[i] = id;
            labels[i] = MB_IGNORE_INDEX;
            continue;
        }
        labels[i] = id;
        targets++;
        if (u < t_mask)
            masked[i] = masker->mask_id;
        else if (u < t_random)
            masked[i] = masker->replacement_ids[mb_rng_below(rng, (uint64_t)masker->replacement_count)];
        else
            masked[i] = id;
    }
    if (label_count) *label_count = targets;
    return 0;
}
