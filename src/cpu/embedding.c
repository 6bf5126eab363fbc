/* Token embedding.
 *
 * forward:  out[i, :] = table[ids[i], :]
 * backward: dtable[ids[i], :] += dout[i, :] for every token whose id is not pad_id (nn.Embedding(padding_idx) never
 *           accumulates into the pad row). Tokens are visited in order inside each column block, so repeated ids sum
 *           in a fixed order whatever the thread count. */
#include <string.h>

#include "cpu/ops.h"

void mb_cpu_embedding_forward(float *out, const int32_t *ids, const float *table, int n, int h) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) memcpy(out + (size_t)i * h, table + (size_t)ids[i] * h, (size_t)h * sizeof(float));
}

void mb_cpu_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int n, int h, int pad_id) {
    const int block = 32;
#pragma omp parallel for schedule(static)
    for (int start = 0; start < h; start += block) {
        int end = start + block < h ? start + block : h;
        for (int i = 0; i < n; i++) {
            if (ids[i] == pad_id) continue;
            float *row = dtable + (size_t)ids[i] * h;
            const float *grad = dout + (size_t)i * h;
            for (int j = start; j < end; j++) row[j] += grad[j];
        }
    }
}
