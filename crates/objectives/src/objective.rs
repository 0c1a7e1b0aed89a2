//! The serde-configurable [`Objective`] enum, its one exhaustive dispatch, and the
//! [`Loss`] trait every objective's parameter struct implements.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::logps::ObjectiveInputs;
use crate::output::LossOutput;
use crate::{CpoParams, DpoParams, IpoParams, ObjectiveError, OrpoParams, Result, SftParams, SimpoParams, SlimeParams};

/// How an objective aggregates token log-probs into the quantity its loss compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// Per-sequence sums `S(y)` (DPO, CPO).
    Sum,
    /// Per-sequence means `A(y) = S(y) / |y|` (SLIME, SimPO, IPO, ORPO, CPO-SimPO).
    Mean,
    /// A mean over all counted tokens of the batch, pooled (SFT).
    PooledTokens,
}

/// What an objective needs from the caller, so a training loop can ask instead of matching
/// on the objective's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirements {
    /// Needs reference-model log-prob sums ([`crate::ReferenceLogps`]).
    pub reference: bool,
    /// Needs rejected completions (every preference objective).
    pub rejected: bool,
    /// Needs per-token chosen log-probs, not only sums and counts.
    pub chosen_tokens: bool,
    /// Needs per-token rejected log-probs, not only sums and counts.
    pub rejected_tokens: bool,
    /// The aggregation its loss uses.
    pub aggregation: Aggregation,
}

/// An objective's parameters know how to validate themselves and compute the loss.
pub trait Loss {
    /// Short name as used in configs and metric prefixes (`slime`, `dpo`, ...).
    fn name(&self) -> &'static str;
    /// Rejects out-of-range hyperparameters with an error naming the field.
    fn validate(&self) -> Result<()>;
    /// What the objective needs as input.
    fn requirements(&self) -> Requirements;
    /// Per-example losses, the batch loss and detached metrics. Validates parameters and inputs first.
    fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput>;
}

/// Every objective of the workspace, configured by a `type` tag:
///
/// ```toml
/// type = "slime"
/// preset = "authors-code"   # or "paper" (default); then override single values:
/// p = 2.0
/// use_soft_margin = false
/// ```
///
/// Deserialisation is hand-written (see `objective_serde.rs`) so that every error names its
/// field; serialisation writes the same `type`-tagged table with every resolved value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Objective {
    /// SLIME (arXiv 2602.02383): anchoring + token stabiliser + dual margin, reference-free.
    Slime(SlimeParams),
    /// DPO (Rafailov et al. 2023) and its label-smoothing (cDPO), robust and hinge variants.
    Dpo(DpoParams),
    /// IPO (Azar et al. 2023).
    Ipo(IpoParams),
    /// SimPO (Meng et al. 2024), reference-free, length-normalised.
    Simpo(SimpoParams),
    /// CPO (Xu et al. 2024) and CPO-SimPO.
    Cpo(CpoParams),
    /// ORPO (Hong et al. 2024).
    Orpo(OrpoParams),
    /// Supervised fine-tuning: NLL and the probability-based family of arXiv 2510.00526.
    Sft(SftParams),
}

impl Objective {
    /// Every objective name accepted by [`FromStr`] and the `type` tag.
    pub const NAMES: [&'static str; 7] = ["slime", "dpo", "ipo", "simpo", "cpo", "orpo", "sft"];

    /// The one exhaustive dispatch: the objective's parameters as a [`Loss`].
    pub fn as_loss(&self) -> &dyn Loss {
        match self {
            Self::Slime(p) => p,
            Self::Dpo(p) => p,
            Self::Ipo(p) => p,
            Self::Simpo(p) => p,
            Self::Cpo(p) => p,
            Self::Orpo(p) => p,
            Self::Sft(p) => p,
        }
    }

    /// Short name (`slime`, `dpo`, ...).
    pub fn name(&self) -> &'static str {
        self.as_loss().name()
    }

    /// Rejects out-of-range hyperparameters.
    pub fn validate(&self) -> Result<()> {
        self.as_loss().validate()
    }

    /// What the objective needs as input.
    pub fn requirements(&self) -> Requirements {
        self.as_loss().requirements()
    }

    /// True when the objective needs a reference model (DPO, IPO).
    pub fn needs_reference(&self) -> bool {
        self.requirements().reference
    }

    /// True for objectives over chosen/rejected pairs (everything but SFT).
    pub fn is_preference(&self) -> bool {
        self.requirements().rejected
    }

    /// The log-prob aggregation the loss uses.
    pub fn aggregation(&self) -> Aggregation {
        self.requirements().aggregation
    }

    /// Computes the loss (see [`Loss::compute`]).
    pub fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput> {
        self.as_loss().compute(inputs)
    }
}

/// `"slime"`, `"dpo"`, ... with default parameters (SLIME: the paper's preset).
impl FromStr for Objective {
    type Err = ObjectiveError;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "slime" => Self::Slime(SlimeParams::default()),
            "dpo" => Self::Dpo(DpoParams::default()),
            "ipo" => Self::Ipo(IpoParams::default()),
            "simpo" => Self::Simpo(SimpoParams::default()),
            "cpo" => Self::Cpo(CpoParams::default()),
            "orpo" => Self::Orpo(OrpoParams::default()),
            "sft" => Self::Sft(SftParams::default()),
            other => {
                return Err(ObjectiveError::Parse(format!(
                    "unknown objective `{other}`, expected one of {}",
                    Self::NAMES.join(", ")
                )));
            }
        })
    }
}

/// Checks `ok` and otherwise names the field, its value and the valid range.
pub(crate) fn check(
    ok: bool,
    objective: &'static str,
    field: &'static str,
    value: f64,
    expected: &'static str,
) -> Result<()> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(ObjectiveError::InvalidParam { objective, field, value, expected })
    }
}
