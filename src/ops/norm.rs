//! Layer norm over the last dimension with torch's semantics: biased variance, statistics in
//! f32 whatever the tensor dtype, computed in two passes (mean, then squared deviations) so
//! large means do not cancel the variance away.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{run_float1, run_float3, vectorized_fn, Float32, FloatKernel1, FloatKernel3};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension; `affine` is
/// `(weight, bias)` or `None` (torch's `elementwise_affine=False`).
pub fn layer_norm(x: &Tensor, eps: f64, affine: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    if !super::own_kernel(x) {
        return layer_norm_generic(x, eps, affine);
    }
    let x = x.contiguous()?;
    let op = LayerNormKernel { eps: eps as f32 };
    match affine {
        None => x.apply_op1_no_bwd(&op),
        Some((w, b)) => x.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op),
    }
}

/// The same from candle tensor ops (any device), statistics in f32.
pub fn layer_norm_generic(x: &Tensor, eps: f64, affine: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some((w, b)) = affine {
        y = y
            .broadcast_mul(&w.to_dtype(DType::F32)?)?
            .broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    y.to_dtype(dtype)
}

struct LayerNormKernel {
    eps: f32,
}

/// Sum with eight independent accumulators, so the loop vectorises (a single running sum is
/// a serial dependency the compiler may not reorder).
#[inline(always)]
fn sum8(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += f(*x);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|x| f(*x)).sum::<f32>()
}

vectorized_fn! {
    /// Normalises each row of `dim` elements of `src` into `dst`; `row` is scratch of `dim`.
    pub(super) fn normalize_rows<T: Float32>(
        dst: &mut [T],
        src: &[T],
        row: &mut [f32],
        eps: f32,
        affine: Option<(&[f32], &[f32])>,
    ) {
        let dim = row.len();
        for (dst, src) in dst.chunks_mut(dim).zip(src.chunks(dim)) {
            for (r, s) in row.iter_mut().zip(src) {
                *r = s.f32();
            }
            let mean = sum8(row, |v| v) / dim as f32;
            let var = sum8(row, |v| (v - mean) * (v - mean)) / dim as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            match affine {
                None => {
                    for (d, r) in dst.iter_mut().zip(row.iter()) {
                        *d = T::from_f32((r - mean) * rstd);
                    }
                }
                Some((w, b)) => {
                    for (((d, r), w), b) in dst.iter_mut().zip(row.iter()).zip(w).zip(b) {
                        *d = T::from_f32((r - mean) * rstd * w + b);
                    }
                }
            }
        }
    }
}

fn layer_norm_rows<T: Float32>(x: &[T], dim: usize, eps: f32, affine: Option<(&[T], &[T])>) -> Vec<T> {
    let affine: Option<(Vec<f32>, Vec<f32>)> =
        affine.map(|(w, b)| (w.iter().map(|v| v.f32()).collect(), b.iter().map(|v| v.f32()).collect()));
    let affine = affine.as_ref().map(|(w, b)| (w.as_slice(), b.as_slice()));
    let mut out = vec![T::from_f32(0.0); x.len()];
    // enough rows per task to amortise the scheduling
    let rows_per_task = (16384 / dim).max(1);
    out.par_chunks_mut(dim * rows_per_task)
        .zip(x.par_chunks(dim * rows_per_task))
        .for_each(|(dst, src)| normalize_rows(dst, src, &mut vec![0f32; dim], eps, affine));
    out
}

impl FloatKernel1 for LayerNormKernel {
    fn run<T: Float32>(&self, x: &[T], l: &Layout) -> Result<Vec<T>> {
        Ok(layer_norm_rows(x, last_dim(l), self.eps, None))
    }
}

impl FloatKernel3 for LayerNormKernel {
    /// `w` and `b` are as long as the last dimension (checked by `cpu_fwd`).
    fn run<T: Float32>(&self, x: &[T], w: &[T], b: &[T]) -> Result<Vec<T>> {
        Ok(layer_norm_rows(x, w.len(), self.eps, Some((w, b))))
    }
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

impl CustomOp1 for LayerNormKernel {
    fn name(&self) -> &'static str {
        "layer-norm-f32-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((run_float1(CustomOp1::name(self), self, s, l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::layer_norm((s, l), None, self.eps)?, l.shape().clone()))
    }
}

impl CustomOp3 for LayerNormKernel {
    fn name(&self) -> &'static str {
        "layer-norm-affine-f32-stats"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dim = last_dim(l1);
        if l2.shape().elem_count() != dim || l3.shape().elem_count() != dim {
            candle_core::bail!("layer_norm: weight/bias do not match the last dimension {dim}");
        }
        let out = run_float3(CustomOp3::name(self), self, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dim = last_dim(l1);
        if l2.shape().elem_count() != dim || l3.shape().elem_count() != dim {
            candle_core::bail!("layer_norm: weight/bias do not match the last dimension {dim}");
        }
        let out = super::cuda::layer_norm((s1, l1), Some(((s2, l2), (s3, l3))), self.eps)?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_kernel_matches_generic_form_and_survives_a_large_mean() -> Result<()> {
        let dev = Device::Cpu;
        // mean 1000, std 1: a one-pass E[x^2] - mean^2 in f32 loses most digits here
        let x = (Tensor::randn(0f32, 1., (3, 5, 64), &dev)? + 1000.0)?;
        let w = Tensor::randn(1f32, 0.1, 64, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 64, &dev)?;
        for affine in [None, Some((&w, &b))] {
            let fast = layer_norm(&x, 1e-6, affine)?;
            let generic = layer_norm_generic(&x, 1e-6, affine)?;
            let x64 = x.to_dtype(DType::F64)?;
            let c = x64.broadcast_sub(&x64.mean_keepdim(D::Minus1)?)?;
            let mut want = c.broadcast_div(&(c.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?;
            if let Some((w, b)) = affine {
                want = want
                    .broadcast_mul(&w.to_dtype(DType::F64)?)?
                    .broadcast_add(&b.to_dtype(DType::F64)?)?;
            }
            for got in [fast, generic] {
                let err = (got.to_dtype(DType::F64)? - &want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert!(err < 1e-3, "max abs err {err}");
            }
        }
        let half = layer_norm(&x.to_dtype(DType::BF16)?, 1e-6, None)?;
        assert_eq!(half.dtype(), DType::BF16);
        Ok(())
    }
}
