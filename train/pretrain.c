/* modernbert pretrain CONFIG.yaml [key=value ...]: the front end of the pretraining loop (src/train/trainer.c). */
#include <getopt.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tools/commands.h"
#include "dist/env.h"
#include "dist/launcher.h"
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
            "  --help           this text\n"
            "\n"
            "Data parallelism (one process per GPU, NCCL, ZeRO-1; docs/distributed.md):\n"
            "  --nproc-per-node N   start and supervise N workers on this node (GPU i for local rank i)\n"
            "  --nnodes N           nodes in the run (env NNODES; default 1)\n"
            "  --node-rank K        this node's index (env NODE_RANK; default 0)\n"
            "  --master-addr HOST   rank 0's address for the rendezvous (env MASTER_ADDR; default 127.0.0.1)\n"
            "  --master-port PORT   its TCP port (env MASTER_PORT; default 29500)\n"
            "Without --nproc-per-node the process joins a group described by the environment: torchrun-style\n"
            "RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, Slurm (srun: SLURM_PROCID, SLURM_NTASKS,\n"
            "SLURM_LOCALID) or Open MPI (mpirun: OMPI_COMM_WORLD_*). Only rank 0 prints and writes files.\n");
}

/* The options that belong to the launcher, not to the workers. */
static int is_launcher_option(const char *arg, int *takes_value) {
    static const char *const names[] = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                                        "--master-port"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        size_t length = strlen(names[i]);
        if (strncmp(arg, names[i], length) != 0) continue;
        if (arg[length] == '\0') {
            *takes_value = 1;
            return 1;
        }
        if (arg[length] == '=') {
            *takes_value = 0;
            return 1;
        }
    }
    return 0;
}

/* --nproc-per-node N: this process becomes the launcher of N workers running the same command line minus the
 * launcher options; returns the exit code to report. */
static int launch_workers(int argc, char **original_argv, const mb_launch_options *options) {
    char **worker_argv = calloc((size_t)argc + 2, sizeof *worker_argv);
    if (worker_argv == NULL) return 1;
    int count = 0;
    worker_argv[count++] = "modernbert";
    for (int i = 0; i < argc; i++) {
        int takes_value = 0;
        if (i > 0 && is_launcher_option(original_argv[i], &takes_value)) {
            i += takes_value;
            continue;
        }
        worker_argv[count++] = original_argv[i];
    }
    worker_argv[count] = NULL;
    printf("launcher: %d workers on node %d of %d, rendezvous %s:%d\n", options->nproc_per_node, options->node_rank,
           options->nnodes, options->master_addr, options->master_port);
    fflush(stdout);
    mb_error err = {{0}};
    int exit_code = 1;
    if (mb_launch_workers(options, "/proc/self/exe", worker_argv, &exit_code, &err) != 0) {
        fprintf(stderr, "modernbert pretrain: launcher: %s\n", err.message);
        exit_code = 1;
    }
    free(worker_argv);
    return exit_code;
}

/* Ranks other than 0 keep stderr (errors, prefixed with their rank) but not stdout: rank 0 logs for the run.
 * MB_LOG_ALL_RANKS=1 keeps every rank's output (debugging). */
static void quiet_other_ranks(const mb_dist_env *env) {
    if (env->rank == 0) return;
    const char *keep = getenv("MB_LOG_ALL_RANKS");
    if (keep != NULL && strcmp(keep, "1") == 0) return;
    if (freopen("/dev/null", "w", stdout) == NULL) fprintf(stderr, "rank %d: cannot silence stdout\n", env->rank);
}

int mb_cmd_pretrain(int argc, char **argv) {
    static const struct option long_options[] = {{"resume", no_argument, NULL, 'r'},
                                                 {"max-steps", required_argument, NULL, 'm'},
                                                 {"describe", no_argument, NULL, 'd'},
                                                 {"init", required_argument, NULL, 'i'},
                                                 {"help", no_argument, NULL, 'h'},
                                                 {"nproc-per-node", required_argument, NULL, 'N'},
                                                 {"nnodes", required_argument, NULL, 'n'},
                                                 {"node-rank", required_argument, NULL, 'k'},
                                                 {"master-addr", required_argument, NULL, 'a'},
                                                 {"master-port", required_argument, NULL, 'p'},
                                                 {NULL, 0, NULL, 0}};
    mb_pretrain_options options = {0};
    const char *init_dir = NULL;
    mb_launch_options launch;
    mb_error launch_err = {{0}};
    if (mb_launch_options_from_env(&launch, NULL, NULL, &launch_err) != 0) {
        fprintf(stderr, "modernbert pretrain: %s\n", launch_err.message);
        return 2;
    }
    int nproc_per_node = 0, launch_requested = 0; /* without --nproc-per-node this process is a worker */
    char **original_argv = malloc(((size_t)argc + 1) * sizeof *original_argv);  /* getopt reorders argv */
    if (original_argv == NULL) return 1;
    memcpy(original_argv, argv, ((size_t)argc + 1) * sizeof *original_argv);
    optind = 1;
    int c;
    char *end = NULL;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 'r': options.resume = 1; break;
        case 'm': options.max_steps = strtoll(optarg, NULL, 10); break;
        case 'i': init_dir = optarg; break;
        case 'd': mb_cfg_describe(mb_run_config_schema, stdout); free(original_argv); return 0;
        case 'h': print_help(stdout); free(original_argv); return 0;
        case 'N':
            nproc_per_node = (int)strtol(optarg, &end, 10);
            launch_requested = 1;
            break;
        case 'n': launch.nnodes = (int)strtol(optarg, &end, 10); break;
        case 'k': launch.node_rank = (int)strtol(optarg, &end, 10); break;
        case 'a': snprintf(launch.master_addr, sizeof launch.master_addr, "%s", optarg); break;
        case 'p': launch.master_port = (int)strtol(optarg, &end, 10); break;
        default: print_help(stderr); free(original_argv); return 2;
        }
        if (end != NULL && (*end != '\0' || end == optarg)) {
            fprintf(stderr, "modernbert pretrain: '%s' is not a whole number\n", optarg);
            free(original_argv);
            return 2;
        }
        end = NULL;
    }
    if (launch_requested) {
        if (nproc_per_node < 1 || launch.nnodes < 1 || launch.node_rank < 0 || launch.node_rank >= launch.nnodes) {
            fprintf(stderr, "modernbert pretrain: --nproc-per-node must be >= 1 and --node-rank in [0, --nnodes)\n");
            free(original_argv);
            return 2;
        }
        launch.nproc_per_node = nproc_per_node;
        int exit_code = launch_workers(argc, original_argv, &launch);
        free(original_argv);
        return exit_code;
    }
    free(original_argv);
    /* where this process stands (one process, or a rank of a group the environment describes): read once */
    mb_dist_env env;
    mb_error env_err = {{0}};
    if (mb_dist_env_detect(&env, NULL, NULL, &env_err) != 0) {
        fprintf(stderr, "modernbert pretrain: %s\n", env_err.message);
        return 1;
    }
    quiet_other_ranks(&env);
    options.dist_env = &env;
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
    if (rc != 0) {
        if (env.world_size > 1 && strncmp(err.message, "rank ", 5) != 0)
            fprintf(stderr, "modernbert pretrain: rank %d: %s\n", env.rank, err.message);
        else
            fprintf(stderr, "modernbert pretrain: %s\n", err.message);
    }
    free(config);
    free(overrides);
    return rc == 0 ? 0 : 1;
}
