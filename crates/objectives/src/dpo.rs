//! DPO (Rafailov et al. 2023, arXiv 2305.18290) with its variants, and IPO (Azar et al. 2023,
//! arXiv 2310.12036). Both need reference-model log-probs.
//!
//! With `Delta = (S_w - S_ref_w) - (S_l - S_ref_l)` and `z = beta * Delta`:
//!
//! ```text
//! sigmoid (cDPO with eps > 0): -(1 - eps) logsig(z) - eps logsig(-z)
//! robust (Chowdhury et al. 2024): [-(1 - eps) logsig(z) + eps logsig(-z)] / (1 - 2 eps)
//! hinge (SLiC-style):           relu(1 - z)
//! IPO:                          ((Delta_w / |y_w| - Delta_l / |y_l|) - 1 / (2 beta))^2
//! ```
//!
//! Implicit rewards (logged, detached): `beta * (S - S_ref)` (IPO: per-token averages).

use serde::{Deserialize, Serialize};

use crate::metrics::{PREFERENCE, record_logps, record_rewards};
use crate::numerics::{log_sigmoid_t, relu_t, smoothed_logistic_loss};
use crate::objective::{Aggregation, Loss, ObjectiveKind, Requirements, check};
use crate::output::{LossOutput, Metrics};
use crate::{ObjectiveError, ObjectiveInputs, Result};

/// Which DPO loss. Read from its name (TRL's `loss_type` values `sigmoid`, `robust` and `hinge`
/// mean the same here); TRL's `ipo` is the separate [`IpoParams`] objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum DpoLossType {
    /// `-logsig(beta * Delta)`, with label smoothing: conservative DPO (cDPO).
    #[default]
    Sigmoid,
    /// Robust DPO: unbiased under label-flip rate `label_smoothing`.
    Robust,
    /// `relu(1 - beta * Delta)`; `label_smoothing` must be 0.
    Hinge,
}

impl TryFrom<String> for DpoLossType {
    type Error = String;

    fn try_from(name: String) -> std::result::Result<Self, String> {
        match name.as_str() {
            "sigmoid" => Ok(Self::Sigmoid),
            "robust" => Ok(Self::Robust),
            "hinge" => Ok(Self::Hinge),
            "ipo" => Err("loss `ipo` is an objective of its own here: set type = \"ipo\" (same beta)".into()),
            other => Err(format!("unknown DPO loss `{other}`, expected sigmoid, robust or hinge")),
        }
    }
}

/// DPO hyperparameters (TRL's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoParams {
    /// Inverse temperature `beta > 0` (default 0.1).
    pub beta: f64,
    /// Loss variant (default `sigmoid`); TRL's name `loss_type` is accepted.
    #[serde(alias = "loss_type")]
    pub loss: DpoLossType,
    /// Label-flip probability `eps` in `[0, 0.5)` for `sigmoid` (cDPO) and `robust` (default 0).
    pub label_smoothing: f64,
}

impl Default for DpoParams {
    fn default() -> Self {
        Self { beta: 0.1, loss: DpoLossType::Sigmoid, label_smoothing: 0.0 }
    }
}

const DPO: &str = "dpo";

impl ObjectiveKind for DpoParams {
    const NAME: &'static str = DPO;
    const LOSS_TERMS: &'static [&'static str] = &[];
    const METRICS: &'static [&'static str] = &PREFERENCE;
}

impl Loss for DpoParams {
    fn name(&self) -> &'static str {
        DPO
    }

    fn validate(&self) -> Result<()> {
        check(self.beta > 0.0, DPO, "beta", self.beta, "a finite value > 0")?;
        check(
            (0.0..0.5).contains(&self.label_smoothing),
            DPO,
            "label_smoothing",
            self.label_smoothing,
            "a value in [0, 0.5)",
        )?;
        if self.loss == DpoLossType::Hinge && self.label_smoothing != 0.0 {
            return Err(ObjectiveError::InvalidCombination {
                objective: DPO,
                reason: "label_smoothing is not defined for the hinge loss; set it to 0".into(),
            });
        }
        Ok(())
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            reference: true,
            rejected: true,
            chosen_tokens: false,
            rejected_tokens: false,
            aggregation: Aggregation::Sum,
        }
    }

    fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput> {
        self.validate()?;
        let scale = inputs.scale()?;
        let rejected = inputs.require_rejected(DPO)?;
        let reference = inputs.require_reference(DPO)?;
        let (ref_chosen, ref_rejected) = reference.in_dtype(inputs.chosen.sum().dtype())?;
        let chosen_logratio = (inputs.chosen.sum() - ref_chosen)?;
        let rejected_logratio = (rejected.sum() - ref_rejected)?;
        let z = (&chosen_logratio - &rejected_logratio)?.affine(self.beta, 0.0)?;
        let eps = self.label_smoothing;
        let per_example = match self.loss {
            DpoLossType::Sigmoid => smoothed_logistic_loss(&z, eps)?,
            DpoLossType::Robust => {
                let pos = log_sigmoid_t(&z)?.affine(-(1.0 - eps), 0.0)?;
                let neg = log_sigmoid_t(&z.neg()?)?.affine(eps, 0.0)?;
                (pos + neg)?.affine(1.0 / (1.0 - 2.0 * eps), 0.0)?
            }
            DpoLossType::Hinge => relu_t(&z.affine(-1.0, 1.0)?)?,
        };
        let mut metrics = Metrics::new();
        record_rewards(
            &mut metrics,
            &chosen_logratio.affine(self.beta, 0.0)?,
            &rejected_logratio.affine(self.beta, 0.0)?,
        )?;
        record_logps(&mut metrics, inputs, rejected)?;
        LossOutput::from_per_example(per_example, scale.pairs, metrics)
    }
}

/// IPO hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpoParams {
    /// Regularisation `beta > 0` (the paper's tau); the target margin is `1 / (2 beta)` (default 0.1).
    pub beta: f64,
}

impl Default for IpoParams {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

const IPO: &str = "ipo";

impl ObjectiveKind for IpoParams {
    const NAME: &'static str = IPO;
    const LOSS_TERMS: &'static [&'static str] = &[];
    const METRICS: &'static [&'static str] = &PREFERENCE;
}

impl Loss for IpoParams {
    fn name(&self) -> &'static str {
        IPO
    }

    fn validate(&self) -> Result<()> {
        check(self.beta > 0.0, IPO, "beta", self.beta, "a finite value > 0")
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            reference: true,
            rejected: true,
            chosen_tokens: false,
            rejected_tokens: false,
            aggregation: Aggregation::Mean,
        }
    }

    fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput> {
        self.validate()?;
        let scale = inputs.scale()?;
        let rejected = inputs.require_rejected(IPO)?;
        let reference = inputs.require_reference(IPO)?;
        // Per-token averages of the policy/reference log-ratios (the policy's counts apply to both).
        inputs.chosen.mean("chosen")?;
        rejected.mean("rejected")?;
        let (ref_chosen, ref_rejected) = reference.in_dtype(inputs.chosen.sum().dtype())?;
        let chosen_logratio = (inputs.chosen.sum() - ref_chosen)?.div(inputs.chosen.count())?;
        let rejected_logratio = (rejected.sum() - ref_rejected)?.div(rejected.count())?;
        let h = (&chosen_logratio - &rejected_logratio)?;
        let per_example = h.affine(1.0, -1.0 / (2.0 * self.beta))?.sqr()?;
        let mut metrics = Metrics::new();
        record_rewards(
            &mut metrics,
            &chosen_logratio.affine(self.beta, 0.0)?,
            &rejected_logratio.affine(self.beta, 0.0)?,
        )?;
        record_logps(&mut metrics, inputs, rejected)?;
        LossOutput::from_per_example(per_example, scale.pairs, metrics)
    }
}
