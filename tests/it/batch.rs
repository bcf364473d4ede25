//! The binary as scripts use it: prompts files, shards, JSON output, the two stages apart,
//! staged loading, Ctrl-C, and the Hub through a local server.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::hub_support;

const FAST: [&str; 4] = ["--prior-steps", "2", "--decoder-steps", "2"];

fn stdout(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(a.get_output().stdout.clone()).unwrap()
}

fn stderr(a: &assert_cmd::assert::Assert) -> String {
    String::from_utf8(a.get_output().stderr.clone()).unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_prompts_file_with_overrides_runs_every_line_and_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "a lighthouse at dawn\n\n{\"prompt\": \"a red fox\", \"seed\": 9, \"width\": 256, \"steps\": 3}\n\
         {\"prompt\": \"two cats\", \"num_images\": 2, \"output\": \"cats-{image}.png\", \"negative_prompt\": \"dogs\"}\n",
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = wuerstchen(dir.path());
        cmd.current_dir(&out_dir).arg("generate").args(model_args("tiny-a"));
        cmd.args([
            "--prompts",
            prompts.to_str().unwrap(),
            "--width",
            "128",
            "--height",
            "128",
            "--seed",
            "100",
        ]);
        cmd.args(FAST)
            .args(["--output", "img-{seed}.png", "--json"])
            .args(extra);
        cmd.assert()
    };
    let a = run(&[]).success();
    let lines: Vec<serde_json::Value> = stdout(&a).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{}", stdout(&a));
    // line 1: base seed + index 0; line 3: its own seed and width; line 4: two images, own names
    assert_eq!(
        (lines[0]["seed"].as_u64(), lines[0]["path"].as_str()),
        (Some(100), Some("img-100.png"))
    );
    assert_eq!(
        (lines[1]["seed"].as_u64(), lines[1]["width"].as_u64()),
        (Some(9), Some(256))
    );
    // the names as written: the seeds tell the files apart, so no -{index}
    assert_eq!(lines[1]["path"], "img-9.png");
    assert_eq!(
        (lines[2]["seed"].as_u64(), lines[2]["path"].as_str()),
        (Some(102), Some("cats-0.png"))
    );
    assert_eq!(lines[3]["path"], "cats-1.png");
    assert!(lines[0]["timings_s"]["prior"].as_f64().is_some());
    assert_eq!(
        files_in(&out_dir),
        vec!["cats-0.png", "cats-1.png", "img-100.png", "img-9.png"]
    );
    let (w, h, _, text) = read_png(&out_dir.join("img-9.png"));
    assert_eq!((w, h), (256, 128));
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.starts_with("a red fox\n") && params.contains("Steps: 3,") && params.contains("Seed: 9"),
        "{params}"
    );
    let (_, _, _, text) = read_png(&out_dir.join("cats-1.png"));
    assert!(text[0].1.contains("Negative prompt: dogs\n"), "{}", text[0].1);

    // the same run again: every output exists, so it stops before loading anything
    let before = std::fs::read(out_dir.join("img-100.png")).unwrap();
    let a = run(&[]).code(2);
    assert!(
        stderr(&a).contains("already exists") && stderr(&a).contains("--overwrite"),
        "{}",
        stderr(&a)
    );
    assert_eq!(std::fs::read(out_dir.join("img-100.png")).unwrap(), before);
    run(&["--overwrite"]).success();
}

#[test]
fn shards_split_the_file_and_stdin_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for shard in ["0/2", "1/2"] {
        let a = wuerstchen(dir.path())
            .current_dir(dir.path())
            .arg("generate")
            .args(model_args("tiny-a"))
            .args([
                "--prompts",
                "-",
                "--shard",
                shard,
                "--width",
                "128",
                "--height",
                "128",
                "--seed",
                "1",
            ])
            .args(FAST)
            .args(["--output", "s-{index}.png"])
            .write_stdin("p0\np1\np2\n")
            .assert()
            .success();
        names.push(stdout(&a));
    }
    assert_eq!(names, vec!["s-0.png\ns-2.png\n", "s-1.png\n"]);
    // seeds follow the index, not the shard: s-1 has seed 1 + 1
    let (_, _, _, text) = read_png(&dir.path().join("s-1.png"));
    assert!(text[0].1.contains("Seed: 2,"), "{}", text[0].1);
}

#[test]
fn a_bad_line_stops_the_batch_before_any_work_unless_keep_going() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "good one\n{\"prompt\": \"x\", \"stpes\": 4}\n{\"prompt\": \"y\", \"width\": 200}\nlast\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        wuerstchen(dir.path())
            .current_dir(dir.path())
            .arg("generate")
            .args(model_args("tiny-a"))
            .args([
                "--prompts",
                prompts.to_str().unwrap(),
                "--width",
                "128",
                "--height",
                "128",
                "--seed",
                "3",
            ])
            .args(FAST)
            .args(extra)
            .assert()
    };
    let a = run(&[]).code(2);
    assert!(
        stderr(&a).contains("p.jsonl:2:") && stderr(&a).contains("stpes"),
        "{}",
        stderr(&a)
    );
    assert_eq!(files_in(dir.path()), vec!["p.jsonl"], "nothing written");
    // keep going: lines 1 and 4 run, 2 and 3 are reported, and the exit code says so
    let a = run(&["--keep-going"]).code(2);
    let err = stderr(&a);
    assert!(
        err.contains("p.jsonl:2:") && err.contains("p.jsonl:3:") && err.contains("--width 200"),
        "{err}"
    );
    assert_eq!(stdout(&a).lines().count(), 2);
    assert_eq!(files_in(dir.path()).len(), 3);
}

#[test]
fn prior_then_decode_gives_the_same_image_as_generate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common_args = [
        "--prompt",
        "a tiny house",
        "--width",
        "256",
        "--height",
        "128",
        "--seed",
        "11",
    ];
    wuerstchen(d)
        .arg("generate")
        .args(model_args("tiny-b"))
        .args(common_args)
        .args([
            "--num-images",
            "2",
            "--decoder-guidance",
            "2.0",
            "--negative-prompt",
            "fog",
        ])
        .args(["--output", d.join("gen.png").to_str().unwrap()])
        .args(["--save-embeddings", d.join("gen.safetensors").to_str().unwrap()])
        .assert()
        .success();
    wuerstchen(d)
        .arg("prior")
        .args(&model_args("tiny-b")[..2])
        .args(common_args)
        .args([
            "--num-images",
            "2",
            "--negative-prompt",
            "fog",
            "--out",
            d.join("emb.safetensors").to_str().unwrap(),
        ])
        .assert()
        .success();
    assert_eq!(
        safetensors_tensor(&d.join("gen.safetensors")),
        safetensors_tensor(&d.join("emb.safetensors")),
        "generate --save-embeddings and prior agree"
    );
    let a = wuerstchen(d)
        .arg("decode")
        .args(&model_args("tiny-b")[2..])
        .args([
            "--embeddings",
            d.join("emb.safetensors").to_str().unwrap(),
            "--decoder-guidance",
            "2.0",
        ])
        .args(["--output", d.join("dec.png").to_str().unwrap()])
        .assert()
        .success();
    assert_eq!(stdout(&a).lines().count(), 2);
    for n in 0..2 {
        let (_, _, a, _) = read_png(&d.join(format!("gen-{n}.png")));
        let (_, _, b, text) = read_png(&d.join(format!("dec-{n}.png")));
        assert_eq!(a, b, "image {n}: prior + decode == generate");
        assert!(
            text[0].1.starts_with("a tiny house\nNegative prompt: fog\n"),
            "{}",
            text[0].1
        );
    }
    // decode --seed starts a fresh stream: a different image
    wuerstchen(d)
        .arg("decode")
        .args(&model_args("tiny-b")[2..])
        .args([
            "--embeddings",
            d.join("emb.safetensors").to_str().unwrap(),
            "--seed",
            "12",
        ])
        .args(["--output", d.join("other.png").to_str().unwrap()])
        .assert()
        .success();
    assert_ne!(read_png(&d.join("other-0.png")).2, read_png(&d.join("dec-0.png")).2);
}

/// `--batch-size`: consecutive jobs that share size, schedules and guidance run as one batch
/// (each JSON line says how many images shared its passes), jobs that cannot share split off,
/// and every image equals the one its prompt gives alone (f32 on the CPU: the same bytes; with
/// a BLAS library, whose sums follow each product's shape, within 1/255 and >= 99.9% identical).
#[test]
fn batched_prompts_give_the_images_they_give_alone() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        // one batch of 4 images: mixed prompts, a negative prompt, two images of one prompt
        r#"{"prompt": "a red cat", "seed": 3}"#,
        r#"{"prompt": "a blue dog", "negative_prompt": "blurry", "seed": 4}"#,
        r#"{"prompt": "two birds", "num_images": 2, "seed": 5}"#,
        // prior guidance off: a batch of its own
        r#"{"prompt": "a house", "prior_guidance": 1.0, "seed": 6}"#,
        r#"{"prompt": "a tree", "prior_guidance": 1.0, "seed": 7}"#,
        // decoder guidance on, one with a negative prompt
        r#"{"prompt": "hills", "decoder_guidance": 2.0, "seed": 8}"#,
        r#"{"prompt": "a lake", "decoder_guidance": 2.0, "negative_prompt": "fog", "seed": 9}"#,
        // another size, then the default size again: each alone
        r#"{"prompt": "mountains", "width": 256, "seed": 10}"#,
        r#"{"prompt": "the sea", "seed": 11}"#,
    ];
    std::fs::write(dir.path().join("p.jsonl"), lines.join("\n")).unwrap();
    let run = |name: &str, batch_size: &str| -> Vec<(String, u64)> {
        let mut cmd = wuerstchen(dir.path());
        cmd.current_dir(dir.path()).arg("generate").args(model_args("tiny-a"));
        cmd.args(["--prompts", "p.jsonl", "--width", "128", "--height", "128", "--json"])
            .args(FAST)
            .args(["--batch-size", batch_size, "--output", &format!("{name}/{{seed}}.png")]);
        std::fs::create_dir(dir.path().join(name)).unwrap();
        let out = cmd.assert().success();
        let lines = stdout(&out);
        let lines = lines
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        let batch = |v: &serde_json::Value| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["batch_images"].as_u64().unwrap(),
            )
        };
        lines.map(|v| batch(&v)).collect()
    };
    let alone = run("alone", "1");
    let batched = run("batched", "4");
    let sizes = |run: &[(String, u64)]| run.iter().map(|(_, n)| *n).collect::<Vec<_>>();
    // alone, a prompt's own images still share its passes (num_images_per_prompt)
    assert_eq!(sizes(&alone), [1, 1, 2, 2, 1, 1, 1, 1, 1, 1], "{alone:?}");
    assert_eq!(sizes(&batched), [4, 4, 4, 4, 2, 2, 2, 2, 1, 1], "{batched:?}");
    assert_eq!(alone.len(), batched.len());
    for ((a, _), (b, _)) in alone.iter().zip(&batched) {
        let (pa, pb) = (read_png(&dir.path().join(a)), read_png(&dir.path().join(b)));
        assert_eq!((pa.0, pa.1, pa.3.len()), (pb.0, pb.1, pb.3.len()), "{a} vs {b}");
        let (x, y) = (&pa.2, &pb.2);
        let max = x.iter().zip(y).map(|(p, q)| p.abs_diff(*q)).max().unwrap();
        let same = x.iter().zip(y).filter(|(p, q)| p == q).count() as f64 / x.len() as f64;
        if wuerstchen::ops::blas::requested().is_some() {
            assert!(
                max <= 1 && same >= 0.999,
                "{b}: max difference {max}, {same:.5} identical"
            );
        } else {
            assert!(max == 0, "{b}: max difference {max}, {same:.5} identical");
        }
        // the record is the prompt's own, whatever the batch
        assert_eq!(pa.3, pb.3, "{a} vs {b}");
    }
}

/// (shape, raw bytes) of the `image_embeddings` tensor.
fn safetensors_tensor(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("image_embeddings").unwrap();
    (t.shape().to_vec(), t.data().to_vec())
}

#[test]
fn low_memory_mode_gives_the_same_images() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "one\ntwo\n").unwrap();
    for (name, extra) in [("a", None), ("b", Some("--low-memory"))] {
        let mut cmd = wuerstchen(dir.path());
        cmd.current_dir(dir.path()).arg("generate").args(model_args("tiny-a"));
        cmd.args(["--prompts", "p.txt", "--width", "128", "--height", "128", "--seed", "5"])
            .args(FAST);
        cmd.args(["--output", &format!("{name}-{{index}}.png")]).args(extra);
        cmd.assert().success();
    }
    for i in 0..2 {
        assert_eq!(
            read_png(&dir.path().join(format!("a-{i}.png"))).2,
            read_png(&dir.path().join(format!("b-{i}.png"))).2
        );
    }
}

/// The bars (bytes while loading, then steps) draw only on a terminal: a piped stderr gets the
/// log lines alone (the load time among them), and `--quiet` nothing.
#[test]
fn progress_bars_stay_off_when_stderr_is_not_a_terminal_and_quiet_is_silent() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        wuerstchen(dir.path())
            .current_dir(dir.path())
            .arg("generate")
            .args(model_args("tiny-a"))
            .args([
                "--prompt",
                "x",
                "--width",
                "128",
                "--height",
                "128",
                "--overwrite",
                "--seed",
                "1",
            ])
            .args(FAST)
            .args(extra)
            .assert()
            .success()
    };
    let err = stderr(&run(&[]));
    assert!(!err.contains('\r') && !err.contains("=>"), "no bars: {err:?}");
    assert!(
        err.contains("prior loaded in") && err.contains("decoder loaded in"),
        "{err}"
    );
    assert!(
        err.contains("seed 1") && err.contains("prior"),
        "timings and seed are logged: {err}"
    );
    assert_eq!(stderr(&run(&["--quiet"])), "");
    // a picked seed is logged and recorded
    let a = wuerstchen(dir.path())
        .current_dir(dir.path())
        .arg("generate")
        .args(model_args("tiny-a"))
        .args(["--prompt", "x", "--width", "128", "--height", "128", "--seed"])
        .args(FAST)
        .assert()
        .success();
    let path = stdout(&a).trim().to_string();
    let seed = path.trim_start_matches("wuerstchen-").trim_end_matches(".png");
    assert!(
        stderr(&a).contains(&format!("pass --seed {seed} to repeat")),
        "{}",
        stderr(&a)
    );
}

/// Unix only: SIGINT is sent with `kill -INT`, which Windows does not have.
#[cfg(unix)]
#[test]
fn ctrl_c_keeps_finished_images_and_leaves_no_partial_files() {
    // one prompt at a time, and batches of 4 (whose computed images are all written)
    for batch in [1, 4] {
        let dir = tempfile::tempdir().unwrap();
        let prompts = dir.path().join("p.txt");
        std::fs::write(&prompts, (0..40).map(|i| format!("prompt {i}\n")).collect::<String>()).unwrap();
        let mut args = vec!["generate".to_string()];
        args.extend(model_args("tiny-a"));
        args.extend(
            [
                "--prompts",
                "p.txt",
                "--width",
                "128",
                "--height",
                "128",
                "--seed",
                "1",
                "--output",
                "c-{index}.png",
                "--batch-size",
                &batch.to_string(),
            ]
            .map(String::from),
        );
        let status = signal_after_first_file(dir.path(), &args, &dir.path().join("c-0.png"), "INT");
        assert_eq!(status.code(), Some(130));
        let files = files_in(dir.path());
        assert!(files.len() < 41, "stopped early: {files:?}");
        let pngs: Vec<&String> = files.iter().filter(|f| f.ends_with(".png")).collect();
        for f in &pngs {
            let (w, h, _, _) = read_png(&dir.path().join(f));
            assert_eq!((w, h), (128, 128), "{f} is complete");
        }
        assert_eq!(pngs.len() % batch, 0, "whole batches written: {pngs:?}");
        assert!(
            files
                .iter()
                .all(|f| f == "p.txt" || (f.starts_with("c-") && f.ends_with(".png"))),
            "stray files: {files:?}"
        );
    }
}

/// Serves a fixture pipeline folder as a Hub repo (the tokenizer symlink followed).
/// Returns the repo's commit.
fn serve_folder(server: &hub_support::HubServer, repo: &str, root: &Path, cut: Option<&str>) -> String {
    let commit = server.add_repo(repo);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let rel = rel.join(entry.file_name());
            let path = root.join(&rel);
            if path.is_dir() {
                stack.push(rel);
            } else {
                let name = rel.to_string_lossy().replace('\\', "/");
                let serve = match cut {
                    Some(c) if c == name => hub_support::Serve::CutOnce,
                    _ if name.ends_with(".safetensors") => hub_support::Serve::Lfs,
                    _ => hub_support::Serve::Plain,
                };
                server.add_file(repo, &name, &std::fs::read(&path).unwrap(), serve);
            }
        }
    }
    commit
}

#[test]
fn download_from_a_hub_then_generate_offline() {
    let server = hub_support::HubServer::start();
    let fixtures = fixtures().join("tiny-a");
    let prior_commit = serve_folder(&server, "acme/tiny-prior", &fixtures.join("prior"), None);
    serve_folder(
        &server,
        "acme/tiny-decoder",
        &fixtures.join("decoder"),
        Some("decoder/diffusion_pytorch_model.safetensors"),
    );
    let dir = tempfile::tempdir().unwrap();
    let hf_home = dir.path().join("hf");
    let online = |args: &[&str]| {
        let mut cmd = wuerstchen(dir.path());
        cmd.env_remove("HF_HUB_OFFLINE")
            .env("HF_ENDPOINT", server.url())
            .env("HF_HOME", &hf_home);
        cmd.args(args)
            .args(["--prior", "acme/tiny-prior", "--decoder", "acme/tiny-decoder"]);
        cmd.assert()
    };
    // the decoder weights break off half-way the first time: an error naming repo and file
    let a = online(&["download"]).code(1);
    let err = stderr(&a);
    assert!(
        err.contains("acme/tiny-decoder") && err.contains("decoder/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    let a = online(&["download"]).success();
    assert!(stdout(&a).lines().count() >= 12, "{}", stdout(&a));
    // everything is cached now: generate works offline with the repo ids
    let out = dir.path().join("hub.png");
    wuerstchen(dir.path())
        .env("HF_HOME", &hf_home)
        .args([
            "generate",
            "--prior",
            "acme/tiny-prior",
            "--decoder",
            "acme/tiny-decoder",
            "--prompt",
            "x",
        ])
        .args([
            "--width",
            "128",
            "--height",
            "128",
            "--seed",
            "4",
            "--output",
            out.to_str().unwrap(),
        ])
        .args(FAST)
        .assert()
        .success();
    // and gives the image the local folders give
    let local = dir.path().join("local.png");
    wuerstchen(dir.path())
        .arg("generate")
        .args(model_args("tiny-a"))
        .args([
            "--prompt",
            "x",
            "--width",
            "128",
            "--height",
            "128",
            "--seed",
            "4",
            "--output",
            local.to_str().unwrap(),
        ])
        .args(FAST)
        .assert()
        .success();
    let (_, _, hub_pixels, text) = read_png(&out);
    assert_eq!(hub_pixels, read_png(&local).2);
    // the image records the commits the repos resolved to
    let json: serde_json::Value = serde_json::from_str(&text[1].1).unwrap();
    assert_eq!(json["commits"]["prior"].as_str(), Some(prior_commit.as_str()));
    assert!(
        text[0].1.contains(&format!("Model hash: {}", &prior_commit[..10])),
        "{}",
        text[0].1
    );
    // offline with a repo that was never downloaded: an error naming it
    let a = wuerstchen(dir.path())
        .env("HF_HOME", &hf_home)
        .args([
            "download",
            "--prior",
            "acme/never-seen",
            "--decoder",
            "acme/tiny-decoder",
        ])
        .assert()
        .code(1);
    assert!(
        stderr(&a).contains("acme/never-seen") && stderr(&a).contains("HF_HUB_OFFLINE"),
        "{}",
        stderr(&a)
    );
}

#[test]
fn tiny_model_writes_a_model_that_generate_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let a = wuerstchen(dir.path())
        .args(["tiny-model", "--out", model.to_str().unwrap()])
        .assert()
        .success();
    assert_eq!(
        stdout(&a),
        format!(
            "{}\n{}\n",
            model.join("prior").display(),
            model.join("decoder").display()
        )
    );
    let out = dir.path().join("smoke.png");
    wuerstchen(dir.path())
        .args([
            "generate",
            "--prior",
            model.join("prior").to_str().unwrap(),
            "--decoder",
        ])
        .arg(model.join("decoder"))
        .args([
            "--prompt",
            "smoke test",
            "--width",
            "256",
            "--height",
            "128",
            "--seed",
            "1",
        ])
        .args(FAST)
        .args(["--output", out.to_str().unwrap()])
        .assert()
        .success();
    assert_eq!(read_png(&out).0, 256);
    // a second write into the same folder is refused unless asked
    let a = wuerstchen(dir.path())
        .args(["tiny-model", "--out", model.to_str().unwrap()])
        .assert()
        .code(2);
    assert!(stderr(&a).contains("not empty"), "{}", stderr(&a));
    wuerstchen(dir.path())
        .args(["tiny-model", "--out", model.to_str().unwrap(), "--overwrite"])
        .assert()
        .success();
}

#[test]
fn stage_c_swaps_only_the_prior_weights_and_the_rng_kernel_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // a Stage C variant repo holds just config.json + diffusion_pytorch_model.safetensors
    let other = d.join("other");
    wuerstchen(d)
        .args(["tiny-model", "--seed", "9", "--out", other.to_str().unwrap()])
        .assert()
        .success();
    let stage_c = d.join("stage-c");
    std::fs::create_dir(&stage_c).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(other.join("prior/prior").join(f), stage_c.join(f)).unwrap();
    }
    let run = |name: &str, extra: &[&str]| {
        let out = d.join(name);
        wuerstchen(d)
            .arg("generate")
            .args(model_args("tiny-a"))
            .args(["--prompt", "x", "--width", "128", "--height", "128", "--seed", "2"])
            .args(FAST)
            .args(extra)
            .args(["--output", out.to_str().unwrap()])
            .assert()
            .success();
        read_png(&out)
    };
    let base = run("base.png", &[]);
    let swapped = run("swapped.png", &["--stage-c", stage_c.to_str().unwrap()]);
    assert_ne!(base.2, swapped.2, "other Stage C weights, another image");
    assert!(
        swapped.3[0].1.contains(&format!("Stage C: {}", stage_c.display())),
        "{}",
        swapped.3[0].1
    );
    let scalar = run("scalar.png", &["--rng", "cpu-scalar"]);
    assert_ne!(base.2, scalar.2, "torch's scalar kernel draws other normals");
    let json: serde_json::Value = serde_json::from_str(&scalar.3[1].1).unwrap();
    assert_eq!(json["rng"], "cpu-scalar");
    assert_eq!(run("scalar-again.png", &["--rng", "cpu-scalar"]).2, scalar.2);
}
/// The `.png` and `.safetensors` files under `dir`, by name (a SIGKILLed run's temporary
/// `.wuerstchen-*.partial` file is not an output).
fn outputs(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "safetensors"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Three prompts (the last with two images) at 128x128, 2 + 2 steps, into `dir/out`, with
/// embeddings.
fn small_batch(dir: &Path, models: &[String]) -> assert_cmd::Command {
    std::fs::write(dir.join("p.jsonl"), "a\nb\n{\"prompt\": \"c\", \"num_images\": 2}\n").unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let mut cmd = wuerstchen(dir);
    cmd.current_dir(dir)
        .arg("generate")
        .args(models)
        .args([
            "--prompts",
            "p.jsonl",
            "--width",
            "128",
            "--height",
            "128",
            "--seed",
            "1",
        ])
        .args(FAST)
        .args([
            "--output",
            "out/{seed}.png",
            "--save-embeddings",
            "out/{seed}.safetensors",
        ]);
    cmd
}

#[test]
fn a_finished_batch_with_skip_existing_loads_no_model_and_a_partial_job_reruns_whole() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    small_batch(dir.path(), &model_args("tiny-a")).assert().success();
    let done = outputs(&out);
    let names: Vec<&str> = done.keys().map(|k| k.as_str()).collect();
    // the names as written; only the two images of one prompt get -{image}
    assert_eq!(
        names,
        [
            "1.png",
            "1.safetensors",
            "2.png",
            "2.safetensors",
            "3-0.png",
            "3-1.png",
            "3.safetensors"
        ]
    );

    // models that do not exist: nothing is resolved or loaded, so it still succeeds
    let nowhere = dir.path().join("nowhere").display().to_string();
    let a = small_batch(
        dir.path(),
        &["--prior".into(), nowhere.clone(), "--decoder".into(), nowhere],
    )
    .args(["--skip-existing", "--json"])
    .assert()
    .success();
    let lines: Vec<serde_json::Value> = stdout(&a).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let skipped: Vec<(&str, u64, u64, u64, &str)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["skipped"], true, "{l}");
            (
                l["path"].as_str().unwrap(),
                l["index"].as_u64().unwrap(),
                l["image"].as_u64().unwrap(),
                l["seed"].as_u64().unwrap(),
                l["prompt"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        skipped,
        [
            ("out/1.png", 0, 0, 1, "a"),
            ("out/2.png", 1, 0, 2, "b"),
            ("out/3-0.png", 2, 0, 3, "c"),
            ("out/3-1.png", 2, 1, 3, "c")
        ]
    );
    let err = stderr(&a);
    assert!(
        err.contains("skipped 3 of 3 prompts (outputs exist)") && err.contains("no model loaded"),
        "{err}"
    );
    assert_eq!(outputs(&out), done);

    // one of a prompt's two images missing: that prompt runs again whole, the same bytes
    std::fs::remove_file(out.join("3-1.png")).unwrap();
    let a = small_batch(dir.path(), &model_args("tiny-a"))
        .args(["--skip-existing"])
        .assert()
        .success();
    assert_eq!(stdout(&a), "out/3-0.png\nout/3-1.png\n");
    assert!(
        stderr(&a).contains("skipped 2 of 3 prompts (outputs exist)"),
        "{}",
        stderr(&a)
    );
    assert!(outputs(&out) == done, "the rerun prompt's files differ");

    // --skip-existing with --overwrite is a usage error
    let a = small_batch(dir.path(), &model_args("tiny-a"))
        .args(["--skip-existing", "--overwrite"])
        .assert()
        .code(2);
    assert!(stderr(&a).contains("--skip-existing"), "{}", stderr(&a));
}

#[test]
fn a_foreign_or_truncated_file_is_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    small_batch(dir.path(), &model_args("tiny-a")).assert().success();
    let png = std::fs::read(out.join("2.png")).unwrap();
    let emb = std::fs::read(out.join("1.safetensors")).unwrap();
    let cases: [(&str, &[u8], &str); 3] = [
        ("2.png", b"not an image at all", "not a PNG"),
        ("2.png", &png[..png.len() - 6], "not a complete PNG"),
        ("1.safetensors", &emb[..emb.len() - 1], "not a complete safetensors"),
    ];
    for (name, bytes, why) in cases {
        let all = outputs(&out);
        std::fs::write(out.join(name), bytes).unwrap();
        let a = small_batch(dir.path(), &model_args("tiny-a"))
            .args(["--skip-existing"])
            .assert()
            .code(2);
        let err = stderr(&a);
        assert!(
            err.contains(&format!("out/{name}")) && err.contains(why) && err.contains("remove it"),
            "{err}"
        );
        assert!(!err.contains("loaded"), "stopped before any model loads: {err}");
        std::fs::write(out.join(name), &all[name]).unwrap();
    }
}

#[test]
fn output_names_are_used_as_written_unless_they_collide() {
    let dir = tempfile::tempdir().unwrap();
    let run = |lines: &str| {
        let out = tempfile::tempdir_in(dir.path()).unwrap();
        std::fs::write(dir.path().join("p.jsonl"), lines).unwrap();
        wuerstchen(dir.path())
            .current_dir(out.path())
            .arg("generate")
            .args(model_args("tiny-a"))
            .args(["--prompts", dir.path().join("p.jsonl").to_str().unwrap()])
            .args(["--width", "128", "--height", "128"])
            .args(FAST)
            .args(["--output", "{seed}.png"])
            .assert()
            .success();
        files_in(out.path())
    };
    assert_eq!(
        run("{\"prompt\": \"a\", \"seed\": 5}\n{\"prompt\": \"b\", \"seed\": 6}\n"),
        ["5.png", "6.png"]
    );
    // two lines with one seed: those two get -{index}, the others keep their names
    assert_eq!(
        run("{\"prompt\": \"a\", \"seed\": 5}\n{\"prompt\": \"b\", \"seed\": 5}\n{\"prompt\": \"c\", \"seed\": 6}\n"),
        ["5-0.png", "5-1.png", "6.png"]
    );
}

/// A batch killed with `signal` (`INT` or `KILL`) after its first image, resumed with
/// `--skip-existing`, ends with the same bytes in every file as a run that was not stopped.
#[cfg(unix)]
fn killed_and_resumed(signal: &str) {
    // 30 prompts, the default schedules at 128x128: long enough to stop half-way
    let lines: String = (0..30)
        .map(|i| match i {
            7 => "{\"prompt\": \"two of them\", \"num_images\": 2}\n".to_string(),
            _ => format!("prompt {i}\n"),
        })
        .collect();
    let args = [
        "generate",
        "--prompts",
        "p.jsonl",
        "--width",
        "128",
        "--height",
        "128",
        "--seed",
        "1",
        "--output",
        "out/{seed}.png",
        "--save-embeddings",
        "out/{seed}.safetensors",
    ];
    let setup = || {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.jsonl"), &lines).unwrap();
        std::fs::create_dir(dir.path().join("out")).unwrap();
        dir
    };
    let whole = setup();
    wuerstchen(whole.path())
        .current_dir(whole.path())
        .args(args)
        .args(model_args("tiny-a"))
        .assert()
        .success();
    let want = outputs(&whole.path().join("out"));
    assert_eq!(want.len(), 31 + 30);

    let dir = setup();
    let mut all_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all_args.extend(model_args("tiny-a"));
    let status = signal_after_first_file(dir.path(), &all_args, &dir.path().join("out/1.png"), signal);
    if signal == "INT" {
        assert_eq!(status.code(), Some(130));
    } else {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
    }
    let before = outputs(&dir.path().join("out"));
    assert!(
        !before.is_empty() && before.len() < want.len(),
        "stopped half-way: {:?}",
        before.keys()
    );

    let a = wuerstchen(dir.path())
        .current_dir(dir.path())
        .args(args)
        .args(model_args("tiny-a"))
        .arg("--skip-existing")
        .assert()
        .success();
    assert!(stderr(&a).contains("prompts (outputs exist)"), "{}", stderr(&a));
    let got = outputs(&dir.path().join("out"));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (name, bytes) in &want {
        assert!(got[name] == *bytes, "{name} differs from the uninterrupted run's");
    }
}

/// Unix only: the signals are sent with `kill`.
#[cfg(unix)]
#[test]
fn a_batch_stopped_by_ctrl_c_resumes_with_skip_existing() {
    killed_and_resumed("INT");
}

/// Unix only: the signals are sent with `kill`.
#[cfg(unix)]
#[test]
fn a_batch_killed_outright_resumes_with_skip_existing() {
    killed_and_resumed("KILL");
}
