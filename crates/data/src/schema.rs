//! Which columns hold what, and which TRL layout a file uses.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Location, Result};

/// Column names of the three fields (TRL's names by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ColumnNames {
    /// Prompt column (text or message list); absent in the implicit-prompt layout.
    pub prompt: String,
    /// Preferred completion (text or message list).
    pub chosen: String,
    /// Dispreferred completion (text or message list).
    pub rejected: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self { prompt: "prompt".into(), chosen: "chosen".into(), rejected: "rejected".into() }
    }
}

/// The TRL preference layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `prompt`, `chosen`, `rejected` strings.
    Standard,
    /// `chosen` / `rejected` as `list<struct<role, content>>`; `prompt` a string, a message list
    /// or absent (UltraFeedback-binarized keeps the prompt turns inside `chosen`).
    Conversational,
    /// `chosen` / `rejected` strings with no prompt column: the shared prefix is the prompt.
    ImplicitPrompt,
}

/// How a column's values are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnKind {
    /// Utf8 / LargeUtf8 / Utf8View / Binary / LargeBinary / BinaryView.
    Text,
    /// List / LargeList of struct with text `role` and `content` fields.
    Messages,
}

pub(crate) const TEXT_TYPES: &str = "a string column (utf8, large_utf8, utf8_view or binary)";
pub(crate) const MESSAGE_TYPES: &str = "a string or list<struct<role: string, content: string>> column";

fn is_text(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

fn kind_of(t: &DataType) -> Option<ColumnKind> {
    if is_text(t) {
        return Some(ColumnKind::Text);
    }
    let item = match t {
        DataType::List(f) | DataType::LargeList(f) => f.data_type(),
        _ => return None,
    };
    let DataType::Struct(fields) = item else { return None };
    let text_field = |name: &str| fields.iter().any(|f| f.name() == name && is_text(f.data_type()));
    (text_field("role") && text_field("content")).then_some(ColumnKind::Messages)
}

/// The resolved layout of a file: layout and the kind of each used column.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub layout: Layout,
    pub prompt: Option<ColumnKind>,
    pub completions: ColumnKind,
}

/// Checks the file's schema against the names and the (detected or requested) layout.
pub(crate) fn resolve(schema: &Schema, names: &ColumnNames, layout: Option<Layout>, at: &Location) -> Result<Resolved> {
    let found = || schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ");
    reject_duplicate_columns(schema, at)?;
    let column = |name: &str, expected: &str| -> Result<ColumnKind> {
        let field = schema.field_with_name(name).map_err(|_| DataError::MissingColumn {
            location: at.clone().column(name).into(),
            expected: expected.to_string(),
            found: found(),
        })?;
        kind_of(field.data_type()).ok_or_else(|| DataError::WrongType {
            location: at.clone().column(name).into(),
            expected: expected.to_string(),
            found: field.data_type().to_string(),
        })
    };
    let chosen = column(&names.chosen, MESSAGE_TYPES)?;
    let rejected = column(&names.rejected, MESSAGE_TYPES)?;
    if chosen != rejected {
        let field = schema.field_with_name(&names.rejected).map(|f| f.data_type().to_string()).unwrap_or_default();
        let expected = if chosen == ColumnKind::Text { TEXT_TYPES } else { "a message list like `chosen`" };
        return Err(DataError::WrongType {
            location: at.clone().column(&names.rejected).into(),
            expected: format!("{expected} (the same kind as `{}`)", names.chosen),
            found: field,
        });
    }
    let has_prompt = schema.field_with_name(&names.prompt).is_ok();
    let layout = layout.unwrap_or(match (chosen, has_prompt) {
        (ColumnKind::Messages, _) => Layout::Conversational,
        (ColumnKind::Text, true) => Layout::Standard,
        (ColumnKind::Text, false) => Layout::ImplicitPrompt,
    });
    let prompt = match layout {
        Layout::Standard => {
            expect_kind(chosen, ColumnKind::Text, &names.chosen, schema, at)?;
            let kind = column(&names.prompt, TEXT_TYPES)?;
            expect_kind(kind, ColumnKind::Text, &names.prompt, schema, at)?;
            Some(kind)
        }
        Layout::ImplicitPrompt => {
            expect_kind(chosen, ColumnKind::Text, &names.chosen, schema, at)?;
            None
        }
        Layout::Conversational => {
            expect_kind(chosen, ColumnKind::Messages, &names.chosen, schema, at)?;
            if has_prompt { Some(column(&names.prompt, MESSAGE_TYPES)?) } else { None }
        }
    };
    Ok(Resolved { layout, prompt, completions: chosen })
}

/// A file with two columns of one name is ambiguous (a reader would silently take one of
/// them): rejected, naming the first such column.
fn reject_duplicate_columns(schema: &Schema, at: &Location) -> Result<()> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for field in schema.fields() {
        *counts.entry(field.name().as_str()).or_default() += 1;
    }
    match schema.fields().iter().find(|f| counts[f.name().as_str()] > 1) {
        Some(f) => Err(DataError::DuplicateColumn {
            location: at.clone().column(f.name()).into(),
            count: counts[f.name().as_str()],
        }),
        None => Ok(()),
    }
}

fn expect_kind(kind: ColumnKind, want: ColumnKind, name: &str, schema: &Schema, at: &Location) -> Result<()> {
    if kind == want {
        return Ok(());
    }
    Err(DataError::WrongType {
        location: at.clone().column(name).into(),
        expected: if want == ColumnKind::Text { TEXT_TYPES } else { "list<struct<role: string, content: string>>" }
            .to_string(),
        found: schema.field_with_name(name).map(|f| f.data_type().to_string()).unwrap_or_default(),
    })
}

/// The same type with every string type replaced by its binary twin, so that the reader
/// hands over raw bytes and UTF-8 is validated per row (errors then name the row).
pub(crate) fn as_binary(t: &DataType) -> DataType {
    match t {
        DataType::Utf8 => DataType::Binary,
        DataType::LargeUtf8 => DataType::LargeBinary,
        DataType::Utf8View => DataType::BinaryView,
        DataType::List(f) => DataType::List(binary_field(f)),
        DataType::LargeList(f) => DataType::LargeList(binary_field(f)),
        DataType::Struct(fields) => DataType::Struct(Fields::from(
            fields.iter().map(|f| binary_field(f).as_ref().clone()).collect::<Vec<Field>>(),
        )),
        other => other.clone(),
    }
}

fn binary_field(f: &Arc<Field>) -> Arc<Field> {
    Arc::new(f.as_ref().clone().with_data_type(as_binary(f.data_type())))
}

/// The Arrow schema of the standard layout (all three columns non-null strings).
pub fn standard_schema(names: &ColumnNames) -> Schema {
    Schema::new(vec![
        Field::new(&names.prompt, DataType::Utf8, false),
        Field::new(&names.chosen, DataType::Utf8, false),
        Field::new(&names.rejected, DataType::Utf8, false),
    ])
}

/// The Arrow type of a message list: `list<struct<role: utf8, content: utf8>>`.
pub fn messages_type() -> DataType {
    let fields =
        Fields::from(vec![Field::new("role", DataType::Utf8, false), Field::new("content", DataType::Utf8, false)]);
    DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), false)))
}

/// The Arrow schema of the conversational layout (prompt, chosen, rejected message lists).
pub fn conversational_schema(names: &ColumnNames) -> Schema {
    Schema::new(vec![
        Field::new(&names.prompt, messages_type(), false),
        Field::new(&names.chosen, messages_type(), false),
        Field::new(&names.rejected, messages_type(), false),
    ])
}
