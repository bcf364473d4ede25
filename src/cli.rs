//! The command line: clap definitions, grouped by concern, and dispatch to the commands.

use std::path::PathBuf;

use anyhow::Result;
use clap::{ArgAction, Args, Parser, Subcommand};

use crate::request::SamplingInput;

#[derive(Debug, Parser)]
#[command(
    name = "wuerstchen",
    version,
    about = "Würstchen v2 text-to-image, diffusers' numbers without Python"
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
    /// Fetch the model files into the Hugging Face cache
    Download(DownloadArgs),
    /// Write a tiny random-weight model in the Hub layout, for smoke tests
    TinyModel(TinyModelArgs),
    /// Time the pipeline: load, warm up, per-stage medians and ms per step as JSON on stdout
    Bench(BenchArgs),
    /// Check that every op, block and the whole pipeline compute the CPU's numbers on a device
    Selftest(SelftestArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
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
pub struct DownloadArgs {
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
    #[arg(long, env = "WUERSTCHEN_DEVICE")]
    pub device: Option<String>,
    /// f32, f16 or bf16 [default: as for generate]
    #[arg(long, env = "WUERSTCHEN_DTYPE")]
    pub dtype: Option<String>,
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
    /// tiny (~6 MB, smoke tests), mid (~440 MB, CPU benchmarks) or real (the published models'
    /// sizes, ~12.5 GB: GPU benchmarks without downloading)
    #[arg(long, default_value = "tiny")]
    pub size: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Prompt")]
pub struct PromptArgs {
    /// What to draw
    #[arg(long, short, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// What to steer away from (used where guidance is on)
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// A file of prompts, one per line, or JSON Lines with per-line overrides (prompt,
    /// negative_prompt, seed, width, height, steps, guidance, decoder_steps,
    /// decoder_guidance, num_images, output); `-` reads stdin
    #[arg(long)]
    pub prompts: Option<String>,
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
    /// Which of torch's CPU randn kernels to reproduce: `cpu` (x86-64 builds, AVX2/AVX512)
    /// or `cpu-scalar` (torch's default-capability build, e.g. ARM)
    #[arg(long, default_value = "cpu")]
    pub rng: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Sampling")]
pub struct DecoderSamplingArgs {
    /// Decoder steps, evenly spaced
    #[arg(long, default_value_t = 12)]
    pub decoder_steps: usize,
    /// Classifier-free guidance of the decoder (on when > 1)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub decoder_guidance: f64,
}

impl PriorSamplingArgs {
    pub fn input(&self, decoder: Option<&DecoderSamplingArgs>) -> SamplingInput {
        SamplingInput {
            width: self.width,
            height: self.height,
            prior_steps: self.prior_steps,
            prior_timesteps: self.prior_timesteps.clone(),
            prior_guidance: self.prior_guidance,
            decoder_steps: Some(decoder.map_or(12, |d| d.decoder_steps)),
            decoder_timesteps: None,
            decoder_guidance: decoder.map_or(0.0, |d| d.decoder_guidance),
            num_images: self.num_images,
        }
    }
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Models")]
pub struct PriorModelArgs {
    /// The prior pipeline: a Hub repo id or a local folder in its layout
    #[arg(long, env = "WUERSTCHEN_PRIOR", default_value = "warp-ai/wuerstchen-prior")]
    pub prior: String,
    /// Replace only the Stage C weights (e.g. warp-ai/wuerstchen-prior-model-interpolated)
    #[arg(long)]
    pub stage_c: Option<String>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Models")]
pub struct DecoderModelArgs {
    /// The decoder pipeline: a Hub repo id or a local folder in its layout
    #[arg(long, env = "WUERSTCHEN_DECODER", default_value = "warp-ai/wuerstchen")]
    pub decoder: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Models")]
pub struct HubArgs {
    /// Hub revision (branch, tag or commit) for Hub repos
    #[arg(long, default_value = "main")]
    pub revision: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    #[arg(
        long,
        short,
        default_value = "wuerstchen-{seed}.png",
        help = "Output PNG path; {seed}, {image} (image number), {index} (prompt number in a batch) and \
                {prompt} are filled in; several images without {image} get \"-{image}\" before the extension, \
                and batches without {index} get \"-{index}\""
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
    /// f32, f16 or bf16 [default: f32 on the CPU; bf16 on a GPU of compute capability 8.0+, f16 below]
    #[arg(long, env = "WUERSTCHEN_DTYPE")]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N [default: CUDA when built with it and a GPU is present]
    #[arg(long, env = "WUERSTCHEN_DEVICE")]
    pub device: Option<String>,
    /// Memory one attention layer's scores may take (512M, 2G; a bare number is MiB):
    /// attention runs in blocks of query rows that fit, with the same numbers
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    pub attention_budget: String,
    /// Hold only one stage's weights at a time (a batch runs all priors, then all decodes);
    /// chosen automatically when the GPU has too little free memory for both
    #[arg(long)]
    pub low_memory: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    crate::progress::init_logging(cli.log.quiet, cli.log.verbose);
    match cli.command {
        Command::Generate(args) => crate::commands::generate::run(&args, &cli.log),
        Command::Prior(args) => crate::commands::stages::run_prior(&args, &cli.log),
        Command::Decode(args) => crate::commands::stages::run_decode(&args, &cli.log),
        Command::Download(args) => crate::commands::download::run(&args, &cli.log),
        Command::TinyModel(args) => crate::commands::tiny_model(&args),
        Command::Bench(args) => crate::commands::bench::run(&args, &cli.log),
        Command::Selftest(args) => crate::commands::selftest::run(&args),
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
    fn prompt_or_prompts_file() {
        assert!(Cli::try_parse_from(["wuerstchen", "generate"]).is_err());
        assert!(Cli::try_parse_from(["wuerstchen", "generate", "--prompts", "f.txt"]).is_ok());
        assert!(Cli::try_parse_from(["wuerstchen", "generate", "-p", "x", "--prompts", "f"]).is_err());
    }
}
