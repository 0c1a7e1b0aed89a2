//! The SLIME training loop: SFT, then a preference objective, with checkpoints and evaluation.
//!
//! [`run::run_with`] trains a model on the embedded default task ([`task`]): SFT, then a
//! preference objective, with gradient accumulation, checkpoints every few steps and exact
//! resumption ([`run::RunOptions::resume`]), non-finite detection that names the step and the
//! loss term, optional LoRA for the preference stage, evaluation ([`run::evaluate_dir`] for a
//! saved model), and a progress bar ([`progress`]). The pieces: the optimiser ([`optim::AdamW`] with
//! exportable state and fused clipping), learning-rate schedules ([`schedule::Schedule`]),
//! atomic [`checkpoint`]s, the JSONL [`metrics_log`] and its keys ([`metrics`]), SAGE-style
//! [`selection`] and the [`config`] of a run (TOML; every field documented in `docs/trainer.md`).
//!
//! ```
//! use slime_trainer::task::{check, generate, TaskTokenizer};
//!
//! let pairs = generate(8, 42);
//! let chosen = TaskTokenizer.encode(&pairs[0].chosen()).expect("in vocabulary");
//! let verdict = check(&pairs[0], &chosen);
//! assert!(verdict.format_valid && verdict.correct);
//! ```

pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod corpus;
mod error;
pub mod generate;
pub mod hf_export;
pub mod kernels;
pub mod logging;
pub mod logps;
pub mod malloc;
pub mod metrics;
pub mod metrics_log;
pub mod model_source;
pub mod optim;
pub mod paths;
pub mod progress;
pub mod run;
pub mod schedule;
pub mod selection;
pub mod task;
pub mod threads;
mod trl_names;
pub mod verifiable;

pub use error::{Result, TrainError};

/// The crates whose types this crate's API uses (models, tokenizers, objectives, tensors), at
/// the versions it was built with.
pub use candle_core;
pub use slime_data;
pub use slime_models;
pub use slime_objectives;
