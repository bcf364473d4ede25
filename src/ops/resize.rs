//! `torch.nn.functional.interpolate(x, size, mode="bicubic", antialias=True,
//! align_corners=True)`: how diffusers' decoder resizes the prior's image embeddings at every
//! level that injects them. Not plain bicubic: the cubic (a = -0.5) is widened when
//! downsampling and its weights are renormalised at the borders. Separable, so it is two
//! matrix products with small host-computed weight matrices, on any device (on the CPU in f32
//! through [`super::matmul`], whose numbers for an image do not depend on its batch).

use candle_core::{DType, Device, Result, Tensor};

/// Keys' cubic convolution kernel with a = -0.5, the one torch's antialiased bicubic (and
/// PIL's) uses: `cubic_convolution1` inside 1, `cubic_convolution2` out to 2.
pub(crate) fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The `(out_size, in_size)` matrix `W` with `out = W @ in` along one axis (torch's
/// `_compute_weights_aa` with align_corners scale and the half-pixel centre).
pub fn resize_weights(in_size: usize, out_size: usize) -> Vec<f32> {
    let scale = if out_size > 1 {
        (in_size as f64 - 1.0) / (out_size as f64 - 1.0)
    } else {
        0.0
    };
    let (support, invscale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let mut w = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as isize).max(0) as usize;
        let hi = ((center + support + 0.5) as isize).clamp(0, in_size as isize) as usize;
        let taps: Vec<f64> = (lo..hi).map(|j| cubic((j as f64 - center + 0.5) * invscale)).collect();
        let total: f64 = taps.iter().sum();
        for (j, t) in (lo..hi).zip(taps) {
            w[i * in_size + j] = if total != 0.0 { t / total } else { t } as f32;
        }
    }
    w
}

fn weight_tensor(in_size: usize, out_size: usize, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(resize_weights(in_size, out_size), (out_size, in_size), device)
}

/// (N, C, H, W) -> (N, C, h, w), computed in f32 like diffusers' `effnet.float()`, returned
/// in the input dtype.
pub fn resize_bicubic_antialias(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let dtype = x.dtype();
    let (n, c, in_h, in_w) = x.dims4()?;
    let x = x.to_dtype(DType::F32)?;
    // width first, as torch does when both sizes change
    let ww = weight_tensor(in_w, w, x.device())?;
    let y = super::matmul(&x.reshape((n * c * in_h, in_w))?, &ww.t()?)?;
    let wh = weight_tensor(in_h, h, x.device())?;
    let y = super::matmul(&wh.broadcast_left(n * c)?, &y.reshape((n * c, in_h, w))?)?;
    y.reshape((n, c, h, w))?.to_dtype(dtype)
}

/// The `(out_size, in_size)` matrix of `interpolate(mode="bilinear", align_corners=True)`
/// along one axis: output `i` samples the input at `i * (in - 1) / (out - 1)` (torch's
/// `area_pixel_compute_scale` and `linear_upsample` in f32).
pub fn bilinear_weights(in_size: usize, out_size: usize) -> Vec<f32> {
    let scale = if out_size > 1 {
        (in_size as f32 - 1.0) / (out_size as f32 - 1.0)
    } else {
        0.0
    };
    let mut w = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let src = scale * i as f32;
        let lo = (src as usize).min(in_size - 1);
        let frac = src - lo as f32;
        let hi = (lo + 1).min(in_size - 1);
        w[i * in_size + lo] += 1.0 - frac;
        w[i * in_size + hi] += frac;
    }
    w
}

/// `interpolate(x, size, mode="bilinear", align_corners=True)` on channels-last input:
/// (N, H, W, C) -> (N, h, w, C), two matrix products in f32, returned in the input dtype.
pub fn resize_bilinear_nhwc(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (n, in_h, in_w, c) = x.dims4()?;
    if (in_h, in_w) == (h, w) {
        return Ok(x.clone());
    }
    let dtype = x.dtype();
    let dev = x.device();
    let x = x.to_dtype(DType::F32)?;
    let ww = Tensor::from_vec(bilinear_weights(in_w, w), (w, in_w), dev)?;
    let y = super::matmul(&ww.broadcast_left(n * in_h)?, &x.reshape((n * in_h, in_w, c))?)?;
    let wh = Tensor::from_vec(bilinear_weights(in_h, h), (h, in_h), dev)?;
    let y = super::matmul(&wh.broadcast_left(n)?, &y.reshape((n, in_h, w * c))?)?;
    y.reshape((n, h, w, c))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ops.safetensors: torch's interpolate on random data (tests/fixtures/make_fixtures.py).
    #[test]
    fn matches_torch_interpolate_bicubic_antialias_align_corners() -> Result<()> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ops.safetensors");
        let t = candle_core::safetensors::load(path, &Device::Cpu)?;
        let mut cases = 0;
        while let (Some(x), Some(y)) = (t.get(&format!("resize.{cases}.x")), t.get(&format!("resize.{cases}.y"))) {
            let (_, _, h, w) = y.dims4()?;
            let got = resize_bicubic_antialias(x, (h, w))?;
            let err =
                ((&got - y)?.sqr()?.sum_all()?.to_scalar::<f32>()? / y.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
            // f32 weights and a different summation order than torch: ~1e-7
            assert!(
                err <= 1e-5,
                "case {cases} {:?} -> {:?}: rel err {err}",
                x.dims(),
                y.dims()
            );
            cases += 1;
        }
        assert!(cases >= 9, "only {cases} cases found");
        Ok(())
    }

    #[test]
    fn plain_bicubic_weights_would_differ() {
        // downsampling widens the kernel: each output takes more than 4 taps
        let w = resize_weights(24, 8);
        let taps = w[3 * 24..4 * 24].iter().filter(|v| **v != 0.0).count();
        assert!(taps > 4, "{taps}");
        // every row sums to one (renormalised borders)
        for row in w.chunks(24) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
