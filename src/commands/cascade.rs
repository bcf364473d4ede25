//! `wuerstchen generate` for Stable Cascade pipelines (`Family::StableCascade`), as
//! diffusers' `StableCascadeCombinedPipeline` runs them: the prior, then the decoder on the
//! prior's image embeddings and pooled text states, one seeded generator per request for both.
//! The jobs run through v2's driver (`generate::Ctx`: batches, `--keep-going`,
//! `--skip-existing`, the output names, the records, `--save-embeddings`, `--low-memory`);
//! `--stage-c` is v2's only.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::generate::{Ctx, DecoderStage, PriorStage, StageOutput};
use super::{check_interrupt, load_stage, log_peak_memory, PriorSources, Writer};
use crate::cascade::{
    CascadeDecoderConfigs, CascadeDecoderPipeline, CascadeEmbeddings, CascadePriorConfigs, CascadePriorPipeline,
    ImageEncoder, PooledText, PromptImage, DEFAULT_PRIOR_STEPS,
};
use crate::error::InputError;
use crate::hub::FileSource;
use crate::pipeline::{available_memory, BatchNoise, DecoderParams, PriorParams, Runtime};
use crate::progress::{LoadBars, Progress, TerminalProgress};
use crate::request::GeneratePlan;

pub fn run(
    mut plan: GeneratePlan,
    prior_src: PriorSources,
    decoder_src: &dyn FileSource,
    interrupt: Arc<AtomicBool>,
    quiet: bool,
) -> Result<()> {
    for p in &mut plan.jobs.jobs {
        let req = &mut p.job.req;
        if req.prior_schedule_defaulted {
            req.prior_timesteps = crate::scheduler::linear_timesteps(DEFAULT_PRIOR_STEPS);
        }
    }
    let lite = plan.models.lite;
    let prior = prior_src.prior.as_ref();
    let prior_cfg = CascadePriorConfigs::read(prior, lite)?;
    let decoder_cfg = CascadeDecoderConfigs::read(decoder_src, lite)?;
    let rule = crate::cascade::size_rule(&prior_cfg, &decoder_cfg);
    plan.jobs.check_sizes(|req| {
        rule.check("--width", req.width)?;
        rule.check("--height", req.height)
    })?;
    let images = read_image_prompts(&plan.image_prompts, prior)?;
    check_interrupt(&interrupt)?;

    let rt = plan.runtime.open()?;
    let info = prior_src.run_info(Some(decoder_src), rt.dtype, &plan);
    // one stage at a time when asked, or when the weights alone (activations are not
    // estimated for Stable Cascade yet) exceed what the device has
    let parts: [(&dyn FileSource, &str, &str); 5] = [
        (prior, "text_encoder", "model"),
        (prior, prior_cfg.prior_folder, "diffusion_pytorch_model"),
        (decoder_src, "text_encoder", "model"),
        (decoder_src, decoder_cfg.decoder_folder, "diffusion_pytorch_model"),
        (decoder_src, "vqgan", "diffusion_pytorch_model"),
    ];
    let weights = crate::memory::parts_weight_bytes(&parts, rt.dtype);
    let staged = super::generate::staged(plan.runtime.low_memory, available_memory(&rt.device), weights, 0);
    let mut progress = TerminalProgress::new(quiet, Some(interrupt.clone()));
    let bars = LoadBars::new(quiet);
    let writer = Writer::from(&plan.jobs);
    let ctx = Ctx {
        plan: &plan.jobs,
        batches: plan.jobs.batches(plan.jobs.batch_size.unwrap_or(1)),
        info: &info,
        writer: &writer,
        kernel: plan.rng,
        interrupt: &interrupt,
    };
    let load_prior = || {
        let files = CascadePriorPipeline::locate(prior, lite, rt.dtype);
        let mut loaded = load_stage(&bars, "prior", files, &rt, || {
            CascadePriorPipeline::load_with(&prior_cfg, prior, &rt)
        })?;
        condition_on_images(&mut loaded, prior, &images, &rt)?;
        Ok(loaded)
    };
    let load_decoder = || {
        let files = CascadeDecoderPipeline::locate(decoder_src, lite, rt.dtype);
        let load = || CascadeDecoderPipeline::load_with(&decoder_cfg, decoder_src, &rt);
        load_stage(&bars, "decoder", files, &rt, load)
    };
    let summary = ctx.run(staged, load_prior, load_decoder, &mut progress)?;
    log_peak_memory();
    summary.finish(&plan.jobs)
}

impl PriorStage for CascadePriorPipeline {
    type Output = CascadeEmbeddings;
    fn run_prior(
        &self,
        batch: &[PriorParams],
        noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<CascadeEmbeddings>>> {
        self.run_batch(batch, noise, progress)
    }
}

impl StageOutput for CascadeEmbeddings {
    fn embeddings(&self) -> &Tensor {
        &self.embeddings
    }

    fn to_host(self) -> Result<Self> {
        let host = |t: Tensor| t.to_device(&Device::Cpu);
        Ok(Self {
            embeddings: host(self.embeddings)?,
            pooled: PooledText {
                prompt: host(self.pooled.prompt)?,
                negative: self.pooled.negative.map(host).transpose()?,
            },
        })
    }
}

/// The combined pipeline's decoder: on the prior's pooled text states.
impl DecoderStage<CascadeEmbeddings> for CascadeDecoderPipeline {
    fn run_decoder(
        &self,
        outputs: Vec<CascadeEmbeddings>,
        params: &[DecoderParams],
        noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Tensor>>> {
        let (embeddings, pooled): (Vec<_>, Vec<_>) = outputs.into_iter().map(|o| (o.embeddings, o.pooled)).unzip();
        self.run_batch(&embeddings, Some(&pooled), params, noise, progress)
    }
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
