/* The GLUE results table (see report.h). */
#include "eval/report.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Table 5's column order. */
static const mb_glue_task table5_tasks[] = {MB_GLUE_COLA, MB_GLUE_SST2, MB_GLUE_MRPC, MB_GLUE_STSB,
                                           MB_GLUE_QQP,  MB_GLUE_MNLI, MB_GLUE_QNLI, MB_GLUE_RTE};
#define TABLE5_COUNT ((int)(sizeof table5_tasks / sizeof table5_tasks[0]))

double mb_glue_table_average(const mb_glue_table *table, int *tasks_used) {
    double sum = 0.0;
    int used = 0;
    for (int i = 0; i < TABLE5_COUNT; i++) {
        const mb_glue_table_row *row = &table->rows[table5_tasks[i]];
        if (!row->done || !isfinite(row->scores[0].main)) continue;
        sum += row->scores[0].main;
        used++;
    }
    if (tasks_used) *tasks_used = used;
    return used ? sum / used : NAN;
}

void mb_format_parameters(size_t parameters, char *out, size_t size) {
    double p = (double)parameters;
    if (p >= 10e6) snprintf(out, size, "%.0fM", p / 1e6);
    else if (p >= 1e6) snprintf(out, size, "%.1fM", p / 1e6);
    else snprintf(out, size, "%.0fK", p / 1e3);
}

static void cell(FILE *out, const mb_glue_table_row *row) {
    if (row->done && isfinite(row->scores[0].main)) fprintf(out, " %.1f |", 100.0 * row->scores[0].main);
    else fprintf(out, " – |");
}

static void metric_text(const mb_glue_scores *s, char *out, size_t size) {
    switch (s->set) {
    case MB_GLUE_METRIC_MCC: snprintf(out, size, "MCC %.1f", 100 * s->matthews); break;
    case MB_GLUE_METRIC_ACCURACY: snprintf(out, size, "acc %.1f", 100 * s->accuracy); break;
    case MB_GLUE_METRIC_F1_ACCURACY: snprintf(out, size, "acc %.1f, F1 %.1f", 100 * s->accuracy, 100 * s->f1); break;
    case MB_GLUE_METRIC_CORRELATION:
        snprintf(out, size, "Pearson %.1f, Spearman %.1f", 100 * s->pearson, 100 * s->spearman);
        break;
    }
}

static void details(FILE *out, const mb_glue_table *table) {
    fprintf(out, "\n| Task | Dev split: metrics (×100) | lr | weight decay | best epoch / run | started from |\n");
    fprintf(out, "|---|---|---|---|---|---|\n");
    for (int t = 0; t < MB_GLUE_TASK_COUNT; t++) {
        const mb_glue_table_row *row = &table->rows[t];
        if (!row->done) continue;
        fprintf(out, "| %s |", mb_glue_task_get((mb_glue_task)t)->display_name);
        for (int i = 0; i < row->dev_count; i++) {
            char text[128];
            metric_text(&row->scores[i], text, sizeof text);
            fprintf(out, "%s %s: %s", i ? ";" : "", row->dev_names[i], text);
        }
        fprintf(out, " | %.3g | %.3g | %d / %d | %s |\n", row->lr, row->weight_decay, row->best_epoch,
                row->epochs_run, row->init);
    }
}

char *mb_glue_table_markdown(const mb_glue_table *table) {
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (out == NULL) return NULL;
    int wnli = table->rows[MB_GLUE_WNLI].done;
    fprintf(out, "| Model | Params |");
    for (int i = 0; i < TABLE5_COUNT; i++) fprintf(out, " %s |", mb_glue_task_get(table5_tasks[i])->display_name);
    fprintf(out, "%s Avg |\n|---|---|", wnli ? " WNLI |" : "");
    for (int i = 0; i < TABLE5_COUNT + 1 + wnli; i++) fprintf(out, "---|");
    char params[32];
    mb_format_parameters(table->parameters, params, sizeof params);
    fprintf(out, "\n| %s | %s |", table->model, params);
    for (int i = 0; i < TABLE5_COUNT; i++) cell(out, &table->rows[table5_tasks[i]]);
    if (wnli) cell(out, &table->rows[MB_GLUE_WNLI]);
    int used = 0;
    double average = mb_glue_table_average(table, &used);
    if (used == 0) fprintf(out, " – |\n");
    else if (used < TABLE5_COUNT) fprintf(out, " %.1f (%d/%d) |\n", 100 * average, used, TABLE5_COUNT);
    else fprintf(out, " %.1f |\n", 100 * average);
    details(out, table);
    fclose(out);
    return text;
}

static void json_number(FILE *out, const char *key, double value, int *first) {
    if (!isfinite(value)) return;
    fprintf(out, "%s\"%s\": %.9g", *first ? "" : ", ", key, value);
    *first = 0;
}

static void json_scores(FILE *out, const mb_glue_scores *s) {
    int first = 1;
    fprintf(out, "{");
    json_number(out, "accuracy", s->accuracy, &first);
    json_number(out, "f1", s->f1, &first);
    json_number(out, "matthews", s->matthews, &first);
    json_number(out, "pearson", s->pearson, &first);
    json_number(out, "spearman", s->spearman, &first);
    json_number(out, "main", s->main, &first);
    fprintf(out, "%s\"count\": %zu}", first ? "" : ", ", s->count);
}

/* Escapes the few characters a path or a name could bring into a JSON string. */
static void json_string(FILE *out, const char *text) {
    fputc('"', out);
    for (const char *c = text; *c; c++) {
        if (*c == '"' || *c == '\\') fprintf(out, "\\%c", *c);
        else if ((unsigned char)*c < 0x20) fprintf(out, "\\u%04x", *c);
        else fputc(*c, out);
    }
    fputc('"', out);
}

char *mb_glue_table_json(const mb_glue_table *table) {
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (out == NULL) return NULL;
    fprintf(out, "{\"model\": ");
    json_string(out, table->model);
    fprintf(out, ", \"parameters\": %zu, \"tasks\": {", table->parameters);
    int first = 1;
    for (int t = 0; t < MB_GLUE_TASK_COUNT; t++) {
        const mb_glue_table_row *row = &table->rows[t];
        if (!row->done) continue;
        fprintf(out, "%s\"%s\": {\"main\": ", first ? "" : ", ", mb_glue_task_get((mb_glue_task)t)->name);
        first = 0;
        if (isfinite(row->scores[0].main)) fprintf(out, "%.9g", row->scores[0].main);
        else fprintf(out, "null");
        fprintf(out, ", \"dev\": {");
        for (int i = 0; i < row->dev_count; i++) {
            fprintf(out, "%s\"%s\": ", i ? ", " : "", row->dev_names[i]);
            json_scores(out, &row->scores[i]);
        }
        fprintf(out, "}, \"lr\": %.9g, \"weight_decay\": %.9g, \"best_epoch\": %d, \"epochs_run\": %d, \"init\": ",
                row->lr, row->weight_decay, row->best_epoch, row->epochs_run);
        json_string(out, row->init);
        fprintf(out, "}");
    }
    int used = 0;
    double average = mb_glue_table_average(table, &used);
    fprintf(out, "}, \"average\": ");
    if (used) fprintf(out, "%.9g", average);
    else fprintf(out, "null");
    fprintf(out, ", \"average_tasks\": %d}\n", used);
    fclose(out);
    return text;
}
