/* Launch environment detection: maps the variables of torchrun, Open MPI and Slurm onto rank / world size / local rank /
 * node rank and the rendezvous address (see env.h for the precedence). Pure string parsing, no side effects. */
#include "dist/env.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct env_reader {
    mb_getenv_fn getenv_fn;
    void *context;
} env_reader;

/* The value of `name`, or NULL when unset or empty (an empty `export VAR=` means "not given"). */
static const char *env_value(const env_reader *reader, const char *name) {
    const char *value = reader->getenv_fn != NULL ? reader->getenv_fn(reader->context, name) : getenv(name);
    return value != NULL && value[0] != '\0' ? value : NULL;
}

/* The first of two alternative names that is set, or NULL; *used gets the name that was read. */
static const char *env_value_either(const env_reader *reader, const char *first, const char *second, const char **used) {
    const char *value = env_value(reader, first);
    *used = first;
    if (value == NULL) {
        value = env_value(reader, second);
        *used = second;
    }
    return value;
}

const char *mb_launch_kind_name(mb_launch_kind kind) {
    switch (kind) {
    case MB_LAUNCH_NONE: return "single process";
    case MB_LAUNCH_TORCHRUN: return "torchrun";
    case MB_LAUNCH_SLURM: return "slurm";
    case MB_LAUNCH_OPENMPI: return "openmpi";
    }
    return "unknown";
}

int mb_dist_parse_int(const char *name, const char *text, int min, int max, int *out, mb_error *err) {
    if (text == NULL) return mb_fail(err, "environment variable %s is not set", name);
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    int digits = end != text && ((text[0] >= '0' && text[0] <= '9') || text[0] == '-' || text[0] == '+');
    if (!digits || *end != '\0') return mb_fail(err, "environment variable %s = \"%s\" is not a decimal integer", name, text);
    if (errno == ERANGE || value < min || value > max)
        return mb_fail(err, "environment variable %s = %s is out of range: it must be in [%d, %d]", name, text, min, max);
    *out = (int)value;
    return 0;
}

/* Reads `name` as an integer in [min, max]; `note` (may be "") explains the bound in the error. */
static int read_int(const env_reader *reader, const char *name, int min, int max, const char *note, int *out,
                    mb_error *err) {
    if (mb_dist_parse_int(name, env_value(reader, name), min, max, out, err) != 0) {
        if (note[0] != '\0') {
            size_t used = strlen(err != NULL ? err->message : "");
            if (err != NULL) snprintf(err->message + used, sizeof err->message - used, " (%s)", note);
        }
        return -1;
    }
    return 0;
}

/* Rank and world size from a pair of variables; the rank is checked against the world size. */
static int read_rank_and_world(const env_reader *reader, const char *rank_name, const char *world_name, mb_dist_env *env,
                               mb_error *err) {
    if (read_int(reader, world_name, 1, INT_MAX, "", &env->world_size, err) != 0) return -1;
    char note[128];
    snprintf(note, sizeof note, "%s = %d", world_name, env->world_size);
    return read_int(reader, rank_name, 0, env->world_size - 1, note, &env->rank, err);
}

/* Local rank: required when world_size > 1 (a process of a multi-process job must know which GPU is its own). */
static int read_local_rank(const env_reader *reader, const char *name, mb_dist_env *env, mb_error *err) {
    if (env_value(reader, name) == NULL) {
        if (env->world_size == 1) {
            env->local_rank = 0;
            return 0;
        }
        return mb_fail(err, "%s launch: environment variable %s is not set although the world size is %d",
                       mb_launch_kind_name(env->kind), name, env->world_size);
    }
    return read_int(reader, name, 0, env->world_size - 1, "", &env->local_rank, err);
}

/* Local world size from `name` when set; otherwise world_size / nodes (nodes = 1 when unknown). */
static int read_local_world(const env_reader *reader, const char *name, int nodes, const char *nodes_name,
                            mb_dist_env *env, mb_error *err) {
    char note[128];
    snprintf(note, sizeof note, "the world size is %d", env->world_size);
    if (env_value(reader, name) != NULL) return read_int(reader, name, 1, env->world_size, note, &env->local_world_size, err);
    if (nodes < 1 || env->world_size % nodes != 0)
        return mb_fail(err, "%s launch: %s is not set and the world size %d is not a multiple of %s = %d; set %s",
                       mb_launch_kind_name(env->kind), name, env->world_size, nodes_name, nodes, name);
    env->local_world_size = env->world_size / nodes;
    return 0;
}

/* Node rank from the first of the given variables that is set, else derived as rank / local_world_size. */
static int read_node_rank(const env_reader *reader, const char *name, const char *alternative, mb_dist_env *env,
                          mb_error *err) {
    const char *used = name;
    const char *value = name == NULL ? NULL
                        : alternative != NULL ? env_value_either(reader, name, alternative, &used) : env_value(reader, name);
    if (value == NULL) {
        env->node_rank = env->rank / env->local_world_size;
        return 0;
    }
    return mb_dist_parse_int(used, value, 0, env->world_size - 1, &env->node_rank, err);
}

static int detect_torchrun(const env_reader *reader, mb_dist_env *env, mb_error *err) {
    env->kind = MB_LAUNCH_TORCHRUN;
    if (read_rank_and_world(reader, "RANK", "WORLD_SIZE", env, err) != 0) return -1;
    if (read_local_rank(reader, "LOCAL_RANK", env, err) != 0) return -1;
    const char *node_name = NULL;
    const char *node_value = env_value_either(reader, "NODE_RANK", "GROUP_RANK", &node_name);
    if (env_value(reader, "LOCAL_WORLD_SIZE") == NULL && node_value != NULL && strcmp(node_value, "0") != 0)
        return mb_fail(err, "torchrun launch: %s = %s says this is not the first node, but LOCAL_WORLD_SIZE is not set; "
                       "set LOCAL_WORLD_SIZE to the number of processes per node", node_name, node_value);
    if (read_local_world(reader, "LOCAL_WORLD_SIZE", 1, "the node count", env, err) != 0) return -1;
    return read_node_rank(reader, "NODE_RANK", "GROUP_RANK", env, err);
}

static int detect_openmpi(const env_reader *reader, mb_dist_env *env, mb_error *err) {
    env->kind = MB_LAUNCH_OPENMPI;
    if (read_rank_and_world(reader, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", env, err) != 0) return -1;
    if (read_local_rank(reader, "OMPI_COMM_WORLD_LOCAL_RANK", env, err) != 0) return -1;
    if (env_value(reader, "OMPI_COMM_WORLD_LOCAL_SIZE") == NULL && env->world_size > 1)
        return mb_fail(err, "openmpi launch: environment variable OMPI_COMM_WORLD_LOCAL_SIZE is not set although the "
                       "world size is %d", env->world_size);
    if (read_local_world(reader, "OMPI_COMM_WORLD_LOCAL_SIZE", 1, "the node count", env, err) != 0) return -1;
    /* OMPI_COMM_WORLD_NODE_RANK is a per-node process index, not the node's index: derive the node rank instead. */
    return read_node_rank(reader, NULL, NULL, env, err);
}

static int detect_slurm(const env_reader *reader, mb_dist_env *env, mb_error *err) {
    env->kind = MB_LAUNCH_SLURM;
    const char *tasks_name = NULL;
    if (env_value_either(reader, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", &tasks_name) == NULL)
        return mb_fail(err, "slurm launch: SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is");
    if (read_rank_and_world(reader, "SLURM_PROCID", tasks_name, env, err) != 0) return -1;
    if (read_local_rank(reader, "SLURM_LOCALID", env, err) != 0) return -1;
    const char *nodes_name = NULL;
    int nodes = 1;
    if (env_value_either(reader, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", &nodes_name) != NULL &&
        read_int(reader, nodes_name, 1, env->world_size, "", &nodes, err) != 0)
        return -1;
    if (read_local_world(reader, "SLURM_NTASKS_PER_NODE", nodes, nodes_name, env, err) != 0) return -1;
    return read_node_rank(reader, "SLURM_NODEID", NULL, env, err);
}

/* MASTER_ADDR / MASTER_PORT: honoured when set; loopback and 29500 by default, but a multi-node run needs an address. */
static int read_master(const env_reader *reader, mb_dist_env *env, mb_error *err) {
    const char *addr = env_value(reader, "MASTER_ADDR");
    if (addr != NULL) {
        if (strlen(addr) >= sizeof env->master_addr)
            return mb_fail(err, "environment variable MASTER_ADDR is %zu characters long (at most %zu)", strlen(addr),
                           sizeof env->master_addr - 1);
        snprintf(env->master_addr, sizeof env->master_addr, "%s", addr);
    } else if (env->world_size == env->local_world_size) {
        snprintf(env->master_addr, sizeof env->master_addr, "127.0.0.1");
    } else {
        const char *hint = env->kind == MB_LAUNCH_SLURM
                               ? " (in a Slurm job: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))"
                               : "";
        return mb_fail(err, "%s launch with %d processes over %d nodes: environment variable MASTER_ADDR is not set; "
                       "export MASTER_ADDR=<host name or address of the node that runs rank 0>%s",
                       mb_launch_kind_name(env->kind), env->world_size,
                       (env->world_size + env->local_world_size - 1) / env->local_world_size, hint);
    }
    env->master_port = MB_DIST_DEFAULT_PORT;
    if (env_value(reader, "MASTER_PORT") != NULL)
        return read_int(reader, "MASTER_PORT", 1, 65535, "", &env->master_port, err);
    return 0;
}

int mb_dist_env_detect(mb_dist_env *env, mb_getenv_fn getenv_fn, void *context, mb_error *err) {
    const env_reader reader = {getenv_fn, context};
    memset(env, 0, sizeof *env);
    env->kind = MB_LAUNCH_NONE;
    env->world_size = 1;
    env->local_world_size = 1;
    int has_rank = env_value(&reader, "RANK") != NULL, has_world = env_value(&reader, "WORLD_SIZE") != NULL;
    int has_ompi_rank = env_value(&reader, "OMPI_COMM_WORLD_RANK") != NULL;
    int has_ompi_size = env_value(&reader, "OMPI_COMM_WORLD_SIZE") != NULL;
    const char *step_name = NULL;
    int in_slurm_step = env_value_either(&reader, "SLURM_STEP_ID", "SLURM_STEPID", &step_name) != NULL &&
                        env_value(&reader, "SLURM_PROCID") != NULL;
    int status = 0;
    if (has_rank != has_world) {
        /* Half a torchrun environment would silently make every process train alone: refuse it. */
        return mb_fail(err, "environment variable %s is set but %s is not; set both (torchrun style) or neither",
                       has_rank ? "RANK" : "WORLD_SIZE", has_rank ? "WORLD_SIZE" : "RANK");
    } else if (has_rank) {
        status = detect_torchrun(&reader, env, err);
    } else if (has_ompi_rank != has_ompi_size) {
        return mb_fail(err, "environment variable %s is set but %s is not",
                       has_ompi_rank ? "OMPI_COMM_WORLD_RANK" : "OMPI_COMM_WORLD_SIZE",
                       has_ompi_rank ? "OMPI_COMM_WORLD_SIZE" : "OMPI_COMM_WORLD_RANK");
    } else if (has_ompi_rank) {
        status = detect_openmpi(&reader, env, err);
    } else if (in_slurm_step) {
        status = detect_slurm(&reader, env, err);
    }
    if (status != 0) return -1;
    if (env->local_rank >= env->local_world_size)
        return mb_fail(err, "%s launch: local rank %d is not below the local world size %d", mb_launch_kind_name(env->kind),
                       env->local_rank, env->local_world_size);
    return read_master(&reader, env, err);
}
