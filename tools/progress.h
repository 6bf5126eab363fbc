/* A progress reporter for long-running commands (tokenize, and anything else that walks a known amount of work).
 *
 * On a terminal it redraws one status line in place (at most 10 times a second):
 *     tokenize [#########.........]  47.1%  1.21/2.57 GiB | 1,234 docs | 5.61M tokens | 1.20M tokens/s | ETA 0:32
 * Otherwise (a log file, CI) it prints the same facts as a plain line every few seconds, and once at the end.
 * The ETA is the remaining fraction of `total` at the average speed so far. */
#ifndef MB_PROGRESS_H
#define MB_PROGRESS_H

#include <stdint.h>
#include <stdio.h>

typedef enum mb_progress_mode {
    MB_PROGRESS_AUTO = 0, /* bar when the stream is a terminal, else plain lines */
    MB_PROGRESS_BAR,
    MB_PROGRESS_LINES,
    MB_PROGRESS_OFF,
} mb_progress_mode;

typedef struct mb_progress_options {
    const char *label;          /* e.g. "tokenize" */
    uint64_t total;             /* units of work in all (0: unknown, no bar or ETA) */
    int total_is_bytes;         /* show done/total as B/KiB/MiB/GiB instead of plain numbers */
    const char *counter_names[2]; /* e.g. {"docs", "tokens"}; NULL hides a counter */
    int rate_counter;           /* 0 or 1: which counter gets a per-second rate; -1: the rate of `done` */
    double line_interval;       /* seconds between plain lines (0: 5 s) */
    mb_progress_mode mode;
    FILE *stream;               /* NULL: stderr */
} mb_progress_options;

typedef struct mb_progress mb_progress;

/* Returns NULL only when out of memory (callers may pass NULL to the other functions: they do nothing). */
mb_progress *mb_progress_start(const mb_progress_options *options);
/* Records the state; draws if due. `done` counts units of `total`. */
void mb_progress_update(mb_progress *progress, uint64_t done, uint64_t counter0, uint64_t counter1);
/* Draws the final state (ends the bar's line) and frees the reporter. */
void mb_progress_finish(mb_progress *progress);
/* After a failure: ends a bar line already on screen (so an error message starts on its own line), draws nothing
 * more, frees the reporter. */
void mb_progress_cancel(mb_progress *progress);

/* Formatting helpers, also used by summaries: "1.21 GiB", "5.61M", "1:02:03". */
void mb_format_bytes(char *out, size_t size, double bytes);
void mb_format_count(char *out, size_t size, double count);
void mb_format_duration(char *out, size_t size, double seconds);

#endif
