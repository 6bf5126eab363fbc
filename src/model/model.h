/* A model in host memory: its config, its parameter table and the fp32 parameter arena the table lays out. */
#ifndef MB_MODEL_H
#define MB_MODEL_H

#include "io/safetensors.h"
#include "model/config.h"
#include "model/params.h"

typedef struct mb_model {
    mb_config config;
    mb_param_table table;
    float *params;  /* table.total_numel floats */
} mb_model;

/* Allocates a zeroed arena for `config` (finalized). */
int mb_model_create(mb_model *model, const mb_config *config, mb_error *err);
void mb_model_free(mb_model *model);

/* Loads an HF checkpoint directory (config.json + model.safetensors). */
int mb_model_load_hf(mb_model *model, const char *dir, mb_error *err);

typedef struct mb_load_options {
    int allow_missing_head;    /* leave head/classifier tensors absent from the file at their current values */
    int ignore_unexpected;     /* tensors in the file that the model does not have are skipped */
} mb_load_options;

/* Loads the tensors of a safetensors file into an already created model (any of F32/BF16/F16). A tied
 * decoder.weight in the file is accepted and ignored. Errors name the file and the tensor. */
int mb_model_load_weights(mb_model *model, const char *safetensors_path, const mb_load_options *options,
                          mb_error *err);
/* Room for a prefixed parameter name such as "grad.model.layers.0.attn.Wqkv.weight". */
typedef char mb_param_entry_name[MB_PARAM_NAME_SIZE + 8];

/* Fills table->count safetensors entries (F32, the table's shapes) over an arena laid out by the table: entry i is
 * parameter i, named prefix + its HF name ("grad.", "m.", ...), the text kept in names[i]. An empty or NULL prefix
 * uses the HF names themselves (names may then be NULL). */
void mb_param_entries(const mb_param_table *table, const float *arena, const char *prefix, mb_st_entry *entries,
                      mb_param_entry_name *names);

/* Writes DIR/model.safetensors (F32, {"format":"pt"}, no decoder.weight when tied) and DIR/config.json, atomically. */
int mb_model_save_hf(const mb_model *model, const char *dir, mb_error *err);

#endif
