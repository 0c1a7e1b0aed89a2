//! The real `slime-trainer logps` and `generate` commands on a tiny random Llama saved with a
//! fixture byte-level BPE tokenizer (no downloads): the written log-prob sums equal an
//! independent computation (unbatched reference forward pass, full logits, log-softmax and
//! gather on the host in f64), token counts equal the completion lengths, greedy generation is
//! deterministic, stops at a stop token or max-new-tokens and, like sampling, does not depend on
//! `--batch-size`, and errors name the file.

mod common;
use common::Fixture;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use slime_data::fixtures::{FIXTURE_SPECIAL_TOKENS, train_byte_level_bpe};
use slime_data::{
    BuiltinTemplate, ColumnNames, Encoded, Layout, Message, PairEncoder, PreferenceExample, TextTokenizer,
    TokenizedPair, Truncation, read_logps, write_preferences,
};
use slime_models::{CausalLm, Model};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Per completion: `(position, token, logp)` rows of the per-token file.
type TokenRows = HashMap<(u64, bool), Vec<(u32, u32, f32)>>;

const PAIRS: usize = 14;

fn fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
    common::fixture(PAIRS, 11, 4, 7)
}

fn trainer(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<Output, std::io::Error> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slime-trainer"));
    for a in args {
        cmd.arg(a);
    }
    cmd.env("RUST_BACKTRACE", "0").env("RUST_LIB_BACKTRACE", "0").output()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(out: &Output) -> Result<(), String> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("exit {}\nstdout:\n{}\nstderr:\n{}", out.status, text(&out.stdout), text(&out.stderr)))
    }
}

/// The tokenized pairs, as the data crate encodes them.
fn encode(f: &Fixture, truncation: Truncation) -> Result<Vec<TokenizedPair>, Box<dyn std::error::Error>> {
    let tokenizer = TextTokenizer::from_dir(&f.model)?;
    let template = tokenizer.chat_template(None)?;
    let encoder = PairEncoder::new(tokenizer, Some(template), truncation)?;
    let mut out = Vec::new();
    for (i, e) in f.examples.iter().enumerate() {
        match encoder.encode(i as u64, e)? {
            Encoded::Pair { pair, .. } => out.push(pair),
            Encoded::Skipped(p) => return Err(format!("pair {i} skipped: {p}").into()),
        }
    }
    Ok(out)
}

/// Per-token log-probs of `completion` after `prompt`, computed independently of
/// `Model::token_logps`: one unpadded sequence through the reference (unfused) forward pass,
/// then every vocabulary logit on the host in f64, log-softmax, and the label's entry.
fn reference_token_logps(
    lm: &CausalLm,
    prompt: &[u32],
    completion: &[u32],
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let Model::Llama(llama) = lm.model() else { return Err("expected a Llama".into()) };
    let hidden: Vec<Vec<f32>> = llama.forward_hidden_reference(&input, None)?.squeeze(0)?.to_vec2()?;
    let weights = lm.weights();
    let head: Vec<Vec<f32>> = weights.get("lm_head.weight").ok_or("no lm_head.weight")?.to_vec2()?;
    let mut out = Vec::new();
    for t in prompt.len()..ids.len() {
        let h = &hidden[t - 1];
        let logits: Vec<f64> =
            head.iter().map(|w| w.iter().zip(h).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()).collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        out.push(logits[ids[t] as usize] - lse);
    }
    Ok(out)
}

#[test]
fn logps_sums_match_an_independent_computation() -> TestResult {
    let f = fixture()?;
    let out = f.root.join("out").join("logps.parquet");
    let run = trainer(&[
        &"logps",
        &"--model",
        &f.model,
        &"--data",
        &f.data,
        &"--out",
        &out,
        &"--batch-size",
        &"3",
        &"--per-token",
    ])?;
    succeeded(&run)?;
    let stdout = text(&run.stdout);
    assert!(stdout.contains(&format!("rows read {PAIRS}")), "{stdout}");
    assert!(stdout.contains("truncated 0"), "{stdout}");

    let rows = read_logps(&out)?;
    let pairs = encode(&f, Truncation::default())?;
    assert_eq!(rows.len(), PAIRS);
    let lm = CausalLm::from_dir(&f.model, &Device::Cpu)?;
    let mut expected_tokens: HashMap<(u64, bool), Vec<f64>> = HashMap::new();
    for (row, pair) in rows.iter().zip(&pairs) {
        assert_eq!(row.pair, pair.id, "file order, pair = row id");
        assert_eq!(row.chosen_tokens as usize, pair.chosen.len());
        assert_eq!(row.rejected_tokens as usize, pair.rejected.len());
        for (chosen, completion, got) in
            [(true, &pair.chosen, row.chosen_logp), (false, &pair.rejected, row.rejected_logp)]
        {
            let reference = reference_token_logps(&lm, &pair.prompt, completion)?;
            let sum: f64 = reference.iter().sum();
            assert!((got - sum).abs() < 1e-4, "pair {} chosen={chosen}: file {got}, reference {sum}", pair.id);
            expected_tokens.insert((pair.id, chosen), reference);
        }
    }

    // The per-token file: one row per completion token, positions 0.., same values.
    let tokens_path = f.root.join("out").join("logps.tokens.parquet");
    assert!(stdout.contains("logps.tokens.parquet"), "{stdout}");
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&tokens_path)?)?.build()?;
    let mut seen = TokenRows::new();
    for batch in reader {
        use arrow::array::AsArray;
        use arrow::datatypes::{Float32Type, UInt32Type, UInt64Type};
        let batch = batch?;
        let col = |name: &str| batch.column_by_name(name).cloned().ok_or(format!("no column {name}"));
        let (pair, which, position, token, logp) =
            (col("pair")?, col("which")?, col("position")?, col("token")?, col("logp")?);
        for i in 0..batch.num_rows() {
            let key = (pair.as_primitive::<UInt64Type>().value(i), which.as_string::<i32>().value(i) == "chosen");
            seen.entry(key).or_default().push((
                position.as_primitive::<UInt32Type>().value(i),
                token.as_primitive::<UInt32Type>().value(i),
                logp.as_primitive::<Float32Type>().value(i),
            ));
        }
    }
    assert_eq!(seen.len(), 2 * PAIRS);
    for pair in &pairs {
        for (chosen, completion) in [(true, &pair.chosen), (false, &pair.rejected)] {
            let got = &seen[&(pair.id, chosen)];
            let reference = &expected_tokens[&(pair.id, chosen)];
            assert_eq!(got.len(), completion.len());
            for (k, &(position, token, logp)) in got.iter().enumerate() {
                assert_eq!((position as usize, token), (k, completion[k]));
                assert!((f64::from(logp) - reference[k]).abs() < 1e-5, "pair {} token {k}", pair.id);
            }
        }
    }
    Ok(())
}

#[test]
fn logps_truncates_like_the_data_pipeline_and_counts_it() -> TestResult {
    let f = fixture()?;
    let out = f.root.join("truncated.parquet");
    let run = trainer(&[
        &"logps",
        &"--model",
        &f.model,
        &"--data",
        &f.data,
        &"--out",
        &out,
        &"--max-length",
        &"24",
        &"--max-prompt-length",
        &"16",
    ])?;
    succeeded(&run)?;
    let truncation = Truncation { max_length: Some(24), max_prompt_length: Some(16), ..Truncation::default() };
    let pairs = encode(&f, truncation)?;
    let full = encode(&f, Truncation::default())?;
    let rows = read_logps(&out)?;
    assert_eq!(rows.len(), pairs.len());
    for (row, pair) in rows.iter().zip(&pairs) {
        assert_eq!(
            (row.chosen_tokens as usize, row.rejected_tokens as usize),
            (pair.chosen.len(), pair.rejected.len())
        );
        assert!(pair.prompt.len() <= 16 && pair.prompt.len() + pair.chosen.len().max(pair.rejected.len()) <= 24);
    }
    let truncated = pairs.iter().zip(&full).filter(|(a, b)| a != b).count();
    assert!(truncated > 0, "the limits must bite for this test to mean anything");
    let stdout = text(&run.stdout);
    assert!(stdout.contains(&format!("truncated {truncated} (")), "{stdout}");
    Ok(())
}

#[test]
fn logps_drops_overlong_pairs_uncut_and_counts_them() -> TestResult {
    let f = fixture()?;
    let full = encode(&f, Truncation::default())?;
    let length = |p: &TokenizedPair| p.prompt.len() + p.chosen.len().max(p.rejected.len());
    // The median pair length: about half the pairs fit, the others are over it.
    let mut lengths: Vec<usize> = full.iter().map(length).collect();
    lengths.sort_unstable();
    let max_length = lengths[lengths.len() / 2];
    let out = f.root.join("dropped.parquet");
    let run = trainer(&[
        &"logps",
        &"--model",
        &f.model,
        &"--data",
        &f.data,
        &"--out",
        &out,
        &"--max-length",
        &max_length.to_string(),
        &"--overlong",
        &"drop",
    ])?;
    succeeded(&run)?;
    let fitting: Vec<&TokenizedPair> = full.iter().filter(|p| length(p) <= max_length).collect();
    let dropped = full.len() - fitting.len();
    assert!(dropped > 0 && !fitting.is_empty(), "the limit must drop some pairs and keep some: {lengths:?}");
    let rows = read_logps(&out)?;
    let kept: Vec<u64> = rows.iter().map(|r| r.pair).collect();
    assert_eq!(kept, fitting.iter().map(|p| p.id).collect::<Vec<_>>());
    for (row, pair) in rows.iter().zip(&fitting) {
        // Uncut: the whole completions are scored.
        assert_eq!(
            (row.chosen_tokens as usize, row.rejected_tokens as usize),
            (pair.chosen.len(), pair.rejected.len())
        );
    }
    let stdout = text(&run.stdout);
    assert!(stdout.contains(&format!("dropped {dropped} over-long pairs")), "{stdout}");
    Ok(())
}

#[test]
fn logps_errors_name_the_file_and_the_problem() -> TestResult {
    let f = fixture()?;
    let out = f.root.join("o.parquet");

    let missing = f.root.join("no-such-model");
    let run = trainer(&[&"logps", &"--model", &missing, &"--data", &f.data, &"--out", &out])?;
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains(&missing.display().to_string()) && stderr.contains("no such file or directory"),
        "{stderr}"
    );
    assert!(!out.exists());

    // A file whose rejected column has another name.
    let bad = f.root.join("bad.parquet");
    let names = ColumnNames { rejected: "rejected_text".into(), ..ColumnNames::default() };
    write_preferences(&bad, &f.examples, Layout::Conversational, &names, 4)?;
    let run = trainer(&[&"logps", &"--model", &f.model, &"--data", &bad, &"--out", &out])?;
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
    assert!(stderr.contains("missing column") && stderr.contains("`rejected`"), "{stderr}");
    assert!(stderr.contains("rejected_text"), "lists the columns the file has: {stderr}");
    assert!(!out.exists());

    // A tokenizer without a chat template and no --template, on conversational data.
    let plain = f.root.join("plain-model");
    std::fs::create_dir_all(&plain)?;
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(f.model.join(file), plain.join(file))?;
    }
    let run = trainer(&[&"logps", &"--model", &plain, &"--data", &f.data, &"--out", &out])?;
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(stderr.contains("--template"), "{stderr}");
    // With the built-in fallback it works and gives the same numbers (same template source).
    let run = trainer(&[&"logps", &"--model", &plain, &"--data", &f.data, &"--out", &out, &"--template", &"llama3"])?;
    succeeded(&run)?;
    assert_eq!(read_logps(&out)?.len(), PAIRS);
    Ok(())
}

/// A file with no pair to score is an error (not an empty output and exit 0); an error part
/// way through leaves no temporary per-token file; a directory named like the data file is
/// reported as a directory; a row longer than the context is named with the flag that fixes it.
#[test]
fn logps_refuses_empty_input_and_leaves_nothing_behind() -> TestResult {
    let f = fixture()?;
    let out = f.root.join("scores").join("o.parquet");
    let listing = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };

    let empty = f.root.join("empty.parquet");
    write_preferences(&empty, &[], Layout::Conversational, &ColumnNames::default(), 4)?;
    let run = trainer(&[&"logps", &"--model", &f.model, &"--data", &empty, &"--out", &out, &"--per-token"])?;
    assert!(!run.status.success(), "0 rows accepted: {}", text(&run.stdout));
    let stderr = text(&run.stderr);
    assert!(stderr.contains("empty.parquet: no pair to score (rows read 0"), "{stderr}");
    assert!(listing(&f.root.join("scores")).is_empty(), "{:?}", listing(&f.root.join("scores")));

    // Every row in the other part of the split: also nothing to score.
    let one = f.root.join("one.parquet");
    write_preferences(&one, &f.examples[..1], Layout::Conversational, &ColumnNames::default(), 4)?;
    let split = |part: &'static str| -> Result<Output, std::io::Error> {
        trainer(&[&"logps", &"--model", &f.model, &"--data", &one, &"--out", &out, &"--split", &part])
    };
    let (a, b) = (split("sft")?, split("preference")?);
    assert!(a.status.success() != b.status.success(), "exactly one part holds the row");
    let failed = if a.status.success() { &b } else { &a };
    assert!(text(&failed.stderr).contains("other split 1"), "{}", text(&failed.stderr));
    std::fs::remove_file(&out)?;

    // A row longer than the model's context (256), after the per-token file was started.
    let mut examples = f.examples.clone();
    if let PreferenceExample::Chat { rejected, .. } = &mut examples[PAIRS - 1] {
        rejected.content = "far too long ".repeat(300);
    }
    let long = f.root.join("long.parquet");
    write_preferences(&long, &examples, Layout::Conversational, &ColumnNames::default(), 4)?;
    let run = trainer(&[&"logps", &"--model", &f.model, &"--data", &long, &"--out", &out, &"--per-token"])?;
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(stderr.contains(&format!("long.parquet row {}: ", PAIRS - 1)), "{stderr}");
    assert!(stderr.contains("exceed the model's context of 256") && stderr.contains("--max-length 256"), "{stderr}");
    assert!(listing(&f.root.join("scores")).is_empty(), "{:?}", listing(&f.root.join("scores")));
    // --max-length beyond the context is refused before any work.
    let run = trainer(&[&"logps", &"--model", &f.model, &"--data", &f.data, &"--out", &out, &"--max-length", &"1024"])?;
    assert!(
        text(&run.stderr).contains("--max-length) = 1024 exceeds the model's context of 256"),
        "{}",
        text(&run.stderr)
    );

    // A directory is read as a set of shards: one without any is named as such.
    let dir = f.root.join("dir.parquet");
    std::fs::create_dir_all(&dir)?;
    let run = trainer(&[&"logps", &"--model", &f.model, &"--data", &dir, &"--out", &out])?;
    let stderr = text(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("dir.parquet: the directory has no *.parquet file; expected Parquet shards"), "{stderr}");
    assert!(!out.exists());
    Ok(())
}

fn write_prompts(f: &Fixture) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error>> {
    let jsonl = f.root.join("prompts.jsonl");
    let lines = [
        serde_json::json!({ "prompt": "kalo mine ruta." }),
        serde_json::json!({ "messages": [
            { "role": "system", "content": "shi po ve." },
            { "role": "user", "content": "dan tor el is an." }
        ] }),
        serde_json::json!({ "prompt": [{ "role": "user", "content": "quum bersta." }] }),
    ];
    std::fs::write(&jsonl, lines.iter().map(|l| l.to_string() + "\n").collect::<String>())?;
    let txt = f.root.join("prompts.txt");
    std::fs::write(&txt, "kalo mine ruta.\n\nexqu um ber.\n")?;
    Ok((jsonl, txt))
}

fn generations(out: &Output) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
    succeeded(out)?;
    Ok(text(&out.stdout).lines().map(serde_json::from_str).collect::<Result<_, _>>()?)
}

#[test]
fn greedy_generation_is_deterministic_and_stops() -> TestResult {
    let f = fixture()?;
    let (jsonl, txt) = write_prompts(&f)?;
    let max_new = 7;
    let args = |prompts: &Path| -> Vec<String> {
        ["generate", "--model", &f.model.display().to_string(), "--prompts", &prompts.display().to_string()]
            .into_iter()
            .map(String::from)
            .chain(["--max-new-tokens".into(), max_new.to_string()])
            .collect()
    };
    let run = |prompts: &Path, extra: &[&str]| -> std::io::Result<Output> {
        Command::new(env!("CARGO_BIN_EXE_slime-trainer"))
            .args(args(prompts))
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .output()
    };
    let first = run(&jsonl, &[])?;
    let second = run(&jsonl, &[])?;
    assert_eq!(first.stdout, second.stdout, "greedy decoding is deterministic");
    let lines = generations(&first)?;
    assert_eq!(lines.len(), 3);

    // The same decoding in-process: template, BOS rule, greedy, stop at EOS or end of turn.
    let tokenizer = TextTokenizer::from_dir(&f.model)?;
    let template = tokenizer.chat_template(None)?;
    let lm = CausalLm::from_dir(&f.model, &Device::Cpu)?;
    let eos = tokenizer.token_id("<eos>").ok_or("no <eos>")?;
    let eot = tokenizer.token_id("<|eot_id|>").ok_or("no <|eot_id|>")?;
    let conversations = [
        vec![Message::new("user", "kalo mine ruta.")],
        vec![Message::new("system", "shi po ve."), Message::new("user", "dan tor el is an.")],
        vec![Message::new("user", "quum bersta.")],
    ];
    for (line, conversation) in lines.iter().zip(&conversations) {
        let ids = tokenizer.with_bos(tokenizer.encode(&template.render(conversation, true)?)?);
        let new = lm.model().generate_greedy(&ids, max_new, &[eos, eot])?;
        let stopped = new.last().is_some_and(|t| *t == eos || *t == eot);
        let shown = if stopped { &new[..new.len() - 1] } else { &new[..] };
        assert_eq!(line["completion"].as_str(), Some(tokenizer.decode(shown, false)?.as_str()), "{line}");
        let tokens = line["tokens"].as_u64().ok_or("tokens")? as usize;
        assert_eq!(tokens, new.len());
        assert!(tokens <= max_new);
        let reason = line["finish_reason"].as_str().ok_or("finish_reason")?;
        assert_eq!(reason, if stopped { "stop" } else { "length" }, "{line}");
        if tokens < max_new {
            assert_eq!(reason, "stop");
        }
    }
    assert_eq!(lines[0]["prompt"], serde_json::json!("kalo mine ruta."));
    assert_eq!(lines[1]["prompt"][1]["content"], serde_json::json!("dan tor el is an."));

    // A stop token that greedy decoding produces: generation ends right after its first
    // occurrence, with finish_reason "stop".
    let ids = tokenizer.with_bos(tokenizer.encode(&template.render(&conversations[0], true)?)?);
    let free = lm.model().generate_greedy(&ids, max_new, &[])?;
    let target = free[2.min(free.len() - 1)];
    let first_at = free.iter().position(|&t| t == target).ok_or("target")?;
    let name = tokenizer.inner().id_to_token(target).ok_or("token string")?;
    let stopped = run(&txt, &["--stop", &name])?;
    let lines = generations(&stopped)?;
    assert_eq!(lines.len(), 2, "the text file has two non-empty lines");
    assert_eq!(lines[0]["finish_reason"], serde_json::json!("stop"), "{}", lines[0]);
    assert_eq!(lines[0]["tokens"].as_u64(), Some(first_at as u64 + 1));

    // The same token as the tokenizer's EOS (tokenizer_config.json): the same stop.
    let eos_model = f.root.join("eos-model");
    std::fs::create_dir_all(&eos_model)?;
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(f.model.join(file), eos_model.join(file))?;
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.model.join("tokenizer_config.json"))?)?;
    config["eos_token"] = serde_json::json!(name);
    std::fs::write(eos_model.join("tokenizer_config.json"), config.to_string())?;
    let eos_run = Command::new(env!("CARGO_BIN_EXE_slime-trainer"))
        .args(["generate", "--max-new-tokens", &max_new.to_string(), "--model"])
        .arg(&eos_model)
        .arg("--prompts")
        .arg(&txt)
        .output()?;
    let eos_lines = generations(&eos_run)?;
    assert_eq!(eos_lines[0]["finish_reason"], serde_json::json!("stop"), "{}", eos_lines[0]);
    assert_eq!(eos_lines[0]["tokens"].as_u64(), Some(first_at as u64 + 1));
    assert_eq!(eos_lines[0]["completion"], lines[0]["completion"]);

    // Sampling is reproducible per seed.
    let a = run(&jsonl, &["--temperature", "1.0", "--seed", "5"])?;
    let b = run(&jsonl, &["--temperature", "1.0", "--seed", "5"])?;
    assert_eq!(generations(&a)?, generations(&b)?);

    // The batch size changes nothing in the output, greedy or sampled (the three prompts have
    // different lengths: one batch of 3 by default, then 2 + 1, then one at a time).
    for size in ["1", "2"] {
        assert_eq!(run(&jsonl, &["--batch-size", size])?.stdout, first.stdout, "--batch-size {size}");
        let sampled = run(&jsonl, &["--temperature", "1.0", "--seed", "5", "--batch-size", size])?;
        assert_eq!(generations(&sampled)?, generations(&a)?, "sampled, --batch-size {size}");
    }
    let zero = run(&jsonl, &["--batch-size", "0"])?;
    assert!(!zero.status.success());
    assert!(text(&zero.stderr).contains("--batch-size"), "{}", text(&zero.stderr));

    // --out writes the same lines as stdout.
    let out = f.root.join("gen.jsonl");
    let to_file = run(&jsonl, &["--out", out.to_str().ok_or("path")?])?;
    succeeded(&to_file)?;
    assert_eq!(std::fs::read(&out)?, first.stdout);
    Ok(())
}

#[test]
fn generate_errors_name_the_file() -> TestResult {
    let f = fixture()?;
    let missing = f.root.join("absent.jsonl");
    let run = trainer(&[&"generate", &"--model", &f.model, &"--prompts", &missing])?;
    assert!(!run.status.success());
    assert!(text(&run.stderr).contains(&missing.display().to_string()), "{}", text(&run.stderr));

    let bad = f.root.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"fine\"}\n{\"text\": \"no prompt field\"}\n")?;
    let run = trainer(&[&"generate", &"--model", &f.model, &"--prompts", &bad])?;
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(stderr.contains(&format!("{}, line 2", bad.display())) && stderr.contains("`messages`"), "{stderr}");

    let model = f.root.join("nope");
    let (jsonl, _) = write_prompts(&f)?;
    let run = trainer(&[&"generate", &"--model", &model, &"--prompts", &jsonl])?;
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    assert!(stderr.contains(&model.display().to_string()) && stderr.contains("expected a model directory"), "{stderr}");
    Ok(())
}

#[test]
fn end_of_turn_tokens_of_the_builtin_templates() -> TestResult {
    let tokenizer = train_byte_level_bpe(&["some text".to_string()], 300, FIXTURE_SPECIAL_TOKENS)?;
    let config = serde_json::json!({ "bos_token": "<bos>", "eos_token": "<eos>" });
    let tokenizer = TextTokenizer::from_parts(tokenizer, "fixture", &config)?;
    for (builtin, eot) in [
        (BuiltinTemplate::Llama3, "<|eot_id|>"),
        (BuiltinTemplate::Gemma, "<end_of_turn>"),
        (BuiltinTemplate::Chatml, "<|im_end|>"),
    ] {
        let template = tokenizer.chat_template(Some(builtin))?;
        let expected = tokenizer.token_id(eot).ok_or(eot)?;
        assert_eq!(slime_trainer::generate::end_of_turn_token(&tokenizer, &template)?, Some(expected), "{builtin:?}");
        let stop = slime_trainer::generate::stop_tokens(&tokenizer, Some(&template), &[])?;
        let eos = tokenizer.token_id("<eos>").ok_or("<eos>")?;
        let mut both = vec![eos, expected];
        both.sort_unstable();
        assert_eq!(stop, both);
    }
    Ok(())
}
