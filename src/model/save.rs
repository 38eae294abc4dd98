//! Writing a model back out as a Hugging Face directory (fuse, full fine-tuning) and creating a
//! fresh, randomly initialised one (the quickstart's `[model.init]`).

use std::path::Path;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::decoder::{Attention, DecoderLayer, Mlp};
use super::layers::{Linear, RmsNorm};
use super::config::MoeKind;
use super::{Model, ModelConfig, ModelError};

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    (shape, t.into_data().convert::<f32>().into_vec().unwrap_or_default())
}

/// Every weight under its Hugging Face name, in HF layout (linear weights `[out, in]`; Gemma 4's
/// experts stacked into `experts.gate_up_proj` `[x, 2·w, e]` and `experts.down_proj`
/// `[x, e, w]`, as its checkpoints store them). Adapters must be fused first: a layer with an
/// adapter contributes its base weight only.
pub fn hf_tensors<B: Backend>(model: &Model<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    let mut push = |name: String, (shape, data): (Vec<usize>, Vec<f32>)| out.push((name, shape, data));
    let weight = |l: &Linear<B>| host(l.dense_weight().transpose());
    let stacked_experts = model.config.moe.as_ref().is_some_and(|m| m.kind == MoeKind::Gemma4);
    push("model.embed_tokens.weight".into(), host(model.embed_tokens.val()));
    if let Some(p) = &model.per_layer {
        push("model.embed_tokens_per_layer.weight".into(), host(p.embed.val()));
        push("model.per_layer_model_projection.weight".into(), weight(&p.projection));
        push("model.per_layer_projection_norm.weight".into(), host(p.norm.weight.val()));
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (path, l) in crate::lora::projections(model, i) {
            if stacked_experts && crate::lora::in_expert(&path) {
                continue;
            }
            push(format!("{p}.{path}.weight"), weight(l));
            if let Some(b) = &l.bias {
                push(format!("{p}.{path}.bias"), host(b.val()));
            }
        }
        let a = &layer.self_attn;
        let mut norms: Vec<(&str, &RmsNorm<B>)> = vec![("input_layernorm", &layer.input_layernorm), ("post_attention_layernorm", &layer.post_attention_layernorm)];
        norms.extend(a.q_norm.iter().map(|n| ("self_attn.q_norm", n)));
        norms.extend(a.k_norm.iter().map(|n| ("self_attn.k_norm", n)));
        norms.extend(layer.pre_feedforward_layernorm.iter().map(|n| ("pre_feedforward_layernorm", n)));
        norms.extend(layer.post_feedforward_layernorm.iter().map(|n| ("post_feedforward_layernorm", n)));
        if let Some(m) = &layer.moe_norms {
            norms.extend([("post_feedforward_layernorm_1", &m.post_mlp), ("pre_feedforward_layernorm_2", &m.pre_experts), ("post_feedforward_layernorm_2", &m.post_experts)]);
        }
        if let Some(b) = &layer.per_layer_input {
            push(format!("{p}.per_layer_input_gate.weight"), weight(&b.gate));
            push(format!("{p}.per_layer_projection.weight"), weight(&b.projection));
            norms.push(("post_per_layer_input_norm", &b.norm));
        }
        for (name, n) in norms {
            push(format!("{p}.{name}.weight"), host(n.weight.val()));
        }
        if let Some(moe) = &layer.moe {
            if stacked_experts {
                push(format!("{p}.router.proj.weight"), weight(&moe.router));
                if let (Some(scale), Some(per_expert)) = (&moe.router_scale, &moe.per_expert_scale) {
                    push(format!("{p}.router.scale"), host(scale.val()));
                    push(format!("{p}.router.per_expert_scale"), host(per_expert.val()));
                }
                let (mut gate_up, mut down) = (Vec::new(), Vec::new());
                let (x, w, e) = (moe.experts.len(), moe.experts.first().map_or(0, |m| m.gate_proj.d_out()), model.config.hidden_size);
                for m in &moe.experts {
                    gate_up.extend(weight(&m.gate_proj).1);
                    gate_up.extend(weight(&m.up_proj).1);
                    down.extend(weight(&m.down_proj).1);
                }
                push(format!("{p}.experts.gate_up_proj"), (vec![x, 2 * w, e], gate_up));
                push(format!("{p}.experts.down_proj"), (vec![x, e, w], down));
            } else {
                push(format!("{p}.mlp.gate.weight"), weight(&moe.router));
            }
        }
        if model.config.layer_scalar {
            push(format!("{p}.layer_scalar"), (vec![1], vec![layer.layer_scalar as f32]));
        }
    }
    push("model.norm.weight".into(), host(model.norm.weight.val()));
    if let Some(head) = &model.lm_head {
        push("lm_head.weight".into(), weight(head));
    }
    out
}

/// Tokenizer and generation files copied from a source model directory when present.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Writes `model` as a Hugging Face directory at `out`: model.safetensors (f32), config.json
/// (`config_json` with `dtype` set to float32), and the tokenizer files of `side_files_from`.
/// Everything is written into a temporary sibling directory first and renamed into place, so
/// a crash never leaves half a model at `out`.
pub fn save_hf_dir<B: Backend>(model: &Model<B>, config_json: &Value, side_files_from: &Path, out: &Path) -> Result<(), ModelError> {
    let mut config = config_json.clone();
    if let Some(map) = config.as_object_mut() {
        map.remove("torch_dtype");
        map.insert("dtype".into(), Value::String("float32".into()));
        map.remove("quantization_config");
    }
    let tensors = hf_tensors(model);
    crate::fsutil::write_dir_atomic(out, |tmp| {
        super::weights::save_f32(&tmp.join("model.safetensors"), &tensors)?;
        write_config_and_side_files(tmp, &config, side_files_from)
    })
    .map_err(|e| match e {
        DirError::Model(e) => e,
        DirError::Io(source) => ModelError::Io { path: out.to_path_buf(), source },
    })
}

/// Errors while filling a directory: a model error, or plain I/O from creating it.
#[derive(Debug)]
pub enum DirError {
    Model(ModelError),
    Io(std::io::Error),
}

impl From<ModelError> for DirError {
    fn from(e: ModelError) -> Self {
        DirError::Model(e)
    }
}

impl From<std::io::Error> for DirError {
    fn from(e: std::io::Error) -> Self {
        DirError::Io(e)
    }
}

/// `config.json` (pretty-printed) and the tokenizer/generation files of `side_files_from`.
pub fn write_config_and_side_files(dir: &Path, config: &Value, side_files_from: &Path) -> Result<(), DirError> {
    let text = serde_json::to_string_pretty(config).unwrap_or_default();
    std::fs::write(dir.join("config.json"), text)?;
    for file in SIDE_FILES {
        let src = side_files_from.join(file);
        if src.exists() {
            std::fs::copy(&src, dir.join(file))?;
        }
    }
    Ok(())
}

/// Normal(0, std) samples from a seeded generator (Box-Muller), for reproducible init.
fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

impl<B: Backend> Model<B> {
    /// A fresh model with transformers' default initialisation: linear and embedding weights
    /// Normal(0, 0.02), biases zero, norm weights one (zero for Gemma's offset norms).
    pub fn init_random(config: ModelConfig, seed: u64, device: &B::Device) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let cfg = &config;
        let mut lin = |d_in: usize, d_out: usize, bias: bool| -> Linear<B> {
            let w = normal(&mut rng, d_out * d_in, 0.02);
            Linear::from_hf(&w, d_out, d_in, bias.then(|| Tensor::zeros([d_out], device)), device)
        };
        let norm = |d: usize| RmsNorm {
            weight: Param::from_tensor(Tensor::ones([d], device).mul_scalar(1.0 - cfg.norm_weight_offset)),
            eps: cfg.rms_norm_eps,
            offset: cfg.norm_weight_offset,
        };
        let e = cfg.hidden_size;
        let h = cfg.num_heads;
        let mut layers = Vec::new();
        // The families `[model.init]` creates: no experts, no per-layer inputs, no KV sharing.
        for spec in &cfg.layers {
            let (d, kv) = (spec.head_dim, spec.num_kv_heads);
            let self_attn = Attention {
                q_proj: lin(e, h * d, cfg.qkv_bias),
                k_proj: Some(lin(e, kv * d, cfg.qkv_bias)),
                v_proj: (!spec.k_eq_v).then(|| lin(e, kv * d, cfg.qkv_bias)),
                o_proj: lin(h * d, e, cfg.o_bias),
                q_norm: cfg.qk_norm.then(|| norm(d)),
                k_norm: cfg.qk_norm.then(|| norm(d)),
                v_norm: cfg.v_norm,
                eps: cfg.rms_norm_eps,
                num_heads: h,
                num_kv_heads: kv,
                head_dim: d,
                scale: cfg.attn_scale,
                logit_softcap: cfg.attn_logit_softcap.unwrap_or(0.0),
                cache_keep: spec.cache_keep(),
                fused: true,
                bf16_products: false,
            };
            let f = spec.mlp_width.unwrap_or(cfg.intermediate_size);
            let mlp = Mlp {
                gate_proj: lin(e, f, cfg.mlp_bias),
                up_proj: lin(e, f, cfg.mlp_bias),
                down_proj: lin(f, e, cfg.mlp_bias),
                activation: cfg.activation,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp: Some(mlp),
                moe: None,
                input_layernorm: norm(e),
                post_attention_layernorm: norm(e),
                pre_feedforward_layernorm: cfg.sandwich_norms.then(|| norm(e)),
                post_feedforward_layernorm: cfg.sandwich_norms.then(|| norm(e)),
                moe_norms: None,
                per_layer_input: None,
                layer_scalar: 1.0,
            });
        }
        let lm_head = (!cfg.tie_word_embeddings).then(|| lin(e, cfg.vocab_size, false));
        drop(lin);
        let embed = normal(&mut rng, cfg.vocab_size * e, 0.02);
        Self {
            embed_tokens: Param::from_tensor(Tensor::from_data(TensorData::new(embed, [cfg.vocab_size, e]), device)),
            per_layer: None,
            layers,
            norm: norm(e),
            lm_head,
            config,
            matmul_dtype: burn::tensor::FloatDType::F32,
        }
    }
}
