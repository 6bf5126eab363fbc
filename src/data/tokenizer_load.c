/* Reading a Hugging Face tokenizer.json (tokenizers serialization "1.0") into an mb_tokenizer.
 *
 * Supported: model BPE (vocab {token: id}; merges as "a b" strings or ["a", "b"] pairs, rank = index after dropping
 * "#version" lines; unk_token, fuse_unk, ignore_merges; no dropout, byte_fallback or subword prefix/suffix), normalizer
 * null / NFC / Sequence of NFC, pre_tokenizer ByteLevel or Sequence [Split(GPT-2 pattern, Isolated), ByteLevel],
 * post_processor null / TemplateProcessing / BertProcessing / RobertaProcessing / ByteLevel / Sequence of those,
 * decoder null / ByteLevel. Anything else is an error naming the file and the JSON field.
 *
 * Added tokens get their ids the way added_vocabulary.rs::add_tokens assigns them (model id when the content is in
 * the model vocabulary, else the next id after max(model vocab size, largest added id)), which is what the file's
 * "id" holds for any file tokenizers wrote. */
#include "data/tokenizer_internal.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The GPT-2 pattern as it appears (JSON-decoded) in a Split pre-tokenizer. */
static const char gpt2_pattern[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

typedef struct load_ctx {
    mb_tokenizer *t;
    const char *path;
    mb_error *err;
} load_ctx;

/* ---- JSON field helpers ----------------------------------------------------------------------------------------- */

static const cJSON *field(const cJSON *object, const char *name) {
    return cJSON_IsObject(object) ? cJSON_GetObjectItemCaseSensitive(object, name) : NULL;
}

static bool is_absent(const cJSON *item) { return item == NULL || cJSON_IsNull(item); }

static int get_bool(load_ctx *c, const cJSON *object, const char *name, bool fallback, bool *out, const char *where) {
    const cJSON *item = field(object, name);
    if (is_absent(item)) {
        *out = fallback;
        return 0;
    }
    if (!cJSON_IsBool(item)) return mb_fail(c->err, "%s: %s.%s: expected true or false", c->path, where, name);
    *out = cJSON_IsTrue(item);
    return 0;
}

static int get_id(load_ctx *c, const cJSON *item, int32_t *out, const char *where_format, const char *where_arg) {
    double v = cJSON_IsNumber(item) ? item->valuedouble : -1.0;
    if (!(v >= 0 && v <= 2147483647.0 && v == floor(v))) {
        char where[512];
        snprintf(where, sizeof where, where_format, where_arg);
        return mb_fail(c->err, "%s: %s: expected a non-negative integer id", c->path, where);
    }
    *out = (int32_t)v;
    return 0;
}

static const char *type_of(const cJSON *object) {
    const cJSON *type = field(object, "type");
    return cJSON_IsString(type) ? type->valuestring : NULL;
}

static char *copy_bytes(const char *s, size_t length) {
    char *copy = malloc(length + 1);
    if (copy != NULL) {
        memcpy(copy, s, length);
        copy[length] = '\0';
    }
    return copy;
}

/* ---- model ------------------------------------------------------------------------------------------------------ */

static int load_vocab(load_ctx *c, const cJSON *vocab) {
    mb_tokenizer *t = c->t;
    if (!cJSON_IsObject(vocab)) return mb_fail(c->err, "%s: model.vocab: expected an object {token: id}", c->path);
    size_t count = (size_t)cJSON_GetArraySize(vocab), arena_size = 0;
    if (mb_tok_str_map_init(&t->vocab, count) != 0) return mb_fail(c->err, "out of memory reading %s", c->path);
    const cJSON *entry;
    int32_t limit = 0;
    cJSON_ArrayForEach(entry, vocab) {
        int32_t id = 0;
        if (get_id(c, entry, &id, "model.vocab[\"%s\"]", entry->string) != 0) return -1;
        if (id >= limit) limit = id + 1;
        arena_size += strlen(entry->string) + 1;
    }
    t->vocab_id_limit = limit;
    t->vocab_arena = malloc(arena_size + 1);
    t->vocab_strings = calloc((size_t)limit + 1, sizeof *t->vocab_strings);
    t->vocab_lengths = calloc((size_t)limit + 1, sizeof *t->vocab_lengths);
    if (t->vocab_arena == NULL || t->vocab_strings == NULL || t->vocab_lengths == NULL)
        return mb_fail(c->err, "out of memory reading %s", c->path);
    char *next = t->vocab_arena;
    cJSON_ArrayForEach(entry, vocab) {
        int32_t id = (int32_t)entry->valuedouble;
        size_t length = strlen(entry->string);
        memcpy(next, entry->string, length + 1);
        /* Repeated keys or ids: the later entry wins, as building a HashMap with collect() does. */
        t->vocab_strings[id] = next;
        t->vocab_lengths[id] = (uint32_t)length;
        if (mb_tok_str_map_put(&t->vocab, next, length, id) != 0)
            return mb_fail(c->err, "out of memory reading %s", c->path);
        next += length + 1;
    }
    t->vocab_entries = t->vocab.count;
    return 0;
}

static int add_merge(load_ctx *c, const char *a, const char *b, size_t index) {
    mb_tokenizer *t = c->t;
    size_t la = strlen(a), lb = strlen(b);
    int32_t ia = mb_tok_str_map_get(&t->vocab, a, la), ib = mb_tok_str_map_get(&t->vocab, b, lb);
    const char *missing = ia < 0 ? a : ib < 0 ? b : NULL;
    if (missing != NULL)
        return mb_fail(c->err, "%s: model.merges[%zu]: token \"%s\" is not in model.vocab", c->path, index, missing);
    char small[256];
    char *joined = la + lb < sizeof small ? small : malloc(la + lb + 1);
    if (joined == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
    memcpy(joined, a, la);
    memcpy(joined + la, b, lb);
    int32_t merged = mb_tok_str_map_get(&t->vocab, joined, la + lb);
    if (merged < 0) {
        joined[la + lb] = '\0';
        mb_fail(c->err, "%s: model.merges[%zu]: merged token \"%s\" is not in model.vocab", c->path, index, joined);
    }
    if (joined != small) free(joined);
    if (merged < 0) return -1;
    t->merge_list[t->merge_count][0] = ia;
    t->merge_list[t->merge_count][1] = ib;
    if (mb_tok_pair_map_put(&t->merges, ia, ib, (uint32_t)t->merge_count, merged) != 0)
        return mb_fail(c->err, "out of memory reading %s", c->path);
    t->merge_count++;
    return 0;
}

static int load_merges(load_ctx *c, const cJSON *merges) {
    mb_tokenizer *t = c->t;
    if (!cJSON_IsArray(merges)) return mb_fail(c->err, "%s: model.merges: expected an array", c->path);
    size_t count = (size_t)cJSON_GetArraySize(merges);
    t->merge_list = malloc((count + 1) * sizeof *t->merge_list);
    if (t->merge_list == NULL || mb_tok_pair_map_init(&t->merges, count) != 0)
        return mb_fail(c->err, "out of memory reading %s", c->path);
    const cJSON *item;
    size_t index = 0;
    cJSON_ArrayForEach(item, merges) {
        if (cJSON_IsString(item)) {
            /* Legacy "a b": "#version" lines are skipped; otherwise exactly one space (convert_merges_to_hashmap). */
            const char *line = item->valuestring;
            if (strncmp(line, "#version", 8) == 0) {
                index++;
                continue;
            }
            const char *space = strchr(line, ' ');
            if (space == NULL || strchr(space + 1, ' ') != NULL)
                return mb_fail(c->err, "%s: model.merges[%zu]: \"%s\" is not two tokens separated by one space",
                               c->path, index, line);
            char *left = copy_bytes(line, (size_t)(space - line));
            if (left == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
            int rc = add_merge(c, left, space + 1, index);
            free(left);
            if (rc != 0) return -1;
        } else if (cJSON_IsArray(item) && cJSON_GetArraySize(item) == 2 && cJSON_IsString(item->child) &&
                   cJSON_IsString(item->child->next)) {
            if (add_merge(c, item->child->valuestring, item->child->next->valuestring, index) != 0) return -1;
        } else {
            return mb_fail(c->err, "%s: model.merges[%zu]: expected \"a b\" or [\"a\", \"b\"]", c->path, index);
        }
        index++;
    }
    return 0;
}

static int check_unsupported_model_options(load_ctx *c, const cJSON *model) {
    const cJSON *dropout = field(model, "dropout");
    if (!is_absent(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0.0))
        return mb_fail(c->err, "%s: model.dropout: BPE dropout is not supported (expected null)", c->path);
    const char *affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *item = field(model, affixes[i]);
        if (!is_absent(item) && !(cJSON_IsString(item) && item->valuestring[0] == '\0'))
            return mb_fail(c->err, "%s: model.%s: not supported for byte-level BPE (expected null)", c->path,
                           affixes[i]);
    }
    bool byte_fallback = false;
    if (get_bool(c, model, "byte_fallback", false, &byte_fallback, "model") != 0) return -1;
    if (byte_fallback) return mb_fail(c->err, "%s: model.byte_fallback: true is not supported", c->path);
    return 0;
}

static int load_model(load_ctx *c, const cJSON *root) {
    mb_tokenizer *t = c->t;
    const cJSON *model = field(root, "model");
    if (!cJSON_IsObject(model)) return mb_fail(c->err, "%s: model: missing or not an object", c->path);
    const char *type = type_of(model);
    if (type != NULL && strcmp(type, "BPE") != 0)
        return mb_fail(c->err, "%s: model.type: \"%s\" is not supported (only BPE)", c->path, type);
    if (check_unsupported_model_options(c, model) != 0) return -1;
    if (get_bool(c, model, "fuse_unk", false, &t->fuse_unk, "model") != 0 ||
        get_bool(c, model, "ignore_merges", false, &t->ignore_merges, "model") != 0)
        return -1;
    if (load_vocab(c, field(model, "vocab")) != 0 || load_merges(c, field(model, "merges")) != 0) return -1;
    const cJSON *unk = field(model, "unk_token");
    t->unk_id = -1;
    if (cJSON_IsString(unk)) {
        t->unk_token = copy_bytes(unk->valuestring, strlen(unk->valuestring));
        if (t->unk_token == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
        t->unk_id = mb_tok_str_map_get(&t->vocab, unk->valuestring, strlen(unk->valuestring));
        t->unk_missing = t->unk_id < 0; /* tokenizers only fails when an unknown byte needs it */
    } else if (!is_absent(unk)) {
        return mb_fail(c->err, "%s: model.unk_token: expected a string or null", c->path);
    }
    for (int b = 0; b < 256; b++) {
        char symbol[4];
        size_t length = mb_tok_utf8_encode(mb_tok_byte_to_char((uint8_t)b), symbol);
        t->byte_ids[b] = mb_tok_str_map_get(&t->vocab, symbol, length);
    }
    return 0;
}

/* ---- normalizer and pre-tokenizer ------------------------------------------------------------------------------- */

static int load_normalizer(load_ctx *c, const cJSON *root) {
    const cJSON *normalizer = field(root, "normalizer");
    c->t->normalizer = MB_TOK_NORMALIZER_NONE;
    if (is_absent(normalizer)) return 0;
    const char *type = type_of(normalizer);
    if (type != NULL && strcmp(type, "NFC") == 0) {
        c->t->normalizer = MB_TOK_NORMALIZER_NFC;
        return 0;
    }
    if (type != NULL && strcmp(type, "Sequence") == 0) {
        const cJSON *list = field(normalizer, "normalizers"), *item;
        if (!cJSON_IsArray(list)) return mb_fail(c->err, "%s: normalizer.normalizers: expected an array", c->path);
        size_t index = 0;
        cJSON_ArrayForEach(item, list) {
            const char *inner = type_of(item);
            if (inner == NULL || strcmp(inner, "NFC") != 0)
                return mb_fail(c->err, "%s: normalizer.normalizers[%zu].type: \"%s\" is not supported (only NFC)",
                               c->path, index, inner ? inner : "(missing)");
            c->t->normalizer = MB_TOK_NORMALIZER_NFC;
            index++;
        }
        return 0;
    }
    return mb_fail(c->err, "%s: normalizer.type: \"%s\" is not supported (only null, NFC, or a Sequence of NFC)",
                   c->path, type ? type : "(missing)");
}

static int load_byte_level(load_ctx *c, const cJSON *item, const char *where, mb_tok_pretok_stage *stage) {
    stage->is_split = false;
    if (!cJSON_IsBool(field(item, "add_prefix_space"))) /* required by tokenizers too */
        return mb_fail(c->err, "%s: %s.add_prefix_space: missing (expected true or false)", c->path, where);
    return get_bool(c, item, "add_prefix_space", true, &stage->add_prefix_space, where) != 0 ||
                   get_bool(c, item, "use_regex", true, &stage->use_regex, where) != 0
               ? -1
               : 0;
}

static int load_split(load_ctx *c, const cJSON *item, const char *where, mb_tok_pretok_stage *stage) {
    const cJSON *pattern = field(field(item, "pattern"), "Regex");
    const cJSON *behavior = field(item, "behavior");
    bool invert = false;
    if (get_bool(c, item, "invert", false, &invert, where) != 0) return -1;
    if (!cJSON_IsString(pattern) || strcmp(pattern->valuestring, gpt2_pattern) != 0)
        return mb_fail(c->err, "%s: %s.pattern: only the GPT-2 pattern {\"Regex\": \"%s\"} is supported", c->path,
                       where, gpt2_pattern);
    if (!cJSON_IsString(behavior) || strcmp(behavior->valuestring, "Isolated") != 0 || invert)
        return mb_fail(c->err, "%s: %s: only behavior \"Isolated\" with invert false is supported", c->path, where);
    stage->is_split = true;
    return 0;
}

static int load_pre_tokenizer(load_ctx *c, const cJSON *root) {
    mb_tokenizer *t = c->t;
    const cJSON *pre = field(root, "pre_tokenizer");
    const char *type = type_of(pre);
    t->pretok_count = 0;
    if (type != NULL && strcmp(type, "ByteLevel") == 0) {
        t->pretok_count = 1;
        return load_byte_level(c, pre, "pre_tokenizer", &t->pretok[0]);
    }
    if (type != NULL && strcmp(type, "Sequence") == 0) {
        const cJSON *list = field(pre, "pretokenizers"), *item;
        if (!cJSON_IsArray(list)) return mb_fail(c->err, "%s: pre_tokenizer.pretokenizers: expected an array", c->path);
        int n = cJSON_GetArraySize(list), index = 0;
        cJSON_ArrayForEach(item, list) {
            char where[64];
            snprintf(where, sizeof where, "pre_tokenizer.pretokenizers[%d]", index);
            const char *inner = type_of(item);
            bool last = index == n - 1;
            if (last && inner != NULL && strcmp(inner, "ByteLevel") == 0) {
                if (load_byte_level(c, item, where, &t->pretok[t->pretok_count]) != 0) return -1;
            } else if (!last && index == 0 && inner != NULL && strcmp(inner, "Split") == 0) {
                if (load_split(c, item, where, &t->pretok[t->pretok_count]) != 0) return -1;
            } else {
                return mb_fail(c->err,
                               "%s: %s.type: \"%s\" is not supported here (expected [Split(GPT-2), ByteLevel] or "
                               "[ByteLevel])",
                               c->path, where, inner ? inner : "(missing)");
            }
            t->pretok_count++;
            index++;
        }
        if (t->pretok_count > 0) return 0;
    }
    return mb_fail(c->err, "%s: pre_tokenizer: \"%s\" is not supported (expected ByteLevel, or a Sequence of the GPT-2 "
                   "Split and ByteLevel)",
                   c->path, type ? type : "null");
}

/* ---- added tokens ----------------------------------------------------------------------------------------------- */

/* The tokens in the order tokenizers builds its matchers: special tokens (first occurrence of each content) then
 * the others, each with the `normalized` flag of that list entry. */
typedef struct trie_entry {
    size_t added_index;
    bool normalized;
} trie_entry;

typedef struct trie_lists {
    trie_entry *special, *other;
    size_t special_count, other_count;
} trie_lists;

static int32_t next_added_id(const mb_tokenizer *t, int32_t max_added) {
    int32_t vocab_size = (int32_t)t->vocab_entries;
    if (max_added < 0) return vocab_size;
    return (max_added >= vocab_size || vocab_size == 0) ? max_added + 1 : vocab_size;
}

static bool same_flags(const mb_tok_added_token *a, const mb_tok_added_token *b) {
    return a->single_word == b->single_word && a->lstrip == b->lstrip && a->rstrip == b->rstrip &&
           a->normalized == b->normalized;
}

static int read_added_token(load_ctx *c, const cJSON *item, size_t index, mb_tok_added_token *token, bool *special) {
    char where[64];
    snprintf(where, sizeof where, "added_tokens[%zu]", index);
    const cJSON *content = field(item, "content");
    if (!cJSON_IsString(content)) return mb_fail(c->err, "%s: %s.content: expected a string", c->path, where);
    token->content = (char *)content->valuestring; /* borrowed until copied */
    token->content_length = strlen(content->valuestring);
    if (get_bool(c, item, "single_word", false, &token->single_word, where) != 0 ||
        get_bool(c, item, "lstrip", false, &token->lstrip, where) != 0 ||
        get_bool(c, item, "rstrip", false, &token->rstrip, where) != 0 ||
        get_bool(c, item, "normalized", true, &token->normalized, where) != 0 ||
        get_bool(c, item, "special", false, special, where) != 0)
        return -1;
    const cJSON *id = field(item, "id");
    int32_t ignored;
    if (!is_absent(id) && get_id(c, id, &ignored, "%s.id", where) != 0) return -1;
    return 0;
}

/* One entry of added_tokens, as AddedVocabulary::add_tokens treats it: an entry identical to one already added is
 * ignored; a repeated content keeps its id and takes the new flags; a special entry joins the special set once. */
static int add_one_token(load_ctx *c, const mb_tok_added_token *given, bool special, int32_t *max_added,
                         trie_lists *lists) {
    mb_tokenizer *t = c->t;
    if (given->content_length == 0) return 0;
    int32_t existing = mb_tok_str_map_get(&t->added_by_content, given->content, given->content_length);
    if (existing >= 0) {
        mb_tok_added_token *old = &t->added[existing];
        if (special && !old->special) {
            lists->special[lists->special_count++] = (trie_entry){(size_t)existing, given->normalized};
            old->special = true;
        }
        if (same_flags(old, given) && old->declared_special == special) return 0;
        old->single_word = given->single_word;
        old->lstrip = given->lstrip;
        old->rstrip = given->rstrip;
        old->normalized = given->normalized;
        old->declared_special = special;
        if (!old->special) lists->other[lists->other_count++] = (trie_entry){(size_t)existing, given->normalized};
        return 0;
    }
    size_t index = t->added_count++;
    mb_tok_added_token *token = &t->added[index];
    *token = *given;
    token->special = token->declared_special = special;
    token->content = copy_bytes(given->content, given->content_length);
    if (token->content == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
    int32_t model_id = mb_tok_str_map_get(&t->vocab, token->content, token->content_length);
    token->id = model_id >= 0 ? model_id : next_added_id(t, *max_added);
    if (token->id > *max_added) *max_added = token->id;
    if (mb_tok_str_map_put(&t->added_by_content, token->content, token->content_length, (int32_t)index) != 0)
        return mb_fail(c->err, "out of memory reading %s", c->path);
    trie_entry entry = {index, given->normalized};
    if (special)
        lists->special[lists->special_count++] = entry;
    else
        lists->other[lists->other_count++] = entry;
    return 0;
}

static int trie_add_node(mb_tok_trie *trie, uint8_t byte) {
    if (trie->node_count == trie->node_capacity) {
        size_t capacity = trie->node_capacity ? trie->node_capacity * 2 : 64;
        mb_tok_trie_node *bigger = realloc(trie->nodes, capacity * sizeof *bigger);
        if (bigger == NULL) return -1;
        trie->nodes = bigger;
        trie->node_capacity = capacity;
    }
    trie->nodes[trie->node_count] = (mb_tok_trie_node){-1, -1, -1, byte};
    return (int)trie->node_count++;
}

/* Inserts a pattern; the first token inserted for a pattern keeps it (the lowest Aho-Corasick pattern id). */
static int trie_insert(mb_tok_trie *trie, const char *pattern, size_t length, int32_t token) {
    if (length == 0) return 0;
    if (trie->node_count == 0) {
        for (int b = 0; b < 256; b++) trie->root_child[b] = -1;
        if (trie_add_node(trie, 0) < 0) return -1;
    }
    int32_t node = -1;
    for (size_t i = 0; i < length; i++) {
        uint8_t byte = (uint8_t)pattern[i];
        int32_t child = node < 0 ? trie->root_child[byte] : trie->nodes[node].first_child;
        if (node >= 0)
            while (child >= 0 && trie->nodes[child].byte != byte) child = trie->nodes[child].next_sibling;
        if (child < 0) {
            child = trie_add_node(trie, byte);
            if (child < 0) return -1;
            if (node < 0) {
                trie->root_child[byte] = child;
            } else {
                trie->nodes[child].next_sibling = trie->nodes[node].first_child;
                trie->nodes[node].first_child = child;
            }
        }
        node = child;
    }
    if (trie->nodes[node].token < 0) trie->nodes[node].token = token;
    return 0;
}

static int build_trie_entry(load_ctx *c, const trie_entry *entry) {
    mb_tokenizer *t = c->t;
    const mb_tok_added_token *token = &t->added[entry->added_index];
    mb_tok_trie *trie = entry->normalized ? &t->normalized_trie : &t->raw_trie;
    char *pattern;
    size_t length;
    if (entry->normalized && t->normalizer == MB_TOK_NORMALIZER_NFC) {
        if (mb_tok_nfc(token->content, token->content_length, &pattern, &length, c->err) != 0)
            return mb_fail_context(c->err, "%s: added_tokens \"%s\"", c->path, token->content);
    } else {
        pattern = copy_bytes(token->content, token->content_length);
        length = token->content_length;
        if (pattern == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
    }
    char **patterns = realloc(trie->patterns, (trie->pattern_count + 1) * sizeof *patterns);
    if (patterns == NULL) {
        free(pattern);
        return mb_fail(c->err, "out of memory reading %s", c->path);
    }
    trie->patterns = patterns;
    trie->patterns[trie->pattern_count++] = pattern;
    if (trie_insert(trie, pattern, length, (int32_t)entry->added_index) != 0)
        return mb_fail(c->err, "out of memory reading %s", c->path);
    return 0;
}

static int load_added_tokens(load_ctx *c, const cJSON *root) {
    mb_tokenizer *t = c->t;
    const cJSON *list = field(root, "added_tokens"), *item;
    if (is_absent(list)) list = NULL;
    else if (!cJSON_IsArray(list)) return mb_fail(c->err, "%s: added_tokens: expected an array", c->path);
    size_t count = list ? (size_t)cJSON_GetArraySize(list) : 0;
    t->added = calloc(count + 1, sizeof *t->added);
    trie_lists lists = {calloc(count + 1, sizeof(trie_entry)), calloc(count + 1, sizeof(trie_entry)), 0, 0};
    int rc = -1;
    if (t->added == NULL || lists.special == NULL || lists.other == NULL ||
        mb_tok_str_map_init(&t->added_by_content, count) != 0) {
        mb_fail(c->err, "out of memory reading %s", c->path);
        goto done;
    }
    int32_t max_added = -1;
    size_t index = 0;
    if (list != NULL) {
        cJSON_ArrayForEach(item, list) {
            mb_tok_added_token given = {0};
            bool special = false;
            if (read_added_token(c, item, index, &given, &special) != 0) goto done;
            if (add_one_token(c, &given, special, &max_added, &lists) != 0) goto done;
            index++;
        }
    }
    for (size_t i = 0; i < lists.special_count; i++)
        if (build_trie_entry(c, &lists.special[i]) != 0) goto done;
    for (size_t i = 0; i < lists.other_count; i++)
        if (build_trie_entry(c, &lists.other[i]) != 0) goto done;
    rc = 0;
done:
    free(lists.special);
    free(lists.other);
    return rc;
}

/* ---- post-processor and decoder --------------------------------------------------------------------------------- */

static int special_piece(load_ctx *c, mb_tok_piece *piece, const int32_t *ids, size_t count) {
    piece->kind = MB_TOK_PIECE_SPECIAL;
    piece->ids = malloc((count + 1) * sizeof *piece->ids);
    if (piece->ids == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
    memcpy(piece->ids, ids, count * sizeof *ids);
    piece->id_count = count;
    return 0;
}

static int load_template_piece(load_ctx *c, const cJSON *item, const cJSON *specials, const char *where,
                               mb_tok_piece *piece) {
    const cJSON *sequence = field(item, "Sequence"), *special = field(item, "SpecialToken");
    if (sequence != NULL) {
        const cJSON *id = field(sequence, "id");
        if (!cJSON_IsString(id) || (strcmp(id->valuestring, "A") != 0 && strcmp(id->valuestring, "B") != 0))
            return mb_fail(c->err, "%s: %s.Sequence.id: expected \"A\" or \"B\"", c->path, where);
        piece->kind = id->valuestring[0] == 'A' ? MB_TOK_PIECE_A : MB_TOK_PIECE_B;
        return 0;
    }
    const cJSON *name = field(special, "id");
    if (!cJSON_IsString(name))
        return mb_fail(c->err, "%s: %s: expected {\"Sequence\": ...} or {\"SpecialToken\": {\"id\": ...}}", c->path,
                       where);
    const cJSON *ids = field(field(specials, name->valuestring), "ids"), *id;
    if (!cJSON_IsArray(ids))
        return mb_fail(c->err, "%s: post_processor.special_tokens[\"%s\"].ids: missing (used by %s)", c->path,
                       name->valuestring, where);
    int32_t values[64];
    size_t count = 0;
    cJSON_ArrayForEach(id, ids) {
        if (count == 64) return mb_fail(c->err, "%s: post_processor.special_tokens[\"%s\"].ids: more than 64 ids",
                                        c->path, name->valuestring);
        if (get_id(c, id, &values[count++], "post_processor.special_tokens[\"%s\"].ids", name->valuestring) != 0)
            return -1;
    }
    return special_piece(c, piece, values, count);
}

static int load_template(load_ctx *c, const cJSON *processor, const char *where, const char *name,
                         mb_tok_template *out) {
    const cJSON *list = field(processor, name), *item;
    if (!cJSON_IsArray(list)) return mb_fail(c->err, "%s: %s.%s: expected an array of pieces", c->path, where, name);
    out->count = (size_t)cJSON_GetArraySize(list);
    out->pieces = calloc(out->count + 1, sizeof *out->pieces);
    if (out->pieces == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
    size_t index = 0;
    cJSON_ArrayForEach(item, list) {
        char piece_where[128];
        snprintf(piece_where, sizeof piece_where, "%s.%s[%zu]", where, name, index);
        if (load_template_piece(c, item, field(processor, "special_tokens"), piece_where, &out->pieces[index]) != 0)
            return -1;
        index++;
    }
    return 0;
}

/* BertProcessing / RobertaProcessing: {"sep": ["[SEP]", 102], "cls": ["[CLS]", 101]} as a template. */
static int load_bert_like(load_ctx *c, const cJSON *processor, const char *where, bool roberta) {
    mb_tokenizer *t = c->t;
    int32_t ids[2];
    const char *names[2] = {"cls", "sep"};
    for (int i = 0; i < 2; i++) {
        const cJSON *pair = field(processor, names[i]);
        if (!cJSON_IsArray(pair) || cJSON_GetArraySize(pair) != 2)
            return mb_fail(c->err, "%s: %s.%s: expected [token, id]", c->path, where, names[i]);
        if (get_id(c, pair->child->next, &ids[i], "%s", names[i]) != 0) return -1;
    }
    int single[] = {MB_TOK_PIECE_SPECIAL + 0, MB_TOK_PIECE_A, MB_TOK_PIECE_SPECIAL + 1};
    int bert_pair[] = {MB_TOK_PIECE_SPECIAL + 0, MB_TOK_PIECE_A, MB_TOK_PIECE_SPECIAL + 1, MB_TOK_PIECE_B,
                       MB_TOK_PIECE_SPECIAL + 1};
    int roberta_pair[] = {MB_TOK_PIECE_SPECIAL + 0, MB_TOK_PIECE_A, MB_TOK_PIECE_SPECIAL + 1,
                          MB_TOK_PIECE_SPECIAL + 1, MB_TOK_PIECE_B, MB_TOK_PIECE_SPECIAL + 1};
    const int *layouts[2] = {single, roberta ? roberta_pair : bert_pair};
    size_t sizes[2] = {3, roberta ? 6u : 5u};
    mb_tok_template *targets[2] = {&t->single, &t->pair};
    for (int k = 0; k < 2; k++) {
        targets[k]->pieces = calloc(sizes[k], sizeof(mb_tok_piece));
        if (targets[k]->pieces == NULL) return mb_fail(c->err, "out of memory reading %s", c->path);
        targets[k]->count = sizes[k];
        for (size_t i = 0; i < sizes[k]; i++) {
            int kind = layouts[k][i];
            if (kind < MB_TOK_PIECE_SPECIAL) {
                targets[k]->pieces[i].kind = kind;
            } else if (special_piece(c, &targets[k]->pieces[i], &ids[kind - MB_TOK_PIECE_SPECIAL], 1) != 0) {
                return -1;
            }
        }
    }
    return 0;
}

static int load_one_processor(load_ctx *c, const cJSON *processor, const char *where) {
    mb_tokenizer *t = c->t;
    const char *type = type_of(processor);
    if (type != NULL && strcmp(type, "ByteLevel") == 0) return 0; /* only trims offsets */
    bool template_like = type != NULL &&
                         (strcmp(type, "TemplateProcessing") == 0 || strcmp(type, "BertProcessing") == 0 ||
                          strcmp(type, "RobertaProcessing") == 0);
    if (!template_like)
        return mb_fail(c->err, "%s: %s.type: \"%s\" is not supported (TemplateProcessing, BertProcessing, "
                       "RobertaProcessing, ByteLevel or a Sequence of them)",
                       c->path, where, type ? type : "(missing)");
    if (t->has_template)
        return mb_fail(c->err, "%s: %s: more than one processor adds special tokens", c->path, where);
    t->has_template = true;
    if (strcmp(type, "TemplateProcessing") == 0)
        return load_template(c, processor, where, "single", &t->single) != 0 ||
                       load_template(c, processor, where, "pair", &t->pair) != 0
                   ? -1
                   : 0;
    return load_bert_like(c, processor, where, strcmp(type, "RobertaProcessing") == 0);
}

static int load_post_processor(load_ctx *c, const cJSON *root) {
    const cJSON *processor = field(root, "post_processor");
    if (is_absent(processor)) return 0;
    const char *type = type_of(processor);
    if (type != NULL && strcmp(type, "Sequence") == 0) {
        const cJSON *list = field(processor, "processors"), *item;
        if (!cJSON_IsArray(list)) return mb_fail(c->err, "%s: post_processor.processors: expected an array", c->path);
        int index = 0;
        cJSON_ArrayForEach(item, list) {
            char where[64];
            snprintf(where, sizeof where, "post_processor.processors[%d]", index++);
            if (load_one_processor(c, item, where) != 0) return -1;
        }
        return 0;
    }
    return load_one_processor(c, processor, "post_processor");
}

static int load_decoder(load_ctx *c, const cJSON *root) {
    const cJSON *decoder = field(root, "decoder");
    c->t->decoder = MB_TOK_DECODER_NONE;
    if (is_absent(decoder)) return 0;
    const char *type = type_of(decoder);
    if (type != NULL && strcmp(type, "ByteLevel") == 0) {
        c->t->decoder = MB_TOK_DECODER_BYTE_LEVEL;
        return 0;
    }
    return mb_fail(c->err, "%s: decoder.type: \"%s\" is not supported (only null or ByteLevel)", c->path,
                   type ? type : "(missing)");
}

/* ---- derived tables --------------------------------------------------------------------------------------------- */

/* The bytes the decoder emits for one token: the ByteLevel inverse when every character is in the alphabet, else
 * the token's own UTF-8 (ByteLevel::decode_chain); the raw string without a decoder. */
static int decoded_form(const mb_tokenizer *t, const char *token, size_t length, char **out, uint32_t *out_length) {
    char *bytes = malloc(length + 1);
    if (bytes == NULL) return -1;
    size_t n = 0;
    bool all_mapped = t->decoder == MB_TOK_DECODER_BYTE_LEVEL;
    for (size_t i = 0; i < length && all_mapped;) {
        uint32_t cp;
        i += mb_tok_utf8_decode((const uint8_t *)token + i, length - i, &cp);
        int byte = mb_tok_char_to_byte(cp);
        if (byte < 0) all_mapped = false;
        else bytes[n++] = (char)byte;
    }
    if (!all_mapped) {
        memcpy(bytes, token, length);
        n = length;
    }
    bytes[n] = '\0';
    *out = bytes;
    *out_length = (uint32_t)n;
    return 0;
}

static int build_id_tables(load_ctx *c) {
    mb_tokenizer *t = c->t;
    int32_t limit = t->vocab_id_limit;
    for (size_t i = 0; i < t->added_count; i++)
        if (t->added[i].id >= limit) limit = t->added[i].id + 1;
    t->id_limit = limit;
    t->added_index_by_id = malloc(((size_t)limit + 1) * sizeof *t->added_index_by_id);
    t->decoded = calloc((size_t)limit + 1, sizeof *t->decoded);
    t->decoded_lengths = calloc((size_t)limit + 1, sizeof *t->decoded_lengths);
    if (t->added_index_by_id == NULL || t->decoded == NULL || t->decoded_lengths == NULL)
        return mb_fail(c->err, "out of memory reading %s", c->path);
    for (int32_t id = 0; id < limit; id++) t->added_index_by_id[id] = -1;
    for (size_t i = 0; i < t->added_count; i++) t->added_index_by_id[t->added[i].id] = (int32_t)i;
    for (int32_t id = 0; id < limit; id++) {
        int32_t added = t->added_index_by_id[id];
        const char *token = added >= 0 ? t->added[added].content : id < t->vocab_id_limit ? t->vocab_strings[id] : NULL;
        if (token == NULL) continue;
        size_t length = added >= 0 ? t->added[added].content_length : t->vocab_lengths[id];
        char *normalized = NULL;
        /* tokenizers >= 0.23 decodes a normalized added token from its normalized form (normalized_cache). */
        if (added >= 0 && t->added[added].normalized && t->normalizer == MB_TOK_NORMALIZER_NFC) {
            if (mb_tok_nfc(token, length, &normalized, &length, c->err) != 0) return -1;
            token = normalized;
        }
        int rc = decoded_form(t, token, length, &t->decoded[id], &t->decoded_lengths[id]);
        free(normalized);
        if (rc != 0) return mb_fail(c->err, "out of memory reading %s", c->path);
    }
    return 0;
}

/* FNV-1a 64 over a canonical description of everything that determines ids. */
typedef struct fnv {
    uint64_t h;
} fnv;

static void fnv_bytes(fnv *f, const void *data, size_t length) {
    const uint8_t *p = data;
    for (size_t i = 0; i < length; i++) f->h = (f->h ^ p[i]) * 0x100000001B3ull;
}

static void fnv_u64(fnv *f, uint64_t v) {
    uint8_t bytes[8];
    for (int i = 0; i < 8; i++) bytes[i] = (uint8_t)(v >> (8 * i));
    fnv_bytes(f, bytes, 8);
}

static void fnv_template(fnv *f, const mb_tok_template *tpl) {
    fnv_u64(f, tpl->count);
    for (size_t i = 0; i < tpl->count; i++) {
        fnv_u64(f, (uint64_t)tpl->pieces[i].kind);
        fnv_u64(f, tpl->pieces[i].id_count);
        for (size_t k = 0; k < tpl->pieces[i].id_count; k++) fnv_u64(f, (uint64_t)tpl->pieces[i].ids[k]);
    }
}

static uint64_t fingerprint(const mb_tokenizer *t) {
    fnv f = {0xCBF29CE484222325ull};
    fnv_bytes(&f, "mb-tokenizer-v1", 15);
    fnv_u64(&f, (uint64_t)t->vocab_id_limit);
    for (int32_t id = 0; id < t->vocab_id_limit; id++) {
        if (t->vocab_strings[id] == NULL) continue;
        fnv_u64(&f, (uint64_t)id);
        fnv_u64(&f, t->vocab_lengths[id]);
        fnv_bytes(&f, t->vocab_strings[id], t->vocab_lengths[id]);
    }
    fnv_u64(&f, t->merge_count);
    for (size_t i = 0; i < t->merge_count; i++) fnv_u64(&f, ((uint64_t)(uint32_t)t->merge_list[i][0] << 32) |
                                                            (uint32_t)t->merge_list[i][1]);
    fnv_u64(&f, t->added_count);
    for (size_t i = 0; i < t->added_count; i++) {
        const mb_tok_added_token *a = &t->added[i];
        uint64_t flags = (uint64_t)a->single_word | (uint64_t)a->lstrip << 1 | (uint64_t)a->rstrip << 2 |
                         (uint64_t)a->normalized << 3 | (uint64_t)a->special << 4;
        fnv_u64(&f, (uint64_t)a->id);
        fnv_u64(&f, flags);
        fnv_u64(&f, a->content_length);
        fnv_bytes(&f, a->content, a->content_length);
    }
    fnv_u64(&f, (uint64_t)t->normalizer);
    fnv_u64(&f, t->pretok_count);
    for (size_t i = 0; i < t->pretok_count; i++)
        fnv_u64(&f, (uint64_t)t->pretok[i].is_split | (uint64_t)t->pretok[i].add_prefix_space << 1 |
                        (uint64_t)t->pretok[i].use_regex << 2);
    fnv_u64(&f, (uint64_t)(t->unk_id + 1) | (uint64_t)t->fuse_unk << 33 | (uint64_t)t->ignore_merges << 34);
    fnv_u64(&f, t->has_template);
    if (t->has_template) {
        fnv_template(&f, &t->single);
        fnv_template(&f, &t->pair);
    }
    return f.h;
}

int mb_tok_load_json(mb_tokenizer *t, const char *json_text, size_t length, const char *path, mb_error *err) {
    cJSON *root = cJSON_ParseWithLength(json_text, length);
    if (root == NULL) {
        const char *at = cJSON_GetErrorPtr();
        size_t offset = at != NULL && at >= json_text && at <= json_text + length ? (size_t)(at - json_text) : 0;
        return mb_fail(err, "%s: not valid JSON (near byte offset %zu)", path, offset);
    }
    load_ctx c = {t, path, err};
    int rc = -1;
    const cJSON *version = field(root, "version");
    if (!cJSON_IsObject(root)) {
        mb_fail(err, "%s: the top level is not a JSON object", path);
    } else if (!is_absent(version) && !(cJSON_IsString(version) && strcmp(version->valuestring, "1.0") == 0)) {
        mb_fail(err, "%s: version: expected \"1.0\"", path);
    } else if (load_model(&c, root) == 0 && load_normalizer(&c, root) == 0 && load_pre_tokenizer(&c, root) == 0 &&
               load_added_tokens(&c, root) == 0 && load_post_processor(&c, root) == 0 && load_decoder(&c, root) == 0 &&
               build_id_tables(&c) == 0) {
        t->fingerprint = fingerprint(t);
        rc = 0;
    }
    cJSON_Delete(root);
    return rc;
}
