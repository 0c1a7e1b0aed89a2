//! `slime-trainer`: the command-line interface of the training loop.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use slime_trainer::config::RunConfig;
use slime_trainer::progress::ProgressMode;
use slime_trainer::run::{Fault, RunOptions};

#[derive(Parser)]
#[command(name = "slime-trainer", version, about = "SFT then preference optimisation (SLIME and baselines)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a TOML config (see docs/trainer.md for every field and its default):
    /// SFT on one split, then the preference objective on the disjoint split, with evaluation.
    /// Writes config.toml, metrics.jsonl, eval.jsonl, checkpoints/, model/ and result.json into
    /// --run-dir.
    Train {
        /// The run's TOML config; every field has a default, so an empty file is valid.
        #[arg(long)]
        config: PathBuf,
        /// Output directory.
        #[arg(long)]
        run_dir: PathBuf,
        /// Continue an interrupted run from its latest checkpoint (same config; only
        /// [checkpoint] may change). A finished run is left alone; a run directory without a
        /// checkpoint starts fresh. Without --resume, earlier logs and checkpoints in --run-dir
        /// are discarded.
        #[arg(long)]
        resume: bool,
        /// Progress on stderr: auto (a bar on a terminal, periodic lines otherwise), bar,
        /// lines or off.
        #[arg(long, default_value = "auto", value_parser = parse_progress)]
        progress: ProgressMode,
    },
    /// Evaluate a saved model directory (config.json + model.safetensors, e.g. a run's model/)
    /// on the embedded task's held-out pairs; prints the metrics as key = value lines.
    Eval {
        /// The model directory.
        #[arg(long)]
        model: PathBuf,
        /// A run config whose seed, data.eval_pairs and [eval] section select the held-out
        /// pairs and the evaluation settings (default: the defaults, seed 0).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn parse_progress(text: &str) -> std::result::Result<ProgressMode, String> {
    match text {
        "auto" => Ok(ProgressMode::Auto),
        "bar" => Ok(ProgressMode::Bar),
        "lines" => Ok(ProgressMode::Lines),
        "off" => Ok(ProgressMode::Off),
        other => Err(format!("`{other}`: expected auto, bar, lines or off")),
    }
}

fn read_config(path: &PathBuf) -> Result<RunConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    RunConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))
}

/// Test hooks, read from the environment (documented in docs/trainer.md, not in --help).
fn test_hooks(opts: &mut RunOptions) -> Result<()> {
    if let Ok(ms) = std::env::var("SLIME_TRAINER_STEP_DELAY_MS") {
        let ms: u64 = ms.parse().with_context(|| format!("SLIME_TRAINER_STEP_DELAY_MS = `{ms}`"))?;
        opts.step_delay = Duration::from_millis(ms);
    }
    if let Ok(fault) = std::env::var("SLIME_TRAINER_INJECT_FAULT") {
        opts.fault = Some(fault.parse::<Fault>()?);
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train { config, run_dir, resume, progress } => {
            let cfg = read_config(&config)?;
            let mut opts = RunOptions { resume, progress, ..RunOptions::default() };
            test_hooks(&mut opts)?;
            let report = slime_trainer::run::run_with(&cfg, &run_dir, &opts)
                .with_context(|| format!("run {}", run_dir.display()))?;
            for (k, v) in report.final_eval {
                println!("{k} = {v:.4}");
            }
            Ok(())
        }
        Command::Eval { model, config } => {
            let cfg = match &config {
                Some(path) => read_config(path)?,
                None => RunConfig::default(),
            };
            let metrics = slime_trainer::run::evaluate_dir(&cfg, &model)
                .with_context(|| format!("evaluating {}", model.display()))?;
            for (k, v) in metrics {
                println!("{k} = {v:.4}");
            }
            Ok(())
        }
    }
}
