//! Preference-optimisation objectives as plain functions over candle log-prob tensors.
//!
//! No model, no data types: give per-token log-probs with masks (or per-sequence sums and
//! token counts), get per-example losses, the batch loss to differentiate, and detached
//! metrics with TRL's names.
//!
//! | objective | source | needs reference | aggregation |
//! |---|---|---|---|
//! | [`SlimeParams`] | SLIME, arXiv 2602.02383 | no | mean (+ rejected tokens) |
//! | [`DpoParams`] (sigmoid / cDPO / robust / hinge) | arXiv 2305.18290 | yes | sum |
//! | [`IpoParams`] | arXiv 2310.12036 | yes | mean |
//! | [`SimpoParams`] | arXiv 2405.14734 | no | mean |
//! | [`CpoParams`] (CPO / CPO-SimPO) | arXiv 2401.08417 | no | sum / mean |
//! | [`OrpoParams`] | arXiv 2403.07691 | no | mean |
//! | [`SftParams`] (NLL, `f_alpha`, thresholds) | arXiv 2510.00526 | no | pooled tokens |
//!
//! [`Objective`] is the serde-configurable enum over all of them (`type = "slime"`, ...); a
//! training loop asks it for its [`Requirements`], [`Objective::loss_terms`] and
//! [`Objective::metric_keys`] instead of matching on its type, and reads metrics by the keys in
//! [`metrics`]. A new objective is one file (a params type implementing [`Loss`] and
//! [`ObjectiveKind`]) and one line in the list that generates [`Objective`]. Losses are
//! computed in f32 whatever the input dtype (f64 inputs stay f64), and the stable forms of
//! `softplus`, `log_sigmoid` and `log1mexp` in [`numerics`] have exact gradients everywhere,
//! including at zero margin.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use slime_objectives::{Loss, ObjectiveInputs, SequenceLogps, SlimeParams, metrics};
//!
//! # fn main() -> slime_objectives::Result<()> {
//! let dev = Device::Cpu;
//! // Two pairs, up to three completion tokens each; mask 0 marks padding.
//! let chosen = Var::new(&[[-0.5f32, -0.2, -0.1], [-1.0, -0.3, 0.0]], &dev)?;
//! let chosen_mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 0]], &dev)?;
//! let rejected = Var::new(&[[-2.0f32, -3.0, -0.4], [-0.2, -9.0, -1.0]], &dev)?;
//! let rejected_mask = Tensor::new(&[[1u8, 1, 1], [1, 1, 1]], &dev)?;
//!
//! let inputs = ObjectiveInputs::preference(
//!     SequenceLogps::from_tokens(&chosen, &chosen_mask)?,
//!     SequenceLogps::from_tokens(&rejected, &rejected_mask)?,
//! );
//! let out = SlimeParams::paper().compute(&inputs)?;
//! let grads = out.loss.backward()?;
//!
//! // Anchoring pushes every counted chosen token up: the gradient of the loss is negative.
//! let g: Vec<Vec<f32>> = grads.get(chosen.as_tensor()).expect("gradient").to_vec2()?;
//! assert!(g[0].iter().all(|&x| x < 0.0));
//! assert_eq!(g[1][2], 0.0); // padding gets no gradient
//! let (loss, accuracy) = (metrics::LOSS, metrics::REWARDS_ACCURACIES);
//! println!("loss {:.4}, accuracy {}", out.metrics.get(loss).unwrap(), out.metrics.get(accuracy).unwrap());
//! # Ok(())
//! # }
//! ```

mod cpo;
mod dpo;
mod error;
mod logps;
pub mod metrics;
pub mod numerics;
mod objective;
mod objective_serde;
mod orpo;
mod output;
mod sft;
mod simpo;
mod slime;

pub use cpo::{CpoParams, CpoVariant};
pub use dpo::{DpoLossType, DpoParams, IpoParams};
pub use error::{ObjectiveError, Result};
pub use logps::{BatchTotals, DEFAULT_COLLAPSE_DELTA, ObjectiveInputs, ReferenceLogps, SequenceLogps, TokenLogps};
pub use objective::{Aggregation, Loss, Objective, ObjectiveKind, Requirements};
pub use orpo::OrpoParams;
pub use output::{LossOutput, Metrics};
pub use sft::{SftParams, TokenFilter};
pub use simpo::SimpoParams;
pub use slime::{SlimeParams, SlimePreset};

/// The candle version whose tensors and errors this crate's API takes and returns.
pub use candle_core;
