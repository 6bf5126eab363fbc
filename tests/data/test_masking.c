/* MLM masking: the exact band rule against a re-derivation from mb_rng_uniform, the 30% / 80-10-10 statistics,
 * exclusions of special ids, random replacements never special, determinism, and config/id errors. */
#include <criterion/criterion.h>

#include <stdlib.h>
#include <string.h>

#include "data/masking.h"

#define VOCAB 1000
#define CLS 996
#define SEP 997
#define PAD 998
#define MASK 999

static const int32_t extra_specials[] = {0, 5, 500};

static mb_masking_config small_config(void) {
    mb_masking_config c;
    mb_masking_config_default(&c);
    c.vocab_size = VOCAB;
    c.mask_id = MASK;
    c.cls_id = CLS;
    c.sep_id = SEP;
    c.pad_id = PAD;
    c.special_ids = extra_specials;
    c.special_count = 3;
    return c;
}

static int is_special(int32_t id) {
    return id == CLS || id == SEP || id == PAD || id == MASK || id == 0 || id == 5 || id == 500;
}

/* Random ids, non-special unless special_every > 0 (then every special_every-th id cycles through the specials). */
static int32_t *make_ids(size_t n, uint64_t seed, int special_every) {
    static const int32_t specials[] = {CLS, SEP, PAD, MASK, 0, 5, 500};
    int32_t *ids = malloc(n * sizeof *ids);
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    for (size_t i = 0; i < n; i++) {
        if (special_every && i % (size_t)special_every == 0) {
            ids[i] = specials[(i / (size_t)special_every) % 7];
            continue;
        }
        do ids[i] = (int32_t)mb_rng_below(&rng, VOCAB);
        while (is_special(ids[i]));
    }
    return ids;
}

Test(masking, matches_the_band_rule_draw_by_draw) {
    mb_masking_config config = small_config();
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0, "%s", err.message);
    size_t n = 20000;
    int32_t *ids = make_ids(n, 1, 7), *masked = malloc(n * 4), *labels = malloc(n * 4);
    mb_rng rng, replay;
    mb_rng_seed(&rng, 42);
    replay = rng;
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, n, masked, labels, NULL, &err), 0, "%s", err.message);
    /* the non-special ids in increasing order: the replacement table */
    int32_t table[VOCAB], table_count = 0;
    for (int32_t id = 0; id < VOCAB; id++)
        if (!is_special(id)) table[table_count++] = id;
    for (size_t i = 0; i < n; i++) {
        double r = mb_rng_uniform(&replay);
        int eligible = !is_special(ids[i]);
        if (!eligible || r >= 0.3) {
            cr_assert_eq(masked[i], ids[i]);
            cr_assert_eq(labels[i], MB_IGNORE_INDEX);
        } else if (r < 0.3 * 0.8) {
            cr_assert_eq(masked[i], MASK, "position %zu", i);
            cr_assert_eq(labels[i], ids[i]);
        } else if (r < 0.3 * 0.9) {
            cr_assert_eq(masked[i], table[mb_rng_below(&replay, (uint64_t)table_count)], "position %zu", i);
            cr_assert_eq(labels[i], ids[i]);
        } else {
            cr_assert_eq(masked[i], ids[i]);
            cr_assert_eq(labels[i], ids[i]);
        }
    }
    cr_assert_eq(memcmp(&rng, &replay, sizeof rng), 0, "the generator must end in the same state");
    free(ids), free(masked), free(labels);
    mb_masker_free(&masker);
}

Test(masking, rate_and_80_10_10_statistics) {
    mb_masking_config config = small_config();
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0, "%s", err.message);
    size_t n = 1000000, label_count = 0;
    int32_t *ids = make_ids(n, 2, 0), *masked = malloc(n * 4), *labels = malloc(n * 4);
    mb_rng rng;
    mb_rng_seed(&rng, 7);
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, n, masked, labels, &label_count, &err), 0, "%s", err.message);
    size_t targets = 0, as_mask = 0, as_random = 0, as_keep = 0;
    for (size_t i = 0; i < n; i++) {
        if (labels[i] == MB_IGNORE_INDEX) {
            cr_assert_eq(masked[i], ids[i], "an unlabelled position must keep its id");
            continue;
        }
        cr_assert_eq(labels[i], ids[i], "a label is the original id");
        targets++;
        if (masked[i] == MASK) as_mask++;
        else if (masked[i] == ids[i]) as_keep++;  /* includes random draws of the same id (p = 1/993) */
        else as_random++;
    }
    cr_assert_eq(targets, label_count);
    double rate = (double)targets / n;  /* sd 4.6e-4 */
    cr_assert(rate > 0.297 && rate < 0.303, "label rate %f", rate);
    double fm = (double)as_mask / targets, fr = (double)as_random / targets, fk = (double)as_keep / targets;
    cr_assert(fm > 0.795 && fm < 0.805, "mask share %f", fm);   /* sd 5.2e-4 */
    cr_assert(fr > 0.096 && fr < 0.104, "random share %f", fr); /* sd 3.9e-4 */
    cr_assert(fk > 0.096 && fk < 0.104, "keep share %f", fk);
    free(ids), free(masked), free(labels);
    mb_masker_free(&masker);
}

Test(masking, specials_never_targets_by_default) {
    mb_masking_config config = small_config();
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0, "%s", err.message);
    size_t n = 200000, label_count;
    int32_t *ids = make_ids(n, 3, 3), *masked = malloc(n * 4), *labels = malloc(n * 4);
    mb_rng rng;
    mb_rng_seed(&rng, 9);
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, n, masked, labels, &label_count, &err), 0);
    size_t eligible = 0, eligible_targets = 0;
    for (size_t i = 0; i < n; i++) {
        if (is_special(ids[i])) {
            cr_assert_eq(labels[i], MB_IGNORE_INDEX, "special id %d at %zu got a label", ids[i], i);
            cr_assert_eq(masked[i], ids[i]);
        } else {
            eligible++;
            eligible_targets += labels[i] != MB_IGNORE_INDEX;
        }
    }
    double rate = (double)eligible_targets / eligible;
    cr_assert(rate > 0.29 && rate < 0.31, "rate over eligible positions %f", rate);
    free(ids), free(masked), free(labels);
    mb_masker_free(&masker);
}

Test(masking, include_cls_sep_makes_them_targets_but_never_pad) {
    mb_masking_config config = small_config();
    config.include_cls_sep = 1;
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0, "%s", err.message);
    size_t n = 210000;
    int32_t *ids = make_ids(n, 4, 2), *masked = malloc(n * 4), *labels = malloc(n * 4);
    mb_rng rng;
    mb_rng_seed(&rng, 11);
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, n, masked, labels, NULL, &err), 0);
    size_t cls_sep = 0, cls_sep_targets = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] == CLS || ids[i] == SEP) {
            cls_sep++;
            cls_sep_targets += labels[i] == ids[i];
        } else if (is_special(ids[i])) {
            cr_assert_eq(labels[i], MB_IGNORE_INDEX, "id %d must stay excluded", ids[i]);
            cr_assert_eq(masked[i], ids[i]);
        }
    }
    double rate = (double)cls_sep_targets / cls_sep;
    cr_assert(cls_sep > 20000 && rate > 0.28 && rate < 0.32, "[CLS]/[SEP] target rate %f over %zu", rate, cls_sep);
    free(ids), free(masked), free(labels);
    mb_masker_free(&masker);
}

Test(masking, random_replacements_cover_the_non_special_ids_only) {
    mb_masking_config config = small_config();
    config.rate = 1.0;  /* every eligible position a target: 10% of them random */
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0, "%s", err.message);
    size_t n = 1000000;
    int32_t *ids = malloc(n * 4), *masked = malloc(n * 4), *labels = malloc(n * 4);
    for (size_t i = 0; i < n; i++) ids[i] = 7;  /* so any other output id is a random replacement */
    mb_rng rng;
    mb_rng_seed(&rng, 13);
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, n, masked, labels, NULL, &err), 0);
    static size_t hits[VOCAB];
    memset(hits, 0, sizeof hits);
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(labels[i], 7);
        cr_assert(masked[i] >= 0 && masked[i] < VOCAB);
        if (masked[i] != MASK) hits[masked[i]]++;
    }
    for (int32_t id = 0; id < VOCAB; id++) {
        if (is_special(id)) {
            cr_assert_eq(hits[id], 0, "special id %d drawn as a replacement", id);
        } else if (id != 7) {
            /* expected 1e6 · 0.1 / 993 ≈ 100.7 draws each */
            cr_assert(hits[id] > 50 && hits[id] < 160, "id %d drawn %zu times", id, hits[id]);
        }
    }
    free(ids), free(masked), free(labels);
    mb_masker_free(&masker);
}

Test(masking, deterministic_in_place_and_seed_dependent) {
    mb_masking_config config = small_config();
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0);
    size_t n = 5000;
    int32_t *ids = make_ids(n, 5, 11), *a = malloc(n * 4), *la = malloc(n * 4), *b = malloc(n * 4),
            *lb = malloc(n * 4), *c = malloc(n * 4), *lc = malloc(n * 4);
    mb_rng r1, r2, r3;
    mb_rng_seed(&r1, 100);
    mb_rng_seed(&r2, 100);
    mb_rng_seed(&r3, 101);
    memcpy(b, ids, n * 4);
    cr_assert_eq(mb_masker_apply(&masker, &r1, ids, n, a, la, NULL, &err), 0);
    cr_assert_eq(mb_masker_apply(&masker, &r2, b, n, b, lb, NULL, &err), 0); /* in place */
    cr_assert_eq(mb_masker_apply(&masker, &r3, ids, n, c, lc, NULL, &err), 0);
    cr_assert_eq(memcmp(a, b, n * 4), 0);
    cr_assert_eq(memcmp(la, lb, n * 4), 0);
    cr_assert_neq(memcmp(la, lc, n * 4), 0, "another seed must choose other positions");
    free(ids), free(a), free(la), free(b), free(lb), free(c), free(lc);
    mb_masker_free(&masker);
}

Test(masking, rate_zero_leaves_everything) {
    mb_masking_config config = small_config();
    config.rate = 0;
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0);
    size_t n = 10000, count = 99;
    int32_t *ids = make_ids(n, 6, 0), *m = malloc(n * 4), *l = malloc(n * 4);
    mb_rng rng;
    mb_rng_seed(&rng, 1);
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, n, m, l, &count, &err), 0);
    cr_assert_eq(count, 0);
    cr_assert_eq(memcmp(m, ids, n * 4), 0);
    for (size_t i = 0; i < n; i++) cr_assert_eq(l[i], MB_IGNORE_INDEX);
    free(ids), free(m), free(l);
    mb_masker_free(&masker);
}

Test(masking, out_of_range_id_is_an_error_naming_the_position) {
    mb_masking_config config = small_config();
    mb_masker masker;
    mb_error err;
    cr_assert_eq(mb_masker_init(&masker, &config, &err), 0);
    int32_t ids[4] = {1, 2, VOCAB, 3}, m[4], l[4];
    mb_rng rng;
    mb_rng_seed(&rng, 1);
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, 4, m, l, NULL, &err), -1);
    cr_assert(strstr(err.message, "position 2") != NULL, "%s", err.message);
    ids[2] = -1;
    cr_assert_eq(mb_masker_apply(&masker, &rng, ids, 4, m, l, NULL, &err), -1);
    mb_masker_free(&masker);
}

Test(masking, invalid_configs_are_errors) {
    mb_masker masker;
    mb_error err;
    mb_masking_config c = small_config();
    c.rate = 1.5;
    cr_assert_eq(mb_masker_init(&masker, &c, &err), -1);
    cr_assert(strstr(err.message, "rate") != NULL, "%s", err.message);
    c = small_config();
    c.mask_id = VOCAB;
    cr_assert_eq(mb_masker_init(&masker, &c, &err), -1);
    cr_assert(strstr(err.message, "mask_id") != NULL, "%s", err.message);
    c = small_config();
    static const int32_t bad[] = {3, 1000};
    c.special_ids = bad;
    c.special_count = 2;
    cr_assert_eq(mb_masker_init(&masker, &c, &err), -1);
    cr_assert(strstr(err.message, "special_ids[1]") != NULL, "%s", err.message);
    c = small_config();
    c.vocab_size = 0;
    cr_assert_eq(mb_masker_init(&masker, &c, &err), -1);
    /* a vocabulary made only of special ids leaves nothing to draw */
    static const int32_t all[] = {0, 1, 2, 3};
    c = small_config();
    c.vocab_size = 4;
    c.mask_id = 3;
    c.cls_id = c.sep_id = c.pad_id = -1;
    c.special_ids = all;
    c.special_count = 4;
    cr_assert_eq(mb_masker_init(&masker, &c, &err), -1);
    cr_assert(strstr(err.message, "special") != NULL, "%s", err.message);
}
