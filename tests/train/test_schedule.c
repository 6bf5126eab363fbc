/* LR multipliers and batch-size warmup against values computed independently (closed forms written here, and
 * thresholds from the original Python: math.ceil(ceil(W / world) / sum(range(min, max)) * cumsum)). */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "train/schedule.h"

static void assert_mult(const mb_lr_schedule *s, int64_t tokens, double want) {
    double got = mb_lr_multiplier(s, tokens);
    cr_assert(fabs(got - want) <= 1e-12 + 1e-12 * fabs(want), "t=%lld: got %.15g want %.15g", (long long)tokens, got,
              want);
}

Test(lr_schedule, base_phase1_warmup_then_constant) {
    mb_lr_schedule s = {.total_tokens = 1719000000000LL, .warmup_tokens = 3000000000LL, .decay_tokens = 0,
                        .alpha_i = MB_WARMUP_ALPHA_I, .alpha_f = 0.0, .shape = MB_DECAY_LINEAR};
    cr_assert_eq(mb_lr_schedule_check(&s, NULL), 0);
    assert_mult(&s, 0, 1e-10);
    assert_mult(&s, 1500000000LL, 1e-10 + 0.5 * (1 - 1e-10));
    assert_mult(&s, 300000000LL, 1e-10 + 0.1 * (1 - 1e-10));
    assert_mult(&s, 2999999999LL, 1e-10 + (2999999999.0 / 3e9) * (1 - 1e-10));
    assert_mult(&s, 3000000000LL, 1.0);
    assert_mult(&s, 900000000000LL, 1.0);
    assert_mult(&s, 1719000000000LL, 1.0);                  /* t_decay = 0: the decay branch is never reached */
    assert_mult(&s, 2000000000000LL, 1.0);
    cr_assert_eq(mb_lr_multiplier(&s, -5), 1e-10);
}

Test(lr_schedule, base_phase3_one_minus_sqrt_to_alpha_f) {
    const int64_t total = 50000000000LL;
    mb_lr_schedule s = {.total_tokens = total, .warmup_tokens = 0, .decay_tokens = total, .alpha_i = 0,
                        .alpha_f = 0.001, .shape = MB_DECAY_ONE_MINUS_SQRT};
    cr_assert_eq(mb_lr_schedule_check(&s, NULL), 0);
    assert_mult(&s, 0, 1.0);
    assert_mult(&s, total / 4, 0.001 + 0.999 * 0.5);         /* sqrt(1/4) = 1/2 */
    assert_mult(&s, 2000000000LL, 0.001 + 0.999 * 0.8);      /* sqrt(0.04) = 0.2 */
    assert_mult(&s, total * 9 / 25, 0.001 + 0.999 * 0.4);    /* sqrt(0.36) = 0.6 */
    assert_mult(&s, total, 0.001);
    assert_mult(&s, total + 12345, 0.001);                   /* clamped, = max(α_f, ...) in the spec */
    double previous = 2.0;
    for (int64_t t = 0; t <= total; t += total / 1000) {     /* monotone non-increasing */
        double m = mb_lr_multiplier(&s, t);
        cr_assert(m <= previous && m >= 0.001 - 1e-15);
        previous = m;
    }
}

Test(lr_schedule, constant) {
    mb_lr_schedule s = {.total_tokens = 250000000000LL, .alpha_i = MB_WARMUP_ALPHA_I, .alpha_f = 0.0};
    cr_assert_eq(mb_lr_schedule_check(&s, NULL), 0);
    assert_mult(&s, 0, 1.0);
    assert_mult(&s, 125000000000LL, 1.0);
    assert_mult(&s, 250000000000LL, 1.0);
}

Test(lr_schedule, wsd_decay_shapes) {
    mb_lr_schedule s = {.total_tokens = 1000, .warmup_tokens = 100, .decay_tokens = 200, .alpha_i = 0.0,
                        .alpha_f = 0.1};
    const double pi = 3.14159265358979323846;
    for (int shape = 0; shape < 3; shape++) {
        s.shape = (mb_decay_shape)shape;
        cr_assert_eq(mb_lr_schedule_check(&s, NULL), 0);
        assert_mult(&s, 50, 0.5);                            /* warmup from alpha_i = 0 */
        assert_mult(&s, 100, 1.0);
        assert_mult(&s, 799, 1.0);
        assert_mult(&s, 800, 1.0);                           /* decay starts at total - decay with x = 0 */
        assert_mult(&s, 1000, 0.1);
        assert_mult(&s, 5000, 0.1);
    }
    s.shape = MB_DECAY_LINEAR;
    assert_mult(&s, 850, 0.1 + 0.9 * 0.75);
    assert_mult(&s, 900, 0.55);
    s.shape = MB_DECAY_COSINE;                                /* (1 + cos πx)/2 = cos²(πx/2) */
    assert_mult(&s, 850, 0.1 + 0.9 * pow(cos(pi / 8), 2));
    assert_mult(&s, 900, 0.55);
    assert_mult(&s, 950, 0.1 + 0.9 * pow(cos(3 * pi / 8), 2));
    s.shape = MB_DECAY_ONE_MINUS_SQRT;
    assert_mult(&s, 850, 0.1 + 0.9 * 0.5);                   /* x = 1/4 */
    assert_mult(&s, 900, 0.1 + 0.9 * (1 - sqrt(0.5)));
    cr_assert_str_eq(mb_decay_shape_names[MB_DECAY_ONE_MINUS_SQRT], "one_minus_sqrt");
    cr_assert_str_eq(mb_decay_shape_names[MB_DECAY_COSINE], "cosine");
    cr_assert_null(mb_decay_shape_names[3]);
}

Test(lr_schedule, warmup_takes_precedence_over_an_overlapping_decay) {
    mb_lr_schedule s = {.total_tokens = 100, .warmup_tokens = 60, .decay_tokens = 100, .alpha_i = 0.0,
                        .alpha_f = 0.0, .shape = MB_DECAY_LINEAR};
    assert_mult(&s, 30, 0.5);
    assert_mult(&s, 60, 0.4);                                 /* first decay value after warmup: 1 - 60/100 */
}

Test(lr_schedule, invalid_settings) {
    mb_error err = {{0}};
    mb_lr_schedule s = {.total_tokens = 100, .decay_tokens = 200, .alpha_f = 0.1};
    cr_assert_eq(mb_lr_schedule_check(&s, &err), -1);
    cr_assert(strstr(err.message, "decay_tokens") != NULL, "%s", err.message);
    s.decay_tokens = 10;
    s.alpha_f = 1.5;
    cr_assert_eq(mb_lr_schedule_check(&s, &err), -1);
    cr_assert(strstr(err.message, "alpha_f") != NULL, "%s", err.message);
    s.alpha_f = 0.1;
    s.warmup_tokens = -1;
    cr_assert_eq(mb_lr_schedule_check(&s, &err), -1);
    s.warmup_tokens = 0;
    s.shape = (mb_decay_shape)7;
    cr_assert_eq(mb_lr_schedule_check(&s, &err), -1);
}

Test(batch_warmup, base_recipe_thresholds_and_boundaries) {
    mb_batch_warmup w;
    mb_error err = {{0}};
    cr_assert_eq(mb_batch_warmup_init(&w, 1, 6, 50000000000LL, 8, &err), 0, "%s", err.message);
    cr_assert_eq(w.warmup_tokens, 6250000000LL);
    /* Python: [math.ceil(6.25e9 / 15 * c) for c in (1, 3, 6, 10, 15)] */
    const int64_t want[5] = {416666667LL, 1250000000LL, 2500000000LL, 4166666667LL, 6250000000LL};
    for (int rows = 1; rows <= 5; rows++) cr_assert_eq(mb_batch_warmup_threshold(&w, rows), want[rows - 1]);
    cr_assert_eq(mb_batch_warmup_threshold(&w, 6), -1);
    cr_assert_eq(mb_batch_warmup_threshold(&w, 0), -1);
    /* At every threshold the batch grows by one row; global batch = rows x 96 seqs x 8 GPUs. */
    const int64_t micro = 96, gpus = 8;
    cr_assert_eq(mb_batch_warmup_rows(&w, 0), 1);
    cr_assert_eq(mb_batch_warmup_rows(&w, 0) * micro * gpus, 768);
    int64_t previous = 0;
    for (int rows = 1; rows <= 5; rows++) {
        cr_assert_eq(mb_batch_warmup_rows(&w, previous), rows);
        cr_assert_eq(mb_batch_warmup_rows(&w, want[rows - 1] - 1), rows);
        cr_assert_eq(mb_batch_warmup_rows(&w, want[rows - 1]), rows + 1);
        previous = want[rows - 1];
    }
    cr_assert_eq(mb_batch_warmup_rows(&w, 6249999999LL) * micro * gpus, 3840);
    cr_assert_eq(mb_batch_warmup_rows(&w, 6250000000LL) * micro * gpus, 4608);
    cr_assert_eq(mb_batch_warmup_rows(&w, 1000000000000LL), 6);
    /* Each stage lasts the same number of optimizer steps: tokens in stage / tokens per step ∝ b / b. */
    const double tokens_per_row = 96.0 * 1024.0;
    double steps_first = (double)want[0] / (1 * tokens_per_row);
    for (int rows = 2; rows <= 5; rows++) {
        double steps = (double)(want[rows - 1] - want[rows - 2]) / (rows * tokens_per_row);
        cr_assert(fabs(steps - steps_first) < 1e-3 * steps_first, "stage %d: %g vs %g steps", rows, steps,
                  steps_first);
    }
    cr_assert(fabs(steps_first - 4238.9) < 1.0, "spec: about 4,239 steps per stage, got %g", steps_first);
}

Test(batch_warmup, large_recipe_and_uneven_world) {
    mb_batch_warmup w;
    cr_assert_eq(mb_batch_warmup_init(&w, 1, 11, 10000000000LL, 8, NULL), 0);
    /* Python: math.ceil(1.25e9 / 55 * c), c = 1, 3, 6, ..., 55 */
    const int64_t want[10] = {22727273LL,  68181819LL,  136363637LL, 227272728LL, 340909091LL,
                              477272728LL, 636363637LL, 818181819LL, 1022727273LL, 1250000000LL};
    for (int rows = 1; rows <= 10; rows++) {
        cr_assert_eq(mb_batch_warmup_threshold(&w, rows), want[rows - 1], "rows %d", rows);
        cr_assert_eq(mb_batch_warmup_rows(&w, want[rows - 1] - 1), rows);
        cr_assert_eq(mb_batch_warmup_rows(&w, want[rows - 1]), rows + 1);
    }
    /* ceil(1_000_003 / 3) = 333335; Python thresholds for min 3, max 7: [55556, 129631, 222224, 333335] */
    cr_assert_eq(mb_batch_warmup_init(&w, 3, 7, 1000003, 3, NULL), 0);
    cr_assert_eq(w.warmup_tokens, 333335);
    const int64_t uneven[4] = {55556, 129631, 222224, 333335};
    for (int rows = 3; rows <= 6; rows++) cr_assert_eq(mb_batch_warmup_threshold(&w, rows), uneven[rows - 3]);
    cr_assert_eq(mb_batch_warmup_rows(&w, 0), 3);
    cr_assert_eq(mb_batch_warmup_rows(&w, 55555), 3);
    cr_assert_eq(mb_batch_warmup_rows(&w, 55556), 4);
    cr_assert_eq(mb_batch_warmup_rows(&w, 333334), 6);
    cr_assert_eq(mb_batch_warmup_rows(&w, 333335), 7);
}

Test(batch_warmup, disabled_and_invalid) {
    mb_batch_warmup w;
    mb_error err = {{0}};
    cr_assert_eq(mb_batch_warmup_init(&w, 6, 6, 50000000000LL, 8, &err), 0);
    cr_assert_eq(mb_batch_warmup_rows(&w, 0), 6);
    cr_assert_eq(mb_batch_warmup_init(&w, 1, 6, 0, 1, &err), 0);
    cr_assert_eq(mb_batch_warmup_rows(&w, 0), 6);
    cr_assert_eq(mb_batch_warmup_init(&w, 0, 6, 100, 1, &err), -1);
    cr_assert_eq(mb_batch_warmup_init(&w, 7, 6, 100, 1, &err), -1);
    cr_assert(strstr(err.message, "min_rows") != NULL, "%s", err.message);
    cr_assert_eq(mb_batch_warmup_init(&w, 1, 6, 100, 0, &err), -1);
    cr_assert_eq(mb_batch_warmup_init(&w, 1, 6, -1, 1, &err), -1);
}
