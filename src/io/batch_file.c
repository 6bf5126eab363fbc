/* Batch files (see batch_file.h). */
#include "io/batch_file.h"

#include <stdlib.h>
#include <string.h>

#include "cpu/model_cpu.h"
#include "io/safetensors.h"

void mb_batch_file_free(mb_batch_file *lb) {
    free(lb->input_ids);
    free(lb->cu_seqlens);
    free(lb->labels);
    free(lb->sequence_labels);
}

static int read_int_tensor(const mb_safetensors *st, const char *name, int32_t **out, int64_t *count, mb_error *err) {
    const mb_st_tensor *t = mb_st_find(st, name);
    if (t == NULL) return mb_fail(err, "%s: missing tensor '%s'", st->path, name);
    if (t->ndim != 1) return mb_fail(err, "%s: tensor '%s' must be 1-dimensional", st->path, name);
    *count = t->shape[0];
    *out = malloc((size_t)(*count > 0 ? *count : 1) * sizeof(int32_t));
    if (*out == NULL) return mb_fail(err, "out of memory");
    return mb_st_read_i32(st, t, *out, *count, err);
}

int mb_batch_file_load(mb_batch_file *lb, const char *path, const mb_config *config, mb_error *err) {
    memset(lb, 0, sizeof *lb);
    mb_safetensors st;
    if (mb_st_open(&st, path, err) != 0) return -1;
    int64_t n = 0, bounds = 0, label_count = 0;
    int rc = read_int_tensor(&st, "input_ids", &lb->input_ids, &n, err);
    if (rc == 0) rc = read_int_tensor(&st, "cu_seqlens", &lb->cu_seqlens, &bounds, err);
    if (rc == 0 && bounds < 2) rc = mb_fail(err, "%s: cu_seqlens needs at least 2 entries", path);
    const mb_st_tensor *labels = rc == 0 ? mb_st_find(&st, "labels") : NULL;
    if (rc == 0 && labels == NULL) rc = mb_fail(err, "%s: missing tensor 'labels'", path);
    if (rc == 0 && config->head == MB_HEAD_MASKED_LM) {
        rc = read_int_tensor(&st, "labels", &lb->labels, &label_count, err);
        if (rc == 0 && label_count != n)
            rc = mb_fail(err, "%s: labels has %lld entries but input_ids has %lld", path, (long long)label_count,
                         (long long)n);
    } else if (rc == 0) {
        label_count = labels->ndim == 1 ? labels->shape[0] : -1;
        if (label_count != bounds - 1)
            rc = mb_fail(err, "%s: classifier labels must be 1-D with one entry per sequence (%lld)", path,
                         (long long)(bounds - 1));
        lb->sequence_labels = rc == 0 ? malloc((size_t)label_count * sizeof(float)) : NULL;
        if (rc == 0 && labels->dtype == MB_DTYPE_I32) {
            int32_t *ints = malloc((size_t)label_count * sizeof(int32_t));
            rc = ints ? mb_st_read_i32(&st, labels, ints, label_count, err) : mb_fail(err, "out of memory");
            for (int64_t i = 0; rc == 0 && i < label_count; i++) lb->sequence_labels[i] = (float)ints[i];
            free(ints);
        } else if (rc == 0) {
            rc = mb_st_read_f32(&st, labels, lb->sequence_labels, label_count, err);
        }
    }
    mb_st_close(&st);
    if (rc != 0) {
        mb_batch_file_free(lb);
        return -1;
    }
    lb->batch = (mb_batch){(int)n, (int)(bounds - 1), lb->input_ids, lb->cu_seqlens, lb->labels, lb->sequence_labels};
    if (mb_batch_validate(&lb->batch, config, err) != 0) {
        mb_batch_file_free(lb);
        return mb_fail_context(err, "%s", path);
    }
    return 0;
}

