/* modernbert bench data: throughput of the pretraining data path (packing, masking, the whole loader). */
#ifndef MB_BENCH_DATA_H
#define MB_BENCH_DATA_H

/* argv[0] is the subcommand name ("data"); returns the process exit code. */
int mb_bench_data(int argc, char **argv);

#endif
