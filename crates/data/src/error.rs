//! Errors of the data pipeline. Every error about a file names the file and, where it applies,
//! the row group, the row (0-based, counted over the whole file) and the column, and says what
//! was expected.

use std::fmt;
use std::path::PathBuf;

/// Where in a Parquet file a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// Row group index, when known.
    pub row_group: Option<usize>,
    /// Row index over the whole file (0-based), when known.
    pub row: Option<u64>,
    /// Column name, when known.
    pub column: Option<String>,
}

impl Location {
    /// A location naming only the file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), row_group: None, row: None, column: None }
    }

    /// The same location narrowed to a column.
    pub fn column(mut self, column: &str) -> Self {
        self.column = Some(column.to_string());
        self
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(g) = self.row_group {
            write!(f, ", row group {g}")?;
        }
        if let Some(r) = self.row {
            write!(f, ", row {r}")?;
        }
        if let Some(c) = &self.column {
            write!(f, ", column `{c}`")?;
        }
        Ok(())
    }
}

/// An error of the data crate. Locations are boxed to keep `Result<_, DataError>` small.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a readable Parquet file (truncated, another format, corrupt).
    #[error("{location}: not a readable Parquet file: {detail}")]
    NotParquet {
        /// Where.
        location: Box<Location>,
        /// What the Parquet reader said.
        detail: String,
    },
    /// A dataset directory or glob pattern names no readable Parquet file.
    #[error("{path}: {detail}")]
    Shards {
        /// The directory or pattern.
        path: PathBuf,
        /// What was wrong and what was expected.
        detail: String,
    },
    /// A column name occurs more than once, so which column to read is ambiguous.
    #[error("{location}: the column name occurs {count} times; expected each column name once")]
    DuplicateColumn {
        /// Where (names the file and the column).
        location: Box<Location>,
        /// How many columns have this name.
        count: usize,
    },
    /// A column the schema needs is absent.
    #[error("{location}: missing column; expected {expected}; the file has columns [{found}]")]
    MissingColumn {
        /// Where (names the column).
        location: Box<Location>,
        /// What the column should hold.
        expected: String,
        /// The columns the file has.
        found: String,
    },
    /// A column has an unusable type.
    #[error("{location}: wrong type: expected {expected}, found {found}")]
    WrongType {
        /// Where (names the column).
        location: Box<Location>,
        /// The accepted types.
        expected: String,
        /// The type in the file.
        found: String,
    },
    /// A value in a row is unusable (null, empty, no assistant turn, invalid UTF-8, ...).
    #[error("{location}: {problem}")]
    InvalidRow {
        /// Where (file, row group, row, column).
        location: Box<Location>,
        /// What is wrong with the value, and what was expected.
        problem: RowProblem,
    },
    /// A chat template failed to parse or render.
    #[error("chat template `{template}`: {detail}")]
    Template {
        /// Which template.
        template: String,
        /// What went wrong.
        detail: String,
    },
    /// A tokenizer file is unusable, or lacks a special token the template needs.
    #[error("tokenizer {source_name}: {detail}")]
    Tokenizer {
        /// The tokenizer file (or a description of it).
        source_name: String,
        /// What went wrong and what was expected.
        detail: String,
    },
    /// An option is out of range or inconsistent.
    #[error("data option `{field}`: {detail}")]
    Config {
        /// The option.
        field: String,
        /// What was expected.
        detail: String,
    },
}

/// Why a row cannot be used. Also the key of the loader's skip statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowProblem {
    /// A null value where a string or message list was expected.
    Null,
    /// An empty (or whitespace-only) string.
    Empty,
    /// Bytes that are not valid UTF-8.
    NotUtf8,
    /// A message list with no assistant turn to use as the completion.
    NoAssistantTurn,
    /// A message list with turns after the last assistant turn.
    TurnsAfterCompletion,
    /// A message with a null or empty role.
    MissingRole,
    /// Chosen and rejected conversations differ before their final assistant turns.
    ConversationsDiffer,
    /// Implicit prompt: chosen and rejected share no prefix, or one is a prefix of the other.
    NoSharedPrompt,
    /// Truncation to `max_length` left no completion token.
    EmptyAfterTruncation,
    /// The chat template renders the prompt as something that is not a prefix of the full
    /// conversation, so the prompt/completion boundary is undefined.
    TemplateNotPrefix,
}

impl fmt::Display for RowProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Null => "null value; expected a non-empty string or message list",
            Self::Empty => "empty string; expected non-empty text",
            Self::NotUtf8 => "invalid UTF-8; expected UTF-8 text",
            Self::NoAssistantTurn => "message list has no assistant turn; expected the completion as the last assistant turn",
            Self::TurnsAfterCompletion => "message list has turns after its last assistant turn; expected the completion last",
            Self::MissingRole => "message with a null or empty role; expected role and content strings",
            Self::ConversationsDiffer => "chosen and rejected differ before their last assistant turn; expected the same prompt turns",
            Self::NoSharedPrompt => "implicit prompt: chosen and rejected share no prefix or one contains the other; expected a shared prompt then different completions",
            Self::EmptyAfterTruncation => "no completion token left after truncation to max_length",
            Self::TemplateNotPrefix => "the chat template's rendering of the prompt is not a prefix of the rendered conversation",
        })
    }
}

impl RowProblem {
    /// Short name, as used in statistics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Empty => "empty",
            Self::NotUtf8 => "not_utf8",
            Self::NoAssistantTurn => "no_assistant_turn",
            Self::TurnsAfterCompletion => "turns_after_completion",
            Self::MissingRole => "missing_role",
            Self::ConversationsDiffer => "conversations_differ",
            Self::NoSharedPrompt => "no_shared_prompt",
            Self::EmptyAfterTruncation => "empty_after_truncation",
            Self::TemplateNotPrefix => "template_not_prefix",
        }
    }
}

/// Result alias of the data crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
