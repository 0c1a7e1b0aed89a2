//! The whole pipeline over files: splits, statistics, batches.

mod common;

use std::collections::BTreeSet;

use slime_data::fixtures::synthetic_chat_pairs;
use slime_data::{
    BuiltinTemplate, ColumnNames, HashSplit, InvalidRows, Layout, PairEncoder, PairStream, PreferenceExample,
    ReadOptions, RowProblem, SplitPart, Truncation, batches, count_padding, load_pairs, write_preferences,
};

fn encoder(truncation: Truncation) -> PairEncoder {
    let tok = common::tokenizer("<|begin_of_text|>", "<eos>", false);
    let template = tok.chat_template(Some(BuiltinTemplate::Llama3)).expect("Llama 3 template");
    PairEncoder::new(tok, Some(template), truncation).expect("pair encoder")
}

/// The prompt texts of a split part, as a set (pair ids depend on file order; content doesn't).
fn part_contents(path: &std::path::Path, split: HashSplit, part: SplitPart) -> BTreeSet<Vec<u32>> {
    let (pairs, _) = load_pairs(path, ReadOptions::default(), &encoder(Truncation::default()), Some((split, part)))
        .expect("load pairs");
    pairs.into_iter().map(|p| [p.prompt, p.chosen].concat()).collect()
}

#[test]
fn hash_splits_are_disjoint_complete_and_independent_of_order_and_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let examples = synthetic_chat_pairs(90, 4, 4, 11);
    let mut reversed = examples.clone();
    reversed.reverse();
    let names = ColumnNames::default();
    let a = dir.path().join("a.parquet");
    let b = dir.path().join("b.parquet");
    write_preferences(&a, &examples, Layout::Conversational, &names, 7).unwrap();
    write_preferences(&b, &reversed, Layout::Conversational, &names, 1000).unwrap();
    let split = HashSplit::paper(5);
    let first = part_contents(&a, split, SplitPart::First);
    let second = part_contents(&a, split, SplitPart::Second);
    assert!(first.is_disjoint(&second));
    assert_eq!(first.len() + second.len(), 90);
    assert!((15..=45).contains(&first.len()), "about a third: {}", first.len());
    assert_eq!(first, part_contents(&b, split, SplitPart::First));
    assert_eq!(second, part_contents(&b, split, SplitPart::Second));
}

#[test]
fn statistics_count_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.parquet");
    let mut examples = synthetic_chat_pairs(40, 30, 30, 2);
    // Two rows that cannot be used: the reader skips them in skip mode.
    for i in [3, 17] {
        if let PreferenceExample::Chat { chosen, .. } = &mut examples[i] {
            chosen.content = " ".into();
        }
    }
    write_preferences(&path, &examples, Layout::Conversational, &ColumnNames::default(), 8).unwrap();
    let truncation = Truncation { max_length: Some(80), max_prompt_length: Some(40), ..Truncation::default() };
    let enc = encoder(truncation);
    let skip = ReadOptions { invalid_rows: InvalidRows::Skip, ..ReadOptions::default() };
    let split = HashSplit::paper(1);
    let mut stream = PairStream::open(&path, skip, &enc, Some((split, SplitPart::Second))).unwrap();
    let pairs: Vec<_> = stream.by_ref().collect::<Result<_, _>>().unwrap();
    let mut stats = stream.stats();
    assert_eq!(stats.read.rows_read, 40);
    assert_eq!(stats.read.skipped.get(&RowProblem::Empty), Some(&2));
    assert_eq!(stats.read.rows_yielded + 2, 40);
    assert_eq!(stats.other_split + stats.encode.pairs + stats.encode.skipped.values().sum::<u64>(), 38);
    assert_eq!(stats.encode.pairs as usize, pairs.len());
    assert!(stats.encode.truncated_pairs > 0, "long synthetic prompts are truncated");
    assert!(pairs.iter().all(|p| p.prompt.len() <= 40 && p.prompt.len() + p.chosen.len().max(p.rejected.len()) <= 80));
    let tokens: usize = pairs.iter().map(|p| p.prompt.len() + p.chosen.len() + p.rejected.len()).sum();
    assert_eq!(stats.encode.tokens, tokens as u64);

    let mut seen = Vec::new();
    let mut expected_padding = 0;
    for group in pairs.chunks(4) {
        let lens: Vec<usize> =
            group.iter().flat_map(|p| [p.prompt.len() + p.chosen.len(), p.prompt.len() + p.rejected.len()]).collect();
        let longest = lens.iter().max().unwrap();
        expected_padding += lens.iter().map(|l| longest - l).sum::<usize>() as u64;
    }
    for batch in batches(pairs.clone().into_iter().map(Ok), 4, 0) {
        let batch = batch.unwrap();
        count_padding(&mut stats, &batch);
        seen.extend(batch.pair_ids.iter().copied());
        for (r, &len) in batch.completion_lens.iter().enumerate() {
            let row = &batch.completion_mask[r * batch.seq_len..(r + 1) * batch.seq_len];
            assert_eq!(row.iter().map(|&m| u32::from(m)).sum::<u32>(), len);
        }
    }
    assert_eq!(seen, pairs.iter().map(|p| p.id).collect::<Vec<_>>());
    assert_eq!(stats.padding_positions, expected_padding);
    assert!(stats.padding_fraction() > 0.0 && stats.padding_fraction() < 1.0);
    let line = stats.to_string();
    assert!(line.contains("rows read 40") && line.contains("empty=2"), "{line}");
}

#[test]
fn an_invalid_row_stops_the_stream_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.parquet");
    let mut examples = synthetic_chat_pairs(30, 4, 4, 2);
    if let PreferenceExample::Chat { rejected, .. } = &mut examples[21] {
        rejected.content = String::new();
    }
    write_preferences(&path, &examples, Layout::Conversational, &ColumnNames::default(), 10).unwrap();
    let enc = encoder(Truncation::default());
    let results: Vec<_> = PairStream::open(&path, ReadOptions::default(), &enc, None).unwrap().collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 21, "rows before the bad one are delivered");
    let err = results.last().unwrap().as_ref().unwrap_err().to_string();
    assert!(err.contains("row group 2") && err.contains("row 21") && err.contains("column `rejected`"), "{err}");
}
