/* Fused CUDA kernels for channels-last (N, H, W, C) activations: the depthwise convolution,
 * GlobalResponseNorm and layer norm, each one to three launches instead of the ~10-40 small
 * kernels of their candle-op forms; the transposed convolution's overlap-add; attention
 * without stored scores. Every value is computed in f32 whatever the storage dtype.
 *
 * The body of each kernel is a function of one output element (or one row, or one
 * (image, channel) pair) written in plain C: nvcc compiles it into the kernels of fused.cu,
 * and the C compiler into host.c, a harness that the Rust tests run over the whole grid
 * against the CPU kernels. So the indexing, padding and arithmetic are checked on any
 * machine; only the launch itself needs a GPU.
 *
 * Tensors are passed as untyped pointers plus a dtype code, so one kernel serves every mix
 * of dtypes (the generic forms keep some weights in f32 beside half-precision activations).
 * The switch on the dtype is uniform over a launch and costs no divergence. */
#ifndef WUERSTCHEN_FUSED_H
#define WUERSTCHEN_FUSED_H

#ifdef __CUDACC__
#define WU_FN __host__ __device__ static inline
#else
#include <math.h>
#define WU_FN static inline
#endif
#include <stdint.h>

/* The dtype codes, as `ops::cuda::dtype_code` writes them. */
enum { WU_F32 = 0, WU_BF16 = 1, WU_F16 = 2 };

WU_FN uint32_t wu_f32_bits(float v) {
    union { float f; uint32_t u; } c;
    c.f = v;
    return c.u;
}

WU_FN float wu_bits_f32(uint32_t u) {
    union { float f; uint32_t u; } c;
    c.u = u;
    return c.f;
}

WU_FN float wu_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return wu_bits_f32(sign | 0x7f800000 | (man << 13)); /* inf, nan */
    if (exp == 0) { /* zero and subnormals: man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return wu_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* Round to nearest even, as `half::f16::from_f32` and torch round. */
WU_FN uint16_t wu_f32_to_f16(float v) {
    uint32_t u = wu_f32_bits(v), a = u & 0x7fffffff;
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    if (a > 0x7f800000) return sign | 0x7e00;             /* nan */
    if (a >= 0x477ff000) return sign | 0x7c00;            /* rounds to 65520 or more: inf */
    if (a < 0x38800000) {                                 /* below 2^-14: a subnormal */
        return sign | (uint16_t)rintf(wu_bits_f32(a) * 16777216.0f);
    }
    uint32_t r = a - 0x38000000;                          /* rebias the exponent 127 -> 15 */
    r += 0xfff + ((r >> 13) & 1);
    return sign | (uint16_t)(r >> 13);
}

WU_FN uint16_t wu_f32_to_bf16(float v) {
    uint32_t u = wu_f32_bits(v);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* quiet nan */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

WU_FN float wu_load(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case WU_BF16: return wu_bits_f32((uint32_t)((const uint16_t *)p)[i] << 16);
    case WU_F16: return wu_f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

WU_FN void wu_store(void *p, int dtype, int64_t i, float v) {
    switch (dtype) {
    case WU_BF16: ((uint16_t *)p)[i] = wu_f32_to_bf16(v); break;
    case WU_F16: ((uint16_t *)p)[i] = wu_f32_to_f16(v); break;
    default: ((float *)p)[i] = v;
    }
}

/* `i + d` clamped into 0..n (replicate padding), or -1 outside (zero padding). */
WU_FN int wu_source(int i, int d, int n, int replicate) {
    int j = i + d;
    if (j >= 0 && j < n) return j;
    if (!replicate) return -1;
    return j < 0 ? 0 : n - 1;
}

/* Depthwise k x k convolution, stride 1, "same" size: output element `i` of (N, H, W, C).
 * `w`: (k, k, C), `b`: (C). The taps are added in the CPU kernel's order (bias, then row by
 * row), so f32 differs from it only where the compiler fuses a multiply-add. */
WU_FN void wu_depthwise_at(int64_t i, const void *x, int xt, const void *w, int wt, const void *b, int bt,
                           void *out, int h, int wd, int c, int k, int replicate) {
    int ch = (int)(i % c), px = (int)((i / c) % wd), y = (int)((i / c / wd) % h);
    int64_t image = i / c / wd / h;
    float acc = wu_load(b, bt, ch);
    for (int ky = 0; ky < k; ky++) {
        int iy = wu_source(y, ky - k / 2, h, replicate);
        if (iy < 0) continue;
        for (int kx = 0; kx < k; kx++) {
            int ix = wu_source(px, kx - k / 2, wd, replicate);
            if (ix < 0) continue;
            float tap = wu_load(w, wt, (int64_t)(ky * k + kx) * c + ch);
            acc += tap * wu_load(x, xt, ((image * h + iy) * wd + ix) * c + ch);
        }
    }
    wu_store(out, xt, i, acc);
}

/* GlobalResponseNorm, first pass, for pair `j` = (image, channel) of N x C: the L2 norm over
 * the `pixels` = H * W positions. */
WU_FN void wu_grn_norm_at(int64_t j, const void *x, int xt, float *norm, int64_t pixels, int c) {
    int64_t image = j / c, ch = j % c;
    float sum = 0.0f;
    for (int64_t p = 0; p < pixels; p++) {
        float v = wu_load(x, xt, (image * pixels + p) * c + ch);
        sum += v * v;
    }
    norm[j] = sqrtf(sum);
}

/* Second pass, pair `j`: the norm over its image's mean norm (+1e-6). */
WU_FN void wu_grn_scale_at(int64_t j, const float *norm, float *scale, int c) {
    const float *image = norm + (j / c) * c;
    float sum = 0.0f;
    for (int ch = 0; ch < c; ch++) sum += image[ch];
    scale[j] = norm[j] / (sum / (float)c + 1e-6f);
}

/* Third pass, element `i`: `gamma * (x * scale) + beta + x`, as torch writes it. */
WU_FN void wu_grn_apply_at(int64_t i, const void *x, int xt, const float *scale, const void *gamma, int gt,
                           const void *beta, int bt, void *out, int64_t pixels, int c) {
    int ch = (int)(i % c);
    int64_t image = i / c / pixels;
    float v = wu_load(x, xt, i);
    float g = wu_load(gamma, gt, ch), b = wu_load(beta, bt, ch);
    wu_store(out, xt, i, g * (v * scale[image * c + ch]) + b + v);
}

/* Layer norm of row `r` over its `d` values: two passes (mean, then squared deviations), so
 * a large mean does not cancel the variance. `w`, `b`: null for no affine transform. */
WU_FN void wu_layer_norm_row(int64_t r, const void *x, int xt, const void *w, int wt, const void *b, int bt,
                             void *out, int d, float eps) {
    int64_t start = r * d;
    float sum = 0.0f, dev = 0.0f;
    for (int i = 0; i < d; i++) sum += wu_load(x, xt, start + i);
    float mean = sum / (float)d;
    for (int i = 0; i < d; i++) {
        float v = wu_load(x, xt, start + i) - mean;
        dev += v * v;
    }
    float rstd = 1.0f / sqrtf(dev / (float)d + eps);
    for (int i = 0; i < d; i++) {
        float v = (wu_load(x, xt, start + i) - mean) * rstd;
        if (w) v = v * wu_load(w, wt, i) + wu_load(b, bt, i);
        wu_store(out, xt, start + i, v);
    }
}

/* Transposed convolution, second half: output element `i` of (N, OH, OW, C) as the sum of the
 * (N*H*W, k*k*C) patches (each input pixel times the weight matrix) that land on it. Summed in
 * the CPU kernel's order: kernel rows ascending, then input columns ascending (kernel columns
 * descending). */
WU_FN void wu_overlap_add_at(int64_t i, const void *patches, int pt, void *out, int h, int w, int k, int c,
                             int stride, int padding, int oh, int ow) {
    int ch = (int)(i % c), ox = (int)((i / c) % ow), oy = (int)((i / c / ow) % oh);
    int64_t image = i / c / ow / oh;
    float acc = 0.0f;
    for (int ky = 0; ky < k; ky++) {
        int t = oy + padding - ky;
        if (t < 0 || t % stride != 0 || t / stride >= h) continue;
        for (int kx = k - 1; kx >= 0; kx--) {
            int u = ox + padding - kx;
            if (u < 0 || u % stride != 0 || u / stride >= w) continue;
            int64_t pixel = (image * h + t / stride) * w + u / stride;
            acc += wu_load(patches, pt, (pixel * k * k + ky * k + kx) * c + ch);
        }
    }
    wu_store(out, pt, i, acc);
}

/* The largest head dimension `wu_attention_row` keeps a query and its output for; larger
 * heads take the blocked candle-op path. */
#define WU_ATTN_MAX_D 128
/* Keys per online-softmax step: the running maximum and sum are rescaled once per block. */
#define WU_ATTN_BLOCK 16

/* Attention for query row `r` of (BH, Lq, D) `q` over (BH, Lk, D) `k` and `v`:
 * softmax(q k^T * scale) v with an online softmax (a running maximum and sum, rescaled per
 * block of keys), so the scores never exist; every product and sum in f32. The output takes
 * `v`'s dtype. Threads of neighbouring rows of one head read the same key at the same time. */
WU_FN void wu_attention_row(int64_t r, const void *q, int qt, const void *k, int kt, const void *v, int vt,
                            void *out, int64_t lq, int64_t lk, int d, float scale) {
    int64_t qo = r * d, ko = (r / lq) * lk * d;
    float query[WU_ATTN_MAX_D], acc[WU_ATTN_MAX_D], s[WU_ATTN_BLOCK];
    for (int i = 0; i < d; i++) {
        query[i] = wu_load(q, qt, qo + i);
        acc[i] = 0.0f;
    }
    float top = -INFINITY, sum = 0.0f;
    for (int64_t j0 = 0; j0 < lk; j0 += WU_ATTN_BLOCK) {
        int n = lk - j0 < WU_ATTN_BLOCK ? (int)(lk - j0) : WU_ATTN_BLOCK;
        float block_top = top;
        for (int t = 0; t < n; t++) {
            int64_t key = ko + (j0 + t) * d;
            float dot = 0.0f;
            for (int i = 0; i < d; i++) dot += query[i] * wu_load(k, kt, key + i);
            s[t] = dot * scale;
            block_top = fmaxf(block_top, s[t]);
        }
        /* rescale what the earlier blocks added (the first block: exp(-inf) = 0 times nothing) */
        float correction = expf(top - block_top);
        sum *= correction;
        for (int i = 0; i < d; i++) acc[i] *= correction;
        for (int t = 0; t < n; t++) {
            int64_t value = ko + (j0 + t) * d;
            float p = expf(s[t] - block_top);
            sum += p;
            for (int i = 0; i < d; i++) acc[i] += p * wu_load(v, vt, value + i);
        }
        top = block_top;
    }
    for (int i = 0; i < d; i++) wu_store(out, vt, qo + i, acc[i] / sum);
}

#endif
