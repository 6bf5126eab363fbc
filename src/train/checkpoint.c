/* Training checkpoints (see checkpoint.h). */
#include "train/checkpoint.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fileio.h"
#include "io/safetensors.h"

void mb_trainer_state_free(mb_trainer_state *state) {
    free(state->cursor_json);
    state->cursor_json = NULL;
}

static int write_optimizer(const char *path, const mb_param_table *table, const float *m, const float *v,
                           int64_t step, mb_error *err) {
    int count = 2 * table->count;
    mb_st_entry *entries = calloc((size_t)count, sizeof *entries);
    mb_param_entry_name *names = calloc((size_t)count, sizeof *names);
    if (entries == NULL || names == NULL) {
        free(entries);
        free(names);
        return mb_fail(err, "out of memory");
    }
    mb_param_entries(table, m, "m.", entries, names);
    mb_param_entries(table, v, "v.", entries + table->count, names + table->count);
    char step_text[32];
    snprintf(step_text, sizeof step_text, "%" PRId64, step);
    const char *keys[] = {"format", "optimizer", "step"}, *values[] = {"pt", "StableAdamW", step_text};
    int rc = mb_st_write(path, entries, count, keys, values, 3, err);
    free(entries);
    free(names);
    return rc;
}

static char *state_to_json(const mb_trainer_state *s) {
    cJSON *root = cJSON_CreateObject();
    char hex[32];
    cJSON_AddStringToObject(root, "format", "modernbert.c trainer state");
    cJSON_AddNumberToObject(root, "version", 1);
    cJSON_AddNumberToObject(root, "step", (double)s->step);
    cJSON_AddNumberToObject(root, "phase", s->phase);
    cJSON_AddNumberToObject(root, "phase_step", (double)s->phase_step);
    cJSON_AddNumberToObject(root, "tokens_seen", (double)s->tokens_seen);
    cJSON_AddNumberToObject(root, "phase_tokens", (double)s->phase_tokens);
    cJSON_AddNumberToObject(root, "optimizer_step", (double)s->optimizer_step);
    cJSON_AddNumberToObject(root, "max_lr", s->max_lr);
    cJSON_AddNumberToObject(root, "nonfinite_streak", s->nonfinite_streak);
    snprintf(hex, sizeof hex, "0x%016" PRIx64, s->config_hash);
    cJSON_AddStringToObject(root, "config_hash", hex);
    snprintf(hex, sizeof hex, "0x%016" PRIx64, s->seed);
    cJSON_AddStringToObject(root, "seed", hex);
    /* every random stream (init, shuffle, masking) is derived from (seed, counters): this is the whole RNG state */
    cJSON_AddStringToObject(root, "rng", "derived from seed and data cursor counters");
    cJSON *cursor = s->cursor_json ? cJSON_Parse(s->cursor_json) : NULL;
    cJSON_AddItemToObject(root, "data_cursor", cursor ? cursor : cJSON_CreateNull());
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    return text;
}

static void remove_tree(const char *path) {
    DIR *dir = opendir(path);
    if (dir == NULL) {
        unlink(path);
        return;
    }
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
        char child[4096];
        if (mb_path_join(child, sizeof child, path, entry->d_name) == 0) remove_tree(child);
    }
    closedir(dir);
    rmdir(path);
}

static int compare_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Sorted names of complete step-* folders (with trainer_state.json). */
static int list_checkpoints(const char *checkpoints_dir, char ***names, int *count) {
    *names = NULL;
    *count = 0;
    DIR *dir = opendir(checkpoints_dir);
    if (dir == NULL) return 0;
    int capacity = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strncmp(entry->d_name, "step-", 5) != 0) continue;
        char state[4096];
        snprintf(state, sizeof state, "%s/%s/trainer_state.json", checkpoints_dir, entry->d_name);
        if (!mb_path_exists(state)) continue;
        if (*count == capacity) {
            capacity = capacity ? 2 * capacity : 16;
            *names = realloc(*names, (size_t)capacity * sizeof **names);
        }
        (*names)[(*count)++] = strdup(entry->d_name);
    }
    closedir(dir);
    qsort(*names, (size_t)*count, sizeof **names, compare_names);
    return 0;
}

static void free_names(char **names, int count) {
    for (int i = 0; i < count; i++) free(names[i]);
    free(names);
}

static void prune(const char *checkpoints_dir, int keep) {
    char **names;
    int count;
    list_checkpoints(checkpoints_dir, &names, &count);
    for (int i = 0; i < count - keep; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", checkpoints_dir, names[i]);
        remove_tree(path);
    }
    free_names(names, count);
}

static int write_contents(const char *dir, const mb_checkpoint_contents *c, mb_error *err) {
    char path[4096];
    if (mb_model_save_hf(c->model, dir, err) != 0) return -1;
    if (c->tokenizer_path != NULL && c->tokenizer_path[0] != '\0') {
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        if (mb_copy_file_atomic(c->tokenizer_path, path, err) != 0) return -1;
    }
    if (c->m != NULL) {
        snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
        if (write_optimizer(path, &c->model->table, c->m, c->v, c->state->optimizer_step, err) != 0) return -1;
    }
    char *json = state_to_json(c->state);
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    int rc = mb_write_file_atomic(path, json, strlen(json), err);
    free(json);
    if (rc == 0) rc = mb_fsync_dir(dir, err);
    return rc;
}

int mb_checkpoint_write(const char *run_dir, const mb_checkpoint_contents *c, int keep, char *written,
                        size_t written_size, mb_error *err) {
    char checkpoints[4096], temp[4200], final[4200], name[64];
    snprintf(checkpoints, sizeof checkpoints, "%s/checkpoints", run_dir);
    if (mb_make_dirs(checkpoints, err) != 0) return -1;
    snprintf(name, sizeof name, "step-%08" PRId64, c->state->step);
    snprintf(temp, sizeof temp, "%s/.tmp-%s.%ld", checkpoints, name, (long)getpid());
    snprintf(final, sizeof final, "%s/%s", checkpoints, name);
    remove_tree(temp);
    if (mb_make_dirs(temp, err) != 0) return -1;
    if (write_contents(temp, c, err) != 0) {
        remove_tree(temp);
        return mb_fail_context(err, "writing checkpoint %s", final);
    }
    if (mb_path_exists(final)) remove_tree(final);
    if (rename(temp, final) != 0) {
        int saved = errno;
        remove_tree(temp);
        return mb_fail(err, "%s: rename to %s failed: %s", temp, final, strerror(saved));
    }
    if (mb_fsync_dir(checkpoints, err) != 0) return -1;
    char latest[4200];
    snprintf(latest, sizeof latest, "%s/latest", checkpoints);
    if (mb_write_file_atomic(latest, name, strlen(name), err) != 0) return -1;
    prune(checkpoints, keep);
    if (written != NULL) snprintf(written, written_size, "%s", final);
    return 0;
}

int mb_checkpoint_find_latest(const char *run_dir, char *path, size_t path_size, mb_error *err) {
    (void)err;
    char checkpoints[4096];
    snprintf(checkpoints, sizeof checkpoints, "%s/checkpoints", run_dir);
    char **names;
    int count;
    list_checkpoints(checkpoints, &names, &count);
    if (count == 0) return 0;
    /* `latest` names the newest; fall back to the highest complete step if it is missing or stale */
    snprintf(path, path_size, "%s/%s", checkpoints, names[count - 1]);
    free_names(names, count);
    return 1;
}

static int json_int64(const cJSON *root, const char *key, int64_t *out, const char *path, mb_error *err) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsNumber(item)) return mb_fail(err, "%s: field '%s' missing or not a number", path, key);
    *out = (int64_t)item->valuedouble;
    return 0;
}

static int json_hex(const cJSON *root, const char *key, uint64_t *out, const char *path, mb_error *err) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsString(item) || sscanf(item->valuestring, "0x%" SCNx64, out) != 1)
        return mb_fail(err, "%s: field '%s' missing or not a hex string", path, key);
    return 0;
}

int mb_checkpoint_read_state(const char *checkpoint_dir, mb_trainer_state *s, mb_error *err) {
    memset(s, 0, sizeof *s);
    char path[4096];
    snprintf(path, sizeof path, "%s/trainer_state.json", checkpoint_dir);
    char *text = NULL;
    size_t size = 0;
    if (mb_read_file(path, &text, &size, err) != 0) return -1;
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (root == NULL) return mb_fail(err, "%s: not valid JSON", path);
    int64_t phase = 0, streak = 0;
    int rc = json_int64(root, "step", &s->step, path, err);
    if (rc == 0) rc = json_int64(root, "phase", &phase, path, err);
    if (rc == 0) rc = json_int64(root, "phase_step", &s->phase_step, path, err);
    if (rc == 0) rc = json_int64(root, "tokens_seen", &s->tokens_seen, path, err);
    if (rc == 0) rc = json_int64(root, "phase_tokens", &s->phase_tokens, path, err);
    if (rc == 0) rc = json_int64(root, "optimizer_step", &s->optimizer_step, path, err);
    if (rc == 0) rc = json_int64(root, "nonfinite_streak", &streak, path, err);
    if (rc == 0) rc = json_hex(root, "config_hash", &s->config_hash, path, err);
    if (rc == 0) rc = json_hex(root, "seed", &s->seed, path, err);
    const cJSON *max_lr = cJSON_GetObjectItemCaseSensitive(root, "max_lr");
    if (rc == 0 && !cJSON_IsNumber(max_lr)) rc = mb_fail(err, "%s: field 'max_lr' missing", path);
    if (rc == 0) s->max_lr = max_lr->valuedouble;
    s->phase = (int)phase;
    s->nonfinite_streak = (int)streak;
    const cJSON *cursor = cJSON_GetObjectItemCaseSensitive(root, "data_cursor");
    if (rc == 0 && cursor != NULL && !cJSON_IsNull(cursor)) s->cursor_json = cJSON_PrintUnformatted(cursor);
    cJSON_Delete(root);
    return rc;
}

int mb_checkpoint_read_optimizer(const char *checkpoint_dir, const mb_param_table *table, float *m, float *v,
                                 mb_error *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/optimizer.safetensors", checkpoint_dir);
    mb_safetensors st;
    if (mb_st_open(&st, path, err) != 0) return -1;
    int rc = 0;
    for (int i = 0; rc == 0 && i < table->count; i++) {
        const mb_param_info *p = &table->params[i];
        char name[MB_PARAM_NAME_SIZE + 4];
        snprintf(name, sizeof name, "m.%s", p->name);
        rc = mb_st_load_f32(&st, name, p->shape, p->ndim, m + p->offset, err);
        snprintf(name, sizeof name, "v.%s", p->name);
        if (rc == 0) rc = mb_st_load_f32(&st, name, p->shape, p->ndim, v + p->offset, err);
    }
    mb_st_close(&st);
    return rc;
}
