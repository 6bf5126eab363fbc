/* modernbert tokenize: text or JSONL files (optionally .zst-compressed) → token shards (docs/data-format.md).
 *
 * Pipeline: the main thread reads inputs into batches of whole documents (a batch never spans two input files),
 * worker threads tokenize batches (and parse JSONL lines), and the main thread writes finished batches strictly in
 * input order, so the output is byte-identical for any --threads. Each kept document gets an output index k
 * (0, 1, 2, ... in input order, skipped empty documents not counted); it goes to the validation split when
 * uniform(seed, stream k) < --val-fraction (src/common/rng.h), else to train. A shard is closed (written to a temp
 * name, fsynced, renamed) once it holds at least --shard-tokens tokens; documents never straddle shards. */
#include <errno.h>
#include <getopt.h>
#include <glob.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <zstd.h>

#include "common/clock.h"
#include "commands.h"
#include "common/error.h"
#include "common/fileio.h"
#include "common/rng.h"
#include "data/shard_writer.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "progress.h"

#define BATCH_TEXT_BYTES (1u << 20) /* a batch is cut after ~1 MiB of text ... */
#define BATCH_MAX_DOCS 4096u        /* ... or this many documents */
#define READ_CHUNK (1u << 17)

typedef enum { FORMAT_AUTO, FORMAT_TEXT, FORMAT_JSONL } input_format;
typedef enum { SEP_FILE, SEP_BLANK_LINE, SEP_LINE } doc_separator;

typedef struct tokenize_options {
    const char *tokenizer_path;
    const char *output_dir;
    const char *jsonl_field;
    const char *prefix;
    input_format format;
    doc_separator separator;
    uint64_t shard_tokens;
    uint32_t block_tokens;
    int zstd_level;
    double val_fraction;
    uint64_t seed;
    int threads;
    int add_special;
    int overwrite;
    int quiet;
    char **inputs;
    int input_count;
} tokenize_options;

static void print_help(FILE *stream) {
    fprintf(stream,
        "usage: modernbert tokenize --output DIR [options] INPUT...\n"
        "\n"
        "Tokenizes text or JSONL files into token shards (DIR/train-NNNNNN.mbs, DIR/val-NNNNNN.mbs; format in\n"
        "docs/data-format.md) for `modernbert pretrain`. Inputs ending in .zst are decompressed on the fly; '-' reads\n"
        "standard input. Output does not depend on --threads.\n"
        "\n"
        "  --tokenizer FILE        tokenizer.json (default data/tokenizer.json)\n"
        "  --output DIR            where the shards go (created if missing)\n"
        "  --format F              auto (default: jsonl for *.jsonl, *.ndjson, *.json (+.zst), else text), text, jsonl\n"
        "  --jsonl-field NAME      JSONL: the string field holding the document (default text)\n"
        "  --doc-separator S       text: how a file splits into documents:\n"
        "                            file        the whole file is one document (default)\n"
        "                            blank-line  paragraphs: runs of non-blank lines, joined with \\n\n"
        "                            line        every non-empty line is a document\n"
        "  --shard-tokens N        close a shard once it holds N tokens (default 67108864)\n"
        "  --block-tokens N        tokens per zstd block inside a shard (default 16384)\n"
        "  --zstd-level N          zstd level 1..22 (default 3)\n"
        "  --val-fraction F        fraction of documents for the validation split, 0 <= F < 1 (default 0)\n"
        "  --seed S                seed of the train/val split (default 0)\n"
        "  --threads N             tokenizer threads (default: all CPUs)\n"
        "  --prefix NAME           name shards NAME-train-NNNNNN.mbs / NAME-val-NNNNNN.mbs\n"
        "  --add-special-tokens    wrap each document as [CLS] text [SEP] (default, as ModernBERT's data was)\n"
        "  --no-special-tokens     store the bare text tokens\n"
        "  --overwrite             delete existing shards with the same prefix in DIR first (else an error)\n"
        "  --quiet                 no progress output\n"
        "  --help                  this text\n"
        "\n"
        "Documents whose text is empty or only whitespace are skipped (and counted). A JSONL line that is not a\n"
        "JSON object with a string field NAME is an error naming the file and line. On any error the shards this\n"
        "run already wrote are removed.\n");
}

static int parse_u64(const char *text, uint64_t *value) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || text[0] == '-') return -1;
    *value = v;
    return 0;
}

/* Returns 0 to run, 1 to exit successfully (--help), 2 on a usage error. */
static int parse_options(int argc, char **argv, tokenize_options *o) {
    enum { OPT_TOKENIZER = 256, OPT_OUTPUT, OPT_FORMAT, OPT_FIELD, OPT_SEPARATOR, OPT_SHARD_TOKENS, OPT_BLOCK_TOKENS,
           OPT_LEVEL, OPT_VAL, OPT_SEED, OPT_THREADS, OPT_PREFIX, OPT_SPECIAL, OPT_NO_SPECIAL, OPT_OVERWRITE,
           OPT_QUIET, OPT_HELP };
    static const struct option long_options[] = {
        {"tokenizer", required_argument, NULL, OPT_TOKENIZER}, {"output", required_argument, NULL, OPT_OUTPUT},
        {"format", required_argument, NULL, OPT_FORMAT},       {"jsonl-field", required_argument, NULL, OPT_FIELD},
        {"doc-separator", required_argument, NULL, OPT_SEPARATOR},
        {"shard-tokens", required_argument, NULL, OPT_SHARD_TOKENS},
        {"block-tokens", required_argument, NULL, OPT_BLOCK_TOKENS},
        {"zstd-level", required_argument, NULL, OPT_LEVEL},    {"val-fraction", required_argument, NULL, OPT_VAL},
        {"seed", required_argument, NULL, OPT_SEED},           {"threads", required_argument, NULL, OPT_THREADS},
        {"prefix", required_argument, NULL, OPT_PREFIX},       {"add-special-tokens", no_argument, NULL, OPT_SPECIAL},
        {"no-special-tokens", no_argument, NULL, OPT_NO_SPECIAL},
        {"overwrite", no_argument, NULL, OPT_OVERWRITE},       {"quiet", no_argument, NULL, OPT_QUIET},
        {"help", no_argument, NULL, OPT_HELP},                 {NULL, 0, NULL, 0}};
    memset(o, 0, sizeof *o);
    o->tokenizer_path = "data/tokenizer.json";
    o->jsonl_field = "text";
    o->prefix = "";
    o->shard_tokens = 1ull << 26;
    o->block_tokens = MB_SHARD_DEFAULT_BLOCK_TOKENS;
    o->zstd_level = 3;
    o->add_special = 1;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o->threads = cpus > 0 ? (int)(cpus > 64 ? 64 : cpus) : 1;
    optind = 1;
    int c;
    uint64_t value;
    char *end;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case OPT_TOKENIZER: o->tokenizer_path = optarg; break;
        case OPT_OUTPUT: o->output_dir = optarg; break;
        case OPT_FORMAT:
            if (strcmp(optarg, "auto") == 0) o->format = FORMAT_AUTO;
            else if (strcmp(optarg, "text") == 0) o->format = FORMAT_TEXT;
            else if (strcmp(optarg, "jsonl") == 0) o->format = FORMAT_JSONL;
            else return fprintf(stderr, "tokenize: --format must be auto, text or jsonl (got '%s')\n", optarg), 2;
            break;
        case OPT_FIELD: o->jsonl_field = optarg; break;
        case OPT_SEPARATOR:
            if (strcmp(optarg, "file") == 0) o->separator = SEP_FILE;
            else if (strcmp(optarg, "blank-line") == 0) o->separator = SEP_BLANK_LINE;
            else if (strcmp(optarg, "line") == 0) o->separator = SEP_LINE;
            else return fprintf(stderr, "tokenize: --doc-separator must be file, blank-line or line (got '%s')\n", optarg), 2;
            break;
        case OPT_SHARD_TOKENS:
            if (parse_u64(optarg, &o->shard_tokens) != 0 || o->shard_tokens == 0)
                return fprintf(stderr, "tokenize: --shard-tokens must be a positive integer (got '%s')\n", optarg), 2;
            break;
        case OPT_BLOCK_TOKENS:
            if (parse_u64(optarg, &value) != 0 || value == 0 || value > MB_SHARD_MAX_BLOCK_TOKENS)
                return fprintf(stderr, "tokenize: --block-tokens must be in [1, %u] (got '%s')\n",
                               MB_SHARD_MAX_BLOCK_TOKENS, optarg), 2;
            o->block_tokens = (uint32_t)value;
            break;
        case OPT_LEVEL:
            if (parse_u64(optarg, &value) != 0 || value < 1 || value > (uint64_t)ZSTD_maxCLevel())
                return fprintf(stderr, "tokenize: --zstd-level must be in [1, %d] (got '%s')\n", ZSTD_maxCLevel(), optarg), 2;
            o->zstd_level = (int)value;
            break;
        case OPT_VAL:
            errno = 0;
            o->val_fraction = strtod(optarg, &end);
            if (errno != 0 || end == optarg || *end != '\0' || !(o->val_fraction >= 0.0 && o->val_fraction < 1.0))
                return fprintf(stderr, "tokenize: --val-fraction must be in [0, 1) (got '%s')\n", optarg), 2;
            break;
        case OPT_SEED:
            if (parse_u64(optarg, &o->seed) != 0)
                return fprintf(stderr, "tokenize: --seed must be a non-negative integer (got '%s')\n", optarg), 2;
            break;
        case OPT_THREADS:
            if (parse_u64(optarg, &value) != 0 || value < 1 || value > 256)
                return fprintf(stderr, "tokenize: --threads must be in [1, 256] (got '%s')\n", optarg), 2;
            o->threads = (int)value;
            break;
        case OPT_PREFIX: o->prefix = optarg; break;
        case OPT_SPECIAL: o->add_special = 1; break;
        case OPT_NO_SPECIAL: o->add_special = 0; break;
        case OPT_OVERWRITE: o->overwrite = 1; break;
        case OPT_QUIET: o->quiet = 1; break;
        case OPT_HELP: print_help(stdout); return 1;
        default: print_help(stderr); return 2;
        }
    }
    if (o->output_dir == NULL) return fprintf(stderr, "tokenize: --output DIR is required (see --help)\n"), 2;
    if (optind >= argc) return fprintf(stderr, "tokenize: no input files (see --help)\n"), 2;
    if (strchr(o->prefix, '/') != NULL) return fprintf(stderr, "tokenize: --prefix must not contain '/'\n"), 2;
    o->inputs = argv + optind;
    o->input_count = argc - optind;
    return 0;
}

/* ---- Input streams: plain files, .zst files, stdin ------------------------------------------------------------- */

typedef struct byte_buf {
    char *data;
    size_t size, capacity;
} byte_buf;

static int buf_reserve(byte_buf *b, size_t extra) {
    if (b->size + extra + 1 <= b->capacity) return 0;
    size_t capacity = b->capacity ? b->capacity : 4096;
    while (capacity < b->size + extra + 1) capacity *= 2;
    char *data = realloc(b->data, capacity);
    if (data == NULL) return -1;
    b->data = data;
    b->capacity = capacity;
    return 0;
}

static int buf_append(byte_buf *b, const char *data, size_t size) {
    if (buf_reserve(b, size) != 0) return -1;
    memcpy(b->data + b->size, data, size);
    b->size += size;
    b->data[b->size] = '\0';
    return 0;
}

typedef struct input_stream {
    const char *path;
    FILE *file;
    int is_stdin;
    ZSTD_DStream *zstd;  /* NULL: plain */
    uint8_t *raw;        /* bytes as read from the file (zstd input) */
    ZSTD_inBuffer in;
    int file_eof;
    size_t frame_hint;   /* last ZSTD_decompressStream result: 0 = between frames */
    char *buffer;        /* decoded bytes */
    size_t pos, len;
    int eof;
    uint64_t disk_bytes; /* bytes read from the file so far */
    uint64_t line;       /* number of the last line returned (1-based) */
} input_stream;

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int stream_open(input_stream *s, const char *path, mb_error *err) {
    memset(s, 0, sizeof *s);
    s->path = path;
    s->is_stdin = strcmp(path, "-") == 0;
    s->file = s->is_stdin ? stdin : fopen(path, "rb");
    if (s->file == NULL) return mb_fail(err, "%s: cannot open: %s", path, strerror(errno));
    s->buffer = malloc(READ_CHUNK);
    if (s->buffer == NULL) return mb_fail(err, "%s: out of memory", path);
    if (ends_with(path, ".zst")) {
        s->zstd = ZSTD_createDStream();
        s->raw = malloc(READ_CHUNK);
        if (s->zstd == NULL || s->raw == NULL) return mb_fail(err, "%s: out of memory", path);
        ZSTD_initDStream(s->zstd);
        s->in.src = s->raw;
    }
    return 0;
}

static void stream_close(input_stream *s) {
    if (s->file != NULL && !s->is_stdin) fclose(s->file);
    ZSTD_freeDStream(s->zstd);
    free(s->raw);
    free(s->buffer);
    memset(s, 0, sizeof *s);
}

static int read_raw(input_stream *s, void *dst, size_t size, size_t *got, mb_error *err) {
    *got = fread(dst, 1, size, s->file);
    if (*got < size) {
        if (ferror(s->file)) return mb_fail(err, "%s: read error: %s", s->path, strerror(errno));
        s->file_eof = 1;
    }
    s->disk_bytes += *got;
    return 0;
}

/* Refills the decoded buffer; at the end of the input sets eof. */
static int stream_fill(input_stream *s, mb_error *err) {
    s->pos = s->len = 0;
    if (s->zstd == NULL) {
        if (s->file_eof) {
            s->eof = 1;
            return 0;
        }
        if (read_raw(s, s->buffer, READ_CHUNK, &s->len, err) != 0) return -1;
        if (s->len == 0) s->eof = 1;
        return 0;
    }
    while (s->len == 0) {
        if (s->in.pos == s->in.size) {
            if (s->file_eof) {
                if (s->frame_hint != 0)
                    return mb_fail(err, "%s: offset %" PRIu64 ": zstd stream ends inside a frame (truncated?)", s->path,
                                   s->disk_bytes);
                s->eof = 1;
                return 0;
            }
            size_t got;
            if (read_raw(s, s->raw, READ_CHUNK, &got, err) != 0) return -1;
            s->in.size = got;
            s->in.pos = 0;
            if (got == 0) continue;
        }
        ZSTD_outBuffer out = {s->buffer, READ_CHUNK, 0};
        size_t hint = ZSTD_decompressStream(s->zstd, &out, &s->in);
        if (ZSTD_isError(hint))
            return mb_fail(err, "%s: offset %" PRIu64 ": zstd: %s", s->path,
                           s->disk_bytes - (uint64_t)(s->in.size - s->in.pos), ZSTD_getErrorName(hint));
        s->frame_hint = hint;
        s->len = out.pos;
    }
    return 0;
}

/* Reads the next line (without its '\n' and a trailing '\r') into line; *got = 0 at the end of the input. */
static int stream_read_line(input_stream *s, byte_buf *line, int *got, mb_error *err) {
    line->size = 0;
    *got = 0;
    for (;;) {
        if (s->pos == s->len) {
            if (s->eof) break;
            if (stream_fill(s, err) != 0) return -1;
            if (s->eof) break;
        }
        char *start = s->buffer + s->pos;
        char *newline = memchr(start, '\n', s->len - s->pos);
        size_t take = newline ? (size_t)(newline - start) : s->len - s->pos;
        if (buf_append(line, start, take) != 0) return mb_fail(err, "%s: out of memory", s->path);
        *got = 1;
        s->pos += take + (newline != NULL);
        if (newline != NULL) break;
    }
    if (*got) {
        s->line++;
        if (line->size > 0 && line->data[line->size - 1] == '\r') line->data[--line->size] = '\0';
    }
    return 0;
}

static int stream_read_all(input_stream *s, byte_buf *out, mb_error *err) {
    for (;;) {
        if (s->pos < s->len && buf_append(out, s->buffer + s->pos, s->len - s->pos) != 0)
            return mb_fail(err, "%s: out of memory", s->path);
        s->pos = s->len;
        if (s->eof) return 0;
        if (stream_fill(s, err) != 0) return -1;
    }
}

/* ---- Reading documents into batches ----------------------------------------------------------------------------- */

typedef struct doc_record {
    size_t start, length; /* in the batch text */
    uint64_t line;        /* first line of the document (0 for whole files) */
} doc_record;

enum { SLOT_FREE, SLOT_FILLED, SLOT_WORKING, SLOT_DONE };

typedef struct batch {
    int state;
    uint64_t sequence;
    int input;           /* index into the input list */
    byte_buf text;
    doc_record *docs;
    size_t doc_count, doc_capacity;
    uint64_t disk_done;  /* input bytes consumed (all files) when the batch was cut, for progress */
    /* results */
    mb_token_list tokens;
    size_t *token_ends;  /* per document: end of its ids in tokens */
    uint8_t *skipped;    /* per document: empty or whitespace only */
    int failed;
    mb_error err;
} batch;

typedef struct doc_reader {
    const tokenize_options *o;
    int input;           /* current input; == input_count when done */
    input_stream stream;
    int open;
    input_format format; /* resolved for the current input */
    int whole_file_read; /* separator "file": the current input's one document was taken */
    byte_buf line;
    uint64_t disk_done;  /* bytes of inputs already finished */
    uint64_t text_bytes; /* decoded bytes of text read */
} doc_reader;

static input_format resolve_format(const tokenize_options *o, const char *path) {
    if (o->format != FORMAT_AUTO) return o->format;
    const char *suffixes[] = {".jsonl", ".ndjson", ".json", ".jsonl.zst", ".ndjson.zst", ".json.zst"};
    for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++)
        if (ends_with(path, suffixes[i])) return FORMAT_JSONL;
    return FORMAT_TEXT;
}

static int is_blank(const char *text, size_t length) {
    for (size_t i = 0; i < length; i++)
        if (text[i] != ' ' && text[i] != '\t' && text[i] != '\r' && text[i] != '\n' && text[i] != '\f' && text[i] != '\v')
            return 0;
    return 1;
}

static int batch_add_doc(batch *b, size_t start, uint64_t line) {
    if (b->doc_count == b->doc_capacity) {
        size_t capacity = b->doc_capacity ? b->doc_capacity * 2 : 256;
        doc_record *docs = realloc(b->docs, capacity * sizeof *docs);
        if (docs == NULL) return -1;
        b->docs = docs;
        b->doc_capacity = capacity;
    }
    b->docs[b->doc_count++] = (doc_record){start, b->text.size - start, line};
    return 0;
}

/* Appends the current input's next document to the batch. Returns 1 if one was added, 0 at the end of the input. */
static int next_document(doc_reader *r, batch *b, mb_error *err) {
    input_stream *s = &r->stream;
    size_t start = b->text.size;
    int got;
    if (r->format == FORMAT_JSONL || r->o->separator == SEP_LINE) {
        do {
            if (stream_read_line(s, &r->line, &got, err) != 0) return -1;
            if (!got) return 0;
        } while (r->line.size == 0 || (r->format == FORMAT_JSONL && is_blank(r->line.data, r->line.size)));
        if (buf_append(&b->text, r->line.data, r->line.size) != 0) return mb_fail(err, "out of memory");
        r->text_bytes += r->line.size + 1;
        return batch_add_doc(b, start, s->line) == 0 ? 1 : mb_fail(err, "out of memory");
    }
    if (r->o->separator == SEP_FILE) {
        if (r->whole_file_read) return 0;
        r->whole_file_read = 1;
        if (stream_read_all(s, &b->text, err) != 0) return -1;
        r->text_bytes += b->text.size - start;
        return batch_add_doc(b, start, 0) == 0 ? 1 : mb_fail(err, "out of memory");
    }
    /* blank-line: skip blank lines, then take lines until the next blank line or the end. */
    uint64_t first_line = 0;
    for (;;) {
        if (stream_read_line(s, &r->line, &got, err) != 0) return -1;
        if (got) r->text_bytes += r->line.size + 1;
        if (!got || is_blank(r->line.data, r->line.size)) {
            if (first_line != 0) break;
            if (!got) return 0;
            continue;
        }
        if (first_line != 0 && buf_append(&b->text, "\n", 1) != 0) return mb_fail(err, "out of memory");
        if (first_line == 0) first_line = s->line;
        if (buf_append(&b->text, r->line.data, r->line.size) != 0) return mb_fail(err, "out of memory");
    }
    return batch_add_doc(b, start, first_line) == 0 ? 1 : mb_fail(err, "out of memory");
}

/* Fills b with documents of one input. Sets *done when every input has been read. */
static int fill_batch(doc_reader *r, batch *b, int *done, mb_error *err) {
    b->text.size = 0;
    b->doc_count = 0;
    b->tokens.count = 0;
    b->failed = 0;
    *done = 0;
    while (!r->open) {
        if (r->input == r->o->input_count) {
            *done = 1;
            return 0;
        }
        if (stream_open(&r->stream, r->o->inputs[r->input], err) != 0) {
            stream_close(&r->stream);
            return -1;
        }
        r->open = 1;
        r->format = resolve_format(r->o, r->o->inputs[r->input]);
        r->whole_file_read = 0;
    }
    b->input = r->input;
    while (b->text.size < BATCH_TEXT_BYTES && b->doc_count < BATCH_MAX_DOCS) {
        int rc = next_document(r, b, err);
        if (rc < 0) return -1;
        if (rc == 0) {
            r->disk_done += r->stream.disk_bytes;
            stream_close(&r->stream);
            r->open = 0;
            r->input++;
            break;
        }
    }
    b->disk_done = r->disk_done + (r->open ? r->stream.disk_bytes : 0);
    return 0;
}

/* ---- Tokenizing batches (worker threads) ------------------------------------------------------------------------ */

typedef struct pool {
    pthread_mutex_t mutex;
    pthread_cond_t work_ready, batch_done;
    batch *slots;
    size_t slot_count;
    uint64_t next_take;
    int shutdown;
    const mb_tokenizer *tokenizer;
    const tokenize_options *o;
} pool;

/* Extracts the JSONL field of one line; on failure fills err with "file:line: ...". */
static int jsonl_text(const char *path, uint64_t line, const char *json, size_t length, const char *field,
                      cJSON **root, const char **text, size_t *text_length, mb_error *err) {
    const char *parse_end = NULL;
    *root = cJSON_ParseWithLengthOpts(json, length, &parse_end, 0);
    if (*root == NULL) {
        size_t column = parse_end != NULL && parse_end >= json ? (size_t)(parse_end - json) + 1 : 1;
        return mb_fail(err, "%s:%" PRIu64 ": malformed JSON (near column %zu)", path, line, column);
    }
    if (!cJSON_IsObject(*root)) return mb_fail(err, "%s:%" PRIu64 ": a JSONL line must be a JSON object", path, line);
    const cJSON *value = cJSON_GetObjectItemCaseSensitive(*root, field);
    if (value == NULL)
        return mb_fail(err, "%s:%" PRIu64 ": field \"%s\" is missing (see --jsonl-field)", path, line, field);
    if (!cJSON_IsString(value) || value->valuestring == NULL)
        return mb_fail(err, "%s:%" PRIu64 ": field \"%s\" is not a string", path, line, field);
    *text = value->valuestring;
    *text_length = strlen(value->valuestring);
    return 0;
}

static void tokenize_batch(const pool *p, batch *b) {
    const char *path = p->o->inputs[b->input];
    int jsonl = resolve_format(p->o, path) == FORMAT_JSONL;
    size_t *ends = realloc(b->token_ends, (b->doc_count + 1) * sizeof *ends);
    uint8_t *skipped = realloc(b->skipped, b->doc_count + 1);
    if (ends != NULL) b->token_ends = ends;
    if (skipped != NULL) b->skipped = skipped;
    if (ends == NULL || skipped == NULL) {
        b->failed = 1;
        mb_fail(&b->err, "%s: out of memory", path);
        return;
    }
    for (size_t d = 0; d < b->doc_count; d++) {
        const doc_record *doc = &b->docs[d];
        const char *text = b->text.data + doc->start;
        size_t length = doc->length;
        cJSON *root = NULL;
        if (jsonl && jsonl_text(path, doc->line, text, length, p->o->jsonl_field, &root, &text, &length, &b->err) != 0) {
            cJSON_Delete(root);
            b->failed = 1;
            return;
        }
        b->skipped[d] = (uint8_t)is_blank(text, length);
        int rc = 0;
        if (!b->skipped[d]) {
            rc = p->o->add_special ? mb_tokenizer_encode_template(p->tokenizer, text, length, NULL, 0, &b->tokens, &b->err)
                                   : mb_tokenizer_encode(p->tokenizer, text, length, &b->tokens, &b->err);
        }
        cJSON_Delete(root);
        if (rc != 0) {
            if (doc->line > 0) mb_fail_context(&b->err, "%s:%" PRIu64, path, doc->line);
            else mb_fail_context(&b->err, "%s", path);
            b->failed = 1;
            return;
        }
        b->token_ends[d] = b->tokens.count;
    }
}

static void *worker_main(void *arg) {
    pool *p = arg;
    pthread_mutex_lock(&p->mutex);
    for (;;) {
        batch *b = &p->slots[p->next_take % p->slot_count];
        while (!p->shutdown && !(b->state == SLOT_FILLED && b->sequence == p->next_take)) {
            pthread_cond_wait(&p->work_ready, &p->mutex);
            b = &p->slots[p->next_take % p->slot_count];
        }
        if (p->shutdown) break;
        b->state = SLOT_WORKING;
        p->next_take++;
        pthread_mutex_unlock(&p->mutex);
        tokenize_batch(p, b);
        pthread_mutex_lock(&p->mutex);
        b->state = SLOT_DONE;
        pthread_cond_broadcast(&p->batch_done);
    }
    pthread_mutex_unlock(&p->mutex);
    return NULL;
}

/* ---- Writing shards (main thread, input order) ------------------------------------------------------------------ */

typedef struct split_output {
    const char *name;      /* "train" / "val" */
    mb_shard_writer *writer;
    uint32_t next_number;
    uint64_t documents, tokens;
} split_output;

typedef struct output_state {
    const tokenize_options *o;
    mb_shard_writer_options shard_options;
    split_output splits[2]; /* 0 train, 1 val */
    uint64_t kept, skipped;
    uint64_t bytes_out;
    char **written;         /* shards committed by this run */
    size_t written_count;
} output_state;

static void shard_name(const output_state *out, const split_output *split, uint32_t number, char *name, size_t size) {
    const char *prefix = out->o->prefix;
    snprintf(name, size, "%s%s%s-%06u.mbs", prefix, prefix[0] ? "-" : "", split->name, number);
}

static int close_shard(output_state *out, split_output *split, mb_error *err) {
    if (split->writer == NULL) return 0;
    char name[512], path[4096];
    shard_name(out, split, split->next_number - 1, name, sizeof name);
    if (mb_path_join(path, sizeof path, out->o->output_dir, name) != 0) return mb_fail(err, "%s: path too long", name);
    uint64_t bytes = 0;
    mb_shard_writer *writer = split->writer;
    split->writer = NULL;
    if (mb_shard_writer_finish(writer, &bytes, err) != 0) return -1;
    out->bytes_out += bytes;
    char **written = realloc(out->written, (out->written_count + 1) * sizeof *written);
    if (written == NULL) return mb_fail(err, "out of memory");
    out->written = written;
    out->written[out->written_count] = strdup(path);
    if (out->written[out->written_count] == NULL) return mb_fail(err, "out of memory");
    out->written_count++;
    return 0;
}

static int write_document(output_state *out, const int32_t *ids, size_t count, mb_error *err) {
    uint64_t index = out->kept++;
    int val = 0;
    if (out->o->val_fraction > 0) {
        mb_rng rng;
        mb_rng_seed_stream(&rng, out->o->seed, index);
        val = mb_rng_uniform(&rng) < out->o->val_fraction;
    }
    split_output *split = &out->splits[val];
    if (split->writer == NULL) {
        char name[512], path[4096];
        shard_name(out, split, split->next_number, name, sizeof name);
        if (mb_path_join(path, sizeof path, out->o->output_dir, name) != 0) return mb_fail(err, "%s: path too long", name);
        if (mb_shard_writer_open(&split->writer, path, &out->shard_options, err) != 0) return -1;
        split->next_number++;
    }
    if (mb_shard_writer_add_document(split->writer, ids, count, err) != 0) return -1;
    split->documents++;
    split->tokens += count;
    if (mb_shard_writer_token_count(split->writer) >= out->o->shard_tokens) return close_shard(out, split, err);
    return 0;
}

static int write_batch(output_state *out, const batch *b, mb_error *err) {
    if (b->failed) {
        *err = b->err;
        return -1;
    }
    size_t begin = 0;
    for (size_t d = 0; d < b->doc_count; d++) {
        if (b->skipped[d]) {
            out->skipped++;
            continue;
        }
        if (write_document(out, b->tokens.ids + begin, b->token_ends[d] - begin, err) != 0) {
            const char *path = out->o->inputs[b->input];
            if (b->docs[d].line > 0) return mb_fail_context(err, "%s:%" PRIu64, path, b->docs[d].line);
            return mb_fail_context(err, "%s", path);
        }
        begin = b->token_ends[d];
    }
    return 0;
}

static void remove_written(output_state *out) {
    for (size_t i = 0; i < out->written_count; i++) {
        unlink(out->written[i]);
        free(out->written[i]);
    }
    free(out->written);
    out->written = NULL;
    out->written_count = 0;
}

/* Refuses to mix with shards already in DIR (or deletes them with --overwrite). */
static int check_existing(const tokenize_options *o, mb_error *err) {
    const char *splits[] = {"train", "val"};
    for (int s = 0; s < 2; s++) {
        char name[512], pattern[4096];
        snprintf(name, sizeof name, "%s%s%s-*.mbs", o->prefix, o->prefix[0] ? "-" : "", splits[s]);
        if (mb_path_join(pattern, sizeof pattern, o->output_dir, name) != 0) return mb_fail(err, "%s: path too long", name);
        glob_t g;
        if (glob(pattern, 0, NULL, &g) != 0) continue;
        int rc = 0;
        if (!o->overwrite) {
            rc = mb_fail(err, "%s: %zu shard(s) like %s already exist; pass --overwrite to replace them (or use another "
                         "--output or --prefix)", o->output_dir, g.gl_pathc, g.gl_pathv[0]);
        } else {
            for (size_t i = 0; i < g.gl_pathc && rc == 0; i++)
                if (unlink(g.gl_pathv[i]) != 0) rc = mb_fail(err, "%s: cannot remove: %s", g.gl_pathv[i], strerror(errno));
        }
        globfree(&g);
        if (rc != 0) return -1;
    }
    return 0;
}

static uint64_t total_input_bytes(const tokenize_options *o) {
    uint64_t total = 0;
    for (int i = 0; i < o->input_count; i++) {
        struct stat st;
        if (strcmp(o->inputs[i], "-") == 0) return 0; /* unknown */
        if (stat(o->inputs[i], &st) == 0) total += (uint64_t)st.st_size;
    }
    return total;
}


/* ---- The command -------------------------------------------------------------------------------------------------- */

typedef struct run_state {
    pool pool;
    pthread_t *threads;
    int started;
    doc_reader reader;
    output_state out;
} run_state;

/* Reads, tokenizes and writes everything; returns 0 or -1 with err set. */
static int run_pipeline(run_state *st, mb_progress *progress, mb_error *err) {
    pool *p = &st->pool;
    uint64_t filled = 0, written = 0;
    int input_done = 0;
    for (;;) {
        if (!input_done && filled - written < p->slot_count) {
            batch *b = &p->slots[filled % p->slot_count];
            if (fill_batch(&st->reader, b, &input_done, err) != 0) return -1;
            if (b->doc_count == 0) continue;
            pthread_mutex_lock(&p->mutex);
            b->sequence = filled++;
            b->state = SLOT_FILLED;
            pthread_cond_broadcast(&p->work_ready);
            pthread_mutex_unlock(&p->mutex);
            continue;
        }
        if (written == filled) return 0;
        batch *b = &p->slots[written % p->slot_count];
        pthread_mutex_lock(&p->mutex);
        while (b->state != SLOT_DONE) pthread_cond_wait(&p->batch_done, &p->mutex);
        pthread_mutex_unlock(&p->mutex);
        int rc = write_batch(&st->out, b, err);
        b->state = SLOT_FREE;
        written++;
        if (rc != 0) return -1;
        const output_state *out = &st->out;
        mb_progress_update(progress, b->disk_done, out->kept, out->splits[0].tokens + out->splits[1].tokens);
    }
}

static void print_summary(const run_state *st, double seconds, uint64_t disk_bytes, uint32_t width) {
    const output_state *out = &st->out;
    uint64_t tokens = out->splits[0].tokens + out->splits[1].tokens;
    char in_text[32], in_disk[32], out_bytes[32], rate[32], took[32];
    mb_format_bytes(in_text, sizeof in_text, (double)st->reader.text_bytes);
    mb_format_bytes(in_disk, sizeof in_disk, (double)disk_bytes);
    mb_format_bytes(out_bytes, sizeof out_bytes, (double)out->bytes_out);
    mb_format_count(rate, sizeof rate, seconds > 0 ? (double)tokens / seconds : 0);
    mb_format_duration(took, sizeof took, seconds);
    printf("tokenize: %" PRIu64 " documents (train %" PRIu64 ", val %" PRIu64 ", skipped empty %" PRIu64 ")\n", out->kept,
           out->splits[0].documents, out->splits[1].documents, out->skipped);
    printf("tokenize: %" PRIu64 " tokens (train %" PRIu64 ", val %" PRIu64 "), %.1f tokens/document\n", tokens,
           out->splits[0].tokens, out->splits[1].tokens, out->kept ? (double)tokens / (double)out->kept : 0.0);
    printf("tokenize: in %s of text (%s on disk), out %s in %zu shard(s) in %s\n", in_text, in_disk, out_bytes,
           out->written_count, st->out.o->output_dir);
    double raw = (double)tokens * width;
    printf("tokenize: compression %.2fx vs raw %u-byte ids, %.2f bytes/token, %.2f text bytes/token\n",
           out->bytes_out ? raw / (double)out->bytes_out : 0.0, width, tokens ? (double)out->bytes_out / (double)tokens : 0.0,
           tokens ? (double)st->reader.text_bytes / (double)tokens : 0.0);
    printf("tokenize: %s tokens/s with %d thread(s), took %s\n", rate, st->out.o->threads, took);
}

static void stop_workers(run_state *st) {
    pool *p = &st->pool;
    pthread_mutex_lock(&p->mutex);
    p->shutdown = 1;
    pthread_cond_broadcast(&p->work_ready);
    pthread_mutex_unlock(&p->mutex);
    for (int i = 0; i < st->started; i++) pthread_join(st->threads[i], NULL);
    st->started = 0;
}

static void free_run(run_state *st) {
    pool *p = &st->pool;
    for (size_t i = 0; p->slots != NULL && i < p->slot_count; i++) {
        batch *b = &p->slots[i];
        free(b->text.data);
        free(b->docs);
        mb_token_list_free(&b->tokens);
        free(b->token_ends);
        free(b->skipped);
    }
    free(p->slots);
    free(st->threads);
    if (st->reader.open) stream_close(&st->reader.stream);
    free(st->reader.line.data);
    for (int s = 0; s < 2; s++) mb_shard_writer_abort(st->out.splits[s].writer);
    for (size_t i = 0; i < st->out.written_count; i++) free(st->out.written[i]);
    free(st->out.written);
    pthread_mutex_destroy(&p->mutex);
    pthread_cond_destroy(&p->work_ready);
    pthread_cond_destroy(&p->batch_done);
}

int mb_cmd_tokenize(int argc, char **argv) {
    tokenize_options o;
    int parsed = parse_options(argc, argv, &o);
    if (parsed != 0) return parsed == 1 ? 0 : 2;
    mb_error err = {{0}};
    for (int i = 0; i < o.input_count; i++) {
        if (strcmp(o.inputs[i], "-") != 0 && !mb_path_exists(o.inputs[i])) {
            fprintf(stderr, "tokenize: %s: no such file\n", o.inputs[i]);
            return 1;
        }
        if (mb_is_directory(o.inputs[i])) {
            fprintf(stderr, "tokenize: %s: is a directory (pass the files, e.g. %s/*.txt)\n", o.inputs[i], o.inputs[i]);
            return 1;
        }
    }
    mb_tokenizer *tokenizer = NULL;
    if (mb_tokenizer_load(&tokenizer, o.tokenizer_path, &err) != 0) {
        fprintf(stderr, "tokenize: %s\n", err.message);
        return 1;
    }
    if (mb_make_dirs(o.output_dir, &err) != 0 || check_existing(&o, &err) != 0) {
        fprintf(stderr, "tokenize: %s\n", err.message);
        mb_tokenizer_free(tokenizer);
        return 1;
    }

    run_state st;
    memset(&st, 0, sizeof st);
    pool *p = &st.pool;
    pthread_mutex_init(&p->mutex, NULL);
    pthread_cond_init(&p->work_ready, NULL);
    pthread_cond_init(&p->batch_done, NULL);
    p->tokenizer = tokenizer;
    p->o = &o;
    p->slot_count = 2 * (size_t)o.threads + 2;
    p->slots = calloc(p->slot_count, sizeof *p->slots);
    st.threads = calloc((size_t)o.threads, sizeof *st.threads);
    st.reader.o = &o;
    st.out.o = &o;
    st.out.splits[0].name = "train";
    st.out.splits[1].name = "val";
    int vocab = mb_tokenizer_vocab_size(tokenizer);
    st.out.shard_options = (mb_shard_writer_options){.tokenizer_fingerprint = mb_tokenizer_fingerprint(tokenizer),
                                                     .vocab_size = (uint32_t)vocab,
                                                     .block_tokens = o.block_tokens,
                                                     .zstd_level = o.zstd_level,
                                                     .flags = o.add_special ? MB_SHARD_FLAG_SPECIAL_TOKENS : 0};
    int rc = (p->slots == NULL || st.threads == NULL) ? mb_fail(&err, "out of memory") : 0;
    for (int i = 0; rc == 0 && i < o.threads; i++) {
        if (pthread_create(&st.threads[i], NULL, worker_main, p) != 0) rc = mb_fail(&err, "cannot start thread %d", i);
        else st.started++;
    }

    uint64_t total = total_input_bytes(&o);
    mb_progress_options progress_options = {.label = "tokenize", .total = total, .total_is_bytes = 1,
                                            .counter_names = {"docs", "tokens"}, .rate_counter = 1,
                                            .mode = o.quiet ? MB_PROGRESS_OFF : MB_PROGRESS_AUTO};
    mb_progress *progress = mb_progress_start(&progress_options);
    double start = mb_monotonic_seconds();
    if (rc == 0) rc = run_pipeline(&st, progress, &err);
    stop_workers(&st);
    for (int s = 0; rc == 0 && s < 2; s++) rc = close_shard(&st.out, &st.out.splits[s], &err);
    if (rc == 0 && st.out.kept == 0) rc = mb_fail(&err, "no documents found in the input (all empty?)");
    double seconds = mb_monotonic_seconds() - start;
    if (rc == 0) {
        mb_progress_update(progress, st.reader.disk_done, st.out.kept, st.out.splits[0].tokens + st.out.splits[1].tokens);
        mb_progress_finish(progress);
    } else {
        mb_progress_cancel(progress);
    }
    if (rc != 0) {
        size_t removed = st.out.written_count;
        remove_written(&st.out);
        fprintf(stderr, "tokenize: error: %s\n", err.message);
        if (removed > 0) fprintf(stderr, "tokenize: removed the %zu shard(s) this run had written\n", removed);
    } else {
        print_summary(&st, seconds, st.reader.disk_done, vocab <= 65536 ? 2u : 4u);
    }
    free_run(&st);
    mb_tokenizer_free(tokenizer);
    return rc == 0 ? 0 : 1;
}
