//! Branch-free f32 math that the compiler vectorises (no libm calls in the loop).

/// `exp(x)` for x <= 0 (what GELU and a max-shifted softmax need): Cephes' expf range reduction and polynomial
/// (relative error ~1e-7), with no branch and no libm call (`floor` is one on baseline x86-64)
/// so that it vectorises.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let m = x * LOG2E + MAGIC;
    let n = m - MAGIC;
    let r = x - n * C1 - n * C2;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n through the exponent bits (n in [-126, 0] here)
    let n_int = (m.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

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
