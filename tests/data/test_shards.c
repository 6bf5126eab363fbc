/* Token shards: writer/reader round trips (u16 and u32 ids, empty documents, documents spanning blocks, several
 * files in one set, parallel readers) and rejection of corrupted files (magic, version, truncation at every offset,
 * bit flips in every metadata byte and in the payload, crafted metadata with a valid checksum, empty file, zero
 * documents, tokenizer fingerprint mismatches). */
#include <criterion/criterion.h>

#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#include "common/fileio.h"
#include "common/rng.h"
#include "data/shard_writer.h"
#include "data/shards.h"

/* ---- helpers ---------------------------------------------------------------------------------------------------- */

typedef struct corpus {
    size_t count;
    int32_t **docs;
    size_t *lengths;
} corpus;

static char temp_dir[256];

static void make_temp_dir(void) {
    snprintf(temp_dir, sizeof temp_dir, "/tmp/mb_test_shards_XXXXXX");
    cr_assert_not_null(mkdtemp(temp_dir));
}

static void remove_temp_dir(void) {
    char pattern[300];
    snprintf(pattern, sizeof pattern, "%s/*", temp_dir);
    glob_t g;
    if (glob(pattern, 0, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++) unlink(g.gl_pathv[i]);
        globfree(&g);
    }
    rmdir(temp_dir);
}

static void temp_path(char *out, size_t size, const char *name) {
    cr_assert_eq(mb_path_join(out, size, temp_dir, name), 0);
}

/* Random documents: lengths drawn so that some are empty, most are short and a few are long. */
static corpus random_corpus(uint64_t seed, size_t count, uint32_t vocab, uint32_t max_length) {
    corpus c = {count, calloc(count, sizeof(int32_t *)), calloc(count, sizeof(size_t))};
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    for (size_t d = 0; d < count; d++) {
        uint64_t kind = mb_rng_below(&rng, 10);
        size_t length = kind == 0 ? 0 : kind < 8 ? (size_t)mb_rng_below(&rng, 40) + 1 : (size_t)mb_rng_below(&rng, max_length) + 1;
        c.lengths[d] = length;
        c.docs[d] = malloc((length + 1) * sizeof(int32_t));
        for (size_t i = 0; i < length; i++) c.docs[d][i] = (int32_t)mb_rng_below(&rng, vocab);
        if (length > 0) c.docs[d][0] = (int32_t)(vocab - 1); /* the largest id must survive the trip */
    }
    return c;
}

static void free_corpus(corpus *c) {
    for (size_t d = 0; d < c->count; d++) free(c->docs[d]);
    free(c->docs);
    free(c->lengths);
}

static void write_shard(const char *path, const corpus *c, size_t first, size_t count, uint32_t vocab,
                        uint32_t block_tokens, uint64_t fingerprint) {
    mb_shard_writer_options options = {.tokenizer_fingerprint = fingerprint, .vocab_size = vocab,
                                       .block_tokens = block_tokens, .flags = MB_SHARD_FLAG_SPECIAL_TOKENS};
    mb_shard_writer *writer;
    mb_error err = {{0}};
    cr_assert_eq(mb_shard_writer_open(&writer, path, &options, &err), 0, "%s", err.message);
    for (size_t d = first; d < first + count; d++)
        cr_assert_eq(mb_shard_writer_add_document(writer, c->docs[d], c->lengths[d], &err), 0, "%s", err.message);
    cr_assert_eq(mb_shard_writer_document_count(writer), count);
    uint64_t bytes = 0, estimate = mb_shard_writer_estimated_bytes(writer);
    cr_assert_eq(mb_shard_writer_finish(writer, &bytes, &err), 0, "%s", err.message);
    cr_assert_gt(bytes, MB_SHARD_HEADER_SIZE);
    cr_assert_leq(bytes, estimate + 64 * (count + 1)); /* a block compresses to at most about its raw size */
}

static void read_bytes(const char *path, uint8_t **data, size_t *size) {
    mb_error err;
    char *buffer;
    cr_assert_eq(mb_read_file(path, &buffer, size, &err), 0, "%s", err.message);
    *data = (uint8_t *)buffer;
}

static void write_bytes(const char *path, const uint8_t *data, size_t size) {
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    if (size > 0) cr_assert_eq(fwrite(data, 1, size, f), size);
    fclose(f);
}

static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Recomputes the metadata checksum after a deliberate edit, so the semantic checks behind it are reached. */
static void reseal(uint8_t *data) {
    uint64_t payload = get_u64(data + 80);
    put_u64(data + payload - 8, mb_xxh64(data, (size_t)(payload - 8), 0));
}

static int open_one(const char *path, uint64_t fingerprint, mb_shard_set **set, mb_error *err) {
    const char *patterns[] = {path};
    return mb_shard_set_open(set, patterns, 1, fingerprint, err);
}

/* Reads every document of a set through `reader` in a shuffled order and compares with the corpus. */
static void check_all_documents(mb_shard_set *set, mb_shard_reader *reader, const corpus *c, uint64_t seed) {
    mb_error err = {{0}};
    cr_assert_eq(mb_shard_set_document_count(set), c->count);
    uint64_t *order = malloc(c->count * sizeof *order);
    for (size_t i = 0; i < c->count; i++) order[i] = i;
    mb_rng rng;
    mb_rng_seed(&rng, seed);
    for (size_t i = c->count; i > 1; i--) {
        size_t j = (size_t)mb_rng_below(&rng, i);
        uint64_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (size_t k = 0; k < c->count; k++) {
        uint64_t d = order[k];
        cr_assert_eq(mb_shard_set_document_length(set, d), c->lengths[d], "doc %lu", (unsigned long)d);
        int32_t *out = malloc((c->lengths[d] + 1) * sizeof *out);
        int rc = reader ? mb_shard_reader_read_document(reader, d, out, &err) : mb_shard_set_read_document(set, d, out, &err);
        cr_assert_eq(rc, 0, "%s", err.message);
        if (c->lengths[d] > 0) cr_assert_arr_eq(out, c->docs[d], c->lengths[d] * sizeof *out, "doc %lu", (unsigned long)d);
        free(out);
    }
    free(order);
}

/* ---- checksum ---------------------------------------------------------------------------------------------------- */

Test(shards, xxh64_known_vectors) {
    cr_assert_eq(mb_xxh64("", 0, 0), 0xEF46DB3751D8E999ULL);
    cr_assert_eq(mb_xxh64("a", 1, 0), 0xD24EC4F1A98C6E5BULL);
    cr_assert_eq(mb_xxh64("abc", 3, 0), 0x44BC2CF5AD770999ULL);
}

/* zstd's frame checksum is the low 32 bits of XXH64(content, seed 0): compare for every length path (<4, <8, <32,
 * stripes plus every tail length). */
Test(shards, xxh64_matches_zstd_frame_checksum) {
    uint8_t data[300];
    mb_rng rng;
    mb_rng_seed(&rng, 7);
    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)mb_rng_next_u64(&rng);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
    uint8_t frame[1024];
    for (size_t length = 0; length <= sizeof data; length++) {
        size_t n = ZSTD_compress2(cctx, frame, sizeof frame, data, length);
        cr_assert(!ZSTD_isError(n));
        uint32_t stored = (uint32_t)frame[n - 4] | (uint32_t)frame[n - 3] << 8 | (uint32_t)frame[n - 2] << 16 |
                          (uint32_t)frame[n - 1] << 24;
        cr_assert_eq((uint32_t)mb_xxh64(data, length, 0), stored, "length %zu", length);
    }
    ZSTD_freeCCtx(cctx);
}

/* ---- round trips ------------------------------------------------------------------------------------------------- */

static void round_trip(uint32_t vocab, uint32_t block_tokens, uint64_t seed) {
    make_temp_dir();
    corpus c = random_corpus(seed, 300, vocab, 500);
    char a[300], b[300], empty[300], pattern[300];
    temp_path(a, sizeof a, "train-000000.mbs");
    temp_path(b, sizeof b, "train-000002.mbs");
    temp_path(empty, sizeof empty, "train-000001.mbs");
    write_shard(a, &c, 0, 170, vocab, block_tokens, 0x1234);
    write_shard(empty, &c, 170, 0, vocab, block_tokens, 0x1234); /* a zero-document shard inside a set is fine */
    write_shard(b, &c, 170, 130, vocab, block_tokens, 0x1234);

    mb_error err = {{0}};
    mb_shard_info info;
    cr_assert_eq(mb_shard_verify_file(a, 0x1234, &info, &err), 0, "%s", err.message);
    cr_assert_eq(info.token_width, vocab <= 65536 ? 2u : 4u);
    cr_assert_eq(info.document_count, 170);
    cr_assert_eq(info.block_tokens, block_tokens ? block_tokens : MB_SHARD_DEFAULT_BLOCK_TOKENS);
    cr_assert_eq(info.flags, MB_SHARD_FLAG_SPECIAL_TOKENS);
    uint64_t total = 0;
    for (size_t d = 0; d < c.count; d++) total += c.lengths[d];

    temp_path(pattern, sizeof pattern, "train-*.mbs");
    const char *patterns[] = {pattern};
    mb_shard_set *set;
    cr_assert_eq(mb_shard_set_open(&set, patterns, 1, 0x1234, &err), 0, "%s", err.message);
    cr_assert_eq(mb_shard_set_file_count(set), 3);
    cr_assert_str_eq(mb_shard_set_file_path(set, 0), a);
    cr_assert_eq(mb_shard_set_token_count(set), total);
    cr_assert_eq(mb_shard_set_fingerprint(set), 0x1234);
    cr_assert_eq(mb_shard_set_vocab_size(set), vocab);
    check_all_documents(set, NULL, &c, seed + 1);

    /* Two independent readers interleaved, and partial reads across block boundaries. */
    mb_shard_reader *r1, *r2;
    cr_assert_eq(mb_shard_reader_open(&r1, set, &err), 0, "%s", err.message);
    cr_assert_eq(mb_shard_reader_open(&r2, set, &err), 0, "%s", err.message);
    check_all_documents(set, r1, &c, seed + 2);
    check_all_documents(set, r2, &c, seed + 3);
    for (size_t d = 0; d < c.count; d++) {
        if (c.lengths[d] < 3) continue;
        int32_t out[600];
        uint64_t offset = c.lengths[d] / 3;
        uint32_t count = (uint32_t)(c.lengths[d] - offset - 1);
        cr_assert_eq(mb_shard_reader_read_tokens(r1, d, offset, count, out, &err), 0, "%s", err.message);
        cr_assert_arr_eq(out, c.docs[d] + offset, count * sizeof(int32_t));
        cr_assert_neq(mb_shard_reader_read_tokens(r2, d, offset, (uint32_t)c.lengths[d], out, &err), 0);
        cr_assert(strstr(err.message, "out of range") != NULL, "%s", err.message);
    }
    int32_t dummy[1];
    cr_assert_neq(mb_shard_reader_read_document(r1, c.count, dummy, &err), 0);
    cr_assert_eq(mb_shard_set_document_length(set, c.count), 0);
    mb_shard_reader_close(r1);
    mb_shard_reader_close(r2);
    mb_shard_set_close(set);

    /* The same files listed twice, comma-separated and as separate patterns: deduplicated, same order. */
    char list[700];
    snprintf(list, sizeof list, "%s,%s", b, a);
    const char *patterns2[] = {list, pattern};
    cr_assert_eq(mb_shard_set_open(&set, patterns2, 2, 0, &err), 0, "%s", err.message);
    cr_assert_eq(mb_shard_set_file_count(set), 3);
    check_all_documents(set, NULL, &c, seed + 4);
    mb_shard_set_close(set);
    free_corpus(&c);
    remove_temp_dir();
}

Test(shards, round_trip_u16_small_blocks) { round_trip(50368, 37, 1); }
Test(shards, round_trip_u16_default_blocks) { round_trip(50368, 0, 2); }
Test(shards, round_trip_u16_full_range) { round_trip(65536, 256, 3); }
Test(shards, round_trip_u32) { round_trip(100000, 64, 4); }
Test(shards, round_trip_single_token_blocks) { round_trip(300, 1, 5); }

Test(shards, writer_rejects_bad_ids) {
    make_temp_dir();
    char path[300];
    temp_path(path, sizeof path, "bad.mbs");
    mb_shard_writer_options options = {.vocab_size = 100};
    mb_shard_writer *writer;
    mb_error err = {{0}};
    cr_assert_eq(mb_shard_writer_open(&writer, path, &options, &err), 0);
    int32_t ok[] = {0, 99}, too_big[] = {5, 100}, negative[] = {-1};
    cr_assert_eq(mb_shard_writer_add_document(writer, ok, 2, &err), 0);
    cr_assert_neq(mb_shard_writer_add_document(writer, too_big, 2, &err), 0);
    cr_assert(strstr(err.message, "id 100") != NULL && strstr(err.message, "bad.mbs") != NULL, "%s", err.message);
    cr_assert_neq(mb_shard_writer_add_document(writer, negative, 1, &err), 0);
    cr_assert_eq(mb_shard_writer_document_count(writer), 1);
    mb_shard_writer_abort(writer);
    cr_assert(!mb_path_exists(path), "abort must not leave a file");
    remove_temp_dir();
}

/* ---- corruption -------------------------------------------------------------------------------------------------- */

/* A small valid shard (u16, blocks of 16 tokens) and its bytes. */
static void small_shard(char *path, size_t path_size, uint8_t **data, size_t *size, corpus *c) {
    make_temp_dir();
    temp_path(path, path_size, "s.mbs");
    *c = random_corpus(11, 40, 50368, 60);
    write_shard(path, c, 0, c->count, 50368, 16, 0xABCDEF);
    read_bytes(path, data, size);
}

static void expect_open_error(const char *path, const char *needle) {
    mb_shard_set *set = NULL;
    mb_error err = {{0}};
    cr_assert_neq(open_one(path, 0, &set, &err), 0, "expected an error containing '%s'", needle);
    cr_assert_null(set);
    cr_assert(strstr(err.message, path) != NULL, "error must name the file: %s", err.message);
    cr_assert(strstr(err.message, needle) != NULL, "expected '%s' in: %s", needle, err.message);
}

Test(shards, bad_magic_and_version) {
    char path[300];
    uint8_t *data;
    size_t size;
    corpus c;
    small_shard(path, sizeof path, &data, &size, &c);
    data[0] ^= 0x20;
    write_bytes(path, data, size);
    expect_open_error(path, "bad magic");
    data[0] ^= 0x20;
    data[8] = 2;
    write_bytes(path, data, size);
    expect_open_error(path, "offset 8: unsupported shard version 2");
    free(data);
    free_corpus(&c);
    remove_temp_dir();
}

Test(shards, empty_file) {
    make_temp_dir();
    char path[300];
    temp_path(path, sizeof path, "empty.mbs");
    write_bytes(path, NULL, 0);
    expect_open_error(path, "empty file");
    remove_temp_dir();
}

Test(shards, truncated_at_every_offset) {
    char path[300], cut[300];
    uint8_t *data;
    size_t size;
    corpus c;
    small_shard(path, sizeof path, &data, &size, &c);
    temp_path(cut, sizeof cut, "cut.mbs");
    for (size_t length = 0; length < size; length++) {
        write_bytes(cut, data, length);
        mb_shard_set *set = NULL;
        mb_error err = {{0}};
        cr_assert_neq(open_one(cut, 0, &set, &err), 0, "truncated to %zu of %zu bytes was accepted", length, size);
        cr_assert(strstr(err.message, cut) != NULL && strstr(err.message, "offset") != NULL, "%s", err.message);
        cr_assert_neq(mb_shard_verify_file(cut, 0, NULL, &err), 0);
    }
    /* Appended garbage is caught as well. */
    uint8_t *longer = malloc(size + 1);
    memcpy(longer, data, size);
    longer[size] = 0;
    write_bytes(cut, longer, size + 1);
    expect_open_error(cut, "appended");
    free(longer);
    free(data);
    free_corpus(&c);
    remove_temp_dir();
}

Test(shards, bit_flips_in_metadata_are_caught_at_open) {
    char path[300], bad[300];
    uint8_t *data;
    size_t size;
    corpus c;
    small_shard(path, sizeof path, &data, &size, &c);
    temp_path(bad, sizeof bad, "flip.mbs");
    size_t payload = (size_t)get_u64(data + 80);
    for (size_t byte = 0; byte < payload; byte++) {
        for (int bit = 0; bit < 8; bit += 3) {
            data[byte] ^= (uint8_t)(1u << bit);
            write_bytes(bad, data, size);
            mb_shard_set *set = NULL;
            mb_error err = {{0}};
            cr_assert_neq(open_one(bad, 0, &set, &err), 0, "flip of bit %d at byte %zu was accepted", bit, byte);
            cr_assert(strstr(err.message, "offset") != NULL, "%s", err.message);
            data[byte] ^= (uint8_t)(1u << bit);
        }
    }
    free(data);
    free_corpus(&c);
    remove_temp_dir();
}

/* A flip in the compressed payload passes open (metadata intact) but must never yield wrong tokens: reading fails
 * (zstd error, wrong size or checksum mismatch) unless the decoded block is still exactly right. */
Test(shards, bit_flips_in_payload_never_give_wrong_tokens) {
    char path[300], bad[300];
    uint8_t *data;
    size_t size;
    corpus c;
    small_shard(path, sizeof path, &data, &size, &c);
    temp_path(bad, sizeof bad, "flip.mbs");
    size_t payload = (size_t)get_u64(data + 80);
    size_t detected = 0, trials = 0;
    for (size_t byte = payload; byte < size; byte++) {
        data[byte] ^= 0x10;
        write_bytes(bad, data, size);
        mb_shard_set *set = NULL;
        mb_error err = {{0}};
        cr_assert_eq(open_one(bad, 0, &set, &err), 0, "%s", err.message);
        int failed = 0;
        for (size_t d = 0; d < c.count && !failed; d++) {
            int32_t out[64];
            if (mb_shard_set_read_document(set, d, out, &err) != 0) {
                failed = 1;
                cr_assert(strstr(err.message, "block") != NULL && strstr(err.message, bad) != NULL, "%s", err.message);
            } else if (c.lengths[d] > 0) {
                cr_assert_arr_eq(out, c.docs[d], c.lengths[d] * sizeof(int32_t), "silent corruption at byte %zu", byte);
            }
        }
        mb_shard_set_close(set);
        cr_assert_eq(mb_shard_verify_file(bad, 0, NULL, &err) != 0, failed);
        detected += (size_t)failed;
        trials++;
        data[byte] ^= 0x10;
    }
    cr_assert_gt(detected * 10, trials * 9, "only %zu of %zu payload flips detected", detected, trials);
    free(data);
    free_corpus(&c);
    remove_temp_dir();
}

/* Metadata edits with a recomputed checksum reach the semantic checks. */
Test(shards, crafted_metadata_with_valid_checksum) {
    char path[300], bad[300];
    uint8_t *data;
    size_t size;
    corpus c;
    small_shard(path, sizeof path, &data, &size, &c);
    temp_path(bad, sizeof bad, "crafted.mbs");
    uint8_t *copy = malloc(size);
    uint64_t table = get_u64(data + 72);

    /* The index goes backwards at document 5. */
    memcpy(copy, data, size);
    put_u64(copy + 96 + 8 * 5, get_u64(copy + 96 + 8 * 4) - 1);
    reseal(copy);
    write_bytes(bad, copy, size);
    expect_open_error(bad, "not monotonic");

    /* The index does not end at the token count. */
    memcpy(copy, data, size);
    put_u64(copy + 96 + 8 * c.count, get_u64(copy + 40) + 1);
    reseal(copy);
    write_bytes(bad, copy, size);
    expect_open_error(bad, "document index ends at");

    /* Block 1 claims to start one byte late. */
    memcpy(copy, data, size);
    put_u64(copy + table + 24, get_u64(copy + table + 24) + 1);
    reseal(copy);
    write_bytes(bad, copy, size);
    expect_open_error(bad, "block 1 starts at");

    /* A vocab size smaller than the stored ids: open passes, decoding the block reports the id. */
    memcpy(copy, data, size);
    copy[24] = 100;
    copy[25] = copy[26] = copy[27] = 0;
    reseal(copy);
    write_bytes(bad, copy, size);
    mb_shard_set *set;
    mb_error err = {{0}};
    cr_assert_eq(open_one(bad, 0, &set, &err), 0, "%s", err.message);
    int32_t out[64];
    int failed = 0;
    for (size_t d = 0; d < c.count && !failed; d++) failed = mb_shard_set_read_document(set, d, out, &err) != 0;
    cr_assert(failed);
    cr_assert(strstr(err.message, ">= vocab size 100") != NULL, "%s", err.message);
    mb_shard_set_close(set);

    /* Token width that does not match the vocab size. */
    memcpy(copy, data, size);
    copy[28] = 4;
    reseal(copy);
    write_bytes(bad, copy, size);
    expect_open_error(bad, "offset 28: token width 4");
    free(copy);
    free(data);
    free_corpus(&c);
    remove_temp_dir();
}

Test(shards, zero_document_shard) {
    make_temp_dir();
    char path[300];
    temp_path(path, sizeof path, "none.mbs");
    corpus c = random_corpus(3, 1, 1000, 10);
    write_shard(path, &c, 0, 0, 1000, 0, 77);
    mb_error err = {{0}};
    mb_shard_info info;
    cr_assert_eq(mb_shard_verify_file(path, 77, &info, &err), 0, "%s", err.message);
    cr_assert_eq(info.document_count, 0);
    cr_assert_eq(info.block_count, 0);
    expect_open_error(path, "no documents");
    free_corpus(&c);
    remove_temp_dir();
}

Test(shards, fingerprint_mismatch_names_the_file) {
    make_temp_dir();
    char a[300], b[300], pattern[300];
    temp_path(a, sizeof a, "a.mbs");
    temp_path(b, sizeof b, "b.mbs");
    corpus c = random_corpus(5, 20, 1000, 30);
    write_shard(a, &c, 0, 10, 1000, 8, 111);
    write_shard(b, &c, 10, 10, 1000, 8, 222);
    mb_shard_set *set = NULL;
    mb_error err = {{0}};
    cr_assert_neq(open_one(a, 222, &set, &err), 0);
    cr_assert(strstr(err.message, a) != NULL && strstr(err.message, "fingerprint") != NULL, "%s", err.message);
    cr_assert_neq(mb_shard_verify_file(a, 222, NULL, &err), 0);
    /* Without an expected fingerprint, two tokenizers in one set are still an error naming the odd file. */
    temp_path(pattern, sizeof pattern, "*.mbs");
    cr_assert_neq(open_one(pattern, 0, &set, &err), 0);
    cr_assert(strstr(err.message, b) != NULL && strstr(err.message, "one tokenizer") != NULL, "%s", err.message);
    cr_assert_eq(open_one(b, 222, &set, &err), 0, "%s", err.message);
    mb_shard_set_close(set);
    free_corpus(&c);
    remove_temp_dir();
}

Test(shards, missing_files_and_patterns) {
    mb_shard_set *set = NULL;
    mb_error err = {{0}};
    cr_assert_neq(open_one("/nonexistent/dir/x.mbs", 0, &set, &err), 0);
    cr_assert(strstr(err.message, "/nonexistent/dir/x.mbs") != NULL, "%s", err.message);
    cr_assert_neq(open_one("/nonexistent/dir/*.mbs", 0, &set, &err), 0);
    cr_assert(strstr(err.message, "no files match") != NULL, "%s", err.message);
    cr_assert_neq(open_one("/tmp", 0, &set, &err), 0);
    cr_assert(strstr(err.message, "directory") != NULL, "%s", err.message);
}
