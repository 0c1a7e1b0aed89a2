//! Seeded per-epoch shuffling with a resumable cursor: every item of an epoch is yielded
//! exactly once, and a sampler restored from a cursor continues with exactly the items an
//! uninterrupted one would have produced.

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
}

impl EpochSampler {
    /// A sampler over `len` items starting at `cursor`.
    pub fn new(len: usize, seed: u64, cursor: Cursor) -> Self {
        let order = permutation(len, seed, cursor.epoch);
        Self { len, seed, cursor, order }
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
        }
        let end = (self.cursor.position + batch_size).min(self.len);
        let out = self.order[self.cursor.position..end].to_vec();
        self.cursor.position = end;
        out
    }
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

    #[test]
    fn epochs_are_shuffled_differently() {
        let mut s = EpochSampler::new(50, 1, Cursor::default());
        let (first, second) = (s.next_batch(50), s.next_batch(50));
        assert_ne!(first, second);
        assert_eq!(s.cursor(), Cursor { epoch: 1, position: 50 });
    }
}
