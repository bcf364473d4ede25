//! Images out: tensor -> 8-bit RGB exactly as diffusers' `numpy_to_pil` rounds, PNG files
//! written atomically with the generation parameters embedded, and output file names.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use crate::error::InputError;

/// One 8-bit RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// (N, 3, H, W) values in [0, 1] -> N images, `round(x * 255)` in f32 with ties to even
/// (numpy's round), as diffusers' `numpy_to_pil` does.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = images.dims4()?;
    anyhow::ensure!(c == 3, "expected 3 channels, got {c}");
    let hwc = images.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?.contiguous()?;
    let values: Vec<f32> = hwc.flatten_all()?.to_vec1()?;
    Ok(values
        .chunks(h * w * 3)
        .take(n)
        .map(|img| RgbImage {
            width: w,
            height: h,
            pixels: img
                .iter()
                .map(|v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
                .collect(),
        })
        .collect())
}

/// PNG text chunks: `(keyword, text)`. Latin-1 keywords; the text may be any UTF-8 (written
/// as iTXt when it is not Latin-1-clean ASCII).
pub type TextChunks = Vec<(String, String)>;

/// Encodes a PNG into memory.
pub fn encode_png(img: &RgbImage, text: &TextChunks) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            if value.is_ascii() {
                enc.add_text_chunk(key.clone(), value.clone())?;
            } else {
                enc.add_itxt_chunk(key.clone(), value.clone())?;
            }
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&img.pixels)?;
        writer.finish()?;
    }
    Ok(buf)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader (or a crash, or Ctrl-C) never sees a partial file. Without `overwrite`, an existing
/// file is an error and is left untouched.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".wuerstchen-")
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    if overwrite {
        tmp.persist(path)
            .map_err(|e| e.error)
            .with_context(|| format!("writing {}", path.display()))?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::Error::new(InputError::new(format!(
                    "{} already exists; pass --overwrite to replace it",
                    path.display()
                )))
            } else {
                anyhow::Error::new(e.error).context(format!("writing {}", path.display()))
            }
        })?;
    }
    Ok(())
}

/// The values a file-name template can use.
#[derive(Debug, Clone)]
pub struct NameFields<'a> {
    /// the request's number in a batch (0 for a single request)
    pub index: usize,
    /// the image's number within its request
    pub image: usize,
    pub seed: u64,
    pub prompt: &'a str,
}

/// A prompt as a short file-name-safe slug: lowercase ASCII letters and digits joined by `-`.
pub fn slug(prompt: &str, max_len: usize) -> String {
    let mut out = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let word = word.to_ascii_lowercase();
        if !out.is_empty() {
            if out.len() + 1 + word.len() > max_len {
                break;
            }
            out.push('-');
        }
        out.push_str(&word[..word.len().min(max_len)]);
    }
    if out.is_empty() {
        out.push_str("image");
    }
    out
}

/// Fills `{index}`, `{image}` (or `{n}`), `{seed}` and `{prompt}` (a slug) in `template`. With
/// `several`, a template without `{image}` gets `-{image}` before its extension, and with `batch`
/// one without `{index}` gets `-{index}` ([`distinct_names`] asks for these only where names collide).
pub fn output_path(template: &str, fields: &NameFields, several: bool, batch: bool) -> PathBuf {
    let mut missing = String::new();
    if batch && !template.contains("{index}") {
        missing.push_str("-{index}");
    }
    if several && !template.contains("{image}") && !template.contains("{n}") {
        missing.push_str("-{image}");
    }
    let template = if missing.is_empty() {
        template.to_string()
    } else {
        let p = Path::new(template);
        match (p.file_stem(), p.extension()) {
            (Some(stem), Some(ext)) => p
                .with_file_name(format!("{}{missing}.{}", stem.to_string_lossy(), ext.to_string_lossy()))
                .to_string_lossy()
                .into_owned(),
            _ => format!("{template}{missing}"),
        }
    };
    PathBuf::from(
        template
            .replace("{index}", &fields.index.to_string())
            .replace("{image}", &fields.image.to_string())
            .replace("{n}", &fields.image.to_string())
            .replace("{seed}", &fields.seed.to_string())
            .replace("{prompt}", &slug(fields.prompt, 60)),
    )
}

/// One file a run writes: the template that names it and the values that fill it in, and
/// where it came from (`prompts.jsonl:3`), for messages.
#[derive(Debug, Clone)]
pub struct Slot<'a> {
    pub template: &'a str,
    pub fields: NameFields<'a>,
    pub origin: &'a str,
}

/// The names of a run's files: each template as written, as long as the names are distinct.
/// Only files that would share a name get a suffix from their own template: `-{index}` where
/// the name is shared with another prompt's file, `-{image}` where it is shared with another
/// image of the same prompt (a template that has the placeholder already gets nothing). A name
/// that still collides is an error naming both prompts.
pub fn distinct_names(slots: &[Slot]) -> Result<Vec<PathBuf>, InputError> {
    use std::collections::HashMap;
    let plain: Vec<PathBuf> = slots
        .iter()
        .map(|s| output_path(s.template, &s.fields, false, false))
        .collect();
    let mut sharers: HashMap<&Path, Vec<usize>> = HashMap::new();
    for (i, p) in plain.iter().enumerate() {
        sharers.entry(p.as_path()).or_default().push(i);
    }
    let names: Vec<PathBuf> = slots
        .iter()
        .zip(&plain)
        .map(|(s, p)| {
            let others = &sharers[p.as_path()];
            if others.len() == 1 {
                return p.clone();
            }
            let index = others.iter().any(|&j| slots[j].fields.index != s.fields.index);
            let image = others
                .iter()
                .any(|&j| slots[j].fields.index == s.fields.index && slots[j].fields.image != s.fields.image);
            output_path(s.template, &s.fields, image, index)
        })
        .collect();
    let mut taken: HashMap<&Path, usize> = HashMap::new();
    for (i, p) in names.iter().enumerate() {
        if let Some(j) = taken.insert(p.as_path(), i) {
            return Err(InputError::new(format!(
                "{} and {} would both write {}; use {{index}} or {{seed}} in the output name",
                slots[j].origin,
                slots[i].origin,
                p.display()
            )));
        }
    }
    Ok(names)
}

/// What kind of file an output is, for [`inspect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Png,
    Safetensors,
}

/// What is at an output path before a run writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Missing,
    /// a whole file of its kind: a PNG that starts with the signature and ends with an IEND
    /// chunk, or a safetensors file whose header is readable and matches its length
    Complete,
    /// something else (a foreign or truncated file, a folder): why
    Incomplete(String),
}

/// Looks at what is at `path` without reading more than a PNG's first and last bytes.
pub fn inspect(path: &Path, kind: FileKind) -> Found {
    use std::io::{Read, Seek, SeekFrom};
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    // length 0, "IEND", its CRC
    const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82];
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::Missing,
        Err(e) => return Found::Incomplete(format!("cannot be read: {e}")),
    };
    if !meta.is_file() {
        return Found::Incomplete("is not a file".into());
    }
    let check = || -> std::io::Result<Option<String>> {
        let mut f = std::fs::File::open(path)?;
        match kind {
            FileKind::Png => {
                let (mut head, mut tail) = (Vec::new(), [0u8; 12]);
                Read::by_ref(&mut f).take(8).read_to_end(&mut head)?;
                if head.is_empty() || !SIGNATURE.starts_with(&head) {
                    return Ok(Some("is not a PNG (no PNG signature)".into()));
                }
                if meta.len() < 20 {
                    return Ok(Some("is not a complete PNG (too short: truncated?)".into()));
                }
                f.seek(SeekFrom::End(-12))?;
                f.read_exact(&mut tail)?;
                Ok((tail != IEND).then(|| "is not a complete PNG (no IEND chunk at its end: truncated?)".into()))
            }
            FileKind::Safetensors => {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)?;
                Ok(safetensors::SafeTensors::read_metadata(&bytes)
                    .err()
                    .map(|e| format!("is not a complete safetensors file ({e})")))
            }
        }
    };
    match check() {
        Ok(None) => Found::Complete,
        Ok(Some(why)) => Found::Incomplete(why),
        Err(e) => Found::Incomplete(format!("cannot be read: {e}")),
    }
}

/// Checks that `path`'s folder exists and is writable (by creating and removing a temporary
/// file there), and, without `overwrite`, that `path` does not exist yet.
pub fn check_writable(path: &Path, overwrite: bool) -> Result<(), InputError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(InputError::new(format!(
            "output folder {} does not exist; create it first",
            dir.display()
        )));
    }
    if let Err(e) = tempfile::Builder::new().prefix(".wuerstchen-check-").tempfile_in(dir) {
        return Err(InputError::new(format!(
            "output folder {} is not writable: {e}",
            dir.display()
        )));
    }
    if !overwrite && path.exists() {
        return Err(InputError::new(format!(
            "{} already exists; pass --overwrite to replace it",
            path.display()
        )));
    }
    Ok(())
}

/// The generation record a PNG carries in its `wuerstchen` text chunk. A file that cannot be
/// read, is not a PNG, has no record or a broken one is an input error naming the file (and,
/// for a broken record, the field).
pub fn read_record(path: &Path) -> Result<crate::record::GenerationRecord, InputError> {
    let text = read_record_text(path)?;
    crate::record::GenerationRecord::from_json(&text)
        .map_err(|e| InputError::new(format!("{}: bad `wuerstchen` record: {e}", path.display())))
}

/// The `wuerstchen` text chunk of a PNG as stored (JSON, not yet checked).
pub fn read_record_text(path: &Path) -> Result<String, InputError> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| InputError::new(format!("cannot read {shown}: {e}")))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| InputError::new(format!("{shown} is not a readable PNG: {e}")))?;
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (&t.keyword, Some(t.text.clone())));
    let compressed = info
        .compressed_latin1_text
        .iter()
        .map(|t| (&t.keyword, t.get_text().ok()));
    let utf8 = info.utf8_text.iter().map(|t| (&t.keyword, t.get_text().ok()));
    match latin1.chain(compressed).chain(utf8).find(|(k, _)| *k == "wuerstchen") {
        Some((_, Some(text))) => Ok(text),
        Some((_, None)) => Err(InputError::new(format!(
            "{shown}: its `wuerstchen` text chunk cannot be decoded"
        ))),
        None => Err(InputError::new(format!(
            "{shown} has no `wuerstchen` record (not written by wuerstchen, or its text chunks were stripped)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rounding_is_numpys_half_to_even() -> Result<()> {
        // 0.5/255 * 255 = 0.5 -> 0 (even); 1.5/255*255 = 1.5 -> 2; 1.0 -> 255; clamped values stay in range
        let v = vec![0.5f32 / 255.0, 1.5 / 255.0, 1.0, 0.0, 0.25, 0.75];
        let t = Tensor::from_vec(v.clone(), (1, 3, 1, 2), &Device::Cpu)?;
        let img = &to_rgb8(&t)?[0];
        let want: Vec<u8> = [[v[0], v[2], v[4]], [v[1], v[3], v[5]]]
            .iter()
            .flatten()
            .map(|x| (x * 255.0f32).round_ties_even() as u8)
            .collect();
        assert_eq!(img.pixels, want);
        assert_eq!(img.pixels[0], 0);
        assert_eq!(img.pixels[3], 2);
        Ok(())
    }

    #[test]
    fn names_from_templates() {
        let f = NameFields {
            index: 3,
            image: 1,
            seed: 42,
            prompt: "A Cat, dressed as a FIRE fighter!",
        };
        assert_eq!(output_path("out.png", &f, false, false), PathBuf::from("out.png"));
        assert_eq!(
            output_path("dir/out.png", &f, true, false),
            PathBuf::from("dir/out-1.png")
        );
        assert_eq!(output_path("out.png", &f, true, true), PathBuf::from("out-3-1.png"));
        assert_eq!(output_path("out-{n}.png", &f, true, false), PathBuf::from("out-1.png"));
        assert_eq!(output_path("out-{seed}", &f, false, true), PathBuf::from("out-42-3"));
        assert_eq!(
            output_path("{index}-{seed}-{image}-{prompt}.png", &f, true, true),
            PathBuf::from("3-42-1-a-cat-dressed-as-a-fire-fighter.png")
        );
        assert_eq!(slug("東京 🙂", 20), "image");
        assert!(slug(&"word ".repeat(100), 60).len() <= 60);
    }

    fn slot<'a>(template: &'a str, index: usize, image: usize, seed: u64, origin: &'a str) -> Slot<'a> {
        Slot {
            template,
            fields: NameFields {
                index,
                image,
                seed,
                prompt: "a cat",
            },
            origin,
        }
    }

    fn names(slots: &[Slot]) -> Vec<String> {
        distinct_names(slots)
            .unwrap()
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    }

    #[test]
    fn templates_are_used_as_written_unless_names_collide() {
        // distinct seeds: the names as written, no -{index}
        assert_eq!(
            names(&[
                slot("out/{seed}.png", 0, 0, 5, "p:1"),
                slot("out/{seed}.png", 1, 0, 6, "p:2")
            ]),
            ["out/5.png", "out/6.png"]
        );
        // the same seed on two lines: only those two get -{index}
        assert_eq!(
            names(&[
                slot("{seed}.png", 0, 0, 5, "p:1"),
                slot("{seed}.png", 1, 0, 5, "p:2"),
                slot("{seed}.png", 2, 0, 7, "p:3")
            ]),
            ["5-0.png", "5-1.png", "7.png"]
        );
        // several images of one prompt: -{image}; of two prompts with one name: both
        assert_eq!(
            names(&[slot("a.png", 0, 0, 1, "--prompt"), slot("a.png", 0, 1, 1, "--prompt")]),
            ["a-0.png", "a-1.png"]
        );
        assert_eq!(
            names(&[
                slot("a.png", 0, 0, 1, "p:1"),
                slot("a.png", 0, 1, 1, "p:1"),
                slot("a.png", 1, 0, 2, "p:2")
            ]),
            ["a-0-0.png", "a-0-1.png", "a-1.png"]
        );
        // a template with {image} never needs -{image}
        assert_eq!(
            names(&[
                slot("{seed}-{n}.png", 0, 0, 1, "p:1"),
                slot("{seed}-{n}.png", 0, 1, 1, "p:1")
            ]),
            ["1-0.png", "1-1.png"]
        );
        // a suffixed name that meets another file's name as written: refused, naming both lines
        let e = distinct_names(&[
            slot("x.png", 0, 0, 1, "p:1"),
            slot("x.png", 1, 0, 1, "p:2"),
            slot("x-1.png", 2, 0, 1, "p:3"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("p:2 and p:3") && e.contains("x-1.png"), "{e}");
    }

    #[test]
    fn existing_outputs_are_complete_or_not() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.png");
        assert_eq!(inspect(&path, FileKind::Png), Found::Missing);
        let img = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![0, 1, 2, 3, 4, 5],
        };
        let png = encode_png(&img, &vec![("k".into(), "v".into())])?;
        std::fs::write(&path, &png)?;
        assert_eq!(inspect(&path, FileKind::Png), Found::Complete);
        std::fs::write(&path, &png[..png.len() - 5])?;
        assert!(matches!(inspect(&path, FileKind::Png), Found::Incomplete(w) if w.contains("IEND")));
        std::fs::write(&path, "not a png, but long enough to look at")?;
        assert!(matches!(inspect(&path, FileKind::Png), Found::Incomplete(w) if w.contains("signature")));
        assert!(matches!(inspect(dir.path(), FileKind::Png), Found::Incomplete(_)));
        let st = dir.path().join("e.safetensors");
        let data = [0u8; 8];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data)?;
        let bytes = safetensors::serialize([("x", view)], None)?;
        std::fs::write(&st, &bytes)?;
        assert_eq!(inspect(&st, FileKind::Safetensors), Found::Complete);
        std::fs::write(&st, &bytes[..bytes.len() - 1])?;
        assert!(matches!(inspect(&st, FileKind::Safetensors), Found::Incomplete(_)));
        Ok(())
    }

    #[test]
    fn atomic_write_refuses_to_clobber_and_leaves_no_temp_files() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.png");
        write_atomic(&path, b"one", false)?;
        let err = write_atomic(&path, b"two", false).unwrap_err();
        assert!(err.downcast_ref::<InputError>().is_some(), "{err:#}");
        assert_eq!(std::fs::read(&path)?, b"one");
        write_atomic(&path, b"three", true)?;
        assert_eq!(std::fs::read(&path)?, b"three");
        let names: Vec<_> = std::fs::read_dir(dir.path())?.collect();
        assert_eq!(names.len(), 1, "stray files: {names:?}");
        Ok(())
    }
}
