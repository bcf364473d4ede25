//! Times the VQGAN decode alone on the CPU: two decodes of random latents in one process (the
//! first meets every activation size for the first time, as a single image does), with the
//! minor page faults of each.
//!
//!     cargo run --release --example vqgan_decode -- DECODER_DIR [WIDTH HEIGHT]
//!
//! DECODER_DIR is a `warp-ai/wuerstchen`-layout folder (e.g. from `wuerstchen tiny-model
//! --size real`); the size defaults to 1024x1536.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use wuerstchen::config::VqganConfig;
use wuerstchen::models::vqgan::PaellaVqDecoder;
use wuerstchen::weights::Weights;

/// The binary's allocator, so that activations are allocated as in `wuerstchen`.
#[global_allocator]
static ALLOCATOR: wuerstchen::mapping::MappingAware = wuerstchen::mapping::MappingAware;

fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage.ru_minflt
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::Path::new(args.first().context("usage: vqgan_decode DECODER_DIR [WIDTH HEIGHT]")?);
    let size = |i: usize, default: usize| args.get(i).map_or(Ok(default), |s| s.parse());
    let (width, height) = (size(1, 1024)?, size(2, 1536)?);
    wuerstchen::mapping::keep_freed_memory(); // as the binary's `main` does
    let cfg: VqganConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("vqgan/config.json"))?)?;
    let weights = Weights::open("vqgan", &[dir.join("vqgan/diffusion_pytorch_model.safetensors")])?;
    let vqgan = PaellaVqDecoder::new(&cfg, weights.var_builder(DType::F32, &Device::Cpu))?;
    let up = cfg.upscale();
    // the same latents in every run: a smooth pattern of roughly unit variance
    let shape = (1, cfg.latent_channels, height / up, width / up);
    let n = cfg.latent_channels * (height / up) * (width / up);
    let latents = (Tensor::arange(0u32, n as u32, &Device::Cpu)?.to_dtype(DType::F32)? * 0.37)?
        .sin()?
        .affine(1.4, 0.)?
        .reshape(shape)?;
    for run in 1..=2 {
        let (faults, started) = (minor_faults(), Instant::now());
        let image = wuerstchen::ops::on_cpu_workers(&Device::Cpu, || vqgan.decode(&latents))?;
        let secs = started.elapsed().as_secs_f64();
        let mean = image.mean_all()?.to_scalar::<f32>()?;
        println!(
            "decode {run}: {secs:.2} s, {} minor faults, image mean {mean:.6}",
            minor_faults() - faults
        );
    }
    Ok(())
}
