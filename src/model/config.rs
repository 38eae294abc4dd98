//! config.json -> [`ModelConfig`].
//!
//! Two types, as candle's llama does it: [`HfConfig`] mirrors the file (every field optional,
//! transformers 4 and 5 spellings both accepted), and [`ModelConfig`] is what the model code
//! reads, with every default applied and every architecture difference spelled out as data.
//! The per-architecture rules live in `arch/`; this file holds what they share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::arch;
use super::ModelError;

/// config.json as written. Unknown keys are ignored: HF configs carry many we do not need.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub hidden_activation: Option<String>,
    /// transformers 4: `rope_theta` + `rope_scaling`; transformers 5: `rope_parameters`, either
    /// one dict or (Gemma 3) one dict per layer type.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    /// Gemma 3, transformers 4: the rope base of sliding-window layers.
    pub rope_local_base_freq: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    #[serde(alias = "_sliding_window_pattern")]
    pub sliding_window_pattern: Option<usize>,
    pub query_pre_attn_scalar: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    #[serde(alias = "torch_dtype")]
    pub dtype: Option<String>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    /// Multimodal checkpoints (Gemma 3 4B+) nest the language model's config here.
    pub text_config: Option<Box<HfConfig>>,
    /// Gemma 4: per-layer overrides (`{"3": {"head_dim": 512}}`), or, in older configs,
    /// `global_head_dim` / `num_global_key_value_heads` for the full-attention layers.
    pub per_layer_config: Option<Value>,
    pub global_head_dim: Option<usize>,
    pub num_global_key_value_heads: Option<usize>,
    /// Gemma 4's per-layer input embeddings (0 or absent: none).
    pub hidden_size_per_layer_input: Option<usize>,
    pub vocab_size_per_layer_input: Option<usize>,
    pub attention_k_eq_v: Option<bool>,
    pub use_bidirectional_attention: Option<Value>,
    pub num_kv_shared_layers: Option<usize>,
    pub use_double_wide_mlp: Option<bool>,
    pub enable_moe_block: Option<bool>,
    /// Mixture of experts: Qwen 3 MoE spells them `num_experts` (or `num_local_experts`) and
    /// `num_experts_per_tok`, Gemma 4 `num_experts` and `top_k_experts`.
    #[serde(alias = "num_local_experts")]
    pub num_experts: Option<usize>,
    #[serde(alias = "top_k_experts")]
    pub num_experts_per_tok: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
}

/// Which decoder family; decides naming and the small differences between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Gemma3,
    Gemma4,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Gemma3 => "gemma3",
            Arch::Gemma4 => "gemma4",
        }
    }
}

/// The gated MLP's activation: silu, GELU with the tanh approximation (`gelu_pytorch_tanh`),
/// exact (erf) GELU. One enum with the fused `act(gate) · up` operation's.
pub use kiln_kernels::GateActivation as Activation;

/// How the rotary frequencies are stretched for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers `linear`).
    Linear { factor: f64 },
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position: f64 },
    /// Gemma 4's "proportional" rope: the first `angles` frequencies of the full head's
    /// spectrum rotate (`theta^(-2i/head_dim)`, divided by `factor`), the rest have frequency 0
    /// and pass through. Unlike partial rotary, pairs still span the whole head (i, i + d/2).
    Proportional { angles: usize, factor: f64 },
}

/// One rotary embedding: layers of one type share it.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// How many leading dims of each head rotate (head_dim unless partial rotary).
    pub rotary_dim: usize,
}

/// What differs per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Keys further back than this many positions are masked (the query itself included).
    pub sliding_window: Option<usize>,
    /// Index into [`ModelConfig::ropes`].
    pub rope: usize,
    pub head_dim: usize,
    pub num_kv_heads: usize,
    /// Gemma 4's KV sharing: this layer computes no keys or values of its own and attends over
    /// those of the given earlier layer.
    pub kv_source: Option<usize>,
    /// Keys double as values (Gemma 4's `attention_k_eq_v` on full-attention layers).
    pub k_eq_v: bool,
    /// Width of the dense MLP; None for a layer whose feed-forward is experts only.
    pub mlp_width: Option<usize>,
    /// The layer has a mixture-of-experts block ([`ModelConfig::moe`]).
    pub moe: bool,
}

impl LayerSpec {
    /// Cached positions a later query can still see: window − 1 on a sliding-window layer, all
    /// (0) otherwise.
    pub fn cache_keep(&self) -> usize {
        self.sliding_window.map_or(0, |w| w.saturating_sub(1).max(1))
    }
}

/// A mixture-of-experts block: a router picks `top_k` of `num_experts` gated MLPs per token.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Each expert's MLP width.
    pub width: usize,
    /// Renormalise the chosen experts' probabilities to sum to one.
    pub norm_topk: bool,
    pub kind: MoeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeKind {
    /// Qwen 3 MoE: the experts replace the MLP and read its normalised input.
    Qwen3,
    /// Gemma 4: the experts run beside the dense MLP on the block's residual input, with their
    /// own norms; the router normalises its input and scales each expert's weight.
    Gemma4,
}

/// Gemma 4's per-layer input embeddings: a second table of `dim` values per layer and token.
#[derive(Debug, Clone, PartialEq)]
pub struct PerLayerInput {
    pub dim: usize,
    pub vocab: usize,
}

/// Everything the model code needs, resolved. No Options where a default exists.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm on each query and key head before rope (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma stores RMSNorm weights as an offset from one: `x̂ · (1 + w)`.
    pub norm_weight_offset: f64,
    /// Gemma's extra norms after attention and around the MLP.
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Embeddings multiplied by this (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f64>,
    /// Attention logits are multiplied by this.
    pub attn_scale: f64,
    pub attn_logit_softcap: Option<f64>,
    pub final_logit_softcap: Option<f64>,
    pub ropes: Vec<RopeConfig>,
    pub layers: Vec<LayerSpec>,
    /// Gemma 4: values RMS-normalised per head (no weight).
    pub v_norm: bool,
    /// Gemma 4: each layer's output is multiplied by its stored `layer_scalar`.
    pub layer_scalar: bool,
    pub per_layer_input: Option<PerLayerInput>,
    pub moe: Option<MoeConfig>,
    /// The dtype the checkpoint was saved in (`float32`, `bfloat16`, ...).
    pub dtype: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads `dir/config.json` and, when present, the EOS ids of `dir/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let mut cfg = Self::from_json(&text, &path)?;
        let gen_path = dir.join("generation_config.json");
        if let Ok(text) = std::fs::read_to_string(&gen_path) {
            let generation: Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Config { path: gen_path.clone(), message: e.to_string() })?;
            for id in token_ids(generation.get("eos_token_id")) {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
        }
        Ok(cfg)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self, ModelError> {
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config { path: path.to_path_buf(), message: e.to_string() })?;
        let ctx = ConfigContext { path: path.to_path_buf() };
        let model_type = hf.model_type.clone().ok_or_else(|| ctx.missing("model_type"))?;
        // Multimodal wrappers: the text model's config sits in `text_config`.
        let (hf, model_type) = match (&hf.text_config, model_type.as_str()) {
            (Some(text), "gemma3" | "gemma4") => {
                let mut text = (**text).clone();
                text.eos_token_id = text.eos_token_id.or(hf.eos_token_id.clone());
                text.bos_token_id = text.bos_token_id.or(hf.bos_token_id.clone());
                text.dtype = text.dtype.or(hf.dtype.clone());
                (text, format!("{model_type}_text"))
            }
            _ => (hf, model_type),
        };
        let cfg = match model_type.as_str() {
            "llama" => arch::llama::config(&hf, &ctx, Arch::Llama),
            "mistral" => arch::llama::config(&hf, &ctx, Arch::Mistral),
            "qwen2" => arch::qwen::config(&hf, &ctx, Arch::Qwen2),
            "qwen3" => arch::qwen::config(&hf, &ctx, Arch::Qwen3),
            "qwen3_moe" => arch::qwen::config(&hf, &ctx, Arch::Qwen3Moe),
            "gemma3_text" => arch::gemma3::config(&hf, &ctx),
            "gemma4_text" => arch::gemma4::config(&hf, &ctx),
            other => Err(ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                model_type: other.to_string(),
            }),
        }?;
        cfg.check_sizes(&ctx)?;
        Ok(cfg)
    }

    /// Refuses sizes no model has, far above the largest released (a 2^20 hidden, attention or
    /// MLP width, a 2^24 vocabulary, 2^16 layers, heads or experts): the memory plan and the loader
    /// multiply them together, and a typo should be an error rather than an overflow.
    fn check_sizes(&self, ctx: &ConfigContext) -> Result<(), ModelError> {
        let moe = self.moe.as_ref();
        let widths = self.layers.iter().filter_map(|l| l.mlp_width).chain(moe.map(|m| m.width)).max().unwrap_or(0);
        let head_dim = self.layers.iter().map(|l| l.head_dim).max().unwrap_or(self.head_dim);
        for (key, value, limit) in [
            ("hidden_size", self.hidden_size, 1 << 20),
            ("intermediate_size", self.intermediate_size.max(widths), 1 << 20),
            ("vocab_size", self.vocab_size, 1 << 24),
            ("num_hidden_layers", self.num_layers, 1 << 16),
            ("num_attention_heads", self.num_heads, 1 << 16),
            ("head_dim", head_dim, 1 << 16),
            ("head_dim", self.num_heads.saturating_mul(head_dim), 1 << 20),
            ("num_experts", moe.map_or(0, |m| m.num_experts), 1 << 16),
        ] {
            if value > limit {
                let what = if key == "head_dim" && value > head_dim { format!("num_attention_heads × head_dim = {value}") } else { value.to_string() };
                return Err(ctx.invalid(key, format!("{what} is larger than any model kiln can hold (at most {limit})")));
            }
        }
        Ok(())
    }

    pub fn num_params_estimate(&self) -> usize {
        let d = self.hidden_size;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let attn = d * l.head_dim * (2 * self.num_heads + 2 * l.num_kv_heads);
                let mlp = 3 * d * l.mlp_width.unwrap_or(0);
                let experts = match (&self.moe, l.moe) {
                    (Some(m), true) => m.num_experts * (3 * d * m.width + d),
                    _ => 0,
                };
                attn + mlp + experts
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        let ple = self.per_layer_input.as_ref().map_or(0, |p| p.vocab * p.dim * self.num_layers + d * p.dim * self.num_layers * 3);
        self.vocab_size * d + layers + head + ple
    }

    /// Whether any layer routes tokens through experts.
    pub fn has_experts(&self) -> bool {
        self.moe.is_some() && self.layers.iter().any(|l| l.moe)
    }
}

/// Where a config came from, for error messages.
pub struct ConfigContext {
    pub path: PathBuf,
}

impl ConfigContext {
    pub fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingConfigKey { path: self.path.clone(), key: key.to_string() }
    }

    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ModelError {
        ModelError::InvalidConfigValue {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub fn require<T: Copy>(&self, value: Option<T>, key: &str) -> Result<T, ModelError> {
        value.ok_or_else(|| self.missing(key))
    }
}

/// Token ids given as a number, a list of numbers or null.
pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

/// The fields every decoder shares, read with their defaults. `arch/` files start from this and
/// change what their family does differently.
pub fn base_config(hf: &HfConfig, ctx: &ConfigContext, arch: Arch) -> Result<ModelConfig, ModelError> {
    let hidden_size = ctx.require(hf.hidden_size, "hidden_size")?;
    let num_heads = ctx.require(hf.num_attention_heads, "num_attention_heads")?;
    let num_layers = ctx.require(hf.num_hidden_layers, "num_hidden_layers")?;
    let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(ctx.invalid(
            "num_key_value_heads",
            format!("{num_kv_heads} must divide num_attention_heads ({num_heads})"),
        ));
    }
    let head_dim = match hf.head_dim {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => return Err(ctx.missing("head_dim")),
    };
    if head_dim % 2 != 0 {
        return Err(ctx.invalid("head_dim", format!("{head_dim} must be even for rotary embeddings")));
    }
    let activation = parse_activation(
        hf.hidden_act.as_deref().or(hf.hidden_activation.as_deref()).unwrap_or("silu"),
        ctx,
    )?;
    Ok(ModelConfig {
        arch,
        model_type: hf.model_type.clone().unwrap_or_default(),
        vocab_size: ctx.require(hf.vocab_size, "vocab_size")?,
        hidden_size,
        intermediate_size: ctx.require(hf.intermediate_size, "intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        qkv_bias: hf.attention_bias.unwrap_or(false),
        o_bias: hf.attention_bias.unwrap_or(false),
        mlp_bias: hf.mlp_bias.unwrap_or(false),
        qk_norm: false,
        norm_weight_offset: 0.0,
        sandwich_norms: false,
        activation,
        embed_scale: None,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
        attn_logit_softcap: None,
        final_logit_softcap: None,
        ropes: Vec::new(),
        layers: Vec::new(),
        v_norm: false,
        layer_scalar: false,
        per_layer_input: None,
        moe: None,
        dtype: hf.dtype.clone().unwrap_or_else(|| "float32".into()),
        bos_token_id: token_ids(hf.bos_token_id.as_ref()).first().copied(),
        eos_token_ids: token_ids(hf.eos_token_id.as_ref()),
    })
}

fn parse_activation(name: &str, ctx: &ConfigContext) -> Result<Activation, ModelError> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(ctx.invalid("hidden_act", format!("unsupported activation `{other}` (expected silu, gelu or gelu_pytorch_tanh)"))),
    }
}

/// The rope settings of a single-rope model, from either spelling:
/// transformers 5 `rope_parameters: {rope_theta, rope_type, ...}` or transformers 4
/// `rope_theta` + `rope_scaling: {rope_type|type, factor, ...}`.
pub fn single_rope(hf: &HfConfig, ctx: &ConfigContext, rotary_dim: usize, default_theta: f64) -> Result<RopeConfig, ModelError> {
    match &hf.rope_parameters {
        Some(params @ Value::Object(_)) => rope_from_params(params, hf.rope_theta.unwrap_or(default_theta), rotary_dim, ctx, "rope_parameters"),
        Some(_) => Err(ctx.invalid("rope_parameters", "expected an object")),
        None => {
            let theta = hf.rope_theta.unwrap_or(default_theta);
            match &hf.rope_scaling {
                None | Some(Value::Null) => Ok(RopeConfig { theta, scaling: RopeScaling::None, rotary_dim }),
                Some(scaling) => rope_from_params(scaling, theta, rotary_dim, ctx, "rope_scaling"),
            }
        }
    }
}

/// One rope dict (`rope_type` or the older `type`, `rope_theta`, scaling fields).
pub fn rope_from_params(params: &Value, default_theta: f64, rotary_dim: usize, ctx: &ConfigContext, key: &str) -> Result<RopeConfig, ModelError> {
    let map: BTreeMap<String, Value> = serde_json::from_value(params.clone())
        .map_err(|_| ctx.invalid(key, "expected an object"))?;
    let num = |name: &str| -> Option<f64> { map.get(name).and_then(Value::as_f64) };
    let need = |name: &str| -> Result<f64, ModelError> {
        num(name).ok_or_else(|| ctx.missing(&format!("{key}.{name}")))
    };
    let theta = num("rope_theta").unwrap_or(default_theta);
    let kind = map
        .get("rope_type")
        .or_else(|| map.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "proportional" => {
            let share = num("partial_rotary_factor").unwrap_or(1.0);
            let angles = (share * rotary_dim as f64) as usize / 2;
            let factor = num("factor").unwrap_or(1.0);
            // The whole head rotates (zero frequencies past `angles`), so no partial width below.
            return Ok(RopeConfig { theta, scaling: RopeScaling::Proportional { angles, factor }, rotary_dim });
        }
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(ctx.invalid(
                &format!("{key}.rope_type"),
                format!("rope type `{other}` is not supported (supported: default, linear, llama3, proportional)"),
            ))
        }
    };
    let rotary_dim = match num("partial_rotary_factor") {
        Some(f) => ((rotary_dim as f64 * f) as usize) & !1,
        None => rotary_dim,
    };
    Ok(RopeConfig { theta, scaling, rotary_dim })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA_T4: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rope_theta":500000.0,
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192},"torch_dtype":"bfloat16","eos_token_id":[1,2]}"#;

    #[test]
    fn reads_transformers4_spelling() {
        let cfg = ModelConfig::from_json(LLAMA_T4, Path::new("config.json")).unwrap();
        assert_eq!(cfg.dtype, "bfloat16");
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.eos_token_ids, vec![1, 2]);
        assert_eq!(cfg.ropes[0].theta, 500000.0);
        assert!(matches!(cfg.ropes[0].scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn missing_key_is_named() {
        let err = ModelConfig::from_json(r#"{"model_type":"llama","vocab_size":10}"#, Path::new("x/config.json")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("hidden_size") && msg.contains("x/config.json"), "{msg}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = ModelConfig::from_json(r#"{"model_type":"rwkv"}"#, Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("rwkv"), "{err}");
    }
}
