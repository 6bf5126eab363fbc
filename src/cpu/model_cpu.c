/* ModernBERT forward and backward on the CPU, read top to bottom.
 *
 *   h  = LayerNorm(tok_embeddings[ids])                                   embeddings
 *   for each layer l:
 *     a   = (l == 0) ? h : LayerNorm(h)                                   attn_norm (Identity in layer 0)
 *     qkv = RoPE(a · Wqkvᵀ)                                               Q | K | V, positions restart per sequence
 *     h   = h + Attention_l(qkv) · Woᵀ                                    global, or window |i−j| ≤ local_attention/2
 *     h   = h + (act(m · Wiᵀ[:I]) ⊙ (m · Wiᵀ[I:])) · Wo_mlpᵀ,  m = LayerNorm(h)
 *   h  = LayerNorm(h)                                                     final_norm
 *   MLM head (labelled rows only): z = LayerNorm(act(h · Wdᵀ)); logits = z · Eᵀ + b; loss = Σ CE
 *   classifier: p = pool(h) (cls token or mean over the sequence); z = LayerNorm(act(p · Wdᵀ));
 *               logits = z · Wcᵀ + bc; loss = Σ CE, or Σ (logit − y)² when num_labels == 1
 * The backward walks the same steps in reverse; each op's gradient is in its own file (cpu/ops.h). */
#include "cpu/model_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"

typedef struct layer_activations {
    float *attn_in, *attn_mean, *attn_rstd;  /* attn_in aliases the layer input in layer 0 */
    float *qkv, *attn_out, *lse;
    float *h_mid;                            /* residual after attention */
    float *mlp_in, *mlp_mean, *mlp_rstd;
    float *wi_out, *glu_out;
    float *h_out;                            /* residual after the MLP = next layer's input */
} layer_activations;

typedef struct head_activations {
    int rows;                 /* labelled tokens (MLM) or sequences (classifier) */
    int32_t *row_tokens;      /* MLM: token index of each labelled row */
    int32_t *targets;         /* MLM: label of each row; classifier: class index */
    float *inputs;            /* [rows, H] gathered or pooled final hidden states */
    float *dense_out, *act_out, *norm_out, *norm_mean, *norm_rstd;
    float *logits;            /* [rows, classes]; turned into dlogits by backward */
} head_activations;

struct mb_cpu_model {
    mb_config config;
    mb_weights weights, grads;
    /* activation arena, carved per batch */
    float *arena;
    size_t arena_capacity;
    int32_t *int_arena;
    size_t int_capacity;
    /* the batch of the last forward */
    mb_batch batch;
    int forward_done;
    int32_t *positions;
    float *embedded, *embedded_mean, *embedded_rstd, *hidden0;
    layer_activations layers[MB_MAX_LAYERS];
    float *final_out, *final_mean, *final_rstd;
    head_activations head;
    const float *sequence_labels;
};

int mb_cpu_model_create(mb_cpu_model **out, const mb_config *config, const mb_param_table *table, float *params,
                        float *grads, mb_error *err) {
    mb_cpu_model *model = calloc(1, sizeof *model);
    if (model == NULL) return mb_fail(err, "out of memory");
    model->config = *config;
    mb_weights_bind(&model->weights, table, config, params);
    if (grads != NULL) mb_weights_bind(&model->grads, table, config, grads);
    *out = model;
    return 0;
}

void mb_cpu_model_free(mb_cpu_model *model) {
    if (model == NULL) return;
    free(model->arena);
    free(model->int_arena);
    free(model);
}

void mb_cpu_model_set_rope_theta(mb_cpu_model *model, double global_theta, double local_theta) {
    model->config.global_rope_theta = global_theta;
    model->config.local_rope_theta = local_theta;
}

const float *mb_cpu_last_hidden(const mb_cpu_model *model) { return model->final_out; }

int mb_batch_validate(const mb_batch *b, const mb_config *c, mb_error *err) {
    if (b->sequence_count < 1) return mb_fail(err, "batch: no sequences (cu_seqlens needs at least 2 entries)");
    if (b->cu_seqlens[0] != 0) return mb_fail(err, "batch: cu_seqlens[0] is %d, must be 0", b->cu_seqlens[0]);
    for (int s = 0; s < b->sequence_count; s++)
        if (b->cu_seqlens[s + 1] <= b->cu_seqlens[s])
            return mb_fail(err, "batch: cu_seqlens must increase strictly (cu_seqlens[%d] = %d, cu_seqlens[%d] = %d)",
                           s, b->cu_seqlens[s], s + 1, b->cu_seqlens[s + 1]);
    if (b->cu_seqlens[b->sequence_count] != b->token_count)
        return mb_fail(err, "batch: cu_seqlens ends at %d but input_ids holds %d tokens",
                       b->cu_seqlens[b->sequence_count], b->token_count);
    for (int i = 0; i < b->token_count; i++)
        if (b->input_ids[i] < 0 || b->input_ids[i] >= c->vocab_size)
            return mb_fail(err, "batch: input_ids[%d] = %d is outside the vocabulary [0, %d)", i, b->input_ids[i],
                           c->vocab_size);
    if (c->head == MB_HEAD_MASKED_LM) {
        if (b->labels == NULL) return mb_fail(err, "batch: labels are required for the masked-LM head");
        for (int i = 0; i < b->token_count; i++)
            if (b->labels[i] != -100 && (b->labels[i] < 0 || b->labels[i] >= c->vocab_size))
                return mb_fail(err, "batch: labels[%d] = %d is neither -100 nor a token id", i, b->labels[i]);
    } else {
        if (b->sequence_labels == NULL) return mb_fail(err, "batch: sequence labels are required for the classifier");
        for (int s = 0; c->num_labels > 1 && s < b->sequence_count; s++) {
            float label = b->sequence_labels[s];
            if (!(label >= 0 && label < c->num_labels) || label != floorf(label))
                return mb_fail(err, "batch: labels[%d] = %g is not a class index in [0, %d)", s, label, c->num_labels);
        }
    }
    return 0;
}

/* ---- activation memory: one float arena and one int arena, carved in a fixed order per batch ---- */

typedef struct carver {
    float *base;
    size_t used;
} carver;

static float *carve(carver *c, size_t count) {
    float *p = c->base ? c->base + c->used : NULL;
    c->used += (count + 15) & ~(size_t)15;
    return p;
}

static void carve_layers(mb_cpu_model *m, carver *c, size_t n) {
    const mb_config *cfg = &m->config;
    size_t H = (size_t)cfg->hidden_size, I = (size_t)cfg->intermediate_size, heads = (size_t)cfg->num_attention_heads;
    for (int l = 0; l < cfg->num_hidden_layers; l++) {
        layer_activations *a = &m->layers[l];
        a->attn_in = l == 0 ? NULL : carve(c, n * H);
        a->attn_mean = carve(c, n);
        a->attn_rstd = carve(c, n);
        a->qkv = carve(c, n * 3 * H);
        a->attn_out = carve(c, n * H);
        a->lse = carve(c, n * heads);
        a->h_mid = carve(c, n * H);
        a->mlp_in = carve(c, n * H);
        a->mlp_mean = carve(c, n);
        a->mlp_rstd = carve(c, n);
        a->wi_out = carve(c, n * 2 * I);
        a->glu_out = carve(c, n * I);
        a->h_out = carve(c, n * H);
    }
}

static void carve_all(mb_cpu_model *m, carver *c, size_t n, size_t head_rows, size_t classes) {
    size_t H = (size_t)m->config.hidden_size;
    m->embedded = carve(c, n * H);
    m->embedded_mean = carve(c, n);
    m->embedded_rstd = carve(c, n);
    m->hidden0 = carve(c, n * H);
    carve_layers(m, c, n);
    m->final_out = carve(c, n * H);
    m->final_mean = carve(c, n);
    m->final_rstd = carve(c, n);
    head_activations *h = &m->head;
    h->inputs = carve(c, head_rows * H);
    h->dense_out = carve(c, head_rows * H);
    h->act_out = carve(c, head_rows * H);
    h->norm_out = carve(c, head_rows * H);
    h->norm_mean = carve(c, head_rows);
    h->norm_rstd = carve(c, head_rows);
    h->logits = carve(c, head_rows * classes);
}

static int reserve_activations(mb_cpu_model *m, size_t n, size_t head_rows, size_t classes, mb_error *err) {
    carver sizing = {NULL, 0};
    carve_all(m, &sizing, n, head_rows, classes);
    if (sizing.used > m->arena_capacity) {
        free(m->arena);
        m->arena = malloc(sizing.used * sizeof(float));
        m->arena_capacity = m->arena ? sizing.used : 0;
        if (m->arena == NULL) return mb_fail(err, "out of memory for activations (%zu floats)", sizing.used);
    }
    size_t ints = 3 * n + 16;
    if (ints > m->int_capacity) {
        free(m->int_arena);
        m->int_arena = malloc(ints * sizeof(int32_t));
        m->int_capacity = m->int_arena ? ints : 0;
        if (m->int_arena == NULL) return mb_fail(err, "out of memory for batch indices");
    }
    carver real = {m->arena, 0};
    carve_all(m, &real, n, head_rows, classes);
    m->positions = m->int_arena;
    m->head.row_tokens = m->int_arena + n;
    m->head.targets = m->int_arena + 2 * n;
    return 0;
}

/* ---- forward ---- */

static void embeddings_forward(mb_cpu_model *m) {
    const mb_config *c = &m->config;
    int n = m->batch.token_count, H = c->hidden_size;
    mb_cpu_embedding_forward(m->embedded, m->batch.input_ids, m->weights.tok_embeddings, n, H);
    mb_cpu_layernorm_forward(m->hidden0, m->embedded_mean, m->embedded_rstd, m->embedded, m->weights.embedding_norm,
                             m->weights.embedding_norm_bias, n, H, (float)c->norm_eps);
}

static void attention_block_forward(mb_cpu_model *m, int l, const float *h_in) {
    const mb_config *c = &m->config;
    const mb_layer_weights *w = &m->weights.layers[l];
    layer_activations *a = &m->layers[l];
    int n = m->batch.token_count, H = c->hidden_size;
    const float *attn_in = h_in;
    if (w->attn_norm != NULL) {
        mb_cpu_layernorm_forward(a->attn_in, a->attn_mean, a->attn_rstd, h_in, w->attn_norm, w->attn_norm_bias, n, H,
                                 (float)c->norm_eps);
        attn_in = a->attn_in;
    }
    mb_cpu_linear_forward(a->qkv, attn_in, w->wqkv, w->wqkv_bias, n, H, 3 * H);
    mb_cpu_rope(a->qkv, m->positions, n, c->num_attention_heads, c->head_dim, mb_layer_rope_theta(c, l), +1);
    mb_cpu_attention_forward(a->attn_out, a->lse, a->qkv, m->batch.cu_seqlens, m->batch.sequence_count,
                             c->num_attention_heads, c->head_dim, mb_layer_window(c, l));
    mb_cpu_linear_forward(a->h_mid, a->attn_out, w->wo, w->wo_bias, n, H, H);
    for (size_t k = 0; k < (size_t)n * H; k++) a->h_mid[k] += h_in[k];
}

static void mlp_block_forward(mb_cpu_model *m, int l) {
    const mb_config *c = &m->config;
    const mb_layer_weights *w = &m->weights.layers[l];
    layer_activations *a = &m->layers[l];
    int n = m->batch.token_count, H = c->hidden_size, I = c->intermediate_size;
    mb_cpu_layernorm_forward(a->mlp_in, a->mlp_mean, a->mlp_rstd, a->h_mid, w->mlp_norm, w->mlp_norm_bias, n, H,
                             (float)c->norm_eps);
    mb_cpu_linear_forward(a->wi_out, a->mlp_in, w->wi, w->wi_bias, n, H, 2 * I);
    mb_cpu_glu_forward(a->glu_out, a->wi_out, n, I, c->hidden_activation);
    mb_cpu_linear_forward(a->h_out, a->glu_out, w->mlp_wo, w->mlp_wo_bias, n, I, H);
    for (size_t k = 0; k < (size_t)n * H; k++) a->h_out[k] += a->h_mid[k];
}

static const float *layer_input(const mb_cpu_model *m, int l) { return l == 0 ? m->hidden0 : m->layers[l - 1].h_out; }

/* Rows of the head: labelled tokens in token order (MLM), or one pooled row per sequence (classifier). */
static void gather_head_inputs(mb_cpu_model *m) {
    const mb_config *c = &m->config;
    head_activations *h = &m->head;
    int H = c->hidden_size;
    if (c->head == MB_HEAD_MASKED_LM) {
        h->rows = 0;
        for (int i = 0; i < m->batch.token_count; i++)
            if (m->batch.labels[i] != -100) {
                h->row_tokens[h->rows] = i;
                h->targets[h->rows] = m->batch.labels[i];
                memcpy(h->inputs + (size_t)h->rows * H, m->final_out + (size_t)i * H, (size_t)H * sizeof(float));
                h->rows++;
            }
        return;
    }
    h->rows = m->batch.sequence_count;
    for (int s = 0; s < h->rows; s++) {
        int begin = m->batch.cu_seqlens[s], end = m->batch.cu_seqlens[s + 1];
        float *pooled = h->inputs + (size_t)s * H;
        if (c->classifier_pooling == MB_POOLING_CLS) {
            memcpy(pooled, m->final_out + (size_t)begin * H, (size_t)H * sizeof(float));
        } else {
            for (int j = 0; j < H; j++) {
                double sum = 0.0;
                for (int i = begin; i < end; i++) sum += m->final_out[(size_t)i * H + j];
                pooled[j] = (float)(sum / (end - begin));
            }
        }
        h->targets[s] = c->num_labels > 1 ? (int32_t)m->batch.sequence_labels[s] : 0;
    }
}

static int head_classes(const mb_config *c) { return c->head == MB_HEAD_MASKED_LM ? c->vocab_size : c->num_labels; }

static void head_forward(mb_cpu_model *m, mb_forward_result *result) {
    const mb_config *c = &m->config;
    const mb_weights *w = &m->weights;
    head_activations *h = &m->head;
    int H = c->hidden_size, rows = h->rows, classes = head_classes(c);
    mb_cpu_linear_forward(h->dense_out, h->inputs, w->head_dense, w->head_dense_bias, rows, H, H);
    mb_cpu_activation_forward(h->act_out, h->dense_out, (size_t)rows * H, c->classifier_activation);
    mb_cpu_layernorm_forward(h->norm_out, h->norm_mean, h->norm_rstd, h->act_out, w->head_norm, w->head_norm_bias,
                             rows, H, (float)c->norm_eps);
    int is_mlm = c->head == MB_HEAD_MASKED_LM;
    mb_cpu_linear_forward(h->logits, h->norm_out, is_mlm ? w->decoder_weight : w->classifier_weight,
                          is_mlm ? w->decoder_bias : w->classifier_bias, rows, H, classes);
    if (c->head == MB_HEAD_SEQUENCE_CLASSIFIER && c->num_labels == 1)
        result->loss_sum = mb_cpu_mse_forward(h->logits, m->batch.sequence_labels, rows);
    else
        result->loss_sum = mb_cpu_cross_entropy_forward(h->logits, h->targets, rows, classes);
    result->loss_count = rows;
    result->logits = h->logits;
    result->logit_rows = rows;
    result->logit_cols = classes;
}

static int count_head_rows(const mb_batch *b, const mb_config *c) {
    if (c->head != MB_HEAD_MASKED_LM) return b->sequence_count;
    int rows = 0;
    for (int i = 0; i < b->token_count; i++) rows += b->labels[i] != -100;
    return rows;
}

int mb_cpu_forward(mb_cpu_model *m, const mb_batch *batch, mb_forward_result *result, mb_error *err) {
    const mb_config *c = &m->config;
    memset(result, 0, sizeof *result);
    if (mb_batch_validate(batch, c, err) != 0) return -1;
    int rows = count_head_rows(batch, c);
    if (reserve_activations(m, (size_t)batch->token_count, (size_t)rows, (size_t)head_classes(c), err) != 0) return -1;
    m->batch = *batch;
    mb_cpu_positions(m->positions, batch->cu_seqlens, batch->sequence_count);
    embeddings_forward(m);
    for (int l = 0; l < c->num_hidden_layers; l++) {
        attention_block_forward(m, l, layer_input(m, l));
        mlp_block_forward(m, l);
    }
    mb_cpu_layernorm_forward(m->final_out, m->final_mean, m->final_rstd, layer_input(m, c->num_hidden_layers),
                             m->weights.final_norm, m->weights.final_norm_bias, batch->token_count, c->hidden_size,
                             (float)c->norm_eps);
    gather_head_inputs(m);
    head_forward(m, result);
    m->forward_done = 1;
    return 0;
}

/* ---- backward ---- */

typedef struct backward_buffers {
    float *dh;        /* [n, H] gradient of the residual stream at the current point */
    float *d_normed;  /* [n, H] gradient of a LayerNorm output */
    float *dqkv;      /* [n, 3H] */
    float *d_attn;    /* [n, H] */
    float *d_wi;      /* [n, 2I] */
    float *d_glu;     /* [n, I] */
    float *d_head;    /* [rows, H] x3 */
    float *d_head2;
} backward_buffers;

static float *alloc_floats(size_t count) { return calloc(count ? count : 1, sizeof(float)); }

static void free_buffers(backward_buffers *b) {
    free(b->dh);
    free(b->d_normed);
    free(b->dqkv);
    free(b->d_attn);
    free(b->d_wi);
    free(b->d_glu);
    free(b->d_head);
    free(b->d_head2);
}

static int alloc_buffers(backward_buffers *b, const mb_cpu_model *m, mb_error *err) {
    size_t n = (size_t)m->batch.token_count, H = (size_t)m->config.hidden_size;
    size_t I = (size_t)m->config.intermediate_size, rows = (size_t)m->head.rows;
    b->dh = alloc_floats(n * H);
    b->d_normed = alloc_floats(n * H);
    b->dqkv = alloc_floats(n * 3 * H);
    b->d_attn = alloc_floats(n * H);
    b->d_wi = alloc_floats(n * 2 * I);
    b->d_glu = alloc_floats(n * I);
    b->d_head = alloc_floats(rows * H);
    b->d_head2 = alloc_floats(rows * H);
    if (!b->dh || !b->d_normed || !b->dqkv || !b->d_attn || !b->d_wi || !b->d_glu || !b->d_head || !b->d_head2) {
        free_buffers(b);
        return mb_fail(err, "out of memory for backward buffers");
    }
    return 0;
}

/* From the loss down to the gradient of the final hidden states (written into d_final, zero elsewhere). */
static void head_backward(mb_cpu_model *m, backward_buffers *b, float *d_final, float grad_scale) {
    const mb_config *c = &m->config;
    const mb_weights *w = &m->weights;
    mb_weights *g = &m->grads;
    head_activations *h = &m->head;
    int H = c->hidden_size, rows = h->rows, classes = head_classes(c);
    int is_mlm = c->head == MB_HEAD_MASKED_LM;
    if (!is_mlm && c->num_labels == 1)
        mb_cpu_mse_backward(h->logits, h->logits, m->batch.sequence_labels, rows, grad_scale);
    else
        mb_cpu_cross_entropy_backward(h->logits, h->targets, rows, classes, grad_scale);
    float *d_norm_out = b->d_head, *d_act = b->d_head2;
    mb_cpu_linear_backward(d_norm_out, is_mlm ? g->decoder_weight : g->classifier_weight,
                           is_mlm ? g->decoder_bias : g->classifier_bias, h->logits, h->norm_out,
                           is_mlm ? w->decoder_weight : w->classifier_weight, rows, H, classes, 0);
    mb_cpu_layernorm_backward(d_act, g->head_norm, g->head_norm_bias, d_norm_out, h->act_out, h->norm_mean,
                              h->norm_rstd, w->head_norm, rows, H, 0);
    float *d_dense = b->d_head;
    mb_cpu_activation_backward(d_dense, d_act, h->dense_out, (size_t)rows * H, c->classifier_activation);
    float *d_inputs = b->d_head2;
    mb_cpu_linear_backward(d_inputs, g->head_dense, g->head_dense_bias, d_dense, h->inputs, w->head_dense, rows, H, H,
                           0);
    memset(d_final, 0, (size_t)m->batch.token_count * H * sizeof(float));
    for (int r = 0; r < rows; r++) {
        const float *grad = d_inputs + (size_t)r * H;
        if (is_mlm) {
            memcpy(d_final + (size_t)h->row_tokens[r] * H, grad, (size_t)H * sizeof(float));
            continue;
        }
        int begin = m->batch.cu_seqlens[r], end = m->batch.cu_seqlens[r + 1];
        if (c->classifier_pooling == MB_POOLING_CLS) {
            memcpy(d_final + (size_t)begin * H, grad, (size_t)H * sizeof(float));
            continue;
        }
        for (int i = begin; i < end; i++)
            for (int j = 0; j < H; j++) d_final[(size_t)i * H + j] = grad[j] / (float)(end - begin);
    }
}

static void mlp_block_backward(mb_cpu_model *m, int l, backward_buffers *b) {
    const mb_config *c = &m->config;
    const mb_layer_weights *w = &m->weights.layers[l];
    mb_layer_weights *g = &m->grads.layers[l];
    layer_activations *a = &m->layers[l];
    int n = m->batch.token_count, H = c->hidden_size, I = c->intermediate_size;
    mb_cpu_linear_backward(b->d_glu, g->mlp_wo, g->mlp_wo_bias, b->dh, a->glu_out, w->mlp_wo, n, I, H, 0);
    mb_cpu_glu_backward(b->d_wi, b->d_glu, a->wi_out, n, I, c->hidden_activation);
    mb_cpu_linear_backward(b->d_normed, g->wi, g->wi_bias, b->d_wi, a->mlp_in, w->wi, n, H, 2 * I, 0);
    mb_cpu_layernorm_backward(b->dh, g->mlp_norm, g->mlp_norm_bias, b->d_normed, a->h_mid, a->mlp_mean, a->mlp_rstd,
                              w->mlp_norm, n, H, 1);
}

static void attention_block_backward(mb_cpu_model *m, int l, backward_buffers *b) {
    const mb_config *c = &m->config;
    const mb_layer_weights *w = &m->weights.layers[l];
    mb_layer_weights *g = &m->grads.layers[l];
    layer_activations *a = &m->layers[l];
    int n = m->batch.token_count, H = c->hidden_size;
    const float *h_in = layer_input(m, l);
    const float *attn_in = w->attn_norm != NULL ? a->attn_in : h_in;
    mb_cpu_linear_backward(b->d_attn, g->wo, g->wo_bias, b->dh, a->attn_out, w->wo, n, H, H, 0);
    mb_cpu_attention_backward(b->dqkv, b->d_attn, a->attn_out, a->lse, a->qkv, m->batch.cu_seqlens,
                              m->batch.sequence_count, c->num_attention_heads, c->head_dim, mb_layer_window(c, l));
    mb_cpu_rope(b->dqkv, m->positions, n, c->num_attention_heads, c->head_dim, mb_layer_rope_theta(c, l), -1);
    /* qkv was rotated in place; the Wqkv gradient needs the layer input only, which is unchanged */
    if (w->attn_norm == NULL) {
        mb_cpu_linear_backward(b->dh, g->wqkv, g->wqkv_bias, b->dqkv, attn_in, w->wqkv, n, H, 3 * H, 1);
        return;
    }
    mb_cpu_linear_backward(b->d_normed, g->wqkv, g->wqkv_bias, b->dqkv, attn_in, w->wqkv, n, H, 3 * H, 0);
    mb_cpu_layernorm_backward(b->dh, g->attn_norm, g->attn_norm_bias, b->d_normed, h_in, a->attn_mean, a->attn_rstd,
                              w->attn_norm, n, H, 1);
}

static void embeddings_backward(mb_cpu_model *m, backward_buffers *b) {
    const mb_config *c = &m->config;
    int n = m->batch.token_count, H = c->hidden_size;
    mb_cpu_layernorm_backward(b->d_normed, m->grads.embedding_norm, m->grads.embedding_norm_bias, b->dh, m->embedded,
                              m->embedded_mean, m->embedded_rstd, m->weights.embedding_norm, n, H, 0);
    mb_cpu_embedding_backward(m->grads.tok_embeddings, b->d_normed, m->batch.input_ids, n, H, c->pad_token_id);
}

int mb_cpu_backward(mb_cpu_model *m, float grad_scale, mb_error *err) {
    if (!m->forward_done) return mb_fail(err, "backward called without a forward");
    if (m->grads.tok_embeddings == NULL) return mb_fail(err, "backward needs a gradient arena");
    const mb_config *c = &m->config;
    backward_buffers b;
    if (alloc_buffers(&b, m, err) != 0) return -1;
    int n = m->batch.token_count, H = c->hidden_size;
    head_backward(m, &b, b.d_normed, grad_scale);
    mb_cpu_layernorm_backward(b.dh, m->grads.final_norm, m->grads.final_norm_bias, b.d_normed,
                              layer_input(m, c->num_hidden_layers), m->final_mean, m->final_rstd,
                              m->weights.final_norm, n, H, 0);
    for (int l = c->num_hidden_layers - 1; l >= 0; l--) {
        mlp_block_backward(m, l, &b);
        attention_block_backward(m, l, &b);
    }
    embeddings_backward(m, &b);
    free_buffers(&b);
    m->forward_done = 0;
    return 0;
}
