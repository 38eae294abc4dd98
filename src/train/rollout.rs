//! GRPO rollouts: G sampled continuations of one prompt, decoded side by side with the KV
//! cache (one prefill, then G rows per step), and the log-probabilities of completions under a
//! model, which the loss needs with gradients (and the reference without).

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use super::eval::{batch_hidden, pick_targets};
use crate::backend::QuantMatmul;
use crate::data::{Batch, Example};
use crate::generate::{ids_tensor, Sampler, StopConfig};
use crate::model::Model;

/// One sampled completion.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Completion {
    /// New token ids, the end-of-sequence token excluded (what the text is decoded from).
    pub ids: Vec<u32>,
    /// The end-of-sequence token that ended it.
    pub eos: Option<u32>,
    /// Stopped by the length limit rather than an end-of-sequence token.
    pub truncated: bool,
}

impl Completion {
    /// What the policy produced, its end-of-sequence token included: training on it is how
    /// the model learns to stop.
    pub fn tokens(&self) -> Vec<u32> {
        self.ids.iter().copied().chain(self.eos).collect()
    }
}

/// `group` continuations of `prompt`, sampled row after row from `sampler` at every step (so
/// a seed fixes all of them). Rows that have ended still ride along in the batch until every
/// row has ended or reached `stop.max_new_tokens`.
pub fn rollout_group<B: QuantMatmul>(model: &Model<B>, prompt: &[u32], group: usize, sampler: &mut Sampler, stop: &StopConfig) -> Vec<Completion> {
    let mut out = vec![Completion::default(); group];
    if prompt.is_empty() || group == 0 || stop.max_new_tokens == 0 {
        return out;
    }
    let device = model.embed_tokens.device();
    let mut one = model.make_cache();
    let first = model.forward_last(ids_tensor::<B>(prompt, &device), Some(&mut one)); // [1, v]
    let mut cache = one.repeat_rows(group);
    let mut logits = first.repeat_dim(0, group); // [g, v]
    let vocab = model.config.vocab_size;
    let mut done = vec![false; group];
    loop {
        let rows: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap_or_default();
        let mut next = vec![0i64; group];
        for (r, row) in rows.chunks(vocab).enumerate() {
            let id = sampler.sample(row);
            next[r] = id as i64;
            if done[r] {
                continue;
            }
            if stop.eos_ids.contains(&id) {
                out[r].eos = Some(id);
                done[r] = true;
            } else {
                out[r].ids.push(id);
                if out[r].ids.len() >= stop.max_new_tokens {
                    out[r].truncated = true;
                    done[r] = true;
                }
            }
        }
        if done.iter().all(|d| *d) {
            return out;
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(next, [group, 1]), &device);
        logits = model.forward_last(ids, Some(&mut cache));
    }
}

/// One training row per completion of `prompt`: the prompt as context, the completion's tokens
/// (end-of-sequence included) as targets.
pub fn rollout_rows(prompt: &[u32], completions: &[Completion]) -> Vec<Example> {
    completions
        .iter()
        .map(|c| {
            let tokens = c.tokens();
            let ids: Vec<u32> = prompt.iter().chain(&tokens).copied().collect();
            let train_mask = (0..ids.len()).map(|i| i >= prompt.len()).collect();
            Example { ids, train_mask, line: 0 }
        })
        .collect()
}

/// The log-probability of every target of `batch` under `model` and the entropy (nats) of the
/// distribution it was drawn from: `[b, s]` each, meaningful where the loss mask is 1.
pub fn token_logprobs<B: QuantMatmul>(model: &Model<B>, batch: &Batch) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let device = model.embed_tokens.device();
    let logp = log_softmax(model.lm_head(batch_hidden(model, batch, &device)), 2); // [b, s, v]
    let entropy = (logp.clone().exp() * logp.clone()).sum_dim(2).neg().reshape([batch.batch, batch.seq]);
    (pick_targets(logp, batch, 0), entropy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::generate::{generate, SamplingConfig};
    use std::path::Path;

    fn model() -> Model<Cpu> {
        Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama"), &Default::default()).unwrap()
    }

    #[test]
    fn batched_rollouts_decode_as_single_sequences_do() {
        let model = model();
        let prompt = [1u32, 17, 42, 9];
        let stop = StopConfig { max_new_tokens: 7, eos_ids: vec![] };
        // Greedy: every row is the single-sequence greedy continuation.
        let greedy = generate(&model, &prompt, &mut Sampler::new(SamplingConfig::default()), &stop, |_| true);
        let rows = rollout_group(&model, &prompt, 3, &mut Sampler::new(SamplingConfig::default()), &stop);
        for r in &rows {
            assert_eq!(r.ids, greedy);
            assert!(r.truncated);
        }
        // Sampled: a seed repeats them, and the rows differ from each other.
        let cfg = SamplingConfig { temperature: 1.5, top_k: 0, top_p: 1.0, seed: 11 };
        let a = rollout_group(&model, &prompt, 4, &mut Sampler::new(cfg.clone()), &stop);
        let b = rollout_group(&model, &prompt, 4, &mut Sampler::new(cfg), &stop);
        assert_eq!(a, b);
        assert!(a.iter().any(|r| r.ids != a[0].ids), "four sampled rows were identical: {a:?}");
        // An end-of-sequence id ends a row without being kept.
        let eos = StopConfig { max_new_tokens: 7, eos_ids: vec![greedy[2]] };
        let rows = rollout_group(&model, &prompt, 2, &mut Sampler::new(SamplingConfig::default()), &eos);
        let cut = greedy.iter().position(|&i| i == greedy[2]).unwrap();
        assert_eq!(rows[0].ids, greedy[..cut].to_vec());
        assert!(!rows[0].truncated);
    }

    #[test]
    fn token_logprobs_match_step_by_step_logits() {
        let model = model();
        let prompt = [1u32, 17, 42, 9];
        let completions = vec![Completion { ids: vec![5, 8], eos: Some(13), truncated: false }, Completion { ids: vec![21], eos: None, truncated: true }];
        let batch = crate::data::rows_in_order(&rollout_rows(&prompt, &completions));
        let (logp, entropy) = token_logprobs(&model, &batch);
        assert_eq!(logp.dims(), [2, 6]);
        // Row 0 predicts 5, 8, 13 from positions 3, 4, 5; row 1 predicts 21 from position 3.
        assert_eq!(batch.loss_mask, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        let got = logp.into_data().to_vec::<f32>().unwrap();
        let ent = entropy.into_data().to_vec::<f32>().unwrap();
        for (row, c) in completions.iter().enumerate() {
            let mut seq = prompt.to_vec();
            for (j, tok) in c.tokens().into_iter().enumerate() {
                let logits = model.forward(ids_tensor::<Cpu>(&seq, &Default::default()), None); // [1, s, v]
                let s = seq.len();
                let last = log_softmax(logits.narrow(1, s - 1, 1), 2).into_data().to_vec::<f32>().unwrap();
                let at = row * 6 + 3 + j;
                assert!((got[at] - last[tok as usize]).abs() < 1e-5, "row {row} token {j}: {} vs {}", got[at], last[tok as usize]);
                let h: f32 = -last.iter().map(|l| l.exp() * l).sum::<f32>();
                assert!((ent[at] - h).abs() < 1e-4, "row {row} token {j}: entropy {} vs {h}", ent[at]);
                seq.push(tok);
            }
        }
    }
}
