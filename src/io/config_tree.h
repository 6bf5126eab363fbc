/* YAML configuration: a parsed tree with source positions, `key.path=value` overrides, and a schema-driven reader
 * that fills a C struct, plus the canonical dump and hash of the effective configuration.
 *
 * Flow:   mb_cfg_tree_load(file) -> mb_cfg_tree_override("a.b=1") ... -> mb_cfg_read(tree, schema, &cfg)
 *         -> mb_cfg_dump(schema, &cfg) (run/config.yaml, console) and mb_cfg_hash(schema, &cfg) (checkpoint).
 *
 * The tree keeps YAML maps, sequences and scalars (the scalar text, not a typed value) with file:line:column for
 * every node, so every later error can point at the source: "configs/tiny.yaml:12:5: phases[1].lr: expected a
 * number, got 'fast'". Nodes created by an override carry "override 'phases.1.lr=fast'" as their origin instead.
 *
 * The schema is a table of mb_cfg_field {path, type, offset, default, min, max, ...} terminated by an entry whose
 * path is NULL (MB_CFG_END). Paths are dotted ("optimizer.lr" means key lr inside map optimizer) and relative to the
 * struct being filled; a LIST field names an element schema whose paths are relative to one element struct. The
 * reader writes every field of the struct (value, default, or zero) and fails on: unknown keys, wrong node kinds,
 * unparsable scalars, values outside [min, max], missing required keys, lists longer than their capacity.
 *
 * Scalar syntax accepted by each type (quoted or plain scalars alike; a plain empty/~/null scalar counts as absent):
 *   MB_CFG_INT, MB_CFG_INT64  decimal integer, optional sign, '_' allowed between digits: -3, 1_000_000
 *   MB_CFG_TOKENS             a non-negative whole token count (int64_t):
 *                               number [magnitude] ["tok"]
 *                               number    = digits ["." digits] [("e"|"E") [sign] digits], '_' allowed between digits
 *                               magnitude = K (1e3) | M (1e6) | B (1e9) | T (1e12), either case
 *                             e.g. 1_719_000_000_000, 1.719e12, 1719B, 1.719T, 3B, 50M, 50_000_000tok, 3Btok.
 *                             Evaluated exactly in integers; a value that is not a whole number (1.5 with no
 *                             magnitude, 1.2345678K) or exceeds INT64_MAX is an error. Other Composer units
 *                             (ba, ep, sp, dur) are rejected.
 *   MB_CFG_FLOAT              a finite decimal number: 3e-4, 8.0e-4, 0.1, 2, -1.5 (no inf/nan/hex)
 *   MB_CFG_BOOL               true | false (also True/TRUE/False/FALSE)
 *   MB_CFG_STRING             any scalar text; must fit the buffer (size includes the NUL)
 *   MB_CFG_ENUM               one of enum_names, exactly; stored as its index (int)
 *   MB_CFG_LIST               a YAML sequence of maps (element schema = fields) or of scalars (element schema = one
 *                             field with path ""); count stored in the int at count_offset; min/max bound the count
 *
 * Defaults are YAML text written as after "key: " ("3e-4", "one_minus_sqrt", "3B", "[0.9, 0.98]") and go through the
 * same parser and checks as file values (an invalid default is reported as "default: <path>: ...").
 * The library is not thread-safe per tree; separate trees are independent. */
#ifndef MB_CONFIG_TREE_H
#define MB_CONFIG_TREE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/error.h"

/* ---- The tree ---------------------------------------------------------------------------------------------------- */

typedef enum mb_cfg_kind { MB_CFG_NODE_MAP, MB_CFG_NODE_SEQ, MB_CFG_NODE_SCALAR } mb_cfg_kind;

typedef struct mb_cfg_node mb_cfg_node;
struct mb_cfg_node {
    mb_cfg_kind kind;
    char *text;              /* SCALAR: the text as written (after YAML unquoting) */
    bool plain;              /* SCALAR: written without quotes (only plain "", "~", "null" mean null) */
    size_t count;            /* MAP, SEQ: number of children */
    size_t capacity;
    char **keys;             /* MAP: keys[i] is the key of children[i] (insertion order kept) */
    mb_cfg_node **children;
    const char *origin;      /* file name or "override '...'"; owned by the tree */
    int line, column;        /* 1-based; 0 when the origin has no useful position (overrides, defaults) */
    int key_line, key_column;/* position of the key naming this node in its parent map (0 if none) */
};

typedef struct mb_cfg_tree {
    mb_cfg_node *root;       /* always a MAP */
    char **origins;          /* interned origin strings referenced by the nodes */
    size_t n_origins;
} mb_cfg_tree;

/* Parses a YAML file (one document; aliases are rejected; an empty file is an empty map). The top level must be a
 * map. On failure the tree is left empty (safe to free). */
int mb_cfg_tree_load(mb_cfg_tree *tree, const char *path, mb_error *err);
/* Same from memory; origin names the text in messages. */
int mb_cfg_tree_parse(mb_cfg_tree *tree, const char *text, size_t size, const char *origin, mb_error *err);
void mb_cfg_tree_free(mb_cfg_tree *tree);

/* Applies "key.path=value". Path segments are separated by '.'; a segment that indexes a sequence is a number,
 * written either as ".1" or "[1]" ("phases.1.lr" == "phases[1].lr"). The value is parsed as YAML ("3e-4",
 * "[0.9,0.99]", "{a: 1}"; empty = null, i.e. "use the default"). Missing map keys are created (the schema reader
 * later rejects keys the schema does not know, naming this override); an index may address an existing element or
 * append exactly one (index == length). Fails on a malformed assignment or when a path goes through a scalar. */
int mb_cfg_tree_override(mb_cfg_tree *tree, const char *assignment, mb_error *err);

/* The node at a path in the same syntax (NULL if absent or the path is malformed). */
const mb_cfg_node *mb_cfg_tree_find(const mb_cfg_tree *tree, const char *path);

/* The tree as YAML text (malloc'ed, NUL-terminated; caller frees). Comments are not kept. */
char *mb_cfg_tree_to_yaml(const mb_cfg_tree *tree, mb_error *err);

/* For checks across fields done by the caller after mb_cfg_read: formats
 * "<file>:<line>:<col>: <path>: <message>" using the node at path (or its nearest existing ancestor) and returns -1. */
int mb_cfg_fail_at(const mb_cfg_tree *tree, const char *path, mb_error *err, const char *format, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- The schema -------------------------------------------------------------------------------------------------- */

typedef enum mb_cfg_type {
    MB_CFG_INT,      /* int */
    MB_CFG_INT64,    /* int64_t */
    MB_CFG_TOKENS,   /* int64_t, token-count syntax above */
    MB_CFG_FLOAT,    /* double */
    MB_CFG_BOOL,     /* bool */
    MB_CFG_STRING,   /* char[size] */
    MB_CFG_ENUM,     /* int, index into enum_names */
    MB_CFG_LIST,     /* element[capacity] of `size` bytes each + int count at count_offset */
} mb_cfg_type;

enum {
    MB_CFG_REQUIRED = 1u << 0,       /* the key must be present (a default is then ignored) */
    MB_CFG_MIN_EXCLUSIVE = 1u << 1,  /* value > min instead of >= min */
    MB_CFG_MAX_EXCLUSIVE = 1u << 2,  /* value < max instead of <= max */
};

typedef struct mb_cfg_field {
    const char *path;                    /* dotted key path; "" = the element itself (lists of scalars); NULL ends */
    mb_cfg_type type;
    size_t offset;                       /* offsetof(struct, member) */
    const char *default_value;           /* YAML text; NULL = zero / "" / index 0 / empty list */
    const char *min, *max;               /* bounds in the field's syntax; LIST: element count; NULL = none */
    unsigned flags;                      /* MB_CFG_REQUIRED | MB_CFG_MIN_EXCLUSIVE | MB_CFG_MAX_EXCLUSIVE */
    size_t size;                         /* STRING: buffer bytes incl. NUL; LIST: sizeof one element */
    const char *const *enum_names;       /* ENUM: NULL-terminated */
    const struct mb_cfg_field *fields;   /* LIST: element schema */
    size_t count_offset;                 /* LIST: offsetof the int count */
    size_t capacity;                     /* LIST: number of elements the array holds */
    const char *help;                    /* one line, for mb_cfg_describe */
} mb_cfg_field;

#define MB_CFG_END { .path = NULL }

/* Fills *out from the tree according to schema (see the top comment). out need not be zeroed. On failure *out is
 * partially written and err names file:line:col and the key path. */
int mb_cfg_read(const mb_cfg_tree *tree, const mb_cfg_field *schema, void *out, mb_error *err);

/* Checks a schema for programming errors (bad types, missing enum names or element schemas, invalid defaults or
 * bounds). mb_cfg_read calls it; tests can call it directly. */
int mb_cfg_schema_check(const mb_cfg_field *schema, mb_error *err);

/* The effective configuration as canonical YAML (malloc'ed; caller frees): keys in schema order, every field
 * written, floats in the shortest form that reads back to the same double, token counts as 1_719_000_000_000,
 * strings double-quoted. Reading the dump back with the same schema gives an identical struct. */
char *mb_cfg_dump(const mb_cfg_field *schema, const void *in, mb_error *err);

/* 64-bit FNV-1a of mb_cfg_dump's text: independent of the input's key order, comments, formatting and of whether a
 * value came from a default; changes when any effective value (or the schema's set of keys) changes. */
int mb_cfg_hash(const mb_cfg_field *schema, const void *in, uint64_t *hash, mb_error *err);

/* Writes one line per leaf key: path, type, default, bounds, help (for --help style listings). */
void mb_cfg_describe(const mb_cfg_field *schema, FILE *out);

/* Scalar parsers used by the reader (exposed for CLI flags and tests). Return 0, or -1 with a reason in err. */
int mb_cfg_parse_tokens(const char *text, int64_t *value, mb_error *err);
int mb_cfg_parse_int64(const char *text, int64_t *value, mb_error *err);
int mb_cfg_parse_float(const char *text, double *value, mb_error *err);

#endif
