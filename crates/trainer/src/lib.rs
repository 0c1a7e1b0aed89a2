//! The SLIME training loop: SFT, then a preference objective, with checkpoints and evaluation.
//!
//! This crate is under construction: today it provides the optimiser ([`optim::AdamW`] with
//! exportable state and fused clipping), learning-rate schedules ([`schedule::Schedule`]),
//! atomic [`checkpoint`]s, the JSONL [`metrics_log`], SAGE-style [`selection`] and the embedded
//! default task ([`task`]) whose quality and format validity a program can check.
//!
//! ```
//! use slime_trainer::task::{check, generate, TaskTokenizer};
//!
//! let pairs = generate(8, 42);
//! let chosen = TaskTokenizer.encode(&pairs[0].chosen()).expect("in vocabulary");
//! let verdict = check(&pairs[0], &chosen);
//! assert!(verdict.format_valid && verdict.correct);
//! ```

pub mod checkpoint;
pub mod config;
mod error;
pub mod metrics_log;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod selection;
pub mod task;

pub use error::{Result, TrainError};
