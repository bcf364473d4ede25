/* The host harness: every kernel of fused.cu as a loop over its grid, the same bodies on the
 * CPU. Only the tests call these (`ops::cuda::harness`). */
#include "fused.h"

float wu_host_load(const void *p, int dtype, int64_t i) { return wu_load(p, dtype, i); }

void wu_host_store(void *p, int dtype, int64_t i, float v) { wu_store(p, dtype, i, v); }

void wu_host_depthwise(int64_t total, const void *x, int xt, const void *w, int wt, const void *b, int bt, void *out,
                       int h, int wd, int c, int k, int replicate) {
    for (int64_t i = 0; i < total; i++) wu_depthwise_at(i, x, xt, w, wt, b, bt, out, h, wd, c, k, replicate);
}

void wu_host_grn(int64_t images, const void *x, int xt, float *norm, float *scale, const void *gamma, int gt,
                 const void *beta, int bt, void *out, int64_t pixels, int c) {
    int64_t pairs = images * c, total = pairs * pixels;
    for (int64_t j = 0; j < pairs; j++) wu_grn_norm_at(j, x, xt, norm, pixels, c);
    for (int64_t j = 0; j < pairs; j++) wu_grn_scale_at(j, norm, scale, c);
    for (int64_t i = 0; i < total; i++) wu_grn_apply_at(i, x, xt, scale, gamma, gt, beta, bt, out, pixels, c);
}

void wu_host_layer_norm(int64_t rows, const void *x, int xt, const void *w, int wt, const void *b, int bt, void *out,
                        int d, float eps) {
    for (int64_t r = 0; r < rows; r++) wu_layer_norm_row(r, x, xt, w, wt, b, bt, out, d, eps);
}

void wu_host_attention(int64_t rows, const void *q, int qt, const void *k, int kt, const void *v, int vt, void *out,
                       int64_t lq, int64_t lk, int d, float scale) {
    for (int64_t r = 0; r < rows; r++) wu_attention_row(r, q, qt, k, kt, v, vt, out, lq, lk, d, scale);
}

void wu_host_overlap_add(int64_t total, const void *patches, int pt, void *out, int h, int w, int k, int c, int stride,
                         int padding, int oh, int ow) {
    for (int64_t i = 0; i < total; i++) wu_overlap_add_at(i, patches, pt, out, h, w, k, c, stride, padding, oh, ow);
}
