//! `cargo xtask ablate`: the SLIME ablation grid against the baselines, on the embedded task
//! (tiny Llama or Gemma, no downloads) or on a pretrained model and a Parquet file (`--preset`,
//! `--model DIR --data FILE`).
//!
//! Each cell (variant x seed) runs as its own `slime-trainer train` process into
//! `<out>/<variant>-seed<k>/`; a cell whose `result.json` exists is skipped, and an unfinished
//! cell is run with `--resume`, so an interrupted grid continues each cell from its last
//! checkpoint (a cell whose settings changed starts afresh). Every seed's SFT model is trained
//! once (the `sft` cell, its `sft-model/`) and every preference variant of that seed starts
//! from it. At the end the report (table.md, table.csv, plots/) is written into `<out>`.

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

/// A named setup that `--preset` selects: a pretrained model and a Parquet file (paths
/// relative to the workspace root, made by `cargo xtask assets`), the variants, seeds and step
/// budget, and the per-section TOML lines every cell shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// `--preset` name.
    pub name: &'static str,
    /// Model directory.
    pub model: &'static str,
    /// Parquet preference file.
    pub data: &'static str,
    /// Variants run by default.
    pub only: &'static [&'static str],
    /// Seeds run by default.
    pub seeds: &'static [u64],
    /// Preference steps per cell.
    pub steps: u64,
    /// SFT steps per seed.
    pub sft_steps: u64,
    /// Lines of `[model]`, `[data]`, `[sft]`, `[preference]`, `[eval]`.
    pub sections: Sections,
}

/// TOML lines added to each section of every cell's config.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sections {
    pub model: &'static str,
    pub data: &'static str,
    pub sft: &'static str,
    pub preference: &'static str,
    pub eval: &'static str,
}

/// LoRA as in the SLIME paper (r 64, alpha 128, all seven projections), also for SFT, and
/// sizes a 2-core CPU gets through in minutes: sequences cut to 160 tokens (prompts to 64),
/// 4 sequences per step, 8 held-out pairs, 2 greedy generations of up to 96 tokens.
const CPU_REAL: Sections = Sections {
    model: "lora = { r = 64, alpha = 128.0, sft = true }",
    data: "max_length = 160\nmax_prompt_length = 64\neval_pairs = 8",
    sft: "batch_size = 4\nschedule = { lr = 2e-4, decay = \"cosine\", warmup_ratio = 0.0 }",
    preference: "batch_size = 2\nschedule = { lr = 1e-4, decay = \"linear\", warmup_ratio = 0.0 }",
    eval: "generations = 2\nmax_new_tokens = 96\nbatch_size = 4",
};

/// The real presets (`cargo xtask assets` provides their files).
pub const PRESETS: [Preset; 2] = [
    Preset {
        name: "smollm2-dpo-en",
        model: "assets/models/smollm2-135m-instruct",
        data: "assets/data/dpo_en_demo.parquet",
        only: &["sft", "slime", "slime-no-stabilizer", "dpo", "simpo"],
        seeds: &[0],
        steps: 8,
        sft_steps: 8,
        sections: CPU_REAL,
    },
    Preset {
        name: "gemma3-270m-dpo-en",
        model: "assets/models/gemma-3-270m",
        data: "assets/data/dpo_en_demo.parquet",
        only: &["sft", "slime", "dpo", "simpo"],
        seeds: &[0],
        steps: 8,
        sft_steps: 8,
        sections: CPU_REAL,
    },
];

/// The built-in tiny models of the embedded task, all in the default grid.
pub const TINY_MODELS: [&str; 2] = ["tiny-llama", "tiny-gemma"];

/// What the default grid (no `--only`, both tiny models) runs on the tiny Gemma: SFT, SLIME, its
/// four ablations, DPO and SimPO, the paper's main comparison. Its layers run candle's composed
/// ops (about 3x the fused Llama's time), so the whole grid on it too would not fit in 15
/// minutes on 2 cores; `--model tiny-gemma` runs the whole grid on it.
pub const TINY_GEMMA_DEFAULT: [&str; 8] = [
    "sft",
    "slime",
    "slime-no-anchor",
    "slime-no-stabilizer",
    "slime-no-hard-margin",
    "slime-no-soft-margin",
    "dpo",
    "simpo",
];

/// Which model a grid trains.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    /// Built-in tiny models on the embedded task (`tiny-llama`, `tiny-gemma`), each with its
    /// own SFT cells.
    Tiny(Vec<String>),
    /// A pretrained model directory or `.gguf` file, with a Parquet file.
    Pretrained { model: PathBuf, data: PathBuf, sections: Sections },
}

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
    /// The model (and data).
    pub model: ModelChoice,
    /// Cells run at once (each with `RAYON_NUM_THREADS` = cores / jobs); default: one per core
    /// for tiny models, whose small matrices use one core better than two, and 1 otherwise.
    pub jobs: Option<usize>,
    /// `model.device` of every cell (`cuda`, `cuda:N`; default the trainer's, `cpu`).
    pub device: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            only: None,
            seeds: vec![0, 1, 2],
            steps: 120,
            sft_steps: 800,
            out: PathBuf::from("results"),
            model: ModelChoice::Tiny(TINY_MODELS.map(String::from).to_vec()),
            jobs: None,
            device: None,
        }
    }
}

/// The preset named `name`.
pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("--preset: unknown preset `{name}`; known: {}", PRESETS.map(|p| p.name).join(", ")))
}

pub fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    let (mut only, mut seeds, mut steps, mut sft_steps, mut out) = (None, None, None, None, None);
    let (mut model, mut data, mut preset_name) = (None::<String>, None::<PathBuf>, None::<String>);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--only" => only = Some(value()?.split(',').map(str::to_owned).collect::<Vec<_>>()),
            "--seeds" => {
                seeds = Some(
                    value()?
                        .split(',')
                        .map(|s| s.parse().with_context(|| format!("--seeds: `{s}` is not a number")))
                        .collect::<Result<Vec<u64>>>()?,
                )
            }
            "--steps" => steps = Some(value()?.parse().context("--steps: expected a number")?),
            "--sft-steps" => sft_steps = Some(value()?.parse().context("--sft-steps: expected a number")?),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--model" => model = Some(value()?.clone()),
            "--data" => data = Some(PathBuf::from(value()?)),
            "--preset" => preset_name = Some(value()?.clone()),
            "--device" => o.device = Some(value()?.clone()),
            "--jobs" => {
                let n: usize = value()?.parse().context("--jobs: expected a number")?;
                if n == 0 {
                    bail!("--jobs: at least 1");
                }
                o.jobs = Some(n);
            }
            other => bail!("unknown option `{other}` (see `cargo xtask help`)"),
        }
    }
    if let Some(name) = &preset_name {
        let p = preset(name)?;
        o.only = Some(p.only.iter().map(|s| s.to_string()).collect());
        o.seeds = p.seeds.to_vec();
        o.steps = p.steps;
        o.sft_steps = p.sft_steps;
        o.out = PathBuf::from("results").join(p.name);
        o.model = ModelChoice::Pretrained { model: p.model.into(), data: p.data.into(), sections: p.sections };
    }
    match (model, data) {
        (Some(m), None) if TINY_MODELS.contains(&m.as_str()) => {
            if preset_name.is_some() {
                bail!("--model {m} is a built-in model of the embedded task; it does not go with --preset");
            }
            o.model = ModelChoice::Tiny(vec![m]);
        }
        (Some(m), None) => match &mut o.model {
            ModelChoice::Pretrained { model, .. } => *model = m.into(),
            ModelChoice::Tiny(_) => bail!(
                "--model {m}: a pretrained model also needs --data (a preference Parquet file); the built-in \
                 models are tiny-llama and tiny-gemma"
            ),
        },
        (model_arg, Some(d)) => match &mut o.model {
            ModelChoice::Pretrained { model, data, .. } => {
                *data = d;
                if let Some(m) = model_arg {
                    *model = m.into();
                }
            }
            ModelChoice::Tiny(_) => match model_arg {
                Some(m) if !TINY_MODELS.contains(&m.as_str()) => {
                    o.model = ModelChoice::Pretrained { model: m.into(), data: d, sections: CPU_REAL };
                }
                _ => bail!("--data {}: Parquet data needs a pretrained --model (a model directory)", d.display()),
            },
        },
        (None, None) => {}
    }
    o.only = only.or(o.only);
    o.seeds = seeds.unwrap_or(o.seeds);
    o.steps = steps.unwrap_or(o.steps);
    o.sft_steps = sft_steps.unwrap_or(o.sft_steps);
    o.out = out.unwrap_or(o.out);
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
/// The run config of one cell of `tiny` (a tiny model's name; `None` for a pretrained model):
/// SFT (`variant == "sft"`) or a preference variant starting from the seed's SFT model.
fn cell_config(
    tiny: Option<&str>,
    variant: &str,
    objective: &str,
    seed: u64,
    opts: &Options,
    sft_model: Option<&Path>,
) -> String {
    let mut t = format!("name = \"{variant}\"\nseed = {seed}\n");
    if variant != "sft"
        && let Some(dir) = sft_model
    {
        t += &format!("init = {:?}\n", dir.display().to_string());
    }
    let device = opts.device.as_ref().map_or_else(String::new, |d| format!("device = {d:?}\n"));
    let sections = match &opts.model {
        ModelChoice::Tiny(_) => {
            t += &format!("\n[model]\npreset = \"{}\"\n{device}", tiny.unwrap_or(TINY_MODELS[0]));
            Sections::default()
        }
        ModelChoice::Pretrained { model, data, sections } => {
            t += &format!("\n[model]\npath = {:?}\n{device}{}\n", model.display().to_string(), sections.model);
            t += &format!("\n[data]\nparquet = {:?}\n{}\n", data.display().to_string(), sections.data);
            *sections
        }
    };
    let line = |s: &str| if s.is_empty() { String::new() } else { format!("{s}\n") };
    if variant == "sft" {
        t += &format!("\n[sft]\nsteps = {}\n{}", opts.sft_steps, line(sections.sft));
        t += "\n[preference]\nsteps = 0\n";
        t += &format!("\n[eval]\n{}", line(sections.eval));
    } else {
        t += &format!("\n[preference]\nsteps = {}\nobjective = {objective}\n{}", opts.steps, line(sections.preference));
        // Tiny models: a curve of 4 evaluations; pretrained ones: the start and the end only.
        let every = match opts.model {
            ModelChoice::Tiny(_) => (opts.steps / 3).max(1),
            ModelChoice::Pretrained { .. } => opts.steps.max(1),
        };
        t += &format!("\n[eval]\nevery = {every}\n{}", line(sections.eval));
    }
    t
}

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
/// `opts` with the pretrained model's and data's paths made absolute (each cell's config names
/// them), or an error saying how to get them.
fn resolve_paths(opts: &Options) -> Result<ModelChoice> {
    match &opts.model {
        ModelChoice::Tiny(names) => Ok(ModelChoice::Tiny(names.clone())),
        ModelChoice::Pretrained { model, data, sections } => {
            let hint = "(the presets' files come from `cargo xtask assets`)";
            let model = model.canonicalize().with_context(|| format!("model {} not found {hint}", model.display()))?;
            let data = data.canonicalize().with_context(|| format!("data {} not found {hint}", data.display()))?;
            Ok(ModelChoice::Pretrained { model, data, sections: *sections })
        }
    }
}

/// One cell to run.
struct CellJob {
    /// `"<prefix><variant> seed <k>"`, for the log lines.
    label: String,
    /// The cell's directory.
    dir: PathBuf,
    /// Its run config.
    config: String,
}

/// How a cell ended.
enum CellOutcome {
    Skipped,
    Finished,
    Failed(String),
}

/// Runs one cell: skipped when finished earlier, resumed when interrupted with the same
/// settings, started afresh otherwise.
fn run_cell(job: &CellJob, trainer: &Path, threads: usize, started: Instant) -> Result<CellOutcome> {
    let elapsed = || started.elapsed().as_secs_f64();
    if job.dir.join("result.json").is_file() {
        println!("[{:>6.1}s] {}: done earlier, skipped", elapsed(), job.label);
        return Ok(CellOutcome::Skipped);
    }
    std::fs::create_dir_all(&job.dir)?;
    let config = job.dir.join("run.toml");
    let resume = resumable(&config, &job.config);
    if !resume {
        println!("[{:>6.1}s] {}: settings changed since the interrupted run; starting it afresh", elapsed(), job.label);
    }
    std::fs::write(&config, &job.config)?;
    let cell_start = Instant::now();
    let output = Command::new(trainer)
        .args(train_args(&config, &job.dir, resume))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("starting {}", trainer.display()))?;
    std::fs::write(job.dir.join("stdout.log"), &output.stdout)?;
    std::fs::write(job.dir.join("stderr.log"), &output.stderr)?;
    if output.status.success() {
        println!("[{:>6.1}s] {}: finished in {:.1}s", elapsed(), job.label, cell_start.elapsed().as_secs_f64());
        Ok(CellOutcome::Finished)
    } else {
        let err = String::from_utf8_lossy(&output.stderr);
        println!("[{:>6.1}s] {}: FAILED\n{err}", elapsed(), job.label);
        Ok(CellOutcome::Failed(job.dir.join("stderr.log").display().to_string()))
    }
}

/// Runs `jobs` with `workers` cells at once; returns the failed cells' labels and logs.
fn run_cells(
    jobs: &[CellJob],
    workers: usize,
    trainer: &Path,
    threads: usize,
    started: Instant,
) -> Result<Vec<String>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(job) = jobs.get(i) else { return Ok(()) };
                        if let CellOutcome::Failed(log) = run_cell(job, trainer, threads, started)? {
                            failures
                                .lock()
                                .map_err(|_| anyhow::anyhow!("a cell worker panicked"))?
                                .push(format!("{} (see {log})", job.label));
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a cell worker panicked"))??;
        }
        Ok(())
    })?;
    failures.into_inner().map_err(|_| anyhow::anyhow!("a cell worker panicked"))
}

pub fn ablate(opts: &Options) -> Result<()> {
    let resolved = Options {
        only: opts.only.clone(),
        seeds: opts.seeds.clone(),
        steps: opts.steps,
        sft_steps: opts.sft_steps,
        out: opts.out.clone(),
        model: resolve_paths(opts)?,
        jobs: opts.jobs,
        device: opts.device.clone(),
    };
    let opts = &resolved;
    let trainer = build_trainer()?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    let variants: Vec<(&str, &str)> =
        GRID.iter().copied().filter(|(v, _)| opts.only.as_ref().is_none_or(|o| o.iter().any(|x| x == v))).collect();
    let started = Instant::now();
    // Tiny models' cells are named `<model>-<variant>-seed<k>`; a pretrained model has its own
    // results folder, so its cells are `<variant>-seed<k>`.
    let models: Vec<Option<&str>> = match &opts.model {
        ModelChoice::Tiny(names) => names.iter().map(|n| Some(n.as_str())).collect(),
        ModelChoice::Pretrained { .. } => vec![None],
    };
    let default_grid = opts.only.is_none() && models.len() > 1;
    let (mut sft_cells, mut preference_cells) = (Vec::new(), Vec::new());
    for tiny in models.iter().copied() {
        let runs = |v: &str| !(default_grid && tiny == Some("tiny-gemma")) || TINY_GEMMA_DEFAULT.contains(&v);
        for &seed in &opts.seeds {
            let prefix = tiny.map_or_else(String::new, |m| format!("{m}-"));
            // Every variant starts from the seed's SFT model (`sft-model/` of the SFT cell);
            // with no SFT steps, from the starting model itself.
            let sft_model = (opts.sft_steps > 0).then(|| out.join(format!("{prefix}sft-seed{seed}")).join("sft-model"));
            let job = |variant: &str, objective: &str| CellJob {
                label: format!("{prefix}{variant} seed {seed}"),
                dir: out.join(format!("{prefix}{variant}-seed{seed}")),
                config: cell_config(tiny, variant, objective, seed, opts, sft_model.as_deref()),
            };
            sft_cells.push(job("sft", ""));
            preference_cells.extend(variants.iter().filter(|(v, _)| *v != "sft" && runs(v)).map(|(v, o)| job(v, o)));
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = opts.jobs.unwrap_or(match opts.model {
        ModelChoice::Tiny(_) => cores,
        ModelChoice::Pretrained { .. } => 1,
    });
    let threads = (cores / workers).max(1);
    // The SFT cells first: every other cell of their model and seed starts from them.
    let failed_sft = run_cells(&sft_cells, workers, &trainer, threads, started)?;
    if !failed_sft.is_empty() {
        bail!("SFT cells failed: {}", failed_sft.join(", "));
    }
    let failures = run_cells(&preference_cells, workers, &trainer, threads, started)?;
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
        assert!(parse(&args("--model smollm2")).is_err(), "a pretrained model needs --data");
        assert!(parse(&args("--data d.parquet")).is_err(), "data needs a pretrained model");
        assert!(parse(&args("--preset gpt5")).is_err());
        assert!(parse(&args("--jobs 0")).is_err());
        assert_eq!(parse(&args("--jobs 3"))?.jobs, Some(3));
        assert!(parse(&args("--preset smollm2-dpo-en --model tiny-gemma")).is_err());
        assert_eq!(parse(&args("--model tiny-gemma"))?.model, ModelChoice::Tiny(vec!["tiny-gemma".into()]));
        assert_eq!(Options::default().model, ModelChoice::Tiny(vec!["tiny-llama".into(), "tiny-gemma".into()]));
        let p = parse(&args("--preset smollm2-dpo-en --steps 3"))?;
        assert_eq!((p.steps, p.sft_steps, p.seeds), (3, 8, vec![0]), "flags override the preset");
        assert_eq!(p.out, PathBuf::from("results/smollm2-dpo-en"));
        assert!(p.only.as_ref().is_some_and(|o| o.contains(&"slime".to_string())));
        let ModelChoice::Pretrained { model, data, .. } = &p.model else { bail!("expected a pretrained model") };
        assert_eq!((model.as_path(), data.as_path()), (Path::new(PRESETS[0].model), Path::new(PRESETS[0].data)));
        let custom = parse(&args("--model m --data d.parquet"))?;
        assert!(matches!(custom.model, ModelChoice::Pretrained { .. }));
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
    fn the_tiny_gemma_default_variants_are_grid_variants() {
        for v in TINY_GEMMA_DEFAULT {
            assert!(GRID.iter().any(|(name, _)| *name == v), "{v}");
        }
    }

    #[test]
    fn cell_configs_are_valid_run_configs() -> Result<()> {
        // Every grid cell, for the embedded task and for every preset, is a config the trainer
        // accepts (parsed and validated by the trainer's own code).
        let mut setups = vec![Options::default(), parse(&args("--model tiny-gemma"))?];
        for p in PRESETS {
            setups.push(parse(&args(&format!("--preset {}", p.name)))?);
        }
        setups.push(parse(&args("--preset smollm2-dpo-en --device cuda:1 --steps 200"))?);
        for opts in &setups {
            for (variant, objective) in GRID {
                let tiny = match &opts.model {
                    ModelChoice::Tiny(names) => names.last().map(String::as_str),
                    ModelChoice::Pretrained { .. } => None,
                };
                let text = cell_config(tiny, variant, objective, 1, opts, Some(Path::new("/tmp/sft/sft-model")));
                let cfg = slime_trainer::config::RunConfig::from_toml(&text)
                    .with_context(|| format!("{variant}:\n{text}"))?;
                assert_eq!(cfg.name, variant);
                assert_eq!(cfg.init.is_some(), variant != "sft");
                if let Some(name) = tiny {
                    assert_eq!(cfg.model.preset, name);
                }
                assert_eq!(cfg.model.device, opts.device.as_deref().unwrap_or("cpu"));
                if let ModelChoice::Pretrained { .. } = opts.model {
                    assert!(cfg.model.lora.as_ref().is_some_and(|l| l.sft), "{text}");
                    if variant != "sft" {
                        assert_eq!(cfg.eval.every, opts.steps);
                    }
                }
            }
        }
        Ok(())
    }
}
