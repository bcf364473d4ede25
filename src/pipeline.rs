//! The two stages and their sampling loops, as diffusers' WuerstchenPriorPipeline and
//! WuerstchenDecoderPipeline run them (and WuerstchenCombinedPipeline chains them): text
//! encoding, classifier-free guidance with diffusers' batch layout `[cond, uncond]`, the
//! scheduler, and the random draws in diffusers' order (latents, then one per step, the
//! last included). No printing, no argument parsing; files come through a `FileSource`.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::config::{
    read_json, ClipTextConfig, DecoderConfig, DecoderPipelineConfig, PriorConfig, PriorPipelineConfig, SchedulerConfig,
    VqganConfig,
};
use crate::hub::FileSource;
use crate::models::{BatchConditioning, ClipTextModel, PaellaVqDecoder, WuerstchenDiffNeXt, WuerstchenPrior};
use crate::progress::Progress;
use crate::rng::NoiseSource;
use crate::scheduler::{self, DdpmWuerstchen};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{component_weight_files, join, variant_weight_files, Weights};

/// Where and how the networks run.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub device: Device,
    pub dtype: DType,
}

/// A component folder inside a source (`prior`, `text_encoder`, ...), or the source's root
/// (`folder = ""`) for repos that hold one model, like the Stage C variants.
#[derive(Clone, Copy)]
pub struct Component<'a> {
    pub src: &'a dyn FileSource,
    pub folder: &'a str,
    /// How errors name it.
    pub name: &'a str,
}

impl<'a> Component<'a> {
    pub fn new(src: &'a dyn FileSource, folder: &'a str) -> Self {
        Self {
            src,
            folder,
            name: folder,
        }
    }

    pub(crate) fn config<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<T> {
        read_json(self.src, self.name, &join(self.folder, file))
    }

    /// The component's weights as a `VarBuilder`, from the files of the variant matching the
    /// compute dtype where the folder has them (`bf16`, `fp16`; the Stable Cascade repos
    /// publish `bf16`), else the plain ones.
    pub(crate) fn weights(&self, stem: &str, rt: &Runtime) -> Result<candle_nn::VarBuilder<'static>> {
        let files = variant_weight_files(self.src, self.folder, self.name, stem, rt.dtype)?;
        Ok(Weights::open(self.name, &files)?.var_builder(rt.dtype, &rt.device))
    }
}

/// Every file a stage loads from `src` in `dtype`: `model_index.json`, the scheduler config,
/// the tokenizer, and each `(folder, weights stem)` component's config and weights (the
/// dtype's variant where the folder has one). Fetches them (for a Hub source) without loading
/// anything; `stage_c` replaces the `prior` folder.
pub(crate) fn locate(
    src: &dyn FileSource,
    parts: &[(&str, &str)],
    stage_c: Option<&dyn FileSource>,
    dtype: DType,
) -> Result<Vec<std::path::PathBuf>> {
    let mut files = vec![src.require("model_index.json", "model_index.json")?];
    files.push(src.require("scheduler", "scheduler/scheduler_config.json")?);
    for (folder, stem) in parts {
        let (s, f) = match stage_c {
            Some(s) if *folder == "prior" => (s, ""),
            _ => (src, *folder),
        };
        files.push(s.require(folder, &join(f, "config.json"))?);
        files.extend(variant_weight_files(s, f, folder, stem, dtype)?);
    }
    // the tokenizer's tables: tokenizer.json, or vocab.json + merges.txt; and its settings
    let mut tables = Vec::new();
    for name in ["tokenizer.json", "vocab.json", "merges.txt"] {
        tables.push(src.get(&format!("tokenizer/{name}"))?);
    }
    if tables[0].is_none() && (tables[1].is_none() || tables[2].is_none()) {
        return Err(src.missing("tokenizer", "tokenizer/tokenizer.json").into());
    }
    files.extend(tables.into_iter().flatten());
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        files.extend(src.get(&format!("tokenizer/{name}"))?);
    }
    Ok(files)
}

/// One row of token ids (or attention mask) per prompt.
type TokenRows = Vec<Vec<u32>>;

/// A CLIP tokenizer and text encoder pair.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
}

impl TextEncoder {
    pub(crate) fn read_config(src: &dyn FileSource) -> Result<ClipTextConfig> {
        let cfg: ClipTextConfig = Component::new(src, "text_encoder").config("config.json")?;
        cfg.validate("text_encoder")?;
        Ok(cfg)
    }

    pub fn load(src: &dyn FileSource, cfg: &ClipTextConfig, rt: &Runtime) -> Result<Self> {
        let tokenizer = ClipTokenizer::load(src, "tokenizer")?;
        let model = ClipTextModel::new(cfg, Component::new(src, "text_encoder").weights("model", rt)?)?;
        Ok(Self { tokenizer, model })
    }

    /// `last_hidden_state` for each prompt: (len, 77, hidden). Logs the words dropped when a
    /// prompt is longer than the tokenizer's 77 tokens, as diffusers does.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        let (ids, mask) = self.tokens(prompts)?;
        Ok(self.model.forward(&ids, &mask)?)
    }

    /// `hidden_states[-1]` and the projected pooled state of each prompt (Stable Cascade's
    /// `CLIPTextModelWithProjection`), logging truncation like [`TextEncoder::encode`].
    pub fn encode_with_projection(&self, prompts: &[&str]) -> Result<crate::models::clip::ClipOutputs> {
        let (ids, mask) = self.tokens(prompts)?;
        Ok(self.model.encode(&ids, &mask)?)
    }

    /// Token ids and attention masks of each prompt, as diffusers' first tokenizer call.
    fn tokens(&self, prompts: &[&str]) -> Result<(TokenRows, TokenRows)> {
        let mut ids = Vec::with_capacity(prompts.len());
        let mut mask = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let tokens = self.tokenizer.encode(prompt)?;
            if let Some(dropped) = &tokens.dropped {
                tracing::warn!(
                    "prompt truncated to CLIP's {} tokens; dropped: {dropped:?}",
                    self.tokenizer.max_len()
                );
            }
            ids.push(tokens.ids);
            mask.push(tokens.attention_mask);
        }
        Ok((ids, mask))
    }

    /// The conditioning batch diffusers builds, for several requests sharing a pass: each
    /// request's prompt states repeated for its `n` images, then, with guidance, each negative
    /// prompt's likewise: (sum n or 2 sum n, 77, hidden). One request gives diffusers' layout.
    fn conditioning(&self, requests: &[(&str, &str, usize)], guidance: bool) -> Result<Tensor> {
        let mut prompts: Vec<&str> = requests.iter().map(|r| r.0).collect();
        let mut counts: Vec<usize> = requests.iter().map(|r| r.2).collect();
        if guidance {
            prompts.extend(requests.iter().map(|r| r.1));
            counts.extend_from_within(..);
        }
        let states = self.encode(&prompts)?;
        let parts: Vec<Tensor> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| states.narrow(0, i, 1)?.repeat((n, 1, 1)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// `torch.lerp(start, end, weight)` with torch's two-sided formula (exact at both ends).
fn lerp(start: &Tensor, end: &Tensor, weight: f64) -> candle_core::Result<Tensor> {
    let diff = (end - start)?;
    if weight.abs() < 0.5 {
        start + (diff * weight)?
    } else {
        end - (diff * (1.0 - weight))?
    }
}

/// The random streams of a batch: each request's own generator draws its images' share of
/// every draw, in its own order, so that each request sees the numbers it would see alone.
pub struct BatchNoise<'a> {
    streams: Vec<(&'a mut dyn NoiseSource, usize)>,
}

impl<'a> BatchNoise<'a> {
    /// `streams`: each request's generator and its number of images, in batch order.
    pub fn new(streams: Vec<(&'a mut dyn NoiseSource, usize)>) -> Self {
        Self { streams }
    }

    /// The generators of a batch's requests with their numbers of images, in batch order.
    pub fn of<G: NoiseSource>(generators: &'a mut [G], images: impl IntoIterator<Item = usize>) -> Self {
        let streams = generators.iter_mut().map(|g| g as &mut dyn NoiseSource);
        Self::new(streams.zip(images).collect())
    }

    pub(crate) fn counts(&self) -> Vec<usize> {
        self.streams.iter().map(|(_, n)| *n).collect()
    }

    /// Noise of (batch images, ..item) in f32 on the device, each request's rows from its stream.
    fn draw(&mut self, item: &[usize], device: &Device) -> Result<Tensor> {
        let mut values = Vec::new();
        let mut images = 0;
        for (noise, n) in &mut self.streams {
            let shape: Vec<usize> = std::iter::once(*n).chain(item.iter().copied()).collect();
            values.extend(noise.standard_normal(&shape)?);
            images += *n;
        }
        let shape: Vec<usize> = std::iter::once(images).chain(item.iter().copied()).collect();
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

/// Whether a tensor holds only finite values.
fn is_finite(t: &Tensor) -> Result<bool> {
    let sum = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    Ok(sum.is_finite())
}

/// The error for a request whose images came out NaN or Inf, instead of a black image.
fn not_finite(stage: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the {stage} produced NaN or Inf values; in float16 try --dtype bf16 or f32 \
         (half precision can overflow), or check the model weights"
    )
}

/// A batch's result split back into its requests' rows (`counts` images each); a request
/// whose rows are not all finite gets the error instead (the others are unaffected: no op
/// mixes the images of a batch).
pub(crate) fn split_finite(t: &Tensor, counts: &[usize], stage: &str) -> Result<Vec<Result<Tensor>>> {
    let mut start = 0;
    let mut parts = Vec::with_capacity(counts.len());
    for &n in counts {
        let part = t.narrow(0, start, n)?;
        parts.push(if is_finite(&part)? {
            Ok(part)
        } else {
            Err(not_finite(stage))
        });
        start += n;
    }
    Ok(parts)
}

/// The one result of a batch of one request.
pub(crate) fn single<T>(results: Vec<Result<T>>) -> Result<T> {
    results
        .into_iter()
        .next()
        .unwrap_or_else(|| Err(anyhow::anyhow!("a batch of one request gave no result")))
}

/// The denoising loop both stages share, with diffusers' random draws: the initial latents
/// of (batch images, ..item), then one draw per step (the last included), each request's
/// from its own stream. `model(x_batch, r_batch)` predicts
/// the noise for the (possibly doubled, with guidance) batch. The state stays in f32 whatever
/// the model's dtype: the guidance combination (which amplifies differences w-fold) and the
/// scheduler update run in f32, and the timestep reaches the embedding unrounded; only the
/// network runs in `rt.dtype`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sample(
    item: &[usize],
    timesteps: &[f32],
    guidance: Option<f64>,
    scheduler: &DdpmWuerstchen,
    rt: &Runtime,
    noise: &mut BatchNoise,
    progress: &mut dyn Progress,
    stage: &str,
    model: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Sync,
) -> Result<Tensor> {
    let mut latents = noise.draw(item, &rt.device)?;
    let n = latents.dim(0)?;
    let model = |x: &Tensor, r: &Tensor| crate::ops::on_cpu_workers(&rt.device, || model(x, r));
    let mut net = crate::graph::StepReplay::new(&rt.device, model);
    progress.start(stage, timesteps.len().saturating_sub(1));
    for pair in timesteps.windows(2) {
        let (t, t_prev) = (pair[0], pair[1]);
        let ratio = Tensor::full(t, n, &rt.device)?;
        let x = latents.to_dtype(rt.dtype)?;
        let pred = match guidance {
            Some(w) => {
                let both = net
                    .call(&Tensor::cat(&[&x, &x], 0)?, &Tensor::cat(&[&ratio, &ratio], 0)?)?
                    .to_dtype(DType::F32)?;
                lerp(&both.narrow(0, n, n)?, &both.narrow(0, 0, n)?, w)?
            }
            None => net.call(&x, &ratio)?.to_dtype(DType::F32)?,
        };
        let eps = noise.draw(item, &rt.device)?;
        latents = scheduler.step(&pred, t, t_prev, &latents, &eps)?;
        progress.step();
        if progress.cancelled() {
            return Err(crate::error::Interrupted.into());
        }
    }
    progress.finish();
    Ok(latents)
}

/// A network's step `forward(x, r, cond)` over a batch, on its halves at once where
/// [`crate::ops::split_batch`] splits it.
pub(crate) fn by_halves<C: BatchConditioning>(
    x: &Tensor,
    r: &Tensor,
    cond: &C,
    forward: impl Fn(&Tensor, &Tensor, &C) -> candle_core::Result<Tensor> + Sync,
) -> Result<Tensor> {
    Ok(crate::ops::split_batch(x, |start, len| {
        let (x, r) = (x.narrow(0, start, len)?, r.narrow(0, start, len)?);
        forward(&x, &r, &cond.narrow(start, len)?)
    })?)
}

/// What the prior stage needs to know about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    /// descending, ending at 0 (the last value is where sampling stops)
    pub timesteps: Vec<f32>,
    pub guidance: f64,
    pub num_images: usize,
}

impl PriorParams {
    /// Whether two requests can run through the prior as one batch: everything but the
    /// prompts and the number of images equal.
    pub fn shares_pass(&self, other: &Self) -> bool {
        (self.width, self.height, &self.timesteps) == (other.width, other.height, &other.timesteps)
            && self.guidance.to_bits() == other.guidance.to_bits()
    }
}

/// The first request of a batch, after checking that the others can share its passes.
pub(crate) fn leader<P>(batch: &[P], shares: impl Fn(&P, &P) -> bool) -> Result<&P> {
    let first = batch.first().ok_or_else(|| anyhow::anyhow!("an empty batch"))?;
    anyhow::ensure!(
        batch.iter().all(|p| shares(first, p)),
        "requests of different sizes, schedules or guidance cannot share a batch"
    );
    Ok(first)
}

/// What every stage reads besides its networks' configs, each parsed and validated:
/// `model_index.json` (as `P`, checked by `validate`), the scheduler's and the text encoder's.
pub(crate) fn read_stage_files<P: serde::de::DeserializeOwned>(
    src: &dyn FileSource,
    validate: impl FnOnce(&P) -> std::result::Result<(), crate::error::ModelError>,
) -> Result<(P, SchedulerConfig, ClipTextConfig)> {
    let pipeline: P = read_json(src, "model_index.json", "model_index.json")?;
    validate(&pipeline)?;
    let scheduler: SchedulerConfig = Component::new(src, "scheduler").config("scheduler_config.json")?;
    scheduler.validate()?;
    Ok((pipeline, scheduler, TextEncoder::read_config(src)?))
}

/// The prior stage's configuration files, parsed and validated once: the size rule and the
/// loader both read them from here.
#[derive(Debug, Clone)]
pub struct PriorConfigs {
    pub pipeline: PriorPipelineConfig,
    pub prior: PriorConfig,
    pub scheduler: SchedulerConfig,
    pub text_encoder: ClipTextConfig,
}

impl PriorConfigs {
    /// Reads a `warp-ai/wuerstchen-prior`-layout source's configs; `stage_c` replaces only
    /// the Stage C network's (a folder or repo holding `config.json` + weights).
    pub fn read(src: &dyn FileSource, stage_c: Option<&dyn FileSource>) -> Result<Self> {
        v2_only(src, "prior")?;
        let (pipeline, scheduler, text_encoder) = read_stage_files(src, PriorPipelineConfig::validate)?;
        let prior: PriorConfig = prior_component(src, stage_c).config("config.json")?;
        prior.validate()?;
        Ok(Self {
            pipeline,
            prior,
            scheduler,
            text_encoder,
        })
    }
}

/// An input error for a Stable Cascade pipeline where a Würstchen v2 one is read (the
/// commands pick the family first; this guards the library's callers).
fn v2_only(src: &dyn FileSource, what: &str) -> Result<()> {
    if crate::cascade::Family::of(src)? == crate::cascade::Family::StableCascade {
        let message = format!(
            "{} is a Stable Cascade {what}; load it with the Stable Cascade pipelines (`crate::cascade`)",
            src.describe()
        );
        return Err(crate::error::InputError::new(message).into());
    }
    Ok(())
}

/// Where the Stage C network lives: the source's `prior` folder, or the root of `stage_c`.
fn prior_component<'a>(src: &'a dyn FileSource, stage_c: Option<&'a dyn FileSource>) -> Component<'a> {
    match stage_c {
        Some(s) => Component {
            src: s,
            folder: "",
            name: "prior",
        },
        None => Component::new(src, "prior"),
    }
}

/// Stage C: text -> image embeddings.
pub struct PriorPipeline {
    pub text_encoder: TextEncoder,
    pub prior: WuerstchenPrior,
    pub prior_config: PriorConfig,
    pub scheduler: DdpmWuerstchen,
    pub config: PriorPipelineConfig,
    pub runtime: Runtime,
}

impl PriorPipeline {
    /// Reads the configs and loads the networks (see [`PriorConfigs::read`]).
    pub fn load(src: &dyn FileSource, stage_c: Option<&dyn FileSource>, rt: &Runtime) -> Result<Self> {
        Self::load_with(&PriorConfigs::read(src, stage_c)?, src, stage_c, rt)
    }

    /// Loads the networks described by configs already read from `src`.
    pub fn load_with(
        configs: &PriorConfigs,
        src: &dyn FileSource,
        stage_c: Option<&dyn FileSource>,
        rt: &Runtime,
    ) -> Result<Self> {
        let text_encoder = TextEncoder::load(src, &configs.text_encoder, rt)?;
        let weights = prior_component(src, stage_c).weights("diffusion_pytorch_model", rt)?;
        Ok(Self {
            text_encoder,
            prior: WuerstchenPrior::new(&configs.prior, weights)?,
            prior_config: configs.prior.clone(),
            scheduler: DdpmWuerstchen::new(&configs.scheduler),
            config: configs.pipeline.clone(),
            runtime: rt.clone(),
        })
    }

    /// Fetches every file `load` reads in `dtype` (see `locate`), returning their paths.
    pub fn locate(
        src: &dyn FileSource,
        stage_c: Option<&dyn FileSource>,
        dtype: DType,
    ) -> Result<Vec<std::path::PathBuf>> {
        let parts = [("text_encoder", "model"), ("prior", "diffusion_pytorch_model")];
        locate(src, &parts, stage_c, dtype)
    }

    /// The embedding's (h, w) for an image of (height, width).
    pub fn latent_size(&self, height: usize, width: usize) -> (usize, usize) {
        prior_latent_size(self.config.resolution_multiple, height, width)
    }

    /// Image embeddings (N, c_in, h, w) in f32, denormalised (`latents * latent_mean - latent_std`).
    pub fn run(&self, p: &PriorParams, noise: &mut dyn NoiseSource, progress: &mut dyn Progress) -> Result<Tensor> {
        let noise = BatchNoise::new(vec![(noise, p.num_images)]);
        single(self.run_batch(std::slice::from_ref(p), noise, progress)?)
    }

    /// [`PriorPipeline::run`] for requests that share one pass per step (`PriorParams::shares_pass`),
    /// `noise` holding their streams in the same order. The outer error fails the whole batch;
    /// a request whose embeddings are not finite gets its own error.
    pub fn run_batch(
        &self,
        batch: &[PriorParams],
        mut noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Tensor>>> {
        let p = leader(batch, PriorParams::shares_pass)?;
        let guidance = (p.guidance > 1.0).then_some(p.guidance);
        let requests: Vec<_> = batch
            .iter()
            .map(|p| (p.prompt.as_str(), p.negative_prompt.as_str(), p.num_images))
            .collect();
        let started = std::time::Instant::now();
        let text = self.text_encoder.conditioning(&requests, guidance.is_some())?;
        let encoded = started.elapsed().as_secs_f64();
        let cond = self.prior.condition(&text)?;
        let conditioned = started.elapsed().as_secs_f64() - encoded;
        tracing::debug!("prior: text encoded in {encoded:.3}s, its keys and values in {conditioned:.3}s");
        let (h, w) = self.latent_size(p.height, p.width);
        let latents = sample(
            &[self.prior_config.c_in, h, w],
            &p.timesteps,
            guidance,
            &self.scheduler,
            &self.runtime,
            &mut noise,
            progress,
            "prior",
            |x, r| by_halves(x, r, &cond, |x, r, cond| self.prior.forward(x, r, cond)),
        )?;
        let embeddings = latents.affine(self.config.latent_mean, -self.config.latent_std)?;
        split_finite(&embeddings, &noise.counts(), "prior")
    }
}

/// What the decoder stage needs to know about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub timesteps: Vec<f32>,
    pub guidance: f64,
}

impl DecoderParams {
    /// Whether two requests can run through the decoder as one batch (given embeddings of one
    /// size): everything but the prompts equal.
    pub fn shares_pass(&self, other: &Self) -> bool {
        self.timesteps == other.timesteps && self.guidance.to_bits() == other.guidance.to_bits()
    }
}

/// The decoder stage's configuration files, parsed and validated once.
#[derive(Debug, Clone)]
pub struct DecoderConfigs {
    pub pipeline: DecoderPipelineConfig,
    pub decoder: DecoderConfig,
    pub vqgan: VqganConfig,
    pub scheduler: SchedulerConfig,
    pub text_encoder: ClipTextConfig,
}

impl DecoderConfigs {
    /// Reads a `warp-ai/wuerstchen`-layout source's configs.
    pub fn read(src: &dyn FileSource) -> Result<Self> {
        v2_only(src, "decoder")?;
        let (pipeline, scheduler, text_encoder) = read_stage_files(src, DecoderPipelineConfig::validate)?;
        let decoder: DecoderConfig = Component::new(src, "decoder").config("config.json")?;
        decoder.validate()?;
        let vqgan: VqganConfig = Component::new(src, "vqgan").config("config.json")?;
        vqgan.validate()?;
        Ok(Self {
            pipeline,
            decoder,
            vqgan,
            scheduler,
            text_encoder,
        })
    }

    /// The decoder latent's (H, W) for an embedding of (h, w): `int(size * latent_dim_scale)`.
    pub fn latent_size(&self, h: usize, w: usize) -> (usize, usize) {
        scale_latent((h, w), self.pipeline.latent_dim_scale)
    }

    /// For stored embeddings of (h, w): the (width, height) in pixels of the images they
    /// decode to, or an input error when this decoder cannot run on them (its latent,
    /// `int(size * latent_dim_scale)`, must divide by the decoder's downscale).
    pub fn image_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (lh, lw) = self.latent_size(h, w);
        let down = self.decoder.downscale();
        if lh == 0 || lw == 0 || lh % down != 0 || lw % down != 0 {
            return Err(crate::error::InputError::new(format!(
                "embeddings of {h}x{w} give a decoder latent of {lh}x{lw}, which this decoder cannot run \
                 (sides must divide by {down}); were they made for another model?"
            ))
            .into());
        }
        let up = self.vqgan.upscale();
        Ok((lw * up, lh * up))
    }
}

/// Stage B + Stage A: image embeddings (+ text) -> images.
pub struct DecoderPipeline {
    pub text_encoder: TextEncoder,
    pub decoder: WuerstchenDiffNeXt,
    pub decoder_config: DecoderConfig,
    pub vqgan: PaellaVqDecoder,
    pub vqgan_config: VqganConfig,
    pub scheduler: DdpmWuerstchen,
    pub config: DecoderPipelineConfig,
    pub runtime: Runtime,
}

impl DecoderPipeline {
    /// Reads the configs and loads the networks of a `warp-ai/wuerstchen`-layout source.
    pub fn load(src: &dyn FileSource, rt: &Runtime) -> Result<Self> {
        Self::load_with(&DecoderConfigs::read(src)?, src, rt)
    }

    /// Loads the networks described by configs already read from `src`.
    pub fn load_with(configs: &DecoderConfigs, src: &dyn FileSource, rt: &Runtime) -> Result<Self> {
        let text_encoder = TextEncoder::load(src, &configs.text_encoder, rt)?;
        let decoder_weights = Component::new(src, "decoder").weights("diffusion_pytorch_model", rt)?;
        let vqgan_weights = Component::new(src, "vqgan").weights("diffusion_pytorch_model", rt)?;
        Ok(Self {
            text_encoder,
            decoder: WuerstchenDiffNeXt::new(&configs.decoder, decoder_weights)?,
            decoder_config: configs.decoder.clone(),
            vqgan: PaellaVqDecoder::new(&configs.vqgan, vqgan_weights)?,
            vqgan_config: configs.vqgan.clone(),
            scheduler: DdpmWuerstchen::new(&configs.scheduler),
            config: configs.pipeline.clone(),
            runtime: rt.clone(),
        })
    }

    /// Fetches every file `load` reads in `dtype` (see `locate`), returning their paths.
    pub fn locate(src: &dyn FileSource, dtype: DType) -> Result<Vec<std::path::PathBuf>> {
        let parts = [
            ("text_encoder", "model"),
            ("decoder", "diffusion_pytorch_model"),
            ("vqgan", "diffusion_pytorch_model"),
        ];
        locate(src, &parts, None, dtype)
    }

    /// The VQGAN latent's (H, W) for an embedding of (h, w): `int(size * latent_dim_scale)`.
    pub fn latent_size(&self, h: usize, w: usize) -> (usize, usize) {
        scale_latent((h, w), self.config.latent_dim_scale)
    }

    /// Images (N, 3, H, W) in [0, 1], f32, from image embeddings (N, c, h, w).
    pub fn run(
        &self,
        embeddings: &Tensor,
        p: &DecoderParams,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let noise = BatchNoise::new(vec![(noise, embeddings.dim(0)?)]);
        let batch = std::slice::from_ref(p);
        single(self.run_batch(std::slice::from_ref(embeddings), batch, noise, progress)?)
    }

    /// [`DecoderPipeline::run`] for requests that share one pass per step: embeddings of one
    /// size, `DecoderParams::shares_pass`, `noise` holding their streams in the same order.
    /// The outer error fails the whole batch; a request whose latents are not finite gets its own.
    pub fn run_batch(
        &self,
        embeddings: &[Tensor],
        batch: &[DecoderParams],
        mut noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Tensor>>> {
        let rt = &self.runtime;
        let p = leader(batch, DecoderParams::shares_pass)?;
        let sizes: Vec<_> = embeddings
            .iter()
            .map(|e| e.dims().get(2..).map(<[usize]>::to_vec))
            .collect();
        anyhow::ensure!(
            embeddings.len() == batch.len() && sizes.windows(2).all(|s| s[0] == s[1]),
            "a batch needs one set of embeddings per request, all of one size"
        );
        let counts = noise.counts();
        let embeddings = match embeddings {
            [one] => one.clone(),
            all => Tensor::cat(all, 0)?,
        };
        let embeddings = embeddings.to_device(&rt.device)?.to_dtype(rt.dtype)?;
        let (n, _, h, w) = embeddings.dims4()?;
        anyhow::ensure!(
            counts.iter().sum::<usize>() == n,
            "the noise streams do not cover the batch"
        );
        let guidance = (p.guidance > 1.0).then_some(p.guidance);
        let requests: Vec<_> = batch
            .iter()
            .zip(&counts)
            .map(|(p, &n)| (p.prompt.as_str(), p.negative_prompt.as_str(), n))
            .collect();
        let started = std::time::Instant::now();
        let text = self.text_encoder.conditioning(&requests, guidance.is_some())?;
        let encoded = started.elapsed().as_secs_f64();
        // the unconditional half sees zeros instead of the image embeddings
        let effnet = match guidance {
            Some(_) => Tensor::cat(&[&embeddings, &embeddings.zeros_like()?], 0)?,
            None => embeddings,
        };
        let size = self.latent_size(h, w);
        let cond = self.decoder.condition(&effnet, &text, size)?;
        let conditioned = started.elapsed().as_secs_f64() - encoded;
        tracing::debug!("decoder: text encoded in {encoded:.3}s, the conditioning in {conditioned:.3}s");
        let latents = sample(
            &[self.decoder_config.c_in, size.0, size.1],
            &p.timesteps,
            guidance,
            &self.scheduler,
            rt,
            &mut noise,
            progress,
            "decoder",
            |x, r| by_halves(x, r, &cond, |x, r, cond| self.decoder.forward(x, r, cond)),
        )?;
        decode_images(&self.vqgan, latents, &counts, rt, progress)
    }
}

/// Stage A: the decoder's `latents` through the VQGAN (`decode(scale_factor * latents)`,
/// clamped to [0, 1], f32), split into the requests' `counts` images; a request whose latents
/// are not finite gets an error (clamping can hide their NaN in the images).
pub(crate) fn decode_images(
    vqgan: &PaellaVqDecoder,
    latents: Tensor,
    counts: &[usize],
    rt: &Runtime,
    progress: &mut dyn Progress,
) -> Result<Vec<Result<Tensor>>> {
    let finite = split_finite(&latents, counts, "decoder")?;
    progress.start("vqgan", 1);
    let latents = (latents * vqgan.scale_factor())?.to_dtype(rt.dtype)?;
    let decode = || crate::ops::split_batch(&latents, |start, len| vqgan.decode(&latents.narrow(0, start, len)?));
    let images = crate::ops::on_cpu_workers(&rt.device, decode)?
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?;
    progress.step();
    progress.finish();
    let images = split_finite(&images, counts, "decoder")?;
    Ok(finite.into_iter().zip(images).map(|(l, i)| l.and(i)).collect())
}

/// diffusers' prior latent size for an image of (height, width): `ceil(size / resolution_multiple)`.
pub(crate) fn prior_latent_size(resolution_multiple: f64, height: usize, width: usize) -> (usize, usize) {
    let m = resolution_multiple;
    ((height as f64 / m).ceil() as usize, (width as f64 / m).ceil() as usize)
}

/// diffusers' decoder latent size for an embedding of (h, w): `int(size * latent_dim_scale)`.
pub(crate) fn scale_latent((h, w): (usize, usize), latent_dim_scale: f64) -> (usize, usize) {
    (
        (h as f64 * latent_dim_scale) as usize,
        (w as f64 * latent_dim_scale) as usize,
    )
}

/// The default decoder schedule: `steps` equal steps from 1 to 0.
pub fn decoder_timesteps(steps: usize) -> Vec<f32> {
    scheduler::linear_timesteps(steps)
}

/// Which image sizes the two stages produce, from the files: diffusers sizes the prior's
/// latent `ceil(px / resolution_multiple)`, the decoder's `int(that * latent_dim_scale)`, which
/// must divide by the decoder's downscale, and the image is that times the VQGAN's upscale.
/// Other sizes come out at another size (1000 -> 1024) or crash diffusers' decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeRule {
    pub resolution_multiple: f64,
    pub latent_dim_scale: f64,
    pub decoder_downscale: usize,
    pub vqgan_upscale: usize,
}

impl SizeRule {
    pub fn new(prior: &PriorConfigs, decoder: &DecoderConfigs) -> Self {
        Self {
            resolution_multiple: prior.pipeline.resolution_multiple,
            latent_dim_scale: decoder.pipeline.latent_dim_scale,
            decoder_downscale: decoder.decoder.downscale(),
            vqgan_upscale: decoder.vqgan.upscale(),
        }
    }

    /// The side length diffusers would produce when asked for `px`, or `None` where its
    /// decoder cannot run (a latent side that does not divide by the decoder's downscale).
    pub fn produced(&self, px: usize) -> Option<usize> {
        let prior = (px as f64 / self.resolution_multiple).ceil();
        let latent = (prior * self.latent_dim_scale) as usize; // saturates, as a cast does
        let divides = self.decoder_downscale > 0 && latent % self.decoder_downscale == 0;
        (latent > 0 && divides)
            .then(|| latent.checked_mul(self.vqgan_upscale))
            .flatten()
    }

    pub fn is_valid(&self, px: usize) -> bool {
        px > 0 && self.produced(px) == Some(px)
    }

    /// The nearest valid sizes below and above `px` (searching a bounded window).
    pub fn nearest(&self, px: usize) -> (Option<usize>, Option<usize>) {
        const WINDOW: usize = 4096;
        let below = (1..px.min(1 << 20)).rev().find(|&v| self.is_valid(v));
        let above = (px + 1..px.saturating_add(WINDOW)).find(|&v| self.is_valid(v));
        (below, above)
    }

    /// `Ok` for a size the model produces exactly; otherwise an input error naming the
    /// nearest valid sizes.
    pub fn check(&self, what: &str, px: usize) -> std::result::Result<(), crate::error::InputError> {
        if self.is_valid(px) {
            return Ok(());
        }
        let (below, above) = self.nearest(px);
        let options: Vec<String> = [below, above].iter().flatten().map(|v| v.to_string()).collect();
        let hint = match options.len() {
            0 => "no valid size nearby".to_string(),
            _ => format!("use {}", options.join(" or ")),
        };
        let why = match self.produced(px) {
            _ if px == 0 => "must be greater than 0".to_string(),
            Some(other) => format!("would come out at {other} px"),
            None => "is not a size this model can produce".to_string(),
        };
        Err(crate::error::InputError::new(format!(
            "{what} {px} {why} (sizes must be multiples of {} px for this model); {hint}",
            self.step()
        )))
    }

    /// The spacing of valid sizes, for messages (128 for the published models).
    pub fn step(&self) -> usize {
        let first: Vec<usize> = (1..100_000).filter(|&v| self.is_valid(v)).take(2).collect();
        match first.as_slice() {
            [a, b] => b - a,
            [a] => *a,
            _ => 0,
        }
    }
}

/// Free memory on a CUDA device (`None` for the CPU, or when it cannot be read).
pub fn free_device_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        // binds the device's context to this thread before asking
        return dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64);
    }
    let _ = device;
    None
}

/// Memory a run may still take on `device`: free GPU memory, or on the CPU the kernel's
/// `MemAvailable` (free memory plus what it can reclaim, the page cache included).
pub fn available_memory(device: &Device) -> Option<u64> {
    if device.is_cpu() {
        mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
    } else {
        free_device_memory(device)
    }
}

/// `MemAvailable` in bytes from the text of `/proc/meminfo`.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The compute capability (major, minor) of a CUDA device; `None` for the CPU, or when it
/// cannot be read.
pub fn compute_capability(device: &Device) -> Option<(u32, u32)> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        let (major, minor) = dev.cuda_stream().context().compute_capability().ok()?;
        return Some((u32::try_from(major).ok()?, u32::try_from(minor).ok()?));
    }
    let _ = device;
    None
}

/// Lets the device's default memory pool keep freed memory for reuse instead of handing it
/// back to the driver at every synchronisation (its release threshold is 0 by default): the
/// tensors of one step are freed and allocated again in the next, as torch's caching
/// allocator assumes. Nothing happens where allocations do not come from the pool (a driver
/// without stream-ordered allocation) or off CUDA. Called with `WUERSTCHEN_CUDA_GRAPHS=1`
/// until a GPU run has shown it.
pub fn keep_freed_device_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Ok(dev) = device.as_cuda_device() {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let context = dev.cuda_stream().context().clone();
        if !context.has_async_alloc() {
            return Ok(());
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: `pool` receives the device's default pool, a handle the driver owns; the
        // attribute takes a pointer to a u64.
        let status = unsafe {
            context.bind_to_thread().map_err(candle_core::Error::wrap)?;
            let got = sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device());
            if got != sys::CUresult::CUDA_SUCCESS {
                got
            } else {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
            }
        };
        if status != sys::CUresult::CUDA_SUCCESS {
            anyhow::bail!("cannot set the device memory pool's release threshold: {status:?}");
        }
    }
    let _ = device;
    Ok(())
}

/// Roughly the bytes a component's weights take in `dtype`: the file sizes, assuming f32
/// storage as in the published repos.
pub fn weight_bytes(src: &dyn FileSource, folder: &str, stem: &str, dtype: DType) -> Option<u64> {
    let files = component_weight_files(src, folder, folder, stem).ok()?;
    let stored: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    Some(stored / 4 * dtype.size_in_bytes() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN in one request's rows fails that request only; the others keep their rows.
    #[test]
    fn a_batch_splits_into_its_requests_and_only_a_non_finite_one_fails() {
        let mut values = vec![0.5f32; 4 * 3];
        values[3 * 3 + 1] = f32::NAN; // the last row: the third request's second image
        let t = Tensor::from_vec(values, (4, 3), &Device::Cpu).unwrap();
        let parts = split_finite(&t, &[1, 1, 2], "prior").unwrap();
        assert_eq!(parts.len(), 3);
        for part in &parts[..2] {
            assert_eq!(part.as_ref().unwrap().to_vec2::<f32>().unwrap(), [[0.5; 3]]);
        }
        let err = parts[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("the prior produced NaN or Inf"), "{err}");
    }

    /// Each request's rows come from its own stream, in order, as if it ran alone.
    #[test]
    fn batch_noise_draws_each_requests_rows_from_its_own_stream() {
        use crate::rng::TorchCpuGenerator;
        let alone = |seed: u64, n: usize| {
            let mut g = TorchCpuGenerator::new(seed);
            let first = g.standard_normal(&[n, 2, 3]).unwrap();
            let second = g.standard_normal(&[n, 2, 3]).unwrap();
            (first, second)
        };
        let mut gens = [TorchCpuGenerator::new(7), TorchCpuGenerator::new(8)];
        let mut noise = BatchNoise::of(&mut gens, [2, 1]);
        let first = noise.draw(&[2, 3], &Device::Cpu).unwrap();
        let second = noise.draw(&[2, 3], &Device::Cpu).unwrap();
        assert_eq!(first.dims(), [3, 2, 3]);
        let rows = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ((a1, a2), (b1, b2)) = (alone(7, 2), alone(8, 1));
        assert_eq!(rows(&first), [a1, b1].concat());
        assert_eq!(rows(&second), [a2, b2].concat());
    }

    fn published() -> SizeRule {
        SizeRule {
            resolution_multiple: 42.67,
            latent_dim_scale: 10.67,
            decoder_downscale: 16,
            vqgan_upscale: 4,
        }
    }

    #[test]
    fn published_models_take_multiples_of_128() {
        let r = published();
        for k in 1..=40 {
            assert!(r.is_valid(128 * k), "{}", 128 * k);
        }
        assert_eq!(r.produced(1000), Some(1024));
        assert_eq!(r.produced(1100), None); // diffusers' decoder would crash
        assert!(!r.is_valid(1000));
        assert_eq!(r.nearest(1000), (Some(896), Some(1024)));
        assert_eq!(r.step(), 128);
        let msg = r.check("--width", 1000).unwrap_err().to_string();
        assert!(
            msg.contains("896") && msg.contains("1024") && msg.contains("multiples of 128"),
            "{msg}"
        );
        assert!(r
            .check("--height", 0)
            .unwrap_err()
            .to_string()
            .contains("greater than 0"));
        // beyond the largest size the rule can produce (12672 px), the message names it
        let msg = r.check("--width", 20000).unwrap_err().to_string();
        assert!(msg.contains("use 12672"), "{msg}");
    }

    #[test]
    fn lerp_is_torchs_two_sided_formula() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1f32, -2.0], &dev)?;
        let b = Tensor::new(&[3f32, 5.0], &dev)?;
        assert_eq!(lerp(&a, &b, 4.0)?.to_vec1::<f32>()?, vec![9.0, 26.0]);
        assert_eq!(lerp(&a, &b, 0.25)?.to_vec1::<f32>()?, vec![1.5, -0.25]);
        assert_eq!(lerp(&a, &b, 1.0)?.to_vec1::<f32>()?, vec![3.0, 5.0]);
        Ok(())
    }
}
