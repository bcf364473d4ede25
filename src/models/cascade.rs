//! Stable Cascade's U-Net (diffusers `StableCascadeUNet`, unet_stable_cascade.py): stage C,
//! the prior, and stage B, the decoder, are both this network, built entirely from its
//! config.json. Its blocks are Würstchen's (`common.rs`); what is new is the conditioning
//! (pooled text, text and image embeddings; effnet and pixel maps added to the embedding),
//! timestep conditions beside the noise ratio, repeated block lists with 1x1 convs between
//! them, and level transitions that may resize bilinearly.
//!
//! Activations are channels-last (N, H, W, C), as everywhere in `models`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::common::{
    channel_norm, patchify, r_embedding, AttnBlock, CondKv, Linear, PatchConvTranspose, ResBlock, TimestepBlock,
};
use crate::config::{CascadeBlock, CascadeUNetConfig};
use crate::ops::{self, nchw_to_nhwc, nhwc_to_nchw, pixel_shuffle, pixel_unshuffle, resize_bilinear_nhwc};

#[derive(Debug, Clone)]
enum Block {
    Res(ResBlock),
    Timestep(TimestepBlock),
    Attn(AttnBlock),
}

/// One level of the down or up path: its block list, run `1 + repeat_mappers.len()` times
/// with a 1x1 conv between runs.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<Block>,
    repeat_mappers: Vec<Linear>,
}

/// The transition between two levels (after a channel norm).
#[derive(Debug, Clone)]
enum Resample {
    /// `Conv2d(k=2, stride=2)`, as a linear layer over 2x2 patches
    StridedConv(Linear),
    /// `ConvTranspose2d(k=2, stride=2)`
    TransposedConv(PatchConvTranspose),
    /// `UpDownBlock2d`: a 1x1 conv and, where the switch level is on, a bilinear resize by 2
    /// (down: conv then resize; up: resize then conv)
    Switch { conv: Linear, resize: bool, up: bool },
}

impl Resample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = channel_norm(x)?;
        match self {
            Self::StridedConv(conv) => {
                // the conv drops an odd last row or column
                let (_, h, w, _) = x.dims4()?;
                conv.forward(&patchify(&x.narrow(1, 0, h / 2 * 2)?.narrow(2, 0, w / 2 * 2)?, 2)?)
            }
            Self::TransposedConv(conv) => conv.forward(&x),
            Self::Switch { conv, resize, up } => {
                let resized = |x: &Tensor| -> Result<Tensor> {
                    let (_, h, w, _) = x.dims4()?;
                    match (resize, up) {
                        (false, _) => Ok(x.clone()),
                        (true, true) => resize_bilinear_nhwc(x, (h * 2, w * 2)),
                        (true, false) => resize_bilinear_nhwc(x, (h / 2, w / 2)),
                    }
                };
                if *up {
                    conv.forward(&resized(&x)?)
                } else {
                    resized(&conv.forward(&x)?)
                }
            }
        }
    }
}

/// `Conv2d(c_in, 4c, 1), GELU, Conv2d(4c, c, 1), LayerNorm`: the effnet and pixel mappers.
#[derive(Debug, Clone)]
struct MapperMlp {
    expand: Linear,
    project: Linear,
}

impl MapperMlp {
    fn load(c_in: usize, c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            expand: Linear::load_conv1x1(c_in, 4 * c, true, vb.pp("0"))?,
            project: Linear::load_conv1x1(4 * c, c, true, vb.pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let then = ops::Then {
            gelu: true,
            ..Default::default()
        };
        channel_norm(&self.project.forward(&self.expand.forward_then(x, then)?)?)
    }
}

/// What stays the same over the sampling steps: the attention blocks' keys and values of the
/// conditioning, and the term the effnet and pixel maps add to the embedding.
#[derive(Debug, Clone)]
pub struct CascadeCond {
    /// per down level, then per up level: one entry per attention block, in order
    attn_kv: Vec<Vec<CondKv>>,
    /// (N, h, w, c0) at the embedding's size, or `None` without effnet and pixel mappers
    embedding_term: Option<Tensor>,
}

impl super::BatchConditioning for CascadeCond {
    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let attn_kv = self
            .attn_kv
            .iter()
            .map(|level| level.iter().map(|kv| kv.narrow(start, len)).collect())
            .collect::<Result<_>>()?;
        let embedding_term = self
            .embedding_term
            .as_ref()
            .map(|t| t.narrow(0, start, len))
            .transpose()?;
        Ok(Self {
            attn_kv,
            embedding_term,
        })
    }
}

/// The conditioning inputs of one forward pass, NCHW / (N, L, C) as diffusers takes them.
#[derive(Debug, Clone, Copy, Default)]
pub struct CascadeInputs<'a> {
    /// (N, L, clip_text_pooled_in_channels)
    pub clip_text_pooled: Option<&'a Tensor>,
    /// (N, L, clip_text_in_channels); used together with `clip_img`
    pub clip_text: Option<&'a Tensor>,
    /// (N, L, clip_image_in_channels)
    pub clip_img: Option<&'a Tensor>,
    /// (N, effnet_in_channels, h, w)
    pub effnet: Option<&'a Tensor>,
}

#[derive(Debug, Clone)]
pub struct StableCascadeUNet {
    cfg: CascadeUNetConfig,
    clip_txt_pooled_mapper: Linear,
    clip_txt_mapper: Option<Linear>,
    clip_img_mapper: Option<Linear>,
    embedding: Linear,
    effnet_mapper: Option<MapperMlp>,
    pixels_mapper: Option<MapperMlp>,
    /// finest level first; `downscalers[i]` runs before `down[i]` (none for level 0)
    down: Vec<Level>,
    downscalers: Vec<Option<Resample>>,
    /// coarsest level first; `upscalers[u]` runs after `up[u]` (none for the finest)
    up: Vec<Level>,
    upscalers: Vec<Option<Resample>>,
    clf: Linear,
}

fn load_level(cfg: &CascadeUNetConfig, i: usize, up: bool, vb: &VarBuilder, mappers: VarBuilder) -> Result<Level> {
    let c = cfg.block_out_channels[i];
    let (layers, repeats) = if up {
        (cfg.up_layers(i), cfg.up_repeats(i))
    } else {
        (cfg.down_num_layers_per_block[i], cfg.down_blocks_repeat_mappers[i])
    };
    let self_attn = cfg.self_attn.at(i).unwrap_or(true);
    let mut blocks = Vec::new();
    for j in 0..layers {
        for (k, kind) in cfg.block_types_per_layer[i].iter().enumerate() {
            let vb = vb.pp(blocks.len().to_string());
            blocks.push(match kind {
                CascadeBlock::Res => {
                    // the up path's first block of a level below the coarsest takes the
                    // down path's output as a skip
                    let skip = up && i + 1 < cfg.levels() && j == 0 && k == 0;
                    let skips: &[usize] = if skip { &[c] } else { &[] };
                    Block::Res(ResBlock::load(c, skips, cfg.kernel_size, vb)?)
                }
                CascadeBlock::Timestep => Block::Timestep(TimestepBlock::load_with_conds(
                    c,
                    cfg.timestep_ratio_embedding_dim,
                    &cfg.timestep_conditioning_type,
                    vb,
                )?),
                CascadeBlock::Attn => {
                    let heads = cfg.num_attention_heads[i] as usize;
                    Block::Attn(AttnBlock::load_with(c, cfg.conditioning_dim, heads, self_attn, vb)?)
                }
            });
        }
    }
    let repeat_mappers = (0..repeats - 1)
        .map(|r| Linear::load_conv1x1(c, c, true, mappers.pp(r.to_string())))
        .collect::<Result<_>>()?;
    Ok(Level { blocks, repeat_mappers })
}

impl StableCascadeUNet {
    pub fn new(cfg: &CascadeUNetConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.levels();
        let ch = &cfg.block_out_channels;
        let (c0, cond, p) = (ch[0], cfg.conditioning_dim, cfg.patch_size);
        let switch = |i: usize| cfg.switch_level.as_ref().map(|s| s[i]);
        let mut down = Vec::with_capacity(n);
        let mut downscalers = Vec::with_capacity(n);
        for i in 0..n {
            let vb_t = vb.pp(format!("down_downscalers.{i}.1"));
            downscalers.push(match (i, switch(i.saturating_sub(1))) {
                (0, _) => None,
                (_, None) => Some(Resample::StridedConv(Linear::load_patch_conv(
                    ch[i - 1],
                    ch[i],
                    2,
                    vb_t,
                )?)),
                (_, Some(resize)) => Some(Resample::Switch {
                    conv: Linear::load_conv1x1(ch[i - 1], ch[i], true, vb_t.pp("blocks.0"))?,
                    resize,
                    up: false,
                }),
            });
            let mappers = vb.pp(format!("down_repeat_mappers.{i}"));
            down.push(load_level(cfg, i, false, &vb.pp(format!("down_blocks.{i}")), mappers)?);
        }
        let mut up = Vec::with_capacity(n);
        let mut upscalers = Vec::with_capacity(n);
        for u in 0..n {
            let i = n - 1 - u;
            let vb_t = vb.pp(format!("up_upscalers.{u}.1"));
            upscalers.push(match (i, switch(i.saturating_sub(1))) {
                (0, _) => None,
                (_, None) => Some(Resample::TransposedConv(PatchConvTranspose::load(
                    ch[i],
                    ch[i - 1],
                    2,
                    vb_t,
                )?)),
                (_, Some(resize)) => Some(Resample::Switch {
                    conv: Linear::load_conv1x1(ch[i], ch[i - 1], true, vb_t.pp("blocks.1"))?,
                    resize,
                    up: true,
                }),
            });
            let mappers = vb.pp(format!("up_repeat_mappers.{u}"));
            up.push(load_level(cfg, i, true, &vb.pp(format!("up_blocks.{u}")), mappers)?);
        }
        let optional = |c_in: Option<usize>, c_out: usize, name: &str| {
            c_in.map(|c_in| Linear::load(c_in, c_out, vb.pp(name))).transpose()
        };
        let mapper =
            |c_in: Option<usize>, name: &str| c_in.map(|c_in| MapperMlp::load(c_in, c0, vb.pp(name))).transpose();
        Ok(Self {
            clip_txt_pooled_mapper: Linear::load(
                cfg.clip_text_pooled_in_channels,
                cond * cfg.clip_seq,
                vb.pp("clip_txt_pooled_mapper"),
            )?,
            clip_txt_mapper: optional(cfg.clip_text_in_channels, cond, "clip_txt_mapper")?,
            clip_img_mapper: optional(cfg.clip_image_in_channels, cond * cfg.clip_seq, "clip_img_mapper")?,
            embedding: Linear::load_conv1x1(cfg.in_channels * p * p, c0, true, vb.pp("embedding.1"))?,
            effnet_mapper: mapper(cfg.effnet_in_channels, "effnet_mapper")?,
            pixels_mapper: mapper(cfg.pixel_mapper_in_channels, "pixels_mapper")?,
            down,
            downscalers,
            up,
            upscalers,
            clf: Linear::load_conv1x1(c0, cfg.out_channels * p * p, true, vb.pp("clf.1"))?,
            cfg: cfg.clone(),
        })
    }

    /// `(N, L, c_in)` through a mapper to `clip_seq` tokens per input token.
    fn map_tokens(&self, mapper: &Linear, x: &Tensor) -> Result<Tensor> {
        let (n, l, _) = x.dims3()?;
        mapper
            .forward(x)?
            .reshape((n, l * self.cfg.clip_seq, self.cfg.conditioning_dim))
    }

    /// The conditioning tokens (`get_clip_embeddings`): the text, pooled text and image tokens
    /// where the model maps text and images and both are given, else the pooled text alone.
    fn clip_tokens(&self, inputs: &CascadeInputs) -> Result<Tensor> {
        let pooled = inputs
            .clip_text_pooled
            .ok_or_else(|| candle_core::Error::Msg("StableCascadeUNet needs clip_text_pooled".into()))?;
        let pooled = self.map_tokens(&self.clip_txt_pooled_mapper, pooled)?;
        let clip = match (
            &self.clip_txt_mapper,
            &self.clip_img_mapper,
            inputs.clip_text,
            inputs.clip_img,
        ) {
            (Some(txt_mapper), Some(img_mapper), Some(txt), Some(img)) => {
                let txt = txt_mapper.forward(txt)?;
                Tensor::cat(&[&txt, &pooled, &self.map_tokens(img_mapper, img)?], 1)?
            }
            _ => pooled,
        };
        ops::layer_norm(&clip, 1e-6, None)
    }

    /// The embedding's (h, w) for a sample of (H, W).
    fn embedding_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        (h / self.cfg.patch_size, w / self.cfg.patch_size)
    }

    /// Everything that depends only on the conditioning, for samples of `sample_size` (H, W).
    pub fn condition(&self, inputs: &CascadeInputs, sample_size: (usize, usize)) -> Result<CascadeCond> {
        let clip = self.clip_tokens(inputs)?;
        let size = self.embedding_size(sample_size);
        let n = clip.dim(0)?;
        let mut term: Option<Tensor> = None;
        let mut add = |t: Tensor| -> Result<()> {
            term = Some(match term.take() {
                Some(sum) => (sum + t)?,
                None => t,
            });
            Ok(())
        };
        if let (Some(mapper), Some(effnet)) = (&self.effnet_mapper, inputs.effnet) {
            add(mapper.forward(&resize_bilinear_nhwc(&nchw_to_nhwc(effnet)?, size)?)?)?;
        }
        if let Some(mapper) = &self.pixels_mapper {
            // diffusers' default `pixels`: zeros of (N, 3, 8, 8)
            let c_in = self.cfg.pixel_mapper_in_channels.unwrap_or(3);
            let pixels = Tensor::zeros((n, 8, 8, c_in), clip.dtype(), clip.device())?;
            add(resize_bilinear_nhwc(&mapper.forward(&pixels)?, size)?)?;
        }
        let levels = self.down.iter().chain(&self.up);
        let attn_kv = levels
            .map(|level| {
                let attn = level.blocks.iter().filter_map(|b| match b {
                    Block::Attn(a) => Some(a),
                    _ => None,
                });
                attn.map(|a| a.map_cond(&clip)).collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        Ok(CascadeCond {
            attn_kv,
            embedding_term: term,
        })
    }

    /// The embedding of the timestep ratio `r` (N,) and of each timestep condition (zeros:
    /// the pipelines pass none), side by side.
    fn r_embed(&self, r: &Tensor, dtype: DType) -> Result<Tensor> {
        let c_r = self.cfg.timestep_ratio_embedding_dim;
        let mut parts = vec![r_embedding(r, c_r, dtype)?];
        for _ in &self.cfg.timestep_conditioning_type {
            parts.push(r_embedding(&r.zeros_like()?, c_r, dtype)?);
        }
        Tensor::cat(&parts, 1)
    }

    /// Runs a level's blocks (`1 + repeat_mappers` times); `skip` goes to the first block
    /// whenever it is a ResBlock, after resizing `x` to the skip's size if they differ.
    fn run_level(
        level: &Level,
        mut x: Tensor,
        r_embed: &Tensor,
        kv: &[CondKv],
        skip: Option<&Tensor>,
    ) -> Result<Tensor> {
        for repeat in 0..=level.repeat_mappers.len() {
            let mut kv = kv.iter();
            for (k, block) in level.blocks.iter().enumerate() {
                x = match block {
                    Block::Res(res) => match skip.filter(|_| k == 0) {
                        Some(skip) => {
                            let (_, h, w, _) = skip.dims4()?;
                            let x = resize_bilinear_nhwc(&x, (h, w))?;
                            match res.skip_parts() {
                                0 => res.forward(&x, None)?,
                                _ => res.forward(&x, Some(&res.skip_term(0, skip)?))?,
                            }
                        }
                        None => res.forward(&x, None)?,
                    },
                    Block::Timestep(t) => t.forward(&x, r_embed)?,
                    Block::Attn(a) => {
                        let kv = kv.next().ok_or_else(|| {
                            candle_core::Error::Msg("StableCascadeUNet: conditioning does not match the blocks".into())
                        })?;
                        a.forward(&x, kv)?
                    }
                };
            }
            if let Some(mapper) = level.repeat_mappers.get(repeat) {
                x = mapper.forward(&x)?;
            }
        }
        Ok(x)
    }

    /// `sample`: (N, in_channels, H, W), `r`: (N,) timestep ratios -> (N, out_channels, H, W).
    pub fn forward(&self, sample: &Tensor, r: &Tensor, cond: &CascadeCond) -> Result<Tensor> {
        let r_embed = self.r_embed(r, sample.dtype())?;
        let p = self.cfg.patch_size;
        let mut x = channel_norm(&self.embedding.forward(&pixel_unshuffle(&nchw_to_nhwc(sample)?, p)?)?)?;
        if let Some(term) = &cond.embedding_term {
            x = (x + term)?;
        }
        let n = self.down.len();
        let mut level_outputs = Vec::with_capacity(n);
        for (i, level) in self.down.iter().enumerate() {
            if let Some(down) = &self.downscalers[i] {
                x = down.forward(&x)?;
            }
            x = Self::run_level(level, x, &r_embed, &cond.attn_kv[i], None)?;
            level_outputs.push(x.clone());
        }
        for (u, level) in self.up.iter().enumerate() {
            let skip = (u > 0).then(|| &level_outputs[n - 1 - u]);
            x = Self::run_level(level, x, &r_embed, &cond.attn_kv[n + u], skip)?;
            if let Some(upscale) = &self.upscalers[u] {
                x = upscale.forward(&x)?;
            }
        }
        let out = self.clf.forward(&channel_norm(&x)?)?;
        nhwc_to_nchw(&pixel_shuffle(&out, p)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// tests/fixtures/cascade-unet: tiny random StableCascadeUNets and diffusers' output for
    /// one forward pass each (tests/fixtures/make_cascade_fixtures.py).
    fn forward_matches_diffusers(name: &str) -> anyhow::Result<f64> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/cascade-unet")
            .join(name);
        let cfg: CascadeUNetConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        cfg.validate(name)?;
        let weights = crate::weights::Weights::open(name, &[dir.join("diffusion_pytorch_model.safetensors")])?;
        let model = StableCascadeUNet::new(&cfg, weights.var_builder(DType::F32, &Device::Cpu))?;
        let t = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
        let inputs = CascadeInputs {
            clip_text_pooled: t.get("clip_text_pooled"),
            clip_text: t.get("clip_text"),
            clip_img: t.get("clip_img"),
            effnet: t.get("effnet"),
        };
        let sample = &t["sample"];
        let (_, _, h, w) = sample.dims4()?;
        let cond = model.condition(&inputs, (h, w))?;
        let got = model.forward(sample, &t["timestep_ratio"], &cond)?;
        let want = &t["output"];
        anyhow::ensure!(
            got.dims() == want.dims(),
            "shape {:?}, expected {:?}",
            got.dims(),
            want.dims()
        );
        // each image alone gets the numbers it gets in the batch (what `split_batch` relies
        // on); a BLAS library's sums follow each call's shape (`WUERSTCHEN_BLAS`)
        let images = if crate::ops::blas::requested().is_some() {
            0
        } else {
            sample.dim(0)?
        };
        for i in 0..images {
            let one = |t: Option<&Tensor>| t.map(|t| t.narrow(0, i, 1)).transpose();
            let (pooled, text, img, effnet) = (
                one(inputs.clip_text_pooled)?,
                one(inputs.clip_text)?,
                one(inputs.clip_img)?,
                one(inputs.effnet)?,
            );
            let alone = CascadeInputs {
                clip_text_pooled: pooled.as_ref(),
                clip_text: text.as_ref(),
                clip_img: img.as_ref(),
                effnet: effnet.as_ref(),
            };
            let cond = model.condition(&alone, (h, w))?;
            let alone = model.forward(&sample.narrow(0, i, 1)?, &t["timestep_ratio"].narrow(0, i, 1)?, &cond)?;
            let (a, b) = (
                alone.flatten_all()?.to_vec1::<f32>()?,
                got.get(i)?.flatten_all()?.to_vec1::<f32>()?,
            );
            anyhow::ensure!(a == b, "image {i} alone differs from image {i} in the batch");
        }
        let err = (&got - want)?.sqr()?.sum_all()?.to_scalar::<f32>()? / want.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok(f64::from(err.sqrt()))
    }

    #[test]
    fn stage_c_shaped_unet_matches_diffusers() -> anyhow::Result<()> {
        let err = forward_matches_diffusers("prior")?;
        assert!(err <= 1e-5, "relative error {err}");
        Ok(())
    }

    #[test]
    fn stage_b_shaped_unet_matches_diffusers() -> anyhow::Result<()> {
        let err = forward_matches_diffusers("decoder")?;
        assert!(err <= 1e-5, "relative error {err}");
        Ok(())
    }

    #[test]
    fn unet_with_plain_switch_levels_and_no_self_attention_matches_diffusers() -> anyhow::Result<()> {
        let err = forward_matches_diffusers("flat")?;
        assert!(err <= 1e-5, "relative error {err}");
        Ok(())
    }
}
