//! User input -> validated values. Every check of what a user typed lives here and fails
//! with an `InputError` (exit code 2) before any model loads.

use candle_core::DType;

use crate::error::InputError;
use crate::pipeline::{DecoderParams, PriorParams};
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
pub fn generate_request(
    prompt: &str,
    negative_prompt: &str,
    s: &SamplingInput,
    seed: u64,
) -> Result<GenerateRequest> {
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
        prior_guidance: check_guidance("--prior-guidance", s.prior_guidance)?,
        decoder_timesteps: timesteps("decoder", s.decoder_steps, s.decoder_timesteps.as_deref(), || {
            scheduler::linear_timesteps(12)
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

#[cfg(test)]
mod tests {
    use super::*;

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
            (SamplingInput { num_images: 0, ..input() }, "--num-images"),
            (SamplingInput { prior_steps: Some(0), ..input() }, "--prior-steps"),
            (SamplingInput { decoder_steps: Some(0), ..input() }, "--decoder-steps"),
            (SamplingInput { prior_guidance: f64::NAN, ..input() }, "--prior-guidance"),
            (SamplingInput { decoder_guidance: f64::INFINITY, ..input() }, "--decoder-guidance"),
            (SamplingInput { prior_timesteps: Some(vec![0.5, 0.7, 0.0]), ..input() }, "descending"),
            (SamplingInput { prior_timesteps: Some(vec![1.5, 0.0]), ..input() }, "[0, 1]"),
            (SamplingInput { prior_timesteps: Some(vec![f64::NAN, 0.0]), ..input() }, "[0, 1]"),
            (SamplingInput { prior_timesteps: Some(vec![1.0]), ..input() }, "two values"),
            (SamplingInput { prior_steps: Some(3), prior_timesteps: Some(vec![1.0, 0.0]), ..input() }, "not both"),
        ];
        for (s, needle) in cases {
            let e = generate_request("x", "", &s, 0).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn explicit_schedules_and_steps() {
        let s = SamplingInput { prior_timesteps: Some(vec![0.9, 0.5, 0.2, 0.0]), decoder_steps: Some(4), ..input() };
        let r = generate_request("x", "", &s, 0).unwrap();
        assert_eq!(r.prior_timesteps, vec![0.9, 0.5, 0.2, 0.0]);
        assert_eq!(r.decoder_timesteps, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
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
}
