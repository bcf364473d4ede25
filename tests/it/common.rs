//! Helpers shared by the integration tests: fixture paths, reference tensors, error measures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use wuerstchen::hub::LocalDir;
use wuerstchen::pipeline::Runtime;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `tests/fixtures/<pipeline>/prior` and `.../decoder` as sources.
pub fn sources(pipeline: &str) -> (LocalDir, LocalDir) {
    let root = fixtures().join(pipeline);
    (LocalDir::new(root.join("prior")), LocalDir::new(root.join("decoder")))
}

/// The tensors diffusers computed for `pipeline` (reference.safetensors), on the test device.
pub fn reference(pipeline: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(pipeline).join("reference.safetensors");
    candle_core::safetensors::load(&path, &test_device()).expect("reading reference.safetensors")
}

/// The device the golden, seed and CLI tests run on: `WUERSTCHEN_TEST_DEVICE` (`cpu`, `cuda`,
/// `cuda:N`; default the CPU), e.g. `WUERSTCHEN_TEST_DEVICE=cuda cargo test --features cuda`.
pub fn test_device() -> Device {
    let Some(spec) = std::env::var("WUERSTCHEN_TEST_DEVICE").ok() else {
        return Device::Cpu;
    };
    match wuerstchen::request::parse_device(&spec).expect("WUERSTCHEN_TEST_DEVICE") {
        wuerstchen::request::DeviceSpec::Cpu => Device::Cpu,
        wuerstchen::request::DeviceSpec::Cuda(i) => Device::new_cuda(i).expect("opening WUERSTCHEN_TEST_DEVICE"),
    }
}

pub fn reference_json(pipeline: &str) -> serde_json::Value {
    let path = fixtures().join(pipeline).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reading reference.json"))
        .expect("parsing reference.json")
}

/// f32 on the test device.
pub fn test_runtime() -> Runtime {
    Runtime {
        device: test_device(),
        dtype: DType::F32,
    }
}

/// ||a - b|| / ||b||, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    (num / den).sqrt()
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Rows of an (n, len) integer tensor as u32 vectors.
pub fn rows_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

/// The environment the binary runs in: no HF_* from the caller, offline, a private HOME, and
/// the test device (in f32: the seed tests compare with diffusers' f32 images).
fn scrubbed_env(home: &Path) -> Vec<(&'static str, std::ffi::OsString)> {
    let mut env = vec![
        ("PATH", std::env::var_os("PATH").unwrap_or_default()),
        ("HOME", home.as_os_str().to_owned()),
        ("HF_HUB_OFFLINE", "1".into()),
        ("RUST_BACKTRACE", "0".into()),
    ];
    if let Some(device) = std::env::var_os("WUERSTCHEN_TEST_DEVICE") {
        env.extend([("WUERSTCHEN_DEVICE", device), ("WUERSTCHEN_DTYPE", "f32".into())]);
    }
    env
}

/// The binary with a scrubbed environment (see `scrubbed_env`).
pub fn wuerstchen(home: &Path) -> Command {
    let mut cmd = Command::cargo_bin("wuerstchen").unwrap();
    cmd.env_clear().envs(scrubbed_env(home));
    cmd
}

/// Runs the binary in `dir` (environment as `wuerstchen`) with `args`, waits until `first`
/// exists, sends the process `kill -SIGNAL` and returns how it exited.
#[cfg(unix)]
pub fn signal_after_first_file(dir: &Path, args: &[String], first: &Path, signal: &str) -> std::process::ExitStatus {
    use std::time::{Duration, Instant};
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("wuerstchen"))
        .current_dir(dir)
        .env_clear()
        .envs(scrubbed_env(dir))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !first.exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no image after 120 s");
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    let kill = std::process::Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    child.wait().unwrap()
}

pub fn model_args(pipeline: &str) -> Vec<String> {
    let root = fixtures().join(pipeline);
    vec![
        "--prior".into(),
        root.join("prior").display().to_string(),
        "--decoder".into(),
        root.join("decoder").display().to_string(),
    ]
}

/// (width, height, RGB8 pixels, text chunks) of a PNG file.
pub fn read_png(path: &Path) -> (u32, u32, Vec<u8>, Vec<(String, String)>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    buf.truncate(frame.buffer_size());
    assert_eq!(frame.color_type, png::ColorType::Rgb, "{}", path.display());
    let info = reader.info();
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        text.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    (frame.width, frame.height, buf, text)
}
