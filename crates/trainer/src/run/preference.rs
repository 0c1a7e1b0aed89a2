//! The preference stage: its optimiser steps over the pairs a [`Selector`] picks, against a
//! [`Reference`] where the objective needs one, with evaluations (and the chosen log-prob's
//! drift from the stage's start) and checkpoints ([`PreferenceState`]).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;
use slime_data::TokenizedPair;
use slime_models::CausalLm;
use slime_objectives::{BatchTotals, LossOutput, ObjectiveInputs, SequenceLogps};

use super::eval::reused_start;
use super::model::device_of;
use super::preference_checkpoint::PreferenceState;
use super::reference::Reference;
use super::selector::{SageState, Selector};
use super::state::{Ctx, Resume, restore_weights};
use super::step::{PairMicroBatch, StepSpec, accumulated_step, pair_logps, pair_micro_batches, record};
use super::{Stage, note};
use crate::config::RunConfig;
use crate::corpus::RunData;
use crate::logps::score_pairs;
use crate::metrics::{GRAD_NORM, LEARNING_RATE, LOSS, TOKENS, TOKENS_PER_SECOND, eval};
use crate::optim::AdamW;
use crate::progress::Progress;
use crate::selection::objective_margin;
use crate::{Result, TrainError};

/// The stage between steps.
struct PreferenceRun {
    opt: AdamW,
    /// The first step still to take.
    first: u64,
    selector: Selector,
    /// Present when the objective needs it.
    reference: Option<Reference>,
    /// Held-out chosen log-prob at the start of the stage (the drift baseline).
    start_chosen_logp: f64,
    /// The latest evaluation.
    last_eval: Option<BTreeMap<String, f64>>,
}

/// The preference stage (with its start evaluation when not resuming); returns the final
/// evaluation.
pub(super) fn preference_stage(
    ctx: &mut Ctx<'_>,
    lm: &CausalLm,
    data: &RunData,
    resume: Option<Resume>,
) -> Result<BTreeMap<String, f64>> {
    let cfg = ctx.cfg;
    let steps = cfg.preference.steps;
    let mut run = match resume {
        None => start(ctx, lm, data)?,
        Some(resume) => resumed(cfg, lm, data, resume)?,
    };
    let mut progress = Progress::new(ctx.opts.progress, Stage::Preference.name(), run.first, steps);
    for step in run.first..steps {
        let loss = train_step(ctx, lm, data, &mut run, step)?;
        progress.step(step + 1, loss);
        if (step + 1) % cfg.eval.every == 0 || step + 1 == steps {
            let e = with_drift(ctx.evaluate(lm, data)?, run.start_chosen_logp);
            ctx.eval_log.write(Stage::Preference.name(), step + 1, &e)?;
            run.last_eval = Some(e);
        }
        if ctx.checkpoint_due(step + 1) {
            let state =
                PreferenceState::capture(run.start_chosen_logp, run.reference.as_ref(), run.selector.sage_state());
            ctx.checkpoint(lm, Stage::Preference, step + 1, &run.opt, run.selector.cursor(), Some(state))?;
        }
        ctx.pause();
    }
    progress.finish();
    if let Some(reference) = &run.reference {
        reference.write_cache(ctx.run_dir, data)?;
    }
    match run.last_eval {
        Some(e) => Ok(e),
        // Resumed from the checkpoint of the last step: its evaluation is in eval.jsonl already;
        // the same weights give the same numbers.
        None => Ok(with_drift(ctx.evaluate(lm, data)?, run.start_chosen_logp)),
    }
}

/// A fresh stage: the start evaluation (drift 0; with `eval.start_from`, the one that run
/// made of the same model), then the reference if the objective needs one.
fn start(ctx: &mut Ctx<'_>, lm: &CausalLm, data: &RunData) -> Result<PreferenceRun> {
    let cfg = ctx.cfg;
    let mut start = match reused_start(cfg, data)? {
        Some((metrics, _)) => {
            let from = cfg.eval.start_from.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
            note(
                ctx.opts,
                &format!("start evaluation: taken from {from} (the same model, held-out pairs and settings)"),
            );
            metrics
        }
        None => ctx.evaluate(lm, data)?,
    };
    let start_chosen_logp = start[eval::CHOSEN_LOGP];
    start.insert(eval::CHOSEN_LOGP_DRIFT.into(), 0.0);
    ctx.eval_log.write(Stage::Preference.name(), 0, &start)?;
    let reference = if cfg.preference.steps > 0 && cfg.preference.objective.needs_reference() {
        Some(Reference::at_start(lm, data, cfg)?)
    } else {
        None
    };
    Ok(PreferenceRun {
        opt: AdamW::new(lm.trainable_vars(), cfg.preference.adamw())?,
        first: 0,
        selector: Selector::new(
            &cfg.preference,
            data.preference.len(),
            cfg.seed,
            Default::default(),
            SageState::new(cfg.seed),
            0,
        )?,
        reference,
        start_chosen_logp,
        last_eval: Some(start),
    })
}

/// The stage as a preference checkpoint left it.
fn resumed(cfg: &RunConfig, lm: &CausalLm, data: &RunData, (state, ckpt): Resume) -> Result<PreferenceRun> {
    let saved = state
        .preference
        .ok_or_else(|| TrainError::Checkpoint("preference checkpoint without its preference state".into()))?;
    restore_weights(lm, &ckpt.weights)?;
    let mut opt = AdamW::new(lm.trainable_vars(), cfg.preference.adamw())?;
    opt.load_state_tensors(&ckpt.optimizer, state.step)?;
    let restored = saved.restore(cfg)?;
    // The run the start evaluation came from must still hold the same one (a changed SFT run
    // would leave this run's drift measured from another model).
    if let Some((metrics, _)) = reused_start(cfg, data)?
        && metrics[eval::CHOSEN_LOGP].to_bits() != restored.start_chosen_logp.to_bits()
    {
        return Err(TrainError::Input(format!(
            "--resume: eval.start_from = {} now holds a start evaluation (chosen log-prob {}) other than the one \
             this run started from ({}); the run it names changed, so start this one afresh (without --resume)",
            cfg.eval.start_from.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            metrics[eval::CHOSEN_LOGP],
            restored.start_chosen_logp
        )));
    }
    let split = data.preference.len();
    Ok(PreferenceRun {
        opt,
        first: state.step,
        selector: Selector::new(&cfg.preference, split, cfg.seed, state.cursor, restored.sage, state.step)?,
        reference: restored.reference,
        start_chosen_logp: restored.start_chosen_logp,
        last_eval: None,
    })
}

/// One optimiser step (`step` is 0-based), logged to `metrics.jsonl`; returns its loss.
fn train_step(ctx: &mut Ctx<'_>, lm: &CausalLm, data: &RunData, run: &mut PreferenceRun, step: u64) -> Result<f64> {
    let cfg = ctx.cfg;
    let spec = &cfg.preference;
    let started = Instant::now();
    let reference = &mut run.reference;
    let pick = run.selector.pick(
        step,
        |i| data.preference[i].tokens.id,
        |pool| sage_margins(lm, data, cfg, pool, reference.as_mut()),
    )?;
    if let Some(reference) = &mut run.reference {
        let pairs: Vec<&TokenizedPair> = pick.indices.iter().map(|&i| &data.preference[i].tokens).collect();
        reference.ensure(lm, &pairs, cfg.eval.batch_size)?;
    }
    let batches = pair_micro_batches(&pick.indices, spec.batch_size, &data.preference)?;
    let lr = spec.schedule.lr_at(step, spec.steps);
    let step_spec = StepSpec {
        place: ctx.place(Stage::Preference, step + 1),
        lr,
        max_grad_norm: spec.max_grad_norm,
        loss_terms: spec.objective.loss_terms(),
        fault: ctx.fault(Stage::Preference, step + 1),
        parallel: spec.parallel_micro_batches,
    };
    let device = device_of(lm);
    let reference = run.reference.as_ref();
    let out = accumulated_step(lm, &mut run.opt, &batches, &step_spec, |batch, totals, poison| {
        preference_loss(lm, cfg, reference, &device, batch, totals, poison)
    })?;
    let tps = out.tokens as f64 / started.elapsed().as_secs_f64();
    let mut extra =
        vec![(LEARNING_RATE, lr), (GRAD_NORM, out.grad_norm), (TOKENS_PER_SECOND, tps), (TOKENS, out.tokens as f64)];
    extra.extend(pick.metrics);
    record(&mut ctx.log, Stage::Preference, step + 1, &out.metrics, &extra)?;
    Ok(out.metrics.get(LOSS).copied().unwrap_or(f64::NAN))
}

/// The objective's loss on one micro-batch; `poison` makes the chosen log-probs NaN (an
/// injected fault).
fn preference_loss(
    lm: &CausalLm,
    cfg: &RunConfig,
    reference: Option<&Reference>,
    device: &Device,
    batch: &PairMicroBatch,
    totals: BatchTotals,
    poison: bool,
) -> Result<LossOutput> {
    let (mut chosen, rejected) = pair_logps(lm, &batch.input)?;
    if poison {
        let tokens = chosen.tokens().ok_or_else(|| TrainError::Config("no per-token log-probs".into()))?;
        let nan = tokens.logps().affine(1.0, f64::NAN)?;
        chosen = SequenceLogps::from_tokens(&nan, tokens.mask())?;
    }
    let mut inputs = ObjectiveInputs::preference(chosen, rejected)
        .with_collapse_delta(cfg.eval.collapse_delta)
        .with_batch_totals(totals);
    if let Some(reference) = reference {
        inputs = inputs.with_reference(reference.for_pairs(&batch.ids, device)?);
    }
    Ok(cfg.preference.objective.compute(&inputs)?)
}

/// SAGE margins of the split entries `pool` under the current policy (forward only), each by
/// the objective's own definition ([`objective_margin`]); reference sums still missing are
/// computed first.
fn sage_margins(
    lm: &CausalLm,
    data: &RunData,
    cfg: &RunConfig,
    pool: &[usize],
    mut reference: Option<&mut Reference>,
) -> Result<Vec<f64>> {
    let pairs: Vec<&TokenizedPair> = pool.iter().map(|&i| &data.preference[i].tokens).collect();
    if let Some(reference) = reference.as_mut() {
        reference.ensure(lm, &pairs, cfg.eval.batch_size)?;
    }
    // Adapters folded in once: no low-rank products and no autograd graph while scoring.
    let (sums, _) = score_pairs(&lm.inference_copy()?, &pairs, cfg.eval.batch_size, false)?;
    let objective = &cfg.preference.objective;
    sums.iter().map(|s| objective_margin(objective, s, reference.as_ref().and_then(|r| r.get(s.pair)))).collect()
}

/// `metrics` with the drift of the held-out chosen log-prob from `start`.
fn with_drift(mut metrics: BTreeMap<String, f64>, start: f64) -> BTreeMap<String, f64> {
    let drift = metrics[eval::CHOSEN_LOGP] - start;
    metrics.insert(eval::CHOSEN_LOGP_DRIFT.into(), drift);
    metrics
}
