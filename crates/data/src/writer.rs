//! Writing preference pairs (and per-pair log-prob sums) back to Parquet in the TRL schemas,
//! so converted datasets and precomputed reference log-probs round-trip through
//! [`PreferenceReader`](crate::PreferenceReader) / [`read_logps`].

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, ListArray, RecordBatch, StringArray, StructArray, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Float64Type, Schema, UInt32Type, UInt64Type};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{DataError, Location, Result};
use crate::example::{Message, PreferenceExample};
use crate::schema::{ColumnNames, Layout, conversational_schema, messages_type, standard_schema};

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::NotParquet { location: Location::file(path).into(), detail: e.to_string() }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

fn properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build()
}

/// Writes `examples` to `path` in `layout` (standard: strings; conversational: message lists,
/// with each completion a one-message list), `row_group_rows` rows per row group.
///
/// Text examples cannot be written as conversational and vice versa (an error says so);
/// [`Layout::ImplicitPrompt`] writes chosen = prompt + chosen and rejected = prompt + rejected
/// without a prompt column.
pub fn write_preferences(
    path: impl AsRef<Path>,
    examples: &[PreferenceExample],
    layout: Layout,
    names: &ColumnNames,
    row_group_rows: usize,
) -> Result<()> {
    let mut writer = PreferenceWriter::create(path, layout, names, row_group_rows)?;
    for chunk in examples.chunks(row_group_rows.max(1)) {
        writer.write(chunk)?;
    }
    writer.finish()
}

/// Streams preference pairs into a Parquet file: each [`write`](Self::write) call appends rows,
/// flushed as row groups of `row_group_rows`, so memory is bounded by a row group. The file
/// appears under its name only on [`finish`](Self::finish) (written as `*.tmp`, then renamed).
pub struct PreferenceWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    writer: ArrowWriter<File>,
    schema: Arc<Schema>,
    layout: Layout,
    rows: usize,
    row_group_rows: usize,
}

impl PreferenceWriter {
    /// Creates `path.tmp` for writing in `layout`.
    pub fn create(path: impl AsRef<Path>, layout: Layout, names: &ColumnNames, row_group_rows: usize) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let schema = Arc::new(match layout {
            Layout::Standard => standard_schema(names),
            Layout::Conversational => conversational_schema(names),
            Layout::ImplicitPrompt => Schema::new(vec![
                Field::new(&names.chosen, DataType::Utf8, false),
                Field::new(&names.rejected, DataType::Utf8, false),
            ]),
        });
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties(row_group_rows)))
            .map_err(|e| parquet_err(&path, e))?;
        Ok(Self { path, tmp, writer, schema, layout, rows: 0, row_group_rows: row_group_rows.max(1) })
    }

    /// Appends `examples`.
    pub fn write(&mut self, examples: &[PreferenceExample]) -> Result<()> {
        let columns = self.columns(examples)?;
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| parquet_err(&self.path, e))?;
        self.writer.write(&batch).map_err(|e| parquet_err(&self.path, e))?;
        self.rows += examples.len();
        if self.writer.in_progress_rows() >= self.row_group_rows {
            self.writer.flush().map_err(|e| parquet_err(&self.path, e))?;
        }
        Ok(())
    }

    /// Closes the file and moves it into place.
    pub fn finish(self) -> Result<()> {
        self.writer.close().map_err(|e| parquet_err(&self.path, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))
    }

    fn columns(&self, examples: &[PreferenceExample]) -> Result<Vec<ArrayRef>> {
        let layout = self.layout;
        let first = self.rows;
        match layout {
            Layout::Standard | Layout::ImplicitPrompt => {
                let mut texts: [Vec<String>; 3] = Default::default();
                for (i, e) in examples.iter().enumerate() {
                    let PreferenceExample::Text { prompt, chosen, rejected } = e else {
                        return Err(layout_mismatch(first + i, layout));
                    };
                    if layout == Layout::Standard {
                        texts[0].push(prompt.clone());
                        texts[1].push(chosen.clone());
                        texts[2].push(rejected.clone());
                    } else {
                        texts[1].push(format!("{prompt}{chosen}"));
                        texts[2].push(format!("{prompt}{rejected}"));
                    }
                }
                let [p, c, r] = texts.map(|t| Arc::new(StringArray::from(t)) as ArrayRef);
                Ok(if layout == Layout::Standard { vec![p, c, r] } else { vec![c, r] })
            }
            Layout::Conversational => {
                let mut lists: [Vec<Vec<Message>>; 3] = Default::default();
                for (i, e) in examples.iter().enumerate() {
                    let PreferenceExample::Chat { prompt, chosen, rejected } = e else {
                        return Err(layout_mismatch(first + i, layout));
                    };
                    lists[0].push(prompt.clone());
                    lists[1].push(vec![chosen.clone()]);
                    lists[2].push(vec![rejected.clone()]);
                }
                Ok(lists.iter().map(|l| message_list(l)).collect())
            }
        }
    }
}

fn layout_mismatch(row: usize, layout: Layout) -> DataError {
    DataError::Config {
        field: "layout".into(),
        detail: format!(
            "example {row} does not fit the {layout:?} layout (text examples need standard or implicit_prompt, chat examples conversational)"
        ),
    }
}

fn write_batch(path: &Path, batch: &RecordBatch, row_group_rows: usize) -> Result<()> {
    // Write next to the target and rename, so a reader never sees a half-written file.
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties(row_group_rows)))
        .map_err(|e| parquet_err(path, e))?;
    writer.write(batch).map_err(|e| parquet_err(path, e))?;
    writer.close().map_err(|e| parquet_err(path, e))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// A `list<struct<role, content>>` array of the given conversations.
pub fn message_list(conversations: &[Vec<Message>]) -> ArrayRef {
    let mut offsets = vec![0i32];
    let (mut roles, mut contents) = (Vec::new(), Vec::new());
    for conv in conversations {
        for m in conv {
            roles.push(m.role.as_str());
            contents.push(m.content.as_str());
        }
        offsets.push(i32::try_from(roles.len()).unwrap_or(i32::MAX));
    }
    let DataType::List(item) = messages_type() else { unreachable!("messages_type is a list") };
    let DataType::Struct(fields) = item.data_type().clone() else { unreachable!("list of struct") };
    let items = StructArray::new(
        fields,
        vec![Arc::new(StringArray::from(roles)) as ArrayRef, Arc::new(StringArray::from(contents))],
        None,
    );
    Arc::new(ListArray::new(item, OffsetBuffer::new(offsets.into()), Arc::new(items), None))
}

/// Per-pair log-prob sums and token counts of one model (e.g. the DPO reference).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairLogps {
    /// The pair's id (its row in the source file).
    pub pair: u64,
    /// Sum of chosen completion token log-probs.
    pub chosen_logp: f64,
    /// Sum of rejected completion token log-probs.
    pub rejected_logp: f64,
    /// Chosen completion tokens.
    pub chosen_tokens: u32,
    /// Rejected completion tokens.
    pub rejected_tokens: u32,
}

fn logps_schema() -> Schema {
    Schema::new(Fields::from(vec![
        Field::new("pair", DataType::UInt64, false),
        Field::new("chosen_logp", DataType::Float64, false),
        Field::new("rejected_logp", DataType::Float64, false),
        Field::new("chosen_tokens", DataType::UInt32, false),
        Field::new("rejected_tokens", DataType::UInt32, false),
    ]))
}

/// Writes per-pair log-prob sums (columns `pair`, `chosen_logp`, `rejected_logp`,
/// `chosen_tokens`, `rejected_tokens`), the format of precomputed reference log-probs.
pub fn write_logps(path: impl AsRef<Path>, rows: &[PairLogps]) -> Result<()> {
    let path = path.as_ref();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.pair))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.chosen_logp))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.rejected_logp))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.chosen_tokens))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.rejected_tokens))),
    ];
    let batch = RecordBatch::try_new(Arc::new(logps_schema()), columns).map_err(|e| parquet_err(path, e))?;
    write_batch(path, &batch, 65_536)
}

/// Reads a file written by [`write_logps`]; a missing column or a wrong type names the column.
pub fn read_logps(path: impl AsRef<Path>) -> Result<Vec<PairLogps>> {
    let path = path.as_ref();
    let file = File::open(path).map_err(io_err(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
    let expected = logps_schema();
    for field in expected.fields() {
        let found = builder.schema().field_with_name(field.name()).map_err(|_| DataError::MissingColumn {
            location: Location::file(path).column(field.name()).into(),
            expected: field.data_type().to_string(),
            found: builder.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
        })?;
        if found.data_type() != field.data_type() {
            return Err(DataError::WrongType {
                location: Location::file(path).column(field.name()).into(),
                expected: field.data_type().to_string(),
                found: found.data_type().to_string(),
            });
        }
    }
    let mut out = Vec::new();
    for batch in builder.build().map_err(|e| parquet_err(path, e))? {
        let batch = batch.map_err(|e| parquet_err(path, e))?;
        let col = |name: &str| batch.column_by_name(name).cloned();
        let (Some(p), Some(c), Some(r), Some(ct), Some(rt)) =
            (col("pair"), col("chosen_logp"), col("rejected_logp"), col("chosen_tokens"), col("rejected_tokens"))
        else {
            return Err(parquet_err(path, "columns vanished between schema and data"));
        };
        let first = out.len() as u64;
        for (name, a) in
            [("pair", &p), ("chosen_logp", &c), ("rejected_logp", &r), ("chosen_tokens", &ct), ("rejected_tokens", &rt)]
        {
            if let Some(i) = (0..a.len()).find(|&i| a.is_null(i)) {
                return Err(DataError::InvalidRow {
                    location: Location { row: Some(first + i as u64), ..Location::file(path).column(name) }.into(),
                    problem: crate::error::RowProblem::Null,
                });
            }
        }
        let (p, c, r) =
            (p.as_primitive::<UInt64Type>(), c.as_primitive::<Float64Type>(), r.as_primitive::<Float64Type>());
        let (ct, rt) = (ct.as_primitive::<UInt32Type>(), rt.as_primitive::<UInt32Type>());
        for i in 0..batch.num_rows() {
            out.push(PairLogps {
                pair: p.value(i),
                chosen_logp: c.value(i),
                rejected_logp: r.value(i),
                chosen_tokens: ct.value(i),
                rejected_tokens: rt.value(i),
            });
        }
    }
    Ok(out)
}
