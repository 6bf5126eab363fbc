/* `modernbert tokenize` end to end: runs the built binary on small temporary inputs and checks the shards against
 * the tokenizer called directly (text modes, JSONL, .zst input, train/val split, --threads determinism, shard
 * rollover, special tokens on/off, malformed input errors naming file and line, refusal to overwrite). */
#include <criterion/criterion.h>

#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zstd.h>

#include "common/fileio.h"
#include "common/rng.h"
#include "data/shards.h"
#include "data/tokenizer.h"

#define TOKENIZER MB_SOURCE_DIR "/data/tokenizer.json"
#define BINARY MB_BUILD_DIR "/modernbert"

static char dir[256];
static mb_tokenizer *tokenizer;

static void setup(void) {
    snprintf(dir, sizeof dir, "/tmp/mb_test_tokenize_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    mb_error err;
    cr_assert_eq(mb_tokenizer_load(&tokenizer, TOKENIZER, &err), 0, "%s", err.message);
}

static void teardown(void) {
    mb_tokenizer_free(tokenizer);
    char command[512];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    cr_assert_eq(system(command), 0);
}

TestSuite(tokenize_cli, .init = setup, .fini = teardown);

static void path_in(char *out, size_t size, const char *name) { cr_assert_eq(mb_path_join(out, size, dir, name), 0); }

static void write_text(const char *name, const char *text) {
    char path[512];
    path_in(path, sizeof path, name);
    mb_error err;
    cr_assert_eq(mb_write_file_atomic(path, text, strlen(text), &err), 0, "%s", err.message);
}

/* Runs `modernbert tokenize ARGS` in the temp dir; returns the exit status; stdout/stderr go to out.txt/err.txt. */
static int run_tokenize(const char *args) {
    char command[4096];
    snprintf(command, sizeof command, "cd '%s' && '%s' tokenize --tokenizer '%s' --quiet %s > out.txt 2> err.txt", dir,
             BINARY, TOKENIZER, args);
    int status = system(command);
    cr_assert(WIFEXITED(status), "command did not exit normally: %s", command);
    return WEXITSTATUS(status);
}

static char *read_text(const char *name) {
    char path[512], *data;
    size_t size;
    mb_error err;
    path_in(path, sizeof path, name);
    cr_assert_eq(mb_read_file(path, &data, &size, &err), 0, "%s", err.message);
    return data;
}

static size_t count_files(const char *pattern) {
    char full[512];
    path_in(full, sizeof full, pattern);
    glob_t g;
    if (glob(full, 0, NULL, &g) != 0) return 0;
    size_t n = g.gl_pathc;
    globfree(&g);
    return n;
}

static mb_shard_set *open_set(const char *pattern) {
    char full[512];
    path_in(full, sizeof full, pattern);
    const char *patterns[] = {full};
    mb_shard_set *set;
    mb_error err;
    cr_assert_eq(mb_shard_set_open(&set, patterns, 1, mb_tokenizer_fingerprint(tokenizer), &err), 0, "%s", err.message);
    return set;
}

/* Asserts that the set holds exactly `texts` (in order), each tokenized as the tokenizer does it. */
static void expect_documents(mb_shard_set *set, const char *const *texts, size_t count, int special) {
    cr_assert_eq(mb_shard_set_document_count(set), count);
    cr_assert_eq(mb_shard_set_flags(set), special ? MB_SHARD_FLAG_SPECIAL_TOKENS : 0u);
    mb_error err;
    for (size_t d = 0; d < count; d++) {
        mb_token_list expected = {0};
        int rc = special ? mb_tokenizer_encode_template(tokenizer, texts[d], strlen(texts[d]), NULL, 0, &expected, &err)
                         : mb_tokenizer_encode(tokenizer, texts[d], strlen(texts[d]), &expected, &err);
        cr_assert_eq(rc, 0, "%s", err.message);
        cr_assert_eq(mb_shard_set_document_length(set, d), expected.count, "document %zu (%s)", d, texts[d]);
        int32_t *ids = malloc((expected.count + 1) * sizeof *ids);
        cr_assert_eq(mb_shard_set_read_document(set, d, ids, &err), 0, "%s", err.message);
        cr_assert_arr_eq(ids, expected.ids, expected.count * sizeof *ids, "document %zu", d);
        free(ids);
        mb_token_list_free(&expected);
    }
}

Test(tokenize_cli, text_whole_file_documents) {
    write_text("a.txt", "The first file.\nIt has two lines.\n");
    write_text("b.txt", "Second file, one line");
    write_text("c.txt", "   \n\n"); /* whitespace only: skipped */
    cr_assert_eq(run_tokenize("--output out a.txt b.txt c.txt"), 0, "%s", read_text("err.txt"));
    const char *texts[] = {"The first file.\nIt has two lines.\n", "Second file, one line"};
    mb_shard_set *set = open_set("out/train-*.mbs");
    expect_documents(set, texts, 2, 1);
    mb_shard_set_close(set);
    cr_assert_eq(count_files("out/val-*.mbs"), 0);
    char *summary = read_text("out.txt");
    cr_assert(strstr(summary, "2 documents") != NULL && strstr(summary, "skipped empty 1") != NULL, "%s", summary);
    free(summary);
}

Test(tokenize_cli, text_blank_line_and_line_separators) {
    write_text("p.txt", "\n\nFirst paragraph\nwraps here.\n\n  \nSecond one.\r\n\r\nThird\n");
    cr_assert_eq(run_tokenize("--output para --doc-separator blank-line p.txt"), 0, "%s", read_text("err.txt"));
    const char *paragraphs[] = {"First paragraph\nwraps here.", "Second one.", "Third"};
    mb_shard_set *set = open_set("para/train-*.mbs");
    expect_documents(set, paragraphs, 3, 1);
    mb_shard_set_close(set);

    cr_assert_eq(run_tokenize("--output lines --doc-separator line --no-special-tokens p.txt"), 0, "%s",
                 read_text("err.txt"));
    const char *lines[] = {"First paragraph", "wraps here.", "Second one.", "Third"};
    set = open_set("lines/train-*.mbs");
    expect_documents(set, lines, 4, 0);
    mb_shard_set_close(set);
}

Test(tokenize_cli, jsonl_with_field_and_zstd_input) {
    const char *jsonl = "{\"id\": 1, \"body\": \"caf\\u00e9 \\\"quoted\\\"\\nnext line\"}\n"
                        "\n"
                        "{\"body\": \"\"}\n"
                        "{\"body\": \"\\ud83d\\ude00 emoji\", \"extra\": [1, 2]}\n";
    write_text("d.jsonl", jsonl);
    size_t bound = ZSTD_compressBound(strlen(jsonl));
    char *compressed = malloc(bound);
    size_t n = ZSTD_compress(compressed, bound, jsonl, strlen(jsonl), 3);
    cr_assert(!ZSTD_isError(n));
    char path[512];
    path_in(path, sizeof path, "d.jsonl.zst");
    mb_error err;
    cr_assert_eq(mb_write_file_atomic(path, compressed, n, &err), 0);
    free(compressed);

    const char *texts[] = {"caf\xc3\xa9 \"quoted\"\nnext line", "\xf0\x9f\x98\x80 emoji"};
    cr_assert_eq(run_tokenize("--output plain --jsonl-field body d.jsonl"), 0, "%s", read_text("err.txt"));
    mb_shard_set *set = open_set("plain/train-*.mbs");
    expect_documents(set, texts, 2, 1);
    mb_shard_set_close(set);
    cr_assert_eq(run_tokenize("--output zst --jsonl-field body d.jsonl.zst"), 0, "%s", read_text("err.txt"));
    set = open_set("zst/train-*.mbs");
    expect_documents(set, texts, 2, 1);
    mb_shard_set_close(set);

    /* A truncated .zst is an error, and leaves no shard behind. */
    path_in(path, sizeof path, "d.jsonl.zst");
    cr_assert_eq(truncate(path, (off_t)(n - 3)), 0);
    cr_assert_eq(run_tokenize("--output cut --jsonl-field body d.jsonl.zst"), 1);
    char *message = read_text("err.txt");
    cr_assert(strstr(message, "d.jsonl.zst") != NULL && strstr(message, "zstd") != NULL, "%s", message);
    free(message);
    cr_assert_eq(count_files("cut/*.mbs"), 0);
}

Test(tokenize_cli, malformed_jsonl_names_file_and_line) {
    write_text("ok.jsonl", "{\"text\": \"fine\"}\n");
    write_text("bad.jsonl", "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": \"three\"\n{\"text\": \"four\"}\n");
    cr_assert_eq(run_tokenize("--output o1 ok.jsonl bad.jsonl"), 1);
    char *message = read_text("err.txt");
    cr_assert(strstr(message, "bad.jsonl:3: malformed JSON") != NULL, "%s", message);
    free(message);
    cr_assert_eq(count_files("o1/*.mbs"), 0);

    write_text("missing.jsonl", "{\"text\": \"one\"}\n{\"txt\": \"two\"}\n");
    cr_assert_eq(run_tokenize("--output o2 missing.jsonl"), 1);
    message = read_text("err.txt");
    cr_assert(strstr(message, "missing.jsonl:2: field \"text\" is missing") != NULL, "%s", message);
    free(message);

    write_text("number.jsonl", "[1, 2]\n");
    cr_assert_eq(run_tokenize("--output o3 number.jsonl"), 1);
    message = read_text("err.txt");
    cr_assert(strstr(message, "number.jsonl:1: a JSONL line must be a JSON object") != NULL, "%s", message);
    free(message);
}

/* Many short documents: several batches, several shards, a val split, identical bytes for any thread count. */
static void write_many_documents(size_t count) {
    size_t capacity = count * 64;
    char *text = malloc(capacity);
    size_t used = 0;
    mb_rng rng;
    mb_rng_seed(&rng, 99);
    static const char *const words[] = {"alpha", "beta", "gamma", "delta", "the", "of", "quick", "brown", "fox", "42"};
    for (size_t d = 0; d < count; d++) {
        used += (size_t)snprintf(text + used, capacity - used, "doc %zu", d);
        uint64_t n = mb_rng_below(&rng, 6);
        for (uint64_t w = 0; w < n; w++) used += (size_t)snprintf(text + used, capacity - used, " %s", words[mb_rng_below(&rng, 10)]);
        text[used++] = '\n';
    }
    text[used] = '\0';
    write_text("many.txt", text);
    free(text);
}

static int same_file(const char *a, const char *b) {
    char pa[512], pb[512];
    path_in(pa, sizeof pa, a);
    path_in(pb, sizeof pb, b);
    size_t sa, sb;
    char *da, *db;
    mb_error err;
    cr_assert_eq(mb_read_file(pa, &da, &sa, &err), 0);
    cr_assert_eq(mb_read_file(pb, &db, &sb, &err), 0);
    int same = sa == sb && memcmp(da, db, sa) == 0;
    free(da);
    free(db);
    return same;
}

Test(tokenize_cli, val_split_shards_and_thread_determinism, .timeout = 120) {
    const size_t count = 12000;
    write_many_documents(count);
    const char *common = "--doc-separator line --val-fraction 0.25 --seed 7 --shard-tokens 20000 --block-tokens 1000";
    char args[512];
    snprintf(args, sizeof args, "--output t1 --threads 1 %s many.txt", common);
    cr_assert_eq(run_tokenize(args), 0, "%s", read_text("err.txt"));
    snprintf(args, sizeof args, "--output t3 --threads 3 %s many.txt", common);
    cr_assert_eq(run_tokenize(args), 0, "%s", read_text("err.txt"));

    size_t train_files = count_files("t1/train-*.mbs"), val_files = count_files("t1/val-*.mbs");
    cr_assert_gt(train_files, 2);
    cr_assert_gt(val_files, 0);
    cr_assert_eq(count_files("t3/train-*.mbs"), train_files);
    cr_assert_eq(count_files("t3/val-*.mbs"), val_files);
    for (int split = 0; split < 2; split++)
        for (size_t i = 0; i < (split ? val_files : train_files); i++) {
            char a[64], b[64];
            snprintf(a, sizeof a, "t1/%s-%06zu.mbs", split ? "val" : "train", i);
            snprintf(b, sizeof b, "t3/%s-%06zu.mbs", split ? "val" : "train", i);
            cr_assert(same_file(a, b), "%s and %s differ", a, b);
        }

    /* Every document is in exactly the split the documented rule puts it in, in order, tokenized correctly. */
    char *text = read_text("many.txt");
    const char **train = malloc(count * sizeof *train), **val = malloc(count * sizeof *val);
    size_t n_train = 0, n_val = 0;
    char *save = NULL;
    size_t index = 0;
    for (char *line = strtok_r(text, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save), index++) {
        mb_rng rng;
        mb_rng_seed_stream(&rng, 7, index);
        if (mb_rng_uniform(&rng) < 0.25) val[n_val++] = line;
        else train[n_train++] = line;
    }
    cr_assert_eq(index, count);
    cr_assert(n_val > count / 5 && n_val < count * 3 / 10, "%zu val documents", n_val);
    mb_shard_set *set = open_set("t1/train-*.mbs");
    expect_documents(set, train, n_train, 1);
    cr_assert_eq(mb_shard_set_file_count(set), train_files);
    /* Shards close at the first document that reaches --shard-tokens: all but the last are >= 20000 tokens. */
    for (size_t f = 0; f + 1 < train_files; f++) {
        mb_shard_info info;
        mb_error err;
        cr_assert_eq(mb_shard_verify_file(mb_shard_set_file_path(set, f), 0, &info, &err), 0, "%s", err.message);
        cr_assert_geq(info.token_count, 20000);
        cr_assert_lt(info.token_count, 20000 + 64);
        cr_assert_eq(info.block_tokens, 1000);
    }
    mb_shard_set_close(set);
    set = open_set("t1/val-*.mbs");
    expect_documents(set, val, n_val, 1);
    mb_shard_set_close(set);
    free(train);
    free(val);
    free(text);
}

Test(tokenize_cli, refuses_to_mix_with_existing_shards) {
    write_text("a.txt", "some text");
    cr_assert_eq(run_tokenize("--output out a.txt"), 0, "%s", read_text("err.txt"));
    cr_assert_eq(run_tokenize("--output out a.txt"), 1);
    char *message = read_text("err.txt");
    cr_assert(strstr(message, "--overwrite") != NULL, "%s", message);
    free(message);
    cr_assert_eq(run_tokenize("--output out --prefix other a.txt"), 0, "%s", read_text("err.txt"));
    cr_assert_eq(count_files("out/other-train-000000.mbs"), 1);
    cr_assert_eq(run_tokenize("--output out --overwrite a.txt"), 0, "%s", read_text("err.txt"));
    cr_assert_eq(count_files("out/*.mbs"), 2);
    cr_assert_eq(count_files("out/*.tmp.*"), 0);
}

Test(tokenize_cli, usage_errors) {
    write_text("a.txt", "x");
    cr_assert_eq(run_tokenize("a.txt"), 2); /* no --output */
    cr_assert_eq(run_tokenize("--output o --val-fraction 1.5 a.txt"), 2);
    cr_assert_eq(run_tokenize("--output o --doc-separator para a.txt"), 2);
    cr_assert_eq(run_tokenize("--output o nonexistent.txt"), 1);
    char *message = read_text("err.txt");
    cr_assert(strstr(message, "nonexistent.txt") != NULL, "%s", message);
    free(message);
}

/* ---- the progress reporter (tools/progress.c) --------------------------------------------------------------------- */

#include "../../tools/progress.h"

Test(progress, formatting_helpers) {
    char out[64];
    mb_format_bytes(out, sizeof out, 512);
    cr_assert_str_eq(out, "512 B");
    mb_format_bytes(out, sizeof out, 1.5 * 1024 * 1024);
    cr_assert_str_eq(out, "1.50 MiB");
    mb_format_bytes(out, sizeof out, 300.0 * 1024 * 1024 * 1024);
    cr_assert_str_eq(out, "300 GiB");
    mb_format_count(out, sizeof out, 999);
    cr_assert_str_eq(out, "999");
    mb_format_count(out, sizeof out, 5610000);
    cr_assert_str_eq(out, "5.61M");
    mb_format_duration(out, sizeof out, 32.4);
    cr_assert_str_eq(out, "0:32");
    mb_format_duration(out, sizeof out, 3723);
    cr_assert_str_eq(out, "1:02:03");
}

static char *run_progress(mb_progress_mode mode, int fail) {
    FILE *stream = tmpfile();
    cr_assert_not_null(stream);
    mb_progress_options options = {.label = "job", .total = 2048, .total_is_bytes = 1,
                                   .counter_names = {"docs", "tokens"}, .rate_counter = 1, .mode = mode,
                                   .stream = stream};
    mb_progress *p = mb_progress_start(&options);
    cr_assert_not_null(p);
    usleep(120000); /* past the bar's redraw interval */
    mb_progress_update(p, 1024, 3, 70);
    mb_progress_update(p, 2048, 7, 150); /* too soon after the last draw: only recorded */
    if (fail) mb_progress_cancel(p);
    else mb_progress_finish(p);
    long size = ftell(stream);
    char *text = calloc(1, (size_t)size + 1);
    rewind(stream);
    cr_assert_eq(fread(text, 1, (size_t)size, stream), (size_t)size);
    fclose(stream);
    return text;
}

Test(progress, plain_lines_and_bar) {
    char *lines = run_progress(MB_PROGRESS_LINES, 0);
    /* Plain mode: nothing within the 5 s interval, then exactly one final line. */
    cr_assert(strstr(lines, "job: 100.0%  2.00 KiB/2.00 KiB | 7 docs | 150 tokens | ") == lines, "%s", lines);
    cr_assert(strstr(lines, "tokens/s | took 0:00\n") != NULL, "%s", lines);
    cr_assert(strchr(lines, '\r') == NULL);
    free(lines);

    char *bar = run_progress(MB_PROGRESS_BAR, 0);
    cr_assert(strstr(bar, "\rjob [") != NULL, "%s", bar);
    cr_assert(strstr(bar, " 50.0%") != NULL && strstr(bar, "ETA") != NULL, "intermediate redraw missing: %s", bar);
    cr_assert(strstr(bar, "100.0%") != NULL && bar[strlen(bar) - 1] == '\n', "%s", bar);
    free(bar);

    char *cancelled = run_progress(MB_PROGRESS_BAR, 1);
    cr_assert(strstr(cancelled, "100.0%") == NULL && cancelled[strlen(cancelled) - 1] == '\n', "%s", cancelled);
    free(cancelled);
    char *off = run_progress(MB_PROGRESS_OFF, 0);
    cr_assert_str_eq(off, "");
    free(off);
}
