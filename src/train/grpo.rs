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

use burn::prelude::*;
use serde::{Deserialize, Serialize};

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
