/* The CPU backend: the fp32 reference model behind the backend boundary. Parameters, gradients and the optimizer's
 * moments are four arenas laid out by the parameter table; the tied decoder shares the embedding's storage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/backend.h"

typedef struct cpu_backend {
    float *params, *grads, *m, *v;
    mb_cpu_model *model;
    mb_adamw_param *adamw;  /* one entry per table tensor, pointing into the arenas */
} cpu_backend;

static cpu_backend *impl_of(mb_backend *b) { return b->impl; }
static size_t arena_bytes(const mb_backend *b) { return b->table.total_numel * sizeof(float); }

static void cpu_destroy(mb_backend *b) {
    cpu_backend *c = impl_of(b);
    if (c != NULL) {
        mb_cpu_model_free(c->model);
        free(c->params);
        free(c->grads);
        free(c->m);
        free(c->v);
        free(c->adamw);
        free(c);
    }
    mb_param_table_free(&b->table);
    free(b);
}

static int cpu_forward(mb_backend *b, const mb_batch *batch, mb_forward_result *result, mb_error *err) {
    return mb_cpu_forward(impl_of(b)->model, batch, result, err);
}

static int cpu_backward(mb_backend *b, float grad_scale, mb_error *err) {
    return mb_cpu_backward(impl_of(b)->model, grad_scale, err);
}

static int cpu_zero_grads(mb_backend *b, mb_error *err) {
    (void)err;
    memset(impl_of(b)->grads, 0, arena_bytes(b));
    return 0;
}

static int cpu_grad_norm(mb_backend *b, double *norm, mb_error *err) {
    (void)err;
    *norm = mb_grad_norm(impl_of(b)->adamw, (size_t)b->table.count);
    return 0;
}

static int cpu_optimizer_step(mb_backend *b, mb_stableadamw *opt, double lr, mb_error *err) {
    return mb_stableadamw_step(opt, impl_of(b)->adamw, (size_t)b->table.count, lr, NULL, err);
}

static int cpu_read_params(mb_backend *b, float *host, mb_error *err) {
    (void)err;
    memcpy(host, impl_of(b)->params, arena_bytes(b));
    return 0;
}

static int cpu_write_params(mb_backend *b, const float *host, mb_error *err) {
    (void)err;
    memcpy(impl_of(b)->params, host, arena_bytes(b));
    return 0;
}

static int cpu_read_grads(mb_backend *b, float *host, mb_error *err) {
    (void)err;
    memcpy(host, impl_of(b)->grads, arena_bytes(b));
    return 0;
}

static int cpu_read_optimizer_state(mb_backend *b, float *m, float *v, mb_error *err) {
    (void)err;
    memcpy(m, impl_of(b)->m, arena_bytes(b));
    memcpy(v, impl_of(b)->v, arena_bytes(b));
    return 0;
}

static int cpu_write_optimizer_state(mb_backend *b, const float *m, const float *v, mb_error *err) {
    (void)err;
    memcpy(impl_of(b)->m, m, arena_bytes(b));
    memcpy(impl_of(b)->v, v, arena_bytes(b));
    return 0;
}

static int cpu_set_rope_theta(mb_backend *b, double global_theta, double local_theta, mb_error *err) {
    if (!(global_theta > 0) || !(local_theta > 0)) return mb_fail(err, "RoPE theta must be positive");
    b->config.global_rope_theta = global_theta;
    b->config.local_rope_theta = local_theta;
    mb_cpu_model_set_rope_theta(impl_of(b)->model, global_theta, local_theta);
    return 0;
}

static void cpu_memory_report(mb_backend *b, char *out, size_t size) {
    snprintf(out, size, "cpu: %.1f MiB parameters + gradients + optimizer state (fp32)",
             4.0 * (double)arena_bytes(b) / (1024.0 * 1024.0));
}

static const mb_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .forward = cpu_forward,
    .backward = cpu_backward,
    .zero_grads = cpu_zero_grads,
    .grad_norm = cpu_grad_norm,
    .optimizer_step = cpu_optimizer_step,
    .read_params = cpu_read_params,
    .write_params = cpu_write_params,
    .read_grads = cpu_read_grads,
    .read_optimizer_state = cpu_read_optimizer_state,
    .write_optimizer_state = cpu_write_optimizer_state,
    .set_rope_theta = cpu_set_rope_theta,
    .memory_report = cpu_memory_report,
};

static int bind_adamw(mb_backend *b, cpu_backend *c, mb_error *err) {
    c->adamw = calloc((size_t)b->table.count, sizeof *c->adamw);
    if (c->adamw == NULL) return mb_fail(err, "out of memory");
    for (int i = 0; i < b->table.count; i++) {
        const mb_param_info *p = &b->table.params[i];
        c->adamw[i] = (mb_adamw_param){p->name, c->params + p->offset, c->grads + p->offset, c->m + p->offset,
                                       c->v + p->offset, p->numel, p->decays != 0};
    }
    return 0;
}

int mb_backend_create_cpu(mb_backend **out, const mb_config *config, mb_error *err) {
    mb_backend *b = calloc(1, sizeof *b);
    cpu_backend *c = calloc(1, sizeof *c);
    if (b == NULL || c == NULL) {
        free(b);
        free(c);
        return mb_fail(err, "out of memory");
    }
    b->ops = &cpu_ops;
    b->config = *config;
    b->impl = c;
    if (mb_param_table_build(&b->table, config, err) != 0) {
        cpu_destroy(b);
        return -1;
    }
    size_t n = b->table.total_numel;
    c->params = calloc(n, sizeof(float));
    c->grads = calloc(n, sizeof(float));
    c->m = calloc(n, sizeof(float));
    c->v = calloc(n, sizeof(float));
    if (!c->params || !c->grads || !c->m || !c->v) {
        cpu_destroy(b);
        return mb_fail(err, "out of memory for %zu parameters", n);
    }
    if (bind_adamw(b, c, err) != 0 ||
        mb_cpu_model_create(&c->model, config, &b->table, c->params, c->grads, err) != 0) {
        cpu_destroy(b);
        return -1;
    }
    *out = b;
    return 0;
}

void mb_backend_destroy(mb_backend *backend) {
    if (backend != NULL) backend->ops->destroy(backend);
}
