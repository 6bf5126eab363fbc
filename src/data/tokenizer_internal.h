/* Private to the tokenizer (src/data/tokenizer*.c and its tests): the loaded tokenizer's layout, the hash maps behind
 * the vocabulary and the merges, and the text helpers (UTF-8, byte-level alphabet, GPT-2 split, NFC).
 *
 * Semantics follow huggingface/tokenizers (added_vocabulary.rs, models/bpe/{model,word}.rs, pre_tokenizers/
 * byte_level.rs, processors/template.rs); comments at each function say which rule they reproduce. */
#ifndef MB_TOKENIZER_INTERNAL_H
#define MB_TOKENIZER_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "data/tokenizer.h"

/* ---- hash maps -------------------------------------------------------------------------------------------------- */

/* String -> int32 map with open addressing. Keys are not copied: they must outlive the map. */
typedef struct mb_tok_str_slot {
    uint64_t hash;
    const char *key; /* NULL = empty slot */
    uint32_t length;
    int32_t value;
} mb_tok_str_slot;

typedef struct mb_tok_str_map {
    mb_tok_str_slot *slots;
    size_t capacity; /* power of two */
    size_t count;
} mb_tok_str_map;

int mb_tok_str_map_init(mb_tok_str_map *map, size_t expected);
void mb_tok_str_map_free(mb_tok_str_map *map);
/* Inserts or overwrites (the later entry wins, as a Rust HashMap built by collect() does). Returns -1 on OOM. */
int mb_tok_str_map_put(mb_tok_str_map *map, const char *key, size_t length, int32_t value);
/* The value, or -1. */
int32_t mb_tok_str_map_get(const mb_tok_str_map *map, const char *key, size_t length);
uint64_t mb_tok_hash_bytes(const void *data, size_t length);

/* (left id, right id) -> (rank, merged id). */
typedef struct mb_tok_pair_slot {
    uint64_t key; /* UINT64_MAX = empty */
    uint32_t rank;
    int32_t merged_id;
} mb_tok_pair_slot;

typedef struct mb_tok_pair_map {
    mb_tok_pair_slot *slots;
    size_t mask;
    size_t count;
} mb_tok_pair_map;

int mb_tok_pair_map_init(mb_tok_pair_map *map, size_t expected);
void mb_tok_pair_map_free(mb_tok_pair_map *map);
int mb_tok_pair_map_put(mb_tok_pair_map *map, int32_t left, int32_t right, uint32_t rank, int32_t merged_id);
/* The slot, or NULL. */
const mb_tok_pair_slot *mb_tok_pair_map_get(const mb_tok_pair_map *map, int32_t left, int32_t right);

/* ---- text helpers (tokenizer_text.c) ---------------------------------------------------------------------------- */

/* The code point of the byte-level alphabet that stands for `byte` (GPT-2 bytes_to_unicode). */
uint32_t mb_tok_byte_to_char(uint8_t byte);
/* Inverse of mb_tok_byte_to_char: the byte, or -1 when the code point is not in the alphabet. */
int mb_tok_char_to_byte(uint32_t code_point);

/* Decodes one UTF-8 character of valid UTF-8 at s[0..length); returns its byte length (>= 1). */
size_t mb_tok_utf8_decode(const uint8_t *s, size_t length, uint32_t *code_point);
/* Encodes a code point; returns the byte length (1..4). */
size_t mb_tok_utf8_encode(uint32_t code_point, char *out);
/* Length of the longest valid UTF-8 prefix of s. */
size_t mb_tok_utf8_valid_prefix(const uint8_t *s, size_t length);
/* Copies s to *out replacing every maximal invalid subsequence with U+FFFD (the Unicode "maximal subpart" practice
 * that Python's errors='replace' and Rust's from_utf8_lossy both follow). *out is malloc'ed and NUL-terminated. */
int mb_tok_utf8_sanitize(const uint8_t *s, size_t length, char **out, size_t *out_length);

/* Character classes of the GPT-2 pattern: \s (White_Space), \p{L}, \p{N}, anything else. */
enum { MB_TOK_CLASS_OTHER = 0, MB_TOK_CLASS_LETTER = 1, MB_TOK_CLASS_NUMBER = 2, MB_TOK_CLASS_SPACE = 3 };
int mb_tok_char_class(uint32_t code_point);
bool mb_tok_is_whitespace(uint32_t code_point);
/* Rust regex's Unicode \w (Alphabetic, marks, Nd, Pc, Join_Control), approximated through general categories. */
bool mb_tok_is_word_char(uint32_t code_point);

/* Length in bytes of the first match of the GPT-2 pattern
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * at the start of s[0..length) (length > 0), as Oniguruma's leftmost, first-alternative-wins search finds it. The
 * pattern matches every character, so successive calls split the whole text. */
size_t mb_tok_gpt2_match(const uint8_t *s, size_t length);

/* NFC of valid UTF-8 via utf8proc; *out is malloc'ed. ASCII-only input is returned as a copy. */
int mb_tok_nfc(const char *s, size_t length, char **out, size_t *out_length, mb_error *err);

/* ---- the loaded tokenizer --------------------------------------------------------------------------------------- */

typedef struct mb_tok_word_cache mb_tok_word_cache;

typedef struct mb_tok_added_token {
    char *content;    /* as written in the file */
    size_t content_length;
    int32_t id;
    bool single_word, lstrip, rstrip, normalized; /* the flags of the last entry given for this content */
    bool declared_special;                        /* that entry's "special" */
    bool special;                                 /* in the special set: some entry for this content was special */
} mb_tok_added_token;

/* A byte trie of added-token patterns for leftmost-longest matching (the Aho-Corasick MatchKind::LeftmostLongest
 * that tokenizers uses, which only ever needs the longest pattern starting at the leftmost matching position). */
typedef struct mb_tok_trie_node {
    int32_t first_child, next_sibling;
    int32_t token; /* index into mb_tokenizer.added, -1 when no pattern ends here */
    uint8_t byte;
} mb_tok_trie_node;

typedef struct mb_tok_trie {
    mb_tok_trie_node *nodes; /* nodes[0] is the root; its children are in root_child */
    size_t node_count, node_capacity;
    int32_t root_child[256];
    size_t pattern_count;
    char **patterns; /* owned copies of the matched strings (NFC'ed content for normalized tokens) */
} mb_tok_trie;

enum { MB_TOK_NORMALIZER_NONE = 0, MB_TOK_NORMALIZER_NFC = 1 };

/* A pre-tokenizer stage: the GPT-2 Split (Isolated) or ByteLevel; ByteLevel is always the last stage. */
typedef struct mb_tok_pretok_stage {
    bool is_split;
    bool add_prefix_space, use_regex; /* ByteLevel only */
} mb_tok_pretok_stage;

/* A post-processor template: pieces are sequence A, sequence B, or a special token with its ids. */
enum { MB_TOK_PIECE_A = 0, MB_TOK_PIECE_B = 1, MB_TOK_PIECE_SPECIAL = 2 };
typedef struct mb_tok_piece {
    int kind;
    int32_t *ids; /* MB_TOK_PIECE_SPECIAL */
    size_t id_count;
} mb_tok_piece;

typedef struct mb_tok_template {
    mb_tok_piece *pieces;
    size_t count;
} mb_tok_template;

enum { MB_TOK_DECODER_NONE = 0, MB_TOK_DECODER_BYTE_LEVEL = 1 };

struct mb_tokenizer {
    char *path;
    /* model */
    mb_tok_str_map vocab;       /* model vocabulary: token string -> id */
    char *vocab_arena;          /* all vocabulary strings, NUL-separated */
    char **vocab_strings;       /* id -> token string for model ids (NULL where no token), into vocab_arena */
    uint32_t *vocab_lengths;
    int32_t vocab_id_limit;     /* largest model id + 1 */
    size_t vocab_entries;       /* number of (token, id) entries: BPE::get_vocab_size() */
    mb_tok_pair_map merges;
    int32_t (*merge_list)[2];   /* merges in rank order (for the fingerprint) */
    size_t merge_count;
    int32_t byte_ids[256];      /* id of the one-character token of each byte, or -1 */
    int32_t unk_id;             /* -1: no unk token */
    bool unk_missing;           /* unk_token named but absent from the vocab: an error once it is needed */
    char *unk_token;
    bool fuse_unk, ignore_merges;
    /* added tokens */
    mb_tok_added_token *added;  /* unique by content, in file order; flags are the last ones given */
    size_t added_count;
    mb_tok_str_map added_by_content;
    int32_t *added_index_by_id; /* id -> index into added, -1 (size id_limit) */
    mb_tok_trie raw_trie;        /* normalized=false tokens, matched on the raw text */
    mb_tok_trie normalized_trie; /* normalized=true tokens, matched on normalized pieces */
    /* pipeline */
    int normalizer;
    mb_tok_pretok_stage pretok[2];
    size_t pretok_count;
    bool has_template;
    mb_tok_template single, pair;
    int decoder;
    /* derived */
    int32_t id_limit;           /* largest id + 1 over the model and added tokens */
    char **decoded;             /* id -> bytes the decoder emits for this token (ByteLevel inverse or raw) */
    uint32_t *decoded_lengths;
    uint64_t fingerprint;
    mb_tok_word_cache *cache; /* mutable through the const tokenizer, thread-safe by construction */
};

/* A cache of BPE results for short words, shared by all threads that encode with one tokenizer: lookups are
 * lock-free (slots are published with release stores and never change afterwards); an insert takes a mutex with
 * trylock and is simply skipped when another thread holds it, or once the table is half full (no eviction, as
 * tokenizers' own BPE cache). Only speed depends on it. (tokenizer_bpe.c) */
#define MB_TOK_CACHE_MAX_WORD 48
mb_tok_word_cache *mb_tok_word_cache_new(size_t slots);
void mb_tok_word_cache_free(mb_tok_word_cache *cache);

/* Loader (tokenizer_load.c). */
int mb_tok_load_json(mb_tokenizer *tokenizer, const char *json_text, size_t length, const char *path, mb_error *err);
/* BPE on one pre-tokenized word (raw bytes, before byte mapping); appends ids. (tokenizer_bpe.c) */
typedef struct mb_tok_bpe_scratch mb_tok_bpe_scratch;
mb_tok_bpe_scratch *mb_tok_bpe_scratch_new(void);
void mb_tok_bpe_scratch_free(mb_tok_bpe_scratch *scratch);
int mb_tok_bpe_word(const mb_tokenizer *tokenizer, const uint8_t *word, size_t length, mb_tok_bpe_scratch *scratch,
                    mb_token_list *out, mb_error *err);

int mb_tok_list_push(mb_token_list *list, int32_t id);

#endif
