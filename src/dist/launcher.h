/* Local launcher: `modernbert pretrain --nproc-per-node N CONFIG` starts N copies of the binary on this node and
 * supervises them, torchrun style.
 *
 * Worker i of node n gets RANK = n·N + i, WORLD_SIZE = nnodes·N, LOCAL_RANK = i, LOCAL_WORLD_SIZE = N, NODE_RANK = n,
 * MASTER_ADDR and MASTER_PORT in its environment (the rest of the environment, CUDA_VISIBLE_DEVICES included, is passed
 * through). The first worker that fails stops the others: SIGTERM, then SIGKILL after grace_seconds. */
#ifndef MB_DIST_LAUNCHER_H
#define MB_DIST_LAUNCHER_H

#include "common/error.h"
#include "dist/env.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mb_launch_options {
    int nproc_per_node;        /* >= 1 */
    int nnodes, node_rank;     /* 1, 0 by default; from --nnodes/--node-rank or env NNODES / NODE_RANK */
    char master_addr[256];     /* default 127.0.0.1 (or env MASTER_ADDR) */
    int master_port;           /* default 29500 (or env MASTER_PORT) */
    double grace_seconds;      /* after the first failure: SIGTERM the rest, SIGKILL after this (default 15) */
} mb_launch_options;

/* Fills defaults (nproc_per_node 1) and the environment's NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (getenv_fn as in
 * env.h, empty = unset); errors for bad values name the variable. */
int mb_launch_options_from_env(mb_launch_options *options, mb_getenv_fn getenv_fn, void *context, mb_error *err);

/* Starts nproc_per_node workers (fork + execve(path, argv, environment + the variables above); stdout/stderr
 * inherited) and waits for them. The first worker that exits non-zero or dies by a signal → prints
 * "launcher: rank R exited with code C" (or "was killed by signal S") to stderr, SIGTERMs every other live worker,
 * SIGKILLs those still alive after grace_seconds, and returns that first failure as *exit_code (128 + S for a
 * signal). SIGINT/SIGTERM received by the launcher are forwarded to all workers, which stop on their own
 * (pretrain: an agreed step, a checkpoint) without a deadline, and *exit_code is 0 when they all exit 0; a second
 * such signal SIGKILLs them at once.
 * All exit 0 → *exit_code = 0. Returns -1 only for
 * launcher errors (bad options, fork or exec failure; the started workers are killed then). Every worker is reaped
 * before returning. Not reentrant: it installs SIGCHLD/SIGINT/SIGTERM handlers for its duration and restores the
 * previous ones at the end. */
int mb_launch_workers(const mb_launch_options *options, const char *path, char *const argv[], int *exit_code,
                      mb_error *err);

#ifdef __cplusplus
}
#endif

#endif
