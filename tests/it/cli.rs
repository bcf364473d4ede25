//! The real binary on the tiny fixture models: files written, sizes, reproducibility, and
//! the same PNG as diffusers for the same seed (tests/fixtures/*/r*.png).

use std::path::{Path, PathBuf};

use crate::common::*;

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
    // and the same bytes whatever the number of threads; with a BLAS library chosen
    // (WUERSTCHEN_BLAS), whose sums follow the tiles' shapes, within a unit
    let single = run("single.png", Some("1"));
    if wuerstchen::ops::blas::requested().is_some() {
        let (one, all) = (read_png(&single).2, read_png(&a).2);
        let worst = one.iter().zip(&all).map(|(x, y)| x.abs_diff(*y)).max();
        assert!(worst <= Some(1), "1 thread vs default: {worst:?}");
    } else {
        assert_eq!(
            std::fs::read(&single).unwrap(),
            std::fs::read(&a).unwrap(),
            "1 thread vs default"
        );
    }
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
    let meta = crate::common::reference_json(pipeline);
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

/// `selftest` on the test device: every generic form against the CPU kernels passes, and a
/// perturbed op fails the run with exit code 1, naming it.
#[test]
fn selftest_passes_and_a_broken_op_fails_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = wuerstchen(dir.path())
            .args(["selftest", "--shapes", "small", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            out.status.code(),
            report,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, report, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["passed"], true);
    let results = report["results"].as_array().unwrap();
    assert!(results.len() > 20, "{}", results.len());
    assert!(results
        .iter()
        .all(|r| r["ok"] == true && r["rel_err"].as_f64().unwrap() <= r["tol"].as_f64().unwrap()));

    let (code, report, stderr) = run(&["--inject-fault", "gelu"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(report["passed"], false);
    let failed: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| r["check"].as_str().unwrap())
        .collect();
    assert!(!failed.is_empty() && failed.iter().all(|c| *c == "gelu"), "{failed:?}");
    assert!(
        stderr.contains("error: selftest:") && stderr.contains("gelu"),
        "{stderr}"
    );
}

/// Attention in blocks of a few query rows (a 16 KiB budget) writes the same image as whole
/// attention, up to f32 rounding.
#[test]
fn a_small_attention_budget_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, budget: &[&str]| -> Vec<u8> {
        let out = dir.path().join(name);
        wuerstchen(dir.path())
            .arg("generate")
            .args(model_args("tiny-b"))
            .args([
                "--prompt",
                "a lighthouse",
                "--width",
                "256",
                "--height",
                "256",
                "--seed",
                "3",
            ])
            .args(["--prior-steps", "3", "--decoder-steps", "2", "--decoder-guidance", "2"])
            .args(budget)
            .arg("--output")
            .arg(&out)
            .assert()
            .success();
        read_png(&out).2
    };
    let whole = run("whole.png", &[]);
    let blocked = run("blocked.png", &["--attention-budget", "16K"]);
    assert_eq!(whole.len(), blocked.len());
    let differ = whole.iter().zip(&blocked).filter(|(a, b)| a != b).count();
    let max = whole
        .iter()
        .zip(&blocked)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    eprintln!("{differ} of {} values differ, by at most {max}", whole.len());
    // the matrix products see fewer rows, which can change their summation order: the same
    // image up to f32 rounding (a wrong block would change most values)
    assert!(
        max <= 1 && differ * 1000 <= whole.len(),
        "{differ} of {} values differ, by at most {max}",
        whole.len()
    );
    let bad = wuerstchen(dir.path())
        .args(["generate", "--prompt", "x", "--attention-budget", "lots"])
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&bad.get_output().stderr).to_string();
    assert!(stderr.contains("--attention-budget"), "{stderr}");
}

#[test]
fn completions_man_page_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = |assert: assert_cmd::assert::Assert| String::from_utf8_lossy(&assert.get_output().stdout).to_string();
    let script = stdout(wuerstchen(dir.path()).args(["completions", "bash"]).assert().success());
    assert!(script.contains("generate") && script.contains("--prompt"), "{script}");
    wuerstchen(dir.path()).args(["completions", "nosuch"]).assert().code(2);
    let page = stdout(wuerstchen(dir.path()).arg("man").assert().success());
    assert!(page.contains(".TH") && page.contains("generate"), "{page}");
    let man1 = dir.path().join("man1");
    let written = stdout(
        wuerstchen(dir.path())
            .arg("man")
            .arg("--out")
            .arg(&man1)
            .assert()
            .success(),
    );
    assert!(
        written.lines().any(|l| l.ends_with("wuerstchen-generate.1")),
        "{written}"
    );
    assert!(man1.join("wuerstchen.1").is_file() && man1.join("wuerstchen-generate.1").is_file());
    let version = stdout(wuerstchen(dir.path()).arg("--version").assert().success());
    assert!(
        version.starts_with(&format!("wuerstchen {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
}

/// A 2x2 RGB PNG with these text chunks (written with the `png` crate, not by wuerstchen).
fn write_png_with_text(path: &Path, text: &[(&str, &str)]) {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, 2, 2);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.to_string()).unwrap();
        }
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[128; 12]).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(path, buf).unwrap();
}

fn record_of(path: &Path) -> serde_json::Value {
    let (_, _, _, text) = read_png(path);
    let json = &text
        .iter()
        .find(|(k, _)| k == "wuerstchen")
        .expect("wuerstchen chunk")
        .1;
    serde_json::from_str(json).unwrap()
}

#[test]
fn from_a_png_makes_the_same_image_and_flags_given_override_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original.png");
    wuerstchen(dir.path())
        .arg("generate")
        .args(model_args("tiny-a"))
        .args([
            "-p",
            "a red fox",
            "--negative-prompt",
            "blurry",
            "-W",
            "256",
            "-H",
            "128",
        ])
        .args([
            "--seed",
            "42",
            "--prior-timesteps",
            "0.9,0.45,0.1,0.0",
            "--decoder-steps",
            "3",
        ])
        .args(["--prior-guidance", "3.5", "-o"])
        .arg(&original)
        .assert()
        .success();

    // no prompt, seed, size or models on the command line: all from the record
    let again = dir.path().join("again.png");
    wuerstchen(dir.path())
        .args(["generate", "--from"])
        .arg(&original)
        .arg("-o")
        .arg(&again)
        .assert()
        .success();
    let (w, h, pixels, _) = read_png(&original);
    let (w2, h2, pixels2, _) = read_png(&again);
    assert_eq!((w2, h2), (w, h));
    assert!(pixels2 == pixels, "--from gives the same pixels");
    assert_eq!(record_of(&again), record_of(&original), "and the same record");

    // an explicit flag wins over the recorded value
    let variation = dir.path().join("variation.png");
    wuerstchen(dir.path())
        .args(["generate", "--seed", "7", "--from"])
        .arg(&original)
        .arg("-o")
        .arg(&variation)
        .assert()
        .success();
    let (_, _, pixels3, _) = read_png(&variation);
    assert!(pixels3 != pixels, "another seed, another image");
    let (r, r0) = (record_of(&variation), record_of(&original));
    assert_eq!(r["seed"], 7);
    for key in [
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "prior_timesteps",
        "decoder_timesteps",
    ] {
        assert_eq!(r[key], r0[key], "{key} from the record");
    }

    // --from is not for batches
    wuerstchen(dir.path())
        .args(["generate", "--prompts", "p.txt", "--from"])
        .arg(&original)
        .assert()
        .code(2);
}

#[test]
fn info_shows_the_record_and_bad_records_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("fox.png");
    wuerstchen(dir.path())
        .arg("generate")
        .args(model_args("tiny-a"))
        .args(["-p", "a red fox", "-W", "256", "-H", "128", "--seed", "42"])
        .args(["--prior-steps", "2", "--decoder-steps", "2", "-o"])
        .arg(&png)
        .assert()
        .success();

    let out = wuerstchen(dir.path()).arg("info").arg(&png).assert().success();
    let text = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(text.starts_with(&png.display().to_string()), "{text}");
    for needle in [
        "prompt:          a red fox",
        "seed:            42",
        "size:            256x128",
        "2 steps",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }

    let out = wuerstchen(dir.path())
        .args(["info", "--json"])
        .arg(&png)
        .arg(&png)
        .assert()
        .success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one line per file: {stdout}");
    let mut v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["path"], png.display().to_string());
    v.as_object_mut().unwrap().remove("path");
    assert_eq!(v, record_of(&png), "the record as stored");

    // a PNG without our record, one with a broken field, and a file that is not a PNG
    let plain = dir.path().join("plain.png");
    write_png_with_text(&plain, &[("Comment", "hello")]);
    let mut bad: serde_json::Value = record_of(&png);
    bad["width"] = "wide".into();
    let broken = dir.path().join("broken.png");
    write_png_with_text(&broken, &[("wuerstchen", &bad.to_string())]);
    let not_png = dir.path().join("notes.png");
    std::fs::write(&not_png, "not a png").unwrap();
    let cases = [
        (&plain, "has no `wuerstchen` record"),
        (&broken, "width: invalid type"),
        (&not_png, "is not a readable PNG"),
    ];
    for (file, needle) in cases {
        let info = wuerstchen(dir.path()).arg("info").arg(file).assert().code(2);
        let from = wuerstchen(dir.path())
            .args(["generate", "-o"])
            .arg(dir.path().join("x.png"))
            .arg("--from")
            .arg(file)
            .assert()
            .code(2);
        for out in [info, from] {
            let stderr = String::from_utf8(out.get_output().stderr.clone()).unwrap();
            assert!(
                stderr.contains(&file.display().to_string()) && stderr.contains(needle),
                "{needle:?}: {stderr}"
            );
        }
    }
    assert!(!dir.path().join("x.png").exists());
}
