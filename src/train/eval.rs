//! Evaluation: masked cross-entropy and perplexity over a dataset, and exact-match accuracy of
//! greedy answers to held-out prompts. Both run on a non-autodiff model.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::TensorData;

use kiln_kernels::{chunk_rows, HeadLoss};

use crate::backend::QuantMatmul;
use crate::data::{make_batches, Batch, Example, PromptAnswer};
use crate::generate::{generate, Sampler, SamplingConfig, StopConfig};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// The final hidden states at every position of `batch` (packed rows keep to their segments):
/// `[b, s, hidden]`.
pub fn batch_hidden<B: QuantMatmul>(model: &Model<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 3> {
    let ids: Vec<i64> = batch.ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.batch, batch.seq]), device);
    model.forward_packed_hidden(ids, &batch.positions, &batch.segments)
}

/// `log p(target)` for log-probabilities `logp` `[b, s, v]` (or a chunk of positions
/// `start..start + len` of the batch): `[b, len]`.
pub fn pick_targets<B: Backend>(logp: Tensor<B, 3>, batch: &Batch, start: usize) -> Tensor<B, 2> {
    let [b, len, _] = logp.dims();
    let targets: Vec<i64> = (0..b).flat_map(|r| batch.targets[r * batch.seq + start..r * batch.seq + start + len].iter().map(|&t| t as i64)).collect();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [b, len, 1]), &logp.device());
    logp.gather(2, targets).reshape([b, len])
}

/// The batch's loss mask for positions `start..start + len`: `[b, len]`.
pub fn mask_tensor<B: Backend>(batch: &Batch, start: usize, len: usize, device: &B::Device) -> Tensor<B, 2> {
    let m: Vec<f32> = (0..batch.batch).flat_map(|r| batch.loss_mask[r * batch.seq + start..r * batch.seq + start + len].iter().copied()).collect();
    Tensor::from_data(TensorData::new(m, [batch.batch, len]), device)
}

/// Sum over target tokens of −log p(target), for one batch: a scalar tensor. Dividing by the
/// number of target tokens gives the mean loss.
///
/// The head and the cross-entropy run as one chunked operation ([`kiln_kernels::lm_head_loss`]),
/// so the `[b·s, vocab]` logits are never held whole, in the forward or the backward.
pub fn loss_sum<B: QuantMatmul>(model: &Model<B>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
    let h = batch_hidden(model, batch, device);
    match model.head_weight() {
        Some((w, layout)) => {
            let [b, s, e] = h.dims();
            let n = b * s;
            let targets: Vec<i64> = batch.targets.iter().map(|&t| t as i64).collect();
            let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
            let mask = Tensor::<B, 1>::from_data(TensorData::new(batch.loss_mask.clone(), [n]), device);
            let spec = HeadLoss { layout, softcap: model.config.final_logit_softcap, chunk: chunk_rows(model.config.vocab_size) };
            kiln_kernels::lm_head_loss(h.reshape([n, e]), w, targets, mask, spec)
        }
        None => loss_sum_unfused(model, h, batch, device),
    }
}

/// [`loss_sum`] as plain tensor operations over the full logits: the reference the chunked
/// operation is checked against, and the path for heads that are not a plain product
/// (quantised, biased or adapted).
pub fn loss_sum_unfused<B: QuantMatmul>(model: &Model<B>, hidden: Tensor<B, 3>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
    let logp = log_softmax(model.lm_head(hidden), 2); // [b, s, v]
    (pick_targets(logp, batch, 0) * mask_tensor(batch, 0, batch.seq, device)).sum().neg()
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub ppl: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
}

/// Mean loss and perplexity over `examples` (file order, padded batches), at most
/// `max_batches` batches when non-zero.
pub fn evaluate<B: QuantMatmul>(model: &Model<B>, examples: &[Example], batch_size: usize, max_seq_len: usize, max_batches: usize) -> EvalResult {
    let device = model.embed_tokens.device();
    let mut batches = make_batches(examples, batch_size, max_seq_len, false, None);
    if max_batches > 0 {
        batches.truncate(max_batches);
    }
    let start = Instant::now();
    let mut total = 0.0f64;
    let mut tokens = 0usize;
    for batch in &batches {
        if batch.tokens == 0 {
            continue;
        }
        total += loss_sum(model, batch, &device).into_scalar().elem::<f64>();
        tokens += batch.tokens;
    }
    let loss = if tokens > 0 { total / tokens as f64 } else { f64::NAN };
    // Count every position processed (prompt tokens too) for throughput.
    let processed: usize = batches.iter().map(|b| b.batch * b.seq).sum();
    EvalResult { loss, ppl: loss.exp(), tokens, tokens_per_s: processed as f64 / start.elapsed().as_secs_f64().max(1e-9) }
}

/// One answered prompt.
pub struct Answer {
    pub prompt: String,
    pub completion: String,
    pub expected: String,
    pub correct: bool,
}

/// Greedy answers to `prompts`, compared with the expected answers after trimming whitespace.
pub fn exact_match<B: QuantMatmul>(model: &Model<B>, tokenizer: &Tokenizer, prompts: &[PromptAnswer], eos_ids: &[u32], max_new_tokens: usize) -> Vec<Answer> {
    let stop = StopConfig { max_new_tokens, eos_ids: eos_ids.to_vec() };
    prompts
        .iter()
        .map(|p| {
            let mut sampler = Sampler::new(SamplingConfig::default());
            let ids = generate(model, &p.prompt_ids, &mut sampler, &stop, |_| true);
            let completion = tokenizer.decode(&ids, true).unwrap_or_default();
            let prompt = tokenizer.decode(&p.prompt_ids, false).unwrap_or_default();
            let correct = completion.trim() == p.answer.trim();
            Answer { prompt, completion, expected: p.answer.clone(), correct }
        })
        .collect()
}
