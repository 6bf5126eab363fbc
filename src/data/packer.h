/* Greedy best-fit online sequence packer (modernbert-spec.md §5.7, ModernBERT's GreedyBestFitSequencePacker).
 *
 * The packer works on sequence references (document, chunk, length), never on tokens: packing decisions depend only
 * on lengths, so a rank can pack the whole global step and read just the sequences of its own rows.
 *
 * One call packs `rows` rows of `row_capacity` token slots each:
 *   loop: if the buffer is empty, refill it — whole source batches of `source_batch` sequences while
 *         (buffer_size − len(buffer)) > source_batch and added + source_batch <= buffer_size − len(deferred)
 *         (the reference's conditions, its strict '>' included); stop the loop when a refill adds nothing.
 *         Pop the oldest sequence; among rows with remaining space >= its length take the one with the smallest
 *         remaining space (ties → lowest row index) and append it there; if no row fits, defer it.
 *   end:  the deferred sequences go back to the front of the buffer with deque.extendleft, i.e. in reverse order.
 *         (The loop only ends on an empty buffer, so the buffer afterwards is exactly the reversed deferred list.)
 *   The rows are emitted only if every row got at least one sequence.
 * Sequences must be non-empty and no longer than row_capacity. */
#ifndef MB_PACKER_H
#define MB_PACKER_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

/* Where a sequence comes from: tokens [chunk·max_seq_len, chunk·max_seq_len + length) of document `document`, drawn
 * during epoch `epoch` of the document order. */
typedef struct mb_seq_ref {
    uint64_t document;
    uint32_t epoch;
    uint32_t chunk;
    uint32_t length;
} mb_seq_ref;

/* Yields the next sequence: returns 0 with *out filled, 1 at the end of the data, -1 on error. */
typedef int (*mb_seq_source_fn)(void *context, mb_seq_ref *out, mb_error *err);

typedef struct mb_packer_config {
    int64_t row_capacity;  /* token slots per row (one micro-batch) */
    int32_t buffer_size;   /* most sequences held (buffer + deferred); must exceed source_batch */
    int32_t source_batch;  /* sequences per refill unit */
} mb_packer_config;

/* The result of one pack call; owned by the packer, valid until the next call. */
typedef struct mb_packed_rows {
    int32_t rows;
    int64_t row_capacity;
    const int64_t *row_start;   /* [rows + 1]: row i holds seqs[row_start[i] .. row_start[i + 1]) in placement order */
    const int64_t *row_tokens;  /* [rows] */
    const mb_seq_ref *seqs;
    int64_t sequence_count;
    int64_t token_count;
} mb_packed_rows;

typedef struct mb_packer {
    mb_packer_config config;
    mb_seq_ref *buffer;         /* [buffer_size]; live items buffer[head .. head + count) */
    int64_t head, count;
    mb_seq_ref *deferred;       /* [buffer_size] */
    int64_t deferred_count;
    /* working storage of one call, grown as needed */
    int64_t *remaining;
    int64_t *row_start, *row_tokens;
    int32_t row_alloc;
    mb_seq_ref *placed;
    int32_t *placed_row;
    mb_seq_ref *grouped;
    int64_t placed_alloc;
} mb_packer;

int mb_packer_init(mb_packer *packer, const mb_packer_config *config, mb_error *err);
void mb_packer_free(mb_packer *packer);

/* Replaces the buffer contents (e.g. from a cursor), items in pop order. */
int mb_packer_set_pool(mb_packer *packer, const mb_seq_ref *items, size_t count, mb_error *err);
/* The buffer between calls, in pop order. */
size_t mb_packer_pool_count(const mb_packer *packer);
const mb_seq_ref *mb_packer_pool(const mb_packer *packer);

/* Packs one set of rows. Returns 1 when emitted (*out filled), 0 when the source ended before every row got a
 * sequence (nothing emitted; sequences placed in this call are dropped, as the reference does), -1 on error. */
int mb_packer_pack(mb_packer *packer, int32_t rows, mb_seq_source_fn next, void *context, mb_packed_rows *out,
                   mb_error *err);

/* The best-fit rule alone: index of the row with the smallest remaining[i] >= length, lowest index on ties; -1 if
 * none fits. */
int32_t mb_packer_best_row(const int64_t *remaining, int32_t rows, int64_t length);

#endif
