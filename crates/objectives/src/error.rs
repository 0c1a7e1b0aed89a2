//! The crate's error type.

/// Everything that can go wrong when configuring or evaluating an objective.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    /// A hyperparameter is outside its valid range.
    #[error("invalid {objective} parameter `{field}` = {value}: {expected}")]
    InvalidParam {
        /// Objective name, e.g. `slime`.
        objective: &'static str,
        /// Field name as written in the config.
        field: &'static str,
        /// The offending value.
        value: f64,
        /// What a valid value looks like.
        expected: &'static str,
    },
    /// Two parameters that cannot be combined.
    #[error("invalid {objective} configuration: {reason}")]
    InvalidCombination {
        /// Objective name.
        objective: &'static str,
        /// Why the combination is rejected.
        reason: String,
    },
    /// The objective needs an input the caller did not provide.
    #[error("objective `{objective}` needs {input}, which was not provided")]
    MissingInput {
        /// Objective name.
        objective: &'static str,
        /// The missing input, e.g. "reference log-probs".
        input: &'static str,
    },
    /// Inputs have inconsistent or unexpected shapes, or invalid values.
    #[error("invalid input `{input}`: {reason}")]
    InvalidInput {
        /// Which input, e.g. `chosen.count`.
        input: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A config file or string could not be parsed.
    #[error("cannot parse objective config: {0}")]
    Parse(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`ObjectiveError`].
pub type Result<T> = std::result::Result<T, ObjectiveError>;
