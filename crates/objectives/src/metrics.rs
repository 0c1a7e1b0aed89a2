//! Metrics shared by the preference objectives, with TRL's names.
//!
//! - `rewards/chosen`, `rewards/rejected`: batch means of the objective's implicit reward
//!   (DPO: `beta * (S - S_ref)`; SimPO/CPO: `beta * A` or `beta * S`; SLIME: `A`).
//! - `rewards/margins`: mean of chosen minus rejected reward; `rewards/accuracies`: fraction
//!   of pairs whose chosen reward is strictly larger.
//! - `logps/chosen`, `logps/rejected`: batch means of the **summed** completion log-probs
//!   (TRL's convention); `logps/chosen_per_token`, `logps/rejected_per_token`: batch means of
//!   the length-normalised `A(y)`.
//! - `collapse/rejected_fraction`: fraction of all rejected completion tokens with
//!   `l_t < -delta` (needs per-token log-probs; absent otherwise).

use candle_core::Tensor;

use crate::Result;
use crate::logps::{ObjectiveInputs, SequenceLogps};
use crate::output::Metrics;

/// Records the reward metrics from `[batch]` chosen and rejected rewards (detached).
pub(crate) fn record_rewards(metrics: &mut Metrics, chosen: &Tensor, rejected: &Tensor) -> Result<()> {
    let (chosen, rejected) = (chosen.detach(), rejected.detach());
    metrics.insert_mean("rewards/chosen", &chosen)?;
    metrics.insert_mean("rewards/rejected", &rejected)?;
    let margins = (&chosen - &rejected)?;
    metrics.insert_mean("rewards/margins", &margins)?;
    metrics.insert_mean("rewards/accuracies", &chosen.gt(&rejected)?)?;
    Ok(())
}

/// Records `logps/*` for both sides and, where per-token values exist, the collapse fraction.
pub(crate) fn record_logps(metrics: &mut Metrics, inputs: &ObjectiveInputs, rejected: &SequenceLogps) -> Result<()> {
    record_side(metrics, "chosen", &inputs.chosen)?;
    record_side(metrics, "rejected", rejected)?;
    if let Some(tokens) = rejected.tokens() {
        metrics.insert("collapse/rejected_fraction", tokens.fraction_below(inputs.collapse_delta)?);
    }
    Ok(())
}

/// Records `logps/{side}` (mean of sums) and `logps/{side}_per_token` (mean of means).
pub(crate) fn record_side(metrics: &mut Metrics, side: &str, logps: &SequenceLogps) -> Result<()> {
    metrics.insert_mean(format!("logps/{side}"), logps.sum())?;
    let per_token = logps.sum().detach().div(&logps.count().detach().clamp(1.0, f64::INFINITY)?)?;
    metrics.insert_mean(format!("logps/{side}_per_token"), &per_token)?;
    Ok(())
}
