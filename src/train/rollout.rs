//! GRPO rollouts: G sampled continuations of one prompt, decoded side by side with the KV
//! cache (one prefill, then G rows per step), and the log-probabilities of completions under a
//! model, which the loss needs with gradients.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;

use crate::backend::QuantMatmul;
use crate::generate::{ids_tensor, Sampler, StopConfig};
use crate::model::Model;

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// New token ids, the end-of-sequence token excluded.
    pub ids: Vec<u32>,
    /// Stopped by the length limit rather than an end-of-sequence token.
    pub truncated: bool,
}

/// `group` continuations of `prompt`, sampled row after row from `sampler` at every step (so
/// a seed fixes all of them). Rows that have ended still ride along in the batch until every
/// row has ended or reached `stop.max_new_tokens`.
pub fn rollout_group<B: QuantMatmul>(model: &Model<B>, prompt: &[u32], group: usize, sampler: &mut Sampler, stop: &StopConfig) -> Vec<Completion> {
    let mut out = vec![Completion { ids: Vec::new(), truncated: false }; group];
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

/// Log-probabilities `[n, t]` of each completion's tokens after `prompt` under `model`, with
/// the mask `[n, t]` (1 on real tokens, 0 on the padding of shorter completions); `t` is the
/// longest completion. One forward over `[n, prompt + t]` rows. None for an empty prompt or no
/// completions: nothing predicts a first token without context.
pub fn completion_logprobs<B: QuantMatmul>(model: &Model<B>, prompt: &[u32], completions: &[Vec<u32>]) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
    if prompt.is_empty() || completions.is_empty() {
        return None;
    }
    let device = model.embed_tokens.device();
    let n = completions.len();
    let t = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let p = prompt.len();
    let (mut ids, mut targets, mut mask) = (Vec::with_capacity(n * (p + t)), Vec::with_capacity(n * t), Vec::with_capacity(n * t));
    for c in completions {
        // Padding after a completion is never attended to by its real tokens (causal), so any
        // id serves; its positions are masked out.
        ids.extend(prompt.iter().chain(c.iter()).map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(0i64, t - c.len()));
        targets.extend(c.iter().map(|&i| i as i64));
        targets.extend(std::iter::repeat_n(0i64, t - c.len()));
        mask.extend(std::iter::repeat_n(1.0f32, c.len()));
        mask.extend(std::iter::repeat_n(0.0f32, t - c.len()));
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, p + t]), &device);
    let hidden = model.forward_hidden(ids, None).narrow(1, p - 1, t); // positions predicting the completion
    let logp = log_softmax(model.lm_head(hidden), 2); // [n, t, v]
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [n, t, 1]), &device);
    let picked = logp.gather(2, targets).reshape([n, t]);
    Some((picked, Tensor::from_data(TensorData::new(mask, [n, t]), &device)))
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
    fn completion_logprobs_match_step_by_step_logits() {
        let model = model();
        let prompt = [1u32, 17, 42, 9];
        let completions = vec![vec![5u32, 8, 13], vec![21u32]];
        assert!(completion_logprobs(&model, &[], &completions).is_none());
        let (logp, mask) = completion_logprobs(&model, &prompt, &completions).unwrap();
        assert_eq!(logp.dims(), [2, 3]);
        assert_eq!(mask.into_data().to_vec::<f32>().unwrap(), vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        let got = logp.into_data().to_vec::<f32>().unwrap();
        for (row, c) in completions.iter().enumerate() {
            let mut seq = prompt.to_vec();
            for (j, &tok) in c.iter().enumerate() {
                let logits = model.forward(ids_tensor::<Cpu>(&seq, &Default::default()), None); // [1, s, v]
                let s = seq.len();
                let last = log_softmax(logits.narrow(1, s - 1, 1), 2).into_data().to_vec::<f32>().unwrap();
                let want = last[tok as usize];
                assert!((got[row * 3 + j] - want).abs() < 1e-5, "row {row} token {j}: {} vs {want}", got[row * 3 + j]);
                seq.push(tok);
            }
        }
    }
}
