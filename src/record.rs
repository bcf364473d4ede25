//! The generation record: what made an image, written into every PNG (as JSON, and as the
//! `parameters` text the Stable Diffusion web UIs read), every embeddings file and every
//! `--json` line, and read back by `decode`. One type, serde both ways.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::request::GenerateRequest;
use crate::rng::BoxMuller;

/// Which torch CPU `randn` kernel the noise reproduces, as the record names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RngName {
    #[serde(rename = "cpu")]
    Cpu,
    #[serde(rename = "cpu-scalar")]
    CpuScalar,
}

impl From<BoxMuller> for RngName {
    fn from(k: BoxMuller) -> Self {
        match k {
            BoxMuller::Vectorized => Self::Cpu,
            BoxMuller::Scalar => Self::CpuScalar,
        }
    }
}

impl From<RngName> for BoxMuller {
    fn from(r: RngName) -> Self {
        match r {
            RngName::Cpu => Self::Vectorized,
            RngName::CpuScalar => Self::Scalar,
        }
    }
}

/// How many noise draws the prior made, so that `decode` can continue its random stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseDraws {
    pub count: usize,
    /// elements per draw
    pub numel: usize,
}

/// Everything needed to make an image again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub rng: RngName,
    pub num_images: usize,
    pub width: usize,
    pub height: usize,
    pub prior_timesteps: Vec<f32>,
    pub prior_guidance: f64,
    pub decoder_timesteps: Vec<f32>,
    pub decoder_guidance: f64,
    /// the prior pipeline (repo id or folder)
    pub prior: String,
    /// the decoder pipeline; empty in embeddings from `prior`
    pub decoder: String,
    pub stage_c: Option<String>,
    /// Stable Cascade's lite networks (`prior_lite/`, `decoder_lite/`)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lite: bool,
    /// the image prompts' files, in order (Stable Cascade's `--image-prompt`)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_prompts: Vec<String>,
    /// the Hub commits the sources resolved to, by source (`prior`, `stage_c`, `decoder`)
    #[serde(default)]
    pub commits: BTreeMap<String, String>,
    pub dtype: String,
    /// `wuerstchen <version>`
    pub program: String,
    /// which image of the request a PNG holds
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_index: Option<usize>,
    /// in embeddings files: the prior's noise draws
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_noise_draws: Option<NoiseDraws>,
}

/// What a run records about its models and runtime, shared by its requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunInfo {
    pub prior: String,
    pub decoder: String,
    pub stage_c: Option<String>,
    pub lite: bool,
    pub image_prompts: Vec<String>,
    pub commits: BTreeMap<String, String>,
    pub dtype: String,
    pub rng: BoxMuller,
}

impl GenerationRecord {
    pub fn new(req: &GenerateRequest, run: &RunInfo) -> Self {
        Self {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            seed: req.seed,
            rng: run.rng.into(),
            num_images: req.num_images,
            width: req.width,
            height: req.height,
            prior_timesteps: req.prior_timesteps.clone(),
            prior_guidance: req.prior_guidance,
            decoder_timesteps: req.decoder_timesteps.clone(),
            decoder_guidance: req.decoder_guidance,
            prior: run.prior.clone(),
            decoder: run.decoder.clone(),
            stage_c: run.stage_c.clone(),
            lite: run.lite,
            image_prompts: run.image_prompts.clone(),
            commits: run.commits.clone(),
            dtype: run.dtype.clone(),
            program: format!("wuerstchen {}", env!("CARGO_PKG_VERSION")),
            image_index: None,
            prior_noise_draws: None,
        }
    }

    /// The record as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a record back; an error names the field (`width: invalid type: ...`).
    pub fn from_json(text: &str) -> Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| match e.path().to_string().as_str() {
            "." => e.inner().to_string(),
            path => format!("{path}: {}", e.inner()),
        })
    }

    /// The record of image `n` of the request.
    pub fn for_image(&self, n: usize) -> Self {
        Self {
            image_index: Some(n),
            ..self.clone()
        }
    }

    /// The `parameters` text in the layout the Stable Diffusion web UIs write (and image
    /// browsers show): prompt, `Negative prompt: ...`, then `Key: value` pairs.
    pub fn a1111_parameters(&self) -> String {
        let mut s = format!(
            "{}\nNegative prompt: {}\nSteps: {}, Sampler: DDPMWuerstchen, CFG scale: {}, Seed: {}, Size: {}x{}, \
             Model: {}, Decoder: {}, Decoder steps: {}, Decoder CFG scale: {}, Dtype: {}, Version: {}",
            self.prompt,
            self.negative_prompt,
            self.prior_timesteps.len().saturating_sub(1),
            self.prior_guidance,
            self.seed,
            self.width,
            self.height,
            self.prior,
            self.decoder,
            self.decoder_timesteps.len().saturating_sub(1),
            self.decoder_guidance,
            self.dtype,
            self.program,
        );
        if let Some(stage_c) = &self.stage_c {
            s.push_str(&format!(", Stage C: {stage_c}"));
        }
        if let Some(c) = self.commits.get("prior") {
            s.push_str(&format!(", Model hash: {}", &c[..c.len().min(10)]));
        }
        if let (true, Some(n)) = (self.num_images > 1, self.image_index) {
            s.push_str(&format!(", Batch pos: {n}"));
        }
        s
    }

    /// The PNG text chunks of image `n`: `parameters` (web UI layout) and `wuerstchen` (JSON).
    pub fn png_chunks(&self, n: usize) -> crate::output::TextChunks {
        let image = self.for_image(n);
        vec![
            ("parameters".to_string(), image.a1111_parameters()),
            ("wuerstchen".to_string(), image.to_json()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> GenerationRecord {
        let req = GenerateRequest {
            prompt: "a cat".into(),
            negative_prompt: "dogs".into(),
            width: 1024,
            height: 1536,
            prior_timesteps: vec![1.0, 0.5, 0.0],
            prior_schedule_defaulted: false,
            prior_guidance: 4.0,
            decoder_timesteps: vec![1.0, 0.0],
            decoder_guidance: 0.0,
            num_images: 2,
            seed: 42,
        };
        let run = RunInfo {
            prior: "warp-ai/wuerstchen-prior".into(),
            decoder: "warp-ai/wuerstchen".into(),
            stage_c: None,
            lite: false,
            image_prompts: Vec::new(),
            commits: [("prior".to_string(), "0123456789abcdef".to_string())].into(),
            dtype: "bf16".into(),
            rng: BoxMuller::Scalar,
        };
        GenerationRecord::new(&req, &run)
    }

    #[test]
    fn round_trips_through_json() {
        let r = record().for_image(1);
        let back: GenerationRecord = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert!(r.to_json().contains("\"rng\":\"cpu-scalar\""));
    }

    #[test]
    fn web_ui_parameters() {
        let p = record().for_image(1).a1111_parameters();
        assert!(p.starts_with("a cat\nNegative prompt: dogs\nSteps: 2, Sampler: DDPMWuerstchen, CFG scale: 4, Seed: 42, Size: 1024x1536"), "{p}");
        assert!(p.contains("Model hash: 0123456789, Batch pos: 1"), "{p}");
    }

    #[test]
    fn a_bad_record_names_the_field() {
        let mut v: serde_json::Value = serde_json::from_str(&record().to_json()).unwrap();
        v["width"] = "wide".into();
        let e = GenerationRecord::from_json(&v.to_string()).unwrap_err();
        assert!(e.starts_with("width: invalid type") && e.contains("wide"), "{e}");
        v["prior_noise_draws"] = serde_json::json!({"count": 3});
        v["width"] = 8.into();
        let e = GenerationRecord::from_json(&v.to_string()).unwrap_err();
        assert!(e.starts_with("prior_noise_draws: missing field `numel`"), "{e}");
        v["prior_noise_draws"] = serde_json::json!({"count": 3, "numel": 8});
        assert!(GenerationRecord::from_json(&v.to_string()).is_ok());
        v.as_object_mut().unwrap().remove("seed");
        let e = GenerationRecord::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("missing field `seed`"), "{e}");
    }
}
