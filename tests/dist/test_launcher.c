/* Local launcher: worker environment, failure propagation (exit code, signal, SIGTERM-ignoring worker), signal
 * forwarding, option parsing, and an end-to-end run of two "nodes" x 2 processes on one host whose workers do the real
 * env detection + TCP rendezvous. Workers are /bin/sh scripts, or this very executable in worker mode (see
 * dist_worker_main: a constructor that runs before Criterion when MB_TEST_DIST_WORKER is set). */
#include <criterion/criterion.h>
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/clock.h"
#include "dist/env.h"
#include "dist/launcher.h"
#include "dist/rendezvous.h"
#include "../support/free_port.h"

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (f == NULL) return -1;
    fputs(text, f);
    return fclose(f);
}

/* ---- worker mode: env detection + rendezvous, results written to files in $MB_TEST_DIST_WORKER ---- */

__attribute__((constructor)) static void dist_worker_main(void) {
    const char *dir = getenv("MB_TEST_DIST_WORKER");
    if (dir == NULL) return;
    mb_dist_env env;
    mb_error err;
    char path[4096], text[2048];
    if (mb_dist_env_detect(&env, NULL, NULL, &err) != 0) {
        fprintf(stderr, "worker: %s\n", err.message);
        _exit(10);
    }
    char blob[128] = {0};
    if (env.rank == 0) snprintf(blob, sizeof blob, "unique id from pid %d", (int)getpid());
    mb_rendezvous *rv = NULL;
    if (mb_rendezvous_open(&rv, &env, blob, sizeof blob, 20.0, &err) != 0) {
        fprintf(stderr, "worker rank %d: %s\n", env.rank, err.message);
        _exit(11);
    }
    snprintf(path, sizeof path, "%s/worker.%d", dir, env.rank);
    snprintf(text, sizeof text, "%s %d %d %d %d %d %s", mb_launch_kind_name(env.kind), env.rank, env.world_size,
             env.local_rank, env.local_world_size, env.node_rank, blob);
    write_text(path, text);
    const char *fail_rank = getenv("MB_TEST_DIST_FAIL_RANK");
    if (fail_rank != NULL && atoi(fail_rank) == env.rank) {
        mb_sleep_seconds(0.3);
        _exit(5); /* dies without goodbye */
    }
    if (fail_rank != NULL) { /* like a trainer: watch the liveness channel, stop when a peer failed */
        char why[1024];
        double start = mb_monotonic_seconds();
        while (mb_monotonic_seconds() - start < 20 && !mb_rendezvous_failed(rv, why, sizeof why)) mb_sleep_seconds(0.001);
        snprintf(path, sizeof path, "%s/why.%d", dir, env.rank);
        write_text(path, why);
        mb_sleep_seconds(0.5);
        _exit(4);
    }
    mb_rendezvous_close(rv);
    _exit(0);
}

/* ---- helpers ---- */

static void make_temp_dir(char *dir, size_t size) {
    snprintf(dir, size, "/tmp/mb_launcher_XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}

static char *read_text(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *data = NULL;
    size_t size = 0;
    mb_error err;
    if (mb_read_file(path, &data, &size, &err) != 0) return NULL;
    return data;
}

static void remove_dir(const char *dir) {
    char command[4200];
    snprintf(command, sizeof command, "rm -rf '%s'", dir);
    cr_assert(system(command) == 0);
}

static mb_launch_options options_for(int nproc, double grace) {
    mb_launch_options o;
    mb_error err;
    cr_assert(mb_launch_options_from_env(&o, NULL, NULL, &err) == 0, "%s", err.message);
    o.nproc_per_node = nproc;
    o.nnodes = 1;
    o.node_rank = 0;
    snprintf(o.master_addr, sizeof o.master_addr, "127.0.0.1");
    o.master_port = 29500;
    o.grace_seconds = grace;
    return o;
}

/* Runs a /bin/sh -c script as every worker; $1 is the temp dir. */
static int launch_script(const mb_launch_options *o, const char *script, const char *dir, int *exit_code,
                         mb_error *err) {
    char *const argv[] = {"sh", "-c", (char *)script, "sh", (char *)dir, NULL};
    return mb_launch_workers(o, "/bin/sh", argv, exit_code, err);
}

/* pid.<i> files written by the workers; asserts that none of those processes exists any more. */
static void expect_all_gone(const char *dir, int count) {
    for (int i = 0; i < count; i++) {
        char name[32];
        snprintf(name, sizeof name, "pid.%d", i);
        char *text = read_text(dir, name);
        cr_assert(text != NULL, "worker %d wrote no pid", i);
        pid_t pid = (pid_t)atoi(text);
        free(text);
        cr_assert(pid > 0);
        errno = 0;
        cr_expect(kill(pid, 0) == -1 && errno == ESRCH, "worker %d (pid %d) is still alive", i, (int)pid);
    }
}

/* Writes its pid (atomically: tmp + mv) then waits until every worker has, so nobody is killed before it started. */
#define READY_PROLOGUE                                                                                                  \
    "echo $$ > \"$1/pid.$LOCAL_RANK.tmp\" && mv \"$1/pid.$LOCAL_RANK.tmp\" \"$1/pid.$LOCAL_RANK\"; "                   \
    "wait_all() { i=0; while [ $i -lt $LOCAL_WORLD_SIZE ]; do while [ ! -f \"$1/pid.$i\" ]; do sleep 0.02; done; "      \
    "i=$((i+1)); done; }; "

/* ---- tests ---- */

Test(launcher, workers_get_their_environment) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    setenv("RANK", "99", 1); /* a stale launch variable must be replaced, others passed through */
    setenv("MB_TEST_PASSED_THROUGH", "kept", 1);
    mb_launch_options o = options_for(3, 5);
    snprintf(o.master_addr, sizeof o.master_addr, "node-a");
    o.master_port = 23456;
    int code = -1;
    mb_error err;
    const char *script = "printf '%s %s %s %s %s %s %s %s\\n' \"$RANK\" \"$WORLD_SIZE\" \"$LOCAL_RANK\" "
                         "\"$LOCAL_WORLD_SIZE\" \"$NODE_RANK\" \"$MASTER_ADDR\" \"$MASTER_PORT\" "
                         "\"$MB_TEST_PASSED_THROUGH\" > \"$1/env.$LOCAL_RANK\"";
    cr_assert_eq(launch_script(&o, script, dir, &code, &err), 0, "%s", err.message);
    cr_expect_eq(code, 0);
    for (int i = 0; i < 3; i++) {
        char name[32], expected[128];
        snprintf(name, sizeof name, "env.%d", i);
        snprintf(expected, sizeof expected, "%d 3 %d 3 0 node-a 23456 kept\n", i, i);
        char *text = read_text(dir, name);
        cr_assert(text != NULL, "worker %d wrote nothing", i);
        cr_expect_str_eq(text, expected);
        free(text);
    }
    remove_dir(dir);
}

Test(launcher, second_node_ranks) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    mb_launch_options o = options_for(2, 5);
    o.nnodes = 2;
    o.node_rank = 1;
    int code = -1;
    mb_error err;
    const char *script = "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $NODE_RANK\" > \"$1/env.$LOCAL_RANK\"";
    cr_assert_eq(launch_script(&o, script, dir, &code, &err), 0, "%s", err.message);
    cr_expect_eq(code, 0);
    char *a = read_text(dir, "env.0"), *b = read_text(dir, "env.1");
    cr_assert(a != NULL && b != NULL);
    cr_expect_str_eq(a, "2 4 0 2 1\n");
    cr_expect_str_eq(b, "3 4 1 2 1\n");
    free(a), free(b);
    remove_dir(dir);
}

/* Launches `nproc` workers running `script` with the given SIGKILL grace; expects the launcher's exit code and no
 * worker left behind. Returns the seconds the launcher took. */
static double expect_launch(int nproc, double grace, const char *script, int expected_code) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    mb_launch_options o = options_for(nproc, grace);
    int code = -1;
    mb_error err;
    double start = mb_monotonic_seconds();
    cr_assert_eq(launch_script(&o, script, dir, &code, &err), 0, "%s", err.message);
    double seconds = mb_monotonic_seconds() - start;
    cr_expect_eq(code, expected_code);
    expect_all_gone(dir, nproc);
    remove_dir(dir);
    return seconds;
}

Test(launcher, all_succeed_gives_zero) { expect_launch(4, 5, READY_PROLOGUE "wait_all \"$1\"; exit 0", 0); }

Test(launcher, failing_worker_stops_the_others_and_gives_its_code, .timeout = 30) {
    expect_launch(3, 10,
                  READY_PROLOGUE "wait_all \"$1\"; if [ \"$LOCAL_RANK\" = 1 ]; then exit 3; fi; exec sleep 60", 3);
}

Test(launcher, killed_worker_gives_128_plus_signal, .timeout = 30) {
    expect_launch(2, 10,
                  READY_PROLOGUE "wait_all \"$1\"; if [ \"$LOCAL_RANK\" = 0 ]; then kill -9 $$; fi; exec sleep 60",
                  137);
}

/* Worker 1 ignores SIGTERM (an ignored signal stays ignored across exec): only the SIGKILL after the grace period
 * can end it, so the launcher returning at all (instead of after 60 s) shows the escalation. */
Test(launcher, worker_ignoring_sigterm_is_killed_after_grace, .timeout = 30) {
    const char *script = "if [ \"$LOCAL_RANK\" = 1 ]; then trap '' TERM; fi; " READY_PROLOGUE
                         "wait_all \"$1\"; if [ \"$LOCAL_RANK\" = 0 ]; then exit 3; fi; exec sleep 60";
    cr_log_info("launcher returned after %.2f s (grace 0.5 s)", expect_launch(2, 0.5, script, 3));
}

Test(launcher, exec_failure_is_a_launcher_error) {
    mb_launch_options o = options_for(2, 1);
    char *const argv[] = {"nothing", NULL};
    int code = -1;
    mb_error err;
    mb_error_clear(&err);
    cr_assert_eq(mb_launch_workers(&o, "/nonexistent/modernbert", argv, &code, &err), -1);
    cr_expect(strstr(err.message, "/nonexistent/modernbert") != NULL, "%s", err.message);
    cr_expect(waitpid(-1, NULL, WNOHANG) == -1 && errno == ECHILD, "a child was left unreaped");
}

Test(launcher, bad_options_are_rejected) {
    mb_launch_options o = options_for(0, 1);
    char *const argv[] = {"sh", NULL};
    int code = -1;
    mb_error err;
    cr_expect_eq(mb_launch_workers(&o, "/bin/sh", argv, &code, &err), -1);
    cr_expect(strstr(err.message, "nproc-per-node") != NULL, "%s", err.message);
    o = options_for(1, 1);
    o.nnodes = 2;
    o.node_rank = 2;
    cr_expect_eq(mb_launch_workers(&o, "/bin/sh", argv, &code, &err), -1);
    cr_expect(strstr(err.message, "node-rank") != NULL, "%s", err.message);
}

/* SIGTERM sent to the launcher reaches every worker; they stop cleanly (exit 0 from their trap), so the launcher
 * reports a clean stop (0), as a single pretrain process does after SIGTERM. */
Test(launcher, sigterm_to_the_launcher_is_forwarded, .timeout = 30) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    pid_t launcher = fork();
    cr_assert(launcher >= 0);
    if (launcher == 0) {
        mb_launch_options o = options_for(2, 5);
        int code = -1;
        mb_error err;
        const char *script = "trap 'echo term > \"$1/got.$LOCAL_RANK\"; kill $child; exit 0' TERM; "
                             "sleep 60 & child=$!; " READY_PROLOGUE "wait $child";
        if (launch_script(&o, script, dir, &code, &err) != 0) _exit(200);
        _exit(code);
    }
    double start = mb_monotonic_seconds();
    for (int i = 0; i < 2; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/pid.%d", dir, i);
        while (access(path, F_OK) != 0 && mb_monotonic_seconds() - start < 20) mb_sleep_seconds(0.02);
    }
    mb_sleep_seconds(0.2); /* both shells are in `wait` by now */
    kill(launcher, SIGTERM);
    int status = 0;
    waitpid(launcher, &status, 0);
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "launcher status %d", status);
    for (int i = 0; i < 2; i++) {
        char name[32];
        snprintf(name, sizeof name, "got.%d", i);
        char *text = read_text(dir, name);
        cr_expect(text != NULL && strcmp(text, "term\n") == 0, "worker %d did not receive SIGTERM", i);
        free(text);
    }
    expect_all_gone(dir, 2);
    remove_dir(dir);
}

/* Workers that ignore SIGTERM and a 60 s grace: only the second signal's immediate SIGKILL lets the launcher return. */
Test(launcher, second_signal_kills_without_grace, .timeout = 30) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    pid_t launcher = fork();
    cr_assert(launcher >= 0);
    if (launcher == 0) {
        mb_launch_options o = options_for(2, 60);
        int code = -1;
        mb_error err;
        if (launch_script(&o, "trap '' TERM; " READY_PROLOGUE "exec sleep 60", dir, &code, &err) != 0) _exit(200);
        _exit(code);
    }
    double start = mb_monotonic_seconds();
    for (int i = 0; i < 2; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/pid.%d", dir, i);
        while (access(path, F_OK) != 0 && mb_monotonic_seconds() - start < 20) mb_sleep_seconds(0.02);
    }
    mb_sleep_seconds(0.1);
    kill(launcher, SIGTERM);
    mb_sleep_seconds(0.2);
    kill(launcher, SIGTERM);
    int status = 0;
    waitpid(launcher, &status, 0);
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGKILL, "launcher status %d", status);
    expect_all_gone(dir, 2);
    remove_dir(dir);
}

/* pairs: name, value, ..., NULL */
static const char *fake_getenv(void *context, const char *name) {
    const char *const *pairs = context;
    for (int i = 0; pairs[i] != NULL; i += 2)
        if (strcmp(pairs[i], name) == 0) return pairs[i + 1];
    return NULL;
}

Test(launcher, options_from_env) {
    mb_launch_options o;
    mb_error err;
    const char *none[] = {NULL};
    cr_assert_eq(mb_launch_options_from_env(&o, fake_getenv, (void *)none, &err), 0, "%s", err.message);
    cr_expect(o.nproc_per_node == 1 && o.nnodes == 1 && o.node_rank == 0 && o.master_port == 29500 &&
              o.grace_seconds == 15.0);
    cr_expect_str_eq(o.master_addr, "127.0.0.1");
    const char *set[] = {"NNODES", "2", "NODE_RANK", "1", "MASTER_ADDR", "head-node", "MASTER_PORT", "31000", NULL};
    cr_assert_eq(mb_launch_options_from_env(&o, fake_getenv, (void *)set, &err), 0, "%s", err.message);
    cr_expect(o.nnodes == 2 && o.node_rank == 1 && o.master_port == 31000);
    cr_expect_str_eq(o.master_addr, "head-node");
    static const char *const bad[][4] = {
        {"NNODES", "0", NULL, NULL},       {"NNODES", "2x", NULL, NULL},      {"NODE_RANK", "2", "NNODES", "2"},
        {"NODE_RANK", "-1", NULL, NULL},   {"MASTER_PORT", "65536", NULL, NULL}, {"MASTER_PORT", "http", NULL, NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *pairs[5] = {bad[i][0], bad[i][1], bad[i][2], bad[i][3], NULL};
        cr_expect_eq(mb_launch_options_from_env(&o, fake_getenv, (void *)pairs, &err), -1, "%s=%s", bad[i][0], bad[i][1]);
        cr_expect(strstr(err.message, bad[i][0]) != NULL && strstr(err.message, bad[i][1]) != NULL, "%s", err.message);
    }
}

/* ---- end to end: two launchers ("nodes") x 2 workers, loopback rendezvous ---- */

/* Starts node 0 and node 1 launchers as child processes; returns their exit statuses. */
static void run_two_nodes(const char *dir, int port, int *status0, int *status1) {
    pid_t nodes[2];
    for (int node = 0; node < 2; node++) {
        nodes[node] = fork();
        cr_assert(nodes[node] >= 0);
        if (nodes[node] == 0) {
            setenv("MB_TEST_DIST_WORKER", dir, 1);
            mb_launch_options o;
            mb_error err;
            if (mb_launch_options_from_env(&o, NULL, NULL, &err) != 0) _exit(201);
            o.nproc_per_node = 2, o.nnodes = 2, o.node_rank = node, o.master_port = port, o.grace_seconds = 5;
            snprintf(o.master_addr, sizeof o.master_addr, "127.0.0.1");
            char *const argv[] = {"test_launcher", NULL};
            int code = -1;
            if (mb_launch_workers(&o, "/proc/self/exe", argv, &code, &err) != 0) {
                fprintf(stderr, "%s\n", err.message);
                _exit(200);
            }
            _exit(code);
        }
    }
    waitpid(nodes[0], status0, 0);
    waitpid(nodes[1], status1, 0);
}

Test(launcher, two_nodes_rendezvous_over_loopback, .timeout = 60) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    unsetenv("MB_TEST_DIST_FAIL_RANK");
    unsetenv("MASTER_ADDR");
    int s0 = -1, s1 = -1;
    run_two_nodes(dir, free_port(), &s0, &s1);
    cr_expect(WIFEXITED(s0) && WEXITSTATUS(s0) == 0, "node 0 status %d", s0);
    cr_expect(WIFEXITED(s1) && WEXITSTATUS(s1) == 0, "node 1 status %d", s1);
    char *hub = read_text(dir, "worker.0");
    cr_assert(hub != NULL);
    const char *blob = strstr(hub, "unique id from pid ");
    cr_assert(blob != NULL, "%s", hub);
    for (int rank = 0; rank < 4; rank++) {
        char name[32], expected[256];
        snprintf(name, sizeof name, "worker.%d", rank);
        snprintf(expected, sizeof expected, "torchrun %d 4 %d 2 %d %s", rank, rank % 2, rank / 2, blob);
        char *text = read_text(dir, name);
        cr_assert(text != NULL, "rank %d wrote nothing", rank);
        cr_expect_str_eq(text, expected);
        free(text);
    }
    free(hub);
    remove_dir(dir);
}

Test(launcher, two_nodes_failure_propagates_to_every_rank, .timeout = 60) {
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    setenv("MB_TEST_DIST_FAIL_RANK", "3", 1);
    int s0 = -1, s1 = -1;
    run_two_nodes(dir, free_port(), &s0, &s1);
    unsetenv("MB_TEST_DIST_FAIL_RANK");
    /* node 1: rank 3 exits 5 first; node 0: its ranks stop with 4 after seeing rank 3's death */
    cr_expect(WIFEXITED(s1) && WEXITSTATUS(s1) == 5, "node 1 status %d", s1);
    cr_expect(WIFEXITED(s0) && WEXITSTATUS(s0) == 4, "node 0 status %d", s0);
    for (int rank = 0; rank < 2; rank++) {
        char name[32];
        snprintf(name, sizeof name, "why.%d", rank);
        char *text = read_text(dir, name);
        cr_assert(text != NULL, "rank %d saw no failure", rank);
        cr_expect(strstr(text, "rank 3 (host ") != NULL && strstr(text, "without saying goodbye") != NULL, "rank %d: %s",
                  rank, text);
        free(text);
    }
    remove_dir(dir);
}
