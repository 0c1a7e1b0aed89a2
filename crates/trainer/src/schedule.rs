//! Learning-rate schedules with linear warmup (the shapes of Hugging Face's
//! `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup`).

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decay {
    /// Constant after warmup (Hugging Face's `constant_with_warmup`, accepted as a name).
    #[serde(alias = "constant_with_warmup")]
    Constant,
    /// Linear to 0 at the last step (the SLIME paper's preference stage).
    #[default]
    Linear,
    /// Half-cosine to 0 at the last step.
    Cosine,
}

/// A learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Schedule {
    /// Peak learning rate (default 1e-5); TRL's `learning_rate`.
    #[serde(alias = "learning_rate")]
    pub lr: f64,
    /// Decay shape after warmup (default `linear`); TRL's `lr_scheduler_type`.
    #[serde(alias = "lr_scheduler_type")]
    pub decay: Decay,
    /// Warmup as a fraction of the total steps, in [0, 1) (default 0.0).
    pub warmup_ratio: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self { lr: 1e-5, decay: Decay::Linear, warmup_ratio: 0.0 }
    }
}

impl Schedule {
    /// Rejects invalid values.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(TrainError::Config(format!("schedule.lr must be > 0, got {}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(TrainError::Config(format!(
                "schedule.warmup_ratio must be in [0, 1), got {}",
                self.warmup_ratio
            )));
        }
        Ok(())
    }

    /// Learning rate for the optimiser step `step` (0-based) of `total` steps: linear warmup from
    /// `lr / warmup` over `ceil(warmup_ratio * total)` steps, then the decay, reaching 0 after the
    /// last step (Hugging Face's convention: the multiplier is evaluated at the step index).
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let warmup = (self.warmup_ratio * total as f64).ceil() as u64;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        self.lr
            * match self.decay {
                Decay::Constant => 1.0,
                Decay::Linear => 1.0 - progress,
                Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_decay_from_peak() {
        let s = Schedule { lr: 1e-3, decay: Decay::Linear, warmup_ratio: 0.0 };
        // 10 steps: step 0 at the peak, step 5 at half, step 9 at a tenth.
        assert_eq!(s.lr_at(0, 10), 1e-3);
        assert!((s.lr_at(5, 10) - 5e-4).abs() < 1e-18);
        assert!((s.lr_at(9, 10) - 1e-4).abs() < 1e-18);
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule { lr: 1.0, decay: Decay::Cosine, warmup_ratio: 0.2 };
        // 10 steps, warmup 2: 0.5, 1.0, then cos from 1 down: step 6 is half-way (4 of 8).
        assert_eq!(s.lr_at(0, 10), 0.5);
        assert_eq!(s.lr_at(1, 10), 1.0);
        assert_eq!(s.lr_at(2, 10), 1.0);
        assert!((s.lr_at(6, 10) - 0.5).abs() < 1e-12);
        let constant = Schedule { decay: Decay::Constant, ..s };
        assert_eq!(constant.lr_at(9, 10), 1.0);
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(Schedule { lr: 0.0, ..Schedule::default() }.validate().is_err());
        assert!(Schedule { warmup_ratio: 1.0, ..Schedule::default() }.validate().is_err());
    }
}
