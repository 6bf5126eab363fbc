/* The pretraining data loader: seeded per-epoch document permutation, chunking, global best-fit packing, per
 * micro-batch MLM masking, rank selection, a prefetch thread and a resumable cursor (the math is in loader.h). */
#include "data/loader.h"
#include "data/shards.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

/* Domain constants xor'ed into the seed so the permutation and masking streams never coincide. */
#define PERMUTATION_DOMAIN 0x70657275746174eeULL
#define MASKING_DOMAIN 0x6d61736b696e67d1ULL
#define DOC_CACHE_ENTRIES 64

/* ---- In-memory document source ------------------------------------------------------------------------------- */

static uint64_t memory_count(void *context) { return ((const mb_memory_documents *)context)->count; }

static uint32_t memory_length(void *context, uint64_t index) {
    const mb_memory_documents *docs = context;
    return (uint32_t)(docs->offsets[index + 1] - docs->offsets[index]);
}

static int memory_read(void *context, uint64_t index, int32_t *out, mb_error *err) {
    const mb_memory_documents *docs = context;
    if (index >= docs->count) return mb_fail(err, "memory documents: index %" PRIu64 " >= count %" PRIu64, index, docs->count);
    memcpy(out, docs->tokens + docs->offsets[index], (docs->offsets[index + 1] - docs->offsets[index]) * sizeof *out);
    return 0;
}

static int memory_read_span(void *context, uint64_t index, uint32_t offset, uint32_t count, int32_t *out,
                            mb_error *err) {
    const mb_memory_documents *docs = context;
    if (index >= docs->count || docs->offsets[index] + offset + count > docs->offsets[index + 1])
        return mb_fail(err, "memory documents: span [%u, +%u) of document %" PRIu64 " is out of range", offset, count,
                       index);
    memcpy(out, docs->tokens + docs->offsets[index] + offset, (size_t)count * sizeof *out);
    return 0;
}

mb_doc_source mb_doc_source_memory(const mb_memory_documents *documents) {
    return (mb_doc_source){.context = (void *)documents, .document_count = memory_count,
                           .document_length = memory_length, .read_document = memory_read,
                           .read_span = memory_read_span, .release = NULL};
}

/* ---- Shard set source ---------------------------------------------------------------------------------------- */

typedef struct shard_source {
    mb_shard_set *set;
    mb_shard_reader *reader;
    int own_set;
} shard_source;

static uint64_t shard_count(void *context) { return mb_shard_set_document_count(((shard_source *)context)->set); }

static uint32_t shard_length(void *context, uint64_t index) {
    return mb_shard_set_document_length(((shard_source *)context)->set, index);
}

static int shard_read(void *context, uint64_t index, int32_t *out, mb_error *err) {
    return mb_shard_reader_read_document(((shard_source *)context)->reader, index, out, err);
}

static int shard_read_span(void *context, uint64_t index, uint32_t offset, uint32_t count, int32_t *out,
                           mb_error *err) {
    return mb_shard_reader_read_tokens(((shard_source *)context)->reader, index, offset, count, out, err);
}

static void shard_release(void *context) {
    shard_source *source = context;
    mb_shard_reader_close(source->reader);
    if (source->own_set) mb_shard_set_close(source->set);
    free(source);
}

int mb_doc_source_shards(mb_doc_source *source, mb_shard_set *set, int take_set, mb_error *err) {
    memset(source, 0, sizeof *source);
    shard_source *context = calloc(1, sizeof *context);
    if (!context) return mb_fail(err, "loader: out of memory");
    if (mb_shard_reader_open(&context->reader, set, err)) {
        free(context);
        return -1;
    }
    context->set = set;
    context->own_set = take_set;
    *source = (mb_doc_source){.context = context, .document_count = shard_count, .document_length = shard_length,
                              .read_document = shard_read, .read_span = shard_read_span, .release = shard_release};
    return 0;
}

/* ---- Loader state -------------------------------------------------------------------------------------------- */

typedef struct doc_cache_entry {
    uint64_t document;
    int valid;
    int32_t *tokens;
    size_t alloc;
} doc_cache_entry;

typedef struct loader_slot {
    int32_t *ids, *labels;      /* [micro_tokens] */
    int32_t *cu;                /* [seq_alloc + 1] */
    mb_seq_ref *seqs;           /* [seq_alloc] */
    int64_t seq_alloc;
    mb_loader_batch meta;
    int has_snapshot;           /* set on the last micro-batch of a step: the cursor after that step */
    mb_loader_cursor snapshot;
    uint64_t snapshot_alloc;
} loader_slot;

struct mb_loader {
    mb_loader_config config;
    int32_t *special_ids;       /* own copy of config.masking.special_ids */
    mb_doc_source source;
    mb_masker masker;
    uint64_t document_count, token_count;
    int32_t full_rows;          /* rows per step after warmup */
    int32_t warmup_min_units, warmup_max_units;
    uint64_t *warmup_thresholds;

    /* producer state (the thread's, or the caller's when prefetch = 0) */
    uint64_t epoch, permutation_index;
    uint32_t chunk;
    uint32_t *permutation32;    /* used when document_count <= 2^32, else permutation64 */
    uint64_t *permutation64;
    uint64_t permutation_epoch;
    mb_packer packer;
    int have_step;
    mb_packed_rows packed;
    uint64_t step, microbatch_base, tokens_before;  /* of the packed step */
    int32_t next_own;
    doc_cache_entry cache[DOC_CACHE_ENTRIES];

    /* queue: nslots = prefetch + 1 (one more than may be filled, so the slot the consumer holds is never written) */
    loader_slot *slots;
    int32_t slot_count, depth, head, filled;
    pthread_mutex_t lock;
    pthread_cond_t can_produce, can_consume;
    pthread_t thread;
    int thread_started, stop, failed;
    mb_error thread_error;

    /* consumer state */
    mb_loader_cursor current;   /* the cursor at the last step boundary delivered */
    uint64_t current_alloc;
    int mid_step;
};

/* ---- Config -------------------------------------------------------------------------------------------------- */

void mb_loader_config_default(mb_loader_config *config) {
    memset(config, 0, sizeof *config);
    config->max_seq_len = 1024;
    config->world_size = 1;
    config->prefetch = 4;
    mb_masking_config_default(&config->masking);
}

static int validate_shape(mb_loader_config *c, mb_error *err) {
    if (c->max_seq_len <= 0) return mb_fail(err, "loader config: max_seq_len = %d must be positive", c->max_seq_len);
    if (c->micro_tokens < c->max_seq_len || c->micro_tokens > INT32_MAX)
        return mb_fail(err, "loader config: micro_tokens = %" PRId64 " must lie in [max_seq_len = %d, 2^31) so any "
                       "sequence fits an empty micro-batch", c->micro_tokens, c->max_seq_len);
    if (c->step_tokens <= 0 || c->step_tokens % c->micro_tokens != 0)
        return mb_fail(err, "loader config: step_tokens = %" PRId64 " must be a positive multiple of micro_tokens = %"
                       PRId64, c->step_tokens, c->micro_tokens);
    if (c->step_tokens / c->micro_tokens > INT32_MAX)
        return mb_fail(err, "loader config: step_tokens / micro_tokens is too large");
    if (c->world_size <= 0 || c->rank < 0 || c->rank >= c->world_size)
        return mb_fail(err, "loader config: rank = %d, world_size = %d: need 0 <= rank < world_size", c->rank,
                       c->world_size);
    int64_t rows = c->step_tokens / c->micro_tokens;
    if (rows % c->world_size != 0)
        return mb_fail(err, "loader config: micro-batches per step = step_tokens / micro_tokens = %" PRId64 " is not a "
                       "multiple of world_size = %d (every rank takes the same number of micro-batches of a step)",
                       rows, c->world_size);
    if (c->source_batch == 0) {
        int64_t slots = c->step_tokens / c->max_seq_len;
        c->source_batch = (int32_t)(slots < 1 ? 1 : slots > INT32_MAX / 8 ? INT32_MAX / 8 : slots);
    }
    if (c->buffer_size == 0) c->buffer_size = 5 * c->source_batch;
    if (c->prefetch < 0) return mb_fail(err, "loader config: prefetch = %d must be >= 0", c->prefetch);
    return 0;
}

static int validate_warmup(mb_loader *l, mb_error *err) {
    const mb_loader_config *c = &l->config;
    if (c->warmup_tokens < 0) return mb_fail(err, "loader config: warmup_tokens = %" PRId64 " is negative", c->warmup_tokens);
    if (c->warmup_tokens == 0) return 0;
    int32_t unit = c->warmup_unit_rows;
    if (unit <= 0 || unit % c->world_size != 0 || l->full_rows % unit != 0)
        return mb_fail(err, "loader config: warmup_unit_rows = %d must be a positive multiple of world_size = %d that "
                       "divides the micro-batches per step (%d)", unit, c->world_size, l->full_rows);
    if (c->warmup_min_rows <= 0 || c->warmup_min_rows % unit != 0 || c->warmup_min_rows > l->full_rows)
        return mb_fail(err, "loader config: warmup_min_rows = %d must be a positive multiple of warmup_unit_rows = %d "
                       "and at most the micro-batches per step (%d)", c->warmup_min_rows, unit, l->full_rows);
    l->warmup_min_units = c->warmup_min_rows / unit;
    l->warmup_max_units = l->full_rows / unit;
    int32_t stages = l->warmup_max_units - l->warmup_min_units;
    if (stages == 0) return 0;
    l->warmup_thresholds = malloc((size_t)stages * sizeof *l->warmup_thresholds);
    if (!l->warmup_thresholds) return mb_fail(err, "loader: out of memory");
    /* §5.5: steps_per_unit = tokens / sum(range(min, max)); thresholds[b] = ceil(steps_per_unit · (min + … + b)). */
    double total = 0;
    for (int32_t b = l->warmup_min_units; b < l->warmup_max_units; b++) total += b;
    double per_unit = (double)c->warmup_tokens / total, cumulative = 0;
    for (int32_t i = 0; i < stages; i++) {
        cumulative += l->warmup_min_units + i;
        l->warmup_thresholds[i] = (uint64_t)ceil(per_unit * cumulative);
    }
    return 0;
}

int32_t mb_loader_rows_for_tokens(const mb_loader *loader, uint64_t tokens_before) {
    const mb_loader_config *c = &loader->config;
    if (c->warmup_tokens == 0 || !loader->warmup_thresholds || tokens_before >= (uint64_t)c->warmup_tokens)
        return loader->full_rows;
    for (int32_t i = 0; i < loader->warmup_max_units - loader->warmup_min_units; i++)
        if (tokens_before < loader->warmup_thresholds[i]) return (loader->warmup_min_units + i) * c->warmup_unit_rows;
    return loader->full_rows;
}

/* ---- The sequence stream ------------------------------------------------------------------------------------- */

static uint64_t permutation_get(const mb_loader *l, uint64_t i) {
    return l->permutation32 ? l->permutation32[i] : l->permutation64[i];
}

/* Fisher–Yates over 0 .. n-1 with the epoch's generator. */
static int build_permutation(mb_loader *l, uint64_t epoch, mb_error *err) {
    if (epoch > UINT32_MAX) return mb_fail(err, "loader: epoch %" PRIu64 " exceeds 2^32 - 1", epoch);
    const uint64_t n = l->document_count;
    mb_rng rng;
    mb_rng_seed_stream(&rng, l->config.seed ^ PERMUTATION_DOMAIN, epoch);
    if (l->permutation32) {
        uint32_t *p = l->permutation32;
        for (uint64_t i = 0; i < n; i++) p[i] = (uint32_t)i;
        for (uint64_t i = n - 1; i > 0; i--) {
            uint64_t j = mb_rng_below(&rng, i + 1);
            uint32_t t = p[i];
            p[i] = p[j];
            p[j] = t;
        }
    } else {
        uint64_t *p = l->permutation64;
        for (uint64_t i = 0; i < n; i++) p[i] = i;
        for (uint64_t i = n - 1; i > 0; i--) {
            uint64_t j = mb_rng_below(&rng, i + 1);
            uint64_t t = p[i];
            p[i] = p[j];
            p[j] = t;
        }
    }
    l->permutation_epoch = epoch;
    return 0;
}

/* The packer's source: the next non-empty chunk (or truncated document) of the shuffled order; never ends. */
static int stream_next(void *context, mb_seq_ref *out, mb_error *err) {
    mb_loader *l = context;
    const uint64_t seq_len = (uint64_t)l->config.max_seq_len;
    for (;;) {
        if (l->permutation_index == l->document_count) {
            l->epoch++;
            l->permutation_index = 0;
            l->chunk = 0;
            if (build_permutation(l, l->epoch, err)) return -1;
        }
        uint64_t document = permutation_get(l, l->permutation_index);
        uint64_t length = l->source.document_length(l->source.context, document);
        uint64_t offset = (uint64_t)l->chunk * seq_len;
        if (offset >= length) {  /* empty document, or its chunks are done */
            l->permutation_index++;
            l->chunk = 0;
            continue;
        }
        uint64_t count = length - offset < seq_len ? length - offset : seq_len;
        *out = (mb_seq_ref){.document = document, .epoch = (uint32_t)l->epoch, .chunk = l->chunk,
                            .length = (uint32_t)count};
        if (l->config.truncate || offset + count >= length) {
            l->permutation_index++;
            l->chunk = 0;
        } else {
            l->chunk++;
        }
        return 0;
    }
}

/* ---- Reading sequences --------------------------------------------------------------------------------------- */

/* A part of a document: read_span when the source has it, else the whole document through a small direct-mapped
 * cache (the chunks of a long document land in different rows, so each would otherwise re-read it). */
static int read_part(mb_loader *l, const mb_seq_ref *ref, uint64_t offset, int32_t *out, mb_error *err) {
    if (l->source.read_span)
        return l->source.read_span(l->source.context, ref->document, (uint32_t)offset, ref->length, out, err);
    doc_cache_entry *entry = &l->cache[ref->document % DOC_CACHE_ENTRIES];
    if (!entry->valid || entry->document != ref->document) {
        size_t length = l->source.document_length(l->source.context, ref->document);
        if (length > entry->alloc || (entry->alloc > (1u << 20) && length < entry->alloc / 4)) {
            free(entry->tokens);
            entry->valid = 0;
            entry->alloc = 0;
            entry->tokens = malloc((length ? length : 1) * sizeof *entry->tokens);
            if (!entry->tokens) return mb_fail(err, "loader: out of memory for a document of %zu tokens", length);
            entry->alloc = length;
        }
        entry->valid = 0;
        if (l->source.read_document(l->source.context, ref->document, entry->tokens, err)) return -1;
        entry->document = ref->document;
        entry->valid = 1;
    }
    memcpy(out, entry->tokens + offset, (size_t)ref->length * sizeof *out);
    return 0;
}

static int read_sequence(mb_loader *l, const mb_seq_ref *ref, int32_t *out, mb_error *err) {
    uint64_t length = l->source.document_length(l->source.context, ref->document);
    uint64_t offset = (uint64_t)ref->chunk * (uint64_t)l->config.max_seq_len;
    if (offset + ref->length > length)
        return mb_fail(err, "document %" PRIu64 ": chunk %u (%u tokens) lies beyond its %" PRIu64 " tokens",
                       ref->document, ref->chunk, ref->length, length);
    int rc = offset == 0 && ref->length == length ? l->source.read_document(l->source.context, ref->document, out, err)
                                                  : read_part(l, ref, offset, out, err);
    if (rc) return mb_fail_context(err, "document %" PRIu64, ref->document);
    const uint32_t vocab = (uint32_t)l->config.masking.vocab_size;
    for (uint32_t i = 0; i < ref->length; i++)
        if ((uint32_t)out[i] >= vocab)
            return mb_fail(err, "document %" PRIu64 ": token %" PRIu64 ": id %d outside [0, vocab_size = %u)",
                           ref->document, offset + i, out[i], vocab);
    return 0;
}

/* ---- Producing micro-batches --------------------------------------------------------------------------------- */

static int ensure_slot_sequences(loader_slot *slot, int64_t count, mb_error *err) {
    if (count <= slot->seq_alloc) return 0;
    int64_t alloc = slot->seq_alloc ? slot->seq_alloc : 256;
    while (alloc < count) alloc *= 2;
    int32_t *cu = realloc(slot->cu, ((size_t)alloc + 1) * sizeof *cu);
    if (cu) slot->cu = cu;
    mb_seq_ref *seqs = realloc(slot->seqs, (size_t)alloc * sizeof *seqs);
    if (seqs) slot->seqs = seqs;
    if (!cu || !seqs) return mb_fail(err, "loader: out of memory for %" PRId64 " sequences", alloc);
    slot->seq_alloc = alloc;
    return 0;
}

static int pack_step(mb_loader *l, mb_error *err) {
    int32_t rows = mb_loader_rows_for_tokens(l, l->tokens_before);
    int rc = mb_packer_pack(&l->packer, rows, stream_next, l, &l->packed, err);
    if (rc < 0) return mb_fail_context(err, "loader: step %" PRIu64, l->step);
    if (rc == 0) return mb_fail(err, "loader: step %" PRIu64 ": the sequence stream ended", l->step);
    l->have_step = 1;
    l->next_own = 0;
    return 0;
}

static int build_microbatch(mb_loader *l, loader_slot *slot, int32_t row, mb_error *err) {
    const mb_packed_rows *p = &l->packed;
    int64_t first = p->row_start[row], count = p->row_start[row + 1] - first;
    if (ensure_slot_sequences(slot, count, err)) return -1;
    int64_t position = 0;
    int32_t longest = 0;
    slot->cu[0] = 0;
    for (int64_t k = 0; k < count; k++) {
        const mb_seq_ref *ref = &p->seqs[first + k];
        if (read_sequence(l, ref, slot->ids + position, err))
            return mb_fail_context(err, "loader: step %" PRIu64 " micro-batch %d", l->step, row);
        position += ref->length;
        slot->cu[k + 1] = (int32_t)position;
        slot->seqs[k] = *ref;
        if ((int32_t)ref->length > longest) longest = (int32_t)ref->length;
    }
    mb_rng rng;
    mb_rng_seed_stream(&rng, l->config.seed ^ MASKING_DOMAIN, l->microbatch_base + (uint64_t)row);
    size_t labels = 0;
    if (mb_masker_apply(&l->masker, &rng, slot->ids, (size_t)position, slot->ids, slot->labels, &labels, err))
        return mb_fail_context(err, "loader: step %" PRIu64 " micro-batch %d", l->step, row);
    mb_loader_batch *m = &slot->meta;
    m->batch = (mb_batch){.token_count = (int)position, .sequence_count = (int)count, .input_ids = slot->ids,
                          .cu_seqlens = slot->cu, .labels = slot->labels, .sequence_labels = NULL};
    m->sequences = slot->seqs;
    m->max_seqlen = longest;
    m->label_count = (int64_t)labels;
    m->capacity = l->config.micro_tokens;
    m->step = l->step;
    m->microbatch = l->microbatch_base + (uint64_t)row;
    m->index_in_step = l->next_own;
    m->count_in_step = p->rows / l->config.world_size;
    m->global_index = row;
    m->global_count = p->rows;
    m->step_token_count = p->token_count;
    m->epoch = l->epoch;
    return 0;
}

static void fill_identity(const mb_loader *l, mb_loader_cursor *c) {
    const mb_loader_config *k = &l->config;
    c->seed = k->seed;
    c->document_count = l->document_count;
    c->token_count = l->token_count;
    c->max_seq_len = k->max_seq_len;
    c->truncate = k->truncate;
    c->micro_tokens = k->micro_tokens;
    c->step_tokens = k->step_tokens;
    c->source_batch = k->source_batch;
    c->buffer_size = k->buffer_size;
    c->warmup_tokens = k->warmup_tokens;
    c->warmup_min_rows = k->warmup_min_rows;
    c->warmup_unit_rows = k->warmup_unit_rows;
}

/* Writes the producer's position (between steps) into a cursor whose pool buffer holds *alloc entries. */
static int snapshot_position(const mb_loader *l, mb_loader_cursor *c, uint64_t *alloc, mb_error *err) {
    fill_identity(l, c);
    c->step = l->step;
    c->microbatch = l->microbatch_base;
    c->tokens = l->tokens_before;
    c->epoch = l->epoch;
    c->permutation_index = l->permutation_index;
    c->chunk = l->chunk;
    size_t count = mb_packer_pool_count(&l->packer);
    if (count > *alloc) {
        mb_seq_ref *pool = realloc(c->pool, count * sizeof *pool);
        if (!pool) return mb_fail(err, "loader: out of memory for a cursor of %zu sequences", count);
        c->pool = pool;
        *alloc = count;
    }
    if (count) memcpy(c->pool, mb_packer_pool(&l->packer), count * sizeof *c->pool);
    c->pool_count = count;
    return 0;
}

static int produce_one(mb_loader *l, loader_slot *slot, mb_error *err) {
    if (!l->have_step && pack_step(l, err)) return -1;
    const int32_t world = l->config.world_size, own = l->packed.rows / world;
    int32_t row = l->config.rank + l->next_own * world;
    if (build_microbatch(l, slot, row, err)) return -1;
    slot->has_snapshot = 0;
    if (++l->next_own == own) {
        l->step++;
        l->microbatch_base += (uint64_t)l->packed.rows;
        l->tokens_before += (uint64_t)l->packed.token_count;
        l->have_step = 0;
        if (snapshot_position(l, &slot->snapshot, &slot->snapshot_alloc, err)) return -1;
        slot->has_snapshot = 1;
    }
    return 0;
}

static void *producer_main(void *argument) {
    mb_loader *l = argument;
    pthread_mutex_lock(&l->lock);
    for (;;) {
        while (!l->stop && l->filled >= l->depth) pthread_cond_wait(&l->can_produce, &l->lock);
        if (l->stop) break;
        int32_t tail = (l->head + l->filled) % l->slot_count;
        pthread_mutex_unlock(&l->lock);
        mb_error error;
        mb_error_clear(&error);
        int rc = produce_one(l, &l->slots[tail], &error);
        pthread_mutex_lock(&l->lock);
        if (rc) {
            l->thread_error = error;
            l->failed = 1;
            pthread_cond_broadcast(&l->can_consume);
            break;
        }
        l->filled++;
        pthread_cond_signal(&l->can_consume);
    }
    pthread_mutex_unlock(&l->lock);
    return NULL;
}

/* ---- Consumer side ------------------------------------------------------------------------------------------- */

int mb_loader_next(mb_loader *l, mb_loader_batch *out, mb_error *err) {
    loader_slot *slot;
    if (!l->thread_started) {
        if (!l->failed && l->filled == 0) {
            int32_t tail = (l->head + l->filled) % l->slot_count;
            if (produce_one(l, &l->slots[tail], &l->thread_error))
                l->failed = 1;
            else
                l->filled++;
        }
        if (l->filled == 0) return mb_fail(err, "%s", l->thread_error.message);
        slot = &l->slots[l->head];
        l->head = (l->head + 1) % l->slot_count;
        l->filled--;
    } else {
        pthread_mutex_lock(&l->lock);
        while (l->filled == 0 && !l->failed) pthread_cond_wait(&l->can_consume, &l->lock);
        if (l->filled == 0) {
            pthread_mutex_unlock(&l->lock);
            return mb_fail(err, "%s", l->thread_error.message);
        }
        slot = &l->slots[l->head];
        l->head = (l->head + 1) % l->slot_count;
        l->filled--;
        pthread_cond_signal(&l->can_produce);
        pthread_mutex_unlock(&l->lock);
    }
    *out = slot->meta;
    if (slot->has_snapshot) {
        /* The consumer now stands at a step boundary: adopt the snapshot (swap buffers, no copy). */
        mb_loader_cursor old = l->current;
        uint64_t old_alloc = l->current_alloc;
        l->current = slot->snapshot;
        l->current_alloc = slot->snapshot_alloc;
        slot->snapshot = old;
        slot->snapshot_alloc = old_alloc;
        slot->has_snapshot = 0;
        l->mid_step = 0;
    } else {
        l->mid_step = 1;
    }
    return 0;
}

int mb_loader_get_cursor(mb_loader *l, mb_loader_cursor *cursor, mb_error *err) {
    memset(cursor, 0, sizeof *cursor);
    if (l->mid_step)
        return mb_fail(err, "loader: cursor requested in the middle of step %" PRIu64 "; take it after the step's last "
                       "micro-batch (count_in_step of them per rank)", l->current.step);
    return mb_loader_cursor_copy(cursor, &l->current, err);
}

/* ---- Cursor helpers ------------------------------------------------------------------------------------------ */

void mb_loader_cursor_free(mb_loader_cursor *cursor) {
    free(cursor->pool);
    memset(cursor, 0, sizeof *cursor);
}

int mb_loader_cursor_copy(mb_loader_cursor *dst, const mb_loader_cursor *src, mb_error *err) {
    *dst = *src;
    dst->pool = NULL;
    if (src->pool_count == 0) return 0;
    dst->pool = malloc(src->pool_count * sizeof *dst->pool);
    if (!dst->pool) {
        dst->pool_count = 0;
        return mb_fail(err, "loader cursor: out of memory for %" PRIu64 " sequences", src->pool_count);
    }
    memcpy(dst->pool, src->pool, src->pool_count * sizeof *dst->pool);
    return 0;
}

#define JSON_MAX_EXACT 9007199254740992.0 /* 2^53: integers up to here survive a double */
static const char *const CURSOR_FORMAT = "modernbert.c loader cursor";

static int json_add_integer(cJSON *object, const char *name, uint64_t value, mb_error *err) {
    if ((double)value > JSON_MAX_EXACT) return mb_fail(err, "loader cursor: %s = %" PRIu64 " exceeds 2^53", name, value);
    if (!cJSON_AddNumberToObject(object, name, (double)value)) return mb_fail(err, "loader cursor: out of memory");
    return 0;
}

int mb_loader_cursor_to_json(const mb_loader_cursor *c, char **json, mb_error *err) {
    *json = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root) return mb_fail(err, "loader cursor: out of memory");
    char seed[32];
    snprintf(seed, sizeof seed, "0x%016" PRIx64, c->seed);
    int rc = !cJSON_AddStringToObject(root, "format", CURSOR_FORMAT) || !cJSON_AddNumberToObject(root, "version", 1) ||
             !cJSON_AddStringToObject(root, "seed", seed);
    if (rc) mb_fail(err, "loader cursor: out of memory");
    const struct { const char *name; uint64_t value; } fields[] = {
        {"document_count", c->document_count}, {"token_count", c->token_count},
        {"max_seq_len", (uint64_t)c->max_seq_len}, {"truncate", (uint64_t)c->truncate},
        {"micro_tokens", (uint64_t)c->micro_tokens}, {"step_tokens", (uint64_t)c->step_tokens},
        {"source_batch", (uint64_t)c->source_batch}, {"buffer_size", (uint64_t)c->buffer_size},
        {"warmup_tokens", (uint64_t)c->warmup_tokens}, {"warmup_min_rows", (uint64_t)c->warmup_min_rows},
        {"warmup_unit_rows", (uint64_t)c->warmup_unit_rows}, {"step", c->step}, {"microbatch", c->microbatch},
        {"tokens", c->tokens}, {"epoch", c->epoch}, {"permutation_index", c->permutation_index},
        {"chunk", c->chunk}};
    for (size_t i = 0; !rc && i < sizeof fields / sizeof fields[0]; i++)
        rc = json_add_integer(root, fields[i].name, fields[i].value, err);
    cJSON *pool = rc ? NULL : cJSON_AddArrayToObject(root, "pool");
    if (!rc && !pool) rc = mb_fail(err, "loader cursor: out of memory");
    for (uint64_t i = 0; !rc && i < c->pool_count; i++) {
        const mb_seq_ref *ref = &c->pool[i];
        if (ref->epoch > c->epoch) {
            rc = mb_fail(err, "loader cursor: pool[%" PRIu64 "] has epoch %u after the stream's %" PRIu64, i,
                         ref->epoch, c->epoch);
            break;
        }
        const double triple[3] = {(double)ref->document, (double)(c->epoch - ref->epoch), (double)ref->chunk};
        for (int k = 0; k < 3 && !rc; k++) {
            cJSON *number = cJSON_CreateNumber(triple[k]);
            if (!number || !cJSON_AddItemToArray(pool, number)) rc = mb_fail(err, "loader cursor: out of memory");
        }
    }
    if (!rc) {
        *json = cJSON_PrintUnformatted(root);
        if (!*json) rc = mb_fail(err, "loader cursor: out of memory");
    }
    cJSON_Delete(root);
    return rc ? -1 : 0;
}

static int json_get_integer(const cJSON *root, const char *name, uint64_t max, uint64_t *out, mb_error *err) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!cJSON_IsNumber(item)) return mb_fail(err, "loader cursor: field \"%s\" is missing or not a number", name);
    double v = item->valuedouble;
    if (!(v >= 0 && v <= JSON_MAX_EXACT && v == floor(v) && v <= (double)max))
        return mb_fail(err, "loader cursor: field \"%s\" = %g is not an integer in [0, %" PRIu64 "]", name, v, max);
    *out = (uint64_t)v;
    return 0;
}

static int parse_cursor(const cJSON *root, mb_loader_cursor *c, mb_error *err) {
    const cJSON *format = cJSON_GetObjectItemCaseSensitive(root, "format");
    if (!cJSON_IsString(format) || strcmp(format->valuestring, CURSOR_FORMAT) != 0)
        return mb_fail(err, "loader cursor: field \"format\" is not \"%s\"", CURSOR_FORMAT);
    uint64_t version = 0;
    if (json_get_integer(root, "version", UINT32_MAX, &version, err)) return -1;
    if (version != 1) return mb_fail(err, "loader cursor: version %" PRIu64 " is not supported (expected 1)", version);
    const cJSON *seed = cJSON_GetObjectItemCaseSensitive(root, "seed");
    char *end = NULL;
    if (!cJSON_IsString(seed) || strncmp(seed->valuestring, "0x", 2) != 0 ||
        (c->seed = strtoull(seed->valuestring + 2, &end, 16), *end != '\0' || end == seed->valuestring + 2))
        return mb_fail(err, "loader cursor: field \"seed\" is not a hex string \"0x…\"");
    uint64_t v[17] = {0};
    const struct { const char *name; uint64_t max; } fields[17] = {
        {"document_count", UINT64_MAX}, {"token_count", UINT64_MAX}, {"max_seq_len", INT32_MAX}, {"truncate", 1},
        {"micro_tokens", INT64_MAX}, {"step_tokens", INT64_MAX}, {"source_batch", INT32_MAX},
        {"buffer_size", INT32_MAX}, {"warmup_tokens", INT64_MAX}, {"warmup_min_rows", INT32_MAX},
        {"warmup_unit_rows", INT32_MAX}, {"step", UINT64_MAX}, {"microbatch", UINT64_MAX}, {"tokens", UINT64_MAX},
        {"epoch", UINT32_MAX}, {"permutation_index", UINT64_MAX}, {"chunk", UINT32_MAX}};
    for (int i = 0; i < 17; i++)
        if (json_get_integer(root, fields[i].name, fields[i].max, &v[i], err)) return -1;
    c->document_count = v[0];
    c->token_count = v[1];
    c->max_seq_len = (int32_t)v[2];
    c->truncate = (int32_t)v[3];
    c->micro_tokens = (int64_t)v[4];
    c->step_tokens = (int64_t)v[5];
    c->source_batch = (int32_t)v[6];
    c->buffer_size = (int32_t)v[7];
    c->warmup_tokens = (int64_t)v[8];
    c->warmup_min_rows = (int32_t)v[9];
    c->warmup_unit_rows = (int32_t)v[10];
    c->step = v[11];
    c->microbatch = v[12];
    c->tokens = v[13];
    c->epoch = v[14];
    c->permutation_index = v[15];
    c->chunk = (uint32_t)v[16];

    const cJSON *pool = cJSON_GetObjectItemCaseSensitive(root, "pool");
    if (!cJSON_IsArray(pool)) return mb_fail(err, "loader cursor: field \"pool\" is missing or not an array");
    uint64_t numbers = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, pool) numbers++;
    if (numbers % 3 != 0) return mb_fail(err, "loader cursor: \"pool\" has %" PRIu64 " numbers, not a multiple of 3", numbers);
    c->pool_count = numbers / 3;
    c->pool = c->pool_count ? calloc(c->pool_count, sizeof *c->pool) : NULL;
    if (c->pool_count && !c->pool) return mb_fail(err, "loader cursor: out of memory");
    uint64_t k = 0;
    cJSON_ArrayForEach(item, pool) {
        double x = cJSON_IsNumber(item) ? item->valuedouble : -1;
        uint64_t i = k / 3;
        if (!(x >= 0 && x <= JSON_MAX_EXACT && x == floor(x)))
            return mb_fail(err, "loader cursor: pool[%" PRIu64 "] element %" PRIu64 " is not a non-negative integer", i,
                           k % 3);
        uint64_t value = (uint64_t)x;
        if (k % 3 == 0) c->pool[i].document = value;
        if (k % 3 == 1) {
            if (value > c->epoch) return mb_fail(err, "loader cursor: pool[%" PRIu64 "] epoch delta %" PRIu64
                                                 " exceeds the epoch %" PRIu64, i, value, c->epoch);
            c->pool[i].epoch = (uint32_t)(c->epoch - value);
        }
        if (k % 3 == 2) {
            if (value > UINT32_MAX) return mb_fail(err, "loader cursor: pool[%" PRIu64 "] chunk is too large", i);
            c->pool[i].chunk = (uint32_t)value;
        }
        k++;
    }
    return 0;
}

int mb_loader_cursor_from_json(const char *json, mb_loader_cursor *cursor, mb_error *err) {
    memset(cursor, 0, sizeof *cursor);
    cJSON *root = cJSON_Parse(json);
    if (!root) {
        const char *where = cJSON_GetErrorPtr();
        return mb_fail(err, "loader cursor: invalid JSON at byte %td", where ? where - json : (ptrdiff_t)0);
    }
    int rc = parse_cursor(root, cursor, err);
    cJSON_Delete(root);
    if (rc) mb_loader_cursor_free(cursor);
    return rc;
}

/* ---- Open / close -------------------------------------------------------------------------------------------- */

/* A cursor resumes only the stream it was taken from: every identity field must match. */
static int check_cursor_identity(const mb_loader *l, const mb_loader_cursor *c, mb_error *err) {
    mb_loader_cursor expected;
    memset(&expected, 0, sizeof expected);
    fill_identity(l, &expected);
    if (c->seed != expected.seed)
        return mb_fail(err, "loader cursor: seed 0x%" PRIx64 " differs from the config's 0x%" PRIx64, c->seed,
                       expected.seed);
    const struct { const char *name; int64_t got, want; } fields[] = {
        {"document_count", (int64_t)c->document_count, (int64_t)expected.document_count},
        {"token_count", (int64_t)c->token_count, (int64_t)expected.token_count},
        {"max_seq_len", c->max_seq_len, expected.max_seq_len}, {"truncate", c->truncate, expected.truncate},
        {"micro_tokens", c->micro_tokens, expected.micro_tokens}, {"step_tokens", c->step_tokens, expected.step_tokens},
        {"source_batch", c->source_batch, expected.source_batch}, {"buffer_size", c->buffer_size, expected.buffer_size},
        {"warmup_tokens", c->warmup_tokens, expected.warmup_tokens},
        {"warmup_min_rows", c->warmup_min_rows, expected.warmup_min_rows},
        {"warmup_unit_rows", c->warmup_unit_rows, expected.warmup_unit_rows}};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (fields[i].got != fields[i].want)
            return mb_fail(err, "loader cursor: %s = %" PRId64 " differs from this loader's %" PRId64
                           " (a cursor resumes only the same data and config)", fields[i].name, fields[i].got,
                           fields[i].want);
    return 0;
}

/* Checks the position against the data and restores the producer state from it (lengths are recomputed). */
static int restore_position(mb_loader *l, const mb_loader_cursor *c, mb_error *err) {
    if (check_cursor_identity(l, c, err)) return -1;
    const uint64_t seq_len = (uint64_t)l->config.max_seq_len;
    if (c->epoch > UINT32_MAX) return mb_fail(err, "loader cursor: epoch %" PRIu64 " exceeds 2^32 - 1", c->epoch);
    if (c->permutation_index > l->document_count)
        return mb_fail(err, "loader cursor: permutation_index %" PRIu64 " > document_count %" PRIu64,
                       c->permutation_index, l->document_count);
    if (c->pool_count > (uint64_t)l->config.buffer_size)
        return mb_fail(err, "loader cursor: %" PRIu64 " pool entries exceed buffer_size %d", c->pool_count,
                       l->config.buffer_size);
    l->epoch = c->epoch;
    l->permutation_index = c->permutation_index;
    l->chunk = c->chunk;
    l->step = c->step;
    l->microbatch_base = c->microbatch;
    l->tokens_before = c->tokens;
    if (build_permutation(l, l->epoch, err)) return -1;
    if (l->chunk != 0) {
        uint64_t length = l->permutation_index < l->document_count
            ? l->source.document_length(l->source.context, permutation_get(l, l->permutation_index)) : 0;
        if (l->config.truncate || (uint64_t)l->chunk * seq_len >= length)
            return mb_fail(err, "loader cursor: chunk %u is not a chunk of the document at permutation index %" PRIu64,
                           l->chunk, l->permutation_index);
    }
    mb_seq_ref *pool = c->pool_count ? malloc(c->pool_count * sizeof *pool) : NULL;
    if (c->pool_count && !pool) return mb_fail(err, "loader: out of memory");
    for (uint64_t i = 0; i < c->pool_count; i++) {
        mb_seq_ref ref = c->pool[i];
        uint64_t length = ref.document < l->document_count
            ? l->source.document_length(l->source.context, ref.document) : 0;
        uint64_t offset = (uint64_t)ref.chunk * seq_len;
        if (ref.document >= l->document_count || offset >= length || (l->config.truncate && ref.chunk != 0) ||
            ref.epoch > c->epoch) {
            free(pool);
            return mb_fail(err, "loader cursor: pool[%" PRIu64 "] (document %" PRIu64 ", chunk %u, epoch %u) is not "
                           "a sequence of this data", i, ref.document, ref.chunk, ref.epoch);
        }
        ref.length = (uint32_t)(length - offset < seq_len ? length - offset : seq_len);
        pool[i] = ref;
    }
    int rc = mb_packer_set_pool(&l->packer, pool, (size_t)c->pool_count, err);
    free(pool);
    return rc;
}

static int count_tokens(mb_loader *l, mb_error *err) {
    l->document_count = l->source.document_count(l->source.context);
    if (l->document_count == 0) return mb_fail(err, "loader: the data holds no documents");
    for (uint64_t i = 0; i < l->document_count; i++)
        l->token_count += l->source.document_length(l->source.context, i);
    if (l->token_count == 0)
        return mb_fail(err, "loader: the data's %" PRIu64 " documents are all empty", l->document_count);
    return 0;
}

static int allocate_slots(mb_loader *l, mb_error *err) {
    l->depth = l->config.prefetch > 0 ? l->config.prefetch : 1;
    l->slot_count = l->depth + 1;
    l->slots = calloc((size_t)l->slot_count, sizeof *l->slots);
    if (!l->slots) return mb_fail(err, "loader: out of memory");
    for (int32_t i = 0; i < l->slot_count; i++) {
        loader_slot *slot = &l->slots[i];
        slot->ids = malloc((size_t)l->config.micro_tokens * sizeof *slot->ids);
        slot->labels = malloc((size_t)l->config.micro_tokens * sizeof *slot->labels);
        if (!slot->ids || !slot->labels || ensure_slot_sequences(slot, 256, err))
            return mb_fail(err, "loader: out of memory for micro-batches of %" PRId64 " tokens", l->config.micro_tokens);
    }
    return 0;
}

static int setup(mb_loader *l, const mb_loader_cursor *resume, mb_error *err) {
    if (!l->source.document_count || !l->source.document_length || !l->source.read_document)
        return mb_fail(err, "loader: the document source lacks document_count, document_length or read_document");
    if (validate_shape(&l->config, err)) return -1;
    l->full_rows = (int32_t)(l->config.step_tokens / l->config.micro_tokens);
    if (validate_warmup(l, err) || mb_masker_init(&l->masker, &l->config.masking, err)) return -1;
    mb_packer_config packing = {.row_capacity = l->config.micro_tokens, .buffer_size = l->config.buffer_size,
                                .source_batch = l->config.source_batch};
    if (mb_packer_init(&l->packer, &packing, err) || count_tokens(l, err)) return -1;
    if (l->document_count <= (uint64_t)UINT32_MAX + 1)
        l->permutation32 = malloc(l->document_count * sizeof *l->permutation32);
    else
        l->permutation64 = malloc(l->document_count * sizeof *l->permutation64);
    if (!l->permutation32 && !l->permutation64)
        return mb_fail(err, "loader: out of memory for a permutation of %" PRIu64 " documents", l->document_count);
    if (resume ? restore_position(l, resume, err) : build_permutation(l, 0, err)) return -1;
    if (snapshot_position(l, &l->current, &l->current_alloc, err) || allocate_slots(l, err)) return -1;
    return 0;
}

int mb_loader_open(mb_loader **loader, const mb_loader_config *config, const mb_doc_source *source,
                   const mb_loader_cursor *resume, mb_error *err) {
    *loader = NULL;
    mb_loader *l = calloc(1, sizeof *l);
    if (!l) return mb_fail(err, "loader: out of memory");
    l->config = *config;
    l->source = *source;
    pthread_mutex_init(&l->lock, NULL);
    pthread_cond_init(&l->can_produce, NULL);
    pthread_cond_init(&l->can_consume, NULL);
    mb_error_clear(&l->thread_error);
    if (config->masking.special_count) {
        l->special_ids = malloc(config->masking.special_count * sizeof *l->special_ids);
        if (!l->special_ids) {
            mb_loader_close(l);
            return mb_fail(err, "loader: out of memory");
        }
        memcpy(l->special_ids, config->masking.special_ids, config->masking.special_count * sizeof *l->special_ids);
        l->config.masking.special_ids = l->special_ids;
    }
    if (setup(l, resume, err)) {
        l->source.release = NULL;  /* a failed open leaves the source with the caller */
        mb_loader_close(l);
        return -1;
    }
    if (l->config.prefetch > 0) {
        if (pthread_create(&l->thread, NULL, producer_main, l) != 0) {
            l->source.release = NULL;
            mb_loader_close(l);
            return mb_fail(err, "loader: cannot start the prefetch thread");
        }
        l->thread_started = 1;
    }
    *loader = l;
    return 0;
}

void mb_loader_close(mb_loader *l) {
    if (!l) return;
    if (l->thread_started) {
        pthread_mutex_lock(&l->lock);
        l->stop = 1;
        pthread_cond_broadcast(&l->can_produce);
        pthread_mutex_unlock(&l->lock);
        pthread_join(l->thread, NULL);
    }
    pthread_mutex_destroy(&l->lock);
    pthread_cond_destroy(&l->can_produce);
    pthread_cond_destroy(&l->can_consume);
    for (int32_t i = 0; l->slots && i < l->slot_count; i++) {
        free(l->slots[i].ids);
        free(l->slots[i].labels);
        free(l->slots[i].cu);
        free(l->slots[i].seqs);
        free(l->slots[i].snapshot.pool);
    }
    free(l->slots);
    for (int i = 0; i < DOC_CACHE_ENTRIES; i++) free(l->cache[i].tokens);
    mb_packer_free(&l->packer);
    mb_masker_free(&l->masker);
    free(l->permutation32);
    free(l->permutation64);
    free(l->warmup_thresholds);
    free(l->current.pool);
    free(l->special_ids);
    if (l->source.release) l->source.release(l->source.context);
    free(l);
}
