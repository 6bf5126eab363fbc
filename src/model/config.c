/* ModernBERT configuration: defaults, presets, config.json in and out (v4 and v5 forms). */
#include "model/config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/fileio.h"

void mb_config_defaults(mb_config *config) {
    memset(config, 0, sizeof *config);
    config->vocab_size = 50368;
    config->hidden_size = 768;
    config->intermediate_size = 1152;
    config->num_hidden_layers = 22;
    config->num_attention_heads = 12;
    config->global_attn_every_n_layers = 3;
    config->local_attention = 128;
    config->global_rope_theta = 160000.0;
    config->local_rope_theta = 10000.0;
    config->norm_eps = 1e-5;
    config->max_position_embeddings = 8192;
    config->pad_token_id = 50283;
    config->cls_token_id = 50281;
    config->sep_token_id = 50282;
    config->bos_token_id = 50281;
    config->eos_token_id = 50282;
    config->initializer_range = 0.02;
    config->initializer_cutoff_factor = 2.0;
    config->decoder_bias = 1;
    config->tie_word_embeddings = 1;
    config->hidden_activation = MB_ACT_GELU;
    config->classifier_activation = MB_ACT_GELU;
    config->head = MB_HEAD_MASKED_LM;
    config->classifier_pooling = MB_POOLING_MEAN;
    config->num_labels = 2;
    config->layer_is_global[0] = 0;  /* derived in finalize */
}

static void set_label_defaults(mb_config *config) {
    for (int i = 0; i < MB_MAX_LABELS; i++)
        if (config->label_names[i][0] == '\0') snprintf(config->label_names[i], MB_LABEL_NAME_SIZE, "LABEL_%d", i);
}

int mb_config_preset(mb_config *config, const char *name, mb_error *err) {
    mb_config_defaults(config);
    if (strcmp(name, "base") == 0) {
        /* defaults are ModernBERT-base */
    } else if (strcmp(name, "large") == 0) {
        config->hidden_size = 1024;
        config->intermediate_size = 2624;
        config->num_hidden_layers = 28;
        config->num_attention_heads = 16;
    } else if (strcmp(name, "tiny") == 0) {
        /* A small model for demos and CPU runs: head_dim 32, 4 layers (global, local, global, local...). */
        config->hidden_size = 128;
        config->intermediate_size = 192;
        config->num_hidden_layers = 4;
        config->num_attention_heads = 4;
        config->global_attn_every_n_layers = 2;
        config->local_attention = 64;
        config->global_rope_theta = 10000.0;
        config->max_position_embeddings = 1024;
    } else {
        return mb_fail(err, "unknown model preset '%s' (known: base, large, tiny)", name);
    }
    return mb_config_finalize(config, err);
}

int mb_config_finalize(mb_config *config, mb_error *err) {
    if (config->num_attention_heads > 0) config->head_dim = config->hidden_size / config->num_attention_heads;
    if (config->global_attn_every_n_layers > 0 && config->num_hidden_layers <= MB_MAX_LAYERS)
        for (int l = 0; l < config->num_hidden_layers; l++)
            config->layer_is_global[l] = (l % config->global_attn_every_n_layers) == 0;
    set_label_defaults(config);
    return mb_config_validate(config, err);
}

int mb_config_validate(const mb_config *c, mb_error *err) {
    if (c->vocab_size <= 0) return mb_fail(err, "vocab_size must be positive (got %d)", c->vocab_size);
    if (c->hidden_size <= 0) return mb_fail(err, "hidden_size must be positive (got %d)", c->hidden_size);
    if (c->intermediate_size <= 0) return mb_fail(err, "intermediate_size must be positive (got %d)", c->intermediate_size);
    if (c->num_hidden_layers <= 0 || c->num_hidden_layers > MB_MAX_LAYERS)
        return mb_fail(err, "num_hidden_layers must be in 1..%d (got %d)", MB_MAX_LAYERS, c->num_hidden_layers);
    if (c->num_attention_heads <= 0 || c->hidden_size % c->num_attention_heads != 0)
        return mb_fail(err, "hidden_size %d is not a multiple of num_attention_heads %d", c->hidden_size,
                       c->num_attention_heads);
    if (c->head_dim % 2 != 0) return mb_fail(err, "head_dim %d must be even for RoPE", c->head_dim);
    if (c->global_attn_every_n_layers <= 0)
        return mb_fail(err, "global_attn_every_n_layers must be positive (got %d)", c->global_attn_every_n_layers);
    if (c->local_attention < 0) return mb_fail(err, "local_attention must be >= 0 (got %d)", c->local_attention);
    if (!(c->global_rope_theta > 0) || !(c->local_rope_theta > 0))
        return mb_fail(err, "rope theta must be positive (global %g, local %g)", c->global_rope_theta, c->local_rope_theta);
    if (!(c->norm_eps > 0)) return mb_fail(err, "norm_eps must be positive (got %g)", c->norm_eps);
    if (c->pad_token_id >= c->vocab_size)
        return mb_fail(err, "pad_token_id %d is outside the vocabulary (%d)", c->pad_token_id, c->vocab_size);
    if (c->head == MB_HEAD_SEQUENCE_CLASSIFIER && (c->num_labels < 1 || c->num_labels > MB_MAX_LABELS))
        return mb_fail(err, "num_labels must be in 1..%d (got %d)", MB_MAX_LABELS, c->num_labels);
    return 0;
}

static const struct {
    const char *name;
    mb_activation activation;
} activation_names[] = {
    {"gelu", MB_ACT_GELU},           {"gelu_new", MB_ACT_GELU_TANH}, {"gelu_pytorch_tanh", MB_ACT_GELU_TANH},
    {"gelu_fast", MB_ACT_GELU_TANH}, {"silu", MB_ACT_SILU},          {"swish", MB_ACT_SILU},
    {"relu", MB_ACT_RELU},
};

const char *mb_activation_name(mb_activation activation) {
    switch (activation) {
    case MB_ACT_GELU: return "gelu";
    case MB_ACT_GELU_TANH: return "gelu_pytorch_tanh";
    case MB_ACT_SILU: return "silu";
    case MB_ACT_RELU: return "relu";
    }
    return "gelu";
}

int mb_activation_from_name(const char *name, mb_activation *activation) {
    for (size_t i = 0; i < sizeof activation_names / sizeof activation_names[0]; i++)
        if (strcmp(name, activation_names[i].name) == 0) {
            *activation = activation_names[i].activation;
            return 0;
        }
    return -1;
}

int mb_layer_is_global(const mb_config *config, int layer) { return config->layer_is_global[layer] != 0; }

double mb_layer_rope_theta(const mb_config *config, int layer) {
    return mb_layer_is_global(config, layer) ? config->global_rope_theta : config->local_rope_theta;
}

int mb_layer_window(const mb_config *config, int layer) {
    return mb_layer_is_global(config, layer) ? -1 : config->local_attention / 2;
}

/* ---- config.json reading ---- */

typedef struct json_reader {
    const cJSON *root;
    const char *source;
    mb_error *err;
    int failed;
} json_reader;

static const cJSON *get_item(json_reader *r, const char *key) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(r->root, key);
    return (item == NULL || cJSON_IsNull(item)) ? NULL : item;
}

static void read_int(json_reader *r, const char *key, int *out) {
    const cJSON *item = get_item(r, key);
    if (item == NULL || r->failed) return;
    if (!cJSON_IsNumber(item) || item->valuedouble != floor(item->valuedouble) || fabs(item->valuedouble) > 2e9) {
        r->failed = 1;
        mb_fail(r->err, "%s: field '%s' must be an integer", r->source, key);
        return;
    }
    *out = (int)item->valuedouble;
}

static void read_double(json_reader *r, const char *key, double *out) {
    const cJSON *item = get_item(r, key);
    if (item == NULL || r->failed) return;
    if (!cJSON_IsNumber(item)) {
        r->failed = 1;
        mb_fail(r->err, "%s: field '%s' must be a number", r->source, key);
        return;
    }
    *out = item->valuedouble;
}

static void read_bool(json_reader *r, const char *key, int *out) {
    const cJSON *item = get_item(r, key);
    if (item == NULL || r->failed) return;
    if (!cJSON_IsBool(item)) {
        r->failed = 1;
        mb_fail(r->err, "%s: field '%s' must be true or false", r->source, key);
        return;
    }
    *out = cJSON_IsTrue(item) ? 1 : 0;
}

static void read_activation(json_reader *r, const char *key, mb_activation *out) {
    const cJSON *item = get_item(r, key);
    if (item == NULL || r->failed) return;
    if (!cJSON_IsString(item) || mb_activation_from_name(item->valuestring, out) != 0) {
        r->failed = 1;
        mb_fail(r->err, "%s: field '%s': unsupported activation %s%s%s (supported: gelu, gelu_new, gelu_pytorch_tanh, "
                "gelu_fast, silu, swish, relu)", r->source, key, cJSON_IsString(item) ? "'" : "",
                cJSON_IsString(item) ? item->valuestring : "(not a string)", cJSON_IsString(item) ? "'" : "");
    }
}

static void read_head(json_reader *r, mb_config *config) {
    const cJSON *architectures = get_item(r, "architectures");
    if (architectures == NULL || r->failed) return;
    const cJSON *first = cJSON_IsArray(architectures) ? cJSON_GetArrayItem(architectures, 0) : NULL;
    if (first == NULL || !cJSON_IsString(first)) {
        r->failed = 1;
        mb_fail(r->err, "%s: field 'architectures' must be a list of class names", r->source);
        return;
    }
    if (strcmp(first->valuestring, "ModernBertForSequenceClassification") == 0) {
        config->head = MB_HEAD_SEQUENCE_CLASSIFIER;
    } else if (strcmp(first->valuestring, "ModernBertForMaskedLM") == 0 ||
               strcmp(first->valuestring, "ModernBertModel") == 0) {
        config->head = MB_HEAD_MASKED_LM;
    } else {
        r->failed = 1;
        mb_fail(r->err, "%s: field 'architectures': unsupported class '%s' (supported: ModernBertForMaskedLM, "
                "ModernBertForSequenceClassification)", r->source, first->valuestring);
    }
}

static void read_pooling(json_reader *r, mb_config *config) {
    const cJSON *item = get_item(r, "classifier_pooling");
    if (item == NULL || r->failed) return;
    if (cJSON_IsString(item) && strcmp(item->valuestring, "cls") == 0) {
        config->classifier_pooling = MB_POOLING_CLS;
    } else if (cJSON_IsString(item) && strcmp(item->valuestring, "mean") == 0) {
        config->classifier_pooling = MB_POOLING_MEAN;
    } else {
        r->failed = 1;
        mb_fail(r->err, "%s: field 'classifier_pooling' must be \"cls\" or \"mean\"", r->source);
    }
}

static void read_labels(json_reader *r, mb_config *config) {
    const cJSON *id2label = get_item(r, "id2label");
    if (id2label != NULL && !r->failed) {
        if (!cJSON_IsObject(id2label)) {
            r->failed = 1;
            mb_fail(r->err, "%s: field 'id2label' must be an object", r->source);
            return;
        }
        int count = cJSON_GetArraySize(id2label);
        if (count < 1 || count > MB_MAX_LABELS) {
            r->failed = 1;
            mb_fail(r->err, "%s: field 'id2label' has %d labels (1..%d supported)", r->source, count, MB_MAX_LABELS);
            return;
        }
        config->num_labels = count;
        const cJSON *entry = NULL;
        cJSON_ArrayForEach(entry, id2label) {
            char *end = NULL;
            long index = strtol(entry->string, &end, 10);
            if (*end != '\0' || index < 0 || index >= count || !cJSON_IsString(entry)) {
                r->failed = 1;
                mb_fail(r->err, "%s: field 'id2label': bad entry '%s'", r->source, entry->string);
                return;
            }
            snprintf(config->label_names[index], MB_LABEL_NAME_SIZE, "%s", entry->valuestring);
        }
    }
    read_int(r, "num_labels", &config->num_labels);
}

/* v5: "layer_types": ["full_attention", "sliding_attention", ...] */
static void read_layer_types(json_reader *r, mb_config *config, int *have_layer_types) {
    const cJSON *types = get_item(r, "layer_types");
    *have_layer_types = 0;
    if (types == NULL || r->failed) return;
    if (!cJSON_IsArray(types) || cJSON_GetArraySize(types) != config->num_hidden_layers) {
        r->failed = 1;
        mb_fail(r->err, "%s: field 'layer_types' must list one type per layer (%d)", r->source, config->num_hidden_layers);
        return;
    }
    int layer = 0;
    const cJSON *entry = NULL;
    cJSON_ArrayForEach(entry, types) {
        if (cJSON_IsString(entry) && strcmp(entry->valuestring, "full_attention") == 0) {
            config->layer_is_global[layer] = 1;
        } else if (cJSON_IsString(entry) && strcmp(entry->valuestring, "sliding_attention") == 0) {
            config->layer_is_global[layer] = 0;
        } else {
            r->failed = 1;
            mb_fail(r->err, "%s: field 'layer_types[%d]' must be \"full_attention\" or \"sliding_attention\"", r->source,
                    layer);
            return;
        }
        layer++;
    }
    *have_layer_types = 1;
}

static void read_rope_entry(json_reader *r, const cJSON *entry, const char *path, double *theta) {
    if (!cJSON_IsObject(entry)) {
        r->failed = 1;
        mb_fail(r->err, "%s: field '%s' must be an object", r->source, path);
        return;
    }
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(entry, "rope_type");
    if (type != NULL && !(cJSON_IsString(type) && strcmp(type->valuestring, "default") == 0)) {
        r->failed = 1;
        mb_fail(r->err, "%s: field '%s.rope_type': only \"default\" RoPE is supported", r->source, path);
        return;
    }
    const cJSON *value = cJSON_GetObjectItemCaseSensitive(entry, "rope_theta");
    if (value == NULL) return;
    if (!cJSON_IsNumber(value)) {
        r->failed = 1;
        mb_fail(r->err, "%s: field '%s.rope_theta' must be a number", r->source, path);
        return;
    }
    *theta = value->valuedouble;
}

/* v5: "rope_parameters": {"full_attention": {"rope_theta": ...}, "sliding_attention": {...}} (or one flat entry). */
static void read_rope_parameters(json_reader *r, mb_config *config) {
    const cJSON *rope = get_item(r, "rope_parameters");
    if (rope == NULL || r->failed) return;
    const cJSON *full = cJSON_GetObjectItemCaseSensitive(rope, "full_attention");
    const cJSON *sliding = cJSON_GetObjectItemCaseSensitive(rope, "sliding_attention");
    if (full == NULL && sliding == NULL) {
        read_rope_entry(r, rope, "rope_parameters", &config->global_rope_theta);
        config->local_rope_theta = config->global_rope_theta;
        return;
    }
    if (full != NULL) read_rope_entry(r, full, "rope_parameters.full_attention", &config->global_rope_theta);
    if (sliding != NULL && !r->failed)
        read_rope_entry(r, sliding, "rope_parameters.sliding_attention", &config->local_rope_theta);
}

static void read_all_fields(json_reader *r, mb_config *config) {
    read_int(r, "vocab_size", &config->vocab_size);
    read_int(r, "hidden_size", &config->hidden_size);
    read_int(r, "intermediate_size", &config->intermediate_size);
    read_int(r, "num_hidden_layers", &config->num_hidden_layers);
    read_int(r, "num_attention_heads", &config->num_attention_heads);
    read_int(r, "global_attn_every_n_layers", &config->global_attn_every_n_layers);
    read_int(r, "local_attention", &config->local_attention);
    read_double(r, "global_rope_theta", &config->global_rope_theta);
    read_double(r, "local_rope_theta", &config->local_rope_theta);
    read_double(r, "layer_norm_eps", &config->norm_eps);
    read_double(r, "norm_eps", &config->norm_eps);
    read_int(r, "max_position_embeddings", &config->max_position_embeddings);
    read_int(r, "pad_token_id", &config->pad_token_id);
    read_int(r, "cls_token_id", &config->cls_token_id);
    read_int(r, "sep_token_id", &config->sep_token_id);
    read_int(r, "bos_token_id", &config->bos_token_id);
    read_int(r, "eos_token_id", &config->eos_token_id);
    read_double(r, "initializer_range", &config->initializer_range);
    read_double(r, "initializer_cutoff_factor", &config->initializer_cutoff_factor);
    read_bool(r, "attention_bias", &config->attention_bias);
    read_bool(r, "mlp_bias", &config->mlp_bias);
    read_bool(r, "norm_bias", &config->norm_bias);
    read_bool(r, "classifier_bias", &config->classifier_bias);
    read_bool(r, "decoder_bias", &config->decoder_bias);
    read_bool(r, "tie_word_embeddings", &config->tie_word_embeddings);
    read_activation(r, "hidden_activation", &config->hidden_activation);
    read_activation(r, "classifier_activation", &config->classifier_activation);
    read_double(r, "embedding_dropout", &config->embedding_dropout);
    read_double(r, "attention_dropout", &config->attention_dropout);
    read_double(r, "mlp_dropout", &config->mlp_dropout);
    read_double(r, "classifier_dropout", &config->classifier_dropout);
    read_head(r, config);
    read_pooling(r, config);
    read_labels(r, config);
    read_rope_parameters(r, config);
}

int mb_config_from_json(mb_config *config, const char *json_text, const char *source, mb_error *err) {
    mb_config_defaults(config);
    cJSON *root = cJSON_Parse(json_text);
    if (root == NULL || !cJSON_IsObject(root)) {
        const char *where = cJSON_GetErrorPtr();
        long offset = (where != NULL && root == NULL) ? (long)(where - json_text) : 0;
        cJSON_Delete(root);
        return mb_fail(err, "%s: not a JSON object (parse error near byte %ld)", source, offset);
    }
    json_reader reader = {root, source, err, 0};
    const cJSON *model_type = get_item(&reader, "model_type");
    if (model_type != NULL && !(cJSON_IsString(model_type) && strcmp(model_type->valuestring, "modernbert") == 0)) {
        cJSON_Delete(root);
        return mb_fail(err, "%s: model_type is not \"modernbert\"", source);
    }
    read_all_fields(&reader, config);
    int have_layer_types = 0;
    if (!reader.failed && config->num_hidden_layers > 0 && config->num_hidden_layers <= MB_MAX_LAYERS) {
        if (mb_config_finalize(config, err) != 0) {
            cJSON_Delete(root);
            return mb_fail_context(err, "%s", source);
        }
        read_layer_types(&reader, config, &have_layer_types);
    }
    cJSON_Delete(root);
    if (reader.failed) return -1;
    if (mb_config_validate(config, err) != 0) return mb_fail_context(err, "%s", source);
    return 0;
}

int mb_config_load_json(mb_config *config, const char *path, mb_error *err) {
    char *text = NULL;
    size_t size = 0;
    if (mb_read_file(path, &text, &size, err) != 0) return -1;
    int rc = mb_config_from_json(config, text, path, err);
    free(text);
    return rc;
}

/* ---- config.json writing ---- */

/* transformers (v5) validates float fields strictly: 2 is rejected where 2.0 is expected, so floats always carry a
 * decimal point or an exponent. */
static void add_float(cJSON *object, const char *key, double value) {
    char text[64];
    for (int digits = 15; digits <= 17; digits++) {  /* the shortest form that reads back exactly */
        snprintf(text, sizeof text, "%.*g", digits, value);
        if (strtod(text, NULL) == value) break;
    }
    if (strpbrk(text, ".eEn") == NULL) strncat(text, ".0", sizeof text - strlen(text) - 1);
    cJSON_AddRawToObject(object, key, text);
}

static void add_rope_entry(cJSON *parent, const char *name, double theta) {
    cJSON *entry = cJSON_AddObjectToObject(parent, name);
    cJSON_AddStringToObject(entry, "rope_type", "default");
    add_float(entry, "rope_theta", theta);
}

static void add_layer_types(cJSON *root, const mb_config *c) {
    cJSON *types = cJSON_AddArrayToObject(root, "layer_types");
    for (int l = 0; l < c->num_hidden_layers; l++)
        cJSON_AddItemToArray(types, cJSON_CreateString(c->layer_is_global[l] ? "full_attention" : "sliding_attention"));
}

static void add_head_fields(cJSON *root, const mb_config *c) {
    cJSON *architectures = cJSON_AddArrayToObject(root, "architectures");
    int classifier = c->head == MB_HEAD_SEQUENCE_CLASSIFIER;
    cJSON_AddItemToArray(architectures,
                         cJSON_CreateString(classifier ? "ModernBertForSequenceClassification" : "ModernBertForMaskedLM"));
    cJSON_AddStringToObject(root, "classifier_pooling", c->classifier_pooling == MB_POOLING_CLS ? "cls" : "mean");
    if (!classifier) return;
    cJSON *id2label = cJSON_AddObjectToObject(root, "id2label");
    cJSON *label2id = cJSON_AddObjectToObject(root, "label2id");
    for (int i = 0; i < c->num_labels; i++) {
        char key[16];
        snprintf(key, sizeof key, "%d", i);
        cJSON_AddStringToObject(id2label, key, c->label_names[i]);
        cJSON_AddNumberToObject(label2id, c->label_names[i], i);
    }
    cJSON_AddStringToObject(root, "problem_type", c->num_labels == 1 ? "regression" : "single_label_classification");
}

char *mb_config_to_json(const mb_config *c) {
    cJSON *root = cJSON_CreateObject();
    add_head_fields(root, c);
    cJSON_AddStringToObject(root, "model_type", "modernbert");
    cJSON_AddNumberToObject(root, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(root, "hidden_size", c->hidden_size);
    cJSON_AddNumberToObject(root, "intermediate_size", c->intermediate_size);
    cJSON_AddNumberToObject(root, "num_hidden_layers", c->num_hidden_layers);
    cJSON_AddNumberToObject(root, "num_attention_heads", c->num_attention_heads);
    cJSON_AddNumberToObject(root, "max_position_embeddings", c->max_position_embeddings);
    cJSON_AddNumberToObject(root, "global_attn_every_n_layers", c->global_attn_every_n_layers);
    cJSON_AddNumberToObject(root, "local_attention", c->local_attention);
    add_float(root, "global_rope_theta", c->global_rope_theta);
    add_float(root, "local_rope_theta", c->local_rope_theta);
    add_layer_types(root, c);
    cJSON *rope = cJSON_AddObjectToObject(root, "rope_parameters");
    add_rope_entry(rope, "full_attention", c->global_rope_theta);
    add_rope_entry(rope, "sliding_attention", c->local_rope_theta);
    add_float(root, "norm_eps", c->norm_eps);
    add_float(root, "layer_norm_eps", c->norm_eps);
    cJSON_AddBoolToObject(root, "norm_bias", c->norm_bias);
    cJSON_AddBoolToObject(root, "attention_bias", c->attention_bias);
    cJSON_AddBoolToObject(root, "mlp_bias", c->mlp_bias);
    cJSON_AddBoolToObject(root, "classifier_bias", c->classifier_bias);
    cJSON_AddBoolToObject(root, "decoder_bias", c->decoder_bias);
    cJSON_AddBoolToObject(root, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddStringToObject(root, "hidden_activation", mb_activation_name(c->hidden_activation));
    cJSON_AddStringToObject(root, "classifier_activation", mb_activation_name(c->classifier_activation));
    add_float(root, "embedding_dropout", c->embedding_dropout);
    add_float(root, "attention_dropout", c->attention_dropout);
    add_float(root, "mlp_dropout", c->mlp_dropout);
    add_float(root, "classifier_dropout", c->classifier_dropout);
    cJSON_AddNumberToObject(root, "pad_token_id", c->pad_token_id);
    cJSON_AddNumberToObject(root, "cls_token_id", c->cls_token_id);
    cJSON_AddNumberToObject(root, "sep_token_id", c->sep_token_id);
    cJSON_AddNumberToObject(root, "bos_token_id", c->bos_token_id);
    cJSON_AddNumberToObject(root, "eos_token_id", c->eos_token_id);
    add_float(root, "initializer_range", c->initializer_range);
    add_float(root, "initializer_cutoff_factor", c->initializer_cutoff_factor);
    cJSON_AddBoolToObject(root, "deterministic_flash_attn", 0);
    cJSON_AddBoolToObject(root, "sparse_prediction", 0);
    cJSON_AddNumberToObject(root, "sparse_pred_ignore_index", -100);
    cJSON_AddStringToObject(root, "position_embedding_type", "absolute");
    cJSON_AddStringToObject(root, "torch_dtype", "float32");
    cJSON_AddStringToObject(root, "transformers_version", "4.48.0");
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    return text;
}
