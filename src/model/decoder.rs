//! The decoder shared by every supported family, top to bottom: attention → MLP → block →
//! model → LM head, with the KV cache the caller owns.
//!
//! Dims: b batch, s new positions, t all positions (cache + new), h query heads, kv key/value
//! heads, d head dim, e hidden size, f MLP width, v vocab.

use std::path::Path;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::FloatDType;

use super::config::{Activation, ModelConfig, MoeKind};
use super::layers::{apply_rope, causal_mask, inv_freq, load_tensor, packed_mask, rms_normalize, rope_tables, Linear, RmsNorm};
use super::moe::{Moe, RouterStats};
use super::weights::WeightFiles;
use crate::quant::affine::QuantSpec;
use kiln_kernels::attention::attention_composition;
use kiln_kernels::{flash_attention, gated_act, AttentionSpec, QuantMatmul};
use super::ModelError;

/// Keys and values of every layer so far, each `[b, kv, t, d]` (a sliding-window layer keeps
/// only its last window − 1 positions; a KV-sharing layer keeps none). Created by
/// [`Model::make_cache`]; passed to [`Model::forward`] to decode one step at a time.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<Kv<B>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions layer `i` holds (fewer than [`KvCache::len`] for a sliding-window layer, 0 for
    /// a layer that shares another's keys and values).
    pub fn layer_len(&self, i: usize) -> usize {
        self.layers.get(i).and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[2])
    }

    /// A cache of one sequence repeated as `n` rows, so that `n` continuations of one prompt
    /// decode side by side after a single prefill.
    pub fn repeat_rows(&self, n: usize) -> Self {
        let layers = self.layers.iter().map(|l| l.as_ref().map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n)))).collect();
        Self { layers, len: self.len }
    }
}

/// One layer's keys and values, `[b, kv, t, d]` each.
pub type Kv<B> = (Tensor<B, 4>, Tensor<B, 4>);

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    /// None on a layer that attends over another layer's keys and values (Gemma 4 KV sharing).
    pub k_proj: Option<Linear<B>>,
    /// None where keys double as values, or keys and values are shared.
    pub v_proj: Option<Linear<B>>,
    pub o_proj: Linear<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    /// Gemma 4 RMS-normalises values (no weight).
    pub v_norm: bool,
    pub eps: f64,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    /// 0 when off.
    pub logit_softcap: f64,
    /// A sliding-window layer's cache keeps only the last `window - 1` positions: no later
    /// query can see further back. 0: keep everything.
    pub cache_keep: usize,
    /// Attention as one operation that keeps no score matrix for backward
    /// ([`kiln_kernels::flash_attention`]); false: the plain composition (the reference).
    pub fused: bool,
    /// Multiply the fused attention's dense products in bf16 ([`AttentionSpec::bf16_products`]):
    /// set with the bf16 frozen weights ([`Model::to_bf16_matmuls`]).
    pub bf16_products: bool,
}

impl<B: QuantMatmul> Attention<B> {
    fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig, index: usize, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let spec = &cfg.layers[index];
        let (e, d, h, kv) = (cfg.hidden_size, spec.head_dim, cfg.num_heads, spec.num_kv_heads);
        let owns_kv = spec.kv_source.is_none();
        let norm = |name: &str| -> Result<Option<RmsNorm<B>>, ModelError> {
            if cfg.qk_norm {
                let path = format!("{prefix}.{name}");
                Ok(Some(RmsNorm::load(files, &path, d, cfg.rms_norm_eps, cfg.norm_weight_offset, device)?))
            } else {
                Ok(None)
            }
        };
        let proj = |name: &str, d_in: usize, d_out: usize, bias: bool| Linear::load(files, &format!("{prefix}.{name}"), d_in, d_out, bias, quantize, device);
        Ok(Self {
            q_proj: proj("q_proj", e, h * d, cfg.qkv_bias)?,
            k_proj: if owns_kv { Some(proj("k_proj", e, kv * d, cfg.qkv_bias)?) } else { None },
            v_proj: if owns_kv && !spec.k_eq_v { Some(proj("v_proj", e, kv * d, cfg.qkv_bias)?) } else { None },
            o_proj: proj("o_proj", h * d, e, cfg.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: if owns_kv { norm("k_norm")? } else { None },
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
        })
    }

    /// The dtype the norm before this block writes: bf16 where the query, key and value
    /// projections (those it has) all multiply it in bf16.
    fn input_dtype(&self) -> FloatDType {
        half_if([Some(&self.q_proj), self.k_proj.as_ref(), self.v_proj.as_ref()].into_iter().flatten().all(|l| l.reads_bf16()))
    }

    /// `x` `[b, s, e]`; `rope` the (cos, sin) tables `[b or 1, s, r]` of these positions; `mask`
    /// `[b or 1, s, t]`; `shared` the keys and values of the layer this one shares with (its
    /// cache already applied). Returns the output, the keys and values attended over, and with
    /// `keep_probs` the attention probabilities `[b, h, s, t]` (probes).
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 3>, Tensor<B, 3>),
        mask: &Tensor<B, 3>,
        cache: Option<&mut Option<Kv<B>>>,
        shared: Option<Kv<B>>,
        keep_probs: bool,
    ) -> (Tensor<B, 3>, Kv<B>, Option<Tensor<B, 4>>) {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]); // [b, s, h*d] -> [b, s, h, d]
        let q = match &self.q_norm {
            Some(n) => n.forward(q),
            None => q,
        };
        let q = apply_rope(q.swap_dims(1, 2), &rope.0, &rope.1); // [b, s, h, d] -> [b, h, s, d]

        let (k, v) = match (shared, &self.k_proj) {
            (Some(kv), _) => {
                // Burn 0.21 on wgpu: without this flush (after the queries, before reusing another
                // layer's keys and values), one decode step of the gemma4-kv-shared fixture
                // (cache length 8, lavapipe) came out wrong; a flush before the layer did not
                // help, so it is an operation-fusion fault inside Burn, not a race in kiln. Costs
                // one synchronisation per KV-sharing layer and forward.
                let _ = B::sync(&kv.0.device());
                kv
            }
            (None, Some(k_proj)) => {
                let k = k_proj.forward(x.clone()).reshape([b, s, kv, d]); // [b, s, kv*d] -> [b, s, kv, d]
                let v = match &self.v_proj {
                    Some(v_proj) => v_proj.forward(x).reshape([b, s, kv, d]),
                    None => k.clone(), // keys double as values, before the key norm and rope
                };
                let k = match &self.k_norm {
                    Some(n) => n.forward(k),
                    None => k,
                };
                let v = if self.v_norm { rms_normalize(v, self.eps) } else { v };
                let k = apply_rope(k.swap_dims(1, 2), &rope.0, &rope.1); // [b, s, kv, d] -> [b, kv, s, d]
                let v = v.swap_dims(1, 2); // [b, s, kv, d] -> [b, kv, s, d]
                match cache {
                    Some(slot) => {
                        let (k, v) = match slot.take() {
                            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)), // [b, kv, t, d]
                            None => (k, v),
                        };
                        let t = k.dims()[2];
                        *slot = Some(if self.cache_keep > 0 && t > self.cache_keep {
                            let from = t - self.cache_keep;
                            (k.clone().narrow(2, from, self.cache_keep), v.clone().narrow(2, from, self.cache_keep))
                        } else {
                            (k.clone(), v.clone())
                        });
                        (k, v)
                    }
                    None => (k, v),
                }
            }
            (None, None) => unreachable!("a KV-sharing layer runs after the layer it shares with (checked when the config was read)"),
        };
        let kv_used = (k.clone(), v.clone());
        // Both masks the model builds (`causal_mask`, `packed_mask`) hide the future.
        let spec = AttentionSpec { scale: self.scale, softcap: (self.logit_softcap > 0.0).then_some(self.logit_softcap), causal: true, bf16_products: self.bf16_products };
        let (out, kept) = if self.fused && !keep_probs {
            (flash_attention(q, k, v, mask.clone(), spec), None)
        } else {
            let (out, probs) = attention_composition(q, k, v, mask.clone(), spec);
            (out, keep_probs.then_some(probs))
        }; // [b, h, s, d]
        let out = out.swap_dims(1, 2).reshape([b, s, h * d]); // [b, h, s, d] -> [b, s, h*d]
        (self.o_proj.forward(out), kv_used, kept)
    }
}

/// bf16 where every reader of a norm's output multiplies it in bf16 ([`Linear::reads_bf16`]),
/// else f32.
fn half_if(all_read_bf16: bool) -> FloatDType {
    if all_read_bf16 { FloatDType::BF16 } else { FloatDType::F32 }
}

/// Gated MLP: `down(act(gate(x)) · up(x))` (SwiGLU for silu, GeGLU for gelu).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: QuantMatmul> Mlp<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn load(files: &WeightFiles, prefix: &str, e: usize, f: usize, bias: bool, activation: Activation, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        Ok(Self {
            gate_proj: Linear::load(files, &format!("{prefix}.gate_proj"), e, f, bias, quantize, device)?,
            up_proj: Linear::load(files, &format!("{prefix}.up_proj"), e, f, bias, quantize, device)?,
            down_proj: Linear::load(files, &format!("{prefix}.down_proj"), f, e, bias, quantize, device)?,
            activation,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // act(gate) · up as one operation: backward keeps only the two projections. With bf16
        // weights and adapters throughout, gate, up and their product stay in bf16 (as under
        // PyTorch's autocast): the down projection multiplies in bf16 anyway.
        // The down projection recomputes act(gate) · up in backward (`Linear::forward_gated`).
        let (gate, up) = match [&self.gate_proj, &self.up_proj, &self.down_proj].iter().all(|l| l.writes_bf16()) {
            true => (self.gate_proj.forward_bf16(x.clone()), self.up_proj.forward_bf16(x)),
            false => (self.gate_proj.forward(x.clone()), self.up_proj.forward(x)),
        }; // [.., f]
        self.down_proj.forward_gated(gate, up, self.activation)
    }

    /// The dtype the norm before this MLP writes: bf16 where gate and up multiply it in bf16.
    pub fn input_dtype(&self) -> FloatDType {
        half_if(self.gate_proj.reads_bf16() && self.up_proj.reads_bf16())
    }
}

/// Gemma 4's norms around an MoE block that runs beside the dense MLP.
#[derive(Module, Debug)]
pub struct MoeNorms<B: Backend> {
    /// On the dense MLP's output (`post_feedforward_layernorm_1`).
    pub post_mlp: RmsNorm<B>,
    /// On the experts' input (`pre_feedforward_layernorm_2`).
    pub pre_experts: RmsNorm<B>,
    /// On the experts' output (`post_feedforward_layernorm_2`).
    pub post_experts: RmsNorm<B>,
}

/// Gemma 4's per-layer input branch: `x + norm(proj(act(gate(x)) · ple_i))`.
#[derive(Module, Debug)]
pub struct PerLayerBranch<B: Backend> {
    /// `[e] -> [p]`
    pub gate: Linear<B>,
    /// `[p] -> [e]`
    pub projection: Linear<B>,
    pub norm: RmsNorm<B>,
    #[module(skip)]
    pub activation: Activation,
}

/// One transformer block. Llama-style blocks use `input_layernorm` before attention and
/// `post_attention_layernorm` before the MLP; Gemma-style ("sandwich") blocks normalise both
/// the input and the output of each sub-layer, and there `post_attention_layernorm` is applied
/// to the attention output, as in the checkpoints' own naming.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    /// None where experts replace the dense MLP (Qwen 3 MoE).
    pub mlp: Option<Mlp<B>>,
    pub moe: Option<Moe<B>>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    pub moe_norms: Option<MoeNorms<B>>,
    pub per_layer_input: Option<PerLayerBranch<B>>,
    /// Gemma 4 multiplies each layer's output by a stored scalar; 1 elsewhere.
    pub layer_scalar: f64,
}

impl<B: QuantMatmul> DecoderLayer<B> {
    fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig, index: usize, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let spec = &cfg.layers[index];
        let e = cfg.hidden_size;
        let norm = |name: &str| RmsNorm::load(files, &format!("{prefix}.{name}"), e, cfg.rms_norm_eps, cfg.norm_weight_offset, device);
        let (pre_ff, post_ff) = if cfg.sandwich_norms {
            (Some(norm("pre_feedforward_layernorm")?), Some(norm("post_feedforward_layernorm")?))
        } else {
            (None, None)
        };
        let mlp = match spec.mlp_width {
            Some(f) => Some(Mlp::load(files, &format!("{prefix}.mlp"), e, f, cfg.mlp_bias, cfg.activation, quantize, device)?),
            None => None,
        };
        let moe = match (&cfg.moe, spec.moe) {
            (Some(m), true) => Some(Moe::load(files, prefix, cfg, m, quantize, device)?),
            _ => None,
        };
        let moe_norms = match (&cfg.moe, spec.moe) {
            (Some(m), true) if m.kind == MoeKind::Gemma4 => Some(MoeNorms {
                post_mlp: norm("post_feedforward_layernorm_1")?,
                pre_experts: norm("pre_feedforward_layernorm_2")?,
                post_experts: norm("post_feedforward_layernorm_2")?,
            }),
            _ => None,
        };
        let per_layer_input = match &cfg.per_layer_input {
            Some(p) => Some(PerLayerBranch {
                gate: Linear::load(files, &format!("{prefix}.per_layer_input_gate"), e, p.dim, false, None, device)?,
                projection: Linear::load(files, &format!("{prefix}.per_layer_projection"), p.dim, e, false, None, device)?,
                norm: norm("post_per_layer_input_norm")?,
                activation: cfg.activation,
            }),
            None => None,
        };
        let layer_scalar = if cfg.layer_scalar { files.f32(&format!("{prefix}.layer_scalar"), &[1])?[0] as f64 } else { 1.0 };
        Ok(Self {
            self_attn: Attention::load(files, &format!("{prefix}.self_attn"), cfg, index, quantize, device)?,
            mlp,
            moe,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: pre_ff,
            post_feedforward_layernorm: post_ff,
            moe_norms,
            per_layer_input,
            layer_scalar,
        })
    }

    /// `ple` is this layer's slice of the per-layer inputs `[b, s, p]` (Gemma 4). Returns the
    /// output, the keys and values attended over, what the router did (MoE layers) and, with
    /// `keep_probs`, the attention probabilities.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 3>, Tensor<B, 3>),
        mask: &Tensor<B, 3>,
        cache: Option<&mut Option<Kv<B>>>,
        shared: Option<Kv<B>>,
        ple: Option<Tensor<B, 3>>,
        keep_probs: bool,
    ) -> LayerOutput<B> {
        let h = self.input_layernorm.forward_as(x.clone(), self.self_attn.input_dtype());
        let (attn, kv, probs) = self.self_attn.forward(h, rope, mask, cache, shared, keep_probs);
        // Only the dense MLP reads the norm's output in bf16 (experts and routers take f32).
        let mlp_dtype = match (&self.mlp, &self.moe) {
            (Some(mlp), None) => mlp.input_dtype(),
            _ => FloatDType::F32,
        };
        let (x, stats) = match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let x = x + self.post_attention_layernorm.forward(attn);
                let (ff, stats) = self.feed_forward(pre.forward_as(x.clone(), mlp_dtype), &x);
                (x + post.forward(ff), stats)
            }
            _ => {
                let x = x + attn;
                let (ff, stats) = self.feed_forward(self.post_attention_layernorm.forward_as(x.clone(), mlp_dtype), &x);
                (x + ff, stats)
            }
        };
        let x = match (&self.per_layer_input, ple) {
            (Some(branch), Some(ple)) => {
                let h = gated_act(branch.gate.forward(x.clone()), ple, branch.activation); // [b, s, p]
                x + branch.norm.forward(branch.projection.forward(h))
            }
            _ => x,
        };
        let x = if self.layer_scalar != 1.0 { x.mul_scalar(self.layer_scalar as f32) } else { x };
        LayerOutput { x, kv, routed: stats, probs }
    }

    /// The feed-forward part on the normalised input `h`: the dense MLP, the experts in its
    /// place, or (Gemma 4) both side by side, the experts routed on the block's residual `x`.
    fn feed_forward(&self, h: Tensor<B, 3>, x: &Tensor<B, 3>) -> (Tensor<B, 3>, Option<RouterStats>) {
        let dense = self.mlp.as_ref().map(|mlp| mlp.forward(h.clone()));
        match (&self.moe, &self.moe_norms, dense) {
            (Some(moe), Some(norms), Some(dense)) => {
                let (experts, stats) = moe.forward(x.clone(), norms.pre_experts.forward(x.clone()));
                (norms.post_mlp.forward(dense) + norms.post_experts.forward(experts), Some(stats))
            }
            (Some(moe), _, _) => {
                let (out, stats) = moe.forward(h.clone(), h);
                (out, Some(stats))
            }
            (None, _, Some(dense)) => (dense, None),
            (None, _, None) => unreachable!("a layer without experts always has an MLP (set when the config was read)"),
        }
    }
}

/// What one decoder layer hands back to the stack.
struct LayerOutput<B: Backend> {
    x: Tensor<B, 3>,
    kv: Kv<B>,
    routed: Option<RouterStats>,
    probs: Option<Tensor<B, 4>>,
}

/// What a traced forward pass keeps from inside the model, for the probe signals.
#[derive(Debug)]
pub struct Trace<B: Backend> {
    /// The residual stream `[b, s, e]`: the input of layer 0 (the scaled embeddings), then each
    /// layer's output (L + 1 tensors; before the final norm).
    pub hidden: Vec<Tensor<B, 3>>,
    /// Each layer's attention probabilities `[b, h, s, t]`.
    pub attention: Vec<Tensor<B, 4>>,
    /// What each MoE layer's router did.
    pub routers: Vec<RouterStats>,
    /// Keep hidden states and attention (false: only the routers, which cost nothing to keep).
    full: bool,
}

impl<B: Backend> Trace<B> {
    pub fn new(full: bool) -> Self {
        Self { hidden: Vec::new(), attention: Vec::new(), routers: Vec::new(), full }
    }
}

/// Gemma 4's per-layer input embeddings: a table `[v, L·p]` scaled by √p, mixed with a
/// projection of the (scaled) token embeddings, one `[p]` vector per layer and token.
#[derive(Module, Debug)]
pub struct PerLayerEmbedding<B: Backend> {
    /// [v, L·p]
    pub embed: Param<Tensor<B, 2>>,
    /// `[e] -> [L·p]`
    pub projection: Linear<B>,
    /// RMSNorm over p.
    pub norm: RmsNorm<B>,
    pub layers: usize,
    pub dim: usize,
}

impl<B: QuantMatmul> PerLayerEmbedding<B> {
    /// `[b, s, L, p]` for token ids `[b, s]` and their scaled embeddings `[b, s, e]`.
    fn inputs(&self, ids: Tensor<B, 2, Int>, embeds: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, s, e] = embeds.dims();
        let (l, p) = (self.layers, self.dim);
        let tokens = burn::tensor::module::embedding(self.embed.val(), ids).mul_scalar((p as f32).sqrt()).reshape([b, s, l, p]);
        let context = self.projection.forward(embeds).mul_scalar((e as f64).powf(-0.5) as f32).reshape([b, s, l, p]);
        (self.norm.forward(context) + tokens).mul_scalar(0.5f64.sqrt() as f32)
    }
}

/// A causal language model: embeddings, decoder layers, final norm, LM head.
#[derive(Module, Debug)]
pub struct Model<B: Backend> {
    /// [v, e]
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// Gemma 4's per-layer input embeddings.
    pub per_layer: Option<PerLayerEmbedding<B>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// None when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: ModelConfig,
    /// The dtype of the products with frozen weights: f32, or bf16 after
    /// [`Model::to_bf16_matmuls`]. The tied LM head follows it too.
    #[module(skip)]
    pub matmul_dtype: FloatDType,
}

impl<B: QuantMatmul> Model<B> {
    /// Loads config.json and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        Self::load_quantized(dir, None, device)
    }

    /// As [`Model::load`], quantising the projections of every layer (attention, MLP and
    /// experts) with `quantize`; embeddings, norms, routers and the LM head stay in float.
    /// Projections the checkpoint already stores MLX-quantised load as stored either way.
    pub fn load_quantized(dir: &Path, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_files(config, &files, quantize, device)
    }

    pub fn from_files(config: ModelConfig, files: &WeightFiles, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let cfg = &config;
        // Multimodal checkpoints nest the text model one level deeper.
        let prefix = ["model", "model.language_model", "language_model.model"]
            .into_iter()
            .find(|p| files.contains(&format!("{p}.embed_tokens.weight")))
            .unwrap_or("model");
        let embed_tokens = load_tensor::<B, 2>(files, &format!("{prefix}.embed_tokens.weight"), [cfg.vocab_size, cfg.hidden_size], device)?;
        let per_layer = match &cfg.per_layer_input {
            Some(p) => {
                let width = cfg.num_layers * p.dim;
                Some(PerLayerEmbedding {
                    embed: Param::from_tensor(load_tensor(files, &format!("{prefix}.embed_tokens_per_layer.weight"), [p.vocab, width], device)?),
                    projection: Linear::load(files, &format!("{prefix}.per_layer_model_projection"), cfg.hidden_size, width, false, None, device)?,
                    norm: RmsNorm::load(files, &format!("{prefix}.per_layer_projection_norm"), p.dim, cfg.rms_norm_eps, cfg.norm_weight_offset, device)?,
                    layers: cfg.num_layers,
                    dim: p.dim,
                })
            }
            None => None,
        };
        let layers = cfg
            .layers
            .iter()
            .enumerate()
            .map(|(i, _)| DecoderLayer::load(files, &format!("{prefix}.layers.{i}"), cfg, i, quantize, device))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(files, &format!("{prefix}.norm"), cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset, device)?;
        // A tied checkpoint that still stores `lm_head.weight` (some exports do) uses it.
        let lm_head = if cfg.tie_word_embeddings && !files.contains("lm_head.weight") {
            None
        } else {
            Some(Linear::load(files, "lm_head", cfg.hidden_size, cfg.vocab_size, false, None, device)?)
        };
        Ok(Self { embed_tokens: Param::from_tensor(embed_tokens), per_layer, layers, norm, lm_head, config, matmul_dtype: FloatDType::F32 })
    }

    /// Frozen projection weights in bf16, multiplied in bf16 ([`super::layers::to_bf16_matmuls`]),
    /// and attention's dense products in bf16 ([`Attention::bf16_products`]);
    /// a tied head keeps its f32 embedding for lookups and multiplies through a bf16 copy.
    /// Returns the model and how many weights were converted.
    pub fn to_bf16_matmuls(self) -> (Self, usize) {
        let (mut model, n) = super::layers::to_bf16_matmuls(self);
        model.matmul_dtype = FloatDType::BF16;
        for layer in &mut model.layers {
            layer.self_attn.bf16_products = true;
        }
        (model, n)
    }

    /// Runs attention as the plain composition (`[b, h, s, t]` scores kept for backward)
    /// instead of the fused operation: the reference `kiln train --reference-ops` trains with.
    pub fn use_reference_ops(mut self) -> Self {
        for layer in &mut self.layers {
            layer.self_attn.fused = false;
        }
        self
    }

    /// An empty cache for [`Model::forward`].
    pub fn make_cache(&self) -> KvCache<B> {
        KvCache { layers: vec![None; self.layers.len()], len: 0 }
    }

    /// Final hidden states `[b, s, e]` for token ids `[b, s]`; with a cache, the ids continue
    /// the cached sequence and the cache is extended.
    pub fn forward_hidden(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.causal(ids, cache, None)
    }

    /// What every MoE layer's router did on `ids` `[b, s]` (empty for a dense model).
    pub fn router_stats(&self, ids: Tensor<B, 2, Int>) -> Vec<RouterStats> {
        let mut trace = Trace::new(false);
        self.causal(ids, None, Some(&mut trace));
        trace.routers
    }

    /// Logits `[b, s, v]` for `ids` `[b, s]`, and what happened inside: the residual stream,
    /// attention probabilities and routing (the probe signals' raw material).
    pub fn forward_traced(&self, ids: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Trace<B>) {
        let mut trace = Trace::new(true);
        let h = self.causal(ids, None, Some(&mut trace));
        (self.lm_head(h), trace)
    }

    fn causal(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>, trace: Option<&mut Trace<B>>) -> Tensor<B, 3> {
        let [_, s] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let positions: Vec<usize> = (past..past + s).collect();
        let device = ids.device();
        let masks = |window, kept| causal_mask::<B>(s, past, kept, window, &device);
        self.run_layers(ids, &positions, 1, masks, cache, trace)
    }

    /// Final hidden states `[b, s, e]` of packed rows: `positions` and `segments` (`[b, s]`,
    /// row-major) restart the rope positions per example and keep attention inside each
    /// segment, so a packed row computes exactly what its examples would alone.
    pub fn forward_packed_hidden(&self, ids: Tensor<B, 2, Int>, positions: &[u32], segments: &[u32]) -> Tensor<B, 3> {
        let [b, _] = ids.dims();
        let device = ids.device();
        let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let masks = |window, _kept| packed_mask::<B>(segments, positions, b, window, &device);
        self.run_layers(ids, &pos, b, masks, None, None)
    }

    fn run_layers(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &[usize],
        rope_rows: usize,
        make_mask: impl Fn(Option<usize>, usize) -> Tensor<B, 3>,
        mut cache: Option<&mut KvCache<B>>,
        mut trace: Option<&mut Trace<B>>,
    ) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let device = ids.device();
        let cfg = &self.config;
        let mut x = burn::tensor::module::embedding(self.embed_tokens.val(), ids.clone()); // [b, s, e]
        if let Some(scale) = cfg.embed_scale {
            // Gemma rounds the scale to the activation dtype (f32 here) before multiplying.
            x = x.mul_scalar(scale as f32);
        }
        let per_layer = self.per_layer.as_ref().map(|p| p.inputs(ids, x.clone())); // [b, s, L, p]
        let ropes: Vec<_> = cfg.ropes.iter().map(|r| rope_tables::<B>(&inv_freq(r), positions, rope_rows, &device)).collect();
        // One mask per distinct (window, cached keys kept): global layers share one, sliding
        // layers another (their cache keeps only the window).
        let kept = |i: usize| -> usize {
            let owner = cfg.layers[i].kv_source.unwrap_or(i);
            cache.as_ref().and_then(|c| c.layers[owner].as_ref()).map_or(0, |(k, _)| k.dims()[2])
        };
        let keys: Vec<(Option<usize>, usize)> = (0..self.layers.len()).map(|i| (cfg.layers[i].sliding_window, kept(i))).collect();
        let mut distinct: Vec<(Option<usize>, usize)> = Vec::new();
        for key in &keys {
            if !distinct.contains(key) {
                distinct.push(*key);
            }
        }
        let masks: Vec<Tensor<B, 3>> = distinct.iter().map(|&(w, kept)| make_mask(w, kept)).collect();
        let is_source: Vec<bool> = (0..self.layers.len()).map(|i| cfg.layers.iter().any(|l| l.kv_source == Some(i))).collect();
        let mut kv_of: Vec<Option<Kv<B>>> = vec![None; self.layers.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            let spec = &cfg.layers[i];
            let mask = &masks[distinct.iter().position(|k| *k == keys[i]).unwrap_or(0)];
            let shared = spec.kv_source.and_then(|j| kv_of[j].clone());
            let slot = match spec.kv_source {
                None => cache.as_deref_mut().map(|c| &mut c.layers[i]),
                Some(_) => None,
            };
            let ple = per_layer.as_ref().map(|p| {
                let dim = p.dims()[3];
                p.clone().narrow(2, i, 1).reshape([b, s, dim]) // [b, s, L, p] -> [b, s, p]
            });
            let full = trace.as_ref().is_some_and(|t| t.full);
            if let Some(t) = trace.as_deref_mut().filter(|t| t.full && i == 0) {
                t.hidden.push(x.clone());
            }
            let out = layer.forward(x, &ropes[spec.rope], mask, slot, shared, ple, full);
            x = out.x;
            if is_source[i] {
                kv_of[i] = Some(out.kv);
            }
            if let Some(t) = trace.as_deref_mut() {
                if let Some(r) = out.routed {
                    t.routers.push(RouterStats { layer: i, ..r });
                }
                if full {
                    t.hidden.push(x.clone());
                    t.attention.extend(out.probs);
                }
            }
        }
        if let Some(c) = cache {
            c.len += s;
        }
        self.norm.forward(x)
    }

    /// Logits `[b, s, v]` from hidden states `[b, s, e]`.
    pub fn lm_head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(h),
            // E·hᵀ rather than h·Eᵀ: the embedding stays in its stored layout, so the backend
            // never copies a transposed [e, v] matrix (113 MB for a 49k vocabulary) per call.
            None => kiln_kernels::frozen::matmul_as(
                self.embed_tokens.val().unsqueeze::<3>(), // [v, e] -> [1, v, e]
                h.swap_dims(1, 2),                        // [b, e, s]
                self.matmul_dtype,
            ) // [b, v, s]
            .swap_dims(1, 2), // [b, v, s] -> [b, s, v]
        };
        match self.config.final_logit_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// The head weight and its layout, when the head is a plain product (a dense weight with no
    /// bias or adapter, or the tied embedding): what the chunked loss
    /// ([`kiln_kernels::lm_head_loss`]) multiplies by. `None` sends the loss through
    /// [`Self::lm_head`].
    pub fn head_weight(&self) -> Option<(Tensor<B, 2>, kiln_kernels::HeadLayout)> {
        match &self.lm_head {
            None => Some((self.embed_tokens.val().cast(self.matmul_dtype), kiln_kernels::HeadLayout::OutIn)),
            Some(Linear { weight: super::layers::LinearWeight::Dense(w), bias: None, lora: None }) => Some((w.val(), kiln_kernels::HeadLayout::InOut)),
            Some(_) => None,
        }
    }

    /// Logits `[b, s, v]` for token ids `[b, s]`.
    pub fn forward(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.lm_head(self.forward_hidden(ids, cache))
    }

    /// Logits of the last position only, `[b, v]`: what decoding needs, without the full
    /// `[b, s, v]` head product.
    pub fn forward_last(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 2> {
        let h = self.forward_hidden(ids, cache);
        let [b, s, _] = h.dims();
        let last = h.narrow(1, s - 1, 1); // [b, s, e] -> [b, 1, e]
        self.lm_head(last).reshape([b, self.config.vocab_size]) // [b, 1, v] -> [b, v]
    }
}
