//! transformers 5.24's `CLIPImageProcessor` for RGB8 images, bit-exact with what it computes on
//! the CPU: the `feature_extractor/` that diffusers' Stable Cascade prior runs on an input image.
//!
//! In transformers 5.24 `CLIPImageProcessor` is a `TorchvisionBackend` processor. On one image
//! its `_preprocess` does, in order:
//! 1. resize (`size.shortest_edge`: the other side is `int(S * long / short)`; or exactly
//!    `size.height` x `size.width`) with torchvision's `resize` on the uint8 CHW tensor. On the
//!    CPU that is torch's native uint8 antialiased kernel (`_upsample_bicubic2d_aa` /
//!    `_upsample_bilinear2d_aa`, `separable_upsample_generic_Nd_kernel_impl` or its AVX2 twin,
//!    which compute the same integers): one pass along the width, then one along the height,
//!    each skipped when that size is unchanged, with a uint8 image between them. Each output
//!    sample's weights come from the filter in f64, widened by the scale when downsampling,
//!    normalised by their sum, then rounded to int16 fixed point; sums are integer, rounded,
//!    clamped to 0..=255.
//! 2. center crop with transformers' own offsets (`int((h - crop_h) / 2.0)`), zero padding
//!    first (the smaller half before) when the crop is larger than the image.
//! 3. rescale and normalize: fused as transformers fuses them (mean and std multiplied by
//!    `1 / rescale_factor` in f32), then `(x - mean) / std` in f32, CHW.
//!
//! [`read_rgb8`] decodes a PNG to what `convert_to_rgb(PIL.Image.open(path))` gives
//! transformers (alpha composited onto white, as transformers does, not dropped), and a JPEG
//! to within a few levels of it.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use serde::Deserialize;

use crate::error::{InputError, ModelError};

const COMPONENT: &str = "feature_extractor";

/// transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` (image_utils.py): the class defaults.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `size` / `crop_size` as a config file may write them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Int(u64),
    List(Vec<u64>),
    Dict(BTreeMap<String, u64>),
}

/// `image_mean` / `image_std`: one value for every channel, or one per channel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Floats {
    One(f64),
    List(Vec<f64>),
}

/// `feature_extractor/preprocessor_config.json`. `None` (key absent or `null`) means the
/// `CLIPImageProcessor` class default, as transformers' `_set_attributes` treats both.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ClipImageProcessorConfig {
    pub do_resize: Option<bool>,
    pub size: Option<SizeValue>,
    pub default_to_square: Option<bool>,
    pub resample: Option<i64>,
    pub do_center_crop: Option<bool>,
    pub crop_size: Option<SizeValue>,
    pub do_rescale: Option<bool>,
    pub rescale_factor: Option<f64>,
    pub do_normalize: Option<bool>,
    pub image_mean: Option<Floats>,
    pub image_std: Option<Floats>,
    pub do_convert_rgb: Option<bool>,
    pub do_pad: Option<bool>,
    pub use_square_size: Option<bool>,
}

/// The resampling filter (`resample`, PIL's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// 2: the tent, support 1.
    Bilinear,
    /// 3: Keys' cubic with a = -0.5 (torch's antialias bicubic, like PIL), support 2.
    Bicubic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalize {
    /// Neither rescale nor normalize: the uint8 values as f32.
    None,
    /// `x * factor` (do_rescale without do_normalize).
    Rescale(f32),
    /// `(x - mean[c]) / std[c]`, with rescale_factor already fused in when do_rescale is set.
    Standardize { mean: [f32; 3], std: [f32; 3] },
}

/// A validated processor: what `pixel_values` does to an RGB8 image.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    pub resize: Option<(ResizeTarget, Filter)>,
    /// (height, width)
    pub crop: Option<(usize, usize)>,
    pub normalize: Normalize,
}

fn bad(message: impl Into<String>) -> ModelError {
    ModelError::BadConfig {
        component: COMPONENT.into(),
        message: message.into(),
    }
}

fn positive(v: u64, what: &str) -> Result<usize, ModelError> {
    match usize::try_from(v) {
        Ok(n) if n > 0 && n <= 1 << 20 => Ok(n),
        _ => Err(bad(format!("{what} must be between 1 and 2^20, got {v}"))),
    }
}

/// transformers' `get_size_dict` followed by the branches of `TorchvisionBackend.resize` that
/// this implements.
fn resize_target(size: &SizeValue, default_to_square: bool) -> Result<ResizeTarget, ModelError> {
    let exact = |h: u64, w: u64| -> Result<ResizeTarget, ModelError> {
        Ok(ResizeTarget::Exact {
            height: positive(h, "size.height")?,
            width: positive(w, "size.width")?,
        })
    };
    match size {
        SizeValue::Int(n) if default_to_square => exact(*n, *n),
        SizeValue::Int(n) => Ok(ResizeTarget::ShortestEdge(positive(*n, "size")?)),
        SizeValue::List(v) if v.len() == 2 => exact(v[0], v[1]),
        SizeValue::Dict(d) => {
            let keys: Vec<&str> = d.keys().map(String::as_str).collect();
            match keys.as_slice() {
                ["shortest_edge"] => Ok(ResizeTarget::ShortestEdge(positive(
                    d["shortest_edge"],
                    "size.shortest_edge",
                )?)),
                ["height", "width"] => exact(d["height"], d["width"]),
                _ => Err(bad(format!(
                    "size with keys {keys:?} is not supported (only {{\"shortest_edge\"}} or {{\"height\", \"width\"}})"
                ))),
            }
        }
        SizeValue::List(v) => Err(bad(format!("size must be [height, width], got {v:?}"))),
    }
}

/// `get_size_dict(crop_size, param_name="crop_size")`: an int is a square.
fn crop_size(size: &SizeValue) -> Result<(usize, usize), ModelError> {
    let (h, w) = match size {
        SizeValue::Int(n) => (*n, *n),
        SizeValue::List(v) if v.len() == 2 => (v[0], v[1]),
        SizeValue::Dict(d) if d.len() == 2 && d.contains_key("height") && d.contains_key("width") => {
            (d["height"], d["width"])
        }
        other => {
            return Err(bad(format!(
                "crop_size must be an int, [height, width] or {{\"height\", \"width\"}}, got {other:?}"
            )))
        }
    };
    Ok((positive(h, "crop_size.height")?, positive(w, "crop_size.width")?))
}

/// Three channel values as torch holds them: `torch.tensor(list)` rounds each to f32.
fn per_channel(v: &Floats, what: &str) -> Result<[f32; 3], ModelError> {
    let v: [f64; 3] = match v {
        Floats::One(x) => [*x; 3],
        Floats::List(l) if l.len() == 1 => [l[0]; 3],
        Floats::List(l) if l.len() == 3 => [l[0], l[1], l[2]],
        Floats::List(l) => return Err(bad(format!("{what} must have 1 or 3 values, got {}", l.len()))),
    };
    if v.iter().any(|x| !x.is_finite()) {
        return Err(bad(format!("{what} must be finite, got {v:?}")));
    }
    Ok(v.map(|x| x as f32))
}

impl ClipImageProcessorConfig {
    /// Resolves the class defaults and rejects what this implementation does not reproduce.
    pub fn validate(&self) -> Result<ClipImageProcessor, ModelError> {
        if self.do_convert_rgb == Some(false) {
            return Err(bad(
                "do_convert_rgb false is not supported (images are always converted to RGB)",
            ));
        }
        if self.do_pad == Some(true) {
            return Err(bad("do_pad true is not supported"));
        }
        if self.use_square_size == Some(true) {
            return Err(bad("use_square_size true is not supported"));
        }

        let resize = if self.do_resize.unwrap_or(true) {
            // resample 3 (PIL BICUBIC) is the CLIPImageProcessor default
            let filter = match self.resample.unwrap_or(3) {
                2 => Filter::Bilinear,
                3 => Filter::Bicubic,
                r => {
                    return Err(bad(format!(
                        "resample {r} is not supported (only 2 = bilinear and 3 = bicubic)"
                    )))
                }
            };
            let size = self
                .size
                .clone()
                .unwrap_or(SizeValue::Dict(BTreeMap::from([("shortest_edge".to_string(), 224)])));
            // CLIPImageProcessor.default_to_square = False: an int size is the shortest edge
            Some((resize_target(&size, self.default_to_square.unwrap_or(false))?, filter))
        } else {
            None
        };

        let crop = if self.do_center_crop.unwrap_or(true) {
            Some(crop_size(self.crop_size.as_ref().unwrap_or(&SizeValue::Int(224)))?)
        } else {
            None
        };

        let do_rescale = self.do_rescale.unwrap_or(true);
        // BaseImageProcessor.rescale_factor = 1 / 255
        let rescale_factor = self.rescale_factor.unwrap_or(1.0 / 255.0);
        if do_rescale && !(rescale_factor.is_finite() && rescale_factor > 0.0) {
            return Err(bad(format!(
                "rescale_factor must be finite and > 0, got {rescale_factor}"
            )));
        }
        let normalize = if self.do_normalize.unwrap_or(true) {
            let mean = per_channel(
                self.image_mean
                    .as_ref()
                    .unwrap_or(&Floats::List(OPENAI_CLIP_MEAN.to_vec())),
                "image_mean",
            )?;
            let std = per_channel(
                self.image_std
                    .as_ref()
                    .unwrap_or(&Floats::List(OPENAI_CLIP_STD.to_vec())),
                "image_std",
            )?;
            if std.contains(&0.0) {
                // torchvision's normalize raises on a zero std
                return Err(bad("image_std must not contain 0"));
            }
            if do_rescale {
                // TorchvisionBackend._fuse_mean_std_and_rescale_factor:
                // torch.tensor(mean) * (1.0 / rescale_factor): an f32 tensor times a Python
                // float, which torch's CPU kernel rounds to f32 before multiplying in f32.
                let f = (1.0 / rescale_factor) as f32;
                Normalize::Standardize {
                    mean: mean.map(|m| m * f),
                    std: std.map(|s| s * f),
                }
            } else {
                Normalize::Standardize { mean, std }
            }
        } else if do_rescale {
            // `image * scale`: a uint8 tensor times a Python float computes in f32
            Normalize::Rescale(rescale_factor as f32)
        } else {
            Normalize::None
        };
        Ok(ClipImageProcessor {
            resize,
            crop,
            normalize,
        })
    }
}

impl ClipImageProcessor {
    /// `processor(image).pixel_values[0]` for an RGB8 image (row-major, 3 bytes a pixel):
    /// `(values, height, width)`, the values float32 CHW with 3 channels.
    pub fn pixel_values(&self, rgb: &[u8], width: usize, height: usize) -> anyhow::Result<(Vec<f32>, usize, usize)> {
        if width == 0 || height == 0 || width.checked_mul(height).and_then(|n| n.checked_mul(3)) != Some(rgb.len()) {
            return Err(InputError::new(format!(
                "an RGB8 image of {width}x{height} needs {} bytes, got {}",
                width.saturating_mul(height).saturating_mul(3),
                rgb.len()
            ))
            .into());
        }
        // HWC -> CHW, as process_image's permute(2, 0, 1)
        let mut planes: Vec<u8> = (0..3).flat_map(|c| rgb.iter().skip(c).step_by(3).copied()).collect();
        let (mut h, mut w) = (height, width);

        if let Some((target, filter)) = self.resize {
            let (oh, ow) = output_size(target, h, w);
            // transformers would go on, but a sliver (say 1x20000) resized by its short edge
            // needs gigabytes
            if oh.checked_mul(ow).is_none_or(|n| n > 1 << 26) {
                return Err(InputError::new(format!(
                    "an image of {width}x{height} would be resized to {ow}x{oh}: too large"
                ))
                .into());
            }
            // torch skips a pass whose size is unchanged; width (the contiguous dim) first
            if ow != w {
                planes = resample_rows(&planes, w, &fixed_point_weights(w, ow, filter));
                w = ow;
            }
            if oh != h {
                planes = resample_columns(&planes, h, w, &fixed_point_weights(h, oh, filter));
                h = oh;
            }
        }
        if let Some((ch, cw)) = self.crop {
            planes = center_crop(&planes, h, w, ch, cw);
            (h, w) = (ch, cw);
        }

        let plane = h * w;
        let data = planes
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let x = v as f32;
                match self.normalize {
                    Normalize::None => x,
                    Normalize::Rescale(s) => x * s,
                    Normalize::Standardize { mean, std } => (x - mean[i / plane]) / std[i / plane],
                }
            })
            .collect();
        Ok((data, h, w))
    }
}

/// (height, width) after the resize: transformers' `get_resize_output_image_size` with
/// `default_to_square=False`: `int(S * long / short)`, a float division then truncation.
fn output_size(target: ResizeTarget, h: usize, w: usize) -> (usize, usize) {
    match target {
        ResizeTarget::Exact { height, width } => (height, width),
        ResizeTarget::ShortestEdge(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = ((s as u64 * long as u64) as f64 / short as f64) as usize;
            if w <= h {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// The weights of one output sample: `weights[k]` multiplies input sample `start + k`.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// int16 weights with `precision` fractional bits for every output sample along one axis.
struct FixedPointWeights {
    taps: Vec<Taps>,
    precision: u32,
}

impl Filter {
    /// `interp_size` of torch's HelperInterpLinear / HelperInterpCubic
    fn interp_size(self) -> f64 {
        match self {
            Filter::Bilinear => 2.0,
            Filter::Bicubic => 4.0,
        }
    }

    /// `aa_filter` of HelperInterpLinear / HelperInterpCubic (antialias: Keys' a = -0.5),
    /// in f64, with torch's operation order.
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => crate::ops::resize::cubic(x),
        }
    }
}

/// torch's `_compute_index_ranges_int16_weights` (antialias=True, align_corners=False, no
/// scale given): `_compute_indices_min_size_weights_aa` per output sample in f64, then the
/// precision that keeps the largest weight below 2^15 and each weight rounded half away from 0.
fn fixed_point_weights(in_size: usize, out_size: usize, filter: Filter) -> FixedPointWeights {
    let scale = in_size as f64 / out_size as f64;
    let (support, invscale) = if scale >= 1.0 {
        ((filter.interp_size() * 0.5) * scale, 1.0 / scale)
    } else {
        (filter.interp_size() * 0.5, 1.0)
    };
    let max_taps = support.ceil() as i64 * 2 + 1;

    let mut wt_max = 0.0f64;
    let float_taps: Vec<(usize, Vec<f64>)> = (0..out_size)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // static_cast<int64_t> truncates toward zero
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize = (((center + support + 0.5) as i64).min(in_size as i64) - xmin).clamp(0, max_taps);
            let mut w: Vec<f64> = (0..xsize)
                .map(|j| filter.eval(((j + xmin) as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = w.iter().fold(0.0, |acc, &v| acc + v);
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                    wt_max = wt_max.max(*v);
                }
            }
            (xmin as usize, w)
        })
        .collect();

    let mut precision = 0u32;
    while precision < 22 {
        if (0.5 + wt_max * (1i32 << (precision + 1)) as f64) as i32 >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let one = (1i32 << precision) as f64;
    let taps = float_taps
        .into_iter()
        .map(|(start, w)| Taps {
            start,
            weights: w
                .iter()
                .map(|&v| {
                    let v = v * one;
                    (if v < 0.0 { (-0.5 + v) as i32 } else { (0.5 + v) as i32 }) as i16 as i32
                })
                .collect(),
        })
        .collect();
    FixedPointWeights { taps, precision }
}

/// One fixed-point sum to a uint8: + 0.5 (as `1 << (precision - 1)`), shift, clamp. Sums are
/// i64 here; torch's i32 never overflows for images (|sum| < 255 * 1.2 * 2^22).
fn to_u8(sum: i64, precision: u32) -> u8 {
    ((sum + (1i64 << (precision - 1))) >> precision).clamp(0, 255) as u8
}

/// Resamples along the last axis of `src` (rows of `in_w` samples).
fn resample_rows(src: &[u8], in_w: usize, wts: &FixedPointWeights) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() / in_w * wts.taps.len());
    for row in src.chunks_exact(in_w) {
        for t in &wts.taps {
            let window = &row[t.start..t.start + t.weights.len()];
            let sum: i64 = window.iter().zip(&t.weights).map(|(&p, &k)| p as i64 * k as i64).sum();
            out.push(to_u8(sum, wts.precision));
        }
    }
    out
}

/// Resamples along the height of 3 planes of `in_h` rows of `w` samples.
fn resample_columns(src: &[u8], in_h: usize, w: usize, wts: &FixedPointWeights) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 * wts.taps.len() * w);
    let mut acc = vec![0i64; w];
    for plane in src.chunks_exact(in_h * w) {
        for t in &wts.taps {
            acc.fill(0);
            for (k, &wt) in t.weights.iter().enumerate() {
                let row = &plane[(t.start + k) * w..(t.start + k + 1) * w];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += p as i64 * wt as i64;
                }
            }
            out.extend(acc.iter().map(|&s| to_u8(s, wts.precision)));
        }
    }
    out
}

/// `TorchvisionBackend.center_crop`: zero padding (left/top get the smaller half) when the crop
/// is larger, then offsets `int((size - crop) / 2.0)`.
fn center_crop(src: &[u8], h: usize, w: usize, ch: usize, cw: usize) -> Vec<u8> {
    // padding_ltrb: (crop - size) // 2 before, (crop - size + 1) // 2 after
    let (pad_top, pad_bottom) = if ch > h {
        ((ch - h) / 2, (ch - h).div_ceil(2))
    } else {
        (0, 0)
    };
    let (pad_left, pad_right) = if cw > w {
        ((cw - w) / 2, (cw - w).div_ceil(2))
    } else {
        (0, 0)
    };
    let (ph, pw) = (h + pad_top + pad_bottom, w + pad_left + pad_right);
    let (top, left) = ((ph - ch) / 2, (pw - cw) / 2);
    let mut out = vec![0u8; 3 * ch * cw];
    for (c, plane) in src.chunks_exact(h * w).enumerate() {
        for y in 0..ch {
            // row y of the crop is row y + top of the padded image, row y + top - pad_top here
            let Some(sy) = (y + top).checked_sub(pad_top).filter(|&sy| sy < h) else {
                continue;
            };
            for x in 0..cw {
                if let Some(sx) = (x + left).checked_sub(pad_left).filter(|&sx| sx < w) {
                    out[(c * ch + y) * cw + x] = plane[sy * w + sx];
                }
            }
        }
    }
    out
}

/// PIL's `alpha_composite` of (c, a) over opaque white, which transformers' `convert_to_rgb`
/// does to images with alpha (Pillow's AlphaComposite.c: 7 fractional bits; over an opaque
/// background its factors reduce exactly to a * 128 and (255 - a) * 128).
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (c, a) = (c as u32, a as u32);
    let tmp = c * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

fn not_supported(path: &Path, what: &str) -> anyhow::Error {
    InputError::new(format!("{}: {what} PNGs are not supported", path.display())).into()
}

/// Decodes a PNG or a JPEG to RGB8 (row-major, 3 bytes a pixel), `(rgb, width, height)`, as
/// `convert_to_rgb(PIL.Image.open(path), return_numpy=True)` gives it to transformers (see
/// [`read_png`], [`read_jpeg`]); the format comes from the file's first bytes.
pub fn read_rgb8(path: &Path) -> anyhow::Result<(Vec<u8>, usize, usize)> {
    let bytes =
        std::fs::read(path).map_err(|e| InputError::new(format!("cannot read image {}: {e}", path.display())))?;
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        read_png(path, &bytes)
    } else if bytes.starts_with(b"\xff\xd8\xff") {
        read_jpeg(path, &bytes)
    } else {
        Err(InputError::new(format!("{}: neither a PNG nor a JPEG file", path.display())).into())
    }
}

/// A JPEG through zune-jpeg, grayscale and CMYK converted to RGB. PIL decodes with
/// libjpeg-turbo, whose IDCT and chroma upsampling differ from zune-jpeg's: the pixels agree
/// to a few levels (up to 7, 0.6 on average, on the fixtures' noisy 4:2:0 photo), not
/// exactly as a PNG's do. EXIF orientation is ignored, as `PIL.Image.open` ignores it.
fn read_jpeg(path: &Path, bytes: &[u8]) -> anyhow::Result<(Vec<u8>, usize, usize)> {
    use zune_jpeg::zune_core::{colorspace::ColorSpace, options::DecoderOptions};
    let invalid =
        |e: zune_jpeg::errors::DecodeErrors| InputError::new(format!("{}: invalid JPEG: {e}", path.display()));
    let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(Cursor::new(bytes), options);
    let rgb = decoder.decode().map_err(invalid)?;
    let info = decoder
        .info()
        .ok_or_else(|| InputError::new(format!("{}: a JPEG without a frame header", path.display())))?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    anyhow::ensure!(
        rgb.len() == width * height * 3,
        "{}: the JPEG decoder gave {} bytes for {width}x{height} RGB",
        path.display(),
        rgb.len()
    );
    Ok((rgb, width, height))
}

/// A PNG as PIL gives it: palette and grayscale expanded, low bit depths scaled to 0..=255;
/// alpha (an alpha channel or tRNS) composited onto white; 16-bit samples to their high byte,
/// except 16-bit grayscale, which PIL opens as "I;16" and clips to 255.
fn read_png(path: &Path, bytes: &[u8]) -> anyhow::Result<(Vec<u8>, usize, usize)> {
    let invalid = |e: png::DecodingError| InputError::new(format!("{}: invalid PNG: {e}", path.display()));

    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), png::Limits { bytes: 1 << 30 });
    // palette -> RGB(A), gray < 8 bits -> 8 bits (scaled, like PIL's "L;2"/"L;4"/"1"), tRNS -> alpha
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(invalid)?;
    let info = reader.info();
    let sixteen = info.bit_depth == png::BitDepth::Sixteen;
    if info.trns.is_some() && sixteen {
        // PIL compares 16-bit tRNS values with 8-bit pixels
        return Err(not_supported(path, "16-bit tRNS"));
    }
    if info.trns.is_some() && info.color_type == png::ColorType::Grayscale && (info.bit_depth as u8) < 8 {
        // PIL compares the raw tRNS value with the scaled gray value
        return Err(not_supported(path, "grayscale tRNS below 8 bits"));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| InputError::new(format!("{}: image too large", path.display())))?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(invalid)?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    let bytes_per_sample = if frame.bit_depth == png::BitDepth::Sixteen {
        2
    } else {
        1
    };
    if frame.bit_depth != png::BitDepth::Eight && bytes_per_sample != 2 {
        return Err(not_supported(
            path,
            &format!("{:?}-bit {:?}", frame.bit_depth, frame.color_type),
        ));
    }

    let mut rgb = Vec::with_capacity(width * height * 3);
    for row in buf.chunks_exact(frame.line_size).take(height) {
        for px in row[..width * channels * bytes_per_sample].chunks_exact(channels * bytes_per_sample) {
            // the high byte of a big-endian 16-bit sample (PIL's "RGB;16B" etc.), or the byte
            let s = |i: usize| px[i * bytes_per_sample];
            let pixel = match frame.color_type {
                png::ColorType::Grayscale if bytes_per_sample == 2 => {
                    let v = u16::from_be_bytes([px[0], px[1]]).min(255) as u8;
                    [v; 3]
                }
                png::ColorType::Grayscale => [s(0); 3],
                png::ColorType::GrayscaleAlpha => [over_white(s(0), s(1)); 3],
                png::ColorType::Rgb => [s(0), s(1), s(2)],
                png::ColorType::Rgba => [over_white(s(0), s(3)), over_white(s(1), s(3)), over_white(s(2), s(3))],
                png::ColorType::Indexed => return Err(not_supported(path, "unexpanded palette")),
            };
            rgb.extend_from_slice(&pixel);
        }
    }
    Ok((rgb, width, height))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use safetensors::{Dtype, SafeTensors};
    use sha2::{Digest, Sha256};

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image-processor")
    }

    fn processor(config_dir: &Path) -> ClipImageProcessor {
        let text = std::fs::read_to_string(config_dir.join("preprocessor_config.json")).unwrap();
        serde_json::from_str::<ClipImageProcessorConfig>(&text)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// (values, height, width) of a fixture image through a fixture config, both from files.
    fn run(config: &str, stem: &str) -> (Vec<f32>, usize, usize) {
        let dir = fixture_dir();
        let (rgb, w, h) = read_rgb8(&dir.join(format!("{stem}.png"))).unwrap();
        processor(&dir.join(config)).pixel_values(&rgb, w, h).unwrap()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Every `{config}/{stem}` in expected.safetensors, bit for bit.
    #[test]
    fn pixel_values_match_transformers() {
        let bytes = std::fs::read(fixture_dir().join("expected.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut checked = 0;
        for (name, view) in st.tensors() {
            if name.starts_with("decode/") || name.starts_with("jpeg/") || name.ends_with(".sub7") {
                continue;
            }
            let (config, stem) = name.rsplit_once('/').unwrap_or(("", &name));
            let (got, h, w) = run(config, stem);
            assert_eq!(view.dtype(), Dtype::F32);
            assert_eq!(view.shape(), [1, 3, h, w], "{name}");
            assert_eq!(max_abs_diff(&got, &f32s(view.data())), 0.0, "{name}");
            checked += 1;
        }
        assert_eq!(checked, 8);
    }

    /// The 224 config (Stable Cascade's values): the whole output by SHA-256, a subsample by value.
    #[test]
    fn clip_default_matches_transformers() {
        let bytes = std::fs::read(fixture_dir().join("expected.safetensors")).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let key = "clip-default/gradient_300x200";
        let (got, h, w) = run("clip-default", "gradient_300x200");
        assert_eq!((h, w), (224, 224));
        assert_eq!(meta[&format!("{key}.shape")], "[1, 3, 224, 224]");

        let sub = st.tensor(&format!("{key}.sub7")).unwrap();
        let mut got_sub = Vec::new();
        for c in 0..3 {
            for y in (0..224).step_by(7) {
                for x in (0..224).step_by(7) {
                    got_sub.push(got[(c * 224 + y) * 224 + x]);
                }
            }
        }
        assert_eq!(max_abs_diff(&got_sub, &f32s(sub.data())), 0.0);

        let raw: Vec<u8> = got.iter().flat_map(|v| v.to_le_bytes()).collect();
        let digest: String = Sha256::digest(&raw).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(digest, meta[&format!("{key}.sha256")]);
    }

    /// `check(name, decoded, expected)` for each `{prefix}/{stem}` RGB8 tensor of the fixture
    /// and `decode/{stem}.{ext}` decoded; how many there were.
    fn check_decoded(prefix: &str, ext: &str, check: impl Fn(&str, &[u8], &[u8])) -> usize {
        let bytes = std::fs::read(fixture_dir().join("expected.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut checked = 0;
        for (name, view) in st.tensors() {
            let Some(stem) = name.strip_prefix(prefix).and_then(|n| n.strip_prefix('/')) else {
                continue;
            };
            let (rgb, w, h) = read_rgb8(&fixture_dir().join(format!("decode/{stem}.{ext}"))).unwrap();
            assert_eq!(view.shape(), [h, w, 3], "{name}");
            check(&name, &rgb, view.data());
            checked += 1;
        }
        checked
    }

    #[test]
    fn png_decoding_matches_pil_and_convert_to_rgb() {
        let checked = check_decoded("decode", "png", |name, rgb, want| assert_eq!(rgb, want, "{name}"));
        assert_eq!(checked, 14);
        // the fixture's RGBA input has alpha 0 (-> white) and partial alpha
        let (rgb, _, _) = read_rgb8(&fixture_dir().join("rgba_64x64.png")).unwrap();
        assert_eq!(&rgb[..3], &[255, 255, 255]);
    }

    /// JPEGs decode to PIL's size and to within a few levels of PIL's pixels (libjpeg-turbo's
    /// IDCT and upsampling are not zune-jpeg's), both chroma layouts.
    #[test]
    fn jpeg_decoding_is_close_to_pil() {
        let checked = check_decoded("jpeg", "jpg", |name, rgb, want| {
            let diff: Vec<u8> = rgb.iter().zip(want).map(|(a, b)| a.abs_diff(*b)).collect();
            let max = diff.iter().copied().max().unwrap_or(0);
            let mean = diff.iter().map(|&d| f64::from(d)).sum::<f64>() / diff.len() as f64;
            assert!(max <= 8 && mean <= 1.0, "{name}: max {max}, mean {mean}");
        });
        assert_eq!(checked, 2);
    }

    #[test]
    fn unsupported_or_non_png_files_are_input_errors_naming_the_file() {
        for stem in ["unsupported_gray2_trns", "unsupported_rgb16_trns"] {
            let path = fixture_dir().join(format!("decode/{stem}.png"));
            let err = read_rgb8(&path).unwrap_err();
            assert!(err.downcast_ref::<InputError>().is_some(), "{err:#}");
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err:#}");
        }
        let dir = tempfile::tempdir().unwrap();
        let jpeg = dir.path().join("photo.jpg");
        std::fs::write(&jpeg, b"\xff\xd8\xff\xe0\x00\x10JFIF\x00").unwrap();
        let err = read_rgb8(&jpeg).unwrap_err();
        assert!(err.downcast_ref::<InputError>().is_some());
        assert!(
            err.to_string().contains("photo.jpg") && err.to_string().contains("invalid JPEG"),
            "{err:#}"
        );
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"not an image").unwrap();
        let err = read_rgb8(&text).unwrap_err();
        assert!(err.downcast_ref::<InputError>().is_some());
        assert!(
            err.to_string().contains("notes.txt") && err.to_string().contains("neither"),
            "{err:#}"
        );
        let err = read_rgb8(&dir.path().join("missing.png")).unwrap_err();
        assert!(err.to_string().contains("missing.png"), "{err:#}");
    }

    /// torch 2.15 `F.interpolate(x, size, mode, antialias=True)` on uint8 rows (printed by hand
    /// from the Python reference). a = -0.75 instead of -0.5, or f32 weights without the int16
    /// rounding, change these.
    #[test]
    fn one_axis_resize_matches_torch_uint8_kernel() {
        let row = [0u8, 255, 0, 255, 128, 64, 200, 10, 90, 255, 3];
        let planes: Vec<u8> = row.repeat(3);
        let cases: [(Filter, usize, &[u8]); 6] = [
            (Filter::Bicubic, 4, &[115, 146, 100, 119]),
            (Filter::Bicubic, 7, &[102, 114, 186, 105, 92, 127, 107]),
            (
                Filter::Bicubic,
                17,
                &[
                    0, 125, 245, 36, 88, 255, 172, 93, 64, 168, 160, 15, 38, 132, 254, 122, 0,
                ],
            ),
            (Filter::Bilinear, 4, &[123, 139, 102, 123]),
            (Filter::Bilinear, 7, &[102, 113, 184, 106, 98, 122, 104]),
            (
                Filter::Bilinear,
                17,
                &[
                    0, 120, 225, 60, 105, 248, 165, 105, 64, 152, 144, 21, 57, 129, 236, 122, 3,
                ],
            ),
        ];
        for (filter, out, want) in cases {
            let got = resample_rows(&planes, row.len(), &fixed_point_weights(row.len(), out, filter));
            assert_eq!(&got[..out], want, "{filter:?} 11 -> {out}");
            // the same along the height
            let got = resample_columns(&planes, row.len(), 1, &fixed_point_weights(row.len(), out, filter));
            assert_eq!(&got[..out], want, "{filter:?} 11 -> {out} (columns)");
        }
    }

    #[test]
    fn absent_fields_take_clip_image_processor_defaults() {
        let defaults =
            serde_json::from_str::<ClipImageProcessorConfig>(r#"{"image_processor_type": "CLIPImageProcessor"}"#)
                .unwrap()
                .validate()
                .unwrap();
        let f = (1.0 / (1.0f64 / 255.0)) as f32;
        let expected = ClipImageProcessor {
            resize: Some((ResizeTarget::ShortestEdge(224), Filter::Bicubic)),
            crop: Some((224, 224)),
            normalize: Normalize::Standardize {
                mean: OPENAI_CLIP_MEAN.map(|m| m as f32 * f),
                std: OPENAI_CLIP_STD.map(|s| s as f32 * f),
            },
        };
        assert_eq!(defaults, expected);
        // null is the default too, and Stable Cascade's explicit file says the same
        let nulls = r#"{"size": null, "resample": null, "crop_size": null, "image_mean": null}"#;
        assert_eq!(
            serde_json::from_str::<ClipImageProcessorConfig>(nulls)
                .unwrap()
                .validate()
                .unwrap(),
            expected
        );
        assert_eq!(processor(&fixture_dir().join("clip-default")), expected);
    }

    #[test]
    fn size_forms_follow_get_size_dict() {
        let parse = |json: &str| {
            serde_json::from_str::<ClipImageProcessorConfig>(json)
                .unwrap()
                .validate()
        };
        let p = parse(r#"{"size": 24, "crop_size": 31, "do_normalize": false}"#).unwrap();
        assert_eq!(p.resize, Some((ResizeTarget::ShortestEdge(24), Filter::Bicubic)));
        assert_eq!(p.crop, Some((31, 31)));
        assert_eq!(p.normalize, Normalize::Rescale((1.0f64 / 255.0) as f32));
        let p = parse(r#"{"size": 24, "default_to_square": true, "crop_size": [20, 30], "resample": 2}"#).unwrap();
        assert_eq!(
            p.resize,
            Some((ResizeTarget::Exact { height: 24, width: 24 }, Filter::Bilinear))
        );
        assert_eq!(p.crop, Some((20, 30)));
        let p = parse(r#"{"do_resize": false, "do_center_crop": false, "do_rescale": false, "do_normalize": false}"#)
            .unwrap();
        assert_eq!((p.resize, p.crop, p.normalize), (None, None, Normalize::None));
        // shortest edge: int(S * long / short), tall and wide
        assert_eq!(output_size(ResizeTarget::ShortestEdge(32), 90, 50), (57, 32));
        assert_eq!(output_size(ResizeTarget::ShortestEdge(224), 200, 300), (224, 336));
    }

    #[test]
    fn unsupported_configs_are_rejected() {
        let parse = |json: &str| {
            serde_json::from_str::<ClipImageProcessorConfig>(json)
                .unwrap()
                .validate()
        };
        for (json, needle) in [
            (r#"{"resample": 1}"#, "resample 1"),
            (r#"{"resample": 0}"#, "resample 0"),
            (
                r#"{"size": {"shortest_edge": 224, "longest_edge": 500}}"#,
                "longest_edge",
            ),
            (r#"{"size": {"shortest_edge": 0}}"#, "shortest_edge"),
            (r#"{"crop_size": {"height": 10}}"#, "crop_size"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
            (r#"{"image_std": 0.0}"#, "image_std"),
            (r#"{"rescale_factor": 0.0}"#, "rescale_factor"),
            (r#"{"do_convert_rgb": false}"#, "do_convert_rgb"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(matches!(&err, ModelError::BadConfig { component, .. } if component == "feature_extractor"));
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
        // a resample the class never uses is fine when nothing is resized
        assert!(parse(r#"{"resample": 1, "do_resize": false}"#).is_ok());
    }

    #[test]
    fn center_crop_pads_and_offsets_like_transformers() {
        // 1x3 planes of 2x2 -> crop 5x3: pad top 1 bottom 2, left 0 right 1
        let src: Vec<u8> = (1..=12).collect();
        let out = center_crop(&src, 2, 2, 5, 3);
        assert_eq!(&out[..15], &[0, 0, 0, 1, 2, 0, 3, 4, 0, 0, 0, 0, 0, 0, 0]);
        // crop 1x1 of 3x4: offsets int(2/2)=1 and int(3/2)=1
        let src: Vec<u8> = (0..36).collect();
        assert_eq!(center_crop(&src, 3, 4, 1, 1), vec![5, 17, 29]);
    }

    #[test]
    fn bad_buffer_size_is_an_error() {
        let p = ClipImageProcessorConfig::default().validate().unwrap();
        assert!(p.pixel_values(&[0; 11], 2, 2).is_err());
        assert!(p.pixel_values(&[], 0, 0).is_err());
        let err = p.pixel_values(&[0; 3 * 40000], 40000, 1).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err:#}");
    }
}
