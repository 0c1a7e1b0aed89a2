//! Preference data for training: Parquet files in the TRL schemas to chat-templated,
//! tokenized, truncated, right-padded and masked chosen/rejected batches.
//!
//! The pipeline, each stage usable on its own:
//!
//! 1. [`PreferenceReader`] streams a Parquet file, or a directory or glob of shards read in
//!    name order as one dataset ([`parquet_files`]), row group by row group and yields
//!    [`PreferenceExample`]s (TRL standard, conversational / UltraFeedback-binarized, or
//!    implicit prompt; detected from the schema); bad input gives a [`DataError`] naming file,
//!    row group, row and column, or is skipped and counted ([`InvalidRows::Skip`]).
//! 2. [`HashSplit`] assigns each example to a split part by seeded content hash.
//! 3. [`PairEncoder`] renders chat examples with a [`ChatTemplate`] (the tokenizer's
//!    Hugging Face template or a [`BuiltinTemplate`]), tokenizes with a [`TextTokenizer`], and
//!    truncates like TRL ([`Truncation`]), giving [`TokenizedPair`]s.
//! 4. [`PairStream`] / [`load_pairs`] run 1-3 over a file with counts ([`LoaderStats`]);
//!    [`collate_pairs`] / [`collate_sft`] make [`Batch`]es, [`EpochSampler`] orders them
//!    (seeded, length-grouped on request, resumable from a [`Cursor`]).
//!
//! [`write_preferences`] and [`write_logps`] / [`read_logps`] write the same schemas back.
//!
//! No model types and no candle dependency: batches are plain vectors that a training loop
//! turns into tensors.
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
mod encode;
mod error;
mod example;
pub mod fixtures;
mod lengths;
mod pipeline;
mod reader;
mod sampler;
mod schema;
mod split;
mod template;
mod tokenizer;
mod writer;

pub use batch::{Batch, SftBatch, TokenizedPair, collate_pairs, collate_sft};
pub use encode::{EncodeStats, Encoded, PairEncoder, Truncation, TruncationMode};
pub use error::{DataError, Location, Result, RowProblem};
pub use example::{Message, PreferenceExample, Turns};
pub use lengths::{LengthSummary, Overlong, PairLengths, pair_length};
pub use pipeline::{LoaderStats, PairStream, batches, count_padding, load_pairs};
pub use reader::{InvalidRows, PreferenceReader, ReadOptions, ReadStats, Record, parquet_files};
pub use sampler::{Cursor, EpochSampler};
pub use schema::{ColumnNames, Layout, conversational_schema, messages_type, standard_schema};
pub use split::{DegenerateCounts, HashSplit, SplitAudit, SplitPart};
pub use template::{BuiltinTemplate, ChatTemplate};
pub use tokenizer::{SpecialTokens, TextTokenizer};
pub use writer::{PairLogps, PreferenceWriter, message_list, read_logps, write_logps, write_preferences};

/// The arrow version of the schemas and arrays this crate returns ([`standard_schema`],
/// [`message_list`]).
pub use arrow;
/// The tokenizers version of [`TextTokenizer::from_parts`] and [`TextTokenizer::inner`].
pub use tokenizers;
