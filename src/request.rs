//! User input -> validated plans that the commands run. Every check of what a user typed
//! lives here and fails with an `InputError` (exit code 2) before any model loads; the command
//! line (`src/cli.rs`, part of the binary) only fills in the `*Input` values, so nothing here
//! knows clap.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::DType;

use crate::error::InputError;
use crate::output;
use crate::pipeline::{DecoderParams, PriorParams};
use crate::prompts::{self, Entry, PromptLine, Shard};
use crate::record::GenerationRecord;
use crate::rng::BoxMuller;
use crate::scheduler;

type Result<T> = std::result::Result<T, InputError>;

/// One image request, validated (sizes are checked against the model later, by `SizeRule`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub prior_timesteps: Vec<f32>,
    /// Whether nothing chose the prior's schedule (no steps, no list, no recorded one), so
    /// `prior_timesteps` is Würstchen v2's default: a model family with another default
    /// replaces it (Stable Cascade: [`crate::cascade::DEFAULT_PRIOR_STEPS`]).
    pub prior_schedule_defaulted: bool,
    pub prior_guidance: f64,
    pub decoder_timesteps: Vec<f32>,
    pub decoder_guidance: f64,
    pub num_images: usize,
    pub seed: u64,
}

impl GenerateRequest {
    pub fn prior_params(&self) -> PriorParams {
        PriorParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            timesteps: self.prior_timesteps.clone(),
            guidance: self.prior_guidance,
            num_images: self.num_images,
        }
    }

    pub fn decoder_params(&self) -> DecoderParams {
        DecoderParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            timesteps: self.decoder_timesteps.clone(),
            guidance: self.decoder_guidance,
        }
    }

    /// Whether two requests can run through both stages as one batch: everything but the
    /// prompts, the number of images and the seed equal.
    pub fn shares_pass(&self, other: &Self) -> bool {
        self.prior_params().shares_pass(&other.prior_params())
            && self.decoder_params().shares_pass(&other.decoder_params())
    }
}

/// The sampling options as typed, before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingInput {
    pub width: usize,
    pub height: usize,
    pub prior_steps: Option<usize>,
    pub prior_timesteps: Option<Vec<f64>>,
    pub prior_guidance: f64,
    pub decoder_steps: Option<usize>,
    pub decoder_timesteps: Option<Vec<f64>>,
    pub decoder_guidance: f64,
    pub num_images: usize,
}

impl SamplingInput {
    /// These options with a prompts-file line's overrides applied (a line's steps replace
    /// the command line's explicit schedule and the other way round).
    pub fn with_line(&self, l: &PromptLine) -> SamplingInput {
        let mut s = self.clone();
        if l.prior_steps.is_some() || l.prior_timesteps.is_some() {
            s.prior_steps = l.prior_steps;
            s.prior_timesteps = l.prior_timesteps.clone();
        }
        s.width = l.width.unwrap_or(s.width);
        s.height = l.height.unwrap_or(s.height);
        s.prior_guidance = l.prior_guidance.unwrap_or(s.prior_guidance);
        s.decoder_steps = l.decoder_steps.or(s.decoder_steps);
        s.decoder_guidance = l.decoder_guidance.unwrap_or(s.decoder_guidance);
        s.num_images = l.num_images.unwrap_or(s.num_images);
        s
    }
}

/// One request of a run: a command-line prompt (index 0) or a prompts-file line.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// position among the prompts (`{index}`)
    pub index: usize,
    /// where it came from, for messages: `prompts.txt:12` or `--prompt`
    pub origin: String,
    pub req: GenerateRequest,
    /// the line's own output template, if it has one
    pub output: Option<String>,
}

/// A job from a prompts-file line: the command line's options with the line's overrides; a
/// line without a seed gets `base_seed + index`. Errors name `file:line`.
pub fn job_from_entry(
    file: &str,
    entry: &Entry,
    sampling: &SamplingInput,
    negative_prompt: &str,
    base_seed: u64,
) -> Result<Job> {
    let l = &entry.fields;
    let origin = format!("{file}:{}", entry.line);
    let seed = l.seed.unwrap_or_else(|| base_seed.wrapping_add(entry.index as u64));
    let negative = l.negative_prompt.as_deref().unwrap_or(negative_prompt);
    let req = generate_request(&l.prompt, negative, &sampling.with_line(l), seed)
        .map_err(|e| InputError::new(format!("{origin}: {e}")))?;
    Ok(Job {
        index: entry.index,
        origin,
        req,
        output: l.output.clone(),
    })
}

/// A seed option: a given value, or one picked at random (`true` when picked).
pub fn seed_or_random(seed: Option<Option<u64>>) -> (u64, bool) {
    match seed.flatten() {
        Some(s) => (s, false),
        None => (random_seed(), true),
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // std's RandomState is seeded from the OS per process; 32 bits keep seeds short to type
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() & 0xffff_ffff
}

/// `--rng`: which torch CPU kernel the noise reproduces.
pub fn parse_rng(s: &str) -> Result<BoxMuller> {
    match s.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(BoxMuller::Vectorized),
        "cpu-scalar" => Ok(BoxMuller::Scalar),
        _ => Err(InputError::new(format!(
            "unknown --rng {s:?}: use cpu (torch on x86-64) or cpu-scalar (torch's default-capability build, e.g. ARM)"
        ))),
    }
}

/// The schedule from either a step count (`linspace(1, 0, steps + 1)`), an explicit list, or
/// the default.
pub fn timesteps(
    name: &str,
    steps: Option<usize>,
    list: Option<&[f64]>,
    default: impl FnOnce() -> Vec<f32>,
) -> Result<Vec<f32>> {
    match (steps, list) {
        (Some(_), Some(_)) => Err(InputError::new(format!(
            "give either --{name}-steps or --{name}-timesteps, not both"
        ))),
        (Some(0), None) => Err(InputError::new(format!("--{name}-steps must be at least 1"))),
        (Some(n), None) => Ok(scheduler::linear_timesteps(n)),
        (None, Some(list)) => check_timesteps(name, list),
        (None, None) => Ok(default()),
    }
}

/// An explicit schedule: at least two values (one step), finite, strictly descending, in
/// [0, 1]. Like diffusers, sampling runs from the first value to the last.
pub fn check_timesteps(name: &str, list: &[f64]) -> Result<Vec<f32>> {
    let flag = format!("--{name}-timesteps");
    if list.len() < 2 {
        return Err(InputError::new(format!(
            "{flag} needs at least two values (start and end, e.g. 1.0,0.5,0.0)"
        )));
    }
    if let Some(v) = list.iter().find(|v| !v.is_finite() || **v < 0.0 || **v > 1.0) {
        return Err(InputError::new(format!("{flag}: {v} is not a number in [0, 1]")));
    }
    if let Some(w) = list.windows(2).find(|w| w[1] >= w[0]) {
        return Err(InputError::new(format!(
            "{flag} must be strictly descending ({} is followed by {})",
            w[0], w[1]
        )));
    }
    if list[0] == 0.0 {
        return Err(InputError::new(format!("{flag} must start above 0")));
    }
    Ok(list.iter().map(|v| *v as f32).collect())
}

pub fn check_guidance(flag: &str, v: f64) -> Result<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(InputError::new(format!("{flag} must be a finite number, got {v}")))
    }
}

/// Validates everything but the model-dependent size rule.
pub fn generate_request(prompt: &str, negative_prompt: &str, s: &SamplingInput, seed: u64) -> Result<GenerateRequest> {
    for (flag, v) in [("--width", s.width), ("--height", s.height)] {
        if v == 0 {
            return Err(InputError::new(format!("{flag} must be greater than 0")));
        }
    }
    if s.num_images == 0 {
        return Err(InputError::new("--num-images must be at least 1"));
    }
    Ok(GenerateRequest {
        prompt: prompt.to_string(),
        negative_prompt: negative_prompt.to_string(),
        width: s.width,
        height: s.height,
        prior_timesteps: timesteps(
            "prior",
            s.prior_steps,
            s.prior_timesteps.as_deref(),
            scheduler::default_prior_timesteps,
        )?,
        prior_schedule_defaulted: s.prior_steps.is_none() && s.prior_timesteps.is_none(),
        prior_guidance: check_guidance("--prior-guidance", s.prior_guidance)?,
        decoder_timesteps: timesteps("decoder", s.decoder_steps, s.decoder_timesteps.as_deref(), || {
            scheduler::linear_timesteps(DEFAULT_DECODER_STEPS)
        })?,
        decoder_guidance: check_guidance("--decoder-guidance", s.decoder_guidance)?,
        num_images: s.num_images,
        seed,
    })
}

/// Where to run, as typed: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

pub fn parse_device(s: &str) -> Result<DeviceSpec> {
    let bad = || InputError::new(format!("unknown device {s:?}: use cpu, cuda or cuda:N"));
    match s.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" | "gpu" => cuda_built(DeviceSpec::Cuda(0)),
        other => match other.strip_prefix("cuda:") {
            Some(n) => cuda_built(DeviceSpec::Cuda(n.parse().map_err(|_| bad())?)),
            None => Err(bad()),
        },
    }
}

fn cuda_built(spec: DeviceSpec) -> Result<DeviceSpec> {
    if cfg!(feature = "cuda") {
        Ok(spec)
    } else {
        Err(InputError::new(
            "this build of wuerstchen has no CUDA support; rebuild with `cargo install --features cuda` or use --device cpu",
        ))
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(InputError::new(format!("unknown dtype {s:?}: use f32, f16 or bf16"))),
    }
}

/// A memory size as typed: a number of MiB, or a number with a unit (binary: `64K`, `512M`,
/// `2G`, `2GiB`, `4096B`), in bytes; at least 1 KiB.
pub fn parse_memory_size(flag: &str, s: &str) -> Result<usize> {
    let bad = || {
        InputError::new(format!(
            "{flag} {s:?}: use a size of at least 1K, like 512M, 2G or 64K (a bare number is MiB)"
        ))
    };
    let upper = s.trim().to_ascii_uppercase();
    let (t, bytes_unit) = match upper.strip_suffix("IB").or_else(|| upper.strip_suffix('B')) {
        Some(t) => (t, 1u64),
        None => (upper.as_str(), 1 << 20),
    };
    let (number, unit) = match t.char_indices().last() {
        Some((i, 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'M')) => (&t[..i], 1 << 20),
        Some((i, 'G')) => (&t[..i], 1 << 30),
        _ => (t, bytes_unit),
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let bytes = value * unit as f64;
    if !bytes.is_finite() || bytes < 1024.0 {
        return Err(bad());
    }
    Ok(bytes.min(usize::MAX as f64) as usize)
}

/// diffusers' decoder defaults (`WuerstchenDecoderPipeline.__call__`): 12 steps, no guidance.
pub const DEFAULT_DECODER_STEPS: usize = 12;
pub const DEFAULT_DECODER_GUIDANCE: f64 = 0.0;

/// Device, dtype and memory options as given: validated, not yet opened.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSpec {
    /// `None`: the first GPU of a CUDA build when one opens, else the CPU
    pub device: Option<DeviceSpec>,
    /// `None`: the device's default
    pub dtype: Option<DType>,
    /// bytes one attention block's scores may take
    pub attention_budget: usize,
    /// hold one stage's weights at a time (also chosen automatically when memory is short)
    pub low_memory: bool,
    /// f32 matrix products on a GPU in TF32
    pub tf32: bool,
}

/// Where the models come from, as given: Hub repo ids or local folders.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub prior: String,
    /// other Stage C weights for the prior
    pub stage_c: Option<String>,
    pub decoder: String,
    /// Hub branch, tag or commit
    pub revision: String,
    /// Hub commits for single sources by name (`prior`, `stage_c`, `decoder`), over `revision`:
    /// what `--from` replays, where each source may have been recorded at its own commit
    pub pinned: std::collections::BTreeMap<String, String>,
    /// Stable Cascade's lite networks (the `prior_lite/` and `decoder_lite/` folders)
    pub lite: bool,
}

/// The usual model pairs, by a short name (`--model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelPreset {
    /// `warp-ai/wuerstchen-prior` + `warp-ai/wuerstchen`
    WuerstchenV2,
    /// `stabilityai/stable-cascade-prior` + `stabilityai/stable-cascade`
    StableCascade,
    /// the same repos' lite networks (1B and 700M parameters instead of 3.6B and 1.5B)
    StableCascadeLite,
}

impl ModelPreset {
    pub fn prior_repo(self) -> &'static str {
        match self {
            Self::WuerstchenV2 => "warp-ai/wuerstchen-prior",
            Self::StableCascade | Self::StableCascadeLite => "stabilityai/stable-cascade-prior",
        }
    }

    pub fn decoder_repo(self) -> &'static str {
        match self {
            Self::WuerstchenV2 => "warp-ai/wuerstchen",
            Self::StableCascade | Self::StableCascadeLite => "stabilityai/stable-cascade",
        }
    }

    pub fn lite(self) -> bool {
        self == Self::StableCascadeLite
    }
}

impl ModelSpec {
    /// The Hub revision to load source `name` (`prior`, `stage_c`, `decoder`) at.
    pub fn revision_for(&self, name: &str) -> &str {
        self.pinned.get(name).unwrap_or(&self.revision)
    }
}

/// The prompts of a run as given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptsInput {
    pub prompt: Option<String>,
    pub negative_prompt: String,
    /// a prompts file, `-` for stdin
    pub file: Option<String>,
    pub shard: Option<String>,
    pub keep_going: bool,
    /// `--seed` (`Some(None)`: the flag without a value)
    pub seed: Option<Option<u64>>,
    /// `--batch-size`: the most images one forward pass holds; `None`: chosen by the device
    pub batch_size: Option<usize>,
    /// `--image-prompt`: images every prompt of the run is conditioned on (Stable Cascade)
    pub image_prompts: Vec<PathBuf>,
}

/// A job with the files it will write.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedJob {
    pub job: Job,
    /// one per image (empty where a command writes no images)
    pub images: Vec<PathBuf>,
    pub embeddings: Option<PathBuf>,
    /// whether its existing files may be replaced: `--overwrite`, or a partly done job under
    /// `--skip-existing` (rerun whole, its finished files written again)
    pub overwrite: bool,
}

/// The jobs of a run, every output name computed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPlan {
    pub jobs: Vec<PlannedJob>,
    /// bad prompts-file lines skipped under `--keep-going`
    pub skipped: Vec<InputError>,
    /// jobs whose every file exists, under `--skip-existing`: not run
    pub done: Vec<PlannedJob>,
    /// whether the prompts came from a file
    pub batch: bool,
    pub keep_going: bool,
    pub overwrite: bool,
    /// JSON lines on stdout instead of bare paths
    pub json: bool,
    /// the most images one forward pass holds; `None`: chosen by the device
    pub batch_size: Option<usize>,
}

impl JobPlan {
    /// The jobs grouped into batches, as ranges of `jobs`: consecutive jobs whose requests
    /// share a pass (`GenerateRequest::shares_pass`) and together have at most `max_images`
    /// images. A job with more images than that runs alone, as it would without batching.
    pub fn batches(&self, max_images: usize) -> Vec<std::ops::Range<usize>> {
        let mut batches: Vec<std::ops::Range<usize>> = Vec::new();
        let mut images = 0;
        for (i, p) in self.jobs.iter().enumerate() {
            let req = &p.job.req;
            match batches.last_mut() {
                Some(b) if images + req.num_images <= max_images && self.jobs[b.start].job.req.shares_pass(req) => {
                    b.end = i + 1;
                    images += req.num_images;
                }
                _ => {
                    batches.push(i..i + 1);
                    images = req.num_images;
                }
            }
        }
        batches
    }

    /// The model's size rule, applied to every job: a bad size stops the run, or, in a batch
    /// with `--keep-going`, skips the job (`{origin}: ...`).
    pub fn check_sizes(&mut self, check: impl Fn(&GenerateRequest) -> Result<()>) -> Result<()> {
        let mut kept = Vec::with_capacity(self.jobs.len());
        for p in std::mem::take(&mut self.jobs) {
            match check(&p.job.req) {
                Ok(()) => kept.push(p),
                Err(e) if !self.batch => return Err(e),
                Err(e) => {
                    let e = InputError::new(format!("{}: {e}", p.job.origin));
                    if !self.keep_going {
                        return Err(e);
                    }
                    tracing::warn!("skipped: {e}");
                    self.skipped.push(e);
                }
            }
        }
        self.jobs = kept;
        Ok(())
    }
}

/// What to write where, as given.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputInput {
    /// image path template (`{seed}`, `{image}`, `{index}`, `{prompt}`)
    pub images: Option<String>,
    /// embeddings path template
    pub embeddings: Option<String>,
    pub overwrite: bool,
    /// skip the jobs whose files all exist (resuming a batch)
    pub skip_existing: bool,
    pub json: bool,
}

/// `generate`, `prior`: everything validated before a model file is read.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratePlan {
    pub jobs: JobPlan,
    /// images the prior conditions every prompt on, in order (`--image-prompt`)
    pub image_prompts: Vec<PathBuf>,
    pub rng: BoxMuller,
    pub models: ModelSpec,
    pub runtime: RuntimeSpec,
}

/// Validates the prompts, the sampling options and every output name.
pub fn plan_generate(
    prompts: &PromptsInput,
    sampling: &SamplingInput,
    output: &OutputInput,
    rng: BoxMuller,
    models: ModelSpec,
    runtime: RuntimeSpec,
) -> anyhow::Result<GeneratePlan> {
    if output.skip_existing && output.overwrite {
        return Err(InputError::new(
            "--skip-existing keeps finished files and --overwrite replaces them: pass one of the two",
        )
        .into());
    }
    let (all, skipped, shard) = read_jobs(prompts, sampling)?;
    let batch = prompts.file.is_some();
    // names over the whole file, so that a shard's names do not depend on the other shards
    let images = match &output.images {
        Some(t) => image_paths(&all, t)?,
        None => vec![Vec::new(); all.len()],
    };
    let embeddings = match &output.embeddings {
        Some(t) => embedding_paths(&all, t)?.into_iter().map(Some).collect(),
        None => vec![None; all.len()],
    };
    let (mut jobs, mut done) = (Vec::new(), Vec::new());
    for ((job, images), embeddings) in all.into_iter().zip(images).zip(embeddings) {
        if !shard.is_none_or(|s| s.takes(job.index)) {
            continue;
        }
        let mut p = PlannedJob {
            job,
            images,
            embeddings,
            overwrite: output.overwrite,
        };
        if output.skip_existing {
            let (found, total) = existing_files(&p)?;
            if found == total {
                done.push(p);
                continue;
            }
            p.overwrite = found > 0;
        }
        claim(&p.job, p.images.iter().chain(&p.embeddings), p.overwrite)?;
        jobs.push(p);
    }
    Ok(GeneratePlan {
        jobs: JobPlan {
            jobs,
            skipped,
            done,
            batch,
            keep_going: prompts.keep_going,
            overwrite: output.overwrite,
            json: output.json,
            batch_size: prompts.batch_size,
        },
        image_prompts: prompts.image_prompts.clone(),
        rng,
        models,
        runtime,
    })
}

/// The requests of a run: the `--prompt`, or the prompts file's lines (sharded). Bad lines
/// are errors; with `--keep-going` they are returned beside the good jobs instead.
pub fn plan_jobs(prompts: &PromptsInput, sampling: &SamplingInput) -> anyhow::Result<(Vec<Job>, Vec<InputError>)> {
    let (jobs, bad, shard) = read_jobs(prompts, sampling)?;
    let jobs = jobs
        .into_iter()
        .filter(|j| shard.is_none_or(|s| s.takes(j.index)))
        .collect();
    Ok((jobs, bad))
}

/// [`plan_jobs`] before the shard is taken: every good job of the file, and the shard.
fn read_jobs(
    prompts: &PromptsInput,
    sampling: &SamplingInput,
) -> anyhow::Result<(Vec<Job>, Vec<InputError>, Option<Shard>)> {
    let (base_seed, picked) = seed_or_random(prompts.seed);
    if picked {
        tracing::info!("seed {base_seed} (picked at random; pass --seed {base_seed} to repeat)");
    }
    let shard = prompts.shard.as_deref().map(Shard::parse).transpose()?;
    let Some(file) = &prompts.file else {
        if shard.is_some() {
            return Err(InputError::new("--shard needs --prompts").into());
        }
        let text = prompts.prompt.as_deref().unwrap_or_default();
        let req = generate_request(text, &prompts.negative_prompt, sampling, base_seed)?;
        let job = Job {
            index: 0,
            origin: "--prompt".into(),
            req,
            output: None,
        };
        return Ok((vec![job], vec![], None));
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
        let job = entry.and_then(|e| job_from_entry(name, &e, sampling, &prompts.negative_prompt, base_seed));
        match job {
            Ok(j) => jobs.push(j),
            Err(e) if prompts.keep_going => {
                tracing::warn!("skipped: {e}");
                bad.push(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if !jobs.iter().any(|j| shard.is_none_or(|s| s.takes(j.index))) && bad.is_empty() {
        let where_ = if shard.is_some() { " in this shard" } else { "" };
        tracing::warn!("{name}: no prompts{where_}");
    }
    Ok((jobs, bad, shard))
}

/// Where each job's images go: each template as written while the names are distinct, a
/// suffix only where they would collide (`output::distinct_names`); two jobs that would still
/// write one file are an error.
pub fn image_paths(jobs: &[Job], template: &str) -> Result<Vec<Vec<PathBuf>>> {
    let slots: Vec<output::Slot> = jobs
        .iter()
        .flat_map(|job| {
            (0..job.req.num_images).map(move |n| output::Slot {
                template: job.output.as_deref().unwrap_or(template),
                fields: job.name_fields(n),
                origin: &job.origin,
            })
        })
        .collect();
    let mut names = output::distinct_names(&slots)?.into_iter();
    Ok(jobs
        .iter()
        .map(|job| names.by_ref().take(job.req.num_images).collect())
        .collect())
}

/// One embeddings file per job, named like the images.
pub fn embedding_paths(jobs: &[Job], template: &str) -> Result<Vec<PathBuf>> {
    let slots: Vec<output::Slot> = jobs
        .iter()
        .map(|job| output::Slot {
            template,
            fields: job.name_fields(0),
            origin: &job.origin,
        })
        .collect();
    output::distinct_names(&slots)
}

/// Checks, before any model loads, that `job` can write `paths`: their folders exist and are
/// writable, and without `overwrite` none of them exists yet.
pub fn claim<'a>(job: &Job, paths: impl IntoIterator<Item = &'a PathBuf>, overwrite: bool) -> Result<()> {
    for path in paths {
        output::check_writable(path, overwrite).map_err(|e| InputError::new(format!("{}: {e}", job.origin)))?;
    }
    Ok(())
}

/// `--skip-existing`: how many of a job's files exist, of how many. A file that is there but
/// not whole (a foreign or truncated file) is an error: it cannot tell whether the job is done.
fn existing_files(p: &PlannedJob) -> Result<(usize, usize)> {
    let files = p
        .images
        .iter()
        .map(|f| (f, output::FileKind::Png))
        .chain(p.embeddings.iter().map(|f| (f, output::FileKind::Safetensors)));
    let (mut found, mut total) = (0, 0);
    for (path, kind) in files {
        total += 1;
        match output::inspect(path, kind) {
            output::Found::Missing => {}
            output::Found::Complete => found += 1,
            output::Found::Incomplete(why) => {
                return Err(InputError::new(format!(
                    "{}: {} {why}, so --skip-existing cannot tell whether it is done; remove it, \
                     or pass --overwrite instead of --skip-existing to write every file again",
                    p.job.origin,
                    path.display()
                )))
            }
        }
    }
    Ok((found, total))
}

impl Job {
    fn name_fields(&self, image: usize) -> output::NameFields<'_> {
        output::NameFields {
            index: self.index,
            image,
            seed: self.req.seed,
            prompt: &self.req.prompt,
        }
    }
}

/// `decode`: the options as given; the request is completed from the embeddings file's
/// record by [`decode_request`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodePlan {
    pub embeddings: PathBuf,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// `None`: the decoder's default (see [`decode_request`])
    pub decoder_steps: Option<usize>,
    pub decoder_guidance: f64,
    /// fresh noise from this seed instead of continuing the recorded stream
    pub seed: Option<u64>,
    pub output: OutputInput,
    pub models: ModelSpec,
    pub runtime: RuntimeSpec,
}

/// Where `decode`'s noise starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseStart {
    pub seed: u64,
    pub rng: BoxMuller,
    /// draws (count, elements each) to skip: the prior's, when continuing its stream
    pub skip: Option<crate::record::NoiseDraws>,
}

/// The decode request from the options and the file's record (`None` when the file has
/// none): the options win; what neither gives is an input error naming the file.
/// `num_images` and the image size come from the embeddings themselves.
pub fn decode_request(
    plan: &DecodePlan,
    record: Option<&crate::record::GenerationRecord>,
    num_images: usize,
    (width, height): (usize, usize),
    default_steps: usize,
) -> Result<(GenerateRequest, NoiseStart)> {
    let file = plan.embeddings.display();
    let prompt = plan
        .prompt
        .clone()
        .or_else(|| record.map(|r| r.prompt.clone()))
        .ok_or_else(|| InputError::new(format!("{file} records no prompt; pass --prompt")))?;
    let negative_prompt = plan
        .negative_prompt
        .clone()
        .or_else(|| record.map(|r| r.negative_prompt.clone()))
        .unwrap_or_default();
    let rng = record.map_or(BoxMuller::default(), |r| r.rng.into());
    let noise = match (plan.seed, record) {
        (Some(seed), _) => NoiseStart { seed, rng, skip: None },
        (None, Some(r)) => NoiseStart {
            seed: r.seed,
            rng,
            skip: Some(r.prior_noise_draws.ok_or_else(|| {
                InputError::new(format!(
                    "{file} records no prior_noise_draws to continue the seed's stream from; pass --seed"
                ))
            })?),
        },
        (None, None) => return Err(InputError::new(format!("{file} records no seed; pass --seed"))),
    };
    let decoder_steps = Some(plan.decoder_steps.unwrap_or(default_steps));
    let req = GenerateRequest {
        prompt,
        negative_prompt,
        width,
        height,
        prior_timesteps: record.map(|r| r.prior_timesteps.clone()).unwrap_or_default(),
        prior_schedule_defaulted: false,
        prior_guidance: record.map_or(0.0, |r| r.prior_guidance),
        decoder_timesteps: timesteps("decoder", decoder_steps, None, Vec::new)?,
        decoder_guidance: check_guidance("--decoder-guidance", plan.decoder_guidance)?,
        num_images,
        seed: noise.seed,
    };
    Ok((req, noise))
}

/// What `generate` (and `generate --from`) takes as given, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateInputs {
    pub prompts: PromptsInput,
    pub sampling: SamplingInput,
    pub rng: BoxMuller,
    pub models: ModelSpec,
    pub runtime: RuntimeSpec,
}

impl GenerateInputs {
    /// `generate --from FILE`: the recorded generation's prompt, negative prompt, seed, size,
    /// schedules (as explicit lists, so they round-trip exactly), guidance, number of images,
    /// models, dtype and rng replace these inputs, except the options `given` says the user
    /// set (by their long names with `_`: `seed`, `prior_steps`, `decoder`, ...). A recorded
    /// value that does not validate is an input error naming the file and the field.
    pub fn replay(&mut self, record: &GenerationRecord, file: &Path, given: impl Fn(&str) -> bool) -> Result<()> {
        let bad = |field: &str, e: &dyn std::fmt::Display| InputError::new(format!("{}: {field}: {e}", file.display()));
        let r = record;
        let (p, s) = (&mut self.prompts, &mut self.sampling);
        if !given("prompt") {
            p.prompt = Some(r.prompt.clone());
        }
        if !given("negative_prompt") {
            p.negative_prompt = r.negative_prompt.clone();
        }
        if !given("seed") {
            p.seed = Some(Some(r.seed));
        }
        if !given("width") {
            s.width = r.width;
        }
        if !given("height") {
            s.height = r.height;
        }
        if !given("prior_steps") && !given("prior_timesteps") {
            let list = f64_list(&r.prior_timesteps);
            check_timesteps("prior", &list).map_err(|e| bad("prior_timesteps", &e))?;
            (s.prior_steps, s.prior_timesteps) = (None, Some(list));
        }
        if !given("decoder_steps") {
            let list = f64_list(&r.decoder_timesteps);
            check_timesteps("decoder", &list).map_err(|e| bad("decoder_timesteps", &e))?;
            (s.decoder_steps, s.decoder_timesteps) = (None, Some(list));
        }
        if !given("prior_guidance") {
            s.prior_guidance = r.prior_guidance;
        }
        if !given("decoder_guidance") {
            s.decoder_guidance = r.decoder_guidance;
        }
        if !given("num_images") {
            s.num_images = r.num_images;
        }
        if !given("rng") {
            self.rng = r.rng.into();
        }
        let m = &mut self.models;
        if !given("prior") {
            m.prior = r.prior.clone();
        }
        if !given("stage_c") {
            m.stage_c = r.stage_c.clone();
        }
        if !given("decoder") {
            if r.decoder.is_empty() {
                return Err(bad(
                    "decoder",
                    &"empty (embeddings from `prior` are replayed with `decode`)",
                ));
            }
            m.decoder = r.decoder.clone();
        }
        if !given("revision") {
            // each recorded Hub commit pins its source, unless the command line names another source
            let keep = |name: &str| !given(name);
            m.pinned = r
                .commits
                .iter()
                .filter(|(name, _)| keep(name))
                .map(|(n, c)| (n.clone(), c.clone()))
                .collect();
        }
        if !given("model") {
            m.lite = r.lite;
        }
        if !given("image_prompt") {
            p.image_prompts = r.image_prompts.iter().map(PathBuf::from).collect();
        }
        if !given("dtype") {
            self.runtime.dtype = Some(parse_dtype(&r.dtype).map_err(|e| bad("dtype", &e))?);
        }
        Ok(())
    }
}

fn f64_list(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&t| f64::from(t)).collect()
}

/// `bench`: one request (or `batch_size` of them, seeds counting up from its seed, as one
/// batch), timed.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchPlan {
    pub req: GenerateRequest,
    pub batch_size: usize,
    pub runs: usize,
    pub warmup: usize,
    pub models: ModelSpec,
    pub runtime: RuntimeSpec,
}

pub fn plan_bench(
    sampling: &SamplingInput,
    seed: Option<u64>,
    (runs, warmup): (usize, usize),
    batch_size: usize,
    models: ModelSpec,
    runtime: RuntimeSpec,
) -> Result<BenchPlan> {
    if runs == 0 {
        return Err(InputError::new("--runs must be at least 1"));
    }
    Ok(BenchPlan {
        req: generate_request("a photo of a cat", "", sampling, seed.unwrap_or(0))?,
        batch_size,
        runs,
        warmup,
        models,
        runtime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("--x", "1024").unwrap(), 1 << 30);
        assert_eq!(parse_memory_size("--x", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory_size("--x", "2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("--x", "64k").unwrap(), 64 << 10);
        assert_eq!(parse_memory_size("--x", "1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_memory_size("--x", "4096B").unwrap(), 4096);
        for bad in ["", "G", "-1M", "0", "12 apples", "nan", "inf"] {
            assert!(parse_memory_size("--x", bad).is_err(), "{bad}");
        }
        assert!(parse_memory_size("--x", "512B").is_err(), "under 1 KiB");
    }

    fn input() -> SamplingInput {
        SamplingInput {
            width: 1024,
            height: 1024,
            prior_guidance: 4.0,
            decoder_guidance: 0.0,
            num_images: 1,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_diffusers_docs_schedules() {
        let r = generate_request("a cat", "", &input(), 7).unwrap();
        assert_eq!(r.prior_timesteps, scheduler::default_prior_timesteps());
        assert_eq!(r.decoder_timesteps.len(), 13);
        assert_eq!(r.seed, 7);
    }

    #[test]
    fn bad_values_are_input_errors() {
        let cases: Vec<(SamplingInput, &str)> = vec![
            (SamplingInput { width: 0, ..input() }, "--width"),
            (
                SamplingInput {
                    num_images: 0,
                    ..input()
                },
                "--num-images",
            ),
            (
                SamplingInput {
                    prior_steps: Some(0),
                    ..input()
                },
                "--prior-steps",
            ),
            (
                SamplingInput {
                    decoder_steps: Some(0),
                    ..input()
                },
                "--decoder-steps",
            ),
            (
                SamplingInput {
                    prior_guidance: f64::NAN,
                    ..input()
                },
                "--prior-guidance",
            ),
            (
                SamplingInput {
                    decoder_guidance: f64::INFINITY,
                    ..input()
                },
                "--decoder-guidance",
            ),
            (
                SamplingInput {
                    prior_timesteps: Some(vec![0.5, 0.7, 0.0]),
                    ..input()
                },
                "descending",
            ),
            (
                SamplingInput {
                    prior_timesteps: Some(vec![1.5, 0.0]),
                    ..input()
                },
                "[0, 1]",
            ),
            (
                SamplingInput {
                    prior_timesteps: Some(vec![f64::NAN, 0.0]),
                    ..input()
                },
                "[0, 1]",
            ),
            (
                SamplingInput {
                    prior_timesteps: Some(vec![1.0]),
                    ..input()
                },
                "two values",
            ),
            (
                SamplingInput {
                    prior_steps: Some(3),
                    prior_timesteps: Some(vec![1.0, 0.0]),
                    ..input()
                },
                "not both",
            ),
        ];
        for (s, needle) in cases {
            let e = generate_request("x", "", &s, 0).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn explicit_schedules_and_steps() {
        let s = SamplingInput {
            prior_timesteps: Some(vec![0.9, 0.5, 0.2, 0.0]),
            decoder_steps: Some(4),
            ..input()
        };
        let r = generate_request("x", "", &s, 0).unwrap();
        assert_eq!(r.prior_timesteps, vec![0.9, 0.5, 0.2, 0.0]);
        assert_eq!(r.decoder_timesteps, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn prompts_file_lines_override_the_command_line() {
        let entries = crate::prompts::parse(
            "p.jsonl",
            b"plain\n{\"prompt\": \"b\", \"seed\": 9, \"width\": 512, \"steps\": 3, \"negative_prompt\": \"n\"}\n{\"prompt\": \"c\", \"num_images\": 0}",
        );
        let s = SamplingInput {
            prior_timesteps: Some(vec![1.0, 0.0]),
            ..input()
        };
        let a = job_from_entry("p.jsonl", entries[0].as_ref().unwrap(), &s, "neg", 100).unwrap();
        assert_eq!(
            (a.req.seed, a.req.negative_prompt.as_str(), a.req.prior_timesteps.len()),
            (100, "neg", 2)
        );
        let b = job_from_entry("p.jsonl", entries[1].as_ref().unwrap(), &s, "neg", 100).unwrap();
        assert_eq!((b.req.seed, b.req.width, b.req.prior_timesteps.len()), (9, 512, 4));
        assert_eq!(b.req.negative_prompt, "n");
        let c = job_from_entry("p.jsonl", entries[2].as_ref().unwrap(), &s, "neg", 100).unwrap_err();
        assert!(c.to_string().starts_with("p.jsonl:3: --num-images"), "{c}");
    }

    fn plan_in(
        dir: &std::path::Path,
        lines: &str,
        shard: Option<&str>,
        output: OutputInput,
    ) -> anyhow::Result<GeneratePlan> {
        let file = dir.join("p.jsonl");
        std::fs::write(&file, lines)?;
        let prompts = PromptsInput {
            file: Some(file.display().to_string()),
            shard: shard.map(String::from),
            seed: Some(Some(1)),
            ..Default::default()
        };
        let models = ModelSpec {
            prior: "p".into(),
            stage_c: None,
            decoder: "d".into(),
            revision: "main".into(),
            pinned: Default::default(),
            lite: false,
        };
        let runtime = RuntimeSpec {
            device: None,
            dtype: None,
            attention_budget: 1 << 30,
            low_memory: false,
            tf32: false,
        };
        plan_generate(&prompts, &input(), &output, BoxMuller::default(), models, runtime)
    }

    fn images_to(dir: &std::path::Path, template: &str) -> OutputInput {
        OutputInput {
            images: Some(dir.join(template).display().to_string()),
            embeddings: None,
            overwrite: false,
            skip_existing: false,
            json: false,
        }
    }

    /// Consecutive jobs that share every setting but prompts, seeds and image counts group up
    /// to the image limit; any other difference, or a job over the limit, starts a new batch.
    #[test]
    fn batches_hold_consecutive_jobs_that_share_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"prompt": "a", "seed": 1}"#,
            r#"{"prompt": "b", "negative_prompt": "n", "seed": 9}"#,
            r#"{"prompt": "c", "num_images": 2}"#,
            r#"{"prompt": "d", "prior_guidance": 1.0}"#,
            r#"{"prompt": "e", "decoder_guidance": 2.0}"#,
            r#"{"prompt": "f", "steps": 3}"#,
            r#"{"prompt": "g", "decoder_steps": 3}"#,
            r#"{"prompt": "h", "width": 512}"#,
            r#"{"prompt": "i", "height": 512}"#,
            r#"{"prompt": "j", "num_images": 5}"#,
            r#"{"prompt": "k"}"#,
            r#"{"prompt": "l"}"#,
        ];
        let plan = plan_in(
            dir.path(),
            &lines.join("\n"),
            None,
            images_to(dir.path(), "{index}.png"),
        )
        .unwrap();
        let batches = plan.jobs.batches(4);
        assert_eq!(batches, [0..3, 3..4, 4..5, 5..6, 6..7, 7..8, 8..9, 9..10, 10..12]);
        // the limit counts images: 1 + 1 + 2 fit in 4, not in 3
        assert_eq!(plan.jobs.batches(3)[..2], [0..2, 2..3]);
        let singles: Vec<_> = (0..lines.len()).map(|i| i..i + 1).collect();
        assert_eq!(plan.jobs.batches(1), singles);
    }

    #[test]
    fn names_are_the_whole_files_whatever_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let lines =
            "{\"prompt\": \"a\", \"seed\": 5}\n{\"prompt\": \"b\", \"seed\": 5}\n{\"prompt\": \"c\", \"seed\": 6}\n";
        let names = |shard| -> Vec<String> {
            let plan = plan_in(dir.path(), lines, shard, images_to(dir.path(), "{seed}.png")).unwrap();
            let jobs = plan.jobs.jobs.iter();
            jobs.map(|p| p.images[0].file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(None), ["5-0.png", "5-1.png", "6.png"]);
        assert_eq!(names(Some("0/2")), ["5-0.png", "6.png"]);
        assert_eq!(names(Some("1/2")), ["5-1.png"]);
    }

    #[test]
    fn skip_existing_is_not_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let output = OutputInput {
            overwrite: true,
            skip_existing: true,
            ..images_to(dir.path(), "{seed}.png")
        };
        let e = plan_in(dir.path(), "a\n", None, output).unwrap_err();
        assert!(e.downcast_ref::<InputError>().is_some(), "{e}");
        assert!(
            e.to_string().contains("--skip-existing") && e.to_string().contains("--overwrite"),
            "{e}"
        );
    }

    #[test]
    fn rng_kernels() {
        assert_eq!(parse_rng("cpu").unwrap(), BoxMuller::Vectorized);
        assert_eq!(parse_rng("cpu-scalar").unwrap(), BoxMuller::Scalar);
        assert!(parse_rng("cuda").is_err());
        assert_eq!(seed_or_random(Some(Some(5))), (5, false));
        assert!(seed_or_random(None).1);
    }

    #[test]
    fn devices_and_dtypes() {
        assert_eq!(parse_device("cpu").unwrap(), DeviceSpec::Cpu);
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(parse_device("cuda:1").is_ok(), cfg!(feature = "cuda"));
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f8").is_err());
    }

    fn replay_inputs() -> GenerateInputs {
        GenerateInputs {
            prompts: PromptsInput::default(),
            sampling: SamplingInput {
                decoder_steps: Some(DEFAULT_DECODER_STEPS),
                ..input()
            },
            rng: BoxMuller::Vectorized,
            models: ModelSpec {
                prior: "warp-ai/wuerstchen-prior".into(),
                stage_c: None,
                decoder: "warp-ai/wuerstchen".into(),
                revision: "main".into(),
                pinned: Default::default(),
                lite: false,
            },
            runtime: RuntimeSpec {
                device: None,
                dtype: None,
                attention_budget: 1 << 30,
                low_memory: false,
                tf32: false,
            },
        }
    }

    fn recorded() -> GenerationRecord {
        let req = GenerateRequest {
            prompt: "a cat".into(),
            negative_prompt: "dogs".into(),
            width: 256,
            height: 384,
            // values an f32 -> f64 -> f32 trip must keep exactly
            prior_timesteps: vec![0.9, 0.333_333_34, 0.1, 0.0],
            prior_schedule_defaulted: false,
            prior_guidance: 3.5,
            decoder_timesteps: vec![1.0, 0.7, 0.0],
            decoder_guidance: 1.5,
            num_images: 2,
            seed: 42,
        };
        let run = crate::record::RunInfo {
            prior: "/models/prior".into(),
            decoder: "/models/decoder".into(),
            stage_c: Some("owner/stage-c".into()),
            lite: false,
            image_prompts: Vec::new(),
            commits: [("stage_c".to_string(), "c0ffee".to_string())].into(),
            dtype: "bf16".into(),
            rng: BoxMuller::Scalar,
        };
        GenerationRecord::new(&req, &run).for_image(1)
    }

    #[test]
    fn replay_takes_everything_from_the_record() {
        let r = recorded();
        let mut i = replay_inputs();
        i.replay(&r, Path::new("a.png"), |_| false).unwrap();
        let (jobs, _) = plan_jobs(&i.prompts, &i.sampling).unwrap();
        let req = &jobs[0].req;
        assert_eq!(req.prompt, r.prompt);
        assert_eq!(req.negative_prompt, r.negative_prompt);
        assert_eq!(req.seed, 42);
        assert_eq!((req.width, req.height, req.num_images), (256, 384, 2));
        assert_eq!(req.prior_timesteps, r.prior_timesteps, "bit for bit");
        assert_eq!(req.decoder_timesteps, r.decoder_timesteps, "bit for bit");
        assert_eq!((req.prior_guidance, req.decoder_guidance), (3.5, 1.5));
        assert_eq!(i.rng, BoxMuller::Scalar);
        assert_eq!(i.runtime.dtype, Some(DType::BF16));
        assert_eq!(
            (
                i.models.prior.as_str(),
                i.models.decoder.as_str(),
                i.models.stage_c.as_deref()
            ),
            ("/models/prior", "/models/decoder", Some("owner/stage-c"))
        );
        assert_eq!(i.models.revision_for("stage_c"), "c0ffee", "the recorded Hub commit");
        assert_eq!(i.models.revision_for("prior"), "main", "a local folder has no commit");
        // the record a replay writes is the record it read
        let run = crate::record::RunInfo {
            prior: i.models.prior.clone(),
            decoder: i.models.decoder.clone(),
            stage_c: i.models.stage_c.clone(),
            lite: false,
            image_prompts: Vec::new(),
            commits: r.commits.clone(),
            dtype: "bf16".into(),
            rng: i.rng,
        };
        assert_eq!(GenerationRecord::new(req, &run).for_image(1), r);
    }

    /// Each Hub source loads at the commit it was recorded at, also when they differ; a source
    /// the command line replaces, or `--revision`, is not pinned.
    #[test]
    fn replay_pins_each_hub_source_to_its_recorded_commit() {
        let mut r = recorded();
        r.commits = [("prior", "aaa"), ("stage_c", "ccc"), ("decoder", "bbb")]
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .into();
        let mut i = replay_inputs();
        i.replay(&r, Path::new("a.png"), |_| false).unwrap();
        let pinned = ["prior", "stage_c", "decoder"].map(|n| i.models.revision_for(n).to_string());
        assert_eq!(pinned, ["aaa", "ccc", "bbb"]);
        let mut i = replay_inputs();
        i.models.decoder = "other".into();
        i.replay(&r, Path::new("a.png"), |id| id == "decoder").unwrap();
        assert_eq!(
            (i.models.revision_for("prior"), i.models.revision_for("decoder")),
            ("aaa", "main")
        );
        let mut i = replay_inputs();
        i.replay(&r, Path::new("a.png"), |id| id == "revision").unwrap();
        assert!(i.models.pinned.is_empty());
    }

    #[test]
    fn replay_keeps_what_was_given() {
        let r = recorded();
        let mut i = replay_inputs();
        i.prompts.seed = Some(Some(7));
        i.prompts.prompt = Some("a dog".into());
        i.sampling.width = 512;
        i.sampling.prior_steps = Some(3);
        i.sampling.decoder_steps = Some(2);
        i.models.decoder = "other".into();
        i.models.revision = "v1".into();
        i.runtime.dtype = Some(DType::F32);
        let given = [
            "seed",
            "prompt",
            "width",
            "prior_steps",
            "decoder_steps",
            "decoder",
            "revision",
            "dtype",
        ];
        i.replay(&r, Path::new("a.png"), |id| given.contains(&id)).unwrap();
        let (jobs, _) = plan_jobs(&i.prompts, &i.sampling).unwrap();
        let req = &jobs[0].req;
        assert_eq!(
            (req.seed, req.prompt.as_str(), req.width, req.height),
            (7, "a dog", 512, 384)
        );
        assert_eq!(req.prior_timesteps, scheduler::linear_timesteps(3));
        assert_eq!(req.decoder_timesteps, scheduler::linear_timesteps(2));
        assert_eq!((i.models.decoder.as_str(), i.models.revision.as_str()), ("other", "v1"));
        assert_eq!(i.runtime.dtype, Some(DType::F32));
        // an explicit list replaces the recorded one too
        let mut i = replay_inputs();
        i.sampling.prior_timesteps = Some(vec![1.0, 0.0]);
        i.replay(&r, Path::new("a.png"), |id| id == "prior_timesteps").unwrap();
        assert_eq!(i.sampling.prior_timesteps, Some(vec![1.0, 0.0]));
    }

    #[test]
    fn a_bad_recorded_value_names_the_file_and_field() {
        let mut r = recorded();
        r.decoder_timesteps = vec![0.0, 1.0];
        let e = replay_inputs().replay(&r, Path::new("x.png"), |_| false).unwrap_err();
        assert!(e.to_string().starts_with("x.png: decoder_timesteps: "), "{e}");
        let mut r = recorded();
        r.dtype = "f8".into();
        let e = replay_inputs().replay(&r, Path::new("x.png"), |_| false).unwrap_err();
        assert!(e.to_string().starts_with("x.png: dtype: "), "{e}");
        // a value given on the command line is not read from the record
        assert!(replay_inputs()
            .replay(&r, Path::new("x.png"), |id| id == "dtype")
            .is_ok());
    }
}
