//! `wuerstchen info`: the generation record of PNGs written by `generate` or `decode`, as a
//! readable block per file or, with `--json`, one JSON line per file (the record as stored,
//! plus `path`).

use std::path::PathBuf;

use anyhow::Result;

use crate::error::InputError;
use crate::output;
use crate::record::GenerationRecord;

/// `info`: the files to describe and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoPlan {
    pub files: Vec<PathBuf>,
    pub json: bool,
}

/// Prints each file's record; files without a readable record are reported together at the
/// end as one input error (exit 2), after the good ones are printed.
pub fn run(plan: &InfoPlan) -> Result<()> {
    let mut bad = Vec::new();
    let mut printed = false;
    for path in &plan.files {
        match describe(path, plan.json) {
            Ok(text) if plan.json => println!("{text}"),
            Ok(text) => {
                if printed {
                    println!();
                }
                print!("{text}");
                printed = true;
            }
            Err(e) => bad.push(e.to_string()),
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(InputError::new(bad.join("; ")).into())
    }
}

fn describe(path: &std::path::Path, json: bool) -> std::result::Result<String, InputError> {
    let record = output::read_record(path)?;
    if !json {
        return Ok(text_block(&path.display().to_string(), &record));
    }
    // the record as stored (it parsed as a record above), with the file's path
    let stored = output::read_record_text(path)?;
    let mut value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&stored)
        .map_err(|e| InputError::new(format!("{}: bad `wuerstchen` record: {e}", path.display())))?;
    value.insert("path".into(), path.display().to_string().into());
    Ok(serde_json::Value::Object(value).to_string())
}

/// The record for people: one `key: value` line each, under the file's name.
pub fn text_block(name: &str, r: &GenerationRecord) -> String {
    let steps = |t: &[f32]| match t.len().saturating_sub(1) {
        1 => "1 step".to_string(),
        n => format!("{n} steps"),
    };
    let source = |key: &str, spec: &str| match r.commits.get(key) {
        Some(commit) => format!("{spec} @ {commit}"),
        None => spec.to_string(),
    };
    let image = match r.image_index {
        Some(n) if r.num_images > 1 => format!(" (image {n} of {})", r.num_images),
        _ => String::new(),
    };
    let mut lines = vec![
        ("prompt", r.prompt.clone()),
        ("negative prompt", r.negative_prompt.clone()),
        ("seed", format!("{}{image}", r.seed)),
        ("size", format!("{}x{}", r.width, r.height)),
        (
            "prior",
            format!("{}, guidance {}", steps(&r.prior_timesteps), r.prior_guidance),
        ),
        (
            "decoder",
            format!("{}, guidance {}", steps(&r.decoder_timesteps), r.decoder_guidance),
        ),
        ("prior model", source("prior", &r.prior)),
    ];
    if let Some(stage_c) = &r.stage_c {
        lines.push(("stage C", source("stage_c", stage_c)));
    }
    lines.push(("decoder model", source("decoder", &r.decoder)));
    if r.lite {
        lines.push(("networks", "Stable Cascade's lite prior_lite/, decoder_lite/".into()));
    }
    for image in &r.image_prompts {
        lines.push(("image prompt", image.clone()));
    }
    lines.push(("dtype", r.dtype.clone()));
    lines.push((
        "rng",
        match r.rng {
            crate::record::RngName::Cpu => "cpu".into(),
            crate::record::RngName::CpuScalar => "cpu-scalar".into(),
        },
    ));
    lines.push(("program", r.program.clone()));
    let mut s = format!("{name}\n");
    for (key, value) in lines {
        s.push_str(&format!("  {:<16} {value}\n", format!("{key}:")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_block_shows_the_record() {
        let mut r: GenerationRecord = GenerationRecord::from_json(
            r#"{"prompt":"a cat","negative_prompt":"dogs","seed":42,"rng":"cpu","num_images":2,"width":256,
                "height":128,"prior_timesteps":[1.0,0.5,0.0],"prior_guidance":4.0,"decoder_timesteps":[1.0,0.0],
                "decoder_guidance":0.0,"prior":"warp-ai/wuerstchen-prior","decoder":"/m/decoder","stage_c":null,
                "commits":{"prior":"abc123"},"dtype":"f32","program":"wuerstchen 0.1.0"}"#,
        )
        .unwrap();
        r.image_index = Some(1);
        let t = text_block("out/42.png", &r);
        assert!(!t.contains("image prompt") && !t.contains("lite"), "{t}");
        r.image_prompts = vec!["a.png".into(), "b.jpg".into()];
        r.lite = true;
        let with_images = text_block("out/42.png", &r);
        for needle in [
            "image prompt:    a.png\n",
            "image prompt:    b.jpg\n",
            "networks:        Stable Cascade's lite",
        ] {
            assert!(with_images.contains(needle), "{needle:?} in\n{with_images}");
        }
        for needle in [
            "out/42.png\n",
            "  prompt:          a cat\n",
            "negative prompt: dogs\n",
            "seed:            42 (image 1 of 2)\n",
            "size:            256x128\n",
            "prior:           2 steps, guidance 4\n",
            "decoder:         1 step, guidance 0\n",
            "prior model:     warp-ai/wuerstchen-prior @ abc123\n",
            "decoder model:   /m/decoder\n",
            "rng:             cpu\n",
        ] {
            assert!(t.contains(needle), "{needle:?} in\n{t}");
        }
    }
}
