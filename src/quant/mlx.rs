//! MLX's affine quantisation (`mx.quantize(w, group_size, bits)` with the default "affine"
//! mode), as `mlx-lm convert -q` writes it.
//!
//! Each group of `group_size` consecutive values in a row gets a scale and a bias, and each
//! value becomes `q = clip(rint((w - bias) / scale), 0, 2^bits - 1)`, read back as
//! `scale * q + bias`. This follows MLX's CPU kernel (`quantize` in
//! `mlx/backend/cpu/quantized.cpp`), which agrees with the op-by-op fallback in
//! `affine_quantize` (`mlx/ops.cpp`):
//! - the group's endpoint of larger magnitude (`edge`) is stored exactly, as the bias, so one
//!   end of the grid sits on it; the scale is negative when that endpoint is the maximum, so the
//!   levels always count up from the edge;
//! - the scale starts at `max((max - min) / (2^bits - 1), 1e-7)` and is then adjusted to
//!   `edge / q0`, `q0 = rint(edge / scale)`, so that the grid also passes through zero
//!   (`-edge / scale` is the whole number `-q0`): zero weights stay exactly zero. When q0 is
//!   0 (a group of zeros) the bias is 0 and the scale stays as it was;
//! - rounding is `rint` (ties to even), in f32.
//!
//! Packing: each row's levels form a little-endian bit stream, value j at bit `j * bits`, read
//! as u32 words: value j lies in word `j * bits / 32` from bit `(j * bits) % 32` (for 3, 5 and
//! 6 bits a value may continue into the next word). This is MLX's layout for every bit width:
//! for 2, 4 and 8 bits it packs u32 words directly, for 3, 5 and 6 it packs bytes, which on a
//! little-endian machine is the same stream.
//!
//! MLX stores scales and biases in the weight's dtype (often f16 or bf16) after computing them
//! in f32; here they stay f32 and the caller converts. MLX's Metal (GPU) kernel differs from
//! the CPU kernel in corner cases (it starts the max at 0 and rounds halves away from zero), so
//! files converted on a Mac's GPU can differ in a few levels from these.

use rayon::prelude::*;

use super::QuantError;

/// An MLX affine-quantised matrix, laid out as MLX stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct MlxQuantized {
    /// Packed levels, shape `[rows, cols * bits / 32]`, row-major.
    pub weight: Vec<u32>,
    /// One scale per group, shape `[rows, cols / group_size]`.
    pub scales: Vec<f32>,
    /// One bias per group, shape `[rows, cols / group_size]`.
    pub biases: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
}

const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
const SUPPORTED_GROUPS: [usize; 3] = [32, 64, 128];

fn check_params(cols: usize, bits: u32, group_size: usize) -> Result<(), QuantError> {
    if !SUPPORTED_BITS.contains(&bits) {
        return Err(QuantError::UnsupportedBits { bits });
    }
    if !SUPPORTED_GROUPS.contains(&group_size) {
        return Err(QuantError::UnsupportedGroupSize { group_size });
    }
    if !cols.is_multiple_of(group_size) {
        return Err(QuantError::BadGroupLength { cols, group_size });
    }
    Ok(())
}

/// Quantises a row-major `rows x cols` matrix the way MLX's `quantize` does with the affine
/// mode, rows in parallel. `bits` is 2, 3, 4, 5, 6 or 8; `group_size` 32, 64 or 128 and must
/// divide `cols`. NaN and ±infinity are rejected.
pub fn quantize(
    data: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: usize,
) -> Result<MlxQuantized, QuantError> {
    check_params(cols, bits, group_size)?;
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(QuantError::BadShape { len: data.len(), rows, cols });
    }
    let words_per_row = cols * bits as usize / 32;
    let groups_per_row = cols / group_size;
    let mut q = MlxQuantized {
        weight: vec![0u32; rows * words_per_row],
        scales: vec![0.0; rows * groups_per_row],
        biases: vec![0.0; rows * groups_per_row],
        rows,
        cols,
        bits,
        group_size,
    };
    if data.is_empty() {
        return Ok(q);
    }

    let bad = data.par_chunks(cols).enumerate().find_map_first(|(row, values)| {
        values.iter().position(|v| !v.is_finite()).map(|col| QuantError::NonFinite { row, col, value: values[col] })
    });
    if let Some(err) = bad {
        return Err(err);
    }

    q.weight
        .par_chunks_mut(words_per_row)
        .zip(q.scales.par_chunks_mut(groups_per_row))
        .zip(q.biases.par_chunks_mut(groups_per_row))
        .zip(data.par_chunks(cols))
        .for_each(|(((words, scales), biases), row)| {
            quantize_row(row, words, scales, biases, bits, group_size);
        });
    Ok(q)
}

/// C++'s `std::max(a, b)`: `a < b ? b : a` (differs from `f32::max` only for signed zeros).
fn cpp_max(a: f32, b: f32) -> f32 {
    if a < b { b } else { a }
}

/// C++'s `std::min(a, b)`: `b < a ? b : a`.
fn cpp_min(a: f32, b: f32) -> f32 {
    if b < a { b } else { a }
}

/// Scale and bias of one group, exactly as MLX's CPU kernel computes them.
pub(crate) fn group_params(values: &[f32], bits: u32) -> (f32, f32) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    let eps = 1e-7f32;
    let mut w_min = f32::INFINITY;
    let mut w_max = -w_min;
    for &v in values {
        w_max = cpp_max(w_max, v);
        w_min = cpp_min(w_min, v);
    }
    let mask = w_min.abs() > w_max.abs();
    let mut scale = cpp_max((w_max - w_min) / n_bins, eps);
    if !mask {
        scale = -scale;
    }
    let edge = if mask { w_min } else { w_max };
    let q0 = (edge / scale).round_ties_even();
    let mut bias = 0.0f32;
    if q0 != 0.0 {
        scale = edge / q0;
        bias = edge;
    }
    (scale, bias)
}

fn quantize_row(row: &[f32], words: &mut [u32], scales: &mut [f32], biases: &mut [f32], bits: u32, group_size: usize) {
    let n_bins = ((1u32 << bits) - 1) as f32;
    for (g, values) in row.chunks_exact(group_size).enumerate() {
        let (scale, bias) = group_params(values, bits);
        scales[g] = scale;
        biases[g] = bias;
        for (k, &v) in values.iter().enumerate() {
            let level = cpp_min(cpp_max(((v - bias) / scale).round_ties_even(), 0.0), n_bins);
            put_bits(words, (g * group_size + k) * bits as usize, bits, level as u32);
        }
    }
}

/// ORs the `bits`-bit `value` into the little-endian bit stream `words` at bit `pos`.
fn put_bits(words: &mut [u32], pos: usize, bits: u32, value: u32) {
    let (w, off) = (pos / 32, (pos % 32) as u32);
    words[w] |= value << off;
    if off + bits > 32 {
        words[w + 1] |= value >> (32 - off);
    }
}

/// Reads the `bits`-bit value at bit `pos` of the little-endian bit stream `words`.
fn get_bits(words: &[u32], pos: usize, bits: u32) -> u32 {
    let (w, off) = (pos / 32, (pos % 32) as u32);
    let mut v = words[w] >> off;
    if off + bits > 32 {
        v |= words[w + 1] << (32 - off);
    }
    v & ((1u32 << bits) - 1)
}

/// Reconstructs the matrix (`scale * q + bias`, in f32, as MLX's `dequantize` does for f32
/// scales).
///
/// # Panics
/// If the fields of `q` are inconsistent with each other (they never are for a value made by
/// [`quantize`]); for parts read from a file use [`try_dequantize`].
pub fn dequantize(q: &MlxQuantized) -> Vec<f32> {
    match try_dequantize(q) {
        Ok(v) => v,
        Err(e) => panic!("inconsistent MlxQuantized: {e}"),
    }
}

/// [`dequantize`] for parts that may not fit together: checks bits, group size and the
/// lengths of `weight`, `scales` and `biases` against `rows` and `cols` first.
pub fn try_dequantize(q: &MlxQuantized) -> Result<Vec<f32>, QuantError> {
    let MlxQuantized { rows, cols, bits, group_size, .. } = *q;
    check_params(cols, bits, group_size)?;
    let n = rows.checked_mul(cols).ok_or(QuantError::BadShape { len: usize::MAX, rows, cols })?;
    let words_per_row = cols * bits as usize / 32;
    let groups_per_row = cols / group_size;
    let part = |what: &'static str, got: usize, expected: usize| {
        if got == expected {
            Ok(())
        } else {
            Err(QuantError::BadMlxPart { what, got, expected, rows, cols, bits, group_size })
        }
    };
    part("weight", q.weight.len(), rows * words_per_row)?;
    part("scales", q.scales.len(), rows * groups_per_row)?;
    part("biases", q.biases.len(), rows * groups_per_row)?;

    let mut out = vec![0.0f32; n];
    if n == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(cols)
        .zip(q.weight.par_chunks(words_per_row))
        .zip(q.scales.par_chunks(groups_per_row).zip(q.biases.par_chunks(groups_per_row)))
        .for_each(|((dst, words), (scales, biases))| {
            for (j, v) in dst.iter_mut().enumerate() {
                let g = j / group_size;
                let level = get_bits(words, j * bits as usize, bits);
                *v = level as f32 * scales[g] + biases[g];
            }
        });
    Ok(out)
}
