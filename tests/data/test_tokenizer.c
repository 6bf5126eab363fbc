/* Tests of the tokenizer (src/data/tokenizer*.c).
 *
 * Parity: tests/fixtures/tokenizer/expected_*.json hold what Hugging Face tokenizers returns for the inputs in
 * tests/fixtures/tokenizer/inputs/ with data/tokenizer.json and two small tokenizers (tools/tokenizer_fixtures.py);
 * every id, template, pair and decode must match. The other tests need no fixture: the byte-level alphabet, the GPT-2
 * split, UTF-8 repair, merge ranks on hand-made vocabularies, round trips, concurrent encodes, malformed files. */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <utf8proc.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/rng.h"
#include "data/tokenizer.h"
#include "data/tokenizer_internal.h"

#define SHIPPED MB_SOURCE_DIR "/data/tokenizer.json"
#define FIXTURES MB_SOURCE_DIR "/tests/fixtures/tokenizer"

/* ---- helpers ---------------------------------------------------------------------------------------------------- */

static mb_tokenizer *load_or_die(const char *path) {
    mb_tokenizer *t = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_load(&t, path, &err), 0, "loading %s: %s", path, err.message);
    return t;
}

static mb_token_list encode(const mb_tokenizer *t, const char *text, size_t length) {
    mb_token_list ids = {0};
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_encode(t, text, length, &ids, &err), 0, "%s", err.message);
    return ids;
}

static char *decode(const mb_tokenizer *t, const int32_t *ids, size_t count, int skip_special) {
    char *text = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_decode(t, ids, count, skip_special, &text, &err), 0, "%s", err.message);
    return text;
}

static void assert_ids(const mb_token_list *got, const cJSON *expected, const char *what) {
    cr_assert(cJSON_IsArray(expected), "%s: expected ids missing", what);
    size_t n = (size_t)cJSON_GetArraySize(expected), i = 0;
    const cJSON *id;
    cJSON_ArrayForEach(id, expected) {
        cr_assert(i < got->count, "%s: %zu ids, expected %zu", what, got->count, n);
        cr_assert_eq(got->ids[i], (int32_t)id->valuedouble, "%s: id %zu is %d, expected %d", what, i, got->ids[i],
                     (int)id->valuedouble);
        i++;
    }
    cr_assert_eq(got->count, n, "%s: %zu ids, expected %zu", what, got->count, n);
}

static void assert_ids_are(const mb_token_list *got, const int32_t *expected, size_t n, const char *what) {
    cr_assert_eq(got->count, n, "%s: %zu ids, expected %zu", what, got->count, n);
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(got->ids[i], expected[i], "%s: id %zu is %d, expected %d", what, i, got->ids[i], expected[i]);
}

static char *read_whole(const char *path, size_t *size) {
    char *data = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_read_file(path, &data, size, &err), 0, "%s", err.message);
    return data;
}

static char *nfc(const char *text, size_t length, size_t *out_length) {
    char *out = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_tok_nfc(text, length, &out, out_length, &err), 0, "%s", err.message);
    return out;
}

/* ---- parity with Hugging Face tokenizers ------------------------------------------------------------------------ */

static void check_parity(const char *name) {
    char path[1024];
    snprintf(path, sizeof path, FIXTURES "/expected_%s.json", name);
    if (access(path, R_OK) != 0)
        cr_assert_fail("%s is missing: generate it with `python3 tools/tokenizer_fixtures.py` where the Python package "
                       "tokenizers is installed",
                       path);
    size_t size;
    char *json = read_whole(path, &size);
    cJSON *root = cJSON_ParseWithLength(json, size);
    cr_assert_not_null(root, "%s is not valid JSON", path);
    const cJSON *tokenizer_path = cJSON_GetObjectItem(root, "tokenizer");
    cr_assert(cJSON_IsString(tokenizer_path));
    char full[1024];
    snprintf(full, sizeof full, "%s/%s", MB_SOURCE_DIR, tokenizer_path->valuestring);
    mb_tokenizer *t = load_or_die(full);
    mb_error err = {{0}};

    const cJSON *added = cJSON_GetObjectItem(root, "added_token_ids"), *entry;
    cJSON_ArrayForEach(entry, added)
        cr_assert_eq(mb_tokenizer_token_to_id(t, entry->string), (int32_t)entry->valuedouble, "%s: id of \"%s\"", name,
                     entry->string);

    size_t compared = 0;
    const cJSON *cases = cJSON_GetObjectItem(root, "cases"), *c;
    cJSON_ArrayForEach(c, cases) {
        const char *file = cJSON_GetObjectItem(c, "file")->valuestring;
        char input_path[1024], what[1200];
        snprintf(input_path, sizeof input_path, FIXTURES "/inputs/%s", file);
        size_t length;
        char *text = read_whole(input_path, &length);

        mb_token_list plain = encode(t, text, length);
        snprintf(what, sizeof what, "%s %s plain", name, file);
        assert_ids(&plain, cJSON_GetObjectItem(c, "ids"), what);

        mb_token_list single = {0};
        cr_assert_eq(mb_tokenizer_encode_template(t, text, length, NULL, 0, &single, &err), 0, "%s", err.message);
        snprintf(what, sizeof what, "%s %s single", name, file);
        assert_ids(&single, cJSON_GetObjectItem(c, "single"), what);

        const char *keys[] = {"decode", "decode_single", "decode_single_skip"};
        const mb_token_list *lists[] = {&plain, &single, &single};
        for (int k = 0; k < 3; k++) {
            char *decoded = decode(t, lists[k]->ids, lists[k]->count, k == 2);
            cr_assert_str_eq(decoded, cJSON_GetObjectItem(c, keys[k])->valuestring, "%s %s %s", name, file, keys[k]);
            free(decoded);
        }
        mb_token_list_free(&plain);
        mb_token_list_free(&single);
        free(text);
        compared++;
    }
    const cJSON *pairs = cJSON_GetObjectItem(root, "pairs"), *p;
    cJSON_ArrayForEach(p, pairs) {
        char path_a[1024], path_b[1024], what[1200];
        const char *file_a = cJSON_GetObjectItem(p, "a")->valuestring;
        const char *file_b = cJSON_GetObjectItem(p, "b")->valuestring;
        snprintf(path_a, sizeof path_a, FIXTURES "/inputs/%s", file_a);
        snprintf(path_b, sizeof path_b, FIXTURES "/inputs/%s", file_b);
        size_t la, lb;
        char *a = read_whole(path_a, &la), *b = read_whole(path_b, &lb);
        mb_token_list ids = {0};
        cr_assert_eq(mb_tokenizer_encode_template(t, a, la, b, lb, &ids, &err), 0, "%s", err.message);
        snprintf(what, sizeof what, "%s pair %s + %s", name, file_a, file_b);
        assert_ids(&ids, cJSON_GetObjectItem(p, "ids"), what);
        mb_token_list_free(&ids);
        free(a);
        free(b);
        compared++;
    }
    cr_assert_gt(compared, 20, "%s: only %zu cases", name, compared);
    mb_tokenizer_free(t);
    cJSON_Delete(root);
    free(json);
}

Test(tokenizer_parity, shipped_tokenizer_matches_hf) { check_parity("shipped"); }
Test(tokenizer_parity, legacy_merges_nfc_unk_roberta_match_hf) { check_parity("tiny_legacy"); }
Test(tokenizer_parity, split_sequence_ignore_merges_template_match_hf) { check_parity("tiny_pairs"); }

/* ---- byte-level alphabet, split, UTF-8 -------------------------------------------------------------------------- */

Test(tokenizer_text, byte_alphabet_is_gpt2_bytes_to_unicode) {
    int seen[324] = {0};
    for (int b = 0; b < 256; b++) {
        uint32_t c = mb_tok_byte_to_char((uint8_t)b);
        cr_assert(c < 324, "byte %d -> U+%04X", b, c);
        cr_assert_eq(seen[c], 0, "U+%04X used twice", c);
        seen[c] = 1;
        cr_assert_eq(mb_tok_char_to_byte(c), b);
    }
    cr_assert_eq(mb_tok_byte_to_char(' '), 0x120);  /* Ġ */
    cr_assert_eq(mb_tok_byte_to_char('\n'), 0x10A); /* Ċ */
    cr_assert_eq(mb_tok_byte_to_char(0), 0x100);
    cr_assert_eq(mb_tok_byte_to_char(0x7F), 0x121);
    cr_assert_eq(mb_tok_byte_to_char(0xAD), 0x143);
    cr_assert_eq(mb_tok_byte_to_char('A'), 'A');
    cr_assert_eq(mb_tok_byte_to_char(0xE9), 0xE9);
    cr_assert_eq(mb_tok_char_to_byte(' '), -1); /* a plain space is not in the alphabet */
    cr_assert_eq(mb_tok_char_to_byte(0x144), -1);
}

static void assert_split(const char *text, const char *const *pieces) {
    size_t length = strlen(text), pos = 0, i = 0;
    while (pos < length) {
        size_t n = mb_tok_gpt2_match((const uint8_t *)text + pos, length - pos);
        cr_assert(pieces[i] != NULL, "\"%s\": extra piece \"%.*s\"", text, (int)n, text + pos);
        cr_assert(n == strlen(pieces[i]) && memcmp(text + pos, pieces[i], n) == 0,
                  "\"%s\": piece %zu is \"%.*s\", expected \"%s\"", text, i, (int)n, text + pos, pieces[i]);
        pos += n;
        i++;
    }
    cr_assert_null(pieces[i], "\"%s\": missing piece \"%s\"", text, pieces[i]);
}

Test(tokenizer_text, gpt2_split_follows_the_regex) {
    assert_split("Hello there       dear", (const char *[]){"Hello", " there", "      ", " dear", NULL});
    assert_split("a\n\nb", (const char *[]){"a", "\n", "\n", "b", NULL});
    assert_split("x  ", (const char *[]){"x", "  ", NULL});
    assert_split("  x", (const char *[]){" ", " x", NULL});
    assert_split(" \tx", (const char *[]){" ", "\t", "x", NULL});
    assert_split("don't 'S 'the", (const char *[]){"don", "'t", " '", "S", " '", "the", NULL});
    assert_split("we'll they're I've", (const char *[]){"we", "'ll", " they", "'re", " I", "'ve", NULL});
    assert_split("abc123 4.5!!", (const char *[]){"abc", "123", " 4", ".", "5", "!!", NULL});
    assert_split("x...'s", (const char *[]){"x", "...'", "s", NULL});
    /* U+00A0 and U+3000 are \s but not the optional ' ' of the letter / number / other alternatives. */
    assert_split("a\xC2\xA0" "b \xE3\x80\x80" "c",
                 (const char *[]){"a", "\xC2\xA0", "b", " ", "\xE3\x80\x80", "c", NULL});
    assert_split("caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC",
                 (const char *[]){"caf\xC3\xA9", " \xE6\x97\xA5\xE6\x9C\xAC", NULL});
    assert_split("\xC2\xB2\xC2\xBD x", (const char *[]){"\xC2\xB2\xC2\xBD", " x", NULL}); /* No is \p{N} */
    assert_split("e\xCC\x81", (const char *[]){"e", "\xCC\x81", NULL}); /* a combining mark is not \p{L} */
    assert_split("   ", (const char *[]){"   ", NULL});
}

static void assert_repaired(const char *bytes, size_t length, const char *expected) {
    char *out = NULL;
    size_t out_length = 0;
    cr_assert_eq(mb_tok_utf8_sanitize((const uint8_t *)bytes, length, &out, &out_length), 0);
    cr_assert_eq(out_length, strlen(expected));
    cr_assert_str_eq(out, expected);
    free(out);
}

#define FFFD "\xEF\xBF\xBD"
Test(tokenizer_text, invalid_utf8_becomes_fffd_per_maximal_subpart) {
    /* Python: bytes.decode('utf-8', errors='replace') */
    assert_repaired("a\xE2\x82z", 4, "a" FFFD "z");
    assert_repaired("\xED\xA0\x80", 3, FFFD FFFD FFFD);
    assert_repaired("\xC0\xAF", 2, FFFD FFFD);
    assert_repaired("\xF0\x9F\x98", 3, FFFD);
    assert_repaired("\xF4\x90\x80\x80", 4, FFFD FFFD FFFD FFFD);
    assert_repaired("\xFF\xFE", 2, FFFD FFFD);
    assert_repaired("ok \xE2\x82\xAC \xC3", 8, "ok \xE2\x82\xAC " FFFD);
    assert_repaired("\xE0\x80\x80", 3, FFFD FFFD FFFD);
    cr_assert_eq(mb_tok_utf8_valid_prefix((const uint8_t *)"ab\xC3\xA9\xC3", 5), 4);
}

Test(tokenizer_text, nfc_by_stretches_equals_nfc_of_the_whole) {
    /* mb_tok_nfc only normalizes the stretches around non-ASCII text; it must equal utf8proc's NFC of everything */
    const char *atoms[] = {"a", "e", "A", " ", "1", "\xCC\x81", "\xCC\x88", "\xCC\xA3", "\xCD\x85", "\xCD\x84",
                           "\xE1\x84\x80", "\xE1\x85\xA1", "\xE1\x86\xA8", "\xE2\x84\xAB", "\xC3\xA9",
                           "\xE0\xBD\xB3", "\xEF\xAC\x81", "\xE3\x82\x99", "\xE3\x81\x8B", "\xF0\x9D\x85\x9E"};
    mb_rng rng;
    mb_rng_seed(&rng, 99);
    char buffer[512];
    for (int round = 0; round < 2000; round++) {
        size_t length = 0;
        int count = (int)mb_rng_below(&rng, 30);
        for (int k = 0; k < count; k++) {
            const char *atom = atoms[mb_rng_below(&rng, sizeof atoms / sizeof *atoms)];
            memcpy(buffer + length, atom, strlen(atom));
            length += strlen(atom);
        }
        buffer[length] = '\0';
        size_t got_length;
        char *got = nfc(buffer, length, &got_length);
        utf8proc_uint8_t *whole = utf8proc_NFC((const utf8proc_uint8_t *)buffer);
        cr_assert_not_null(whole);
        cr_assert_str_eq(got, (const char *)whole, "NFC of \"%s\"", buffer);
        cr_assert_eq(got_length, strlen((const char *)whole));
        free(whole);
        free(got);
    }
}

/* ---- the shipped tokenizer -------------------------------------------------------------------------------------- */

Test(tokenizer_shipped, layout_and_special_ids) {
    mb_tokenizer *t = load_or_die(SHIPPED);
    cr_assert_eq(mb_tokenizer_vocab_size(t), 50304);
    mb_special_ids s = mb_tokenizer_special_ids(t);
    cr_assert_eq(s.unk, 50257);
    cr_assert_eq(s.cls, 50258);
    cr_assert_eq(s.sep, 50259);
    cr_assert_eq(s.pad, 50260);
    cr_assert_eq(s.mask, 50261);
    cr_assert_eq(mb_tokenizer_token_to_id(t, "<|endoftext|>"), 50256);
    cr_assert_eq(mb_tokenizer_token_to_id(t, "[unused41]"), 50303);
    cr_assert_eq(mb_tokenizer_token_to_id(t, "\xC4\xA0the"), 262); /* "Ġthe" */
    cr_assert_eq(mb_tokenizer_token_to_id(t, "no such token"), -1);
    cr_assert(mb_tokenizer_is_special(t, 50258) && mb_tokenizer_is_special(t, 50303));
    cr_assert(!mb_tokenizer_is_special(t, 262) && !mb_tokenizer_is_special(t, -1));
    cr_assert(!mb_tokenizer_is_special(t, 50304));

    mb_token_list ids = encode(t, "Hello world", 11);
    assert_ids_are(&ids, (const int32_t[]){15496, 995}, 2, "Hello world");
    mb_token_list_free(&ids);
    ids = encode(t, "a [MASK] b", 10); /* lstrip: [MASK] absorbs the space before it */
    assert_ids_are(&ids, (const int32_t[]){64, 50261, 275}, 3, "a [MASK] b");
    ids.count = 0; /* reuse the buffer */
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_encode_template(t, "x", 1, "", 0, &ids, &err), 0);
    assert_ids_are(&ids, (const int32_t[]){50258, 87, 50259, 50259}, 4, "pair with an empty B");
    /* encode appends */
    cr_assert_eq(mb_tokenizer_encode(t, "x", 1, &ids, &err), 0);
    assert_ids_are(&ids, (const int32_t[]){50258, 87, 50259, 50259, 87}, 5, "appended");
    mb_token_list_free(&ids);

    /* ids outside the vocabulary are skipped by decode, special ones on request */
    int32_t odd[] = {50258, 15496, -3, 999999, 995, 50304, 50259};
    char *text = decode(t, odd, 7, 0);
    cr_assert_str_eq(text, "[CLS]Hello world[SEP]");
    free(text);
    text = decode(t, odd, 7, 1);
    cr_assert_str_eq(text, "Hello world");
    free(text);
    /* a token that ends inside a UTF-8 sequence decodes to U+FFFD */
    ids = encode(t, "\xE6\x97\xA5", 3); /* 日: two tokens, the first holds E6 97 */
    cr_assert_eq(ids.count, 2);
    text = decode(t, ids.ids, 1, 0);
    cr_assert_str_eq(text, FFFD);
    free(text);
    mb_token_list_free(&ids);
    mb_tokenizer_free(t);
}

Test(tokenizer_shipped, fingerprint_is_stable_and_distinguishes_files) {
    mb_tokenizer *a = load_or_die(SHIPPED), *b = load_or_die(SHIPPED);
    mb_tokenizer *c = load_or_die(FIXTURES "/tiny_legacy.json");
    cr_assert_eq(mb_tokenizer_fingerprint(a), mb_tokenizer_fingerprint(b));
    cr_assert_neq(mb_tokenizer_fingerprint(a), mb_tokenizer_fingerprint(c));
    cr_assert_neq(mb_tokenizer_fingerprint(a), 0);
    mb_tokenizer_free(a);
    mb_tokenizer_free(b);
    mb_tokenizer_free(c);
}

static void assert_round_trip(const mb_tokenizer *t, const char *text, size_t length) {
    char *repaired;
    size_t repaired_length, expected_length;
    cr_assert_eq(mb_tok_utf8_sanitize((const uint8_t *)text, length, &repaired, &repaired_length), 0);
    char *expected = nfc(repaired, repaired_length, &expected_length);
    mb_token_list ids = encode(t, text, length);
    char *decoded = NULL;
    size_t decoded_length = 0;
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_decode_length(t, ids.ids, ids.count, 0, &decoded, &decoded_length, &err), 0);
    cr_assert(decoded_length == expected_length && memcmp(decoded, expected, expected_length) == 0 &&
                  decoded[expected_length] == '\0',
              "round trip of \"%.*s\" gave \"%s\"", (int)length, text, decoded);
    mb_token_list repaired_ids = encode(t, repaired, repaired_length);
    cr_assert(repaired_ids.count == ids.count &&
                  (ids.count == 0 || memcmp(repaired_ids.ids, ids.ids, ids.count * sizeof(int32_t)) == 0),
              "invalid bytes must encode as their U+FFFD repair");
    free(decoded);
    free(expected);
    free(repaired);
    mb_token_list_free(&ids);
    mb_token_list_free(&repaired_ids);
}

Test(tokenizer_shipped, decode_of_encode_is_nfc_of_the_repaired_text) {
    mb_tokenizer *t = load_or_die(SHIPPED);
#define TEXT(literal) {literal, sizeof(literal) - 1}
    const struct {
        const char *text;
        size_t length;
    } fixed[] = {TEXT(""), TEXT(" "), TEXT("Hello, World!"), TEXT("  two  spaces  "),
                 TEXT("tabs\t\tand\nnewlines\r\n"), TEXT("caf\x65\xCC\x81 na\xC3\xAFve"), TEXT("\xE2\x84\xAB"),
                 TEXT("\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9"), TEXT("nul\0byte"),
                 TEXT("bad \xFF\xFE bytes \xE2\x82"), TEXT("x [CLS]y<|endoftext|> [unused3]")};
#undef TEXT
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) assert_round_trip(t, fixed[i].text, fixed[i].length);
    /* random byte strings drawn from a mix of ASCII, multi-byte characters and invalid bytes */
    const char *atoms[] = {"a", "Z", "9", " ", "  ", "\t", "\n", "'s", "!", "\xC3\xA9", "e\xCC\x81", "\xE6\x97\xA5",
                           "\xF0\x9F\x98\x80", "\xC2\xA0", "\xFF", "\x80", "\xE2\x82", "[SEP]", " [CLS]", "\x01"};
    mb_rng rng;
    mb_rng_seed(&rng, 1234);
    char buffer[512];
    for (int round = 0; round < 300; round++) {
        size_t length = 0;
        int atoms_here = (int)mb_rng_below(&rng, 40);
        for (int k = 0; k < atoms_here; k++) {
            const char *atom = atoms[mb_rng_below(&rng, sizeof atoms / sizeof *atoms)];
            memcpy(buffer + length, atom, strlen(atom));
            length += strlen(atom);
        }
        /* special tokens without lstrip / rstrip come back as their text, so the round trip holds with them */
        assert_round_trip(t, buffer, length);
    }
    mb_tokenizer_free(t);
}

/* ---- hand-made vocabularies ------------------------------------------------------------------------------------- */

typedef struct parts {
    const char *added_tokens, *normalizer, *pre_tokenizer, *post_processor, *decoder, *model;
} parts;

static const char default_model[] =
    "{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"c\":2,\"ab\":3,\"bc\":4,\"abc\":5,\"aa\":6,\"aaaa\":7},"
    "\"merges\":[[\"b\",\"c\"],[\"a\",\"b\"],[\"a\",\"a\"],[\"aa\",\"aa\"]]}";

/* Writes a tokenizer.json from parts (NULL = a working default) into dir/name; returns the path in `path`. The
 * expectations below on these hand-made files were checked against Hugging Face tokenizers 0.23.2. */
static void write_tokenizer(const char *dir, const char *name, parts p, char *path, size_t path_size) {
    snprintf(path, path_size, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f,
            "{\"version\":\"1.0\",\"truncation\":null,\"padding\":null,\"added_tokens\":%s,\"normalizer\":%s,"
            "\"pre_tokenizer\":%s,\"post_processor\":%s,\"decoder\":%s,\"model\":%s}",
            p.added_tokens ? p.added_tokens : "[]", p.normalizer ? p.normalizer : "null",
            p.pre_tokenizer ? p.pre_tokenizer
                            : "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true}",
            p.post_processor ? p.post_processor : "null",
            p.decoder ? p.decoder : "{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":true}",
            p.model ? p.model : default_model);
    fclose(f);
}

static char *make_dir(void) {
    char *dir = strdup("/tmp/mb_test_tokenizer_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    return dir;
}

static void assert_encodes(const mb_tokenizer *t, const char *text, const int32_t *expected, size_t n) {
    mb_token_list ids = encode(t, text, strlen(text));
    assert_ids_are(&ids, expected, n, text);
    mb_token_list_free(&ids);
}

Test(tokenizer_bpe, lowest_rank_merges_first_in_both_merge_forms) {
    char *dir = make_dir(), path[512];
    /* (b c) has rank 0, so "abc" -> a + bc, although (a b) also exists */
    write_tokenizer(dir, "pairs.json", (parts){0}, path, sizeof path);
    mb_tokenizer *t = load_or_die(path);
    assert_encodes(t, "abc", (const int32_t[]){0, 4}, 2);
    assert_encodes(t, "aaa", (const int32_t[]){6, 0}, 2);   /* equal ranks: leftmost first */
    assert_encodes(t, "aaaa", (const int32_t[]){7}, 1);     /* aa aa -> aaaa */
    assert_encodes(t, "abxc", (const int32_t[]){0, 4}, 2);  /* x has no token and no unk: dropped, b c meet */
    mb_tokenizer_free(t);

    write_tokenizer(dir, "legacy.json",
                    (parts){.model = "{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"c\":2,\"ab\":3,\"bc\":4,"
                                     "\"abc\":5},\"merges\":[\"#version: 0.2\",\"a b\",\"b c\",\"ab c\"]}"},
                    path, sizeof path);
    t = load_or_die(path);
    assert_encodes(t, "abc", (const int32_t[]){5}, 1); /* a b first (rank 0), then ab c */
    assert_encodes(t, "bcab", (const int32_t[]){4, 3}, 2);
    mb_tokenizer_free(t);

    /* ignore_merges: a word that is a whole token is taken as is, even if the merges would not build it */
    write_tokenizer(dir, "ignore.json",
                    (parts){.model = "{\"type\":\"BPE\",\"ignore_merges\":true,\"vocab\":{\"a\":0,\"b\":1,\"c\":2,"
                                     "\"ab\":3,\"abc\":4},\"merges\":[[\"a\",\"b\"]]}"},
                    path, sizeof path);
    t = load_or_die(path);
    assert_encodes(t, "abc", (const int32_t[]){4}, 1);
    assert_encodes(t, "abcc", (const int32_t[]){3, 2, 2}, 3);
    mb_tokenizer_free(t);

    /* unk: fused runs of unknown bytes become one unk */
    write_tokenizer(dir, "unk.json",
                    (parts){.model = "{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,"
                                     "\"vocab\":{\"<unk>\":0,\"a\":1},\"merges\":[]}"},
                    path, sizeof path);
    t = load_or_die(path);
    assert_encodes(t, "axxa", (const int32_t[]){1, 0, 1}, 3);
    mb_tokenizer_free(t);
    write_tokenizer(dir, "unk_missing.json",
                    (parts){.model = "{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"vocab\":{\"a\":0},\"merges\":[]}"},
                    path, sizeof path);
    t = load_or_die(path); /* like tokenizers: only an error once a byte needs the unk token */
    assert_encodes(t, "aa", (const int32_t[]){0, 0}, 2);
    mb_token_list ids = {0};
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_encode(t, "ax", 2, &ids, &err), -1);
    cr_assert(strstr(err.message, "unk_token") != NULL, "%s", err.message);
    mb_token_list_free(&ids);
    mb_tokenizer_free(t);
    free(dir);
}

Test(tokenizer_bpe, added_token_flags) {
    char *dir = make_dir(), path[512];
    write_tokenizer(dir, "added.json",
                    (parts){.added_tokens =
                                "[{\"id\":8,\"content\":\"<m>\",\"single_word\":false,\"lstrip\":true,\"rstrip\":true,"
                                "\"normalized\":false,\"special\":true},"
                                "{\"id\":9,\"content\":\"ab\",\"single_word\":true,\"lstrip\":false,\"rstrip\":false,"
                                "\"normalized\":false,\"special\":false}]",
                            .normalizer = "{\"type\":\"NFC\"}"},
                    path, sizeof path);
    mb_tokenizer *t = load_or_die(path);
    /* "ab" is already in the model vocabulary: the added token keeps id 3; <m> gets the next id (8 entries -> 8) */
    cr_assert_eq(mb_tokenizer_token_to_id(t, "ab"), 3);
    cr_assert_eq(mb_tokenizer_token_to_id(t, "<m>"), 8);
    cr_assert_eq(mb_tokenizer_vocab_size(t), 9);
    assert_encodes(t, "a  <m>  c", (const int32_t[]){0, 8, 2}, 3); /* lstrip + rstrip eat the spaces */
    assert_encodes(t, "ab c", (const int32_t[]){3, 2}, 2);          /* single word: split out */
    assert_encodes(t, "abc", (const int32_t[]){0, 4}, 2);           /* not a single word: BPE as usual */
    mb_tokenizer_free(t);

    /* a normalized added token is matched by its NFC form on NFC'ed text, and (tokenizers >= 0.23) decoded from that
     * form: here "e" + U+0301 -> U+00E9, a byte-level character that stands for the lone byte E9 -> U+FFFD */
    write_tokenizer(dir, "nfd.json",
                    (parts){.added_tokens = "[{\"id\":8,\"content\":\"e\\u0301\",\"single_word\":false,"
                                            "\"lstrip\":false,\"rstrip\":false,\"normalized\":true,\"special\":false}]",
                            .normalizer = "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFC\"}]}"},
                    path, sizeof path);
    t = load_or_die(path);
    assert_encodes(t, "a\xC3\xA9", (const int32_t[]){0, 8}, 2);  /* precomposed input */
    assert_encodes(t, "ae\xCC\x81", (const int32_t[]){0, 8}, 2); /* decomposed input */
    char *text = decode(t, (const int32_t[]){0, 8, 1}, 3, 0);
    cr_assert_str_eq(text, "a" FFFD "b");
    free(text);
    mb_tokenizer_free(t);
    free(dir);
}

/* ---- concurrency ------------------------------------------------------------------------------------------------ */

typedef struct thread_job {
    const mb_tokenizer *t;
    const char *const *texts;
    const mb_token_list *reference;
    size_t count;
    int mismatches;
} thread_job;

static void *encode_many(void *arg) {
    thread_job *job = arg;
    for (int round = 0; round < 15; round++) {
        for (size_t i = 0; i < job->count; i++) {
            mb_token_list ids = {0};
            mb_error err;
            size_t k = (i + (size_t)round) % job->count;
            if (mb_tokenizer_encode_template(job->t, job->texts[k], strlen(job->texts[k]), NULL, 0, &ids, &err) != 0 ||
                ids.count != job->reference[k].count ||
                memcmp(ids.ids, job->reference[k].ids, ids.count * sizeof(int32_t)) != 0)
                job->mismatches++;
            mb_token_list_free(&ids);
        }
    }
    return NULL;
}

Test(tokenizer_shipped, concurrent_encodes_match_serial_ones) {
    mb_tokenizer *t = load_or_die(SHIPPED);
    size_t size;
    char *prose = read_whole(FIXTURES "/inputs/01_english_prose.txt", &size);
    char *mix = read_whole(FIXTURES "/inputs/21_random_mix.txt", &size);
    char *code = read_whole(FIXTURES "/inputs/02_c_source.txt", &size);
    const char *texts[] = {prose, mix, code, "a [MASK] b", "caf\x65\xCC\x81 \xF0\x9F\x98\x80", "  x  \n\n y\t"};
    enum { TEXTS = sizeof texts / sizeof *texts, THREADS = 4 };
    mb_token_list reference[TEXTS] = {{0}};
    mb_error err;
    for (size_t i = 0; i < TEXTS; i++)
        cr_assert_eq(mb_tokenizer_encode_template(t, texts[i], strlen(texts[i]), NULL, 0, &reference[i], &err), 0);
    pthread_t threads[THREADS];
    thread_job jobs[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (thread_job){t, texts, reference, TEXTS, 0};
        cr_assert_eq(pthread_create(&threads[i], NULL, encode_many, &jobs[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        cr_assert_eq(jobs[i].mismatches, 0, "thread %d: %d mismatching encodes", i, jobs[i].mismatches);
    }
    for (size_t i = 0; i < TEXTS; i++) mb_token_list_free(&reference[i]);
    free(prose);
    free(mix);
    free(code);
    mb_tokenizer_free(t);
}

/* ---- malformed files -------------------------------------------------------------------------------------------- */

static void assert_load_fails(const char *dir, parts p, const char *needle1, const char *needle2) {
    static int counter = 0;
    char name[64], path[512];
    snprintf(name, sizeof name, "bad%d.json", counter++);
    write_tokenizer(dir, name, p, path, sizeof path);
    mb_tokenizer *t = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_load(&t, path, &err), -1, "%s should not load (%s)", name, needle1);
    cr_assert_null(t);
    cr_assert(strstr(err.message, path) != NULL, "message does not name the file: %s", err.message);
    cr_assert(strstr(err.message, needle1) != NULL, "message lacks \"%s\": %s", needle1, err.message);
    if (needle2 != NULL)
        cr_assert(strstr(err.message, needle2) != NULL, "message lacks \"%s\": %s", needle2, err.message);
}

Test(tokenizer_errors, malformed_files_name_file_and_field) {
    char *dir = make_dir();
    assert_load_fails(dir, (parts){.model = "{\"type\":\"WordPiece\",\"vocab\":{}}"}, "model.type", "WordPiece");
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"vocab\":{\"a\":-1},\"merges\":[]}"}, "model.vocab",
                      "\"a\"");
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"vocab\":[],\"merges\":[]}"}, "model.vocab", NULL);
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},"
                                            "\"merges\":[[\"a\",\"b\"],[\"a\",\"q\"]]}"},
                      "model.merges[1]", "\"q\"");
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"a b\"]}"},
                      "model.merges[0]", "merged token");
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[\"a a a\"]}"},
                      "model.merges[0]", NULL);
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"vocab\":{\"a\":0}}"}, "model.merges", NULL);
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"dropout\":0.1,\"vocab\":{},\"merges\":[]}"},
                      "model.dropout", NULL);
    assert_load_fails(dir, (parts){.model = "{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{},\"merges\":[]}"},
                      "model.byte_fallback", NULL);
    assert_load_fails(dir, (parts){.normalizer = "{\"type\":\"Lowercase\"}"}, "normalizer.type", "Lowercase");
    assert_load_fails(dir, (parts){.normalizer = "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFC\"},"
                                                 "{\"type\":\"NFKC\"}]}"},
                      "normalizer.normalizers[1].type", "NFKC");
    assert_load_fails(dir, (parts){.pre_tokenizer = "{\"type\":\"Whitespace\"}"}, "pre_tokenizer", "Whitespace");
    assert_load_fails(dir, (parts){.pre_tokenizer = "null"}, "pre_tokenizer", NULL);
    assert_load_fails(dir, (parts){.pre_tokenizer = "{\"type\":\"ByteLevel\"}"}, "pre_tokenizer.add_prefix_space",
                      NULL);
    assert_load_fails(dir,
                      (parts){.pre_tokenizer = "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","
                                               "\"pattern\":{\"Regex\":\"\\\\s+\"},\"behavior\":\"Isolated\","
                                               "\"invert\":false},{\"type\":\"ByteLevel\",\"use_regex\":false}]}"},
                      "pre_tokenizer.pretokenizers[0].pattern", NULL);
    assert_load_fails(dir, (parts){.added_tokens = "[{\"id\":9,\"special\":true}]"}, "added_tokens[0].content", NULL);
    assert_load_fails(dir, (parts){.added_tokens = "[{\"id\":9,\"content\":\"x\",\"lstrip\":\"yes\"}]"},
                      "added_tokens[0].lstrip", NULL);
    assert_load_fails(dir,
                      (parts){.post_processor = "{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":"
                                                "{\"id\":\"[CLS]\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\","
                                                "\"type_id\":0}}],\"pair\":[],\"special_tokens\":{}}"},
                      "post_processor.special_tokens[\"[CLS]\"]", "post_processor.single[0]");
    assert_load_fails(dir, (parts){.post_processor = "{\"type\":\"BertProcessing\",\"sep\":[\"[SEP]\"]}"},
                      "post_processor.cls", NULL);
    assert_load_fails(dir, (parts){.decoder = "{\"type\":\"WordPiece\"}"}, "decoder.type", "WordPiece");

    /* not JSON, not an object, a missing file */
    char path[512];
    snprintf(path, sizeof path, "%s/broken.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"model\": {\"vocab\": ", f);
    fclose(f);
    mb_tokenizer *t = NULL;
    mb_error err = {{0}};
    cr_assert_eq(mb_tokenizer_load(&t, path, &err), -1);
    cr_assert(strstr(err.message, path) && strstr(err.message, "not valid JSON"), "%s", err.message);
    snprintf(path, sizeof path, "%s/no_such_file.json", dir);
    cr_assert_eq(mb_tokenizer_load(&t, path, &err), -1);
    cr_assert(strstr(err.message, "no_such_file.json") != NULL, "%s", err.message);
    free(dir);
}
