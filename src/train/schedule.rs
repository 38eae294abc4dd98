//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to
//! `min_lr_ratio · lr` at the last step.

use crate::recipe::Schedule;

#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub lr: f64,
    pub warmup: usize,
    pub total: usize,
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The learning rate of update `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let min = self.lr * self.min_ratio;
        match self.kind {
            Schedule::Constant => self.lr,
            Schedule::Linear => min + (self.lr - min) * (1.0 - progress),
            Schedule::Cosine => min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let s = LrSchedule { kind: Schedule::Cosine, lr: 1.0, warmup: 10, total: 110, min_ratio: 0.1 };
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(9) - 1.0).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(60) - 0.55).abs() < 1e-12);
        assert!((s.at(110) - 0.1).abs() < 1e-12);
        let l = LrSchedule { kind: Schedule::Linear, ..s };
        assert!((l.at(60) - 0.55).abs() < 1e-12);
        let c = LrSchedule { kind: Schedule::Constant, ..s };
        assert_eq!(c.at(100), 1.0);
    }
}
