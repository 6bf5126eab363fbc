/* GLUE metrics against values computed by hand (the arithmetic is in the comments), and the results table. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

#include "eval/metrics.h"
#include "eval/report.h"

#define EPS 1e-12

Test(metrics, accuracy) {
    float pred[] = {0, 1, 1, 0, 1}, label[] = {0, 1, 0, 0, 0};
    cr_assert_float_eq(mb_metric_accuracy(pred, label, 5), 0.6, EPS);  /* rows 0, 1, 3 right */
    cr_assert(isnan(mb_metric_accuracy(pred, label, 0)));
}

Test(metrics, f1_positive_class_one) {
    /* TP = row 1; FP = rows 2, 4; FN = none: F1 = 2·1 / (2·1 + 2 + 0) = 0.5 */
    float pred[] = {0, 1, 1, 0, 1}, label[] = {0, 1, 0, 0, 0};
    cr_assert_float_eq(mb_metric_f1(pred, label, 5), 0.5, EPS);
    /* TP 2, FP 1, FN 1: 4 / 6 */
    float p2[] = {1, 1, 1, 0, 0}, l2[] = {1, 1, 0, 1, 0};
    cr_assert_float_eq(mb_metric_f1(p2, l2, 5), 4.0 / 6.0, EPS);
    /* no positive anywhere: sklearn's zero_division gives 0 */
    float zeros[] = {0, 0, 0};
    cr_assert_float_eq(mb_metric_f1(zeros, zeros, 3), 0.0, EPS);
}

Test(metrics, matthews_binary_and_multiclass) {
    /* TP 3, TN 3, FP 1, FN 1: (3·3 − 1·1) / sqrt(4·4·4·4) = 8 / 16 */
    float pred[] = {1, 1, 1, 0, 0, 0, 1, 0}, label[] = {1, 1, 0, 0, 0, 1, 1, 0};
    cr_assert_float_eq(mb_metric_matthews(pred, label, 8, 2), 0.5, EPS);
    /* 3 classes: c = 3, s = 6, p = t = (2, 2, 2): (3·6 − 12) / sqrt((36 − 12)(36 − 12)) = 6 / 24 */
    float p3[] = {0, 1, 2, 0, 1, 2}, l3[] = {0, 1, 2, 1, 2, 0};
    cr_assert_float_eq(mb_metric_matthews(p3, l3, 6, 3), 0.25, EPS);
    /* all wrong, binary: TP = TN = 0, FP = FN = 2: (0 − 4) / sqrt(2·2·2·2) = −1 */
    float p4[] = {1, 1, 0, 0}, l4[] = {0, 0, 1, 1};
    cr_assert_float_eq(mb_metric_matthews(p4, l4, 4, 2), -1.0, EPS);
    /* a constant prediction: the denominator is 0 and sklearn returns 0 */
    float constant[] = {1, 1, 1, 1}, mixed[] = {0, 1, 0, 1};
    cr_assert_float_eq(mb_metric_matthews(constant, mixed, 4, 2), 0.0, EPS);
}

Test(metrics, pearson) {
    /* x̄ = 3, ȳ = 4; Σdxdy = 4 + 0 + 0 + 0 + 2 = 6, Σdx² = 10, Σdy² = 6: r = 6 / sqrt(60) */
    float x[] = {1, 2, 3, 4, 5}, y[] = {2, 4, 5, 4, 5};
    cr_assert_float_eq(mb_metric_pearson(x, y, 5), 6.0 / sqrt(60.0), 1e-9);
    float neg[] = {10, 8, 6, 4, 2};
    cr_assert_float_eq(mb_metric_pearson(x, neg, 5), -1.0, 1e-9);
    float flat[] = {3, 3, 3, 3, 3};
    cr_assert(isnan(mb_metric_pearson(x, flat, 5)));
}

Test(metrics, average_ranks) {
    float x[] = {10, 20, 10, 30, 20, 10};
    double ranks[6];
    cr_assert_eq(mb_metric_average_ranks(x, 6, ranks), 0);
    double expected[] = {2, 4.5, 2, 6, 4.5, 2};  /* 10s share ranks 1-3, 20s share 4-5 */
    for (int i = 0; i < 6; i++) cr_assert_float_eq(ranks[i], expected[i], EPS, "rank %d", i);
}

Test(metrics, spearman_with_ties) {
    /* ranks of y = (1, 2.5, 4.5, 2.5, 4.5), of x = (1..5): Σdxdy = 4 + 0.5 + 0 − 0.5 + 3 = 7, Σdx² = 10,
     * Σdy² = 4 + 0.25 + 2.25 + 0.25 + 2.25 = 9: ρ = 7 / sqrt(90) */
    float x[] = {1, 2, 3, 4, 5}, y[] = {2, 4, 5, 4, 5};
    cr_assert_float_eq(mb_metric_spearman(x, y, 5), 7.0 / sqrt(90.0), 1e-9);
    /* monotone but not linear: ρ = 1 while r < 1 */
    float a[] = {1, 2, 3, 4}, b[] = {1, 4, 9, 16};
    cr_assert_float_eq(mb_metric_spearman(a, b, 4), 1.0, 1e-12);
    cr_assert(mb_metric_pearson(a, b, 4) < 0.99);
}

Test(metrics, task_scores) {
    mb_glue_scores s;
    mb_error err = {{0}};
    float pred[] = {0, 1, 1, 0, 1}, label[] = {0, 1, 0, 0, 0};
    cr_assert_eq(mb_glue_score(MB_GLUE_MRPC, pred, label, 5, &s, &err), 0);
    cr_assert_float_eq(s.accuracy, 0.6, EPS);
    cr_assert_float_eq(s.f1, 0.5, EPS);
    cr_assert_float_eq(s.main, 0.6, EPS, "Table 5 shows MRPC accuracy");
    cr_assert_float_eq(s.combined, 0.55, EPS);
    cr_assert(isnan(s.matthews));
    cr_assert_eq(mb_glue_score(MB_GLUE_COLA, pred, label, 5, &s, &err), 0);
    /* TP 1, TN 2, FP 2, FN 0: (1·2 − 2·0) / sqrt(3·1·4·2) = 2 / sqrt(24) */
    cr_assert_float_eq(s.matthews, 2.0 / sqrt(24.0), 1e-12);
    cr_assert_float_eq(s.main, s.matthews, EPS);
    float x[] = {1, 2, 3, 4, 5}, y[] = {2, 4, 5, 4, 5};
    cr_assert_eq(mb_glue_score(MB_GLUE_STSB, x, y, 5, &s, &err), 0);
    cr_assert_float_eq(s.main, 7.0 / sqrt(90.0), 1e-9, "STS-B's main score is Spearman");
    cr_assert_float_eq(s.pearson, 6.0 / sqrt(60.0), 1e-9);
    cr_assert_neq(mb_glue_score(MB_GLUE_SST2, x, y, 0, &s, &err), 0);
    char text[128];
    cr_assert_eq(mb_glue_score(MB_GLUE_QQP, pred, label, 5, &s, &err), 0);
    mb_glue_scores_format(&s, text, sizeof text);
    cr_assert_str_eq(text, "acc 0.6000 f1 0.5000");
}

Test(report, table5_layout) {
    mb_glue_table table;
    memset(&table, 0, sizeof table);
    snprintf(table.model, sizeof table.model, "tiny");
    table.parameters = 7234567;
    mb_glue_table_row *cola = &table.rows[MB_GLUE_COLA], *mnli = &table.rows[MB_GLUE_MNLI];
    cola->done = 1;
    cola->dev_count = 1;
    snprintf(cola->dev_names[0], sizeof cola->dev_names[0], "dev");
    cola->scores[0] = (mb_glue_scores){MB_GLUE_METRIC_MCC, 10, NAN, NAN, 0.25, NAN, NAN, 0.25, 0.25};
    mnli->done = 1;
    mnli->dev_count = 2;
    snprintf(mnli->dev_names[0], sizeof mnli->dev_names[0], "dev_matched");
    snprintf(mnli->dev_names[1], sizeof mnli->dev_names[1], "dev_mismatched");
    mnli->scores[0] = (mb_glue_scores){MB_GLUE_METRIC_ACCURACY, 20, 0.5, NAN, NAN, NAN, NAN, 0.5, 0.5};
    mnli->scores[1] = (mb_glue_scores){MB_GLUE_METRIC_ACCURACY, 20, 0.4, NAN, NAN, NAN, NAN, 0.4, 0.4};
    int used = 0;
    cr_assert_float_eq(mb_glue_table_average(&table, &used), 0.375, EPS);
    cr_assert_eq(used, 2);
    char *md = mb_glue_table_markdown(&table);
    cr_assert_not_null(md);
    cr_assert_not_null(strstr(md, "| Model | Params | CoLA | SST-2 | MRPC | STS-B | QQP | MNLI | QNLI | RTE | Avg |\n"),
                       "%s", md);
    cr_assert_not_null(strstr(md, "| tiny | 7.2M | 25.0 | – | – | – | – | 50.0 | – | – | 37.5 (2/8) |\n"), "%s", md);
    cr_assert_null(strstr(md, "WNLI"), "no WNLI column unless WNLI ran");
    free(md);
    char *json = mb_glue_table_json(&table);
    cr_assert_not_null(strstr(json, "\"average\": 0.375"), "%s", json);
    cr_assert_not_null(strstr(json, "\"cola\": {\"main\": 0.25, \"dev\": {\"dev\": {\"matthews\": 0.25, \"main\": 0.25, "
                                    "\"count\": 10}}"), "%s", json);
    cr_assert_not_null(strstr(json, "\"dev_mismatched\": {\"accuracy\": 0.4, \"main\": 0.4, \"count\": 20}"), "%s",
                       json);
    free(json);
}
