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
use crate::models::{ClipTextModel, PaellaVqDecoder, WuerstchenDiffNeXt, WuerstchenPrior};
use crate::progress::Progress;
use crate::rng::NoiseSource;
use crate::scheduler::{self, DdpmWuerstchen};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{component_weight_files, join, Weights};

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

    fn config<T: serde::de::DeserializeOwned>(&self, file: &str) -> Result<T> {
        read_json(self.src, self.name, &join(self.folder, file))
    }

    fn weights(&self, stem: &str, rt: &Runtime) -> Result<candle_nn::VarBuilder<'static>> {
        let files = component_weight_files(self.src, self.folder, self.name, stem)?;
        Ok(Weights::open(self.name, &files)?.var_builder(rt.dtype, &rt.device))
    }
}

fn required(src: &dyn FileSource, component: &str, rel: &str) -> Result<std::path::PathBuf> {
    src.get(rel)?.ok_or_else(|| {
        crate::error::ModelError::MissingFile {
            component: component.to_string(),
            path: std::path::Path::new(&src.describe()).join(rel),
        }
        .into()
    })
}

/// Every file a stage loads from `src`: `model_index.json`, the scheduler config, the
/// tokenizer, and each `(folder, weights stem)` component's config and weights. Fetches them
/// (for a Hub source) without loading anything; `stage_c` replaces the `prior` folder.
fn locate(
    src: &dyn FileSource,
    parts: &[(&str, &str)],
    stage_c: Option<&dyn FileSource>,
) -> Result<Vec<std::path::PathBuf>> {
    let mut files = vec![required(src, "model_index.json", "model_index.json")?];
    files.push(required(src, "scheduler", "scheduler/scheduler_config.json")?);
    for (folder, stem) in parts {
        let (s, f) = match stage_c {
            Some(s) if *folder == "prior" => (s, ""),
            _ => (src, *folder),
        };
        files.push(required(s, folder, &join(f, "config.json"))?);
        files.extend(component_weight_files(s, f, folder, stem)?);
    }
    // the tokenizer's tables: tokenizer.json, or vocab.json + merges.txt; and its settings
    let mut tables = Vec::new();
    for name in ["tokenizer.json", "vocab.json", "merges.txt"] {
        tables.push(src.get(&format!("tokenizer/{name}"))?);
    }
    if tables[0].is_none() && (tables[1].is_none() || tables[2].is_none()) {
        return Err(crate::error::ModelError::MissingFile {
            component: "tokenizer".into(),
            path: std::path::Path::new(&src.describe()).join("tokenizer/tokenizer.json"),
        }
        .into());
    }
    files.extend(tables.into_iter().flatten());
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        files.extend(src.get(&format!("tokenizer/{name}"))?);
    }
    Ok(files)
}

/// A CLIP tokenizer and text encoder pair.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
}

impl TextEncoder {
    fn read_config(src: &dyn FileSource) -> Result<ClipTextConfig> {
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
        Ok(self.model.forward(&ids, &mask)?)
    }

    /// The conditioning batch diffusers builds: the prompt's states repeated `n` times, then,
    /// with guidance, the negative prompt's repeated `n` times: (n or 2n, 77, hidden).
    fn conditioning(&self, prompt: &str, negative: &str, n: usize, guidance: bool) -> Result<Tensor> {
        let prompts: Vec<&str> = if guidance { vec![prompt, negative] } else { vec![prompt] };
        let states = self.encode(&prompts)?;
        let parts: Vec<Tensor> = (0..states.dim(0)?)
            .map(|i| states.narrow(0, i, 1)?.repeat((n, 1, 1)))
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

/// Noise from the host generator, in f32 on the device.
fn draw(noise: &mut dyn NoiseSource, shape: &[usize], device: &Device) -> Result<Tensor> {
    let values = noise.standard_normal(shape)?;
    Ok(Tensor::from_vec(values, shape, device)?)
}

/// Fails when a stage produced NaN or Inf, instead of writing a black image.
fn check_finite(t: &Tensor, stage: &str) -> Result<()> {
    let sum = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        anyhow::bail!(
            "the {stage} produced NaN or Inf values; in float16 try --dtype bf16 or f32 \
             (half precision can overflow), or check the model weights"
        );
    }
    Ok(())
}

/// The denoising loop both stages share, with diffusers' random draws: the initial latents
/// of `shape`, then one draw per step (the last included). `model(x_batch, r_batch)` predicts
/// the noise for the (possibly doubled, with guidance) batch. The state stays in f32 whatever
/// the model's dtype: the guidance combination (which amplifies differences w-fold) and the
/// scheduler update run in f32, and the timestep reaches the embedding unrounded; only the
/// network runs in `rt.dtype`. A NaN or Inf in the result is an error naming `stage`.
#[allow(clippy::too_many_arguments)]
fn sample(
    shape: &[usize],
    timesteps: &[f32],
    guidance: Option<f64>,
    scheduler: &DdpmWuerstchen,
    rt: &Runtime,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn Progress,
    stage: &str,
    model: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = shape[0];
    let mut latents = draw(noise, shape, &rt.device)?;
    progress.start(stage, timesteps.len().saturating_sub(1));
    for pair in timesteps.windows(2) {
        let (t, t_prev) = (pair[0], pair[1]);
        let ratio = Tensor::full(t, n, &rt.device)?;
        let x = latents.to_dtype(rt.dtype)?;
        let pred = match guidance {
            Some(w) => {
                let both =
                    model(&Tensor::cat(&[&x, &x], 0)?, &Tensor::cat(&[&ratio, &ratio], 0)?)?.to_dtype(DType::F32)?;
                lerp(&both.narrow(0, n, n)?, &both.narrow(0, 0, n)?, w)?
            }
            None => model(&x, &ratio)?.to_dtype(DType::F32)?,
        };
        let eps = draw(noise, shape, &rt.device)?;
        latents = scheduler.step(&pred, t, t_prev, &latents, &eps)?;
        progress.step();
        if progress.cancelled() {
            return Err(crate::error::Interrupted.into());
        }
    }
    progress.finish();
    check_finite(&latents, stage)?;
    Ok(latents)
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
        let pipeline: PriorPipelineConfig = read_json(src, "model_index.json", "model_index.json")?;
        pipeline.validate()?;
        let prior: PriorConfig = prior_component(src, stage_c).config("config.json")?;
        prior.validate()?;
        let scheduler: SchedulerConfig = Component::new(src, "scheduler").config("scheduler_config.json")?;
        scheduler.validate()?;
        let text_encoder = TextEncoder::read_config(src)?;
        Ok(Self {
            pipeline,
            prior,
            scheduler,
            text_encoder,
        })
    }
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

    /// Fetches every file `load` reads (see `locate`), returning their paths.
    pub fn locate(src: &dyn FileSource, stage_c: Option<&dyn FileSource>) -> Result<Vec<std::path::PathBuf>> {
        locate(
            src,
            &[("text_encoder", "model"), ("prior", "diffusion_pytorch_model")],
            stage_c,
        )
    }

    /// The embedding's (h, w) for an image of (height, width): `ceil(size / resolution_multiple)`.
    pub fn latent_size(&self, height: usize, width: usize) -> (usize, usize) {
        let m = self.config.resolution_multiple;
        ((height as f64 / m).ceil() as usize, (width as f64 / m).ceil() as usize)
    }

    /// Image embeddings (N, c_in, h, w) in f32, denormalised (`latents * latent_mean - latent_std`).
    pub fn run(&self, p: &PriorParams, noise: &mut dyn NoiseSource, progress: &mut dyn Progress) -> Result<Tensor> {
        let rt = &self.runtime;
        let guidance = (p.guidance > 1.0).then_some(p.guidance);
        let text = self
            .text_encoder
            .conditioning(&p.prompt, &p.negative_prompt, p.num_images, guidance.is_some())?;
        let cond = self.prior.condition(&text)?;
        let (h, w) = self.latent_size(p.height, p.width);
        let latents = sample(
            &[p.num_images, self.prior_config.c_in, h, w],
            &p.timesteps,
            guidance,
            &self.scheduler,
            rt,
            noise,
            progress,
            "prior",
            |x, r| Ok(self.prior.forward(x, r, &cond)?),
        )?;
        Ok(latents.affine(self.config.latent_mean, -self.config.latent_std)?)
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
        let pipeline: DecoderPipelineConfig = read_json(src, "model_index.json", "model_index.json")?;
        pipeline.validate()?;
        let decoder: DecoderConfig = Component::new(src, "decoder").config("config.json")?;
        decoder.validate()?;
        let vqgan: VqganConfig = Component::new(src, "vqgan").config("config.json")?;
        vqgan.validate()?;
        let scheduler: SchedulerConfig = Component::new(src, "scheduler").config("scheduler_config.json")?;
        scheduler.validate()?;
        let text_encoder = TextEncoder::read_config(src)?;
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

    /// Fetches every file `load` reads (see `locate`), returning their paths.
    pub fn locate(src: &dyn FileSource) -> Result<Vec<std::path::PathBuf>> {
        let parts = [
            ("text_encoder", "model"),
            ("decoder", "diffusion_pytorch_model"),
            ("vqgan", "diffusion_pytorch_model"),
        ];
        locate(src, &parts, None)
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
        let rt = &self.runtime;
        let embeddings = embeddings.to_device(&rt.device)?.to_dtype(rt.dtype)?;
        let (n, _, h, w) = embeddings.dims4()?;
        let guidance = (p.guidance > 1.0).then_some(p.guidance);
        let text = self
            .text_encoder
            .conditioning(&p.prompt, &p.negative_prompt, n, guidance.is_some())?;
        // the unconditional half sees zeros instead of the image embeddings
        let effnet = match guidance {
            Some(_) => Tensor::cat(&[&embeddings, &embeddings.zeros_like()?], 0)?,
            None => embeddings,
        };
        let size = self.latent_size(h, w);
        let cond = self.decoder.condition(&effnet, &text, size)?;
        let latents = sample(
            &[n, self.decoder_config.c_in, size.0, size.1],
            &p.timesteps,
            guidance,
            &self.scheduler,
            rt,
            noise,
            progress,
            "decoder",
            |x, r| Ok(self.decoder.forward(x, r, &cond)?),
        )?;
        progress.start("vqgan", 1);
        let images = self
            .vqgan
            .decode(&(latents * self.vqgan.scale_factor())?.to_dtype(rt.dtype)?)?
            .to_dtype(DType::F32)?
            .clamp(0f32, 1f32)?;
        progress.step();
        progress.finish();
        Ok(images)
    }
}

/// diffusers' decoder latent size for an embedding of (h, w): `int(size * latent_dim_scale)`.
fn scale_latent((h, w): (usize, usize), latent_dim_scale: f64) -> (usize, usize) {
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
