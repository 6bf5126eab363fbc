/* NCCL communicator with failure detection (see comm.h and src/dist/dist.h).
 *
 * Setup: cudaSetDevice(LOCAL_RANK) → rank 0 draws the NCCL unique id → the TCP rendezvous (src/dist/rendezvous.h)
 * hands it to every rank and keeps one connection per rank open as a liveness channel → ncclCommInitRankConfig
 * with blocking = 0, polled to completion.
 *
 * Waiting: NCCL kernels of a collective spin until every rank has joined, so a dead or hung peer would freeze the
 * others inside cudaStreamSynchronize forever. Here nothing waits that way: host waits poll cudaStreamQuery between
 * health checks (ncclCommGetAsyncError, the rendezvous' failure flag, the deadline), and on a failure the
 * communicator is aborted (ncclCommAbort also unblocks its kernels) and the caller gets an error naming the cause.
 * A watchdog thread ends the process when a peer failure stays unhandled for kWatchdogGraceSeconds (the main thread
 * stuck outside a polled wait, e.g. in an implicitly synchronizing CUDA call). */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"
#include "common.cuh"

extern "C" {
#include "common/clock.h"
#include "dist/rendezvous.h"
}

namespace {

constexpr int kMaxHostValues = 64;
constexpr double kWatchdogGraceSeconds = 20.0;
constexpr int kWatchdogExitCode = 3;

}  // namespace

struct mb_comm {
    mb_dist dist; /* first member: an mb_dist * of this implementation is an mb_comm * */
    ncclComm_t nccl;
    mb_rendezvous *rendezvous;
    cudaStream_t stream;
    double *device_values; /* [kMaxHostValues] for the host-level sums */
    double *pinned_values;
    int aborted;
    pthread_t watchdog;
    int watchdog_started;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int stopping;
};

namespace {


void abort_communicator(mb_comm *c) {
    if (c->aborted || c->nccl == nullptr) return;
    c->aborted = 1;
    ncclCommAbort(c->nccl); /* also releases kernels spinning in a collective */
    c->nccl = nullptr;
}

/* Fails with `message` after telling the peers and aborting; returns -1. */
int fail_and_abort(mb_comm *c, mb_error *err, const char *message) {
    mb_rendezvous_report_failure(c->rendezvous, message);
    abort_communicator(c);
    return mb_fail(err, "%s", message);
}

/* One health check inside a wait that started at `start`: 0 = keep waiting. */
int check_health(mb_comm *c, const char *what, double start, mb_error *err) {
    char message[1024], why[700];
    if (c->aborted) return mb_fail(err, "rank %d: %s: the communicator was aborted earlier", c->dist.rank, what);
    ncclResult_t async = ncclSuccess;
    ncclResult_t query = ncclCommGetAsyncError(c->nccl, &async);
    if (query != ncclSuccess || (async != ncclSuccess && async != ncclInProgress)) {
        snprintf(message, sizeof message, "rank %d: NCCL error during %s: %s (%s)", c->dist.rank, what,
                 ncclGetErrorString(query != ncclSuccess ? query : async), ncclGetLastError(c->nccl));
        return fail_and_abort(c, err, message);
    }
    if (mb_rendezvous_failed(c->rendezvous, why, sizeof why)) {
        abort_communicator(c);
        return mb_fail(err, "rank %d: %s interrupted: %s", c->dist.rank, what, why);
    }
    if (mb_monotonic_seconds() - start > c->dist.timeout_seconds) {
        snprintf(message, sizeof message,
                 "rank %d: %s did not complete within %.0f s: another rank hangs or is far behind (raise "
                 "run.comm_timeout_seconds if it is legitimately slow)", c->dist.rank, what, c->dist.timeout_seconds);
        return fail_and_abort(c, err, message);
    }
    return 0;
}

void pause_briefly(int spins) {
    if (spins < 2000) return;
    struct timespec delay = {0, spins < 20000 ? 20000 : 200000};
    nanosleep(&delay, nullptr);
}

/* A non-blocking NCCL call returned `status`: wait until the operation is enqueued (or failed). */
int settle(mb_comm *c, ncclResult_t status, const char *what, mb_error *err) {
    if (status == ncclSuccess) return 0;
    char message[1024];
    if (status != ncclInProgress) {
        snprintf(message, sizeof message, "rank %d: %s: %s (%s)", c->dist.rank, what, ncclGetErrorString(status),
                 c->nccl ? ncclGetLastError(c->nccl) : "");
        return fail_and_abort(c, err, message);
    }
    double start = mb_monotonic_seconds();
    for (int spins = 0;; spins++) {
        ncclResult_t async = ncclInProgress;
        ncclCommGetAsyncError(c->nccl, &async);
        if (async == ncclSuccess) return 0;
        if (async != ncclInProgress || check_health(c, what, start, err) != 0) {
            if (async != ncclInProgress) {
                snprintf(message, sizeof message, "rank %d: %s: %s (%s)", c->dist.rank, what,
                         ncclGetErrorString(async), ncclGetLastError(c->nccl));
                return fail_and_abort(c, err, message);
            }
            return -1;
        }
        pause_briefly(spins);
    }
}

int usable(mb_comm *c, const char *what, mb_error *err) {
    if (c == nullptr) return mb_fail(err, "%s: no communicator", what);
    if (c->aborted) return mb_fail(err, "rank %d: %s: the communicator was aborted earlier", c->dist.rank, what);
    return 0;
}

/* ---- the watchdog ---- */

void *watchdog_main(void *argument) {
    mb_comm *c = static_cast<mb_comm *>(argument);
    double failed_since = -1.0;
    char why[700];
    pthread_mutex_lock(&c->lock);
    while (!c->stopping) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 200 * 1000 * 1000;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&c->wake, &c->lock, &until);
        if (c->stopping) break;
        if (!mb_rendezvous_failed(c->rendezvous, why, sizeof why)) continue;
        double now = mb_monotonic_seconds();
        if (failed_since < 0) failed_since = now;
        if (now - failed_since >= kWatchdogGraceSeconds) {
            fprintf(stderr, "modernbert: rank %d: %s; still running %.0f s later, exiting (watchdog)\n", c->dist.rank,
                    why, kWatchdogGraceSeconds);
            fflush(stderr);
            _exit(kWatchdogExitCode);
        }
    }
    pthread_mutex_unlock(&c->lock);
    return nullptr;
}

/* ---- mb_dist operations ---- */

int host_all_reduce(mb_dist *dist, double *values, int count, mb_error *err) {
    mb_comm *c = reinterpret_cast<mb_comm *>(dist);
    if (usable(c, "all-reduce", err) != 0) return -1;
    MB_REQUIRE(err, count >= 1 && count <= kMaxHostValues, "all-reduce of %d values (1..%d)", count, kMaxHostValues);
    memcpy(c->pinned_values, values, (size_t)count * sizeof(double));
    MB_CUDA_CHECK(err, cudaMemcpyAsync(c->device_values, c->pinned_values, (size_t)count * sizeof(double),
                                       cudaMemcpyHostToDevice, c->stream));
    if (mb_comm_all_reduce_doubles(c, c->device_values, (size_t)count, err) != 0) return -1;
    MB_CUDA_CHECK(err, cudaMemcpyAsync(c->pinned_values, c->device_values, (size_t)count * sizeof(double),
                                       cudaMemcpyDeviceToHost, c->stream));
    if (mb_comm_wait_stream(c, c->stream, "all-reduce of step totals", err) != 0) return -1;
    memcpy(values, c->pinned_values, (size_t)count * sizeof(double));
    return 0;
}

void dist_abort(mb_dist *dist, const char *message) {
    mb_comm *c = reinterpret_cast<mb_comm *>(dist);
    mb_rendezvous_report_failure(c->rendezvous, message);
    abort_communicator(c);
}

void dist_destroy(mb_dist *dist) {
    mb_comm *c = reinterpret_cast<mb_comm *>(dist);
    if (c == nullptr) return;
    if (c->watchdog_started) {
        pthread_mutex_lock(&c->lock);
        c->stopping = 1;
        pthread_cond_signal(&c->wake);
        pthread_mutex_unlock(&c->lock);
        pthread_join(c->watchdog, nullptr);
    }
    if (c->nccl != nullptr && !c->aborted) {
        /* a clean end: every collective has completed (the trainer waited), so finalize cannot block for long */
        if (cudaStreamQuery(c->stream) == cudaSuccess) {
            ncclCommFinalize(c->nccl);
            ncclResult_t state = ncclInProgress;
            double start = mb_monotonic_seconds();
            while (ncclCommGetAsyncError(c->nccl, &state) == ncclSuccess && state == ncclInProgress &&
                   mb_monotonic_seconds() - start < 10.0)
                pause_briefly(5000);
            ncclCommDestroy(c->nccl);
        } else {
            ncclCommAbort(c->nccl);
        }
    } else if (c->nccl != nullptr) {
        ncclCommAbort(c->nccl);
    }
    if (c->device_values) cudaFree(c->device_values);
    if (c->pinned_values) cudaFreeHost(c->pinned_values);
    if (c->stream) cudaStreamDestroy(c->stream);
    cudaGetLastError();
    mb_rendezvous_close(c->rendezvous);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->wake);
    free(c);
}

const mb_dist_ops nccl_ops = {host_all_reduce, dist_abort, dist_destroy};

int select_device(const mb_dist_env *env, mb_error *err) {
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess)
        return mb_fail(err, "rank %d: no usable CUDA device: %s", env->rank, cudaGetErrorString(status));
    if (env->local_rank >= count)
        return mb_fail(err, "rank %d: local rank %d but this node shows only %d GPU(s) (one process per GPU; check "
                            "CUDA_VISIBLE_DEVICES and the number of processes per node)",
                       env->rank, env->local_rank, count);
    MB_CUDA_CHECK(err, cudaSetDevice(env->local_rank));
    return 0;
}

int create_communicator(mb_comm *c, const mb_dist_env *env, mb_error *err) {
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (env->rank == 0) MB_NCCL_CHECK(err, ncclGetUniqueId(&id));
    if (mb_rendezvous_open(&c->rendezvous, env, &id, sizeof id, c->dist.timeout_seconds, err) != 0) return -1;
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclResult_t status = ncclCommInitRankConfig(&c->nccl, env->world_size, id, env->rank, &config);
    if (status != ncclSuccess && status != ncclInProgress)
        return mb_fail(err, "rank %d: ncclCommInitRankConfig: %s", env->rank, ncclGetErrorString(status));
    return settle(c, status, "creating the NCCL communicator", err);
}

}  // namespace

/* ---- C interface ---- */

extern "C" int mb_dist_create_nccl(mb_dist **out, const mb_dist_env *env, double timeout_seconds, mb_error *err) {
    *out = nullptr;
    if (env->world_size < 2) return mb_fail(err, "mb_dist_create_nccl: world size %d (needs >= 2)", env->world_size);
    if (!(timeout_seconds > 0)) return mb_fail(err, "communication timeout must be positive (got %g)", timeout_seconds);
    if (select_device(env, err) != 0) return -1;
    mb_comm *c = static_cast<mb_comm *>(calloc(1, sizeof *c));
    if (c == nullptr) return mb_fail(err, "out of memory");
    c->dist.ops = &nccl_ops;
    c->dist.rank = env->rank;
    c->dist.world_size = env->world_size;
    c->dist.local_rank = env->local_rank;
    c->dist.timeout_seconds = timeout_seconds;
    c->dist.impl = c;
    pthread_mutex_init(&c->lock, nullptr);
    pthread_cond_init(&c->wake, nullptr);
    int rc = 0;
    if (cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking) != cudaSuccess ||
        cudaMalloc(&c->device_values, kMaxHostValues * sizeof(double)) != cudaSuccess ||
        cudaMallocHost(&c->pinned_values, kMaxHostValues * sizeof(double)) != cudaSuccess) {
        rc = mb_fail(err, "rank %d: allocating the communicator's stream and buffers: %s", env->rank,
                     cudaGetErrorString(cudaGetLastError()));
    }
    if (rc == 0) rc = create_communicator(c, env, err);
    if (rc == 0 && pthread_create(&c->watchdog, nullptr, watchdog_main, c) == 0) c->watchdog_started = 1;
    if (rc != 0) {
        if (c->rendezvous != nullptr) mb_rendezvous_report_failure(c->rendezvous, err->message);
        dist_destroy(&c->dist);
        return -1;
    }
    *out = &c->dist;
    return 0;
}

extern "C" mb_comm *mb_comm_of(mb_dist *dist) {
    return dist != nullptr && dist->ops == &nccl_ops ? static_cast<mb_comm *>(dist->impl) : nullptr;
}

extern "C" cudaStream_t mb_comm_stream(const mb_comm *comm) { return comm->stream; }
extern "C" int mb_comm_rank(const mb_comm *comm) { return comm->dist.rank; }
extern "C" int mb_comm_world_size(const mb_comm *comm) { return comm->dist.world_size; }

extern "C" int mb_comm_reduce_scatter(mb_comm *c, float *buffer, size_t slice_numel, mb_error *err) {
    if (usable(c, "reduce-scatter", err) != 0) return -1;
    float *own = buffer + (size_t)c->dist.rank * slice_numel;
    return settle(c, ncclReduceScatter(buffer, own, slice_numel, ncclFloat32, ncclSum, c->nccl, c->stream),
                  "reduce-scatter of gradients", err);
}

extern "C" int mb_comm_all_gather(mb_comm *c, float *buffer, size_t slice_numel, mb_error *err) {
    if (usable(c, "all-gather", err) != 0) return -1;
    const float *own = buffer + (size_t)c->dist.rank * slice_numel;
    return settle(c, ncclAllGather(own, buffer, slice_numel, ncclFloat32, c->nccl, c->stream),
                  "all-gather of parameters", err);
}

extern "C" int mb_comm_all_gather_into(mb_comm *c, const float *send, float *recv, size_t slice_numel,
                                       mb_error *err) {
    if (usable(c, "all-gather", err) != 0) return -1;
    return settle(c, ncclAllGather(send, recv, slice_numel, ncclFloat32, c->nccl, c->stream),
                  "all-gather of optimizer state", err);
}

extern "C" int mb_comm_all_reduce_doubles(mb_comm *c, double *values, size_t count, mb_error *err) {
    if (usable(c, "all-reduce", err) != 0) return -1;
    return settle(c, ncclAllReduce(values, values, count, ncclFloat64, ncclSum, c->nccl, c->stream), "all-reduce",
                  err);
}

extern "C" int mb_comm_wait_stream(mb_comm *c, cudaStream_t stream, const char *what, mb_error *err) {
    if (usable(c, what, err) != 0) return -1;
    double start = mb_monotonic_seconds();
    for (int spins = 0;; spins++) {
        cudaError_t status = cudaStreamQuery(stream);
        if (status == cudaSuccess) return 0;
        if (status != cudaErrorNotReady) {
            char message[1024];
            snprintf(message, sizeof message, "rank %d: %s: CUDA error %s", c->dist.rank, what,
                     cudaGetErrorString(status));
            return fail_and_abort(c, err, message);
        }
        if (check_health(c, what, start, err) != 0) return -1;
        pause_briefly(spins);
    }
}
