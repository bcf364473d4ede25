//! `wuerstchen generate` for Stable Cascade pipelines (`Family::StableCascade`), as
//! diffusers' `StableCascadeCombinedPipeline` runs them: the prior, then the decoder on the
//! prior's image embeddings and pooled text states, one seeded generator per request for both.
//! Batches, `--keep-going`, `--skip-existing`, the output names, the records and
//! `--save-embeddings` are the same as for Würstchen v2; what v2's path has beyond that
//! (`--stage-c`, staged loading with `--low-memory`) is refused with an input error until it
//! is built.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{check_interrupt, load_stage, log_peak_memory, PriorSources, Summary, Writer};
use crate::cascade::{
    CascadeDecoderPipeline, CascadeEmbeddings, CascadePriorPipeline, ImageEncoder, PromptImage, DEFAULT_PRIOR_STEPS,
};
use crate::error::InputError;
use crate::hub::FileSource;
use crate::output;
use crate::pipeline::{BatchNoise, Runtime};
use crate::progress::{LoadBars, TerminalProgress};
use crate::record::GenerationRecord;
use crate::request::GeneratePlan;
use crate::rng::TorchCpuGenerator;

pub fn run(
    mut plan: GeneratePlan,
    prior_src: PriorSources,
    decoder_src: &dyn FileSource,
    interrupt: Arc<AtomicBool>,
    quiet: bool,
) -> Result<()> {
    if plan.runtime.low_memory {
        return Err(InputError::new("--low-memory is not supported for Stable Cascade models yet").into());
    }
    for p in &mut plan.jobs.jobs {
        let req = &mut p.job.req;
        if req.prior_schedule_defaulted {
            req.prior_timesteps = crate::scheduler::linear_timesteps(DEFAULT_PRIOR_STEPS);
        }
    }
    let lite = plan.models.lite;
    let prior_cfg = crate::cascade::CascadePriorConfigs::read(prior_src.prior.as_ref(), lite)?;
    let decoder_cfg = crate::cascade::CascadeDecoderConfigs::read(decoder_src, lite)?;
    let rule = crate::cascade::size_rule(&prior_cfg, &decoder_cfg);
    plan.jobs.check_sizes(|req| {
        rule.check("--width", req.width)?;
        rule.check("--height", req.height)
    })?;
    let images = read_image_prompts(&plan.image_prompts, prior_src.prior.as_ref())?;
    check_interrupt(&interrupt)?;

    let rt = plan.runtime.open()?;
    let mut info = prior_src.run_info(Some(decoder_src), rt.dtype, plan.rng);
    info.image_prompts = plan.image_prompts.iter().map(|p| p.display().to_string()).collect();
    let mut progress = TerminalProgress::new(quiet, Some(interrupt.clone()));
    let bars = LoadBars::new(quiet);
    let prior = prior_src.prior.as_ref();
    let (prior, decoder) = std::thread::scope(|s| {
        let decoder = s.spawn(|| {
            let files = CascadeDecoderPipeline::locate(decoder_src, lite, rt.dtype);
            let load = || CascadeDecoderPipeline::load_with(&decoder_cfg, decoder_src, &rt);
            load_stage(&bars, "decoder", files, &rt, load)
        });
        let files = CascadePriorPipeline::locate(prior, lite, rt.dtype);
        let prior = load_stage(&bars, "prior", files, &rt, || {
            CascadePriorPipeline::load_with(&prior_cfg, prior, &rt)
        });
        let decoder = decoder
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the decoder panicked")));
        (prior, decoder)
    });
    let (mut prior, decoder) = (prior?, decoder?);
    condition_on_images(&mut prior, prior_src.prior.as_ref(), &images, &rt)?;
    rt.device.synchronize()?;

    let jobs = &plan.jobs.jobs;
    let writer = Writer::from(&plan.jobs);
    let mut summary = Summary::default();
    for batch in plan.jobs.batches(plan.jobs.batch_size.unwrap_or(1)) {
        check_interrupt(&interrupt)?;
        let batch_jobs = &jobs[batch.clone()];
        let origins = || batch_jobs.iter().map(|p| p.job.origin.as_str());
        for p in batch_jobs {
            let req = &p.job.req;
            tracing::info!("seed {} {}x{}: {:?}", req.seed, req.width, req.height, req.prompt);
        }
        let results = super::generate::prior_over(batch_jobs, plan.rng, |params, noise| {
            prior.run_batch(params, noise, &mut progress)
        });
        let results = match results {
            Ok(results) => results,
            Err(err) => {
                summary.batch_failure(origins(), err, plan.jobs.keep_going)?;
                continue;
            }
        };
        // the jobs whose prior succeeded go on, each with its stream
        let mut halfway: Vec<(usize, CascadeEmbeddings, TorchCpuGenerator)> = Vec::new();
        for (i, (result, noise)) in batch.clone().zip(results) {
            // `--save-embeddings`: what `prior` writes, for `decode` (the decoder pipeline run apart)
            let result =
                result.and_then(|emb| super::generate::save_embeddings(&jobs[i], &emb.embeddings, &info).map(|()| emb));
            if let Some(emb) = summary.failure(&jobs[i].job.origin, result, plan.jobs.keep_going)? {
                halfway.push((i, emb, noise));
            }
        }
        if halfway.is_empty() {
            continue;
        }
        check_interrupt(&interrupt)?;
        let ids: Vec<usize> = halfway.iter().map(|h| h.0).collect();
        let params: Vec<_> = ids.iter().map(|&i| jobs[i].job.req.decoder_params()).collect();
        let embeddings: Vec<_> = halfway.iter().map(|h| h.1.embeddings.clone()).collect();
        let pooled: Vec<_> = halfway.iter().map(|h| h.1.pooled.clone()).collect();
        let counts: Vec<usize> = embeddings
            .iter()
            .map(|e| e.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let batch_images = counts.iter().sum();
        let mut noises: Vec<_> = halfway.into_iter().map(|h| h.2).collect();
        let streams = BatchNoise::of(&mut noises, counts);
        let results = match decoder.run_batch(&embeddings, Some(&pooled), &params, streams, &mut progress) {
            Ok(results) => results,
            Err(err) => {
                let origins = ids.iter().map(|&i| jobs[i].job.origin.as_str());
                summary.batch_failure(origins, err, plan.jobs.keep_going)?;
                continue;
            }
        };
        let timings = progress.take_timings();
        for (&i, result) in ids.iter().zip(results) {
            let p = &jobs[i];
            let written = result.and_then(|images| {
                let writer = Writer {
                    overwrite: p.overwrite,
                    batch_images,
                    ..writer
                };
                let record = GenerationRecord::new(&p.job.req, &info);
                writer.images(&p.job, &output::to_rgb8(&images)?, &p.images, &record, &timings)
            });
            summary.record(&p.job.origin, written, plan.jobs.keep_going)?;
        }
    }
    log_peak_memory();
    summary.finish(&plan.jobs)
}

/// `--image-prompt`: the files decoded before any model loads (an unreadable file is an input
/// error naming it), after checking that the prior has an image encoder to take them.
pub(super) fn read_image_prompts(paths: &[PathBuf], prior: &dyn FileSource) -> Result<Vec<PromptImage>> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    if !ImageEncoder::present(prior)? {
        return Err(InputError::new(format!(
            "--image-prompt needs the prior pipeline's image encoder, and {} has no image_encoder/",
            prior.describe()
        ))
        .into());
    }
    let read = |path: &PathBuf| {
        let (rgb, width, height) = crate::image_processor::read_rgb8(path)?;
        Ok(PromptImage { rgb, width, height })
    };
    paths.iter().map(read).collect()
}

/// Loads the prior pipeline's image encoder, conditions `prior` on the images' embeddings and
/// lets the encoder go (it is needed once per run).
pub(super) fn condition_on_images(
    prior: &mut CascadePriorPipeline,
    src: &dyn FileSource,
    images: &[PromptImage],
    rt: &Runtime,
) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let encoder = ImageEncoder::load(src, rt).context("loading the image encoder")?;
    prior.set_image_prompts(encoder.encode(images)?)?;
    tracing::info!(
        "{} image prompt(s) encoded in {:.2}s",
        images.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The input error for `--image-prompt` with a Würstchen v2 prior, which has no image input.
pub(super) fn refuse_image_prompts(paths: &[PathBuf]) -> Result<()> {
    if paths.is_empty() {
        return Ok(());
    }
    Err(InputError::new("--image-prompt needs a Stable Cascade prior; Würstchen v2's prior takes text only").into())
}
