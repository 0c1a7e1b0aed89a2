//! SLIME: Stabilized Likelihood Implicit Margin Enforcement (Afanasyev & Iov, arXiv 2602.02383).
//!
//! Reference-free; no beta. With `A(y)` the mean completion log-prob and `D = A(y_w) - A(y_l)`:
//!
//! ```text
//! L      = L_w + L_l + L_dist
//! L_w    = -lambda_w * mean_batch A(y_w)                                   (likelihood anchoring)
//! L_l    =  lambda_l * mean_{all rejected tokens t of the batch} softplus(-l_t - delta)^p
//! L_dist =  lambda_d * mean_batch( relu(m_h - D) * sigmoid(-kappa * (D - m_s)) )
//! ```
//!
//! The stabiliser is pooled over every rejected token of the batch, as in the authors' code.
//! Each of anchor, stabiliser, hard factor and soft factor can be switched off: a term that is
//! off contributes 0, a margin factor that is off becomes 1 (the paper's ablations).

use serde::{Deserialize, Serialize};

use crate::metrics::{record_logps, record_rewards, with_preference};
use num_traits::Float;

use crate::numerics::{ScalarFn, constant, log1p, map_with_grad, relu_t, sigmoid_t};
use crate::objective::{Aggregation, Loss, ObjectiveKind, Requirements, check};
use crate::output::{LossOutput, Metrics};
use crate::{ObjectiveError, ObjectiveInputs, Result};

/// Named sets of SLIME hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlimePreset {
    /// Section 4.1 of the paper: lambda_w 0.1, lambda_l 0.1, lambda_d 1.0, delta 1.25,
    /// m_h 1.5, m_s 1.0, kappa 2.5, p 2.5.
    Paper,
    /// The authors' released code: as the paper but lambda_l = 0.0005.
    AuthorsCode,
}

/// SLIME hyperparameters. Deserialised from an optional `preset` (default `paper`) plus any
/// overrides; unknown fields are rejected. Serialises every resolved value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "SlimeSpec")]
pub struct SlimeParams {
    /// Weight of likelihood anchoring on the chosen response (paper: 0.1).
    pub lambda_w: f64,
    /// Weight of the rejected-token stabiliser (paper: 0.1; authors' code: 0.0005).
    pub lambda_l: f64,
    /// Weight of the dual-margin term (paper: 1.0).
    pub lambda_d: f64,
    /// Stabiliser threshold: tokens with `l_t` well above `-delta` cost ~0 (paper: 1.25).
    pub delta: f64,
    /// Hard margin `m_h`: the margin term is exactly 0 once `D >= m_h` (paper: 1.5).
    pub m_h: f64,
    /// Soft-margin centre `m_s` (paper: 1.0).
    pub m_s: f64,
    /// Soft-margin sharpness `kappa > 0` (paper: 2.5).
    pub kappa: f64,
    /// Stabiliser exponent `p > 0` (paper: 2.5; its ablation sweeps 1.0 to 3.0).
    pub p: f64,
    /// Include likelihood anchoring `L_w`.
    pub use_anchor: bool,
    /// Include the token stabiliser `L_l`.
    pub use_stabilizer: bool,
    /// Include the hard factor `relu(m_h - D)` (off: replaced by 1).
    pub use_hard_margin: bool,
    /// Include the soft factor `sigmoid(-kappa (D - m_s))` (off: replaced by 1).
    pub use_soft_margin: bool,
}

impl SlimeParams {
    /// The paper's section 4.1 values, every part on.
    pub fn paper() -> Self {
        Self {
            lambda_w: 0.1,
            lambda_l: 0.1,
            lambda_d: 1.0,
            delta: 1.25,
            m_h: 1.5,
            m_s: 1.0,
            kappa: 2.5,
            p: 2.5,
            use_anchor: true,
            use_stabilizer: true,
            use_hard_margin: true,
            use_soft_margin: true,
        }
    }

    /// The authors' released code: lambda_l = 0.0005, the rest as the paper.
    pub fn authors_code() -> Self {
        Self { lambda_l: 0.0005, ..Self::paper() }
    }

    /// The values of a preset.
    pub fn from_preset(preset: SlimePreset) -> Self {
        match preset {
            SlimePreset::Paper => Self::paper(),
            SlimePreset::AuthorsCode => Self::authors_code(),
        }
    }
}

/// Per-token stabiliser `g(l) = softplus(-l - delta)^p` and `dg/dl`:
/// `dg/dl = -p * softplus(z)^(p-1) * sigmoid(z)` with `z = -l - delta`.
struct Stabilizer {
    delta: f64,
    p: f64,
}

impl ScalarFn for Stabilizer {
    fn eval<T: Float>(&self, l: T) -> (T, T) {
        let p: T = constant(self.p);
        let z = -l - constant(self.delta);
        // softplus and sigmoid share e^-|z| (this runs once per rejected token).
        let e = (-z.abs()).exp();
        let s = z.max(T::zero()) + log1p(e);
        if s == T::zero() {
            return (T::zero(), T::zero());
        }
        let sigmoid_z = if z >= T::zero() { T::one() / (T::one() + e) } else { e / (T::one() + e) };
        let g = pow(s, self.p);
        (g, -p * g / s * sigmoid_z)
    }
}

/// `s^p` for `s > 0`. The paper's exponents (1.0 to 3.0 in steps of 0.5) are half-integers,
/// computed with multiplications and one `sqrt`, several times faster than `powf`.
fn pow<T: Float>(s: T, p: f64) -> T {
    let twice = 2.0 * p;
    if twice.fract() == 0.0 && twice <= 16.0 {
        let whole = s.powi(p.trunc() as i32);
        if p.fract() == 0.0 { whole } else { whole * s.sqrt() }
    } else {
        s.powf(constant(p))
    }
}

impl Default for SlimeParams {
    fn default() -> Self {
        Self::paper()
    }
}

/// The on-disk form: a preset plus optional overrides.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlimeSpec {
    preset: Option<SlimePreset>,
    lambda_w: Option<f64>,
    lambda_l: Option<f64>,
    lambda_d: Option<f64>,
    delta: Option<f64>,
    m_h: Option<f64>,
    m_s: Option<f64>,
    kappa: Option<f64>,
    p: Option<f64>,
    use_anchor: Option<bool>,
    use_stabilizer: Option<bool>,
    use_hard_margin: Option<bool>,
    use_soft_margin: Option<bool>,
}

impl From<SlimeSpec> for SlimeParams {
    fn from(s: SlimeSpec) -> Self {
        let base = Self::from_preset(s.preset.unwrap_or(SlimePreset::Paper));
        Self {
            lambda_w: s.lambda_w.unwrap_or(base.lambda_w),
            lambda_l: s.lambda_l.unwrap_or(base.lambda_l),
            lambda_d: s.lambda_d.unwrap_or(base.lambda_d),
            delta: s.delta.unwrap_or(base.delta),
            m_h: s.m_h.unwrap_or(base.m_h),
            m_s: s.m_s.unwrap_or(base.m_s),
            kappa: s.kappa.unwrap_or(base.kappa),
            p: s.p.unwrap_or(base.p),
            use_anchor: s.use_anchor.unwrap_or(base.use_anchor),
            use_stabilizer: s.use_stabilizer.unwrap_or(base.use_stabilizer),
            use_hard_margin: s.use_hard_margin.unwrap_or(base.use_hard_margin),
            use_soft_margin: s.use_soft_margin.unwrap_or(base.use_soft_margin),
        }
    }
}

const NAME: &str = "slime";
/// Likelihood anchoring `L_w`, per example.
const ANCHOR: &str = "slime/anchor";
/// The token stabiliser `L_l`, attributed per example.
const STABILIZER: &str = "slime/stabilizer";
/// The dual-margin term `L_dist`, per example.
const MARGIN: &str = "slime/margin";
/// Mean hard factor `relu(m_h - D)` (1 when off).
const HARD_FACTOR: &str = "slime/hard_factor";
/// Mean soft factor `sigmoid(-kappa (D - m_s))` (1 when off).
const SOFT_FACTOR: &str = "slime/soft_factor";
/// Fraction of pairs with `D >= m_h`.
const MARGIN_SATISFIED: &str = "slime/margin_satisfied";

impl ObjectiveKind for SlimeParams {
    const NAME: &'static str = NAME;
    const LOSS_TERMS: &'static [&'static str] = &[ANCHOR, STABILIZER, MARGIN];
    const METRICS: &'static [&'static str] = &with_preference::<12>(&[HARD_FACTOR, SOFT_FACTOR, MARGIN_SATISFIED]);
}

impl Loss for SlimeParams {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self) -> Result<()> {
        check(self.lambda_w >= 0.0, NAME, "lambda_w", self.lambda_w, "a finite value >= 0")?;
        check(self.lambda_l >= 0.0, NAME, "lambda_l", self.lambda_l, "a finite value >= 0")?;
        check(self.lambda_d >= 0.0, NAME, "lambda_d", self.lambda_d, "a finite value >= 0")?;
        check(true, NAME, "delta", self.delta, "a finite value")?;
        check(true, NAME, "m_h", self.m_h, "a finite value")?;
        check(true, NAME, "m_s", self.m_s, "a finite value")?;
        check(self.kappa > 0.0, NAME, "kappa", self.kappa, "a finite value > 0")?;
        check(self.p > 0.0, NAME, "p", self.p, "a finite value > 0")
    }

    fn requirements(&self) -> Requirements {
        Requirements {
            reference: false,
            rejected: true,
            chosen_tokens: false,
            rejected_tokens: self.use_stabilizer,
            aggregation: Aggregation::Mean,
        }
    }

    fn compute(&self, inputs: &ObjectiveInputs) -> Result<LossOutput> {
        self.validate()?;
        let scale = inputs.scale()?;
        let rejected = inputs.require_rejected(NAME)?;
        let chosen_mean = inputs.chosen.mean("chosen")?;
        let rejected_mean = rejected.mean("rejected")?;
        let margin = (&chosen_mean - &rejected_mean)?;
        let zeros = margin.zeros_like()?;

        let anchor = if self.use_anchor { chosen_mean.affine(-self.lambda_w, 0.0)? } else { zeros.clone() };

        let stabilizer = if self.use_stabilizer {
            let tokens = rejected
                .tokens()
                .ok_or(ObjectiveError::MissingInput { objective: NAME, input: "per-token rejected log-probs" })?;
            let stabilizer = Stabilizer { delta: self.delta, p: self.p };
            let per_token = tokens.map_counted(|l| map_with_grad(l, &stabilizer))?;
            // Pooled mean over all rejected tokens, attributed per example: B * sum_t g / N.
            per_token.sum(1)?.affine(self.lambda_l * scale.pairs / scale.rejected_tokens, 0.0)?
        } else {
            zeros.clone()
        };

        let hard = if self.use_hard_margin { relu_t(&margin.affine(-1.0, self.m_h)?)? } else { zeros.ones_like()? };
        let soft = if self.use_soft_margin {
            sigmoid_t(&margin.affine(-self.kappa, self.kappa * self.m_s)?)?
        } else {
            zeros.ones_like()?
        };
        let margin_term = (&hard * &soft)?.affine(self.lambda_d, 0.0)?;

        let per_example = ((&anchor + &stabilizer)? + &margin_term)?;

        let mut metrics = Metrics::new();
        metrics.insert_mean(ANCHOR, &anchor)?;
        metrics.insert_mean(STABILIZER, &stabilizer)?;
        metrics.insert_mean(MARGIN, &margin_term)?;
        metrics.insert_mean(HARD_FACTOR, &hard)?;
        metrics.insert_mean(SOFT_FACTOR, &soft)?;
        metrics.insert_mean(MARGIN_SATISFIED, &margin.detach().ge(self.m_h)?)?;
        record_rewards(&mut metrics, &chosen_mean, &rejected_mean)?;
        record_logps(&mut metrics, inputs, rejected)?;
        LossOutput::from_per_example(per_example, scale.pairs, metrics)
    }
}
