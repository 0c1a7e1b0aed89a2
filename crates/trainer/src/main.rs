//! `slime-trainer`: the command-line interface of the training loop.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use slime_trainer::config::RunConfig;

#[derive(Parser)]
#[command(name = "slime-trainer", version, about = "SFT then preference optimisation (SLIME and baselines)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a TOML config (see `slime_trainer::config` for every field and its default):
    /// SFT on one split, then the preference objective on the disjoint split, with evaluation.
    /// Writes config.toml, metrics.jsonl, eval.jsonl, model/ and result.json into --run-dir.
    Train {
        /// The run's TOML config; every field has a default, so an empty file is valid.
        #[arg(long)]
        config: PathBuf,
        /// Output directory.
        #[arg(long)]
        run_dir: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train { config, run_dir } => {
            let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
            let cfg = RunConfig::from_toml(&text).with_context(|| format!("in {}", config.display()))?;
            let result =
                slime_trainer::run::run(&cfg, &run_dir).with_context(|| format!("run {}", run_dir.display()))?;
            for (k, v) in result {
                println!("{k} = {v:.4}");
            }
            Ok(())
        }
    }
}
