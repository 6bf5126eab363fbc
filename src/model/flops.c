/* Model FLOPs (see flops.h). */
#include "model/flops.h"

#include <string.h>

static double matmul_flops_per_token(const mb_config *c) {
    double H = c->hidden_size, I = c->intermediate_size;
    return 6.0 * c->num_hidden_layers * (H * 3 * H + H * H + H * 2 * I + I * H);
}

static double head_flops_per_row(const mb_config *c) {
    double H = c->hidden_size;
    return 6.0 * (H * H + H * c->vocab_size);
}

/* Σ over the tokens of a document of length n of the keys inside |i − j| ≤ w (w < 0: all n). */
static double keys_in_document(int64_t n, int window) {
    if (window < 0 || 2 * (int64_t)window + 1 >= n) return (double)n * (double)n;
    double w = window;
    /* every token sees 2w + 1 keys, minus the ones cut off at both ends: 2 · Σ_{k=1..w} k */
    return (double)n * (2 * w + 1) - w * (w + 1);
}

double mb_batch_model_flops(const mb_config *c, const mb_batch *b, int64_t labelled_rows) {
    double attention_keys = 0.0;
    for (int layer = 0; layer < c->num_hidden_layers; layer++)
        for (int s = 0; s < b->sequence_count; s++)
            attention_keys += keys_in_document(b->cu_seqlens[s + 1] - b->cu_seqlens[s], mb_layer_window(c, layer));
    return matmul_flops_per_token(c) * b->token_count + 12.0 * c->hidden_size * attention_keys +
           head_flops_per_row(c) * (double)labelled_rows;
}

double mb_model_flops_per_token(const mb_config *c, int seq_len, double labelled_fraction) {
    double keys = 0.0;
    for (int layer = 0; layer < c->num_hidden_layers; layer++)
        keys += keys_in_document(seq_len, mb_layer_window(c, layer)) / seq_len;
    return matmul_flops_per_token(c) + 12.0 * c->hidden_size * keys + head_flops_per_row(c) * labelled_fraction;
}

double mb_device_peak_flops(const char *name) {
    if (name == NULL) return 0.0;
    if (strstr(name, "H100") != NULL || strstr(name, "H200") != NULL) return 989e12;
    if (strstr(name, "A100") != NULL) return 312e12;
    return 0.0;
}
