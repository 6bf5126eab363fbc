/* modernbert bench tokenize: how fast the tokenizer turns text into ids.
 *
 * The input file is read as plain text and cut into documents at newlines (empty lines skipped); each document is
 * encoded without special tokens, as `modernbert tokenize` does per document. Throughput = input bytes of the
 * documents / wall time, and ids / wall time, on one thread and then on N threads that take documents from a shared
 * counter (the encoder is re-entrant: one loaded tokenizer serves every thread). Passes over the file repeat until
 * --min-seconds have elapsed; the N-thread run must produce exactly as many ids as the one-thread run. */
#include "common/clock.h"
#include "bench_tokenize.h"

#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "data/tokenizer.h"

typedef struct bench_options {
    const char *tokenizer_path;
    const char *input_path;
    int threads;
    double min_seconds;
} bench_options;

typedef struct document {
    const char *text;
    size_t length;
} document;

typedef struct corpus {
    char *data;
    document *documents;
    size_t count, bytes;
} corpus;

static void print_help(FILE *stream) {
    fprintf(stream,
            "usage: modernbert bench tokenize --input FILE [--tokenizer FILE] [--threads N] [--min-seconds S]\n"
            "\n"
            "Measures tokenizer throughput in MB/s and tokens/s on a text file, single-threaded and with N threads.\n"
            "The file is split into documents at newlines; each document is encoded without special tokens.\n"
            "\n"
            "  --input FILE        text to tokenize (required)\n"
            "  --tokenizer FILE    tokenizer.json (default data/tokenizer.json)\n"
            "  --threads N         threads for the parallel run (default: online CPUs; 1 = single run only)\n"
            "  --min-seconds S     repeat passes over the file until S seconds have elapsed (default 2)\n"
            "  --help              this text\n");
}

static int parse_options(int argc, char **argv, bench_options *o) {
    static const struct option long_options[] = {
        {"input", required_argument, NULL, 'i'},   {"tokenizer", required_argument, NULL, 't'},
        {"threads", required_argument, NULL, 'n'}, {"min-seconds", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0}};
    o->tokenizer_path = "data/tokenizer.json";
    o->input_path = NULL;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o->threads = cpus > 0 ? (int)cpus : 1;
    o->min_seconds = 2.0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        char *end = NULL;
        switch (c) {
        case 'i': o->input_path = optarg; break;
        case 't': o->tokenizer_path = optarg; break;
        case 'n':
            o->threads = (int)strtol(optarg, &end, 10);
            if (*end != '\0' || o->threads < 1 || o->threads > 1024) {
                fprintf(stderr, "bench tokenize: --threads: expected an integer in 1..1024, got '%s'\n", optarg);
                return 2;
            }
            break;
        case 's':
            o->min_seconds = strtod(optarg, &end);
            if (*end != '\0' || !(o->min_seconds >= 0)) {
                fprintf(stderr, "bench tokenize: --min-seconds: expected a number >= 0, got '%s'\n", optarg);
                return 2;
            }
            break;
        case 'h': print_help(stdout); return 1;
        default: print_help(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "bench tokenize: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (o->input_path == NULL) {
        fprintf(stderr, "bench tokenize: --input FILE is required\n\n");
        print_help(stderr);
        return 2;
    }
    return 0;
}

static int read_corpus(const char *path, corpus *c, mb_error *err) {
    size_t size;
    if (mb_read_file(path, &c->data, &size, err) != 0) return -1;
    size_t lines = 1;
    for (size_t i = 0; i < size; i++) lines += c->data[i] == '\n';
    c->documents = malloc(lines * sizeof *c->documents);
    if (c->documents == NULL) return mb_fail(err, "out of memory indexing %s", path);
    c->count = c->bytes = 0;
    for (size_t start = 0; start < size;) {
        const char *newline = memchr(c->data + start, '\n', size - start);
        size_t end = newline ? (size_t)(newline - c->data) : size;
        if (end > start) {
            c->documents[c->count++] = (document){c->data + start, end - start};
            c->bytes += end - start;
        }
        start = end + 1;
    }
    if (c->count == 0) return mb_fail(err, "%s: no text to tokenize", path);
    return 0;
}


typedef struct worker {
    const mb_tokenizer *tokenizer;
    const corpus *corpus;
    atomic_size_t *next; /* next document index, counted over all passes */
    size_t total;        /* documents to encode over all passes */
    size_t ids;
    int failed;
    mb_error err;
} worker;

static void *run_worker(void *arg) {
    worker *w = arg;
    mb_token_list ids = {0};
    for (;;) {
        size_t k = atomic_fetch_add(w->next, 1);
        if (k >= w->total) break;
        const document *d = &w->corpus->documents[k % w->corpus->count];
        ids.count = 0;
        if (mb_tokenizer_encode(w->tokenizer, d->text, d->length, &ids, &w->err) != 0) {
            w->failed = 1;
            break;
        }
        w->ids += ids.count;
    }
    mb_token_list_free(&ids);
    return NULL;
}

/* Encodes `passes` passes over the corpus with `threads` threads; returns wall seconds, or -1. */
static double timed_run(const mb_tokenizer *t, const corpus *c, int threads, size_t passes, size_t *ids) {
    atomic_size_t next = 0;
    worker *workers = calloc((size_t)threads, sizeof *workers);
    pthread_t *handles = calloc((size_t)threads, sizeof *handles);
    if (workers == NULL || handles == NULL) {
        free(workers);
        free(handles);
        fprintf(stderr, "bench tokenize: out of memory\n");
        return -1;
    }
    double start = mb_monotonic_seconds();
    int started = 0;
    for (int i = 0; i < threads; i++) {
        workers[i] = (worker){t, c, &next, c->count * passes, 0, 0, {{0}}};
        if (i == 0) continue; /* the calling thread is worker 0 */
        if (pthread_create(&handles[i], NULL, run_worker, &workers[i]) != 0) break;
        started++;
    }
    run_worker(&workers[0]);
    for (int i = 1; i <= started; i++) pthread_join(handles[i], NULL);
    double seconds = mb_monotonic_seconds() - start;
    *ids = 0;
    int failed = started != threads - 1;
    for (int i = 0; i < threads; i++) {
        *ids += workers[i].ids;
        if (workers[i].failed) {
            fprintf(stderr, "bench tokenize: %s\n", workers[i].err.message);
            failed = 1;
        }
    }
    free(workers);
    free(handles);
    return failed ? -1 : seconds;
}

/* Runs passes until min_seconds (one pass first to size the run); prints one line. */
static int measure(const mb_tokenizer *t, const corpus *c, int threads, double min_seconds, size_t *ids_per_pass) {
    size_t ids;
    double seconds = timed_run(t, c, threads, 1, &ids);
    if (seconds < 0) return -1;
    size_t passes = 1;
    if (seconds < min_seconds) {
        passes = (size_t)(min_seconds / (seconds > 1e-6 ? seconds : 1e-6)) + 1;
        seconds = timed_run(t, c, threads, passes, &ids);
        if (seconds < 0) return -1;
    }
    if (*ids_per_pass == 0) *ids_per_pass = ids / passes;
    if (ids != *ids_per_pass * passes) {
        fprintf(stderr, "bench tokenize: %d threads produced %zu ids over %zu passes, expected %zu per pass\n",
                threads, ids, passes, *ids_per_pass);
        return -1;
    }
    double mb = (double)c->bytes * (double)passes / 1e6;
    printf("%3d thread%s  %8.2f MB/s  %8.3f M tokens/s   (%zu passes, %.2f s)\n", threads, threads == 1 ? " " : "s",
           mb / seconds, (double)ids / seconds / 1e6, passes, seconds);
    return 0;
}

int mb_bench_tokenize(int argc, char **argv) {
    bench_options o;
    int rc = parse_options(argc, argv, &o);
    if (rc != 0) return rc == 1 ? 0 : rc;
    mb_error err = {{0}};
    mb_tokenizer *t = NULL;
    corpus c = {0};
    double load_start = mb_monotonic_seconds();
    if (mb_tokenizer_load(&t, o.tokenizer_path, &err) != 0 || read_corpus(o.input_path, &c, &err) != 0) {
        fprintf(stderr, "bench tokenize: %s\n", err.message);
        mb_tokenizer_free(t);
        free(c.data);
        free(c.documents);
        return 1;
    }
    printf("tokenizer %s (vocabulary %d, loaded in %.3f s)\n", o.tokenizer_path, mb_tokenizer_vocab_size(t),
           mb_monotonic_seconds() - load_start);
    printf("input     %s (%.2f MB in %zu documents)\n", o.input_path, (double)c.bytes / 1e6, c.count);
    size_t ids_per_pass = 0;
    rc = measure(t, &c, 1, o.min_seconds, &ids_per_pass);
    if (rc == 0 && o.threads > 1) rc = measure(t, &c, o.threads, o.min_seconds, &ids_per_pass);
    if (rc == 0)
        printf("%zu tokens per pass, %.2f bytes per token\n", ids_per_pass, (double)c.bytes / (double)ids_per_pass);
    mb_tokenizer_free(t);
    free(c.data);
    free(c.documents);
    return rc == 0 ? 0 : 1;
}
