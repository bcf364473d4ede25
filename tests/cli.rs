//! The real binary on the tiny fixture models: files written, sizes, reproducibility, and
//! the same PNG as diffusers for the same seed (tests/fixtures/*/r*.png).

mod common;

use std::path::{Path, PathBuf};

use common::*;

#[test]
fn generate_writes_a_png_of_the_requested_size_and_the_same_seed_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // `threads`: RAYON_NUM_THREADS for the run, or the default
    let run = |name: &str, threads: Option<&str>| -> PathBuf {
        let out = dir.path().join(name);
        let mut cmd = wuerstchen(dir.path());
        if let Some(t) = threads {
            cmd.env("RAYON_NUM_THREADS", t);
        }
        let assert = cmd
            .arg("generate")
            .args(model_args("tiny-a"))
            .args([
                "--prompt",
                "a red fox",
                "--width",
                "256",
                "--height",
                "128",
                "--seed",
                "7",
            ])
            .args(["--prior-steps", "4", "--decoder-steps", "3", "--output"])
            .arg(&out)
            .assert()
            .success();
        let stdout = String::from_utf8(assert.get_output().stdout.clone()).unwrap();
        assert_eq!(
            stdout.trim(),
            out.display().to_string(),
            "stdout lists the written file"
        );
        out
    };
    let a = run("a.png", None);
    let b = run("b.png", None);
    // and the same bytes whatever the number of threads
    let single = run("single.png", Some("1"));
    assert_eq!(
        std::fs::read(&single).unwrap(),
        std::fs::read(&a).unwrap(),
        "1 thread vs default"
    );
    let (w, h, pixels, text) = read_png(&a);
    assert_eq!((w, h), (256, 128));
    assert_eq!(pixels.len(), 256 * 128 * 3);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, same bytes"
    );
    let params = &text
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    assert!(
        params.starts_with("a red fox\nNegative prompt: \nSteps: 4,"),
        "{params}"
    );
    assert!(
        params.contains("Seed: 7") && params.contains("Size: 256x128"),
        "{params}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&text.iter().find(|(k, _)| k == "wuerstchen").expect("json chunk").1).unwrap();
    assert_eq!(json["seed"], 7);
}

#[test]
fn a_size_the_model_cannot_produce_is_an_input_error_naming_valid_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let assert = wuerstchen(dir.path())
        .arg("generate")
        .args(model_args("tiny-a"))
        .args(["--prompt", "x", "--width", "200", "--height", "128", "--output"])
        .arg(&out)
        .assert()
        .code(2);
    let stderr = String::from_utf8(assert.get_output().stderr.clone()).unwrap();
    assert!(
        stderr.contains("--width 200") && stderr.contains("128 or 256"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// Pixel comparison with diffusers' PNG: every channel within 1/255 and >= 99.9% identical.
fn compare_png(ours: &Path, theirs: &Path) {
    let (w1, h1, a, _) = read_png(ours);
    let (w2, h2, b, _) = read_png(theirs);
    assert_eq!((w1, h1), (w2, h2), "{}", theirs.display());
    let max = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64;
    eprintln!(
        "{}: max diff {max}/255, {:.4}% identical",
        theirs.display(),
        same * 100.0
    );
    assert!(max <= 1, "{}: a value differs by {max}/255", theirs.display());
    assert!(
        same >= 0.999,
        "{}: only {:.3}% identical",
        theirs.display(),
        same * 100.0
    );
}

/// Every run recorded by make_fixtures.py, through the binary with `--seed`: diffusers' PNGs.
fn same_seed_same_image_as_diffusers(pipeline: &str) {
    let meta = common::reference_json(pipeline);
    let dir = tempfile::tempdir().unwrap();
    for run in meta["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let mut cmd = wuerstchen(dir.path());
        cmd.arg("generate").args(model_args(pipeline));
        cmd.args(["--prompt", run["prompt"].as_str().unwrap()]);
        if let Some(neg) = run["negative_prompt"].as_str() {
            cmd.args(["--negative-prompt", neg]);
        }
        for key in ["width", "height", "seed", "num_images", "decoder_steps"] {
            cmd.arg(format!("--{}", key.replace('_', "-")))
                .arg(run[key].to_string());
        }
        cmd.args(["--prior-guidance", &run["prior_guidance"].to_string()]);
        cmd.args(["--decoder-guidance", &run["decoder_guidance"].to_string()]);
        match (run["prior_timesteps"].as_str(), run["prior_steps"].as_u64()) {
            (Some("default"), _) => {}
            (Some(list), _) => {
                cmd.args(["--prior-timesteps", list]);
            }
            (None, Some(steps)) => {
                cmd.args(["--prior-steps", &steps.to_string()]);
            }
            other => panic!("unexpected run {other:?}"),
        }
        let out = dir.path().join(format!("{name}-{{image}}.png"));
        cmd.arg("--output").arg(&out).assert().success();
        for (n, png) in run["pngs"].as_array().unwrap().iter().enumerate() {
            compare_png(
                &dir.path().join(format!("{name}-{n}.png")),
                &fixtures().join(pipeline).join(png.as_str().unwrap()),
            );
        }
    }
}

#[test]
fn tiny_a_same_seed_same_image_as_diffusers() {
    same_seed_same_image_as_diffusers("tiny-a");
}

#[test]
fn tiny_b_same_seed_same_image_as_diffusers() {
    same_seed_same_image_as_diffusers("tiny-b");
}
