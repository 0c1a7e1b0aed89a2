//! Collating tokenized pairs into right-padded, masked batches.
//!
//! Layout (row-major `[rows, seq_len]`): an SFT batch has one row per pair (prompt + chosen);
//! [`collate_pairs`] gives `n` pairs `rows = 2n`, chosen sequences first (`0..n`), then the
//! rejected ones (`n..2n`) in the same pair order, for code that scores rows one by one (the
//! trainer packs a preference batch around each pair's prompt instead, from the
//! [`TokenizedPair`]s). `completion_mask[r, t] = 1` iff token `t` of row `r` is a completion
//! token, i.e. a token whose log-prob the model predicts from position `t - 1`; prompt and
//! padding positions are 0, and position 0 never counts.

use serde::{Deserialize, Serialize};

/// One pair after tokenization: the shared prompt and the two completions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedPair {
    /// Stable id of the pair (for resume, selection and reference caches).
    pub id: u64,
    /// Prompt tokens (at least one, so a completion token is never at position 0).
    pub prompt: Vec<u32>,
    /// Chosen completion tokens (at least one).
    pub chosen: Vec<u32>,
    /// Rejected completion tokens (at least one).
    pub rejected: Vec<u32>,
}

/// Right-padded token ids with attention and completion masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[rows, seq_len]` token ids; padding positions hold the pad id.
    pub input_ids: Vec<u32>,
    /// `[rows, seq_len]`, 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// `[rows, seq_len]`, 1 for completion tokens (see the module docs).
    pub completion_mask: Vec<u8>,
    /// Number of rows.
    pub rows: usize,
    /// Padded length.
    pub seq_len: usize,
    /// Completion tokens per row.
    pub completion_lens: Vec<u32>,
    /// Pair id of each pair (preference) or sequence (SFT), in row order of the first half.
    pub pair_ids: Vec<u64>,
}

/// The SFT-batch contract name: one row per pair (prompt + chosen), same layout semantics.
pub type SftBatch = Batch;

impl Batch {
    /// Fraction of positions that are padding.
    pub fn padding_fraction(&self) -> f64 {
        let real: usize = self.attention_mask.iter().map(|&m| usize::from(m)).sum();
        1.0 - real as f64 / (self.rows * self.seq_len).max(1) as f64
    }

    /// Real (non-padding) tokens.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().map(|&m| usize::from(m)).sum()
    }
}

/// Rows of `(prompt, completion)` into one batch.
fn collate_rows(rows: &[(&[u32], &[u32])], pad_id: u32, pair_ids: Vec<u64>) -> Batch {
    let seq_len = rows.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0);
    let n = rows.len();
    let mut batch = Batch {
        input_ids: vec![pad_id; n * seq_len],
        attention_mask: vec![0; n * seq_len],
        completion_mask: vec![0; n * seq_len],
        rows: n,
        seq_len,
        completion_lens: Vec::with_capacity(n),
        pair_ids,
    };
    for (r, (prompt, completion)) in rows.iter().enumerate() {
        let base = r * seq_len;
        for (t, &id) in prompt.iter().chain(completion.iter()).enumerate() {
            batch.input_ids[base + t] = id;
            batch.attention_mask[base + t] = 1;
            // A completion token at position 0 (empty prompt) has nothing to be predicted from.
            if t >= prompt.len() && t > 0 {
                batch.completion_mask[base + t] = 1;
            }
        }
        let counted = batch.completion_mask[base..base + seq_len].iter().map(|&m| u32::from(m)).sum();
        batch.completion_lens.push(counted);
    }
    batch
}

/// A preference batch: chosen rows `0..n`, rejected rows `n..2n`.
pub fn collate_pairs(pairs: &[&TokenizedPair], pad_id: u32) -> Batch {
    let mut rows: Vec<(&[u32], &[u32])> = pairs.iter().map(|p| (p.prompt.as_slice(), p.chosen.as_slice())).collect();
    rows.extend(pairs.iter().map(|p| (p.prompt.as_slice(), p.rejected.as_slice())));
    collate_rows(&rows, pad_id, pairs.iter().map(|p| p.id).collect())
}

/// An SFT batch: one row per pair, prompt + chosen.
pub fn collate_sft(pairs: &[&TokenizedPair], pad_id: u32) -> Batch {
    let rows: Vec<(&[u32], &[u32])> = pairs.iter().map(|p| (p.prompt.as_slice(), p.chosen.as_slice())).collect();
    collate_rows(&rows, pad_id, pairs.iter().map(|p| p.id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair(id: u64, p: usize, c: usize, r: usize) -> TokenizedPair {
        TokenizedPair {
            id,
            prompt: (0..p as u32).map(|i| 100 + i).collect(),
            chosen: (0..c as u32).map(|i| 200 + i).collect(),
            rejected: (0..r as u32).map(|i| 300 + i).collect(),
        }
    }

    #[test]
    fn layout_is_chosen_then_rejected_right_padded() {
        let (a, b) = (pair(7, 2, 1, 3), pair(9, 1, 2, 1));
        let batch = collate_pairs(&[&a, &b], 0);
        assert_eq!((batch.rows, batch.seq_len), (4, 5));
        let row = |r: usize| &batch.input_ids[r * 5..(r + 1) * 5];
        assert_eq!(row(0), [100, 101, 200, 0, 0]);
        assert_eq!(row(2), [100, 101, 300, 301, 302]);
        assert_eq!(row(3), [100, 300, 0, 0, 0]);
        assert_eq!(&batch.completion_mask[0..5], [0, 0, 1, 0, 0]);
        assert_eq!(&batch.attention_mask[15..20], [1, 1, 0, 0, 0]);
        assert_eq!(batch.completion_lens, [1, 2, 3, 1]);
        assert_eq!(batch.pair_ids, [7, 9]);
        // Real tokens 3 + 3 + 5 + 2 = 13 of 20.
        assert!((batch.padding_fraction() - 7.0 / 20.0).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn masks_cover_exactly_the_completions(
            shapes in prop::collection::vec((1usize..6, 1usize..6, 1usize..6), 1..6),
        ) {
            let pairs: Vec<TokenizedPair> = shapes.iter().enumerate().map(|(i, &(p, c, r))| pair(i as u64, p, c, r)).collect();
            let refs: Vec<&TokenizedPair> = pairs.iter().collect();
            let batch = collate_pairs(&refs, 0);
            let n = pairs.len();
            for (r, p) in pairs.iter().chain(pairs.iter()).enumerate() {
                let completion = if r < n { &p.chosen } else { &p.rejected };
                let row = r * batch.seq_len;
                let masked: Vec<u32> = (0..batch.seq_len)
                    .filter(|&t| batch.completion_mask[row + t] == 1)
                    .map(|t| batch.input_ids[row + t])
                    .collect();
                prop_assert_eq!(&masked, completion);
                prop_assert_eq!(batch.completion_lens[r] as usize, completion.len());
                let real: usize = batch.attention_mask[row..row + batch.seq_len].iter().map(|&m| usize::from(m)).sum();
                prop_assert_eq!(real, p.prompt.len() + completion.len());
            }
        }
    }
}
