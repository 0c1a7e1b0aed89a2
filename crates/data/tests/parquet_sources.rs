//! Parquet as other tools write it: every compression codec, datasets split into shards (a
//! directory or a glob, as the Hugging Face Hub lays them out), and ambiguous schemas.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
use parquet::file::properties::WriterProperties;
use slime_data::{
    ColumnNames, DataError, Layout, PreferenceExample, PreferenceReader, ReadOptions, RowProblem, parquet_files,
    write_preferences,
};

fn text_pairs(range: std::ops::Range<usize>) -> Vec<PreferenceExample> {
    range
        .map(|i| PreferenceExample::Text {
            prompt: format!("Question {i}: "),
            chosen: format!("good {i}"),
            rejected: format!("bad {i}"),
        })
        .collect()
}

fn strings(v: &[String]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

/// Writes standard-layout text pairs with the given codec, two rows per row group.
fn write_with(path: &Path, pairs: &[PreferenceExample], compression: Compression) {
    let text = |e: &PreferenceExample, which: usize| match e {
        PreferenceExample::Text { prompt, chosen, rejected } => [prompt, chosen, rejected][which].clone(),
        PreferenceExample::Chat { .. } => unreachable!("text pairs only"),
    };
    let column = |which: usize| strings(&pairs.iter().map(|e| text(e, which)).collect::<Vec<_>>());
    let columns = vec![column(0), column(1), column(2)];
    let schema =
        Arc::new(Schema::new(["prompt", "chosen", "rejected"].map(|n| Field::new(n, DataType::Utf8, false)).to_vec()));
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("batch");
    let props = WriterProperties::builder().set_compression(compression).set_max_row_group_row_count(Some(2)).build();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path).expect("create"), schema, Some(props))
        .unwrap_or_else(|e| panic!("{compression:?}: {e}"));
    writer.write(&batch).unwrap_or_else(|e| panic!("{compression:?}: {e}"));
    writer.close().unwrap_or_else(|e| panic!("{compression:?}: {e}"));
}

fn read(path: &Path) -> Result<Vec<(u64, PathBuf, u64, PreferenceExample)>, DataError> {
    PreferenceReader::open(path, ReadOptions::default())?
        .map(|r| r.map(|r| (r.row, r.file.to_path_buf(), r.file_row, r.example)))
        .collect()
}

fn examples(rows: Vec<(u64, PathBuf, u64, PreferenceExample)>) -> Vec<PreferenceExample> {
    rows.into_iter().map(|r| r.3).collect()
}

#[test]
fn every_codec_parquet_rs_offers_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = text_pairs(0..7);
    let codecs = [
        Compression::UNCOMPRESSED,
        Compression::SNAPPY,
        Compression::GZIP(GzipLevel::default()),
        Compression::LZ4,
        Compression::LZ4_RAW,
        Compression::BROTLI(BrotliLevel::default()),
        Compression::ZSTD(ZstdLevel::default()),
    ];
    for codec in codecs {
        let path = dir.path().join(format!("{codec:?}.parquet").replace(['(', ')', ' ', '{', '}', ':'], "_"));
        write_with(&path, &pairs, codec);
        let meta = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let written = parquet::file::reader::FileReader::metadata(&meta).row_group(0).column(0).compression();
        assert_eq!(std::mem::discriminant(&written), std::mem::discriminant(&codec), "{codec:?} was written");
        let back = read(&path).unwrap_or_else(|e| panic!("{codec:?}: {e}"));
        assert_eq!(examples(back), pairs, "{codec:?}");
    }
}

/// Writes `rows` pairs per shard as the Hub names them: `train-0000i-of-0000n.parquet`.
fn write_shards(dir: &Path, split: &str, rows: &[usize]) -> Vec<PreferenceExample> {
    std::fs::create_dir_all(dir).expect("shard directory");
    let (mut start, mut all) = (0, Vec::new());
    for (i, n) in rows.iter().enumerate() {
        let pairs = text_pairs(start..start + n);
        let name = format!("{split}-{i:05}-of-{:05}.parquet", rows.len());
        write_preferences(dir.join(name), &pairs, Layout::Standard, &ColumnNames::default(), 3).expect("shard");
        all.extend(pairs);
        start += n;
    }
    all
}

#[test]
fn a_directory_of_shards_reads_in_name_order_as_one_dataset() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let train = write_shards(&data, "train", &[4, 0, 5, 3]);
    std::fs::write(data.join("README.md"), "not a shard").unwrap();
    std::fs::create_dir(data.join("nested.parquet")).unwrap();
    let reader = PreferenceReader::open(&data, ReadOptions::default()).unwrap();
    assert_eq!(reader.total_rows(), 12);
    assert_eq!(reader.files().len(), 4, "{:?}", reader.files());
    let back = read(&data).unwrap();
    assert_eq!(back.iter().map(|r| r.0).collect::<Vec<_>>(), (0..12).collect::<Vec<_>>(), "dataset rows");
    // Rows 4..9 are in the third file (the second is empty), rows 0..5 of it.
    assert_eq!(back[6].1, data.join("train-00002-of-00004.parquet"));
    assert_eq!(back[6].2, 2);
    assert_eq!(examples(back), train);

    let mut reader = PreferenceReader::open(&data, ReadOptions::default()).unwrap();
    assert_eq!(reader.by_ref().count(), 12);
    assert_eq!((reader.stats().files, reader.stats().rows_read, reader.stats().rows_yielded), (4, 12, 12));
}

#[test]
fn a_glob_picks_one_split_of_a_hub_layout() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let test = write_shards(&data, "test", &[2, 2]);
    let train = write_shards(&data, "train", &[3, 3, 1]);
    let back = read(&data.join("train-*.parquet")).unwrap();
    assert_eq!(examples(back), train);
    let back = read(&data.join("test-0000?-of-00002.parquet")).unwrap();
    assert_eq!(examples(back), test);
    let files = parquet_files(&data.join("*.parquet")).unwrap();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 5);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted: {names:?}");
}

#[test]
fn an_empty_directory_or_pattern_is_an_error_naming_it() {
    let root = tempfile::tempdir().unwrap();
    let err = read(root.path()).unwrap_err();
    assert!(matches!(err, DataError::Shards { .. }), "{err}");
    assert!(err.to_string().contains(&root.path().display().to_string()) && err.to_string().contains("*.parquet"));
    let pattern = root.path().join("train-*.parquet");
    let err = read(&pattern).unwrap_err().to_string();
    assert!(err.contains("train-*.parquet") && err.contains("matches no file"), "{err}");
    let err = read(&root.path().join("[unclosed.parquet")).unwrap_err().to_string();
    assert!(err.contains("glob pattern"), "{err}");
}

#[test]
fn a_bad_row_in_a_later_shard_names_that_shard_and_its_row() {
    let root = tempfile::tempdir().unwrap();
    write_shards(root.path(), "train", &[3, 3]);
    let bad = root.path().join("train-00002-of-00003.parquet");
    let prompts: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
    let mut chosen: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    chosen[2] = "  ".into();
    common::write(
        &bad,
        vec![
            ("prompt", strings(&prompts), false),
            ("chosen", strings(&chosen), false),
            ("rejected", strings(&prompts), false),
        ],
        2,
    );
    let mut reader = PreferenceReader::open(root.path(), ReadOptions::default()).unwrap();
    let rows: Vec<_> = reader.by_ref().take_while(Result::is_ok).collect();
    assert_eq!(rows.len(), 8, "6 rows of the good shards, then rows 0 and 1 of the bad one");
    let err = read(root.path()).unwrap_err();
    let DataError::InvalidRow { location, problem } = &err else { panic!("{err}") };
    assert_eq!(*problem, RowProblem::Empty);
    assert_eq!(
        (location.path.as_path(), location.row, location.column.as_deref()),
        (bad.as_path(), Some(2), Some("chosen"))
    );
    assert!(err.to_string().contains("train-00002-of-00003.parquet, row group 1, row 2, column `chosen`"), "{err}");
}

#[test]
fn shards_must_share_a_layout() {
    let root = tempfile::tempdir().unwrap();
    write_shards(root.path(), "a", &[2]);
    let chat = slime_data::fixtures::synthetic_chat_pairs(3, 2, 2, 1);
    write_preferences(root.path().join("b.parquet"), &chat, Layout::Conversational, &ColumnNames::default(), 3)
        .unwrap();
    let err = PreferenceReader::open(root.path(), ReadOptions::default()).unwrap_err();
    let DataError::WrongType { location, .. } = &err else { panic!("{err}") };
    assert_eq!(location.path, root.path().join("b.parquet"), "{err}");
}

#[test]
fn duplicate_column_names_are_rejected_naming_column_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.parquet");
    let two: Vec<String> = vec!["x".into(), "y".into()];
    common::write(
        &path,
        vec![
            ("prompt", strings(&two), false),
            ("chosen", strings(&two), false),
            ("rejected", strings(&two), false),
            ("chosen", strings(&["z".to_string(), "w".to_string()]), false),
        ],
        10,
    );
    let err = read(&path).unwrap_err();
    let DataError::DuplicateColumn { location, count } = &err else { panic!("{err}") };
    assert_eq!((location.column.as_deref(), *count), (Some("chosen"), 2));
    let text = err.to_string();
    assert!(text.contains("dup.parquet") && text.contains("`chosen`") && text.contains("2 times"), "{text}");
    // An unused column name twice is just as ambiguous to other tools: rejected too.
    common::write(
        &path,
        vec![
            ("prompt", strings(&two), false),
            ("chosen", strings(&two), false),
            ("rejected", strings(&two), false),
            ("score", strings(&two), true),
            ("score", strings(&two), true),
        ],
        10,
    );
    let err = read(&path).unwrap_err().to_string();
    assert!(err.contains("`score`") && err.contains("2 times"), "{err}");
}
