//! `wuerstchen generate`: resolve the models and check the sizes against them, load once,
//! run every job, write each PNG atomically as soon as it is done, print the written paths
//! (or JSON) on stdout.

use std::ops::Range;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::{check_interrupt, install_interrupt, load_decoder, log_peak_memory, source, PriorSources, Summary, Writer};
use crate::memory::{self, ModelShapes, RunShapes};
use crate::output;
use crate::pipeline::{
    BatchNoise, DecoderConfigs, DecoderParams, DecoderPipeline, PriorParams, PriorPipeline, Runtime, SizeRule,
};
use crate::progress::{Progress, TerminalProgress};
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

/// A prior (`run_batch`, of either family) over `jobs` as one batch, each job with the
/// torch-compatible generator of its seed: each job's result (or its own error) and its
/// stream as the decoder continues it. The outer error failed the whole batch.
pub(super) fn prior_over<T>(
    jobs: &[PlannedJob],
    kernel: BoxMuller,
    run_batch: impl FnOnce(&[PriorParams], BatchNoise) -> Result<Vec<Result<T>>>,
) -> Result<Vec<(Result<T>, TorchCpuGenerator)>> {
    let params: Vec<_> = jobs.iter().map(|p| p.job.req.prior_params()).collect();
    let mut noises: Vec<_> = jobs
        .iter()
        .map(|p| TorchCpuGenerator::with_kernel(p.job.req.seed, kernel))
        .collect();
    let streams = BatchNoise::of(&mut noises, params.iter().map(|p| p.num_images));
    let results = run_batch(&params, streams)?;
    Ok(results.into_iter().zip(noises).collect())
}

/// The most images a batch may hold when `--batch-size` is not given: 1 on the CPU (where a
/// batch gains only at small sizes: 1.6x at 256x256, nothing at 512x512 on the mid model, and
/// holds more memory); on a GPU the most, up to
/// [`MAX_AUTO_BATCH`], whose activations (`activations(n)`) fit in `free` beside the weights.
fn auto_batch_images(free: Option<u64>, weights: u64, activations: impl Fn(usize) -> u64) -> usize {
    let Some(free) = free else { return 1 };
    (1..=MAX_AUTO_BATCH)
        .rev()
        .find(|&n| weights + activations(n) <= free)
        .unwrap_or(1)
}

/// Past this many images a batch gains little on a GPU (the passes are already large) and
/// delays every image of the batch.
pub(super) const MAX_AUTO_BATCH: usize = 8;

/// Whether to hold one stage at a time: asked for, or needed because the device (`available`:
/// free GPU memory, or the host's `MemAvailable`) cannot hold both stages' weights (estimated
/// from the file sizes) plus the activations of the run's most demanding batch (estimated from
/// the configs and its sizes, `memory::peak_activation_bytes`).
pub(super) fn staged(asked: bool, available: Option<u64>, weights: u64, activations: u64) -> bool {
    if asked {
        return true;
    }
    let Some(free) = available else {
        return false;
    };
    let need = weights + activations;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    tracing::info!(
        "estimated peak {:.1} GiB (weights {:.1} GiB, activations {:.1} GiB), {:.1} GiB available",
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

/// The peak activations of the run's most demanding job when a batch holds `images` images.
fn batch_activations(jobs: &[PlannedJob], rt: &Runtime, shapes: &ModelShapes, images: usize) -> u64 {
    let peak = |p: &PlannedJob| {
        let run = RunShapes::of(&p.job.req, rt.dtype, &rt.device);
        let run = RunShapes {
            num_images: run.num_images.max(images),
            ..run
        };
        memory::peak_activation_bytes(&run, shapes)
    };
    jobs.iter().map(peak).max().unwrap_or(0)
}

pub fn run(mut plan: GeneratePlan, quiet: bool) -> Result<()> {
    if super::report_done(&plan.jobs) {
        return Summary::default().finish(&plan.jobs);
    }
    let interrupt = install_interrupt();
    // the size rule needs only the models' small JSON files
    let prior_src = PriorSources::resolve(&plan.models, quiet)?;
    let decoder_src = source(&plan.models.decoder, plan.models.revision_for("decoder"), quiet)?;
    if prior_src.pair_family(decoder_src.as_ref(), plan.models.lite)? == crate::cascade::Family::StableCascade {
        return super::cascade::run(plan, prior_src, decoder_src.as_ref(), interrupt, quiet);
    }
    super::cascade::refuse_image_prompts(&plan.image_prompts)?;
    let (prior_cfg, decoder_cfg) = (prior_src.configs()?, DecoderConfigs::read(decoder_src.as_ref())?);
    let rule = SizeRule::new(&prior_cfg, &decoder_cfg);
    plan.jobs.check_sizes(|req| {
        rule.check("--width", req.width)?;
        rule.check("--height", req.height)
    })?;
    check_interrupt(&interrupt)?;

    let rt = plan.runtime.open()?;
    let info = prior_src.run_info(Some(decoder_src.as_ref()), rt.dtype, &plan);
    let writer = Writer::from(&plan.jobs);
    let mut progress = TerminalProgress::new(quiet, Some(interrupt.clone()));
    let weights = memory::weight_bytes(
        prior_src.prior.as_ref(),
        prior_src.stage_c.as_deref(),
        decoder_src.as_ref(),
        rt.dtype,
    );
    let shapes = ModelShapes::new(&prior_cfg, &decoder_cfg);
    let activations = |images| batch_activations(&plan.jobs.jobs, &rt, &shapes, images);
    let staged = staged(
        plan.runtime.low_memory,
        crate::pipeline::available_memory(&rt.device),
        weights,
        activations(plan.jobs.batch_size.unwrap_or(1)),
    );
    let batch_images = plan
        .jobs
        .batch_size
        .unwrap_or_else(|| auto_batch_images(crate::pipeline::free_device_memory(&rt.device), weights, activations));
    let batches = plan.jobs.batches(batch_images);
    if batches.len() < plan.jobs.jobs.len() {
        tracing::info!("up to {batch_images} images per pass: {} batches", batches.len());
    }
    let ctx = Ctx {
        plan: &plan.jobs,
        batches,
        info: &info,
        writer: &writer,
        kernel: plan.rng,
        interrupt: &interrupt,
    };
    let bars = crate::progress::LoadBars::new(quiet);
    let load_prior = || prior_src.load(&prior_cfg, &rt, &bars);
    let load_decoder = || load_decoder(decoder_src.as_ref(), &decoder_cfg, &rt, &bars);
    let summary = ctx.run(staged, load_prior, load_decoder, &mut progress)?;
    log_peak_memory();
    summary.finish(&plan.jobs)
}

/// A prior of either family as `generate` drives it: a batch of requests -> each request's
/// output (or its own error), the outer error failing the whole batch.
pub(super) trait PriorStage {
    type Output: StageOutput;
    fn run_prior(
        &self,
        batch: &[PriorParams],
        noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Self::Output>>>;
}

/// What a prior hands the decoder: the image embeddings (what `--save-embeddings` writes) and
/// whatever else its decoder needs.
pub(super) trait StageOutput: Sized {
    fn embeddings(&self) -> &Tensor;
    /// The output moved to the host, to wait there while the decoder loads (`--low-memory`).
    fn to_host(self) -> Result<Self>;
}

/// A decoder taking prior outputs of type `E`: each request's images (N, 3, H, W) in [0, 1].
pub(super) trait DecoderStage<E> {
    fn run_decoder(
        &self,
        outputs: Vec<E>,
        params: &[DecoderParams],
        noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Tensor>>>;
}

impl StageOutput for Tensor {
    fn embeddings(&self) -> &Tensor {
        self
    }

    fn to_host(self) -> Result<Self> {
        Ok(self.to_device(&Device::Cpu)?)
    }
}

impl PriorStage for PriorPipeline {
    type Output = Tensor;
    fn run_prior(
        &self,
        batch: &[PriorParams],
        noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Tensor>>> {
        self.run_batch(batch, noise, progress)
    }
}

impl DecoderStage<Tensor> for DecoderPipeline {
    fn run_decoder(
        &self,
        outputs: Vec<Tensor>,
        params: &[DecoderParams],
        noise: BatchNoise,
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<Tensor>>> {
        self.run_batch(&outputs, params, noise, progress)
    }
}

pub(super) struct Ctx<'a> {
    pub(super) plan: &'a JobPlan,
    /// ranges of `plan.jobs` that run as one batch
    pub(super) batches: Vec<Range<usize>>,
    pub(super) info: &'a RunInfo,
    pub(super) writer: &'a Writer,
    pub(super) kernel: BoxMuller,
    pub(super) interrupt: &'a AtomicBool,
}

/// `--save-embeddings`: the job's embeddings file, where it asked for one.
pub(super) fn save_embeddings(p: &PlannedJob, emb: &Tensor, info: &RunInfo) -> Result<()> {
    if let Some(path) = &p.embeddings {
        let file = embeddings_file(emb, &p.job.req, info)?;
        output::write_atomic(path, &file, p.overwrite)?;
        tracing::info!("embeddings written to {}", path.display());
    }
    Ok(())
}

/// A job between its two stages: the prior's output, and its random stream as the decoder
/// continues it.
struct Halfway<E> {
    job: usize,
    output: E,
    noise: TorchCpuGenerator,
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
        save_embeddings(p, emb, self.info)
    }

    /// `--keep-going` for an error that failed a whole batch: every job in it failed.
    fn batch_failed(&self, jobs: &[usize], err: anyhow::Error, summary: &mut Summary) -> Result<()> {
        let origins = jobs.iter().map(|&i| self.jobs()[i].job.origin.as_str());
        summary.batch_failure(origins, err, self.plan.keep_going)
    }

    /// The prior for the jobs `batch`, their embeddings saved: the jobs that go on to the
    /// decoder (the failed ones are in `summary`, or stop the run).
    fn prior_batch<P: PriorStage>(
        &self,
        batch: Range<usize>,
        prior: &P,
        progress: &mut TerminalProgress,
        summary: &mut Summary,
    ) -> Result<Vec<Halfway<P::Output>>> {
        check_interrupt(self.interrupt)?;
        let jobs = &self.jobs()[batch.clone()];
        for (i, p) in batch.clone().zip(jobs) {
            self.log_job(i, p);
        }
        let results = match prior_over(jobs, self.kernel, |params, noise| {
            prior.run_prior(params, noise, progress)
        }) {
            Ok(results) => results,
            Err(err) => {
                self.batch_failed(&batch.collect::<Vec<_>>(), err, summary)?;
                return Ok(Vec::new());
            }
        };
        let mut halfway = Vec::new();
        for (i, (result, noise)) in batch.zip(results) {
            let p = &self.jobs()[i];
            let result = result.and_then(|out| self.save_embeddings(p, out.embeddings()).map(|()| out));
            if let Some(output) = summary.failure(&p.job.origin, result, self.plan.keep_going)? {
                halfway.push(Halfway { job: i, output, noise });
            }
        }
        Ok(halfway)
    }

    /// The decoder for jobs the prior left `halfway` (one batch), through to the written files.
    fn decoder_batch<E: StageOutput>(
        &self,
        halfway: Vec<Halfway<E>>,
        decoder: &impl DecoderStage<E>,
        progress: &mut TerminalProgress,
        summary: &mut Summary,
    ) -> Result<()> {
        if halfway.is_empty() {
            return Ok(());
        }
        check_interrupt(self.interrupt)?;
        let jobs: Vec<usize> = halfway.iter().map(|h| h.job).collect();
        let params: Vec<_> = jobs.iter().map(|&i| self.jobs()[i].job.req.decoder_params()).collect();
        let (mut outputs, mut noises) = (Vec::new(), Vec::new());
        for h in halfway {
            outputs.push(h.output);
            noises.push(h.noise);
        }
        let counts: Vec<usize> = outputs
            .iter()
            .map(|o| o.embeddings().dim(0))
            .collect::<candle_core::Result<_>>()?;
        let batch_images = counts.iter().sum();
        let streams = BatchNoise::of(&mut noises, counts);
        let results = match decoder.run_decoder(outputs, &params, streams, progress) {
            Ok(results) => results,
            Err(err) => return self.batch_failed(&jobs, err, summary),
        };
        let timings = progress.take_timings();
        let t: Vec<String> = timings.iter().map(|(s, t)| format!("{s} {t:.2}s")).collect();
        let seeds: Vec<String> = jobs.iter().map(|&i| self.jobs()[i].job.req.seed.to_string()).collect();
        tracing::info!("seed {}: {}", seeds.join(", "), t.join(", "));
        let writer = Writer {
            overwrite: false,
            json: self.writer.json,
            batch_images,
        };
        for (&i, result) in jobs.iter().zip(results) {
            let p = &self.jobs()[i];
            let written = result.and_then(|images| {
                let writer = Writer {
                    overwrite: p.overwrite,
                    ..writer
                };
                let record = GenerationRecord::new(&p.job.req, self.info);
                writer.images(&p.job, &output::to_rgb8(&images)?, &p.images, &record, &timings)
            });
            summary.record(&p.job.origin, written, self.plan.keep_going)?;
        }
        Ok(())
    }

    /// Every job: with both stages loaded side by side (reading, converting and, on a GPU,
    /// uploading one overlaps the other's, and tokenizer building is single-threaded), or,
    /// `staged`, one stage at a time.
    pub(super) fn run<P: PriorStage, D: DecoderStage<P::Output> + Send>(
        &self,
        staged: bool,
        load_prior: impl FnOnce() -> Result<P>,
        load_decoder: impl FnOnce() -> Result<D> + Send,
        progress: &mut TerminalProgress,
    ) -> Result<Summary> {
        if staged {
            return self.run_staged(load_prior, load_decoder, progress);
        }
        let (prior, decoder) = std::thread::scope(|s| {
            let decoder = s.spawn(load_decoder);
            let prior = load_prior();
            let decoder = decoder
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the decoder panicked")));
            (prior, decoder)
        });
        self.run_together(&prior?, &decoder?, progress)
    }

    /// Both stages resident: each batch runs start to finish.
    fn run_together<P: PriorStage>(
        &self,
        prior: &P,
        decoder: &impl DecoderStage<P::Output>,
        progress: &mut TerminalProgress,
    ) -> Result<Summary> {
        let mut summary = Summary::default();
        for batch in &self.batches {
            let halfway = self.prior_batch(batch.clone(), prior, progress, &mut summary)?;
            self.decoder_batch(halfway, decoder, progress, &mut summary)?;
        }
        Ok(summary)
    }

    /// One stage at a time: every prior, then (prior weights freed) every decode, each job
    /// continuing its own random stream, so the images equal `run_together`'s.
    fn run_staged<P: PriorStage, D: DecoderStage<P::Output>>(
        &self,
        load_prior: impl FnOnce() -> Result<P>,
        load_decoder: impl FnOnce() -> Result<D>,
        progress: &mut TerminalProgress,
    ) -> Result<Summary> {
        let mut summary = Summary::default();
        let mut pending = Vec::new();
        {
            let prior = load_prior()?;
            for batch in &self.batches {
                let halfway = self.prior_batch(batch.clone(), &prior, progress, &mut summary)?;
                let to_host = |h: Halfway<P::Output>| -> Result<_> {
                    Ok(Halfway {
                        output: h.output.to_host()?,
                        ..h
                    })
                };
                pending.push(halfway.into_iter().map(to_host).collect::<Result<Vec<_>>>()?);
            }
        }
        let decoder = load_decoder()?;
        for halfway in pending {
            self.decoder_batch(halfway, &decoder, progress, &mut summary)?;
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published models in f32 (12.45 GB of weights) at 1024x1024: a 16 GiB machine
    /// (MemAvailable as its kernel reports it) holds one stage at a time, a 32 GiB one both.
    #[test]
    fn low_memory_is_chosen_from_what_the_host_has_available() {
        let meminfo = |gib: u64| {
            format!(
                "MemTotal: {} kB\nMemFree: 1000 kB\nMemAvailable: {} kB\n",
                gib << 20,
                (gib << 20) * 15 / 16
            )
        };
        let weights = 3_113_414_574u64 * 4;
        let run = RunShapes {
            width: 1024,
            height: 1024,
            num_images: 1,
            prior_guidance: 4.0,
            decoder_guidance: 0.0,
            dtype: candle_core::DType::F32,
            attention_budget: 1 << 30,
            cpu_attention_threads: Some(2),
        };
        let activations = memory::peak_activation_bytes(&run, &crate::tiny::published_shapes());
        let available = |gib| crate::pipeline::mem_available(&meminfo(gib));
        assert_eq!(available(16), Some((16u64 << 30) * 15 / 16));
        assert!(staged(false, available(16), weights, activations));
        assert!(!staged(false, available(32), weights, activations));
        assert!(staged(true, available(32), weights, activations), "asked for");
        assert!(!staged(false, None, weights, activations), "nothing known: both stages");
        assert_eq!(crate::pipeline::mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn the_automatic_batch_is_one_image_on_the_cpu_and_what_fits_on_a_gpu() {
        let activations = |n: usize| 3 * n as u64;
        assert_eq!(auto_batch_images(None, 10, activations), 1);
        assert_eq!(auto_batch_images(Some(19), 10, activations), 3);
        assert_eq!(auto_batch_images(Some(18), 10, activations), 2);
        assert_eq!(auto_batch_images(Some(u64::MAX / 2), 10, activations), MAX_AUTO_BATCH);
        // nothing fits: one image, and the staged decision deals with the rest
        assert_eq!(auto_batch_images(Some(5), 10, activations), 1);
    }
}
