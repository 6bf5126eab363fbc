/* Parameter table construction, binding and initialisation (see params.h). */
#include "model/params.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/stableadamw.h"

typedef struct table_builder {
    mb_param_table *table;
    int capacity;
    int failed;
} table_builder;

static void add_param(table_builder *b, const char *name, int ndim, int64_t rows, int64_t cols, mb_init_kind init) {
    if (b->failed) return;
    mb_param_table *t = b->table;
    if (t->count == b->capacity) {
        int capacity = b->capacity ? 2 * b->capacity : 64;
        mb_param_info *grown = realloc(t->params, (size_t)capacity * sizeof *grown);
        if (grown == NULL) {
            b->failed = 1;
            return;
        }
        t->params = grown;
        b->capacity = capacity;
    }
    mb_param_info *p = &t->params[t->count++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    p->shape[0] = rows;
    p->shape[1] = ndim == 2 ? cols : 1;
    p->numel = (size_t)rows * (size_t)(ndim == 2 ? cols : 1);
    p->offset = t->total_numel;
    p->init = init;
    p->decays = mb_param_decays(name, ndim);
    /* keep every tensor 16-float aligned inside the arena (64 bytes) for vector loads */
    t->total_numel += (p->numel + 15) & ~(size_t)15;
}

static void add_norm(table_builder *b, const char *prefix, int hidden, int with_bias) {
    char name[MB_PARAM_NAME_SIZE];
    snprintf(name, sizeof name, "%s.weight", prefix);
    add_param(b, name, 1, hidden, 1, MB_INIT_ONES);
    if (!with_bias) return;
    snprintf(name, sizeof name, "%s.bias", prefix);
    add_param(b, name, 1, hidden, 1, MB_INIT_ZEROS);
}

static void add_linear(table_builder *b, const char *prefix, int out, int in, int with_bias, mb_init_kind init) {
    char name[MB_PARAM_NAME_SIZE];
    snprintf(name, sizeof name, "%s.weight", prefix);
    add_param(b, name, 2, out, in, init);
    if (!with_bias) return;
    snprintf(name, sizeof name, "%s.bias", prefix);
    add_param(b, name, 1, out, 1, MB_INIT_ZEROS);
}

static void add_layer(table_builder *b, const mb_config *c, int layer) {
    char prefix[MB_PARAM_NAME_SIZE];
    int H = c->hidden_size, I = c->intermediate_size;
    if (layer != 0) {
        snprintf(prefix, sizeof prefix, "model.layers.%d.attn_norm", layer);
        add_norm(b, prefix, H, c->norm_bias);
    }
    snprintf(prefix, sizeof prefix, "model.layers.%d.attn.Wqkv", layer);
    add_linear(b, prefix, 3 * H, H, c->attention_bias, MB_INIT_IN);
    snprintf(prefix, sizeof prefix, "model.layers.%d.attn.Wo", layer);
    add_linear(b, prefix, H, H, c->attention_bias, MB_INIT_OUT);
    snprintf(prefix, sizeof prefix, "model.layers.%d.mlp_norm", layer);
    add_norm(b, prefix, H, c->norm_bias);
    snprintf(prefix, sizeof prefix, "model.layers.%d.mlp.Wi", layer);
    add_linear(b, prefix, 2 * I, H, c->mlp_bias, MB_INIT_IN);
    snprintf(prefix, sizeof prefix, "model.layers.%d.mlp.Wo", layer);
    add_linear(b, prefix, H, I, c->mlp_bias, MB_INIT_OUT);
}

int mb_param_table_build(mb_param_table *table, const mb_config *c, mb_error *err) {
    memset(table, 0, sizeof *table);
    table_builder b = {table, 0, 0};
    int H = c->hidden_size;
    add_param(&b, "model.embeddings.tok_embeddings.weight", 2, c->vocab_size, H, MB_INIT_IN);
    add_norm(&b, "model.embeddings.norm", H, c->norm_bias);
    for (int layer = 0; layer < c->num_hidden_layers; layer++) add_layer(&b, c, layer);
    add_norm(&b, "model.final_norm", H, c->norm_bias);
    add_linear(&b, "head.dense", H, H, c->classifier_bias, MB_INIT_OUT);
    add_norm(&b, "head.norm", H, c->norm_bias);
    if (c->head == MB_HEAD_MASKED_LM) {
        if (!c->tie_word_embeddings) add_param(&b, "decoder.weight", 2, c->vocab_size, H, MB_INIT_OUT);
        if (c->decoder_bias) add_param(&b, "decoder.bias", 1, c->vocab_size, 1, MB_INIT_ZEROS);
    } else {
        add_linear(&b, "classifier", c->num_labels, H, 1, MB_INIT_CLASSIFIER);
    }
    if (b.failed) {
        mb_param_table_free(table);
        return mb_fail(err, "out of memory building the parameter table");
    }
    return 0;
}

void mb_param_table_free(mb_param_table *table) {
    free(table->params);
    memset(table, 0, sizeof *table);
}

int mb_param_table_find(const mb_param_table *table, const char *name) {
    for (int i = 0; i < table->count; i++)
        if (strcmp(table->params[i].name, name) == 0) return i;
    return -1;
}

static float *lookup(const mb_param_table *table, float *arena, const char *name) {
    int index = mb_param_table_find(table, name);
    return index < 0 ? NULL : arena + table->params[index].offset;
}

static float *lookup_layer(const mb_param_table *table, float *arena, int layer, const char *suffix) {
    char name[MB_PARAM_NAME_SIZE];
    snprintf(name, sizeof name, "model.layers.%d.%s", layer, suffix);
    return lookup(table, arena, name);
}

void mb_weights_bind(mb_weights *w, const mb_param_table *table, const mb_config *c, float *arena) {
    memset(w, 0, sizeof *w);
    w->tok_embeddings = lookup(table, arena, "model.embeddings.tok_embeddings.weight");
    w->embedding_norm = lookup(table, arena, "model.embeddings.norm.weight");
    w->embedding_norm_bias = lookup(table, arena, "model.embeddings.norm.bias");
    for (int l = 0; l < c->num_hidden_layers; l++) {
        mb_layer_weights *lw = &w->layers[l];
        lw->attn_norm = lookup_layer(table, arena, l, "attn_norm.weight");
        lw->attn_norm_bias = lookup_layer(table, arena, l, "attn_norm.bias");
        lw->wqkv = lookup_layer(table, arena, l, "attn.Wqkv.weight");
        lw->wqkv_bias = lookup_layer(table, arena, l, "attn.Wqkv.bias");
        lw->wo = lookup_layer(table, arena, l, "attn.Wo.weight");
        lw->wo_bias = lookup_layer(table, arena, l, "attn.Wo.bias");
        lw->mlp_norm = lookup_layer(table, arena, l, "mlp_norm.weight");
        lw->mlp_norm_bias = lookup_layer(table, arena, l, "mlp_norm.bias");
        lw->wi = lookup_layer(table, arena, l, "mlp.Wi.weight");
        lw->wi_bias = lookup_layer(table, arena, l, "mlp.Wi.bias");
        lw->mlp_wo = lookup_layer(table, arena, l, "mlp.Wo.weight");
        lw->mlp_wo_bias = lookup_layer(table, arena, l, "mlp.Wo.bias");
    }
    w->final_norm = lookup(table, arena, "model.final_norm.weight");
    w->final_norm_bias = lookup(table, arena, "model.final_norm.bias");
    w->head_dense = lookup(table, arena, "head.dense.weight");
    w->head_dense_bias = lookup(table, arena, "head.dense.bias");
    w->head_norm = lookup(table, arena, "head.norm.weight");
    w->head_norm_bias = lookup(table, arena, "head.norm.bias");
    w->decoder_weight = lookup(table, arena, "decoder.weight");
    if (w->decoder_weight == NULL && c->head == MB_HEAD_MASKED_LM) w->decoder_weight = w->tok_embeddings;
    w->decoder_bias = lookup(table, arena, "decoder.bias");
    w->classifier_weight = lookup(table, arena, "classifier.weight");
    w->classifier_bias = lookup(table, arena, "classifier.bias");
}

static double init_sigma(const mb_config *c, mb_init_kind kind) {
    switch (kind) {
    case MB_INIT_IN: return c->initializer_range;
    case MB_INIT_OUT: return c->initializer_range / sqrt(2.0 * c->num_hidden_layers);
    case MB_INIT_CLASSIFIER: return pow((double)c->hidden_size, -0.5);
    default: return 0.0;
    }
}

void mb_params_init(const mb_param_table *table, const mb_config *c, float *arena, uint64_t seed) {
    /* One RNG stream per tensor, keyed by its position in the table, so adding a head does not move the others. */
    float cutoff = (float)c->initializer_cutoff_factor;
    for (int i = 0; i < table->count; i++) {
        const mb_param_info *p = &table->params[i];
        float *data = arena + p->offset;
        if (p->init == MB_INIT_ONES || p->init == MB_INIT_ZEROS) {
            float value = p->init == MB_INIT_ONES ? 1.0f : 0.0f;
            for (size_t k = 0; k < p->numel; k++) data[k] = value;
            continue;
        }
        mb_rng rng;
        mb_rng_seed_stream(&rng, seed, (uint64_t)i);
        float sigma = (float)init_sigma(c, p->init);
        for (size_t k = 0; k < p->numel; k++) data[k] = mb_rng_truncated_normal(&rng, sigma, cutoff);
    }
}
