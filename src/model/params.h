/* The parameter table: every tensor of the model under its Hugging Face name and shape, carved from one fp32 arena.
 *
 * The table is built from the config (never hard-coded indices): iterate it to load, save, initialise, decay, or
 * compare tensors. mb_weights binds readable per-layer pointers into an arena laid out by the table; the same binding
 * over a gradient arena gives the gradients. Optional tensors (biases switched off, layer 0's attn_norm, the untied
 * decoder) are simply absent from the table and NULL in mb_weights. */
#ifndef MB_PARAMS_H
#define MB_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/rng.h"
#include "model/config.h"

#define MB_PARAM_NAME_SIZE 96

typedef enum mb_init_kind {
    MB_INIT_IN,          /* truncated normal, sigma = initializer_range */
    MB_INIT_OUT,         /* truncated normal, sigma = initializer_range / sqrt(2 L) */
    MB_INIT_CLASSIFIER,  /* truncated normal, sigma = hidden_size ** -0.5 */
    MB_INIT_ONES,        /* LayerNorm weights */
    MB_INIT_ZEROS,       /* biases */
} mb_init_kind;

typedef struct mb_param_info {
    char name[MB_PARAM_NAME_SIZE];
    int ndim;
    int64_t shape[2];
    size_t numel;
    size_t offset;  /* in floats, into the arena */
    mb_init_kind init;
    int decays;     /* weight decay applies: ndim >= 2 and not a bias */
} mb_param_info;

typedef struct mb_param_table {
    mb_param_info *params;
    int count;
    size_t total_numel;
} mb_param_table;

int mb_param_table_build(mb_param_table *table, const mb_config *config, mb_error *err);
void mb_param_table_free(mb_param_table *table);
/* Index of a parameter by HF name, or -1. */
int mb_param_table_find(const mb_param_table *table, const char *name);

typedef struct mb_layer_weights {
    float *attn_norm, *attn_norm_bias;  /* NULL for layer 0 (Identity) */
    float *wqkv, *wqkv_bias;            /* [3H, H] rows Q | K | V, heads contiguous */
    float *wo, *wo_bias;                /* [H, H] */
    float *mlp_norm, *mlp_norm_bias;
    float *wi, *wi_bias;                /* [2I, H]: rows 0..I-1 activated input, I..2I-1 gate */
    float *mlp_wo, *mlp_wo_bias;        /* [H, I] */
} mb_layer_weights;

typedef struct mb_weights {
    float *tok_embeddings;              /* [V, H], also the decoder weight when tied */
    float *embedding_norm, *embedding_norm_bias;
    mb_layer_weights layers[MB_MAX_LAYERS];
    float *final_norm, *final_norm_bias;
    float *head_dense, *head_dense_bias;
    float *head_norm, *head_norm_bias;
    float *decoder_weight;              /* == tok_embeddings when tied */
    float *decoder_bias;                /* NULL without decoder_bias */
    float *classifier_weight, *classifier_bias;
} mb_weights;

/* Points every field of `weights` into `arena` (table.total_numel floats) by name. */
void mb_weights_bind(mb_weights *weights, const mb_param_table *table, const mb_config *config, float *arena);

/* HF-identical initialisation (distribution, not bits): truncated normal at +-cutoff*sigma per tensor kind. */
void mb_params_init(const mb_param_table *table, const mb_config *config, float *arena, uint64_t seed);

#endif
