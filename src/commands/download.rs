//! `wuerstchen download`: fetch every file the two stages load into the Hugging Face cache,
//! with progress, without loading anything.

use anyhow::Result;
use candle_core::DType;

use super::{dtype_name, source, PriorSources};
use crate::request::ModelSpec;

/// Fetches the files of the pair in `models` that a run in `dtype` loads (the repos' `bf16` or
/// `fp16` weights where they publish them); `None`: the dtype `generate` picks on this machine.
pub fn run(models: &ModelSpec, dtype: Option<DType>, quiet: bool) -> Result<()> {
    let dtype = dtype.unwrap_or_else(super::machine_default_dtype);
    let prior = PriorSources::resolve(models, quiet)?;
    let decoder = source(&models.decoder, models.revision_for("decoder"), quiet)?;
    let files = prior.pair_files(decoder.as_ref(), models.lite, dtype)?;
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    for f in &files {
        println!("{}", f.display());
    }
    let gb = bytes as f64 / 1e9;
    tracing::info!("{} files for {}, {gb:.2} GB, in place", files.len(), dtype_name(dtype));
    Ok(())
}
