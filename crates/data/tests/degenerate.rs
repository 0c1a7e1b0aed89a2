//! Degenerate rows are counted, never silently accepted: pairs whose chosen equals the rejected
//! completion, rows repeated verbatim, and prompts that fall into more than one split part.

mod common;

use slime_data::{
    BuiltinTemplate, ColumnNames, DegenerateCounts, HashSplit, Layout, Message, PairEncoder, PairStream,
    PreferenceExample, ReadOptions, SplitAudit, SplitPart, Truncation, write_preferences,
};

fn chat(prompt: &str, chosen: &str, rejected: &str) -> PreferenceExample {
    PreferenceExample::Chat {
        prompt: vec![Message::new("user", prompt)],
        chosen: Message::new("assistant", chosen),
        rejected: Message::new("assistant", rejected),
    }
}

fn text(prompt: &str, chosen: &str, rejected: &str) -> PreferenceExample {
    PreferenceExample::Text { prompt: prompt.into(), chosen: chosen.into(), rejected: rejected.into() }
}

#[test]
fn the_audit_counts_each_kind_of_degenerate_row() {
    let mut audit = SplitAudit::default();
    audit.record(0, &text("p1", "a", "b"));
    assert!(audit.counts().is_clean());
    audit.record(0, &text("p2", "same", "same"));
    audit.record(1, &chat("p3", "x", "x"));
    // A verbatim repeat (same part: identical rows hash alike).
    audit.record(0, &text("p1", "a", "b"));
    // The same prompt with other completions in two more parts: one prompt, counted once.
    audit.record(1, &text("p1", "c", "d"));
    audit.record(2, &text("p1", "e", "f"));
    // Same text prompt, but as a chat prompt it is a different prompt.
    audit.record(1, &chat("p2", "a", "b"));
    let counts = audit.counts();
    assert_eq!(
        counts,
        DegenerateCounts { identical_completions: 2, duplicate_rows: 1, prompts_in_several_parts: 1 },
        "{counts}"
    );
    assert_eq!(counts.to_string(), "2 pairs with chosen = rejected, 1 duplicate rows, 1 prompts in several splits");
}

#[test]
fn a_load_reports_degenerate_rows_of_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pairs.parquet");
    let split = HashSplit::paper(3);
    // Find a prompt whose two variants land in different parts, so the cross-split count is real.
    let (a, b) = (0..1000)
        .map(|i| (chat(&format!("question {i}"), "yes", "no"), chat(&format!("question {i}"), "maybe", "never")))
        .find(|(a, b)| split.part(a) != split.part(b))
        .expect("a prompt split across parts");
    let mut examples: Vec<PreferenceExample> =
        (0..20).map(|i| chat(&format!("distinct {i}"), &format!("good {i}"), &format!("bad {i}"))).collect();
    examples.push(chat("echo", "the same answer", "the same answer"));
    examples.push(examples[3].clone());
    examples.push(examples[3].clone());
    examples.push(a);
    examples.push(b);
    write_preferences(&path, &examples, Layout::Conversational, &ColumnNames::default(), 8).expect("write");
    let tok = common::tokenizer("<|begin_of_text|>", "<eos>", false);
    let template = tok.chat_template(Some(BuiltinTemplate::Llama3)).expect("template");
    let encoder = PairEncoder::new(tok, Some(template), Truncation::default()).expect("encoder");
    let mut stream =
        PairStream::open(&path, ReadOptions::default(), &encoder, Some((split, SplitPart::First))).expect("open");
    let kept = stream.by_ref().collect::<Result<Vec<_>, _>>().expect("pairs");
    let stats = stream.stats();
    assert_eq!(
        stats.degenerate,
        DegenerateCounts { identical_completions: 1, duplicate_rows: 2, prompts_in_several_parts: 1 },
        "{stats}"
    );
    // Counted, not dropped: every row of the part is still there.
    assert_eq!(kept.len() as u64 + stats.other_split, examples.len() as u64);
    assert!(stats.to_string().contains("degenerate: 1 pairs with chosen = rejected, 2 duplicate rows"), "{stats}");
}
