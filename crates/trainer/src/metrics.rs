//! Metric keys a run writes. Per optimiser step (`metrics.jsonl`): the objective's own keys
//! ([`slime_objectives::metrics`], [`LOSS`] among them) and the step's keys below; per
//! evaluation (`eval.jsonl`, `result.json`, read by `cargo xtask report`): the [`eval`] keys.
//! Every writer and reader names a key through these constants.

pub use slime_objectives::metrics::{LOSS, eval};

/// The step's learning rate (after warmup and decay).
pub const LEARNING_RATE: &str = "learning_rate";
/// Global gradient norm before clipping.
pub const GRAD_NORM: &str = "grad_norm";
/// Real (non-padding) tokens of the optimiser batch over the step's wall-clock time.
pub const TOKENS_PER_SECOND: &str = "tokens_per_second";
/// Real (non-padding) tokens of the optimiser batch, every row's prompt included (a pair's
/// prompt counts twice: once with the chosen, once with the rejected completion).
pub const TOKENS: &str = "tokens";

/// Keys of the preference stage's pair selection ([`crate::selection`]).
pub mod selection {
    /// Pairs of the step drawn uniformly because too few had a positive SAGE score.
    pub const UNIFORM_FILL: &str = "selection/uniform_fill";
    /// Pairs in the refreshed pool.
    pub const POOL: &str = "selection/pool";
    /// The target margin of the refresh.
    pub const TARGET: &str = "selection/target";
    /// Pool pairs with a positive score.
    pub const INFORMATIVE: &str = "selection/informative";
    /// Pool pairs past `target + trivial_slack`.
    pub const TRIVIAL: &str = "selection/trivial";
    /// Pool pairs that flipped sign within `boundary` of 0.
    pub const UNSTABLE: &str = "selection/unstable";
    /// Pool pairs whose margin is not finite.
    pub const NOT_FINITE: &str = "selection/not_finite";
    /// Carried pairs scored at both of the last two refreshes.
    pub const RESCORED: &str = "selection/rescored";
    /// Of those, pairs whose margin changed sign.
    pub const FLIPPED: &str = "selection/flipped";
    /// `flipped / rescored` (0 when none were re-scored).
    pub const FLIP_FRACTION: &str = "selection/flip_fraction";
    /// Mean `|m - m'|` of the re-scored pairs.
    pub const MEAN_ABS_MARGIN_CHANGE: &str = "selection/mean_abs_margin_change";
}
