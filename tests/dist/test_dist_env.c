/* Launch environment detection through a fake getenv table: every launcher's variables, precedence, defaults and the
 * error text of each malformed value. */
#include <criterion/criterion.h>
#include <string.h>

#include "dist/env.h"

/* pairs: name, value, name, value, ..., NULL */
static const char *fake_getenv(void *context, const char *name) {
    const char *const *pairs = context;
    for (int i = 0; pairs[i] != NULL; i += 2)
        if (strcmp(pairs[i], name) == 0) return pairs[i + 1];
    return NULL;
}

static int detect(mb_dist_env *env, mb_error *err, const char *const *pairs) {
    mb_error_clear(err);
    return mb_dist_env_detect(env, fake_getenv, (void *)pairs, err);
}

#define ENV(...) ((const char *const[]){__VA_ARGS__, NULL})

static void expect(const mb_dist_env *env, mb_launch_kind kind, int rank, int world, int local, int local_world, int node,
                   const char *addr, int port) {
    cr_expect_eq(env->kind, kind, "kind %s", mb_launch_kind_name(env->kind));
    cr_expect_eq(env->rank, rank, "rank %d", env->rank);
    cr_expect_eq(env->world_size, world, "world %d", env->world_size);
    cr_expect_eq(env->local_rank, local, "local rank %d", env->local_rank);
    cr_expect_eq(env->local_world_size, local_world, "local world %d", env->local_world_size);
    cr_expect_eq(env->node_rank, node, "node rank %d", env->node_rank);
    cr_expect_str_eq(env->master_addr, addr);
    cr_expect_eq(env->master_port, port, "port %d", env->master_port);
}

Test(dist_env, nothing_set_is_a_single_process) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("HOME", "/root")), 0, "%s", err.message);
    expect(&env, MB_LAUNCH_NONE, 0, 1, 0, 1, 0, "127.0.0.1", 29500);
    cr_assert_eq(mb_dist_env_detect(&env, NULL, NULL, &err), 0, "%s", err.message); /* the real environment works too */
}

Test(dist_env, kind_names) {
    cr_expect_str_eq(mb_launch_kind_name(MB_LAUNCH_NONE), "single process");
    cr_expect_str_eq(mb_launch_kind_name(MB_LAUNCH_TORCHRUN), "torchrun");
    cr_expect_str_eq(mb_launch_kind_name(MB_LAUNCH_SLURM), "slurm");
    cr_expect_str_eq(mb_launch_kind_name(MB_LAUNCH_OPENMPI), "openmpi");
}

Test(dist_env, torchrun_full_multi_node) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "5", "WORLD_SIZE", "8", "LOCAL_RANK", "1", "LOCAL_WORLD_SIZE", "4",
                                        "NODE_RANK", "1", "GROUP_RANK", "0", "MASTER_ADDR", "node0.cluster",
                                        "MASTER_PORT", "1234")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_TORCHRUN, 5, 8, 1, 4, 1, "node0.cluster", 1234); /* NODE_RANK wins over GROUP_RANK */
}

Test(dist_env, torchrun_group_rank_and_derived_node_rank) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "6", "WORLD_SIZE", "8", "LOCAL_RANK", "2", "LOCAL_WORLD_SIZE", "4",
                                        "GROUP_RANK", "1", "MASTER_ADDR", "10.0.0.1")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_TORCHRUN, 6, 8, 2, 4, 1, "10.0.0.1", 29500);
    cr_assert_eq(detect(&env, &err, ENV("RANK", "7", "WORLD_SIZE", "8", "LOCAL_RANK", "1", "LOCAL_WORLD_SIZE", "2",
                                        "MASTER_ADDR", "::1")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_TORCHRUN, 7, 8, 1, 2, 3, "::1", 29500); /* node = rank / local world */
}

Test(dist_env, torchrun_single_node_defaults) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "2", "WORLD_SIZE", "4", "LOCAL_RANK", "2")), 0, "%s", err.message);
    expect(&env, MB_LAUNCH_TORCHRUN, 2, 4, 2, 4, 0, "127.0.0.1", 29500);
    cr_assert_eq(detect(&env, &err, ENV("RANK", "0", "WORLD_SIZE", "1")), 0, "%s", err.message);
    expect(&env, MB_LAUNCH_TORCHRUN, 0, 1, 0, 1, 0, "127.0.0.1", 29500); /* world 1: LOCAL_RANK may be missing */
}

Test(dist_env, torchrun_missing_local_rank_is_an_error) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "1", "WORLD_SIZE", "2")), -1);
    cr_expect(strstr(err.message, "LOCAL_RANK") != NULL, "%s", err.message);
}

Test(dist_env, half_set_launchers_are_errors) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "1")), -1);
    cr_expect(strstr(err.message, "WORLD_SIZE") != NULL, "%s", err.message);
    cr_assert_eq(detect(&env, &err, ENV("WORLD_SIZE", "4")), -1);
    cr_expect(strstr(err.message, "RANK") != NULL, "%s", err.message);
    cr_assert_eq(detect(&env, &err, ENV("OMPI_COMM_WORLD_RANK", "1")), -1);
    cr_expect(strstr(err.message, "OMPI_COMM_WORLD_SIZE") != NULL, "%s", err.message);
}

Test(dist_env, empty_values_count_as_unset) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "", "WORLD_SIZE", "", "MASTER_ADDR", "", "MASTER_PORT", "")), 0, "%s",
                 err.message);
    expect(&env, MB_LAUNCH_NONE, 0, 1, 0, 1, 0, "127.0.0.1", 29500);
}

Test(dist_env, multi_node_without_master_addr_is_an_error) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "5", "WORLD_SIZE", "8", "LOCAL_RANK", "1", "LOCAL_WORLD_SIZE", "4")), -1);
    cr_expect(strstr(err.message, "MASTER_ADDR") != NULL, "%s", err.message);
    cr_expect(strstr(err.message, "2 nodes") != NULL, "%s", err.message);
    cr_assert_eq(detect(&env, &err, ENV("SLURM_STEP_ID", "0", "SLURM_PROCID", "3", "SLURM_STEP_NUM_TASKS", "4",
                                        "SLURM_LOCALID", "1", "SLURM_STEP_NUM_NODES", "2")),
                 -1);
    cr_expect(strstr(err.message, "MASTER_ADDR") != NULL && strstr(err.message, "scontrol show hostnames") != NULL, "%s",
              err.message);
}

Test(dist_env, torchrun_later_node_needs_local_world_size) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "5", "WORLD_SIZE", "8", "LOCAL_RANK", "1", "NODE_RANK", "1",
                                        "MASTER_ADDR", "h")),
                 -1);
    cr_expect(strstr(err.message, "LOCAL_WORLD_SIZE") != NULL, "%s", err.message);
}

Test(dist_env, slurm_step) {
    mb_dist_env env;
    mb_error err;
    /* Step counts win over the allocation's SLURM_NTASKS. */
    cr_assert_eq(detect(&env, &err, ENV("SLURM_JOB_ID", "77", "SLURM_STEP_ID", "0", "SLURM_PROCID", "3", "SLURM_NTASKS",
                                        "16", "SLURM_STEP_NUM_TASKS", "4", "SLURM_LOCALID", "1",
                                        "SLURM_STEP_NUM_NODES", "2", "SLURM_NODEID", "1", "MASTER_ADDR", "gpu-001",
                                        "MASTER_PORT", "29600")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_SLURM, 3, 4, 1, 2, 1, "gpu-001", 29600);
}

Test(dist_env, slurm_stepid_alias_and_tasks_per_node) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("SLURM_STEPID", "2", "SLURM_PROCID", "6", "SLURM_NTASKS", "8", "SLURM_LOCALID",
                                        "2", "SLURM_NTASKS_PER_NODE", "4", "MASTER_ADDR", "gpu-007")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_SLURM, 6, 8, 2, 4, 1, "gpu-007", 29500); /* node derived: 6 / 4 */
    cr_assert_eq(detect(&env, &err, ENV("SLURM_STEP_ID", "0", "SLURM_PROCID", "1", "SLURM_NTASKS", "2",
                                        "SLURM_LOCALID", "1")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_SLURM, 1, 2, 1, 2, 0, "127.0.0.1", 29500); /* one node: loopback default */
}

Test(dist_env, slurm_batch_script_without_step_is_single) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("SLURM_JOB_ID", "77", "SLURM_PROCID", "0", "SLURM_NTASKS", "8", "SLURM_LOCALID",
                                        "0", "SLURM_NNODES", "2", "SLURM_NODEID", "0")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_NONE, 0, 1, 0, 1, 0, "127.0.0.1", 29500);
}

Test(dist_env, slurm_uneven_tasks_need_tasks_per_node) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("SLURM_STEP_ID", "0", "SLURM_PROCID", "0", "SLURM_STEP_NUM_TASKS", "5",
                                        "SLURM_LOCALID", "0", "SLURM_STEP_NUM_NODES", "2", "MASTER_ADDR", "h")),
                 -1);
    cr_expect(strstr(err.message, "SLURM_NTASKS_PER_NODE") != NULL, "%s", err.message);
}

Test(dist_env, openmpi) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("OMPI_COMM_WORLD_RANK", "5", "OMPI_COMM_WORLD_SIZE", "8",
                                        "OMPI_COMM_WORLD_LOCAL_RANK", "1", "OMPI_COMM_WORLD_LOCAL_SIZE", "4",
                                        "OMPI_COMM_WORLD_NODE_RANK", "1", "MASTER_ADDR", "h0")),
                 0, "%s", err.message);
    expect(&env, MB_LAUNCH_OPENMPI, 5, 8, 1, 4, 1, "h0", 29500);
    cr_assert_eq(detect(&env, &err, ENV("OMPI_COMM_WORLD_RANK", "1", "OMPI_COMM_WORLD_SIZE", "2",
                                        "OMPI_COMM_WORLD_LOCAL_RANK", "1")),
                 -1);
    cr_expect(strstr(err.message, "OMPI_COMM_WORLD_LOCAL_SIZE") != NULL, "%s", err.message);
}

Test(dist_env, precedence_torchrun_then_openmpi_then_slurm) {
    mb_dist_env env;
    mb_error err;
#define OMPI "OMPI_COMM_WORLD_RANK", "3", "OMPI_COMM_WORLD_SIZE", "4", "OMPI_COMM_WORLD_LOCAL_RANK", "3", \
             "OMPI_COMM_WORLD_LOCAL_SIZE", "4"
#define SLURM "SLURM_STEP_ID", "0", "SLURM_PROCID", "1", "SLURM_NTASKS", "2", "SLURM_LOCALID", "1"
    cr_assert_eq(detect(&env, &err, ENV("RANK", "0", "WORLD_SIZE", "3", "LOCAL_RANK", "0", OMPI, SLURM)), 0, "%s",
                 err.message);
    expect(&env, MB_LAUNCH_TORCHRUN, 0, 3, 0, 3, 0, "127.0.0.1", 29500);
    cr_assert_eq(detect(&env, &err, ENV(OMPI, SLURM)), 0, "%s", err.message);
    expect(&env, MB_LAUNCH_OPENMPI, 3, 4, 3, 4, 0, "127.0.0.1", 29500);
    cr_assert_eq(detect(&env, &err, ENV(SLURM)), 0, "%s", err.message);
    expect(&env, MB_LAUNCH_SLURM, 1, 2, 1, 2, 0, "127.0.0.1", 29500);
#undef OMPI
#undef SLURM
}

/* Each malformed value: detection fails and the message names the variable and quotes the value. */
Test(dist_env, malformed_values_name_the_variable) {
    static const struct {
        const char *name, *value;
    } cases[] = {
        {"RANK", "1x"},          {"RANK", "4"},           {"RANK", "-1"},         {"WORLD_SIZE", "0"},
        {"WORLD_SIZE", "four"},  {"WORLD_SIZE", "99999999999"}, {"LOCAL_RANK", "-1"}, {"LOCAL_RANK", " 1"},
        {"LOCAL_WORLD_SIZE", "abc"}, {"LOCAL_WORLD_SIZE", "5"}, {"NODE_RANK", "x"}, {"GROUP_RANK", "1.5"},
        {"MASTER_PORT", "70000"}, {"MASTER_PORT", "0"},  {"MASTER_PORT", "80a"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *pairs[] = {"RANK", "1", "WORLD_SIZE", "4", "LOCAL_RANK", "1", "LOCAL_WORLD_SIZE", "4", "MASTER_PORT",
                               "29500", "GROUP_RANK", "0", NULL, NULL, NULL};
        int found = 0;
        for (int k = 0; pairs[k] != NULL; k += 2)
            if (strcmp(pairs[k], cases[i].name) == 0) pairs[k + 1] = cases[i].value, found = 1;
        if (!found) pairs[12] = cases[i].name, pairs[13] = cases[i].value;
        mb_dist_env env;
        mb_error err;
        cr_expect_eq(detect(&env, &err, pairs), -1, "%s=%s accepted", cases[i].name, cases[i].value);
        cr_expect(strstr(err.message, cases[i].name) != NULL && strstr(err.message, cases[i].value) != NULL,
                  "%s=\"%s\": %s", cases[i].name, cases[i].value, err.message);
    }
}

Test(dist_env, malformed_launcher_specific_values) {
    const struct {
        const char *name, *value;
        const char *const *pairs;
    } cases[] = {
        {"OMPI_COMM_WORLD_SIZE", "two", ENV("OMPI_COMM_WORLD_RANK", "0", "OMPI_COMM_WORLD_SIZE", "two")},
        {"OMPI_COMM_WORLD_LOCAL_RANK", "q",
         ENV("OMPI_COMM_WORLD_RANK", "0", "OMPI_COMM_WORLD_SIZE", "2", "OMPI_COMM_WORLD_LOCAL_RANK", "q",
             "OMPI_COMM_WORLD_LOCAL_SIZE", "2")},
        {"SLURM_PROCID", "9", ENV("SLURM_STEP_ID", "0", "SLURM_PROCID", "9", "SLURM_NTASKS", "4", "SLURM_LOCALID", "0")},
        {"SLURM_LOCALID", "z", ENV("SLURM_STEP_ID", "0", "SLURM_PROCID", "1", "SLURM_NTASKS", "4", "SLURM_LOCALID", "z")},
        {"SLURM_NTASKS_PER_NODE", "q",
         ENV("SLURM_STEP_ID", "0", "SLURM_PROCID", "1", "SLURM_NTASKS", "4", "SLURM_LOCALID", "1",
             "SLURM_NTASKS_PER_NODE", "q")},
        {"SLURM_STEP_NUM_TASKS", "0x4",
         ENV("SLURM_STEP_ID", "0", "SLURM_PROCID", "1", "SLURM_STEP_NUM_TASKS", "0x4", "SLURM_LOCALID", "1")},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mb_dist_env env;
        mb_error err;
        cr_expect_eq(detect(&env, &err, cases[i].pairs), -1, "%s=%s accepted", cases[i].name, cases[i].value);
        cr_expect(strstr(err.message, cases[i].name) != NULL && strstr(err.message, cases[i].value) != NULL,
                  "%s=\"%s\": %s", cases[i].name, cases[i].value, err.message);
    }
}

Test(dist_env, local_rank_must_be_below_local_world) {
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("RANK", "3", "WORLD_SIZE", "4", "LOCAL_RANK", "2", "LOCAL_WORLD_SIZE", "2",
                                        "MASTER_ADDR", "h")),
                 -1);
    cr_expect(strstr(err.message, "local rank 2") != NULL, "%s", err.message);
}

Test(dist_env, master_addr_too_long) {
    char long_name[400];
    memset(long_name, 'a', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    mb_dist_env env;
    mb_error err;
    cr_assert_eq(detect(&env, &err, ENV("MASTER_ADDR", long_name)), -1);
    cr_expect(strstr(err.message, "MASTER_ADDR") != NULL, "%s", err.message);
}
