//! The serde-configurable [`Objective`] enum, generated from one list of objectives, and the
//! [`Loss`] and [`ObjectiveKind`] traits every objective's parameter struct implements.

use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// What the compiler knows about an objective, declared next to its formula: the name of its
/// config's `type` tag and the metric keys its [`Loss::compute`] records.
pub trait ObjectiveKind: Loss + Default + Serialize + DeserializeOwned + Into<Objective> {
    /// Name in configs (`type = "..."`), errors and metric prefixes.
    const NAME: &'static str;
    /// Metric keys of the loss's terms when it has several (per example, the loss is their
    /// weighted sum); empty for a one-term loss.
    const LOSS_TERMS: &'static [&'static str];
    /// Every other metric key `compute` may record, besides [`crate::metrics::LOSS`].
    const METRICS: &'static [&'static str];
}

/// Declares [`Objective`] from one list of `Variant(Params)`: the enum, [`Objective::NAMES`],
/// the dispatch to [`Loss`], the metric lists, `From<Params>`, [`FromStr`], `Serialize` and the
/// `type` dispatch of `Deserialize`, so an objective is named in exactly one place.
macro_rules! objectives {
    ($($(#[doc = $doc:literal])* $variant:ident($params:ty),)+) => {
        /// Every objective of the workspace, configured by a `type` tag:
        ///
        /// ```toml
        /// type = "slime"
        /// preset = "authors-code"   # or "paper" (default); then override single values:
        /// p = 2.0
        /// use_soft_margin = false
        /// ```
        ///
        /// Deserialisation names the field in every error (see `objective_serde.rs`);
        /// serialisation writes the same `type`-tagged table with every resolved value.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Objective {
            $($(#[doc = $doc])* $variant($params),)+
        }

        impl Objective {
            /// Every objective name accepted by [`FromStr`] and the `type` tag.
            pub const NAMES: [&'static str; [$(stringify!($variant)),+].len()] =
                [$(<$params as ObjectiveKind>::NAME),+];

            /// The one exhaustive dispatch: the objective's parameters as a [`Loss`].
            pub fn as_loss(&self) -> &dyn Loss {
                match self {
                    $(Self::$variant(p) => p,)+
                }
            }

            /// Metric keys of the objective's loss terms ([`ObjectiveKind::LOSS_TERMS`]).
            pub fn loss_terms(&self) -> &'static [&'static str] {
                match self {
                    $(Self::$variant(_) => <$params as ObjectiveKind>::LOSS_TERMS,)+
                }
            }

            /// Its other metric keys ([`ObjectiveKind::METRICS`]).
            pub fn metric_keys(&self) -> &'static [&'static str] {
                match self {
                    $(Self::$variant(_) => <$params as ObjectiveKind>::METRICS,)+
                }
            }

            /// The objective called `name` with its default parameters.
            fn with_defaults(name: &str) -> Option<Self> {
                $(if name == <$params as ObjectiveKind>::NAME {
                    return Some(Self::$variant(<$params>::default()));
                })+
                None
            }

            /// Deserialises the parameters of the objective called `name` (the `type` tag
            /// already taken out); `None` for an unknown name.
            pub(crate) fn deserialize_params<'de, D: Deserializer<'de>>(
                name: &str,
                params: D,
            ) -> Option<std::result::Result<Self, D::Error>> {
                $(if name == <$params as ObjectiveKind>::NAME {
                    return Some(<$params>::deserialize(params).map(Self::$variant));
                })+
                None
            }
        }

        impl Serialize for Objective {
            fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
                match self {
                    $(Self::$variant(p) => {
                        Tagged { kind: <$params as ObjectiveKind>::NAME, params: p }.serialize(serializer)
                    })+
                }
            }
        }

        $(impl From<$params> for Objective {
            fn from(params: $params) -> Self {
                Self::$variant(params)
            }
        })+
    };
}

objectives! {
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

/// Two objectives may not share a name: checked when the crate compiles.
const _: () = assert!(all_distinct(&Objective::NAMES), "two objectives share a name");

/// True when no two of `names` are equal (a `const fn`, so the check above runs at compile time).
const fn all_distinct(names: &[&str]) -> bool {
    let mut i = 0;
    while i < names.len() {
        let mut j = i + 1;
        while j < names.len() {
            if same(names[i].as_bytes(), names[j].as_bytes()) {
                return false;
            }
            j += 1;
        }
        i += 1;
    }
    true
}

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The serialised form: the `type` tag, then the parameters' own fields.
#[derive(Serialize)]
struct Tagged<'a, P> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    params: &'a P,
}

impl Objective {
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
        Self::with_defaults(s).ok_or_else(|| {
            ObjectiveError::Parse(format!("unknown objective `{s}`, expected one of {}", Self::NAMES.join(", ")))
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
