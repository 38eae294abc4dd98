//! Sampling and the decode loop with a KV cache.
//!
//! The prompt is prefilled in one forward pass, then each new token is one forward over a
//! single position against the cache. Logits come back to the host for sampling: at the
//! vocabulary sizes kiln handles that is a few hundred kilobytes per token, and it keeps the
//! sampler exact and identical on every backend.

use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::QuantMatmul;
use crate::model::Model;

/// How the next token is chosen.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Draws token ids from logits; owns the random state so a seed fixes the whole sequence.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.config.temperature;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.config.top_k > 0 && self.config.top_k < cand.len() {
            // The order is total (ties go to the lower id), so the k best are one set: select
            // them, then sort only those (a 152k vocabulary sorted per row per token dominates
            // batched sampling otherwise).
            cand.select_nth_unstable_by(self.config.top_k - 1, order);
            cand.truncate(self.config.top_k);
        }
        cand.sort_by(order);
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.config.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.config.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest value; the first one on ties, as torch.argmax.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Token ids `[1, n]` on `device`.
pub fn ids_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}

/// When to stop.
#[derive(Debug, Clone, Default)]
pub struct StopConfig {
    pub max_new_tokens: usize,
    /// Token ids that end generation (the EOS token is not emitted to the callback).
    pub eos_ids: Vec<u32>,
}

/// Generates up to `stop.max_new_tokens` tokens after `prompt`, calling `on_token` with each new
/// id; `on_token` returns false to stop early (a stop string matched). Returns the new ids,
/// EOS excluded.
pub fn generate<B: QuantMatmul>(
    model: &Model<B>,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop: &StopConfig,
    mut on_token: impl FnMut(u32) -> bool,
) -> Vec<u32> {
    let device = model.embed_tokens.device();
    let mut cache = model.make_cache();
    let mut out = Vec::new();
    if prompt.is_empty() || stop.max_new_tokens == 0 {
        return out;
    }
    let mut logits = model.forward_last(ids_tensor::<B>(prompt, &device), Some(&mut cache));
    loop {
        let row: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap_or_default();
        let next = sampler.sample(&row);
        if stop.eos_ids.contains(&next) {
            break;
        }
        out.push(next);
        if !on_token(next) || out.len() >= stop.max_new_tokens {
            break;
        }
        logits = model.forward_last(ids_tensor::<B>(&[next], &device), Some(&mut cache));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let cfg = SamplingConfig { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 };
        assert_eq!(Sampler::new(cfg).sample(&[0.1, 3.0, 2.9]), 1);
        let cfg = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 7 };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = { let mut s = Sampler::new(cfg.clone()); (0..20).map(|_| s.sample(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(cfg); (0..20).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
    }
}
