//! The decoder shared by every supported family, top to bottom: attention → MLP → block →
//! model → LM head, with the KV cache the caller owns.
//!
//! Dims: b batch, s new positions, t all positions (cache + new), h query heads, kv key/value
//! heads, d head dim, e hidden size, f MLP width, v vocab.

use std::path::Path;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation;

use super::config::{Activation, ModelConfig};
use super::layers::{apply_rope, causal_mask, inv_freq, load_tensor, packed_mask, repeat_kv, rope_tables, Linear, RmsNorm};
use super::weights::WeightFiles;
use crate::quant::affine::QuantSpec;
use kiln_kernels::QuantMatmul;
use super::ModelError;

/// Keys and values of every layer so far, each `[b, kv, t, d]`. Created by
/// [`Model::make_cache`]; passed to [`Model::forward`] to decode one step at a time.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
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

    /// A cache of one sequence repeated as `n` rows, so that `n` continuations of one prompt
    /// decode side by side after a single prefill.
    pub fn repeat_rows(&self, n: usize) -> Self {
        let layers = self.layers.iter().map(|l| l.as_ref().map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n)))).collect();
        Self { layers, len: self.len }
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    /// 0 when off.
    pub logit_softcap: f64,
}

impl<B: QuantMatmul> Attention<B> {
    fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let (e, d, h, kv) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let norm = |name: &str| -> Result<Option<RmsNorm<B>>, ModelError> {
            if cfg.qk_norm {
                let path = format!("{prefix}.{name}");
                Ok(Some(RmsNorm::load(files, &path, d, cfg.rms_norm_eps, cfg.norm_weight_offset, device)?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q_proj: Linear::load(files, &format!("{prefix}.q_proj"), e, h * d, cfg.qkv_bias, quantize, device)?,
            k_proj: Linear::load(files, &format!("{prefix}.k_proj"), e, kv * d, cfg.qkv_bias, quantize, device)?,
            v_proj: Linear::load(files, &format!("{prefix}.v_proj"), e, kv * d, cfg.qkv_bias, quantize, device)?,
            o_proj: Linear::load(files, &format!("{prefix}.o_proj"), h * d, e, cfg.o_bias, quantize, device)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
            scale: cfg.attn_scale,
            logit_softcap: cfg.attn_logit_softcap.unwrap_or(0.0),
        })
    }

    /// `x` `[b, s, e]`; `rope` the (cos, sin) tables `[b or 1, s, r]` of these positions; `mask`
    /// `[b or 1, s, t]`.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 3>, Tensor<B, 3>),
        mask: &Tensor<B, 3>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]); // [b, s, h*d] -> [b, s, h, d]
        let k = self.k_proj.forward(x.clone()).reshape([b, s, kv, d]); // [b, s, kv*d] -> [b, s, kv, d]
        let v = self.v_proj.forward(x).reshape([b, s, kv, d]);
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(q), kn.forward(k)),
            _ => (q, k),
        };
        let q = apply_rope(q.swap_dims(1, 2), &rope.0, &rope.1); // [b, s, h, d] -> [b, h, s, d]
        let k = apply_rope(k.swap_dims(1, 2), &rope.0, &rope.1); // [b, s, kv, d] -> [b, kv, s, d]
        let v = v.swap_dims(1, 2); // [b, s, kv, d] -> [b, kv, s, d]

        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)), // [b, kv, t, d]
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let k = repeat_kv(k, h / kv); // [b, kv, t, d] -> [b, h, t, d]
        let v = repeat_kv(v, h / kv);

        let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(self.scale); // [b, h, s, t]
        if self.logit_softcap > 0.0 {
            scores = scores.div_scalar(self.logit_softcap).tanh().mul_scalar(self.logit_softcap);
        }
        let scores = scores + mask.clone().unsqueeze_dim::<4>(1); // [b, s, t] -> [b, 1, s, t]
        let probs = activation::softmax(scores, 3);
        let out = probs.matmul(v); // [b, h, s, d]
        let out = out.swap_dims(1, 2).reshape([b, s, h * d]); // [b, h, s, d] -> [b, s, h*d]
        self.o_proj.forward(out)
    }
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
    fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let (e, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(files, &format!("{prefix}.gate_proj"), e, f, bias, quantize, device)?,
            up_proj: Linear::load(files, &format!("{prefix}.up_proj"), e, f, bias, quantize, device)?,
            down_proj: Linear::load(files, &format!("{prefix}.down_proj"), f, e, bias, quantize, device)?,
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward(x.clone()); // [b, s, f]
        let gate = match self.activation {
            Activation::Silu => activation::silu(gate),
            Activation::GeluTanh => activation::gelu_approximate(gate),
            Activation::Gelu => activation::gelu(gate),
        };
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// One transformer block. Llama-style blocks use `input_layernorm` before attention and
/// `post_attention_layernorm` before the MLP; Gemma-style ("sandwich") blocks normalise both
/// the input and the output of each sub-layer, and there `post_attention_layernorm` is applied
/// to the attention output, as in the checkpoints' own naming.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
}

impl<B: QuantMatmul> DecoderLayer<B> {
    fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let norm = |name: &str| RmsNorm::load(files, &format!("{prefix}.{name}"), cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset, device);
        let (pre_ff, post_ff) = if cfg.sandwich_norms {
            (Some(norm("pre_feedforward_layernorm")?), Some(norm("post_feedforward_layernorm")?))
        } else {
            (None, None)
        };
        Ok(Self {
            self_attn: Attention::load(files, &format!("{prefix}.self_attn"), cfg, quantize, device)?,
            mlp: Mlp::load(files, &format!("{prefix}.mlp"), cfg, quantize, device)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: pre_ff,
            post_feedforward_layernorm: post_ff,
        })
    }

    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &(Tensor<B, 3>, Tensor<B, 3>),
        mask: &Tensor<B, 3>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let attn = self.self_attn.forward(self.input_layernorm.forward(x.clone()), rope, mask, cache);
        match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let x = x + self.post_attention_layernorm.forward(attn);
                let mlp = self.mlp.forward(pre.forward(x.clone()));
                x + post.forward(mlp)
            }
            _ => {
                let x = x + attn;
                let mlp = self.mlp.forward(self.post_attention_layernorm.forward(x.clone()));
                x + mlp
            }
        }
    }
}

/// A causal language model: embeddings, decoder layers, final norm, LM head.
#[derive(Module, Debug)]
pub struct Model<B: Backend> {
    /// [v, e]
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// None when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: ModelConfig,
}

impl<B: QuantMatmul> Model<B> {
    /// Loads config.json and the safetensors weights of a Hugging Face model directory.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        Self::load_quantized(dir, None, device)
    }

    /// As [`Model::load`], quantising the seven projections of every layer with `quantize`
    /// (embeddings, norms and the LM head stay in float). Projections the checkpoint already
    /// stores MLX-quantised load as stored either way.
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
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(files, &format!("{prefix}.layers.{i}"), cfg, quantize, device))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(files, &format!("{prefix}.norm"), cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset, device)?;
        // A tied checkpoint that still stores `lm_head.weight` (some exports do) uses it.
        let lm_head = if cfg.tie_word_embeddings && !files.contains("lm_head.weight") {
            None
        } else {
            Some(Linear::load(files, "lm_head", cfg.hidden_size, cfg.vocab_size, false, None, device)?)
        };
        Ok(Self { embed_tokens: Param::from_tensor(embed_tokens), layers, norm, lm_head, config })
    }

    /// An empty cache for [`Model::forward`].
    pub fn make_cache(&self) -> KvCache<B> {
        KvCache { layers: vec![None; self.layers.len()], len: 0 }
    }

    /// Final hidden states `[b, s, e]` for token ids `[b, s]`; with a cache, the ids continue
    /// the cached sequence and the cache is extended.
    pub fn forward_hidden(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let [_, s] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let positions: Vec<usize> = (past..past + s).collect();
        let device = ids.device();
        let masks = |window| causal_mask::<B>(s, past, window, &device);
        self.run_layers(ids, &positions, 1, masks, cache)
    }

    /// Final hidden states `[b, s, e]` of packed rows: `positions` and `segments` (`[b, s]`,
    /// row-major) restart the rope positions per example and keep attention inside each
    /// segment, so a packed row computes exactly what its examples would alone.
    pub fn forward_packed_hidden(&self, ids: Tensor<B, 2, Int>, positions: &[u32], segments: &[u32]) -> Tensor<B, 3> {
        let [b, _] = ids.dims();
        let device = ids.device();
        let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
        let masks = |window| packed_mask::<B>(segments, positions, b, window, &device);
        self.run_layers(ids, &pos, b, masks, None)
    }

    fn run_layers(
        &self,
        ids: Tensor<B, 2, Int>,
        positions: &[usize],
        rope_rows: usize,
        make_mask: impl Fn(Option<usize>) -> Tensor<B, 3>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [_, s] = ids.dims();
        let device = ids.device();
        let cfg = &self.config;
        let mut x = burn::tensor::module::embedding(self.embed_tokens.val(), ids); // [b, s, e]
        if let Some(scale) = cfg.embed_scale {
            // Gemma rounds the scale to the activation dtype (f32 here) before multiplying.
            x = x.mul_scalar(scale as f32);
        }
        let ropes: Vec<_> = cfg.ropes.iter().map(|r| rope_tables::<B>(&inv_freq(r), positions, rope_rows, &device)).collect();
        // One mask per distinct window: global layers share one, sliding layers another.
        let mut windows: Vec<Option<usize>> = Vec::new();
        for spec in &cfg.layers {
            if !windows.contains(&spec.sliding_window) {
                windows.push(spec.sliding_window);
            }
        }
        let masks: Vec<Tensor<B, 3>> = windows.iter().map(|&w| make_mask(w)).collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let spec = &cfg.layers[i];
            let mask = &masks[windows.iter().position(|w| *w == spec.sliding_window).unwrap_or(0)];
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &ropes[spec.rope], mask, slot);
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
            None => self
                .embed_tokens
                .val()
                .unsqueeze::<3>() // [v, e] -> [1, v, e]
                .matmul(h.swap_dims(1, 2)) // [1, v, e] x [b, e, s] -> [b, v, s]
                .swap_dims(1, 2), // [b, v, s] -> [b, s, v]
        };
        match self.config.final_logit_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
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
