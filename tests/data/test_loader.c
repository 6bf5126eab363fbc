/* The pretraining loader: micro-batch invariants over several epochs (no token lost or duplicated, sequences never
 * crossing cu_seqlens, budgets), truncation, exact resume from a JSON cursor (mid-epoch, across an epoch boundary,
 * with another world size), rank streams that partition the global stream, the batch-size warmup schedule, errors
 * from the prefetch thread, invalid configs, and the shard-set source against the in-memory one. */
#include <criterion/criterion.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/loader.h"
#include "data/shard_writer.h"
#include "data/shards.h"

/* ---- a corpus whose token ids are unique (id = global token index), so content identifies its origin ---- */

typedef struct corpus {
    int32_t *tokens;
    uint64_t *offsets;
    uint64_t count, total;
    mb_memory_documents docs;
} corpus;

static void make_corpus(corpus *c, uint64_t count, double median, double sigma, uint64_t seed) {
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    c->count = count;
    c->offsets = malloc((count + 1) * sizeof *c->offsets);
    c->offsets[0] = 0;
    for (uint64_t d = 0; d < count; d++) {
        uint64_t length = d % 23 == 5 ? 0 : 1 + (uint64_t)exp(log(median) + sigma * mb_rng_normal(&rng));
        if (length > 5000) length = 5000;
        c->offsets[d + 1] = c->offsets[d] + length;
    }
    c->total = c->offsets[count];
    c->tokens = malloc((c->total ? c->total : 1) * sizeof *c->tokens);
    for (uint64_t i = 0; i < c->total; i++) c->tokens[i] = (int32_t)i;
    c->docs = (mb_memory_documents){.tokens = c->tokens, .offsets = c->offsets, .count = count};
}

static void free_corpus(corpus *c) {
    free(c->tokens);
    free(c->offsets);
}

static mb_loader_config base_config(const corpus *c, int32_t seq_len, int64_t micro, int64_t step, int32_t world,
                                    int32_t rank, int32_t prefetch) {
    mb_loader_config config;
    mb_loader_config_default(&config);
    config.seed = 1234;
    config.max_seq_len = seq_len;
    config.micro_tokens = micro;
    config.step_tokens = step;
    config.world_size = world;
    config.rank = rank;
    config.prefetch = prefetch;
    int32_t first_special = (int32_t)c->total;
    config.masking.vocab_size = first_special + 4;
    config.masking.cls_id = first_special;
    config.masking.sep_id = first_special + 1;
    config.masking.pad_id = first_special + 2;
    config.masking.mask_id = first_special + 3;
    return config;
}

/* ---- recorded micro-batches ---- */

typedef struct rec {
    mb_loader_batch meta;  /* pointers inside are not used */
    int32_t *ids, *labels, *cu;
    mb_seq_ref *seqs;
} rec;

typedef struct recs {
    rec *items;
    size_t count, alloc;
} recs;

static void recs_add(recs *r, const mb_loader_batch *b) {
    if (r->count == r->alloc) {
        r->alloc = r->alloc ? 2 * r->alloc : 64;
        r->items = realloc(r->items, r->alloc * sizeof *r->items);
    }
    rec *x = &r->items[r->count++];
    size_t n = (size_t)b->batch.token_count, s = (size_t)b->batch.sequence_count;
    x->meta = *b;
    x->ids = malloc(n * 4 + 4);
    x->labels = malloc(n * 4 + 4);
    x->cu = malloc((s + 1) * 4);
    x->seqs = malloc(s * sizeof *x->seqs + 1);
    memcpy(x->ids, b->batch.input_ids, n * 4);
    memcpy(x->labels, b->batch.labels, n * 4);
    memcpy(x->cu, b->batch.cu_seqlens, (s + 1) * 4);
    memcpy(x->seqs, b->sequences, s * sizeof *x->seqs);
}

static void recs_free(recs *r) {
    for (size_t i = 0; i < r->count; i++) {
        free(r->items[i].ids);
        free(r->items[i].labels);
        free(r->items[i].cu);
        free(r->items[i].seqs);
    }
    free(r->items);
    memset(r, 0, sizeof *r);
}

static void assert_same(const rec *a, const rec *b, const char *what) {
    cr_assert_eq(a->meta.step, b->meta.step, "%s: step", what);
    cr_assert_eq(a->meta.global_index, b->meta.global_index, "%s: step %llu global index", what,
                 (unsigned long long)a->meta.step);
    cr_assert_eq(a->meta.global_count, b->meta.global_count, "%s", what);
    cr_assert_eq(a->meta.microbatch, b->meta.microbatch, "%s", what);
    cr_assert_eq(a->meta.step_token_count, b->meta.step_token_count, "%s", what);
    cr_assert_eq(a->meta.batch.token_count, b->meta.batch.token_count, "%s: step %llu micro-batch %d tokens", what,
                 (unsigned long long)a->meta.step, a->meta.global_index);
    cr_assert_eq(a->meta.batch.sequence_count, b->meta.batch.sequence_count, "%s", what);
    size_t n = (size_t)a->meta.batch.token_count, s = (size_t)a->meta.batch.sequence_count;
    cr_assert_eq(memcmp(a->ids, b->ids, n * 4), 0, "%s: input ids differ at step %llu", what,
                 (unsigned long long)a->meta.step);
    cr_assert_eq(memcmp(a->labels, b->labels, n * 4), 0, "%s: labels differ", what);
    cr_assert_eq(memcmp(a->cu, b->cu, (s + 1) * 4), 0, "%s: cu_seqlens differ", what);
    for (size_t k = 0; k < s; k++) {
        cr_assert_eq(a->seqs[k].document, b->seqs[k].document, "%s", what);
        cr_assert_eq(a->seqs[k].chunk, b->seqs[k].chunk, "%s", what);
        cr_assert_eq(a->seqs[k].epoch, b->seqs[k].epoch, "%s", what);
    }
}

static mb_loader *open_loader(const mb_loader_config *config, const corpus *c, const mb_loader_cursor *resume) {
    mb_doc_source source = mb_doc_source_memory(&c->docs);
    mb_loader *loader = NULL;
    mb_error err;
    cr_assert_eq(mb_loader_open(&loader, config, &source, resume, &err), 0, "%s", err.message);
    return loader;
}

/* Runs whole steps (this rank's micro-batches of each) and records them. */
static void run_steps(mb_loader *loader, int steps, recs *out) {
    mb_error err;
    for (int s = 0; s < steps; s++) {
        for (;;) {
            mb_loader_batch b;
            cr_assert_eq(mb_loader_next(loader, &b, &err), 0, "%s", err.message);
            recs_add(out, &b);
            if (b.index_in_step == b.count_in_step - 1) break;
        }
    }
}

static char *cursor_json(mb_loader *loader) {
    mb_loader_cursor cursor;
    mb_error err;
    cr_assert_eq(mb_loader_get_cursor(loader, &cursor, &err), 0, "%s", err.message);
    char *json;
    cr_assert_eq(mb_loader_cursor_to_json(&cursor, &json, &err), 0, "%s", err.message);
    mb_loader_cursor_free(&cursor);
    return json;
}

static mb_loader *open_from_json(const mb_loader_config *config, const corpus *c, const char *json) {
    mb_loader_cursor cursor;
    mb_error err;
    cr_assert_eq(mb_loader_cursor_from_json(json, &cursor, &err), 0, "%s", err.message);
    mb_loader *loader = open_loader(config, c, &cursor);
    mb_loader_cursor_free(&cursor);
    return loader;
}

/* ---- invariants ---- */

static int32_t original_id(const rec *r, size_t i) {
    return r->labels[i] != MB_IGNORE_INDEX ? r->labels[i] : r->ids[i];
}

/* Checks one micro-batch against the corpus: cu_seqlens, budget, lengths, every sequence equal to its chunk. */
static void check_batch(const rec *r, const corpus *c, const mb_loader_config *config) {
    const int32_t *cu = r->cu;
    int32_t n = r->meta.batch.token_count, s = r->meta.batch.sequence_count;
    cr_assert_gt(s, 0);
    cr_assert_eq(cu[0], 0);
    cr_assert_eq(cu[s], n);
    cr_assert_leq(n, config->micro_tokens, "token budget exceeded");
    cr_assert_eq(r->meta.capacity, config->micro_tokens);
    int32_t longest = 0;
    for (int32_t k = 0; k < s; k++) {
        int32_t length = cu[k + 1] - cu[k];
        cr_assert_gt(length, 0);
        cr_assert_leq(length, config->max_seq_len);
        cr_assert_eq((uint32_t)length, r->seqs[k].length);
        if (length > longest) longest = length;
        const mb_seq_ref *ref = &r->seqs[k];
        uint64_t doc_length = c->offsets[ref->document + 1] - c->offsets[ref->document];
        uint64_t offset = (uint64_t)ref->chunk * (uint64_t)config->max_seq_len;
        uint64_t expect = doc_length - offset < (uint64_t)config->max_seq_len ? doc_length - offset
                                                                               : (uint64_t)config->max_seq_len;
        cr_assert_eq((uint64_t)length, expect, "document %llu chunk %u length", (unsigned long long)ref->document,
                     ref->chunk);
        if (config->truncate) cr_assert_eq(ref->chunk, 0);
        for (int32_t j = 0; j < length; j++)
            cr_assert_eq(original_id(r, (size_t)(cu[k] + j)), c->tokens[c->offsets[ref->document] + offset + (uint64_t)j],
                         "sequence %d position %d is not its chunk's token", k, j);
    }
    cr_assert_eq(longest, r->meta.max_seqlen);
    int64_t labels = 0;
    for (int32_t i = 0; i < n; i++) labels += r->labels[i] != MB_IGNORE_INDEX;
    cr_assert_eq(labels, r->meta.label_count);
}

static uint64_t chunks_of(const corpus *c, uint64_t d, const mb_loader_config *config) {
    uint64_t length = c->offsets[d + 1] - c->offsets[d];
    if (length == 0) return 0;
    return config->truncate ? 1 : (length + (uint64_t)config->max_seq_len - 1) / (uint64_t)config->max_seq_len;
}

static void check_epochs(int prefetch, int truncate) {
    corpus c;
    make_corpus(&c, 300, 60, 1.0, 5);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, prefetch);
    config.truncate = truncate;
    mb_loader *loader = open_loader(&config, &c, NULL);
    recs all = {0};
    int steps = 0;
    while (steps < 3000) {
        run_steps(loader, 1, &all);
        steps++;
        if (all.items[all.count - 1].meta.epoch >= 3) break;
    }
    cr_assert_lt(steps, 3000);
    mb_loader_cursor cursor;
    mb_error err;
    cr_assert_eq(mb_loader_get_cursor(loader, &cursor, &err), 0, "%s", err.message);
    cr_assert_eq(cursor.step, (uint64_t)steps);

    /* per-step: the micro-batches of step s come in order and add up to the step's token count */
    int64_t step_tokens = 0, real = 0;
    uint64_t microbatch = 0;
    for (size_t i = 0; i < all.count; i++) {
        const rec *r = &all.items[i];
        check_batch(r, &c, &config);
        cr_assert_eq(r->meta.global_count, 4);
        cr_assert_eq(r->meta.global_index, (int32_t)(i % 4));
        cr_assert_eq(r->meta.microbatch, microbatch++);
        step_tokens += r->meta.batch.token_count;
        real += r->meta.batch.token_count;
        if (r->meta.global_index == 3) {
            cr_assert_eq(step_tokens, r->meta.step_token_count);
            step_tokens = 0;
        }
    }
    cr_assert_eq(cursor.tokens, (uint64_t)real);

    /* no chunk lost or duplicated: in every finished epoch, emitted + buffered = each chunk exactly once */
    uint64_t *base = malloc((c.count + 1) * sizeof *base);
    base[0] = 0;
    for (uint64_t d = 0; d < c.count; d++) base[d + 1] = base[d] + chunks_of(&c, d, &config);
    uint64_t epochs = cursor.epoch + 1;
    unsigned *seen = calloc(base[c.count] * epochs, sizeof *seen);
    for (size_t i = 0; i < all.count; i++)
        for (int32_t k = 0; k < all.items[i].meta.batch.sequence_count; k++) {
            const mb_seq_ref *ref = &all.items[i].seqs[k];
            cr_assert_lt(ref->epoch, epochs);
            cr_assert_lt(ref->chunk, chunks_of(&c, ref->document, &config));
            seen[ref->epoch * base[c.count] + base[ref->document] + ref->chunk]++;
        }
    for (uint64_t k = 0; k < cursor.pool_count; k++) {
        const mb_seq_ref *ref = &cursor.pool[k];
        seen[ref->epoch * base[c.count] + base[ref->document] + ref->chunk]++;
    }
    for (uint64_t e = 0; e < epochs; e++)
        for (uint64_t k = 0; k < base[c.count]; k++) {
            unsigned times = seen[e * base[c.count] + k];
            if (e < cursor.epoch)
                cr_assert_eq(times, 1, "epoch %llu chunk %llu seen %u times", (unsigned long long)e,
                             (unsigned long long)k, times);
            else
                cr_assert_leq(times, 1);
        }
    free(base);
    free(seen);
    mb_loader_cursor_free(&cursor);
    recs_free(&all);
    mb_loader_close(loader);
    free_corpus(&c);
}

Test(loader, no_token_lost_or_duplicated_over_epochs) { check_epochs(0, 0); }
Test(loader, no_token_lost_or_duplicated_over_epochs_threaded) { check_epochs(3, 0); }
Test(loader, truncate_keeps_each_document_once_per_epoch) { check_epochs(2, 1); }

Test(loader, epochs_are_shuffled_differently) {
    corpus c;
    make_corpus(&c, 200, 20, 0.5, 6);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 0);
    mb_loader *loader = open_loader(&config, &c, NULL);
    recs all = {0};
    while (all.count == 0 || all.items[all.count - 1].meta.epoch < 2) run_steps(loader, 1, &all);
    /* the first-appearance order of documents in epochs 0 and 1 */
    uint64_t order[2][200], n[2] = {0, 0};
    unsigned char seen[2][200] = {{0}};
    for (size_t i = 0; i < all.count; i++)
        for (int32_t k = 0; k < all.items[i].meta.batch.sequence_count; k++) {
            mb_seq_ref ref = all.items[i].seqs[k];
            if (ref.epoch < 2 && !seen[ref.epoch][ref.document]) {
                seen[ref.epoch][ref.document] = 1;
                order[ref.epoch][n[ref.epoch]++] = ref.document;
            }
        }
    size_t common = n[0] < n[1] ? n[0] : n[1]; /* a few of epoch 1 may still sit in the packer buffer */
    cr_assert_gt(common, 150);
    size_t same = 0, increasing = 0;
    for (size_t i = 0; i < common; i++) {
        same += order[0][i] == order[1][i];
        increasing += i > 0 && order[0][i] > order[0][i - 1];
    }
    cr_assert_lt(same, common / 4, "epochs 0 and 1 should be ordered differently");
    cr_assert_lt(increasing, 3 * common / 4, "epoch 0 should not follow the document index order");
    recs_free(&all);
    mb_loader_close(loader);
    free_corpus(&c);
}

/* ---- resume ---- */

static void check_resume_at(const corpus *c, mb_loader_config config, int prefetch_first, int prefetch_second,
                            int k, int total) {
    config.prefetch = prefetch_first;
    mb_loader *straight = open_loader(&config, c, NULL);
    recs expected = {0};
    run_steps(straight, total, &expected);
    mb_loader_close(straight);

    mb_loader *first = open_loader(&config, c, NULL);
    recs head = {0};
    run_steps(first, k, &head);
    char *json = cursor_json(first);
    mb_loader_close(first);
    config.prefetch = prefetch_second;
    mb_loader *second = open_from_json(&config, c, json);
    recs tail = {0};
    run_steps(second, total - k, &tail);
    mb_loader_close(second);

    cr_assert_eq(head.count + tail.count, expected.count);
    for (size_t i = 0; i < head.count; i++) assert_same(&head.items[i], &expected.items[i], "before the cursor");
    for (size_t i = 0; i < tail.count; i++)
        assert_same(&tail.items[i], &expected.items[head.count + i], "resumed from the cursor");
    free(json);
    recs_free(&expected);
    recs_free(&head);
    recs_free(&tail);
}

Test(loader, resume_mid_epoch_is_exact) {
    corpus c;
    make_corpus(&c, 400, 60, 1.0, 7);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 0);
    check_resume_at(&c, config, 0, 0, 7, 20);
    check_resume_at(&c, config, 3, 1, 11, 25);
    check_resume_at(&c, config, 0, 4, 0, 5);  /* a cursor taken before the first step */
    free_corpus(&c);
}

Test(loader, resume_across_an_epoch_boundary_is_exact) {
    corpus c;
    make_corpus(&c, 60, 40, 1.0, 8);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 0);
    /* find a step boundary where the stream is in a new epoch while the buffer still holds the old one's sequences */
    mb_loader *loader = open_loader(&config, &c, NULL);
    recs scratch = {0};
    int k = 0;
    for (; k < 500; k++) {
        run_steps(loader, 1, &scratch);
        mb_loader_cursor cursor;
        mb_error err;
        cr_assert_eq(mb_loader_get_cursor(loader, &cursor, &err), 0);
        int straddles = 0;
        for (uint64_t i = 0; i < cursor.pool_count; i++) straddles |= cursor.pool[i].epoch < cursor.epoch;
        uint64_t epoch = cursor.epoch;
        mb_loader_cursor_free(&cursor);
        if (straddles && epoch >= 2) break;
    }
    mb_loader_close(loader);
    recs_free(&scratch);
    cr_assert_lt(k, 500, "no step boundary with a buffer straddling two epochs");
    check_resume_at(&c, config, 0, 2, k + 1, k + 15);
    free_corpus(&c);
}

Test(loader, cursor_json_round_trip) {
    corpus c;
    make_corpus(&c, 100, 60, 1.0, 9);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 0);
    config.seed = 0xfedcba9876543210ULL;
    mb_loader *loader = open_loader(&config, &c, NULL);
    recs r = {0};
    run_steps(loader, 9, &r);
    mb_loader_cursor a, b;
    mb_error err;
    cr_assert_eq(mb_loader_get_cursor(loader, &a, &err), 0);
    char *json;
    cr_assert_eq(mb_loader_cursor_to_json(&a, &json, &err), 0);
    cr_assert_eq(mb_loader_cursor_from_json(json, &b, &err), 0, "%s", err.message);
    cr_assert_eq(a.seed, b.seed);
    cr_assert_eq(a.step, 9);
    cr_assert_eq(b.step, 9);
    cr_assert_eq(a.microbatch, b.microbatch);
    cr_assert_eq(a.tokens, b.tokens);
    cr_assert_eq(a.epoch, b.epoch);
    cr_assert_eq(a.permutation_index, b.permutation_index);
    cr_assert_eq(a.chunk, b.chunk);
    cr_assert_eq(a.pool_count, b.pool_count);
    cr_assert_gt(a.pool_count, 0);
    for (uint64_t i = 0; i < a.pool_count; i++) {
        cr_assert_eq(a.pool[i].document, b.pool[i].document);
        cr_assert_eq(a.pool[i].chunk, b.pool[i].chunk);
        cr_assert_eq(a.pool[i].epoch, b.pool[i].epoch);
    }
    /* malformed cursors are errors */
    mb_loader_cursor bad;
    cr_assert_eq(mb_loader_cursor_from_json("{", &bad, &err), -1);
    cr_assert_eq(mb_loader_cursor_from_json("{\"format\": \"other\"}", &bad, &err), -1);
    cr_assert(strstr(err.message, "format") != NULL, "%s", err.message);
    const char *pool = strstr(json, "\"pool\":[");
    cr_assert_not_null(pool);
    int cut = (int)(pool - json) + 8;
    char *extra = malloc(strlen(json) + 8); /* one more number in the pool: no longer triples */
    sprintf(extra, "%.*s1,%s", cut, json, json + cut);
    cr_assert_eq(mb_loader_cursor_from_json(extra, &bad, &err), -1);
    cr_assert(strstr(err.message, "multiple of 3") != NULL, "%s", err.message);
    free(extra);
    /* a cursor from other data or another seed is refused */
    mb_loader_config other = config;
    other.seed = 1;
    mb_doc_source source = mb_doc_source_memory(&c.docs);
    mb_loader *refused = NULL;
    cr_assert_eq(mb_loader_open(&refused, &other, &source, &a, &err), -1);
    cr_assert(strstr(err.message, "seed") != NULL, "%s", err.message);
    mb_memory_documents fewer = c.docs;
    fewer.count = c.count - 1;
    source = mb_doc_source_memory(&fewer);
    cr_assert_eq(mb_loader_open(&refused, &config, &source, &a, &err), -1);
    cr_assert(strstr(err.message, "document_count") != NULL, "%s", err.message);
    other = config;
    other.micro_tokens = 512;
    source = mb_doc_source_memory(&c.docs);
    cr_assert_eq(mb_loader_open(&refused, &other, &source, &a, &err), -1);
    cr_assert(strstr(err.message, "micro_tokens") != NULL, "%s", err.message);
    free(json);
    mb_loader_cursor_free(&a);
    mb_loader_cursor_free(&b);
    recs_free(&r);
    mb_loader_close(loader);
    free_corpus(&c);
}

Test(loader, cursor_only_at_step_boundaries) {
    corpus c;
    make_corpus(&c, 100, 60, 1.0, 10);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 2);
    mb_loader *loader = open_loader(&config, &c, NULL);
    mb_loader_batch b;
    mb_loader_cursor cursor;
    mb_error err;
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(mb_loader_next(loader, &b, &err), 0);
        int rc = mb_loader_get_cursor(loader, &cursor, &err);
        if (i < 3) {
            cr_assert_eq(rc, -1, "micro-batch %d of 4: mid-step", i);
            cr_assert(strstr(err.message, "middle of step 0") != NULL, "%s", err.message);
        } else {
            cr_assert_eq(rc, 0, "%s", err.message);
            cr_assert_eq(cursor.step, 1);
            cr_assert_eq(cursor.microbatch, 4);
            mb_loader_cursor_free(&cursor);
        }
    }
    mb_loader_close(loader);
    free_corpus(&c);
}

/* ---- world sizes ---- */

/* Runs `steps` steps on every rank of a world (optionally from a cursor); returns each rank's records. */
static void run_world(const corpus *c, mb_loader_config config, int world, const char *json, int steps,
                      recs *per_rank, char **cursors) {
    config.world_size = world;
    for (int r = 0; r < world; r++) {
        config.rank = r;
        mb_loader *loader = json ? open_from_json(&config, c, json) : open_loader(&config, c, NULL);
        memset(&per_rank[r], 0, sizeof per_rank[r]);
        run_steps(loader, steps, &per_rank[r]);
        if (cursors) cursors[r] = cursor_json(loader);
        mb_loader_close(loader);
    }
}

/* The union of the ranks' micro-batches of each step, in global order, equals the one-rank stream. */
static void assert_partition(const recs *single, const recs *per_rank, int world, const char *what) {
    size_t total = 0;
    for (int r = 0; r < world; r++) total += per_rank[r].count;
    cr_assert_eq(total, single->count, "%s: micro-batch count", what);
    size_t *next = calloc((size_t)world, sizeof *next);
    for (size_t i = 0; i < single->count; i++) {
        const rec *want = &single->items[i];
        int r = want->meta.global_index % world;
        cr_assert_lt(next[r], per_rank[r].count);
        const rec *got = &per_rank[r].items[next[r]++];
        cr_assert_eq(got->meta.count_in_step, want->meta.global_count / world, "%s", what);
        cr_assert_eq(got->meta.index_in_step, want->meta.global_index / world, "%s", what);
        assert_same(got, want, what);
    }
    free(next);
}

static void assert_disjoint(const recs *per_rank, int world) {
    /* within a step, no sequence is on two ranks, and rank r holds global indices r, r + W, ... */
    for (int r = 0; r < world; r++)
        for (size_t i = 0; i < per_rank[r].count; i++) {
            const rec *x = &per_rank[r].items[i];
            cr_assert_eq(x->meta.global_index % world, r);
            for (int q = r + 1; q < world; q++)
                for (size_t j = 0; j < per_rank[q].count; j++) {
                    const rec *y = &per_rank[q].items[j];
                    if (y->meta.step != x->meta.step) continue;
                    for (int32_t a = 0; a < x->meta.batch.sequence_count; a++)
                        for (int32_t b = 0; b < y->meta.batch.sequence_count; b++)
                            cr_assert(!(x->seqs[a].document == y->seqs[b].document &&
                                        x->seqs[a].chunk == y->seqs[b].chunk && x->seqs[a].epoch == y->seqs[b].epoch),
                                      "ranks %d and %d share a sequence in step %llu", r, q,
                                      (unsigned long long)x->meta.step);
                }
        }
}

Test(loader, ranks_partition_the_global_stream) {
    corpus c;
    make_corpus(&c, 300, 60, 1.0, 11);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 2);
    recs single[1], two[2], four[4];
    run_world(&c, config, 1, NULL, 12, single, NULL);
    run_world(&c, config, 2, NULL, 12, two, NULL);
    run_world(&c, config, 4, NULL, 12, four, NULL);
    assert_partition(single, two, 2, "2 ranks");
    assert_partition(single, four, 4, "4 ranks");
    assert_disjoint(two, 2);
    assert_disjoint(four, 4);
    recs_free(&single[0]);
    for (int r = 0; r < 2; r++) recs_free(&two[r]);
    for (int r = 0; r < 4; r++) recs_free(&four[r]);
    free_corpus(&c);
}

Test(loader, resume_with_another_world_size) {
    corpus c;
    make_corpus(&c, 300, 60, 1.0, 12);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 1);
    recs single[1];
    run_world(&c, config, 1, NULL, 16, single, NULL);
    /* 2 ranks for 6 steps; both ranks' cursors are the same */
    recs two[2];
    char *cursors[2];
    run_world(&c, config, 2, NULL, 6, two, cursors);
    cr_assert_str_eq(cursors[0], cursors[1]);
    /* continue with 4 ranks, then with 1 rank, from the same cursor */
    recs four[4], one[1];
    run_world(&c, config, 4, cursors[0], 10, four, NULL);
    run_world(&c, config, 1, cursors[0], 10, one, NULL);
    recs expected_tail = {.items = single[0].items + 6 * 4, .count = single[0].count - 6 * 4};
    recs expected_head = {.items = single[0].items, .count = 6 * 4};
    assert_partition(&expected_head, two, 2, "first 6 steps on 2 ranks");
    assert_partition(&expected_tail, four, 4, "resumed on 4 ranks");
    assert_partition(&expected_tail, one, 1, "resumed on 1 rank");
    for (int r = 0; r < 2; r++) recs_free(&two[r]), free(cursors[r]);
    for (int r = 0; r < 4; r++) recs_free(&four[r]);
    recs_free(&one[0]);
    recs_free(&single[0]);
    free_corpus(&c);
}

/* ---- batch-size warmup ---- */

Test(loader, batch_size_warmup_follows_the_schedule_on_any_world_size) {
    corpus c;
    make_corpus(&c, 400, 60, 1.0, 13);
    mb_loader_config config = base_config(&c, 64, 256, 2048, 1, 0, 0); /* 8 rows when warm */
    config.warmup_tokens = 20000;
    config.warmup_min_rows = 2;
    config.warmup_unit_rows = 2;
    recs single[1];
    run_world(&c, config, 1, NULL, 30, single, NULL);
    /* §5.5 with units of 2 rows, min 1 unit, max 4: sum(range(1, 4)) = 6 → thresholds ceil(20000/6 · {1, 3, 6}) */
    const uint64_t thresholds[3] = {3334, 10000, 20000};
    uint64_t tokens = 0;
    int seen_stages[5] = {0};
    for (size_t i = 0; i < single[0].count;) {
        const rec *first = &single[0].items[i];
        int expected = tokens >= 20000 ? 8 : tokens < thresholds[0] ? 2 : tokens < thresholds[1] ? 4 : 6;
        cr_assert_eq(first->meta.global_count, expected, "step %llu after %llu tokens",
                     (unsigned long long)first->meta.step, (unsigned long long)tokens);
        seen_stages[expected / 2]++;
        tokens += (uint64_t)first->meta.step_token_count;
        i += (size_t)first->meta.global_count;
    }
    for (int s = 1; s <= 4; s++) cr_assert_gt(seen_stages[s], 0, "stage of %d rows never used", 2 * s);
    recs two[2];
    char *cursors[2];
    run_world(&c, config, 2, NULL, 5, two, cursors);
    recs head = {.items = single[0].items, .count = 0};
    for (size_t i = 0; i < single[0].count && single[0].items[i].meta.step < 5; i++) head.count++;
    assert_partition(&head, two, 2, "warmup on 2 ranks");
    recs rest[1];
    run_world(&c, config, 1, cursors[0], 25, rest, NULL);
    recs tail = {.items = single[0].items + head.count, .count = single[0].count - head.count};
    assert_partition(&tail, rest, 1, "warmup resumed on 1 rank");
    /* a unit that the world size does not divide is refused */
    config.world_size = 4;
    mb_doc_source source = mb_doc_source_memory(&c.docs);
    mb_loader *loader;
    mb_error err;
    cr_assert_eq(mb_loader_open(&loader, &config, &source, NULL, &err), -1);
    cr_assert(strstr(err.message, "warmup_unit_rows") != NULL, "%s", err.message);
    for (int r = 0; r < 2; r++) recs_free(&two[r]), free(cursors[r]);
    recs_free(&rest[0]);
    recs_free(&single[0]);
    free_corpus(&c);
}

/* ---- errors ---- */

Test(loader, invalid_configs_are_errors) {
    corpus c;
    make_corpus(&c, 50, 60, 1.0, 14);
    mb_doc_source source = mb_doc_source_memory(&c.docs);
    mb_loader *loader;
    mb_error err;
    const struct { int32_t seq_len; int64_t micro, step; int32_t world, rank; const char *needle; } cases[] = {
        {64, 256, 1024, 3, 0, "not a multiple of world_size = 3"}, /* 4 micro-batches per step on 3 ranks */
        {64, 256, 1024, 8, 0, "not a multiple of world_size = 8"},
        {64, 32, 1024, 1, 0, "micro_tokens"},                     /* a sequence would not fit */
        {64, 256, 1000, 1, 0, "step_tokens"},
        {64, 256, 1024, 2, 2, "rank"},
        {0, 256, 1024, 1, 0, "max_seq_len"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mb_loader_config config = base_config(&c, cases[i].seq_len, cases[i].micro, cases[i].step, cases[i].world,
                                              cases[i].rank, 0);
        cr_assert_eq(mb_loader_open(&loader, &config, &source, NULL, &err), -1, "case %zu", i);
        cr_assert(strstr(err.message, cases[i].needle) != NULL, "case %zu: %s", i, err.message);
    }
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 0);
    config.source_batch = 10;
    config.buffer_size = 10;
    cr_assert_eq(mb_loader_open(&loader, &config, &source, NULL, &err), -1);
    cr_assert(strstr(err.message, "buffer_size") != NULL, "%s", err.message);
    config = base_config(&c, 64, 256, 1024, 1, 0, 0);
    config.masking.vocab_size = 100; /* ids of the corpus exceed it: caught when reading, naming the document */
    config.masking.mask_id = 99;
    config.masking.cls_id = config.masking.sep_id = config.masking.pad_id = -1;
    cr_assert_eq(mb_loader_open(&loader, &config, &source, NULL, &err), 0, "%s", err.message);
    mb_loader_batch b;
    int rc = 0;
    for (int i = 0; i < 10 && rc == 0; i++) rc = mb_loader_next(loader, &b, &err);
    cr_assert_eq(rc, -1);
    cr_assert(strstr(err.message, "outside [0, vocab_size = 100)") != NULL && strstr(err.message, "document ") != NULL,
              "%s", err.message);
    mb_loader_close(loader);
    mb_memory_documents empty = c.docs;
    uint64_t zero_offsets[3] = {0, 0, 0};
    empty.offsets = zero_offsets;
    empty.count = 2;
    source = mb_doc_source_memory(&empty);
    config = base_config(&c, 64, 256, 1024, 1, 0, 0);
    cr_assert_eq(mb_loader_open(&loader, &config, &source, NULL, &err), -1);
    cr_assert(strstr(err.message, "empty") != NULL, "%s", err.message);
    free_corpus(&c);
}

/* A source that fails on one document, to see the thread's error come out of mb_loader_next. */
typedef struct failing_source {
    mb_doc_source inner;
    uint64_t bad;
} failing_source;

static uint64_t failing_count(void *context) {
    failing_source *s = context;
    return s->inner.document_count(s->inner.context);
}
static uint32_t failing_length(void *context, uint64_t index) {
    failing_source *s = context;
    return s->inner.document_length(s->inner.context, index);
}
static int failing_read(void *context, uint64_t index, int32_t *out, mb_error *err) {
    failing_source *s = context;
    if (index == s->bad) return mb_fail(err, "simulated read failure");
    return s->inner.read_document(s->inner.context, index, out, err);
}

static void check_thread_error(int prefetch) {
    corpus c;
    make_corpus(&c, 200, 60, 1.0, 15);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, prefetch);
    /* the document that the uninterrupted stream reads in micro-batch 20 */
    mb_loader *probe = open_loader(&config, &c, NULL);
    recs r = {0};
    run_steps(probe, 6, &r);
    mb_loader_close(probe);
    uint64_t bad = r.items[20].seqs[0].document;
    size_t first_use = 20;
    for (size_t i = 0; i < 20; i++)
        for (int32_t k = 0; k < r.items[i].meta.batch.sequence_count; k++)
            if (r.items[i].seqs[k].document == bad && first_use == 20) first_use = i;
    failing_source failing = {.inner = mb_doc_source_memory(&c.docs), .bad = bad};
    mb_doc_source source = {.context = &failing, .document_count = failing_count, .document_length = failing_length,
                            .read_document = failing_read};
    mb_loader *loader;
    mb_error err;
    cr_assert_eq(mb_loader_open(&loader, &config, &source, NULL, &err), 0, "%s", err.message);
    mb_loader_batch b;
    size_t delivered = 0;
    while (mb_loader_next(loader, &b, &err) == 0) {
        cr_assert_lt(delivered, first_use);
        delivered++;
    }
    cr_assert_eq(delivered, first_use, "the micro-batches before the failure are delivered first");
    char needle[64];
    snprintf(needle, sizeof needle, "document %llu: simulated read failure", (unsigned long long)bad);
    cr_assert(strstr(err.message, needle) != NULL, "%s", err.message);
    cr_assert_eq(mb_loader_next(loader, &b, &err), -1, "the error persists");
    mb_loader_close(loader);
    recs_free(&r);
    free_corpus(&c);
}

Test(loader, thread_errors_surface_in_order) { check_thread_error(3); }
Test(loader, errors_surface_without_thread) { check_thread_error(0); }

Test(loader, close_while_the_thread_is_blocked) {
    corpus c;
    make_corpus(&c, 100, 60, 1.0, 16);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 1, 0, 2);
    for (int i = 0; i < 20; i++) {
        mb_loader *loader = open_loader(&config, &c, NULL);
        mb_loader_batch b;
        mb_error err;
        for (int k = 0; k < i % 3; k++) cr_assert_eq(mb_loader_next(loader, &b, &err), 0);
        mb_loader_close(loader);
    }
    free_corpus(&c);
}

/* ---- shard sets ---- */

Test(loader, shard_source_matches_the_memory_source) {
    corpus c;
    make_corpus(&c, 240, 60, 1.0, 17);
    char dir[] = "/tmp/mb_test_loader_XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    const uint64_t per_shard = 80;
    for (int s = 0; s < 3; s++) {
        char path[256];
        snprintf(path, sizeof path, "%s/shard-%03d.mbs", dir, s);
        mb_shard_writer_options options = {.tokenizer_fingerprint = 7, .vocab_size = (uint32_t)c.total + 4,
                                           .block_tokens = 300};
        mb_shard_writer *writer;
        mb_error err;
        cr_assert_eq(mb_shard_writer_open(&writer, path, &options, &err), 0, "%s", err.message);
        for (uint64_t d = s * per_shard; d < (s + 1) * per_shard; d++)
            cr_assert_eq(mb_shard_writer_add_document(writer, c.tokens + c.offsets[d], c.offsets[d + 1] - c.offsets[d],
                                                      &err), 0, "%s", err.message);
        cr_assert_eq(mb_shard_writer_finish(writer, NULL, &err), 0, "%s", err.message);
    }
    char pattern[256];
    snprintf(pattern, sizeof pattern, "%s/shard-*.mbs", dir);
    const char *patterns[1] = {pattern};
    mb_shard_set *set;
    mb_error err;
    cr_assert_eq(mb_shard_set_open(&set, patterns, 1, 0, &err), 0, "%s", err.message);
    cr_assert_eq(mb_shard_set_document_count(set), c.count);
    mb_loader_config config = base_config(&c, 64, 256, 1024, 2, 1, 2);
    mb_doc_source source;
    cr_assert_eq(mb_doc_source_shards(&source, set, 1, &err), 0, "%s", err.message);
    mb_loader *from_shards;
    cr_assert_eq(mb_loader_open(&from_shards, &config, &source, NULL, &err), 0, "%s", err.message);
    mb_loader *from_memory = open_loader(&config, &c, NULL);
    recs a = {0}, b = {0};
    run_steps(from_shards, 30, &a);
    run_steps(from_memory, 30, &b);
    cr_assert_eq(a.count, b.count);
    for (size_t i = 0; i < a.count; i++) assert_same(&a.items[i], &b.items[i], "shards vs memory");
    mb_loader_close(from_shards); /* also closes the set (take_set = 1) */
    mb_loader_close(from_memory);
    recs_free(&a);
    recs_free(&b);
    for (int s = 0; s < 3; s++) {
        char path[256];
        snprintf(path, sizeof path, "%s/shard-%03d.mbs", dir, s);
        unlink(path);
    }
    rmdir(dir);
    free_corpus(&c);
}

Test(loader, source_without_span_reads_matches) {
    /* long documents (many chunks each) read whole through the loader's document cache */
    corpus c;
    make_corpus(&c, 150, 300, 1.0, 18);
    mb_loader_config config = base_config(&c, 64, 512, 2048, 1, 0, 0);
    mb_doc_source whole_only = mb_doc_source_memory(&c.docs);
    whole_only.read_span = NULL;
    mb_loader *a;
    mb_error err;
    cr_assert_eq(mb_loader_open(&a, &config, &whole_only, NULL, &err), 0, "%s", err.message);
    mb_loader *b = open_loader(&config, &c, NULL);
    recs ra = {0}, rb = {0};
    run_steps(a, 40, &ra);
    run_steps(b, 40, &rb);
    for (size_t i = 0; i < ra.count; i++) {
        check_batch(&ra.items[i], &c, &config);
        assert_same(&ra.items[i], &rb.items[i], "whole-document reads vs span reads");
    }
    mb_loader_close(a);
    mb_loader_close(b);
    recs_free(&ra);
    recs_free(&rb);
    free_corpus(&c);
}
