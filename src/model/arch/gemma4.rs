//! Gemma 4 text decoder (transformers `modeling_gemma4.py`, `Gemma4ForCausalLM`).
//!
//! Gemma 3's sandwich-norm block with these changes:
//! - RMSNorm weights multiply directly (no `1 + w`); values are RMS-normalised too (no weight);
//!   attention is unscaled (q/k norms keep the logits in range);
//! - full-attention layers have their own head_dim (and kv heads) from `per_layer_config`, and
//!   a "proportional" rope that rotates only the first frequencies of the whole head;
//! - per-layer input embeddings (PLE): a second embedding table, mixed with a projection of the
//!   token embeddings, feeds a small gated residual branch at the end of every layer;
//! - each layer's output is multiplied by a stored `layer_scalar`;
//! - optional: keys doubling as values on full layers (`attention_k_eq_v`), the last
//!   `num_kv_shared_layers` layers reusing the keys and values of the last earlier layer of
//!   their type (with a double-wide MLP under `use_double_wide_mlp`), and a mixture-of-experts
//!   block beside the MLP (`enable_moe_block`).

use serde_json::Value;

use crate::model::config::{
    base_config, rope_from_params, Arch, ConfigContext, HfConfig, ModelConfig, MoeConfig, MoeKind, PerLayerInput,
};
use crate::model::ModelError;

pub fn config(hf: &HfConfig, ctx: &ConfigContext) -> Result<ModelConfig, ModelError> {
    let mut hf = super::gemma3::with_gemma_defaults(hf);
    hf.sliding_window = hf.sliding_window.or(Some(512));
    if hf.use_bidirectional_attention.as_ref().and_then(Value::as_str) == Some("all") {
        return Err(ctx.invalid("use_bidirectional_attention", "\"all\" makes every token see the future: not a causal language model kiln can train or decode"));
    }
    let mut cfg = base_config(&hf, ctx, Arch::Gemma4)?;
    cfg.qk_norm = true;
    cfg.v_norm = true;
    cfg.sandwich_norms = true;
    cfg.layer_scalar = true;
    cfg.embed_scale = Some((cfg.hidden_size as f64).sqrt());
    cfg.attn_scale = 1.0;
    cfg.final_logit_softcap = hf.final_logit_softcapping;

    // transformers forces the last layer to full attention.
    let mut types = hf.layer_types.clone().unwrap_or_else(|| {
        (0..cfg.num_layers).map(|i| if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }.to_string()).collect()
    });
    if let Some(last) = types.last_mut() {
        *last = "full_attention".into();
    }
    hf.layer_types = Some(types);
    cfg.layers = super::layer_specs(&hf, ctx, &cfg, 1, |_| false)?;

    // Per-layer geometry: explicit overrides, or the older global_head_dim spelling.
    let k_eq_v = hf.attention_k_eq_v.unwrap_or(false);
    let overrides = per_layer_overrides(&hf, &cfg, k_eq_v, ctx)?;
    for (i, layer) in cfg.layers.iter_mut().enumerate() {
        if let Some((head_dim, kv)) = overrides.get(i).copied().flatten() {
            layer.head_dim = head_dim.unwrap_or(layer.head_dim);
            layer.num_kv_heads = kv.unwrap_or(layer.num_kv_heads);
        }
        if layer.head_dim == 0 || layer.head_dim % 2 != 0 || layer.num_kv_heads == 0 || cfg.num_heads % layer.num_kv_heads != 0 {
            return Err(ctx.invalid("per_layer_config", format!("layer {i}: head_dim {} with {} kv heads for {} query heads", layer.head_dim, layer.num_kv_heads, cfg.num_heads)));
        }
        layer.k_eq_v = k_eq_v && layer.sliding_window.is_none();
    }

    // Rope per layer type, each sized to that type's head_dim.
    let head_dim_of = |sliding: bool| cfg.layers.iter().find(|l| l.sliding_window.is_some() == sliding).map(|l| l.head_dim);
    let params = hf.rope_parameters.as_ref().and_then(Value::as_object);
    let rope = |kind: &str, sliding: bool, theta: f64, default: Value| -> Result<_, ModelError> {
        let d = head_dim_of(sliding).unwrap_or(cfg.head_dim);
        let p = params.and_then(|m| m.get(kind)).cloned().unwrap_or(default);
        rope_from_params(&p, theta, d, ctx, &format!("rope_parameters.{kind}"))
    };
    let full = rope("full_attention", false, 1_000_000.0, serde_json::json!({"rope_type": "proportional", "partial_rotary_factor": 0.25}))?;
    let sliding = rope("sliding_attention", true, 10_000.0, serde_json::json!({"rope_type": "default"}))?;
    for (i, layer) in cfg.layers.iter().enumerate() {
        let r = if layer.sliding_window.is_some() { &sliding } else { &full };
        if r.rotary_dim != layer.head_dim {
            return Err(ctx.invalid("per_layer_config", format!("layer {i}: head_dim {} differs from other layers of its type ({})", layer.head_dim, r.rotary_dim)));
        }
    }
    cfg.ropes = vec![full, sliding];

    share_kv(&mut cfg, hf.num_kv_shared_layers.unwrap_or(0), hf.use_double_wide_mlp.unwrap_or(false), ctx)?;

    if let Some(dim) = hf.hidden_size_per_layer_input.filter(|&d| d > 0) {
        cfg.per_layer_input = Some(PerLayerInput { dim, vocab: hf.vocab_size_per_layer_input.unwrap_or(cfg.vocab_size) });
    }
    if hf.enable_moe_block == Some(true) {
        let moe = MoeConfig {
            num_experts: ctx.require(hf.num_experts, "num_experts")?,
            top_k: ctx.require(hf.num_experts_per_tok, "top_k_experts")?,
            width: ctx.require(hf.moe_intermediate_size, "moe_intermediate_size")?,
            norm_topk: true,
            kind: MoeKind::Gemma4,
        };
        super::check_moe(&moe, ctx)?;
        for layer in &mut cfg.layers {
            layer.moe = true;
        }
        cfg.moe = Some(moe);
    }
    Ok(cfg)
}

/// `(head_dim, num_kv_heads)` overrides per layer.
type Override = Option<(Option<usize>, Option<usize>)>;

fn per_layer_overrides(hf: &HfConfig, cfg: &ModelConfig, k_eq_v: bool, ctx: &ConfigContext) -> Result<Vec<Override>, ModelError> {
    let mut out: Vec<Override> = vec![None; cfg.num_layers];
    match &hf.per_layer_config {
        Some(Value::Object(map)) => {
            for (key, value) in map {
                let i: usize = key.parse().ok().filter(|&i| i < cfg.num_layers).ok_or_else(|| {
                    ctx.invalid("per_layer_config", format!("`{key}` is not a layer index below {}", cfg.num_layers))
                })?;
                let fields = value.as_object().ok_or_else(|| ctx.invalid(&format!("per_layer_config.{key}"), "expected an object"))?;
                for name in fields.keys() {
                    if name != "head_dim" && name != "num_key_value_heads" {
                        return Err(ctx.invalid(&format!("per_layer_config.{key}.{name}"), "kiln reads only head_dim and num_key_value_heads per layer"));
                    }
                }
                let num = |name: &str| fields.get(name).and_then(Value::as_u64).map(|v| v as usize);
                out[i] = Some((num("head_dim"), num("num_key_value_heads")));
            }
        }
        Some(Value::Null) | None => {
            let head_dim = hf.global_head_dim.unwrap_or(512);
            let kv = if k_eq_v { hf.num_global_key_value_heads } else { None };
            for (i, layer) in cfg.layers.iter().enumerate() {
                if layer.sliding_window.is_none() {
                    out[i] = Some((Some(head_dim), kv));
                }
            }
        }
        Some(_) => return Err(ctx.invalid("per_layer_config", "expected an object keyed by layer index")),
    }
    Ok(out)
}

/// The last `shared` layers reuse the keys and values of the last earlier layer of their own
/// type, as transformers' `kv_sharing_modes`; with `double_wide`, their MLP is twice as wide.
fn share_kv(cfg: &mut ModelConfig, shared: usize, double_wide: bool, ctx: &ConfigContext) -> Result<(), ModelError> {
    if shared == 0 {
        return Ok(());
    }
    let first = cfg.num_layers.checked_sub(shared).filter(|&f| f > 0).ok_or_else(|| {
        ctx.invalid("num_kv_shared_layers", format!("{shared} of {} layers: at least one layer must compute its own keys and values", cfg.num_layers))
    })?;
    for i in first..cfg.num_layers {
        let sliding = cfg.layers[i].sliding_window.is_some();
        let source = (0..first).rev().find(|&j| cfg.layers[j].sliding_window.is_some() == sliding).ok_or_else(|| {
            ctx.invalid("num_kv_shared_layers", format!("layer {i} shares keys and values, but no earlier layer has its attention type"))
        })?;
        let (head_dim, kv) = (cfg.layers[source].head_dim, cfg.layers[source].num_kv_heads);
        let layer = &mut cfg.layers[i];
        layer.kv_source = Some(source);
        layer.head_dim = head_dim;
        layer.num_kv_heads = kv;
        if double_wide {
            layer.mlp_width = layer.mlp_width.map(|w| 2 * w);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::model::ModelConfig;
    use std::path::Path;

    #[test]
    fn zero_kv_heads_in_per_layer_config_is_an_error() {
        let text = r#"{"model_type":"gemma4_text","vocab_size":16,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,
            "layer_types":["sliding_attention","full_attention"],"sliding_window":4,
            "per_layer_config":{"1":{"head_dim":8,"num_key_value_heads":0}}}"#;
        let err = ModelConfig::from_json(text, Path::new("config.json")).unwrap_err().to_string();
        assert!(err.contains("per_layer_config") && err.contains("layer 1"), "{err}");
    }
}
