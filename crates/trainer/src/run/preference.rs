//! The preference stage: reference log-probs (from a file, before the stage, or on demand with
//! LoRA), SAGE or uniform selection, the optimiser steps and the evaluations.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slime_data::{Cursor, EpochSampler, PairLogps, TokenizedPair, collate_pairs, read_logps, write_logps};
use slime_models::CausalLm;
use slime_objectives::{ObjectiveInputs, ReferenceLogps, SequenceLogps};

use super::Stage;
use super::model::device_of;
use super::state::{Ctx, PreferenceState, Resume, RngState, restore_weights};
use super::step::{StepSpec, accumulated_step, micro_batches, pair_logps, record};
use crate::config::RunConfig;
use crate::corpus::RunData;
use crate::optim::{AdamW, AdamWConfig};
use crate::progress::Progress;
use crate::selection::{SelectionKind, draw_weighted, objective_margin};
use crate::{Result, TrainError};

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
    crate::atomic::produce_file(&run_dir.join("reference_logps.parquet"), |tmp| Ok(write_logps(tmp, &rows)?))
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

/// SAGE margins of the split entries `pool` under the current policy (forward only), each by
/// the objective's own definition ([`objective_margin`]); reference sums missing for an on-demand
/// reference are computed first.
fn sage_margins(
    lm: &CausalLm,
    data: &RunData,
    cfg: &RunConfig,
    pool: &[usize],
    reference: &mut Option<HashMap<u64, (f64, f64)>>,
) -> Result<Vec<f64>> {
    let toks: Vec<&TokenizedPair> = pool.iter().map(|&i| &data.preference[i].tokens).collect();
    if let Some(reference) = reference
        && ReferenceSource::of(cfg) == ReferenceSource::OnDemand
    {
        fill_reference(lm, &toks, reference, data.pad_id, cfg.eval.batch_size)?;
    }
    let sums = reference_sums(lm, &toks, data.pad_id, cfg.eval.batch_size)?;
    sums.iter()
        .map(|s| {
            objective_margin(&cfg.preference.objective, s, reference.as_ref().and_then(|r| r.get(&s.pair).copied()))
        })
        .collect()
}

/// The preference stage (with its start evaluation when not resuming); returns the final
/// evaluation.
pub(super) fn preference_stage(
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
    let sage_target = if spec.selection == SelectionKind::Sage && first < spec.steps {
        spec.sage.validate_sizes(total, Some(data.preference.len()))?;
        spec.sage.target_for(objective)?
    } else {
        f64::NAN
    };
    for step in first..spec.steps {
        let started = Instant::now();
        let mut uniform_fill = 0usize;
        let mut refresh_metrics = Vec::new();
        let picked: Vec<usize> = match spec.selection {
            SelectionKind::Uniform => sampler.next_batch(total),
            SelectionKind::Sage => {
                if step % spec.sage.refresh_every == 0 {
                    let r = spec.sage.refresh(
                        sage_target,
                        &pool,
                        |n| sampler.next_batch(n),
                        |i| data.preference[i].tokens.id,
                        |p| sage_margins(lm, data, cfg, p, &mut reference),
                        &mut previous,
                    )?;
                    refresh_metrics = r.metrics();
                    (pool, pool_weights) = (r.pool, r.scores.weights);
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
            place: ctx.place(Stage::Preference, step + 1),
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
                &[
                    ("learning_rate", lr),
                    ("grad_norm", out.grad_norm),
                    ("tokens_per_second", tps),
                    ("selection/uniform_fill", uniform_fill as f64),
                ],
                &refresh_metrics[..],
            ]
            .concat(),
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
