/* modernbert glue: fine-tunes one checkpoint on a list of GLUE tasks (optionally sweeping the learning rate), then
 * writes the results in the layout of the ModernBERT paper's Table 5 (OUTPUT/results.md and OUTPUT/results.json).
 *
 * As in the paper (§3.1.1, Appendix E.1), RTE, MRPC and STS-B start from the fine-tuned MNLI checkpoint when MNLI
 * is in the list (MNLI then runs first) or when --mnli-init names one. Each task uses configs/glue/<task>-<size>.yaml
 * (Table 6: lr, weight decay, epochs, batch 64) when it exists; key=value arguments apply to every task. With
 * --lr-sweep each learning rate is a separate run in OUTPUT/<task>/lr-<lr>/ and the best dev score is reported. */
#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tools/commands.h"
#include "common/fileio.h"
#include "eval/report.h"
#include "train/finetune.h"

#define MAX_SWEEP 8

typedef struct glue_run {
    const char *data, *init, *size, *output, *configs, *mnli_init;
    double lrs[MAX_SWEEP];
    int lr_count;
    int use_mnli_init, predict_test;
    char **user_overrides;
    int user_override_count;
    mb_glue_table table;
    char mnli_best[1100];
} glue_run;

static void print_help(FILE *stream) {
    fprintf(stream,
            "usage: modernbert glue --data GLUE_DIR --init CHECKPOINT [options] [key.path=value ...]\n"
            "\n"
            "Fine-tunes CHECKPOINT on each task (modernbert finetune), then writes OUTPUT/results.md and\n"
            "OUTPUT/results.json in the layout of the paper's Table 5 (dev scores). key=value arguments override every\n"
            "task's configuration (e.g. run.backend=cpu data.max_train_examples=2000).\n"
            "\n"
            "  --tasks LIST        comma-separated (default: cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte; wnli also works)\n"
            "  --size base|large   which Table 6 presets to use: CONFIGS/<task>-<size>.yaml (default base)\n"
            "  --configs DIR       where the presets are (default configs/glue)\n"
            "  --lr-sweep LIST     run every task at each of these learning rates, report the best (e.g.\n"
            "                      1e-5,3e-5,5e-5,8e-5, the paper's grid)\n"
            "  --output DIR        default runs/glue\n"
            "  --name NAME         the model's name in the table (default: the checkpoint folder's name)\n"
            "  --mnli-init DIR     start RTE, MRPC and STS-B from this fine-tuned MNLI checkpoint\n"
            "  --no-mnli-init      start every task from CHECKPOINT\n"
            "  --predict-test      also write GLUE submission files to OUTPUT/submission/\n"
            "  --help              this text\n");
}

static int starts_from_mnli(mb_glue_task task) {
    return task == MB_GLUE_RTE || task == MB_GLUE_MRPC || task == MB_GLUE_STSB;
}

static int parse_tasks(const char *list, mb_glue_task *tasks, int *count) {
    char *copy = strdup(list), *save = NULL;
    int wanted[MB_GLUE_TASK_COUNT] = {0};
    mb_error err = {{0}};
    for (char *name = strtok_r(copy, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        mb_glue_task task;
        if (mb_glue_task_from_name(name, &task, &err) != 0) {
            fprintf(stderr, "modernbert glue: %s\n", err.message);
            free(copy);
            return -1;
        }
        wanted[task] = 1;
    }
    free(copy);
    /* MNLI first when a task starts from it; then Table 5's order. */
    static const mb_glue_task order[] = {MB_GLUE_MNLI, MB_GLUE_COLA, MB_GLUE_SST2, MB_GLUE_MRPC, MB_GLUE_STSB,
                                         MB_GLUE_QQP,  MB_GLUE_QNLI, MB_GLUE_RTE,  MB_GLUE_WNLI};
    *count = 0;
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (wanted[order[i]]) tasks[(*count)++] = order[i];
    return *count > 0 ? 0 : -1;
}

static int parse_sweep(const char *list, glue_run *g) {
    char *copy = strdup(list), *save = NULL;
    g->lr_count = 0;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *end = NULL;
        double lr = strtod(item, &end);
        if (*end != '\0' || !(lr > 0) || g->lr_count == MAX_SWEEP) {
            fprintf(stderr, "modernbert glue: --lr-sweep: '%s' is not a learning rate (at most %d)\n", item, MAX_SWEEP);
            free(copy);
            return -1;
        }
        g->lrs[g->lr_count++] = lr;
    }
    free(copy);
    return g->lr_count > 0 ? 0 : -1;
}

/* One fine-tuning run; fills *result. */
static int run_one(glue_run *g, mb_glue_task task, const char *init, int lr_index, char *output, size_t output_size,
                   mb_finetune_result *result) {
    const mb_glue_task_info *info = mb_glue_task_get(task);
    char preset[1200], flags[5][1200];
    snprintf(preset, sizeof preset, "%s/%s-%s.yaml", g->configs, info->name, g->size);
    if (g->lr_count > 0) snprintf(output, output_size, "%s/%s/lr-%g", g->output, info->name, g->lrs[lr_index]);
    else snprintf(output, output_size, "%s/%s", g->output, info->name);
    int count = 0;
    char **overrides = calloc((size_t)g->user_override_count + 5, sizeof *overrides);
    if (overrides == NULL) return -1;
    snprintf(flags[0], sizeof flags[0], "data.task=%s", info->name);
    snprintf(flags[1], sizeof flags[1], "data.dir=%s", g->data);
    snprintf(flags[2], sizeof flags[2], "model.init=%s", init);
    snprintf(flags[3], sizeof flags[3], "run.output_dir=%s", output);
    snprintf(flags[4], sizeof flags[4], "optimizer.lr=%.9g", g->lr_count ? g->lrs[lr_index] : 0.0);
    for (int i = 0; i < (g->lr_count ? 5 : 4); i++) overrides[count++] = flags[i];
    for (int i = 0; i < g->user_override_count; i++) overrides[count++] = g->user_overrides[i];
    mb_finetune_config *config = malloc(sizeof *config);
    mb_error err = {{0}};
    int rc = config ? 0 : -1;
    const char *config_path = mb_path_exists(preset) ? preset : NULL;
    if (rc == 0) rc = mb_finetune_config_load(config, config_path, overrides, count, &err);
    if (rc == 0) {
        printf("==== %s: %s, init %s, output %s\n", info->dir_name, config_path ? config_path : "default settings",
               init, output);
        fflush(stdout);
        if (config->run.threads > 0) omp_set_num_threads(config->run.threads);
        rc = mb_finetune(config, result, &err);
    }
    if (rc == 0 && result->best_epoch > 0) {
        mb_glue_table_row *row = &g->table.rows[task];
        if (!row->done || result->best[0].main > row->scores[0].main || !isfinite(row->scores[0].main)) {
            row->done = 1;
            row->dev_count = result->dev_count;
            memcpy(row->dev_names, result->dev_names, sizeof row->dev_names);
            memcpy(row->scores, result->best, sizeof row->scores);
            row->lr = config->optimizer.lr;
            row->weight_decay = config->optimizer.weight_decay;
            row->best_epoch = result->best_epoch;
            row->epochs_run = result->epochs_run;
            snprintf(row->init, sizeof row->init, "%s", init);
            if (task == MB_GLUE_MNLI) snprintf(g->mnli_best, sizeof g->mnli_best, "%s", result->best_dir);
        }
        if (g->table.parameters == 0) g->table.parameters = result->parameters;
    }
    if (rc != 0) fprintf(stderr, "modernbert glue: %s: %s\n", info->dir_name, err.message);
    free(config);
    free(overrides);
    return rc;
}

static int write_tables(glue_run *g) {
    char path[1200];
    mb_error err = {{0}};
    char *markdown = mb_glue_table_markdown(&g->table), *json = mb_glue_table_json(&g->table);
    int rc = markdown && json ? 0 : -1;
    snprintf(path, sizeof path, "%s/results.md", g->output);
    if (rc == 0) rc = mb_write_file_atomic(path, markdown, strlen(markdown), &err);
    snprintf(path, sizeof path, "%s/results.json", g->output);
    if (rc == 0) rc = mb_write_file_atomic(path, json, strlen(json), &err);
    if (rc == 0) printf("\n%s\nresults: %s/results.md, %s/results.json\n", markdown, g->output, g->output);
    else fprintf(stderr, "modernbert glue: writing the results: %s\n", err.message);
    free(markdown);
    free(json);
    return rc;
}

static void predict_test(glue_run *g, mb_glue_task task, const char *best_dir) {
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/submission", g->output);
    mb_eval_options o = {.task = mb_glue_task_get(task)->name, .data_dir = g->data, .model_dir = best_dir,
                         .splits = "", .predictions_dir = dir};
    mb_eval_report *report = malloc(sizeof *report);
    mb_error err = {{0}};
    if (report != NULL && mb_glue_evaluate(&o, report, &err) == 0) {
        for (int i = 0; i < report->file_count; i++) printf("predictions: %s\n", report->files[i]);
    } else {
        fprintf(stderr, "modernbert glue: test predictions for %s skipped: %s\n", mb_glue_task_get(task)->dir_name,
                err.message);
    }
    free(report);
}

static int run_task(glue_run *g, mb_glue_task task) {
    const char *init = g->init;
    if (g->use_mnli_init && starts_from_mnli(task)) {
        if (g->mnli_init) init = g->mnli_init;
        else if (g->mnli_best[0]) init = g->mnli_best;
    }
    int runs = g->lr_count > 0 ? g->lr_count : 1, failures = 0;
    char best_dir[1200] = "";
    double best = NAN;
    for (int i = 0; i < runs; i++) {
        char output[1100];
        mb_finetune_result *result = calloc(1, sizeof *result);
        if (result == NULL || run_one(g, task, init, i, output, sizeof output, result) != 0) failures++;
        else if (result->best_epoch > 0 && (!isfinite(best) || result->best[0].main > best)) {
            best = result->best[0].main;
            snprintf(best_dir, sizeof best_dir, "%s", result->best_dir);
        }
        free(result);
    }
    write_tables(g);
    if (g->predict_test && best_dir[0]) predict_test(g, task, best_dir);
    return failures == runs ? -1 : 0;
}

int mb_cmd_glue(int argc, char **argv) {
    static const struct option long_options[] = {
        {"data", required_argument, NULL, 'd'},    {"init", required_argument, NULL, 'i'},
        {"tasks", required_argument, NULL, 't'},   {"size", required_argument, NULL, 's'},
        {"configs", required_argument, NULL, 'c'}, {"lr-sweep", required_argument, NULL, 'l'},
        {"output", required_argument, NULL, 'o'},  {"name", required_argument, NULL, 'n'},
        {"mnli-init", required_argument, NULL, 'm'}, {"no-mnli-init", no_argument, NULL, 'M'},
        {"predict-test", no_argument, NULL, 'p'},  {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    glue_run *g = calloc(1, sizeof *g);
    if (g == NULL) return 1;
    g->size = "base";
    g->output = "runs/glue";
    g->configs = "configs/glue";
    g->use_mnli_init = 1;
    const char *task_list = "cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte", *name = NULL;
    optind = 1;
    int c, rc = 0;
    while (rc == 0 && (c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 'd': g->data = optarg; break;
        case 'i': g->init = optarg; break;
        case 't': task_list = optarg; break;
        case 's': g->size = optarg; break;
        case 'c': g->configs = optarg; break;
        case 'l': rc = parse_sweep(optarg, g) == 0 ? 0 : 2; break;
        case 'o': g->output = optarg; break;
        case 'n': name = optarg; break;
        case 'm': g->mnli_init = optarg; break;
        case 'M': g->use_mnli_init = 0; break;
        case 'p': g->predict_test = 1; break;
        case 'h': print_help(stdout); free(g); return 0;
        default: rc = 2;
        }
    }
    mb_glue_task tasks[MB_GLUE_TASK_COUNT];
    int task_count = 0;
    if (rc == 0 && (g->data == NULL || g->init == NULL)) {
        fprintf(stderr, "modernbert glue: --data and --init are required (see --help)\n");
        rc = 2;
    }
    if (rc == 0 && parse_tasks(task_list, tasks, &task_count) != 0) rc = 2;
    if (rc != 0) {
        free(g);
        return rc;
    }
    g->user_overrides = argv + optind;
    g->user_override_count = argc - optind;
    for (int i = 0; i < g->user_override_count; i++) {
        if (strchr(g->user_overrides[i], '=') == NULL) {
            fprintf(stderr, "modernbert glue: '%s' is not a key=value override\n", g->user_overrides[i]);
            free(g);
            return 2;
        }
    }
    if (name == NULL) {
        const char *slash = strrchr(g->init, '/');
        name = slash && slash[1] ? slash + 1 : g->init;
    }
    snprintf(g->table.model, sizeof g->table.model, "%s", name);
    mb_error err = {{0}};
    if (mb_make_dirs(g->output, &err) != 0) {
        fprintf(stderr, "modernbert glue: %s\n", err.message);
        free(g);
        return 1;
    }
    int failed = 0;
    for (int i = 0; i < task_count; i++) failed += run_task(g, tasks[i]) != 0;
    if (failed) fprintf(stderr, "modernbert glue: %d task(s) failed\n", failed);
    free(g);
    return failed ? 1 : 0;
}
