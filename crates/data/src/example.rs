//! Preference examples in the two TRL shapes, and the rules that turn a raw row into one.
//!
//! - Standard: `prompt`, `chosen`, `rejected` are plain text; no chat template is applied.
//! - Conversational: message lists. The completion is the last assistant turn of `chosen` /
//!   `rejected`; turns before it belong to the prompt (UltraFeedback-binarized repeats the user
//!   turn inside `chosen`), and must be the same in both.
//! - Implicit prompt: no prompt column; the prompt is the shared prefix of chosen and rejected.

use serde::{Deserialize, Serialize};

use crate::error::RowProblem;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// A raw cell: text or a message list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turns {
    /// A string cell.
    Text(String),
    /// A `list<struct<role, content>>` cell.
    Messages(Vec<Message>),
}

/// A preference pair ready for templating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum PreferenceExample {
    /// Plain text, no chat template (TRL standard format).
    Text {
        /// Prompt text.
        prompt: String,
        /// Preferred completion.
        chosen: String,
        /// Dispreferred completion.
        rejected: String,
    },
    /// A conversation (TRL conversational format).
    Chat {
        /// The turns before the completion (at least one).
        prompt: Vec<Message>,
        /// The preferred final assistant message.
        chosen: Message,
        /// The dispreferred final assistant message.
        rejected: Message,
    },
}

impl PreferenceExample {
    /// Builds an example from raw cells; `prompt` is `None` for the implicit-prompt layout.
    pub fn from_cells(prompt: Option<Turns>, chosen: Turns, rejected: Turns) -> Result<Self, RowProblem> {
        match (prompt, chosen, rejected) {
            (Some(Turns::Text(prompt)), Turns::Text(chosen), Turns::Text(rejected)) => {
                for s in [&prompt, &chosen, &rejected] {
                    non_empty(s)?;
                }
                Ok(Self::Text { prompt, chosen, rejected })
            }
            (None, Turns::Text(chosen), Turns::Text(rejected)) => implicit_text(chosen, rejected),
            (prompt, Turns::Messages(chosen), Turns::Messages(rejected)) => {
                let prompt = match prompt {
                    None => Vec::new(),
                    Some(Turns::Text(p)) => vec![Message::new("user", &p)],
                    Some(Turns::Messages(m)) => m,
                };
                chat(prompt, chosen, rejected)
            }
            // Mixed text / message cells: the reader never produces these (it types columns).
            _ => Err(RowProblem::ConversationsDiffer),
        }
    }

    /// A stable 64-bit digest of the content (FNV-1a), independent of file order and layout.
    pub fn content_hash(&self) -> u64 {
        let mut h = Fnv::new();
        match self {
            Self::Text { prompt, chosen, rejected } => {
                for s in [prompt, chosen, rejected] {
                    h.write_str(s);
                }
            }
            Self::Chat { prompt, chosen, rejected } => {
                for m in prompt.iter().chain([chosen, rejected]) {
                    h.write_str(&m.role);
                    h.write_str(&m.content);
                }
            }
        }
        h.finish()
    }
}

fn non_empty(s: &str) -> Result<(), RowProblem> {
    if s.trim().is_empty() { Err(RowProblem::Empty) } else { Ok(()) }
}

/// Implicit prompt on text: the longest shared prefix (on a character boundary) is the prompt.
fn implicit_text(chosen: String, rejected: String) -> Result<PreferenceExample, RowProblem> {
    non_empty(&chosen)?;
    non_empty(&rejected)?;
    let shared = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(chosen.len().min(rejected.len()));
    if shared == 0 || shared == chosen.len() || shared == rejected.len() {
        return Err(RowProblem::NoSharedPrompt);
    }
    Ok(PreferenceExample::Text {
        prompt: chosen[..shared].to_string(),
        chosen: chosen[shared..].to_string(),
        rejected: rejected[shared..].to_string(),
    })
}

/// Splits a message list at its last assistant turn: (turns before, the completion).
fn split_last_assistant(mut turns: Vec<Message>) -> Result<(Vec<Message>, Message), RowProblem> {
    if turns.iter().any(|m| m.role.trim().is_empty()) {
        return Err(RowProblem::MissingRole);
    }
    let last = turns.iter().rposition(|m| m.role == "assistant").ok_or(RowProblem::NoAssistantTurn)?;
    if last + 1 != turns.len() {
        return Err(RowProblem::TurnsAfterCompletion);
    }
    let completion = turns.pop().ok_or(RowProblem::NoAssistantTurn)?;
    non_empty(&completion.content)?;
    Ok((turns, completion))
}

fn chat(prompt: Vec<Message>, chosen: Vec<Message>, rejected: Vec<Message>) -> Result<PreferenceExample, RowProblem> {
    if prompt.iter().any(|m| m.role.trim().is_empty()) {
        return Err(RowProblem::MissingRole);
    }
    let (chosen_context, chosen) = split_last_assistant(chosen)?;
    let (rejected_context, rejected) = split_last_assistant(rejected)?;
    if chosen_context != rejected_context {
        return Err(RowProblem::ConversationsDiffer);
    }
    // The conversation context inside chosen (UltraFeedback-binarized) is the full prompt;
    // otherwise the prompt column is.
    let prompt = if chosen_context.is_empty() { prompt } else { chosen_context };
    if prompt.is_empty() || prompt.iter().all(|m| m.content.trim().is_empty()) {
        return Err(RowProblem::Empty);
    }
    Ok(PreferenceExample::Chat { prompt, chosen, rejected })
}

/// FNV-1a, 64 bit, with a length prefix per string so that ("ab","c") != ("a","bc").
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_str(&mut self, s: &str) {
        self.write(&(s.len() as u64).to_le_bytes());
        self.write(s.as_bytes());
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(list: &[(&str, &str)]) -> Turns {
        Turns::Messages(list.iter().map(|(r, c)| Message::new(r, c)).collect())
    }

    #[test]
    fn ultrafeedback_layout_takes_the_prompt_from_the_conversation() {
        let ex = PreferenceExample::from_cells(
            Some(Turns::Text("Q?".into())),
            msgs(&[("user", "Q?"), ("assistant", "good")]),
            msgs(&[("user", "Q?"), ("assistant", "bad")]),
        )
        .unwrap();
        assert_eq!(
            ex,
            PreferenceExample::Chat {
                prompt: vec![Message::new("user", "Q?")],
                chosen: Message::new("assistant", "good"),
                rejected: Message::new("assistant", "bad"),
            }
        );
    }

    #[test]
    fn conversational_rules() {
        let p = || Some(msgs(&[("user", "hi")]));
        let e = |c, r| PreferenceExample::from_cells(p(), c, r).unwrap_err();
        assert_eq!(e(msgs(&[("user", "x")]), msgs(&[("assistant", "y")])), RowProblem::NoAssistantTurn);
        assert_eq!(
            e(msgs(&[("assistant", "x"), ("user", "more")]), msgs(&[("assistant", "y")])),
            RowProblem::TurnsAfterCompletion
        );
        assert_eq!(
            e(msgs(&[("user", "a"), ("assistant", "x")]), msgs(&[("user", "b"), ("assistant", "y")])),
            RowProblem::ConversationsDiffer
        );
        assert_eq!(e(msgs(&[("assistant", " ")]), msgs(&[("assistant", "y")])), RowProblem::Empty);
        assert_eq!(e(msgs(&[("", "x")]), msgs(&[("assistant", "y")])), RowProblem::MissingRole);
        let none = PreferenceExample::from_cells(None, msgs(&[("assistant", "x")]), msgs(&[("assistant", "y")]));
        assert_eq!(none.unwrap_err(), RowProblem::Empty);
    }

    #[test]
    fn implicit_prompt_is_the_shared_prefix_on_char_boundaries() {
        let ex = PreferenceExample::from_cells(None, Turns::Text("Q: é1".into()), Turns::Text("Q: é2".into())).unwrap();
        assert_eq!(ex, PreferenceExample::Text { prompt: "Q: é".into(), chosen: "1".into(), rejected: "2".into() });
        // 'é' (c3 a9) vs 'è' (c3 a8) share a byte but not a character.
        let ex = PreferenceExample::from_cells(None, Turns::Text("aé".into()), Turns::Text("aè".into())).unwrap();
        assert_eq!(ex, PreferenceExample::Text { prompt: "a".into(), chosen: "é".into(), rejected: "è".into() });
        let e = PreferenceExample::from_cells(None, Turns::Text("abc".into()), Turns::Text("ab".into()));
        assert_eq!(e.unwrap_err(), RowProblem::NoSharedPrompt);
    }

    #[test]
    fn content_hash_separates_fields() {
        let a = PreferenceExample::Text { prompt: "ab".into(), chosen: "c".into(), rejected: "d".into() };
        let b = PreferenceExample::Text { prompt: "a".into(), chosen: "bc".into(), rejected: "d".into() };
        assert_ne!(a.content_hash(), b.content_hash());
        assert_eq!(a.content_hash(), a.clone().content_hash());
    }
}
