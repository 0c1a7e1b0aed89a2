//! `cargo xtask bench`: training-step speed on the reference workload (docs/performance.md).
//!
//! Builds `slime-step-bench` in release mode and runs each objective in a fresh process (one JSON
//! line each). With `--vs-pytorch DIR` (the anchor scripts: `bench_plain.py`, `bench_trl.py`) it
//! also runs the PyTorch/TRL anchors in the same invocation, alternating with ours so that load
//! changes hit both sides alike, and prints the ratios. The anchors'
//! virtual environment is `DIR/venv` when it exists, otherwise `target/bench/anchor-venv`, created
//! as the anchors' README says (`pip install torch transformers trl datasets pyarrow`) if missing.
//!
//! `--scaling` instead runs SimPO over hidden sizes 256/512/1024 (at 128 tokens) and sequence
//! lengths 128/512/2048 (at hidden 256) and prints how the step time grows against the FLOP count.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::trainer::{self, target_dir};

/// Pause between two benchmark processes, so the previous one's exit (an anchor returns over
/// 1 GiB to the kernel) cannot overlap the next one's timed steps.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// Our objectives, in run order.
const OBJECTIVES: [&str; 4] = ["simpo", "slime", "dpo-precomputed", "dpo-live"];

/// `cargo xtask bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Objectives to time, comma-separated: simpo, slime, dpo-precomputed, dpo-live.
    #[arg(long, value_name = "A,B", value_delimiter = ',', default_values_t = OBJECTIVES.map(String::from))]
    only: Vec<String>,
    /// Timed steps per run (the first is warm-up; at least 2).
    #[arg(long, value_name = "N", default_value_t = 20)]
    steps: usize,
    /// Repetitions of the whole set, alternating ours and the anchors.
    #[arg(long, value_name = "N", default_value_t = 1)]
    reps: usize,
    /// Threads of every run.
    #[arg(long, value_name = "N", default_value_t = 2)]
    threads: usize,
    /// Also run the PyTorch/TRL anchor scripts in DIR (bench_plain.py, bench_trl.py),
    /// alternating with ours, and print the ratios.
    #[arg(long, value_name = "DIR")]
    vs_pytorch: Option<PathBuf>,
    /// The JSON-lines file every run is appended to.
    #[arg(long, value_name = "FILE", default_value = "target/bench/results.jsonl")]
    out: PathBuf,
    /// A prebuilt slime-step-bench instead of building one.
    #[arg(long, value_name = "PATH")]
    exe: Option<PathBuf>,
    /// SimPO at hidden 256/512/1024 and 128/512/2048 tokens against the FLOP count (ours only).
    #[arg(long)]
    scaling: bool,
    /// Ours without packing pairs around their prompt.
    #[arg(long)]
    separate_rows: bool,
    /// Ours recomputing activations in the backward pass.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Ours splitting each batch of 8 pairs into K micro-batches run at once (the trainer's
    /// parallel_micro_batches; default one per thread when that divides 8; 1 = one pass).
    #[arg(long, value_name = "K")]
    parallel_micro_batches: Option<usize>,
}

impl Options {
    /// The flags our every `slime-step-bench` run gets.
    fn our_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if self.separate_rows {
            flags.push("--separate-rows".to_string());
        }
        if self.gradient_checkpointing {
            flags.push("--gradient-checkpointing".to_string());
        }
        let parallel = self.parallel_micro_batches.unwrap_or(if 8 % self.threads == 0 { self.threads } else { 1 });
        flags.extend(["--parallel-micro-batches".to_string(), parallel.to_string()]);
        flags
    }
}

/// The `--scaling` sweep: `(hidden, seq, steps)`, one size changed at a time from the reference
/// workload (the first); fewer steps for the expensive shapes (the first step is warm-up).
const SCALING: [(usize, usize, usize); 5] =
    [(256, 128, 10), (512, 128, 6), (1024, 128, 4), (256, 512, 6), (256, 2048, 3)];

impl Options {
    /// Refuses values the runs cannot use.
    pub fn check(&self) -> Result<()> {
        if let Some(bad) = self.only.iter().find(|x| !OBJECTIVES.contains(&x.as_str())) {
            bail!("--only: unknown objective `{bad}` (expected some of {})", OBJECTIVES.join(","));
        }
        if self.steps < 2 || self.reps == 0 || self.threads == 0 {
            bail!("need --steps >= 2, --reps >= 1, --threads >= 1");
        }
        if self.scaling && self.vs_pytorch.is_some() {
            bail!("--scaling runs ours only; drop --vs-pytorch");
        }
        if self.parallel_micro_batches.is_some_and(|k| k == 0 || 8 % k != 0) {
            bail!("--parallel-micro-batches: expected a divisor of the batch of 8 pairs (1, 2, 4 or 8)");
        }
        Ok(())
    }
}

/// The anchors' Python: `DIR/venv/bin/python`, else `target/bench/anchor-venv/bin/python`,
/// created (the anchors' README's recipe) when missing.
fn anchor_python(dir: &Path) -> Result<PathBuf> {
    let own = dir.join("venv").join("bin").join("python");
    if own.exists() {
        return Ok(own);
    }
    let venv = target_dir().join("bench").join("anchor-venv");
    let python = venv.join("bin").join("python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import torch, transformers, trl, datasets"])
            .status()
            .is_ok_and(|s| s.success());
    if ready {
        return Ok(python);
    }
    eprintln!("creating {} (torch, transformers, trl, datasets, pyarrow from PyPI; a few minutes)", venv.display());
    let run = |cmd: &mut Command| -> Result<()> {
        let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
        if !status.success() {
            bail!("{cmd:?} failed with {status}");
        }
        Ok(())
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "-q", "-U", "pip"]))?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "-q",
        "torch",
        "transformers",
        "trl",
        "datasets",
        "pyarrow",
    ]))?;
    Ok(python)
}

/// The JSON-lines file every run is appended to.
fn open_results(out: &Path) -> Result<std::fs::File> {
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))
}

/// `--scaling`: SimPO on each shape of [`SCALING`], one fresh process each, then a table of the
/// step time against the FLOP count (model `6 x params x positions` plus causal attention), both
/// relative to the reference workload: a cost ratio over FLOP ratio near 1 means the step grows as
/// the arithmetic predicts.
fn scaling(o: &Options, exe: &Path, file: &mut std::fs::File) -> Result<()> {
    let mut rows = Vec::new();
    for (hidden, seq, steps) in SCALING {
        let mut cmd = Command::new(exe);
        cmd.args(["--objective", "simpo", "--threads", &o.threads.to_string()]).args([
            "--hidden",
            &hidden.to_string(),
            "--seq",
            &seq.to_string(),
            "--steps",
            &steps.to_string(),
        ]);
        cmd.env("RAYON_NUM_THREADS", o.threads.to_string());
        cmd.args(o.our_flags());
        let v = run_json(&mut cmd, &format!("simpo at hidden {hidden}, seq {seq}"))?;
        println!("{v}");
        writeln!(file, "{v}").with_context(|| format!("writing {}", o.out.display()))?;
        let get = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let gflop = get("gflop_per_step") + get("attention_gflop_per_step");
        rows.push((hidden, seq, get("s_per_step_steady_median"), gflop, get("peak_rss_mib")));
    }
    let (_, _, base_s, base_gflop, _) = rows[0];
    println!();
    println!(
        "| hidden | seq | s/step | GFLOP/step (model + attention) | GFLOP/s | peak RSS MiB | cost ratio / FLOP ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (hidden, seq, s, gflop, rss) in rows {
        println!(
            "| {hidden} | {seq} | {s:.3} | {gflop:.1} | {:.1} | {rss:.0} | {:.2} |",
            gflop / s,
            (s / base_s) / (gflop / base_gflop)
        );
    }
    println!("\nraw JSON lines appended to {}", o.out.display());
    Ok(())
}

/// One benchmark process: its result, the last JSON line with a `label` field.
fn run_json(cmd: &mut Command, what: &str) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed with {}:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("label").is_some())
        .with_context(|| format!("{what} printed no JSON line with a \"label\":\n{stdout}"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the benchmark; see the module docs.
/// Runs the benchmark processes and prints the medians (and ratios against the anchors).
pub fn bench(o: &Options) -> Result<()> {
    o.check()?;
    let exe = match &o.exe {
        Some(p) => p.clone(),
        None => trainer::build(trainer::STEP_BENCH)?,
    };
    let mut results_file = open_results(&o.out)?;
    if o.scaling {
        return scaling(o, &exe, &mut results_file);
    }
    let anchors = match &o.vs_pytorch {
        Some(dir) => {
            if !dir.join("bench_plain.py").exists() || !dir.join("bench_trl.py").exists() {
                bail!("{} has no bench_plain.py / bench_trl.py", dir.display());
            }
            let python = anchor_python(dir)?;
            let python = if python.is_absolute() {
                python
            } else {
                std::env::current_dir().context("current directory")?.join(python)
            };
            Some((dir.clone(), python))
        }
        None => None,
    };
    // Alternate: each of ours is followed by the anchor it is compared with.
    let mut jobs: Vec<(String, Command)> = Vec::new();
    for _ in 0..o.reps {
        for obj in &o.only {
            let mut cmd = Command::new(&exe);
            cmd.args(["--objective", obj, "--steps", &o.steps.to_string(), "--threads", &o.threads.to_string()]);
            cmd.env("RAYON_NUM_THREADS", o.threads.to_string());
            cmd.args(o.our_flags());
            jobs.push((format!("{obj}-slime-rs"), cmd));
            if let Some((dir, python)) = &anchors {
                let script: &[&str] = match obj.as_str() {
                    "simpo" => &["bench_plain.py"],
                    "slime" => &["bench_trl.py", "--trainer", "simpo"],
                    "dpo-precomputed" => &["bench_trl.py", "--trainer", "dpo"],
                    _ => &[],
                };
                if !script.is_empty() {
                    let mut cmd = Command::new(python);
                    cmd.args(script).args(["--steps", &o.steps.to_string()]).current_dir(dir);
                    cmd.env("BENCH_THREADS", o.threads.to_string());
                    let label = match script[0] {
                        "bench_plain.py" => "simpo-plain-torch".to_string(),
                        _ => format!("{}-trl", script[2]),
                    };
                    jobs.push((label, cmd));
                }
            }
        }
    }
    let file = &mut results_file;
    let mut results: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (i, (label, mut cmd)) in jobs.into_iter().enumerate() {
        if i > 0 {
            std::thread::sleep(SETTLE);
        }
        let before = loadavg();
        let mut v = run_json(&mut cmd, &label)?;
        if let Some(m) = v.as_object_mut() {
            m.insert("bench_label".into(), label.clone().into());
            m.insert("loadavg_before".into(), before.into());
        }
        println!("{v}");
        writeln!(file, "{v}").with_context(|| format!("writing {}", o.out.display()))?;
        results.entry(label).or_default().push(v);
    }
    let stat = |label: &str, key: &str| -> Option<f64> {
        let rs = results.get(label)?;
        Some(median(rs.iter().filter_map(|r| r.get(key)?.as_f64()).collect()))
    };
    let tok_s = |label: &str| stat(label, "s_per_step_steady_median").map(|s| 1792.0 / s);
    println!();
    println!("ours: {}", o.our_flags().join(" "));
    println!(
        "| run | n | s/step (median of steady steps) | tokens/s | peak RSS MiB | saved activations MiB | GFLOP/s | foreign CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for label in results.keys() {
        println!(
            "| {label} | {} | {:.3} | {:.0} | {:.0} | {} | {} | {} |",
            results[label].len(),
            stat(label, "s_per_step_steady_median").unwrap_or(f64::NAN),
            tok_s(label).unwrap_or(f64::NAN),
            stat(label, "peak_rss_mib").unwrap_or(f64::NAN),
            stat(label, "saved_activations_peak_mib")
                .filter(|v| v.is_finite())
                .map_or("-".into(), |v| format!("{v:.1}")),
            stat(label, "gflop_per_s").filter(|v| v.is_finite()).map_or("-".into(), |v| format!("{v:.1}")),
            stat(label, "foreign_cpu_frac").map_or("-".into(), |v| format!("{v:.2}")),
        );
    }
    if anchors.is_some() {
        println!();
        let targets = [
            ("simpo-slime-rs", "simpo-plain-torch", 1.5),
            ("slime-slime-rs", "simpo-plain-torch", 1.5),
            ("dpo-precomputed-slime-rs", "dpo-trl", 1.5),
            ("dpo-live-slime-rs", "dpo-trl", f64::NAN),
            ("simpo-slime-rs", "simpo-trl", f64::NAN),
        ];
        for (ours, theirs, target) in targets {
            if let (Some(a), Some(b)) = (tok_s(ours), tok_s(theirs)) {
                let ratio = a / b;
                let verdict = if target.is_nan() {
                    String::new()
                } else if ratio >= target {
                    format!(" (target >= {target}x: met)")
                } else {
                    format!(" (target >= {target}x: NOT met)")
                };
                println!("{ours} / {theirs}: {ratio:.2}x tokens/s{verdict}");
            }
        }
    }
    println!("\nraw JSON lines appended to {}", o.out.display());
    Ok(())
}
