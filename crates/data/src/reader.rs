//! Streaming reader of Parquet preference datasets: one row group at a time, only the needed
//! columns, so memory is bounded by a row group and not by the file. A dataset is one file or
//! a set of shards (a directory, or a glob such as `data/train-*.parquet`) read in name order as
//! one sequence of rows; see [`parquet_files`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Schema;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Location, Result, RowProblem};
use crate::example::{Message, PreferenceExample, Turns};
use crate::schema::{self, ColumnKind, ColumnNames, Layout, Resolved};

/// What to do with a row whose values are unusable (null, empty, no assistant turn, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidRows {
    /// Stop with an error naming the file, row group, row and column (default).
    #[default]
    Error,
    /// Skip the row and count it in [`ReadStats::skipped`] by reason.
    Skip,
}

/// Options of [`PreferenceReader`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadOptions {
    /// Column names.
    pub columns: ColumnNames,
    /// The layout; `None` detects it from the schema.
    pub layout: Option<Layout>,
    /// Unusable rows: error or skip.
    pub invalid_rows: InvalidRows,
    /// Rows decoded per Arrow record batch.
    pub batch_rows: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self { columns: ColumnNames::default(), layout: None, invalid_rows: InvalidRows::Error, batch_rows: 1024 }
    }
}

/// Counts of a read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReadStats {
    /// Rows read from the file.
    pub rows_read: u64,
    /// Rows turned into examples.
    pub rows_yielded: u64,
    /// Rows skipped, by reason.
    pub skipped: BTreeMap<RowProblem, u64>,
    /// Row groups opened (over all shards).
    pub row_groups: usize,
    /// Files (shards) opened.
    pub files: usize,
}

/// A pair and the row it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Row index over the whole dataset (0-based; shards count on from the rows before them).
    pub row: u64,
    /// The file (shard) the row is in.
    pub file: Arc<Path>,
    /// Row index within `file` (0-based).
    pub file_row: u64,
    /// The pair.
    pub example: PreferenceExample,
}

/// Iterates the preference pairs of one Parquet file in file order.
struct ShardReader {
    path: PathBuf,
    file: File,
    metadata: ArrowReaderMetadata,
    projection: ProjectionMask,
    options: ReadOptions,
    resolved: Resolved,
    next_group: usize,
    group: usize,
    reader: Option<ParquetRecordBatchReader>,
    batch: Option<(RecordBatch, usize)>,
    next_row: u64,
    done: bool,
}

fn not_parquet(at: &Location, e: impl std::fmt::Display) -> DataError {
    DataError::NotParquet { location: at.clone().into(), detail: e.to_string() }
}

/// Runs a call into the Parquet decoder, turning a panic into an error: parquet-rs asserts on
/// some corrupt footers and pages (found by the fuzz tests) instead of returning an error.
fn guarded<T>(at: &Location, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the decoder panicked".into());
        Err(not_parquet(at, format!("corrupt file ({why})")))
    })
}

impl ShardReader {
    /// Opens `path`, checks its schema and detects (or checks) the layout. Reads no rows yet.
    fn open(path: &Path, options: ReadOptions) -> Result<Self> {
        let at = Location::file(path);
        guarded(&at, || Self::open_unguarded(path, options))
    }

    fn open_unguarded(path: &Path, options: ReadOptions) -> Result<Self> {
        let path = path.to_path_buf();
        let at = Location::file(&path);
        let file = File::open(&path).map_err(|source| DataError::Io { path: path.clone(), source })?;
        let plain = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|e| not_parquet(&at, e))?;
        let resolved = schema::resolve(plain.schema(), &options.columns, options.layout, &at)?;
        // Read strings as bytes so that invalid UTF-8 is reported with its row.
        let hint = Schema::new(
            plain
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_data_type(schema::as_binary(f.data_type())))
                .collect::<Vec<_>>(),
        );
        let metadata =
            ArrowReaderMetadata::load(&file, ArrowReaderOptions::new().with_schema(Arc::new(hint))).unwrap_or(plain);
        let mut wanted = vec![options.columns.chosen.as_str(), options.columns.rejected.as_str()];
        if resolved.prompt.is_some() {
            wanted.push(options.columns.prompt.as_str());
        }
        let roots: Vec<usize> = wanted.iter().filter_map(|name| metadata.schema().index_of(name).ok()).collect();
        let projection = ProjectionMask::roots(metadata.parquet_schema(), roots);
        Ok(Self {
            path,
            file,
            metadata,
            projection,
            options,
            resolved,
            next_group: 0,
            group: 0,
            reader: None,
            batch: None,
            next_row: 0,
            done: false,
        })
    }

    /// Rows in the file (from its footer).
    fn total_rows(&self) -> u64 {
        u64::try_from(self.metadata.metadata().file_metadata().num_rows()).unwrap_or(0)
    }

    fn location(&self, column: Option<&str>) -> Location {
        Location {
            path: self.path.clone(),
            row_group: Some(self.group),
            row: Some(self.next_row),
            column: column.map(str::to_string),
        }
    }

    /// The next record batch, opening row groups as needed; `None` at the end of the file.
    fn next_batch(&mut self, stats: &mut ReadStats) -> Result<Option<RecordBatch>> {
        let at = self.location(None).without_row();
        guarded(&at, || self.next_batch_unguarded(stats))
    }

    fn next_batch_unguarded(&mut self, stats: &mut ReadStats) -> Result<Option<RecordBatch>> {
        loop {
            if let Some(reader) = &mut self.reader {
                match reader.next() {
                    Some(Ok(batch)) => return Ok(Some(batch)),
                    Some(Err(e)) => return Err(not_parquet(&self.location(None).without_row(), e)),
                    None => self.reader = None,
                }
            }
            if self.next_group >= self.metadata.metadata().num_row_groups() {
                return Ok(None);
            }
            self.group = self.next_group;
            self.next_group += 1;
            stats.row_groups += 1;
            let file = self.file.try_clone().map_err(|source| DataError::Io { path: self.path.clone(), source })?;
            let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone())
                .with_projection(self.projection.clone())
                .with_row_groups(vec![self.group])
                .with_batch_size(self.options.batch_rows)
                .build()
                .map_err(|e| not_parquet(&self.location(None).without_row(), e))?;
            self.reader = Some(reader);
        }
    }

    /// Decodes row `i` of `batch`; on failure the problem and the column it is in.
    fn decode(&self, batch: &RecordBatch, i: usize) -> std::result::Result<PreferenceExample, (RowProblem, String)> {
        let names = &self.options.columns;
        let cell = |name: &str, kind: ColumnKind| {
            let column = batch.column_by_name(name).ok_or((RowProblem::Null, name.to_string()))?;
            read_cell(column.as_ref(), kind, i).map_err(|p| (p, name.to_string()))
        };
        let prompt = match self.resolved.prompt {
            Some(kind) => Some(cell(&names.prompt, kind)?),
            None => None,
        };
        let chosen = cell(&names.chosen, self.resolved.completions)?;
        let rejected = cell(&names.rejected, self.resolved.completions)?;
        // Attribute a structural problem to the column that shows it.
        PreferenceExample::from_cells(prompt, chosen.clone(), rejected.clone()).map_err(|p| {
            let column = match p {
                RowProblem::ConversationsDiffer | RowProblem::NoSharedPrompt => names.rejected.clone(),
                _ => problem_column(&chosen, &rejected, names, p),
            };
            (p, column)
        })
    }
}

impl Location {
    fn without_row(mut self) -> Self {
        self.row = None;
        self
    }
}

/// The first of chosen / rejected (else the prompt) that alone shows `problem`.
fn problem_column(chosen: &Turns, rejected: &Turns, names: &ColumnNames, problem: RowProblem) -> String {
    let shows = |t: &Turns| match t {
        Turns::Text(s) => problem == RowProblem::Empty && s.trim().is_empty(),
        Turns::Messages(m) => {
            let last = m.iter().rposition(|m| m.role == "assistant");
            match problem {
                RowProblem::NoAssistantTurn => last.is_none(),
                RowProblem::TurnsAfterCompletion => last.is_some_and(|l| l + 1 != m.len()),
                RowProblem::MissingRole => m.iter().any(|m| m.role.trim().is_empty()),
                RowProblem::Empty => m.last().is_some_and(|m| m.content.trim().is_empty()),
                _ => false,
            }
        }
    };
    if shows(chosen) {
        names.chosen.clone()
    } else if shows(rejected) {
        names.rejected.clone()
    } else {
        names.prompt.clone()
    }
}

impl ShardReader {
    /// The next usable row of this file and its row index in the file, counting into `stats`;
    /// `None` at the end of the file (or after an error).
    fn next_example(&mut self, stats: &mut ReadStats) -> Option<Result<(u64, PreferenceExample)>> {
        while !self.done {
            let (batch, i) = match self.batch.take() {
                Some((batch, i)) if i < batch.num_rows() => (batch, i),
                _ => match self.next_batch(stats) {
                    Ok(Some(batch)) => (batch, 0),
                    Ok(None) => {
                        self.done = true;
                        return None;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
            };
            let decoded = self.decode(&batch, i);
            let row = self.next_row;
            let location = decoded.as_ref().err().map(|(_, column)| self.location(Some(column)));
            self.batch = Some((batch, i + 1));
            self.next_row += 1;
            stats.rows_read += 1;
            match decoded {
                Ok(example) => {
                    stats.rows_yielded += 1;
                    return Some(Ok((row, example)));
                }
                Err((problem, _)) if self.options.invalid_rows == InvalidRows::Skip => {
                    *stats.skipped.entry(problem).or_default() += 1;
                }
                Err((problem, _)) => {
                    self.done = true;
                    let location = location.unwrap_or_else(|| Location::file(&self.path));
                    return Some(Err(DataError::InvalidRow { location: location.into(), problem }));
                }
            }
        }
        None
    }
}

/// Iterates the preference pairs of a Parquet dataset (one file, or shards in name order) as
/// one sequence of rows. Errors name the shard file and the row within it.
pub struct PreferenceReader {
    source: PathBuf,
    shards: Vec<PathBuf>,
    options: ReadOptions,
    layout: Layout,
    total_rows: u64,
    next_shard: usize,
    current: Option<(ShardReader, Arc<Path>)>,
    rows_before: u64,
    stats: ReadStats,
    done: bool,
}

impl std::fmt::Debug for PreferenceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreferenceReader")
            .field("source", &self.source)
            .field("shards", &self.shards.len())
            .field("layout", &self.layout)
            .finish()
    }
}

impl PreferenceReader {
    /// Opens `path`: a Parquet file, a directory (its `*.parquet` files) or a glob pattern
    /// (see [`parquet_files`]). Checks every shard's schema against the first one's layout
    /// (detected, or `options.layout`) and reads their footers; reads no rows yet.
    pub fn open(path: impl AsRef<Path>, options: ReadOptions) -> Result<Self> {
        if options.batch_rows == 0 {
            return Err(DataError::Config { field: "batch_rows".into(), detail: "must be at least 1".into() });
        }
        let source = path.as_ref().to_path_buf();
        let shards = parquet_files(&source)?;
        let mut layout = options.layout;
        let mut total_rows = 0;
        for shard in &shards {
            let reader = ShardReader::open(shard, ReadOptions { layout, ..options.clone() })?;
            layout = Some(reader.resolved.layout);
            total_rows += reader.total_rows();
        }
        let layout = layout.unwrap_or(Layout::Standard);
        Ok(Self {
            source,
            shards,
            options: ReadOptions { layout: Some(layout), ..options },
            layout,
            total_rows,
            next_shard: 0,
            current: None,
            rows_before: 0,
            stats: ReadStats::default(),
            done: false,
        })
    }

    /// The layout in use (the same in every shard).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Rows in the dataset (from the footers of all shards).
    pub fn total_rows(&self) -> u64 {
        self.total_rows
    }

    /// The files read, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Counts so far (over all shards).
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }
}

impl Iterator for PreferenceReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some((reader, file)) = &mut self.current else {
                let Some(shard) = self.shards.get(self.next_shard) else {
                    self.done = true;
                    return None;
                };
                self.next_shard += 1;
                match ShardReader::open(shard, self.options.clone()) {
                    Ok(reader) => {
                        self.stats.files += 1;
                        self.current = Some((reader, Arc::from(shard.as_path())));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            match reader.next_example(&mut self.stats) {
                Some(Ok((file_row, example))) => {
                    let row = self.rows_before + file_row;
                    return Some(Ok(Record { row, file: file.clone(), file_row, example }));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                None => {
                    self.rows_before += reader.next_row;
                    self.current = None;
                }
            }
        }
        None
    }
}

/// The Parquet files a dataset path names, in read order: the file itself; for a directory,
/// its `*.parquet` files (not recursing; e.g. the Hub's `data/train-00000-of-00003.parquet`
/// ...) sorted by name; for a path with glob characters (`*`, `?`, `[`) that is not an
/// existing file, the files matching it (e.g. `data/train-*.parquet`) sorted by path. A
/// directory or pattern with no file is an error naming it.
pub fn parquet_files(path: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let text = path.to_string_lossy();
    let mut files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(io)?
            .map(|entry| entry.map(|e| e.path()).map_err(io))
            .filter(|p| p.as_ref().map_or(true, |p| p.is_file() && p.extension().is_some_and(|x| x == "parquet")))
            .collect::<Result<_>>()?
    } else if !path.exists() && text.contains(['*', '?', '[']) {
        let pattern = glob::glob(&text).map_err(|e| DataError::Shards {
            path: path.to_path_buf(),
            detail: format!("not a valid glob pattern: {e}"),
        })?;
        pattern
            .map(|entry| {
                entry.map_err(|e| {
                    let path = e.path().to_path_buf();
                    DataError::Io { path, source: e.into() }
                })
            })
            .filter(|p| p.as_ref().map_or(true, |p| p.is_file()))
            .collect::<Result<_>>()?
    } else {
        return Ok(vec![path.to_path_buf()]);
    };
    files.sort();
    if files.is_empty() {
        let what = if path.is_dir() { "the directory has no *.parquet file" } else { "the pattern matches no file" };
        return Err(DataError::Shards { path: path.to_path_buf(), detail: format!("{what}; expected Parquet shards") });
    }
    Ok(files)
}

/// Reads one text or message-list cell.
fn read_cell(column: &dyn Array, kind: ColumnKind, i: usize) -> std::result::Result<Turns, RowProblem> {
    match kind {
        ColumnKind::Text => text_at(column, i).map(Turns::Text),
        ColumnKind::Messages => messages_at(column, i).map(Turns::Messages),
    }
}

fn utf8(bytes: &[u8]) -> std::result::Result<String, RowProblem> {
    std::str::from_utf8(bytes).map(str::to_string).map_err(|_| RowProblem::NotUtf8)
}

/// Text at row `i` of any string or binary array.
fn text_at(a: &dyn Array, i: usize) -> std::result::Result<String, RowProblem> {
    if a.is_null(i) {
        return Err(RowProblem::Null);
    }
    if let Some(b) = a.as_binary_opt::<i32>() {
        utf8(b.value(i))
    } else if let Some(b) = a.as_binary_opt::<i64>() {
        utf8(b.value(i))
    } else if let Some(b) = a.as_binary_view_opt() {
        utf8(b.value(i))
    } else if let Some(s) = a.as_string_opt::<i32>() {
        Ok(s.value(i).to_string())
    } else if let Some(s) = a.as_string_opt::<i64>() {
        Ok(s.value(i).to_string())
    } else if let Some(s) = a.as_string_view_opt() {
        Ok(s.value(i).to_string())
    } else {
        Err(RowProblem::Null)
    }
}

/// Messages at row `i` of a list<struct<role, content>> array.
fn messages_at(a: &dyn Array, i: usize) -> std::result::Result<Vec<Message>, RowProblem> {
    if a.is_null(i) {
        return Err(RowProblem::Null);
    }
    let (values, range) = if let Some(l) = a.as_list_opt::<i32>() {
        let o = l.value_offsets();
        (l.values(), o[i] as usize..o[i + 1] as usize)
    } else if let Some(l) = a.as_list_opt::<i64>() {
        let o = l.value_offsets();
        (l.values(), o[i] as usize..o[i + 1] as usize)
    } else {
        // A text cell in a message-list position (a string prompt): one user turn.
        return text_at(a, i).map(|content| vec![Message { role: "user".into(), content }]);
    };
    let items = values.as_struct_opt().ok_or(RowProblem::Null)?;
    let roles = items.column_by_name("role").ok_or(RowProblem::MissingRole)?;
    let contents = items.column_by_name("content").ok_or(RowProblem::Null)?;
    range
        .map(|j| {
            if items.is_null(j) {
                return Err(RowProblem::Null);
            }
            let role = text_at(roles.as_ref(), j)
                .map_err(|p| if p == RowProblem::Null { RowProblem::MissingRole } else { p })?;
            Ok(Message { role, content: text_at(contents.as_ref(), j)? })
        })
        .collect()
}
