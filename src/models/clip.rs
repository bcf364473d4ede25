//! The CLIP text encoder with transformers' `CLIPTextModel` semantics, built from its
//! config.json: pre-norm transformer, causal mask plus a mask on padding keys,
//! `last_hidden_state` after the final layer norm for every position. Stable Cascade's
//! `CLIPTextModelWithProjection` also gives the last layer's states before that norm
//! (`hidden_states[-1]`) and the projected pooled state (`text_embeds`): [`ClipTextModel::encode`].
//!
//! candle-transformers' CLIP is not used: its sizes come from hard-coded presets (the
//! config fields are private) and it masks every row after one shared position instead of
//! each prompt's own padding.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::common::Linear;
use crate::config::{Activation, ClipTextConfig, ClipVisionConfig};
use crate::ops;

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, self.eps, Some((&self.weight, &self.bias)))
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    /// `vb` at `encoder.layers.{i}`; `d` the hidden size, `inner` the MLP's.
    fn load(d: usize, inner: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("self_attn");
        Ok(Self {
            norm1: LayerNorm::load(d, eps, vb.pp("layer_norm1"))?,
            q: Linear::load(d, d, attn.pp("q_proj"))?,
            k: Linear::load(d, d, attn.pp("k_proj"))?,
            v: Linear::load(d, d, attn.pp("v_proj"))?,
            out: Linear::load(d, d, attn.pp("out_proj"))?,
            norm2: LayerNorm::load(d, eps, vb.pp("layer_norm2"))?,
            fc1: Linear::load(d, inner, vb.pp("mlp.fc1"))?,
            fc2: Linear::load(inner, d, vb.pp("mlp.fc2"))?,
        })
    }
}

impl EncoderLayer {
    /// `vb`'s `encoder.layers.0` .. `encoder.layers.{n - 1}`.
    fn load_all(n: usize, d: usize, inner: usize, eps: f64, vb: &VarBuilder) -> Result<Vec<Self>> {
        (0..n)
            .map(|i| Self::load(d, inner, eps, vb.pp(format!("encoder.layers.{i}"))))
            .collect()
    }
}

/// transformers' `CLIPEncoder`: `x` (N, L, d) through every layer (pre-norm attention and
/// MLP, each with a residual add); `attn_mask` additive, (N, 1, L, L) in f32, or none.
fn encoder_forward(
    layers: &[EncoderLayer],
    mut x: Tensor,
    heads: usize,
    activation: Activation,
    attn_mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, l, d) = x.dims3()?;
    let hd = d / heads;
    for layer in layers {
        let h = layer.norm1.forward(&x)?;
        let split = |t: Tensor| t.reshape((n, l, heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split(layer.q.forward(&h)?)?;
        let k = split(layer.k.forward(&h)?)?;
        let v = split(layer.v.forward(&h)?)?;
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?.to_dtype(DType::F32)?;
        let scores = match attn_mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, l, d))?;
        x = (x + layer.out.forward(&a)?)?;
        let h = layer.fc1.forward(&layer.norm2.forward(&x)?)?;
        let h = match activation {
            Activation::Gelu => ops::gelu_erf(&h)?,
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
        };
        x = (x + layer.fc2.forward(&h)?)?;
    }
    Ok(x)
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias), where the file has one
    projection: Option<Linear>,
    heads: usize,
    activation: Activation,
    eos_token_id: i64,
}

/// What `CLIPTextModelWithProjection(..., output_hidden_states=True)` returns and Stable
/// Cascade uses.
#[derive(Debug, Clone)]
pub struct ClipOutputs {
    /// `hidden_states[-1]`: the last layer's output before the final norm, (N, L, hidden)
    pub hidden_states: Tensor,
    /// `text_embeds`: the final-normed state at each prompt's EOS, projected, (N, projection_dim)
    pub text_embeds: Tensor,
}

impl ClipTextModel {
    /// `vb` at the text encoder's root. Accepts both key layouts: transformers 4 (the Hub's
    /// files) prefixes every key with `text_model.`, transformers 5 does not.
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let projection = vb
            .contains_tensor("text_projection.weight")
            .then(|| -> Result<Linear> {
                let weight = vb.get((cfg.projection_dim, cfg.hidden_size), "text_projection.weight")?;
                Ok(Linear::new(weight, None))
            })
            .transpose()?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let d = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = EncoderLayer::load_all(cfg.num_hidden_layers, d, cfg.intermediate_size, cfg.layer_norm_eps, &vb)?;
        Ok(Self {
            token_embedding: Embedding::new(emb.get((cfg.vocab_size, d), "token_embedding.weight")?, d),
            position_embedding: emb.get((cfg.max_position_embeddings, d), "position_embedding.weight")?,
            layers,
            final_norm: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            projection,
            heads: cfg.num_attention_heads,
            activation: cfg.hidden_act,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Causal mask plus padding keys, additive, (N, 1, L, L) in f32.
    fn attention_mask(mask: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let n = mask.len();
        let l = mask.first().map_or(0, Vec::len);
        let mut m = vec![0f32; n * l * l];
        for (b, row) in mask.iter().enumerate() {
            for i in 0..l {
                for j in 0..l {
                    if j > i || row[j] == 0 {
                        m[(b * l + i) * l + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(m, (n, 1, l, l), device)
    }

    /// `ids`, `mask`: one row per prompt (equal lengths, at most max_position_embeddings)
    /// -> `last_hidden_state` (N, L, hidden).
    pub fn forward(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor> {
        self.final_norm.forward(&self.layers_forward(ids, mask)?)
    }

    /// `hidden_states[-1]` and `text_embeds` (see [`ClipOutputs`]); needs the projection.
    pub fn encode(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<ClipOutputs> {
        let Some(projection) = &self.projection else {
            candle_core::bail!("clip: the text encoder has no text_projection (not a CLIPTextModelWithProjection)");
        };
        let hidden_states = self.layers_forward(ids, mask)?;
        let normed = self.final_norm.forward(&hidden_states)?;
        let pooled = ids
            .iter()
            .enumerate()
            .map(|(b, row)| normed.get(b)?.get(self.pooled_position(row)))
            .collect::<Result<Vec<_>>>()?;
        let text_embeds = projection.forward(&Tensor::stack(&pooled, 0)?)?;
        Ok(ClipOutputs {
            hidden_states,
            text_embeds,
        })
    }

    /// Where transformers takes `pooler_output`: with the legacy `eos_token_id` 2 the first
    /// highest id (CLIP's EOS is its last token), else the first `eos_token_id`.
    fn pooled_position(&self, row: &[u32]) -> usize {
        let first = |found: Option<usize>| found.unwrap_or(0);
        if self.eos_token_id == 2 {
            let max = row.iter().copied().max().unwrap_or(0);
            first(row.iter().position(|&id| id == max))
        } else {
            first(row.iter().position(|&id| i64::from(id) == self.eos_token_id))
        }
    }

    /// The embeddings through every encoder layer, before the final norm.
    fn layers_forward(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.position_embedding.device();
        let n = ids.len();
        let l = ids.first().map_or(0, Vec::len);
        if mask.len() != n || ids.iter().chain(mask).any(|r| r.len() != l) {
            candle_core::bail!("clip: ids and attention mask rows must all have the same length");
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (n, l), device)?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let x = self.token_embedding.forward(&ids)?.broadcast_add(&pos)?;
        let attn_mask = Self::attention_mask(mask, device)?;
        encoder_forward(&self.layers, x, self.heads, self.activation, Some(&attn_mask))
    }
}

/// transformers' `CLIPVisionModelWithProjection`, built from its config.json: the image cut
/// into patches (a stride-`patch_size` convolution without bias), a class token in front,
/// position embeddings, `pre_layrnorm`, the encoder without a mask, then the class token's
/// state through `post_layernorm` and `visual_projection` (no bias): `image_embeds`.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    /// the patch convolution's weight as a matrix, (hidden, channels * patch * patch)
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    projection: Linear,
    cfg: ClipVisionConfig,
}

impl ClipVisionModel {
    /// `vb` at the image encoder's root (keys `vision_model.*` and `visual_projection.weight`).
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let projection = Linear::new(vb.get((cfg.projection_dim, d), "visual_projection.weight")?, None);
        let vb = vb.pp("vision_model");
        let emb = vb.pp("embeddings");
        let layers = EncoderLayer::load_all(cfg.num_hidden_layers, d, cfg.intermediate_size, cfg.layer_norm_eps, &vb)?;
        Ok(Self {
            patch_weight: emb
                .get((d, c, p, p), "patch_embedding.weight")?
                .reshape((d, c * p * p))?,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb.get((cfg.positions(), d), "position_embedding.weight")?,
            pre_norm: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            post_norm: LayerNorm::load(d, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            projection,
            cfg: cfg.clone(),
        })
    }

    /// `pixel_values` (N, channels, image_size, image_size) -> `image_embeds` (N, projection_dim).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (p, side) = (self.cfg.patch_size, self.cfg.image_size);
        let (n, c, h, w) = pixel_values.dims4()?;
        if (c, h, w) != (self.cfg.num_channels, side, side) {
            candle_core::bail!(
                "clip vision: the input is {c}x{h}x{w}, this model takes {}x{side}x{side}",
                self.cfg.num_channels
            );
        }
        let g = side / p;
        // the convolution as a product: each patch's values in (channel, row, column) order,
        // the order of the weight's last three axes
        let patches = pixel_values
            .to_dtype(self.patch_weight.dtype())?
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n, g * g, c * p * p))?;
        let patch_embeds = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let d = self.cfg.hidden_size;
        let class = self.class_embedding.reshape((1, 1, d))?.broadcast_as((n, 1, d))?;
        let x = Tensor::cat(&[&class, &patch_embeds], 1)?.broadcast_add(&self.position_embedding)?;
        let x = self.pre_norm.forward(&x)?;
        let heads = self.cfg.num_attention_heads;
        let x = encoder_forward(&self.layers, x, heads, self.cfg.hidden_act, None)?;
        let pooled = self.post_norm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        self.projection.forward(&pooled)
    }
}
