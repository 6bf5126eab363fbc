/* modernbert finetune --task T --data DIR --init CHECKPOINT [CONFIG.yaml] [key=value ...]: the front end of GLUE
 * fine-tuning (src/train/finetune.c). */
#include <getopt.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tools/commands.h"
#include "common/fileio.h"
#include "train/finetune.h"

static void print_help(FILE *stream) {
    fprintf(stream,
            "usage: modernbert finetune --task T --data DIR --init CHECKPOINT [CONFIG.yaml] [key.path=value ...]\n"
            "       modernbert finetune --describe\n"
            "\n"
            "Fine-tunes a ModernBERT checkpoint on a GLUE task (or any data in a GLUE task's file layout) with a\n"
            "classification head, or a regression head for STS-B. Evaluates after every epoch, keeps the best epoch in\n"
            "OUTPUT/best/ (a transformers ModernBertForSequenceClassification checkpoint), stops early, and writes\n"
            "OUTPUT/config.yaml, OUTPUT/metrics.jsonl and OUTPUT/results.json. docs/finetuning.md explains it all.\n"
            "\n"
            "  --task T             cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli   (= data.task=T)\n"
            "  --data DIR           the task's folder or the GLUE root                    (= data.dir=DIR)\n"
            "  --init CHECKPOINT    an HF ModernBERT directory, a pretraining checkpoint or run, or a fine-tuned\n"
            "                       MNLI model (RTE, MRPC, STS-B)                         (= model.init=CHECKPOINT)\n"
            "  --output DIR         output directory                                      (= run.output_dir=DIR)\n"
            "  --preset base|large  use CONFIGS/<task>-<preset>.yaml, the paper's Table 6 hyper-parameters\n"
            "  --configs DIR        where the presets are (default configs/glue)\n"
            "  --describe           list every configuration key with its type, default and meaning\n"
            "  --help               this text\n");
}

int mb_cmd_finetune(int argc, char **argv) {
    static const struct option long_options[] = {
        {"task", required_argument, NULL, 't'},   {"data", required_argument, NULL, 'd'},
        {"init", required_argument, NULL, 'i'},   {"output", required_argument, NULL, 'o'},
        {"preset", required_argument, NULL, 'p'}, {"configs", required_argument, NULL, 'c'},
        {"describe", no_argument, NULL, 'D'},     {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *task = NULL, *data = NULL, *init = NULL, *output = NULL, *preset = NULL, *configs = "configs/glue";
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 't': task = optarg; break;
        case 'd': data = optarg; break;
        case 'i': init = optarg; break;
        case 'o': output = optarg; break;
        case 'p': preset = optarg; break;
        case 'c': configs = optarg; break;
        case 'D': mb_cfg_describe(mb_finetune_config_schema, stdout); return 0;
        case 'h': print_help(stdout); return 0;
        default: print_help(stderr); return 2;
        }
    }
    const char *config_path = NULL;
    char preset_path[1200];
    char **overrides = calloc((size_t)argc + 4, sizeof *overrides);
    char flag_overrides[4][1200];
    int count = 0, flags = 0;
    if (overrides == NULL) return 1;
    const char *flag_keys[4] = {"data.task", "data.dir", "model.init", "run.output_dir"};
    const char *flag_values[4] = {task, data, init, output};
    for (int i = 0; i < 4; i++) {
        if (flag_values[i] == NULL) continue;
        snprintf(flag_overrides[flags], sizeof flag_overrides[flags], "%s=%s", flag_keys[i], flag_values[i]);
        overrides[count++] = flag_overrides[flags++];
    }
    for (int i = optind; i < argc; i++) {
        if (strchr(argv[i], '=') != NULL) {
            overrides[count++] = argv[i];
        } else if (config_path == NULL) {
            config_path = argv[i];
        } else {
            fprintf(stderr, "modernbert finetune: unexpected argument '%s' (one CONFIG.yaml at most)\n", argv[i]);
            free(overrides);
            return 2;
        }
    }
    if (preset != NULL) {
        if (config_path != NULL || task == NULL) {
            fprintf(stderr, "modernbert finetune: --preset needs --task and replaces CONFIG.yaml\n");
            free(overrides);
            return 2;
        }
        snprintf(preset_path, sizeof preset_path, "%s/%s-%s.yaml", configs, task, preset);
        config_path = preset_path;
    }
    mb_finetune_config *config = malloc(sizeof *config);
    mb_finetune_result *result = malloc(sizeof *result);
    mb_error err = {{0}};
    int rc = 2;
    if (config == NULL || result == NULL) {
        fprintf(stderr, "modernbert finetune: out of memory\n");
    } else if (mb_finetune_config_load(config, config_path, overrides, count, &err) != 0) {
        fprintf(stderr, "modernbert finetune: %s\n", err.message);
    } else {
        if (config->run.threads > 0) omp_set_num_threads(config->run.threads);
        rc = mb_finetune(config, result, &err) == 0 ? 0 : 1;
        if (rc != 0) fprintf(stderr, "modernbert finetune: %s\n", err.message);
    }
    free(config);
    free(result);
    free(overrides);
    return rc;
}
