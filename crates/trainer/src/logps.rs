//! Scoring a Parquet preference file with a model: per pair, the sums of the chosen and
//! rejected completion-token log-probs and their token counts (the `slime-trainer logps`
//! command, and the format of precomputed reference log-probs), optionally every completion
//! token's log-prob.
//!
//! Pairs are streamed from the file ([`slime_data::PairStream`]: chat template, tokenization
//! with the exact prompt/completion boundary, TRL truncation), scored in packed batches
//! ([`score_pairs`]; chunks of pairs sorted by length, so batches carry little padding; output
//! stays in file order) and written with [`slime_data::write_logps`] (`pair` = the row in the
//! file). [`score_pairs`] also gives a run its reference sums and SAGE margins.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float32Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::DType;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use slime_data::{
    ChatTemplate, DataError, HashSplit, InvalidRows, LoaderStats, Overlong, PairEncoder, PairLogps, PairStream,
    ReadOptions, SplitPart, TokenizedPair, Truncation, write_logps,
};
use slime_models::{CausalLm, PairBatch};
use slime_objectives::SequenceLogps;

use crate::model_source::{LoadedModel, max_positions};
use crate::{Result, TrainError};

/// Positions per chunk of the log-prob computation.
pub(crate) const LOGP_CHUNK: usize = 64;

/// Batches sorted by length together (pairs per chunk = `batch_size * SORT_WINDOW`).
const SORT_WINDOW: usize = 16;

/// Options of [`score_file`].
#[derive(Debug, Clone, PartialEq)]
pub struct LogpsOptions {
    /// TRL truncation.
    pub truncation: Truncation,
    /// A pair over the limits of `truncation`: cut (TRL) or left out and counted.
    pub overlong: Overlong,
    /// Pairs per forward pass (2x sequences).
    pub batch_size: usize,
    /// Only the rows of one part of a hash split.
    pub split: Option<(HashSplit, SplitPart)>,
    /// Unusable rows: error (default) or skip and count.
    pub invalid_rows: InvalidRows,
    /// Also write every completion token's log-prob to this Parquet file.
    pub per_token: Option<PathBuf>,
    /// Print a progress line to stderr about every this often (`None`: never).
    pub progress_every: Option<Duration>,
}

impl Default for LogpsOptions {
    fn default() -> Self {
        Self {
            truncation: Truncation::default(),
            overlong: Overlong::Truncate,
            batch_size: 8,
            split: None,
            invalid_rows: InvalidRows::Error,
            per_token: None,
            progress_every: None,
        }
    }
}

/// What [`score_file`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct LogpsReport {
    /// The per-pair rows written (file order).
    pub rows: Vec<PairLogps>,
    /// Rows read / skipped / truncated, tokens, padding.
    pub stats: LoaderStats,
    /// Pairs left out for not fitting the limits (`overlong = drop`).
    pub dropped_overlong: u64,
    /// Rows of the per-token file.
    pub token_rows: u64,
    /// Wall-clock seconds of the scoring.
    pub seconds: f64,
}

/// One completion token's log-prob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogp {
    /// The pair (its row in the file).
    pub pair: u64,
    /// Chosen (`true`) or rejected completion.
    pub chosen: bool,
    /// Index of the token within its completion (0 = first completion token).
    pub position: u32,
    /// The token id.
    pub token: u32,
    /// `log p(token | prompt, completion[..position])`.
    pub logp: f32,
}

/// The model's input for `pairs`: each pair's prompt and completions, packed around the prompt.
pub fn pair_batch(pairs: &[&TokenizedPair]) -> Result<PairBatch> {
    Ok(PairBatch::new(pairs.iter().map(|p| (p.prompt.as_slice(), p.chosen.as_slice(), p.rejected.as_slice())))?)
}

/// Per-token completion log-probs of `batch`'s chosen and rejected completions, as the
/// objectives take them (with their sums `S = sum_j l_j` and counts).
pub(crate) fn pair_logps(lm: &CausalLm, batch: &PairBatch) -> Result<(SequenceLogps, SequenceLogps)> {
    let logps = lm.model().completion_logps(batch, LOGP_CHUNK)?;
    Ok((
        SequenceLogps::from_tokens(&logps.chosen, &logps.chosen_mask)?,
        SequenceLogps::from_tokens(&logps.rejected, &logps.rejected_mask)?,
    ))
}

/// Per-pair sums `S = sum_j l_j` of the chosen and rejected completion-token log-probs and
/// their token counts under `lm` as it is (forward only), in the order of `pairs`, `batch_size`
/// pairs per forward pass; with `per_token`, also every completion token's log-prob. The sums
/// are [`pair_logps`]' (the objectives'), so a reference computed here at the policy's weights
/// gives it the policy's own sums.
pub fn score_pairs(
    lm: &CausalLm,
    pairs: &[&TokenizedPair],
    batch_size: usize,
    per_token: bool,
) -> Result<(Vec<PairLogps>, Vec<TokenLogp>)> {
    let mut sums = Vec::with_capacity(pairs.len());
    let mut tokens = Vec::new();
    for refs in pairs.chunks(batch_size.max(1)) {
        score_batch(lm, refs, &pair_batch(refs)?, per_token, &mut sums, &mut tokens)?;
    }
    Ok((sums, tokens))
}

/// [`score_pairs`] of one forward pass: `batch` is `refs` packed ([`pair_batch`]); appends to
/// `sums` and `tokens`.
fn score_batch(
    lm: &CausalLm,
    refs: &[&TokenizedPair],
    batch: &PairBatch,
    per_token: bool,
    sums: &mut Vec<PairLogps>,
    tokens: &mut Vec<TokenLogp>,
) -> Result<()> {
    let (chosen, rejected) = pair_logps(lm, batch)?;
    let side_sums =
        |side: &SequenceLogps| -> Result<Vec<f64>> { Ok(side.sum().detach().to_dtype(DType::F64)?.to_vec1()?) };
    let (chosen_sums, rejected_sums) = (side_sums(&chosen)?, side_sums(&rejected)?);
    for (i, pair) in refs.iter().enumerate() {
        sums.push(PairLogps {
            pair: pair.id,
            chosen_logp: chosen_sums[i],
            rejected_logp: rejected_sums[i],
            chosen_tokens: pair.chosen.len() as u32,
            rejected_tokens: pair.rejected.len() as u32,
        });
    }
    if !per_token {
        return Ok(());
    }
    for (side, is_chosen) in [(&chosen, true), (&rejected, false)] {
        let values: Vec<Vec<f32>> = match side.tokens() {
            Some(t) => t.logps().detach().to_dtype(DType::F32)?.to_vec2()?,
            None => return Err(TrainError::Config("no per-token log-probs".into())),
        };
        for (pair, row) in refs.iter().zip(&values) {
            let ids = if is_chosen { &pair.chosen } else { &pair.rejected };
            tokens.extend(ids.iter().zip(row).enumerate().map(|(j, (&token, &logp))| TokenLogp {
                pair: pair.id,
                chosen: is_chosen,
                position: j as u32,
                token,
                logp,
            }));
        }
    }
    Ok(())
}

/// Streams the per-token rows into a Parquet file (columns `pair` u64, `which` utf8
/// `chosen`/`rejected`, `position` u32, `token` u32, `logp` f32), written as `*.tmp` and renamed
/// on [`finish`](Self::finish).
pub struct TokenLogpWriter {
    path: PathBuf,
    tmp: RemovedOnDrop,
    writer: ArrowWriter<File>,
    schema: Arc<Schema>,
    rows: u64,
}

impl TokenLogpWriter {
    /// Creates `path.tmp`.
    pub fn create(path: &Path) -> Result<Self> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("pair", DataType::UInt64, false),
            Field::new("which", DataType::Utf8, false),
            Field::new("position", DataType::UInt32, false),
            Field::new("token", DataType::UInt32, false),
            Field::new("logp", DataType::Float32, false),
        ]));
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp).map_err(|source| TrainError::Io { path: tmp.display().to_string(), source })?;
        let tmp = RemovedOnDrop(Some(tmp));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(1 << 20))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| parquet_error(path, e))?;
        Ok(Self { path: path.to_path_buf(), tmp, writer, schema, rows: 0 })
    }

    /// Appends `rows`.
    pub fn write(&mut self, rows: &[TokenLogp]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.pair))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| if r.chosen { "chosen" } else { "rejected" }))),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.position))),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.token))),
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.logp))),
        ];
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| parquet_error(&self.path, e))?;
        self.writer.write(&batch).map_err(|e| parquet_error(&self.path, e))?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    /// Closes the file and moves it into place; returns the rows written. Dropped without
    /// `finish` (an error on the way), the writer removes its temporary file.
    pub fn finish(self) -> Result<u64> {
        let Self { path, mut tmp, writer, rows, .. } = self;
        writer.close().map_err(|e| parquet_error(&path, e))?;
        if let Some(tmp_path) = tmp.0.take() {
            crate::atomic::sync_file(&tmp_path)?;
            crate::atomic::rename_into_place(&tmp_path, &path)?;
        }
        Ok(rows)
    }
}

/// A temporary file removed when dropped (unless taken out).
struct RemovedOnDrop(Option<PathBuf>);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn parquet_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io { path: path.display().to_string(), source: std::io::Error::other(format!("writing Parquet: {e}")) }
}

/// The file the `--per-token` rows go to: `OUT.parquet` -> `OUT.tokens.parquet`.
pub fn per_token_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map_or_else(|| "logps".into(), |s| s.to_string_lossy().into_owned());
    out.with_file_name(format!("{stem}.tokens.parquet"))
}

/// Scores every pair of the Parquet file `data` (or of one split part) with `model` and writes
/// the per-pair sums and counts to `out` ([`write_logps`]), and with
/// [`LogpsOptions::per_token`] every completion token's log-prob.
pub fn score_file(
    model: &LoadedModel,
    template: Option<ChatTemplate>,
    data: &Path,
    out: &Path,
    opts: &LogpsOptions,
) -> Result<LogpsReport> {
    if opts.batch_size == 0 {
        return Err(TrainError::Config("batch_size: must be at least 1".into()));
    }
    for target in std::iter::once(out).chain(opts.per_token.as_deref()) {
        if same_file(target, data) {
            return Err(TrainError::Config(format!(
                "{}: the output would overwrite the input data file",
                target.display()
            )));
        }
        if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|source| TrainError::Io { path: dir.display().to_string(), source })?;
        }
    }
    let context = max_positions(model.lm.config());
    if let Some(max_length) = opts.truncation.max_length
        && max_length > context
    {
        return Err(TrainError::Config(format!(
            "max_length (--max-length) = {max_length} exceeds the model's context of {context} positions \
             (max_position_embeddings); use at most {context}"
        )));
    }
    let tokenizer = slime_data::TextTokenizer::from_dir(&model.tokenizer_dir)?;
    // Dropping needs each pair's full length: encode uncut, then apply the limits here.
    let encoding = match opts.overlong {
        Overlong::Truncate => opts.truncation,
        Overlong::Drop => Truncation { max_length: None, max_prompt_length: None, ..opts.truncation },
    };
    let encoder = PairEncoder::new(tokenizer, template, encoding)?;
    let read = ReadOptions { invalid_rows: opts.invalid_rows, ..ReadOptions::default() };
    let mut stream = PairStream::open(data, read, &encoder, opts.split)?;
    let mut writer = opts.per_token.as_deref().map(TokenLogpWriter::create).transpose()?;
    let started = Instant::now();
    let mut last_note = started;
    let mut rows = Vec::new();
    let (mut positions, mut real, mut dropped_overlong) = (0u64, 0u64, 0u64);
    let window = opts.batch_size * SORT_WINDOW;
    loop {
        let mut chunk = Vec::with_capacity(window);
        for pair in stream.by_ref() {
            let pair = pair.map_err(|e| explain(e, data))?;
            if opts.overlong == Overlong::Drop && !within(&pair, &opts.truncation) {
                dropped_overlong += 1;
                continue;
            }
            check_fits(&pair, context, data)?;
            chunk.push(pair);
            if chunk.len() == window {
                break;
            }
        }
        if chunk.is_empty() {
            break;
        }
        // Score in length order (less padding), emit in file order.
        let mut order: Vec<usize> = (0..chunk.len()).collect();
        order.sort_by_key(|&i| chunk[i].prompt.len() + chunk[i].chosen.len().max(chunk[i].rejected.len()));
        let mut sums: Vec<Option<PairLogps>> = vec![None; chunk.len()];
        let mut tokens: Vec<Vec<TokenLogp>> = vec![Vec::new(); chunk.len()];
        for batch_idx in order.chunks(opts.batch_size) {
            let refs: Vec<&TokenizedPair> = batch_idx.iter().map(|&i| &chunk[i]).collect();
            for pair in &refs {
                for part in [&pair.prompt, &pair.chosen, &pair.rejected] {
                    model.check_ids(part, &|| format!("pair {}", pair.id))?;
                }
            }
            let packed = pair_batch(&refs)?;
            positions += packed.packed_positions() as u64;
            real += packed.packed_tokens() as u64;
            let (mut s, mut t) = (Vec::with_capacity(refs.len()), Vec::new());
            score_batch(&model.lm, &refs, &packed, writer.is_some(), &mut s, &mut t)?;
            for (k, &i) in batch_idx.iter().enumerate() {
                sums[i] = Some(s[k]);
            }
            for tok in t {
                // Rows of one pair are contiguous in `t`; route them by pair id.
                if let Some(k) = batch_idx.iter().position(|&i| chunk[i].id == tok.pair) {
                    tokens[batch_idx[k]].push(tok);
                }
            }
        }
        rows.extend(sums.into_iter().flatten());
        if let Some(w) = writer.as_mut() {
            w.write(&tokens.concat())?;
        }
        if let Some(every) = opts.progress_every
            && last_note.elapsed() >= every
        {
            last_note = Instant::now();
            eprintln!("[logps] {} pairs scored, {:.1} s elapsed", rows.len(), started.elapsed().as_secs_f64());
        }
    }
    let mut stats = stream.stats();
    stats.batch_positions = positions;
    stats.padding_positions = positions - real;
    if rows.is_empty() {
        return Err(TrainError::Input(format!(
            "{}: no pair to score ({stats}; {dropped_overlong} dropped as over-long); nothing was written",
            data.display()
        )));
    }
    crate::atomic::produce_file(out, |tmp| Ok(write_logps(tmp, &rows)?))?;
    let token_rows = match writer {
        Some(w) => w.finish()?,
        None => 0,
    };
    Ok(LogpsReport { rows, stats, dropped_overlong, token_rows, seconds: started.elapsed().as_secs_f64() })
}

/// Whether an uncut pair fits `limits` as the trainer's `overlong = "drop"` decides: the prompt
/// within `max_prompt_length`, prompt + each completion within `max_length`.
fn within(pair: &TokenizedPair, limits: &Truncation) -> bool {
    let prompt_fits = limits.max_prompt_length.is_none_or(|m| pair.prompt.len() <= m);
    let length = slime_data::pair_length(pair.prompt.len(), pair.chosen.len(), pair.rejected.len());
    prompt_fits && limits.max_length.is_none_or(|m| length <= m)
}

/// Errors when a pair's prompt and longer completion exceed the model's context, naming its row.
fn check_fits(pair: &TokenizedPair, context: usize, data: &Path) -> Result<()> {
    let completion = pair.chosen.len().max(pair.rejected.len());
    let len = pair.prompt.len() + completion;
    if len > context {
        return Err(TrainError::Config(format!(
            "{} row {}: {} prompt + {completion} completion tokens = {len} positions exceed the model's context of \
             {context} (max_position_embeddings); pass --max-length {context} (and --max-prompt-length) to \
             truncate",
            data.display(),
            pair.id,
            pair.prompt.len()
        )));
    }
    Ok(())
}

/// A data error, with a hint where the command line can fix it.
fn explain(e: DataError, data: &Path) -> TrainError {
    match &e {
        DataError::Config { field, .. } if field == "chat_template" => TrainError::Config(format!(
            "{}: conversational data needs a chat template, and the tokenizer has none; pass --template \
             llama3, gemma or chatml",
            data.display()
        )),
        _ => TrainError::from(e),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_token_file_sits_beside_the_output() {
        assert_eq!(per_token_path(Path::new("out/ref.parquet")), Path::new("out/ref.tokens.parquet"));
        assert_eq!(per_token_path(Path::new("ref")), Path::new("ref.tokens.parquet"));
    }
}
