//! Hugging Face directory → GGUF, as llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize`
//! would produce it: llama.cpp's tensor names and hyper-parameter keys per architecture, the
//! few weight transformations llama.cpp's kernels expect, the tokenizer, and the per-tensor
//! type mix of the chosen file type.
//!
//! Transformations, and why:
//! - `llama` (Llama, Mistral): llama.cpp rotates adjacent pairs (GPT-J style) where HF rotates
//!   halves, so the rows of q and k are permuted within each head to match.
//! - `qwen2`, `qwen3`, `qwen3moe`, `gemma3` rotate halves in llama.cpp too (NEOX): no change.
//! - Gemma stores RMSNorm weights as offsets from one; llama.cpp multiplies by the weight, so
//!   every norm weight is written +1.
//! - Llama 3.1 rope scaling becomes a `rope_freqs` tensor of per-frequency divisors.
//! - Qwen 3 MoE experts are stacked into one 3-D tensor per projection.
//! - Gemma 4 keeps its norms as they are (no offset), its experts fused (`ffn_gate_up_exps`),
//!   and expresses proportional rope as a `rope_freqs` tensor of frequency divisors (1 where a
//!   frequency rotates, 1e30 where it is zero).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::file::{self, GgufError, TensorPlan, Value};
use super::mix::{self, Choice, FileType, MixContext};
use super::vocab::{self, VocabError};
use crate::model::config::{Arch, ConfigContext, ModelConfig, MoeKind, RopeScaling};
use crate::model::layers::inv_freq;
use crate::model::weights::TensorSource;
use crate::model::ModelError;
use crate::quant::{self, GgmlType};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Vocab(#[from] VocabError),
    #[error("tensor `{name}`: {source}")]
    Quant { name: String, source: quant::QuantError },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
}

/// llama.cpp's architecture names for the families kiln exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Gemma3,
    Gemma4,
}

impl GgufArch {
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
            GgufArch::Qwen3Moe => "qwen3moe",
            GgufArch::Gemma3 => "gemma3",
            GgufArch::Gemma4 => "gemma4",
        }
    }
}

/// Mixture-of-experts hyper-parameters (Qwen 3 MoE).
#[derive(Debug, Clone, Copy)]
struct Moe {
    experts: usize,
    experts_used: usize,
    expert_ff: usize,
}

/// How one GGUF tensor is made from the checkpoint.
#[derive(Debug, Clone)]
enum Recipe {
    /// One HF tensor, possibly transformed.
    Copy { hf: String, op: Op },
    /// `n` HF tensors `[out, in]` stacked into `[n, out, in]`.
    Stack { hf: Vec<String> },
    /// One half of each expert's rows of a fused `[experts, 2·ff, hidden]` tensor.
    Half { hf: String, second: bool },
    /// Computed, not read (llama3 rope factors).
    Values(Vec<f32>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    None,
    /// Rows regrouped from halves to pairs within each of `heads` heads.
    PermuteRope { heads: usize },
    /// Gemma's `1 + w` norm weights.
    AddOne,
}

struct Item {
    name: String,
    /// ggml order (reversed HF shape).
    dims: Vec<u64>,
    recipe: Recipe,
    choice: Choice,
}

/// Everything needed to write the file, decided before any tensor is converted.
pub struct Export {
    pub arch: GgufArch,
    pub metadata: Vec<(String, Value)>,
    items: Vec<Item>,
    weights: TensorSource,
    pub file_type: FileType,
}

/// One line per tensor that could not get the type its mix asked for.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub tensor: String,
    pub wanted: GgmlType,
    pub got: GgmlType,
    pub row: u64,
}

impl Export {
    /// Reads the config and tokenizer of `dir` and plans the file. `weights` are the
    /// checkpoint's own files unless an adapter was fused (then the fused tensors).
    pub fn plan(dir: &Path, weights: TensorSource, file_type: FileType, name: Option<String>) -> Result<Self, ExportError> {
        let config_path = dir.join("config.json");
        let raw = read_json(&config_path)?;
        let (cfg, moe) = read_config(&raw, &config_path)?;
        let arch = match (cfg.arch, moe.is_some()) {
            (_, true) => GgufArch::Qwen3Moe,
            (Arch::Llama | Arch::Mistral, _) => GgufArch::Llama,
            (Arch::Qwen2, _) => GgufArch::Qwen2,
            (Arch::Qwen3, _) => GgufArch::Qwen3,
            (Arch::Gemma3, _) => GgufArch::Gemma3,
            (Arch::Gemma4, _) => GgufArch::Gemma4,
            // read_config gives every exportable Qwen 3 MoE its `moe`.
            (Arch::Qwen3Moe, false) => unreachable!("qwen3_moe without experts"),
        };
        let prefix = ["model", "model.language_model", "language_model.model"]
            .into_iter()
            .find(|p| weights.shape(&format!("{p}.embed_tokens.weight")).is_some())
            .unwrap_or("model");
        let has_output = weights.shape("lm_head.weight").is_some();
        let mix_ctx = MixContext { n_layers: cfg.num_layers, has_output, n_expert: moe.map_or(0, |m| m.experts) };

        let mut items = Vec::new();
        let mut add = |name: String, recipe: Recipe, hf_shape: Vec<usize>| {
            let dims: Vec<u64> = hf_shape.iter().rev().map(|&d| d as u64).collect();
            let choice = mix::choose(file_type, &name, &dims, &mix_ctx);
            items.push(Item { name, dims, recipe, choice });
        };
        let shape_of = |hf: &str| -> Result<Vec<usize>, ExportError> {
            weights.shape(hf).ok_or_else(|| ModelError::MissingTensor { name: hf.to_string(), expected: vec![] }.into())
        };
        let norm_op = if cfg.norm_weight_offset != 0.0 { Op::AddOne } else { Op::None };
        let copy = |hf: String, op: Op| Recipe::Copy { hf, op };

        let embed = format!("{prefix}.embed_tokens.weight");
        add("token_embd.weight".into(), copy(embed.clone(), Op::None), shape_of(&embed)?);
        if let RopeScaling::Llama3 { .. } = cfg.ropes[0].scaling {
            let factors = rope_factors(&cfg);
            let len = factors.len();
            add("rope_freqs.weight".into(), Recipe::Values(factors), vec![len]);
        }
        if arch == GgufArch::Gemma4 {
            gemma4_items(&cfg, prefix, &weights, &mut add)?;
        }
        for i in (0..cfg.num_layers).filter(|_| arch != GgufArch::Gemma4) {
            let hf = |rest: &str| format!("{prefix}.layers.{i}.{rest}");
            let blk = |rest: &str| format!("blk.{i}.{rest}");
            let mut one = |gguf: String, hf_name: String, op: Op, required: bool| -> Result<(), ExportError> {
                match weights.shape(&hf_name) {
                    Some(shape) => {
                        add(gguf, copy(hf_name, op), shape);
                        Ok(())
                    }
                    None if !required => Ok(()),
                    None => Err(ModelError::MissingTensor { name: hf_name, expected: vec![] }.into()),
                }
            };
            let permute = |heads: usize| if arch == GgufArch::Llama { Op::PermuteRope { heads } } else { Op::None };
            one(blk("attn_norm.weight"), hf("input_layernorm.weight"), norm_op, true)?;
            one(blk("attn_q.weight"), hf("self_attn.q_proj.weight"), permute(cfg.num_heads), true)?;
            one(blk("attn_k.weight"), hf("self_attn.k_proj.weight"), permute(cfg.num_kv_heads), true)?;
            one(blk("attn_v.weight"), hf("self_attn.v_proj.weight"), Op::None, true)?;
            one(blk("attn_output.weight"), hf("self_attn.o_proj.weight"), Op::None, true)?;
            one(blk("attn_q.bias"), hf("self_attn.q_proj.bias"), permute(cfg.num_heads), cfg.qkv_bias)?;
            one(blk("attn_k.bias"), hf("self_attn.k_proj.bias"), permute(cfg.num_kv_heads), cfg.qkv_bias)?;
            one(blk("attn_v.bias"), hf("self_attn.v_proj.bias"), Op::None, cfg.qkv_bias)?;
            one(blk("attn_output.bias"), hf("self_attn.o_proj.bias"), Op::None, cfg.o_bias)?;
            one(blk("attn_q_norm.weight"), hf("self_attn.q_norm.weight"), norm_op, cfg.qk_norm)?;
            one(blk("attn_k_norm.weight"), hf("self_attn.k_norm.weight"), norm_op, cfg.qk_norm)?;
            if cfg.sandwich_norms {
                one(blk("post_attention_norm.weight"), hf("post_attention_layernorm.weight"), norm_op, true)?;
                one(blk("ffn_norm.weight"), hf("pre_feedforward_layernorm.weight"), norm_op, true)?;
                one(blk("post_ffw_norm.weight"), hf("post_feedforward_layernorm.weight"), norm_op, true)?;
            } else {
                one(blk("ffn_norm.weight"), hf("post_attention_layernorm.weight"), norm_op, true)?;
            }
            match moe {
                None => {
                    for (gguf, proj) in [("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")] {
                        one(blk(&format!("{gguf}.weight")), hf(&format!("mlp.{proj}.weight")), Op::None, true)?;
                        one(blk(&format!("{gguf}.bias")), hf(&format!("mlp.{proj}.bias")), Op::None, cfg.mlp_bias)?;
                    }
                }
                Some(m) => {
                    one(blk("ffn_gate_inp.weight"), hf("mlp.gate.weight"), Op::None, true)?;
                    let fused_gate_up = hf("mlp.experts.gate_up_proj");
                    for (gguf, proj) in [("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")] {
                        let name = blk(&format!("{gguf}.weight"));
                        // transformers 5 may store each layer's experts fused: gate_up_proj
                        // [experts, 2·ff, hidden] (gate rows first) and down_proj [experts, hidden, ff].
                        if let Some(shape) = weights.shape(&fused_gate_up) {
                            let (recipe, shape) = match proj {
                                "down_proj" => {
                                    let hf_name = hf("mlp.experts.down_proj");
                                    let shape = shape_of(&hf_name)?;
                                    (copy(hf_name, Op::None), shape)
                                }
                                _ => (Recipe::Half { hf: fused_gate_up.clone(), second: proj == "up_proj" }, vec![shape[0], shape[1] / 2, shape[2]]),
                            };
                            add(name, recipe, shape);
                            continue;
                        }
                        let names: Vec<String> = (0..m.experts).map(|e| hf(&format!("mlp.experts.{e}.{proj}.weight"))).collect();
                        let each = shape_of(&names[0])?;
                        for n in &names {
                            let s = shape_of(n)?;
                            if s != each {
                                return Err(ModelError::TensorShape { name: n.clone(), path: dir.to_path_buf(), expected: each, found: s }.into());
                            }
                        }
                        let mut shape = vec![m.experts];
                        shape.extend(&each);
                        add(name, Recipe::Stack { hf: names }, shape);
                    }
                }
            }
        }
        let norm = format!("{prefix}.norm.weight");
        add("output_norm.weight".into(), copy(norm.clone(), norm_op), shape_of(&norm)?);
        // A tied checkpoint that still stores the head writes it too, as llama.cpp's converter
        // does: the file then says exactly what the checkpoint holds.
        if let Some(shape) = weights.shape("lm_head.weight") {
            add("output.weight".into(), copy("lm_head.weight".into(), Op::None), shape);
        } else if !cfg.tie_word_embeddings {
            return Err(ModelError::MissingTensor { name: "lm_head.weight".into(), expected: vec![cfg.vocab_size, cfg.hidden_size] }.into());
        }

        let mut metadata = general_metadata(arch, file_type, name.unwrap_or_else(|| model_name(dir)));
        metadata.extend(arch_metadata(&cfg, arch, moe, &config_path)?);
        metadata.extend(vocab::metadata(dir, &cfg)?);
        Ok(Self { arch, metadata, items, weights, file_type })
    }

    /// The chat template the file carries.
    pub fn chat_template(&self) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == "tokenizer.chat_template").and_then(|(_, v)| v.as_str())
    }

    /// The texts of the end-of-turn and end-of-text tokens: where generation must stop.
    pub fn stop_strings(&self) -> Vec<String> {
        let get = |key: &str| self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let Some(Value::Array(_, tokens)) = get("tokenizer.ggml.tokens") else { return Vec::new() };
        let mut stops: Vec<String> = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id"] {
            if let Some(text) = get(key).and_then(|v| v.as_u64()).and_then(|id| tokens.get(id as usize)).and_then(|t| t.as_str())
                && !stops.iter().any(|s| s == text)
            {
                stops.push(text.to_string());
            }
        }
        stops
    }

    /// Tensors whose mix type fell back because their rows are not a multiple of 256.
    pub fn fallbacks(&self) -> Vec<Fallback> {
        self.items
            .iter()
            .filter_map(|it| it.choice.fallback_from.map(|wanted| Fallback { tensor: it.name.clone(), wanted, got: it.choice.ty, row: it.dims[0] }))
            .collect()
    }

    pub fn tensor_plan(&self) -> Vec<TensorPlan> {
        self.items.iter().map(|it| TensorPlan { name: it.name.clone(), dims: it.dims.clone(), ty: it.choice.ty }).collect()
    }

    /// Total bytes of tensor data the file will hold.
    pub fn data_bytes(&self) -> u64 {
        self.tensor_plan()
            .iter()
            .map(|t| file::TensorInfo { name: String::new(), dims: t.dims.clone(), ty: t.ty, offset: 0 }.byte_len())
            .sum()
    }

    /// Converts and writes every tensor; `progress(done_bytes, name)` after each one.
    pub fn write(&self, out: &Path, mut progress: impl FnMut(u64, &str)) -> Result<(), ExportError> {
        let plan = self.tensor_plan();
        let mut done = 0u64;
        file::write(out, &self.metadata, &plan, |i| -> Result<Vec<u8>, ExportError> {
            let item = &self.items[i];
            let values = self.values(item)?;
            let bytes = quant::quantize(item.choice.ty, &values, item.dims[0] as usize)
                .map_err(|source| ExportError::Quant { name: item.name.clone(), source })?;
            done += bytes.len() as u64;
            progress(done, &item.name);
            Ok(bytes)
        })
    }

    /// The full-precision values the file's tensor `name` was made from (after the mapping's
    /// transformations), for checking what was written.
    pub fn source_values(&self, name: &str) -> Option<Result<Vec<f32>, ExportError>> {
        self.items.iter().find(|it| it.name == name).map(|it| self.values(it))
    }

    /// The f32 values of one GGUF tensor, in ggml layout.
    fn values(&self, item: &Item) -> Result<Vec<f32>, ExportError> {
        Ok(match &item.recipe {
            Recipe::Values(v) => v.clone(),
            Recipe::Copy { hf, op } => {
                let data = self.weights.load(hf)?;
                match *op {
                    Op::None => data,
                    Op::AddOne => data.into_iter().map(|w| w + 1.0).collect(),
                    Op::PermuteRope { heads } => permute_rope_rows(&data, heads, item.dims.get(1).map_or(1, |&r| r as usize)),
                }
            }
            Recipe::Half { hf, second } => {
                let data = self.weights.load(hf)?;
                let experts = item.dims[2] as usize;
                let half = data.len() / experts / 2;
                data.chunks(2 * half).flat_map(|e| if *second { &e[half..] } else { &e[..half] }).copied().collect()
            }
            Recipe::Stack { hf } => {
                let mut out = Vec::new();
                for name in hf {
                    out.extend(self.weights.load(name)?);
                }
                out
            }
        })
    }
}

/// Reorders the rows of a q or k projection (`rows` rows, `heads` heads) from HF's
/// rotate-half layout `[h][half][j]` to llama.cpp's adjacent pairs `[h][j][half]`.
/// Works for weights (rows × cols) and biases (cols = 1).
pub fn permute_rope_rows(data: &[f32], heads: usize, rows: usize) -> Vec<f32> {
    let rows = if data.len() % rows == 0 && rows > 1 { rows } else { data.len() };
    let cols = data.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let src = h * head_dim + i * half + j;
                let dst = h * head_dim + j * 2 + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3.1 scaling as llama.cpp wants it: for each frequency, the divisor that turns the
/// unscaled frequency into the scaled one (computed in f32 as llama.cpp's converter does).
fn rope_factors(cfg: &ModelConfig) -> Vec<f32> {
    let rope = &cfg.ropes[0];
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } = rope.scaling else {
        return Vec::new();
    };
    let (factor, low, high, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position as f32);
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    let plain = inv_freq(&crate::model::config::RopeConfig { scaling: RopeScaling::None, ..rope.clone() });
    plain
        .iter()
        .map(|&freq| {
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

fn read_json(path: &Path) -> Result<Json, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.to_path_buf(), message: e.to_string() })
}

/// The resolved config, plus the MoE block for `qwen3_moe` in the form llama.cpp's `qwen3moe`
/// can express.
fn read_config(raw: &Json, path: &Path) -> Result<(ModelConfig, Option<Moe>), ModelError> {
    let cfg = ModelConfig::from_json(&raw.to_string(), path)?;
    let Some(m) = cfg.moe.clone().filter(|m| m.kind == MoeKind::Qwen3) else {
        return Ok((cfg, None));
    };
    let ctx = ConfigContext { path: path.to_path_buf() };
    if !m.norm_topk {
        return Err(ctx.invalid("norm_topk_prob", "false: llama.cpp's qwen3moe always renormalises the top-k router weights, so the exported model would compute something else"));
    }
    if cfg.layers.iter().any(|l| !l.moe) {
        return Err(ctx.invalid("mlp_only_layers", "dense layers between MoE layers have no GGUF form in llama.cpp's qwen3moe; kiln cannot export this model"));
    }
    Ok((cfg, Some(Moe { experts: m.num_experts, experts_used: m.top_k, expert_ff: m.width })))
}

fn model_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
}

fn general_metadata(arch: GgufArch, file_type: FileType, name: String) -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::String(arch.name().into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(file_type.id())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.alignment".into(), Value::U32(file::DEFAULT_ALIGNMENT as u32)),
    ]
}

/// The `<arch>.*` hyper-parameters llama.cpp reads for this family, with the value types it
/// insists on (it rejects a u32 stored as i32).
fn arch_metadata(cfg: &ModelConfig, arch: GgufArch, moe: Option<Moe>, path: &Path) -> Result<Vec<(String, Value)>, ExportError> {
    if arch == GgufArch::Gemma4 {
        return gemma4_metadata(cfg, cfg.moe.as_ref()).map_err(|message| ExportError::Unsupported { path: path.to_path_buf(), message });
    }
    let a = arch.name();
    let key = |k: &str| format!("{a}.{k}");
    let u32v = |v: usize| Value::U32(v as u32);
    let full = cfg.layers.iter().find(|l| l.sliding_window.is_none()).map_or(0, |l| l.rope);
    let rope = &cfg.ropes[full];
    let mut m = vec![
        (key("context_length"), u32v(cfg.max_position_embeddings)),
        (key("embedding_length"), u32v(cfg.hidden_size)),
        (key("block_count"), u32v(cfg.num_layers)),
        (key("feed_forward_length"), u32v(cfg.intermediate_size)),
        (key("attention.head_count"), u32v(cfg.num_heads)),
        (key("attention.head_count_kv"), u32v(cfg.num_kv_heads)),
        (key("rope.freq_base"), Value::F32(rope.theta as f32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (key("attention.key_length"), u32v(cfg.head_dim)),
        (key("attention.value_length"), u32v(cfg.head_dim)),
    ];
    let unsupported = |message: String| ExportError::Unsupported { path: path.to_path_buf(), message };
    if rope.rotary_dim != cfg.head_dim {
        return Err(unsupported(format!("partial rotary embeddings ({} of {} dims) have no form in llama.cpp's {a} architecture", rope.rotary_dim, cfg.head_dim)));
    }
    if arch == GgufArch::Llama {
        m.push((key("vocab_size"), u32v(cfg.vocab_size)));
        m.push((key("rope.dimension_count"), u32v(rope.rotary_dim)));
    }
    if let RopeScaling::Linear { factor } = rope.scaling {
        m.push((key("rope.scaling.type"), Value::String("linear".into())));
        m.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    if let Some(moe) = moe {
        m.push((key("expert_count"), u32v(moe.experts)));
        m.push((key("expert_used_count"), u32v(moe.experts_used)));
        m.push((key("expert_feed_forward_length"), u32v(moe.expert_ff)));
    }
    if arch == GgufArch::Gemma3 {
        gemma3_metadata(cfg, &key, &mut m).map_err(unsupported)?;
    }
    Ok(m)
}

/// Gemma 4's tensors past the token embedding and before the final norm, as llama.cpp's
/// converter names them (`conversion/gemma.py`, `Gemma4Model`).
fn gemma4_items(cfg: &ModelConfig, prefix: &str, weights: &TensorSource, add: &mut dyn FnMut(String, Recipe, Vec<usize>)) -> Result<(), ExportError> {
    let copy = |hf: String| Recipe::Copy { hf, op: Op::None };
    let mut take = |gguf: String, hf: String, required: bool| -> Result<(), ExportError> {
        match weights.shape(&hf) {
            Some(shape) => {
                add(gguf, copy(hf), shape);
                Ok(())
            }
            None if !required => Ok(()),
            None => Err(ModelError::MissingTensor { name: hf, expected: vec![] }.into()),
        }
    };
    if cfg.per_layer_input.is_some() {
        take("per_layer_token_embd.weight".into(), format!("{prefix}.embed_tokens_per_layer.weight"), true)?;
        take("per_layer_model_proj.weight".into(), format!("{prefix}.per_layer_model_projection.weight"), true)?;
        take("per_layer_proj_norm.weight".into(), format!("{prefix}.per_layer_projection_norm.weight"), true)?;
    }
    for (i, layer) in cfg.layers.iter().enumerate() {
        let hf = |rest: &str| format!("{prefix}.layers.{i}.{rest}");
        let blk = |rest: &str| format!("blk.{i}.{rest}");
        let owns_kv = layer.kv_source.is_none();
        for (gguf, name, required) in [
            ("attn_norm.weight", "input_layernorm.weight", true),
            ("attn_q.weight", "self_attn.q_proj.weight", true),
            ("attn_k.weight", "self_attn.k_proj.weight", owns_kv),
            ("attn_v.weight", "self_attn.v_proj.weight", owns_kv && !layer.k_eq_v),
            ("attn_output.weight", "self_attn.o_proj.weight", true),
            ("attn_q_norm.weight", "self_attn.q_norm.weight", true),
            ("attn_k_norm.weight", "self_attn.k_norm.weight", owns_kv),
            ("post_attention_norm.weight", "post_attention_layernorm.weight", true),
            ("ffn_norm.weight", "pre_feedforward_layernorm.weight", true),
            ("post_ffw_norm.weight", "post_feedforward_layernorm.weight", true),
            ("ffn_gate.weight", "mlp.gate_proj.weight", true),
            ("ffn_up.weight", "mlp.up_proj.weight", true),
            ("ffn_down.weight", "mlp.down_proj.weight", true),
            ("layer_output_scale.weight", "layer_scalar", true),
        ] {
            // Only what this layer has: a KV-sharing layer's checkpoint may still carry unused
            // k/v tensors, which llama.cpp would refuse as unexpected.
            if required || (owns_kv && !(layer.k_eq_v && gguf == "attn_v.weight")) {
                take(blk(gguf), hf(name), required)?;
            }
        }
        if cfg.per_layer_input.is_some() {
            take(blk("inp_gate.weight"), hf("per_layer_input_gate.weight"), true)?;
            take(blk("proj.weight"), hf("per_layer_projection.weight"), true)?;
            take(blk("post_norm.weight"), hf("post_per_layer_input_norm.weight"), true)?;
        }
        if layer.moe {
            for (gguf, name) in [
                ("ffn_gate_inp.weight", "router.proj.weight"),
                ("ffn_gate_inp.scale", "router.scale"),
                ("ffn_down_exps.scale", "router.per_expert_scale"),
                ("ffn_gate_up_exps.weight", "experts.gate_up_proj"),
                ("ffn_down_exps.weight", "experts.down_proj"),
                ("post_ffw_norm_1.weight", "post_feedforward_layernorm_1.weight"),
                ("pre_ffw_norm_2.weight", "pre_feedforward_layernorm_2.weight"),
                ("post_ffw_norm_2.weight", "post_feedforward_layernorm_2.weight"),
            ] {
                take(blk(gguf), hf(name), true)?;
            }
        }
    }
    if let Some(full) = cfg.layers.iter().find(|l| l.sliding_window.is_none()) {
        if let RopeScaling::Proportional { angles, .. } = cfg.ropes[full.rope].scaling {
            let half = full.head_dim / 2;
            let factors: Vec<f32> = (0..half).map(|j| if j < angles { 1.0 } else { 1e30 }).collect();
            add("rope_freqs.weight".into(), Recipe::Values(factors), vec![half]);
        }
    }
    Ok(())
}

/// `gemma4.*` hyper-parameters, and a refusal for what llama.cpp's gemma4 graph cannot compute.
fn gemma4_metadata(cfg: &ModelConfig, moe: Option<&crate::model::config::MoeConfig>) -> Result<Vec<(String, Value)>, String> {
    let key = |k: &str| format!("gemma4.{k}");
    let u32v = |v: usize| Value::U32(v as u32);
    let n = cfg.num_layers;
    let full: Vec<_> = cfg.layers.iter().filter(|l| l.sliding_window.is_none()).collect();
    let sliding: Vec<_> = cfg.layers.iter().filter(|l| l.sliding_window.is_some()).collect();
    let (Some(f), s) = (full.first(), sliding.first()) else { return Err("no full-attention layer".into()) };
    let s = s.copied().unwrap_or(f);
    if cfg.activation != crate::model::config::Activation::GeluTanh {
        return Err("llama.cpp's gemma4 uses the tanh GELU only".into());
    }
    if cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias {
        return Err("biases on the projections are not part of llama.cpp's gemma4".into());
    }
    if cfg.per_layer_input.as_ref().is_some_and(|p| p.vocab != cfg.vocab_size) {
        return Err("vocab_size_per_layer_input differs from vocab_size, which llama.cpp's gemma4 cannot hold".into());
    }
    for group in [&full, &sliding] {
        if group.iter().any(|l| l.head_dim != group[0].head_dim || l.num_kv_heads != group[0].num_kv_heads) {
            return Err("layers of one attention type differ in head_dim or key/value heads".into());
        }
    }
    match cfg.ropes[f.rope].scaling {
        RopeScaling::Proportional { factor, .. } if factor == 1.0 => {}
        RopeScaling::None => {}
        _ => return Err("full-attention rope must be proportional (factor 1) or default for llama.cpp's gemma4".into()),
    }
    if sliding.first().is_some() && !matches!(cfg.ropes[s.rope].scaling, RopeScaling::None) {
        return Err("rope scaling on sliding-window layers has no form in llama.cpp's gemma4".into());
    }
    // llama.cpp's shared layers reuse layer n-shared-2 (sliding) or n-shared-1 (full).
    let shared = cfg.layers.iter().filter(|l| l.kv_source.is_some()).count();
    for (i, l) in cfg.layers.iter().enumerate() {
        if let Some(j) = l.kv_source {
            let back = if l.sliding_window.is_some() { shared + 2 } else { shared + 1 };
            let want = n.checked_sub(back);
            if want != Some(j) {
                let uses = want.map_or_else(|| "no layer".to_string(), |w| format!("layer {w}"));
                return Err(format!("layer {i} shares keys and values with layer {j}; llama.cpp's gemma4 would use {uses} (it expects the last two unshared layers to be sliding, then full)"));
            }
        }
    }
    let per_layer = |f: &dyn Fn(&crate::model::config::LayerSpec) -> usize| -> Value {
        let values: Vec<usize> = cfg.layers.iter().map(f).collect();
        if values.iter().all(|&v| v == values[0]) {
            u32v(values[0])
        } else {
            Value::Array(super::file::ValueType::I32, values.into_iter().map(|v| Value::I32(v as i32)).collect())
        }
    };
    let mut m = vec![
        (key("context_length"), u32v(cfg.max_position_embeddings)),
        (key("embedding_length"), u32v(cfg.hidden_size)),
        (key("block_count"), u32v(n)),
        (key("feed_forward_length"), per_layer(&|l| l.mlp_width.unwrap_or(0))),
        (key("attention.head_count"), u32v(cfg.num_heads)),
        (key("attention.head_count_kv"), per_layer(&|l| l.num_kv_heads)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (key("rope.freq_base"), Value::F32(cfg.ropes[f.rope].theta as f32)),
        (key("rope.freq_base_swa"), Value::F32(cfg.ropes[s.rope].theta as f32)),
        (key("attention.sliding_window"), u32v(s.sliding_window.unwrap_or(cfg.max_position_embeddings))),
        (key("attention.sliding_window_pattern"), Value::Array(super::file::ValueType::Bool, cfg.layers.iter().map(|l| Value::Bool(l.sliding_window.is_some())).collect())),
        (key("attention.shared_kv_layers"), u32v(shared)),
        (key("embedding_length_per_layer_input"), u32v(cfg.per_layer_input.as_ref().map_or(0, |p| p.dim))),
        (key("attention.key_length"), u32v(f.head_dim)),
        (key("attention.value_length"), u32v(f.head_dim)),
        (key("attention.key_length_swa"), u32v(s.head_dim)),
        (key("attention.value_length_swa"), u32v(s.head_dim)),
        (key("rope.dimension_count"), u32v(f.head_dim)),
        (key("rope.dimension_count_swa"), u32v(cfg.ropes[s.rope].rotary_dim)),
    ];
    if let Some(c) = cfg.final_logit_softcap {
        m.push((key("final_logit_softcapping"), Value::F32(c as f32)));
    }
    if let Some(moe) = moe {
        m.push((key("expert_count"), u32v(moe.num_experts)));
        m.push((key("expert_used_count"), u32v(moe.top_k)));
        m.push((key("expert_feed_forward_length"), u32v(moe.width)));
    }
    Ok(m)
}

/// Gemma 3's sliding-window layers: llama.cpp assumes every sixth layer is global unless told
/// otherwise, and uses 1/sqrt(head_dim) as the attention scale (1/sqrt(hidden/heads) for the
/// 62-layer 27B); a config that differs gets an explicit pattern, or a refusal.
fn gemma3_metadata(cfg: &ModelConfig, key: &dyn Fn(&str) -> String, m: &mut Vec<(String, Value)>) -> Result<(), String> {
    if let Some(window) = cfg.layers.iter().find_map(|l| l.sliding_window) {
        m.push((key("attention.sliding_window"), Value::U32(window as u32)));
        let sliding = cfg.layers.iter().find(|l| l.sliding_window.is_some()).map_or(0, |l| l.rope);
        m.push((key("rope.freq_base_swa"), Value::F32(cfg.ropes[sliding].theta as f32)));
        if !matches!(cfg.ropes[sliding].scaling, RopeScaling::None) {
            return Err("rope scaling on Gemma 3's sliding-window layers has no form in llama.cpp".into());
        }
        let pattern: Vec<bool> = cfg.layers.iter().map(|l| l.sliding_window.is_some()).collect();
        let default: Vec<bool> = (0..cfg.num_layers).map(|i| i % 6 < 5).collect();
        if pattern != default {
            m.push((key("attention.sliding_window_pattern"), Value::Array(super::file::ValueType::Bool, pattern.into_iter().map(Value::Bool).collect())));
        }
    }
    if let Some(c) = cfg.final_logit_softcap {
        m.push((key("final_logit_softcapping"), Value::F32(c as f32)));
    }
    if cfg.attn_logit_softcap.is_some() {
        return Err("attention logit soft-capping is not part of llama.cpp's gemma3 architecture".into());
    }
    let llama_cpp_scale = if cfg.num_layers == 62 { 1.0 / ((cfg.hidden_size / cfg.num_heads) as f64).sqrt() } else { 1.0 / (cfg.head_dim as f64).sqrt() };
    if (cfg.attn_scale - llama_cpp_scale).abs() > 1e-6 * llama_cpp_scale {
        return Err(format!(
            "query_pre_attn_scalar gives an attention scale of {:.6}, but llama.cpp's gemma3 uses {llama_cpp_scale:.6} for this geometry",
            cfg.attn_scale
        ));
    }
    Ok(())
}
