//! The training loop in-process: exact gradient accumulation, non-finite faults that name the
//! step and the term, and exact resumption (which a tampered checkpoint visibly breaks).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use sha2::Digest;
use slime_objectives::{DpoParams, Objective, SlimeParams};
use slime_trainer::TrainError;
use slime_trainer::config::RunConfig;
use slime_trainer::run::{Fault, RunOptions, Stage, run, run_with};
use slime_trainer::selection::SelectionKind;

fn tiny() -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.hidden = 16;
    cfg.model.layers = 1;
    cfg.data.pairs = 60;
    cfg.data.eval_pairs = 4;
    cfg.sft.steps = 0;
    cfg.preference.steps = 0;
    cfg.eval.generations = 1;
    cfg.eval.max_new_tokens = 4;
    cfg.eval.every = 100;
    cfg.checkpoint.every = 0;
    cfg
}

fn weights(run_dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(run_dir.join("model/model.safetensors"), &Device::Cpu).expect("model")
}

fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, x)| {
            let y = &b[name];
            (x - y).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar") as f64
        })
        .fold(0.0, f64::max)
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Sets a stage's steps, batch size and accumulation.
type SetBatch = dyn Fn(&mut RunConfig, usize, usize);

/// Batch 8 x accum 1, 4 x 2 and 2 x 4 train the same weights (up to float summation order):
/// the loss of each micro-batch is normalised by the whole optimiser batch.
#[test]
fn gradient_accumulation_matches_the_full_batch() {
    let stages: [(&str, Box<SetBatch>); 3] = [
        (
            "sft",
            Box::new(|c: &mut RunConfig, b, a| {
                c.sft.steps = 3;
                c.sft.batch_size = b;
                c.sft.grad_accum = a;
            }),
        ),
        (
            "slime",
            Box::new(|c: &mut RunConfig, b, a| {
                c.preference.steps = 3;
                c.preference.batch_size = b;
                c.preference.grad_accum = a;
                c.preference.objective = Objective::Slime(SlimeParams::paper());
            }),
        ),
        (
            "dpo",
            Box::new(|c: &mut RunConfig, b, a| {
                c.preference.steps = 3;
                c.preference.batch_size = b;
                c.preference.grad_accum = a;
                c.preference.objective = Objective::Dpo(DpoParams::default());
            }),
        ),
    ];
    for (name, set) in &stages {
        let mut results = Vec::new();
        let mut losses = Vec::new();
        for (batch, accum) in [(8, 1), (4, 2), (2, 4)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut cfg = tiny();
            set(&mut cfg, batch, accum);
            run(&cfg, dir.path()).expect("run");
            results.push(weights(dir.path()));
            let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
            // The loss and the (pre-clipping) gradient norm of the whole optimiser batch: a
            // micro-batch loss normalised by its own size instead of the full batch's would
            // scale the gradient by `grad_accum`, which AdamW alone would almost hide.
            let logged: Vec<(f64, f64)> = text
                .lines()
                .map(|l| {
                    let v = serde_json::from_str::<serde_json::Value>(l).expect("json");
                    (v["loss"].as_f64().expect("loss"), v["grad_norm"].as_f64().expect("grad_norm"))
                })
                .collect();
            losses.push(logged);
        }
        for (i, label) in [(1, "4 x 2"), (2, "2 x 4")] {
            let diff = max_abs_diff(&results[0], &results[i]);
            eprintln!("{name}: 8 x 1 vs {label}: max weight difference {diff:e}");
            assert!(diff < 1e-5, "{name}: 8 x 1 vs {label}: max weight difference {diff}");
            assert_eq!(losses[0].len(), 3);
            for ((loss_a, norm_a), (loss_b, norm_b)) in losses[0].iter().zip(&losses[i]) {
                assert!((loss_a - loss_b).abs() < 1e-5, "{name}: logged loss {loss_a} vs {loss_b} ({label})");
                assert!((norm_a - norm_b).abs() < 1e-5 * norm_a, "{name}: grad_norm {norm_a} vs {norm_b} ({label})");
            }
        }
        // The comparison can fail: a different batch gives different weights.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = tiny();
        set(&mut cfg, 4, 1);
        run(&cfg, dir.path()).expect("run");
        let diff = max_abs_diff(&results[0], &weights(dir.path()));
        assert!(diff > 1e-4, "{name}: half the batch changed nothing ({diff})");
    }
}

/// `parallel_micro_batches = 2` (micro-batches run concurrently on the pool) trains the same
/// weights bit for bit, with the same logged loss and gradient norm, as running them one after
/// another: 3 micro-batches per step make a group of 2 and a group of 1.
#[test]
fn parallel_micro_batches_train_bit_identical_weights() {
    let train = |parallel: usize| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = tiny();
        cfg.model.hidden = 64;
        cfg.model.layers = 2;
        cfg.sft.steps = 2;
        cfg.preference.steps = 2;
        cfg.preference.objective = Objective::Slime(SlimeParams::paper());
        for (batch, accum, par) in [
            (&mut cfg.sft.stage.batch_size, &mut cfg.sft.stage.grad_accum, &mut cfg.sft.stage.parallel_micro_batches),
            (
                &mut cfg.preference.stage.batch_size,
                &mut cfg.preference.stage.grad_accum,
                &mut cfg.preference.stage.parallel_micro_batches,
            ),
        ] {
            (*batch, *accum, *par) = (4, 3, parallel);
        }
        run(&cfg, dir.path()).expect("run");
        let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
        let logged: Vec<(u64, u64, u64)> = metrics
            .lines()
            .map(|l| {
                let v = serde_json::from_str::<serde_json::Value>(l).expect("json");
                let bits = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {l}")).to_bits();
                // Real tokens of the step's 12 pairs (SFT: 12 rows; preference: 24).
                let tokens = f64::from_bits(bits("tokens"));
                let rows = if v["stage"] == "sft" { 12.0 } else { 24.0 };
                assert!(tokens >= rows && tokens.fract() == 0.0, "tokens = {tokens} in {l}");
                (bits("loss"), bits("grad_norm"), bits("tokens"))
            })
            .collect();
        (weights(dir.path()), logged)
    };
    let (sequential, sequential_log) = train(1);
    let (parallel, parallel_log) = train(2);
    assert_eq!(sequential_log.len(), 4, "2 SFT + 2 preference steps logged");
    assert_eq!(sequential_log, parallel_log, "logged loss, gradient norm and token count");
    assert_eq!(sequential.len(), parallel.len());
    for (name, a) in &sequential {
        let (a, b) = (a.flatten_all().expect("flat"), parallel[name].flatten_all().expect("flat"));
        let (a, b) = (a.to_vec1::<f32>().expect("a"), b.to_vec1::<f32>().expect("b"));
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "`{name}` differs: max |diff| {}", max_abs_diff(&sequential, &parallel));
    }
}

/// `model.gradient_checkpointing = true` trains exactly the same weights (SFT, then SLIME with
/// LoRA): recomputed activations are the kept ones, bit for bit.
#[test]
fn gradient_checkpointing_trains_the_same_weights() {
    for preset in ["tiny-llama", "tiny-gemma"] {
        gradient_checkpointing_trains_the_same_weights_with(preset);
    }
}

fn gradient_checkpointing_trains_the_same_weights_with(preset: &str) {
    let train = |on: bool| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = tiny();
        cfg.model.preset = preset.into();
        cfg.model.gradient_checkpointing = on;
        cfg.model.lora = Some(slime_trainer::config::LoraSpec { r: 4, alpha: 8.0, ..Default::default() });
        cfg.sft.steps = 2;
        cfg.preference.steps = 2;
        cfg.preference.objective = Objective::Slime(SlimeParams::paper());
        run(&cfg, dir.path()).expect("run");
        (weights(dir.path()), bytes(&dir.path().join("metrics.jsonl")))
    };
    let (off, on) = (train(false), train(true));
    assert_eq!(max_abs_diff(&off.0, &on.0), 0.0, "{preset}");
    let strip = |b: &[u8]| -> Vec<String> {
        // Timing fields differ between runs; everything else must not.
        String::from_utf8_lossy(b)
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).expect("json");
                if let Some(m) = v.as_object_mut() {
                    m.retain(|k, _| k != "tokens_per_second" && !k.ends_with("_s"));
                }
                v.to_string()
            })
            .collect()
    };
    assert_eq!(strip(&off.1), strip(&on.1), "{preset}");
}

/// A SAGE + DPO run with a checkpoint every 2 steps, interrupted by an injected fault at
/// preference step 5 (the checkpoint of step 4 survives), then resumed.
fn sage_dpo() -> RunConfig {
    let mut cfg = tiny();
    cfg.sft.steps = 4;
    cfg.sft.batch_size = 4;
    cfg.preference.steps = 7;
    cfg.preference.batch_size = 2;
    cfg.preference.grad_accum = 2;
    cfg.preference.objective = Objective::Dpo(DpoParams::default());
    cfg.preference.selection = SelectionKind::Sage;
    cfg.preference.sage.pool_size = 12;
    cfg.preference.sage.refresh_every = 3;
    cfg.eval.every = 3;
    cfg.checkpoint.every = 2;
    cfg.checkpoint.keep_last = 1;
    cfg
}

fn interrupted(cfg: &RunConfig, dir: &Path, fault: &str) -> TrainError {
    let opts = RunOptions { fault: Some(fault.parse::<Fault>().expect("fault")), ..RunOptions::default() };
    run_with(cfg, dir, &opts).expect_err("the injected fault stops the run")
}

#[test]
fn faults_name_step_and_term_and_leave_a_resumable_checkpoint() {
    let cfg = sage_dpo();
    let whole = tempfile::tempdir().expect("tempdir");
    run(&cfg, whole.path()).expect("uninterrupted");

    // NaN log-probs: every DPO term reads them; the error names the step and a DPO term.
    let cut = tempfile::tempdir().expect("tempdir");
    let err = interrupted(&cfg, cut.path(), "preference:5:logps");
    let text = err.to_string();
    assert!(matches!(err, TrainError::NonFinite { step: 5, run_step: 9, .. }), "{text}");
    // The run step names checkpoints: 4 SFT steps + 5 preference steps.
    assert!(text.starts_with("step 5 (run step 9): preference loss"), "{text}");
    assert!(text.contains("not finite (NaN); the last checkpoint, step-000008, is intact"), "{text}");
    // The global step of the surviving checkpoint: 4 SFT steps + 4 preference steps.
    let latest = std::fs::read_to_string(cut.path().join("checkpoints/latest")).expect("latest");
    assert_eq!(latest.trim(), "step-000008");
    assert!(!cut.path().join("result.json").exists());
    let report = run_with(&cfg, cut.path(), &RunOptions { resume: true, ..RunOptions::default() }).expect("resume");
    assert_eq!(report.resumed_from.as_deref(), Some("step-000008"));
    assert!(bytes(&whole.path().join("model/model.safetensors")) == bytes(&cut.path().join("model/model.safetensors")));
    assert_eq!(bytes(&whole.path().join("eval.jsonl")), bytes(&cut.path().join("eval.jsonl")));

    // A NaN gradient with a finite loss: named by the weight.
    let cut = tempfile::tempdir().expect("tempdir");
    let text = interrupted(&cfg, cut.path(), "sft:3:gradient").to_string();
    assert!(text.starts_with("step 3 (run step 3): sft gradient of `"), "{text}");
    assert!(text.ends_with("the last checkpoint, step-000002, is intact"), "{text}");
    let report = run_with(&cfg, cut.path(), &RunOptions { resume: true, ..RunOptions::default() }).expect("resume");
    assert_eq!(report.resumed_from.as_deref(), Some("step-000002"));
    assert!(bytes(&whole.path().join("model/model.safetensors")) == bytes(&cut.path().join("model/model.safetensors")));

    // A finished run is not touched again.
    let again = run_with(&cfg, cut.path(), &RunOptions { resume: true, ..RunOptions::default() }).expect("again");
    assert!(again.already_finished);
    assert_eq!(again.final_eval, report.final_eval);
}

/// A fault before the first checkpoint says that there is none, rather than that it is intact.
#[test]
fn a_fault_before_any_checkpoint_says_there_is_none() {
    let cfg = sage_dpo();
    let dir = tempfile::tempdir().expect("tempdir");
    let text = interrupted(&cfg, dir.path(), "sft:1:logps").to_string();
    assert_eq!(text, "step 1 (run step 1): sft loss is not finite (NaN); no checkpoint was written before it");
    assert!(!dir.path().join("checkpoints/latest").exists());
}

/// `--resume` needs the config the checkpoints were trained with: without `config.toml` it
/// refuses instead of training on with whatever config it is given.
#[test]
fn resume_refuses_a_run_directory_without_its_config() {
    let cfg = sage_dpo();
    let dir = tempfile::tempdir().expect("tempdir");
    interrupted(&cfg, dir.path(), "preference:3:logps");
    std::fs::remove_file(dir.path().join("config.toml")).expect("remove config.toml");
    let mut other = cfg.clone();
    other.seed += 1;
    let resume = RunOptions { resume: true, ..RunOptions::default() };
    for c in [&cfg, &other] {
        let err = run_with(c, dir.path(), &resume).expect_err("no config.toml").to_string();
        assert!(err.contains("config.toml is missing"), "{err}");
    }
    assert!(!dir.path().join("result.json").exists());
}

/// A damaged `result.json` (e.g. from a full disk) does not block `--resume`: the run resumes
/// from its checkpoint and writes the same result again.
#[test]
fn a_truncated_result_is_rewritten_by_resume() {
    let mut cfg = sage_dpo();
    cfg.checkpoint.keep_last = 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let finished = run(&cfg, dir.path()).expect("run");
    let result = dir.path().join("result.json");
    let full = bytes(&result);
    std::fs::write(&result, &full[..full.len() / 2]).expect("truncate");
    let report = run_with(&cfg, dir.path(), &RunOptions { resume: true, ..RunOptions::default() }).expect("resume");
    assert!(!report.already_finished);
    assert_eq!(report.final_eval, finished);
    assert_eq!(bytes(&result), full);
}

/// The resume test can fail: restarting the SAGE draw RNG from its seed instead of its saved
/// position (what a trainer that did not checkpoint it would do) changes the final weights.
#[test]
fn resuming_with_the_rng_reset_differs() {
    let cfg = sage_dpo();
    let whole = tempfile::tempdir().expect("tempdir");
    run(&cfg, whole.path()).expect("uninterrupted");
    let cut = tempfile::tempdir().expect("tempdir");
    interrupted(&cfg, cut.path(), "preference:5:logps");
    let state_path = cut.path().join("checkpoints/step-000008/state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&bytes(&state_path)).expect("state");
    assert_eq!(state["stage"], "preference");
    assert_ne!(state["preference"]["rng"]["word_pos"], "0", "the draw RNG was used before step 4");
    state["preference"]["rng"]["word_pos"] = "0".into();
    std::fs::write(&state_path, serde_json::to_string(&state).expect("json")).expect("write");
    // The edit breaks the checkpoint's checksum: the resume refuses it (no older one is kept).
    let resume = RunOptions { resume: true, ..RunOptions::default() };
    let err = run_with(&cfg, cut.path(), &resume).expect_err("tampered").to_string();
    assert!(err.contains("step-000008: ") && err.contains("SHA-256 mismatch"), "{err}");
    // Signed again (the checksum of the compact JSON without `sha256`), it is resumed from.
    let sums = state.as_object_mut().expect("object").remove("sha256").expect("sha256");
    let digest = sha2::Sha256::digest(serde_json::to_vec(&state).expect("json"));
    let mut sums = sums.as_object().expect("sums").clone();
    sums.insert("state.json".into(), digest.iter().map(|b| format!("{b:02x}")).collect::<String>().into());
    state["sha256"] = serde_json::Value::Object(sums);
    std::fs::write(&state_path, serde_json::to_string(&state).expect("json")).expect("write");
    run_with(&cfg, cut.path(), &resume).expect("resume");
    let diff = max_abs_diff(&weights(whole.path()), &weights(cut.path()));
    assert!(diff > 0.0, "a reset RNG gave the same weights");
}

#[test]
fn resume_rejects_a_changed_config_but_accepts_a_changed_checkpoint_section() {
    let mut cfg = sage_dpo();
    let dir = tempfile::tempdir().expect("tempdir");
    interrupted(&cfg, dir.path(), "preference:3:logps");
    let resume = RunOptions { resume: true, ..RunOptions::default() };
    let mut other = cfg.clone();
    other.preference.schedule.lr *= 2.0;
    let err = run_with(&other, dir.path(), &resume).expect_err("changed lr").to_string();
    assert!(err.contains("config differs"), "{err}");
    cfg.checkpoint.every = 3;
    let report = run_with(&cfg, dir.path(), &resume).expect("resume");
    assert_eq!(report.resumed_from.as_deref(), Some("step-000006"));
    assert_eq!(Stage::Preference.name(), "preference");
}

/// LoRA in the preference stage: only the adapted projections change, DPO's reference is the
/// model with its adapters off (first loss ln 2), and a LoRA run resumes bit-identically.
#[test]
fn lora_trains_only_adapters_and_resumes_exactly() {
    let mut cfg = tiny();
    cfg.sft.steps = 3;
    cfg.sft.batch_size = 4;
    cfg.preference.steps = 4;
    cfg.preference.batch_size = 4;
    cfg.preference.schedule.lr = 1e-2;
    cfg.preference.objective = Objective::Dpo(DpoParams::default());
    cfg.model.lora = Some(slime_trainer::config::LoraSpec {
        r: 2,
        alpha: 4.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        sft: false,
    });
    cfg.checkpoint.every = 2;
    let whole = tempfile::tempdir().expect("tempdir");
    run(&cfg, whole.path()).expect("run");
    let first: serde_json::Value = std::fs::read_to_string(whole.path().join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|l| l["stage"] == "preference")
        .expect("a preference step");
    let loss = first["loss"].as_f64().expect("loss");
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "first DPO loss {loss}");

    let sft = candle_core::safetensors::load(whole.path().join("sft-model/model.safetensors"), &Device::Cpu)
        .expect("sft model");
    let tuned = weights(whole.path());
    for (name, w) in &tuned {
        let diff = max_abs_diff(
            &HashMap::from([(name.clone(), w.clone())]),
            &HashMap::from([(name.clone(), sft[name].clone())]),
        );
        let adapted = name.contains("q_proj") || name.contains("v_proj");
        assert_eq!(diff > 0.0, adapted, "{name}: changed by {diff}");
    }
    assert!(whole.path().join("adapter/adapter_model.safetensors").is_file());

    let cut = tempfile::tempdir().expect("tempdir");
    interrupted(&cfg, cut.path(), "preference:3:logps");
    run_with(&cfg, cut.path(), &RunOptions { resume: true, ..RunOptions::default() }).expect("resume");
    for file in ["model/model.safetensors", "adapter/adapter_model.safetensors"] {
        assert!(bytes(&whole.path().join(file)) == bytes(&cut.path().join(file)), "{file} differs");
    }
}

/// A real (not injected) fault: an absurd learning rate blows the weights up after the first
/// step (to ~1e30, still finite, so checkpoint 1 is written), and the second step's loss is NaN.
/// The run stops naming step 2; resuming from checkpoint 1 reproduces exactly the same stop.
#[test]
fn an_absurd_learning_rate_stops_the_run_at_a_named_step() {
    let mut cfg = tiny();
    cfg.sft.steps = 5;
    cfg.sft.batch_size = 4;
    cfg.sft.schedule.lr = 1e30;
    cfg.checkpoint.every = 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let err = run(&cfg, dir.path()).expect_err("NaN loss").to_string();
    assert_eq!(err, "step 2 (run step 2): sft loss is not finite (NaN); the last checkpoint, step-000001, is intact");
    let latest = std::fs::read_to_string(dir.path().join("checkpoints/latest")).expect("latest");
    assert_eq!(latest.trim(), "step-000001");
    let again = run_with(&cfg, dir.path(), &RunOptions { resume: true, ..RunOptions::default() })
        .expect_err("the same NaN")
        .to_string();
    assert_eq!(again, err);
}
