//! Which ggml type each tensor gets for a given file type, following llama.cpp's
//! `llama_tensor_get_type` for the types kiln writes (no importance matrix).
//!
//! The k-quant "mixes" give more bits where quantisation hurts most: the output head, and
//! `attn_v` / `ffn_down` in the first and last eighth of the layers and every third layer in
//! between.

use crate::quant::GgmlType;

/// A GGUF file type (`general.file_type`, numbered as llama.cpp's `llama_ftype`).
#[allow(non_camel_case_types)] // named as llama.cpp names them
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
    Q4_K_S,
    Q4_K_M,
    Q5_K_M,
}

impl FileType {
    pub const ALL: [FileType; 14] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q4_K,
        FileType::Q5_K,
        FileType::Q6_K,
        FileType::Q4_K_S,
        FileType::Q4_K_M,
        FileType::Q5_K_M,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q5_1 => "q5_1",
            FileType::Q4_K => "q4_k",
            FileType::Q5_K => "q5_k",
            FileType::Q6_K => "q6_k",
            FileType::Q4_K_S => "q4_k_s",
            FileType::Q4_K_M => "q4_k_m",
            FileType::Q5_K_M => "q5_k_m",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let s = s.to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Why `s` is not a file type, listing the valid ones and the nearest.
    pub fn explain_unknown(s: &str) -> String {
        let all: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
        // Compared without underscores: "q4km" and "q4-k-m" both mean q4_k_m.
        let bare = |t: &str| t.to_ascii_lowercase().replace(['_', '-'], "");
        let distance = |n: &str| strsim::levenshtein(&bare(n), &bare(s));
        let nearest = all.iter().copied().min_by_key(|n| distance(n)).filter(|n| distance(n) <= 2);
        let hint = nearest.map(|n| format!(" (did you mean {n:?}?)")).unwrap_or_default();
        format!("expected one of {}, found {s:?}{hint}", all.join(", "))
    }

    /// `general.file_type`. Plain q4_k / q5_k have no llama_ftype of their own; they are
    /// written as the _M mix's number, which is what llama.cpp reports for such files anyway
    /// (the number only labels the file; each tensor carries its own type).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4_K_S => 14,
            FileType::Q4_K | FileType::Q4_K_M => 15,
            FileType::Q5_K | FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type most weight matrices get.
    pub fn base_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q5_0 => GgmlType::Q5_0,
            FileType::Q5_1 => GgmlType::Q5_1,
            FileType::Q4_K | FileType::Q4_K_S | FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q5_K | FileType::Q5_K_M => GgmlType::Q5_K,
            FileType::Q6_K => GgmlType::Q6_K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, FileType::F32 | FileType::F16 | FileType::BF16)
    }
}

/// What the type choice needs to know about the model as a whole.
#[derive(Debug, Clone, Copy)]
pub struct MixContext {
    pub n_layers: usize,
    /// The model has a separate `output.weight` (false when the head is tied to the embedding).
    pub has_output: bool,
    pub n_expert: usize,
}

/// The chosen type for one tensor, and whether the k-quant row-length fallback applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub ty: GgmlType,
    /// The mix wanted `wanted` but the rows are not a multiple of 256.
    pub fallback_from: Option<GgmlType>,
}

/// llama.cpp's rule for the layers that get more bits in the _M mixes.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer as isize - (n_layers / 8) as isize) % 3 == 2
}

/// Layer index from a `blk.N.` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Whether a tensor stays in full precision whatever the file type: vectors, norms, the MoE
/// router and llama3's rope factors (as both llama.cpp's converter and quantiser do).
pub fn keeps_f32(name: &str, n_dims: usize) -> bool {
    n_dims < 2 || name.ends_with("_norm.weight") || name.contains("ffn_gate_inp.weight") || name == "rope_freqs.weight"
}

/// The ggml type of tensor `name` (GGUF naming) with ggml dims `dims`.
pub fn choose(file_type: FileType, name: &str, dims: &[u64], ctx: &MixContext) -> Choice {
    if keeps_f32(name, dims.len()) {
        return Choice { ty: GgmlType::F32, fallback_from: None };
    }
    let base = file_type.base_type();
    if !file_type.is_quantized() {
        return Choice { ty: base, fallback_from: None };
    }
    let row = dims[0] as usize;
    let is_output = name == "output.weight" || (!ctx.has_output && name == "token_embd.weight");
    let mut ty = base;
    if is_output {
        // The head's rounding error lands directly on the logits: 6 bits unless the file is
        // already 8-bit, or 8-bit when rows do not fit 256-element blocks.
        ty = if row % base.block_size() != 0 {
            GgmlType::Q8_0
        } else if base != GgmlType::Q8_0 {
            GgmlType::Q6_K
        } else {
            base
        };
    } else if name.contains("attn_v.weight") {
        let i = layer_of(name).unwrap_or(0);
        match file_type {
            FileType::Q4_K_M | FileType::Q5_K_M if use_more_bits(i, ctx.n_layers) => ty = GgmlType::Q6_K,
            FileType::Q4_K_S if i < 4 => ty = GgmlType::Q5_K,
            _ => {}
        }
        if ctx.n_expert == 8 {
            ty = GgmlType::Q8_0;
        }
    } else if name.contains("attn_k.weight") {
        if ctx.n_expert == 8 {
            ty = GgmlType::Q8_0;
        }
    } else if name.contains("ffn_down") {
        let i = layer_of(name).unwrap_or(0);
        match file_type {
            FileType::Q4_K_M | FileType::Q5_K_M if use_more_bits(i, ctx.n_layers) => ty = GgmlType::Q6_K,
            FileType::Q4_K_S if i < ctx.n_layers / 8 => ty = GgmlType::Q5_K,
            _ => {}
        }
    }
    fallback(ty, row)
}

/// K-quants need rows that are a multiple of 256; llama.cpp then falls back to the legacy
/// type with (at least) as many bits.
fn fallback(ty: GgmlType, row: usize) -> Choice {
    if row % ty.block_size() == 0 {
        return Choice { ty, fallback_from: None };
    }
    let legacy = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if row % legacy.block_size() == 0 {
        Choice { ty: legacy, fallback_from: Some(ty) }
    } else {
        // Not even a multiple of 32: keep the values exact rather than refuse the model.
        Choice { ty: GgmlType::F16, fallback_from: Some(ty) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // For 32 layers: 0..4, 28..32, and 4 + 3k + 2.
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(picked, vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
    }

    #[test]
    fn k_quant_rows_fall_back() {
        let ctx = MixContext { n_layers: 4, has_output: true, n_expert: 0 };
        let c = choose(FileType::Q4_K_M, "blk.1.attn_q.weight", &[896, 896], &ctx);
        assert_eq!(c, Choice { ty: GgmlType::Q5_0, fallback_from: Some(GgmlType::Q4_K) });
        // Of 4 layers, 2 and 3 get more bits: Q6_K, which 896-wide rows turn into Q8_0.
        let c = choose(FileType::Q4_K_M, "blk.3.ffn_down.weight", &[896, 4864], &ctx);
        assert_eq!(c, Choice { ty: GgmlType::Q8_0, fallback_from: Some(GgmlType::Q6_K) });
        let c = choose(FileType::Q4_K_M, "blk.0.ffn_down.weight", &[4864, 896], &ctx);
        assert_eq!(c, Choice { ty: GgmlType::Q4_K, fallback_from: None });
        let c = choose(FileType::Q4_K_M, "blk.1.attn_norm.weight", &[896], &ctx);
        assert_eq!(c.ty, GgmlType::F32);
        let c = choose(FileType::Q4_K_M, "output.weight", &[1024, 500], &ctx);
        assert_eq!(c.ty, GgmlType::Q6_K);
        let tied = MixContext { has_output: false, ..ctx };
        assert_eq!(choose(FileType::Q8_0, "token_embd.weight", &[1024, 500], &tied).ty, GgmlType::Q8_0);
        assert_eq!(choose(FileType::Q4_0, "token_embd.weight", &[1024, 500], &tied).ty, GgmlType::Q6_K);
    }
}
