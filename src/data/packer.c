/* Greedy best-fit online packing of sequence references into rows of fixed token capacity (rules in packer.h). */
#include "data/packer.h"

#include <stdlib.h>
#include <string.h>

int mb_packer_init(mb_packer *packer, const mb_packer_config *config, mb_error *err) {
    memset(packer, 0, sizeof *packer);
    if (config->row_capacity <= 0 || config->row_capacity > INT32_MAX)
        return mb_fail(err, "packer config: row_capacity = %lld must lie in [1, 2^31)", (long long)config->row_capacity);
    if (config->source_batch <= 0)
        return mb_fail(err, "packer config: source_batch = %d must be positive", config->source_batch);
    if (config->buffer_size <= config->source_batch)
        return mb_fail(err, "packer config: buffer_size = %d must exceed source_batch = %d (a refill needs room for "
                       "more than one source batch)", config->buffer_size, config->source_batch);
    packer->config = *config;
    packer->buffer = malloc((size_t)config->buffer_size * sizeof *packer->buffer);
    packer->deferred = malloc((size_t)config->buffer_size * sizeof *packer->deferred);
    if (!packer->buffer || !packer->deferred) {
        mb_packer_free(packer);
        return mb_fail(err, "packer: out of memory for a buffer of %d sequences", config->buffer_size);
    }
    return 0;
}

void mb_packer_free(mb_packer *packer) {
    free(packer->buffer);
    free(packer->deferred);
    free(packer->remaining);
    free(packer->row_start);
    free(packer->row_tokens);
    free(packer->placed);
    free(packer->placed_row);
    free(packer->grouped);
    memset(packer, 0, sizeof *packer);
}

int mb_packer_set_pool(mb_packer *packer, const mb_seq_ref *items, size_t count, mb_error *err) {
    if (count > (size_t)packer->config.buffer_size)
        return mb_fail(err, "packer: pool of %zu sequences exceeds buffer_size = %d", count, packer->config.buffer_size);
    if (count) memcpy(packer->buffer, items, count * sizeof *items);
    packer->head = 0;
    packer->count = (int64_t)count;
    return 0;
}

size_t mb_packer_pool_count(const mb_packer *packer) { return (size_t)packer->count; }
const mb_seq_ref *mb_packer_pool(const mb_packer *packer) { return packer->buffer + packer->head; }

int32_t mb_packer_best_row(const int64_t *remaining, int32_t rows, int64_t length) {
    int32_t best = -1;
    int64_t best_space = INT64_MAX;
    for (int32_t i = 0; i < rows; i++) {
        int64_t space = remaining[i];
        if (space >= length && space < best_space) {
            best = i;
            best_space = space;
            if (space == length) break;  /* an exact fit cannot be beaten, and earlier rows did not fit exactly */
        }
    }
    return best;
}

static int ensure_rows(mb_packer *packer, int32_t rows, mb_error *err) {
    if (rows <= packer->row_alloc) return 0;
    int64_t *remaining = realloc(packer->remaining, (size_t)rows * sizeof *remaining);
    if (remaining) packer->remaining = remaining;
    int64_t *row_start = realloc(packer->row_start, ((size_t)rows + 1) * sizeof *row_start);
    if (row_start) packer->row_start = row_start;
    int64_t *row_tokens = realloc(packer->row_tokens, (size_t)rows * sizeof *row_tokens);
    if (row_tokens) packer->row_tokens = row_tokens;
    if (!remaining || !row_start || !row_tokens) return mb_fail(err, "packer: out of memory for %d rows", rows);
    packer->row_alloc = rows;
    return 0;
}

static int ensure_placed(mb_packer *packer, int64_t needed, mb_error *err) {
    if (needed <= packer->placed_alloc) return 0;
    int64_t alloc = packer->placed_alloc ? packer->placed_alloc * 2 : 4096;
    while (alloc < needed) alloc *= 2;
    mb_seq_ref *placed = realloc(packer->placed, (size_t)alloc * sizeof *placed);
    if (placed) packer->placed = placed;
    int32_t *placed_row = realloc(packer->placed_row, (size_t)alloc * sizeof *placed_row);
    if (placed_row) packer->placed_row = placed_row;
    mb_seq_ref *grouped = realloc(packer->grouped, (size_t)alloc * sizeof *grouped);
    if (grouped) packer->grouped = grouped;
    if (!placed || !placed_row || !grouped)
        return mb_fail(err, "packer: out of memory for %lld placed sequences", (long long)alloc);
    packer->placed_alloc = alloc;
    return 0;
}

/* Refills the (empty) buffer in whole source batches, with the reference's two stopping conditions. */
static int refill(mb_packer *packer, mb_seq_source_fn next, void *context, int64_t *added_out, mb_error *err) {
    const int64_t buffer_size = packer->config.buffer_size, batch = packer->config.source_batch;
    int64_t added = 0;
    packer->head = 0;
    while (buffer_size - packer->count > batch) {
        if (added + batch > buffer_size - packer->deferred_count) break;
        int64_t got = 0;
        for (int64_t k = 0; k < batch; k++) {
            int rc = next(context, &packer->buffer[packer->count], err);
            if (rc < 0) return -1;
            if (rc > 0) break;
            packer->count++;
            got++;
        }
        if (got == 0) break;  /* the source is exhausted */
        added += got;
    }
    *added_out = added;
    return 0;
}

/* Groups the placements by row (stable, so each row keeps placement order). */
static void group_by_row(mb_packer *packer, int32_t rows, int64_t placed_count) {
    int64_t *start = packer->row_start;
    memset(start, 0, ((size_t)rows + 1) * sizeof *start);
    for (int64_t k = 0; k < placed_count; k++) start[packer->placed_row[k] + 1]++;
    for (int32_t i = 0; i < rows; i++) start[i + 1] += start[i];
    int64_t *cursor = packer->remaining;  /* free by now: reuse as per-row write positions */
    for (int32_t i = 0; i < rows; i++) cursor[i] = start[i];
    for (int64_t k = 0; k < placed_count; k++) packer->grouped[cursor[packer->placed_row[k]]++] = packer->placed[k];
}

int mb_packer_pack(mb_packer *packer, int32_t rows, mb_seq_source_fn next, void *context, mb_packed_rows *out,
                   mb_error *err) {
    const int64_t capacity = packer->config.row_capacity;
    if (rows <= 0) return mb_fail(err, "packer: rows = %d must be positive", rows);
    if (ensure_rows(packer, rows, err)) return -1;
    for (int32_t i = 0; i < rows; i++) {
        packer->remaining[i] = capacity;
        packer->row_tokens[i] = 0;
    }
    int64_t placed_count = 0;
    packer->deferred_count = 0;
    for (;;) {
        if (packer->count == 0) {
            int64_t added;
            if (refill(packer, next, context, &added, err)) return -1;
            if (added == 0) break;
        }
        mb_seq_ref seq = packer->buffer[packer->head++];
        packer->count--;
        if (seq.length == 0 || seq.length > capacity)
            return mb_fail(err, "packer: document %llu chunk %u has length %u outside [1, row_capacity = %lld]",
                           (unsigned long long)seq.document, seq.chunk, seq.length, (long long)capacity);
        int32_t row = mb_packer_best_row(packer->remaining, rows, seq.length);
        if (row < 0) {
            packer->deferred[packer->deferred_count++] = seq;
            continue;
        }
        if (ensure_placed(packer, placed_count + 1, err)) return -1;
        packer->placed[placed_count] = seq;
        packer->placed_row[placed_count++] = row;
        packer->remaining[row] -= seq.length;
        packer->row_tokens[row] += seq.length;
    }
    /* deque.extendleft(deferred) on the now empty buffer: the buffer becomes the deferred list reversed. */
    for (int64_t k = 0; k < packer->deferred_count; k++)
        packer->buffer[k] = packer->deferred[packer->deferred_count - 1 - k];
    packer->head = 0;
    packer->count = packer->deferred_count;
    packer->deferred_count = 0;

    for (int32_t i = 0; i < rows; i++)
        if (packer->row_tokens[i] == 0) return 0;
    group_by_row(packer, rows, placed_count);
    int64_t tokens = 0;
    for (int32_t i = 0; i < rows; i++) tokens += packer->row_tokens[i];
    *out = (mb_packed_rows){.rows = rows, .row_capacity = capacity, .row_start = packer->row_start,
                            .row_tokens = packer->row_tokens, .seqs = packer->grouped,
                            .sequence_count = placed_count, .token_count = tokens};
    return 1;
}
