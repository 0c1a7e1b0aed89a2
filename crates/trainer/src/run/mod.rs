//! A run: SFT on one split, then a preference objective on the disjoint split, with evaluation
//! of preference accuracy, format validity, chosen log-prob drift (unlearning), rejected-token
//! collapse and, on the embedded task, task quality. The data is the embedded task with a tiny
//! preset model, or a Parquet file with a pretrained model (see [`crate::corpus`]).
//!
//! Files written into the run directory: `config.toml` (the resolved config), `metrics.jsonl`
//! (one line per optimiser step), `eval.jsonl` (one line per evaluation), `model/`
//! (config.json + model.safetensors of the final weights, LoRA adapters merged; after SFT also
//! `sft-model/`; with LoRA also `adapter/`, PEFT's layout) and
//! `result.json` (the final evaluation and its per-item values, for `cargo xtask report`; after
//! an SFT-only run also the SHA-256 of `sft-model/`, which `eval.start_from` checks), and `checkpoints/` (see
//! [`crate::checkpoint`]; what a resumed run needs, every `checkpoint.every` steps). With a
//! pretrained model and LoRA, `model/` is not written (the adapters are the result; merge them
//! with `CausalLm::merge_lora`). DPO-style objectives also leave `reference_logps.parquet`
//! (the reference sums, [`slime_data::write_logps`]); Parquet data leaves `data.json` (what
//! the load read, skipped and truncated) and `generations.jsonl` (the final greedy
//! generations, decoded).
//!
//! A run locks its directory (`.lock`: a second trainer on it stops at once), checks its
//! config, input paths, sizes, model and data before it changes anything there, and writes
//! every file through [`crate::atomic`], so a kill leaves each output old or complete.
//!
//! Resuming ([`RunOptions::resume`]) is exact: the checkpoint holds the trainable weights, the
//! AdamW moments and step, the stage and its step, the data sampler's cursor, the SAGE pool, its
//! weights, the previous margins and the draw RNG, the reference log-probs and the drift
//! baseline, and the lengths of the JSONL logs; everything else is recomputed deterministically
//! from the config. A resumed run therefore writes a bit-identical `model/model.safetensors`
//! and the same metrics as an uninterrupted one (except the wall-clock `tokens_per_second`).

mod eval;
mod lock;
mod model;
mod preference;
mod preference_checkpoint;
mod preflight;
mod reference;
mod selector;
mod sft;
mod state;
mod step;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slime_models::CausalLm;

use self::eval::write_generations;
pub use self::eval::{evaluate, evaluate_dir};
use self::model::load_model_and_data;
pub use self::model::{tiny_gemma, tiny_llama};
use self::preference::preference_stage;
use self::sft::sft_stage;
use self::state::{Ctx, Resume, STATE_FORMAT, TrainState};
use self::step::ensure_weights_finite;
use crate::config::RunConfig;
use crate::corpus::RunData;
use crate::metrics_log::MetricsLog;
use crate::progress::ProgressMode;
use crate::{Result, TrainError};
use crate::{atomic, checkpoint};

/// Which stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Supervised fine-tuning on the SFT split.
    Sft,
    /// The preference objective on the preference split.
    Preference,
}

impl Stage {
    /// `sft` or `preference` (as in `metrics.jsonl`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Preference => "preference",
        }
    }
}

/// A fault injected on purpose, to test the non-finite handling end to end (the command line
/// reads it from `SLIME_TRAINER_INJECT_FAULT=STAGE:STEP:TARGET`, e.g. `preference:3:logps`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The stage.
    pub stage: Stage,
    /// The optimiser step of that stage (1-based).
    pub step: u64,
    /// What is poisoned.
    pub target: FaultTarget,
}

/// What an injected [`Fault`] poisons.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTarget {
    /// The policy's chosen-side per-token log-probs of the step's first micro-batch become NaN
    /// (every loss term that reads them becomes NaN).
    Logps,
    /// The accumulated gradient of the first trainable weight becomes NaN (the loss stays finite).
    Gradient,
}

impl std::str::FromStr for Fault {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || TrainError::Config(format!("fault `{text}`: expected STAGE:STEP:TARGET, e.g. preference:3:logps"));
        let parts: Vec<&str> = text.split(':').collect();
        let [stage, step, target] = parts.as_slice() else { return Err(bad()) };
        let stage = match *stage {
            "sft" => Stage::Sft,
            "preference" => Stage::Preference,
            _ => return Err(bad()),
        };
        let step = step.parse().map_err(|_| bad())?;
        let target = match *target {
            "logps" => FaultTarget::Logps,
            "gradient" => FaultTarget::Gradient,
            _ => return Err(bad()),
        };
        Ok(Self { stage, step, target })
    }
}

/// How a run is carried out, apart from its config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's latest checkpoint. A finished run (`result.json`
    /// present) is left as it is; a run directory without a checkpoint starts fresh.
    pub resume: bool,
    /// Progress display on stderr (the library default: none).
    pub progress: ProgressMode,
    /// Test hook: sleep this long after every optimiser step (the command line reads
    /// `SLIME_TRAINER_STEP_DELAY_MS`), so a test can interrupt a tiny run reliably.
    #[doc(hidden)]
    pub step_delay: Duration,
    /// Test hook: an injected non-finite value.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// The final evaluation (as in `result.json`).
    pub final_eval: BTreeMap<String, f64>,
    /// The checkpoint the run continued from (e.g. `step-000040`), if it resumed.
    pub resumed_from: Option<String>,
    /// True when `resume` found the run finished and did nothing.
    pub already_finished: bool,
}

/// Runs `cfg` into `run_dir` from scratch and returns the final evaluation (see [`run_with`]).
pub fn run(cfg: &RunConfig, run_dir: &Path) -> Result<BTreeMap<String, f64>> {
    Ok(run_with(cfg, run_dir, &RunOptions::default())?.final_eval)
}

/// Prints a status line when progress is shown.
fn note(opts: &RunOptions, text: &str) {
    if opts.progress != ProgressMode::Off {
        eprintln!("{text}");
    }
}

/// Prints a warning on stderr, whatever the progress mode.
fn warn(text: &str) {
    eprintln!("warning: {text}");
}

/// What a fresh start removes from an earlier run in the same directory (besides the logs,
/// which it empties): everything a run writes that a later step or `cargo xtask report` reads.
const EARLIER_OUTPUTS: [&str; 8] = [
    "result.json",
    "model",
    "sft-model",
    "adapter",
    "data.json",
    "generations.jsonl",
    "reference_logps.parquet",
    "checkpoints",
];

/// Reads a finished run's `result.json`; `None` (with a warning) when it cannot be read, so the
/// run resumes from its checkpoint and writes it again.
fn finished_result(result_path: &Path) -> Option<BTreeMap<String, f64>> {
    let parsed = fs::read_to_string(result_path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string()))
        .and_then(|value| serde_json::from_value(value["final"].clone()).map_err(|e| format!("`final`: {e}")));
    match parsed {
        Ok(final_eval) => Some(final_eval),
        Err(e) => {
            warn(&format!("{}: unreadable ({e}); resuming from the latest checkpoint instead", result_path.display()));
            None
        }
    }
}

/// The checkpoint a `--resume` continues from, checked against the config the run started
/// with; `None` when the run has no checkpoint.
fn resume_point(
    cfg: &RunConfig,
    run_dir: &Path,
    device: &candle_core::Device,
    opts: &RunOptions,
) -> Result<Option<(String, Resume)>> {
    let config_path = run_dir.join("config.toml");
    let has_checkpoints =
        checkpoint::latest_name(run_dir).unwrap_or(None).is_some() || !checkpoint::list(run_dir)?.is_empty();
    if !has_checkpoints {
        note(opts, &format!("{}: no checkpoint, starting fresh", run_dir.display()));
        return Ok(None);
    }
    if !config_path.is_file() {
        return Err(TrainError::Input(format!(
            "--resume: {} is missing, so the config the checkpoints were trained with is unknown; restore it, or \
             start the run again without --resume",
            config_path.display()
        )));
    }
    let text = fs::read_to_string(&config_path)
        .map_err(|source| TrainError::Io { path: config_path.display().to_string(), source })?;
    let saved =
        RunConfig::from_toml(&text).map_err(|e| TrainError::Config(format!("{}: {e}", config_path.display())))?;
    if !saved.same_training(cfg) {
        return Err(TrainError::Config(format!(
            "--resume: the config differs from the one the run started with ({}); only [checkpoint] may change",
            config_path.display()
        )));
    }
    let Some(loaded) = checkpoint::load_intact(run_dir, device)? else {
        note(opts, &format!("{}: no checkpoint, starting fresh", run_dir.display()));
        return Ok(None);
    };
    for skipped in &loaded.skipped {
        warn(&format!("skipped checkpoint {skipped}"));
    }
    let dir = loaded.dir;
    let state: TrainState = serde_json::from_value(loaded.checkpoint.state.clone())
        .map_err(|e| TrainError::Checkpoint(format!("{}/state.json: {e}", dir.display())))?;
    if state.format != STATE_FORMAT {
        return Err(TrainError::Checkpoint(format!(
            "{}/state.json: format {} (this trainer writes {STATE_FORMAT})",
            dir.display(),
            state.format
        )));
    }
    let name = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    note(opts, &format!("resuming from checkpoint {name}: {} step {}", state.stage.name(), state.step));
    Ok(Some((name, (state, loaded.checkpoint))))
}

/// Runs `cfg` into `run_dir`: SFT (unless `init` is set), then the preference stage, writing
/// checkpoints every `checkpoint.every` steps of each stage. With `opts.resume`, continues from
/// the newest intact checkpoint and ends with exactly the weights, metrics and evaluations an
/// uninterrupted run would have (except the wall-clock `tokens_per_second`). Without it, any
/// earlier logs, checkpoints, models and result in `run_dir` are discarded.
///
/// Nothing in `run_dir` is changed before the config, every input path, the sizes, the model
/// and the data have been checked (only the lock file is created); the directory is locked
/// for the whole run, so a second trainer on it stops with "in use by pid N".
pub fn run_with(cfg: &RunConfig, run_dir: &Path, opts: &RunOptions) -> Result<RunReport> {
    cfg.validate()?;
    let device = crate::model_source::parse_device(&cfg.model.device)?;
    preflight::check_inputs(cfg, run_dir)?;
    let io = |source| TrainError::Io { path: run_dir.display().to_string(), source };
    fs::create_dir_all(run_dir).map_err(io)?;
    let _lock = lock::lock(run_dir)?;
    let result_path = run_dir.join("result.json");
    let mut resume: Option<(String, Resume)> = None;
    if opts.resume {
        if result_path.is_file()
            && let Some(final_eval) = finished_result(&result_path)
        {
            note(opts, &format!("{}: the run already finished (result.json exists); nothing to do", run_dir.display()));
            return Ok(RunReport { final_eval, resumed_from: None, already_finished: true });
        }
        resume = resume_point(cfg, run_dir, &device, opts)?;
    }
    let (lm, data, decoder) = load_model_and_data(cfg, &device, opts)?;

    // Everything is checked: from here on the run directory changes.
    let (log, eval_log) = open_logs(run_dir, resume.as_ref().map(|(_, (state, _))| state))?;
    let resolved = toml::to_string(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    atomic::write(&run_dir.join("config.toml"), resolved.as_bytes())?;
    if let Some(summary) = &data.summary {
        let value = serde_json::to_value(summary).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        atomic::write_json(&run_dir.join("data.json"), &value)?;
    }
    let sft_steps = if cfg.init.is_none() { cfg.sft.steps } else { 0 };
    let resumed_from = resume.as_ref().map(|(name, _)| name.clone());
    let mut ctx = Ctx {
        cfg,
        run_dir,
        opts,
        log,
        eval_log,
        sft_steps,
        generations: Vec::new(),
        items: Default::default(),
        last_checkpoint: resumed_from.clone(),
    };
    let (sft_resume, preference_resume) = match resume {
        Some((_, r)) if r.0.stage == Stage::Sft => (Some(r), None),
        Some((_, r)) => (None, Some(r)),
        None => (None, None),
    };
    let lm = sft_stage_then_preference_model(&mut ctx, lm, &data, sft_resume, preference_resume.is_some())?;
    let final_eval = preference_stage(&mut ctx, &lm, &data, preference_resume)?;
    ensure_weights_finite(&lm, &ctx.place(Stage::Preference, cfg.preference.steps))?;
    if let Some(decoder) = &decoder {
        write_generations(&run_dir.join("generations.jsonl"), decoder, &data, &ctx.generations)?;
    }
    write_models(cfg, run_dir, lm)?;
    let mut result = serde_json::json!({
        "variant": cfg.name,
        "seed": cfg.seed,
        "model": cfg.model.display_name(),
        "final": final_eval,
        "items": ctx.items,
    });
    // An SFT-only run's final evaluation is of the model it hands on (`sft-model/`): its
    // fingerprint lets a run starting from that model take the evaluation (`eval.start_from`).
    if cfg.preference.steps == 0
        && let Some(dir) = eval::evaluated_model_dir(cfg, run_dir)
    {
        result[eval::MODEL_SHA256] = serde_json::Value::String(eval::model_sha256(&dir)?);
    }
    atomic::write_json(&result_path, &result)?;
    Ok(RunReport { final_eval, resumed_from, already_finished: false })
}

/// `metrics.jsonl` and `eval.jsonl`: cut back to the lengths a checkpoint recorded, or, on a
/// fresh start, emptied after every earlier output in `run_dir` is removed.
fn open_logs(run_dir: &Path, resume: Option<&TrainState>) -> Result<(MetricsLog, MetricsLog)> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let eval_path = run_dir.join("eval.jsonl");
    let (metrics_bytes, eval_bytes) = match resume {
        Some(state) => (state.metrics_bytes, state.eval_bytes),
        None => {
            for name in EARLIER_OUTPUTS {
                atomic::remove_if_present(&run_dir.join(name))?;
            }
            (0, 0)
        }
    };
    Ok((MetricsLog::open_truncated(&metrics_path, metrics_bytes)?, MetricsLog::open_truncated(&eval_path, eval_bytes)?))
}

/// Runs the SFT stage (unless the config has none or a preference checkpoint is resumed) and
/// returns the model the preference stage trains: with LoRA, fresh adapters on the SFT model.
fn sft_stage_then_preference_model(
    ctx: &mut Ctx<'_>,
    mut lm: CausalLm,
    data: &RunData,
    sft_resume: Option<Resume>,
    preference_resumes: bool,
) -> Result<CausalLm> {
    let (cfg, run_dir, sft_steps) = (ctx.cfg, ctx.run_dir, ctx.sft_steps);
    let sft_lora = cfg.model.lora.as_ref().filter(|l| l.sft && sft_steps > 0);
    if sft_resume.is_some() && sft_steps == 0 {
        return Err(TrainError::Checkpoint("an SFT checkpoint, but this config has no SFT stage".into()));
    }
    if sft_steps > 0 && !preference_resumes {
        if let Some(lora) = sft_lora {
            lm = lm.with_lora(lora.to_lora_config(), cfg.seed ^ 0x5F7)?;
        }
        sft_stage(ctx, &lm, data, sft_resume)?;
        ensure_weights_finite(&lm, &ctx.place(Stage::Sft, cfg.sft.steps))?;
        if sft_lora.is_some() {
            lm = lm.merge_lora()?;
        }
        atomic::produce_dir(&run_dir.join("sft-model"), |dir| crate::hf_export::save_model(&lm, dir, cfg))?;
    } else if sft_steps > 0 && cfg.model.lora.is_some() {
        // A LoRA checkpoint holds only the adapters; the frozen base is the SFT model, saved
        // before the preference stage began.
        let device = model::device_of(&lm);
        lm = CausalLm::from_dir_as(&run_dir.join("sft-model"), &device, cfg.model.load_dtype())?;
        lm.model().set_gradient_checkpointing(cfg.model.gradient_checkpointing)?;
    }
    if let Some(lora) = &cfg.model.lora {
        lm = lm.with_lora(lora.to_lora_config(), cfg.seed ^ 0x10_4A)?;
    }
    Ok(lm)
}

/// The trained model's directories: `adapter/` with LoRA, and `model/` (adapters merged) unless
/// that would copy a pretrained model in full (with LoRA its result is `adapter/`).
fn write_models(cfg: &RunConfig, run_dir: &Path, mut lm: CausalLm) -> Result<()> {
    if cfg.model.lora.is_some() {
        atomic::produce_dir(&run_dir.join("adapter"), |dir| crate::hf_export::save_adapter(&lm, dir, run_dir, cfg))?;
    }
    if cfg.model.lora.is_none() || cfg.model.path.is_none() {
        if cfg.model.lora.is_some() {
            lm = lm.merge_lora()?;
        }
        atomic::produce_dir(&run_dir.join("model"), |dir| crate::hf_export::save_model(&lm, dir, cfg))?;
    }
    Ok(())
}
