/* modernbert bench attention: times the CUDA attention kernels (cuda/attention.cu) alone on random packed batches.
 * Built only with the CUDA backend. */
#ifndef MB_EVAL_BENCH_ATTENTION_H
#define MB_EVAL_BENCH_ATTENTION_H

/* argv[0] is "attention"; returns 0, 1 on a CUDA failure, 2 for bad options or no usable CUDA device. */
int mb_bench_attention(int argc, char **argv);

#endif
