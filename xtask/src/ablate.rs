//! `cargo xtask ablate`: the SLIME ablation grid against the baselines, on the embedded task
//! (tiny Llama or Gemma, no downloads) or on a pretrained model and a Parquet file (`--preset`,
//! `--model DIR --data FILE`).
//!
//! Each cell (variant x seed) runs as its own `slime-trainer train` process into
//! `<out>/<variant>-seed<k>/`; a cell whose `result.json` exists is skipped, and an unfinished
//! cell is run with `--resume`, so an interrupted grid continues each cell from its last
//! checkpoint (a cell whose settings changed starts afresh). Every seed's SFT model is trained
//! once (the `sft` cell, its `sft-model/`) and every preference variant of that seed starts
//! from it. At the end the report (table.md, table.csv, plots/) is written into `<out>`. The
//! variants and their objectives come from the grid file ([`crate::grid`]).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::grid::{Grid, SFT, Variant};
use crate::{report, trainer};

/// A named setup that `--preset` selects: a pretrained model (a path relative to the workspace
/// root, made by `cargo xtask assets`) and its data, the variants, seeds and step budget, and
/// the per-section TOML lines every cell shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// `--preset` name.
    pub name: &'static str,
    /// What it runs, in a line (listed by an unknown `--preset`).
    pub description: &'static str,
    /// Model directory.
    pub model: &'static str,
    /// The data.
    pub data: PresetData,
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

/// Where a preset's pairs come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PresetData {
    /// A preference Parquet file (relative to the workspace root), split by content hash.
    Parquet(&'static str),
    /// The verifiable task (`slime-trainer task verifiable`), generated into the results
    /// folder's `task/` before the first cell: its training pairs, and its held-out pairs whose
    /// greedy generations the task's checker grades.
    Verifiable(VerifiableTask),
}

/// The size and seed of a generated verifiable task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiableTask {
    /// Training pairs (a third SFT, two thirds preference).
    pub train: usize,
    /// Held-out prompts (and pairs).
    pub heldout: usize,
    /// Generator seed (the same for every seed of the grid: the seeds vary the training, not
    /// the task).
    pub seed: u64,
}

/// TOML lines added to each section of every cell's config.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sections {
    /// `[model]` lines.
    pub model: &'static str,
    /// `[data]` lines.
    pub data: &'static str,
    /// `[sft]` lines.
    pub sft: &'static str,
    /// `[preference]` lines.
    pub preference: &'static str,
    /// `[eval]` lines.
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

/// The verifiable task on a 2-core CPU: LoRA as in the SLIME paper (r 64, alpha 128, all seven
/// projections), also for SFT; pairs that do not fit 192 tokens are dropped, not cut (the
/// task's pairs are far shorter); 64 held-out pairs scored and their prompts generated greedily
/// (up to 32 new tokens: a one-line answer and its end-of-turn token fit well within; a batch
/// stops when all its prompts have), 32 prompts at a time (measured on SmolLM2 at 64 prompts:
/// 58 s of CPU time against 86 s at the default 8, and no faster at 64).
const CPU_VERIFIABLE: Sections = Sections {
    model: "lora = { r = 64, alpha = 128.0, sft = true }",
    data: "max_length = 192\nmax_prompt_length = 160\noverlong = \"drop\"\neval_pairs = 64",
    sft: "batch_size = 4\nschedule = { lr = 2e-4, decay = \"cosine\", warmup_ratio = 0.0 }",
    preference: "batch_size = 4\nschedule = { lr = 1e-4, decay = \"linear\", warmup_ratio = 0.0 }",
    eval: "generations = 64\nmax_new_tokens = 32\nbatch_size = 16\ngeneration_batch_size = 32",
};

/// [`CPU_VERIFIABLE`] with all 256 held-out prompts scored and generated.
const CPU_VERIFIABLE_FULL: Sections = Sections {
    data: "max_length = 192\nmax_prompt_length = 160\noverlong = \"drop\"\neval_pairs = 256",
    eval: "generations = 256\nmax_new_tokens = 32\nbatch_size = 16\ngeneration_batch_size = 32",
    ..CPU_VERIFIABLE
};

/// The verifiable task's default size: 2,400 training pairs, 256 held-out prompts, six skills.
const VERIFIABLE: VerifiableTask = VerifiableTask { train: 2400, heldout: 256, seed: 0 };

/// The SLIME paper's Table 4 (SLIME and its four ablations) with SFT, DPO and SimPO.
const TABLE4: [&str; 8] = [
    "sft",
    "slime",
    "slime-no-anchor",
    "slime-no-stabilizer",
    "slime-no-soft-margin",
    "slime-no-hard-margin",
    "dpo",
    "simpo",
];

/// The quick verifiable preset's rows: [`TABLE4`], the -p SFT objective against NLL and SAGE
/// selection against uniform for full SLIME (IPO, CPO and ORPO would add about a fifth each
/// to its time; they are in the full preset).
const VERIFIABLE_QUICK: [&str; 10] = [
    "sft",
    "sft-minus-p",
    "slime",
    "slime-no-anchor",
    "slime-no-stabilizer",
    "slime-no-soft-margin",
    "slime-no-hard-margin",
    "slime-sage",
    "dpo",
    "simpo",
];

/// [`VERIFIABLE_QUICK`], Table 5 (SLIME's exponent p in 1.0, 1.5, 2.0, 2.5, 3.0; p = 2.5 is
/// SLIME's default, so `slime` is that row), SLIME from the -p SFT model, IPO, CPO and ORPO.
const VERIFIABLE_FULL: [&str; 18] = [
    "sft",
    "sft-minus-p",
    "slime",
    "slime-no-anchor",
    "slime-no-stabilizer",
    "slime-no-soft-margin",
    "slime-no-hard-margin",
    "slime-p1.0",
    "slime-p1.5",
    "slime-p2.0",
    "slime-p3.0",
    "slime-sage",
    "slime-after-sft-minus-p",
    "dpo",
    "simpo",
    "ipo",
    "cpo",
    "orpo",
];

/// The real presets (`cargo xtask assets` provides their models and the Parquet files; the
/// verifiable task is generated).
pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "smollm2-verifiable-quick",
        description: "SmolLM2-135M-Instruct on the verifiable task: Table 4, -p SFT, SAGE, DPO and SimPO, one seed",
        model: "assets/models/smollm2-135m-instruct",
        data: PresetData::Verifiable(VERIFIABLE),
        only: &VERIFIABLE_QUICK,
        seeds: &[0],
        steps: 16,
        sft_steps: 24,
        sections: CPU_VERIFIABLE,
    },
    Preset {
        name: "smollm2-verifiable",
        description: "SmolLM2-135M-Instruct on the verifiable task: Tables 4 and 5, -p SFT, SAGE and every \
                      baseline, three seeds",
        model: "assets/models/smollm2-135m-instruct",
        data: PresetData::Verifiable(VERIFIABLE),
        only: &VERIFIABLE_FULL,
        seeds: &[0, 1, 2],
        steps: 200,
        sft_steps: 200,
        sections: CPU_VERIFIABLE_FULL,
    },
    Preset {
        name: "gemma3-270m-verifiable",
        description: "Gemma-3-270M, the base model (pretrained only, not instruction-tuned: SFT teaches it the chat \
                      format), on the verifiable task: Table 4 and the baselines, one seed",
        model: "assets/models/gemma-3-270m",
        data: PresetData::Verifiable(VERIFIABLE),
        only: &TABLE4,
        seeds: &[0],
        steps: 16,
        sft_steps: 24,
        sections: CPU_VERIFIABLE,
    },
    Preset {
        name: "smollm2-dpo-en",
        description: "SmolLM2-135M-Instruct on 300 real English preference pairs (a pipeline check)",
        model: "assets/models/smollm2-135m-instruct",
        data: PresetData::Parquet("assets/data/dpo_en_demo.parquet"),
        only: &["sft", "slime", "slime-no-stabilizer", "dpo", "simpo"],
        seeds: &[0],
        steps: 8,
        sft_steps: 8,
        sections: CPU_REAL,
    },
    Preset {
        name: "gemma3-270m-dpo-en",
        description: "Gemma-3-270M (the base model, not instruction-tuned) on 300 real English preference pairs (a \
                      pipeline check)",
        model: "assets/models/gemma-3-270m",
        data: PresetData::Parquet("assets/data/dpo_en_demo.parquet"),
        only: &["sft", "slime", "dpo", "simpo"],
        seeds: &[0],
        steps: 8,
        sft_steps: 8,
        sections: CPU_REAL,
    },
];

/// The built-in tiny models of the embedded task, all in the default grid.
pub const TINY_MODELS: [&str; 2] = ["tiny-llama", "tiny-gemma"];

/// Which model a grid trains.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    /// Built-in tiny models on the embedded task (`tiny-llama`, `tiny-gemma`), each with its
    /// own SFT cells.
    Tiny(Vec<String>),
    /// A pretrained model directory or `.gguf` file, with a Parquet file.
    Pretrained {
        /// The model directory or `.gguf` file.
        model: PathBuf,
        /// The preference Parquet file (with `task`: its `train.parquet`).
        data: PathBuf,
        /// Lines added to every cell's config sections.
        sections: Sections,
        /// The verifiable task generated into the results folder's `task/` (its held-out
        /// pairs and answers are every cell's held-out data).
        task: Option<VerifiableTask>,
    },
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
    PRESETS.iter().find(|p| p.name == name).with_context(|| {
        let known: Vec<String> = PRESETS.iter().map(|p| format!("\n  {}: {}", p.name, p.description)).collect();
        format!("--preset: unknown preset `{name}`; known:{}", known.concat())
    })
}

/// `cargo xtask ablate` flags; every one overrides the default grid's or the preset's value.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AblateArgs {
    /// Variants to run, comma-separated (default: the whole grid, xtask/grids/default.toml).
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    pub only: Option<Vec<String>>,
    /// Seeds, comma-separated (default 0,1,2).
    #[arg(long, value_name = "0,1,2", value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// Preference steps per cell (default 120).
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,
    /// SFT steps per seed (default 800).
    #[arg(long, value_name = "N")]
    pub sft_steps: Option<u64>,
    /// Results folder (default results/; with --preset, results/<preset>/).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// A built-in model of the embedded task (tiny-llama, tiny-gemma; default both), or a
    /// pretrained model directory or .gguf file, which needs --data.
    #[arg(long, value_name = "tiny-llama|tiny-gemma|DIR")]
    pub model: Option<String>,
    /// A preference Parquet file for a pretrained --model (the same CPU-sized settings as the
    /// presets).
    #[arg(long, value_name = "FILE.parquet")]
    pub data: Option<PathBuf>,
    /// A real model (LoRA), after `cargo xtask assets`: smollm2-verifiable-quick
    /// (SmolLM2-135M-Instruct on the verifiable task: Table 4, -p SFT, SAGE and the baselines,
    /// one seed, minutes), smollm2-verifiable (also Table 5, three seeds, hours),
    /// gemma3-270m-verifiable (Gemma-3-270M, the base model, not instruction-tuned: Table 4 and
    /// the baselines, one seed), or smollm2-dpo-en / gemma3-270m-dpo-en (the 300 real pairs).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Cells run at once (default: one per core for the tiny models, 1 for real ones).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// model.device of every cell: cpu, cuda or cuda:N (default: the trainer's, cpu).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
}

/// Parses `ablate`'s flags (as after `cargo xtask ablate`) into options.
pub fn parse<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I) -> Result<Options> {
    #[derive(Parser)]
    #[command(name = "cargo xtask ablate")]
    struct Flags {
        #[command(flatten)]
        args: AblateArgs,
    }
    let argv = std::iter::once(OsString::from("ablate")).chain(args.into_iter().map(Into::into));
    options(Flags::try_parse_from(argv)?.args, &Grid::default_grid()?)
}

/// Resolves the flags against the presets and checks them against `grid`.
pub fn options(args: AblateArgs, grid: &Grid) -> Result<Options> {
    let mut o = Options { device: args.device, ..Options::default() };
    if let Some(n) = args.jobs {
        if n == 0 {
            bail!("--jobs: at least 1");
        }
        o.jobs = Some(n);
    }
    let (model, data, preset_name) = (args.model, args.data, args.preset);
    if let Some(name) = &preset_name {
        let p = preset(name)?;
        o.only = Some(p.only.iter().map(|s| s.to_string()).collect());
        o.seeds = p.seeds.to_vec();
        o.steps = p.steps;
        o.sft_steps = p.sft_steps;
        o.out = PathBuf::from("results").join(p.name);
        let (data, task) = match p.data {
            PresetData::Parquet(file) => (PathBuf::from(file), None),
            PresetData::Verifiable(task) => (o.out.join(TASK_DIR).join("train.parquet"), Some(task)),
        };
        o.model = ModelChoice::Pretrained { model: p.model.into(), data, sections: p.sections, task };
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
            ModelChoice::Pretrained { model, data, task, .. } => {
                if task.is_some() {
                    bail!("--data {}: the preset generates its own data (the verifiable task)", d.display());
                }
                *data = d;
                if let Some(m) = model_arg {
                    *model = m.into();
                }
            }
            ModelChoice::Tiny(_) => match model_arg {
                Some(m) if !TINY_MODELS.contains(&m.as_str()) => {
                    o.model = ModelChoice::Pretrained { model: m.into(), data: d, sections: CPU_REAL, task: None };
                }
                _ => bail!("--data {}: Parquet data needs a pretrained --model (a model directory)", d.display()),
            },
        },
        (None, None) => {}
    }
    o.only = args.only.or(o.only);
    o.seeds = args.seeds.unwrap_or(o.seeds);
    o.steps = args.steps.unwrap_or(o.steps);
    o.sft_steps = args.sft_steps.unwrap_or(o.sft_steps);
    if let Some(out) = args.out {
        // A generated task lives in the results folder.
        if let ModelChoice::Pretrained { data, task: Some(_), .. } = &mut o.model {
            *data = out.join(TASK_DIR).join("train.parquet");
        }
        o.out = out;
    }
    if let Some(only) = &o.only {
        for v in only {
            if grid.get(v).is_none() {
                bail!("--only: unknown variant `{v}`; the grid has {}", grid.names().join(", "));
            }
        }
    }
    if o.seeds.is_empty() {
        bail!("--seeds: at least one seed");
    }
    Ok(o)
}

/// The run config of one cell of `tiny` (a tiny model's name; `None` for a pretrained model):
/// an SFT variant's SFT cell, or a preference variant's cell starting from `start`, the
/// directory of the seed's cell of the SFT variant it starts from. A preference cell takes that
/// SFT cell's model (`init`, its `sft-model/`) and its end evaluation as its own start
/// evaluation (`eval.start_from`; the trainer checks they are of the same model, held-out
/// pairs and settings). A variant's own `[sft]` / `[preference]` keys replace the preset's.
pub fn cell_config(tiny: Option<&str>, variant: &Variant, seed: u64, opts: &Options, start: Option<&Path>) -> String {
    let mut t = format!("name = \"{}\"\nseed = {seed}\n", variant.name);
    if !variant.is_sft()
        && opts.sft_steps > 0
        && let Some(dir) = start
    {
        t += &format!("init = {:?}\n", dir.join("sft-model").display().to_string());
    }
    let device = opts.device.as_ref().map_or_else(String::new, |d| format!("device = {d:?}\n"));
    let sections = match &opts.model {
        ModelChoice::Tiny(_) => {
            t += &format!("\n[model]\npreset = \"{}\"\n{device}", tiny.unwrap_or(TINY_MODELS[0]));
            Sections::default()
        }
        ModelChoice::Pretrained { model, data, sections, task } => {
            t += &format!("\n[model]\npath = {:?}\n{device}{}\n", model.display().to_string(), sections.model);
            t += &format!("\n[data]\nparquet = {:?}\n", data.display().to_string());
            if task.is_some() {
                let dir = data.parent().unwrap_or(Path::new("."));
                t += &format!("heldout = {:?}\n", dir.join("heldout.parquet").display().to_string());
                t += &format!("heldout_answers = {:?}\n", dir.join("heldout.jsonl").display().to_string());
            }
            t += &format!("{}\n", sections.data);
            *sections
        }
    };
    let line = |s: &str| if s.is_empty() { String::new() } else { format!("{s}\n") };
    let own = variant.stage_lines();
    if variant.is_sft() {
        t += &format!("\n[sft]\nsteps = {}\n{}", opts.sft_steps, merged(sections.sft, &own));
        t += "\n[preference]\nsteps = 0\n";
        t += &format!("\n[eval]\n{}", line(sections.eval));
    } else {
        if opts.sft_steps == 0 {
            // No SFT: the cell starts from the model itself, as its SFT cell did.
            t += "\n[sft]\nsteps = 0\n";
        }
        t += &format!(
            "\n[preference]\nsteps = {}\nobjective = {}\n{}",
            opts.steps,
            variant.objective_inline(),
            merged(sections.preference, &own)
        );
        // Tiny models: a curve of 4 evaluations; pretrained ones: the start and the end only.
        let every = match opts.model {
            ModelChoice::Tiny(_) => (opts.steps / 3).max(1),
            ModelChoice::Pretrained { .. } => opts.steps.max(1),
        };
        t += &format!("\n[eval]\nevery = {every}\n{}", line(sections.eval));
        if let Some(dir) = start {
            t += &format!("start_from = {:?}\n", dir.display().to_string());
        }
    }
    t
}

/// `base` (a preset's `key = value` lines of one section) without the keys `own` sets, then
/// `own`'s lines; each line ends with a newline.
fn merged(base: &str, own: &[(String, String)]) -> String {
    let key_of = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
    let kept = base.lines().filter(|l| !l.trim().is_empty() && !own.iter().any(|(k, _)| *k == key_of(l)));
    kept.map(String::from).chain(own.iter().map(|(_, l)| l.clone())).map(|l| l + "\n").collect()
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
        ModelChoice::Pretrained { model, data, sections, task } => {
            let hint = "(the presets' files come from `cargo xtask assets`)";
            let model = model.canonicalize().with_context(|| format!("model {} not found {hint}", model.display()))?;
            let data = data.canonicalize().with_context(|| format!("data {} not found {hint}", data.display()))?;
            Ok(ModelChoice::Pretrained { model, data, sections: *sections, task: *task })
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

/// The folder of the results folder that holds a generated verifiable task.
pub const TASK_DIR: &str = "task";

/// `slime-trainer task verifiable` into `dir` unless `dir/task.json` records the same seed and
/// sizes (the generator is deterministic, so the files are then the same).
fn ensure_task(trainer: &Path, dir: &Path, task: &VerifiableTask) -> Result<()> {
    let summary = dir.join("task.json");
    let same = std::fs::read_to_string(&summary)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| {
            v["seed"] == task.seed && v["train"] == task.train as u64 && v["heldout"] == task.heldout as u64
        });
    if same && ["train.parquet", "heldout.parquet", "heldout.jsonl"].iter().all(|f| dir.join(f).is_file()) {
        println!("verifiable task in {}: present", dir.display());
        return Ok(());
    }
    let status = Command::new(trainer)
        .args(["task", "verifiable", "--out"])
        .arg(dir)
        .args(["--seed", &task.seed.to_string(), "--train", &task.train.to_string()])
        .args(["--heldout", &task.heldout.to_string()])
        .status()
        .with_context(|| format!("starting {}", trainer.display()))?;
    if !status.success() {
        bail!("generating the verifiable task into {} failed ({status})", dir.display());
    }
    Ok(())
}

/// The grid's cells under `out`: the SFT cells (`sft` and every SFT variant selected or
/// started from, per model and seed), the preference cells (each starting from its seed's cell
/// of the SFT variant it names), and the names of the variants they run.
fn plan(grid: &Grid, opts: &Options, out: &Path) -> (Vec<CellJob>, Vec<CellJob>, BTreeSet<String>) {
    let selected: Vec<&Variant> =
        grid.variants.iter().filter(|v| opts.only.as_ref().is_none_or(|o| o.contains(&v.name))).collect();
    // Tiny models' cells are named `<model>-<variant>-seed<k>`; a pretrained model has its own
    // results folder, so its cells are `<variant>-seed<k>`.
    let models: Vec<Option<&str>> = match &opts.model {
        ModelChoice::Tiny(names) => names.iter().map(|n| Some(n.as_str())).collect(),
        ModelChoice::Pretrained { .. } => vec![None],
    };
    let default_grid = opts.only.is_none() && models.len() > 1;
    let (mut sft_cells, mut preference_cells) = (Vec::new(), Vec::new());
    let mut ran = BTreeSet::new();
    for tiny in models.iter().copied() {
        let runs =
            |v: &Variant| !(default_grid && tiny == Some("tiny-gemma")) || grid.tiny_gemma_default.contains(&v.name);
        let variants: Vec<&Variant> = selected.iter().copied().filter(|v| runs(v)).collect();
        // The SFT variants to train: `sft`, those selected, and those a selected variant starts
        // from, in grid order.
        let sft_variants: Vec<&Variant> = grid
            .variants
            .iter()
            .filter(|v| v.is_sft() && (v.name == SFT || variants.iter().any(|s| s.start() == v.name)))
            .collect();
        ran.extend(sft_variants.iter().chain(&variants).map(|v| v.name.clone()));
        for &seed in &opts.seeds {
            let prefix = tiny.map_or_else(String::new, |m| format!("{m}-"));
            let cell_dir = |name: &str| out.join(format!("{prefix}{name}-seed{seed}"));
            let job = |variant: &Variant| {
                let start = (!variant.is_sft()).then(|| cell_dir(variant.start()));
                CellJob {
                    label: format!("{prefix}{} seed {seed}", variant.name),
                    dir: cell_dir(&variant.name),
                    config: cell_config(tiny, variant, seed, opts, start.as_deref()),
                }
            };
            sft_cells.extend(sft_variants.iter().map(|v| job(v)));
            preference_cells.extend(variants.iter().filter(|v| !v.is_sft()).map(|v| job(v)));
        }
    }
    (sft_cells, preference_cells, ran)
}

/// Runs the grid's cells and writes the report.
pub fn ablate(opts: &Options) -> Result<()> {
    let grid = Grid::default_grid()?;
    let trainer = trainer::build(trainer::TRAINER)?;
    if let ModelChoice::Pretrained { data, task: Some(task), .. } = &opts.model {
        ensure_task(&trainer, data.parent().unwrap_or(Path::new(".")), task)?;
    }
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
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    let started = Instant::now();
    let (sft_cells, preference_cells, ran) = plan(&grid, opts, &out);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = opts.jobs.unwrap_or(match opts.model {
        ModelChoice::Tiny(_) => cores,
        ModelChoice::Pretrained { .. } => 1,
    });
    let threads = (cores / workers).max(1);
    // The SFT cells first: every other cell of their model and seed starts from one of them.
    let failed_sft = run_cells(&sft_cells, workers, &trainer, threads, started)?;
    if !failed_sft.is_empty() {
        bail!("SFT cells failed: {}", failed_sft.join(", "));
    }
    let failures = run_cells(&preference_cells, workers, &trainer, threads, started)?;
    let cells: Vec<report::Cell> = report::read_cells(&out)?
        .into_iter()
        .filter(|c| ran.contains(&c.result.variant) && opts.seeds.contains(&c.result.seed))
        .collect();
    for path in report::write_report(&cells, &grid.layout(), &out)? {
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

    fn args(s: &str) -> Result<Options> {
        parse(s.split_whitespace())
    }

    #[test]
    fn options_parse_and_reject_unknowns() -> Result<()> {
        let o = args("--only slime,dpo --seeds 3,4 --steps 10 --sft-steps 20 --out x")?;
        assert_eq!(o.only, Some(vec!["slime".to_string(), "dpo".to_string()]));
        assert_eq!((o.seeds, o.steps, o.sft_steps, o.out), (vec![3, 4], 10, 20, PathBuf::from("x")));
        for (bad, needle) in [
            ("--only kto", "kto"),
            ("--seeds a", "--seeds"),
            ("--steps", "--steps"),
            ("--model smollm2", "--data"),
            ("--data d.parquet", "pretrained"),
            ("--preset gpt5", "gpt5"),
            ("--jobs 0", "--jobs"),
            ("--preset smollm2-dpo-en --model tiny-gemma", "--preset"),
            ("--stpes 3", "--stpes"),
        ] {
            let err = format!("{:#}", args(bad).err().with_context(|| format!("`{bad}` should be refused"))?);
            assert!(err.contains(needle), "`{bad}`: `{err}` should mention `{needle}`");
        }
        assert_eq!(args("--jobs 3")?.jobs, Some(3));
        assert_eq!(args("--model tiny-gemma")?.model, ModelChoice::Tiny(vec!["tiny-gemma".into()]));
        assert_eq!(Options::default().model, ModelChoice::Tiny(vec!["tiny-llama".into(), "tiny-gemma".into()]));
        assert_eq!(args("")?.seeds, vec![0, 1, 2]);
        let p = args("--preset smollm2-dpo-en --steps 3")?;
        assert_eq!((p.steps, p.sft_steps, p.seeds), (3, 8, vec![0]), "flags override the preset");
        assert_eq!(p.out, PathBuf::from("results/smollm2-dpo-en"));
        assert!(p.only.as_ref().is_some_and(|o| o.contains(&"slime".to_string())));
        let ModelChoice::Pretrained { model, data, .. } = &p.model else { bail!("expected a pretrained model") };
        let dpo_en = preset("smollm2-dpo-en")?;
        assert_eq!(
            (model.as_path(), data.as_path()),
            (Path::new(dpo_en.model), Path::new("assets/data/dpo_en_demo.parquet"))
        );
        let custom = args("--model m --data d.parquet")?;
        assert!(matches!(custom.model, ModelChoice::Pretrained { .. }));
        assert_eq!(args("--device cuda:1")?.device.as_deref(), Some("cuda:1"));
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
    fn verifiable_presets_generate_their_task_in_the_results_folder() -> Result<()> {
        let quick = args("--preset smollm2-verifiable-quick")?;
        assert_eq!(quick.out, PathBuf::from("results/smollm2-verifiable-quick"));
        assert_eq!(quick.seeds, vec![0]);
        let ModelChoice::Pretrained { data, task, .. } = &quick.model else { bail!("expected a pretrained model") };
        assert_eq!(data, &PathBuf::from("results/smollm2-verifiable-quick/task/train.parquet"));
        assert_eq!(task.map(|t| (t.train, t.heldout)), Some((2400, 256)));
        let moved = args("--preset smollm2-verifiable-quick --out elsewhere")?;
        let ModelChoice::Pretrained { data, .. } = &moved.model else { bail!("expected a pretrained model") };
        assert_eq!(data, &PathBuf::from("elsewhere/task/train.parquet"), "the task follows --out");
        let refused = args("--preset smollm2-verifiable-quick --data x.parquet").err();
        let err = format!("{:#}", refused.context("--data with a verifiable preset should be refused")?);
        assert!(err.contains("verifiable task"), "{err}");
        let grid = Grid::default_grid()?;
        let variant = |name: &str| grid.get(name).with_context(|| format!("{name} in the grid"));
        let config = cell_config(None, variant("dpo")?, 1, &quick, Some(Path::new("/r/sft-seed1")));
        for line in [
            "init = \"/r/sft-seed1/sft-model\"",
            "start_from = \"/r/sft-seed1\"",
            "parquet = \"results/smollm2-verifiable-quick/task/train.parquet\"",
            "heldout = \"results/smollm2-verifiable-quick/task/heldout.parquet\"",
            "heldout_answers = \"results/smollm2-verifiable-quick/task/heldout.jsonl\"",
            "overlong = \"drop\"",
            "lora = { r = 64, alpha = 128.0, sft = true }",
            "objective = { type = \"dpo\" }",
            "seed = 1",
        ] {
            assert!(config.contains(line), "{line} in\n{config}");
        }
        let full = args("--preset smollm2-verifiable")?;
        assert!(full.seeds.len() >= 3, "the full preset has at least three seeds");
        let only = full.only.unwrap_or_default();
        for v in ["slime-no-anchor", "slime-no-stabilizer", "slime-no-soft-margin", "slime-no-hard-margin", "dpo"] {
            assert!(only.iter().any(|o| o == v), "{v}");
        }
        for p in ["slime-p1.0", "slime-p1.5", "slime-p2.0", "slime-p3.0", "slime", "sft", "simpo"] {
            assert!(only.iter().any(|o| o == p), "{p}");
        }
        Ok(())
    }

    #[test]
    fn variant_options_replace_the_presets_and_sft_variants_are_sft_cells() -> Result<()> {
        let quick = args("--preset smollm2-verifiable-quick")?;
        let grid = Grid::default_grid()?;
        let variant = |name: &str| grid.get(name).with_context(|| format!("{name} in the grid"));
        let sage = cell_config(None, variant("slime-sage")?, 0, &quick, Some(Path::new("/r/sft-seed0")));
        assert!(sage.contains("\nselection = \"sage\"\n") && sage.contains("batch_size = 4\n"), "{sage}");
        let minus_p = cell_config(None, variant("sft-minus-p")?, 0, &quick, None);
        assert!(minus_p.contains("objective = { type = \"sft\", alpha = 1.0 }\n"), "{minus_p}");
        assert!(minus_p.contains("[preference]\nsteps = 0\n") && !minus_p.contains("init ="), "{minus_p}");
        assert!(!minus_p.contains("start_from"), "an SFT cell evaluates its own model: {minus_p}");
        let after =
            cell_config(None, variant("slime-after-sft-minus-p")?, 0, &quick, Some(Path::new("/r/sft-minus-p-seed0")));
        assert!(after.contains("init = \"/r/sft-minus-p-seed0/sft-model\""), "{after}");
        // A variant's key replaces the preset's line of the same key.
        let own = [("batch_size".to_string(), "batch_size = 8".to_string())];
        assert_eq!(
            merged("batch_size = 4\nschedule = { lr = 1.0 }", &own),
            "schedule = { lr = 1.0 }\nbatch_size = 8\n"
        );
        // No SFT steps: every cell starts from the model itself, the preference cells too.
        let no_sft = args("--preset smollm2-verifiable-quick --sft-steps 0")?;
        let dpo = cell_config(None, variant("dpo")?, 0, &no_sft, Some(Path::new("/r/sft-seed0")));
        assert!(!dpo.contains("init =") && dpo.contains("[sft]\nsteps = 0\n") && dpo.contains("start_from"), "{dpo}");
        Ok(())
    }

    #[test]
    fn a_variant_starting_from_another_sft_variant_gets_that_sft_cell() -> Result<()> {
        let grid = Grid::default_grid()?;
        let opts = args("--only slime-after-sft-minus-p,dpo --seeds 0,1 --model tiny-llama")?;
        let (sft, preference, ran) = plan(&grid, &opts, Path::new("/r"));
        let dirs = |jobs: &[CellJob]| jobs.iter().map(|j| j.dir.display().to_string()).collect::<Vec<_>>();
        assert_eq!(
            dirs(&sft),
            [
                "/r/tiny-llama-sft-seed0",
                "/r/tiny-llama-sft-minus-p-seed0",
                "/r/tiny-llama-sft-seed1",
                "/r/tiny-llama-sft-minus-p-seed1"
            ]
        );
        assert_eq!(dirs(&preference).len(), 4);
        let after =
            preference.iter().find(|j| j.label == "tiny-llama-slime-after-sft-minus-p seed 1").context("cell")?;
        assert!(after.config.contains("init = \"/r/tiny-llama-sft-minus-p-seed1/sft-model\""), "{}", after.config);
        assert!(after.config.contains("start_from = \"/r/tiny-llama-sft-minus-p-seed1\""), "{}", after.config);
        let dpo = preference.iter().find(|j| j.label == "tiny-llama-dpo seed 0").context("cell")?;
        assert!(dpo.config.contains("start_from = \"/r/tiny-llama-sft-seed0\""), "{}", dpo.config);
        assert_eq!(ran.into_iter().collect::<Vec<_>>(), ["dpo", "sft", "sft-minus-p", "slime-after-sft-minus-p"]);
        // Only `sft`: no other SFT cell.
        let (sft, _, _) = plan(&grid, &args("--only slime --seeds 0 --model tiny-llama")?, Path::new("/r"));
        assert_eq!(dirs(&sft), ["/r/tiny-llama-sft-seed0"]);
        Ok(())
    }

    #[test]
    fn preset_variants_are_grid_variants() -> Result<()> {
        let grid = Grid::default_grid()?;
        for p in PRESETS {
            for v in p.only {
                assert!(grid.get(v).is_some(), "{}: {v}", p.name);
            }
        }
        Ok(())
    }
}
