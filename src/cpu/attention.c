/* Scaled dot-product attention over a packed batch, confined to each sequence, optionally to a sliding window.
 *
 * For query i of sequence [b, e) and head h, the visible keys are j ∈ [b, e) with |i − j| ≤ window (window < 0:
 * all of them). scale = 1/sqrt(d).
 * forward:  s_ij = (q_i · k_j)·scale,  lse_i = log Σ_j exp(s_ij),  p_ij = exp(s_ij − lse_i),  o_i = Σ_j p_ij v_j
 * backward: dp_ij = do_i · v_j,  D_i = do_i · o_i (= Σ_j p_ij dp_ij),  ds_ij = p_ij (dp_ij − D_i)
 *           dq_i = scale Σ_j ds_ij k_j,  dk_j += scale ds_ij q_i,  dv_j += p_ij do_i
 * The backward recomputes p from lse instead of storing it (as flash attention does), so memory stays O(n).
 * Work is split over (sequence, head) pairs: each pair's keys belong to it alone, so sums need no atomics and run in
 * a fixed order. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"

typedef struct attention_shape {
    int heads, head_dim, hidden, stride, window;
    float scale;
} attention_shape;

static attention_shape make_shape(int heads, int head_dim, int window) {
    attention_shape shape = {heads, head_dim, heads * head_dim, 3 * heads * head_dim, window,
                             1.0f / sqrtf((float)head_dim)};
    return shape;
}

static void key_range(const attention_shape *s, int i, int begin, int end, int *lo, int *hi) {
    *lo = begin;
    *hi = end;
    if (s->window < 0) return;
    if (i - s->window > *lo) *lo = i - s->window;
    if (i + s->window + 1 < *hi) *hi = i + s->window + 1;
}

static float dot(const float *a, const float *b, int length) {
    float sum = 0.0f;
    for (int k = 0; k < length; k++) sum += a[k] * b[k];
    return sum;
}

static void forward_one_query(float *out, float *lse, float *scores, const float *qkv, const attention_shape *s,
                              int i, int h, int begin, int end) {
    int lo, hi;
    key_range(s, i, begin, end, &lo, &hi);
    const float *q = qkv + (size_t)i * s->stride + h * s->head_dim;
    float max_score = -INFINITY;
    for (int j = lo; j < hi; j++) {
        const float *k = qkv + (size_t)j * s->stride + s->hidden + h * s->head_dim;
        scores[j - lo] = dot(q, k, s->head_dim) * s->scale;
        if (scores[j - lo] > max_score) max_score = scores[j - lo];
    }
    double denominator = 0.0;
    for (int j = lo; j < hi; j++) denominator += exp((double)scores[j - lo] - max_score);
    double log_sum = max_score + log(denominator);
    float *o = out + (size_t)i * s->hidden + h * s->head_dim;
    double accumulator[512] = {0};
    for (int j = lo; j < hi; j++) {
        double p = exp((double)scores[j - lo] - log_sum);
        const float *v = qkv + (size_t)j * s->stride + 2 * s->hidden + h * s->head_dim;
        for (int k = 0; k < s->head_dim; k++) accumulator[k] += p * v[k];
    }
    for (int k = 0; k < s->head_dim; k++) o[k] = (float)accumulator[k];
    lse[(size_t)i * s->heads + h] = (float)log_sum;
}

void mb_cpu_attention_forward(float *out, float *lse, const float *qkv, const int32_t *cu_seqlens, int num_seqs,
                              int heads, int head_dim, int window) {
    attention_shape shape = make_shape(heads, head_dim, window);
    int longest = 0;
    for (int b = 0; b < num_seqs; b++)
        if (cu_seqlens[b + 1] - cu_seqlens[b] > longest) longest = cu_seqlens[b + 1] - cu_seqlens[b];
#pragma omp parallel
    {
        float *scores = malloc(((size_t)longest + 1) * sizeof(float));
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int b = 0; b < num_seqs; b++)
            for (int h = 0; h < heads; h++)
                for (int i = cu_seqlens[b]; i < cu_seqlens[b + 1]; i++)
                    forward_one_query(out, lse, scores, qkv, &shape, i, h, cu_seqlens[b], cu_seqlens[b + 1]);
        free(scores);
    }
}

static void backward_one_query(float *dqkv, const float *dout, const float *out, const float *lse, const float *qkv,
                               const attention_shape *s, int i, int h, int begin, int end) {
    int lo, hi;
    key_range(s, i, begin, end, &lo, &hi);
    int d = s->head_dim;
    size_t head_offset = (size_t)h * d;
    const float *q = qkv + (size_t)i * s->stride + head_offset;
    const float *do_i = dout + (size_t)i * s->hidden + head_offset;
    const float *o_i = out + (size_t)i * s->hidden + head_offset;
    float *dq = dqkv + (size_t)i * s->stride + head_offset;
    double D = 0.0;
    for (int k = 0; k < d; k++) D += (double)do_i[k] * o_i[k];
    float log_sum = lse[(size_t)i * s->heads + h];
    for (int j = lo; j < hi; j++) {
        const float *k_j = qkv + (size_t)j * s->stride + s->hidden + head_offset;
        const float *v_j = qkv + (size_t)j * s->stride + 2 * s->hidden + head_offset;
        float *dk = dqkv + (size_t)j * s->stride + s->hidden + head_offset;
        float *dv = dqkv + (size_t)j * s->stride + 2 * s->hidden + head_offset;
        float p = (float)exp((double)(dot(q, k_j, d) * s->scale) - log_sum);
        float dp = dot(do_i, v_j, d);
        float ds = p * (float)(dp - D) * s->scale;
        for (int k = 0; k < d; k++) {
            dq[k] += ds * k_j[k];
            dk[k] += ds * q[k];
            dv[k] += p * do_i[k];
        }
    }
}

void mb_cpu_attention_backward(float *dqkv, const float *dout, const float *out, const float *lse, const float *qkv,
                               const int32_t *cu_seqlens, int num_seqs, int heads, int head_dim, int window) {
    attention_shape shape = make_shape(heads, head_dim, window);
    size_t n = (size_t)cu_seqlens[num_seqs];
    memset(dqkv, 0, n * (size_t)shape.stride * sizeof(float));
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
    for (int b = 0; b < num_seqs; b++)
        for (int h = 0; h < heads; h++)
            for (int i = cu_seqlens[b]; i < cu_seqlens[b + 1]; i++)
                backward_one_query(dqkv, dout, out, lse, qkv, &shape, i, h, cu_seqlens[b], cu_seqlens[b + 1]);
}
