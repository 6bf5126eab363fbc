/* The backend boundary (the "ops interface"): a backend implements the whole ModernBERT training step.
 *
 * Code above this line (trainer, fine-tuning, check, eval) never knows which backend runs: it hands packed batches
 * in, reads losses back, asks for an optimizer step, and moves parameters and optimizer state in and out as fp32
 * host arenas laid out by the parameter table (model/params.h). Inside, a backend is free to fuse and to keep its
 * own precision (the CPU backend is plain fp32; the CUDA backend keeps bf16 copies, fp32 masters and fp32 grads). */
#ifndef MB_BACKEND_H
#define MB_BACKEND_H

#include <stddef.h>

#include "common/error.h"
#include "cpu/model_cpu.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/params.h"
#include "train/stableadamw.h"

typedef struct mb_backend mb_backend;

/* Which activations the backward rebuilds instead of keeping them from the forward (a memory-for-time trade; the
 * results are bit-identical at every level). Per token and layer of ModernBERT-base the CUDA backend keeps 19.3 KB
 * at NONE, 13.9 KB at NORMS and 9.3 KB at MLP (docs/performance.md, "Memory"). */
typedef enum mb_recompute {
    MB_RECOMPUTE_NONE = 0,  /* keep everything */
    MB_RECOMPUTE_NORMS = 1, /* rebuild the LayerNorm outputs and the GLU product (two cheap memory-bound passes) */
    MB_RECOMPUTE_MLP = 2,   /* also the Wi product (one more GEMM per layer: ~1/9 of the layer's training FLOPs) */
} mb_recompute;
struct mb_dist; /* dist/dist.h */

typedef struct mb_backend_ops {
    const char *name;
    void (*destroy)(mb_backend *backend);
    /* Runs the forward pass; the result's loss_sum/loss_count and logits stay valid until the next call. */
    int (*forward)(mb_backend *backend, const mb_batch *batch, mb_forward_result *result, mb_error *err);
    /* Accumulates grad_scale · d(loss_sum)/dθ into the gradients (call after forward on the same batch). */
    int (*backward)(mb_backend *backend, float grad_scale, mb_error *err);
    int (*zero_grads)(mb_backend *backend, mb_error *err);
    /* Global L2 norm of the accumulated gradients (NaN/Inf when any gradient is not finite). */
    int (*grad_norm)(mb_backend *backend, double *norm, mb_error *err);
    /* One StableAdamW step with learning rate lr; opt->step advances. */
    int (*optimizer_step)(mb_backend *backend, mb_stableadamw *opt, double lr, mb_error *err);
    /* fp32 host arenas of table.total_numel floats. */
    int (*read_params)(mb_backend *backend, float *host, mb_error *err);
    int (*write_params)(mb_backend *backend, const float *host, mb_error *err);
    int (*read_grads)(mb_backend *backend, float *host, mb_error *err);
    int (*read_optimizer_state)(mb_backend *backend, float *m, float *v, mb_error *err);
    int (*write_optimizer_state)(mb_backend *backend, const float *m, const float *v, mb_error *err);
    /* Phase changes: new RoPE thetas for the global and the sliding-window layers. */
    int (*set_rope_theta)(mb_backend *backend, double global_theta, double local_theta, mb_error *err);
    /* One line: what memory the backend holds. */
    void (*memory_report)(mb_backend *backend, char *out, size_t size);
    /* Optional (NULL when the backend has nothing to size): allocate activation memory for micro-batches of up to
     * max_tokens tokens, max_sequences sequences and max_head_rows labelled rows before the first step, so the step
     * loop never allocates (a larger batch later still works: the arena grows once). */
    int (*reserve)(mb_backend *backend, int max_tokens, int max_sequences, int max_head_rows, mb_error *err);
    /* Optional: the device's name (for the MFU peak table); 0 on success. */
    int (*device_name)(mb_backend *backend, char *out, size_t size);
    /* Optional, data parallelism (NULL: the backend runs on one device only). Joins a fresh backend to the group:
     * from then on the gradients are summed over ranks, the optimizer state is sharded (ZeRO-1) and every
     * optimizer_step leaves the same parameters on every rank. read_optimizer_state becomes a collective that
     * returns the full state on every rank; write_optimizer_state takes the full state and keeps this rank's part.
     * Call before write_params. */
    int (*attach_dist)(mb_backend *backend, struct mb_dist *dist, mb_error *err);
    /* Data parallelism: the next backward is the step's last; it starts reducing each bucket of gradients as soon as
     * the bucket is final. grad_norm completes the reduction (so a rank without a backward this step still joins). */
    int (*begin_grad_sync)(mb_backend *backend, mb_error *err);
    /* Optional profiling (CUDA with MB_PROFILE=1): device time per op family so far, one line each, into out;
     * reset != 0 clears the tally. Returns -1 when the backend is not profiling. */
    int (*profile)(mb_backend *backend, int reset, char *out, size_t size);
    /* Optional (NULL: the backend keeps every activation, as the CPU reference does): the mb_recompute level. Call
     * before reserve; a later change re-carves the activation memory at the next forward. */
    int (*set_recompute)(mb_backend *backend, mb_recompute level, mb_error *err);
    /* Optional (NULL: every op returns with its work done, as the CPU reference's do): waits until the work queued
     * so far is complete (forward, backward and optimizer_step may return before their device work ends). */
    int (*synchronize)(mb_backend *backend, mb_error *err);
} mb_backend_ops;

struct mb_backend {
    const mb_backend_ops *ops;
    mb_config config;
    mb_param_table table;
    void *impl;
};

/* The CPU fp32 reference backend. Parameters start at zero: write_params or init them. */
int mb_backend_create_cpu(mb_backend **backend, const mb_config *config, mb_error *err);
/* Creates the backend named "cpu", "cuda" or "auto" (cuda when a GPU is usable and the CUDA backend is built). */
int mb_backend_create(mb_backend **backend, const char *name, const mb_config *config, mb_error *err);
void mb_backend_destroy(mb_backend *backend);
/* Sets the recompute level where the backend has one (a no-op returning 0 where it keeps everything). */
int mb_backend_set_recompute(mb_backend *backend, mb_recompute level, mb_error *err);
/* Waits until the backend's queued device work is complete (a no-op returning 0 where every op is synchronous). */
int mb_backend_synchronize(mb_backend *backend, mb_error *err);
/* "none", "norms", "mlp" (for configs and command lines); -1 for other names. */
int mb_recompute_from_name(const char *name, mb_recompute *level);
const char *mb_recompute_name(mb_recompute level);
/* The dense bf16 peak of the device the backend runs on (FLOP/s, for MFU), or 0 when unknown or on the CPU. */
double mb_backend_peak_flops(mb_backend *backend);

#endif
