/* GLUE fine-tuning and evaluation of ModernBertForSequenceClassification (spec §2.8 and §6).
 *
 * Fine-tuning, read top to bottom (finetune.c):
 *   the init checkpoint (an MLM checkpoint from `modernbert pretrain`, a Hugging Face ModernBERT, or a fine-tuned
 *   classifier such as the MNLI model RTE, MRPC and STS-B start from) is loaded; every tensor of the classifier
 *   whose name and shape it has is copied except classifier.* (new for every task, as ModernBERT's GLUE jobs ignore
 *   the loaded classifier; model.keep_classifier keeps it), the rest keeps the seeded HF initialisation
 *   → the train and dev splits are read and encoded once ([CLS] A [SEP] (B [SEP]), longest-first truncation)
 *   → per epoch: a seeded shuffle; steps of batch_size sequences, each packed without padding into micro-batches of
 *     at most micro_batch_tokens tokens; loss = mean over the step's sequences of the cross-entropy (classification)
 *     or squared error (regression, STS-B: MSE), so backward uses grad_scale = 1 / sequences in the step
 *   → StableAdamW (AdamW with fully decoupled weight decay, as the DecoupledAdamW of ModernBERT's GLUE jobs, plus
 *     per-tensor update clipping) at lr × schedule(step): linear warmup over warmup_fraction of all steps, then
 *     linear decay to final_lr_fraction × lr
 *   → after every epoch: every dev split is scored; the best epoch (by the task's main score on the first dev
 *     split) is saved to OUTPUT/best/ as a transformers ModernBertForSequenceClassification checkpoint (id2label,
 *     label2id, classifier_pooling, num_labels, tokenizer.json) with finetune.json (task, max_seq_len) and
 *     <dev split>_predictions.tsv (index, label, prediction, logits); training stops after
 *     `early_stopping_patience` epochs without improvement.
 * Everything random (classifier init, shuffles, subsets) comes from the seed, and the CPU backend is deterministic
 * for a fixed thread count, so a fixed seed reproduces the same metrics bit for bit.
 *
 * Outputs in run.output_dir: config.yaml (the effective configuration), metrics.jsonl (one object per log interval
 * and per evaluation), results.json (per-epoch history and the best scores), best/. */
#ifndef MB_FINETUNE_H
#define MB_FINETUNE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "data/glue.h"
#include "eval/metrics.h"
#include "io/config_tree.h"
#include "model/backend.h"
#include "model/config.h"

#define MB_FT_PATH_SIZE 1024
#define MB_FT_MAX_EPOCHS 64

enum { MB_FT_POOLING_CHECKPOINT, MB_FT_POOLING_MEAN, MB_FT_POOLING_CLS };

typedef struct mb_finetune_config {
    struct {
        char output_dir[MB_FT_PATH_SIZE];
        int64_t seed;
        char backend[16];
        int threads;
    } run;
    struct {
        char task[16];
        char dir[MB_FT_PATH_SIZE];
        char tokenizer[MB_FT_PATH_SIZE];  /* "" = the init checkpoint's tokenizer.json */
        int max_seq_len;
        char train_split[64];
        char dev_split[64];               /* "" = the task's dev split(s): dev, or dev_matched + dev_mismatched */
        int64_t max_train_examples;       /* 0 = all; otherwise a seeded random subset */
        int64_t max_eval_examples;        /* 0 = all; otherwise the first N rows */
    } data;
    struct {
        char init[MB_FT_PATH_SIZE];
        int pooling;                      /* MB_FT_POOLING_* */
        char label_names[MB_MAX_LABELS][MB_LABEL_NAME_SIZE];
        int label_name_count;             /* 0 = the task's names */
        bool keep_classifier;             /* copy the init checkpoint's classifier.* (default: a new classifier) */
        bool from_scratch;                /* only the architecture from init: every weight random (a baseline) */
    } model;
    struct {
        double lr, weight_decay, beta1, beta2, eps, warmup_fraction, final_lr_fraction;
    } optimizer;
    struct {
        int epochs;
        int batch_size;                   /* sequences per optimizer step */
        int64_t micro_batch_tokens;       /* token budget of one packed micro-batch */
        int early_stopping_patience;      /* epochs without improvement before stopping; 0 = never stop early */
        int log_every_steps;
        bool save_best;
    } training;
} mb_finetune_config;

extern const mb_cfg_field mb_finetune_config_schema[];

/* Loads CONFIG.yaml (NULL = only defaults) and applies key=value overrides; checks every value. */
int mb_finetune_config_load(mb_finetune_config *config, const char *path, char *const *overrides, int override_count,
                            mb_error *err);

typedef struct mb_finetune_epoch {
    double train_loss;                         /* mean over the epoch's sequences */
    mb_glue_scores dev[MB_GLUE_MAX_SPLITS];
} mb_finetune_epoch;

typedef struct mb_finetune_result {
    mb_glue_task task;
    int dev_count;
    char dev_names[MB_GLUE_MAX_SPLITS][64];
    mb_finetune_epoch history[MB_FT_MAX_EPOCHS];
    int epochs_run;
    int best_epoch;                            /* 1-based; 0 when no evaluation happened */
    mb_glue_scores best[MB_GLUE_MAX_SPLITS];
    int64_t steps;
    size_t train_examples;
    size_t parameters;
    char best_dir[MB_FT_PATH_SIZE + 16];       /* "" when training.save_best is false */
} mb_finetune_result;

int mb_finetune(const mb_finetune_config *config, mb_finetune_result *result, mb_error *err);

/* Runs the model over every example of `data` in packed micro-batches of at most micro_batch_tokens tokens and
 * writes one prediction per example: the argmax class id (ties: the lowest id) or the regression score.
 * logits, when non-NULL, receives [count, num_labels] floats. */
int mb_finetune_predict(mb_backend *backend, const mb_glue_encoded *data, int64_t micro_batch_tokens,
                        float *predictions, float *logits, mb_error *err);

/* Writes a GLUE submission file "index\tprediction" (labels as the task's files write them; STS-B scores clamped
 * to [0, 5] with 3 decimals), atomically. */
int mb_glue_write_predictions(const char *path, mb_glue_task task, const mb_glue_encoded *data,
                              const float *predictions, mb_error *err);

#define MB_EVAL_MAX_SPLITS 8

typedef struct mb_eval_options {
    const char *task;
    const char *data_dir;
    const char *model_dir;          /* a fine-tuned HF checkpoint directory */
    const char *tokenizer;          /* NULL = MODEL/tokenizer.json */
    const char *backend;            /* NULL = "auto" */
    const char *splits;             /* comma-separated labelled splits to score; NULL = the task's dev splits */
    const char *predictions_dir;    /* write the test splits' submission files here; NULL = none */
    int max_seq_len;                /* 0 = MODEL/finetune.json's (what fine-tuning used), else 256 */
    int64_t micro_batch_tokens;     /* 0 = 8192 */
    int64_t max_examples;           /* 0 = all */
} mb_eval_options;

typedef struct mb_eval_report {
    int split_count;
    char split_names[MB_EVAL_MAX_SPLITS][64];
    mb_glue_scores scores[MB_EVAL_MAX_SPLITS];
    int file_count;
    char files[MB_GLUE_MAX_SPLITS][4200];
} mb_eval_report;

/* Scores a fine-tuned checkpoint on labelled splits and writes test predictions (GLUE submission format). */
int mb_glue_evaluate(const mb_eval_options *options, mb_eval_report *report, mb_error *err);

#endif
