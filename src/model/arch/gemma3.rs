//! Gemma 3 text decoder (transformers `modeling_gemma3.py`, `Gemma3ForCausalLM`).
//!
//! Differences from Llama, all switches in `ModelConfig`:
//! - RMSNorm weights are offsets from one (`x̂ · (1 + w)`), and every block has four norms:
//!   input, post-attention (on the attention output), pre- and post-feedforward;
//! - q/k RMSNorm per head, attention scaled by `query_pre_attn_scalar^-1/2`;
//! - GeGLU MLP with tanh-approximated GELU; embeddings multiplied by sqrt(hidden);
//! - sliding-window layers (rope base `rope_local_base_freq`, 10k) interleaved with global
//!   layers (rope base `rope_theta`, 1M, plus any `rope_scaling`), five to one by default.

use serde_json::Value;

use crate::model::config::{
    base_config, rope_from_params, single_rope, Arch, ConfigContext, HfConfig,
    ModelConfig, RopeConfig, RopeScaling,
};
use crate::model::ModelError;

/// The config with the defaults every Gemma generation shares filled in.
pub(crate) fn with_gemma_defaults(hf: &HfConfig) -> HfConfig {
    let mut hf = hf.clone();
    hf.head_dim = hf.head_dim.or(Some(256));
    // Gemma names it `hidden_activation`; transformers ignores an old `hidden_act`.
    hf.hidden_act = hf.hidden_activation.clone().or(Some("gelu_pytorch_tanh".into()));
    hf.rms_norm_eps = hf.rms_norm_eps.or(Some(1e-6));
    hf.tie_word_embeddings = hf.tie_word_embeddings.or(Some(true));
    hf
}

pub fn config(hf: &HfConfig, ctx: &ConfigContext) -> Result<ModelConfig, ModelError> {
    let hf = with_gemma_defaults(hf);
    let mut cfg = base_config(&hf, ctx, Arch::Gemma3)?;
    cfg.qk_norm = true;
    cfg.norm_weight_offset = 1.0;
    cfg.sandwich_norms = true;
    cfg.embed_scale = Some((cfg.hidden_size as f64).sqrt());
    let scalar = hf.query_pre_attn_scalar.unwrap_or(cfg.head_dim as f64);
    cfg.attn_scale = scalar.powf(-0.5);
    cfg.attn_logit_softcap = hf.attn_logit_softcapping;
    cfg.final_logit_softcap = hf.final_logit_softcapping;

    // ropes[0]: global layers, ropes[1]: sliding layers.
    let d = cfg.head_dim;
    let per_type = hf
        .rope_parameters
        .as_ref()
        .and_then(Value::as_object)
        .filter(|m| m.contains_key("full_attention") || m.contains_key("sliding_attention"));
    let (global, local) = match per_type {
        Some(map) => {
            let global = match map.get("full_attention") {
                Some(p) => rope_from_params(p, 1_000_000.0, d, ctx, "rope_parameters.full_attention")?,
                None => RopeConfig { theta: 1_000_000.0, scaling: RopeScaling::None, rotary_dim: d },
            };
            let local = match map.get("sliding_attention") {
                Some(p) => rope_from_params(p, 10_000.0, d, ctx, "rope_parameters.sliding_attention")?,
                None => RopeConfig { theta: 10_000.0, scaling: RopeScaling::None, rotary_dim: d },
            };
            (global, local)
        }
        None => {
            let global = single_rope(&hf, ctx, d, 1_000_000.0)?;
            let local_theta = hf.rope_local_base_freq.unwrap_or(10_000.0);
            (global, RopeConfig { theta: local_theta, scaling: RopeScaling::None, rotary_dim: d })
        }
    };
    cfg.ropes = vec![global, local];
    let pattern = hf.sliding_window_pattern.unwrap_or(6).max(1);
    cfg.layers = super::layer_specs(&hf, ctx, &cfg, 1, |i| (i + 1) % pattern != 0)?;
    Ok(cfg)
}
