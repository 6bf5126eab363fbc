/* ZeRO-1 layout: how W data-parallel ranks split the gradient reduction and the optimizer state of one parameter
 * arena (model/params.h), and when each part of the gradient is final during the backward pass.
 *
 * Buckets. The arena (table.total_numel floats, padded with zeros to arena_numel) is cut into buckets
 * [begin, end) whose bounds are multiples of W·MB_ZERO_ALIGN. Bucket b is reduce-scattered as one NCCL call: rank r
 * receives the summed slice [begin + r·c, begin + (r+1)·c), c = (end − begin)/W, and owns it: it keeps m and v for
 * it, updates the master weights there, and all-gathers the result back into every rank's arena. A rank's shard is
 * the concatenation of its slices over the buckets (shard_numel = arena_numel / W floats).
 *
 * Readiness. The backward pass finishes gradients stage by stage: stage 0 = everything outside the encoder layers
 * (final norm, head, decoder), stage L − l = layer l, stage L + 1 = the embeddings (whose weight also receives the
 * tied decoder's gradient in stage 0). A bucket is final once the largest stage of any tensor it touches is done, and
 * is then reduced while the backward of the layers below continues. Bounds are tensor-stage boundaries rounded UP to
 * the alignment, so a bucket holds at most a few leading elements of the next (earlier-finished) stage.
 *
 * Pieces. The intersections of this rank's slices with the tensors of the table, in arena order: what the sharded
 * optimizer iterates (StableAdamW's per-tensor RMS is then summed over all ranks' pieces of a tensor). */
#ifndef MB_ZERO_PLAN_H
#define MB_ZERO_PLAN_H

#include <stddef.h>

#include "common/error.h"
#include "model/config.h"
#include "model/params.h"

#define MB_ZERO_ALIGN 64 /* elements: slices start on 256-byte boundaries */

typedef struct mb_zero_bucket {
    size_t begin, end;   /* arena range; (end − begin) is a multiple of W·MB_ZERO_ALIGN */
    size_t shard_offset; /* where this bucket's slice starts in a rank's shard */
    int ready_stage;     /* the backward stage after which the bucket's gradients are final */
} mb_zero_bucket;

typedef struct mb_zero_piece {
    int tensor;          /* index into the parameter table */
    size_t arena_offset; /* first element, in the arena */
    size_t shard_offset; /* the same element in this rank's shard */
    size_t numel;
} mb_zero_piece;

typedef struct mb_zero_plan {
    int world_size, rank, stage_count; /* stages 0 .. L + 1 */
    size_t arena_numel, shard_numel;
    int bucket_count;
    mb_zero_bucket *buckets; /* in arena order (issued in reverse: the top of the arena finishes first) */
    int piece_count;
    mb_zero_piece *pieces;
} mb_zero_plan;

/* The backward stage that finishes the gradient of parameter `name` (see above). */
int mb_zero_param_stage(const char *name, int num_layers);

/* bucket_numel: target size of a bucket in elements (e.g. 16 Mi: large enough for NCCL bandwidth, small enough to
 * overlap); a stage larger than that is still one bucket boundary apart at most per stage transition. */
int mb_zero_plan_build(mb_zero_plan *plan, const mb_param_table *table, int num_layers, int world_size, int rank,
                       size_t bucket_numel, mb_error *err);
void mb_zero_plan_free(mb_zero_plan *plan);

/* The slice of bucket b owned by `rank`: [begin, begin + count). */
static inline size_t mb_zero_slice_numel(const mb_zero_bucket *bucket, int world_size) {
    return (bucket->end - bucket->begin) / (size_t)world_size;
}
static inline size_t mb_zero_slice_begin(const mb_zero_bucket *bucket, int world_size, int rank) {
    return bucket->begin + (size_t)rank * mb_zero_slice_numel(bucket, world_size);
}

#endif
