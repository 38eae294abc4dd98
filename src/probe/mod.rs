//! Probe signals: what happens inside the model, measured every `probes.every` steps on a fixed
//! probe batch (the first validation examples, each run alone so no padding enters a statistic)
//! and emitted as `probe` events, one per signal with a vector per layer. `docs/probes.md` says
//! what each one means and what a worrying pattern looks like.
//!
//! From one traced forward pass per probe example ([`forward_signals`]):
//! - `residual_rms`: RMS of each layer's output residual stream.
//! - `layer_coherence`: mean cosine similarity between a layer's input and output.
//! - `attention_entropy`, `attention_distance`: per layer and head, the mean entropy (nats) of
//!   a query's attention and the mean distance (tokens) it looks back.
//! - `logit_entropy`: mean entropy of the next-token distribution.
//! - `kl_to_base`: KL(policy ‖ base) per token, when a base is known (LoRA: the model without
//!   its adapters).
//! - `expert_load`, `router_entropy`: MoE routing ([`expert_events`]).
//!
//! From the parameters and the step's gradients: `lora_update_norm` ([`lora_update_norms`])
//! and `grad_norm` per layer ([`layer_grad_norms`]).

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;

use crate::data::Example;
use crate::model::moe::RouterStats;
use crate::model::Model;
use crate::run::Event;
use kiln_kernels::QuantMatmul;

/// The token ids probes are measured on: the first `max_examples` non-empty examples, cut to
/// `max_seq_len`.
pub fn probe_batch(examples: &[Example], max_examples: usize, max_seq_len: usize) -> Vec<Vec<u32>> {
    examples.iter().filter(|e| !e.ids.is_empty()).take(max_examples).map(|e| e.ids.iter().take(max_seq_len).copied().collect()).collect()
}

fn ids_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), device)
}

/// Mean entropy (nats) of softmax rows of `log_probs` over the last dim, summed over every other
/// position: `[.., n] -> [1]`.
fn entropy_sum<B: Backend, const D: usize>(log_probs: Tensor<B, D>) -> Tensor<B, 1> {
    (log_probs.clone().exp() * log_probs).sum().neg()
}

/// The forward-pass signals over `batch` (each example alone), token-weighted across examples;
/// `base` gives `kl_to_base`. Empty for an empty batch.
pub fn forward_signals<B: QuantMatmul>(model: &Model<B>, base: Option<&Model<B>>, batch: &[Vec<u32>], step: usize) -> Vec<Event> {
    let batch: Vec<&Vec<u32>> = batch.iter().filter(|ids| !ids.is_empty()).collect();
    if batch.is_empty() {
        return Vec::new();
    }
    let device = model.embed_tokens.device();
    let (layers, heads) = (model.layers.len(), model.config.num_heads);
    // Per layer: Σ h², Σ cos; per layer and head: Σ entropy, Σ distance; then Σ logit entropy
    // and Σ KL. One host transfer per example.
    let width = 2 * layers + 2 * layers * heads + 2;
    let mut sums = vec![0.0f64; width];
    let mut tokens = 0usize;
    let mut routers: Vec<RouterStats> = Vec::new();
    for ids in batch {
        let s = ids.len();
        let (logits, trace) = model.forward_traced(ids_tensor(ids, &device));
        let mut parts: Vec<Tensor<B, 1>> = Vec::with_capacity(width);
        for pair in trace.hidden.windows(2) {
            let (h_in, h_out) = (pair[0].clone(), pair[1].clone());
            parts.push(h_out.clone().powi_scalar(2).sum());
            let dot = (h_in.clone() * h_out.clone()).sum_dim(2); // [1, s, 1]
            let norms = h_in.powi_scalar(2).sum_dim(2).sqrt() * h_out.powi_scalar(2).sum_dim(2).sqrt();
            parts.push((dot / norms.clamp_min(1e-30)).sum());
        }
        // Lookback distance q − t of every (query, key) pair; masked keys carry no probability.
        let lookback: Vec<f32> = (0..s).flat_map(|q| (0..s).map(move |t| q as f32 - t as f32)).collect();
        let lookback = Tensor::<B, 2>::from_data(TensorData::new(lookback, [s, s]), &device).unsqueeze::<4>(); // [1, 1, s, s]
        for p in &trace.attention {
            let [_, h, _, _] = p.dims();
            let ent = (p.clone() * p.clone().clamp_min(1e-30).log()).sum_dim(3).sum_dim(2).neg(); // [1, h, 1, 1]
            parts.push(ent.reshape([h]));
            let dist = (p.clone() * lookback.clone()).sum_dim(3).sum_dim(2); // [1, h, 1, 1]
            parts.push(dist.reshape([h]));
        }
        let log_p = log_softmax(logits, 2); // [1, s, v]
        parts.push(entropy_sum(log_p.clone()));
        parts.push(match base {
            Some(base) => {
                let log_q = log_softmax(base.forward(ids_tensor(ids, &device), None), 2);
                (log_p.clone().exp() * (log_p - log_q)).sum()
            }
            None => Tensor::zeros([1], &device),
        });
        let values: Vec<f64> = Tensor::cat(parts, 0).into_data().iter::<f64>().collect();
        sums.iter_mut().zip(&values).for_each(|(a, b)| *a += b);
        tokens += s;
        add_router_stats(&mut routers, trace.routers);
    }
    finish_router_stats(&mut routers);

    let n = tokens as f64;
    let all_layers: Vec<usize> = (0..layers).collect();
    let per_layer = |offset: usize, f: &dyn Fn(f64) -> f64| -> Vec<Vec<f64>> { (0..layers).map(|i| vec![f(sums[offset + 2 * i])]).collect() };
    let per_head = |offset: usize| -> Vec<Vec<f64>> {
        (0..layers).map(|i| (0..heads).map(|h| sums[2 * layers + i * 2 * heads + offset * heads + h] / n).collect()).collect()
    };
    let hidden = model.config.hidden_size as f64;
    let head_labels: Vec<String> = (0..heads).map(|h| format!("h{h}")).collect();
    let probe = |signal: &str, layers: Vec<usize>, values: Vec<Vec<f64>>, labels: Vec<String>| Event::Probe { step, signal: signal.into(), layers, values, labels };
    let mut events = vec![
        probe("residual_rms", all_layers.clone(), per_layer(0, &|x| (x / (n * hidden)).sqrt()), Vec::new()),
        probe("layer_coherence", all_layers.clone(), per_layer(1, &|x| x / n), Vec::new()),
        probe("attention_entropy", all_layers.clone(), per_head(0), head_labels.clone()),
        probe("attention_distance", all_layers.clone(), per_head(1), head_labels),
        probe("logit_entropy", vec![layers.saturating_sub(1)], vec![vec![sums[width - 2] / n]], Vec::new()),
    ];
    if base.is_some() {
        events.push(probe("kl_to_base", vec![layers.saturating_sub(1)], vec![vec![sums[width - 1] / n]], Vec::new()));
    }
    events.extend(expert_events(&routers, step));
    events
}

/// Adds one example's router statistics, weighted by its tokens.
fn add_router_stats(total: &mut Vec<RouterStats>, stats: Vec<RouterStats>) {
    if total.is_empty() {
        *total = stats.iter().map(|s| RouterStats { layer: s.layer, load: vec![0.0; s.load.len()], entropy: 0.0, tokens: 0 }).collect();
    }
    for (t, s) in total.iter_mut().zip(&stats) {
        let w = s.tokens as f64;
        t.load.iter_mut().zip(&s.load).for_each(|(a, b)| *a += b * w);
        t.entropy += s.entropy * w;
        t.tokens += s.tokens;
    }
}

fn finish_router_stats(total: &mut [RouterStats]) {
    for t in total {
        let n = t.tokens.max(1) as f64;
        t.load.iter_mut().for_each(|a| *a /= n);
        t.entropy /= n;
    }
}

/// `expert_load` and `router_entropy` probe events for step `step`.
pub fn expert_events(stats: &[RouterStats], step: usize) -> Vec<Event> {
    if stats.is_empty() {
        return Vec::new();
    }
    let layers: Vec<usize> = stats.iter().map(|s| s.layer).collect();
    vec![
        Event::Probe { step, signal: "expert_load".into(), layers: layers.clone(), values: stats.iter().map(|s| s.load.clone()).collect(), labels: Vec::new() },
        Event::Probe { step, signal: "router_entropy".into(), layers, values: stats.iter().map(|s| vec![s.entropy]).collect(), labels: Vec::new() },
    ]
}

/// `lora_update_norm`: per layer, ‖scale·A·B‖_F of each adapted module, from the r×r Gram
/// matrices (‖AB‖² = Σ (AᵀA) ⊙ (BBᵀ)), so the dense update is formed only where it is smaller. Labels are the
/// module paths inside a layer; a module a layer lacks is NaN. None without adapters.
pub fn lora_update_norms<B: Backend>(model: &Model<B>, step: usize) -> Option<Event> {
    let mut labels: Vec<String> = Vec::new();
    let mut entries: Vec<(usize, usize, Tensor<B, 1>)> = Vec::new();
    for layer in 0..model.layers.len() {
        for (path, linear) in crate::lora::projections(model, layer) {
            let Some(lora) = &linear.lora else { continue };
            let (a, b) = (lora.a.val(), lora.b.val()); // [in, r], [r, out]
            let ([n_in, r], n_out) = (a.dims(), b.dims()[1]);
            // The Gram form is the small one while r² < in·out; a rank above the module's
            // size (legal, if wasteful) would make it the large one.
            let squares = if r * r <= n_in * n_out {
                a.clone().transpose().matmul(a) * b.clone().matmul(b.transpose()) // [r, r]
            } else {
                a.matmul(b).powi_scalar(2) // [in, out]
            };
            let col = labels.iter().position(|l| *l == path).unwrap_or_else(|| {
                labels.push(path);
                labels.len() - 1
            });
            entries.push((layer, col, squares.sum().sqrt().mul_scalar(lora.scale.abs())));
        }
    }
    if entries.is_empty() {
        return None;
    }
    let norms: Vec<f64> = Tensor::cat(entries.iter().map(|e| e.2.clone()).collect(), 0).into_data().iter::<f64>().collect();
    let mut layers: Vec<usize> = entries.iter().map(|e| e.0).collect();
    layers.dedup();
    let mut values = vec![vec![f64::NAN; labels.len()]; layers.len()];
    for ((layer, col, _), norm) in entries.iter().zip(norms) {
        let row = layers.iter().position(|l| l == layer).unwrap_or(0);
        values[row][*col] = norm;
    }
    Some(Event::Probe { step, signal: "lora_update_norm".into(), layers, values, labels })
}

/// `grad_norm`: per decoder layer, the L2 norm of its trainable parameters' gradients (before
/// clipping). Layers with nothing trainable are left out.
pub fn layer_grad_norms<B: AutodiffBackend>(model: &Model<B>, grads: &GradientsParams, step: usize) -> Option<Event> {
    let (mut layers, mut values) = (Vec::new(), Vec::new());
    for (i, layer) in model.layers.iter().enumerate() {
        if crate::train::optim::param_counts(layer).0 > 0 {
            layers.push(i);
            values.push(vec![crate::train::optim::global_grad_norm(layer, grads)]);
        }
    }
    (!layers.is_empty()).then(|| Event::Probe { step, signal: "grad_norm".into(), layers, values, labels: Vec::new() })
}
