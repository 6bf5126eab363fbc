/* The GLUE results table in the layout of the ModernBERT paper's Table 5 (dev scores × 100, one decimal):
 *
 *   | Model | Params | CoLA | SST-2 | MRPC | STS-B | QQP | MNLI | QNLI | RTE | Avg |
 *
 * with the main score of each task (metrics.h: CoLA Matthews, STS-B Spearman, MNLI matched accuracy, the others
 * accuracy), "–" for a task not run, a WNLI column only when WNLI was run, and Avg = the mean of the Table-5 tasks
 * that were run (marked "(n/8)" when not all eight were). A second table lists every metric, the learning rate and
 * the epochs of each task. The JSON form carries the same numbers unrounded. */
#ifndef MB_REPORT_H
#define MB_REPORT_H

#include <stddef.h>

#include "data/glue.h"
#include "eval/metrics.h"

typedef struct mb_glue_table_row {
    int done;
    int dev_count;
    char dev_names[MB_GLUE_MAX_SPLITS][64];
    mb_glue_scores scores[MB_GLUE_MAX_SPLITS];
    double lr, weight_decay;
    int best_epoch, epochs_run;
    char init[256];          /* what the task started from (e.g. the MNLI checkpoint for RTE) */
} mb_glue_table_row;

typedef struct mb_glue_table {
    char model[128];
    size_t parameters;
    mb_glue_table_row rows[MB_GLUE_TASK_COUNT];  /* indexed by mb_glue_task */
} mb_glue_table;

/* The Table-5 average over the tasks run (NaN when none); *tasks_used receives how many of the eight were run. */
double mb_glue_table_average(const mb_glue_table *table, int *tasks_used);
/* "149M", "7.2M", "850K". */
void mb_format_parameters(size_t parameters, char *out, size_t size);
/* malloc'ed text; NULL when out of memory. */
char *mb_glue_table_markdown(const mb_glue_table *table);
char *mb_glue_table_json(const mb_glue_table *table);

#endif
