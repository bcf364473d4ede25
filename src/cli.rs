//! The command line (part of the binary: the library never sees clap): clap definitions,
//! grouped by concern; each command's arguments become the library's validated plan
//! (`wuerstchen::request`), which the command runs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::DType;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use wuerstchen::commands;
use wuerstchen::request::{
    self, DecodePlan, DeviceSpec, GenerateInputs, GeneratePlan, ModelPreset, ModelSpec, OutputInput, PromptsInput,
    RuntimeSpec, SamplingInput, DEFAULT_DECODER_GUIDANCE, DEFAULT_DECODER_STEPS,
};
use wuerstchen::rng::BoxMuller;

/// `--version`: `0.1.0 (abc1234 2026-11-30)` when built from a git checkout (`abc1234-dirty` with
/// uncommitted changes; see build.rs), plain `0.1.0` otherwise (e.g. from the crates.io tarball).
pub const VERSION: &str = match option_env!("WUERSTCHEN_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

#[derive(Debug, Parser)]
#[command(
    name = "wuerstchen",
    version = VERSION,
    about = "Würstchen v2 and Stable Cascade text-to-image, diffusers' numbers without Python"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// No progress bars and no info messages on stderr (warnings and errors still show)
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More diagnostics on stderr (-v debug, -vv trace); RUST_LOG overrides
    #[arg(long, short, action = ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt or a prompts file (prior, decoder and VQGAN)
    Generate(GenerateArgs),
    /// Run only the prior: prompt -> image embeddings (.safetensors)
    Prior(PriorArgs),
    /// Run only the decoder and VQGAN on embeddings written by `prior` (or `generate --save-embeddings`)
    Decode(DecodeArgs),
    /// Show the generation record a PNG carries (prompt, seed, size, schedules, models, ...)
    Info(InfoArgs),
    /// Fetch the model files into the Hugging Face cache
    Download(DownloadArgs),
    /// Write a tiny random-weight model in the Hub layout, for smoke tests
    TinyModel(TinyModelArgs),
    /// Time the pipeline: load, warm up, per-stage medians and ms per step as JSON on stdout
    Bench(BenchArgs),
    /// Check that every op, block and the whole pipeline compute the CPU's numbers on a device
    Selftest(SelftestArgs),
    /// Print a shell completion script to stdout (see the README for where to put it)
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout, or write one page per command into a folder
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write wuerstchen.1, wuerstchen-generate.1, ... into this folder (created if missing)
    /// and print their paths, instead of printing wuerstchen.1
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).multiple(true).args(["prompt", "prompts", "from"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Make a PNG written by wuerstchen again: its recorded prompt, seed, size, schedules,
    /// guidance, models, dtype and rng, each replaced by the options given here (`--from
    /// a.png --seed 7` makes a variation)
    #[arg(long, value_name = "PNG", conflicts_with = "prompts", help_heading = "Prompt")]
    pub from: Option<PathBuf>,
    /// The options given on the command line or in the environment (clap ids), for `--from`
    #[arg(skip)]
    pub given: Vec<String>,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub prior_sampling: PriorSamplingArgs,
    #[command(flatten)]
    pub decoder_sampling: DecoderSamplingArgs,
    #[command(flatten)]
    pub prior_model: PriorModelArgs,
    #[command(flatten)]
    pub decoder_model: DecoderModelArgs,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Also write each request's image embeddings (a path template like --output, .safetensors)
    #[arg(long, help_heading = "Output")]
    pub save_embeddings: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
pub struct PriorArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub prior_sampling: PriorSamplingArgs,
    #[command(flatten)]
    pub prior_model: PriorModelArgs,
    #[command(flatten)]
    pub hub: HubArgs,
    /// Output path (template: {seed}, {index}, {prompt}) of the embeddings
    #[arg(
        long,
        visible_alias = "output",
        short = 'o',
        default_value = "wuerstchen-{seed}.safetensors",
        help_heading = "Output"
    )]
    pub out: String,
    /// Replace existing files
    #[arg(long, help_heading = "Output")]
    pub overwrite: bool,
    /// One JSON object per written file on stdout instead of the bare path
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// Embeddings written by `wuerstchen prior`
    #[arg(long, short = 'e')]
    pub embeddings: PathBuf,
    /// The decoder's prompt [default: the prompt recorded in the embeddings file]
    #[arg(long, short)]
    pub prompt: Option<String>,
    /// [default: the one recorded in the embeddings file]
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[command(flatten)]
    pub decoder_sampling: DecoderSamplingArgs,
    /// Fresh noise from this seed [default: continue the recorded seed's stream exactly where
    /// the prior left it, so prior + decode gives the same image as generate]
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub decoder_model: DecoderModelArgs,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// PNGs written by `generate` or `decode`
    #[arg(required = true, value_name = "PNG")]
    pub files: Vec<PathBuf>,
    /// One JSON object per file on stdout: the record as stored, plus `path`
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Fetch the weights a run in this dtype loads: the repos' bf16/fp16 files where they
    /// publish them, else the plain ones [default: the dtype generate picks on this machine]
    #[arg(long, value_enum, env = "WUERSTCHEN_DTYPE")]
    pub dtype: Option<DtypeArg>,
    #[command(flatten)]
    pub prior_model: PriorModelArgs,
    #[command(flatten)]
    pub decoder_model: DecoderModelArgs,
    #[command(flatten)]
    pub hub: HubArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub prior_sampling: PriorSamplingArgs,
    #[command(flatten)]
    pub decoder_sampling: DecoderSamplingArgs,
    #[command(flatten)]
    pub prior_model: PriorModelArgs,
    #[command(flatten)]
    pub decoder_model: DecoderModelArgs,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Timed runs (the medians are over these)
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Untimed runs first (kernel compilation, allocator warm-up)
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Requests run as one batch (seeds SEED, SEED+1, ...); the report gives images per second
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_batch_size)]
    pub batch_size: usize,
}

/// Which shapes `selftest` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SelftestShapes {
    /// small odd shapes: seconds
    Small,
    /// the published models' activation shapes: minutes on a CPU
    Real,
    /// both
    All,
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// cpu, cuda or cuda:N [default: CUDA when built with it and a GPU is present]
    #[arg(long, env = "WUERSTCHEN_DEVICE", value_parser = parse_device)]
    pub device: Option<DeviceSpec>,
    /// [default: as for generate]
    #[arg(long, value_enum, env = "WUERSTCHEN_DTYPE")]
    pub dtype: Option<DtypeArg>,
    /// Which shapes to check [default: all on a GPU, small on the CPU]
    #[arg(long, value_enum)]
    pub shapes: Option<SelftestShapes>,
    /// Seed of the random inputs and weights
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One JSON object on stdout instead of the table
    #[arg(long)]
    pub json: bool,
    /// Perturb one check's device result (shows that a wrong op fails the run)
    #[arg(long, hide = true, value_name = "CHECK")]
    pub inject_fault: Option<String>,
}

#[derive(Debug, Args)]
pub struct TinyModelArgs {
    /// Folder to write (DIR/prior and DIR/decoder)
    #[arg(long, short)]
    pub out: PathBuf,
    /// Seed of the random weights
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace existing DIR/prior and DIR/decoder
    #[arg(long)]
    pub overwrite: bool,
    /// Which architecture
    #[arg(long, value_enum, default_value_t = SizeArg::Tiny)]
    pub size: SizeArg,
    /// Which model family (Stable Cascade: tiny only)
    #[arg(long, value_enum, default_value_t = FamilyArg::WuerstchenV2)]
    pub family: FamilyArg,
}

/// `tiny-model --family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FamilyArg {
    /// like warp-ai/wuerstchen-prior + warp-ai/wuerstchen
    WuerstchenV2,
    /// like stabilityai/stable-cascade-prior + stabilityai/stable-cascade
    StableCascade,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Prompt")]
pub struct PromptArgs {
    /// What to draw
    #[arg(long, short, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// What to steer away from (used where guidance is on)
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// A file of prompts, one per line, or JSON Lines with per-line overrides (prompt,
    /// negative_prompt, seed, width, height, steps, guidance, decoder_steps,
    /// decoder_guidance, num_images, output); `-` reads stdin
    #[arg(long)]
    pub prompts: Option<String>,
    /// An image (PNG or JPEG) every prompt is also conditioned on, through the prior's image encoder
    /// (Stable Cascade; repeat the flag for several)
    #[arg(long, value_name = "FILE")]
    pub image_prompt: Vec<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Batch")]
pub struct BatchArgs {
    /// Take every N-th prompt starting at I (0-based), e.g. 0/4 .. 3/4 on four machines
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Skip bad prompts-file lines and failed prompts, go on with the rest, and exit non-zero at the end
    #[arg(long)]
    pub keep_going: bool,
    /// Resume a batch: skip the prompts whose files all exist (complete PNGs / embeddings) and
    /// rerun the rest whole; a file that exists but is not complete is an error
    #[arg(long)]
    pub skip_existing: bool,
    /// Run consecutive prompts that share size, schedules and guidance through the networks
    /// together, up to N images per pass; each image equals the one its prompt gives alone
    /// [default: 1 on the CPU; on a GPU, as many (up to 8) as free memory holds]
    #[arg(long, value_name = "N", value_parser = parse_batch_size)]
    pub batch_size: Option<usize>,
}

fn parse_batch_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of images, at least 1".into()),
    }
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Sampling")]
pub struct PriorSamplingArgs {
    /// Image width in pixels (a multiple of 128 for the published models)
    #[arg(long, short = 'W', default_value_t = 1024)]
    pub width: usize,
    /// Image height in pixels (a multiple of 128 for the published models)
    #[arg(long, short = 'H', default_value_t = 1024)]
    pub height: usize,
    /// Prior steps, evenly spaced [default: the docs' 29-step DEFAULT_STAGE_C_TIMESTEPS]
    #[arg(long, conflicts_with = "prior_timesteps")]
    pub prior_steps: Option<usize>,
    /// Explicit prior schedule, descending in [0, 1], e.g. 1.0,0.75,0.5,0.25,0.0
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub prior_timesteps: Option<Vec<f64>>,
    /// Classifier-free guidance of the prior (on when > 1)
    #[arg(long, default_value_t = 4.0, allow_negative_numbers = true)]
    pub prior_guidance: f64,
    /// Images per prompt (one batch, like num_images_per_prompt)
    #[arg(long, short = 'n', default_value_t = 1)]
    pub num_images: usize,
    /// Seed of the torch-compatible noise; without a value (or without the flag) one is picked
    /// and logged. In a batch, lines without their own seed use SEED + their index
    #[arg(long, num_args = 0..=1)]
    pub seed: Option<Option<u64>>,
    /// Which of torch's CPU randn kernels to reproduce
    #[arg(long, value_enum, default_value_t = RngArg::Cpu)]
    pub rng: RngArg,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Sampling")]
pub struct DecoderSamplingArgs {
    /// Decoder steps, evenly spaced [default: 12; `decode` with a Stable Cascade decoder: 10]
    #[arg(long)]
    pub decoder_steps: Option<usize>,
    /// Classifier-free guidance of the decoder (on when > 1)
    #[arg(long, default_value_t = DEFAULT_DECODER_GUIDANCE, allow_negative_numbers = true)]
    pub decoder_guidance: f64,
}

impl PriorSamplingArgs {
    fn input(&self, decoder: Option<&DecoderSamplingArgs>) -> SamplingInput {
        SamplingInput {
            width: self.width,
            height: self.height,
            prior_steps: self.prior_steps,
            prior_timesteps: self.prior_timesteps.clone(),
            prior_guidance: self.prior_guidance,
            decoder_steps: Some(decoder.and_then(|d| d.decoder_steps).unwrap_or(DEFAULT_DECODER_STEPS)),
            decoder_timesteps: None,
            decoder_guidance: decoder.map_or(DEFAULT_DECODER_GUIDANCE, |d| d.decoder_guidance),
            num_images: self.num_images,
        }
    }
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Models")]
pub struct PriorModelArgs {
    /// The prior pipeline: a Hub repo id or a local folder in its layout [default: --model's]
    #[arg(long, env = "WUERSTCHEN_PRIOR")]
    pub prior: Option<String>,
    /// Replace only the Stage C weights (e.g. warp-ai/wuerstchen-prior-model-interpolated)
    #[arg(long)]
    pub stage_c: Option<String>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Models")]
pub struct DecoderModelArgs {
    /// The decoder pipeline: a Hub repo id or a local folder in its layout [default: --model's]
    #[arg(long, env = "WUERSTCHEN_DECODER")]
    pub decoder: Option<String>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Models")]
pub struct HubArgs {
    /// Hub revision (branch, tag or commit) for Hub repos
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The model pair --prior and --decoder default to; the family of any pair is read from
    /// its model_index.json
    #[arg(long, value_enum, default_value_t = ModelChoice::WuerstchenV2)]
    pub model: ModelChoice,
}

/// `--model`: the usual pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelChoice {
    /// warp-ai/wuerstchen-prior + warp-ai/wuerstchen
    WuerstchenV2,
    /// stabilityai/stable-cascade-prior + stabilityai/stable-cascade (Würstchen v3)
    StableCascade,
    /// the same repos' lite networks (prior_lite/, decoder_lite/)
    StableCascadeLite,
}

impl From<ModelChoice> for ModelPreset {
    fn from(c: ModelChoice) -> Self {
        match c {
            ModelChoice::WuerstchenV2 => Self::WuerstchenV2,
            ModelChoice::StableCascade => Self::StableCascade,
            ModelChoice::StableCascadeLite => Self::StableCascadeLite,
        }
    }
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    #[arg(
        long,
        short,
        default_value = "wuerstchen-{seed}.png",
        help = "Output PNG path; {seed}, {image} (image number), {index} (prompt number in a batch) and \
                {prompt} are filled in; the name is used as written unless two files would get the same \
                name: then those get \"-{index}\" (prompt number) or \"-{image}\" (image number) before the extension"
    )]
    pub output: String,
    /// Replace existing files
    #[arg(long)]
    pub overwrite: bool,
    /// One JSON object per image on stdout (path, seed, timings) instead of the bare path
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Runtime")]
pub struct RuntimeArgs {
    /// [default: f32 on the CPU; bf16 on a GPU of compute capability 8.0+, f16 below]
    #[arg(long, value_enum, env = "WUERSTCHEN_DTYPE")]
    pub dtype: Option<DtypeArg>,
    /// cpu, cuda or cuda:N [default: CUDA when built with it and a GPU is present]
    #[arg(long, env = "WUERSTCHEN_DEVICE", value_parser = parse_device)]
    pub device: Option<DeviceSpec>,
    /// Memory one attention layer's scores may take (512M, 2G; a bare number is MiB):
    /// attention runs in blocks of query rows that fit, with the same numbers (f32 on the CPU
    /// holds only 512 KiB of scores per thread, whatever the budget)
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub attention_budget: String,
    /// Hold only one stage's weights at a time (a batch runs all priors, then all decodes);
    /// chosen automatically when the GPU (on the CPU: the host) has too little memory for both
    #[arg(long)]
    pub low_memory: bool,
    /// f32 matrix products on a GPU in TF32 (10-bit mantissa inputs, f32 sums): several times
    /// faster on tensor cores, at ~1e-3 relative error per product (torch's
    /// `allow_tf32`); no effect on the CPU or in bf16/f16
    #[arg(long, env = "WUERSTCHEN_TF32")]
    pub tf32: bool,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    #[value(alias = "float32", alias = "fp32")]
    F32,
    #[value(alias = "float16", alias = "fp16", alias = "half")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// `--rng`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RngArg {
    /// torch on x86-64 (its AVX2/AVX512 kernels)
    Cpu,
    /// torch's default-capability build (e.g. ARM)
    CpuScalar,
}

impl From<RngArg> for BoxMuller {
    fn from(r: RngArg) -> Self {
        match r {
            RngArg::Cpu => BoxMuller::Vectorized,
            RngArg::CpuScalar => BoxMuller::Scalar,
        }
    }
}

/// `tiny-model --size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SizeArg {
    /// ~6 MB: smoke tests
    Tiny,
    /// ~440 MB: CPU benchmarks
    Mid,
    /// the published models' sizes, ~12.5 GB: GPU benchmarks without downloading
    Real,
}

fn parse_device(s: &str) -> Result<DeviceSpec, wuerstchen::error::InputError> {
    request::parse_device(s)
}

impl RuntimeArgs {
    fn spec(&self) -> Result<RuntimeSpec> {
        Ok(RuntimeSpec {
            device: self.device,
            dtype: self.dtype.map(DType::from),
            attention_budget: request::parse_memory_size("--attention-budget", &self.attention_budget)?,
            low_memory: self.low_memory,
            tf32: self.tf32,
        })
    }
}

impl PromptArgs {
    fn input(&self, batch: &BatchArgs, seed: Option<Option<u64>>) -> PromptsInput {
        PromptsInput {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            file: self.prompts.clone(),
            shard: batch.shard.clone(),
            keep_going: batch.keep_going,
            seed,
            batch_size: batch.batch_size,
            image_prompts: self.image_prompt.clone(),
        }
    }
}

fn models(prior: &PriorModelArgs, decoder: Option<&DecoderModelArgs>, hub: &HubArgs) -> ModelSpec {
    let preset = ModelPreset::from(hub.model);
    ModelSpec {
        prior: prior.prior.clone().unwrap_or_else(|| preset.prior_repo().into()),
        stage_c: prior.stage_c.clone(),
        // `prior` loads no decoder
        decoder: decoder.map(|d| decoder_source(d, hub)).unwrap_or_default(),
        revision: hub.revision.clone(),
        pinned: Default::default(),
        lite: preset.lite(),
    }
}

/// `--decoder`, or `--model`'s decoder repo.
fn decoder_source(d: &DecoderModelArgs, hub: &HubArgs) -> String {
    let preset = ModelPreset::from(hub.model);
    d.decoder.clone().unwrap_or_else(|| preset.decoder_repo().into())
}

impl GenerateArgs {
    fn plan(&self) -> Result<GeneratePlan> {
        let p = &self.prior_sampling;
        let output = OutputInput {
            images: Some(self.output.output.clone()),
            embeddings: self.save_embeddings.clone(),
            overwrite: self.output.overwrite,
            skip_existing: self.batch.skip_existing,
            json: self.output.json,
        };
        let mut inputs = GenerateInputs {
            prompts: self.prompt.input(&self.batch, p.seed),
            sampling: p.input(Some(&self.decoder_sampling)),
            rng: p.rng.into(),
            models: models(&self.prior_model, Some(&self.decoder_model), &self.hub),
            runtime: self.runtime.spec()?,
        };
        if let Some(file) = &self.from {
            let record = wuerstchen::output::read_record(file)?;
            inputs.replay(&record, file, |id| self.given.iter().any(|g| g == id))?;
        }
        request::plan_generate(
            &inputs.prompts,
            &inputs.sampling,
            &output,
            inputs.rng,
            inputs.models,
            inputs.runtime,
        )
    }
}

impl PriorArgs {
    fn plan(&self) -> Result<GeneratePlan> {
        let p = &self.prior_sampling;
        let output = OutputInput {
            images: None,
            embeddings: Some(self.out.clone()),
            overwrite: self.overwrite,
            skip_existing: self.batch.skip_existing,
            json: self.json,
        };
        request::plan_generate(
            &self.prompt.input(&self.batch, p.seed),
            &p.input(None),
            &output,
            p.rng.into(),
            models(&self.prior_model, None, &self.hub),
            self.runtime.spec()?,
        )
    }
}

impl DecodeArgs {
    fn plan(&self) -> Result<DecodePlan> {
        Ok(DecodePlan {
            embeddings: self.embeddings.clone(),
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            decoder_steps: self.decoder_sampling.decoder_steps,
            decoder_guidance: self.decoder_sampling.decoder_guidance,
            seed: self.seed,
            output: OutputInput {
                images: Some(self.output.output.clone()),
                embeddings: None,
                overwrite: self.output.overwrite,
                skip_existing: false,
                json: self.output.json,
            },
            models: ModelSpec {
                prior: String::new(), // recorded in the embeddings file
                stage_c: None,
                decoder: decoder_source(&self.decoder_model, &self.hub),
                revision: self.hub.revision.clone(),
                pinned: Default::default(),
                lite: ModelPreset::from(self.hub.model).lite(),
            },
            runtime: self.runtime.spec()?,
        })
    }
}

/// Parses the command line like `Cli::parse`, and notes which of `generate`'s options were
/// given (on the command line or in the environment, not by default), for `--from`.
pub fn parse() -> Cli {
    parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut Cli::command()))?;
    if let (Command::Generate(args), Some(("generate", m))) = (&mut cli.command, matches.subcommand()) {
        args.given = m
            .ids()
            .filter(|id| {
                matches!(
                    m.value_source(id.as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(|id| id.to_string())
            .collect();
    }
    Ok(cli)
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    wuerstchen::progress::init_logging(cli.log.quiet, cli.log.verbose);
    let quiet = cli.log.quiet;
    match cli.command {
        Command::Generate(args) => commands::generate::run(args.plan()?, quiet),
        Command::Prior(args) => commands::stages::run_prior(args.plan()?, quiet),
        Command::Decode(args) => commands::stages::run_decode(args.plan()?, quiet),
        Command::Info(args) => commands::info::run(&commands::info::InfoPlan {
            files: args.files,
            json: args.json,
        }),
        Command::Download(args) => {
            let models = models(&args.prior_model, Some(&args.decoder_model), &args.hub);
            commands::download::run(&models, args.dtype.map(DType::from), quiet)
        }
        Command::TinyModel(args) => {
            let size = match args.size {
                SizeArg::Tiny => wuerstchen::tiny::ModelSize::Tiny,
                SizeArg::Mid => wuerstchen::tiny::ModelSize::Mid,
                SizeArg::Real => wuerstchen::tiny::ModelSize::Real,
            };
            let family = match args.family {
                FamilyArg::WuerstchenV2 => wuerstchen::cascade::Family::WuerstchenV2,
                FamilyArg::StableCascade => wuerstchen::cascade::Family::StableCascade,
            };
            let opts = wuerstchen::tiny::TinyModelOptions {
                family,
                seed: args.seed,
                overwrite: args.overwrite,
                size,
            };
            commands::tiny_model(&args.out, &opts)
        }
        Command::Bench(args) => {
            let p = &args.prior_sampling;
            let plan = request::plan_bench(
                &p.input(Some(&args.decoder_sampling)),
                p.seed.flatten(),
                (args.runs, args.warmup),
                args.batch_size,
                models(&args.prior_model, Some(&args.decoder_model), &args.hub),
                args.runtime.spec()?,
            )?;
            commands::bench::run(plan, quiet)
        }
        Command::Selftest(args) => {
            let shapes = args.shapes.map(|s| match s {
                SelftestShapes::Small => wuerstchen::selftest::Shapes::Small,
                SelftestShapes::Real => wuerstchen::selftest::Shapes::Real,
                SelftestShapes::All => wuerstchen::selftest::Shapes::All,
            });
            let plan = commands::selftest::SelftestPlan {
                device: args.device,
                dtype: args.dtype.map(DType::from),
                shapes,
                seed: args.seed,
                json: args.json,
                inject_fault: args.inject_fault,
            };
            commands::selftest::run(&plan)
        }
        Command::Completions(args) => write_stdout(&completions(args.shell)),
        Command::Man(args) => match args.out {
            None => write_stdout(&man_page()?),
            Some(dir) => write_man_pages(&dir),
        },
    }
}

/// The completion script for `shell`.
fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "wuerstchen", &mut script);
    script
}

/// `wuerstchen.1`: the top-level page (options and the list of commands).
fn man_page() -> Result<Vec<u8>> {
    use clap::CommandFactory;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    Ok(page)
}

/// One page per command, `wuerstchen.1` and `wuerstchen-<command>.1` (like
/// `clap_mangen::generate_to`), each written atomically; prints the written paths.
fn write_man_pages(dir: &Path) -> Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build(); // names the subcommands' pages `wuerstchen-<command>`
    let mut pages = vec![cli.clone()];
    pages.extend(cli.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for page in pages {
        let man = clap_mangen::Man::new(page);
        let path = dir.join(man.get_filename());
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        let mut file =
            tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
        file.write_all(&roff)
            .and_then(|()| file.flush())
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.persist(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes `bytes` to stdout; a closed pipe (`wuerstchen man | head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tf32_is_off_unless_asked_for() {
        let tf32 = |args: &[&str]| {
            let argv = ["wuerstchen", "bench"].iter().chain(args).copied();
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Bench(b) => b.runtime.spec().unwrap().tf32,
                _ => unreachable!(),
            }
        };
        assert!(!tf32(&[]));
        assert!(tf32(&["--tf32"]));
    }

    #[test]
    fn seed_flag_forms() {
        let parse = |args: &[&str]| {
            let mut v = vec!["wuerstchen", "generate", "-p", "x"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().command {
                Command::Generate(g) => g.prior_sampling.seed,
                _ => unreachable!(),
            }
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["--seed"]), Some(None));
        assert_eq!(parse(&["--seed", "42"]), Some(Some(42)));
    }

    #[test]
    fn from_makes_the_prompt_optional_and_notes_what_was_given() {
        let given = |args: &[&str]| {
            let argv = ["wuerstchen", "generate"].iter().chain(args).copied();
            match parse_from(argv).unwrap().command {
                Command::Generate(mut g) => {
                    g.given.sort();
                    g.given
                }
                _ => unreachable!(),
            }
        };
        // the ids of the options given (and of the groups they are in), not the defaults
        let ids = given(&["--from", "a.png", "--seed", "7", "-W", "512", "--decoder-steps", "3"]);
        for id in ["from", "seed", "width", "decoder_steps"] {
            assert!(ids.iter().any(|g| g == id), "{id} in {ids:?}");
        }
        for id in ["height", "prior_guidance", "num_images", "rng", "revision", "prior"] {
            assert!(!ids.iter().any(|g| g == id), "{id} not in {ids:?}");
        }
        assert!(parse_from(["wuerstchen", "generate", "--from", "a.png", "-p", "x"]).is_ok());
        assert!(parse_from(["wuerstchen", "generate", "--from", "a.png", "--prompts", "f"]).is_err());
        assert!(parse_from(["wuerstchen", "prior", "--from", "a.png"]).is_err());
    }

    #[test]
    fn prompt_or_prompts_file() {
        assert!(Cli::try_parse_from(["wuerstchen", "generate"]).is_err());
        assert!(Cli::try_parse_from(["wuerstchen", "generate", "--prompts", "f.txt"]).is_ok());
        assert!(Cli::try_parse_from(["wuerstchen", "generate", "-p", "x", "--prompts", "f"]).is_err());
    }

    #[test]
    fn completions_for_every_shell() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::PowerShell, Shell::Elvish] {
            let script = String::from_utf8(completions(shell)).unwrap();
            assert!(
                script.contains("generate") && script.contains("prompt"),
                "{shell}: {script}"
            );
        }
        // the long flag as typed, in the shells whose scripts spell it out (fish: `-l prompt`)
        for shell in [Shell::Bash, Shell::Zsh, Shell::PowerShell] {
            assert!(
                String::from_utf8(completions(shell)).unwrap().contains("--prompt"),
                "{shell}"
            );
        }
        assert!(String::from_utf8(completions(Shell::Fish))
            .unwrap()
            .contains("-l prompt"));
        let parsed = Cli::try_parse_from(["wuerstchen", "completions", "zsh"]).unwrap();
        assert!(matches!(
            parsed.command,
            Command::Completions(CompletionsArgs { shell: Shell::Zsh })
        ));
        assert!(Cli::try_parse_from(["wuerstchen", "completions", "nosuch"]).is_err());
    }

    #[test]
    fn man_pages() {
        let page = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(
            page.contains(".TH") && page.contains("generate") && page.contains(VERSION),
            "{page}"
        );
        let dir = tempfile::tempdir().unwrap();
        write_man_pages(&dir.path().join("man1")).unwrap();
        let generate = std::fs::read_to_string(dir.path().join("man1/wuerstchen-generate.1")).unwrap();
        assert!(
            generate.contains(".TH") && generate.contains("\\-\\-prompt"),
            "{generate}"
        );
        assert!(dir.path().join("man1/wuerstchen.1").exists());
        assert!(dir.path().join("man1/wuerstchen-completions.1").exists());
    }

    #[test]
    fn version_names_the_crate_version() {
        let version = Cli::command().render_version();
        assert!(
            version.starts_with(&format!("wuerstchen {}", env!("CARGO_PKG_VERSION"))),
            "{version}"
        );
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        // `0.1.0` or `0.1.0 (abc1234 2026-11-30)` / `(abc1234-dirty 2026-11-30)`
        if let Some(rest) = VERSION.strip_prefix(env!("CARGO_PKG_VERSION")) {
            assert!(
                rest.is_empty() || (rest.starts_with(" (") && rest.ends_with(')')),
                "{VERSION}"
            );
        }
    }
}
