//! Parquet file -> split filter -> template + tokenize + truncate -> pairs -> batches, streamed
//! in chunks of rows (tokenized in parallel, results kept in file order), so memory is bounded
//! by a chunk and a row group, not by the file.

use std::collections::VecDeque;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::batch::{Batch, TokenizedPair, collate_pairs};
use crate::encode::{EncodeStats, Encoded, PairEncoder};
use crate::error::{DataError, Result};
use crate::reader::{PreferenceReader, ReadOptions, ReadStats};
use crate::split::{DegenerateCounts, HashSplit, SplitAudit, SplitPart};

/// Rows read and tokenized per chunk.
const CHUNK_ROWS: usize = 512;

/// Everything a load did: rows read and skipped, rows left to the other split, truncation,
/// tokens, and (once batched) padding.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoaderStats {
    /// The reader's counts (rows read, skipped by reason).
    pub read: ReadStats,
    /// Rows that belong to the other part of the split.
    pub other_split: u64,
    /// Encoding counts (pairs, truncated, skipped by reason, tokens).
    pub encode: EncodeStats,
    /// Token positions in batches (real + padding).
    pub batch_positions: u64,
    /// Padding positions in batches.
    pub padding_positions: u64,
    /// Degenerate rows among the rows read (all parts of the split; parts as in
    /// [`SplitPart`]).
    pub degenerate: DegenerateCounts,
}

impl LoaderStats {
    /// Fraction of batch positions that are padding.
    pub fn padding_fraction(&self) -> f64 {
        self.padding_positions as f64 / self.batch_positions.max(1) as f64
    }
}

impl std::fmt::Display for LoaderStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let skipped = |m: &std::collections::BTreeMap<crate::RowProblem, u64>| {
            m.iter().map(|(k, v)| format!("{}={v}", k.name())).collect::<Vec<_>>().join(", ")
        };
        write!(
            f,
            "rows read {}, skipped on read {} [{}], other split {}, pairs {}, skipped on encode {} [{}], \
             truncated {} (prompt {}, completion {}), tokens {}, padding {:.1}%; degenerate: {}",
            self.read.rows_read,
            self.read.skipped.values().sum::<u64>(),
            skipped(&self.read.skipped),
            self.other_split,
            self.encode.pairs,
            self.encode.skipped.values().sum::<u64>(),
            skipped(&self.encode.skipped),
            self.encode.truncated_pairs,
            self.encode.truncated_prompts,
            self.encode.truncated_completions,
            self.encode.tokens,
            100.0 * self.padding_fraction(),
            self.degenerate,
        )
    }
}

/// Streams the tokenized pairs of a Parquet file (pair id = row index in the file).
pub struct PairStream<'a> {
    reader: PreferenceReader,
    encoder: &'a PairEncoder,
    split: Option<(HashSplit, SplitPart)>,
    ready: VecDeque<TokenizedPair>,
    pending_error: Option<DataError>,
    other_split: u64,
    encode: EncodeStats,
    audit: SplitAudit,
}

impl<'a> PairStream<'a> {
    /// Opens `path`; with `split`, keeps only the rows of that part.
    pub fn open(
        path: impl AsRef<Path>,
        options: ReadOptions,
        encoder: &'a PairEncoder,
        split: Option<(HashSplit, SplitPart)>,
    ) -> Result<Self> {
        Ok(Self {
            reader: PreferenceReader::open(path, options)?,
            encoder,
            split,
            ready: VecDeque::new(),
            pending_error: None,
            other_split: 0,
            encode: EncodeStats::default(),
            audit: SplitAudit::default(),
        })
    }

    /// Counts so far.
    pub fn stats(&self) -> LoaderStats {
        LoaderStats {
            read: self.reader.stats().clone(),
            other_split: self.other_split,
            encode: self.encode.clone(),
            degenerate: self.audit.counts(),
            ..LoaderStats::default()
        }
    }

    /// Reads and encodes the next chunk of rows into `ready`. Returns false at the end.
    fn fill(&mut self) -> Result<bool> {
        let mut records = Vec::with_capacity(CHUNK_ROWS);
        for item in self.reader.by_ref() {
            match item {
                Ok(r) => {
                    if let Some((split, part)) = &self.split {
                        let own = split.part(&r.example);
                        self.audit.record(own as usize, &r.example);
                        if own != *part {
                            self.other_split += 1;
                            continue;
                        }
                    } else {
                        self.audit.record(0, &r.example);
                    }
                    records.push(r);
                    if records.len() == CHUNK_ROWS {
                        break;
                    }
                }
                Err(e) => {
                    self.pending_error = Some(e);
                    break;
                }
            }
        }
        if records.is_empty() {
            return Ok(false);
        }
        let encoder = self.encoder;
        let encoded: Vec<Result<Encoded>> = records.par_iter().map(|r| encoder.encode(r.row, &r.example)).collect();
        for outcome in encoded {
            let outcome = outcome?;
            self.encode.record(&outcome);
            if let Encoded::Pair { pair, .. } = outcome {
                self.ready.push_back(pair);
            }
        }
        Ok(true)
    }
}

impl Iterator for PairStream<'_> {
    type Item = Result<TokenizedPair>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(pair) = self.ready.pop_front() {
                return Some(Ok(pair));
            }
            if let Some(e) = self.pending_error.take() {
                return Some(Err(e));
            }
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return self.pending_error.take().map(Err),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Loads every pair of a file (or of one split part) into memory, with the load's counts.
pub fn load_pairs(
    path: impl AsRef<Path>,
    options: ReadOptions,
    encoder: &PairEncoder,
    split: Option<(HashSplit, SplitPart)>,
) -> Result<(Vec<TokenizedPair>, LoaderStats)> {
    let mut stream = PairStream::open(path, options, encoder, split)?;
    let pairs = stream.by_ref().collect::<Result<Vec<_>>>()?;
    Ok((pairs, stream.stats()))
}

/// Collates a stream of pairs into preference batches of `pairs_per_batch` pairs (the last may
/// be smaller), adding padding counts to `stats`.
pub fn batches<I>(pairs: I, pairs_per_batch: usize, pad_id: u32) -> impl Iterator<Item = Result<Batch>>
where
    I: Iterator<Item = Result<TokenizedPair>>,
{
    let mut pairs = pairs.peekable();
    std::iter::from_fn(move || {
        let mut chunk = Vec::with_capacity(pairs_per_batch);
        while chunk.len() < pairs_per_batch.max(1) {
            match pairs.next()? {
                Ok(p) => chunk.push(p),
                Err(e) => return Some(Err(e)),
            }
            if pairs.peek().is_none() {
                break;
            }
        }
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        Some(Ok(collate_pairs(&refs, pad_id)))
    })
}

/// Adds a batch's real and padding positions to `stats`.
pub fn count_padding(stats: &mut LoaderStats, batch: &Batch) {
    let positions = (batch.rows * batch.seq_len) as u64;
    stats.batch_positions += positions;
    stats.padding_positions += positions - batch.real_tokens() as u64;
}
