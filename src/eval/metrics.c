/* GLUE metrics (formulas in metrics.h). */
#include "eval/metrics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

double mb_metric_accuracy(const float *pred, const float *label, size_t n) {
    if (n == 0) return NAN;
    size_t correct = 0;
    for (size_t i = 0; i < n; i++) correct += pred[i] == label[i];
    return (double)correct / (double)n;
}

double mb_metric_f1(const float *pred, const float *label, size_t n) {
    size_t tp = 0, fp = 0, fn = 0;
    for (size_t i = 0; i < n; i++) {
        int p = pred[i] == 1.0f, t = label[i] == 1.0f;
        tp += p && t;
        fp += p && !t;
        fn += !p && t;
    }
    size_t denominator = 2 * tp + fp + fn;
    return denominator == 0 ? 0.0 : 2.0 * (double)tp / (double)denominator;
}

double mb_metric_matthews(const float *pred, const float *label, size_t n, int num_classes) {
    double *p = calloc((size_t)num_classes, sizeof *p), *t = calloc((size_t)num_classes, sizeof *t);
    if (p == NULL || t == NULL || n == 0) {
        free(p);
        free(t);
        return NAN;
    }
    double correct = 0.0, s = (double)n;
    for (size_t i = 0; i < n; i++) {
        int pk = (int)pred[i], tk = (int)label[i];
        if (pk >= 0 && pk < num_classes) p[pk] += 1.0;
        if (tk >= 0 && tk < num_classes) t[tk] += 1.0;
        correct += pred[i] == label[i];
    }
    double pt = 0.0, pp = 0.0, tt = 0.0;
    for (int k = 0; k < num_classes; k++) {
        pt += p[k] * t[k];
        pp += p[k] * p[k];
        tt += t[k] * t[k];
    }
    free(p);
    free(t);
    double denominator = sqrt((s * s - pp) * (s * s - tt));
    return denominator == 0.0 ? 0.0 : (correct * s - pt) / denominator;
}

static double pearson_double(const double *x, const double *y, size_t n) {
    if (n < 2) return NAN;
    double mx = 0.0, my = 0.0;
    for (size_t i = 0; i < n; i++) {
        mx += x[i];
        my += y[i];
    }
    mx /= (double)n;
    my /= (double)n;
    double sxy = 0.0, sxx = 0.0, syy = 0.0;
    for (size_t i = 0; i < n; i++) {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx) * (x[i] - mx);
        syy += (y[i] - my) * (y[i] - my);
    }
    if (sxx == 0.0 || syy == 0.0) return NAN;
    double r = sxy / sqrt(sxx * syy);
    return r > 1.0 ? 1.0 : r < -1.0 ? -1.0 : r;
}

double mb_metric_pearson(const float *x, const float *y, size_t n) {
    double *dx = malloc((n ? n : 1) * sizeof *dx), *dy = malloc((n ? n : 1) * sizeof *dy);
    double r = NAN;
    if (dx != NULL && dy != NULL) {
        for (size_t i = 0; i < n; i++) {
            dx[i] = x[i];
            dy[i] = y[i];
        }
        r = pearson_double(dx, dy, n);
    }
    free(dx);
    free(dy);
    return r;
}

typedef struct ranked {
    float value;
    size_t position;
} ranked;

static int compare_ranked(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->value != y->value) return x->value < y->value ? -1 : 1;
    return x->position < y->position ? -1 : x->position > y->position;
}

int mb_metric_average_ranks(const float *x, size_t n, double *ranks) {
    ranked *order = malloc((n ? n : 1) * sizeof *order);
    if (order == NULL) return -1;
    for (size_t i = 0; i < n; i++) order[i] = (ranked){x[i], i};
    qsort(order, n, sizeof *order, compare_ranked);
    for (size_t start = 0; start < n;) {
        size_t end = start + 1;
        while (end < n && order[end].value == order[start].value) end++;
        double average = 0.5 * (double)(start + 1 + end);  /* mean of the 1-based ranks start+1 .. end */
        for (size_t k = start; k < end; k++) ranks[order[k].position] = average;
        start = end;
    }
    free(order);
    return 0;
}

double mb_metric_spearman(const float *x, const float *y, size_t n) {
    double *rx = malloc((n ? n : 1) * sizeof *rx), *ry = malloc((n ? n : 1) * sizeof *ry);
    double rho = NAN;
    if (rx != NULL && ry != NULL && mb_metric_average_ranks(x, n, rx) == 0 && mb_metric_average_ranks(y, n, ry) == 0)
        rho = pearson_double(rx, ry, n);
    free(rx);
    free(ry);
    return rho;
}

int mb_glue_score(mb_glue_task task, const float *pred, const float *label, size_t n, mb_glue_scores *scores,
                  mb_error *err) {
    const mb_glue_task_info *info = mb_glue_task_get(task);
    if (info == NULL) return mb_fail(err, "invalid task %d", (int)task);
    if (n == 0) return mb_fail(err, "%s: no examples to score", info->dir_name);
    *scores = (mb_glue_scores){info->metrics, n, NAN, NAN, NAN, NAN, NAN, NAN, NAN};
    switch (info->metrics) {
    case MB_GLUE_METRIC_MCC:
        scores->matthews = mb_metric_matthews(pred, label, n, info->num_labels);
        scores->main = scores->combined = scores->matthews;
        break;
    case MB_GLUE_METRIC_ACCURACY:
        scores->accuracy = mb_metric_accuracy(pred, label, n);
        scores->main = scores->combined = scores->accuracy;
        break;
    case MB_GLUE_METRIC_F1_ACCURACY:
        scores->accuracy = mb_metric_accuracy(pred, label, n);
        scores->f1 = mb_metric_f1(pred, label, n);
        scores->main = scores->accuracy;
        scores->combined = 0.5 * (scores->accuracy + scores->f1);
        break;
    case MB_GLUE_METRIC_CORRELATION:
        scores->pearson = mb_metric_pearson(pred, label, n);
        scores->spearman = mb_metric_spearman(pred, label, n);
        scores->main = scores->spearman;
        scores->combined = 0.5 * (scores->pearson + scores->spearman);
        break;
    }
    return 0;
}

void mb_glue_scores_format(const mb_glue_scores *s, char *out, size_t size) {
    switch (s->set) {
    case MB_GLUE_METRIC_MCC: snprintf(out, size, "mcc %.4f", s->matthews); break;
    case MB_GLUE_METRIC_ACCURACY: snprintf(out, size, "acc %.4f", s->accuracy); break;
    case MB_GLUE_METRIC_F1_ACCURACY: snprintf(out, size, "acc %.4f f1 %.4f", s->accuracy, s->f1); break;
    case MB_GLUE_METRIC_CORRELATION:
        snprintf(out, size, "pearson %.4f spearman %.4f", s->pearson, s->spearman);
        break;
    }
}
