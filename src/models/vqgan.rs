//! Stage A, the VQGAN decoder (diffusers `PaellaVQModel.decode` with `force_not_quantize`):
//! latents -> RGB. Only the decoder half is loaded; the pipeline never encodes.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::common::{channel_norm, Linear};
use crate::config::VqganConfig;
use crate::ops::{nchw_to_nhwc, nhwc_to_nchw, pixel_shuffle, ConvTranspose2d, DepthwiseConv, Padding};

/// Paella's MixingResidualBlock: norm-modulate-depthwise and norm-modulate-MLP residuals,
/// scaled by six learned scalars.
#[derive(Debug, Clone)]
struct MixingResidualBlock {
    depthwise: DepthwiseConv,
    lin1: Linear,
    lin2: Linear,
    gammas: [f64; 6],
}

impl MixingResidualBlock {
    fn load(c: usize, embed: usize, vb: VarBuilder) -> Result<Self> {
        let g: Vec<f32> = vb.get(6, "gammas")?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let mut gammas = [0f64; 6];
        for (dst, src) in gammas.iter_mut().zip(g) {
            *dst = src as f64;
        }
        Ok(Self {
            depthwise: DepthwiseConv::new(c, 3, Padding::Replicate, vb.pp("depthwise.1"))?,
            lin1: Linear::load(c, embed, vb.pp("channelwise.0"))?,
            lin2: Linear::load(embed, c, vb.pp("channelwise.2"))?,
            gammas,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = &self.gammas;
        let t = channel_norm(x)?.affine(1.0 + g[0], g[1])?;
        let x = (x + (self.depthwise.forward(&t)? * g[2])?)?;
        let t = channel_norm(&x)?.affine(1.0 + g[3], g[4])?;
        let gelu = crate::ops::Then {
            gelu: true,
            ..Default::default()
        };
        let mlp = self.lin2.forward(&self.lin1.forward_then(&t, gelu)?)?;
        x + (mlp * g[5])?
    }
}

#[derive(Debug, Clone)]
enum UpBlock {
    Mix(MixingResidualBlock),
    /// `ConvTranspose2d(c, c/2, 4, stride 2, padding 1)`
    Upsample(ConvTranspose2d),
}

#[derive(Debug, Clone)]
pub struct PaellaVqDecoder {
    latent_in: Linear,
    up: Vec<UpBlock>,
    out: Linear,
    scale: usize,
    scale_factor: f64,
}

impl PaellaVqDecoder {
    pub fn new(cfg: &VqganConfig, vb: VarBuilder) -> Result<Self> {
        let c_levels = cfg.c_levels();
        let levels = cfg.levels;
        let ups = vb.pp("up_blocks");
        let latent_in = Linear::load_conv1x1(cfg.latent_channels, c_levels[levels - 1], true, ups.pp("0.0"))?;
        let mut up = Vec::new();
        for i in 0..levels {
            let c = c_levels[levels - 1 - i];
            let repeats = if i == 0 { cfg.bottleneck_blocks } else { 1 };
            for _ in 0..repeats {
                up.push(UpBlock::Mix(MixingResidualBlock::load(c, c * 4, ups.pp(up.len() + 1))?));
            }
            if i < levels - 1 {
                let c_next = c_levels[levels - 2 - i];
                let conv = ConvTranspose2d::load(c, c_next, 4, 2, 1, ups.pp(up.len() + 1))?;
                up.push(UpBlock::Upsample(conv));
            }
        }
        let f = cfg.up_down_scale_factor;
        Ok(Self {
            latent_in,
            up,
            out: Linear::load_conv1x1(c_levels[0], cfg.out_channels * f * f, true, vb.pp("out_block.0"))?,
            scale: f,
            scale_factor: cfg.scale_factor,
        })
    }

    /// The factor the pipeline multiplies latents by before decoding (`config.scale_factor`).
    pub fn scale_factor(&self) -> f64 {
        self.scale_factor
    }

    /// `latents`: (N, latent_channels, h, w), already scaled -> (N, 3, H, W), not clamped.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut x = self.latent_in.forward(&nchw_to_nhwc(latents)?)?;
        for block in &self.up {
            x = match block {
                UpBlock::Mix(m) => m.forward(&x)?,
                UpBlock::Upsample(conv) => conv.forward(&x)?,
            };
        }
        nhwc_to_nchw(&pixel_shuffle(&self.out.forward(&x)?, self.scale)?)
    }
}
