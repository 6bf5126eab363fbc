/* The ModernBERT model configuration: every field of a Hugging Face config.json that changes the computation.
 *
 * Read from config.json in both forms transformers writes (v4: global_rope_theta / local_rope_theta /
 * global_attn_every_n_layers; v5: layer_types / rope_parameters), from presets (base, large, tiny) and from our YAML
 * (the trainer's schema fills this struct). Written back as config.json carrying both forms, so v4.48+ and v5 load it. */
#ifndef MB_CONFIG_H
#define MB_CONFIG_H

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MB_MAX_LAYERS 256
#define MB_MAX_LABELS 64
#define MB_LABEL_NAME_SIZE 64

typedef enum mb_activation {
    MB_ACT_GELU,       /* exact erf GELU ("gelu") */
    MB_ACT_GELU_TANH,  /* "gelu_new", "gelu_pytorch_tanh", "gelu_fast" approximated by the tanh formula */
    MB_ACT_SILU,       /* "silu", "swish" */
    MB_ACT_RELU,       /* "relu" */
} mb_activation;

typedef enum mb_pooling { MB_POOLING_CLS, MB_POOLING_MEAN } mb_pooling;

typedef enum mb_head_kind {
    MB_HEAD_MASKED_LM,            /* ModernBertForMaskedLM */
    MB_HEAD_SEQUENCE_CLASSIFIER,  /* ModernBertForSequenceClassification (regression when num_labels == 1) */
} mb_head_kind;

typedef struct mb_config {
    int vocab_size;
    int hidden_size;
    int intermediate_size;  /* one GLU half: Wi has 2 * intermediate_size rows */
    int num_hidden_layers;
    int num_attention_heads;
    int head_dim;           /* hidden_size / num_attention_heads */
    int global_attn_every_n_layers;
    int local_attention;    /* window width: a local layer attends to |i - j| <= local_attention / 2 */
    unsigned char layer_is_global[MB_MAX_LAYERS];
    double global_rope_theta;
    double local_rope_theta;
    double norm_eps;
    int max_position_embeddings;
    int pad_token_id, cls_token_id, sep_token_id, bos_token_id, eos_token_id;
    double initializer_range;
    double initializer_cutoff_factor;
    int attention_bias, mlp_bias, norm_bias, classifier_bias, decoder_bias;
    int tie_word_embeddings;
    mb_activation hidden_activation;
    mb_activation classifier_activation;
    double embedding_dropout, attention_dropout, mlp_dropout, classifier_dropout;  /* recorded; never applied here */
    /* head */
    mb_head_kind head;
    mb_pooling classifier_pooling;
    int num_labels;
    char label_names[MB_MAX_LABELS][MB_LABEL_NAME_SIZE];  /* id2label, "LABEL_i" when absent */
} mb_config;

/* Fills the HF ModernBertConfig defaults (ModernBERT-base's architecture, MLM head, mean pooling as the released
 * checkpoints). */
void mb_config_defaults(mb_config *config);
/* Presets: "base", "large", "tiny" (a 2-layer demo model). Returns -1 for an unknown name. */
int mb_config_preset(mb_config *config, const char *name, mb_error *err);
/* Recomputes derived fields (head_dim, layer_is_global from global_attn_every_n_layers) and checks consistency. */
int mb_config_finalize(mb_config *config, mb_error *err);
/* Checks every field; errors name the field. */
int mb_config_validate(const mb_config *config, mb_error *err);

/* Parses config.json text (v4 or v5 form); `source` names the file in errors. */
int mb_config_from_json(mb_config *config, const char *json_text, const char *source, mb_error *err);
int mb_config_load_json(mb_config *config, const char *path, mb_error *err);
/* Serialises to config.json text (malloc'ed), with both the v4 and v5 fields. */
char *mb_config_to_json(const mb_config *config);

const char *mb_activation_name(mb_activation activation);
int mb_activation_from_name(const char *name, mb_activation *activation);
int mb_layer_is_global(const mb_config *config, int layer);
double mb_layer_rope_theta(const mb_config *config, int layer);
/* Window half-width of a layer: -1 for global layers (whole sequence), local_attention / 2 otherwise. */
int mb_layer_window(const mb_config *config, int layer);

#ifdef __cplusplus
}
#endif

#endif
