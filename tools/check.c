/* modernbert check: one forward + backward of an HF checkpoint on one packed batch, so any user can compare our
 * numerics with transformers (or the GPU with the CPU). Writes loss, logits and every parameter gradient. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/clock.h"
#include "commands.h"
#include "common/error.h"
#include "model/backend.h"
#include "io/batch_file.h"
#include "io/safetensors.h"
#include "model/model.h"

typedef struct check_options {
    const char *model_dir;
    const char *batch_path;
    const char *out_path;
    const char *device;
} check_options;

static void print_help(FILE *stream) {
    fprintf(stream,
            "usage: modernbert check --model DIR --batch BATCH.safetensors [--out OUT.safetensors] [--device cpu|cuda]\n"
            "\n"
            "Runs one forward and backward pass of the Hugging Face ModernBERT checkpoint in DIR (config.json +\n"
            "model.safetensors; ModernBertForMaskedLM or ModernBertForSequenceClassification) on one packed batch and\n"
            "prints the loss.\n"
            "\n"
            "BATCH holds input_ids (I32 [N]), cu_seqlens (I32 [B+1], starting at 0) and labels: I32 [N] with -100 for\n"
            "unlabelled tokens (masked LM), or I32/F32 [B] per sequence (classifier; F32 for regression).\n"
            "OUT receives loss (F32 []), logits (F32 [rows, classes]; masked LM: the labelled tokens in token order;\n"
            "omitted by cuda when labelled rows x vocab exceeds 4M)\n"
            "and grad.<HF parameter name> (F32) for every parameter; grad.model.embeddings.tok_embeddings.weight holds\n"
            "the full tied gradient (decoder + lookup, the lookup skipping the pad id). The loss is the mean over\n"
            "labelled tokens (or sequences), as transformers computes it.\n"
            "\n"
            "  --model DIR         checkpoint directory\n"
            "  --batch FILE        batch in safetensors format\n"
            "  --out FILE          where to write loss, logits and gradients (optional)\n"
            "  --device NAME       cpu (default, fp32 reference) or cuda (bf16 activations, fp32 weights and gradients)\n"
            "  --help              this text\n");
}

static int parse_options(int argc, char **argv, check_options *o) {
    static const struct option long_options[] = {
        {"model", required_argument, NULL, 'm'}, {"batch", required_argument, NULL, 'b'},
        {"out", required_argument, NULL, 'o'},   {"device", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0}};
    memset(o, 0, sizeof *o);
    o->device = "cpu";
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
        switch (c) {
        case 'm': o->model_dir = optarg; break;
        case 'b': o->batch_path = optarg; break;
        case 'o': o->out_path = optarg; break;
        case 'd': o->device = optarg; break;
        case 'h': print_help(stdout); return 1;
        default: print_help(stderr); return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "modernbert check: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (o->model_dir == NULL || o->batch_path == NULL) {
        fprintf(stderr, "modernbert check: --model and --batch are required (see --help)\n");
        return -1;
    }
    return 0;
}

static int write_outputs(const char *path, const mb_model *model, const float *grads, float loss, const float *logits,
                         int rows, int cols, mb_error *err) {
    const mb_param_table *table = &model->table;
    int fixed = logits != NULL ? 2 : 1; /* loss, and logits when the backend returned them */
    int count = table->count + fixed;
    mb_st_entry *entries = calloc((size_t)count, sizeof *entries);
    mb_param_entry_name *names = calloc((size_t)table->count, sizeof *names);
    if (entries == NULL || names == NULL) {
        free(entries);
        free(names);
        return mb_fail(err, "out of memory");
    }
    entries[0] = (mb_st_entry){.name = "loss", .dtype = MB_DTYPE_F32, .ndim = 0, .data = &loss};
    if (logits != NULL)
        entries[1] = (mb_st_entry){.name = "logits", .dtype = MB_DTYPE_F32, .ndim = 2, .shape = {rows, cols},
                                   .data = logits};
    mb_param_entries(table, grads, "grad.", entries + fixed, names);
    const char *keys[] = {"format"}, *values[] = {"pt"};
    int rc = mb_st_write(path, entries, count, keys, values, 1, err);
    free(entries);
    free(names);
    return rc;
}

/* One forward + backward through the backend boundary (cpu or cuda), gradients read back with read_grads. */
static int run_check(const check_options *o, mb_model *model, const mb_batch_file *lb, mb_error *err) {
    float *grads = calloc(model->table.total_numel, sizeof(float));
    if (grads == NULL) return mb_fail(err, "out of memory for gradients");
    mb_backend *backend = NULL;
    mb_forward_result result;
    float *logits = NULL;
    int rc = mb_backend_create(&backend, o->device, &model->config, err);
    if (rc == 0) rc = backend->ops->write_params(backend, model->params, err);
    if (rc == 0) rc = backend->ops->zero_grads(backend, err);
    double start = mb_monotonic_seconds();
    if (rc == 0) rc = backend->ops->forward(backend, &lb->batch, &result, err);
    if (rc == 0 && result.loss_count == 0) rc = mb_fail(err, "%s: the batch has no labelled tokens", o->batch_path);
    size_t logit_count = rc == 0 && result.logits != NULL ? (size_t)result.logit_rows * result.logit_cols : 0;
    if (rc == 0 && result.logits != NULL) {
        logits = malloc((logit_count ? logit_count : 1) * sizeof(float));
        if (logits == NULL) rc = mb_fail(err, "out of memory for logits");
        else memcpy(logits, result.logits, logit_count * sizeof(float));
    }
    if (rc == 0) rc = backend->ops->backward(backend, (float)(1.0 / result.loss_count), err);
    if (rc == 0) rc = backend->ops->read_grads(backend, grads, err); /* waits for the GPU: part of the timing */
    double seconds = mb_monotonic_seconds() - start;
    if (rc == 0) {
        float loss = (float)(result.loss_sum / result.loss_count);
        const char *precision = strcmp(backend->ops->name, "cpu") == 0
                                    ? "fp32 reference"
                                    : "bf16 activations, fp32 master weights and gradients";
        printf("device %s (%s): %d tokens in %d sequences, %d loss rows, forward+backward %.3f s\n",
               backend->ops->name, precision, lb->batch.token_count, lb->batch.sequence_count, result.loss_count,
               seconds);
        printf("loss %.8f\n", loss);
        if (logits == NULL) printf("logits not returned by this backend for this batch (too many rows x classes)\n");
        if (o->out_path != NULL)
            rc = write_outputs(o->out_path, model, grads, loss, logits, result.logit_rows, result.logit_cols, err);
        if (rc == 0 && o->out_path != NULL) printf("wrote %s\n", o->out_path);
        if (rc == 0 && strcmp(backend->ops->name, "cpu") != 0) {
            char report[512];
            backend->ops->memory_report(backend, report, sizeof report);
            printf("%s\n", report);
        }
    }
    free(logits);
    mb_backend_destroy(backend);
    free(grads);
    return rc;
}

int mb_cmd_check(int argc, char **argv) {
    check_options o;
    int parsed = parse_options(argc, argv, &o);
    if (parsed != 0) return parsed > 0 ? 0 : 2;
    mb_error err = {{0}};
    if (strcmp(o.device, "cpu") != 0 && strcmp(o.device, "cuda") != 0) {
        fprintf(stderr, "modernbert check: --device must be cpu or cuda (got '%s')\n", o.device);
        return 2;
    }
    mb_model model;
    if (mb_model_load_hf(&model, o.model_dir, &err) != 0) {
        fprintf(stderr, "modernbert check: %s\n", err.message);
        return 1;
    }
    mb_batch_file lb;
    int rc = mb_batch_file_load(&lb, o.batch_path, &model.config, &err);
    if (rc == 0) {
        rc = run_check(&o, &model, &lb, &err);
        mb_batch_file_free(&lb);
    }
    if (rc != 0) fprintf(stderr, "modernbert check: %s\n", err.message);
    mb_model_free(&model);
    return rc == 0 ? 0 : 1;
}
