//! Pair lengths against a length limit: the distribution of untruncated lengths, and the policy
//! for a pair that does not fit ([`Overlong`]).
//!
//! A pair's length is its prompt plus its longer completion, in tokens: the longest sequence
//! the pair puts through the model, the quantity TRL's `max_length` bounds.

use serde::{Deserialize, Serialize};

/// What to do with a pair that does not fit the limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Cut it to the limits ([`crate::Truncation`]), as TRL does.
    #[default]
    Truncate,
    /// Leave it out and count it: a cut pair can lose its end-of-turn token, and a cut
    /// completion is not the response the preference was given for.
    Drop,
}

/// The length of a pair: prompt plus the longer completion.
pub fn pair_length(prompt: usize, chosen: usize, rejected: usize) -> usize {
    prompt + chosen.max(rejected)
}

/// Collects pair lengths (see [`pair_length`]) and summarises them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairLengths {
    lengths: Vec<usize>,
}

/// The distribution of pair lengths: quantiles by the nearest-rank rule (the smallest length
/// with at least that share of pairs at or below it), and how many pairs fit a limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LengthSummary {
    /// Pairs measured.
    pub pairs: u64,
    /// Median length.
    pub median: usize,
    /// 75th percentile.
    pub p75: usize,
    /// 90th percentile.
    pub p90: usize,
    /// Longest pair.
    pub max: usize,
    /// The limit the pairs were measured against (`None`: no limit).
    pub max_length: Option<usize>,
    /// Pairs no longer than the limit (all of them without a limit).
    pub fitting: u64,
}

impl PairLengths {
    /// Records one pair's length.
    pub fn record(&mut self, length: usize) {
        self.lengths.push(length);
    }

    /// Adds `other`'s lengths.
    pub fn merge(&mut self, other: &PairLengths) {
        self.lengths.extend_from_slice(&other.lengths);
    }

    /// Pairs recorded.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether no pair was recorded.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// The summary against `max_length` (all zero when nothing was recorded).
    pub fn summary(&self, max_length: Option<usize>) -> LengthSummary {
        let mut sorted = self.lengths.clone();
        sorted.sort_unstable();
        let rank = |q: f64| -> usize {
            if sorted.is_empty() {
                return 0;
            }
            let k = (q * sorted.len() as f64).ceil() as usize;
            sorted[k.clamp(1, sorted.len()) - 1]
        };
        let fitting = max_length.map_or(sorted.len(), |m| sorted.partition_point(|&l| l <= m));
        LengthSummary {
            pairs: sorted.len() as u64,
            median: rank(0.5),
            p75: rank(0.75),
            p90: rank(0.9),
            max: sorted.last().copied().unwrap_or(0),
            max_length,
            fitting: fitting as u64,
        }
    }
}

impl std::fmt::Display for LengthSummary {
    /// `"median 588, p75 1125, p90 1579, max 3548 tokens; 295 of 300 fit max_length 512"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "median {}, p75 {}, p90 {}, max {} tokens", self.median, self.p75, self.p90, self.max)?;
        match self.max_length {
            Some(m) => write!(f, "; {} of {} fit max_length {m}", self.fitting, self.pairs),
            None => write!(f, "; {} pairs, no length limit", self.pairs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles_and_fitting_counts() {
        let mut l = PairLengths::default();
        for x in [10, 1, 9, 2, 8, 3, 7, 4, 6, 5] {
            l.record(x);
        }
        let s = l.summary(Some(7));
        // Sorted 1..=10: median rank ceil(5) = 5th -> 5; p75 ceil(7.5) = 8th -> 8; p90 9th -> 9.
        assert_eq!((s.pairs, s.median, s.p75, s.p90, s.max, s.fitting), (10, 5, 8, 9, 10, 7));
        assert_eq!(s.to_string(), "median 5, p75 8, p90 9, max 10 tokens; 7 of 10 fit max_length 7");
        assert_eq!(l.summary(None).fitting, 10);
        assert_eq!(
            PairLengths::default().summary(Some(3)),
            LengthSummary { max_length: Some(3), ..Default::default() }
        );
        let mut one = PairLengths::default();
        one.record(42);
        let s = one.summary(Some(41));
        assert_eq!((s.median, s.p90, s.max, s.fitting), (42, 42, 42, 0));
    }

    #[test]
    fn a_pair_is_as_long_as_its_prompt_and_longer_completion() {
        assert_eq!(pair_length(100, 20, 35), 135);
        assert_eq!(pair_length(1, 9, 2), 10);
    }
}
