//! One TOML file per run. Every field has a default and a doc comment; unknown fields are
//! rejected; [`RunConfig::validate`] rejects out-of-range values before any work starts.
//!
//! ```toml
//! name = "slime"            # the variant's name in reports
//! seed = 0
//! init = "results/sft-seed0/model"   # start from these weights (skip SFT); optional
//!
//! [model]
//! preset = "tiny-llama"
//! lora = { r = 8, alpha = 16.0 }   # optional: LoRA adapters for the preference stage
//!
//! [data]
//! pairs = 3000              # embedded task: pairs generated (1/3 SFT, 2/3 preference, disjoint)
//! eval_pairs = 128
//!
//! [sft]
//! steps = 400
//! batch_size = 32           # sequences per micro-batch
//! grad_accum = 1            # micro-batches per optimiser step
//! parallel_micro_batches = 1   # of those, how many run at once (one per core)
//!
//! [preference]
//! steps = 200
//! objective = { type = "slime", preset = "paper" }
//!
//! [checkpoint]
//! every = 100               # optimiser steps between checkpoints, in both stages (0: never)
//! keep_last = 2             # checkpoints kept on disk, newest first
//! ```
//!
//! Every field is documented in `docs/trainer.md`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use slime_objectives::{Objective, SftParams, SlimeParams};

use crate::optim::AdamWConfig;
use crate::schedule::{Decay, Schedule};
use crate::selection::{SageParams, SelectionKind};
use crate::{Result, TrainError};

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Variant name written into `result.json` (default "run").
    pub name: String,
    /// Seed for model init, data generation, shuffling (default 0).
    pub seed: u64,
    /// Start from this model directory (config.json + model.safetensors) and skip SFT.
    pub init: Option<PathBuf>,
    /// The model.
    pub model: ModelSpec,
    /// The data.
    pub data: DataSpec,
    /// The SFT stage.
    pub sft: SftSpec,
    /// The preference stage.
    pub preference: PreferenceSpec,
    /// Evaluation.
    pub eval: EvalSpec,
    /// Checkpoints written during training, for `slime-trainer train --resume`.
    pub checkpoint: CheckpointSpec,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            seed: 0,
            init: None,
            model: ModelSpec::default(),
            data: DataSpec::default(),
            sft: SftSpec::default(),
            preference: PreferenceSpec::default(),
            eval: EvalSpec::default(),
            checkpoint: CheckpointSpec::default(),
        }
    }
}

/// Which model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// A built-in random-init model sized for the embedded task: `tiny-llama` (default) or
    /// `tiny-gemma` (Gemma 3 layout: QK-norm, sliding-window and global layers). Ignored when
    /// `path` is set.
    pub preset: String,
    /// Hidden size of the preset (default 96).
    pub hidden: usize,
    /// Decoder layers of the preset (default 2).
    pub layers: usize,
    /// A pretrained model instead of a preset: a Hugging Face model directory (config.json,
    /// model.safetensors or a sharded set, tokenizer.json, tokenizer_config.json) or a `.gguf`
    /// file (architecture from a config.json beside it, else from its GGUF metadata) with a
    /// tokenizer.json beside it. Needs `data.parquet` (its tokenizer cannot encode the
    /// embedded task).
    pub path: Option<PathBuf>,
    /// The directory with tokenizer.json (and tokenizer_config.json) when it is not `path`'s.
    pub tokenizer: Option<PathBuf>,
    /// Compute and weight dtype: `f32` (default) or `bf16` (weights, activations and LoRA
    /// adapters in bf16, AdamW moments in f32; on the CPU bf16 runs the unfused reference path,
    /// so it saves memory, not time).
    pub dtype: String,
    /// `cpu` (default), `cuda` or `cuda:N` (needs a build with `--features cuda`).
    pub device: String,
    /// LoRA (absent: full fine-tuning). The preference stage then trains only adapters on the
    /// frozen SFT model, and the reference model is the same model with the adapters switched
    /// off; SFT trains every weight unless `lora.sft` is set.
    pub lora: Option<LoraSpec>,
    /// Gradient checkpointing (Hugging Face's `gradient_checkpointing`): each layer keeps only
    /// its input and recomputes its activations in the backward pass; the same numbers, less
    /// activation memory, about a third more forward work. f32 models on the CPU (the fused
    /// blocks of Llama, Qwen and Gemma); no effect elsewhere. Default false.
    pub gradient_checkpointing: bool,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            preset: "tiny-llama".into(),
            hidden: 96,
            layers: 2,
            path: None,
            tokenizer: None,
            dtype: "f32".into(),
            device: "cpu".into(),
            lora: None,
            gradient_checkpointing: false,
        }
    }
}

/// The built-in model presets.
pub const MODEL_PRESETS: [&str; 2] = ["tiny-llama", "tiny-gemma"];

impl ModelSpec {
    /// The dtype to convert weights to at load time (`None` for f32: weights stay as stored,
    /// f32 for every checkpoint this workspace writes).
    pub fn load_dtype(&self) -> Option<candle_core::DType> {
        (self.dtype == "bf16").then_some(candle_core::DType::BF16)
    }

    /// The model's name in reports: the preset, or the last component of `path`.
    pub fn display_name(&self) -> String {
        match &self.path {
            Some(p) => p
                .file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().trim_end_matches(".gguf").to_string()),
            None => self.preset.clone(),
        }
    }
}

/// The projections LoRA can adapt.
pub const LORA_MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// LoRA adapters (Hu et al. 2021) in PEFT's layout: `W x + (alpha / r) B A x`, `B = 0` at the
/// start, so the adapted model starts as the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank, 1..=1024 (default 8).
    pub r: usize,
    /// Scale numerator: the update is scaled by `alpha / r`; finite, > 0 (default 16). PEFT's
    /// `lora_alpha`.
    #[serde(alias = "lora_alpha")]
    pub alpha: f64,
    /// Adapted projections, from `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
    /// `down_proj` (default all seven, as the SLIME paper).
    pub target_modules: Vec<String>,
    /// Also train SFT through adapters (merged into the weights when SFT ends, before the
    /// preference stage adds fresh ones); default false: SFT trains every weight. Saves the
    /// optimiser state of every weight, which is what makes SFT of a pretrained model fit on
    /// a small machine.
    pub sft: bool,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self { r: 8, alpha: 16.0, target_modules: LORA_MODULES.iter().map(|m| m.to_string()).collect(), sft: false }
    }
}

impl LoraSpec {
    /// The models crate's config.
    pub fn to_lora_config(&self) -> slime_models::LoraConfig {
        let targets: Vec<&str> = self.target_modules.iter().map(String::as_str).collect();
        slime_models::LoraConfig::new(self.r, self.alpha, &targets)
    }
}

/// The data: the embedded task (default) or a preference Parquet file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// Embedded task: training pairs generated; every third is the SFT split, the rest the
    /// disjoint preference split, as in the paper (default 3000).
    pub pairs: usize,
    /// Held-out pairs for evaluation: generated ones for the embedded task; with `parquet`, at
    /// most this many of the held-out rows (default 128).
    pub eval_pairs: usize,
    /// A preference Parquet file (TRL standard, conversational or implicit-prompt layout;
    /// needs `model.path`), or a directory or glob of shards read in name order. Rows are split by a seeded hash of their content, never by file
    /// order: `eval_fraction` of them are held out, a third of the rest is the SFT split and
    /// the other two thirds the preference split.
    pub parquet: Option<PathBuf>,
    /// Share of the Parquet rows held out for evaluation, in (0, 1) (default 0.1).
    pub eval_fraction: f64,
    /// Seed of the Parquet hash splits (default 0; independent of the run's `seed`, so every
    /// seed of a grid sees the same splits).
    pub split_seed: u64,
    /// Chat template when the tokenizer has none: `llama3`, `gemma` or `chatml`.
    pub template: Option<String>,
    /// Longest prompt + completion in tokens (TRL's max_length; default 512).
    pub max_length: Option<usize>,
    /// Longest prompt in tokens (TRL's max_prompt_length; default 256).
    pub max_prompt_length: Option<usize>,
    /// Skip unusable rows (null, empty, no assistant turn, ...) and count them, instead of
    /// stopping at the first (default false).
    pub skip_invalid: bool,
    /// A pair longer than the limits: `"truncate"` (cut it, TRL's behaviour; the default) or
    /// `"drop"` (leave held-out and preference pairs that do not fit out, counted in
    /// `data.json`; SFT pairs are still cut).
    pub overlong: slime_data::Overlong,
    /// A held-out Parquet file: its rows, in file order, are the held-out pairs, and `parquet`
    /// is split into SFT and preference pairs only (`eval_fraction` unused).
    pub heldout: Option<PathBuf>,
    /// The answers of `heldout`'s rows (line i, row i), one JSON object per line as
    /// `slime-trainer task verifiable` writes them (`heldout.jsonl`): the greedy generations
    /// are graded by the task's checker (format validity, task accuracy, repetition).
    pub heldout_answers: Option<PathBuf>,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            pairs: 3000,
            eval_pairs: 128,
            parquet: None,
            eval_fraction: 0.1,
            split_seed: 0,
            template: None,
            max_length: Some(512),
            max_prompt_length: Some(256),
            skip_invalid: false,
            overlong: slime_data::Overlong::Truncate,
            heldout: None,
            heldout_answers: None,
        }
    }
}

/// One stage's optimisation: steps, batch sizes, the learning-rate schedule and AdamW. The same
/// keys (with TRL's names as aliases) in `[sft]` and `[preference]`; only the defaults of
/// `steps` and `schedule` differ ([`StageSpec::sft_default`], [`StageSpec::preference_default`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageSpec {
    /// Optimiser steps (0 skips the stage); TRL's `max_steps`.
    #[serde(alias = "max_steps")]
    pub steps: u64,
    /// Sequences (SFT) or pairs (preference) per micro-batch, one forward/backward pass; an
    /// optimiser step sees `batch_size * grad_accum` of them (default 32). TRL's
    /// `per_device_train_batch_size`.
    #[serde(alias = "per_device_train_batch_size")]
    pub batch_size: usize,
    /// Gradient accumulation: micro-batches per optimiser step, >= 1 (default 1). The loss is
    /// normalised over the whole optimiser batch ([`slime_objectives::BatchTotals`]), so
    /// `batch_size = 8, grad_accum = 1` and `batch_size = 4, grad_accum = 2` train the same
    /// model (up to float rounding). TRL's `gradient_accumulation_steps`.
    #[serde(alias = "gradient_accumulation_steps")]
    pub grad_accum: usize,
    /// Micro-batches of one optimiser step processed at once, each on its own thread of the
    /// rayon pool (data parallelism over the CPU cores), 1..=grad_accum (default 1). Gradients
    /// are still summed in micro-batch order, so the weights are bit-identical to 1. It pays
    /// when one micro-batch is too small to keep every core busy inside each product (see
    /// docs/performance.md); the activations of that many micro-batches are alive at once.
    pub parallel_micro_batches: usize,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Gradient-norm clipping (PyTorch's `clip_grad_norm_`); none if absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// AdamW's decoupled weight decay, >= 0 (default 0, as TRL's trainers); TRL's name.
    pub weight_decay: f64,
}

impl Default for StageSpec {
    fn default() -> Self {
        Self::sft_default()
    }
}

impl StageSpec {
    /// `[sft]`'s defaults: 600 steps, cosine decay from 3e-3 after 5% warmup.
    pub fn sft_default() -> Self {
        Self {
            steps: 600,
            batch_size: 32,
            grad_accum: 1,
            parallel_micro_batches: 1,
            schedule: Schedule { lr: 3e-3, decay: Decay::Cosine, warmup_ratio: 0.05 },
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
        }
    }

    /// `[preference]`'s defaults: 200 steps, linear decay from 1e-3 (the paper's schedule).
    pub fn preference_default() -> Self {
        Self {
            steps: 200,
            schedule: Schedule { lr: 1e-3, decay: Decay::Linear, warmup_ratio: 0.0 },
            ..Self::sft_default()
        }
    }

    /// The stage's AdamW settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { weight_decay: self.weight_decay, ..AdamWConfig::default() }
    }

    /// Rejects out-of-range values, naming them `{stage}.field`.
    fn validate(&self, stage: &str) -> Result<()> {
        let bad = |what: String| Err(TrainError::Config(what));
        let (batch, accum, parallel) = (self.batch_size, self.grad_accum, self.parallel_micro_batches);
        if batch == 0 {
            return bad(format!("{stage}.batch_size = 0: expected at least 1"));
        }
        if accum == 0 || accum > MAX_GRAD_ACCUM {
            return bad(format!("{stage}.grad_accum = {accum}: expected 1..={MAX_GRAD_ACCUM}"));
        }
        if parallel == 0 || parallel > accum {
            return bad(format!(
                "{stage}.parallel_micro_batches = {parallel}: expected 1..={accum} ({stage}.grad_accum)"
            ));
        }
        if batch.checked_mul(accum).is_none_or(|n| n > 1 << 20) {
            return bad(format!(
                "{stage}.batch_size * {stage}.grad_accum = {batch} * {accum}: expected at most {}",
                1 << 20
            ));
        }
        self.schedule.validate().map_err(|e| TrainError::Config(format!("{stage}.{}", strip_prefix(&e))))?;
        if let Some(clip) = self.max_grad_norm
            && !(clip > 0.0 && clip.is_finite())
        {
            return bad(format!("{stage}.max_grad_norm = {clip:?}: expected a finite value > 0 (or absent)"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("{stage}.weight_decay = {}: expected a finite value >= 0", self.weight_decay));
        }
        Ok(())
    }
}

/// The SFT stage: its optimisation ([`StageSpec`], whose fields it reads as its own) plus the
/// objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct SftSpec {
    /// Steps, batch sizes, schedule and AdamW, written in `[sft]` itself.
    #[serde(flatten)]
    pub stage: StageSpec,
    /// The objective: `type = "sft"`, plain NLL by default, or the probability-based family
    /// of arXiv 2510.00526 (`{ type = "sft", alpha = 1.0 }` is `1 - p`). Not written into a
    /// resolved config when it is NLL, so configs written before the field existed still match.
    #[serde(skip_serializing_if = "SftSpec::is_nll")]
    pub objective: Objective,
}

impl Default for SftSpec {
    fn default() -> Self {
        Self { stage: StageSpec::sft_default(), objective: Objective::Sft(SftParams::nll()) }
    }
}

impl SftSpec {
    fn is_nll(objective: &Objective) -> bool {
        *objective == Objective::Sft(SftParams::nll())
    }
}

impl std::ops::Deref for SftSpec {
    type Target = StageSpec;

    fn deref(&self) -> &StageSpec {
        &self.stage
    }
}

impl std::ops::DerefMut for SftSpec {
    fn deref_mut(&mut self) -> &mut StageSpec {
        &mut self.stage
    }
}

/// `[sft]`: `objective` to [`Objective`], the rest to [`StageSpec`] (whose errors then name
/// the field).
impl TryFrom<toml::Table> for SftSpec {
    type Error = String;

    fn try_from(mut table: toml::Table) -> std::result::Result<Self, String> {
        let objective = match table.remove("objective") {
            Some(value) => Objective::deserialize(value).map_err(|e| format!("sft.objective: {e}"))?,
            None => Objective::Sft(SftParams::nll()),
        };
        let stage = StageSpec::deserialize(toml::Value::Table(table)).map_err(|e| e.to_string())?;
        Ok(Self { stage, objective })
    }
}

/// The preference stage: its optimisation ([`StageSpec`], whose fields it reads as its own)
/// plus the objective, the data selection and the reference log-probs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct PreferenceSpec {
    /// Steps, batch sizes, schedule and AdamW, written in `[preference]` itself.
    #[serde(flatten)]
    pub stage: StageSpec,
    /// The objective (default SLIME, paper preset).
    pub objective: Objective,
    /// `uniform` (default) or `sage`.
    pub selection: SelectionKind,
    /// SAGE parameters (used with `selection = "sage"`).
    pub sage: SageParams,
    /// Precomputed reference log-probs for DPO-style objectives (`slime-trainer logps` of the
    /// same Parquet file: pair = row). Absent: they are computed once from the starting model
    /// before the stage and cached as `reference_logps.parquet` in the run directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_logps: Option<PathBuf>,
}

impl Default for PreferenceSpec {
    fn default() -> Self {
        Self {
            stage: StageSpec::preference_default(),
            objective: Objective::Slime(SlimeParams::paper()),
            selection: SelectionKind::Uniform,
            sage: SageParams::default(),
            reference_logps: None,
        }
    }
}

impl std::ops::Deref for PreferenceSpec {
    type Target = StageSpec;

    fn deref(&self) -> &StageSpec {
        &self.stage
    }
}

impl std::ops::DerefMut for PreferenceSpec {
    fn deref_mut(&mut self) -> &mut StageSpec {
        &mut self.stage
    }
}

/// The keys of `[preference]` that are not [`StageSpec`]'s.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PreferenceOnly {
    objective: Objective,
    selection: SelectionKind,
    sage: SageParams,
    reference_logps: Option<PathBuf>,
}

impl Default for PreferenceOnly {
    fn default() -> Self {
        let PreferenceSpec { objective, selection, sage, reference_logps, .. } = PreferenceSpec::default();
        Self { objective, selection, sage, reference_logps }
    }
}

/// `[preference]`: its own keys to [`PreferenceOnly`], the rest to [`StageSpec`], whose errors
/// then name the field (serde's `flatten` would lose it). A key absent there takes the
/// preference default, not SFT's.
impl TryFrom<toml::Table> for PreferenceSpec {
    type Error = String;

    fn try_from(mut table: toml::Table) -> std::result::Result<Self, String> {
        let own: toml::Table = ["objective", "selection", "sage", "reference_logps"]
            .into_iter()
            .filter_map(|key| table.remove_entry(key))
            .collect();
        let own = PreferenceOnly::deserialize(toml::Value::Table(own)).map_err(|e| e.to_string())?;
        // The only fields whose defaults differ (tested), with their aliases.
        let steps_given = ["steps", "max_steps"].iter().any(|k| table.contains_key(*k));
        let schedule_given = table.contains_key("schedule");
        let mut stage = StageSpec::deserialize(toml::Value::Table(table)).map_err(|e| e.to_string())?;
        let defaults = StageSpec::preference_default();
        if !steps_given {
            stage.steps = defaults.steps;
        }
        if !schedule_given {
            stage.schedule = defaults.schedule;
        }
        let PreferenceOnly { objective, selection, sage, reference_logps } = own;
        Ok(Self { stage, objective, selection, sage, reference_logps })
    }
}

/// Evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate every this many preference steps (and at the start and end; default 25).
    /// TRL's `eval_steps`.
    #[serde(alias = "eval_steps")]
    pub every: u64,
    /// Held-out prompts decoded greedily per evaluation (default 64).
    pub generations: usize,
    /// Longest generation (default 24 tokens).
    pub max_new_tokens: usize,
    /// Collapse threshold delta: rejected tokens with log-prob below -delta (default 1.25).
    pub collapse_delta: f64,
    /// Pairs per forward pass when scoring held-out pairs (default 64). TRL's
    /// `per_device_eval_batch_size`.
    #[serde(alias = "per_device_eval_batch_size")]
    pub batch_size: usize,
    /// Held-out prompts decoded together in one left-padded batch (default 8). The generations
    /// do not depend on it.
    pub generation_batch_size: usize,
    /// A finished run directory whose final evaluation is taken as this run's start evaluation
    /// (preference step 0) instead of evaluating the same model again: an SFT-only run
    /// (`preference.steps = 0`) whose final model is the one this run starts from (`init`, its
    /// `sft-model/`), with the same seed, `[model]`, `[data]` and `[eval]` settings (`every`,
    /// `generation_batch_size` aside). Checked before use against that run's `config.toml` and
    /// `result.json` (the model's SHA-256, the held-out pairs), and again on `--resume`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_from: Option<PathBuf>,
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            every: 25,
            generations: 64,
            max_new_tokens: 24,
            collapse_delta: 1.25,
            batch_size: 64,
            generation_batch_size: 8,
            start_from: None,
        }
    }
}

/// Checkpoints: everything a resumed run needs to continue bit-identically (trainable weights,
/// AdamW moments, stage and step, data cursor, RNG, SAGE state, reference log-probs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Write a checkpoint after every this many optimiser steps of each stage (SFT and
    /// preference); 0 disables checkpoints (default 100). TRL's `save_steps`.
    #[serde(alias = "save_steps")]
    pub every: u64,
    /// Checkpoints kept on disk, the newest ones; >= 1 (default 2). TRL's `save_total_limit`.
    #[serde(alias = "save_total_limit")]
    pub keep_last: usize,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self { every: 100, keep_last: 2 }
    }
}

/// Largest accepted `grad_accum` (a guard against typos; far beyond any useful value here).
pub const MAX_GRAD_ACCUM: usize = 4096;

/// Largest accepted `eval.max_new_tokens` (generation also stops at the model's context).
pub const MAX_NEW_TOKENS: usize = 4096;

impl RunConfig {
    /// Parses TOML; unknown fields and type errors name the field, and a TRL name written where
    /// it does not belong (or that has no counterpart) gets a hint.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| {
            let message = e.to_string();
            match crate::trl_names::hint(&message) {
                Some(hint) => TrainError::Config(format!("{}\nhint: {hint}", message.trim_end())),
                None => TrainError::Config(message),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects out-of-range values; every error names the field and its valid range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TrainError::Config(what));
        if self.model.path.is_none() && !MODEL_PRESETS.contains(&self.model.preset.as_str()) {
            return bad(format!("model.preset = `{}`: expected one of {MODEL_PRESETS:?}", self.model.preset));
        }
        if self.model.path.is_some() != self.data.parquet.is_some() {
            return bad(if self.model.path.is_some() {
                "model.path is set but data.parquet is not: a pretrained model trains on a Parquet file \
                 (the embedded task has its own tokenizer)"
                    .into()
            } else {
                "data.parquet is set but model.path is not: Parquet data needs a pretrained model's tokenizer".into()
            });
        }
        if self.model.dtype != "f32" && self.model.dtype != "bf16" {
            return bad(format!("model.dtype = `{}`: expected f32 or bf16", self.model.dtype));
        }
        let cuda_ordinal = self.model.device.strip_prefix("cuda:").map(str::parse::<usize>);
        if !(self.model.device == "cpu" || self.model.device == "cuda" || matches!(cuda_ordinal, Some(Ok(_)))) {
            return bad(format!("model.device = `{}`: expected cpu, cuda or cuda:N", self.model.device));
        }
        if self.model.tokenizer.is_some() && self.model.path.is_none() {
            return bad("model.tokenizer is set but model.path is not".into());
        }
        if self.data.heldout.is_some() && self.data.parquet.is_none() {
            return bad("data.heldout is set but data.parquet is not: a held-out file goes with a training file".into());
        }
        if self.data.heldout_answers.is_some() && self.data.heldout.is_none() {
            return bad("data.heldout_answers is set but data.heldout is not: the answers are of its rows".into());
        }
        if !(self.data.eval_fraction > 0.0 && self.data.eval_fraction < 1.0) {
            return bad(format!("data.eval_fraction = {}: expected a value in (0, 1)", self.data.eval_fraction));
        }
        if let Some(t) = &self.data.template
            && builtin_template(t).is_none()
        {
            return bad(format!("data.template = `{t}`: expected llama3, gemma or chatml"));
        }
        for (name, v) in [("max_length", self.data.max_length), ("max_prompt_length", self.data.max_prompt_length)] {
            if v == Some(0) {
                return bad(format!("data.{name} = 0: expected at least 1 (or absent for no limit)"));
            }
        }
        if let (Some(all), Some(prompt)) = (self.data.max_length, self.data.max_prompt_length)
            && prompt >= all
        {
            return bad(format!(
                "data.max_prompt_length = {prompt} must be below data.max_length = {all} (room for a completion)"
            ));
        }
        if self.eval.batch_size == 0 {
            return bad("eval.batch_size = 0: expected at least 1".into());
        }
        if self.eval.generation_batch_size == 0 {
            return bad("eval.generation_batch_size = 0: expected at least 1".into());
        }
        if self.model.hidden == 0 || !self.model.hidden.is_multiple_of(4) || self.model.hidden > 4096 {
            return bad(format!("model.hidden = {}: expected a multiple of 4 in 4..=4096", self.model.hidden));
        }
        if self.model.layers == 0 || self.model.layers > 64 {
            return bad(format!("model.layers = {}: expected 1..=64", self.model.layers));
        }
        if let Some(lora) = &self.model.lora {
            if lora.r == 0 || lora.r > 1024 {
                return bad(format!("model.lora.r = {}: expected 1..=1024", lora.r));
            }
            if !(lora.alpha > 0.0 && lora.alpha.is_finite()) {
                return bad(format!("model.lora.alpha = {}: expected a finite value > 0", lora.alpha));
            }
            if lora.target_modules.is_empty() {
                return bad(format!("model.lora.target_modules = []: expected some of {LORA_MODULES:?}"));
            }
            if let Some(m) = lora.target_modules.iter().find(|m| !LORA_MODULES.contains(&m.as_str())) {
                return bad(format!("model.lora.target_modules: `{m}` is not one of {LORA_MODULES:?}"));
            }
        }
        if self.data.pairs < 3 {
            return bad(format!("data.pairs = {}: expected at least 3 (a third goes to SFT)", self.data.pairs));
        }
        if self.data.eval_pairs == 0 {
            return bad("data.eval_pairs = 0: expected at least 1".into());
        }
        self.sft.validate("sft")?;
        if !matches!(self.sft.objective, Objective::Sft(_)) {
            return bad(format!(
                "sft.objective = {{ type = \"{}\" }}: the SFT stage trains with type = \"sft\" (NLL or the \
                 probability-based family, e.g. {{ type = \"sft\", alpha = 1.0 }})",
                self.sft.objective.name()
            ));
        }
        self.sft.objective.validate()?;
        self.preference.stage.validate("preference")?;
        self.preference.objective.validate()?;
        if !self.preference.objective.is_preference() && self.preference.steps > 0 {
            return bad("preference.objective must be a preference objective (not sft)".into());
        }
        self.preference.sage.validate()?;
        if self.preference.selection == SelectionKind::Sage {
            self.preference.sage.validate_sizes(self.preference.batch_size * self.preference.grad_accum, None)?;
        }
        if self.eval.start_from.is_some() {
            if self.preference.steps == 0 {
                return bad("eval.start_from is set but preference.steps = 0: the start evaluation would be the \
                            final one, which the run must write itself (with its generations)"
                    .into());
            }
            if self.init.is_none() && self.sft.steps > 0 {
                return bad("eval.start_from is set but this run trains its own SFT model (no `init`): only an \
                            evaluation of the model the run starts from can be reused"
                    .into());
            }
        }
        if self.eval.every == 0 {
            return bad("eval.every = 0: expected at least 1".into());
        }
        if self.eval.max_new_tokens == 0 || self.eval.max_new_tokens > MAX_NEW_TOKENS {
            return bad(format!("eval.max_new_tokens = {}: expected 1..={MAX_NEW_TOKENS}", self.eval.max_new_tokens));
        }
        if !(self.eval.collapse_delta >= 0.0 && self.eval.collapse_delta.is_finite()) {
            return bad(format!("eval.collapse_delta = {}: expected a finite value >= 0", self.eval.collapse_delta));
        }
        if self.checkpoint.keep_last == 0 {
            return bad("checkpoint.keep_last = 0: expected at least 1 (use checkpoint.every = 0 for none)".into());
        }
        Ok(())
    }

    /// Whether `other` describes the same training as `self`: equal up to the `[checkpoint]`
    /// section, which may change between an interrupted run and its resumption.
    pub fn same_training(&self, other: &Self) -> bool {
        let mut a = self.clone();
        a.checkpoint = other.checkpoint.clone();
        // Recomputing activations gives bit-identical numbers (tested in slime-models).
        a.model.gradient_checkpointing = other.model.gradient_checkpointing;
        &a == other
    }
}

/// The built-in chat template named `name` (`llama3`, `gemma`, `chatml`).
pub fn builtin_template(name: &str) -> Option<slime_data::BuiltinTemplate> {
    use slime_data::BuiltinTemplate as B;
    match name {
        "llama3" => Some(B::Llama3),
        "gemma" => Some(B::Gemma),
        "chatml" => Some(B::Chatml),
        _ => None,
    }
}

/// A config error's message without the `invalid configuration: ` prefix.
fn strip_prefix(e: &TrainError) -> String {
    match e {
        TrainError::Config(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_round_trip() -> Result<()> {
        let cfg = RunConfig::from_toml("")?;
        assert_eq!(cfg, RunConfig::default());
        let text = toml::to_string(&cfg).map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(RunConfig::from_toml(&text)?, cfg);
        let lora = RunConfig::from_toml("[model.lora]\nr = 4\ntarget_modules = [\"q_proj\"]")?;
        assert_eq!(lora.model.lora.as_ref().map(|l| (l.r, l.alpha)), Some((4, 16.0)));
        let text = toml::to_string(&lora).map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(RunConfig::from_toml(&text)?, lora);
        let dpo = RunConfig::from_toml("[preference]\nobjective = { type = \"dpo\", beta = 0.5 }")?;
        assert!(dpo.preference.objective.needs_reference());
        Ok(())
    }

    #[test]
    fn the_sft_objective_parses_round_trips_and_is_not_written_when_nll() -> Result<()> {
        let p = RunConfig::from_toml("[sft]\nsteps = 3\nobjective = { type = \"sft\", alpha = 1.0 }")?;
        assert_eq!(p.sft.objective, Objective::Sft(SftParams::one_minus_p()));
        assert_eq!(p.sft.steps, 3);
        let text = toml::to_string(&p).map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(RunConfig::from_toml(&text)?, p);
        let nll = toml::to_string(&RunConfig::default()).map_err(|e| TrainError::Config(e.to_string()))?;
        assert!(!nll.contains("[sft.objective]") && !nll.contains("alpha"), "{nll}");
        let reused = RunConfig::from_toml("init = \"m\"\n[eval]\nstart_from = \"sft-run\"")?;
        assert_eq!(reused.eval.start_from.as_deref(), Some(std::path::Path::new("sft-run")));
        Ok(())
    }

    #[test]
    fn bad_values_are_rejected_before_work() {
        for (text, needle) in [
            ("seeed = 1", "seeed"),
            ("[sft]\nbatch_size = 0", "batch_size"),
            ("[preference]\nobjective = { type = \"slime\", p = -1.0 }", "`p`"),
            ("[preference.schedule]\nlr = -1.0", "lr"),
            ("[model]\npreset = \"gpt5\"", "gpt5"),
            ("[preference]\nmax_grad_norm = 0.0", "max_grad_norm"),
            ("[sft]\ngrad_accum = 0", "sft.grad_accum"),
            ("[preference]\ngrad_accum = 100000", "preference.grad_accum"),
            ("[sft]\nparallel_micro_batches = 0", "sft.parallel_micro_batches"),
            ("[preference]\ngrad_accum = 2\nparallel_micro_batches = 3", "preference.parallel_micro_batches"),
            ("[preference]\nbatch_size = 0", "preference.batch_size"),
            ("[sft.schedule]\nwarmup_ratio = 1.5", "sft.schedule.warmup_ratio"),
            ("[checkpoint]\nkeep_last = 0", "checkpoint.keep_last"),
            ("[checkpoint]\nevery = -1", "every"),
            ("[checkpoint]\nevry = 5", "evry"),
            ("[model]\nlayers = 0", "model.layers"),
            ("[model]\nhidden = 30", "model.hidden"),
            ("[data]\neval_pairs = 0", "data.eval_pairs"),
            ("[eval]\nmax_new_tokens = 10000", "eval.max_new_tokens"),
            ("[eval]\ncollapse_delta = nan", "eval.collapse_delta"),
            ("[sft]\nweight_decay = -0.1", "sft.weight_decay"),
            ("[preference]\nweight_decay = inf", "preference.weight_decay"),
            ("[preference]\nsteps = -1", "in `steps`"),
            ("[preference]\nsteps = 1\nmax_steps = 2", "duplicate field `steps`"),
            ("[preference]\nstepz = 1", "stepz"),
            ("[model.lora]\nr = 0", "model.lora.r"),
            ("[model.lora]\nalpha = 0.0", "model.lora.alpha"),
            ("[model.lora]\ntarget_modules = [\"qproj\"]", "model.lora.target_modules"),
            ("[model.lora]\nrank = 4", "rank"),
            ("[model]\npath = \"m\"", "data.parquet"),
            ("[data]\nparquet = \"d.parquet\"", "model.path"),
            ("[data]\neval_fraction = 1.0", "data.eval_fraction"),
            ("[data]\nheldout = \"h.parquet\"", "data.heldout"),
            (
                "[model]\npath = \"m\"\n[data]\nparquet = \"d.parquet\"\nheldout_answers = \"h.jsonl\"",
                "data.heldout_answers",
            ),
            ("[data]\noverlong = \"cut\"", "overlong"),
            ("[data]\ntemplate = \"vicuna\"", "data.template"),
            ("[data]\nmax_length = 100\nmax_prompt_length = 100", "data.max_prompt_length"),
            ("[eval]\nbatch_size = 0", "eval.batch_size"),
            ("[eval]\ngeneration_batch_size = 0", "eval.generation_batch_size"),
            ("[model]\ndtype = \"f16\"", "model.dtype"),
            ("[model]\ndevice = \"gpu\"", "model.device"),
            ("[sft]\nobjective = { type = \"dpo\" }", "sft.objective"),
            ("[sft]\nobjective = { type = \"sft\", alpha = -1.0 }", "alpha"),
            ("[sft]\nobjective = { type = \"sft\", alpah = 1.0 }", "alpah"),
            ("[eval]\nstart_from = \"sft-run\"", "eval.start_from"),
            ("init = \"m\"\n[eval]\nstart_from = \"sft-run\"\n[preference]\nsteps = 0", "eval.start_from"),
        ] {
            let err = RunConfig::from_toml(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn trl_names_parse_to_the_same_config_as_ours() -> Result<()> {
        let ours = RunConfig::from_toml(
            "seed = 3
[model.lora]
r = 16
alpha = 32.0
[data]
max_length = 1024
max_prompt_length = 512
[sft]
steps = 50
batch_size = 4
grad_accum = 2
weight_decay = 0.01
max_grad_norm = 0.5
[sft.schedule]
lr = 2e-5
decay = \"cosine\"
warmup_ratio = 0.1
[preference]
steps = 100
batch_size = 8
grad_accum = 4
weight_decay = 0.05
objective = { type = \"dpo\", beta = 0.05, loss = \"hinge\" }
[preference.schedule]
lr = 5e-7
decay = \"constant\"
[eval]
every = 10
batch_size = 16
[checkpoint]
every = 20
keep_last = 3",
        )?;
        let trl = RunConfig::from_toml(
            "seed = 3
[model.lora]
r = 16
lora_alpha = 32.0
[data]
max_length = 1024
max_prompt_length = 512
[sft]
max_steps = 50
per_device_train_batch_size = 4
gradient_accumulation_steps = 2
weight_decay = 0.01
max_grad_norm = 0.5
[sft.schedule]
learning_rate = 2e-5
lr_scheduler_type = \"cosine\"
warmup_ratio = 0.1
[preference]
max_steps = 100
per_device_train_batch_size = 8
gradient_accumulation_steps = 4
weight_decay = 0.05
objective = { type = \"dpo\", beta = 0.05, loss_type = \"hinge\" }
[preference.schedule]
learning_rate = 5e-7
lr_scheduler_type = \"constant_with_warmup\"
[eval]
eval_steps = 10
per_device_eval_batch_size = 16
[checkpoint]
save_steps = 20
save_total_limit = 3",
        )?;
        assert_eq!(trl, ours);
        assert_ne!(ours, RunConfig::default(), "the values above are not the defaults");
        // Written back with our names.
        let text = toml::to_string(&trl).map_err(|e| TrainError::Config(e.to_string()))?;
        assert!(!text.contains("learning_rate") && !text.contains("save_total_limit"), "{text}");
        Ok(())
    }

    #[test]
    fn trl_names_with_another_meaning_or_place_get_a_hint() {
        for (text, needle) in [
            ("[preference]\nnum_train_epochs = 3", "steps = epochs"),
            ("[preference.schedule]\nwarmup_steps = 10", "warmup_ratio = warmup_steps / steps"),
            ("[preference]\nlearning_rate = 1e-6", "[preference.schedule]"),
            ("learning_rate = 1e-6", "(ours: lr)"),
            ("weight_decay = 0.1", "[sft] or [preference]"),
            ("[preference]\nbeta = 0.1", "objective table"),
            ("[model]\nbf16 = true", "model.dtype"),
            ("[data]\nmax_completion_length = 64", "data.max_length"),
            ("[preference]\nobjective = { type = \"dpo\", loss_type = \"ipo\" }", "type = \"ipo\""),
            ("[preference.schedule]\nlr_scheduler_type = \"polynomial\"", "polynomial"),
        ] {
            let err = RunConfig::from_toml(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: `{err}` should contain `{needle}`");
        }
    }

    #[test]
    fn both_stages_share_one_optimiser_section_with_their_own_defaults() -> Result<()> {
        // `PreferenceSpec`'s deserialiser restores only these two defaults after StageSpec's.
        let mut sft_like = StageSpec::preference_default();
        (sft_like.steps, sft_like.schedule) = (StageSpec::sft_default().steps, StageSpec::sft_default().schedule);
        assert_eq!(sft_like, StageSpec::sft_default());
        let cfg = RunConfig::from_toml("[sft]\nweight_decay = 0.1\n[preference]\nbatch_size = 4\nweight_decay = 0.2")?;
        assert_eq!((cfg.sft.adamw().weight_decay, cfg.preference.adamw().weight_decay), (0.1, 0.2));
        let expected = StageSpec { batch_size: 4, weight_decay: 0.2, ..StageSpec::preference_default() };
        assert_eq!(cfg.preference.stage, expected);
        let trl = RunConfig::from_toml("[preference]\nmax_steps = 7\n[preference.schedule]\nlr = 0.5")?;
        assert_eq!((trl.preference.steps, trl.preference.schedule.lr), (7, 0.5));
        assert_eq!(trl.preference.schedule.decay, Schedule::default().decay, "a given table replaces the default");
        Ok(())
    }

    #[test]
    fn a_config_written_before_the_shared_section_still_loads() -> Result<()> {
        let old = "name = \"run\"\nseed = 0\n\n[sft]\nsteps = 5\nbatch_size = 4\ngrad_accum = 1\n\
                   parallel_micro_batches = 1\nmax_grad_norm = 1.0\nweight_decay = 0.0\n\n[sft.schedule]\n\
                   lr = 0.003\ndecay = \"cosine\"\nwarmup_ratio = 0.05\n\n[preference]\nsteps = 6\n\
                   batch_size = 2\ngrad_accum = 2\nparallel_micro_batches = 1\nmax_grad_norm = 1.0\n\
                   selection = \"uniform\"\n\n[preference.schedule]\nlr = 0.001\ndecay = \"linear\"\n\
                   warmup_ratio = 0.0\n\n[preference.objective]\ntype = \"dpo\"\nbeta = 0.1\n";
        let cfg = RunConfig::from_toml(old)?;
        assert_eq!((cfg.sft.steps, cfg.preference.steps, cfg.preference.grad_accum), (5, 6, 2));
        assert_eq!(cfg.preference.weight_decay, 0.0);
        assert!(cfg.preference.objective.needs_reference());
        Ok(())
    }

    #[test]
    fn checkpoint_section_does_not_change_the_training() -> Result<()> {
        let a = RunConfig::default();
        let b = RunConfig::from_toml("[checkpoint]\nevery = 3\nkeep_last = 5")?;
        assert!(a.same_training(&b) && b.same_training(&a));
        let gc = RunConfig::from_toml("[model]\ngradient_checkpointing = true")?;
        assert!(a.same_training(&gc) && gc.same_training(&a));
        let c = RunConfig::from_toml("seed = 1")?;
        assert!(!a.same_training(&c));
        Ok(())
    }
}
