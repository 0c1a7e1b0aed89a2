//! SimPO: Simple Preference Optimization (Meng et al. 2024, arXiv 2405.14734). Reference-free.
//!
//! ```text
//! z    = beta * (A_w - A_l) - gamma,   gamma = beta * gamma_beta_ratio
//! loss = -(1 - eps) logsig(z) - eps logsig(-z)
//! ```
//!
//! Implicit rewards (logged): `beta * A`.
//!
//! TRL runs SimPO as `CPOConfig(loss_type = "simpo", cpo_alpha = 0)` with `simpo_gamma` the
//! margin `gamma` itself; `simpo_gamma` is read here as `gamma_beta_ratio = simpo_gamma / beta`.

use serde::{Deserialize, Serialize};

use crate::metrics::{PREFERENCE, record_logps, record_rewards};
use crate::numerics::smoothed_logistic_loss;
use crate::objective::{Aggregation, Loss, ObjectiveKind, Requirements, check};
use crate::output::{LossOutput, Metrics};
use crate::{ObjectiveInputs, Result};

/// SimPO hyperparameters (defaults of the official code; released configs span beta 2..10 and
/// gamma_beta_ratio 0.1..0.8). Deserialisation also takes TRL's `CPOConfig` names
/// (`simpo_gamma`, `cpo_alpha = 0`, `loss_type = "simpo"`); serialisation writes ours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SimpoSpec")]
pub struct SimpoParams {
    /// Reward scale `beta > 0` (default 2.0).
    pub beta: f64,
    /// Target margin as a fraction of beta: `gamma = beta * gamma_beta_ratio` (default 0.5).
    pub gamma_beta_ratio: f64,
    /// Label smoothing `eps` in `[0, 0.5)` (default 0).
    pub label_smoothing: f64,
}

impl Default for SimpoParams {
    fn default() -> Self {
        Self { beta: 2.0, gamma_beta_ratio: 0.5, label_smoothing: 0.0 }
    }
}

impl SimpoParams {
    /// The absolute target margin `gamma = beta * gamma_beta_ratio`.
    pub fn gamma(&self) -> f64 {
        self.beta * self.gamma_beta_ratio
    }
}

/// The on-disk form: ours or TRL's names, every field optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimpoSpec {
    beta: Option<f64>,
    gamma_beta_ratio: Option<f64>,
    /// TRL's absolute target margin `gamma`.
    simpo_gamma: Option<f64>,
    label_smoothing: Option<f64>,
    /// TRL's NLL weight: must be 0 (SimPO proper); anything else is CPO-SimPO.
    cpo_alpha: Option<f64>,
    /// TRL's `loss_type`: must be `simpo`.
    loss_type: Option<String>,
}

impl TryFrom<SimpoSpec> for SimpoParams {
    type Error = String;

    fn try_from(s: SimpoSpec) -> std::result::Result<Self, String> {
        if let Some(alpha) = s.cpo_alpha.filter(|&a| a != 0.0) {
            return Err(format!(
                "cpo_alpha = {alpha} adds an NLL term (CPO-SimPO): use type = \"cpo\" with loss_type = \"simpo\"; \
                 SimPO itself has cpo_alpha = 0"
            ));
        }
        if let Some(loss) = s.loss_type.filter(|l| l != "simpo") {
            return Err(format!("loss_type = `{loss}`: SimPO's only loss_type is simpo"));
        }
        let default = Self::default();
        let beta = s.beta.unwrap_or(default.beta);
        let gamma_beta_ratio = match (s.gamma_beta_ratio, s.simpo_gamma) {
            (Some(_), Some(_)) => {
                return Err("set gamma_beta_ratio (margin / beta) or TRL's simpo_gamma (the margin), not both".into());
            }
            (Some(ratio), None) => ratio,
            (None, Some(gamma)) if gamma >= 0.0 && gamma.is_finite() => gamma / beta,
            (None, Some(gamma)) => return Err(format!("simpo_gamma = {gamma}: expected a finite value >= 0")),
            (None, None) => default.gamma_beta_ratio,
        };
        Ok(Self { beta, gamma_beta_ratio, label_smoothing: s.label_smoothing.unwrap_or(default.label_smoothing) })
    }
}

const NAME: &str = "simpo";

impl ObjectiveKind for SimpoParams {
    const NAME: &'static str = NAME;
    const LOSS_TERMS: &'static [&'static str] = &[];
    const METRICS: &'static [&'static str] = &PREFERENCE;
}

impl Loss for SimpoParams {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self) -> Result<()> {
        check(self.beta > 0.0, NAME, "beta", self.beta, "a finite value > 0")?;
        check(self.gamma_beta_ratio >= 0.0, NAME, "gamma_beta_ratio", self.gamma_beta_ratio, "a finite value >= 0")?;
        check(
            (0.0..0.5).contains(&self.label_smoothing),
            NAME,
            "label_smoothing",
            self.label_smoothing,
            "a value in [0, 0.5)",
        )
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
        let chosen_reward = inputs.chosen.mean("chosen")?.affine(self.beta, 0.0)?;
        let rejected_reward = rejected.mean("rejected")?.affine(self.beta, 0.0)?;
        let z = (&chosen_reward - &rejected_reward)?.affine(1.0, -self.gamma())?;
        let per_example = smoothed_logistic_loss(&z, self.label_smoothing)?;
        let mut metrics = Metrics::new();
        record_rewards(&mut metrics, &chosen_reward, &rejected_reward)?;
        record_logps(&mut metrics, inputs, rejected)?;
        LossOutput::from_per_example(per_example, scale.pairs, metrics)
    }
}
