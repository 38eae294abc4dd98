//! Weight quantisation: ggml block formats (for GGUF export) and MLX affine quantisation.
//!
//! The ggml side reproduces ggml's *reference* quantisers byte for byte: `quantize_row_*_ref`
//! in `ggml/src/ggml-quants.c`, which is what `llama-quantize` runs when it is given no
//! importance matrix. Byte identity matters because users compare our GGUF files with the ones
//! llama.cpp makes, and because it lets us test against ggml itself rather than against a story
//! of what ggml does. So the arithmetic below follows the C code operation by operation, in
//! `f32` wherever C uses `float`, with the same rounding helpers (`nearest_int`'s magic-number
//! trick, `roundf`, truncating casts) and the same evaluation order.
//!
//! Two deliberate departures, both refusals rather than different bytes:
//! - NaN and ±infinity are rejected (ggml quantises them into garbage without a word).
//! - A block whose f16 scale (or an F16/BF16 value) would overflow to infinity is rejected
//!   ([`QuantError::TooLarge`]); ggml would write an infinite scale.
//!
//! "ggml's bytes" means those of an x86-64 build, which is what llama.cpp ships: there C's
//! out-of-range float-to-int conversions give `cvttss2si`'s value (only reachable for blocks
//! whose largest magnitude is below about 1e-37), and no multiply-add is fused (ggml-base is
//! built for baseline x86-64, without FMA). An aarch64 build of ggml may contract `a*b + c` into
//! fused multiply-adds and pick a different K-quant scale now and then; Rust never fuses.
//!
//! Layout: `legacy` holds the 32-element formats (Q4_0 … Q8_0) and the plain float
//! conversions, `kquants` the 256-element super-block formats, [`mlx`] MLX's affine format.

use rayon::prelude::*;

mod kquants;
mod legacy;
pub mod affine;
pub mod mlx;

#[cfg(test)]
mod tests;

/// Elements in a K-quant super-block (ggml's `QK_K`).
pub(crate) const QK_K: usize = 256;
/// Elements in a legacy block (ggml's `QK4_0`, `QK4_1`, `QK5_0`, `QK5_1`, `QK8_0`).
pub(crate) const QK: usize = 32;

/// A ggml tensor type that kiln can write. The discriminants are not used; [`GgmlType::id`]
/// gives ggml's enum value.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

impl GgmlType {
    /// Every supported type, in ggml enum order.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// ggml's `enum ggml_type` value, as stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The type with ggml enum value `id`, if kiln supports it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The type's name as llama.cpp users write it ("Q4_K", "F16", ...). ggml's own
    /// `ggml_type_name` spells the same names in lower case except the K ("q4_K").
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block (ggml's `blck_size`).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => QK,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block (ggml's `sizeof(block_xxx)`, its `type_size`).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => legacy::Q4_0_BYTES,
            GgmlType::Q4_1 => legacy::Q4_1_BYTES,
            GgmlType::Q5_0 => legacy::Q5_0_BYTES,
            GgmlType::Q5_1 => legacy::Q5_1_BYTES,
            GgmlType::Q8_0 => legacy::Q8_0_BYTES,
            GgmlType::Q4_K => kquants::Q4_K_BYTES,
            GgmlType::Q5_K => kquants::Q5_K_BYTES,
            GgmlType::Q6_K => kquants::Q6_K_BYTES,
        }
    }

    /// Bytes taken by `n` elements (ggml's `ggml_row_size`). `n` must be a multiple of
    /// [`block_size`](Self::block_size); a partial block is not counted.
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// Parses a type name, case-insensitively ("q4_k", "Q8_0", "bf16").
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// Whether the type is a block quantisation (as opposed to a plain float format).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a tensor could not be quantised or dequantised.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("value {value} at row {row}, column {col} cannot be quantised; the weights contain NaN or infinity")]
    NonFinite { row: usize, col: usize, value: f32 },

    #[error("row of {n} values is not a multiple of the {ty} block size {block}")]
    BadRowLength { ty: &'static str, n: usize, block: usize },

    #[error("{ty} data for {n} values must be {expected} bytes long, but {got} bytes were given")]
    BadLength { ty: &'static str, n: usize, expected: usize, got: usize },

    #[error("{len} values cannot be split into rows of {n_per_row}")]
    BadDataLength { len: usize, n_per_row: usize },

    #[error("{}", too_large_message(.ty, *.row, *.col, *.value))]
    TooLarge { ty: &'static str, row: usize, col: usize, value: f32 },

    #[error("the quantised kernels run GGUF Q8_0, Q4_0 and Q4_K, not {ty}")]
    UnsupportedKernelType { ty: &'static str },

    #[error("MLX quantisation supports 2, 3, 4, 5, 6 or 8 bits, not {bits}")]
    UnsupportedBits { bits: u32 },

    #[error("MLX quantisation supports group sizes 32, 64 and 128, not {group_size}")]
    UnsupportedGroupSize { group_size: usize },

    #[error("row of {cols} values is not a multiple of the MLX group size {group_size}")]
    BadGroupLength { cols: usize, group_size: usize },

    #[error("{len} values do not make a {rows} x {cols} matrix")]
    BadShape { len: usize, rows: usize, cols: usize },

    #[error(
        "MLX {what} holds {got} entries, but a {rows} x {cols} matrix at {bits} bits with groups of {group_size} needs {expected}"
    )]
    BadMlxPart {
        what: &'static str,
        got: usize,
        expected: usize,
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
    },
}

fn too_large_message(ty: &str, row: usize, col: usize, value: f32) -> String {
    let why = match ty {
        "F16" => "it would overflow f16 (largest finite value 65504); store this tensor as BF16 or F32 instead",
        "BF16" => "it would overflow bfloat16 (largest finite value about 3.39e38); store this tensor as F32 instead",
        _ => {
            "the block's scale would overflow f16 (largest finite value 65504); store this tensor as BF16 or F32 instead"
        }
    };
    format!("value {value} at row {row}, column {col} is too large for {ty}: {why}")
}

/// Quantises `data` (row-major, rows of `n_per_row` values) into ggml's `ty` format, rows in
/// parallel. Each row is quantised independently, so the result is the concatenation of
/// `ty.row_bytes(n_per_row)`-byte rows, exactly as ggml's `ggml_quantize_chunk` with no
/// importance matrix writes them.
///
/// Rejects NaN and ±infinity, rows that are not a whole number of blocks, and values so large
/// that a block scale would overflow f16.
pub fn quantize(ty: GgmlType, data: &[f32], n_per_row: usize) -> Result<Vec<u8>, QuantError> {
    if n_per_row == 0 || !data.len().is_multiple_of(n_per_row) {
        return Err(QuantError::BadDataLength { len: data.len(), n_per_row });
    }
    let block = ty.block_size();
    if !n_per_row.is_multiple_of(block) {
        return Err(QuantError::BadRowLength { ty: ty.name(), n: n_per_row, block });
    }

    // Find the first (row-major) non-finite value, so that the error names the same value
    // however rayon splits the work.
    let bad = data.par_chunks(n_per_row).enumerate().find_map_first(|(row, values)| {
        values.iter().position(|v| !v.is_finite()).map(|col| QuantError::NonFinite { row, col, value: values[col] })
    });
    if let Some(err) = bad {
        return Err(err);
    }

    let row_bytes = ty.row_bytes(n_per_row);
    let mut out = vec![0u8; data.len() / n_per_row * row_bytes];
    let overflow = out
        .par_chunks_mut(row_bytes)
        .zip(data.par_chunks(n_per_row))
        .enumerate()
        .map(|(row, (dst, src))| {
            quantize_row(ty, src, dst);
            check_overflow(ty, row, src, dst)
        })
        .find_map_first(|r| r.err());
    match overflow {
        Some(err) => Err(err),
        None => Ok(out),
    }
}

/// Quantises one row (a whole number of blocks) into `dst` (exactly `ty.row_bytes(src.len())`
/// bytes).
fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    match ty {
        GgmlType::F32 => legacy::f32_row(src, dst),
        GgmlType::F16 => legacy::f16_row(src, dst),
        GgmlType::BF16 => legacy::bf16_row(src, dst),
        GgmlType::Q4_0 => legacy::quantize_q4_0(src, dst),
        GgmlType::Q4_1 => legacy::quantize_q4_1(src, dst),
        GgmlType::Q5_0 => legacy::quantize_q5_0(src, dst),
        GgmlType::Q5_1 => legacy::quantize_q5_1(src, dst),
        GgmlType::Q8_0 => legacy::quantize_q8_0(src, dst),
        GgmlType::Q4_K => kquants::quantize_q4_k(src, dst),
        GgmlType::Q5_K => kquants::quantize_q5_k(src, dst),
        GgmlType::Q6_K => kquants::quantize_q6_k(src, dst),
    }
}

/// Byte offsets, within one block, of the block's 16-bit float fields (scales, or the value
/// itself for F16 and BF16).
fn half_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::F32 => &[],
        GgmlType::BF16 => &[0],
        GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[kquants::Q6_K_D_OFFSET],
    }
}

/// After quantising a row: refuses it if a block's f16 scale (or an F16/BF16 value) came out
/// infinite, naming the largest-magnitude value of that block as the culprit.
fn check_overflow(ty: GgmlType, row: usize, src: &[f32], dst: &[u8]) -> Result<(), QuantError> {
    let fields = half_fields(ty);
    if fields.is_empty() {
        return Ok(());
    }
    // Exponent bits all ones: infinity (or NaN).
    let exponent_mask: u16 = if ty == GgmlType::BF16 { 0x7f80 } else { 0x7c00 };
    let (block, size) = (ty.block_size(), ty.type_size());
    for (b, bytes) in dst.chunks_exact(size).enumerate() {
        let overflowed = fields.iter().any(|&off| {
            let bits = u16::from_le_bytes([bytes[off], bytes[off + 1]]);
            bits & exponent_mask == exponent_mask
        });
        if overflowed {
            let values = &src[b * block..(b + 1) * block];
            let mut col = 0;
            for (i, v) in values.iter().enumerate() {
                if v.abs() > values[col].abs() {
                    col = i;
                }
            }
            return Err(QuantError::TooLarge { ty: ty.name(), row, col: b * block + col, value: values[col] });
        }
    }
    Ok(())
}

/// Dequantises `n` values stored in ggml's `ty` format, exactly as ggml's `dequantize_row_*`
/// (or its f16/bf16-to-f32 conversion) does. `bytes` must be exactly `ty.row_bytes(n)` long.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    let block = ty.block_size();
    if !n.is_multiple_of(block) {
        return Err(QuantError::BadRowLength { ty: ty.name(), n, block });
    }
    let expected = ty.row_bytes(n);
    if bytes.len() != expected {
        return Err(QuantError::BadLength { ty: ty.name(), n, expected, got: bytes.len() });
    }
    let mut out = vec![0f32; n];
    // Work in pieces of whole blocks (about 64K values each) so rayon has something to split.
    let blocks_per_piece = (1 << 16) / block;
    out.par_chunks_mut(blocks_per_piece * block)
        .zip(bytes.par_chunks(blocks_per_piece * ty.type_size()))
        .for_each(|(dst, src)| dequantize_blocks(ty, src, dst));
    Ok(out)
}

/// Dequantises whole blocks: `src` is `dst.len() / block_size` blocks.
fn dequantize_blocks(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => legacy::dequantize_f32(src, dst),
        GgmlType::F16 => legacy::dequantize_f16(src, dst),
        GgmlType::BF16 => legacy::dequantize_bf16(src, dst),
        GgmlType::Q4_0 => legacy::dequantize_q4_0(src, dst),
        GgmlType::Q4_1 => legacy::dequantize_q4_1(src, dst),
        GgmlType::Q5_0 => legacy::dequantize_q5_0(src, dst),
        GgmlType::Q5_1 => legacy::dequantize_q5_1(src, dst),
        GgmlType::Q8_0 => legacy::dequantize_q8_0(src, dst),
        GgmlType::Q4_K => kquants::dequantize_q4_k(src, dst),
        GgmlType::Q5_K => kquants::dequantize_q5_k(src, dst),
        GgmlType::Q6_K => kquants::dequantize_q6_k(src, dst),
    }
}

/// ggml's `GGML_FP32_TO_FP16`: round to nearest, ties to even (what `half` does, in software
/// or with F16C). NaN never reaches it here: [`quantize`] rejects non-finite input.
#[inline]
pub(crate) fn f32_to_f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// ggml's `GGML_FP16_TO_FP32`: exact.
#[inline]
pub(crate) fn f16_bits_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Reads the little-endian f16 at `bytes[off..off + 2]` as f32.
#[inline]
pub(crate) fn read_f16(bytes: &[u8], off: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([bytes[off], bytes[off + 1]]))
}

/// Writes `x` rounded to f16, little-endian, at `bytes[off..off + 2]`.
#[inline]
pub(crate) fn write_f16(bytes: &mut [u8], off: usize, x: f32) {
    bytes[off..off + 2].copy_from_slice(&f32_to_f16_bits(x).to_le_bytes());
}
