//! `wuerstchen selftest`: runs [`crate::selftest`] on the chosen device and dtype, prints a
//! row per check as it finishes (or one JSON object), and fails when any check fails.

use anyhow::Result;
use candle_core::DType;

use super::dtype_name;
use crate::request::{DeviceSpec, RuntimeSpec};
use crate::selftest::{self, Check, Shapes};

/// What `selftest` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SelftestPlan {
    pub device: Option<DeviceSpec>,
    pub dtype: Option<DType>,
    /// `None`: all on a GPU, small on the CPU
    pub shapes: Option<Shapes>,
    pub seed: u64,
    pub json: bool,
    pub inject_fault: Option<String>,
}

pub fn run(args: &SelftestPlan) -> Result<()> {
    let spec = RuntimeSpec {
        device: args.device,
        dtype: args.dtype,
        attention_budget: crate::ops::attention_budget(),
        low_memory: false,
        // the f32 checks hold f32's tolerance
        tf32: false,
    };
    let rt = spec.open()?;
    let shapes = match args.shapes {
        Some(s) => s,
        None if rt.device.is_cpu() => Shapes::Small,
        None => Shapes::All,
    };
    let opts = selftest::Options {
        device: rt.device.clone(),
        dtype: rt.dtype,
        shapes,
        seed: args.seed,
        inject_fault: args.inject_fault.clone(),
    };
    let device = format!("{:?}", rt.device);
    // which kernels the device side runs (on the CPU: the device-generic forms)
    let fused = rt.device.is_cuda() && crate::ops::fused_cuda_kernels();
    let fused_attention = rt.device.is_cuda() && crate::ops::fused_cuda_attention();
    let graphs = rt.device.is_cuda() && crate::graph::enabled();
    let pinned = rt.device.is_cuda() && crate::weights::pinned_upload();
    if !args.json {
        let switches = [
            (fused, "fused CUDA kernels"),
            (fused_attention, "fused CUDA attention"),
            (graphs, "CUDA graphs"),
            (pinned, "pinned upload"),
        ];
        let kernels: String = switches
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| format!(", {name}"))
            .collect();
        println!(
            "selftest on {device} in {}{kernels}: device vs CPU f32",
            dtype_name(rt.dtype)
        );
        println!(
            "{:<26} {:<5} {:<22} {:>10} {:>8} {:>10}  result",
            "check", "dtype", "shape", "rel err", "tol", "ms"
        );
    }
    let json = args.json;
    let checks = selftest::run(&opts, &mut |c| {
        if !json {
            println!("{}", row(c));
        }
    })?;
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    if json {
        let report = serde_json::json!({
            "device": device,
            "dtype": dtype_name(rt.dtype),
            "fused_cuda_kernels": fused,
            "fused_cuda_attention": fused_attention,
            "cuda_graphs": graphs,
            "pinned_upload": pinned,
            "passed": failed.is_empty(),
            "results": checks,
        });
        println!("{report}");
    } else {
        println!("{} of {} checks passed", checks.len() - failed.len(), checks.len());
    }
    if !failed.is_empty() {
        let names: Vec<String> = failed.iter().map(|c| format!("{} {}", c.check, c.shape)).collect();
        anyhow::bail!(
            "selftest: {} of {} checks failed in {} ({})",
            failed.len(),
            checks.len(),
            dtype_name(rt.dtype),
            names.join(", ")
        );
    }
    Ok(())
}

fn row(c: &Check) -> String {
    let result = match (&c.error, c.ok) {
        (Some(e), _) => format!("FAIL: {e}"),
        (None, true) => "ok".into(),
        (None, false) => "FAIL".into(),
    };
    format!(
        "{:<26} {:<5} {:<22} {:>10.3e} {:>8.0e} {:>10.2}  {result}",
        c.check, c.dtype, c.shape, c.rel_err, c.tol, c.ms
    )
}
