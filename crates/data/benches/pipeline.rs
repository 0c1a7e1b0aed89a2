//! Read + template + tokenize + batch a generated 20,000-row conversational Parquet file with a
//! byte-level BPE tokenizer of about 50k tokens (trained in-process on the same synthetic text,
//! or SmolLM2's real 49,152-token tokenizer when `cargo xtask assets` has put it under
//! `assets/`), and report how peak memory grows when the file has 4x the rows.
//!
//! `cargo bench -p slime-data --bench pipeline`

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use slime_data::fixtures::{FIXTURE_SPECIAL_TOKENS, synthetic_chat_pairs, texts_of, train_byte_level_bpe};
use slime_data::{
    BuiltinTemplate, ColumnNames, Layout, PairEncoder, PairStream, PreferenceWriter, ReadOptions, SpecialTokens,
    TextTokenizer, Truncation, batches,
};

const ROWS: usize = 20_000;
const PROMPT_WORDS: usize = 24;
const ANSWER_WORDS: usize = 32;

/// Writes `rows` synthetic pairs, generated and written 1,000 at a time (bounded memory).
fn write_file(path: &Path, rows: usize) {
    let mut w = PreferenceWriter::create(path, Layout::Conversational, &ColumnNames::default(), 1000).expect("writer");
    for chunk in 0..rows.div_ceil(1000) {
        let n = 1000.min(rows - chunk * 1000);
        w.write(&synthetic_chat_pairs(n, PROMPT_WORDS, ANSWER_WORDS, chunk as u64)).expect("write");
    }
    w.finish().expect("finish");
}

fn tokenizer() -> TextTokenizer {
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/smollm2-135m-instruct");
    if real.join("tokenizer.json").exists() {
        eprintln!("tokenizer: {}", real.display());
        return TextTokenizer::from_dir(&real).expect("SmolLM2 tokenizer");
    }
    let mut texts = texts_of(&synthetic_chat_pairs(20_000, PROMPT_WORDS, ANSWER_WORDS, 1_000_000));
    texts.extend((0..20_000).map(|i| format!("{i} {} {}", i * 7, i * 13)));
    let t = train_byte_level_bpe(&texts, 50_000, FIXTURE_SPECIAL_TOKENS).expect("train");
    eprintln!("tokenizer: trained byte-level BPE, {} tokens", t.get_vocab_size(true));
    let id = |s: &str| t.token_to_id(s).expect("special");
    let specials = SpecialTokens {
        bos: Some(("<|begin_of_text|>".into(), id("<|begin_of_text|>"))),
        eos: Some(("<|eot_id|>".into(), id("<|eot_id|>"))),
        pad_id: id("<pad>"),
        add_bos: false,
    };
    TextTokenizer::with_specials(t, "trained", specials)
}

/// One full pass: pairs and batches produced.
fn pass(path: &Path, encoder: &PairEncoder) -> (usize, usize) {
    let stream = PairStream::open(path, ReadOptions::default(), encoder, None).expect("open");
    let mut pairs = 0;
    let mut batches_seen = 0;
    for batch in batches(stream, 16, 0) {
        let batch = batch.expect("batch");
        pairs += batch.rows / 2;
        batches_seen += 1;
        black_box(&batch);
    }
    (pairs, batches_seen)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("pairs-20k.parquet");
    let large = dir.path().join("pairs-80k.parquet");
    write_file(&small, ROWS);
    write_file(&large, 4 * ROWS);
    let tok = tokenizer();
    let template = tok.chat_template(Some(BuiltinTemplate::Llama3)).expect("template");
    let encoder = PairEncoder::new(tok, Some(template), Truncation::default()).expect("encoder");
    let start = std::time::Instant::now();
    let (pairs, _) = pass(&small, &encoder);
    let secs = start.elapsed().as_secs_f64();
    eprintln!("one pass: {pairs} pairs in {secs:.2} s = {:.0} pairs/s", pairs as f64 / secs);

    // Memory: a pass over 4x the rows must not raise the peak (bounded by chunk and row group).
    let before = peak_rss_kib();
    let (pairs, _) = pass(&small, &encoder);
    let after_small = peak_rss_kib();
    let (pairs_large, _) = pass(&large, &encoder);
    let after_large = peak_rss_kib();
    eprintln!(
        "peak RSS: {} MiB before, {} MiB after {pairs} pairs, {} MiB after {pairs_large} pairs",
        before / 1024,
        after_small / 1024,
        after_large / 1024
    );

    // Stages alone, on 2,000 pairs: reading, encoding (template + tokenize), collating.
    let examples: Vec<_> = slime_data::PreferenceReader::open(&small, ReadOptions::default())
        .expect("open")
        .take(2000)
        .map(|r| r.expect("row").example)
        .collect();
    let pairs: Vec<_> = examples
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match encoder.encode(i as u64, e).expect("encode") {
            slime_data::Encoded::Pair { pair, .. } => Some(pair),
            slime_data::Encoded::Skipped(_) => None,
        })
        .collect();
    let mut stages = c.benchmark_group("stages_2k_pairs");
    stages.sample_size(10);
    stages.throughput(Throughput::Elements(2000));
    stages.bench_function("read", |b| {
        b.iter(|| slime_data::PreferenceReader::open(&small, ReadOptions::default()).expect("open").take(2000).count())
    });
    stages.bench_function("render_templates", |b| {
        let t = encoder.template().expect("template");
        b.iter(|| {
            for e in &examples {
                if let slime_data::PreferenceExample::Chat { prompt, chosen, rejected } = e {
                    black_box(t.split(prompt, chosen).expect("render"));
                    black_box(t.split(prompt, rejected).expect("render"));
                }
            }
        })
    });
    stages.bench_function("encode_sequential", |b| {
        b.iter(|| {
            for (i, e) in examples.iter().enumerate() {
                black_box(encoder.encode(i as u64, e).expect("encode"));
            }
        })
    });
    let texts: Vec<String> = examples
        .iter()
        .filter_map(|e| match e {
            slime_data::PreferenceExample::Chat { prompt, chosen, .. } => {
                encoder.template()?.split(prompt, chosen).ok()?
            }
            _ => None,
        })
        .flat_map(|(p, c)| [p, c])
        .collect();
    let inner = encoder.tokenizer().inner();
    let tokens: usize = texts.iter().map(|t| inner.encode_fast(t.as_str(), false).expect("encode").len()).sum();
    eprintln!("{} texts, {tokens} tokens, {} bytes", texts.len(), texts.iter().map(String::len).sum::<usize>());
    stages.bench_function("tokenizers_encode_fast_4k_texts", |b| {
        b.iter(|| texts.iter().map(|t| inner.encode_fast(t.as_str(), false).expect("encode").len()).sum::<usize>())
    });
    stages.bench_function("tokenizers_pre_tokenize_4k_texts", |b| {
        use tokenizers::PreTokenizer;
        let pre = inner.get_pre_tokenizer().expect("pre-tokenizer");
        b.iter(|| {
            texts
                .iter()
                .map(|t| {
                    let mut s = tokenizers::PreTokenizedString::from(t.as_str());
                    pre.pre_tokenize(&mut s).expect("pre");
                    s.get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Byte).len()
                })
                .sum::<usize>()
        })
    });
    stages.bench_function("collate_16", |b| {
        b.iter(|| {
            for c in pairs.chunks(16) {
                black_box(slime_data::collate_pairs(&c.iter().collect::<Vec<_>>(), 0));
            }
        })
    });
    stages.finish();

    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("read_template_tokenize_batch_20k_pairs", |b| b.iter(|| black_box(pass(&small, &encoder))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
