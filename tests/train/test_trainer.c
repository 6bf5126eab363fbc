/* `modernbert pretrain` end to end on a small model: exact resume, phase transitions, checkpoint safety,
 * step-by-step batch files from an HF checkpoint, NaN handling and malformed configs. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/fileio.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "../support/run_command.h"

static char workdir[256];

/* A small corpus of varied sentences, tokenized once for all tests of this file. */
static void make_shards(void) {
    snprintf(workdir, sizeof workdir, "/tmp/mb_trainer_test_%d", (int)getpid());
    mkdir(workdir, 0755);
    char path[512];
    snprintf(path, sizeof path, "%s/corpus.txt", workdir);
    FILE *text = fopen(path, "w");
    const char *subjects[] = {"The cat", "A tired engineer", "Our small model", "The river", "Every student"};
    const char *verbs[] = {"watches", "builds", "forgets", "carries", "measures"};
    const char *objects[] = {"the quiet harbour", "a long proof", "seven red apples", "the compiler", "old letters"};
    for (int i = 0; i < 400; i++) {
        for (int s = 0; s < 3 + i % 5; s++)
            fprintf(text, "%s %s %s. ", subjects[(i + s) % 5], verbs[(i * 3 + s) % 5], objects[(i * 7 + s) % 5]);
        fprintf(text, "\n");
    }
    fclose(text);
    char command[2048], output[8192];
    snprintf(command, sizeof command,
             "%s/modernbert tokenize --tokenizer %s/data/tokenizer.json --output %s/shards --doc-separator line "
             "--val-fraction 0.1 --quiet %s 2>&1", MB_BUILD_DIR, MB_SOURCE_DIR, workdir, path);
    cr_assert_eq(run_command(command, output, sizeof output), 0, "%s", output);
}

static void write_config(const char *name, const char *phases) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", workdir, name);
    FILE *f = fopen(path, "w");
    fprintf(f,
            "run: {name: test, output_dir: %s/run, seed: 5, backend: cpu, threads: 1}\n"
            "model: {preset: tiny, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2,\n"
            "        num_attention_heads: 2, local_attention: 16}\n"
            "data: {tokenizer: %s/data/tokenizer.json, train: '%s/shards/train-*.mbs', val: '%s/shards/val-*.mbs',\n"
            "       prefetch: 2}\n"
            "checkpoint: {every_steps: 3, keep: 2}\n"
            "logging: {every_steps: 1, val_every_steps: 4, val_batches: 2, progress_bar: false}\n"
            "%s",
            workdir, MB_SOURCE_DIR, workdir, workdir, phases);
    fclose(f);
}

static const char *two_phases =
    "phases:\n"
    "  - {name: short, seq_len: 32, micro_batch_tokens: 128, batch_tokens: 256, tokens: 1500, lr: 3e-3,\n"
    "     warmup_tokens: 500, global_rope_theta: 10000}\n"
    "  - {name: long, seq_len: 96, micro_batch_tokens: 192, batch_tokens: 384, tokens: 1200, lr: 1e-3,\n"
    "     decay_tokens: 1200, global_rope_theta: 40000, local_rope_theta: 10000}\n";

static int pretrain(const char *config, const char *extra, char *output, size_t size) {
    char command[2048];
    snprintf(command, sizeof command, "%s/modernbert pretrain %s/%s %s 2>&1", MB_BUILD_DIR, workdir, config,
             extra ? extra : "");
    return run_command(command, output, size);
}

/* The "step_loss" values of metrics.jsonl, in order, as text (exact comparison). */
static int read_step_losses(const char *run_dir, char losses[][40], int max) {
    char path[512];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "%s", path);
    char line[1024];
    int count = 0;
    while (fgets(line, sizeof line, f) && count < max) {
        const char *at = strstr(line, "\"step_loss\": ");
        if (at == NULL) continue;
        sscanf(at + 13, "%39[^,]", losses[count++]);
    }
    fclose(f);
    return count;
}

static void read_whole(const char *path, char **data, size_t *size) {
    mb_error err;
    cr_assert_eq(mb_read_file(path, data, size, &err), 0, "%s", err.message);
}

Test(trainer, resume_is_bit_identical_and_phases_switch, .init = make_shards, .timeout = 600) {
    static char output[65536];
    char losses_a[64][40], losses_b[64][40], run_dir[512], cmd[1024];
    write_config("two.yaml", two_phases);
    snprintf(run_dir, sizeof run_dir, "%s/run", workdir);

    cr_assert_eq(pretrain("two.yaml", NULL, output, sizeof output), 0, "%s", output);
    cr_assert(strstr(output, "phase 1 'long'") != NULL, "%s", output);
    cr_assert(strstr(output, "validation loss") != NULL, "%s", output);
    int steps_a = read_step_losses(run_dir, losses_a, 64);
    cr_assert_gt(steps_a, 8);
    char *weights_a, *state_a;
    size_t size_a, state_size;
    char final[1024];
    cr_assert_eq(mb_checkpoint_find_latest(run_dir, final, sizeof final, NULL), 1);
    snprintf(cmd, sizeof cmd, "%s/model.safetensors", final);
    read_whole(cmd, &weights_a, &size_a);
    snprintf(cmd, sizeof cmd, "%s/config.json", final);
    read_whole(cmd, &state_a, &state_size);
    cr_assert(strstr(state_a, "\"global_rope_theta\":\t40000") != NULL || strstr(state_a, "40000") != NULL,
              "final config.json does not carry the phase-2 theta: %s", state_a);
    free(state_a);
    /* the optimizer state was kept across the phase change: its step counter equals the run's step count */
    snprintf(cmd, sizeof cmd, "%s/trainer_state.json", final);
    read_whole(cmd, &state_a, &state_size);
    char expect[64];
    snprintf(expect, sizeof expect, "\"optimizer_step\":\t%d", steps_a);
    cr_assert(strstr(state_a, expect) != NULL, "expected %s in %s", expect, state_a);
    free(state_a);

    /* the same run, interrupted twice (once inside phase 0, once inside phase 1) and resumed */
    snprintf(cmd, sizeof cmd, "rm -rf %s", run_dir);
    cr_assert_eq(system(cmd), 0);
    cr_assert_eq(pretrain("two.yaml", "--max-steps 4", output, sizeof output), 0, "%s", output);
    cr_assert(strstr(output, "stopping at step 4") != NULL, "%s", output);
    cr_assert_eq(pretrain("two.yaml", "--resume --max-steps 9", output, sizeof output), 0, "%s", output);
    cr_assert(strstr(output, "resume: ") != NULL && strstr(output, "step 4,") != NULL, "%s", output);
    cr_assert_eq(pretrain("two.yaml", "--resume", output, sizeof output), 0, "%s", output);
    int steps_b = read_step_losses(run_dir, losses_b, 64);
    cr_assert_eq(steps_b, steps_a);
    for (int i = 0; i < steps_a; i++)
        cr_assert_str_eq(losses_b[i], losses_a[i], "step %d: %s (resumed) vs %s (straight)", i + 1, losses_b[i],
                         losses_a[i]);
    char *weights_b;
    size_t size_b;
    cr_assert_eq(mb_checkpoint_find_latest(run_dir, final, sizeof final, NULL), 1);
    snprintf(cmd, sizeof cmd, "%s/model.safetensors", final);
    read_whole(cmd, &weights_b, &size_b);
    cr_assert_eq(size_b, size_a);
    cr_assert_eq(memcmp(weights_a, weights_b, size_a), 0, "final weights differ after resume");
    free(weights_a);
    free(weights_b);
}

Test(trainer, interrupted_checkpoint_leaves_previous_loadable, .init = make_shards, .timeout = 600) {
    static char output[65536];
    write_config("one.yaml", "phases:\n  - {seq_len: 32, micro_batch_tokens: 128, batch_tokens: 256, tokens: 3000}\n");
    cr_assert_eq(pretrain("one.yaml", "--max-steps 3", output, sizeof output), 0, "%s", output);
    /* a checkpoint whose write died half-way: folder renamed without its state file, and a leftover temp folder */
    char path[1024];
    snprintf(path, sizeof path, "%s/run/checkpoints/step-99999999", workdir);
    cr_assert_eq(mkdir(path, 0755), 0);
    snprintf(path, sizeof path, "%s/run/checkpoints/step-99999999/model.safetensors", workdir);
    FILE *f = fopen(path, "w");
    fputs("truncated", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/run/checkpoints/.tmp-step-00000004.123", workdir);
    cr_assert_eq(mkdir(path, 0755), 0);
    cr_assert_eq(pretrain("one.yaml", "--resume --max-steps 5", output, sizeof output), 0, "%s", output);
    cr_assert(strstr(output, "step-00000003 (step 3,") != NULL, "%s", output);
    cr_assert(strstr(output, "stopping at step 5") != NULL, "%s", output);
}

Test(trainer, malformed_configs_fail_before_work_with_the_key) {
    static char output[8192];
    snprintf(workdir, sizeof workdir, "/tmp/mb_trainer_cfg_%d", (int)getpid());
    mkdir(workdir, 0755);
    struct {
        const char *phases, *extra, *needle;
    } cases[] = {
        {"phases:\n  - {tokens: 100, lr: fast}\n", NULL, "phases[0].lr"},
        {"phases:\n  - {tokens: 100, colour: red}\n", NULL, "colour"},
        {"phases:\n  - {tokens: 100, micro_batch_tokens: 100, seq_len: 200}\n", NULL, "micro_batch_tokens"},
        {"phases:\n  - {tokens: 100, seq_len: 100, micro_batch_tokens: 1000, batch_tokens: 1500}\n", NULL, "multiple"},
        {"phases:\n  - {tokens: 100}\n", "phases.0.weight_decay=2", "weight_decay"},
        {"phases: []\n", NULL, "phases"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_config("bad.yaml", cases[i].phases);
        cr_assert_eq(pretrain("bad.yaml", cases[i].extra, output, sizeof output), 2, "case %zu: %s", i, output);
        cr_assert(strstr(output, cases[i].needle) != NULL, "case %zu: '%s' not in %s", i, cases[i].needle, output);
        cr_assert(strstr(output, "effective configuration") == NULL, "case %zu started work", i);
    }
}

/* Batch files from an HF checkpoint: the first step's loss is transformers' loss for that model and batch. */
Test(trainer, step_by_step_batch_files_from_hf_checkpoint, .timeout = 300) {
    static char output[65536];
    snprintf(workdir, sizeof workdir, "/tmp/mb_trainer_steps_%d", (int)getpid());
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "mkdir -p %s/batches && for s in 000000 000001; do cp %s/tests/fixtures/hf/"
             "mlm_hd32_window_small_every2/batch.safetensors %s/batches/step-$s-micro-000.safetensors; done",
             workdir, MB_SOURCE_DIR, workdir);
    cr_assert_eq(system(cmd), 0);
    char path[512];
    snprintf(path, sizeof path, "%s/steps.yaml", workdir);
    FILE *f = fopen(path, "w");
    fprintf(f, "run: {output_dir: %s/run, backend: cpu}\n"
               "model: {init: %s/tests/fixtures/hf/mlm_hd32_window_small_every2}\n"
               "data: {tokenizer: %s/data/tokenizer.json, batches: %s/batches}\n"
               "phases:\n  - {tokens: 1000000, lr: 1e-3, global_rope_theta: 160000, local_rope_theta: 10000}\n"
               "logging: {progress_bar: false}\n", workdir, MB_SOURCE_DIR, MB_SOURCE_DIR, workdir);
    fclose(f);
    cr_assert_eq(pretrain("steps.yaml", NULL, output, sizeof output), 0, "%s", output);
    char losses[8][40];
    snprintf(path, sizeof path, "%s/run", workdir);
    cr_assert_eq(read_step_losses(path, losses, 8), 2, "%s", output);
    /* transformers: 5.304935 (tests/fixtures/hf/.../expected.safetensors) */
    cr_assert(fabs(atof(losses[0]) - 5.304935) < 1e-4, "step 1 loss %s", losses[0]);
    cr_assert(atof(losses[1]) < atof(losses[0]), "the same batch again must have a lower loss: %s then %s",
              losses[0], losses[1]);
}

/* Non-finite losses skip the update and are logged; K in a row abort with a clear message. */
Test(trainer, nonfinite_steps_are_skipped_then_abort, .timeout = 300) {
    static char output[65536];
    snprintf(workdir, sizeof workdir, "/tmp/mb_trainer_nan_%d", (int)getpid());
    char cmd[2048], path[512];
    snprintf(cmd, sizeof cmd, "mkdir -p %s/batches && for s in 000000 000001 000002 000003; do cp %s/tests/fixtures/hf/"
             "mlm_hd32_window_small_every2/batch.safetensors %s/batches/step-$s-micro-000.safetensors; done",
             workdir, MB_SOURCE_DIR, workdir);
    cr_assert_eq(system(cmd), 0);
    /* a checkpoint with one NaN weight */
    mb_model model;
    mb_error err;
    char source[512], broken[512];
    snprintf(source, sizeof source, "%s/tests/fixtures/hf/mlm_hd32_window_small_every2", MB_SOURCE_DIR);
    snprintf(broken, sizeof broken, "%s/broken", workdir);
    cr_assert_eq(mb_model_load_hf(&model, source, &err), 0, "%s", err.message);
    model.params[model.table.params[3].offset] = NAN;
    cr_assert_eq(mb_model_save_hf(&model, broken, &err), 0, "%s", err.message);
    mb_model_free(&model);
    snprintf(path, sizeof path, "%s/nan.yaml", workdir);
    FILE *f = fopen(path, "w");
    fprintf(f, "run: {output_dir: %s/run, backend: cpu}\n"
               "data: {tokenizer: %s/data/tokenizer.json, batches: %s/batches}\n"
               "phases:\n  - {tokens: 1000000}\n"
               "logging: {progress_bar: false, max_nonfinite_steps: 3}\n", workdir, MB_SOURCE_DIR, workdir);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s/modernbert pretrain %s --init %s 2>&1", MB_BUILD_DIR, path, broken);
    cr_assert_eq(run_command(cmd, output, sizeof output), 1, "%s", output);
    cr_assert(strstr(output, "SKIPPED (non-finite)") != NULL, "%s", output);
    cr_assert(strstr(output, "3 consecutive steps had a non-finite loss or gradient") != NULL, "%s", output);
}

/* SIGTERM (as a cluster scheduler sends before preemption) writes a checkpoint and exits 0. */
Test(trainer, sigterm_writes_checkpoint_and_exits_zero, .init = make_shards, .timeout = 300) {
    write_config("sig.yaml", "phases:\n  - {seq_len: 32, micro_batch_tokens: 128, batch_tokens: 256, tokens: 10M}\n");
    char config[512], log[512], metrics[512], binary[512];
    snprintf(config, sizeof config, "%s/sig.yaml", workdir);
    snprintf(log, sizeof log, "%s/sig.log", workdir);
    snprintf(metrics, sizeof metrics, "%s/run/metrics.jsonl", workdir);
    snprintf(binary, sizeof binary, "%s/modernbert", MB_BUILD_DIR);
    pid_t child = fork();
    if (child == 0) {
        freopen(log, "w", stdout);
        dup2(fileno(stdout), 2);
        execl(binary, "modernbert", "pretrain", config, (char *)NULL);
        _exit(127);
    }
    int lines = 0;
    for (int wait = 0; wait < 1200 && lines < 2; wait++) {
        usleep(100000);
        FILE *f = fopen(metrics, "r");
        lines = 0;
        if (f != NULL) {
            int c;
            while ((c = fgetc(f)) != EOF) lines += c == '\n';
            fclose(f);
        }
    }
    cr_assert_geq(lines, 2, "training did not start");
    kill(child, SIGTERM);
    int status;
    cr_assert_eq(waitpid(child, &status, 0), child);
    char *output;
    size_t size;
    read_whole(log, &output, &size);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d: %s", status, output);
    cr_assert(strstr(output, "(signal)") != NULL, "%s", output);
    char run_dir[512], latest[1024];
    snprintf(run_dir, sizeof run_dir, "%s/run", workdir);
    cr_assert_eq(mb_checkpoint_find_latest(run_dir, latest, sizeof latest, NULL), 1, "%s", output);
    free(output);
}
