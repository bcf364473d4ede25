//! The fused CUDA kernels of `fused.cu` for the depthwise convolution, GlobalResponseNorm,
//! layer norm, the transposed convolution's overlap-add and attention (their bodies, and why
//! they are written in C, are described in `fused.h`).
//!
//! They are opt-in: with `WUERSTCHEN_FUSED_CUDA=1` a CUDA build runs the first four in place
//! of the candle-op forms, with `WUERSTCHEN_FUSED_ATTENTION=1` the attention kernel. They
//! become the default once `wuerstchen selftest` has passed with them on a GPU; until then
//! the tests check their bodies on the CPU through the host harness.

use std::sync::OnceLock;

/// Whether the fused kernels for the depthwise convolution, GRN and layer norm replace the
/// candle-op forms on CUDA devices (`WUERSTCHEN_FUSED_CUDA=1`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| switched_on("WUERSTCHEN_FUSED_CUDA"))
}

/// Whether attention on CUDA devices takes the fused kernel (`WUERSTCHEN_FUSED_ATTENTION=1`),
/// a switch of its own: its speed against cuBLAS and the blocked softmax is the open question.
pub fn attention_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| switched_on("WUERSTCHEN_FUSED_ATTENTION"))
}

fn switched_on(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// The dtype code of `fused.h` (`WU_F32`, `WU_BF16`, `WU_F16`).
#[cfg(any(feature = "cuda", test))]
fn dtype_code(dtype: candle_core::DType) -> candle_core::Result<i32> {
    use candle_core::DType;
    match dtype {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        other => candle_core::bail!("the fused CUDA kernels take f32, bf16 or f16, not {other:?}"),
    }
}

#[cfg(feature = "cuda")]
pub(crate) use launch::{attention, depthwise, global_response_norm, layer_norm, overlap_add};

/// `fused.h`'s `WU_ATTN_MAX_D`: the largest head dimension the attention kernel takes.
#[cfg(any(feature = "cuda", test))]
pub(crate) const ATTENTION_MAX_HEAD_DIM: usize = 128;

#[cfg(feature = "cuda")]
mod launch {
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaStream, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};
    use half::{bf16, f16};

    use super::dtype_code;

    /// A tensor's storage and layout, as candle hands them to `cuda_fwd`.
    type Operand<'a> = (&'a CudaStorage, &'a Layout);

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

    /// A contiguous input as the kernels take it: a typed view (so that cudarc orders the
    /// launch after the writes to it) and its dtype code, the two arguments `fused.cu` takes
    /// for each tensor.
    struct Input<'a> {
        view: View<'a>,
        code: i32,
    }

    enum View<'a> {
        F32(CudaView<'a, f32>),
        Bf16(CudaView<'a, bf16>),
        F16(CudaView<'a, f16>),
    }

    fn input<'a>(s: &'a CudaStorage, l: &Layout) -> Result<Input<'a>> {
        let (start, end) = match l.contiguous_offsets() {
            Some(range) => range,
            None => candle_core::bail!("the fused CUDA kernels take contiguous tensors"),
        };
        let code = dtype_code(s.dtype())?;
        let view = match &s.slice {
            CudaStorageSlice::F32(v) => View::F32(v.slice(start..end)),
            CudaStorageSlice::BF16(v) => View::Bf16(v.slice(start..end)),
            CudaStorageSlice::F16(v) => View::F16(v.slice(start..end)),
            _ => unreachable!("dtype_code takes only f32, bf16 and f16"),
        };
        Ok(Input { view, code })
    }

    /// The input's pointer, then its dtype code.
    fn push_input<'a>(args: &mut LaunchArgs<'a>, input: &'a Input<'_>) {
        match &input.view {
            View::F32(v) => args.arg(v),
            View::Bf16(v) => args.arg(v),
            View::F16(v) => args.arg(v),
        };
        args.arg(&input.code);
    }

    /// A kernel's output as candle's storage.
    fn storage(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
        CudaStorage {
            slice,
            device: dev.clone(),
        }
    }

    /// An uninitialised output of `len` elements in dtype `code`.
    fn output(dev: &CudaDevice, code: i32, len: usize) -> Result<CudaStorageSlice> {
        // SAFETY: every element is written by the kernel the output is made for.
        unsafe {
            Ok(match code {
                0 => CudaStorageSlice::F32(dev.alloc::<f32>(len)?),
                1 => CudaStorageSlice::BF16(dev.alloc::<bf16>(len)?),
                _ => CudaStorageSlice::F16(dev.alloc::<f16>(len)?),
            })
        }
    }

    fn push_output<'a>(args: &mut LaunchArgs<'a>, out: &'a mut CudaStorageSlice) {
        match out {
            CudaStorageSlice::F32(v) => args.arg(v),
            CudaStorageSlice::BF16(v) => args.arg(v),
            CudaStorageSlice::F16(v) => args.arg(v),
            _ => unreachable!("`output` makes f32, bf16 or f16"),
        };
    }

    fn grid(threads: usize) -> Result<LaunchConfig> {
        match u32::try_from(threads) {
            Ok(n) => Ok(LaunchConfig::for_num_elems(n)),
            Err(_) => candle_core::bail!("{threads} threads are too many for one fused kernel launch"),
        }
    }

    /// One kernel of the PTX module (loaded once per device) on the device's stream.
    struct Kernel {
        func: CudaFunction,
        stream: Arc<CudaStream>,
    }

    impl Kernel {
        fn new(dev: &CudaDevice, name: &str) -> Result<Self> {
            let func = dev.get_or_load_custom_func(name, "wuerstchen_fused", PTX)?;
            Ok(Self {
                func: func.into_cuda_function(),
                stream: dev.cuda_stream(),
            })
        }

        fn args(&self) -> LaunchArgs<'_> {
            self.stream.launch_builder(&self.func)
        }
    }

    fn go(mut args: LaunchArgs<'_>, threads: usize) -> Result<()> {
        // SAFETY: the arguments follow the kernel's signature in fused.cu, and every pointer
        // covers the elements its thread range reads or writes.
        unsafe { args.launch(grid(threads)?) }.w()?;
        Ok(())
    }

    /// `fused.h`'s `wu_depthwise_at` over (N, H, W, C) `x`, with (k, k, C) `w` and (C) `b`.
    pub(crate) fn depthwise(
        (xs, xl): Operand,
        (ws, wl): Operand,
        (bs, bl): Operand,
        k: usize,
        replicate: bool,
    ) -> Result<CudaStorage> {
        let (_, h, wd, c) = xl.shape().dims4()?;
        let (x, w, b) = (input(xs, xl)?, input(ws, wl)?, input(bs, bl)?);
        let dev = xs.device();
        let total = xl.shape().elem_count();
        let mut out = output(dev, x.code, total)?;
        let dims = [h as i32, wd as i32, c as i32, k as i32, replicate as i32];
        let total64 = total as i64;
        let kernel = Kernel::new(dev, "wu_depthwise")?;
        let mut args = kernel.args();
        args.arg(&total64);
        push_input(&mut args, &x);
        push_input(&mut args, &w);
        push_input(&mut args, &b);
        push_output(&mut args, &mut out);
        for d in &dims {
            args.arg(d);
        }
        go(args, total)?;
        Ok(storage(out, dev))
    }

    /// GlobalResponseNorm over (N, H, W, C) `x` in three launches: the per-(image, channel)
    /// norms, their scales, then the output.
    pub(crate) fn global_response_norm((xs, xl): Operand, (gs, gl): Operand, (bs, bl): Operand) -> Result<CudaStorage> {
        let (n, h, w, c) = xl.shape().dims4()?;
        let (x, g, b) = (input(xs, xl)?, input(gs, gl)?, input(bs, bl)?);
        let dev = xs.device();
        let (pairs, total) = (n * c, xl.shape().elem_count());
        // SAFETY: written in full by the first and second launches before anything reads them.
        let (mut norm, mut scale): (CudaSlice<f32>, CudaSlice<f32>) = unsafe { (dev.alloc(pairs)?, dev.alloc(pairs)?) };
        let mut out = output(dev, x.code, total)?;
        let (pairs64, total64, pixels, c32) = (pairs as i64, total as i64, (h * w) as i64, c as i32);
        let kernel = Kernel::new(dev, "wu_grn_norm")?;
        let mut args = kernel.args();
        args.arg(&pairs64);
        push_input(&mut args, &x);
        args.arg(&mut norm).arg(&pixels).arg(&c32);
        go(args, pairs)?;
        let kernel = Kernel::new(dev, "wu_grn_scale")?;
        let mut args = kernel.args();
        args.arg(&pairs64).arg(&norm).arg(&mut scale).arg(&c32);
        go(args, pairs)?;
        let kernel = Kernel::new(dev, "wu_grn_apply")?;
        let mut args = kernel.args();
        args.arg(&total64);
        push_input(&mut args, &x);
        args.arg(&scale);
        push_input(&mut args, &g);
        push_input(&mut args, &b);
        push_output(&mut args, &mut out);
        args.arg(&pixels).arg(&c32);
        go(args, total)?;
        Ok(storage(out, dev))
    }

    /// Layer norm over the last dimension of `x`, with `affine` = (weight, bias) or none.
    pub(crate) fn layer_norm((xs, xl): Operand, affine: Option<(Operand, Operand)>, eps: f32) -> Result<CudaStorage> {
        let d = xl.shape().dims().last().copied().unwrap_or(1).max(1);
        let x = input(xs, xl)?;
        let affine = match affine {
            Some((w, b)) => Some((input(w.0, w.1)?, input(b.0, b.1)?)),
            None => None,
        };
        let dev = xs.device();
        let total = xl.shape().elem_count();
        let rows = total / d;
        let mut out = output(dev, x.code, total)?;
        let (rows64, d32, null) = (rows as i64, d as i32, 0u64);
        let kernel = Kernel::new(dev, "wu_layer_norm")?;
        let mut args = kernel.args();
        args.arg(&rows64);
        push_input(&mut args, &x);
        match &affine {
            Some((w, b)) => {
                push_input(&mut args, w);
                push_input(&mut args, b);
            }
            // null pointers: no affine transform
            None => {
                args.arg(&null).arg(&x.code).arg(&null).arg(&x.code);
            }
        }
        push_output(&mut args, &mut out);
        args.arg(&d32).arg(&eps);
        go(args, rows)?;
        Ok(storage(out, dev))
    }

    /// The overlap-add of a transposed convolution: (N*H*W, k*k*C) `patches` into
    /// `out_dims` = (N, OH, OW, C); `geometry` = (H, W, k, stride, padding).
    pub(crate) fn overlap_add(
        (ps, pl): Operand,
        out_dims: (usize, usize, usize, usize),
        (h, w, k, stride, padding): (usize, usize, usize, usize, usize),
    ) -> Result<CudaStorage> {
        let (n, oh, ow, c) = out_dims;
        let patches = input(ps, pl)?;
        let dev = ps.device();
        let total = n * oh * ow * c;
        let mut out = output(dev, patches.code, total)?;
        let total64 = total as i64;
        let dims = [h, w, k, c, stride, padding, oh, ow].map(|v| v as i32);
        let kernel = Kernel::new(dev, "wu_overlap_add")?;
        let mut args = kernel.args();
        args.arg(&total64);
        push_input(&mut args, &patches);
        push_output(&mut args, &mut out);
        for d in &dims {
            args.arg(d);
        }
        go(args, total)?;
        Ok(storage(out, dev))
    }

    /// Attention of (BH, Lq, D) `q` over (BH, Lk, D) `k` and `v` without materialised
    /// scores; D at most `ATTENTION_MAX_HEAD_DIM`.
    pub(crate) fn attention(
        (qs, ql): Operand,
        (ks, kl): Operand,
        (vs, vl): Operand,
        scale: f32,
    ) -> Result<CudaStorage> {
        let (bh, lq, d) = ql.shape().dims3()?;
        let lk = kl.shape().dims3()?.1;
        let (q, k, v) = (input(qs, ql)?, input(ks, kl)?, input(vs, vl)?);
        let dev = qs.device();
        let rows = bh * lq;
        let mut out = output(dev, v.code, rows * d)?;
        let (rows64, lq64, lk64, d32) = (rows as i64, lq as i64, lk as i64, d as i32);
        let kernel = Kernel::new(dev, "wu_attention")?;
        let mut args = kernel.args();
        args.arg(&rows64);
        push_input(&mut args, &q);
        push_input(&mut args, &k);
        push_input(&mut args, &v);
        push_output(&mut args, &mut out);
        args.arg(&lq64).arg(&lk64).arg(&d32).arg(&scale);
        go(args, rows)?;
        Ok(storage(out, dev))
    }
}

/// The host harness of `host.c`: the kernels' bodies run over their grids on the CPU,
/// compared here with the CPU kernels.
#[cfg(test)]
mod harness {
    use std::ffi::c_void;

    use candle_core::{DType, Device, Result, Tensor};

    use super::dtype_code;
    use crate::ops::{self, rel_err, Padding};

    extern "C" {
        fn wu_host_load(p: *const c_void, dtype: i32, i: i64) -> f32;
        fn wu_host_store(p: *mut c_void, dtype: i32, i: i64, v: f32);
        #[allow(clippy::too_many_arguments)]
        fn wu_host_depthwise(
            total: i64,
            x: *const c_void,
            xt: i32,
            w: *const c_void,
            wt: i32,
            b: *const c_void,
            bt: i32,
            out: *mut c_void,
            h: i32,
            wd: i32,
            c: i32,
            k: i32,
            replicate: i32,
        );
        #[allow(clippy::too_many_arguments)]
        fn wu_host_grn(
            images: i64,
            x: *const c_void,
            xt: i32,
            norm: *mut f32,
            scale: *mut f32,
            gamma: *const c_void,
            gt: i32,
            beta: *const c_void,
            bt: i32,
            out: *mut c_void,
            pixels: i64,
            c: i32,
        );
        #[allow(clippy::too_many_arguments)]
        fn wu_host_overlap_add(
            total: i64,
            patches: *const c_void,
            pt: i32,
            out: *mut c_void,
            h: i32,
            w: i32,
            k: i32,
            c: i32,
            stride: i32,
            padding: i32,
            oh: i32,
            ow: i32,
        );
        #[allow(clippy::too_many_arguments)]
        fn wu_host_attention(
            rows: i64,
            q: *const c_void,
            qt: i32,
            k: *const c_void,
            kt: i32,
            v: *const c_void,
            vt: i32,
            out: *mut c_void,
            lq: i64,
            lk: i64,
            d: i32,
            scale: f32,
        );
        #[allow(clippy::too_many_arguments)]
        fn wu_host_layer_norm(
            rows: i64,
            x: *const c_void,
            xt: i32,
            w: *const c_void,
            wt: i32,
            b: *const c_void,
            bt: i32,
            out: *mut c_void,
            d: i32,
            eps: f32,
        );
    }

    /// A tensor's elements and dtype code, as the harness takes them (in 4-byte words, so
    /// that f32 loads are aligned).
    struct Raw {
        words: Vec<u32>,
        code: i32,
    }

    impl Raw {
        fn of(t: &Tensor) -> Result<Self> {
            let t = t.flatten_all()?;
            let words = match t.dtype() {
                DType::F32 => t.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect(),
                DType::BF16 => halves(t.to_vec1::<half::bf16>()?.iter().map(|v| v.to_bits())),
                DType::F16 => halves(t.to_vec1::<half::f16>()?.iter().map(|v| v.to_bits())),
                other => candle_core::bail!("no harness for {other:?}"),
            };
            Ok(Self {
                words,
                code: dtype_code(t.dtype())?,
            })
        }

        fn ptr(&self) -> *const c_void {
            self.words.as_ptr().cast()
        }

        fn ptr_mut(&mut self) -> *mut c_void {
            self.words.as_mut_ptr().cast()
        }

        /// The harness's output back as a tensor of `like`'s shape and dtype.
        fn tensor(&self, like: &Tensor) -> Result<Tensor> {
            // SAFETY: `words` holds `like.elem_count()` elements of the dtype `code` names.
            let values: Vec<f32> = (0..like.elem_count())
                .map(|i| unsafe { wu_host_load(self.ptr(), self.code, i as i64) })
                .collect();
            Tensor::from_vec(values, like.shape(), &Device::Cpu)?.to_dtype(like.dtype())
        }
    }

    /// 16-bit values packed two to a word, in memory order.
    fn halves(bits: impl Iterator<Item = u16>) -> Vec<u32> {
        let bytes: Vec<u8> = bits.flat_map(u16::to_ne_bytes).collect();
        bytes
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_ne_bytes(w)
            })
            .collect()
    }

    /// Storage for the harness to write `like`'s elements into.
    fn out_like(like: &Tensor) -> Result<Raw> {
        Raw::of(&like.zeros_like()?)
    }

    fn inputs(dtype: DType) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        // a mean far from zero: a one-pass variance would cancel
        let x = (Tensor::randn(0f32, 1., (2, 5, 7, 6), &dev)? + 3.0)?.to_dtype(dtype)?;
        let g = Tensor::randn(0f32, 1., 6, &dev)?.to_dtype(dtype)?;
        let b = Tensor::randn(0f32, 1., 6, &dev)?.to_dtype(dtype)?;
        Ok((x, g, b))
    }

    /// Both sides compute in f32 and round once at the output: they differ in summation
    /// order, which in half precision flips the rounding of a few outputs by one unit.
    fn tolerance(dtype: DType) -> f32 {
        match dtype {
            DType::F32 => 1e-6,
            DType::F16 => 1e-3,
            _ => 4e-3,
        }
    }

    #[test]
    fn conversions_round_as_the_half_crate_does() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            65504.0,
            65519.0,
            65520.0,
            1e-8,
            -3e-6,
            6.1e-5,
            f32::INFINITY,
            f32::MAX,
        ];
        let mut values: Vec<f32> = specials.to_vec();
        // every bf16/f16 rounding boundary region: a sweep of bit patterns
        values.extend((0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(21_474))));
        for v in values.into_iter().filter(|v| !v.is_nan()) {
            let (mut b16, mut h16) = (0u16, 0u16);
            // SAFETY: each pointer is to one u16, written at index 0.
            unsafe {
                wu_host_store((&mut b16 as *mut u16).cast(), 1, 0, v);
                wu_host_store((&mut h16 as *mut u16).cast(), 2, 0, v);
            }
            assert_eq!(b16, half::bf16::from_f32(v).to_bits(), "bf16 of {v:e}");
            assert_eq!(h16, half::f16::from_f32(v).to_bits(), "f16 of {v:e}");
            // SAFETY: as above, read back.
            let (b, h) = unsafe {
                (
                    wu_host_load((&b16 as *const u16).cast(), 1, 0),
                    wu_host_load((&h16 as *const u16).cast(), 2, 0),
                )
            };
            assert_eq!(b.to_bits(), half::bf16::from_bits(b16).to_f32().to_bits());
            assert_eq!(h.to_bits(), half::f16::from_bits(h16).to_f32().to_bits());
        }
    }

    #[test]
    fn depthwise_body_matches_the_cpu_kernel() -> Result<()> {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (k, padding) in [(3, Padding::Zeros), (5, Padding::Zeros), (3, Padding::Replicate)] {
                let (x, _, bias) = inputs(dtype)?;
                let w = Tensor::randn(0f32, 1., (k, k, 6), &Device::Cpu)?.to_dtype(dtype)?;
                let want = ops::depthwise_conv2d(&x, &w, &bias, padding)?;
                // the harness gets the same weights in f32 beside half-precision activations,
                // as `DepthwiseConv` keeps them on a GPU
                let w = w.to_dtype(DType::F32)?;
                let (xr, wr, br) = (Raw::of(&x)?, Raw::of(&w)?, Raw::of(&bias)?);
                let mut out = out_like(&x)?;
                let (_, h, wd, c) = x.dims4()?;
                // SAFETY: the buffers hold the elements the grid reads and writes.
                unsafe {
                    wu_host_depthwise(
                        x.elem_count() as i64,
                        xr.ptr(),
                        xr.code,
                        wr.ptr(),
                        wr.code,
                        br.ptr(),
                        br.code,
                        out.ptr_mut(),
                        h as i32,
                        wd as i32,
                        c as i32,
                        k as i32,
                        (padding == Padding::Replicate) as i32,
                    )
                };
                let got = out.tensor(&x)?;
                let err = rel_err(&got.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?);
                assert!(err < tolerance(dtype), "{dtype:?} k={k} {padding:?}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn grn_body_matches_the_cpu_kernel() -> Result<()> {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (x, g, b) = inputs(dtype)?;
            let want = ops::global_response_norm(&x, &g, &b)?;
            let (n, h, w, c) = x.dims4()?;
            let (xr, gr, br) = (Raw::of(&x)?, Raw::of(&g)?, Raw::of(&b)?);
            let (mut norm, mut scale) = (vec![0f32; n * c], vec![0f32; n * c]);
            let mut out = out_like(&x)?;
            // SAFETY: the buffers hold the elements the grid reads and writes.
            unsafe {
                wu_host_grn(
                    n as i64,
                    xr.ptr(),
                    xr.code,
                    norm.as_mut_ptr(),
                    scale.as_mut_ptr(),
                    gr.ptr(),
                    gr.code,
                    br.ptr(),
                    br.code,
                    out.ptr_mut(),
                    (h * w) as i64,
                    c as i32,
                )
            };
            let err = rel_err(&out.tensor(&x)?.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?);
            assert!(err < tolerance(dtype), "{dtype:?}: {err}");
        }
        Ok(())
    }

    #[test]
    fn layer_norm_body_matches_the_cpu_kernel() -> Result<()> {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (x, w, b) = inputs(dtype)?;
            for affine in [false, true] {
                let want = ops::layer_norm(&x, 1e-6, affine.then_some((&w, &b)))?;
                let (xr, wr, br) = (Raw::of(&x)?, Raw::of(&w)?, Raw::of(&b)?);
                let (wp, bp) = if affine {
                    (wr.ptr(), br.ptr())
                } else {
                    (std::ptr::null(), std::ptr::null())
                };
                let mut out = out_like(&x)?;
                let d = x.dim(3)?;
                // SAFETY: the buffers hold the elements the grid reads and writes.
                unsafe {
                    wu_host_layer_norm(
                        (x.elem_count() / d) as i64,
                        xr.ptr(),
                        xr.code,
                        wp,
                        wr.code,
                        bp,
                        br.code,
                        out.ptr_mut(),
                        d as i32,
                        1e-6,
                    )
                };
                let err = rel_err(&out.tensor(&x)?.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?);
                assert!(err < tolerance(dtype), "{dtype:?} affine={affine}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn attention_body_matches_the_blocked_softmax() -> Result<()> {
        let dev = Device::Cpu;
        // key counts below, at and above the online softmax's block of 16; a head dimension
        // at the kernel's limit
        for (lk, d) in [(5, 8), (16, 3), (45, 8), (37, super::ATTENTION_MAX_HEAD_DIM)] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let (bh, lq) = (3, 7);
                // large logits: the running maximum must keep exp() in range
                let q = (Tensor::randn(0f32, 4., (1, bh, lq, d), &dev)?).to_dtype(dtype)?;
                let k = Tensor::randn(0f32, 4., (1, bh, lk, d), &dev)?.to_dtype(dtype)?;
                let v = Tensor::randn(0f32, 1., (1, bh, lk, d), &dev)?.to_dtype(dtype)?;
                let scale = (d as f64).powf(-0.5);
                let f32s = |t: &Tensor| t.to_dtype(DType::F32);
                // the reference in f32 throughout, as the kernel computes
                let want = ops::attention(&f32s(&q)?, &f32s(&k)?, &f32s(&v)?, scale)?;
                let (qr, kr, vr) = (Raw::of(&q)?, Raw::of(&k)?, Raw::of(&v)?);
                let mut out = out_like(&q)?;
                // SAFETY: the buffers hold the elements the grid reads and writes.
                unsafe {
                    wu_host_attention(
                        (bh * lq) as i64,
                        qr.ptr(),
                        qr.code,
                        kr.ptr(),
                        kr.code,
                        vr.ptr(),
                        vr.code,
                        out.ptr_mut(),
                        lq as i64,
                        lk as i64,
                        d as i32,
                        scale as f32,
                    )
                };
                let got = out.tensor(&q)?.to_dtype(DType::F32)?;
                let err = rel_err(&got, &want);
                // logits up to ~15 here: exp() turns their last-bit differences (another
                // summation order than the matrix product's) into ~1e-6 relative in f32
                let tol = if dtype == DType::F32 { 1e-5 } else { tolerance(dtype) };
                assert!(err < tol, "lk={lk} d={d} {dtype:?}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn overlap_add_body_matches_the_cpu_kernel() -> Result<()> {
        let dev = Device::Cpu;
        for (k, stride, padding, h, w) in [(4, 2, 1, 5, 7), (3, 2, 1, 4, 4), (2, 2, 0, 3, 5), (5, 3, 2, 4, 3)] {
            for dtype in [DType::F32, DType::BF16] {
                let (n, c) = (2, 5);
                let patches = Tensor::randn(0f32, 1., (n * h * w, k * k * c), &dev)?.to_dtype(dtype)?;
                let (oh, ow) = ((h - 1) * stride + k - 2 * padding, (w - 1) * stride + k - 2 * padding);
                let want = ops::conv_transpose::overlap_add(&patches, (n, h, w, c), k, stride, padding)?;
                assert_eq!(want.dims(), &[n, oh, ow, c]);
                let pr = Raw::of(&patches)?;
                let mut out = out_like(&want)?;
                // SAFETY: the buffers hold the elements the grid reads and writes.
                unsafe {
                    wu_host_overlap_add(
                        want.elem_count() as i64,
                        pr.ptr(),
                        pr.code,
                        out.ptr_mut(),
                        h as i32,
                        w as i32,
                        k as i32,
                        c as i32,
                        stride as i32,
                        padding as i32,
                        oh as i32,
                        ow as i32,
                    )
                };
                let got = out.tensor(&want)?;
                // the CPU kernel's summation order: equal in f32 too
                let err = rel_err(&got.to_dtype(DType::F32)?, &want.to_dtype(DType::F32)?);
                assert_eq!(err, 0.0, "k{k} s{stride} p{padding} {dtype:?}");
            }
        }
        Ok(())
    }
}
