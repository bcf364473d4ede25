// The kernels around the bodies in fused.h: one thread per output element, per
// (image, channel) pair or per row. Built into PTX by build.rs with the `cuda` feature.
#include "fused.h"

#define WU_INDEX ((int64_t)blockIdx.x * blockDim.x + threadIdx.x)

extern "C" __global__ void wu_depthwise(int64_t total, const void *x, int xt, const void *w, int wt, const void *b,
                                        int bt, void *out, int h, int wd, int c, int k, int replicate) {
    int64_t i = WU_INDEX;
    if (i < total) wu_depthwise_at(i, x, xt, w, wt, b, bt, out, h, wd, c, k, replicate);
}

extern "C" __global__ void wu_grn_norm(int64_t pairs, const void *x, int xt, float *norm, int64_t pixels, int c) {
    int64_t j = WU_INDEX;
    if (j < pairs) wu_grn_norm_at(j, x, xt, norm, pixels, c);
}

extern "C" __global__ void wu_grn_scale(int64_t pairs, const float *norm, float *scale, int c) {
    int64_t j = WU_INDEX;
    if (j < pairs) wu_grn_scale_at(j, norm, scale, c);
}

extern "C" __global__ void wu_grn_apply(int64_t total, const void *x, int xt, const float *scale, const void *gamma,
                                        int gt, const void *beta, int bt, void *out, int64_t pixels, int c) {
    int64_t i = WU_INDEX;
    if (i < total) wu_grn_apply_at(i, x, xt, scale, gamma, gt, beta, bt, out, pixels, c);
}

extern "C" __global__ void wu_layer_norm(int64_t rows, const void *x, int xt, const void *w, int wt, const void *b,
                                         int bt, void *out, int d, float eps) {
    int64_t r = WU_INDEX;
    if (r < rows) wu_layer_norm_row(r, x, xt, w, wt, b, bt, out, d, eps);
}

extern "C" __global__ void wu_attention(int64_t rows, const void *q, int qt, const void *k, int kt, const void *v,
                                        int vt, void *out, int64_t lq, int64_t lk, int d, float scale) {
    int64_t r = WU_INDEX;
    if (r < rows) wu_attention_row(r, q, qt, k, kt, v, vt, out, lq, lk, d, scale);
}

extern "C" __global__ void wu_overlap_add(int64_t total, const void *patches, int pt, void *out, int h, int w, int k,
                                          int c, int stride, int padding, int oh, int ow) {
    int64_t i = WU_INDEX;
    if (i < total) wu_overlap_add_at(i, patches, pt, out, h, w, k, c, stride, padding, oh, ow);
}
