//! `wuerstchen selftest`: does this build compute the right numbers on this machine? Every
//! custom op and block runs on the device under test in the chosen dtype and is compared with
//! the CPU's f32 kernels on the same random inputs, at small odd shapes and at the shapes of
//! the published models; then a tiny random model of each family (Stable Cascade's with an
//! image prompt) runs the whole pipeline on both. On the
//! CPU the device side runs the device-generic forms (what CUDA runs), so a CPU run proves
//! the harness and every generic form.
//!
//! Inputs and weights are drawn once in f32 and rounded to the dtype under test before either
//! side sees them, so a half-precision check measures the rounding inside the op, not the
//! rounding of its inputs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::hub::LocalDir;
use crate::models::common::{AttnBlock, ResBlock, TimestepBlock};
use crate::ops::{self, ConvTranspose2d, Padding};
use crate::pipeline::{decoder_timesteps, DecoderParams, DecoderPipeline, PriorParams, PriorPipeline, Runtime};
use crate::progress::Silent;
use crate::rng::{NoiseSource, TorchCpuGenerator};

/// Which shapes to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shapes {
    /// small odd shapes (seconds on a CPU)
    Small,
    /// the published models' activation shapes (minutes on a CPU)
    Real,
    All,
}

/// The largest relative error each dtype may show against the f32 reference: f32 differs
/// only in summation order (~1e-7); f16 and bf16 round each intermediate result to 11 and 8
/// significant bits (unit roundoff 4.9e-4 and 3.9e-3), a few times per op.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        _ => 1e-5,
    }
}

/// The whole pipeline's tolerance, against the CPU kernels in the same dtype. The tiny model's
/// random weights make sampling chaotic, and guidance 4 multiplies the difference of two
/// predictions by 4 at every step, so the rounding differences of the two sides' kernels grow
/// from step to step (measured on the CPU, generic forms against the CPU kernels, seeds 0-2:
/// f32 2e-6; f16 1e-2; bf16 7-9e-2, and 1.3-1.8e-2 with guidance off). A wrong kernel shows
/// as an error of order 1; the per-op checks hold the tight bounds.
pub fn pipeline_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 3e-2,
        DType::BF16 => 1.5e-1,
        _ => 1e-4,
    }
}

/// One comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub dtype: String,
    pub shape: String,
    /// ||device - reference|| / ||reference||; NaN when it failed to run
    pub rel_err: f64,
    pub tol: f64,
    /// milliseconds of the device side (the second run on a GPU, after kernel loading)
    pub ms: f64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What to run.
pub struct Options {
    pub device: Device,
    pub dtype: DType,
    pub shapes: Shapes,
    /// Seeds every input and weight.
    pub seed: u64,
    /// Perturbs this check's device result, to show that a wrong op is caught.
    pub inject_fault: Option<String>,
}

/// Runs every check, calling `report` as each finishes; returns them all.
pub fn run(opts: &Options, report: &mut dyn FnMut(&Check)) -> Result<Vec<Check>> {
    let mut t = Tester {
        opts,
        rng: TorchCpuGenerator::new(opts.seed),
        checks: Vec::new(),
        report,
    };
    let mut acts: Vec<[usize; 4]> = Vec::new();
    let mut attn: Vec<([usize; 4], usize, usize)> = Vec::new(); // (N, H, W, C), heads, cond tokens
    if opts.shapes != Shapes::Real {
        acts.extend([[1, 5, 7, 12], [2, 9, 6, 20]]);
        attn.extend([([1, 5, 7, 16], 2, 5), ([2, 3, 5, 24], 3, 7)]);
    }
    if opts.shapes != Shapes::Small {
        // prior level, decoder levels at 1024x1536 and 1024x1024, VQGAN
        acts.extend([
            [2, 24, 36, 1536],
            [1, 64, 96, 640],
            [2, 128, 128, 320],
            [1, 256, 256, 384],
        ]);
        // prior (24 heads of 64) at 1024x1536, and a 10-head level of 4096 tokens
        attn.extend([([2, 24, 36, 1536], 24, 77), ([1, 64, 64, 640], 10, 77)]);
    }
    for &dims in &acts {
        t.activation_ops(dims)?;
    }
    for &(dims, heads, cond) in &attn {
        t.attention_ops(dims, heads, cond)?;
    }
    if opts.shapes != Shapes::Real {
        t.resize([1, 3, 7, 5])?;
    }
    if opts.shapes != Shapes::Small {
        // the image embeddings (16 channels, 24x36 at 1024x1536) resized for a decoder level
        t.resize([2, 16, 24, 36])?;
    }
    t.weights_file()?;
    t.pipeline()?;
    t.cascade_pipeline()?;
    Ok(t.checks)
}

struct Tester<'a> {
    opts: &'a Options,
    rng: TorchCpuGenerator,
    checks: Vec<Check>,
    report: &'a mut dyn FnMut(&Check),
}

/// Both sides of a comparison: the reference (CPU kernels, f32) and the device under test.
#[derive(Clone)]
struct Side {
    device: Device,
    dtype: DType,
    /// the device side on the CPU: run the device-generic forms
    generic: bool,
}

impl Side {
    fn put(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_device(&self.device)?.to_dtype(self.dtype)
    }

    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.generic {
            ops::with_generic_forms(f)
        } else {
            f()
        }
    }
}

fn shape_name(dims: &[usize]) -> String {
    let d: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("({})", d.join(","))
}

/// ||a - b|| / ||b|| in f64 on the CPU (NaN if either holds a NaN or an Inf).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    anyhow::ensure!(a.dims() == b.dims(), "shape {:?}, expected {:?}", a.dims(), b.dims());
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let den = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let finite = a.abs()?.sum_all()?.to_scalar::<f64>()?.is_finite();
    Ok(if finite { (num / den).sqrt() } else { f64::NAN })
}

impl Tester<'_> {
    fn reference(&self) -> Side {
        Side {
            device: Device::Cpu,
            dtype: DType::F32,
            generic: false,
        }
    }

    fn under_test(&self) -> Side {
        Side {
            device: self.opts.device.clone(),
            dtype: self.opts.dtype,
            generic: self.opts.device.is_cpu(),
        }
    }

    /// Standard normal values times `scale`, rounded to the dtype under test, in f32 on the CPU.
    fn randn(&mut self, dims: &[usize], scale: f64) -> Result<Tensor> {
        let values = self.rng.standard_normal(dims)?;
        let t = (Tensor::from_vec(values, dims, &Device::Cpu)? * scale)?;
        Ok(t.to_dtype(self.opts.dtype)?.to_dtype(DType::F32)?)
    }

    /// Random weights shared by both sides (see [`RandomWeights`]).
    fn weights(&mut self) -> Arc<RandomWeights> {
        let seed = self.rng.randn(1)[0].to_bits() as u64;
        Arc::new(RandomWeights {
            state: Mutex::new((TorchCpuGenerator::new(seed), HashMap::new())),
            dtype: self.opts.dtype,
        })
    }

    /// Runs `f` on both sides and records the comparison. `f` gets the side (to move inputs
    /// there) and returns the output.
    fn compare(&mut self, name: &str, dims: &[usize], f: impl Fn(&Side) -> Result<Tensor>) -> Result<()> {
        let dev = self.under_test();
        let outcome = (|| -> Result<(f64, f64)> {
            let want = f(&self.reference())?;
            let runs = if dev.device.is_cpu() { 1 } else { 2 };
            let mut got = None;
            let mut ms = 0.0;
            for _ in 0..runs {
                dev.device.synchronize()?;
                let t = Instant::now();
                let out = dev.run(|| f(&dev))?;
                dev.device.synchronize()?;
                ms = t.elapsed().as_secs_f64() * 1000.0;
                got = Some(out);
            }
            let mut got = got.ok_or_else(|| anyhow::anyhow!("no run"))?.to_dtype(DType::F32)?;
            if self.opts.inject_fault.as_deref() == Some(name) {
                got = (got * 1.1)?;
            }
            Ok((rel_err(&got, &want)?, ms))
        })();
        let check = self.check(name, shape_name(dims), tolerance(self.opts.dtype), outcome);
        self.push(check);
        Ok(())
    }

    /// A finished comparison: `outcome` is (relative error, ms), or why it could not run.
    fn check(&self, name: &str, shape: String, tol: f64, outcome: Result<(f64, f64)>) -> Check {
        let (rel_err, ms, error) = match outcome {
            Ok((e, ms)) => (e, ms, None),
            Err(e) => (
                f64::NAN,
                0.0,
                Some(format!("{e:#}").lines().next().unwrap_or_default().to_string()),
            ),
        };
        Check {
            check: name.to_string(),
            dtype: crate::commands::dtype_name(self.opts.dtype).to_string(),
            shape,
            rel_err,
            tol,
            ms,
            ok: error.is_none() && rel_err <= tol,
            error,
        }
    }

    fn push(&mut self, check: Check) {
        (self.report)(&check);
        self.checks.push(check);
    }

    /// The ops and blocks that act on (N, H, W, C) activations.
    fn activation_ops(&mut self, dims: [usize; 4]) -> Result<()> {
        let [n, h, w, c] = dims;
        let x = self.randn(&dims, 1.0)?;
        let dw = self.randn(&[3, 3, c], 1.0 / 3.0)?;
        let db = self.randn(&[c], 0.5)?;
        for (name, padding) in [
            ("depthwise_conv", Padding::Zeros),
            ("depthwise_conv_replicate", Padding::Replicate),
        ] {
            self.compare(name, &dims, |s| {
                Ok(ops::depthwise_conv2d(&s.put(&x)?, &s.put(&dw)?, &s.put(&db)?, padding)?)
            })?;
        }
        let (g, b) = (self.randn(&[c], 1.0)?, self.randn(&[c], 1.0)?);
        self.compare("layer_norm", &dims, |s| Ok(ops::layer_norm(&s.put(&x)?, 1e-6, None)?))?;
        self.compare("layer_norm_affine", &dims, |s| {
            Ok(ops::layer_norm(&s.put(&x)?, 1e-6, Some((&s.put(&g)?, &s.put(&b)?)))?)
        })?;
        self.compare("grn", &dims, |s| {
            Ok(ops::global_response_norm(&s.put(&x)?, &s.put(&g)?, &s.put(&b)?)?)
        })?;
        self.compare("gelu", &dims, |s| Ok(ops::gelu_erf(&s.put(&x)?)?))?;
        if h % 2 == 0 && w % 2 == 0 {
            self.compare("pixel_unshuffle_shuffle", &dims, |s| {
                let un = ops::pixel_unshuffle(&s.put(&x)?, 2)?;
                Ok(ops::pixel_shuffle(&(un * 2.0)?, 2)?)
            })?;
        }
        // the VQGAN's upsampler: ConvTranspose2d(c, c/2, 4, stride 2, padding 1), at batch 1
        let c_out = (c / 2).max(1);
        let weights = self.weights();
        let x1 = x.narrow(0, 0, 1)?;
        self.compare("conv_transpose", &[1, h, w, c], |s| {
            let conv = ConvTranspose2d::load(c, c_out, 4, 2, 1, weights.var_builder(s))?;
            Ok(conv.forward(&s.put(&x1)?)?)
        })?;
        let weights = self.weights();
        self.compare("res_block", &dims, |s| {
            let block = ResBlock::load(c, &[], 3, weights.var_builder(s))?;
            Ok(block.forward(&s.put(&x)?, None)?)
        })?;
        let c_r = 64;
        let r = self.randn(&[n, c_r], 1.0)?;
        let weights = self.weights();
        self.compare("timestep_block", &dims, |s| {
            let block = TimestepBlock::load(c, c_r, weights.var_builder(s))?;
            Ok(block.forward(&s.put(&x)?, &s.put(&r)?)?)
        })
    }

    /// Softmax, attention (whole and in blocks) and the attention block over (N, H, W, C).
    fn attention_ops(&mut self, dims: [usize; 4], heads: usize, cond_tokens: usize) -> Result<()> {
        let [n, h, w, c] = dims;
        let (l, d) = (h * w, c / heads);
        let lk = l + cond_tokens;
        let q = self.randn(&[n, heads, l, d], 1.0)?;
        let k = self.randn(&[n, heads, lk, d], 1.0)?;
        let v = self.randn(&[n, heads, lk, d], 1.0)?;
        let scale = (d as f64).powf(-0.5);
        let qkv_dims = [n, heads, l, lk];
        self.compare("scaled_softmax", &qkv_dims, |s| {
            let scores = s.put(&q)?.matmul(&s.put(&k)?.t()?)?;
            Ok(ops::scaled_softmax_last_dim(&scores, scale)?)
        })?;
        self.compare("attention", &qkv_dims, |s| {
            Ok(ops::attention(&s.put(&q)?, &s.put(&k)?, &s.put(&v)?, scale)?)
        })?;
        // blocks of a few rows of a few heads against the whole reference
        let small_budget = ops::bytes_per_score(self.opts.dtype) * lk * 3;
        self.compare("attention_blocked", &qkv_dims, |s| {
            let (q, k, v) = (s.put(&q)?, s.put(&k)?, s.put(&v)?);
            if s.device.is_cpu() && !s.generic {
                Ok(ops::attention_with_budget(&q, &k, &v, scale, usize::MAX)?)
            } else {
                Ok(ops::attention_with_budget(&q, &k, &v, scale, small_budget)?)
            }
        })?;
        let x = self.randn(&dims, 1.0)?;
        let cond = self.randn(&[n, cond_tokens, c], 1.0)?;
        let weights = self.weights();
        self.compare("attn_block", &dims, |s| {
            let block = AttnBlock::load(c, c, heads, weights.var_builder(s))?;
            Ok(block.forward(&s.put(&x)?, &block.map_cond(&s.put(&cond)?)?)?)
        })
    }

    /// The effnet resize (antialiased bicubic) to 4 x 4.5 times the size, on (N, C, H, W).
    fn resize(&mut self, dims: [usize; 4]) -> Result<()> {
        let x = self.randn(&dims, 1.0)?;
        let to = (dims[2] * 4, dims[3] * 9 / 2);
        self.compare("resize_bicubic_antialias", &dims, |s| {
            Ok(ops::resize_bicubic_antialias(&s.put(&x)?, to)?)
        })
    }

    /// A tensor read from a safetensors file onto the device in the dtype under test (on a GPU
    /// with `WUERSTCHEN_PINNED_UPLOAD=1`, through the pinned staging buffers: then the tensor
    /// spans several buffers, so that each is refilled) against the file's values.
    fn weights_file(&mut self) -> Result<()> {
        let len = if self.opts.device.is_cpu() {
            4099
        } else {
            (80 << 20) / 4 + 3
        };
        let values = self.randn(&[len], 1.0)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("w.safetensors");
        values.save_safetensors("w", &path)?;
        self.compare("weights_file", &[len], |side| {
            let weights = crate::weights::Weights::open("selftest", std::slice::from_ref(&path))?;
            Ok(weights.var_builder(side.dtype, &side.device).get(len, "w")?)
        })
    }

    /// The prompt of the pipeline checks: two images with guidance (both halves of a batch).
    fn pipeline_params() -> (PriorParams, DecoderParams) {
        let prior = PriorParams {
            prompt: "a self-test of every stage".into(),
            negative_prompt: "blurry".into(),
            width: 256,
            height: 256,
            timesteps: crate::scheduler::linear_timesteps(4),
            guidance: 4.0,
            num_images: 2,
        };
        let decoder = DecoderParams {
            prompt: prior.prompt.clone(),
            negative_prompt: String::new(),
            timesteps: decoder_timesteps(2),
            guidance: 0.0,
        };
        (prior, decoder)
    }

    /// A tiny random Würstchen v2 model through prior, decoder and VQGAN on both sides, with
    /// the same seed: the image embeddings and the images are compared.
    fn pipeline(&mut self) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let options = crate::tiny::TinyModelOptions {
            seed: self.opts.seed,
            ..Default::default()
        };
        let paths = crate::tiny::write_tiny_model(dir.path(), &options)?;
        let (prior_src, decoder_src) = (LocalDir::new(&paths.prior), LocalDir::new(&paths.decoder));
        let seed = self.opts.seed;
        self.compare_pipelines("pipeline", |rt| {
            let p = PriorPipeline::load(&prior_src, None, rt)?;
            let d = DecoderPipeline::load(&decoder_src, rt)?;
            Ok(Box::new(move || {
                let (prior, decoder) = Self::pipeline_params();
                let mut noise = TorchCpuGenerator::new(seed);
                let emb = p.run(&prior, &mut noise, &mut Silent)?;
                let images = d.run(&emb, &decoder, &mut noise, &mut Silent)?;
                Ok((emb, images))
            }))
        })
    }

    /// The same for a tiny random Stable Cascade pair, with an image prompt through the
    /// prior's image encoder: `StableCascadeUNet` (both stages) and the CLIP vision model.
    fn cascade_pipeline(&mut self) -> Result<()> {
        use crate::cascade::{CascadeDecoderPipeline, CascadePriorPipeline, ImageEncoder, PromptImage};
        let dir = tempfile::tempdir()?;
        let options = crate::tiny::TinyModelOptions {
            family: crate::cascade::Family::StableCascade,
            seed: self.opts.seed,
            ..Default::default()
        };
        let paths = crate::tiny::write_tiny_model(dir.path(), &options)?;
        let (prior_src, decoder_src) = (LocalDir::new(&paths.prior), LocalDir::new(&paths.decoder));
        // a 40x30 gradient: resized, cropped and normalised before the encoder
        let (width, height) = (40, 30);
        let rgb = (0..width * height * 3).map(|i| ((i * 7) % 256) as u8).collect();
        let image = PromptImage { rgb, width, height };
        let seed = self.opts.seed;
        self.compare_pipelines("cascade", |rt| {
            let mut p = CascadePriorPipeline::load(&prior_src, rt)?;
            p.set_image_prompts(ImageEncoder::load(&prior_src, rt)?.encode(std::slice::from_ref(&image))?)?;
            let d = CascadeDecoderPipeline::load(&decoder_src, rt)?;
            Ok(Box::new(move || {
                let (prior, decoder) = Self::pipeline_params();
                let mut noise = TorchCpuGenerator::new(seed);
                let out = p.run(&prior, &mut noise, &mut Silent)?;
                let images = d.run(&out.embeddings, Some(&out.pooled), &decoder, &mut noise, &mut Silent)?;
                Ok((out.embeddings, images))
            }))
        })
    }

    /// Loads a pipeline pair with `load` on both sides and runs what it returns: checks
    /// `{name}_embeddings` and `{name}_images`. The reference runs the CPU kernels in the same
    /// dtype: the weights and every activation are rounded alike, and what remains is how the
    /// two sides compute.
    fn compare_pipelines(&mut self, name: &str, load: impl Fn(&Runtime) -> Result<PipelineRun>) -> Result<()> {
        let run = |side: &Side| -> Result<(Tensor, Tensor, f64)> {
            let rt = Runtime {
                device: side.device.clone(),
                dtype: side.dtype,
            };
            let pipeline = load(&rt)?;
            side.device.synchronize()?;
            let t = Instant::now();
            let (emb, images) = side.run(pipeline)?;
            side.device.synchronize()?;
            Ok((emb, images, t.elapsed().as_secs_f64() * 1000.0))
        };
        let want = run(&Side {
            dtype: self.opts.dtype,
            ..self.reference()
        });
        let got = run(&self.under_test());
        let tol = pipeline_tolerance(self.opts.dtype);
        let mut results = Vec::new();
        match (want, got) {
            (Ok((we, wi, _)), Ok((ge, gi, ms))) => {
                results.push((
                    format!("{name}_embeddings"),
                    shape_name(we.dims()),
                    rel_err(&ge, &we),
                    ms,
                ));
                results.push((format!("{name}_images"), shape_name(wi.dims()), rel_err(&gi, &wi), ms));
            }
            (Err(e), _) | (_, Err(e)) => results.push((name.to_string(), String::new(), Err(e), 0.0)),
        }
        for (check, shape, err, ms) in results {
            let fault = if self.opts.inject_fault.as_deref() == Some(check.as_str()) {
                1.0
            } else {
                0.0
            };
            let check = self.check(&check, shape, tol, err.map(|e| (e + fault, ms)));
            self.push(check);
        }
        Ok(())
    }
}

/// A loaded pipeline pair's run: the image embeddings and the images.
type PipelineRun = Box<dyn FnOnce() -> Result<(Tensor, Tensor)>>;

/// Random weights that both sides of a comparison load: each tensor is drawn the first time a
/// block asks for it (whatever shape it asks for), rounded to the dtype under test, and
/// handed to every later builder, so the reference and the device see the same values.
struct RandomWeights {
    state: Mutex<(TorchCpuGenerator, HashMap<String, Tensor>)>,
    dtype: DType,
}

impl RandomWeights {
    fn var_builder(self: &Arc<Self>, side: &Side) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Shared(self.clone())), side.dtype, side.device.clone())
    }
}

struct Shared(Arc<RandomWeights>);

impl SimpleBackend for Shared {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut state = self
            .0
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("random weights: poisoned lock".into()))?;
        let (rng, drawn) = &mut *state;
        if let Some(t) = drawn.get(name) {
            return t.to_device(dev)?.to_dtype(dtype);
        }
        // 1/sqrt(fan in) keeps activations of unit size through the layers
        let fan_in: usize = s.dims().iter().skip(1).product();
        let scale = if s.rank() > 1 { (fan_in as f64).powf(-0.5) } else { 0.5 };
        let values = rng.randn(s.elem_count());
        let t = (Tensor::from_vec(values, s, &Device::Cpu)? * scale)?
            .to_dtype(self.0.dtype)?
            .to_dtype(DType::F32)?;
        drawn.insert(name.to_string(), t.clone());
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} asked for without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(dtype: DType, fault: Option<&str>) -> Vec<Check> {
        let opts = Options {
            device: Device::Cpu,
            dtype,
            shapes: Shapes::Small,
            seed: 7,
            inject_fault: fault.map(String::from),
        };
        run(&opts, &mut |_| {}).unwrap()
    }

    #[test]
    fn every_generic_form_matches_the_cpu_kernels() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let checks = small(dtype, None);
            let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
            assert!(failed.is_empty(), "{dtype:?}: {failed:#?}");
            for name in [
                "depthwise_conv",
                "res_block",
                "attn_block",
                "attention_blocked",
                "pipeline_images",
                "cascade_images",
            ] {
                assert!(checks.iter().any(|c| c.check == name), "{name} missing");
            }
            // real work was compared: errors are not all exactly zero
            assert!(checks.iter().any(|c| c.rel_err > 0.0), "{dtype:?}");
        }
    }

    #[test]
    fn a_broken_op_fails_its_check() {
        for name in ["gelu", "pipeline_images", "cascade_embeddings"] {
            let checks = small(DType::F32, Some(name));
            let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.check.as_str()).collect();
            assert!(!failed.is_empty() && failed.iter().all(|f| *f == name), "{failed:?}");
        }
    }
}
