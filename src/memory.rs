//! How much device memory a run needs at its worst moment: the weights (from the file sizes,
//! [`weight_bytes`]) plus the activations alive at once, counted from the configs and the
//! request ([`peak_activation_bytes`]). The count walks the model code (src/models/) on the
//! device-generic path of src/ops/, which keeps more f32 temporaries than the CPU kernels
//! (attention excepted: where the CPU's f32 kernel runs it, its score buffers are counted), and
//! takes the large tensors only: per-channel statistics, timestep embeddings, the text
//! encoders' own layers (77 tokens) and the stems and up/downsamplers (each smaller than the
//! blocks beside them) are left out.

use candle_core::DType;

use crate::config::{
    BlockKind, ClipTextConfig, DecoderConfig, DecoderPipelineConfig, PriorConfig, PriorPipelineConfig, VqganConfig,
};
use crate::hub::FileSource;
use crate::ops::{chunk_plan, cpu_attention_kernel, cpu_task};
use crate::pipeline::{DecoderConfigs, PriorConfigs};

/// What a run asks for, as far as its memory goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunShapes {
    pub width: usize,
    pub height: usize,
    pub num_images: usize,
    /// as requested; guidance is on when > 1 (and then doubles the batch), as in the pipeline
    pub prior_guidance: f64,
    pub decoder_guidance: f64,
    pub dtype: DType,
    /// bytes one attention block's scores may take (`ops::attention_budget()`)
    pub attention_budget: usize,
    /// `Some(threads)` where attention runs as the CPU's f32 kernel, which holds one task's
    /// scores per thread (`ops::cpu_task`) instead of a block of the budget's size.
    pub cpu_attention_threads: Option<usize>,
}

impl RunShapes {
    /// The shapes of `req` in `dtype` on `device`, with the current attention budget and, on
    /// the CPU, rayon's thread count.
    pub fn of(req: &crate::request::GenerateRequest, dtype: DType, device: &candle_core::Device) -> Self {
        Self {
            width: req.width,
            height: req.height,
            num_images: req.num_images,
            prior_guidance: req.prior_guidance,
            decoder_guidance: req.decoder_guidance,
            dtype,
            attention_budget: crate::ops::attention_budget(),
            cpu_attention_threads: cpu_attention_kernel(device, dtype).then(rayon::current_num_threads),
        }
    }
}

/// The configs that size the activations, read from the files the pipelines load.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShapes {
    pub prior_pipeline: PriorPipelineConfig,
    pub prior: PriorConfig,
    pub prior_text: ClipTextConfig,
    pub decoder_pipeline: DecoderPipelineConfig,
    pub decoder: DecoderConfig,
    pub decoder_text: ClipTextConfig,
    pub vqgan: VqganConfig,
}

impl ModelShapes {
    /// The shapes from the configs the pipelines load.
    pub fn new(prior: &PriorConfigs, decoder: &DecoderConfigs) -> Self {
        Self {
            prior_pipeline: prior.pipeline.clone(),
            prior: prior.prior.clone(),
            prior_text: prior.text_encoder.clone(),
            decoder_pipeline: decoder.pipeline.clone(),
            decoder: decoder.decoder.clone(),
            decoder_text: decoder.text_encoder.clone(),
            vqgan: decoder.vqgan.clone(),
        }
    }
}

/// Roughly the bytes both stages' weights take in `dtype` (`pipeline::weight_bytes` of each
/// component; a part whose files cannot be found counts 0).
pub fn weight_bytes(
    prior: &dyn FileSource,
    stage_c: Option<&dyn FileSource>,
    decoder: &dyn FileSource,
    dtype: DType,
) -> u64 {
    let stage_c_part: (&dyn FileSource, &str) = match stage_c {
        Some(s) => (s, ""),
        None => (prior, "prior"),
    };
    let parts: [(&dyn FileSource, &str, &str); 5] = [
        (prior, "text_encoder", "model"),
        (stage_c_part.0, stage_c_part.1, "diffusion_pytorch_model"),
        (decoder, "text_encoder", "model"),
        (decoder, "decoder", "diffusion_pytorch_model"),
        (decoder, "vqgan", "diffusion_pytorch_model"),
    ];
    parts_weight_bytes(&parts, dtype)
}

/// The bytes the weights of `(source, folder, weights stem)` components take in `dtype`
/// (`pipeline::weight_bytes` of each; a part whose files cannot be found counts 0).
pub fn parts_weight_bytes(parts: &[(&dyn FileSource, &str, &str)], dtype: DType) -> u64 {
    parts
        .iter()
        .map(|(src, folder, stem)| crate::pipeline::weight_bytes(*src, folder, stem, dtype).unwrap_or(0))
        .sum()
}

/// The activation bytes at the worst moment of each stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagePeaks {
    pub prior: u64,
    pub decoder: u64,
    pub vqgan: u64,
}

impl StagePeaks {
    pub fn max(&self) -> u64 {
        self.prior.max(self.decoder).max(self.vqgan)
    }
}

/// The most bytes of activations alive at one moment of a run.
pub fn peak_activation_bytes(run: &RunShapes, models: &ModelShapes) -> u64 {
    stage_peaks(run, models).max()
}

/// The worst moment of the prior, the decoder and the VQGAN decode.
pub fn stage_peaks(run: &RunShapes, m: &ModelShapes) -> StagePeaks {
    let s = run.dtype.size_in_bytes() as u64;
    let n = run.num_images as u64;
    let batch = |guidance: f64| if guidance > 1.0 { 2 * n } else { n };
    // the prior's latent and the decoder's, as PriorPipeline / DecoderPipeline::latent_size
    let rm = m.prior_pipeline.resolution_multiple;
    let (ph, pw) = ((run.height as f64 / rm).ceil(), (run.width as f64 / rm).ceil());
    let lds = m.decoder_pipeline.latent_dim_scale;
    let (lh, lw) = ((ph * lds) as u64, (pw * lds) as u64);
    let (ph, pw) = (ph as u64, pw as u64);
    let attn = |b: u64, tokens: u64, text: u64, c: u64, heads: u64| attn_block(b, tokens, text, c, heads, run);

    // Stage C, the prior, at batch b over ph*pw tokens of c channels
    let p = &m.prior;
    let b = batch(run.prior_guidance);
    let (c, text) = (p.c as u64, m.prior_text.max_position_embeddings as u64);
    let prior = [
        // the text encoder's output for the batch, kept for the whole stage
        b * text * m.prior_text.hidden_size as u64 * s,
        // every attention block's keys and values of the text (PriorCond)
        p.depth as u64 * 2 * b * text * c * s,
        sampling_state(n, b, p.c_in as u64 * ph * pw, s),
        // the larger of a ResBlock and an AttnBlock
        res_block(b * ph * pw, c, s).max(attn(b, ph * pw, text, c, p.nhead as u64)),
    ]
    .iter()
    .sum();

    // Stage B, the decoder, at batch b; level i runs at (lh/patch >> i) x (lw/patch >> i)
    let d = &m.decoder;
    let b = batch(run.decoder_guidance);
    let text = m.decoder_text.max_position_embeddings as u64;
    let last = d.levels() - 1;
    let mut effnet_terms = 0;
    let mut attn_kv = 0;
    let mut skips = 0;
    let mut level_peak = 0;
    for i in 0..d.levels() {
        let kinds = d.level_blocks(i);
        let count = |k: BlockKind| (d.blocks[i] * kinds.iter().filter(|&&x| x == k).count()) as u64;
        let px = ((lh / d.patch_size as u64) >> i) * ((lw / d.patch_size as u64) >> i);
        let c = d.c_hidden[i] as u64;
        let rows = b * px;
        // per ResBlock of the level, down and up path: the effnet's (B, h, w, 4c) term (DecoderCond)
        effnet_terms += u64::from(d.inject_effnet[i]) * 2 * count(BlockKind::Res) * rows * 4 * c * s;
        // per AttnBlock, down and up path: the keys and values of the text
        attn_kv += 2 * count(BlockKind::Attn) * 2 * b * text * c * s;
        // the level's down-path output, kept for the up path
        skips += rows * c * s;
        // the up level's first ResBlock also holds the down path's (B, h, w, 4c) skip term
        let from_down = u64::from(i < last && kinds.first() == Some(&BlockKind::Res)) * rows * 4 * c * s;
        let res = res_block(rows, c, s) + from_down;
        let att = match count(BlockKind::Attn) {
            0 => 0,
            _ => attn(b, px, text, c, d.nhead[i].max(1) as u64),
        };
        level_peak = level_peak.max(res).max(att);
    }
    // the text and the per-image conditioning live until the decoder stage returns
    let cond = b * text * m.decoder_text.hidden_size as u64 * s + effnet_terms + attn_kv;
    let decoder = cond + skips + sampling_state(n, b, d.c_in as u64 * lh * lw, s) + level_peak;

    // Stage A, the VQGAN, at batch n: its coarsest level at the latent's size, each finer one
    // twice the side; the decoder's conditioning and its f32 latents are still alive
    let v = &m.vqgan;
    let c_levels = v.c_levels();
    let vq_peak = (0..v.levels)
        .map(|k| mix_block(n * (lh << k) * (lw << k), c_levels[v.levels - 1 - k] as u64, s))
        .max()
        .unwrap_or(0);
    let vqgan = cond + n * d.c_in as u64 * lh * lw * 4 + vq_peak;

    StagePeaks { prior, decoder, vqgan }
}

/// Bytes per element of a cast to f32 (none for f32: `to_dtype` then shares the storage).
fn f32_copy(s: u64) -> u64 {
    if s == 4 {
        0
    } else {
        4
    }
}

/// Bytes per element of a cast from f32 back to the storage dtype (none for f32).
fn cast_back(s: u64) -> u64 {
    if s == 4 {
        0
    } else {
        s
    }
}

/// Bytes per attention score while a block is computed (`ops::attention`'s `block`): the
/// product in the storage dtype, its f32 copy, the scaled copy and the probabilities in f32,
/// cast back to the storage dtype. `ops`' `bytes_per_score` counts the same, but also the
/// casts that are free in f32.
fn score_bytes(dtype: DType) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    s + f32_copy(s) + 4 + 4 + cast_back(s)
}

/// `sample()` in pipeline.rs: the f32 latents, the step's noise and the guided prediction
/// (batch n), and the network's input, output and its f32 copy (batch b), of `elems` each.
fn sampling_state(n: u64, b: u64, elems: u64, s: u64) -> u64 {
    elems * (3 * n * 4 + b * (2 * s + 4))
}

/// A ResBlock (common.rs) over `rows` pixels of `c` channels, its input included: at the GRN
/// the first linear layer's output and its GELU (4c each) are alive, and the generic GRN holds
/// either its f32 copy and square or its three chained temporaries and its output (4c each).
fn res_block(rows: u64, c: u64, s: u64) -> u64 {
    let wide = rows * 4 * c;
    let grn = wide * (f32_copy(s) + 4).max(4 * s);
    rows * c * s + 2 * wide * s + grn
}

/// An AttnBlock (common.rs): `b` images of `tokens` tokens with `c` channels in `heads` heads,
/// attending to themselves and `text` tokens, its input included.
fn attn_block(b: u64, tokens: u64, text: u64, c: u64, heads: u64, run: &RunShapes) -> u64 {
    let s = run.dtype.size_in_bytes() as u64;
    let keys = tokens + text;
    let one = b * tokens * c * s;
    // the input, its norm (the tokens) and the queries; keys and values over image and text
    let held = 3 * one + 2 * b * keys * c * s;
    // the scores in flight while the output accumulates: on the CPU's f32 kernel one task's block
    // of scores per thread, elsewhere one block (ops::attention's chunk_plan)
    let in_flight = match run.cpu_attention_threads {
        Some(threads) => {
            let (rows, bytes) = cpu_task(tokens as usize, keys as usize);
            let tasks = b * heads * tokens.div_ceil(rows as u64);
            tasks.min(threads as u64) * bytes as u64
        }
        None => {
            let plan = chunk_plan(
                (b * heads) as usize,
                tokens as usize,
                keys as usize,
                run.dtype,
                run.attention_budget,
            );
            plan.elements(keys as usize) as u64 * score_bytes(run.dtype)
        }
    };
    let scores = in_flight + one;
    // afterwards: the output, and to_out's product and bias sum
    held + scores.max(3 * one)
}

/// A VQGAN MixingResidualBlock (vqgan.rs) over `rows` pixels of `c` channels (MLP 4c wide), its
/// input included.
fn mix_block(rows: u64, c: u64, s: u64) -> u64 {
    let px = rows * c;
    // at the depthwise conv: the input and the modulated norm; the generic conv's f32 input
    // copy, padded input and three accumulators (old, product, new); its output cast back
    let depthwise = px * (2 * s + f32_copy(s) + 4 + 3 * 4 + cast_back(s));
    // at the MLP's second linear layer: the input, both modulated norms and the residual sum,
    // the 4c-wide hidden and its GELU, and the product and its bias sum
    let mlp = px * s * (4 + 2 * 4 + 2);
    depthwise.max(mlp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: f64 = (1u64 << 30) as f64;

    fn published() -> ModelShapes {
        crate::tiny::published_shapes()
    }

    fn run(side: usize, num_images: usize, prior_guidance: f64, decoder_guidance: f64) -> RunShapes {
        RunShapes {
            width: side,
            height: side,
            num_images,
            prior_guidance,
            decoder_guidance,
            dtype: DType::BF16,
            attention_budget: 1 << 30,
            cpu_attention_threads: None,
        }
    }

    #[test]
    fn grows_with_size_batch_and_guidance() {
        let m = published();
        let base = run(1024, 1, 4.0, 0.0);
        let one = peak_activation_bytes(&base, &m) as f64;
        // twice the images: twice the activations, less where attention is capped by its budget
        let two = peak_activation_bytes(&run(1024, 2, 4.0, 0.0), &m) as f64;
        assert!((1.8..=2.0).contains(&(two / one)), "{two} / {one}");
        // four times the pixels: the VQGAN's blocks and the cached effnet terms grow 4x
        let big = peak_activation_bytes(&run(2048, 1, 4.0, 0.0), &m) as f64;
        assert!((3.5..=4.2).contains(&(big / one)), "{big} / {one}");
        // guidance doubles the prior's batch, and the decoder's when on for the decoder
        let (on, off) = (stage_peaks(&base, &m), stage_peaks(&run(1024, 1, 1.0, 0.0), &m));
        assert!(on.prior as f64 > 1.8 * off.prior as f64, "{on:?} {off:?}");
        assert_eq!((on.decoder, on.vqgan), (off.decoder, off.vqgan));
        let dec = stage_peaks(&run(1024, 1, 4.0, 4.0), &m);
        assert!(dec.decoder > on.decoder && dec.vqgan > on.vqgan, "{dec:?} {on:?}");
        assert_eq!(dec.prior, on.prior);
        // a smaller attention budget, smaller score blocks
        let small = RunShapes {
            attention_budget: 64 << 20,
            ..base
        };
        assert!(stage_peaks(&small, &m).decoder < on.decoder);
        // the same bytes per score as the attention's own block sizing, less f32's free casts
        for dtype in [DType::BF16, DType::F16] {
            assert_eq!(score_bytes(dtype), crate::ops::bytes_per_score(dtype) as u64);
        }
        assert!(score_bytes(DType::F32) < crate::ops::bytes_per_score(DType::F32) as u64);
        // f32 holds more than bf16, if not quite twice as much: bf16's copies in f32 are free in f32
        let f32_run = RunShapes {
            dtype: DType::F32,
            ..base
        };
        assert!(peak_activation_bytes(&f32_run, &m) as f64 > 1.5 * one);
    }

    #[test]
    fn the_cpu_attention_kernel_holds_one_task_of_scores_per_thread() {
        let generic = RunShapes {
            dtype: DType::F32,
            ..run(1024, 1, 4.0, 0.0)
        };
        let cpu = |threads| RunShapes {
            cpu_attention_threads: Some(threads),
            ..generic
        };
        // the published decoder's level-1 attention at 1024x1024: 10 heads over 4096 tokens
        // and the text; the generic path holds a block sized by the 1 GiB budget (~640 MB of
        // f32 scores and their temporaries), the CPU's kernel one task of 256 x 512 scores
        // (512 KiB) per thread
        let attn = |r: &RunShapes| attn_block(1, 4096, 77, 640, 10, r);
        assert!(attn(&cpu(2)) + (500 << 20) < attn(&generic));
        // (past the threads whose scores together are less than the block's output
        // afterwards: 41 of them here)
        let per_thread = attn(&cpu(61)) - attn(&cpu(60));
        assert_eq!(per_thread, 256 * 512 * 4);
        // never more tasks in flight than there are
        assert_eq!(attn(&cpu(100_000)), attn(&cpu(1_000_000)));
        // the prior's peak at 1024x1024 is its attention: the CPU's count is lower
        let m = published();
        assert!(stage_peaks(&cpu(2), &m).prior < stage_peaks(&generic, &m).prior);
    }

    #[test]
    fn published_models_at_1024_in_bf16_are_near_diffusers_measured_peak() {
        // The published weights: 3,113,414,574 parameters (prior 993.6 M, its text encoder
        // 693.0 M, decoder 1055.4 M, its text encoder 353.0 M, VQGAN 18.4 M; the safetensors
        // sizes / 4 of `tiny-model --size real`), 2 bytes each in bf16: 5.8 GiB.
        let weights = 3_113_414_574u64 * 2;
        let m = published();
        let one = (weights + peak_activation_bytes(&run(1024, 1, 4.0, 0.0), &m)) as f64 / GIB;
        let four = (weights + peak_activation_bytes(&run(1024, 4, 4.0, 0.0), &m)) as f64 / GIB;
        eprintln!(
            "estimated peak at 1024x1024 bf16: batch 1 {one:.2} GiB, batch 4 {four:.2} GiB; activations at batch \
             1 {:?}",
            stage_peaks(&run(1024, 1, 4.0, 0.0), &m)
        );
        // diffusers measured 6.9 GiB (batch 1) and 10.0 GiB (batch 4) on an H100
        // (docs/PERFORMANCE.md). Never below: we hold the same weights and at least its
        // activations, plus an attention score block (diffusers' SDPA keeps no scores) and the
        // per-image effnet terms it recomputes at every step. Not above 1.4x: more would have
        // `generate` load one stage at a time on cards where both fit.
        assert!((6.9..=6.9 * 1.4).contains(&one), "{one:.2} GiB");
        assert!((10.0..=10.0 * 1.4).contains(&four), "{four:.2} GiB");
    }
}
