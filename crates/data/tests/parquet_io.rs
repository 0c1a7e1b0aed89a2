//! Reading and writing Parquet preference files: layouts, round trips, and bad input.

mod common;

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Float64Array, Int64Array, StringArray};
use slime_data::fixtures::synthetic_chat_pairs;
use slime_data::{
    ColumnNames, DataError, InvalidRows, Layout, Message, PreferenceExample, PreferenceReader, ReadOptions, RowProblem,
    message_list, write_preferences,
};

fn read_all(path: &std::path::Path, options: ReadOptions) -> Result<Vec<(u64, PreferenceExample)>, DataError> {
    PreferenceReader::open(path, options)?.map(|r| r.map(|r| (r.row, r.example))).collect()
}

fn text_pairs(n: usize) -> Vec<PreferenceExample> {
    (0..n)
        .map(|i| PreferenceExample::Text {
            prompt: format!("Question {i}: "),
            chosen: format!("good {i}"),
            rejected: format!("bad {}", i * 7),
        })
        .collect()
}

fn strings(v: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

#[test]
fn every_layout_round_trips_across_row_groups_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let names = ColumnNames::default();
    let chat = synthetic_chat_pairs(23, 5, 6, 3);
    let text = text_pairs(23);
    for (layout, examples) in
        [(Layout::Conversational, &chat), (Layout::Standard, &text), (Layout::ImplicitPrompt, &text)]
    {
        let path = dir.path().join(format!("{layout:?}.parquet"));
        write_preferences(&path, examples, layout, &names, 5).unwrap();
        let options = ReadOptions { batch_rows: 3, ..ReadOptions::default() };
        let reader = PreferenceReader::open(&path, options.clone()).unwrap();
        assert_eq!(reader.layout(), layout, "detected layout");
        assert_eq!(reader.total_rows(), 23);
        let back = read_all(&path, options).unwrap();
        let rows: Vec<u64> = back.iter().map(|(r, _)| *r).collect();
        assert_eq!(rows, (0..23).collect::<Vec<_>>());
        let back: Vec<_> = back.into_iter().map(|(_, e)| e).collect();
        assert_eq!(&back, examples, "{layout:?}");
    }
}

#[test]
fn ultrafeedback_binarized_schema_with_extra_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uf.parquet");
    let conv = |a: &str| vec![Message::new("user", "What is 2+2?"), Message::new("assistant", a)];
    common::write(
        &path,
        vec![
            ("prompt", strings(&["What is 2+2?", "What is 2+2?"]), false),
            ("prompt_id", strings(&["id0", "id1"]), false),
            ("chosen", message_list(&[conv("4"), conv("Four.")]), false),
            ("rejected", message_list(&[conv("5"), conv("22")]), false),
            ("messages", message_list(&[conv("4"), conv("Four.")]), false),
            ("score_chosen", Arc::new(Float64Array::from(vec![9.0, 8.5])), false),
            ("score_rejected", Arc::new(Float64Array::from(vec![2.0, 1.0])), false),
        ],
        10,
    );
    let back = read_all(&path, ReadOptions::default()).unwrap();
    assert_eq!(
        back[1].1,
        PreferenceExample::Chat {
            prompt: vec![Message::new("user", "What is 2+2?")],
            chosen: Message::new("assistant", "Four."),
            rejected: Message::new("assistant", "22"),
        }
    );
}

#[test]
fn configurable_column_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("named.parquet");
    let names = ColumnNames { prompt: "question".into(), chosen: "good".into(), rejected: "bad".into() };
    write_preferences(&path, &text_pairs(4), Layout::Standard, &names, 10).unwrap();
    let err = PreferenceReader::open(&path, ReadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("`chosen`") && err.contains("missing column") && err.contains("question, good, bad"), "{err}");
    let back = read_all(&path, ReadOptions { columns: names, ..ReadOptions::default() }).unwrap();
    assert_eq!(back.len(), 4);
}

fn expect_error(path: &std::path::Path, needles: &[&str]) {
    let err = match PreferenceReader::open(path, ReadOptions::default()) {
        Err(e) => e,
        Ok(reader) => reader.filter_map(Result::err).next().expect("an error"),
    };
    let text = err.to_string();
    for n in needles {
        assert!(text.contains(n), "error `{text}` lacks `{n}`");
    }
}

#[test]
fn bad_schemas_name_file_column_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("missing.parquet");
    common::write(&p, vec![("prompt", strings(&["a"]), false), ("chosen", strings(&["b"]), false)], 10);
    expect_error(&p, &["missing.parquet", "column `rejected`", "missing column", "expected a string or list"]);

    let p = dir.path().join("int.parquet");
    common::write(
        &p,
        vec![
            ("prompt", strings(&["a"]), false),
            ("chosen", Arc::new(Int64Array::from(vec![1])), false),
            ("rejected", strings(&["c"]), false),
        ],
        10,
    );
    expect_error(&p, &["int.parquet", "column `chosen`", "wrong type", "Int64"]);

    let p = dir.path().join("mixed.parquet");
    let conv = vec![vec![Message::new("assistant", "x")]];
    common::write(
        &p,
        vec![
            ("prompt", strings(&["a"]), false),
            ("chosen", strings(&["b"]), false),
            ("rejected", message_list(&conv), false),
        ],
        10,
    );
    expect_error(&p, &["column `rejected`", "same kind as `chosen`"]);

    let p = dir.path().join("forced.parquet");
    common::write(&p, vec![("chosen", strings(&["ab"]), false), ("rejected", strings(&["ac"]), false)], 10);
    let forced = ReadOptions { layout: Some(Layout::Conversational), ..ReadOptions::default() };
    let err = PreferenceReader::open(&p, forced).unwrap_err().to_string();
    assert!(err.contains("column `chosen`") && err.contains("list<struct<role"), "{err}");
}

/// 12 rows in row groups of 5; row 7 (row group 1) carries the defect.
fn defective(dir: &std::path::Path, name: &str, chosen: ArrayRef) -> std::path::PathBuf {
    let p = dir.join(name);
    let prompts: Vec<String> = (0..12).map(|i| format!("q{i}")).collect();
    let rejected: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    common::write(
        &p,
        vec![
            ("prompt", Arc::new(StringArray::from(prompts)), false),
            ("chosen", chosen, true),
            ("rejected", Arc::new(StringArray::from(rejected)), false),
        ],
        5,
    );
    p
}

#[test]
fn bad_values_name_row_group_row_and_column_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let good = |i: usize| format!("c{i}");
    let mut with_null: Vec<Option<String>> = (0..12).map(|i| Some(good(i))).collect();
    with_null[7] = None;
    let mut with_empty: Vec<String> = (0..12).map(good).collect();
    with_empty[7] = "  ".into();
    let mut bytes: Vec<Vec<u8>> = (0..12).map(|i| good(i).into_bytes()).collect();
    bytes[7] = vec![b'c', 0xff, 0xfe];
    let cases: Vec<(&str, ArrayRef, &str, RowProblem)> = vec![
        ("null.parquet", Arc::new(StringArray::from(with_null)), "null value", RowProblem::Null),
        ("empty.parquet", Arc::new(StringArray::from(with_empty)), "empty string", RowProblem::Empty),
        (
            "utf8.parquet",
            Arc::new(BinaryArray::from(bytes.iter().map(|b| b.as_slice()).collect::<Vec<_>>())),
            "invalid UTF-8",
            RowProblem::NotUtf8,
        ),
    ];
    for (name, column, what, problem) in cases {
        let p = defective(dir.path(), name, column);
        expect_error(&p, &[name, "row group 1", "row 7", "column `chosen`", what]);
        let skip = ReadOptions { invalid_rows: InvalidRows::Skip, batch_rows: 4, ..ReadOptions::default() };
        let mut reader = PreferenceReader::open(&p, skip).unwrap();
        let rows: Vec<u64> = reader.by_ref().map(|r| r.unwrap().row).collect();
        assert_eq!(rows, [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11], "{name}");
        assert_eq!(reader.stats().skipped.get(&problem), Some(&1), "{name}");
        assert_eq!(reader.stats().rows_read, 12);
        assert_eq!(reader.stats().row_groups, 3);
    }
}

#[test]
fn conversation_defects_name_the_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("turns.parquet");
    let ok = vec![Message::new("assistant", "fine")];
    let chosen = message_list(&[ok.clone(), vec![Message::new("user", "no answer")], ok.clone()]);
    let rejected = message_list(&[ok.clone(), ok.clone(), ok.clone()]);
    common::write(
        &p,
        vec![("prompt", strings(&["a", "b", "c"]), false), ("chosen", chosen, false), ("rejected", rejected, false)],
        2,
    );
    expect_error(&p, &["turns.parquet", "row group 0", "row 1", "column `chosen`", "no assistant turn"]);
}

#[test]
fn truncated_and_foreign_files_are_reported_not_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("whole.parquet");
    write_preferences(&p, &text_pairs(50), Layout::Standard, &ColumnNames::default(), 10).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&cut, &["cut.parquet", "not a readable Parquet file"]);
    let csv = dir.path().join("data.csv");
    std::fs::write(&csv, "prompt,chosen,rejected\na,b,c\n").unwrap();
    expect_error(&csv, &["data.csv", "not a readable Parquet file"]);
    let missing = dir.path().join("absent.parquet");
    expect_error(&missing, &["absent.parquet"]);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn drain(path: &std::path::Path) {
        if let Ok(reader) =
            PreferenceReader::open(path, ReadOptions { invalid_rows: InvalidRows::Error, ..ReadOptions::default() })
        {
            for _ in reader {}
        }
        if let Ok(reader) =
            PreferenceReader::open(path, ReadOptions { invalid_rows: InvalidRows::Skip, ..ReadOptions::default() })
        {
            for _ in reader {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("random.parquet");
            let mut data = bytes;
            if magic { data.splice(0..0, *b"PAR1"); data.extend_from_slice(b"PAR1"); }
            std::fs::write(&p, &data).unwrap();
            drain(&p);
        }

        #[test]
        fn corrupted_files_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("flipped.parquet");
            write_preferences(&p, &synthetic_chat_pairs(20, 4, 4, 9), Layout::Conversational, &ColumnNames::default(), 7).unwrap();
            let mut bytes = std::fs::read(&p).unwrap();
            for (at, value) in flips { let i = at.index(bytes.len()); bytes[i] = value; }
            std::fs::write(&p, &bytes).unwrap();
            drain(&p);
        }

        #[test]
        fn random_valid_schemas_never_panic(
            kinds in proptest::collection::vec(0u8..5, 3),
            cells in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..6)), 9),
            roles in proptest::collection::vec(prop::sample::select(vec!["user", "assistant", "system", ""]), 9),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("schema.parquet");
            let column = |kind: u8, offset: usize| -> ArrayRef {
                let cell = |i: usize| cells[(offset + i) % cells.len()].clone();
                match kind {
                    0 => Arc::new(StringArray::from((0..3).map(|i| cell(i).map(|b| String::from_utf8_lossy(&b).into_owned())).collect::<Vec<_>>())),
                    1 => Arc::new(BinaryArray::from((0..3).map(cell).collect::<Vec<_>>().iter().map(|c| c.as_deref()).collect::<Vec<_>>())),
                    2 => Arc::new(Int64Array::from(vec![1, 2, 3])),
                    _ => message_list(&(0..3).map(|i| (0..(i + offset) % 3).map(|j| Message::new(roles[(i + j + offset) % roles.len()], &format!("m{j}"))).collect()).collect::<Vec<_>>()),
                }
            };
            common::write(&p, vec![
                ("prompt", column(kinds[0], 0), true),
                ("chosen", column(kinds[1], 3), true),
                ("rejected", column(kinds[2], 6), true),
            ], 2);
            drain(&p);
        }
    }
}
