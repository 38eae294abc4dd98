//! ggml's 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the plain float formats.
//!
//! Each quantiser follows ggml's `quantize_row_*_ref` in `ggml-quants.c` operation by operation;
//! each dequantiser follows `dequantize_row_*`. The callers hand over whole blocks only.
//!
//! C's float-to-integer conversions truncate toward zero. Where ggml converts straight to a
//! narrow type (`(int8_t)(x + 8.5f)`, `(uint8_t)(x + 0.5f)`, `(int8_t)roundf(x)`), x86-64
//! compilers truncate to a 32-bit integer with `cvttss2si` and keep the low byte; see
//! [`c_float_to_int`]. The values are small (|x| ≤ 32) except in one corner: a block whose
//! largest magnitude is below about 1e-37 has a scale `d` so small that `1.0f/d` overflows to
//! infinity, every `x * id` becomes ±inf or NaN, and ggml's bytes are whatever `cvttss2si`
//! makes of those.

use super::{QK, read_f16, write_f16};

// block_q4_0: d:f16, qs[16] (element j in the low nibble of qs[j], element j+16 in the high) = 18 bytes
pub(crate) const Q4_0_BYTES: usize = 2 + QK / 2;
// block_q4_1: d:f16, m:f16, qs[16] = 20 bytes
pub(crate) const Q4_1_BYTES: usize = 4 + QK / 2;
// block_q5_0: d:f16, qh[4] (5th bits, bit j = element j, little-endian u32), qs[16] = 22 bytes
pub(crate) const Q5_0_BYTES: usize = 2 + 4 + QK / 2;
// block_q5_1: d:f16, m:f16, qh[4], qs[16] = 24 bytes
pub(crate) const Q5_1_BYTES: usize = 4 + 4 + QK / 2;
// block_q8_0: d:f16, qs[32] (i8) = 34 bytes
pub(crate) const Q8_0_BYTES: usize = 2 + QK;

/// Index and signed value of the largest-magnitude element (the first one on ties), as
/// ggml's Q4_0/Q5_0 scan finds it: `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`.
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// ggml's Q4_1/Q5_1 scan: min and max starting from ±FLT_MAX.
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// A C float-to-int conversion as x86-64 performs it (`cvttss2si`): truncation toward zero,
/// and the "integer indefinite" value `i32::MIN` for NaN and out-of-range inputs, where Rust's
/// `as` would saturate. (The C standard leaves those cases undefined; this is what llama.cpp's
/// x86-64 builds do, and so what their files contain.)
#[inline]
fn c_float_to_int(x: f32) -> i32 {
    if x.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&x) { i32::MIN } else { x as i32 }
}

/// `(int8_t)x` for a float `x`, as x86-64 compilers do it: to i32, keep the low byte.
#[inline]
fn c_float_to_i8(x: f32) -> i8 {
    c_float_to_int(x) as i8
}

/// `d ? 1.0f/d : 0.0f`
fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

pub(crate) fn quantize_q4_0(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q4_0_BYTES)) {
        // The largest-magnitude value maps to -8, the one end of [-8, 7] that is always used;
        // its sign decides the sign of d.
        let d = signed_absmax(x) / -8.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        for j in 0..QK / 2 {
            let x0 = x[j] * id;
            let x1 = x[j + QK / 2] * id;
            let xi0 = i32::from(c_float_to_i8(x0 + 8.5)).min(15) as u8;
            let xi1 = i32::from(c_float_to_i8(x1 + 8.5)).min(15) as u8;
            y[2 + j] = xi0 | (xi1 << 4);
        }
    }
}

pub(crate) fn quantize_q4_1(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q4_1_BYTES)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        write_f16(y, 2, min);
        for j in 0..QK / 2 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[j + QK / 2] - min) * id;
            let xi0 = i32::from(c_float_to_i8(x0 + 0.5)).min(15) as u8;
            let xi1 = i32::from(c_float_to_i8(x1 + 0.5)).min(15) as u8;
            y[4 + j] = xi0 | (xi1 << 4);
        }
    }
}

pub(crate) fn quantize_q5_0(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q5_0_BYTES)) {
        let d = signed_absmax(x) / -16.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        let mut qh: u32 = 0;
        for j in 0..QK / 2 {
            let x0 = x[j] * id;
            let x1 = x[j + QK / 2] * id;
            let xi0 = i32::from(c_float_to_i8(x0 + 16.5)).min(31) as u8;
            let xi1 = i32::from(c_float_to_i8(x1 + 16.5)).min(31) as u8;
            y[6 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
            // The fifth bit of element j goes to bit j of qh, that of element j+16 to bit j+16.
            qh |= u32::from((xi0 & 0x10) >> 4) << j;
            qh |= u32::from((xi1 & 0x10) >> 4) << (j + QK / 2);
        }
        y[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

pub(crate) fn quantize_q5_1(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q5_1_BYTES)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        write_f16(y, 2, min);
        let mut qh: u32 = 0;
        for j in 0..QK / 2 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[j + QK / 2] - min) * id;
            // No clamp to 31 here, unlike Q4_1: ggml has none either.
            let xi0 = c_float_to_int(x0 + 0.5) as u8;
            let xi1 = c_float_to_int(x1 + 0.5) as u8;
            y[8 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
            qh |= u32::from((xi0 & 0x10) >> 4) << j;
            qh |= u32::from((xi1 & 0x10) >> 4) << (j + QK / 2);
        }
        y[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

pub(crate) fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
        let mut amax = 0.0f32;
        for &v in x {
            // MAX(amax, fabsf(v))
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let d = amax / 127.0;
        let id = inverse_or_zero(d);
        write_f16(y, 0, d);
        for j in 0..QK {
            // roundf: halves away from zero, which is what f32::round does.
            y[2 + j] = c_float_to_i8((x[j] * id).round()) as u8;
        }
    }
}

pub(crate) fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q4_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(x, 0);
        for j in 0..QK / 2 {
            let q = x[2 + j];
            y[j] = (i32::from(q & 0x0f) - 8) as f32 * d;
            y[j + QK / 2] = (i32::from(q >> 4) - 8) as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q4_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(x, 0);
        let m = read_f16(x, 2);
        for j in 0..QK / 2 {
            let q = x[4 + j];
            y[j] = f32::from(q & 0x0f) * d + m;
            y[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }
}

/// The 5-bit value of element `j` (0..32) of a Q5 block, from its nibble and its bit in `qh`.
fn q5_value(qs: &[u8], qh: u32, j: usize) -> i32 {
    let (nibble, bit) = if j < QK / 2 { (qs[j] & 0x0f, j) } else { (qs[j - QK / 2] >> 4, j) };
    i32::from(nibble) | (((qh >> bit) & 1) << 4) as i32
}

pub(crate) fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q5_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(x, 0);
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        for (j, out) in y.iter_mut().enumerate() {
            *out = (q5_value(&x[6..], qh, j) - 16) as f32 * d;
        }
    }
}

pub(crate) fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q5_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(x, 0);
        let m = read_f16(x, 2);
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        for (j, out) in y.iter_mut().enumerate() {
            *out = q5_value(&x[8..], qh, j) as f32 * d + m;
        }
    }
}

pub(crate) fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(Q8_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(x, 0);
        for (q, out) in x[2..].iter().zip(y.iter_mut()) {
            *out = f32::from(*q as i8) * d;
        }
    }
}

// ---- plain float formats ------------------------------------------------------------------

pub(crate) fn f32_row(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.iter().zip(dst.chunks_exact_mut(4)) {
        y.copy_from_slice(&x.to_le_bytes());
    }
}

pub(crate) fn f16_row(src: &[f32], dst: &mut [u8]) {
    for (i, &x) in src.iter().enumerate() {
        write_f16(dst, 2 * i, x);
    }
}

pub(crate) fn bf16_row(src: &[f32], dst: &mut [u8]) {
    for (x, y) in src.iter().zip(dst.chunks_exact_mut(2)) {
        y.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
    }
}

/// ggml's `ggml_compute_fp32_to_bf16`: round to nearest even by adding 0x7fff plus the lowest
/// kept bit; NaN keeps its top bits and is forced quiet. Subnormals are rounded like any other
/// value (no flush to zero).
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    // Cannot overflow: the largest finite input plus the rounding bias is below 2^32.
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

pub(crate) fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

pub(crate) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    }
}

pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (i, y) in dst.iter_mut().enumerate() {
        *y = read_f16(src, 2 * i);
    }
}

pub(crate) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = bf16_bits_to_f32(u16::from_le_bytes([x[0], x[1]]));
    }
}
