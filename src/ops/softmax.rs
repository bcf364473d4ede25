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
    let inv = 1.0 / exp_and_sum(row, scale, max * scale);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `exp(scale * x - shift)` in place for each x of `row` (`shift` at least the largest
/// `scale * x`), and their sum: in one pass, summed in 32 lanes. The exponential is a chain
/// of ~12 dependent operations; four registers of lanes give the core four chains to overlap
/// (a (256, 512) softmax on one thread, before the FMAs: 1.6 ns per element with one
/// register, 1.4 with four).
#[inline(always)]
fn exp_and_sum(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    const LANES: usize = 32;
    let mut sum = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_nonpositive(c[i].mul_add(scale, -shift));
            sum[i] += c[i];
        }
    }
    for (v, s) in chunks.into_remainder().iter_mut().zip(&mut sum) {
        *v = exp_nonpositive(v.mul_add(scale, -shift));
        *s += *v;
    }
    sum.iter().sum()
}

vectorized_fn! {
    /// `softmax(scale * row)` in place for each row of `dim` elements of `rows`.
    fn softmax_rows(rows: &mut [f32], dim: usize, scale: f32) {
        for row in rows.chunks_exact_mut(dim) {
            softmax_row(row, scale);
        }
    }
}

/// Where a row's softmax stands after some blocks of its logits (the online softmax of
/// flash attention): the largest scaled logit so far, the sum of the exponentials relative to
/// it, and whether a NaN was among them.
#[derive(Clone, Copy)]
pub(super) struct RunningRow {
    pub(super) max: f32,
    pub(super) sum: f32,
    pub(super) nan: bool,
}

impl RunningRow {
    pub(super) const START: Self = Self {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        nan: false,
    };

    /// Divides the row's accumulated outputs by its sum: the softmax-weighted values. NaN
    /// throughout where a NaN was among its logits, as in a whole softmax.
    pub(super) fn finish(&self, out: &mut [f32]) {
        if self.nan {
            out.fill(f32::NAN);
        } else {
            let inv = 1.0 / self.sum;
            out.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

vectorized_fn! {
    /// One block of columns of an online softmax: each row of `dim` logits in `block` becomes
    /// `exp(scale * x - max)` against its row's running max, raised first to this block's where
    /// it is larger; then the row's running sum and its `d` accumulated outputs in `acc` (the
    /// exponentials of the earlier blocks times the values) are rescaled to the new max.
    pub(super) fn softmax_block(block: &mut [f32], dim: usize, scale: f32, rows: &mut [RunningRow], acc: &mut [f32], d: usize) {
        for ((row, state), acc) in block.chunks_exact_mut(dim).zip(rows.iter_mut()).zip(acc.chunks_exact_mut(d)) {
            let (max, has_nan) = max_and_nan(row);
            state.nan |= has_nan;
            let shift = state.max.max(max * scale);
            if shift > state.max && state.max > f32::NEG_INFINITY {
                let alpha = exp_nonpositive(state.max - shift);
                state.sum *= alpha;
                for v in acc.iter_mut() {
                    *v *= alpha;
                }
            }
            state.max = shift;
            state.sum += exp_and_sum(row, scale, shift);
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
