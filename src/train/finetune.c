/* GLUE fine-tuning and evaluation (see finetune.h for the procedure). */
#include "common/clock.h"
#include "train/finetune.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/fileio.h"
#include "common/rng.h"
#include "data/tokenizer.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "train/schedule.h"
#include "train/stableadamw.h"

/* ---- configuration ---- */

#define FT(member) offsetof(mb_finetune_config, member)

static const char *const pooling_names[] = {"checkpoint", "mean", "cls", NULL};

static const mb_cfg_field label_name_schema[] = {
    {.path = "", .type = MB_CFG_STRING, .offset = 0, .size = MB_LABEL_NAME_SIZE, .help = "a label name"},
    MB_CFG_END,
};

const mb_cfg_field mb_finetune_config_schema[] = {
    {.path = "run.output_dir", .type = MB_CFG_STRING, .offset = FT(run.output_dir), .size = MB_FT_PATH_SIZE,
     .default_value = "runs/finetune", .help = "output: config.yaml, metrics.jsonl, results.json, best/"},
    {.path = "run.seed", .type = MB_CFG_INT64, .offset = FT(run.seed), .default_value = "17", .min = "0",
     .help = "seed of the classifier initialisation, the shuffles and the training subset"},
    {.path = "run.backend", .type = MB_CFG_STRING, .offset = FT(run.backend), .size = 16, .default_value = "auto",
     .help = "auto (GPU when available), cpu or cuda"},
    {.path = "run.threads", .type = MB_CFG_INT, .offset = FT(run.threads), .default_value = "0", .min = "0",
     .help = "CPU threads (0 = all cores)"},
    {.path = "data.task", .type = MB_CFG_STRING, .offset = FT(data.task), .size = 16, .default_value = "",
     .help = "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli (the file layout, labels and metrics)"},
    {.path = "data.dir", .type = MB_CFG_STRING, .offset = FT(data.dir), .size = MB_FT_PATH_SIZE,
     .default_value = "", .help = "the task's folder (train.tsv, dev.tsv, ...) or the GLUE root holding it"},
    {.path = "data.tokenizer", .type = MB_CFG_STRING, .offset = FT(data.tokenizer), .size = MB_FT_PATH_SIZE,
     .default_value = "", .help = "tokenizer.json; empty = the one in the init checkpoint"},
    {.path = "data.max_seq_len", .type = MB_CFG_INT, .offset = FT(data.max_seq_len), .default_value = "256",
     .min = "3", .max = "131072", .help = "[CLS] A [SEP] (B [SEP]) is truncated longest-first to this many tokens"},
    {.path = "data.train_split", .type = MB_CFG_STRING, .offset = FT(data.train_split), .size = 64,
     .default_value = "train", .help = "name of the training file (without .tsv)"},
    {.path = "data.dev_split", .type = MB_CFG_STRING, .offset = FT(data.dev_split), .size = 64, .default_value = "",
     .help = "evaluation file; empty = the task's dev split(s) (MNLI: dev_matched and dev_mismatched)"},
    {.path = "data.max_train_examples", .type = MB_CFG_INT64, .offset = FT(data.max_train_examples),
     .default_value = "0", .min = "0", .help = "train on a seeded random subset of this size (0 = all)"},
    {.path = "data.max_eval_examples", .type = MB_CFG_INT64, .offset = FT(data.max_eval_examples),
     .default_value = "0", .min = "0", .help = "evaluate on the first N dev rows (0 = all)"},
    {.path = "model.init", .type = MB_CFG_STRING, .offset = FT(model.init), .size = MB_FT_PATH_SIZE,
     .default_value = "", .flags = MB_CFG_REQUIRED,
     .help = "checkpoint to start from: an HF ModernBERT directory, a pretraining checkpoint or run directory"},
    {.path = "model.pooling", .type = MB_CFG_ENUM, .offset = FT(model.pooling), .default_value = "checkpoint",
     .enum_names = pooling_names, .help = "checkpoint (its classifier_pooling; mean by default), mean or cls"},
    {.path = "model.label_names", .type = MB_CFG_LIST, .offset = FT(model.label_names), .size = MB_LABEL_NAME_SIZE,
     .fields = label_name_schema, .count_offset = FT(model.label_name_count), .capacity = MB_MAX_LABELS,
     .help = "id2label names replacing the task's (e.g. [ham, spam] for a custom SST-2-format dataset)"},
    {.path = "model.keep_classifier", .type = MB_CFG_BOOL, .offset = FT(model.keep_classifier),
     .default_value = "false",
     .help = "keep the init checkpoint's classifier.* when its shape fits (false: a new one, as ModernBERT does)"},
    {.path = "model.from_scratch", .type = MB_CFG_BOOL, .offset = FT(model.from_scratch), .default_value = "false",
     .help = "take only the architecture from model.init and start from random weights (a no-pretraining baseline)"},
    {.path = "optimizer.lr", .type = MB_CFG_FLOAT, .offset = FT(optimizer.lr), .default_value = "5e-5", .min = "0",
     .max = "1", .flags = MB_CFG_MIN_EXCLUSIVE, .help = "peak learning rate"},
    {.path = "optimizer.weight_decay", .type = MB_CFG_FLOAT, .offset = FT(optimizer.weight_decay),
     .default_value = "5e-6", .min = "0", .max = "1",
     .help = "fully decoupled weight decay (per step: weight_decay x lr_t / lr)"},
    {.path = "optimizer.beta1", .type = MB_CFG_FLOAT, .offset = FT(optimizer.beta1), .default_value = "0.9",
     .min = "0", .max = "1", .flags = MB_CFG_MAX_EXCLUSIVE, .help = "beta1"},
    {.path = "optimizer.beta2", .type = MB_CFG_FLOAT, .offset = FT(optimizer.beta2), .default_value = "0.98",
     .min = "0", .max = "1", .flags = MB_CFG_MAX_EXCLUSIVE, .help = "beta2"},
    {.path = "optimizer.eps", .type = MB_CFG_FLOAT, .offset = FT(optimizer.eps), .default_value = "1e-6",
     .min = "0", .flags = MB_CFG_MIN_EXCLUSIVE, .help = "epsilon"},
    {.path = "optimizer.warmup_fraction", .type = MB_CFG_FLOAT, .offset = FT(optimizer.warmup_fraction),
     .default_value = "0.06", .min = "0", .max = "1", .help = "linear warmup over this fraction of all steps"},
    {.path = "optimizer.final_lr_fraction", .type = MB_CFG_FLOAT, .offset = FT(optimizer.final_lr_fraction),
     .default_value = "0", .min = "0", .max = "1", .help = "the linear decay ends at this fraction of lr"},
    {.path = "training.epochs", .type = MB_CFG_INT, .offset = FT(training.epochs), .default_value = "3", .min = "1",
     .max = "64", .help = "epochs (an evaluation after each)"},
    {.path = "training.batch_size", .type = MB_CFG_INT, .offset = FT(training.batch_size), .default_value = "64",
     .min = "1", .help = "sequences per optimizer step"},
    {.path = "training.micro_batch_tokens", .type = MB_CFG_INT64, .offset = FT(training.micro_batch_tokens),
     .default_value = "8192", .min = "1", .help = "token budget of one packed micro-batch (at least max_seq_len)"},
    {.path = "training.early_stopping_patience", .type = MB_CFG_INT,
     .offset = FT(training.early_stopping_patience), .default_value = "2", .min = "0",
     .help = "stop after this many evaluations without a better dev score (0 = run every epoch)"},
    {.path = "training.log_every_steps", .type = MB_CFG_INT, .offset = FT(training.log_every_steps),
     .default_value = "20", .min = "1", .help = "a log line every N optimizer steps"},
    {.path = "training.save_best", .type = MB_CFG_BOOL, .offset = FT(training.save_best), .default_value = "true",
     .help = "save the best epoch's model to OUTPUT/best/ (a transformers checkpoint)"},
    MB_CFG_END,
};

static int check_config(const mb_cfg_tree *tree, const mb_finetune_config *c, mb_error *err) {
    mb_glue_task task;
    if (c->data.task[0] == '\0') return mb_cfg_fail_at(tree, "data.task", err, "a task is required (--task)");
    if (mb_glue_task_from_name(c->data.task, &task, err) != 0) return mb_cfg_fail_at(tree, "data.task", err, "%s", err->message);
    if (c->data.dir[0] == '\0') return mb_cfg_fail_at(tree, "data.dir", err, "a data directory is required (--data)");
    if (c->model.init[0] == '\0') return mb_cfg_fail_at(tree, "model.init", err, "a checkpoint is required (--init)");
    if (c->training.micro_batch_tokens < c->data.max_seq_len)
        return mb_cfg_fail_at(tree, "training.micro_batch_tokens", err, "must be at least data.max_seq_len (%d)",
                              c->data.max_seq_len);
    const mb_glue_task_info *info = mb_glue_task_get(task);
    if (c->model.label_name_count != 0 && c->model.label_name_count != info->num_labels)
        return mb_cfg_fail_at(tree, "model.label_names", err, "%s has %d labels, %d names given", info->dir_name,
                              info->num_labels, c->model.label_name_count);
    if (strcmp(c->run.backend, "auto") && strcmp(c->run.backend, "cpu") && strcmp(c->run.backend, "cuda"))
        return mb_cfg_fail_at(tree, "run.backend", err, "must be auto, cpu or cuda (got '%s')", c->run.backend);
    return 0;
}

int mb_finetune_config_load(mb_finetune_config *config, const char *path, char *const *overrides, int override_count,
                            mb_error *err) {
    mb_cfg_tree tree;
    int rc = path ? mb_cfg_tree_load(&tree, path, err) : mb_cfg_tree_parse(&tree, "", 0, "(defaults)", err);
    if (rc != 0) return -1;
    for (int i = 0; rc == 0 && i < override_count; i++) rc = mb_cfg_tree_override(&tree, overrides[i], err);
    if (rc == 0) rc = mb_cfg_read(&tree, mb_finetune_config_schema, config, err);
    if (rc == 0) rc = check_config(&tree, config, err);
    mb_cfg_tree_free(&tree);
    return rc;
}

/* ---- packed micro-batches ---- */

typedef struct packed_batch {
    int32_t *ids, *cu_seqlens;
    float *labels;
    size_t token_capacity, sequence_capacity;
    mb_batch batch;
} packed_batch;

static int packed_batch_init(packed_batch *p, int64_t token_budget, mb_error *err) {
    memset(p, 0, sizeof *p);
    p->token_capacity = (size_t)token_budget;
    p->sequence_capacity = (size_t)token_budget / 2 + 1;  /* every sequence holds at least [CLS] and [SEP] */
    p->ids = malloc(p->token_capacity * sizeof *p->ids);
    p->cu_seqlens = malloc((p->sequence_capacity + 1) * sizeof *p->cu_seqlens);
    p->labels = malloc(p->sequence_capacity * sizeof *p->labels);
    if (!p->ids || !p->cu_seqlens || !p->labels) return mb_fail(err, "out of memory for a micro-batch");
    return 0;
}

static void packed_batch_free(packed_batch *p) {
    free(p->ids);
    free(p->cu_seqlens);
    free(p->labels);
}

/* Packs examples order[begin..end) (identity when order is NULL) until the token budget is full; returns the
 * position after the last example packed. Every example fits on its own (length <= max_seq_len <= budget). */
static size_t pack_examples(packed_batch *p, const mb_glue_encoded *d, const size_t *order, size_t begin,
                            size_t end) {
    size_t tokens = 0, sequences = 0, k = begin;
    p->cu_seqlens[0] = 0;
    for (; k < end && sequences < p->sequence_capacity; k++) {
        size_t e = order ? order[k] : k;
        size_t length = d->offsets[e + 1] - d->offsets[e];
        if (tokens + length > p->token_capacity) break;
        memcpy(p->ids + tokens, d->ids + d->offsets[e], length * sizeof *p->ids);
        tokens += length;
        p->labels[sequences] = d->labels[e];
        p->cu_seqlens[++sequences] = (int32_t)tokens;
    }
    p->batch = (mb_batch){(int)tokens, (int)sequences, p->ids, p->cu_seqlens, NULL, p->labels};
    return k;
}

/* ---- prediction and submission files ---- */

int mb_finetune_predict(mb_backend *backend, const mb_glue_encoded *data, int64_t micro_batch_tokens,
                        float *predictions, float *logits, mb_error *err) {
    int num_labels = backend->config.num_labels;
    packed_batch p;
    int rc = packed_batch_init(&p, micro_batch_tokens, err);
    for (size_t begin = 0; rc == 0 && begin < data->count;) {
        size_t next = pack_examples(&p, data, NULL, begin, data->count);
        if (next == begin) {
            rc = mb_fail(err, "example %zu (%zu tokens) exceeds the micro-batch budget of %" PRId64 " tokens", begin,
                         data->offsets[begin + 1] - data->offsets[begin], micro_batch_tokens);
            break;
        }
        mb_forward_result result;
        rc = backend->ops->forward(backend, &p.batch, &result, err);
        for (int s = 0; rc == 0 && s < p.batch.sequence_count; s++) {
            const float *row = result.logits + (size_t)s * (size_t)result.logit_cols;
            int best = 0;
            for (int k = 1; k < num_labels; k++)
                if (row[k] > row[best]) best = k;
            predictions[begin + (size_t)s] = num_labels == 1 ? row[0] : (float)best;
            if (logits) memcpy(logits + (begin + (size_t)s) * (size_t)num_labels, row, (size_t)num_labels * sizeof *row);
        }
        begin = next;
    }
    packed_batch_free(&p);
    return rc;
}

int mb_glue_write_predictions(const char *path, mb_glue_task task, const mb_glue_encoded *data,
                              const float *predictions, mb_error *err) {
    const mb_glue_task_info *info = mb_glue_task_get(task);
    mb_atomic_file file;
    if (mb_atomic_file_open(&file, path, err) != 0) return -1;
    int rc = mb_atomic_file_write(&file, "index\tprediction\n", 17, err);
    for (size_t i = 0; rc == 0 && i < data->count; i++) {
        char line[128];
        int n;
        if (info->num_labels == 1) {
            double score = fmin(5.0, fmax(0.0, (double)predictions[i]));
            n = snprintf(line, sizeof line, "%" PRId64 "\t%.3f\n", data->indices[i], score);
        } else {
            int label = (int)predictions[i];
            if (label < 0 || label >= info->num_labels) {
                rc = mb_fail(err, "%s: prediction %d for row %zu is not a class of %s", path, label, i, info->dir_name);
                break;
            }
            n = snprintf(line, sizeof line, "%" PRId64 "\t%s\n", data->indices[i], info->file_labels[label]);
        }
        rc = mb_atomic_file_write(&file, line, (size_t)n, err);
    }
    if (rc != 0) {
        mb_atomic_file_abort(&file);
        return -1;
    }
    return mb_atomic_file_commit(&file, err);
}

/* ---- checkpoints in and out ---- */

/* An init path may be a checkpoint directory (config.json) or a pretraining run (its newest checkpoint). */
static int resolve_checkpoint(const char *path, char *out, size_t size, mb_error *err) {
    char probe[MB_FT_PATH_SIZE + 32];
    snprintf(probe, sizeof probe, "%s/config.json", path);
    if (mb_path_exists(probe)) {
        snprintf(out, size, "%s", path);
        return 0;
    }
    int found = mb_checkpoint_find_latest(path, out, size, err);
    if (found < 0) return -1;
    if (found == 0) return mb_fail(err, "%s: no config.json and no checkpoints/ with a complete checkpoint", path);
    return 0;
}

/* Copies every tensor the source model has under the same name and shape, except classifier.* unless
 * keep_classifier (ModernBERT's GLUE jobs load with load_ignore_keys=["state/model/model.classifier*"]: a task
 * started from the MNLI model gets a new classifier). Returns how many tensors were left at their initialisation. */
static int copy_matching_tensors(mb_model *target, const mb_model *source, int keep_classifier, char *fresh,
                                 size_t fresh_size) {
    int left = 0;
    fresh[0] = '\0';
    for (int i = 0; i < target->table.count; i++) {
        const mb_param_info *p = &target->table.params[i];
        int j = keep_classifier || strncmp(p->name, "classifier.", 11) != 0 ? mb_param_table_find(&source->table, p->name)
                                                                            : -1;
        const mb_param_info *q = j >= 0 ? &source->table.params[j] : NULL;
        if (q != NULL && q->ndim == p->ndim && q->shape[0] == p->shape[0] && q->shape[1] == p->shape[1]) {
            memcpy(target->params + p->offset, source->params + q->offset, p->numel * sizeof(float));
            continue;
        }
        left++;
        size_t used = strlen(fresh);
        snprintf(fresh + used, fresh_size - used, "%s%s", used ? ", " : "", p->name);
    }
    return left;
}

/* ---- the fine-tuner ---- */

typedef struct finetuner {
    const mb_finetune_config *cfg;
    mb_finetune_result *result;
    mb_glue_task task;
    const mb_glue_task_info *info;
    char init_dir[MB_FT_PATH_SIZE + 64];
    char tokenizer_path[MB_FT_PATH_SIZE + 64];
    mb_tokenizer *tokenizer;
    mb_model host;
    mb_backend *backend;
    mb_stableadamw adamw;
    mb_glue_encoded train, dev[MB_GLUE_MAX_SPLITS];
    size_t *order;
    packed_batch packed;
    float *predictions[MB_GLUE_MAX_SPLITS];  /* the last evaluation's predictions and logits, per dev split */
    float *logits[MB_GLUE_MAX_SPLITS];
    FILE *metrics;
    double start_time;
} finetuner;


static int build_classifier_config(finetuner *f, const mb_config *init, mb_config *config, mb_error *err) {
    *config = *init;
    config->head = MB_HEAD_SEQUENCE_CLASSIFIER;
    config->num_labels = f->info->num_labels;
    if (f->cfg->model.pooling == MB_FT_POOLING_MEAN) config->classifier_pooling = MB_POOLING_MEAN;
    if (f->cfg->model.pooling == MB_FT_POOLING_CLS) config->classifier_pooling = MB_POOLING_CLS;
    memset(config->label_names, 0, sizeof config->label_names);
    for (int k = 0; k < config->num_labels; k++) {
        const char *name = f->cfg->model.label_name_count ? f->cfg->model.label_names[k] : f->info->label_names[k];
        snprintf(config->label_names[k], MB_LABEL_NAME_SIZE, "%s", name);
    }
    return mb_config_finalize(config, err);
}

static int setup_model(finetuner *f, mb_error *err) {
    if (resolve_checkpoint(f->cfg->model.init, f->init_dir, sizeof f->init_dir, err) != 0) return -1;
    mb_model init;
    if (mb_model_load_hf(&init, f->init_dir, err) != 0) return mb_fail_context(err, "model.init");
    mb_config config;
    int rc = build_classifier_config(f, &init.config, &config, err);
    if (rc == 0) rc = mb_model_create(&f->host, &config, err);
    if (rc == 0) {
        mb_params_init(&f->host.table, &config, f->host.params, (uint64_t)f->cfg->run.seed);
        char fresh[1024] = "everything (model.from_scratch: only the architecture comes from the checkpoint)";
        int left = f->cfg->model.from_scratch ? 1 : copy_matching_tensors(&f->host, &init, f->cfg->model.keep_classifier,
                                                                          fresh, sizeof fresh);
        char kind[64] = "masked LM";
        if (init.config.head != MB_HEAD_MASKED_LM)
            snprintf(kind, sizeof kind, "classifier with %d label(s)", init.config.num_labels);
        printf("init: %s (%s) -> %d label(s), %s pooling; initialised fresh: %s\n", f->init_dir, kind,
               config.num_labels, config.classifier_pooling == MB_POOLING_CLS ? "cls" : "mean",
               left ? fresh : "nothing");
    }
    mb_model_free(&init);
    if (rc != 0) return -1;
    if (mb_backend_create(&f->backend, f->cfg->run.backend, &config, err) != 0) return -1;
    if (f->backend->ops->write_params(f->backend, f->host.params, err) != 0) return -1;
    f->result->parameters = f->host.table.total_numel;
    return 0;
}

static int setup_tokenizer(finetuner *f, mb_error *err) {
    if (f->cfg->data.tokenizer[0] != '\0')
        snprintf(f->tokenizer_path, sizeof f->tokenizer_path, "%s", f->cfg->data.tokenizer);
    else
        snprintf(f->tokenizer_path, sizeof f->tokenizer_path, "%s/tokenizer.json", f->init_dir);
    if (!mb_path_exists(f->tokenizer_path))
        return mb_fail(err, "%s: no tokenizer (set data.tokenizer)", f->tokenizer_path);
    if (mb_tokenizer_load(&f->tokenizer, f->tokenizer_path, err) != 0) return -1;
    if (mb_tokenizer_vocab_size(f->tokenizer) > f->host.config.vocab_size)
        return mb_fail(err, "%s: %d ids do not fit the model's vocab_size %d", f->tokenizer_path,
                       mb_tokenizer_vocab_size(f->tokenizer), f->host.config.vocab_size);
    return 0;
}

static int compare_size(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

static void shuffle(size_t *order, size_t n, uint64_t seed, uint64_t stream) {
    mb_rng rng;
    mb_rng_seed_stream(&rng, seed, stream);
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)mb_rng_below(&rng, i);
        size_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
}

/* Keeps `limit` examples: the first ones (dev), or a seeded random subset kept in file order (train). */
static int subset_split(finetuner *f, mb_glue_split *split, int64_t limit, int random) {
    if (limit <= 0 || (size_t)limit >= split->count) return 0;
    if (!random) {
        split->count = (size_t)limit;
        return 0;
    }
    size_t *order = malloc(split->count * sizeof *order);
    if (order == NULL) return -1;
    for (size_t i = 0; i < split->count; i++) order[i] = i;
    shuffle(order, split->count, (uint64_t)f->cfg->run.seed, 0x5B5E7ULL);
    qsort(order, (size_t)limit, sizeof *order, compare_size);
    for (size_t i = 0; i < (size_t)limit; i++) split->examples[i] = split->examples[order[i]];
    split->count = (size_t)limit;
    free(order);
    return 0;
}

static int load_encoded(finetuner *f, const char *split_name, int64_t limit, int random, mb_glue_encoded *out,
                        mb_error *err) {
    mb_glue_split split;
    if (mb_glue_read_split(&split, f->task, f->cfg->data.dir, split_name, err) != 0) return -1;
    if (!split.labelled) {
        mb_glue_split_free(&split);
        return mb_fail(err, "%s: split '%s' has no labels", split.path, split_name);
    }
    int rc = subset_split(f, &split, limit, random) == 0 ? 0 : mb_fail(err, "out of memory");
    if (rc == 0 && split.count == 0) rc = mb_fail(err, "%s: no examples", split.path);
    if (rc == 0) rc = mb_glue_encode(&split, f->tokenizer, f->cfg->data.max_seq_len, out, err);
    if (rc == 0)
        printf("data: %s: %zu examples%s, %zu tokens, %zu truncated to %d, %zu malformed rows skipped\n", split.path,
               out->count, limit > 0 && (size_t)limit == split.count ? " (subset)" : "", out->total_tokens,
               out->truncated, f->cfg->data.max_seq_len, split.skipped);
    mb_glue_split_free(&split);
    return rc;
}

static int setup_data(finetuner *f, mb_error *err) {
    const mb_finetune_config *c = f->cfg;
    if (load_encoded(f, c->data.train_split, c->data.max_train_examples, 1, &f->train, err) != 0) return -1;
    mb_finetune_result *r = f->result;
    if (c->data.dev_split[0] != '\0') {
        r->dev_count = 1;
        snprintf(r->dev_names[0], sizeof r->dev_names[0], "%s", c->data.dev_split);
    } else {
        r->dev_count = f->info->dev_count;
        for (int i = 0; i < r->dev_count; i++)
            snprintf(r->dev_names[i], sizeof r->dev_names[i], "%s", f->info->dev_splits[i]);
    }
    for (int i = 0; i < r->dev_count; i++)
        if (load_encoded(f, r->dev_names[i], c->data.max_eval_examples, 0, &f->dev[i], err) != 0) return -1;
    r->train_examples = f->train.count;
    f->order = malloc(f->train.count * sizeof *f->order);
    if (f->order == NULL) return mb_fail(err, "out of memory");
    for (int i = 0; i < r->dev_count; i++) {
        f->predictions[i] = malloc(f->dev[i].count * sizeof(float));
        f->logits[i] = malloc(f->dev[i].count * (size_t)f->info->num_labels * sizeof(float));
        if (f->predictions[i] == NULL || f->logits[i] == NULL) return mb_fail(err, "out of memory");
    }
    return packed_batch_init(&f->packed, c->training.micro_batch_tokens, err);
}

static int setup(finetuner *f, mb_error *err) {
    const mb_finetune_config *c = f->cfg;
    if (mb_glue_task_from_name(c->data.task, &f->task, err) != 0) return -1;
    f->info = mb_glue_task_get(f->task);
    f->result->task = f->task;
    if (mb_make_dirs(c->run.output_dir, err) != 0) return -1;
    char *yaml = mb_cfg_dump(mb_finetune_config_schema, c, err);
    if (yaml == NULL) return -1;
    char path[MB_FT_PATH_SIZE + 32];
    snprintf(path, sizeof path, "%s/config.yaml", c->run.output_dir);
    int rc = mb_write_file_atomic(path, yaml, strlen(yaml), err);
    free(yaml);
    if (rc != 0 || setup_model(f, err) != 0 || setup_tokenizer(f, err) != 0 || setup_data(f, err) != 0) return -1;
    mb_stableadamw_init(&f->adamw, c->optimizer.lr, c->optimizer.weight_decay);
    f->adamw.beta1 = c->optimizer.beta1;
    f->adamw.beta2 = c->optimizer.beta2;
    f->adamw.eps = c->optimizer.eps;
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->run.output_dir);
    f->metrics = fopen(path, "w");
    if (f->metrics == NULL) return mb_fail(err, "%s: cannot open for writing", path);
    return 0;
}

/* ---- training ---- */

typedef struct step_stats {
    double loss_sum;   /* summed over the step's sequences */
    size_t sequences;
    double grad_norm;
    double lr;
    int skipped;
} step_stats;

static int run_step(finetuner *f, size_t begin, size_t end, double lr, step_stats *s, mb_error *err) {
    mb_backend *b = f->backend;
    s->sequences = end - begin;
    s->loss_sum = 0.0;
    s->lr = lr;
    if (b->ops->zero_grads(b, err) != 0) return -1;
    for (size_t k = begin; k < end;) {
        size_t next = pack_examples(&f->packed, &f->train, f->order, k, end);
        mb_forward_result result;
        if (b->ops->forward(b, &f->packed.batch, &result, err) != 0) return -1;
        if (b->ops->backward(b, (float)(1.0 / (double)s->sequences), err) != 0) return -1;
        s->loss_sum += result.loss_sum;
        k = next;
    }
    if (b->ops->grad_norm(b, &s->grad_norm, err) != 0) return -1;
    s->skipped = !isfinite(s->loss_sum) || !isfinite(s->grad_norm);
    if (s->skipped) return 0;
    f->adamw.weight_decay = f->cfg->optimizer.weight_decay;
    return b->ops->optimizer_step(b, &f->adamw, lr, err);
}

static int evaluate(finetuner *f, mb_glue_scores *scores, mb_error *err) {
    for (int i = 0; i < f->result->dev_count; i++) {
        const mb_glue_encoded *d = &f->dev[i];
        if (mb_finetune_predict(f->backend, d, f->cfg->training.micro_batch_tokens, f->predictions[i], f->logits[i],
                                err) != 0)
            return -1;
        if (mb_glue_score(f->task, f->predictions[i], d->labels, d->count, &scores[i], err) != 0) return -1;
    }
    return 0;
}

/* BEST/<split>_predictions.tsv: "index label prediction logit_0 .. logit_k-1" per dev row (%.9g: floats round-trip
 * exactly), for error analysis and for checking that the saved checkpoint reproduces them. */
static int write_dev_predictions(finetuner *f, int split, mb_error *err) {
    char path[MB_FT_PATH_SIZE + 160];
    snprintf(path, sizeof path, "%s/%s_predictions.tsv", f->result->best_dir, f->result->dev_names[split]);
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (out == NULL) return mb_fail(err, "out of memory");
    int k_count = f->info->num_labels;
    fprintf(out, "index\tlabel\tprediction");
    for (int k = 0; k < k_count; k++) fprintf(out, "\tlogit_%d", k);
    fprintf(out, "\n");
    const mb_glue_encoded *d = &f->dev[split];
    for (size_t i = 0; i < d->count; i++) {
        fprintf(out, "%" PRId64 "\t%.9g\t%.9g", d->indices[i], d->labels[i], f->predictions[split][i]);
        for (int k = 0; k < k_count; k++) fprintf(out, "\t%.9g", f->logits[split][i * (size_t)k_count + (size_t)k]);
        fprintf(out, "\n");
    }
    fclose(out);
    int rc = mb_write_file_atomic(path, text, size, err);
    free(text);
    return rc;
}

static int save_best(finetuner *f, mb_error *err) {
    char path[MB_FT_PATH_SIZE + 64];
    snprintf(f->result->best_dir, sizeof f->result->best_dir, "%s/best", f->cfg->run.output_dir);
    if (f->backend->ops->read_params(f->backend, f->host.params, err) != 0) return -1;
    if (mb_model_save_hf(&f->host, f->result->best_dir, err) != 0) return -1;
    snprintf(path, sizeof path, "%s/tokenizer.json", f->result->best_dir);
    if (mb_copy_file_atomic(f->tokenizer_path, path, err) != 0) return -1;
    for (int i = 0; i < f->result->dev_count; i++)
        if (write_dev_predictions(f, i, err) != 0) return -1;
    /* What `modernbert eval` needs to encode inputs as training did. */
    char settings[256];
    int n = snprintf(settings, sizeof settings, "{\"task\": \"%s\", \"max_seq_len\": %d}\n", f->info->name,
                     f->cfg->data.max_seq_len);
    snprintf(path, sizeof path, "%s/finetune.json", f->result->best_dir);
    return mb_write_file_atomic(path, settings, (size_t)n, err);
}

static void json_number(FILE *out, const char *key, double value) {
    if (isfinite(value)) fprintf(out, ", \"%s\": %.9g", key, value);
}

static void write_scores_json(FILE *out, const mb_glue_scores *s) {
    fprintf(out, "{\"count\": %zu", s->count);
    json_number(out, "accuracy", s->accuracy);
    json_number(out, "f1", s->f1);
    json_number(out, "matthews", s->matthews);
    json_number(out, "pearson", s->pearson);
    json_number(out, "spearman", s->spearman);
    json_number(out, "main", s->main);
    json_number(out, "combined", s->combined);
    fprintf(out, "}");
}

static void log_evaluation(finetuner *f, int epoch, double train_loss, const mb_glue_scores *scores, int improved) {
    printf("epoch %d | train loss %.6f", epoch, train_loss);
    for (int i = 0; i < f->result->dev_count; i++) {
        char text[128];
        mb_glue_scores_format(&scores[i], text, sizeof text);
        printf(" | %s %s", f->result->dev_names[i], text);
    }
    printf("%s | %.0f s\n", improved ? " | best so far" : "", mb_monotonic_seconds() - f->start_time);
    fflush(stdout);
    fprintf(f->metrics, "{\"epoch\": %d, \"train_loss\": %.9g", epoch, train_loss);
    for (int i = 0; i < f->result->dev_count; i++) {
        fprintf(f->metrics, ", \"%s\": ", f->result->dev_names[i]);
        write_scores_json(f->metrics, &scores[i]);
    }
    fprintf(f->metrics, "}\n");
    fflush(f->metrics);
}

static void log_step(finetuner *f, int epoch, int64_t step, int64_t total_steps, const step_stats *s) {
    double elapsed = mb_monotonic_seconds() - f->start_time;
    printf("epoch %d step %" PRId64 "/%" PRId64 " | loss %.6f | lr %.3e | grad norm %.4f | %.1f s%s\n", epoch, step,
           total_steps, s->loss_sum / (double)s->sequences, s->lr, s->grad_norm, elapsed,
           s->skipped ? " | SKIPPED (non-finite)" : "");
    fflush(stdout);
    fprintf(f->metrics, "{\"step\": %" PRId64 ", \"epoch\": %d, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %.9g, "
            "\"elapsed_seconds\": %.3f}\n", step, epoch, s->loss_sum / (double)s->sequences, s->lr,
            isfinite(s->grad_norm) ? s->grad_norm : -1.0, elapsed);
    fflush(f->metrics);
}

static int write_results(finetuner *f, mb_error *err) {
    char path[MB_FT_PATH_SIZE + 32];
    snprintf(path, sizeof path, "%s/results.json", f->cfg->run.output_dir);
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (out == NULL) return mb_fail(err, "out of memory");
    const mb_finetune_result *r = f->result;
    fprintf(out, "{\"task\": \"%s\", \"init\": \"%s\", \"lr\": %.9g, \"weight_decay\": %.9g, \"seed\": %" PRId64
            ", \"train_examples\": %zu, \"parameters\": %zu, \"steps\": %" PRId64 ", \"epochs_run\": %d, "
            "\"best_epoch\": %d, \"best\": {", f->info->name, f->init_dir, f->cfg->optimizer.lr,
            f->cfg->optimizer.weight_decay, f->cfg->run.seed, r->train_examples, r->parameters, r->steps,
            r->epochs_run, r->best_epoch);
    for (int i = 0; i < r->dev_count; i++) {
        fprintf(out, "%s\"%s\": ", i ? ", " : "", r->dev_names[i]);
        write_scores_json(out, &r->best[i]);
    }
    fprintf(out, "}, \"history\": [");
    for (int e = 0; e < r->epochs_run; e++) {
        fprintf(out, "%s{\"epoch\": %d, \"train_loss\": %.9g", e ? ", " : "", e + 1, r->history[e].train_loss);
        for (int i = 0; i < r->dev_count; i++) {
            fprintf(out, ", \"%s\": ", r->dev_names[i]);
            write_scores_json(out, &r->history[e].dev[i]);
        }
        fprintf(out, "}");
    }
    fprintf(out, "], \"best_dir\": \"%s\"}\n", r->best_dir);
    fclose(out);
    int rc = mb_write_file_atomic(path, text, size, err);
    free(text);
    return rc;
}

static int better(double candidate, double best) {
    if (!isfinite(candidate)) return 0;
    return !isfinite(best) || candidate > best;
}

static int train(finetuner *f, mb_error *err) {
    const mb_finetune_config *c = f->cfg;
    mb_finetune_result *r = f->result;
    size_t n = f->train.count, batch = (size_t)c->training.batch_size;
    int64_t steps_per_epoch = (int64_t)((n + batch - 1) / batch);
    int64_t total_steps = steps_per_epoch * c->training.epochs;
    int64_t warmup = (int64_t)llround(c->optimizer.warmup_fraction * (double)total_steps);
    mb_lr_schedule schedule = {total_steps, warmup, total_steps - warmup, MB_WARMUP_ALPHA_I,
                               c->optimizer.final_lr_fraction, MB_DECAY_LINEAR};
    if (mb_lr_schedule_check(&schedule, err) != 0) return -1;
    printf("train: %zu examples, %d epochs x %" PRId64 " steps of %d sequences, lr %.3g (warmup %" PRId64
           " steps, linear decay), weight decay %.3g\n", n, c->training.epochs, steps_per_epoch,
           c->training.batch_size, c->optimizer.lr, warmup, c->optimizer.weight_decay);
    double best = NAN;
    int since_best = 0, nonfinite_streak = 0;
    for (int epoch = 1; epoch <= c->training.epochs; epoch++) {
        for (size_t i = 0; i < n; i++) f->order[i] = i;
        shuffle(f->order, n, (uint64_t)c->run.seed, (uint64_t)epoch);
        double epoch_loss = 0.0;
        size_t epoch_sequences = 0;
        for (size_t begin = 0; begin < n; begin += batch) {
            size_t end = begin + batch < n ? begin + batch : n;
            step_stats s;
            double lr = c->optimizer.lr * mb_lr_multiplier(&schedule, r->steps);
            if (run_step(f, begin, end, lr, &s, err) != 0) return -1;
            r->steps++;
            nonfinite_streak = s.skipped ? nonfinite_streak + 1 : 0;
            if (nonfinite_streak >= 5)
                return mb_fail(err, "5 consecutive steps had a non-finite loss or gradient (step %" PRId64
                               "); lower the learning rate", r->steps);
            if (!s.skipped) {
                epoch_loss += s.loss_sum;
                epoch_sequences += s.sequences;
            }
            if (r->steps % c->training.log_every_steps == 0 || end == n) log_step(f, epoch, r->steps, total_steps, &s);
        }
        mb_finetune_epoch *h = &r->history[epoch - 1];
        h->train_loss = epoch_sequences ? epoch_loss / (double)epoch_sequences : NAN;
        if (evaluate(f, h->dev, err) != 0) return -1;
        r->epochs_run = epoch;
        int improved = better(h->dev[0].main, best);
        log_evaluation(f, epoch, h->train_loss, h->dev, improved);
        if (improved) {
            best = h->dev[0].main;
            since_best = 0;
            r->best_epoch = epoch;
            memcpy(r->best, h->dev, sizeof r->best);
            if (c->training.save_best && save_best(f, err) != 0) return -1;
        } else {
            since_best++;
        }
        if (write_results(f, err) != 0) return -1;
        if (c->training.early_stopping_patience > 0 && since_best >= c->training.early_stopping_patience) {
            printf("early stopping: no improvement for %d epoch(s); best epoch %d\n", since_best, r->best_epoch);
            break;
        }
    }
    return 0;
}

static void finetuner_free(finetuner *f) {
    mb_backend_destroy(f->backend);
    mb_model_free(&f->host);
    mb_tokenizer_free(f->tokenizer);
    mb_glue_encoded_free(&f->train);
    for (int i = 0; i < MB_GLUE_MAX_SPLITS; i++) mb_glue_encoded_free(&f->dev[i]);
    free(f->order);
    for (int i = 0; i < MB_GLUE_MAX_SPLITS; i++) {
        free(f->predictions[i]);
        free(f->logits[i]);
    }
    packed_batch_free(&f->packed);
    if (f->metrics) fclose(f->metrics);
}

int mb_finetune(const mb_finetune_config *config, mb_finetune_result *result, mb_error *err) {
    finetuner f;
    memset(&f, 0, sizeof f);
    memset(result, 0, sizeof *result);
    f.cfg = config;
    f.result = result;
    f.start_time = mb_monotonic_seconds();
    int rc = setup(&f, err);
    if (rc == 0) rc = train(&f, err);
    if (rc == 0 && result->best_epoch > 0) {
        char text[128];
        mb_glue_scores_format(&result->best[0], text, sizeof text);
        printf("done: %s best epoch %d: %s %s (%" PRId64 " steps, %.0f s)\n", f.info->dir_name, result->best_epoch,
               result->dev_names[0], text, result->steps, mb_monotonic_seconds() - f.start_time);
    }
    finetuner_free(&f);
    return rc;
}

/* ---- evaluating a fine-tuned checkpoint ---- */

typedef struct evaluator {
    const mb_eval_options *o;
    mb_glue_task task;
    const mb_glue_task_info *info;
    mb_model model;
    mb_backend *backend;
    mb_tokenizer *tokenizer;
    int max_seq_len;
    int64_t micro_batch_tokens;
} evaluator;

/* The max_seq_len the checkpoint was fine-tuned with (MODEL/finetune.json), or 256. */
static int trained_max_seq_len(const char *model_dir) {
    char path[4200], *text = NULL;
    size_t size = 0;
    mb_error ignored;
    snprintf(path, sizeof path, "%s/finetune.json", model_dir);
    if (!mb_path_exists(path) || mb_read_file(path, &text, &size, &ignored) != 0) return 256;
    cJSON *root = cJSON_Parse(text);
    const cJSON *value = cJSON_GetObjectItemCaseSensitive(root, "max_seq_len");
    int length = cJSON_IsNumber(value) && value->valueint >= 3 ? value->valueint : 256;
    cJSON_Delete(root);
    free(text);
    return length;
}

static int evaluator_setup(evaluator *e, mb_error *err) {
    const mb_eval_options *o = e->o;
    if (mb_glue_task_from_name(o->task, &e->task, err) != 0) return -1;
    e->info = mb_glue_task_get(e->task);
    e->max_seq_len = o->max_seq_len > 0 ? o->max_seq_len : trained_max_seq_len(o->model_dir);
    e->micro_batch_tokens = o->micro_batch_tokens > 0 ? o->micro_batch_tokens : 8192;
    if (e->micro_batch_tokens < e->max_seq_len) e->micro_batch_tokens = e->max_seq_len;
    if (mb_model_load_hf(&e->model, o->model_dir, err) != 0) return -1;
    if (e->model.config.head != MB_HEAD_SEQUENCE_CLASSIFIER || e->model.config.num_labels != e->info->num_labels)
        return mb_fail(err, "%s: not a sequence classifier with %d label(s) for %s (fine-tune it first)",
                       o->model_dir, e->info->num_labels, e->info->dir_name);
    char tokenizer[4200];
    if (o->tokenizer) snprintf(tokenizer, sizeof tokenizer, "%s", o->tokenizer);
    else snprintf(tokenizer, sizeof tokenizer, "%s/tokenizer.json", o->model_dir);
    if (mb_tokenizer_load(&e->tokenizer, tokenizer, err) != 0) return -1;
    if (mb_backend_create(&e->backend, o->backend ? o->backend : "auto", &e->model.config, err) != 0) return -1;
    return e->backend->ops->write_params(e->backend, e->model.params, err);
}

/* Reads, encodes and predicts one split; predictions are malloc'ed. */
static int evaluator_predict(evaluator *e, const char *split_name, int limit_rows, mb_glue_encoded *data,
                             float **predictions, mb_error *err) {
    mb_glue_split split;
    if (mb_glue_read_split(&split, e->task, e->o->data_dir, split_name, err) != 0) return -1;
    if (limit_rows && e->o->max_examples > 0 && (size_t)e->o->max_examples < split.count)
        split.count = (size_t)e->o->max_examples;
    int rc = mb_glue_encode(&split, e->tokenizer, e->max_seq_len, data, err);
    mb_glue_split_free(&split);
    if (rc != 0) return -1;
    *predictions = malloc((data->count ? data->count : 1) * sizeof **predictions);
    if (*predictions == NULL) return mb_fail(err, "out of memory");
    return mb_finetune_predict(e->backend, data, e->micro_batch_tokens, *predictions, NULL, err);
}

static int evaluator_score(evaluator *e, mb_eval_report *report, const char *split_name, mb_error *err) {
    if (report->split_count >= MB_EVAL_MAX_SPLITS) return mb_fail(err, "at most %d splits", MB_EVAL_MAX_SPLITS);
    if (strncmp(split_name, "test", 4) == 0)
        return mb_fail(err, "split '%s' has no labels: use --predictions DIR to write test predictions", split_name);
    mb_glue_encoded data = {0};
    float *predictions = NULL;
    int rc = evaluator_predict(e, split_name, 1, &data, &predictions, err);
    int index = report->split_count;
    if (rc == 0) rc = mb_glue_score(e->task, predictions, data.labels, data.count, &report->scores[index], err);
    if (rc == 0) {
        snprintf(report->split_names[index], sizeof report->split_names[index], "%s", split_name);
        report->split_count++;
    }
    free(predictions);
    mb_glue_encoded_free(&data);
    return rc;
}

static int evaluator_write_tests(evaluator *e, mb_eval_report *report, mb_error *err) {
    if (mb_make_dirs(e->o->predictions_dir, err) != 0) return -1;
    for (int i = 0; i < e->info->dev_count; i++) {
        mb_glue_encoded data = {0};
        float *predictions = NULL;
        char *path = report->files[report->file_count];
        snprintf(path, sizeof report->files[0], "%s/%s", e->o->predictions_dir, e->info->submission_files[i]);
        int rc = evaluator_predict(e, e->info->test_splits[i], 0, &data, &predictions, err);
        if (rc == 0) rc = mb_glue_write_predictions(path, e->task, &data, predictions, err);
        free(predictions);
        mb_glue_encoded_free(&data);
        if (rc != 0) return -1;
        report->file_count++;
    }
    return 0;
}

int mb_glue_evaluate(const mb_eval_options *options, mb_eval_report *report, mb_error *err) {
    evaluator e;
    memset(&e, 0, sizeof e);
    memset(report, 0, sizeof *report);
    e.o = options;
    int rc = evaluator_setup(&e, err);
    if (rc == 0 && options->splits != NULL) {
        char *list = strdup(options->splits), *save = NULL;
        if (list == NULL) rc = mb_fail(err, "out of memory");
        for (char *name = list ? strtok_r(list, ",", &save) : NULL; rc == 0 && name; name = strtok_r(NULL, ",", &save))
            rc = evaluator_score(&e, report, name, err);
        free(list);
    } else {
        for (int i = 0; rc == 0 && i < (e.info ? e.info->dev_count : 0); i++)
            rc = evaluator_score(&e, report, e.info->dev_splits[i], err);
    }
    if (rc == 0 && options->predictions_dir != NULL) rc = evaluator_write_tests(&e, report, err);
    mb_backend_destroy(e.backend);
    mb_tokenizer_free(e.tokenizer);
    mb_model_free(&e.model);
    return rc;
}
