//! `cargo xtask bench`: training-step speed on the reference workload (docs/performance.md).
//!
//! Builds `slime-step-bench` in release mode and runs each objective in a fresh process (one JSON
//! line each). With `--vs-pytorch DIR` (the anchor scripts: `bench_plain.py`, `bench_trl.py`) it
//! also runs the PyTorch/TRL anchors in the same invocation, alternating with ours so that load
//! changes hit both sides alike, and prints the ratios. The anchors'
//! virtual environment is `DIR/venv` when it exists, otherwise `target/bench/anchor-venv`, created
//! as the anchors' README says (`pip install torch transformers trl datasets pyarrow`) if missing.
//!
//! `--workload smollm2|gemma3-270m` instead times LoRA training of a real model through
//! `slime-trainer train` against `bench_peft.py` (see [`crate::bench_real`]).
//!
//! `--scaling` instead runs SimPO over hidden sizes 256/512/1024 (at 128 tokens) and sequence
//! lengths 128/512/2048 (at hidden 256) and prints how the step time grows against the FLOP count.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bench_real::{self, Workload};
use crate::trainer::{self, target_dir};

/// Pause between two benchmark processes, so the previous one's exit (an anchor returns over
/// 1 GiB to the kernel) cannot overlap the next one's timed steps.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// Our objectives, in run order.
const OBJECTIVES: [&str; 4] = ["simpo", "slime", "dpo-precomputed", "dpo-live"];

/// `cargo xtask bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The workload: `tiny` (a random 3M-parameter Llama through slime-step-bench), or LoRA
    /// training of a real model of `cargo xtask assets` through `slime-trainer train`:
    /// `smollm2` (SmolLM2-135M-Instruct) or `gemma3-270m` (Gemma-3-270M).
    #[arg(long, value_name = "NAME", default_value = "tiny", value_parser = ["tiny", "smollm2", "gemma3-270m"])]
    workload: String,
    /// The assets directory of `cargo xtask assets` (real-model workloads).
    #[arg(long, value_name = "DIR", default_value = "assets")]
    assets: PathBuf,
    /// Objectives to time, comma-separated: simpo, slime, dpo-precomputed, dpo-live (real-model
    /// workloads: the first three). Default: all of them.
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Timed steps per run (the first is warm-up; at least 2; default 20). Tiny workload only:
    /// the real-model workloads run the anchor's 2 untimed and 8 timed steps.
    #[arg(long, value_name = "N")]
    steps: Option<usize>,
    /// Repetitions of the whole set, alternating ours and the anchors (default 1; 3 for the
    /// real-model workloads).
    #[arg(long, value_name = "N")]
    reps: Option<usize>,
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
    /// Ours splitting each batch of 8 pairs (real models: 4) into K micro-batches run at once
    /// (the trainer's parallel_micro_batches; tiny default one per thread when that divides 8,
    /// real-model default 1 = one pass).
    #[arg(long, value_name = "K")]
    parallel_micro_batches: Option<usize>,
}

impl Options {
    /// The real-model workload, if one is chosen.
    fn real(&self) -> Option<Workload> {
        match self.workload.as_str() {
            "smollm2" => Some(Workload::Smollm2),
            "gemma3-270m" => Some(Workload::Gemma3),
            _ => None,
        }
    }

    /// The objectives to run.
    fn only(&self) -> Vec<String> {
        match (&self.only, self.real()) {
            (Some(only), _) => only.clone(),
            (None, Some(_)) => bench_real::OBJECTIVES.map(String::from).to_vec(),
            (None, None) => OBJECTIVES.map(String::from).to_vec(),
        }
    }

    /// Timed steps of a tiny run.
    fn steps(&self) -> usize {
        self.steps.unwrap_or(20)
    }

    /// Repetitions.
    fn reps(&self) -> usize {
        self.reps.unwrap_or(if self.real().is_some() { 3 } else { 1 })
    }

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
        let known: &[&str] = if self.real().is_some() { &bench_real::OBJECTIVES } else { &OBJECTIVES };
        if let Some(bad) = self.only().iter().find(|x| !known.contains(&x.as_str())) {
            bail!(
                "--only: unknown objective `{bad}` for --workload {} (expected some of {})",
                self.workload,
                known.join(",")
            );
        }
        if self.steps() < 2 || self.reps() == 0 || self.threads == 0 {
            bail!("need --steps >= 2, --reps >= 1, --threads >= 1");
        }
        if self.real().is_some() {
            let tiny_only = [
                ("--steps", self.steps.is_some()),
                ("--scaling", self.scaling),
                ("--separate-rows", self.separate_rows),
                ("--exe", self.exe.is_some()),
            ];
            if let Some((flag, _)) = tiny_only.iter().find(|(_, set)| *set) {
                bail!("{flag} is for --workload tiny only (the real-model workloads run 2 untimed + 8 timed steps)");
            }
            if self.parallel_micro_batches.is_some_and(|k| k == 0 || !bench_real::PAIRS_PER_STEP.is_multiple_of(k)) {
                bail!("--parallel-micro-batches: expected a divisor of the batch of 4 pairs (1, 2 or 4)");
            }
            return Ok(());
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
/// `packages` are the anchors' imports: `torch, transformers, trl, datasets, pyarrow` for the
/// tiny workload, `torch, transformers, peft, pyarrow` for the real models; missing ones are
/// installed into the venv.
fn anchor_python(dir: &Path, packages: &[&str]) -> Result<PathBuf> {
    let own = dir.join("venv").join("bin").join("python");
    if own.exists() {
        return Ok(own);
    }
    let venv = target_dir().join("bench").join("anchor-venv");
    let python = venv.join("bin").join("python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {}", packages.join(", "))])
            .status()
            .is_ok_and(|s| s.success());
    if ready {
        return Ok(python);
    }
    eprintln!("setting up {} ({} from PyPI; a few minutes, about 3 GB)", venv.display(), packages.join(", "));
    let run = |cmd: &mut Command| -> Result<()> {
        let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
        if !status.success() {
            bail!("{cmd:?} failed with {status}");
        }
        Ok(())
    };
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(&python).args(["-m", "pip", "install", "-q", "-U", "pip"]))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "-q"]).args(packages))?;
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

/// The median (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
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
    if let Some(workload) = o.real() {
        return real(o, workload);
    }
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
            let python = anchor_python(dir, &["torch", "transformers", "trl", "datasets", "pyarrow"])?;
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
    for _ in 0..o.reps() {
        for obj in &o.only() {
            let mut cmd = Command::new(&exe);
            cmd.args(["--objective", obj, "--steps", &o.steps().to_string(), "--threads", &o.threads.to_string()]);
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
                    cmd.args(script).args(["--steps", &o.steps().to_string()]).current_dir(dir);
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

/// An absolute form of `path` (the anchor runs in its own directory).
fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().context("current directory")?.join(path)
    })
}

/// `--workload smollm2|gemma3-270m`: ours (`slime-trainer train`) and, with `--vs-pytorch`,
/// `bench_peft.py`, alternating, `--reps` times; then the medians and the ratios (see
/// [`bench_real`]).
fn real(o: &Options, workload: Workload) -> Result<()> {
    let model = absolute(&o.assets.join(workload.model_dir()))?;
    let data = absolute(&o.assets.join(bench_real::DATA))?;
    for (path, what) in [(&model, "model directory"), (&data, "preference file")] {
        if !path.exists() {
            bail!(
                "--assets {}: no {what} {} (run `cargo xtask assets {}` first, or pass --assets DIR)",
                o.assets.display(),
                path.display(),
                o.assets.display()
            );
        }
    }
    let anchor = match &o.vs_pytorch {
        Some(dir) => {
            if !dir.join("bench_peft.py").exists() {
                bail!("--vs-pytorch {}: no bench_peft.py there", dir.display());
            }
            let python = absolute(&anchor_python(dir, &["torch", "transformers", "peft", "pyarrow"])?)?;
            Some((absolute(dir)?, python))
        }
        None => None,
    };
    let exe = trainer::build(trainer::TRAINER)?;
    let lscpu = Command::new("lscpu").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let cpu = bench_real::cpu_line(&lscpu.unwrap_or_default());
    println!("{cpu}");
    let work = target_dir().join("bench").join("real").join(workload.name());
    let ours = bench_real::Ours {
        exe: &exe,
        model: &model,
        data: &data,
        threads: o.threads,
        parallel: o.parallel_micro_batches.unwrap_or(1),
        gradient_checkpointing: o.gradient_checkpointing,
        work: &work,
    };
    let only = o.only();
    if only.iter().any(|x| x == "dpo-precomputed") {
        // Before any timed run, so that every run of ours reads the same file.
        let stale = work.join("reference_logps.parquet");
        if stale.exists() {
            std::fs::remove_file(&stale).with_context(|| format!("removing {}", stale.display()))?;
        }
        ours.reference()?;
    }
    let mut file = open_results(&o.out)?;
    let mut results: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut first = true;
    for rep in 0..o.reps() {
        for objective in &only {
            let mut runs: Vec<(String, Option<Command>)> = vec![(format!("{objective}-slime-rs"), None)];
            if let Some((dir, python)) = &anchor {
                let cmd = bench_real::anchor_command(python, dir, &model, &data, objective, o.threads);
                runs.push((format!("{objective}-torch-peft"), Some(cmd)));
            }
            for (label, cmd) in runs {
                if !first {
                    std::thread::sleep(SETTLE);
                }
                first = false;
                let before = loadavg();
                eprintln!("{label}, repetition {} of {}", rep + 1, o.reps());
                let mut v = match cmd {
                    None => ours.run(objective, rep)?,
                    Some(mut cmd) => run_json(&mut cmd, &label)?,
                };
                if let Some(m) = v.as_object_mut() {
                    m.insert("bench_label".into(), label.clone().into());
                    m.insert("workload".into(), workload.name().into());
                    m.insert("loadavg_before".into(), before.into());
                    m.insert("cpu".into(), cpu.clone().into());
                }
                println!("{v}");
                writeln!(file, "{v}").with_context(|| format!("writing {}", o.out.display()))?;
                results.entry(label).or_default().push(v);
            }
        }
    }
    let stat = |runs: &[Value], key: &str| median(runs.iter().filter_map(|r| r.get(key)?.as_f64()).collect());
    println!();
    println!("{} ({}), {} threads; {cpu}", workload.name(), model.display(), o.threads);
    println!("| run | n | s/step (median) | row tokens/step | row tokens/s | peak RSS MiB | foreign CPU (max) |");
    println!("|---|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    let mut disturbed = Vec::new();
    for (label, runs) in &results {
        let foreign = runs.iter().filter_map(|r| r.get("foreign_cpu_frac")?.as_f64()).fold(f64::NAN, f64::max);
        if foreign > bench_real::FOREIGN_LIMIT {
            disturbed.push(label.clone());
        }
        let tokens = stat(runs, "row_tokens_per_step_mean");
        println!(
            "| {label} | {} | {:.2} | {} | {:.1} | {:.0} | {} |",
            runs.len(),
            stat(runs, "s_per_step_median"),
            if tokens.is_finite() { format!("{tokens:.0}") } else { "-".into() },
            stat(runs, "row_tok_per_s"),
            stat(runs, "peak_rss_mib"),
            if foreign.is_finite() { format!("{foreign:.3}") } else { "-".into() },
        );
        medians.push((label.clone(), stat(runs, "row_tok_per_s"), stat(runs, "peak_rss_mib")));
    }
    println!(
        "\nrow tokens: every real token of every row (a pair's prompt with each completion). The anchor \
         takes the file's pairs in order, ours the trainer's preference split of the same file (a seeded \
         hash split, shuffled): the same pool and length limit, not the same pairs."
    );
    for line in bench_real::ratio_lines(&medians) {
        println!("{line}");
    }
    if !disturbed.is_empty() {
        println!(
            "other processes used more than {:.0}% of the CPUs during some runs of {}: the machine was busy, \
             redo them on a quiet machine",
            bench_real::FOREIGN_LIMIT * 100.0,
            disturbed.join(", ")
        );
    }
    println!("\nraw JSON lines appended to {}; runs under {}", o.out.display(), work.display());
    Ok(())
}
