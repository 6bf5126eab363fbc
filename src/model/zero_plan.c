/* ZeRO-1 layout (see zero_plan.h): buckets at stage boundaries, slices per rank, pieces per tensor. */
#include "model/zero_plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int mb_zero_param_stage(const char *name, int num_layers) {
    int layer;
    if (sscanf(name, "model.layers.%d.", &layer) == 1) return num_layers - layer;
    if (strncmp(name, "model.embeddings.", 17) == 0) return num_layers + 1;
    return 0;
}

static size_t round_up(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

/* Candidate bounds: every start of a tensor whose stage differs from the previous tensor's, rounded up. Then, walking
 * down from the top of the arena, a bucket closes at the first candidate that makes it at least bucket_numel long. */
static int choose_bounds(const mb_param_table *table, int num_layers, size_t unit, size_t arena_numel,
                         size_t bucket_numel, size_t *bounds, int *bound_count) {
    int candidates = 0;
    size_t *candidate = malloc(((size_t)table->count + 2) * sizeof *candidate);
    if (candidate == NULL) return -1;
    candidate[candidates++] = 0;
    for (int i = 1; i < table->count; i++) {
        if (mb_zero_param_stage(table->params[i].name, num_layers) ==
            mb_zero_param_stage(table->params[i - 1].name, num_layers))
            continue;
        size_t bound = round_up(table->params[i].offset, unit);
        if (bound > candidate[candidates - 1] && bound < arena_numel) candidate[candidates++] = bound;
    }
    int count = 0;
    size_t top = arena_numel;
    bounds[count++] = arena_numel;
    for (int i = candidates - 1; i >= 1; i--) {
        if (top - candidate[i] < bucket_numel) continue;
        bounds[count++] = candidate[i];
        top = candidate[i];
    }
    bounds[count++] = 0;
    free(candidate);
    /* bounds were collected top-down: reverse into arena order */
    for (int i = 0; i < count / 2; i++) {
        size_t swap = bounds[i];
        bounds[i] = bounds[count - 1 - i];
        bounds[count - 1 - i] = swap;
    }
    *bound_count = count;
    return 0;
}

static int bucket_ready_stage(const mb_param_table *table, int num_layers, size_t begin, size_t end) {
    int stage = 0;
    for (int i = 0; i < table->count; i++) {
        const mb_param_info *p = &table->params[i];
        if (p->offset < end && p->offset + p->numel > begin) {
            int s = mb_zero_param_stage(p->name, num_layers);
            if (s > stage) stage = s;
        }
    }
    return stage;
}

static int add_pieces(mb_zero_plan *plan, const mb_param_table *table, mb_error *err) {
    size_t capacity = (size_t)table->count + (size_t)plan->bucket_count + 1;
    plan->pieces = calloc(capacity, sizeof *plan->pieces);
    if (plan->pieces == NULL) return mb_fail(err, "zero plan: out of memory");
    for (int b = 0; b < plan->bucket_count; b++) {
        const mb_zero_bucket *bucket = &plan->buckets[b];
        size_t slice_begin = mb_zero_slice_begin(bucket, plan->world_size, plan->rank);
        size_t slice_end = slice_begin + mb_zero_slice_numel(bucket, plan->world_size);
        for (int i = 0; i < table->count; i++) {
            const mb_param_info *p = &table->params[i];
            size_t lo = p->offset > slice_begin ? p->offset : slice_begin;
            size_t hi = p->offset + p->numel < slice_end ? p->offset + p->numel : slice_end;
            if (lo >= hi) continue;
            if ((size_t)plan->piece_count == capacity) {
                capacity *= 2;
                mb_zero_piece *grown = realloc(plan->pieces, capacity * sizeof *grown);
                if (grown == NULL) return mb_fail(err, "zero plan: out of memory");
                plan->pieces = grown;
            }
            plan->pieces[plan->piece_count++] =
                (mb_zero_piece){i, lo, bucket->shard_offset + (lo - slice_begin), hi - lo};
        }
    }
    return 0;
}

int mb_zero_plan_build(mb_zero_plan *plan, const mb_param_table *table, int num_layers, int world_size, int rank,
                       size_t bucket_numel, mb_error *err) {
    memset(plan, 0, sizeof *plan);
    if (world_size < 1 || rank < 0 || rank >= world_size)
        return mb_fail(err, "zero plan: rank %d of world size %d", rank, world_size);
    if (table->count < 1 || table->total_numel == 0) return mb_fail(err, "zero plan: empty parameter table");
    for (int i = 1; i < table->count; i++)
        if (table->params[i].offset != table->params[i - 1].offset + table->params[i - 1].numel)
            return mb_fail(err, "zero plan: the parameter table is not contiguous at '%s'", table->params[i].name);
    size_t unit = (size_t)world_size * MB_ZERO_ALIGN;
    plan->world_size = world_size;
    plan->rank = rank;
    plan->stage_count = num_layers + 2;
    plan->arena_numel = round_up(table->total_numel, unit);
    plan->shard_numel = plan->arena_numel / (size_t)world_size;
    size_t *bounds = malloc(((size_t)table->count + 3) * sizeof *bounds);
    int bound_count = 0;
    if (bounds == NULL || choose_bounds(table, num_layers, unit, plan->arena_numel, bucket_numel, bounds,
                                        &bound_count) != 0) {
        free(bounds);
        return mb_fail(err, "zero plan: out of memory");
    }
    plan->bucket_count = bound_count - 1;
    plan->buckets = calloc((size_t)plan->bucket_count, sizeof *plan->buckets);
    if (plan->buckets == NULL) {
        free(bounds);
        return mb_fail(err, "zero plan: out of memory");
    }
    size_t shard_offset = 0;
    for (int b = 0; b < plan->bucket_count; b++) {
        mb_zero_bucket *bucket = &plan->buckets[b];
        bucket->begin = bounds[b];
        bucket->end = bounds[b + 1];
        bucket->shard_offset = shard_offset;
        bucket->ready_stage = bucket_ready_stage(table, num_layers, bucket->begin, bucket->end);
        shard_offset += mb_zero_slice_numel(bucket, world_size);
    }
    free(bounds);
    if (add_pieces(plan, table, err) != 0) {
        mb_zero_plan_free(plan);
        return -1;
    }
    return 0;
}

void mb_zero_plan_free(mb_zero_plan *plan) {
    free(plan->buckets);
    free(plan->pieces);
    memset(plan, 0, sizeof *plan);
}
