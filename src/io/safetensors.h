/* safetensors reader and writer (https://github.com/huggingface/safetensors format, byte-exact).
 *
 * Layout: u64 little-endian header length N, N bytes of JSON header, then the byte buffer. Every tensor entry is
 * {"dtype":..., "shape":[...], "data_offsets":[begin,end]} with offsets relative to the buffer. The reader validates
 * everything the reference reader does (header size, JSON shape, dtype names, offsets contiguous from 0 without holes or
 * overlaps, sizes matching shape × dtype width, file size exact, no duplicate names) and reports the file and tensor
 * name on any violation. The writer pads the header with spaces to a multiple of 8, writes "__metadata__" first and
 * the tensors sorted as the reference writer sorts them, and commits atomically (temp file, fsync, rename). */
#ifndef MB_SAFETENSORS_H
#define MB_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#define MB_ST_MAX_DIMS 8

typedef enum mb_dtype {
    MB_DTYPE_F32,
    MB_DTYPE_F16,
    MB_DTYPE_BF16,
    MB_DTYPE_F64,
    MB_DTYPE_I64,
    MB_DTYPE_I32,
    MB_DTYPE_I16,
    MB_DTYPE_I8,
    MB_DTYPE_U8,
    MB_DTYPE_BOOL,
} mb_dtype;

const char *mb_dtype_name(mb_dtype dtype);
size_t mb_dtype_size(mb_dtype dtype);

typedef struct mb_st_tensor {
    char *name;
    mb_dtype dtype;
    int ndim;
    int64_t shape[MB_ST_MAX_DIMS];
    size_t begin;   /* offset into the byte buffer */
    size_t nbytes;
} mb_st_tensor;

typedef struct mb_safetensors {
    char *path;
    uint8_t *bytes;        /* the whole file */
    size_t file_size;
    size_t buffer_offset;  /* 8 + header length */
    mb_st_tensor *tensors;
    int tensor_count;
    char **metadata_keys;
    char **metadata_values;
    int metadata_count;
} mb_safetensors;

/* Reads and validates the file. On failure nothing needs closing. */
int mb_st_open(mb_safetensors *st, const char *path, mb_error *err);
void mb_st_close(mb_safetensors *st);

const mb_st_tensor *mb_st_find(const mb_safetensors *st, const char *name);
const char *mb_st_metadata(const mb_safetensors *st, const char *key);
int64_t mb_st_numel(const mb_st_tensor *tensor);
const void *mb_st_data(const mb_safetensors *st, const mb_st_tensor *tensor);

/* Converts F32, F16 or BF16 data to float; `expected_numel` must match (error names file and tensor otherwise). */
int mb_st_read_f32(const mb_safetensors *st, const mb_st_tensor *tensor, float *out, int64_t expected_numel, mb_error *err);
/* Converts I32 or I64 data to int32 (I64 values outside int32 range are an error). */
int mb_st_read_i32(const mb_safetensors *st, const mb_st_tensor *tensor, int32_t *out, int64_t expected_numel, mb_error *err);
/* Looks the tensor up by name, checks its shape equals `shape` (ndim dims), converts to float. */
int mb_st_load_f32(const mb_safetensors *st, const char *name, const int64_t *shape, int ndim, float *out, mb_error *err);

/* One tensor to write. `data` holds numel × dtype width bytes, little-endian, row-major. */
typedef struct mb_st_entry {
    const char *name;
    mb_dtype dtype;
    int ndim;
    int64_t shape[MB_ST_MAX_DIMS];
    const void *data;
} mb_st_entry;

/* Writes atomically. metadata is `metadata_count` key/value pairs (flat string map); pass {"format","pt"} for HF. */
int mb_st_write(const char *path, const mb_st_entry *entries, int entry_count, const char *const *metadata_keys,
                const char *const *metadata_values, int metadata_count, mb_error *err);

/* bf16/f16 conversions (round to nearest even), used by the reader and by the CUDA backend. */
float mb_bf16_to_f32(uint16_t value);
uint16_t mb_f32_to_bf16(float value);
float mb_f16_to_f32(uint16_t value);
uint16_t mb_f32_to_f16(float value);

#endif
