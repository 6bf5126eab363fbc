/* modernbert bench: throughput figures. `bench train` times training steps of a model on random packed batches
 * through the backend boundary; `bench data` and `bench tokenize` time the data pipeline. Timing lives here, never
 * in tests. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "../tools/bench_data.h"
#include "../tools/bench_tokenize.h"
#include "../tools/commands.h"
#include "common/rng.h"
#ifdef MB_HAVE_CUDA
#include "../cuda/ops.h"
#include "bench_attention.h"
#endif
#include "model/backend.h"
#include "model/flops.h"
#include "model/model.h"

/* Untimed passes over the timed steps' batches before the clock starts: the CUDA backend tunes a GEMM shape on its
 * MB_CUDA_GEMM_TUNE_SIGHTING-th sighting, and the timed steps must not pay for it. */
#define WARMUP_PASSES 3
#ifdef MB_HAVE_CUDA
_Static_assert(WARMUP_PASSES >= MB_CUDA_GEMM_TUNE_SIGHTING, "bench train's warm-up must cover the GEMM tuning");
#endif

typedef struct train_bench_options {
    const char *model;
    const char *backend;
    int seq_len;
    int micro_tokens;
    int steps;
    int accumulate; /* micro-batches per optimizer step (gradient accumulation, as the trainer's batch_tokens) */
    int warmup;
    int profile;
    mb_recompute recompute;
} train_bench_options;

/* The micro-batches of the timed steps, made before the clock starts: micro-batch i at offset i · tokens. */
typedef struct bench_batches {
    int count, tokens;
    int32_t *ids, *labels, *cu;
    int *sequences, *label_counts;
} bench_batches;

/* One micro-batch: `tokens` random ids in documents of seq_len tokens (the last one may be shorter), about 30 % of
 * them labelled. */
static void make_batch(mb_rng *rng, const mb_config *c, int seq_len, int tokens, int32_t *ids, int32_t *labels,
                       int32_t *cu, int *sequences, int *label_count) {
    int count = 0;
    cu[0] = 0;
    while (cu[count] < tokens) {
        int length = tokens - cu[count] < seq_len ? tokens - cu[count] : seq_len;
        cu[count + 1] = cu[count] + length;
        count++;
    }
    *label_count = 0;
    for (int i = 0; i < tokens; i++) {
        ids[i] = (int32_t)mb_rng_below(rng, (uint64_t)c->vocab_size);
        labels[i] = mb_rng_uniform(rng) < 0.3 ? ids[i] : -100;
        *label_count += labels[i] != -100;
    }
    *sequences = count;
}

static void bench_batches_free(bench_batches *b) {
    free(b->ids);
    free(b->labels);
    free(b->cu);
    free(b->sequences);
    free(b->label_counts);
    *b = (bench_batches){0, 0, NULL, NULL, NULL, NULL, NULL};
}

static int bench_batches_make(bench_batches *b, const mb_config *config, int seq_len, int tokens, int count,
                              mb_error *err) {
    *b = (bench_batches){count, tokens, NULL, NULL, NULL, NULL, NULL};
    size_t batch_ints = (size_t)tokens * count;
    b->ids = malloc(batch_ints * sizeof(int32_t));
    b->labels = malloc(batch_ints * sizeof(int32_t));
    b->cu = malloc(((size_t)tokens + 2) * count * sizeof(int32_t));
    b->sequences = malloc((size_t)count * sizeof(int));
    b->label_counts = malloc((size_t)count * sizeof(int));
    if (!b->ids || !b->labels || !b->cu || !b->sequences || !b->label_counts) {
        bench_batches_free(b);
        return mb_fail(err, "out of host memory for %d micro-batches of %d tokens", count, tokens);
    }
    mb_rng rng;
    mb_rng_seed(&rng, 3);
    for (int i = 0; i < count; i++)
        make_batch(&rng, config, seq_len, tokens, b->ids + (size_t)i * tokens, b->labels + (size_t)i * tokens,
                   b->cu + ((size_t)tokens + 2) * i, &b->sequences[i], &b->label_counts[i]);
    return 0;
}

static mb_batch bench_batch(const bench_batches *b, int i) {
    size_t offset = (size_t)i * b->tokens;
    return (mb_batch){b->tokens, b->sequences[i], b->ids + offset, b->cu + ((size_t)b->tokens + 2) * i,
                      b->labels + offset, NULL};
}

/* One optimizer step over micro-batches [first, first + count), as the trainer runs it: the gradients are zeroed
 * once, each backward adds its micro-batch's share of the mean loss over all their labels, one optimizer step. */
static int bench_step(mb_backend *backend, const bench_batches *b, int first, int count, mb_stableadamw *adamw,
                      mb_error *err) {
    int64_t labels = 0;
    for (int i = first; i < first + count; i++) labels += b->label_counts[i];
    if (labels == 0) return mb_fail(err, "micro-batches %d..%d have no labels", first, first + count - 1);
    if (backend->ops->zero_grads(backend, err) != 0) return -1;
    for (int i = first; i < first + count; i++) {
        mb_batch batch = bench_batch(b, i);
        mb_forward_result result;
        if (backend->ops->forward(backend, &batch, &result, err) != 0) return -1;
        if (backend->ops->backward(backend, (float)(1.0 / (double)labels), err) != 0) return -1;
    }
    return backend->ops->optimizer_step(backend, adamw, 1e-4, err);
}

static int run_train_bench(const train_bench_options *o) {
    mb_config config;
    mb_error err = {{0}};
    if (mb_config_preset(&config, o->model, &err) != 0) {
        fprintf(stderr, "modernbert bench: %s\n", err.message);
        return 2;
    }
    mb_backend *backend;
    if (o->profile) setenv("MB_PROFILE", "1", 1); /* read by the CUDA backend when it is created */
    if (mb_backend_create(&backend, o->backend, &config, &err) != 0) {
        fprintf(stderr, "modernbert bench: %s\n", err.message);
        return 1;
    }
    if (mb_backend_set_recompute(backend, o->recompute, &err) != 0) {
        fprintf(stderr, "modernbert bench: %s\n", err.message);
        mb_backend_destroy(backend);
        return 1;
    }
    mb_model host;
    mb_model_create(&host, &config, &err);
    mb_params_init(&host.table, &config, host.params, 1);
    backend->ops->write_params(backend, host.params, &err);
    /* Every batch is made before the clock starts, and the clock runs from a drained device after the warm-up steps
     * to a drained device after the last step (the method of tools/bench_hf.py). Until session 5 the clock ran per
     * step, from before the step's launches to the return of its last launch: the make_batch time between steps
     * was left out while the device kept working, and the last step's queued backward was never waited for.
     * The warm-up steps cycle through the timed steps' batches (session 10): the MLM head's row count follows each
     * batch's random label count, and the CUDA backend tunes a GEMM shape on one sighting (≈ 16 ms, once per shape,
     * docs/kernels/matmul.md). With warm-up batches of their own (2 until session 10), the timed steps met head
     * shapes seen too few times and paid for their tuning: at 98,304 tokens base ran at 409 k tokens/s instead of
     * 518 k. With the default of WARMUP_PASSES × --steps every shape of the timed steps has been tuned: they time a
     * long run's settled state. */
    int warmup = o->warmup >= 0 ? o->warmup : WARMUP_PASSES * o->steps, total_steps = warmup + o->steps;
    bench_batches batches;
    int rc = bench_batches_make(&batches, &config, o->seq_len, o->micro_tokens, o->steps * o->accumulate, &err);
    mb_stableadamw adamw;
    mb_stableadamw_init(&adamw, 1e-4, 1e-5);
    double start = 0.0, total = 0.0;
    for (int step = 0; rc == 0 && step < total_steps; step++) {
        if (step == warmup) {
            if (o->profile && backend->ops->profile != NULL) backend->ops->profile(backend, 1, NULL, 0);
            rc = mb_backend_synchronize(backend, &err);
            start = mb_monotonic_seconds();
            if (rc != 0) break;
        }
        int b = ((step - warmup) % o->steps + o->steps) % o->steps; /* timed step i runs the i-th group of batches */
        rc = bench_step(backend, &batches, b * o->accumulate, o->accumulate, &adamw, &err);
    }
    if (rc == 0) rc = mb_backend_synchronize(backend, &err);
    total = mb_monotonic_seconds() - start;
    if (rc != 0) {
        fprintf(stderr, "modernbert bench: %s\n", err.message);
    } else {
        double step_time = total / o->steps, tokens_per_second = (double)o->micro_tokens * o->accumulate / step_time;
        double flops = mb_model_flops_per_token(&config, o->seq_len, 0.3), peak = mb_backend_peak_flops(backend);
        char memory[256], mfu[64] = "";
        if (peak > 0) snprintf(mfu, sizeof mfu, " | MFU %.1f%% of %.0f TFLOP/s", 100.0 * tokens_per_second * flops / peak,
                               peak * 1e-12);
        backend->ops->memory_report(backend, memory, sizeof memory);
        char per_step[96];
        if (o->accumulate > 1)
            snprintf(per_step, sizeof per_step, "%d micro-batches of %d tokens per step", o->accumulate,
                     o->micro_tokens);
        else
            snprintf(per_step, sizeof per_step, "%d tokens per step", o->micro_tokens);
        printf("bench train: model %s, backend %s, seq_len %d, %s, recompute %s, %d timed steps after %d warm-up "
               "steps on the same batches\n", o->model, backend->ops->name, o->seq_len, per_step,
               mb_recompute_name(o->recompute), o->steps, warmup);
        printf("  step time %.3f s | %.0f tokens/s | %.2f TFLOP/s model FLOPs (%.3g GFLOP/token)%s | %s\n", step_time,
               tokens_per_second, tokens_per_second * flops * 1e-12, flops * 1e-9, mfu, memory);
        static char profile[8192];
        if (o->profile && backend->ops->profile != NULL && backend->ops->profile(backend, 0, profile, sizeof profile) == 0)
            printf("  device time per op family over the %d timed steps (cudaEvents between families; the step time "
                   "above includes their small overhead):\n%s", o->steps, profile);
        else if (o->profile)
            printf("  (no profile: the backend supports one only on CUDA)\n");
    }
    bench_batches_free(&batches);
    mb_model_free(&host);
    mb_backend_destroy(backend);
    return rc == 0 ? 0 : 1;
}

static int bench_train(int argc, char **argv) {
    static const struct option long_options[] = {
        {"model", required_argument, NULL, 'm'}, {"backend", required_argument, NULL, 'b'},
        {"seq", required_argument, NULL, 's'},   {"tokens", required_argument, NULL, 't'},
        {"steps", required_argument, NULL, 'n'}, {"help", no_argument, NULL, 'h'},
        {"profile", no_argument, NULL, 'p'},     {"recompute", required_argument, NULL, 'r'},
        {"warmup", required_argument, NULL, 'w'}, {"accumulate", required_argument, NULL, 'a'},
        {NULL, 0, NULL, 0}};
    train_bench_options o = {"tiny", "auto", 1024, 8192, 5, 1, -1, 0, MB_RECOMPUTE_NONE}; /* warmup -1: the default */
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 'm': o.model = optarg; break;
        case 'b': o.backend = optarg; break;
        case 's': o.seq_len = atoi(optarg); break;
        case 't': o.micro_tokens = atoi(optarg); break;
        case 'n': o.steps = atoi(optarg); break;
        case 'a': o.accumulate = atoi(optarg); break;
        case 'w':
            o.warmup = atoi(optarg);
            if (o.warmup < 0) {
                fprintf(stderr, "modernbert bench train: --warmup must be >= 0, got '%s'\n", optarg);
                return 2;
            }
            break;
        case 'p': o.profile = 1; break;
        case 'r':
            if (mb_recompute_from_name(optarg, &o.recompute) != 0) {
                fprintf(stderr, "modernbert bench train: --recompute '%s' is not none, norms or mlp\n", optarg);
                return 2;
            }
            break;
        case 'h':
            printf("usage: modernbert bench train [--model tiny|base|large] [--backend auto|cpu|cuda] [--seq N]\n"
                   "                              [--tokens N] [--accumulate N] [--steps N] [--warmup N] [--profile]\n"
                   "                              [--recompute none|norms|mlp]\n"
                   "Times --steps training steps on random packed micro-batches of --tokens tokens made of\n"
                   "--seq-token documents, from a drained device to a drained device, and prints the step time,\n"
                   "tokens/s, model TFLOP/s and MFU (FLOP convention of docs/performance.md). A step is\n"
                   "--accumulate micro-batches (default 1) of forward + backward with the gradients accumulated,\n"
                   "then one optimizer step, as the trainer runs batch_tokens = accumulate x micro_batch_tokens.\n"
                   "--warmup N untimed steps (default 3 x --steps) cycle through the timed steps' batches first, so\n"
                   "that the timed steps see a settled state (CUDA tunes a GEMM shape on its third sighting).\n"
                   "--profile adds the device time per op family (CUDA; MB_PROFILE=1);\n"
                   "--recompute sets which activations the backward rebuilds (run.recompute; CUDA).\n");
            return 0;
        default: return 2;
        }
    }
    if (o.seq_len < 1 || o.micro_tokens < o.seq_len || o.steps < 1 || o.accumulate < 1) {
        fprintf(stderr,
                "modernbert bench train: need --seq >= 1, --tokens >= --seq, --steps >= 1, --accumulate >= 1\n");
        return 2;
    }
    return run_train_bench(&o);
}

int mb_cmd_bench(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0) {
        printf("usage: modernbert bench train|data|tokenize|attention [options]   (each with --help)\n");
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "train") == 0) return bench_train(argc - 1, argv + 1);
    if (strcmp(argv[1], "data") == 0) return mb_bench_data(argc - 1, argv + 1);
    if (strcmp(argv[1], "tokenize") == 0) return mb_bench_tokenize(argc - 1, argv + 1);
#ifdef MB_HAVE_CUDA
    if (strcmp(argv[1], "attention") == 0) return mb_bench_attention(argc - 1, argv + 1);
#endif
    fprintf(stderr, "modernbert bench: unknown benchmark '%s' (train, data, tokenize)\n", argv[1]);
    return 2;
}
