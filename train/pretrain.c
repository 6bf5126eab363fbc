/* modernbert pretrain CONFIG.yaml [key=value ...]: the front end of the pretraining loop (src/train/trainer.c). */
#include <getopt.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tools/commands.h"
#include "train/run_config.h"
#include "train/trainer.h"

/* The one piece of process-wide state: set by SIGINT/SIGTERM, polled by the loop after every step. */
static volatile sig_atomic_t stop_requested_by_signal = 0;

static void on_signal(int signal_number) {
    (void)signal_number;
    stop_requested_by_signal = 1;
}

static void print_help(FILE *stream) {
    fprintf(stream,
            "usage: modernbert pretrain CONFIG.yaml [key.path=value ...] [--resume] [--init HF_DIR] [--max-steps N]\n"
            "       modernbert pretrain --describe\n"
            "\n"
            "Pretrains a ModernBERT model with masked language modelling as CONFIG.yaml describes (phases, data,\n"
            "optimizer, schedule, checkpoints; docs/config.md lists every key). key=value arguments override the file,\n"
            "e.g. phases.0.lr=3e-4 run.output_dir=runs/x. The effective configuration is printed and saved as\n"
            "RUN/config.yaml; RUN/metrics.jsonl gets one JSON object per log interval; checkpoints go to\n"
            "RUN/checkpoints/step-N/ and load directly in transformers. SIGINT/SIGTERM write a checkpoint and exit 0.\n"
            "\n"
            "  --resume         continue from the newest complete checkpoint in run.output_dir\n"
            "  --init HF_DIR    start a new run from this Hugging Face ModernBERT checkpoint (= model.init=HF_DIR)\n"
            "  --max-steps N    stop after N steps in total (writing a checkpoint), e.g. to test resumption\n"
            "  --describe       list every configuration key with its type, default and meaning\n"
            "  --help           this text\n");
}

int mb_cmd_pretrain(int argc, char **argv) {
    static const struct option long_options[] = {{"resume", no_argument, NULL, 'r'},
                                                 {"max-steps", required_argument, NULL, 'm'},
                                                 {"describe", no_argument, NULL, 'd'},
                                                 {"init", required_argument, NULL, 'i'},
                                                 {"help", no_argument, NULL, 'h'},
                                                 {NULL, 0, NULL, 0}};
    mb_pretrain_options options = {0};
    const char *init_dir = NULL;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 'r': options.resume = 1; break;
        case 'm': options.max_steps = strtoll(optarg, NULL, 10); break;
        case 'i': init_dir = optarg; break;
        case 'd': mb_cfg_describe(mb_run_config_schema, stdout); return 0;
        case 'h': print_help(stdout); return 0;
        default: print_help(stderr); return 2;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "modernbert pretrain: a CONFIG.yaml is required (see --help)\n");
        return 2;
    }
    options.config_path = argv[optind];
    /* --init DIR is the override model.init=DIR, applied after the others */
    int override_count = argc - optind - 1;
    char **overrides = calloc((size_t)override_count + 1, sizeof *overrides);
    char init_override[1200];
    for (int i = 0; i < override_count; i++) overrides[i] = argv[optind + 1 + i];
    if (init_dir != NULL) {
        snprintf(init_override, sizeof init_override, "model.init=%s", init_dir);
        overrides[override_count++] = init_override;
    }
    options.overrides = overrides;
    options.override_count = override_count;
    options.stop_flag = &stop_requested_by_signal;
    mb_run_config *config = malloc(sizeof *config);
    mb_error err = {{0}};
    if (config == NULL ||
        mb_run_config_load(config, options.config_path, options.overrides, options.override_count, &err) != 0) {
        fprintf(stderr, "modernbert pretrain: %s\n", config ? err.message : "out of memory");
        free(config);
        free(overrides);
        return 2;
    }
    if (config->run.threads > 0) omp_set_num_threads(config->run.threads);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    int rc = mb_pretrain(config, &options, &err);
    if (rc != 0) fprintf(stderr, "modernbert pretrain: %s\n", err.message);
    free(config);
    free(overrides);
    return rc == 0 ? 0 : 1;
}
