/* YAML configuration tree, overrides, schema reader, canonical dump and hash (see config_tree.h for the syntax).
 *
 * Parsing uses libyaml's event API and builds mb_cfg_node trees (maps keep insertion order). The reader walks the
 * schema, not the tree: for every field it looks the dotted path up, parses the scalar, checks bounds and stores it;
 * a separate walk over the tree rejects keys that no field path names. The dump builds a tree from the struct (in
 * schema order) and emits it with libyaml, so quoting and escaping are libyaml's; the hash is FNV-1a over that text. */
#include "io/config_tree.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "common/fileio.h"

enum {
    MAX_DEPTH = 64,          /* nesting limit for parsed YAML (bounds recursion on hostile input) */
    PATH_LEN = 512,          /* longest key path shown in messages */
    MAX_SEGMENTS = 64,
    SHOWN_TEXT = 80,         /* longest scalar excerpt quoted in messages */
};

static const char ORIGIN_DEFAULT[] = "default";
static const char ORIGIN_DUMP[] = "dump";

/* ---- Nodes ------------------------------------------------------------------------------------------------------- */

static mb_cfg_node *node_new(mb_cfg_kind kind, const char *origin, int line, int column) {
    mb_cfg_node *node = calloc(1, sizeof *node);
    if (node == NULL) return NULL;
    node->kind = kind;
    node->origin = origin;
    node->line = line;
    node->column = column;
    return node;
}

static void node_free(mb_cfg_node *node) {
    if (node == NULL) return;
    for (size_t i = 0; i < node->count; i++) {
        node_free(node->children[i]);
        if (node->keys != NULL) free(node->keys[i]);
    }
    free(node->children);
    free(node->keys);
    free(node->text);
    free(node);
}

static mb_cfg_node *scalar_new(const char *text, size_t length, bool plain, const char *origin, int line, int column) {
    mb_cfg_node *node = node_new(MB_CFG_NODE_SCALAR, origin, line, column);
    if (node == NULL) return NULL;
    node->text = malloc(length + 1);
    if (node->text == NULL) {
        free(node);
        return NULL;
    }
    memcpy(node->text, text, length);
    node->text[length] = '\0';
    node->plain = plain;
    return node;
}

/* Appends child (and key, for maps; both owned by parent afterwards). Returns -1 on allocation failure, in which
 * case the caller still owns both. */
static int node_append(mb_cfg_node *parent, char *key, mb_cfg_node *child) {
    if (parent->count == parent->capacity) {
        size_t capacity = parent->capacity ? 2 * parent->capacity : 4;
        mb_cfg_node **children = realloc(parent->children, capacity * sizeof *children);
        if (children == NULL) return -1;
        parent->children = children;
        if (parent->kind == MB_CFG_NODE_MAP) {
            char **keys = realloc(parent->keys, capacity * sizeof *keys);
            if (keys == NULL) return -1;
            parent->keys = keys;
        }
        parent->capacity = capacity;
    }
    if (parent->kind == MB_CFG_NODE_MAP) parent->keys[parent->count] = key;
    parent->children[parent->count++] = child;
    return 0;
}

static long map_index(const mb_cfg_node *map, const char *key) {
    for (size_t i = 0; i < map->count; i++)
        if (strcmp(map->keys[i], key) == 0) return (long)i;
    return -1;
}

static bool node_is_null(const mb_cfg_node *node) {
    if (node->kind != MB_CFG_NODE_SCALAR || !node->plain) return false;
    const char *t = node->text;
    return t[0] == '\0' || strcmp(t, "~") == 0 || strcmp(t, "null") == 0 || strcmp(t, "Null") == 0 ||
           strcmp(t, "NULL") == 0;
}

static const char *kind_name(const mb_cfg_node *node) {
    switch (node->kind) {
    case MB_CFG_NODE_MAP: return "a map";
    case MB_CFG_NODE_SEQ: return "a list";
    case MB_CFG_NODE_SCALAR: return node_is_null(node) ? "null" : "a scalar";
    }
    return "?";
}

/* "'text'" cut to SHOWN_TEXT characters, or the node kind for non-scalars. */
static void describe_node(const mb_cfg_node *node, char *out, size_t size) {
    if (node->kind != MB_CFG_NODE_SCALAR || node_is_null(node)) {
        snprintf(out, size, "%s", kind_name(node));
        return;
    }
    size_t length = strlen(node->text);
    snprintf(out, size, "'%.*s%s'", SHOWN_TEXT, node->text, length > SHOWN_TEXT ? "..." : "");
}

static void format_location(const mb_cfg_node *node, char *out, size_t size) {
    if (node == NULL) snprintf(out, size, "<config>");
    else if (node->line > 0) snprintf(out, size, "%s:%d:%d", node->origin, node->line, node->column);
    else snprintf(out, size, "%s", node->origin);
}

/* "<location>: <path>: <message>" into err; returns -1. */
static int fail_node(mb_error *err, const mb_cfg_node *node, const char *path, const char *format, ...)
    __attribute__((format(printf, 4, 5)));
static int fail_node(mb_error *err, const mb_cfg_node *node, const char *path, const char *format, ...) {
    char location[1024], message[1024];
    format_location(node, location, sizeof location);
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    if (path != NULL && path[0] != '\0') return mb_fail(err, "%s: %s: %s", location, path, message);
    return mb_fail(err, "%s: %s", location, message);
}

static const char *intern_origin(mb_cfg_tree *tree, const char *origin) {
    char **origins = realloc(tree->origins, (tree->n_origins + 1) * sizeof *origins);
    if (origins == NULL) return NULL;
    tree->origins = origins;
    char *copy = strdup(origin);
    if (copy == NULL) return NULL;
    tree->origins[tree->n_origins++] = copy;
    return copy;
}

/* ---- Parsing (libyaml events -> nodes) -------------------------------------------------------------------------- */

typedef struct parse_ctx {
    yaml_parser_t parser;
    const char *origin;
    bool positions;          /* false for overrides/defaults: their line:column would mislead */
    mb_error *err;
} parse_ctx;

static int mark_line(const parse_ctx *ctx, yaml_mark_t mark) { return ctx->positions ? (int)mark.line + 1 : 0; }
static int mark_column(const parse_ctx *ctx, yaml_mark_t mark) { return ctx->positions ? (int)mark.column + 1 : 0; }

static int next_event(parse_ctx *ctx, yaml_event_t *event) {
    if (yaml_parser_parse(&ctx->parser, event)) return 0;
    const yaml_parser_t *p = &ctx->parser;
    const char *problem = p->problem ? p->problem : "syntax error";
    if (ctx->positions)
        return mb_fail(ctx->err, "%s:%zu:%zu: YAML error: %s%s%s", ctx->origin, p->problem_mark.line + 1,
                       p->problem_mark.column + 1, problem, p->context ? " " : "", p->context ? p->context : "");
    return mb_fail(ctx->err, "%s: YAML error: %s%s%s", ctx->origin, problem, p->context ? " " : "",
                   p->context ? p->context : "");
}

static int parse_fail(parse_ctx *ctx, yaml_mark_t mark, const char *message, const char *detail) {
    mb_cfg_node where = {.origin = ctx->origin, .line = mark_line(ctx, mark), .column = mark_column(ctx, mark)};
    return fail_node(ctx->err, &where, NULL, "%s%s", message, detail ? detail : "");
}

static int parse_node(parse_ctx *ctx, yaml_event_t *event, int depth, mb_cfg_node **out);

static int parse_scalar(parse_ctx *ctx, yaml_event_t *event, mb_cfg_node **out) {
    const char *value = (const char *)event->data.scalar.value;
    size_t length = event->data.scalar.length;
    if (memchr(value, '\0', length) != NULL) return parse_fail(ctx, event->start_mark, "scalar contains a NUL", NULL);
    *out = scalar_new(value, length, event->data.scalar.style == YAML_PLAIN_SCALAR_STYLE, ctx->origin,
                      mark_line(ctx, event->start_mark), mark_column(ctx, event->start_mark));
    return *out ? 0 : mb_fail(ctx->err, "%s: out of memory", ctx->origin);
}

static int parse_sequence(parse_ctx *ctx, mb_cfg_node *seq, int depth) {
    for (;;) {
        yaml_event_t event;
        if (next_event(ctx, &event) != 0) return -1;
        if (event.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&event);
            return 0;
        }
        mb_cfg_node *child = NULL;
        if (parse_node(ctx, &event, depth + 1, &child) != 0) return -1;
        if (node_append(seq, NULL, child) != 0) {
            node_free(child);
            return mb_fail(ctx->err, "%s: out of memory", ctx->origin);
        }
    }
}

static int parse_mapping(parse_ctx *ctx, mb_cfg_node *map, int depth) {
    for (;;) {
        yaml_event_t key_event;
        if (next_event(ctx, &key_event) != 0) return -1;
        if (key_event.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&key_event);
            return 0;
        }
        if (key_event.type != YAML_SCALAR_EVENT) {
            int rc = parse_fail(ctx, key_event.start_mark, "map keys must be plain scalars", NULL);
            yaml_event_delete(&key_event);
            return rc;
        }
        const char *key_text = (const char *)key_event.data.scalar.value;
        bool has_nul = strlen(key_text) != key_event.data.scalar.length;
        if (has_nul || map_index(map, key_text) >= 0) {
            char detail[PATH_LEN];
            snprintf(detail, sizeof detail, " '%.*s'", SHOWN_TEXT, key_text);
            int rc = parse_fail(ctx, key_event.start_mark, has_nul ? "key contains a NUL" : "duplicate key",
                                has_nul ? NULL : detail);
            yaml_event_delete(&key_event);
            return rc;
        }
        char *key = strdup(key_text);
        int key_line = mark_line(ctx, key_event.start_mark), key_column = mark_column(ctx, key_event.start_mark);
        yaml_event_delete(&key_event);
        if (key == NULL) return mb_fail(ctx->err, "%s: out of memory", ctx->origin);
        yaml_event_t value_event;
        mb_cfg_node *child = NULL;
        if (next_event(ctx, &value_event) != 0 || parse_node(ctx, &value_event, depth + 1, &child) != 0) {
            free(key);
            return -1;
        }
        child->key_line = key_line;
        child->key_column = key_column;
        if (node_append(map, key, child) != 0) {
            free(key);
            node_free(child);
            return mb_fail(ctx->err, "%s: out of memory", ctx->origin);
        }
    }
}

/* Builds the node that starts with *event (consumed). */
static int parse_node(parse_ctx *ctx, yaml_event_t *event, int depth, mb_cfg_node **out) {
    *out = NULL;
    yaml_mark_t mark = event->start_mark;
    if (depth > MAX_DEPTH) {
        yaml_event_delete(event);
        return parse_fail(ctx, mark, "nesting is deeper than 64 levels", NULL);
    }
    int rc = 0;
    switch (event->type) {
    case YAML_SCALAR_EVENT:
        rc = parse_scalar(ctx, event, out);
        yaml_event_delete(event);
        return rc;
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        bool is_map = event->type == YAML_MAPPING_START_EVENT;
        yaml_event_delete(event);
        mb_cfg_node *node = node_new(is_map ? MB_CFG_NODE_MAP : MB_CFG_NODE_SEQ, ctx->origin, mark_line(ctx, mark),
                                     mark_column(ctx, mark));
        if (node == NULL) return mb_fail(ctx->err, "%s: out of memory", ctx->origin);
        rc = is_map ? parse_mapping(ctx, node, depth) : parse_sequence(ctx, node, depth);
        if (rc != 0) {
            node_free(node);
            return -1;
        }
        *out = node;
        return 0;
    }
    case YAML_ALIAS_EVENT: {
        char name[128];
        snprintf(name, sizeof name, " (*%s)", (const char *)event->data.alias.anchor);
        yaml_event_delete(event);
        return parse_fail(ctx, mark, "YAML aliases are not supported", name);
    }
    default:
        yaml_event_delete(event);
        return parse_fail(ctx, mark, "unexpected YAML event", NULL);
    }
}

/* Parses one YAML document; *out = NULL for an empty stream. */
static int parse_yaml(const char *text, size_t size, const char *origin, bool positions, mb_cfg_node **out,
                      mb_error *err) {
    *out = NULL;
    parse_ctx ctx = {.origin = origin, .positions = positions, .err = err};
    if (!yaml_parser_initialize(&ctx.parser)) return mb_fail(err, "%s: cannot initialize the YAML parser", origin);
    yaml_parser_set_input_string(&ctx.parser, (const unsigned char *)text, size);
    /* A failed yaml_parser_parse leaves the event zeroed and yaml_event_delete zeroes it, so deleting twice or
     * deleting after a failure is safe. */
    yaml_event_t event;
    memset(&event, 0, sizeof event);
    int rc = next_event(&ctx, &event);                          /* STREAM-START */
    yaml_event_delete(&event);
    if (rc == 0) rc = next_event(&ctx, &event);                 /* DOCUMENT-START, or STREAM-END when empty */
    if (rc == 0 && event.type == YAML_DOCUMENT_START_EVENT) {
        yaml_event_delete(&event);
        rc = next_event(&ctx, &event);
        if (rc == 0) rc = parse_node(&ctx, &event, 0, out);   /* consumes the event */
        if (rc == 0) rc = next_event(&ctx, &event);             /* DOCUMENT-END */
        yaml_event_delete(&event);
        if (rc == 0) rc = next_event(&ctx, &event);
        if (rc == 0 && event.type != YAML_STREAM_END_EVENT)
            rc = parse_fail(&ctx, event.start_mark, "more than one YAML document", NULL);
    }
    yaml_event_delete(&event);
    yaml_parser_delete(&ctx.parser);
    if (rc != 0) {
        node_free(*out);
        *out = NULL;
    }
    return rc;
}

/* A YAML fragment (override value, default) as a node; an empty fragment is a null scalar. */
static int parse_fragment(const char *text, const char *origin, mb_cfg_node **out, mb_error *err) {
    if (parse_yaml(text, strlen(text), origin, false, out, err) != 0) return -1;
    if (*out == NULL) *out = scalar_new("", 0, true, origin, 0, 0);
    return *out ? 0 : mb_fail(err, "%s: out of memory", origin);
}

int mb_cfg_tree_parse(mb_cfg_tree *tree, const char *text, size_t size, const char *origin, mb_error *err) {
    memset(tree, 0, sizeof *tree);
    const char *interned = intern_origin(tree, origin);
    if (interned == NULL) return mb_fail(err, "%s: out of memory", origin);
    mb_cfg_node *root = NULL;
    if (parse_yaml(text, size, interned, true, &root, err) != 0) {
        mb_cfg_tree_free(tree);
        return -1;
    }
    if (root == NULL || node_is_null(root)) {
        node_free(root);
        root = node_new(MB_CFG_NODE_MAP, interned, 1, 1);
        if (root == NULL) {
            mb_cfg_tree_free(tree);
            return mb_fail(err, "%s: out of memory", origin);
        }
    } else if (root->kind != MB_CFG_NODE_MAP) {
        int rc = fail_node(err, root, NULL, "the top level must be a map of keys, got %s", kind_name(root));
        node_free(root);
        mb_cfg_tree_free(tree);
        return rc;
    }
    tree->root = root;
    return 0;
}

int mb_cfg_tree_load(mb_cfg_tree *tree, const char *path, mb_error *err) {
    memset(tree, 0, sizeof *tree);
    char *text = NULL;
    size_t size = 0;
    if (mb_read_file(path, &text, &size, err) != 0) return -1;
    int rc = mb_cfg_tree_parse(tree, text, size, path, err);
    free(text);
    return rc;
}

void mb_cfg_tree_free(mb_cfg_tree *tree) {
    if (tree == NULL) return;
    node_free(tree->root);
    for (size_t i = 0; i < tree->n_origins; i++) free(tree->origins[i]);
    free(tree->origins);
    memset(tree, 0, sizeof *tree);
}

/* ---- Paths ------------------------------------------------------------------------------------------------------- */

typedef struct path_segments {
    char buffer[PATH_LEN];
    const char *names[MAX_SEGMENTS];
    size_t count;
} path_segments;

static bool all_digits(const char *s) {
    if (*s == '\0') return false;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s)) return false;
    return true;
}

/* Splits "a.b[1].c" / "a.b.1.c" into segments. Returns -1 when malformed (empty segment, bad brackets). */
static int split_path(const char *path, path_segments *out) {
    size_t length = strlen(path);
    if (length == 0 || length >= sizeof out->buffer) return -1;
    out->count = 0;
    char *w = out->buffer;
    const char *p = path;
    bool expect_name = true;
    while (*p) {
        if (out->count == MAX_SEGMENTS) return -1;
        if (*p == '[') {
            const char *close = strchr(p, ']');
            if (close == NULL || close == p + 1) return -1;
            out->names[out->count++] = w;
            for (const char *q = p + 1; q < close; q++) {
                if (!isdigit((unsigned char)*q)) return -1;
                *w++ = *q;
            }
            *w++ = '\0';
            p = close + 1;
            if (*p == '.') {
                p++;
                if (*p == '\0') return -1;
                expect_name = true;
            } else if (*p != '[' && *p != '\0') {
                return -1;
            }
            continue;
        }
        if (!expect_name) return -1;
        out->names[out->count++] = w;
        const char *start = p;
        while (*p && *p != '.' && *p != '[') {
            if (*p == ']') return -1;
            *w++ = *p++;
        }
        if (p == start) return -1;
        *w++ = '\0';
        expect_name = false;
        if (*p == '.') {
            p++;
            if (*p == '\0') return -1;
            expect_name = true;
        }
    }
    return out->count > 0 ? 0 : -1;
}

/* "phases[1].lr" for display from segments [0, n). */
static void join_display(const mb_cfg_node *root, const path_segments *segments, size_t n, char *out, size_t size) {
    size_t used = 0;
    out[0] = '\0';
    const mb_cfg_node *node = root;
    for (size_t i = 0; i < n && used < size; i++) {
        bool index = node != NULL && node->kind == MB_CFG_NODE_SEQ;
        int written = index ? snprintf(out + used, size - used, "[%s]", segments->names[i])
                            : snprintf(out + used, size - used, "%s%s", used ? "." : "", segments->names[i]);
        if (written < 0) break;
        used += (size_t)written;
        if (node != NULL) {
            if (node->kind == MB_CFG_NODE_MAP) {
                long k = map_index(node, segments->names[i]);
                node = k >= 0 ? node->children[k] : NULL;
            } else if (node->kind == MB_CFG_NODE_SEQ && all_digits(segments->names[i])) {
                unsigned long k = strtoul(segments->names[i], NULL, 10);
                node = k < node->count ? node->children[k] : NULL;
            } else {
                node = NULL;
            }
        }
    }
}

static mb_cfg_node *child_at(const mb_cfg_node *node, const char *name) {
    if (node->kind == MB_CFG_NODE_MAP) {
        long k = map_index(node, name);
        return k >= 0 ? node->children[k] : NULL;
    }
    if (node->kind == MB_CFG_NODE_SEQ && all_digits(name)) {
        errno = 0;
        unsigned long k = strtoul(name, NULL, 10);
        return errno == 0 && k < node->count ? node->children[k] : NULL;
    }
    return NULL;
}

const mb_cfg_node *mb_cfg_tree_find(const mb_cfg_tree *tree, const char *path) {
    path_segments segments;
    if (tree == NULL || tree->root == NULL || split_path(path, &segments) != 0) return NULL;
    const mb_cfg_node *node = tree->root;
    for (size_t i = 0; i < segments.count && node != NULL; i++) node = child_at(node, segments.names[i]);
    return node;
}

int mb_cfg_fail_at(const mb_cfg_tree *tree, const char *path, mb_error *err, const char *format, ...) {
    char message[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    path_segments segments;
    const mb_cfg_node *node = tree ? tree->root : NULL;
    char display[PATH_LEN];
    snprintf(display, sizeof display, "%s", path);
    if (node != NULL && split_path(path, &segments) == 0) {
        join_display(tree->root, &segments, segments.count, display, sizeof display);
        for (size_t i = 0; i < segments.count; i++) {
            const mb_cfg_node *child = child_at(node, segments.names[i]);
            if (child == NULL) break;
            node = child;
        }
    }
    return fail_node(err, node, display, "%s", message);
}

/* ---- Overrides --------------------------------------------------------------------------------------------------- */

/* Replaces or appends (index == count) the child of node named by `name`; takes ownership of value. */
static int put_child(mb_cfg_node *node, const char *name, mb_cfg_node *value) {
    if (node->kind == MB_CFG_NODE_MAP) {
        long k = map_index(node, name);
        if (k >= 0) {
            node_free(node->children[k]);
            node->children[k] = value;
            return 0;
        }
        char *key = strdup(name);
        if (key == NULL || node_append(node, key, value) != 0) {
            free(key);
            return -1;
        }
        return 0;
    }
    size_t index = strtoul(name, NULL, 10);
    if (index < node->count) {
        node_free(node->children[index]);
        node->children[index] = value;
        return 0;
    }
    return node_append(node, NULL, value);
}

int mb_cfg_tree_override(mb_cfg_tree *tree, const char *assignment, mb_error *err) {
    if (tree == NULL || tree->root == NULL) return mb_fail(err, "override '%s': no configuration loaded", assignment);
    const char *equals = strchr(assignment, '=');
    if (equals == NULL || equals == assignment)
        return mb_fail(err, "override '%s': expected key.path=value", assignment);
    char key[PATH_LEN];
    size_t key_length = (size_t)(equals - assignment);
    if (key_length >= sizeof key) return mb_fail(err, "override '%s': key path too long", assignment);
    memcpy(key, assignment, key_length);
    key[key_length] = '\0';
    path_segments segments;
    if (split_path(key, &segments) != 0)
        return mb_fail(err, "override '%s': malformed key path '%s' (use a.b.c, list indices as a.1.b or a[1].b)",
                       assignment, key);
    char origin_text[PATH_LEN + 1100];
    snprintf(origin_text, sizeof origin_text, "override '%s'", assignment);
    const char *origin = intern_origin(tree, origin_text);
    if (origin == NULL) return mb_fail(err, "%s: out of memory", origin_text);
    mb_cfg_node *value = NULL;
    if (parse_fragment(equals + 1, origin, &value, err) != 0) return -1;

    mb_cfg_node *node = tree->root;
    char display[PATH_LEN];
    for (size_t i = 0; i < segments.count; i++) {
        const char *name = segments.names[i];
        bool last = i + 1 == segments.count;
        if (node->kind == MB_CFG_NODE_SCALAR) {
            join_display(tree->root, &segments, i, display, sizeof display);
            node_free(value);
            return mb_fail(err, "%s: '%s' is a scalar, so '%s' cannot be set inside it", origin, display, key);
        }
        if (node->kind == MB_CFG_NODE_SEQ) {
            join_display(tree->root, &segments, i, display, sizeof display);
            if (!all_digits(name)) {
                node_free(value);
                return mb_fail(err, "%s: '%s' is a list, so '%s' must be an index", origin, display, name);
            }
            errno = 0;
            unsigned long index = strtoul(name, NULL, 10);
            if (errno != 0 || index > node->count) {
                node_free(value);
                return mb_fail(err, "%s: %s[%s]: index out of range (the list has %zu entries; an override may "
                               "append one)", origin, display, name, node->count);
            }
        }
        if (last) {
            if (put_child(node, name, value) != 0) {
                node_free(value);
                return mb_fail(err, "%s: out of memory", origin);
            }
            return 0;
        }
        mb_cfg_node *child = child_at(node, name);
        if (child == NULL || node_is_null(child)) {
            mb_cfg_node *map = node_new(MB_CFG_NODE_MAP, origin, 0, 0);
            if (map == NULL || put_child(node, name, map) != 0) {
                node_free(map);
                node_free(value);
                return mb_fail(err, "%s: out of memory", origin);
            }
            child = map;
        }
        node = child;
    }
    node_free(value);
    return 0;
}

/* ---- Emitting YAML ----------------------------------------------------------------------------------------------- */

typedef struct text_buffer {
    char *data;
    size_t size, capacity;
} text_buffer;

static int buffer_write(void *context, unsigned char *bytes, size_t size) {
    text_buffer *buffer = context;
    if (buffer->size + size + 1 > buffer->capacity) {
        size_t capacity = buffer->capacity ? buffer->capacity : 1024;
        while (buffer->size + size + 1 > capacity) capacity *= 2;
        char *data = realloc(buffer->data, capacity);
        if (data == NULL) return 0;
        buffer->data = data;
        buffer->capacity = capacity;
    }
    memcpy(buffer->data + buffer->size, bytes, size);
    buffer->size += size;
    buffer->data[buffer->size] = '\0';
    return 1;
}

static bool all_scalars(const mb_cfg_node *node) {
    for (size_t i = 0; i < node->count; i++)
        if (node->children[i]->kind != MB_CFG_NODE_SCALAR) return false;
    return true;
}

static int emit_scalar(yaml_emitter_t *emitter, const char *text, bool plain) {
    yaml_event_t event;
    yaml_scalar_event_initialize(&event, NULL, NULL, (yaml_char_t *)text, (int)strlen(text), 1, 1,
                                 plain ? YAML_PLAIN_SCALAR_STYLE : YAML_DOUBLE_QUOTED_SCALAR_STYLE);
    return yaml_emitter_emit(emitter, &event) ? 0 : -1;
}

static int emit_node(yaml_emitter_t *emitter, const mb_cfg_node *node) {
    yaml_event_t event;
    switch (node->kind) {
    case MB_CFG_NODE_SCALAR:
        if (node_is_null(node)) return emit_scalar(emitter, "null", true);
        return emit_scalar(emitter, node->text, node->plain);
    case MB_CFG_NODE_SEQ:
        yaml_sequence_start_event_initialize(&event, NULL, NULL, 1,
                                             all_scalars(node) ? YAML_FLOW_SEQUENCE_STYLE : YAML_BLOCK_SEQUENCE_STYLE);
        if (!yaml_emitter_emit(emitter, &event)) return -1;
        for (size_t i = 0; i < node->count; i++)
            if (emit_node(emitter, node->children[i]) != 0) return -1;
        yaml_sequence_end_event_initialize(&event);
        return yaml_emitter_emit(emitter, &event) ? 0 : -1;
    case MB_CFG_NODE_MAP:
        yaml_mapping_start_event_initialize(&event, NULL, NULL, 1, YAML_BLOCK_MAPPING_STYLE);
        if (!yaml_emitter_emit(emitter, &event)) return -1;
        for (size_t i = 0; i < node->count; i++) {
            if (emit_scalar(emitter, node->keys[i], true) != 0) return -1;
            if (emit_node(emitter, node->children[i]) != 0) return -1;
        }
        yaml_mapping_end_event_initialize(&event);
        return yaml_emitter_emit(emitter, &event) ? 0 : -1;
    }
    return -1;
}

static char *emit_yaml(const mb_cfg_node *root, mb_error *err) {
    yaml_emitter_t emitter;
    if (!yaml_emitter_initialize(&emitter)) {
        mb_fail(err, "cannot initialize the YAML emitter");
        return NULL;
    }
    text_buffer buffer = {0};
    yaml_emitter_set_output(&emitter, buffer_write, &buffer);
    yaml_emitter_set_unicode(&emitter, 1);
    yaml_emitter_set_width(&emitter, -1);
    yaml_emitter_set_indent(&emitter, 2);
    yaml_event_t event;
    bool ok = yaml_stream_start_event_initialize(&event, YAML_UTF8_ENCODING) && yaml_emitter_emit(&emitter, &event);
    ok = ok && yaml_document_start_event_initialize(&event, NULL, NULL, NULL, 1) &&
         yaml_emitter_emit(&emitter, &event);
    ok = ok && emit_node(&emitter, root) == 0;
    ok = ok && yaml_document_end_event_initialize(&event, 1) && yaml_emitter_emit(&emitter, &event);
    ok = ok && yaml_stream_end_event_initialize(&event) && yaml_emitter_emit(&emitter, &event);
    ok = ok && yaml_emitter_flush(&emitter);
    if (!ok) {
        mb_fail(err, "YAML emitter: %s", emitter.problem ? emitter.problem : "out of memory");
        free(buffer.data);
        buffer.data = NULL;
    }
    yaml_emitter_delete(&emitter);
    return buffer.data;
}

char *mb_cfg_tree_to_yaml(const mb_cfg_tree *tree, mb_error *err) {
    if (tree == NULL || tree->root == NULL) {
        mb_fail(err, "no configuration loaded");
        return NULL;
    }
    return emit_yaml(tree->root, err);
}

/* ---- Scalar parsers ---------------------------------------------------------------------------------------------- */

/* Copies a run of digits with single '_' between digits into digits[]; returns the count or -1 if malformed. */
static int digit_run(const char **p, char *digits, size_t capacity, size_t *used) {
    const char *s = *p;
    int n = 0;
    if (!isdigit((unsigned char)*s)) return 0;
    while (isdigit((unsigned char)*s)) {
        if (*used + 1 >= capacity) return -1;
        digits[(*used)++] = *s++;
        n++;
        if (*s == '_') {
            if (!isdigit((unsigned char)s[1])) return -1;
            s++;
        }
    }
    *p = s;
    return n;
}

int mb_cfg_parse_int64(const char *text, int64_t *value, mb_error *err) {
    const char *p = text;
    bool negative = *p == '-';
    if (*p == '-' || *p == '+') p++;
    char digits[64];
    size_t used = 0;
    int n = digit_run(&p, digits, sizeof digits, &used);
    if (n <= 0 || *p != '\0') return mb_fail(err, "expected an integer, got '%.*s'", SHOWN_TEXT, text);
    uint64_t magnitude = 0;
    uint64_t limit = negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (size_t i = 0; i < used; i++) {
        unsigned d = (unsigned)(digits[i] - '0');
        if (magnitude > (limit - d) / 10) return mb_fail(err, "integer out of range, got '%.*s'", SHOWN_TEXT, text);
        magnitude = magnitude * 10 + d;
    }
    *value = negative ? (int64_t)(0 - magnitude) : (int64_t)magnitude;
    return 0;
}

static int tokens_fail(mb_error *err, const char *text, const char *why) {
    return mb_fail(err, "expected a token count like 3B, 1.719e12, 1_719_000_000_000 or 50_000_000tok%s, got '%.*s'",
                   why, SHOWN_TEXT, text);
}

int mb_cfg_parse_tokens(const char *text, int64_t *value, mb_error *err) {
    const char *p = text;
    char digits[128];
    size_t used = 0;
    if (digit_run(&p, digits, sizeof digits, &used) <= 0) return tokens_fail(err, text, "");
    long exponent = 0;
    if (*p == '.') {
        p++;
        int fraction = digit_run(&p, digits, sizeof digits, &used);
        if (fraction <= 0) return tokens_fail(err, text, "");
        exponent -= fraction;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        bool negative = *p == '-';
        if (*p == '-' || *p == '+') p++;
        if (!isdigit((unsigned char)*p)) return tokens_fail(err, text, "");
        long e = 0;
        while (isdigit((unsigned char)*p)) {
            if (e > 1000) return tokens_fail(err, text, " (exponent too large)");
            e = e * 10 + (*p++ - '0');
        }
        exponent += negative ? -e : e;
    }
    static const struct { char letter; int power; } magnitudes[] = {
        {'K', 3}, {'k', 3}, {'M', 6}, {'m', 6}, {'B', 9}, {'b', 9}, {'T', 12}, {'t', 12}};
    if (strcmp(p, "tok") != 0) {
        for (size_t i = 0; i < sizeof magnitudes / sizeof magnitudes[0]; i++) {
            if (*p == magnitudes[i].letter) {
                exponent += magnitudes[i].power;
                p++;
                break;
            }
        }
    }
    if (strcmp(p, "tok") == 0) p += 3;
    if (*p != '\0') return tokens_fail(err, text, "");
    /* value = digits * 10^exponent, exactly: drop leading zeros, fold trailing zeros into the exponent. */
    size_t start = 0;
    while (start + 1 < used && digits[start] == '0') start++;
    while (used > start + 1 && digits[used - 1] == '0') {
        used--;
        exponent++;
    }
    if (used - start == 1 && digits[start] == '0') {
        *value = 0;
        return 0;
    }
    if (exponent < 0) return tokens_fail(err, text, " (a whole number)");
    if ((long)(used - start) + exponent > 19) return tokens_fail(err, text, " (at most 9.2e18)");
    uint64_t v = 0;
    for (size_t i = start; i < used; i++) v = v * 10 + (uint64_t)(digits[i] - '0');
    for (long i = 0; i < exponent; i++) {
        if (v > (uint64_t)INT64_MAX / 10) return tokens_fail(err, text, " (at most 9.2e18)");
        v *= 10;
    }
    if (v > (uint64_t)INT64_MAX) return tokens_fail(err, text, " (at most 9.2e18)");
    *value = (int64_t)v;
    return 0;
}

int mb_cfg_parse_float(const char *text, double *value, mb_error *err) {
    /* Checked by hand first so strtod's extras (inf, nan, hex, leading spaces) are not accepted. */
    const char *p = text;
    if (*p == '-' || *p == '+') p++;
    int mantissa_digits = 0;
    while (isdigit((unsigned char)*p)) p++, mantissa_digits++;
    if (*p == '.') {
        p++;
        while (isdigit((unsigned char)*p)) p++, mantissa_digits++;
    }
    if (mantissa_digits > 0 && (*p == 'e' || *p == 'E')) {
        p++;
        if (*p == '-' || *p == '+') p++;
        if (!isdigit((unsigned char)*p)) mantissa_digits = 0;
        while (isdigit((unsigned char)*p)) p++;
    }
    if (mantissa_digits == 0 || *p != '\0') return mb_fail(err, "expected a number, got '%.*s'", SHOWN_TEXT, text);
    char *end = NULL;
    double v = strtod(text, &end);
    if (end == NULL || *end != '\0' || !isfinite(v))
        return mb_fail(err, "number out of range, got '%.*s'", SHOWN_TEXT, text);
    *value = v;
    return 0;
}

static int parse_bool(const char *text, bool *value) {
    if (strcmp(text, "true") == 0 || strcmp(text, "True") == 0 || strcmp(text, "TRUE") == 0) {
        *value = true;
        return 0;
    }
    if (strcmp(text, "false") == 0 || strcmp(text, "False") == 0 || strcmp(text, "FALSE") == 0) {
        *value = false;
        return 0;
    }
    return -1;
}

/* ---- Schema reader ----------------------------------------------------------------------------------------------- */

static bool is_scalar_list(const mb_cfg_field *field) {
    return field->type == MB_CFG_LIST && field->fields != NULL && field->fields[0].path != NULL &&
           field->fields[0].path[0] == '\0';
}

static void join_path(char *out, size_t size, const char *prefix, const char *path) {
    if (prefix[0] == '\0') snprintf(out, size, "%s", path);
    else if (path[0] == '\0') snprintf(out, size, "%s", prefix);
    else snprintf(out, size, "%s.%s", prefix, path);
}

static void zero_field(const mb_cfg_field *field, unsigned char *base) {
    unsigned char *at = base + field->offset;
    switch (field->type) {
    case MB_CFG_INT: *(int *)at = 0; break;
    case MB_CFG_INT64:
    case MB_CFG_TOKENS: *(int64_t *)at = 0; break;
    case MB_CFG_FLOAT: *(double *)at = 0.0; break;
    case MB_CFG_BOOL: *(bool *)at = false; break;
    case MB_CFG_STRING: at[0] = '\0'; break;
    case MB_CFG_ENUM: *(int *)at = 0; break;
    case MB_CFG_LIST:
        memset(at, 0, field->size * field->capacity);
        *(int *)(base + field->count_offset) = 0;
        break;
    }
}

/* Compares a parsed number against the field's bounds; both as int64 (integer types) or double (floats). */
static int check_bounds(const mb_cfg_field *field, const mb_cfg_node *node, const char *path, bool is_float,
                        int64_t as_int, double as_float, mb_error *err) {
    const char *bounds[2] = {field->min, field->max};
    for (int which = 0; which < 2; which++) {
        if (bounds[which] == NULL) continue;
        bool exclusive = field->flags & (which == 0 ? MB_CFG_MIN_EXCLUSIVE : MB_CFG_MAX_EXCLUSIVE);
        int cmp;
        if (is_float) {
            double bound = 0;
            mb_cfg_parse_float(bounds[which], &bound, NULL);
            cmp = as_float < bound ? -1 : as_float > bound ? 1 : 0;
        } else {
            int64_t bound = 0;
            if (field->type == MB_CFG_TOKENS) mb_cfg_parse_tokens(bounds[which], &bound, NULL);
            else mb_cfg_parse_int64(bounds[which], &bound, NULL);
            cmp = as_int < bound ? -1 : as_int > bound ? 1 : 0;
        }
        bool ok = which == 0 ? (exclusive ? cmp > 0 : cmp >= 0) : (exclusive ? cmp < 0 : cmp <= 0);
        if (!ok) {
            char got[128];
            if (field->type == MB_CFG_LIST) snprintf(got, sizeof got, "%" PRId64, as_int);
            else describe_node(node, got, sizeof got);
            const char *relation = which == 0 ? (exclusive ? ">" : ">=") : (exclusive ? "<" : "<=");
            return fail_node(err, node, path, "%s %s %s, got %s",
                             field->type == MB_CFG_LIST ? "number of entries must be" : "must be", relation,
                             bounds[which], got);
        }
    }
    return 0;
}

static int read_fields(const mb_cfg_node *map, const mb_cfg_node *anchor, const char *prefix,
                       const mb_cfg_field *fields, unsigned char *base, mb_error *err);
static int check_unknown_keys(const mb_cfg_node *map, const char *relative, const char *prefix,
                              const mb_cfg_field *fields, mb_error *err);

static int store_value(const mb_cfg_node *node, const mb_cfg_field *field, const char *path, unsigned char *base,
                       mb_error *err);

static int store_list(const mb_cfg_node *node, const mb_cfg_field *field, const char *path, unsigned char *base,
                      mb_error *err) {
    if (node->kind != MB_CFG_NODE_SEQ) return fail_node(err, node, path, "expected a list, got %s", kind_name(node));
    if (node->count > field->capacity)
        return fail_node(err, node, path, "at most %zu entries are supported, got %zu", field->capacity, node->count);
    if (check_bounds(field, node, path, false, (int64_t)node->count, 0, err) != 0) return -1;
    unsigned char *array = base + field->offset;
    memset(array, 0, field->size * field->capacity);
    for (size_t i = 0; i < node->count; i++) {
        char element_path[PATH_LEN];
        snprintf(element_path, sizeof element_path, "%s[%zu]", path, i);
        const mb_cfg_node *element = node->children[i];
        unsigned char *element_base = array + i * field->size;
        if (is_scalar_list(field)) {
            if (store_value(element, &field->fields[0], element_path, element_base, err) != 0) return -1;
            continue;
        }
        if (node_is_null(element)) element = NULL;
        else if (element->kind != MB_CFG_NODE_MAP)
            return fail_node(err, element, element_path, "expected a map, got %s", kind_name(element));
        if (element != NULL && check_unknown_keys(element, "", element_path, field->fields, err) != 0) return -1;
        if (read_fields(element, element ? element : node, element_path, field->fields, element_base, err) != 0)
            return -1;
    }
    *(int *)(base + field->count_offset) = (int)node->count;
    return 0;
}

/* Parses node (non-null) into the field at base + field->offset. */
static int store_value(const mb_cfg_node *node, const mb_cfg_field *field, const char *path, unsigned char *base,
                       mb_error *err) {
    if (field->type == MB_CFG_LIST) return store_list(node, field, path, base, err);
    unsigned char *at = base + field->offset;
    static const char *const expected[] = {
        [MB_CFG_INT] = "an integer", [MB_CFG_INT64] = "an integer", [MB_CFG_TOKENS] = "a token count",
        [MB_CFG_FLOAT] = "a number", [MB_CFG_BOOL] = "true or false", [MB_CFG_STRING] = "a string",
        [MB_CFG_ENUM] = "a name"};
    if (node->kind != MB_CFG_NODE_SCALAR || node_is_null(node))
        return fail_node(err, node, path, "expected %s, got %s", expected[field->type], kind_name(node));
    const char *text = node->text;
    mb_error reason;
    int64_t as_int = 0;
    double as_float = 0;
    switch (field->type) {
    case MB_CFG_INT:
    case MB_CFG_INT64:
    case MB_CFG_TOKENS: {
        int rc = field->type == MB_CFG_TOKENS ? mb_cfg_parse_tokens(text, &as_int, &reason)
                                              : mb_cfg_parse_int64(text, &as_int, &reason);
        if (rc != 0) return fail_node(err, node, path, "%s", reason.message);
        if (field->type == MB_CFG_INT && (as_int < INT_MIN || as_int > INT_MAX))
            return fail_node(err, node, path, "integer out of range, got '%s'", text);
        if (check_bounds(field, node, path, false, as_int, 0, err) != 0) return -1;
        if (field->type == MB_CFG_INT) *(int *)at = (int)as_int;
        else *(int64_t *)at = as_int;
        return 0;
    }
    case MB_CFG_FLOAT:
        if (mb_cfg_parse_float(text, &as_float, &reason) != 0) return fail_node(err, node, path, "%s", reason.message);
        if (check_bounds(field, node, path, true, 0, as_float, err) != 0) return -1;
        *(double *)at = as_float;
        return 0;
    case MB_CFG_BOOL:
        if (parse_bool(text, (bool *)at) != 0)
            return fail_node(err, node, path, "expected true or false, got '%.*s'", SHOWN_TEXT, text);
        return 0;
    case MB_CFG_STRING:
        if (strlen(text) + 1 > field->size)
            return fail_node(err, node, path, "text longer than %zu characters", field->size - 1);
        memcpy(at, text, strlen(text) + 1);
        return 0;
    case MB_CFG_ENUM: {
        char names[512];
        size_t used = 0;
        names[0] = '\0';
        for (int i = 0; field->enum_names[i] != NULL; i++) {
            if (strcmp(text, field->enum_names[i]) == 0) {
                *(int *)at = i;
                return 0;
            }
            int written = snprintf(names + used, sizeof names - used, "%s%s", i ? ", " : "", field->enum_names[i]);
            if (written > 0 && (size_t)written < sizeof names - used) used += (size_t)written;
        }
        return fail_node(err, node, path, "expected one of %s; got '%.*s'", names, SHOWN_TEXT, text);
    }
    case MB_CFG_LIST: break;
    }
    return fail_node(err, node, path, "unsupported field type %d", (int)field->type);
}

/* Finds the node at the field's dotted path under map (NULL-safe). *holder receives the deepest existing map on the
 * way (for "missing key" locations). Fails when the path goes through something that is not a map. */
static int lookup_field(const mb_cfg_node *map, const char *field_path, const char *prefix, const mb_cfg_node **found,
                        const mb_cfg_node **holder, mb_error *err) {
    *found = NULL;
    *holder = map;
    if (map == NULL) return 0;
    char relative[PATH_LEN];
    const char *segment = field_path;
    const mb_cfg_node *node = map;
    for (;;) {
        const char *dot = strchr(segment, '.');
        size_t length = dot ? (size_t)(dot - segment) : strlen(segment);
        char name[PATH_LEN];
        snprintf(name, sizeof name, "%.*s", (int)length, segment);
        long k = map_index(node, name);
        if (k < 0) return 0;
        const mb_cfg_node *child = node->children[k];
        if (dot == NULL) {
            *found = child;
            return 0;
        }
        if (node_is_null(child)) return 0;
        if (child->kind != MB_CFG_NODE_MAP) {
            char display[PATH_LEN];
            snprintf(relative, sizeof relative, "%.*s", (int)(dot - field_path), field_path);
            join_path(display, sizeof display, prefix, relative);
            return fail_node(err, child, display, "expected a map, got %s", kind_name(child));
        }
        node = child;
        *holder = node;
        segment = dot + 1;
    }
}

static int read_fields(const mb_cfg_node *map, const mb_cfg_node *anchor, const char *prefix,
                       const mb_cfg_field *fields, unsigned char *base, mb_error *err) {
    for (const mb_cfg_field *field = fields; field->path != NULL; field++) {
        char path[PATH_LEN];
        join_path(path, sizeof path, prefix, field->path);
        const mb_cfg_node *node = NULL, *holder = NULL;
        if (lookup_field(map, field->path, prefix, &node, &holder, err) != 0) return -1;
        if (node != NULL && node_is_null(node)) node = NULL;
        if (node != NULL) {
            if (store_value(node, field, path, base, err) != 0) return -1;
            continue;
        }
        if (field->flags & MB_CFG_REQUIRED)
            return fail_node(err, holder ? holder : anchor, path, "missing required key");
        if (field->default_value == NULL) {
            zero_field(field, base);
            continue;
        }
        mb_cfg_node *fallback = NULL;
        if (parse_fragment(field->default_value, ORIGIN_DEFAULT, &fallback, err) != 0) return -1;
        int rc = node_is_null(fallback) ? (zero_field(field, base), 0)
                                        : store_value(fallback, field, path, base, err);
        node_free(fallback);
        if (rc != 0) return -1;
    }
    return 0;
}

typedef enum key_match { KEY_UNKNOWN, KEY_FIELD, KEY_PREFIX } key_match;

static key_match match_key(const mb_cfg_field *fields, const char *relative) {
    size_t length = strlen(relative);
    key_match match = KEY_UNKNOWN;
    for (const mb_cfg_field *field = fields; field->path != NULL; field++) {
        if (strcmp(field->path, relative) == 0) return KEY_FIELD;
        if (strncmp(field->path, relative, length) == 0 && field->path[length] == '.') match = KEY_PREFIX;
    }
    return match;
}

/* Comma-separated names the schema allows directly under `relative`. */
static void allowed_keys(const mb_cfg_field *fields, const char *relative, char *out, size_t size) {
    size_t length = strlen(relative), used = 0;
    out[0] = '\0';
    for (const mb_cfg_field *field = fields; field->path != NULL; field++) {
        const char *rest = field->path;
        if (length > 0) {
            if (strncmp(rest, relative, length) != 0 || rest[length] != '.') continue;
            rest += length + 1;
        }
        size_t name_length = strcspn(rest, ".");
        bool seen = false;
        for (const mb_cfg_field *earlier = fields; earlier != field && !seen; earlier++) {
            const char *other = earlier->path;
            if (length > 0) {
                if (strncmp(other, relative, length) != 0 || other[length] != '.') continue;
                other += length + 1;
            }
            seen = strcspn(other, ".") == name_length && strncmp(other, rest, name_length) == 0;
        }
        if (seen) continue;
        int written = snprintf(out + used, size - used, "%s%.*s", used ? ", " : "", (int)name_length, rest);
        if (written < 0 || (size_t)written >= size - used) break;
        used += (size_t)written;
    }
}

static int check_unknown_keys(const mb_cfg_node *map, const char *relative, const char *prefix,
                              const mb_cfg_field *fields, mb_error *err) {
    for (size_t i = 0; i < map->count; i++) {
        char key_relative[PATH_LEN], path[PATH_LEN];
        join_path(key_relative, sizeof key_relative, relative, map->keys[i]);
        join_path(path, sizeof path, prefix, key_relative);
        const mb_cfg_node *child = map->children[i];
        key_match match = strchr(map->keys[i], '.') || map->keys[i][0] == '\0' ? KEY_UNKNOWN
                                                                                : match_key(fields, key_relative);
        if (match == KEY_UNKNOWN) {
            char allowed[600];
            allowed_keys(fields, relative, allowed, sizeof allowed);
            mb_cfg_node key_position = {.origin = child->origin, .line = child->key_line, .column = child->key_column};
            return fail_node(err, &key_position, path, "unknown key (known keys here: %s)", allowed);
        }
        if (match == KEY_PREFIX && !node_is_null(child)) {
            if (child->kind != MB_CFG_NODE_MAP)
                return fail_node(err, child, path, "expected a map, got %s", kind_name(child));
            if (check_unknown_keys(child, key_relative, prefix, fields, err) != 0) return -1;
        }
    }
    return 0;
}

/* Bytes from base that reading the field writes (for scratch buffers in schema checks). */
static size_t field_extent(const mb_cfg_field *field) {
    switch (field->type) {
    case MB_CFG_INT:
    case MB_CFG_ENUM: return field->offset + sizeof(int);
    case MB_CFG_INT64:
    case MB_CFG_TOKENS: return field->offset + sizeof(int64_t);
    case MB_CFG_FLOAT: return field->offset + sizeof(double);
    case MB_CFG_BOOL: return field->offset + sizeof(bool);
    case MB_CFG_STRING: return field->offset + field->size;
    case MB_CFG_LIST: {
        size_t array_end = field->offset + field->size * field->capacity;
        size_t count_end = field->count_offset + sizeof(int);
        return array_end > count_end ? array_end : count_end;
    }
    }
    return 0;
}

static int check_schema_fields(const mb_cfg_field *fields, const char *prefix, int depth, mb_error *err) {
    if (depth > 8) return mb_fail(err, "schema: lists nested deeper than 8 levels under '%s'", prefix);
    for (const mb_cfg_field *field = fields; field->path != NULL; field++) {
        char path[PATH_LEN];
        join_path(path, sizeof path, prefix, field->path);
        bool element = field->path[0] == '\0';
        if (element && (field != fields || field[1].path != NULL || field->type == MB_CFG_LIST))
            return mb_fail(err, "schema: %s: an empty path is only allowed as the single scalar field of a list "
                           "element", path);
        if (!element) {
            path_segments segments;
            if (split_path(field->path, &segments) != 0 || strchr(field->path, '[') != NULL)
                return mb_fail(err, "schema: '%s': malformed path", path);
        }
        for (const mb_cfg_field *other = fields; other != field; other++) {
            size_t length = strlen(other->path);
            bool prefix_clash = strncmp(field->path, other->path, length) == 0 && field->path[length] == '.';
            size_t own = strlen(field->path);
            prefix_clash = prefix_clash || (strncmp(other->path, field->path, own) == 0 && other->path[own] == '.');
            if (strcmp(other->path, field->path) == 0 || prefix_clash)
                return mb_fail(err, "schema: '%s' clashes with '%s'", path, other->path);
        }
        switch (field->type) {
        case MB_CFG_INT: case MB_CFG_INT64: case MB_CFG_TOKENS: case MB_CFG_FLOAT: case MB_CFG_BOOL: break;
        case MB_CFG_STRING:
            if (field->size == 0) return mb_fail(err, "schema: %s: string field needs a buffer size", path);
            break;
        case MB_CFG_ENUM:
            if (field->enum_names == NULL || field->enum_names[0] == NULL)
                return mb_fail(err, "schema: %s: enum field needs enum_names", path);
            break;
        case MB_CFG_LIST:
            if (field->fields == NULL || field->fields[0].path == NULL || field->size == 0 || field->capacity == 0 ||
                field->capacity > INT_MAX)
                return mb_fail(err, "schema: %s: list field needs fields, size and capacity", path);
            if (check_schema_fields(field->fields, path, depth + 1, err) != 0) return -1;
            break;
        default: return mb_fail(err, "schema: %s: unknown type %d", path, (int)field->type);
        }
        const char *bounds[2] = {field->min, field->max};
        for (int which = 0; which < 2; which++) {
            if (bounds[which] == NULL) continue;
            int64_t i64;
            double f64;
            int rc = field->type == MB_CFG_FLOAT ? mb_cfg_parse_float(bounds[which], &f64, err)
                     : field->type == MB_CFG_TOKENS ? mb_cfg_parse_tokens(bounds[which], &i64, err)
                     : (field->type == MB_CFG_INT || field->type == MB_CFG_INT64 || field->type == MB_CFG_LIST)
                         ? mb_cfg_parse_int64(bounds[which], &i64, err)
                         : mb_fail(err, "bounds apply to numbers and lists only");
            if (rc != 0) return mb_fail_context(err, "schema: %s: %s bound", path, which ? "max" : "min");
        }
        if (field->default_value != NULL) {
            unsigned char *scratch = calloc(1, field_extent(field));
            if (scratch == NULL) return mb_fail(err, "out of memory");
            mb_cfg_node *fallback = NULL;
            int rc = parse_fragment(field->default_value, ORIGIN_DEFAULT, &fallback, err);
            if (rc == 0 && !node_is_null(fallback)) rc = store_value(fallback, field, path, scratch, err);
            node_free(fallback);
            free(scratch);
            if (rc != 0) return mb_fail_context(err, "schema");
        }
    }
    return 0;
}

int mb_cfg_schema_check(const mb_cfg_field *schema, mb_error *err) {
    if (schema == NULL) return mb_fail(err, "schema: NULL");
    if (schema[0].path != NULL && schema[0].path[0] == '\0')
        return mb_fail(err, "schema: the top level cannot be a scalar element");
    return check_schema_fields(schema, "", 0, err);
}

int mb_cfg_read(const mb_cfg_tree *tree, const mb_cfg_field *schema, void *out, mb_error *err) {
    if (tree == NULL || tree->root == NULL) return mb_fail(err, "no configuration loaded");
    if (mb_cfg_schema_check(schema, err) != 0) return -1;
    if (check_unknown_keys(tree->root, "", "", schema, err) != 0) return -1;
    return read_fields(tree->root, tree->root, "", schema, out, err);
}

/* ---- Dump and hash ----------------------------------------------------------------------------------------------- */

/* Whole numbers below 1e15 as "%.1f"; otherwise the shortest "%.*g" that reads back to the same double, with ".0"
 * added where needed so YAML 1.1 readers (PyYAML) also see a float. */
static void format_float(double v, char *out, size_t size) {
    if (v == floor(v) && fabs(v) < 1e15) {                 /* whole numbers read best as 160000.0 */
        snprintf(out, size, "%.1f", v);
        return;
    }
    for (int precision = 1; precision <= 17; precision++) {
        snprintf(out, size, "%.*g", precision, v);
        if (strtod(out, NULL) == v) break;
    }
    if (strchr(out, '.') != NULL) return;
    char *e = strpbrk(out, "eE");
    char tail[32];
    snprintf(tail, sizeof tail, "%s", e ? e : "");
    if (e) *e = '\0';
    size_t length = strlen(out);
    snprintf(out + length, size - length, ".0%s", tail);
}

static void format_tokens(int64_t v, char *out, size_t size) {
    char digits[32];
    snprintf(digits, sizeof digits, "%" PRId64, v);
    size_t n = strlen(digits), used = 0;
    for (size_t i = 0; i < n && used + 2 < size; i++) {
        if (i > 0 && (n - i) % 3 == 0) out[used++] = '_';
        out[used++] = digits[i];
    }
    out[used] = '\0';
}

static mb_cfg_node *value_node(const mb_cfg_field *field, const unsigned char *base, mb_error *err);

static int build_fields(mb_cfg_node *map, const mb_cfg_field *fields, const unsigned char *base, mb_error *err) {
    for (const mb_cfg_field *field = fields; field->path != NULL; field++) {
        mb_cfg_node *value = value_node(field, base, err);
        if (value == NULL) return -1;
        /* Walk/create the maps of the dotted path, then attach the value under the last segment. */
        path_segments segments;
        split_path(field->path, &segments);
        mb_cfg_node *node = map;
        for (size_t i = 0; i + 1 < segments.count; i++) {
            mb_cfg_node *child = child_at(node, segments.names[i]);
            if (child == NULL) {
                child = node_new(MB_CFG_NODE_MAP, ORIGIN_DUMP, 0, 0);
                if (child == NULL || put_child(node, segments.names[i], child) != 0) {
                    node_free(child);
                    node_free(value);
                    return mb_fail(err, "out of memory");
                }
            }
            node = child;
        }
        if (put_child(node, segments.names[segments.count - 1], value) != 0) {
            node_free(value);
            return mb_fail(err, "out of memory");
        }
    }
    return 0;
}

static mb_cfg_node *value_node(const mb_cfg_field *field, const unsigned char *base, mb_error *err) {
    const unsigned char *at = base + field->offset;
    char text[128];
    bool plain = true;
    const char *source = text;
    switch (field->type) {
    case MB_CFG_INT: snprintf(text, sizeof text, "%d", *(const int *)at); break;
    case MB_CFG_INT64: snprintf(text, sizeof text, "%" PRId64, *(const int64_t *)at); break;
    case MB_CFG_TOKENS: format_tokens(*(const int64_t *)at, text, sizeof text); break;
    case MB_CFG_FLOAT: format_float(*(const double *)at, text, sizeof text); break;
    case MB_CFG_BOOL: snprintf(text, sizeof text, "%s", *(const bool *)at ? "true" : "false"); break;
    case MB_CFG_STRING:
        source = (const char *)at;
        if (memchr(source, '\0', field->size) == NULL) {
            mb_fail(err, "dump: %s: string is not terminated", field->path);
            return NULL;
        }
        plain = false;
        break;
    case MB_CFG_ENUM: {
        int index = *(const int *)at, n = 0;
        while (field->enum_names[n] != NULL) n++;
        if (index < 0 || index >= n) {
            mb_fail(err, "dump: %s: enum index %d out of range", field->path, index);
            return NULL;
        }
        source = field->enum_names[index];
        break;
    }
    case MB_CFG_LIST: {
        int count = *(const int *)(base + field->count_offset);
        if (count < 0 || (size_t)count > field->capacity) {
            mb_fail(err, "dump: %s: list count %d out of range", field->path, count);
            return NULL;
        }
        mb_cfg_node *seq = node_new(MB_CFG_NODE_SEQ, ORIGIN_DUMP, 0, 0);
        if (seq == NULL) {
            mb_fail(err, "out of memory");
            return NULL;
        }
        for (int i = 0; i < count; i++) {
            const unsigned char *element = base + field->offset + (size_t)i * field->size;
            mb_cfg_node *child = NULL;
            if (is_scalar_list(field)) {
                child = value_node(&field->fields[0], element, err);
            } else {
                child = node_new(MB_CFG_NODE_MAP, ORIGIN_DUMP, 0, 0);
                if (child == NULL) {
                    mb_fail(err, "out of memory");
                } else if (build_fields(child, field->fields, element, err) != 0) {
                    node_free(child);
                    child = NULL;
                }
            }
            if (child != NULL && node_append(seq, NULL, child) != 0) {
                node_free(child);
                child = NULL;
                mb_fail(err, "out of memory");
            }
            if (child == NULL) {
                node_free(seq);
                return NULL;
            }
        }
        return seq;
    }
    }
    mb_cfg_node *node = scalar_new(source, strlen(source), plain, ORIGIN_DUMP, 0, 0);
    if (node == NULL) mb_fail(err, "out of memory");
    return node;
}

char *mb_cfg_dump(const mb_cfg_field *schema, const void *in, mb_error *err) {
    mb_cfg_node *root = node_new(MB_CFG_NODE_MAP, ORIGIN_DUMP, 0, 0);
    if (root == NULL) {
        mb_fail(err, "out of memory");
        return NULL;
    }
    char *text = NULL;
    if (build_fields(root, schema, in, err) == 0) text = emit_yaml(root, err);
    node_free(root);
    return text;
}

int mb_cfg_hash(const mb_cfg_field *schema, const void *in, uint64_t *hash, mb_error *err) {
    char *text = mb_cfg_dump(schema, in, err);
    if (text == NULL) return -1;
    uint64_t h = 0xcbf29ce484222325ull;                 /* FNV-1a 64 offset basis */
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ull;                          /* FNV-1a 64 prime */
    }
    free(text);
    *hash = h;
    return 0;
}

/* ---- Description ------------------------------------------------------------------------------------------------- */

static void describe_fields(const mb_cfg_field *fields, const char *prefix, FILE *out) {
    static const char *const type_names[] = {
        [MB_CFG_INT] = "int", [MB_CFG_INT64] = "int64", [MB_CFG_TOKENS] = "tokens", [MB_CFG_FLOAT] = "float",
        [MB_CFG_BOOL] = "bool", [MB_CFG_STRING] = "string", [MB_CFG_ENUM] = "enum", [MB_CFG_LIST] = "list"};
    for (const mb_cfg_field *field = fields; field->path != NULL; field++) {
        char path[PATH_LEN];
        join_path(path, sizeof path, prefix, field->path);
        fprintf(out, "  %-40s %-7s", path, type_names[field->type]);
        if (field->flags & MB_CFG_REQUIRED) fprintf(out, " required");
        else if (field->default_value) fprintf(out, " default=%s", field->default_value);
        if (field->min || field->max)
            fprintf(out, " %s%s, %s%s", field->flags & MB_CFG_MIN_EXCLUSIVE ? "(" : "[", field->min ? field->min : "",
                    field->max ? field->max : "", field->flags & MB_CFG_MAX_EXCLUSIVE ? ")" : "]");
        if (field->type == MB_CFG_ENUM) {
            fprintf(out, " {");
            for (int i = 0; field->enum_names[i]; i++) fprintf(out, "%s%s", i ? "|" : "", field->enum_names[i]);
            fprintf(out, "}");
        }
        if (field->help) fprintf(out, "  %s", field->help);
        fputc('\n', out);
        if (field->type == MB_CFG_LIST && !is_scalar_list(field)) {
            char element[PATH_LEN + 3];
            snprintf(element, sizeof element, "%s[]", path);
            describe_fields(field->fields, element, out);
        }
    }
}

void mb_cfg_describe(const mb_cfg_field *schema, FILE *out) { describe_fields(schema, "", out); }
