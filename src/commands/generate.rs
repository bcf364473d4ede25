//! `wuerstchen generate`: validate everything, resolve the models and check sizes against
//! them, load once, run every job, write each PNG atomically as soon as it is done, print the
//! written paths (or JSON) on stdout.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::{
    check_interrupt, dtype_name, install_interrupt, load_decoder, log_peak_memory, plan_jobs, plan_outputs,
    runtime_spec, source, PriorSources,
};
use crate::cli::{GenerateArgs, LogArgs};
use crate::error::{InputError, Interrupted};
use crate::hub::FileSource;
use crate::output;
use crate::pipeline::{DecoderPipeline, PriorPipeline, Runtime, SizeRule};
use crate::progress::TerminalProgress;
use crate::request::{self, GenerateRequest, Job};
use crate::rng::{BoxMuller, TorchCpuGenerator};

/// What a written file records about its models and run.
pub struct RunInfo {
    pub prior: String,
    pub decoder: String,
    pub stage_c: Option<String>,
    /// the Hub commits the sources resolved to (none for local folders)
    pub commits: serde_json::Value,
    pub dtype: DType,
    pub rng: BoxMuller,
}

/// `{"prior": "<commit>", ...}` for the sources that are Hub repos.
pub fn commits(sources: &[(&str, Option<&dyn FileSource>)]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = sources
        .iter()
        .filter_map(|(name, src)| Some((name.to_string(), src.as_ref()?.commit()?.into())))
        .collect();
    map.into()
}

/// The generation record of one request, as JSON: in every PNG and embeddings file.
pub fn record(req: &GenerateRequest, info: &RunInfo) -> serde_json::Value {
    serde_json::json!({
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "seed": req.seed,
        "rng": match info.rng { BoxMuller::Vectorized => "cpu", BoxMuller::Scalar => "cpu-scalar" },
        "num_images": req.num_images,
        "width": req.width,
        "height": req.height,
        "prior_timesteps": req.prior_timesteps,
        "prior_guidance": req.prior_guidance,
        "decoder_timesteps": req.decoder_timesteps,
        "decoder_guidance": req.decoder_guidance,
        "prior": info.prior,
        "decoder": info.decoder,
        "stage_c": info.stage_c,
        "commits": info.commits,
        "dtype": dtype_name(info.dtype),
        "program": format!("wuerstchen {}", env!("CARGO_PKG_VERSION")),
    })
}

/// PNG text chunks: `parameters` in the layout the Stable Diffusion web UIs write (image
/// browsers show it), and the JSON record under `wuerstchen`.
pub fn png_metadata(req: &GenerateRequest, info: &RunInfo, n: usize) -> output::TextChunks {
    let mut a1111 = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: DDPMWuerstchen, CFG scale: {}, Seed: {}, Size: {}x{}, \
         Model: {}, Decoder: {}, Decoder steps: {}, Decoder CFG scale: {}, Dtype: {}, Version: wuerstchen {}",
        req.prompt,
        req.negative_prompt,
        req.prior_timesteps.len().saturating_sub(1),
        req.prior_guidance,
        req.seed,
        req.width,
        req.height,
        info.prior,
        info.decoder,
        req.decoder_timesteps.len().saturating_sub(1),
        req.decoder_guidance,
        dtype_name(info.dtype),
        env!("CARGO_PKG_VERSION"),
    );
    if let Some(s) = &info.stage_c {
        a1111.push_str(&format!(", Stage C: {s}"));
    }
    if let Some(c) = info.commits.get("prior").and_then(|c| c.as_str()) {
        a1111.push_str(&format!(", Model hash: {}", &c[..c.len().min(10)]));
    }
    if req.num_images > 1 {
        a1111.push_str(&format!(", Batch pos: {n}"));
    }
    let mut json = record(req, info);
    json["image_index"] = n.into();
    vec![
        ("parameters".to_string(), a1111),
        ("wuerstchen".to_string(), json.to_string()),
    ]
}

/// The file that holds one request's image embeddings: tensor `image_embeddings`
/// (N, C, h, w) f32, the JSON record in the metadata under `wuerstchen`, and how many noise
/// draws the prior made (so `decode` can continue the same random stream).
pub fn embeddings_file(embeddings: &Tensor, req: &GenerateRequest, info: &RunInfo) -> Result<Vec<u8>> {
    let t = embeddings.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
    let mut json = record(req, info);
    json["prior_noise_draws"] = serde_json::json!({
        "count": req.prior_timesteps.len(),
        "numel": t.elem_count(),
    });
    let data: Vec<u8> = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.dims().to_vec(), &data)?;
    let meta = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("wuerstchen".to_string(), json.to_string()),
    ]);
    Ok(safetensors::serialize([("image_embeddings", view)], Some(meta))?)
}

/// Writes a request's images and prints what it wrote.
pub struct Writer {
    pub overwrite: bool,
    pub json: bool,
}

impl Writer {
    pub fn images(
        &self,
        job: &Job,
        images: &[output::RgbImage],
        paths: &[PathBuf],
        info: &RunInfo,
        timings: &[(String, f64)],
    ) -> Result<()> {
        for (n, (img, path)) in images.iter().zip(paths).enumerate() {
            let png = output::encode_png(img, &png_metadata(&job.req, info, n))?;
            output::write_atomic(path, &png, self.overwrite)?;
            self.report(path, job, n, timings);
        }
        Ok(())
    }

    pub fn report(&self, path: &std::path::Path, job: &Job, n: usize, timings: &[(String, f64)]) {
        if self.json {
            let t: serde_json::Map<String, serde_json::Value> = timings
                .iter()
                .map(|(k, v)| (k.clone(), ((v * 1000.0).round() / 1000.0).into()))
                .collect();
            let line = serde_json::json!({
                "path": path.display().to_string(),
                "index": job.index,
                "image": n,
                "seed": job.req.seed,
                "prompt": job.req.prompt,
                "width": job.req.width,
                "height": job.req.height,
                "timings_s": t,
            });
            println!("{line}");
        } else {
            println!("{}", path.display());
        }
    }
}

/// How the jobs of a run went.
#[derive(Debug, Default)]
pub struct Summary {
    pub done: usize,
    pub failed: Vec<(String, anyhow::Error)>,
}

impl Summary {
    /// A half-done job's result: its value, or `None` after a failure that `keep_going` lets
    /// the run survive. Interruption always stops the run.
    fn failure<T>(&mut self, job: &Job, result: Result<T>, keep_going: bool) -> Result<Option<T>> {
        match result {
            Ok(v) => Ok(Some(v)),
            Err(err) if err.chain().any(|e| e.is::<Interrupted>()) || !keep_going => {
                Err(err.context(job.origin.clone()))
            }
            Err(err) => {
                tracing::error!("{}: {err:#}", job.origin);
                self.failed.push((job.origin.clone(), err));
                Ok(None)
            }
        }
    }

    /// A finished job's result.
    fn record(&mut self, job: &Job, result: Result<()>, keep_going: bool) -> Result<()> {
        if self.failure(job, result, keep_going)?.is_some() {
            self.done += 1;
        }
        Ok(())
    }
}

/// The noise for one request: the torch-compatible generator seeded with its seed.
fn generator(req: &GenerateRequest, kernel: BoxMuller) -> TorchCpuGenerator {
    TorchCpuGenerator::with_kernel(req.seed, kernel)
}

/// Whether to hold one stage at a time: asked for, or needed because the GPU cannot hold both
/// stages' weights (estimated from the file sizes) plus the activations of the run's most
/// demanding job (estimated from the configs and its sizes, `memory::peak_activation_bytes`).
fn staged(
    asked: bool,
    rt: &Runtime,
    prior: &PriorSources,
    decoder: &dyn FileSource,
    jobs: &[&GenerateRequest],
) -> Result<bool> {
    if asked {
        return Ok(true);
    }
    let Some(free) = crate::pipeline::free_device_memory(&rt.device) else {
        return Ok(false);
    };
    let shapes = crate::memory::ModelShapes::read(prior.prior.as_ref(), prior.stage_c.as_deref(), decoder)?;
    let activations = jobs
        .iter()
        .map(|req| {
            let run = crate::memory::RunShapes {
                width: req.width,
                height: req.height,
                num_images: req.num_images,
                prior_guidance: req.prior_guidance,
                decoder_guidance: req.decoder_guidance,
                dtype: rt.dtype,
                attention_budget: crate::ops::attention_budget(),
            };
            crate::memory::peak_activation_bytes(&run, &shapes)
        })
        .max()
        .unwrap_or(0);
    let weights = crate::memory::weight_bytes(prior.prior.as_ref(), prior.stage_c.as_deref(), decoder, rt.dtype);
    let need = weights + activations;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    tracing::info!(
        "estimated peak {:.1} GiB (weights {:.1} GiB, activations {:.1} GiB), {:.1} GiB free on the GPU",
        gib(need),
        gib(weights),
        gib(activations),
        gib(free)
    );
    let low = need > free;
    if low {
        tracing::info!("too little for both stages: loading one stage at a time");
    }
    Ok(low)
}

pub fn run(args: &GenerateArgs, log: &LogArgs) -> Result<()> {
    let interrupt = install_interrupt();
    // everything the user typed, output names included, is checked before any model file is read
    let sampling = args.prior_sampling.input(Some(&args.decoder_sampling));
    let kernel = request::parse_rng(&args.prior_sampling.rng)?;
    let (jobs, mut bad) = plan_jobs(&args.prompt, &args.batch, &sampling, args.prior_sampling.seed)?;
    let spec = runtime_spec(&args.runtime)?;
    let batch = args.prompt.prompts.is_some();
    let outputs = plan_outputs(&jobs, &args.output.output, batch, args.output.overwrite)?;
    let emb_outputs = match &args.save_embeddings {
        Some(t) => super::stages::plan_embedding_outputs(&jobs, t, batch, args.output.overwrite)?
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None; jobs.len()],
    };

    // the size rule needs only the models' small JSON files
    let prior_src = PriorSources::resolve(&args.prior_model, &args.hub, log.quiet)?;
    let decoder_src = source(&args.decoder_model.decoder, &args.hub, log.quiet)?;
    let rule = SizeRule::read(prior_src.prior.as_ref(), decoder_src.as_ref())?;
    let mut planned = Vec::with_capacity(jobs.len());
    for ((job, images), embeddings) in jobs.into_iter().zip(outputs).zip(emb_outputs) {
        let checked = rule
            .check("--width", job.req.width)
            .and_then(|_| rule.check("--height", job.req.height));
        match checked {
            Ok(()) => planned.push(Planned {
                job,
                images,
                embeddings,
            }),
            Err(e) if !batch => return Err(e.into()),
            Err(e) => {
                let e = InputError::new(format!("{}: {e}", job.origin));
                if !args.batch.keep_going {
                    return Err(e.into());
                }
                tracing::warn!("skipped: {e}");
                bad.push(e);
            }
        }
    }
    check_interrupt(&interrupt)?;

    let rt = spec.open()?;
    let info = RunInfo {
        prior: prior_src.prior.describe(),
        decoder: decoder_src.describe(),
        stage_c: prior_src.stage_c.as_ref().map(|s| s.describe()),
        commits: commits(&[
            ("prior", Some(prior_src.prior.as_ref())),
            ("stage_c", prior_src.stage_c.as_deref()),
            ("decoder", Some(decoder_src.as_ref())),
        ]),
        dtype: rt.dtype,
        rng: kernel,
    };
    let writer = Writer {
        overwrite: args.output.overwrite,
        json: args.output.json,
    };
    let mut progress = TerminalProgress::new(log.quiet, Some(interrupt.clone()));
    let requests: Vec<&GenerateRequest> = planned.iter().map(|p| &p.job.req).collect();
    let staged = staged(
        args.runtime.low_memory,
        &rt,
        &prior_src,
        decoder_src.as_ref(),
        &requests,
    )?;
    let ctx = Ctx {
        planned: &planned,
        info: &info,
        writer: &writer,
        kernel,
        keep_going: args.batch.keep_going,
        interrupt: &interrupt,
    };
    let load_prior = || prior_src.load(&rt);
    let load_decoder = || load_decoder(decoder_src.as_ref(), &rt);
    let summary = if staged {
        ctx.run_staged(load_prior, load_decoder, &mut progress)?
    } else {
        // the two stages load side by side: reading, converting and (on a GPU) uploading one
        // overlaps the other's, and tokenizer building is single-threaded
        let (prior, decoder) = std::thread::scope(|s| {
            let decoder = s.spawn(load_decoder);
            let prior = load_prior();
            let decoder = decoder
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the decoder panicked")));
            (prior, decoder)
        });
        ctx.run_together(&prior?, &decoder?, &mut progress)?
    };
    log_peak_memory();
    if batch {
        tracing::info!("{} of {} prompts done", summary.done, planned.len() + bad.len());
    }
    if !summary.failed.is_empty() {
        anyhow::bail!(
            "{} prompt(s) failed: {}",
            summary.failed.len(),
            summary
                .failed
                .iter()
                .map(|(o, _)| o.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !bad.is_empty() {
        return Err(InputError::new(format!(
            "{} prompts-file line(s) skipped (see the warnings above)",
            bad.len()
        ))
        .into());
    }
    Ok(())
}

/// A job with the files it will write.
struct Planned {
    job: Job,
    images: Vec<PathBuf>,
    embeddings: Option<PathBuf>,
}

struct Ctx<'a> {
    planned: &'a [Planned],
    info: &'a RunInfo,
    writer: &'a Writer,
    kernel: BoxMuller,
    keep_going: bool,
    interrupt: &'a AtomicBool,
}

impl Ctx<'_> {
    fn log_job(&self, i: usize, job: &Job) {
        tracing::info!(
            "[{}/{}] seed {} {}x{}: {:?}",
            i + 1,
            self.planned.len(),
            job.req.seed,
            job.req.width,
            job.req.height,
            job.req.prompt
        );
    }

    fn save_embeddings(&self, p: &Planned, emb: &Tensor) -> Result<()> {
        if let Some(path) = &p.embeddings {
            output::write_atomic(
                path,
                &embeddings_file(emb, &p.job.req, self.info)?,
                self.writer.overwrite,
            )?;
            tracing::info!("embeddings written to {}", path.display());
        }
        Ok(())
    }

    fn finish_job(&self, p: &Planned, images: &Tensor, progress: &mut TerminalProgress) -> Result<()> {
        let timings = progress.take_timings();
        let t: Vec<String> = timings.iter().map(|(s, t)| format!("{s} {t:.2}s")).collect();
        tracing::info!("seed {}: {}", p.job.req.seed, t.join(", "));
        self.writer
            .images(&p.job, &output::to_rgb8(images)?, &p.images, self.info, &timings)
    }

    /// The prior half of a job: its embeddings, and its random stream as the decoder continues it.
    fn prior_half(
        &self,
        i: usize,
        prior: &PriorPipeline,
        progress: &mut TerminalProgress,
    ) -> Result<(Tensor, TorchCpuGenerator)> {
        let p = &self.planned[i];
        check_interrupt(self.interrupt)?;
        self.log_job(i, &p.job);
        let mut noise = generator(&p.job.req, self.kernel);
        let emb = prior.run(&p.job.req.prior_params(), &mut noise, progress)?;
        self.save_embeddings(p, &emb)?;
        Ok((emb, noise))
    }

    /// The decoder half of a job, through to the written files.
    fn decoder_half(
        &self,
        i: usize,
        decoder: &DecoderPipeline,
        emb: &Tensor,
        noise: &mut TorchCpuGenerator,
        progress: &mut TerminalProgress,
    ) -> Result<()> {
        let p = &self.planned[i];
        check_interrupt(self.interrupt)?;
        let images = decoder.run(emb, &p.job.req.decoder_params(), noise, progress)?;
        self.finish_job(p, &images, progress)
    }

    /// Both stages resident: each job runs start to finish.
    fn run_together(
        &self,
        prior: &PriorPipeline,
        decoder: &DecoderPipeline,
        progress: &mut TerminalProgress,
    ) -> Result<Summary> {
        let mut summary = Summary::default();
        for i in 0..self.planned.len() {
            let result = self
                .prior_half(i, prior, progress)
                .and_then(|(emb, mut noise)| self.decoder_half(i, decoder, &emb, &mut noise, progress));
            summary.record(&self.planned[i].job, result, self.keep_going)?;
        }
        Ok(summary)
    }

    /// One stage at a time: every prior, then (prior weights freed) every decode, each job
    /// continuing its own random stream, so the images equal `run_together`'s.
    fn run_staged(
        &self,
        load_prior: impl FnOnce() -> Result<PriorPipeline>,
        load_decoder: impl FnOnce() -> Result<DecoderPipeline>,
        progress: &mut TerminalProgress,
    ) -> Result<Summary> {
        let mut summary = Summary::default();
        let mut pending = Vec::new();
        {
            let prior = load_prior()?;
            for i in 0..self.planned.len() {
                let result = self
                    .prior_half(i, &prior, progress)
                    .and_then(|(emb, noise)| Ok((emb.to_device(&Device::Cpu)?, noise)));
                if let Some((emb, noise)) = summary.failure(&self.planned[i].job, result, self.keep_going)? {
                    pending.push((i, emb, noise));
                }
            }
        }
        let decoder = load_decoder()?;
        for (i, emb, mut noise) in pending {
            let result = self.decoder_half(i, &decoder, &emb, &mut noise, progress);
            summary.record(&self.planned[i].job, result, self.keep_going)?;
        }
        Ok(summary)
    }
}
