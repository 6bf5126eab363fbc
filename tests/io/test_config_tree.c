/* Config tree, overrides, schema reader, dump and hash, on a realistic trainer-like schema (nested maps, a list of
 * phase maps, a list of floats, enums, token counts). Expected source positions are found by searching the YAML
 * text here, independently of the parser. */
#include <criterion/criterion.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/config_tree.h"

/* ---- The example schema ------------------------------------------------------------------------------------------ */

static const char *const preset_names[] = {"tiny", "base", "large", NULL};
static const char *const scheduler_names[] = {"constant", "warmup_stable_decay", NULL};
static const char *const shape_names[] = {"linear", "cosine", "one_minus_sqrt", NULL};

typedef struct phase_cfg {
    char name[32];
    int64_t tokens;
    int max_seq_len;
    double lr, weight_decay;
    int scheduler, decay_shape;
    int64_t t_warmup, t_decay;
    double alpha_f;
    int global_batch;
    int64_t batch_warmup_tokens;
    int batch_warmup_min;
    double rope_global_theta;
} phase_cfg;

typedef struct run_cfg {
    char name[64];
    int64_t seed;
    bool deterministic;
    int preset, hidden_size, num_layers;
    double attn_out_dropout;
    char train[256];
    double betas[2];
    int n_betas;
    double eps;
    phase_cfg phases[4];
    int n_phases;
} run_cfg;

#define PHASE(member) .offset = offsetof(phase_cfg, member)
#define RUN(member) .offset = offsetof(run_cfg, member)

static const mb_cfg_field phase_fields[] = {
    {.path = "name", .type = MB_CFG_STRING, PHASE(name), .size = sizeof(((phase_cfg *)0)->name),
     .flags = MB_CFG_REQUIRED},
    {.path = "tokens", .type = MB_CFG_TOKENS, PHASE(tokens), .min = "1", .flags = MB_CFG_REQUIRED},
    {.path = "max_seq_len", .type = MB_CFG_INT, PHASE(max_seq_len), .default_value = "1024", .min = "16",
     .max = "65536"},
    {.path = "lr", .type = MB_CFG_FLOAT, PHASE(lr), .min = "0", .max = "1",
     .flags = MB_CFG_REQUIRED | MB_CFG_MIN_EXCLUSIVE},
    {.path = "weight_decay", .type = MB_CFG_FLOAT, PHASE(weight_decay), .default_value = "1e-5", .min = "0"},
    {.path = "scheduler.name", .type = MB_CFG_ENUM, PHASE(scheduler), .default_value = "constant",
     .enum_names = scheduler_names},
    {.path = "scheduler.t_warmup", .type = MB_CFG_TOKENS, PHASE(t_warmup), .default_value = "0"},
    {.path = "scheduler.t_decay", .type = MB_CFG_TOKENS, PHASE(t_decay), .default_value = "0tok"},
    {.path = "scheduler.alpha_f", .type = MB_CFG_FLOAT, PHASE(alpha_f), .default_value = "0.0", .min = "0",
     .max = "1"},
    {.path = "scheduler.decay_shape", .type = MB_CFG_ENUM, PHASE(decay_shape), .default_value = "linear",
     .enum_names = shape_names},
    {.path = "global_batch", .type = MB_CFG_INT, PHASE(global_batch), .default_value = "576", .min = "1"},
    {.path = "batch_warmup.tokens", .type = MB_CFG_TOKENS, PHASE(batch_warmup_tokens), .default_value = "0"},
    {.path = "batch_warmup.min_batch", .type = MB_CFG_INT, PHASE(batch_warmup_min), .min = "0"},
    {.path = "rope.global_theta", .type = MB_CFG_FLOAT, PHASE(rope_global_theta), .default_value = "10000.0",
     .min = "0", .flags = MB_CFG_MIN_EXCLUSIVE},
    MB_CFG_END,
};

static const mb_cfg_field beta_fields[] = {
    {.path = "", .type = MB_CFG_FLOAT, .offset = 0, .min = "0", .max = "1", .flags = MB_CFG_MAX_EXCLUSIVE},
    MB_CFG_END,
};

static const mb_cfg_field run_schema[] = {
    {.path = "name", .type = MB_CFG_STRING, RUN(name), .size = sizeof(((run_cfg *)0)->name),
     .flags = MB_CFG_REQUIRED, .help = "run name"},
    {.path = "seed", .type = MB_CFG_INT64, RUN(seed), .default_value = "17"},
    {.path = "deterministic", .type = MB_CFG_BOOL, RUN(deterministic), .default_value = "true"},
    {.path = "model.preset", .type = MB_CFG_ENUM, RUN(preset), .enum_names = preset_names,
     .flags = MB_CFG_REQUIRED},
    {.path = "model.hidden_size", .type = MB_CFG_INT, RUN(hidden_size), .default_value = "768", .min = "64"},
    {.path = "model.num_layers", .type = MB_CFG_INT, RUN(num_layers), .default_value = "22", .min = "1",
     .max = "128"},
    {.path = "model.attn_out_dropout", .type = MB_CFG_FLOAT, RUN(attn_out_dropout), .default_value = "0.1",
     .min = "0", .max = "1", .flags = MB_CFG_MAX_EXCLUSIVE},
    {.path = "data.train", .type = MB_CFG_STRING, RUN(train), .size = sizeof(((run_cfg *)0)->train),
     .flags = MB_CFG_REQUIRED},
    {.path = "optimizer.betas", .type = MB_CFG_LIST, RUN(betas), .size = sizeof(double), .capacity = 2,
     .count_offset = offsetof(run_cfg, n_betas), .fields = beta_fields, .min = "2", .max = "2",
     .default_value = "[0.9, 0.98]"},
    {.path = "optimizer.eps", .type = MB_CFG_FLOAT, RUN(eps), .default_value = "1e-6", .min = "0",
     .flags = MB_CFG_MIN_EXCLUSIVE},
    {.path = "phases", .type = MB_CFG_LIST, RUN(phases), .size = sizeof(phase_cfg), .capacity = 4,
     .count_offset = offsetof(run_cfg, n_phases), .fields = phase_fields, .min = "1", .flags = MB_CFG_REQUIRED},
    MB_CFG_END,
};

/* The base recipe, written the way a user would. */
static const char BASE_YAML[] =
    "# ModernBERT-base, three phases\n"
    "name: base-recipe\n"
    "seed: 17\n"
    "model:\n"
    "  preset: base\n"
    "data:\n"
    "  train: \"data/pretrain/*.zst\"\n"
    "optimizer:\n"
    "  betas: [0.9, 0.98]\n"
    "  eps: 1e-6\n"
    "phases:\n"
    "  - name: pretrain\n"
    "    tokens: 1_719_000_000_000tok\n"
    "    lr: 8e-4\n"
    "    scheduler:\n"
    "      name: warmup_stable_decay\n"
    "      t_warmup: 3B\n"
    "    batch_warmup: {tokens: 50B, min_batch: 768}\n"
    "    global_batch: 4608\n"
    "  - name: context_extension\n"
    "    tokens: 250B\n"
    "    max_seq_len: 8192\n"
    "    lr: 3.0e-4\n"
    "    rope: {global_theta: 160000}\n"
    "  - name: decay\n"
    "    tokens: 5e10\n"
    "    max_seq_len: 8192\n"
    "    lr: 3e-4\n"
    "    scheduler: {name: warmup_stable_decay, t_decay: 50_000_000_000, alpha_f: 0.001,\n"
    "                decay_shape: one_minus_sqrt}\n";

/* ---- Helpers ----------------------------------------------------------------------------------------------------- */

static char temp_paths[16][64];
static int n_temp;

static const char *write_temp(const char *text) {
    char *path = temp_paths[n_temp++];
    snprintf(path, sizeof temp_paths[0], "/tmp/mb_cfg_test_XXXXXX");
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    size_t length = strlen(text);
    cr_assert_eq(write(fd, text, length), (ssize_t)length);
    close(fd);
    return path;
}

static void remove_temps(void) {
    for (int i = 0; i < n_temp; i++) unlink(temp_paths[i]);
    n_temp = 0;
}

/* 1-based line and column of the first occurrence of needle in text. */
static void locate(const char *text, const char *needle, int *line, int *column) {
    const char *hit = strstr(text, needle);
    cr_assert_not_null(hit, "test bug: '%s' not in text", needle);
    *line = 1;
    const char *line_start = text;
    for (const char *p = text; p < hit; p++)
        if (*p == '\n') {
            (*line)++;
            line_start = p + 1;
        }
    *column = (int)(hit - line_start) + 1;
}

/* Replaces the first `from` in BASE_YAML by `to`. */
static char *edited_base(const char *from, const char *to) {
    const char *hit = strstr(BASE_YAML, from);
    cr_assert_not_null(hit, "test bug: '%s' not in the base yaml", from);
    size_t size = strlen(BASE_YAML) - strlen(from) + strlen(to) + 1;
    char *text = malloc(size);
    snprintf(text, size, "%.*s%s%s", (int)(hit - BASE_YAML), BASE_YAML, to, hit + strlen(from));
    return text;
}

/* Loads text from a temp file, applies overrides and reads the schema; returns the rc and fills err / cfg. */
static int load_and_read(const char *text, const char *const *overrides, run_cfg *cfg, mb_error *err,
                         const char **path_out) {
    const char *path = write_temp(text);
    if (path_out) *path_out = path;
    mb_cfg_tree tree;
    int rc = mb_cfg_tree_load(&tree, path, err);
    for (int i = 0; rc == 0 && overrides && overrides[i]; i++) rc = mb_cfg_tree_override(&tree, overrides[i], err);
    if (rc == 0) rc = mb_cfg_read(&tree, run_schema, cfg, err);
    mb_cfg_tree_free(&tree);
    return rc;
}

static void expect_error(const char *text, const char *const *overrides, const char *want_substring) {
    run_cfg cfg;
    mb_error err = {{0}};
    cr_assert_eq(load_and_read(text, overrides, &cfg, &err, NULL), -1, "expected failure containing '%s'",
                 want_substring);
    cr_assert(strstr(err.message, want_substring) != NULL, "message '%s' lacks '%s'", err.message, want_substring);
}

TestSuite(config_tree, .fini = remove_temps);

/* ---- Reading ----------------------------------------------------------------------------------------------------- */

Test(config_tree, reads_base_recipe_with_defaults) {
    run_cfg cfg;
    memset(&cfg, 0xAB, sizeof cfg);                           /* the reader must write every field */
    mb_error err = {{0}};
    cr_assert_eq(load_and_read(BASE_YAML, NULL, &cfg, &err, NULL), 0, "%s", err.message);
    cr_assert_str_eq(cfg.name, "base-recipe");
    cr_assert_eq(cfg.seed, 17);
    cr_assert(cfg.deterministic);
    cr_assert_eq(cfg.preset, 1);
    cr_assert_eq(cfg.hidden_size, 768);
    cr_assert_eq(cfg.num_layers, 22);
    cr_assert_eq(cfg.attn_out_dropout, 0.1);
    cr_assert_str_eq(cfg.train, "data/pretrain/*.zst");
    cr_assert_eq(cfg.n_betas, 2);
    cr_assert_eq(cfg.betas[0], 0.9);
    cr_assert_eq(cfg.betas[1], 0.98);
    cr_assert_eq(cfg.eps, 1e-6);
    cr_assert_eq(cfg.n_phases, 3);
    const phase_cfg *p = cfg.phases;
    cr_assert_str_eq(p[0].name, "pretrain");
    cr_assert_eq(p[0].tokens, 1719000000000LL);
    cr_assert_eq(p[0].max_seq_len, 1024);
    cr_assert_eq(p[0].lr, 8e-4);
    cr_assert_eq(p[0].weight_decay, 1e-5);
    cr_assert_eq(p[0].scheduler, 1);
    cr_assert_eq(p[0].t_warmup, 3000000000LL);
    cr_assert_eq(p[0].t_decay, 0);
    cr_assert_eq(p[0].decay_shape, 0);
    cr_assert_eq(p[0].global_batch, 4608);
    cr_assert_eq(p[0].batch_warmup_tokens, 50000000000LL);
    cr_assert_eq(p[0].batch_warmup_min, 768);
    cr_assert_eq(p[0].rope_global_theta, 10000.0);
    cr_assert_eq(p[1].tokens, 250000000000LL);
    cr_assert_eq(p[1].max_seq_len, 8192);
    cr_assert_eq(p[1].lr, 3e-4);
    cr_assert_eq(p[1].scheduler, 0);
    cr_assert_eq(p[1].global_batch, 576);
    cr_assert_eq(p[1].batch_warmup_min, 0);                   /* no default: zero */
    cr_assert_eq(p[1].rope_global_theta, 160000.0);
    cr_assert_eq(p[2].tokens, 50000000000LL);
    cr_assert_eq(p[2].t_decay, 50000000000LL);
    cr_assert_eq(p[2].alpha_f, 0.001);
    cr_assert_eq(p[2].decay_shape, 2);
    for (int i = 3; i < 4; i++) cr_assert_eq(p[i].tokens, 0, "unused list slots are zeroed");
}

Test(config_tree, token_count_syntax) {
    static const struct { const char *text; int64_t value; } good[] = {
        {"1_719_000_000_000", 1719000000000LL}, {"1.719e12", 1719000000000LL}, {"1719B", 1719000000000LL},
        {"1.719T", 1719000000000LL}, {"3B", 3000000000LL}, {"50M", 50000000LL}, {"50_000_000tok", 50000000LL},
        {"3Btok", 3000000000LL}, {"2k", 2000}, {"0", 0}, {"0tok", 0}, {"1.5K", 1500}, {"0.5M", 500000},
        {"12", 12}, {"1e0", 1}, {"250e+9", 250000000000LL}, {"1.2500000000000000000000e3", 1250},
        {"9223372036854775807", INT64_MAX}, {"9.2T", 9200000000000LL}, {"1000e-3", 1}};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        int64_t v = -1;
        mb_error err = {{0}};
        cr_assert_eq(mb_cfg_parse_tokens(good[i].text, &v, &err), 0, "%s: %s", good[i].text, err.message);
        cr_assert_eq(v, good[i].value, "%s -> %lld", good[i].text, (long long)v);
    }
    static const char *const bad[] = {"1.5", "4000ba", "-3B", "3BB", "1e30", "1__000", "_1", "1_", "9.3e18",
                                      "1.2345K", "B", "", "3 B", "0x10", "1e", "1.", ".5B", "3Gtok", "2ep",
                                      "9223372036854775808", "1e-3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t v = 0;
        mb_error err = {{0}};
        cr_assert_eq(mb_cfg_parse_tokens(bad[i], &v, &err), -1, "'%s' must be rejected (got %lld)", bad[i],
                     (long long)v);
        cr_assert(strstr(err.message, "token count") != NULL, "%s", err.message);
    }
}

Test(config_tree, scalar_parsers) {
    int64_t i = 0;
    double f = 0;
    cr_assert_eq(mb_cfg_parse_int64("-1_000", &i, NULL), 0);
    cr_assert_eq(i, -1000);
    cr_assert_eq(mb_cfg_parse_int64("-9223372036854775808", &i, NULL), 0);
    cr_assert_eq(i, INT64_MIN);
    cr_assert_eq(mb_cfg_parse_int64("9223372036854775808", &i, NULL), -1);
    cr_assert_eq(mb_cfg_parse_int64("1.0", &i, NULL), -1);
    cr_assert_eq(mb_cfg_parse_int64("3B", &i, NULL), -1);
    cr_assert_eq(mb_cfg_parse_float("8.0e-4", &f, NULL), 0);
    cr_assert_eq(f, 8e-4);
    cr_assert_eq(mb_cfg_parse_float(".5", &f, NULL), 0);
    cr_assert_eq(f, 0.5);
    static const char *const bad_floats[] = {"inf", "nan", ".inf", "0x1p3", "1e400", " 1", "1,5", "fast", "-", "e5"};
    for (size_t k = 0; k < sizeof bad_floats / sizeof bad_floats[0]; k++)
        cr_assert_eq(mb_cfg_parse_float(bad_floats[k], &f, NULL), -1, "'%s'", bad_floats[k]);
}

Test(config_tree, wrong_type_names_file_line_column_and_path) {
    char *text = edited_base("lr: 3.0e-4", "lr: fast");
    int line, column;
    locate(text, "fast", &line, &column);
    run_cfg cfg;
    mb_error err = {{0}};
    const char *path = NULL;
    cr_assert_eq(load_and_read(text, NULL, &cfg, &err, &path), -1);
    char want[512];
    snprintf(want, sizeof want, "%s:%d:%d: phases[1].lr: expected a number, got 'fast'", path, line, column);
    cr_assert_str_eq(err.message, want);
    free(text);
}

Test(config_tree, unknown_keys_are_rejected_with_known_keys_listed) {
    char *text = edited_base("  eps: 1e-6\n", "  eps: 1e-6\n  lrr: 0.1\n");
    int line, column;
    locate(text, "lrr", &line, &column);
    run_cfg cfg;
    mb_error err = {{0}};
    const char *path = NULL;
    cr_assert_eq(load_and_read(text, NULL, &cfg, &err, &path), -1);
    char want[512];
    snprintf(want, sizeof want, "%s:%d:%d: optimizer.lrr: unknown key (known keys here: betas, eps)", path, line,
             column);
    cr_assert_str_eq(err.message, want);
    free(text);
    text = edited_base("      t_warmup: 3B\n", "      t_warmup: 3B\n      warmup: 3B\n");
    expect_error(text, NULL, "phases[0].scheduler.warmup: unknown key (known keys here: name, t_warmup, t_decay, "
                             "alpha_f, decay_shape)");
    free(text);
    text = edited_base("seed: 17\n", "seed: 17\nmodel.preset: base\n");   /* dotted keys are not expanded */
    expect_error(text, NULL, "model.preset: unknown key");
    free(text);
}

Test(config_tree, missing_required_key_points_at_the_enclosing_map) {
    char *text = edited_base("    lr: 3e-4\n", "");
    int line, column;
    locate(text, "name: decay", &line, &column);
    run_cfg cfg;
    mb_error err = {{0}};
    const char *path = NULL;
    cr_assert_eq(load_and_read(text, NULL, &cfg, &err, &path), -1);
    char want[512];
    snprintf(want, sizeof want, "%s:%d:%d: phases[2].lr: missing required key", path, line, column);
    cr_assert_str_eq(err.message, want);
    free(text);
    text = edited_base("data:\n  train: \"data/pretrain/*.zst\"\n", "");
    expect_error(text, NULL, "data.train: missing required key");
    free(text);
}

Test(config_tree, impossible_values_are_rejected) {
    char *text = edited_base("lr: 8e-4", "lr: 2");
    expect_error(text, NULL, "phases[0].lr: must be <= 1, got '2'");
    free(text);
    text = edited_base("lr: 8e-4", "lr: 0");
    expect_error(text, NULL, "phases[0].lr: must be > 0, got '0'");
    free(text);
    text = edited_base("max_seq_len: 8192", "max_seq_len: 8");
    expect_error(text, NULL, "phases[1].max_seq_len: must be >= 16, got '8'");
    free(text);
    text = edited_base("betas: [0.9, 0.98]", "betas: [0.9, 1.0]");
    expect_error(text, NULL, "optimizer.betas[1]: must be < 1, got '1.0'");
    free(text);
    text = edited_base("betas: [0.9, 0.98]", "betas: [0.9]");
    expect_error(text, NULL, "optimizer.betas: number of entries must be >= 2, got 1");
    free(text);
    text = edited_base("tokens: 250B", "tokens: 0");
    expect_error(text, NULL, "phases[1].tokens: must be >= 1, got '0'");
    free(text);
    text = edited_base("global_batch: 4608", "global_batch: 3000000000");
    expect_error(text, NULL, "phases[0].global_batch: integer out of range");
    free(text);
    text = edited_base("tokens: 250B", "tokens: 2.5ep");
    expect_error(text, NULL, "phases[1].tokens: expected a token count");
    free(text);
    text = edited_base("decay_shape: one_minus_sqrt", "decay_shape: sqrt");
    expect_error(text, NULL, "phases[2].scheduler.decay_shape: expected one of linear, cosine, one_minus_sqrt; got "
                             "'sqrt'");
    free(text);
    text = edited_base("seed: 17\n", "seed: 17\ndeterministic: yes\n");
    expect_error(text, NULL, "deterministic: expected true or false, got 'yes'");
    free(text);
    text = edited_base("name: base-recipe", "name: a-name-that-is-far-too-long-for-the-sixty-four-byte-buffer-of-the-"
                                            "run-config");
    expect_error(text, NULL, "name: text longer than 63 characters");
    free(text);
}

Test(config_tree, wrong_node_kinds) {
    char *text = edited_base("  preset: base\n", "  preset: [base]\n");
    expect_error(text, NULL, "model.preset: expected a name, got a list");
    free(text);
    text = edited_base("model:\n  preset: base\n", "model: base\n");
    expect_error(text, NULL, "model: expected a map, got a scalar");
    free(text);
    text = edited_base("phases:\n", "phases: 3\nunused:\n");
    expect_error(text, NULL, "unused: unknown key");
    free(text);
    expect_error("name: x\nmodel: {preset: tiny}\ndata: {train: t}\nphases: 3\n", NULL,
                 "phases: expected a list, got a scalar");
    expect_error("name: x\nmodel: {preset: tiny}\ndata: {train: t}\nphases: [3]\n", NULL,
                 "phases[0]: expected a map, got a scalar");
    expect_error("name: x\nmodel: {preset: tiny}\ndata: {train: t}\nphases: []\n", NULL,
                 "phases: number of entries must be >= 1, got 0");
    expect_error("name: x\nmodel: {preset: tiny}\ndata: {train: t}\nphases: [{name: a, tokens: 1, lr: 0.1}, {name: b,"
                 " tokens: 1, lr: 0.1}, {name: c, tokens: 1, lr: 0.1}, {name: d, tokens: 1, lr: 0.1}, {name: e, "
                 "tokens: 1, lr: 0.1}]\n", NULL, "phases: at most 4 entries are supported, got 5");
}

Test(config_tree, yaml_level_errors) {
    expect_error("name: x\n  bad indent: [\n", NULL, "YAML error");
    int line, column;
    const char *dup = "name: x\nseed: 1\nseed: 2\n";
    locate(dup, "seed: 2", &line, &column);
    char want[64];
    snprintf(want, sizeof want, ":%d:%d: duplicate key 'seed'", line, column);
    expect_error(dup, NULL, want);
    expect_error("base: &b {preset: tiny}\nmodel: *b\n", NULL, "aliases are not supported");
    expect_error("name: a\n---\nname: b\n", NULL, "more than one YAML document");
    expect_error("- a\n- b\n", NULL, "the top level must be a map");
    expect_error("", NULL, "name: missing required key");              /* empty file = empty map */
    expect_error("# only a comment\n", NULL, "name: missing required key");
    mb_cfg_tree tree;
    mb_error err = {{0}};
    cr_assert_eq(mb_cfg_tree_load(&tree, "/nonexistent/config.yaml", &err), -1);
    cr_assert(strstr(err.message, "/nonexistent/config.yaml") != NULL, "%s", err.message);
}

Test(config_tree, every_truncation_fails_cleanly_or_parses) {
    size_t length = strlen(BASE_YAML);
    int parsed = 0;
    for (size_t cut = 0; cut <= length; cut++) {
        mb_cfg_tree tree;
        mb_error err = {{0}};
        if (mb_cfg_tree_parse(&tree, BASE_YAML, cut, "cut.yaml", &err) == 0) {
            run_cfg cfg;
            if (mb_cfg_read(&tree, run_schema, &cfg, &err) != 0) cr_assert(err.message[0] != '\0');
            parsed++;
        } else {
            cr_assert(strncmp(err.message, "cut.yaml", 8) == 0, "%s", err.message);
        }
        mb_cfg_tree_free(&tree);
    }
    cr_assert(parsed > 0);
}

/* ---- Overrides --------------------------------------------------------------------------------------------------- */

Test(config_tree, overrides_change_create_and_reset_values) {
    const char *const overrides[] = {"phases.1.lr=1e-4", "phases[0].scheduler.t_warmup=2B", "optimizer.betas=[0.8,0.9]",
                                     "model.num_layers=4", "seed=", "phases.2.scheduler.decay_shape=cosine",
                                     "data.train=other/*.zst", "phases.1.rope={global_theta: 5e5}", NULL};
    run_cfg cfg;
    mb_error err = {{0}};
    cr_assert_eq(load_and_read(BASE_YAML, overrides, &cfg, &err, NULL), 0, "%s", err.message);
    cr_assert_eq(cfg.phases[1].lr, 1e-4);
    cr_assert_eq(cfg.phases[0].t_warmup, 2000000000LL);
    cr_assert_eq(cfg.phases[0].lr, 8e-4);
    cr_assert_eq(cfg.betas[0], 0.8);
    cr_assert_eq(cfg.betas[1], 0.9);
    cr_assert_eq(cfg.num_layers, 4);                          /* key absent from the file, allowed by the schema */
    cr_assert_eq(cfg.seed, 17);                               /* null -> default */
    cr_assert_eq(cfg.phases[2].decay_shape, 1);
    cr_assert_str_eq(cfg.train, "other/*.zst");
    cr_assert_eq(cfg.phases[1].rope_global_theta, 5e5);
}

Test(config_tree, override_errors_name_the_override) {
    const char *const bad_value[] = {"phases.1.lr=fast", NULL};
    run_cfg cfg;
    mb_error err = {{0}};
    cr_assert_eq(load_and_read(BASE_YAML, bad_value, &cfg, &err, NULL), -1);
    cr_assert_str_eq(err.message, "override 'phases.1.lr=fast': phases[1].lr: expected a number, got 'fast'");
    const char *const unknown[] = {"optimizer.lrr=1", NULL};
    expect_error(BASE_YAML, unknown, "override 'optimizer.lrr=1': optimizer.lrr: unknown key");
    const char *const new_section[] = {"logging.every=10", NULL};
    expect_error(BASE_YAML, new_section, "override 'logging.every=10': logging: unknown key");
    const char *const appended[] = {"phases.3.name=extra", NULL};
    expect_error(BASE_YAML, appended, "override 'phases.3.name=extra': phases[3].tokens: missing required key");
    const char *const appended_ok[] = {"phases.3={name: extra, tokens: 1M, lr: 1e-5}", NULL};
    cr_assert_eq(load_and_read(BASE_YAML, appended_ok, &cfg, &err, NULL), 0, "%s", err.message);
    cr_assert_eq(cfg.n_phases, 4);
    cr_assert_eq(cfg.phases[3].tokens, 1000000);
    /* Errors detected by the override itself. */
    mb_cfg_tree tree;
    cr_assert_eq(mb_cfg_tree_parse(&tree, BASE_YAML, strlen(BASE_YAML), "base.yaml", &err), 0, "%s", err.message);
    cr_assert_eq(mb_cfg_tree_override(&tree, "phases.5.lr=1", &err), -1);
    cr_assert(strstr(err.message, "phases[5]: index out of range (the list has 3 entries") != NULL, "%s",
              err.message);
    cr_assert_eq(mb_cfg_tree_override(&tree, "seed.x=1", &err), -1);
    cr_assert(strstr(err.message, "'seed' is a scalar") != NULL, "%s", err.message);
    cr_assert_eq(mb_cfg_tree_override(&tree, "phases.first.lr=1", &err), -1);
    cr_assert(strstr(err.message, "must be an index") != NULL, "%s", err.message);
    static const char *const malformed[] = {"=3", "noequals", "a..b=1", "a.=1", "a[x]=1", "a[1=2", ".a=1"};
    for (size_t i = 0; i < sizeof malformed / sizeof malformed[0]; i++)
        cr_assert_eq(mb_cfg_tree_override(&tree, malformed[i], &err), -1, "'%s' accepted", malformed[i]);
    cr_assert_eq(mb_cfg_tree_override(&tree, "seed=[1", &err), -1);
    cr_assert(strstr(err.message, "override 'seed=[1': YAML error") != NULL, "%s", err.message);
    /* the failed overrides left the tree readable and unchanged */
    cr_assert_eq(mb_cfg_read(&tree, run_schema, &cfg, &err), 0, "%s", err.message);
    cr_assert_eq(cfg.seed, 17);
    mb_cfg_tree_free(&tree);
}

Test(config_tree, find_and_fail_at_for_cross_field_checks) {
    mb_cfg_tree tree;
    mb_error err = {{0}};
    const char *path = write_temp(BASE_YAML);
    cr_assert_eq(mb_cfg_tree_load(&tree, path, &err), 0, "%s", err.message);
    const mb_cfg_node *node = mb_cfg_tree_find(&tree, "phases.0.scheduler.t_warmup");
    cr_assert_not_null(node);
    cr_assert_str_eq(node->text, "3B");
    cr_assert_eq(mb_cfg_tree_find(&tree, "phases[0].scheduler.t_warmup"), node);
    cr_assert_null(mb_cfg_tree_find(&tree, "phases.7.lr"));
    cr_assert_null(mb_cfg_tree_find(&tree, "phases..lr"));
    int line, column;
    locate(BASE_YAML, "4608", &line, &column);
    cr_assert_eq(mb_cfg_fail_at(&tree, "phases.0.global_batch", &err, "must be a multiple of %d", 7), -1);
    char want[512];
    snprintf(want, sizeof want, "%s:%d:%d: phases[0].global_batch: must be a multiple of 7", path, line, column);
    cr_assert_str_eq(err.message, want);
    /* a missing key falls back to the nearest existing ancestor */
    locate(BASE_YAML, "name: context_extension", &line, &column);
    mb_cfg_fail_at(&tree, "phases.1.scheduler.t_warmup", &err, "needs a warmup");
    snprintf(want, sizeof want, "%s:%d:%d: phases[1].scheduler.t_warmup: needs a warmup", path, line, column);
    cr_assert_str_eq(err.message, want);
    mb_cfg_tree_free(&tree);
}

/* ---- Dump and hash ----------------------------------------------------------------------------------------------- */

static char *dump_of(const char *text, const char *const *overrides, uint64_t *hash) {
    run_cfg cfg;
    mb_error err = {{0}};
    cr_assert_eq(load_and_read(text, overrides, &cfg, &err, NULL), 0, "%s", err.message);
    char *dump = mb_cfg_dump(run_schema, &cfg, &err);
    cr_assert_not_null(dump, "%s", err.message);
    cr_assert_eq(mb_cfg_hash(run_schema, &cfg, hash, &err), 0, "%s", err.message);
    return dump;
}

Test(config_tree, dump_is_canonical_and_reads_back_identically) {
    uint64_t hash1, hash2;
    char *dump1 = dump_of(BASE_YAML, NULL, &hash1);
    static const char *const expected_lines[] = {
        "name: \"base-recipe\"\n", "seed: 17\n", "deterministic: true\n", "model:\n  preset: base\n",
        "  hidden_size: 768\n", "  attn_out_dropout: 0.1\n", "betas: [0.9, 0.98]\n", "  eps: 1.0e-06\n",
        "  tokens: 1_719_000_000_000\n", "  lr: 0.0008\n", "    t_warmup: 3_000_000_000\n",
        "    decay_shape: one_minus_sqrt\n", "    alpha_f: 0.001\n", "    global_theta: 160000.0\n",
        "  batch_warmup:\n    tokens: 50_000_000_000\n    min_batch: 768\n"};
    for (size_t i = 0; i < sizeof expected_lines / sizeof expected_lines[0]; i++)
        cr_assert(strstr(dump1, expected_lines[i]) != NULL, "dump lacks '%s':\n%s", expected_lines[i], dump1);
    cr_assert(strstr(dump1, "#") == NULL);
    /* Reading the dump gives the same struct, hence the same dump and hash. */
    char *dump2 = dump_of(dump1, NULL, &hash2);
    cr_assert_str_eq(dump1, dump2);
    cr_assert_eq(hash1, hash2);
    free(dump1);
    free(dump2);
}

Test(config_tree, hash_ignores_formatting_and_defaults_but_not_values) {
    uint64_t base, reordered, explicit_default, changed, changed_back;
    free(dump_of(BASE_YAML, NULL, &base));
    /* same content: other key order, flow style, comments, other spellings of the same numbers */
    const char *other =
        "phases:\n"
        "- {lr: 0.0008, name: pretrain, tokens: 1.719T, global_batch: 4608,  # comment\n"
        "   batch_warmup: {min_batch: 768, tokens: 50_000_000_000},\n"
        "   scheduler: {t_warmup: 3_000_000_000tok, name: warmup_stable_decay}}\n"
        "- {name: context_extension, lr: 0.0003, tokens: 250_000M, max_seq_len: 8192, rope: {global_theta: 1.6e5}}\n"
        "- name: decay\n"
        "  lr: 0.0003\n"
        "  tokens: 50B\n"
        "  max_seq_len: 8_192\n"
        "  scheduler: {decay_shape: one_minus_sqrt, alpha_f: 1e-3, t_decay: 50B, name: warmup_stable_decay}\n"
        "optimizer: {eps: 0.000001}\n"
        "data: {train: 'data/pretrain/*.zst'}\n"
        "model: {preset: base}\n"
        "name: base-recipe\n";
    free(dump_of(other, NULL, &reordered));
    cr_assert_eq(base, reordered);
    const char *const with_default[] = {"model.hidden_size=768", "phases.0.weight_decay=1e-5", NULL};
    free(dump_of(BASE_YAML, with_default, &explicit_default));
    cr_assert_eq(base, explicit_default);
    const char *const new_lr[] = {"phases.2.lr=2e-4", NULL};
    free(dump_of(BASE_YAML, new_lr, &changed));
    cr_assert_neq(base, changed);
    const char *const same_lr[] = {"phases.2.lr=3.0e-4", NULL};
    free(dump_of(BASE_YAML, same_lr, &changed_back));
    cr_assert_eq(base, changed_back);
}

Test(config_tree, strings_with_special_characters_round_trip) {
    const char *const overrides[] = {"name=\"a: b # not a comment \\\"quoted\\\" \\u00e9\"", NULL};
    run_cfg cfg1, cfg2;
    mb_error err = {{0}};
    cr_assert_eq(load_and_read(BASE_YAML, overrides, &cfg1, &err, NULL), 0, "%s", err.message);
    cr_assert_str_eq(cfg1.name, "a: b # not a comment \"quoted\" \xc3\xa9");
    char *dump = mb_cfg_dump(run_schema, &cfg1, &err);
    cr_assert_not_null(dump);
    cr_assert_eq(load_and_read(dump, NULL, &cfg2, &err, NULL), 0, "%s", err.message);
    cr_assert_str_eq(cfg2.name, cfg1.name);
    free(dump);
}

Test(config_tree, tree_to_yaml_round_trips) {
    mb_cfg_tree tree, again;
    mb_error err = {{0}};
    cr_assert_eq(mb_cfg_tree_parse(&tree, BASE_YAML, strlen(BASE_YAML), "base.yaml", &err), 0, "%s", err.message);
    cr_assert_eq(mb_cfg_tree_override(&tree, "phases.0.lr=1e-3", &err), 0, "%s", err.message);
    char *text = mb_cfg_tree_to_yaml(&tree, &err);
    cr_assert_not_null(text, "%s", err.message);
    cr_assert(strstr(text, "t_warmup: 3B") != NULL, "%s", text);   /* scalars kept as written */
    cr_assert(strstr(text, "lr: 1e-3") != NULL, "%s", text);
    cr_assert_eq(mb_cfg_tree_parse(&again, text, strlen(text), "again.yaml", &err), 0, "%s", err.message);
    run_cfg a, b;
    cr_assert_eq(mb_cfg_read(&tree, run_schema, &a, &err), 0, "%s", err.message);
    cr_assert_eq(mb_cfg_read(&again, run_schema, &b, &err), 0, "%s", err.message);
    char *dump_a = mb_cfg_dump(run_schema, &a, &err), *dump_b = mb_cfg_dump(run_schema, &b, &err);
    cr_assert_str_eq(dump_a, dump_b);
    free(dump_a);
    free(dump_b);
    free(text);
    mb_cfg_tree_free(&tree);
    mb_cfg_tree_free(&again);
}

/* ---- Schema checks ----------------------------------------------------------------------------------------------- */

Test(config_tree, schema_mistakes_are_caught) {
    mb_error err = {{0}};
    cr_assert_eq(mb_cfg_schema_check(run_schema, &err), 0, "%s", err.message);
    typedef struct { int a; double b; } small;
    const mb_cfg_field bad_default[] = {
        {.path = "a", .type = MB_CFG_INT, .offset = offsetof(small, a), .default_value = "2.5"}, MB_CFG_END};
    cr_assert_eq(mb_cfg_schema_check(bad_default, &err), -1);
    cr_assert(strstr(err.message, "schema") && strstr(err.message, "a: expected an integer"), "%s", err.message);
    const mb_cfg_field out_of_bounds_default[] = {
        {.path = "b", .type = MB_CFG_FLOAT, .offset = offsetof(small, b), .default_value = "5", .max = "1"},
        MB_CFG_END};
    cr_assert_eq(mb_cfg_schema_check(out_of_bounds_default, &err), -1);
    cr_assert(strstr(err.message, "must be <= 1") != NULL, "%s", err.message);
    const mb_cfg_field clash[] = {{.path = "x", .type = MB_CFG_INT, .offset = offsetof(small, a)},
                                  {.path = "x.y", .type = MB_CFG_FLOAT, .offset = offsetof(small, b)}, MB_CFG_END};
    cr_assert_eq(mb_cfg_schema_check(clash, &err), -1);
    cr_assert(strstr(err.message, "clashes") != NULL, "%s", err.message);
    const mb_cfg_field no_names[] = {{.path = "e", .type = MB_CFG_ENUM, .offset = 0}, MB_CFG_END};
    cr_assert_eq(mb_cfg_schema_check(no_names, &err), -1);
    const mb_cfg_field bad_bound[] = {{.path = "a", .type = MB_CFG_INT, .offset = 0, .min = "zero"}, MB_CFG_END};
    cr_assert_eq(mb_cfg_schema_check(bad_bound, &err), -1);
    cr_assert(strstr(err.message, "min bound") != NULL, "%s", err.message);
    const mb_cfg_field bad_path[] = {{.path = "a..b", .type = MB_CFG_INT, .offset = 0}, MB_CFG_END};
    cr_assert_eq(mb_cfg_schema_check(bad_path, &err), -1);
    /* mb_cfg_read refuses to run with a broken schema */
    mb_cfg_tree tree;
    cr_assert_eq(mb_cfg_tree_parse(&tree, "a: 1\n", 5, "s.yaml", &err), 0);
    small out;
    cr_assert_eq(mb_cfg_read(&tree, bad_default, &out, &err), -1);
    mb_cfg_tree_free(&tree);
}

Test(config_tree, describe_lists_every_key) {
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    mb_cfg_describe(run_schema, out);
    fclose(out);
    static const char *const keys[] = {"model.preset", "optimizer.betas", "phases[].scheduler.decay_shape",
                                       "phases[].batch_warmup.tokens", "default=1e-6", "{linear|cosine|one_minus_sqrt}",
                                       "required", "run name"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        cr_assert(strstr(text, keys[i]) != NULL, "describe lacks '%s':\n%s", keys[i], text);
    free(text);
}
