//! Training a pretrained-model directory on a Parquet preference file (the path the real presets
//! take), on a tiny random Llama saved with a fixture byte-level BPE tokenizer (no downloads):
//! hash splits independent of file order, the load's counts, LoRA SFT then a preference stage,
//! reference log-probs cached as Parquet equal to `slime-trainer logps`, and precomputed
//! reference log-probs giving the same run.

mod common;
use common::Fixture;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use candle_core::Device;
use slime_data::{ColumnNames, Layout, PreferenceExample, TextTokenizer, read_logps, write_preferences};
use slime_models::{CausalLm, LlamaConfig};
use slime_objectives::{DpoParams, Objective, SlimeParams};
use slime_trainer::config::{LoraSpec, RunConfig};
use slime_trainer::corpus::RunData;
use slime_trainer::run::run;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PAIRS: usize = 60;

fn fixture() -> Result<Fixture, Box<dyn std::error::Error>> {
    common::fixture(PAIRS, 23, 7, 5)
}

fn config(f: &Fixture) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.path = Some(f.model.clone());
    cfg.data.parquet = Some(f.data.clone());
    cfg.data.eval_fraction = 0.2;
    cfg.data.eval_pairs = 8;
    // The fixture model's context (max_position_embeddings) is 256.
    cfg.data.max_length = Some(256);
    cfg.data.max_prompt_length = Some(128);
    cfg.sft.steps = 0;
    cfg.sft.batch_size = 4;
    cfg.preference.steps = 0;
    cfg.preference.batch_size = 4;
    cfg.eval.generations = 2;
    cfg.eval.max_new_tokens = 6;
    cfg.eval.every = 100;
    cfg.eval.batch_size = 5;
    cfg.checkpoint.every = 0;
    cfg
}

fn load(cfg: &RunConfig, model: &Path) -> Result<RunData, Box<dyn std::error::Error>> {
    let tokenizer = TextTokenizer::from_dir(model)?;
    let template = tokenizer.chat_template(None)?;
    let vocab = tokenizer.vocab_size();
    Ok(RunData::from_parquet(&cfg.data, tokenizer, model, Some(template), vocab)?)
}

/// Each split as a set of (prompt, chosen, rejected) token sequences.
type Parts = [BTreeSet<(Vec<u32>, Vec<u32>, Vec<u32>)>; 3];

fn parts(d: &RunData) -> Parts {
    let set = |xs: &[slime_trainer::corpus::Example]| {
        xs.iter().map(|e| (e.tokens.prompt.clone(), e.tokens.chosen.clone(), e.tokens.rejected.clone())).collect()
    };
    [set(&d.sft), set(&d.preference), set(&d.eval)]
}

#[test]
fn splits_depend_on_content_not_on_file_order() -> TestResult {
    let f = fixture()?;
    let mut cfg = config(&f);
    cfg.data.eval_pairs = PAIRS;
    let forward = load(&cfg, &f.model)?;
    let reversed_path = f.root.join("reversed.parquet");
    let reversed: Vec<PreferenceExample> = f.examples.iter().rev().cloned().collect();
    write_preferences(&reversed_path, &reversed, Layout::Conversational, &ColumnNames::default(), 3)?;
    cfg.data.parquet = Some(reversed_path);
    let backward = load(&cfg, &f.model)?;
    let (a, b) = (parts(&forward), parts(&backward));
    assert_eq!(a, b, "the same rows land in the same splits whatever the order and row groups");
    let sizes = a.iter().map(BTreeSet::len).collect::<Vec<_>>();
    assert_eq!(sizes.iter().sum::<usize>(), PAIRS, "{sizes:?}");
    assert!(a[0].is_disjoint(&a[1]) && a[0].is_disjoint(&a[2]) && a[1].is_disjoint(&a[2]));
    assert!(sizes.iter().all(|&n| n > 0), "{sizes:?}");
    // A different split seed moves rows.
    cfg.data.split_seed = 9;
    assert_ne!(parts(&load(&cfg, &f.model)?), b);
    // The held-out cap: rows beyond it are counted, not used.
    cfg.data.eval_pairs = 2;
    let capped = load(&cfg, &f.model)?;
    let s = capped.summary.as_ref().ok_or("no summary")?;
    assert_eq!(capped.eval.len(), 2);
    assert_eq!(s.sft_pairs + s.preference_pairs + s.eval_pairs + s.eval_unused, PAIRS);
    assert_eq!(s.rows, PAIRS as u64);
    Ok(())
}

#[test]
fn truncation_and_skips_are_counted() -> TestResult {
    let f = fixture()?;
    let mut cfg = config(&f);
    cfg.data.max_length = Some(12);
    cfg.data.max_prompt_length = Some(11);
    let d = load(&cfg, &f.model)?;
    let s = d.summary.as_ref().ok_or("no summary")?;
    assert!(s.truncated_pairs > 0, "{s:?}");
    let longest = d.sft.iter().chain(&d.preference).map(|e| e.tokens.prompt.len() + e.tokens.chosen.len()).max();
    assert!(longest.is_some_and(|n| n <= 12), "{longest:?}");
    Ok(())
}

#[test]
fn overlong_pairs_are_dropped_from_preference_and_heldout_and_counted() -> TestResult {
    let f = fixture()?;
    let mut cfg = config(&f);
    cfg.data.eval_pairs = PAIRS;
    cfg.data.max_prompt_length = None;
    cfg.data.max_length = None;
    let full = load(&cfg, &f.model)?;
    let length =
        |e: &slime_trainer::corpus::Example| e.tokens.prompt.len() + e.tokens.chosen.len().max(e.tokens.rejected.len());
    let mut lengths: Vec<usize> = full.sft.iter().chain(&full.preference).chain(&full.eval).map(length).collect();
    lengths.sort_unstable();
    let limit = lengths[lengths.len() / 2];
    let fitting = lengths.iter().filter(|&&l| l <= limit).count() as u64;
    let too_long = |split: &[slime_trainer::corpus::Example]| split.iter().filter(|e| length(e) > limit).count() as u64;
    cfg.data.max_length = Some(limit);
    cfg.data.overlong = slime_data::Overlong::Drop;
    let dropped = load(&cfg, &f.model)?;
    let s = dropped.summary.as_ref().ok_or("no summary")?;
    assert_eq!(s.dropped_overlong.get("preference").copied().unwrap_or(0), too_long(&full.preference), "{s:?}");
    assert_eq!(s.dropped_overlong.get("held-out").copied().unwrap_or(0), too_long(&full.eval), "{s:?}");
    assert!(s.dropped_overlong.values().sum::<u64>() > 0, "the limit is the median: some pairs are longer");
    assert!(dropped.preference.iter().chain(&dropped.eval).all(|e| length(e) <= limit), "kept pairs are whole");
    assert_eq!(dropped.preference.len() as u64, full.preference.len() as u64 - too_long(&full.preference));
    assert_eq!(dropped.sft.len(), full.sft.len(), "SFT pairs are cut, not dropped");
    assert_eq!(s.truncated_pairs, too_long(&full.sft), "only SFT pairs were cut");
    assert_eq!((s.lengths.pairs, s.lengths.fitting, s.lengths.max_length), (PAIRS as u64, fitting, Some(limit)));
    assert_eq!(s.lengths.max, *lengths.last().ok_or("no pairs")?);
    assert_eq!(s.lengths.median, lengths[PAIRS.div_ceil(2) - 1], "nearest rank");
    // Cutting keeps every pair, and the same length distribution.
    cfg.data.overlong = slime_data::Overlong::Truncate;
    let cut = load(&cfg, &f.model)?;
    let c = cut.summary.as_ref().ok_or("no summary")?;
    assert!(c.dropped_overlong.is_empty() && c.lengths == s.lengths, "{c:?}");
    assert_eq!(cut.preference.len(), full.preference.len());
    Ok(())
}

#[test]
fn a_heldout_file_with_answers_is_graded_by_the_checker_and_results_carry_items() -> TestResult {
    use slime_trainer::verifiable::{HeldOutPrompt, Skill};
    let f = fixture()?;
    let mut cfg = config(&f);
    let heldout: Vec<PreferenceExample> = f.examples[..6].to_vec();
    let heldout_path = f.root.join("heldout.parquet");
    write_preferences(&heldout_path, &heldout, Layout::Conversational, &ColumnNames::default(), 4)?;
    let answers: Vec<HeldOutPrompt> = (0..6)
        .map(|i| HeldOutPrompt {
            prompt: format!("question {i}"),
            skill: Skill::Arithmetic,
            answer: i.to_string(),
            key: format!("k{i}"),
        })
        .collect();
    let lines: Vec<String> = answers.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
    let answers_path = f.root.join("heldout.jsonl");
    std::fs::write(&answers_path, lines.join("\n") + "\n")?;
    cfg.data.parquet = Some(f.data.clone());
    cfg.data.heldout = Some(heldout_path.clone());
    cfg.data.heldout_answers = Some(answers_path.clone());
    cfg.eval.generations = 4;
    let data = load(&cfg, &f.model)?;
    assert_eq!(data.eval.len(), 6, "the held-out file's rows, all of them");
    let s = data.summary.as_ref().ok_or("no summary")?;
    assert_eq!(s.sft_pairs + s.preference_pairs, PAIRS, "the training file has no held-out split");
    assert_eq!(s.rows, (PAIRS + 6) as u64);
    let first = slime_trainer::corpus::HELDOUT_ID_OFFSET;
    assert_eq!(data.eval.iter().map(|e| e.tokens.id).collect::<Vec<_>>(), (first..first + 6).collect::<Vec<_>>());
    assert!(data.eval.iter().zip(&answers).all(|(e, a)| e.answer.as_ref() == Some(a)), "row i has line i");

    let dir = f.root.join("graded");
    let metrics = run(&cfg, &dir)?;
    let result = read_json(&dir.join("result.json"))?;
    let items = &result["items"];
    let ids: Vec<u64> = serde_json::from_value(items["pairs"].clone())?;
    assert_eq!(ids, (first..first + 6).collect::<Vec<_>>());
    let values = |key: &str| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        Ok(serde_json::from_value(items["values"][key].clone())?)
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (key, n) in [
        ("eval/preference_accuracy", 6),
        ("eval/chosen_logp", 6),
        ("eval/collapse_fraction", 6),
        ("eval/format_validity", 4),
        ("eval/task_accuracy", 4),
        ("eval/repetition", 4),
    ] {
        let v = values(key)?;
        assert_eq!(v.len(), n, "{key}");
        if key != "eval/collapse_fraction" {
            assert!((mean(&v) - metrics[key]).abs() < 1e-6, "{key}: the items' mean is the metric");
        }
    }
    // The grades are the checker's verdicts on the decoded generations.
    let generations = std::fs::read_to_string(dir.join("generations.jsonl"))?;
    let format = values("eval/format_validity")?;
    let correct = values("eval/task_accuracy")?;
    for (i, line) in generations.lines().take(4).enumerate() {
        let g: serde_json::Value = serde_json::from_str(line)?;
        let text = g["completion"].as_str().ok_or("completion")?;
        let (body, ended) = match ["<eos>", "<|eot_id|>"].iter().find_map(|stop| text.strip_suffix(stop)) {
            Some(body) => (body, true),
            None => (text, false),
        };
        let verdict = answers[i].check(body, ended);
        assert_eq!(format[i], f64::from(u8::from(verdict.format_valid)), "generation {i}: {text:?}");
        assert_eq!(correct[i], f64::from(u8::from(verdict.correct)), "generation {i}: {text:?}");
    }

    // An answers file of the wrong length is named.
    std::fs::write(&answers_path, lines[..5].join("\n") + "\n")?;
    let err = load(&cfg, &f.model).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("data.heldout_answers") && err.contains("heldout.parquet"), "{err}");
    Ok(())
}

fn read_json(path: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[test]
fn lora_sft_then_slime_on_parquet_writes_adapters_data_counts_and_generations() -> TestResult {
    let f = fixture()?;
    let mut cfg = config(&f);
    cfg.model.lora = Some(LoraSpec { r: 4, alpha: 8.0, sft: true, ..LoraSpec::default() });
    cfg.sft.steps = 3;
    cfg.preference.steps = 3;
    cfg.preference.objective = Objective::Slime(SlimeParams::paper());
    let dir = f.root.join("run");
    let metrics = run(&cfg, &dir)?;
    for key in ["eval/preference_accuracy", "eval/format_validity", "eval/repetition", "eval/chosen_logp_drift"] {
        assert!(metrics.get(key).is_some_and(|v| v.is_finite()), "{key}: {metrics:?}");
    }
    assert!(!metrics.contains_key("eval/task_accuracy"), "no program checks free text");
    assert!(dir.join("sft-model/model.safetensors").is_file());
    assert!(
        dir.join("adapter/adapter_model.safetensors").is_file() && dir.join("adapter/adapter_config.json").is_file()
    );
    assert!(!dir.join("model").exists(), "a pretrained model's merged copy is not written with LoRA");
    let data = read_json(&dir.join("data.json"))?;
    assert_eq!(data["rows"], PAIRS);
    let generations = std::fs::read_to_string(dir.join("generations.jsonl"))?;
    let lines: Vec<serde_json::Value> = generations.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["prompt"].as_str().is_some_and(|p| p.contains("<|start_header_id|>user"))));
    let result = read_json(&dir.join("result.json"))?;
    assert_eq!(result["model"], "model");
    // SFT moved the weights (adapters merged into sft-model differ from the starting model).
    let start = candle_core::safetensors::load(f.model.join("model.safetensors"), &Device::Cpu)?;
    let sft = candle_core::safetensors::load(dir.join("sft-model/model.safetensors"), &Device::Cpu)?;
    let name = "model.layers.0.self_attn.q_proj.weight";
    let diff = (&start[name] - &sft[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 0.0, "LoRA SFT left {name} unchanged");
    Ok(())
}

fn logps_command(f: &Fixture, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let status = Command::new(env!("CARGO_BIN_EXE_slime-trainer"))
        .args(["logps", "--model"])
        .arg(&f.model)
        .arg("--data")
        .arg(&f.data)
        .arg("--out")
        .arg(out)
        .args(["--max-length", "256", "--max-prompt-length", "128"])
        .output()?;
    if !status.status.success() {
        return Err(format!("logps failed: {}", String::from_utf8_lossy(&status.stderr)).into());
    }
    Ok(())
}

#[test]
fn dpo_reference_cache_equals_the_logps_command_and_precomputed_gives_the_same_run() -> TestResult {
    let f = fixture()?;
    let mut cfg = config(&f);
    cfg.preference.steps = 2;
    cfg.preference.objective = Objective::Dpo(DpoParams::default());
    let live = f.root.join("live");
    let live_metrics = run(&cfg, &live)?;
    let cached = read_logps(live.join("reference_logps.parquet"))?;
    let scored_path = f.root.join("scored.parquet");
    logps_command(&f, &scored_path)?;
    let scored: BTreeMap<u64, (f64, f64, u32, u32)> = read_logps(&scored_path)?
        .into_iter()
        .map(|r| (r.pair, (r.chosen_logp, r.rejected_logp, r.chosen_tokens, r.rejected_tokens)))
        .collect();
    assert!(!cached.is_empty());
    for r in &cached {
        let s = scored.get(&r.pair).ok_or(format!("pair {} not scored", r.pair))?;
        assert_eq!((r.chosen_tokens, r.rejected_tokens), (s.2, s.3), "pair {}", r.pair);
        assert!((r.chosen_logp - s.0).abs() < 1e-3 && (r.rejected_logp - s.1).abs() < 1e-3, "pair {}", r.pair);
    }
    // The run with the precomputed file trains the same model.
    cfg.preference.reference_logps = Some(live.join("reference_logps.parquet"));
    let again = run(&cfg, &f.root.join("precomputed"))?;
    assert_eq!(live_metrics, again);
    // A file that lacks a pair is named in the error.
    let partial = f.root.join("partial.parquet");
    slime_data::write_logps(&partial, &cached[1..])?;
    cfg.preference.reference_logps = Some(partial.clone());
    let err = run(&cfg, &f.root.join("partial-run")).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("partial.parquet") && err.contains(&format!("pair {}", cached[0].pair)), "{err}");
    Ok(())
}

#[test]
fn a_mismatched_tokenizer_is_named() -> TestResult {
    let f = fixture()?;
    let small = f.root.join("small");
    std::fs::create_dir_all(&small)?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(f.model.join(file), small.join(file))?;
    }
    CausalLm::random(&LlamaConfig::tiny(40, 16, 32, 1, 2, 1), 1, &Device::Cpu)?.save_dir(&small)?;
    let mut cfg = config(&f);
    cfg.model.path = Some(small);
    let err = run(&cfg, &f.root.join("bad")).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("pairs.parquet") && err.contains("outside the model's vocabulary of 40"), "{err}");
    Ok(())
}

#[test]
fn bf16_runs_the_same_path_close_to_f32() -> TestResult {
    let f = fixture()?;
    let mut cfg = config(&f);
    cfg.model.lora = Some(LoraSpec { r: 4, alpha: 8.0, sft: true, ..LoraSpec::default() });
    cfg.sft.steps = 2;
    cfg.preference.steps = 2;
    let start_of = |dir: &Path| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let text = std::fs::read_to_string(dir.join("eval.jsonl"))?;
        Ok(serde_json::from_str(text.lines().next().ok_or("no evaluation")?)?)
    };
    let f32_dir = f.root.join("f32");
    run(&cfg, &f32_dir)?;
    cfg.model.dtype = "bf16".into();
    let bf16_dir = f.root.join("bf16");
    let metrics = run(&cfg, &bf16_dir)?;
    assert!(metrics.values().all(|v| v.is_finite()), "{metrics:?}");
    let adapters = candle_core::safetensors::load(bf16_dir.join("adapter/adapter_model.safetensors"), &Device::Cpu)?;
    assert!(!adapters.is_empty() && adapters.values().all(|t| t.dtype() == candle_core::DType::BF16));
    let sft = candle_core::safetensors::load(bf16_dir.join("sft-model/model.safetensors"), &Device::Cpu)?;
    assert!(sft.values().all(|t| t.dtype() == candle_core::DType::BF16));
    // After the same two SFT steps, the held-out chosen log-prob agrees to bf16 precision.
    let key = "eval/chosen_logp";
    let (a, b) = (start_of(&f32_dir)?[key].as_f64().ok_or("f32")?, start_of(&bf16_dir)?[key].as_f64().ok_or("bf16")?);
    assert!((a - b).abs() < 0.05 * a.abs(), "f32 {a} vs bf16 {b}");
    Ok(())
}

#[test]
fn a_device_this_build_lacks_is_refused_before_any_work() -> TestResult {
    if candle_core::utils::cuda_is_available() {
        return Ok(()); // a CUDA build on a GPU machine runs it; nothing to refuse
    }
    let f = fixture()?;
    let mut cfg = config(&f);
    cfg.model.device = "cuda:0".into();
    let dir = f.root.join("gpu");
    let err = run(&cfg, &dir).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("cuda:0") && err.contains("--features cuda"), "{err}");
    assert!(!dir.exists(), "the run directory was created before the device was checked");
    Ok(())
}

/// Files by path, with their bytes.
type Files = Vec<(String, Vec<u8>)>;

/// Names of the files under `dir` with their bytes, sorted (the lock file aside).
fn snapshot(dir: &Path) -> Result<Files, Box<dyn std::error::Error>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for entry in std::fs::read_dir(&p)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if !path.ends_with(".lock") {
                files.push((path.display().to_string(), std::fs::read(&path)?));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// `data.max_length` beyond the model's context, a row too long for it, and a damaged Parquet
/// file are all refused with an error naming the setting or the row, before the run directory
/// (here holding an earlier finished run) changes.
#[test]
fn context_and_data_errors_stop_the_run_before_its_directory_changes() -> TestResult {
    let f = fixture()?;
    let dir = f.root.join("run");
    run(&config(&f), &dir)?;
    let before = snapshot(&dir)?;
    assert!(
        before.iter().any(|(p, _)| p.ends_with("result.json")) && before.iter().any(|(p, _)| p.ends_with("data.json"))
    );

    let mut cfg = config(&f);
    cfg.data.max_length = Some(512);
    cfg.data.max_prompt_length = Some(256);
    let err = run(&cfg, &dir).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("data.max_length = 512 exceeds the model's context of 256"), "{err}");
    assert!(snapshot(&dir)? == before, "max_length: the earlier run changed");

    // One row longer than the context, with no length limit.
    let mut examples = f.examples.clone();
    if let PreferenceExample::Chat { chosen, .. } = &mut examples[5] {
        chosen.content = "a very long answer ".repeat(200);
    }
    let long = f.root.join("long.parquet");
    write_preferences(&long, &examples, Layout::Conversational, &ColumnNames::default(), 7)?;
    let mut cfg = config(&f);
    cfg.data.parquet = Some(long);
    cfg.data.eval_pairs = PAIRS; // every row is used, wherever row 5 lands
    cfg.data.max_length = None;
    cfg.data.max_prompt_length = None;
    let err = run(&cfg, &dir).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("long.parquet row 5: ") && err.contains("exceed the model's context of 256"), "{err}");
    assert!(err.contains("set data.max_length to at most 256"), "{err}");
    assert!(snapshot(&dir)? == before, "long row: the earlier run changed");

    // Not a Parquet file at all.
    let garbage = f.root.join("garbage.parquet");
    std::fs::write(&garbage, b"PAR1 this is not parquet")?;
    let mut cfg = config(&f);
    cfg.data.parquet = Some(garbage);
    let err = run(&cfg, &dir).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("garbage.parquet"), "{err}");
    assert!(snapshot(&dir)? == before, "bad data: the earlier run changed");

    // A directory without shards and a missing file, each named.
    let mut cfg = config(&f);
    let empty = f.root.join("no-shards");
    std::fs::create_dir_all(&empty)?;
    cfg.data.parquet = Some(empty);
    let err = run(&cfg, &dir).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("no-shards: the directory has no *.parquet file"), "{err}");
    assert!(snapshot(&dir)? == before, "no shards: the earlier run changed");
    cfg.data.parquet = Some(f.data.clone());
    cfg.preference.reference_logps = Some(f.root.join("nowhere.parquet"));
    let err = run(&cfg, &dir).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("preference.reference_logps = ") && err.contains("does not exist"), "{err}");
    assert!(snapshot(&dir)? == before, "bad paths: the earlier run changed");
    Ok(())
}

/// Pairs whose chosen equals the rejected completion and repeated rows are counted in
/// `data.json` (and kept).
#[test]
fn degenerate_pairs_are_counted_in_data_json() -> TestResult {
    let f = fixture()?;
    let mut examples = f.examples.clone();
    if let PreferenceExample::Chat { chosen, rejected, .. } = &mut examples[2] {
        *rejected = chosen.clone();
    }
    examples.push(examples[7].clone());
    let path = f.root.join("degenerate.parquet");
    write_preferences(&path, &examples, Layout::Conversational, &ColumnNames::default(), 7)?;
    let mut cfg = config(&f);
    cfg.data.parquet = Some(path);
    let dir = f.root.join("run");
    run(&cfg, &dir)?;
    let data = read_json(&dir.join("data.json"))?;
    assert_eq!(data["rows"], PAIRS + 1);
    assert_eq!(data["degenerate"]["identical_completions"], 1, "{data}");
    assert_eq!(data["degenerate"]["duplicate_rows"], 1, "{data}");
    assert_eq!(data["degenerate"]["prompts_in_several_parts"], 0, "{data}");
    Ok(())
}
