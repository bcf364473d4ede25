//! Stage B, the decoder (diffusers `WuerstchenDiffNeXt`): a U-Net over the VQGAN latent,
//! conditioned on the prior's image embedding ("effnet", resized to every level that injects
//! it) and on the text.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::common::{
    channel_norm, patchify, r_embedding, AttnBlock, CondKv, Linear, PatchConvTranspose, ResBlock, TimestepBlock,
    NORM_EPS,
};
use crate::config::{BlockKind, DecoderConfig};
use crate::ops::{self, nchw_to_nhwc, nhwc_to_nchw, pixel_shuffle, pixel_unshuffle, resize_bicubic_antialias};

#[derive(Debug, Clone)]
enum Block {
    Res(ResBlock),
    Timestep(TimestepBlock),
    Attn(AttnBlock),
}

#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<Block>,
    /// Maps the resized effnet to `c_cond` channels for this level's ResBlocks.
    effnet_mapper: Option<Linear>,
}

#[derive(Debug, Clone)]
pub struct WuerstchenDiffNeXt {
    clip_mapper: Linear,
    embedding: Linear,
    /// Down path, finest level first; `downsamplers[i]` runs before `down[i]` (none for 0).
    down: Vec<Level>,
    downsamplers: Vec<Option<Linear>>,
    /// Up path, coarsest level first; `upsamplers[u]` runs after `up[u]` (none for the last).
    up: Vec<Level>,
    upsamplers: Vec<Option<PatchConvTranspose>>,
    clf: Linear,
    patch_size: usize,
    c_out: usize,
    c_r: usize,
}

/// Everything that depends only on the image embedding and the text, computed once per
/// image rather than once per step: each ResBlock's term for the effnet it is injected
/// with, and each attention block's keys and values of the text.
#[derive(Debug, Clone)]
pub struct DecoderCond {
    /// per down level, then per up level: per block, the effnet's contribution to a ResBlock's
    /// first linear layer (None for other blocks and levels without effnet)
    effnet_terms: Vec<Vec<Option<Tensor>>>,
    /// per down level, then per up level: one entry per AttnBlock, in order
    attn_kv: Vec<Vec<CondKv>>,
}

impl super::BatchConditioning for DecoderCond {
    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let effnet_terms = self
            .effnet_terms
            .iter()
            .map(|level| {
                level
                    .iter()
                    .map(|t| t.as_ref().map(|t| t.narrow(0, start, len)).transpose())
                    .collect()
            })
            .collect::<Result<_>>()?;
        let attn_kv = self
            .attn_kv
            .iter()
            .map(|level| level.iter().map(|kv| kv.narrow(start, len)).collect())
            .collect::<Result<_>>()?;
        Ok(Self { effnet_terms, attn_kv })
    }
}

fn load_level(
    cfg: &DecoderConfig,
    i: usize,
    up: bool,
    effnet_mapper: Option<Linear>,
    vb: &VarBuilder,
) -> Result<Level> {
    let c = cfg.c_hidden[i];
    let kinds = cfg.level_blocks(i);
    let inject = if cfg.inject_effnet[i] { cfg.c_cond } else { 0 };
    let last = cfg.levels() - 1;
    // the down path has its downsampler at index 0 of the ModuleList for i > 0
    let offset = usize::from(!up && i > 0);
    let mut blocks = Vec::new();
    for j in 0..cfg.blocks[i] {
        for (k, kind) in kinds.iter().enumerate() {
            let vb = vb.pp((offset + blocks.len()).to_string());
            blocks.push(match kind {
                BlockKind::Res => {
                    // skips in torch's order: the down path's output (first block of an up
                    // level only), then the effnet
                    let from_down = (up && i < last && j == 0 && k == 0).then_some(c);
                    let skips: Vec<usize> = from_down.into_iter().chain((inject > 0).then_some(inject)).collect();
                    Block::Res(ResBlock::load(c, &skips, cfg.kernel_size, vb)?)
                }
                BlockKind::Timestep => Block::Timestep(TimestepBlock::load(c, cfg.c_r, vb)?),
                BlockKind::Attn => Block::Attn(AttnBlock::load(c, cfg.c_cond, cfg.nhead[i] as usize, vb)?),
            });
        }
    }
    Ok(Level { blocks, effnet_mapper })
}

impl WuerstchenDiffNeXt {
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.levels();
        let p = cfg.patch_size;
        // effnet_mappers: one slot per down level then per up level (None where not injected)
        let mapper = |slot: usize, inject: bool| -> Result<Option<Linear>> {
            inject
                .then(|| {
                    Linear::load_conv1x1(
                        cfg.effnet_embd,
                        cfg.c_cond,
                        true,
                        vb.pp(format!("effnet_mappers.{slot}")),
                    )
                })
                .transpose()
        };
        let mut down = Vec::with_capacity(n);
        let mut downsamplers = Vec::with_capacity(n);
        for i in 0..n {
            let vb_level = vb.pp(format!("down_blocks.{i}"));
            downsamplers.push(
                (i > 0)
                    .then(|| Linear::load_patch_conv(cfg.c_hidden[i - 1], cfg.c_hidden[i], 2, vb_level.pp("0.1")))
                    .transpose()?,
            );
            down.push(load_level(cfg, i, false, mapper(i, cfg.inject_effnet[i])?, &vb_level)?);
        }
        let mut up = Vec::with_capacity(n);
        let mut upsamplers = Vec::with_capacity(n);
        for u in 0..n {
            let i = n - 1 - u;
            let vb_level = vb.pp(format!("up_blocks.{u}"));
            let level = load_level(cfg, i, true, mapper(n + u, cfg.inject_effnet[i])?, &vb_level)?;
            let at = level.blocks.len().to_string();
            upsamplers.push(
                (i > 0)
                    .then(|| PatchConvTranspose::load(cfg.c_hidden[i], cfg.c_hidden[i - 1], 2, vb_level.pp(at).pp("1")))
                    .transpose()?,
            );
            up.push(level);
        }
        Ok(Self {
            clip_mapper: Linear::load(cfg.clip_embd, cfg.c_cond, vb.pp("clip_mapper"))?,
            embedding: Linear::load_conv1x1(cfg.c_in * p * p, cfg.c_hidden[0], true, vb.pp("embedding.1"))?,
            down,
            downsamplers,
            up,
            upsamplers,
            clf: Linear::load_conv1x1(cfg.c_hidden[0], 2 * cfg.c_out * p * p, true, vb.pp("clf.1"))?,
            patch_size: p,
            c_out: cfg.c_out,
            c_r: cfg.c_r,
        })
    }

    /// The spatial size of each down level's activations for a latent of `(h, w)`.
    fn level_sizes(&self, (h, w): (usize, usize)) -> Vec<(usize, usize)> {
        (0..self.down.len())
            .map(|i| ((h / self.patch_size) >> i, (w / self.patch_size) >> i))
            .collect()
    }

    /// `effnet`: (N, effnet_embd, h, w) image embeddings, `clip`: (N, 77, clip_embd) text;
    /// `latent_size`: the (H, W) of the latents this conditioning will be used with.
    pub fn condition(&self, effnet: &Tensor, clip: &Tensor, latent_size: (usize, usize)) -> Result<DecoderCond> {
        let clip = ops::layer_norm(&self.clip_mapper.forward(clip)?, NORM_EPS, None)?;
        let sizes = self.level_sizes(latent_size);
        let n = sizes.len();
        let levels = self
            .down
            .iter()
            .enumerate()
            .chain(self.up.iter().enumerate().map(|(u, l)| (n - 1 - u, l)));
        let mut effnet_terms = Vec::with_capacity(2 * n);
        let mut attn_kv = Vec::with_capacity(2 * n);
        for (i, level) in levels {
            let effnet_c = level
                .effnet_mapper
                .as_ref()
                .map(|m| m.forward(&nchw_to_nhwc(&resize_bicubic_antialias(effnet, sizes[i])?)?))
                .transpose()?;
            let mut terms = Vec::with_capacity(level.blocks.len());
            let mut kvs = Vec::new();
            for block in &level.blocks {
                terms.push(match (block, &effnet_c) {
                    // the effnet is the last skip part; the level's first block may have the
                    // down path's output before it
                    (Block::Res(res), Some(e)) => Some(res.skip_term(res.skip_parts() - 1, e)?),
                    _ => None,
                });
                if let Block::Attn(a) = block {
                    kvs.push(a.map_cond(&clip)?);
                }
            }
            effnet_terms.push(terms);
            attn_kv.push(kvs);
        }
        Ok(DecoderCond { effnet_terms, attn_kv })
    }

    fn run_level(
        level: &Level,
        mut x: Tensor,
        r_embed: &Tensor,
        effnet_terms: &[Option<Tensor>],
        kv: &[CondKv],
        mut from_down: Option<Tensor>,
    ) -> Result<Tensor> {
        let mut kv = kv.iter();
        for (block, effnet_term) in level.blocks.iter().zip(effnet_terms) {
            // the down path's output goes to the level's first block only (when it is a ResBlock)
            let from_down = from_down.take();
            x = match block {
                Block::Res(res) => {
                    let terms = match (from_down, effnet_term) {
                        (Some(d), Some(e)) => Some((res.skip_term(0, &d)? + e)?),
                        (Some(d), None) => Some(res.skip_term(0, &d)?),
                        (None, e) => e.clone(),
                    };
                    res.forward(&x, terms.as_ref())?
                }
                Block::Timestep(t) => t.forward(&x, r_embed)?,
                Block::Attn(a) => {
                    let kv = kv.next().ok_or_else(|| {
                        candle_core::Error::Msg("decoder: conditioning does not match the blocks".into())
                    })?;
                    a.forward(&x, kv)?
                }
            };
        }
        Ok(x)
    }

    /// `x`: (N, c_in, H, W) noisy latents, `r`: (N,) noise ratios -> predicted noise, NCHW.
    pub fn forward(&self, x: &Tensor, r: &Tensor, cond: &DecoderCond) -> Result<Tensor> {
        let r_embed = r_embedding(r, self.c_r, x.dtype())?;
        let n = self.down.len();
        let mut h = channel_norm(
            &self
                .embedding
                .forward(&pixel_unshuffle(&nchw_to_nhwc(x)?, self.patch_size)?)?,
        )?;
        let mut level_outputs = Vec::with_capacity(n);
        for (i, level) in self.down.iter().enumerate() {
            if let Some(down) = &self.downsamplers[i] {
                h = down.forward(&patchify(&channel_norm(&h)?, 2)?)?;
            }
            h = Self::run_level(level, h, &r_embed, &cond.effnet_terms[i], &cond.attn_kv[i], None)?;
            level_outputs.push(h.clone());
        }
        for (u, level) in self.up.iter().enumerate() {
            let from_down = (u > 0).then(|| level_outputs[n - 1 - u].clone());
            h = Self::run_level(
                level,
                h,
                &r_embed,
                &cond.effnet_terms[n + u],
                &cond.attn_kv[n + u],
                from_down,
            )?;
            if let Some(upsample) = &self.upsamplers[u] {
                h = upsample.forward(&channel_norm(&h)?)?;
            }
        }
        let ab = self.clf.forward(&channel_norm(&h)?)?;
        let ab = nhwc_to_nchw(&pixel_shuffle(&ab, self.patch_size)?)?;
        let a = ab.narrow(1, 0, self.c_out)?;
        // b = sigmoid(b) * (1 - 2 eps) + eps, eps = 1e-3
        let b = candle_nn::ops::sigmoid(&ab.narrow(1, self.c_out, self.c_out)?)?.affine(1.0 - 2e-3, 1e-3)?;
        (x - a)? / b
    }
}
