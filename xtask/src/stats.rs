//! Percentile-bootstrap 95% confidence intervals for metrics measured per held-out item and
//! per seed.
//!
//! A metric's values are `values[s][i]`: seed `s`, held-out item `i` (a run-level metric such
//! as the chosen log-prob drift has one item per seed). The estimate is the mean over seeds of
//! each seed's item mean. One bootstrap resample draws the seeds with replacement, then, within
//! each drawn seed, its items with replacement, and recomputes the estimate; the interval is the
//! `(1 - level) / 2` and `(1 + level) / 2` quantiles of the resampled estimates (linear
//! interpolation between order statistics). Resampling both levels lets the interval carry the
//! seed-to-seed spread as well as the item-to-item spread; with one seed only items are
//! resampled.
//!
//! The paired variant compares a variant with a baseline run on the same seeds and items: it
//! bootstraps the per-item differences `variant[s][i] - baseline[s][i]`, so what the two share
//! (item difficulty, seed) cancels. A difference is resolved at the level when its interval
//! excludes 0.
//!
//! Resamples come from a ChaCha8 generator seeded by the caller: the same inputs and seed give
//! the same interval.

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Resamples used unless a caller asks for another number.
pub const DEFAULT_RESAMPLES: usize = 2000;

/// A point estimate with its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// The estimate: the mean over seeds of the per-seed item means.
    pub mean: f64,
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

impl Interval {
    /// Whether `x` lies outside the interval (for a difference: resolved against `x = 0`).
    pub fn excludes(&self, x: f64) -> bool {
        x < self.low || x > self.high
    }

    /// Whether the two intervals share a point.
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.low <= other.high && other.low <= self.high
    }
}

/// How to bootstrap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bootstrap {
    /// Resamples (at least 1).
    pub resamples: usize,
    /// Coverage, in (0, 1) (0.95 for a 95% interval).
    pub level: f64,
    /// Seed of the resampling generator.
    pub seed: u64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Self { resamples: DEFAULT_RESAMPLES, level: 0.95, seed: 0 }
    }
}

fn check(values: &[Vec<f64>], what: &str) -> Result<()> {
    if values.is_empty() {
        bail!("{what}: no seeds");
    }
    for (s, items) in values.iter().enumerate() {
        if items.is_empty() {
            bail!("{what}: seed {s} has no items");
        }
        if let Some(i) = items.iter().position(|v| !v.is_finite()) {
            bail!("{what}: seed {s}, item {i} is {} (expected a finite value)", items[i]);
        }
    }
    Ok(())
}

/// Mean over seeds of the per-seed item means.
fn estimate(values: &[Vec<f64>]) -> f64 {
    values.iter().map(|items| items.iter().sum::<f64>() / items.len() as f64).sum::<f64>() / values.len() as f64
}

/// The `q` quantile of sorted `xs` by linear interpolation between order statistics.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Bootstrap {
    /// The interval of the mean of `values[s][i]` (seeds, then items; see the module docs).
    pub fn mean(&self, values: &[Vec<f64>]) -> Result<Interval> {
        check(values, "bootstrap")?;
        if self.resamples == 0 {
            bail!("bootstrap: resamples = 0 (expected at least 1)");
        }
        if !(self.level > 0.0 && self.level < 1.0) {
            bail!("bootstrap: level = {} (expected a value in (0, 1))", self.level);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let seeds = values.len();
        let mut estimates: Vec<f64> = (0..self.resamples)
            .map(|_| {
                let mut total = 0.0;
                for _ in 0..seeds {
                    let items = &values[rng.random_range(0..seeds)];
                    let sum: f64 = (0..items.len()).map(|_| items[rng.random_range(0..items.len())]).sum();
                    total += sum / items.len() as f64;
                }
                total / seeds as f64
            })
            .collect();
        estimates.sort_by(f64::total_cmp);
        let tail = (1.0 - self.level) / 2.0;
        Ok(Interval { mean: estimate(values), low: quantile(&estimates, tail), high: quantile(&estimates, 1.0 - tail) })
    }

    /// The interval of the mean paired difference `variant[s][i] - baseline[s][i]`; both must
    /// have the same seeds and, per seed, the same items in the same order.
    pub fn paired_difference(&self, variant: &[Vec<f64>], baseline: &[Vec<f64>]) -> Result<Interval> {
        if variant.len() != baseline.len() {
            bail!("paired bootstrap: {} seeds against {} in the baseline", variant.len(), baseline.len());
        }
        let mut differences = Vec::with_capacity(variant.len());
        for (s, (v, b)) in variant.iter().zip(baseline).enumerate() {
            if v.len() != b.len() {
                bail!("paired bootstrap: seed {s} has {} items against {} in the baseline", v.len(), b.len());
            }
            differences.push(v.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f64>>());
        }
        check(variant, "paired bootstrap (variant)")?;
        check(baseline, "paired bootstrap (baseline)")?;
        self.mean(&differences)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` draws from N(mean, sd^2) (Box-Muller on a seeded generator).
    fn normal(n: usize, mean: f64, sd: f64, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect()
    }

    #[test]
    fn constant_data_gives_a_zero_width_interval() {
        let i = Bootstrap::default().mean(&[vec![0.75; 40], vec![0.75; 40], vec![0.75; 40]]).expect("ci");
        assert_eq!(i, Interval { mean: 0.75, low: 0.75, high: 0.75 });
    }

    #[test]
    fn a_normal_samples_interval_covers_the_mean_with_the_textbook_width() {
        let n = 400;
        let i = Bootstrap::default().mean(&[normal(n, 5.0, 2.0, 1)]).expect("ci");
        assert!(i.low < 5.0 && 5.0 < i.high, "{i:?}");
        assert!(i.low < i.mean && i.mean < i.high);
        // Textbook: 2 * 1.96 * sd / sqrt(n) = 0.392.
        let width = i.high - i.low;
        assert!((width - 0.392).abs() < 0.06, "width {width}");
    }

    #[test]
    fn ninety_five_percent_intervals_cover_about_ninety_five_percent_of_the_time() {
        let b = Bootstrap { resamples: 1000, ..Bootstrap::default() };
        let trials = 200u64;
        let covered =
            (0..trials).filter(|&t| !b.mean(&[normal(60, 0.0, 1.0, 100 + t)]).expect("ci").excludes(0.0)).count();
        // Binomial(200, 0.95): mean 190, sd 3.1; the percentile bootstrap runs slightly narrow
        // at n = 60.
        assert!((176..=199).contains(&covered), "{covered} of {trials}");
    }

    #[test]
    fn seed_to_seed_spread_widens_the_interval() {
        // Three seeds whose means differ by 1: the interval must reflect it, unlike a bootstrap
        // over the pooled items.
        let seeds: Vec<Vec<f64>> = (0..3).map(|s| normal(100, f64::from(s), 0.5, 7 + s as u64)).collect();
        let nested = Bootstrap::default().mean(&seeds).expect("nested");
        let pooled = Bootstrap::default().mean(&[seeds.concat()]).expect("pooled");
        assert!((nested.mean - pooled.mean).abs() < 1e-12);
        assert!(nested.high - nested.low > 3.0 * (pooled.high - pooled.low), "{nested:?} vs {pooled:?}");
    }

    #[test]
    fn paired_differences() {
        let a = vec![normal(50, 1.0, 1.0, 3), normal(50, 1.0, 1.0, 4)];
        let same = Bootstrap::default().paired_difference(&a, &a).expect("same");
        assert_eq!(same, Interval { mean: 0.0, low: 0.0, high: 0.0 });
        assert!(!same.excludes(0.0));
        // A constant shift: exact, however noisy the items.
        let shifted: Vec<Vec<f64>> = a.iter().map(|s| s.iter().map(|x| x + 0.25).collect()).collect();
        let d = Bootstrap::default().paired_difference(&shifted, &a).expect("shift");
        assert!((d.mean - 0.25).abs() < 1e-12 && (d.low - 0.25).abs() < 1e-12 && (d.high - 0.25).abs() < 1e-12);
        assert!(d.excludes(0.0));
        // Pairing removes the shared item noise: a small real shift is resolved although the two
        // unpaired intervals overlap.
        let items = normal(200, 0.0, 3.0, 9);
        let base = vec![items.clone()];
        let better = vec![items.iter().zip(normal(200, 0.3, 0.3, 10)).map(|(x, e)| x + e).collect::<Vec<f64>>()];
        let b = Bootstrap::default();
        assert!(b.mean(&better).expect("better").overlaps(&b.mean(&base).expect("base")));
        assert!(b.paired_difference(&better, &base).expect("paired").excludes(0.0));
    }

    #[test]
    fn deterministic_per_seed() {
        let data = [normal(30, 0.0, 1.0, 5)];
        let b = Bootstrap::default();
        assert_eq!(b.mean(&data).expect("a"), b.mean(&data).expect("b"));
        assert_ne!(b.mean(&data).expect("a"), Bootstrap { seed: 1, ..b }.mean(&data).expect("c"));
    }

    #[test]
    fn bad_input_is_named() {
        let b = Bootstrap::default();
        let msg = |r: Result<Interval>| r.expect_err("bad").to_string();
        assert!(msg(b.mean(&[])).contains("no seeds"));
        assert!(msg(b.mean(&[vec![1.0], vec![]])).contains("seed 1 has no items"));
        assert!(msg(b.mean(&[vec![1.0, f64::NAN]])).contains("seed 0, item 1 is NaN"));
        assert!(msg(b.paired_difference(&[vec![1.0]], &[vec![1.0], vec![2.0]])).contains("1 seeds against 2"));
        assert!(msg(b.paired_difference(&[vec![1.0]], &[vec![1.0, 2.0]])).contains("seed 0 has 1 items against 2"));
        assert!(msg(Bootstrap { level: 1.0, ..b }.mean(&[vec![1.0]])).contains("level"));
    }
}
