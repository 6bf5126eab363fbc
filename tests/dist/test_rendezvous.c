/* TCP rendezvous over loopback with forked ranks: blob delivery, liveness (SIGKILL, reported failures, clean close),
 * and the errors for a missing hub, a missing peer, a wrong world size and a duplicate rank. Every rank is a child
 * process; each sends one fixed-size record (atomic pipe write) describing what it saw. */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "dist/rendezvous.h"
#include "../support/free_port.h"

#define MAX_RANKS 8
#define BLOB_SIZE 128

typedef struct rank_record {
    int rank;
    int open_status;     /* 0 / -1 from mb_rendezvous_open */
    int blob_ok;         /* peers: received exactly rank 0's bytes */
    int saw_failure;     /* mb_rendezvous_failed turned 1 */
    double detect_seconds;
    char text[900];      /* open error or failure line */
} rank_record;

typedef struct scenario {
    int world;              /* world size every rank is started with, unless world_of overrides */
    int world_of[MAX_RANKS];  /* 0 = use world */
    int rank_of[MAX_RANKS];   /* process i claims this rank (default i), for the duplicate-rank test */
    int processes;          /* how many processes to start (ranks 0..processes-1 unless skip_rank0) */
    int skip_rank0;
    double timeout;
    const char *addr;
    int port;
} scenario;

static void fill_blob(unsigned char *blob) {
    for (int i = 0; i < BLOB_SIZE; i++) blob[i] = (unsigned char)(i * 37 + 11);
}

/* What a rank does after a successful open; returns through the record. */
typedef void (*rank_body)(mb_rendezvous *rv, int rank, rank_record *record);

/* Polls mb_rendezvous_failed every millisecond for up to `limit` seconds (a hang bound, not a timing check). */
static void wait_for_failure(mb_rendezvous *rv, double limit, rank_record *record) {
    double start = mb_monotonic_seconds();
    while (mb_monotonic_seconds() - start < limit) {
        if (mb_rendezvous_failed(rv, record->text, sizeof record->text)) {
            record->saw_failure = 1;
            record->detect_seconds = mb_monotonic_seconds() - start;
            return;
        }
        mb_sleep_seconds(0.001);
    }
}

static void run_rank(const scenario *sc, int process, rank_body body, int out_fd) {
    rank_record record;
    memset(&record, 0, sizeof record);
    record.rank = sc->rank_of[process] ? sc->rank_of[process] : process;
    mb_dist_env env;
    memset(&env, 0, sizeof env);
    env.kind = MB_LAUNCH_TORCHRUN;
    env.rank = record.rank;
    env.world_size = sc->world_of[process] ? sc->world_of[process] : sc->world;
    env.local_rank = env.rank;
    env.local_world_size = env.world_size;
    snprintf(env.master_addr, sizeof env.master_addr, "%s", sc->addr ? sc->addr : "127.0.0.1");
    env.master_port = sc->port;
    unsigned char blob[BLOB_SIZE] = {0}, expected[BLOB_SIZE];
    fill_blob(expected);
    if (env.rank == 0) memcpy(blob, expected, BLOB_SIZE);
    mb_rendezvous *rv = NULL;
    mb_error err;
    mb_error_clear(&err);
    record.open_status = mb_rendezvous_open(&rv, &env, blob, BLOB_SIZE, sc->timeout, &err);
    if (record.open_status != 0) {
        snprintf(record.text, sizeof record.text, "%s", err.message);
    } else {
        record.blob_ok = memcmp(blob, expected, BLOB_SIZE) == 0 && mb_rendezvous_rank(rv) == env.rank &&
                         mb_rendezvous_world_size(rv) == env.world_size;
        if (body) body(rv, env.rank, &record);
    }
    ssize_t written = write(out_fd, &record, sizeof record);
    (void)written;
    /* body may have "died" already; a rank that reaches here closes cleanly unless the body said otherwise */
    _exit(0);
}

/* Starts the scenario's processes, collects one record per process (indexed by process). */
static void run_scenario(const scenario *sc, rank_body body, rank_record *records, int *exit_status) {
    int pipe_fds[2];
    cr_assert(pipe(pipe_fds) == 0);
    pid_t pids[MAX_RANKS];
    for (int p = 0; p < sc->processes; p++) {
        int process = sc->skip_rank0 ? p + 1 : p;
        pids[p] = fork();
        cr_assert(pids[p] >= 0);
        if (pids[p] == 0) {
            close(pipe_fds[0]);
            run_rank(sc, process, body, pipe_fds[1]);
        }
    }
    close(pipe_fds[1]);
    memset(records, 0, sizeof(rank_record) * MAX_RANKS);
    for (int i = 0; i < MAX_RANKS; i++) records[i].rank = -1;
    rank_record record;
    int slot = 0;
    while (read(pipe_fds[0], &record, sizeof record) == (ssize_t)sizeof record) records[slot++] = record;
    close(pipe_fds[0]);
    for (int p = 0; p < sc->processes; p++) {
        int status = 0;
        waitpid(pids[p], &status, 0);
        if (exit_status) exit_status[sc->skip_rank0 ? p + 1 : p] = status;
    }
}

static const rank_record *record_of(const rank_record *records, int rank) {
    for (int i = 0; i < MAX_RANKS; i++)
        if (records[i].rank == rank) return &records[i];
    return NULL;
}

/* ---- scenarios ---- */

static void clean_close_hub_first(mb_rendezvous *rv, int rank, rank_record *record) {
    mb_sleep_seconds(0.15 * rank); /* rank 0 closes first, the others look afterwards */
    record->saw_failure = mb_rendezvous_failed(rv, record->text, sizeof record->text);
    mb_rendezvous_close(rv);
}

static void clean_close_hub_last(mb_rendezvous *rv, int rank, rank_record *record) {
    mb_sleep_seconds(0.15 * (4 - rank)); /* peers close first, rank 0 looks last */
    record->saw_failure = mb_rendezvous_failed(rv, record->text, sizeof record->text);
    mb_rendezvous_close(rv);
}

Test(rendezvous, blob_reaches_every_rank_and_clean_close_is_no_failure, .timeout = 60) {
    rank_body bodies[2] = {clean_close_hub_first, clean_close_hub_last};
    for (int b = 0; b < 2; b++) {
        scenario sc = {.world = 4, .processes = 4, .timeout = 20, .port = free_port(), .addr = b ? "localhost" : NULL};
        rank_record records[MAX_RANKS];
        run_scenario(&sc, bodies[b], records, NULL);
        for (int r = 0; r < 4; r++) {
            const rank_record *rec = record_of(records, r);
            cr_assert(rec != NULL, "rank %d sent nothing", r);
            cr_expect_eq(rec->open_status, 0, "rank %d: %s", r, rec->text);
            cr_expect(rec->blob_ok, "rank %d did not get rank 0's blob", r);
            cr_expect_eq(rec->saw_failure, 0, "order %d rank %d saw a failure: %s", b, r, rec->text);
        }
    }
}

static void die_if_rank3_else_watch(mb_rendezvous *rv, int rank, rank_record *record) {
    if (rank == 3) {
        mb_sleep_seconds(0.2);
        raise(SIGKILL);
    }
    wait_for_failure(rv, 15, record);
    mb_rendezvous_close(rv);
}

Test(rendezvous, killed_peer_is_seen_by_everyone, .timeout = 60) {
    scenario sc = {.world = 4, .processes = 4, .timeout = 20, .port = free_port()};
    rank_record records[MAX_RANKS];
    int status[MAX_RANKS] = {0};
    run_scenario(&sc, die_if_rank3_else_watch, records, status);
    cr_expect(WIFSIGNALED(status[3]) && WTERMSIG(status[3]) == SIGKILL);
    cr_expect_eq(record_of(records, 3), NULL, "rank 3 should have died before reporting");
    for (int r = 0; r < 3; r++) {
        const rank_record *rec = record_of(records, r);
        cr_assert(rec != NULL && rec->open_status == 0, "rank %d", r);
        cr_expect(rec->saw_failure, "rank %d never saw rank 3 die", r);
        cr_expect(strstr(rec->text, "rank 3 (host ") != NULL && strstr(rec->text, "without saying goodbye") != NULL,
                  "rank %d: %s", r, rec->text);
        cr_log_info("rank %d saw the death of rank 3 after %.3f s (incl. the 0.2 s before the kill)", r,
                    rec->detect_seconds);
    }
}

static void die_if_rank0_else_watch(mb_rendezvous *rv, int rank, rank_record *record) {
    if (rank == 0) {
        mb_sleep_seconds(0.2);
        raise(SIGKILL);
    }
    wait_for_failure(rv, 15, record);
    mb_rendezvous_close(rv);
}

Test(rendezvous, killed_hub_is_seen_by_every_peer, .timeout = 60) {
    scenario sc = {.world = 3, .processes = 3, .timeout = 20, .port = free_port()};
    rank_record records[MAX_RANKS];
    run_scenario(&sc, die_if_rank0_else_watch, records, NULL);
    for (int r = 1; r < 3; r++) {
        const rank_record *rec = record_of(records, r);
        cr_assert(rec != NULL && rec->open_status == 0, "rank %d", r);
        cr_expect(rec->saw_failure, "rank %d never saw rank 0 die", r);
        cr_expect(strstr(rec->text, "rank 0 (host ") != NULL, "rank %d: %s", r, rec->text);
    }
}

static void report_if_rank2_else_watch(mb_rendezvous *rv, int rank, rank_record *record) {
    if (rank == 2) {
        mb_sleep_seconds(0.1);
        mb_rendezvous_report_failure(rv, "CUDA error: out of memory at step 17");
        mb_sleep_seconds(0.3);
        mb_rendezvous_close(rv); /* a goodbye after a failure must not erase it */
        return;
    }
    wait_for_failure(rv, 15, record);
    mb_rendezvous_close(rv);
}

Test(rendezvous, reported_failure_text_reaches_the_others, .timeout = 60) {
    scenario sc = {.world = 4, .processes = 4, .timeout = 20, .port = free_port()};
    rank_record records[MAX_RANKS];
    run_scenario(&sc, report_if_rank2_else_watch, records, NULL);
    for (int r = 0; r < 4; r++) {
        if (r == 2) continue;
        const rank_record *rec = record_of(records, r);
        cr_assert(rec != NULL && rec->open_status == 0, "rank %d", r);
        cr_expect(rec->saw_failure, "rank %d never saw the report", r);
        cr_expect(strstr(rec->text, "rank 2 (host ") != NULL &&
                      strstr(rec->text, "failed: CUDA error: out of memory at step 17") != NULL,
                  "rank %d: %s", r, rec->text);
    }
}

static void report_if_rank0_else_watch(mb_rendezvous *rv, int rank, rank_record *record) {
    if (rank == 0) {
        mb_rendezvous_report_failure(rv, "checkpoint write failed");
        mb_sleep_seconds(0.3);
        return; /* exits without close, like a failing process */
    }
    wait_for_failure(rv, 15, record);
    mb_rendezvous_close(rv);
}

Test(rendezvous, hub_failure_report_reaches_peers, .timeout = 60) {
    scenario sc = {.world = 3, .processes = 3, .timeout = 20, .port = free_port()};
    rank_record records[MAX_RANKS];
    run_scenario(&sc, report_if_rank0_else_watch, records, NULL);
    for (int r = 1; r < 3; r++) {
        const rank_record *rec = record_of(records, r);
        cr_assert(rec != NULL && rec->open_status == 0, "rank %d", r);
        cr_expect(strstr(rec->text, "rank 0 (host ") != NULL && strstr(rec->text, "failed: checkpoint write failed"),
                  "rank %d: %s", r, rec->text);
    }
}

Test(rendezvous, missing_hub_times_out_naming_the_address, .timeout = 30) {
    int port = free_port();
    mb_dist_env env = {.kind = MB_LAUNCH_TORCHRUN, .rank = 1, .world_size = 3, .local_rank = 1, .local_world_size = 3,
                       .master_port = port};
    snprintf(env.master_addr, sizeof env.master_addr, "127.0.0.1");
    unsigned char blob[BLOB_SIZE];
    mb_rendezvous *rv = (mb_rendezvous *)1;
    mb_error err;
    cr_assert_eq(mb_rendezvous_open(&rv, &env, blob, BLOB_SIZE, 1.0, &err), -1);
    cr_expect_eq(rv, NULL);
    char address[64];
    snprintf(address, sizeof address, "127.0.0.1:%d", port);
    cr_expect(strstr(err.message, address) != NULL && strstr(err.message, "could not reach rank 0") != NULL, "%s",
              err.message);
}

Test(rendezvous, unresolvable_master_addr_is_named, .timeout = 30) {
    mb_dist_env env = {.kind = MB_LAUNCH_TORCHRUN, .rank = 1, .world_size = 2, .local_rank = 1, .local_world_size = 2,
                       .master_port = free_port()};
    snprintf(env.master_addr, sizeof env.master_addr, "no-such-host.invalid");
    unsigned char blob[BLOB_SIZE];
    mb_rendezvous *rv = NULL;
    mb_error err;
    cr_assert_eq(mb_rendezvous_open(&rv, &env, blob, BLOB_SIZE, 2.0, &err), -1);
    cr_expect(strstr(err.message, "no-such-host.invalid") != NULL, "%s", err.message);
}

Test(rendezvous, missing_peer_is_listed_by_rank0, .timeout = 30) {
    scenario sc = {.world = 4, .processes = 3, .timeout = 1.5, .port = free_port()}; /* rank 3 never starts */
    rank_record records[MAX_RANKS];
    run_scenario(&sc, NULL, records, NULL);
    const rank_record *hub = record_of(records, 0);
    cr_assert(hub != NULL);
    cr_expect_eq(hub->open_status, -1);
    cr_expect(strstr(hub->text, "1 of 4 ranks never arrived: 3") != NULL, "%s", hub->text);
    for (int r = 1; r < 3; r++) {
        const rank_record *rec = record_of(records, r);
        cr_assert(rec != NULL);
        cr_expect_eq(rec->open_status, -1, "rank %d", r);
        cr_expect(strstr(rec->text, "never arrived") != NULL || strstr(rec->text, "did not finish") != NULL, "rank %d: %s",
                  r, rec->text);
    }
}

Test(rendezvous, wrong_world_size_is_an_error_naming_both, .timeout = 30) {
    scenario sc = {.world = 3, .processes = 3, .timeout = 3, .port = free_port()};
    sc.world_of[2] = 4;
    rank_record records[MAX_RANKS];
    run_scenario(&sc, NULL, records, NULL);
    const rank_record *hub = record_of(records, 0);
    cr_assert(hub != NULL);
    cr_expect_eq(hub->open_status, -1);
    cr_expect(strstr(hub->text, "rank 2 (host ") != NULL && strstr(hub->text, "world size 4") != NULL &&
                  strstr(hub->text, "rank 0 (host ") != NULL && strstr(hub->text, "world size 3") != NULL,
              "%s", hub->text);
    const rank_record *bad = record_of(records, 2);
    cr_assert(bad != NULL);
    cr_expect_eq(bad->open_status, -1);
    cr_expect(strstr(bad->text, "world size 4") != NULL, "rank 2 should see the hub's reason: %s", bad->text);
}

Test(rendezvous, duplicate_rank_is_an_error_naming_both, .timeout = 30) {
    scenario sc = {.world = 3, .processes = 3, .timeout = 3, .port = free_port()};
    sc.rank_of[2] = 1; /* processes 1 and 2 both claim rank 1 */
    rank_record records[MAX_RANKS];
    run_scenario(&sc, NULL, records, NULL);
    const rank_record *hub = record_of(records, 0);
    cr_assert(hub != NULL);
    cr_expect_eq(hub->open_status, -1);
    cr_expect(strstr(hub->text, "rank 1 is claimed twice") != NULL, "%s", hub->text);
}

Test(rendezvous, world_of_one_needs_no_socket) {
    mb_dist_env env = {.kind = MB_LAUNCH_NONE, .rank = 0, .world_size = 1, .local_world_size = 1, .master_port = 1};
    snprintf(env.master_addr, sizeof env.master_addr, "unused.invalid");
    unsigned char blob[4] = {1, 2, 3, 4};
    mb_rendezvous *rv = NULL;
    mb_error err;
    cr_assert_eq(mb_rendezvous_open(&rv, &env, blob, sizeof blob, 0.1, &err), 0, "%s", err.message);
    cr_expect_eq(mb_rendezvous_failed(rv, NULL, 0), 0);
    mb_rendezvous_report_failure(rv, "nobody listens");
    cr_expect_eq(mb_rendezvous_world_size(rv), 1);
    mb_rendezvous_close(rv);
    mb_rendezvous_close(NULL);
}
