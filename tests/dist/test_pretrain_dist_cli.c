/* `modernbert pretrain` as a data-parallel worker and as a launcher, end to end on any machine (no GPU needed): the
 * launcher passes the worker options through and strips its own, every worker reports its rank with a clear error
 * when the configuration cannot train data-parallel, the launcher propagates the failure, and bad launcher options or
 * half-set launch variables are refused before any work. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "../support/run_command.h"

static int run(const char *environment, const char *arguments, char *output, size_t output_size) {
    char command[4096];
    snprintf(command, sizeof command, "env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u OMPI_COMM_WORLD_RANK "
             "-u OMPI_COMM_WORLD_SIZE -u SLURM_STEP_ID -u SLURM_STEPID %s %s/modernbert pretrain %s 2>&1",
             environment, MB_BUILD_DIR, arguments);
    return run_command(command, output, output_size);
}

#define CONFIG MB_SOURCE_DIR "/configs/tiny.yaml"

Test(pretrain_dist_cli, launcher_propagates_each_workers_error) {
    static char output[1 << 16];
    int code = run("", "--nproc-per-node 2 --master-port 29871 " CONFIG
                   " run.backend=cpu run.output_dir=/tmp/mb_dist_cli_run data.train=/nonexistent", output,
                   sizeof output);
    cr_assert_eq(code, 1, "exit %d:\n%s", code, output);
    cr_assert(strstr(output, "launcher: 2 workers on node 0 of 1, rendezvous 127.0.0.1:29871") != NULL, "%s", output);
    cr_assert(strstr(output, "needs the CUDA backend (run.backend is cpu)") != NULL, "%s", output);
    /* the first worker to fail makes the launcher stop the other, which may not get to print its own error */
    cr_assert(strstr(output, "rank 0: data parallelism over 2 processes") != NULL ||
                  strstr(output, "rank 1: data parallelism over 2 processes") != NULL,
              "a worker's error with its rank:\n%s", output);
    cr_assert(strstr(output, "launcher: rank") != NULL && strstr(output, "exited with code 1") != NULL, "%s",
              output);
    cr_assert(strstr(output, "--nproc-per-node") == NULL, "launcher options reach the workers:\n%s", output);
}

Test(pretrain_dist_cli, torchrun_style_worker_reports_its_rank) {
    static char output[1 << 16];
    int code = run("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1", CONFIG " run.backend=cpu run.output_dir=/tmp/mb_dist_cli_w",
                   output, sizeof output);
    cr_assert_eq(code, 1, "exit %d:\n%s", code, output);
    cr_assert(strstr(output, "modernbert pretrain: rank 1: data parallelism over 2 processes needs the CUDA backend") !=
              NULL, "%s", output);
    cr_assert(strstr(output, "step ") == NULL, "rank 1 must not log:\n%s", output);
}

Test(pretrain_dist_cli, bad_launch_settings_are_refused) {
    static char output[1 << 16];
    cr_assert_eq(run("", "--nproc-per-node 0 " CONFIG, output, sizeof output), 2, "%s", output);
    cr_assert(strstr(output, "--nproc-per-node must be >= 1") != NULL, "%s", output);
    cr_assert_eq(run("", "--nproc-per-node two " CONFIG, output, sizeof output), 2, "%s", output);
    cr_assert(strstr(output, "'two' is not a whole number") != NULL, "%s", output);
    cr_assert_eq(run("", "--nproc-per-node 2 --nnodes 2 --node-rank 2 " CONFIG, output, sizeof output), 2, "%s",
                 output);
    int code = run("RANK=0", CONFIG " run.output_dir=/tmp/mb_dist_cli_half", output, sizeof output);
    cr_assert_neq(code, 0, "%s", output);
    cr_assert(strstr(output, "WORLD_SIZE") != NULL, "a half-set launcher must name the missing variable:\n%s", output);
}
