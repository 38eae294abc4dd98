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

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

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
}
