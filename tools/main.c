/* build/modernbert: one binary, one subcommand per job. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "commands.h"

typedef struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} command;

static const command commands[] = {
    {"pretrain", mb_cmd_pretrain, "pretrain a model with MLM from token shards (phases, checkpoints, resume)"},
    {"check", mb_cmd_check, "run one forward/backward of a checkpoint on a batch; write loss, logits, gradients"},
    {"plot", mb_cmd_plot, "draw a run's loss and learning-rate curves to PNG"},
    {"bench", mb_cmd_bench, "measure training, data-loading and tokenizer throughput"},
    {"tokenize", mb_cmd_tokenize, "turn text or JSONL files into token shards"},
    {"finetune", mb_cmd_finetune, "fine-tune a checkpoint on a GLUE task (classification or regression head)"},
    {"eval", mb_cmd_eval, "score a fine-tuned checkpoint on GLUE dev splits; write test predictions"},
    {"glue", mb_cmd_glue, "fine-tune on a list of GLUE tasks and write the paper's Table 5 layout"},
};

static void print_usage(FILE *stream) {
    fprintf(stream, "modernbert.c — a C/CUDA trainer for ModernBERT encoders\n\n");
    fprintf(stream, "usage: modernbert <command> [options]   (modernbert <command> --help for its options)\n\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(stream, "  %-10s %s\n", commands[i].name, commands[i].summary);
}

/* Debian's OpenBLAS 0.3.21 falls back to its generic SSE3 ("Prescott") kernels on CPUs it does not recognise (newer
 * Xeons in virtual machines report an unknown model), which runs the CPU backend's GEMMs at about half speed. When that
 * happened and the CPU has AVX-512 or AVX2, restart once with OPENBLAS_CORETYPE naming the matching kernels (the
 * library reads it only at load time). A user's own OPENBLAS_CORETYPE always wins; MB_KEEP_BLAS_CORE=1 disables this. */
static void choose_blas_kernels(char **argv) {
    if (getenv("OPENBLAS_CORETYPE") != NULL || getenv("MB_KEEP_BLAS_CORE") != NULL) return;
    const char *core = openblas_get_corename();
    if (core == NULL || strcasecmp(core, "prescott") != 0) return;
    __builtin_cpu_init();
    const char *better = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : NULL;
    if (better == NULL) return;
    setenv("OPENBLAS_CORETYPE", better, 1);
    execv("/proc/self/exe", argv);  /* returns only on failure: then carry on with the generic kernels */
}

int main(int argc, char **argv) {
    choose_blas_kernels(argv);
    setvbuf(stdout, NULL, _IOLBF, 0);  /* progress lines reach log files as they happen */
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        print_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "modernbert: unknown command '%s'\n\n", argv[1]);
    print_usage(stderr);
    return 2;
}
