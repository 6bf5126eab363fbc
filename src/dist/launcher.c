/* Local launcher: fork/exec of nproc_per_node workers with torchrun-style variables, then supervision. The
 * supervisor sleeps in poll() on a self-pipe that the SIGCHLD/SIGINT/SIGTERM handlers write to, so it wakes exactly
 * when a worker ends or a signal arrives, and otherwise only for the SIGKILL deadline. */
#include "dist/launcher.h"

#include "common/clock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* The one exception to "no globals": a signal handler can only reach the supervisor through file-scope
 * volatile sig_atomic_t objects. They hold the write end of the self-pipe and the last SIGINT/SIGTERM received. */
static volatile sig_atomic_t launcher_wake_fd = -1;
static volatile sig_atomic_t launcher_signal = 0;
static volatile sig_atomic_t launcher_signal_count = 0;

static void on_signal(int signal_number) {
    int saved_errno = errno;
    if (signal_number != SIGCHLD) {
        launcher_signal = signal_number;
        launcher_signal_count = launcher_signal_count + 1;
    }
    if (launcher_wake_fd >= 0) {
        ssize_t ignored = write(launcher_wake_fd, "s", 1); /* non-blocking: a full pipe already means "wake up" */
        (void)ignored;
    }
    errno = saved_errno;
}

static const char *launch_env_value(mb_getenv_fn getenv_fn, void *context, const char *name) {
    const char *value = getenv_fn != NULL ? getenv_fn(context, name) : getenv(name);
    return value != NULL && value[0] != '\0' ? value : NULL;
}

int mb_launch_options_from_env(mb_launch_options *options, mb_getenv_fn getenv_fn, void *context, mb_error *err) {
    memset(options, 0, sizeof *options);
    options->nproc_per_node = 1;
    options->nnodes = 1;
    options->node_rank = 0;
    snprintf(options->master_addr, sizeof options->master_addr, "127.0.0.1");
    options->master_port = MB_DIST_DEFAULT_PORT;
    options->grace_seconds = 15.0;
    const char *value = launch_env_value(getenv_fn, context, "NNODES");
    if (value != NULL && mb_dist_parse_int("NNODES", value, 1, 1 << 20, &options->nnodes, err) != 0) return -1;
    value = launch_env_value(getenv_fn, context, "NODE_RANK");
    if (value != NULL && mb_dist_parse_int("NODE_RANK", value, 0, options->nnodes - 1, &options->node_rank, err) != 0)
        return mb_fail_context(err, "launcher (NNODES = %d)", options->nnodes);
    value = launch_env_value(getenv_fn, context, "MASTER_ADDR");
    if (value != NULL) {
        if (strlen(value) >= sizeof options->master_addr)
            return mb_fail(err, "environment variable MASTER_ADDR is %zu characters long (at most %zu)", strlen(value),
                           sizeof options->master_addr - 1);
        snprintf(options->master_addr, sizeof options->master_addr, "%s", value);
    }
    value = launch_env_value(getenv_fn, context, "MASTER_PORT");
    if (value != NULL && mb_dist_parse_int("MASTER_PORT", value, 1, 65535, &options->master_port, err) != 0) return -1;
    return 0;
}

static int check_options(const mb_launch_options *o, mb_error *err) {
    if (o->nproc_per_node < 1) return mb_fail(err, "launcher: --nproc-per-node must be >= 1 (got %d)", o->nproc_per_node);
    if (o->nnodes < 1) return mb_fail(err, "launcher: --nnodes must be >= 1 (got %d)", o->nnodes);
    if (o->node_rank < 0 || o->node_rank >= o->nnodes)
        return mb_fail(err, "launcher: --node-rank %d is outside [0, %d) for --nnodes %d", o->node_rank, o->nnodes, o->nnodes);
    if ((long long)o->nproc_per_node * o->nnodes > INT_MAX)
        return mb_fail(err, "launcher: %d nodes x %d processes is too many", o->nnodes, o->nproc_per_node);
    if (o->master_port < 1 || o->master_port > 65535)
        return mb_fail(err, "launcher: master port %d is outside [1, 65535]", o->master_port);
    if (o->master_addr[0] == '\0') return mb_fail(err, "launcher: the master address is empty");
    if (!(o->grace_seconds >= 0)) return mb_fail(err, "launcher: grace period %g s must be >= 0", o->grace_seconds);
    return 0;
}

/* ---- worker environment ---- */

#define LAUNCH_VARIABLES 7
static const char *const launch_variable_names[LAUNCH_VARIABLES] = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"};

static int is_launch_variable(const char *entry) {
    for (int i = 0; i < LAUNCH_VARIABLES; i++) {
        size_t n = strlen(launch_variable_names[i]);
        if (strncmp(entry, launch_variable_names[i], n) == 0 && entry[n] == '=') return 1;
    }
    return 0;
}

typedef struct worker_environment {
    char **entries; /* NULL-terminated, for execve; entries[first_own..] are ours (malloc'ed) */
    int first_own;
} worker_environment;

static void free_worker_environment(worker_environment *we) {
    if (we->entries == NULL) return;
    for (int i = we->first_own; we->entries[i] != NULL; i++) free(we->entries[i]);
    free(we->entries);
    we->entries = NULL;
}

/* The launcher's environment minus any old launch variables, plus this worker's. Built before fork: the child
 * only calls async-signal-safe functions. */
static int build_worker_environment(worker_environment *we, const mb_launch_options *o, int local_rank) {
    int inherited = 0;
    while (environ != NULL && environ[inherited] != NULL) inherited++;
    we->entries = calloc((size_t)inherited + LAUNCH_VARIABLES + 1, sizeof *we->entries);
    if (we->entries == NULL) return -1;
    int n = 0;
    for (int i = 0; i < inherited; i++)
        if (!is_launch_variable(environ[i])) we->entries[n++] = environ[i];
    we->first_own = n;
    int rank = o->node_rank * o->nproc_per_node + local_rank;
    char values[LAUNCH_VARIABLES][300];
    snprintf(values[0], sizeof values[0], "%d", rank);
    snprintf(values[1], sizeof values[1], "%d", o->nnodes * o->nproc_per_node);
    snprintf(values[2], sizeof values[2], "%d", local_rank);
    snprintf(values[3], sizeof values[3], "%d", o->nproc_per_node);
    snprintf(values[4], sizeof values[4], "%d", o->node_rank);
    snprintf(values[5], sizeof values[5], "%s", o->master_addr);
    snprintf(values[6], sizeof values[6], "%d", o->master_port);
    for (int i = 0; i < LAUNCH_VARIABLES; i++) {
        size_t size = strlen(launch_variable_names[i]) + strlen(values[i]) + 2;
        char *entry = malloc(size);
        if (entry == NULL) return -1;
        snprintf(entry, size, "%s=%s", launch_variable_names[i], values[i]);
        we->entries[n++] = entry;
    }
    we->entries[n] = NULL;
    return 0;
}

/* ---- processes ---- */

typedef struct worker {
    pid_t pid;
    int rank;
    int alive;
} worker;

/* Forks one worker. The child reports an execve failure through a close-on-exec pipe: EOF means exec succeeded. */
static int spawn_worker(worker *w, const char *path, char *const argv[], char **envp, mb_error *err) {
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return mb_fail(err, "launcher: pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0) {
        int saved = errno;
        close(report[0]), close(report[1]);
        return mb_fail(err, "launcher: cannot start rank %d: fork: %s", w->rank, strerror(saved));
    }
    if (pid == 0) {
        close(report[0]);
        execve(path, argv, envp);
        int error = errno;
        ssize_t ignored = write(report[1], &error, sizeof error);
        (void)ignored;
        _exit(127);
    }
    close(report[1]);
    w->pid = pid;
    w->alive = 1;
    int child_errno = 0;
    ssize_t got;
    do got = read(report[0], &child_errno, sizeof child_errno);
    while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == (ssize_t)sizeof child_errno)
        return mb_fail(err, "launcher: cannot execute %s for rank %d: %s", path, w->rank, strerror(child_errno));
    return 0;
}

static void signal_live(worker *workers, int count, int signal_number) {
    for (int i = 0; i < count; i++)
        if (workers[i].alive) kill(workers[i].pid, signal_number);
}

/* Waits for every live worker, blocking (used on the error path, after SIGKILL). */
static void reap_all(worker *workers, int count) {
    for (int i = 0; i < count; i++) {
        if (!workers[i].alive) continue;
        while (waitpid(workers[i].pid, NULL, 0) < 0 && errno == EINTR) {
        }
        workers[i].alive = 0;
    }
}

typedef struct supervisor {
    worker *workers;
    int count, live;
    int first_failure;      /* exit code of the first failure, 0 while none */
    int stopping, killed;   /* SIGTERM sent / SIGKILL sent */
    double kill_deadline;
    double grace_seconds;
} supervisor;

/* with_deadline: after a worker failed, the others get grace_seconds before SIGKILL. A signal the user sent to the
 * launcher (SIGINT/SIGTERM: stop, e.g. a Slurm preemption) has no deadline: the workers agree on a step, write a
 * checkpoint (which may take minutes for a large model) and exit; a second signal kills them at once. */
static void begin_stopping(supervisor *s, int signal_number, int with_deadline) {
    if (with_deadline && s->kill_deadline < 0) s->kill_deadline = mb_monotonic_seconds() + s->grace_seconds;
    if (s->stopping) return;
    s->stopping = 1;
    signal_live(s->workers, s->count, signal_number);
}

/* Collects workers that have ended; the first failure stops the others. */
static void reap_finished(supervisor *s) {
    for (int i = 0; i < s->count; i++) {
        worker *w = &s->workers[i];
        int status = 0;
        if (!w->alive || waitpid(w->pid, &status, WNOHANG) != w->pid) continue;
        w->alive = 0;
        s->live--;
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 1;
        if (code == 0 || s->first_failure != 0) continue;
        s->first_failure = code;
        if (WIFSIGNALED(status))
            fprintf(stderr, "launcher: rank %d was killed by signal %d (%s)\n", w->rank, WTERMSIG(status),
                    strsignal(WTERMSIG(status)));
        else
            fprintf(stderr, "launcher: rank %d exited with code %d\n", w->rank, code);
        if (s->live > 0 && !s->stopping)
            fprintf(stderr, "launcher: stopping the other %d worker(s): SIGTERM now, SIGKILL after %g s\n", s->live,
                    s->grace_seconds);
        begin_stopping(s, SIGTERM, 1);
    }
}

static void supervise(supervisor *s, int wake_read_fd) {
    int forwarded = 0;
    for (;;) {
        reap_finished(s);
        int received = launcher_signal;
        if (received != 0 && !forwarded) {
            forwarded = received;
            fprintf(stderr, "launcher: received signal %d (%s), forwarding it to the workers\n", received,
                    strsignal(received));
            if (s->stopping) signal_live(s->workers, s->count, received);
            begin_stopping(s, received, 0);
        }
        if (launcher_signal_count >= 2 && !s->killed) { /* a second Ctrl-C: no more grace */
            fprintf(stderr, "launcher: second signal received, sending SIGKILL to the workers\n");
            signal_live(s->workers, s->count, SIGKILL);
            s->killed = 1;
        }
        if (s->live == 0) break;
        int timeout_ms = 1000;
        if (s->stopping && !s->killed && s->kill_deadline >= 0) {
            double left = s->kill_deadline - mb_monotonic_seconds();
            if (left <= 0) {
                for (int i = 0; i < s->count; i++)
                    if (s->workers[i].alive)
                        fprintf(stderr, "launcher: rank %d still running %g s after SIGTERM, sending SIGKILL\n",
                                s->workers[i].rank, s->grace_seconds);
                signal_live(s->workers, s->count, SIGKILL);
                s->killed = 1;
            } else {
                timeout_ms = left * 1000 < timeout_ms ? (int)(left * 1000) + 1 : timeout_ms;
            }
        }
        struct pollfd pfd = {wake_read_fd, POLLIN, 0};
        if (poll(&pfd, 1, timeout_ms) > 0) {
            char drain[64];
            while (read(wake_read_fd, drain, sizeof drain) > 0) {
            }
        }
    }
}

typedef struct saved_handlers {
    struct sigaction child, interrupt, terminate;
} saved_handlers;

static void install_handlers(saved_handlers *saved) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &action, &saved->child);
    action.sa_flags = SA_RESTART;
    sigaction(SIGINT, &action, &saved->interrupt);
    sigaction(SIGTERM, &action, &saved->terminate);
}

static void restore_handlers(const saved_handlers *saved) {
    sigaction(SIGCHLD, &saved->child, NULL);
    sigaction(SIGINT, &saved->interrupt, NULL);
    sigaction(SIGTERM, &saved->terminate, NULL);
}

static int start_all(worker *workers, const mb_launch_options *o, const char *path, char *const argv[], mb_error *err) {
    for (int i = 0; i < o->nproc_per_node; i++) {
        worker_environment we = {NULL, 0};
        workers[i].rank = o->node_rank * o->nproc_per_node + i;
        if (build_worker_environment(&we, o, i) != 0) {
            free_worker_environment(&we);
            return mb_fail(err, "launcher: out of memory");
        }
        int status = spawn_worker(&workers[i], path, argv, we.entries, err);
        free_worker_environment(&we);
        if (status != 0) return -1;
    }
    return 0;
}

int mb_launch_workers(const mb_launch_options *options, const char *path, char *const argv[], int *exit_code,
                      mb_error *err) {
    *exit_code = 1;
    if (check_options(options, err) != 0) return -1;
    worker *workers = calloc((size_t)options->nproc_per_node, sizeof *workers);
    int wake[2];
    if (workers == NULL) return mb_fail(err, "launcher: out of memory");
    if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) {
        free(workers);
        return mb_fail(err, "launcher: pipe: %s", strerror(errno));
    }
    saved_handlers saved;
    launcher_signal = 0;
    launcher_signal_count = 0;
    launcher_wake_fd = wake[1];
    install_handlers(&saved);
    fflush(NULL); /* buffered output must not be written twice by the children */
    int status = start_all(workers, options, path, argv, err);
    if (status != 0) {
        signal_live(workers, options->nproc_per_node, SIGKILL);
        reap_all(workers, options->nproc_per_node);
    } else {
        supervisor s = {workers, options->nproc_per_node, options->nproc_per_node, 0, 0, 0, -1.0, options->grace_seconds};
        supervise(&s, wake[0]);
        *exit_code = s.first_failure;
    }
    restore_handlers(&saved);
    launcher_wake_fd = -1;
    launcher_signal = 0;
    launcher_signal_count = 0;
    close(wake[0]);
    close(wake[1]);
    free(workers);
    return status;
}
