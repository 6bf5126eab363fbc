/* Launch environment of one training process: rank, world size, local rank and the rendezvous address.
 *
 * The same binary runs alone, under our own launcher (`modernbert pretrain --nproc-per-node N`), under torchrun, under
 * Open MPI's mpirun and inside a Slurm job step. Each of them describes the process through environment variables;
 * mb_dist_env_detect reads them in this order of precedence:
 *   1. torchrun-style (also set by our launcher): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK or
 *      GROUP_RANK;
 *   2. Open MPI: OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE;
 *   3. Slurm, only inside a job step (SLURM_STEP_ID or SLURM_STEPID set, i.e. started by srun): SLURM_PROCID,
 *      SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE or SLURM_STEP_NUM_NODES,
 *      SLURM_NODEID. A batch script without srun is a single process, never a rank waiting for peers;
 *   4. nothing: a single process (rank 0 of 1).
 * Local world size when not given: world size / node count (torchrun without LOCAL_WORLD_SIZE: one node is assumed,
 * and a NODE_RANK > 0 is then an error). Node rank when not given: rank / local world size.
 * MASTER_ADDR and MASTER_PORT are honoured whatever the launcher. An empty variable counts as unset. */
#ifndef MB_DIST_ENV_H
#define MB_DIST_ENV_H

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mb_launch_kind { MB_LAUNCH_NONE, MB_LAUNCH_TORCHRUN, MB_LAUNCH_SLURM, MB_LAUNCH_OPENMPI } mb_launch_kind;

typedef struct mb_dist_env {
    mb_launch_kind kind;
    int rank, world_size, local_rank, local_world_size, node_rank;
    char master_addr[256];
    int master_port;
} mb_dist_env;

/* Reads one environment variable; returns NULL when it is unset. A NULL function means the process environment. */
typedef const char *(*mb_getenv_fn)(void *context, const char *name);

#define MB_DIST_DEFAULT_PORT 29500

/* Fills env from the variables above. Fails (naming the variable and its value) on a malformed or out-of-range integer,
 * on a half-set launcher (RANK without WORLD_SIZE, ...) and when a multi-node run has no MASTER_ADDR. */
int mb_dist_env_detect(mb_dist_env *env, mb_getenv_fn getenv_fn, void *context, mb_error *err);

/* "single process", "torchrun", "slurm", "openmpi". */
const char *mb_launch_kind_name(mb_launch_kind kind);

/* Parses a whole decimal integer from the variable `name` (value `text`) into [min, max]; the error names both. Shared
 * with the launcher's option parsing. */
int mb_dist_parse_int(const char *name, const char *text, int min, int max, int *out, mb_error *err);

#ifdef __cplusplus
}
#endif

#endif
