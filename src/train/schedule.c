/* Token-driven learning-rate multipliers (warmup-stable-decay with linear / cosine / 1−sqrt decay) and the
 * batch-size warmup of the original sequence packer. Formulas in schedule.h; arithmetic in double as the Python
 * originals do, so thresholds match them exactly. */
#include "train/schedule.h"

#include <math.h>
#include <stddef.h>

const char *const mb_decay_shape_names[] = {"linear", "cosine", "one_minus_sqrt", NULL};

int mb_lr_schedule_check(const mb_lr_schedule *s, mb_error *err) {
    if (s->total_tokens < 0) return mb_fail(err, "lr schedule: total_tokens must be >= 0, got %lld",
                                            (long long)s->total_tokens);
    if (s->warmup_tokens < 0) return mb_fail(err, "lr schedule: warmup_tokens must be >= 0, got %lld",
                                             (long long)s->warmup_tokens);
    if (s->decay_tokens < 0 || s->decay_tokens > s->total_tokens)
        return mb_fail(err, "lr schedule: decay_tokens must be in [0, total_tokens = %lld], got %lld",
                       (long long)s->total_tokens, (long long)s->decay_tokens);
    if (!(s->alpha_i >= 0.0 && s->alpha_i <= 1.0)) return mb_fail(err, "lr schedule: alpha_i must be in [0, 1], "
                                                                   "got %g", s->alpha_i);
    if (!(s->alpha_f >= 0.0 && s->alpha_f <= 1.0)) return mb_fail(err, "lr schedule: alpha_f must be in [0, 1], "
                                                                   "got %g", s->alpha_f);
    if (s->shape != MB_DECAY_LINEAR && s->shape != MB_DECAY_COSINE && s->shape != MB_DECAY_ONE_MINUS_SQRT)
        return mb_fail(err, "lr schedule: unknown decay shape %d", (int)s->shape);
    return 0;
}

static double decay_curve(mb_decay_shape shape, double x) {
    switch (shape) {
    case MB_DECAY_LINEAR: return 1.0 - x;
    case MB_DECAY_COSINE: return (1.0 + cos(M_PI * x)) / 2.0;
    case MB_DECAY_ONE_MINUS_SQRT: return 1.0 - sqrt(x);
    }
    return 1.0;
}

double mb_lr_multiplier(const mb_lr_schedule *s, int64_t tokens) {
    if (tokens < 0) tokens = 0;
    if (tokens < s->warmup_tokens) {
        double fraction = (double)tokens / (double)s->warmup_tokens;
        return s->alpha_i + fraction * (1.0 - s->alpha_i);
    }
    int64_t decay_start = s->total_tokens - s->decay_tokens;
    if (s->decay_tokens <= 0 || tokens < decay_start) return 1.0;
    double x = (double)(tokens - decay_start) / (double)s->decay_tokens;
    if (x > 1.0) x = 1.0;
    return s->alpha_f + (1.0 - s->alpha_f) * decay_curve(s->shape, x);
}

int mb_batch_warmup_init(mb_batch_warmup *w, int min_rows, int max_rows, int64_t global_warmup_tokens,
                         int world_size, mb_error *err) {
    if (min_rows < 1 || max_rows < min_rows)
        return mb_fail(err, "batch warmup: need 1 <= min_rows <= max_rows, got %d and %d", min_rows, max_rows);
    if (world_size < 1) return mb_fail(err, "batch warmup: world_size must be >= 1, got %d", world_size);
    if (global_warmup_tokens < 0)
        return mb_fail(err, "batch warmup: warmup tokens must be >= 0, got %lld", (long long)global_warmup_tokens);
    w->min_rows = min_rows;
    w->max_rows = max_rows;
    /* math.ceil(tokens / world_size) in the original: a double division, exact for counts below 2^53. */
    w->warmup_tokens = (int64_t)ceil((double)global_warmup_tokens / (double)world_size);
    int64_t unit_sum = 0;                                    /* sum(range(min, max)) */
    for (int b = min_rows; b < max_rows; b++) unit_sum += b;
    w->steps_per_unit = unit_sum > 0 ? (double)w->warmup_tokens / (double)unit_sum : 0.0;
    return 0;
}

int64_t mb_batch_warmup_threshold(const mb_batch_warmup *w, int rows) {
    if (rows < w->min_rows || rows >= w->max_rows) return -1;
    int64_t cumulative = 0;
    for (int b = w->min_rows; b <= rows; b++) cumulative += b;
    return (int64_t)ceil(w->steps_per_unit * (double)cumulative);
}

int mb_batch_warmup_rows(const mb_batch_warmup *w, int64_t tokens_seen) {
    if (tokens_seen >= w->warmup_tokens) return w->max_rows;
    int64_t cumulative = 0;
    for (int b = w->min_rows; b < w->max_rows; b++) {
        cumulative += b;
        if (tokens_seen < (int64_t)ceil(w->steps_per_unit * (double)cumulative)) return b;
    }
    return w->max_rows;
}
