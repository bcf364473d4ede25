//! Memory-mapped safetensors behind a candle `VarBuilder`, with errors that name the
//! component, the file and the key. On the CPU a tensor stored in the dtype it runs in stays
//! in the file's mapping (`mapping.rs`), and one converted (f32 to bf16/f16) is converted
//! straight out of the mapping on every core. On a GPU tensors are copied to the device in
//! their stored dtype and converted there (a kernel, not a CPU loop).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::error::ModelError;
use crate::mapping::Mapping;

#[cfg(feature = "cuda")]
pub mod pinned;

/// Whether a CUDA build uploads weights through pinned staging buffers
/// (`WUERSTCHEN_PINNED_UPLOAD=1`; see `pinned.rs`). Opt-in until `selftest` has passed with it
/// on a GPU.
pub fn pinned_upload() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("WUERSTCHEN_PINNED_UPLOAD").is_ok_and(|v| v == "1"))
}

/// Told the stored bytes of each tensor loaded.
type Meter = Box<dyn Fn(u64)>;

thread_local! {
    /// This thread's meter (see `metered`).
    static METER: std::cell::RefCell<Option<Meter>> = const { std::cell::RefCell::new(None) };
}

/// Runs `load` with `meter` told the stored bytes of every tensor loaded on this thread
/// meanwhile: a loading progress bar without a parameter through every model constructor.
pub fn metered<T>(meter: impl Fn(u64) + 'static, load: impl FnOnce() -> T) -> T {
    let previous = METER.with(|m| m.replace(Some(Box::new(meter))));
    let out = load();
    METER.with(|m| *m.borrow_mut() = previous);
    out
}

fn meter(bytes: usize) {
    METER.with(|m| {
        if let Some(f) = &*m.borrow() {
            f(bytes as u64);
        }
    });
}

struct MappedFile {
    path: PathBuf,
    mmap: Mapping,
    data_start: usize,
    metadata: Metadata,
}

/// One component's weights (one or several safetensors files).
pub struct Weights {
    component: String,
    files: Vec<MappedFile>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
    /// Made on the first upload through pinned buffers ([`pinned_upload`]).
    #[cfg(feature = "cuda")]
    staging: std::sync::Mutex<Option<pinned::Staging>>,
}

impl Weights {
    /// Maps the files and reads their headers. A truncated or corrupt file fails here, naming it.
    pub fn open(component: &str, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let bad = |message: String| ModelError::bad_file(component, path, message);
            let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
            let mmap = Mapping::open(&file).map_err(|e| bad(format!("cannot map: {e}")))?;
            let (header_len, metadata) = SafeTensors::read_metadata(mmap.bytes())
                .map_err(|e| bad(format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), files.len());
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }
        Ok(Self {
            component: component.to_string(),
            files,
            index,
            #[cfg(feature = "cuda")]
            staging: Default::default(),
        })
    }

    pub fn component(&self) -> &str {
        &self.component
    }

    /// A `VarBuilder` over these weights, converting to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn files_list(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.path.display().to_string()).collect();
        names.join(", ")
    }

    fn info(&self, name: &str) -> candle_core::Result<(&MappedFile, &TensorInfo)> {
        let found = self.index.get(name).and_then(|&i| {
            let file = &self.files[i];
            file.metadata.info(name).map(|info| (file, info))
        });
        found.ok_or_else(|| {
            candle_core::Error::wrap(ModelError::MissingTensor {
                component: self.component.clone(),
                key: name.to_string(),
                files: self.files_list(),
            })
        })
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (file, info) = self.info(name)?;
        let bad =
            |message: String| candle_core::Error::wrap(ModelError::bad_file(&self.component, &file.path, message));
        let stored =
            DType::try_from(info.dtype).map_err(|e| bad(format!("tensor `{name}`: unsupported dtype: {e}")))?;
        if !stored.is_float() {
            return Err(bad(format!("tensor `{name}` has dtype {stored:?}, expected a float")));
        }
        let (start, end) = info.data_offsets;
        let range = file.data_start + start..file.data_start + end;
        let bytes = file
            .mmap
            .bytes()
            .get(range.clone())
            .ok_or_else(|| bad(format!("tensor `{name}` lies outside the file")))?;
        if bytes.len() != info.shape.iter().product::<usize>() * stored.size_in_bytes() {
            return Err(bad(format!("tensor `{name}`: its bytes do not match its shape")));
        }
        file.mmap.populate(&range);
        meter(range.len());
        if dev.is_cpu() && stored == dtype {
            if let Some(t) = in_mapping(&file.mmap, range.clone(), stored, &info.shape)? {
                return Ok(t);
            }
        }
        let t = if dev.is_cpu() && stored == DType::F32 {
            from_f32_bytes(bytes, dtype, &info.shape)?
        } else if let Some(t) = self.staged(bytes, stored, &info.shape, dev)? {
            t.to_dtype(dtype)?
        } else {
            Tensor::from_raw_buffer(bytes, stored, &info.shape, dev)?.to_dtype(dtype)?
        };
        file.mmap.release(&range);
        Ok(t)
    }
}

impl Weights {
    /// `bytes` uploaded through pinned buffers, where that is switched on and `dev` is a GPU.
    #[cfg(feature = "cuda")]
    fn staged(
        &self,
        bytes: &[u8],
        stored: DType,
        shape: &[usize],
        dev: &Device,
    ) -> candle_core::Result<Option<Tensor>> {
        use candle_core::backend::BackendDevice;
        let Device::Cuda(cuda) = dev else { return Ok(None) };
        if !pinned_upload() {
            return Ok(None);
        }
        let mut guard = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let staging = match &mut *guard {
            Some(staging) if staging.device().same_device(cuda) => staging,
            slot => slot.insert(pinned::Staging::new(cuda)?),
        };
        staging.upload(bytes, stored, shape).map(Some)
    }

    #[cfg(not(feature = "cuda"))]
    fn staged(&self, _: &[u8], _: DType, _: &[usize], _: &Device) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A CPU tensor of `dtype` whose elements are the mapping's `range`, not copied; `None` where
/// the mapping cannot hold tensors (see `Mapping::vec`).
fn in_mapping(
    map: &Mapping,
    range: std::ops::Range<usize>,
    dtype: DType,
    shape: &[usize],
) -> candle_core::Result<Option<Tensor>> {
    let cpu = &Device::Cpu;
    match dtype {
        DType::F32 => map.vec::<f32>(range).map(|v| Tensor::from_vec(v, shape, cpu)),
        DType::F16 => map.vec::<half::f16>(range).map(|v| Tensor::from_vec(v, shape, cpu)),
        DType::BF16 => map.vec::<half::bf16>(range).map(|v| Tensor::from_vec(v, shape, cpu)),
        DType::F64 => map.vec::<f64>(range).map(|v| Tensor::from_vec(v, shape, cpu)),
        _ => None,
    }
    .transpose()
}

/// Little-endian f32 bytes as a CPU tensor of `dtype`, converted on every core in one pass
/// with the same rounding as candle's `to_dtype` (round to nearest even).
fn from_f32_bytes(bytes: &[u8], dtype: DType, shape: &[usize]) -> candle_core::Result<Tensor> {
    match dtype {
        DType::BF16 => convert(bytes, shape, |x| half::bf16::from_bits(bf16_bits(x))),
        DType::F16 => convert(bytes, shape, |x| half::f16::from_f32(f32::from_bits(x))),
        DType::F64 => convert(bytes, shape, |x| f64::from(f32::from_bits(x))),
        _ => Tensor::from_raw_buffer(bytes, DType::F32, shape, &Device::Cpu)?.to_dtype(dtype),
    }
}

/// Elements per task of a conversion: large enough to amortise rayon, small enough to balance.
const CONVERT_CHUNK: usize = 1 << 16;

/// `f` over the little-endian words of `bytes` into a new CPU tensor, each element written
/// once, from aligned words where the file allows (which the compiler vectorises: bf16 at
/// 0.02 s per 10^8 elements here, against 0.08 s through byte arrays).
fn convert<T: candle_core::WithDType>(
    bytes: &[u8],
    shape: &[usize],
    f: impl Fn(u32) -> T + Sync,
) -> candle_core::Result<Tensor> {
    let n = bytes.len() / 4;
    let mut values: Vec<T> = Vec::with_capacity(n);
    let out = values.spare_capacity_mut()[..n].par_chunks_mut(CONVERT_CHUNK);
    // SAFETY: any bytes are valid `u32`s; only an aligned middle with nothing around it is used.
    match unsafe { bytes.align_to::<u32>() } {
        ([], words, []) => out.zip(words.par_chunks(CONVERT_CHUNK)).for_each(|(out, words)| {
            for (o, &w) in out.iter_mut().zip(words) {
                o.write(f(u32::from_le(w)));
            }
        }),
        _ => out.zip(bytes.par_chunks(CONVERT_CHUNK * 4)).for_each(|(out, src)| {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                o.write(f(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            }
        }),
    }
    // SAFETY: every one of the `n` elements was written above.
    unsafe { values.set_len(n) };
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// `half::bf16::from_f32(f32::from_bits(x)).to_bits()` without branches: round to nearest
/// even by adding 0x7fff plus the kept part's lowest bit; a NaN stays a (quiet) NaN.
fn bf16_bits(x: u32) -> u16 {
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        ((x >> 16) | 0x40) as u16
    } else {
        rounded
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (file, info) = self.info(name)?;
        if info.shape != s.dims() {
            return Err(candle_core::Error::wrap(ModelError::ShapeMismatch {
                component: self.component.clone(),
                key: name.to_string(),
                file: file.path.clone(),
                expected: s.dims().to_vec(),
                found: info.shape.clone(),
            }));
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// `folder/name`, or just `name` for a component stored at the root of its source.
pub fn join(folder: &str, name: &str) -> String {
    if folder.is_empty() {
        name.to_string()
    } else {
        format!("{folder}/{name}")
    }
}

/// The weight files a component folder holds for computing in `dtype`: the variant of that
/// dtype (diffusers' and transformers' `variant=`: `bf16`, `fp16`) where the folder has it,
/// `<stem>.<variant>.safetensors` or the shards listed in `<stem>.safetensors.index.<variant>.json`
/// (their `_add_variant` names); else the plain files ([`component_weight_files`]).
pub fn variant_weight_files(
    src: &dyn crate::hub::FileSource,
    folder: &str,
    component: &str,
    stem: &str,
    dtype: DType,
) -> Result<Vec<PathBuf>> {
    let variant = match dtype {
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("fp16"),
        _ => None,
    };
    if let Some(v) = variant {
        if let Some(path) = src.get(&join(folder, &format!("{stem}.{v}.safetensors")))? {
            return Ok(vec![path]);
        }
        if let Some(index) = src.get(&join(folder, &format!("{stem}.safetensors.index.{v}.json")))? {
            return shard_files(src, folder, component, &index);
        }
    }
    component_weight_files(src, folder, component, stem)
}

/// The weight files of a diffusers component folder: `<stem>.safetensors`, or the shards
/// listed in `<stem>.safetensors.index.json`. `component` names it in errors.
pub fn component_weight_files(
    src: &dyn crate::hub::FileSource,
    folder: &str,
    component: &str,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    let single = join(folder, &format!("{stem}.safetensors"));
    if let Some(path) = src.get(&single)? {
        return Ok(vec![path]);
    }
    let Some(index_path) = src.get(&format!("{single}.index.json"))? else {
        return Err(src.missing(component, &single).into());
    };
    shard_files(src, folder, component, &index_path)
}

/// The shards a `*.safetensors.index*.json` at `index_path` lists, each fetched.
fn shard_files(
    src: &dyn crate::hub::FileSource,
    folder: &str,
    component: &str,
    index_path: &Path,
) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct ShardIndex {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let index: ShardIndex =
        serde_json::from_str(&text).map_err(|e| ModelError::bad_file(component, index_path, e.to_string()))?;
    let mut shards: Vec<&String> = index.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    shards
        .into_iter()
        .map(|shard| {
            let rel = join(folder, shard);
            src.require(component, &rel)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_halfs() {
        let special = [
            0u32,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x0000_8000,
            0x0001_8000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x0000_0001,
        ];
        // every special value, and a stride through all 2^32 bit patterns
        let all = special.into_iter().chain((0..u32::MAX).step_by(65_521));
        for x in all {
            let want = half::bf16::from_f32(f32::from_bits(x)).to_bits();
            assert_eq!(bf16_bits(x), want, "{x:#010x}");
        }
    }

    /// On the CPU a tensor in its stored dtype is the file's bytes in place; one converted equals
    /// candle's conversion of the copy.
    #[test]
    fn cpu_weights_stay_in_their_mapping_or_convert_like_candle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let values: Vec<f32> = (0..6000).map(|i| (i as f32 * 0.37).cos()).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![60, 100], &bytes).unwrap();
        std::fs::write(&path, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
        let expected = Tensor::from_vec(values, (60, 100), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let vb = Weights::open("test", std::slice::from_ref(&path))
                .unwrap()
                .var_builder(dtype, &Device::Cpu);
            let t = vb.get((60, 100), "w").unwrap();
            let diff = (t.to_dtype(DType::F32).unwrap()
                - expected.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
            .unwrap();
            assert_eq!(
                diff.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
                0.0,
                "{dtype:?}"
            );
            let (storage, _) = t.storage_and_layout();
            let in_mapping = match &*storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                    crate::mapping::is_mapped(v.as_ptr() as *mut u8)
                }
                candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                    crate::mapping::is_mapped(v.as_ptr() as *mut u8)
                }
                _ => panic!("a CPU tensor"),
            };
            assert_eq!(in_mapping, dtype == DType::F32, "{dtype:?}");
        }
    }

    #[test]
    fn conversion_equals_candles_to_dtype() {
        let values: Vec<f32> = (0..200_003)
            .map(|i| ((i as f32) * 0.618_034).sin() * 1e3 / (1 + i % 7) as f32)
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let reference = Tensor::from_vec(values, 200_003, &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F16, DType::F64] {
            let ours = from_f32_bytes(&bytes, dtype, &[200_003]).unwrap();
            let theirs = reference.to_dtype(dtype).unwrap();
            let diff = (ours.to_dtype(DType::F64).unwrap() - theirs.to_dtype(DType::F64).unwrap()).unwrap();
            let max = diff.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert_eq!(max, 0.0, "{dtype:?}");
        }
    }

    #[test]
    fn a_variant_is_taken_where_the_folder_has_it_single_or_sharded() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net");
        std::fs::create_dir_all(&net).unwrap();
        let names = [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bf16.safetensors",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ];
        for name in names {
            std::fs::write(net.join(name), b"").unwrap();
        }
        let index = r#"{"weight_map": {"a": "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
            "b": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"}}"#;
        std::fs::write(net.join("diffusion_pytorch_model.safetensors.index.fp16.json"), index).unwrap();
        let src = crate::hub::LocalDir::new(dir.path());
        let files = |dtype| {
            let found = variant_weight_files(&src, "net", "net", "diffusion_pytorch_model", dtype).unwrap();
            found
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(files(DType::F32), [names[0]]);
        assert_eq!(files(DType::BF16), [names[1]]);
        assert_eq!(files(DType::F16), [names[2], names[3]]);
        std::fs::remove_file(net.join(names[1])).unwrap();
        assert_eq!(
            files(DType::BF16),
            [names[0]],
            "a variant the folder lacks: the plain files"
        );
    }
}
