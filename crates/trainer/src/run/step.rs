//! One optimiser step: a batch's log-probs, the micro-batches of an optimiser batch, their
//! accumulated gradients, and the non-finite checks.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use slime_data::{Batch, TokenizedPair};
use slime_models::step::{DirectGrads, on_this_thread};
use slime_models::{CausalLm, PairBatch};
use slime_objectives::{BatchTotals, LossOutput};

use super::{FaultTarget, Stage};
use crate::corpus::Example;
pub(super) use crate::logps::{LOGP_CHUNK, pair_batch, pair_logps};
use crate::metrics::LOSS;
use crate::metrics_log::MetricsLog;
use crate::optim::{AdamW, clip_coefficient};
use crate::{Result, TrainError};

pub(super) struct Tensors {
    pub(super) ids: Tensor,
    pub(super) attention: Tensor,
    pub(super) completion: Tensor,
}

pub(super) fn to_tensors(batch: &Batch, device: &Device) -> Result<Tensors> {
    let shape = (batch.rows, batch.seq_len);
    Ok(Tensors {
        ids: Tensor::from_slice(&batch.input_ids, shape, device)?,
        attention: Tensor::from_slice(&batch.attention_mask, shape, device)?,
        completion: Tensor::from_slice(&batch.completion_mask, shape, device)?,
    })
}

/// A preference micro-batch: its pairs' ids (in order) and the model's input.
pub(super) struct PairMicroBatch {
    pub(super) ids: Vec<u64>,
    pub(super) input: PairBatch,
}

/// What an optimiser step needs to know of a micro-batch besides its loss.
pub(super) trait MicroBatch: Sync {
    /// Its pairs (SFT: sequences) and counted chosen (SFT: target) and rejected tokens.
    fn totals(&self) -> BatchTotals;
    /// Real tokens of its sequences, every sequence's prompt included ([`crate::metrics::TOKENS`]).
    fn real_tokens(&self) -> usize;
}

/// An SFT batch: one row per sequence.
impl MicroBatch for Batch {
    fn totals(&self) -> BatchTotals {
        let chosen: u64 = self.completion_lens.iter().map(|&l| u64::from(l)).sum();
        BatchTotals { pairs: self.rows, chosen_tokens: chosen as f64, rejected_tokens: 0.0 }
    }

    fn real_tokens(&self) -> usize {
        Batch::real_tokens(self)
    }
}

impl MicroBatch for PairMicroBatch {
    fn totals(&self) -> BatchTotals {
        let b = &self.input;
        let (chosen, rejected): (usize, usize) = (b.chosen_lens().iter().sum(), b.rejected_lens().iter().sum());
        BatchTotals { pairs: b.len(), chosen_tokens: chosen as f64, rejected_tokens: rejected as f64 }
    }

    /// `2 prompt + chosen + rejected` per pair: the prompt counts with each completion.
    fn real_tokens(&self) -> usize {
        let b = &self.input;
        let prompts: usize = b.prompt_lens().iter().sum();
        2 * prompts + b.chosen_lens().iter().sum::<usize>() + b.rejected_lens().iter().sum::<usize>()
    }
}

/// Where a step is: its stage, its step within the stage, its step within the run (how
/// checkpoints are named) and the newest checkpoint written before it.
#[derive(Debug, Clone)]
pub(super) struct StepPlace {
    pub(super) stage: Stage,
    pub(super) step: u64,
    pub(super) run_step: u64,
    pub(super) last_checkpoint: Option<String>,
}

impl StepPlace {
    fn non_finite(&self, what: String, value: f64) -> TrainError {
        TrainError::NonFinite {
            step: self.step,
            run_step: self.run_step,
            last_checkpoint: self.last_checkpoint.clone(),
            what,
            value,
        }
    }
}

/// Stops the run on a non-finite metric of a (micro-)batch, naming the step and the quantity:
/// the objective's loss terms are checked first, then [`LOSS`], then the other metrics.
fn check_metrics(place: &StepPlace, loss_terms: &[&str], metrics: &slime_objectives::Metrics) -> Result<()> {
    let stage = place.stage.name();
    let is_term = |name: &str| loss_terms.contains(&name);
    let terms = metrics.iter().filter(|(n, _)| is_term(n));
    let loss = metrics.iter().filter(|(n, _)| *n == LOSS);
    let others = metrics.iter().filter(|(n, _)| !is_term(n) && *n != LOSS);
    for (name, value) in terms.chain(loss).chain(others) {
        if !value.is_finite() {
            let what = if name == LOSS {
                format!("{stage} loss")
            } else if is_term(name) {
                format!("{stage} loss term `{name}`")
            } else {
                format!("{stage} metric `{name}`")
            };
            return Err(place.non_finite(what, value));
        }
    }
    Ok(())
}

/// Stops the run when a trainable weight is not finite (before a checkpoint is written, so the
/// last checkpoint on disk always holds finite weights).
pub(super) fn ensure_weights_finite(lm: &CausalLm, place: &StepPlace) -> Result<()> {
    for (name, var) in lm.trainable_vars() {
        let probe = var.as_tensor().to_dtype(DType::F64)?.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f64>()?;
        if !probe.is_finite() {
            return Err(place.non_finite(format!("{} weight `{name}` after the update", place.stage.name()), probe));
        }
    }
    Ok(())
}

/// Writes one `metrics.jsonl` line: the step's metrics and `extra` ([`crate::metrics`] keys).
pub(super) fn record(
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
pub(super) struct StepOutcome {
    /// Metrics of the whole optimiser batch: micro-batch metrics averaged, weighted by pairs.
    pub(super) metrics: BTreeMap<String, f64>,
    /// Global gradient norm before clipping.
    pub(super) grad_norm: f64,
    /// Real tokens processed.
    pub(super) tokens: usize,
}

/// Everything one optimiser step needs besides the loss function.
pub(super) struct StepSpec<'a> {
    pub(super) place: StepPlace,
    pub(super) lr: f64,
    pub(super) max_grad_norm: Option<f64>,
    /// The objective's loss terms ([`slime_objectives::Objective::loss_terms`]).
    pub(super) loss_terms: &'a [&'a str],
    pub(super) fault: Option<FaultTarget>,
    /// Micro-batches run at once (`parallel_micro_batches`).
    pub(super) parallel: usize,
}

/// Full-batch sizes of `batches`: their micro-batches' sizes added up.
fn batch_totals(batches: &[impl MicroBatch]) -> BatchTotals {
    batches.iter().map(MicroBatch::totals).fold(
        BatchTotals { pairs: 0, chosen_tokens: 0.0, rejected_tokens: 0.0 },
        |a, b| BatchTotals {
            pairs: a.pairs + b.pairs,
            chosen_tokens: a.chosen_tokens + b.chosen_tokens,
            rejected_tokens: a.rejected_tokens + b.rejected_tokens,
        },
    )
}

/// The summed gradients and pair-weighted metric sums of an optimiser batch's micro-batches.
struct Accumulated {
    grads: GradStore,
    /// Metric sums, each value times its micro-batch's pairs.
    sums: BTreeMap<String, f64>,
    /// Pairs (SFT: sequences) in all micro-batches.
    weight: f64,
    tokens: usize,
    /// The first micro-batch's metrics as they are.
    first: BTreeMap<String, f64>,
}

/// One optimiser step over `batches` (the micro-batches of one optimiser batch): per
/// micro-batch the forward pass and loss (normalised by the full batch's [`BatchTotals`]) and
/// a backward pass, `spec.parallel` micro-batches at a time on rayon's pool; the gradients are
/// summed in micro-batch order (the same bits however many run at once), checked, clipped, and
/// AdamW steps once.
pub(super) fn accumulated_step<B: MicroBatch>(
    lm: &CausalLm,
    opt: &mut AdamW,
    batches: &[B],
    spec: &StepSpec<'_>,
    loss_of: impl Fn(&B, BatchTotals, bool) -> Result<LossOutput> + Sync,
) -> Result<StepOutcome> {
    let acc = accumulate(opt, batches, spec, loss_of)?;
    let mut grads = acc.grads;
    let place = &spec.place;
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
        return Err(place.non_finite(format!("{} gradient of `{name}`", place.stage.name()), grad_norm));
    }
    opt.step(&grads, spec.lr, clip_coefficient(grad_norm, spec.max_grad_norm))?;
    let metrics = if batches.len() == 1 {
        // One micro-batch: its metrics as they are (no rounding through the weighted mean).
        acc.first
    } else {
        acc.sums.into_iter().map(|(k, v)| (k, v / acc.weight)).collect()
    };
    Ok(StepOutcome { metrics, grad_norm, tokens: acc.tokens })
}

/// Forward and backward passes of `batches`, `spec.parallel` at a time, their gradients summed
/// in micro-batch order and their metrics checked and summed.
fn accumulate<B: MicroBatch>(
    opt: &AdamW,
    batches: &[B],
    spec: &StepSpec<'_>,
    loss_of: impl Fn(&B, BatchTotals, bool) -> Result<LossOutput> + Sync,
) -> Result<Accumulated> {
    let totals = batch_totals(batches);
    let forward_backward = |i: usize, batch: &B| -> Result<(LossOutput, GradStore)> {
        let poison = spec.fault == Some(FaultTarget::Logps) && i == 0;
        // The fused blocks hand their weights' gradients over directly (the same values as
        // through candle's graph, without its zero-fill-and-add per packing step).
        let direct = DirectGrads::new();
        let out = direct.forward(|| loss_of(batch, totals, poison))?;
        check_metrics(&spec.place, spec.loss_terms, &out.metrics)?;
        let grads = direct.backward(&out.loss)?;
        Ok((out, grads))
    };
    let mut acc: Option<Accumulated> = None;
    let parallel = spec.parallel.max(1);
    for (group_index, group) in batches.chunks(parallel).enumerate() {
        let first = group_index * parallel;
        let outcomes: Vec<Result<(LossOutput, GradStore)>> = if group.len() == 1 {
            vec![forward_backward(first, &group[0])]
        } else {
            // One micro-batch per pool thread: each keeps its products on its own thread.
            group
                .par_iter()
                .enumerate()
                .map(|(j, batch)| on_this_thread(|| forward_backward(first + j, batch)))
                .collect()
        };
        for (batch, outcome) in group.iter().zip(outcomes) {
            let (out, g) = outcome?;
            let pairs = batch.totals().pairs as f64;
            let acc = match &mut acc {
                Some(acc) => {
                    opt.accumulate(&mut acc.grads, &g)?;
                    acc
                }
                None => acc.insert(Accumulated {
                    grads: g,
                    sums: BTreeMap::new(),
                    weight: 0.0,
                    tokens: 0,
                    first: out.metrics.iter().map(|(k, v)| (k.to_string(), v)).collect(),
                }),
            };
            for (name, value) in out.metrics.iter() {
                *acc.sums.entry(name.to_string()).or_default() += value * pairs;
            }
            acc.weight += pairs;
            acc.tokens += batch.real_tokens();
        }
    }
    let place = &spec.place;
    acc.ok_or_else(|| TrainError::Config(format!("{} step {}: empty batch", place.stage.name(), place.step)))
}

/// The pairs of each micro-batch of one optimiser batch: `picked` (indices into `data`) in
/// chunks of `batch_size`.
fn chunks<'a>(
    picked: &'a [usize],
    batch_size: usize,
    data: &'a [Example],
) -> impl Iterator<Item = Vec<&'a TokenizedPair>> {
    picked.chunks(batch_size).map(move |chunk| chunk.iter().map(|&i| &data[i].tokens).collect())
}

/// The micro-batches of one optimiser batch, collated into rows.
pub(super) fn micro_batches(
    picked: &[usize],
    batch_size: usize,
    data: &[Example],
    collate: fn(&[&TokenizedPair], u32) -> Batch,
    pad_id: u32,
) -> Vec<Batch> {
    chunks(picked, batch_size, data).map(|refs| collate(&refs, pad_id)).collect()
}

/// The preference micro-batches of one optimiser batch.
pub(super) fn pair_micro_batches(picked: &[usize], batch_size: usize, data: &[Example]) -> Result<Vec<PairMicroBatch>> {
    chunks(picked, batch_size, data)
        .map(|refs| Ok(PairMicroBatch { ids: refs.iter().map(|p| p.id).collect(), input: pair_batch(&refs)? }))
        .collect()
}
