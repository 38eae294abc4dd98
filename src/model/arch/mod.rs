//! One file per decoder family: how its config.json reads and what it does differently.
//!
//! The decoder itself (`model/decoder.rs`) is shared: the families kiln loads differ in a
//! handful of switches (biases, q/k norms, Gemma's norm offset and sandwich norms, per-layer
//! sliding windows and rope bases), which `ModelConfig` spells out as data. A family whose
//! forward differs in kind (mixture-of-experts blocks, per-layer embeddings) adds its module
//! here and its block variant to the decoder.

pub mod gemma3;
pub mod gemma4;
pub mod llama;
pub mod qwen;

use super::config::{ConfigContext, HfConfig, LayerSpec, ModelConfig};
use super::ModelError;

/// Per-layer attention kinds from `layer_types` when the config lists them, else from
/// `is_sliding(i)`. Sliding layers use rope `sliding_rope`, others rope 0; everything else is
/// the model-wide geometry of `cfg`, for the family to override.
pub(crate) fn layer_specs(
    hf: &HfConfig,
    ctx: &ConfigContext,
    cfg: &ModelConfig,
    sliding_rope: usize,
    is_sliding: impl Fn(usize) -> bool,
) -> Result<Vec<LayerSpec>, ModelError> {
    let num_layers = cfg.num_layers;
    let sliding: Vec<bool> = match &hf.layer_types {
        Some(types) => {
            if types.len() != num_layers {
                return Err(ctx.invalid(
                    "layer_types",
                    format!("{} entries for {num_layers} layers", types.len()),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(ctx.invalid(
                        "layer_types",
                        format!("unknown layer type `{other}` (expected sliding_attention or full_attention)"),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        None => (0..num_layers).map(is_sliding).collect(),
    };
    sliding
        .into_iter()
        .map(|s| {
            let (sliding_window, rope) = if s {
                (Some(hf.sliding_window.ok_or_else(|| ctx.missing("sliding_window"))?), sliding_rope)
            } else {
                (None, 0)
            };
            Ok(LayerSpec {
                sliding_window,
                rope,
                head_dim: cfg.head_dim,
                num_kv_heads: cfg.num_kv_heads,
                kv_source: None,
                k_eq_v: false,
                mlp_width: Some(cfg.intermediate_size),
                moe: false,
            })
        })
        .collect()
}

/// A router that can pick what it is asked to.
pub(crate) fn check_moe(moe: &super::config::MoeConfig, ctx: &ConfigContext) -> Result<(), ModelError> {
    if moe.num_experts == 0 || moe.top_k == 0 || moe.top_k > moe.num_experts {
        return Err(ctx.invalid(
            "num_experts_per_tok",
            format!("{} of {} experts per token: expected between 1 and the number of experts", moe.top_k, moe.num_experts),
        ));
    }
    Ok(())
}
