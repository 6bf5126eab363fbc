/* The pretraining data loader: documents → seeded shuffle → chunks → best-fit packing → MLM masking → micro-batches.
 *
 * The sequence stream. Epoch e orders all documents by a Fisher–Yates permutation drawn from
 * mb_rng_seed_stream(seed ^ PERMUTATION_DOMAIN, e). Each document becomes sequences of at most max_seq_len tokens:
 * consecutive chunks [k·S, min((k+1)·S, L)) (default) or only its first S tokens (truncate, as ModernBERT did);
 * empty documents yield nothing. Epochs follow each other without a seam: the packer's buffer carries across.
 *
 * The global stream of micro-batches. Step s packs rows(s) rows of micro_tokens slots with the greedy best-fit packer
 * (packer.h; source_batch and buffer_size as there); each row is one micro-batch: its sequences concatenated without
 * padding (input_ids [N], cu_seqlens [B + 1], N <= micro_tokens). rows(s) = step_tokens / micro_tokens, or the
 * batch-size warmup schedule of modernbert-spec.md §5.5 when warmup_tokens > 0. Global micro-batch number g (counted
 * from the start of training) is masked with an mb_rng from mb_rng_seed_stream(seed ^ MASKING_DOMAIN, g), so the
 * stream does not depend on who computes it. Rank r of world W returns micro-batches r, r + W, r + 2W, ... of every
 * step: packing is computed from document lengths alone on every rank, and a rank reads only its own sequences.
 *
 * The cursor. Every random draw derives from (seed, epoch) or (seed, g), so the loader's whole state at a step
 * boundary is a few counters, the stream position and the packer buffer as sequence references: that is
 * mb_loader_cursor. A loader opened from it yields exactly what the uninterrupted loader would have yielded next,
 * with any world size that divides the rows per step.
 *
 * Prefetch. With prefetch > 0 a thread runs ahead, reading, packing and masking up to `prefetch` micro-batches into a
 * bounded queue; mb_loader_next hands them out in order. An error on the thread is returned by the mb_loader_next call
 * that would have returned the failed micro-batch (the ones before it are delivered first). prefetch = 0 produces on
 * the caller's thread (same results). */
#ifndef MB_LOADER_H
#define MB_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "data/masking.h"
#include "data/packer.h"
#include "model/batch.h"

/* ---- Document sources ---------------------------------------------------------------------------------------- */

/* Where documents come from. Only the loader's producer thread calls it after mb_loader_open returns. */
typedef struct mb_doc_source {
    void *context;
    uint64_t (*document_count)(void *context);
    uint32_t (*document_length)(void *context, uint64_t index);
    /* Copies all of document `index` into out (capacity >= its length). */
    int (*read_document)(void *context, uint64_t index, int32_t *out, mb_error *err);
    /* Optional (may be NULL): copies tokens [offset, offset + count) of document `index`. */
    int (*read_span)(void *context, uint64_t index, uint32_t offset, uint32_t count, int32_t *out, mb_error *err);
    /* Optional (may be NULL): called by mb_loader_close, for sources the loader owns. */
    void (*release)(void *context);
} mb_doc_source;

/* Documents held in memory: document i is tokens[offsets[i] .. offsets[i + 1]). The arrays are borrowed. */
typedef struct mb_memory_documents {
    const int32_t *tokens;
    const uint64_t *offsets;  /* [count + 1] */
    uint64_t count;
} mb_memory_documents;

mb_doc_source mb_doc_source_memory(const mb_memory_documents *documents);

/* A shard set (shards.h) as a source. The source reads through its own mb_shard_reader, so the set stays usable by
 * its owner's thread; with take_set = 1 the source also closes the set. The source must be released: mb_loader_close
 * does it, or call source->release(source->context) yourself when it never reached a loader (or open failed). */
typedef struct mb_shard_set mb_shard_set;
int mb_doc_source_shards(mb_doc_source *source, mb_shard_set *set, int take_set, mb_error *err);

/* ---- Configuration ------------------------------------------------------------------------------------------- */

typedef struct mb_loader_config {
    uint64_t seed;
    int32_t max_seq_len;        /* S: longest sequence; 1024 */
    int32_t truncate;           /* 0: split long documents into chunks of S; 1: keep only their first S tokens */
    int64_t micro_tokens;       /* token budget of one micro-batch (row capacity); must be >= S (required) */
    int64_t step_tokens;        /* token slots of a global step = rows × micro_tokens (required) */
    int32_t source_batch;       /* packer refill unit in sequences; 0 = step_tokens / S */
    int32_t buffer_size;        /* packer buffer in sequences; 0 = 5 × source_batch */
    /* batch-size warmup (§5.5), off when warmup_tokens = 0: rows grow from warmup_min_rows to the full count in
     * units of warmup_unit_rows, over warmup_tokens real tokens (global count). */
    int64_t warmup_tokens;
    int32_t warmup_min_rows;
    int32_t warmup_unit_rows;
    int32_t rank, world_size;   /* 0, 1 */
    int32_t prefetch;           /* micro-batches buffered by the thread; 0 = no thread. 4 */
    mb_masking_config masking;  /* masking.rate = 0 turns masking off (labels all -100) */
} mb_loader_config;

/* max_seq_len 1024, prefetch 4, world 1, masking = mb_masking_config_default(); micro_tokens and step_tokens 0. */
void mb_loader_config_default(mb_loader_config *config);

/* ---- Cursor -------------------------------------------------------------------------------------------------- */

/* The loader's state at a step boundary. The first block names the stream (a cursor only resumes a loader whose
 * config and source give the same values); the second is the position. No RNG state is needed: every generator is
 * re-derived from (seed, epoch) and (seed, microbatch). */
typedef struct mb_loader_cursor {
    uint64_t seed, document_count, token_count;
    int32_t max_seq_len, truncate;
    int64_t micro_tokens, step_tokens;
    int32_t source_batch, buffer_size;
    int64_t warmup_tokens;
    int32_t warmup_min_rows, warmup_unit_rows;

    uint64_t step;              /* the next step to deliver */
    uint64_t microbatch;        /* global micro-batches delivered before it */
    uint64_t tokens;            /* real tokens of those micro-batches (drives the warmup schedule) */
    uint64_t epoch;             /* stream position: next sequence is chunk `chunk` of document permutation_e[index] */
    uint64_t permutation_index;
    uint32_t chunk;
    uint64_t pool_count;        /* the packer buffer, in pop order */
    mb_seq_ref *pool;
} mb_loader_cursor;

void mb_loader_cursor_free(mb_loader_cursor *cursor);
/* Deep copy (dst is overwritten, not freed). */
int mb_loader_cursor_copy(mb_loader_cursor *dst, const mb_loader_cursor *src, mb_error *err);
/* JSON text (malloc'ed; see docs): {"format": "modernbert.c loader cursor", "version": 1, "seed": "0x…", …,
 * "pool": [document, epoch_delta, chunk, …]} — 64-bit seeds as hex strings, other integers < 2^53 as numbers,
 * pool entries as flat triples with epoch_delta = epoch − entry epoch. */
int mb_loader_cursor_to_json(const mb_loader_cursor *cursor, char **json, mb_error *err);
int mb_loader_cursor_from_json(const char *json, mb_loader_cursor *cursor, mb_error *err);

/* ---- The loader ---------------------------------------------------------------------------------------------- */

typedef struct mb_loader mb_loader;

/* One micro-batch of this rank. Pointers stay valid until the next mb_loader_next or mb_loader_close. */
typedef struct mb_loader_batch {
    mb_batch batch;                /* input_ids (masked), labels, cu_seqlens, counts: what the model consumes */
    const mb_seq_ref *sequences;   /* [batch.sequence_count]: origin of each sequence */
    int32_t max_seqlen;
    int64_t label_count;           /* positions with a label */
    int64_t capacity;              /* micro_tokens */
    uint64_t step;
    uint64_t microbatch;           /* global micro-batch number */
    int32_t index_in_step, count_in_step;   /* among this rank's micro-batches of the step */
    int32_t global_index, global_count;     /* among all micro-batches of the step (global_index = row) */
    int64_t step_token_count;      /* real tokens of the whole global step */
    uint64_t epoch;                /* stream epoch after packing the step */
} mb_loader_batch;

/* `source` is copied; its context must outlive the loader (or set release to hand it over). `resume` may be NULL
 * (start of training). Validates the config: rows per step must be a multiple of the world size, etc. */
int mb_loader_open(mb_loader **loader, const mb_loader_config *config, const mb_doc_source *source,
                   const mb_loader_cursor *resume, mb_error *err);
/* Stops the thread, releases the source if it has a release function, frees everything. */
void mb_loader_close(mb_loader *loader);

int mb_loader_next(mb_loader *loader, mb_loader_batch *out, mb_error *err);

/* The cursor after the last micro-batch returned; only at a step boundary (after the last micro-batch of a step, or
 * before the first call). Free with mb_loader_cursor_free. */
int mb_loader_get_cursor(mb_loader *loader, mb_loader_cursor *cursor, mb_error *err);

/* Rows (global micro-batches) of step-with-`tokens_before`-real-tokens-so-far under the config's schedule. */
int32_t mb_loader_rows_for_tokens(const mb_loader *loader, uint64_t tokens_before);

#endif
