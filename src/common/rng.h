/* Seeded random numbers: xoshiro256** seeded through splitmix64.
 *
 * The whole state is four 64-bit words, so it can be saved in a checkpoint and restored to continue the exact stream.
 * Nothing here is global: every user owns its mb_rng. */
#ifndef MB_RNG_H
#define MB_RNG_H

#include <stdint.h>

typedef struct mb_rng {
    uint64_t state[4];
} mb_rng;

void mb_rng_seed(mb_rng *rng, uint64_t seed);
/* Derives an independent stream from (seed, stream_id), e.g. one per rank or per epoch. */
void mb_rng_seed_stream(mb_rng *rng, uint64_t seed, uint64_t stream_id);
uint64_t mb_rng_next_u64(mb_rng *rng);
/* Uniform in [0, 1) with 53 random bits. */
double mb_rng_uniform(mb_rng *rng);
/* Uniform integer in [0, bound) without modulo bias; bound > 0. */
uint64_t mb_rng_below(mb_rng *rng, uint64_t bound);
/* Standard normal (Box-Muller, no cached second value so the state alone determines the stream). */
double mb_rng_normal(mb_rng *rng);
/* Normal(0, std) truncated to [-cutoff*std, +cutoff*std] by rejection, as torch.nn.init.trunc_normal_ bounds it. */
float mb_rng_truncated_normal(mb_rng *rng, float std, float cutoff);

#endif
