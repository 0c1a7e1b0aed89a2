//! `cargo xtask ablate`: the SLIME ablation grid against the baselines on the embedded task.
//!
//! Each cell (variant x seed) runs as its own `slime-trainer train` process into
//! `<out>/<variant>-seed<k>/`; a cell whose `result.json` exists is skipped, and an unfinished
//! cell is run with `--resume`, so an interrupted grid continues each cell from its last
//! checkpoint (a cell whose settings changed starts afresh). Every seed's SFT model is trained
//! once (the `sft` cell) and every preference variant of that seed starts from it. At the end
//! the report (table.md, table.csv, plots/) is written into `<out>`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::report;

/// The default grid: (variant name, `[preference]` objective as a TOML inline table).
pub const GRID: [(&str, &str); 16] = [
    ("sft", ""),
    ("slime", r#"{ type = "slime" }"#),
    ("slime-no-anchor", r#"{ type = "slime", use_anchor = false }"#),
    ("slime-no-stabilizer", r#"{ type = "slime", use_stabilizer = false }"#),
    ("slime-no-hard-margin", r#"{ type = "slime", use_hard_margin = false }"#),
    ("slime-no-soft-margin", r#"{ type = "slime", use_soft_margin = false }"#),
    ("slime-p1.0", r#"{ type = "slime", p = 1.0 }"#),
    ("slime-p1.5", r#"{ type = "slime", p = 1.5 }"#),
    ("slime-p2.0", r#"{ type = "slime", p = 2.0 }"#),
    ("slime-p3.0", r#"{ type = "slime", p = 3.0 }"#),
    ("dpo", r#"{ type = "dpo" }"#),
    ("simpo", r#"{ type = "simpo" }"#),
    ("cpo", r#"{ type = "cpo" }"#),
    ("orpo", r#"{ type = "orpo" }"#),
    ("ipo", r#"{ type = "ipo" }"#),
    ("slime-authors-code", r#"{ type = "slime", preset = "authors-code" }"#),
];

/// Command-line options.
pub struct Options {
    /// Variants to run (default: the whole grid).
    pub only: Option<Vec<String>>,
    /// Seeds (default 0, 1, 2).
    pub seeds: Vec<u64>,
    /// Preference steps per cell.
    pub steps: u64,
    /// SFT steps per seed.
    pub sft_steps: u64,
    /// Results folder.
    pub out: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self { only: None, seeds: vec![0, 1, 2], steps: 120, sft_steps: 800, out: PathBuf::from("results") }
    }
}

/// Parses `--only a,b --seeds 0,1 --steps N --sft-steps N --out DIR`.
pub fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--only" => o.only = Some(value()?.split(',').map(str::to_owned).collect()),
            "--seeds" => {
                o.seeds = value()?
                    .split(',')
                    .map(|s| s.parse().with_context(|| format!("--seeds: `{s}` is not a number")))
                    .collect::<Result<_>>()?
            }
            "--steps" => o.steps = value()?.parse().context("--steps: expected a number")?,
            "--sft-steps" => o.sft_steps = value()?.parse().context("--sft-steps: expected a number")?,
            "--out" => o.out = PathBuf::from(value()?),
            other => bail!("unknown option `{other}` (see `cargo xtask help`)"),
        }
    }
    if let Some(only) = &o.only {
        for v in only {
            if !GRID.iter().any(|(name, _)| name == v) {
                bail!("--only: unknown variant `{v}`; the grid has {}", GRID.map(|g| g.0).join(", "));
            }
        }
    }
    if o.seeds.is_empty() {
        bail!("--seeds: at least one seed");
    }
    Ok(o)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The trainer binary, built in release mode.
fn build_trainer() -> Result<PathBuf> {
    let status = Command::new(cargo())
        .args(["build", "--release", "--quiet", "-p", "slime-trainer", "--bin", "slime-trainer"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building slime-trainer failed ({status})");
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| PathBuf::from("target"), PathBuf::from);
    Ok(target.join("release").join("slime-trainer"))
}

/// The TOML config of one cell.
fn cell_config(variant: &str, objective: &str, seed: u64, opts: &Options, sft_model: &Path) -> String {
    if variant == "sft" {
        format!("name = \"sft\"\nseed = {seed}\n\n[sft]\nsteps = {}\n\n[preference]\nsteps = 0\n", opts.sft_steps)
    } else {
        format!(
            "name = \"{variant}\"\nseed = {seed}\ninit = {:?}\n\n[preference]\nsteps = {}\nobjective = {objective}\n\n[eval]\nevery = {}\n",
            sft_model.display().to_string(),
            opts.steps,
            (opts.steps / 3).max(1)
        )
    }
}

/// Whether an unfinished cell may continue from its checkpoint: its `run.toml` is absent (a new
/// cell: the trainer then starts fresh) or holds exactly `config`. A cell whose settings changed
/// (e.g. another `--steps`) starts afresh, since the trainer refuses to resume with another
/// config.
fn resumable(run_toml: &Path, config: &str) -> bool {
    std::fs::read_to_string(run_toml).map_or(true, |old| old == config)
}

/// The trainer's arguments for one cell. With `resume`, an interrupted cell continues from its
/// last checkpoint (`--resume` on a directory without a checkpoint starts fresh, and on a
/// finished run does nothing); without it, the trainer discards what the directory holds.
fn train_args(config: &Path, dir: &Path, resume: bool) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> =
        vec!["train".into(), "--config".into(), config.into(), "--run-dir".into(), dir.into()];
    if resume {
        args.push("--resume".into());
    }
    args
}

/// Runs the grid and writes the report.
pub fn ablate(opts: &Options) -> Result<()> {
    let trainer = build_trainer()?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    let variants: Vec<(&str, &str)> =
        GRID.iter().copied().filter(|(v, _)| opts.only.as_ref().is_none_or(|o| o.iter().any(|x| x == v))).collect();
    let started = Instant::now();
    let mut failures = Vec::new();
    for &seed in &opts.seeds {
        let sft_dir = out.join(format!("sft-seed{seed}"));
        let sft_model = sft_dir.join("model");
        // The SFT cell always runs first: every other variant of this seed starts from it.
        let needed: Vec<(&str, &str)> =
            std::iter::once(("sft", "")).chain(variants.iter().copied().filter(|(v, _)| *v != "sft")).collect();
        for (variant, objective) in needed {
            let dir = out.join(format!("{variant}-seed{seed}"));
            if dir.join("result.json").is_file() {
                println!("[{:>6.1}s] {variant} seed {seed}: done earlier, skipped", started.elapsed().as_secs_f64());
                continue;
            }
            std::fs::create_dir_all(&dir)?;
            let config = dir.join("run.toml");
            let text = cell_config(variant, objective, seed, opts, &sft_model);
            let resume = resumable(&config, &text);
            if !resume {
                println!(
                    "[{:>6.1}s] {variant} seed {seed}: settings changed since the interrupted run; starting it afresh",
                    started.elapsed().as_secs_f64()
                );
            }
            std::fs::write(&config, &text)?;
            let cell_start = Instant::now();
            let output = Command::new(&trainer)
                .args(train_args(&config, &dir, resume))
                .output()
                .with_context(|| format!("starting {}", trainer.display()))?;
            std::fs::write(dir.join("stdout.log"), &output.stdout)?;
            std::fs::write(dir.join("stderr.log"), &output.stderr)?;
            if output.status.success() {
                println!(
                    "[{:>6.1}s] {variant} seed {seed}: finished in {:.1}s",
                    started.elapsed().as_secs_f64(),
                    cell_start.elapsed().as_secs_f64()
                );
            } else {
                let err = String::from_utf8_lossy(&output.stderr);
                println!("[{:>6.1}s] {variant} seed {seed}: FAILED\n{err}", started.elapsed().as_secs_f64());
                if variant == "sft" {
                    bail!("the SFT cell of seed {seed} failed; see {}", dir.join("stderr.log").display());
                }
                failures.push(format!("{variant}-seed{seed}"));
            }
        }
    }
    let order: Vec<String> = GRID.iter().map(|(v, _)| v.to_string()).collect();
    let cells: Vec<report::Cell> = report::read_cells(&out)?
        .into_iter()
        .filter(|c| {
            // The SFT row always appears: it is every variant's starting point.
            let wanted = c.result.variant == "sft" || variants.iter().any(|(v, _)| *v == c.result.variant);
            wanted && opts.seeds.contains(&c.result.seed)
        })
        .collect();
    for path in report::write_report(&cells, &order, &out)? {
        println!("wrote {}", path.display());
    }
    println!("\n{}", std::fs::read_to_string(out.join("table.md"))?);
    println!("grid finished in {:.1}s", started.elapsed().as_secs_f64());
    if !failures.is_empty() {
        bail!("{} cells failed: {}", failures.len(), failures.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn options_parse_and_reject_unknowns() -> Result<()> {
        let o = parse(&args("--only slime,dpo --seeds 3,4 --steps 10 --sft-steps 20 --out x"))?;
        assert_eq!(o.only, Some(vec!["slime".to_string(), "dpo".to_string()]));
        assert_eq!((o.seeds, o.steps, o.sft_steps, o.out), (vec![3, 4], 10, 20, PathBuf::from("x")));
        assert!(parse(&args("--only kto")).is_err());
        assert!(parse(&args("--seeds a")).is_err());
        assert!(parse(&args("--steps")).is_err());
        assert!(parse(&args("--model smollm2")).is_err());
        Ok(())
    }

    #[test]
    fn unfinished_cells_resume_unless_their_settings_changed() -> Result<()> {
        let tmp = std::env::temp_dir().join(format!("xtask-ablate-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let run_toml = tmp.join("run.toml");
        let _ = std::fs::remove_file(&run_toml);
        assert!(resumable(&run_toml, "a = 1\n"), "a new cell: --resume starts it fresh");
        std::fs::write(&run_toml, "a = 1\n")?;
        assert!(resumable(&run_toml, "a = 1\n"));
        assert!(!resumable(&run_toml, "a = 2\n"));
        std::fs::remove_dir_all(&tmp)?;
        let args = train_args(Path::new("c.toml"), Path::new("cell"), true);
        assert_eq!(
            args,
            ["train", "--config", "c.toml", "--run-dir", "cell", "--resume"].map(std::ffi::OsString::from)
        );
        assert!(!train_args(Path::new("c.toml"), Path::new("cell"), false).iter().any(|a| a == "--resume"));
        Ok(())
    }

    #[test]
    fn cell_configs_parse_as_run_configs() {
        // Every grid objective is valid TOML for the trainer (checked by parsing the table).
        for (variant, objective) in GRID {
            let text = cell_config(variant, objective, 1, &Options::default(), Path::new("/tmp/sft/model"));
            let value: toml::Table = text.parse().unwrap_or_else(|e| panic!("{variant}: {e}\n{text}"));
            assert_eq!(value["name"].as_str(), Some(variant));
        }
    }
}
