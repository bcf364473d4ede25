//! Stable Cascade through the binary: `generate` on the tiny random pair in
//! tests/fixtures/cascade-tiny gives diffusers' `StableCascadeCombinedPipeline` images for the
//! same seed, takes the combined pipeline's default schedule, and refuses mixed families.

use std::path::Path;

use crate::common::*;

/// Runs `generate` on cascade-tiny with `args`, writing `{n}`-numbered PNGs under `dir`.
fn generate(dir: &Path, args: &[&str]) -> std::process::Output {
    wuerstchen(dir)
        .arg("generate")
        .args(model_args("cascade-tiny"))
        .args(args)
        .args(["--output"])
        .arg(dir.join("out-{n}.png"))
        .output()
        .unwrap()
}

/// The reference images of run `name` as RGB8 pixels, rounded as diffusers' `numpy_to_pil`.
fn reference_pixels(name: &str, image: usize) -> Vec<u8> {
    let t = &reference("cascade-tiny")[&format!("{name}.images")];
    let img = t.get(image).unwrap().permute((1, 2, 0)).unwrap();
    let values: Vec<f32> = img.flatten_all().unwrap().to_vec1().unwrap();
    values.iter().map(|v| (v * 255.0).round() as u8).collect()
}

#[test]
fn generate_gives_the_combined_pipelines_images_for_the_same_seed() {
    let meta = reference_json("cascade-tiny");
    let t = reference("cascade-tiny");
    for run in meta["combined"].as_array().unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let s = |k: &str| run[k].to_string();
        let name = run["name"].as_str().unwrap();
        // diffusers was asked for run["width"] x run["height"] and made this size (the same
        // latents); asked for another size, `generate` names this one
        let (_, _, height, width) = t[&format!("{name}.images")].dims4().unwrap();
        let mut args = vec![
            "--prompt".to_string(),
            run["prompt"].as_str().unwrap().to_string(),
            "--width".into(),
            width.to_string(),
            "--height".into(),
            height.to_string(),
            "--seed".into(),
            s("seed"),
            "--num-images".into(),
            s("num_images"),
            "--prior-steps".into(),
            s("prior_steps"),
            "--prior-guidance".into(),
            s("prior_guidance"),
            "--decoder-steps".into(),
            s("decoder_steps"),
            "--decoder-guidance".into(),
            s("decoder_guidance"),
        ];
        if let Some(negative) = run["negative_prompt"].as_str() {
            args.extend(["--negative-prompt".to_string(), negative.to_string()]);
        }
        // image prompts, in the order the pipeline was given them
        let images: Vec<String> = run["images"]
            .as_array()
            .map(|files| {
                files
                    .iter()
                    .map(|f| fixtures().join("cascade-tiny").join(f.as_str().unwrap()))
            })
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect();
        for image in &images {
            args.extend(["--image-prompt".to_string(), image.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = generate(dir.path(), &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for image in 0..run["num_images"].as_u64().unwrap() as usize {
            let (w, h, pixels, chunks) = read_png(&dir.path().join(format!("out-{image}.png")));
            let record = chunks
                .iter()
                .find(|(k, _)| k == "wuerstchen")
                .map(|(_, v)| v.clone())
                .unwrap();
            let record: serde_json::Value = serde_json::from_str(&record).unwrap();
            let recorded: Vec<String> = record["image_prompts"].as_array().map_or(Vec::new(), |a| {
                a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
            });
            assert_eq!(recorded, images, "{name}: the record names the image prompts");
            assert_eq!((w as usize, h as usize), (width, height));
            let want = reference_pixels(name, image);
            let diff: Vec<u8> = pixels.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).collect();
            let same = diff.iter().filter(|d| **d == 0).count() as f64 / diff.len() as f64;
            assert!(
                diff.iter().all(|d| *d <= 1) && same >= 0.999,
                "{name} image {image}: max diff {:?}, {same} identical",
                diff.iter().max()
            );
        }
    }
}

#[test]
fn the_default_prior_schedule_is_the_combined_pipelines_sixty_steps() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--prompt",
        "a cat",
        "--width",
        "128",
        "--height",
        "128",
        "--seed",
        "1",
        "--decoder-steps",
        "1",
    ];
    let out = generate(dir.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, _, _, text) = read_png(&dir.path().join("out-0.png"));
    let params = &text
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("A1111 parameters")
        .1;
    assert!(params.contains("Steps: 60"), "{params}");
}

#[test]
fn a_size_the_pair_does_not_produce_is_an_input_error_naming_the_nearest() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(
        dir.path(),
        &["--prompt", "a cat", "--width", "160", "--height", "128", "--seed", "1"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--width 160 would come out at 168 px"), "{stderr}");
}

#[test]
fn a_stable_cascade_prior_with_a_wuerstchen_decoder_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let cascade = model_args("cascade-tiny");
    let v2 = model_args("tiny-a");
    for (prior, decoder) in [(&cascade[1], &v2[3]), (&v2[1], &cascade[3])] {
        let out = wuerstchen(dir.path())
            .args([
                "generate", "--prompt", "a cat", "--width", "128", "--height", "128", "--seed", "1",
            ])
            .args(["--prior", prior, "--decoder", decoder, "--output"])
            .arg(dir.path().join("x.png"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("Stable Cascade") && stderr.contains("Würstchen v2"),
            "{stderr}"
        );
        assert!(!dir.path().join("x.png").exists());
    }
}

/// `prior` then `decode`: the two diffusers pipelines one after the other (the decoder with its
/// own text encoder), the recorded seed's stream continued.
#[test]
fn prior_then_decode_gives_the_separate_pipelines_images_for_the_same_seed() {
    let dir = tempfile::tempdir().unwrap();
    let run = &reference_json("cascade-tiny")["separate"];
    let s = |k: &str| run[k].to_string();
    let models = model_args("cascade-tiny");
    let emb = dir.path().join("e.safetensors");
    let out = wuerstchen(dir.path())
        .args(["prior", "--prompt", run["prompt"].as_str().unwrap()])
        .args(["--negative-prompt", run["negative_prompt"].as_str().unwrap()])
        .args(["--width", &s("width"), "--height", &s("height"), "--seed", &s("seed")])
        .args([
            "--prior-steps",
            &s("prior_steps"),
            "--prior-guidance",
            &s("prior_guidance"),
        ])
        .args(["--prior", &models[1], "--output"])
        .arg(&emb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = dir.path().join("s1.png");
    let out = wuerstchen(dir.path())
        .args(["decode", "--embeddings"])
        .arg(&emb)
        .args([
            "--decoder-steps",
            &s("decoder_steps"),
            "--decoder-guidance",
            &s("decoder_guidance"),
        ])
        .args(["--decoder", &models[3], "--output"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, _, pixels, _) = read_png(&png);
    let want = reference_pixels("s1", 0);
    let diff: Vec<u8> = pixels.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).collect();
    let same = diff.iter().filter(|d| **d == 0).count() as f64 / diff.len() as f64;
    assert!(
        diff.iter().all(|d| *d <= 1) && same >= 0.999,
        "max diff {:?}, {same} identical",
        diff.iter().max()
    );
}

/// `--image-prompt` where it cannot work: a Würstchen v2 pair, a Stable Cascade prior without
/// an image encoder, a file that is not an image. Each is an input error before any model loads.
#[test]
fn image_prompts_that_cannot_work_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures().join("cascade-tiny").join("image-a.png");
    let run = |models: Vec<String>, image: &Path| {
        let out = wuerstchen(dir.path())
            .args([
                "generate",
                "--prompt",
                "a cat",
                "--width",
                "128",
                "--height",
                "128",
                "--prior-steps",
                "1",
            ])
            .args(models)
            .arg("--image-prompt")
            .arg(image)
            .arg("--output")
            .arg(dir.path().join("x.png"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = run(model_args("tiny-a"), &image);
    assert!(stderr.contains("needs a Stable Cascade prior"), "{stderr}");
    let prior = dir.path().join("prior");
    copy_tree(&fixtures().join("cascade-tiny").join("prior"), &prior, &[]);
    std::fs::remove_dir_all(prior.join("image_encoder")).unwrap();
    let mut models = model_args("cascade-tiny");
    models[1] = prior.display().to_string();
    let stderr = run(models, &image);
    assert!(stderr.contains("no image_encoder/"), "{stderr}");
    let not_png = fixtures().join("cascade-tiny").join("reference.json");
    let stderr = run(model_args("cascade-tiny"), &not_png);
    assert!(stderr.contains("reference.json"), "names the file: {stderr}");
    assert!(!dir.path().join("x.png").exists());
}

/// `--low-memory` holds one stage at a time (every prior, then every decode) and makes the
/// same files: each request continues its own random stream, image prompts included.
#[test]
fn low_memory_makes_the_same_images_one_stage_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red cube\na blue sphere\n").unwrap();
    let image = fixtures().join("cascade-tiny").join("image-a.png");
    let run = |out: &str, extra: &[&str]| {
        let out_dir = dir.path().join(out);
        std::fs::create_dir_all(&out_dir).unwrap();
        let output = wuerstchen(dir.path())
            .arg("generate")
            .args(model_args("cascade-tiny"))
            .arg("--prompts")
            .arg(&prompts)
            .args([
                "--width",
                "128",
                "--height",
                "128",
                "--seed",
                "4",
                "--prior-steps",
                "2",
                "--decoder-steps",
                "2",
            ])
            .arg("--image-prompt")
            .arg(&image)
            .args(extra)
            .arg("--output")
            .arg(out_dir.join("{index}.png"))
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        (0..2)
            .map(|i| std::fs::read(out_dir.join(format!("{i}.png"))).unwrap())
            .collect::<Vec<_>>()
    };
    let together = run("together", &[]);
    assert_ne!(together[0], together[1]);
    assert_eq!(run("staged", &["--low-memory"]), together);
}

/// `generate --save-embeddings` writes what `prior` writes for the same request: the prior's
/// pass is the same in the combined and the separate pipelines.
#[test]
fn generate_saves_the_embeddings_prior_writes() {
    let dir = tempfile::tempdir().unwrap();
    let models = model_args("cascade-tiny");
    let request = [
        "--prompt",
        "a red cube",
        "--width",
        "128",
        "--height",
        "128",
        "--seed",
        "3",
        "--prior-steps",
        "3",
    ];
    let saved = dir.path().join("saved.safetensors");
    let out = generate(
        dir.path(),
        &[
            &request[..],
            &["--decoder-steps", "2", "--save-embeddings", saved.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = dir.path().join("prior.safetensors");
    let out = wuerstchen(dir.path())
        .arg("prior")
        .args(request)
        .args(["--prior", &models[1], "--output"])
        .arg(&written)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tensor = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor("image_embeddings").unwrap();
        (view.shape().to_vec(), view.data().to_vec())
    };
    let (shape, data) = tensor(&saved);
    assert_eq!(shape.len(), 4, "{shape:?}");
    assert_eq!((shape, data), tensor(&written));
}

/// The separate pipelines' defaults: the prior's 20 steps (the combined pipeline's are 60) and
/// the decoder's 10 (12 in the combined pipeline and in v2).
#[test]
fn prior_and_decode_take_the_separate_pipelines_default_steps() {
    let dir = tempfile::tempdir().unwrap();
    let models = model_args("cascade-tiny");
    let emb = dir.path().join("e.safetensors");
    let out = wuerstchen(dir.path())
        .args([
            "prior", "--prompt", "a cat", "--width", "128", "--height", "128", "--seed", "1",
        ])
        .args(["--prior", &models[1], "--output"])
        .arg(&emb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = dir.path().join("d.png");
    let out = wuerstchen(dir.path())
        .args(["decode", "--embeddings"])
        .arg(&emb)
        .args(["--decoder", &models[3], "--output"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, _, _, text) = read_png(&png);
    let record = &text
        .iter()
        .find(|(k, _)| k == "wuerstchen")
        .expect("the record chunk")
        .1;
    let record: serde_json::Value = serde_json::from_str(record).unwrap();
    assert_eq!(record["prior_timesteps"].as_array().unwrap().len(), 21, "{record}");
    assert_eq!(record["decoder_timesteps"].as_array().unwrap().len(), 11, "{record}");
}

/// `bench` runs a Stable Cascade pair as `generate` does: the combined pipeline's schedule
/// (60 prior steps, 12 decoder steps) unless given, every stage timed.
#[test]
fn bench_times_stable_cascade_with_the_combined_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let out = wuerstchen(dir.path())
        .args([
            "bench", "--width", "128", "--height", "128", "--runs", "1", "--warmup", "0",
        ])
        .args(model_args("cascade-tiny"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["prior_steps"], 60, "{report}");
    assert_eq!(report["decoder_steps"], 12, "{report}");
    for stage in ["prior", "decoder", "vqgan"] {
        assert!(report["median_s"][stage].as_f64().unwrap() > 0.0, "{stage}: {report}");
    }
    assert!(report["model_file_bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(report["estimated_peak_bytes"].is_null(), "v2's estimate only: {report}");
}

/// Copies `from` into `to`, following links, renaming the top-level entries in `rename`.
fn copy_tree(from: &Path, to: &Path, rename: &[(&str, &str)]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let target = rename
            .iter()
            .find(|(a, _)| *a == name)
            .map_or(name.as_str(), |(_, b)| b);
        if std::fs::metadata(entry.path()).unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(target), &[]);
        } else {
            std::fs::copy(entry.path(), to.join(target)).unwrap();
        }
    }
}

/// `download` fetches what a run of the chosen networks and dtype loads: the lite folders,
/// and a dtype's variant files where a folder has them.
#[test]
fn download_lists_the_lite_networks_and_the_dtypes_variant() {
    let dir = tempfile::tempdir().unwrap();
    let (prior, decoder) = (dir.path().join("prior"), dir.path().join("decoder"));
    let fixture = fixtures().join("cascade-tiny");
    copy_tree(&fixture.join("prior"), &prior, &[("prior", "prior_lite")]);
    copy_tree(&fixture.join("decoder"), &decoder, &[("decoder", "decoder_lite")]);
    // bf16 files for two components only
    let bf16 = ["prior_lite/diffusion_pytorch_model", "text_encoder/model"];
    std::fs::copy(
        prior.join(bf16[0]).with_extension("safetensors"),
        prior.join(format!("{}.bf16.safetensors", bf16[0])),
    )
    .unwrap();
    std::fs::copy(
        decoder.join(bf16[1]).with_extension("safetensors"),
        decoder.join(format!("{}.bf16.safetensors", bf16[1])),
    )
    .unwrap();
    let listed = |dtype: &str| -> Vec<String> {
        let out = wuerstchen(dir.path())
            .args(["download", "--model", "stable-cascade-lite", "--dtype", dtype])
            .arg("--prior")
            .arg(&prior)
            .arg("--decoder")
            .arg(&decoder)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let root = format!("{}/", dir.path().display());
        let lines = String::from_utf8(out.stdout).unwrap();
        let mut files: Vec<String> = lines
            .lines()
            .map(|l| l.strip_prefix(&root).unwrap_or(l).to_string())
            .collect();
        files.sort();
        files
    };
    let weights =
        |files: &[String]| -> Vec<String> { files.iter().filter(|f| f.ends_with(".safetensors")).cloned().collect() };
    let f32 = listed("f32");
    assert_eq!(
        weights(&f32),
        [
            "decoder/decoder_lite/diffusion_pytorch_model.safetensors",
            "decoder/text_encoder/model.safetensors",
            "decoder/vqgan/diffusion_pytorch_model.safetensors",
            "prior/prior_lite/diffusion_pytorch_model.safetensors",
            "prior/text_encoder/model.safetensors",
        ]
    );
    for needed in [
        "prior/model_index.json",
        "decoder/scheduler/scheduler_config.json",
        "prior/prior_lite/config.json",
    ] {
        assert!(f32.iter().any(|f| f == needed), "{needed} in {f32:?}");
    }
    assert!(f32.iter().any(|f| f.starts_with("decoder/tokenizer/")), "{f32:?}");
    assert_eq!(
        weights(&listed("bf16")),
        [
            "decoder/decoder_lite/diffusion_pytorch_model.safetensors",
            "decoder/text_encoder/model.bf16.safetensors",
            "decoder/vqgan/diffusion_pytorch_model.safetensors",
            "prior/prior_lite/diffusion_pytorch_model.bf16.safetensors",
            "prior/text_encoder/model.safetensors",
        ]
    );
}

/// `--model stable-cascade-lite` loads the networks from `prior_lite/` and `decoder_lite/`.
#[cfg(unix)]
#[test]
fn the_lite_model_loads_the_lite_folders() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    let fixture = fixtures().join("cascade-tiny");
    for (part, net) in [("prior", "prior"), ("decoder", "decoder")] {
        let to = root.join(part);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(fixture.join(part)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            // the network only under its lite name
            let target = if name == net { format!("{net}_lite") } else { name };
            std::os::unix::fs::symlink(std::fs::canonicalize(entry.path()).unwrap(), to.join(target)).unwrap();
        }
    }
    let args = |lite: bool| {
        let mut a: Vec<String> = [
            "generate",
            "--prompt",
            "a photo of a cat",
            "--width",
            "128",
            "--height",
            "128",
        ]
        .map(String::from)
        .to_vec();
        a.extend(["--seed", "7", "--prior-steps", "4", "--decoder-steps", "3"].map(String::from));
        a.extend(["--prior".into(), root.join("prior").display().to_string()]);
        a.extend(["--decoder".into(), root.join("decoder").display().to_string()]);
        if lite {
            a.extend(["--model".into(), "stable-cascade-lite".into()]);
        }
        a.extend(["--output".into(), dir.path().join("lite.png").display().to_string()]);
        a
    };
    let out = wuerstchen(dir.path()).args(args(false)).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "no prior/ folder: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = wuerstchen(dir.path()).args(args(true)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, _, pixels, _) = read_png(&dir.path().join("lite.png"));
    assert_eq!(
        pixels,
        reference_pixels("c1", 0),
        "the c1 reference run, from the lite folders"
    );
    // the record says lite: a replay loads the lite folders again
    let out = wuerstchen(dir.path())
        .args(["generate", "--from"])
        .arg(dir.path().join("lite.png"))
        .arg("--output")
        .arg(dir.path().join("replay.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("replay.png")).unwrap(),
        std::fs::read(dir.path().join("lite.png")).unwrap()
    );
}

/// `--from` replays the image prompts the record names.
#[test]
fn a_replay_takes_the_recorded_image_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures().join("cascade-tiny").join("image-b.png");
    let args = [
        "--prompt",
        "a cat",
        "--width",
        "128",
        "--height",
        "128",
        "--prior-steps",
        "2",
        "--decoder-steps",
        "1",
    ];
    let out = generate(
        dir.path(),
        &[&args[..], &["--image-prompt", image.to_str().unwrap()]].concat(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = dir.path().join("out-0.png");
    let replay = |name: &str, extra: &[&str]| {
        let out = wuerstchen(dir.path())
            .args(["generate", "--from"])
            .arg(&first)
            .args(extra)
            .arg("--output")
            .arg(dir.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(dir.path().join(name)).unwrap()
    };
    assert_eq!(replay("again.png", &[]), std::fs::read(&first).unwrap());
    let other = fixtures().join("cascade-tiny").join("image-a.png");
    let (_, _, changed, _) = {
        replay("other.png", &["--image-prompt", other.to_str().unwrap()]);
        read_png(&dir.path().join("other.png"))
    };
    assert_ne!(
        changed,
        read_png(&first).2,
        "an image prompt on the command line replaces the recorded one"
    );
}

/// `tiny-model --family stable-cascade` writes a pair that `generate` runs (and that
/// diffusers loads: checked when the writer changes, with the fixtures' Python stack).
#[test]
fn tiny_model_writes_a_stable_cascade_pair_that_generate_runs() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("sc");
    let out = wuerstchen(dir.path())
        .args(["tiny-model", "--family", "stable-cascade", "--out"])
        .arg(&models)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (part, class) in [
        ("prior", "StableCascadePriorPipeline"),
        ("decoder", "StableCascadeDecoderPipeline"),
    ] {
        let index = std::fs::read_to_string(models.join(part).join("model_index.json")).unwrap();
        let index: serde_json::Value = serde_json::from_str(&index).unwrap();
        assert_eq!(index["_class_name"], class);
    }
    let png = |name: &str, extra: &[&str]| {
        let out = wuerstchen(dir.path())
            .args([
                "generate", "--prompt", "a cat", "--width", "128", "--height", "128", "--seed", "3",
            ])
            .args(["--prior-steps", "2", "--decoder-steps", "2", "--prior"])
            .arg(models.join("prior"))
            .arg("--decoder")
            .arg(models.join("decoder"))
            .args(extra)
            .arg("--output")
            .arg(dir.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (_, _, pixels, _) = read_png(&dir.path().join(name));
        (std::fs::read(dir.path().join(name)).unwrap(), pixels)
    };
    assert_eq!(png("a.png", &[]), png("b.png", &[]), "the same seed, the same bytes");
    // the pair has an image encoder, and an image prompt changes the image
    let image = fixtures().join("cascade-tiny").join("image-a.png");
    let prompted = png("c.png", &["--image-prompt", image.to_str().unwrap()]);
    assert_ne!(prompted.1, png("d.png", &[]).1, "the image prompt conditions the prior");
    let out = wuerstchen(dir.path())
        .args(["tiny-model", "--family", "stable-cascade", "--size", "mid", "--out"])
        .arg(dir.path().join("mid"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
