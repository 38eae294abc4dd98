//! Qwen 2 / 2.5, Qwen 3 and Qwen 3 MoE (transformers `modeling_qwen2.py`, `modeling_qwen3.py`,
//! `modeling_qwen3_moe.py`).
//!
//! The Llama decoder with two changes: Qwen 2 puts biases on q/k/v (not o), and Qwen 3 drops
//! them and instead RMS-normalises each query and key head before rope, with a head_dim that
//! need not equal hidden / heads. Qwen 3 MoE is Qwen 3 with the MLP of every
//! `decoder_sparse_step`-th layer (except `mlp_only_layers`) replaced by experts: a linear
//! router, softmax, the top `num_experts_per_tok`, optionally renormalised.

use crate::model::config::{base_config, single_rope, Arch, ConfigContext, HfConfig, ModelConfig, MoeConfig, MoeKind};
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
    cfg.layers = super::layer_specs(hf, ctx, &cfg, 0, |i| use_sw && i >= first_sw)?;
    if arch == Arch::Qwen3Moe {
        let moe = MoeConfig {
            num_experts: ctx.require(hf.num_experts, "num_experts")?,
            top_k: ctx.require(hf.num_experts_per_tok, "num_experts_per_tok")?,
            width: ctx.require(hf.moe_intermediate_size, "moe_intermediate_size")?,
            norm_topk: hf.norm_topk_prob.unwrap_or(false),
            kind: MoeKind::Qwen3,
        };
        super::check_moe(&moe, ctx)?;
        let step = hf.decoder_sparse_step.unwrap_or(1).max(1);
        let dense = hf.mlp_only_layers.clone().unwrap_or_default();
        for (i, layer) in cfg.layers.iter_mut().enumerate() {
            if !dense.contains(&i) && (i + 1) % step == 0 {
                layer.moe = true;
                layer.mlp_width = None;
            }
        }
        cfg.moe = Some(moe);
    }
    Ok(cfg)
}
