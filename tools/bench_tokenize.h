/* modernbert bench tokenize: tokenizer throughput (MB/s and tokens/s) on a text file, one thread and N threads. */
#ifndef MB_BENCH_TOKENIZE_H
#define MB_BENCH_TOKENIZE_H

/* argv[0] is the subcommand name ("tokenize"); returns the process exit code. */
int mb_bench_tokenize(int argc, char **argv);

#endif
