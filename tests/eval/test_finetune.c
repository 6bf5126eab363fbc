/* Fine-tuning end to end on the GLUE fixtures with a tiny model (hidden 32, 2 layers) on the CPU backend:
 * configuration errors, determinism, regression and classification heads, the MNLI → RTE start, evaluation,
 * GLUE submission files, the exported transformers checkpoint (reloads with the same logits), and the glue command. */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/fileio.h"
#include "data/tokenizer.h"
#include "model/backend.h"
#include "model/model.h"
#include "train/finetune.h"

#define FIXTURES MB_SOURCE_DIR "/tests/fixtures/glue"

static char root[256], init_dir[300];

/* A randomly initialised masked-LM checkpoint, as `modernbert pretrain` writes one. */
static void make_init_checkpoint(void) {
    mb_error err = {{0}};
    snprintf(root, sizeof root, "/tmp/mb_finetune_test_%d", (int)getpid());
    snprintf(init_dir, sizeof init_dir, "%s/init", root);
    cr_assert_eq(mb_make_dirs(init_dir, &err), 0, "%s", err.message);
    mb_tokenizer *tok = NULL;
    cr_assert_eq(mb_tokenizer_load(&tok, MB_SOURCE_DIR "/data/tokenizer.json", &err), 0, "%s", err.message);
    mb_special_ids special = mb_tokenizer_special_ids(tok);
    mb_config config;
    cr_assert_eq(mb_config_preset(&config, "tiny", &err), 0, "%s", err.message);
    config.vocab_size = (mb_tokenizer_vocab_size(tok) + 63) / 64 * 64;
    config.hidden_size = 32;
    config.intermediate_size = 48;
    config.num_hidden_layers = 2;
    config.num_attention_heads = 2;
    config.pad_token_id = special.pad;
    config.cls_token_id = config.bos_token_id = special.cls;
    config.sep_token_id = config.eos_token_id = special.sep;
    config.head = MB_HEAD_MASKED_LM;
    cr_assert_eq(mb_config_finalize(&config, &err), 0, "%s", err.message);
    mb_model model;
    cr_assert_eq(mb_model_create(&model, &config, &err), 0, "%s", err.message);
    mb_params_init(&model.table, &config, model.params, 1234);
    cr_assert_eq(mb_model_save_hf(&model, init_dir, &err), 0, "%s", err.message);
    mb_model_free(&model);
    mb_tokenizer_free(tok);
    char *text = NULL;
    size_t size = 0;
    char path[400];
    cr_assert_eq(mb_read_file(MB_SOURCE_DIR "/data/tokenizer.json", &text, &size, &err), 0);
    snprintf(path, sizeof path, "%s/tokenizer.json", init_dir);
    cr_assert_eq(mb_write_file_atomic(path, text, size, &err), 0);
    free(text);
}

static void remove_root(void) {
    char command[300];
    snprintf(command, sizeof command, "rm -rf %s", root);
    cr_assert_eq(system(command), 0);
}

/* Loads the defaults plus the tiny-run settings plus `extra` (NULL-terminated). */
static int load_config(mb_finetune_config *config, const char *task, const char *output, const char *init,
                       const char *const *extra, mb_error *err) {
    char a[600], b[600], c[600], d[600];
    snprintf(a, sizeof a, "data.task=%s", task);
    snprintf(b, sizeof b, "data.dir=%s", FIXTURES);
    snprintf(c, sizeof c, "model.init=%s", init ? init : init_dir);
    snprintf(d, sizeof d, "run.output_dir=%s/%s", root, output);
    char *overrides[32] = {a, b, c, d, "run.backend=cpu", "data.max_seq_len=32", "training.micro_batch_tokens=64",
                           "training.batch_size=4", "optimizer.lr=2e-3", "training.early_stopping_patience=0"};
    int count = 10;
    for (int i = 0; extra && extra[i]; i++) overrides[count++] = (char *)extra[i];
    return mb_finetune_config_load(config, NULL, overrides, count, err);
}

static void finetune_ok(const char *task, const char *output, const char *init, const char *const *extra,
                        mb_finetune_result *result) {
    mb_finetune_config config;
    mb_error err = {{0}};
    cr_assert_eq(load_config(&config, task, output, init, extra, &err), 0, "%s", err.message);
    cr_assert_eq(mb_finetune(&config, result, &err), 0, "%s", err.message);
}

static cJSON *read_json(const char *path) {
    char *text = NULL;
    size_t size = 0;
    mb_error err = {{0}};
    cr_assert_eq(mb_read_file(path, &text, &size, &err), 0, "%s", err.message);
    cJSON *json = cJSON_Parse(text);
    free(text);
    cr_assert_not_null(json, "%s", path);
    return json;
}

TestSuite(finetune, .init = make_init_checkpoint, .fini = remove_root);

Test(finetune, configuration_errors) {
    mb_finetune_config config;
    mb_error err = {{0}};
    char *none[] = {"model.init=x", "data.dir=y"};
    cr_assert_neq(mb_finetune_config_load(&config, NULL, none, 2, &err), 0);
    cr_assert_not_null(strstr(err.message, "data.task"), "%s", err.message);
    const char *names[] = {"model.label_names=[a, b, c]", NULL};
    cr_assert_neq(load_config(&config, "sst2", "x", NULL, names, &err), 0);
    cr_assert_not_null(strstr(err.message, "SST-2 has 2 labels, 3 names given"), "%s", err.message);
    const char *tokens[] = {"training.micro_batch_tokens=16", NULL};
    cr_assert_neq(load_config(&config, "sst2", "x", NULL, tokens, &err), 0);
    cr_assert_not_null(strstr(err.message, "training.micro_batch_tokens"), "%s", err.message);
    cr_assert_neq(load_config(&config, "imdb", "x", NULL, NULL, &err), 0);
    cr_assert_not_null(strstr(err.message, "unknown GLUE task 'imdb'"), "%s", err.message);
    const char *typo[] = {"training.epoch=3", NULL};
    cr_assert_neq(load_config(&config, "sst2", "x", NULL, typo, &err), 0);
    cr_assert_not_null(strstr(err.message, "epoch"), "%s", err.message);
    /* a preset reads; its values arrive */
    char *flags[] = {"data.dir=d", "model.init=i"};
    cr_assert_eq(mb_finetune_config_load(&config, MB_SOURCE_DIR "/configs/glue/cola-base.yaml", flags, 2, &err), 0,
                 "%s", err.message);
    cr_assert_float_eq(config.optimizer.lr, 8e-5, 1e-15);
    cr_assert_float_eq(config.optimizer.weight_decay, 1e-6, 1e-18);
    cr_assert_eq(config.training.epochs, 5);
    cr_assert_eq(config.training.batch_size, 64);
    cr_assert_eq(config.data.max_seq_len, 256);
}

Test(finetune, same_seed_same_result) {
    const char *extra[] = {"training.epochs=2", NULL};
    mb_finetune_result *a = malloc(sizeof *a), *b = malloc(sizeof *b), *c = malloc(sizeof *c);
    finetune_ok("sst2", "det-a", NULL, extra, a);
    finetune_ok("sst2", "det-b", NULL, extra, b);
    cr_assert_eq(a->epochs_run, 2);
    cr_assert_eq(a->steps, 4, "6 examples in steps of 4: 2 steps per epoch");
    for (int e = 0; e < 2; e++) {
        cr_assert(isfinite(a->history[e].train_loss));
        cr_assert_eq(memcmp(&a->history[e].train_loss, &b->history[e].train_loss, sizeof(double)), 0,
                     "epoch %d: %.17g vs %.17g", e + 1, a->history[e].train_loss, b->history[e].train_loss);
        cr_assert_eq(memcmp(&a->history[e].dev[0].accuracy, &b->history[e].dev[0].accuracy, sizeof(double)), 0);
    }
    char pa[600], pb[600];
    char *ta = NULL, *tb = NULL;
    size_t sa = 0, sb = 0;
    mb_error err = {{0}};
    snprintf(pa, sizeof pa, "%s/model.safetensors", a->best_dir);
    snprintf(pb, sizeof pb, "%s/model.safetensors", b->best_dir);
    cr_assert_eq(mb_read_file(pa, &ta, &sa, &err), 0);
    cr_assert_eq(mb_read_file(pb, &tb, &sb, &err), 0);
    cr_assert(sa == sb && memcmp(ta, tb, sa) == 0, "the best checkpoints are byte-identical");
    free(ta);
    free(tb);
    const char *other_seed[] = {"training.epochs=2", "run.seed=18", NULL};
    finetune_ok("sst2", "det-c", NULL, other_seed, c);
    cr_assert_neq(c->history[0].train_loss, a->history[0].train_loss, "the seed matters");
    const char *scratch[] = {"training.epochs=2", "model.from_scratch=true", NULL};
    finetune_ok("sst2", "det-d", NULL, scratch, c);
    cr_assert_neq(c->history[0].train_loss, a->history[0].train_loss, "random weights instead of the checkpoint's");
    free(a);
    free(b);
    free(c);
}

/* Reads BEST/<split>_predictions.tsv: per row the prediction and the logits. */
static int read_predictions(const char *path, int num_labels, float *predictions, float *logits, int capacity) {
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "%s", path);
    char line[4096];
    cr_assert_not_null(fgets(line, sizeof line, f));
    cr_assert_eq(strncmp(line, "index\tlabel\tprediction\tlogit_0", 30), 0, "%s", line);
    int rows = 0;
    while (rows < capacity && fgets(line, sizeof line, f)) {
        char *cursor = line;
        strtol(cursor, &cursor, 10);
        strtof(cursor, &cursor);
        predictions[rows] = strtof(cursor, &cursor);
        for (int k = 0; k < num_labels; k++) logits[rows * num_labels + k] = strtof(cursor, &cursor);
        rows++;
    }
    fclose(f);
    return rows;
}

Test(finetune, regression_export_reload_eval) {
    const char *extra[] = {"training.epochs=3", NULL};
    mb_finetune_result *r = malloc(sizeof *r);
    finetune_ok("stsb", "stsb", NULL, extra, r);
    cr_assert_eq(r->best_epoch >= 1 && r->best_epoch <= 3, 1);
    cr_assert(isfinite(r->best[0].pearson) && isfinite(r->best[0].spearman));
    cr_assert_float_eq(r->best[0].main, r->best[0].spearman, 0.0);
    /* the export is a transformers sequence-classification checkpoint with a regression head */
    char path[700];
    snprintf(path, sizeof path, "%s/config.json", r->best_dir);
    cJSON *config = read_json(path);
    cr_assert_str_eq(cJSON_GetArrayItem(cJSON_GetObjectItem(config, "architectures"), 0)->valuestring,
                     "ModernBertForSequenceClassification");
    cr_assert_eq(cJSON_GetObjectItem(config, "num_labels") ? cJSON_GetObjectItem(config, "num_labels")->valueint
                                                            : cJSON_GetArraySize(cJSON_GetObjectItem(config, "id2label")),
                 1);
    cr_assert_str_eq(cJSON_GetObjectItem(config, "problem_type")->valuestring, "regression");
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(config, "id2label"), "0")->valuestring, "score");
    cr_assert_str_eq(cJSON_GetObjectItem(config, "classifier_pooling")->valuestring, "mean");
    cJSON_Delete(config);
    snprintf(path, sizeof path, "%s/tokenizer.json", r->best_dir);
    cr_assert(mb_path_exists(path));
    /* reload: the logits of the saved model are those recorded at the best epoch */
    mb_model model;
    mb_error err = {{0}};
    cr_assert_eq(mb_model_load_hf(&model, r->best_dir, &err), 0, "%s", err.message);
    cr_assert_eq(model.config.head, MB_HEAD_SEQUENCE_CLASSIFIER);
    cr_assert_eq(model.config.num_labels, 1);
    mb_backend *backend = NULL;
    cr_assert_eq(mb_backend_create(&backend, "cpu", &model.config, &err), 0, "%s", err.message);
    cr_assert_eq(backend->ops->write_params(backend, model.params, &err), 0);
    mb_tokenizer *tok = NULL;
    snprintf(path, sizeof path, "%s/tokenizer.json", r->best_dir);
    cr_assert_eq(mb_tokenizer_load(&tok, path, &err), 0);
    mb_glue_split split;
    cr_assert_eq(mb_glue_read_split(&split, MB_GLUE_STSB, FIXTURES, "dev", &err), 0);
    mb_glue_encoded dev;
    cr_assert_eq(mb_glue_encode(&split, tok, 32, &dev, &err), 0);
    float predictions[8], logits[8], recorded_predictions[8], recorded_logits[8];
    cr_assert_eq(mb_finetune_predict(backend, &dev, 64, predictions, logits, &err), 0, "%s", err.message);
    snprintf(path, sizeof path, "%s/dev_predictions.tsv", r->best_dir);
    cr_assert_eq(read_predictions(path, 1, recorded_predictions, recorded_logits, 8), 4);
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(logits[i], recorded_logits[i], "row %d: %.9g vs %.9g", i, logits[i], recorded_logits[i]);
        cr_assert_eq(predictions[i], logits[i], "regression predicts the logit");
    }
    mb_glue_encoded_free(&dev);
    mb_glue_split_free(&split);
    mb_tokenizer_free(tok);
    mb_backend_destroy(backend);
    mb_model_free(&model);
    /* modernbert eval's path: the same scores, and STS-B test predictions in the submission format */
    char submission[600];
    snprintf(submission, sizeof submission, "%s/submission", root);
    /* micro-batches of the fine-tune's 64 tokens: the same packing, so the same GEMM shapes as its dev evaluation
     * (OpenBLAS's kernels for other shapes may round differently in the last bit: seen with its Haswell kernels on an
     * AMD EPYC, where 8192-token batches moved the Pearson by 1e-6) */
    mb_eval_options options = {.task = "stsb", .data_dir = FIXTURES, .model_dir = r->best_dir, .backend = "cpu",
                               .predictions_dir = submission, .micro_batch_tokens = 64};
    mb_eval_report report;
    cr_assert_eq(mb_glue_evaluate(&options, &report, &err), 0, "%s", err.message);
    cr_assert_eq(report.split_count, 1);
    cr_assert_float_eq(report.scores[0].pearson, r->best[0].pearson, 1e-12,
                       "max_seq_len came from finetune.json: %.17g vs %.17g", report.scores[0].pearson,
                       r->best[0].pearson);
    cr_assert_float_eq(report.scores[0].spearman, r->best[0].spearman, 1e-12);
    cr_assert_eq(report.file_count, 1);
    FILE *f = fopen(report.files[0], "r");
    char line[256];
    cr_assert_not_null(fgets(line, sizeof line, f));
    cr_assert_str_eq(line, "index\tprediction\n");
    for (int i = 0; i < 2; i++) {
        int index = -1;
        double score = -1;
        cr_assert_not_null(fgets(line, sizeof line, f));
        cr_assert_eq(sscanf(line, "%d\t%lf", &index, &score), 2, "%s", line);
        cr_assert_eq(index, i);
        cr_assert(score >= 0.0 && score <= 5.0);
    }
    cr_assert_null(fgets(line, sizeof line, f));
    fclose(f);
    cr_assert_not_null(strstr(report.files[0], "STS-B.tsv"));
    free(r);
}

Test(finetune, mnli_then_rte_and_submission) {
    mb_finetune_result *mnli = malloc(sizeof *mnli), *rte = malloc(sizeof *rte);
    const char *extra[] = {"training.epochs=1", NULL};
    finetune_ok("mnli", "mnli", NULL, extra, mnli);
    cr_assert_eq(mnli->dev_count, 2);
    cr_assert_str_eq(mnli->dev_names[1], "dev_mismatched");
    cr_assert_eq(mnli->best[0].count, 3);
    cr_assert_eq(mnli->best[1].count, 2);
    char path[700];
    snprintf(path, sizeof path, "%s/config.json", mnli->best_dir);
    cJSON *config = read_json(path);
    cJSON *id2label = cJSON_GetObjectItem(config, "id2label"), *label2id = cJSON_GetObjectItem(config, "label2id");
    cr_assert_str_eq(cJSON_GetObjectItem(id2label, "0")->valuestring, "entailment");
    cr_assert_str_eq(cJSON_GetObjectItem(id2label, "1")->valuestring, "neutral");
    cr_assert_str_eq(cJSON_GetObjectItem(id2label, "2")->valuestring, "contradiction");
    cr_assert_eq(cJSON_GetObjectItem(label2id, "contradiction")->valueint, 2);
    cJSON_Delete(config);
    /* RTE from the MNLI model: the backbone comes along, the 3-way classifier does not */
    finetune_ok("rte", "rte", mnli->best_dir, extra, rte);
    cr_assert_eq(rte->best_epoch, 1);
    mb_model m, r;
    mb_error err = {{0}};
    cr_assert_eq(mb_model_load_hf(&m, mnli->best_dir, &err), 0, "%s", err.message);
    cr_assert_eq(mb_model_load_hf(&r, rte->best_dir, &err), 0, "%s", err.message);
    cr_assert_eq(r.config.num_labels, 2);
    cr_assert_str_eq(r.config.label_names[1], "not_entailment");
    mb_model_free(&m);
    mb_model_free(&r);
    /* MNLI test predictions: two files in the GLUE submission format with label names */
    char submission[600];
    snprintf(submission, sizeof submission, "%s/mnli-submission", root);
    mb_eval_options options = {.task = "mnli", .data_dir = FIXTURES, .model_dir = mnli->best_dir,
                               .backend = "cpu", .predictions_dir = submission};
    mb_eval_report report;
    cr_assert_eq(mb_glue_evaluate(&options, &report, &err), 0, "%s", err.message);
    cr_assert_eq(report.split_count, 2);
    cr_assert_float_eq(report.scores[0].accuracy, mnli->best[0].accuracy, 1e-12);
    cr_assert_float_eq(report.scores[1].accuracy, mnli->best[1].accuracy, 1e-12);
    cr_assert_eq(report.file_count, 2);
    cr_assert_not_null(strstr(report.files[0], "MNLI-m.tsv"));
    cr_assert_not_null(strstr(report.files[1], "MNLI-mm.tsv"));
    FILE *f = fopen(report.files[1], "r");
    char line[256], label[64];
    int rows = 0, index;
    cr_assert_not_null(fgets(line, sizeof line, f));
    cr_assert_str_eq(line, "index\tprediction\n");
    while (fgets(line, sizeof line, f)) {
        cr_assert_eq(sscanf(line, "%d\t%63s", &index, label), 2);
        cr_assert_eq(index, rows);
        cr_assert(!strcmp(label, "entailment") || !strcmp(label, "neutral") || !strcmp(label, "contradiction"), "%s",
                  label);
        rows++;
    }
    fclose(f);
    cr_assert_eq(rows, 2);
    /* a checkpoint of the wrong shape for the task is refused */
    options.task = "sst2";
    options.predictions_dir = NULL;
    cr_assert_neq(mb_glue_evaluate(&options, &report, &err), 0);
    cr_assert_not_null(strstr(err.message, "not a sequence classifier with 2 label(s)"), "%s", err.message);
    free(mnli);
    free(rte);
}

Test(finetune, label_names_and_pooling) {
    const char *extra[] = {"training.epochs=1", "model.label_names=[ham, spam]", "model.pooling=cls",
                           "data.max_train_examples=4", NULL};
    mb_finetune_result *r = malloc(sizeof *r);
    finetune_ok("sst2", "names", NULL, extra, r);
    cr_assert_eq(r->train_examples, 4, "a seeded subset of the 6 rows");
    char path[700];
    snprintf(path, sizeof path, "%s/config.json", r->best_dir);
    cJSON *config = read_json(path);
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(config, "id2label"), "1")->valuestring, "spam");
    cr_assert_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(config, "label2id"), "ham")->valueint, 0);
    cr_assert_str_eq(cJSON_GetObjectItem(config, "classifier_pooling")->valuestring, "cls");
    cJSON_Delete(config);
    snprintf(path, sizeof path, "%s/names/results.json", root);
    cJSON *results = read_json(path);
    cr_assert_str_eq(cJSON_GetObjectItem(results, "task")->valuestring, "sst2");
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(results, "history")), 1);
    cr_assert_eq(cJSON_GetObjectItem(results, "train_examples")->valueint, 4);
    cJSON_Delete(results);
    free(r);
}

Test(finetune, glue_command_writes_table5) {
    char command[2048], path[600];
    snprintf(command, sizeof command,
             "cd %s && %s/modernbert glue --data %s --init %s --tasks rte,sst2,mnli --output %s/glue --name tiny "
             "--configs %s/configs/glue run.backend=cpu training.batch_size=4 training.epochs=1 data.max_seq_len=32 "
             "training.micro_batch_tokens=64 > %s/glue.log 2>&1",
             root, MB_BUILD_DIR, FIXTURES, init_dir, root, MB_SOURCE_DIR, root);
    cr_assert_eq(system(command), 0, "see %s/glue.log", root);
    snprintf(path, sizeof path, "%s/glue/results.md", root);
    char *md = NULL;
    size_t size = 0;
    mb_error err = {{0}};
    cr_assert_eq(mb_read_file(path, &md, &size, &err), 0, "%s", err.message);
    cr_assert_not_null(strstr(md, "| Model | Params | CoLA | SST-2 | MRPC | STS-B | QQP | MNLI | QNLI | RTE | Avg |"),
                       "%s", md);
    cr_assert_not_null(strstr(md, "| tiny | 1.6M | – | "), "%s", md);
    cr_assert_not_null(strstr(md, "(3/8) |"), "%s", md);
    free(md);
    snprintf(path, sizeof path, "%s/glue/results.json", root);
    cJSON *json = read_json(path);
    cJSON *tasks = cJSON_GetObjectItem(json, "tasks");
    cr_assert_eq(cJSON_GetArraySize(tasks), 3);
    const char *rte_init = cJSON_GetObjectItem(cJSON_GetObjectItem(tasks, "rte"), "init")->valuestring;
    cr_assert_not_null(strstr(rte_init, "glue/mnli/best"), "RTE starts from the MNLI model: %s", rte_init);
    cr_assert_float_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(tasks, "sst2"), "lr")->valuedouble, 8e-5, 1e-15,
                       "the SST-2 base preset (Table 6) was used");
    cJSON_Delete(json);
}
