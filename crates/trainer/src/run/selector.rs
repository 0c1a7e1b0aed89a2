//! Which preference pairs an optimiser step trains on: every pair once per epoch in a seeded
//! shuffle (`uniform`), or SAGE's weighted draw from a pool re-scored every `refresh_every`
//! steps ([`crate::selection`]).

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slime_data::{Cursor, EpochSampler};

use crate::Result;
use crate::config::PreferenceSpec;
use crate::metrics::selection::UNIFORM_FILL;
use crate::selection::{SageParams, SelectionKind, draw_weighted};

/// SAGE's state between steps (kept, unused, under uniform selection).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SageState {
    /// The draw RNG.
    pub(super) rng: ChaCha8Rng,
    /// The current pool (indices into the preference split) and its draw weights.
    pub(super) pool: Vec<usize>,
    pub(super) weights: Vec<f64>,
    /// Each scored pair's margin at its latest refresh, by pair id.
    pub(super) previous: HashMap<u64, f64>,
}

impl SageState {
    /// The state before the first step of a run seeded `seed`.
    pub(super) fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5A6E),
            pool: Vec::new(),
            weights: Vec::new(),
            previous: HashMap::new(),
        }
    }
}

/// The pairs of one optimiser step and the selection's metrics for that step.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pick {
    /// Indices into the preference split.
    pub(super) indices: Vec<usize>,
    /// `selection/uniform_fill`, and the `selection/...` refresh metrics at a SAGE refresh.
    pub(super) metrics: Vec<(&'static str, f64)>,
}

/// Draws each step's pairs.
#[derive(Debug, Clone)]
pub(super) struct Selector {
    kind: SelectionKind,
    sage: SageParams,
    /// Pairs per optimiser step (`batch_size * grad_accum`).
    per_step: usize,
    sampler: EpochSampler,
    state: SageState,
    /// SAGE's target margin (NaN when unused).
    target: f64,
}

impl Selector {
    /// The selector of a preference split of `split_len` pairs from step `first_step` on, with
    /// the epoch sampler at `cursor` and SAGE at `state`; SAGE's sizes are checked against the
    /// split and its target resolved only when a step is left to take.
    pub(super) fn new(
        spec: &PreferenceSpec,
        split_len: usize,
        seed: u64,
        cursor: Cursor,
        state: SageState,
        first_step: u64,
    ) -> Result<Self> {
        let per_step = spec.batch_size * spec.grad_accum;
        let target = if spec.selection == SelectionKind::Sage && first_step < spec.steps {
            spec.sage.validate_sizes(per_step, Some(split_len))?;
            spec.sage.target_for(&spec.objective)?
        } else {
            f64::NAN
        };
        let sampler = EpochSampler::new(split_len, seed ^ 0xBEEF, cursor);
        Ok(Self { kind: spec.selection, sage: spec.sage, per_step, sampler, state, target })
    }

    /// The pairs of `step` (0-based). SAGE refreshes its pool first when `step` is a multiple of
    /// `refresh_every`, scoring it with `margins_of` (one margin per pool entry, in order);
    /// `id_of` maps a split index to its pair id.
    pub(super) fn pick(
        &mut self,
        step: u64,
        id_of: impl Fn(usize) -> u64,
        margins_of: impl FnOnce(&[usize]) -> Result<Vec<f64>>,
    ) -> Result<Pick> {
        if self.kind == SelectionKind::Uniform {
            return Ok(Pick { indices: self.sampler.next_batch(self.per_step), metrics: vec![(UNIFORM_FILL, 0.0)] });
        }
        let mut refresh_metrics = Vec::new();
        if step.is_multiple_of(self.sage.refresh_every) {
            let sampler = &mut self.sampler;
            let state = &mut self.state;
            let r = self.sage.refresh(
                self.target,
                &state.pool,
                |n| sampler.next_batch(n),
                id_of,
                margins_of,
                &mut state.previous,
            )?;
            refresh_metrics = r.metrics();
            (state.pool, state.weights) = (r.pool, r.scores.weights);
        }
        let (drawn, uniform) = draw_weighted(&self.state.weights, self.per_step, &mut self.state.rng);
        let mut metrics = vec![(UNIFORM_FILL, uniform as f64)];
        metrics.extend(refresh_metrics);
        Ok(Pick { indices: drawn.into_iter().map(|i| self.state.pool[i]).collect(), metrics })
    }

    /// The epoch sampler's position.
    pub(super) fn cursor(&self) -> Cursor {
        self.sampler.cursor()
    }

    /// SAGE's state.
    pub(super) fn sage_state(&self) -> &SageState {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::TrainError;
    use crate::metrics::selection::POOL;

    const SPLIT: usize = 40;

    fn spec(selection: SelectionKind) -> PreferenceSpec {
        let mut spec = PreferenceSpec { selection, ..PreferenceSpec::default() };
        (spec.steps, spec.batch_size, spec.grad_accum) = (12, 2, 2);
        spec.sage = SageParams { pool_size: 8, refresh_every: 3, ..SageParams::default() };
        spec
    }

    /// A margin per split index that spreads the pool over informative, trivial and unstable.
    fn margins(pool: &[usize]) -> Result<Vec<f64>> {
        Ok(pool.iter().map(|&i| (i % 7) as f64 * 0.5 - 1.5).collect())
    }

    fn id_of(i: usize) -> u64 {
        1000 + i as u64
    }

    #[test]
    fn uniform_selection_takes_the_epoch_sampler_s_batches() -> Result<()> {
        let mut selector =
            Selector::new(&spec(SelectionKind::Uniform), SPLIT, 9, Cursor::default(), SageState::new(9), 0)?;
        let mut sampler = EpochSampler::new(SPLIT, 9 ^ 0xBEEF, Cursor::default());
        for step in 0..25 {
            let pick = selector.pick(step, id_of, |_| Err(TrainError::Config("uniform scores nothing".into())))?;
            assert_eq!(pick.indices, sampler.next_batch(4));
            assert_eq!(pick.metrics, [(UNIFORM_FILL, 0.0)]);
        }
        assert_eq!(selector.cursor(), sampler.cursor());
        Ok(())
    }

    #[test]
    fn sage_refreshes_every_refresh_every_steps_and_draws_distinct_pool_pairs() -> Result<()> {
        let mut selector =
            Selector::new(&spec(SelectionKind::Sage), SPLIT, 1, Cursor::default(), SageState::new(1), 0)?;
        let refreshes = Cell::new(0);
        for step in 0..12 {
            let pick = selector.pick(step, id_of, |pool| {
                refreshes.set(refreshes.get() + 1);
                margins(pool)
            })?;
            let pool = &selector.sage_state().pool;
            assert_eq!(pool.len(), 8);
            let mut distinct = pick.indices.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "step {step}: {:?}", pick.indices);
            assert!(pick.indices.iter().all(|i| pool.contains(i)));
            assert_eq!(pick.metrics.iter().any(|(k, _)| *k == POOL), step % 3 == 0, "step {step}");
        }
        assert_eq!(refreshes.get(), 4);
        Ok(())
    }

    #[test]
    fn a_selector_rebuilt_from_its_state_continues_identically() -> Result<()> {
        let spec = spec(SelectionKind::Sage);
        let mut a = Selector::new(&spec, SPLIT, 5, Cursor::default(), SageState::new(5), 0)?;
        for step in 0..4 {
            a.pick(step, id_of, margins)?;
        }
        let mut b = Selector::new(&spec, SPLIT, 5, a.cursor(), a.sage_state().clone(), 4)?;
        for step in 4..12 {
            assert_eq!(a.pick(step, id_of, margins)?, b.pick(step, id_of, margins)?, "step {step}");
        }
        Ok(())
    }

    #[test]
    fn sage_sizes_are_checked_only_with_steps_left() -> Result<()> {
        let spec = spec(SelectionKind::Sage);
        let err = Selector::new(&spec, 6, 0, Cursor::default(), SageState::new(0), 0).expect_err("pool > split");
        assert!(err.to_string().contains("pool_size"), "{err}");
        Selector::new(&spec, 6, 0, Cursor::default(), SageState::new(0), spec.steps)?;
        Ok(())
    }
}
