//! `ConvTranspose2d(c_in, c_out, k, stride, padding)` on channels-last input. On the CPU (and
//! on CUDA with the fused kernels switched on) it is one matrix product (every input pixel
//! times the (c_in, k*k*c_out) weight) followed by an overlap-add of the k x k patches into
//! the output; candle's CPU kernel loops over every output element and tap. Elsewhere
//! candle's own kernel runs (NCHW, permuted around).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::{nchw_to_nhwc, nhwc_to_nchw, run_float1, Float32, FloatKernel1};

#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    /// torch layout (c_in, c_out, k, k), for the device-generic path
    weight: Tensor,
    /// (c_in, k * k * c_out): the CPU path's matrix
    matrix: Tensor,
    bias: Tensor,
    k: usize,
    stride: usize,
    padding: usize,
}

impl ConvTranspose2d {
    pub fn load(c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((c_in, c_out, k, k), "weight")?;
        let matrix = weight
            .permute((0, 2, 3, 1))?
            .reshape((c_in, k * k * c_out))?
            .contiguous()?;
        Ok(Self {
            weight,
            matrix,
            bias: vb.get(c_out, "bias")?,
            k,
            stride,
            padding,
        })
    }

    /// (N, H, W, c_in) -> (N, (H-1)*stride + k - 2*padding, ..., c_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !super::own_kernel(x) {
            let y = nhwc_to_nchw(x)?.conv_transpose2d(&self.weight, self.padding, 0, self.stride, 1)?;
            return nchw_to_nhwc(&y)?.broadcast_add(&self.bias);
        }
        let (n, h, w, c_in) = x.dims4()?;
        let c_out = self.bias.dim(0)?;
        let patches = x.reshape((n * h * w, c_in))?.matmul(&self.matrix)?;
        overlap_add(&patches, (n, h, w, c_out), self.k, self.stride, self.padding)?.broadcast_add(&self.bias)
    }
}

/// Sums (N*H*W, k*k*C) `patches` into the (N, OH, OW, C) output of a transposed convolution
/// over an (N, H, W, _) input (`nhwc` = (N, H, W, C)).
pub(crate) fn overlap_add(
    patches: &Tensor,
    (n, h, w, c): (usize, usize, usize, usize),
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    patches.contiguous()?.apply_op1_no_bwd(&OverlapAdd {
        n,
        h,
        w,
        k,
        c,
        stride,
        padding,
    })
}

/// Sums (N*H*W, k*k*C) patches into the (N, OH, OW, C) output of a transposed convolution.
struct OverlapAdd {
    n: usize,
    h: usize,
    w: usize,
    k: usize,
    c: usize,
    stride: usize,
    padding: usize,
}

impl OverlapAdd {
    fn out_size(&self, size: usize) -> usize {
        ((size - 1) * self.stride + self.k).saturating_sub(2 * self.padding)
    }

    fn overlap_add<T: Float32>(&self, src: &[T]) -> Vec<T> {
        let (oh, ow) = (self.out_size(self.h), self.out_size(self.w));
        let (k, c, s, p) = (self.k, self.c, self.stride as isize, self.padding as isize);
        let mut out = vec![T::from_f32(0.0); self.n * oh * ow * c];
        // each output row gathers from the input rows and kernel rows that land on it
        out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
            let (b, oy) = (row / oh, (row % oh) as isize);
            let mut acc = vec![0f32; ow * c];
            for ky in 0..k as isize {
                let t = oy + p - ky;
                if t < 0 || t % s != 0 || t / s >= self.h as isize {
                    continue;
                }
                let iy = (t / s) as usize;
                for ix in 0..self.w {
                    let patch = &src[((b * self.h + iy) * self.w + ix) * k * k * c..][..k * k * c];
                    for kx in 0..k as isize {
                        let ox = ix as isize * s + kx - p;
                        if ox < 0 || ox >= ow as isize {
                            continue;
                        }
                        let tap = &patch[((ky as usize) * k + kx as usize) * c..][..c];
                        for (a, v) in acc[ox as usize * c..][..c].iter_mut().zip(tap) {
                            *a += v.f32();
                        }
                    }
                }
            }
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = T::from_f32(*a);
            }
        });
        out
    }
}

impl FloatKernel1 for OverlapAdd {
    fn run<T: Float32>(&self, x: &[T], _: &Layout) -> Result<Vec<T>> {
        Ok(self.overlap_add(x))
    }
}

impl CustomOp1 for OverlapAdd {
    fn name(&self) -> &'static str {
        "conv-transpose-overlap-add"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.n, self.out_size(self.h), self.out_size(self.w), self.c));
        Ok((run_float1(self.name(), self, s, l)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = (self.n, self.out_size(self.h), self.out_size(self.w), self.c);
        let geometry = (self.h, self.w, self.k, self.stride, self.padding);
        Ok((super::cuda::overlap_add((s, l), dims, geometry)?, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn matches_candles_conv_transpose() -> Result<()> {
        let dev = Device::Cpu;
        for (k, s, p, h, w) in [
            (4, 2, 1, 5, 7),
            (3, 2, 1, 4, 4),
            (2, 2, 0, 3, 5),
            (3, 1, 1, 6, 2),
            (5, 3, 2, 4, 3),
        ] {
            let (c_in, c_out) = (6, 5);
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let _ = vb.get_with_hints(
                (c_in, c_out, k, k),
                "weight",
                candle_nn::Init::Randn { mean: 0., stdev: 1. },
            )?;
            let _ = vb.get_with_hints(c_out, "bias", candle_nn::Init::Randn { mean: 0., stdev: 1. })?;
            let conv = ConvTranspose2d::load(c_in, c_out, k, s, p, vb)?;
            let x = Tensor::randn(0f32, 1., (2, h, w, c_in), &dev)?;
            let ours = conv.forward(&x)?;
            let want = nhwc_to_nchw(&x)?.conv_transpose2d(&conv.weight, p, 0, s, 1)?;
            let want = nchw_to_nhwc(&want)?.broadcast_add(&conv.bias)?;
            assert_eq!(ours.dims(), want.dims(), "k{k} s{s} p{p}");
            let err = (&ours - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "k{k} s{s} p{p}: {err}");
        }
        Ok(())
    }
}
