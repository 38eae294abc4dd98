//! Mixture of experts: a router scores every expert per token, the top k run, and their
//! outputs are summed with the router's weights.
//!
//! Only the chosen experts compute: the routing is read back to the host, each expert gathers
//! the rows of its tokens (`select`), runs its MLP on them, and adds its weighted output back
//! in place (`select_assign` with `Add`). Both ops are differentiable, so gradients reach the
//! experts, the router's weights and the input alike. The read-back costs one synchronisation
//! per MoE layer, and hands the probe its statistics for free.
//!
//! Dims: n tokens (batch × positions), e hidden size, x experts, k experts per token.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::TensorData;

use super::config::{ModelConfig, MoeConfig, MoeKind};
use super::decoder::Mlp;
use super::layers::{load_tensor, rms_normalize, Linear};
use super::weights::WeightFiles;
use super::ModelError;
use crate::quant::affine::QuantSpec;
use kiln_kernels::QuantMatmul;

/// The experts of one layer and their router.
#[derive(Module, Debug)]
pub struct Moe<B: Backend> {
    /// `[e] -> [x]` router logits (Qwen 3 MoE `mlp.gate`, Gemma 4 `router.proj`).
    pub router: Linear<B>,
    pub experts: Vec<Mlp<B>>,
    pub top_k: usize,
    pub norm_topk: bool,
    /// Gemma 4's router: the input is RMS-normalised (no weight), then multiplied by this
    /// `[e]` and by e^-1/2, before the router projection.
    pub router_scale: Option<Param<Tensor<B, 1>>>,
    /// Gemma 4: each chosen expert's weight is multiplied by its entry of this `[x]`.
    pub per_expert_scale: Option<Param<Tensor<B, 1>>>,
    pub eps: f64,
}

/// What a router did on one forward pass of one layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RouterStats {
    pub layer: usize,
    /// Per expert, the fraction of tokens routed to it (sums to k).
    pub load: Vec<f64>,
    /// Mean entropy of the router's softmax over all experts, in nats (ln x when uniform).
    pub entropy: f64,
    pub tokens: usize,
}

impl<B: QuantMatmul> Moe<B> {
    /// Loads the experts of layer `prefix` in either checkpoint layout: one module per expert
    /// (`mlp.experts.{j}.gate_proj`, Qwen 3 MoE) or stacked tensors (`experts.gate_up_proj`
    /// `[x, 2·w, e]` and `experts.down_proj` `[x, e, w]`, Gemma 4).
    pub fn load(files: &WeightFiles, prefix: &str, cfg: &ModelConfig, moe: &MoeConfig, quantize: Option<QuantSpec>, device: &B::Device) -> Result<Self, ModelError> {
        let (x, w, e, act) = (moe.num_experts, moe.width, cfg.hidden_size, cfg.activation);
        match moe.kind {
            MoeKind::Qwen3 => {
                let experts = (0..x)
                    .map(|j| Mlp::load(files, &format!("{prefix}.mlp.experts.{j}"), e, w, false, act, quantize, device))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Self {
                    router: Linear::load(files, &format!("{prefix}.mlp.gate"), e, x, false, None, device)?,
                    experts,
                    top_k: moe.top_k,
                    norm_topk: moe.norm_topk,
                    router_scale: None,
                    per_expert_scale: None,
                    eps: 0.0,
                })
            }
            MoeKind::Gemma4 => {
                let gate_up_name = format!("{prefix}.experts.gate_up_proj");
                let down_name = format!("{prefix}.experts.down_proj");
                let gate_up = files.f32(&gate_up_name, &[x, 2 * w, e])?;
                let down = files.f32(&down_name, &[x, e, w])?;
                let mut experts = Vec::with_capacity(x);
                for j in 0..x {
                    let rows = &gate_up[j * 2 * w * e..(j + 1) * 2 * w * e];
                    let (gate, up) = rows.split_at(w * e);
                    let down = &down[j * e * w..(j + 1) * e * w];
                    experts.push(Mlp {
                        gate_proj: Linear::from_host(format!("{gate_up_name}[{j}] (gate)"), gate, w, e, None, quantize, device)?,
                        up_proj: Linear::from_host(format!("{gate_up_name}[{j}] (up)"), up, w, e, None, quantize, device)?,
                        down_proj: Linear::from_host(format!("{down_name}[{j}]"), down, e, w, None, quantize, device)?,
                        activation: act,
                    });
                }
                Ok(Self {
                    router: Linear::load(files, &format!("{prefix}.router.proj"), e, x, false, None, device)?,
                    experts,
                    top_k: moe.top_k,
                    norm_topk: moe.norm_topk,
                    router_scale: Some(Param::from_tensor(load_tensor(files, &format!("{prefix}.router.scale"), [e], device)?)),
                    per_expert_scale: Some(Param::from_tensor(load_tensor(files, &format!("{prefix}.router.per_expert_scale"), [x], device)?)),
                    eps: cfg.rms_norm_eps,
                })
            }
        }
    }

    /// `router_in` decides, `expert_in` is what the experts read (the same tensor for Qwen 3
    /// MoE; Gemma 4 routes on the block's input and feeds the experts its own normalisation of
    /// it). Both `[b, s, e]`; returns `[b, s, e]` and what the router did (layer left 0).
    pub fn forward(&self, router_in: Tensor<B, 3>, expert_in: Tensor<B, 3>) -> (Tensor<B, 3>, RouterStats) {
        let [b, s, e] = expert_in.dims();
        let n = b * s;
        let num = self.experts.len();
        let k = self.top_k;
        let device = expert_in.device();
        let mut r = router_in.reshape([n, e]);
        if let Some(scale) = &self.router_scale {
            r = rms_normalize(r, self.eps).mul(scale.val().unsqueeze::<2>()).mul_scalar((e as f64).powf(-0.5) as f32);
        }
        let probs = activation::softmax(self.router.forward(r), 1); // [n, x]

        let host: Vec<f32> = probs.clone().into_data().convert::<f32>().into_vec().unwrap_or_default();
        let (chosen, stats) = route(&host, num, k);
        let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(chosen.iter().map(|&j| j as i64).collect::<Vec<_>>(), [n, k]), &device);
        let mut weights = probs.gather(1, idx.clone()); // [n, k]
        if self.norm_topk {
            weights = weights.clone().div(weights.sum_dim(1));
        }
        if let Some(scale) = &self.per_expert_scale {
            weights = weights.mul(scale.val().select(0, idx.reshape([n * k])).reshape([n, k]));
        }
        let weights = weights.reshape([n * k]); // slot t·k + i: token t's i-th choice

        let x = expert_in.reshape([n, e]);
        let mut out = Tensor::<B, 2>::zeros([n, e], &device);
        for (j, expert) in self.experts.iter().enumerate() {
            let slots: Vec<i64> = chosen.iter().enumerate().filter(|(_, c)| **c == j).map(|(slot, _)| slot as i64).collect();
            if slots.is_empty() {
                continue;
            }
            let m = slots.len();
            let tokens: Vec<i64> = slots.iter().map(|&slot| slot / k as i64).collect();
            let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [m]), &device);
            let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [m]), &device);
            let y = expert.forward(x.clone().select(0, tokens.clone())); // [m, e]
            let y = y.mul(weights.clone().select(0, slots).unsqueeze_dim::<2>(1)); // [m, e] · [m, 1]
            out = out.select_assign(0, tokens, y, IndexingUpdateOp::Add);
        }
        (out.reshape([b, s, e]), RouterStats { layer: 0, tokens: n, ..stats })
    }
}

/// The top `k` experts of each token (`n·k` indices, highest probability first; ties go to
/// the lower index, as `torch.topk` on CPU) and the router statistics, from row-major `[n, x]`
/// probabilities.
pub fn route(probs: &[f32], num: usize, k: usize) -> (Vec<usize>, RouterStats) {
    let n = if num == 0 { 0 } else { probs.len() / num };
    let mut chosen = Vec::with_capacity(n * k);
    let mut counts = vec![0usize; num];
    let mut entropy = 0.0f64;
    for row in probs.chunks(num) {
        let mut order: Vec<usize> = (0..num).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &j in &order[..k] {
            chosen.push(j);
            counts[j] += 1;
        }
        entropy -= row.iter().filter(|&&p| p > 0.0).map(|&p| p as f64 * (p as f64).ln()).sum::<f64>();
    }
    let load = counts.iter().map(|&c| c as f64 / n.max(1) as f64).collect();
    (chosen, RouterStats { layer: 0, load, entropy: entropy / n.max(1) as f64, tokens: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_the_top_k_and_counts_load() {
        #[rustfmt::skip]
        let probs = [
            0.1, 0.6, 0.2, 0.1,
            0.25, 0.25, 0.25, 0.25,
        ];
        let (chosen, stats) = route(&probs, 4, 2);
        assert_eq!(chosen, vec![1, 2, 0, 1]);
        assert_eq!(stats.load, vec![0.5, 1.0, 0.5, 0.0]);
        let h0 = -(0.1f64 * 0.1f64.ln() * 2.0 + 0.6 * 0.6f64.ln() + 0.2 * 0.2f64.ln());
        let h1 = 4f64.ln();
        assert!((stats.entropy - (h0 + h1) / 2.0).abs() < 1e-6, "{}", stats.entropy);
    }
}
