//! Stable Cascade (Würstchen v3): the prior and decoder pipelines of diffusers 0.42.1
//! (`StableCascadePriorPipeline`, `StableCascadeDecoderPipeline`, and the way
//! `StableCascadeCombinedPipeline` chains them), on the same scheduler, sampling loop, noise
//! streams and VQGAN as Würstchen v2 (`pipeline.rs`). Both networks are `StableCascadeUNet`s.
//!
//! What differs from v2:
//! - the text encoder is a `CLIPTextModelWithProjection`: the prior takes the last layer's
//!   states before the final norm (`hidden_states[-1]`) and the projected pooled state; the
//!   decoder only the pooled state;
//! - the prior also takes CLIP image embeddings (zeros without an image prompt) and returns
//!   its latents as they are (no `latent_mean`/`latent_std`);
//! - chained as `generate` runs them, the decoder is conditioned on the *prior's* pooled
//!   text states; run alone (`decode`), on its own text encoder's.
//!
//! `model_index.json` has the same `resolution_multiple` and `latent_dim_scale` as v2's.

use anyhow::Result;
use std::path::PathBuf;

use candle_core::{DType, Tensor};

use crate::config::{
    read_json, CascadeUNetConfig, ClipTextConfig, ClipVisionConfig, DecoderPipelineConfig, PriorPipelineConfig,
    SchedulerConfig, VqganConfig,
};
use crate::hub::FileSource;
use crate::image_processor::{ClipImageProcessor, ClipImageProcessorConfig};
use crate::models::cascade::{CascadeInputs, StableCascadeUNet};
use crate::models::clip::ClipVisionModel;
use crate::models::PaellaVqDecoder;
use crate::pipeline::{
    by_halves, decode_images, leader, locate, prior_latent_size, read_stage_files, sample, scale_latent, single,
    split_finite, BatchNoise, Component, DecoderParams, PriorParams, Runtime, TextEncoder,
};
use crate::progress::Progress;
use crate::rng::NoiseSource;
use crate::scheduler::DdpmWuerstchen;

/// `StableCascadeCombinedPipeline`'s default prior schedule (`generate`): 60 equal steps.
/// Guidance and the decoder's defaults there equal v2's.
pub const DEFAULT_PRIOR_STEPS: usize = 60;

/// `StableCascadePriorPipeline`'s default (`prior`): 20 equal steps.
pub const DEFAULT_SEPARATE_PRIOR_STEPS: usize = 20;

/// `StableCascadeDecoderPipeline`'s default (`decode`): 10 equal steps.
pub const DEFAULT_SEPARATE_DECODER_STEPS: usize = 10;

/// The model families a pipeline folder may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Family {
    /// `WuerstchenPriorPipeline` / `WuerstchenDecoderPipeline` (and folders without a class)
    #[default]
    WuerstchenV2,
    /// `StableCascadePriorPipeline` / `StableCascadeDecoderPipeline`
    StableCascade,
}

impl Family {
    /// The family of the pipeline in `src`, from `model_index.json`'s `_class_name`.
    pub fn of(src: &dyn FileSource) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(rename = "_class_name", default)]
            class_name: String,
        }
        let index: Index = read_json(src, "model_index.json", "model_index.json")?;
        Ok(if index.class_name.starts_with("StableCascade") {
            Self::StableCascade
        } else {
            Self::WuerstchenV2
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::WuerstchenV2 => "Würstchen v2",
            Self::StableCascade => "Stable Cascade",
        }
    }
}

/// The pooled text states a request's images are conditioned on: (n, 1, projection_dim) for
/// its `n` images, and the negative prompt's when it was computed (with guidance).
#[derive(Debug, Clone)]
pub struct PooledText {
    pub prompt: Tensor,
    pub negative: Option<Tensor>,
}

/// The text conditioning of a batch in diffusers' layout: each request's rows repeated for
/// its images, then (with guidance) each negative prompt's likewise.
struct TextConditioning {
    /// `hidden_states[-1]`, (rows, 77, hidden)
    states: Tensor,
    /// `text_embeds.unsqueeze(1)`, (rows, 1, projection_dim)
    pooled: Tensor,
}

fn text_conditioning(text: &TextEncoder, requests: &[(&str, &str, usize)], guidance: bool) -> Result<TextConditioning> {
    let mut prompts: Vec<&str> = requests.iter().map(|r| r.0).collect();
    let mut counts: Vec<usize> = requests.iter().map(|r| r.2).collect();
    if guidance {
        prompts.extend(requests.iter().map(|r| r.1));
        counts.extend_from_within(..);
    }
    let out = text.encode_with_projection(&prompts)?;
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let mut reps = vec![1; t.rank()];
        let mut parts = Vec::with_capacity(counts.len());
        for (i, &n) in counts.iter().enumerate() {
            reps[0] = n;
            parts.push(t.narrow(0, i, 1)?.repeat(reps.as_slice())?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    };
    Ok(TextConditioning {
        states: repeat(&out.hidden_states)?,
        pooled: repeat(&out.text_embeds.unsqueeze(1)?)?,
    })
}

/// The prior network's folder: `prior`, or `prior_lite` for the lite network.
fn prior_folder(lite: bool) -> &'static str {
    if lite {
        "prior_lite"
    } else {
        "prior"
    }
}

/// The decoder network's folder: `decoder`, or `decoder_lite` for the lite network.
fn decoder_folder(lite: bool) -> &'static str {
    if lite {
        "decoder_lite"
    } else {
        "decoder"
    }
}

/// The prior stage's configuration files, parsed and validated once.
#[derive(Debug, Clone)]
pub struct CascadePriorConfigs {
    pub pipeline: PriorPipelineConfig,
    /// the network's folder: `prior`, or `prior_lite` for the lite network
    pub prior_folder: &'static str,
    pub prior: CascadeUNetConfig,
    pub scheduler: SchedulerConfig,
    pub text_encoder: ClipTextConfig,
}

impl CascadePriorConfigs {
    /// Reads a `stabilityai/stable-cascade-prior`-layout source's configs, with the lite
    /// network (`prior_lite/`) where `lite`.
    pub fn read(src: &dyn FileSource, lite: bool) -> Result<Self> {
        let (pipeline, scheduler, text_encoder) = read_stage_files(src, PriorPipelineConfig::validate)?;
        let prior_folder = prior_folder(lite);
        let prior: CascadeUNetConfig = Component::new(src, prior_folder).config("config.json")?;
        prior.validate(prior_folder)?;
        anyhow::ensure!(
            prior.clip_text_in_channels.is_some() && prior.clip_image_in_channels.is_some(),
            crate::error::ModelError::BadConfig {
                component: "prior".into(),
                message: "a Stable Cascade prior maps text and image embeddings: clip_text_in_channels and \
                          clip_image_in_channels must be set"
                    .into(),
            }
        );
        Ok(Self {
            pipeline,
            prior_folder,
            prior,
            scheduler,
            text_encoder,
        })
    }
}

/// An image prompt, decoded: RGB8 pixels, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptImage {
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
}

/// The prior pipeline's image encoder with its preprocessing (`image_encoder/`,
/// `feature_extractor/`): image prompts -> what the prior's `clip_img` input takes, as
/// `StableCascadePriorPipeline.encode_image` computes it.
pub struct ImageEncoder {
    processor: ClipImageProcessor,
    model: ClipVisionModel,
    runtime: Runtime,
}

impl ImageEncoder {
    /// Whether `src` has an image encoder (its config) to load.
    pub fn present(src: &dyn FileSource) -> Result<bool> {
        Ok(src.get("image_encoder/config.json")?.is_some())
    }

    pub fn load(src: &dyn FileSource, rt: &Runtime) -> Result<Self> {
        let component = Component::new(src, "image_encoder");
        let config: ClipVisionConfig = component.config("config.json")?;
        config.validate("image_encoder")?;
        let processor: ClipImageProcessorConfig =
            Component::new(src, "feature_extractor").config("preprocessor_config.json")?;
        let processor = processor.validate()?;
        let model = ClipVisionModel::new(&config, component.weights("model", rt)?)?;
        Ok(Self {
            processor,
            model,
            runtime: rt.clone(),
        })
    }

    /// Each image through the processor and the encoder: `image_embeds` side by side,
    /// (1, images, projection_dim) in the compute dtype.
    pub fn encode(&self, images: &[PromptImage]) -> Result<Tensor> {
        let rt = &self.runtime;
        let mut embeds = Vec::with_capacity(images.len());
        for image in images {
            let (values, h, w) = self.processor.pixel_values(&image.rgb, image.width, image.height)?;
            let pixels = Tensor::from_vec(values, (1, 3, h, w), &rt.device)?.to_dtype(rt.dtype)?;
            embeds.push(self.model.forward(&pixels)?);
        }
        Ok(Tensor::stack(&embeds, 1)?.squeeze(2)?)
    }
}

/// Stage C: text -> image embeddings.
pub struct CascadePriorPipeline {
    pub text_encoder: TextEncoder,
    pub prior: StableCascadeUNet,
    pub configs: CascadePriorConfigs,
    pub scheduler: DdpmWuerstchen,
    pub runtime: Runtime,
    /// the image prompts' embeddings every request is conditioned on, (1, images, channels);
    /// `None`: diffusers' zeros
    image_prompts: Option<Tensor>,
}

/// A request's image embeddings and the pooled text states they were made with.
#[derive(Debug, Clone)]
pub struct CascadeEmbeddings {
    /// (n, c, h, w) in f32
    pub embeddings: Tensor,
    pub pooled: PooledText,
}

impl CascadePriorPipeline {
    pub fn load(src: &dyn FileSource, rt: &Runtime) -> Result<Self> {
        Self::load_with(&CascadePriorConfigs::read(src, false)?, src, rt)
    }

    pub fn load_with(configs: &CascadePriorConfigs, src: &dyn FileSource, rt: &Runtime) -> Result<Self> {
        let text_encoder = TextEncoder::load(src, &configs.text_encoder, rt)?;
        let weights = Component::new(src, configs.prior_folder).weights("diffusion_pytorch_model", rt)?;
        Ok(Self {
            text_encoder,
            prior: StableCascadeUNet::new(&configs.prior, weights)?,
            scheduler: DdpmWuerstchen::new(&configs.scheduler),
            configs: configs.clone(),
            runtime: rt.clone(),
            image_prompts: None,
        })
    }

    /// Conditions every request on image prompts: `embeds` from [`ImageEncoder::encode`].
    pub fn set_image_prompts(&mut self, embeds: Tensor) -> Result<()> {
        let channels = self.configs.prior.clip_image_in_channels.unwrap_or(0);
        let (one, _, c) = embeds.dims3()?;
        anyhow::ensure!(
            one == 1 && c == channels,
            "the image encoder gives {c} channels, the prior takes {channels} (is it this prior's image encoder?)"
        );
        self.image_prompts = Some(embeds.to_dtype(self.runtime.dtype)?);
        Ok(())
    }

    /// Fetches every file `load` reads in `dtype` (the `bf16` files the repos publish for a
    /// bf16 run), returning their paths.
    pub fn locate(src: &dyn FileSource, lite: bool, dtype: DType) -> Result<Vec<PathBuf>> {
        let parts = [
            ("text_encoder", "model"),
            (prior_folder(lite), "diffusion_pytorch_model"),
        ];
        locate(src, &parts, None, dtype)
    }

    /// The embedding's (h, w) for an image of (height, width), as v2's prior sizes it.
    pub fn latent_size(&self, height: usize, width: usize) -> (usize, usize) {
        prior_latent_size(self.configs.pipeline.resolution_multiple, height, width)
    }

    pub fn run(
        &self,
        p: &PriorParams,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn Progress,
    ) -> Result<CascadeEmbeddings> {
        let noise = BatchNoise::new(vec![(noise, p.num_images)]);
        single(self.run_batch(std::slice::from_ref(p), noise, progress)?)
    }

    /// [`CascadePriorPipeline::run`] for requests that share one pass per step.
    pub fn run_batch(
        &self,
        batch: &[PriorParams],
        mut noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<CascadeEmbeddings>>> {
        let rt = &self.runtime;
        let p = leader(batch, PriorParams::shares_pass)?;
        let guidance = (p.guidance > 1.0).then_some(p.guidance);
        let requests: Vec<_> = batch
            .iter()
            .map(|p| (p.prompt.as_str(), p.negative_prompt.as_str(), p.num_images))
            .collect();
        let text = text_conditioning(&self.text_encoder, &requests, guidance.is_some())?;
        let rows = text.states.dim(0)?;
        // `encode_image`: the image prompts for every conditional row, zeros for the
        // unconditional half; without image prompts zeros throughout
        let image_embeds = match &self.image_prompts {
            Some(embeds) => {
                let prompted = rows / if guidance.is_some() { 2 } else { 1 };
                let embeds = embeds.repeat((prompted, 1, 1))?;
                match guidance {
                    Some(_) => Tensor::cat(&[&embeds, &embeds.zeros_like()?], 0)?,
                    None => embeds,
                }
            }
            None => {
                let image_channels = self.configs.prior.clip_image_in_channels.unwrap_or(0);
                Tensor::zeros((rows, 1, image_channels), rt.dtype, &rt.device)?
            }
        };
        let (h, w) = self.latent_size(p.height, p.width);
        let cond = self.prior.condition(
            &CascadeInputs {
                clip_text_pooled: Some(&text.pooled.to_dtype(rt.dtype)?),
                clip_text: Some(&text.states.to_dtype(rt.dtype)?),
                clip_img: Some(&image_embeds),
                effnet: None,
            },
            (h, w),
        )?;
        let latents = sample(
            &[self.configs.prior.in_channels, h, w],
            &p.timesteps,
            guidance,
            &self.scheduler,
            rt,
            &mut noise,
            progress,
            "prior",
            |x, r| by_halves(x, r, &cond, |x, r, cond| self.prior.forward(x, r, cond)),
        )?;
        let counts = noise.counts();
        // the negative prompts' rows follow all the prompts' rows
        let negatives_start: usize = counts.iter().sum();
        let mut start = 0;
        let mut out = Vec::with_capacity(counts.len());
        for (result, &n) in split_finite(&latents, &counts, "prior")?.into_iter().zip(&counts) {
            let negative = guidance
                .is_some()
                .then(|| text.pooled.narrow(0, negatives_start + start, n))
                .transpose()?;
            let pooled = PooledText {
                prompt: text.pooled.narrow(0, start, n)?,
                negative,
            };
            out.push(result.map(|embeddings| CascadeEmbeddings { embeddings, pooled }));
            start += n;
        }
        Ok(out)
    }
}

/// The decoder stage's configuration files, parsed and validated once.
#[derive(Debug, Clone)]
pub struct CascadeDecoderConfigs {
    pub pipeline: DecoderPipelineConfig,
    /// the network's folder: `decoder`, or `decoder_lite` for the lite network
    pub decoder_folder: &'static str,
    pub decoder: CascadeUNetConfig,
    pub vqgan: VqganConfig,
    pub scheduler: SchedulerConfig,
    pub text_encoder: ClipTextConfig,
}

impl CascadeDecoderConfigs {
    /// Reads a `stabilityai/stable-cascade`-layout source's configs, with the lite network
    /// (`decoder_lite/`) where `lite`.
    pub fn read(src: &dyn FileSource, lite: bool) -> Result<Self> {
        let (pipeline, scheduler, text_encoder) = read_stage_files(src, DecoderPipelineConfig::validate)?;
        let decoder_folder = decoder_folder(lite);
        let decoder: CascadeUNetConfig = Component::new(src, decoder_folder).config("config.json")?;
        decoder.validate(decoder_folder)?;
        let vqgan: VqganConfig = Component::new(src, "vqgan").config("config.json")?;
        vqgan.validate()?;
        Ok(Self {
            pipeline,
            decoder_folder,
            decoder,
            vqgan,
            scheduler,
            text_encoder,
        })
    }
}

impl CascadeDecoderConfigs {
    /// For embeddings of (c, h, w): the (width, height) of the images they decode to, or an
    /// input error when this decoder cannot take them.
    pub fn image_size(&self, (c, h, w): (usize, usize, usize)) -> Result<(usize, usize)> {
        let (lh, lw) = scale_latent((h, w), self.pipeline.latent_dim_scale);
        let p = self.decoder.patch_size;
        let takes = self.decoder.effnet_in_channels;
        if takes != Some(c) || lh == 0 || lw == 0 || lh % p != 0 || lw % p != 0 {
            return Err(crate::error::InputError::new(format!(
                "embeddings of {c}x{h}x{w} give a decoder latent of {lh}x{lw}; this decoder takes {} channels \
                 and sides that divide by {p} (were they made for another model?)",
                takes.unwrap_or(0)
            ))
            .into());
        }
        let up = self.vqgan.upscale();
        Ok((lw * up, lh * up))
    }
}

/// Which image sizes a Stable Cascade pair produces: v2's rule (`SizeRule`), where the
/// decoder's latent need only divide by its patch size (its strided convs drop an odd row
/// and its up path resizes to the skip's size).
pub fn size_rule(prior: &CascadePriorConfigs, decoder: &CascadeDecoderConfigs) -> crate::pipeline::SizeRule {
    crate::pipeline::SizeRule {
        resolution_multiple: prior.pipeline.resolution_multiple,
        latent_dim_scale: decoder.pipeline.latent_dim_scale,
        decoder_downscale: decoder.decoder.patch_size,
        vqgan_upscale: decoder.vqgan.upscale(),
    }
}

/// Stage B + Stage A: image embeddings (+ pooled text) -> images.
pub struct CascadeDecoderPipeline {
    pub text_encoder: TextEncoder,
    pub decoder: StableCascadeUNet,
    pub vqgan: PaellaVqDecoder,
    pub configs: CascadeDecoderConfigs,
    pub scheduler: DdpmWuerstchen,
    pub runtime: Runtime,
}

impl CascadeDecoderPipeline {
    pub fn load(src: &dyn FileSource, rt: &Runtime) -> Result<Self> {
        Self::load_with(&CascadeDecoderConfigs::read(src, false)?, src, rt)
    }

    pub fn load_with(configs: &CascadeDecoderConfigs, src: &dyn FileSource, rt: &Runtime) -> Result<Self> {
        let text_encoder = TextEncoder::load(src, &configs.text_encoder, rt)?;
        let decoder_weights = Component::new(src, configs.decoder_folder).weights("diffusion_pytorch_model", rt)?;
        let vqgan_weights = Component::new(src, "vqgan").weights("diffusion_pytorch_model", rt)?;
        Ok(Self {
            text_encoder,
            decoder: StableCascadeUNet::new(&configs.decoder, decoder_weights)?,
            vqgan: PaellaVqDecoder::new(&configs.vqgan, vqgan_weights)?,
            scheduler: DdpmWuerstchen::new(&configs.scheduler),
            configs: configs.clone(),
            runtime: rt.clone(),
        })
    }

    /// Fetches every file `load` reads in `dtype`, returning their paths.
    pub fn locate(src: &dyn FileSource, lite: bool, dtype: DType) -> Result<Vec<PathBuf>> {
        let parts = [
            ("text_encoder", "model"),
            (decoder_folder(lite), "diffusion_pytorch_model"),
            ("vqgan", "diffusion_pytorch_model"),
        ];
        locate(src, &parts, None, dtype)
    }

    /// The decoder latent's (H, W) for an embedding of (h, w): `int(size * latent_dim_scale)`.
    pub fn latent_size(&self, h: usize, w: usize) -> (usize, usize) {
        scale_latent((h, w), self.configs.pipeline.latent_dim_scale)
    }

    /// Images (N, 3, H, W) in [0, 1], f32. `pooled`: the text states to condition on (the
    /// prior's, as `StableCascadeCombinedPipeline` passes them); `None`: this pipeline's own
    /// text encoder's, as `StableCascadeDecoderPipeline` alone computes them.
    pub fn run(
        &self,
        embeddings: &Tensor,
        pooled: Option<&PooledText>,
        p: &DecoderParams,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let noise = BatchNoise::new(vec![(noise, embeddings.dim(0)?)]);
        let pooled = pooled.map(std::slice::from_ref);
        single(self.run_batch(
            std::slice::from_ref(embeddings),
            pooled,
            std::slice::from_ref(p),
            noise,
            progress,
        )?)
    }

    /// [`CascadeDecoderPipeline::run`] for requests that share one pass per step.
    pub fn run_batch(
        &self,
        embeddings: &[Tensor],
        pooled: Option<&[PooledText]>,
        batch: &[DecoderParams],
        mut noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Tensor>>> {
        let rt = &self.runtime;
        let p = leader(batch, DecoderParams::shares_pass)?;
        anyhow::ensure!(
            embeddings.len() == batch.len() && pooled.is_none_or(|t| t.len() == batch.len()),
            "a batch needs one set of embeddings (and pooled text) per request"
        );
        let counts = noise.counts();
        let embeddings = Tensor::cat(embeddings, 0)?.to_device(&rt.device)?.to_dtype(rt.dtype)?;
        let (n, _, h, w) = embeddings.dims4()?;
        anyhow::ensure!(
            counts.iter().sum::<usize>() == n,
            "the noise streams do not cover the batch"
        );
        let guidance = (p.guidance > 1.0).then_some(p.guidance);
        let pooled = match pooled {
            Some(given) => {
                let mut rows: Vec<Tensor> = given.iter().map(|t| t.prompt.clone()).collect();
                if guidance.is_some() {
                    for (t, r) in given.iter().zip(batch) {
                        // diffusers would fail here (the prior ran without guidance, so it has
                        // no negative states); the prior's text encoder is not at hand, so this
                        // decoder's encodes the negative prompt
                        rows.push(match &t.negative {
                            Some(negative) => negative.clone(),
                            None => {
                                let rows = t.prompt.dim(0)?;
                                let text =
                                    text_conditioning(&self.text_encoder, &[(&r.negative_prompt, "", rows)], false)?;
                                text.pooled
                            }
                        });
                    }
                }
                Tensor::cat(&rows, 0)?
            }
            None => {
                let requests: Vec<_> = batch
                    .iter()
                    .zip(&counts)
                    .map(|(p, &n)| (p.prompt.as_str(), p.negative_prompt.as_str(), n))
                    .collect();
                text_conditioning(&self.text_encoder, &requests, guidance.is_some())?.pooled
            }
        };
        // the unconditional half sees zeros instead of the image embeddings
        let effnet = match guidance {
            Some(_) => Tensor::cat(&[&embeddings, &embeddings.zeros_like()?], 0)?,
            None => embeddings,
        };
        let size = self.latent_size(h, w);
        let cond = self.decoder.condition(
            &CascadeInputs {
                clip_text_pooled: Some(&pooled.to_device(&rt.device)?.to_dtype(rt.dtype)?),
                effnet: Some(&effnet),
                ..Default::default()
            },
            size,
        )?;
        let latents = sample(
            &[self.configs.decoder.in_channels, size.0, size.1],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::LocalDir;
    use crate::progress::Silent;
    use crate::rng::TorchCpuGenerator;
    use crate::scheduler::linear_timesteps;
    use candle_core::{DType, Device};
    use std::collections::HashMap;
    use std::path::PathBuf;

    /// tests/fixtures/cascade-tiny: a random Stable Cascade pair and diffusers' outputs
    /// (tests/fixtures/make_cascade_fixtures.py).
    fn fixture() -> (PathBuf, HashMap<String, Tensor>, serde_json::Value) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cascade-tiny");
        let t = candle_core::safetensors::load(root.join("reference.safetensors"), &Device::Cpu).expect("reference");
        let json = std::fs::read_to_string(root.join("reference.json")).expect("reference.json");
        (root.clone(), t, serde_json::from_str(&json).expect("reference.json"))
    }

    fn cpu() -> Runtime {
        Runtime {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let num = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (num / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
    }

    #[test]
    fn text_encoders_with_projection_match_transformers() {
        let (root, t, meta) = fixture();
        let prompts: Vec<&str> = meta["te_prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        for part in ["prior", "decoder"] {
            let src = LocalDir::new(root.join(part));
            let cfg = TextEncoder::read_config(&src).unwrap();
            let out = TextEncoder::load(&src, &cfg, &cpu())
                .unwrap()
                .encode_with_projection(&prompts)
                .unwrap();
            let states = rel_err(&out.hidden_states, &t[&format!("{part}.te.hidden_states")]);
            let pooled = rel_err(&out.text_embeds, &t[&format!("{part}.te.text_embeds")]);
            assert!(
                states <= 1e-5 && pooled <= 1e-5,
                "{part}: hidden states {states}, text_embeds {pooled}"
            );
        }
    }

    fn prompt_image(root: &std::path::Path, file: &str) -> PromptImage {
        let (rgb, width, height) = crate::image_processor::read_rgb8(&root.join(file)).unwrap();
        PromptImage { rgb, width, height }
    }

    /// The processor's pixel values and the encoder's `image_embeds` for each prompt image.
    #[test]
    fn image_encoder_matches_transformers() {
        let (root, t, meta) = fixture();
        let encoder = ImageEncoder::load(&LocalDir::new(root.join("prior")), &cpu()).unwrap();
        let files = meta["combined"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["images"].as_array())
            .flatten();
        let mut seen = 0;
        for file in files.map(|f| f.as_str().unwrap()) {
            let image = prompt_image(&root, file);
            let (values, h, w) = encoder
                .processor
                .pixel_values(&image.rgb, image.width, image.height)
                .unwrap();
            let pixels = Tensor::from_vec(values, (1, 3, h, w), &Device::Cpu).unwrap();
            let err = max_abs(&pixels, &t[&format!("{file}.pixel_values")]);
            assert!(err <= 1e-6, "{file}: pixel values differ by {err}");
            let embeds = encoder.model.forward(&t[&format!("{file}.pixel_values")]).unwrap();
            let err = rel_err(&embeds, &t[&format!("{file}.image_embeds")]);
            assert!(err <= 1e-5, "{file}: image_embeds relative error {err}");
            let both = encoder.encode(&[image.clone(), image]).unwrap();
            assert_eq!(both.dims(), &[1, 2, embeds.dim(1).unwrap()]);
            seen += 1;
        }
        assert!(seen >= 2, "the fixture's image run names its images");
    }

    /// StableCascadeCombinedPipeline: the prior, then the decoder on the prior's pooled text
    /// states, one seeded generator for both; with image prompts where the run has them.
    #[test]
    fn combined_runs_match_diffusers_with_the_same_seed() {
        let (root, t, meta) = fixture();
        let src = LocalDir::new(root.join("prior"));
        let decoder = CascadeDecoderPipeline::load(&LocalDir::new(root.join("decoder")), &cpu()).unwrap();
        for run in meta["combined"].as_array().unwrap() {
            let mut prior = CascadePriorPipeline::load(&src, &cpu()).unwrap();
            if let Some(files) = run["images"].as_array() {
                let images: Vec<_> = files.iter().map(|f| prompt_image(&root, f.as_str().unwrap())).collect();
                let encoder = ImageEncoder::load(&src, &cpu()).unwrap();
                prior.set_image_prompts(encoder.encode(&images).unwrap()).unwrap();
            }
            let name = run["name"].as_str().unwrap();
            let text = |k: &str| run[k].as_str().unwrap_or_default().to_string();
            let number = |k: &str| run[k].as_f64().unwrap();
            let mut noise = TorchCpuGenerator::new(run["seed"].as_u64().unwrap());
            let params = PriorParams {
                prompt: text("prompt"),
                negative_prompt: text("negative_prompt"),
                width: number("width") as usize,
                height: number("height") as usize,
                timesteps: linear_timesteps(number("prior_steps") as usize),
                guidance: number("prior_guidance"),
                num_images: number("num_images") as usize,
            };
            let out = prior.run(&params, &mut noise, &mut Silent).unwrap();
            let err = max_abs(&out.embeddings, &t[&format!("{name}.embeddings")]);
            assert!(err <= 1e-3, "{name}: embeddings differ by {err}");
            let params = DecoderParams {
                prompt: text("prompt"),
                negative_prompt: text("negative_prompt"),
                timesteps: linear_timesteps(number("decoder_steps") as usize),
                guidance: number("decoder_guidance"),
            };
            let images = decoder
                .run(&out.embeddings, Some(&out.pooled), &params, &mut noise, &mut Silent)
                .unwrap();
            let err = max_abs(&images, &t[&format!("{name}.images")]);
            assert!(err <= 1e-3, "{name}: images differ by {err}");
        }
    }

    /// StableCascadeDecoderPipeline alone: its own text encoder, guidance with a negative prompt.
    #[test]
    fn decoder_alone_matches_diffusers_with_the_same_seed() {
        let (root, t, meta) = fixture();
        let run = &meta["decoder"];
        let decoder = CascadeDecoderPipeline::load(&LocalDir::new(root.join("decoder")), &cpu()).unwrap();
        let mut noise = TorchCpuGenerator::new(run["seed"].as_u64().unwrap());
        // the fixture drew the embeddings from the same generator first
        let embeddings = &t["d1.embeddings"];
        let drawn = noise.standard_normal(embeddings.dims()).unwrap();
        let drawn = Tensor::from_vec(drawn, embeddings.dims(), &Device::Cpu).unwrap();
        assert_eq!(max_abs(&drawn, embeddings), 0.0);
        let params = DecoderParams {
            prompt: run["prompt"].as_str().unwrap().into(),
            negative_prompt: run["negative_prompt"].as_str().unwrap().into(),
            timesteps: linear_timesteps(run["steps"].as_u64().unwrap() as usize),
            guidance: run["guidance"].as_f64().unwrap(),
        };
        let images = decoder.run(embeddings, None, &params, &mut noise, &mut Silent).unwrap();
        let err = max_abs(&images, &t["d1.images"]);
        assert!(err <= 1e-3, "images differ by {err}");
    }
}
