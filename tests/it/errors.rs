//! Bad input and broken models through the real binary: the exit code, a one-line message
//! that says what to do, no panic, and no stray files.

use std::path::Path;

use crate::common::*;

const FAST: [&str; 4] = ["--prior-steps", "2", "--decoder-steps", "2"];

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// Runs `generate` in a fresh empty folder (the output goes there) and checks that nothing
/// but what `keep` names was left behind.
fn generate(models: &[String], args: &[&str], keep: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let out = wuerstchen(dir.path())
        .current_dir(dir.path())
        .arg("generate")
        .args(models)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|f| keep.contains(&f.as_str())),
        "stray files {left:?} after {args:?}: {stderr}"
    );
    Outcome {
        code: out.status.code(),
        stderr,
    }
}

fn expect(o: Outcome, code: i32, needles: &[&str]) {
    assert_eq!(o.code, Some(code), "{}", o.stderr);
    for n in needles {
        assert!(o.stderr.contains(n), "{n:?} not in: {}", o.stderr);
    }
    let error_lines = o.stderr.lines().filter(|l| l.starts_with("error:")).count();
    assert_eq!(error_lines, 1, "one error line: {}", o.stderr);
}

#[test]
fn bad_input_exits_2_before_any_model_loads() {
    // a model folder that is not even there: input checks must come first
    let missing = vec![
        "--prior".to_string(),
        "/nonexistent/p".into(),
        "--decoder".into(),
        "/nonexistent/d".into(),
    ];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--width", "0"], vec!["--width must be greater than 0"]),
        (vec!["--prior-steps", "0"], vec!["--prior-steps must be at least 1"]),
        (vec!["--decoder-steps", "0"], vec!["--decoder-steps must be at least 1"]),
        (
            vec!["--prior-guidance", "nan"],
            vec!["--prior-guidance must be a finite number"],
        ),
        (
            vec!["--decoder-guidance", "inf"],
            vec!["--decoder-guidance must be a finite number"],
        ),
        (vec!["--prior-timesteps", "0.5,0.7,0"], vec!["strictly descending"]),
        (vec!["--prior-timesteps", "1.5,0"], vec!["not a number in [0, 1]"]),
        (vec!["--num-images", "0"], vec!["--num-images must be at least 1"]),
        (
            vec!["--dtype", "f8"],
            vec!["invalid value 'f8' for '--dtype", "possible values: f32, f16, bf16"],
        ),
        (vec!["--device", "tpu"], vec!["unknown device", "cpu, cuda"]),
        (
            vec!["--rng", "gpu"],
            vec!["invalid value 'gpu' for '--rng", "possible values: cpu, cpu-scalar"],
        ),
        (
            vec!["--output", "no/such/dir/x.png"],
            vec!["output folder no/such/dir does not exist"],
        ),
        (vec!["--output", "/proc/wuerstchen.png"], vec!["not writable"]),
        (vec!["--shard", "0/2"], vec!["--shard needs --prompts"]),
        (
            vec!["--batch-size", "0"],
            vec!["invalid value '0' for '--batch-size", "at least 1"],
        ),
        (
            vec!["--batch-size", "two"],
            vec!["invalid value 'two' for '--batch-size"],
        ),
    ];
    for (args, needles) in cases {
        let mut all = vec!["--prompt", "x"];
        all.extend(&args);
        expect(generate(&missing, &all, &[]), 2, &needles);
    }
    if !cfg!(feature = "cuda") {
        expect(
            generate(&missing, &["--prompt", "x", "--device", "cuda"], &[]),
            2,
            &["no CUDA support"],
        );
    }
    // clap's own usage errors are 2 as well
    expect(
        generate(&missing, &["--prompt", "x", "--width", "wide"], &[]),
        2,
        &["invalid value"],
    );
}

#[test]
fn model_dependent_input_errors_exit_2() {
    let m = model_args("tiny-a");
    expect(
        generate(&m, &["-p", "x", "--width", "1000"], &[]),
        2,
        &["--width 1000", "896 or 1024"],
    );
    expect(
        generate(&m, &["-p", "x", "--height", "20000"], &[]),
        2,
        &["--height 20000", "use 12672"],
    );
    // an existing output is refused before any work, and left as it was
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("taken.png"), b"mine").unwrap();
    let out = wuerstchen(dir.path())
        .current_dir(dir.path())
        .arg("generate")
        .args(&m)
        .args(["-p", "x", "--width", "128", "--height", "128", "--output", "taken.png"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("taken.png already exists; pass --overwrite"));
    assert_eq!(std::fs::read(dir.path().join("taken.png")).unwrap(), b"mine");
}

#[test]
fn prompts_files_that_are_not_text_or_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"fine\n\xc3\x28 broken utf-8\n").unwrap();
    let m = model_args("tiny-a");
    let p = bad.to_str().unwrap();
    expect(generate(&m, &["--prompts", p], &[]), 2, &["bad.txt:2: not valid UTF-8"]);
    expect(
        generate(&m, &["--prompts", "/nonexistent/prompts.txt"], &[]),
        2,
        &["cannot read prompts file"],
    );
}

/// A writable copy of a fixture pipeline (symlinks resolved).
fn copy_pipeline(name: &str) -> tempfile::TempDir {
    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let (s, d) = (e.path(), dst.join(e.file_name()));
            if s.is_dir() {
                copy(&s, &d);
            } else {
                std::fs::copy(&s, &d).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&fixtures().join(name), dir.path());
    dir
}

fn models_in(root: &Path) -> Vec<String> {
    vec![
        "--prior".into(),
        root.join("prior").display().to_string(),
        "--decoder".into(),
        root.join("decoder").display().to_string(),
    ]
}

fn broken(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, Vec<String>) {
    let dir = copy_pipeline("tiny-a");
    edit(dir.path());
    let models = models_in(dir.path());
    (dir, models)
}

/// Rewrites one tensor of a safetensors file (or drops it with `None`).
fn edit_tensor(path: &Path, key: &str, f: impl Fn(&mut Vec<f32>) -> bool) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == key {
            let mut v: Vec<f32> = data
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            if !f(&mut v) {
                continue;
            }
            data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
        out.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn broken_models_exit_1_naming_component_file_and_key() {
    let args = ["-p", "x", "--width", "128", "--height", "128", "--seed", "1"];
    let prior_weights = "prior/prior/diffusion_pytorch_model.safetensors";
    let decoder_weights = "decoder/decoder/diffusion_pytorch_model.safetensors";
    type Edit = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(Edit, Vec<&str>)> = vec![
        (Box::new(|_| {}), vec![]), // the unbroken copy works (checked below)
        (
            Box::new(|r| std::fs::remove_file(r.join("prior/prior/config.json")).unwrap()),
            vec!["prior: missing file", "prior/config.json"],
        ),
        (
            Box::new(|r| std::fs::remove_file(r.join("decoder/text_encoder/model.safetensors")).unwrap()),
            vec!["text_encoder: missing file", "text_encoder/model.safetensors"],
        ),
        (
            Box::new(|r| std::fs::remove_dir_all(r.join("prior/tokenizer")).unwrap()),
            vec!["tokenizer: missing file"],
        ),
        (
            Box::new(move |r| {
                let p = r.join(decoder_weights);
                let len = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            }),
            vec![
                "decoder:",
                "diffusion_pytorch_model.safetensors",
                "truncated or corrupt",
            ],
        ),
        (
            Box::new(|r| {
                std::fs::write(
                    r.join("decoder/vqgan/diffusion_pytorch_model.safetensors"),
                    b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
                )
                .unwrap()
            }),
            vec!["vqgan:", "not a valid safetensors file"],
        ),
        (
            Box::new(|r| {
                let p = r.join("prior/prior/config.json");
                let s = std::fs::read_to_string(&p).unwrap().replace("\"c\": 32", "\"c\": 48");
                std::fs::write(p, s).unwrap();
            }),
            vec![
                "prior: tensor `blocks.0.channelwise.0.weight`",
                "has shape [128, 32]",
                "config.json implies [192, 48]",
            ],
        ),
        (
            Box::new(|r| {
                let p = r.join("prior/prior/config.json");
                let s = std::fs::read_to_string(&p)
                    .unwrap()
                    .replace("\"nhead\": 2", "\"nhead\": 3");
                std::fs::write(p, s).unwrap();
            }),
            vec!["prior: invalid config", "multiple of nhead"],
        ),
        (
            Box::new(|r| {
                let p = r.join("decoder/decoder/config.json");
                let s = std::fs::read_to_string(&p).unwrap().replace("\"CTA\"", "\"CTX\"");
                std::fs::write(p, s).unwrap();
            }),
            vec!["decoder: ", "config.json", "\"CTX\": unknown block type 'X'"],
        ),
        (
            Box::new(|r| std::fs::write(r.join("decoder/scheduler/scheduler_config.json"), "{oops").unwrap()),
            vec!["scheduler:", "invalid JSON"],
        ),
        (
            Box::new(move |r| edit_tensor(&r.join(prior_weights), "out.1.bias", |_| false)),
            vec![
                "prior: tensor `out.1.bias` not found in",
                "diffusion_pytorch_model.safetensors",
            ],
        ),
        (
            Box::new(move |r| {
                edit_tensor(&r.join(prior_weights), "out.1.bias", |v| {
                    v[0] = f32::NAN;
                    true
                })
            }),
            vec!["the prior produced NaN or Inf", "--dtype"],
        ),
    ];
    for (i, (edit, needles)) in cases.into_iter().enumerate() {
        let (_dir, models) = broken(edit);
        let o = generate(&models, &args, &["wuerstchen-1.png"]);
        if i == 0 {
            assert_eq!(o.code, Some(0), "{}", o.stderr);
            continue;
        }
        expect(o, 1, &needles);
    }
}

/// Unix only: a POSIX shell sets the file-size limit and ignores SIGXFSZ.
#[cfg(unix)]
#[test]
fn a_write_that_fails_names_the_file_and_keeps_earlier_images() {
    // RLIMIT_FSIZE stands in for a full disk: the 128x128 PNG (~50 kB) fits under 100 kB, the
    // 256x256 one (~200 kB) does not; SIGXFSZ is ignored so the write fails with EFBIG.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.jsonl"),
        "small\n{\"prompt\": \"big\", \"width\": 256, \"height\": 256}\n",
    )
    .unwrap();
    let bin = assert_cmd::cargo::cargo_bin("wuerstchen");
    let m = model_args("tiny-a").join(" ");
    let script = format!(
        "trap '' XFSZ; ulimit -f 100; exec {} generate {m} --prompts p.jsonl --width 128 --height 128 --seed 1 \
         --prior-steps 2 --decoder-steps 2 --output 'f-{{index}}.png'",
        bin.display()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env_clear()
        .env("HOME", dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("writing f-1.png"), "{stderr}");
    let (w, _, _, _) = read_png(&dir.path().join("f-0.png"));
    assert_eq!(w, 128, "the earlier image is intact");
    let mut left: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![dir.path().join("f-0.png"), dir.path().join("p.jsonl")],
        "no partial file"
    );
}

#[test]
fn a_missing_model_folder_is_a_model_error() {
    let o = generate(
        &[
            "--prior".into(),
            "./no/such/prior".into(),
            "--decoder".into(),
            "./no/such/decoder".into(),
        ],
        &["-p", "x", "--width", "128", "--height", "128"],
        &[],
    );
    expect(o, 1, &["model folder ./no/such/prior does not exist"]);
}

#[test]
fn long_prompts_are_truncated_with_a_warning_and_empty_prompts_work() {
    let long = (0..100).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" ");
    let m = model_args("tiny-a");
    let o = generate(
        &m,
        &[
            "-p",
            &long,
            "--width",
            "128",
            "--height",
            "128",
            "--seed",
            "1",
            "--prior-steps",
            "2",
            "--decoder-steps",
            "2",
        ],
        &["wuerstchen-1.png"],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(
        o.stderr.contains("prompt truncated") && o.stderr.contains("word99"),
        "{}",
        o.stderr
    );
    let o = generate(
        &m,
        &["-p", "", "--width", "128", "--height", "128", "--seed", "1"],
        &["wuerstchen-1.png"],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let _ = FAST;
}

#[test]
fn embeddings_from_elsewhere_decode_with_a_prompt_and_seed_given() {
    // a file with just the tensor (as a Python user might save the prior's output)
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreign.safetensors");
    let values: Vec<u8> = (0..16 * 3 * 3)
        .flat_map(|i| ((i % 7) as f32 - 3.0).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 16, 3, 3], &values).unwrap();
    std::fs::write(
        &path,
        safetensors::serialize([("image_embeddings", view)], None).unwrap(),
    )
    .unwrap();
    let decode = |extra: &[&str]| {
        wuerstchen(dir.path())
            .current_dir(dir.path())
            .arg("decode")
            .args(&model_args("tiny-a")[2..])
            .args([
                "--embeddings",
                path.to_str().unwrap(),
                "--decoder-steps",
                "2",
                "--output",
                "d.png",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = decode(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("records no prompt; pass --prompt"));
    let out = decode(&["--prompt", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("records no seed; pass --seed"));
    let out = decode(&["--prompt", "x", "--seed", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"));
    assert_eq!(read_png(&dir.path().join("d.png")).0, 128);
    // not a safetensors file at all: a model-file error naming it
    std::fs::write(&path, b"garbage").unwrap();
    let out = decode(&["--prompt", "x", "--seed", "3", "--overwrite"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("foreign.safetensors"));
}

/// An embeddings file whose record is broken is a model-file error (exit 1) naming the file
/// and the field, never a silent default; a good record decodes.
#[test]
fn embeddings_with_a_broken_record_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    let out = wuerstchen(dir.path())
        .arg("prior")
        .args(&model_args("tiny-a")[..2])
        .args(["--prompt", "a boat", "--width", "128", "--height", "128", "--seed", "5"])
        .args(["--prior-steps", "2", "--out"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&good).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let record: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["wuerstchen"]).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor("image_embeddings").unwrap();
    let rewrite = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut r = record.clone();
        edit(&mut r);
        let meta = std::collections::HashMap::from([("wuerstchen".to_string(), r.to_string())]);
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            safetensors::serialize([("image_embeddings", view.clone())], Some(meta)).unwrap(),
        )
        .unwrap();
        path
    };
    let decode = |path: &Path| {
        wuerstchen(dir.path())
            .current_dir(dir.path())
            .arg("decode")
            .args(&model_args("tiny-a")[2..])
            .arg("--embeddings")
            .arg(path)
            .args(["--decoder-steps", "2", "--output", "{seed}-{index}.png", "--overwrite"])
            .output()
            .unwrap()
    };
    for (name, edit, field) in [
        (
            "wide.safetensors",
            &(|r: &mut serde_json::Value| r["width"] = "wide".into()) as &dyn Fn(&mut serde_json::Value),
            "width",
        ),
        (
            "noseed.safetensors",
            &|r: &mut serde_json::Value| {
                r.as_object_mut().unwrap().remove("seed");
            },
            "seed",
        ),
        (
            "draws.safetensors",
            &|r: &mut serde_json::Value| r["prior_noise_draws"]["count"] = (-1).into(),
            "prior_noise_draws.count",
        ),
    ] {
        let out = decode(&rewrite(name, edit));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(name) && stderr.contains(field), "{name}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{stderr}"
        );
    }
    let out = decode(&good);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("5-0.png").exists());
}
