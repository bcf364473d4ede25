//! Serde mirrors of the diffusers files: `model_index.json`, each component's `config.json`,
//! `scheduler/scheduler_config.json`. Missing keys take the defaults of the diffusers /
//! transformers class the file belongs to; `validate` turns impossible values into errors
//! before any tensor is built.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::hub::FileSource;

fn bad(component: &str, message: impl Into<String>) -> ModelError {
    ModelError::BadConfig {
        component: component.to_string(),
        message: message.into(),
    }
}

/// Reads and parses `rel_path` from `src`; a missing file is `ModelError::MissingFile`.
pub fn read_json<T: serde::de::DeserializeOwned>(
    src: &dyn FileSource,
    component: &str,
    rel_path: &str,
) -> anyhow::Result<T> {
    let parse = |text: &str| serde_json::from_str(text).map_err(|e| format!("invalid JSON for this component: {e}"));
    let parsed = crate::hub::read_parsed(src, component, rel_path, parse)?;
    Ok(parsed.ok_or_else(|| src.missing(component, rel_path))?.1)
}

/// `model_index.json` of a prior pipeline (WuerstchenPriorPipeline's registered config).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct PriorPipelineConfig {
    pub latent_mean: f64,
    pub latent_std: f64,
    pub resolution_multiple: f64,
}

impl Default for PriorPipelineConfig {
    // WuerstchenPriorPipeline.__init__ defaults (pipeline_wuerstchen_prior.py)
    fn default() -> Self {
        Self {
            latent_mean: 42.0,
            latent_std: 1.0,
            resolution_multiple: 42.67,
        }
    }
}

impl PriorPipelineConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        let ok = [self.latent_mean, self.latent_std].iter().all(|v| v.is_finite())
            && self.resolution_multiple.is_finite()
            && self.resolution_multiple > 0.0;
        if !ok {
            return Err(bad(
                "model_index.json",
                "latent_mean, latent_std must be finite and resolution_multiple > 0",
            ));
        }
        Ok(())
    }
}

/// `model_index.json` of a decoder pipeline (WuerstchenDecoderPipeline's registered config).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct DecoderPipelineConfig {
    pub latent_dim_scale: f64,
}

impl Default for DecoderPipelineConfig {
    // WuerstchenDecoderPipeline.__init__ default (pipeline_wuerstchen.py)
    fn default() -> Self {
        Self {
            latent_dim_scale: 10.67,
        }
    }
}

impl DecoderPipelineConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.latent_dim_scale.is_finite() && self.latent_dim_scale > 0.0) {
            return Err(bad("model_index.json", "latent_dim_scale must be > 0"));
        }
        Ok(())
    }
}

/// `prior/config.json` (WuerstchenPrior).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct PriorConfig {
    pub c_in: usize,
    pub c: usize,
    pub c_cond: usize,
    pub c_r: usize,
    pub depth: usize,
    pub nhead: usize,
}

impl Default for PriorConfig {
    // WuerstchenPrior.__init__ defaults (modeling_wuerstchen_prior.py); the Hub's real config
    // overrides most of them (c 1536, c_cond 1280, depth 32, nhead 24).
    fn default() -> Self {
        Self {
            c_in: 16,
            c: 1280,
            c_cond: 1024,
            c_r: 64,
            depth: 16,
            nhead: 16,
        }
    }
}

impl PriorConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        let b = |m: &str| Err(bad("prior", m));
        if self.c_in == 0 || self.c == 0 || self.c_cond == 0 || self.depth == 0 {
            return b("c_in, c, c_cond and depth must be > 0");
        }
        if self.nhead == 0 || self.c % self.nhead != 0 {
            return b("c must be a multiple of nhead (> 0)");
        }
        if self.c_r < 4 {
            // gen_r_embedding divides by c_r/2 - 1
            return b("c_r must be at least 4");
        }
        Ok(())
    }
}

/// A level's blocks from their letters, for configs written in code (defaults, tiny models);
/// letters other than C, T and A are left out.
pub fn level(letters: &str) -> LevelBlocks {
    LevelBlocks(letters.chars().filter_map(BlockKind::from_letter).collect())
}

/// More levels than any U-Net needs; bounds the shifts in `downscale` and `upscale`.
const MAX_LEVELS: usize = 16;

/// The block kinds of a decoder level's `level_config` string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `C`: ResBlockStageB
    Res,
    /// `T`: TimestepBlock
    Timestep,
    /// `A`: AttnBlock (self-attention over the image tokens plus the text)
    Attn,
}

impl BlockKind {
    fn from_letter(ch: char) -> Option<Self> {
        match ch {
            'C' => Some(Self::Res),
            'T' => Some(Self::Timestep),
            'A' => Some(Self::Attn),
            _ => None,
        }
    }

    fn letter(self) -> char {
        match self {
            Self::Res => 'C',
            Self::Timestep => 'T',
            Self::Attn => 'A',
        }
    }
}

/// One decoder level's blocks in order, written in the config file as a string of their
/// letters (`"CTA"`); any other letter fails the parse.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct LevelBlocks(pub Vec<BlockKind>);

impl TryFrom<String> for LevelBlocks {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.chars()
            .map(|ch| BlockKind::from_letter(ch).ok_or_else(|| format!("{s:?}: unknown block type {ch:?} (C, T or A)")))
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl From<LevelBlocks> for String {
    fn from(l: LevelBlocks) -> String {
        l.0.iter().map(|k| k.letter()).collect()
    }
}

/// `decoder/config.json` (WuerstchenDiffNeXt).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct DecoderConfig {
    pub c_in: usize,
    pub c_out: usize,
    pub c_r: usize,
    pub patch_size: usize,
    pub c_cond: usize,
    pub c_hidden: Vec<usize>,
    pub nhead: Vec<i64>,
    pub blocks: Vec<usize>,
    pub level_config: Vec<LevelBlocks>,
    pub inject_effnet: Vec<bool>,
    pub effnet_embd: usize,
    pub clip_embd: usize,
    pub kernel_size: usize,
}

impl Default for DecoderConfig {
    // WuerstchenDiffNeXt.__init__ defaults (modeling_wuerstchen_diffnext.py) = the Hub's config
    fn default() -> Self {
        Self {
            c_in: 4,
            c_out: 4,
            c_r: 64,
            patch_size: 2,
            c_cond: 1024,
            c_hidden: vec![320, 640, 1280, 1280],
            nhead: vec![-1, 10, 20, 20],
            blocks: vec![4, 4, 14, 4],
            level_config: ["CT", "CTA", "CTA", "CTA"].map(level).to_vec(),
            inject_effnet: vec![false, true, true, true],
            effnet_embd: 16,
            clip_embd: 1024,
            kernel_size: 3,
        }
    }
}

impl DecoderConfig {
    pub fn levels(&self) -> usize {
        self.c_hidden.len()
    }

    /// The block kinds of level `i`, in order.
    pub fn level_blocks(&self, i: usize) -> &[BlockKind] {
        &self.level_config[i].0
    }

    /// How much the decoder shrinks its input: the patch size times 2 per extra level.
    pub fn downscale(&self) -> usize {
        self.patch_size << self.levels().saturating_sub(1)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let b = |m: String| Err(bad("decoder", m));
        let n = self.c_hidden.len();
        if n == 0 || n > MAX_LEVELS {
            return b(format!("c_hidden must list 1 to {MAX_LEVELS} levels"));
        }
        if self.patch_size > 1 << 16 {
            return b("patch_size is implausibly large".into());
        }
        if self.nhead.len() != n
            || self.blocks.len() != n
            || self.level_config.len() != n
            || self.inject_effnet.len() != n
        {
            return b(format!(
                "c_hidden, nhead, blocks, level_config and inject_effnet must have the same length ({n})"
            ));
        }
        if self.c_in == 0 || self.c_out == 0 || self.patch_size == 0 || self.c_cond == 0 {
            return b("c_in, c_out, patch_size and c_cond must be > 0".into());
        }
        if self.kernel_size == 0 || self.kernel_size % 2 == 0 {
            return b("kernel_size must be odd".into());
        }
        if self.c_r < 4 {
            return b("c_r must be at least 4".into());
        }
        for i in 0..n {
            if self.c_hidden[i] == 0 {
                return b(format!("c_hidden[{i}] must be > 0"));
            }
            if self.level_blocks(i).contains(&BlockKind::Attn) {
                let h = self.nhead[i];
                if h <= 0 || self.c_hidden[i] % h as usize != 0 {
                    return b(format!(
                        "level {i} has attention but nhead[{i}] = {h} does not divide c_hidden[{i}] = {}",
                        self.c_hidden[i]
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A block type of `StableCascadeUNet`'s `block_types_per_layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum CascadeBlock {
    #[serde(rename = "SDCascadeResBlock")]
    Res,
    #[serde(rename = "SDCascadeTimestepBlock")]
    Timestep,
    #[serde(rename = "SDCascadeAttnBlock")]
    Attn,
}

/// One value for every level, or a list with one per level (`dropout`, `self_attn`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy> PerLevel<T> {
    /// The value of level `i`; `None` past the end of a list.
    pub fn at(&self, i: usize) -> Option<T> {
        match self {
            Self::All(v) => Some(*v),
            Self::Each(list) => list.get(i).copied(),
        }
    }
}

/// `config.json` of a `StableCascadeUNet`: Stable Cascade's stage C (the prior) and stage B
/// (the decoder) are both this network with other options.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct CascadeUNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub timestep_ratio_embedding_dim: usize,
    pub patch_size: usize,
    pub conditioning_dim: usize,
    pub block_out_channels: Vec<usize>,
    /// 0 (diffusers' docs say -1) on levels without attention
    pub num_attention_heads: Vec<i64>,
    pub down_num_layers_per_block: Vec<usize>,
    /// in the up path's order, coarsest level first
    pub up_num_layers_per_block: Vec<usize>,
    pub down_blocks_repeat_mappers: Vec<usize>,
    /// in the up path's order, coarsest level first
    pub up_blocks_repeat_mappers: Vec<usize>,
    pub block_types_per_layer: Vec<Vec<CascadeBlock>>,
    pub clip_text_in_channels: Option<usize>,
    pub clip_text_pooled_in_channels: usize,
    pub clip_image_in_channels: Option<usize>,
    pub clip_seq: usize,
    pub effnet_in_channels: Option<usize>,
    pub pixel_mapper_in_channels: Option<usize>,
    pub kernel_size: usize,
    pub self_attn: PerLevel<bool>,
    /// the extra timestep-like inputs (`sca`, `crp`), each with its own embedding part
    pub timestep_conditioning_type: Vec<String>,
    /// per level transition: a 1x1 conv with (true) or without (false) a bilinear resize by 2;
    /// `None`: a strided conv down and a transposed conv up
    pub switch_level: Option<Vec<bool>>,
}

impl Default for CascadeUNetConfig {
    // StableCascadeUNet.__init__ defaults (unet_stable_cascade.py)
    fn default() -> Self {
        use CascadeBlock::*;
        Self {
            in_channels: 16,
            out_channels: 16,
            timestep_ratio_embedding_dim: 64,
            patch_size: 1,
            conditioning_dim: 2048,
            block_out_channels: vec![2048, 2048],
            num_attention_heads: vec![32, 32],
            down_num_layers_per_block: vec![8, 24],
            up_num_layers_per_block: vec![24, 8],
            down_blocks_repeat_mappers: vec![1, 1],
            up_blocks_repeat_mappers: vec![1, 1],
            block_types_per_layer: vec![vec![Res, Timestep, Attn]; 2],
            clip_text_in_channels: None,
            clip_text_pooled_in_channels: 1280,
            clip_image_in_channels: None,
            clip_seq: 4,
            effnet_in_channels: None,
            pixel_mapper_in_channels: None,
            kernel_size: 3,
            self_attn: PerLevel::All(true),
            timestep_conditioning_type: vec!["sca".into(), "crp".into()],
            switch_level: None,
        }
    }
}

impl CascadeUNetConfig {
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Level `i`'s layers on the up path.
    pub fn up_layers(&self, i: usize) -> usize {
        self.up_num_layers_per_block[self.levels() - 1 - i]
    }

    /// Level `i`'s repeats on the up path.
    pub fn up_repeats(&self, i: usize) -> usize {
        self.up_blocks_repeat_mappers[self.levels() - 1 - i]
    }

    /// The validated config, for a component named `component` in errors.
    pub fn validate(&self, component: &str) -> Result<(), ModelError> {
        let b = |m: String| Err(bad(component, m));
        let n = self.levels();
        if n == 0 || n > MAX_LEVELS {
            return b(format!("block_out_channels must list 1 to {MAX_LEVELS} levels"));
        }
        let lists = [
            ("num_attention_heads", self.num_attention_heads.len()),
            ("down_num_layers_per_block", self.down_num_layers_per_block.len()),
            ("up_num_layers_per_block", self.up_num_layers_per_block.len()),
            ("down_blocks_repeat_mappers", self.down_blocks_repeat_mappers.len()),
            ("up_blocks_repeat_mappers", self.up_blocks_repeat_mappers.len()),
            ("block_types_per_layer", self.block_types_per_layer.len()),
        ];
        if let Some((name, len)) = lists.iter().find(|(_, len)| *len != n) {
            return b(format!("{name} has {len} entries, block_out_channels {n}"));
        }
        if let PerLevel::Each(list) = &self.self_attn {
            if list.len() < n {
                return b(format!("self_attn has {} entries, block_out_channels {n}", list.len()));
            }
        }
        if self.switch_level.as_ref().is_some_and(|s| s.len() + 1 < n) {
            return b(format!("switch_level needs an entry per level transition ({})", n - 1));
        }
        let sizes = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("patch_size", self.patch_size),
            ("conditioning_dim", self.conditioning_dim),
            ("clip_seq", self.clip_seq),
            ("clip_text_pooled_in_channels", self.clip_text_pooled_in_channels),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return b(format!("{name} must be > 0"));
        }
        if self.kernel_size % 2 == 0 {
            return b("kernel_size must be odd".into());
        }
        if self.timestep_ratio_embedding_dim < 4 {
            // the embedding divides by half its width minus one
            return b("timestep_ratio_embedding_dim must be at least 4".into());
        }
        for i in 0..n {
            let c = self.block_out_channels[i];
            if c == 0 || self.down_blocks_repeat_mappers[i] == 0 || self.up_blocks_repeat_mappers[i] == 0 {
                return b(format!("level {i}: channels and repeat mappers must be > 0"));
            }
            let h = self.num_attention_heads[i];
            if self.block_types_per_layer[i].contains(&CascadeBlock::Attn) && (h <= 0 || c % h as usize != 0) {
                return b(format!(
                    "level {i} has attention but num_attention_heads[{i}] = {h} does not divide block_out_channels[{i}] = {c}"
                ));
            }
        }
        Ok(())
    }
}

/// `vqgan/config.json` (PaellaVQModel).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct VqganConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub up_down_scale_factor: usize,
    pub levels: usize,
    pub bottleneck_blocks: usize,
    pub embed_dim: usize,
    pub latent_channels: usize,
    pub scale_factor: f64,
}

impl Default for VqganConfig {
    // PaellaVQModel.__init__ defaults (modeling_paella_vq_model.py) = the Hub's config
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            up_down_scale_factor: 2,
            levels: 2,
            bottleneck_blocks: 12,
            embed_dim: 384,
            latent_channels: 4,
            scale_factor: 0.3764,
        }
    }
}

impl VqganConfig {
    /// Channels per level, finest first: `embed_dim // 2**i` for i = levels-1 .. 0.
    pub fn c_levels(&self) -> Vec<usize> {
        (0..self.levels).rev().map(|i| self.embed_dim >> i).collect()
    }

    /// Image pixels per latent pixel.
    pub fn upscale(&self) -> usize {
        self.up_down_scale_factor << self.levels.saturating_sub(1)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let b = |m: &str| Err(bad("vqgan", m));
        if self.levels == 0 || self.up_down_scale_factor == 0 || self.latent_channels == 0 {
            return b("levels, up_down_scale_factor and latent_channels must be > 0");
        }
        // each level halves embed_dim and doubles the image: checked before anything shifts
        if self.levels > MAX_LEVELS || self.up_down_scale_factor > 1 << 16 {
            return b("levels or up_down_scale_factor is implausibly large");
        }
        if self.out_channels != 3 {
            return b("out_channels must be 3 (an RGB image)");
        }
        if self.c_levels().contains(&0) {
            return b("embed_dim is too small for the number of levels");
        }
        if !self.scale_factor.is_finite() {
            return b("scale_factor must be finite");
        }
        Ok(())
    }
}

/// `scheduler/scheduler_config.json` (DDPMWuerstchenScheduler).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    pub scaler: f64,
    pub s: f64,
}

impl Default for SchedulerConfig {
    // DDPMWuerstchenScheduler.__init__ defaults (scheduling_ddpm_wuerstchen.py)
    fn default() -> Self {
        Self { scaler: 1.0, s: 0.008 }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.scaler.is_finite() && self.scaler > 0.0 && self.s.is_finite() && self.s >= 0.0) {
            return Err(bad("scheduler", "scaler must be > 0 and s >= 0"));
        }
        Ok(())
    }
}

/// The activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Activation {
    /// exact erf GELU (`"gelu"`)
    #[serde(rename = "gelu")]
    Gelu,
    /// `x * sigmoid(1.702 x)` (`"quick_gelu"`)
    #[serde(rename = "quick_gelu")]
    QuickGelu,
}

/// `text_encoder/config.json` (transformers CLIPTextConfig).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// `CLIPTextModelWithProjection`'s `text_projection` width
    pub projection_dim: usize,
    /// where `pooler_output` is taken: transformers' legacy value 2 means the highest token
    /// id (`argmax`), any other the first occurrence of this id
    pub eos_token_id: i64,
}

impl Default for ClipTextConfig {
    // transformers CLIPTextConfig defaults (configuration_clip.py)
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    pub fn validate(&self, component: &str) -> Result<(), ModelError> {
        let b = |m: &str| Err(bad(component, m));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return b("hidden_size, num_hidden_layers and vocab_size must be > 0");
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return b("hidden_size must be a multiple of num_attention_heads (> 0)");
        }
        if self.max_position_embeddings == 0 {
            return b("max_position_embeddings must be > 0");
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return b("layer_norm_eps must be > 0");
        }
        Ok(())
    }
}

/// `image_encoder/config.json` (transformers CLIPVisionConfig), Stable Cascade's
/// `CLIPVisionModelWithProjection` for image prompts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    /// the side of the square input; the position embeddings cover its patches
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    // transformers CLIPVisionConfig defaults (configuration_clip.py)
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            projection_dim: 512,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    pub fn validate(&self, component: &str) -> Result<(), ModelError> {
        let b = |m: &str| Err(bad(component, m));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.projection_dim == 0 || self.num_channels == 0 {
            return b("hidden_size, num_hidden_layers, num_channels and projection_dim must be > 0");
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return b("hidden_size must be a multiple of num_attention_heads (> 0)");
        }
        if self.patch_size == 0 || self.image_size == 0 || self.image_size % self.patch_size != 0 {
            return b("image_size must be a multiple of patch_size (> 0)");
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return b("layer_norm_eps must be > 0");
        }
        Ok(())
    }

    /// Patches per image plus the class token: the sequence the encoder runs on.
    pub fn positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_diffusers_defaults_and_extra_keys_are_ignored() {
        let c: DecoderConfig = serde_json::from_str(r#"{"_class_name": "WuerstchenDiffNeXt", "c_cond": 32}"#).unwrap();
        assert_eq!(c.c_cond, 32);
        assert_eq!(c.c_hidden, vec![320, 640, 1280, 1280]);
        assert_eq!(c.downscale(), 16);
        c.validate().unwrap();
        let p: PriorConfig = serde_json::from_str("{}").unwrap();
        assert_eq!((p.c, p.depth, p.nhead), (1280, 16, 16));
        let t: ClipTextConfig = serde_json::from_str(r#"{"hidden_act": "gelu"}"#).unwrap();
        assert_eq!(t.hidden_act, Activation::Gelu);
    }

    #[test]
    fn impossible_configs_are_rejected() {
        let c = DecoderConfig {
            nhead: vec![-1, 3, 20, 20], // 640 % 3 != 0
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let e = serde_json::from_str::<DecoderConfig>(r#"{"level_config": ["CT", "CTX"]}"#).unwrap_err();
        assert!(e.to_string().contains("\"CTX\": unknown block type 'X'"), "{e}");
        let c: DecoderConfig = serde_json::from_str(r#"{"level_config": ["CT", "ATC", "", "CCA"]}"#).unwrap();
        assert_eq!(
            c.level_blocks(1),
            [BlockKind::Attn, BlockKind::Timestep, BlockKind::Res]
        );
        assert!(c.level_blocks(2).is_empty());
        assert_eq!(
            serde_json::to_value(&c).unwrap()["level_config"],
            serde_json::json!(["CT", "ATC", "", "CCA"])
        );
        let mut c = DecoderConfig::default();
        c.blocks.pop();
        assert!(c.validate().is_err());
        let p = PriorConfig {
            nhead: 7,
            ..Default::default()
        };
        assert!(p.validate().is_err());
        assert!(serde_json::from_str::<ClipTextConfig>(r#"{"hidden_act": "relu"}"#).is_err());
        let v = VqganConfig {
            embed_dim: 1,
            ..Default::default()
        };
        assert!(v.validate().is_err());
    }

    #[test]
    fn vqgan_levels_and_scale() {
        let v = VqganConfig::default();
        assert_eq!(v.c_levels(), vec![192, 384]);
        assert_eq!(v.upscale(), 4);
    }
}
