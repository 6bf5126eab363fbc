/* `modernbert check` end to end: the binary's output file agrees with transformers' fixture, and bad input gives a
 * clear error naming the file, with a non-zero exit code. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io/safetensors.h"
#include "../support/run_command.h"

#define FIXTURE MB_SOURCE_DIR "/tests/fixtures/hf/mlm_hd64_window_large_every3"

static int run(const char *arguments, char *output, size_t output_size) {
    char command[4096];
    snprintf(command, sizeof command, "%s/modernbert %s 2>&1", MB_BUILD_DIR, arguments);
    return run_command(command, output, output_size);
}

static float read_scalar(const char *path, const char *name) {
    mb_safetensors st;
    mb_error err;
    cr_assert_eq(mb_st_open(&st, path, &err), 0, "%s", err.message);
    const mb_st_tensor *t = mb_st_find(&st, name);
    cr_assert_not_null(t);
    float value;
    cr_assert_eq(mb_st_read_f32(&st, t, &value, 1, &err), 0, "%s", err.message);
    mb_st_close(&st);
    return value;
}

Test(check_cli, output_matches_transformers) {
    char out_path[] = "/tmp/mb_check_out_XXXXXX";
    int fd = mkstemp(out_path);
    close(fd);
    char arguments[2048], output[8192];
    snprintf(arguments, sizeof arguments, "check --model %s --batch %s/batch.safetensors --out %s", FIXTURE, FIXTURE,
             out_path);
    cr_assert_eq(run(arguments, output, sizeof output), 0, "%s", output);
    cr_assert(strstr(output, "loss 5.79") != NULL, "%s", output);
    float ours = read_scalar(out_path, "loss"), theirs = read_scalar(FIXTURE "/expected.safetensors", "loss");
    cr_assert(fabsf(ours - theirs) < 1e-4f * fabsf(theirs), "%g vs %g", ours, theirs);
    mb_safetensors st;
    mb_error err;
    cr_assert_eq(mb_st_open(&st, out_path, &err), 0, "%s", err.message);
    const mb_st_tensor *grad = mb_st_find(&st, "grad.model.embeddings.tok_embeddings.weight");
    cr_assert_not_null(grad);
    cr_assert_eq(grad->shape[0], 192);
    cr_assert_not_null(mb_st_find(&st, "grad.decoder.bias"));
    cr_assert_not_null(mb_st_find(&st, "logits"));
    mb_st_close(&st);
    unlink(out_path);
}

Test(check_cli, errors_name_the_file) {
    char output[8192];
    cr_assert_eq(run("check --model /nonexistent/model --batch x.safetensors", output, sizeof output), 1);
    cr_assert(strstr(output, "/nonexistent/model/config.json") != NULL, "%s", output);
    cr_assert_eq(run("check --batch x.safetensors", output, sizeof output), 2, "%s", output);
    cr_assert(strstr(output, "--model") != NULL, "%s", output);
    /* a truncated batch file */
    char bad[] = "/tmp/mb_bad_batch_XXXXXX";
    int fd = mkstemp(bad);
    cr_assert_eq(write(fd, "\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"", 12), 12);
    close(fd);
    char arguments[2048];
    snprintf(arguments, sizeof arguments, "check --model %s --batch %s", FIXTURE, bad);
    cr_assert_eq(run(arguments, output, sizeof output), 1, "%s", output);
    cr_assert(strstr(output, bad) != NULL, "%s", output);
    unlink(bad);
    /* a batch whose ids are outside the vocabulary */
    cr_assert_eq(run("check --help", output, sizeof output), 0);
    cr_assert(strstr(output, "cu_seqlens") != NULL);
}
