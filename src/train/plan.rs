//! `kiln plan`: how much device memory a recipe's training step will take, and roughly how
//! fast it will run, before anything is loaded.
//!
//! The memory model follows what kiln's training step keeps (f32, but for the frozen
//! projections that `run.dtype = "bf16"` stores in bf16):
//! - the weights (quantised projections at their packed size under QLoRA);
//! - the trainable parameters' gradients (twice with gradient accumulation) and AdamW's two
//!   moments;
//! - the activations the autodiff tape holds for backward, counted per token and layer from the
//!   decoder's operations (see `Step::layer_bytes`): attention (fused) keeps its inputs (packed
//!   in bf16 where the tensor-core kernels run both ways), output and one log-sum-exp per head,
//!   never a `[heads, seq]` row per token; the gated MLP (fused)
//!   gate and up (in bf16 under bf16 training, their product then recomputed in backward,
//!   three f32 `[intermediate]` rows otherwise); the (fused) norms their inputs, and the
//!   projections after them the norms' outputs (bf16 under bf16 training); (fused) rope none;
//! - one layer's worth of gradients in flight during backward, plus the scores attention's
//!   backward forms for a moment: a chunk of them where it runs as dense products (CUDA, but
//!   none on the tensor-core kernels), whole `[b, h, s, t]` matrices as the composition;
//! - one chunk of the LM-head loss (the full logits are never formed): its logits and their
//!   gradient where row kernels compute the softmax (CUDA), four such tensors elsewhere; the
//!   loss's gradient with respect to its input, taken in the forward, takes the place of that
//!   input on the tape.
//!
//! The activation counts are read off the code, not fitted to measurements: their sum is
//! `live_bytes`. On a GPU the peak that matters is what the allocator reserves: CubeCL's pool
//! keeps freed pages for reuse and rounds allocations up to its page sizes, which no count of
//! tensors captures. `peak_bytes` there is `live_bytes` times [`POOL_FACTOR`], a measured ratio
//! (see its comment); on the CPU tensors are allocated one by one and `peak_bytes` is
//! `live_bytes`.

use serde::Serialize;

use crate::backend::DeviceSpec;
use crate::model::config::ModelConfig;
use crate::quant::affine::QuantSpec;
use crate::recipe::{ALL_LINEAR, LORA_TARGETS};
use crate::recipe::Recipe;

/// The model's shape, as far as memory and arithmetic go.
#[derive(Debug, Clone)]
pub struct Geometry {
    pub vocab: usize,
    pub hidden: usize,
    pub tied: bool,
    pub qk_norm: bool,
    /// Attention scores pass through a softcap (Gemma 2).
    pub attn_softcap: bool,
    pub layers: Vec<LayerGeometry>,
}

#[derive(Debug, Clone, Copy)]
pub struct LayerGeometry {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub mlp: usize,
}

impl Geometry {
    pub fn from_config(c: &ModelConfig) -> Self {
        let layers = c
            .layers
            .iter()
            .map(|l| LayerGeometry { heads: c.num_heads, kv_heads: l.num_kv_heads, head_dim: l.head_dim, mlp: l.mlp_width.unwrap_or(0) })
            .collect();
        Self { vocab: c.vocab_size, hidden: c.hidden_size, tied: c.tie_word_embeddings, qk_norm: c.qk_norm, attn_softcap: c.attn_logit_softcap.is_some(), layers }
    }

    fn from_init(i: &crate::recipe::InitSection) -> Self {
        let l = LayerGeometry { heads: i.num_heads, kv_heads: i.num_kv_heads, head_dim: i.hidden_size / i.num_heads.max(1), mlp: i.intermediate_size };
        Self { vocab: i.vocab_size, hidden: i.hidden_size, tied: i.tie_word_embeddings, qk_norm: i.arch == "qwen3" || i.arch == "gemma3", attn_softcap: false, layers: vec![l; i.num_layers] }
    }

    /// The seven projections of a layer as (name, in, out).
    fn projections(&self, l: &LayerGeometry) -> [(&'static str, usize, usize); 7] {
        let (e, q, kv) = (self.hidden, l.heads * l.head_dim, l.kv_heads * l.head_dim);
        [("q_proj", e, q), ("k_proj", e, kv), ("v_proj", e, kv), ("o_proj", q, e), ("gate_proj", e, l.mlp), ("up_proj", e, l.mlp), ("down_proj", l.mlp, e)]
    }

    fn linear_params(&self) -> usize {
        self.layers.iter().map(|l| self.projections(l).iter().map(|p| p.1 * p.2).sum::<usize>()).sum()
    }

    fn params(&self) -> usize {
        let norms = self.layers.len() * 2 * self.hidden + self.hidden;
        let embed = self.vocab * self.hidden * if self.tied { 1 } else { 2 };
        self.linear_params() + norms + embed
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub recipe: String,
    pub device: String,
    pub method: String,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub params: usize,
    pub trainable_params: usize,
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    pub optimizer_bytes: u64,
    pub activations_bytes: u64,
    pub backward_bytes: u64,
    pub logits_bytes: u64,
    /// The tensors the step holds at its peak: the sum of the above.
    pub live_bytes: u64,
    /// What the allocator is predicted to reserve at the peak: `live_bytes`, times
    /// [`POOL_FACTOR`] on GPUs (CubeCL's pool).
    pub peak_bytes: u64,
    /// The device's memory, when known (CUDA: read from the driver; CPU: the host's).
    pub capacity_bytes: Option<u64>,
    pub fits: Option<bool>,
    pub flops_per_token: f64,
    /// An order-of-magnitude estimate: model FLOPs at the sustained rate assumed for the device.
    pub tokens_per_s_class: String,
    pub suggestions: Vec<String>,
}

/// f32: what the trainer holds, except frozen projections under `run.dtype = "bf16"`.
const F32: u64 = 4;

/// CubeCL's pool high-water mark over `live_bytes`, as measured by `kiln bench train` on an H100
/// (bench/RESULTS.md, 2026-11-28: LoRA r16 on all projections, bf16, 8 × 1024 tokens per step,
/// the CUDA pool in exclusive pages, see vendor/cubecl-cuda/KILN-PATCH.md): Qwen2.5-0.5B shape
/// 11.62 GB over 10.49 GB live = 1.11, Llama-3.2-1B shape 16.59 / 15.82 = 1.05. With upstream's
/// sliced pages it was 1.33–1.56. A measurement of the allocator, not a model of it.
pub const POOL_FACTOR: f64 = 1.08;

/// The same for upstream's sliced pages, which ROCm and wgpu keep (unmeasured there): measured
/// on CUDA before kiln's pool moved to exclusive pages, 1.33–1.56 (Qwen2.5-0.5B and
/// Llama-3.2-1B shapes, 2026-11-27).
pub const SLICED_POOL_FACTOR: f64 = 1.44;

/// The pool's high-water mark over the live tensors on `device`'s allocator (1 on the CPU,
/// which allocates tensor by tensor).
pub fn pool_factor(device: DeviceSpec) -> f64 {
    match device {
        DeviceSpec::Cpu => 1.0,
        DeviceSpec::Cuda(_) => POOL_FACTOR,
        DeviceSpec::Rocm(_) | DeviceSpec::Wgpu(_) => SLICED_POOL_FACTOR,
    }
}

/// What one training step of `recipe` holds, for a model of `geom`.
struct Step<'a> {
    recipe: &'a Recipe,
    geom: &'a Geometry,
    batch: usize,
    seq: usize,
    quantize: Option<QuantSpec>,
}

impl Step<'_> {
    fn lora(&self) -> bool {
        self.recipe.trains_lora()
    }

    fn adapted(&self, name: &str, layer: usize) -> bool {
        let l = &self.recipe.lora;
        let by_name = l.targets.iter().any(|t| t == ALL_LINEAR || t == name);
        let by_layer = l.layers.is_none_or(|[a, b]| (a..b).contains(&layer));
        by_name && by_layer && LORA_TARGETS.contains(&name)
    }

    fn trainable(&self) -> usize {
        if !self.lora() {
            return self.geom.params();
        }
        let r = self.recipe.lora.rank;
        let g = self.geom;
        g.layers.iter().enumerate().map(|(i, l)| g.projections(l).iter().filter(|p| self.adapted(p.0, i)).map(|p| r * (p.1 + p.2)).sum::<usize>()).sum()
    }

    /// Whether the frozen projections are held in bf16 (`run.dtype = "bf16"` on a device that
    /// has it, with the base frozen under LoRA).
    fn bf16(&self, device: DeviceSpec) -> bool {
        self.recipe.run.bf16() && self.lora() && matches!(device, DeviceSpec::Cuda(_) | DeviceSpec::Rocm(_))
    }

    fn weight_bytes(&self, device: DeviceSpec) -> u64 {
        let g = self.geom;
        let linear = g.linear_params() as u64;
        let rest = (g.params() - g.linear_params()) as u64 * F32;
        match self.quantize {
            // An untied head is converted too (f32 -> bf16 saves 2 bytes a weight); a tied head
            // keeps its f32 embedding and multiplies through a bf16 copy held for the step.
            None if self.bf16(device) => {
                let head = (g.vocab * g.hidden) as u64 * 2;
                if g.tied { linear * 2 + rest + head } else { linear * 2 + rest - head }
            }
            None => linear * F32 + rest,
            Some(q) => {
                let (bits, group) = match q {
                    QuantSpec::Mlx { bits, group } => (bits as u64, group as u64),
                    QuantSpec::Gguf(t) => (if t.name().contains('8') { 8 } else { 4 }, 32),
                };
                // Packed levels plus an f32 scale and bias per group.
                linear * bits / 8 + linear / group * 2 * F32 + rest
            }
        }
    }

    /// Whether the norms write bf16 for the projections after them (`Linear::reads_bf16`: bf16
    /// frozen weights, no adapter dropout), which then keep their inputs in bf16.
    fn half_inputs(&self, device: DeviceSpec) -> bool {
        self.bf16(device) && self.quantize.is_none() && self.recipe.lora.dropout == 0.0
    }

    /// Whether layer `i`'s gated MLP keeps gate and up in bf16 and recomputes their product in
    /// backward (`Mlp::forward`: bf16 frozen weights with an adapter on all three projections
    /// and no adapter dropout).
    fn half_mlp(&self, device: DeviceSpec, i: usize) -> bool {
        self.half_inputs(device) && ["gate_proj", "up_proj", "down_proj"].iter().all(|p| self.adapted(p, i))
    }

    /// Whether layer `l`'s attention runs on the tensor-core kernels forward and backward
    /// ([`kiln_kernels::attention::tensor_cores_planned`]): CUDA, bf16 training, their head size.
    fn tensor_cores(&self, device: DeviceSpec, l: &LayerGeometry) -> bool {
        matches!(device, DeviceSpec::Cuda(_)) && kiln_kernels::attention::tensor_cores_planned(l.head_dim, l.heads / l.kv_heads.max(1) * self.seq, self.geom.attn_softcap, self.bf16(device))
    }

    /// Bytes the tape keeps per token for layer `l` (see the module docs).
    fn layer_bytes(&self, l: &LayerGeometry, half_inputs: bool, half_mlp: bool, tensor_cores: bool) -> u64 {
        let (e, q, kv, f) = (self.geom.hidden as u64, (l.heads * l.head_dim) as u64, (l.kv_heads * l.head_dim) as u64, l.mlp as u64);
        let input = if half_inputs { 2 } else { F32 };
        // Two norms (fused), each keeping its input (the residual stream, f32); the projections
        // after each keep the norm's output.
        let norms = 2 * e * F32 + 2 * e * input;
        // Attention (fused): queries and keys after rope (which keeps nothing of its own), values
        // (packed in bf16 for the tensor-core kernels, f32 otherwise), its output and one
        // log-sum-exp per head; o_proj keeps its input.
        let inputs = (q + 2 * kv) * if tensor_cores { 2 } else { F32 };
        let attention = inputs + (q + l.heads as u64) * F32 + q * input;
        // MLP (fused gate): gate and up, and their product (down_proj's input) unless down_proj
        // recomputes it in backward.
        let mlp = if half_mlp { 2 * f * 2 } else { 3 * f * F32 };
        let mut n = norms + attention + mlp;
        if self.geom.qk_norm {
            // The per-head norms' inputs.
            n += (q + kv) * F32;
        }
        if self.lora() {
            // x·A of each adapted projection.
            n += 7 * self.recipe.lora.rank as u64 * F32;
        }
        n
    }

    fn plan(&self, device: DeviceSpec, capacity: Option<u64>) -> Plan {
        let g = self.geom;
        let tokens = (self.batch * self.seq) as u64;
        let trainable = self.trainable() as u64;
        let accum = self.recipe.train.grad_accum.max(1);
        let gradients = trainable * F32 * if accum > 1 { 2 } else { 1 };
        let optimizer = trainable * F32 * 2;
        let bytes: Vec<u64> = g.layers.iter().enumerate().map(|(i, l)| self.layer_bytes(l, self.half_inputs(device), self.half_mlp(device, i), self.tensor_cores(device, l))).collect();
        let per_token: u64 = bytes.iter().sum::<u64>() + 4 * g.hidden as u64 * F32;
        // Saturating: a recipe at its limits (2^24 rows of 2^24 tokens) asks for more bytes than
        // u64 counts, and the plan should say "does not fit", not overflow.
        let activations = per_token.saturating_mul(tokens);
        let widest = bytes.iter().copied().max().unwrap_or(0);
        // Attention's backward forms score matrices for a moment. On CUDA (dense products with
        // row kernels between them) one chunk of batch rows and queries at a time: the f32 scores and their
        // gradient are what the peak shows (doubling the chunk raised the measured peak by about
        // their size, 0.5 GiB on both bench shapes on an H200, 2026-11-28; the probabilities
        // beside them did not show). Where it runs as the composition (no kernels of kiln's
        // own on that backend), a few whole `[b, h, s, t]` matrices: scores, their softcap,
        // probabilities, their gradient.
        // The tensor-core kernels form no scores.
        let heads = g.layers.iter().filter(|l| !self.tensor_cores(device, l)).map(|l| l.heads).max().unwrap_or(0);
        let scores = match device {
            DeviceSpec::Cuda(_) => {
                // The decoder's masks are causal: the largest chunk is the last queries' over every key.
                let (rows, queries) = kiln_kernels::attention::score_chunks(self.batch, heads, self.seq, self.seq, true);
                [rows, heads, queries, self.seq].iter().fold(2 * F32, |n, &d| n.saturating_mul(d as u64))
            }
            _ => (4 * heads as u64 * F32).saturating_mul(tokens).saturating_mul(self.seq as u64),
        };
        let backward = widest.saturating_mul(tokens).saturating_add(scores);
        let chunk = kiln_kernels::chunk_rows(g.vocab).min(self.batch * self.seq) as u64;
        // CUDA runs each chunk's softmax as row kernels: the logits and their gradient, both
        // written in the head's dtype. Elsewhere (tensor operations): logits, exponentials,
        // their gradient, and the gradient's copy in the weight's layout.
        let logits = match device {
            DeviceSpec::Cuda(_) => chunk * g.vocab as u64 * 2 * if self.bf16(device) { 2 } else { F32 },
            _ => 4 * chunk * g.vocab as u64 * F32,
        };
        let weights = self.weight_bytes(device);
        let live = [weights, gradients, optimizer, activations, backward, logits].into_iter().fold(0u64, u64::saturating_add);
        let peak = match device {
            DeviceSpec::Cpu => live,
            DeviceSpec::Cuda(_) | DeviceSpec::Rocm(_) | DeviceSpec::Wgpu(_) => (live as f64 * pool_factor(device)) as u64,
        };
        let flops = flops_per_token(g, self.seq, self.lora());
        let rate = sustained_flops(device);
        Plan {
            recipe: self.recipe.path.display().to_string(),
            device: device.to_string(),
            method: self.recipe.method.as_str().to_string(),
            batch_size: self.batch,
            seq_len: self.seq,
            grad_accum: accum,
            params: g.params(),
            trainable_params: trainable as usize,
            weights_bytes: weights,
            gradients_bytes: gradients,
            optimizer_bytes: optimizer,
            activations_bytes: activations,
            backward_bytes: backward,
            logits_bytes: logits,
            live_bytes: live,
            peak_bytes: peak,
            capacity_bytes: capacity,
            fits: capacity.map(|c| peak <= c),
            flops_per_token: flops,
            tokens_per_s_class: class(rate / flops),
            suggestions: Vec::new(),
        }
    }
}

/// Model FLOPs per trained token: forward `2N`, backward `2N` for the activations and `2N` more
/// when the weights themselves are trained; attention's two products `4·s·h·d` per layer
/// forward, twice that backward.
pub fn flops_per_token(g: &Geometry, seq: usize, lora: bool) -> f64 {
    let n = (g.linear_params() + g.vocab * g.hidden) as f64;
    let attn: f64 = g.layers.iter().map(|l| (l.heads * l.head_dim) as f64).sum::<f64>() * seq as f64;
    (if lora { 4.0 } else { 6.0 }) * n + 12.0 * attn
}

/// The FLOP rate assumed for kiln's f32 training step on each kind of device, for the tokens/s
/// class. Assumptions, not measurements: 10 GFLOP/s per CPU core (the quickstart measured
/// ~3k tokens/s on 2 cores, ~17 GFLOP/s), and for GPUs a small share of their f32/TF32 peak.
fn sustained_flops(device: DeviceSpec) -> f64 {
    match device {
        DeviceSpec::Cpu => 10e9 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        DeviceSpec::Wgpu(_) => 5e12,
        DeviceSpec::Cuda(_) | DeviceSpec::Rocm(_) => 40e12,
    }
}

/// "~3k tokens/s": the nearest 1-2-5 step below the estimate.
fn class(tokens_per_s: f64) -> String {
    let mut step = 1.0;
    while step * 10.0 <= tokens_per_s {
        step *= 10.0;
    }
    let lead = [5.0, 2.0, 1.0].into_iter().find(|m| m * step <= tokens_per_s).unwrap_or(1.0) * step;
    let text = if lead >= 1e6 { format!("{}M", lead / 1e6) } else if lead >= 1e3 { format!("{}k", lead / 1e3) } else { format!("{lead}") };
    format!("~{text} tokens/s")
}

/// The plan for `recipe` on `device`; `capacity` is the device memory to fit into.
pub fn plan(recipe: &Recipe, geom: &Geometry, device: DeviceSpec, capacity: Option<u64>) -> Plan {
    let quantize = recipe.model.quantize.as_deref().and_then(QuantSpec::parse);
    let step = |batch, seq, quantize| Step { recipe, geom, batch, seq, quantize }.plan(device, capacity);
    let (batch, seq) = (recipe.train.batch_size, recipe.data.max_seq_len);
    let mut out = step(batch, seq, quantize);
    if out.fits == Some(false) {
        // Same tokens per optimizer step with smaller micro-batches first, then shorter rows,
        // then a 4-bit base for LoRA.
        let mut b = batch / 2;
        while b >= 1 {
            if step(b, seq, quantize).fits == Some(true) {
                out.suggestions.push(format!("batch_size = {b}, grad_accum = {} (same tokens per step)", recipe.train.grad_accum.max(1) * batch.div_ceil(b)));
                break;
            }
            b /= 2;
        }
        let mut s = seq / 2;
        while s >= 64 {
            if step(batch, s, quantize).fits == Some(true) {
                out.suggestions.push(format!("max_seq_len = {s}"));
                break;
            }
            s /= 2;
        }
        let q4 = QuantSpec::Mlx { bits: 4, group: 64 };
        if recipe.trains_lora() && quantize.is_none() && step(batch, seq, Some(q4)).fits == Some(true) {
            out.suggestions.push("[model] quantize = \"q4_g64\" (QLoRA)".to_string());
        }
    }
    out
}

/// The geometry of the recipe's model: its config.json, or `[model.init]`.
pub fn recipe_geometry(recipe: &Recipe) -> Result<Geometry, crate::model::ModelError> {
    match (&recipe.model.path, &recipe.model.init) {
        (Some(dir), _) => Ok(Geometry::from_config(&ModelConfig::from_dir(dir)?)),
        (None, Some(init)) => Ok(Geometry::from_init(init)),
        (None, None) => Err(crate::model::ModelError::Config { path: recipe.path.clone(), message: "the recipe names neither [model] path nor [model.init]".into() }),
    }
}
