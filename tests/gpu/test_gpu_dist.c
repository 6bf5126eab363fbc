/* ZeRO-1's sharded StableAdamW on one GPU: W simulated ranks each own the pieces of the tiny model's tensors that the
 * plan (model/zero_plan.h) gives them; their per-tensor sums are added across "ranks" on the host (what the NCCL
 * all-reduce does), and the result must be the update of the unsharded optimizer: m and v bit for bit (the same
 * elementwise operations), parameters up to the rounding of the RMS sum's order, and the squared gradient norm
 * summed over ranks equal to the single optimizer's norm². Skips without a GPU. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "cuda/ops.h"
#include "model/config.h"
#include "model/params.h"
#include "model/zero_plan.h"
#include "train/stableadamw.h"

#define MAX_RANKS 4

static float *device_copy(const float *host, size_t count) {
    float *pointer = NULL;
    cr_assert_eq(cudaMalloc((void **)&pointer, count * sizeof(float)), cudaSuccess);
    cr_assert_eq(cudaMemcpy(pointer, host, count * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    return pointer;
}

static float *host_copy(const float *device, size_t count) {
    float *host = malloc(count * sizeof(float));
    cr_assert_eq(cudaMemcpy(host, device, count * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
}

typedef struct whole_model {
    mb_param_table table;
    size_t arena;                /* padded for the plans */
    float *param, *grad, *m, *v; /* device, arena floats (m, v: the unsharded optimizer's) */
} whole_model;

static void run_sharded(int world, const whole_model *reference_in, const float *params0, const float *grads,
                        int steps) {
    mb_error err = {{0}};
    const mb_param_table *table = &reference_in->table;
    size_t N = table->total_numel, arena = reference_in->arena;
    cudaStream_t stream;
    cr_assert_eq(cudaStreamCreate(&stream), cudaSuccess);
    /* the reference: one optimizer over whole tensors */
    float *ref_param = device_copy(params0, arena), *ref_grad = device_copy(grads, arena);
    float *ref_m, *ref_v;
    cudaMalloc((void **)&ref_m, arena * sizeof(float));
    cudaMalloc((void **)&ref_v, arena * sizeof(float));
    cudaMemset(ref_m, 0, arena * sizeof(float));
    cudaMemset(ref_v, 0, arena * sizeof(float));
    mb_cuda_adamw_tensor *whole = calloc((size_t)table->count, sizeof *whole);
    for (int i = 0; i < table->count; i++) {
        const mb_param_info *p = &table->params[i];
        whole[i] = (mb_cuda_adamw_tensor){ref_param + p->offset, ref_grad + p->offset, ref_m + p->offset,
                                          ref_v + p->offset, NULL, p->numel, p->decays, i};
    }
    mb_cuda_adamw *reference;
    cr_assert_eq(mb_cuda_adamw_create(&reference, whole, table->count, &err), 0, "%s", err.message);
    /* the ranks: shared parameter and gradient arenas (disjoint pieces), own m and v shards */
    float *param = device_copy(params0, arena), *grad = device_copy(grads, arena);
    mb_zero_plan plans[MAX_RANKS];
    mb_cuda_adamw *ranks[MAX_RANKS];
    float *m_shard[MAX_RANKS], *v_shard[MAX_RANKS];
    mb_cuda_adamw_group *groups = calloc((size_t)table->count, sizeof *groups);
    for (int i = 0; i < table->count; i++) groups[i] = (mb_cuda_adamw_group){table->params[i].numel, table->params[i].decays};
    for (int r = 0; r < world; r++) {
        cr_assert_eq(mb_zero_plan_build(&plans[r], table, 2, world, r, 1 << 14, &err), 0, "%s", err.message);
        cr_assert_eq(plans[r].arena_numel, arena);
        size_t shard = plans[r].shard_numel;
        cudaMalloc((void **)&m_shard[r], shard * sizeof(float));
        cudaMalloc((void **)&v_shard[r], shard * sizeof(float));
        cudaMemset(m_shard[r], 0, shard * sizeof(float));
        cudaMemset(v_shard[r], 0, shard * sizeof(float));
        mb_cuda_adamw_tensor *pieces = calloc((size_t)plans[r].piece_count + 1, sizeof *pieces);
        for (int k = 0; k < plans[r].piece_count; k++) {
            const mb_zero_piece *piece = &plans[r].pieces[k];
            pieces[k] = (mb_cuda_adamw_tensor){param + piece->arena_offset, grad + piece->arena_offset,
                                               m_shard[r] + piece->shard_offset, v_shard[r] + piece->shard_offset,
                                               NULL, piece->numel, groups[piece->tensor].decay, piece->tensor};
        }
        cr_assert_eq(mb_cuda_adamw_create_grouped(&ranks[r], pieces, plans[r].piece_count, groups, table->count, &err),
                     0, "%s", err.message);
        free(pieces);
    }
    /* gradient norm: Σ over ranks of the squared sums = the reference's norm² */
    double *device_value;
    cudaMalloc((void **)&device_value, sizeof(double));
    double reference_norm = 0.0, square_total = 0.0, value = 0.0;
    cr_assert_eq(mb_cuda_grad_norm(reference, device_value, stream, &err), 0, "%s", err.message);
    cudaMemcpy(&reference_norm, device_value, sizeof(double), cudaMemcpyDeviceToHost);
    for (int r = 0; r < world; r++) {
        cr_assert_eq(mb_cuda_grad_square_sum(ranks[r], device_value, stream, &err), 0, "%s", err.message);
        cudaMemcpy(&value, device_value, sizeof(double), cudaMemcpyDeviceToHost);
        square_total += value;
    }
    cr_assert_float_eq(sqrt(square_total), reference_norm, 1e-12 * reference_norm, "W=%d: norm %.17g vs %.17g",
                       world, sqrt(square_total), reference_norm);
    /* optimizer steps */
    mb_stableadamw opt_reference, opt[MAX_RANKS];
    mb_stableadamw_init(&opt_reference, 1e-3, 0.01);
    for (int r = 0; r < world; r++) opt[r] = opt_reference;
    double *sums = calloc((size_t)table->count, sizeof *sums), *part = calloc((size_t)table->count, sizeof *part);
    for (int step = 0; step < steps; step++) {
        cr_assert_eq(mb_cuda_adamw_step(reference, &opt_reference, 2e-3, stream, &err), 0, "%s", err.message);
        memset(sums, 0, (size_t)table->count * sizeof *sums);
        for (int r = 0; r < world; r++) {
            cr_assert_eq(mb_cuda_adamw_moments(ranks[r], &opt[r], stream, &err), 0, "%s", err.message);
            cudaMemcpy(part, mb_cuda_adamw_group_sums(ranks[r]), (size_t)table->count * sizeof(double),
                       cudaMemcpyDeviceToHost);
            for (int i = 0; i < table->count; i++) sums[i] += part[i];
        }
        for (int r = 0; r < world; r++) {
            cudaMemcpy(mb_cuda_adamw_group_sums(ranks[r]), sums, (size_t)table->count * sizeof(double),
                       cudaMemcpyHostToDevice);
            cr_assert_eq(mb_cuda_adamw_apply(ranks[r], &opt[r], 2e-3, stream, &err), 0, "%s", err.message);
            cr_assert_eq(opt[r].step, opt_reference.step);
        }
        cr_assert_eq(cudaStreamSynchronize(stream), cudaSuccess);
    }
    /* compare */
    float *want_param = host_copy(ref_param, N), *got_param = host_copy(param, N);
    float *want_m = host_copy(ref_m, N), *want_v = host_copy(ref_v, N);
    double worst = 0.0;
    for (size_t k = 0; k < N; k++) {
        double scale = fabs(want_param[k]) > 1e-3 ? fabs(want_param[k]) : 1e-3;
        double error = fabs((double)got_param[k] - want_param[k]) / scale;
        if (error > worst) worst = error;
    }
    cr_assert_lt(worst, 1e-5, "W=%d: parameters differ by %.3g (relative)", world, worst);
    for (int r = 0; r < world; r++) {
        float *m_got = host_copy(m_shard[r], plans[r].shard_numel), *v_got = host_copy(v_shard[r], plans[r].shard_numel);
        for (int k = 0; k < plans[r].piece_count; k++) {
            const mb_zero_piece *piece = &plans[r].pieces[k];
            cr_assert_eq(memcmp(m_got + piece->shard_offset, want_m + piece->arena_offset, piece->numel * sizeof(float)),
                         0, "W=%d rank %d: m differs in '%s'", world, r, table->params[piece->tensor].name);
            cr_assert_eq(memcmp(v_got + piece->shard_offset, want_v + piece->arena_offset, piece->numel * sizeof(float)),
                         0, "W=%d rank %d: v differs in '%s'", world, r, table->params[piece->tensor].name);
        }
        free(m_got);
        free(v_got);
        mb_cuda_adamw_destroy(ranks[r]);
        mb_zero_plan_free(&plans[r]);
        cudaFree(m_shard[r]);
        cudaFree(v_shard[r]);
    }
    cr_log_info("W=%d: %d steps, worst relative parameter difference %.3g, m and v identical", world, steps, worst);
    free(want_param);
    free(got_param);
    free(want_m);
    free(want_v);
    free(sums);
    free(part);
    free(groups);
    free(whole);
    mb_cuda_adamw_destroy(reference);
    cudaFree(ref_param);
    cudaFree(ref_grad);
    cudaFree(ref_m);
    cudaFree(ref_v);
    cudaFree(param);
    cudaFree(grad);
    cudaFree(device_value);
    cudaStreamDestroy(stream);
}

Test(gpu_dist, sharded_stableadamw_equals_whole_tensors) {
    mb_error err = {{0}};
    mb_config config;
    cr_assert_eq(mb_config_preset(&config, "tiny", &err), 0, "%s", err.message);
    config.num_hidden_layers = 2;  /* tensors of very different sizes (6.4M-float embeddings, 128-float norms) */
    cr_assert_eq(mb_config_finalize(&config, &err), 0, "%s", err.message);
    whole_model model = {0};
    cr_assert_eq(mb_param_table_build(&model.table, &config, &err), 0, "%s", err.message);
    size_t N = model.table.total_numel;
    const int worlds[] = {1, 2, 3, 4};
    for (size_t w = 0; w < sizeof worlds / sizeof worlds[0]; w++) {
        mb_zero_plan probe;
        cr_assert_eq(mb_zero_plan_build(&probe, &model.table, 2, worlds[w], 0, 1 << 14, &err), 0, "%s", err.message);
        size_t arena = probe.arena_numel;
        mb_zero_plan_free(&probe);
        float *params0 = calloc(arena, sizeof(float)), *grads = calloc(arena, sizeof(float));
        mb_rng rng;
        mb_rng_seed(&rng, 1234 + (uint64_t)w);
        for (size_t k = 0; k < N; k++) {
            params0[k] = (float)(0.02 * mb_rng_normal(&rng));
            grads[k] = (float)(1e-3 * mb_rng_normal(&rng) * (1 + (k % 7)));
        }
        whole_model sized = model;
        sized.arena = arena;
        run_sharded(worlds[w], &sized, params0, grads, 3);
        free(params0);
        free(grads);
    }
    mb_param_table_free(&model.table);
}
