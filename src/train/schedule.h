/* Learning-rate and batch-size schedules, both driven by tokens seen (spec §5.4, §5.5).
 *
 * Learning rate: a multiplier on the phase's peak lr, warmup-stable-decay over a phase of total_tokens tokens:
 *   t <  warmup:                 mult = α_i + (1 − α_i)·t/warmup              (Composer LinearScheduler, α_i = 1e-10)
 *   t <  total − decay:          mult = 1
 *   otherwise, x = clamp((t − (total − decay))/decay, 0, 1):
 *     linear                     mult = α_f + (1 − α_f)·(1 − x)
 *     cosine                     mult = α_f + (1 − α_f)·(1 + cos(πx))/2
 *     one_minus_sqrt             mult = α_f + (1 − α_f)·(1 − sqrt(x))
 * Warmup takes precedence if it overlaps the decay window (as the original's `if t < t_warmup` comes first).
 * The recipes:  phase 1 WSD   {warmup 3B (base) / 2B (large), decay 0}          -> warmup then constant
 *               phase 2       {warmup 0, decay 0}                               -> constant (mult = 1)
 *               phase 3       {warmup 0, decay = total = 50B, α_f 0.001, one_minus_sqrt}
 * "Constant" is simply warmup = decay = 0. Call with the tokens seen BEFORE the step (the first step uses t = 0,
 * like Composer, whose scheduler is evaluated on the timestamp at the start of the batch).
 *
 * Batch-size warmup (the original's BatchSizeWarmupScheduler, phase 1 only), in rows = micro-batches per device:
 *   warmup           = ceil(global_warmup_tokens / world_size)                     (tokens per device)
 *   steps_per_unit   = warmup / Σ_{b=min}^{max−1} b                                 (double)
 *   threshold[b]     = ceil(steps_per_unit · Σ_{k=min}^{b} k)     for b = min .. max−1
 *   rows(T)          = max                       if T >= warmup
 *                    = first b with T < threshold[b], else max
 * where T = per-device non-pad tokens seen so far. Each stage then takes the same number of optimizer steps.
 * Base recipe: min 1, max 6 rows of 96 × 1024, 50B tokens over 8 GPUs: thresholds 416,666,667, 1.25e9, 2.5e9,
 * 4,166,666,667, 6.25e9 per device -> global batches 768, 1536, 2304, 3072, 3840, then 4608 sequences. */
#ifndef MB_SCHEDULE_H
#define MB_SCHEDULE_H

#include <stdint.h>

#include "common/error.h"

typedef enum mb_decay_shape { MB_DECAY_LINEAR, MB_DECAY_COSINE, MB_DECAY_ONE_MINUS_SQRT } mb_decay_shape;

/* Names as used in configs: "linear", "cosine", "one_minus_sqrt", indexed by mb_decay_shape; NULL-terminated. */
extern const char *const mb_decay_shape_names[];

#define MB_WARMUP_ALPHA_I 1e-10  /* Composer LinearScheduler(alpha_i=1e-10) used by the original warmup */

typedef struct mb_lr_schedule {
    int64_t total_tokens;    /* length of the phase; the decay window ends here */
    int64_t warmup_tokens;   /* 0 = no warmup */
    int64_t decay_tokens;    /* 0 = no decay (constant after warmup) */
    double alpha_i;          /* warmup start multiplier (MB_WARMUP_ALPHA_I) */
    double alpha_f;          /* final multiplier at total_tokens */
    mb_decay_shape shape;
} mb_lr_schedule;

/* Checks 0 <= warmup, 0 <= decay <= total, α in [0, 1], a known shape. */
int mb_lr_schedule_check(const mb_lr_schedule *schedule, mb_error *err);

/* The multiplier at `tokens` tokens seen in the phase (tokens < 0 counts as 0; past total it stays at α_f when a
 * decay is configured, 1 otherwise). */
double mb_lr_multiplier(const mb_lr_schedule *schedule, int64_t tokens);

typedef struct mb_batch_warmup {
    int min_rows, max_rows;  /* micro-batches per device at the start / after warmup */
    int64_t warmup_tokens;   /* per device: ceil(global warmup tokens / world size) */
    double steps_per_unit;   /* warmup_tokens / Σ_{b=min}^{max−1} b (0 when min == max) */
} mb_batch_warmup;

/* global_warmup_tokens = 0 or min_rows == max_rows disables the warmup (rows are always max_rows). */
int mb_batch_warmup_init(mb_batch_warmup *warmup, int min_rows, int max_rows, int64_t global_warmup_tokens,
                         int world_size, mb_error *err);

/* Per-device tokens at which batches of `rows` rows end (rows in [min_rows, max_rows − 1]); -1 otherwise. */
int64_t mb_batch_warmup_threshold(const mb_batch_warmup *warmup, int rows);

/* Rows (micro-batches) per device for the next batch, given per-device tokens seen so far. */
int mb_batch_warmup_rows(const mb_batch_warmup *warmup, int64_t tokens_seen);

#endif
