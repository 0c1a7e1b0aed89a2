//! Seeded per-epoch shuffling with a resumable cursor: every item of an epoch is yielded
//! exactly once, and a sampler restored from a cursor continues with exactly the items an
//! uninterrupted one would have produced.
//!
//! Optional length grouping (TRL's `group_by_length`): each epoch's permutation is cut into
//! windows of `window` items and each window sorted by length, longest first, so that batches
//! drawn from it hold similar lengths and need less padding; the order stays a pure function of
//! (seed, epoch, lengths), so resuming still works.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where a sampler stands: the epoch and the position within its permutation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Items of this epoch already yielded.
    pub position: usize,
}

/// Batches of indices into `0..len`, reshuffled each epoch from `(seed, epoch)`.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    len: usize,
    seed: u64,
    cursor: Cursor,
    order: Vec<usize>,
    groups: Option<(Vec<usize>, usize)>,
}

impl EpochSampler {
    /// A sampler over `len` items starting at `cursor`.
    pub fn new(len: usize, seed: u64, cursor: Cursor) -> Self {
        let order = permutation(len, seed, cursor.epoch);
        Self { len, seed, cursor, order, groups: None }
    }

    /// A length-grouped sampler: `lengths[i]` is item `i`'s length, `window` items (a multiple
    /// of the batch size, e.g. 50 batches) are sorted by length within each window.
    pub fn grouped_by_length(lengths: Vec<usize>, window: usize, seed: u64, cursor: Cursor) -> Self {
        let len = lengths.len();
        let window = window.max(1);
        let order = grouped(permutation(len, seed, cursor.epoch), &lengths, window);
        Self { len, seed, cursor, order, groups: Some((lengths, window)) }
    }

    /// The cursor to save for resuming.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next `batch_size` indices; a batch never spans two epochs (the last batch of an epoch
    /// may be smaller). Empty only when `len == 0`.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        if self.len == 0 || batch_size == 0 {
            return Vec::new();
        }
        if self.cursor.position >= self.len {
            self.cursor = Cursor { epoch: self.cursor.epoch + 1, position: 0 };
            self.order = permutation(self.len, self.seed, self.cursor.epoch);
            if let Some((lengths, window)) = &self.groups {
                self.order = grouped(std::mem::take(&mut self.order), lengths, *window);
            }
        }
        let end = (self.cursor.position + batch_size).min(self.len);
        let out = self.order[self.cursor.position..end].to_vec();
        self.cursor.position = end;
        out
    }
}

fn grouped(mut order: Vec<usize>, lengths: &[usize], window: usize) -> Vec<usize> {
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    }
    order
}

fn permutation(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_item_once_per_epoch_and_resume_is_identical(len in 1usize..60, batch in 1usize..17, cut in 0usize..40, seed in 0u64..1000) {
            let mut s = EpochSampler::new(len, seed, Cursor::default());
            let mut seen = vec![0usize; len];
            let mut taken = 0;
            while taken < len {
                for i in s.next_batch(batch) { seen[i] += 1; taken += 1; }
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
            // Resume after `cut` batches: the remaining stream equals the uninterrupted one.
            let mut a = EpochSampler::new(len, seed, Cursor::default());
            for _ in 0..cut { a.next_batch(batch); }
            let mut b = EpochSampler::new(len, seed, a.cursor());
            for _ in 0..10 { prop_assert_eq!(a.next_batch(batch), b.next_batch(batch)); }
        }
    }

    proptest! {
        #[test]
        fn length_grouping_keeps_every_item_once_and_resumes(lengths in proptest::collection::vec(1usize..200, 1..80), batch in 1usize..9, cut in 0usize..30) {
            let len = lengths.len();
            let mut s = EpochSampler::grouped_by_length(lengths.clone(), 4 * batch, 3, Cursor::default());
            let mut seen = vec![0usize; len];
            for _ in 0..len.div_ceil(batch) {
                for i in s.next_batch(batch) { seen[i] += 1; }
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
            let mut a = EpochSampler::grouped_by_length(lengths.clone(), 4 * batch, 3, Cursor::default());
            for _ in 0..cut { a.next_batch(batch); }
            let mut b = EpochSampler::grouped_by_length(lengths, 4 * batch, 3, a.cursor());
            for _ in 0..10 { prop_assert_eq!(a.next_batch(batch), b.next_batch(batch)); }
        }
    }

    #[test]
    fn length_grouping_reduces_padding() {
        let lengths: Vec<usize> = (0..400).map(|i| 10 + (i * 7919) % 300).collect();
        let padding = |s: &mut EpochSampler| -> usize {
            (0..50)
                .map(|_| {
                    let b = s.next_batch(8);
                    let max = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                    b.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let plain = padding(&mut EpochSampler::new(400, 1, Cursor::default()));
        let grouped = padding(&mut EpochSampler::grouped_by_length(lengths.clone(), 64, 1, Cursor::default()));
        assert!(grouped * 3 < plain, "grouped padding {grouped} vs plain {plain}");
    }

    #[test]
    fn epochs_are_shuffled_differently() {
        let mut s = EpochSampler::new(50, 1, Cursor::default());
        let (first, second) = (s.next_batch(50), s.next_batch(50));
        assert_ne!(first, second);
        assert_eq!(s.cursor(), Cursor { epoch: 1, position: 50 });
    }
}
