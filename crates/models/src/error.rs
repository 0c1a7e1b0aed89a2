//! The crate's error type.

/// Everything that can go wrong building, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config value this crate does not support or that is invalid, named.
    #[error("{file}: field `{field}`: {reason}")]
    Config {
        /// The config file (or "config" for in-code configs).
        file: String,
        /// The field.
        field: &'static str,
        /// What was wrong and what is expected.
        reason: String,
    },
    /// A GGUF file whose metadata (or tensor directory) does not describe a supported model:
    /// the metadata key or tensor at fault, named.
    #[error("{file}: GGUF `{key}`: {reason}")]
    Gguf {
        /// The GGUF file.
        file: String,
        /// The metadata key (e.g. `llama.block_count`) or tensor name (e.g. `output.weight`).
        key: String,
        /// What was wrong and what is expected.
        reason: String,
    },
    /// Inputs of the wrong shape or dtype.
    #[error("invalid input `{input}`: {reason}")]
    Input {
        /// Which input.
        input: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Reading a file failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
