//! Moving attention heads between the token layout of the projections, (N, L, heads x D),
//! and the head-major layout the attention kernel reads, (N, heads, L, D). candle's
//! `transpose(..).contiguous()` and `cat` copy on one thread; on the CPU in f32 these copies
//! run on every thread, and the split takes the tokens' parts (the image's keys and the
//! text's) in one pass instead of concatenating them first.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use rayon::prelude::*;

use super::matmul::Out;

/// `parts`: (N, L_i, heads x D) each, concatenated along the tokens -> (N, heads, sum L_i, D),
/// contiguous.
pub fn split_heads(parts: &[&Tensor], heads: usize) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        candle_core::bail!("split_heads: no parts");
    };
    let (n, _, c) = first.dims3()?;
    let d = c / heads.max(1);
    if d * heads != c {
        candle_core::bail!("split_heads: {c} channels are not {heads} heads");
    }
    if !cpu_f32(parts) {
        let cat = Tensor::cat(parts, 1)?;
        let l = cat.dim(1)?;
        return cat.reshape((n, l, heads, d))?.transpose(1, 2)?.contiguous();
    }
    let mut lens = Vec::with_capacity(parts.len());
    for p in parts {
        let (pn, l, pc) = p.dims3()?;
        if (pn, pc) != (n, c) {
            candle_core::bail!("split_heads: part {:?} does not match ({n}, _, {c})", p.dims());
        }
        lens.push(l);
    }
    let l_total: usize = lens.iter().sum();
    let parts: Vec<Tensor> = parts.iter().map(|p| p.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = parts.iter().map(|p| p.storage_and_layout()).collect();
    let srcs: Vec<&[f32]> = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(CpuStorage::F32(data)) => super::slice_of(data, l),
            _ => candle_core::bail!("split_heads: expected f32 on the CPU"),
        })
        .collect::<Result<_>>()?;
    let mut dst: Vec<f32> = Vec::with_capacity(n * c * l_total);
    let out = Out(dst.as_mut_ptr());
    (0..n * heads).into_par_iter().for_each(|nh| {
        let (img, h) = (nh / heads, nh % heads);
        let mut at = nh * l_total * d;
        for (src, &l) in srcs.iter().zip(&lens) {
            for t in 0..l {
                let from = &src[(img * l + t) * c + h * d..][..d];
                // SAFETY: task `nh` alone writes its head's l_total x d block of `dst`,
                // every element of it, before `set_len` below.
                unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), out.ptr().add(at), d) };
                at += d;
            }
        }
    });
    // SAFETY: every head's block was written.
    unsafe { dst.set_len(n * c * l_total) };
    Tensor::from_vec(dst, (n, heads, l_total, d), first.device())
}

/// (N, heads, L, D) -> (N, L, heads x D), contiguous: the inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (n, heads, l, d) = x.dims4()?;
    if !cpu_f32(&[x]) {
        return x.transpose(1, 2)?.reshape((n, l, heads * d));
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("merge_heads: expected f32 on the CPU");
    };
    let src = super::slice_of(data, layout)?;
    let c = heads * d;
    let mut dst: Vec<f32> = Vec::with_capacity(n * l * c);
    // tokens per task: about 64 KiB of output each
    let rows = (16384 / c.max(1)).max(1);
    let tasks: Vec<(usize, usize)> = (0..n).flat_map(|i| (0..l).step_by(rows).map(move |t| (i, t))).collect();
    let out = Out(dst.as_mut_ptr());
    tasks.into_par_iter().for_each(|(img, t0)| {
        for t in t0..(t0 + rows).min(l) {
            for h in 0..heads {
                let from = &src[((img * heads + h) * l + t) * d..][..d];
                // SAFETY: this task alone writes tokens t0.. of image `img`, every channel.
                unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), out.ptr().add((img * l + t) * c + h * d), d) };
            }
        }
    });
    // SAFETY: the tasks cover every token of every image.
    unsafe { dst.set_len(n * l * c) };
    drop(storage);
    Tensor::from_vec(dst, (n, l, c), x.device())
}

/// Whether the copies take the parallel CPU path: f32 on the CPU, unless generic forms are
/// forced.
fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| super::cpu_kernel(t) && t.dtype() == DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn heads_move_as_candles_copies_move_them() -> Result<()> {
        let dev = Device::Cpu;
        let (n, heads, d) = (2, 3, 5);
        let a = Tensor::randn(0f32, 1., (n, 7, heads * d), &dev)?;
        // a view that is not contiguous: 4 of each image's 8 tokens
        let b = Tensor::randn(0f32, 1., (n, 8, heads * d), &dev)?.narrow(1, 2, 4)?;
        let want = Tensor::cat(&[&a, &b], 1)?
            .reshape((n, 11, heads, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let got = split_heads(&[&a, &b], heads)?;
        assert_eq!(got.dims(), want.dims());
        let bits = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        assert_eq!(bits(&got)?, bits(&want)?);
        let generic = crate::ops::with_generic_forms(|| split_heads(&[&a, &b], heads))?;
        assert_eq!(bits(&generic)?, bits(&want)?);
        let merged = merge_heads(&got)?;
        assert_eq!(merged.dims(), &[n, 11, heads * d]);
        assert_eq!(bits(&merged)?, bits(&Tensor::cat(&[&a, &b], 1)?)?);
        let generic = crate::ops::with_generic_forms(|| merge_heads(&got))?;
        assert_eq!(bits(&generic)?, bits(&merged)?);
        Ok(())
    }
}
