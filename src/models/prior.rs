//! Stage C, the text-conditional prior (diffusers `WuerstchenPrior`): denoises the 16-channel
//! image embedding at 1/42.67 of the image size.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::common::{channel_norm, r_embedding, AttnBlock, CondKv, Linear, ResBlock, TimestepBlock};
use crate::config::PriorConfig;
use crate::ops::{nchw_to_nhwc, nhwc_to_nchw};

#[derive(Debug, Clone)]
struct Block {
    res: ResBlock,
    timestep: TimestepBlock,
    attn: AttnBlock,
}

#[derive(Debug, Clone)]
pub struct WuerstchenPrior {
    projection: Linear,
    cond_in: Linear,
    cond_out: Linear,
    blocks: Vec<Block>,
    out: Linear,
    c_in: usize,
    c_r: usize,
}

/// The text conditioning as each attention block sees it; computed once per prompt.
#[derive(Debug, Clone)]
pub struct PriorCond {
    per_block: Vec<CondKv>,
}

impl super::BatchConditioning for PriorCond {
    fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        let per_block = self
            .per_block
            .iter()
            .map(|kv| kv.narrow(start, len))
            .collect::<Result<_>>()?;
        Ok(Self { per_block })
    }
}

impl WuerstchenPrior {
    pub fn new(cfg: &PriorConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.c;
        let blocks = (0..cfg.depth)
            .map(|i| {
                Ok(Block {
                    res: ResBlock::load(c, &[], 3, vb.pp(format!("blocks.{}", 3 * i)))?,
                    timestep: TimestepBlock::load(c, cfg.c_r, vb.pp(format!("blocks.{}", 3 * i + 1)))?,
                    attn: AttnBlock::load(c, c, cfg.nhead, vb.pp(format!("blocks.{}", 3 * i + 2)))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            projection: Linear::load_conv1x1(cfg.c_in, c, true, vb.pp("projection"))?,
            cond_in: Linear::load(cfg.c_cond, c, vb.pp("cond_mapper.0"))?,
            cond_out: Linear::load(c, c, vb.pp("cond_mapper.2"))?,
            blocks,
            out: Linear::load_conv1x1(c, 2 * cfg.c_in, true, vb.pp("out.1"))?,
            c_in: cfg.c_in,
            c_r: cfg.c_r,
        })
    }

    /// `c`: text encoder hidden states (N, 77, c_cond).
    pub fn condition(&self, c: &Tensor) -> Result<PriorCond> {
        let h = self.cond_in.forward(c)?;
        let c_embed = self.cond_out.forward(&candle_nn::ops::leaky_relu(&h, 0.2)?)?;
        let per_block = self
            .blocks
            .iter()
            .map(|b| b.attn.map_cond(&c_embed))
            .collect::<Result<_>>()?;
        Ok(PriorCond { per_block })
    }

    /// `x`: (N, c_in, h, w) noisy embedding, `r`: (N,) noise ratios -> predicted noise, NCHW.
    pub fn forward(&self, x: &Tensor, r: &Tensor, cond: &PriorCond) -> Result<Tensor> {
        let r_embed = r_embedding(r, self.c_r, x.dtype())?;
        let mut h = self.projection.forward(&nchw_to_nhwc(x)?)?;
        for (block, kv) in self.blocks.iter().zip(&cond.per_block) {
            h = block.res.forward(&h, None)?;
            h = block.timestep.forward(&h, &r_embed)?;
            h = block.attn.forward(&h, kv)?;
        }
        let ab = nhwc_to_nchw(&self.out.forward(&channel_norm(&h)?)?)?;
        let a = ab.narrow(1, 0, self.c_in)?;
        let b = ab.narrow(1, self.c_in, self.c_in)?;
        // (x - a) / (|1 - b| + 1e-5)
        let denom = (b.affine(-1.0, 1.0)?.abs()? + 1e-5)?;
        (x - a)? / denom
    }
}
