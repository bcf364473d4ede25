//! Builds the fused CUDA kernels (`src/ops/cuda`): their host harness for the tests always,
//! their PTX with nvcc under the `cuda` feature.
//!
//! Records the git commit the binary was built from, for `wuerstchen --version`:
//! `WUERSTCHEN_VERSION=0.1.0 (abc1234 2026-11-30)` (`abc1234-dirty` with uncommitted changes to
//! tracked files). Nothing is set when there is no commit to name (a crates.io tarball, no git,
//! no `.git`); the binary then says plain `0.1.0`. Never fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    // without any rerun-if-changed line cargo would rerun this on every change to the package
    println!("cargo:rerun-if-changed=build.rs");
    build_kernels();
    record_version();
}

/// The host harness (plain C, linked only where the tests call it) and, with the `cuda`
/// feature, `fused.ptx` in OUT_DIR from nvcc (`$NVCC`, else `nvcc` on the PATH) for compute
/// capability 8.0, which the driver compiles for the GPU at hand (Ampere and later).
fn build_kernels() {
    for file in ["fused.h", "fused.cu", "host.c"] {
        println!("cargo:rerun-if-changed=src/ops/cuda/{file}");
    }
    cc::Build::new()
        .file("src/ops/cuda/host.c")
        .flag_if_supported("-ffp-contract=off")
        .warnings(true)
        .compile("wuerstchen_fused_host");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    let nvcc = std::env::var_os("NVCC").unwrap_or_else(|| "nvcc".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused.ptx");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "--gpu-architecture=compute_80",
            "src/ops/cuda/fused.cu",
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on src/ops/cuda/fused.cu ({s})"),
        Err(e) => panic!("the cuda feature needs nvcc ($NVCC or on the PATH): {e}"),
    }
}

/// Sets WUERSTCHEN_VERSION (see the top of this file).
fn record_version() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    // `cargo package` writes this file into the tarball: the build is not from a checkout, even
    // when the unpacked crate happens to sit inside some other git repository
    if manifest_dir.join(".cargo_vcs_info.json").exists() {
        return;
    }
    let Some(commit) = git(&manifest_dir, &["rev-parse", "--short", "HEAD"]) else {
        return;
    };
    watch_git_state(&manifest_dir);
    let dirty = Command::new("git")
        .current_dir(&manifest_dir)
        .args(["diff", "--quiet", "HEAD", "--"])
        .status()
        .is_ok_and(|status| status.code() == Some(1));
    let mut id = commit;
    if dirty {
        id.push_str("-dirty");
    }
    if let Some(date) = git(&manifest_dir, &["show", "-s", "--format=%cs", "HEAD"]) {
        id = format!("{id} {date}");
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=WUERSTCHEN_VERSION={version} ({id})");
}

/// Reruns this script when HEAD moves (a checkout, a commit, a reset) or the tracked sources
/// change (the dirty flag). Works in a linked worktree, where `.git` is a file: git names the
/// worktree's own folder (HEAD, index) and the shared one (refs, packed-refs). Paths that do not
/// exist are skipped (cargo would rerun on every build for them).
fn watch_git_state(manifest_dir: &Path) {
    let absolute = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            manifest_dir.join(p)
        }
    };
    let Some(git_dir) = git(manifest_dir, &["rev-parse", "--git-dir"]).map(absolute) else {
        return;
    };
    let common_dir = git(manifest_dir, &["rev-parse", "--git-common-dir"])
        .map(absolute)
        .unwrap_or_else(|| git_dir.clone());
    let mut watched = vec![
        git_dir.join("HEAD"),
        git_dir.join("index"),
        common_dir.join("packed-refs"),
    ];
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD")) {
        if let Some(reference) = head.trim().strip_prefix("ref: ") {
            watched.push(git_dir.join(reference));
            watched.push(common_dir.join(reference));
        }
    }
    watched.extend(["src", "Cargo.toml", "Cargo.lock"].map(|p| manifest_dir.join(p)));
    watched.sort();
    watched.dedup();
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// One line of `git <args>` output, or None when git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").current_dir(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.trim();
    (out.status.success() && !line.is_empty()).then(|| line.to_string())
}
