//! `wuerstchen bench`: the default workload (or any sizes and steps) on a model, timed the
//! way GPU timings must be: load once, warm up, synchronise the device before every clock
//! read, report per-stage medians, ms per step and peak memory as one JSON object on stdout.

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

use super::generate::{DecoderStage, PriorStage};
use super::{dtype_name, load_decoder, load_stage, peak_host_memory, source, PriorSources};
use crate::cascade::{
    size_rule, CascadeDecoderConfigs, CascadeDecoderPipeline, CascadePriorConfigs, CascadePriorPipeline, Family,
};
use crate::pipeline::{
    free_device_memory, BatchNoise, DecoderConfigs, DecoderParams, DecoderPipeline, PriorParams, PriorPipeline,
    SizeRule,
};
use crate::progress::{LoadBars, Progress};
use crate::request::BenchPlan;
use crate::rng::TorchCpuGenerator;

/// The two stages of either family, loaded.
enum Pair {
    V2(Box<PriorPipeline>, Box<DecoderPipeline>),
    Cascade(Box<CascadePriorPipeline>, Box<CascadeDecoderPipeline>),
}

impl Pair {
    /// One batch through both stages, as `generate` runs it: each request's images, on the
    /// device. `noises` holds one stream per request, `counts` its number of images.
    fn run(
        &self,
        prior_params: &[PriorParams],
        decoder_params: &[DecoderParams],
        noises: &mut [TorchCpuGenerator],
        counts: Vec<usize>,
        clock: &mut StageClock,
    ) -> Result<Vec<candle_core::Tensor>> {
        let params = (prior_params, decoder_params);
        match self {
            Pair::V2(prior, decoder) => run_both(&**prior, &**decoder, params, noises, counts, clock),
            Pair::Cascade(prior, decoder) => run_both(&**prior, &**decoder, params, noises, counts, clock),
        }
    }
}

fn run_both<P: PriorStage>(
    prior: &P,
    decoder: &impl DecoderStage<P::Output>,
    (prior_params, decoder_params): (&[PriorParams], &[DecoderParams]),
    noises: &mut [TorchCpuGenerator],
    counts: Vec<usize>,
    clock: &mut StageClock,
) -> Result<Vec<candle_core::Tensor>> {
    let outputs = prior.run_prior(prior_params, BatchNoise::of(noises, counts.clone()), clock)?;
    let outputs = outputs.into_iter().collect::<Result<Vec<_>>>()?;
    let images = decoder.run_decoder(outputs, decoder_params, BatchNoise::of(noises, counts), clock)?;
    images.into_iter().collect()
}

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

/// Runs `load`, returning its value and the seconds it took with the device synchronised.
fn timed<T>(rt: &crate::pipeline::Runtime, load: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let value = load()?;
    rt.device.synchronize()?;
    Ok((value, t.elapsed().as_secs_f64()))
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A family's configs, read before anything loads.
enum Configs {
    V2(Box<(crate::pipeline::PriorConfigs, DecoderConfigs)>),
    Cascade(Box<(CascadePriorConfigs, CascadeDecoderConfigs)>),
}

pub fn run(mut plan: BenchPlan, quiet: bool) -> Result<()> {
    let prior_src = PriorSources::resolve(&plan.models, quiet)?;
    let decoder_src = source(&plan.models.decoder, plan.models.revision_for("decoder"), quiet)?;
    let (decoder, lite) = (decoder_src.as_ref(), plan.models.lite);
    let configs = match prior_src.pair_family(decoder, lite)? {
        Family::WuerstchenV2 => Configs::V2(Box::new((prior_src.configs()?, DecoderConfigs::read(decoder)?))),
        Family::StableCascade => {
            // the combined pipeline's schedule, as `generate` runs it
            if plan.req.prior_schedule_defaulted {
                plan.req.prior_timesteps = crate::scheduler::linear_timesteps(crate::cascade::DEFAULT_PRIOR_STEPS);
            }
            let prior_cfg = CascadePriorConfigs::read(prior_src.prior.as_ref(), lite)?;
            Configs::Cascade(Box::new((prior_cfg, CascadeDecoderConfigs::read(decoder, lite)?)))
        }
    };
    let req = &plan.req;
    let rule = match &configs {
        Configs::V2(cfg) => SizeRule::new(&cfg.0, &cfg.1),
        Configs::Cascade(cfg) => size_rule(&cfg.0, &cfg.1),
    };
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
    let files = prior_src.pair_files(decoder, lite, rt.dtype)?;
    let t = Instant::now();
    let mut file_bytes = 0;
    for path in &files {
        file_bytes += std::io::copy(&mut std::fs::File::open(path)?, &mut std::io::sink())?;
    }
    let read_s = t.elapsed().as_secs_f64();

    // each stage loaded and timed on its own
    let bars = LoadBars::new(quiet);
    let prior = prior_src.prior.as_ref();
    let (pair, load_prior_s, load_decoder_s, estimated) = match &configs {
        Configs::V2(cfg) => {
            let (prior_cfg, decoder_cfg) = (&cfg.0, &cfg.1);
            let (p, prior_s) = timed(&rt, || prior_src.load(prior_cfg, &rt, &bars))?;
            let (d, decoder_s) = timed(&rt, || load_decoder(decoder, decoder_cfg, &rt, &bars))?;
            // the estimate `generate` weighs against free device memory, for comparison with the peaks
            let shapes = crate::memory::ModelShapes::new(prior_cfg, decoder_cfg);
            let run = crate::memory::RunShapes::of(req, rt.dtype, &rt.device);
            let run = crate::memory::RunShapes {
                num_images: run.num_images * plan.batch_size,
                ..run
            };
            let activations = crate::memory::peak_activation_bytes(&run, &shapes);
            let weights = crate::memory::weight_bytes(prior, prior_src.stage_c.as_deref(), decoder, rt.dtype);
            let estimated = (weights + activations, activations);
            (Pair::V2(Box::new(p), Box::new(d)), prior_s, decoder_s, Some(estimated))
        }
        Configs::Cascade(cfg) => {
            let (prior_cfg, decoder_cfg) = (&cfg.0, &cfg.1);
            let (p, prior_s) = timed(&rt, || {
                let files = CascadePriorPipeline::locate(prior, lite, rt.dtype);
                load_stage(&bars, "prior", files, &rt, || {
                    CascadePriorPipeline::load_with(prior_cfg, prior, &rt)
                })
            })?;
            let (d, decoder_s) = timed(&rt, || {
                let files = CascadeDecoderPipeline::locate(decoder, lite, rt.dtype);
                load_stage(&bars, "decoder", files, &rt, || {
                    CascadeDecoderPipeline::load_with(decoder_cfg, decoder, &rt)
                })
            })?;
            // the memory estimate covers v2's networks only
            (Pair::Cascade(Box::new(p), Box::new(d)), prior_s, decoder_s, None)
        }
    };

    let mut totals = Vec::new();
    for i in 0..plan.warmup + plan.runs {
        clock.stages.clear();
        let t = Instant::now();
        let mut noises: Vec<_> = (0..plan.batch_size as u64)
            .map(|k| TorchCpuGenerator::new(req.seed + k))
            .collect();
        let counts = vec![req.num_images; plan.batch_size];
        let prior_params = vec![req.prior_params(); plan.batch_size];
        let decoder_params = vec![req.decoder_params(); plan.batch_size];
        for images in pair.run(&prior_params, &decoder_params, &mut noises, counts, &mut clock)? {
            let _ = images.to_device(&Device::Cpu)?; // the images on the host end every run
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
        "cpu_matmul": crate::ops::blas::kernel_name(),
        "load_s": { "prior": round3(load_prior_s), "decoder": round3(load_decoder_s) },
        "model_file_bytes": file_bytes,
        "page_cache_read_s": round3(read_s),
        "load_over_read": round3((load_prior_s + load_decoder_s) / read_s),
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
        "estimated_peak_bytes": estimated.map(|e| e.0),
        "estimated_activation_bytes": estimated.map(|e| e.1),
    });
    println!("{report}");
    Ok(())
}
