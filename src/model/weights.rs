//! Reading and writing Hugging Face safetensors: one file or a sharded index.
//!
//! Tensors are memory-mapped and converted to f32 one at a time, so loading never holds two
//! copies of the checkpoint. Every way a file can be wrong (truncated, a shard outside the
//! model directory, a missing or mis-shaped tensor, an unsupported dtype) is a [`ModelError`]
//! naming the file and tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use kiln_kernels::host::HostQuant;
use kiln_kernels::Affine;

use super::ModelError;

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// The safetensors files of one model directory, indexed by tensor name.
pub struct WeightFiles {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl WeightFiles {
    /// Opens `dir/model.safetensors` or, failing that, the shards listed in
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            shard_paths(dir, &index_path)?
        } else {
            return Err(ModelError::NoWeights { dir: dir.to_path_buf() });
        };
        Self::open_files(&files)
    }

    /// Opens the given safetensors files as one collection.
    pub fn open_files(files: &[PathBuf]) -> Result<Self, ModelError> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
            // SAFETY: the map is read-only; a file changed by another process while we read it
            // gives wrong numbers, not memory unsafety in our code (we copy out of it at once).
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), source })?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| ModelError::BadSafetensors {
                path: path.clone(),
                message: describe_safetensors_error(&e),
            })?;
            for name in metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard { path: path.clone(), map, data_start: 8 + header_len, metadata });
        }
        Ok(Self { shards, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The stored dtype of a tensor (`F32`, `BF16`, ...).
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.info(name).map(|(_, info)| info.dtype)
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|(_, info)| info.shape.clone())
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.index.get(name)?];
        Some((shard, shard.metadata.info(name)?))
    }

    /// The tensor `name` as f32, checked against `expected` shape. A matrix the checkpoint
    /// stores MLX-quantised is dequantised.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        if let [n, k] = *expected {
            if let Some(q) = self.mlx_quantized(name, n, k)? {
                return Ok(q.dequantize());
            }
        }
        let (shard, info) = self.info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            expected: expected.to_vec(),
        })?;
        if info.shape != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                path: shard.path.clone(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + start..shard.data_start + end];
        bytes_to_f32(bytes, info.dtype).ok_or_else(|| ModelError::UnsupportedDtype {
            name: name.to_string(),
            path: shard.path.clone(),
            dtype: format!("{:?}", info.dtype),
        })
    }

    /// The matrix `name` (`[n, k]` as floats) if the checkpoint stores it as mlx-lm does:
    /// `name` packed uint32 `[n, k·bits/32]` beside `{base}.scales` and `{base}.biases`
    /// `[n, k/group]`. Bits and group follow from those shapes.
    pub fn mlx_quantized(&self, name: &str, n: usize, k: usize) -> Result<Option<HostQuant>, ModelError> {
        let base = name.strip_suffix(".weight").unwrap_or(name);
        let (scales, biases) = (format!("{base}.scales"), format!("{base}.biases"));
        let Some((shard, info)) = self.info(name) else { return Ok(None) };
        if info.dtype != Dtype::U32 || !self.contains(&scales) {
            return Ok(None);
        }
        let bad = |message: String| ModelError::BadSafetensors { path: shard.path.clone(), message: format!("tensor `{name}`: {message}") };
        let (cols, groups) = match (info.shape.as_slice(), self.shape(&scales).as_deref()) {
            ([rows, cols], Some([srows, groups])) if *rows == n && *srows == n && *cols > 0 && *groups > 0 => (*cols, *groups),
            (found, s) => return Err(bad(format!("quantised as {found:?} with scales {s:?}, expected {n} rows of {k} weights"))),
        };
        let bits = (cols * 32 / k.max(1)) as u32;
        let group = k / groups;
        if !matches!(bits, 4 | 8) || cols * 32 != k * bits as usize || group * groups != k || !matches!(group, 32 | 64 | 128) {
            return Err(bad(format!("{cols} words and {groups} groups per row do not describe {k} weights at 4 or 8 bits in groups of 32, 64 or 128")));
        }
        let (start, end) = info.data_offsets;
        let bytes = &shard.map[shard.data_start + start..shard.data_start + end];
        let words = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let scales = self.f32(&scales, &[n, groups])?;
        let biases = self.f32(&biases, &[n, groups])?;
        Ok(Some(HostQuant { n, k, format: Affine { bits, group: group as u32 }, words, scales, biases }))
    }

    /// A tensor's stored bytes as they are (packed integers of a quantised checkpoint).
    pub fn raw_bytes(&self, name: &str) -> Option<&[u8]> {
        let (shard, info) = self.info(name)?;
        let (start, end) = info.data_offsets;
        shard.map.get(shard.data_start + start..shard.data_start + end)
    }

    /// The dtype most tensors are stored in, for `kiln inspect`.
    pub fn main_dtype(&self) -> Option<String> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for shard in &self.shards {
            for info in shard.metadata.tensors().values() {
                *counts.entry(format!("{:?}", info.dtype)).or_default() += info.shape.iter().product::<usize>();
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}

/// Shard file names from an index, each checked to stay inside the model directory.
fn shard_paths(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let text = std::fs::read_to_string(index_path)
        .map_err(|source| ModelError::Io { path: index_path.to_path_buf(), source })?;
    let bad = |message: String| ModelError::BadSafetensors { path: index_path.to_path_buf(), message };
    let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
        let rel = Path::new(file);
        let escapes = rel.is_absolute()
            || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if escapes {
            return Err(ModelError::ShardOutsideModel {
                index: index_path.to_path_buf(),
                shard: file.to_string(),
            });
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer | E::InvalidHeaderLength | E::HeaderTooSmall | E::HeaderTooLarge | E::InvalidHeader(_) | E::InvalidHeaderStart | E::InvalidHeaderDeserialization(_) | E::InvalidOffset(_) | E::TensorInvalidInfo | E::ValidationOverflow => {
            format!("not a safetensors file, or truncated or corrupt ({e:?})")
        }
        other => format!("{other:?}"),
    }
}

/// Where the weights come from: the checkpoint's files, or tensors already in memory (an
/// adapter fused on the fly).
pub enum TensorSource {
    Files(WeightFiles),
    Memory(HashMap<String, (Vec<usize>, Vec<f32>)>),
}

impl TensorSource {
    pub fn from_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Self {
        TensorSource::Memory(tensors.into_iter().map(|(n, s, d)| (n, (s, d))).collect())
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            TensorSource::Files(f) => f.names().map(str::to_string).collect(),
            TensorSource::Memory(m) => m.keys().cloned().collect(),
        };
        names.sort();
        names
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            TensorSource::Files(f) => f.shape(name),
            TensorSource::Memory(m) => m.get(name).map(|(s, _)| s.clone()),
        }
    }

    pub fn load(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let shape = self.shape(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), expected: vec![] })?;
        match self {
            TensorSource::Files(f) => f.f32(name, &shape),
            TensorSource::Memory(m) => Ok(m[name].1.clone()),
        }
    }
}


/// Converts little-endian stored values to f32; `None` for dtypes a float weight cannot have.
pub fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        _ => return None,
    };
    Some(out)
}

/// Writes f32 tensors as one safetensors file, through a temporary name and a rename.
pub fn save_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<(), ModelError> {
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, shape, data)| RawTensor { name: name.clone(), dtype: Dtype::F32, shape: shape.clone(), bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect() })
        .collect();
    save_raw(path, &raw, None)
}

/// A tensor already encoded in its dtype's little-endian bytes.
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// f32 values stored as `dtype` (F32, F16 or BF16; rounding to nearest even).
    pub fn from_f32(name: String, shape: Vec<usize>, data: &[f32], dtype: Dtype) -> Self {
        let bytes = match dtype {
            Dtype::F16 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            Dtype::BF16 => data.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            _ => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let dtype = if matches!(dtype, Dtype::F16 | Dtype::BF16) { dtype } else { Dtype::F32 };
        Self { name, dtype, shape, bytes }
    }
}

/// Writes tensors of any dtype (and optional header metadata) as one safetensors file,
/// through a temporary name and a rename.
pub fn save_raw(path: &Path, tensors: &[RawTensor], metadata: Option<HashMap<String, String>>) -> Result<(), ModelError> {
    let bad = |e: safetensors::SafeTensorError| ModelError::BadSafetensors { path: path.to_path_buf(), message: format!("{e:?}") };
    let views = tensors
        .iter()
        .map(|t| safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map(|v| (t.name.clone(), v)).map_err(bad))
        .collect::<Result<Vec<_>, _>>()?;
    let data = safetensors::serialize(views, metadata).map_err(bad)?;
    crate::fsutil::write_atomic(path, &data).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}
