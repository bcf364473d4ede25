//! The two stages apart, like diffusers' two pipelines (of either family): `wuerstchen prior`
//! writes image embeddings, `wuerstchen decode` turns them into images. By default `decode` continues the
//! recorded seed's random stream where the prior left it, so `prior` then `decode` gives the
//! same image as `generate`.

use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::generate::{embeddings_file, prior_over};
use super::{check_interrupt, install_interrupt, load_decoder, log_peak_memory, source, PriorSources, Summary, Writer};
use crate::cascade::{
    CascadeDecoderConfigs, CascadeDecoderPipeline, CascadePriorConfigs, CascadePriorPipeline, Family,
    DEFAULT_SEPARATE_DECODER_STEPS, DEFAULT_SEPARATE_PRIOR_STEPS,
};
use crate::error::{InputError, ModelError};
use crate::output;
use crate::pipeline::{DecoderConfigs, PriorPipeline};
use crate::progress::TerminalProgress;
use crate::record::{GenerationRecord, RunInfo};
use crate::request::{self, DecodePlan, GeneratePlan, PlannedJob};
use crate::rng::{BoxMuller, NoiseSource, TorchCpuGenerator};

/// A loaded prior of either family.
enum Prior {
    V2(Box<PriorPipeline>),
    Cascade(Box<CascadePriorPipeline>),
}

impl Prior {
    /// Each job's embeddings (or its own error); the outer error failed the whole batch.
    fn run(
        &self,
        jobs: &[PlannedJob],
        kernel: BoxMuller,
        progress: &mut TerminalProgress,
    ) -> Result<Vec<Result<Tensor>>> {
        match self {
            Self::V2(prior) => {
                let results = prior_over(jobs, kernel, |params, noise| prior.run_batch(params, noise, progress))?;
                Ok(results.into_iter().map(|(r, _)| r).collect())
            }
            Self::Cascade(prior) => {
                let results = prior_over(jobs, kernel, |params, noise| prior.run_batch(params, noise, progress))?;
                Ok(results.into_iter().map(|(r, _)| r.map(|e| e.embeddings)).collect())
            }
        }
    }
}

pub fn run_prior(mut plan: GeneratePlan, quiet: bool) -> Result<()> {
    if super::report_done(&plan.jobs) {
        return Summary::default().finish(&plan.jobs);
    }
    let interrupt = install_interrupt();
    let prior_src = PriorSources::resolve(&plan.models, quiet)?;
    // sizes are the prior's business only (its latent is ceil(size / resolution_multiple)),
    // and `generate_request` already refused 0
    plan.jobs.check_sizes(|_| Ok(()))?;
    let bars = crate::progress::LoadBars::new(quiet);
    let rt = plan.runtime.open()?;
    let prior = match Family::of(prior_src.prior.as_ref())? {
        Family::WuerstchenV2 => {
            super::cascade::refuse_image_prompts(&plan.image_prompts)?;
            Prior::V2(Box::new(prior_src.load(&prior_src.configs()?, &rt, &bars)?))
        }
        Family::StableCascade => {
            if prior_src.stage_c.is_some() {
                return Err(InputError::new("--stage-c is not supported for Stable Cascade models yet").into());
            }
            for p in &mut plan.jobs.jobs {
                let req = &mut p.job.req;
                if req.prior_schedule_defaulted {
                    req.prior_timesteps = crate::scheduler::linear_timesteps(DEFAULT_SEPARATE_PRIOR_STEPS);
                }
            }
            let src = prior_src.prior.as_ref();
            let configs = CascadePriorConfigs::read(src, plan.models.lite)?;
            let images = super::cascade::read_image_prompts(&plan.image_prompts, src)?;
            let files = CascadePriorPipeline::locate(src, plan.models.lite, rt.dtype);
            let load = || CascadePriorPipeline::load_with(&configs, src, &rt);
            let mut prior = super::load_stage(&bars, "prior", files, &rt, load)?;
            super::cascade::condition_on_images(&mut prior, src, &images, &rt)?;
            Prior::Cascade(Box::new(prior))
        }
    };
    let info = prior_src.run_info(None, rt.dtype, &plan);
    let writer = Writer::from(&plan.jobs);
    let mut progress = TerminalProgress::new(quiet, Some(interrupt.clone()));
    let mut summary = Summary::default();
    // on the CPU one request per pass; a GPU batches (the prior's activations are small: 24x24
    // latents at 1024x1024)
    let auto = if rt.device.is_cpu() {
        1
    } else {
        super::generate::MAX_AUTO_BATCH
    };
    let max_images = plan.jobs.batch_size.unwrap_or(auto);
    for batch in plan.jobs.batches(max_images) {
        check_interrupt(&interrupt)?;
        let jobs = &plan.jobs.jobs[batch];
        let results = prior.run(jobs, plan.rng, &mut progress);
        let timings = progress.take_timings();
        let results = match results {
            Ok(results) => results,
            Err(err) => {
                let origins = jobs.iter().map(|p| p.job.origin.as_str());
                summary.batch_failure(origins, err, plan.jobs.keep_going)?;
                continue;
            }
        };
        let writer = Writer {
            batch_images: jobs.iter().map(|p| p.job.req.num_images).sum(),
            ..writer
        };
        for (p, result) in jobs.iter().zip(results) {
            let written = result.and_then(|emb| {
                let path = p
                    .embeddings
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("no embeddings file planned"))?;
                output::write_atomic(path, &embeddings_file(&emb, &p.job.req, &info)?, p.overwrite)?;
                let record = GenerationRecord::new(&p.job.req, &info);
                writer.report(path, &p.job, 0, &record, &timings);
                anyhow::Ok(())
            });
            summary.record(&p.job.origin, written, plan.jobs.keep_going)?;
        }
    }
    log_peak_memory();
    summary.finish(&plan.jobs)
}

/// A decoder's configs of either family.
enum Decoder {
    V2(DecoderConfigs),
    Cascade(CascadeDecoderConfigs),
}

/// A loaded decoder of either family.
enum LoadedDecoder {
    V2(Box<crate::pipeline::DecoderPipeline>),
    Cascade(Box<CascadeDecoderPipeline>),
}

/// What `decode` reads back from an embeddings file.
struct Embeddings {
    tensor: Tensor,
    /// `None` for a file without our metadata
    record: Option<GenerationRecord>,
}

fn read_embeddings(path: &Path) -> Result<Embeddings> {
    let bad = |message: String| ModelError::bad_file("embeddings", path, message);
    let bytes = std::fs::read(path).map_err(|e| InputError::new(format!("cannot read {}: {e}", path.display())))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let view = st
        .tensor("image_embeddings")
        .map_err(|_| bad("no `image_embeddings` tensor".into()))?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 4 {
        return Err(bad(format!(
            "`image_embeddings` must be f32 (N, C, h, w), got {:?} {:?}",
            view.dtype(),
            view.shape()
        ))
        .into());
    }
    let tensor = Tensor::from_raw_buffer(view.data(), candle_core::DType::F32, view.shape(), &Device::Cpu)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let record = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("wuerstchen"))
        .map(|s| GenerationRecord::from_json(s))
        .transpose()
        .map_err(|e| bad(format!("bad `wuerstchen` metadata: {e}")))?;
    Ok(Embeddings { tensor, record })
}

pub fn run_decode(plan: DecodePlan, quiet: bool) -> Result<()> {
    let interrupt = install_interrupt();
    let emb = read_embeddings(&plan.embeddings)?;
    let (n, _, h, w) = emb.tensor.dims4()?;
    let decoder_src = source(&plan.models.decoder, plan.models.revision_for("decoder"), quiet)?;
    let family = Family::of(decoder_src.as_ref())?;
    let configs = match family {
        Family::WuerstchenV2 => Decoder::V2(DecoderConfigs::read(decoder_src.as_ref())?),
        Family::StableCascade => Decoder::Cascade(CascadeDecoderConfigs::read(decoder_src.as_ref(), plan.models.lite)?),
    };
    let (image_size, default_steps) = match &configs {
        Decoder::V2(c) => (c.image_size(h, w)?, crate::request::DEFAULT_DECODER_STEPS),
        Decoder::Cascade(c) => (
            c.image_size((emb.tensor.dim(1)?, h, w))?,
            DEFAULT_SEPARATE_DECODER_STEPS,
        ),
    };
    let (req, start) = request::decode_request(&plan, emb.record.as_ref(), n, image_size, default_steps)?;
    let job = request::Job {
        index: 0,
        origin: plan.embeddings.display().to_string(),
        req,
        output: None,
    };
    let template = plan.output.images.as_deref().unwrap_or("wuerstchen-{seed}.png");
    let paths = request::image_paths(std::slice::from_ref(&job), template)?.remove(0);
    request::claim(&job, &paths, plan.output.overwrite)?;
    let mut noise = TorchCpuGenerator::with_kernel(start.seed, start.rng);
    if let Some(draws) = start.skip {
        for _ in 0..draws.count {
            noise.standard_normal(&[draws.numel])?;
        }
    }
    let rt = plan.runtime.open()?;
    let bars = crate::progress::LoadBars::new(quiet);
    let src = decoder_src.as_ref();
    let decoder = match configs {
        Decoder::V2(configs) => LoadedDecoder::V2(Box::new(load_decoder(src, &configs, &rt, &bars)?)),
        Decoder::Cascade(configs) => {
            let files = CascadeDecoderPipeline::locate(src, plan.models.lite, rt.dtype);
            let load = || CascadeDecoderPipeline::load_with(&configs, src, &rt);
            LoadedDecoder::Cascade(Box::new(super::load_stage(&bars, "decoder", files, &rt, load)?))
        }
    };
    let recorded = emb.record.as_ref();
    let mut commits = recorded.map(|r| r.commits.clone()).unwrap_or_default();
    commits.extend(super::commits(&[("decoder", Some(decoder_src.as_ref()))]));
    let info = RunInfo {
        prior: recorded.map(|r| r.prior.clone()).unwrap_or_default(),
        decoder: decoder_src.describe(),
        stage_c: recorded.and_then(|r| r.stage_c.clone()),
        lite: plan.models.lite,
        image_prompts: recorded.map(|r| r.image_prompts.clone()).unwrap_or_default(),
        commits,
        dtype: super::dtype_name(rt.dtype).to_string(),
        rng: start.rng,
    };
    let mut progress = TerminalProgress::new(quiet, Some(interrupt.clone()));
    check_interrupt(&interrupt)?;
    let params = job.req.decoder_params();
    let images = match &decoder {
        LoadedDecoder::V2(d) => d.run(&emb.tensor, &params, &mut noise, &mut progress)?,
        // as `StableCascadeDecoderPipeline` alone: conditioned on its own text encoder
        LoadedDecoder::Cascade(d) => d.run(&emb.tensor, None, &params, &mut noise, &mut progress)?,
    };
    let writer = Writer {
        batch_images: n,
        overwrite: plan.output.overwrite,
        json: plan.output.json,
    };
    let timings = progress.take_timings();
    let record = GenerationRecord::new(&job.req, &info);
    writer.images(&job, &output::to_rgb8(&images)?, &paths, &record, &timings)?;
    log_peak_memory();
    Ok(())
}
