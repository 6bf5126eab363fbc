/* Progress reporting (see progress.h): a redrawn bar on terminals, periodic plain lines elsewhere.
 *
 * Fraction = done / total; rate = counter / elapsed seconds; ETA = elapsed * (total - done) / done. */
#include "common/clock.h"
#include "progress.h"

#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

struct mb_progress {
    mb_progress_options options;
    int bar; /* 1: redraw in place, 0: plain lines */
    double start, last_draw;
    uint64_t done, counters[2];
    int drawn; /* a bar line is on screen */
};


void mb_format_bytes(char *out, size_t size, double bytes) {
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int unit = 0;
    while (bytes >= 1024.0 && unit < 4) {
        bytes /= 1024.0;
        unit++;
    }
    if (unit == 0) snprintf(out, size, "%.0f B", bytes);
    else snprintf(out, size, "%.*f %s", bytes < 10 ? 2 : bytes < 100 ? 1 : 0, bytes, units[unit]);
}

void mb_format_count(char *out, size_t size, double count) {
    static const char *const suffixes[] = {"", "k", "M", "G", "T"};
    int unit = 0;
    while (count >= 1000.0 && unit < 4) {
        count /= 1000.0;
        unit++;
    }
    if (unit == 0) snprintf(out, size, "%.0f", count);
    else snprintf(out, size, "%.*f%s", count < 10 ? 2 : count < 100 ? 1 : 0, count, suffixes[unit]);
}

void mb_format_duration(char *out, size_t size, double seconds) {
    if (seconds < 0 || seconds > 1e8) {
        snprintf(out, size, "?");
        return;
    }
    long total = (long)(seconds + 0.5);
    long h = total / 3600, m = (total / 60) % 60, s = total % 60;
    if (h > 0) snprintf(out, size, "%ld:%02ld:%02ld", h, m, s);
    else snprintf(out, size, "%ld:%02ld", m, s);
}

mb_progress *mb_progress_start(const mb_progress_options *options) {
    mb_progress *p = calloc(1, sizeof *p);
    if (p == NULL) return NULL;
    p->options = *options;
    if (p->options.stream == NULL) p->options.stream = stderr;
    if (p->options.line_interval <= 0) p->options.line_interval = 5.0;
    if (p->options.label == NULL) p->options.label = "progress";
    mb_progress_mode mode = p->options.mode;
    if (mode == MB_PROGRESS_AUTO) mode = isatty(fileno(p->options.stream)) ? MB_PROGRESS_BAR : MB_PROGRESS_LINES;
    p->options.mode = mode;
    p->bar = mode == MB_PROGRESS_BAR;
    p->start = mb_monotonic_seconds();
    p->last_draw = p->start;
    return p;
}

/* The facts after the bar: percentage, done/total, counters, rate, ETA (or elapsed time when final). */
static void format_status(const mb_progress *p, double now, int final, char *out, size_t size) {
    double elapsed = now - p->start;
    size_t used = 0;
    char a[32], b[32];
#define APPEND(...)                                                                                                   \
    do {                                                                                                               \
        if (used < size) used += (size_t)snprintf(out + used, size - used, __VA_ARGS__);                              \
    } while (0)
    out[0] = '\0';
    if (p->options.total > 0) {
        double fraction = (double)p->done / (double)p->options.total;
        APPEND("%5.1f%%  ", 100.0 * (fraction > 1 ? 1 : fraction));
    }
    if (p->options.total_is_bytes) {
        mb_format_bytes(a, sizeof a, (double)p->done);
        mb_format_bytes(b, sizeof b, (double)p->options.total);
    } else {
        mb_format_count(a, sizeof a, (double)p->done);
        mb_format_count(b, sizeof b, (double)p->options.total);
    }
    if (p->options.total > 0) APPEND("%s/%s", a, b);
    else APPEND("%s", a);
    for (int i = 0; i < 2; i++) {
        if (p->options.counter_names[i] == NULL) continue;
        mb_format_count(a, sizeof a, (double)p->counters[i]);
        APPEND(" | %s %s", a, p->options.counter_names[i]);
    }
    if (elapsed > 0) {
        int r = p->options.rate_counter;
        double value = (r == 0 || r == 1) ? (double)p->counters[r] : (double)p->done;
        const char *name = (r == 0 || r == 1) ? p->options.counter_names[r] : NULL;
        if (r < 0 && p->options.total_is_bytes) {
            mb_format_bytes(a, sizeof a, value / elapsed);
            APPEND(" | %s/s", a);
        } else {
            mb_format_count(a, sizeof a, value / elapsed);
            APPEND(" | %s %s/s", a, name ? name : "");
        }
    }
    if (final) {
        mb_format_duration(a, sizeof a, elapsed);
        APPEND(" | took %s", a);
    } else if (p->options.total > 0 && p->done > 0 && p->done < p->options.total) {
        mb_format_duration(a, sizeof a, elapsed * (double)(p->options.total - p->done) / (double)p->done);
        APPEND(" | ETA %s", a);
    }
#undef APPEND
}

static int terminal_width(FILE *stream) {
    struct winsize ws;
    if (ioctl(fileno(stream), TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40) return ws.ws_col;
    return 100;
}

static void draw(mb_progress *p, double now, int final) {
    char status[512];
    format_status(p, now, final, status, sizeof status);
    FILE *out = p->options.stream;
    if (!p->bar) {
        fprintf(out, "%s: %s\n", p->options.label, status);
        fflush(out);
        return;
    }
    int width = terminal_width(out) - 1;
    int fixed = (int)strlen(p->options.label) + 4 + (int)strlen(status);
    int bar_width = width - fixed;
    if (bar_width > 40) bar_width = 40;
    fprintf(out, "\r%s ", p->options.label);
    if (bar_width >= 10 && p->options.total > 0) {
        double fraction = (double)p->done / (double)p->options.total;
        int filled = (int)(fraction * bar_width + 0.5);
        if (filled > bar_width) filled = bar_width;
        fputc('[', out);
        for (int i = 0; i < bar_width; i++) fputc(i < filled ? '#' : '.', out);
        fputs("] ", out);
    }
    fprintf(out, "%s\033[K", status);
    if (final) fputc('\n', out);
    fflush(out);
    p->drawn = !final;
}

void mb_progress_update(mb_progress *p, uint64_t done, uint64_t counter0, uint64_t counter1) {
    if (p == NULL) return;
    p->done = done;
    p->counters[0] = counter0;
    p->counters[1] = counter1;
    if (p->options.mode == MB_PROGRESS_OFF) return;
    double now = mb_monotonic_seconds();
    double interval = p->bar ? 0.1 : p->options.line_interval;
    if (now - p->last_draw < interval) return;
    p->last_draw = now;
    draw(p, now, 0);
}

void mb_progress_finish(mb_progress *p) {
    if (p == NULL) return;
    if (p->options.mode != MB_PROGRESS_OFF) draw(p, mb_monotonic_seconds(), 1);
    free(p);
}

void mb_progress_cancel(mb_progress *p) {
    if (p == NULL) return;
    if (p->bar && p->drawn) {
        fputc('\n', p->options.stream);
        fflush(p->options.stream);
    }
    free(p);
}
