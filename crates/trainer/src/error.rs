//! The trainer's error type.

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An invalid configuration value, named.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A wrong input path (missing, a directory where a file was expected, ...) or a run
    /// directory another trainer holds; the message names the path and what was expected.
    #[error("{0}")]
    Input(String),
    /// A checkpoint that cannot be written or read back.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A non-finite loss or gradient.
    #[error("step {step} (run step {run_step}): {what} is not finite ({value}); {}", checkpoint_note(.last_checkpoint))]
    NonFinite {
        /// Optimiser step within its stage.
        step: u64,
        /// The run's global step (SFT steps, then preference steps), as checkpoints are named.
        run_step: u64,
        /// The newest checkpoint on disk, written before the fault (all its weights finite).
        last_checkpoint: Option<String>,
        /// The offending quantity, e.g. `loss term slime/stabilizer`.
        what: String,
        /// Its value.
        value: f64,
    },
    /// An objective error.
    #[error(transparent)]
    Objective(#[from] slime_objectives::ObjectiveError),
    /// A model error.
    #[error(transparent)]
    Model(#[from] slime_models::ModelError),
    /// A data error (Parquet file, tokenizer, chat template), naming the file (boxed: the
    /// data crate's error is large).
    #[error(transparent)]
    Data(Box<slime_data::DataError>),
    /// A candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl From<slime_data::DataError> for TrainError {
    fn from(e: slime_data::DataError) -> Self {
        Self::Data(Box::new(e))
    }
}

fn checkpoint_note(last: &Option<String>) -> String {
    match last {
        Some(name) => format!("the last checkpoint, {name}, is intact"),
        None => "no checkpoint was written before it".into(),
    }
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
