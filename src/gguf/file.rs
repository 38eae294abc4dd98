//! The GGUF v3 container: typed metadata, tensor infos and an aligned data section.
//!
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv × (string:key u32:type value)
//! n_tensors × (string:name u32:n_dims u64:ne[n_dims] u32:ggml_type u64:offset)
//! padding to `general.alignment` (default 32)
//! data: each tensor at its offset (relative to the data start), each offset aligned
//! ```
//! Strings are a u64 byte length and UTF-8 bytes; dims are in ggml order (`ne[0]` is the
//! row length, so an HF `[out, in]` weight is written `[in, out]`). Everything little-endian.
//!
//! The writer streams: the header is computed from the tensor plan up front, then each
//! tensor's bytes are produced and written one at a time, into a temporary file that is
//! renamed into place only when complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::quant::{self, GgmlType};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a GGUF file (it starts with {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path}: GGUF version {version} is not supported (kiln reads versions 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt: {what} at byte {offset}")]
    Corrupt { path: PathBuf, what: String, offset: u64 },
    #[error("{path}: tensor `{name}` has ggml type {id}, which kiln does not know")]
    UnknownType { path: PathBuf, name: String, id: u32 },
    #[error("no tensor named `{0}` in the file")]
    NoTensor(String),
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error(transparent)]
    Quant(#[from] quant::QuantError),
}

/// The type tag of a metadata value, as numbered by the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }
}

/// A metadata value. Arrays are homogeneous and carry their element type, so an empty array
/// still round-trips.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
        Value::Array(ValueType::String, items.into_iter().map(|s| Value::String(s.into())).collect())
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// JSON for `kiln inspect --json`. Long arrays (vocabularies) are summarised unless `full`.
    pub fn to_json(&self, full: bool) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::U8(v) => json!(v),
            Value::I8(v) => json!(v),
            Value::U16(v) => json!(v),
            Value::I16(v) => json!(v),
            Value::U32(v) => json!(v),
            Value::I32(v) => json!(v),
            Value::U64(v) => json!(v),
            Value::I64(v) => json!(v),
            Value::F32(v) => json!(v),
            Value::F64(v) => json!(v),
            Value::Bool(v) => json!(v),
            Value::String(s) => json!(s),
            Value::Array(_, items) if full || items.len() <= 16 => {
                serde_json::Value::Array(items.iter().map(|v| v.to_json(full)).collect())
            }
            Value::Array(ty, items) => json!({
                "type": format!("{ty:?}").to_lowercase(),
                "len": items.len(),
                "first": items.iter().take(8).map(|v| v.to_json(full)).collect::<Vec<_>>(),
            }),
        }
    }

    /// One line for the text listing.
    pub fn short(&self) -> String {
        match self {
            Value::String(s) => {
                let one_line = s.replace('\n', "\\n");
                let cut: String = one_line.chars().take(72).collect();
                if cut.len() < one_line.len() { format!("{cut:?}…") } else { format!("{cut:?}") }
            }
            Value::Array(ty, items) => {
                let head: Vec<String> = items.iter().take(4).map(|v| v.short()).collect();
                let more = if items.len() > 4 { ", …" } else { "" };
                format!("[{}{more}] ({} × {ty:?})", head.join(", "), items.len())
            }
            other => other.to_json(false).to_string(),
        }
    }
}

/// Where one tensor lives in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the number of elements in a row.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn byte_len(&self) -> u64 {
        let row = self.dims.first().copied().unwrap_or(1) as usize;
        let rows = self.elements() / (row.max(1) as u64);
        rows * self.ty.row_bytes(row) as u64
    }
}

/// A GGUF file opened for reading; tensor data stays memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    map: Mmap,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: read-only map; another process truncating the file under us is outside what
        // any reader can defend against, and every access below is bounds-checked.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut r = Reader { bytes: &map, pos: 0, path };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { path: path.to_path_buf(), found: String::from_utf8_lossy(magic).into_owned() });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version { path: path.to_path_buf(), version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        let mut metadata = Vec::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.value_type(&key)?;
            let value = r.value(ty, &key, 0)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dims")?;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.corrupt(format!("tensor `{name}` has {n_dims} dimensions (ggml allows 1 to 4)")));
            }
            let dims = (0..n_dims).map(|_| r.u64("tensor dim")).collect::<Result<Vec<_>, _>>()?;
            let id = r.u32("tensor type")?;
            let ty = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownType { path: path.to_path_buf(), name: name.clone(), id })?;
            let offset = r.u64("tensor offset")?;
            tensors.push(TensorInfo { name, dims, ty, offset });
        }
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two())
            .unwrap_or(DEFAULT_ALIGNMENT);
        let data_offset = align(r.pos as u64, alignment);
        let file = Self { path: path.to_path_buf(), version, metadata, tensors, alignment, data_offset, map };
        for t in &file.tensors {
            let row = t.dims[0] as usize;
            if row % t.ty.block_size() != 0 {
                return Err(GgufError::Tensor { name: t.name.clone(), message: format!("row of {row} is not a multiple of the {} block size {}", t.ty.name(), t.ty.block_size()) });
            }
            // Dims come from the file: a crafted one must not overflow the size arithmetic.
            let elements = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let bytes = elements.and_then(|e| (e / (row.max(1) as u64)).checked_mul(t.ty.row_bytes(row) as u64));
            let end = bytes.and_then(|b| file.data_offset.checked_add(t.offset)?.checked_add(b));
            let Some(end) = end else {
                return Err(GgufError::Tensor { name: t.name.clone(), message: format!("dims {:?} are too large to be a tensor", t.dims) });
            };
            if end > file.map.len() as u64 {
                return Err(GgufError::Corrupt { path: path.to_path_buf(), what: format!("tensor `{}` ends past the end of the file ({} bytes)", t.name, file.map.len()), offset: end });
            }
        }
        Ok(file)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of a tensor (quantised blocks, or plain floats).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.map[start..start + info.byte_len() as usize]
    }

    /// A tensor's values as f32, dequantised exactly as ggml does.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::NoTensor(name.to_string()))?;
        Ok(quant::dequantize(info.ty, self.tensor_bytes(info), info.elements() as usize)?)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt { path: self.path.to_path_buf(), what, offset: self.pos as u64 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            None => Err(self.corrupt(format!("{what} runs past the end of the file"))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| self.corrupt(format!("{what} has length {len}")))?;
        let bytes = self.take(len, what)?;
        // Real vocabularies hold invalid UTF-8 only by mistake; keep going with a lossy copy.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufError> {
        let raw = self.u32("value type")?;
        ValueType::from_u32(raw).ok_or_else(|| self.corrupt(format!("metadata `{key}` has unknown value type {raw}")))
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(key)?[0] != 0),
            ValueType::String => Value::String(self.string(key)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => {
                if depth > 2 {
                    return Err(self.corrupt(format!("metadata `{key}` nests arrays too deeply")));
                }
                let elem = self.value_type(key)?;
                let len = self.u64(key)?;
                // Each element takes at least one byte: a bigger count is corruption, not a
                // reason to allocate.
                if len > (self.bytes.len() - self.pos) as u64 {
                    return Err(self.corrupt(format!("metadata `{key}` claims {len} array elements")));
                }
                let items = (0..len).map(|_| self.value(elem, key, depth + 1)).collect::<Result<Vec<_>, _>>()?;
                Value::Array(elem, items)
            }
        })
    }
}

pub fn align(offset: u64, alignment: u64) -> u64 {
    offset.div_ceil(alignment) * alignment
}

/// One tensor the writer will write: its name, ggml-order dims and type.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// Writes a GGUF file: `metadata` in order, then the tensors of `plan`, whose bytes
/// `produce(i)` returns one at a time (so only one converted tensor is in memory). The file
/// appears at `path` only once complete.
pub fn write<E>(
    path: &Path,
    metadata: &[(String, Value)],
    plan: &[TensorPlan],
    mut produce: impl FnMut(usize) -> Result<Vec<u8>, E>,
) -> Result<(), E>
where
    E: From<GgufError>,
{
    let io = |source| GgufError::Io { path: path.to_path_buf(), source };
    let alignment = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(DEFAULT_ALIGNMENT);
    let tmp = crate::fsutil::temp_beside(path).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file());

    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(plan.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        put_value(&mut header, value);
    }
    let mut offsets = Vec::with_capacity(plan.len());
    let mut offset = 0u64;
    for t in plan {
        let info = TensorInfo { name: t.name.clone(), dims: t.dims.clone(), ty: t.ty, offset };
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offsets.push((offset, info.byte_len()));
        offset = align(offset + info.byte_len(), alignment);
    }
    header.resize(align(header.len() as u64, alignment) as usize, 0);
    out.write_all(&header).map_err(io)?;

    let mut written = 0u64;
    for (i, t) in plan.iter().enumerate() {
        let (start, len) = offsets[i];
        let bytes = produce(i)?;
        if bytes.len() as u64 != len {
            return Err(GgufError::Tensor { name: t.name.clone(), message: format!("produced {} bytes, the plan says {len}", bytes.len()) }.into());
        }
        out.write_all(&vec![0u8; (start - written) as usize]).map_err(io)?;
        out.write_all(&bytes).map_err(io)?;
        written = start + len;
    }
    // Pad after the last tensor too, as llama.cpp's writers do.
    out.write_all(&vec![0u8; (align(written, alignment) - written) as usize]).map_err(io)?;
    out.flush().map_err(io)?;
    drop(out);
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(*v as u8),
        Value::String(s) => put_string(out, s),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Array(ty, items) => {
            out.extend_from_slice(&(*ty as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}
