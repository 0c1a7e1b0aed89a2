//! The pairs a run trains and evaluates on: the embedded task (generated, checkable by a
//! program) or a preference Parquet file encoded with a pretrained model's tokenizer and chat
//! template.
//!
//! Parquet rows are split by a seeded hash of their content ([`HashSplit`]), never by file
//! order or row-group size: first `eval_fraction` of the rows are held out (at most
//! `eval_pairs` of them are used), then a third of the rest is the SFT split and two thirds
//! the preference split, as in the paper. A pair's id is its row in the file, so reference
//! log-probs precomputed by `slime-trainer logps` on the same file line up by id.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use slime_data::{
    ChatTemplate, DegenerateCounts, EncodeStats, Encoded, HashSplit, InvalidRows, PairEncoder, PreferenceReader,
    ReadOptions, SplitAudit, SplitPart, TextTokenizer, TokenizedPair, Truncation, TruncationMode,
};

use crate::config::DataSpec;
use crate::generate::stop_tokens;
use crate::model_source::check_ids;
use crate::task::{self, TaskPair, TaskTokenizer, ids};
use crate::{Result, TrainError};

/// Mixed into `split_seed` for the held-out split, so it is independent of the SFT split.
const EVAL_SALT: u64 = 0xE7A1_5EED;

/// One pair: its tokens and, for the embedded task, the text a checker can grade.
#[derive(Debug, Clone)]
pub struct Example {
    /// Prompt, chosen and rejected token ids (the prompt starts with BOS where the model uses one).
    pub tokens: TokenizedPair,
    /// The embedded task's pair (absent for Parquet rows).
    pub task: Option<TaskPair>,
}

/// What loading a Parquet file did, written to the run directory as `data.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadSummary {
    /// The file.
    pub file: String,
    /// Rows read.
    pub rows: u64,
    /// Pairs per split after encoding.
    pub sft_pairs: usize,
    /// Pairs in the preference split.
    pub preference_pairs: usize,
    /// Held-out pairs used for evaluation.
    pub eval_pairs: usize,
    /// Held-out pairs beyond `data.eval_pairs`, not used.
    pub eval_unused: usize,
    /// Pairs whose prompt or completions were cut to the length limits.
    pub truncated_pairs: u64,
    /// Rows skipped, by reason (unusable rows with `skip_invalid`, completions emptied by
    /// truncation, template problems).
    pub skipped: BTreeMap<String, u64>,
    /// Real tokens of the encoded pairs (prompt + chosen + rejected).
    pub tokens: u64,
    /// Degenerate rows among the encoded pairs (kept and trained on, but counted):
    /// chosen = rejected, repeated rows, prompts in more than one split.
    pub degenerate: DegenerateCounts,
}

/// A run's data.
pub struct RunData {
    /// SFT split.
    pub sft: Vec<Example>,
    /// Preference split (disjoint from SFT).
    pub preference: Vec<Example>,
    /// Held-out pairs.
    pub eval: Vec<Example>,
    /// Padding id of batches (masked out; any id works).
    pub pad_id: u32,
    /// Generation stops after one of these (EOS, end of turn).
    pub stop: Vec<u32>,
    /// Parquet only: what the load did.
    pub summary: Option<LoadSummary>,
}

fn tokenize(pairs: Vec<TaskPair>, first_id: u64) -> Result<Vec<Example>> {
    let t = TaskTokenizer;
    pairs
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let enc = |s: String| t.encode(&s).ok_or_else(|| TrainError::Config(format!("untokenizable text `{s}`")));
            let tokens = TokenizedPair {
                id: first_id + i as u64,
                prompt: enc(p.prompt())?,
                chosen: enc(p.chosen())?,
                rejected: enc(p.rejected())?,
            };
            Ok(Example { tokens, task: Some(p) })
        })
        .collect()
}

impl RunData {
    /// The embedded task: `pairs` training pairs (every third to SFT, the rest to the
    /// preference stage) and `eval_pairs` held-out pairs from an independent stream of the
    /// same seed.
    pub fn embedded(pairs: usize, eval_pairs: usize, seed: u64) -> Result<Self> {
        let all = tokenize(task::generate(pairs, seed), 0)?;
        let (sft, preference) = all.into_iter().partition(|e| e.tokens.id % 3 == 0);
        let eval = tokenize(task::generate(eval_pairs, seed ^ 0x5EED_E7A1), 1 << 40)?;
        Ok(Self { sft, preference, eval, pad_id: ids::PAD, stop: vec![ids::EOT], summary: None })
    }

    /// The pairs of the Parquet file `spec.parquet`, encoded with `tokenizer` (read from
    /// `tokenizer_dir`) and `template`; every id must be below `vocab` (the model's vocabulary).
    pub fn from_parquet(
        spec: &DataSpec,
        tokenizer: TextTokenizer,
        tokenizer_dir: &Path,
        template: Option<ChatTemplate>,
        vocab: usize,
    ) -> Result<Self> {
        let path = spec.parquet.as_deref().ok_or_else(|| TrainError::Config("data.parquet: no file given".into()))?;
        let stop = stop_tokens(&tokenizer, template.as_ref(), &[])?;
        let pad_id = tokenizer.specials().pad_id;
        let truncation = Truncation {
            max_length: spec.max_length,
            max_prompt_length: spec.max_prompt_length,
            mode: TruncationMode::KeepEnd,
        };
        let encoder = PairEncoder::new(tokenizer, template, truncation)?;
        let invalid_rows = if spec.skip_invalid { InvalidRows::Skip } else { InvalidRows::Error };
        let mut reader = PreferenceReader::open(path, ReadOptions { invalid_rows, ..ReadOptions::default() })?;
        let held_out = HashSplit::new(spec.split_seed ^ EVAL_SALT, spec.eval_fraction)?;
        let stages = HashSplit::paper(spec.split_seed);
        let mut data = Self { sft: Vec::new(), preference: Vec::new(), eval: Vec::new(), pad_id, stop, summary: None };
        let mut stats = EncodeStats::default();
        let mut summary = LoadSummary { file: path.display().to_string(), ..LoadSummary::default() };
        let mut audit = SplitAudit::default();
        for record in reader.by_ref() {
            let record = record?;
            let outcome = encoder.encode(record.row, &record.example)?;
            stats.record(&outcome);
            let Encoded::Pair { pair, .. } = outcome else { continue };
            let ids = [&pair.prompt, &pair.chosen, &pair.rejected];
            for part in ids {
                check_ids(part, vocab, tokenizer_dir, &|| {
                    format!("{} row {}", record.file.display(), record.file_row)
                })?;
            }
            let example = Example { tokens: pair, task: None };
            let part = if held_out.part(&record.example) == SplitPart::First {
                0
            } else if stages.part(&record.example) == SplitPart::First {
                1
            } else {
                2
            };
            audit.record(part, &record.example);
            if part == 0 {
                if data.eval.len() < spec.eval_pairs {
                    data.eval.push(example);
                } else {
                    summary.eval_unused += 1;
                }
            } else if part == 1 {
                data.sft.push(example);
            } else {
                data.preference.push(example);
            }
        }
        let read = reader.stats();
        summary.rows = read.rows_read;
        summary.sft_pairs = data.sft.len();
        summary.preference_pairs = data.preference.len();
        summary.eval_pairs = data.eval.len();
        summary.truncated_pairs = stats.truncated_pairs;
        summary.tokens = stats.tokens;
        summary.degenerate = audit.counts();
        for (problem, n) in read.skipped.iter().chain(stats.skipped.iter()) {
            *summary.skipped.entry(format!("{problem:?}")).or_default() += n;
        }
        for (name, part) in [("SFT", &data.sft), ("preference", &data.preference), ("held-out", &data.eval)] {
            if part.is_empty() {
                return Err(TrainError::Config(format!(
                    "{}: the {name} split is empty ({} rows read, {} skipped); a run needs pairs in every split",
                    path.display(),
                    summary.rows,
                    summary.skipped.values().sum::<u64>()
                )));
            }
        }
        data.summary = Some(summary);
        Ok(data)
    }
}

/// Share of a generation's token 3-grams that repeat an earlier 3-gram of it: 0 for varied
/// text, near 1 for a loop (a symptom of collapse).
pub fn repetition(tokens: &[u32]) -> f64 {
    if tokens.len() < 4 {
        return 0.0;
    }
    let grams: Vec<&[u32]> = tokens.windows(3).collect();
    let mut seen = std::collections::HashSet::new();
    let repeated = grams.iter().filter(|g| !seen.insert(**g)).count();
    repeated as f64 / grams.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_tells_loops_from_varied_text() {
        assert_eq!(repetition(&[1, 2, 3, 4, 5, 6]), 0.0);
        let looped: Vec<u32> = [7, 8].iter().copied().cycle().take(20).collect();
        assert!(repetition(&looped) > 0.8, "{}", repetition(&looped));
        assert_eq!(repetition(&[1, 1]), 0.0);
    }
}
