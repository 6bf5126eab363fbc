/* The CUDA op kernels, callable from C. Each launcher mirrors the CPU reference op of the same name in src/cpu/ops.h
 * (same argument order and meaning; the math is stated at the top of each cuda/<family>.cu and in the CPU file) and
 * is tested against it in tests/gpu/test_gpu_ops.c.
 *
 * Conventions
 *   - Every pointer is DEVICE memory unless the comment says host. Rows are tokens, row-major, as on the CPU.
 *   - Precision: activations and GEMM operands are bf16 (mb_bf16 holds the raw bits); LayerNorm statistics, softmax,
 *     lse, losses and all reductions are fp32 (double where a sum must stay exact over a whole batch); parameter
 *     gradients, master weights and optimizer state are fp32. LayerNorm weights are read in fp32 (the master copy),
 *     Linear weights and biases in bf16 (the bf16 copy the optimizer refreshes).
 *   - Backward launchers ACCUMULATE (+=) into fp32 parameter gradients and WRITE input gradients unless their
 *     `accumulate_dx` flag says to add, exactly as the CPU ops.
 *   - Work is queued on `stream` and nothing synchronizes with the host: there are no host round trips. A launcher
 *     returns 0, or -1 with a message in err for bad arguments or a failed launch (an asynchronous fault inside a
 *     kernel shows up at a later check or synchronization).
 *   - Deterministic: every reduction runs in an order fixed by the shapes (no floating-point atomics), so two runs
 *     on the same GPU model give bit-identical results (tested for the embedding and attention backward). The one
 *     exception is mb_cuda_attention_backward with deterministic = 0 (fp32 atomics into dQ), chosen by the caller.
 *   - Launchers that need temporary device memory take a `scratch`/`workspace` pointer sized by the matching
 *     *_bytes function, so the training loop allocates nothing. */
#ifndef MB_CUDA_OPS_H
#define MB_CUDA_OPS_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* inside extern "C": these C headers have no guards of their own */
#include "common/error.h"
#include "model/config.h"
#include "train/stableadamw.h"

/* bf16 as raw bits (the layout of __nv_bfloat16). */
typedef uint16_t mb_bf16;

/* Host conversions: round to nearest even, NaN stays NaN. */
static inline mb_bf16 mb_bf16_from_float(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (mb_bf16)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (mb_bf16)(bits >> 16);
}

static inline float mb_bf16_to_float(mb_bf16 value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* ---- matmul.cu: Linear layers through cuBLASLt (bf16 operands, fp32 accumulation) ---- */

/* Holds the cuBLASLt handle, a 32 MiB workspace and a cache of chosen algorithms. One per device and stream. */
typedef struct mb_cuda_matmul mb_cuda_matmul;
int mb_cuda_matmul_create(mb_cuda_matmul **matmul, mb_error *err);
void mb_cuda_matmul_destroy(mb_cuda_matmul *matmul);
/* For tests: on != 0 sends every GEMM through the simple fallback kernel that also serves shapes cuBLASLt has no
 * algorithm for, so both paths are checked against the CPU. */
void mb_cuda_matmul_force_fallback(mb_cuda_matmul *matmul, int on);
/* A GEMM shape is tuned on this sighting (call), once: shapes that recur are, one-off token counts of packing are
 * not. `modernbert bench train` warms up with this many passes over its timed batches (eval/bench.c checks it). */
#define MB_CUDA_GEMM_TUNE_SIGHTING 3
/* How many of cuBLASLt's candidates tuning compares on a shape's MB_CUDA_GEMM_TUNE_SIGHTING-th sighting (< 2: none;
 * the default is 8 or MB_GEMM_TUNE). Tuning keeps only candidates whose output is bit-identical to the heuristic's
 * first choice. */
void mb_cuda_matmul_set_tuning(mb_cuda_matmul *matmul, int candidates);
/* Shapes tuned so far, and how many of them run a candidate other than the heuristic's first choice. */
void mb_cuda_matmul_tuning_counts(const mb_cuda_matmul *matmul, int *tuned, int *changed);

/* y[n, out] = x[n, in] · W[out, in]^T (+ bias[out]) (+ residual[n, out]). bias and residual may be NULL;
 * residual may equal y (adds the product into y: the residual stream update). */
int mb_cuda_linear_forward(mb_cuda_matmul *matmul, mb_bf16 *y, const mb_bf16 *x, const mb_bf16 *weight,
                           const mb_bf16 *bias, const mb_bf16 *residual, int n, int in, int out, cudaStream_t stream,
                           mb_error *err);
/* dx[n, in] = dy · W (written, or added when accumulate_dx); dW[out, in] += dy^T · x (fp32);
 * db[out] += Σ_rows dy (fp32, fixed order). dx, dweight, dbias may each be NULL. scratch: at least
 * mb_cuda_linear_backward_scratch_bytes(n, out) bytes (used only for dbias). */
size_t mb_cuda_linear_backward_scratch_bytes(int n, int out);
int mb_cuda_linear_backward(mb_cuda_matmul *matmul, mb_bf16 *dx, float *dweight, float *dbias, void *scratch,
                            const mb_bf16 *dy, const mb_bf16 *x, const mb_bf16 *weight, int n, int in, int out,
                            int accumulate_dx, cudaStream_t stream, mb_error *err);

/* ---- layernorm.cu ---- */

/* y = (x − μ)·rstd ⊙ w (+ b), statistics in fp32, mean/rstd saved per row. bias may be NULL. */
int mb_cuda_layernorm_forward(mb_bf16 *y, float *mean, float *rstd, const mb_bf16 *x, const float *weight,
                              const float *bias, int n, int h, float eps, cudaStream_t stream, mb_error *err);
/* dx written (or added when accumulate_dx; dx may alias dy when not accumulating); dw += Σ dy ⊙ x̂, db += Σ dy.
 * dx, dweight, dbias may each be NULL. scratch: mb_cuda_layernorm_backward_scratch_bytes(n, h) bytes. */
size_t mb_cuda_layernorm_backward_scratch_bytes(int n, int h);
int mb_cuda_layernorm_backward(mb_bf16 *dx, float *dweight, float *dbias, void *scratch, const mb_bf16 *dy,
                               const mb_bf16 *x, const float *mean, const float *rstd, const float *weight, int n,
                               int h, int accumulate_dx, cudaStream_t stream, mb_error *err);

/* ---- embedding.cu ---- */

/* out[i, :] = table[ids[i], :]. Also gathers rows of any [rows, h] matrix (e.g. the labelled tokens of the MLM head). */
int mb_cuda_embedding_forward(mb_bf16 *out, const int32_t *ids, const mb_bf16 *table, int n, int h,
                              cudaStream_t stream, mb_error *err);
/* out[i, :] = in[rows[i], 0:h] for rows of a strided matrix (row r at in + r·in_stride, in_stride >= h elements; the
 * Q block of qkv: in_stride 3H). mb_cuda_embedding_forward is this with in_stride = h. */
int mb_cuda_gather_rows(mb_bf16 *out, const int32_t *rows, const mb_bf16 *in, size_t in_stride, int n, int h,
                        cudaStream_t stream, mb_error *err);
/* dtable[ids[i], :] += dout[i, :] for every token whose id is not pad_id (-1: skip nothing), ids in [0, vocab).
 * Deterministic: tokens are stably sorted by id; each (id, column) is summed by one owner in a fixed order (runs of
 * up to 16 tokens in token order, as the CPU; longer runs by row lanes added in a fixed tree).
 * scratch: the byte count from mb_cuda_embedding_backward_scratch_bytes (asks the device, hence the error). */
int mb_cuda_embedding_backward_scratch_bytes(size_t *bytes, int n, int vocab, mb_error *err);
int mb_cuda_embedding_backward(float *dtable, void *scratch, size_t scratch_bytes, const mb_bf16 *dout,
                               const int32_t *ids, int n, int h, int vocab, int pad_id, cudaStream_t stream,
                               mb_error *err);

/* ---- rope.cu ---- */

/* positions[i] = i − cu_seqlens[s] for the sequence s holding token i (n = cu_seqlens[num_seqs]). */
int mb_cuda_positions(int32_t *positions, const int32_t *cu_seqlens, int num_seqs, int n, cudaStream_t stream,
                      mb_error *err);
/* Rotate-half RoPE on the Q and K blocks of qkv [n, 3·heads·head_dim], in place; direction +1 forward, −1 for the
 * backward of dQ and dK. */
int mb_cuda_rope(mb_bf16 *qkv, const int32_t *positions, int n, int heads, int head_dim, double theta, int direction,
                 cudaStream_t stream, mb_error *err);
/* table [n][head_dim/2] of (cos, sin) float pairs: the angles mb_cuda_rope uses for each token and frequency (the
 * same float expressions), for kernels that apply RoPE's backward in their own stores
 * (mb_cuda_attention_backward_rope, which needs it 16-byte aligned; this call needs 8). */
int mb_cuda_rope_table(float *table, const int32_t *positions, int n, int head_dim, double theta,
                       cudaStream_t stream, mb_error *err);

/* ---- attention.cu: packed variable-length attention, tensor cores (mma.sync bf16, fp32 softmax) ----
 * qkv [n, 3H] (Q | K | V, heads contiguous, H = heads·head_dim), out [n, H], lse [n, heads] (natural log).
 * window < 0: each query sees its whole sequence; else keys with |i − j| <= window. head_dim 32, 64 or 128.
 * cu_seqlens has num_seqs + 1 entries on the device, n = cu_seqlens[num_seqs], sequences of any length >= 1.
 * workspace: mb_cuda_attention_workspace_bytes(n, num_seqs, heads, head_dim) bytes, shared by forward and backward
 * (not preserved between calls; the backward's fp32 dQ accumulator [n, heads·head_dim] is most of it, plus 10 MB of
 * the sm_90a global backward's tail split). */
size_t mb_cuda_attention_workspace_bytes(int n, int num_seqs, int heads, int head_dim);
/* The tail split that the last sm_90a global backward planned in this workspace (cuda/attention_wgmma_bwd.h): its
 * first split work item and its pieces per item (1: none). Synchronizes; for tests and benchmarks. */
int mb_cuda_attention_backward_split(const void *workspace, int n, int num_seqs, int heads, int *first_item,
                                     int *pieces, mb_error *err);
int mb_cuda_attention_forward(mb_bf16 *out, float *lse, void *workspace, const mb_bf16 *qkv, const int32_t *cu_seqlens,
                              int num_seqs, int n, int heads, int head_dim, int window, cudaStream_t stream,
                              mb_error *err);
/* dqkv [n, 3H] is written completely (no memset needed); dqkv and dout 16-byte aligned.
 * deterministic = 0 (training default): FlashAttention-2 scheme, dQ summed with fp32 atomics (bits may differ
 * between runs, by rounding only); deterministic = 1: no atomics (dK/dV and dQ by separate passes that each own their
 * outputs; 7 tile products instead of 5), bit-identical between runs. */
int mb_cuda_attention_backward(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout, const mb_bf16 *out,
                               const float *lse, const mb_bf16 *qkv, const int32_t *cu_seqlens, int num_seqs, int n,
                               int heads, int head_dim, int window, int deterministic, cudaStream_t stream,
                               mb_error *err);
/* mb_cuda_attention_backward followed by RoPE's backward on dQ and dK (mb_cuda_rope with direction −1), done in the
 * kernels' own stores from fp32 (no pass over dqkv; rounded to bf16 once instead of twice) with the angles of
 * rope_table (mb_cuda_rope_table for the layer's theta). Only where mb_cuda_attention_backward_fuses_rope says so:
 * the band kernels (local layers) and the sm_90a wgmma backward (global layers); elsewhere it fails. */
int mb_cuda_attention_backward_fuses_rope(int head_dim, int window, int deterministic);
int mb_cuda_attention_backward_rope(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout, const mb_bf16 *out,
                                    const float *lse, const mb_bf16 *qkv, const int32_t *cu_seqlens, int num_seqs,
                                    int n, int heads, int head_dim, int window, int deterministic,
                                    const float *rope_table, cudaStream_t stream, mb_error *err);
/* Attention for a subset of the query rows (the last layer on the head's rows): the queries of sequence s are rows
 * [cu_rows[s], cu_rows[s + 1]) of q_rows [rows, H] (gathered from qkv's Q block after RoPE; a sequence may have none),
 * its keys and values rows [cu_seqlens[s], cu_seqlens[s + 1]) of qkv [n, 3H]. out_rows [rows, H], lse_rows
 * [rows, heads] are indexed like q_rows. The backward takes dout_rows [rows, H], writes dqkv [n, 3H] completely: dQ
 * of row r into token row_tokens[r] (zeros for the other tokens), dK and dV of every key, all with RoPE's backward by
 * rope_table (as mb_cuda_attention_backward_rope). The same workspace as the whole-batch calls. Only where
 * mb_cuda_attention_rows_supported says so (global layers, head_dim 64, sm_90a, deterministic 0); elsewhere they fail.
 */
int mb_cuda_attention_rows_supported(int head_dim, int window, int deterministic);
int mb_cuda_attention_forward_rows(mb_bf16 *out_rows, float *lse_rows, void *workspace, const mb_bf16 *q_rows,
                                   const mb_bf16 *qkv, const int32_t *cu_seqlens, const int32_t *cu_rows, int num_seqs,
                                   int n, int rows, int heads, int head_dim, int window, cudaStream_t stream,
                                   mb_error *err);
int mb_cuda_attention_backward_rows(mb_bf16 *dqkv, void *workspace, const mb_bf16 *dout_rows, const mb_bf16 *out_rows,
                                    const float *lse_rows, const mb_bf16 *q_rows, const mb_bf16 *qkv,
                                    const int32_t *cu_seqlens, const int32_t *cu_rows, const int32_t *row_tokens,
                                    int num_seqs, int n, int rows, int heads, int head_dim, int window,
                                    const float *rope_table, cudaStream_t stream, mb_error *err);
/* Device self-tests of the sm_90a attention kernels (attention_wgmma_fwd.cu, attention_wgmma_bwd.cu): one tile
 * product through their shared-memory layouts and the whole kernel on a small packed batch, against host references;
 * a readable summary goes into report. Forward: 0 pass, 1 skipped (no sm_90a), -1 failed. Backward: 0 pass, 1
 * mismatch, 2 skipped, -1 CUDA error. */
int mb_cuda_attention_wgmma_fwd_selftest(char *report, size_t size);
int mb_cuda_attention_wgmma_backward_selftest(char *report, size_t size);

/* ---- activation.cu ---- */

int mb_cuda_activation_forward(mb_bf16 *y, const mb_bf16 *x, size_t count, mb_activation activation,
                               cudaStream_t stream, mb_error *err);
int mb_cuda_activation_backward(mb_bf16 *dx, const mb_bf16 *dy, const mb_bf16 *x, size_t count,
                                mb_activation activation, cudaStream_t stream, mb_error *err);
/* GLU: u = [a | g] per row (2·inner columns), y = act(a) ⊙ g; the backward writes du in the same [a | g] layout
 * (du may alias u). */
int mb_cuda_glu_forward(mb_bf16 *y, const mb_bf16 *u, int n, int inner, mb_activation activation, cudaStream_t stream,
                        mb_error *err);
int mb_cuda_glu_backward(mb_bf16 *du, const mb_bf16 *dy, const mb_bf16 *u, int n, int inner, mb_activation activation,
                         cudaStream_t stream, mb_error *err);

/* ---- loss.cu ---- */

/* Fused softmax cross-entropy over bf16 logits [rows, classes] (fp32 inside, one block per row, nothing fp32 of the
 * whole logits is stored): row_loss[r] = logsumexp(z_r) − z_r[t_r] (0 for a negative target such as -100, which is
 * ignored; a target >= classes is treated the same rather than read out of bounds); row_lse (may be NULL) keeps
 * logsumexp(z_r) (0 for ignored rows) for mb_cuda_cross_entropy_backward;
 * when write_dlogits, the logits are replaced in place by (softmax(z_r) − onehot(t_r))·grad_scale (zeros for an
 * ignored row). */
int mb_cuda_cross_entropy(mb_bf16 *logits_to_dlogits, float *row_loss, float *row_lse, const int32_t *targets,
                          int rows, int classes, float grad_scale, int write_dlogits, cudaStream_t stream,
                          mb_error *err);
/* The gradient alone from the forward's row_lse: one read and one write of the logits, the same values as
 * mb_cuda_cross_entropy with write_dlogits. */
int mb_cuda_cross_entropy_backward(mb_bf16 *logits_to_dlogits, const float *row_lse, const int32_t *targets, int rows,
                                   int classes, float grad_scale, cudaStream_t stream, mb_error *err);
/* mb_cuda_cross_entropy_backward, and dbias[c] += Σ_r of the written (bf16) gradient in the same pass: the decoder
 * bias's gradient without reading the gradient back (column sums in a fixed order, bit-reproducible). scratch: at
 * least mb_cuda_cross_entropy_backward_bias_scratch_bytes(rows, classes) bytes, which is no more than
 * mb_cuda_linear_backward_scratch_bytes(rows, classes). */
size_t mb_cuda_cross_entropy_backward_bias_scratch_bytes(int rows, int classes);
int mb_cuda_cross_entropy_backward_bias(mb_bf16 *logits_to_dlogits, float *dbias, void *scratch, const float *row_lse,
                                        const int32_t *targets, int rows, int classes, float grad_scale,
                                        cudaStream_t stream, mb_error *err);
/* row_loss[r] = (p_r − t_r)²; dpredictions (may be NULL, may alias predictions) = 2(p − t)·grad_scale. */
int mb_cuda_mse(mb_bf16 *dpredictions, float *row_loss, const mb_bf16 *predictions, const float *targets, int rows,
                float grad_scale, cudaStream_t stream, mb_error *err);
/* *total (one device double) = Σ values in a fixed order (one block): the loss sum of the batch. */
int mb_cuda_sum(double *total, const float *values, int count, cudaStream_t stream, mb_error *err);

/* ---- optimizer.cu: StableAdamW (spec §5.3, train/stableadamw.h) over many tensors at once ---- */

typedef struct mb_cuda_adamw_tensor {
    float *param;        /* fp32 master weights */
    const float *grad;   /* fp32 gradient (not modified) */
    float *m, *v;        /* fp32 moments, zero before step 1 */
    mb_bf16 *param_bf16; /* refreshed bf16 copy for the GEMMs (round to nearest); may be NULL */
    size_t numel;
    int decay;           /* apply weight decay (mb_param_decays) */
    int group;           /* mb_cuda_adamw_create_grouped only: the tensor (group) this piece belongs to */
} mb_cuda_adamw_tensor;

/* A whole parameter tensor whose pieces may live on several ranks (ZeRO-1): its full size sets the RMS's mean. */
typedef struct mb_cuda_adamw_group {
    size_t numel;
    int decay;
} mb_cuda_adamw_group;

/* Copies the tensor table (host array of device pointers) to the device once and allocates the per-chunk partial
 * sums; the pointers must stay valid while the optimizer lives. */
typedef struct mb_cuda_adamw mb_cuda_adamw;
int mb_cuda_adamw_create(mb_cuda_adamw **adamw, const mb_cuda_adamw_tensor *tensors, int count, mb_error *err);
/* ZeRO-1: `count` pieces (may be 0) of `group_count` tensors; tensors[i].group names the piece's tensor and the pieces
 * of one tensor are consecutive. The RMS of a tensor needs the sum over every rank's pieces: call
 * mb_cuda_adamw_moments, sum mb_cuda_adamw_group_sums over ranks, then mb_cuda_adamw_apply. */
int mb_cuda_adamw_create_grouped(mb_cuda_adamw **adamw, const mb_cuda_adamw_tensor *tensors, int count,
                                 const mb_cuda_adamw_group *groups, int group_count, mb_error *err);
/* Stage 1-2 of step t = opt->step + 1: m, v and the per-group Σ g²/max(v, ε²) of this rank's pieces. */
int mb_cuda_adamw_moments(mb_cuda_adamw *adamw, const mb_stableadamw *opt, cudaStream_t stream, mb_error *err);
/* Device array [group_count] written by mb_cuda_adamw_moments (the data-parallel caller all-reduces it in place). */
double *mb_cuda_adamw_group_sums(mb_cuda_adamw *adamw);
/* Stage 3-4: RMS, η, decay and the parameter update from the group sums; advances opt->step. */
int mb_cuda_adamw_apply(mb_cuda_adamw *adamw, mb_stableadamw *opt, double lr, cudaStream_t stream, mb_error *err);
void mb_cuda_adamw_destroy(mb_cuda_adamw *adamw);
/* One step t = ++opt->step with learning rate lr, hyperparameters from *opt (host struct of train/stableadamw.h),
 * same operation order as mb_stableadamw_step. Per-tensor RMS and η are computed on the device (no host round trip).
 * Gradients must be finite (check mb_cuda_grad_norm first). */
int mb_cuda_adamw_step(mb_cuda_adamw *adamw, mb_stableadamw *opt, double lr, cudaStream_t stream, mb_error *err);
/* Device array [count] of the last step's per-tensor RMS (> 1: that tensor's update was clipped). */
const double *mb_cuda_adamw_rms(const mb_cuda_adamw *adamw);
/* *norm (one device double) = sqrt(Σ g²) over all tensors' gradients, summed in a fixed order. */
int mb_cuda_grad_norm(mb_cuda_adamw *adamw, double *norm, cudaStream_t stream, mb_error *err);
/* *sum (device double) = Σ g² over this optimizer's tensors (pieces), before the data-parallel all-reduce; then
 * mb_cuda_sqrt_in_place turns the reduced sum into the norm. */
int mb_cuda_grad_square_sum(mb_cuda_adamw *adamw, double *sum, cudaStream_t stream, mb_error *err);
int mb_cuda_sqrt_in_place(double *value, cudaStream_t stream, mb_error *err);
/* dst = bf16(src), round to nearest even (e.g. the first bf16 copy of freshly loaded master weights). */
int mb_cuda_to_bf16(mb_bf16 *dst, const float *src, size_t count, cudaStream_t stream, mb_error *err);

#ifdef __cplusplus
}
#endif

#endif
