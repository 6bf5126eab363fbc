/* GLUE TSV readers and example encoding (see glue.h for the formats and the truncation rule). */
#include "data/glue.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/fileio.h"

#define LAST_FIELD (-2)  /* the label is the row's last field (transformers: line[-1]) */
#define NONE (-1)

/* Where a file keeps what we read: column indices, the fewest fields a usable row has, and the header names of the
 * columns used (NULL = no header, or the name is not checked). */
typedef struct column_layout {
    int header;
    int text_a, text_b, label, index;
    int min_fields;
    const char *name_a, *name_b, *name_label, *name_index;
} column_layout;

typedef struct task_layouts {
    column_layout labelled, test;
    int skip_malformed;  /* rows with too few fields are skipped and counted instead of failing */
} task_layouts;

static const mb_glue_task_info task_infos[MB_GLUE_TASK_COUNT] = {
    [MB_GLUE_COLA] = {"cola", "CoLA", "CoLA", 2, {"unacceptable", "acceptable"}, {"0", "1"}, 0, MB_GLUE_METRIC_MCC, 1,
                      {"dev"}, {"test"}, {"CoLA.tsv"}},
    [MB_GLUE_SST2] = {"sst2", "SST-2", "SST-2", 2, {"negative", "positive"}, {"0", "1"}, 0, MB_GLUE_METRIC_ACCURACY,
                      1, {"dev"}, {"test"}, {"SST-2.tsv"}},
    [MB_GLUE_MRPC] = {"mrpc", "MRPC", "MRPC", 2, {"not_equivalent", "equivalent"}, {"0", "1"}, 1,
                      MB_GLUE_METRIC_F1_ACCURACY, 1, {"dev"}, {"test"}, {"MRPC.tsv"}},
    [MB_GLUE_QQP] = {"qqp", "QQP", "QQP", 2, {"not_duplicate", "duplicate"}, {"0", "1"}, 1, MB_GLUE_METRIC_F1_ACCURACY,
                     1, {"dev"}, {"test"}, {"QQP.tsv"}},
    [MB_GLUE_STSB] = {"stsb", "STS-B", "STS-B", 1, {"score"}, {NULL}, 1, MB_GLUE_METRIC_CORRELATION, 1, {"dev"},
                      {"test"}, {"STS-B.tsv"}},
    [MB_GLUE_MNLI] = {"mnli", "MNLI", "MNLI", 3, {"entailment", "neutral", "contradiction"},
                      {"entailment", "neutral", "contradiction"}, 1, MB_GLUE_METRIC_ACCURACY, 2,
                      {"dev_matched", "dev_mismatched"}, {"test_matched", "test_mismatched"},
                      {"MNLI-m.tsv", "MNLI-mm.tsv"}},
    [MB_GLUE_QNLI] = {"qnli", "QNLI", "QNLI", 2, {"entailment", "not_entailment"}, {"entailment", "not_entailment"}, 1,
                      MB_GLUE_METRIC_ACCURACY, 1, {"dev"}, {"test"}, {"QNLI.tsv"}},
    [MB_GLUE_RTE] = {"rte", "RTE", "RTE", 2, {"entailment", "not_entailment"}, {"entailment", "not_entailment"}, 1,
                     MB_GLUE_METRIC_ACCURACY, 1, {"dev"}, {"test"}, {"RTE.tsv"}},
    [MB_GLUE_WNLI] = {"wnli", "WNLI", "WNLI", 2, {"not_entailment", "entailment"}, {"0", "1"}, 1,
                      MB_GLUE_METRIC_ACCURACY, 1, {"dev"}, {"test"}, {"WNLI.tsv"}},
};

static const task_layouts layouts[MB_GLUE_TASK_COUNT] = {
    [MB_GLUE_COLA] = {{0, 3, NONE, 1, NONE, 4, NULL, NULL, NULL, NULL},
                      {1, 1, NONE, NONE, 0, 2, "sentence", NULL, NULL, "index"}, 0},
    [MB_GLUE_SST2] = {{1, 0, NONE, 1, NONE, 2, "sentence", NULL, "label", NULL},
                      {1, 1, NONE, NONE, 0, 2, "sentence", NULL, NULL, "index"}, 0},
    [MB_GLUE_MRPC] = {{1, 3, 4, 0, NONE, 5, "#1 String", "#2 String", "Quality", NULL},
                      {1, 3, 4, NONE, 0, 5, "#1 String", "#2 String", NULL, "index"}, 1},
    [MB_GLUE_QQP] = {{1, 3, 4, 5, NONE, 6, "question1", "question2", "is_duplicate", NULL},
                     {1, 1, 2, NONE, 0, 3, "question1", "question2", NULL, "id"}, 1},
    [MB_GLUE_STSB] = {{1, 7, 8, LAST_FIELD, NONE, 10, "sentence1", "sentence2", "score", NULL},
                      {1, 7, 8, NONE, 0, 9, "sentence1", "sentence2", NULL, "index"}, 0},
    [MB_GLUE_MNLI] = {{1, 8, 9, LAST_FIELD, NONE, 11, "sentence1", "sentence2", "gold_label", NULL},
                      {1, 8, 9, NONE, 0, 10, "sentence1", "sentence2", NULL, "index"}, 0},
    [MB_GLUE_QNLI] = {{1, 1, 2, LAST_FIELD, NONE, 4, "question", "sentence", "label", NULL},
                      {1, 1, 2, NONE, 0, 3, "question", "sentence", NULL, "index"}, 0},
    [MB_GLUE_RTE] = {{1, 1, 2, LAST_FIELD, NONE, 4, "sentence1", "sentence2", "label", NULL},
                     {1, 1, 2, NONE, 0, 3, "sentence1", "sentence2", NULL, "index"}, 0},
    [MB_GLUE_WNLI] = {{1, 1, 2, LAST_FIELD, NONE, 4, "sentence1", "sentence2", "label", NULL},
                      {1, 1, 2, NONE, 0, 3, "sentence1", "sentence2", NULL, "index"}, 0},
};

const mb_glue_task_info *mb_glue_task_get(mb_glue_task task) {
    return (unsigned)task < MB_GLUE_TASK_COUNT ? &task_infos[task] : NULL;
}

/* "SST-2" and "sst2" name the same task: compare ignoring case and '-' / '_'. */
static int same_name(const char *a, const char *b) {
    for (;;) {
        while (*a == '-' || *a == '_') a++;
        while (*b == '-' || *b == '_') b++;
        if (tolower((unsigned char)*a) != tolower((unsigned char)*b)) return 0;
        if (*a == '\0') return 1;
        a++;
        b++;
    }
}

int mb_glue_task_from_name(const char *name, mb_glue_task *task, mb_error *err) {
    for (int t = 0; t < MB_GLUE_TASK_COUNT; t++) {
        if (same_name(name, task_infos[t].name) || same_name(name, task_infos[t].dir_name)) {
            *task = (mb_glue_task)t;
            return 0;
        }
    }
    return mb_fail(err, "unknown GLUE task '%s' (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)", name);
}

/* ---- reading ---- */

#define MAX_FIELDS 64

typedef struct row {
    char *fields[MAX_FIELDS];
    int count;  /* may exceed MAX_FIELDS: the fields beyond are counted, not stored */
    char *last;
} row;

/* Splits a line in place on '\t' (no quote handling). */
static void split_row(char *line, row *r) {
    r->count = 0;
    char *field = line;
    for (;;) {
        char *tab = strchr(field, '\t');
        if (r->count < MAX_FIELDS) r->fields[r->count] = field;
        r->last = field;
        r->count++;
        if (tab == NULL) break;
        *tab = '\0';
        field = tab + 1;
    }
}

static const char *field_at(const row *r, int column) {
    if (column == LAST_FIELD) return r->last;
    return column >= 0 && column < r->count && column < MAX_FIELDS ? r->fields[column] : NULL;
}

static int check_header_name(const mb_glue_split *s, const row *header, int column, const char *expected,
                             mb_error *err) {
    if (expected == NULL || column == NONE) return 0;
    const char *found = field_at(header, column);
    if (found != NULL && strcmp(found, expected) == 0) return 0;
    char where[32];
    if (column == LAST_FIELD) snprintf(where, sizeof where, "the last column");
    else snprintf(where, sizeof where, "column %d", column + 1);
    return mb_fail(err, "%s:1: header: %s should be '%s', found '%s' (is this a %s %s file?)", s->path, where,
                   expected, found ? found : "(missing)", task_infos[s->task].dir_name,
                   s->labelled ? "train/dev" : "test");
}

static int check_header(const mb_glue_split *s, const column_layout *layout, row *header, mb_error *err) {
    if (check_header_name(s, header, layout->text_a, layout->name_a, err) != 0 ||
        check_header_name(s, header, layout->text_b, layout->name_b, err) != 0 ||
        check_header_name(s, header, layout->label, layout->name_label, err) != 0 ||
        check_header_name(s, header, layout->index, layout->name_index, err) != 0)
        return -1;
    return 0;
}

static int parse_label(const mb_glue_split *s, const char *text, int line, float *label, mb_error *err) {
    const mb_glue_task_info *info = &task_infos[s->task];
    if (info->num_labels == 1) {
        char *end = NULL;
        errno = 0;
        double value = strtod(text, &end);
        if (end == text || *end != '\0' || errno != 0 || !isfinite(value) || value < 0.0 || value > 5.0)
            return mb_fail(err, "%s:%d: score '%s' is not a number in [0, 5]", s->path, line, text);
        *label = (float)value;
        return 0;
    }
    for (int k = 0; k < info->num_labels; k++) {
        if (strcmp(text, info->file_labels[k]) == 0) {
            *label = (float)k;
            return 0;
        }
    }
    char expected[128] = "";
    for (int k = 0; k < info->num_labels; k++)
        snprintf(expected + strlen(expected), sizeof expected - strlen(expected), "%s'%s'", k ? ", " : "",
                 info->file_labels[k]);
    return mb_fail(err, "%s:%d: label '%s' is not one of %s", s->path, line, text, expected);
}

static int parse_index(const mb_glue_split *s, const char *text, int line, int64_t *index, mb_error *err) {
    char *end = NULL;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (end == text || *end != '\0' || errno != 0 || value < 0)
        return mb_fail(err, "%s:%d: index '%s' is not a non-negative integer", s->path, line, text);
    *index = value;
    return 0;
}

static int grow_examples(mb_glue_split *s, size_t *capacity, mb_error *err) {
    if (s->count < *capacity) return 0;
    size_t grown = *capacity ? 2 * *capacity : 1024;
    mb_glue_example *examples = realloc(s->examples, grown * sizeof *examples);
    if (examples == NULL) return mb_fail(err, "%s: out of memory", s->path);
    s->examples = examples;
    *capacity = grown;
    return 0;
}

/* One data row: returns 1 when kept, 0 when skipped as malformed, -1 on error. */
static int read_row(mb_glue_split *s, const task_layouts *tl, const column_layout *layout, row *r, int line,
                    mb_glue_example *example, mb_error *err) {
    if (r->count < layout->min_fields) {
        if (tl->skip_malformed) return 0;
        return mb_fail(err, "%s:%d: expected at least %d tab-separated fields, found %d", s->path, line,
                       layout->min_fields, r->count);
    }
    example->line = line;
    example->text_a = field_at(r, layout->text_a);
    example->text_b = layout->text_b == NONE ? NULL : field_at(r, layout->text_b);
    example->label = -1.0f;
    example->index = (int64_t)s->count;
    if (layout->label != NONE && parse_label(s, field_at(r, layout->label), line, &example->label, err) != 0)
        return -1;
    if (layout->index != NONE && parse_index(s, field_at(r, layout->index), line, &example->index, err) != 0)
        return -1;
    return 1;
}

static int parse_lines(mb_glue_split *s, size_t size, mb_error *err) {
    const task_layouts *tl = &layouts[s->task];
    const column_layout *layout = s->labelled ? &tl->labelled : &tl->test;
    char *cursor = s->storage, *end = s->storage + size;
    if (size >= 3 && memcmp(cursor, "\xEF\xBB\xBF", 3) == 0) cursor += 3;  /* UTF-8 byte-order mark */
    size_t capacity = 0;
    int header_pending = layout->header;
    for (int line = 1; cursor < end; line++) {
        char *newline = memchr(cursor, '\n', (size_t)(end - cursor));
        char *line_end = newline ? newline : end;
        *line_end = '\0';
        size_t length = (size_t)(line_end - cursor);
        if (length > 0 && cursor[length - 1] == '\r') cursor[--length] = '\0';
        if (strlen(cursor) != length) return mb_fail(err, "%s:%d: the line contains a NUL byte", s->path, line);
        row r;
        split_row(cursor, &r);
        cursor = line_end + 1;
        if (header_pending) {
            header_pending = 0;
            if (check_header(s, layout, &r, err) != 0) return -1;
            continue;
        }
        if (grow_examples(s, &capacity, err) != 0) return -1;
        int kept = read_row(s, tl, layout, &r, line, &s->examples[s->count], err);
        if (kept < 0) return -1;
        if (kept) s->count++;
        else s->skipped++;
    }
    if (header_pending) return mb_fail(err, "%s: the file is empty (expected a header line)", s->path);
    return 0;
}

int mb_glue_read_file(mb_glue_split *split, mb_glue_task task, const char *path, int labelled, mb_error *err) {
    memset(split, 0, sizeof *split);
    if ((unsigned)task >= MB_GLUE_TASK_COUNT) return mb_fail(err, "%s: invalid task %d", path, (int)task);
    split->task = task;
    split->labelled = labelled;
    snprintf(split->path, sizeof split->path, "%s", path);
    size_t size = 0;
    if (mb_read_file(path, &split->storage, &size, err) != 0) return -1;
    if (parse_lines(split, size, err) != 0) {
        mb_glue_split_free(split);
        return -1;
    }
    return 0;
}

void mb_glue_split_free(mb_glue_split *split) {
    free(split->examples);
    free(split->storage);
    split->examples = NULL;
    split->storage = NULL;
    split->count = 0;
}

int mb_glue_task_dir(mb_glue_task task, const char *dir, const char *probe_split, char *out, size_t size,
                     mb_error *err) {
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/%s.tsv", dir, probe_split);
    if (mb_path_exists(probe)) {
        snprintf(out, size, "%s", dir);
        return 0;
    }
    snprintf(probe, sizeof probe, "%s/%s/%s.tsv", dir, task_infos[task].dir_name, probe_split);
    if (mb_path_exists(probe)) {
        snprintf(out, size, "%s/%s", dir, task_infos[task].dir_name);
        return 0;
    }
    return mb_fail(err, "%s: neither %s/%s.tsv nor %s/%s/%s.tsv exists (tools/get_glue.sh downloads GLUE)", dir, dir,
                   probe_split, dir, task_infos[task].dir_name, probe_split);
}

int mb_glue_read_split(mb_glue_split *split, mb_glue_task task, const char *dir, const char *split_name,
                       mb_error *err) {
    memset(split, 0, sizeof *split);
    char task_dir[4096], path[4200];
    if (mb_glue_task_dir(task, dir, split_name, task_dir, sizeof task_dir, err) != 0) return -1;
    snprintf(path, sizeof path, "%s/%s.tsv", task_dir, split_name);
    return mb_glue_read_file(split, task, path, strncmp(split_name, "test", 4) != 0, err);
}

/* ---- encoding ---- */

void mb_glue_truncate_lengths(size_t a_length, long b_length, size_t budget, size_t *a_keep, size_t *b_keep) {
    if (b_length < 0) {
        *a_keep = a_length < budget ? a_length : budget;
        *b_keep = 0;
        return;
    }
    size_t b = (size_t)b_length;
    if (a_length + b <= budget) {
        *a_keep = a_length;
        *b_keep = b;
        return;
    }
    int swap = a_length > b;
    size_t n1 = swap ? b : a_length, n2;  /* n1 = the shorter */
    if (n1 > budget) n2 = n1;
    else n2 = n1 > budget - n1 ? n1 : budget - n1;
    if (n1 + n2 > budget) {
        n1 = budget / 2;
        n2 = n1 + budget % 2;
    }
    *a_keep = swap ? n2 : n1;
    *b_keep = swap ? n1 : n2;
    if (*a_keep > a_length) *a_keep = a_length;
    if (*b_keep > b) *b_keep = b;
}

void mb_glue_encoded_free(mb_glue_encoded *encoded) {
    free(encoded->ids);
    free(encoded->offsets);
    free(encoded->labels);
    free(encoded->indices);
    memset(encoded, 0, sizeof *encoded);
}

/* The ids of one example, malloc'ed; returns the count or -1. */
static long encode_one(const mb_glue_example *example, const mb_tokenizer *tokenizer, mb_special_ids special,
                       int max_length, int32_t **ids_out, int *truncated, mb_error *err) {
    mb_token_list a = {0}, b = {0};
    long result = -1;
    int pair = example->text_b != NULL;
    if (mb_tokenizer_encode(tokenizer, example->text_a, strlen(example->text_a), &a, err) != 0) goto done;
    if (pair && mb_tokenizer_encode(tokenizer, example->text_b, strlen(example->text_b), &b, err) != 0) goto done;
    size_t budget = (size_t)max_length - (pair ? 3 : 2), a_keep, b_keep;
    mb_glue_truncate_lengths(a.count, pair ? (long)b.count : -1, budget, &a_keep, &b_keep);
    *truncated = a_keep < a.count || b_keep < b.count;
    size_t n = a_keep + b_keep + (pair ? 3 : 2), k = 0;
    int32_t *ids = malloc(n * sizeof *ids);
    if (ids == NULL) {
        mb_fail(err, "out of memory");
        goto done;
    }
    ids[k++] = special.cls;
    memcpy(ids + k, a.ids, a_keep * sizeof *ids);
    k += a_keep;
    ids[k++] = special.sep;
    if (pair) {
        memcpy(ids + k, b.ids, b_keep * sizeof *ids);
        k += b_keep;
        ids[k++] = special.sep;
    }
    *ids_out = ids;
    result = (long)n;
done:
    mb_token_list_free(&a);
    mb_token_list_free(&b);
    return result;
}

static int allocate_encoded(mb_glue_encoded *out, size_t count, mb_error *err) {
    memset(out, 0, sizeof *out);
    out->count = count;
    out->offsets = calloc(count + 1, sizeof *out->offsets);
    out->labels = calloc(count ? count : 1, sizeof *out->labels);
    out->indices = calloc(count ? count : 1, sizeof *out->indices);
    if (out->offsets == NULL || out->labels == NULL || out->indices == NULL) {
        mb_glue_encoded_free(out);
        return mb_fail(err, "out of memory");
    }
    return 0;
}

int mb_glue_encode(const mb_glue_split *split, const mb_tokenizer *tokenizer, int max_length, mb_glue_encoded *out,
                   mb_error *err) {
    int pair = task_infos[split->task].pair;
    if (max_length < (pair ? 3 : 2))
        return mb_fail(err, "max_length %d is too small for %s (needs room for the special tokens)", max_length,
                       task_infos[split->task].dir_name);
    mb_special_ids special = mb_tokenizer_special_ids(tokenizer);
    if (special.cls < 0 || special.sep < 0) return mb_fail(err, "the tokenizer has no [CLS] or [SEP] token");
    if (allocate_encoded(out, split->count, err) != 0) return -1;
    int32_t **pieces = calloc(split->count ? split->count : 1, sizeof *pieces);
    long *lengths = calloc(split->count ? split->count : 1, sizeof *lengths);
    int failed = 0;
    mb_error first_error = {{0}};
    size_t truncated = 0;
    if (pieces == NULL || lengths == NULL) failed = 1, mb_fail(&first_error, "out of memory");
    /* The tokenizer is immutable: examples are encoded in parallel, then concatenated in order. */
#pragma omp parallel for schedule(dynamic, 64) reduction(+ : truncated)
    for (long i = 0; i < (long)split->count; i++) {
        if (failed) continue;
        mb_error local = {{0}};
        int cut = 0;
        lengths[i] = encode_one(&split->examples[i], tokenizer, special, max_length, &pieces[i], &cut, &local);
        truncated += (size_t)cut;
        if (lengths[i] < 0) {
#pragma omp critical(mb_glue_encode_error)
            if (!failed) {
                failed = 1;
                mb_fail(&first_error, "%s:%d: %s", split->path, split->examples[i].line, local.message);
            }
        }
    }
    size_t total = 0;
    for (size_t i = 0; !failed && i < split->count; i++) {
        out->offsets[i] = total;
        total += (size_t)lengths[i];
    }
    out->ids = failed ? NULL : malloc((total ? total : 1) * sizeof *out->ids);
    if (!failed && out->ids == NULL) failed = 1, mb_fail(&first_error, "out of memory");
    for (size_t i = 0; !failed && i < split->count; i++) {
        memcpy(out->ids + out->offsets[i], pieces[i], (size_t)lengths[i] * sizeof *out->ids);
        out->labels[i] = split->labelled ? split->examples[i].label : 0.0f;
        out->indices[i] = split->examples[i].index;
    }
    if (!failed) out->offsets[split->count] = total;
    for (size_t i = 0; pieces != NULL && i < split->count; i++) free(pieces[i]);
    free(pieces);
    free(lengths);
    if (failed) {
        mb_glue_encoded_free(out);
        if (err) *err = first_error;
        return -1;
    }
    out->truncated = truncated;
    out->total_tokens = total;
    return 0;
}
