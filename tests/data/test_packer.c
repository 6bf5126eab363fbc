/* Greedy best-fit packer: the best-fit rule against brute force, the whole algorithm against a literal
 * re-implementation of ModernBERT's deque-based packer (§5.7), conservation and capacity invariants, packing
 * efficiency on a prose-like length distribution, and config errors. */
#include <criterion/criterion.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "data/packer.h"

/* ---- a finite or endless source of sequences: sequence i has length lengths[i] and document = i ---- */

typedef struct list_source {
    const uint32_t *lengths;
    int64_t count;      /* -1: endless, lengths drawn from rng */
    int64_t next;
    mb_rng rng;
    uint32_t max_length;
} list_source;

static int list_next(void *context, mb_seq_ref *out, mb_error *err) {
    list_source *s = context;
    if (s->count >= 0 && s->next >= s->count) return 1;
    uint32_t length = s->count >= 0 ? s->lengths[s->next] : 1 + (uint32_t)mb_rng_below(&s->rng, s->max_length);
    *out = (mb_seq_ref){.document = (uint64_t)s->next, .epoch = 0, .chunk = 0, .length = length};
    s->next++;
    return 0;
}

/* ---- reference: a literal transcription of GreedyBestFitSequencePacker._create_batch / _fill_buffer ---- */

typedef struct ref_item {
    int64_t id;
    int64_t length;
} ref_item;

typedef struct ref_packer {
    ref_item deque[4096];
    int deque_count;
    int64_t buffer_size, source_batch, capacity;
    const uint32_t *lengths;
    int64_t count, next;
} ref_packer;

static void deque_append(ref_packer *p, ref_item x) { p->deque[p->deque_count++] = x; }
static void deque_appendleft(ref_packer *p, ref_item x) {
    memmove(p->deque + 1, p->deque, (size_t)p->deque_count * sizeof *p->deque);
    p->deque[0] = x;
    p->deque_count++;
}
static ref_item deque_popleft(ref_packer *p) {
    ref_item x = p->deque[0];
    memmove(p->deque, p->deque + 1, (size_t)(p->deque_count - 1) * sizeof *p->deque);
    p->deque_count--;
    return x;
}

static int64_t ref_fill(ref_packer *p, int64_t max_items) {
    int64_t added = 0;
    while (p->buffer_size - p->deque_count > p->source_batch) {
        if (added + p->source_batch > max_items) break;
        if (p->next >= p->count) break; /* StopIteration */
        for (int64_t k = 0; k < p->source_batch && p->next < p->count; k++, p->next++) {
            deque_append(p, (ref_item){p->next, p->lengths[p->next]});
            added++;
        }
    }
    return added;
}

/* Fills rows_of[id] with the row of each sequence placed in this call (others untouched); returns 1 if emitted. */
static int ref_create_batch(ref_packer *p, int rows, int *rows_of, int64_t *order, int64_t *order_count) {
    int64_t remaining[64];
    int counts[64] = {0};
    ref_item temp[4096];
    int temp_count = 0;
    for (int i = 0; i < rows; i++) remaining[i] = p->capacity;
    *order_count = 0;
    for (;;) {
        if (p->deque_count == 0) {
            if (ref_fill(p, p->buffer_size - temp_count) == 0) break;
        }
        ref_item seq = deque_popleft(p);
        int best = -1; /* np.argmin over the valid rows: first minimum */
        for (int i = 0; i < rows; i++)
            if (remaining[i] >= seq.length && (best < 0 || remaining[i] < remaining[best])) best = i;
        if (best >= 0) {
            remaining[best] -= seq.length;
            counts[best]++;
            rows_of[seq.id] = best;
            order[(*order_count)++] = seq.id;
        } else {
            temp[temp_count++] = seq;
        }
    }
    for (int k = 0; k < temp_count; k++) deque_appendleft(p, temp[k]); /* deque.extendleft */
    for (int i = 0; i < rows; i++)
        if (counts[i] == 0) return 0;
    return 1;
}

/* ---- tests ---- */

Test(packer, best_row_matches_brute_force) {
    mb_rng rng;
    mb_rng_seed(&rng, 1);
    int64_t remaining[40];
    for (int trial = 0; trial < 20000; trial++) {
        int32_t rows = 1 + (int32_t)mb_rng_below(&rng, 40);
        for (int i = 0; i < rows; i++) remaining[i] = (int64_t)mb_rng_below(&rng, 12); /* many ties */
        int64_t length = 1 + (int64_t)mb_rng_below(&rng, 12);
        int32_t expected = -1;
        for (int i = 0; i < rows; i++) { /* smallest (space, index) among fitting rows */
            if (remaining[i] < length) continue;
            if (expected < 0 || remaining[i] < remaining[expected]) expected = i;
        }
        cr_assert_eq(mb_packer_best_row(remaining, rows, length), expected, "trial %d", trial);
    }
}

static void compare_with_reference(uint64_t seed, int rows, int64_t capacity, int32_t buffer_size,
                                   int32_t source_batch, int64_t count, uint32_t max_length) {
    uint32_t *lengths = malloc((size_t)count * sizeof *lengths);
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    for (int64_t i = 0; i < count; i++) lengths[i] = 1 + (uint32_t)mb_rng_below(&rng, max_length);
    ref_packer *ref = calloc(1, sizeof *ref);
    *ref = (ref_packer){.buffer_size = buffer_size, .source_batch = source_batch, .capacity = capacity,
                        .lengths = lengths, .count = count};
    list_source source = {.lengths = lengths, .count = count};
    mb_packer packer;
    mb_error err;
    mb_packer_config config = {.row_capacity = capacity, .buffer_size = buffer_size, .source_batch = source_batch};
    cr_assert_eq(mb_packer_init(&packer, &config, &err), 0, "%s", err.message);
    int *rows_of = malloc((size_t)count * sizeof *rows_of);
    int64_t *order = malloc((size_t)count * sizeof *order), order_count;
    int emitted_steps = 0;
    for (int step = 0; step < 1000; step++) {
        int ref_emitted = ref_create_batch(ref, rows, rows_of, order, &order_count);
        mb_packed_rows out;
        int emitted = mb_packer_pack(&packer, rows, list_next, &source, &out, &err);
        cr_assert_geq(emitted, 0, "%s", err.message);
        cr_assert_eq(emitted, ref_emitted, "step %d: emitted %d, reference %d", step, emitted, ref_emitted);
        /* the buffer after the call, in pop order */
        cr_assert_eq((int)mb_packer_pool_count(&packer), ref->deque_count, "step %d", step);
        for (int k = 0; k < ref->deque_count; k++)
            cr_assert_eq((int64_t)mb_packer_pool(&packer)[k].document, ref->deque[k].id, "step %d pool[%d]", step, k);
        if (!emitted) break;
        emitted_steps++;
        cr_assert_eq(out.sequence_count, order_count);
        /* same row per sequence, and within a row the same placement order */
        int64_t seen = 0;
        for (int r = 0; r < rows; r++) {
            int64_t previous = -1;
            for (int64_t k = out.row_start[r]; k < out.row_start[r + 1]; k++, seen++) {
                int64_t id = (int64_t)out.seqs[k].document;
                cr_assert_eq(rows_of[id], r, "step %d: sequence %lld in row %d, reference row %d", step,
                             (long long)id, r, rows_of[id]);
                int64_t position = -1; /* placement order in the reference */
                for (int64_t q = 0; q < order_count; q++)
                    if (order[q] == id) position = q;
                cr_assert_gt(position, previous);
                previous = position;
            }
        }
        cr_assert_eq(seen, order_count);
    }
    cr_assert_gt(emitted_steps, 2, "the case must exercise several calls");
    mb_packer_free(&packer);
    free(lengths), free(ref), free(rows_of), free(order);
}

Test(packer, matches_the_reference_algorithm) {
    /* seed, rows, capacity, buffer, source batch, sequences, longest */
    compare_with_reference(1, 3, 20, 12, 4, 400, 10);
    compare_with_reference(2, 4, 16, 9, 2, 500, 16);     /* sequences as long as a row */
    compare_with_reference(3, 1, 30, 6, 5, 200, 7);      /* buffer_size - source_batch = 1 */
    compare_with_reference(4, 8, 64, 40, 8, 3000, 40);
    compare_with_reference(5, 5, 12, 25, 3, 700, 3);     /* many tiny sequences */
    compare_with_reference(6, 2, 100, 50, 7, 1000, 100);
}

Test(packer, conservation_and_capacity_over_many_calls) {
    mb_packer packer;
    mb_error err;
    mb_packer_config config = {.row_capacity = 256, .buffer_size = 300, .source_batch = 60};
    cr_assert_eq(mb_packer_init(&packer, &config, &err), 0);
    list_source source = {.count = -1, .max_length = 256};
    mb_rng_seed(&source.rng, 3);
    int64_t limit = 200000;
    unsigned char *placed = calloc((size_t)limit, 1);
    int64_t total_placed = 0;
    for (int step = 0; step < 200; step++) {
        int32_t rows = 1 + step % 12;
        mb_packed_rows out;
        cr_assert_eq(mb_packer_pack(&packer, rows, list_next, &source, &out, &err), 1, "%s", err.message);
        cr_assert_eq(out.rows, rows);
        cr_assert_eq(out.row_start[0], 0);
        cr_assert_eq(out.row_start[rows], out.sequence_count);
        int64_t tokens = 0;
        for (int r = 0; r < rows; r++) {
            cr_assert_gt(out.row_start[r + 1], out.row_start[r], "every row gets a sequence");
            int64_t row_tokens = 0;
            for (int64_t k = out.row_start[r]; k < out.row_start[r + 1]; k++) row_tokens += out.seqs[k].length;
            cr_assert_eq(row_tokens, out.row_tokens[r]);
            cr_assert_leq(row_tokens, 256, "row %d over capacity", r);
            tokens += row_tokens;
        }
        cr_assert_eq(tokens, out.token_count);
        for (int64_t k = 0; k < out.sequence_count; k++) {
            uint64_t id = out.seqs[k].document;
            cr_assert_lt(id, (uint64_t)limit);
            cr_assert_eq(placed[id], 0, "sequence %llu placed twice", (unsigned long long)id);
            placed[id] = 1;
            total_placed++;
        }
    }
    /* every sequence drawn is either placed once or still in the buffer */
    for (size_t k = 0; k < mb_packer_pool_count(&packer); k++) {
        uint64_t id = mb_packer_pool(&packer)[k].document;
        cr_assert_eq(placed[id], 0, "sequence %llu both placed and buffered", (unsigned long long)id);
        placed[id] = 2;
    }
    for (int64_t id = 0; id < source.next; id++) cr_assert_neq(placed[id], 0, "sequence %lld lost", (long long)id);
    cr_assert_eq(total_placed + (int64_t)mb_packer_pool_count(&packer), source.next);
    free(placed);
    mb_packer_free(&packer);
}

/* Prose-like documents: lognormal lengths (median 400 tokens, sigma 1.2: ~23% longer than 1024), split into chunks of
 * at most 1024 tokens as the loader does. */
typedef struct prose_source {
    mb_rng rng;
    uint32_t left;  /* tokens of the current document not yet emitted */
    uint64_t next;
} prose_source;

static int prose_next(void *context, mb_seq_ref *out, mb_error *err) {
    prose_source *s = context;
    while (s->left == 0) {
        double length = exp(log(400.0) + 1.2 * mb_rng_normal(&s->rng));
        s->left = length > 200000 ? 200000 : (uint32_t)length;
    }
    uint32_t n = s->left < 1024 ? s->left : 1024;
    s->left -= n;
    *out = (mb_seq_ref){.document = s->next++, .length = n};
    return 0;
}

static double prose_efficiency(int32_t rows, int64_t capacity) {
    mb_packer packer;
    mb_error err;
    int32_t batch = (int32_t)(rows * capacity / 1024);
    mb_packer_config config = {.row_capacity = capacity, .buffer_size = 5 * batch, .source_batch = batch};
    cr_assert_eq(mb_packer_init(&packer, &config, &err), 0);
    prose_source source = {.left = 0};
    mb_rng_seed(&source.rng, 17);
    int64_t tokens = 0, slots = 0;
    for (int step = 0; step < 40; step++) {
        mb_packed_rows out;
        cr_assert_eq(mb_packer_pack(&packer, rows, prose_next, &source, &out, &err), 1);
        tokens += out.token_count;
        slots += (int64_t)rows * capacity;
    }
    mb_packer_free(&packer);
    return (double)tokens / (double)slots;
}

Test(packer, prose_efficiency_at_1024_is_at_least_99_percent) {
    const struct { int32_t rows; int64_t capacity; } cases[] = {{16, 8192}, {8, 32768}, {4, 98304}, {48, 16384}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double efficiency = prose_efficiency(cases[i].rows, cases[i].capacity);
        cr_log_info("rows %d x %lld tokens: packing efficiency %.4f%%", cases[i].rows,
                    (long long)cases[i].capacity, 100 * efficiency);
        cr_assert_geq(efficiency, 0.99, "rows %d x %lld: efficiency %f", cases[i].rows,
                      (long long)cases[i].capacity, efficiency);
    }
}

Test(packer, errors) {
    mb_packer packer;
    mb_error err;
    mb_packer_config config = {.row_capacity = 64, .buffer_size = 10, .source_batch = 10};
    cr_assert_eq(mb_packer_init(&packer, &config, &err), -1);
    cr_assert(strstr(err.message, "buffer_size") != NULL, "%s", err.message);
    config = (mb_packer_config){.row_capacity = 0, .buffer_size = 10, .source_batch = 2};
    cr_assert_eq(mb_packer_init(&packer, &config, &err), -1);
    config = (mb_packer_config){.row_capacity = 8, .buffer_size = 10, .source_batch = 2};
    cr_assert_eq(mb_packer_init(&packer, &config, &err), 0);
    uint32_t too_long[] = {3, 9};
    list_source source = {.lengths = too_long, .count = 2};
    mb_packed_rows out;
    cr_assert_eq(mb_packer_pack(&packer, 2, list_next, &source, &out, &err), -1);
    cr_assert(strstr(err.message, "length 9") != NULL, "%s", err.message);
    cr_assert_eq(mb_packer_pack(&packer, 0, list_next, &source, &out, &err), -1);
    mb_seq_ref pool[11] = {{0}};
    cr_assert_eq(mb_packer_set_pool(&packer, pool, 11, &err), -1);
    mb_packer_free(&packer);
}

Test(packer, end_of_data_with_an_empty_row_emits_nothing) {
    mb_packer packer;
    mb_error err;
    mb_packer_config config = {.row_capacity = 10, .buffer_size = 8, .source_batch = 2};
    cr_assert_eq(mb_packer_init(&packer, &config, &err), 0);
    uint32_t lengths[] = {6, 6, 6};
    list_source source = {.lengths = lengths, .count = 3};
    mb_packed_rows out;
    cr_assert_eq(mb_packer_pack(&packer, 3, list_next, &source, &out, &err), 1);
    cr_assert_eq(out.sequence_count, 3);
    cr_assert_eq(mb_packer_pack(&packer, 3, list_next, &source, &out, &err), 0);
    mb_packer_free(&packer);
}
