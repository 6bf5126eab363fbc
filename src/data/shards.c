/* Token shard reader: validates shard files (docs/data-format.md) and serves documents by global index.
 *
 * File layout, all integers little-endian:
 *   [0, 96)                 header (magic "MBTOKSHD", version 1, fingerprint, vocab size, token width, counts, ...)
 *   [96, T)                 document index: document_count + 1 cumulative token offsets (u64), first 0, last = tokens
 *   [T, P - 8)              block table: block_count entries {u64 file offset, u64 compressed size, u64 XXH64(raw)}
 *   [P - 8, P)              XXH64 of bytes [0, P - 8): the metadata checksum
 *   [P, file_size)          payload: one zstd frame per block of block_tokens ids (the last block may be shorter)
 * Opening a set maps every file and checks all of the metadata; a block's checksum and ids are checked each time it
 * is decompressed. Every error names the file and the byte offset of the field at fault. */
#include "data/shards.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

/* ---- XXH64 (reference algorithm: github.com/Cyan4973/xxHash, doc/xxhash_spec.md) ----------------------------- */

static const uint64_t XXH_P1 = 0x9E3779B185EBCA87ULL;
static const uint64_t XXH_P2 = 0xC2B2AE3D27D4EB4FULL;
static const uint64_t XXH_P3 = 0x165667B19E3779F9ULL;
static const uint64_t XXH_P4 = 0x85EBCA77C2B2AE63ULL;
static const uint64_t XXH_P5 = 0x27D4EB2F165667C5ULL;

static uint64_t load_u64(const uint8_t *p) {
    uint64_t value;
    memcpy(&value, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    value = __builtin_bswap64(value);
#endif
    return value;
}

static uint32_t load_u32(const uint8_t *p) {
    uint32_t value;
    memcpy(&value, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    value = __builtin_bswap32(value);
#endif
    return value;
}

static uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static uint64_t xxh_round(uint64_t acc, uint64_t input) {
    acc += input * XXH_P2;
    return rotl64(acc, 31) * XXH_P1;
}

static uint64_t xxh_merge(uint64_t acc, uint64_t value) {
    acc ^= xxh_round(0, value);
    return acc * XXH_P1 + XXH_P4;
}

uint64_t mb_xxh64(const void *data, size_t size, uint64_t seed) {
    const uint8_t *p = data;
    const uint8_t *end = p + size;
    uint64_t h;
    if (size >= 32) {
        uint64_t v1 = seed + XXH_P1 + XXH_P2, v2 = seed + XXH_P2, v3 = seed, v4 = seed - XXH_P1;
        const uint8_t *limit = end - 32;
        do {
            v1 = xxh_round(v1, load_u64(p));
            v2 = xxh_round(v2, load_u64(p + 8));
            v3 = xxh_round(v3, load_u64(p + 16));
            v4 = xxh_round(v4, load_u64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + XXH_P5;
    }
    h += (uint64_t)size;
    for (; p + 8 <= end; p += 8) {
        h ^= xxh_round(0, load_u64(p));
        h = rotl64(h, 27) * XXH_P1 + XXH_P4;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)load_u32(p) * XXH_P1;
        h = rotl64(h, 23) * XXH_P2 + XXH_P3;
        p += 4;
    }
    for (; p < end; p++) {
        h ^= (uint64_t)(*p) * XXH_P5;
        h = rotl64(h, 11) * XXH_P1;
    }
    h ^= h >> 33;
    h *= XXH_P2;
    h ^= h >> 29;
    h *= XXH_P3;
    h ^= h >> 32;
    return h;
}

/* ---- One file: header fields and where its sections lie ------------------------------------------------------- */

/* Byte offsets of the header fields (docs/data-format.md §Header). */
enum {
    OFF_MAGIC = 0,
    OFF_VERSION = 8,
    OFF_HEADER_SIZE = 12,
    OFF_FINGERPRINT = 16,
    OFF_VOCAB = 24,
    OFF_WIDTH = 28,
    OFF_DOCUMENTS = 32,
    OFF_TOKENS = 40,
    OFF_BLOCK_TOKENS = 48,
    OFF_BLOCK_COUNT = 52,
    OFF_FLAGS = 56,
    OFF_RESERVED = 60,
    OFF_INDEX = 64,
    OFF_TABLE = 72,
    OFF_PAYLOAD = 80,
    OFF_FILE_SIZE = 88,
};

typedef struct shard_file {
    char *path;
    const uint8_t *map; /* the whole file, read-only */
    size_t size;
    mb_shard_info info;
    uint64_t table_offset;
    uint64_t first_document; /* global index of this file's document 0 */
} shard_file;

struct mb_shard_set {
    shard_file *files;
    size_t file_count;
    uint64_t document_count;
    uint64_t token_count;
    uint64_t fingerprint;
    uint32_t vocab_size;
    uint32_t flags;
    size_t max_block_bytes;
    mb_shard_reader *own_reader; /* for mb_shard_set_read_document; created on first use */
};

#define CACHE_ENTRIES 4

typedef struct cached_block {
    int valid;
    size_t file;
    uint32_t block;
    uint64_t last_use;
    uint8_t *data; /* raw little-endian ids, max_block_bytes */
} cached_block;

struct mb_shard_reader {
    const mb_shard_set *set;
    ZSTD_DCtx *dctx;
    cached_block cache[CACHE_ENTRIES];
    uint64_t clock;
};

static uint32_t width_for_vocab(uint32_t vocab_size) { return vocab_size <= 65536u ? 2u : 4u; }

/* Checks the fixed header and that the sections it describes tile the file exactly. */
static int check_header(const char *path, const uint8_t *data, size_t size, mb_shard_info *info, uint64_t *table,
                        mb_error *err) {
    if (size == 0) return mb_fail(err, "%s: offset 0: empty file (not a token shard)", path);
    if (size < MB_SHARD_HEADER_SIZE)
        return mb_fail(err, "%s: offset %zu: file ends inside the %u-byte header (truncated?)", path, size,
                       MB_SHARD_HEADER_SIZE);
    if (memcmp(data + OFF_MAGIC, MB_SHARD_MAGIC, 8) != 0)
        return mb_fail(err, "%s: offset 0: bad magic (not a modernbert token shard, expected \"%s\")", path,
                       MB_SHARD_MAGIC);
    uint32_t version = load_u32(data + OFF_VERSION);
    if (version != MB_SHARD_VERSION)
        return mb_fail(err, "%s: offset %d: unsupported shard version %u (this build reads version %u)", path,
                       OFF_VERSION, version, MB_SHARD_VERSION);
    if (load_u32(data + OFF_HEADER_SIZE) != MB_SHARD_HEADER_SIZE)
        return mb_fail(err, "%s: offset %d: header size %u, expected %u", path, OFF_HEADER_SIZE,
                       load_u32(data + OFF_HEADER_SIZE), MB_SHARD_HEADER_SIZE);
    memset(info, 0, sizeof *info);
    info->fingerprint = load_u64(data + OFF_FINGERPRINT);
    info->vocab_size = load_u32(data + OFF_VOCAB);
    info->token_width = load_u32(data + OFF_WIDTH);
    info->document_count = load_u64(data + OFF_DOCUMENTS);
    info->token_count = load_u64(data + OFF_TOKENS);
    info->block_tokens = load_u32(data + OFF_BLOCK_TOKENS);
    info->block_count = load_u32(data + OFF_BLOCK_COUNT);
    info->flags = load_u32(data + OFF_FLAGS);
    info->file_size = load_u64(data + OFF_FILE_SIZE);
    if (info->vocab_size == 0 || info->vocab_size > (uint32_t)INT32_MAX)
        return mb_fail(err, "%s: offset %d: vocab size %u out of range", path, OFF_VOCAB, info->vocab_size);
    if (info->token_width != width_for_vocab(info->vocab_size))
        return mb_fail(err, "%s: offset %d: token width %u, but vocab size %u needs %u", path, OFF_WIDTH,
                       info->token_width, info->vocab_size, width_for_vocab(info->vocab_size));
    if (info->block_tokens == 0 || info->block_tokens > MB_SHARD_MAX_BLOCK_TOKENS)
        return mb_fail(err, "%s: offset %d: block size %u tokens out of range [1, %u]", path, OFF_BLOCK_TOKENS,
                       info->block_tokens, MB_SHARD_MAX_BLOCK_TOKENS);
    if ((info->flags & ~MB_SHARD_KNOWN_FLAGS) != 0)
        return mb_fail(err, "%s: offset %d: unknown flags 0x%x", path, OFF_FLAGS, info->flags);
    if (load_u32(data + OFF_RESERVED) != 0) return mb_fail(err, "%s: offset %d: reserved field not 0", path, OFF_RESERVED);
    if (info->file_size != (uint64_t)size)
        return mb_fail(err, "%s: offset %d: header says %" PRIu64 " bytes but the file has %zu (truncated or appended to)",
                       path, OFF_FILE_SIZE, info->file_size, size);
    uint64_t expected_blocks = info->token_count / info->block_tokens + (info->token_count % info->block_tokens != 0);
    if ((uint64_t)info->block_count != expected_blocks)
        return mb_fail(err, "%s: offset %d: %u blocks, but %" PRIu64 " tokens in blocks of %u need %" PRIu64, path,
                       OFF_BLOCK_COUNT, info->block_count, info->token_count, info->block_tokens, expected_blocks);
    if (info->document_count > ((uint64_t)size - MB_SHARD_HEADER_SIZE) / 8)
        return mb_fail(err, "%s: offset %d: %" PRIu64 " documents cannot fit in a %zu-byte file", path, OFF_DOCUMENTS,
                       info->document_count, size);
    uint64_t index_offset = MB_SHARD_HEADER_SIZE;
    uint64_t table_offset = index_offset + 8 * (info->document_count + 1);
    uint64_t payload_offset = table_offset + (uint64_t)MB_SHARD_BLOCK_ENTRY_SIZE * info->block_count + 8;
    if (load_u64(data + OFF_INDEX) != index_offset)
        return mb_fail(err, "%s: offset %d: index offset %" PRIu64 ", expected %" PRIu64, path, OFF_INDEX,
                       load_u64(data + OFF_INDEX), index_offset);
    if (load_u64(data + OFF_TABLE) != table_offset)
        return mb_fail(err, "%s: offset %d: block table offset %" PRIu64 ", expected %" PRIu64, path, OFF_TABLE,
                       load_u64(data + OFF_TABLE), table_offset);
    if (load_u64(data + OFF_PAYLOAD) != payload_offset)
        return mb_fail(err, "%s: offset %d: payload offset %" PRIu64 ", expected %" PRIu64, path, OFF_PAYLOAD,
                       load_u64(data + OFF_PAYLOAD), payload_offset);
    if (payload_offset > (uint64_t)size)
        return mb_fail(err, "%s: offset %zu: file ends before the payload starts at %" PRIu64 " (truncated?)", path,
                       size, payload_offset);
    *table = table_offset;
    return 0;
}

/* Checks the metadata checksum, the document index and the block table of a file whose header passed. */
static int check_metadata(const char *path, const uint8_t *data, size_t size, const mb_shard_info *info,
                          uint64_t table_offset, mb_error *err) {
    uint64_t checksum_offset = table_offset + (uint64_t)MB_SHARD_BLOCK_ENTRY_SIZE * info->block_count;
    uint64_t stored = load_u64(data + checksum_offset);
    uint64_t actual = mb_xxh64(data, (size_t)checksum_offset, 0);
    if (stored != actual)
        return mb_fail(err, "%s: offset %" PRIu64 ": metadata checksum mismatch (stored %016" PRIx64 ", computed %016" PRIx64
                       "): header, document index or block table is corrupted", path, checksum_offset, stored, actual);
    const uint8_t *index = data + MB_SHARD_HEADER_SIZE;
    if (load_u64(index) != 0) return mb_fail(err, "%s: offset %u: document index must start at 0", path, MB_SHARD_HEADER_SIZE);
    uint64_t previous = 0;
    for (uint64_t d = 1; d <= info->document_count; d++) {
        uint64_t offset = load_u64(index + 8 * d);
        if (offset < previous || offset - previous > UINT32_MAX)
            return mb_fail(err, "%s: offset %" PRIu64 ": document index entry %" PRIu64 " (%" PRIu64
                           ") is not monotonic or makes a document longer than 2^32-1 tokens (previous %" PRIu64 ")",
                           path, MB_SHARD_HEADER_SIZE + 8 * d, d, offset, previous);
        previous = offset;
    }
    if (previous != info->token_count)
        return mb_fail(err, "%s: offset %" PRIu64 ": document index ends at %" PRIu64 " tokens, header says %" PRIu64, path,
                       (uint64_t)MB_SHARD_HEADER_SIZE + 8 * info->document_count, previous, info->token_count);
    uint64_t expected_offset = checksum_offset + 8;
    for (uint32_t b = 0; b < info->block_count; b++) {
        const uint8_t *entry = data + table_offset + (uint64_t)MB_SHARD_BLOCK_ENTRY_SIZE * b;
        uint64_t offset = load_u64(entry), compressed = load_u64(entry + 8);
        uint64_t entry_offset = table_offset + (uint64_t)MB_SHARD_BLOCK_ENTRY_SIZE * b;
        if (offset != expected_offset)
            return mb_fail(err, "%s: offset %" PRIu64 ": block %u starts at %" PRIu64 ", expected %" PRIu64, path,
                           entry_offset, b, offset, expected_offset);
        if (compressed == 0 || compressed > (uint64_t)size - offset)
            return mb_fail(err, "%s: offset %" PRIu64 ": block %u compressed size %" PRIu64 " runs past the end of the file",
                           path, entry_offset + 8, b, compressed);
        expected_offset = offset + compressed;
    }
    if (expected_offset != (uint64_t)size)
        return mb_fail(err, "%s: offset %" PRIu64 ": blocks end at %" PRIu64 " but the file has %zu bytes", path,
                       expected_offset, expected_offset, size);
    return 0;
}

static int check_file(const char *path, const uint8_t *data, size_t size, uint64_t expected_fingerprint,
                      mb_shard_info *info, uint64_t *table_offset, mb_error *err) {
    if (check_header(path, data, size, info, table_offset, err) != 0) return -1;
    if (check_metadata(path, data, size, info, *table_offset, err) != 0) return -1;
    if (expected_fingerprint != 0 && info->fingerprint != expected_fingerprint)
        return mb_fail(err, "%s: offset %d: tokenizer fingerprint %016" PRIx64 " does not match the tokenizer in use (%016"
                       PRIx64 "): the shards were made with another tokenizer", path, OFF_FINGERPRINT, info->fingerprint,
                       expected_fingerprint);
    return 0;
}

static int map_file(const char *path, const uint8_t **map, size_t *size, mb_error *err) {
    *map = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return mb_fail(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return mb_fail(err, "%s: cannot stat: %s", path, strerror(errno));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return mb_fail(err, "%s: is a directory (name the shard files, e.g. %s/train-*.mbs)", path, path);
    }
    *size = (size_t)st.st_size;
    if (*size > 0) {
        void *m = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            close(fd);
            return mb_fail(err, "%s: cannot map %zu bytes: %s", path, *size, strerror(errno));
        }
        *map = m;
    }
    close(fd);
    return 0;
}

static void unmap_file(const uint8_t *map, size_t size) {
    if (map != NULL) munmap((void *)map, size);
}

/* ---- Block decoding -------------------------------------------------------------------------------------------- */

static uint32_t block_token_count(const mb_shard_info *info, uint32_t block) {
    if (block + 1 < info->block_count) return info->block_tokens;
    return (uint32_t)(info->token_count - (uint64_t)info->block_tokens * block);
}

/* Decompresses block `block` of a file into dst (capacity >= its raw size) and verifies checksum and ids. */
static int decode_block(ZSTD_DCtx *dctx, const char *path, const uint8_t *data, const mb_shard_info *info,
                        uint64_t table_offset, uint32_t block, uint8_t *dst, mb_error *err) {
    const uint8_t *entry = data + table_offset + (uint64_t)MB_SHARD_BLOCK_ENTRY_SIZE * block;
    uint64_t offset = load_u64(entry), compressed = load_u64(entry + 8), checksum = load_u64(entry + 16);
    size_t raw_bytes = (size_t)block_token_count(info, block) * info->token_width;
    size_t got = ZSTD_decompressDCtx(dctx, dst, raw_bytes, data + offset, (size_t)compressed);
    if (ZSTD_isError(got))
        return mb_fail(err, "%s: offset %" PRIu64 ": block %u does not decompress: %s", path, offset, block,
                       ZSTD_getErrorName(got));
    if (got != raw_bytes)
        return mb_fail(err, "%s: offset %" PRIu64 ": block %u decompresses to %zu bytes, expected %zu", path, offset,
                       block, got, raw_bytes);
    uint64_t actual = mb_xxh64(dst, raw_bytes, 0);
    if (actual != checksum)
        return mb_fail(err, "%s: offset %" PRIu64 ": block %u checksum mismatch (payload corrupted)", path, offset, block);
    /* The common case is one branch-free max over the block; only a bad block is scanned again for the position. */
    size_t count = raw_bytes / info->token_width;
    uint32_t largest = 0;
    if (info->token_width == 2) {
        for (size_t i = 0; i < count; i++) {
            uint32_t id = load_u16(dst + 2 * i);
            largest = id > largest ? id : largest;
        }
    } else {
        for (size_t i = 0; i < count; i++) {
            uint32_t id = load_u32(dst + 4 * i);
            largest = id > largest ? id : largest;
        }
    }
    if (count == 0 || largest < info->vocab_size) return 0;
    for (size_t i = 0; i < count; i++) {
        uint32_t id = info->token_width == 2 ? load_u16(dst + 2 * i) : load_u32(dst + 4 * i);
        if (id >= info->vocab_size)
            return mb_fail(err, "%s: offset %" PRIu64 ": block %u token %zu has id %u >= vocab size %u", path, offset,
                           block, i, id, info->vocab_size);
    }
    return 0;
}

int mb_shard_verify_file(const char *path, uint64_t expected_fingerprint, mb_shard_info *info_out, mb_error *err) {
    const uint8_t *map;
    size_t size;
    if (map_file(path, &map, &size, err) != 0) return -1;
    mb_shard_info info;
    uint64_t table_offset;
    int rc = check_file(path, map, size, expected_fingerprint, &info, &table_offset, err);
    uint8_t *buffer = NULL;
    ZSTD_DCtx *dctx = NULL;
    if (rc == 0 && info.block_count > 0) {
        buffer = malloc((size_t)info.block_tokens * info.token_width);
        dctx = ZSTD_createDCtx();
        if (buffer == NULL || dctx == NULL) rc = mb_fail(err, "%s: out of memory", path);
        for (uint32_t b = 0; rc == 0 && b < info.block_count; b++)
            rc = decode_block(dctx, path, map, &info, table_offset, b, buffer, err);
    }
    free(buffer);
    ZSTD_freeDCtx(dctx);
    unmap_file(map, size);
    if (rc == 0 && info_out != NULL) *info_out = info;
    return rc;
}

/* ---- Opening a set --------------------------------------------------------------------------------------------- */

typedef struct path_list {
    char **items;
    size_t count, capacity;
} path_list;

static int path_list_add(path_list *list, const char *path, mb_error *err) {
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? list->capacity * 2 : 16;
        char **items = realloc(list->items, capacity * sizeof *items);
        if (items == NULL) return mb_fail(err, "out of memory listing shard files");
        list->items = items;
        list->capacity = capacity;
    }
    list->items[list->count] = strdup(path);
    if (list->items[list->count] == NULL) return mb_fail(err, "out of memory listing shard files");
    list->count++;
    return 0;
}

static void path_list_free(path_list *list) {
    for (size_t i = 0; i < list->count; i++) free(list->items[i]);
    free(list->items);
}

static int compare_paths(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Expands one glob (or literal path) into the list. A glob that matches nothing is an error. */
static int expand_pattern(path_list *list, const char *pattern, mb_error *err) {
    if (strpbrk(pattern, "*?[") == NULL) return path_list_add(list, pattern, err);
    glob_t matches;
    int rc = glob(pattern, 0, NULL, &matches);
    if (rc == GLOB_NOMATCH) return mb_fail(err, "%s: no files match this pattern", pattern);
    if (rc != 0) return mb_fail(err, "%s: cannot expand pattern (glob error %d)", pattern, rc);
    int failed = 0;
    for (size_t i = 0; i < matches.gl_pathc && !failed; i++)
        failed = path_list_add(list, matches.gl_pathv[i], err) != 0;
    globfree(&matches);
    return failed ? -1 : 0;
}

static int collect_paths(path_list *list, const char *const *patterns, int pattern_count, mb_error *err) {
    for (int p = 0; p < pattern_count; p++) {
        char *copy = strdup(patterns[p]);
        if (copy == NULL) return mb_fail(err, "out of memory");
        int failed = 0;
        char *save = NULL;
        for (char *piece = strtok_r(copy, ",", &save); piece != NULL && !failed; piece = strtok_r(NULL, ",", &save))
            if (*piece != '\0') failed = expand_pattern(list, piece, err) != 0;
        free(copy);
        if (failed) return -1;
    }
    if (list->count == 0) return mb_fail(err, "no shard files given");
    qsort(list->items, list->count, sizeof *list->items, compare_paths);
    size_t unique = 1;
    for (size_t i = 1; i < list->count; i++) {
        if (strcmp(list->items[i], list->items[unique - 1]) == 0) {
            free(list->items[i]);
        } else {
            list->items[unique++] = list->items[i];
        }
    }
    list->count = unique;
    return 0;
}

/* Adds a mapped, checked file to the set, enforcing that all files agree on tokenizer, vocab and flags. */
static int add_file(mb_shard_set *set, char *path, uint64_t expected_fingerprint, mb_error *err) {
    shard_file *file = &set->files[set->file_count];
    memset(file, 0, sizeof *file);
    file->path = path;
    if (map_file(path, &file->map, &file->size, err) != 0) return -1;
    set->file_count++; /* owned by the set from here, so close() unmaps it */
    if (check_file(path, file->map, file->size, expected_fingerprint, &file->info, &file->table_offset, err) != 0)
        return -1;
    if (set->file_count == 1) {
        set->fingerprint = file->info.fingerprint;
        set->vocab_size = file->info.vocab_size;
        set->flags = file->info.flags;
    } else if (file->info.fingerprint != set->fingerprint) {
        return mb_fail(err, "%s: offset %d: tokenizer fingerprint %016" PRIx64 " differs from %s (%016" PRIx64
                       "): the shards of one set must come from one tokenizer", path, OFF_FINGERPRINT,
                       file->info.fingerprint, set->files[0].path, set->fingerprint);
    } else if (file->info.vocab_size != set->vocab_size || file->info.flags != set->flags) {
        return mb_fail(err, "%s: vocab size %u / flags 0x%x differ from %s (vocab size %u / flags 0x%x)", path,
                       file->info.vocab_size, file->info.flags, set->files[0].path, set->vocab_size, set->flags);
    }
    file->first_document = set->document_count;
    set->document_count += file->info.document_count;
    set->token_count += file->info.token_count;
    size_t block_bytes = (size_t)file->info.block_tokens * file->info.token_width;
    if (block_bytes > set->max_block_bytes) set->max_block_bytes = block_bytes;
    return 0;
}

int mb_shard_set_open(mb_shard_set **set_out, const char *const *patterns, int pattern_count,
                      uint64_t expected_fingerprint, mb_error *err) {
    *set_out = NULL;
    path_list paths = {0};
    if (collect_paths(&paths, patterns, pattern_count, err) != 0) {
        path_list_free(&paths);
        return -1;
    }
    mb_shard_set *set = calloc(1, sizeof *set);
    shard_file *files = set ? calloc(paths.count, sizeof *files) : NULL;
    if (files == NULL) {
        free(set);
        path_list_free(&paths);
        return mb_fail(err, "out of memory opening %zu shard files", paths.count);
    }
    set->files = files;
    size_t taken = 0;
    int rc = 0;
    for (; taken < paths.count && rc == 0; taken++) rc = add_file(set, paths.items[taken], expected_fingerprint, err);
    /* Paths handed to add_file belong to the set (freed by close); free the rest. */
    if (rc != 0 && set->file_count < taken) free(paths.items[taken - 1]);
    for (size_t i = taken; i < paths.count; i++) free(paths.items[i]);
    free(paths.items);
    if (rc == 0 && set->document_count == 0)
        rc = mb_fail(err, "%s%s: no documents in %zu shard file(s)", patterns[0], pattern_count > 1 ? ", ..." : "",
                     set->file_count);
    if (rc != 0) {
        mb_shard_set_close(set);
        return -1;
    }
    *set_out = set;
    return 0;
}

void mb_shard_set_close(mb_shard_set *set) {
    if (set == NULL) return;
    mb_shard_reader_close(set->own_reader);
    for (size_t i = 0; i < set->file_count; i++) {
        unmap_file(set->files[i].map, set->files[i].size);
        free(set->files[i].path);
    }
    free(set->files);
    free(set);
}

uint64_t mb_shard_set_document_count(const mb_shard_set *set) { return set->document_count; }
uint64_t mb_shard_set_token_count(const mb_shard_set *set) { return set->token_count; }
uint64_t mb_shard_set_fingerprint(const mb_shard_set *set) { return set->fingerprint; }
uint32_t mb_shard_set_vocab_size(const mb_shard_set *set) { return set->vocab_size; }
uint32_t mb_shard_set_flags(const mb_shard_set *set) { return set->flags; }
size_t mb_shard_set_file_count(const mb_shard_set *set) { return set->file_count; }

const char *mb_shard_set_file_path(const mb_shard_set *set, size_t file) {
    return file < set->file_count ? set->files[file].path : NULL;
}

/* The file holding global document `index` (index < document_count): the last file whose first_document <= index. */
static size_t locate_file(const mb_shard_set *set, uint64_t index) {
    size_t lo = 0, hi = set->file_count;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (set->files[mid].first_document <= index) lo = mid;
        else hi = mid;
    }
    /* Files with zero documents share first_document with the next one; skip them. */
    while (set->files[lo].info.document_count == 0 || index - set->files[lo].first_document >= set->files[lo].info.document_count)
        lo++;
    return lo;
}

static uint64_t document_start(const shard_file *file, uint64_t local) {
    return load_u64(file->map + MB_SHARD_HEADER_SIZE + 8 * local);
}

uint32_t mb_shard_set_document_length(const mb_shard_set *set, uint64_t index) {
    if (index >= set->document_count) return 0;
    const shard_file *file = &set->files[locate_file(set, index)];
    uint64_t local = index - file->first_document;
    return (uint32_t)(document_start(file, local + 1) - document_start(file, local));
}

/* ---- Readers --------------------------------------------------------------------------------------------------- */

int mb_shard_reader_open(mb_shard_reader **reader_out, const mb_shard_set *set, mb_error *err) {
    *reader_out = NULL;
    mb_shard_reader *reader = calloc(1, sizeof *reader);
    if (reader == NULL) return mb_fail(err, "out of memory creating a shard reader");
    reader->set = set;
    reader->dctx = ZSTD_createDCtx();
    int failed = reader->dctx == NULL;
    for (int i = 0; i < CACHE_ENTRIES && !failed; i++) {
        reader->cache[i].data = malloc(set->max_block_bytes > 0 ? set->max_block_bytes : 1);
        failed = reader->cache[i].data == NULL;
    }
    if (failed) {
        mb_shard_reader_close(reader);
        return mb_fail(err, "out of memory creating a shard reader (%d blocks of %zu bytes)", CACHE_ENTRIES,
                       set->max_block_bytes);
    }
    *reader_out = reader;
    return 0;
}

void mb_shard_reader_close(mb_shard_reader *reader) {
    if (reader == NULL) return;
    for (int i = 0; i < CACHE_ENTRIES; i++) free(reader->cache[i].data);
    ZSTD_freeDCtx(reader->dctx);
    free(reader);
}

/* Returns the raw bytes of a block, from the cache or freshly decoded into the least recently used entry. */
static const uint8_t *get_block(mb_shard_reader *reader, size_t file_index, uint32_t block, mb_error *err) {
    cached_block *victim = &reader->cache[0];
    reader->clock++;
    for (int i = 0; i < CACHE_ENTRIES; i++) {
        cached_block *entry = &reader->cache[i];
        if (entry->valid && entry->file == file_index && entry->block == block) {
            entry->last_use = reader->clock;
            return entry->data;
        }
        if (!entry->valid || (victim->valid && entry->last_use < victim->last_use)) victim = entry;
    }
    const shard_file *file = &reader->set->files[file_index];
    victim->valid = 0;
    if (decode_block(reader->dctx, file->path, file->map, &file->info, file->table_offset, block, victim->data, err) != 0)
        return NULL;
    victim->valid = 1;
    victim->file = file_index;
    victim->block = block;
    victim->last_use = reader->clock;
    return victim->data;
}

int mb_shard_reader_read_tokens(mb_shard_reader *reader, uint64_t index, uint64_t offset, uint32_t count,
                                int32_t *out, mb_error *err) {
    const mb_shard_set *set = reader->set;
    if (index >= set->document_count)
        return mb_fail(err, "document %" PRIu64 " out of range (the shard set has %" PRIu64 ")", index,
                       set->document_count);
    size_t file_index = locate_file(set, index);
    const shard_file *file = &set->files[file_index];
    uint64_t local = index - file->first_document;
    uint64_t start = document_start(file, local), length = document_start(file, local + 1) - start;
    if (offset > length || count > length - offset)
        return mb_fail(err, "%s: document %" PRIu64 ": tokens [%" PRIu64 ", %" PRIu64 ") out of range (length %" PRIu64 ")",
                       file->path, local, offset, offset + count, length);
    uint64_t position = start + offset;
    uint32_t width = file->info.token_width;
    while (count > 0) {
        uint32_t block = (uint32_t)(position / file->info.block_tokens);
        uint32_t within = (uint32_t)(position % file->info.block_tokens);
        uint32_t available = block_token_count(&file->info, block) - within;
        uint32_t take = count < available ? count : available;
        const uint8_t *raw = get_block(reader, file_index, block, err);
        if (raw == NULL) return -1;
        raw += (size_t)within * width;
        if (width == 2) {
            for (uint32_t i = 0; i < take; i++) out[i] = (int32_t)load_u16(raw + 2 * i);
        } else {
            for (uint32_t i = 0; i < take; i++) out[i] = (int32_t)load_u32(raw + 4 * i);
        }
        out += take;
        count -= take;
        position += take;
    }
    return 0;
}

int mb_shard_reader_read_document(mb_shard_reader *reader, uint64_t index, int32_t *out, mb_error *err) {
    if (index >= reader->set->document_count)
        return mb_fail(err, "document %" PRIu64 " out of range (the shard set has %" PRIu64 ")", index,
                       reader->set->document_count);
    return mb_shard_reader_read_tokens(reader, index, 0, mb_shard_set_document_length(reader->set, index), out, err);
}

static int own_reader(mb_shard_set *set, mb_error *err) {
    if (set->own_reader != NULL) return 0;
    return mb_shard_reader_open(&set->own_reader, set, err);
}

int mb_shard_set_read_document(mb_shard_set *set, uint64_t index, int32_t *out, mb_error *err) {
    if (own_reader(set, err) != 0) return -1;
    return mb_shard_reader_read_document(set->own_reader, index, out, err);
}

int mb_shard_set_read_tokens(mb_shard_set *set, uint64_t index, uint64_t offset, uint32_t count, int32_t *out,
                             mb_error *err) {
    if (own_reader(set, err) != 0) return -1;
    return mb_shard_reader_read_tokens(set->own_reader, index, offset, count, out, err);
}
