//! Qwen 2 / 2.5 and Qwen 3 (transformers `modeling_qwen2.py`, `modeling_qwen3.py`).
//!
//! The Llama decoder with two changes: Qwen 2 puts biases on q/k/v (not o), and Qwen 3 drops
//! them and instead RMS-normalises each query and key head before rope, with a head_dim that
//! need not equal hidden / heads.

use crate::model::config::{base_config, single_rope, Arch, ConfigContext, HfConfig, ModelConfig};
use crate::model::ModelError;

pub fn config(hf: &HfConfig, ctx: &ConfigContext, arch: Arch) -> Result<ModelConfig, ModelError> {
    let mut cfg = base_config(hf, ctx, arch)?;
    match arch {
        Arch::Qwen2 => {
            cfg.qkv_bias = true;
            cfg.o_bias = false;
        }
        _ => {
            cfg.qk_norm = true;
        }
    }
    cfg.ropes = vec![single_rope(hf, ctx, cfg.head_dim, 10_000.0)?];
    // transformers 4: sliding window (when enabled) on layers from `max_window_layers` on.
    let use_sw = hf.use_sliding_window.unwrap_or(false);
    let first_sw = hf.max_window_layers.unwrap_or(cfg.num_layers);
    cfg.layers = super::layer_specs(hf, ctx, cfg.num_layers, 0, |i| use_sw && i >= first_sw)?;
    Ok(cfg)
}
