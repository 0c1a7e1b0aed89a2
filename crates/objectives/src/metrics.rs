//! Metric keys, with TRL's names, and the recorders the preference objectives share.
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
//!
//! Each objective lists the keys it records ([`crate::ObjectiveKind`]); a training loop, its
//! evaluation and reports use these constants rather than spelling the keys again.

use candle_core::Tensor;

use crate::Result;
use crate::logps::{ObjectiveInputs, SequenceLogps};
use crate::output::Metrics;

/// The batch loss: mean of the per-example losses.
pub const LOSS: &str = "loss";
/// Mean implicit reward of the chosen completions.
pub const REWARDS_CHOSEN: &str = "rewards/chosen";
/// Mean implicit reward of the rejected completions.
pub const REWARDS_REJECTED: &str = "rewards/rejected";
/// Mean of chosen minus rejected reward.
pub const REWARDS_MARGINS: &str = "rewards/margins";
/// Fraction of pairs whose chosen reward is strictly larger.
pub const REWARDS_ACCURACIES: &str = "rewards/accuracies";
/// Mean summed log-prob of the chosen completions.
pub const LOGPS_CHOSEN: &str = "logps/chosen";
/// Mean summed log-prob of the rejected completions.
pub const LOGPS_REJECTED: &str = "logps/rejected";
/// Mean per-token log-prob `A(y)` of the chosen completions.
pub const LOGPS_CHOSEN_PER_TOKEN: &str = "logps/chosen_per_token";
/// Mean per-token log-prob `A(y)` of the rejected completions.
pub const LOGPS_REJECTED_PER_TOKEN: &str = "logps/rejected_per_token";
/// Fraction of rejected tokens with `l_t < -delta`.
pub const COLLAPSE_REJECTED_FRACTION: &str = "collapse/rejected_fraction";
/// The NLL term on the chosen completion (CPO, ORPO), TRL's name.
pub const NLL_LOSS: &str = "nll_loss";

/// What [`record_rewards`] and [`record_logps`] record: every preference objective's metrics.
pub const PREFERENCE: [&str; 9] = [
    REWARDS_CHOSEN,
    REWARDS_REJECTED,
    REWARDS_MARGINS,
    REWARDS_ACCURACIES,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOGPS_CHOSEN_PER_TOKEN,
    LOGPS_REJECTED_PER_TOKEN,
    COLLAPSE_REJECTED_FRACTION,
];

/// `own` keys followed by [`PREFERENCE`], as an array of `M = own.len() + 9` keys (a wrong `M`
/// stops the compilation).
pub(crate) const fn with_preference<const M: usize>(own: &[&'static str]) -> [&'static str; M] {
    assert!(own.len() + PREFERENCE.len() == M, "M must be own.len() + PREFERENCE.len()");
    let mut keys = [""; M];
    let mut i = 0;
    while i < M {
        keys[i] = if i < own.len() { own[i] } else { PREFERENCE[i - own.len()] };
        i += 1;
    }
    keys
}

/// Keys of a held-out evaluation of a model on preference pairs (computed by a training loop
/// from completion log-probs and greedy generations, not by an objective).
pub mod eval {
    /// Fraction of pairs whose mean chosen token log-prob is above the rejected one's.
    pub const PREFERENCE_ACCURACY: &str = "eval/preference_accuracy";
    /// Mean per-token chosen log-prob.
    pub const CHOSEN_LOGP: &str = "eval/chosen_logp";
    /// Mean per-token rejected log-prob.
    pub const REJECTED_LOGP: &str = "eval/rejected_logp";
    /// Chosen log-prob minus its value before preference training (negative: unlearning).
    pub const CHOSEN_LOGP_DRIFT: &str = "eval/chosen_logp_drift";
    /// Fraction of rejected tokens with `l_t < -delta`.
    pub const COLLAPSE_FRACTION: &str = "eval/collapse_fraction";
    /// Fraction of greedy generations that are well formed.
    pub const FORMAT_VALIDITY: &str = "eval/format_validity";
    /// Fraction of greedy generations that answer the embedded task correctly.
    pub const TASK_ACCURACY: &str = "eval/task_accuracy";
    /// Mean repetition score of greedy generations (Parquet data).
    pub const REPETITION: &str = "eval/repetition";
    /// Every evaluation key.
    pub const ALL: [&str; 8] = [
        PREFERENCE_ACCURACY,
        CHOSEN_LOGP,
        REJECTED_LOGP,
        CHOSEN_LOGP_DRIFT,
        COLLAPSE_FRACTION,
        FORMAT_VALIDITY,
        TASK_ACCURACY,
        REPETITION,
    ];
}

/// `logps/{side}` and `logps/{side}_per_token` of one side.
pub(crate) struct SideKeys {
    sum: &'static str,
    per_token: &'static str,
}

/// The chosen side's log-prob keys.
pub(crate) const CHOSEN: SideKeys = SideKeys { sum: LOGPS_CHOSEN, per_token: LOGPS_CHOSEN_PER_TOKEN };
/// The rejected side's log-prob keys.
const REJECTED: SideKeys = SideKeys { sum: LOGPS_REJECTED, per_token: LOGPS_REJECTED_PER_TOKEN };

/// Records the reward metrics from `[batch]` chosen and rejected rewards (detached).
pub(crate) fn record_rewards(metrics: &mut Metrics, chosen: &Tensor, rejected: &Tensor) -> Result<()> {
    let (chosen, rejected) = (chosen.detach(), rejected.detach());
    metrics.insert_mean(REWARDS_CHOSEN, &chosen)?;
    metrics.insert_mean(REWARDS_REJECTED, &rejected)?;
    let margins = (&chosen - &rejected)?;
    metrics.insert_mean(REWARDS_MARGINS, &margins)?;
    metrics.insert_mean(REWARDS_ACCURACIES, &chosen.gt(&rejected)?)?;
    Ok(())
}

/// Records `logps/*` for both sides and, where per-token values exist, the collapse fraction.
pub(crate) fn record_logps(metrics: &mut Metrics, inputs: &ObjectiveInputs, rejected: &SequenceLogps) -> Result<()> {
    record_side(metrics, &CHOSEN, &inputs.chosen)?;
    record_side(metrics, &REJECTED, rejected)?;
    if let Some(tokens) = rejected.tokens() {
        metrics.insert(COLLAPSE_REJECTED_FRACTION, tokens.fraction_below(inputs.collapse_delta)?);
    }
    Ok(())
}

/// Records `logps/{side}` (mean of sums) and `logps/{side}_per_token` (mean of means).
pub(crate) fn record_side(metrics: &mut Metrics, keys: &SideKeys, logps: &SequenceLogps) -> Result<()> {
    metrics.insert_mean(keys.sum, logps.sum())?;
    let per_token = logps.sum().detach().div(&logps.count().detach().clamp(1.0, f64::INFINITY)?)?;
    metrics.insert_mean(keys.per_token, &per_token)?;
    Ok(())
}
