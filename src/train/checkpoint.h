/* Training checkpoints: RUN/checkpoints/step-NNNNNNNN/ holding
 *     model.safetensors + config.json + tokenizer.json   a Hugging Face checkpoint that transformers loads as is
 *     optimizer.safetensors                               m.<name>, v.<name> (F32), metadata: optimizer step
 *     trainer_state.json                                  step, phase, tokens, data cursor, config hash, ...
 * A checkpoint is written into a temporary folder, every file fsync'ed, then renamed into place and the parent
 * fsync'ed; only then is RUN/checkpoints/latest (the newest name) replaced atomically, and checkpoints beyond the
 * newest `keep` removed. An interrupted write therefore never damages an earlier checkpoint. */
#ifndef MB_CHECKPOINT_H
#define MB_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "model/model.h"

typedef struct mb_trainer_state {
    int64_t step;              /* optimizer steps done in the whole run */
    int phase;                 /* index of the current phase */
    int64_t phase_step;        /* steps done in the current phase */
    int64_t tokens_seen;       /* real tokens trained in the whole run */
    int64_t phase_tokens;      /* real tokens trained in the current phase */
    int64_t optimizer_step;    /* StableAdamW's t */
    double max_lr;             /* StableAdamW's decay normaliser */
    int nonfinite_streak;
    uint64_t config_hash;
    uint64_t seed;
    char *cursor_json;         /* the data loader's cursor (JSON text, malloc'ed), or NULL */
} mb_trainer_state;

void mb_trainer_state_free(mb_trainer_state *state);

typedef struct mb_checkpoint_contents {
    const mb_model *model;           /* config, table and fp32 parameters */
    const float *m, *v;              /* optimizer moments in the table's layout (NULL: no optimizer file) */
    const mb_trainer_state *state;
    const char *tokenizer_path;      /* copied into the checkpoint (NULL or "": skipped) */
} mb_checkpoint_contents;

/* Writes RUN/checkpoints/step-NNNNNNNN, updates `latest`, keeps the newest `keep`. `written` receives the path. */
int mb_checkpoint_write(const char *run_dir, const mb_checkpoint_contents *contents, int keep, char *written,
                        size_t written_size, mb_error *err);
/* The newest complete checkpoint of a run: returns 1 and its path, 0 when there is none, -1 on error. */
int mb_checkpoint_find_latest(const char *run_dir, char *path, size_t path_size, mb_error *err);
int mb_checkpoint_read_state(const char *checkpoint_dir, mb_trainer_state *state, mb_error *err);
/* Reads m.<name> / v.<name> for every tensor of the table into arenas of table->total_numel floats. */
int mb_checkpoint_read_optimizer(const char *checkpoint_dir, const mb_param_table *table, float *m, float *v,
                                 mb_error *err);

#endif
