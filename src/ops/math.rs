//! Branch-free f32 math that the compiler vectorises (no libm calls in the loop).

/// The widest body `vectorized_fn!` runs on this CPU (checked once): 2 compiled for AVX-512F
/// (with AVX2 and FMA), 1 for AVX2 and FMA, 0 as it is. Unit tests cap it per thread to
/// compare the bodies.
#[cfg(target_arch = "x86_64")]
pub(crate) fn widest_tier() -> u8 {
    static TIER: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let tier = *TIER.get_or_init(|| {
        match (
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            is_x86_feature_detected!("avx512f"),
        ) {
            (true, true) => 2,
            (true, false) => 1,
            (false, _) => 0,
        }
    });
    #[cfg(test)]
    let tier = tier.min(tests::WIDEST.with(|w| w.get()));
    tier
}

/// Defines a function whose body runs compiled for AVX-512 where the CPU has it, else for AVX2
/// and FMA where it has those, else as it is. The crate is built for baseline x86-64 (SSE2,
/// four lanes), so the loops the compiler vectorises in the body get two or four times the
/// lanes where the wider units are at hand. Everything the
/// body calls must inline into it (`#[inline(always)]` helpers, plain loops rather than
/// closures), or it runs at the baseline. The same numbers either way: Rust never fuses a
/// separate multiply and add into an FMA, an explicit `mul_add` is exactly rounded on both
/// (libm's `fmaf` where the CPU lacks the instruction: slow, but the same bits), and the
/// kernels' reductions fix their own order.
/// Type parameters (one bound each) and a return type may be given.
macro_rules! vectorized_fn {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident $(<$($g:ident: $bound:path),+>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$attr])*
        $vis fn $name $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                let tier = $crate::ops::math::widest_tier();
                if tier >= 2 {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    unsafe fn avx512 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                        body $(::<$($g),+>)? ($($arg),*)
                    }
                    // SAFETY: the CPU has all three features.
                    return unsafe { avx512 $(::<$($g),+>)? ($($arg),*) };
                }
                if tier >= 1 {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                        body $(::<$($g),+>)? ($($arg),*)
                    }
                    // SAFETY: the CPU has both features.
                    return unsafe { avx2 $(::<$($g),+>)? ($($arg),*) };
                }
            }
            body $(::<$($g),+>)? ($($arg),*)
        }
    };
}
pub(crate) use vectorized_fn;

/// `exp(x)` for x <= 0 (what GELU and a max-shifted softmax need): Cephes' expf range reduction and polynomial
/// (relative error ~1e-7), with no branch and no `floor` (a libm call on baseline x86-64) so
/// that it vectorises. Its multiply-adds are FMAs: the chain is ~12 operations instead of ~20,
/// each rounding once (in a `vectorized_fn!` body on a CPU without FMA, libm's `fmaf`).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let m = x.mul_add(LOG2E, MAGIC);
    let n = m - MAGIC;
    let r = (-n).mul_add(C2, (-n).mul_add(C1, x));
    let p = 1.987_569_2e-4f32.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // 2^n through the exponent bits (n in [-126, 0] here)
    let n_int = (m.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Result, Tensor};

    thread_local! {
        /// The widest body `vectorized_fn!` may pick on this thread (see `widest_tier`).
        pub(crate) static WIDEST: std::cell::Cell<u8> = const { std::cell::Cell::new(2) };
    }

    /// Each kernel written with `vectorized_fn!`, run with its baseline, AVX2 and AVX-512
    /// bodies (those this CPU has) on a one-thread pool whose thread is capped: the same bits.
    #[test]
    fn every_body_gives_the_same_bits() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (2, 9, 11, 40), &dev)? * 3.0)?;
        let c = Tensor::randn(0f32, 1., 40, &dev)?;
        let c2 = Tensor::randn(0f32, 1., 40, &dev)?;
        let taps = Tensor::randn(0f32, 1., (3, 3, 40), &dev)?;
        let per_image = Tensor::randn(0f32, 1., (2, 40), &dev)?;
        let w = Tensor::randn(0f32, 1., (24, 40), &dev)?;
        let kernels = |x: &Tensor| -> Result<Vec<Tensor>> {
            Ok(vec![
                crate::ops::gelu_erf(x)?,
                crate::ops::scaled_softmax_last_dim(x, 0.3)?,
                crate::ops::layer_norm(x, 1e-6, Some((&c, &c2)))?,
                crate::ops::global_response_norm(x, &c, &c2)?,
                crate::ops::depthwise_conv2d(x, &taps, &c, crate::ops::Padding::Zeros)?,
                crate::ops::modulate(x, &per_image, &c2.broadcast_as((2, 40))?.contiguous()?)?,
                crate::ops::gelu_erf(&x.to_dtype(candle_core::DType::BF16)?)?,
                crate::ops::layer_norm(&x.to_dtype(candle_core::DType::BF16)?, 1e-6, None)?,
                crate::ops::linear_then(
                    x,
                    &w,
                    None,
                    crate::ops::Then {
                        gelu: true,
                        ..Default::default()
                    },
                )?,
            ])
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let run = |tier: u8| -> Result<Vec<Vec<u32>>> {
            pool.install(|| {
                WIDEST.with(|w| w.set(tier));
                kernels(&x)?
                    .iter()
                    .map(|t| {
                        let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        Ok(values.iter().map(|v| v.to_bits()).collect())
                    })
                    .collect()
            })
        };
        let widest = run(2)?;
        for tier in [1, 0] {
            let got = run(tier)?;
            for (i, (a, b)) in widest.iter().zip(&got).enumerate() {
                assert!(a == b, "kernel {i}: the body of tier {tier} differs from the widest");
            }
        }
        Ok(())
    }

    #[test]
    fn exp_is_accurate_on_its_range() {
        for i in 0..=8700 {
            let x = -(i as f32) * 0.01;
            let (ours, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            assert!(
                (ours - want).abs() <= 2e-7 * want + 1e-38,
                "exp({x}) = {ours}, want {want}"
            );
        }
    }
}
