//! The TimestepBlock's modulation `x * (1 + a) + b`, with `a` and `b` one value per image
//! and channel: on the CPU in f32 one pass on every thread, where candle's broadcast ops take
//! two passes over `x`. The same arithmetic, so the same bits: `1 + a` rounded first, then
//! the product and the sum each rounded (Rust never fuses them into an FMA).

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice_of, vectorized_fn};

/// `x`: (N, .., C); `a`, `b`: (N, C) -> `x * (1 + a) + b`, each image by its own `a` and `b`.
pub fn modulate(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let c = x.dim(candle_core::D::Minus1)?;
    if a.dims() != [n, c] || b.dims() != [n, c] {
        candle_core::bail!("modulate: x {:?} with a {:?} and b {:?}", x.dims(), a.dims(), b.dims());
    }
    let f32s = [x, a, b].iter().all(|t| t.dtype() == DType::F32);
    if super::cpu_kernel(x) && f32s {
        let scale = (a + 1.0)?.contiguous()?;
        return x
            .contiguous()?
            .apply_op3_no_bwd(&scale, &b.contiguous()?, &Modulate)
            .and_then(|y| y.reshape(x.shape()));
    }
    let mut shape = vec![1; x.rank()];
    shape[0] = n;
    shape[x.rank() - 1] = c;
    x.broadcast_mul(&(a + 1.0)?.reshape(shape.as_slice())?)?
        .broadcast_add(&b.reshape(shape)?)
}

struct Modulate;

impl candle_core::CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "modulate"
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
        let (CpuStorage::F32(x), CpuStorage::F32(scale), CpuStorage::F32(shift)) = (s1, s2, s3) else {
            candle_core::bail!("modulate takes f32");
        };
        let (x, scale, shift) = (slice_of(x, l1)?, slice_of(scale, l2)?, slice_of(shift, l3)?);
        let (n, c) = l2.shape().dims2()?;
        let per_image = x.len() / n.max(1);
        // rows (pixels) per task: about 64 KiB of output each
        let rows = (16384 / c.max(1)).max(1);
        let mut out: Vec<f32> = Vec::with_capacity(x.len());
        let spare = &mut out.spare_capacity_mut()[..x.len()];
        spare
            .par_chunks_mut(per_image)
            .zip(x.par_chunks(per_image))
            .enumerate()
            .flat_map(|(img, (o, x))| {
                o.par_chunks_mut(rows * c)
                    .zip(x.par_chunks(rows * c))
                    .map(move |(o, x)| (img, o, x))
            })
            .for_each(|(img, o, x)| {
                let (s, t) = (&scale[img * c..][..c], &shift[img * c..][..c]);
                rows_times_plus(o, x, s, t);
            });
        // SAFETY: the tasks wrote every element of the first x.len().
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

vectorized_fn! {
    /// `out = x * scale + shift` per pixel (rows of `scale.len()` channels).
    fn rows_times_plus(out: &mut [std::mem::MaybeUninit<f32>], x: &[f32], scale: &[f32], shift: &[f32]) {
        let c = scale.len();
        for (o, x) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for (((o, x), s), t) in o.iter_mut().zip(x).zip(scale).zip(shift) {
                o.write(x * s + t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_pass_gives_the_broadcast_ops_bits() -> Result<()> {
        let dev = Device::Cpu;
        // tasks that split an image's pixels, and one image smaller than a task
        for (n, h, w, c) in [(2, 40, 30, 64), (3, 2, 3, 5)] {
            let x = Tensor::randn(0f32, 1., (n, h, w, c), &dev)?;
            let a = Tensor::randn(0f32, 1., (n, c), &dev)?;
            let b = Tensor::randn(0f32, 1., (n, c), &dev)?;
            let got = modulate(&x, &a, &b)?;
            let generic = crate::ops::with_generic_forms(|| modulate(&x, &a, &b))?;
            let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            assert_eq!(got.dims(), x.dims());
            assert_eq!(bits(&got)?, bits(&generic)?);
            // the generic form against an element computed by hand
            let (xv, av, bv) = (bits(&x)?, bits(&a)?, bits(&b)?);
            let i = xv.len() - 1;
            assert_eq!(bits(&got)?[i], xv[i] * (av[n * c - 1] + 1.0) + bv[n * c - 1]);
        }
        Ok(())
    }
}
