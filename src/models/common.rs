//! Layers shared by the prior and the decoder (diffusers' modeling_wuerstchen_common.py),
//! channels-last: activations are (N, H, W, C), so every "1x1 conv" and linear is one matrix
//! product over N*H*W rows and the norms run over the contiguous last dimension.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{self, DepthwiseConv, Padding};

/// LayerNorm eps of every Würstchen block (`WuerstchenLayerNorm(..., eps=1e-6)`).
pub const NORM_EPS: f64 = 1e-6;

/// `nn.Linear` on the last dimension of a tensor of any rank, as one matrix product.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: ops::LinearWeight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: ops::LinearWeight::new(weight),
            bias,
        }
    }

    /// `nn.Linear(c_in, c_out)` at `vb` (keys `weight`, `bias`).
    pub fn load(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(
            vb.get((c_out, c_in), "weight")?,
            Some(vb.get(c_out, "bias")?),
        ))
    }

    /// A 1x1 `nn.Conv2d(c_in, c_out, 1)`, which is a linear layer on channels-last input.
    pub fn load_conv1x1(c_in: usize, c_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((c_out, c_in, 1, 1), "weight")?.reshape((c_out, c_in))?;
        let bias = if bias { Some(vb.get(c_out, "bias")?) } else { None };
        Ok(Self::new(weight, bias))
    }

    /// A `nn.Conv2d(c_in, c_out, k, stride=k)` (non-overlapping patches) as a linear layer
    /// over patches, with the weight reordered once to the channels-last patch layout.
    pub fn load_patch_conv(c_in: usize, c_out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb
            .get((c_out, c_in, k, k), "weight")?
            .permute((0, 2, 3, 1))?
            .reshape((c_out, k * k * c_in))?;
        Ok(Self::new(weight, Some(vb.get(c_out, "bias")?)))
    }

    pub fn out_features(&self) -> usize {
        self.weight.stored().dim(0).unwrap_or(0)
    }
}

impl Linear {
    /// `then(self(x))`: a term added and a GELU applied in the product's pass.
    pub fn forward_then(&self, x: &Tensor, then: ops::Then) -> Result<Tensor> {
        ops::linear_then(x, self.weight.for_input(x)?, self.bias.as_ref(), then)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, self.weight.for_input(x)?, self.bias.as_ref())
    }
}

/// Non-overlapping k x k patches of channels-last input, in the order `load_patch_conv` expects:
/// (N, H, W, C) -> (N, H/k, W/k, k*k*C).
pub fn patchify(x: &Tensor, k: usize) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    x.reshape((n, h / k, k, w / k, k, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((n, h / k, w / k, k * k * c))
}

/// `nn.ConvTranspose2d(c_in, c_out, k, stride=k)`: every input pixel becomes a k x k block,
/// so it is one matrix product followed by a reshuffle.
#[derive(Debug, Clone)]
pub struct PatchConvTranspose {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    c_out: usize,
}

impl PatchConvTranspose {
    pub fn load(c_in: usize, c_out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb
            .get((c_in, c_out, k, k), "weight")?
            .permute((0, 2, 3, 1))?
            .reshape((c_in, k * k * c_out))?;
        Ok(Self {
            weight,
            bias: vb.get(c_out, "bias")?,
            k,
            c_out,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let k = self.k;
        let y = ops::matmul(&x.reshape((n * h * w, c))?, &self.weight)?;
        y.reshape((n, h, w, k, k, self.c_out))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((n, h * k, w * k, self.c_out))?
            .broadcast_add(&self.bias)
    }
}

/// Layer norm over channels without weights (`WuerstchenLayerNorm(c, elementwise_affine=False)`).
pub fn channel_norm(x: &Tensor) -> Result<Tensor> {
    ops::layer_norm(x, NORM_EPS, None)
}

/// ConvNeXt-V2 GlobalResponseNorm: per-channel L2 norm over H and W, divided by its mean over
/// channels. The sums run in f32 (128x128 squares overflow f16).
#[derive(Debug, Clone)]
pub struct GlobalResponseNorm {
    gamma: Tensor,
    beta: Tensor,
}

impl GlobalResponseNorm {
    pub fn load(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gamma: vb.get((1, 1, 1, c), "gamma")?,
            beta: vb.get((1, 1, 1, c), "beta")?,
        })
    }
}

impl Module for GlobalResponseNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::global_response_norm(x, &self.gamma, &self.beta)
    }
}

/// ResBlock / ResBlockStageB: depthwise conv, norm, optional skips concatenated on channels,
/// then Linear(4x) - GELU - GRN - Linear back, plus the residual. (The prior's ResBlock would
/// concatenate its skip before the depthwise conv, but the prior never passes one.)
///
/// The first linear layer acts on `[h, skip_0, skip_1, ...]`, so it is kept as one block of
/// columns per part: `W [h; s] = W_h h + W_s s`. That spares the concatenation, and a skip that
/// stays the same over the sampling steps (the decoder's image embedding) is multiplied once
/// per image ([`ResBlock::skip_term`]) instead of at every step.
#[derive(Debug, Clone)]
pub struct ResBlock {
    depthwise: DepthwiseConv,
    lin1: Linear,
    lin1_skips: Vec<Linear>,
    grn: GlobalResponseNorm,
    lin2: Linear,
}

impl ResBlock {
    /// `skips`: the channel counts of the skip parts, in torch's concatenation order.
    pub fn load(c: usize, skips: &[usize], kernel: usize, vb: VarBuilder) -> Result<Self> {
        let total: usize = skips.iter().sum();
        let lin = vb.pp("channelwise.0");
        let weight = lin.get((c * 4, c + total), "weight")?;
        // The CPU's matrix product takes the column blocks as strided views of the loaded
        // weight (which stays in its file mapping); cuBLAS needs each block contiguous.
        let block = |at, width| {
            let view = weight.narrow(1, at, width)?;
            if view.device().is_cpu() {
                Ok(view)
            } else {
                view.contiguous()
            }
        };
        let mut lin1_skips = Vec::with_capacity(skips.len());
        let mut at = c;
        for &width in skips {
            lin1_skips.push(Linear::new(block(at, width)?, None));
            at += width;
        }
        Ok(Self {
            depthwise: DepthwiseConv::new(c, kernel, Padding::Zeros, vb.pp("depthwise"))?,
            lin1: Linear::new(block(0, c)?, Some(lin.get(c * 4, "bias")?)),
            lin1_skips,
            grn: GlobalResponseNorm::load(c * 4, vb.pp("channelwise.2"))?,
            lin2: Linear::load(c * 4, c, vb.pp("channelwise.4"))?,
        })
    }

    /// How many skip parts the block concatenates.
    pub fn skip_parts(&self) -> usize {
        self.lin1_skips.len()
    }

    /// Skip part `i`'s contribution to the first linear layer, (N, H, W, 4c).
    pub fn skip_term(&self, i: usize, skip: &Tensor) -> Result<Tensor> {
        match self.lin1_skips.get(i) {
            Some(lin) => lin.forward(skip),
            None => candle_core::bail!("ResBlock has {} skip parts, asked for part {i}", self.lin1_skips.len()),
        }
    }

    /// `skip_terms`: the sum of the skip parts' `skip_term`s, if the block has any.
    pub fn forward(&self, x: &Tensor, skip_terms: Option<&Tensor>) -> Result<Tensor> {
        let h = self.depthwise.forward_normed(x, NORM_EPS)?;
        // gelu(lin1(h) + skip terms), then lin2(grn(.)) + x: the adds and the GELU ride in
        // the products' passes
        let h = self.lin1.forward_then(
            &h,
            ops::Then {
                add: skip_terms,
                gelu: true,
                ..Default::default()
            },
        )?;
        self.lin2.forward_then(
            &self.grn.forward(&h)?,
            ops::Then {
                add: Some(x),
                ..Default::default()
            },
        )
    }
}

/// TimestepBlock: `x * (1 + a) + b` with `a, b = mapper(r_embed).chunk(2)`. With conditions
/// (Stable Cascade's `SDCascadeTimestepBlock(conds=["sca", ...])`) the embedding is the
/// concatenation of one `c_r`-wide part per mapper, and each `mapper_<cond>`'s `a, b` is added.
#[derive(Debug, Clone)]
pub struct TimestepBlock {
    /// `mapper`, then `mapper_<cond>` per condition, each on its part of the embedding
    mappers: Vec<Linear>,
    c: usize,
    c_r: usize,
}

impl TimestepBlock {
    pub fn load(c: usize, c_r: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_with_conds(c, c_r, &[], vb)
    }

    pub fn load_with_conds(c: usize, c_r: usize, conds: &[String], vb: VarBuilder) -> Result<Self> {
        let names = std::iter::once("mapper".to_string()).chain(conds.iter().map(|c| format!("mapper_{c}")));
        let mappers = names
            .map(|name| Linear::load(c_r, 2 * c, vb.pp(name)))
            .collect::<Result<_>>()?;
        Ok(Self { mappers, c, c_r })
    }

    pub fn forward(&self, x: &Tensor, r_embed: &Tensor) -> Result<Tensor> {
        let mut ab = self.mappers[0].forward(&r_embed.narrow(1, 0, self.c_r)?)?;
        for (i, mapper) in self.mappers.iter().enumerate().skip(1) {
            ab = (ab + mapper.forward(&r_embed.narrow(1, i * self.c_r, self.c_r)?)?)?;
        }
        ops::modulate(x, &ab.narrow(1, 0, self.c)?, &ab.narrow(1, self.c, self.c)?)
    }
}

/// diffusers `Attention(query_dim=c, heads, dim_head=c//heads, bias=True)` without a mask,
/// for self-attention over the image tokens extended by conditioning tokens. Keys and values
/// are per-token projections, so the conditioning's part is computed once per prompt
/// ([`Attention::project_cond`]) instead of at every step.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

/// The keys and values of the conditioning tokens, (N, L, C) each.
#[derive(Debug, Clone)]
pub struct CondKv {
    k: Tensor,
    v: Tensor,
}

impl CondKv {
    /// Images `start..start + len` of the batch.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            k: self.k.narrow(0, start, len)?,
            v: self.v.narrow(0, start, len)?,
        })
    }
}

impl Attention {
    pub fn load(c: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            to_q: Linear::load(c, c, vb.pp("to_q"))?,
            to_k: Linear::load(c, c, vb.pp("to_k"))?,
            to_v: Linear::load(c, c, vb.pp("to_v"))?,
            to_out: Linear::load(c, c, vb.pp("to_out.0"))?,
            heads,
        })
    }

    pub fn project_cond(&self, cond: &Tensor) -> Result<CondKv> {
        Ok(CondKv {
            k: self.to_k.forward(cond)?,
            v: self.to_v.forward(cond)?,
        })
    }

    /// `x`: (N, Lq, C) tokens attending to `[x, cond]` (`self_attn`) or to `cond` alone ->
    /// `residual + attention`, (N, Lq, C). Equal to diffusers' `residual + attention(x,
    /// encoder_hidden_states=cat([x, cond]))` and `residual + attention(x,
    /// encoder_hidden_states=cond)`.
    pub fn forward(&self, x: &Tensor, cond: &CondKv, self_attn: bool, residual: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)? / self.heads;
        let q = ops::split_heads(&[&self.to_q.forward(x)?], self.heads)?;
        let (k, v) = if self_attn {
            let (k, v) = (self.to_k.forward(x)?, self.to_v.forward(x)?);
            (
                ops::split_heads(&[&k, &cond.k], self.heads)?,
                ops::split_heads(&[&v, &cond.v], self.heads)?,
            )
        } else {
            (
                ops::split_heads(&[&cond.k], self.heads)?,
                ops::split_heads(&[&cond.v], self.heads)?,
            )
        };
        let out = ops::merge_heads(&ops::attention(&q, &k, &v, (d as f64).powf(-0.5))?)?;
        self.to_out.forward_then(
            &out,
            ops::Then {
                residual: Some(residual),
                ..Default::default()
            },
        )
    }
}

/// AttnBlock: the normed image tokens attend to the mapped conditioning
/// (`kv_mapper = SiLU, Linear(c_cond, c)`), with `self_attn` (Würstchen's only form) also to
/// themselves.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    attention: Attention,
    kv_mapper: Linear,
    self_attn: bool,
}

impl AttnBlock {
    pub fn load(c: usize, c_cond: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_with(c, c_cond, heads, true, vb)
    }

    pub fn load_with(c: usize, c_cond: usize, heads: usize, self_attn: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention: Attention::load(c, heads, vb.pp("attention"))?,
            kv_mapper: Linear::load(c_cond, c, vb.pp("kv_mapper.1"))?,
            self_attn,
        })
    }

    /// The block's keys and values of the conditioning; constant over the sampling steps.
    pub fn map_cond(&self, cond: &Tensor) -> Result<CondKv> {
        self.attention
            .project_cond(&self.kv_mapper.forward(&candle_nn::ops::silu(cond)?)?)
    }

    /// `x`: (N, H, W, C); `cond`: this block's `map_cond` output.
    pub fn forward(&self, x: &Tensor, cond: &CondKv) -> Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let tokens = channel_norm(x)?.reshape((n, h * w, c))?;
        self.attention
            .forward(&tokens, cond, self.self_attn, &x.reshape((n, h * w, c))?)?
            .reshape((n, h, w, c))
    }
}

/// The sinusoidal embedding of the noise ratio `r` (gen_r_embedding): `r*10000` times
/// `exp(-i * ln(10000)/(c_r/2 - 1))`, `[sin, cos]`, zero-padded to odd `c_r`. Computed in f32
/// like torch, returned as (N, c_r) in `dtype`.
pub fn r_embedding(r: &Tensor, c_r: usize, dtype: DType) -> Result<Tensor> {
    const MAX_POSITIONS: f64 = 10000.0;
    let half = c_r / 2;
    let step = -(MAX_POSITIONS.ln() / (half as f64 - 1.0)) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * step).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), r.device())?;
    let r = (r.to_dtype(DType::F32)? * MAX_POSITIONS)?;
    let emb = r.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let mut emb = Tensor::cat(&[emb.sin()?, emb.cos()?], 1)?;
    if c_r % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    emb.to_dtype(dtype)
}
