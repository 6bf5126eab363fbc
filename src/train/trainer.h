/* The pretraining loop, backend-agnostic: phases → steps → micro-batches → forward/backward → StableAdamW, with
 * schedules by tokens, gradient accumulation to the global batch (the loss and its gradient are the mean over all
 * labelled tokens of the step, not a mean of micro-batch means), NaN/Inf step skipping, validation, logging to the
 * console and RUN/metrics.jsonl, and exact checkpoint/resume. */
#ifndef MB_TRAINER_H
#define MB_TRAINER_H

#include <signal.h>
#include <stdint.h>

#include "common/error.h"
#include "dist/env.h"
#include "train/run_config.h"

typedef struct mb_pretrain_options {
    const char *config_path;
    char *const *overrides;
    int override_count;
    int resume;                         /* continue from the newest complete checkpoint of run.output_dir */
    int64_t max_steps;                  /* stop (with a checkpoint) after this many steps in total; 0 = no limit */
    volatile sig_atomic_t *stop_flag;   /* set by SIGINT/SIGTERM: checkpoint and return */
    const mb_dist_env *dist_env;        /* this process's place in a data-parallel group (mb_dist_env_detect);
                                           NULL = a single process */
} mb_pretrain_options;

/* Runs (or resumes) the run the config describes. Returns 0 on completion or a clean stop. */
int mb_pretrain(const mb_run_config *config, const mb_pretrain_options *options, mb_error *err);

#endif
