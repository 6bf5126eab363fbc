/* Hugging Face checkpoint directories: config.json + model.safetensors in and out. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/fileio.h"
#include "io/safetensors.h"
#include "model/model.h"

int mb_model_create(mb_model *model, const mb_config *config, mb_error *err) {
    memset(model, 0, sizeof *model);
    model->config = *config;
    if (mb_param_table_build(&model->table, config, err) != 0) return -1;
    model->params = calloc(model->table.total_numel, sizeof(float));
    if (model->params == NULL) {
        mb_param_table_free(&model->table);
        return mb_fail(err, "out of memory allocating %zu parameters", model->table.total_numel);
    }
    return 0;
}

void mb_model_free(mb_model *model) {
    free(model->params);
    mb_param_table_free(&model->table);
    memset(model, 0, sizeof *model);
}

static int is_head_tensor(const char *name) {
    return strncmp(name, "head.", 5) == 0 || strncmp(name, "classifier.", 11) == 0 || strncmp(name, "decoder.", 8) == 0;
}

static int check_unexpected(const mb_model *model, const mb_safetensors *st, const mb_load_options *options,
                            mb_error *err) {
    for (int i = 0; i < st->tensor_count; i++) {
        const char *name = st->tensors[i].name;
        if (mb_param_table_find(&model->table, name) >= 0) continue;
        if (strcmp(name, "decoder.weight") == 0 && model->config.tie_word_embeddings) continue;
        if (options != NULL && options->ignore_unexpected) continue;
        return mb_fail(err, "%s: unexpected tensor '%s' (not part of this model's configuration)", st->path, name);
    }
    return 0;
}

int mb_model_load_weights(mb_model *model, const char *path, const mb_load_options *options, mb_error *err) {
    mb_safetensors st;
    if (mb_st_open(&st, path, err) != 0) return -1;
    int rc = check_unexpected(model, &st, options, err);
    for (int i = 0; rc == 0 && i < model->table.count; i++) {
        const mb_param_info *p = &model->table.params[i];
        if (mb_st_find(&st, p->name) == NULL && options != NULL && options->allow_missing_head && is_head_tensor(p->name))
            continue;
        if (mb_st_find(&st, p->name) == NULL) {
            rc = mb_fail(err, "%s: missing tensor '%s'", path, p->name);
            break;
        }
        rc = mb_st_load_f32(&st, p->name, p->shape, p->ndim, model->params + p->offset, err);
    }
    mb_st_close(&st);
    return rc;
}

int mb_model_load_hf(mb_model *model, const char *dir, mb_error *err) {
    char path[4096];
    mb_config config;
    if (mb_path_join(path, sizeof path, dir, "config.json") != 0) return mb_fail(err, "%s: path too long", dir);
    if (mb_config_load_json(&config, path, err) != 0) return -1;
    if (mb_model_create(model, &config, err) != 0) return -1;
    if (mb_path_join(path, sizeof path, dir, "model.safetensors") != 0) {
        mb_model_free(model);
        return mb_fail(err, "%s: path too long", dir);
    }
    if (mb_model_load_weights(model, path, NULL, err) != 0) {
        mb_model_free(model);
        return -1;
    }
    return 0;
}

void mb_param_entries(const mb_param_table *table, const float *arena, const char *prefix, mb_st_entry *entries,
                      mb_param_entry_name *names) {
    int prefixed = prefix != NULL && prefix[0] != '\0';
    for (int i = 0; i < table->count; i++) {
        const mb_param_info *p = &table->params[i];
        if (prefixed) snprintf(names[i], sizeof names[i], "%s%s", prefix, p->name);
        entries[i] = (mb_st_entry){.name = prefixed ? names[i] : p->name, .dtype = MB_DTYPE_F32, .ndim = p->ndim,
                                   .shape = {p->shape[0], p->shape[1]}, .data = arena + p->offset};
    }
}

int mb_model_save_hf(const mb_model *model, const char *dir, mb_error *err) {
    if (mb_make_dirs(dir, err) != 0) return -1;
    const mb_param_table *table = &model->table;
    mb_st_entry *entries = calloc((size_t)table->count, sizeof *entries);
    if (entries == NULL) return mb_fail(err, "out of memory");
    mb_param_entries(table, model->params, NULL, entries, NULL);
    char path[4096];
    const char *keys[] = {"format"}, *values[] = {"pt"};
    int rc = mb_path_join(path, sizeof path, dir, "model.safetensors");
    if (rc == 0) rc = mb_st_write(path, entries, table->count, keys, values, 1, err);
    free(entries);
    if (rc != 0) return -1;
    char *json = mb_config_to_json(&model->config);
    if (json == NULL) return mb_fail(err, "out of memory writing config.json");
    rc = mb_path_join(path, sizeof path, dir, "config.json");
    if (rc == 0) rc = mb_write_file_atomic(path, json, strlen(json), err);
    free(json);
    return rc;
}
