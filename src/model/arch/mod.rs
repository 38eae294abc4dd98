//! One file per decoder family: how its config.json reads and what it does differently.
//!
//! The decoder itself (`model/decoder.rs`) is shared: the families kiln loads differ in a
//! handful of switches (biases, q/k norms, Gemma's norm offset and sandwich norms, per-layer
//! sliding windows and rope bases), which `ModelConfig` spells out as data. A family whose
//! forward differs in kind (mixture-of-experts blocks, per-layer embeddings) adds its module
//! here and its block variant to the decoder.

pub mod gemma3;
pub mod llama;
pub mod qwen;

use super::config::{ConfigContext, HfConfig, LayerSpec};
use super::ModelError;

/// Per-layer attention kinds from `layer_types` when the config lists them, else from
/// `is_sliding(i)`. Sliding layers use rope `sliding_rope`, others rope 0.
pub(crate) fn layer_specs(
    hf: &HfConfig,
    ctx: &ConfigContext,
    num_layers: usize,
    sliding_rope: usize,
    is_sliding: impl Fn(usize) -> bool,
) -> Result<Vec<LayerSpec>, ModelError> {
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
            if s {
                let window = hf.sliding_window.ok_or_else(|| ctx.missing("sliding_window"))?;
                Ok(LayerSpec { sliding_window: Some(window), rope: sliding_rope })
            } else {
                Ok(LayerSpec { sliding_window: None, rope: 0 })
            }
        })
        .collect()
}
