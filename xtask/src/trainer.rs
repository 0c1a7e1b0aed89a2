//! Builds the `slime-trainer` package's binaries, which the grid, the asset conversion and the
//! benchmark run as separate processes (xtask itself links no model code).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The training, evaluation and conversion CLI.
pub const TRAINER: &str = "slime-trainer";
/// The training-step benchmark.
pub const STEP_BENCH: &str = "slime-step-bench";

/// The cargo target directory, absolute.
pub fn target_dir() -> PathBuf {
    let dir = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| PathBuf::from("target"), PathBuf::from);
    if dir.is_absolute() { dir } else { std::env::current_dir().map_or(dir.clone(), |cwd| cwd.join(&dir)) }
}

/// Builds `bin` of `slime-trainer` in release mode and returns its path. Says what it builds
/// first; a first build also compiles candle, arrow and tokenizers, which takes minutes, so it
/// shows cargo's progress.
pub fn build(bin: &str) -> Result<PathBuf> {
    let exe = target_dir().join("release").join(bin);
    // The benchmark binary is behind the `bench` feature, so `cargo install` leaves it out.
    let features: &[&str] = if bin == STEP_BENCH { &["--features", "bench"] } else { &[] };
    let command = [&["build", "--release", "-p", "slime-trainer", "--bin", bin][..], features].concat();
    let first = !exe.is_file();
    if first {
        println!(
            "building {bin} (cargo {}): a first build compiles candle, arrow and tokenizers and takes \
             several minutes (about 10 on 2 cores); later builds take seconds",
            command.join(" ")
        );
    } else {
        println!("checking that {bin} is up to date (cargo {})", command.join(" "));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(&command);
    if !first {
        cmd.arg("--quiet");
    }
    let status = cmd.status().with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("building {bin} failed ({status}); to see why: cargo {}", command.join(" "));
    }
    Ok(exe)
}
