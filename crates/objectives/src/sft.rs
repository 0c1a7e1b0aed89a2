//! Supervised fine-tuning objectives: NLL and the probability-based family of "Beyond Log
//! Likelihood" (arXiv 2510.00526).
//!
//! Per counted target token with `p = exp(l_t)`:
//!
//! ```text
//! f_alpha(p) = (1 - p^alpha) / alpha      alpha = 0: -log p (NLL);  alpha = 1: 1 - p
//! d f_alpha / d logit_target = -p^alpha (1 - p)
//! loss = sum_{kept t} f_alpha(p_t) / #kept            (pooled over the batch)
//! ```
//!
//! A token filter keeps only tokens with `p >= threshold` (`prob-at-least`) or
//! `p <= threshold` (`prob-at-most`); dropped tokens leave the denominator too. The filter
//! reads detached probabilities.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::metrics::{CHOSEN, LOGPS_CHOSEN, LOGPS_CHOSEN_PER_TOKEN, record_side};
use crate::objective::{Aggregation, Loss, ObjectiveKind, Requirements, check};
use crate::output::{LossOutput, Metrics};
use crate::{ObjectiveError, ObjectiveInputs, Result};

/// Which target tokens count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenFilter {
    /// Every completion token.
    #[default]
    None,
    /// Only tokens the model already gives probability `>= threshold`.
    ProbAtLeast,
    /// Only tokens with probability `<= threshold`.
    ProbAtMost,
}

/// SFT hyperparameters. The defaults are plain NLL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftParams {
    /// Exponent `alpha >= 0` of `f_alpha(p) = (1 - p^alpha) / alpha`; 0 is NLL, 1 is `1 - p`.
    pub alpha: f64,
    /// Token filter (default `none`).
    pub filter: TokenFilter,
    /// Absolute probability threshold `q` in `[0, 1]` for the filter (must be 0 with `none`).
    pub threshold: f64,
}

impl Default for SftParams {
    fn default() -> Self {
        Self { alpha: 0.0, filter: TokenFilter::None, threshold: 0.0 }
    }
}

impl SftParams {
    /// Plain NLL.
    pub fn nll() -> Self {
        Self::default()
    }

    /// The `1 - p` objective (`alpha = 1`).
    pub fn one_minus_p() -> Self {
        Self { alpha: 1.0, ..Self::default() }
    }

    fn is_plain_nll(&self) -> bool {
        self.alpha == 0.0 && self.filter == TokenFilter::None
    }
}

const NAME: &str = "sft";
/// Fraction of counted target tokens the filter keeps (1 without a filter).
const KEPT_FRACTION: &str = "sft/kept_fraction";

impl ObjectiveKind for SftParams {
    const NAME: &'static str = NAME;
    const LOSS_TERMS: &'static [&'static str] = &[];
    const METRICS: &'static [&'static str] = &[KEPT_FRACTION, LOGPS_CHOSEN, LOGPS_CHOSEN_PER_TOKEN];
}

impl Loss for SftParams {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self) -> Result<()> {
        check(self.alpha >= 0.0, NAME, "alpha", self.alpha, "a finite value >= 0")?;
        check((0.0..=1.0).contains(&self.threshold), NAME, "threshold", self.threshold, "a probability in [0, 1]")?;
        if self.filter == TokenFilter::None && self.threshold != 0.0 {
            return Err(ObjectiveError::InvalidCombination {
                objective: NAME,
                reason: "threshold is only used with filter = \"prob-at-least\" or \"prob-at-most\"".into(),
            });
        }
        Ok(())
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            reference: false,
            rejected: false,
            chosen_tokens: !self.is_plain_nll(),
            rejected_tokens: false,
            aggregation: Aggregation::PooledTokens,
        }
    }

    fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput> {
        self.validate()?;
        let scale = inputs.scale()?;
        let target = &inputs.chosen;
        let mut metrics = Metrics::new();
        let per_example = if self.is_plain_nll() {
            metrics.insert(KEPT_FRACTION, 1.0);
            target.pooled_mean_per_example("chosen", scale.pairs, scale.chosen_tokens)?.neg()?
        } else {
            let tokens = target
                .tokens()
                .ok_or(ObjectiveError::MissingInput { objective: NAME, input: "per-token target log-probs" })?;
            let l = tokens.logps();
            let log_q = self.threshold.ln();
            let keep = match self.filter {
                TokenFilter::None => tokens.mask().clone(),
                TokenFilter::ProbAtLeast => l.detach().ge(log_q)?.mul(tokens.mask())?,
                TokenFilter::ProbAtMost => l.detach().le(log_q)?.mul(tokens.mask())?,
            };
            let kept = keep.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            let total = tokens.total_count();
            metrics.insert(KEPT_FRACTION, if total > 0.0 { kept / total } else { 0.0 });
            let f = if self.alpha == 0.0 {
                l.neg()?
            } else {
                l.affine(self.alpha, 0.0)?.exp()?.affine(-1.0 / self.alpha, 1.0 / self.alpha)?
            };
            let f = keep.where_cond(&f, &f.zeros_like()?)?;
            // Pooled over the kept tokens, attributed per example: pairs * sum_t f / #kept. Without
            // a filter every counted token of the full batch is kept; with one, the kept count is
            // only known for this micro-batch (0 if nothing is kept).
            let weight = match self.filter {
                TokenFilter::None => scale.pairs / scale.chosen_tokens,
                _ if kept > 0.0 => scale.micro_pairs as f64 / kept,
                _ => 0.0,
            };
            f.sum(1)?.affine(weight, 0.0)?
        };
        record_side(&mut metrics, &CHOSEN, target)?;
        LossOutput::from_per_example(per_example, scale.pairs, metrics)
    }
}
