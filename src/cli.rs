//! The command line: clap definitions, grouped by concern, and dispatch to the commands.

use anyhow::Result;
use clap::{ArgAction, Args, Parser, Subcommand};

use crate::request::SamplingInput;

#[derive(Debug, Parser)]
#[command(name = "wuerstchen", version, about = "Würstchen v2 text-to-image, diffusers' numbers without Python")]
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
    /// Generate images from a text prompt (prior, decoder and VQGAN)
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Prompt")]
pub struct PromptArgs {
    /// What to draw
    #[arg(long, short)]
    pub prompt: String,
    /// What to steer away from (used where guidance is on)
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Sampling")]
pub struct SamplingArgs {
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
    /// Decoder steps, evenly spaced
    #[arg(long, default_value_t = 12)]
    pub decoder_steps: usize,
    /// Classifier-free guidance of the decoder (on when > 1)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub decoder_guidance: f64,
    /// Images per prompt (one batch, like num_images_per_prompt)
    #[arg(long, short = 'n', default_value_t = 1)]
    pub num_images: usize,
    /// Seed of the torch-compatible noise; without a value (or without the flag) one is picked
    /// and printed
    #[arg(long, num_args = 0..=1)]
    pub seed: Option<Option<u64>>,
}

impl SamplingArgs {
    pub fn input(&self) -> SamplingInput {
        SamplingInput {
            width: self.width,
            height: self.height,
            prior_steps: self.prior_steps,
            prior_timesteps: self.prior_timesteps.clone(),
            prior_guidance: self.prior_guidance,
            decoder_steps: Some(self.decoder_steps),
            decoder_timesteps: None,
            decoder_guidance: self.decoder_guidance,
            num_images: self.num_images,
        }
    }
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Models")]
pub struct ModelArgs {
    /// The prior pipeline: a Hub repo id or a local folder in its layout
    #[arg(long, env = "WUERSTCHEN_PRIOR", default_value = "warp-ai/wuerstchen-prior")]
    pub prior: String,
    /// The decoder pipeline: a Hub repo id or a local folder in its layout
    #[arg(long, env = "WUERSTCHEN_DECODER", default_value = "warp-ai/wuerstchen")]
    pub decoder: String,
    /// Replace only the Stage C weights (e.g. warp-ai/wuerstchen-prior-model-interpolated)
    #[arg(long)]
    pub stage_c: Option<String>,
    /// Hub revision (branch, tag or commit) for Hub repos
    #[arg(long, default_value = "main")]
    pub revision: String,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Output PNG path; {seed}, {n} (image number), {index} and {prompt} are filled in, and
    /// several images without {n} get "-N" before the extension
    #[arg(long, short, default_value = "wuerstchen-{seed}.png")]
    pub output: String,
    /// Replace existing files
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Runtime")]
pub struct RuntimeArgs {
    /// f32, f16 or bf16 [default: bf16 on CUDA, f32 on the CPU]
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N [default: CUDA when built with it and a GPU is present]
    #[arg(long)]
    pub device: Option<String>,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    crate::progress::init_logging(cli.log.quiet, cli.log.verbose);
    match cli.command {
        Command::Generate(args) => crate::generate::run(&args, &cli.log),
    }
}

/// Reads a seed option: a given value, or one picked at random.
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
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() & 0xffff_ffff
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
                Command::Generate(g) => g.sampling.seed,
            }
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["--seed"]), Some(None));
        assert_eq!(parse(&["--seed", "42"]), Some(Some(42)));
        assert_eq!(seed_or_random(Some(Some(5))), (5, false));
        assert!(seed_or_random(None).1);
    }
}
