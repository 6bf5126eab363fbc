#include "common/rng.h"

#include <math.h>

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void mb_rng_seed(mb_rng *rng, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) rng->state[i] = splitmix64(&x);
}

void mb_rng_seed_stream(mb_rng *rng, uint64_t seed, uint64_t stream_id) {
    uint64_t x = seed ^ 0x5851f42d4c957f2dULL;
    uint64_t mixed = splitmix64(&x) ^ (stream_id * 0xd1342543de82ef95ULL);
    mb_rng_seed(rng, mixed);
}

static uint64_t rotate_left(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t mb_rng_next_u64(mb_rng *rng) {
    uint64_t *s = rng->state;
    uint64_t result = rotate_left(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotate_left(s[3], 45);
    return result;
}

double mb_rng_uniform(mb_rng *rng) { return (double)(mb_rng_next_u64(rng) >> 11) * 0x1.0p-53; }

uint64_t mb_rng_below(mb_rng *rng, uint64_t bound) {
    uint64_t threshold = (0 - bound) % bound;  /* 2^64 mod bound */
    for (;;) {
        uint64_t r = mb_rng_next_u64(rng);
        if (r >= threshold) return r % bound;
    }
}

double mb_rng_normal(mb_rng *rng) {
    double u1 = mb_rng_uniform(rng);
    double u2 = mb_rng_uniform(rng);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

float mb_rng_truncated_normal(mb_rng *rng, float std, float cutoff) {
    for (;;) {
        double z = mb_rng_normal(rng);
        if (fabs(z) <= cutoff) return (float)(z * std);
    }
}
