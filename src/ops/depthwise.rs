//! Depthwise (groups = channels) 2-D convolution, stride 1, "same" output size, on
//! channels-last input. torch's `Conv2d(c, c, k, padding=k//2, groups=c)` and, with
//! `Padding::Replicate`, `Sequential(ReplicationPad2d(k//2), Conv2d(c, c, k, groups=c))`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::{run_float3, vectorized_fn, Float32, FloatKernel3};

/// How pixels outside the image are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Zeros,
    Replicate,
}

/// A depthwise convolution layer, loaded from torch's `(C, 1, k, k)` weight and kept as
/// `(k, k, C)` so that the kernel reads each tap's weights for all channels contiguously.
#[derive(Debug, Clone)]
pub struct DepthwiseConv {
    weight: Tensor,
    bias: Tensor,
    padding: Padding,
}

impl DepthwiseConv {
    pub fn new(channels: usize, kernel: usize, padding: Padding, vb: VarBuilder) -> Result<Self> {
        let weight = vb
            .get((channels, 1, kernel, kernel), "weight")?
            .reshape((channels, kernel, kernel))?
            .permute((1, 2, 0))?
            .contiguous()?;
        let bias = vb.get(channels, "bias")?;
        // the device-generic form accumulates in f32: converting once here, not at every call
        let (weight, bias) = if vb.device().is_cpu() {
            (weight, bias)
        } else {
            (weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?)
        };
        Ok(Self { weight, bias, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        depthwise_conv2d(x, &self.weight, &self.bias, self.padding)
    }

    /// `layer_norm(self(x))` over channels, without weights; see [`depthwise_conv2d_norm`].
    pub fn forward_normed(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        depthwise_conv2d_norm(x, &self.weight, &self.bias, self.padding, eps)
    }

    /// `residual + self(x) * scale`; see [`depthwise_conv2d_residual`].
    pub fn forward_residual(&self, x: &Tensor, scale: f64, residual: &Tensor) -> Result<Tensor> {
        depthwise_conv2d_residual(x, &self.weight, &self.bias, self.padding, scale, residual)
    }
}

/// `x`: (N, H, W, C), `weight`: (k, k, C) with k odd, `bias`: (C). Accumulates in f32. The CPU
/// kernel takes weights in `x`'s dtype; the generic form any float dtype (f32 spares casts).
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: Padding) -> Result<Tensor> {
    check_shapes(x, weight, bias)?;
    if super::own_kernel(x) {
        x.contiguous()?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.contiguous()?,
            &DepthwiseKernel { padding, then: None },
        )
    } else {
        depthwise_conv2d_generic(x, weight, bias, padding)
    }
}

/// `layer_norm(depthwise_conv2d(x))` over channels without weights, as ConvNeXt blocks
/// follow their convolution. The CPU kernel normalises each output row in its own pass, the
/// convolution's output rounded to `x`'s dtype first: the same bits as the two ops, which other
/// devices run.
pub fn depthwise_conv2d_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: Padding, eps: f64) -> Result<Tensor> {
    check_shapes(x, weight, bias)?;
    if super::cpu_kernel(x) {
        x.contiguous()?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.contiguous()?,
            &DepthwiseKernel {
                padding,
                then: Some(After::Norm { eps: eps as f32 }),
            },
        )
    } else {
        super::layer_norm(&depthwise_conv2d(x, weight, bias, padding)?, eps, None)
    }
}

/// `residual + depthwise_conv2d(x) * scale` (`residual` shaped as `x`), a residual branch with
/// a learned scale. The CPU kernel in f32 adds it in its pass over each output row: the same
/// bits as the separate ops, which other dtypes and devices run (in half precision they round
/// between the ops, as torch does).
pub fn depthwise_conv2d_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: Padding,
    scale: f64,
    residual: &Tensor,
) -> Result<Tensor> {
    check_shapes(x, weight, bias)?;
    if super::cpu_kernel(x) && x.dtype() == DType::F32 && residual.dtype() == DType::F32 && residual.dims() == x.dims()
    {
        let then = After::ScaledResidual {
            scale: scale as f32,
            residual: residual.contiguous()?,
        };
        x.contiguous()?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.contiguous()?,
            &DepthwiseKernel {
                padding,
                then: Some(then),
            },
        )
    } else {
        residual + (depthwise_conv2d(x, weight, bias, padding)? * scale)?
    }
}

fn check_shapes(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let (_, _, _, c) = x.dims4()?;
    let (k, k2, wc) = weight.dims3()?;
    if k != k2 || k % 2 == 0 || wc != c || bias.dims1()? != c {
        candle_core::bail!(
            "depthwise_conv2d: weight {:?} / bias {:?} do not fit input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        );
    }
    Ok(())
}

/// The same convolution from candle tensor ops: pad, then one multiply-add per tap
/// (k*k ops whatever the channel count). Used on devices without a dedicated kernel.
pub fn depthwise_conv2d_generic(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: Padding) -> Result<Tensor> {
    let dtype = x.dtype();
    let (_, h, w, _) = x.dims4()?;
    let (k, _, c) = weight.dims3()?;
    let pad = k / 2;
    let x = x.to_dtype(DType::F32)?;
    let padded = match padding {
        Padding::Zeros => x.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?,
        Padding::Replicate => x.pad_with_same(1, pad, pad)?.pad_with_same(2, pad, pad)?,
    };
    let weight = weight.to_dtype(DType::F32)?;
    let mut acc = bias.to_dtype(DType::F32)?.reshape((1, 1, 1, c))?;
    for ky in 0..k {
        for kx in 0..k {
            let tap = weight.get(ky)?.get(kx)?.reshape((1, 1, 1, c))?;
            let window = padded.narrow(1, ky, h)?.narrow(2, kx, w)?;
            acc = window.broadcast_mul(&tap)?.broadcast_add(&acc)?;
        }
    }
    acc.to_dtype(dtype)
}

struct DepthwiseKernel {
    padding: Padding,
    then: Option<After>,
}

/// What the kernel applies to each output row in its pass.
enum After {
    /// `residual + conv * scale` ([`depthwise_conv2d_residual`])
    ScaledResidual { scale: f32, residual: Tensor },
    /// the layer norm over channels ([`depthwise_conv2d_norm`])
    Norm { eps: f32 },
}

/// [`After`] as one dtype's kernel sees it: the residual as a slice.
#[derive(Clone, Copy)]
enum RowThen<'a, T> {
    ScaledResidual { scale: f32, residual: &'a [T] },
    Norm { eps: f32 },
}

/// Index `i + d` into `0..n`, or the edge pixel (Replicate) / nothing (Zeros).
#[inline(always)]
fn source_index(i: usize, d: isize, n: usize, padding: Padding) -> Option<usize> {
    let j = i as isize + d;
    if (0..n as isize).contains(&j) {
        Some(j as usize)
    } else {
        match padding {
            Padding::Zeros => None,
            Padding::Replicate => Some(j.clamp(0, n as isize - 1) as usize),
        }
    }
}

fn depthwise_cpu<T: Float32>(
    x: &[T],
    weight: &[T],
    bias: &[T],
    (n, h, w, c): (usize, usize, usize, usize),
    k: usize,
    padding: Padding,
    then: Option<RowThen<T>>,
) -> Vec<T> {
    let weight: Vec<f32> = weight.iter().map(|v| v.f32()).collect();
    let bias: Vec<f32> = bias.iter().map(|v| v.f32()).collect();
    let row_len = w * c;
    let mut out = vec![T::from_f32(0.0); n * h * row_len];
    let conv = Conv { h, w, c, k, padding };
    out.par_chunks_mut(row_len).enumerate().for_each(|(row, out_row)| {
        let (b, y) = (row / h, row % h);
        let image = &x[b * h * row_len..][..h * row_len];
        let mut acc = vec![0f32; row_len];
        let mut src = vec![0f32; row_len];
        let then = then.map(|then| match then {
            RowThen::ScaledResidual { scale, residual } => RowThen::ScaledResidual {
                scale,
                residual: &residual[row * row_len..][..row_len],
            },
            norm => norm,
        });
        output_row(out_row, image, y, &weight, &bias, &mut acc, &mut src, conv, then);
    });
    out
}

/// The sizes of one depthwise convolution.
#[derive(Clone, Copy)]
struct Conv {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    padding: Padding,
}

vectorized_fn! {
    /// Output row `y` of one `image` (h rows of w * c): each tap's weights multiply all
    /// channels of a pixel at once. `acc` and `src` are scratch rows. `then`: what follows in
    /// the same pass (with this row of the residual).
    #[allow(clippy::too_many_arguments)]
    fn output_row<T: Float32>(
        out_row: &mut [T],
        image: &[T],
        y: usize,
        weight: &[f32],
        bias: &[f32],
        acc: &mut [f32],
        src: &mut [f32],
        conv: Conv,
        then: Option<RowThen<T>>,
    ) {
        let Conv { h, w, c, k, padding } = conv;
        let pad = k as isize / 2;
        let row_len = w * c;
        for px in acc.chunks_exact_mut(c) {
            px.copy_from_slice(bias);
        }
        for ky in 0..k {
            let Some(iy) = source_index(y, ky as isize - pad, h, padding) else {
                continue;
            };
            for (s, v) in src.iter_mut().zip(&image[iy * row_len..][..row_len]) {
                *s = v.f32();
            }
            for kx in 0..k {
                let tap = &weight[(ky * k + kx) * c..][..c];
                for xo in 0..w {
                    let Some(ix) = source_index(xo, kx as isize - pad, w, padding) else {
                        continue;
                    };
                    let input = &src[ix * c..][..c];
                    let a = &mut acc[xo * c..][..c];
                    for ((a, &wv), &iv) in a.iter_mut().zip(tap).zip(input) {
                        *a += wv * iv;
                    }
                }
            }
        }
        match then {
            Some(RowThen::ScaledResidual { scale, residual }) => {
                for ((o, a), r) in out_row.iter_mut().zip(acc.iter()).zip(residual) {
                    *o = T::from_f32(r.f32() + *a * scale);
                }
            }
            Some(RowThen::Norm { eps }) => {
                // as `layer_norm` would read the convolution's output: in its dtype
                let stored: Vec<T> = acc.iter().map(|a| T::from_f32(*a)).collect();
                super::norm::normalize_rows(out_row, &stored, &mut src[..c], eps, None);
            }
            None => {
                for (o, a) in out_row.iter_mut().zip(acc.iter()) {
                    *o = T::from_f32(*a);
                }
            }
        }
    }
}

impl FloatKernel3 for DepthwiseShape<'_> {
    fn run<T: Float32>(&self, x: &[T], w: &[T], b: &[T]) -> Result<Vec<T>> {
        let then = match self.then {
            Some(ShapeThen::ScaledResidual {
                scale,
                residual: (s, l),
            }) => {
                let residual = super::slice_of(T::cpu_storage_as_slice(s)?, l)?;
                if residual.len() != x.len() {
                    candle_core::bail!("depthwise_conv2d: the residual does not match the input");
                }
                Some(RowThen::ScaledResidual { scale, residual })
            }
            Some(ShapeThen::Norm { eps }) => Some(RowThen::Norm { eps }),
            None => None,
        };
        Ok(depthwise_cpu(x, w, b, self.dims, self.k, self.padding, then))
    }
}

impl CustomOp3 for DepthwiseKernel {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc"
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
        let residual = match &self.then {
            Some(After::ScaledResidual { scale, residual }) => Some((residual.storage_and_layout(), *scale)),
            _ => None,
        };
        let then = match (&self.then, &residual) {
            (Some(After::ScaledResidual { .. }), Some(((guard, l), scale))) => match &**guard {
                candle_core::Storage::Cpu(s) => Some(ShapeThen::ScaledResidual {
                    scale: *scale,
                    residual: (s, *l),
                }),
                _ => candle_core::bail!("depthwise_conv2d: the residual is not on the CPU"),
            },
            (Some(After::Norm { eps }), _) => Some(ShapeThen::Norm { eps: *eps }),
            _ => None,
        };
        let shape = DepthwiseShape {
            dims: l1.shape().dims4()?,
            k: l2.shape().dims()[0],
            padding: self.padding,
            then,
        };
        let out = run_float3(self.name(), &shape, (s1, l1), (s2, l2), (s3, l3))?;
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
        if self.then.is_some() {
            candle_core::bail!("depthwise_conv2d: what follows in the pass is the CPU kernel's");
        }
        let out = super::cuda::depthwise(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            l2.shape().dims()[0],
            self.padding == Padding::Replicate,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// What the kernel needs to know besides the data.
struct DepthwiseShape<'a> {
    dims: (usize, usize, usize, usize),
    k: usize,
    padding: Padding,
    then: Option<ShapeThen<'a>>,
}

/// [`After`] with the residual's storage, before its dtype is known.
#[derive(Clone, Copy)]
enum ShapeThen<'a> {
    ScaledResidual {
        scale: f32,
        residual: (&'a CpuStorage, &'a Layout),
    },
    Norm {
        eps: f32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rel_err;
    use crate::ops::{nchw_to_nhwc, nhwc_to_nchw};
    use candle_core::Device;

    /// candle's own grouped conv2d (one conv per channel) as the independent reference.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, padding: Padding) -> Tensor {
        let (k, _, c) = w.dims3().unwrap();
        let nchw = nhwc_to_nchw(x).unwrap();
        let (input, pad) = match padding {
            Padding::Zeros => (nchw, k / 2),
            Padding::Replicate => (
                nchw.pad_with_same(2, k / 2, k / 2)
                    .unwrap()
                    .pad_with_same(3, k / 2, k / 2)
                    .unwrap(),
                0,
            ),
        };
        let w_torch = w
            .permute((2, 0, 1))
            .unwrap()
            .reshape((c, 1, k, k))
            .unwrap()
            .contiguous()
            .unwrap();
        let y = input.conv2d(&w_torch, pad, 1, 1, c).unwrap();
        let y = y.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
        nchw_to_nhwc(&y).unwrap()
    }

    #[test]
    fn cpu_kernel_and_generic_form_match_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (k, padding) in [(3, Padding::Zeros), (5, Padding::Zeros), (3, Padding::Replicate)] {
            let x = Tensor::randn(0f32, 1., (2, 7, 5, 6), &dev)?;
            let w = Tensor::randn(0f32, 1., (k, k, 6), &dev)?;
            let b = Tensor::randn(0f32, 1., 6, &dev)?;
            let want = reference(&x, &w, &b, padding);
            let fast = depthwise_conv2d(&x, &w, &b, padding)?;
            let generic = depthwise_conv2d_generic(&x, &w, &b, padding)?;
            assert!(rel_err(&fast, &want) < 1e-6, "k={k} {padding:?}");
            assert!(rel_err(&generic, &want) < 1e-6, "k={k} {padding:?}");
            // half precision accumulates in f32: only the input/output rounding remains
            let half = depthwise_conv2d(
                &x.to_dtype(DType::BF16)?,
                &w.to_dtype(DType::BF16)?,
                &b.to_dtype(DType::BF16)?,
                padding,
            )?;
            assert!(rel_err(&half.to_dtype(DType::F32)?, &want) < 1e-2);
        }
        // a strided (non-contiguous) input gives the same result
        let x = Tensor::randn(0f32, 1., (1, 5, 3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1., (3, 3, 4), &dev)?;
        let b = Tensor::randn(0f32, 1., 4, &dev)?;
        let strided = x.transpose(1, 2)?;
        let a = depthwise_conv2d(&strided, &w, &b, Padding::Zeros)?;
        let c = depthwise_conv2d(&strided.contiguous()?, &w, &b, Padding::Zeros)?;
        assert_eq!(rel_err(&a, &c), 0.0);
        Ok(())
    }

    #[test]
    fn the_norm_in_the_pass_gives_the_separate_ops_bits() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (k, padding) in [(3, Padding::Zeros), (5, Padding::Zeros), (3, Padding::Replicate)] {
                // channels not a multiple of the norm's eight accumulators, a large mean
                let x = (Tensor::randn(0f32, 1., (2, 6, 5, 13), &dev)? + 3.0)?.to_dtype(dtype)?;
                let w = Tensor::randn(0f32, 1., (k, k, 13), &dev)?.to_dtype(dtype)?;
                let b = Tensor::randn(0f32, 1., 13, &dev)?.to_dtype(dtype)?;
                let separate = crate::ops::layer_norm(&depthwise_conv2d(&x, &w, &b, padding)?, 1e-6, None)?;
                let fused = depthwise_conv2d_norm(&x, &w, &b, padding, 1e-6)?;
                let bits = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                assert_eq!(bits(&fused)?, bits(&separate)?, "{dtype:?} k={k} {padding:?}");
                let generic = crate::ops::with_generic_forms(|| depthwise_conv2d_norm(&x, &w, &b, padding, 1e-6))?;
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(rel_err(&generic.to_dtype(DType::F32)?, &separate.to_dtype(DType::F32)?) < tolerance);
            }
        }
        Ok(())
    }

    #[test]
    fn the_scaled_residual_in_the_pass_gives_the_separate_ops_bits() -> Result<()> {
        let dev = Device::Cpu;
        for padding in [Padding::Zeros, Padding::Replicate] {
            let x = Tensor::randn(0f32, 1., (2, 6, 5, 8), &dev)?;
            let w = Tensor::randn(0f32, 1., (3, 3, 8), &dev)?;
            let b = Tensor::randn(0f32, 1., 8, &dev)?;
            // a strided residual, as a view of another layout
            let residual = Tensor::randn(0f32, 1., (2, 5, 6, 8), &dev)?.transpose(1, 2)?;
            let scale = -0.731;
            let separate = (&residual + (depthwise_conv2d(&x, &w, &b, padding)? * scale)?)?;
            let fused = depthwise_conv2d_residual(&x, &w, &b, padding, scale, &residual)?;
            let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
            assert_eq!(bits(&fused)?, bits(&separate)?, "{padding:?}");
            let generic =
                crate::ops::with_generic_forms(|| depthwise_conv2d_residual(&x, &w, &b, padding, scale, &residual))?;
            assert!(rel_err(&generic, &separate) < 1e-6);
        }
        Ok(())
    }
}
