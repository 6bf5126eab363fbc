/* modernbert plot RUN: draws RUN/metrics.jsonl (training loss, validation loss, learning rate against tokens) into
 * RUN/loss.png with gnuplot. The data files and the gnuplot script stay in RUN/plot/ for editing. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "commands.h"
#include "common/fileio.h"

static const char *plot_script =
    "set terminal pngcairo size 1200,800 font 'sans,10'\n"
    "set output '%s/loss.png'\n"
    "set multiplot layout 2,1 title '%s'\n"
    "set xlabel 'tokens'\n"
    "set ylabel 'MLM loss'\n"
    "set grid\n"
    "set key top right\n"
    "plot '%s/plot/train.dat' using 1:2 with lines lw 1.5 title 'train', \\\n"
    "     '%s/plot/val.dat' using 1:2 with linespoints pt 7 ps 0.6 lw 1.5 title 'validation'\n"
    "set ylabel 'learning rate'\n"
    "set format y '%%.1e'\n"
    "plot '%s/plot/train.dat' using 1:3 with lines lw 1.5 title 'lr'\n"
    "unset multiplot\n";

static int split_metrics(const char *run, int *train_rows, int *val_rows) {
    char path[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    FILE *metrics = fopen(path, "r");
    if (metrics == NULL) {
        fprintf(stderr, "modernbert plot: %s: cannot open (is RUN a run directory?)\n", path);
        return -1;
    }
    snprintf(path, sizeof path, "%s/plot/train.dat", run);
    FILE *train = fopen(path, "w");
    snprintf(path, sizeof path, "%s/plot/val.dat", run);
    FILE *val = fopen(path, "w");
    if (train == NULL || val == NULL) {
        fprintf(stderr, "modernbert plot: cannot write into %s/plot\n", run);
        return -1;
    }
    char line[4096];
    int number = 0;
    while (fgets(line, sizeof line, metrics)) {
        number++;
        cJSON *record = cJSON_Parse(line);
        if (record == NULL) {
            fprintf(stderr, "modernbert plot: %s/metrics.jsonl:%d: not JSON; skipped\n", run, number);
            continue;
        }
        const cJSON *tokens = cJSON_GetObjectItem(record, "tokens"), *loss = cJSON_GetObjectItem(record, "loss");
        const cJSON *lr = cJSON_GetObjectItem(record, "lr"), *val_loss = cJSON_GetObjectItem(record, "val_loss");
        if (cJSON_IsNumber(tokens) && cJSON_IsNumber(loss) && cJSON_IsNumber(lr) && loss->valuedouble >= 0) {
            fprintf(train, "%.0f %.9g %.9g\n", tokens->valuedouble, loss->valuedouble, lr->valuedouble);
            (*train_rows)++;
        }
        if (cJSON_IsNumber(tokens) && cJSON_IsNumber(val_loss)) {
            fprintf(val, "%.0f %.9g\n", tokens->valuedouble, val_loss->valuedouble);
            (*val_rows)++;
        }
        cJSON_Delete(record);
    }
    fclose(metrics);
    fclose(train);
    fclose(val);
    return 0;
}

int mb_cmd_plot(int argc, char **argv) {
    if (argc != 2 || strcmp(argv[1], "--help") == 0) {
        FILE *stream = argc == 2 ? stdout : stderr;
        fprintf(stream, "usage: modernbert plot RUN\n\nDraws RUN/metrics.jsonl (train and validation loss, learning "
                        "rate, against tokens) into RUN/loss.png\nwith gnuplot (Debian package gnuplot-nox). The data "
                        "and the script stay in RUN/plot/.\n");
        return argc == 2 ? 0 : 2;
    }
    const char *run = argv[1];
    char path[4096];
    mb_error err;
    snprintf(path, sizeof path, "%s/plot", run);
    if (mb_make_dirs(path, &err) != 0) {
        fprintf(stderr, "modernbert plot: %s\n", err.message);
        return 1;
    }
    int train_rows = 0, val_rows = 0;
    if (split_metrics(run, &train_rows, &val_rows) != 0) return 1;
    if (train_rows == 0) {
        fprintf(stderr, "modernbert plot: %s/metrics.jsonl has no training records yet\n", run);
        return 1;
    }
    snprintf(path, sizeof path, "%s/plot/plot.gp", run);
    FILE *script = fopen(path, "w");
    if (script == NULL) return 1;
    fprintf(script, plot_script, run, run, run, run, run);
    fclose(script);
    char command[8400];
    snprintf(command, sizeof command, "gnuplot '%s' 2>&1", path);
    int status = system(command);
    if (status != 0) {
        fprintf(stderr, "modernbert plot: gnuplot failed (install it with: apt-get install gnuplot-nox); the script "
                        "is %s\n", path);
        return 1;
    }
    printf("wrote %s/loss.png (%d training points, %d validation points)\n", run, train_rows, val_rows);
    return 0;
}
