//! A run: SFT on one split, then a preference objective on the disjoint split, with evaluation
//! of preference accuracy, format validity, chosen log-prob drift (unlearning), rejected-token
//! collapse and, on the embedded task, task quality. The data is the embedded task with a tiny
//! preset model, or a Parquet file with a pretrained model (see [`crate::corpus`]).
//!
//! Files written into the run directory: `config.toml` (the resolved config), `metrics.jsonl`
//! (one line per optimiser step), `eval.jsonl` (one line per evaluation), `model/`
//! (config.json + model.safetensors of the final weights, LoRA adapters merged; after SFT also
//! `sft-model/`; with LoRA also `adapter/`, PEFT's layout) and
//! `result.json` (the final evaluation, for `cargo xtask report`), and `checkpoints/` (see
//! [`crate::checkpoint`]; what a resumed run needs, every `checkpoint.every` steps). With a
//! pretrained model and LoRA, `model/` is not written (the adapters are the result; merge them
//! with `CausalLm::merge_lora`). DPO-style objectives also leave `reference_logps.parquet`
//! (the reference sums, [`slime_data::write_logps`]); Parquet data leaves `data.json` (what
//! the load read, skipped and truncated) and `generations.jsonl` (the final greedy
//! generations, decoded).
//!
//! Resuming ([`RunOptions::resume`]) is exact: the checkpoint holds the trainable weights, the
//! AdamW moments and step, the stage and its step, the data sampler's cursor, the SAGE pool, its
//! weights, the previous margins and the draw RNG, the reference log-probs and the drift
//! baseline, and the lengths of the JSONL logs; everything else is recomputed deterministically
//! from the config. A resumed run therefore writes a bit-identical `model/model.safetensors`
//! and the same metrics as an uninterrupted one (except the wall-clock `tokens_per_second`).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use slime_data::{
    Batch, Cursor, EpochSampler, PairLogps, TextTokenizer, TokenizedPair, collate_pairs, collate_sft, read_logps,
    write_logps,
};
use slime_models::{CausalLm, GemmaConfig, LlamaConfig};
use slime_objectives::{BatchTotals, LossOutput, Objective, ObjectiveInputs, ReferenceLogps, SequenceLogps, SftParams};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{RunConfig, StageSpec, builtin_template};
use crate::corpus::{Example, RunData, repetition};
use crate::metrics_log::MetricsLog;
use crate::model_source::{has_chat_template, tokenizer_dir};
use crate::optim::{AdamW, AdamWConfig, clip_coefficient};
use crate::progress::{Progress, ProgressMode};
use crate::selection::{SelectionKind, draw_weighted};
use crate::task;
use crate::{Result, TrainError};

/// Positions per chunk of the log-prob computation.
const LOGP_CHUNK: usize = 64;

/// The tiny Llama the embedded task trains.
pub fn tiny_llama(hidden: usize, layers: usize) -> LlamaConfig {
    LlamaConfig {
        max_position_embeddings: 128,
        ..LlamaConfig::tiny(task::vocab_size(), hidden, 2 * hidden, layers, 4, 2)
    }
}

/// The tiny Gemma 3 the embedded task trains with `model.preset = "tiny-gemma"`: QK-norm,
/// alternating sliding-window (16 positions) and global layers.
pub fn tiny_gemma(hidden: usize, layers: usize) -> GemmaConfig {
    GemmaConfig {
        max_position_embeddings: 128,
        sliding_window: Some(16),
        ..GemmaConfig::tiny3(task::vocab_size(), hidden, 2 * hidden, layers, 4, 2)
    }
}

struct Tensors {
    ids: Tensor,
    attention: Tensor,
    completion: Tensor,
}

fn to_tensors(batch: &Batch, device: &Device) -> Result<Tensors> {
    let shape = (batch.rows, batch.seq_len);
    Ok(Tensors {
        ids: Tensor::from_slice(&batch.input_ids, shape, device)?,
        attention: Tensor::from_slice(&batch.attention_mask, shape, device)?,
        completion: Tensor::from_slice(&batch.completion_mask, shape, device)?,
    })
}

/// Per-token log-probs of a batch, split into its chosen and rejected halves.
fn pair_logps(lm: &CausalLm, batch: &Batch, device: &Device) -> Result<(SequenceLogps, SequenceLogps)> {
    let t = to_tensors(batch, device)?;
    let logps = lm.model().pair_token_logps(&t.ids, Some(&t.attention), LOGP_CHUNK)?;
    let n = batch.rows / 2;
    Ok((
        SequenceLogps::from_tokens(&logps.narrow(0, 0, n)?, &t.completion.narrow(0, 0, n)?)?,
        SequenceLogps::from_tokens(&logps.narrow(0, n, n)?, &t.completion.narrow(0, n, n)?)?,
    ))
}

/// The device the model's weights are on.
fn device_of(lm: &CausalLm) -> Device {
    match lm.model() {
        slime_models::Model::Llama(m) => m.lm_head().device().clone(),
        slime_models::Model::Gemma(m) => m.lm_head().device().clone(),
    }
}

/// Which stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Supervised fine-tuning on the SFT split.
    Sft,
    /// The preference objective on the preference split.
    Preference,
}

impl Stage {
    /// `sft` or `preference` (as in `metrics.jsonl`).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Sft => "sft",
            Stage::Preference => "preference",
        }
    }
}

/// A fault injected on purpose, to test the non-finite handling end to end (the command line
/// reads it from `SLIME_TRAINER_INJECT_FAULT=STAGE:STEP:TARGET`, e.g. `preference:3:logps`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The stage.
    pub stage: Stage,
    /// The optimiser step of that stage (1-based).
    pub step: u64,
    /// What is poisoned.
    pub target: FaultTarget,
}

/// What an injected [`Fault`] poisons.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTarget {
    /// The policy's chosen-side per-token log-probs of the step's first micro-batch become NaN
    /// (every loss term that reads them becomes NaN).
    Logps,
    /// The accumulated gradient of the first trainable weight becomes NaN (the loss stays finite).
    Gradient,
}

impl std::str::FromStr for Fault {
    type Err = TrainError;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || TrainError::Config(format!("fault `{text}`: expected STAGE:STEP:TARGET, e.g. preference:3:logps"));
        let parts: Vec<&str> = text.split(':').collect();
        let [stage, step, target] = parts.as_slice() else { return Err(bad()) };
        let stage = match *stage {
            "sft" => Stage::Sft,
            "preference" => Stage::Preference,
            _ => return Err(bad()),
        };
        let step = step.parse().map_err(|_| bad())?;
        let target = match *target {
            "logps" => FaultTarget::Logps,
            "gradient" => FaultTarget::Gradient,
            _ => return Err(bad()),
        };
        Ok(Self { stage, step, target })
    }
}

/// How a run is carried out, apart from its config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's latest checkpoint. A finished run (`result.json`
    /// present) is left as it is; a run directory without a checkpoint starts fresh.
    pub resume: bool,
    /// Progress display on stderr (the library default: none).
    pub progress: ProgressMode,
    /// Test hook: sleep this long after every optimiser step (the command line reads
    /// `SLIME_TRAINER_STEP_DELAY_MS`), so a test can interrupt a tiny run reliably.
    #[doc(hidden)]
    pub step_delay: Duration,
    /// Test hook: an injected non-finite value.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// The final evaluation (as in `result.json`).
    pub final_eval: BTreeMap<String, f64>,
    /// The checkpoint the run continued from (e.g. `step-000040`), if it resumed.
    pub resumed_from: Option<String>,
    /// True when `resume` found the run finished and did nothing.
    pub already_finished: bool,
}

/// What a checkpoint's `state.json` holds besides the weights and the optimiser moments.
/// Floats are stored as their IEEE-754 bit patterns so they round-trip exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainState {
    /// Layout version of this struct.
    format: u32,
    /// The stage the checkpoint was written in.
    stage: Stage,
    /// Optimiser steps done in that stage (also AdamW's step count).
    step: u64,
    /// The stage's data sampler.
    cursor: Cursor,
    /// Lengths of `metrics.jsonl` and `eval.jsonl` when the checkpoint was written; a resumed
    /// run cuts them back to these, dropping lines of steps it will redo.
    metrics_bytes: u64,
    eval_bytes: u64,
    /// Preference-stage state.
    preference: Option<PreferenceState>,
}

const STATE_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferenceState {
    /// Held-out chosen log-prob at the start of the stage (the drift baseline), f64 bits.
    start_chosen_logp: u64,
    /// Reference sums `(pair id, S_w bits, S_l bits)`, sorted by id; absent for
    /// reference-free objectives.
    reference: Option<Vec<(u64, u64, u64)>>,
    /// The SAGE draw RNG.
    rng: RngState,
    /// SAGE: the current pool (indices into the preference split) and its weights (bits).
    pool: Vec<usize>,
    pool_weights: Vec<u64>,
    /// SAGE: margins at the previous refresh, `(pair id, bits)`, sorted by id.
    previous: Vec<(u64, u64)>,
}

/// A ChaCha8 generator's exact position.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RngState {
    seed: Vec<u8>,
    stream: u64,
    /// `u128` word position, as a decimal string (JSON numbers stop at 64 bits).
    word_pos: String,
}

impl RngState {
    fn of(rng: &ChaCha8Rng) -> Self {
        Self { seed: rng.get_seed().to_vec(), stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
    }

    fn restore(&self) -> Result<ChaCha8Rng> {
        let seed: [u8; 32] = self
            .seed
            .as_slice()
            .try_into()
            .map_err(|_| TrainError::Checkpoint("rng.seed: expected 32 bytes".into()))?;
        let pos: u128 = self.word_pos.parse().map_err(|_| TrainError::Checkpoint("rng.word_pos: not a u128".into()))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// Metrics that are loss terms although not named `{objective}/...`.
const LOSS_TERMS: [&str; 3] = ["nll_loss", "log_odds_ratio", "log_odds_chosen"];

/// Stops the run on a non-finite metric of a (micro-)batch, naming the step and the quantity:
/// the objective's loss terms are checked first, then `loss`, then the other metrics.
fn check_metrics(stage: Stage, step: u64, objective: &str, metrics: &slime_objectives::Metrics) -> Result<()> {
    let prefix = format!("{objective}/");
    let is_term = |name: &str| name.starts_with(&prefix) || LOSS_TERMS.contains(&name);
    let terms = metrics.iter().filter(|(n, _)| is_term(n));
    let loss = metrics.iter().filter(|(n, _)| *n == "loss");
    let others = metrics.iter().filter(|(n, _)| !is_term(n) && *n != "loss");
    for (name, value) in terms.chain(loss).chain(others) {
        if !value.is_finite() {
            let what = if name == "loss" {
                format!("{} loss", stage.name())
            } else if is_term(name) {
                format!("{} loss term `{name}`", stage.name())
            } else {
                format!("{} metric `{name}`", stage.name())
            };
            return Err(TrainError::NonFinite { step, what, value });
        }
    }
    Ok(())
}

/// Stops the run when a trainable weight is not finite (before a checkpoint is written, so the
/// last checkpoint on disk always holds finite weights).
fn ensure_weights_finite(lm: &CausalLm, stage: Stage, step: u64) -> Result<()> {
    for (name, var) in lm.trainable_vars() {
        let probe = var.as_tensor().to_dtype(DType::F64)?.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f64>()?;
        if !probe.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                what: format!("{} weight `{name}` after the update", stage.name()),
                value: probe,
            });
        }
    }
    Ok(())
}

fn record(
    log: &mut MetricsLog,
    stage: Stage,
    step: u64,
    metrics: &BTreeMap<String, f64>,
    extra: &[(&str, f64)],
) -> Result<()> {
    let mut values = metrics.clone();
    for &(k, v) in extra {
        values.insert(k.into(), v);
    }
    log.write(stage.name(), step, &values)
}

/// The result of one optimiser step.
struct StepOutcome {
    /// Metrics of the whole optimiser batch: micro-batch metrics averaged, weighted by pairs.
    metrics: BTreeMap<String, f64>,
    /// Global gradient norm before clipping.
    grad_norm: f64,
    /// Real tokens processed.
    tokens: usize,
}

/// Everything one optimiser step needs besides the loss function.
struct StepSpec<'a> {
    stage: Stage,
    step: u64,
    lr: f64,
    max_grad_norm: Option<f64>,
    objective: &'a str,
    fault: Option<FaultTarget>,
    /// Micro-batches run at once (`parallel_micro_batches`).
    parallel: usize,
}

/// Full-batch sizes of `batches` (SFT: one row per sequence; preference: chosen rows then
/// rejected rows).
fn batch_totals(batches: &[Batch], stage: Stage) -> BatchTotals {
    let (mut pairs, mut chosen, mut rejected) = (0usize, 0u64, 0u64);
    for b in batches {
        let lens = &b.completion_lens;
        match stage {
            Stage::Sft => {
                pairs += b.rows;
                chosen += lens.iter().map(|&l| u64::from(l)).sum::<u64>();
            }
            Stage::Preference => {
                let n = b.rows / 2;
                pairs += n;
                chosen += lens[..n].iter().map(|&l| u64::from(l)).sum::<u64>();
                rejected += lens[n..].iter().map(|&l| u64::from(l)).sum::<u64>();
            }
        }
    }
    BatchTotals { pairs, chosen_tokens: chosen as f64, rejected_tokens: rejected as f64 }
}

/// One optimiser step over `batches` (the micro-batches of one optimiser batch): per
/// micro-batch the forward pass and loss (normalised by the full batch's [`BatchTotals`]) and
/// a backward pass, `spec.parallel` micro-batches at a time on rayon's pool; the gradients are
/// summed in micro-batch order (the same bits however many run at once), checked, clipped, and
/// AdamW steps once.
fn accumulated_step(
    lm: &CausalLm,
    opt: &mut AdamW,
    batches: &[Batch],
    spec: &StepSpec<'_>,
    loss_of: impl Fn(&Batch, BatchTotals, bool) -> Result<LossOutput> + Sync,
) -> Result<StepOutcome> {
    let totals = batch_totals(batches, spec.stage);
    let forward_backward = |i: usize, batch: &Batch| -> Result<(LossOutput, GradStore)> {
        let poison = spec.fault == Some(FaultTarget::Logps) && i == 0;
        let out = loss_of(batch, totals, poison)?;
        check_metrics(spec.stage, spec.step, spec.objective, &out.metrics)?;
        let grads = out.loss.backward()?;
        Ok((out, grads))
    };
    let mut grads = None;
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let (mut weight, mut tokens) = (0.0, 0usize);
    let mut single = None;
    let parallel = spec.parallel.max(1);
    for (group_index, group) in batches.chunks(parallel).enumerate() {
        let first = group_index * parallel;
        let outcomes: Vec<Result<(LossOutput, GradStore)>> = if group.len() == 1 {
            vec![forward_backward(first, &group[0])]
        } else {
            group.par_iter().enumerate().map(|(j, batch)| forward_backward(first + j, batch)).collect()
        };
        for (j, (batch, outcome)) in group.iter().zip(outcomes).enumerate() {
            let (out, g) = outcome?;
            match &mut grads {
                None => grads = Some(g),
                Some(acc) => opt.accumulate(acc, &g)?,
            }
            let pairs = match spec.stage {
                Stage::Sft => batch.rows,
                Stage::Preference => batch.rows / 2,
            } as f64;
            for (name, value) in out.metrics.iter() {
                *sums.entry(name.to_string()).or_default() += value * pairs;
            }
            weight += pairs;
            tokens += batch.real_tokens();
            if first + j == 0 {
                single = Some(out.metrics.iter().map(|(k, v)| (k.to_string(), v)).collect());
            }
        }
    }
    let mut grads =
        grads.ok_or_else(|| TrainError::Config(format!("{} step {}: empty batch", spec.stage.name(), spec.step)))?;
    if spec.fault == Some(FaultTarget::Gradient)
        && let Some((_, var)) = lm.trainable_vars().first()
    {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        grads.insert(var.as_tensor(), g.affine(1.0, f64::NAN)?);
    }
    let grad_norm = opt.grad_norm(&grads)?;
    if !grad_norm.is_finite() {
        let name = opt.non_finite_grad(&grads)?.unwrap_or_else(|| "?".into());
        return Err(TrainError::NonFinite {
            step: spec.step,
            what: format!("{} gradient of `{name}`", spec.stage.name()),
            value: grad_norm,
        });
    }
    opt.step(&grads, spec.lr, clip_coefficient(grad_norm, spec.max_grad_norm))?;
    let metrics = match single {
        // One micro-batch: its metrics as they are (no rounding through the weighted mean).
        Some(m) if batches.len() == 1 => m,
        _ => sums.into_iter().map(|(k, v)| (k, v / weight)).collect(),
    };
    Ok(StepOutcome { metrics, grad_norm, tokens })
}

/// The shared state of a run's stages.
struct Ctx<'a> {
    cfg: &'a RunConfig,
    run_dir: &'a Path,
    opts: &'a RunOptions,
    log: MetricsLog,
    eval_log: MetricsLog,
    /// SFT steps this run takes (0 with `init`): the offset of preference checkpoints' numbers.
    sft_steps: u64,
    /// The greedy generations of the latest evaluation.
    generations: Vec<Vec<u32>>,
}

impl Ctx<'_> {
    /// [`evaluate`], keeping the generations.
    fn evaluate(&mut self, lm: &CausalLm, data: &RunData) -> Result<BTreeMap<String, f64>> {
        let (metrics, generations) = evaluate_with_generations(lm, data, self.cfg)?;
        self.generations = generations;
        Ok(metrics)
    }

    fn checkpoint_due(&self, step: u64) -> bool {
        self.cfg.checkpoint.every > 0 && step.is_multiple_of(self.cfg.checkpoint.every)
    }

    /// Writes the checkpoint of `stage` after `step`, then prunes old ones.
    fn checkpoint(
        &self,
        lm: &CausalLm,
        stage: Stage,
        step: u64,
        opt: &AdamW,
        cursor: Cursor,
        preference: Option<PreferenceState>,
    ) -> Result<()> {
        ensure_weights_finite(lm, stage, step)?;
        let weights: HashMap<String, Tensor> =
            lm.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let (optimizer, opt_step) = opt.state_tensors()?;
        debug_assert_eq!(opt_step, step);
        let state = TrainState {
            format: STATE_FORMAT,
            stage,
            step,
            cursor,
            metrics_bytes: self.log.len_bytes()?,
            eval_bytes: self.eval_log.len_bytes()?,
            preference,
        };
        let state = serde_json::to_value(&state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        let global = step + if stage == Stage::Preference { self.sft_steps } else { 0 };
        checkpoint::save(self.run_dir, global, &Checkpoint { weights, optimizer, state })?;
        checkpoint::prune(self.run_dir, self.cfg.checkpoint.keep_last)?;
        Ok(())
    }

    fn pause(&self) {
        if !self.opts.step_delay.is_zero() {
            std::thread::sleep(self.opts.step_delay);
        }
    }

    fn fault(&self, stage: Stage, step: u64) -> Option<FaultTarget> {
        self.opts.fault.filter(|f| f.stage == stage && f.step == step).map(|f| f.target)
    }
}

/// Sets the trainable weights from a checkpoint (every one must be present, with its shape).
fn restore_weights(lm: &CausalLm, weights: &HashMap<String, Tensor>) -> Result<()> {
    for (name, var) in lm.trainable_vars() {
        let t = weights
            .get(&name)
            .ok_or_else(|| TrainError::Checkpoint(format!("checkpoint lacks the weight `{name}`")))?;
        if t.shape() != var.shape() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint weight `{name}` has shape {:?}, the model has {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// A resumed stage: its state and the checkpoint's tensors.
type Resume = (TrainState, Checkpoint);

/// The micro-batches of one optimiser batch.
fn micro_batches(
    picked: &[usize],
    batch_size: usize,
    data: &[Example],
    collate: fn(&[&TokenizedPair], u32) -> Batch,
    pad_id: u32,
) -> Vec<Batch> {
    picked
        .chunks(batch_size)
        .map(|chunk| {
            let refs: Vec<&TokenizedPair> = chunk.iter().map(|&i| &data[i].tokens).collect();
            collate(&refs, pad_id)
        })
        .collect()
}

/// The SFT stage: NLL on prompt + chosen of the SFT split.
fn sft_stage(ctx: &mut Ctx<'_>, lm: &CausalLm, data: &RunData, resume: Option<Resume>) -> Result<()> {
    let (pad_id, data) = (data.pad_id, &data.sft);
    let device = device_of(lm);
    let spec: &StageSpec = &ctx.cfg.sft;
    let cfg = AdamWConfig { weight_decay: spec.weight_decay, ..AdamWConfig::default() };
    let mut opt = AdamW::new(lm.trainable_vars(), cfg)?;
    let (mut first, mut cursor) = (0, Cursor::default());
    if let Some((state, ckpt)) = resume {
        restore_weights(lm, &ckpt.weights)?;
        opt.load_state_tensors(&ckpt.optimizer, state.step)?;
        (first, cursor) = (state.step, state.cursor);
    }
    let mut sampler = EpochSampler::new(data.len(), ctx.cfg.seed, cursor);
    let objective = Objective::Sft(SftParams::nll());
    let mut progress = Progress::new(ctx.opts.progress, "sft", first, spec.steps);
    for step in first..spec.steps {
        let started = Instant::now();
        let picked = sampler.next_batch(spec.batch_size * spec.grad_accum);
        let batches = micro_batches(&picked, spec.batch_size, data, collate_sft, pad_id);
        let lr = spec.schedule.lr_at(step, spec.steps);
        let step_spec = StepSpec {
            stage: Stage::Sft,
            step: step + 1,
            lr,
            max_grad_norm: spec.max_grad_norm,
            objective: objective.name(),
            fault: ctx.fault(Stage::Sft, step + 1),
            parallel: spec.parallel_micro_batches,
        };
        let out = accumulated_step(lm, &mut opt, &batches, &step_spec, |batch, totals, poison| {
            let t = to_tensors(batch, &device)?;
            let mut logps = lm.model().token_logps(&t.ids, Some(&t.attention), LOGP_CHUNK)?;
            if poison {
                logps = logps.affine(1.0, f64::NAN)?;
            }
            let inputs = ObjectiveInputs::supervised(SequenceLogps::from_tokens(&logps, &t.completion)?);
            Ok(objective.compute(&inputs.with_batch_totals(totals))?)
        })?;
        let tps = out.tokens as f64 / started.elapsed().as_secs_f64();
        record(
            &mut ctx.log,
            Stage::Sft,
            step + 1,
            &out.metrics,
            &[("learning_rate", lr), ("grad_norm", out.grad_norm), ("tokens_per_second", tps)],
        )?;
        progress.step(step + 1, out.metrics.get("loss").copied().unwrap_or(f64::NAN));
        if ctx.checkpoint_due(step + 1) {
            ctx.checkpoint(lm, Stage::Sft, step + 1, &opt, sampler.cursor(), None)?;
        }
        ctx.pause();
    }
    progress.finish();
    Ok(())
}

/// Evaluation on held-out pairs (log-probs) and prompts (greedy generations): preference
/// accuracy (mean chosen token log-prob above the rejected one), mean chosen and rejected
/// log-probs, the collapse fraction, format validity and, on the embedded task, task accuracy;
/// on Parquet data, the repetition of the generations ([`repetition`]).
pub fn evaluate(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<BTreeMap<String, f64>> {
    Ok(evaluate_with_generations(lm, data, cfg)?.0)
}

/// An evaluation's metrics and its greedy generations (the new tokens of each prompt).
type Evaluation = (BTreeMap<String, f64>, Vec<Vec<u32>>);

/// [`evaluate`], also returning the greedy generations.
fn evaluate_with_generations(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<Evaluation> {
    let device = device_of(lm);
    let (mut correct_pref, mut chosen_sum, mut rejected_sum, mut n) = (0usize, 0.0, 0.0, 0usize);
    let (mut collapsed, mut rejected_tokens) = (0.0, 0.0);
    for chunk in data.eval.chunks(cfg.eval.batch_size) {
        let refs: Vec<&TokenizedPair> = chunk.iter().map(|e| &e.tokens).collect();
        let batch = collate_pairs(&refs, data.pad_id);
        let (chosen, rejected) = pair_logps(lm, &batch, &device)?;
        let a_w: Vec<f32> = chosen.mean("chosen")?.detach().to_dtype(DType::F32)?.to_vec1()?;
        let a_l: Vec<f32> = rejected.mean("rejected")?.detach().to_dtype(DType::F32)?.to_vec1()?;
        correct_pref += a_w.iter().zip(&a_l).filter(|(w, l)| w > l).count();
        chosen_sum += a_w.iter().map(|&v| f64::from(v)).sum::<f64>();
        rejected_sum += a_l.iter().map(|&v| f64::from(v)).sum::<f64>();
        n += a_w.len();
        if let Some(tokens) = rejected.tokens() {
            collapsed += tokens.fraction_below(cfg.eval.collapse_delta)? * tokens.total_count();
            rejected_tokens += tokens.total_count();
        }
    }
    let mut out = BTreeMap::new();
    out.insert("eval/preference_accuracy".into(), correct_pref as f64 / n as f64);
    out.insert("eval/chosen_logp".into(), chosen_sum / n as f64);
    out.insert("eval/rejected_logp".into(), rejected_sum / n as f64);
    out.insert("eval/collapse_fraction".into(), collapsed / rejected_tokens.max(1.0));
    let (mut valid, mut correct, mut repeated) = (0usize, 0usize, 0.0);
    let mut generations = Vec::new();
    let prompts: Vec<&Example> = data.eval.iter().take(cfg.eval.generations).collect();
    for example in &prompts {
        let completion = lm.model().generate_greedy(&example.tokens.prompt, cfg.eval.max_new_tokens, &data.stop)?;
        match &example.task {
            Some(pair) => {
                let verdict = task::check(pair, &completion);
                valid += usize::from(verdict.format_valid);
                correct += usize::from(verdict.correct);
            }
            None => {
                // Well formed: some content, then the end-of-turn (or EOS) token.
                let ended = completion.last().is_some_and(|t| data.stop.contains(t));
                valid += usize::from(ended && completion.len() > 1);
                repeated += repetition(&completion);
            }
        }
        generations.push(completion);
    }
    let shown = prompts.len().max(1) as f64;
    out.insert("eval/format_validity".into(), valid as f64 / shown);
    if data.eval.first().is_some_and(|e| e.task.is_some()) {
        out.insert("eval/task_accuracy".into(), correct as f64 / shown);
    } else {
        out.insert("eval/repetition".into(), repeated / shown);
    }
    Ok((out, generations))
}

/// Reference sums `(S_w, S_l)` of `pairs` under the model as it is (the caller switches LoRA
/// adapters off), so no second model is kept in memory.
fn reference_sums(lm: &CausalLm, pairs: &[&TokenizedPair], pad_id: u32, batch_size: usize) -> Result<Vec<PairLogps>> {
    let mut out = Vec::with_capacity(pairs.len());
    for refs in pairs.chunks(batch_size) {
        let batch = collate_pairs(refs, pad_id);
        let (c, r) = pair_logps(lm, &batch, &device_of(lm))?;
        let cs: Vec<f64> = c.sum().detach().to_dtype(DType::F64)?.to_vec1()?;
        let rs: Vec<f64> = r.sum().detach().to_dtype(DType::F64)?.to_vec1()?;
        for (i, t) in refs.iter().enumerate() {
            out.push(PairLogps {
                pair: t.id,
                chosen_logp: cs[i],
                rejected_logp: rs[i],
                chosen_tokens: t.chosen.len() as u32,
                rejected_tokens: t.rejected.len() as u32,
            });
        }
    }
    Ok(out)
}

/// Where a run's reference log-probs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReferenceSource {
    /// `preference.reference_logps`, read before the stage.
    File,
    /// Computed for the whole split from the starting model before the stage (full
    /// fine-tuning: the weights change, so it cannot wait).
    Eager,
    /// With LoRA: computed for each pair when a batch first draws it, with the adapters off
    /// (which is exactly the starting model, at any step), as TRL does with a PEFT model.
    OnDemand,
}

impl ReferenceSource {
    fn of(cfg: &RunConfig) -> Self {
        match (&cfg.preference.reference_logps, &cfg.model.lora) {
            (Some(_), _) => Self::File,
            (None, Some(_)) => Self::OnDemand,
            (None, None) => Self::Eager,
        }
    }
}

/// Adds the reference sums of `pairs` missing from `reference`, computed with the adapters off.
fn fill_reference(
    lm: &CausalLm,
    pairs: &[&TokenizedPair],
    reference: &mut HashMap<u64, (f64, f64)>,
    pad_id: u32,
    batch_size: usize,
) -> Result<()> {
    let mut missing: Vec<&TokenizedPair> = pairs.iter().copied().filter(|t| !reference.contains_key(&t.id)).collect();
    missing.sort_by_key(|t| t.id);
    missing.dedup_by_key(|t| t.id);
    if missing.is_empty() {
        return Ok(());
    }
    lm.set_adapters_enabled(false);
    let rows = reference_sums(lm, &missing, pad_id, batch_size);
    lm.set_adapters_enabled(true);
    for r in rows? {
        reference.insert(r.pair, (r.chosen_logp, r.rejected_logp));
    }
    Ok(())
}

/// Writes the reference sums a run computed to `reference_logps.parquet` (sorted by pair).
fn write_reference_cache(run_dir: &Path, data: &RunData, reference: &HashMap<u64, (f64, f64)>) -> Result<()> {
    let mut rows: Vec<PairLogps> = data
        .preference
        .iter()
        .filter_map(|e| {
            let t = &e.tokens;
            reference.get(&t.id).map(|&(c, r)| PairLogps {
                pair: t.id,
                chosen_logp: c,
                rejected_logp: r,
                chosen_tokens: t.chosen.len() as u32,
                rejected_tokens: t.rejected.len() as u32,
            })
        })
        .collect();
    rows.sort_by_key(|r| r.pair);
    Ok(write_logps(run_dir.join("reference_logps.parquet"), &rows)?)
}

/// The reference sums of the preference split by pair id, before the stage: read from
/// `preference.reference_logps` (every pair must be there, with the same token counts),
/// computed from the starting model, or none yet ([`ReferenceSource::OnDemand`]).
fn reference_logps(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<HashMap<u64, (f64, f64)>> {
    let rows = match &cfg.preference.reference_logps {
        Some(path) => {
            let rows = read_logps(path)?;
            let by_id: HashMap<u64, &PairLogps> = rows.iter().map(|r| (r.pair, r)).collect();
            for e in &data.preference {
                let t = &e.tokens;
                let Some(r) = by_id.get(&t.id) else {
                    return Err(TrainError::Config(format!(
                        "{}: no reference log-probs for pair {} (row {} of the data); compute them with \
                         `slime-trainer logps` on the same data file",
                        path.display(),
                        t.id,
                        t.id
                    )));
                };
                if (r.chosen_tokens as usize, r.rejected_tokens as usize) != (t.chosen.len(), t.rejected.len()) {
                    return Err(TrainError::Config(format!(
                        "{}: pair {} has {}/{} chosen/rejected tokens there but {}/{} here; the file was scored \
                         with another tokenizer, template or max_length",
                        path.display(),
                        t.id,
                        r.chosen_tokens,
                        r.rejected_tokens,
                        t.chosen.len(),
                        t.rejected.len()
                    )));
                }
            }
            rows
        }
        None if ReferenceSource::of(cfg) == ReferenceSource::OnDemand => Vec::new(),
        None => {
            let all: Vec<&TokenizedPair> = data.preference.iter().map(|e| &e.tokens).collect();
            reference_sums(lm, &all, data.pad_id, cfg.eval.batch_size)?
        }
    };
    Ok(rows.into_iter().map(|r| (r.pair, (r.chosen_logp, r.rejected_logp))).collect())
}

/// Reference-free margins `A_w - A_l` of `pairs` under the current policy (SAGE re-scoring).
fn margins(lm: &CausalLm, pairs: &[&TokenizedPair], pad_id: u32, batch_size: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size) {
        let (c, r) = pair_logps(lm, &collate_pairs(chunk, pad_id), &device_of(lm))?;
        let d = (c.mean("chosen")? - r.mean("rejected")?)?.detach().to_dtype(DType::F64)?;
        out.extend(d.to_vec1::<f64>()?);
    }
    Ok(out)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    fs::write(path, text).map_err(|source| TrainError::Io { path: path.display().to_string(), source })
}

/// The preference stage (with its start evaluation when not resuming); returns the final
/// evaluation.
fn preference_stage(
    ctx: &mut Ctx<'_>,
    lm: &CausalLm,
    data: &RunData,
    resume: Option<Resume>,
) -> Result<BTreeMap<String, f64>> {
    let device = device_of(lm);
    let cfg = ctx.cfg;
    let spec = &cfg.preference;
    let objective = &spec.objective;
    let mut opt = AdamW::new(lm.trainable_vars(), AdamWConfig::default())?;
    let mut first = 0;
    let mut cursor = Cursor::default();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5A6E);
    let mut pool: Vec<usize> = Vec::new();
    let mut pool_weights: Vec<f64> = Vec::new();
    let mut previous: HashMap<u64, f64> = HashMap::new();
    let mut final_eval = None;
    let start_chosen;
    let mut reference: Option<HashMap<u64, (f64, f64)>>;
    match resume {
        None => {
            let start = ctx.evaluate(lm, data)?;
            start_chosen = start["eval/chosen_logp"];
            let mut start = start;
            start.insert("eval/chosen_logp_drift".into(), 0.0);
            ctx.eval_log.write("preference", 0, &start)?;
            final_eval = Some(start);
            reference = if spec.steps > 0 && objective.needs_reference() {
                Some(reference_logps(lm, data, cfg)?)
            } else {
                None
            };
        }
        Some((state, ckpt)) => {
            let p = state
                .preference
                .ok_or_else(|| TrainError::Checkpoint("preference checkpoint without its preference state".into()))?;
            restore_weights(lm, &ckpt.weights)?;
            opt.load_state_tensors(&ckpt.optimizer, state.step)?;
            (first, cursor) = (state.step, state.cursor);
            start_chosen = f64::from_bits(p.start_chosen_logp);
            reference = p
                .reference
                .map(|r| r.into_iter().map(|(id, c, r)| (id, (f64::from_bits(c), f64::from_bits(r)))).collect());
            if objective.needs_reference() && reference.is_none() {
                return Err(TrainError::Checkpoint("checkpoint lacks the reference log-probs".into()));
            }
            rng = p.rng.restore()?;
            pool = p.pool;
            pool_weights = p.pool_weights.into_iter().map(f64::from_bits).collect();
            previous = p.previous.into_iter().map(|(id, b)| (id, f64::from_bits(b))).collect();
        }
    }
    let with_drift = |mut m: BTreeMap<String, f64>| {
        let drift = m["eval/chosen_logp"] - start_chosen;
        m.insert("eval/chosen_logp_drift".into(), drift);
        m
    };
    let mut sampler = EpochSampler::new(data.preference.len(), cfg.seed ^ 0xBEEF, cursor);
    let mut progress = Progress::new(ctx.opts.progress, "preference", first, spec.steps);
    let total = spec.batch_size * spec.grad_accum;
    for step in first..spec.steps {
        let started = Instant::now();
        let mut uniform_fill = 0usize;
        let picked: Vec<usize> = match spec.selection {
            SelectionKind::Uniform => sampler.next_batch(total),
            SelectionKind::Sage => {
                if step % spec.sage.refresh_every == 0 {
                    pool = sampler.next_batch(spec.sage.pool_size.min(data.preference.len()));
                    let toks: Vec<&TokenizedPair> = pool.iter().map(|&i| &data.preference[i].tokens).collect();
                    let m = margins(lm, &toks, data.pad_id, cfg.eval.batch_size)?;
                    let prev: Vec<Option<f64>> = toks.iter().map(|t| previous.get(&t.id).copied()).collect();
                    pool_weights = spec.sage.scores(&m, &prev);
                    for (t, v) in toks.iter().zip(m) {
                        previous.insert(t.id, v);
                    }
                }
                let (chosen, uniform) = draw_weighted(&pool_weights, total, &mut rng);
                uniform_fill = uniform;
                chosen.into_iter().map(|i| pool[i]).collect()
            }
        };
        if let Some(reference) = &mut reference
            && ReferenceSource::of(cfg) == ReferenceSource::OnDemand
        {
            let toks: Vec<&TokenizedPair> = picked.iter().map(|&i| &data.preference[i].tokens).collect();
            fill_reference(lm, &toks, reference, data.pad_id, cfg.eval.batch_size)?;
        }
        let batches = micro_batches(&picked, spec.batch_size, &data.preference, collate_pairs, data.pad_id);
        let lr = spec.schedule.lr_at(step, spec.steps);
        let step_spec = StepSpec {
            stage: Stage::Preference,
            step: step + 1,
            lr,
            max_grad_norm: spec.max_grad_norm,
            objective: objective.name(),
            fault: ctx.fault(Stage::Preference, step + 1),
            parallel: spec.parallel_micro_batches,
        };
        let out = accumulated_step(lm, &mut opt, &batches, &step_spec, |batch, totals, poison| {
            let (mut chosen, rejected) = pair_logps(lm, batch, &device)?;
            if poison {
                let tokens = chosen.tokens().ok_or_else(|| TrainError::Config("no per-token log-probs".into()))?;
                let nan = tokens.logps().affine(1.0, f64::NAN)?;
                chosen = SequenceLogps::from_tokens(&nan, tokens.mask())?;
            }
            let mut inputs = ObjectiveInputs::preference(chosen, rejected)
                .with_collapse_delta(cfg.eval.collapse_delta)
                .with_batch_totals(totals);
            if let Some(reference) = &reference {
                let (c, r): (Vec<f64>, Vec<f64>) = batch.pair_ids.iter().map(|id| reference[id]).unzip();
                inputs =
                    inputs.with_reference(ReferenceLogps::new(&Tensor::new(c, &device)?, &Tensor::new(r, &device)?)?);
            }
            Ok(objective.compute(&inputs)?)
        })?;
        let tps = out.tokens as f64 / started.elapsed().as_secs_f64();
        record(
            &mut ctx.log,
            Stage::Preference,
            step + 1,
            &out.metrics,
            &[
                ("learning_rate", lr),
                ("grad_norm", out.grad_norm),
                ("tokens_per_second", tps),
                ("selection/uniform_fill", uniform_fill as f64),
            ],
        )?;
        progress.step(step + 1, out.metrics.get("loss").copied().unwrap_or(f64::NAN));
        if (step + 1) % cfg.eval.every == 0 || step + 1 == spec.steps {
            let e = with_drift(ctx.evaluate(lm, data)?);
            ctx.eval_log.write("preference", step + 1, &e)?;
            final_eval = Some(e);
        }
        if ctx.checkpoint_due(step + 1) {
            let mut reference_bits: Option<Vec<(u64, u64, u64)>> =
                reference.as_ref().map(|r| r.iter().map(|(&id, &(c, r))| (id, c.to_bits(), r.to_bits())).collect());
            if let Some(r) = &mut reference_bits {
                r.sort_unstable();
            }
            let mut previous_bits: Vec<(u64, u64)> = previous.iter().map(|(&id, &m)| (id, m.to_bits())).collect();
            previous_bits.sort_unstable();
            let state = PreferenceState {
                start_chosen_logp: start_chosen.to_bits(),
                reference: reference_bits,
                rng: RngState::of(&rng),
                pool: pool.clone(),
                pool_weights: pool_weights.iter().map(|w| w.to_bits()).collect(),
                previous: previous_bits,
            };
            ctx.checkpoint(lm, Stage::Preference, step + 1, &opt, sampler.cursor(), Some(state))?;
        }
        ctx.pause();
    }
    progress.finish();
    if let Some(reference) = &reference
        && ReferenceSource::of(cfg) != ReferenceSource::File
    {
        write_reference_cache(ctx.run_dir, data, reference)?;
    }
    match final_eval {
        Some(e) => Ok(e),
        // Resumed from the checkpoint of the last step: its evaluation is in eval.jsonl already;
        // the same weights give the same numbers.
        None => Ok(with_drift(ctx.evaluate(lm, data)?)),
    }
}

/// Runs `cfg` into `run_dir` from scratch and returns the final evaluation (see [`run_with`]).
pub fn run(cfg: &RunConfig, run_dir: &Path) -> Result<BTreeMap<String, f64>> {
    Ok(run_with(cfg, run_dir, &RunOptions::default())?.final_eval)
}

/// Prints a status line when progress is shown.
fn note(opts: &RunOptions, text: &str) {
    if opts.progress != ProgressMode::Off {
        eprintln!("{text}");
    }
}

/// Runs `cfg` into `run_dir`: SFT (unless `init` is set), then the preference stage, writing
/// checkpoints every `checkpoint.every` steps of each stage. With `opts.resume`, continues from
/// the latest checkpoint and ends with exactly the weights, metrics and evaluations an
/// uninterrupted run would have (except the wall-clock `tokens_per_second`). Without it, any
/// earlier logs, checkpoints and result in `run_dir` are discarded.
pub fn run_with(cfg: &RunConfig, run_dir: &Path, opts: &RunOptions) -> Result<RunReport> {
    cfg.validate()?;
    let device = crate::model_source::parse_device(&cfg.model.device)?;
    let io = |source| TrainError::Io { path: run_dir.display().to_string(), source };
    fs::create_dir_all(run_dir).map_err(io)?;
    let result_path = run_dir.join("result.json");
    let config_path = run_dir.join("config.toml");
    let mut resume: Option<(String, Resume)> = None;
    if opts.resume {
        if result_path.is_file() {
            let text = fs::read_to_string(&result_path).map_err(io)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", result_path.display())))?;
            let final_eval = serde_json::from_value(value["final"].clone())
                .map_err(|e| TrainError::Checkpoint(format!("{}: `final`: {e}", result_path.display())))?;
            note(opts, &format!("{}: the run already finished (result.json exists); nothing to do", run_dir.display()));
            return Ok(RunReport { final_eval, resumed_from: None, already_finished: true });
        }
        match checkpoint::load_latest(run_dir, &device)? {
            Some((dir, ckpt)) => {
                if config_path.is_file() {
                    let text = fs::read_to_string(&config_path).map_err(io)?;
                    let saved = RunConfig::from_toml(&text)?;
                    if !saved.same_training(cfg) {
                        return Err(TrainError::Config(format!(
                            "--resume: the config differs from the one the run started with ({}); only [checkpoint] may change",
                            config_path.display()
                        )));
                    }
                }
                let state: TrainState = serde_json::from_value(ckpt.state.clone())
                    .map_err(|e| TrainError::Checkpoint(format!("{}/state.json: {e}", dir.display())))?;
                if state.format != STATE_FORMAT {
                    return Err(TrainError::Checkpoint(format!(
                        "{}/state.json: format {} (this trainer writes {STATE_FORMAT})",
                        dir.display(),
                        state.format
                    )));
                }
                let name = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                note(opts, &format!("resuming from checkpoint {name}: {} step {}", state.stage.name(), state.step));
                resume = Some((name, (state, ckpt)));
            }
            None => note(opts, &format!("{}: no checkpoint, starting fresh", run_dir.display())),
        }
    }
    let metrics_path = run_dir.join("metrics.jsonl");
    let eval_path = run_dir.join("eval.jsonl");
    let (log, eval_log) = match &resume {
        Some((_, (state, _))) => (
            MetricsLog::open_truncated(&metrics_path, state.metrics_bytes)?,
            MetricsLog::open_truncated(&eval_path, state.eval_bytes)?,
        ),
        None => {
            checkpoint::clear(run_dir)?;
            if result_path.exists() {
                fs::remove_file(&result_path).map_err(io)?;
            }
            (MetricsLog::open_truncated(&metrics_path, 0)?, MetricsLog::open_truncated(&eval_path, 0)?)
        }
    };
    let resolved = toml::to_string(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    fs::write(&config_path, resolved).map_err(io)?;
    let (mut lm, data, decoder) = load_model_and_data(cfg, &device, opts)?;
    if let Some(summary) = &data.summary {
        let value = serde_json::to_value(summary).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        write_json(&run_dir.join("data.json"), &value)?;
    }

    let sft_steps = if cfg.init.is_none() { cfg.sft.steps } else { 0 };
    let mut ctx = Ctx { cfg, run_dir, opts, log, eval_log, sft_steps, generations: Vec::new() };
    let sft_lora = cfg.model.lora.as_ref().filter(|l| l.sft && sft_steps > 0);
    let resumed_from = resume.as_ref().map(|(name, _)| name.clone());
    let (sft_resume, preference_resume) = match resume {
        Some((_, r)) if r.0.stage == Stage::Sft => (Some(r), None),
        Some((_, r)) => (None, Some(r)),
        None => (None, None),
    };
    if sft_resume.is_some() && sft_steps == 0 {
        return Err(TrainError::Checkpoint("an SFT checkpoint, but this config has no SFT stage".into()));
    }
    if sft_steps > 0 && preference_resume.is_none() {
        if let Some(lora) = sft_lora {
            lm = lm.with_lora(lora.to_lora_config(), cfg.seed ^ 0x5F7)?;
        }
        sft_stage(&mut ctx, &lm, &data, sft_resume)?;
        ensure_weights_finite(&lm, Stage::Sft, cfg.sft.steps)?;
        if sft_lora.is_some() {
            lm = lm.merge_lora()?;
        }
        lm.save_dir(&run_dir.join("sft-model"))?;
    } else if sft_steps > 0 && cfg.model.lora.is_some() {
        // A LoRA checkpoint holds only the adapters; the frozen base is the SFT model, saved
        // before the preference stage began.
        lm = CausalLm::from_dir_as(&run_dir.join("sft-model"), &device, cfg.model.load_dtype())?;
        lm.model().set_gradient_checkpointing(cfg.model.gradient_checkpointing)?;
    }
    if let Some(lora) = &cfg.model.lora {
        lm = lm.with_lora(lora.to_lora_config(), cfg.seed ^ 0x10_4A)?;
    }
    let final_eval = preference_stage(&mut ctx, &lm, &data, preference_resume)?;
    ensure_weights_finite(&lm, Stage::Preference, cfg.preference.steps)?;
    if let Some(decoder) = &decoder {
        write_generations(&run_dir.join("generations.jsonl"), decoder, &data, &ctx.generations)?;
    }
    if cfg.model.lora.is_some() {
        lm.save_adapters(&run_dir.join("adapter"))?;
    }
    // A pretrained model's merged copy would cost its full size per run: with LoRA its result
    // is `adapter/` (after a preference stage) or `sft-model/` (SFT only).
    if cfg.model.lora.is_none() || cfg.model.path.is_none() {
        if cfg.model.lora.is_some() {
            lm = lm.merge_lora()?;
        }
        lm.save_dir(&run_dir.join("model"))?;
    }
    let result = serde_json::json!({
        "variant": cfg.name,
        "seed": cfg.seed,
        "model": cfg.model.display_name(),
        "final": final_eval,
    });
    write_json(&run_dir.join("result.json"), &result)?;
    Ok(RunReport { final_eval, resumed_from, already_finished: false })
}

/// Evaluates a saved model directory (config.json + model.safetensors, e.g. a run's `model/`)
/// on the held-out pairs `cfg` describes: the embedded task's (its `seed`, `data.eval_pairs`)
/// or, with `data.parquet`, that file's held-out split encoded with `model.path`'s tokenizer;
/// with the `[eval]` settings.
pub fn evaluate_dir(cfg: &RunConfig, model_dir: &Path) -> Result<BTreeMap<String, f64>> {
    cfg.validate()?;
    let lm = CausalLm::from_dir(model_dir, &crate::model_source::parse_device(&cfg.model.device)?)?;
    let data = match &cfg.model.path {
        Some(_) => parquet_data(cfg, &lm)?.0,
        None => RunData::embedded(0, cfg.data.eval_pairs, cfg.seed)?,
    };
    evaluate(&lm, &data, cfg)
}

/// The run's starting model and its data: a preset (random init, seeded) on the embedded task,
/// or a pretrained model on a Parquet file; `init` replaces the starting weights. Also returns
/// the tokenizer that decodes generations (Parquet data only).
fn load_model_and_data(
    cfg: &RunConfig,
    device: &Device,
    opts: &RunOptions,
) -> Result<(CausalLm, RunData, Option<TextTokenizer>)> {
    let dtype = cfg.model.load_dtype();
    let lm = match (&cfg.init, &cfg.model.path) {
        (Some(dir), _) => CausalLm::from_dir_as(dir, device, dtype)?,
        (None, Some(path)) => {
            note(opts, &format!("loading {}", path.display()));
            crate::model_source::ModelSource::new(path.clone()).load_model_as(device, dtype)?
        }
        (None, None) => {
            let lm = match cfg.model.preset.as_str() {
                "tiny-gemma" => CausalLm::random(&tiny_gemma(cfg.model.hidden, cfg.model.layers), cfg.seed, device)?,
                _ => CausalLm::random(&tiny_llama(cfg.model.hidden, cfg.model.layers), cfg.seed, device)?,
            };
            match dtype {
                Some(dtype) => {
                    let weights =
                        lm.weights().into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect::<Result<_>>()?;
                    CausalLm::from_tensors(lm.config(), weights)?
                }
                None => lm,
            }
        }
    };
    lm.model().set_gradient_checkpointing(cfg.model.gradient_checkpointing)?;
    if cfg.model.path.is_none() {
        let data = RunData::embedded(cfg.data.pairs, cfg.data.eval_pairs, cfg.seed)?;
        return Ok((lm, data, None));
    }
    let (data, decoder) = parquet_data(cfg, &lm)?;
    if let Some(s) = &data.summary {
        note(
            opts,
            &format!(
                "{}: {} rows: {} SFT, {} preference, {} held-out pairs; {} truncated; skipped {:?}",
                s.file, s.rows, s.sft_pairs, s.preference_pairs, s.eval_pairs, s.truncated_pairs, s.skipped
            ),
        );
    }
    Ok((lm, data, Some(decoder)))
}

/// The Parquet data of `cfg` encoded with `model.path`'s tokenizer and chat template (or the
/// built-in `data.template`), checked against `lm`'s vocabulary; and a tokenizer for decoding.
fn parquet_data(cfg: &RunConfig, lm: &CausalLm) -> Result<(RunData, TextTokenizer)> {
    let path = cfg.model.path.as_deref().ok_or_else(|| TrainError::Config("model.path: not set".into()))?;
    let dir = cfg.model.tokenizer.clone().unwrap_or_else(|| tokenizer_dir(path));
    let tokenizer = TextTokenizer::from_dir(&dir)?;
    let fallback = cfg.data.template.as_deref().and_then(builtin_template);
    let template =
        if has_chat_template(&dir)? || fallback.is_some() { Some(tokenizer.chat_template(fallback)?) } else { None };
    let vocab = crate::model_source::vocab_size(lm.config());
    let data = RunData::from_parquet(&cfg.data, tokenizer, &dir, template, vocab)?;
    Ok((data, TextTokenizer::from_dir(&dir)?))
}

/// Writes the latest greedy generations, decoded: one JSON object per line with `pair`,
/// `prompt`, `completion` (special tokens kept, so a missing end-of-turn shows) and `tokens`.
fn write_generations(path: &Path, decoder: &TextTokenizer, data: &RunData, generations: &[Vec<u32>]) -> Result<()> {
    let mut text = String::new();
    for (example, completion) in data.eval.iter().zip(generations) {
        let line = serde_json::json!({
            "pair": example.tokens.id,
            "prompt": decoder.decode(&example.tokens.prompt, false)?,
            "completion": decoder.decode(completion, false)?,
            "tokens": completion.len(),
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    fs::write(path, text).map_err(|source| TrainError::Io { path: path.display().to_string(), source })
}
