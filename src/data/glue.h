/* GLUE tasks: the task table, readers for the TSV files exactly as the GLUE zip files distribute them, and the
 * encoding of examples as ModernBERT inputs.
 *
 * Files are read as raw TSV: fields split on '\t', no quote processing (a '"' is an ordinary character, as
 * csv.QUOTE_NONE reads them), a trailing "\r" dropped, a UTF-8 byte-order mark at the start of the file skipped
 * (MRPC's train.tsv starts with one). Column layout per task (0-based; "last" = the row's last field, as
 * transformers' processors read it):
 *
 *   task   header (train/dev)            text a   text b   label                  test header / text columns
 *   CoLA   none (source, label, *, text)  3        -        1   0/1                 index sentence      / 1
 *   SST-2  sentence label                 0        -        1   0/1                 index sentence      / 1
 *   MRPC   Quality #1 ID #2 ID #1 String  3        4        0   0/1                 index #1 ID ...     / 3, 4
 *   QQP    id qid1 qid2 question1 ...     3        4        5   0/1                 id question1 ...    / 1, 2
 *   STS-B  index genre ... sentence1 ...  7        8        last float in [0, 5]    (no score)          / 7, 8
 *   MNLI   index promptID ... sentence1   8        9        last contradiction/...  (no labels)         / 8, 9
 *   QNLI   index question sentence label  1        2        last (not_)entailment   index question ...  / 1, 2
 *   RTE    index sentence1 sentence2 lbl  1        2        last (not_)entailment   (no label)          / 1, 2
 *   WNLI   as RTE                         1        2        last 0/1                (no label)          / 1, 2
 *
 * Quirks kept: CoLA's train and dev files have no header (its test file has one); QQP and MRPC rows with too few
 * fields (QQP has a few, broken by stray newlines) are skipped and counted, as transformers skips them; any other
 * malformed row, a wrong header or an unknown label fails with "FILE:LINE: ...". A split whose name starts with
 * "test" is unlabelled (GLUE's test files); its first column is the index written into submissions. Other splits
 * (train, dev, dev_matched, dev_mismatched, or a custom name such as heldout) are labelled.
 *
 * Label ids follow the Hugging Face `datasets` "glue" ClassLabel order (ecosystem §3.2), so a checkpoint's id2label
 * agrees with what the HF hub models use: MNLI entailment=0, neutral=1, contradiction=2; WNLI 0 = not_entailment.
 *
 * Encoding: [CLS] A [SEP] or [CLS] A [SEP] B [SEP], truncated to max_length tokens with Hugging Face tokenizers'
 * "longest_first" rule (tokenizers::utils::truncation, the fast tokenizer ModernBERT ships): with L = max_length
 * minus the special tokens and n1 <= n2 the shorter and longer lengths,
 *     n1 <= L/2 (integer)     keep the shorter whole, cut the longer to L - n1
 *     otherwise               the first text keeps floor(L/2) and the second ceil(L/2) when the first is not
 *                             longer, and the other way round when it is (the longer side gets the odd token)
 * and a single text is cut to L. Tokens are cut from the end. */
#ifndef MB_GLUE_H
#define MB_GLUE_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "data/tokenizer.h"

typedef enum mb_glue_task {
    MB_GLUE_COLA,
    MB_GLUE_SST2,
    MB_GLUE_MRPC,
    MB_GLUE_QQP,
    MB_GLUE_STSB,
    MB_GLUE_MNLI,
    MB_GLUE_QNLI,
    MB_GLUE_RTE,
    MB_GLUE_WNLI,
    MB_GLUE_TASK_COUNT,
} mb_glue_task;

typedef enum mb_glue_metric_set {
    MB_GLUE_METRIC_MCC,          /* Matthews correlation (CoLA) */
    MB_GLUE_METRIC_ACCURACY,     /* SST-2, QNLI, RTE, WNLI; MNLI matched and mismatched */
    MB_GLUE_METRIC_F1_ACCURACY,  /* MRPC, QQP */
    MB_GLUE_METRIC_CORRELATION,  /* STS-B: Pearson and Spearman */
} mb_glue_metric_set;

#define MB_GLUE_MAX_SPLITS 2

typedef struct mb_glue_task_info {
    const char *name;                 /* command-line name: "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", ... */
    const char *dir_name;             /* folder in the GLUE archive: "CoLA", "SST-2", "MRPC", ... */
    const char *display_name;         /* column title in the results table: "CoLA", "SST-2", ... */
    int num_labels;                   /* 1 = regression (STS-B) */
    const char *label_names[3];       /* id2label */
    const char *file_labels[3];       /* the label as written in the TSV files (and in submissions), by id */
    int pair;                         /* two texts per example */
    mb_glue_metric_set metrics;
    int dev_count;                    /* 1, or 2 for MNLI */
    const char *dev_splits[MB_GLUE_MAX_SPLITS];     /* "dev" or "dev_matched", "dev_mismatched" */
    const char *test_splits[MB_GLUE_MAX_SPLITS];    /* "test" or "test_matched", "test_mismatched" */
    const char *submission_files[MB_GLUE_MAX_SPLITS]; /* "CoLA.tsv"; "MNLI-m.tsv", "MNLI-mm.tsv" */
} mb_glue_task_info;

const mb_glue_task_info *mb_glue_task_get(mb_glue_task task);
/* Looks a task up by name, case-insensitive, accepting "sst2"/"sst-2", "stsb"/"sts-b" and the folder names.
 * Returns -1 with a message listing the tasks when unknown. */
int mb_glue_task_from_name(const char *name, mb_glue_task *task, mb_error *err);

typedef struct mb_glue_example {
    int64_t index;       /* test splits: the file's index column; other splits: position among the kept rows */
    const char *text_a;  /* NUL-terminated, points into the split's storage */
    const char *text_b;  /* NULL for single-sentence tasks */
    float label;         /* class id, regression target, or -1 when the split is unlabelled */
    int line;            /* 1-based line number in the file */
} mb_glue_example;

typedef struct mb_glue_split {
    mb_glue_task task;
    char path[4096];
    int labelled;
    mb_glue_example *examples;
    size_t count;
    size_t skipped;      /* malformed rows skipped (QQP, MRPC only) */
    char *storage;       /* the file's bytes, split in place */
} mb_glue_split;

/* Reads one TSV file of a task. `labelled` = 0 for GLUE test files (header and columns of the test layout).
 * Errors name the file and line. */
int mb_glue_read_file(mb_glue_split *split, mb_glue_task task, const char *path, int labelled, mb_error *err);
/* Reads DIR/SPLIT.tsv (or DIR/<task folder>/SPLIT.tsv when DIR is the GLUE root); split names starting with "test"
 * are read as unlabelled. */
int mb_glue_read_split(mb_glue_split *split, mb_glue_task task, const char *dir, const char *split_name,
                       mb_error *err);
void mb_glue_split_free(mb_glue_split *split);
/* The folder holding a task's files: DIR itself when DIR/<probe>.tsv exists, else DIR/<task folder>. */
int mb_glue_task_dir(mb_glue_task task, const char *dir, const char *probe_split, char *out, size_t size,
                     mb_error *err);

/* Lengths after longest-first truncation of a pair (or a single text when b_length < 0) to `budget` tokens
 * (max_length minus the special tokens). */
void mb_glue_truncate_lengths(size_t a_length, long b_length, size_t budget, size_t *a_keep, size_t *b_keep);

/* Token ids of every example of a split, concatenated: example i is ids[offsets[i] .. offsets[i + 1]). */
typedef struct mb_glue_encoded {
    int32_t *ids;
    size_t *offsets;     /* count + 1 */
    float *labels;       /* count; 0 for unlabelled splits (the model needs a valid target to run) */
    int64_t *indices;    /* count; the examples' index (submission rows) */
    size_t count;
    size_t truncated;    /* examples that were cut */
    size_t total_tokens;
} mb_glue_encoded;

/* Encodes a split as [CLS] A [SEP] (B [SEP]) with at most max_length tokens (>= 3 for pairs, >= 2 otherwise). */
int mb_glue_encode(const mb_glue_split *split, const mb_tokenizer *tokenizer, int max_length, mb_glue_encoded *out,
                   mb_error *err);
void mb_glue_encoded_free(mb_glue_encoded *encoded);

#endif
