/* modernbert bench attention: forward and backward time of the CUDA attention kernels on a packed batch of --tokens
 * tokens cut into --seq-token documents (the last one shorter), random bf16 q, k, v and dout (normal, std 1).
 *
 * Reported per case: median time over --iters launches (CUDA events, 3 warm-up launches), TFLOP/s counting only the
 * in-document, in-window (query, key) pairs (FlashAttention convention: forward 4·d FLOPs per pair and head,
 * backward 10·d), and the floor of docs/kernels/attention.md: max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s), H100 SXM
 * datasheet figures (forward bytes: qkv read, out and lse written; backward: qkv, out, dout, lse read, dqkv written).
 * Timing lives here, never in tests. */
#include "bench_attention.h"

#include <cuda_runtime_api.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../cuda/ops.h"
#include "common/rng.h"

#define PEAK_FLOPS 989e12
#define PEAK_BYTES_PER_SECOND 3.35e12

typedef struct attention_bench_options {
    int seq, tokens, heads, head_dim, window, both_windows, deterministic, iters, rope;
} attention_bench_options;

typedef struct attention_bench_buffers {
    mb_bf16 *qkv, *out, *dout, *dqkv;
    float *lse, *rope_table; /* rope_table: with --rope, the angles of each token (theta 10000) */
    int32_t *cu, *positions;
    void *workspace;
} attention_bench_buffers;

/* (query, key) pairs inside a document of `length` tokens with |i − j| <= window (window < 0: all). */
static double document_pairs(int length, int window) {
    if (window < 0 || window >= length) return (double)length * length;
    double pairs = 0.0;
    for (int i = 0; i < length; i++) {
        int lo = i - window < 0 ? 0 : i - window, hi = i + window > length - 1 ? length - 1 : i + window;
        pairs += hi - lo + 1;
    }
    return pairs;
}

static int check_cuda(cudaError_t status, const char *what) {
    if (status == cudaSuccess) return 0;
    fprintf(stderr, "modernbert bench attention: %s: %s\n", what, cudaGetErrorString(status));
    return -1;
}

static int upload_random(mb_bf16 **device, size_t count, mb_rng *rng) {
    mb_bf16 *host = malloc(count * sizeof(mb_bf16));
    if (host == NULL) return -1;
    for (size_t i = 0; i < count; i++) host[i] = mb_bf16_from_float((float)mb_rng_normal(rng));
    int rc = check_cuda(cudaMalloc((void **)device, count * sizeof(mb_bf16)), "cudaMalloc");
    if (rc == 0) rc = check_cuda(cudaMemcpy(*device, host, count * sizeof(mb_bf16), cudaMemcpyHostToDevice), "upload");
    free(host);
    return rc;
}

static int compare_floats(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median milliseconds of `iters` launches of forward (backward = 0) or backward, after 3 warm-ups. */
static int time_pass(const attention_bench_options *o, const attention_bench_buffers *b, int num_seqs, int window,
                     int backward, double *median_ms) {
    int n = o->tokens, total = 3 + o->iters, rc = 0;
    cudaEvent_t *events = malloc((size_t)(total + 1) * sizeof(cudaEvent_t));
    float *ms = malloc((size_t)o->iters * sizeof(float));
    for (int i = 0; i <= total; i++) cudaEventCreate(&events[i]);
    mb_error err = {{0}};
    cudaEventRecord(events[0], 0);
    for (int i = 0; rc == 0 && i < total; i++) {
        if (backward && o->rope)
            rc = mb_cuda_attention_backward_rope(b->dqkv, b->workspace, b->dout, b->out, b->lse, b->qkv, b->cu,
                                                 num_seqs, n, o->heads, o->head_dim, window, o->deterministic,
                                                 b->rope_table, 0, &err);
        else if (backward)
            rc = mb_cuda_attention_backward(b->dqkv, b->workspace, b->dout, b->out, b->lse, b->qkv, b->cu, num_seqs, n,
                                            o->heads, o->head_dim, window, o->deterministic, 0, &err);
        else
            rc = mb_cuda_attention_forward(b->out, b->lse, b->workspace, b->qkv, b->cu, num_seqs, n, o->heads,
                                           o->head_dim, window, 0, &err);
        cudaEventRecord(events[i + 1], 0);
    }
    if (rc != 0) fprintf(stderr, "modernbert bench attention: %s\n", err.message);
    if (rc == 0) rc = check_cuda(cudaDeviceSynchronize(), backward ? "attention backward" : "attention forward");
    for (int i = 0; rc == 0 && i < o->iters; i++) cudaEventElapsedTime(&ms[i], events[3 + i], events[4 + i]);
    if (rc == 0) {
        qsort(ms, (size_t)o->iters, sizeof(float), compare_floats);
        *median_ms = o->iters % 2 ? ms[o->iters / 2] : 0.5 * (ms[o->iters / 2 - 1] + ms[o->iters / 2]);
    }
    for (int i = 0; i <= total; i++) cudaEventDestroy(events[i]);
    free(events), free(ms);
    return rc;
}

static void print_case(const char *pass, const attention_bench_options *o, int window, double ms, double flops,
                       double bytes) {
    double compute_s = flops / PEAK_FLOPS, memory_s = bytes / PEAK_BYTES_PER_SECOND;
    double floor_ms = 1e3 * (compute_s > memory_s ? compute_s : memory_s);
    const int is_backward = strcmp(pass, "backward") == 0;
    const char *mode = !is_backward ? "" : o->deterministic ? " (deterministic)" : " (atomic)";
    const char *rope = is_backward && o->rope ? " with RoPE in the stores" : ""; /* the floor leaves out the table */
    printf("attention %s%s%s  seq %d  window %d  d %d  heads %d: %.3f ms  %.1f TFLOP/s  floor %.3f ms (%s)  "
           "%.2fx floor\n",
           pass, mode, rope, o->seq, window, o->head_dim, o->heads, ms, flops / (ms * 1e-3) / 1e12, floor_ms,
           compute_s > memory_s ? "compute" : "memory", ms / floor_ms);
}

static int run_case(const attention_bench_options *o, const attention_bench_buffers *b, const int32_t *cu_host,
                    int num_seqs, int window) {
    double pairs = 0.0;
    for (int s = 0; s < num_seqs; s++) pairs += document_pairs(cu_host[s + 1] - cu_host[s], window);
    double n = o->tokens, hidden = (double)o->heads * o->head_dim;
    double fwd_flops = 4.0 * o->head_dim * o->heads * pairs, bwd_flops = 2.5 * fwd_flops;
    double fwd_bytes = n * (3 * hidden * 2 + hidden * 2 + o->heads * 4.0);
    double bwd_bytes = n * (3 * hidden * 2 + 2 * hidden * 2 + o->heads * 4.0 + 3 * hidden * 2);
    double fwd_ms, bwd_ms;
    if (time_pass(o, b, num_seqs, window, 0, &fwd_ms) != 0) return 1;
    print_case("forward", o, window, fwd_ms, fwd_flops, fwd_bytes);
    if (o->rope && !mb_cuda_attention_backward_fuses_rope(o->head_dim, window, o->deterministic)) {
        printf("attention backward  window %d: no kernel applies RoPE in its stores here (--rope skipped)\n", window);
        return 0;
    }
    if (time_pass(o, b, num_seqs, window, 1, &bwd_ms) != 0) return 1;
    print_case("backward", o, window, bwd_ms, bwd_flops, bwd_bytes);
    return 0;
}

static int run_attention_bench(const attention_bench_options *o) {
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
        printf("no usable CUDA device\n");
        return 2;
    }
    int num_seqs = (o->tokens + o->seq - 1) / o->seq, n = o->tokens;
    int32_t *cu_host = malloc((size_t)(num_seqs + 1) * sizeof(int32_t));
    for (int s = 0; s <= num_seqs; s++) cu_host[s] = s * o->seq < n ? s * o->seq : n;
    size_t hidden = (size_t)o->heads * o->head_dim;
    attention_bench_buffers b;
    memset(&b, 0, sizeof b);
    mb_rng rng;
    mb_rng_seed(&rng, 11);
    size_t workspace_bytes = mb_cuda_attention_workspace_bytes(n, num_seqs, o->heads, o->head_dim);
    int rc = upload_random(&b.qkv, (size_t)n * 3 * hidden, &rng);
    if (rc == 0) rc = upload_random(&b.dout, (size_t)n * hidden, &rng);
    if (rc == 0) rc = check_cuda(cudaMalloc((void **)&b.out, (size_t)n * hidden * sizeof(mb_bf16)), "cudaMalloc");
    if (rc == 0) rc = check_cuda(cudaMalloc((void **)&b.dqkv, (size_t)n * 3 * hidden * sizeof(mb_bf16)), "cudaMalloc");
    if (rc == 0) rc = check_cuda(cudaMalloc((void **)&b.lse, (size_t)n * o->heads * sizeof(float)), "cudaMalloc");
    if (rc == 0) rc = check_cuda(cudaMalloc((void **)&b.cu, (size_t)(num_seqs + 1) * sizeof(int32_t)), "cudaMalloc");
    if (rc == 0) rc = check_cuda(cudaMalloc(&b.workspace, workspace_bytes), "cudaMalloc");
    if (rc == 0)
        rc = check_cuda(cudaMemcpy(b.cu, cu_host, (size_t)(num_seqs + 1) * sizeof(int32_t), cudaMemcpyHostToDevice),
                        "upload");
    if (rc == 0 && o->rope) {
        mb_error err = {{0}};
        rc = check_cuda(cudaMalloc((void **)&b.positions, (size_t)n * sizeof(int32_t)), "cudaMalloc");
        if (rc == 0)
            rc = check_cuda(cudaMalloc((void **)&b.rope_table, (size_t)n * o->head_dim * sizeof(float)), "cudaMalloc");
        if (rc == 0 && (mb_cuda_positions(b.positions, b.cu, num_seqs, n, 0, &err) != 0 ||
                        mb_cuda_rope_table(b.rope_table, b.positions, n, o->head_dim, 10000.0, 0, &err) != 0)) {
            fprintf(stderr, "modernbert bench attention: %s\n", err.message);
            rc = 1;
        }
    }
    if (rc == 0) {
        printf("attention bench: %d tokens, %d documents of %d, heads %d, head_dim %d, %s backward, median of %d\n", n,
               num_seqs, o->seq, o->heads, o->head_dim, o->deterministic ? "deterministic" : "atomic", o->iters);
        static const int windows[2] = {-1, 64};
        for (int c = 0; rc == 0 && c < (o->both_windows ? 2 : 1); c++)
            rc = run_case(o, &b, cu_host, num_seqs, o->both_windows ? windows[c] : o->window);
    } else {
        rc = 1;
    }
    cudaFree(b.qkv), cudaFree(b.out), cudaFree(b.dout), cudaFree(b.dqkv), cudaFree(b.lse), cudaFree(b.cu);
    cudaFree(b.workspace), cudaFree(b.positions), cudaFree(b.rope_table);
    free(cu_host);
    return rc;
}

int mb_bench_attention(int argc, char **argv) {
    static const struct option long_options[] = {
        {"seq", required_argument, NULL, 's'},      {"tokens", required_argument, NULL, 't'},
        {"heads", required_argument, NULL, 'H'},    {"head-dim", required_argument, NULL, 'd'},
        {"window", required_argument, NULL, 'w'},   {"deterministic", required_argument, NULL, 'D'},
        {"iters", required_argument, NULL, 'i'},    {"rope", no_argument, NULL, 'r'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0}};
    attention_bench_options o = {1024, 32768, 12, 64, -1, 1, 0, 20, 0};
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 's': o.seq = atoi(optarg); break;
        case 't': o.tokens = atoi(optarg); break;
        case 'H': o.heads = atoi(optarg); break;
        case 'd': o.head_dim = atoi(optarg); break;
        case 'w': o.window = atoi(optarg), o.both_windows = 0; break;
        case 'D': o.deterministic = atoi(optarg); break;
        case 'i': o.iters = atoi(optarg); break;
        case 'r': o.rope = 1; break;
        case 'h':
            printf("usage: modernbert bench attention [--seq S] [--tokens N] [--heads H] [--head-dim 32|64|128]\n"
                   "                                  [--window W] [--deterministic 0|1] [--iters N] [--rope]\n"
                   "Times the CUDA attention forward and backward on --tokens tokens packed from --seq-token\n"
                   "documents (defaults 1024, 32768, 12 heads of 64). --window -1 is global; without --window both\n"
                   "global and window 64 run. Prints the median time, TFLOP/s over in-document in-window pairs and the\n"
                   "floor of docs/kernels/attention.md. --rope times the backward that applies RoPE's backward\n"
                   "in its dQ and dK stores (mb_cuda_attention_backward_rope, as training runs it) instead of the\n"
                   "plain one.\n");
            return 0;
        default: return 2;
        }
    }
    if (o.seq < 1 || o.tokens < o.seq || o.heads < 1 || o.iters < 1 || o.window < -1 ||
        (o.deterministic != 0 && o.deterministic != 1) ||
        (o.head_dim != 32 && o.head_dim != 64 && o.head_dim != 128)) {
        fprintf(stderr, "modernbert bench attention: need --seq >= 1, --tokens >= --seq, --heads >= 1, --iters >= 1, "
                        "--window >= -1, --deterministic 0|1, --head-dim 32|64|128\n");
        return 2;
    }
    return run_attention_bench(&o);
}
