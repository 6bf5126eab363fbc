/* The CUDA backend: ModernBERT forward, backward and StableAdamW on one GPU, mirroring src/cpu/model_cpu.c step by
 * step (same order of operations, same activations kept for the backward, same heads):
 *
 *   h  = LayerNorm(tok_embeddings[ids])
 *   for each layer l:  a = (l == 0) ? h : LayerNorm(h);  qkv = RoPE(a · Wqkvᵀ);  h = h + Attention_l(qkv) · Woᵀ
 *                      h = h + (act(m · Wiᵀ[:I]) ⊙ (m · Wiᵀ[I:])) · Wo_mlpᵀ,  m = LayerNorm(h)
 *   h  = LayerNorm(h)                                                         final_norm
 *   MLM head on the labelled rows only: logits = LayerNorm(act(h · Wdᵀ)) · Eᵀ + b; loss = Σ CE
 *   classifier: pooled rows (cls token or sequence mean), same dense/act/norm, logits · Wcᵀ; Σ CE or Σ (z − y)²
 *   backward: the reverse; the tied decoder's weight gradient lands in the embedding gradient (same fp32 storage),
 *   beside the lookup gradient that skips the pad id.
 *
 * Design decisions
 *   - Precision: activations, the residual stream and every GEMM operand are bf16 (the residual add happens inside
 *     the cuBLASLt epilogue in fp32 and is rounded once per sub-block); LayerNorm statistics, softmax / lse, losses
 *     and all reductions are fp32 (the batch loss sum is double). Master weights, gradients and the optimizer's
 *     moments are fp32; GEMMs read a bf16 copy that write_params and every optimizer step refresh, LayerNorms read
 *     the fp32 masters. Gradients accumulate (+=) in fp32 across micro-batches; zero_grads clears them. The bf16
 *     residual stream is what the op kernels take (cuda/ops.h); measured against the fp32 CPU reference it stays
 *     within the bf16 thresholds of tests/gpu/test_gpu_model.c.
 *   - Memory: two device arenas. The state arena holds, laid out by the parameter table, the fp32 masters, the bf16
 *     copy, the fp32 gradients, m and v (5 × N floats less half for the copy) plus two device scalars; it never
 *     changes. The activation arena holds every activation kept for the backward, the backward's buffers, the
 *     uploaded batch and one scratch area shared by all ops (sized by the ops' *_bytes functions), carved by
 *     carve_activations() for a budget (tokens, sequences, head rows). It is re-carved (freed and allocated again)
 *     only when a batch exceeds the budget, which then grows with headroom; a normal step allocates nothing. The
 *     peak of device memory in use (cudaMemGetInfo after each allocation) is reported by memory_report.
 *   - Batch upload: the host computes positions-free metadata only (labelled row indices and targets, or pooled row
 *     indices) from the host batch, stages it with the ids and cu_seqlens in pinned memory and sends it with
 *     cudaMemcpyAsync; positions are computed on the device. forward() ends with one device→host copy (the loss
 *     sum, and the logits when they are returned) and one stream synchronisation.
 *   - Logits: returned as an fp32 host array for classifier heads always, and for the MLM head when
 *     rows × vocab <= kMaxHostLogits (16 MiB of fp32); above that result->logits is NULL (the trainer needs only
 *     the loss; `check` runs small batches).
 *   - Everything runs on one non-blocking stream owned by the backend; the ops are deterministic, so two runs give
 *     bit-identical results on the same GPU model.
 *   - The last layer on the head's rows (docs/performance.md, "Session 16"): only the head reads the final hidden
 *     states, and only its rows (the labelled tokens, or the cls tokens), so after the last layer's attention — which
 *     needs every token's keys and values — its output projection, MLP and the final norm run on the head's rows
 *     (gathered, in head order, padding rows included) and the final norm writes the head's inputs directly. The
 *     other tokens' rows of that layer would only be thrown away. Each row's arithmetic is the same as over the whole
 *     batch; the GEMMs may block their sums differently. Not with mean pooling (it reads every row). Where the
 *     attention kernels take a subset of the queries (global layers at head_dim 64 on sm_90a,
 *     mb_cuda_attention_rows_supported) the attention itself also runs for the head's own rows only (their Q
 *     gathered; every key and value): the padding rows get a zero attention output there. MB_SPARSE_LAST_LAYER=0
 *     runs the whole batch, =projection the whole attention and the rest sparse (comparisons). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "comm.h"
#include "common.cuh"
#include "device.h"
#include "ops.h"

extern "C" {
#include "model/zero_plan.h" /* a C header without extern "C" guards of its own */
}

namespace {

constexpr size_t kMaxHostLogits = (size_t)1 << 22;
/* The MLM decoder and its loss run over chunks of this many labelled rows (in every mode, so that the summation order
 * of the decoder's gradients does not depend on the recompute level). With recompute >= MB_RECOMPUTE_NORMS only one
 * chunk of logits is kept (8192 × 50,368 bf16 = 0.8 GB instead of 30 KB per token: 6.7 GB at 221 k tokens) and the
 * backward re-runs the chunk's decoder GEMM. */
constexpr int kDecoderChunkRows = 8192; /* MB_DECODER_CHUNK_ROWS overrides it (tests) */
/* The MLM head runs on its labelled rows padded with ignored rows (target -1: loss 0, gradient 0) to a multiple of
 * this, so that its GEMM shapes recur from batch to batch: a new shape costs a cuBLASLt heuristic query on the host,
 * and at the start of the backward the device waits for the host (≈ 1.5-3 ms per step at 1024 before). The padding
 * costs at most 255 rows of head work (≈ 2.5 % of the head's ≈ 10 k rows per 32 k tokens). MB_HEAD_ROW_MULTIPLE
 * overrides it (1: no padding). */
constexpr int kHeadRowMultiple = 256;
constexpr size_t kAlign = 256;

#define TRY(call)                                                                                                 \
    do {                                                                                                          \
        if ((call) != 0) return -1;                                                                               \
    } while (0)

struct layer_activations {
    mb_bf16 *attn_in; /* NULL in layer 0 (the attention norm is Identity) */
    float *attn_mean, *attn_rstd;
    mb_bf16 *qkv, *attn_out;
    float *lse;
    mb_bf16 *h_mid, *mlp_in;
    float *mlp_mean, *mlp_rstd;
    mb_bf16 *wi_out, *glu_out, *h_out;
};

struct budget {
    int tokens, sequences, rows;
};

/* How much of the last layer runs on the head's rows only (see the header). */
enum sparse_mode { kSparseOff = 0, kSparseProjection = 1, kSparseAttention = 2 };

/* MB_PROFILE=1: cudaEvents between the op families of the step; the time from one mark to the next is charged to
 * the first mark's label (collected at each host synchronisation of the compute stream). For `bench train
 * --profile`; the events themselves cost a few microseconds each. */
constexpr int kMaxMarks = 4096, kMaxLabels = 64;
struct profiler {
    cudaEvent_t events[kMaxMarks];
    const char *mark_labels[kMaxMarks];
    int marks;
    const char *labels[kMaxLabels];
    double milliseconds[kMaxLabels];
    long calls[kMaxLabels];
    int label_count;
};

/* Host-side metadata of the batch of the last forward. */
struct batch_state {
    int tokens, sequences, rows, classes;
    int forward_done;
    int label_rows; /* the batch's own head rows; rows adds the MLM head's padding (kHeadRowMultiple) */
    int sparse_last; /* the last layer after its attention runs on the head's rows only (last_layer_sparse) */
    int sparse_attention; /* ... and its attention too (last_attention_sparse, set once the rope tables exist) */
};

struct cuda_backend {
    cudaStream_t stream;
    mb_cuda_matmul *matmul;
    mb_cuda_adamw *adamw;
    /* state arena */
    void *state;
    size_t state_bytes;
    float *master, *grads, *m, *v;
    mb_bf16 *copy;
    double *device_scalars; /* [0] loss sum, [1] grad norm */
    mb_weights w, g;        /* bound over master and grads (device pointers) */
    /* activation arena */
    void *acts;
    size_t acts_bytes;
    budget cap;
    int32_t *ids, *cu_seqlens, *positions, *row_tokens, *targets;
    /* RoPE angles of this batch ([n][head_dim/2] (cos, sin), mb_cuda_rope_table) for the two kinds of layer (global,
     * local) and their theta (0: not computed); the attention backward applies RoPE's backward with them */
    float *rope_tables[2];
    double rope_thetas[2];
    float *sequence_labels, *row_loss, *row_lse;
    mb_bf16 *embedded, *hidden0;
    float *embedded_mean, *embedded_rstd;
    layer_activations layers[MB_MAX_LAYERS];
    mb_bf16 *final_out;
    float *final_mean, *final_rstd;
    mb_bf16 *head_inputs, *head_dense, *head_act, *head_norm;
    /* the last layer on the head's rows: its attention output and its input (the residual), gathered, and the
     * rotated Q rows of its attention (sparse attention); cu_rows: the head's own rows per sequence (prefix sums) */
    mb_bf16 *last_attn_rows, *last_input_rows, *last_query_rows;
    int32_t *cu_rows;
    float *head_mean, *head_rstd;
    mb_bf16 *logits;
    mb_bf16 *dh, *d_normed, *dqkv, *d_attn, *d_wi, *d_glu, *d_head, *d_head2;
    /* recompute >= MB_RECOMPUTE_NORMS: one layer's LayerNorm output / Wi product / GLU product, rebuilt in the
     * backward (every layer's attn_in, mlp_in, glu_out and, at MB_RECOMPUTE_MLP, wi_out point here) */
    mb_bf16 *shared_normed, *shared_wi, *shared_glu;
    void *scratch;
    size_t scratch_bytes;
    /* pinned host staging, same budget */
    void *pinned;
    size_t pinned_bytes;
    int32_t *host_ids, *host_cu, *host_rows, *host_targets, *host_cu_rows;
    float *host_sequence_labels;
    double *host_scalars;
    mb_bf16 *host_logits_bf16;
    float *host_logits; /* malloc'ed, fp32 */
    batch_state batch;
    size_t peak_used, device_total;
    /* data parallelism (ZeRO-1, attach_dist): NULL comm = one GPU */
    mb_comm *comm;
    cudaStream_t comm_stream;        /* the communicator's stream: reductions, the sharded optimizer, gathers */
    mb_zero_plan plan;
    cudaEvent_t *stage_events;       /* [plan.stage_count]: backward stage s done on the compute stream */
    cudaEvent_t join_event;
    int sync_armed;                  /* this backward reduces gradient buckets as their stage finishes */
    char *bucket_issued;             /* [plan.bucket_count] this step */
    double *dp_host;                 /* pinned: the reduced gradient norm */
    int deterministic;               /* MB_DETERMINISTIC=1: bit-reproducible attention backward (slower) */
    int recompute;                   /* mb_recompute: which activations the backward rebuilds instead of keeping */
    int decoder_chunk_rows;          /* kDecoderChunkRows unless MB_DECODER_CHUNK_ROWS */
    int head_row_multiple;           /* kHeadRowMultiple unless MB_HEAD_ROW_MULTIPLE */
    int sparse_last_layer;           /* the last layer on the head's rows: a sparse_mode (MB_SPARSE_LAST_LAYER) */
    profiler *prof;                  /* NULL unless MB_PROFILE=1 */
};

cuda_backend *impl_of(mb_backend *b) { return static_cast<cuda_backend *>(b->impl); }

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

/* Hands out aligned pieces of one allocation; with base == NULL it only measures. */
struct carver {
    char *base;
    size_t used;
    template <typename T>
    T *take(size_t count) {
        T *p = base != nullptr ? reinterpret_cast<T *>(base + used) : nullptr;
        used += align_up(count * sizeof(T) + (count == 0 ? 1 : 0));
        return p;
    }
};

/* The bf16 copy of a master tensor: same offset in the parallel bf16 arena (NULL stays NULL). */
const mb_bf16 *copy_of(const cuda_backend *c, const float *master) {
    return master == nullptr ? nullptr : c->copy + (master - c->master);
}

int record_memory(cuda_backend *c, mb_error *err) {
    size_t free_bytes = 0, total_bytes = 0;
    MB_CUDA_CHECK(err, cudaMemGetInfo(&free_bytes, &total_bytes));
    c->device_total = total_bytes;
    if (total_bytes - free_bytes > c->peak_used) c->peak_used = total_bytes - free_bytes;
    return 0;
}

/* Profiling: the op family that starts now on the compute stream (a string literal). */
void mark(cuda_backend *c, const char *label) {
    profiler *p = c->prof;
    if (p == nullptr || p->marks == kMaxMarks) return;
    if (cudaEventRecord(p->events[p->marks], c->stream) != cudaSuccess) return;
    p->mark_labels[p->marks++] = label;
}

void charge(profiler *p, const char *label, double milliseconds) {
    int k = 0;
    while (k < p->label_count && strcmp(p->labels[k], label) != 0) k++;
    if (k == p->label_count) {
        if (k == kMaxLabels) return;
        p->labels[p->label_count++] = label;
    }
    p->milliseconds[k] += milliseconds;
    p->calls[k]++;
}

/* After the compute stream went idle: charge every interval between consecutive marks. */
void collect_marks(cuda_backend *c) {
    profiler *p = c->prof;
    for (int k = 0; k + 1 < p->marks; k++) {
        float milliseconds = 0.0f;
        if (cudaEventElapsedTime(&milliseconds, p->events[k], p->events[k + 1]) == cudaSuccess)
            charge(p, p->mark_labels[k], milliseconds);
    }
    cudaGetLastError();
    p->marks = 0;
}

/* Waits for everything queued on `stream`: a plain synchronisation on one GPU; with data parallelism a polled wait
 * that notices NCCL errors, failed peers and the timeout (a collective on the other stream may be what blocks). */
int wait_for(cuda_backend *c, cudaStream_t stream, const char *what, mb_error *err) {
    int profiling = c->prof != nullptr && stream == c->stream;
    if (profiling) mark(c, "(end of marks)");
    if (c->comm != nullptr) {
        TRY(mb_comm_wait_stream(c->comm, stream, what, err));
    } else {
        MB_CUDA_CHECK(err, cudaStreamSynchronize(stream));
    }
    if (profiling) collect_marks(c);
    return 0;
}

/* `to` waits (on the device) for what is queued on `from` so far. */
int join(cuda_backend *c, cudaStream_t from, cudaStream_t to, mb_error *err) {
    MB_CUDA_CHECK(err, cudaEventRecord(c->join_event, from));
    MB_CUDA_CHECK(err, cudaStreamWaitEvent(to, c->join_event, 0));
    return 0;
}

int head_classes(const mb_config *cfg) { return cfg->head == MB_HEAD_MASKED_LM ? cfg->vocab_size : cfg->num_labels; }

/* ---- small kernels the op library lacks: pooling and scattering head gradients back to token rows ---- */

/* pooled[s, j] = mean over the tokens of sequence s of hidden[i, j] (fp32 sum, in token order). */
__global__ void mean_pool_forward_kernel(mb::bf16 *pooled, const mb::bf16 *hidden, const int32_t *cu_seqlens,
                                         int h) {
    int s = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= h) return;
    int begin = cu_seqlens[s], end = cu_seqlens[s + 1];
    float sum = 0.0f;
    for (int i = begin; i < end; i++) sum += mb::to_float(hidden[(size_t)i * h + j]);
    pooled[(size_t)s * h + j] = mb::to_bf16(sum / (float)(end - begin));
}

/* dhidden[i, j] = dpooled[s, j] / length(s) for every token i of sequence s (writes every row). */
__global__ void mean_pool_backward_kernel(mb::bf16 *dhidden, const mb::bf16 *dpooled, const int32_t *cu_seqlens,
                                          int h) {
    int s = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= h) return;
    int begin = cu_seqlens[s], end = cu_seqlens[s + 1];
    mb::bf16 value = mb::to_bf16(mb::to_float(dpooled[(size_t)s * h + j]) / (float)(end - begin));
    for (int i = begin; i < end; i++) dhidden[(size_t)i * h + j] = value;
}

/* dhidden[rows[r], :] = drows[r, :] (the other rows were zeroed before). */
__global__ void scatter_rows_kernel(mb::bf16 *dhidden, const mb::bf16 *drows, const int32_t *rows, int count, int h) {
    size_t total = (size_t)count * h;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total; k += (size_t)gridDim.x * blockDim.x) {
        size_t r = k / h, j = k % h;
        dhidden[(size_t)rows[r] * h + j] = drows[k];
    }
}

mb::bf16 *dev(mb_bf16 *p) { return reinterpret_cast<mb::bf16 *>(p); }
const mb::bf16 *dev(const mb_bf16 *p) { return reinterpret_cast<const mb::bf16 *>(p); }

int mean_pool_forward(cuda_backend *c, int sequences, int h, mb_error *err) {
    dim3 grid(sequences, mb::ceil_div(h, 256));
    mean_pool_forward_kernel<<<grid, 256, 0, c->stream>>>(dev(c->head_inputs), dev(c->final_out), c->cu_seqlens, h);
    MB_CUDA_CHECK_LAUNCH(err, "mean_pool_forward_kernel");
    return 0;
}

int mean_pool_backward(cuda_backend *c, mb_bf16 *dhidden, const mb_bf16 *dpooled, int sequences, int h,
                       mb_error *err) {
    dim3 grid(sequences, mb::ceil_div(h, 256));
    mean_pool_backward_kernel<<<grid, 256, 0, c->stream>>>(dev(dhidden), dev(dpooled), c->cu_seqlens, h);
    MB_CUDA_CHECK_LAUNCH(err, "mean_pool_backward_kernel");
    return 0;
}

int scatter_rows(cuda_backend *c, mb_bf16 *dhidden, const mb_bf16 *drows, int rows, int tokens, int h,
                 mb_error *err) {
    MB_CUDA_CHECK(err, cudaMemsetAsync(dhidden, 0, (size_t)tokens * h * sizeof(mb_bf16), c->stream));
    if (rows == 0) return 0;
    scatter_rows_kernel<<<mb::grid_stride_blocks((size_t)rows * h), 256, 0, c->stream>>>(dev(dhidden), dev(drows),
                                                                                          c->row_tokens, rows, h);
    MB_CUDA_CHECK_LAUNCH(err, "scatter_rows_kernel");
    return 0;
}

/* ---- the activation arena ---- */

/* Per layer: what the backward needs. With recompute, the LayerNorm outputs and the GLU product (and at
 * MB_RECOMPUTE_MLP the Wi product) of every layer share one buffer each, overwritten layer after layer in the forward
 * and rebuilt for one layer at a time in the backward (recompute_attention_input, recompute_mlp_inputs). */
void carve_layers(cuda_backend *c, carver *k, const mb_config *cfg, size_t n) {
    size_t H = (size_t)cfg->hidden_size, I = (size_t)cfg->intermediate_size, heads = (size_t)cfg->num_attention_heads;
    int shared_norms = c->recompute >= MB_RECOMPUTE_NORMS, shared_wi = c->recompute >= MB_RECOMPUTE_MLP;
    c->shared_normed = shared_norms ? k->take<mb_bf16>(n * H) : nullptr;
    c->shared_glu = shared_norms ? k->take<mb_bf16>(n * I) : nullptr;
    c->shared_wi = shared_wi ? k->take<mb_bf16>(n * 2 * I) : nullptr;
    for (int l = 0; l < cfg->num_hidden_layers; l++) {
        layer_activations *a = &c->layers[l];
        a->attn_in = l == 0 ? nullptr : shared_norms ? c->shared_normed : k->take<mb_bf16>(n * H);
        a->attn_mean = k->take<float>(n);
        a->attn_rstd = k->take<float>(n);
        a->qkv = k->take<mb_bf16>(n * 3 * H);
        a->attn_out = k->take<mb_bf16>(n * H);
        a->lse = k->take<float>(n * heads);
        a->h_mid = k->take<mb_bf16>(n * H);
        a->mlp_in = shared_norms ? c->shared_normed : k->take<mb_bf16>(n * H);
        a->mlp_mean = k->take<float>(n);
        a->mlp_rstd = k->take<float>(n);
        a->wi_out = shared_wi ? c->shared_wi : k->take<mb_bf16>(n * 2 * I);
        a->glu_out = shared_norms ? c->shared_glu : k->take<mb_bf16>(n * I);
        a->h_out = k->take<mb_bf16>(n * H);
    }
}

/* The largest scratch any op asks for at this budget (all ops run in sequence on one stream and share it). */
int scratch_need(const mb_config *cfg, const budget *bud, size_t *bytes, mb_error *err) {
    int n = bud->tokens, rows = bud->rows, H = cfg->hidden_size, I = cfg->intermediate_size;
    int classes = head_classes(cfg);
    size_t need = mb_cuda_attention_workspace_bytes(n, bud->sequences, cfg->num_attention_heads, cfg->head_dim);
    const int linear_shapes[][2] = {{n, 3 * H}, {n, H}, {n, 2 * I}, {rows, H}, {rows, classes}};
    for (const auto &shape : linear_shapes) {
        size_t s = mb_cuda_linear_backward_scratch_bytes(shape[0], shape[1]);
        if (s > need) need = s;
    }
    size_t loss = mb_cuda_cross_entropy_backward_bias_scratch_bytes(rows, classes);
    if (loss > need) need = loss;
    size_t ln = mb_cuda_layernorm_backward_scratch_bytes(n, H);
    if (ln > need) need = ln;
    ln = mb_cuda_layernorm_backward_scratch_bytes(rows, H);
    if (ln > need) need = ln;
    size_t embedding = 0;
    TRY(mb_cuda_embedding_backward_scratch_bytes(&embedding, n, cfg->vocab_size, err));
    if (embedding > need) need = embedding;
    *bytes = need;
    return 0;
}

/* Rows of logits per chunk of the head (classifier heads are never chunked: their rows are sequences). */
int head_chunk_rows(const cuda_backend *c, const mb_config *cfg, int rows) {
    return cfg->head == MB_HEAD_MASKED_LM && rows > c->decoder_chunk_rows ? c->decoder_chunk_rows
                                                                           : (rows > 0 ? rows : 1);
}

/* Whether the logits of every chunk stay until the backward (else the backward recomputes each chunk's). */
bool logits_kept(const cuda_backend *c) { return c->recompute < MB_RECOMPUTE_NORMS; }

size_t logit_rows_kept(const cuda_backend *c, const mb_config *cfg, int rows) {
    return logits_kept(c) ? (size_t)rows : (size_t)head_chunk_rows(c, cfg, rows);
}

/* Where the logits of the chunk starting at row r0 live. */
mb_bf16 *chunk_logits(cuda_backend *c, int r0) {
    return logits_kept(c) ? c->logits + (size_t)r0 * c->batch.classes : c->logits;
}

void carve_activations(cuda_backend *c, carver *k, const mb_config *cfg, const budget *bud, size_t scratch_bytes) {
    size_t n = (size_t)bud->tokens, S = (size_t)bud->sequences, R = (size_t)bud->rows;
    size_t H = (size_t)cfg->hidden_size, I = (size_t)cfg->intermediate_size, C = (size_t)head_classes(cfg);
    c->ids = k->take<int32_t>(n);
    c->cu_seqlens = k->take<int32_t>(S + 1);
    c->positions = k->take<int32_t>(n);
    for (int kind = 0; kind < 2; kind++) c->rope_tables[kind] = k->take<float>(n * (size_t)cfg->head_dim);
    c->row_tokens = k->take<int32_t>(R);
    c->targets = k->take<int32_t>(R);
    c->sequence_labels = k->take<float>(R);
    c->row_loss = k->take<float>(R);
    c->row_lse = k->take<float>(R);
    c->embedded = k->take<mb_bf16>(n * H);
    c->embedded_mean = k->take<float>(n);
    c->embedded_rstd = k->take<float>(n);
    c->hidden0 = k->take<mb_bf16>(n * H);
    carve_layers(c, k, cfg, n);
    c->final_out = k->take<mb_bf16>(n * H);
    c->final_mean = k->take<float>(n);
    c->final_rstd = k->take<float>(n);
    c->head_inputs = k->take<mb_bf16>(R * H);
    c->head_dense = k->take<mb_bf16>(R * H);
    c->head_act = k->take<mb_bf16>(R * H);
    c->head_norm = k->take<mb_bf16>(R * H);
    c->head_mean = k->take<float>(R);
    c->head_rstd = k->take<float>(R);
    c->last_attn_rows = k->take<mb_bf16>(R * H);
    c->last_input_rows = k->take<mb_bf16>(R * H);
    c->last_query_rows = k->take<mb_bf16>(R * H);
    c->cu_rows = k->take<int32_t>(S + 1);
    c->logits = k->take<mb_bf16>(logit_rows_kept(c, cfg, bud->rows) * C);
    c->dh = k->take<mb_bf16>(n * H);
    c->d_normed = k->take<mb_bf16>(n * H);
    /* the attention block's and the MLP block's backward buffers are never live at the same time: shared */
    c->dqkv = k->take<mb_bf16>(n * (3 * H > 2 * I ? 3 * H : 2 * I));
    c->d_wi = c->dqkv;
    c->d_attn = k->take<mb_bf16>(n * (H > I ? H : I));
    c->d_glu = c->d_attn;
    c->d_head = k->take<mb_bf16>(R * H);
    c->d_head2 = k->take<mb_bf16>(R * H);
    c->scratch = k->take<char>(scratch_bytes);
    c->scratch_bytes = scratch_bytes;
}

size_t host_logit_capacity(const mb_config *cfg, const budget *bud) {
    size_t count = (size_t)bud->rows * (size_t)head_classes(cfg);
    if (cfg->head == MB_HEAD_MASKED_LM && count > kMaxHostLogits) return kMaxHostLogits;
    return count;
}

void carve_pinned(cuda_backend *c, carver *k, const mb_config *cfg, const budget *bud) {
    size_t n = (size_t)bud->tokens, S = (size_t)bud->sequences, R = (size_t)bud->rows;
    c->host_ids = k->take<int32_t>(n);
    c->host_cu = k->take<int32_t>(S + 1);
    c->host_cu_rows = k->take<int32_t>(S + 1);
    c->host_rows = k->take<int32_t>(R);
    c->host_targets = k->take<int32_t>(R);
    c->host_sequence_labels = k->take<float>(R);
    c->host_scalars = k->take<double>(2);
    c->host_logits_bf16 = k->take<mb_bf16>(host_logit_capacity(cfg, bud));
}

void release_activations(cuda_backend *c) {
    if (c->acts != nullptr) cudaFree(c->acts);
    if (c->pinned != nullptr) cudaFreeHost(c->pinned);
    free(c->host_logits);
    c->acts = nullptr;
    c->pinned = nullptr;
    c->host_logits = nullptr;
    c->acts_bytes = c->pinned_bytes = 0;
    c->cap = budget{0, 0, 0};
}

/* (Re)allocates the activation arena for `want`; the previous batch's activations are gone afterwards. */
int carve_budget(cuda_backend *c, const mb_config *cfg, budget want, mb_error *err) {
    size_t scratch = 0;
    TRY(scratch_need(cfg, &want, &scratch, err));
    carver measure{nullptr, 0}, measure_pinned{nullptr, 0};
    carve_activations(c, &measure, cfg, &want, scratch);
    carve_pinned(c, &measure_pinned, cfg, &want);
    MB_CUDA_CHECK(err, cudaStreamSynchronize(c->stream)); /* nothing may still use the old arena */
    release_activations(c);
    c->batch.forward_done = 0;
    cudaError_t status = cudaMalloc(&c->acts, measure.used);
    if (status != cudaSuccess) {
        c->acts = nullptr;
        return mb_fail(err, "cuda backend: cannot allocate %.1f MiB of activations for %d tokens, %d sequences, "
                            "%d head rows: %s",
                       (double)measure.used / (1 << 20), want.tokens, want.sequences, want.rows,
                       cudaGetErrorString(status));
    }
    c->acts_bytes = measure.used;
    MB_CUDA_CHECK(err, cudaMallocHost(&c->pinned, measure_pinned.used));
    c->pinned_bytes = measure_pinned.used;
    size_t logit_capacity = host_logit_capacity(cfg, &want);
    c->host_logits = static_cast<float *>(malloc((logit_capacity ? logit_capacity : 1) * sizeof(float)));
    if (c->host_logits == nullptr) return mb_fail(err, "cuda backend: out of host memory for logits");
    carver real{static_cast<char *>(c->acts), 0}, real_pinned{static_cast<char *>(c->pinned), 0};
    carve_activations(c, &real, cfg, &want, scratch);
    carve_pinned(c, &real_pinned, cfg, &want);
    c->cap = want;
    return record_memory(c, err);
}

int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

/* Grows the budget (with headroom, so that slowly growing batches do not re-carve every step) when `need` exceeds
 * it; does nothing otherwise. */
int ensure_budget(cuda_backend *c, const mb_config *cfg, budget need, mb_error *err) {
    if (c->acts != nullptr && need.tokens <= c->cap.tokens && need.sequences <= c->cap.sequences &&
        need.rows <= c->cap.rows)
        return 0;
    budget want = c->cap;
    if (need.tokens > want.tokens) want.tokens = round_up(need.tokens, 256);
    if (need.sequences > want.sequences) want.sequences = round_up(need.sequences, 64);
    if (need.rows > want.rows) want.rows = round_up(need.rows + need.rows / 8, 64);
    if (want.tokens < 1) want.tokens = 1;
    if (want.sequences < 1) want.sequences = 1;
    if (want.rows < 1) want.rows = 1;
    return carve_budget(c, cfg, want, err);
}

/* ---- forward ---- */

/* The MLM head's rows padded to a multiple of c->head_row_multiple (kHeadRowMultiple); other heads unpadded. */
int padded_head_rows(const cuda_backend *c, const mb_config *cfg, int rows) {
    if (cfg->head != MB_HEAD_MASKED_LM || rows == 0) return rows;
    return (int)round_up(rows, c->head_row_multiple);
}

int count_head_rows(const mb_batch *batch, const mb_config *cfg) {
    if (cfg->head != MB_HEAD_MASKED_LM) return batch->sequence_count;
    int rows = 0;
    for (int i = 0; i < batch->token_count; i++) rows += batch->labels[i] != -100;
    return rows;
}

/* Stages ids, cu_seqlens and the head's rows and targets in pinned memory and queues their upload. */
int upload_batch(cuda_backend *c, const mb_config *cfg, const mb_batch *batch, int rows, mb_error *err) {
    int n = batch->token_count, S = batch->sequence_count;
    memcpy(c->host_ids, batch->input_ids, (size_t)n * sizeof(int32_t));
    memcpy(c->host_cu, batch->cu_seqlens, (size_t)(S + 1) * sizeof(int32_t));
    if (cfg->head == MB_HEAD_MASKED_LM) {
        int r = 0;
        c->host_cu_rows[0] = 0; /* the labelled rows in token order: each sequence's are contiguous */
        for (int s = 0; s < S; s++) {
            for (int i = batch->cu_seqlens[s]; i < batch->cu_seqlens[s + 1]; i++)
                if (batch->labels[i] != -100) {
                    c->host_rows[r] = i;
                    c->host_targets[r] = batch->labels[i];
                    r++;
                }
            c->host_cu_rows[s + 1] = r;
        }
        for (; r < rows; r++) { /* padding: token 0's row, ignored (kHeadRowMultiple) */
            c->host_rows[r] = 0;
            c->host_targets[r] = -1;
        }
    } else {
        for (int s = 0; s < S; s++) {
            c->host_rows[s] = batch->cu_seqlens[s]; /* the cls token (used by cls pooling) */
            c->host_targets[s] = cfg->num_labels > 1 ? (int32_t)batch->sequence_labels[s] : 0;
            c->host_sequence_labels[s] = batch->sequence_labels[s];
            c->host_cu_rows[s] = s;
        }
        c->host_cu_rows[S] = S;
    }
    MB_CUDA_CHECK(err, cudaMemcpyAsync(c->ids, c->host_ids, (size_t)n * sizeof(int32_t), cudaMemcpyHostToDevice,
                                       c->stream));
    MB_CUDA_CHECK(err, cudaMemcpyAsync(c->cu_seqlens, c->host_cu, (size_t)(S + 1) * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, c->stream));
    MB_CUDA_CHECK(err, cudaMemcpyAsync(c->cu_rows, c->host_cu_rows, (size_t)(S + 1) * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, c->stream));
    if (rows > 0) {
        MB_CUDA_CHECK(err, cudaMemcpyAsync(c->row_tokens, c->host_rows, (size_t)rows * sizeof(int32_t),
                                           cudaMemcpyHostToDevice, c->stream));
        MB_CUDA_CHECK(err, cudaMemcpyAsync(c->targets, c->host_targets, (size_t)rows * sizeof(int32_t),
                                           cudaMemcpyHostToDevice, c->stream));
    }
    if (cfg->head != MB_HEAD_MASKED_LM)
        MB_CUDA_CHECK(err, cudaMemcpyAsync(c->sequence_labels, c->host_sequence_labels, (size_t)S * sizeof(float),
                                           cudaMemcpyHostToDevice, c->stream));
    return 0;
}

/* Kind of a layer for the rope tables: 0 global, 1 local (sliding window). */
int rope_kind(const mb_config *cfg, int l) { return mb_layer_window(cfg, l) < 0 ? 0 : 1; }

/* Whether layer l's attention backward applies RoPE's backward in its own stores (its path supports it and the
 * batch's table holds this layer's theta); otherwise the separate mb_cuda_rope pass runs. */
bool rope_fused(const cuda_backend *c, const mb_config *cfg, int l) {
    return mb_cuda_attention_backward_fuses_rope(cfg->head_dim, mb_layer_window(cfg, l), c->deterministic) &&
           c->rope_thetas[rope_kind(cfg, l)] == mb_layer_rope_theta(cfg, l);
}

/* The batch's rope tables, one per kind of layer that has a layer with a fused backward (theta of its first one). */
int rope_tables_forward(cuda_backend *c, const mb_config *cfg, int n, mb_error *err) {
    c->rope_thetas[0] = c->rope_thetas[1] = 0.0;
    for (int l = 0; l < cfg->num_hidden_layers; l++) {
        int kind = rope_kind(cfg, l);
        if (c->rope_thetas[kind] != 0.0 ||
            !mb_cuda_attention_backward_fuses_rope(cfg->head_dim, mb_layer_window(cfg, l), c->deterministic))
            continue;
        TRY(mb_cuda_rope_table(c->rope_tables[kind], c->positions, n, cfg->head_dim, mb_layer_rope_theta(cfg, l),
                               c->stream, err));
        c->rope_thetas[kind] = mb_layer_rope_theta(cfg, l);
    }
    return 0;
}

int embeddings_forward(cuda_backend *c, const mb_config *cfg, int n, mb_error *err) {
    int H = cfg->hidden_size;
    mark(c, "embeddings fwd");
    TRY(mb_cuda_positions(c->positions, c->cu_seqlens, c->batch.sequences, n, c->stream, err));
    TRY(rope_tables_forward(c, cfg, n, err));
    TRY(mb_cuda_embedding_forward(c->embedded, c->ids, copy_of(c, c->w.tok_embeddings), n, H, c->stream, err));
    TRY(mb_cuda_layernorm_forward(c->hidden0, c->embedded_mean, c->embedded_rstd, c->embedded, c->w.embedding_norm,
                                  c->w.embedding_norm_bias, n, H, (float)cfg->norm_eps, c->stream, err));
    return 0;
}

const mb_bf16 *layer_input(const cuda_backend *c, int l) { return l == 0 ? c->hidden0 : c->layers[l - 1].h_out; }

/* Whether this batch runs its last layer after the attention on the head's rows only (see the header): not with
 * mean pooling, which reads every row, and only when the head has fewer rows than the batch has tokens (every
 * buffer of a layer is sized for the tokens). */
bool last_layer_sparse(const cuda_backend *c, const mb_config *cfg, int rows, int tokens) {
    bool mean_pooled = cfg->head != MB_HEAD_MASKED_LM && cfg->classifier_pooling == MB_POOLING_MEAN;
    return c->sparse_last_layer && !mean_pooled && rows > 0 && rows < tokens && cfg->num_hidden_layers > 0;
}

bool sparse_layer(const cuda_backend *c, const mb_config *cfg, int l) {
    return c->batch.sparse_last && l == cfg->num_hidden_layers - 1;
}

/* Whether the sparse last layer's attention also runs for the head's rows only: its kernels take a subset of the
 * queries, and its backward applies RoPE with the batch's table (rope_fused: after rope_tables_forward). */
bool last_attention_sparse(const cuda_backend *c, const mb_config *cfg) {
    const int l = cfg->num_hidden_layers - 1;
    return sparse_layer(c, cfg, l) && c->sparse_last_layer == kSparseAttention && rope_fused(c, cfg, l) &&
           mb_cuda_attention_rows_supported(cfg->head_dim, mb_layer_window(cfg, l), c->deterministic);
}

bool sparse_attention(const cuda_backend *c, const mb_config *cfg, int l) {
    return c->batch.sparse_attention && l == cfg->num_hidden_layers - 1;
}

/* Rows of layer l after its attention (output projection, MLP): the head's rows in the sparse last layer. */
int rows_after_attention(const cuda_backend *c, const mb_config *cfg, int l) {
    return sparse_layer(c, cfg, l) ? c->batch.rows : c->batch.tokens;
}

/* The sparse last layer's attention for the head's own rows (label_rows of them, contiguous per sequence: cu_rows):
 * their rotated Q rows gathered from qkv, every key and value; the output goes straight to last_attn_rows, whose
 * padding rows are zero. lse in the layer's lse buffer, rows like the head's. */
int sparse_attention_forward(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    layer_activations *a = &c->layers[l];
    int n = c->batch.tokens, H = cfg->hidden_size, own = c->batch.label_rows, rows = c->batch.rows;
    mark(c, "attention fwd (last layer, head rows)");
    TRY(mb_cuda_gather_rows(c->last_query_rows, c->row_tokens, a->qkv, 3 * (size_t)H, own, H, c->stream, err));
    if (rows > own)
        MB_CUDA_CHECK(err, cudaMemsetAsync(c->last_attn_rows + (size_t)own * H, 0,
                                           (size_t)(rows - own) * H * sizeof(mb_bf16), c->stream));
    return mb_cuda_attention_forward_rows(c->last_attn_rows, a->lse, c->scratch, c->last_query_rows, a->qkv,
                                          c->cu_seqlens, c->cu_rows, c->batch.sequences, n, own,
                                          cfg->num_attention_heads, cfg->head_dim, mb_layer_window(cfg, l), c->stream,
                                          err);
}

int attention_block_forward(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    const mb_layer_weights *w = &c->w.layers[l];
    layer_activations *a = &c->layers[l];
    int n = c->batch.tokens, H = cfg->hidden_size, heads = cfg->num_attention_heads;
    const mb_bf16 *h_in = layer_input(c, l), *attn_in = h_in;
    int global = mb_layer_window(cfg, l) < 0;
    if (w->attn_norm != nullptr) {
        mark(c, "layernorm fwd");
        TRY(mb_cuda_layernorm_forward(a->attn_in, a->attn_mean, a->attn_rstd, h_in, w->attn_norm, w->attn_norm_bias,
                                      n, H, (float)cfg->norm_eps, c->stream, err));
        attn_in = a->attn_in;
    }
    mark(c, "gemm Wqkv fwd");
    TRY(mb_cuda_linear_forward(c->matmul, a->qkv, attn_in, copy_of(c, w->wqkv), copy_of(c, w->wqkv_bias), nullptr, n,
                               H, 3 * H, c->stream, err));
    mark(c, "rope fwd");
    TRY(mb_cuda_rope(a->qkv, c->positions, n, heads, cfg->head_dim, mb_layer_rope_theta(cfg, l), +1, c->stream, err));
    if (sparse_attention(c, cfg, l)) {
        TRY(sparse_attention_forward(c, cfg, l, err));
    } else {
        mark(c, global ? "attention fwd (global)" : "attention fwd (local)");
        TRY(mb_cuda_attention_forward(a->attn_out, a->lse, c->scratch, a->qkv, c->cu_seqlens, c->batch.sequences, n,
                                      heads, cfg->head_dim, mb_layer_window(cfg, l), c->stream, err));
    }
    const mb_bf16 *projected = a->attn_out, *residual = h_in;
    if (sparse_layer(c, cfg, l)) { /* the head's rows of the attention output and of the residual, in head order */
        mark(c, "gather (last layer)");
        if (!sparse_attention(c, cfg, l))
            TRY(mb_cuda_embedding_forward(c->last_attn_rows, c->row_tokens, a->attn_out, c->batch.rows, H, c->stream,
                                          err));
        TRY(mb_cuda_embedding_forward(c->last_input_rows, c->row_tokens, h_in, c->batch.rows, H, c->stream, err));
        projected = c->last_attn_rows, residual = c->last_input_rows;
    }
    mark(c, "gemm Wo fwd");
    TRY(mb_cuda_linear_forward(c->matmul, a->h_mid, projected, copy_of(c, w->wo), copy_of(c, w->wo_bias), residual,
                               rows_after_attention(c, cfg, l), H, H, c->stream, err));
    return 0;
}

int mlp_block_forward(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    const mb_layer_weights *w = &c->w.layers[l];
    layer_activations *a = &c->layers[l];
    int n = rows_after_attention(c, cfg, l), H = cfg->hidden_size, I = cfg->intermediate_size;
    mark(c, "layernorm fwd");
    TRY(mb_cuda_layernorm_forward(a->mlp_in, a->mlp_mean, a->mlp_rstd, a->h_mid, w->mlp_norm, w->mlp_norm_bias, n, H,
                                  (float)cfg->norm_eps, c->stream, err));
    mark(c, "gemm Wi fwd");
    TRY(mb_cuda_linear_forward(c->matmul, a->wi_out, a->mlp_in, copy_of(c, w->wi), copy_of(c, w->wi_bias), nullptr, n,
                               H, 2 * I, c->stream, err));
    mark(c, "geglu fwd");
    TRY(mb_cuda_glu_forward(a->glu_out, a->wi_out, n, I, cfg->hidden_activation, c->stream, err));
    mark(c, "gemm mlp Wo fwd");
    TRY(mb_cuda_linear_forward(c->matmul, a->h_out, a->glu_out, copy_of(c, w->mlp_wo), copy_of(c, w->mlp_wo_bias),
                               a->h_mid, n, I, H, c->stream, err));
    return 0;
}

int is_regression(const mb_config *cfg) { return cfg->head == MB_HEAD_SEQUENCE_CLASSIFIER && cfg->num_labels == 1; }

/* logits of head rows [r0, r0 + count) = head_norm · Wᵀ + b (the tied decoder or the classifier), into z. */
int decoder_forward(cuda_backend *c, const mb_config *cfg, mb_bf16 *z, int r0, int count, mb_error *err) {
    int H = cfg->hidden_size, is_mlm = cfg->head == MB_HEAD_MASKED_LM;
    const float *weight = is_mlm ? c->w.decoder_weight : c->w.classifier_weight;
    const float *bias = is_mlm ? c->w.decoder_bias : c->w.classifier_bias;
    return mb_cuda_linear_forward(c->matmul, z, c->head_norm + (size_t)r0 * H, copy_of(c, weight), copy_of(c, bias),
                                  nullptr, count, H, c->batch.classes, c->stream, err);
}

/* Gathers (MLM: labelled tokens; classifier: cls token or sequence mean) and runs the head up to the row losses. */
int head_forward(cuda_backend *c, const mb_config *cfg, mb_error *err) {
    int H = cfg->hidden_size, rows = c->batch.rows, classes = c->batch.classes;
    int is_mlm = cfg->head == MB_HEAD_MASKED_LM;
    MB_NVTX_RANGE("head_forward");
    mark(c, "head fwd (gather, dense, norm)");
    if (!is_mlm && cfg->classifier_pooling == MB_POOLING_MEAN)
        TRY(mean_pool_forward(c, rows, H, err));
    else if (!c->batch.sparse_last) /* sparse: the final norm wrote the head's rows into head_inputs */
        TRY(mb_cuda_embedding_forward(c->head_inputs, c->row_tokens, c->final_out, rows, H, c->stream, err));
    TRY(mb_cuda_linear_forward(c->matmul, c->head_dense, c->head_inputs, copy_of(c, c->w.head_dense),
                               copy_of(c, c->w.head_dense_bias), nullptr, rows, H, H, c->stream, err));
    TRY(mb_cuda_activation_forward(c->head_act, c->head_dense, (size_t)rows * H, cfg->classifier_activation,
                                   c->stream, err));
    TRY(mb_cuda_layernorm_forward(c->head_norm, c->head_mean, c->head_rstd, c->head_act, c->w.head_norm,
                                  c->w.head_norm_bias, rows, H, (float)cfg->norm_eps, c->stream, err));
    int chunk = head_chunk_rows(c, cfg, rows);
    for (int r0 = 0; r0 < rows; r0 += chunk) {
        int count = rows - r0 < chunk ? rows - r0 : chunk;
        mb_bf16 *z = chunk_logits(c, r0);
        mark(c, "head fwd (decoder)");
        TRY(decoder_forward(c, cfg, z, r0, count, err));
        mark(c, "head fwd (loss)");
        if (is_regression(cfg))
            TRY(mb_cuda_mse(nullptr, c->row_loss + r0, z, c->sequence_labels + r0, count, 1.0f, c->stream, err));
        else
            TRY(mb_cuda_cross_entropy(z, c->row_loss + r0, c->row_lse + r0, c->targets + r0, count, classes, 1.0f, 0,
                                      c->stream, err));
    }
    return mb_cuda_sum(&c->device_scalars[0], c->row_loss, rows, c->stream, err);
}

/* The one device→host transfer of the step: the loss sum, and the bf16 logits when they are returned. */
int finish_forward(cuda_backend *c, const mb_config *cfg, mb_forward_result *result, mb_error *err) {
    int rows = c->batch.label_rows, classes = c->batch.classes; /* the padding rows come after these */
    size_t logit_count = (size_t)rows * classes;
    /* with recompute the buffer holds only the last chunk's logits: returned only when that is all of them */
    int want_logits = logit_count <= host_logit_capacity(cfg, &c->cap) &&
                      (logits_kept(c) || c->batch.rows <= head_chunk_rows(c, cfg, c->batch.rows));
    c->host_scalars[0] = 0.0;
    if (rows > 0)
        MB_CUDA_CHECK(err, cudaMemcpyAsync(c->host_scalars, c->device_scalars, sizeof(double), cudaMemcpyDeviceToHost,
                                           c->stream));
    if (want_logits && logit_count > 0)
        MB_CUDA_CHECK(err, cudaMemcpyAsync(c->host_logits_bf16, c->logits, logit_count * sizeof(mb_bf16),
                                           cudaMemcpyDeviceToHost, c->stream));
    TRY(wait_for(c, c->stream, "forward", err));
    result->loss_sum = c->host_scalars[0];
    result->loss_count = rows;
    result->logit_rows = rows;
    result->logit_cols = classes;
    result->logits = nullptr;
    if (want_logits) {
        for (size_t k = 0; k < logit_count; k++) c->host_logits[k] = mb_bf16_to_float(c->host_logits_bf16[k]);
        result->logits = c->host_logits;
    }
    return 0;
}

int cuda_forward(mb_backend *b, const mb_batch *batch, mb_forward_result *result, mb_error *err) {
    cuda_backend *c = impl_of(b);
    const mb_config *cfg = &b->config;
    memset(result, 0, sizeof *result);
    TRY(mb_batch_validate(batch, cfg, err));
    int label_rows = count_head_rows(batch, cfg), rows = padded_head_rows(c, cfg, label_rows);
    TRY(ensure_budget(c, cfg, budget{batch->token_count, batch->sequence_count, rows}, err));
    c->batch = batch_state{batch->token_count, batch->sequence_count, rows, head_classes(cfg), 0, label_rows,
                           last_layer_sparse(c, cfg, rows, batch->token_count), 0};
    MB_NVTX_RANGE("forward");
    TRY(upload_batch(c, cfg, batch, rows, err));
    TRY(embeddings_forward(c, cfg, batch->token_count, err));
    c->batch.sparse_attention = last_attention_sparse(c, cfg);
    char name[64];
    for (int l = 0; l < cfg->num_hidden_layers; l++) {
        snprintf(name, sizeof name, "layer %d forward", l);
        MB_NVTX_RANGE(name);
        TRY(attention_block_forward(c, cfg, l, err));
        TRY(mlp_block_forward(c, cfg, l, err));
    }
    mark(c, "layernorm fwd");
    const bool sparse = c->batch.sparse_last; /* the last layer's output holds the head's rows only */
    TRY(mb_cuda_layernorm_forward(sparse ? c->head_inputs : c->final_out, c->final_mean, c->final_rstd,
                                  layer_input(c, cfg->num_hidden_layers), c->w.final_norm, c->w.final_norm_bias,
                                  sparse ? rows : batch->token_count, cfg->hidden_size, (float)cfg->norm_eps,
                                  c->stream, err));
    if (rows > 0) TRY(head_forward(c, cfg, err));
    TRY(finish_forward(c, cfg, result, err));
    c->batch.forward_done = 1;
    return 0;
}

/* ---- backward ---- */

/* From the loss to the gradient of the final hidden states, written completely into d_final (in the sparse last
 * layer the final norm's rows are the head's: its gradient is d_head2, and d_final is not written). */
int head_backward(cuda_backend *c, const mb_config *cfg, mb_bf16 *d_final, float grad_scale, mb_error *err) {
    int n = c->batch.tokens, H = cfg->hidden_size, rows = c->batch.rows, classes = c->batch.classes;
    int is_mlm = cfg->head == MB_HEAD_MASKED_LM;
    MB_NVTX_RANGE("head_backward");
    mark(c, "head bwd");
    if (rows == 0) {
        MB_CUDA_CHECK(err, cudaMemsetAsync(d_final, 0, (size_t)n * H * sizeof(mb_bf16), c->stream));
        return 0;
    }
    const float *weight = is_mlm ? c->w.decoder_weight : c->w.classifier_weight;
    float *dweight = is_mlm ? c->g.decoder_weight : c->g.classifier_weight; /* tied: the embedding gradient */
    float *dbias = is_mlm ? c->g.decoder_bias : c->g.classifier_bias;
    int chunk = head_chunk_rows(c, cfg, rows);
    for (int r0 = 0; r0 < rows; r0 += chunk) {
        int count = rows - r0 < chunk ? rows - r0 : chunk;
        mb_bf16 *z = chunk_logits(c, r0);
        if (!logits_kept(c)) {
            mark(c, "recompute (decoder)");
            TRY(decoder_forward(c, cfg, z, r0, count, err));
        }
        mark(c, "head bwd (loss)");
        bool bias_done = false;
        if (is_regression(cfg)) {
            TRY(mb_cuda_mse(z, c->row_loss + r0, z, c->sequence_labels + r0, count, grad_scale, c->stream, err));
        } else if (dbias != nullptr) { /* the bias gradient from the gradient's registers, not a second read */
            TRY(mb_cuda_cross_entropy_backward_bias(z, dbias, c->scratch, c->row_lse + r0, c->targets + r0, count,
                                                    classes, grad_scale, c->stream, err));
            bias_done = true;
        } else {
            TRY(mb_cuda_cross_entropy_backward(z, c->row_lse + r0, c->targets + r0, count, classes, grad_scale,
                                               c->stream, err));
        }
        /* separate calls rather than one so that the profile tells the decoder's parts apart */
        const mb_bf16 *x = c->head_norm + (size_t)r0 * H, *w = copy_of(c, weight);
        mark(c, "head bwd (decoder dx)");
        TRY(mb_cuda_linear_backward(c->matmul, c->d_head + (size_t)r0 * H, nullptr, nullptr, nullptr, z, x, w, count,
                                    H, classes, 0, c->stream, err));
        mark(c, "head bwd (decoder dW)");
        TRY(mb_cuda_linear_backward(c->matmul, nullptr, dweight, nullptr, nullptr, z, x, w, count, H, classes, 0,
                                    c->stream, err));
        if (!bias_done && dbias != nullptr) {
            mark(c, "head bwd (decoder bias)");
            TRY(mb_cuda_linear_backward(c->matmul, nullptr, nullptr, dbias, c->scratch, z, x, w, count, H, classes, 0,
                                        c->stream, err));
        }
    }
    mark(c, "head bwd (norm, dense, scatter)");
    TRY(mb_cuda_layernorm_backward(c->d_head2, c->g.head_norm, c->g.head_norm_bias, c->scratch, c->d_head, c->head_act,
                                   c->head_mean, c->head_rstd, c->w.head_norm, rows, H, 0, c->stream, err));
    TRY(mb_cuda_activation_backward(c->d_head, c->d_head2, c->head_dense, (size_t)rows * H,
                                    cfg->classifier_activation, c->stream, err));
    TRY(mb_cuda_linear_backward(c->matmul, c->d_head2, c->g.head_dense, c->g.head_dense_bias, c->scratch, c->d_head,
                                c->head_inputs, copy_of(c, c->w.head_dense), rows, H, H, 0, c->stream, err));
    if (!is_mlm && cfg->classifier_pooling == MB_POOLING_MEAN) return mean_pool_backward(c, d_final, c->d_head2, rows, H, err);
    if (c->batch.sparse_last) return 0;
    return scatter_rows(c, d_final, c->d_head2, c->batch.label_rows, n, H, err); /* not the padding rows */
}

/* Recompute: rebuilds the MLP block's inputs of layer l that the forward did not keep — the same kernels on the same
 * inputs, so the values are bit-identical to the forward's (mean and rstd are rewritten with equal values). */
int recompute_mlp_inputs(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    const mb_layer_weights *w = &c->w.layers[l];
    layer_activations *a = &c->layers[l];
    int n = rows_after_attention(c, cfg, l), H = cfg->hidden_size, I = cfg->intermediate_size;
    if (c->recompute < MB_RECOMPUTE_NORMS) return 0;
    mark(c, "recompute (layernorm, Wi, geglu)");
    TRY(mb_cuda_layernorm_forward(a->mlp_in, a->mlp_mean, a->mlp_rstd, a->h_mid, w->mlp_norm, w->mlp_norm_bias, n, H,
                                  (float)cfg->norm_eps, c->stream, err));
    if (c->recompute >= MB_RECOMPUTE_MLP)
        TRY(mb_cuda_linear_forward(c->matmul, a->wi_out, a->mlp_in, copy_of(c, w->wi), copy_of(c, w->wi_bias), nullptr,
                                   n, H, 2 * I, c->stream, err));
    return mb_cuda_glu_forward(a->glu_out, a->wi_out, n, I, cfg->hidden_activation, c->stream, err);
}

/* The same for the attention block: its LayerNorm output (layer 0 has none). */
int recompute_attention_input(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    const mb_layer_weights *w = &c->w.layers[l];
    layer_activations *a = &c->layers[l];
    if (c->recompute < MB_RECOMPUTE_NORMS || w->attn_norm == nullptr) return 0;
    mark(c, "recompute (layernorm, Wi, geglu)");
    return mb_cuda_layernorm_forward(a->attn_in, a->attn_mean, a->attn_rstd, layer_input(c, l), w->attn_norm,
                                     w->attn_norm_bias, c->batch.tokens, cfg->hidden_size, (float)cfg->norm_eps,
                                     c->stream, err);
}

int mlp_block_backward(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    const mb_layer_weights *w = &c->w.layers[l];
    mb_layer_weights *g = &c->g.layers[l];
    layer_activations *a = &c->layers[l];
    int n = rows_after_attention(c, cfg, l), H = cfg->hidden_size, I = cfg->intermediate_size;
    TRY(recompute_mlp_inputs(c, cfg, l, err));
    mark(c, "gemm mlp Wo bwd");
    TRY(mb_cuda_linear_backward(c->matmul, c->d_glu, g->mlp_wo, g->mlp_wo_bias, c->scratch, c->dh, a->glu_out,
                                copy_of(c, w->mlp_wo), n, I, H, 0, c->stream, err));
    mark(c, "geglu bwd");
    TRY(mb_cuda_glu_backward(c->d_wi, c->d_glu, a->wi_out, n, I, cfg->hidden_activation, c->stream, err));
    mark(c, "gemm Wi bwd");
    TRY(mb_cuda_linear_backward(c->matmul, c->d_normed, g->wi, g->wi_bias, c->scratch, c->d_wi, a->mlp_in,
                                copy_of(c, w->wi), n, H, 2 * I, 0, c->stream, err));
    mark(c, "layernorm bwd");
    TRY(mb_cuda_layernorm_backward(c->dh, g->mlp_norm, g->mlp_norm_bias, c->scratch, c->d_normed, a->h_mid,
                                   a->mlp_mean, a->mlp_rstd, w->mlp_norm, n, H, 1, c->stream, err));
    return 0;
}

/* The sparse last layer's output projection, backward: its weight gradient over the head's rows, then the gradient
 * of the layer's input (dh) goes from the head's rows back to their tokens' rows, the other tokens' being zero (their
 * rows of the layer's output were never used), and so does the attention output's (d_normed) unless the attention
 * itself ran on the head's rows. Only the batch's own head rows are scattered: the padding rows repeat token 0 and
 * carry zero gradients. dqkv is free until the attention backward and stages dh's head rows. */
int sparse_output_projection_backward(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    const mb_layer_weights *w = &c->w.layers[l];
    mb_layer_weights *g = &c->g.layers[l];
    int n = c->batch.tokens, H = cfg->hidden_size, rows = c->batch.rows, own = c->batch.label_rows;
    mark(c, "gemm Wo bwd");
    TRY(mb_cuda_linear_backward(c->matmul, c->d_normed, g->wo, g->wo_bias, c->scratch, c->dh, c->last_attn_rows,
                                copy_of(c, w->wo), rows, H, H, 0, c->stream, err));
    mark(c, "scatter (last layer)");
    MB_CUDA_CHECK(err, cudaMemcpyAsync(c->dqkv, c->dh, (size_t)own * H * sizeof(mb_bf16), cudaMemcpyDeviceToDevice,
                                       c->stream));
    TRY(scatter_rows(c, c->dh, c->dqkv, own, n, H, err));
    if (sparse_attention(c, cfg, l)) return 0;
    return scatter_rows(c, c->d_attn, c->d_normed, own, n, H, err);
}

int attention_block_backward(cuda_backend *c, const mb_config *cfg, int l, mb_error *err) {
    const mb_layer_weights *w = &c->w.layers[l];
    mb_layer_weights *g = &c->g.layers[l];
    layer_activations *a = &c->layers[l];
    int n = c->batch.tokens, H = cfg->hidden_size, heads = cfg->num_attention_heads;
    const mb_bf16 *h_in = layer_input(c, l);
    const mb_bf16 *attn_in = w->attn_norm != nullptr ? a->attn_in : h_in;
    TRY(recompute_attention_input(c, cfg, l, err));
    if (sparse_layer(c, cfg, l)) {
        TRY(sparse_output_projection_backward(c, cfg, l, err));
    } else {
        mark(c, "gemm Wo bwd");
        TRY(mb_cuda_linear_backward(c->matmul, c->d_attn, g->wo, g->wo_bias, c->scratch, c->dh, a->attn_out,
                                    copy_of(c, w->wo), n, H, H, 0, c->stream, err));
    }
    mark(c, mb_layer_window(cfg, l) < 0 ? "attention bwd (global)" : "attention bwd (local)");
    if (sparse_attention(c, cfg, l)) { /* dO of the head's own rows in d_normed, their O in last_attn_rows */
        TRY(mb_cuda_attention_backward_rows(c->dqkv, c->scratch, c->d_normed, c->last_attn_rows, a->lse,
                                            c->last_query_rows, a->qkv, c->cu_seqlens, c->cu_rows, c->row_tokens,
                                            c->batch.sequences, n, c->batch.label_rows, heads, cfg->head_dim,
                                            mb_layer_window(cfg, l), c->rope_tables[rope_kind(cfg, l)], c->stream,
                                            err));
    } else if (rope_fused(c, cfg, l)) { /* RoPE's backward inside the attention kernels' stores of dQ and dK */
        TRY(mb_cuda_attention_backward_rope(c->dqkv, c->scratch, c->d_attn, a->attn_out, a->lse, a->qkv,
                                            c->cu_seqlens, c->batch.sequences, n, heads, cfg->head_dim,
                                            mb_layer_window(cfg, l), c->deterministic,
                                            c->rope_tables[rope_kind(cfg, l)], c->stream, err));
    } else {
        TRY(mb_cuda_attention_backward(c->dqkv, c->scratch, c->d_attn, a->attn_out, a->lse, a->qkv, c->cu_seqlens,
                                       c->batch.sequences, n, heads, cfg->head_dim, mb_layer_window(cfg, l),
                                       c->deterministic, c->stream, err));
        mark(c, "rope bwd");
        TRY(mb_cuda_rope(c->dqkv, c->positions, n, heads, cfg->head_dim, mb_layer_rope_theta(cfg, l), -1, c->stream,
                         err));
    }
    mark(c, "gemm Wqkv bwd");
    if (w->attn_norm == nullptr)
        return mb_cuda_linear_backward(c->matmul, c->dh, g->wqkv, g->wqkv_bias, c->scratch, c->dqkv, attn_in,
                                       copy_of(c, w->wqkv), n, H, 3 * H, 1, c->stream, err);
    TRY(mb_cuda_linear_backward(c->matmul, c->d_normed, g->wqkv, g->wqkv_bias, c->scratch, c->dqkv, attn_in,
                                copy_of(c, w->wqkv), n, H, 3 * H, 0, c->stream, err));
    mark(c, "layernorm bwd");
    TRY(mb_cuda_layernorm_backward(c->dh, g->attn_norm, g->attn_norm_bias, c->scratch, c->d_normed, h_in,
                                   a->attn_mean, a->attn_rstd, w->attn_norm, n, H, 1, c->stream, err));
    return 0;
}

int embeddings_backward(cuda_backend *c, const mb_config *cfg, mb_error *err) {
    int n = c->batch.tokens, H = cfg->hidden_size;
    MB_NVTX_RANGE("embeddings_backward");
    mark(c, "embeddings bwd");
    TRY(mb_cuda_layernorm_backward(c->d_normed, c->g.embedding_norm, c->g.embedding_norm_bias, c->scratch, c->dh,
                                   c->embedded, c->embedded_mean, c->embedded_rstd, c->w.embedding_norm, n, H, 0,
                                   c->stream, err));
    return mb_cuda_embedding_backward(c->g.tok_embeddings, c->scratch, c->scratch_bytes, c->d_normed, c->ids, n, H,
                                      cfg->vocab_size, cfg->pad_token_id, c->stream, err);
}

/* ---- data parallelism: gradient buckets reduced while the backward goes on (model/zero_plan.h) ---- */

/* Backward stage `stage` is queued on the compute stream: reduce-scatter, on the comm stream, every bucket whose
 * gradients it completes. Every rank issues the buckets in the same order (stage ascending, bucket descending). */
int reduce_finished_buckets(cuda_backend *c, int stage, mb_error *err) {
    if (c->comm == nullptr || !c->sync_armed) return 0;
    int waited = 0;
    for (int k = c->plan.bucket_count - 1; k >= 0; k--) {
        const mb_zero_bucket *bucket = &c->plan.buckets[k];
        if (bucket->ready_stage != stage || c->bucket_issued[k]) continue;
        if (!waited) {
            MB_CUDA_CHECK(err, cudaEventRecord(c->stage_events[stage], c->stream));
            MB_CUDA_CHECK(err, cudaStreamWaitEvent(c->comm_stream, c->stage_events[stage], 0));
            waited = 1;
        }
        TRY(mb_comm_reduce_scatter(c->comm, c->grads + bucket->begin, mb_zero_slice_numel(bucket, c->plan.world_size),
                                   err));
        c->bucket_issued[k] = 1;
    }
    return 0;
}

/* Issues the buckets the backward did not (none was armed, or this rank had no labelled micro-batch), in the same
 * order, and re-arms nothing: afterwards each rank's slices hold the gradient summed over all ranks. */
int finish_reduction(cuda_backend *c, mb_error *err) {
    c->sync_armed = 1;
    for (int stage = 0; stage < c->plan.stage_count; stage++) TRY(reduce_finished_buckets(c, stage, err));
    c->sync_armed = 0;
    memset(c->bucket_issued, 0, (size_t)c->plan.bucket_count);
    return 0;
}

int cuda_backward(mb_backend *b, float grad_scale, mb_error *err) {
    cuda_backend *c = impl_of(b);
    const mb_config *cfg = &b->config;
    if (!c->batch.forward_done) return mb_fail(err, "backward called without a forward");
    MB_NVTX_RANGE("backward");
    int H = cfg->hidden_size, L = cfg->num_hidden_layers;
    const bool sparse = c->batch.sparse_last; /* the final norm ran on the head's rows, d_head2 is its gradient */
    TRY(head_backward(c, cfg, c->d_normed, grad_scale, err));
    mark(c, "layernorm bwd");
    TRY(mb_cuda_layernorm_backward(c->dh, c->g.final_norm, c->g.final_norm_bias, c->scratch,
                                   sparse ? c->d_head2 : c->d_normed, layer_input(c, L), c->final_mean, c->final_rstd,
                                   c->w.final_norm, sparse ? c->batch.rows : c->batch.tokens, H, 0, c->stream, err));
    TRY(reduce_finished_buckets(c, 0, err));
    char name[64];
    for (int l = L - 1; l >= 0; l--) {
        snprintf(name, sizeof name, "layer %d backward", l);
        MB_NVTX_RANGE(name);
        TRY(mlp_block_backward(c, cfg, l, err));
        TRY(attention_block_backward(c, cfg, l, err));
        TRY(reduce_finished_buckets(c, L - l, err));
    }
    TRY(embeddings_backward(c, cfg, err));
    TRY(reduce_finished_buckets(c, L + 1, err));
    c->batch.forward_done = 0;
    /* reports asynchronous faults of this step here rather than at some later call */
    MB_CUDA_CHECK(err, cudaGetLastError());
    return 0;
}

int cuda_begin_grad_sync(mb_backend *b, mb_error *err) {
    cuda_backend *c = impl_of(b);
    if (c->comm == nullptr) return 0;
    c->sync_armed = 1;
    memset(c->bucket_issued, 0, (size_t)c->plan.bucket_count);
    return 0;
}

/* ---- parameters, gradients, optimizer ---- */

size_t arena_bytes(const mb_backend *b) { return b->table.total_numel * sizeof(float); }

/* Floats in the master / gradient arenas: the table, padded for ZeRO-1 slices. */
size_t padded_numel(const mb_backend *b) {
    const cuda_backend *c = static_cast<const cuda_backend *>(b->impl);
    return c->comm != nullptr ? c->plan.arena_numel : b->table.total_numel;
}

int copy_and_wait(cuda_backend *c, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, mb_error *err) {
    TRY(wait_for(c, c->stream, "copy", err)); /* a pageable copy must not block behind a collective */
    MB_CUDA_CHECK(err, cudaMemcpyAsync(dst, src, bytes, kind, c->stream));
    return wait_for(c, c->stream, "copy", err);
}

int cuda_zero_grads(mb_backend *b, mb_error *err) {
    cuda_backend *c = impl_of(b);
    mark(c, "zero grads");
    MB_CUDA_CHECK(err, cudaMemsetAsync(c->grads, 0, padded_numel(b) * sizeof(float), c->stream));
    return 0;
}

/* ZeRO-1: finish the reductions, Σ g² over this rank's slices, summed over ranks, square root. */
int sharded_grad_norm(cuda_backend *c, double *norm, mb_error *err) {
    TRY(finish_reduction(c, err));
    TRY(mb_cuda_grad_square_sum(c->adamw, &c->device_scalars[1], c->comm_stream, err));
    TRY(mb_comm_all_reduce_doubles(c->comm, &c->device_scalars[1], 1, err));
    TRY(mb_cuda_sqrt_in_place(&c->device_scalars[1], c->comm_stream, err));
    MB_CUDA_CHECK(err, cudaMemcpyAsync(c->dp_host, &c->device_scalars[1], sizeof(double), cudaMemcpyDeviceToHost,
                                       c->comm_stream));
    TRY(wait_for(c, c->comm_stream, "gradient reduction", err));
    TRY(join(c, c->comm_stream, c->stream, err));
    *norm = c->dp_host[0];
    return 0;
}

int cuda_grad_norm(mb_backend *b, double *norm, mb_error *err) {
    cuda_backend *c = impl_of(b);
    if (c->comm != nullptr) return sharded_grad_norm(c, norm, err);
    mark(c, "grad norm");
    TRY(mb_cuda_grad_norm(c->adamw, &c->device_scalars[1], c->stream, err));
    double value = 0.0;
    TRY(copy_and_wait(c, &value, &c->device_scalars[1], sizeof value, cudaMemcpyDeviceToHost, err));
    *norm = value;
    return 0;
}

/* ZeRO-1 step on the comm stream: moments of this rank's slices → per-tensor sums all-reduced (so the RMS is the
 * whole tensor's) → update of the slices → all-gather of the updated fp32 parameters → bf16 copy. */
int sharded_optimizer_step(mb_backend *b, cuda_backend *c, mb_stableadamw *opt, double lr, mb_error *err) {
    cudaStream_t s = c->comm_stream;
    TRY(join(c, c->stream, s, err));
    TRY(mb_cuda_adamw_moments(c->adamw, opt, s, err));
    TRY(mb_comm_all_reduce_doubles(c->comm, mb_cuda_adamw_group_sums(c->adamw), (size_t)b->table.count, err));
    TRY(mb_cuda_adamw_apply(c->adamw, opt, lr, s, err));
    for (int k = 0; k < c->plan.bucket_count; k++)
        TRY(mb_comm_all_gather(c->comm, c->master + c->plan.buckets[k].begin,
                               mb_zero_slice_numel(&c->plan.buckets[k], c->plan.world_size), err));
    TRY(mb_cuda_to_bf16(c->copy, c->master, b->table.total_numel, s, err));
    return join(c, s, c->stream, err);
}

int cuda_optimizer_step(mb_backend *b, mb_stableadamw *opt, double lr, mb_error *err) {
    cuda_backend *c = impl_of(b);
    MB_NVTX_RANGE("optimizer_step");
    if (c->comm != nullptr) return sharded_optimizer_step(b, c, opt, lr, err);
    mark(c, "optimizer");
    return mb_cuda_adamw_step(c->adamw, opt, lr, c->stream, err); /* advances opt->step */
}

int cuda_read_params(mb_backend *b, float *host, mb_error *err) {
    cuda_backend *c = impl_of(b);
    return copy_and_wait(c, host, c->master, arena_bytes(b), cudaMemcpyDeviceToHost, err);
}

int cuda_write_params(mb_backend *b, const float *host, mb_error *err) {
    cuda_backend *c = impl_of(b);
    TRY(copy_and_wait(c, c->master, host, arena_bytes(b), cudaMemcpyHostToDevice, err));
    TRY(mb_cuda_to_bf16(c->copy, c->master, b->table.total_numel, c->stream, err));
    return wait_for(c, c->stream, "parameter upload", err);
}

int cuda_read_grads(mb_backend *b, float *host, mb_error *err) {
    cuda_backend *c = impl_of(b);
    return copy_and_wait(c, host, c->grads, arena_bytes(b), cudaMemcpyDeviceToHost, err);
}

/* ZeRO-1, collective: every rank gathers the full moment (through the gradient arena, free between steps). */
int gather_moment(mb_backend *b, cuda_backend *c, const float *shard, float *host, mb_error *err) {
    TRY(join(c, c->stream, c->comm_stream, err));
    for (int k = 0; k < c->plan.bucket_count; k++) {
        const mb_zero_bucket *bucket = &c->plan.buckets[k];
        TRY(mb_comm_all_gather_into(c->comm, shard + bucket->shard_offset, c->grads + bucket->begin,
                                    mb_zero_slice_numel(bucket, c->plan.world_size), err));
    }
    TRY(wait_for(c, c->comm_stream, "gathering the optimizer state", err));
    MB_CUDA_CHECK(err, cudaMemcpyAsync(host, c->grads, arena_bytes(b), cudaMemcpyDeviceToHost, c->comm_stream));
    MB_CUDA_CHECK(err, cudaMemsetAsync(c->grads, 0, padded_numel(b) * sizeof(float), c->comm_stream));
    TRY(wait_for(c, c->comm_stream, "gathering the optimizer state", err));
    return 0;
}

/* ZeRO-1: this rank keeps its slices of a full host moment. */
int scatter_moment(mb_backend *b, cuda_backend *c, float *shard, const float *host, mb_error *err) {
    TRY(wait_for(c, c->stream, "optimizer state upload", err));
    size_t total = b->table.total_numel;
    for (int k = 0; k < c->plan.bucket_count; k++) {
        const mb_zero_bucket *bucket = &c->plan.buckets[k];
        size_t begin = mb_zero_slice_begin(bucket, c->plan.world_size, c->plan.rank);
        size_t count = mb_zero_slice_numel(bucket, c->plan.world_size);
        size_t real = begin >= total ? 0 : (begin + count <= total ? count : total - begin);
        if (real > 0)
            MB_CUDA_CHECK(err, cudaMemcpyAsync(shard + bucket->shard_offset, host + begin, real * sizeof(float),
                                               cudaMemcpyHostToDevice, c->stream));
    }
    return wait_for(c, c->stream, "optimizer state upload", err);
}

int cuda_read_optimizer_state(mb_backend *b, float *m, float *v, mb_error *err) {
    cuda_backend *c = impl_of(b);
    if (c->comm != nullptr) {
        TRY(gather_moment(b, c, c->m, m, err));
        return gather_moment(b, c, c->v, v, err);
    }
    TRY(copy_and_wait(c, m, c->m, arena_bytes(b), cudaMemcpyDeviceToHost, err));
    return copy_and_wait(c, v, c->v, arena_bytes(b), cudaMemcpyDeviceToHost, err);
}

int cuda_write_optimizer_state(mb_backend *b, const float *m, const float *v, mb_error *err) {
    cuda_backend *c = impl_of(b);
    if (c->comm != nullptr) {
        TRY(scatter_moment(b, c, c->m, m, err));
        return scatter_moment(b, c, c->v, v, err);
    }
    TRY(copy_and_wait(c, c->m, m, arena_bytes(b), cudaMemcpyHostToDevice, err));
    return copy_and_wait(c, c->v, v, arena_bytes(b), cudaMemcpyHostToDevice, err);
}

int cuda_set_rope_theta(mb_backend *b, double global_theta, double local_theta, mb_error *err) {
    if (!(global_theta > 0) || !(local_theta > 0)) return mb_fail(err, "RoPE theta must be positive");
    b->config.global_rope_theta = global_theta; /* every launch reads the theta from b->config */
    b->config.local_rope_theta = local_theta;
    return 0;
}

void cuda_memory_report(mb_backend *b, char *out, size_t size) {
    cuda_backend *c = impl_of(b);
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
        cudaGetLastError();
        free_bytes = total_bytes = 0;
    }
    size_t used = total_bytes - free_bytes;
    if (used > c->peak_used) c->peak_used = used;
    const double mib = 1024.0 * 1024.0, gib = mib * 1024.0;
    char sharding[160] = "";
    if (c->comm != nullptr)
        snprintf(sharding, sizeof sharding, "; ZeRO-1 over %d ranks: m and v sharded (%zu of %zu floats here), %d "
                 "gradient buckets", c->plan.world_size, c->plan.shard_numel, c->plan.arena_numel,
                 c->plan.bucket_count);
    snprintf(out, size,
             "cuda: state %.1f MiB (fp32 master + bf16 copy + fp32 grads + m + v%s), activations %.1f MiB for %d "
             "tokens / %d sequences / %d head rows (recompute %s; scratch %.1f MiB), pinned %.1f MiB; device %.2f of "
             "%.2f GiB in use, peak %.2f GiB",
             (double)c->state_bytes / mib, sharding, (double)c->acts_bytes / mib, c->cap.tokens, c->cap.sequences,
             c->cap.rows, mb_recompute_name((mb_recompute)c->recompute), (double)c->scratch_bytes / mib,
             (double)c->pinned_bytes / mib, (double)used / gib,
             (double)total_bytes / gib, (double)c->peak_used / gib);
}

void release_data_parallel(cuda_backend *c) {
    if (c->stage_events != nullptr)
        for (int k = 0; k < c->plan.stage_count; k++)
            if (c->stage_events[k] != nullptr) cudaEventDestroy(c->stage_events[k]);
    free(c->stage_events);
    free(c->bucket_issued);
    if (c->dp_host != nullptr) cudaFreeHost(c->dp_host);
    mb_zero_plan_free(&c->plan);
    c->stage_events = nullptr;
    c->bucket_issued = nullptr;
    c->dp_host = nullptr;
}

void cuda_destroy(mb_backend *b) {
    cuda_backend *c = impl_of(b);
    if (c != nullptr) {
        if (c->stream != nullptr && c->comm == nullptr) cudaStreamSynchronize(c->stream);
        release_activations(c);
        mb_cuda_adamw_destroy(c->adamw);
        mb_cuda_matmul_destroy(c->matmul);
        if (c->state != nullptr) cudaFree(c->state);
        release_data_parallel(c);
        if (c->join_event != nullptr) cudaEventDestroy(c->join_event);
        if (c->prof != nullptr) {
            for (int k = 0; k < kMaxMarks; k++)
                if (c->prof->events[k] != nullptr) cudaEventDestroy(c->prof->events[k]);
            free(c->prof);
        }
        if (c->stream != nullptr) cudaStreamDestroy(c->stream);
        cudaGetLastError(); /* nothing to report from a destructor */
        free(c);
    }
    mb_param_table_free(&b->table);
    free(b);
}

int cuda_set_recompute(mb_backend *b, mb_recompute level, mb_error *err) {
    cuda_backend *c = impl_of(b);
    if ((int)level == c->recompute) return 0;
    c->recompute = (int)level;
    if (c->acts == nullptr) return 0;
    return carve_budget(c, &b->config, c->cap, err); /* the next forward starts over anyway */
}

int cuda_reserve(mb_backend *b, int max_tokens, int max_sequences, int max_head_rows, mb_error *err) {
    return mb_backend_cuda_reserve(b, max_tokens, max_sequences, max_head_rows, err);
}

int cuda_device_name(mb_backend *b, char *out, size_t size) {
    (void)b;
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return -1;
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return -1;
    snprintf(out, size, "%s", prop.name);
    return 0;
}

int cuda_attach_dist(mb_backend *b, mb_dist *dist, mb_error *err);

/* The profile so far (MB_PROFILE=1), one line per op family, largest first; reset clears it. */
int cuda_profile(mb_backend *b, int reset, char *out, size_t size) {
    profiler *p = impl_of(b)->prof;
    if (p == nullptr) return -1;
    if (reset) {
        p->label_count = 0;
        p->marks = 0;
        memset(p->milliseconds, 0, sizeof p->milliseconds);
        memset(p->calls, 0, sizeof p->calls);
        return 0;
    }
    mb_error err = {{0}};
    if (wait_for(impl_of(b), impl_of(b)->stream, "profile", &err) != 0) return -1; /* collects the last marks */
    double total = 0.0;
    int order[kMaxLabels];
    for (int k = 0; k < p->label_count; k++) {
        total += p->milliseconds[k];
        order[k] = k;
    }
    for (int i = 1; i < p->label_count; i++)
        for (int j = i; j > 0 && p->milliseconds[order[j]] > p->milliseconds[order[j - 1]]; j--) {
            int swap = order[j];
            order[j] = order[j - 1];
            order[j - 1] = swap;
        }
    size_t used = 0;
    out[0] = '\0';
    for (int i = 0; i < p->label_count && used + 1 < size; i++) {
        int k = order[i];
        if (strcmp(p->labels[k], "(end of marks)") == 0) continue;
        int written = snprintf(out + used, size - used, "%-46s %10.3f ms %6.1f %% %8ld calls\n", p->labels[k],
                               p->milliseconds[k], total > 0 ? 100.0 * p->milliseconds[k] / total : 0.0, p->calls[k]);
        if (written < 0) break;
        used += (size_t)written;
    }
    int tuned = 0, changed = 0;
    mb_cuda_matmul_tuning_counts(impl_of(b)->matmul, &tuned, &changed);
    if (used + 1 < size)
        snprintf(out + used, size - used, "GEMM shapes tuned: %d, of which %d run another cuBLASLt candidate than its "
                 "first choice (bit-identical; MB_GEMM_TUNE=0 turns tuning off)\n", tuned, changed);
    return 0;
}

/* Everything queued on the compute stream is complete (the optimizer step is the last work of a step there). */
int cuda_synchronize(mb_backend *b, mb_error *err) {
    return wait_for(impl_of(b), impl_of(b)->stream, "synchronize", err);
}

const mb_backend_ops cuda_ops = {
    "cuda",
    cuda_destroy,
    cuda_forward,
    cuda_backward,
    cuda_zero_grads,
    cuda_grad_norm,
    cuda_optimizer_step,
    cuda_read_params,
    cuda_write_params,
    cuda_read_grads,
    cuda_read_optimizer_state,
    cuda_write_optimizer_state,
    cuda_set_rope_theta,
    cuda_memory_report,
    cuda_reserve,
    cuda_device_name,
    cuda_attach_dist,
    cuda_begin_grad_sync,
    cuda_profile,
    cuda_set_recompute,
    cuda_synchronize,
};

/* The state arena: master | grads | m | v (fp32) | bf16 copy | two device doubles. On one GPU every part has the
 * table's layout (N floats); with ZeRO-1 master, grads and copy are padded to the plan's arena and m, v hold only
 * this rank's shard. */
int allocate_state(mb_backend *b, cuda_backend *c, size_t params_numel, size_t moments_numel, mb_error *err) {
    carver measure{nullptr, 0};
    for (int k = 0; k < 2; k++) measure.take<float>(params_numel);
    for (int k = 0; k < 2; k++) measure.take<float>(moments_numel);
    measure.take<mb_bf16>(params_numel);
    measure.take<double>(2);
    cudaError_t status = cudaMalloc(&c->state, measure.used);
    if (status != cudaSuccess) {
        c->state = nullptr;
        return mb_fail(err, "cuda backend: cannot allocate %.1f MiB for %zu parameters (weights, gradients, "
                            "optimizer state): %s",
                       (double)measure.used / (1 << 20), b->table.total_numel, cudaGetErrorString(status));
    }
    c->state_bytes = measure.used;
    carver real{static_cast<char *>(c->state), 0};
    c->master = real.take<float>(params_numel);
    c->grads = real.take<float>(params_numel);
    c->m = real.take<float>(moments_numel);
    c->v = real.take<float>(moments_numel);
    c->copy = real.take<mb_bf16>(params_numel);
    c->device_scalars = real.take<double>(2);
    MB_CUDA_CHECK(err, cudaMemsetAsync(c->state, 0, c->state_bytes, c->stream));
    MB_CUDA_CHECK(err, cudaStreamSynchronize(c->stream));
    mb_weights_bind(&c->w, &b->table, &b->config, c->master);
    mb_weights_bind(&c->g, &b->table, &b->config, c->grads);
    return 0;
}

int create_optimizer(mb_backend *b, cuda_backend *c, mb_error *err) {
    int count = b->table.count;
    mb_cuda_adamw_tensor *tensors = static_cast<mb_cuda_adamw_tensor *>(calloc((size_t)count, sizeof *tensors));
    if (tensors == nullptr) return mb_fail(err, "cuda backend: out of host memory");
    for (int i = 0; i < count; i++) {
        const mb_param_info *p = &b->table.params[i];
        tensors[i] = mb_cuda_adamw_tensor{c->master + p->offset, c->grads + p->offset, c->m + p->offset,
                                          c->v + p->offset,      c->copy + p->offset,  p->numel,
                                          p->decays != 0,        i};
    }
    int rc = mb_cuda_adamw_create(&c->adamw, tensors, count, err);
    free(tensors);
    return rc;
}

/* ZeRO-1: the optimizer sees this rank's pieces of every tensor; the bf16 copy is refreshed after the gather. */
int create_sharded_optimizer(mb_backend *b, cuda_backend *c, mb_error *err) {
    const mb_zero_plan *plan = &c->plan;
    int count = b->table.count;
    mb_cuda_adamw_tensor *pieces =
        static_cast<mb_cuda_adamw_tensor *>(calloc((size_t)(plan->piece_count ? plan->piece_count : 1), sizeof *pieces));
    mb_cuda_adamw_group *groups = static_cast<mb_cuda_adamw_group *>(calloc((size_t)count, sizeof *groups));
    int rc = pieces && groups ? 0 : mb_fail(err, "cuda backend: out of host memory");
    for (int i = 0; rc == 0 && i < count; i++)
        groups[i] = mb_cuda_adamw_group{b->table.params[i].numel, b->table.params[i].decays != 0};
    for (int k = 0; rc == 0 && k < plan->piece_count; k++) {
        const mb_zero_piece *piece = &plan->pieces[k];
        pieces[k] = mb_cuda_adamw_tensor{c->master + piece->arena_offset, c->grads + piece->arena_offset,
                                         c->m + piece->shard_offset,      c->v + piece->shard_offset,
                                         nullptr,                         piece->numel,
                                         groups[piece->tensor].decay,     piece->tensor};
    }
    if (rc == 0) rc = mb_cuda_adamw_create_grouped(&c->adamw, pieces, plan->piece_count, groups, count, err);
    free(pieces);
    free(groups);
    return rc;
}

/* Target gradient bucket: 16 Mi floats (64 MiB), or MB_ZERO_BUCKET_MIB. */
size_t bucket_numel_target() {
    const char *text = getenv("MB_ZERO_BUCKET_MIB");
    long mib = text != nullptr ? strtol(text, nullptr, 10) : 64;
    if (mib < 1) mib = 64;
    return (size_t)mib * 1024 * 1024 / sizeof(float);
}

int allocate_data_parallel(cuda_backend *c, mb_error *err) {
    int stages = c->plan.stage_count;
    c->stage_events = static_cast<cudaEvent_t *>(calloc((size_t)stages, sizeof(cudaEvent_t)));
    c->bucket_issued = static_cast<char *>(calloc((size_t)c->plan.bucket_count, 1));
    if (c->stage_events == nullptr || c->bucket_issued == nullptr) return mb_fail(err, "out of host memory");
    for (int k = 0; k < stages; k++)
        MB_CUDA_CHECK(err, cudaEventCreateWithFlags(&c->stage_events[k], cudaEventDisableTiming));
    MB_CUDA_CHECK(err, cudaMallocHost(&c->dp_host, 2 * sizeof(double)));
    return 0;
}

int check_config(const mb_config *cfg, mb_error *err) {
    int d = cfg->head_dim;
    if (d != 32 && d != 64 && d != 128)
        return mb_fail(err, "cuda backend: head_dim %d is not supported by the attention kernels (32, 64 or 128)", d);
    if (cfg->head == MB_HEAD_SEQUENCE_CLASSIFIER && cfg->num_labels < 1)
        return mb_fail(err, "cuda backend: num_labels must be positive (got %d)", cfg->num_labels);
    return 0;
}

int build(mb_backend *b, cuda_backend *c, mb_error *err) {
    TRY(check_config(&b->config, err));
    mb_error device_err = {{0}};
    if (mb_cuda_device_count(&device_err) == 0)
        return mb_fail(err, "cuda backend: no usable GPU (%s)", device_err.message);
    TRY(mb_param_table_build(&b->table, &b->config, err));
    MB_CUDA_CHECK(err, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    MB_CUDA_CHECK(err, cudaEventCreateWithFlags(&c->join_event, cudaEventDisableTiming));
    const char *deterministic = getenv("MB_DETERMINISTIC");
    c->deterministic = deterministic != nullptr && strcmp(deterministic, "1") == 0;
    const char *chunk = getenv("MB_DECODER_CHUNK_ROWS"); /* tests: small chunks on small batches */
    c->decoder_chunk_rows = chunk != nullptr && atoi(chunk) > 0 ? atoi(chunk) : kDecoderChunkRows;
    const char *multiple = getenv("MB_HEAD_ROW_MULTIPLE");
    c->head_row_multiple = multiple != nullptr && atoi(multiple) > 0 ? atoi(multiple) : kHeadRowMultiple;
    const char *sparse = getenv("MB_SPARSE_LAST_LAYER"); /* 0, projection, or (default) the attention too */
    c->sparse_last_layer = sparse == nullptr                    ? kSparseAttention
                           : strcmp(sparse, "0") == 0           ? kSparseOff
                           : strcmp(sparse, "projection") == 0 ? kSparseProjection
                                                                : kSparseAttention;
    const char *profile = getenv("MB_PROFILE");
    if (profile != nullptr && strcmp(profile, "1") == 0) {
        c->prof = static_cast<profiler *>(calloc(1, sizeof(profiler)));
        if (c->prof == nullptr) return mb_fail(err, "out of host memory");
        for (int k = 0; k < kMaxMarks; k++) MB_CUDA_CHECK(err, cudaEventCreate(&c->prof->events[k]));
    }
    TRY(mb_cuda_matmul_create(&c->matmul, err));
    TRY(allocate_state(b, c, b->table.total_numel, b->table.total_numel, err));
    TRY(create_optimizer(b, c, err));
    return record_memory(c, err);
}

/* Switches a fresh backend to ZeRO-1 over the communicator's ranks (before write_params: the state is re-carved). */
int cuda_attach_dist(mb_backend *b, mb_dist *dist, mb_error *err) {
    cuda_backend *c = impl_of(b);
    mb_comm *comm = mb_comm_of(dist);
    if (comm == nullptr) return mb_fail(err, "cuda backend: data parallelism needs an NCCL group (mb_dist_create_nccl)");
    if (c->comm != nullptr) return mb_fail(err, "cuda backend: already attached to a data-parallel group");
    TRY(mb_zero_plan_build(&c->plan, &b->table, b->config.num_hidden_layers, mb_comm_world_size(comm),
                           mb_comm_rank(comm), bucket_numel_target(), err));
    MB_CUDA_CHECK(err, cudaStreamSynchronize(c->stream));
    mb_cuda_adamw_destroy(c->adamw);
    c->adamw = nullptr;
    MB_CUDA_CHECK(err, cudaFree(c->state));
    c->state = nullptr;
    c->comm = comm;
    c->comm_stream = mb_comm_stream(comm);
    TRY(allocate_data_parallel(c, err));
    TRY(allocate_state(b, c, c->plan.arena_numel, c->plan.shard_numel, err));
    TRY(create_sharded_optimizer(b, c, err));
    return record_memory(c, err);
}

}  // namespace

extern "C" int mb_backend_create_cuda(mb_backend **out, const mb_config *config, mb_error *err) {
    mb_backend *b = static_cast<mb_backend *>(calloc(1, sizeof *b));
    cuda_backend *c = static_cast<cuda_backend *>(calloc(1, sizeof *c));
    if (b == nullptr || c == nullptr) {
        free(b);
        free(c);
        return mb_fail(err, "out of memory");
    }
    b->ops = &cuda_ops;
    b->config = *config;
    b->impl = c;
    if (build(b, c, err) != 0) {
        cuda_destroy(b);
        return -1;
    }
    *out = b;
    return 0;
}

extern "C" int mb_backend_cuda_reserve(mb_backend *b, int max_tokens, int max_sequences, int max_head_rows,
                                       mb_error *err) {
    if (b == nullptr || b->ops != &cuda_ops) return mb_fail(err, "mb_backend_cuda_reserve: not a CUDA backend");
    if (max_tokens < 1 || max_sequences < 1 || max_head_rows < 0 || max_sequences > max_tokens)
        return mb_fail(err, "mb_backend_cuda_reserve: bad budget %d tokens, %d sequences, %d head rows", max_tokens,
                       max_sequences, max_head_rows);
    return ensure_budget(impl_of(b), &b->config, budget{max_tokens, max_sequences, max_head_rows}, err);
}
