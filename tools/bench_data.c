/* modernbert bench data: tokens per second of the data path, on a synthetic prose-like corpus held in memory
 * (lognormal document lengths, median 400 tokens, sigma 1.2, so ~23% of documents exceed 1024 and are chunked) and,
 * with --data, on real token shards (decompression included).
 *
 * Rows printed: packing alone (lengths only), masking alone, packing + reading + masking on the calling thread (one
 * core: the number that must reach 20M tokens/s), the loader with its prefetch thread as the trainer uses it.
 * Tokens are real (non-padding) tokens; packing efficiency = real tokens / (micro-batches × micro_tokens). */
#include "common/clock.h"
#include "bench_data.h"

#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/error.h"
#include "common/rng.h"
#include "data/loader.h"
#include "data/masking.h"
#include "data/packer.h"
#include "data/shards.h"

typedef struct bench_options {
    int32_t seq_len;
    int64_t tokens;
    int64_t micro_tokens;
    int64_t step_tokens;
    int64_t corpus_tokens;
    int32_t prefetch;
    const char *data;
} bench_options;

static void print_help(FILE *stream) {
    fprintf(stream,
            "usage: modernbert bench data [--seq-len N] [--tokens N] [--micro-tokens N] [--step-tokens N]\n"
            "                             [--corpus-tokens N] [--prefetch N] [--data GLOB]\n"
            "\n"
            "Measures the pretraining data path in tokens per second: best-fit packing alone, MLM masking alone,\n"
            "packing + reading + masking on one core (prefetch off), and the loader with its prefetch thread.\n"
            "The corpus is synthetic (lognormal prose-like lengths, random ids) unless --data names token shards,\n"
            "which adds shard decompression.\n"
            "\n"
            "  --seq-len N        max sequence length (default 1024)\n"
            "  --tokens N         real tokens to push through each measurement (default 100000000)\n"
            "  --micro-tokens N   micro-batch token budget (default 98304 = 96 x 1024, ModernBERT-base)\n"
            "  --step-tokens N    token slots per optimizer step (default 4718592 = 4608 x 1024)\n"
            "  --corpus-tokens N  size of the synthetic corpus (default 16000000; the loader cycles epochs)\n"
            "  --prefetch N       prefetch queue depth of the threaded run (default 4)\n"
            "  --data GLOB        token shards (comma-separated globs) to read instead of the synthetic corpus\n"
            "  --help             this text\n");
}

static int parse_int(const char *text, int64_t min, int64_t *out) {
    char *end;
    double value = strtod(text, &end); /* accepts 1e8 */
    if (*end != '\0' || value < (double)min || value > 9e18 || value != floor(value)) return -1;
    *out = (int64_t)value;
    return 0;
}

static int parse_options(int argc, char **argv, bench_options *o) {
    static const struct option long_options[] = {
        {"seq-len", required_argument, NULL, 's'},       {"tokens", required_argument, NULL, 't'},
        {"micro-tokens", required_argument, NULL, 'm'},  {"step-tokens", required_argument, NULL, 'S'},
        {"corpus-tokens", required_argument, NULL, 'c'}, {"prefetch", required_argument, NULL, 'p'},
        {"data", required_argument, NULL, 'd'},          {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    *o = (bench_options){.seq_len = 1024, .tokens = 100000000, .micro_tokens = 98304, .step_tokens = 4718592,
                         .corpus_tokens = 16000000, .prefetch = 4};
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        if (c == 'h') {
            print_help(stdout);
            return 1;
        }
        if (c == 'd') {
            o->data = optarg;
            continue;
        }
        int64_t value = 0;
        int bad = parse_int(optarg ? optarg : "", 1, &value);
        switch (c) {
        case 's': bad |= value > INT32_MAX; o->seq_len = (int32_t)value; break;
        case 't': o->tokens = value; break;
        case 'm': o->micro_tokens = value; break;
        case 'S': o->step_tokens = value; break;
        case 'c': o->corpus_tokens = value; break;
        case 'p': bad |= value > 1024; o->prefetch = (int32_t)value; break;
        default: print_help(stderr); return 2;
        }
        if (bad) {
            fprintf(stderr, "modernbert bench data: invalid value '%s' for an option (positive integer expected)\n",
                    optarg);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "modernbert bench data: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    return 0;
}


/* ---- synthetic corpus ---- */

typedef struct synthetic {
    int32_t *tokens;
    uint64_t *offsets;
    mb_memory_documents docs;
} synthetic;

static uint32_t prose_length(mb_rng *rng) {
    double length = exp(log(400.0) + 1.2 * mb_rng_normal(rng));
    return length < 1 ? 1 : length > 200000 ? 200000 : (uint32_t)length;
}

static int make_synthetic(synthetic *s, int64_t tokens, mb_error *err) {
    mb_rng rng;
    mb_rng_seed(&rng, 2998);
    size_t alloc = 1024, count = 0;
    s->offsets = malloc(alloc * sizeof *s->offsets);
    s->tokens = malloc((size_t)tokens * sizeof *s->tokens);
    if (!s->offsets || !s->tokens) return mb_fail(err, "bench: out of memory for %" PRId64 " tokens", tokens);
    s->offsets[0] = 0;
    while (s->offsets[count] < (uint64_t)tokens) {
        if (count + 2 > alloc) {
            uint64_t *grown = realloc(s->offsets, 2 * alloc * sizeof *grown);
            if (!grown) return mb_fail(err, "bench: out of memory");
            s->offsets = grown;
            alloc *= 2;
        }
        uint64_t length = prose_length(&rng);
        if (s->offsets[count] + length > (uint64_t)tokens) length = (uint64_t)tokens - s->offsets[count];
        s->offsets[count + 1] = s->offsets[count] + length;
        count++;
    }
    for (int64_t i = 0; i < tokens; i++) s->tokens[i] = (int32_t)mb_rng_below(&rng, 50280); /* non-special ids */
    s->docs = (mb_memory_documents){.tokens = s->tokens, .offsets = s->offsets, .count = count};
    return 0;
}

/* ---- measurements ---- */

typedef struct prose_stream {
    mb_rng rng;
    uint32_t left, seq_len;
    uint64_t next;
} prose_stream;

static int prose_next(void *context, mb_seq_ref *out, mb_error *err) {
    prose_stream *s = context;
    while (s->left == 0) s->left = prose_length(&s->rng);
    uint32_t n = s->left < s->seq_len ? s->left : s->seq_len;
    s->left -= n;
    *out = (mb_seq_ref){.document = s->next++, .length = n};
    return 0;
}

static int bench_packing(const bench_options *o, const mb_loader_config *config, mb_error *err) {
    mb_packer packer;
    int32_t batch = (int32_t)(o->step_tokens / o->seq_len);
    mb_packer_config pc = {.row_capacity = o->micro_tokens, .buffer_size = 5 * batch, .source_batch = batch};
    if (mb_packer_init(&packer, &pc, err)) return -1;
    prose_stream stream = {.seq_len = (uint32_t)o->seq_len};
    mb_rng_seed(&stream.rng, 17);
    int32_t rows = (int32_t)(config->step_tokens / config->micro_tokens);
    int64_t tokens = 0, slots = 0;
    double start = mb_clock_seconds(CLOCK_MONOTONIC);
    while (tokens < o->tokens) {
        mb_packed_rows out;
        if (mb_packer_pack(&packer, rows, prose_next, &stream, &out, err) != 1) {
            mb_packer_free(&packer);
            return -1;
        }
        tokens += out.token_count;
        slots += (int64_t)rows * o->micro_tokens;
    }
    double seconds = mb_clock_seconds(CLOCK_MONOTONIC) - start;
    printf("%-40s %8.1fM tokens/s   efficiency %.3f%%\n", "packing alone (lengths only)", tokens / seconds / 1e6,
           100.0 * (double)tokens / (double)slots);
    mb_packer_free(&packer);
    return 0;
}

static int bench_masking(const bench_options *o, const mb_loader_config *config, const synthetic *s, mb_error *err) {
    mb_masker masker;
    if (mb_masker_init(&masker, &config->masking, err)) return -1;
    size_t n = (size_t)o->micro_tokens;
    int32_t *ids = malloc(n * sizeof *ids), *labels = malloc(n * sizeof *labels);
    if (!ids || !labels) {
        free(ids), free(labels), mb_masker_free(&masker);
        return mb_fail(err, "bench: out of memory");
    }
    mb_rng rng;
    mb_rng_seed(&rng, 5);
    uint64_t corpus = s->docs.offsets[s->docs.count];
    int64_t tokens = 0;
    int rc = 0;
    double start = mb_clock_seconds(CLOCK_MONOTONIC);
    for (uint64_t at = 0; tokens < o->tokens && !rc; tokens += (int64_t)n, at = (at + n) % (corpus - n + 1)) {
        rc = mb_masker_apply(&masker, &rng, s->tokens + at, n, ids, labels, NULL, err);
    }
    double seconds = mb_clock_seconds(CLOCK_MONOTONIC) - start;
    if (!rc) printf("%-40s %8.1fM tokens/s\n", "masking alone", tokens / seconds / 1e6);
    free(ids), free(labels), mb_masker_free(&masker);
    return rc;
}

static int bench_loader(const bench_options *o, const mb_loader_config *config, const mb_doc_source *source,
                        const char *label, mb_error *err) {
    mb_loader *loader;
    double open_start = mb_clock_seconds(CLOCK_MONOTONIC);
    if (mb_loader_open(&loader, config, source, NULL, err)) {
        if (source->release) source->release(source->context); /* a failed open leaves the source with us */
        return -1;
    }
    double open_seconds = mb_clock_seconds(CLOCK_MONOTONIC) - open_start;
    int64_t tokens = 0, slots = 0, labels = 0, batches = 0, full = 0;
    int rc = 0;
    double wall = mb_clock_seconds(CLOCK_MONOTONIC), cpu = mb_clock_seconds(CLOCK_PROCESS_CPUTIME_ID);
    while (tokens < o->tokens) {
        mb_loader_batch b;
        if ((rc = mb_loader_next(loader, &b, err)) != 0) break;
        tokens += b.batch.token_count;
        slots += b.capacity;
        labels += b.label_count;
        full += b.batch.token_count == b.capacity; /* a full one has the GEMM shapes of every other full one */
        batches++;
    }
    wall = mb_clock_seconds(CLOCK_MONOTONIC) - wall;
    cpu = mb_clock_seconds(CLOCK_PROCESS_CPUTIME_ID) - cpu;
    mb_loader_close(loader);
    if (rc) return -1;
    printf("%-40s %8.1fM tokens/s   efficiency %.3f%%   labels %.2f%%   cpu %.2f cores   (%" PRId64
           " micro-batches, %.1f%% of them full, open %.2fs)\n", label, tokens / wall / 1e6,
           100.0 * (double)tokens / (double)slots, 100.0 * (double)labels / (double)tokens, cpu / wall, batches,
           batches > 0 ? 100.0 * (double)full / (double)batches : 0.0, open_seconds);
    return 0;
}

static int run(const bench_options *o, mb_error *err) {
    mb_loader_config config;
    mb_loader_config_default(&config);
    config.seed = 17;
    config.max_seq_len = o->seq_len;
    config.micro_tokens = o->micro_tokens;
    config.step_tokens = o->step_tokens;
    printf("seq_len %d, micro-batch %" PRId64 " tokens, step %" PRId64 " tokens (%" PRId64 " micro-batches), "
           "masking %.2f\n", o->seq_len, o->micro_tokens, o->step_tokens, o->step_tokens / o->micro_tokens,
           config.masking.rate);
    synthetic s = {0};
    int rc = make_synthetic(&s, o->corpus_tokens, err);
    if (!rc) rc = bench_packing(o, &config, err);
    if (!rc) rc = bench_masking(o, &config, &s, err);
    mb_doc_source memory = mb_doc_source_memory(&s.docs);
    config.prefetch = 0;
    if (!rc) rc = bench_loader(o, &config, &memory, "pack+read+mask, 1 core (memory)", err);
    config.prefetch = o->prefetch;
    if (!rc) rc = bench_loader(o, &config, &memory, "loader with prefetch thread (memory)", err);
    free(s.tokens);
    free(s.offsets);
    if (rc || !o->data) return rc;

    for (int threaded = 0; threaded < 2 && !rc; threaded++) {
        mb_shard_set *set;
        const char *patterns[1] = {o->data};
        if (mb_shard_set_open(&set, patterns, 1, 0, err)) return -1;
        uint32_t vocab = mb_shard_set_vocab_size(set);
        if ((int64_t)vocab > config.masking.vocab_size) config.masking.vocab_size = (int32_t)vocab;
        if (!threaded)
            printf("shards: %" PRIu64 " documents, %" PRIu64 " tokens, vocab %u\n", mb_shard_set_document_count(set),
                   mb_shard_set_token_count(set), vocab);
        mb_doc_source source;
        if (mb_doc_source_shards(&source, set, 1, err)) {
            mb_shard_set_close(set);
            return -1;
        }
        config.prefetch = threaded ? o->prefetch : 0;
        rc = bench_loader(o, &config, &source,
                          threaded ? "loader with prefetch thread (shards)" : "pack+read+mask, 1 core (shards)", err);
    }
    return rc;
}

int mb_bench_data(int argc, char **argv) {
    bench_options options;
    int parsed = parse_options(argc, argv, &options);
    if (parsed) return parsed == 1 ? 0 : parsed;
    mb_error err;
    mb_error_clear(&err);
    if (run(&options, &err)) {
        fprintf(stderr, "modernbert bench data: %s\n", err.message);
        return 1;
    }
    return 0;
}
