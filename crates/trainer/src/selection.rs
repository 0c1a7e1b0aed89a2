//! SAGE-style, stability-aware data selection. SAGE is arXiv 2602.01207 ("Not All Preferences
//! Are Created Equal"); this is a method built from that paper's abstract only (its full text
//! was not available), so every rule below is a documented choice of this crate.
//!
//! Every `refresh_every` optimiser steps the trainer re-scores a pool of candidate pairs with the
//! current policy (forward only, no gradient) and draws each step's pairs from it, without
//! replacement within a step, in proportion to:
//!
//! ```text
//! m_i      = the objective's own margin for pair i, t = its target (see `margin`;
//!            e.g. SLIME: D = A_w - A_l, t = m_h; DPO: beta * Delta against the reference, t = 0)
//! error_i  = sigmoid((t - m_i) / temperature)      below the target: informative; confident errors highest
//! trivial  = m_i >= t + trivial_slack              negligible gradient: score 0
//! unstable = m_i and its previous score m_i' lie on opposite sides of 0 and |m_i| < boundary
//!                                                  flipping at the decision boundary: score 0
//! score_i  = error_i, or 0 if trivial, unstable or not finite
//! ```
//!
//! The pool of `pool_size` pairs is `pool_size - k` fresh pairs from the epoch sampler followed
//! by `k = floor(overlap * pool_size)` pairs carried from the previous pool's fresh part, so
//! those `k` are scored at two consecutive refreshes: their sign flips and margin changes are
//! the measured stability (logged at each refresh), and the flip filter compares them with a
//! score `refresh_every` steps old. Pairs seen in an earlier epoch are compared with their last
//! score. When fewer pairs than a step needs have a positive score, the rest are drawn
//! uniformly from the pool, and the number is logged (`selection/uniform_fill`).

mod margin;

use std::collections::{HashMap, HashSet};

use rand::Rng;
use serde::{Deserialize, Serialize};
use slime_objectives::Objective;

pub use margin::{objective_margin, objective_target};

use crate::metrics::selection as keys;
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

/// SAGE parameters (`[preference.sage]`). Margin-valued ones (`target`, `temperature`,
/// `trivial_slack`, `boundary`) are in the units of the objective's margin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SageParams {
    /// Pairs scored per refresh, at least one optimiser batch (default 256).
    pub pool_size: usize,
    /// Optimiser steps between refreshes (default 8).
    pub refresh_every: u64,
    /// Fraction of the pool carried over and re-scored at the next refresh, in [0, 0.5]
    /// (default 0.5).
    pub overlap: f64,
    /// Target margin; absent: the objective's own (see [`objective_target`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// Softness of the error weight, > 0 (default 0.5).
    pub temperature: f64,
    /// Pairs with margin >= target + trivial_slack score 0 (default 1.0).
    pub trivial_slack: f64,
    /// A sign flip with |margin| below this scores 0 (default 0.25).
    pub boundary: f64,
}

impl Default for SageParams {
    fn default() -> Self {
        Self {
            pool_size: 256,
            refresh_every: 8,
            overlap: 0.5,
            target: None,
            temperature: 0.5,
            trivial_slack: 1.0,
            boundary: 0.25,
        }
    }
}

/// A pool's scores and how many pairs each rule zeroed.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolScores {
    /// Draw weight of each pool entry.
    pub weights: Vec<f64>,
    /// Entries with a positive weight.
    pub informative: usize,
    /// Entries past `target + trivial_slack`.
    pub trivial: usize,
    /// Entries that flipped sign within `boundary` of 0.
    pub unstable: usize,
    /// Entries whose margin is NaN or infinite.
    pub not_finite: usize,
}

/// Margin changes of the pairs scored at two consecutive refreshes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stability {
    /// Pairs scored at both refreshes.
    pub rescored: usize,
    /// Of those, pairs whose margin changed sign.
    pub flipped: usize,
    /// Mean `|m - m'|` over them (0 when none).
    pub mean_abs_change: f64,
}

impl Stability {
    /// Compares `now` with `before`, entry by entry (finite pairs only).
    pub fn between(now: &[f64], before: &[f64]) -> Self {
        let pairs: Vec<(f64, f64)> =
            now.iter().zip(before).map(|(&a, &b)| (a, b)).filter(|(a, b)| a.is_finite() && b.is_finite()).collect();
        let flipped = pairs.iter().filter(|&&(a, b)| opposite_sides(a, b)).count();
        let total: f64 = pairs.iter().map(|(a, b)| (a - b).abs()).sum();
        let mean_abs_change = if pairs.is_empty() { 0.0 } else { total / pairs.len() as f64 };
        Self { rescored: pairs.len(), flipped, mean_abs_change }
    }
}

/// Whether `a` and `b` lie on opposite sides of the decision boundary 0 (0 counts as positive).
fn opposite_sides(a: f64, b: f64) -> bool {
    (a >= 0.0) != (b >= 0.0)
}

/// The outcome of one pool refresh.
#[derive(Debug, Clone, PartialEq)]
pub struct Refresh {
    /// Indices into the preference split: fresh pairs, then the carried ones.
    pub pool: Vec<usize>,
    /// How many of `pool` (its tail) were carried from the previous pool.
    pub carried: usize,
    /// The target margin used.
    pub target: f64,
    /// The pool's margins, in pool order.
    pub margins: Vec<f64>,
    /// The pool's scores.
    pub scores: PoolScores,
    /// Stability of the carried pairs.
    pub stability: Stability,
}

impl Refresh {
    /// The refresh as `selection/...` metrics.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let s = &self.stability;
        let flip_fraction = if s.rescored == 0 { 0.0 } else { s.flipped as f64 / s.rescored as f64 };
        vec![
            (keys::POOL, self.pool.len() as f64),
            (keys::TARGET, self.target),
            (keys::INFORMATIVE, self.scores.informative as f64),
            (keys::TRIVIAL, self.scores.trivial as f64),
            (keys::UNSTABLE, self.scores.unstable as f64),
            (keys::NOT_FINITE, self.scores.not_finite as f64),
            (keys::RESCORED, s.rescored as f64),
            (keys::FLIPPED, s.flipped as f64),
            (keys::FLIP_FRACTION, flip_fraction),
            (keys::MEAN_ABS_MARGIN_CHANGE, s.mean_abs_change),
        ]
    }
}

impl SageParams {
    /// Rejects invalid values, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: String, expected: &str| {
            Err(TrainError::Config(format!("preference.sage.{field} = {v}: expected {expected}")))
        };
        if self.pool_size == 0 {
            return bad("pool_size", self.pool_size.to_string(), "at least 1");
        }
        if self.refresh_every == 0 {
            return bad("refresh_every", self.refresh_every.to_string(), "at least 1");
        }
        if !(0.0..=0.5).contains(&self.overlap) {
            return bad("overlap", self.overlap.to_string(), "a value in [0, 0.5]");
        }
        if let Some(t) = self.target
            && !t.is_finite()
        {
            return bad("target", t.to_string(), "a finite value (or absent: the objective's own)");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature.to_string(), "a finite value > 0");
        }
        if !(self.trivial_slack >= 0.0 && self.trivial_slack.is_finite()) {
            return bad("trivial_slack", self.trivial_slack.to_string(), "a finite value >= 0");
        }
        if !(self.boundary >= 0.0 && self.boundary.is_finite()) {
            return bad("boundary", self.boundary.to_string(), "a finite value >= 0");
        }
        Ok(())
    }

    /// Checks that a pool can feed every optimiser step (`optimiser_batch` distinct pairs, i.e.
    /// `preference.batch_size * preference.grad_accum`) and, when known, that the preference
    /// split (`split_len` pairs) can fill a pool.
    pub fn validate_sizes(&self, optimiser_batch: usize, split_len: Option<usize>) -> Result<()> {
        if self.pool_size < optimiser_batch {
            return Err(TrainError::Config(format!(
                "preference.sage.pool_size = {} is smaller than preference.batch_size * preference.grad_accum = \
                 {optimiser_batch}: each optimiser step draws that many distinct pairs from the pool",
                self.pool_size
            )));
        }
        if let Some(len) = split_len
            && len < self.pool_size
        {
            return Err(TrainError::Config(format!(
                "preference.sage.pool_size = {} exceeds the {len} pairs of the preference split: expected at most {len}",
                self.pool_size
            )));
        }
        Ok(())
    }

    /// The target margin: `target` if set, else the objective's own.
    pub fn target_for(&self, objective: &Objective) -> Result<f64> {
        match self.target {
            Some(t) => Ok(t),
            None => objective_target(objective),
        }
    }

    /// Pairs carried from one pool to the next: `floor(overlap * pool_size)`.
    pub fn carried(&self) -> usize {
        (self.overlap * self.pool_size as f64).floor() as usize
    }

    /// Scores of a pool (see the module docs); `previous` holds each pair's last score, if any.
    pub fn score(&self, target: f64, margins: &[f64], previous: &[Option<f64>]) -> PoolScores {
        let mut out = PoolScores {
            weights: Vec::with_capacity(margins.len()),
            informative: 0,
            trivial: 0,
            unstable: 0,
            not_finite: 0,
        };
        for (i, &m) in margins.iter().enumerate() {
            let prev = previous.get(i).copied().flatten();
            let weight = if !m.is_finite() {
                out.not_finite += 1;
                0.0
            } else if m >= target + self.trivial_slack {
                out.trivial += 1;
                0.0
            } else if m.abs() < self.boundary && prev.is_some_and(|p| p.is_finite() && opposite_sides(m, p)) {
                out.unstable += 1;
                0.0
            } else {
                1.0 / (1.0 + ((m - target) / self.temperature).exp())
            };
            if weight > 0.0 {
                out.informative += 1;
            }
            out.weights.push(weight);
        }
        out
    }

    /// One refresh: builds the next pool from `draw` (the epoch sampler: `n` -> up to `n` split
    /// indices) and the head of `previous_pool`, scores it with `margins_of` (one margin per pool
    /// entry, in order), and records each pair's margin in `last` (keyed by `id_of(index)`).
    pub fn refresh(
        &self,
        target: f64,
        previous_pool: &[usize],
        mut draw: impl FnMut(usize) -> Vec<usize>,
        id_of: impl Fn(usize) -> u64,
        margins_of: impl FnOnce(&[usize]) -> Result<Vec<f64>>,
        last: &mut HashMap<u64, f64>,
    ) -> Result<Refresh> {
        let carried: Vec<usize> = previous_pool.iter().copied().take(self.carried()).collect();
        let fresh_needed = self.pool_size - carried.len();
        let mut taken: HashSet<usize> = carried.iter().copied().collect();
        let mut pool = Vec::with_capacity(self.pool_size);
        // A draw returns at least one index unless the split is empty; the cap only guards
        // against a split smaller than the pool (rejected by `validate_sizes`).
        for _ in 0..(4 * self.pool_size + 16) {
            if pool.len() == fresh_needed {
                break;
            }
            let batch = draw(fresh_needed - pool.len());
            if batch.is_empty() {
                break;
            }
            pool.extend(batch.into_iter().filter(|&i| taken.insert(i)));
        }
        if pool.len() < fresh_needed {
            return Err(TrainError::Config(format!(
                "SAGE: only {} distinct fresh pairs for a pool of {} (preference.sage.pool_size); the preference \
                 split is too small",
                pool.len() + carried.len(),
                self.pool_size
            )));
        }
        let fresh = pool.len();
        pool.extend(&carried);
        let margins = margins_of(&pool)?;
        if margins.len() != pool.len() {
            return Err(TrainError::Config(format!(
                "SAGE: {} margins for a pool of {} pairs",
                margins.len(),
                pool.len()
            )));
        }
        let previous: Vec<Option<f64>> = pool.iter().map(|&i| last.get(&id_of(i)).copied()).collect();
        let scores = self.score(target, &margins, &previous);
        let before: Vec<f64> = previous[fresh..].iter().map(|p| p.unwrap_or(f64::NAN)).collect();
        let stability = Stability::between(&margins[fresh..], &before);
        for (&i, &m) in pool.iter().zip(&margins) {
            last.insert(id_of(i), m);
        }
        Ok(Refresh { pool, carried: carried.len(), target, margins, scores, stability })
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
    use slime_objectives::{DpoParams, SimpoParams, SlimeParams};

    #[test]
    fn scores_follow_the_documented_rules() {
        let p = SageParams::default(); // temperature 0.5, slack 1, boundary 0.25
        let s = p.score(1.0, &[-3.0, 1.0, 2.5, 0.1, 0.1, f64::NAN], &[None, None, None, Some(-0.2), Some(0.3), None]);
        // Confident error: sigmoid((1 + 3) / 0.5) = sigmoid(8) = 0.9996646498695336.
        assert!((s.weights[0] - 0.999_664_649_869_533_6).abs() < 1e-12);
        // At the target: 0.5. Past target + slack: trivial, 0.
        assert!((s.weights[1] - 0.5).abs() < 1e-15);
        assert_eq!(s.weights[2], 0.0);
        // Flipped sign near the boundary: unstable, 0; same sign near the boundary: kept.
        assert_eq!(s.weights[3], 0.0);
        assert!(s.weights[4] > 0.5);
        assert_eq!(s.weights[5], 0.0);
        assert_eq!((s.informative, s.trivial, s.unstable, s.not_finite), (3, 1, 1, 1));
        // A flip far from the boundary is a large move, not noise: kept.
        assert!(p.score(1.0, &[0.8], &[Some(-0.8)]).weights[0] > 0.0);
        // Monotone: a worse margin never scores lower.
        let sweep: Vec<f64> = (0..50).map(|i| -5.0 + 0.1 * f64::from(i)).collect();
        let ss = p.score(1.0, &sweep, &[]);
        assert!(ss.weights.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn the_target_is_the_objectives_unless_set() {
        let p = SageParams::default();
        assert_eq!(p.target_for(&Objective::Slime(SlimeParams::paper())).expect("slime"), 1.5);
        let simpo = SimpoParams { beta: 2.0, gamma_beta_ratio: 0.25, label_smoothing: 0.0 };
        assert_eq!(p.target_for(&Objective::Simpo(simpo)).expect("simpo"), 0.5);
        assert_eq!(p.target_for(&Objective::Dpo(DpoParams::default())).expect("dpo"), 0.0);
        let fixed = SageParams { target: Some(0.3), ..p };
        assert_eq!(fixed.target_for(&Objective::Slime(SlimeParams::paper())).expect("override"), 0.3);
        // The same margin is trivial for DPO (target 0) but an error for SLIME (target 1.5).
        let m = [1.2];
        assert_eq!(p.score(0.0, &m, &[]).weights[0], 0.0);
        assert!(p.score(1.5, &m, &[]).weights[0] > 0.5);
    }

    /// A sampler over `len` items in order, cycling.
    fn cycling(len: usize) -> impl FnMut(usize) -> Vec<usize> {
        let mut next = 0;
        move |n| {
            let out: Vec<usize> = (next..next + n).map(|i| i % len).collect();
            next += n;
            out
        }
    }

    #[test]
    fn refresh_carries_rescoring_and_filters_the_expected_pairs() {
        let p = SageParams { pool_size: 6, overlap: 0.5, ..SageParams::default() };
        let target = 1.5;
        let mut draw = cycling(20);
        let mut last = HashMap::new();
        let id_of = |i: usize| 1000 + i as u64;
        // Refresh 1: pairs 0..6, margins by index.
        let first = [-2.0, 0.1, 3.0, -0.1, 0.2, 1.0];
        let r1 = p
            .refresh(target, &[], &mut draw, id_of, |pool| Ok(pool.iter().map(|&i| first[i]).collect()), &mut last)
            .expect("refresh 1");
        assert_eq!(r1.pool, [0, 1, 2, 3, 4, 5]);
        assert_eq!(r1.carried, 0);
        assert_eq!(r1.stability.rescored, 0);
        assert_eq!(r1.scores.trivial, 1, "{:?}", r1.scores); // pair 2: 3.0 >= 1.5 + 1
        assert_eq!(r1.scores.unstable, 0); // nothing to compare with yet
        assert_eq!(last[&1001], 0.1);

        // Refresh 2: three fresh pairs (6, 7, 8), then pairs 0, 1, 2 carried and re-scored.
        // Pair 1 flips from 0.1 to -0.05 (unstable), pair 0 moves from -2 to -1, pair 2 from 3 to 2.8.
        let second = |i: usize| match i {
            0 => -1.0,
            1 => -0.05,
            2 => 2.8,
            6 => -0.5,
            7 => 0.05,
            _ => 5.0,
        };
        let r2 = p
            .refresh(
                target,
                &r1.pool,
                &mut draw,
                id_of,
                |pool| Ok(pool.iter().map(|&i| second(i)).collect()),
                &mut last,
            )
            .expect("refresh 2");
        assert_eq!(r2.pool, [6, 7, 8, 0, 1, 2]);
        assert_eq!(r2.carried, 3);
        assert_eq!((r2.stability.rescored, r2.stability.flipped), (3, 1));
        assert!((r2.stability.mean_abs_change - (1.0 + 0.15 + 0.2) / 3.0).abs() < 1e-12, "{:?}", r2.stability);
        assert_eq!((r2.scores.trivial, r2.scores.unstable, r2.scores.informative), (2, 1, 3));
        let positive: Vec<usize> =
            r2.pool.iter().zip(&r2.scores.weights).filter(|(_, w)| **w > 0.0).map(|(&i, _)| i).collect();
        assert_eq!(positive, [6, 7, 0]);
        // A draw of as many pairs as are informative picks exactly them, none uniformly.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (picked, uniform) = draw_weighted(&r2.scores.weights, 3, &mut rng);
        let mut pairs: Vec<usize> = picked.iter().map(|&k| r2.pool[k]).collect();
        pairs.sort_unstable();
        assert_eq!((pairs, uniform), (vec![0, 6, 7], 0));
        let m = r2.metrics();
        assert!(m.contains(&(keys::FLIP_FRACTION, 1.0 / 3.0)), "{m:?}");
        assert!(m.contains(&(keys::UNSTABLE, 1.0)), "{m:?}");

        // Refresh 3 carries the previous pool's fresh head (6, 7, 8), never the carried tail, so
        // no pair is carried twice in a row.
        let r3 = p.refresh(target, &r2.pool, &mut draw, id_of, |pool| Ok(vec![0.0; pool.len()]), &mut last).expect("3");
        assert_eq!(r3.pool, [9, 10, 11, 6, 7, 8]);
        assert_eq!(r3.stability.rescored, 3);
    }

    #[test]
    fn fresh_pairs_skip_the_carried_ones_across_an_epoch_boundary() {
        // A split of 7 in order: the second pool's fresh draw wraps around to 0, 1, 2, which are
        // carried; the pool stays 6 distinct pairs.
        let p = SageParams { pool_size: 6, overlap: 0.5, ..SageParams::default() };
        let mut draw = cycling(7);
        let mut last = HashMap::new();
        let zeros = |pool: &[usize]| Ok(vec![0.0; pool.len()]);
        let r1 = p.refresh(0.0, &[], &mut draw, |i| i as u64, zeros, &mut last).expect("1");
        let r2 = p.refresh(0.0, &r1.pool, &mut draw, |i| i as u64, zeros, &mut last).expect("2");
        assert_eq!(r2.pool, [6, 3, 4, 0, 1, 2]);
        let wrong = p.refresh(0.0, &[], cycling(7), |i| i as u64, |_| Ok(vec![0.0]), &mut last);
        assert!(wrong.expect_err("margin count").to_string().contains("1 margins for a pool of 6"));
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
    fn invalid_parameters_and_sizes_are_rejected_by_name() {
        let msg = |r: Result<()>| r.expect_err("invalid").to_string();
        assert!(
            msg(SageParams { pool_size: 0, ..SageParams::default() }.validate()).contains("preference.sage.pool_size")
        );
        assert!(msg(SageParams { temperature: 0.0, ..SageParams::default() }.validate()).contains("temperature"));
        assert!(
            msg(SageParams { overlap: 0.6, ..SageParams::default() }.validate()).contains("preference.sage.overlap")
        );
        assert!(msg(SageParams { target: Some(f64::NAN), ..SageParams::default() }.validate()).contains("target"));
        assert!(SageParams::default().validate().is_ok());
        let p = SageParams { pool_size: 12, ..SageParams::default() };
        let small = msg(p.validate_sizes(16, None));
        assert!(
            small.contains("pool_size = 12") && small.contains("batch_size * preference.grad_accum = 16"),
            "{small}"
        );
        let split = msg(p.validate_sizes(8, Some(10)));
        assert!(split.contains("exceeds the 10 pairs"), "{split}");
        assert!(p.validate_sizes(12, Some(12)).is_ok());
    }
}
