/* A Hugging Face tokenizer.json-compatible byte-level BPE tokenizer (the family ModernBERT's tokenizer belongs to).
 *
 * Pipeline, as `tokenizers` runs it: added tokens are split out first (special and non-special; lstrip / rstrip /
 * single_word honoured), the rest is normalized (NFC or none), pre-tokenized by ByteLevel with the GPT-2 split pattern,
 * byte-mapped, BPE-merged by rank, and looked up; the TemplateProcessing post-processor adds [CLS] A [SEP] (B [SEP]).
 * A loaded tokenizer is immutable: encode/decode may be called from many threads at once. */
#ifndef MB_TOKENIZER_H
#define MB_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct mb_tokenizer mb_tokenizer;

/* A growable list of token ids owned by the caller (free with mb_token_list_free; reuse by setting count = 0). */
typedef struct mb_token_list {
    int32_t *ids;
    size_t count;
    size_t capacity;
} mb_token_list;

void mb_token_list_free(mb_token_list *list);

/* Loads tokenizer.json; errors name the file and the JSON field. */
int mb_tokenizer_load(mb_tokenizer **tokenizer, const char *path, mb_error *err);
void mb_tokenizer_free(mb_tokenizer *tokenizer);

/* Appends the ids of `text` (any bytes; invalid UTF-8 handled as `tokenizers` does) without special tokens. */
int mb_tokenizer_encode(const mb_tokenizer *tokenizer, const char *text, size_t length, mb_token_list *out,
                        mb_error *err);
/* Appends the post-processed ids: [CLS] A [SEP] when b == NULL, else [CLS] A [SEP] B [SEP] (per the file's template). */
int mb_tokenizer_encode_template(const mb_tokenizer *tokenizer, const char *a, size_t a_length, const char *b,
                                 size_t b_length, mb_token_list *out, mb_error *err);
/* Decodes ids to a malloc'ed NUL-terminated string (ByteLevel decoder); special tokens kept or skipped. */
int mb_tokenizer_decode(const mb_tokenizer *tokenizer, const int32_t *ids, size_t count, int skip_special,
                        char **text, mb_error *err);
/* The same, also giving the length in bytes (the text may contain NUL bytes when the ids encode U+0000). */
int mb_tokenizer_decode_length(const mb_tokenizer *tokenizer, const int32_t *ids, size_t count, int skip_special,
                               char **text, size_t *length, mb_error *err);

/* Size of the id space (largest id + 1, counting added tokens). */
int mb_tokenizer_vocab_size(const mb_tokenizer *tokenizer);
/* Id of a token string (vocabulary or added token), or -1. */
int32_t mb_tokenizer_token_to_id(const mb_tokenizer *tokenizer, const char *token);
/* Whether id is a special added token. */
int mb_tokenizer_is_special(const mb_tokenizer *tokenizer, int32_t id);
/* A 64-bit fingerprint of everything that determines ids (vocab, merges, added tokens, normalizer, pre-tokenizer). */
uint64_t mb_tokenizer_fingerprint(const mb_tokenizer *tokenizer);

/* The special ids ModernBERT uses, looked up by their usual strings ([CLS], [SEP], [PAD], [MASK], [UNK]); -1 if absent. */
typedef struct mb_special_ids {
    int32_t cls, sep, pad, mask, unk;
} mb_special_ids;
mb_special_ids mb_tokenizer_special_ids(const mb_tokenizer *tokenizer);

#endif
