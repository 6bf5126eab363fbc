/* Model definition: config.json in both transformers forms, presets, the parameter table, initialisation, and
 * checkpoint directories in and out (with clear errors for missing and unexpected tensors). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/fileio.h"
#include "io/safetensors.h"
#include "model/model.h"

static size_t real_parameter_count(const mb_param_table *table) {
    size_t total = 0;
    for (int i = 0; i < table->count; i++) total += table->params[i].numel;
    return total;
}

Test(config, presets_have_the_published_parameter_counts) {
    mb_config config;
    mb_error err;
    mb_param_table table;
    cr_assert_eq(mb_config_preset(&config, "base", &err), 0, "%s", err.message);
    cr_assert_eq(mb_param_table_build(&table, &config, &err), 0);
    cr_assert_eq(real_parameter_count(&table), 149655232u);
    cr_assert_eq(table.count, 137, "base MLM has 137 tensors without decoder.weight");
    cr_assert_eq(mb_param_table_find(&table, "model.layers.0.attn_norm.weight"), -1);
    cr_assert_geq(mb_param_table_find(&table, "model.layers.1.attn_norm.weight"), 0);
    mb_param_table_free(&table);
    cr_assert_eq(mb_config_preset(&config, "large", &err), 0);
    cr_assert_eq(mb_param_table_build(&table, &config, &err), 0);
    cr_assert_eq(real_parameter_count(&table), 395881664u);
    mb_param_table_free(&table);
    cr_assert_eq(mb_config_preset(&config, "huge", &err), -1);
    cr_assert(strstr(err.message, "huge") != NULL);
}

Test(config, global_layers_follow_every_n) {
    mb_config config;
    mb_error err;
    cr_assert_eq(mb_config_preset(&config, "base", &err), 0);
    for (int l = 0; l < 22; l++) cr_assert_eq(mb_layer_is_global(&config, l), l % 3 == 0, "layer %d", l);
    cr_assert_eq(mb_layer_window(&config, 1), 64);
    cr_assert_eq(mb_layer_window(&config, 0), -1);
    cr_assert_float_eq(mb_layer_rope_theta(&config, 0), 160000.0, 1e-9);
    cr_assert_float_eq(mb_layer_rope_theta(&config, 1), 10000.0, 1e-9);
}

static const char *v4_json =
    "{\"architectures\":[\"ModernBertForMaskedLM\"],\"model_type\":\"modernbert\",\"vocab_size\":100,"
    "\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":4,\"num_attention_heads\":2,"
    "\"global_attn_every_n_layers\":2,\"local_attention\":32,\"global_rope_theta\":160000.0,"
    "\"local_rope_theta\":10000.0,\"norm_eps\":1e-05,\"pad_token_id\":3,\"classifier_pooling\":\"mean\"}";

static const char *v5_json =
    "{\"architectures\":[\"ModernBertForSequenceClassification\"],\"model_type\":\"modernbert\",\"vocab_size\":100,"
    "\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":4,\"num_attention_heads\":2,"
    "\"global_attn_every_n_layers\":3,\"local_attention\":32,"
    "\"layer_types\":[\"full_attention\",\"sliding_attention\",\"sliding_attention\",\"full_attention\"],"
    "\"rope_parameters\":{\"full_attention\":{\"rope_theta\":80000.0,\"rope_type\":\"default\"},"
    "\"sliding_attention\":{\"rope_theta\":5000.0,\"rope_type\":\"default\"}},\"pad_token_id\":3,"
    "\"id2label\":{\"0\":\"neg\",\"1\":\"neutral\",\"2\":\"pos\"},\"classifier_pooling\":\"cls\"}";

Test(config, reads_v4_and_v5_forms) {
    mb_config config;
    mb_error err;
    cr_assert_eq(mb_config_from_json(&config, v4_json, "v4.json", &err), 0, "%s", err.message);
    cr_assert_eq(config.head_dim, 32);
    cr_assert(mb_layer_is_global(&config, 0) && !mb_layer_is_global(&config, 1) && mb_layer_is_global(&config, 2));
    cr_assert_float_eq(config.global_rope_theta, 160000.0, 1e-9);
    cr_assert_eq(config.classifier_pooling, MB_POOLING_MEAN);
    cr_assert_eq(mb_config_from_json(&config, v5_json, "v5.json", &err), 0, "%s", err.message);
    cr_assert_eq(config.head, MB_HEAD_SEQUENCE_CLASSIFIER);
    cr_assert_eq(config.num_labels, 3);
    cr_assert_str_eq(config.label_names[2], "pos");
    cr_assert(mb_layer_is_global(&config, 0) && !mb_layer_is_global(&config, 2) && mb_layer_is_global(&config, 3));
    cr_assert_float_eq(mb_layer_rope_theta(&config, 3), 80000.0, 1e-9);
    cr_assert_float_eq(mb_layer_rope_theta(&config, 1), 5000.0, 1e-9);
    cr_assert_eq(config.classifier_pooling, MB_POOLING_CLS);
}

Test(config, written_json_reads_back_identically) {
    mb_config config, again;
    mb_error err;
    cr_assert_eq(mb_config_from_json(&config, v5_json, "v5.json", &err), 0, "%s", err.message);
    char *text = mb_config_to_json(&config);
    cr_assert(strstr(text, "\"global_rope_theta\"") && strstr(text, "\"rope_parameters\"") &&
              strstr(text, "\"layer_types\"") && strstr(text, "\"label2id\""));
    cr_assert_eq(mb_config_from_json(&again, text, "written", &err), 0, "%s", err.message);
    free(text);
    cr_assert_eq(memcmp(config.layer_is_global, again.layer_is_global, sizeof config.layer_is_global), 0);
    cr_assert_eq(again.num_labels, 3);
    cr_assert_float_eq(again.local_rope_theta, 5000.0, 1e-9);
}

static void expect_error(const char *json, const char *needle) {
    mb_config config;
    mb_error err = {{0}};
    cr_assert_eq(mb_config_from_json(&config, json, "bad.json", &err), -1, "accepted: %s", json);
    cr_assert(strstr(err.message, "bad.json") != NULL, "no file name in: %s", err.message);
    cr_assert(strstr(err.message, needle) != NULL, "'%s' not in: %s", needle, err.message);
}

Test(config, malformed_configs_name_the_field) {
    expect_error("{\"hidden_size\": 64,", "parse error");
    expect_error("[1,2]", "not a JSON object");
    expect_error("{\"hidden_size\": \"big\"}", "hidden_size");
    expect_error("{\"hidden_size\": 100, \"num_attention_heads\": 3}", "num_attention_heads");
    expect_error("{\"hidden_activation\": \"mish\"}", "hidden_activation");
    expect_error("{\"model_type\": \"bert\"}", "model_type");
    expect_error("{\"num_hidden_layers\": 2, \"layer_types\": [\"full_attention\"]}", "layer_types");
    expect_error("{\"rope_parameters\": {\"full_attention\": {\"rope_type\": \"yarn\", \"rope_theta\": 1.0}}}",
                 "rope_type");
    expect_error("{\"architectures\": [\"ModernBertForQuestionAnswering\"]}", "architectures");
    expect_error("{\"vocab_size\": 10, \"pad_token_id\": 50}", "pad_token_id");
}

Test(params, initialisation_matches_hf_sigmas) {
    mb_config config;
    mb_error err;
    cr_assert_eq(mb_config_preset(&config, "tiny", &err), 0);
    config.vocab_size = 4096;
    mb_model model;
    cr_assert_eq(mb_model_create(&model, &config, &err), 0);
    mb_params_init(&model.table, &config, model.params, 17);
    double out_sigma = 0.02 / sqrt(2.0 * config.num_hidden_layers);
    for (int i = 0; i < model.table.count; i++) {
        const mb_param_info *p = &model.table.params[i];
        const float *data = model.params + p->offset;
        double sum = 0, sum_sq = 0, max_abs = 0;
        for (size_t k = 0; k < p->numel; k++) {
            sum += data[k];
            sum_sq += (double)data[k] * data[k];
            if (fabs(data[k]) > max_abs) max_abs = fabs(data[k]);
        }
        double mean = sum / p->numel, std = sqrt(sum_sq / p->numel - mean * mean);
        double sigma = p->init == MB_INIT_IN ? 0.02 : p->init == MB_INIT_OUT ? out_sigma : 0.0;
        if (p->init == MB_INIT_ONES) {
            cr_assert_float_eq(mean, 1.0, 1e-12, "%s", p->name);
        } else if (sigma > 0) {
            cr_assert_leq(max_abs, 2.0 * sigma * 1.0001, "%s exceeds the 2-sigma cutoff", p->name);
            /* std of a normal truncated at +-2 sigma is 0.8796 sigma */
            cr_assert(fabs(std - 0.8796 * sigma) < 0.05 * sigma, "%s: std %g, expected %g", p->name, std,
                      0.8796 * sigma);
        }
    }
    mb_model_free(&model);
}

Test(checkpoint, save_load_round_trip_and_errors) {
    mb_config config;
    mb_error err;
    cr_assert_eq(mb_config_preset(&config, "tiny", &err), 0);
    config.vocab_size = 512;
    config.pad_token_id = 3;
    mb_model model, loaded;
    cr_assert_eq(mb_model_create(&model, &config, &err), 0);
    mb_params_init(&model.table, &config, model.params, 5);
    char dir[] = "/tmp/mb_test_ckpt_XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    cr_assert_eq(mb_model_save_hf(&model, dir, &err), 0, "%s", err.message);
    cr_assert_eq(mb_model_load_hf(&loaded, dir, &err), 0, "%s", err.message);
    cr_assert_eq(loaded.table.total_numel, model.table.total_numel);
    cr_assert_eq(memcmp(loaded.params, model.params, model.table.total_numel * sizeof(float)), 0);
    mb_model_free(&loaded);

    /* a model with biases cannot load a file without them: the error names the missing tensor */
    mb_config with_bias = config;
    with_bias.mlp_bias = 1;
    mb_model biased;
    cr_assert_eq(mb_model_create(&biased, &with_bias, &err), 0);
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    cr_assert_eq(mb_model_load_weights(&biased, path, NULL, &err), -1);
    cr_assert(strstr(err.message, "missing tensor 'model.layers.0.mlp.Wi.bias'") != NULL, "%s", err.message);
    cr_assert(strstr(err.message, path) != NULL);
    mb_model_free(&biased);

    /* and a smaller model rejects the extra tensors */
    mb_config fewer = config;
    fewer.num_hidden_layers = 2;
    cr_assert_eq(mb_config_finalize(&fewer, &err), 0);
    mb_model small;
    cr_assert_eq(mb_model_create(&small, &fewer, &err), 0);
    cr_assert_eq(mb_model_load_weights(&small, path, NULL, &err), -1);
    cr_assert(strstr(err.message, "unexpected tensor 'model.layers.2.") != NULL, "%s", err.message);
    mb_load_options lenient = {.ignore_unexpected = 1};
    cr_assert_eq(mb_model_load_weights(&small, path, &lenient, &err), 0, "%s", err.message);
    mb_model_free(&small);

    /* a shape mismatch names the tensor */
    mb_config wider = config;
    wider.intermediate_size = config.intermediate_size + 8;
    mb_model wide;
    cr_assert_eq(mb_model_create(&wide, &wider, &err), 0);
    cr_assert_eq(mb_model_load_weights(&wide, path, NULL, &err), -1);
    cr_assert(strstr(err.message, "mlp.Wi.weight") != NULL, "%s", err.message);
    mb_model_free(&wide);
    mb_model_free(&model);
}

#include "model/flops.h"

/* The FLOP convention of docs/performance.md: ModernBERT-base at 1024-token documents ≈ 0.83 GFLOP/token and at
 * 8192 ≈ 1.36 (sparse head, 30 % labelled); a packed batch counts each document's own keys only. */
Test(flops, base_matches_the_documented_convention) {
    mb_config config;
    mb_error err;
    cr_assert_eq(mb_config_preset(&config, "base", &err), 0);
    double at_1024 = mb_model_flops_per_token(&config, 1024, 0.3), at_8192 = mb_model_flops_per_token(&config, 8192, 0.3);
    cr_assert(fabs(at_1024 / 1e9 - 0.83) < 0.01, "%g", at_1024 / 1e9);
    cr_assert(fabs(at_8192 / 1e9 - 1.36) < 0.01, "%g", at_8192 / 1e9);
    /* two documents of 512 cost less attention than one of 1024 */
    int32_t ids[1024] = {0}, one[] = {0, 1024}, two[] = {0, 512, 1024};
    mb_batch whole = {1024, 1, ids, one, NULL, NULL}, halves = {1024, 2, ids, two, NULL, NULL};
    cr_assert_gt(mb_batch_model_flops(&config, &whole, 300), mb_batch_model_flops(&config, &halves, 300));
    cr_assert(fabs(mb_batch_model_flops(&config, &whole, 307) / 1024 / at_1024 - 1.0) < 1e-3);
    cr_assert_float_eq(mb_device_peak_flops("NVIDIA H200"), 989e12, 1.0);
    cr_assert_float_eq(mb_device_peak_flops("Some CPU"), 0.0, 0.0);
}
