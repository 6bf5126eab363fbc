/* Token shards: the on-disk format that `modernbert tokenize` writes and the loader reads (docs/data-format.md).
 *
 * A shard holds many documents as token ids, compressed in independently decodable zstd blocks, with a document
 * offset index and checksums. A shard set is a list of shards opened from one or more glob patterns; documents are
 * addressed by a global index 0 .. document_count-1 in (sorted path, in-file) order. */
#ifndef MB_SHARDS_H
#define MB_SHARDS_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

/* Format constants (docs/data-format.md has the byte-by-byte layout). */
#define MB_SHARD_MAGIC "MBTOKSHD"              /* 8 bytes, no terminator in the file */
#define MB_SHARD_VERSION 1u
#define MB_SHARD_HEADER_SIZE 96u
#define MB_SHARD_BLOCK_ENTRY_SIZE 24u           /* u64 offset, u64 compressed size, u64 XXH64 of decompressed bytes */
#define MB_SHARD_DEFAULT_BLOCK_TOKENS 16384u
#define MB_SHARD_MAX_BLOCK_TOKENS (1u << 24)
#define MB_SHARD_FLAG_SPECIAL_TOKENS 1u        /* every document is [CLS] text [SEP] */
#define MB_SHARD_KNOWN_FLAGS MB_SHARD_FLAG_SPECIAL_TOKENS

typedef struct mb_shard_set mb_shard_set;

/* Opens every file matching the patterns (comma-separated globs allowed in one string), validates headers, indexes
 * and checksums of the metadata; `expected_fingerprint` 0 accepts any tokenizer, otherwise a mismatch is an error. */
int mb_shard_set_open(mb_shard_set **set, const char *const *patterns, int pattern_count, uint64_t expected_fingerprint,
                      mb_error *err);
void mb_shard_set_close(mb_shard_set *set);

uint64_t mb_shard_set_document_count(const mb_shard_set *set);
uint64_t mb_shard_set_token_count(const mb_shard_set *set);
uint64_t mb_shard_set_fingerprint(const mb_shard_set *set);
/* Length in tokens of document `index` (from the index, no decompression). */
uint32_t mb_shard_set_document_length(const mb_shard_set *set, uint64_t index);
/* Copies document `index`'s tokens into out (capacity >= its length). Decompresses (and verifies) the block(s)
 * holding it; a small block cache makes sequential and nearby reads cheap. Not thread-safe: one reader per thread
 * (open the set once per thread, or use mb_shard_reader). */
int mb_shard_set_read_document(mb_shard_set *set, uint64_t index, int32_t *out, mb_error *err);

/* --- Additions beyond the loader contract ---------------------------------------------------------------------- */

/* Vocabulary size recorded in the shards (all shards of a set agree), and the header flags (MB_SHARD_FLAG_*; all
 * shards of a set agree). */
uint32_t mb_shard_set_vocab_size(const mb_shard_set *set);
uint32_t mb_shard_set_flags(const mb_shard_set *set);
size_t mb_shard_set_file_count(const mb_shard_set *set);
const char *mb_shard_set_file_path(const mb_shard_set *set, size_t file);
/* Copies tokens [offset, offset + count) of document `index` (offset + count <= its length) into out. */
int mb_shard_set_read_tokens(mb_shard_set *set, uint64_t index, uint64_t offset, uint32_t count, int32_t *out,
                             mb_error *err);

/* A reader: the per-thread half of a set (zstd context + block cache). Any number of readers may share one open
 * set, each used by one thread at a time; the set must outlive its readers. */
typedef struct mb_shard_reader mb_shard_reader;
int mb_shard_reader_open(mb_shard_reader **reader, const mb_shard_set *set, mb_error *err);
void mb_shard_reader_close(mb_shard_reader *reader);
int mb_shard_reader_read_document(mb_shard_reader *reader, uint64_t index, int32_t *out, mb_error *err);
int mb_shard_reader_read_tokens(mb_shard_reader *reader, uint64_t index, uint64_t offset, uint32_t count,
                                int32_t *out, mb_error *err);

/* What one shard file holds (from its header). */
typedef struct mb_shard_info {
    uint64_t fingerprint;
    uint32_t vocab_size;
    uint32_t token_width;
    uint64_t document_count;
    uint64_t token_count;
    uint32_t block_tokens;
    uint32_t block_count;
    uint32_t flags;
    uint64_t file_size;
} mb_shard_info;

/* Checks one file completely: the metadata as mb_shard_set_open does, then every block (decompression, checksum,
 * ids < vocab size). `expected_fingerprint` 0 accepts any. `info` may be NULL. */
int mb_shard_verify_file(const char *path, uint64_t expected_fingerprint, mb_shard_info *info, mb_error *err);

/* XXH64 (Collet's xxHash, 64-bit variant), the checksum the format uses; seed 0 throughout the format. */
uint64_t mb_xxh64(const void *data, size_t size, uint64_t seed);

#endif
