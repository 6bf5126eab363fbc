/* GLUE readers on the hand-written fixtures in tests/fixtures/glue (the real column layouts, headers, CoLA without
 * a header, MRPC's byte-order mark, a broken QQP row, CRLF line ends in WNLI dev), malformed files, and encoding
 * against ids that Hugging Face `tokenizers` produced (tests/fixtures/glue/expected_encodings.json). */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/fileio.h"
#include "data/glue.h"

#define FIXTURES MB_SOURCE_DIR "/tests/fixtures/glue"

static mb_glue_split read_split(mb_glue_task task, const char *dir, const char *name) {
    mb_glue_split split;
    mb_error err = {{0}};
    int rc = mb_glue_read_split(&split, task, dir, name, &err);
    cr_assert_eq(rc, 0, "%s", err.message);
    return split;
}

Test(glue_tasks, names) {
    mb_glue_task task;
    mb_error err = {{0}};
    cr_assert_eq(mb_glue_task_from_name("SST-2", &task, &err), 0);
    cr_assert_eq(task, MB_GLUE_SST2);
    cr_assert_eq(mb_glue_task_from_name("sts_b", &task, &err), 0);
    cr_assert_eq(task, MB_GLUE_STSB);
    cr_assert_eq(mb_glue_task_from_name("MNLI", &task, &err), 0);
    cr_assert_eq(task, MB_GLUE_MNLI);
    cr_assert_neq(mb_glue_task_from_name("squad", &task, &err), 0);
    cr_assert_not_null(strstr(err.message, "squad"));
    const mb_glue_task_info *mnli = mb_glue_task_get(MB_GLUE_MNLI);
    cr_assert_str_eq(mnli->label_names[0], "entailment");  /* HF datasets order */
    cr_assert_str_eq(mnli->label_names[2], "contradiction");
    cr_assert_eq(mb_glue_task_get(MB_GLUE_STSB)->num_labels, 1);
    cr_assert_str_eq(mb_glue_task_get(MB_GLUE_WNLI)->label_names[1], "entailment");
}

Test(glue_read, cola_without_header_and_quotes_kept) {
    mb_glue_split s = read_split(MB_GLUE_COLA, FIXTURES, "train");
    cr_assert_eq(s.count, 6, "the first line is data, not a header");
    cr_assert(s.labelled);
    cr_assert_str_eq(s.examples[0].text_a, "Our friends won't buy this analysis, let alone the next one we propose.");
    cr_assert_eq(s.examples[0].label, 1.0f);
    cr_assert_eq(s.examples[1].label, 0.0f);
    cr_assert_null(s.examples[1].text_b);
    cr_assert_str_eq(s.examples[4].text_a, "She said \"hello\" to the \"new\" neighbours.", "no quote processing");
    cr_assert_eq(s.examples[5].line, 6);
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_COLA, FIXTURES "/CoLA", "test");
    cr_assert_eq(s.count, 3);
    cr_assert_eq(s.labelled, 0);
    cr_assert_str_eq(s.examples[2].text_a, "Bill pushed Harry off the sofa for hours.");
    cr_assert_eq(s.examples[2].index, 2);
    cr_assert_eq(s.examples[2].label, -1.0f);
    mb_glue_split_free(&s);
}

Test(glue_read, sst2_keeps_trailing_space) {
    mb_glue_split s = read_split(MB_GLUE_SST2, FIXTURES, "train");
    cr_assert_eq(s.count, 6);
    cr_assert_str_eq(s.examples[0].text_a, "it 's a charming and often affecting journey . ");
    cr_assert_eq(s.examples[1].label, 0.0f);
    cr_assert_eq(s.examples[1].line, 3, "line numbers count the header");
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_SST2, FIXTURES, "test");
    cr_assert_eq(s.count, 2);
    cr_assert_eq(s.examples[1].index, 1);
    cr_assert_str_eq(s.examples[0].text_a, "uneasy mishmash of styles and genres .");
    mb_glue_split_free(&s);
}

Test(glue_read, mrpc_byte_order_mark) {
    char *raw = NULL;
    size_t size = 0;
    mb_error err = {{0}};
    cr_assert_eq(mb_read_file(FIXTURES "/MRPC/train.tsv", &raw, &size, &err), 0);
    cr_assert_eq(memcmp(raw, "\xEF\xBB\xBFQuality", 10), 0, "the fixture starts with a BOM");
    free(raw);
    mb_glue_split s = read_split(MB_GLUE_MRPC, FIXTURES, "train");
    cr_assert_eq(s.count, 4);
    cr_assert_eq(s.examples[0].label, 1.0f);
    cr_assert_eq(s.examples[1].label, 0.0f);
    cr_assert_str_eq(s.examples[0].text_b, "Referring to him as only \" the witness \" , Amrozi accused his brother of "
                                           "deliberately distorting his evidence .");
    cr_assert_eq(s.skipped, 0);
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_MRPC, FIXTURES, "test");
    cr_assert_eq(s.count, 2);
    cr_assert_str_eq(s.examples[1].text_a, "The world 's two largest automakers said their U.S. sales declined more "
                                           "than predicted last month .");
    mb_glue_split_free(&s);
}

Test(glue_read, qqp_malformed_rows_skipped_and_counted) {
    mb_glue_split s = read_split(MB_GLUE_QQP, FIXTURES, "train");
    cr_assert_eq(s.count, 5);
    cr_assert_eq(s.skipped, 2, "both halves of the row broken by a newline");
    cr_assert_str_eq(s.examples[3].text_a, "What are some good baby girl names starting with D?");
    cr_assert_eq(s.examples[3].line, 7);
    cr_assert_eq(s.examples[3].index, 3, "positions count kept rows only");
    cr_assert_eq(s.examples[4].label, 1.0f);
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_QQP, FIXTURES, "test");
    cr_assert_eq(s.count, 2);
    cr_assert_str_eq(s.examples[0].text_b, "Why are rockets and boosters painted white?");
    mb_glue_split_free(&s);
}

Test(glue_read, stsb_scores) {
    mb_glue_split s = read_split(MB_GLUE_STSB, FIXTURES, "train");
    cr_assert_eq(s.count, 7);
    cr_assert_float_eq(s.examples[1].label, 3.8f, 1e-6);
    cr_assert_float_eq(s.examples[6].label, 0.5f, 1e-6);
    cr_assert_str_eq(s.examples[3].text_a, "Three men are playing chess.");
    cr_assert_str_eq(s.examples[3].text_b, "Two men are playing chess.");
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_STSB, FIXTURES, "test");
    cr_assert_eq(s.count, 2);
    cr_assert_str_eq(s.examples[1].text_b, "A group of boys are playing soccer on the beach.");
    mb_glue_split_free(&s);
}

Test(glue_read, mnli_all_splits) {
    mb_glue_split s = read_split(MB_GLUE_MNLI, FIXTURES, "train");
    cr_assert_eq(s.count, 6);
    float expected[] = {1, 0, 0, 0, 1, 2};  /* neutral, entailment x3, neutral, contradiction */
    for (int i = 0; i < 6; i++) cr_assert_eq(s.examples[i].label, expected[i], "row %d", i);
    cr_assert_str_eq(s.examples[5].text_a, "The other villages and settlements are not as developed.");
    mb_glue_split_free(&s);
    /* dev files have label1..label5 before gold_label: the label is the last column */
    s = read_split(MB_GLUE_MNLI, FIXTURES, "dev_matched");
    cr_assert_eq(s.count, 3);
    cr_assert_eq(s.examples[0].label, 1.0f, "gold neutral although label2 is entailment");
    cr_assert_eq(s.examples[1].label, 2.0f);
    cr_assert_eq(s.examples[2].label, 0.0f);
    cr_assert_str_eq(s.examples[0].text_b, "Everyone really likes the newest benefits ");
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_MNLI, FIXTURES, "dev_mismatched");
    cr_assert_eq(s.count, 2);
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_MNLI, FIXTURES, "test_matched");
    cr_assert_eq(s.count, 1);
    cr_assert_eq(s.labelled, 0);
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_MNLI, FIXTURES, "test_mismatched");
    cr_assert_eq(s.count, 2);
    cr_assert_str_eq(s.examples[1].text_a, "Doctors do it.");
    mb_glue_split_free(&s);
}

Test(glue_read, qnli_rte_wnli) {
    mb_glue_split s = read_split(MB_GLUE_QNLI, FIXTURES, "train");
    cr_assert_eq(s.count, 4);
    cr_assert_eq(s.examples[0].label, 1.0f, "not_entailment is id 1");
    cr_assert_eq(s.examples[2].label, 0.0f);
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_RTE, FIXTURES, "dev");
    cr_assert_eq(s.count, 2);
    cr_assert_str_eq(s.examples[1].text_b, "Bacteria is winning the war against antibiotics.");
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_WNLI, FIXTURES, "dev");  /* CRLF line ends */
    cr_assert_eq(s.count, 2);
    cr_assert_eq(s.examples[0].label, 0.0f);
    cr_assert_eq(s.examples[1].label, 1.0f, "'1\\r' read as 1");
    cr_assert_str_eq(s.examples[1].text_b, "Susan did not answer.");
    mb_glue_split_free(&s);
    s = read_split(MB_GLUE_WNLI, FIXTURES, "test");
    cr_assert_eq(s.count, 1);
    mb_glue_split_free(&s);
}

/* ---- malformed files ---- */

static char temp_dir[256];

static void make_temp_dir(void) {
    snprintf(temp_dir, sizeof temp_dir, "/tmp/mb_glue_test_%d", (int)getpid());
    mb_error err = {{0}};
    cr_assert_eq(mb_make_dirs(temp_dir, &err), 0);
}

static void remove_temp_dir(void) {
    char command[300];
    snprintf(command, sizeof command, "rm -rf %s", temp_dir);
    cr_assert_eq(system(command), 0);
}

/* Writes text to TEMP/name and reads it as `task`; returns the error message (empty on success). */
static const char *read_text(mb_glue_task task, const char *name, const char *text, int labelled, char *path) {
    static mb_error err;
    mb_error_clear(&err);
    snprintf(path, 512, "%s/%s", temp_dir, name);
    FILE *f = fopen(path, "wb");
    fwrite(text, 1, strlen(text), f);
    fclose(f);
    mb_glue_split s;
    if (mb_glue_read_file(&s, task, path, labelled, &err) == 0) {
        mb_glue_split_free(&s);
        return "";
    }
    return err.message;
}

static void assert_error(const char *message, const char *path, int line, const char *fragment) {
    char where[600];
    snprintf(where, sizeof where, "%s:%d:", path, line);
    cr_assert_not_null(strstr(message, where), "expected '%s' in '%s'", where, message);
    cr_assert_not_null(strstr(message, fragment), "expected '%s' in '%s'", fragment, message);
}

Test(glue_malformed, errors_name_file_and_line, .init = make_temp_dir, .fini = remove_temp_dir) {
    char path[512];
    const char *m = read_text(MB_GLUE_SST2, "bad_label.tsv", "sentence\tlabel\ngood film \t1\nbad film \t2\n", 1, path);
    assert_error(m, path, 3, "label '2' is not one of '0', '1'");
    m = read_text(MB_GLUE_COLA, "short.tsv", "gj04\t1\t\tFine.\ngj04\t0\tBroken.\n", 1, path);
    assert_error(m, path, 2, "expected at least 4 tab-separated fields, found 3");
    m = read_text(MB_GLUE_STSB, "score.tsv",
                  "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                  "0\tg\tf\t2012\t0\tnone\tnone\tA.\tB.\tfive\n", 1, path);
    assert_error(m, path, 2, "score 'five' is not a number in [0, 5]");
    m = read_text(MB_GLUE_STSB, "range.tsv",
                  "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                  "0\tg\tf\t2012\t0\tnone\tnone\tA.\tB.\t5.5\n", 1, path);
    assert_error(m, path, 2, "not a number in [0, 5]");
    m = read_text(MB_GLUE_RTE, "header.tsv", "index\tpremise\thypothesis\tlabel\n0\tA.\tB.\tentailment\n", 1, path);
    assert_error(m, path, 1, "column 2 should be 'sentence1', found 'premise'");
    m = read_text(MB_GLUE_MNLI, "gold.tsv",
                  "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                  "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
                  "0\t1\t1n\tslate\t( A )\t( B )\t(ROOT A)\t(ROOT B)\tA.\tB.\tneutral\tneutral\n"
                  "1\t2\t2n\tslate\t( A )\t( B )\t(ROOT A)\t(ROOT B)\tA.\tB.\t-\t-\n", 1, path);
    assert_error(m, path, 3, "label '-' is not one of 'entailment', 'neutral', 'contradiction'");
    m = read_text(MB_GLUE_QNLI, "index.tsv", "index\tquestion\tsentence\n0\tQ?\tS.\nx1\tQ?\tS.\n", 0, path);
    assert_error(m, path, 3, "index 'x1' is not a non-negative integer");
    m = read_text(MB_GLUE_SST2, "blank.tsv", "sentence\tlabel\nfine \t1\n\nok \t0\n", 1, path);
    assert_error(m, path, 3, "expected at least 2 tab-separated fields, found 1");
    m = read_text(MB_GLUE_SST2, "empty.tsv", "", 1, path);
    cr_assert_not_null(strstr(m, "empty"), "%s", m);
    m = read_text(MB_GLUE_SST2, "test_as_train.tsv", "index\tsentence\n0\tfine\n", 1, path);
    assert_error(m, path, 1, "column 1 should be 'sentence', found 'index'");
    /* a train file read as test: the header names the wrong columns */
    m = read_text(MB_GLUE_SST2, "train_as_test.tsv", "sentence\tlabel\nfine \t1\n", 0, path);
    assert_error(m, path, 1, "should be 'sentence', found 'label'");
    /* MRPC skips short rows instead of failing, and counts them */
    m = read_text(MB_GLUE_MRPC, "mrpc.tsv",
                  "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA .\tB .\n0\t3\t4\tC .\n", 1, path);
    cr_assert_str_eq(m, "");
    mb_glue_split s;
    mb_error err = {{0}};
    cr_assert_eq(mb_glue_read_file(&s, MB_GLUE_MRPC, path, 1, &err), 0);
    cr_assert_eq(s.count, 1);
    cr_assert_eq(s.skipped, 1);
    mb_glue_split_free(&s);
    /* a missing file or folder */
    cr_assert_neq(mb_glue_read_split(&s, MB_GLUE_RTE, temp_dir, "dev", &err), 0);
    cr_assert_not_null(strstr(err.message, "RTE/dev.tsv"), "%s", err.message);
}

/* ---- truncation and encoding ---- */

Test(glue_encode, longest_first_lengths) {
    size_t a, b;
    mb_glue_truncate_lengths(10, 3, 5, &a, &b);  /* the longer first text gets the odd token */
    cr_assert(a == 3 && b == 2, "%zu %zu", a, b);
    mb_glue_truncate_lengths(3, 10, 5, &a, &b);
    cr_assert(a == 2 && b == 3, "%zu %zu", a, b);
    mb_glue_truncate_lengths(10, 3, 7, &a, &b);  /* the shorter fits in half: kept whole */
    cr_assert(a == 4 && b == 3, "%zu %zu", a, b);
    mb_glue_truncate_lengths(10, 10, 5, &a, &b);  /* equal: the second gets the odd token */
    cr_assert(a == 2 && b == 3, "%zu %zu", a, b);
    mb_glue_truncate_lengths(4, 2, 8, &a, &b);  /* fits: untouched */
    cr_assert(a == 4 && b == 2, "%zu %zu", a, b);
    mb_glue_truncate_lengths(6, 8, 1, &a, &b);
    cr_assert(a == 0 && b == 1, "%zu %zu", a, b);
    mb_glue_truncate_lengths(9, -1, 4, &a, &b);  /* a single text */
    cr_assert(a == 4 && b == 0, "%zu %zu", a, b);
}

static cJSON *load_expected(void) {
    char *text = NULL;
    size_t size = 0;
    mb_error err = {{0}};
    cr_assert_eq(mb_read_file(FIXTURES "/expected_encodings.json", &text, &size, &err), 0, "%s", err.message);
    cJSON *root = cJSON_Parse(text);
    free(text);
    cr_assert_not_null(root);
    return root;
}

Test(glue_encode, matches_hf_tokenizers_truncation) {
    mb_tokenizer *tok = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_load(&tok, MB_SOURCE_DIR "/data/tokenizer.json", &err), 0, "%s", err.message);
    cJSON *root = load_expected(), *item = NULL;
    int checked = 0;
    cJSON_ArrayForEach(item, cJSON_GetObjectItem(root, "cases")) {
        const cJSON *b = cJSON_GetObjectItem(item, "b");
        mb_glue_example example = {0, cJSON_GetObjectItem(item, "a")->valuestring,
                                   cJSON_IsString(b) ? b->valuestring : NULL, 1.0f, 1};
        /* a one-example split of a task with the right arity */
        mb_glue_split split = {.task = example.text_b ? MB_GLUE_RTE : MB_GLUE_SST2, .labelled = 1,
                               .examples = &example, .count = 1};
        snprintf(split.path, sizeof split.path, "expected_encodings.json");
        int max_length = cJSON_GetObjectItem(item, "max_length")->valueint;
        mb_glue_encoded enc;
        cr_assert_eq(mb_glue_encode(&split, tok, max_length, &enc, &err), 0, "%s", err.message);
        const cJSON *ids = cJSON_GetObjectItem(item, "ids");
        cr_assert_eq(enc.offsets[1], (size_t)cJSON_GetArraySize(ids), "case %d: %zu tokens, HF %d", checked,
                     enc.offsets[1], cJSON_GetArraySize(ids));
        for (int i = 0; i < cJSON_GetArraySize(ids); i++)
            cr_assert_eq(enc.ids[i], cJSON_GetArrayItem(ids, i)->valueint, "case %d, token %d", checked, i);
        cr_assert_eq(enc.truncated, (size_t)(enc.offsets[1] == (size_t)max_length && max_length < 256));
        mb_glue_encoded_free(&enc);
        checked++;
    }
    cr_assert_eq(checked, 12);
    cJSON_Delete(root);
    mb_tokenizer_free(tok);
}

Test(glue_encode, whole_split_layout) {
    mb_tokenizer *tok = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_load(&tok, MB_SOURCE_DIR "/data/tokenizer.json", &err), 0, "%s", err.message);
    mb_special_ids special = mb_tokenizer_special_ids(tok);
    mb_glue_split s = read_split(MB_GLUE_MRPC, FIXTURES, "dev");
    mb_glue_encoded enc;
    cr_assert_eq(mb_glue_encode(&s, tok, 256, &enc, &err), 0, "%s", err.message);
    cr_assert_eq(enc.count, 3);
    cr_assert_eq(enc.truncated, 0);
    for (size_t i = 0; i < enc.count; i++) {
        /* [CLS] A [SEP] B [SEP] equals the tokenizer's own template encoding */
        mb_token_list expected = {0};
        const mb_glue_example *e = &s.examples[i];
        cr_assert_eq(mb_tokenizer_encode_template(tok, e->text_a, strlen(e->text_a), e->text_b, strlen(e->text_b),
                                                  &expected, &err), 0);
        cr_assert_eq(enc.offsets[i + 1] - enc.offsets[i], expected.count);
        cr_assert_eq(memcmp(enc.ids + enc.offsets[i], expected.ids, expected.count * sizeof(int32_t)), 0);
        cr_assert_eq(enc.ids[enc.offsets[i]], special.cls);
        cr_assert_eq(enc.ids[enc.offsets[i + 1] - 1], special.sep);
        cr_assert_eq(enc.labels[i], e->label);
        mb_token_list_free(&expected);
    }
    cr_assert_eq(enc.total_tokens, enc.offsets[3]);
    mb_glue_encoded_free(&enc);
    cr_assert_neq(mb_glue_encode(&s, tok, 2, &enc, &err), 0, "a pair needs 3 special tokens");
    cr_assert_eq(mb_glue_encode(&s, tok, 9, &enc, &err), 0, "%s", err.message);
    cr_assert_eq(enc.truncated, 3);
    for (size_t i = 0; i < enc.count; i++) cr_assert_eq(enc.offsets[i + 1] - enc.offsets[i], 9);
    mb_glue_encoded_free(&enc);
    mb_glue_split_free(&s);
    /* an unlabelled split still gets valid targets (0) for the model, and keeps the file's index */
    s = read_split(MB_GLUE_MNLI, FIXTURES, "test_mismatched");
    cr_assert_eq(mb_glue_encode(&s, tok, 64, &enc, &err), 0, "%s", err.message);
    cr_assert_eq(enc.labels[1], 0.0f);
    cr_assert_eq(enc.indices[1], 1);
    mb_glue_encoded_free(&enc);
    mb_glue_split_free(&s);
    mb_tokenizer_free(tok);
}
