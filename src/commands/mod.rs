//! The subcommands, each running a validated plan from `request`, and what they share:
//! device choice, model sources, Ctrl-C, writing results and a run's outcome.

pub mod bench;
pub mod cascade;
pub mod download;
pub mod generate;
pub mod info;
pub mod selftest;
pub mod stages;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::cascade::{CascadeDecoderPipeline, CascadePriorPipeline, Family};
use crate::error::{InputError, Interrupted};
use crate::hub::{self, DownloadProgress, FileSource};
use crate::output;
use crate::pipeline::{DecoderConfigs, DecoderPipeline, PriorConfigs, PriorPipeline, Runtime};
use crate::progress::LoadBars;
use crate::record::{GenerationRecord, RunInfo};
use crate::request::{DeviceSpec, GeneratePlan, Job, JobPlan, ModelSpec, RuntimeSpec};

impl RuntimeSpec {
    /// Opens the device: the one asked for (failing if it cannot be opened), or by default
    /// the first GPU of a CUDA build when one can be opened, else the CPU. The default dtype
    /// is f32 on the CPU, bf16 on a GPU that has bf16 kernels and f16 on older GPUs.
    pub fn open(&self) -> Result<Runtime> {
        let device = match self.device {
            Some(DeviceSpec::Cpu) => Device::Cpu,
            Some(DeviceSpec::Cuda(i)) => Device::new_cuda(i)
                .with_context(|| format!("cannot open CUDA device {i} (is a GPU present and the driver loaded?)"))?,
            None if cfg!(feature = "cuda") => Device::new_cuda(0).unwrap_or_else(|e| {
                tracing::info!("no usable GPU ({}), running on the CPU", first_line(&e.to_string()));
                Device::Cpu
            }),
            None => Device::Cpu,
        };
        crate::ops::set_attention_budget(self.attention_budget);
        // the host-overhead switches that come with CUDA graphs (opt-in until proven on a GPU)
        #[cfg(feature = "cuda")]
        if let (Ok(dev), true) = (device.as_cuda_device(), crate::graph::enabled()) {
            // SAFETY: candle runs everything of a device on its one stream, so cudarc's events
            // ordering slices between streams have nothing to order; without them a capture
            // records no event that a later launch outside the graph would wait on (and every
            // launch saves its event calls).
            unsafe { dev.disable_event_tracking() };
            if let Err(e) = crate::pipeline::keep_freed_device_memory(&device) {
                tracing::warn!("{e}; freed device memory goes back to the driver");
            }
        }
        // candle's switch for cuBLAS' f32 products (off, as in torch); process-wide
        candle_core::cuda::set_gemm_reduced_precision_f32(self.tf32);
        let capability = crate::pipeline::compute_capability(&device);
        let dtype = match self.dtype {
            Some(DType::BF16) if !has_bf16(capability) => {
                return Err(InputError::new(format!(
                    "bf16 needs a GPU of compute capability 8.0 or newer, this one has {}; use --dtype f16 or f32",
                    capability_name(capability)
                ))
                .into())
            }
            Some(dtype) => dtype,
            None => default_dtype(device.is_cpu(), capability),
        };
        match capability {
            Some(_) => tracing::info!(
                "running on {:?} (compute capability {}) in {}",
                device,
                capability_name(capability),
                dtype_name(dtype)
            ),
            None => tracing::info!("running on {:?} in {}", device, dtype_name(dtype)),
        }
        if self.tf32 && device.is_cuda() && dtype == DType::F32 {
            tracing::info!("f32 matrix products in TF32");
        }
        Ok(Runtime { device, dtype })
    }
}

/// Whether candle has bf16 kernels for a device: everywhere but on GPUs older than compute
/// capability 8.0 (Ampere), for which its CUDA kernels are built without bf16.
fn has_bf16(capability: Option<(u32, u32)>) -> bool {
    capability.is_none_or(|(major, _)| major >= 8)
}

/// The dtype `generate` runs in on this machine by default (see [`RuntimeSpec::open`]).
pub fn machine_default_dtype() -> DType {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return default_dtype(false, crate::pipeline::compute_capability(&device));
    }
    DType::F32
}

/// The dtype when none is asked for: f32 on the CPU; on a GPU bf16 (f16's range without its
/// overflows) where it has bf16 kernels, else f16. Either way the sampling state and the norm
/// statistics stay in f32.
pub fn default_dtype(cpu: bool, capability: Option<(u32, u32)>) -> DType {
    if cpu {
        DType::F32
    } else if has_bf16(capability) {
        DType::BF16
    } else {
        DType::F16
    }
}

fn capability_name(capability: Option<(u32, u32)>) -> String {
    capability.map_or("unknown".into(), |(major, minor)| format!("{major}.{minor}"))
}

/// The first line of a message (candle appends a backtrace to some errors).
pub fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// Resolves a model option (repo id or folder) to its source, with download bars.
pub fn source(spec: &str, revision: &str, quiet: bool) -> Result<Box<dyn FileSource>> {
    let bars: Arc<dyn DownloadProgress> = Arc::new(crate::progress::DownloadBars::new(quiet));
    hub::resolve(spec, Some(revision), Some(bars))
}

/// Where the prior comes from: its pipeline, and optionally other Stage C weights.
pub struct PriorSources {
    pub prior: Box<dyn FileSource>,
    pub stage_c: Option<Box<dyn FileSource>>,
}

impl PriorSources {
    pub fn resolve(m: &ModelSpec, quiet: bool) -> Result<Self> {
        Ok(Self {
            prior: source(&m.prior, m.revision_for("prior"), quiet)?,
            stage_c: m
                .stage_c
                .as_deref()
                .map(|s| source(s, m.revision_for("stage_c"), quiet))
                .transpose()?,
        })
    }

    /// The family of this prior and `decoder` (read from their `model_index.json`), or an
    /// input error when they are not one family's pair or the flags do not fit the family
    /// (`lite` is Stable Cascade's; `--stage-c` is v2's so far).
    pub fn pair_family(&self, decoder: &dyn FileSource, lite: bool) -> Result<Family> {
        let (prior_family, decoder_family) = (Family::of(self.prior.as_ref())?, Family::of(decoder)?);
        let example = match prior_family {
            Family::WuerstchenV2 => "warp-ai/wuerstchen",
            Family::StableCascade => "stabilityai/stable-cascade",
        };
        let message = if prior_family != decoder_family {
            format!(
                "--prior {} is a {} prior but --decoder {} is a {} decoder; pair it with a {} decoder (e.g. {example})",
                self.prior.describe(),
                prior_family.name(),
                decoder.describe(),
                decoder_family.name(),
                prior_family.name(),
            )
        } else if lite && prior_family == Family::WuerstchenV2 {
            "the lite networks are Stable Cascade's; --prior and --decoder are Würstchen v2 pipelines".into()
        } else if self.stage_c.is_some() && prior_family == Family::StableCascade {
            "--stage-c is not supported for Stable Cascade models yet".into()
        } else {
            return Ok(prior_family);
        };
        Err(InputError::new(message).into())
    }

    /// Every file this prior and `decoder` load in `dtype`, for either family (`lite`: Stable
    /// Cascade's lite networks).
    pub fn pair_files(&self, decoder: &dyn FileSource, lite: bool, dtype: DType) -> Result<Vec<std::path::PathBuf>> {
        let (prior, stage_c) = (self.prior.as_ref(), self.stage_c.as_deref());
        Ok(match self.pair_family(decoder, lite)? {
            Family::WuerstchenV2 => {
                let mut files = PriorPipeline::locate(prior, stage_c, dtype)?;
                files.extend(DecoderPipeline::locate(decoder, dtype)?);
                files
            }
            Family::StableCascade => {
                let mut files = CascadePriorPipeline::locate(prior, lite, dtype)?;
                files.extend(CascadeDecoderPipeline::locate(decoder, lite, dtype)?);
                files
            }
        })
    }

    /// Reads and validates the prior's configs.
    pub fn configs(&self) -> Result<PriorConfigs> {
        PriorConfigs::read(self.prior.as_ref(), self.stage_c.as_deref())
    }

    /// What a run's files record about its models and inputs, `decoder` being the decoder's
    /// source where the run has one.
    pub fn run_info(&self, decoder: Option<&dyn FileSource>, dtype: DType, plan: &GeneratePlan) -> RunInfo {
        RunInfo {
            prior: self.prior.describe(),
            decoder: decoder.map(|d| d.describe()).unwrap_or_default(),
            stage_c: self.stage_c.as_ref().map(|s| s.describe()),
            lite: plan.models.lite,
            image_prompts: plan.image_prompts.iter().map(|p| p.display().to_string()).collect(),
            commits: commits(&[
                ("prior", Some(self.prior.as_ref())),
                ("stage_c", self.stage_c.as_deref()),
                ("decoder", decoder),
            ]),
            dtype: dtype_name(dtype).to_string(),
            rng: plan.rng,
        }
    }

    /// Loads the prior stage, with a bar of the bytes loaded, logging how long it took.
    pub fn load(&self, configs: &PriorConfigs, rt: &Runtime, bars: &LoadBars) -> Result<PriorPipeline> {
        let (prior, stage_c) = (self.prior.as_ref(), self.stage_c.as_deref());
        let files = PriorPipeline::locate(prior, stage_c, rt.dtype);
        let load = || PriorPipeline::load_with(configs, prior, stage_c, rt);
        load_stage(bars, "prior", files, rt, load)
            .with_context(|| format!("loading the prior from {}", prior.describe()))
    }
}

/// Loads the decoder stage, with a bar of the bytes loaded, logging how long it took.
pub fn load_decoder(
    src: &dyn FileSource,
    configs: &DecoderConfigs,
    rt: &Runtime,
    bars: &LoadBars,
) -> Result<DecoderPipeline> {
    let files = DecoderPipeline::locate(src, rt.dtype);
    let load = || DecoderPipeline::load_with(configs, src, rt);
    load_stage(bars, "decoder", files, rt, load).with_context(|| format!("loading the decoder from {}", src.describe()))
}

/// Runs `load` with a bar over the bytes of the weight files among `files`, waits for the
/// uploads it queued (see [`finish_uploads`]), then logs its time.
pub(super) fn load_stage<T>(
    bars: &LoadBars,
    stage: &str,
    files: Result<Vec<std::path::PathBuf>>,
    rt: &Runtime,
    load: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let weights = files
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"));
    let total = weights.filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    let bar = bars.stage(stage, total);
    let t = std::time::Instant::now();
    let meter = bar.clone();
    let out = crate::weights::metered(
        move |n| meter.inc(n),
        || {
            let loaded = load()?;
            finish_uploads(rt)?;
            Ok(loaded)
        },
    );
    bar.finish_and_clear();
    if out.is_ok() {
        tracing::info!("{stage} loaded in {:.2}s", t.elapsed().as_secs_f64());
    }
    out
}

/// Waits until the uploads and casts this thread issued have run. The stages load on two
/// threads, and work queued on a GPU from one thread is not ordered before another thread's
/// use of its results: each loader synchronises before handing its weights over.
fn finish_uploads(rt: &Runtime) -> Result<()> {
    rt.device
        .synchronize()
        .context("waiting for the weights to reach the device")
}

/// Ctrl-C: the first press asks the running work to stop after the current step (finished
/// files are kept, exit code 130); a second press exits at once.
pub fn install_interrupt() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: stopping after the current step (Ctrl-C again to quit now)");
    });
    if let Err(e) = installed {
        tracing::debug!("no Ctrl-C handler: {e}");
    }
    flag
}

pub fn check_interrupt(flag: &AtomicBool) -> Result<()> {
    if flag.load(Ordering::SeqCst) {
        Err(Interrupted.into())
    } else {
        Ok(())
    }
}

/// Peak resident memory of this process, from /proc (Linux); `None` elsewhere.
pub fn peak_host_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn log_peak_memory() {
    if let Some(b) = peak_host_memory() {
        tracing::info!("peak host memory {:.2} GiB", b as f64 / (1u64 << 30) as f64);
    }
}

pub fn tiny_model(out: &std::path::Path, opts: &crate::tiny::TinyModelOptions) -> Result<()> {
    let paths = crate::tiny::write_tiny_model(out, opts)?;
    println!("{}", paths.prior.display());
    println!("{}", paths.decoder.display());
    Ok(())
}

/// The Hub commits of those sources that are Hub repos, by name.
pub fn commits(sources: &[(&str, Option<&dyn FileSource>)]) -> BTreeMap<String, String> {
    sources
        .iter()
        .filter_map(|(name, src)| Some((name.to_string(), src.as_ref()?.commit()?)))
        .collect()
}

/// Writes a request's files and says what it wrote: the path on stdout, or with `json` one
/// JSON line per file (its path, index, image number, timings and the request's record).
pub struct Writer {
    pub overwrite: bool,
    pub json: bool,
    /// how many images shared the forward passes that the timings are of
    pub batch_images: usize,
}

impl From<&JobPlan> for Writer {
    fn from(plan: &JobPlan) -> Self {
        Self {
            overwrite: plan.overwrite,
            json: plan.json,
            batch_images: 1,
        }
    }
}

impl Writer {
    pub fn images(
        &self,
        job: &Job,
        images: &[output::RgbImage],
        paths: &[PathBuf],
        record: &GenerationRecord,
        timings: &[(String, f64)],
    ) -> Result<()> {
        for (n, (img, path)) in images.iter().zip(paths).enumerate() {
            let png = output::encode_png(img, &record.png_chunks(n))?;
            output::write_atomic(path, &png, self.overwrite)?;
            self.report(path, job, n, record, timings);
        }
        Ok(())
    }

    pub fn report(&self, path: &Path, job: &Job, n: usize, record: &GenerationRecord, timings: &[(String, f64)]) {
        if !self.json {
            println!("{}", path.display());
            return;
        }
        #[derive(serde::Serialize)]
        struct Line<'a> {
            path: String,
            index: usize,
            image: usize,
            timings_s: BTreeMap<&'a str, f64>,
            batch_images: usize,
            #[serde(flatten)]
            record: &'a GenerationRecord,
        }
        let line = Line {
            path: path.display().to_string(),
            index: job.index,
            image: n,
            timings_s: timings
                .iter()
                .map(|(k, v)| (k.as_str(), (v * 1000.0).round() / 1000.0))
                .collect(),
            batch_images: self.batch_images,
            record,
        };
        println!("{}", serde_json::to_string(&line).unwrap_or_default());
    }
}

/// `--skip-existing`: reports the jobs whose files all exist (with `--json`, a line per file
/// with `"skipped": true`) and says whether nothing is left to run, so that a finished batch
/// returns before any model is resolved or loaded.
pub fn report_done(plan: &JobPlan) -> bool {
    if plan.done.is_empty() {
        return false;
    }
    let total = plan.jobs.len() + plan.skipped.len() + plan.done.len();
    tracing::info!("skipped {} of {total} prompts (outputs exist)", plan.done.len());
    if plan.json {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            skipped: bool,
            path: String,
            index: usize,
            image: usize,
            seed: u64,
            prompt: &'a str,
        }
        for p in &plan.done {
            // what the command reports when it writes: the images, or `prior`'s embeddings
            let files: Vec<&PathBuf> = if p.images.is_empty() {
                p.embeddings.iter().collect()
            } else {
                p.images.iter().collect()
            };
            for (image, path) in files.into_iter().enumerate() {
                let line = Line {
                    skipped: true,
                    path: path.display().to_string(),
                    index: p.job.index,
                    image,
                    seed: p.job.req.seed,
                    prompt: &p.job.req.prompt,
                };
                println!("{}", serde_json::to_string(&line).unwrap_or_default());
            }
        }
    }
    let nothing_left = plan.jobs.is_empty();
    if nothing_left {
        tracing::info!("every output exists: nothing to do, no model loaded");
    }
    nothing_left
}

/// How the jobs of a run went: the one place that decides whether a failed job stops the
/// run (`--keep-going`) and what the run's outcome is.
#[derive(Debug, Default)]
pub struct Summary {
    pub done: usize,
    pub failed: Vec<(String, anyhow::Error)>,
}

impl Summary {
    /// A half-done job's result: its value, or `None` after a failure that `keep_going` lets
    /// the run survive. Interruption always stops the run.
    pub fn failure<T>(&mut self, origin: &str, result: Result<T>, keep_going: bool) -> Result<Option<T>> {
        match result {
            Ok(v) => Ok(Some(v)),
            Err(err) if err.chain().any(|e| e.is::<Interrupted>()) || !keep_going => {
                Err(err.context(origin.to_string()))
            }
            Err(err) => {
                tracing::error!("{origin}: {err:#}");
                self.failed.push((origin.to_string(), err));
                Ok(None)
            }
        }
    }

    /// An error that failed a whole batch: each of its jobs (`origins`) failed with it.
    pub fn batch_failure<'o>(
        &mut self,
        origins: impl IntoIterator<Item = &'o str>,
        err: anyhow::Error,
        keep_going: bool,
    ) -> Result<()> {
        let message = format!("{err:#}");
        let mut err = Some(err);
        for origin in origins {
            let err = err.take().unwrap_or_else(|| anyhow::anyhow!("{message}"));
            self.failure::<()>(origin, Err(err), keep_going)?;
        }
        Ok(())
    }

    /// A finished job's result.
    pub fn record(&mut self, origin: &str, result: Result<()>, keep_going: bool) -> Result<()> {
        if self.failure(origin, result, keep_going)?.is_some() {
            self.done += 1;
        }
        Ok(())
    }

    /// The run's outcome: an error when prompts failed or prompts-file lines were skipped.
    pub fn finish(self, plan: &JobPlan) -> Result<()> {
        let total = plan.jobs.len() + plan.skipped.len() + plan.done.len();
        if !plan.done.is_empty() {
            tracing::info!(
                "{} of {total} prompts done, {} skipped (outputs exist)",
                self.done,
                plan.done.len()
            );
        } else if plan.batch {
            tracing::info!("{} of {total} prompts done", self.done);
        }
        if !self.failed.is_empty() {
            let names: Vec<&str> = self.failed.iter().map(|(o, _)| o.as_str()).collect();
            anyhow::bail!("{} prompt(s) failed: {}", self.failed.len(), names.join(", "));
        }
        if !plan.skipped.is_empty() {
            return Err(InputError::new(format!(
                "{} prompts-file line(s) skipped (see the warnings above)",
                plan.skipped.len()
            ))
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_follows_the_device() {
        assert_eq!(default_dtype(true, None), DType::F32);
        // H100/H200 (9.0), A100 (8.0), RTX 4090 (8.9): bf16
        for cc in [(9, 0), (8, 0), (8, 9), (12, 0)] {
            assert_eq!(default_dtype(false, Some(cc)), DType::BF16, "{cc:?}");
        }
        // V100 (7.0), T4 (7.5), P100 (6.0): no bf16 kernels in candle
        for cc in [(7, 0), (7, 5), (6, 0)] {
            assert_eq!(default_dtype(false, Some(cc)), DType::F16, "{cc:?}");
            assert!(!has_bf16(Some(cc)));
        }
        // a GPU whose capability cannot be read keeps the usual default
        assert_eq!(default_dtype(false, None), DType::BF16);
        assert!(has_bf16(None));
    }
}
