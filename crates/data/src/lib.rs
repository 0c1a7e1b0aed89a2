//! Preference data for training: tokenized pairs to right-padded, masked batches, and a seeded,
//! resumable sampler.
//!
//! No model types and no candle dependency: batches are plain vectors that a training loop turns
//! into tensors. Today: [`collate_pairs`] / [`collate_sft`] and [`EpochSampler`]. Planned (see
//! the data issue): streaming Parquet in the TRL schemas, chat templates and tokenization.
//!
//! ```
//! use slime_data::{collate_pairs, TokenizedPair};
//!
//! let pair = TokenizedPair { id: 0, prompt: vec![1, 2], chosen: vec![3], rejected: vec![4, 5] };
//! let batch = collate_pairs(&[&pair], 0);
//! assert_eq!(batch.rows, 2); // chosen row, then rejected row
//! assert_eq!(batch.input_ids, [1, 2, 3, 0, 1, 2, 4, 5]);
//! assert_eq!(batch.completion_mask, [0, 0, 1, 0, 0, 0, 1, 1]);
//! ```

mod batch;
mod sampler;

pub use batch::{Batch, PreferenceBatch, SftBatch, TokenizedPair, collate_pairs, collate_sft};
pub use sampler::{Cursor, EpochSampler};
