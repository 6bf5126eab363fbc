/* Text helpers of the tokenizer: the GPT-2 byte-level alphabet, strict UTF-8 decoding with U+FFFD repair, the
 * character classes and the hand-written matcher of the GPT-2 split pattern, and NFC through utf8proc.
 *
 * Byte-level alphabet (GPT-2 bytes_to_unicode, tokenizers byte_level.rs::bytes_char): bytes '!'..'~', 0xA1..0xAC and
 * 0xAE..0xFF stand for themselves; the other 68 bytes, in increasing order, become U+0100 + n (space -> U+0120 'Ġ').
 *
 * GPT-2 pattern, as Oniguruma runs it (alternatives tried in order at each position, the first that matches wins):
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * \s is the White_Space property (Oniguruma's Unicode \s and Rust's char::is_whitespace agree on it), \p{L} / \p{N}
 * the general categories L* / N* from utf8proc. */
#include "data/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* ---- byte-level alphabet ---------------------------------------------------------------------------------------- */

static bool byte_is_printable(uint32_t b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

uint32_t mb_tok_byte_to_char(uint8_t byte) {
    if (byte_is_printable(byte)) return byte;
    /* The non-printable bytes are 0x00..0x20 (33), 0x7F..0xA0 (34) and 0xAD (1), numbered in byte order. */
    if (byte <= 0x20) return 256u + byte;
    if (byte >= 0x7F && byte <= 0xA0) return 256u + 33u + (uint32_t)(byte - 0x7F);
    return 256u + 67u; /* 0xAD */
}

int mb_tok_char_to_byte(uint32_t code_point) {
    if (code_point < 256) return byte_is_printable(code_point) ? (int)code_point : -1;
    if (code_point >= 256u + 68u) return -1;
    uint32_t n = code_point - 256u;
    if (n < 33) return (int)n;
    if (n < 67) return (int)(0x7F + (n - 33));
    return 0xAD;
}

/* ---- UTF-8 ------------------------------------------------------------------------------------------------------ */

size_t mb_tok_utf8_decode(const uint8_t *s, size_t length, uint32_t *code_point) {
    uint8_t b = s[0];
    if (b < 0x80 || length < 2) {
        *code_point = b;
        return 1;
    }
    if (b < 0xE0) {
        *code_point = ((uint32_t)(b & 0x1F) << 6) | (s[1] & 0x3F);
        return 2;
    }
    if (b < 0xF0 || length < 4) {
        *code_point = ((uint32_t)(b & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        return 3;
    }
    *code_point = ((uint32_t)(b & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) |
                  (s[3] & 0x3F);
    return 4;
}

size_t mb_tok_utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid sequence at s (> 0), or 0 when invalid; *consumed gets the length of the maximal subpart (the
 * longest prefix that could still start a valid sequence, at least 1), which is what gets one U+FFFD. */
static size_t utf8_sequence(const uint8_t *s, size_t length, size_t *consumed) {
    uint8_t b = s[0];
    size_t need;
    uint8_t low = 0x80, high = 0xBF; /* allowed range of the second byte */
    if (b < 0x80) {
        *consumed = 1;
        return 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
        need = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        if (b == 0xE0) low = 0xA0;
        if (b == 0xED) high = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        if (b == 0xF0) low = 0x90;
        if (b == 0xF4) high = 0x8F;
    } else {
        *consumed = 1;
        return 0;
    }
    size_t i = 1;
    for (; i < need && i < length; i++) {
        uint8_t lo = i == 1 ? low : 0x80, hi = i == 1 ? high : 0xBF;
        if (s[i] < lo || s[i] > hi) break;
    }
    *consumed = i;
    return i == need ? need : 0;
}

size_t mb_tok_utf8_valid_prefix(const uint8_t *s, size_t length) {
    size_t i = 0;
    while (i < length) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t consumed, n = utf8_sequence(s + i, length - i, &consumed);
        if (n == 0) return i;
        i += n;
    }
    return length;
}

int mb_tok_utf8_sanitize(const uint8_t *s, size_t length, char **out, size_t *out_length) {
    /* Each invalid byte becomes at most 3 bytes (EF BF BD). */
    char *text = malloc(length * 3 + 1);
    if (text == NULL) return -1;
    size_t w = 0, i = 0;
    while (i < length) {
        size_t consumed, n = utf8_sequence(s + i, length - i, &consumed);
        if (n > 0) {
            memcpy(text + w, s + i, n);
            w += n;
            i += n;
        } else {
            memcpy(text + w, "\xEF\xBF\xBD", 3);
            w += 3;
            i += consumed;
        }
    }
    text[w] = '\0';
    *out = text;
    *out_length = w;
    return 0;
}

/* ---- character classes ------------------------------------------------------------------------------------------ */

bool mb_tok_is_whitespace(uint32_t cp) {
    /* The White_Space property (PropList.txt): stable since Unicode 6.3. */
    if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

int mb_tok_char_class(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return MB_TOK_CLASS_LETTER;
        if (cp >= '0' && cp <= '9') return MB_TOK_CLASS_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return MB_TOK_CLASS_SPACE;
        return MB_TOK_CLASS_OTHER;
    }
    if (mb_tok_is_whitespace(cp)) return MB_TOK_CLASS_SPACE;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
        return MB_TOK_CLASS_LETTER;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
        return MB_TOK_CLASS_NUMBER;
    default:
        return MB_TOK_CLASS_OTHER;
    }
}

bool mb_tok_is_word_char(uint32_t cp) {
    if (cp < 0x80) return ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') || (cp >= '0' && cp <= '9') || cp == '_';
    if (cp == 0x200C || cp == 0x200D) return true; /* Join_Control */
    /* Other_Alphabetic symbols (So): circled / squared Latin letters; the rest of Other_Alphabetic is marks. */
    if ((cp >= 0x24B6 && cp <= 0x24E9) || (cp >= 0x1F130 && cp <= 0x1F149) || (cp >= 0x1F150 && cp <= 0x1F169) ||
        (cp >= 0x1F170 && cp <= 0x1F189))
        return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

/* ---- GPT-2 split ------------------------------------------------------------------------------------------------ */

/* Bytes taken by the run of characters of class `cls` at the start of s. */
static size_t class_run(const uint8_t *s, size_t length, int cls) {
    size_t i = 0;
    while (i < length) {
        uint32_t cp;
        size_t n;
        if (s[i] < 0x80) {
            cp = s[i];
            n = 1;
        } else {
            n = mb_tok_utf8_decode(s + i, length - i, &cp);
        }
        if (mb_tok_char_class(cp) != cls) break;
        i += n;
    }
    return i;
}

static bool is_contraction(const uint8_t *s, size_t length, size_t *match) {
    if (length < 2 || s[0] != '\'') return false;
    uint8_t c = s[1];
    if (c == 's' || c == 't' || c == 'm' || c == 'd') {
        *match = 2;
        return true;
    }
    if (length >= 3 && ((c == 'r' && s[2] == 'e') || (c == 'v' && s[2] == 'e') || (c == 'l' && s[2] == 'l'))) {
        *match = 3;
        return true;
    }
    return false;
}

size_t mb_tok_gpt2_match(const uint8_t *s, size_t length) {
    size_t match;
    if (is_contraction(s, length, &match)) return match;
    uint32_t cp;
    size_t first = mb_tok_utf8_decode(s, length, &cp);
    int cls = mb_tok_char_class(cp);
    /* ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+` with the optional space taken. */
    if (cp == ' ' && first < length) {
        uint32_t next;
        mb_tok_utf8_decode(s + 1, length - 1, &next);
        int next_cls = mb_tok_char_class(next);
        if (next_cls != MB_TOK_CLASS_SPACE) return 1 + class_run(s + 1, length - 1, next_cls);
    }
    if (cls != MB_TOK_CLASS_SPACE) return class_run(s, length, cls);
    /* Whitespace: `\s+(?!\S)` backtracks from the maximal run until the lookahead holds, i.e. it gives the last
     * whitespace character to the next token when non-space follows; a single one followed by non-space is `\s+`. */
    size_t end = 0, last_start = 0, count = 0;
    while (end < length) {
        size_t n = mb_tok_utf8_decode(s + end, length - end, &cp);
        if (!mb_tok_is_whitespace(cp)) break;
        last_start = end;
        end += n;
        count++;
    }
    if (end == length || count < 2) return end;
    return last_start;
}

/* ---- NFC ------------------------------------------------------------------------------------------------------ */

typedef struct byte_buffer {
    char *data;
    size_t length, capacity;
} byte_buffer;

static int buffer_append(byte_buffer *b, const char *s, size_t length) {
    if (b->length + length + 1 > b->capacity) {
        size_t capacity = b->capacity ? b->capacity : 64;
        while (capacity < b->length + length + 1) capacity *= 2;
        char *bigger = realloc(b->data, capacity);
        if (bigger == NULL) return -1;
        b->data = bigger;
        b->capacity = capacity;
    }
    memcpy(b->data + b->length, s, length);
    b->length += length;
    b->data[b->length] = '\0';
    return 0;
}

static int append_nfc_segment(byte_buffer *b, const char *s, size_t length, mb_error *err) {
    utf8proc_uint8_t *mapped = NULL;
    utf8proc_ssize_t n = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)length, &mapped,
                                      (utf8proc_option_t)(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) return mb_fail(err, "NFC normalization failed: %s", utf8proc_errmsg(n));
    int rc = buffer_append(b, (const char *)mapped, (size_t)n);
    free(mapped);
    return rc == 0 ? 0 : mb_fail(err, "out of memory normalizing %zu bytes", length);
}

/* Only the stretches around non-ASCII characters go through utf8proc: an ASCII character is a starter that never
 * composes with what precedes it, so NFC(x y) = NFC(x) NFC(y) whenever y starts with ASCII. Each stretch starts at
 * the ASCII character before the non-ASCII run (it may compose with a following mark) and ends before the next ASCII
 * character. */
int mb_tok_nfc(const char *s, size_t length, char **out, size_t *out_length, mb_error *err) {
    byte_buffer b = {NULL, 0, 0};
    if (buffer_append(&b, "", 0) != 0) return mb_fail(err, "out of memory normalizing %zu bytes", length);
    size_t i = 0;
    while (i < length) {
        size_t j = i;
        while (j < length && (unsigned char)s[j] < 0x80) j++;
        size_t stretch = j < length && j > i ? j - 1 : j;
        if (buffer_append(&b, s + i, stretch - i) != 0) goto oom;
        if (j == length) break;
        size_t k = j;
        while (k < length && (unsigned char)s[k] >= 0x80) k++;
        if (append_nfc_segment(&b, s + stretch, k - stretch, err) != 0) {
            free(b.data);
            return -1;
        }
        i = k;
    }
    *out = b.data;
    *out_length = b.length;
    return 0;
oom:
    free(b.data);
    return mb_fail(err, "out of memory normalizing %zu bytes", length);
}
