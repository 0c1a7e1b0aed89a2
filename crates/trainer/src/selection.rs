//! SAGE-style, stability-aware data selection (after arXiv 2602.01207, "Not All Preferences
//! Are Created Equal"; only its abstract is recoverable, so this implements the principle with
//! documented choices of our own).
//!
//! Every `refresh_every` optimiser steps the trainer re-scores a pool of candidate pairs with the
//! current policy (forward only) and draws the next training pairs from it in proportion to:
//!
//! ```text
//! m_i      = the objective's margin for pair i (reference-free: D = A_w - A_l; DPO/IPO: beta * Delta)
//! error_i  = sigmoid((target - m_i) / temperature)          informative: below target, confident errors highest
//! trivial  = m_i >= target + trivial_slack                  negligible gradient: score 0
//! unstable = |m_i| < boundary and sign(m_i) != sign(m_i_prev)  flipping at the decision boundary: score 0
//! score_i  = error_i, or 0 if trivial or unstable
//! ```
//!
//! The coarse curriculum is the refresh itself (the pool's scores follow the policy); the fine
//! score favours pairs the policy gets clearly wrong (large gradient, reliable direction),
//! drops pairs already past the target and pairs whose preference flips near zero between
//! refreshes. When fewer than the requested pairs have a positive score the rest are drawn
//! uniformly from the pool, and the number is reported.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// How training pairs are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectionKind {
    /// Every pair once per epoch in a seeded shuffle.
    #[default]
    Uniform,
    /// Stability-aware selection from a re-scored pool.
    Sage,
}

/// SAGE parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SageParams {
    /// Pairs re-scored per refresh (default 256).
    pub pool_size: usize,
    /// Optimiser steps between refreshes (default 8).
    pub refresh_every: u64,
    /// Margin the objective aims for; pairs below it are errors (default 1.0).
    pub target: f64,
    /// Softness of the error weight, > 0 (default 0.5).
    pub temperature: f64,
    /// Pairs with margin >= target + trivial_slack are skipped (default 1.0).
    pub trivial_slack: f64,
    /// |margin| below this counts as "at the decision boundary" (default 0.05).
    pub boundary: f64,
}

impl Default for SageParams {
    fn default() -> Self {
        Self { pool_size: 256, refresh_every: 8, target: 1.0, temperature: 0.5, trivial_slack: 1.0, boundary: 0.05 }
    }
}

impl SageParams {
    /// Rejects invalid values.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: String, expected: &str| {
            Err(TrainError::Config(format!("selection.sage.{field} = {v}: expected {expected}")))
        };
        if self.pool_size == 0 {
            return bad("pool_size", self.pool_size.to_string(), "at least 1");
        }
        if self.refresh_every == 0 {
            return bad("refresh_every", self.refresh_every.to_string(), "at least 1");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature.to_string(), "a finite value > 0");
        }
        if !(self.trivial_slack >= 0.0 && self.boundary >= 0.0 && self.target.is_finite()) {
            return bad("trivial_slack/boundary/target", format!("{self:?}"), "finite, slack and boundary >= 0");
        }
        Ok(())
    }

    /// Scores of the pool (see the module docs); `previous` are the margins of the same pairs
    /// at the last refresh, if they were scored then.
    pub fn scores(&self, margins: &[f64], previous: &[Option<f64>]) -> Vec<f64> {
        margins
            .iter()
            .zip(previous.iter().chain(std::iter::repeat(&None)))
            .map(|(&m, prev)| {
                let trivial = m >= self.target + self.trivial_slack;
                let unstable = m.abs() < self.boundary && prev.is_some_and(|p| p.signum() != m.signum());
                if trivial || unstable || !m.is_finite() {
                    0.0
                } else {
                    1.0 / (1.0 + ((m - self.target) / self.temperature).exp())
                }
            })
            .collect()
    }
}

/// Draws `n` distinct indices: by weight (without replacement) while positive weights remain,
/// then uniformly from the rest. Returns the indices and how many were drawn uniformly.
pub fn draw_weighted(weights: &[f64], n: usize, rng: &mut impl Rng) -> (Vec<usize>, usize) {
    let n = n.min(weights.len());
    // Efraimidis-Spirakis: the n largest keys u^(1/w) are a weighted sample without replacement.
    let mut keyed: Vec<(f64, usize)> = weights
        .iter()
        .enumerate()
        .filter(|&(_, &w)| w > 0.0)
        .map(|(i, &w)| (rng.random::<f64>().ln() / w, i))
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut chosen: Vec<usize> = keyed.iter().take(n).map(|&(_, i)| i).collect();
    let weighted = chosen.len();
    if weighted < n {
        let mut rest: Vec<usize> = (0..weights.len()).filter(|i| !chosen.contains(i)).collect();
        for k in 0..(n - weighted) {
            let j = rng.random_range(k..rest.len());
            rest.swap(k, j);
            chosen.push(rest[k]);
        }
    }
    (chosen, n - weighted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn scores_follow_the_documented_rules() {
        let p = SageParams::default(); // target 1, temperature 0.5, slack 1, boundary 0.05
        let s = p.scores(&[-3.0, 1.0, 2.5, 0.01, 0.01], &[None, None, None, Some(-0.2), Some(0.3)]);
        // Confident error: sigmoid((1 + 3) / 0.5) = sigmoid(8) = 0.9996646498695336.
        assert!((s[0] - 0.999_664_649_869_533_6).abs() < 1e-12);
        // At the target: 0.5. Past target + slack: trivial, 0.
        assert!((s[1] - 0.5).abs() < 1e-15);
        assert_eq!(s[2], 0.0);
        // Flipped sign at the boundary: unstable, 0; same sign near the boundary: kept.
        assert_eq!(s[3], 0.0);
        assert!(s[4] > 0.5);
        // Monotone: a worse margin never scores lower.
        let sweep: Vec<f64> = (0..50).map(|i| -5.0 + 0.1 * f64::from(i)).collect();
        let ss = p.scores(&sweep, &[]);
        assert!(ss.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn weighted_draw_prefers_heavy_items_and_fills_uniformly() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut hits = [0usize; 4];
        for _ in 0..2000 {
            let (picked, uniform) = draw_weighted(&[10.0, 1.0, 0.0, 0.0], 1, &mut rng);
            assert_eq!(uniform, 0);
            hits[picked[0]] += 1;
        }
        // P(item 0) = 10/11: about 1818 of 2000.
        assert!((1700..1930).contains(&hits[0]), "{hits:?}");
        assert_eq!(hits[2] + hits[3], 0);
        let (picked, uniform) = draw_weighted(&[1.0, 0.0, 0.0, 0.0], 3, &mut rng);
        assert_eq!(uniform, 2);
        let mut sorted = picked.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "distinct: {picked:?}");
        assert!(picked.contains(&0));
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert!(SageParams { pool_size: 0, ..SageParams::default() }.validate().is_err());
        assert!(SageParams { temperature: 0.0, ..SageParams::default() }.validate().is_err());
        assert!(SageParams::default().validate().is_ok());
    }
}
