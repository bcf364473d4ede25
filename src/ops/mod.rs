//! Tensor operations the models need beyond candle's: a depthwise convolution that is one
//! pass (candle runs grouped convolutions as one convolution per group), a layer norm with
//! two-pass float32 statistics, a vectorised multi-threaded GELU, f32 matrix products tiled
//! one per thread with fused epilogues (each tile through the `gemm` crate, or on request a
//! system CBLAS library: [`blas`]), torch's antialiased bicubic resize, and the copies and
//! elementwise passes of the attention and timestep blocks on rayon's threads (candle copies
//! on one thread and runs its elementwise ops on a pool of its own).
//!
//! Each op has a fast CPU kernel (candle custom op) and a device-generic form built from
//! candle tensor ops, used on other devices; tests and `wuerstchen selftest` check that the
//! two agree ([`with_generic_forms`] makes the CPU run the generic forms). `cuda` holds the
//! opt-in fused CUDA kernels that replace some generic forms on a GPU.
//! Activations are channels-last (N, H, W, C) throughout the models.

mod attention;
pub mod blas;
mod conv_transpose;
mod cuda;
mod depthwise;
mod gelu;
mod grn;
mod heads;
mod math;
mod matmul;
mod modulate;
mod norm;
pub(crate) mod resize;
mod softmax;

pub use attention::{
    attention, attention_budget, attention_with_budget, bytes_per_score, chunk_plan, cpu_attention_kernel, cpu_task,
    set_attention_budget, ChunkPlan,
};
pub use conv_transpose::ConvTranspose2d;
pub use cuda::{attention_enabled as fused_cuda_attention, enabled as fused_cuda_kernels};
pub use depthwise::depthwise_conv2d_generic;
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_norm, depthwise_conv2d_residual, DepthwiseConv, Padding};
pub use gelu::gelu_erf;
pub use grn::{global_response_norm, global_response_norm_generic};
pub use heads::{merge_heads, split_heads};
pub use matmul::{linear, linear_then, matmul, LinearWeight, Then};
pub use modulate::modulate;
pub use softmax::scaled_softmax_last_dim;

pub(crate) use math::{exp_nonpositive, vectorized_fn};
pub use norm::{layer_norm, layer_norm_generic};
pub use resize::{bilinear_weights, resize_bicubic_antialias, resize_bilinear_nhwc, resize_weights};

use std::cell::Cell;

use candle_core::{backend::BackendStorage, CpuStorage, Layout, Result, Tensor, WithDType};
use half::{bf16, f16};

thread_local! {
    static GENERIC_FORMS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every op on this thread taking its device-generic form, also on the CPU:
/// how the CPU checks what other devices run against its own kernels.
pub fn with_generic_forms<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC_FORMS.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC_FORMS.with(|g| g.replace(true)));
    f()
}

/// Whether an op on `x` takes its CPU kernel (on the CPU, unless generic forms are forced).
pub(crate) fn cpu_kernel(x: &Tensor) -> bool {
    x.device().is_cpu() && !generic_forms()
}

/// Whether [`with_generic_forms`] is in force on this thread.
fn generic_forms() -> bool {
    GENERIC_FORMS.with(|g| g.get())
}

/// Runs `f` on a thread of rayon's pool when `device` is the CPU. A network's kernels are
/// hundreds of short parallel regions: started from a pool thread, each is split with the
/// other threads, which steal their share; started from outside the pool, each is sent in and
/// this thread sleeps until it is done, a wake-up of two threads per region.
pub fn on_cpu_workers<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}

/// `f(start, len)` over a batch of `n` images (the first dimension of `x`), concatenated:
/// on the CPU in f32 with more than one thread, its two halves at once (each on one of the
/// pool's threads, the others stealing their parallel regions' tiles when idle), elsewhere
/// the whole batch in one call. A step of the prior with guidance is such a batch of two:
/// as halves, its hundreds of short parallel regions become two threads' own work, with no
/// wait for each other at every op. The numbers are the same: in f32 our CPU kernels treat
/// each image alone, and a product's rows do not depend on the rows beside them
/// ([`linear`]).
pub fn split_batch(x: &Tensor, f: impl Fn(usize, usize) -> Result<Tensor> + Sync) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n < 2 || !cpu_kernel(x) || x.dtype() != candle_core::DType::F32 || rayon::current_num_threads() < 2 {
        return f(0, n);
    }
    let (a, b) = rayon::join(|| f(0, n / 2), || f(n / 2, n - n / 2));
    Tensor::cat(&[a?, b?], 0)
}

/// Whether an op with a CUDA kernel beside its CPU one (`cuda`) takes its own kernels on `x`:
/// on the CPU as [`cpu_kernel`], on CUDA when the fused kernels are switched on.
pub(crate) fn own_kernel(x: &Tensor) -> bool {
    cpu_kernel(x) || (x.device().is_cuda() && cuda::enabled() && !generic_forms())
}

/// Whether attention on CUDA takes the fused kernel (switched on, generic forms not forced).
#[cfg(feature = "cuda")]
pub(crate) fn fused_attention() -> bool {
    cuda::attention_enabled() && !generic_forms()
}

/// The float dtypes our CPU kernels take, all computed in f32.
pub(crate) trait Float32: WithDType + Copy + Send + Sync {
    fn f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Float32 for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Float32 for f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Float32 for bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// A CPU kernel over one tensor, written once for every float dtype (computed in f32).
pub(crate) trait FloatKernel1 {
    fn run<T: Float32>(&self, x: &[T], l: &Layout) -> Result<Vec<T>>;
}

/// A CPU kernel over a tensor and two parameter tensors of the same dtype.
pub(crate) trait FloatKernel3 {
    fn run<T: Float32>(&self, x: &[T], a: &[T], b: &[T]) -> Result<Vec<T>>;
}

/// Runs `k` on an f32, f16 or bf16 storage.
pub(crate) fn run_float1(name: &str, k: &impl FloatKernel1, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(x) => WithDType::to_cpu_storage_owned(k.run(slice_of(x, l)?, l)?),
        CpuStorage::F16(x) => WithDType::to_cpu_storage_owned(k.run(slice_of(x, l)?, l)?),
        CpuStorage::BF16(x) => WithDType::to_cpu_storage_owned(k.run(slice_of(x, l)?, l)?),
        _ => candle_core::bail!("{name}: unsupported dtype {:?}", s.dtype()),
    })
}

/// Runs `k` on three storages of one float dtype.
pub(crate) fn run_float3(
    name: &str,
    k: &impl FloatKernel3,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    use CpuStorage::{BF16, F16, F32};
    Ok(match (s1, s2, s3) {
        (F32(x), F32(a), F32(b)) => {
            WithDType::to_cpu_storage_owned(k.run(slice_of(x, l1)?, slice_of(a, l2)?, slice_of(b, l3)?)?)
        }
        (F16(x), F16(a), F16(b)) => {
            WithDType::to_cpu_storage_owned(k.run(slice_of(x, l1)?, slice_of(a, l2)?, slice_of(b, l3)?)?)
        }
        (BF16(x), BF16(a), BF16(b)) => {
            WithDType::to_cpu_storage_owned(k.run(slice_of(x, l1)?, slice_of(a, l2)?, slice_of(b, l3)?)?)
        }
        _ => candle_core::bail!(
            "{name}: unsupported or mixed dtypes {:?}/{:?}/{:?}",
            s1.dtype(),
            s2.dtype(),
            s3.dtype()
        ),
    })
}

/// The part of a CPU storage slice that a contiguous layout covers.
pub(crate) fn slice_of<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("expected a contiguous tensor"),
    }
}

/// `PixelUnshuffle(p)` on channels-last input: (N, H, W, C) -> (N, H/p, W/p, C*p*p), with
/// torch's channel order `c*p*p + i*p + j`.
pub fn pixel_unshuffle(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (n, h, w, c) = x.dims4()?;
    x.reshape((n, h / p, p, w / p, p, c))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((n, h / p, w / p, c * p * p))
}

/// `PixelShuffle(p)` on channels-last input: (N, H, W, C*p*p) -> (N, H*p, W*p, C), the inverse
/// of [`pixel_unshuffle`].
pub fn pixel_shuffle(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (n, h, w, cpp) = x.dims4()?;
    let c = cpp / (p * p);
    x.reshape((n, h, w, c, p, p))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((n, h * p, w * p, c))
}

/// (N, C, H, W) -> (N, H, W, C), contiguous.
pub fn nchw_to_nhwc(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()
}

/// (N, H, W, C) -> (N, C, H, W), contiguous.
pub fn nhwc_to_nchw(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?.contiguous()
}

/// ||a - b|| / ||b|| (f32 tensors), for the ops' tests.
#[cfg(test)]
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let sum_sq = |t: &Tensor| t.sqr().and_then(|t| t.sum_all()).and_then(|t| t.to_scalar::<f32>());
    let d = (a - b).and_then(|d| sum_sq(&d)).unwrap_or(f32::NAN);
    (d / sum_sq(b).unwrap_or(f32::NAN)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    #[test]
    fn cpu_work_runs_on_a_pool_thread() {
        assert_eq!(rayon::current_thread_index(), None, "the test starts outside the pool");
        let on_pool = on_cpu_workers(&Device::Cpu, || rayon::current_thread_index().is_some());
        assert!(on_pool, "CPU kernels must start their regions from a pool thread");
    }

    #[test]
    fn pixel_shuffles_match_torch_channel_order() -> Result<()> {
        // torch: PixelUnshuffle(2)(x)[0, c*4 + i*2 + j, y, x'] == x[0, c, 2y+i, 2x'+j]
        let x = Tensor::arange(0f32, 2. * 4. * 6., &Device::Cpu)?.reshape((1, 2, 4, 6))?;
        let un = nhwc_to_nchw(&pixel_unshuffle(&nchw_to_nhwc(&x)?, 2)?)?;
        assert_eq!(un.dims(), &[1, 8, 2, 3]);
        for c in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    for y in 0..2 {
                        for xx in 0..3 {
                            let a = un.i((0, c * 4 + i * 2 + j, y, xx))?.to_scalar::<f32>()?;
                            let b = x.i((0, c, 2 * y + i, 2 * xx + j))?.to_scalar::<f32>()?;
                            assert_eq!(a, b);
                        }
                    }
                }
            }
        }
        let back = pixel_shuffle(&nchw_to_nhwc(&un)?, 2)?;
        let diff = (nhwc_to_nchw(&back)? - &x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
