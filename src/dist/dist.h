/* A data-parallel group as the trainer sees it: which rank this process is, and the few host-level collectives the
 * training loop needs (label counts, loss sums, the stop decision). The gradient traffic itself (reduce-scatter,
 * all-gather) never passes through here: the CUDA backend reaches the NCCL communicator behind this object directly
 * (cuda/comm.h) and overlaps it with the backward pass.
 *
 * Failure model (docs/distributed.md): every wait inside a collective polls for errors, for a peer that died (its TCP
 * connection to the rendezvous hub closed) and for a timeout; on any of them the communicator is aborted and the call
 * returns an error naming the cause, so a rank never hangs silently. A watchdog thread ends the process when a peer
 * failed and the main thread did not notice within a grace period (e.g. it is stuck in a blocking call). */
#ifndef MB_DIST_H
#define MB_DIST_H

#include "common/error.h"
#include "dist/env.h"

typedef struct mb_dist mb_dist;

typedef struct mb_dist_ops {
    /* values[0..count) ← Σ over ranks, the same bits on every rank. Blocks (bounded by the timeout). */
    int (*all_reduce_sum)(mb_dist *dist, double *values, int count, mb_error *err);
    /* This rank is failing with `message`: tell the peers and abort communication. */
    void (*abort)(mb_dist *dist, const char *message);
    void (*destroy)(mb_dist *dist);
} mb_dist_ops;

struct mb_dist {
    const mb_dist_ops *ops;
    int rank, world_size, local_rank;
    double timeout_seconds;
    void *impl;
};

/* The NCCL group for `env` (world_size > 1): selects GPU local_rank, exchanges the NCCL unique id over TCP at
 * MASTER_ADDR:MASTER_PORT (src/dist/rendezvous.h) and creates a non-blocking communicator. Defined in cuda/comm.cu;
 * a binary built without CUDA gets a stand-in that fails with a clear message. */
int mb_dist_create_nccl(mb_dist **dist, const mb_dist_env *env, double timeout_seconds, mb_error *err);

static inline int mb_dist_all_reduce_sum(mb_dist *dist, double *values, int count, mb_error *err) {
    return dist->ops->all_reduce_sum(dist, values, count, err);
}

static inline void mb_dist_abort(mb_dist *dist, const char *message) {
    if (dist != NULL) dist->ops->abort(dist, message);
}

static inline void mb_dist_destroy(mb_dist *dist) {
    if (dist != NULL) dist->ops->destroy(dist);
}

#endif
