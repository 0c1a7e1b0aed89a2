//! What a preference-stage checkpoint holds besides the weights, the optimiser moments and the
//! data cursor: the drift baseline, the reference sums and SAGE's state. Floats are stored as
//! their IEEE-754 bit patterns and maps as lists sorted by pair id, so a resumed run continues
//! bit-identically and the same state always writes the same `state.json`.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::reference::Reference;
use super::selector::SageState;
use crate::config::RunConfig;
use crate::{Result, TrainError};

/// The preference stage's part of `state.json` (its layout is part of the checkpoint format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PreferenceState {
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

/// The preference stage's state restored from a checkpoint.
pub(super) struct Restored {
    /// The drift baseline.
    pub(super) start_chosen_logp: f64,
    pub(super) reference: Option<Reference>,
    pub(super) sage: SageState,
}

impl PreferenceState {
    /// The state to checkpoint.
    pub(super) fn capture(start_chosen_logp: f64, reference: Option<&Reference>, sage: &SageState) -> Self {
        let mut previous: Vec<(u64, u64)> = sage.previous.iter().map(|(&id, &m)| (id, m.to_bits())).collect();
        previous.sort_unstable();
        Self {
            start_chosen_logp: start_chosen_logp.to_bits(),
            reference: reference.map(Reference::to_bits),
            rng: RngState::of(&sage.rng),
            pool: sage.pool.clone(),
            pool_weights: sage.weights.iter().map(|w| w.to_bits()).collect(),
            previous,
        }
    }

    /// The running state again; the objective of `cfg` must find its reference there.
    pub(super) fn restore(self, cfg: &RunConfig) -> Result<Restored> {
        let reference = self.reference.map(|bits| Reference::from_bits(cfg, bits));
        if cfg.preference.objective.needs_reference() && reference.is_none() {
            return Err(TrainError::Checkpoint("checkpoint lacks the reference log-probs".into()));
        }
        let sage = SageState {
            rng: self.rng.restore()?,
            pool: self.pool,
            weights: self.pool_weights.into_iter().map(f64::from_bits).collect(),
            previous: self.previous.into_iter().map(|(id, b)| (id, f64::from_bits(b))).collect(),
        };
        Ok(Restored { start_chosen_logp: f64::from_bits(self.start_chosen_logp), reference, sage })
    }
}

/// A ChaCha8 generator's exact position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use rand::Rng;
    use slime_objectives::{DpoParams, Objective};

    use super::*;

    fn sage_after_draws() -> SageState {
        let mut sage = SageState::new(11);
        for _ in 0..5 {
            sage.rng.random::<u64>();
        }
        sage.pool = vec![4, 1, 9];
        sage.weights = vec![0.25, 0.0, f64::MIN_POSITIVE / 8.0];
        sage.previous = [(30, -0.0), (10, 1.5), (20, f64::NAN)].into_iter().collect();
        sage
    }

    fn through_json(state: &PreferenceState) -> Result<PreferenceState> {
        let text = serde_json::to_string(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(e.to_string()))
    }

    #[test]
    fn a_checkpointed_state_restores_bit_for_bit() -> Result<()> {
        let sage = sage_after_draws();
        let state = PreferenceState::capture(-1.25, None, &sage);
        assert_eq!(state.previous.iter().map(|p| p.0).collect::<Vec<_>>(), [10, 20, 30], "sorted by pair id");
        let mut restored = through_json(&state)?.restore(&RunConfig::default())?;
        assert_eq!(restored.start_chosen_logp, -1.25);
        assert!(restored.reference.is_none());
        let bits = |s: &SageState| -> Vec<u64> { s.weights.iter().map(|w| w.to_bits()).collect() };
        assert_eq!((&restored.sage.pool, bits(&restored.sage)), (&sage.pool, bits(&sage)));
        assert_eq!(restored.sage.previous[&30].to_bits(), (-0.0f64).to_bits());
        assert!(restored.sage.previous[&20].is_nan());
        let mut original = sage.rng.clone();
        assert_eq!(restored.sage.rng.random::<u64>(), original.random::<u64>(), "the RNG continues where it was");
        Ok(())
    }

    #[test]
    fn a_reference_objective_needs_its_reference_in_the_checkpoint() {
        let mut cfg = RunConfig::default();
        cfg.preference.objective = Objective::Dpo(DpoParams::default());
        let state = PreferenceState::capture(0.0, None, &SageState::new(0));
        let err = state.restore(&cfg).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("lacks the reference"), "{err}");
    }

    #[test]
    fn the_state_json_layout_is_the_checkpoint_format() -> Result<()> {
        let text = r#"{"start_chosen_logp":0,"reference":[[3,1,2]],"rng":{"seed":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
            0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"stream":0,"word_pos":"8"},"pool":[2],"pool_weights":[0],"previous":[[3,0]]}"#;
        let state: PreferenceState = serde_json::from_str(text).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        assert_eq!(state.reference, Some(vec![(3, 1, 2)]));
        let restored = state.clone().restore(&RunConfig::default())?;
        assert_eq!(restored.sage.rng.get_word_pos(), 8);
        assert_eq!(through_json(&state)?, state);
        Ok(())
    }
}
