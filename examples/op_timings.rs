//! Times the custom CPU ops against what candle offers for the same job, on shapes from the
//! real models (decoder level 1 at 1024x1024: 64x64x640 would take long on a laptop CPU, so
//! the shapes are scaled down by default; pass `--real` for the real ones).
//!
//! The matrix products are the prior's linear layers at 256x256 and 1024x1536 with guidance
//! (72 and 1728 rows), in GFLOP/s, to hold against torch's rate on the same shapes
//! (`benches/cpu_ceiling.py`). The softmax is the attention's, on rows x keys of its largest
//! shapes. Every figure is the fastest call (see `time`).
//!
//!     cargo run --release --example op_timings [-- --real]

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use wuerstchen::ops::{self, Padding};

/// The binary's allocator, so that each op's output reuses freed memory as in `wuerstchen`
/// instead of timing fresh pages.
#[global_allocator]
static ALLOCATOR: wuerstchen::mapping::MappingAware = wuerstchen::mapping::MappingAware;

/// Milliseconds of the fastest of `runs` calls, and of as many more as 0.2 s holds: the best
/// call is what a shared, noisy machine disturbs least.
fn time<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?; // warm-up
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut done = 0;
    while done < runs || start.elapsed().as_secs_f64() < 0.2 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1000.0);
        done += 1;
    }
    Ok(best)
}

fn main() -> Result<()> {
    wuerstchen::mapping::keep_freed_memory();
    let real = std::env::args().any(|a| a == "--real");
    let dev = Device::Cpu;
    let shapes: &[(usize, usize, usize)] = if real {
        &[(24, 24, 1536), (64, 64, 640), (128, 128, 320)]
    } else {
        &[(24, 24, 384), (32, 32, 256), (64, 64, 64)]
    };
    println!("threads: {}", candle_core::utils::get_num_threads());
    println!(
        "{:<18} {:>14} {:>14} {:>16}",
        "depthwise 3x3", "ours ms", "generic ms", "candle conv ms"
    );
    for &(h, w, c) in shapes {
        let x = Tensor::randn(0f32, 1., (1, h, w, c), &dev)?;
        let k = Tensor::randn(0f32, 1., (3, 3, c), &dev)?;
        let b = Tensor::zeros(c, DType::F32, &dev)?;
        let ours = time(10, || ops::depthwise_conv2d(&x, &k, &b, Padding::Zeros))?;
        let generic = time(10, || ops::depthwise_conv2d_generic(&x, &k, &b, Padding::Zeros))?;
        // candle: grouped conv2d in NCHW, which it runs as one convolution per channel
        let xc = ops::nhwc_to_nchw(&x)?;
        let kc = k.permute((2, 0, 1))?.reshape((c, 1, 3, 3))?.contiguous()?;
        let runs = if c > 300 { 1 } else { 3 };
        let candle = time(runs, || xc.conv2d(&kc, 1, 1, 1, c))?;
        println!(
            "{:<18} {ours:>14.2} {generic:>14.2} {candle:>16.2}",
            format!("{h}x{w}x{c}")
        );
    }
    println!(
        "{:<18} {:>14} {:>14} {:>16}",
        "layer norm (C)", "ours ms", "generic ms", "candle_nn ms"
    );
    for &(h, w, c) in shapes {
        let x = Tensor::randn(0f32, 1., (1, h, w, c), &dev)?;
        let one = Tensor::ones(c, DType::F32, &dev)?;
        let zero = Tensor::zeros(c, DType::F32, &dev)?;
        let ours = time(10, || ops::layer_norm(&x, 1e-6, None))?;
        let generic = time(10, || ops::layer_norm_generic(&x, 1e-6, None))?;
        let candle = time(10, || candle_nn::ops::layer_norm(&x, &one, &zero, 1e-6))?;
        println!(
            "{:<18} {ours:>14.2} {generic:>14.2} {candle:>16.2}",
            format!("{h}x{w}x{c}")
        );
    }
    println!("{:<18} {:>14} {:>14}", "GRN", "ours ms", "composite ms");
    for &(h, w, c) in shapes {
        let x = Tensor::randn(0f32, 1., (1, h, w, 4 * c), &dev)?;
        let g = Tensor::randn(0f32, 1., (1, 1, 1, 4 * c), &dev)?;
        let ours = time(10, || ops::global_response_norm(&x, &g, &g))?;
        let composite = time(10, || ops::global_response_norm_generic(&x, &g, &g))?;
        println!("{:<18} {ours:>14.2} {composite:>14.2}", format!("{h}x{w}x{}", 4 * c));
    }
    println!("{:<18} {:>14} {:>14}", "gelu (erf)", "ours ms", "candle ms");
    for &(h, w, c) in shapes {
        let x = Tensor::randn(0f32, 1., (1, h, w, 4 * c), &dev)?;
        let ours = time(10, || ops::gelu_erf(&x))?;
        let candle = time(10, || x.gelu_erf())?;
        println!("{:<18} {ours:>14.2} {candle:>14.2}", format!("{h}x{w}x{}", 4 * c));
    }
    // attention weights: rows x keys of the published models' attention at 1024x1536 (the
    // decoder's level 1 and the prior's), a flash block of them in the scaled-down set
    println!("{:<18} {:>14} {:>14}", "softmax (scaled)", "ours ms", "candle_nn ms");
    let softmax_shapes: &[(usize, usize)] = if real {
        &[(2048, 6221), (4096, 941)]
    } else {
        &[(256, 512), (1024, 653)]
    };
    for &(rows, keys) in softmax_shapes {
        let x = Tensor::randn(0f32, 4., (rows, keys), &dev)?;
        let ours = time(10, || ops::scaled_softmax_last_dim(&x, 0.125))?;
        let candle = time(10, || candle_nn::ops::softmax_last_dim(&(&x * 0.125)?))?;
        println!("{:<18} {ours:>14.2} {candle:>14.2}", format!("{rows}x{keys}"));
    }
    println!(
        "{:<18} {:>14} {:>14}",
        "linear m x k -> n", "ours GFLOP/s", "candle GFLOP/s"
    );
    let c = if real { 1536 } else { 384 };
    for m in [72, 1728] {
        for (k, n) in [(c, 4 * c), (4 * c, c), (c, c)] {
            let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let runs = (2e10 / (2 * m * n * k) as f64).clamp(1.0, 50.0) as usize;
            let gflops = |ms: f64| 2.0 * (m * n * k) as f64 / ms / 1e6;
            let ours = gflops(time(runs, || ops::linear(&x, &w, None))?);
            let candle = gflops(time(runs, || x.matmul(&w.t()?))?);
            println!("{:<18} {ours:>14.1} {candle:>14.1}", format!("{m} x {k} -> {n}"));
        }
    }
    Ok(())
}
