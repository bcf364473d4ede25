//! `wuerstchen bench`: the default workload (or any sizes and steps) on a model, timed the
//! way GPU timings must be: load once, warm up, synchronise the device before every clock
//! read, report per-stage medians, ms per step and peak memory as one JSON object on stdout.

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

use super::{dtype_name, load_decoder, peak_host_memory, source, PriorSources};
use crate::pipeline::{free_device_memory, BatchNoise, DecoderConfigs, DecoderPipeline, PriorPipeline, SizeRule};
use crate::progress::Progress;
use crate::request::BenchPlan;
use crate::rng::TorchCpuGenerator;

/// Times stages with the device synchronised at both ends, and samples device memory.
struct StageClock {
    device: Device,
    started: Instant,
    stages: Vec<(String, f64)>,
    min_free: Option<u64>,
}

impl StageClock {
    fn sample_memory(&mut self) {
        if let Some(free) = free_device_memory(&self.device) {
            self.min_free = Some(self.min_free.map_or(free, |m| m.min(free)));
        }
    }
}

impl Progress for StageClock {
    fn start(&mut self, stage: &str, _total: usize) {
        let _ = self.device.synchronize();
        self.stages.push((stage.to_string(), 0.0));
        self.started = Instant::now();
    }

    fn step(&mut self) {}

    fn finish(&mut self) {
        let _ = self.device.synchronize();
        let t = self.started.elapsed().as_secs_f64();
        if let Some(last) = self.stages.last_mut() {
            last.1 = t;
        }
        self.sample_memory();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub fn run(plan: BenchPlan, quiet: bool) -> Result<()> {
    let req = &plan.req;
    let prior_src = PriorSources::resolve(&plan.models, quiet)?;
    let decoder_src = source(&plan.models.decoder, plan.models.revision_for("decoder"), quiet)?;
    let (prior_cfg, decoder_cfg) = (prior_src.configs()?, DecoderConfigs::read(decoder_src.as_ref())?);
    let rule = SizeRule::new(&prior_cfg, &decoder_cfg);
    rule.check("--width", req.width)?;
    rule.check("--height", req.height)?;
    let rt = plan.runtime.open()?;
    let mut clock = StageClock {
        device: rt.device.clone(),
        started: Instant::now(),
        stages: Vec::new(),
        min_free: None,
    };
    clock.sample_memory();
    let free_before = clock.min_free;

    // the baseline a load is measured against: one read of the model files from the page cache
    // (the read also warms the cache, so the load below starts from it)
    let mut files = PriorPipeline::locate(prior_src.prior.as_ref(), prior_src.stage_c.as_deref())?;
    files.extend(DecoderPipeline::locate(decoder_src.as_ref())?);
    let t = Instant::now();
    let mut file_bytes = 0;
    for path in &files {
        file_bytes += std::io::copy(&mut std::fs::File::open(path)?, &mut std::io::sink())?;
    }
    let read_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let bars = crate::progress::LoadBars::new(quiet);
    let prior = prior_src.load(&prior_cfg, &rt, &bars)?;
    rt.device.synchronize()?;
    let load_prior = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let decoder = load_decoder(decoder_src.as_ref(), &decoder_cfg, &rt, &bars)?;
    rt.device.synchronize()?;
    let load_decoder = t.elapsed().as_secs_f64();

    // the estimate `generate` weighs against free device memory, for comparison with the peaks
    let shapes = crate::memory::ModelShapes::new(&prior_cfg, &decoder_cfg);
    let run = crate::memory::RunShapes::of(req, rt.dtype);
    let run = crate::memory::RunShapes {
        num_images: run.num_images * plan.batch_size,
        ..run
    };
    let estimated_activations = crate::memory::peak_activation_bytes(&run, &shapes);
    let estimated_weights = crate::memory::weight_bytes(
        prior_src.prior.as_ref(),
        prior_src.stage_c.as_deref(),
        decoder_src.as_ref(),
        rt.dtype,
    );

    let mut totals = Vec::new();
    for i in 0..plan.warmup + plan.runs {
        clock.stages.clear();
        let t = Instant::now();
        let mut noises: Vec<_> = (0..plan.batch_size as u64)
            .map(|k| TorchCpuGenerator::new(req.seed + k))
            .collect();
        let counts = vec![req.num_images; plan.batch_size];
        let prior_params = vec![req.prior_params(); plan.batch_size];
        let prior_noise = BatchNoise::of(&mut noises, counts.clone());
        let embeddings = prior.run_batch(&prior_params, prior_noise, &mut clock)?;
        let embeddings = embeddings.into_iter().collect::<Result<Vec<_>>>()?;
        let decoder_params = vec![req.decoder_params(); plan.batch_size];
        let decoder_noise = BatchNoise::of(&mut noises, counts);
        let images = decoder.run_batch(&embeddings, &decoder_params, decoder_noise, &mut clock)?;
        for images in images {
            let _ = images?.to_device(&Device::Cpu)?; // the images on the host end every run
        }
        let total = t.elapsed().as_secs_f64();
        if i >= plan.warmup {
            totals.push((total, clock.stages.clone()));
        }
        tracing::info!("run {} of {}: {total:.3}s", i + 1, plan.warmup + plan.runs);
    }
    let stage = |name: &str| {
        median(
            totals
                .iter()
                .filter_map(|(_, s)| s.iter().find(|(n, _)| n == name).map(|(_, t)| *t))
                .collect(),
        )
    };
    let (prior_s, decoder_s, vqgan_s) = (stage("prior"), stage("decoder"), stage("vqgan"));
    let total_s = median(totals.iter().map(|(t, _)| *t).collect());
    let images = plan.batch_size * req.num_images;
    let prior_steps = req.prior_timesteps.len() - 1;
    let decoder_steps = req.decoder_timesteps.len() - 1;
    let device_peak = match (free_before, clock.min_free) {
        (Some(before), Some(min)) => Some(before.saturating_sub(min)),
        _ => None,
    };
    let report = serde_json::json!({
        "device": format!("{:?}", rt.device),
        "dtype": dtype_name(rt.dtype),
        "prior": prior_src.prior.describe(),
        "decoder": decoder_src.describe(),
        "width": req.width,
        "height": req.height,
        "num_images": req.num_images,
        "batch_size": plan.batch_size,
        "prior_steps": prior_steps,
        "prior_guidance": req.prior_guidance,
        "decoder_steps": decoder_steps,
        "decoder_guidance": req.decoder_guidance,
        "warmup": plan.warmup,
        "runs": plan.runs,
        "threads": candle_core::utils::get_num_threads(),
        "load_s": { "prior": round3(load_prior), "decoder": round3(load_decoder) },
        "model_file_bytes": file_bytes,
        "page_cache_read_s": round3(read_s),
        "load_over_read": round3((load_prior + load_decoder) / read_s),
        "median_s": {
            "total": round3(total_s),
            "prior": round3(prior_s),
            "decoder": round3(decoder_s),
            "vqgan": round3(vqgan_s),
        },
        "images_per_s": round3(images as f64 / total_s),
        "prior_ms_per_step": round3(prior_s * 1000.0 / prior_steps as f64),
        "decoder_ms_per_step": round3(decoder_s * 1000.0 / decoder_steps as f64),
        "peak_host_bytes": peak_host_memory(),
        "device_memory_growth_bytes": device_peak,
        "estimated_peak_bytes": estimated_weights + estimated_activations,
        "estimated_activation_bytes": estimated_activations,
    });
    println!("{report}");
    Ok(())
}
