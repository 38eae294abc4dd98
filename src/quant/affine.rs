//! GGUF blocks and MLX groups as the affine group layout the kernels take
//! (`kiln_kernels::host::HostQuant`: `w = scale · level + bias` per group of 32 or more).
//!
//! Every level is kept as stored, so a converted weight multiplies exactly like the original:
//! - Q4_K: each 32-value sub-block has `scale = d · sc`, `bias = −dmin · m`, levels 0..15 —
//!   the very products ggml's dequantisation forms, so values are bit-identical.
//! - Q4_0: `scale = d`, `bias = −8d`, levels 0..15 (ggml computes `(q − 8) · d`; the two
//!   differ by f32 rounding only).
//! - Q8_0: `scale = d`, `bias = −128d`, levels `q + 128` (ggml: `q · d`; f32 rounding only).
//! - MLX affine q4/q8: the same layout as written.
//! Q4_K costs 5 bits per weight this way (f32 scale and bias per 32) against 4.5 in GGUF.

use kiln_kernels::host::HostQuant;
use kiln_kernels::Affine;

use super::mlx::MlxQuantized;
use super::{GgmlType, QuantError};

/// A GGUF tensor `[n, k]` (`bytes` as stored) in the affine layout.
pub fn from_gguf(ty: GgmlType, bytes: &[u8], n: usize, k: usize) -> Result<HostQuant, QuantError> {
    let expected = n * ty.row_bytes(k);
    if k % ty.block_size() != 0 {
        return Err(QuantError::BadRowLength { ty: ty.name(), n: k, block: ty.block_size() });
    }
    if bytes.len() != expected {
        return Err(QuantError::BadLength { ty: ty.name(), n: n * k, expected, got: bytes.len() });
    }
    let groups = n * k / 32;
    let mut levels = vec![0u8; n * k];
    let mut scales = Vec::with_capacity(groups);
    let mut biases = Vec::with_capacity(groups);
    let bits = match ty {
        GgmlType::Q8_0 => {
            for (b, q) in bytes.chunks_exact(34).zip(levels.chunks_exact_mut(32)) {
                let d = super::read_f16(b, 0);
                scales.push(d);
                biases.push(-128.0 * d);
                for (l, &v) in q.iter_mut().zip(&b[2..34]) {
                    *l = (v as i8 as i16 + 128) as u8;
                }
            }
            8
        }
        GgmlType::Q4_0 => {
            for (b, q) in bytes.chunks_exact(18).zip(levels.chunks_exact_mut(32)) {
                let d = super::read_f16(b, 0);
                scales.push(d);
                biases.push(-8.0 * d);
                for (i, &v) in b[2..18].iter().enumerate() {
                    q[i] = v & 0x0f;
                    q[i + 16] = v >> 4;
                }
            }
            4
        }
        GgmlType::Q4_K => {
            for (b, q) in bytes.chunks_exact(144).zip(levels.chunks_exact_mut(256)) {
                let (d, dmin) = (super::read_f16(b, 0), super::read_f16(b, 2));
                let packed = &b[4..16];
                for (c, (qs, out)) in b[16..144].chunks_exact(32).zip(q.chunks_exact_mut(64)).enumerate() {
                    for half in 0..2 {
                        let (sc, m) = super::kquants::get_scale_min_k4(2 * c + half, packed);
                        scales.push(d * f32::from(sc));
                        biases.push(-(dmin * f32::from(m)));
                    }
                    for i in 0..32 {
                        out[i] = qs[i] & 0x0f;
                        out[i + 32] = qs[i] >> 4;
                    }
                }
            }
            4
        }
        other => return Err(QuantError::UnsupportedKernelType { ty: other.name() }),
    };
    Ok(HostQuant::pack(&levels, n, k, Affine { bits, group: 32 }, scales, biases))
}

/// An MLX-quantised weight in the kernels' layout (it is the same layout).
pub fn from_mlx(q: &MlxQuantized) -> HostQuant {
    HostQuant {
        n: q.rows,
        k: q.cols,
        format: Affine { bits: q.bits, group: q.group_size as u32 },
        words: q.weight.clone(),
        scales: q.scales.clone(),
        biases: q.biases.clone(),
    }
}

/// A `--quantize` / `[model] quantize` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantSpec {
    /// MLX affine: bits 4 or 8, group 32/64/128.
    Mlx { bits: u32, group: usize },
    /// A GGUF block format the kernels run: Q8_0, Q4_0 or Q4_K.
    Gguf(GgmlType),
}

impl QuantSpec {
    pub const NAMES: &'static str = "q4_g32, q4_g64, q4_g128, q8_g32, q8_g64, q8_g128, gguf:q8_0, gguf:q4_0, gguf:q4_k";

    pub fn parse(s: &str) -> Option<Self> {
        let s = s.to_ascii_lowercase();
        if let Some(t) = s.strip_prefix("gguf:") {
            return match GgmlType::parse(t)? {
                ty @ (GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_K) => Some(QuantSpec::Gguf(ty)),
                _ => None,
            };
        }
        let (bits, group) = s.strip_prefix('q')?.split_once("_g")?;
        let (bits, group) = (bits.parse().ok()?, group.parse().ok()?);
        (matches!(bits, 4 | 8) && matches!(group, 32 | 64 | 128)).then_some(QuantSpec::Mlx { bits, group })
    }

    /// The affine format an MLX spec names. None for the GGUF block formats: their levels come
    /// from ggml's quantiser, so an MLX checkpoint never holds them even when bits and group
    /// agree.
    pub fn affine(self) -> Option<Affine> {
        match self {
            QuantSpec::Mlx { bits, group } => Some(Affine { bits, group: group as u32 }),
            QuantSpec::Gguf(_) => None,
        }
    }

    /// Quantises an HF-layout weight `[n, k]` for the kernels.
    pub fn quantize(self, data: &[f32], n: usize, k: usize) -> Result<HostQuant, QuantError> {
        match self {
            QuantSpec::Mlx { bits, group } => Ok(from_mlx(&super::mlx::quantize(data, n, k, bits, group)?)),
            QuantSpec::Gguf(ty) => from_gguf(ty, &super::quantize(ty, data, k)?, n, k),
        }
    }
}

impl std::fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantSpec::Mlx { bits, group } => write!(f, "q{bits}_g{group}"),
            QuantSpec::Gguf(ty) => write!(f, "gguf:{}", ty.name().to_ascii_lowercase()),
        }
    }
}
