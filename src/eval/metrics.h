/* GLUE metrics, computed as GLUE's reference implementations compute them (evaluate/metrics/glue: scikit-learn and
 * SciPy). Class predictions and labels are class ids stored as floats (the form the fine-tuning code keeps them in);
 * regression predictions and targets are the scores.
 *
 *   accuracy   = (1/n) Σ [pred_i = label_i]
 *   F1         = 2·TP / (2·TP + FP + FN), class 1 positive (sklearn f1_score, average="binary"); 0 when TP+FP+FN = 0
 *   Matthews   = (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²))  (sklearn matthews_corrcoef, multiclass
 *                form: s = n, c = correct, p_k / t_k = times class k was predicted / is true); 0 when the
 *                denominator is 0
 *   Pearson r  = Σ (x − x̄)(y − ȳ) / sqrt(Σ (x − x̄)² · Σ (y − ȳ)²)   (sums in double; NaN when a variance is 0)
 *   Spearman ρ = Pearson r of the ranks, tied values sharing the average of their ranks (scipy.stats.spearmanr)
 *
 * Per task (ecosystem §3.3): CoLA Matthews; SST-2, QNLI, RTE, WNLI accuracy; MRPC and QQP F1 and accuracy; STS-B
 * Pearson and Spearman; MNLI accuracy on the matched and the mismatched dev sets (two separate scorings). The "main"
 * score is the one the paper's Table 5 shows and fine-tuning selects checkpoints by: Matthews (CoLA), accuracy
 * (SST-2, MRPC, QQP, MNLI, QNLI, RTE, WNLI), Spearman (STS-B, as ModernBERT's own GLUE harness reports it).
 * "combined" is the mean of the task's metrics (run_glue.py's combined_score). */
#ifndef MB_METRICS_H
#define MB_METRICS_H

#include <stddef.h>

#include "data/glue.h"

double mb_metric_accuracy(const float *pred, const float *label, size_t n);
double mb_metric_f1(const float *pred, const float *label, size_t n);
/* Class ids must lie in [0, num_classes); others are ignored in the per-class counts (but count in s). */
double mb_metric_matthews(const float *pred, const float *label, size_t n, int num_classes);
double mb_metric_pearson(const float *x, const float *y, size_t n);
double mb_metric_spearman(const float *x, const float *y, size_t n);
/* 1-based ranks of x with ties given their average rank (scipy.stats.rankdata(method="average")). */
int mb_metric_average_ranks(const float *x, size_t n, double *ranks);

typedef struct mb_glue_scores {
    mb_glue_metric_set set;
    size_t count;
    double accuracy, f1, matthews, pearson, spearman;  /* those the set does not use are NaN */
    double main;
    double combined;
} mb_glue_scores;

/* Scores predictions of one dev split of `task`. Returns -1 when n == 0 or memory runs out. */
int mb_glue_score(mb_glue_task task, const float *pred, const float *label, size_t n, mb_glue_scores *scores,
                  mb_error *err);
/* "mcc 0.5123" / "acc 0.9012 f1 0.8834" / "pearson 0.8 spearman 0.79": a one-line summary. */
void mb_glue_scores_format(const mb_glue_scores *scores, char *out, size_t size);

#endif
