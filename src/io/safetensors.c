/* safetensors reader and writer, byte-compatible with huggingface/safetensors (README §Format, src/tensor.rs).
 *
 * File = u64 little-endian N | N bytes of UTF-8 JSON header | byte buffer. The header is one JSON object: an optional
 * "__metadata__" string→string map and, per tensor, {"dtype":D,"shape":[d0,...],"data_offsets":[begin,end]} with
 * offsets relative to the byte buffer. Sorted by offset the tensors tile the buffer from 0 without holes or overlaps,
 * end-begin = prod(shape) × width(D), and 8 + N + last end = file size. The reference writer emits compact JSON,
 * "__metadata__" first, tensors sorted by dtype (its enum order, which is descending alignment) then by name, and pads
 * the header with spaces to a multiple of 8 so the buffer starts 8-byte aligned.
 *
 * The reader parses the JSON with cJSON and then re-checks the raw text for what cJSON tolerates but serde_json (the
 * reference) rejects: numbers that are not plain integers ("3.0", "1e2", "03"), control bytes inside strings or
 * between tokens, non-whitespace after the object, invalid UTF-8. Numbers are accepted only below 2^53 so the double
 * cJSON stores is exact. The whole file is read into memory (st->bytes). */
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/fileio.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader copies it unconverted and needs a little-endian host"
#endif

#define ST_MAX_HEADER_SIZE 100000000u
#define ST_MAX_EXACT_INTEGER 9007199254740992.0 /* 2^53: every integer below is exact in a double */
#define ST_METADATA_KEY "__metadata__"

typedef struct dtype_info {
    const char *name;
    size_t size;
    int writer_rank; /* position in the reference Dtype enum; the writer sorts by it descending */
} dtype_info;

static const dtype_info dtype_table[] = {
    [MB_DTYPE_F32] = {"F32", 4, 7},  [MB_DTYPE_F16] = {"F16", 2, 4}, [MB_DTYPE_BF16] = {"BF16", 2, 5},
    [MB_DTYPE_F64] = {"F64", 8, 8},  [MB_DTYPE_I64] = {"I64", 8, 9}, [MB_DTYPE_I32] = {"I32", 4, 6},
    [MB_DTYPE_I16] = {"I16", 2, 3},  [MB_DTYPE_I8] = {"I8", 1, 2},   [MB_DTYPE_U8] = {"U8", 1, 1},
    [MB_DTYPE_BOOL] = {"BOOL", 1, 0},
};
#define DTYPE_COUNT ((int)(sizeof dtype_table / sizeof dtype_table[0]))

static int dtype_valid(mb_dtype dtype) { return (int)dtype >= 0 && (int)dtype < DTYPE_COUNT; }

const char *mb_dtype_name(mb_dtype dtype) { return dtype_valid(dtype) ? dtype_table[dtype].name : "?"; }

size_t mb_dtype_size(mb_dtype dtype) { return dtype_valid(dtype) ? dtype_table[dtype].size : 0; }

static int dtype_from_name(const char *name, mb_dtype *dtype) {
    for (int i = 0; i < DTYPE_COUNT; i++) {
        if (strcmp(name, dtype_table[i].name) == 0) {
            *dtype = (mb_dtype)i;
            return 0;
        }
    }
    return -1;
}

/* ---------------------------------------------------------------- bf16 / f16 */

static uint32_t float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static float bits_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

float mb_bf16_to_f32(uint16_t value) { return bits_float((uint32_t)value << 16); }

uint16_t mb_f32_to_bf16(float value) {
    uint32_t bits = float_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u); /* NaN stays a quiet NaN */
    /* Round to nearest even on the 16 dropped bits; a carry into the exponent is the correct rounding (up to Inf). */
    uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)((bits + rounding) >> 16);
}

float mb_f16_to_f32(uint16_t value) {
    uint32_t sign = (uint32_t)(value & 0x8000u) << 16;
    uint32_t exponent = (value >> 10) & 0x1fu;
    uint32_t mantissa = value & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13)); /* Inf, NaN with its payload */
    if (exponent == 0) {
        float magnitude = (float)mantissa * 0x1p-24f; /* zero or subnormal: mantissa × 2^-24, exact */
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

uint16_t mb_f32_to_f16(float value) {
    uint32_t bits = float_bits(value);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu)); /* quiet NaN */
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to Inf (and Inf itself) */
    if (magnitude >= 0x38800000u) {                                    /* >= 2^-14: normal half */
        uint32_t rebased = magnitude - 0x38000000u;                      /* exponent bias 127 -> 15 */
        uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
        return (uint16_t)(sign | (rounded >> 13));
    }
    uint32_t exponent = magnitude >> 23;
    if (exponent < 102) return sign; /* below 2^-25: rounds to zero */
    /* Subnormal half: value / 2^-24 = full mantissa >> (126 - exponent), rounded to nearest even. */
    uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exponent; /* 14 .. 24 */
    uint32_t quotient = mantissa >> shift;
    uint32_t remainder = mantissa & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (remainder > half || (remainder == half && (quotient & 1u))) quotient++;
    return (uint16_t)(sign | quotient);
}

/* ---------------------------------------------------------------- small helpers */

static char *copy_string(const char *text) {
    size_t length = strlen(text);
    char *copy = malloc(length + 1);
    if (copy != NULL) memcpy(copy, text, length + 1);
    return copy;
}

static void format_shape(char *out, size_t capacity, const int64_t *shape, int ndim) {
    size_t used = 0;
    out[0] = '\0';
    used += (size_t)snprintf(out, capacity, "[");
    for (int i = 0; i < ndim && used < capacity; i++)
        used += (size_t)snprintf(out + used, capacity - used, "%s%" PRId64, i ? "," : "", shape[i]);
    if (used < capacity) snprintf(out + used, capacity - used, "]");
}

/* Strict UTF-8 (no overlong forms, no surrogates, <= U+10FFFF), as Rust's str::from_utf8. Returns the offset of the
 * first bad byte or `length` when all is valid. */
static size_t utf8_invalid_offset(const uint8_t *text, size_t length) {
    size_t i = 0;
    while (i < length) {
        uint8_t lead = text[i];
        size_t extra;
        uint32_t min_codepoint, codepoint;
        if (lead < 0x80) {
            i++;
            continue;
        } else if ((lead & 0xe0) == 0xc0) {
            extra = 1, min_codepoint = 0x80, codepoint = lead & 0x1fu;
        } else if ((lead & 0xf0) == 0xe0) {
            extra = 2, min_codepoint = 0x800, codepoint = lead & 0x0fu;
        } else if ((lead & 0xf8) == 0xf0) {
            extra = 3, min_codepoint = 0x10000, codepoint = lead & 0x07u;
        } else {
            return i;
        }
        if (extra > length - i - 1) return i;
        for (size_t k = 1; k <= extra; k++) {
            if ((text[i + k] & 0xc0) != 0x80) return i;
            codepoint = (codepoint << 6) | (text[i + k] & 0x3fu);
        }
        if (codepoint < min_codepoint || codepoint > 0x10ffff || (codepoint >= 0xd800 && codepoint <= 0xdfff)) return i;
        i += extra + 1;
    }
    return length;
}

static int is_json_whitespace(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Rejects what cJSON accepts but strict JSON (serde_json) does not: raw control bytes in strings or between tokens,
 * and number tokens other than -?(0|[1-9][0-9]*) — every number in a valid header is a shape dim or an offset. */
static int check_header_lexically(const char *path, const uint8_t *text, size_t length, mb_error *err) {
    size_t i = 0;
    while (i < length) {
        uint8_t c = text[i];
        if (c == '"') {
            for (i++; i < length && text[i] != '"'; i++) {
                if (text[i] < 0x20)
                    return mb_fail(err, "%s: header byte %zu: raw control character 0x%02x inside a JSON string", path,
                                   i, text[i]);
                if (text[i] == '\\') i++;
            }
            i++;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t start = i;
            while (i < length && strchr("+-.eE0123456789", text[i]) != NULL && text[i] != '\0') i++;
            size_t digits = start + (text[start] == '-');
            int plain = digits < i && (text[digits] != '0' || i - digits == 1);
            for (size_t k = digits; k < i && plain; k++) plain = text[k] >= '0' && text[k] <= '9';
            if (!plain)
                return mb_fail(err, "%s: header byte %zu: number '%.*s' is not a plain integer (shapes and offsets are "
                               "non-negative integers)", path, start, (int)(i - start > 40 ? 40 : i - start),
                               (const char *)text + start);
        } else {
            if (c < 0x20 && !is_json_whitespace(c))
                return mb_fail(err, "%s: header byte %zu: control character 0x%02x outside a string", path, i, c);
            i++;
        }
    }
    return 0;
}

/* A JSON number that is an exact non-negative integer below 2^53. */
static int json_to_u64(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item)) return -1;
    double value = item->valuedouble;
    if (!(value >= 0.0 && value < ST_MAX_EXACT_INTEGER) || value != (double)(uint64_t)value) return -1;
    *out = (uint64_t)value;
    return 0;
}

static const char *json_type_name(const cJSON *item) {
    if (cJSON_IsString(item)) return "a string";
    if (cJSON_IsNumber(item)) return "a number";
    if (cJSON_IsArray(item)) return "an array";
    if (cJSON_IsObject(item)) return "an object";
    if (cJSON_IsBool(item)) return "a boolean";
    if (cJSON_IsNull(item)) return "null";
    return "invalid";
}

/* ---------------------------------------------------------------- reader */

static int parse_metadata(mb_safetensors *st, const cJSON *metadata, mb_error *err) {
    if (cJSON_IsNull(metadata)) return 0; /* serde reads null as an absent Option */
    if (!cJSON_IsObject(metadata))
        return mb_fail(err, "%s: \"__metadata__\" must be an object of strings, found %s", st->path,
                       json_type_name(metadata));
    int count = cJSON_GetArraySize(metadata);
    st->metadata_keys = calloc((size_t)count + 1, sizeof *st->metadata_keys);
    st->metadata_values = calloc((size_t)count + 1, sizeof *st->metadata_values);
    if (st->metadata_keys == NULL || st->metadata_values == NULL)
        return mb_fail(err, "%s: out of memory for %d metadata entries", st->path, count);
    for (const cJSON *item = metadata->child; item != NULL; item = item->next) {
        if (!cJSON_IsString(item))
            return mb_fail(err, "%s: \"__metadata__\" entry '%s' must be a string, found %s (metadata is a flat "
                           "string-to-string map)", st->path, item->string, json_type_name(item));
        if (mb_st_metadata(st, item->string) != NULL)
            return mb_fail(err, "%s: \"__metadata__\" key '%s' appears twice", st->path, item->string);
        int index = st->metadata_count;
        st->metadata_keys[index] = copy_string(item->string);
        st->metadata_values[index] = copy_string(item->valuestring);
        if (st->metadata_keys[index] == NULL || st->metadata_values[index] == NULL) {
            free(st->metadata_keys[index]);
            free(st->metadata_values[index]);
            return mb_fail(err, "%s: out of memory copying metadata", st->path);
        }
        st->metadata_count++;
    }
    return 0;
}

static int parse_shape(const mb_safetensors *st, const char *name, const cJSON *shape, mb_st_tensor *tensor,
                       mb_error *err) {
    if (!cJSON_IsArray(shape))
        return mb_fail(err, "%s: tensor '%s': \"shape\" must be an array, found %s", st->path, name,
                       json_type_name(shape));
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > MB_ST_MAX_DIMS)
        return mb_fail(err, "%s: tensor '%s': shape has %d dimensions, at most %d supported", st->path, name, ndim,
                       MB_ST_MAX_DIMS);
    int dim = 0;
    for (const cJSON *item = shape->child; item != NULL; item = item->next, dim++) {
        uint64_t size;
        if (json_to_u64(item, &size) != 0) {
            char *text = cJSON_PrintUnformatted(item);
            int rc = mb_fail(err, "%s: tensor '%s': shape dimension %d is %s, not a non-negative integer", st->path,
                             name, dim, text != NULL ? text : json_type_name(item));
            free(text);
            return rc;
        }
        tensor->shape[dim] = (int64_t)size;
    }
    tensor->ndim = ndim;
    return 0;
}

static int parse_offsets(const mb_safetensors *st, const char *name, const cJSON *offsets, uint64_t *begin,
                         uint64_t *end, mb_error *err) {
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 || json_to_u64(offsets->child, begin) != 0 ||
        json_to_u64(offsets->child->next, end) != 0) {
        char *text = cJSON_PrintUnformatted(offsets);
        int rc = mb_fail(err, "%s: tensor '%s': \"data_offsets\" must be [begin,end] of non-negative integers, found %s",
                         st->path, name, text != NULL ? text : json_type_name(offsets));
        free(text);
        return rc;
    }
    if (*begin > *end)
        return mb_fail(err, "%s: tensor '%s': data_offsets [%" PRIu64 ",%" PRIu64 "] end before they begin", st->path,
                       name, *begin, *end);
    return 0;
}

/* The bytes a shape of this dtype needs; -1 on overflow. */
static int shape_bytes(const int64_t *shape, int ndim, mb_dtype dtype, uint64_t *bytes) {
    uint64_t total = mb_dtype_size(dtype);
    for (int i = 0; i < ndim; i++) {
        uint64_t dim = (uint64_t)shape[i];
        if (dim != 0 && total > UINT64_MAX / dim) return -1;
        total *= dim;
    }
    *bytes = total;
    return 0;
}

static int parse_tensor(mb_safetensors *st, const cJSON *entry, mb_st_tensor *tensor, mb_error *err) {
    const char *name = entry->string;
    if (!cJSON_IsObject(entry))
        return mb_fail(err, "%s: tensor '%s': entry must be an object, found %s", st->path, name,
                       json_type_name(entry));
    const cJSON *fields[3] = {NULL, NULL, NULL};
    static const char *const field_names[3] = {"dtype", "shape", "data_offsets"};
    for (const cJSON *item = entry->child; item != NULL; item = item->next) {
        int which = 0;
        while (which < 3 && strcmp(item->string, field_names[which]) != 0) which++;
        if (which == 3)
            return mb_fail(err, "%s: tensor '%s': unexpected field '%s' (only dtype, shape, data_offsets)", st->path,
                           name, item->string);
        if (fields[which] != NULL)
            return mb_fail(err, "%s: tensor '%s': field '%s' appears twice", st->path, name, item->string);
        fields[which] = item;
    }
    for (int which = 0; which < 3; which++)
        if (fields[which] == NULL)
            return mb_fail(err, "%s: tensor '%s': missing field '%s'", st->path, name, field_names[which]);

    if (!cJSON_IsString(fields[0]) || dtype_from_name(fields[0]->valuestring, &tensor->dtype) != 0)
        return mb_fail(err, "%s: tensor '%s': unknown or unsupported dtype %s%s%s (supported: F32 F16 BF16 F64 I64 "
                       "I32 I16 I8 U8 BOOL)", st->path, name, cJSON_IsString(fields[0]) ? "'" : "",
                       cJSON_IsString(fields[0]) ? fields[0]->valuestring : json_type_name(fields[0]),
                       cJSON_IsString(fields[0]) ? "'" : "");
    if (parse_shape(st, name, fields[1], tensor, err) != 0) return -1;
    uint64_t begin = 0, end = 0, needed = 0;
    if (parse_offsets(st, name, fields[2], &begin, &end, err) != 0) return -1;
    char shape_text[256];
    format_shape(shape_text, sizeof shape_text, tensor->shape, tensor->ndim);
    if (shape_bytes(tensor->shape, tensor->ndim, tensor->dtype, &needed) != 0)
        return mb_fail(err, "%s: tensor '%s': shape %s of %s overflows 64 bits of bytes", st->path, name, shape_text,
                       mb_dtype_name(tensor->dtype));
    if (end - begin != needed)
        return mb_fail(err, "%s: tensor '%s': data_offsets [%" PRIu64 ",%" PRIu64 "] hold %" PRIu64
                       " bytes but shape %s of %s needs %" PRIu64, st->path, name, begin, end, end - begin, shape_text,
                       mb_dtype_name(tensor->dtype), needed);
    tensor->begin = (size_t)begin;
    tensor->nbytes = (size_t)(end - begin);
    tensor->name = copy_string(name);
    if (tensor->name == NULL) return mb_fail(err, "%s: out of memory", st->path);
    return 0;
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int compare_by_offset(const void *a, const void *b) {
    const mb_st_tensor *left = a, *right = b;
    if (left->begin != right->begin) return left->begin < right->begin ? -1 : 1;
    if (left->nbytes != right->nbytes) return left->nbytes < right->nbytes ? -1 : 1;
    return strcmp(left->name, right->name);
}

static int check_unique_names(const mb_safetensors *st, mb_error *err) {
    if (st->tensor_count < 2) return 0;
    char **names = malloc((size_t)st->tensor_count * sizeof *names);
    if (names == NULL) return mb_fail(err, "%s: out of memory", st->path);
    for (int i = 0; i < st->tensor_count; i++) names[i] = st->tensors[i].name;
    qsort(names, (size_t)st->tensor_count, sizeof *names, compare_names);
    int rc = 0;
    for (int i = 1; i < st->tensor_count && rc == 0; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            rc = mb_fail(err, "%s: tensor '%s' appears twice in the header", st->path, names[i]);
    free(names);
    return rc;
}

/* Sorted by offset, each tensor begins where the previous ended, from 0, and the last ends at the end of the file. */
static int check_layout(mb_safetensors *st, mb_error *err) {
    qsort(st->tensors, (size_t)st->tensor_count, sizeof *st->tensors, compare_by_offset);
    size_t expected = 0;
    for (int i = 0; i < st->tensor_count; i++) {
        const mb_st_tensor *tensor = &st->tensors[i];
        if (tensor->begin != expected) {
            const char *problem = tensor->begin < expected ? "overlaps the previous tensor" : "leaves a hole after "
                                                                                                "the previous tensor";
            if (i == 0)
                return mb_fail(err, "%s: tensor '%s': data_offsets begin at %zu but the first tensor must begin at 0",
                               st->path, tensor->name, tensor->begin);
            return mb_fail(err, "%s: tensor '%s': data_offsets [%zu,%zu] %s ('%s' ends at %zu; tensors must be "
                           "contiguous)", st->path, tensor->name, tensor->begin, tensor->begin + tensor->nbytes,
                           problem, st->tensors[i - 1].name, expected);
        }
        expected = tensor->begin + tensor->nbytes;
    }
    size_t buffer_size = st->file_size - st->buffer_offset;
    if (expected != buffer_size)
        return mb_fail(err, "%s: the byte buffer after the header is %zu bytes but the tensors cover %zu (%s)",
                       st->path, buffer_size, expected,
                       buffer_size > expected ? "trailing bytes" : "file truncated");
    return 0;
}

static int parse_entries(mb_safetensors *st, const cJSON *root, mb_error *err) {
    int entry_count = cJSON_GetArraySize(root);
    st->tensors = calloc((size_t)entry_count + 1, sizeof *st->tensors);
    if (st->tensors == NULL) return mb_fail(err, "%s: out of memory for %d tensors", st->path, entry_count);
    int seen_metadata = 0;
    for (const cJSON *entry = root->child; entry != NULL; entry = entry->next) {
        if (strcmp(entry->string, ST_METADATA_KEY) == 0) {
            if (seen_metadata++) return mb_fail(err, "%s: \"__metadata__\" appears twice in the header", st->path);
            if (parse_metadata(st, entry, err) != 0) return -1;
            continue;
        }
        if (parse_tensor(st, entry, &st->tensors[st->tensor_count], err) != 0) return -1;
        st->tensor_count++;
    }
    return 0;
}

static int parse_header(mb_safetensors *st, mb_error *err) {
    const uint8_t *bytes = st->bytes;
    if (st->file_size < 8)
        return mb_fail(err, "%s: file is %zu bytes, shorter than the 8-byte header length", st->path, st->file_size);
    uint64_t header_length = 0;
    for (int i = 7; i >= 0; i--) header_length = (header_length << 8) | bytes[i];
    if (header_length > ST_MAX_HEADER_SIZE)
        return mb_fail(err, "%s: header length %" PRIu64 " exceeds the %u-byte limit", st->path, header_length,
                       ST_MAX_HEADER_SIZE);
    if (header_length > st->file_size - 8)
        return mb_fail(err, "%s: header length %" PRIu64 " runs past the end of the %zu-byte file", st->path,
                       header_length, st->file_size);
    size_t length = (size_t)header_length;
    const uint8_t *header = bytes + 8;
    st->buffer_offset = 8 + length;
    if (length == 0) return mb_fail(err, "%s: header length is 0; the header must be a JSON object", st->path);
    if (header[0] != '{')
        return mb_fail(err, "%s: header must start with '{' but byte 8 is 0x%02x", st->path, header[0]);
    size_t bad = utf8_invalid_offset(header, length);
    if (bad != length) return mb_fail(err, "%s: header byte %zu: invalid UTF-8", st->path, bad);

    const char *parse_end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)header, length, &parse_end, 0);
    if (root == NULL) {
        size_t at = parse_end != NULL && parse_end >= (const char *)header ? (size_t)(parse_end - (const char *)header)
                                                                            : 0;
        return mb_fail(err, "%s: header is not valid JSON (near header byte %zu)", st->path, at);
    }
    int rc = 0;
    size_t consumed = (size_t)(parse_end - (const char *)header);
    for (size_t i = consumed; i < length && rc == 0; i++)
        if (!is_json_whitespace(header[i]))
            rc = mb_fail(err, "%s: header byte %zu: unexpected data after the JSON object (only space padding allowed)",
                         st->path, i);
    if (rc == 0 && !cJSON_IsObject(root)) rc = mb_fail(err, "%s: header is not a JSON object", st->path);
    if (rc == 0) rc = parse_entries(st, root, err);
    cJSON_Delete(root);
    if (rc == 0) rc = check_header_lexically(st->path, header, length, err);
    if (rc == 0) rc = check_unique_names(st, err);
    if (rc == 0) rc = check_layout(st, err);
    return rc;
}

int mb_st_open(mb_safetensors *st, const char *path, mb_error *err) {
    memset(st, 0, sizeof *st);
    if (path == NULL) return mb_fail(err, "safetensors open: path is NULL");
    st->path = copy_string(path);
    if (st->path == NULL) return mb_fail(err, "%s: out of memory", path);
    char *data = NULL;
    if (mb_read_file(path, &data, &st->file_size, err) != 0) {
        mb_st_close(st);
        return -1;
    }
    st->bytes = (uint8_t *)data;
    if (parse_header(st, err) != 0) {
        mb_st_close(st);
        return -1;
    }
    return 0;
}

void mb_st_close(mb_safetensors *st) {
    if (st == NULL) return;
    if (st->tensors != NULL)
        for (int i = 0; i < st->tensor_count; i++) free(st->tensors[i].name);
    for (int i = 0; i < st->metadata_count; i++) {
        free(st->metadata_keys[i]);
        free(st->metadata_values[i]);
    }
    free(st->tensors);
    free(st->metadata_keys);
    free(st->metadata_values);
    free(st->bytes);
    free(st->path);
    memset(st, 0, sizeof *st);
}

const mb_st_tensor *mb_st_find(const mb_safetensors *st, const char *name) {
    for (int i = 0; i < st->tensor_count; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

const char *mb_st_metadata(const mb_safetensors *st, const char *key) {
    for (int i = 0; i < st->metadata_count; i++)
        if (strcmp(st->metadata_keys[i], key) == 0) return st->metadata_values[i];
    return NULL;
}

int64_t mb_st_numel(const mb_st_tensor *tensor) {
    /* A zero dimension may follow dims whose product alone is huge, so check for it before multiplying; otherwise
     * the product is at most the validated byte size (< 2^53). */
    for (int i = 0; i < tensor->ndim; i++)
        if (tensor->shape[i] == 0) return 0;
    uint64_t numel = 1;
    for (int i = 0; i < tensor->ndim; i++) numel *= (uint64_t)tensor->shape[i];
    return (int64_t)numel;
}

const void *mb_st_data(const mb_safetensors *st, const mb_st_tensor *tensor) {
    return st->bytes + st->buffer_offset + tensor->begin;
}

static int check_numel(const mb_safetensors *st, const mb_st_tensor *tensor, int64_t expected_numel, mb_error *err) {
    int64_t numel = mb_st_numel(tensor);
    if (numel == expected_numel) return 0;
    char shape_text[256];
    format_shape(shape_text, sizeof shape_text, tensor->shape, tensor->ndim);
    return mb_fail(err, "%s: tensor '%s': has %" PRId64 " elements (shape %s) but %" PRId64 " were expected", st->path,
                   tensor->name, numel, shape_text, expected_numel);
}

int mb_st_read_f32(const mb_safetensors *st, const mb_st_tensor *tensor, float *out, int64_t expected_numel,
                   mb_error *err) {
    if (check_numel(st, tensor, expected_numel, err) != 0) return -1;
    const uint8_t *source = mb_st_data(st, tensor);
    size_t count = (size_t)expected_numel;
    switch (tensor->dtype) {
    case MB_DTYPE_F32:
        if (count > 0) memcpy(out, source, count * sizeof(float));
        return 0;
    case MB_DTYPE_F16:
    case MB_DTYPE_BF16:
        for (size_t i = 0; i < count; i++) {
            uint16_t half;
            memcpy(&half, source + 2 * i, sizeof half); /* the source may be unaligned */
            out[i] = tensor->dtype == MB_DTYPE_F16 ? mb_f16_to_f32(half) : mb_bf16_to_f32(half);
        }
        return 0;
    default:
        return mb_fail(err, "%s: tensor '%s': dtype %s cannot be read as float (F32, F16 or BF16 expected)", st->path,
                       tensor->name, mb_dtype_name(tensor->dtype));
    }
}

int mb_st_read_i32(const mb_safetensors *st, const mb_st_tensor *tensor, int32_t *out, int64_t expected_numel,
                   mb_error *err) {
    if (check_numel(st, tensor, expected_numel, err) != 0) return -1;
    const uint8_t *source = mb_st_data(st, tensor);
    size_t count = (size_t)expected_numel;
    if (tensor->dtype == MB_DTYPE_I32) {
        if (count > 0) memcpy(out, source, count * sizeof(int32_t));
        return 0;
    }
    if (tensor->dtype != MB_DTYPE_I64)
        return mb_fail(err, "%s: tensor '%s': dtype %s cannot be read as int32 (I32 or I64 expected)", st->path,
                       tensor->name, mb_dtype_name(tensor->dtype));
    for (size_t i = 0; i < count; i++) {
        int64_t value;
        memcpy(&value, source + 8 * i, sizeof value);
        if (value < INT32_MIN || value > INT32_MAX)
            return mb_fail(err, "%s: tensor '%s': element %zu is %" PRId64 ", outside the int32 range", st->path,
                           tensor->name, i, value);
        out[i] = (int32_t)value;
    }
    return 0;
}

int mb_st_load_f32(const mb_safetensors *st, const char *name, const int64_t *shape, int ndim, float *out,
                   mb_error *err) {
    if (ndim < 0 || ndim > MB_ST_MAX_DIMS)
        return mb_fail(err, "%s: tensor '%s': requested rank %d is outside 0..%d", st->path, name, ndim,
                       MB_ST_MAX_DIMS);
    const mb_st_tensor *tensor = mb_st_find(st, name);
    if (tensor == NULL)
        return mb_fail(err, "%s: tensor '%s' not found (the file holds %d tensors)", st->path, name,
                       st->tensor_count);
    int same = tensor->ndim == ndim;
    for (int i = 0; i < ndim && same; i++) same = tensor->shape[i] == shape[i];
    if (!same) {
        char found[256], wanted[256];
        format_shape(found, sizeof found, tensor->shape, tensor->ndim);
        format_shape(wanted, sizeof wanted, shape, ndim);
        return mb_fail(err, "%s: tensor '%s': shape %s in the file but %s expected", st->path, name, found, wanted);
    }
    return mb_st_read_f32(st, tensor, out, mb_st_numel(tensor), err);
}

/* ---------------------------------------------------------------- writer */

typedef struct text_buffer {
    char *data;
    size_t length;
    size_t capacity;
    int failed;
} text_buffer;

static void text_append(text_buffer *text, const char *bytes, size_t count) {
    if (text->failed) return;
    if (text->length + count + 1 > text->capacity) {
        size_t capacity = text->capacity ? text->capacity : 256;
        while (text->length + count + 1 > capacity) capacity *= 2;
        char *grown = realloc(text->data, capacity);
        if (grown == NULL) {
            text->failed = 1;
            return;
        }
        text->data = grown;
        text->capacity = capacity;
    }
    memcpy(text->data + text->length, bytes, count);
    text->length += count;
    text->data[text->length] = '\0';
}

static void text_append_cstr(text_buffer *text, const char *string) { text_append(text, string, strlen(string)); }

static void text_append_u64(text_buffer *text, uint64_t value) {
    char digits[24];
    int length = snprintf(digits, sizeof digits, "%" PRIu64, value);
    text_append(text, digits, (size_t)length);
}

/* A JSON string as serde_json writes it: escapes '"', '\\', and bytes < 0x20 (\b \t \n \f \r or \u00xx). */
static void text_append_json_string(text_buffer *text, const char *string) {
    text_append(text, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)string; *p != '\0'; p++) {
        char escaped[8];
        const char *short_form = NULL;
        switch (*p) {
        case '"': short_form = "\\\""; break;
        case '\\': short_form = "\\\\"; break;
        case '\b': short_form = "\\b"; break;
        case '\t': short_form = "\\t"; break;
        case '\n': short_form = "\\n"; break;
        case '\f': short_form = "\\f"; break;
        case '\r': short_form = "\\r"; break;
        default: break;
        }
        if (short_form != NULL) {
            text_append_cstr(text, short_form);
        } else if (*p < 0x20) {
            snprintf(escaped, sizeof escaped, "\\u%04x", *p);
            text_append_cstr(text, escaped);
        } else {
            text_append(text, (const char *)p, 1);
        }
    }
    text_append(text, "\"", 1);
}

typedef struct write_item {
    const mb_st_entry *entry;
    uint64_t nbytes;
} write_item;

static int compare_write_order(const void *a, const void *b) {
    const mb_st_entry *left = ((const write_item *)a)->entry, *right = ((const write_item *)b)->entry;
    int left_rank = dtype_table[left->dtype].writer_rank, right_rank = dtype_table[right->dtype].writer_rank;
    if (left_rank != right_rank) return right_rank - left_rank;
    return strcmp(left->name, right->name);
}

static int valid_utf8_string(const char *string) {
    size_t length = strlen(string);
    return utf8_invalid_offset((const uint8_t *)string, length) == length;
}

static int check_entry(const char *path, const mb_st_entry *entry, int index, uint64_t *nbytes, mb_error *err) {
    if (entry->name == NULL) return mb_fail(err, "%s: tensor %d has no name", path, index);
    const char *name = entry->name;
    if (!valid_utf8_string(name)) return mb_fail(err, "%s: tensor %d: name is not valid UTF-8", path, index);
    if (strcmp(name, ST_METADATA_KEY) == 0)
        return mb_fail(err, "%s: tensor name '%s' is reserved for metadata", path, name);
    if (!dtype_valid(entry->dtype)) return mb_fail(err, "%s: tensor '%s': invalid dtype %d", path, name, (int)entry->dtype);
    if (entry->ndim < 0 || entry->ndim > MB_ST_MAX_DIMS)
        return mb_fail(err, "%s: tensor '%s': rank %d is outside 0..%d", path, name, entry->ndim, MB_ST_MAX_DIMS);
    for (int i = 0; i < entry->ndim; i++)
        if (entry->shape[i] < 0)
            return mb_fail(err, "%s: tensor '%s': dimension %d is negative (%" PRId64 ")", path, name, i,
                           entry->shape[i]);
    if (shape_bytes(entry->shape, entry->ndim, entry->dtype, nbytes) != 0 || *nbytes >= (uint64_t)ST_MAX_EXACT_INTEGER)
        return mb_fail(err, "%s: tensor '%s': size overflows", path, name);
    if (*nbytes > 0 && entry->data == NULL) return mb_fail(err, "%s: tensor '%s': data is NULL", path, name);
    return 0;
}

static int check_metadata_input(const char *path, const char *const *keys, const char *const *values, int count,
                                mb_error *err) {
    if (count < 0) return mb_fail(err, "%s: negative metadata count %d", path, count);
    if (count > 0 && (keys == NULL || values == NULL)) return mb_fail(err, "%s: metadata arrays are NULL", path);
    for (int i = 0; i < count; i++) {
        if (keys[i] == NULL || values[i] == NULL) return mb_fail(err, "%s: metadata entry %d is NULL", path, i);
        if (!valid_utf8_string(keys[i]) || !valid_utf8_string(values[i]))
            return mb_fail(err, "%s: metadata entry %d is not valid UTF-8", path, i);
        for (int k = 0; k < i; k++)
            if (strcmp(keys[k], keys[i]) == 0) return mb_fail(err, "%s: metadata key '%s' given twice", path, keys[i]);
    }
    return 0;
}

/* Validates the entries and fills items (sizes, writer order). */
static int prepare_items(const char *path, const mb_st_entry *entries, int entry_count, write_item *items,
                         mb_error *err) {
    for (int i = 0; i < entry_count; i++) {
        items[i].entry = &entries[i];
        if (check_entry(path, &entries[i], i, &items[i].nbytes, err) != 0) return -1;
    }
    if (entry_count > 1) {
        const char **names = malloc((size_t)entry_count * sizeof *names);
        if (names == NULL) return mb_fail(err, "%s: out of memory", path);
        for (int i = 0; i < entry_count; i++) names[i] = entries[i].name;
        qsort(names, (size_t)entry_count, sizeof *names, compare_names);
        int rc = 0;
        for (int i = 1; i < entry_count && rc == 0; i++)
            if (strcmp(names[i - 1], names[i]) == 0) rc = mb_fail(err, "%s: tensor '%s' given twice", path, names[i]);
        free(names);
        if (rc != 0) return -1;
    }
    qsort(items, (size_t)entry_count, sizeof *items, compare_write_order);
    return 0;
}

/* Compact JSON header, padded with spaces to a multiple of 8. */
static int build_header(const char *path, const write_item *items, int entry_count, const char *const *keys,
                        const char *const *values, int metadata_count, text_buffer *text, mb_error *err) {
    text_append(text, "{", 1);
    if (metadata_count > 0) {
        text_append_cstr(text, "\"__metadata__\":{");
        for (int i = 0; i < metadata_count; i++) {
            if (i) text_append(text, ",", 1);
            text_append_json_string(text, keys[i]);
            text_append(text, ":", 1);
            text_append_json_string(text, values[i]);
        }
        text_append(text, "}", 1);
    }
    uint64_t offset = 0;
    for (int i = 0; i < entry_count; i++) {
        const mb_st_entry *entry = items[i].entry;
        if (i || metadata_count > 0) text_append(text, ",", 1);
        text_append_json_string(text, entry->name);
        text_append_cstr(text, ":{\"dtype\":\"");
        text_append_cstr(text, mb_dtype_name(entry->dtype));
        text_append_cstr(text, "\",\"shape\":[");
        for (int d = 0; d < entry->ndim; d++) {
            if (d) text_append(text, ",", 1);
            text_append_u64(text, (uint64_t)entry->shape[d]);
        }
        text_append_cstr(text, "],\"data_offsets\":[");
        text_append_u64(text, offset);
        text_append(text, ",", 1);
        if (items[i].nbytes > (uint64_t)ST_MAX_EXACT_INTEGER - offset)
            return mb_fail(err, "%s: total tensor data overflows", path);
        offset += items[i].nbytes;
        text_append_u64(text, offset);
        text_append_cstr(text, "]}");
    }
    text_append(text, "}", 1);
    while (!text->failed && text->length % 8 != 0) text_append(text, " ", 1);
    if (text->failed) return mb_fail(err, "%s: out of memory building the header", path);
    if (text->length > ST_MAX_HEADER_SIZE)
        return mb_fail(err, "%s: header would be %zu bytes, over the %u-byte limit", path, text->length,
                       ST_MAX_HEADER_SIZE);
    return 0;
}

static int write_file(const char *path, const text_buffer *header, const write_item *items, int entry_count,
                      mb_error *err) {
    uint8_t length_bytes[8];
    for (int i = 0; i < 8; i++) length_bytes[i] = (uint8_t)((uint64_t)header->length >> (8 * i));
    mb_atomic_file file;
    if (mb_atomic_file_open(&file, path, err) != 0) return -1;
    int rc = mb_atomic_file_write(&file, length_bytes, sizeof length_bytes, err);
    if (rc == 0) rc = mb_atomic_file_write(&file, header->data, header->length, err);
    for (int i = 0; i < entry_count && rc == 0; i++)
        rc = mb_atomic_file_write(&file, items[i].entry->data, (size_t)items[i].nbytes, err);
    if (rc != 0) {
        mb_atomic_file_abort(&file);
        return -1;
    }
    return mb_atomic_file_commit(&file, err);
}

int mb_st_write(const char *path, const mb_st_entry *entries, int entry_count, const char *const *metadata_keys,
                const char *const *metadata_values, int metadata_count, mb_error *err) {
    if (path == NULL) return mb_fail(err, "safetensors write: path is NULL");
    if (entry_count < 0 || (entry_count > 0 && entries == NULL))
        return mb_fail(err, "%s: invalid tensor list (%d entries)", path, entry_count);
    if (check_metadata_input(path, metadata_keys, metadata_values, metadata_count, err) != 0) return -1;
    write_item *items = calloc((size_t)entry_count + 1, sizeof *items);
    if (items == NULL) return mb_fail(err, "%s: out of memory", path);
    text_buffer header = {0};
    int rc = prepare_items(path, entries, entry_count, items, err);
    if (rc == 0)
        rc = build_header(path, items, entry_count, metadata_keys, metadata_values, metadata_count, &header, err);
    if (rc == 0) rc = write_file(path, &header, items, entry_count, err);
    free(header.data);
    free(items);
    return rc;
}
