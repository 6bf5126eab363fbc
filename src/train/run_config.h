/* The pretraining run configuration: what `modernbert pretrain CONFIG.yaml key=value...` reads. Every key is
 * documented in docs/config.md (generated from the schema's help strings by `modernbert pretrain --describe`). */
#ifndef MB_RUN_CONFIG_H
#define MB_RUN_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "io/config_tree.h"

#define MB_MAX_PHASES 8
#define MB_PATH_SIZE 1024

typedef struct mb_phase_config {
    char name[64];
    int seq_len;                 /* longest sequence (documents are chunked or truncated to it) */
    int64_t micro_batch_tokens;  /* token slots of one micro-batch (one packed row) */
    int64_t batch_tokens;        /* token slots of one optimizer step (global); a multiple of micro_batch_tokens */
    int64_t tokens;              /* real tokens to train in this phase */
    double lr;                   /* peak learning rate */
    int64_t warmup_tokens;
    int64_t decay_tokens;
    int decay_shape;             /* mb_decay_shape */
    double final_lr_fraction;
    double weight_decay;
    double global_rope_theta;
    double local_rope_theta;
    int64_t batch_warmup_tokens; /* batch-size warmup length (0 = off) */
    int batch_warmup_min_rows;   /* micro-batches per step at the start of the batch-size warmup */
    int batch_warmup_unit_rows;  /* the batch grows in steps of this many micro-batches (the GPU count) */
    bool reset_optimizer;        /* zero the optimizer moments and step when this phase starts */
    int64_t data_seed;           /* 0 = the run seed */
} mb_phase_config;

typedef struct mb_run_config {
    struct {
        char name[128];
        char output_dir[MB_PATH_SIZE];
        int64_t seed;
        char backend[16];
        int threads;
        double comm_timeout_seconds;
        int recompute; /* mb_recompute */
    } run;
    struct {
        int preset;                
        char init[MB_PATH_SIZE];
        int vocab_size;
        int hidden_size, intermediate_size, num_hidden_layers, num_attention_heads;
        int global_attn_every_n_layers, local_attention;
    } model;
    struct {
        char tokenizer[MB_PATH_SIZE];
        char train[MB_PATH_SIZE];
        char val[MB_PATH_SIZE];
        char batches[MB_PATH_SIZE];
        double mlm_probability;
        bool mask_cls_sep;
        bool truncate;
        int prefetch;
    } data;
    struct {
        double beta1, beta2, eps;
    } optimizer;
    mb_phase_config phases[MB_MAX_PHASES];
    int phase_count;
    struct {
        int every_steps;
        double every_minutes;
        int keep;
    } checkpoint;
    struct {
        int every_steps;
        int val_every_steps;
        int val_batches;
        int max_nonfinite_steps;
        bool progress_bar;
    } logging;
} mb_run_config;

extern const mb_cfg_field mb_run_config_schema[];

/* Loads CONFIG.yaml, applies key=value overrides, reads and checks every value (errors name file:line and key). */
int mb_run_config_load(mb_run_config *config, const char *path, char *const *overrides, int override_count,
                       mb_error *err);

#endif
