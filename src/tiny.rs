//! `wuerstchen tiny-model`: a random-weight Würstchen v2 pipeline of a few MB, in the Hub's
//! diffusers layout, for smoke-testing scripts without downloading 12 GB.
//!
//! ```text
//! DIR/prior/    like warp-ai/wuerstchen-prior: model_index.json, prior/, text_encoder/,
//!               tokenizer/, scheduler/, README.md
//! DIR/decoder/  like warp-ai/wuerstchen: the same plus decoder/ and vqgan/ (README.md names
//!               ../prior as its prior, as the Hub's model card does)
//! ```
//!
//! The network is the `tiny-a` architecture of `tests/fixtures/make_fixtures.py` (the real
//! topology, every width tiny). Configs are the crate's own serde structs plus the metadata keys
//! diffusers 0.42.1 / transformers 5.24 write, so the folders load in Python too. The weight
//! names and shapes are not listed here: each model is built by its own constructor over a
//! `VarMap`, which records every tensor the loader asks for (the VQGAN's encoder half, which
//! our loader never reads but diffusers' `PaellaVQModel` has, is requested the same way).
//! The values follow `randomize_` in make_fixtures.py with torch-compatible noise: one
//! generator per module (`seed + 1` .. `seed + 5`), tensors in sorted name order, so the same
//! seed gives byte-identical files. The text encoders are stored in float16, the rest in f32.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cascade::Family;
use crate::config::{
    Activation, ClipTextConfig, ClipVisionConfig, DecoderConfig, DecoderPipelineConfig, PriorConfig,
    PriorPipelineConfig, SchedulerConfig, VqganConfig,
};
use crate::config::{CascadeBlock, CascadeUNetConfig, PerLevel};
use crate::error::InputError;
use crate::models::cascade::StableCascadeUNet;
use crate::models::clip::ClipVisionModel;
use crate::models::{ClipTextModel, PaellaVqDecoder, WuerstchenDiffNeXt, WuerstchenPrior};
use crate::rng::TorchCpuGenerator;

/// The CLIP BPE merges (openai/CLIP's `bpe_simple_vocab_16e6.txt`, as `merges.txt`: a
/// `#version` line, then one `a b` pair per line, 48 894 of them).
pub const CLIP_MERGES_TXT: &str = include_str!("../assets/clip/merges.txt");

/// The versions whose file formats the written folders follow.
const DIFFUSERS_VERSION: &str = "0.42.1";
const TRANSFORMERS_VERSION: &str = "5.24.0";

/// CLIP's vocabulary: 256 byte symbols, the same with `</w>`, one token per merge, and the
/// two special tokens.
const CLIP_VOCAB_SIZE: usize = 49408;
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// Which generator (`seed + offset`) fills which module, as in make_fixtures.py.
const PRIOR_SEED: u64 = 1;
const PRIOR_TEXT_ENCODER_SEED: u64 = 2;
const DECODER_SEED: u64 = 3;
const DECODER_TEXT_ENCODER_SEED: u64 = 4;
const VQGAN_SEED: u64 = 5;
const IMAGE_ENCODER_SEED: u64 = 6;

/// Which architecture to write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ModelSize {
    /// make_fixtures.py's tiny-a: ~6 MB, for smoke tests
    #[default]
    Tiny,
    /// ~110 M parameters (~440 MB): CPU benchmarks that exercise real layer widths
    Mid,
    /// the published models' configs (3.1 B parameters, ~12.5 GB of f32): GPU benchmarks and
    /// cold-start measurements without downloading
    Real,
}

impl std::str::FromStr for ModelSize {
    type Err = InputError;
    fn from_str(s: &str) -> std::result::Result<Self, InputError> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "mid" => Ok(Self::Mid),
            "real" => Ok(Self::Real),
            _ => Err(InputError::new(format!("unknown size {s:?}: use tiny, mid or real"))),
        }
    }
}

/// What to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TinyModelOptions {
    /// Würstchen v2 (`DIR/prior` like warp-ai/wuerstchen-prior) or Stable Cascade (like
    /// stabilityai/stable-cascade-prior and stabilityai/stable-cascade; tiny size only)
    pub family: Family,
    /// Seeds the weights; the same seed gives byte-identical files.
    pub seed: u64,
    /// Replace existing `DIR/prior` and `DIR/decoder` folders (otherwise a non-empty one is an
    /// error and nothing is written).
    pub overwrite: bool,
    pub size: ModelSize,
}

/// The two written pipeline folders: pass them as `--prior` and `--decoder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyModelPaths {
    /// `DIR/prior`, laid out like `warp-ai/wuerstchen-prior`.
    pub prior: PathBuf,
    /// `DIR/decoder`, laid out like `warp-ai/wuerstchen`.
    pub decoder: PathBuf,
}

/// Writes the tiny pipeline into `out/prior` and `out/decoder` (creating `out` if needed).
///
/// Both folders are assembled in a temporary folder inside `out` and renamed into place, so a
/// failure leaves no half-written pipeline. Without `opts.overwrite`, an existing non-empty
/// `out/prior` or `out/decoder` is an [`InputError`] naming it, checked before any work.
pub fn write_tiny_model(out: &Path, opts: &TinyModelOptions) -> Result<TinyModelPaths> {
    let paths = TinyModelPaths {
        prior: out.join("prior"),
        decoder: out.join("decoder"),
    };
    for target in [&paths.prior, &paths.decoder] {
        check_target(target, opts.overwrite)?;
    }
    let (prior_files, decoder_files) = match (opts.family, opts.size) {
        (Family::WuerstchenV2, size) => pipeline_files(opts.seed, size)?,
        (Family::StableCascade, ModelSize::Tiny) => cascade_pipeline_files(opts.seed, &cascade_tiny())?,
        (Family::StableCascade, ModelSize::Real) => cascade_pipeline_files(opts.seed, &cascade_lite())?,
        (Family::StableCascade, ModelSize::Mid) => {
            return Err(InputError::new("Stable Cascade models are written at --size tiny or real").into())
        }
    };

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".wuerstchen-tiny-")
        .tempdir_in(out)
        .with_context(|| format!("creating a temporary folder in {}", out.display()))?;
    let parts = [
        ("prior", &prior_files, &paths.prior),
        ("decoder", &decoder_files, &paths.decoder),
    ];
    for (name, files, _) in &parts {
        write_folder(&staging.path().join(name), files)?;
    }
    for (name, _, target) in &parts {
        // checked again: the folder may have appeared while the weights were being made
        check_target(target, opts.overwrite)?;
        remove_existing(target)?;
        std::fs::rename(staging.path().join(name), target)
            .with_context(|| format!("moving the new {name} pipeline to {}", target.display()))?;
    }
    tracing::debug!(
        seed = opts.seed,
        "wrote a tiny random Würstchen pipeline to {}",
        out.display()
    );
    Ok(paths)
}

/// `vocab.json` of CLIP's tokenizer (token -> id), built as openai/CLIP's `SimpleTokenizer`
/// builds it from the merges (`clip_vocab_and_merges` in make_fixtures.py).
pub fn clip_vocab_json() -> Result<String> {
    let vocab = clip_vocab()?;
    let mut s = String::with_capacity(vocab.len() * 20);
    s.push('{');
    for (id, token) in vocab.iter().enumerate() {
        if id > 0 {
            s.push_str(", ");
        }
        s.push_str(&serde_json::to_string(token)?);
        s.push_str(&format!(": {id}"));
    }
    s.push('}');
    Ok(s)
}

// ------------------------------------------------------------------------------------------
// The architecture
// ------------------------------------------------------------------------------------------

/// The configs of a whole model (both pipelines).
struct TinyArch {
    prior_pipeline: PriorPipelineConfig,
    decoder_pipeline: DecoderPipelineConfig,
    prior: PriorConfig,
    prior_text_encoder: ClipTextConfig,
    decoder: DecoderConfig,
    decoder_text_encoder: ClipTextConfig,
    vqgan: VqganConfig,
    /// `PaellaVQModel`'s codebook size (only its encoder half uses it, so no config field here).
    num_vq_embeddings: usize,
    prior_scheduler: SchedulerConfig,
    decoder_scheduler: SchedulerConfig,
    /// `dropout` of the prior and the decoder configs (inactive at inference).
    dropout: f64,
    /// `projection_dim` of the text encoders' configs (CLIPTextModel has no projection).
    projection_dim: usize,
    /// how the text encoders' weights are stored (f16 keeps the tiny model small; the Hub's are f32)
    text_encoder_dtype: Dtype,
}

fn arch(size: ModelSize) -> TinyArch {
    match size {
        ModelSize::Tiny => tiny_a(),
        ModelSize::Mid => mid(),
        ModelSize::Real => real(),
    }
}

fn clip_text(hidden_size: usize, intermediate_size: usize, num_hidden_layers: usize, heads: usize) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: CLIP_VOCAB_SIZE,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads: heads,
        max_position_embeddings: 77,
        hidden_act: Activation::Gelu,
        layer_norm_eps: 1e-5,
        // the legacy laion value the Hub's configs carry (only the pooled output uses it)
        eos_token_id: 2,
        ..ClipTextConfig::default()
    }
}

/// A mid-size model: every layer kind at widths in the hundreds.
fn mid() -> TinyArch {
    TinyArch {
        prior: PriorConfig {
            c_in: 16,
            c: 384,
            c_cond: 512,
            c_r: 64,
            depth: 8,
            nhead: 6,
        },
        prior_text_encoder: clip_text(512, 2048, 6, 8),
        decoder: DecoderConfig {
            c_cond: 256,
            c_hidden: vec![64, 128, 256, 256],
            nhead: vec![-1, 4, 8, 8],
            blocks: vec![2, 2, 4, 2],
            clip_embd: 384,
            ..DecoderConfig::default()
        },
        decoder_text_encoder: clip_text(384, 1536, 6, 6),
        vqgan: VqganConfig {
            bottleneck_blocks: 4,
            embed_dim: 96,
            ..VqganConfig::default()
        },
        num_vq_embeddings: 512,
        projection_dim: 512,
        text_encoder_dtype: Dtype::F32,
        ..tiny_a()
    }
}

/// The published models' shapes (for estimates and their tests): `real()`'s configs.
#[cfg(test)]
pub(crate) fn published_shapes() -> crate::memory::ModelShapes {
    let a = real();
    crate::memory::ModelShapes {
        prior_pipeline: a.prior_pipeline,
        prior: a.prior,
        prior_text: a.prior_text_encoder,
        decoder_pipeline: a.decoder_pipeline,
        decoder: a.decoder,
        decoder_text: a.decoder_text_encoder,
        vqgan: a.vqgan,
    }
}

/// The published models' configs (the Hub's `config.json` files of warp-ai/wuerstchen-prior and
/// warp-ai/wuerstchen, checked against diffusers' conversion script).
fn real() -> TinyArch {
    TinyArch {
        prior: PriorConfig {
            c_in: 16,
            c: 1536,
            c_cond: 1280,
            c_r: 64,
            depth: 32,
            nhead: 24,
        },
        prior_text_encoder: clip_text(1280, 5120, 32, 20),
        decoder: DecoderConfig::default(),
        decoder_text_encoder: clip_text(1024, 4096, 24, 16),
        vqgan: VqganConfig::default(),
        num_vq_embeddings: 8192,
        projection_dim: 1280,
        text_encoder_dtype: Dtype::F32,
        ..tiny_a()
    }
}

fn tiny_a() -> TinyArch {
    let text_encoder = |intermediate_size| ClipTextConfig {
        vocab_size: CLIP_VOCAB_SIZE,
        hidden_size: 8,
        intermediate_size,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 77,
        hidden_act: Activation::Gelu,
        layer_norm_eps: 1e-5,
        eos_token_id: 2,
        ..ClipTextConfig::default()
    };
    TinyArch {
        prior_pipeline: PriorPipelineConfig {
            latent_mean: 42.0,
            latent_std: 1.0,
            resolution_multiple: 42.67,
        },
        decoder_pipeline: DecoderPipelineConfig {
            latent_dim_scale: 10.67,
        },
        prior: PriorConfig {
            c_in: 16,
            c: 32,
            c_cond: 8,
            c_r: 64,
            depth: 2,
            nhead: 2,
        },
        prior_text_encoder: text_encoder(32),
        decoder: DecoderConfig {
            c_in: 4,
            c_out: 4,
            c_r: 64,
            patch_size: 2,
            c_cond: 32,
            c_hidden: vec![8, 16, 32, 32],
            nhead: vec![-1, 2, 2, 2],
            blocks: vec![1, 1, 2, 1],
            level_config: ["CT", "CTA", "CTA", "CTA"].map(crate::config::level).to_vec(),
            inject_effnet: vec![false, true, true, true],
            effnet_embd: 16,
            clip_embd: 8,
            kernel_size: 3,
        },
        decoder_text_encoder: text_encoder(16),
        vqgan: VqganConfig {
            in_channels: 3,
            out_channels: 3,
            up_down_scale_factor: 2,
            levels: 2,
            bottleneck_blocks: 2,
            embed_dim: 16,
            latent_channels: 4,
            scale_factor: 0.3764,
        },
        num_vq_embeddings: 64,
        prior_scheduler: SchedulerConfig { scaler: 1.0, s: 0.008 },
        decoder_scheduler: SchedulerConfig { scaler: 1.0, s: 0.008 },
        dropout: 0.1,
        projection_dim: 8,
        text_encoder_dtype: Dtype::F16,
    }
}

impl TinyArch {
    fn validate(&self) -> Result<()> {
        self.prior_pipeline.validate()?;
        self.decoder_pipeline.validate()?;
        self.prior.validate()?;
        self.prior_text_encoder.validate("text_encoder")?;
        self.decoder.validate()?;
        self.decoder_text_encoder.validate("text_encoder")?;
        self.vqgan.validate()?;
        self.prior_scheduler.validate()?;
        self.decoder_scheduler.validate()?;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------

/// (path relative to the pipeline folder, contents)
type Files = Vec<(String, Vec<u8>)>;

/// The contents of `prior/` and `decoder/`.
fn pipeline_files(seed: u64, size: ModelSize) -> Result<(Files, Files)> {
    let arch = arch(size);
    arch.validate().context("the tiny architecture")?;
    let tokenizer = tokenizer_files(arch.prior_text_encoder.max_position_embeddings)?;
    let module_seed = |offset: u64| seed.wrapping_add(offset);

    let mut prior: Files = vec![
        ("model_index.json".into(), prior_model_index(&arch)?),
        ("README.md".into(), readme("prior", seed, false)),
        (
            "prior/config.json".into(),
            config_json(
                &arch.prior,
                diffusers_meta("WuerstchenPrior").chain([("dropout", json!(arch.dropout))]),
            )?,
        ),
        (
            "prior/diffusion_pytorch_model.safetensors".into(),
            prior_weights(&arch, module_seed(PRIOR_SEED))?,
        ),
        (
            "scheduler/scheduler_config.json".into(),
            config_json(&arch.prior_scheduler, diffusers_meta("DDPMWuerstchenScheduler"))?,
        ),
    ];
    prior.extend(text_encoder_files(
        &arch.prior_text_encoder,
        &arch,
        module_seed(PRIOR_TEXT_ENCODER_SEED),
    )?);
    prior.extend(tokenizer.iter().cloned());

    let mut decoder: Files = vec![
        ("model_index.json".into(), decoder_model_index(&arch)?),
        ("README.md".into(), readme("decoder", seed, true)),
        (
            "decoder/config.json".into(),
            config_json(
                &arch.decoder,
                diffusers_meta("WuerstchenDiffNeXt").chain([("dropout", json!(arch.dropout))]),
            )?,
        ),
        (
            "decoder/diffusion_pytorch_model.safetensors".into(),
            decoder_weights(&arch, module_seed(DECODER_SEED))?,
        ),
        (
            "vqgan/config.json".into(),
            config_json(
                &arch.vqgan,
                diffusers_meta("PaellaVQModel").chain([("num_vq_embeddings", json!(arch.num_vq_embeddings))]),
            )?,
        ),
        (
            "vqgan/diffusion_pytorch_model.safetensors".into(),
            vqgan_weights(&arch.vqgan, arch.num_vq_embeddings, module_seed(VQGAN_SEED))?,
        ),
        (
            "scheduler/scheduler_config.json".into(),
            config_json(&arch.decoder_scheduler, diffusers_meta("DDPMWuerstchenScheduler"))?,
        ),
    ];
    decoder.extend(text_encoder_files(
        &arch.decoder_text_encoder,
        &arch,
        module_seed(DECODER_TEXT_ENCODER_SEED),
    )?);
    decoder.extend(tokenizer);
    Ok((prior, decoder))
}

/// The configs of a Stable Cascade pair.
struct CascadeArch {
    prior: CascadeUNetConfig,
    decoder: CascadeUNetConfig,
    /// the networks' folders: `prior`, `decoder`, or the lite networks' `prior_lite`, `decoder_lite`
    folders: [&'static str; 2],
    text_encoder: ClipTextConfig,
    text_encoder_dtype: Dtype,
    /// the prior pipeline's image encoder for image prompts (its projection the prior's
    /// `clip_image_in_channels`), stored like the text encoders
    image_encoder: ClipVisionConfig,
    /// the VQGAN and the pipelines' scale factors: Würstchen v2's
    v2: TinyArch,
}

/// The tiny pair (`tests/fixtures/make_cascade_fixtures.py`'s `cascade-tiny` shapes): a
/// stage C with text, pooled text and image inputs and two timestep conditions, a stage B with
/// effnet and pixel mappers, patch size 2 and a level without attention, the v2 tiny VQGAN,
/// one CLIPTextModelWithProjection per pipeline (float16).
fn cascade_tiny() -> CascadeArch {
    use CascadeBlock::{Attn, Res, Timestep};
    let v2 = tiny_a();
    let text_encoder = ClipTextConfig {
        projection_dim: 6,
        ..v2.prior_text_encoder.clone()
    };
    let unet = |cond: usize, channels: Vec<usize>, heads: Vec<i64>| CascadeUNetConfig {
        timestep_ratio_embedding_dim: 8,
        conditioning_dim: cond,
        down_num_layers_per_block: vec![1; channels.len()],
        up_num_layers_per_block: vec![1; channels.len()],
        down_blocks_repeat_mappers: vec![1; channels.len()],
        up_blocks_repeat_mappers: vec![1; channels.len()],
        block_out_channels: channels,
        num_attention_heads: heads,
        clip_text_pooled_in_channels: text_encoder.projection_dim,
        clip_seq: 2,
        self_attn: PerLevel::All(true),
        ..CascadeUNetConfig::default()
    };
    let prior = CascadeUNetConfig {
        in_channels: 8,
        out_channels: 8,
        block_types_per_layer: vec![vec![Res, Timestep, Attn]; 2],
        clip_text_in_channels: Some(text_encoder.hidden_size),
        clip_image_in_channels: Some(5),
        switch_level: Some(vec![false]),
        ..unet(16, vec![16, 16], vec![2, 2])
    };
    let decoder = CascadeUNetConfig {
        in_channels: 4,
        out_channels: 4,
        patch_size: 2,
        block_types_per_layer: vec![vec![Res, Timestep], vec![Res, Timestep, Attn]],
        effnet_in_channels: Some(prior.out_channels),
        pixel_mapper_in_channels: Some(3),
        timestep_conditioning_type: vec!["sca".into()],
        up_blocks_repeat_mappers: vec![2, 2],
        ..unet(12, vec![8, 16], vec![0, 2])
    };
    let image_encoder = ClipVisionConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        image_size: 32,
        patch_size: 8,
        projection_dim: prior.clip_image_in_channels.unwrap_or(0),
        hidden_act: Activation::Gelu,
        ..ClipVisionConfig::default()
    };
    CascadeArch {
        prior,
        decoder,
        folders: ["prior", "decoder"],
        text_encoder,
        text_encoder_dtype: Dtype::F16,
        image_encoder,
        v2,
    }
}

/// The published lite pair (`prior_lite/` 1.0B and `decoder_lite/` 0.7B parameters; configs of
/// diffusers' `convert_stable_cascade_lite.py`), with CLIP ViT-bigG/14 text encoders with
/// projection, a CLIP ViT-L/14 image encoder (diffusers' `convert_stable_cascade.py` takes
/// openai/clip-vit-large-patch14) and Würstchen v2's VQGAN, all f32: ~13 GB, for CPU
/// benchmarks. The full networks (3.6B + 1.5B) would not fit beside their page cache on a
/// 24 GiB machine.
fn cascade_lite() -> CascadeArch {
    use CascadeBlock::{Attn, Res, Timestep};
    let v2 = real();
    let text_encoder = ClipTextConfig {
        projection_dim: 1280,
        ..v2.prior_text_encoder.clone()
    };
    let prior = CascadeUNetConfig {
        conditioning_dim: 1536,
        block_out_channels: vec![1536, 1536],
        num_attention_heads: vec![24, 24],
        down_num_layers_per_block: vec![4, 12],
        up_num_layers_per_block: vec![12, 4],
        clip_text_in_channels: Some(1280),
        clip_text_pooled_in_channels: 1280,
        clip_image_in_channels: Some(768),
        switch_level: Some(vec![false]),
        ..CascadeUNetConfig::default()
    };
    let decoder = CascadeUNetConfig {
        in_channels: 4,
        out_channels: 4,
        patch_size: 2,
        conditioning_dim: 1280,
        block_out_channels: vec![320, 576, 1152, 1152],
        down_num_layers_per_block: vec![2, 4, 14, 4],
        up_num_layers_per_block: vec![4, 14, 4, 2],
        down_blocks_repeat_mappers: vec![1; 4],
        up_blocks_repeat_mappers: vec![2; 4],
        num_attention_heads: vec![0, 9, 18, 18],
        block_types_per_layer: vec![
            vec![Res, Timestep],
            vec![Res, Timestep],
            vec![Res, Timestep, Attn],
            vec![Res, Timestep, Attn],
        ],
        clip_text_pooled_in_channels: 1280,
        effnet_in_channels: Some(16),
        pixel_mapper_in_channels: Some(3),
        timestep_conditioning_type: vec!["sca".into()],
        ..CascadeUNetConfig::default()
    };
    // CLIP ViT-L/14, whose projection (768) is the prior's image input
    let image_encoder = ClipVisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        image_size: 224,
        patch_size: 14,
        projection_dim: 768,
        ..ClipVisionConfig::default()
    };
    CascadeArch {
        prior,
        decoder,
        folders: ["prior_lite", "decoder_lite"],
        text_encoder,
        text_encoder_dtype: Dtype::F32,
        image_encoder,
        v2,
    }
}

/// The pair `arch` in the Hub's layout.
fn cascade_pipeline_files(seed: u64, arch: &CascadeArch) -> Result<(Files, Files)> {
    let (prior, decoder, text_encoder, v2) = (&arch.prior, &arch.decoder, &arch.text_encoder, &arch.v2);
    prior.validate("prior")?;
    decoder.validate("decoder")?;
    let tokenizer = tokenizer_files(text_encoder.max_position_embeddings)?;
    let module_seed = |offset: u64| seed.wrapping_add(offset);
    let unet_files = |folder: &str, cfg: &CascadeUNetConfig, seed: u64| -> Result<Files> {
        let dropout = vec![0.0; cfg.levels()];
        let tensors = requested_tensors(|vb| StableCascadeUNet::new(cfg, vb).map(drop))?;
        // a small output layer keeps the predicted noise, and so the latents, near unit scale
        let values = randomize(&tensors, seed, |name, v| {
            if name == "clf.1.weight" {
                v.iter_mut().for_each(|x| *x *= 0.1);
            }
        });
        Ok(vec![
            (
                format!("{folder}/config.json"),
                config_json(
                    cfg,
                    diffusers_meta("StableCascadeUNet").chain([("dropout", json!(dropout))]),
                )?,
            ),
            (
                format!("{folder}/diffusion_pytorch_model.safetensors"),
                safetensors_file(stored_as(values, Dtype::F32))?,
            ),
        ])
    };
    let scheduler = || -> Result<(String, Vec<u8>)> {
        Ok((
            "scheduler/scheduler_config.json".into(),
            config_json(&SchedulerConfig::default(), diffusers_meta("DDPMWuerstchenScheduler"))?,
        ))
    };
    let components = [
        ("scheduler", json!(["diffusers", "DDPMWuerstchenScheduler"])),
        ("text_encoder", json!(["transformers", "CLIPTextModelWithProjection"])),
        ("tokenizer", json!(["transformers", "CLIPTokenizer"])),
    ];
    let readme = |part: &str, repo: &str| {
        format!(
            "---\nlibrary_name: diffusers\n---\n\nRandom-weight Stable Cascade {part} (seed {seed}) made by \
             `wuerstchen tiny-model --family stable-cascade`, in the layout of the Hub's {repo} repository. \
             Its images are noise: it is for smoke-testing scripts without downloading the real weights.\n"
        )
        .into_bytes()
    };

    let mut prior_files: Files = vec![
        (
            "model_index.json".into(),
            config_json(
                // StableCascadePriorPipeline registers only this of v2's three values
                &json!({ "resolution_multiple": v2.prior_pipeline.resolution_multiple }),
                diffusers_meta("StableCascadePriorPipeline")
                    .chain(components.clone())
                    .chain([
                        ("prior", json!(["diffusers", "StableCascadeUNet"])),
                        ("feature_extractor", json!(["transformers", "CLIPImageProcessor"])),
                        (
                            "image_encoder",
                            json!(["transformers", "CLIPVisionModelWithProjection"]),
                        ),
                    ]),
            )?,
        ),
        ("README.md".into(), readme("prior", "stabilityai/stable-cascade-prior")),
        scheduler()?,
    ];
    prior_files.extend(unet_files(arch.folders[0], prior, module_seed(PRIOR_SEED))?);
    let te_dtype = arch.text_encoder_dtype;
    prior_files.extend(clip_text_files(
        text_encoder,
        te_dtype,
        module_seed(PRIOR_TEXT_ENCODER_SEED),
        true,
    )?);
    prior_files.extend(tokenizer.iter().cloned());
    let seed = module_seed(IMAGE_ENCODER_SEED);
    prior_files.extend(image_encoder_files(&arch.image_encoder, te_dtype, seed)?);

    let mut decoder_files: Files = vec![
        (
            "model_index.json".into(),
            config_json(
                &v2.decoder_pipeline,
                diffusers_meta("StableCascadeDecoderPipeline").chain(components).chain([
                    ("decoder", json!(["diffusers", "StableCascadeUNet"])),
                    // as on the Hub (diffusers resolves the `wuerstchen` module to its deprecated home)
                    ("vqgan", json!(["wuerstchen", "PaellaVQModel"])),
                ]),
            )?,
        ),
        ("README.md".into(), readme("decoder", "stabilityai/stable-cascade")),
        scheduler()?,
        (
            "vqgan/config.json".into(),
            config_json(
                &v2.vqgan,
                diffusers_meta("PaellaVQModel").chain([("num_vq_embeddings", json!(v2.num_vq_embeddings))]),
            )?,
        ),
        (
            "vqgan/diffusion_pytorch_model.safetensors".into(),
            vqgan_weights(&v2.vqgan, v2.num_vq_embeddings, module_seed(VQGAN_SEED))?,
        ),
    ];
    decoder_files.extend(unet_files(arch.folders[1], decoder, module_seed(DECODER_SEED))?);
    let seed = module_seed(DECODER_TEXT_ENCODER_SEED);
    decoder_files.extend(clip_text_files(text_encoder, te_dtype, seed, true)?);
    decoder_files.extend(tokenizer);
    Ok((prior_files, decoder_files))
}

/// `_class_name` and `_diffusers_version`, which diffusers writes into every config it saves.
fn diffusers_meta(class: &'static str) -> impl Iterator<Item = (&'static str, Value)> {
    [
        ("_class_name", json!(class)),
        ("_diffusers_version", json!(DIFFUSERS_VERSION)),
    ]
    .into_iter()
}

/// `config`'s serde fields plus `extra` keys, sorted, indented by 2 like diffusers' files.
fn config_json<'a>(config: &impl Serialize, extra: impl IntoIterator<Item = (&'a str, Value)>) -> Result<Vec<u8>> {
    let Value::Object(fields) = serde_json::to_value(config)? else {
        bail!("a config struct did not serialize to a JSON object");
    };
    let mut map: BTreeMap<String, Value> = fields.into_iter().collect();
    for (key, value) in extra {
        ensure!(
            map.insert(key.to_string(), value).is_none(),
            "config key {key:?} given twice"
        );
    }
    pretty_json(&map)
}

/// Indented by 2, with a final newline.
fn pretty_json(value: &impl Serialize) -> Result<Vec<u8>> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text.into_bytes())
}

/// The component entries of `model_index.json` as on the Hub (written by diffusers 0.21, which
/// named the pipeline module `wuerstchen`; diffusers >= 0.27 moved it to `deprecated`).
fn common_components() -> [(&'static str, Value); 3] {
    [
        ("scheduler", json!(["diffusers", "DDPMWuerstchenScheduler"])),
        ("text_encoder", json!(["transformers", "CLIPTextModel"])),
        ("tokenizer", json!(["transformers", "CLIPTokenizerFast"])),
    ]
}

fn prior_model_index(arch: &TinyArch) -> Result<Vec<u8>> {
    config_json(
        &arch.prior_pipeline,
        diffusers_meta("WuerstchenPriorPipeline")
            .chain(common_components())
            .chain([("prior", json!(["wuerstchen", "WuerstchenPrior"]))]),
    )
}

fn decoder_model_index(arch: &TinyArch) -> Result<Vec<u8>> {
    config_json(
        &arch.decoder_pipeline,
        diffusers_meta("WuerstchenDecoderPipeline")
            .chain(common_components())
            .chain([
                ("decoder", json!(["wuerstchen", "WuerstchenDiffNeXt"])),
                ("vqgan", json!(["wuerstchen", "PaellaVQModel"])),
            ]),
    )
}

/// `text_encoder/config.json` (with the keys transformers' `CLIPTextConfig.save_pretrained`
/// writes) and `text_encoder/model.safetensors`.
fn text_encoder_files(cfg: &ClipTextConfig, arch: &TinyArch, seed: u64) -> Result<Files> {
    let cfg = ClipTextConfig {
        projection_dim: arch.projection_dim,
        ..cfg.clone()
    };
    clip_text_files(&cfg, arch.text_encoder_dtype, seed, false)
}

/// [`text_encoder_files`] for a `CLIPTextModel` or (`projection`) a
/// `CLIPTextModelWithProjection`, stored in `dtype`.
fn clip_text_files(cfg: &ClipTextConfig, dtype: Dtype, seed: u64, projection: bool) -> Result<Files> {
    let class = if projection {
        "CLIPTextModelWithProjection"
    } else {
        "CLIPTextModel"
    };
    // the legacy laion values the Hub's configs carry (only pooler_output uses them)
    let ids = [("bos_token_id", json!(0)), ("pad_token_id", json!(1))];
    let extra = clip_config_meta(class, "clip_text_model", dtype).chain(ids);
    Ok(vec![
        ("text_encoder/config.json".into(), config_json(cfg, extra)?),
        (
            "text_encoder/model.safetensors".into(),
            text_encoder_weights(cfg, dtype, seed, projection)?,
        ),
    ])
}

/// What transformers writes into a CLIP model's config.json beside the sizes.
fn clip_config_meta(
    class: &'static str,
    model_type: &'static str,
    dtype: Dtype,
) -> impl Iterator<Item = (&'static str, Value)> {
    [
        ("architectures", json!([class])),
        ("attention_dropout", json!(0.0)),
        ("dtype", json!(if dtype == Dtype::F16 { "float16" } else { "float32" })),
        ("initializer_factor", json!(1.0)),
        ("initializer_range", json!(0.02)),
        ("model_type", json!(model_type)),
        ("transformers_version", json!(TRANSFORMERS_VERSION)),
    ]
    .into_iter()
}

/// `image_encoder/` (a `CLIPVisionModelWithProjection`) and `feature_extractor/` (the
/// `CLIPImageProcessor` that feeds it: CLIP's preprocessing at the encoder's image size).
fn image_encoder_files(cfg: &ClipVisionConfig, dtype: Dtype, seed: u64) -> Result<Files> {
    cfg.validate("image_encoder")?;
    let extra = clip_config_meta("CLIPVisionModelWithProjection", "clip_vision_model", dtype);
    let tensors = requested_tensors(|vb| ClipVisionModel::new(cfg, vb).map(drop))?;
    let stored = stored_as(randomize(&tensors, seed, |_, _| {}), dtype);
    let side = cfg.image_size;
    let processor = json!({
        "crop_size": { "height": side, "width": side },
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": { "shortest_edge": side },
    });
    let mut processor = serde_json::to_vec_pretty(&processor)?;
    processor.push(b'\n');
    Ok(vec![
        ("image_encoder/config.json".into(), config_json(cfg, extra)?),
        ("image_encoder/model.safetensors".into(), safetensors_file(stored)?),
        ("feature_extractor/preprocessor_config.json".into(), processor),
    ])
}

/// `tokenizer/`: `tokenizer.json` with the genuine CLIP vocabulary and merges, plus the two
/// small files that name the special tokens and the length.
fn tokenizer_files(max_len: usize) -> Result<Files> {
    #[derive(Serialize)]
    struct SpecialTokens {
        bos_token: &'static str,
        eos_token: &'static str,
        unk_token: &'static str,
        pad_token: &'static str,
    }
    #[derive(Serialize)]
    struct TokenizerConfig {
        #[serde(flatten)]
        special: SpecialTokens,
        model_max_length: usize,
        tokenizer_class: &'static str,
    }
    let special = || SpecialTokens {
        bos_token: BOS,
        eos_token: EOS,
        unk_token: EOS,
        pad_token: EOS,
    };
    let config = TokenizerConfig {
        special: special(),
        model_max_length: max_len,
        tokenizer_class: "CLIPTokenizer",
    };
    let json = crate::tokenizer::clip_tokenizer_json(&clip_vocab_json()?, CLIP_MERGES_TXT)?;
    Ok(vec![
        ("tokenizer/tokenizer.json".into(), json.into_bytes()),
        ("tokenizer/tokenizer_config.json".into(), pretty_json(&config)?),
        ("tokenizer/special_tokens_map.json".into(), pretty_json(&special())?),
    ])
}

fn readme(part: &str, seed: u64, decoder: bool) -> Vec<u8> {
    // diffusers' combined pipeline finds the prior through the decoder's model card
    let prior = if decoder { "prior:\n- ../prior\n" } else { "" };
    format!(
        "---\nlicense: mit\nlibrary_name: diffusers\n{prior}---\n\n\
         Random-weight Würstchen v2 {part} (seed {seed}) made by `wuerstchen tiny-model`, in the \
         layout of the Hub's warp-ai/wuerstchen{} repository. Its images are noise: it is for \
         smoke-testing scripts and pipelines without downloading the real weights.\n",
        if decoder { "" } else { "-prior" },
    )
    .into_bytes()
}

/// The 256 byte symbols in openai/CLIP's `bytes_to_unicode` order: the printable Latin-1
/// bytes map to themselves, then the others to U+0100 onwards.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut chars: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let others = (0..256u32).filter(|&b| !printable(b)).count() as u32;
    chars.extend((0..others).filter_map(|n| char::from_u32(256 + n)));
    chars
}

/// CLIP's vocabulary in id order.
fn clip_vocab() -> Result<Vec<String>> {
    let bytes = bytes_to_unicode();
    let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
    for (i, line) in CLIP_MERGES_TXT
        .lines()
        .filter(|l| !l.starts_with("#version"))
        .enumerate()
    {
        let (a, b) = line
            .split_once(' ')
            .ok_or_else(|| anyhow!("assets/clip/merges.txt: merge {} is {line:?}", i + 1))?;
        vocab.push(format!("{a}{b}"));
    }
    vocab.push(BOS.to_string());
    vocab.push(EOS.to_string());
    ensure!(
        vocab.len() == CLIP_VOCAB_SIZE,
        "the CLIP vocabulary has {} tokens, expected {CLIP_VOCAB_SIZE}",
        vocab.len()
    );
    Ok(vocab)
}

// ------------------------------------------------------------------------------------------
// Weights
// ------------------------------------------------------------------------------------------

/// One tensor as it goes into a safetensors file.
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Stored {
    fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            dtype: Dtype::F32,
            shape,
            bytes,
        }
    }

    fn f16(shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        Self {
            dtype: Dtype::F16,
            shape,
            bytes,
        }
    }
}

/// Every (name, shape) that `build` asks its `VarBuilder` for.
fn requested_tensors(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let map = VarMap::new();
    // a VarMap creates each requested variable (zeros, the default init) and remembers it
    build(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    let vars = map
        .data()
        .lock()
        .map_err(|_| anyhow!("the variable map's lock is poisoned"))?;
    Ok(vars
        .iter()
        .map(|(name, var)| (name.clone(), var.dims().to_vec()))
        .collect())
}

/// How `randomize_` in make_fixtures.py scales a parameter's standard normal noise.
fn scale_noise(name: &str, shape: &[usize], noise: &mut [f32]) {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = ["layer_norm", "layernorm", "norm1", "norm2"]
        .iter()
        .any(|k| name.contains(k))
        || name.ends_with("norm.weight");
    let (mul, add) = if matches!(leaf, "gamma" | "beta" | "gammas") {
        (0.1, 0.0) // GRN gamma/beta and Paella's gammas: N(0, 0.1^2)
    } else if leaf == "bias" {
        (0.02, 0.0)
    } else if is_norm && shape.len() == 1 {
        (0.02, 1.0)
    } else if shape.len() >= 2 {
        // N(0, 1/fan_in)
        let fan_in = (shape.iter().product::<usize>() / shape[0].max(1)).max(1);
        (1.0 / (fan_in as f32).sqrt(), 0.0)
    } else {
        (0.02, 0.0)
    };
    for v in noise {
        *v = *v * mul + add;
    }
}

/// Deterministic values for `tensors`: one torch-compatible generator, tensors in sorted name
/// order, each scaled by [`scale_noise`]; then `adjust` per tensor.
fn randomize(
    tensors: &BTreeMap<String, Vec<usize>>,
    seed: u64,
    adjust: impl Fn(&str, &mut [f32]),
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut g = TorchCpuGenerator::new(seed);
    tensors
        .iter()
        .map(|(name, shape)| {
            let mut values = g.randn(shape.iter().product());
            scale_noise(name, shape, &mut values);
            adjust(name, &mut values);
            (name.clone(), (shape.clone(), values))
        })
        .collect()
}

fn safetensors_file(tensors: BTreeMap<String, Stored>) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, t)| Ok((name.as_str(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::tensor::serialize(views, Some(metadata))?)
}

/// Every tensor stored in `dtype`: f16 rounded from the f32 values, anything else f32.
fn stored_as(values: BTreeMap<String, (Vec<usize>, Vec<f32>)>, dtype: Dtype) -> BTreeMap<String, Stored> {
    let store = |shape, v: &[f32]| {
        if dtype == Dtype::F16 {
            Stored::f16(shape, v)
        } else {
            Stored::f32(shape, v)
        }
    };
    values
        .into_iter()
        .map(|(name, (shape, v))| (name, store(shape, &v)))
        .collect()
}

fn prior_weights(arch: &TinyArch, seed: u64) -> Result<Vec<u8>> {
    let tensors = requested_tensors(|vb| WuerstchenPrior::new(&arch.prior, vb).map(drop))?;
    let values = randomize(&tensors, seed, |name, v| {
        if name == "out.1.weight" {
            // keeps |1 - b| away from 0 in the prior's (x - a) / (|1 - b| + 1e-5)
            v.iter_mut().for_each(|x| *x *= 0.1);
        }
    });
    safetensors_file(stored_as(values, Dtype::F32))
}

fn decoder_weights(arch: &TinyArch, seed: u64) -> Result<Vec<u8>> {
    let tensors = requested_tensors(|vb| WuerstchenDiffNeXt::new(&arch.decoder, vb).map(drop))?;
    // stabilize_decoder_: b = sigmoid(.) * (1 - 2e-3) + 1e-3 divides the output; pushing b
    // towards ~0.9 makes a tame denoiser
    let values = randomize(&tensors, seed, |name, v| match name {
        "clf.1.weight" => v.iter_mut().for_each(|x| *x *= 0.1),
        "clf.1.bias" => {
            let half = v.len() / 2;
            v[half..].iter_mut().for_each(|x| *x += 2.0);
        }
        _ => {}
    });
    safetensors_file(stored_as(values, Dtype::F32))
}

/// Stored with the Hub's transformers-4 key names (`text_model.` prefix); with
/// `CLIPTextModelWithProjection`'s `text_projection.weight` where `projection`.
fn text_encoder_weights(cfg: &ClipTextConfig, dtype: Dtype, seed: u64, projection: bool) -> Result<Vec<u8>> {
    let tensors = requested_tensors(|vb| {
        if projection {
            vb.get((cfg.projection_dim, cfg.hidden_size), "text_projection.weight")?;
        }
        ClipTextModel::new(cfg, vb.pp("text_model")).map(drop)
    })?;
    safetensors_file(stored_as(randomize(&tensors, seed, |_, _| {}), dtype))
}

fn vqgan_weights(cfg: &VqganConfig, num_vq_embeddings: usize, seed: u64) -> Result<Vec<u8>> {
    let tensors = requested_tensors(|vb| {
        PaellaVqDecoder::new(cfg, vb.clone())?;
        request_vqgan_encoder(cfg, num_vq_embeddings, &vb)
    })?;
    let values = randomize(&tensors, seed, |name, v| {
        if name == "out_block.0.bias" {
            // centres the decoded images at mid-grey
            v.iter_mut().for_each(|x| *x += 0.5);
        }
    });
    let mut stored = stored_as(values, Dtype::F32);
    // the BatchNorm2d's buffers, at their initial values
    let (bn, c) = vqgan_batch_norm(cfg);
    stored.insert(format!("{bn}.running_mean"), Stored::f32(vec![c], &vec![0.0; c]));
    stored.insert(format!("{bn}.running_var"), Stored::f32(vec![c], &vec![1.0; c]));
    stored.insert(
        format!("{bn}.num_batches_tracked"),
        Stored {
            dtype: Dtype::I64,
            shape: vec![],
            bytes: 0i64.to_le_bytes().to_vec(),
        },
    );
    safetensors_file(stored)
}

/// The prefix and channels of the BatchNorm2d that ends the VQGAN encoder's `down_blocks`.
fn vqgan_batch_norm(cfg: &VqganConfig) -> (String, usize) {
    // down_blocks: one MixingResidualBlock per level, a downsampling conv before each but the
    // first, then Sequential(conv, BatchNorm2d)
    let last = 2 * cfg.levels - 1;
    (format!("down_blocks.{last}.1"), cfg.latent_channels)
}

/// Requests the parameters of `PaellaVQModel`'s encoder half and codebook
/// (modeling_paella_vq_model.py), which diffusers loads but our decoder-only VQGAN never reads.
fn request_vqgan_encoder(cfg: &VqganConfig, num_vq_embeddings: usize, vb: &VarBuilder) -> candle_core::Result<()> {
    let c = cfg.c_levels();
    let f = cfg.up_down_scale_factor;
    let conv = |vb: VarBuilder, c_in: usize, c_out: usize, k: usize, bias: bool| -> candle_core::Result<()> {
        vb.get((c_out, c_in, k, k), "weight")?;
        if bias {
            vb.get(c_out, "bias")?;
        }
        Ok(())
    };
    // in_block: PixelUnshuffle(f), Conv2d(in_channels * f^2, c[0], 1)
    conv(vb.pp("in_block.1"), cfg.in_channels * f * f, c[0], 1, true)?;
    let down = vb.pp("down_blocks");
    let mut index = 0;
    for i in 0..cfg.levels {
        if i > 0 {
            // Conv2d(c[i-1], c[i], kernel_size=4, stride=2, padding=1)
            conv(down.pp(index), c[i - 1], c[i], 4, true)?;
            index += 1;
        }
        // MixingResidualBlock(c[i], c[i] * 4)
        let block = down.pp(index);
        block.get(6, "gammas")?;
        conv(block.pp("depthwise.1"), 1, c[i], 3, true)?;
        block.get((4 * c[i], c[i]), "channelwise.0.weight")?;
        block.get(4 * c[i], "channelwise.0.bias")?;
        block.get((c[i], 4 * c[i]), "channelwise.2.weight")?;
        block.get(c[i], "channelwise.2.bias")?;
        index += 1;
    }
    // Sequential(Conv2d(c[-1], latent_channels, 1, bias=False), BatchNorm2d(latent_channels))
    let last = down.pp(index);
    conv(last.pp("0"), c[cfg.levels - 1], cfg.latent_channels, 1, false)?;
    last.get(cfg.latent_channels, "1.weight")?;
    last.get(cfg.latent_channels, "1.bias")?;
    // VectorQuantizer: nn.Embedding(num_vq_embeddings, latent_channels)
    vb.get((num_vq_embeddings, cfg.latent_channels), "vquantizer.embedding.weight")?;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Writing
// ------------------------------------------------------------------------------------------

/// Ok when `target` is absent or an empty folder, or may be replaced.
fn check_target(target: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    let meta = match std::fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("checking {}", target.display()))),
    };
    let empty_dir = meta.is_dir()
        && std::fs::read_dir(target)
            .with_context(|| format!("reading {}", target.display()))?
            .next()
            .is_none();
    if !empty_dir {
        let what = if meta.is_dir() {
            "is not empty"
        } else {
            "exists and is not a folder"
        };
        return Err(InputError::new(format!(
            "{} {what}; refusing to write the tiny model there (overwrite replaces it)",
            target.display()
        ))
        .into());
    }
    Ok(())
}

fn remove_existing(target: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(target),
        Ok(_) => std::fs::remove_file(target),
    };
    result.with_context(|| format!("removing the old {}", target.display()))
}

fn write_folder(root: &Path, files: &Files) -> Result<()> {
    for (rel, bytes) in files {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(bytes)
            .and_then(|_| file.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_scaling_follows_randomize_() {
        let scaled = |name: &str, shape: &[usize]| {
            let mut v = vec![1.0f32];
            scale_noise(name, shape, &mut v);
            v[0]
        };
        assert_eq!(scaled("blocks.0.channelwise.2.gamma", &[1, 1, 1, 8]), 0.1);
        assert_eq!(scaled("up_blocks.1.gammas", &[6]), 0.1);
        assert_eq!(scaled("blocks.0.attention.to_q.bias", &[8]), 0.02);
        assert_eq!(scaled("text_model.final_layer_norm.weight", &[8]), 1.02);
        assert_eq!(scaled("text_model.encoder.layers.0.layer_norm1.weight", &[8]), 1.02);
        assert_eq!(scaled("clf.1.weight", &[32, 8, 1, 1]), 1.0 / 8f32.sqrt());
        assert_eq!(scaled("down_blocks.3.1.weight", &[4]), 0.02); // BatchNorm: not a "norm" name
    }

    #[test]
    fn bytes_to_unicode_matches_clip() {
        let chars = bytes_to_unicode();
        assert_eq!(chars.len(), 256);
        assert_eq!((chars[0], chars[93], chars[94]), ('!', '~', '¡'));
        assert_eq!(chars[188], 'Ā'); // byte 0 -> U+0100, after the 188 printable bytes
        assert_eq!(chars[255], char::from_u32(256 + 67).unwrap());
    }

    #[test]
    fn vqgan_encoder_tensors_end_in_the_batch_norm() {
        let arch = tiny_a();
        let tensors = requested_tensors(|vb| request_vqgan_encoder(&arch.vqgan, 64, &vb)).unwrap();
        let (bn, c) = vqgan_batch_norm(&arch.vqgan);
        assert_eq!(tensors[&format!("{bn}.weight")], vec![c]);
        assert_eq!(tensors["down_blocks.1.weight"], vec![16, 8, 4, 4]);
        assert_eq!(tensors["in_block.1.weight"], vec![8, 12, 1, 1]);
        assert_eq!(tensors["vquantizer.embedding.weight"], vec![64, 4]);
    }
}
