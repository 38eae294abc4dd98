//! Probe signals: what happens inside the model, measured on a fixed probe batch (the first
//! validation examples) and emitted as `probe` events, one per signal with a vector per layer.
//!
//! Signals so far (mixture-of-experts models):
//! - `expert_load`: per MoE layer, the fraction of tokens routed to each expert (each token
//!   picks k experts, so a layer's loads sum to k; perfectly balanced is k / experts each).
//!   An expert near 0 is dead weight; one near 1 takes every token.
//! - `router_entropy`: per MoE layer, the mean entropy (nats) of the router's softmax over all
//!   experts; ln(experts) is a router that cannot tell experts apart, near 0 one that always
//!   knows.

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::data::Example;
use crate::model::moe::RouterStats;
use crate::model::Model;
use crate::run::Event;
use kiln_kernels::QuantMatmul;

/// Router statistics over the first `max_examples` examples (each run alone, so no padding
/// token is routed), token-weighted across examples. Empty for a model without experts.
pub fn router_stats<B: QuantMatmul>(model: &Model<B>, examples: &[Example], max_examples: usize, max_seq_len: usize) -> Vec<RouterStats> {
    if !model.config.has_experts() {
        return Vec::new();
    }
    let device = model.embed_tokens.device();
    let mut total: Vec<RouterStats> = Vec::new();
    for ex in examples.iter().filter(|e| !e.ids.is_empty()).take(max_examples) {
        let ids: Vec<i64> = ex.ids.iter().take(max_seq_len).map(|&i| i as i64).collect();
        let n = ids.len();
        let stats = model.router_stats(Tensor::from_data(TensorData::new(ids, [1, n]), &device));
        if total.is_empty() {
            total = stats.iter().map(|s| RouterStats { layer: s.layer, load: vec![0.0; s.load.len()], entropy: 0.0, tokens: 0 }).collect();
        }
        for (t, s) in total.iter_mut().zip(&stats) {
            let w = s.tokens as f64;
            t.load.iter_mut().zip(&s.load).for_each(|(a, b)| *a += b * w);
            t.entropy += s.entropy * w;
            t.tokens += s.tokens;
        }
    }
    for t in &mut total {
        let n = t.tokens.max(1) as f64;
        t.load.iter_mut().for_each(|a| *a /= n);
        t.entropy /= n;
    }
    total
}

/// `expert_load` and `router_entropy` probe events for step `step`.
pub fn expert_events(stats: &[RouterStats], step: usize) -> Vec<Event> {
    if stats.is_empty() {
        return Vec::new();
    }
    let layers: Vec<usize> = stats.iter().map(|s| s.layer).collect();
    vec![
        Event::Probe { step, signal: "expert_load".into(), layers: layers.clone(), values: stats.iter().map(|s| s.load.clone()).collect() },
        Event::Probe { step, signal: "router_entropy".into(), layers, values: stats.iter().map(|s| vec![s.entropy]).collect() },
    ]
}
