//! `eval.start_from`: a preference run that starts from an SFT-only run's model takes that
//! run's final evaluation as its start evaluation instead of evaluating the same model again.
//! The numbers are the ones it would compute itself (checked here bit for bit, for both tiny
//! presets and for a pretrained model with LoRA SFT), and a source that is not the same model,
//! seed, data or evaluation is refused, also on `--resume`.

mod common;

use std::path::{Path, PathBuf};

use slime_objectives::{DpoParams, Objective, SlimeParams};
use slime_trainer::config::{LoraSpec, RunConfig};
use slime_trainer::run::{RunOptions, run, run_with};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn tiny(preset: &str) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.preset = preset.into();
    cfg.model.hidden = 16;
    cfg.model.layers = 2;
    cfg.data.pairs = 60;
    cfg.data.eval_pairs = 6;
    cfg.sft.batch_size = 4;
    cfg.preference.batch_size = 4;
    cfg.eval.generations = 3;
    cfg.eval.max_new_tokens = 5;
    cfg.checkpoint.every = 0;
    cfg
}

/// The pretrained path of the real presets: a model directory and a Parquet file, LoRA in both
/// stages (SFT adapters merged into `sft-model/`).
fn pretrained(f: &common::Fixture) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.path = Some(f.model.clone());
    cfg.model.lora = Some(LoraSpec { r: 4, alpha: 8.0, sft: true, ..LoraSpec::default() });
    cfg.data.parquet = Some(f.data.clone());
    cfg.data.eval_fraction = 0.2;
    cfg.data.eval_pairs = 6;
    cfg.data.max_length = Some(256);
    cfg.data.max_prompt_length = Some(128);
    cfg.sft.batch_size = 4;
    cfg.preference.batch_size = 4;
    cfg.eval.generations = 3;
    cfg.eval.max_new_tokens = 6;
    cfg.eval.batch_size = 4;
    cfg.checkpoint.every = 0;
    cfg
}

/// The SFT-only cell of a grid: SFT, then the evaluation of its model, no preference steps.
fn sft_cell(base: &RunConfig, steps: u64) -> RunConfig {
    let mut cfg = base.clone();
    cfg.name = "sft".into();
    cfg.sft.steps = steps;
    cfg.preference.steps = 0;
    cfg
}

/// A preference cell starting from `sft_dir`'s model, optionally taking its evaluation.
fn preference_cell(base: &RunConfig, sft_dir: &Path, reuse: bool) -> RunConfig {
    let mut cfg = base.clone();
    cfg.name = "dpo".into();
    cfg.init = Some(sft_dir.join("sft-model"));
    cfg.preference.steps = 2;
    cfg.preference.objective = Objective::Dpo(DpoParams::default());
    cfg.eval.every = 2;
    cfg.eval.generation_batch_size = 2;
    cfg.eval.start_from = reuse.then(|| sft_dir.to_path_buf());
    cfg
}

fn read_json(path: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn eval_lines(dir: &Path) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(dir.join("eval.jsonl"))?;
    Ok(text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?)
}

/// The evaluation an SFT cell ends with is the one a preference cell starting from its model
/// computes, bit for bit, so taking it changes nothing the run writes but the time.
fn reused_equals_recomputed(base: &RunConfig, root: &Path) -> TestResult {
    let sft = root.join("sft");
    run(&sft_cell(base, 3), &sft)?;
    let sft_result = read_json(&sft.join("result.json"))?;
    let sha = sft_result["model_sha256"].as_str().ok_or("the SFT run records its model's SHA-256")?;
    assert_eq!(sha.len(), 64);

    let (again, reused) = (root.join("again"), root.join("reused"));
    let recomputed = run(&preference_cell(base, &sft, false), &again)?;
    let taken = run(&preference_cell(base, &sft, true), &reused)?;
    let (a, b) = (eval_lines(&again)?, eval_lines(&reused)?);
    assert_eq!(a.len(), 2, "start and end");
    assert_eq!(a, b, "the same evaluations, the start one taken instead of computed");
    assert_eq!(recomputed, taken);
    // The start evaluation recomputed is the SFT cell's final one (and its items).
    assert_eq!((a[0]["stage"].as_str(), a[0]["step"].as_u64()), (Some("preference"), Some(0)));
    let start: std::collections::BTreeMap<String, f64> = a[0]
        .as_object()
        .ok_or("an eval line is an object")?
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect();
    let end_of_sft: std::collections::BTreeMap<String, f64> = serde_json::from_value(sft_result["final"].clone())?;
    for (key, value) in &end_of_sft {
        assert_eq!(start.get(key).map(|v| v.to_bits()), Some(value.to_bits()), "{key}");
    }
    let adapters = ["model/model.safetensors", "adapter/adapter_model.safetensors"];
    for file in adapters.iter().filter(|f| again.join(f).is_file()) {
        assert_eq!(std::fs::read(again.join(file))?, std::fs::read(reused.join(file))?, "{file}");
    }
    assert_eq!(read_json(&again.join("result.json"))?, read_json(&reused.join("result.json"))?);
    Ok(())
}

#[test]
fn the_start_evaluation_taken_equals_the_one_computed_tiny_llama() -> TestResult {
    let tmp = tempfile::tempdir()?;
    reused_equals_recomputed(&tiny("tiny-llama"), tmp.path())
}

#[test]
fn the_start_evaluation_taken_equals_the_one_computed_tiny_gemma() -> TestResult {
    let tmp = tempfile::tempdir()?;
    reused_equals_recomputed(&tiny("tiny-gemma"), tmp.path())
}

#[test]
fn the_start_evaluation_taken_equals_the_one_computed_pretrained_lora() -> TestResult {
    let f = common::fixture(60, 23, 7, 5)?;
    assert_eq!(f.examples.len(), 60);
    reused_equals_recomputed(&pretrained(&f), &f.root)
}

fn error_of(cfg: &RunConfig, dir: &Path, opts: &RunOptions) -> String {
    match run_with(cfg, dir, opts) {
        Ok(_) => panic!("{}: the run should have been refused", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A change to a run's config.
type Edit<'a> = dyn Fn(&mut RunConfig) + 'a;

/// A source that is not an evaluation of the same model, seed, data and settings is refused
/// with the reason, before any training.
#[test]
fn a_start_evaluation_of_something_else_is_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let base = tiny("tiny-llama");
    let (sft, other_sft) = (tmp.path().join("sft"), tmp.path().join("sft4"));
    run(&sft_cell(&base, 3), &sft)?;
    run(&sft_cell(&base, 4), &other_sft)?;
    let opts = RunOptions::default();
    let cell = |edit: &dyn Fn(&mut RunConfig)| {
        let mut cfg = preference_cell(&base, &sft, true);
        edit(&mut cfg);
        cfg
    };
    let cases: [(&str, Box<Edit<'_>>, &str); 6] = [
        ("seed", Box::new(|c| c.seed = 1), "seed"),
        ("eval", Box::new(|c| c.eval.max_new_tokens = 7), "[eval]"),
        ("data", Box::new(|c| c.data.eval_pairs = 5), "[data]"),
        ("model", Box::new(|c| c.model.lora = Some(LoraSpec::default())), "[model]"),
        ("other-model", Box::new(|c| c.init = Some(other_sft.join("sft-model"))), "SHA-256"),
        ("missing", Box::new(|c| c.eval.start_from = Some(PathBuf::from("/nonexistent/sft"))), "config.toml"),
    ];
    for (name, edit, needle) in cases {
        let err = error_of(&cell(&*edit), &tmp.path().join(name), &opts);
        assert!(err.contains("eval.start_from") && err.contains(needle), "{name}: {err}");
    }
    // A run with a preference stage ended with an evaluation of another model.
    let trained = tmp.path().join("trained");
    run(&preference_cell(&base, &sft, false), &trained)?;
    let mut cfg = preference_cell(&base, &sft, true);
    cfg.eval.start_from = Some(trained);
    let err = error_of(&cfg, &tmp.path().join("from-trained"), &opts);
    assert!(err.contains("preference stage"), "{err}");
    Ok(())
}

/// `--resume` of a run that took its start evaluation checks that the source still holds it:
/// unchanged, the run resumes to the uninterrupted result; replaced by another SFT run, it
/// is refused.
#[test]
fn resume_checks_the_start_evaluation_is_still_the_same() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut base = tiny("tiny-llama");
    base.preference.objective = Objective::Slime(SlimeParams::paper());
    let sft = tmp.path().join("sft");
    run(&sft_cell(&base, 3), &sft)?;
    let mut cfg = preference_cell(&base, &sft, true);
    cfg.checkpoint.every = 1;
    let dir = tmp.path().join("cell");
    let finished = run(&cfg, &dir)?;
    let result = std::fs::read(dir.join("result.json"))?;
    // As if interrupted after its last checkpoint.
    std::fs::remove_file(dir.join("result.json"))?;
    let resume = RunOptions { resume: true, ..RunOptions::default() };
    let report = run_with(&cfg, &dir, &resume)?;
    assert!(report.resumed_from.is_some());
    assert_eq!(report.final_eval, finished);
    assert_eq!(std::fs::read(dir.join("result.json"))?, result);

    // The SFT run is redone with other settings: its model and evaluation change.
    std::fs::remove_file(dir.join("result.json"))?;
    run(&sft_cell(&base, 5), &sft)?;
    let err = error_of(&cfg, &dir, &resume);
    assert!(err.contains("--resume") && err.contains("eval.start_from"), "{err}");
    Ok(())
}
