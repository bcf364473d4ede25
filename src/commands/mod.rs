//! The subcommands, and what they share: device choice, model sources, batches of jobs,
//! Ctrl-C, and writing results.

pub mod bench;
pub mod download;
pub mod generate;
pub mod selftest;
pub mod stages;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::cli::{BatchArgs, HubArgs, PriorModelArgs, PromptArgs, RuntimeArgs, TinyModelArgs};
use crate::error::{InputError, Interrupted};
use crate::hub::{self, DownloadProgress, FileSource};
use crate::output::{self, NameFields};
use crate::pipeline::{DecoderPipeline, PriorPipeline, Runtime};
use crate::prompts::{self, Shard};
use crate::request::{self, DeviceSpec, Job, SamplingInput};

/// Device and dtype as requested, validated but not yet opened; `None` means the default.
pub struct RuntimeSpec {
    pub device: Option<DeviceSpec>,
    pub dtype: Option<DType>,
    /// bytes one attention block's scores may take
    pub attention_budget: usize,
}

pub fn runtime_spec(args: &RuntimeArgs) -> Result<RuntimeSpec> {
    Ok(RuntimeSpec {
        device: args.device.as_deref().map(request::parse_device).transpose()?,
        dtype: args.dtype.as_deref().map(request::parse_dtype).transpose()?,
        attention_budget: request::parse_memory_size("--attention-budget", &args.attention_budget)?,
    })
}

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
        Ok(Runtime { device, dtype })
    }
}

/// Whether candle has bf16 kernels for a device: everywhere but on GPUs older than compute
/// capability 8.0 (Ampere), for which its CUDA kernels are built without bf16.
fn has_bf16(capability: Option<(u32, u32)>) -> bool {
    capability.is_none_or(|(major, _)| major >= 8)
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

/// Resolves a model option to its source, with download bars.
pub fn source(spec: &str, hub: &HubArgs, quiet: bool) -> Result<Box<dyn FileSource>> {
    let bars: Arc<dyn DownloadProgress> = Arc::new(crate::progress::DownloadBars::new(quiet));
    hub::resolve(spec, Some(&hub.revision), Some(bars))
}

/// Where the prior comes from: its pipeline, and optionally other Stage C weights.
pub struct PriorSources {
    pub prior: Box<dyn FileSource>,
    pub stage_c: Option<Box<dyn FileSource>>,
}

impl PriorSources {
    pub fn resolve(m: &PriorModelArgs, hub: &HubArgs, quiet: bool) -> Result<Self> {
        Ok(Self {
            prior: source(&m.prior, hub, quiet)?,
            stage_c: m.stage_c.as_deref().map(|s| source(s, hub, quiet)).transpose()?,
        })
    }

    /// Loads the prior stage, logging how long it took.
    pub fn load(&self, rt: &Runtime) -> Result<PriorPipeline> {
        let t = std::time::Instant::now();
        let p = PriorPipeline::load(self.prior.as_ref(), self.stage_c.as_deref(), rt)
            .with_context(|| format!("loading the prior from {}", self.prior.describe()))?;
        finish_uploads(rt)?;
        tracing::info!("prior loaded in {:.2}s", t.elapsed().as_secs_f64());
        Ok(p)
    }
}

/// Loads the decoder stage, logging how long it took.
pub fn load_decoder(src: &dyn FileSource, rt: &Runtime) -> Result<DecoderPipeline> {
    let t = std::time::Instant::now();
    let d = DecoderPipeline::load(src, rt).with_context(|| format!("loading the decoder from {}", src.describe()))?;
    finish_uploads(rt)?;
    tracing::info!("decoder loaded in {:.2}s", t.elapsed().as_secs_f64());
    Ok(d)
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

/// The requests of a run: the `--prompt`, or the `--prompts` file's lines (sharded). Bad
/// lines are errors; with `--keep-going` they are returned beside the good jobs instead.
pub fn plan_jobs(
    prompt: &PromptArgs,
    batch: &BatchArgs,
    sampling: &SamplingInput,
    seed: Option<Option<u64>>,
) -> Result<(Vec<Job>, Vec<InputError>)> {
    let (base_seed, picked) = request::seed_or_random(seed);
    if picked {
        tracing::info!("seed {base_seed} (picked at random; pass --seed {base_seed} to repeat)");
    }
    let shard = batch.shard.as_deref().map(Shard::parse).transpose()?;
    let Some(file) = &prompt.prompts else {
        if shard.is_some() {
            return Err(InputError::new("--shard needs --prompts").into());
        }
        let text = prompt.prompt.as_deref().unwrap_or_default();
        let req = request::generate_request(text, &prompt.negative_prompt, sampling, base_seed)?;
        return Ok((
            vec![Job {
                index: 0,
                origin: "--prompt".into(),
                req,
                output: None,
            }],
            vec![],
        ));
    };
    let bytes = if file == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading prompts from stdin")?;
        buf
    } else {
        std::fs::read(file).map_err(|e| InputError::new(format!("cannot read prompts file {file}: {e}")))?
    };
    let name = if file == "-" { "<stdin>" } else { file.as_str() };
    let mut jobs = Vec::new();
    let mut bad = Vec::new();
    for entry in prompts::parse(name, &bytes) {
        let job = entry.and_then(|e| request::job_from_entry(name, &e, sampling, &prompt.negative_prompt, base_seed));
        match job {
            Ok(j) if shard.is_none_or(|s| s.takes(j.index)) => jobs.push(j),
            Ok(_) => {}
            Err(e) if batch.keep_going => {
                tracing::warn!("skipped: {e}");
                bad.push(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if jobs.is_empty() && bad.is_empty() {
        tracing::warn!(
            "{name}: no prompts{}",
            if shard.is_some() { " in this shard" } else { "" }
        );
    }
    Ok((jobs, bad))
}

/// Where each job's files go: computed, checked (folder writable, nothing overwritten without
/// `--overwrite`, no two files with one name) before any model loads.
pub fn plan_outputs(jobs: &[Job], template: &str, batch: bool, overwrite: bool) -> Result<Vec<Vec<PathBuf>>> {
    let mut all: std::collections::HashMap<PathBuf, String> = Default::default();
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let t = job.output.as_deref().unwrap_or(template);
        let paths: Vec<PathBuf> = (0..job.req.num_images)
            .map(|n| {
                let fields = NameFields {
                    index: job.index,
                    image: n,
                    seed: job.req.seed,
                    prompt: &job.req.prompt,
                };
                output::output_path(t, &fields, job.req.num_images > 1, batch && job.output.is_none())
            })
            .collect();
        for p in &paths {
            output::check_writable(p, overwrite).map_err(|e| InputError::new(format!("{}: {e}", job.origin)))?;
            if let Some(other) = all.insert(p.clone(), job.origin.clone()) {
                return Err(InputError::new(format!(
                    "{} and {} would both write {}; use {{index}} or {{seed}} in the output name",
                    other,
                    job.origin,
                    p.display()
                ))
                .into());
            }
        }
        out.push(paths);
    }
    Ok(out)
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

pub fn tiny_model(args: &TinyModelArgs) -> Result<()> {
    let paths = crate::tiny::write_tiny_model(
        &args.out,
        &crate::tiny::TinyModelOptions {
            seed: args.seed,
            overwrite: args.overwrite,
            size: args.size.parse()?,
        },
    )?;
    println!("{}", paths.prior.display());
    println!("{}", paths.decoder.display());
    Ok(())
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
