//! `wuerstchen download`: fetch every file the two stages load into the Hugging Face cache,
//! with progress, without loading anything.

use anyhow::Result;

use super::{source, PriorSources};
use crate::pipeline::{DecoderPipeline, PriorPipeline};
use crate::request::ModelSpec;

pub fn run(models: &ModelSpec, quiet: bool) -> Result<()> {
    let prior = PriorSources::resolve(models, quiet)?;
    let decoder = source(&models.decoder, models.revision_for("decoder"), quiet)?;
    let mut files = PriorPipeline::locate(prior.prior.as_ref(), prior.stage_c.as_deref())?;
    files.extend(DecoderPipeline::locate(decoder.as_ref())?);
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    for f in &files {
        println!("{}", f.display());
    }
    tracing::info!("{} files, {:.2} GB, in place", files.len(), bytes as f64 / 1e9);
    Ok(())
}
