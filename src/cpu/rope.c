/* Rotary position embedding, rotate-half (GPT-NeoX) form over the whole head, as transformers computes it in fp32.
 *
 * inv_freq[k] = 1 / θ^(2k/d) (k < d/2),  angle(p, k) = p · inv_freq[k],  c = cos(angle), s = sin(angle)
 * forward (direction +1), per head vector x with halves x1 = x[:d/2], x2 = x[d/2:]:
 *     out1 = x1·c − x2·s,   out2 = x2·c + x1·s
 * backward (direction −1): the same rotation by −angle applied to dQ and dK (the rotation is orthogonal). V is
 * never rotated. Positions restart at 0 at every cu_seqlens boundary. */
#include <math.h>
#include <stdlib.h>

#include "cpu/ops.h"

void mb_cpu_positions(int32_t *positions, const int32_t *cu_seqlens, int num_seqs) {
    for (int s = 0; s < num_seqs; s++)
        for (int i = cu_seqlens[s]; i < cu_seqlens[s + 1]; i++) positions[i] = i - cu_seqlens[s];
}

static void rotate_vector(float *x, const float *inv_freq, int half, float position, float direction) {
    for (int k = 0; k < half; k++) {
        float angle = position * inv_freq[k];
        float c = cosf(angle), s = direction * sinf(angle);
        float x1 = x[k], x2 = x[k + half];
        x[k] = x1 * c - x2 * s;
        x[k + half] = x2 * c + x1 * s;
    }
}

void mb_cpu_rope(float *qkv, const int32_t *positions, int n, int heads, int head_dim, double theta, int direction) {
    int half = head_dim / 2, hidden = heads * head_dim;
    float inv_freq[512];
    for (int k = 0; k < half && k < 512; k++)
        inv_freq[k] = 1.0f / powf((float)theta, (float)(2 * k) / (float)head_dim);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        float *row = qkv + (size_t)i * 3 * hidden;
        for (int block = 0; block < 2; block++)  /* Q then K */
            for (int h = 0; h < heads; h++)
                rotate_vector(row + block * hidden + h * head_dim, inv_freq, half, (float)positions[i],
                              (float)direction);
    }
}
