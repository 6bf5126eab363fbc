/* The shipped run configurations parse and carry the paper's recipe; the effective config round-trips. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/backend.h"
#include "model/config.h"
#include "train/run_config.h"
#include "train/schedule.h"

static mb_run_config *load(const char *name, char *const *overrides, int count) {
    static mb_run_config config;
    char path[512];
    snprintf(path, sizeof path, "%s/configs/%s", MB_SOURCE_DIR, name);
    mb_error err;
    cr_assert_eq(mb_run_config_load(&config, path, overrides, count, &err), 0, "%s", err.message);
    return &config;
}

Test(run_config, base_recipe_has_the_three_phases) {
    mb_run_config *c = load("modernbert-base.yaml", NULL, 0);
    cr_assert_eq(c->phase_count, 3);
    cr_assert_eq(c->phases[0].tokens, 1719000000000LL);
    cr_assert_eq(c->phases[0].seq_len, 1024);
    cr_assert_float_eq(c->phases[0].global_rope_theta, 10000.0, 1e-9);
    cr_assert_eq(c->phases[0].batch_tokens, 4608LL * 1024);
    cr_assert_eq(c->phases[0].batch_warmup_tokens, 50000000000LL);
    cr_assert_eq(c->phases[1].tokens, 250000000000LL);
    cr_assert_eq(c->phases[1].seq_len, 8192);
    cr_assert_float_eq(c->phases[1].global_rope_theta, 160000.0, 1e-9);
    cr_assert_eq(c->phases[2].tokens, 50000000000LL);
    cr_assert_eq(c->phases[2].decay_shape, MB_DECAY_ONE_MINUS_SQRT);
    cr_assert_float_eq(c->phases[2].final_lr_fraction, 0.001, 1e-12);
}

Test(run_config, large_and_tiny_parse) {
    mb_run_config *c = load("modernbert-large.yaml", NULL, 0);
    cr_assert_eq(c->phases[3].batch_tokens % c->phases[3].micro_batch_tokens, 0);
    c = load("tiny.yaml", NULL, 0);
    cr_assert_geq(c->phase_count, 2);
}

Test(run_config, overrides_apply_and_dump_round_trips) {
    char *overrides[] = {"phases.1.lr=2e-4", "run.output_dir=/tmp/x"};
    mb_run_config *c = load("tiny.yaml", overrides, 2);
    cr_assert_float_eq(c->phases[1].lr, 2e-4, 1e-15);
    cr_assert_str_eq(c->run.output_dir, "/tmp/x");
    mb_error err;
    uint64_t hash_a, hash_b;
    cr_assert_eq(mb_cfg_hash(mb_run_config_schema, c, &hash_a, &err), 0);
    c->phases[1].lr = 3e-4;
    cr_assert_eq(mb_cfg_hash(mb_run_config_schema, c, &hash_b, &err), 0);
    cr_assert_neq(hash_a, hash_b);
}

/* run.recompute: none by default, the three level names parse to mb_recompute in order, anything else is refused
 * with the key named; the CPU backend (which keeps every activation) takes any valid level and refuses others. */
Test(run_config, recompute_levels) {
    mb_run_config *c = load("tiny.yaml", NULL, 0);
    cr_assert_eq(c->run.recompute, MB_RECOMPUTE_NONE);
    static const char *names[] = {"none", "norms", "mlp"};
    for (int k = 0; k < 3; k++) {
        char override[64];
        snprintf(override, sizeof override, "run.recompute=%s", names[k]);
        char *overrides[] = {override};
        c = load("tiny.yaml", overrides, 1);
        cr_assert_eq(c->run.recompute, k, "%s parsed as %d", names[k], c->run.recompute);
        mb_recompute level;
        cr_assert_eq(mb_recompute_from_name(names[k], &level), 0);
        cr_assert_eq((int)level, k);
        cr_assert_str_eq(mb_recompute_name(level), names[k]);
    }
    mb_recompute level;
    cr_assert_eq(mb_recompute_from_name("all", &level), -1);
    static mb_run_config bad;
    char path[512];
    snprintf(path, sizeof path, "%s/configs/tiny.yaml", MB_SOURCE_DIR);
    char *overrides[] = {"run.recompute=everything"};
    mb_error err = {{0}};
    cr_assert_eq(mb_run_config_load(&bad, path, overrides, 1, &err), -1, "an unknown level must be refused");
    cr_assert(strstr(err.message, "run.recompute") != NULL, "the error names the key: %s", err.message);

    mb_config model;
    cr_assert_eq(mb_config_preset(&model, "tiny", &err), 0, "%s", err.message);
    mb_backend *cpu = NULL;
    cr_assert_eq(mb_backend_create_cpu(&cpu, &model, &err), 0, "%s", err.message);
    cr_assert_eq(mb_backend_set_recompute(cpu, MB_RECOMPUTE_MLP, &err), 0, "%s", err.message);
    cr_assert_eq(mb_backend_set_recompute(cpu, (mb_recompute)3, &err), -1, "level 3 must be refused");
    cr_assert(strstr(err.message, "recompute") != NULL, "%s", err.message);
    mb_backend_destroy(cpu);
}
