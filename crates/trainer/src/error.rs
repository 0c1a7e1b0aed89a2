//! The trainer's error type.

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An invalid configuration value, named.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A checkpoint that cannot be written or read back.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A non-finite loss or gradient.
    #[error("step {step}: {what} is not finite ({value}); the last checkpoint is intact")]
    NonFinite {
        /// Optimiser step.
        step: u64,
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

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
