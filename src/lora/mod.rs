//! LoRA: a trainable low-rank update `scale · B(A(dropout(x)))` beside a frozen linear layer.
//!
//! As in mlx-lm's `LoRALinear`: the adapter wraps an existing layer ([`Linear::lora`]), B starts
//! at zero so the adapted model equals the base at step 0, and [`fuse`] folds `scale · A·B`
//! into the base weight. Which layers get an adapter is [`targets`]; the PEFT file format is
//! [`peft`].

pub mod peft;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::layers::{Linear, LinearWeight};
use crate::model::Model;

/// The projections an adapter can wrap, in PEFT's names.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The adapter of one linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// [in, r] (PEFT's `lora_A.weight` transposed)
    pub a: Param<Tensor<B, 2>>,
    /// [r, out] (PEFT's `lora_B.weight` transposed)
    pub b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: f64,
}

impl<B: Backend> Lora<B> {
    /// PEFT's initialisation: A Kaiming-uniform with a = √5 (bound 1/√in), B zero.
    pub fn init(d_in: usize, d_out: usize, rank: usize, scale: f64, dropout: f64, rng: &mut StdRng, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f32).sqrt();
        let a: Vec<f32> = (0..d_in * rank).map(|_| rng.random_range(-bound..bound)).collect();
        Self {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, rank]), device)),
            b: Param::from_tensor(Tensor::zeros([rank, d_out], device)),
            scale,
            dropout,
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// Whether [`Lora::forward`] applies dropout to its input on `device` (training, with a
    /// dropout rate): the adapter then sees other inputs than the base layer.
    pub fn drops(&self, device: &B::Device) -> bool {
        self.dropout > 0.0 && B::ad_enabled(device)
    }

    /// `x` `[n, in]` -> `scale · x·A·B` `[n, out]`.
    ///
    /// The rows go through in slices (`[slices, n / slices, in]` against `A` and `B` broadcast),
    /// so that backward forms `dA = xᵀ·g` and `dB = hᵀ·dy` as one partial product per slice
    /// and a sum: as a single product each reduces over all `n` rows into a `[in, 16]` or
    /// `[16, out]` matrix, which leaves most of a GPU idle (150–230 µs per product on an H100
    /// at 8192 rows; `kiln bench matmul`). The scale multiplies the rank-wide `x·A`, not the
    /// output.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        // Dropout only while training (autodiff on), as nn.Dropout in train mode.
        let x = if self.drops(&x.device()) {
            let keep = Tensor::<B, 2>::random(x.shape(), Distribution::Bernoulli(1.0 - self.dropout), &x.device());
            x * keep.div_scalar(1.0 - self.dropout)
        } else {
            x
        };
        let [n, d_in] = x.dims();
        let d_out = self.b.dims()[1];
        let slices = kiln_kernels::frozen::row_slices(n);
        let x = x.reshape([slices, n / slices, d_in]);
        let h = x.matmul(self.a.val().unsqueeze::<3>()).mul_scalar(self.scale); // [slices, n/slices, r]
        h.matmul(self.b.val().unsqueeze::<3>()).reshape([n, d_out])
    }

    /// `scale · A·B`, `[in, out]`: what fusing adds to the base weight.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.a.val().matmul(self.b.val()).mul_scalar(self.scale)
    }
}

/// What to adapt and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Projection names from [`TARGETS`].
    pub targets: Vec<String>,
    /// Half-open layer range; all layers when None.
    pub layers: Option<(usize, usize)>,
    /// Also adapt every expert's projections (MoE models); otherwise only attention and dense
    /// MLPs.
    pub experts: bool,
}

impl LoraSpec {
    /// alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// Expands `all-linear` into every projection.
    pub fn target_names(&self) -> Vec<String> {
        if self.targets.iter().any(|t| t == "all-linear") {
            TARGETS.iter().map(|s| s.to_string()).collect()
        } else {
            self.targets.clone()
        }
    }

    pub fn covers_layer(&self, i: usize) -> bool {
        self.layers.is_none_or(|(a, b)| i >= a && i < b)
    }
}

/// The projections of decoder layer `layer` an adapter can wrap, by module path inside the
/// layer (PEFT's names after `model.layers.N.`): attention (`self_attn.q_proj`, ...; a
/// KV-sharing layer has no k/v), the dense MLP (`mlp.gate_proj`, ...) and each expert's MLP
/// (`mlp.experts.3.gate_proj` for Qwen 3 MoE, `experts.3.gate_proj` for Gemma 4). Routers and
/// Gemma 4's per-layer input branch are not adaptable.
macro_rules! projections_fn {
    ($name:ident, $iter:ident, $($mut_:ident)?) => {
        pub fn $name<B: Backend>(model: & $($mut_)? Model<B>, layer: usize) -> Vec<(String, & $($mut_)? Linear<B>)> {
            let experts_at = expert_path(&model.config);
            let l = & $($mut_)? model.layers[layer];
            let a = & $($mut_)? l.self_attn;
            let mut out = vec![("self_attn.q_proj".to_string(), & $($mut_)? a.q_proj)];
            if let Some(k) = & $($mut_)? a.k_proj {
                out.push(("self_attn.k_proj".into(), k));
            }
            if let Some(v) = & $($mut_)? a.v_proj {
                out.push(("self_attn.v_proj".into(), v));
            }
            out.push(("self_attn.o_proj".into(), & $($mut_)? a.o_proj));
            if let Some(m) = & $($mut_)? l.mlp {
                out.push(("mlp.gate_proj".into(), & $($mut_)? m.gate_proj));
                out.push(("mlp.up_proj".into(), & $($mut_)? m.up_proj));
                out.push(("mlp.down_proj".into(), & $($mut_)? m.down_proj));
            }
            if let Some(moe) = & $($mut_)? l.moe {
                for (j, m) in moe.experts.$iter().enumerate() {
                    out.push((format!("{experts_at}.{j}.gate_proj"), & $($mut_)? m.gate_proj));
                    out.push((format!("{experts_at}.{j}.up_proj"), & $($mut_)? m.up_proj));
                    out.push((format!("{experts_at}.{j}.down_proj"), & $($mut_)? m.down_proj));
                }
            }
            out
        }
    };
}
projections_fn!(projections, iter,);
projections_fn!(projections_mut, iter_mut, mut);

fn expert_path(cfg: &crate::model::ModelConfig) -> &'static str {
    match cfg.moe.as_ref().map(|m| m.kind) {
        Some(crate::model::config::MoeKind::Gemma4) => "experts",
        _ => "mlp.experts",
    }
}

/// The projection's own name (`q_proj`) from its module path (`self_attn.q_proj`).
pub fn proj_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// Whether a module path is inside an expert.
pub fn in_expert(path: &str) -> bool {
    path.split('.').any(|part| part == "experts")
}

/// Freezes the model and attaches fresh adapters to the targeted layers; returns the model
/// with only adapter parameters trainable. Initialisation is fixed by `seed`.
pub fn attach<B: Backend>(model: Model<B>, spec: &LoraSpec, seed: u64) -> Model<B> {
    let mut model = model.no_grad();
    let device = model.embed_tokens.device();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4c6f5241);
    let targets = spec.target_names();
    for i in 0..model.layers.len() {
        if !spec.covers_layer(i) {
            continue;
        }
        for (path, linear) in projections_mut(&mut model, i) {
            if targets.iter().any(|t| t == proj_name(&path)) && (spec.experts || !in_expert(&path)) {
                let (d_in, d_out) = (linear.d_in(), linear.d_out());
                linear.lora = Some(Lora::init(d_in, d_out, spec.rank, spec.scale(), spec.dropout, &mut rng, &device));
            }
        }
    }
    model
}

/// Folds every adapter into its base weight (`W + scale·A·B`) and removes it. A quantised
/// base is dequantised first: the result is the dequantised base plus the update, which is
/// what the adapter was trained against (not the original float weights).
pub fn fuse<B: Backend>(mut model: Model<B>) -> Model<B> {
    for i in 0..model.layers.len() {
        for (_, linear) in projections_mut(&mut model, i) {
            if let Some(lora) = linear.lora.take() {
                let merged = linear.dense_weight() + lora.delta();
                linear.weight = LinearWeight::Dense(Param::from_tensor(merged));
            }
        }
    }
    model
}

/// The model with every adapter taken off: the frozen base, which is GRPO's reference policy
/// (no second copy of the weights: the tensors are shared).
pub fn without_adapters<B: Backend>(mut model: Model<B>) -> Model<B> {
    for i in 0..model.layers.len() {
        for (_, linear) in projections_mut(&mut model, i) {
            linear.lora = None;
        }
    }
    model
}

/// Number of adapters attached.
pub fn count<B: Backend>(model: &Model<B>) -> usize {
    (0..model.layers.len())
        .map(|i| projections(model, i).iter().filter(|(_, l)| l.lora.is_some()).count())
        .sum()
}

/// The distinct quantisations among the adapted projections' bases (empty for a float base).
pub fn quantized_formats<B: Backend>(model: &Model<B>) -> Vec<kiln_kernels::Affine> {
    let mut formats = Vec::new();
    for i in 0..model.layers.len() {
        for (_, l) in projections(model, i) {
            if let Some(f) = l.quant_format().filter(|f| !formats.contains(f)) {
                formats.push(f);
            }
        }
    }
    formats
}
