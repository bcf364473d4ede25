//! `softmax(scale * x)` over the last dimension, f32 in and out: the attention weights. On
//! the CPU one fused pass per row with a vectorised exponential (candle's softmax calls libm
//! `expf` per element, and the scale would be a pass of its own).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{exp_nonpositive, slice_of, vectorized_fn};

/// `softmax(scale * x)` along the last dimension, computed in f32 (the result is f32).
pub fn scaled_softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    if super::cpu_kernel(&x) {
        x.contiguous()?.apply_op1_no_bwd(&SoftmaxCpu { scale: scale as f32 })
    } else {
        candle_nn::ops::softmax_last_dim(&(x * scale)?)
    }
}

struct SoftmaxCpu {
    scale: f32,
}

/// The max of a row, and whether it holds a NaN (which `f32::max` skips). 32 independent lanes
/// vectorise into four registers; a comparison rather than `f32::max`, whose NaN rule kept the
/// loop scalar. Neither result depends on the order: the lanes are free.
#[inline(always)]
fn max_and_nan(x: &[f32]) -> (f32, bool) {
    const LANES: usize = 32;
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut sum = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
            sum[i] += c[i];
        }
    }
    let m = rest.iter().chain(&mx).fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    // a NaN anywhere makes its lane's sum NaN
    (m, rest.iter().chain(&sum).sum::<f32>().is_nan())
}

/// `softmax(scale * row)` in place.
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    let (max, has_nan) = max_and_nan(row);
    // a NaN would vanish in the max and the clamped exp: keep it visible
    if has_nan {
        row.fill(f32::NAN);
        return;
    }
    let shift = max * scale;
    // the exponentials and their eight-lane sum in one pass
    let mut sum = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for i in 0..8 {
            c[i] = exp_nonpositive(c[i] * scale - shift);
            sum[i] += c[i];
        }
    }
    let rest = chunks.into_remainder();
    for v in rest.iter_mut() {
        *v = exp_nonpositive(*v * scale - shift);
    }
    let total: f32 = rest.iter().chain(&sum).sum();
    let inv = 1.0 / total;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

vectorized_fn! {
    /// `softmax(scale * row)` in place for each row of `dim` elements of `rows`.
    pub(super) fn softmax_rows(rows: &mut [f32], dim: usize, scale: f32) {
        for row in rows.chunks_exact_mut(dim) {
            softmax_row(row, scale);
        }
    }
}

impl CustomOp1 for SoftmaxCpu {
    fn name(&self) -> &'static str {
        "scaled-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("scaled_softmax: expected f32, got {:?}", s.dtype());
        };
        let x = slice_of(x, l)?;
        let dim = l.shape().dim(D::Minus1)?.max(1);
        let scale = self.scale;
        let mut out = x.to_vec();
        let rows = (16384 / dim).max(1);
        out.par_chunks_mut(rows * dim)
            .for_each(|rows| softmax_rows(rows, dim, scale));
        Ok((candle_core::WithDType::to_cpu_storage_owned(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_softmax_and_keeps_nan() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 4., (3, 5, 77), &dev)? + 10.0)?;
        let ours = scaled_softmax_last_dim(&x, 0.125)?;
        let want = candle_nn::ops::softmax_last_dim(&(&x * 0.125)?)?;
        let err = (&ours - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-7, "{err}");
        let rows = ours.sum_keepdim(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-6));
        let mut v = vec![0f32; 8];
        v[3] = f32::NAN;
        let y = scaled_softmax_last_dim(&Tensor::from_vec(v, (2, 4), &dev)?, 1.0)?.to_vec2::<f32>()?;
        assert!(y[0].iter().all(|v| v.is_nan()) && y[1].iter().all(|v| *v == 0.25));
        // a NaN among the vectorised lanes of a longer row, and one in its remainder
        for at in [40, 70] {
            let mut v = vec![1f32; 77];
            v[at] = f32::NAN;
            let y = scaled_softmax_last_dim(&Tensor::from_vec(v, 77, &dev)?, 1.0)?.to_vec1::<f32>()?;
            assert!(y.iter().all(|v| v.is_nan()), "NaN at {at}");
        }
        Ok(())
    }
}
