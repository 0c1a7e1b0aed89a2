//! `cargo xtask bench --workload smollm2|gemma3-270m`: LoRA preference training of a real
//! checkpoint, timed as a user runs it (`slime-trainer train`, release build), against the
//! PyTorch + PEFT anchor `bench_peft.py` (docs/performance.md, "Real models").
//!
//! Both sides: the model of `cargo xtask assets` in f32, LoRA r 64 / alpha 128 on the seven
//! projections, 4 pairs a step, AdamW lr 1e-4 (constant, no weight decay), clipping 1.0,
//! pairs whose prompt + chosen or prompt + rejected exceeds 512 tokens left out (not cut),
//! 2 untimed steps then 8 timed ones, the same thread count. Which pairs differ: the anchor
//! takes them in file order, the trainer from its seeded hash split of the same file (the
//! preference part) in a seeded shuffle. So the comparison is of row tokens per second (every
//! real token of every row, a pair's prompt counted with each completion) on the same pool,
//! and the table shows both sides' mean row tokens a step.
//!
//! Ours: per step, `tokens` and `tokens_per_second` from the run's `metrics.jsonl`; peak RSS
//! from the child's `VmHWM` (polled, so growth in the last 50 ms before it exits can be
//! missed); foreign CPU, the CPU time of other processes over the timed steps as a fraction of
//! all cores' wall time, from `/proc/stat` and the child's `/proc/<pid>/stat`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Untimed steps before the timed ones (the anchor's `--warmup` default).
pub const WARMUP_STEPS: usize = 2;
/// Timed steps (the anchor's `--steps` default).
pub const TIMED_STEPS: usize = 8;
/// Pairs a step.
pub const PAIRS_PER_STEP: usize = 4;
/// Longest prompt + completion; longer pairs are left out.
pub const MAX_LENGTH: usize = 512;
/// The objectives both sides run.
pub const OBJECTIVES: [&str; 3] = ["simpo", "slime", "dpo-precomputed"];
/// The preference file of `cargo xtask assets`, under the assets directory.
pub const DATA: &str = "data/dpo_en_demo.preference.parquet";
/// Targets: ours / anchor row tokens/s at least this.
pub const SPEED_TARGET: f64 = 3.0;
/// Targets: ours / anchor peak RSS at most this.
pub const RSS_TARGET: f64 = 0.25;
/// A run whose foreign CPU fraction exceeds this was disturbed by other processes.
pub const FOREIGN_LIMIT: f64 = 0.05;

/// A real-model workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// SmolLM2-135M-Instruct.
    Smollm2,
    /// Gemma-3-270M.
    Gemma3,
}

impl Workload {
    /// The `--workload` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Smollm2 => "smollm2",
            Self::Gemma3 => "gemma3-270m",
        }
    }

    /// The model directory under the assets directory.
    pub fn model_dir(self) -> &'static str {
        match self {
            Self::Smollm2 => "models/smollm2-135m-instruct",
            Self::Gemma3 => "models/gemma-3-270m",
        }
    }
}

/// The objective's `[preference] objective` value, with the anchor's hyperparameters.
fn objective_toml(objective: &str) -> Result<&'static str> {
    Ok(match objective {
        // z = 2.0 (A_w - A_l) - 1.0: beta 2, gamma 1.
        "simpo" => r#"{ type = "simpo", beta = 2.0, gamma_beta_ratio = 0.5 }"#,
        "slime" => r#"{ type = "slime", preset = "paper" }"#,
        "dpo-precomputed" => r#"{ type = "dpo", beta = 0.1 }"#,
        other => bail!("--only: `{other}` has no real-model workload (expected some of {})", OBJECTIVES.join(",")),
    })
}

/// A TOML string literal of `path`.
fn quoted(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// The `slime-trainer train` config of one run: no SFT, `WARMUP_STEPS + TIMED_STEPS`
/// preference steps of `PAIRS_PER_STEP` pairs (`parallel` micro-batches of them at once), the
/// anchor's LoRA, optimiser and objective, no checkpoints, generations or evaluation between
/// the steps (the trainer evaluates 4 held-out pairs before the first and after the last).
/// `reference` is the precomputed reference log-probs file of `dpo-precomputed`.
pub fn train_config(
    objective: &str,
    model: &Path,
    data: &Path,
    reference: Option<&Path>,
    parallel: usize,
    gradient_checkpointing: bool,
) -> Result<String> {
    let objective_value = objective_toml(objective)?;
    if (objective == "dpo-precomputed") != reference.is_some() {
        bail!("dpo-precomputed, and only it, runs with precomputed reference log-probs");
    }
    if parallel == 0 || !PAIRS_PER_STEP.is_multiple_of(parallel) {
        bail!("--parallel-micro-batches: expected a divisor of the {PAIRS_PER_STEP} pairs a step (1, 2 or 4)");
    }
    let reference = reference.map_or(String::new(), |r| format!("reference_logps = {}\n", quoted(r)));
    Ok(format!(
        r#"name = "bench-{objective}"
seed = 0

[model]
path = {model}
dtype = "f32"
gradient_checkpointing = {gradient_checkpointing}
lora = {{ r = 64, alpha = 128.0 }}

[data]
parquet = {data}
max_length = {MAX_LENGTH}
max_prompt_length = {max_prompt}
overlong = "drop"
eval_pairs = 4

[sft]
steps = 0

[preference]
steps = {steps}
batch_size = {batch}
grad_accum = {parallel}
parallel_micro_batches = {parallel}
max_grad_norm = 1.0
weight_decay = 0.0
schedule = {{ lr = 1e-4, decay = "constant", warmup_ratio = 0.0 }}
objective = {objective_value}
{reference}
[eval]
every = {steps}
generations = 0
batch_size = {PAIRS_PER_STEP}

[checkpoint]
every = 0
"#,
        model = quoted(model),
        data = quoted(data),
        max_prompt = MAX_LENGTH - 1,
        steps = WARMUP_STEPS + TIMED_STEPS,
        batch = PAIRS_PER_STEP / parallel,
    ))
}

/// One run's figures from its `metrics.jsonl`: the preference steps after the first
/// `WARMUP_STEPS`, each `(row tokens, seconds)` with seconds = tokens / tokens_per_second.
pub fn timed_steps(metrics: &str) -> Result<Vec<(f64, f64)>> {
    let mut steps = Vec::new();
    for (i, line) in metrics.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("metrics.jsonl line {}", i + 1))?;
        if v.get("stage").and_then(Value::as_str) != Some("preference") {
            continue;
        }
        let step =
            v.get("step").and_then(Value::as_u64).with_context(|| format!("metrics.jsonl line {}: no step", i + 1))?;
        if step as usize <= WARMUP_STEPS {
            continue;
        }
        let get = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .with_context(|| format!("metrics.jsonl line {}: no positive `{k}`", i + 1))
        };
        let tokens = get("tokens")?;
        steps.push((tokens, tokens / get("tokens_per_second")?));
    }
    if steps.len() != TIMED_STEPS {
        bail!("metrics.jsonl has {} timed preference steps, expected {TIMED_STEPS}", steps.len());
    }
    Ok(steps)
}

/// The summary of one of our runs, under the anchor's key names.
pub fn summarize(label: &str, steps: &[(f64, f64)], peak_rss_mib: f64, foreign: f64) -> Value {
    let tokens: f64 = steps.iter().map(|s| s.0).sum();
    let seconds: f64 = steps.iter().map(|s| s.1).sum();
    json!({
        "label": label,
        "steps": steps.len(),
        "row_tokens_per_step_mean": tokens / steps.len() as f64,
        "s_per_step_median": crate::bench::median(steps.iter().map(|s| s.1).collect()),
        "row_tok_per_s": tokens / seconds,
        "peak_rss_mib": peak_rss_mib,
        "foreign_cpu_frac": foreign,
    })
}

/// `lscpu`'s model name and whether its flags include avx512f and avx2.
pub fn cpu_line(lscpu: &str) -> String {
    let field =
        |name: &str| lscpu.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')).map(str::trim));
    let flags: Vec<&str> = field("Flags").map_or(Vec::new(), |f| f.split_whitespace().collect());
    let has = |f: &str| if flags.contains(&f) { "yes" } else { "no" };
    format!(
        "CPU: {} (lscpu); avx512f: {}, avx2: {}",
        field("Model name").unwrap_or("unknown"),
        has("avx512f"),
        has("avx2")
    )
}

/// The peak RSS of a live process in MiB (`VmHWM`), if it can be read.
fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Busy jiffies of the whole machine (all but idle and iowait) and the number of CPUs.
fn machine_busy() -> Option<(u64, usize)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let vals: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
    let cpus = stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count();
    (vals.len() == 8).then(|| (vals.iter().sum::<u64>() - vals[3] - vals[4], cpus.max(1)))
}

/// User + system jiffies of a live process (all its threads).
fn process_jiffies(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Preference lines in `metrics.jsonl` so far.
fn preference_lines(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics).map_or(0, |s| s.lines().filter(|l| l.contains(r#""stage":"preference""#)).count())
}

/// Runs `cmd` (a `slime-trainer train` writing `run_dir/metrics.jsonl`) to its end, polling its
/// peak RSS and, over the timed steps, the other processes' CPU. Returns (peak RSS MiB, foreign
/// CPU fraction).
fn run_polled(cmd: &mut Command, run_dir: &Path, what: &str) -> Result<(f64, f64)> {
    let log = run_dir.join("train.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().with_context(|| format!("opening {}", log.display()))?;
    let mut child =
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)).spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id();
    let metrics = run_dir.join("metrics.jsonl");
    let (mut peak, mut start, mut end) = (0.0_f64, None, None);
    let status = loop {
        if let Some(mib) = vm_hwm_mib(pid) {
            peak = peak.max(mib);
        }
        if end.is_none() {
            let lines = preference_lines(&metrics);
            let sample = || Some((Instant::now(), machine_busy()?, process_jiffies(pid)?));
            if start.is_none() && lines >= WARMUP_STEPS {
                start = sample();
            }
            if start.is_some() && lines >= WARMUP_STEPS + TIMED_STEPS {
                end = sample();
            }
        }
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {what}"))? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{what} failed with {status} (log: {}):\n{}", log.display(), tail.join("\n"));
    }
    let foreign = match (start, end) {
        (Some((t0, (busy0, cpus), own0)), Some((t1, (busy1, _), own1))) => {
            let hz = 100.0; // USER_HZ, 100 on every Linux architecture this runs on
            let wall = (t1 - t0).as_secs_f64();
            let other = (busy1.saturating_sub(busy0) as f64 - own1.saturating_sub(own0) as f64).max(0.0) / hz;
            other / (wall * cpus as f64)
        }
        _ => f64::NAN,
    };
    Ok((peak, foreign))
}

/// What one of our runs needs.
pub struct Ours<'a> {
    /// The release `slime-trainer`.
    pub exe: &'a Path,
    /// The model directory.
    pub model: &'a Path,
    /// The Parquet file.
    pub data: &'a Path,
    /// Threads (`RAYON_NUM_THREADS`).
    pub threads: usize,
    /// Micro-batches of each step run at once.
    pub parallel: usize,
    /// Gradient checkpointing.
    pub gradient_checkpointing: bool,
    /// Where run directories go.
    pub work: &'a Path,
}

impl Ours<'_> {
    /// The precomputed reference log-probs of the preference split (`slime-trainer logps`,
    /// base model, the training run's encoding), computed once into the work directory.
    pub fn reference(&self) -> Result<PathBuf> {
        let out = self.work.join("reference_logps.parquet");
        if out.is_file() {
            return Ok(out);
        }
        std::fs::create_dir_all(self.work).with_context(|| format!("creating {}", self.work.display()))?;
        eprintln!("computing the reference log-probs of the preference split (untimed) into {}", out.display());
        let status = Command::new(self.exe)
            .arg("logps")
            .arg("--model")
            .arg(self.model)
            .arg("--data")
            .arg(self.data)
            .arg("--out")
            .arg(&out)
            .args(["--max-length", &MAX_LENGTH.to_string(), "--max-prompt-length", &(MAX_LENGTH - 1).to_string()])
            .args(["--overlong", "drop", "--split", "preference", "--batch-size", &PAIRS_PER_STEP.to_string()])
            .env("RAYON_NUM_THREADS", self.threads.to_string())
            .status()
            .context("running slime-trainer logps")?;
        if !status.success() {
            bail!("slime-trainer logps failed with {status}");
        }
        Ok(out)
    }

    /// One `slime-trainer train` run of `objective`; its summary.
    pub fn run(&self, objective: &str, rep: usize) -> Result<Value> {
        let reference = if objective == "dpo-precomputed" { Some(self.reference()?) } else { None };
        let config = train_config(
            objective,
            self.model,
            self.data,
            reference.as_deref(),
            self.parallel,
            self.gradient_checkpointing,
        )?;
        let run_dir = self.work.join(format!("{objective}-{rep}"));
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir).with_context(|| format!("removing {}", run_dir.display()))?;
        }
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let config_path = self.work.join(format!("{objective}.toml"));
        std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
        let mut cmd = Command::new(self.exe);
        cmd.arg("train").arg("--config").arg(&config_path).arg("--run-dir").arg(&run_dir).args(["--progress", "off"]);
        cmd.env("RAYON_NUM_THREADS", self.threads.to_string());
        let (peak, foreign) = run_polled(&mut cmd, &run_dir, &format!("slime-trainer train ({objective})"))?;
        let metrics = run_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?;
        let steps = timed_steps(&text).with_context(|| format!("in {}", metrics.display()))?;
        Ok(summarize(&format!("{objective}-slime-rs"), &steps, peak, foreign))
    }
}

/// The anchor's command for `objective` (run from its directory).
pub fn anchor_command(
    python: &Path,
    dir: &Path,
    model: &Path,
    data: &Path,
    objective: &str,
    threads: usize,
) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg("bench_peft.py").arg("--model").arg(model).arg("--data").arg(data);
    cmd.args(["--objective", objective, "--threads", &threads.to_string()]);
    cmd.args(["--pairs", &PAIRS_PER_STEP.to_string(), "--max-length", &MAX_LENGTH.to_string()]);
    cmd.args(["--warmup", &WARMUP_STEPS.to_string(), "--steps", &TIMED_STEPS.to_string()]);
    cmd.env("BENCH_THREADS", threads.to_string()).current_dir(dir);
    cmd
}

/// The ratio lines: ours over the anchor's row tokens/s and peak RSS per objective, from the
/// medians `(label, row tokens/s, peak RSS MiB)`.
pub fn ratio_lines(medians: &[(String, f64, f64)]) -> Vec<String> {
    let find = |label: &str| medians.iter().find(|m| m.0 == label);
    let mut lines = Vec::new();
    for objective in OBJECTIVES {
        let (Some(ours), Some(theirs)) =
            (find(&format!("{objective}-slime-rs")), find(&format!("{objective}-torch-peft")))
        else {
            continue;
        };
        let speed = ours.1 / theirs.1;
        let rss = ours.2 / theirs.2;
        let met = |ok: bool| if ok { "met" } else { "NOT met" };
        lines.push(format!(
            "{objective}: {speed:.2}x row tokens/s (target >= {SPEED_TARGET}x: {}), peak RSS {rss:.2}x (target <= {RSS_TARGET}x: {})",
            met(speed >= SPEED_TARGET),
            met(rss <= RSS_TARGET)
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(stage: &str, step: u64, tokens: f64, tps: f64) -> String {
        json!({"stage": stage, "step": step, "tokens": tokens, "tokens_per_second": tps, "loss": 0.5}).to_string()
    }

    #[test]
    fn config_has_the_anchor_settings_and_parses_as_toml() -> Result<()> {
        let text = train_config("simpo", Path::new("/m/smol \"x\""), Path::new("d.parquet"), None, 1, false)?;
        let v: toml::Table = toml::from_str(&text)?;
        let get = |a: &str, b: &str| v[a][b].clone();
        assert_eq!(get("model", "path").as_str(), Some("/m/smol \"x\""));
        assert_eq!(get("model", "lora")["r"].as_integer(), Some(64));
        assert_eq!(get("model", "lora")["alpha"].as_float(), Some(128.0));
        assert_eq!(get("data", "max_length").as_integer(), Some(512));
        assert_eq!(get("data", "overlong").as_str(), Some("drop"));
        assert_eq!(get("sft", "steps").as_integer(), Some(0));
        assert_eq!(get("preference", "steps").as_integer(), Some(10));
        assert_eq!(get("preference", "batch_size").as_integer(), Some(4));
        assert_eq!(get("preference", "max_grad_norm").as_float(), Some(1.0));
        assert_eq!(get("preference", "schedule")["lr"].as_float(), Some(1e-4));
        assert_eq!(get("preference", "schedule")["decay"].as_str(), Some("constant"));
        assert_eq!(get("preference", "objective")["beta"].as_float(), Some(2.0));
        assert!(v["preference"].get("reference_logps").is_none());
        assert_eq!(get("checkpoint", "every").as_integer(), Some(0));
        assert_eq!(get("eval", "generations").as_integer(), Some(0));

        let text =
            train_config("dpo-precomputed", Path::new("m"), Path::new("d"), Some(Path::new("r.parquet")), 2, true)?;
        let v: toml::Table = toml::from_str(&text)?;
        assert_eq!(v["preference"]["reference_logps"].as_str(), Some("r.parquet"));
        assert_eq!(v["preference"]["objective"]["type"].as_str(), Some("dpo"));
        assert_eq!(v["preference"]["batch_size"].as_integer(), Some(2));
        assert_eq!(v["preference"]["grad_accum"].as_integer(), Some(2));
        assert_eq!(v["model"]["gradient_checkpointing"].as_bool(), Some(true));

        assert!(train_config("dpo-precomputed", Path::new("m"), Path::new("d"), None, 1, false).is_err());
        assert!(train_config("simpo", Path::new("m"), Path::new("d"), None, 3, false).is_err());
        let err = train_config("dpo-live", Path::new("m"), Path::new("d"), None, 1, false).expect_err("dpo-live");
        assert!(format!("{err:#}").contains("--only"));
        Ok(())
    }

    #[test]
    fn timed_steps_skip_warmup_and_other_stages() -> Result<()> {
        let mut lines = vec![line("sft", 1, 999.0, 1.0)];
        for step in 1..=10 {
            lines.push(line("preference", step, 100.0 * step as f64, 50.0));
        }
        let steps = timed_steps(&lines.join("\n"))?;
        assert_eq!(steps.len(), 8);
        assert_eq!(steps[0], (300.0, 6.0));
        assert_eq!(steps[7], (1000.0, 20.0));
        let v = summarize("simpo-slime-rs", &steps, 1024.0, 0.01);
        // 5200 tokens in 104 s; step seconds 6, 8, ..., 20: median 13.
        assert_eq!(v["row_tok_per_s"].as_f64(), Some(50.0));
        assert_eq!(v["s_per_step_median"].as_f64(), Some(13.0));
        assert_eq!(v["row_tokens_per_step_mean"].as_f64(), Some(650.0));

        assert!(format!("{:#}", timed_steps(&lines[..5].join("\n")).expect_err("short")).contains("expected 8"));
        let bad = line("preference", 3, 100.0, 0.0);
        assert!(format!("{:#}", timed_steps(&bad).expect_err("zero")).contains("tokens_per_second"));
        assert!(timed_steps("{not json").is_err());
        Ok(())
    }

    #[test]
    fn ratios_against_the_targets() {
        let medians = vec![
            ("simpo-slime-rs".to_string(), 300.0, 1000.0),
            ("simpo-torch-peft".to_string(), 100.0, 4000.0),
            ("slime-slime-rs".to_string(), 150.0, 2000.0),
            ("slime-torch-peft".to_string(), 100.0, 4000.0),
            ("dpo-precomputed-slime-rs".to_string(), 150.0, 2000.0),
        ];
        let lines = ratio_lines(&medians);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0]
                .starts_with("simpo: 3.00x row tokens/s (target >= 3x: met), peak RSS 0.25x (target <= 0.25x: met)")
        );
        assert!(
            lines[1].contains("1.50x row tokens/s (target >= 3x: NOT met), peak RSS 0.50x (target <= 0.25x: NOT met)")
        );
    }

    #[test]
    fn cpu_line_reads_lscpu() {
        let text = "Architecture: x86_64\nModel name:   AMD EPYC 9R14\nFlags:  fpu sse avx2 fma avx512f avx512bw\n";
        assert_eq!(cpu_line(text), "CPU: AMD EPYC 9R14 (lscpu); avx512f: yes, avx2: yes");
        let text = "Model name: AMD EPYC 7R13 Processor\nFlags: fpu avx2 avx512_bf16x\n";
        assert_eq!(cpu_line(text), "CPU: AMD EPYC 7R13 Processor (lscpu); avx512f: no, avx2: yes");
        assert_eq!(cpu_line(""), "CPU: unknown (lscpu); avx512f: no, avx2: no");
    }
}
