//! Stage A, the VQGAN decoder (diffusers `PaellaVQModel.decode` with `force_not_quantize`):
//! latents -> RGB. Only the decoder half is loaded; the pipeline never encodes.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::common::{channel_norm, Linear, NORM_EPS};
use crate::config::VqganConfig;
use crate::ops::{self, nchw_to_nhwc, nhwc_to_nchw, pixel_shuffle, ConvTranspose2d, DepthwiseConv, Padding};

/// Paella's MixingResidualBlock: norm-modulate-depthwise and norm-modulate-MLP residuals,
/// scaled by six learned scalars:
/// `x += depthwise(norm(x) * (1 + g0) + g1) * g2`, then `x += mlp(norm(x) * (1 + g3) + g4) * g5`.
#[derive(Debug, Clone)]
struct MixingResidualBlock {
    depthwise: DepthwiseConv,
    lin1: Linear,
    lin2: Linear,
    gammas: [f64; 6],
    /// per norm, `(1 + g0, g1)` and `(1 + g3, g4)` as the layer norm's per-channel weight and
    /// bias (f32), so that f32 modulates in the norm's pass
    modulations: [(Tensor, Tensor); 2],
}

impl MixingResidualBlock {
    fn load(c: usize, embed: usize, vb: VarBuilder) -> Result<Self> {
        let g: Vec<f32> = vb.get(6, "gammas")?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let mut gammas = [0f64; 6];
        for (dst, src) in gammas.iter_mut().zip(g) {
            *dst = src as f64;
        }
        // `affine` rounds its f64 factors to the tensor's dtype: the same f32 values here
        let per_channel = |v: f64| Tensor::full(v as f32, c, vb.device());
        let modulations = [
            (per_channel(1.0 + gammas[0])?, per_channel(gammas[1])?),
            (per_channel(1.0 + gammas[3])?, per_channel(gammas[4])?),
        ];
        Ok(Self {
            depthwise: DepthwiseConv::new(c, 3, Padding::Replicate, vb.pp("depthwise.1"))?,
            lin1: Linear::load(c, embed, vb.pp("channelwise.0"))?,
            lin2: Linear::load(embed, c, vb.pp("channelwise.2"))?,
            gammas,
            modulations,
        })
    }

    /// `norm(x) * (1 + g[3i]) + g[3i + 1]`: in f32 in the norm's own pass (`n * w + b`, the
    /// same bits as the separate `affine`); half precision rounds the norm first, as torch does.
    fn modulated_norm(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let g = &self.gammas;
        if x.dtype() == DType::F32 {
            let (w, b) = &self.modulations[i];
            ops::layer_norm(x, NORM_EPS, Some((w, b)))
        } else {
            channel_norm(x)?.affine(1.0 + g[3 * i], g[3 * i + 1])
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = &self.gammas;
        let x = self.depthwise.forward_residual(&self.modulated_norm(x, 0)?, g[2], x)?;
        let gelu = ops::Then {
            gelu: true,
            ..Default::default()
        };
        let h = self.lin1.forward_then(&self.modulated_norm(&x, 1)?, gelu)?;
        // x + mlp * g5, scaled and added in the product's pass
        let mlp_then = ops::Then {
            scale: Some(g[5]),
            residual: Some(&x),
            ..Default::default()
        };
        self.lin2.forward_then(&h, mlp_then)
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
