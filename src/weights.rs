//! Memory-mapped safetensors behind a candle `VarBuilder`, with errors that name the
//! component, the file and the key. Tensors are copied to the device in their stored dtype
//! and converted there (on a GPU the conversion is a kernel, not a CPU loop).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::error::ModelError;

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// One component's weights (one or several safetensors files).
pub struct Weights {
    component: String,
    files: Vec<MappedFile>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
}

impl Weights {
    /// Maps the files and reads their headers. A truncated or corrupt file fails here, naming it.
    pub fn open(component: &str, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| ModelError::BadFile {
                component: component.to_string(),
                path: path.clone(),
                message: e.to_string(),
            })?;
            // SAFETY: the file is only read; a concurrent writer would be a user error that the
            // header and size checks below make unlikely to go unnoticed.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::BadFile {
                component: component.to_string(),
                path: path.clone(),
                message: format!("cannot map: {e}"),
            })?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::BadFile {
                component: component.to_string(),
                path: path.clone(),
                message: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            })?;
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
        let bad = |message: String| {
            candle_core::Error::wrap(ModelError::BadFile {
                component: self.component.clone(),
                path: file.path.clone(),
                message,
            })
        };
        let stored =
            DType::try_from(info.dtype).map_err(|e| bad(format!("tensor `{name}`: unsupported dtype: {e}")))?;
        if !stored.is_float() {
            return Err(bad(format!("tensor `{name}` has dtype {stored:?}, expected a float")));
        }
        let (start, end) = info.data_offsets;
        let bytes = file
            .mmap
            .get(file.data_start + start..file.data_start + end)
            .ok_or_else(|| bad(format!("tensor `{name}` lies outside the file")))?;
        Tensor::from_raw_buffer(bytes, stored, &info.shape, dev)?.to_dtype(dtype)
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

/// The weight files of a diffusers component folder: `<stem>.safetensors`, or the shards
/// listed in `<stem>.safetensors.index.json`. `component` names it in errors.
pub fn component_weight_files(
    src: &dyn crate::hub::FileSource,
    folder: &str,
    component: &str,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    let missing = |rel: &str| ModelError::MissingFile {
        component: component.to_string(),
        path: Path::new(&src.describe()).join(rel),
    };
    let single = join(folder, &format!("{stem}.safetensors"));
    if let Some(path) = src.get(&single)? {
        return Ok(vec![path]);
    }
    let Some(index_path) = src.get(&format!("{single}.index.json"))? else {
        return Err(missing(&single).into());
    };
    #[derive(serde::Deserialize)]
    struct ShardIndex {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let index: ShardIndex = serde_json::from_str(&text).map_err(|e| ModelError::BadFile {
        component: component.to_string(),
        path: index_path.clone(),
        message: e.to_string(),
    })?;
    let mut shards: Vec<&String> = index.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    shards
        .into_iter()
        .map(|shard| {
            let rel = join(folder, shard);
            src.get(&rel)?.ok_or_else(|| missing(&rel).into())
        })
        .collect()
}
