//! `wuerstchen generate`: validate, resolve the models, check sizes against them, load once,
//! generate, write PNGs atomically, print the written paths on stdout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::cli::{GenerateArgs, LogArgs, ModelArgs, RuntimeArgs};
use crate::hub::{self, FileSource};
use crate::output::{self, NameFields};
use crate::pipeline::{DecoderPipeline, PriorPipeline, Runtime, SizeRule};
use crate::progress::{Progress, TerminalProgress};
use crate::request::{self, DeviceSpec, GenerateRequest};
use crate::rng::TorchCpuGenerator;

/// Device and dtype as requested, validated but not yet opened.
pub struct RuntimeSpec {
    pub device: DeviceSpec,
    pub dtype: DType,
}

pub fn runtime_spec(args: &RuntimeArgs) -> Result<RuntimeSpec> {
    let device = match &args.device {
        Some(d) => request::parse_device(d)?,
        None if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() => DeviceSpec::Cuda(0),
        None => DeviceSpec::Cpu,
    };
    let dtype = match &args.dtype {
        Some(d) => request::parse_dtype(d)?,
        None if device == DeviceSpec::Cpu => DType::F32,
        None => DType::BF16,
    };
    Ok(RuntimeSpec { device, dtype })
}

impl RuntimeSpec {
    pub fn open(&self) -> Result<Runtime> {
        let device = match self.device {
            DeviceSpec::Cpu => Device::Cpu,
            DeviceSpec::Cuda(i) => Device::new_cuda(i)
                .with_context(|| format!("cannot open CUDA device {i} (is a GPU present and the driver loaded?)"))?,
        };
        Ok(Runtime { device, dtype: self.dtype })
    }
}

/// The model sources named on the command line.
pub struct Sources {
    pub prior: Box<dyn FileSource>,
    pub decoder: Box<dyn FileSource>,
    pub stage_c: Option<Box<dyn FileSource>>,
}

impl Sources {
    pub fn resolve(m: &ModelArgs) -> Result<Self> {
        let revision = Some(m.revision.as_str());
        Ok(Self {
            prior: hub::resolve(&m.prior, revision, None)?,
            decoder: hub::resolve(&m.decoder, revision, None)?,
            stage_c: m.stage_c.as_deref().map(|s| hub::resolve(s, revision, None)).transpose()?,
        })
    }
}

/// Both stages, loaded once for any number of requests.
pub struct Session {
    pub prior: PriorPipeline,
    pub decoder: DecoderPipeline,
    pub sources: Sources,
}

impl Session {
    pub fn load(sources: Sources, rt: &Runtime) -> Result<Self> {
        let t = Instant::now();
        let prior = PriorPipeline::load(sources.prior.as_ref(), sources.stage_c.as_deref(), rt)
            .with_context(|| format!("loading the prior from {}", sources.prior.describe()))?;
        tracing::info!("prior loaded from {} in {:.2}s", sources.prior.describe(), t.elapsed().as_secs_f64());
        let t = Instant::now();
        let decoder = DecoderPipeline::load(sources.decoder.as_ref(), rt)
            .with_context(|| format!("loading the decoder from {}", sources.decoder.describe()))?;
        tracing::info!("decoder loaded from {} in {:.2}s", sources.decoder.describe(), t.elapsed().as_secs_f64());
        Ok(Self { prior, decoder, sources })
    }

    /// Runs one request: prior, decoder, VQGAN -> 8-bit images.
    pub fn generate(&self, req: &GenerateRequest, progress: &mut dyn Progress) -> Result<Vec<output::RgbImage>> {
        let mut noise = TorchCpuGenerator::new(req.seed);
        let embeddings = self.prior.run(&req.prior_params(), &mut noise, progress)?;
        let images = self.decoder.run(&embeddings, &req.decoder_params(), &mut noise, progress)?;
        output::to_rgb8(&images)
    }
}

/// The PNG text chunks that record how an image was made: `parameters` in the layout the
/// Stable Diffusion web UIs write (image browsers show it), and the same as JSON.
pub fn metadata(req: &GenerateRequest, sources: &Sources, dtype: DType, n: usize) -> output::TextChunks {
    let describe = |s: &dyn FileSource| s.describe();
    let stage_c = sources.stage_c.as_deref().map(describe);
    let mut a1111 = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: DDPMWuerstchen, CFG scale: {}, Seed: {}, Size: {}x{}, \
         Model: {}, Decoder: {}, Decoder steps: {}, Decoder CFG scale: {}, Dtype: {:?}, Version: wuerstchen {}",
        req.prompt,
        req.negative_prompt,
        req.prior_timesteps.len() - 1,
        req.prior_guidance,
        req.seed,
        req.width,
        req.height,
        describe(sources.prior.as_ref()),
        describe(sources.decoder.as_ref()),
        req.decoder_timesteps.len() - 1,
        req.decoder_guidance,
        dtype,
        env!("CARGO_PKG_VERSION"),
    );
    if let Some(s) = &stage_c {
        a1111.push_str(&format!(", Stage C: {s}"));
    }
    let json = serde_json::json!({
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "seed": req.seed,
        "image_index": n,
        "num_images": req.num_images,
        "width": req.width,
        "height": req.height,
        "prior_timesteps": req.prior_timesteps,
        "prior_guidance": req.prior_guidance,
        "decoder_timesteps": req.decoder_timesteps,
        "decoder_guidance": req.decoder_guidance,
        "prior": describe(sources.prior.as_ref()),
        "decoder": describe(sources.decoder.as_ref()),
        "stage_c": stage_c,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "program": format!("wuerstchen {}", env!("CARGO_PKG_VERSION")),
    });
    vec![("parameters".to_string(), a1111), ("wuerstchen".to_string(), json.to_string())]
}

pub fn run(args: &GenerateArgs, log: &LogArgs) -> Result<()> {
    // everything the user typed, checked before any file is read
    let (seed, picked) = crate::cli::seed_or_random(args.sampling.seed);
    let req = request::generate_request(&args.prompt.prompt, &args.prompt.negative_prompt, &args.sampling.input(), seed)?;
    let spec = runtime_spec(&args.runtime)?;
    let several = req.num_images > 1;
    let paths: Vec<PathBuf> = (0..req.num_images)
        .map(|n| {
            output::output_path(&args.output.output, &NameFields { index: 0, n, seed, prompt: &req.prompt }, several)
        })
        .collect();
    for p in &paths {
        output::check_writable(p, args.output.overwrite)?;
    }
    if picked {
        tracing::info!("seed {seed} (picked at random; pass --seed {seed} to repeat)");
    }
    // the model's size rule needs only its small JSON files
    let sources = Sources::resolve(&args.models)?;
    let rule = SizeRule::read(sources.prior.as_ref(), sources.decoder.as_ref())?;
    rule.check("--width", req.width)?;
    rule.check("--height", req.height)?;

    let rt = spec.open()?;
    tracing::info!("running on {:?} in {:?}", rt.device, rt.dtype);
    let session = Session::load(sources, &rt)?;
    let mut progress = TerminalProgress::new(log.quiet);
    let t = Instant::now();
    let images = session.generate(&req, &mut progress)?;
    let timings: Vec<String> = progress.timings.iter().map(|(s, t)| format!("{s} {t:.2}s")).collect();
    tracing::info!("generated in {:.2}s ({})", t.elapsed().as_secs_f64(), timings.join(", "));
    for (n, (img, path)) in images.iter().zip(&paths).enumerate() {
        let png = output::encode_png(img, &metadata(&req, &session.sources, rt.dtype, n))?;
        output::write_atomic(path, &png, args.output.overwrite)?;
        println!("{}", path.display());
    }
    Ok(())
}
