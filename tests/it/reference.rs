//! Golden tests against diffusers 0.42.1 (CPU, float32) on the two tiny random-weight
//! pipelines in tests/fixtures (made by tests/fixtures/make_fixtures.py).
//!
//! Tolerances: components within 1e-5 relative error (f32 with a different summation order
//! than torch lands around 1e-7..1e-6); the whole pipeline, fed diffusers' own noise, within
//! 1e-3 absolute on the [0, 1] image (41 sampling steps amplify those differences).

use candle_core::Tensor;
use wuerstchen::pipeline::{DecoderParams, DecoderPipeline, PriorParams, PriorPipeline};
use wuerstchen::progress::Silent;
use wuerstchen::rng::ReplayNoise;

use crate::common::*;

const COMPONENT_TOL: f64 = 1e-5;

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let err = rel_err(got, want);
    assert!(
        err <= COMPONENT_TOL,
        "{what}: relative error {err:.3e} > {COMPONENT_TOL:e}"
    );
    eprintln!("{what}: relative error {err:.3e}");
}

fn text_encoders(pipeline: &str) {
    let rt = test_runtime();
    let (prior_src, decoder_src) = sources(pipeline);
    let r = reference(pipeline);
    let ids = rows_u32(&r["prior_te.ids"]);
    let mask = rows_u32(&r["prior_te.mask"]);
    let prior = PriorPipeline::load(&prior_src, None, &rt).unwrap();
    let got = prior.text_encoder.model.forward(&ids, &mask).unwrap();
    assert_close(&format!("{pipeline} prior text encoder"), &got, &r["prior_te.hidden"]);
    let decoder = DecoderPipeline::load(&decoder_src, &rt).unwrap();
    let got = decoder.text_encoder.model.forward(&ids, &mask).unwrap();
    assert_close(
        &format!("{pipeline} decoder text encoder"),
        &got,
        &r["decoder_te.hidden"],
    );
}

fn prior_forward(pipeline: &str) {
    let rt = test_runtime();
    let r = reference(pipeline);
    let prior = PriorPipeline::load(&sources(pipeline).0, None, &rt).unwrap();
    let cond = prior.prior.condition(&r["prior.c"]).unwrap();
    let got = prior.prior.forward(&r["prior.x"], &r["prior.r"], &cond).unwrap();
    assert_close(&format!("{pipeline} prior forward"), &got, &r["prior.out"]);
}

fn decoder_forward(pipeline: &str) {
    let rt = test_runtime();
    let r = reference(pipeline);
    let dec = DecoderPipeline::load(&sources(pipeline).1, &rt).unwrap();
    let (_, _, h, w) = r["decoder.x"].dims4().unwrap();
    for (effnet, want) in [
        (r["decoder.effnet"].clone(), "decoder.out"),
        (r["decoder.effnet"].zeros_like().unwrap(), "decoder.out_zero_effnet"),
    ] {
        let cond = dec.decoder.condition(&effnet, &r["decoder.clip"], (h, w)).unwrap();
        let got = dec.decoder.forward(&r["decoder.x"], &r["decoder.r"], &cond).unwrap();
        assert_close(&format!("{pipeline} {want}"), &got, &r[want]);
    }
}

fn vqgan_decode(pipeline: &str) {
    let rt = test_runtime();
    let r = reference(pipeline);
    let dec = DecoderPipeline::load(&sources(pipeline).1, &rt).unwrap();
    let got = dec.vqgan.decode(&r["vqgan.latents"]).unwrap();
    assert_close(&format!("{pipeline} vqgan decode"), &got, &r["vqgan.image"]);
}

fn scheduler_steps(pipeline: &str) {
    let rt = test_runtime();
    let r = reference(pipeline);
    let (prior_src, decoder_src) = sources(pipeline);
    let prior = PriorPipeline::load(&prior_src, None, &rt).unwrap();
    let dec = DecoderPipeline::load(&decoder_src, &rt).unwrap();
    for (name, sched) in [
        ("prior_scheduler", &prior.scheduler),
        ("decoder_scheduler", &dec.scheduler),
    ] {
        let ts: Vec<f32> = r[&format!("{name}.timesteps")].to_vec1().unwrap();
        let sample = &r[&format!("{name}.sample")];
        let eps = &r[&format!("{name}.model_output")];
        for i in 0..ts.len() - 1 {
            let noise = r[&format!("{name}.noise")].get(i).unwrap();
            let want = r[&format!("{name}.prev")].get(i).unwrap();
            let got = sched.step(eps, ts[i], ts[i + 1], sample, &noise).unwrap();
            assert_close(
                &format!("{pipeline} {name} step {} -> {}", ts[i], ts[i + 1]),
                &got,
                &want,
            );
        }
    }
}

/// Run r1 of reference.json with diffusers' recorded draws as the noise.
fn whole_pipeline_with_diffusers_noise(pipeline: &str) {
    let rt = test_runtime();
    let r = reference(pipeline);
    let meta = reference_json(pipeline);
    let run = &meta["runs"][0];
    assert_eq!(run["name"], "r1");
    let draws: Vec<(Vec<usize>, Vec<f32>)> = (0..run["draws"].as_u64().unwrap() as usize)
        .map(|i| {
            let t = &r[&format!("r1.draw.{i:03}")];
            (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    let mut noise = ReplayNoise::new(draws);
    let (prior_src, decoder_src) = sources(pipeline);
    let prior = PriorPipeline::load(&prior_src, None, &rt).unwrap();
    let dec = DecoderPipeline::load(&decoder_src, &rt).unwrap();
    let timesteps: Vec<f32> = run["prior_timesteps_used"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(
        timesteps,
        wuerstchen::scheduler::default_prior_timesteps(),
        "the docs' schedule"
    );
    let prompt = run["prompt"].as_str().unwrap().to_string();
    let params = PriorParams {
        prompt: prompt.clone(),
        negative_prompt: String::new(),
        width: run["width"].as_u64().unwrap() as usize,
        height: run["height"].as_u64().unwrap() as usize,
        timesteps,
        guidance: run["prior_guidance"].as_f64().unwrap(),
        num_images: 1,
    };
    let emb = prior.run(&params, &mut noise, &mut Silent).unwrap();
    let err = rel_err(&emb, &r["r1.image_embeddings"]);
    eprintln!("{pipeline} r1 image embeddings: relative error {err:.3e}");
    assert!(err < 1e-4, "{pipeline}: image embeddings relative error {err:.3e}");
    let dparams = DecoderParams {
        prompt,
        negative_prompt: String::new(),
        timesteps: wuerstchen::pipeline::decoder_timesteps(run["decoder_steps"].as_u64().unwrap() as usize),
        guidance: run["decoder_guidance"].as_f64().unwrap(),
    };
    let images = dec.run(&emb, &dparams, &mut noise, &mut Silent).unwrap();
    let want = r["r1.images"].permute((0, 3, 1, 2)).unwrap(); // NHWC -> NCHW
    let err = max_abs(&images, &want);
    eprintln!("{pipeline} r1 image: max abs error {err:.3e}");
    assert!(err <= 1e-3, "{pipeline}: image max abs error {err:.3e} > 1e-3");
    assert_eq!(noise.remaining(), 0, "diffusers drew more noise than we used");
}

macro_rules! for_pipelines {
    ($($name:ident => $f:ident),* $(,)?) => {
        mod tiny_a { $( #[test] fn $name() { super::$f("tiny-a") } )* }
        mod tiny_b { $( #[test] fn $name() { super::$f("tiny-b") } )* }
    };
}

/// Each image of a batch gets the numbers it gets alone (f32 on the CPU: our kernels treat
/// each image apart, and a matrix product's rows do not depend on the rows beside them), so
/// a batch's images equal single runs and a batch can be split across threads.
fn batch_images_alone(pipeline: &str) {
    let rt = test_runtime();
    // a BLAS library's sums follow each call's shape (`WUERSTCHEN_BLAS`), as other devices'
    // libraries do
    if wuerstchen::ops::blas::requested().is_some() || !rt.device.is_cpu() {
        return;
    }
    let r = reference(pipeline);
    // the fixture's inputs and a second set of other values, as one batch
    let twice = |t: &Tensor| Tensor::cat(&[t, &(t * 0.5).unwrap()], 0).unwrap();
    let each_alone = |what: &str, batch: &Tensor, alone: &dyn Fn(usize) -> Tensor| {
        for i in 0..batch.dim(0).unwrap() {
            let got = batch
                .narrow(0, i, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = alone(i).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{pipeline} {what}: image {i} in a batch vs alone");
        }
    };
    let one = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();

    let prior = PriorPipeline::load(&sources(pipeline).0, None, &rt).unwrap();
    let (x, rr, c) = (twice(&r["prior.x"]), twice(&r["prior.r"]), twice(&r["prior.c"]));
    let cond = prior.prior.condition(&c).unwrap();
    let batch = prior.prior.forward(&x, &rr, &cond).unwrap();
    each_alone("prior", &batch, &|i| {
        let cond = prior.prior.condition(&one(&c, i)).unwrap();
        prior.prior.forward(&one(&x, i), &one(&rr, i), &cond).unwrap()
    });

    let dec = DecoderPipeline::load(&sources(pipeline).1, &rt).unwrap();
    let (x, rr) = (twice(&r["decoder.x"]), twice(&r["decoder.r"]));
    let (effnet, clip) = (twice(&r["decoder.effnet"]), twice(&r["decoder.clip"]));
    let (_, _, h, w) = x.dims4().unwrap();
    let cond = dec.decoder.condition(&effnet, &clip, (h, w)).unwrap();
    let batch = dec.decoder.forward(&x, &rr, &cond).unwrap();
    each_alone("decoder", &batch, &|i| {
        let cond = dec.decoder.condition(&one(&effnet, i), &one(&clip, i), (h, w)).unwrap();
        dec.decoder.forward(&one(&x, i), &one(&rr, i), &cond).unwrap()
    });

    let latents = twice(&r["vqgan.latents"]);
    let batch = dec.vqgan.decode(&latents).unwrap();
    each_alone("vqgan", &batch, &|i| dec.vqgan.decode(&one(&latents, i)).unwrap());
}

for_pipelines! {
    text_encoders_match => text_encoders,
    prior_forward_matches => prior_forward,
    decoder_forward_matches => decoder_forward,
    vqgan_decode_matches => vqgan_decode,
    scheduler_steps_match => scheduler_steps,
    whole_pipeline_matches_with_diffusers_noise => whole_pipeline_with_diffusers_noise,
    batch_images_equal_single_images => batch_images_alone,
}
