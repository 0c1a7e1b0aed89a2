//! The SFT stage.

use std::time::Instant;

use slime_data::{Cursor, EpochSampler, collate_sft};
use slime_models::CausalLm;
use slime_objectives::{ObjectiveInputs, SequenceLogps};

use super::Stage;
use super::model::device_of;
use super::state::{Ctx, Resume, restore_weights};
use super::step::{LOGP_CHUNK, StepSpec, accumulated_step, micro_batches, record, to_tensors};
use crate::Result;
use crate::config::StageSpec;
use crate::corpus::RunData;
use crate::metrics::{GRAD_NORM, LEARNING_RATE, LOSS, TOKENS, TOKENS_PER_SECOND};
use crate::optim::AdamW;
use crate::progress::Progress;

/// The SFT stage: `sft.objective` (NLL by default) on the chosen completions of the SFT split.
pub(super) fn sft_stage(ctx: &mut Ctx<'_>, lm: &CausalLm, data: &RunData, resume: Option<Resume>) -> Result<()> {
    let (pad_id, data) = (data.pad_id, &data.sft);
    let device = device_of(lm);
    let spec: &StageSpec = &ctx.cfg.sft;
    let mut opt = AdamW::new(lm.trainable_vars(), spec.adamw())?;
    let (mut first, mut cursor) = (0, Cursor::default());
    if let Some((state, ckpt)) = resume {
        restore_weights(lm, &ckpt.weights)?;
        opt.load_state_tensors(&ckpt.optimizer, state.step)?;
        (first, cursor) = (state.step, state.cursor);
    }
    let mut sampler = EpochSampler::new(data.len(), ctx.cfg.seed, cursor);
    let objective = &ctx.cfg.sft.objective;
    let mut progress = Progress::new(ctx.opts.progress, Stage::Sft.name(), first, spec.steps);
    for step in first..spec.steps {
        let started = Instant::now();
        let picked = sampler.next_batch(spec.batch_size * spec.grad_accum);
        let batches = micro_batches(&picked, spec.batch_size, data, collate_sft, pad_id);
        let lr = spec.schedule.lr_at(step, spec.steps);
        let step_spec = StepSpec {
            place: ctx.place(Stage::Sft, step + 1),
            lr,
            max_grad_norm: spec.max_grad_norm,
            loss_terms: objective.loss_terms(),
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
            &[(LEARNING_RATE, lr), (GRAD_NORM, out.grad_norm), (TOKENS_PER_SECOND, tps), (TOKENS, out.tokens as f64)],
        )?;
        progress.step(step + 1, out.metrics.get(LOSS).copied().unwrap_or(f64::NAN));
        if ctx.checkpoint_due(step + 1) {
            ctx.checkpoint(lm, Stage::Sft, step + 1, &opt, sampler.cursor(), None)?;
        }
        ctx.pause();
    }
    progress.finish();
    Ok(())
}
