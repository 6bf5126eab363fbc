/* TCP rendezvous and liveness channel of a multi-process run: a star with rank 0 as the hub.
 *
 * Wire format: every message is a frame  {u32 type, u32 length, length bytes}  (big-endian). Peers send HELLO
 * {magic "MBRZ", protocol version, rank, world size, pid, hostname[64]}; the hub answers BLOB (the caller's bytes,
 * e.g. the 128-byte NCCL unique id) then TABLE (pid + hostname[64] for every rank), or REJECT (text) when the
 * rendezvous fails (wrong world size, duplicate rank, timeout, ...). The connections then stay open as a liveness
 * channel: FAIL (text) reports a failure, GOODBYE announces a clean close. A connection that reaches EOF without a
 * GOODBYE means the process at the other end died. The hub relays every peer failure to the other peers, so a death
 * anywhere reaches everyone within one round trip. */
#ifndef MB_DIST_RENDEZVOUS_H
#define MB_DIST_RENDEZVOUS_H

#include <stddef.h>

#include "common/error.h"
#include "dist/env.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mb_rendezvous mb_rendezvous;

/* Rank 0: listens on master_port (SO_REUSEADDR, all interfaces, IPv6 dual-stack when available), accepts world−1
 * peers, checks their hellos (duplicate rank, wrong world size → error naming both), then sends `blob` (blob_size
 * bytes) and the host/pid table to every peer. Other ranks: connect to master_addr:master_port (getaddrinfo: host names,
 * IPv4, IPv6), retrying every 100–500 ms until the timeout, send hello and receive blob_size bytes into `blob`.
 * timeout_seconds bounds the whole exchange; on timeout rank 0's error lists the ranks that never arrived and the
 * others' error names the address they could not reach. After success a background thread watches the connections.
 * world_size 1: succeeds without any socket. */
int mb_rendezvous_open(mb_rendezvous **out, const mb_dist_env *env, void *blob, size_t blob_size,
                       double timeout_seconds, mb_error *err);

/* 0 while all is well; 1 once a peer failed (died without goodbye, or reported a failure). `why` (may be NULL) gets one
 * line naming the rank, its host and pid, e.g. "rank 3 (host node2, pid 4242) closed its connection without saying
 * goodbye (the process died?)". The first failure seen is kept. Non-blocking and thread-safe: one atomic load while
 * nothing has failed. */
int mb_rendezvous_failed(mb_rendezvous *rv, char *why, size_t size);

/* This rank is failing: tells the others (through the hub) so that they print the real cause. Non-blocking best
 * effort (each send waits at most 100 ms for socket space). */
void mb_rendezvous_report_failure(mb_rendezvous *rv, const char *message);

/* Clean end: sends goodbye, stops the thread, closes the sockets, frees. rv may be NULL. */
void mb_rendezvous_close(mb_rendezvous *rv);

int mb_rendezvous_rank(const mb_rendezvous *rv);
int mb_rendezvous_world_size(const mb_rendezvous *rv);

#ifdef __cplusplus
}
#endif

#endif
