//! Times `ops::attention` on the CPU at the published models' largest shapes (1024x1536): the
//! decoder's level-1 and level-2 attention (10 heads x 6144 queries x 6221 keys, 20 x 1536 x
//! 1613) and the prior's (48 heads with guidance x 864 x 941), then a short one: the mid
//! model's prior at 1024x1024 (12 x 576 x 653); milliseconds per call (mean of 3 after a
//! warm-up), the output's sum and a hash of its bits, to tell changed numbers apart.
//!
//!     RAYON_NUM_THREADS=2 cargo run --release --example attention_timing

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

/// The binary's allocator, so that scores are allocated as in `wuerstchen`.
#[global_allocator]
static ALLOCATOR: wuerstchen::mapping::MappingAware = wuerstchen::mapping::MappingAware;

fn main() -> Result<()> {
    wuerstchen::mapping::keep_freed_memory();
    let dev = Device::Cpu;
    for (bh, lq, lk, d) in [
        (10, 6144, 6221, 64),
        (20, 1536, 1613, 64),
        (48, 864, 941, 64),
        (12, 576, 653, 64),
    ] {
        // smooth, repeatable operands
        let operand = |l: usize, step: f64| -> Result<Tensor> {
            let t = Tensor::arange(0u32, (bh * l * d) as u32, &dev)?.to_dtype(DType::F32)?;
            (t * step)?.sin()?.reshape((1, bh, l, d))
        };
        let (q, k, v) = (operand(lq, 0.37)?, operand(lk, 0.23)?, operand(lk, 0.11)?);
        let scale = (d as f64).powf(-0.5);
        let run = || wuerstchen::ops::on_cpu_workers(&dev, || wuerstchen::ops::attention(&q, &k, &v, scale));
        let out = run()?;
        let started = Instant::now();
        for _ in 0..3 {
            run()?;
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / 3.0;
        let values: Vec<f32> = out.flatten_all()?.to_vec1()?;
        let hash = values
            .iter()
            .fold(0u64, |h, x| h.wrapping_mul(31).wrapping_add(x.to_bits() as u64));
        let sum: f32 = values.iter().sum();
        println!("{bh} heads x {lq} x {lk}: {ms:.1} ms, sum {sum}, hash {hash:x}");
    }
    Ok(())
}
