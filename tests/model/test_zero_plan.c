/* The ZeRO-1 layout (model/zero_plan.h): for real model tables and several world sizes, the ranks' slices partition
 * the arena, the pieces cover every tensor exactly once and map to distinct shard positions, bucket bounds are
 * aligned, and no bucket is declared final before every tensor it touches has its gradient. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "model/config.h"
#include "model/params.h"
#include "model/zero_plan.h"

static void build_table(mb_param_table *table, mb_config *config, const char *preset, int tied, int biases) {
    mb_error err = {{0}};
    cr_assert_eq(mb_config_preset(config, preset, &err), 0, "%s", err.message);
    config->tie_word_embeddings = tied;
    config->norm_bias = biases;
    config->attention_bias = biases;
    config->mlp_bias = biases;
    config->decoder_bias = biases;
    cr_assert_eq(mb_config_finalize(config, &err), 0, "%s", err.message);
    cr_assert_eq(mb_param_table_build(table, config, &err), 0, "%s", err.message);
}

/* owner[k] = the rank whose slice holds arena element k (−1 = none yet). */
static void check_partition(const mb_param_table *table, const mb_config *config, int world, size_t bucket_numel) {
    mb_error err = {{0}};
    size_t arena = 0;
    signed char *owner = NULL;
    unsigned char *covered = calloc(table->total_numel, 1);
    for (int rank = 0; rank < world; rank++) {
        mb_zero_plan plan;
        cr_assert_eq(mb_zero_plan_build(&plan, table, config->num_hidden_layers, world, rank, bucket_numel, &err), 0,
                     "%s", err.message);
        if (rank == 0) {
            arena = plan.arena_numel;
            owner = malloc(arena);
            memset(owner, -1, arena);
            cr_assert(arena >= table->total_numel && arena % ((size_t)world * MB_ZERO_ALIGN) == 0);
            cr_assert_eq(plan.shard_numel * (size_t)world, arena);
        }
        cr_assert_eq(plan.arena_numel, arena, "every rank computes the same arena");
        cr_assert_eq(plan.buckets[0].begin, 0);
        cr_assert_eq(plan.buckets[plan.bucket_count - 1].end, arena);
        size_t shard_total = 0;
        for (int b = 0; b < plan.bucket_count; b++) {
            const mb_zero_bucket *bucket = &plan.buckets[b];
            cr_assert(bucket->end > bucket->begin);
            cr_assert_eq(bucket->begin % ((size_t)world * MB_ZERO_ALIGN), 0, "bucket %d misaligned", b);
            if (b > 0) cr_assert_eq(bucket->begin, plan.buckets[b - 1].end, "buckets are contiguous");
            cr_assert_eq(bucket->shard_offset, shard_total);
            shard_total += mb_zero_slice_numel(bucket, world);
            size_t begin = mb_zero_slice_begin(bucket, world, rank);
            for (size_t k = begin; k < begin + mb_zero_slice_numel(bucket, world); k++) {
                cr_assert_eq(owner[k], -1, "element %zu owned twice (W=%d)", k, world);
                owner[k] = (signed char)rank;
            }
            /* readiness: no tensor touching the bucket finishes after the bucket's stage */
            for (int i = 0; i < table->count; i++) {
                const mb_param_info *p = &table->params[i];
                if (p->offset < bucket->end && p->offset + p->numel > bucket->begin)
                    cr_assert_leq(mb_zero_param_stage(p->name, config->num_hidden_layers), bucket->ready_stage,
                                  "bucket %d is reduced before '%s' is final", b, p->name);
            }
            /* all but the bottom bucket reach the target size */
            if (b > 0) cr_assert_geq(bucket->end - bucket->begin, bucket_numel < arena ? 1 : 0);
        }
        cr_assert_eq(shard_total, plan.shard_numel);
        unsigned char *shard_used = calloc(plan.shard_numel, 1);
        for (int k = 0; k < plan.piece_count; k++) {
            const mb_zero_piece *piece = &plan.pieces[k];
            const mb_param_info *p = &table->params[piece->tensor];
            cr_assert(piece->arena_offset >= p->offset && piece->arena_offset + piece->numel <= p->offset + p->numel,
                      "piece %d lies outside '%s'", k, p->name);
            cr_assert(piece->shard_offset + piece->numel <= plan.shard_numel);
            if (k > 0 && plan.pieces[k - 1].tensor != piece->tensor)
                for (int j = 0; j < k; j++)
                    cr_assert_neq(plan.pieces[j].tensor, piece->tensor, "pieces of '%s' are not consecutive", p->name);
            for (size_t e = 0; e < piece->numel; e++) {
                cr_assert_eq(owner[piece->arena_offset + e], rank, "piece element not in this rank's slice");
                cr_assert_eq(covered[piece->arena_offset + e], 0, "element %zu in two pieces", piece->arena_offset + e);
                covered[piece->arena_offset + e] = 1;
                cr_assert_eq(shard_used[piece->shard_offset + e], 0);
                shard_used[piece->shard_offset + e] = 1;
            }
            /* the shard position is the slice position: arena = slice begin + (shard − bucket shard offset) */
            int found = 0;
            for (int b = 0; b < plan.bucket_count && !found; b++) {
                const mb_zero_bucket *bucket = &plan.buckets[b];
                size_t begin = mb_zero_slice_begin(bucket, world, rank), count = mb_zero_slice_numel(bucket, world);
                if (piece->arena_offset >= begin && piece->arena_offset < begin + count) {
                    cr_assert_eq(piece->shard_offset, bucket->shard_offset + (piece->arena_offset - begin));
                    found = 1;
                }
            }
            cr_assert(found);
        }
        free(shard_used);
        mb_zero_plan_free(&plan);
    }
    for (size_t k = 0; k < arena; k++) cr_assert_neq(owner[k], -1, "element %zu owned by nobody (W=%d)", k, world);
    for (size_t k = 0; k < table->total_numel; k++)
        cr_assert_eq(covered[k], 1, "parameter element %zu in no piece (W=%d)", k, world);
    free(owner);
    free(covered);
}

Test(zero_plan, tiny_every_world_size) {
    mb_config config;
    mb_param_table table;
    build_table(&table, &config, "tiny", 1, 0);
    const int worlds[] = {1, 2, 3, 4, 5, 8};
    for (size_t w = 0; w < sizeof worlds / sizeof worlds[0]; w++) {
        check_partition(&table, &config, worlds[w], 1 << 16);
        check_partition(&table, &config, worlds[w], 1);          /* one bucket per stage transition */
        check_partition(&table, &config, worlds[w], (size_t)1 << 40); /* one bucket */
    }
    mb_param_table_free(&table);
}

Test(zero_plan, untied_decoder_with_biases) {
    mb_config config;
    mb_param_table table;
    build_table(&table, &config, "tiny", 0, 1);
    check_partition(&table, &config, 3, 1 << 15);
    check_partition(&table, &config, 4, 1 << 17);
    mb_param_table_free(&table);
}

Test(zero_plan, base_buckets_follow_the_backward) {
    mb_config config;
    mb_param_table table;
    build_table(&table, &config, "base", 1, 0);
    mb_error err = {{0}};
    mb_zero_plan plan;
    size_t target = (size_t)16 << 20;
    cr_assert_eq(mb_zero_plan_build(&plan, &table, config.num_hidden_layers, 4, 1, target, &err), 0, "%s", err.message);
    cr_assert_geq(plan.bucket_count, 4, "base should be split into several buckets, got %d", plan.bucket_count);
    /* the top of the arena (head, last layers) finishes first: stages fall as offsets rise */
    for (int b = 1; b < plan.bucket_count; b++)
        cr_assert_leq(plan.buckets[b].ready_stage, plan.buckets[b - 1].ready_stage);
    cr_assert_eq(plan.buckets[0].ready_stage, config.num_hidden_layers + 1, "the embeddings bucket is last");
    for (int b = 1; b < plan.bucket_count; b++)
        cr_assert_geq(plan.buckets[b].end - plan.buckets[b].begin, target, "bucket %d is below the target", b);
    mb_zero_plan_free(&plan);
    check_partition(&table, &config, 4, target);
    mb_param_table_free(&table);
}

Test(zero_plan, rejects_bad_ranks) {
    mb_config config;
    mb_param_table table;
    build_table(&table, &config, "tiny", 1, 0);
    mb_error err = {{0}};
    mb_zero_plan plan;
    cr_assert_eq(mb_zero_plan_build(&plan, &table, config.num_hidden_layers, 2, 2, 1 << 16, &err), -1);
    cr_assert(strstr(err.message, "rank 2 of world size 2") != NULL, "%s", err.message);
    cr_assert_eq(mb_zero_plan_build(&plan, &table, config.num_hidden_layers, 0, 0, 1 << 16, &err), -1);
    mb_param_table_free(&table);
}

Test(zero_plan, stages) {
    cr_assert_eq(mb_zero_param_stage("model.layers.0.attn.Wqkv.weight", 22), 22);
    cr_assert_eq(mb_zero_param_stage("model.layers.21.mlp.Wo.weight", 22), 1);
    cr_assert_eq(mb_zero_param_stage("model.embeddings.tok_embeddings.weight", 22), 23);
    cr_assert_eq(mb_zero_param_stage("model.final_norm.weight", 22), 0);
    cr_assert_eq(mb_zero_param_stage("head.dense.weight", 22), 0);
}
