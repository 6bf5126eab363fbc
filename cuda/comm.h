/* The NCCL side of data parallelism, callable from C (the CUDA backend) — the implementation of mb_dist
 * (src/dist/dist.h) for GPUs.
 *
 * One communicator and ONE stream carry every collective of a rank (gradient reduce-scatters, parameter
 * all-gathers, the small host-level sums), so all ranks issue them in the same order by construction; the compute
 * stream and the communication stream are ordered with events. The communicator is non-blocking: every NCCL call
 * and every host wait polls ncclCommGetAsyncError, the rendezvous liveness channel (a peer that died) and a timeout,
 * and aborts the communicator (ncclCommAbort) with an error naming the cause — never a silent hang. */
#ifndef MB_CUDA_COMM_H
#define MB_CUDA_COMM_H

#include <cuda_runtime_api.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* inside extern "C": the C headers have no guards of their own */
#include "common/error.h"
#include "dist/dist.h"

typedef struct mb_comm mb_comm;

/* The NCCL communicator behind an mb_dist made by mb_dist_create_nccl (NULL for anything else). */
mb_comm *mb_comm_of(mb_dist *dist);
cudaStream_t mb_comm_stream(const mb_comm *comm);
int mb_comm_rank(const mb_comm *comm);
int mb_comm_world_size(const mb_comm *comm);

/* In place over buffer[0 .. W·slice_numel): rank r's slice buffer[r·slice .. (r+1)·slice) ← Σ over ranks.
 * Enqueued on the comm stream. */
int mb_comm_reduce_scatter(mb_comm *comm, float *buffer, size_t slice_numel, mb_error *err);
/* In place: every rank's buffer[0 .. W·slice) ← the concatenation of each rank's own slice. */
int mb_comm_all_gather(mb_comm *comm, float *buffer, size_t slice_numel, mb_error *err);
/* Out of place: recv[0 .. W·slice) ← the concatenation of every rank's send[0 .. slice). */
int mb_comm_all_gather_into(mb_comm *comm, const float *send, float *recv, size_t slice_numel, mb_error *err);
/* values (device) ← Σ over ranks. */
int mb_comm_all_reduce_doubles(mb_comm *comm, double *values, size_t count, mb_error *err);
/* Blocks until `stream` has finished everything queued so far, polling for NCCL errors, failed peers and the
 * timeout (what names the operation in messages). */
int mb_comm_wait_stream(mb_comm *comm, cudaStream_t stream, const char *what, mb_error *err);

#ifdef __cplusplus
}
#endif

#endif
