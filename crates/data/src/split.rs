//! Deterministic splits by seeded content hash: an example's part depends only on its content
//! and the seed, never on file order or row-group size (the paper's disjoint SFT third and
//! preference two thirds).

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::example::PreferenceExample;

/// Which side of a two-way split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitPart {
    /// The `first_fraction` side (e.g. SFT).
    First,
    /// The rest (e.g. preference).
    Second,
}

/// A two-way split: an example goes to [`SplitPart::First`] iff `u(hash, seed) < first_fraction`
/// with `u` uniform on [0, 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashSplit {
    /// Seed mixed into the hash.
    pub seed: u64,
    /// Expected share of the first part, in [0, 1].
    pub first_fraction: f64,
}

impl HashSplit {
    /// A split with `first_fraction` in [0, 1].
    pub fn new(seed: u64, first_fraction: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&first_fraction) {
            return Err(DataError::Config {
                field: "first_fraction".into(),
                detail: format!("{first_fraction} is outside [0, 1]"),
            });
        }
        Ok(Self { seed, first_fraction })
    }

    /// The paper's split: a third for SFT (first), two thirds for preference (second).
    pub fn paper(seed: u64) -> Self {
        Self { seed, first_fraction: 1.0 / 3.0 }
    }

    /// The part `example` belongs to.
    pub fn part(&self, example: &PreferenceExample) -> SplitPart {
        if unit(example.content_hash(), self.seed) < self.first_fraction { SplitPart::First } else { SplitPart::Second }
    }
}

/// splitmix64 of `hash ^ seed`, as a uniform number in [0, 1).
fn unit(hash: u64, seed: u64) -> f64 {
    let mut z = hash ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize) -> PreferenceExample {
        PreferenceExample::Text { prompt: format!("p{i}"), chosen: "a".into(), rejected: "b".into() }
    }

    #[test]
    fn fractions_are_close_and_seeds_differ() {
        let s = HashSplit::paper(7);
        let first = (0..30_000).filter(|&i| s.part(&ex(i)) == SplitPart::First).count();
        assert!((first as f64 / 30_000.0 - 1.0 / 3.0).abs() < 0.01, "{first}");
        let t = HashSplit::paper(8);
        assert!((0..100).any(|i| s.part(&ex(i)) != t.part(&ex(i))));
        assert!(HashSplit::new(0, 1.5).is_err());
    }
}
