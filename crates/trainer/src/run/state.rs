//! A run's state: the context its stages share (logs, checkpoints, test hooks) and what a
//! checkpoint holds for an exact resumption.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use slime_data::Cursor;
use slime_models::CausalLm;

use super::eval::{EvalItems, evaluate_with_generations};
use super::preference_checkpoint::PreferenceState;
use super::step::{StepPlace, ensure_weights_finite};
use super::{FaultTarget, RunOptions, Stage};
use crate::checkpoint::{self, Checkpoint};
use crate::config::RunConfig;
use crate::corpus::RunData;
use crate::metrics_log::MetricsLog;
use crate::optim::AdamW;
use crate::{Result, TrainError};

/// What a checkpoint's `state.json` holds besides the weights and the optimiser moments.
/// Floats are stored as their IEEE-754 bit patterns so they round-trip exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrainState {
    /// Layout version of this struct.
    pub(super) format: u32,
    /// The stage the checkpoint was written in.
    pub(super) stage: Stage,
    /// Optimiser steps done in that stage (also AdamW's step count).
    pub(super) step: u64,
    /// The stage's data sampler.
    pub(super) cursor: Cursor,
    /// Lengths of `metrics.jsonl` and `eval.jsonl` when the checkpoint was written; a resumed
    /// run cuts them back to these, dropping lines of steps it will redo.
    pub(super) metrics_bytes: u64,
    pub(super) eval_bytes: u64,
    /// Preference-stage state ([`PreferenceState`]).
    pub(super) preference: Option<PreferenceState>,
}

pub(super) const STATE_FORMAT: u32 = 1;

/// The shared state of a run's stages.
pub(super) struct Ctx<'a> {
    pub(super) cfg: &'a RunConfig,
    pub(super) run_dir: &'a Path,
    pub(super) opts: &'a RunOptions,
    pub(super) log: MetricsLog,
    pub(super) eval_log: MetricsLog,
    /// SFT steps this run takes (0 with `init`): the offset of preference checkpoints' numbers.
    pub(super) sft_steps: u64,
    /// The greedy generations of the latest evaluation.
    pub(super) generations: Vec<Vec<u32>>,
    /// The per-item values of the latest evaluation.
    pub(super) items: EvalItems,
    /// The newest checkpoint on disk (written or resumed from) of this run.
    pub(super) last_checkpoint: Option<String>,
}

impl Ctx<'_> {
    /// [`evaluate`](super::evaluate), keeping the generations.
    pub(super) fn evaluate(&mut self, lm: &CausalLm, data: &RunData) -> Result<BTreeMap<String, f64>> {
        let (metrics, generations, items) = evaluate_with_generations(lm, data, self.cfg)?;
        self.generations = generations;
        self.items = items;
        Ok(metrics)
    }

    /// Where `step` of `stage` is (see [`StepPlace`]).
    pub(super) fn place(&self, stage: Stage, step: u64) -> StepPlace {
        let run_step = step + if stage == Stage::Preference { self.sft_steps } else { 0 };
        StepPlace { stage, step, run_step, last_checkpoint: self.last_checkpoint.clone() }
    }

    pub(super) fn checkpoint_due(&self, step: u64) -> bool {
        self.cfg.checkpoint.every > 0 && step.is_multiple_of(self.cfg.checkpoint.every)
    }

    /// Writes the checkpoint of `stage` after `step`, then prunes old ones.
    pub(super) fn checkpoint(
        &mut self,
        lm: &CausalLm,
        stage: Stage,
        step: u64,
        opt: &AdamW,
        cursor: Cursor,
        preference: Option<PreferenceState>,
    ) -> Result<()> {
        let place = self.place(stage, step);
        ensure_weights_finite(lm, &place)?;
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
        let dir = checkpoint::save(self.run_dir, place.run_step, &Checkpoint { weights, optimizer, state })?;
        self.last_checkpoint = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        checkpoint::prune(self.run_dir, self.cfg.checkpoint.keep_last)?;
        Ok(())
    }

    pub(super) fn pause(&self) {
        if !self.opts.step_delay.is_zero() {
            std::thread::sleep(self.opts.step_delay);
        }
    }

    pub(super) fn fault(&self, stage: Stage, step: u64) -> Option<FaultTarget> {
        self.opts.fault.filter(|f| f.stage == stage && f.step == step).map(|f| f.target)
    }
}

/// Sets the trainable weights from a checkpoint (every one must be present, with its shape).
pub(super) fn restore_weights(lm: &CausalLm, weights: &HashMap<String, Tensor>) -> Result<()> {
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
pub(super) type Resume = (TrainState, Checkpoint);
