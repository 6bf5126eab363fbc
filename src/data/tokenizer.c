/* Encoding and decoding with a loaded tokenizer.json (the pipeline of huggingface/tokenizers for byte-level BPE).
 *
 * encode(text):
 *   1. invalid UTF-8 is repaired: each maximal invalid subsequence becomes U+FFFD (Python's errors='replace');
 *   2. added tokens with normalized=false are split out of the raw text (added_vocabulary.rs::find_matches:
 *      leftmost-longest matches, non-overlapping; single_word drops a match touching a \w character; lstrip / rstrip
 *      absorb the adjacent whitespace);
 *   3. every remaining piece is normalized (NFC or nothing), then added tokens with normalized=true are split out
 *      of it;
 *   4. every remaining piece goes through the pre-tokenizer (ByteLevel: optional prefix space, GPT-2 split), and each
 *      word through BPE (tokenizer_bpe.c).
 * decode(ids): each id's token (added token content, else model token); the ByteLevel decoder maps every token back to
 * bytes (a token with a character outside the byte alphabet is kept as its UTF-8), and the concatenation is read as
 * lossy UTF-8 (String::from_utf8_lossy). Ids outside the vocabulary are skipped, as tokenizers does. */
#include "data/tokenizer.h"

#include <stdlib.h>
#include <string.h>

#include "common/fileio.h"
#include "data/tokenizer_internal.h"

/* ---- token lists ------------------------------------------------------------------------------------------------ */

int mb_tok_list_push(mb_token_list *list, int32_t id) {
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? list->capacity * 2 : 256;
        int32_t *bigger = realloc(list->ids, capacity * sizeof *bigger);
        if (bigger == NULL) return -1;
        list->ids = bigger;
        list->capacity = capacity;
    }
    list->ids[list->count++] = id;
    return 0;
}

static int list_append(mb_token_list *list, const int32_t *ids, size_t count) {
    for (size_t i = 0; i < count; i++)
        if (mb_tok_list_push(list, ids[i]) != 0) return -1;
    return 0;
}

void mb_token_list_free(mb_token_list *list) {
    if (list == NULL) return;
    free(list->ids);
    list->ids = NULL;
    list->count = list->capacity = 0;
}

/* ---- load / free ------------------------------------------------------------------------------------------------ */

static void free_trie(mb_tok_trie *trie) {
    for (size_t i = 0; i < trie->pattern_count; i++) free(trie->patterns[i]);
    free(trie->patterns);
    free(trie->nodes);
}

static void free_template(mb_tok_template *tpl) {
    for (size_t i = 0; i < tpl->count; i++) free(tpl->pieces[i].ids);
    free(tpl->pieces);
}

void mb_tokenizer_free(mb_tokenizer *t) {
    if (t == NULL) return;
    mb_tok_str_map_free(&t->vocab);
    free(t->vocab_arena);
    free(t->vocab_strings);
    free(t->vocab_lengths);
    mb_tok_pair_map_free(&t->merges);
    free(t->merge_list);
    free(t->unk_token);
    for (size_t i = 0; i < t->added_count; i++) free(t->added[i].content);
    free(t->added);
    mb_tok_str_map_free(&t->added_by_content);
    free(t->added_index_by_id);
    free_trie(&t->raw_trie);
    free_trie(&t->normalized_trie);
    free_template(&t->single);
    free_template(&t->pair);
    if (t->decoded != NULL)
        for (int32_t id = 0; id < t->id_limit; id++) free(t->decoded[id]);
    free(t->decoded);
    free(t->decoded_lengths);
    mb_tok_word_cache_free(t->cache);
    free(t->path);
    free(t);
}

int mb_tokenizer_load(mb_tokenizer **tokenizer, const char *path, mb_error *err) {
    *tokenizer = NULL;
    char *text;
    size_t size;
    if (mb_read_file(path, &text, &size, err) != 0) return -1;
    mb_tokenizer *t = calloc(1, sizeof *t);
    if (t == NULL || (t->path = strdup(path)) == NULL) {
        free(text);
        free(t);
        return mb_fail(err, "out of memory loading %s", path);
    }
    int rc = mb_tok_load_json(t, text, size, path, err);
    free(text);
    if (rc == 0 && (t->cache = mb_tok_word_cache_new(1u << 17)) == NULL)
        rc = mb_fail(err, "out of memory loading %s", path);
    if (rc != 0) {
        mb_tokenizer_free(t);
        return -1;
    }
    *tokenizer = t;
    return 0;
}

/* ---- encode ----------------------------------------------------------------------------------------------------- */

typedef struct encode_ctx {
    const mb_tokenizer *t;
    mb_token_list *out;
    mb_error *err;
    mb_tok_bpe_scratch *bpe;
    char *prefixed; /* a piece with the ByteLevel prefix space */
    size_t prefixed_capacity;
} encode_ctx;

typedef int (*piece_fn)(encode_ctx *c, const char *s, size_t length);

/* Start of the run of whitespace that ends at s + end (Rust regex `\s*$` on s[..end]). */
static size_t trailing_space_start(const char *s, size_t end) {
    while (end > 0) {
        size_t start = end - 1;
        while (start > 0 && ((unsigned char)s[start] & 0xC0) == 0x80) start--;
        uint32_t cp;
        mb_tok_utf8_decode((const uint8_t *)s + start, end - start, &cp);
        if (!mb_tok_is_whitespace(cp)) break;
        end = start;
    }
    return end;
}

/* Length of the run of whitespace at the start of s (`^\s*`). */
static size_t leading_space_length(const char *s, size_t length) {
    size_t i = 0;
    while (i < length) {
        uint32_t cp;
        size_t n = mb_tok_utf8_decode((const uint8_t *)s + i, length - i, &cp);
        if (!mb_tok_is_whitespace(cp)) break;
        i += n;
    }
    return i;
}

static bool word_char_before(const char *s, size_t end) {
    if (end == 0) return false;
    size_t start = end - 1;
    while (start > 0 && ((unsigned char)s[start] & 0xC0) == 0x80) start--;
    uint32_t cp;
    mb_tok_utf8_decode((const uint8_t *)s + start, end - start, &cp);
    return mb_tok_is_word_char(cp);
}

static bool word_char_at(const char *s, size_t length) {
    if (length == 0) return false;
    uint32_t cp;
    mb_tok_utf8_decode((const uint8_t *)s, length, &cp);
    return mb_tok_is_word_char(cp);
}

/* The longest pattern of the trie starting at s[pos]: its token index, or -1. */
static int32_t longest_match(const mb_tok_trie *trie, const char *s, size_t length, size_t pos, size_t *end) {
    int32_t node = trie->root_child[(unsigned char)s[pos]], best = -1;
    size_t i = pos + 1;
    while (node >= 0) {
        if (trie->nodes[node].token >= 0) {
            best = trie->nodes[node].token;
            *end = i;
        }
        if (i == length) break;
        unsigned char byte = (unsigned char)s[i++];
        node = trie->nodes[node].first_child;
        while (node >= 0 && trie->nodes[node].byte != byte) node = trie->nodes[node].next_sibling;
    }
    return best;
}

/* AddedVocabulary::find_matches: emits the added tokens found in s and passes the pieces between them to `gap`. */
static int split_on_added(encode_ctx *c, const mb_tok_trie *trie, const char *s, size_t length, piece_fn gap) {
    if (trie->node_count == 0) return length > 0 ? gap(c, s, length) : 0;
    size_t start_offset = 0, pos = 0;
    while (pos < length) {
        size_t match_end = 0;
        bool candidate = trie->root_child[(unsigned char)s[pos]] >= 0;
        int32_t index = candidate ? longest_match(trie, s, length, pos, &match_end) : -1;
        if (index < 0) {
            pos++;
            continue;
        }
        size_t start = pos, stop = match_end;
        pos = match_end; /* the automaton resumes after the match, whether or not it is kept */
        const mb_tok_added_token *token = &c->t->added[index];
        if (token->single_word && (word_char_before(s, start) || word_char_at(s + stop, length - stop))) continue;
        if (token->lstrip) {
            size_t new_start = trailing_space_start(s, start);
            start = new_start > start_offset ? new_start : start_offset;
        }
        if (token->rstrip) stop += leading_space_length(s + stop, length - stop);
        if (start_offset < start && gap(c, s + start_offset, start - start_offset) != 0) return -1;
        if (mb_tok_list_push(c->out, token->id) != 0) return mb_fail(c->err, "out of memory appending ids");
        start_offset = stop;
    }
    if (start_offset < length) return gap(c, s + start_offset, length - start_offset);
    return 0;
}

static int bpe_word(encode_ctx *c, const char *s, size_t length) {
    return mb_tok_bpe_word(c->t, (const uint8_t *)s, length, c->bpe, c->out, c->err);
}

static int gpt2_words(encode_ctx *c, const char *s, size_t length, size_t next_stage);

/* Runs pre-tokenizer stage `stage` (and the ones after it) on a piece. */
static int run_pretok(encode_ctx *c, const char *s, size_t length, size_t stage) {
    if (length == 0) return 0;
    const mb_tok_pretok_stage *st = &c->t->pretok[stage];
    if (st->is_split) return gpt2_words(c, s, length, stage + 1);
    if (st->add_prefix_space && s[0] != ' ') {
        if (length + 1 > c->prefixed_capacity) {
            size_t capacity = (length + 1) * 2;
            char *bigger = realloc(c->prefixed, capacity);
            if (bigger == NULL) return mb_fail(c->err, "out of memory in pre-tokenization");
            c->prefixed = bigger;
            c->prefixed_capacity = capacity;
        }
        c->prefixed[0] = ' ';
        memcpy(c->prefixed + 1, s, length);
        s = c->prefixed;
        length++;
    }
    if (st->use_regex) return gpt2_words(c, s, length, SIZE_MAX);
    return bpe_word(c, s, length);
}

/* Splits with the GPT-2 pattern; each word goes to stage next_stage, or to BPE when SIZE_MAX. */
static int gpt2_words(encode_ctx *c, const char *s, size_t length, size_t next_stage) {
    size_t pos = 0;
    while (pos < length) {
        size_t n = mb_tok_gpt2_match((const uint8_t *)s + pos, length - pos);
        int rc = next_stage == SIZE_MAX ? bpe_word(c, s + pos, n) : run_pretok(c, s + pos, n, next_stage);
        if (rc != 0) return -1;
        pos += n;
    }
    return 0;
}

static int pretokenize_piece(encode_ctx *c, const char *s, size_t length) { return run_pretok(c, s, length, 0); }

static bool is_ascii(const char *s, size_t length) {
    for (size_t i = 0; i < length; i++)
        if ((unsigned char)s[i] >= 0x80) return false;
    return true;
}

static int normalize_piece(encode_ctx *c, const char *s, size_t length) {
    if (c->t->normalizer == MB_TOK_NORMALIZER_NONE || is_ascii(s, length)) /* ASCII is its own NFC */
        return split_on_added(c, &c->t->normalized_trie, s, length, pretokenize_piece);
    char *normalized;
    size_t normalized_length;
    if (mb_tok_nfc(s, length, &normalized, &normalized_length, c->err) != 0) return -1;
    int rc = split_on_added(c, &c->t->normalized_trie, normalized, normalized_length, pretokenize_piece);
    free(normalized);
    return rc;
}

int mb_tokenizer_encode(const mb_tokenizer *t, const char *text, size_t length, mb_token_list *out, mb_error *err) {
    if (length == 0) return 0;
    char *repaired = NULL;
    if (mb_tok_utf8_valid_prefix((const uint8_t *)text, length) != length) {
        if (mb_tok_utf8_sanitize((const uint8_t *)text, length, &repaired, &length) != 0)
            return mb_fail(err, "out of memory repairing %zu bytes of UTF-8", length);
        text = repaired;
    }
    encode_ctx c = {t, out, err, mb_tok_bpe_scratch_new(), NULL, 0};
    int rc = c.bpe == NULL ? mb_fail(err, "out of memory encoding") : split_on_added(&c, &t->raw_trie, text, length,
                                                                                      normalize_piece);
    mb_tok_bpe_scratch_free(c.bpe);
    free(c.prefixed);
    free(repaired);
    return rc;
}

int mb_tokenizer_encode_template(const mb_tokenizer *t, const char *a, size_t a_length, const char *b,
                                 size_t b_length, mb_token_list *out, mb_error *err) {
    mb_token_list first = {0}, second = {0};
    int rc = -1;
    if (mb_tokenizer_encode(t, a, a_length, &first, err) != 0) goto done;
    if (b != NULL && mb_tokenizer_encode(t, b, b_length, &second, err) != 0) goto done;
    if (!t->has_template) {
        rc = list_append(out, first.ids, first.count) == 0 && list_append(out, second.ids, second.count) == 0
                 ? 0
                 : mb_fail(err, "out of memory appending ids");
        goto done;
    }
    const mb_tok_template *tpl = b == NULL ? &t->single : &t->pair;
    for (size_t i = 0; i < tpl->count; i++) {
        const mb_tok_piece *piece = &tpl->pieces[i];
        const int32_t *ids = piece->kind == MB_TOK_PIECE_A ? first.ids : piece->kind == MB_TOK_PIECE_B ? second.ids
                                                                                                     : piece->ids;
        size_t count = piece->kind == MB_TOK_PIECE_A   ? first.count
                       : piece->kind == MB_TOK_PIECE_B ? second.count
                                                       : piece->id_count;
        if (list_append(out, ids, count) != 0) {
            mb_fail(err, "out of memory appending ids");
            goto done;
        }
    }
    rc = 0;
done:
    mb_token_list_free(&first);
    mb_token_list_free(&second);
    return rc;
}

/* ---- decode ----------------------------------------------------------------------------------------------------- */

int mb_tokenizer_decode(const mb_tokenizer *t, const int32_t *ids, size_t count, int skip_special, char **text,
                        mb_error *err) {
    size_t length;
    return mb_tokenizer_decode_length(t, ids, count, skip_special, text, &length, err);
}

int mb_tokenizer_decode_length(const mb_tokenizer *t, const int32_t *ids, size_t count, int skip_special, char **text,
                               size_t *length, mb_error *err) {
    *text = NULL;
    *length = 0;
    size_t total = 1;
    for (size_t i = 0; i < count; i++)
        if (ids[i] >= 0 && ids[i] < t->id_limit && t->decoded[ids[i]] != NULL) total += t->decoded_lengths[ids[i]] + 1;
    char *bytes = malloc(total);
    if (bytes == NULL) return mb_fail(err, "out of memory decoding %zu ids", count);
    size_t n = 0;
    bool first = true;
    for (size_t i = 0; i < count; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->id_limit || t->decoded[id] == NULL) continue;
        if (skip_special && mb_tokenizer_is_special(t, id)) continue;
        if (t->decoder == MB_TOK_DECODER_NONE && !first) bytes[n++] = ' '; /* tokens.join(" ") */
        memcpy(bytes + n, t->decoded[id], t->decoded_lengths[id]);
        n += t->decoded_lengths[id];
        first = false;
    }
    int rc = mb_tok_utf8_sanitize((const uint8_t *)bytes, n, text, length);
    free(bytes);
    return rc == 0 ? 0 : mb_fail(err, "out of memory decoding %zu ids", count);
}

/* ---- queries ---------------------------------------------------------------------------------------------------- */

int mb_tokenizer_vocab_size(const mb_tokenizer *t) { return t->id_limit; }

int32_t mb_tokenizer_token_to_id(const mb_tokenizer *t, const char *token) {
    size_t length = strlen(token);
    int32_t added = mb_tok_str_map_get(&t->added_by_content, token, length);
    if (added >= 0) return t->added[added].id;
    return mb_tok_str_map_get(&t->vocab, token, length);
}

int mb_tokenizer_is_special(const mb_tokenizer *t, int32_t id) {
    if (id < 0 || id >= t->id_limit) return 0;
    int32_t added = t->added_index_by_id[id];
    return added >= 0 && t->added[added].special;
}

uint64_t mb_tokenizer_fingerprint(const mb_tokenizer *t) { return t->fingerprint; }

mb_special_ids mb_tokenizer_special_ids(const mb_tokenizer *t) {
    return (mb_special_ids){mb_tokenizer_token_to_id(t, "[CLS]"), mb_tokenizer_token_to_id(t, "[SEP]"),
                            mb_tokenizer_token_to_id(t, "[PAD]"), mb_tokenizer_token_to_id(t, "[MASK]"),
                            mb_tokenizer_token_to_id(t, "[UNK]")};
}
