//! ConvNeXt-V2's GlobalResponseNorm on channels-last input, fused on the CPU: one pass for
//! the per-channel sums of squares (in f32), one for `gamma * (x * n) + beta + x`. The
//! composite form spends most of its time in candle's reductions over non-contiguous
//! dimensions (15 ms for a 64x64x256 block that the fused kernel does in about one).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{run_float3, vectorized_fn, Float32, FloatKernel3};

/// `x`: (N, H, W, C); `gamma`, `beta`: C values (any shape with C elements). Per image and
/// channel, `n = |x|_2 over H, W` divided by the mean of `n` over the channels (+1e-6), then
/// `gamma * (x * n) + beta + x`.
pub fn global_response_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    if super::own_kernel(x) {
        let (n, _, _, c) = x.dims4()?;
        x.contiguous()?.apply_op3_no_bwd(
            &gamma.flatten_all()?.contiguous()?,
            &beta.flatten_all()?.contiguous()?,
            &GrnKernel { n, c },
        )
    } else {
        global_response_norm_generic(x, gamma, beta)
    }
}

/// The same from candle tensor ops (any device); the sums run in f32 (over 128x128 the
/// squares overflow f16).
pub fn global_response_norm_generic(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let (gamma, beta) = (gamma.reshape((1, 1, 1, c))?, beta.reshape((1, 1, 1, c))?);
    let agg = x.to_dtype(DType::F32)?.sqr()?.sum_keepdim(1)?.sum_keepdim(2)?.sqrt()?;
    let stand = agg
        .broadcast_div(&(agg.mean_keepdim(D::Minus1)? + 1e-6)?)?
        .to_dtype(x.dtype())?;
    // torch: gamma * (x * stand) + beta + x
    x.broadcast_mul(&stand)?.broadcast_mul(&gamma)?.broadcast_add(&beta)? + x
}

struct GrnKernel {
    /// images and channels of the (N, H, W, C) input
    n: usize,
    c: usize,
}

fn grn<T: Float32>(x: &[T], gamma: &[T], beta: &[T], c: usize, n: usize) -> Vec<T> {
    let per_image = x.len() / n.max(1);
    let gamma: Vec<f32> = gamma.iter().map(|v| v.f32()).collect();
    let beta: Vec<f32> = beta.iter().map(|v| v.f32()).collect();
    // rows (pixels) per task, enough to amortise the scheduling; every image's blocks in one
    // parallel pass
    let rows = (16384 / c).max(1);
    // partial sums per block of rows, added in block order: the same result whatever the
    // thread count or scheduling (a parallel reduce would associate the sums differently
    // from run to run, and the same seed must give the same image)
    let partials: Vec<Vec<f32>> = x
        .par_chunks(per_image)
        .flat_map(|img| {
            img.par_chunks(rows * c).map(|block| {
                let mut acc = vec![0f32; c];
                add_squares(&mut acc, block);
                acc
            })
        })
        .collect();
    // the partials come in image order, the same number of blocks for each image
    let blocks_per_image = per_image.div_ceil(rows * c);
    let mut stand = vec![0f32; n * c];
    for (sumsq, image_partials) in stand.chunks_exact_mut(c).zip(partials.chunks(blocks_per_image)) {
        for p in image_partials {
            sumsq.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        sumsq.iter_mut().for_each(|s| *s = s.sqrt());
        let mean = sumsq.iter().sum::<f32>() / c as f32;
        sumsq.iter_mut().for_each(|a| *a /= mean + 1e-6);
    }
    let mut out: Vec<T> = Vec::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(per_image)
        .zip(x.par_chunks(per_image))
        .zip(stand.par_chunks(c))
        .flat_map(|((o, img), stand)| {
            o.par_chunks_mut(rows * c)
                .zip(img.par_chunks(rows * c))
                .map(move |(o, i)| (o, i, stand))
        })
        .for_each(|(o, i, stand)| respond(o, i, stand, &gamma, &beta));
    // SAFETY: `respond` wrote every element of the first x.len().
    unsafe { out.set_len(x.len()) };
    out
}

vectorized_fn! {
    /// `acc[ch] += x^2` over the pixels (rows of `acc.len()` channels) of `block`.
    fn add_squares<T: Float32>(acc: &mut [f32], block: &[T]) {
        for px in block.chunks_exact(acc.len()) {
            for (a, v) in acc.iter_mut().zip(px) {
                let v = v.f32();
                *a += v * v;
            }
        }
    }
}

vectorized_fn! {
    /// `out = gamma * (x * stand) + beta + x` per pixel (rows of `stand.len()` channels).
    fn respond<T: Float32>(out: &mut [std::mem::MaybeUninit<T>], x: &[T], stand: &[f32], gamma: &[f32], beta: &[f32]) {
        let c = stand.len();
        for (o, i) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for ((((o, i), s), g), b) in o.iter_mut().zip(i).zip(stand).zip(gamma).zip(beta) {
                let v = i.f32();
                o.write(T::from_f32(g * (v * s) + b + v));
            }
        }
    }
}

impl FloatKernel3 for GrnKernel {
    fn run<T: Float32>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Result<Vec<T>> {
        if gamma.len() != self.c || beta.len() != self.c {
            candle_core::bail!("global_response_norm: gamma/beta do not match {} channels", self.c);
        }
        Ok(grn(x, gamma, beta, self.c, self.n))
    }
}

impl CustomOp3 for GrnKernel {
    fn name(&self) -> &'static str {
        "global-response-norm"
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
        let out = run_float3(self.name(), self, (s1, l1), (s2, l2), (s3, l3))?;
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
        let out = super::cuda::global_response_norm((s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_kernel_matches_the_composite_form() -> Result<()> {
        let dev = Device::Cpu;
        for (n, h, w, c) in [(2, 5, 7, 12), (1, 33, 17, 40), (3, 1, 1, 5)] {
            let x = Tensor::randn(0f32, 3., (n, h, w, c), &dev)?;
            let g = Tensor::randn(0f32, 1., (1, 1, 1, c), &dev)?;
            let b = Tensor::randn(0f32, 1., (1, 1, 1, c), &dev)?;
            let fast = global_response_norm(&x, &g, &b)?;
            let slow = global_response_norm_generic(&x, &g, &b)?;
            let err = (&fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = slow.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-5 * scale, "{n}x{h}x{w}x{c}: {err}");
            // each image is normalised on its own
            let first = global_response_norm(&x.narrow(0, 0, 1)?, &g, &b)?;
            let diff = (first - fast.narrow(0, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
            // bit-identical from run to run
            let again = global_response_norm(&x, &g, &b)?;
            assert_eq!(
                again.flatten_all()?.to_vec1::<f32>()?,
                fast.flatten_all()?.to_vec1::<f32>()?
            );
        }
        // half precision: the sum of squares of 128x128 values near 300 overflows f16 unless
        // accumulated in f32
        let x = (Tensor::ones((1, 128, 128, 4), DType::F32, &dev)? * 300.0)?.to_dtype(DType::F16)?;
        let g = Tensor::ones(4, DType::F16, &dev)?;
        let y = global_response_norm(&x, &g, &g.zeros_like()?)?.to_dtype(DType::F32)?;
        let max = y.max_all()?.to_scalar::<f32>()?;
        assert!(max.is_finite() && (max - 600.0).abs() < 1.0, "{max}");
        Ok(())
    }
}
