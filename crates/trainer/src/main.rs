//! `slime-trainer`: the command-line interface of the training loop.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use slime_data::{BuiltinTemplate, HashSplit, InvalidRows, Overlong, SplitPart, Truncation, TruncationMode};
use slime_trainer::TrainError;
use slime_trainer::config::RunConfig;
use slime_trainer::generate::{GenerateOptions, generate_all, read_prompts};
use slime_trainer::logps::{LogpsOptions, per_token_path, score_file};
use slime_trainer::model_source::{ModelSource, parse_device};
use slime_trainer::paths::expect_file;
use slime_trainer::progress::ProgressMode;
use slime_trainer::run::{Fault, RunOptions};
use slime_trainer::selection::SelectionKind;

#[derive(Parser)]
#[command(name = "slime-trainer", version, about = "SFT then preference optimisation (SLIME and baselines)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train from a TOML config (see docs/trainer.md for every field and its default):
    /// SFT on one split, then the preference objective on the disjoint split, with evaluation.
    /// Writes config.toml, metrics.jsonl, eval.jsonl, checkpoints/, model/ and result.json into
    /// --run-dir.
    Train {
        /// The run's TOML config; every field has a default, so an empty file is valid.
        #[arg(long)]
        config: PathBuf,
        /// Output directory.
        #[arg(long)]
        run_dir: PathBuf,
        /// Continue an interrupted run from its latest checkpoint (same config; only
        /// [checkpoint] may change). A finished run is left alone; a run directory without a
        /// checkpoint starts fresh. Without --resume, earlier logs and checkpoints in --run-dir
        /// are discarded.
        #[arg(long)]
        resume: bool,
        /// Progress on stderr: auto (a bar on a terminal, periodic lines otherwise), bar,
        /// lines or off.
        #[arg(long, default_value = "auto", value_parser = parse_progress)]
        progress: ProgressMode,
        /// How the preference stage picks pairs, overriding the config's
        /// preference.selection: uniform (a seeded shuffle per epoch) or sage (a stability-aware
        /// selection built from the abstract of arXiv 2602.01207: pairs drawn by the objective's
        /// own margin below its target from a re-scored pool; see docs/trainer.md, parameters in
        /// [preference.sage]).
        #[arg(long, value_enum)]
        selection: Option<SelectionArg>,
    },
    /// Evaluate a saved model directory (config.json + model.safetensors, e.g. a run's model/)
    /// on the held-out pairs the config describes (the embedded task's, or with data.parquet
    /// and model.path that file's held-out split); prints the metrics as key = value lines.
    Eval {
        /// The model directory.
        #[arg(long)]
        model: PathBuf,
        /// A run config whose seed, data.eval_pairs and [eval] section select the held-out
        /// pairs and the evaluation settings (default: the defaults, seed 0).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Score a Parquet preference file with a model: per pair, the sum of the chosen and of the
    /// rejected completion-token log-probs and their token counts (mean = sum / tokens), written
    /// to --out as Parquet (columns pair, chosen_logp, rejected_logp, chosen_tokens,
    /// rejected_tokens; pair = the row in --data). This is also how reference log-probs are
    /// precomputed. Prints the loader's counts (rows read, skipped, truncated).
    Logps {
        #[command(flatten)]
        model: ModelArgs,
        /// The Parquet preference file (TRL standard, conversational or implicit-prompt layout),
        /// or a directory or glob of shards read in name order.
        #[arg(long)]
        data: PathBuf,
        /// Output Parquet file.
        #[arg(long)]
        out: PathBuf,
        /// Longest prompt + completion, in tokens; completions are cut at their end (TRL's
        /// max_length). Default: no limit.
        #[arg(long)]
        max_length: Option<usize>,
        /// Longest prompt, in tokens (TRL's max_prompt_length). Default: no limit.
        #[arg(long)]
        max_prompt_length: Option<usize>,
        /// Which end of an over-long prompt to keep.
        #[arg(long, value_enum, default_value_t = TruncationArg::KeepEnd)]
        truncation_mode: TruncationArg,
        /// A pair over --max-length / --max-prompt-length: truncate it (TRL), or drop it and
        /// count it (as a training run with `data.overlong = "drop"` does).
        #[arg(long, value_enum, default_value_t = OverlongArg::Truncate)]
        overlong: OverlongArg,
        /// Pairs per forward pass (each pair is two sequences).
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Score only one part of the seeded hash split (sft: the first third, preference: the
        /// other two thirds, as in the paper). Default: every row.
        #[arg(long, value_enum)]
        split: Option<SplitArg>,
        /// Seed of the hash split.
        #[arg(long, default_value_t = 0, requires = "split")]
        split_seed: u64,
        /// Skip unusable rows (null, empty, no assistant turn, ...) and count them, instead of
        /// stopping at the first one.
        #[arg(long)]
        skip_invalid: bool,
        /// Also write every completion token's log-prob to OUT.tokens.parquet (columns pair,
        /// which = chosen|rejected, position = index within the completion, token, logp).
        #[arg(long)]
        per_token: bool,
    },
    /// Generate completions for prompts and print them as JSON lines {"prompt", "completion",
    /// "tokens", "finish_reason"} (finish_reason: stop, length or context). Greedy unless
    /// --temperature is above 0. Decoding stops at the tokenizer's EOS, the chat template's
    /// end-of-turn token, any --stop token, or --max-new-tokens.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompts: a .jsonl/.json file with one object per line, {"prompt": "..."},
        /// {"prompt": [messages]} or {"messages": [{"role": ..., "content": ...}, ...]}; any
        /// other file has one prompt (a user turn) per non-empty line.
        #[arg(long)]
        prompts: PathBuf,
        /// Write the JSON lines to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Most new tokens per prompt.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 decodes greedily.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sampling seed; prompt i (0-based) uses seed + i, so the output is reproducible.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// An extra stop token (a vocabulary entry such as `<|eot_id|>`); repeatable.
        #[arg(long)]
        stop: Vec<String>,
        /// Feed text prompts to the model as they are, without a chat template.
        #[arg(long, conflicts_with = "template")]
        no_template: bool,
        /// Prompts decoded together (left-padded into one batch; each stops on its own). The
        /// output is the same for any value; larger batches give more tokens per second.
        #[arg(long, default_value_t = slime_trainer::generate::DEFAULT_BATCH_SIZE)]
        batch_size: usize,
    },
    /// Convert downloaded files to what the other subcommands read: a GGUF checkpoint to a
    /// model directory, or LLaMA-Factory preference JSON to Parquet.
    Convert {
        #[command(subcommand)]
        what: slime_trainer::convert::ConvertCommand,
    },
    /// Write a generated task's files (see `task verifiable --help`).
    #[command(subcommand)]
    Task(slime_trainer::verifiable::TaskCommand),
}

/// Where the model and tokenizer are, and how to run it.
#[derive(clap::Args)]
struct ModelArgs {
    /// A Hugging Face model directory (config.json, model.safetensors or a sharded set,
    /// tokenizer.json, tokenizer_config.json), or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// For a .gguf model: the Hugging Face config.json of its architecture (or a directory
    /// holding it). Default: config.json beside the .gguf file, else the file's GGUF metadata.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory with tokenizer.json (and tokenizer_config.json). Default: the model directory
    /// (for a .gguf file, its directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Chat template when tokenizer_config.json has none (the tokenizer's own always wins).
    #[arg(long, value_enum)]
    template: Option<TemplateArg>,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum TemplateArg {
    Llama3,
    Gemma,
    Chatml,
}

impl From<TemplateArg> for BuiltinTemplate {
    fn from(t: TemplateArg) -> Self {
        match t {
            TemplateArg::Llama3 => Self::Llama3,
            TemplateArg::Gemma => Self::Gemma,
            TemplateArg::Chatml => Self::Chatml,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TruncationArg {
    KeepEnd,
    KeepStart,
}

#[derive(Clone, Copy, ValueEnum)]
enum OverlongArg {
    Truncate,
    Drop,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Sft,
    Preference,
}

impl ModelArgs {
    fn load(&self) -> Result<(slime_trainer::model_source::LoadedModel, candle_core::Device)> {
        let device = parse_device(&self.device)?;
        let source =
            ModelSource { model: self.model.clone(), config: self.config.clone(), tokenizer: self.tokenizer.clone() };
        let loaded = source.load(&device).with_context(|| format!("loading the model {}", self.model.display()))?;
        Ok((loaded, device))
    }
}

fn parse_progress(text: &str) -> std::result::Result<ProgressMode, String> {
    match text {
        "auto" => Ok(ProgressMode::Auto),
        "bar" => Ok(ProgressMode::Bar),
        "lines" => Ok(ProgressMode::Lines),
        "off" => Ok(ProgressMode::Off),
        other => Err(format!("`{other}`: expected auto, bar, lines or off")),
    }
}

/// `--selection`.
#[derive(Clone, Copy, ValueEnum)]
enum SelectionArg {
    Uniform,
    Sage,
}

fn read_config(path: &PathBuf) -> Result<RunConfig> {
    expect_file(path, "--config", "a TOML run config")?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    RunConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))
}

/// Test hooks, read from the environment (documented in docs/trainer.md, not in --help).
fn test_hooks(opts: &mut RunOptions) -> Result<()> {
    if let Ok(ms) = std::env::var("SLIME_TRAINER_STEP_DELAY_MS") {
        let ms: u64 = ms.parse().with_context(|| format!("SLIME_TRAINER_STEP_DELAY_MS = `{ms}`"))?;
        opts.step_delay = Duration::from_millis(ms);
    }
    if let Ok(fault) = std::env::var("SLIME_TRAINER_INJECT_FAULT") {
        opts.fault = Some(fault.parse::<Fault>()?);
    }
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { slime_trainer::threads::keep_candle_off_its_own_pool() };
    let kept = slime_trainer::malloc::keep_freed_memory();
    slime_trainer::logging::init_logging();
    if !kept {
        tracing::warn!("glibc refused an allocator setting: large buffers go back to the kernel between steps");
    }
    slime_trainer::kernels::apply_env()?;
    match Cli::parse().command {
        Command::Train { config, run_dir, resume, progress, selection } => {
            let mut cfg = read_config(&config)?;
            if let Some(s) = selection {
                cfg.preference.selection = match s {
                    SelectionArg::Uniform => SelectionKind::Uniform,
                    SelectionArg::Sage => SelectionKind::Sage,
                };
            }
            let mut opts = RunOptions { resume, progress, ..RunOptions::default() };
            test_hooks(&mut opts)?;
            // The run itself on a pool thread: its parallel regions fork from a worker instead
            // of waking the pool and parking the main thread each time.
            let pool = rayon::ThreadPoolBuilder::new().build().context("thread pool")?;
            let report = pool
                .install(|| slime_trainer::run::run_with(&cfg, &run_dir, &opts))
                .with_context(|| format!("run {}", run_dir.display()))?;
            for (k, v) in report.final_eval {
                println!("{k} = {v:.4}");
            }
            Ok(())
        }
        Command::Task(task) => task.run(&mut std::io::stdout().lock()).map(|_| ()).context("task"),
        Command::Eval { model, config } => {
            let cfg = match &config {
                Some(path) => read_config(path)?,
                None => RunConfig::default(),
            };
            let metrics = slime_trainer::run::evaluate_dir(&cfg, &model)
                .with_context(|| format!("evaluating {}", model.display()))?;
            for (k, v) in metrics {
                println!("{k} = {v:.4}");
            }
            Ok(())
        }
        Command::Logps {
            model,
            data,
            out,
            max_length,
            max_prompt_length,
            truncation_mode,
            overlong,
            batch_size,
            split,
            split_seed,
            skip_invalid,
            per_token,
        } => {
            if batch_size == 0 {
                bail!("--batch-size: must be at least 1");
            }
            for file in slime_data::parquet_files(&data)? {
                expect_file(&file, "--data", "a Parquet preference file, a directory or a glob of them")?;
            }
            let (loaded, _device) = model.load()?;
            let template = loaded.template(model.template.map(Into::into))?;
            let opts = LogpsOptions {
                truncation: Truncation {
                    max_length,
                    max_prompt_length,
                    mode: match truncation_mode {
                        TruncationArg::KeepEnd => TruncationMode::KeepEnd,
                        TruncationArg::KeepStart => TruncationMode::KeepStart,
                    },
                },
                overlong: match overlong {
                    OverlongArg::Truncate => Overlong::Truncate,
                    OverlongArg::Drop => Overlong::Drop,
                },
                batch_size,
                split: split.map(|s| {
                    let part = match s {
                        SplitArg::Sft => SplitPart::First,
                        SplitArg::Preference => SplitPart::Second,
                    };
                    (HashSplit::paper(split_seed), part)
                }),
                invalid_rows: if skip_invalid { InvalidRows::Skip } else { InvalidRows::Error },
                per_token: per_token.then(|| per_token_path(&out)),
                progress_every: Some(Duration::from_secs(10)),
            };
            let report = score_file(&loaded, template, &data, &out, &opts)
                .with_context(|| format!("scoring {}", data.display()))?;
            println!("{}: {}", data.display(), report.stats);
            if report.dropped_overlong > 0 {
                println!("dropped {} over-long pairs (--overlong drop)", report.dropped_overlong);
            }
            let tokens: u64 = report.rows.iter().map(|r| u64::from(r.chosen_tokens + r.rejected_tokens)).sum();
            println!(
                "wrote {} ({} pairs, {tokens} completion tokens) in {:.1} s",
                out.display(),
                report.rows.len(),
                report.seconds
            );
            if let Some(path) = &opts.per_token {
                println!("wrote {} ({} token rows)", path.display(), report.token_rows);
            }
            Ok(())
        }
        Command::Generate { model, prompts, out, max_new_tokens, temperature, seed, stop, no_template, batch_size } => {
            if !(temperature.is_finite() && temperature >= 0.0) {
                bail!("--temperature: {temperature} is not a finite number >= 0");
            }
            if batch_size == 0 {
                bail!("--batch-size: must be at least 1");
            }
            expect_file(&prompts, "--prompts", "a prompts file (.jsonl, .json or text)")?;
            let prompt_list = read_prompts(&prompts)?;
            let (loaded, _device) = model.load()?;
            let template = if no_template { None } else { loaded.template(model.template.map(Into::into))? };
            if template.is_none() && !no_template {
                bail!(
                    "{}: the tokenizer has no chat_template; pass --template llama3, gemma or chatml, or \
                     --no-template to use the prompt text as it is",
                    loaded.tokenizer_dir.display()
                );
            }
            let opts = GenerateOptions { max_new_tokens, temperature, seed, extra_stop: stop, batch_size };
            let started = std::time::Instant::now();
            let generations = match &out {
                // Written whole or not at all: a failed run leaves no partial file.
                Some(path) => {
                    let mut generations = Vec::new();
                    slime_trainer::atomic::produce_file(path, |tmp| {
                        let file = std::fs::File::create(tmp)
                            .map_err(|source| TrainError::Io { path: tmp.display().to_string(), source })?;
                        let mut w = std::io::BufWriter::new(file);
                        generations = generate_all(&loaded, template.as_ref(), &prompt_list, &opts, &mut w)?;
                        w.flush().map_err(|source| TrainError::Io { path: tmp.display().to_string(), source })
                    })
                    .map(|()| generations)
                }
                None => generate_all(&loaded, template.as_ref(), &prompt_list, &opts, &mut std::io::stdout().lock()),
            }
            .with_context(|| format!("generating for {}", prompts.display()))?;
            let tokens: usize = generations.iter().map(|g| g.tokens).sum();
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "generated {} completions ({tokens} tokens) in {seconds:.1} s ({:.1} tokens/s)",
                generations.len(),
                tokens as f64 / seconds.max(1e-9)
            );
            Ok(())
        }
        Command::Convert { what } => what.run(),
    }
}
