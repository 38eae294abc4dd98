//! Knowledge-distillation losses, as TRL's `GKDTrainer.generalized_jsd_loss` defines them.
//!
//! With temperature T, `p_s = softmax(student / T)` and `p_t = softmax(teacher / T)` per token:
//!
//! - β = 0: forward KL, `KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)` (mass-covering);
//! - β = 1: reverse KL, `KL(p_s ‖ p_t)` (mode-seeking);
//! - 0 < β < 1: generalised JSD with the mixture `m = β·p_t + (1 − β)·p_s`:
//!   `β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m)`.
//!
//! Summed over the completion tokens (mask) and divided by their number ("batchmean" over
//! tokens). No T² factor, as TRL. The training loss mixes in cross-entropy on the labels as
//! torchtune's `kd_ratio` does: `ce_weight·ce + (1 − ce_weight)·kd`.

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::eval::{batch_hidden, mask_tensor, pick_targets};
use super::rollout::{rollout_group, rollout_rows};
use super::{add_grads, StepGrads};
use crate::backend::{QuantMatmul, TrainBackend};
use crate::data::{rows_in_order, Batch, PromptAnswer};
use crate::generate::{Sampler, SamplingConfig, StopConfig};
use crate::model::Model;
use crate::recipe::DistillSection;

/// Sum over the masked tokens of the per-token divergence; `student` and `teacher` logits are
/// `[b, s, v]`, `mask` `[b, s]` (1 on completion tokens). Summing lets the trainer feed the
/// sequence in chunks and divide once by the token count.
pub fn divergence_sum<B: Backend>(student: Tensor<B, 3>, teacher: Tensor<B, 3>, mask: Tensor<B, 2>, beta: f64, temperature: f64) -> Tensor<B, 1> {
    let log_s = log_softmax(student.div_scalar(temperature), 2);
    let log_t = log_softmax(teacher.div_scalar(temperature), 2);
    // KL(p ‖ q) per token from log-probabilities: Σ_v p (log p − log q) -> [b, s, 1]
    let kl = |log_p: Tensor<B, 3>, log_q: Tensor<B, 3>| (log_p.clone().exp() * (log_p - log_q)).sum_dim(2);
    let per_token = if beta <= 0.0 {
        kl(log_t, log_s)
    } else if beta >= 1.0 {
        kl(log_s, log_t)
    } else {
        // log m = logsumexp(log p_s + log(1 − β), log p_t + log β), elementwise.
        let a = log_s.clone().add_scalar((1.0 - beta).ln());
        let b = log_t.clone().add_scalar(beta.ln());
        let hi = a.clone().max_pair(b.clone());
        let log_m = hi.clone() + ((a - hi.clone()).exp() + (b - hi).exp()).log();
        kl(log_t, log_m.clone()).mul_scalar(beta) + kl(log_s, log_m).mul_scalar(1.0 - beta)
    };
    let [b, s, _] = per_token.dims();
    (per_token.reshape([b, s]) * mask).sum()
}

/// Mean divergence per completion token.
pub fn divergence<B: Backend>(student: Tensor<B, 3>, teacher: Tensor<B, 3>, mask: Tensor<B, 2>, beta: f64, temperature: f64) -> Tensor<B, 1> {
    let tokens = mask.clone().sum().clamp_min(1.0);
    divergence_sum(student, teacher, mask, beta, temperature) / tokens
}

/// Distillation's part of a run: the teacher and the loss settings.
pub struct Distill<I: QuantMatmul> {
    cfg: DistillSection,
    teacher: Model<I>,
    /// Logit columns compared: both models' logits cut to the shorter (checkpoints often pad
    /// the vocabulary differently around one tokenizer).
    vocab: usize,
    /// Prompts for on-policy steps (empty when `lmbda` = 0).
    prompts: Vec<PromptAnswer>,
    stop: StopConfig,
    batch_size: usize,
    seed: u64,
}

/// The two halves of a distillation step's loss, summed over its completion tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sums {
    pub kd: f64,
    pub ce: f64,
}

impl<I: QuantMatmul> Distill<I> {
    pub fn new(cfg: &DistillSection, teacher: Model<I>, vocab: usize, prompts: Vec<PromptAnswer>, eos_ids: &[u32], batch_size: usize, seed: u64) -> Self {
        let stop = StopConfig { max_new_tokens: cfg.max_new_tokens, eos_ids: eos_ids.to_vec() };
        Self { cfg: cfg.clone(), teacher, vocab, prompts, stop, batch_size, seed }
    }

    pub fn teacher(&self) -> &Model<I> {
        &self.teacher
    }

    /// Whether step `step` trains on the student's own completions (a seeded draw per step, so
    /// a resumed run makes the same choices).
    pub fn on_policy(&self, step: usize) -> bool {
        self.cfg.lmbda > 0.0 && !self.prompts.is_empty() && StdRng::seed_from_u64(self.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).random::<f64>() < self.cfg.lmbda
    }

    /// `count` micro-batches of prompts drawn for step `step`, completed by `student` (sampled
    /// at the distillation temperature); the completions are the targets.
    pub fn student_batches(&self, student: &Model<I>, step: usize, count: usize) -> Vec<Batch> {
        let seed = self.seed.wrapping_add(step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sampler = Sampler::new(SamplingConfig { temperature: self.cfg.temperature as f32, top_k: 0, top_p: 1.0, seed });
        (0..count)
            .map(|_| {
                let rows: Vec<_> = (0..self.batch_size)
                    .flat_map(|_| {
                        let p = &self.prompts[rng.random_range(0..self.prompts.len())];
                        let c = rollout_group(student, &p.prompt_ids, 1, &mut sampler, &self.stop);
                        rollout_rows(&p.prompt_ids, &c)
                    })
                    .collect();
                rows_in_order(&rows)
            })
            .collect()
    }

    /// One optimiser step's gradients over `micro` and the sums of its two losses.
    pub fn step<B: TrainBackend<InnerBackend = I>>(&self, model: &Model<B>, micro: &[Batch], on_policy: bool) -> (StepGrads, Sums) {
        let step_tokens: usize = micro.iter().map(|b| b.tokens).sum();
        let (mut out, mut sums) = (StepGrads::default(), Sums::default());
        for batch in micro.iter().filter(|b| b.tokens > 0) {
            let (loss, s) = self.loss(model, batch, step_tokens, on_policy);
            out.loss += loss.clone().into_scalar().elem::<f64>();
            out.tokens += batch.batch * batch.seq;
            (sums.kd, sums.ce) = (sums.kd + s.kd, sums.ce + s.ce);
            add_grads(model, &mut out.grads, GradientsParams::from_grads(loss.backward(), model));
        }
        (out, sums)
    }

    /// The loss of one micro-batch, already divided by `step_tokens` (the target tokens of the
    /// whole step), and its sums. Both models' logits are made `chunk_size` positions at a
    /// time; the teacher's never exist for the whole sequence.
    pub fn loss<B: TrainBackend<InnerBackend = I>>(&self, model: &Model<B>, batch: &Batch, step_tokens: usize, on_policy: bool) -> (Tensor<B, 1>, Sums) {
        let device = model.embed_tokens.device();
        let hidden = batch_hidden(model, batch, &device); // [b, s, h]
        let teacher_hidden = batch_hidden(&self.teacher, batch, &self.teacher.embed_tokens.device()); // [b, s, h_t]
        let (mut kd, mut ce) = (Tensor::<B, 1>::zeros([1], &device), Tensor::<B, 1>::zeros([1], &device));
        let cut = |t: Tensor<B, 3>| {
            let [b, s, v] = t.dims();
            if v == self.vocab { t } else { t.slice([0..b, 0..s, 0..self.vocab]) }
        };
        for start in (0..batch.seq).step_by(self.cfg.chunk_size) {
            let len = self.cfg.chunk_size.min(batch.seq - start);
            let mask = mask_tensor::<B>(batch, start, len, &device);
            let student = cut(model.lm_head(hidden.clone().narrow(1, start, len))); // [b, len, v]
            let teacher = cut(Tensor::from_inner(self.teacher.lm_head(teacher_hidden.clone().narrow(1, start, len))));
            kd = kd + divergence_sum(student.clone(), teacher, mask.clone(), self.cfg.beta, self.cfg.temperature);
            ce = ce + (pick_targets(log_softmax(student, 2), batch, start) * mask).sum().neg();
        }
        let sums = Sums { kd: kd.clone().into_scalar().elem::<f64>(), ce: ce.clone().into_scalar().elem::<f64>() };
        let w = self.cfg.ce_weight;
        // The labels of an on-policy batch are the student's own samples: no cross-entropy.
        let loss = if on_policy { kd.mul_scalar(1.0 - w) } else { kd.mul_scalar(1.0 - w) + ce.mul_scalar(w) };
        (loss.div_scalar(step_tokens.max(1) as f64), sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::backend::Autodiff;
    use burn::tensor::TensorData;

    fn logits<B: Backend>(v: Vec<f32>, shape: [usize; 3]) -> Tensor<B, 3> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0] as f64
    }

    /// One token, two-word vocabulary: student logits (0, 0) → p_s = (½, ½); teacher
    /// (ln 3, 0) → p_t = (¾, ¼). By hand:
    /// forward KL = ¾ ln(3/2) + ¼ ln(1/2) = 0.130812;
    /// reverse KL = ½ ln(2/3) + ½ ln 2 = 0.143841;
    /// β = ½: m = (5/8, 3/8), KL(p_t‖m) = ¾ ln(6/5) + ¼ ln(2/3) = 0.035375,
    ///   KL(p_s‖m) = ½ ln(4/5) + ½ ln(4/3) = 0.032269, JSD = 0.033822;
    /// T = 2, β = 0: p_t ∝ (√3, 1) = (0.633975, 0.366025), forward KL = 0.634 ln(1.268) + 0.366 ln(0.732) = 0.036341.
    #[test]
    fn divergences_against_hand_computed_values() {
        let run = |beta: f64, t: f64| {
            let s = logits::<Cpu>(vec![0.0, 0.0], [1, 1, 2]);
            let te = logits::<Cpu>(vec![3f32.ln(), 0.0], [1, 1, 2]);
            let mask = Tensor::<Cpu, 2>::ones([1, 1], &Default::default());
            scalar(divergence(s, te, mask, beta, t))
        };
        let close = |a: f64, b: f64| assert!((a - b).abs() < 2e-6, "{a} vs {b}");
        close(run(0.0, 1.0), 0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln());
        close(run(0.0, 1.0), 0.130812);
        close(run(1.0, 1.0), 0.143841);
        close(run(0.5, 1.0), 0.033822);
        close(run(0.0, 2.0), 0.036341);
        // β = 0.1 in closed form: m = 0.9·p_s + 0.1·p_t = (0.525, 0.475).
        let (ps, pt, m) = ([0.5f64, 0.5], [0.75f64, 0.25], [0.525f64, 0.475]);
        let kl = |p: [f64; 2], q: [f64; 2]| p[0] * (p[0] / q[0]).ln() + p[1] * (p[1] / q[1]).ln();
        close(run(0.1, 1.0), 0.1 * kl(pt, m) + 0.9 * kl(ps, m));
    }

    #[test]
    fn masked_tokens_do_not_count() {
        // Two tokens; the second is identical in both models but masked out of the mean only
        // through the mask: the mean equals the first token's divergence.
        let s = logits::<Cpu>(vec![0.0, 0.0, 5.0, -1.0], [1, 2, 2]);
        let t = logits::<Cpu>(vec![3f32.ln(), 0.0, -4.0, 2.0], [1, 2, 2]);
        let mask = Tensor::<Cpu, 2>::from_data(TensorData::new(vec![1.0f32, 0.0], [1, 2]), &Default::default());
        assert!((scalar(divergence(s, t, mask, 0.0, 1.0)) - 0.130812).abs() < 2e-6);
    }

    /// The gradient w.r.t. the student's logits against central finite differences, on a
    /// five-word vocabulary, for forward, reverse and JSD at T = 1.5.
    #[test]
    fn gradient_matches_finite_differences() {
        type A = Autodiff<Cpu>;
        let student = vec![0.3f32, -1.2, 0.8, 0.0, 2.1, 1.0, 0.5, -0.5, 0.2, -2.0];
        let teacher = vec![1.1f32, 0.4, -0.3, 0.9, 0.0, -1.0, 2.0, 0.1, 0.7, 0.3];
        let mask = vec![1.0f32, 1.0];
        for beta in [0.0, 0.3, 1.0] {
            let loss_at = |s: Vec<f32>| {
                let m = Tensor::<Cpu, 2>::from_data(TensorData::new(mask.clone(), [1, 2]), &Default::default());
                scalar(divergence(logits::<Cpu>(s, [1, 2, 5]), logits::<Cpu>(teacher.clone(), [1, 2, 5]), m, beta, 1.5))
            };
            let s = logits::<A>(student.clone(), [1, 2, 5]).require_grad();
            let m = Tensor::<A, 2>::from_data(TensorData::new(mask.clone(), [1, 2]), &Default::default());
            let grads = divergence(s.clone(), logits::<A>(teacher.clone(), [1, 2, 5]), m, beta, 1.5).backward();
            let g = s.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
            let h = 1e-2f32;
            for i in 0..student.len() {
                let (mut up, mut down) = (student.clone(), student.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (loss_at(up) - loss_at(down)) / (2.0 * h as f64);
                assert!((fd - g[i] as f64).abs() < 2e-4, "beta {beta}, logit {i}: autodiff {} vs finite difference {fd}", g[i]);
            }
        }
    }

    /// Chunking is exact: one position at a time gives the loss of the whole sequence, and
    /// the sums add up to the per-token losses computed directly.
    #[test]
    fn chunked_loss_equals_the_whole_sequence_loss() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
        let device = Default::default();
        let student = Model::<Autodiff<Cpu>>::load(&fixtures.join("llama"), &device).unwrap();
        // Same architecture and tokenizer, other weights: the PEFT fixture's merged model.
        let teacher = Model::<Cpu>::load(&fixtures.join("llama-lora-merged"), &device).unwrap();
        let vocab = teacher.config.vocab_size;
        let examples = vec![
            crate::data::Example { ids: vec![1, 17, 42, 9, 5, 8], train_mask: vec![false, false, false, true, true, true], line: 1 },
            crate::data::Example { ids: vec![3, 4, 21, 22], train_mask: vec![false, true, true, true], line: 2 },
        ];
        let batch = rows_in_order(&examples);
        let mut values = Vec::new();
        for chunk_size in [1, 2, 64] {
            let cfg = DistillSection { beta: 0.3, temperature: 1.7, ce_weight: 0.25, chunk_size, ..DistillSection::default() };
            let d = Distill::new(&cfg, teacher.clone(), vocab, Vec::new(), &[], 2, 0);
            let (loss, sums) = d.loss(&student, &batch, batch.tokens, false);
            values.push((scalar(loss), sums.kd, sums.ce));
        }
        for v in &values[1..] {
            assert!((v.0 - values[0].0).abs() < 1e-6 && (v.1 - values[0].1).abs() < 1e-5 && (v.2 - values[0].2).abs() < 1e-5, "{values:?}");
        }
        // The same numbers from the whole logits at once.
        let hidden = batch_hidden(&student, &batch, &device);
        let s_logits = student.lm_head(hidden).inner();
        let t_logits = teacher.lm_head(batch_hidden(&teacher, &batch, &device));
        let mask = mask_tensor::<Cpu>(&batch, 0, batch.seq, &device);
        let kd = scalar(divergence_sum(s_logits.clone(), t_logits, mask.clone(), 0.3, 1.7));
        let ce = -scalar((pick_targets(log_softmax(s_logits, 2), &batch, 0) * mask).sum());
        let (loss, kd_sum, ce_sum) = values[0];
        assert!((kd - kd_sum).abs() < 1e-5 && (ce - ce_sum).abs() < 1e-5, "kd {kd} vs {kd_sum}, ce {ce} vs {ce_sum}");
        let want = (0.75 * kd + 0.25 * ce) / batch.tokens as f64;
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        assert!(kd > 1e-4, "teacher and student should differ");
    }
}
