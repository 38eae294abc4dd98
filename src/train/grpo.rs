//! The GRPO objective as TRL's `GRPOTrainer` defines it (`trl/trainer/grpo_trainer.py`).
//!
//! For G completions of one prompt with rewards r₁..r_G:
//!
//! - advantage `Aᵢ = rᵢ − mean(r)`, divided by `std(r) + 1e-4` with `scale = group` (std of the
//!   group, unbiased as torch's default), by the batch's std with `batch`, not at all with
//!   `none`. Null rewards (a failed reward command) are left out of the statistics and get no
//!   advantage (their tokens are masked out by the trainer).
//! - per token t: `ratio = exp(logp − logp_old)`,
//!   `loss_t = −min(ratio·A, clamp(ratio, 1 − ε_low, 1 + ε_high)·A)`,
//!   plus `β·(exp(ref − logp) − (ref − logp) − 1)` (the k3 estimate of KL to the reference).
//! - aggregated by `loss_type` over the completion tokens (mask):
//!   `grpo`: mean over each sequence's tokens, then over sequences;
//!   `bnpo`: sum over all tokens / number of tokens;
//!   `dr_grpo`: sum / (sequences × max_completion_length);
//!   `dapo`: sum / completion tokens in the whole accumulated batch.

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::checkpoint::LoopState;
use super::rollout::{rollout_group, rollout_rows, token_logprobs, Completion};
use super::{add_grads, StepGrads};
use crate::backend::{QuantMatmul, TrainBackend};
use crate::data::{rows_in_order, PromptAnswer};
use crate::generate::{Sampler, SamplingConfig, StopConfig};
use crate::lora;
use crate::model::Model;
use crate::recipe::GrpoSection;
use crate::reward::{RewardError, Rewards, Sample};
use crate::run::{Event, GrpoStats, RewardStat};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    #[default]
    Group,
    Batch,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Grpo,
    Bnpo,
    DrGrpo,
    #[default]
    Dapo,
}

/// Mean and unbiased standard deviation of the values present (NaN std for fewer than two,
/// as torch gives).
fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count() as f64;
    let mean = values.clone().sum::<f64>() / n;
    let var = values.map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Advantages of `rewards` laid out group after group (`group_size` each).
pub fn advantages(rewards: &[Option<f64>], group_size: usize, scale: ScaleRewards) -> Vec<Option<f64>> {
    let batch_std = mean_std(rewards.iter().flatten().copied()).1;
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size.max(1)) {
        let (mean, std) = mean_std(group.iter().flatten().copied());
        let divisor = match scale {
            ScaleRewards::Group => std + 1e-4,
            ScaleRewards::Batch => batch_std + 1e-4,
            ScaleRewards::None => 1.0,
        };
        // A group with a single present reward has no spread: its advantage is zero.
        let divisor = if divisor.is_finite() { divisor } else { 1.0 };
        out.extend(group.iter().map(|r| r.map(|r| if group.iter().flatten().count() > 1 { (r - mean) / divisor } else { 0.0 })));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
    pub loss_type: LossType,
    pub max_completion_length: usize,
}

/// The GRPO loss of a batch of completions. `logp`, `old_logp`, `ref_logp` and `mask` are
/// `[sequences, tokens]` (log-probabilities of the sampled tokens; mask 1 on completion tokens);
/// `advantages` `[sequences]`; `tokens_in_batch` the completion tokens of the whole accumulated
/// batch (for `dapo`).
pub fn loss<B: Backend>(
    logp: Tensor<B, 2>,
    old_logp: Tensor<B, 2>,
    ref_logp: Option<Tensor<B, 2>>,
    advantages: Tensor<B, 1>,
    mask: Tensor<B, 2>,
    cfg: &LossConfig,
    tokens_in_batch: f64,
) -> Tensor<B, 1> {
    let [sequences, _] = logp.dims();
    let a = advantages.unsqueeze_dim::<2>(1); // [s] -> [s, 1]
    let ratio = (logp.clone() - old_logp).exp();
    let clipped = ratio.clone().clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let mut per_token = (ratio * a.clone()).min_pair(clipped * a).neg();
    if let (true, Some(reference)) = (cfg.beta > 0.0, ref_logp) {
        let d = reference - logp;
        let kl = d.clone().exp() - d - 1.0;
        per_token = per_token + kl.mul_scalar(cfg.beta);
    }
    let masked = per_token * mask.clone();
    match cfg.loss_type {
        LossType::Grpo => (masked.sum_dim(1) / mask.sum_dim(1).clamp_min(1.0)).mean().reshape([1]),
        LossType::Bnpo => masked.sum() / mask.sum().clamp_min(1.0),
        LossType::DrGrpo => masked.sum().div_scalar((sequences * cfg.max_completion_length) as f64),
        LossType::Dapo => masked.sum().div_scalar(tokens_in_batch.max(1.0)),
    }
}

/// Completions of one prompt with their scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Index into the training prompts.
    pub prompt: usize,
    pub completions: Vec<Completion>,
    pub rewards: Vec<Option<f64>>,
    /// `[completion][reward function]`.
    pub per_scorer: Vec<Vec<Option<f64>>>,
    pub advantages: Vec<Option<f64>>,
    /// `log p_old` of each completion's tokens, kept when `num_iterations` > 1 (with one
    /// iteration the policy is its own old policy).
    pub old_logp: Option<Vec<Vec<f32>>>,
}

/// The rollouts of a step, reused by the next `num_iterations − 1` steps (and saved with a
/// checkpoint, so that a resumed run reuses them too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollouts {
    /// The step that sampled them.
    pub step: usize,
    pub groups: Vec<Group>,
}

/// GRPO's part of a run: prompts, reward functions, sampling and the loss settings.
pub struct Grpo<I: QuantMatmul> {
    cfg: GrpoSection,
    loss_cfg: LossConfig,
    rewards: Rewards,
    prompts: Vec<PromptAnswer>,
    prompt_texts: Vec<String>,
    stop: StopConfig,
    /// The starting weights, frozen, when every weight trains; with LoRA the reference is the
    /// policy with its adapters off.
    frozen: Option<Model<I>>,
    batch_size: usize,
    grad_accum: usize,
    seed: u64,
}

impl<I: QuantMatmul> Grpo<I> {
    pub fn new(
        cfg: &GrpoSection,
        prompts: Vec<PromptAnswer>,
        tokenizer: &Tokenizer,
        eos_ids: &[u32],
        frozen: Option<Model<I>>,
        train: &crate::recipe::TrainSection,
        seed: u64,
    ) -> Result<Self, RewardError> {
        // As exact-match evaluation shows them: special tokens kept, so a reward command sees the
        // prompt the model saw.
        let prompt_texts = prompts.iter().map(|p| tokenizer.decode(&p.prompt_ids, false).unwrap_or_default()).collect();
        Ok(Self {
            loss_cfg: LossConfig {
                epsilon_low: cfg.epsilon,
                epsilon_high: cfg.epsilon_high.unwrap_or(cfg.epsilon),
                beta: cfg.beta,
                loss_type: cfg.loss_type,
                max_completion_length: cfg.max_completion_length,
            },
            rewards: Rewards::new(&cfg.rewards)?,
            cfg: cfg.clone(),
            prompts,
            prompt_texts,
            stop: StopConfig { max_new_tokens: cfg.max_completion_length, eos_ids: eos_ids.to_vec() },
            frozen,
            batch_size: train.batch_size,
            grad_accum: train.grad_accum,
            seed,
        })
    }

    /// Micro-batches of prompts in one pass over the data.
    pub fn batches_per_epoch(&self) -> usize {
        self.prompts.len().div_ceil(self.batch_size).max(1)
    }

    /// The prompts of the micro-batch at `cursor`: epoch `e` visits them in an order shuffled
    /// by `seed + e`, so a resumed run meets the same ones.
    fn micro_batch(&self, cursor: usize) -> Vec<usize> {
        let per_epoch = self.batches_per_epoch();
        let mut order: Vec<usize> = (0..self.prompts.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(self.seed.wrapping_add((cursor / per_epoch) as u64)));
        let start = (cursor % per_epoch) * self.batch_size;
        order[start.min(order.len())..(start + self.batch_size).min(order.len())].to_vec()
    }

    /// Samples and scores `group_size` completions for each prompt of the step's micro-batches.
    fn sample(&mut self, policy: &Model<I>, state: &mut LoopState, tokenizer: &Tokenizer, warn: &mut dyn FnMut(String)) -> Rollouts {
        let sampling = SamplingConfig {
            temperature: self.cfg.temperature as f32,
            top_k: self.cfg.top_k,
            top_p: self.cfg.top_p as f32,
            seed: self.seed.wrapping_add(state.step as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
        };
        let mut sampler = Sampler::new(sampling);
        let mut groups = Vec::new();
        for _ in 0..self.grad_accum {
            for prompt in self.micro_batch(state.cursor) {
                let p = &self.prompts[prompt];
                let completions = rollout_group(policy, &p.prompt_ids, self.cfg.group_size, &mut sampler, &self.stop);
                let (mut rewards, mut per_scorer) = (Vec::new(), Vec::new());
                for c in &completions {
                    let text = tokenizer.decode(&c.ids, true).unwrap_or_default();
                    let sample = Sample { prompt: &self.prompt_texts[prompt], completion: &text, answer: Some(&p.answer), tokens: c.tokens().len() };
                    let scored = self.rewards.score(&sample, warn);
                    rewards.push(scored.total);
                    per_scorer.push(scored.per_scorer);
                }
                groups.push(Group { prompt, completions, rewards, per_scorer, advantages: Vec::new(), old_logp: None });
            }
            state.cursor += 1;
        }
        let flat: Vec<Option<f64>> = groups.iter().flat_map(|g| g.rewards.iter().copied()).collect();
        let mut adv = advantages(&flat, self.cfg.group_size, self.cfg.scale_rewards).into_iter();
        for g in &mut groups {
            g.advantages = adv.by_ref().take(g.completions.len()).collect();
            if self.cfg.num_iterations > 1 {
                let batch = rows_in_order(&rollout_rows(&self.prompts[g.prompt].prompt_ids, &g.completions));
                let (logp, _) = token_logprobs(policy, &batch);
                let values = host(logp);
                let start = self.prompts[g.prompt].prompt_ids.len() - 1;
                g.old_logp = Some(g.completions.iter().enumerate().map(|(r, c)| values[r * batch.seq + start..][..c.tokens().len()].to_vec()).collect());
            }
        }
        Rollouts { step: state.step, groups }
    }

    /// One optimiser step's gradients: new rollouts every `num_iterations` steps, then the
    /// clipped objective over them, micro-batch by micro-batch.
    pub fn step<B: TrainBackend<InnerBackend = I>>(
        &mut self,
        model: &Model<B>,
        state: &mut LoopState,
        tokenizer: &Tokenizer,
        warn: &mut dyn FnMut(String),
    ) -> (StepGrads, GrpoStats) {
        let policy = model.valid();
        let fresh = state.rollouts.as_ref().is_none_or(|r| state.step >= r.step + self.cfg.num_iterations);
        if fresh {
            state.rollouts = Some(self.sample(&policy, state, tokenizer, warn));
        }
        let Some(rollouts) = state.rollouts.clone() else { return (StepGrads::default(), GrpoStats::default()) };
        let reference = match &self.frozen {
            Some(m) => m.clone(),
            None => lora::without_adapters(policy),
        };
        let device = model.embed_tokens.device();
        // dapo divides by the completion tokens of the whole step; the others average over
        // micro-batches, as TRL does with gradient accumulation.
        let tokens_in_batch: usize = rollouts.groups.iter().flat_map(|g| g.completions.iter().zip(&g.advantages)).filter(|(_, a)| a.is_some()).map(|(c, _)| c.tokens().len()).sum();
        let per_micro = if self.loss_cfg.loss_type == LossType::Dapo { 1.0 } else { 1.0 / self.grad_accum as f64 };

        let mut out = StepGrads::default();
        let mut m = Measure::default();
        for micro in rollouts.groups.chunks(self.batch_size.max(1)) {
            let mut rows = Vec::new();
            let (mut adv, mut old, mut row_ok) = (Vec::new(), Vec::new(), Vec::new());
            for g in micro {
                let prompt = &self.prompts[g.prompt].prompt_ids;
                rows.extend(rollout_rows(prompt, &g.completions));
                for (i, c) in g.completions.iter().enumerate() {
                    adv.push(g.advantages[i].unwrap_or(0.0) as f32);
                    row_ok.push(g.advantages[i].is_some());
                    old.push((prompt.len() - 1, g.old_logp.as_ref().map(|o| o[i].clone()), c.tokens().len()));
                }
            }
            let batch = rows_in_order(&rows);
            let (b, s) = (batch.batch, batch.seq);
            // Completions with a null reward teach nothing: their tokens leave the mask.
            let mut mask_v = batch.loss_mask.clone();
            for (r, ok) in row_ok.iter().enumerate() {
                if !ok {
                    mask_v[r * s..(r + 1) * s].fill(0.0);
                }
            }
            let mask = Tensor::<B, 2>::from_data(TensorData::new(mask_v.clone(), [b, s]), &device);
            let (logp, entropy) = token_logprobs(model, &batch);
            let (ref_logp, _) = token_logprobs(&reference, &batch);
            let old_logp = match old.iter().all(|(_, o, _)| o.is_some()) {
                true => {
                    let mut v = vec![0.0f32; b * s];
                    for (r, (start, o, n)) in old.iter().enumerate() {
                        if let Some(o) = o {
                            v[r * s + start..][..*n].copy_from_slice(&o[..*n]);
                        }
                    }
                    Tensor::from_data(TensorData::new(v, [b, s]), &device)
                }
                false => logp.clone().detach(),
            };
            let advantages = Tensor::<B, 1>::from_data(TensorData::new(adv.clone(), [b]), &device);
            let ref_logp = Tensor::<B, 2>::from_inner(ref_logp);
            let loss = loss(logp.clone(), old_logp.clone(), Some(ref_logp.clone()), advantages, mask, &self.loss_cfg, tokens_in_batch as f64).mul_scalar(per_micro);
            out.loss += loss.clone().into_scalar().elem::<f64>();
            out.tokens += b * s;
            add_grads(model, &mut out.grads, GradientsParams::from_grads(loss.backward(), model));
            m.add(&host(logp), &host(old_logp), &host(ref_logp), &host(entropy), &mask_v, &adv, s, &self.loss_cfg);
        }
        let stats = self.stats(&rollouts, &m, state.step, out.loss);
        (out, stats)
    }

    fn stats(&self, rollouts: &Rollouts, m: &Measure, step: usize, loss: f64) -> GrpoStats {
        let groups = &rollouts.groups;
        let all: Vec<f64> = groups.iter().flat_map(|g| g.rewards.iter().flatten().copied()).collect();
        let group_stds: Vec<f64> = groups.iter().map(|g| mean_std(g.rewards.iter().flatten().copied()).1).filter(|s| s.is_finite()).collect();
        // A group with fewer than two rewards present has a NaN std: no spread either way.
        let zero_std = groups.iter().filter(|g| !(mean_std(g.rewards.iter().flatten().copied()).1 > 0.0)).count();
        let rewards = self
            .rewards
            .names()
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let values = groups.iter().flat_map(|g| g.per_scorer.iter().filter_map(move |s| s[i]));
                let (mean, std) = mean_std(values);
                RewardStat { name, mean, std }
            })
            .collect();
        let lens: Vec<usize> = groups.iter().flat_map(|g| g.completions.iter().map(|c| c.tokens().len())).collect();
        let n = lens.len().max(1) as f64;
        let tokens = m.tokens.max(1.0);
        GrpoStats {
            step,
            loss,
            reward_mean: mean_std(all.iter().copied()).0,
            reward_std: group_stds.iter().sum::<f64>() / group_stds.len() as f64,
            rewards,
            null_rewards: groups.iter().flat_map(|g| &g.rewards).filter(|r| r.is_none()).count(),
            zero_std_frac: zero_std as f64 / groups.len().max(1) as f64,
            kl: m.kl / tokens,
            clip_ratio: (m.clip_low + m.clip_high) / tokens,
            clip_low: m.clip_low / tokens,
            clip_high: m.clip_high / tokens,
            completion_len_mean: lens.iter().sum::<usize>() as f64 / n,
            completion_len_min: lens.iter().copied().min().unwrap_or(0),
            completion_len_max: lens.iter().copied().max().unwrap_or(0),
            truncated_frac: groups.iter().flat_map(|g| &g.completions).filter(|c| c.truncated).count() as f64 / n,
            entropy: m.entropy / tokens,
        }
    }

    /// The first `log_completions` rollouts of the step, as `sample` events.
    pub fn samples(&self, rollouts: &Rollouts, tokenizer: &Tokenizer, step: usize) -> Vec<Event> {
        rollouts
            .groups
            .iter()
            .flat_map(|g| g.completions.iter().zip(&g.rewards).map(move |(c, r)| (g.prompt, c, *r)))
            .take(self.cfg.log_completions)
            .map(|(p, c, reward)| Event::Sample {
                step,
                prompt: self.prompt_texts[p].clone(),
                completion: tokenizer.decode(&c.ids, true).unwrap_or_default(),
                expected: Some(self.prompts[p].answer.clone()),
                reward,
            })
            .collect()
    }
}

/// Token-level sums over a step's masked completion tokens, for the metrics.
#[derive(Default)]
struct Measure {
    tokens: f64,
    kl: f64,
    clip_low: f64,
    clip_high: f64,
    entropy: f64,
}

impl Measure {
    #[allow(clippy::too_many_arguments)]
    fn add(&mut self, logp: &[f32], old: &[f32], reference: &[f32], entropy: &[f32], mask: &[f32], adv: &[f32], seq: usize, cfg: &LossConfig) {
        for (i, &w) in mask.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let a = adv[i / seq];
            let ratio = ((logp[i] - old[i]) as f64).exp();
            let d = (reference[i] - logp[i]) as f64;
            self.tokens += 1.0;
            self.kl += d.exp() - d - 1.0;
            self.entropy += entropy[i] as f64;
            self.clip_low += f64::from(u8::from(ratio < 1.0 - cfg.epsilon_low && a < 0.0));
            self.clip_high += f64::from(u8::from(ratio > 1.0 + cfg.epsilon_high && a > 0.0));
        }
    }
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::tensor::TensorData;

    fn t2(v: Vec<f32>, s: [usize; 2]) -> Tensor<Cpu, 2> {
        Tensor::from_data(TensorData::new(v, s), &Default::default())
    }

    fn value(t: Tensor<Cpu, 1>) -> f64 {
        t.into_data().to_vec::<f32>().unwrap()[0] as f64
    }

    /// Two sequences, ε = 0.2. Sequence 0 (A = 1, two tokens): ratios 1 and 1.5 → token losses
    /// −1 and −1.2 (clipped at 1.2). Sequence 1 (A = −0.5, three tokens): ratios 0.5, 1, 1.3 →
    /// −min(−0.25, −0.4) = 0.4, 0.5, −min(−0.65, −0.6) = 0.65. Sum −0.65 over 5 tokens.
    fn example(beta: f64, loss_type: LossType, with_ref: bool) -> f64 {
        let old = vec![-1.0f32, -2.0, -3.0, -1.0, -2.0, -3.0];
        let ratios = [1.0f32, 1.5, 7.0, 0.5, 1.0, 1.3]; // the third token of row 0 is padding
        let logp: Vec<f32> = old.iter().zip(ratios).map(|(o, r)| o + r.ln()).collect();
        // ref − logp = ln 2 everywhere: k3 = 2 − ln 2 − 1.
        let reference: Vec<f32> = logp.iter().map(|l| l + 2f32.ln()).collect();
        let cfg = LossConfig { epsilon_low: 0.2, epsilon_high: 0.2, beta, loss_type, max_completion_length: 3 };
        let adv = Tensor::<Cpu, 1>::from_data(TensorData::new(vec![1.0f32, -0.5], [2]), &Default::default());
        let mask = t2(vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0], [2, 3]);
        value(loss(t2(logp, [2, 3]), t2(old, [2, 3]), with_ref.then(|| t2(reference, [2, 3])), adv, mask, &cfg, 10.0))
    }

    #[test]
    fn every_loss_type_against_hand_computed_values() {
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        close(example(0.0, LossType::Grpo, false), (-1.1 + 1.55 / 3.0) / 2.0);
        close(example(0.0, LossType::Bnpo, false), -0.65 / 5.0);
        close(example(0.0, LossType::DrGrpo, false), -0.65 / 6.0);
        close(example(0.0, LossType::Dapo, false), -0.65 / 10.0);
        // β > 0 adds β·k3 on every completion token; k3 = 2 − ln 2 − 1 = 0.306853.
        let k3 = 1.0 - 2f64.ln();
        close(example(0.1, LossType::Grpo, true), (-1.1 + 1.55 / 3.0) / 2.0 + 0.1 * k3);
        close(example(0.1, LossType::Bnpo, true), (-0.65 + 5.0 * 0.1 * k3) / 5.0);
        close(example(0.1, LossType::DrGrpo, true), (-0.65 + 5.0 * 0.1 * k3) / 6.0);
        close(example(0.1, LossType::Dapo, true), (-0.65 + 5.0 * 0.1 * k3) / 10.0);
        // β = 0 ignores the reference.
        close(example(0.0, LossType::Bnpo, true), -0.65 / 5.0);
    }

    #[test]
    fn advantages_by_scaling() {
        // Group [1, 2, 3]: mean 2, unbiased std 1; group [0, 0, 4]: mean 4/3, std 2.3094.
        let r = [Some(1.0), Some(2.0), Some(3.0), Some(0.0), Some(0.0), Some(4.0)];
        let a = advantages(&r, 3, ScaleRewards::None);
        let want = [-1.0, 0.0, 1.0, -4.0 / 3.0, -4.0 / 3.0, 8.0 / 3.0];
        for (x, w) in a.iter().zip(want) {
            assert!((x.unwrap() - w).abs() < 1e-12);
        }
        let a = advantages(&r, 3, ScaleRewards::Group);
        assert!((a[0].unwrap() - (-1.0 / (1.0 + 1e-4))).abs() < 1e-12);
        let std2 = (32.0f64 / 3.0 / 2.0).sqrt();
        assert!((a[5].unwrap() - (8.0 / 3.0) / (std2 + 1e-4)).abs() < 1e-12);
        // Batch std of all six: mean 5/3, unbiased variance 14/5... computed directly.
        let all = [1.0, 2.0, 3.0, 0.0, 0.0, 4.0];
        let m = all.iter().sum::<f64>() / 6.0;
        let s = (all.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 5.0).sqrt();
        let a = advantages(&r, 3, ScaleRewards::Batch);
        assert!((a[0].unwrap() - (-1.0 / (s + 1e-4))).abs() < 1e-12);
        // Null rewards are left out: group [1, None, 3] has mean 2 and std √2.
        let a = advantages(&[Some(1.0), None, Some(3.0)], 3, ScaleRewards::Group);
        assert_eq!(a[1], None);
        assert!((a[2].unwrap() - 1.0 / (2f64.sqrt() + 1e-4)).abs() < 1e-12);
        // Identical rewards: zero advantage, not a division by zero.
        let a = advantages(&[Some(1.0), Some(1.0)], 2, ScaleRewards::Group);
        assert_eq!(a, vec![Some(0.0), Some(0.0)]);
    }
}
