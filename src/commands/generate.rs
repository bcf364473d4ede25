//! `wuerstchen generate`: resolve the models and check the sizes against them, load once,
//! run every job, write each PNG atomically as soon as it is done, print the written paths
//! (or JSON) on stdout.

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::{check_interrupt, install_interrupt, load_decoder, log_peak_memory, source, PriorSources, Summary, Writer};
use crate::memory::{self, ModelShapes, RunShapes};
use crate::output;
use crate::pipeline::{DecoderConfigs, DecoderPipeline, PriorPipeline, Runtime, SizeRule};
use crate::progress::TerminalProgress;
use crate::record::{GenerationRecord, NoiseDraws, RunInfo};
use crate::request::{GeneratePlan, GenerateRequest, JobPlan, PlannedJob};
use crate::rng::{BoxMuller, TorchCpuGenerator};

/// The file that holds one request's image embeddings: tensor `image_embeddings`
/// (N, C, h, w) f32, and the record (with how many noise draws the prior made, so `decode`
/// can continue the same random stream) in the metadata under `wuerstchen`.
pub fn embeddings_file(embeddings: &Tensor, req: &GenerateRequest, info: &RunInfo) -> Result<Vec<u8>> {
    let t = embeddings
        .to_device(&Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?;
    let record = GenerationRecord {
        prior_noise_draws: Some(NoiseDraws {
            count: req.prior_timesteps.len(),
            numel: t.elem_count(),
        }),
        ..GenerationRecord::new(req, info)
    };
    let data: Vec<u8> = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.dims().to_vec(), &data)?;
    let meta = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("wuerstchen".to_string(), record.to_json()),
    ]);
    sorted_header(safetensors::serialize([("image_embeddings", view)], Some(meta))?)
}

/// safetensors writes its metadata from a `HashMap`, in an order that changes from run to
/// run: the header again with its keys sorted (the same length), so that the same embeddings
/// are the same bytes (a resumed batch's files equal an uninterrupted run's).
fn sorted_header(mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Sorted<'a> {
        Map(std::collections::BTreeMap<&'a str, Sorted<'a>>),
        Other(&'a serde_json::Value),
    }
    fn sorted(v: &serde_json::Value) -> Sorted<'_> {
        match v {
            serde_json::Value::Object(m) => Sorted::Map(m.iter().map(|(k, v)| (k.as_str(), sorted(v))).collect()),
            v => Sorted::Other(v),
        }
    }
    let n = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(|b| u64::from_le_bytes(b) as usize)
        .filter(|n| 8 + n <= bytes.len())
        .ok_or_else(|| anyhow::anyhow!("safetensors wrote no header"))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let mut text = serde_json::to_vec(&sorted(&header))?;
    anyhow::ensure!(
        text.len() <= n,
        "the sorted safetensors header is longer than the original"
    );
    text.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&text);
    Ok(bytes)
}

/// The noise for one request: the torch-compatible generator seeded with its seed.
fn generator(req: &GenerateRequest, kernel: BoxMuller) -> TorchCpuGenerator {
    TorchCpuGenerator::with_kernel(req.seed, kernel)
}

/// Whether to hold one stage at a time: asked for, or needed because the GPU cannot hold both
/// stages' weights (estimated from the file sizes) plus the activations of the run's most
/// demanding job (estimated from the configs and its sizes, `memory::peak_activation_bytes`).
fn staged(asked: bool, rt: &Runtime, weights: u64, shapes: &ModelShapes, jobs: &[PlannedJob]) -> bool {
    if asked {
        return true;
    }
    let Some(free) = crate::pipeline::free_device_memory(&rt.device) else {
        return false;
    };
    let activations = jobs
        .iter()
        .map(|p| memory::peak_activation_bytes(&RunShapes::of(&p.job.req, rt.dtype), shapes))
        .max()
        .unwrap_or(0);
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
    low
}

pub fn run(mut plan: GeneratePlan, quiet: bool) -> Result<()> {
    if super::report_done(&plan.jobs) {
        return Summary::default().finish(&plan.jobs);
    }
    let interrupt = install_interrupt();
    // the size rule needs only the models' small JSON files
    let prior_src = PriorSources::resolve(&plan.models, quiet)?;
    let decoder_src = source(&plan.models.decoder, &plan.models.revision, quiet)?;
    let (prior_cfg, decoder_cfg) = (prior_src.configs()?, DecoderConfigs::read(decoder_src.as_ref())?);
    let rule = SizeRule::new(&prior_cfg, &decoder_cfg);
    plan.jobs.check_sizes(|req| {
        rule.check("--width", req.width)?;
        rule.check("--height", req.height)
    })?;
    check_interrupt(&interrupt)?;

    let rt = plan.runtime.open()?;
    let info = prior_src.run_info(Some(decoder_src.as_ref()), rt.dtype, plan.rng);
    let writer = Writer::from(&plan.jobs);
    let mut progress = TerminalProgress::new(quiet, Some(interrupt.clone()));
    let weights = memory::weight_bytes(
        prior_src.prior.as_ref(),
        prior_src.stage_c.as_deref(),
        decoder_src.as_ref(),
        rt.dtype,
    );
    let shapes = ModelShapes::new(&prior_cfg, &decoder_cfg);
    let staged = staged(plan.runtime.low_memory, &rt, weights, &shapes, &plan.jobs.jobs);
    let ctx = Ctx {
        plan: &plan.jobs,
        info: &info,
        writer: &writer,
        kernel: plan.rng,
        interrupt: &interrupt,
    };
    let load_prior = || prior_src.load(&prior_cfg, &rt);
    let load_decoder = || load_decoder(decoder_src.as_ref(), &decoder_cfg, &rt);
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
    summary.finish(&plan.jobs)
}

struct Ctx<'a> {
    plan: &'a JobPlan,
    info: &'a RunInfo,
    writer: &'a Writer,
    kernel: BoxMuller,
    interrupt: &'a AtomicBool,
}

impl Ctx<'_> {
    fn jobs(&self) -> &[PlannedJob] {
        &self.plan.jobs
    }

    fn log_job(&self, i: usize, p: &PlannedJob) {
        let req = &p.job.req;
        tracing::info!(
            "[{}/{}] seed {} {}x{}: {:?}",
            i + 1,
            self.jobs().len(),
            req.seed,
            req.width,
            req.height,
            req.prompt
        );
    }

    fn save_embeddings(&self, p: &PlannedJob, emb: &Tensor) -> Result<()> {
        if let Some(path) = &p.embeddings {
            let file = embeddings_file(emb, &p.job.req, self.info)?;
            output::write_atomic(path, &file, p.overwrite)?;
            tracing::info!("embeddings written to {}", path.display());
        }
        Ok(())
    }

    fn finish_job(&self, p: &PlannedJob, images: &Tensor, progress: &mut TerminalProgress) -> Result<()> {
        let timings = progress.take_timings();
        let t: Vec<String> = timings.iter().map(|(s, t)| format!("{s} {t:.2}s")).collect();
        tracing::info!("seed {}: {}", p.job.req.seed, t.join(", "));
        let record = GenerationRecord::new(&p.job.req, self.info);
        let writer = Writer {
            overwrite: p.overwrite,
            json: self.writer.json,
        };
        writer.images(&p.job, &output::to_rgb8(images)?, &p.images, &record, &timings)
    }

    /// The prior half of a job: its embeddings, and its random stream as the decoder continues it.
    fn prior_half(
        &self,
        i: usize,
        prior: &PriorPipeline,
        progress: &mut TerminalProgress,
    ) -> Result<(Tensor, TorchCpuGenerator)> {
        let p = &self.jobs()[i];
        check_interrupt(self.interrupt)?;
        self.log_job(i, p);
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
        let p = &self.jobs()[i];
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
        for (i, p) in self.jobs().iter().enumerate() {
            let result = self
                .prior_half(i, prior, progress)
                .and_then(|(emb, mut noise)| self.decoder_half(i, decoder, &emb, &mut noise, progress));
            summary.record(&p.job.origin, result, self.plan.keep_going)?;
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
            for (i, p) in self.jobs().iter().enumerate() {
                let result = self
                    .prior_half(i, &prior, progress)
                    .and_then(|(emb, noise)| Ok((emb.to_device(&Device::Cpu)?, noise)));
                if let Some((emb, noise)) = summary.failure(&p.job.origin, result, self.plan.keep_going)? {
                    pending.push((i, emb, noise));
                }
            }
        }
        let decoder = load_decoder()?;
        for (i, emb, mut noise) in pending {
            let result = self.decoder_half(i, &decoder, &emb, &mut noise, progress);
            summary.record(&self.jobs()[i].job.origin, result, self.plan.keep_going)?;
        }
        Ok(summary)
    }
}
