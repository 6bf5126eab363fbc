/* Runs a shell command for an end-to-end test and captures its combined output (the caller adds 2>&1): the whole
 * output is read, so the child never blocks on a full pipe; what does not fit in `output` is dropped. Returns the
 * exit status, or -1 when the command did not exit normally. Shared by the CLI tests of tests/<module>/. */
#ifndef MB_TEST_RUN_COMMAND_H
#define MB_TEST_RUN_COMMAND_H

#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

static inline int run_command(const char *command, char *output, size_t output_size) {
    FILE *pipe = popen(command, "r");
    cr_assert_not_null(pipe, "popen(%s) failed", command);
    size_t length = 0, got;
    char scratch[4096];
    while ((got = fread(scratch, 1, sizeof scratch, pipe)) > 0) {
        size_t room = output_size - 1 - length;
        size_t take = got < room ? got : room;
        memcpy(output + length, scratch, take);
        length += take;
    }
    output[length] = '\0';
    int status = pclose(pipe);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

#endif
