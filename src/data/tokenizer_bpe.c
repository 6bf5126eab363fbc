/* The BPE model of the tokenizer: the vocabulary and merge hash maps, and the merge loop on one word.
 *
 * A word (one piece of the pre-tokenizer, as raw bytes) starts as one symbol per byte: the id of that byte's
 * byte-level character. Then, as models/bpe/word.rs::merge_all does, the adjacent pair with the lowest merge rank
 * (leftmost on ties) is replaced by its merged token until no adjacent pair has a rank. A priority queue keyed by
 * (rank, position) holds the candidate pairs; entries made stale by an earlier merge are skipped when popped.
 * Bytes without a token become the unk token (fused into one when fuse_unk) or vanish when there is no unk token,
 * as models/bpe/model.rs::merge_word does. Results for words of up to MB_TOK_CACHE_MAX_WORD bytes are cached. */
#include "data/tokenizer_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---- hashing ---------------------------------------------------------------------------------------------------- */

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

uint64_t mb_tok_hash_bytes(const void *data, size_t length) {
    const uint8_t *p = data;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)length * 0xFF51AFD7ED558CCDull);
    while (length >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = mix64(h ^ v);
        p += 8;
        length -= 8;
    }
    uint64_t tail = 0;
    for (size_t i = 0; i < length; i++) tail |= (uint64_t)p[i] << (8 * i);
    return mix64(h ^ tail ^ 0xA5A5A5A5A5A5A5A5ull);
}

static size_t capacity_for(size_t expected) {
    size_t capacity = 16;
    while (capacity < expected * 2) capacity *= 2;
    return capacity;
}

/* ---- string map ------------------------------------------------------------------------------------------------- */

int mb_tok_str_map_init(mb_tok_str_map *map, size_t expected) {
    map->capacity = capacity_for(expected);
    map->count = 0;
    map->slots = calloc(map->capacity, sizeof *map->slots);
    return map->slots == NULL ? -1 : 0;
}

void mb_tok_str_map_free(mb_tok_str_map *map) {
    free(map->slots);
    map->slots = NULL;
    map->capacity = map->count = 0;
}

static int str_map_grow(mb_tok_str_map *map) {
    mb_tok_str_map bigger = {calloc(map->capacity * 2, sizeof *map->slots), map->capacity * 2, 0};
    if (bigger.slots == NULL) return -1;
    size_t mask = bigger.capacity - 1;
    for (size_t i = 0; i < map->capacity; i++) {
        if (map->slots[i].key == NULL) continue;
        size_t at = map->slots[i].hash & mask;
        while (bigger.slots[at].key != NULL) at = (at + 1) & mask;
        bigger.slots[at] = map->slots[i];
        bigger.count++;
    }
    free(map->slots);
    *map = bigger;
    return 0;
}

int mb_tok_str_map_put(mb_tok_str_map *map, const char *key, size_t length, int32_t value) {
    if ((map->count + 1) * 2 > map->capacity && str_map_grow(map) != 0) return -1;
    uint64_t hash = mb_tok_hash_bytes(key, length);
    size_t mask = map->capacity - 1, at = hash & mask;
    while (map->slots[at].key != NULL) {
        mb_tok_str_slot *slot = &map->slots[at];
        if (slot->hash == hash && slot->length == length && memcmp(slot->key, key, length) == 0) {
            slot->value = value;
            return 0;
        }
        at = (at + 1) & mask;
    }
    map->slots[at] = (mb_tok_str_slot){hash, key, (uint32_t)length, value};
    map->count++;
    return 0;
}

int32_t mb_tok_str_map_get(const mb_tok_str_map *map, const char *key, size_t length) {
    if (map->slots == NULL) return -1;
    uint64_t hash = mb_tok_hash_bytes(key, length);
    size_t mask = map->capacity - 1, at = hash & mask;
    while (map->slots[at].key != NULL) {
        const mb_tok_str_slot *slot = &map->slots[at];
        if (slot->hash == hash && slot->length == length && memcmp(slot->key, key, length) == 0) return slot->value;
        at = (at + 1) & mask;
    }
    return -1;
}

/* ---- pair map --------------------------------------------------------------------------------------------------- */

static uint64_t pair_key(int32_t left, int32_t right) { return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right; }

int mb_tok_pair_map_init(mb_tok_pair_map *map, size_t expected) {
    size_t capacity = capacity_for(expected);
    map->slots = malloc(capacity * sizeof *map->slots);
    if (map->slots == NULL) return -1;
    for (size_t i = 0; i < capacity; i++) map->slots[i].key = UINT64_MAX;
    map->mask = capacity - 1;
    map->count = 0;
    return 0;
}

void mb_tok_pair_map_free(mb_tok_pair_map *map) {
    free(map->slots);
    map->slots = NULL;
    map->mask = map->count = 0;
}

static int pair_map_grow(mb_tok_pair_map *map) {
    mb_tok_pair_map bigger;
    if (mb_tok_pair_map_init(&bigger, map->mask + 1) != 0) return -1;
    for (size_t i = 0; i <= map->mask; i++) {
        if (map->slots[i].key == UINT64_MAX) continue;
        size_t at = mix64(map->slots[i].key) & bigger.mask;
        while (bigger.slots[at].key != UINT64_MAX) at = (at + 1) & bigger.mask;
        bigger.slots[at] = map->slots[i];
        bigger.count++;
    }
    free(map->slots);
    *map = bigger;
    return 0;
}

int mb_tok_pair_map_put(mb_tok_pair_map *map, int32_t left, int32_t right, uint32_t rank, int32_t merged_id) {
    if ((map->count + 1) * 2 > map->mask + 1 && pair_map_grow(map) != 0) return -1;
    uint64_t key = pair_key(left, right);
    size_t at = mix64(key) & map->mask;
    while (map->slots[at].key != UINT64_MAX && map->slots[at].key != key) at = (at + 1) & map->mask;
    if (map->slots[at].key == UINT64_MAX) map->count++;
    map->slots[at] = (mb_tok_pair_slot){key, rank, merged_id};
    return 0;
}

const mb_tok_pair_slot *mb_tok_pair_map_get(const mb_tok_pair_map *map, int32_t left, int32_t right) {
    uint64_t key = pair_key(left, right);
    size_t at = mix64(key) & map->mask;
    for (;;) {
        const mb_tok_pair_slot *slot = &map->slots[at];
        if (slot->key == key) return slot;
        if (slot->key == UINT64_MAX) return NULL;
        at = (at + 1) & map->mask;
    }
}

/* ---- word cache ------------------------------------------------------------------------------------------------- */

typedef struct cache_entry {
    uint64_t hash;
    uint32_t length, id_count;
    const char *bytes; /* after ids, in the same block */
    int32_t ids[];
} cache_entry;

typedef struct cache_chunk {
    struct cache_chunk *next;
    size_t used, size;
    _Alignas(8) char data[];
} cache_chunk;

struct mb_tok_word_cache {
    _Atomic(cache_entry *) *slots;
    size_t mask, count, limit; /* count and the chunks are only touched under lock */
    pthread_mutex_t lock;
    cache_chunk *chunks;
};

mb_tok_word_cache *mb_tok_word_cache_new(size_t slots) {
    mb_tok_word_cache *cache = calloc(1, sizeof *cache);
    if (cache == NULL) return NULL;
    size_t capacity = 1024;
    while (capacity < slots) capacity *= 2;
    cache->slots = malloc(capacity * sizeof *cache->slots);
    if (cache->slots == NULL || pthread_mutex_init(&cache->lock, NULL) != 0) {
        free(cache->slots);
        free(cache);
        return NULL;
    }
    for (size_t i = 0; i < capacity; i++) atomic_init(&cache->slots[i], NULL);
    cache->mask = capacity - 1;
    cache->limit = capacity / 2;
    return cache;
}

void mb_tok_word_cache_free(mb_tok_word_cache *cache) {
    if (cache == NULL) return;
    for (cache_chunk *chunk = cache->chunks, *next; chunk != NULL; chunk = next) {
        next = chunk->next;
        free(chunk);
    }
    pthread_mutex_destroy(&cache->lock);
    free(cache->slots);
    free(cache);
}

static const cache_entry *cache_find(const mb_tok_word_cache *cache, uint64_t hash, const uint8_t *word,
                                     size_t length, size_t *empty_slot) {
    size_t at = hash & cache->mask;
    for (;;) {
        const cache_entry *e = atomic_load_explicit(&cache->slots[at], memory_order_acquire);
        if (e == NULL) {
            *empty_slot = at;
            return NULL;
        }
        if (e->hash == hash && e->length == length && memcmp(e->bytes, word, length) == 0) return e;
        at = (at + 1) & cache->mask;
    }
}

static void *cache_alloc(mb_tok_word_cache *cache, size_t size) {
    size = (size + 7) & ~(size_t)7;
    cache_chunk *chunk = cache->chunks;
    if (chunk == NULL || chunk->size - chunk->used < size) {
        size_t chunk_size = 1u << 16;
        chunk = malloc(sizeof *chunk + chunk_size);
        if (chunk == NULL) return NULL;
        chunk->next = cache->chunks;
        chunk->used = 0;
        chunk->size = chunk_size;
        cache->chunks = chunk;
    }
    void *p = chunk->data + chunk->used;
    chunk->used += size;
    return p;
}

/* Publishes a word's ids unless the cache is busy, full, or already has the word. */
static void cache_insert(mb_tok_word_cache *cache, uint64_t hash, const uint8_t *word, size_t length,
                         const int32_t *ids, size_t id_count) {
    if (id_count > length || pthread_mutex_trylock(&cache->lock) != 0) return;
    size_t slot;
    if (cache->count < cache->limit && cache_find(cache, hash, word, length, &slot) == NULL) {
        cache_entry *e = cache_alloc(cache, sizeof *e + id_count * sizeof(int32_t) + length);
        if (e != NULL) {
            char *bytes = (char *)(e->ids + id_count);
            memcpy(e->ids, ids, id_count * sizeof *ids);
            memcpy(bytes, word, length);
            e->hash = hash;
            e->length = (uint32_t)length;
            e->id_count = (uint32_t)id_count;
            e->bytes = bytes;
            atomic_store_explicit(&cache->slots[slot], e, memory_order_release);
            cache->count++;
        }
    }
    pthread_mutex_unlock(&cache->lock);
}

/* ---- merge loop ------------------------------------------------------------------------------------------------- */

typedef struct bpe_symbol {
    int32_t id;
    int32_t prev, next; /* linked list over live symbols, -1 at the ends */
    bool removed;
} bpe_symbol;

typedef struct bpe_candidate {
    uint32_t rank;
    uint32_t pos;           /* index of the left symbol */
    int32_t left, right;    /* the pair it was made for: it is stale once either symbol changed */
    int32_t merged_id;
} bpe_candidate;

struct mb_tok_bpe_scratch {
    bpe_symbol *symbols;
    size_t symbol_capacity;
    bpe_candidate *heap;
    size_t heap_count, heap_capacity;
    char *mapped;
    size_t mapped_capacity;
};

mb_tok_bpe_scratch *mb_tok_bpe_scratch_new(void) { return calloc(1, sizeof(mb_tok_bpe_scratch)); }

void mb_tok_bpe_scratch_free(mb_tok_bpe_scratch *scratch) {
    if (scratch == NULL) return;
    free(scratch->symbols);
    free(scratch->heap);
    free(scratch->mapped);
    free(scratch);
}

static int reserve(void **buffer, size_t *capacity, size_t needed, size_t element_size) {
    if (needed <= *capacity) return 0;
    size_t grown = *capacity ? *capacity : 64;
    while (grown < needed) grown *= 2;
    void *bigger = realloc(*buffer, grown * element_size);
    if (bigger == NULL) return -1;
    *buffer = bigger;
    *capacity = grown;
    return 0;
}

static bool candidate_before(const bpe_candidate *a, const bpe_candidate *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(mb_tok_bpe_scratch *s, bpe_candidate c) {
    size_t i = s->heap_count++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!candidate_before(&c, &s->heap[parent])) break;
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = c;
}

static bpe_candidate heap_pop(mb_tok_bpe_scratch *s) {
    bpe_candidate top = s->heap[0], last = s->heap[--s->heap_count];
    size_t i = 0, n = s->heap_count;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && candidate_before(&s->heap[child + 1], &s->heap[child])) child++;
        if (!candidate_before(&s->heap[child], &last)) break;
        s->heap[i] = s->heap[child];
        i = child;
    }
    if (n > 0) s->heap[i] = last;
    return top;
}

static void push_pair(const mb_tokenizer *t, mb_tok_bpe_scratch *s, size_t left) {
    const bpe_symbol *a = &s->symbols[left];
    if (a->next < 0) return;
    int32_t right = s->symbols[a->next].id;
    const mb_tok_pair_slot *pair = mb_tok_pair_map_get(&t->merges, a->id, right);
    if (pair != NULL) heap_push(s, (bpe_candidate){pair->rank, (uint32_t)left, a->id, right, pair->merged_id});
}

static void merge_all(const mb_tokenizer *t, mb_tok_bpe_scratch *s, size_t n) {
    s->heap_count = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(t, s, i);
    while (s->heap_count > 0) {
        bpe_candidate top = heap_pop(s);
        bpe_symbol *left = &s->symbols[top.pos];
        if (left->removed || left->next < 0) continue;
        bpe_symbol *right = &s->symbols[left->next];
        /* tokenizers re-checks that the current pair still merges into top.merged_id; with distinct token strings
         * that holds exactly when the pair is unchanged */
        if (left->id != top.left || right->id != top.right) continue;
        left->id = top.merged_id;
        left->next = right->next;
        right->removed = true;
        if (right->next >= 0) s->symbols[right->next].prev = (int32_t)top.pos;
        if (left->prev >= 0) push_pair(t, s, (size_t)left->prev);
        push_pair(t, s, top.pos);
    }
}

static void add_symbol(mb_tok_bpe_scratch *s, size_t *n, int32_t id) {
    size_t i = (*n)++;
    s->symbols[i] = (bpe_symbol){id, (int32_t)i - 1, -1, false};
    if (i > 0) s->symbols[i - 1].next = (int32_t)i;
}

static int lookup_whole_word(const mb_tokenizer *t, const uint8_t *word, size_t length, mb_tok_bpe_scratch *s,
                             int32_t *id) {
    if (reserve((void **)&s->mapped, &s->mapped_capacity, length * 2 + 1, 1) != 0) return -1;
    size_t w = 0;
    for (size_t i = 0; i < length; i++) w += mb_tok_utf8_encode(mb_tok_byte_to_char(word[i]), s->mapped + w);
    *id = mb_tok_str_map_get(&t->vocab, s->mapped, w);
    return 0;
}

static int bpe_uncached(const mb_tokenizer *t, const uint8_t *word, size_t length, mb_tok_bpe_scratch *s,
                        mb_token_list *out, mb_error *err);

int mb_tok_bpe_word(const mb_tokenizer *t, const uint8_t *word, size_t length, mb_tok_bpe_scratch *s,
                    mb_token_list *out, mb_error *err) {
    if (length == 0) return 0;
    if (length > MB_TOK_CACHE_MAX_WORD || t->cache == NULL) return bpe_uncached(t, word, length, s, out, err);
    uint64_t hash = mb_tok_hash_bytes(word, length);
    size_t slot;
    const cache_entry *hit = cache_find(t->cache, hash, word, length, &slot);
    if (hit != NULL) {
        for (uint32_t i = 0; i < hit->id_count; i++)
            if (mb_tok_list_push(out, hit->ids[i]) != 0) return mb_fail(err, "out of memory appending ids");
        return 0;
    }
    size_t before = out->count;
    if (bpe_uncached(t, word, length, s, out, err) != 0) return -1;
    cache_insert(t->cache, hash, word, length, out->ids + before, out->count - before);
    return 0;
}

static int bpe_uncached(const mb_tokenizer *t, const uint8_t *word, size_t length, mb_tok_bpe_scratch *s,
                        mb_token_list *out, mb_error *err) {
    if (t->ignore_merges) {
        int32_t id;
        if (lookup_whole_word(t, word, length, s, &id) != 0) return mb_fail(err, "out of memory in BPE");
        if (id >= 0) return mb_tok_list_push(out, id) == 0 ? 0 : mb_fail(err, "out of memory appending ids");
    }
    if (reserve((void **)&s->symbols, &s->symbol_capacity, length, sizeof *s->symbols) != 0 ||
        reserve((void **)&s->heap, &s->heap_capacity, 2 * length + 2, sizeof *s->heap) != 0)
        return mb_fail(err, "out of memory in BPE (word of %zu bytes)", length);
    size_t n = 0;
    bool unk_pending = false;
    for (size_t i = 0; i < length; i++) {
        int32_t id = t->byte_ids[word[i]];
        if (id >= 0) {
            if (unk_pending) add_symbol(s, &n, t->unk_id);
            unk_pending = false;
            add_symbol(s, &n, id);
        } else if (t->unk_missing) {
            return mb_fail(err, "%s: model.unk_token \"%s\" is not in model.vocab (needed for byte 0x%02X)", t->path,
                           t->unk_token, word[i]);
        } else if (t->unk_id >= 0) {
            if (unk_pending && !t->fuse_unk) add_symbol(s, &n, t->unk_id);
            unk_pending = true;
        }
        /* No unk token: the byte is dropped, as merge_word does. */
    }
    if (unk_pending) add_symbol(s, &n, t->unk_id);
    if (n > 1) merge_all(t, s, n);
    for (size_t i = 0; i < n; i = s->symbols[i].next < 0 ? n : (size_t)s->symbols[i].next)
        if (mb_tok_list_push(out, s->symbols[i].id) != 0) return mb_fail(err, "out of memory appending ids");
    return 0;
}
