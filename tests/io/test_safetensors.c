/* Tests for src/io/safetensors.c: byte-exact agreement with the reference writer (byte vectors from
 * huggingface/safetensors tensor.rs unit tests and hand-assembled headers), round trips of every dtype, header padding,
 * bf16/f16 rounding against a nearest-value oracle, and rejection of every kind of malformed file. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/rng.h"
#include "io/safetensors.h"

/* ---------------------------------------------------------------- helpers */

static void make_temp_dir(char *out, size_t capacity) {
    snprintf(out, capacity, "/tmp/mb_test_st_XXXXXX");
    cr_assert_not_null(mkdtemp(out));
}

static int remove_entry(const char *path, const struct stat *info, int type, struct FTW *ftw) {
    (void)info, (void)type, (void)ftw;
    return remove(path);
}

/* Deletes a test's temporary directory (only reached when the test's assertions passed). */
static void remove_tree(const char *dir) { cr_assert_eq(nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS), 0); }

static void temp_path(char *out, size_t capacity, const char *dir, const char *name) {
    cr_assert_eq(mb_path_join(out, capacity, dir, name), 0);
}

static void write_raw(const char *path, const void *data, size_t size) {
    FILE *stream = fopen(path, "wb");
    cr_assert_not_null(stream);
    if (size > 0) cr_assert_eq(fwrite(data, 1, size, stream), size);
    cr_assert_eq(fclose(stream), 0);
}

static uint8_t *read_raw(const char *path, size_t *size) {
    char *data = NULL;
    mb_error err;
    cr_assert_eq(mb_read_file(path, &data, size, &err), 0, "%s", err.message);
    return (uint8_t *)data;
}

typedef struct byte_builder {
    uint8_t data[8192];
    size_t size;
} byte_builder;

static void put_bytes(byte_builder *b, const void *bytes, size_t count) {
    cr_assert_leq(b->size + count, sizeof b->data);
    memcpy(b->data + b->size, bytes, count);
    b->size += count;
}

static void put_u64_le(byte_builder *b, uint64_t value) {
    for (int i = 0; i < 8; i++) {
        uint8_t byte = (uint8_t)(value >> (8 * i));
        put_bytes(b, &byte, 1);
    }
}

static void put_f32_le(byte_builder *b, float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    for (int i = 0; i < 4; i++) {
        uint8_t byte = (uint8_t)(bits >> (8 * i));
        put_bytes(b, &byte, 1);
    }
}

/* u64 length + header (space-padded to a multiple of 8 when pad) + data_size bytes 0,1,2,... */
static void build_file(byte_builder *b, const char *header, int pad, size_t data_size) {
    b->size = 0;
    size_t length = strlen(header);
    size_t padded = pad ? (length + 7) / 8 * 8 : length;
    put_u64_le(b, padded);
    put_bytes(b, header, length);
    for (size_t i = length; i < padded; i++) put_bytes(b, " ", 1);
    for (size_t i = 0; i < data_size; i++) {
        uint8_t byte = (uint8_t)i;
        put_bytes(b, &byte, 1);
    }
}

static int zeroed(const mb_safetensors *st) {
    mb_safetensors zero;
    memset(&zero, 0, sizeof zero);
    return memcmp(st, &zero, sizeof zero) == 0;
}

/* Writes the bytes as dir/name, asserts mb_st_open fails naming the file and containing each of the needles. */
static void expect_open_fails(const char *dir, const char *name, const void *bytes, size_t size, const char *needle1,
                              const char *needle2) {
    char path[512];
    temp_path(path, sizeof path, dir, name);
    write_raw(path, bytes, size);
    mb_safetensors st;
    mb_error err;
    err.message[0] = '\0';
    cr_assert_eq(mb_st_open(&st, path, &err), -1, "%s: opened but should fail", name);
    cr_assert(zeroed(&st), "failed open must leave nothing to close");
    cr_assert_not_null(strstr(err.message, path), "message lacks the path: %s", err.message);
    if (needle1) cr_assert_not_null(strstr(err.message, needle1), "'%s' not in: %s", needle1, err.message);
    if (needle2) cr_assert_not_null(strstr(err.message, needle2), "'%s' not in: %s", needle2, err.message);
}

static void expect_header_fails(const char *dir, const char *name, const char *header, size_t data_size,
                                const char *needle1, const char *needle2) {
    byte_builder b;
    build_file(&b, header, 1, data_size);
    expect_open_fails(dir, name, b.data, b.size, needle1, needle2);
}

static void open_ok(mb_safetensors *st, const char *path) {
    mb_error err;
    cr_assert_eq(mb_st_open(st, path, &err), 0, "%s", err.message);
}

/* ---------------------------------------------------------------- reference bytes (what Python/Rust write) */

/* safetensors tensor.rs test_serialization: {"attn.0": F32 [1,2,3] = 0..5}, no metadata: a 64-byte header, no pad. */
static const uint8_t reference_attn_dot_0[] = {
    64,  0,   0,   0,   0,   0,   0,  0,  123, 34,  97,  116, 116, 110, 46,  48,  34,  58,  123, 34,  100,
    116, 121, 112, 101, 34,  58,  34, 70, 51,  50,  34,  44,  34,  115, 104, 97,  112, 101, 34,  58,  91,
    49,  44,  50,  44,  51,  93,  44, 34, 100, 97,  116, 97,  95,  111, 102, 102, 115, 101, 116, 115, 34,
    58,  91,  48,  44,  50,  52,  93, 125, 125, 0,  0,   0,   0,   0,   0,   128, 63,  0,   0,   0,   64,
    0,   0,   64,  64,  0,   0,   128, 64,  0,   0,   160, 64};

/* tensor.rs test_serialization_forced_alignement: "attn0" F32 [1,1,2,3]: a 65-byte header padded to 72. */
static const uint8_t reference_attn0[] = {
    72,  0,   0,   0,   0,   0,   0,   0,  123, 34,  97,  116, 116, 110, 48,  34,  58,  123, 34,  100, 116,
    121, 112, 101, 34,  58,  34,  70,  51, 50,  34,  44,  34,  115, 104, 97,  112, 101, 34,  58,  91,  49,
    44,  49,  44,  50,  44,  51,  93,  44, 34,  100, 97,  116, 97,  95,  111, 102, 102, 115, 101, 116, 115,
    34,  58,  91,  48,  44,  50,  52,  93, 125, 125, 32,  32,  32,  32,  32,  32,  32,  0,   0,   0,   0,
    0,   0,   128, 63,  0,   0,   0,   64, 0,   0,   64,  64,  0,   0,   128, 64,  0,   0,   160, 64};

/* tensor.rs test_empty: no tensors, then no tensors with {"framework":"pt"}. */
static const uint8_t reference_empty[] = {8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32};
static const uint8_t reference_empty_metadata[] = {
    40,  0,   0,   0,  0,   0,   0,   0,   123, 34,  95,  95,  109, 101, 116, 97, 100, 97, 116, 97,  95,  95, 34, 58,
    123, 34,  102, 114, 97, 109, 101, 119, 111, 114, 107, 34,  58,  34,  112, 116, 34, 125, 125, 32, 32, 32, 32, 32};

static const float six_floats[6] = {0, 1, 2, 3, 4, 5};

static void assert_written_equals(const char *path, const uint8_t *expected, size_t expected_size) {
    size_t size;
    uint8_t *got = read_raw(path, &size);
    cr_assert_eq(size, expected_size, "file is %zu bytes, expected %zu", size, expected_size);
    for (size_t i = 0; i < size; i++)
        cr_assert_eq(got[i], expected[i], "byte %zu: got 0x%02x expected 0x%02x", i, got[i], expected[i]);
    free(got);
}

Test(safetensors, writer_matches_reference_bytes) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "a.safetensors");
    mb_error err;

    mb_st_entry entry = {.name = "attn.0", .dtype = MB_DTYPE_F32, .ndim = 3, .shape = {1, 2, 3}, .data = six_floats};
    cr_assert_eq(mb_st_write(path, &entry, 1, NULL, NULL, 0, &err), 0, "%s", err.message);
    assert_written_equals(path, reference_attn_dot_0, sizeof reference_attn_dot_0);

    mb_st_entry aligned = {.name = "attn0", .dtype = MB_DTYPE_F32, .ndim = 4, .shape = {1, 1, 2, 3}, .data = six_floats};
    cr_assert_eq(mb_st_write(path, &aligned, 1, NULL, NULL, 0, &err), 0, "%s", err.message);
    assert_written_equals(path, reference_attn0, sizeof reference_attn0);

    cr_assert_eq(mb_st_write(path, NULL, 0, NULL, NULL, 0, &err), 0, "%s", err.message);
    assert_written_equals(path, reference_empty, sizeof reference_empty);

    const char *keys[] = {"framework"}, *values[] = {"pt"};
    cr_assert_eq(mb_st_write(path, NULL, 0, keys, values, 1, &err), 0, "%s", err.message);
    assert_written_equals(path, reference_empty_metadata, sizeof reference_empty_metadata);
    remove_tree(dir);
}

Test(safetensors, reader_accepts_reference_bytes) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "ref.safetensors");
    mb_error err;

    write_raw(path, reference_attn_dot_0, sizeof reference_attn_dot_0);
    mb_safetensors st;
    open_ok(&st, path);
    cr_assert_eq(st.tensor_count, 1);
    cr_assert_eq(st.metadata_count, 0);
    cr_assert_eq(st.buffer_offset, 72);
    const mb_st_tensor *t = mb_st_find(&st, "attn.0");
    cr_assert_not_null(t);
    cr_assert_eq(t->dtype, MB_DTYPE_F32);
    cr_assert_eq(t->ndim, 3);
    cr_assert(t->shape[0] == 1 && t->shape[1] == 2 && t->shape[2] == 3);
    cr_assert_eq(mb_st_numel(t), 6);
    float values[6];
    int64_t shape[3] = {1, 2, 3};
    cr_assert_eq(mb_st_load_f32(&st, "attn.0", shape, 3, values, &err), 0, "%s", err.message);
    for (int i = 0; i < 6; i++) cr_assert_eq(values[i], (float)i);
    mb_st_close(&st);
    cr_assert(zeroed(&st));
    mb_st_close(&st); /* closing twice is harmless */

    write_raw(path, reference_empty_metadata, sizeof reference_empty_metadata);
    open_ok(&st, path);
    cr_assert_eq(st.tensor_count, 0);
    cr_assert_str_eq(mb_st_metadata(&st, "framework"), "pt");
    cr_assert_null(mb_st_metadata(&st, "format"));
    mb_st_close(&st);
    remove_tree(dir);
}

/* Hand-assembled header for several dtypes as the reference writer emits it: "__metadata__" first, then tensors by
 * dtype enum order descending (I64 > F64 > F32 > I32 > BF16 > F16 > I16 > I8 > U8 > BOOL), then by name. */
Test(safetensors, writer_orders_tensors_like_reference) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "order.safetensors");
    float w[2] = {1.5f, -2.0f};
    uint16_t half[3] = {0x3c00, 0x4000, 0xc000};
    int64_t ids[1] = {-7};
    uint8_t flags[1] = {1};
    mb_st_entry entries[] = {
        {.name = "w2", .dtype = MB_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &w[1]},
        {.name = "mask", .dtype = MB_DTYPE_BOOL, .ndim = 0, .data = flags},
        {.name = "a", .dtype = MB_DTYPE_BF16, .ndim = 2, .shape = {1, 3}, .data = half},
        {.name = "w1", .dtype = MB_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &w[0]},
        {.name = "z", .dtype = MB_DTYPE_I64, .ndim = 1, .shape = {1}, .data = ids},
        {.name = "h", .dtype = MB_DTYPE_F16, .ndim = 2, .shape = {0, 5}, .data = NULL},
    };
    const char *keys[] = {"format"}, *values[] = {"pt"};
    mb_error err;
    cr_assert_eq(mb_st_write(path, entries, 6, keys, values, 1, &err), 0, "%s", err.message);

    const char *header = "{\"__metadata__\":{\"format\":\"pt\"},"
                         "\"z\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]},"
                         "\"w1\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
                         "\"w2\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]},"
                         "\"a\":{\"dtype\":\"BF16\",\"shape\":[1,3],\"data_offsets\":[16,22]},"
                         "\"h\":{\"dtype\":\"F16\",\"shape\":[0,5],\"data_offsets\":[22,22]},"
                         "\"mask\":{\"dtype\":\"BOOL\",\"shape\":[],\"data_offsets\":[22,23]}}";
    byte_builder expected;
    build_file(&expected, header, 1, 0);
    uint8_t data[23] = {0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}; /* -7 as little-endian int64 */
    memcpy(data + 8, &w[0], 4);
    memcpy(data + 12, &w[1], 4);
    memcpy(data + 16, half, 6);
    data[22] = 1;
    put_bytes(&expected, data, sizeof data);
    assert_written_equals(path, expected.data, expected.size);
    remove_tree(dir);
}

/* ---------------------------------------------------------------- round trips */

Test(safetensors, round_trip_all_dtypes_and_shapes) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "rt.safetensors");
    mb_rng rng;
    mb_rng_seed(&rng, 11);
    uint8_t pool[4096];
    for (size_t i = 0; i < sizeof pool; i++) pool[i] = (uint8_t)mb_rng_next_u64(&rng);
    mb_st_entry entries[] = {
        {.name = "f32.matrix", .dtype = MB_DTYPE_F32, .ndim = 2, .shape = {3, 5}, .data = pool},
        {.name = "f16.vector", .dtype = MB_DTYPE_F16, .ndim = 1, .shape = {7}, .data = pool + 100},
        {.name = "bf16.cube", .dtype = MB_DTYPE_BF16, .ndim = 3, .shape = {2, 1, 3}, .data = pool + 200},
        {.name = "f64", .dtype = MB_DTYPE_F64, .ndim = 1, .shape = {3}, .data = pool + 300},
        {.name = "i64", .dtype = MB_DTYPE_I64, .ndim = 2, .shape = {2, 2}, .data = pool + 400},
        {.name = "i32", .dtype = MB_DTYPE_I32, .ndim = 1, .shape = {5}, .data = pool + 500},
        {.name = "i16", .dtype = MB_DTYPE_I16, .ndim = 1, .shape = {3}, .data = pool + 600},
        {.name = "i8", .dtype = MB_DTYPE_I8, .ndim = 1, .shape = {9}, .data = pool + 700},
        {.name = "u8", .dtype = MB_DTYPE_U8, .ndim = 8, .shape = {1, 2, 1, 2, 1, 2, 1, 2}, .data = pool + 800},
        {.name = "bool", .dtype = MB_DTYPE_BOOL, .ndim = 1, .shape = {3}, .data = pool + 900},
        {.name = "scalar", .dtype = MB_DTYPE_F32, .ndim = 0, .data = pool + 1000},
        {.name = "empty.f32", .dtype = MB_DTYPE_F32, .ndim = 2, .shape = {0, 4}, .data = NULL},
        {.name = "empty.u8", .dtype = MB_DTYPE_U8, .ndim = 1, .shape = {0}, .data = NULL},
        {.name = "empty.i64", .dtype = MB_DTYPE_I64, .ndim = 3, .shape = {4, 0, 2}, .data = pool},
    };
    int count = (int)(sizeof entries / sizeof entries[0]);
    mb_error err;
    cr_assert_eq(mb_st_write(path, entries, count, NULL, NULL, 0, &err), 0, "%s", err.message);

    mb_safetensors st;
    open_ok(&st, path);
    cr_assert_eq(st.tensor_count, count);
    cr_assert_eq(st.buffer_offset % 8, 0);
    size_t total = 0;
    for (int i = 0; i < count; i++) {
        const mb_st_tensor *t = mb_st_find(&st, entries[i].name);
        cr_assert_not_null(t, "%s missing", entries[i].name);
        cr_assert_eq(t->dtype, entries[i].dtype);
        cr_assert_eq(t->ndim, entries[i].ndim);
        int64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            cr_assert_eq(t->shape[d], entries[i].shape[d]);
            numel *= t->shape[d];
        }
        cr_assert_eq(mb_st_numel(t), numel);
        cr_assert_eq(t->nbytes, (size_t)numel * mb_dtype_size(t->dtype));
        cr_assert_eq(t->begin % mb_dtype_size(t->dtype), 0, "%s not naturally aligned", t->name);
        if (t->nbytes > 0) cr_assert_eq(memcmp(mb_st_data(&st, t), entries[i].data, t->nbytes), 0);
        total += t->nbytes;
    }
    cr_assert_eq(st.file_size, st.buffer_offset + total);
    /* tensors come back in offset order, which for our writer is descending dtype rank then name */
    for (int i = 1; i < st.tensor_count; i++)
        cr_assert_leq(st.tensors[i - 1].begin, st.tensors[i].begin);

    float f16_values[7], bf16_values[6];
    cr_assert_eq(mb_st_read_f32(&st, mb_st_find(&st, "f16.vector"), f16_values, 7, &err), 0, "%s", err.message);
    cr_assert_eq(mb_st_read_f32(&st, mb_st_find(&st, "bf16.cube"), bf16_values, 6, &err), 0, "%s", err.message);
    for (int i = 0; i < 7; i++) {
        uint16_t h;
        memcpy(&h, pool + 100 + 2 * i, 2);
        float expected = mb_f16_to_f32(h);
        cr_assert(memcmp(&expected, &f16_values[i], 4) == 0 || (isnan(expected) && isnan(f16_values[i])));
    }
    for (int i = 0; i < 6; i++) {
        uint16_t h;
        memcpy(&h, pool + 200 + 2 * i, 2);
        float expected = mb_bf16_to_f32(h);
        cr_assert(memcmp(&expected, &bf16_values[i], 4) == 0 || (isnan(expected) && isnan(bf16_values[i])));
    }
    float scalar;
    cr_assert_eq(mb_st_load_f32(&st, "scalar", NULL, 0, &scalar, &err), 0, "%s", err.message);
    cr_assert_eq(memcmp(&scalar, pool + 1000, 4), 0);
    float nothing[1] = {42};
    int64_t empty_shape[2] = {0, 4};
    cr_assert_eq(mb_st_load_f32(&st, "empty.f32", empty_shape, 2, nothing, &err), 0, "%s", err.message);
    cr_assert_eq(nothing[0], 42);
    mb_st_close(&st);
    remove_tree(dir);
}

Test(safetensors, metadata_and_names_round_trip_with_escapes) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "meta.safetensors");
    const char *keys[] = {"format", "quote\"back\\slash", "ctl\x01\t\n", "unicode", "empty"};
    const char *values[] = {"pt", "a/b \"c\"", "line1\nline2\r\b\f", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", ""};
    float one = 1.0f;
    mb_st_entry entries[] = {
        {.name = "we\"ird\\name\x1f", .dtype = MB_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &one},
        {.name = "\xce\xb1.weight", .dtype = MB_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &one},
    };
    mb_error err;
    cr_assert_eq(mb_st_write(path, entries, 2, keys, values, 5, &err), 0, "%s", err.message);

    size_t size;
    uint8_t *raw = read_raw(path, &size);
    cr_assert_not_null(strstr((const char *)raw + 8, "\"ctl\\u0001\\t\\n\":"), "serde_json-style escapes expected");
    cr_assert_eq(memcmp(raw + 8, "{\"__metadata__\":{\"format\":\"pt\",", 31), 0, "metadata first, in given order");
    free(raw);

    mb_safetensors st;
    open_ok(&st, path);
    cr_assert_eq(st.metadata_count, 5);
    for (int i = 0; i < 5; i++) {
        cr_assert_str_eq(st.metadata_keys[i], keys[i]);
        cr_assert_str_eq(mb_st_metadata(&st, keys[i]), values[i]);
    }
    cr_assert_not_null(mb_st_find(&st, entries[0].name));
    cr_assert_not_null(mb_st_find(&st, entries[1].name));
    mb_st_close(&st);
    remove_tree(dir);
}

Test(safetensors, header_padded_to_multiple_of_8) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "pad.safetensors");
    uint8_t byte = 7;
    int paddings_seen[8] = {0};
    for (int length = 1; length <= 24; length++) {
        char name[32];
        memset(name, 'n', (size_t)length);
        name[length] = '\0';
        mb_st_entry entry = {.name = name, .dtype = MB_DTYPE_U8, .ndim = 1, .shape = {1}, .data = &byte};
        mb_error err;
        cr_assert_eq(mb_st_write(path, &entry, 1, NULL, NULL, 0, &err), 0, "%s", err.message);
        size_t size;
        uint8_t *raw = read_raw(path, &size);
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = (n << 8) | raw[i];
        cr_assert_eq(n % 8, 0, "header length %llu", (unsigned long long)n);
        cr_assert_eq(size, 8 + n + 1);
        cr_assert_eq(raw[8 + n], 7);
        size_t json_end = 8 + (size_t)n;
        while (raw[json_end - 1] == ' ') json_end--;
        cr_assert_eq(raw[json_end - 1], '}');
        cr_assert_lt(8 + n - json_end, 8, "padding is less than 8 spaces");
        paddings_seen[8 + n - json_end] = 1;
        free(raw);
        mb_safetensors st;
        open_ok(&st, path);
        cr_assert_eq(st.buffer_offset % 8, 0);
        cr_assert_eq(st.buffer_offset, 8 + n);
        mb_st_close(&st);
    }
    for (int pad = 0; pad < 8; pad++) cr_assert(paddings_seen[pad], "padding %d never exercised", pad);
    remove_tree(dir);
}

Test(safetensors, write_is_atomic_and_rejects_bad_input) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "w.safetensors");
    float data[4] = {1, 2, 3, 4};
    mb_error err;
    mb_st_entry good = {.name = "x", .dtype = MB_DTYPE_F32, .ndim = 1, .shape = {4}, .data = data};
    cr_assert_eq(mb_st_write(path, &good, 1, NULL, NULL, 0, &err), 0, "%s", err.message);
    size_t good_size;
    uint8_t *good_bytes = read_raw(path, &good_size);

    mb_st_entry duplicate[2] = {good, good};
    duplicate[1].dtype = MB_DTYPE_F16;
    duplicate[1].shape[0] = 2;
    mb_st_entry negative = good, too_many_dims = good, null_data = good, reserved = good, bad_dtype = good,
                bad_utf8 = good, no_name = good;
    negative.shape[0] = -1;
    too_many_dims.ndim = MB_ST_MAX_DIMS + 1;
    null_data.data = NULL;
    reserved.name = "__metadata__";
    bad_dtype.dtype = (mb_dtype)99;
    bad_utf8.name = "bad\xff";
    no_name.name = NULL;
    struct {
        const mb_st_entry *entries;
        int count;
        const char *needle;
    } cases[] = {
        {duplicate, 2, "'x' given twice"}, {&negative, 1, "'x'"},  {&too_many_dims, 1, "'x'"},
        {&null_data, 1, "'x'"},            {&reserved, 1, "reserved"}, {&bad_dtype, 1, "'x'"},
        {&bad_utf8, 1, "UTF-8"},           {&no_name, 1, "no name"},   {NULL, 2, "invalid tensor list"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        err.message[0] = '\0';
        cr_assert_eq(mb_st_write(path, cases[i].entries, cases[i].count, NULL, NULL, 0, &err), -1, "case %zu", i);
        cr_assert_not_null(strstr(err.message, path), "case %zu: %s", i, err.message);
        cr_assert_not_null(strstr(err.message, cases[i].needle), "case %zu: %s", i, err.message);
    }
    const char *keys[] = {"k", "k"}, *values[] = {"1", "2"};
    cr_assert_eq(mb_st_write(path, &good, 1, keys, values, 2, &err), -1);
    cr_assert_not_null(strstr(err.message, "'k' given twice"), "%s", err.message);
    const char *null_values[] = {"1", NULL};
    cr_assert_eq(mb_st_write(path, &good, 1, keys, null_values, 2, &err), -1);

    /* the old file is untouched and no temporary file is left behind */
    size_t size;
    uint8_t *bytes = read_raw(path, &size);
    cr_assert_eq(size, good_size);
    cr_assert_eq(memcmp(bytes, good_bytes, size), 0);
    free(bytes);
    free(good_bytes);
    DIR *listing = opendir(dir);
    cr_assert_not_null(listing);
    int files = 0;
    for (struct dirent *item = readdir(listing); item != NULL; item = readdir(listing))
        if (item->d_name[0] != '.') {
            files++;
            cr_assert_str_eq(item->d_name, "w.safetensors");
        }
    closedir(listing);
    cr_assert_eq(files, 1);

    char missing_dir_path[600];
    snprintf(missing_dir_path, sizeof missing_dir_path, "%s/no/such/dir/x.safetensors", dir);
    cr_assert_eq(mb_st_write(missing_dir_path, &good, 1, NULL, NULL, 0, &err), -1);
    remove_tree(dir);
}

/* ---------------------------------------------------------------- reading values */

Test(safetensors, reads_unaligned_and_converted_data) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "unaligned.safetensors");
    /* Header order differs from offset order, and the F32 tensor starts at buffer offset 1 (legal, not aligned). */
    const char *header = "{\"c\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[9,13]},"
                         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]},"
                         "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                         "\"d\":{\"dtype\":\"F16\",\"shape\":[1,2],\"data_offsets\":[13,17]},"
                         "\"e\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[17,33]},"
                         "\"f\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[33,37]},"
                         "\"g\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[37,45]}}";
    byte_builder b;
    build_file(&b, header, 0, 0); /* unpadded header: also legal */
    uint8_t u8 = 200;
    put_bytes(&b, &u8, 1);
    put_f32_le(&b, 3.25f);
    put_f32_le(&b, -1e-3f);
    const uint8_t bf16[4] = {0x80, 0x3f, 0x20, 0xc1}; /* 0x3f80 = 1.0, 0xc120 = -10.0 */
    put_bytes(&b, bf16, 4);
    const uint8_t f16[4] = {0x00, 0x3c, 0xff, 0x7b}; /* 0x3c00 = 1.0, 0x7bff = 65504 */
    put_bytes(&b, f16, 4);
    const uint8_t i64[16] = {0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0};
    put_bytes(&b, i64, 16); /* -2 and 2^31-1 */
    const uint8_t i32[4] = {0x00, 0x00, 0x00, 0x80};
    put_bytes(&b, i32, 4); /* INT32_MIN */
    const uint8_t big[8] = {0x00, 0x00, 0x00, 0x80, 0, 0, 0, 0};
    put_bytes(&b, big, 8); /* 2^31: out of int32 range */
    write_raw(path, b.data, b.size);

    mb_safetensors st;
    mb_error err;
    open_ok(&st, path);
    cr_assert_eq(st.tensor_count, 7);
    cr_assert_str_eq(st.tensors[0].name, "a"); /* stored in offset order */
    float out[2];
    int64_t two[1] = {2}, one_two[2] = {1, 2};
    cr_assert_eq(mb_st_load_f32(&st, "b", two, 1, out, &err), 0, "%s", err.message);
    cr_assert(out[0] == 3.25f && out[1] == -1e-3f);
    cr_assert_eq(mb_st_load_f32(&st, "c", two, 1, out, &err), 0, "%s", err.message);
    cr_assert(out[0] == 1.0f && out[1] == -10.0f);
    cr_assert_eq(mb_st_load_f32(&st, "d", one_two, 2, out, &err), 0, "%s", err.message);
    cr_assert(out[0] == 1.0f && out[1] == 65504.0f);
    int32_t ints[2];
    cr_assert_eq(mb_st_read_i32(&st, mb_st_find(&st, "e"), ints, 2, &err), 0, "%s", err.message);
    cr_assert(ints[0] == -2 && ints[1] == INT32_MAX);
    cr_assert_eq(mb_st_read_i32(&st, mb_st_find(&st, "f"), ints, 1, &err), 0, "%s", err.message);
    cr_assert_eq(ints[0], INT32_MIN);

    cr_assert_eq(mb_st_read_i32(&st, mb_st_find(&st, "g"), ints, 1, &err), -1);
    cr_assert(strstr(err.message, path) && strstr(err.message, "'g'") && strstr(err.message, "2147483648"), "%s",
              err.message);
    cr_assert_eq(mb_st_read_i32(&st, mb_st_find(&st, "b"), ints, 2, &err), -1);
    cr_assert(strstr(err.message, path) && strstr(err.message, "'b'") && strstr(err.message, "F32"), "%s",
              err.message);
    cr_assert_eq(mb_st_read_f32(&st, mb_st_find(&st, "a"), out, 1, &err), -1);
    cr_assert(strstr(err.message, path) && strstr(err.message, "'a'") && strstr(err.message, "U8"), "%s", err.message);
    cr_assert_eq(mb_st_read_f32(&st, mb_st_find(&st, "b"), out, 3, &err), -1);
    cr_assert(strstr(err.message, path) && strstr(err.message, "'b'") && strstr(err.message, "3"), "%s", err.message);

    int64_t wrong[2] = {2, 1};
    cr_assert_eq(mb_st_load_f32(&st, "b", wrong, 2, out, &err), -1);
    cr_assert(strstr(err.message, path) && strstr(err.message, "'b'") && strstr(err.message, "[2]") &&
                  strstr(err.message, "[2,1]"),
              "%s", err.message);
    cr_assert_eq(mb_st_load_f32(&st, "model.nope.weight", two, 1, out, &err), -1);
    cr_assert(strstr(err.message, path) && strstr(err.message, "'model.nope.weight' not found"), "%s", err.message);
    mb_st_close(&st);
    remove_tree(dir);
}

/* ---------------------------------------------------------------- bf16 / f16 */

static double half_magnitude_value(uint32_t code) { /* code 0..0x7c00; 0x7c00 (Inf) counts as 2^16 for rounding */
    uint32_t exponent = code >> 10, mantissa = code & 0x3ff;
    if (exponent == 0) return ldexp((double)mantissa, -24);
    return ldexp(1.0 + mantissa / 1024.0, (int)exponent - 15);
}

static double bf16_magnitude_value(uint32_t code) { /* code 0..0x7f80; 0x7f80 (Inf) counts as 2^128 */
    uint32_t exponent = code >> 7, mantissa = code & 0x7f;
    if (exponent == 0) return ldexp((double)mantissa, -133);
    return ldexp(1.0 + mantissa / 128.0, (int)exponent - 127);
}

/* h must be the code nearest to |x| among its neighbours, ties to an even mantissa. */
static void assert_nearest_even(float x, uint32_t code, uint32_t sign_bit, uint32_t inf_code,
                                double (*value_of)(uint32_t), const char *what) {
    cr_assert_eq(code & sign_bit, signbit(x) ? sign_bit : 0, "%s(%a): sign", what, (double)x);
    uint32_t magnitude = code & ~sign_bit;
    cr_assert_leq(magnitude, inf_code, "%s(%a) = 0x%x is NaN", what, (double)x, code);
    double ax = fabs((double)x);
    double overflow_threshold = (value_of(inf_code - 1) + value_of(inf_code)) / 2; /* ties go to Inf (even) */
    if (magnitude == inf_code) {
        cr_assert_geq(ax, overflow_threshold, "%s(%a) overflowed too early", what, (double)x);
        return;
    }
    double here = fabs(ax - value_of(magnitude));
    if (magnitude > 0) {
        double below = fabs(ax - value_of(magnitude - 1));
        cr_assert(here < below || (here == below && (magnitude & 1) == 0), "%s(%a) = 0x%x: lower neighbour is nearer",
                  what, (double)x, code);
    }
    if (magnitude < inf_code) {
        double above = fabs(ax - value_of(magnitude + 1));
        cr_assert(here < above || (here == above && (magnitude & 1) == 0), "%s(%a) = 0x%x: upper neighbour is nearer",
                  what, (double)x, code);
    }
}

Test(conversions, f16_to_f32_matches_formula_for_all_codes) {
    for (uint32_t code = 0; code < 65536; code++) {
        float got = mb_f16_to_f32((uint16_t)code);
        uint32_t exponent = (code >> 10) & 0x1f, mantissa = code & 0x3ff;
        double sign = (code & 0x8000) ? -1.0 : 1.0;
        if (exponent == 31) {
            if (mantissa == 0) cr_assert(isinf(got) && (got < 0) == (sign < 0), "code 0x%x", code);
            else cr_assert(isnan(got), "code 0x%x", code);
            continue;
        }
        double expected = sign * (exponent == 0 ? ldexp(mantissa, -24) : ldexp(1.0 + mantissa / 1024.0, (int)exponent - 15));
        cr_assert_eq((double)got, expected, "code 0x%x: %a vs %a", code, (double)got, expected);
        cr_assert_eq(signbit(got) != 0, sign < 0, "code 0x%x sign", code);
        cr_assert_eq(mb_f32_to_f16(got), code, "round trip of 0x%x", code);
    }
}

Test(conversions, bf16_to_f32_matches_formula_for_all_codes) {
    for (uint32_t code = 0; code < 65536; code++) {
        float got = mb_bf16_to_f32((uint16_t)code);
        uint32_t exponent = (code >> 7) & 0xff, mantissa = code & 0x7f;
        double sign = (code & 0x8000) ? -1.0 : 1.0;
        if (exponent == 255) {
            if (mantissa == 0) cr_assert(isinf(got) && (got < 0) == (sign < 0), "code 0x%x", code);
            else cr_assert(isnan(got), "code 0x%x", code);
            continue;
        }
        double expected = sign * (exponent == 0 ? ldexp(mantissa, -133) : ldexp(1.0 + mantissa / 128.0, (int)exponent - 127));
        cr_assert_eq((double)got, expected, "code 0x%x", code);
        cr_assert_eq(mb_f32_to_bf16(got), code, "round trip of 0x%x", code);
    }
}

Test(conversions, f32_to_f16_edge_cases) {
    struct {
        float value;
        uint16_t expected;
    } cases[] = {
        {0.0f, 0x0000},
        {-0.0f, 0x8000},
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {65504.0f, 0x7bff},
        {65519.99f, 0x7bff},          /* below the midpoint to Inf */
        {65520.0f, 0x7c00},           /* midpoint: ties to even = Inf */
        {1e10f, 0x7c00},
        {-1e10f, 0xfc00},
        {INFINITY, 0x7c00},
        {-INFINITY, 0xfc00},
        {0x1p-14f, 0x0400},           /* smallest normal */
        {0x1p-24f, 0x0001},           /* smallest subnormal */
        {0x1p-25f, 0x0000},           /* tie between 0 and 2^-24: even = 0 */
        {0x1.8p-25f, 0x0001},         /* above the tie */
        {0x1.000002p-25f, 0x0001},    /* just above the tie */
        {0x1p-26f, 0x0000},
        {-0x1p-30f, 0x8000},          /* underflow keeps the sign */
        {0x1.4p-23f, 0x0002},         /* 2.5 × 2^-24: tie, even = 2 */
        {0x1.cp-23f, 0x0004},         /* 3.5 × 2^-24: tie, even = 4 */
        {0x1.ff8p-15f, 0x03ff},       /* largest subnormal */
        {0x1.ffcp-15f, 0x0400},       /* largest subnormal + half ulp: tie, rounds up into the normals */
        {1.0f + 0x1p-11f, 0x3c00},    /* tie, even mantissa stays */
        {1.0f + 0x3p-11f, 0x3c02},    /* tie, odd mantissa rounds up */
        {0x1.002002p+0f, 0x3c01},       /* 1 + 2^-11 + 2^-23: just above the tie */
        {2047.0f, 0x67ff},
        {2049.0f, 0x6800},            /* tie to even */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        cr_assert_eq(mb_f32_to_f16(cases[i].value), cases[i].expected, "%a -> 0x%04x, expected 0x%04x",
                     (double)cases[i].value, mb_f32_to_f16(cases[i].value), cases[i].expected);
    uint16_t nan = mb_f32_to_f16(NAN), negative_nan = mb_f32_to_f16(-NAN);
    cr_assert((nan & 0x7c00) == 0x7c00 && (nan & 0x3ff) != 0, "NaN -> 0x%04x", nan);
    cr_assert((negative_nan & 0x8000) != 0 && (negative_nan & 0x3ff) != 0);
    uint32_t low_payload_nan_bits = 0x7f800001u; /* payload only in bits that f16 drops: must stay NaN */
    float low_payload_nan;
    memcpy(&low_payload_nan, &low_payload_nan_bits, 4);
    cr_assert(isnan(mb_f16_to_f32(mb_f32_to_f16(low_payload_nan))));
}

Test(conversions, f32_to_bf16_edge_cases) {
    struct {
        uint32_t bits;
        uint16_t expected;
    } cases[] = {
        {0x00000000u, 0x0000}, {0x80000000u, 0x8000}, {0x3f800000u, 0x3f80},
        {0x3f808000u, 0x3f80}, /* tie, even stays */
        {0x3f818000u, 0x3f82}, /* tie, odd rounds up */
        {0x3f808001u, 0x3f81}, {0x3f807fffu, 0x3f80},
        {0x7f7fffffu, 0x7f80}, /* FLT_MAX rounds to Inf */
        {0x7f7f7fffu, 0x7f7f}, {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80},
        {0x00008000u, 0x0000}, /* subnormal tie to even zero */
        {0x00018000u, 0x0002}, {0x00000001u, 0x0000}, {0x007fffffu, 0x0080}, /* rounds up to the smallest normal */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float value;
        memcpy(&value, &cases[i].bits, 4);
        cr_assert_eq(mb_f32_to_bf16(value), cases[i].expected, "0x%08x -> 0x%04x, expected 0x%04x", cases[i].bits,
                     mb_f32_to_bf16(value), cases[i].expected);
    }
    uint32_t nan_bits[] = {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu};
    for (size_t i = 0; i < 4; i++) {
        float value;
        memcpy(&value, &nan_bits[i], 4);
        uint16_t h = mb_f32_to_bf16(value);
        cr_assert(isnan(mb_bf16_to_f32(h)), "0x%08x -> 0x%04x is not NaN", nan_bits[i], h);
        cr_assert_eq(h & 0x8000, (nan_bits[i] >> 16) & 0x8000);
    }
}

Test(conversions, random_floats_round_to_nearest_even) {
    mb_rng rng;
    mb_rng_seed(&rng, 5);
    for (int i = 0; i < 400000; i++) {
        uint32_t bits = (uint32_t)mb_rng_next_u64(&rng);
        if (i % 2 == 0) bits = (bits & 0x807fffffu) | ((uint32_t)(96 + mb_rng_below(&rng, 48)) << 23); /* f16 range */
        if (i % 7 == 0) bits = (bits & 0xffff0000u) | 0x8000u; /* exact bf16 tie */
        if (i % 11 == 0) bits = (bits & 0xffffe000u) | 0x1000u; /* exact f16 tie (normal range) */
        float x;
        memcpy(&x, &bits, 4);
        if (isnan(x)) continue;
        assert_nearest_even(x, mb_f32_to_bf16(x), 0x8000, 0x7f80, bf16_magnitude_value, "bf16");
        if (isinf(x)) continue;
        assert_nearest_even(x, mb_f32_to_f16(x), 0x8000, 0x7c00, half_magnitude_value, "f16");
    }
}

/* ---------------------------------------------------------------- corruption */

#define T_A "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"

Test(corruption, header_length_and_start) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    expect_open_fails(dir, "empty.safetensors", "", 0, "8-byte", NULL);
    expect_open_fails(dir, "short.safetensors", "\x08\0\0\0", 4, NULL, NULL);
    byte_builder b;
    b.size = 0;
    put_u64_le(&b, UINT64_MAX);
    put_bytes(&b, "{}      ", 8);
    expect_open_fails(dir, "huge.safetensors", b.data, b.size, "header length 18446744073709551615", NULL);
    b.size = 0;
    put_u64_le(&b, UINT64_MAX - 4); /* 8 + N wraps around */
    put_bytes(&b, "{}      ", 8);
    expect_open_fails(dir, "wrap.safetensors", b.data, b.size, "header length", NULL);
    b.size = 0;
    put_u64_le(&b, 100000001);
    put_bytes(&b, "{}      ", 8);
    expect_open_fails(dir, "limit.safetensors", b.data, b.size, "100000000", NULL);
    b.size = 0;
    put_u64_le(&b, 1000);
    put_bytes(&b, "{}      ", 8);
    expect_open_fails(dir, "past_end.safetensors", b.data, b.size, "past the end", NULL);
    b.size = 0;
    put_u64_le(&b, 0);
    expect_open_fails(dir, "zero.safetensors", b.data, b.size, "header length is 0", NULL);
    expect_header_fails(dir, "array.safetensors", "[]", 0, "must start with '{'", NULL);
    expect_header_fails(dir, "space.safetensors", " {}", 0, "must start with '{'", NULL);
    expect_header_fails(dir, "invalid.safetensors", "{\"a\":", 0, "not valid JSON", NULL);
    expect_header_fails(dir, "unclosed.safetensors", "{\"a\":{\"dtype\":\"F32\"", 0, "not valid JSON", NULL);
    expect_header_fails(dir, "garbage_after.safetensors", "{} x", 0, "after the JSON object", NULL);
    expect_header_fails(dir, "two_objects.safetensors", "{}{}", 0, "after the JSON object", NULL);
    expect_header_fails(dir, "utf8.safetensors", "{\"\xc3\x28\":{}}", 0, "UTF-8", NULL);
    expect_header_fails(dir, "overlong.safetensors", "{\"\xc0\xaf\":{}}", 0, "UTF-8", NULL);
    expect_header_fails(dir, "control.safetensors", "{\"a\x01\":{}}", 0, "control", NULL);
    expect_header_fails(dir, "control_between.safetensors", "{\x01}", 0, NULL, NULL);
    /* NUL padding is not JSON whitespace */
    b.size = 0;
    put_u64_le(&b, 8);
    put_bytes(&b, "{}\0\0\0\0\0\0", 8);
    expect_open_fails(dir, "nul_pad.safetensors", b.data, b.size, "after the JSON object", NULL);
    remove_tree(dir);
}

Test(corruption, metadata_must_be_flat_string_map) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    expect_header_fails(dir, "m1.safetensors", "{\"__metadata__\":{\"format\":1}}", 0, "'format'", "string");
    expect_header_fails(dir, "m2.safetensors", "{\"__metadata__\":{\"x\":{\"y\":\"z\"}}}", 0, "'x'", NULL);
    expect_header_fails(dir, "m3.safetensors", "{\"__metadata__\":\"pt\"}", 0, "__metadata__", NULL);
    expect_header_fails(dir, "m4.safetensors", "{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, "'k'", "twice");
    expect_header_fails(dir, "m5.safetensors", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, "twice", NULL);
    expect_header_fails(dir, "m6.safetensors", "{\"__metadata__\":{\"k\":[\"a\"]}}", 0, "'k'", NULL);
    remove_tree(dir);
}

Test(corruption, tensor_entries) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    expect_header_fails(dir, "dtype.safetensors", "{\"w.x\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                        8, "'w.x'", "'F33'");
    expect_header_fails(dir, "dtype_num.safetensors", "{\"w\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
                        "'w'", "dtype");
    expect_header_fails(dir, "neg.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8,
                        "'w'", "-2");
    expect_header_fails(dir, "float.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}",
                        8, "'w'", "2.5");
    expect_header_fails(dir, "float_int.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8, "'2.0'", NULL);
    expect_header_fails(dir, "exp.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8e0]}}",
                        8, "'8e0'", NULL);
    expect_header_fails(dir, "lead0.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[02],\"data_offsets\":[0,8]}}",
                        8, "'02'", NULL);
    expect_header_fails(dir, "str_shape.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, "'w'", NULL);
    expect_header_fails(dir, "shape_obj.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}",
                        8, "'w'", "shape");
    expect_header_fails(dir, "rank9.safetensors",
                        "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1, "'w'",
                        "9 dimensions");
    expect_header_fails(dir, "offsets3.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}", 8, "'w'", "data_offsets");
    expect_header_fails(dir, "offsets_neg.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", 8, "'w'", "data_offsets");
    expect_header_fails(dir, "offsets_huge.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,1e300]}}", 8, "'w'", NULL);
    expect_header_fails(dir, "reversed.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}",
                        0, "'w'", "[8,0]");
    expect_header_fails(dir, "missing.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "'w'",
                        "data_offsets");
    expect_header_fails(dir, "extra.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8, "'w'", "'x'");
    expect_header_fails(dir, "twice.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "'w'",
                        "twice");
    expect_header_fails(dir, "not_obj.safetensors", "{\"w\":[1,2]}", 0, "'w'", "object");
    expect_header_fails(dir, "overflow.safetensors",
                        "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}}", 0, "'w'",
                        "overflow");
    expect_header_fails(dir, "model.safetensors",
                        "{\"model.layers.0.attn.Wqkv.weight\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[0,100]}}",
                        100, "tensor 'model.layers.0.attn.Wqkv.weight': data_offsets [0,100] hold 100 bytes but shape "
                        "[3,4] of F32 needs 48", NULL);
    expect_header_fails(dir, "dup.safetensors", "{" T_A "," T_A "}", 16, "'a'", "twice");
    expect_header_fails(dir, "dup2.safetensors",
                        "{" T_A ",\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "'a'", "twice");
    remove_tree(dir);
}

Test(corruption, layout) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    expect_header_fails(dir, "overlap.safetensors",
                        "{" T_A ",\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "'b'", "overlap");
    expect_header_fails(dir, "hole.safetensors",
                        "{" T_A ",\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}", 20, "'b'", "hole");
    expect_header_fails(dir, "start.safetensors", "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                        12, "'b'", "must begin at 0");
    expect_header_fails(dir, "trailing.safetensors", "{" T_A "}", 9, "trailing", NULL);
    expect_header_fails(dir, "short_data.safetensors", "{" T_A "}", 7, "truncated", NULL);
    expect_header_fails(dir, "empty_trailing.safetensors", "{}", 1, "trailing", NULL);
    /* the same data claimed by two tensors: overlap */
    expect_header_fails(dir, "alias.safetensors",
                        "{" T_A ",\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, NULL, "overlap");

    /* legal: zero-size tensors sharing an offset, rank 0, header order unlike offset order */
    char path[512];
    temp_path(path, sizeof path, dir, "legal.safetensors");
    byte_builder b;
    build_file(&b,
               "{\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[8,12]},"
               "\"z1\":{\"dtype\":\"F16\",\"shape\":[0],\"data_offsets\":[8,8]},"
               "\"z0\":{\"dtype\":\"I8\",\"shape\":[3,0],\"data_offsets\":[0,0]}," T_A ","
               "\"z2\":{\"dtype\":\"BOOL\",\"shape\":[0],\"data_offsets\":[12,12]}}",
               1, 12);
    write_raw(path, b.data, b.size);
    mb_safetensors st;
    open_ok(&st, path);
    cr_assert_eq(st.tensor_count, 5);
    cr_assert_eq(mb_st_numel(mb_st_find(&st, "s")), 1);
    cr_assert_eq(mb_st_numel(mb_st_find(&st, "z0")), 0);
    mb_st_close(&st);
    remove_tree(dir);
}

/* A valid file with metadata and three tensors, for truncation and random corruption. */
static void build_sample(byte_builder *b) {
    build_file(b,
               "{\"__metadata__\":{\"format\":\"pt\"},"
               "\"emb\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
               "\"norm\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"
               "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[32,36]},"
               "\"ids\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[36,44]}}",
               1, 44);
}

Test(corruption, truncated_at_every_byte) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "full.safetensors");
    byte_builder b;
    build_sample(&b);
    write_raw(path, b.data, b.size);
    mb_safetensors st;
    open_ok(&st, path); /* the untruncated file is valid */
    cr_assert_eq(st.tensor_count, 4);
    mb_st_close(&st);
    for (size_t length = 0; length < b.size; length++) {
        char name[64];
        snprintf(name, sizeof name, "cut%zu.safetensors", length);
        expect_open_fails(dir, name, b.data, length, NULL, NULL);
    }
    remove_tree(dir);
}

Test(corruption, random_mutations_never_crash) {
    char dir[64], path[512];
    make_temp_dir(dir, sizeof dir);
    temp_path(path, sizeof path, dir, "fuzz.safetensors");
    byte_builder sample;
    build_sample(&sample);
    size_t header_end = sample.size - 44;
    static const char json_bytes[] = "{}[]\",:0123456789-.eE aIFU\\";
    mb_rng rng;
    mb_rng_seed(&rng, 2024);
    int opened = 0, rejected = 0;
    for (int iteration = 0; iteration < 3000; iteration++) {
        byte_builder b = sample;
        int kind = (int)mb_rng_below(&rng, 6);
        int edits = 1 + (int)mb_rng_below(&rng, 3);
        for (int e = 0; e < edits; e++) {
            if (kind == 0) { /* flip one bit anywhere */
                b.data[mb_rng_below(&rng, b.size)] ^= (uint8_t)(1u << mb_rng_below(&rng, 8));
            } else if (kind == 1) { /* JSON-looking byte in the header */
                b.data[8 + mb_rng_below(&rng, header_end - 8)] = (uint8_t)json_bytes[mb_rng_below(&rng, sizeof json_bytes - 1)];
            } else if (kind == 2) { /* a digit replaced by another digit */
                size_t at = 8 + mb_rng_below(&rng, header_end - 8);
                if (b.data[at] >= '0' && b.data[at] <= '9') b.data[at] = (uint8_t)('0' + mb_rng_below(&rng, 10));
            } else if (kind == 3) { /* truncate */
                b.size = mb_rng_below(&rng, b.size + 1);
            } else if (kind == 4) { /* append */
                size_t extra = 1 + mb_rng_below(&rng, 8);
                for (size_t k = 0; k < extra && b.size < sizeof b.data; k++) b.data[b.size++] = (uint8_t)mb_rng_next_u64(&rng);
            } else { /* random header length */
                uint64_t n = mb_rng_below(&rng, 4) == 0 ? mb_rng_next_u64(&rng) : mb_rng_below(&rng, b.size + 16);
                for (int i = 0; i < 8; i++) b.data[i] = (uint8_t)(n >> (8 * i));
            }
        }
        write_raw(path, b.data, b.size);
        mb_safetensors st;
        mb_error err;
        err.message[0] = '\0';
        if (mb_st_open(&st, path, &err) == 0) {
            opened++;
            cr_assert_leq(st.buffer_offset, st.file_size);
            for (int i = 0; i < st.tensor_count; i++) {
                const mb_st_tensor *t = &st.tensors[i];
                cr_assert_leq(t->begin + t->nbytes, st.file_size - st.buffer_offset);
                cr_assert_eq(mb_st_find(&st, t->name), t);
                int64_t numel = mb_st_numel(t);
                cr_assert_eq((size_t)numel * mb_dtype_size(t->dtype), t->nbytes);
                float *values = malloc(((size_t)numel + 1) * sizeof *values);
                int32_t *ints = malloc(((size_t)numel + 1) * sizeof *ints);
                int is_float = t->dtype == MB_DTYPE_F32 || t->dtype == MB_DTYPE_F16 || t->dtype == MB_DTYPE_BF16;
                cr_assert_eq(mb_st_read_f32(&st, t, values, numel, &err), is_float ? 0 : -1);
                mb_st_read_i32(&st, t, ints, numel, &err);
                free(values);
                free(ints);
            }
            mb_st_close(&st);
        } else {
            rejected++;
            cr_assert(zeroed(&st));
            cr_assert_not_null(strstr(err.message, path), "iteration %d: %s", iteration, err.message);
        }
    }
    cr_assert_gt(opened, 0);
    cr_assert_gt(rejected, 1000);
    remove_tree(dir);
}
