//! The two stages apart, like diffusers' two pipelines: `wuerstchen prior` writes image
//! embeddings, `wuerstchen decode` turns them into images. By default `decode` continues the
//! recorded seed's random stream where the prior left it, so `prior` then `decode` gives the
//! same image as `generate`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::generate::{embeddings_file, RunInfo, Writer};
use super::{
    check_interrupt, install_interrupt, load_decoder, log_peak_memory, plan_jobs, runtime_spec, source, PriorSources,
};
use crate::cli::{DecodeArgs, LogArgs, PriorArgs};
use crate::error::{InputError, ModelError};
use crate::output::{self, NameFields};
use crate::progress::TerminalProgress;
use crate::request::{self, GenerateRequest, Job};
use crate::rng::{NoiseSource, TorchCpuGenerator};

/// One embeddings file per job, checked like image outputs.
pub fn plan_embedding_outputs(jobs: &[Job], template: &str, batch: bool, overwrite: bool) -> Result<Vec<PathBuf>> {
    let mut seen = std::collections::HashSet::new();
    jobs.iter()
        .map(|job| {
            let fields = NameFields {
                index: job.index,
                image: 0,
                seed: job.req.seed,
                prompt: &job.req.prompt,
            };
            let path = output::output_path(template, &fields, false, batch);
            output::check_writable(&path, overwrite).map_err(|e| InputError::new(format!("{}: {e}", job.origin)))?;
            if !seen.insert(path.clone()) {
                return Err(InputError::new(format!(
                    "two prompts would write {}; use {{index}} in the name",
                    path.display()
                ))
                .into());
            }
            Ok(path)
        })
        .collect()
}

pub fn run_prior(args: &PriorArgs, log: &LogArgs) -> Result<()> {
    let interrupt = install_interrupt();
    let sampling = args.prior_sampling.input(None);
    let kernel = request::parse_rng(&args.prior_sampling.rng)?;
    let (jobs, bad) = plan_jobs(&args.prompt, &args.batch, &sampling, args.prior_sampling.seed)?;
    let spec = runtime_spec(&args.runtime)?;
    let batch = args.prompt.prompts.is_some();
    let paths = plan_embedding_outputs(&jobs, &args.out, batch, args.overwrite)?;
    let prior_src = PriorSources::resolve(&args.prior_model, &args.hub, log.quiet)?;
    // sizes are the prior's business only: its latent is ceil(size / resolution_multiple)
    for job in &jobs {
        for (flag, v) in [("--width", job.req.width), ("--height", job.req.height)] {
            if v == 0 {
                return Err(InputError::new(format!("{}: {flag} must be greater than 0", job.origin)).into());
            }
        }
    }
    let rt = spec.open()?;
    let prior = prior_src.load(&rt)?;
    let info = RunInfo {
        prior: prior_src.prior.describe(),
        decoder: String::new(),
        stage_c: prior_src.stage_c.as_ref().map(|s| s.describe()),
        commits: super::generate::commits(&[
            ("prior", Some(prior_src.prior.as_ref())),
            ("stage_c", prior_src.stage_c.as_deref()),
        ]),
        dtype: rt.dtype,
        rng: kernel,
    };
    let writer = Writer {
        overwrite: args.overwrite,
        json: args.json,
    };
    let mut progress = TerminalProgress::new(log.quiet, Some(interrupt.clone()));
    let mut failed = 0;
    for (job, path) in jobs.iter().zip(&paths) {
        check_interrupt(&interrupt)?;
        let result = (|| {
            let mut noise = TorchCpuGenerator::with_kernel(job.req.seed, kernel);
            let emb = prior.run(&job.req.prior_params(), &mut noise, &mut progress)?;
            output::write_atomic(path, &embeddings_file(&emb, &job.req, &info)?, args.overwrite)?;
            writer.report(path, job, 0, &progress.take_timings());
            anyhow::Ok(())
        })();
        if let Err(e) = result {
            if !args.batch.keep_going || e.chain().any(|c| c.is::<crate::error::Interrupted>()) {
                return Err(e.context(job.origin.clone()));
            }
            tracing::error!("{}: {e:#}", job.origin);
            failed += 1;
        }
    }
    log_peak_memory();
    if failed > 0 {
        anyhow::bail!("{failed} prompt(s) failed");
    }
    if !bad.is_empty() {
        return Err(InputError::new(format!("{} prompts-file line(s) skipped", bad.len())).into());
    }
    Ok(())
}

/// What `decode` reads back from an embeddings file.
struct Embeddings {
    tensor: Tensor,
    record: serde_json::Value,
}

fn read_embeddings(path: &Path) -> Result<Embeddings> {
    let bad = |message: String| ModelError::BadFile {
        component: "embeddings".into(),
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| InputError::new(format!("cannot read {}: {e}", path.display())))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let view = st
        .tensor("image_embeddings")
        .map_err(|_| bad("no `image_embeddings` tensor".into()))?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 4 {
        return Err(bad(format!(
            "`image_embeddings` must be f32 (N, C, h, w), got {:?} {:?}",
            view.dtype(),
            view.shape()
        ))
        .into());
    }
    let tensor = Tensor::from_raw_buffer(view.data(), candle_core::DType::F32, view.shape(), &Device::Cpu)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let record = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("wuerstchen"))
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| bad(format!("invalid `wuerstchen` metadata: {e}")))?
        .unwrap_or(serde_json::Value::Null);
    Ok(Embeddings { tensor, record })
}

pub fn run_decode(args: &DecodeArgs, log: &LogArgs) -> Result<()> {
    let interrupt = install_interrupt();
    let emb = read_embeddings(&args.embeddings)?;
    let rec = &emb.record;
    let text = |key: &str| rec[key].as_str().map(str::to_string);
    let prompt = args.prompt.clone().or_else(|| text("prompt")).ok_or_else(|| {
        InputError::new(format!(
            "{} records no prompt; pass --prompt",
            args.embeddings.display()
        ))
    })?;
    let negative = args
        .negative_prompt
        .clone()
        .or_else(|| text("negative_prompt"))
        .unwrap_or_default();
    let kernel = request::parse_rng(rec["rng"].as_str().unwrap_or("cpu"))?;
    // the noise: a fresh stream from --seed, or the recorded seed's stream after the prior's draws
    let (seed, skip) = match (args.seed, rec["seed"].as_u64()) {
        (Some(s), _) => (s, None),
        (None, Some(s)) => (s, Some(&rec["prior_noise_draws"])),
        (None, None) => {
            return Err(InputError::new(format!("{} records no seed; pass --seed", args.embeddings.display())).into())
        }
    };
    let mut noise = TorchCpuGenerator::with_kernel(seed, kernel);
    if let Some(draws) = skip {
        let (count, numel) = (
            draws["count"].as_u64().unwrap_or(0),
            draws["numel"].as_u64().unwrap_or(0),
        );
        for _ in 0..count {
            noise.standard_normal(&[numel as usize])?;
        }
    }
    let (n, _, h, w) = emb.tensor.dims4()?;
    let decoder_timesteps = request::timesteps("decoder", Some(args.decoder_sampling.decoder_steps), None, Vec::new)?;
    let req = GenerateRequest {
        prompt,
        negative_prompt: negative,
        width: rec["width"].as_u64().map_or(0, |v| v as usize),
        height: rec["height"].as_u64().map_or(0, |v| v as usize),
        prior_timesteps: rec["prior_timesteps"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).map(|v| v as f32).collect())
            .unwrap_or_default(),
        prior_guidance: rec["prior_guidance"].as_f64().unwrap_or(0.0),
        decoder_timesteps,
        decoder_guidance: request::check_guidance("--decoder-guidance", args.decoder_sampling.decoder_guidance)?,
        num_images: n,
        seed,
    };
    let job = Job {
        index: 0,
        origin: args.embeddings.display().to_string(),
        req,
        output: None,
    };
    let spec = runtime_spec(&args.runtime)?;
    let paths = super::plan_outputs(
        std::slice::from_ref(&job),
        &args.output.output,
        false,
        args.output.overwrite,
    )?
    .remove(0);
    let decoder_src = source(&args.decoder_model.decoder, &args.hub, log.quiet)?;
    crate::pipeline::check_embedding_size(decoder_src.as_ref(), h, w)?;
    let rt = spec.open()?;
    let decoder = load_decoder(decoder_src.as_ref(), &rt)?;
    let info = RunInfo {
        prior: rec["prior"].as_str().unwrap_or("").to_string(),
        decoder: decoder_src.describe(),
        stage_c: rec["stage_c"].as_str().map(str::to_string),
        commits: {
            let mut c = rec["commits"].as_object().cloned().unwrap_or_default();
            if let Some(commit) = decoder_src.commit() {
                c.insert("decoder".into(), commit.into());
            }
            c.into()
        },
        dtype: rt.dtype,
        rng: kernel,
    };
    let mut progress = TerminalProgress::new(log.quiet, Some(interrupt.clone()));
    check_interrupt(&interrupt)?;
    let images = decoder.run(&emb.tensor, &job.req.decoder_params(), &mut noise, &mut progress)?;
    let writer = Writer {
        overwrite: args.output.overwrite,
        json: args.output.json,
    };
    let timings = progress.take_timings();
    writer.images(&job, &output::to_rgb8(&images)?, &paths, &info, &timings)?;
    log_peak_memory();
    Ok(())
}
