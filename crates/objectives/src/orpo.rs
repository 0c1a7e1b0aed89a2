//! ORPO: Monolithic Preference Optimization without Reference Model (Hong et al. 2024,
//! arXiv 2403.07691).
//!
//! ```text
//! log_odds = (A_w - A_l) - (log1mexp(A_w) - log1mexp(A_l))     log1mexp(a) = log(1 - e^a)
//! loss     = NLL(y_w) - beta * logsig(log_odds)
//! ```
//!
//! `NLL` is the token mean pooled over the batch (as TRL). `log1mexp` is evaluated in the
//! stable two-branch form and its argument clamped below 0 (see [`crate::numerics::log1mexp`]).

use serde::{Deserialize, Serialize};

use crate::metrics::{NLL_LOSS, record_logps, record_rewards, with_preference};
use crate::numerics::{log_sigmoid_t, log1mexp_t};
use crate::objective::{Aggregation, Loss, ObjectiveKind, Requirements, check};
use crate::output::{LossOutput, Metrics};
use crate::{ObjectiveInputs, Result};

/// ORPO hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrpoParams {
    /// Weight `beta >= 0` of the odds-ratio term (the paper's lambda; default 0.1).
    pub beta: f64,
}

impl Default for OrpoParams {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

const NAME: &str = "orpo";
/// `logsig(log_odds)`, the odds-ratio term (TRL's name).
const LOG_ODDS_RATIO: &str = "log_odds_ratio";
/// `log_odds` itself (TRL's name).
const LOG_ODDS_CHOSEN: &str = "log_odds_chosen";

impl ObjectiveKind for OrpoParams {
    const NAME: &'static str = NAME;
    const LOSS_TERMS: &'static [&'static str] = &[NLL_LOSS, LOG_ODDS_RATIO];
    const METRICS: &'static [&'static str] = &with_preference::<10>(&[LOG_ODDS_CHOSEN]);
}

impl Loss for OrpoParams {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self) -> Result<()> {
        check(self.beta >= 0.0, NAME, "beta", self.beta, "a finite value >= 0")
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            reference: false,
            rejected: true,
            chosen_tokens: false,
            rejected_tokens: false,
            aggregation: Aggregation::Mean,
        }
    }

    fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput> {
        self.validate()?;
        let scale = inputs.scale()?;
        let rejected = inputs.require_rejected(NAME)?;
        let chosen_mean = inputs.chosen.mean("chosen")?;
        let rejected_mean = rejected.mean("rejected")?;
        let log_odds = ((&chosen_mean - &rejected_mean)? - (log1mexp_t(&chosen_mean)? - log1mexp_t(&rejected_mean)?)?)?;
        let ratio = log_sigmoid_t(&log_odds)?;
        let nll = inputs.chosen.pooled_mean_per_example("chosen", scale.pairs, scale.chosen_tokens)?.neg()?;
        let per_example = (&nll - ratio.affine(self.beta, 0.0)?)?;
        let mut metrics = Metrics::new();
        metrics.insert_mean(NLL_LOSS, &nll)?;
        metrics.insert_mean(LOG_ODDS_RATIO, &ratio)?;
        metrics.insert_mean(LOG_ODDS_CHOSEN, &log_odds)?;
        record_rewards(&mut metrics, &chosen_mean.affine(self.beta, 0.0)?, &rejected_mean.affine(self.beta, 0.0)?)?;
        record_logps(&mut metrics, inputs, rejected)?;
        LossOutput::from_per_example(per_example, scale.pairs, metrics)
    }
}
