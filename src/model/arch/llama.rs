//! Llama 2/3 and Mistral (transformers `modeling_llama.py`, `modeling_mistral.py`).
//!
//! Pre-norm decoder: RMSNorm → attention (GQA, rotate-half rope) → residual, RMSNorm → SwiGLU
//! MLP → residual. Llama 3.1 scales its rope frequencies (`rope_type = "llama3"`); Mistral may
//! restrict attention to a sliding window on every layer.

use crate::model::config::{base_config, single_rope, Arch, ConfigContext, HfConfig, ModelConfig};
use crate::model::ModelError;

pub fn config(hf: &HfConfig, ctx: &ConfigContext, arch: Arch) -> Result<ModelConfig, ModelError> {
    let mut cfg = base_config(hf, ctx, arch)?;
    cfg.ropes = vec![single_rope(hf, ctx, cfg.head_dim, 10_000.0)?];
    let windowed = arch == Arch::Mistral && hf.sliding_window.is_some();
    cfg.layers = super::layer_specs(hf, ctx, &cfg, 0, |_| windowed)?;
    Ok(cfg)
}
