/* Writing one token shard (the format of docs/data-format.md, read back by shards.h).
 *
 * Documents are appended one at a time; tokens accumulate in a block of `block_tokens` ids which is zstd-compressed
 * when full, so memory holds one raw block, the compressed payload so far and the 8-byte-per-document index. finish()
 * writes header, index, block table, metadata checksum and payload to "<path>.tmp.<pid>", fsyncs and renames it over
 * <path> (src/common/fileio.h), so a reader never sees a half-written shard. */
#ifndef MB_SHARD_WRITER_H
#define MB_SHARD_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct mb_shard_writer mb_shard_writer;

typedef struct mb_shard_writer_options {
    uint64_t tokenizer_fingerprint;
    uint32_t vocab_size;    /* ids must be < vocab_size; <= 65536 stores 2-byte ids, else 4-byte */
    uint32_t block_tokens;  /* tokens per zstd block; 0 = MB_SHARD_DEFAULT_BLOCK_TOKENS */
    int zstd_level;         /* 0 = 3 (zstd's default) */
    uint32_t flags;         /* MB_SHARD_FLAG_* */
} mb_shard_writer_options;

/* Nothing touches the disk until finish(). */
int mb_shard_writer_open(mb_shard_writer **writer, const char *path, const mb_shard_writer_options *options,
                         mb_error *err);
/* Appends one document (count may be 0: an empty document is stored as such). Fails on an id >= vocab size or a
 * document longer than 2^32 - 1 tokens. */
int mb_shard_writer_add_document(mb_shard_writer *writer, const int32_t *ids, size_t count, mb_error *err);
uint64_t mb_shard_writer_document_count(const mb_shard_writer *writer);
uint64_t mb_shard_writer_token_count(const mb_shard_writer *writer);
/* Size the file will have if finished now (the last partial block counted at its raw size). */
uint64_t mb_shard_writer_estimated_bytes(const mb_shard_writer *writer);
/* Writes the file atomically and frees the writer (also on failure). *file_bytes (may be NULL) gets its size. */
int mb_shard_writer_finish(mb_shard_writer *writer, uint64_t *file_bytes, mb_error *err);
/* Frees the writer without writing anything. */
void mb_shard_writer_abort(mb_shard_writer *writer);

#endif
