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
    ChatTemplate, DegenerateCounts, EncodeStats, Encoded, HashSplit, InvalidRows, LengthSummary, Overlong, PairEncoder,
    PairLengths, PreferenceReader, ReadOptions, Record, RowProblem, SplitAudit, SplitPart, TextTokenizer,
    TokenizedPair, Truncation, TruncationMode,
};

use crate::config::DataSpec;
use crate::generate::stop_tokens;
use crate::model_source::check_ids;
use crate::task::{self, TaskPair, TaskTokenizer, ids};
use crate::verifiable::{HeldOutPrompt, read_heldout};
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
    /// A held-out Parquet pair's problem with its answer (`data.heldout_answers`), which
    /// grades the generation of its prompt.
    pub answer: Option<HeldOutPrompt>,
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
    /// What happens to a held-out or preference pair that does not fit the limits.
    pub overlong: Overlong,
    /// Pairs left out because they did not fit the limits (`overlong = "drop"`), by split.
    pub dropped_overlong: BTreeMap<String, u64>,
    /// Lengths (prompt + longer completion, before any cut) of every tokenized pair, all
    /// splits, against `max_length`.
    pub lengths: LengthSummary,
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
    /// Decodes generations for the checker of `Example::answer` (set when answers are).
    pub decoder: Option<TextTokenizer>,
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
            Ok(Example { tokens, task: Some(p), answer: None })
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
        Ok(Self { sft, preference, eval, pad_id: ids::PAD, stop: vec![ids::EOT], summary: None, decoder: None })
    }

    /// The pairs of the Parquet file `spec.parquet`, encoded with `tokenizer` (read from
    /// `tokenizer_dir`) and `template`; every id must be below `vocab` (the model's vocabulary).
    /// With `spec.heldout`, the held-out pairs are that file's rows in file order (ids offset by
    /// [`HELDOUT_ID_OFFSET`]) and `spec.parquet` is split into SFT and preference pairs only;
    /// with `spec.heldout_answers` too, each held-out pair carries its line of that file.
    /// With `spec.overlong = "drop"`, a preference or held-out pair that does not fit the
    /// length limits is left out and counted; SFT pairs are cut to fit either way.
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
        let held_out = HashSplit::new(spec.split_seed ^ EVAL_SALT, spec.eval_fraction)?;
        let stages = HashSplit::paper(spec.split_seed);
        let answers = match (&spec.heldout, &spec.heldout_answers) {
            (_, None) => None,
            (Some(_), Some(file)) => Some(read_heldout(file)?),
            (None, Some(file)) => {
                return Err(TrainError::Config(format!(
                    "data.heldout_answers = {}: needs data.heldout (the held-out Parquet file its lines answer)",
                    file.display()
                )));
            }
        };
        let decoder = if answers.is_some() { Some(TextTokenizer::from_dir(tokenizer_dir)?) } else { None };
        let mut data =
            Self { sft: Vec::new(), preference: Vec::new(), eval: Vec::new(), pad_id, stop, summary: None, decoder };
        let mut load = Load {
            encoder: &encoder,
            overlong: spec.overlong,
            vocab,
            tokenizer_dir,
            stats: EncodeStats::default(),
            lengths: PairLengths::default(),
            summary: LoadSummary { file: path.display().to_string(), overlong: spec.overlong, ..Default::default() },
            audit: SplitAudit::default(),
        };
        let mut rows = 0;
        let mut skipped_rows: BTreeMap<String, u64> = BTreeMap::new();
        let mut read = |file: &Path, heldout_file: bool, data: &mut Self, load: &mut Load<'_>| -> Result<u64> {
            let mut reader = PreferenceReader::open(file, ReadOptions { invalid_rows, ..ReadOptions::default() })?;
            for record in reader.by_ref() {
                let record = record?;
                let in_heldout =
                    heldout_file || (spec.heldout.is_none() && held_out.part(&record.example) == SplitPart::First);
                let part = if in_heldout {
                    0
                } else if stages.part(&record.example) == SplitPart::First {
                    1
                } else {
                    2
                };
                let id = if heldout_file { HELDOUT_ID_OFFSET + record.row } else { record.row };
                let Some(tokens) = load.encode(&record, id, part)? else { continue };
                let answer = match (&answers, heldout_file) {
                    (Some(answers), true) => Some(answers.get(record.row as usize).cloned().ok_or_else(|| {
                        TrainError::Config(format!(
                            "{}: row {} has no line in data.heldout_answers ({} lines)",
                            file.display(),
                            record.row,
                            answers.len()
                        ))
                    })?),
                    _ => None,
                };
                let example = Example { tokens, task: None, answer };
                match part {
                    0 if data.eval.len() < spec.eval_pairs => data.eval.push(example),
                    0 => load.summary.eval_unused += 1,
                    1 => data.sft.push(example),
                    _ => data.preference.push(example),
                }
            }
            let stats = reader.stats();
            for (problem, n) in &stats.skipped {
                *skipped_rows.entry(format!("{problem:?}")).or_default() += n;
            }
            Ok(stats.rows_read)
        };
        rows += read(path, false, &mut data, &mut load)?;
        if let Some(file) = &spec.heldout {
            let heldout_rows = read(file, true, &mut data, &mut load)?;
            if let Some(answers) = &answers
                && answers.len() as u64 != heldout_rows
            {
                return Err(TrainError::Config(format!(
                    "data.heldout_answers: {} lines, but data.heldout ({}) has {heldout_rows} rows; line i answers row i",
                    answers.len(),
                    file.display()
                )));
            }
            rows += heldout_rows;
        }
        let Load { stats, lengths, mut summary, audit, .. } = load;
        summary.rows = rows;
        summary.sft_pairs = data.sft.len();
        summary.preference_pairs = data.preference.len();
        summary.eval_pairs = data.eval.len();
        summary.truncated_pairs = stats.truncated_pairs;
        summary.tokens = stats.tokens;
        summary.degenerate = audit.counts();
        summary.lengths = lengths.summary(spec.max_length);
        for (problem, n) in skipped_rows.into_iter().chain(stats.skipped.iter().map(|(p, n)| (format!("{p:?}"), *n))) {
            *summary.skipped.entry(problem).or_default() += n;
        }
        data.summary = Some(summary);
        // The SFT split may be empty (a file of preference pairs only): only a run with an
        // SFT stage needs it, which `RunData::require_sft` checks.
        for (name, part) in [("preference", &data.preference), ("held-out", &data.eval)] {
            if part.is_empty() {
                return Err(data.empty_split(path, name));
            }
        }
        Ok(data)
    }

    /// Refuses an empty SFT split (for a run whose SFT stage has steps).
    pub fn require_sft(&self, path: &Path) -> Result<()> {
        if self.sft.is_empty() { Err(self.empty_split(path, "SFT")) } else { Ok(()) }
    }

    /// "the `name` split is empty", with what the load read, skipped and dropped.
    fn empty_split(&self, path: &Path, name: &str) -> TrainError {
        let summary = self.summary.clone().unwrap_or_default();
        let dropped: u64 = summary.dropped_overlong.values().sum();
        TrainError::Config(format!(
            "{}: the {name} split is empty ({} rows read, {} skipped, {dropped} dropped as longer than the \
             length limits); a run needs pairs in every split it trains or evaluates on",
            path.display(),
            summary.rows,
            summary.skipped.values().sum::<u64>()
        ))
    }
}

/// Added to a held-out file's row numbers to make its pair ids, so they never meet the ids
/// (row numbers) of the training file.
pub const HELDOUT_ID_OFFSET: u64 = 1 << 40;

/// The encoding side of a Parquet load: what it has counted so far.
struct Load<'a> {
    encoder: &'a PairEncoder,
    overlong: Overlong,
    vocab: usize,
    tokenizer_dir: &'a Path,
    stats: EncodeStats,
    lengths: PairLengths,
    summary: LoadSummary,
    audit: SplitAudit,
}

impl Load<'_> {
    /// Encodes one record of split `part` (0 held-out, 1 SFT, 2 preference); `None` when it is
    /// skipped (counted) or, with [`Overlong::Drop`], a held-out or preference pair does not
    /// fit (counted in `dropped_overlong`).
    fn encode(&mut self, record: &Record, id: u64, part: usize) -> Result<Option<TokenizedPair>> {
        let (outcome, length) = self.encoder.encode_measured(id, &record.example)?;
        if let Some(length) = length {
            self.lengths.record(length);
        }
        let too_long = match &outcome {
            Encoded::Pair { .. } => !outcome.fits(),
            Encoded::Skipped(problem) => *problem == RowProblem::EmptyAfterTruncation,
        };
        if self.overlong == Overlong::Drop && part != 1 && too_long {
            let split = if part == 0 { "held-out" } else { "preference" };
            *self.summary.dropped_overlong.entry(split.to_string()).or_default() += 1;
            return Ok(None);
        }
        self.stats.record(&outcome);
        let Encoded::Pair { pair, .. } = outcome else { return Ok(None) };
        for ids in [&pair.prompt, &pair.chosen, &pair.rejected] {
            check_ids(ids, self.vocab, self.tokenizer_dir, &|| {
                format!("{} row {}", record.file.display(), record.file_row)
            })?;
        }
        self.audit.record(part, &record.example);
        Ok(Some(pair))
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
    fn an_empty_sft_split_is_refused_only_when_asked() -> Result<()> {
        let mut data = RunData::embedded(30, 4, 1)?;
        data.require_sft(Path::new("pairs.parquet"))?;
        data.sft.clear();
        data.summary = Some(LoadSummary { rows: 30, ..Default::default() });
        let err = data.require_sft(Path::new("pairs.parquet")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("pairs.parquet: the SFT split is empty (30 rows read"), "{err}");
        Ok(())
    }

    #[test]
    fn repetition_tells_loops_from_varied_text() {
        assert_eq!(repetition(&[1, 2, 3, 4, 5, 6]), 0.0);
        let looped: Vec<u32> = [7, 8].iter().copied().cycle().take(20).collect();
        assert!(repetition(&looped) > 0.8, "{}", repetition(&looped));
        assert_eq!(repetition(&[1, 1]), 0.0);
    }
}
