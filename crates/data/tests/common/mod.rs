//! Shared fixtures: a byte-level BPE tokenizer trained on the fly, and Parquet writers for
//! hand-made (also malformed) schemas.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use slime_data::fixtures::{FIXTURE_SPECIAL_TOKENS, synthetic_chat_pairs, texts_of, train_byte_level_bpe};
use slime_data::{SpecialTokens, TextTokenizer};
use tokenizers::Tokenizer;

/// A byte-level BPE (about 600 tokens) trained on synthetic chats plus some English.
pub fn bpe() -> Tokenizer {
    static T: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut texts = texts_of(&synthetic_chat_pairs(200, 12, 16, 1));
        texts.extend(
            ["The answer is 42.", "The answer is 4", "Hello world, hello there!", "Paris is the capital of France."]
                .map(String::from),
        );
        // Frequent " 42" so that BPE learns the merge "Ġ4" that crosses the implicit-prompt boundary.
        texts.extend(std::iter::repeat_n(" 42 42 42 42".to_string(), 50));
        train_byte_level_bpe(&texts, 600, FIXTURE_SPECIAL_TOKENS).expect("training a fixture tokenizer")
    })
    .clone()
}

/// The fixture tokenizer with `bos`/`eos` as its BOS/EOS and the given BOS rule.
pub fn tokenizer(bos: &str, eos: &str, add_bos: bool) -> TextTokenizer {
    let t = bpe();
    let id = |s: &str| t.token_to_id(s).expect("fixture special token");
    let specials = SpecialTokens {
        bos: Some((bos.to_string(), id(bos))),
        eos: Some((eos.to_string(), id(eos))),
        pad_id: id("<pad>"),
        add_bos,
    };
    TextTokenizer::with_specials(t, "fixture", specials)
}

/// Writes `columns` as a Parquet file with `row_group_rows` rows per group.
pub fn write(path: &Path, columns: Vec<(&str, ArrayRef, bool)>, row_group_rows: usize) {
    let schema = Arc::new(Schema::new(
        columns.iter().map(|(n, a, nullable)| Field::new(*n, a.data_type().clone(), *nullable)).collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|(_, a, _)| a).collect()).expect("batch");
    let props = WriterProperties::builder().set_max_row_group_row_count(Some(row_group_rows)).build();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(path).expect("create"), schema, Some(props)).expect("writer");
    for start in (0..batch.num_rows()).step_by(row_group_rows) {
        let len = row_group_rows.min(batch.num_rows() - start);
        w.write(&batch.slice(start, len)).expect("write");
        w.flush().expect("flush");
    }
    w.close().expect("close");
}
