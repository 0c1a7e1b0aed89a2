//! CPO: Contrastive Preference Optimization (Xu et al. 2024, arXiv 2401.08417), and CPO-SimPO
//! (the SimPO authors' combination). Reference-free, with an NLL term on the chosen response.
//!
//! ```text
//! CPO:        -logsig(beta * (S_w - S_l))               + alpha * NLL(y_w)
//! CPO-SimPO:  -logsig(beta * (A_w - A_l) - simpo_gamma)  + alpha * NLL(y_w)
//! NLL(y_w) = -sum_i S_w,i / sum_i |y_w,i|     (token mean pooled over the batch, as TRL)
//! ```

use serde::{Deserialize, Serialize};

use crate::metrics::{NLL_LOSS, PREFERENCE, record_logps, record_rewards};
use crate::numerics::log_sigmoid_t;
use crate::objective::{Aggregation, Loss, ObjectiveKind, Requirements, check};
use crate::output::{LossOutput, Metrics};
use crate::{ObjectiveInputs, Result};

/// Which CPO preference term. TRL's `loss_type` values `sigmoid` and `simpo` are accepted for
/// `cpo` and `cpo-simpo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum CpoVariant {
    /// Summed log-probs, no margin.
    #[default]
    Cpo,
    /// Length-normalised log-probs with target margin `simpo_gamma`.
    CpoSimpo,
}

impl TryFrom<String> for CpoVariant {
    type Error = String;

    fn try_from(name: String) -> std::result::Result<Self, String> {
        match name.as_str() {
            "cpo" | "sigmoid" => Ok(Self::Cpo),
            "cpo-simpo" | "simpo" => Ok(Self::CpoSimpo),
            other => {
                Err(format!("unknown CPO variant `{other}`, expected cpo (TRL: sigmoid) or cpo-simpo (TRL: simpo)"))
            }
        }
    }
}

/// CPO hyperparameters (TRL's `CPOConfig` defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpoParams {
    /// Reward scale `beta > 0` (default 0.1).
    pub beta: f64,
    /// Weight of the chosen NLL term, `>= 0` (default 1.0); TRL's `cpo_alpha` (TRL's own `alpha`
    /// is AlphaPO's reward shape, not this).
    #[serde(alias = "cpo_alpha")]
    pub alpha: f64,
    /// Preference term (default `cpo`); TRL's name `loss_type` is accepted.
    #[serde(alias = "loss_type")]
    pub variant: CpoVariant,
    /// Absolute target margin for `cpo-simpo`, `>= 0` (default 0.5; ignored by `cpo`).
    pub simpo_gamma: f64,
}

impl Default for CpoParams {
    fn default() -> Self {
        Self { beta: 0.1, alpha: 1.0, variant: CpoVariant::Cpo, simpo_gamma: 0.5 }
    }
}

const NAME: &str = "cpo";
/// The preference term `-logsig(z)`.
const PREFERENCE_TERM: &str = "cpo/preference";

impl ObjectiveKind for CpoParams {
    const NAME: &'static str = NAME;
    const LOSS_TERMS: &'static [&'static str] = &[PREFERENCE_TERM, NLL_LOSS];
    const METRICS: &'static [&'static str] = &PREFERENCE;
}

impl Loss for CpoParams {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self) -> Result<()> {
        check(self.beta > 0.0, NAME, "beta", self.beta, "a finite value > 0")?;
        check(self.alpha >= 0.0, NAME, "alpha", self.alpha, "a finite value >= 0")?;
        check(self.simpo_gamma >= 0.0, NAME, "simpo_gamma", self.simpo_gamma, "a finite value >= 0")
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            reference: false,
            rejected: true,
            chosen_tokens: false,
            rejected_tokens: false,
            aggregation: match self.variant {
                CpoVariant::Cpo => Aggregation::Sum,
                CpoVariant::CpoSimpo => Aggregation::Mean,
            },
        }
    }

    fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput> {
        self.validate()?;
        let scale = inputs.scale()?;
        let rejected = inputs.require_rejected(NAME)?;
        let (chosen_reward, rejected_reward, gamma) = match self.variant {
            CpoVariant::Cpo => {
                (inputs.chosen.sum().affine(self.beta, 0.0)?, rejected.sum().affine(self.beta, 0.0)?, 0.0)
            }
            CpoVariant::CpoSimpo => (
                inputs.chosen.mean("chosen")?.affine(self.beta, 0.0)?,
                rejected.mean("rejected")?.affine(self.beta, 0.0)?,
                self.simpo_gamma,
            ),
        };
        let z = (&chosen_reward - &rejected_reward)?.affine(1.0, -gamma)?;
        let preference = log_sigmoid_t(&z)?.neg()?;
        let nll = inputs.chosen.pooled_mean_per_example("chosen", scale.pairs, scale.chosen_tokens)?.neg()?;
        let per_example = (&preference + nll.affine(self.alpha, 0.0)?)?;
        let mut metrics = Metrics::new();
        metrics.insert_mean(PREFERENCE_TERM, &preference)?;
        metrics.insert_mean(NLL_LOSS, &nll)?;
        record_rewards(&mut metrics, &chosen_reward, &rejected_reward)?;
        record_logps(&mut metrics, inputs, rejected)?;
        LossOutput::from_per_example(per_example, scale.pairs, metrics)
    }
}
