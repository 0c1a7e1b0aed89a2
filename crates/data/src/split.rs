//! Deterministic splits by seeded content hash: an example's part depends only on its content
//! and the seed, never on file order or row-group size (the paper's disjoint SFT third and
//! preference two thirds).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

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

/// Degenerate rows among those a load assigned to split parts (counted, never dropped):
/// pairs whose chosen completion equals the rejected one (nothing to prefer), rows that repeat an
/// earlier row verbatim (identical rows always land in the same part), and prompts that occur
/// in more than one part with different completions (e.g. a held-out prompt also trained on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DegenerateCounts {
    /// Pairs with `chosen == rejected`.
    pub identical_completions: u64,
    /// Rows equal to an earlier row (prompt, chosen and rejected).
    pub duplicate_rows: u64,
    /// Distinct prompts found in more than one split part.
    pub prompts_in_several_parts: u64,
}

impl DegenerateCounts {
    /// True when nothing degenerate was found.
    pub fn is_clean(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for DegenerateCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pairs with chosen = rejected, {} duplicate rows, {} prompts in several splits",
            self.identical_completions, self.duplicate_rows, self.prompts_in_several_parts
        )
    }
}

/// Finds [`DegenerateCounts`] while rows are assigned to parts (memory: two 64-bit digests per
/// distinct row and prompt).
#[derive(Debug, Clone, Default)]
pub struct SplitAudit {
    counts: DegenerateCounts,
    rows: HashSet<u64>,
    /// Per prompt digest, the parts it was seen in (bit `part`).
    prompt_parts: HashMap<u64, u32>,
}

impl SplitAudit {
    /// Records that `example` went to part number `part` (0..32; any numbering of the parts).
    pub fn record(&mut self, part: usize, example: &PreferenceExample) {
        let (prompt, row, same) = match example {
            PreferenceExample::Text { prompt, chosen, rejected } => {
                (digest(&(0u8, prompt)), digest(&(0u8, prompt, chosen, rejected)), chosen == rejected)
            }
            PreferenceExample::Chat { prompt, chosen, rejected } => {
                (digest(&(1u8, prompt)), digest(&(1u8, prompt, chosen, rejected)), chosen == rejected)
            }
        };
        self.counts.identical_completions += u64::from(same);
        if !self.rows.insert(row) {
            self.counts.duplicate_rows += 1;
        }
        let bit = 1u32 << part.min(31);
        let parts = self.prompt_parts.entry(prompt).or_default();
        if *parts != 0 && *parts & bit == 0 && parts.count_ones() == 1 {
            self.counts.prompts_in_several_parts += 1;
        }
        *parts |= bit;
    }

    /// The counts so far.
    pub fn counts(&self) -> DegenerateCounts {
        self.counts
    }
}

fn digest(value: &(impl Hash + ?Sized)) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
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
