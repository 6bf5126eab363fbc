/* Token shard writer: builds one shard file in the layout docs/data-format.md specifies (and shards.c reads).
 *
 * Documents are concatenated into one token stream; a document index records the cumulative token offset at which
 * each document starts (plus the total at the end). The stream is cut into blocks of block_tokens ids, each stored
 * as little-endian u16 (vocab <= 65536) or u32, compressed as its own zstd frame and listed in the block table with
 * its file offset, compressed size and the XXH64 of its raw bytes. The metadata checksum is XXH64 of every byte
 * before it (header, index, block table). */
#include "data/shard_writer.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "common/fileio.h"
#include "data/shards.h"

typedef struct byte_buffer {
    uint8_t *data;
    size_t size, capacity;
} byte_buffer;

struct mb_shard_writer {
    char *path;
    mb_shard_writer_options options;
    uint32_t width;
    ZSTD_CCtx *cctx;
    uint8_t *block;          /* raw ids of the block being filled */
    uint32_t block_fill;     /* tokens in it */
    byte_buffer payload;     /* compressed blocks so far */
    byte_buffer table;       /* block table entries so far (offsets relative to the payload start until finish) */
    uint64_t *index;         /* document_count + 1 cumulative offsets */
    uint64_t document_count, index_capacity;
    uint64_t token_count;
    uint32_t block_count;
};

static void store_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void store_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static int buffer_reserve(byte_buffer *buffer, size_t extra) {
    if (buffer->size + extra <= buffer->capacity) return 0;
    size_t capacity = buffer->capacity ? buffer->capacity : 1 << 16;
    while (capacity < buffer->size + extra) capacity *= 2;
    uint8_t *data = realloc(buffer->data, capacity);
    if (data == NULL) return -1;
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

int mb_shard_writer_open(mb_shard_writer **writer_out, const char *path, const mb_shard_writer_options *options,
                         mb_error *err) {
    *writer_out = NULL;
    if (options->vocab_size == 0 || options->vocab_size > (uint32_t)INT32_MAX)
        return mb_fail(err, "%s: vocab size %u out of range", path, options->vocab_size);
    if (options->block_tokens > MB_SHARD_MAX_BLOCK_TOKENS)
        return mb_fail(err, "%s: block size %u tokens exceeds %u", path, options->block_tokens, MB_SHARD_MAX_BLOCK_TOKENS);
    if ((options->flags & ~MB_SHARD_KNOWN_FLAGS) != 0) return mb_fail(err, "%s: unknown flags 0x%x", path, options->flags);
    mb_shard_writer *writer = calloc(1, sizeof *writer);
    if (writer == NULL) return mb_fail(err, "%s: out of memory", path);
    writer->options = *options;
    if (writer->options.block_tokens == 0) writer->options.block_tokens = MB_SHARD_DEFAULT_BLOCK_TOKENS;
    if (writer->options.zstd_level == 0) writer->options.zstd_level = 3;
    writer->width = options->vocab_size <= 65536u ? 2u : 4u;
    writer->path = strdup(path);
    writer->cctx = ZSTD_createCCtx();
    writer->block = malloc((size_t)writer->options.block_tokens * writer->width);
    writer->index_capacity = 1024;
    writer->index = malloc(writer->index_capacity * sizeof *writer->index);
    if (writer->path == NULL || writer->cctx == NULL || writer->block == NULL || writer->index == NULL) {
        mb_shard_writer_abort(writer);
        return mb_fail(err, "%s: out of memory", path);
    }
    writer->index[0] = 0;
    *writer_out = writer;
    return 0;
}

/* Compresses the filled part of the current block and appends it to the payload and the block table. */
static int flush_block(mb_shard_writer *writer, mb_error *err) {
    if (writer->block_fill == 0) return 0;
    size_t raw_bytes = (size_t)writer->block_fill * writer->width;
    size_t bound = ZSTD_compressBound(raw_bytes);
    if (buffer_reserve(&writer->payload, bound) != 0 || buffer_reserve(&writer->table, MB_SHARD_BLOCK_ENTRY_SIZE) != 0)
        return mb_fail(err, "%s: out of memory growing the payload (%zu bytes)", writer->path, writer->payload.size);
    size_t compressed = ZSTD_compressCCtx(writer->cctx, writer->payload.data + writer->payload.size, bound, writer->block,
                                          raw_bytes, writer->options.zstd_level);
    if (ZSTD_isError(compressed))
        return mb_fail(err, "%s: block %u: zstd: %s", writer->path, writer->block_count, ZSTD_getErrorName(compressed));
    uint8_t *entry = writer->table.data + writer->table.size;
    store_u64(entry, writer->payload.size);
    store_u64(entry + 8, compressed);
    store_u64(entry + 16, mb_xxh64(writer->block, raw_bytes, 0));
    writer->payload.size += compressed;
    writer->table.size += MB_SHARD_BLOCK_ENTRY_SIZE;
    writer->block_count++;
    writer->block_fill = 0;
    return 0;
}

int mb_shard_writer_add_document(mb_shard_writer *writer, const int32_t *ids, size_t count, mb_error *err) {
    if (count > UINT32_MAX)
        return mb_fail(err, "%s: document %" PRIu64 " has %zu tokens; the format allows 2^32-1", writer->path,
                       writer->document_count, count);
    for (size_t i = 0; i < count; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= writer->options.vocab_size)
            return mb_fail(err, "%s: document %" PRIu64 " token %zu: id %d outside [0, %u)", writer->path,
                           writer->document_count, i, ids[i], writer->options.vocab_size);
    if (writer->document_count + 2 > writer->index_capacity) {
        uint64_t capacity = writer->index_capacity * 2;
        uint64_t *index = realloc(writer->index, capacity * sizeof *index);
        if (index == NULL) return mb_fail(err, "%s: out of memory growing the document index", writer->path);
        writer->index = index;
        writer->index_capacity = capacity;
    }
    size_t done = 0;
    while (done < count) {
        uint32_t room = writer->options.block_tokens - writer->block_fill;
        size_t take = count - done < room ? count - done : room;
        uint8_t *dst = writer->block + (size_t)writer->block_fill * writer->width;
        if (writer->width == 2) {
            for (size_t i = 0; i < take; i++) {
                uint32_t id = (uint32_t)ids[done + i];
                dst[2 * i] = (uint8_t)id;
                dst[2 * i + 1] = (uint8_t)(id >> 8);
            }
        } else {
            for (size_t i = 0; i < take; i++) store_u32(dst + 4 * i, (uint32_t)ids[done + i]);
        }
        writer->block_fill += (uint32_t)take;
        done += take;
        if (writer->block_fill == writer->options.block_tokens && flush_block(writer, err) != 0) return -1;
    }
    writer->token_count += count;
    writer->document_count++;
    writer->index[writer->document_count] = writer->token_count;
    return 0;
}

uint64_t mb_shard_writer_document_count(const mb_shard_writer *writer) { return writer->document_count; }
uint64_t mb_shard_writer_token_count(const mb_shard_writer *writer) { return writer->token_count; }

static uint64_t metadata_bytes(const mb_shard_writer *writer, uint32_t block_count) {
    return MB_SHARD_HEADER_SIZE + 8 * (writer->document_count + 1) + (uint64_t)MB_SHARD_BLOCK_ENTRY_SIZE * block_count + 8;
}

uint64_t mb_shard_writer_estimated_bytes(const mb_shard_writer *writer) {
    uint32_t blocks = writer->block_count + (writer->block_fill > 0);
    return metadata_bytes(writer, blocks) + writer->payload.size + (uint64_t)writer->block_fill * writer->width;
}

/* Header + index + block table + metadata checksum, with block offsets made absolute. */
static int build_metadata(mb_shard_writer *writer, byte_buffer *meta, mb_error *err) {
    uint64_t payload_offset = metadata_bytes(writer, writer->block_count);
    if (buffer_reserve(meta, (size_t)payload_offset) != 0)
        return mb_fail(err, "%s: out of memory for %" PRIu64 " bytes of metadata", writer->path, payload_offset);
    uint8_t *h = meta->data;
    memset(h, 0, MB_SHARD_HEADER_SIZE);
    memcpy(h, MB_SHARD_MAGIC, 8);
    store_u32(h + 8, MB_SHARD_VERSION);
    store_u32(h + 12, MB_SHARD_HEADER_SIZE);
    store_u64(h + 16, writer->options.tokenizer_fingerprint);
    store_u32(h + 24, writer->options.vocab_size);
    store_u32(h + 28, writer->width);
    store_u64(h + 32, writer->document_count);
    store_u64(h + 40, writer->token_count);
    store_u32(h + 48, writer->options.block_tokens);
    store_u32(h + 52, writer->block_count);
    store_u32(h + 56, writer->options.flags);
    store_u64(h + 64, MB_SHARD_HEADER_SIZE);
    store_u64(h + 72, MB_SHARD_HEADER_SIZE + 8 * (writer->document_count + 1));
    store_u64(h + 80, payload_offset);
    store_u64(h + 88, payload_offset + writer->payload.size);
    uint8_t *p = h + MB_SHARD_HEADER_SIZE;
    for (uint64_t d = 0; d <= writer->document_count; d++, p += 8) store_u64(p, writer->index[d]);
    for (uint32_t b = 0; b < writer->block_count; b++, p += MB_SHARD_BLOCK_ENTRY_SIZE) {
        const uint8_t *entry = writer->table.data + (size_t)MB_SHARD_BLOCK_ENTRY_SIZE * b;
        memcpy(p, entry, MB_SHARD_BLOCK_ENTRY_SIZE);
        uint64_t relative = 0;
        for (int i = 0; i < 8; i++) relative |= (uint64_t)entry[i] << (8 * i);
        store_u64(p, payload_offset + relative);
    }
    store_u64(p, mb_xxh64(h, (size_t)(payload_offset - 8), 0));
    meta->size = (size_t)payload_offset;
    return 0;
}

static void writer_free(mb_shard_writer *writer) {
    free(writer->path);
    ZSTD_freeCCtx(writer->cctx);
    free(writer->block);
    free(writer->payload.data);
    free(writer->table.data);
    free(writer->index);
    free(writer);
}

int mb_shard_writer_finish(mb_shard_writer *writer, uint64_t *file_bytes, mb_error *err) {
    byte_buffer meta = {0};
    int rc = flush_block(writer, err);
    if (rc == 0) rc = build_metadata(writer, &meta, err);
    if (rc == 0) {
        mb_atomic_file file;
        rc = mb_atomic_file_open(&file, writer->path, err);
        if (rc == 0) {
            rc = mb_atomic_file_write(&file, meta.data, meta.size, err);
            if (rc == 0) rc = mb_atomic_file_write(&file, writer->payload.data, writer->payload.size, err);
            if (rc == 0) rc = mb_atomic_file_commit(&file, err);
            else mb_atomic_file_abort(&file);
        }
    }
    if (rc == 0 && file_bytes != NULL) *file_bytes = meta.size + writer->payload.size;
    free(meta.data);
    writer_free(writer);
    return rc;
}

void mb_shard_writer_abort(mb_shard_writer *writer) {
    if (writer != NULL) writer_free(writer);
}
