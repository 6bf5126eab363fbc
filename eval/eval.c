/* modernbert eval --task T --data DIR --model CHECKPOINT: scores a fine-tuned checkpoint on labelled splits and
 * writes test-split predictions in the GLUE submission format (src/train/finetune.c, mb_glue_evaluate). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tools/commands.h"
#include "common/fileio.h"
#include "train/finetune.h"

static void print_help(FILE *stream) {
    fprintf(stream,
            "usage: modernbert eval --task T --data DIR --model CHECKPOINT [options]\n"
            "\n"
            "Scores a fine-tuned ModernBertForSequenceClassification checkpoint on the task's dev split(s) with the\n"
            "GLUE metrics, and with --predictions writes the test split(s) as GLUE submission files\n"
            "(DIR/CoLA.tsv, DIR/MNLI-m.tsv + DIR/MNLI-mm.tsv, ...: \"index<TAB>prediction\").\n"
            "\n"
            "  --split LIST          comma-separated labelled splits to score (default: dev, or dev_matched and\n"
            "                        dev_mismatched for MNLI); any DIR/NAME.tsv in the task's train/dev layout works\n"
            "  --predictions DIR     write test-split predictions here\n"
            "  --json FILE           also write the scores as JSON\n"
            "  --tokenizer FILE      default: CHECKPOINT/tokenizer.json\n"
            "  --max-seq-len N       truncation length (default 256)\n"
            "  --micro-batch-tokens N  tokens per packed forward pass (default 8192)\n"
            "  --max-examples N      score only the first N rows of each split\n"
            "  --backend NAME        auto, cpu or cuda (default auto)\n"
            "  --help                this text\n");
}

static int write_json(const char *path, const mb_eval_report *r, const char *task, mb_error *err) {
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (out == NULL) return mb_fail(err, "out of memory");
    fprintf(out, "{\"task\": \"%s\", \"splits\": {", task);
    for (int i = 0; i < r->split_count; i++) {
        const mb_glue_scores *s = &r->scores[i];
        fprintf(out, "%s\"%s\": {\"count\": %zu, \"main\": %.9g", i ? ", " : "", r->split_names[i], s->count, s->main);
        const char *names[] = {"accuracy", "f1", "matthews", "pearson", "spearman"};
        const double values[] = {s->accuracy, s->f1, s->matthews, s->pearson, s->spearman};
        for (int k = 0; k < 5; k++)
            if (values[k] == values[k]) fprintf(out, ", \"%s\": %.9g", names[k], values[k]);
        fprintf(out, "}");
    }
    fprintf(out, "}}\n");
    fclose(out);
    int rc = mb_write_file_atomic(path, text, size, err);
    free(text);
    return rc;
}

int mb_cmd_eval(int argc, char **argv) {
    static const struct option long_options[] = {
        {"task", required_argument, NULL, 't'},        {"data", required_argument, NULL, 'd'},
        {"model", required_argument, NULL, 'm'},       {"split", required_argument, NULL, 's'},
        {"predictions", required_argument, NULL, 'p'}, {"json", required_argument, NULL, 'j'},
        {"tokenizer", required_argument, NULL, 'k'},   {"max-seq-len", required_argument, NULL, 'L'},
        {"micro-batch-tokens", required_argument, NULL, 'B'}, {"max-examples", required_argument, NULL, 'n'},
        {"backend", required_argument, NULL, 'b'},     {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    mb_eval_options o = {0};
    const char *json = NULL;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 't': o.task = optarg; break;
        case 'd': o.data_dir = optarg; break;
        case 'm': o.model_dir = optarg; break;
        case 's': o.splits = optarg; break;
        case 'p': o.predictions_dir = optarg; break;
        case 'j': json = optarg; break;
        case 'k': o.tokenizer = optarg; break;
        case 'L': o.max_seq_len = atoi(optarg); break;
        case 'B': o.micro_batch_tokens = strtoll(optarg, NULL, 10); break;
        case 'n': o.max_examples = strtoll(optarg, NULL, 10); break;
        case 'b': o.backend = optarg; break;
        case 'h': print_help(stdout); return 0;
        default: print_help(stderr); return 2;
        }
    }
    if (o.task == NULL || o.data_dir == NULL || o.model_dir == NULL || optind < argc) {
        fprintf(stderr, "modernbert eval: --task, --data and --model are required (see --help)\n");
        return 2;
    }
    mb_eval_report *report = malloc(sizeof *report);
    mb_error err = {{0}};
    if (report == NULL || mb_glue_evaluate(&o, report, &err) != 0) {
        fprintf(stderr, "modernbert eval: %s\n", report ? err.message : "out of memory");
        free(report);
        return 1;
    }
    for (int i = 0; i < report->split_count; i++) {
        char text[128];
        mb_glue_scores_format(&report->scores[i], text, sizeof text);
        printf("%s %s: %s (%zu examples)\n", o.task, report->split_names[i], text, report->scores[i].count);
    }
    for (int i = 0; i < report->file_count; i++) printf("predictions: %s\n", report->files[i]);
    int rc = 0;
    if (json != NULL && write_json(json, report, o.task, &err) != 0) {
        fprintf(stderr, "modernbert eval: %s\n", err.message);
        rc = 1;
    }
    free(report);
    return rc;
}
