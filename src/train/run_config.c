/* The pretraining run schema (see run_config.h). */
#include "train/run_config.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "train/schedule.h"

#define RUN(member) offsetof(mb_run_config, member)
#define PHASE(member) offsetof(mb_phase_config, member)

static const char *const preset_names[] = {"tiny", "base", "large", NULL};
static const char *const recompute_names[] = {"none", "norms", "mlp", NULL}; /* the order of mb_recompute */

static const mb_cfg_field phase_schema[] = {
    {.path = "name", .type = MB_CFG_STRING, .offset = PHASE(name), .size = 64, .default_value = "phase",
     .help = "a label for logs and checkpoints"},
    {.path = "seq_len", .type = MB_CFG_INT, .offset = PHASE(seq_len), .default_value = "1024", .min = "1",
     .max = "131072", .help = "longest sequence; longer documents are chunked (or truncated, data.truncate)"},
    {.path = "micro_batch_tokens", .type = MB_CFG_TOKENS, .offset = PHASE(micro_batch_tokens), .default_value = "8192",
     .min = "1", .help = "token slots of one micro-batch (one packed row); at least seq_len"},
    {.path = "batch_tokens", .type = MB_CFG_TOKENS, .offset = PHASE(batch_tokens), .default_value = "65536",
     .min = "1", .help = "token slots of one optimizer step over all ranks; a multiple of micro_batch_tokens"},
    {.path = "tokens", .type = MB_CFG_TOKENS, .offset = PHASE(tokens), .flags = MB_CFG_REQUIRED, .min = "1",
     .help = "real (non-padding) tokens to train in this phase"},
    {.path = "lr", .type = MB_CFG_FLOAT, .offset = PHASE(lr), .default_value = "8e-4", .min = "0", .max = "1",
     .flags = MB_CFG_MIN_EXCLUSIVE, .help = "peak learning rate"},
    {.path = "warmup_tokens", .type = MB_CFG_TOKENS, .offset = PHASE(warmup_tokens), .default_value = "0",
     .help = "linear warmup from 1e-10 x lr to lr over this many tokens"},
    {.path = "decay_tokens", .type = MB_CFG_TOKENS, .offset = PHASE(decay_tokens), .default_value = "0",
     .help = "decay over the last this-many tokens of the phase (0 = constant after warmup)"},
    {.path = "decay_shape", .type = MB_CFG_ENUM, .offset = PHASE(decay_shape), .default_value = "one_minus_sqrt",
     .enum_names = mb_decay_shape_names, .help = "linear, cosine or one_minus_sqrt"},
    {.path = "final_lr_fraction", .type = MB_CFG_FLOAT, .offset = PHASE(final_lr_fraction), .default_value = "0.0",
     .min = "0", .max = "1", .help = "lr at the end of the decay, as a fraction of lr"},
    {.path = "weight_decay", .type = MB_CFG_FLOAT, .offset = PHASE(weight_decay), .default_value = "1e-5",
     .min = "0", .max = "1", .help = "fully decoupled weight decay (scaled by lr_t / lr)"},
    {.path = "global_rope_theta", .type = MB_CFG_FLOAT, .offset = PHASE(global_rope_theta), .default_value = "10000",
     .min = "0", .flags = MB_CFG_MIN_EXCLUSIVE, .help = "RoPE theta of the global-attention layers"},
    {.path = "local_rope_theta", .type = MB_CFG_FLOAT, .offset = PHASE(local_rope_theta), .default_value = "10000",
     .min = "0", .flags = MB_CFG_MIN_EXCLUSIVE, .help = "RoPE theta of the sliding-window layers"},
    {.path = "batch_warmup_tokens", .type = MB_CFG_TOKENS, .offset = PHASE(batch_warmup_tokens),
     .default_value = "0", .help = "batch-size warmup length in tokens (0 = off)"},
    {.path = "batch_warmup_min_rows", .type = MB_CFG_INT, .offset = PHASE(batch_warmup_min_rows),
     .default_value = "1", .min = "1", .help = "micro-batches per step when the batch-size warmup starts"},
    {.path = "batch_warmup_unit_rows", .type = MB_CFG_INT, .offset = PHASE(batch_warmup_unit_rows),
     .default_value = "1", .min = "1",
     .help = "the batch grows in steps of this many micro-batches (ModernBERT: one per GPU, i.e. 8)"},
    {.path = "reset_optimizer", .type = MB_CFG_BOOL, .offset = PHASE(reset_optimizer), .default_value = "false",
     .help = "start this phase with zeroed optimizer moments (false keeps them, as the ModernBERT recipe)"},
    {.path = "data_seed", .type = MB_CFG_INT64, .offset = PHASE(data_seed), .default_value = "0", .min = "0",
     .help = "shuffle/masking seed of this phase's data stream (0 = run.seed + phase index)"},
    MB_CFG_END,
};

const mb_cfg_field mb_run_config_schema[] = {
    {.path = "run.name", .type = MB_CFG_STRING, .offset = RUN(run.name), .size = 128, .default_value = "run",
     .help = "run name (logs)"},
    {.path = "run.output_dir", .type = MB_CFG_STRING, .offset = RUN(run.output_dir), .size = MB_PATH_SIZE,
     .default_value = "runs/run", .help = "run directory: config.yaml, metrics.jsonl, checkpoints/"},
    {.path = "run.seed", .type = MB_CFG_INT64, .offset = RUN(run.seed), .default_value = "17", .min = "0",
     .help = "seed of initialisation and data"},
    {.path = "run.backend", .type = MB_CFG_STRING, .offset = RUN(run.backend), .size = 16, .default_value = "auto",
     .help = "auto (GPU when available), cpu or cuda"},
    {.path = "run.threads", .type = MB_CFG_INT, .offset = RUN(run.threads), .default_value = "0", .min = "0",
     .help = "CPU threads (0 = all cores)"},
    {.path = "run.comm_timeout_seconds", .type = MB_CFG_FLOAT, .offset = RUN(run.comm_timeout_seconds),
     .default_value = "600", .min = "1",
     .help = "data parallelism: a collective (or the rendezvous) that does not complete in this time aborts every "
             "rank with an error (a dead rank is noticed at once; this bounds a hung one)"},
    {.path = "run.recompute", .type = MB_CFG_ENUM, .offset = RUN(run.recompute), .default_value = "none",
     .enum_names = recompute_names,
     .help = "activations the backward rebuilds instead of keeping (CUDA; results bit-identical): none; norms "
             "(LayerNorm outputs, GLU product, MLM logits: base at 8192 fits 2.07x transformers' micro-batch, ~5% "
             "slower); mlp (also the Wi product: 3.0x, ~10% slower). docs/performance.md, \"Memory\""},
    {.path = "model.preset", .type = MB_CFG_ENUM, .offset = RUN(model.preset), .default_value = "tiny",
     .enum_names = preset_names, .help = "tiny, base, large (architecture; the fields below override it)"},
    {.path = "model.init", .type = MB_CFG_STRING, .offset = RUN(model.init), .size = MB_PATH_SIZE,
     .default_value = "", .help = "start from this HF checkpoint directory (continued pretraining)"},
    {.path = "model.vocab_size", .type = MB_CFG_INT, .offset = RUN(model.vocab_size), .default_value = "0",
     .min = "0", .help = "0 = the tokenizer's size rounded up to a multiple of 64"},
    {.path = "model.hidden_size", .type = MB_CFG_INT, .offset = RUN(model.hidden_size), .default_value = "0",
     .min = "0", .help = "0 = preset"},
    {.path = "model.intermediate_size", .type = MB_CFG_INT, .offset = RUN(model.intermediate_size),
     .default_value = "0", .min = "0", .help = "one GLU half; 0 = preset"},
    {.path = "model.num_hidden_layers", .type = MB_CFG_INT, .offset = RUN(model.num_hidden_layers),
     .default_value = "0", .min = "0", .help = "0 = preset"},
    {.path = "model.num_attention_heads", .type = MB_CFG_INT, .offset = RUN(model.num_attention_heads),
     .default_value = "0", .min = "0", .help = "0 = preset"},
    {.path = "model.global_attn_every_n_layers", .type = MB_CFG_INT, .offset = RUN(model.global_attn_every_n_layers),
     .default_value = "0", .min = "0", .help = "0 = preset"},
    {.path = "model.local_attention", .type = MB_CFG_INT, .offset = RUN(model.local_attention), .default_value = "0",
     .min = "0", .help = "sliding window width (attends |i-j| <= local_attention/2); 0 = preset"},
    {.path = "data.tokenizer", .type = MB_CFG_STRING, .offset = RUN(data.tokenizer), .size = MB_PATH_SIZE,
     .default_value = "data/tokenizer.json", .help = "HF tokenizer.json (copied into every checkpoint)"},
    {.path = "data.train", .type = MB_CFG_STRING, .offset = RUN(data.train), .size = MB_PATH_SIZE,
     .default_value = "", .help = "training shard glob(s), comma-separated"},
    {.path = "data.val", .type = MB_CFG_STRING, .offset = RUN(data.val), .size = MB_PATH_SIZE, .default_value = "",
     .help = "validation shard glob(s); empty = no validation"},
    {.path = "data.batches", .type = MB_CFG_STRING, .offset = RUN(data.batches), .size = MB_PATH_SIZE,
     .default_value = "", .help = "step-by-step mode: a directory of batch files step-NNNNNN-micro-NNN.safetensors"},
    {.path = "data.mlm_probability", .type = MB_CFG_FLOAT, .offset = RUN(data.mlm_probability),
     .default_value = "0.3", .min = "0", .max = "1", .flags = MB_CFG_MIN_EXCLUSIVE,
     .help = "fraction of tokens that become MLM targets (80% [MASK], 10% random, 10% kept)"},
    {.path = "data.mask_cls_sep", .type = MB_CFG_BOOL, .offset = RUN(data.mask_cls_sep), .default_value = "false",
     .help = "allow [CLS]/[SEP] as MLM targets, as ModernBERT's packer did"},
    {.path = "data.truncate", .type = MB_CFG_BOOL, .offset = RUN(data.truncate), .default_value = "false",
     .help = "truncate long documents to seq_len instead of splitting them into chunks"},
    {.path = "data.prefetch", .type = MB_CFG_INT, .offset = RUN(data.prefetch), .default_value = "8", .min = "0",
     .help = "micro-batches prepared ahead on the loader thread"},
    {.path = "optimizer.beta1", .type = MB_CFG_FLOAT, .offset = RUN(optimizer.beta1), .default_value = "0.9",
     .min = "0", .max = "1", .flags = MB_CFG_MAX_EXCLUSIVE, .help = "StableAdamW beta1"},
    {.path = "optimizer.beta2", .type = MB_CFG_FLOAT, .offset = RUN(optimizer.beta2), .default_value = "0.98",
     .min = "0", .max = "1", .flags = MB_CFG_MAX_EXCLUSIVE, .help = "StableAdamW beta2"},
    {.path = "optimizer.eps", .type = MB_CFG_FLOAT, .offset = RUN(optimizer.eps), .default_value = "1e-6",
     .min = "0", .flags = MB_CFG_MIN_EXCLUSIVE, .help = "StableAdamW epsilon"},
    {.path = "phases", .type = MB_CFG_LIST, .offset = RUN(phases), .size = sizeof(mb_phase_config),
     .fields = phase_schema, .count_offset = RUN(phase_count), .capacity = MB_MAX_PHASES, .min = "1",
     .flags = MB_CFG_REQUIRED, .help = "the phases of the run, in order"},
    {.path = "checkpoint.every_steps", .type = MB_CFG_INT, .offset = RUN(checkpoint.every_steps),
     .default_value = "0", .min = "0", .help = "write a checkpoint every N steps (0 = off)"},
    {.path = "checkpoint.every_minutes", .type = MB_CFG_FLOAT, .offset = RUN(checkpoint.every_minutes),
     .default_value = "0", .min = "0", .help = "and/or every M minutes (0 = off)"},
    {.path = "checkpoint.keep", .type = MB_CFG_INT, .offset = RUN(checkpoint.keep), .default_value = "3",
     .min = "1", .help = "keep the newest K checkpoints"},
    {.path = "logging.every_steps", .type = MB_CFG_INT, .offset = RUN(logging.every_steps), .default_value = "10",
     .min = "1", .help = "a log line (and metrics.jsonl record) every N steps"},
    {.path = "logging.val_every_steps", .type = MB_CFG_INT, .offset = RUN(logging.val_every_steps),
     .default_value = "100", .min = "0", .help = "validation loss every N steps (0 = only at the end)"},
    {.path = "logging.val_batches", .type = MB_CFG_INT, .offset = RUN(logging.val_batches), .default_value = "8",
     .min = "1", .help = "micro-batches per validation"},
    {.path = "logging.max_nonfinite_steps", .type = MB_CFG_INT, .offset = RUN(logging.max_nonfinite_steps),
     .default_value = "5", .min = "1", .help = "abort after this many consecutive NaN/Inf steps (each is skipped)"},
    {.path = "logging.progress_bar", .type = MB_CFG_BOOL, .offset = RUN(logging.progress_bar),
     .default_value = "true", .help = "a live progress line when stdout is a terminal"},
    MB_CFG_END,
};

static int check_phases(const mb_cfg_tree *tree, const mb_run_config *c, mb_error *err) {
    for (int i = 0; i < c->phase_count; i++) {
        const mb_phase_config *p = &c->phases[i];
        char path[64];
        snprintf(path, sizeof path, "phases.%d", i);
        if (p->micro_batch_tokens < p->seq_len)
            return mb_cfg_fail_at(tree, path, err, "micro_batch_tokens (%lld) must be at least seq_len (%d)",
                                  (long long)p->micro_batch_tokens, p->seq_len);
        if (p->batch_tokens % p->micro_batch_tokens != 0)
            return mb_cfg_fail_at(tree, path, err, "batch_tokens (%lld) must be a multiple of micro_batch_tokens (%lld)",
                                  (long long)p->batch_tokens, (long long)p->micro_batch_tokens);
        if (p->decay_tokens > p->tokens)
            return mb_cfg_fail_at(tree, path, err, "decay_tokens (%lld) exceeds the phase's tokens (%lld)",
                                  (long long)p->decay_tokens, (long long)p->tokens);
        if (p->batch_warmup_min_rows > p->batch_tokens / p->micro_batch_tokens)
            return mb_cfg_fail_at(tree, path, err, "batch_warmup_min_rows exceeds the micro-batches per step");
    }
    return 0;
}

static int check_run(const mb_cfg_tree *tree, const mb_run_config *c, mb_error *err) {
    if (strcmp(c->run.backend, "auto") != 0 && strcmp(c->run.backend, "cpu") != 0 &&
        strcmp(c->run.backend, "cuda") != 0)
        return mb_cfg_fail_at(tree, "run.backend", err, "must be auto, cpu or cuda (got '%s')", c->run.backend);
    if (c->data.train[0] == '\0' && c->data.batches[0] == '\0')
        return mb_cfg_fail_at(tree, "data", err, "set data.train (shard globs) or data.batches (batch files)");
    return check_phases(tree, c, err);
}

int mb_run_config_load(mb_run_config *config, const char *path, char *const *overrides, int override_count,
                       mb_error *err) {
    mb_cfg_tree tree;
    if (mb_cfg_tree_load(&tree, path, err) != 0) return -1;
    int rc = 0;
    for (int i = 0; rc == 0 && i < override_count; i++) rc = mb_cfg_tree_override(&tree, overrides[i], err);
    if (rc == 0) rc = mb_cfg_read(&tree, mb_run_config_schema, config, err);
    if (rc == 0) rc = check_run(&tree, config, err);
    mb_cfg_tree_free(&tree);
    return rc;
}
