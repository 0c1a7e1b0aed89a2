//! One optimiser step: a batch's log-probs, the micro-batches of an optimiser batch, their
//! accumulated gradients, and the non-finite checks.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use slime_data::{Batch, TokenizedPair};
use slime_models::CausalLm;
use slime_models::step::{DirectGrads, on_this_thread};
use slime_objectives::{BatchTotals, LossOutput, SequenceLogps};

use super::{FaultTarget, Stage};
use crate::corpus::Example;
use crate::metrics::LOSS;
use crate::metrics_log::MetricsLog;
use crate::optim::{AdamW, clip_coefficient};
use crate::{Result, TrainError};

/// Positions per chunk of the log-prob computation.
pub(super) const LOGP_CHUNK: usize = 64;

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

/// Per-token log-probs of a batch, split into its chosen and rejected halves.
pub(super) fn pair_logps(lm: &CausalLm, batch: &Batch, device: &Device) -> Result<(SequenceLogps, SequenceLogps)> {
    let t = to_tensors(batch, device)?;
    let logps = lm.model().pair_token_logps_at(&t.ids, Some(&t.attention), &t.completion, LOGP_CHUNK)?;
    let n = batch.rows / 2;
    Ok((
        SequenceLogps::from_tokens(&logps.narrow(0, 0, n)?, &t.completion.narrow(0, 0, n)?)?,
        SequenceLogps::from_tokens(&logps.narrow(0, n, n)?, &t.completion.narrow(0, n, n)?)?,
    ))
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

/// Pairs of a micro-batch (SFT: sequences), the weight of its metrics.
fn pairs_in(batch: &Batch, stage: Stage) -> f64 {
    let pairs = match stage {
        Stage::Sft => batch.rows,
        Stage::Preference => batch.rows / 2,
    };
    pairs as f64
}

/// One optimiser step over `batches` (the micro-batches of one optimiser batch): per
/// micro-batch the forward pass and loss (normalised by the full batch's [`BatchTotals`]) and
/// a backward pass, `spec.parallel` micro-batches at a time on rayon's pool; the gradients are
/// summed in micro-batch order (the same bits however many run at once), checked, clipped, and
/// AdamW steps once.
pub(super) fn accumulated_step(
    lm: &CausalLm,
    opt: &mut AdamW,
    batches: &[Batch],
    spec: &StepSpec<'_>,
    loss_of: impl Fn(&Batch, BatchTotals, bool) -> Result<LossOutput> + Sync,
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
fn accumulate(
    opt: &AdamW,
    batches: &[Batch],
    spec: &StepSpec<'_>,
    loss_of: impl Fn(&Batch, BatchTotals, bool) -> Result<LossOutput> + Sync,
) -> Result<Accumulated> {
    let totals = batch_totals(batches, spec.place.stage);
    let forward_backward = |i: usize, batch: &Batch| -> Result<(LossOutput, GradStore)> {
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
            let pairs = pairs_in(batch, spec.place.stage);
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

/// The micro-batches of one optimiser batch.
pub(super) fn micro_batches(
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
