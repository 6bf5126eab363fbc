/* The pretraining loop (see trainer.h), read top to bottom:
 *
 *   setup:  tokenizer → model config → backend (+ init or --init weights) → resume (weights, moments, cursor)
 *   for each phase from the current one:
 *     set RoPE thetas and max_lr; open the phase's data stream at its cursor
 *     while phase tokens < budget:
 *       gather the step's micro-batches; N = labelled tokens of the whole step
 *       zero grads; for each micro-batch: forward, backward with grad_scale 1/N      (global mean loss)
 *       grad norm; not finite → skip the update (abort after K in a row); else StableAdamW at lr(tokens)
 *       log, validate, checkpoint (every N steps / M minutes, at phase ends, on SIGINT/SIGTERM)
 */
#include "common/clock.h"
#include "train/trainer.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/fileio.h"
#include "data/loader.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "dist/dist.h"
#include "dist/env.h"
#include "io/batch_file.h"
#include "model/backend.h"
#include "model/flops.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "train/schedule.h"

typedef struct step_batch {
    int32_t *input_ids, *labels, *cu_seqlens;
    size_t token_capacity, sequence_capacity;
    mb_batch batch;
    int64_t label_count;
    uint64_t digest;               /* of ids and labels, < 2^40: summed over a step's micro-batches on all ranks */
} step_batch;

typedef struct trainer {
    const mb_run_config *cfg;
    const mb_pretrain_options *options;
    mb_tokenizer *tokenizer;
    mb_special_ids special;
    mb_model host;                 /* config + table + fp32 parameters for checkpoints */
    float *m, *v;                  /* optimizer moments, host copies for checkpoints */
    mb_backend *backend;
    mb_stableadamw adamw;
    mb_trainer_state state;
    uint64_t config_hash;
    FILE *metrics;
    mb_shard_set *train_set, *val_set;
    int32_t *special_id_list;      /* ids never used as random MLM replacements */
    size_t special_id_count;
    mb_loader *loader;
    char **batch_files;            /* step-by-step mode */
    int batch_file_count;
    step_batch *step_batches;
    int step_batch_capacity;
    double start_time, last_log_time, last_checkpoint_time;
    int64_t tokens_at_last_log;
    double loss_sum_since_log;
    double flops_since_log;        /* model FLOPs (docs/performance.md) since the last log line */
    double peak_flops;             /* the device's dense bf16 peak; 0 = no MFU (CPU or unknown GPU) */
    int64_t labels_since_log;
    int64_t run_tokens_total;
    int64_t tokens_at_start;
    /* data parallelism: NULL dist = one process; only rank 0 writes files */
    mb_dist *dist;
    mb_dist_env env;
    int rank, world_size;
    int stop_agreed;               /* some rank asked to stop (signal): every rank stops after the same step */
} trainer;

static int is_main(const trainer *t) { return t->rank == 0; }

/* Σ over ranks in place (a no-op for one process). */
static int all_ranks_sum(trainer *t, double *values, int count, mb_error *err) {
    return t->dist != NULL ? mb_dist_all_reduce_sum(t->dist, values, count, err) : 0;
}

static int collect_special_ids(trainer *t, mb_error *err);


/* ---- setup ---- */

static int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

static int build_model_config(trainer *t, mb_config *config, mb_error *err) {
    const mb_run_config *c = t->cfg;
    if (c->model.init[0] != '\0') {
        char path[4096];
        snprintf(path, sizeof path, "%s/config.json", c->model.init);
        if (mb_config_load_json(config, path, err) != 0) return -1;
        config->head = MB_HEAD_MASKED_LM;
        return mb_config_finalize(config, err);
    }
    static const char *const presets[] = {"tiny", "base", "large"};
    if (mb_config_preset(config, presets[c->model.preset], err) != 0) return -1;
    int tokenizer_vocab = mb_tokenizer_vocab_size(t->tokenizer);
    config->vocab_size = c->model.vocab_size ? c->model.vocab_size : round_up(tokenizer_vocab, 64);
    if (config->vocab_size < tokenizer_vocab)
        return mb_fail(err, "model.vocab_size %d is smaller than the tokenizer's %d ids", config->vocab_size,
                       tokenizer_vocab);
    if (c->model.hidden_size) config->hidden_size = c->model.hidden_size;
    if (c->model.intermediate_size) config->intermediate_size = c->model.intermediate_size;
    if (c->model.num_hidden_layers) config->num_hidden_layers = c->model.num_hidden_layers;
    if (c->model.num_attention_heads) config->num_attention_heads = c->model.num_attention_heads;
    if (c->model.global_attn_every_n_layers) config->global_attn_every_n_layers = c->model.global_attn_every_n_layers;
    if (c->model.local_attention) config->local_attention = c->model.local_attention;
    config->pad_token_id = t->special.pad;
    config->cls_token_id = config->bos_token_id = t->special.cls;
    config->sep_token_id = config->eos_token_id = t->special.sep;
    config->global_rope_theta = c->phases[0].global_rope_theta;
    config->local_rope_theta = c->phases[0].local_rope_theta;
    config->max_position_embeddings = 8192;
    return mb_config_finalize(config, err);
}

static int setup_model(trainer *t, mb_error *err) {
    if (mb_tokenizer_load(&t->tokenizer, t->cfg->data.tokenizer, err) != 0) return -1;
    t->special = mb_tokenizer_special_ids(t->tokenizer);
    if (t->special.mask < 0 || t->special.pad < 0)
        return mb_fail(err, "%s: the tokenizer has no [MASK] or [PAD] token", t->cfg->data.tokenizer);
    mb_config config;
    if (build_model_config(t, &config, err) != 0) return mb_fail_context(err, "model");
    if (mb_model_create(&t->host, &config, err) != 0) return -1;
    if (t->cfg->model.init[0] != '\0') {
        char path[4096];
        snprintf(path, sizeof path, "%s/model.safetensors", t->cfg->model.init);
        mb_load_options lenient = {.allow_missing_head = 1, .ignore_unexpected = 1};
        if (mb_model_load_weights(&t->host, path, &lenient, err) != 0) return -1;
    } else {
        mb_params_init(&t->host.table, &config, t->host.params, (uint64_t)t->cfg->run.seed);
    }
    if (collect_special_ids(t, err) != 0) return -1;
    t->m = calloc(t->host.table.total_numel, sizeof(float));
    t->v = calloc(t->host.table.total_numel, sizeof(float));
    if (t->m == NULL || t->v == NULL) return mb_fail(err, "out of memory for optimizer state");
    if (mb_backend_create(&t->backend, t->dist != NULL ? "cuda" : t->cfg->run.backend, &config, err) != 0) return -1;
    if (mb_backend_set_recompute(t->backend, (mb_recompute)t->cfg->run.recompute, err) != 0) return -1;
    if (t->dist != NULL) {
        if (t->backend->ops->attach_dist == NULL)
            return mb_fail(err, "the %s backend cannot train data-parallel", t->backend->ops->name);
        if (t->backend->ops->attach_dist(t->backend, t->dist, err) != 0) return -1;
    }
    return t->backend->ops->write_params(t->backend, t->host.params, err);
}

static int setup_resume(trainer *t, mb_error *err) {
    char path[4096];
    int found = mb_checkpoint_find_latest(t->cfg->run.output_dir, path, sizeof path, err);
    if (found < 0) return -1;
    if (found == 0) {
        printf("resume: no checkpoint in %s/checkpoints; starting from the beginning\n", t->cfg->run.output_dir);
        return 0;
    }
    mb_trainer_state state;
    if (mb_checkpoint_read_state(path, &state, err) != 0) return -1;
    if (state.config_hash != t->config_hash)
        printf("resume: warning: the configuration differs from the one %s was written with\n", path);
    char weights[4200];
    snprintf(weights, sizeof weights, "%s/model.safetensors", path);
    if (mb_model_load_weights(&t->host, weights, NULL, err) != 0 ||
        mb_checkpoint_read_optimizer(path, &t->host.table, t->m, t->v, err) != 0 ||
        t->backend->ops->write_params(t->backend, t->host.params, err) != 0 ||
        t->backend->ops->write_optimizer_state(t->backend, t->m, t->v, err) != 0) {
        mb_trainer_state_free(&state);
        return -1;
    }
    mb_trainer_state_free(&t->state);
    t->state = state;
    t->adamw.step = state.optimizer_step;
    t->adamw.max_lr = state.max_lr;
    printf("resume: %s (step %" PRId64 ", phase %d, %" PRId64 " tokens)\n", path, state.step, state.phase,
           state.tokens_seen);
    return 0;
}

static int open_metrics(trainer *t, mb_error *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", t->cfg->run.output_dir);
    if (!is_main(t)) snprintf(path, sizeof path, "/dev/null");
    t->metrics = fopen(path, t->state.step > 0 ? "a" : "w");
    if (t->metrics == NULL) return mb_fail(err, "%s: cannot open for writing", path);
    return 0;
}

static int save_effective_config(trainer *t, mb_error *err) {
    char *yaml = mb_cfg_dump(mb_run_config_schema, t->cfg, err);
    if (yaml == NULL) return -1;
    printf("---- effective configuration ----\n%s---------------------------------\n", yaml);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.yaml", t->cfg->run.output_dir);
    int rc = is_main(t) ? mb_write_file_atomic(path, yaml, strlen(yaml), err) : 0;
    free(yaml);
    return rc;
}

/* ---- data ---- */

static int open_shards(const char *patterns, uint64_t fingerprint, mb_shard_set **set, mb_error *err) {
    const char *list[1] = {patterns};
    return mb_shard_set_open(set, list, 1, fingerprint, err);
}

static void masking_config(const trainer *t, mb_masking_config *masking) {
    mb_masking_config_default(masking);
    masking->rate = t->cfg->data.mlm_probability;
    masking->vocab_size = t->host.config.vocab_size;
    masking->mask_id = t->special.mask;
    masking->cls_id = t->special.cls;
    masking->sep_id = t->special.sep;
    masking->pad_id = t->special.pad;
    masking->include_cls_sep = t->cfg->data.mask_cls_sep;
    masking->special_ids = t->special_id_list;
    masking->special_count = t->special_id_count;
}

/* Every id that random MLM replacements must never produce: the tokenizer's special added tokens ([UNK],
 * <|endoftext|>, [unusedN], ...) and the padding ids between the tokenizer's size and the model's vocabulary. */
static int collect_special_ids(trainer *t, mb_error *err) {
    int tokenizer_vocab = mb_tokenizer_vocab_size(t->tokenizer), model_vocab = t->host.config.vocab_size;
    t->special_id_list = malloc((size_t)(model_vocab > 0 ? model_vocab : 1) * sizeof(int32_t));
    if (t->special_id_list == NULL) return mb_fail(err, "out of memory");
    for (int id = 0; id < model_vocab; id++)
        if (id >= tokenizer_vocab || mb_tokenizer_is_special(t->tokenizer, id))
            t->special_id_list[t->special_id_count++] = id;
    return 0;
}

static int open_loader(trainer *t, mb_shard_set *set, const mb_phase_config *phase, uint64_t seed, int prefetch,
                       const mb_loader_cursor *cursor, mb_loader **loader, mb_error *err) {
    mb_loader_config lc;
    mb_loader_config_default(&lc);
    lc.seed = seed;
    lc.max_seq_len = phase->seq_len;
    lc.truncate = t->cfg->data.truncate;
    lc.micro_tokens = phase->micro_batch_tokens;
    lc.step_tokens = phase->batch_tokens;
    lc.warmup_tokens = phase->batch_warmup_tokens;
    lc.warmup_min_rows = phase->batch_warmup_min_rows;
    lc.warmup_unit_rows = phase->batch_warmup_unit_rows;
    lc.prefetch = prefetch;
    if (set == t->train_set) {  /* the training stream is split across ranks; validation batches are dealt below */
        lc.rank = t->rank;
        lc.world_size = t->world_size;
    }
    masking_config(t, &lc.masking);
    mb_doc_source source;
    if (mb_doc_source_shards(&source, set, 0, err) != 0) return -1;
    if (mb_loader_open(loader, &lc, &source, cursor, err) != 0) {
        if (source.release) source.release(source.context);
        return -1;
    }
    return 0;
}

static uint64_t phase_seed(const trainer *t, int phase) {
    const mb_phase_config *p = &t->cfg->phases[phase];
    return p->data_seed ? (uint64_t)p->data_seed : (uint64_t)t->cfg->run.seed + (uint64_t)phase;
}

static int open_phase_data(trainer *t, mb_error *err) {
    if (t->batch_files != NULL) return 0;
    mb_loader_cursor cursor, *resume = NULL;
    memset(&cursor, 0, sizeof cursor);
    if (t->state.cursor_json != NULL && t->state.phase_step > 0) {
        if (mb_loader_cursor_from_json(t->state.cursor_json, &cursor, err) != 0) return -1;
        resume = &cursor;
    }
    int rc = open_loader(t, t->train_set, &t->cfg->phases[t->state.phase], phase_seed(t, t->state.phase),
                         t->cfg->data.prefetch, resume, &t->loader, err);
    if (resume) mb_loader_cursor_free(&cursor);
    return rc;
}

static int ensure_step_batch(step_batch *b, size_t tokens, size_t sequences, mb_error *err) {
    if (tokens > b->token_capacity) {
        free(b->input_ids);
        free(b->labels);
        b->input_ids = malloc(tokens * sizeof(int32_t));
        b->labels = malloc(tokens * sizeof(int32_t));
        b->token_capacity = tokens;
    }
    if (sequences + 1 > b->sequence_capacity) {
        free(b->cu_seqlens);
        b->cu_seqlens = malloc((sequences + 1) * sizeof(int32_t));
        b->sequence_capacity = sequences + 1;
    }
    if (!b->input_ids || !b->labels || !b->cu_seqlens) return mb_fail(err, "out of memory for a micro-batch");
    return 0;
}

static int store_batch(step_batch *b, const mb_batch *batch, mb_error *err) {
    if (ensure_step_batch(b, (size_t)batch->token_count, (size_t)batch->sequence_count, err) != 0) return -1;
    memcpy(b->input_ids, batch->input_ids, (size_t)batch->token_count * sizeof(int32_t));
    memcpy(b->labels, batch->labels, (size_t)batch->token_count * sizeof(int32_t));
    memcpy(b->cu_seqlens, batch->cu_seqlens, ((size_t)batch->sequence_count + 1) * sizeof(int32_t));
    b->batch = (mb_batch){batch->token_count, batch->sequence_count, b->input_ids, b->cu_seqlens, b->labels, NULL};
    b->label_count = 0;
    uint64_t hash = 1469598103934665603ULL;  /* FNV-1a over (id, label) pairs */
    for (int i = 0; i < batch->token_count; i++) {
        b->label_count += batch->labels[i] != -100;
        hash = (hash ^ (uint32_t)batch->input_ids[i]) * 1099511628211ULL;
        hash = (hash ^ (uint32_t)batch->labels[i]) * 1099511628211ULL;
    }
    b->digest = hash & ((1ULL << 40) - 1);
    return 0;
}

static int reserve_step_batches(trainer *t, int count, mb_error *err) {
    if (count <= t->step_batch_capacity) return 0;
    step_batch *grown = realloc(t->step_batches, (size_t)count * sizeof *grown);
    if (grown == NULL) return mb_fail(err, "out of memory");
    memset(grown + t->step_batch_capacity, 0, (size_t)(count - t->step_batch_capacity) * sizeof *grown);
    t->step_batches = grown;
    t->step_batch_capacity = count;
    return 0;
}

/* Fills t->step_batches with this step's micro-batches; returns their count (0 = no data left), -1 on error. */
static int gather_from_loader(trainer *t, mb_error *err) {
    mb_loader_batch lb;
    int count = 0;
    do {
        if (mb_loader_next(t->loader, &lb, err) != 0) return -1;
        if (reserve_step_batches(t, lb.count_in_step, err) != 0) return -1;
        if (store_batch(&t->step_batches[count], &lb.batch, err) != 0) return -1;
        count++;
    } while (count < lb.count_in_step);
    return count;
}

static int compare_strings(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int list_batch_files(trainer *t, mb_error *err) {
    DIR *dir = opendir(t->cfg->data.batches);
    if (dir == NULL) return mb_fail(err, "%s: cannot open the batch directory", t->cfg->data.batches);
    struct dirent *entry;
    int capacity = 0;
    while ((entry = readdir(dir)) != NULL) {
        int step, micro;
        char tail[64];
        if (sscanf(entry->d_name, "step-%d-micro-%d.%63s", &step, &micro, tail) != 3 || strcmp(tail, "safetensors"))
            continue;
        if (t->batch_file_count == capacity) {
            capacity = capacity ? 2 * capacity : 64;
            t->batch_files = realloc(t->batch_files, (size_t)capacity * sizeof *t->batch_files);
        }
        t->batch_files[t->batch_file_count++] = strdup(entry->d_name);
    }
    closedir(dir);
    if (t->batch_file_count == 0)
        return mb_fail(err, "%s: no files named step-NNNNNN-micro-NNN.safetensors", t->cfg->data.batches);
    qsort(t->batch_files, (size_t)t->batch_file_count, sizeof *t->batch_files, compare_strings);
    return 0;
}

/* Step-by-step mode: the step's micro-batches are the files step-<k>-micro-*.safetensors, k = state.step. */
static int gather_from_files(trainer *t, mb_error *err) {
    int count = 0;
    for (int i = 0; i < t->batch_file_count; i++) {
        int step, micro;
        sscanf(t->batch_files[i], "step-%d-micro-%d", &step, &micro);
        if (step != t->state.step) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", t->cfg->data.batches, t->batch_files[i]);
        mb_batch_file file;
        if (mb_batch_file_load(&file, path, &t->host.config, err) != 0) return -1;
        int rc = reserve_step_batches(t, count + 1, err);
        if (rc == 0) rc = store_batch(&t->step_batches[count], &file.batch, err);
        mb_batch_file_free(&file);
        if (rc != 0) return -1;
        count++;
    }
    return count;
}

/* ---- one step ---- */

typedef struct step_result {
    double loss;
    double grad_norm;
    double lr;
    int64_t tokens;
    int64_t labels;
    double flops;
    uint64_t batch_digest;  /* Σ of the micro-batch digests mod 2^40: the same for any world size (docs/distributed.md) */
    int skipped;
} step_result;

/* The step's totals over all ranks: labelled tokens (the loss is their mean), tokens, model FLOPs. */
static int step_totals(trainer *t, int count, step_result *r, mb_error *err) {
    double totals[4] = {0.0, 0.0, 0.0, 0.0};  /* integers below 2^53 add exactly in double */
    for (int i = 0; i < count; i++) {
        totals[0] += (double)t->step_batches[i].label_count;
        totals[1] += (double)t->step_batches[i].batch.token_count;
        totals[2] += mb_batch_model_flops(&t->host.config, &t->step_batches[i].batch, t->step_batches[i].label_count);
        totals[3] += (double)t->step_batches[i].digest;
    }
    if (all_ranks_sum(t, totals, 4, err) != 0) return -1;
    r->labels = (int64_t)totals[0];
    r->tokens = (int64_t)totals[1];
    r->flops = totals[2];
    r->batch_digest = (uint64_t)totals[3] & ((1ULL << 40) - 1);
    return 0;
}

static int forward_backward_step(trainer *t, int count, step_result *r, mb_error *err) {
    mb_backend *b = t->backend;
    if (step_totals(t, count, r, err) != 0) return -1;
    if (b->ops->zero_grads(b, err) != 0) return -1;
    int last = -1;  /* the last micro-batch with labels: its backward also reduces gradients across ranks */
    for (int i = 0; i < count; i++)
        if (t->step_batches[i].label_count > 0) last = i;
    double loss_sum = 0.0;
    for (int i = 0; i < count && r->labels > 0; i++) {
        if (t->step_batches[i].label_count == 0) continue;
        mb_forward_result result;
        if (b->ops->forward(b, &t->step_batches[i].batch, &result, err) != 0) return -1;
        if (i == last && t->dist != NULL && b->ops->begin_grad_sync(b, err) != 0) return -1;
        if (b->ops->backward(b, (float)(1.0 / (double)r->labels), err) != 0) return -1;
        loss_sum += result.loss_sum;
    }
    if (b->ops->grad_norm(b, &r->grad_norm, err) != 0) return -1;
    /* the loss over all ranks, and the stop decision (a signal may reach the ranks at different steps) */
    double shared[2] = {loss_sum, t->options->stop_flag != NULL && *t->options->stop_flag ? 1.0 : 0.0};
    if (all_ranks_sum(t, shared, 2, err) != 0) return -1;
    t->stop_agreed = shared[1] > 0.0;
    r->loss = r->labels > 0 ? shared[0] / (double)r->labels : NAN;
    return 0;
}

static int train_step(trainer *t, int count, step_result *r, mb_error *err) {
    const mb_phase_config *phase = &t->cfg->phases[t->state.phase];
    mb_lr_schedule schedule = {phase->tokens, phase->warmup_tokens, phase->decay_tokens, MB_WARMUP_ALPHA_I,
                               phase->final_lr_fraction, (mb_decay_shape)phase->decay_shape};
    r->lr = phase->lr * mb_lr_multiplier(&schedule, t->state.phase_tokens);
    if (forward_backward_step(t, count, r, err) != 0) return -1;
    r->skipped = !isfinite(r->loss) || !isfinite(r->grad_norm);
    if (r->skipped) {
        t->state.nonfinite_streak++;
    } else {
        t->state.nonfinite_streak = 0;
        t->adamw.weight_decay = phase->weight_decay;
        if (t->backend->ops->optimizer_step(t->backend, &t->adamw, r->lr, err) != 0) return -1;
    }
    t->state.step++;
    t->state.phase_step++;
    t->state.tokens_seen += r->tokens;
    t->state.phase_tokens += r->tokens;
    t->state.optimizer_step = t->adamw.step;
    return 0;
}

/* ---- validation ---- */

static int validate(trainer *t, double *val_loss, mb_error *err) {
    *val_loss = NAN;
    if (t->val_set == NULL) return 0;
    mb_loader *loader = NULL;
    if (open_loader(t, t->val_set, &t->cfg->phases[t->state.phase], 0x5eed5eedULL, 0, NULL, &loader, err) != 0)
        return -1;
    double loss_sum = 0.0;
    int64_t labels = 0;
    int rc = 0;
    for (int i = 0; rc == 0 && i < t->cfg->logging.val_batches; i++) {
        mb_loader_batch lb;
        mb_forward_result result;
        rc = mb_loader_next(loader, &lb, err);
        int mine = i % t->world_size == t->rank;  /* validation batches are dealt round-robin to the ranks */
        if (rc == 0 && mine && lb.label_count > 0) rc = t->backend->ops->forward(t->backend, &lb.batch, &result, err);
        if (rc == 0 && mine && lb.label_count > 0) {
            loss_sum += result.loss_sum;
            labels += result.loss_count;
        }
    }
    mb_loader_close(loader);
    double totals[2] = {loss_sum, (double)labels};
    if (rc == 0) rc = all_ranks_sum(t, totals, 2, err);
    if (rc == 0 && totals[1] > 0) *val_loss = totals[0] / totals[1];
    return rc;
}

/* ---- logging ---- */

static void format_duration(double seconds, char *out, size_t size) {
    if (!isfinite(seconds) || seconds < 0) {
        snprintf(out, size, "?");
        return;
    }
    long s = (long)seconds;
    if (s >= 3600) snprintf(out, size, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
    else snprintf(out, size, "%ldm%02lds", s / 60, s % 60);
}

static void log_step(trainer *t, const step_result *r, int force) {
    t->loss_sum_since_log += r->skipped ? 0.0 : r->loss * (double)r->labels;
    t->labels_since_log += r->skipped ? 0 : r->labels;
    t->flops_since_log += r->flops;
    double now = mb_monotonic_seconds();
    double tokens_per_second = (double)(t->state.tokens_seen - t->tokens_at_start) / fmax(now - t->start_time, 1e-9);
    int interval = t->batch_files ? 1 : t->cfg->logging.every_steps;
    if (isatty(STDOUT_FILENO) && t->cfg->logging.progress_bar) {
        double done = (double)t->state.tokens_seen / (double)t->run_tokens_total;
        printf("\r[%-30.*s] %5.1f%% step %" PRId64 " loss %.4f  ", (int)(30 * fmin(done, 1.0)),
               "##############################", 100 * done, t->state.step, r->loss);
        fflush(stdout);
    }
    if (!force && t->state.step % interval != 0) return;
    double window_seconds = now - t->last_log_time;
    double window_tps = (double)(t->state.tokens_seen - t->tokens_at_last_log) / fmax(window_seconds, 1e-9);
    double loss = t->labels_since_log ? t->loss_sum_since_log / (double)t->labels_since_log : NAN;
    char eta[32], mfu[32] = "";
    double mfu_value = t->peak_flops > 0 ? t->flops_since_log / fmax(window_seconds, 1e-9) / t->peak_flops : -1.0;
    if (mfu_value >= 0) snprintf(mfu, sizeof mfu, " | MFU %.1f%%", 100.0 * mfu_value);
    format_duration((double)(t->run_tokens_total - t->state.tokens_seen) / fmax(tokens_per_second, 1e-9), eta,
                    sizeof eta);
    if (isatty(STDOUT_FILENO) && t->cfg->logging.progress_bar) printf("\r%80s\r", "");
    printf("step %6" PRId64 " | phase %d %-10s | tokens %10" PRId64 " | loss %.6f | lr %.3e | grad norm %.4f | "
           "%.0f tok/s%s | ETA %s%s\n", t->state.step, t->state.phase, t->cfg->phases[t->state.phase].name,
           t->state.tokens_seen, loss, r->lr, r->grad_norm, window_tps, mfu, eta,
           r->skipped ? " | SKIPPED (non-finite)" : "");
    fflush(stdout);
    fprintf(t->metrics, "{\"step\": %" PRId64 ", \"phase\": %d, \"tokens\": %" PRId64 ", \"loss\": %.9g, "
            "\"step_loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g, \"tokens_per_second\": %.1f, "
            "\"mfu\": %.4f, \"elapsed_seconds\": %.3f, \"batch_digest\": %" PRIu64 ", \"world_size\": %d%s}\n",
            t->state.step, t->state.phase, t->state.tokens_seen, isfinite(loss) ? loss : -1.0,
            isfinite(r->loss) ? r->loss : -1.0, r->lr, isfinite(r->grad_norm) ? r->grad_norm : -1.0, window_tps,
            mfu_value, now - t->start_time, r->batch_digest, t->world_size,
            r->skipped ? ", \"skipped\": true" : "");
    fflush(t->metrics);
    t->last_log_time = now;
    t->tokens_at_last_log = t->state.tokens_seen;
    t->loss_sum_since_log = 0.0;
    t->labels_since_log = 0;
    t->flops_since_log = 0.0;
}

static void log_validation(trainer *t, double val_loss) {
    if (!isfinite(val_loss)) return;
    printf("step %6" PRId64 " | validation loss %.6f\n", t->state.step, val_loss);
    fprintf(t->metrics, "{\"step\": %" PRId64 ", \"tokens\": %" PRId64 ", \"val_loss\": %.9g}\n", t->state.step,
            t->state.tokens_seen, val_loss);
    fflush(t->metrics);
}

/* ---- checkpoints ---- */

static int save_checkpoint(trainer *t, mb_error *err) {
    mb_backend *b = t->backend;
    if (b->ops->read_params(b, t->host.params, err) != 0 || b->ops->read_optimizer_state(b, t->m, t->v, err) != 0)
        return -1;
    free(t->state.cursor_json);
    t->state.cursor_json = NULL;
    if (t->loader != NULL) {
        mb_loader_cursor cursor;
        if (mb_loader_get_cursor(t->loader, &cursor, err) != 0) return -1;
        int rc = mb_loader_cursor_to_json(&cursor, &t->state.cursor_json, err);
        mb_loader_cursor_free(&cursor);
        if (rc != 0) return -1;
    }
    t->state.config_hash = t->config_hash;
    t->state.seed = (uint64_t)t->cfg->run.seed;
    t->state.max_lr = t->adamw.max_lr;
    t->last_checkpoint_time = mb_monotonic_seconds();
    if (!is_main(t)) return 0;  /* every rank gathered the state above (a collective); rank 0 writes it */
    mb_checkpoint_contents contents = {&t->host, t->m, t->v, &t->state, t->cfg->data.tokenizer};
    char written[4200];
    if (mb_checkpoint_write(t->cfg->run.output_dir, &contents, t->cfg->checkpoint.keep, written, sizeof written, err))
        return -1;
    printf("checkpoint: %s\n", written);
    t->last_checkpoint_time = mb_monotonic_seconds();
    return 0;
}

static int checkpoint_due(const trainer *t) {
    const mb_run_config *c = t->cfg;
    if (c->checkpoint.every_steps > 0 && t->state.step % c->checkpoint.every_steps == 0) return 1;
    return c->checkpoint.every_minutes > 0 && mb_monotonic_seconds() - t->last_checkpoint_time >= 60 * c->checkpoint.every_minutes;
}

/* ---- the loop ---- */

static int begin_phase(trainer *t, mb_error *err) {
    const mb_phase_config *phase = &t->cfg->phases[t->state.phase];
    if (t->state.phase_step == 0) {
        t->adamw.max_lr = phase->lr;
        if (phase->reset_optimizer && t->state.step > 0) {
            memset(t->m, 0, t->host.table.total_numel * sizeof(float));
            memset(t->v, 0, t->host.table.total_numel * sizeof(float));
            if (t->backend->ops->write_optimizer_state(t->backend, t->m, t->v, err) != 0) return -1;
            t->adamw.step = 0;
        }
    }
    if (t->backend->ops->set_rope_theta(t->backend, phase->global_rope_theta, phase->local_rope_theta, err) != 0)
        return -1;
    t->host.config.global_rope_theta = phase->global_rope_theta;
    t->host.config.local_rope_theta = phase->local_rope_theta;
    printf("phase %d '%s': seq_len %d, %" PRId64 " tokens, lr %.3g, rope theta %.0f/%.0f, batch %" PRId64
           " token slots\n", t->state.phase, phase->name, phase->seq_len, phase->tokens, phase->lr,
           phase->global_rope_theta, phase->local_rope_theta, phase->batch_tokens);
    return open_phase_data(t, err);
}

static int end_phase(trainer *t) {
    mb_loader_close(t->loader);
    t->loader = NULL;
    t->state.phase++;
    t->state.phase_step = 0;
    t->state.phase_tokens = 0;
    free(t->state.cursor_json);
    t->state.cursor_json = NULL;
    return 0;
}

static int stop_requested(const trainer *t) {
    if (t->dist != NULL) {
        if (t->stop_agreed) return 1;
    } else if (t->options->stop_flag != NULL && *t->options->stop_flag) {
        return 1;
    }
    return t->options->max_steps > 0 && t->state.step >= t->options->max_steps;
}

static int after_step(trainer *t, const step_result *r, int phase_done, mb_error *err) {
    log_step(t, r, phase_done);
    if (t->state.nonfinite_streak >= t->cfg->logging.max_nonfinite_steps)
        return mb_fail(err, "%d consecutive steps had a non-finite loss or gradient (last at step %" PRId64
                       "); aborting. Lower the learning rate or check the data.", t->state.nonfinite_streak,
                       t->state.step);
    int val_every = t->cfg->logging.val_every_steps;
    if ((val_every > 0 && t->state.step % val_every == 0) || phase_done) {
        double val_loss;
        if (validate(t, &val_loss, err) != 0) return -1;
        log_validation(t, val_loss);
    }
    if (!phase_done && (checkpoint_due(t) || stop_requested(t))) return save_checkpoint(t, err);
    return 0;
}

static int run_phase(trainer *t, mb_error *err) {
    const mb_phase_config *phase = &t->cfg->phases[t->state.phase];
    if (begin_phase(t, err) != 0) return -1;
    while (t->state.phase_tokens < phase->tokens && !stop_requested(t)) {
        int count = t->batch_files ? gather_from_files(t, err) : gather_from_loader(t, err);
        if (count < 0) return -1;
        if (count == 0) break;  /* step-by-step mode: no more files */
        step_result r;
        if (train_step(t, count, &r, err) != 0) return -1;
        int phase_done = t->state.phase_tokens >= phase->tokens;
        if (after_step(t, &r, phase_done, err) != 0) return -1;
        if (count == 0) break;
    }
    if (stop_requested(t)) return 0;
    if (end_phase(t) != 0) return -1;
    return save_checkpoint(t, err);
}

static void trainer_free(trainer *t) {
    mb_loader_close(t->loader);
    if (t->train_set) mb_shard_set_close(t->train_set);
    if (t->val_set) mb_shard_set_close(t->val_set);
    mb_backend_destroy(t->backend);
    mb_dist_destroy(t->dist);
    mb_model_free(&t->host);
    mb_tokenizer_free(t->tokenizer);
    free(t->m);
    free(t->v);
    free(t->special_id_list);
    for (int i = 0; i < t->step_batch_capacity; i++) {
        free(t->step_batches[i].input_ids);
        free(t->step_batches[i].labels);
        free(t->step_batches[i].cu_seqlens);
    }
    free(t->step_batches);
    for (int i = 0; i < t->batch_file_count; i++) free(t->batch_files[i]);
    free(t->batch_files);
    mb_trainer_state_free(&t->state);
    if (t->metrics) fclose(t->metrics);
}

/* Sizes the backend's activation memory for the largest micro-batch of any phase before the first step: the token
 * budget, one sequence per token at worst, and the expected labelled rows with headroom (a rare batch above that
 * grows the arena once). */
static int reserve_activations(trainer *t, mb_error *err) {
    if (t->backend->ops->reserve == NULL) return 0;
    int64_t tokens = 0;
    for (int p = 0; p < t->cfg->phase_count; p++)
        if (t->cfg->phases[p].micro_batch_tokens > tokens) tokens = t->cfg->phases[p].micro_batch_tokens;
    if (t->batch_files != NULL && tokens < 65536) tokens = 65536;
    int rows = (int)(tokens * t->cfg->data.mlm_probability * 1.25) + 64;
    if (rows > tokens) rows = (int)tokens;
    return t->backend->ops->reserve(t->backend, (int)tokens, (int)tokens, rows, err);
}

/* One process, or rank `env.rank` of the data-parallel group the caller found in the environment (torchrun-style
 * variables, Slurm, Open MPI or `modernbert pretrain --nproc-per-node`; docs/distributed.md). */
static int setup_dist(trainer *t, mb_error *err) {
    const mb_run_config *c = t->cfg;
    if (t->options->dist_env == NULL) return 0;  /* one process: rank 0 of 1 */
    t->env = *t->options->dist_env;
    t->rank = t->env.rank;
    t->world_size = t->env.world_size;
    if (t->world_size == 1) return 0;
    if (c->data.batches[0] != '\0')
        return mb_fail(err, "data.batches (step-by-step batch files) runs in one process only, not %d",
                       t->world_size);
    if (strcmp(c->run.backend, "cpu") == 0)
        return mb_fail(err, "data parallelism over %d processes needs the CUDA backend (run.backend is cpu)",
                       t->world_size);
    if (mb_dist_create_nccl(&t->dist, &t->env, c->run.comm_timeout_seconds, err) != 0) return -1;
    printf("data parallel: rank %d of %d (%s), local rank %d of %d, node %d, rendezvous %s:%d, timeout %.0f s\n",
           t->rank, t->world_size, mb_launch_kind_name(t->env.kind), t->env.local_rank, t->env.local_world_size,
           t->env.node_rank, t->env.master_addr, t->env.master_port, c->run.comm_timeout_seconds);
    return 0;
}

static int setup(trainer *t, mb_error *err) {
    const mb_run_config *c = t->cfg;
    if (mb_make_dirs(c->run.output_dir, err) != 0) return -1;
    if (setup_dist(t, err) != 0) return -1;
    if (mb_cfg_hash(mb_run_config_schema, c, &t->config_hash, err) != 0) return -1;
    if (save_effective_config(t, err) != 0 || setup_model(t, err) != 0) return -1;
    mb_stableadamw_init(&t->adamw, c->phases[0].lr, c->phases[0].weight_decay);
    t->adamw.beta1 = c->optimizer.beta1;
    t->adamw.beta2 = c->optimizer.beta2;
    t->adamw.eps = c->optimizer.eps;
    uint64_t fingerprint = mb_tokenizer_fingerprint(t->tokenizer);
    if (c->data.batches[0] != '\0') {
        if (list_batch_files(t, err) != 0) return -1;
    } else if (open_shards(c->data.train, fingerprint, &t->train_set, err) != 0) {
        return -1;
    }
    if (c->data.val[0] != '\0' && open_shards(c->data.val, fingerprint, &t->val_set, err) != 0) return -1;
    if (t->options->resume && setup_resume(t, err) != 0) return -1;
    for (int p = 0; p < c->phase_count; p++) t->run_tokens_total += c->phases[p].tokens;
    if (reserve_activations(t, err) != 0) return -1;
    t->peak_flops = mb_backend_peak_flops(t->backend) * t->world_size;  /* MFU: per GPU */
    char memory[256];
    t->backend->ops->memory_report(t->backend, memory, sizeof memory);
    printf("model: %d layers, hidden %d, vocab %d, %zu parameters; backend %s\n", t->host.config.num_hidden_layers,
           t->host.config.hidden_size, t->host.config.vocab_size, t->host.table.total_numel, memory);
    return open_metrics(t, err);
}

int mb_pretrain(const mb_run_config *config, const mb_pretrain_options *options, mb_error *err) {
    trainer t;
    memset(&t, 0, sizeof t);
    t.world_size = 1;
    t.cfg = config;
    t.options = options;
    int rc = setup(&t, err);
    t.start_time = t.last_log_time = t.last_checkpoint_time = mb_monotonic_seconds();
    t.tokens_at_start = t.tokens_at_last_log = t.state.tokens_seen;
    if (rc == 0 && t.state.step == 0 && t.val_set != NULL) {  /* the starting point of the validation curve */
        double val_loss;
        rc = validate(&t, &val_loss, err);
        if (rc == 0) log_validation(&t, val_loss);
    }
    while (rc == 0 && t.state.phase < config->phase_count && !stop_requested(&t)) rc = run_phase(&t, err);
    if (rc == 0 && stop_requested(&t) && t.state.phase < config->phase_count) {
        printf("stopping at step %" PRId64 " (%s)\n", t.state.step,
               t.stop_agreed || (options->stop_flag && *options->stop_flag) ? "signal" : "--max-steps");
    }
    if (rc == 0) printf("done: %" PRId64 " steps, %" PRId64 " tokens\n", t.state.step, t.state.tokens_seen);
    if (rc != 0 && t.dist != NULL) mb_dist_abort(t.dist, err->message);  /* the other ranks stop at once */
    trainer_free(&t);
    return rc;
}
