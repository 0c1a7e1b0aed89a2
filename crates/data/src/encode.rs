//! From a [`PreferenceExample`] to token ids with an exact prompt/completion boundary, and
//! TRL-style truncation.
//!
//! The prompt (rendered with the generation prompt) and each completion (the rest of the
//! rendered conversation, through the end-of-turn marker) are tokenized separately and
//! concatenated, as TRL does and as generation sees them: the completion mask then covers
//! exactly the response tokens and the end-of-turn token, and never a prompt token, even
//! where a joint tokenization would merge characters across the boundary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::batch::TokenizedPair;
use crate::error::{DataError, Result, RowProblem};
use crate::example::PreferenceExample;
use crate::template::ChatTemplate;
use crate::tokenizer::TextTokenizer;

/// Which end of an over-long prompt to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the last tokens (the end of the prompt is closest to the answer); BOS stays. TRL's default.
    #[default]
    KeepEnd,
    /// Keep the first tokens.
    KeepStart,
}

/// Truncation limits (TRL's `max_length`, `max_prompt_length`, `truncation_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Truncation {
    /// Prompt + completion tokens of each sequence at most this many; completions are cut at
    /// their end. `None`: no limit.
    pub max_length: Option<usize>,
    /// Prompt tokens at most this many, cut by `mode`. `None`: no limit.
    pub max_prompt_length: Option<usize>,
    /// Which end of the prompt to keep.
    pub mode: TruncationMode,
}

/// What encoding did, summed over pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EncodeStats {
    /// Pairs encoded.
    pub pairs: u64,
    /// Pairs with a truncated prompt.
    pub truncated_prompts: u64,
    /// Pairs with a truncated completion.
    pub truncated_completions: u64,
    /// Pairs with any truncation.
    pub truncated_pairs: u64,
    /// Pairs skipped, by reason.
    pub skipped: BTreeMap<RowProblem, u64>,
    /// Prompt + chosen + rejected tokens of the encoded pairs.
    pub tokens: u64,
}

impl EncodeStats {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &EncodeStats) {
        self.pairs += other.pairs;
        self.truncated_prompts += other.truncated_prompts;
        self.truncated_completions += other.truncated_completions;
        self.truncated_pairs += other.truncated_pairs;
        self.tokens += other.tokens;
        for (k, v) in &other.skipped {
            *self.skipped.entry(*k).or_default() += v;
        }
    }
}

/// The result of encoding one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// Encoded; the flags say what was truncated.
    Pair {
        /// The tokens.
        pair: TokenizedPair,
        /// The prompt was truncated.
        prompt_truncated: bool,
        /// A completion was truncated.
        completion_truncated: bool,
    },
    /// The pair cannot be used (e.g. truncation left no completion token).
    Skipped(RowProblem),
}

impl Encoded {
    /// Encoded without cutting anything: the pair fits the limits.
    pub fn fits(&self) -> bool {
        matches!(self, Self::Pair { prompt_truncated: false, completion_truncated: false, .. })
    }
}

/// Tokenizes preference examples: chat examples through a template, text examples as they are
/// (BOS per the tokenizer's rule, EOS appended to each completion, as TRL does).
#[derive(Debug)]
pub struct PairEncoder {
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    truncation: Truncation,
}

impl PairEncoder {
    /// An encoder; `template` is needed for chat examples.
    pub fn new(tokenizer: TextTokenizer, template: Option<ChatTemplate>, truncation: Truncation) -> Result<Self> {
        if let Some(t) = &template {
            tokenizer.check_template_tokens(t)?;
        }
        if truncation.max_length == Some(0) {
            return Err(DataError::Config { field: "max_length".into(), detail: "must be at least 2".into() });
        }
        if let (Some(p), Some(m)) = (truncation.max_prompt_length, truncation.max_length)
            && p >= m
        {
            return Err(DataError::Config {
                field: "max_prompt_length".into(),
                detail: format!("{p} leaves no room for a completion within max_length {m}"),
            });
        }
        Ok(Self { tokenizer, template, truncation })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The chat template, if any.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Prompt, chosen and rejected token ids before truncation, or why the pair is unusable.
    pub fn tokens(&self, example: &PreferenceExample) -> Result<std::result::Result<[Vec<u32>; 3], RowProblem>> {
        let t = &self.tokenizer;
        match example {
            PreferenceExample::Text { prompt, chosen, rejected } => {
                let eos = t.specials().eos.as_ref().map(|(_, id)| *id);
                let completion = |s: &str| -> Result<Vec<u32>> {
                    let mut ids = t.encode(s)?;
                    ids.extend(eos);
                    Ok(ids)
                };
                Ok(Ok([t.with_bos(t.encode(prompt)?), completion(chosen)?, completion(rejected)?]))
            }
            PreferenceExample::Chat { prompt, chosen, rejected } => {
                let template = self.template.as_ref().ok_or_else(|| DataError::Config {
                    field: "chat_template".into(),
                    detail: "conversational data needs a chat template (the tokenizer's or a built-in one)".into(),
                })?;
                let Some((prompt_text, chosen_text, rejected_text)) = template.split_pair(prompt, chosen, rejected)?
                else {
                    return Ok(Err(RowProblem::TemplateNotPrefix));
                };
                Ok(Ok([t.with_bos(t.encode(&prompt_text)?), t.encode(&chosen_text)?, t.encode(&rejected_text)?]))
            }
        }
    }

    /// Encodes and truncates one example into a pair with id `id`.
    pub fn encode(&self, id: u64, example: &PreferenceExample) -> Result<Encoded> {
        Ok(self.encode_measured(id, example)?.0)
    }

    /// [`Self::encode`], also returning the pair's length before truncation
    /// ([`crate::pair_length`]; `None` when the pair could not be tokenized into one).
    pub fn encode_measured(&self, id: u64, example: &PreferenceExample) -> Result<(Encoded, Option<usize>)> {
        let [prompt, chosen, rejected] = match self.tokens(example)? {
            Ok(t) => t,
            Err(problem) => return Ok((Encoded::Skipped(problem), None)),
        };
        let length = crate::pair_length(prompt.len(), chosen.len(), rejected.len());
        Ok((self.truncate(id, prompt, chosen, rejected), Some(length)))
    }

    fn truncate(&self, id: u64, mut prompt: Vec<u32>, mut chosen: Vec<u32>, mut rejected: Vec<u32>) -> Encoded {
        let tr = self.truncation;
        let mut prompt_truncated = false;
        if let Some(max) = tr.max_prompt_length
            && prompt.len() > max
        {
            prompt = cut_prompt(prompt, max, tr.mode, self.bos_id());
            prompt_truncated = true;
        }
        let mut completion_truncated = false;
        if let Some(max) = tr.max_length {
            if prompt.len() >= max {
                // No room for a completion token: cut the prompt to leave one, as keep_end would.
                prompt = cut_prompt(prompt, max - 1, tr.mode, self.bos_id());
                prompt_truncated = true;
            }
            let room = max - prompt.len();
            for c in [&mut chosen, &mut rejected] {
                if c.len() > room {
                    c.truncate(room);
                    completion_truncated = true;
                }
            }
        }
        if prompt.is_empty() || chosen.is_empty() || rejected.is_empty() {
            return Encoded::Skipped(RowProblem::EmptyAfterTruncation);
        }
        Encoded::Pair { pair: TokenizedPair { id, prompt, chosen, rejected }, prompt_truncated, completion_truncated }
    }

    fn bos_id(&self) -> Option<u32> {
        self.tokenizer.specials().bos.as_ref().map(|(_, id)| *id)
    }
}

/// The prompt cut to `max` tokens; with [`TruncationMode::KeepEnd`] a leading BOS is kept.
fn cut_prompt(prompt: Vec<u32>, max: usize, mode: TruncationMode, bos: Option<u32>) -> Vec<u32> {
    match mode {
        TruncationMode::KeepStart => prompt[..max].to_vec(),
        TruncationMode::KeepEnd => {
            let keep_bos = max > 1 && bos.is_some() && prompt.first().copied() == bos;
            let tail = &prompt[prompt.len() - (max - usize::from(keep_bos))..];
            if keep_bos { std::iter::once(prompt[0]).chain(tail.iter().copied()).collect() } else { tail.to_vec() }
        }
    }
}

impl EncodeStats {
    /// Counts one encoding outcome.
    pub fn record(&mut self, outcome: &Encoded) {
        match outcome {
            Encoded::Pair { pair, prompt_truncated, completion_truncated } => {
                self.pairs += 1;
                self.truncated_prompts += u64::from(*prompt_truncated);
                self.truncated_completions += u64::from(*completion_truncated);
                self.truncated_pairs += u64::from(*prompt_truncated || *completion_truncated);
                self.tokens += (pair.prompt.len() + pair.chosen.len() + pair.rejected.len()) as u64;
            }
            Encoded::Skipped(problem) => *self.skipped.entry(*problem).or_default() += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_end_keeps_bos_and_the_tail() {
        assert_eq!(cut_prompt(vec![1, 5, 6, 7, 8], 3, TruncationMode::KeepEnd, Some(1)), [1, 7, 8]);
        assert_eq!(cut_prompt(vec![5, 6, 7, 8], 3, TruncationMode::KeepEnd, Some(1)), [6, 7, 8]);
        assert_eq!(cut_prompt(vec![1, 5, 6, 7], 2, TruncationMode::KeepStart, Some(1)), [1, 5]);
        assert_eq!(cut_prompt(vec![1, 5, 6], 1, TruncationMode::KeepEnd, Some(1)), [6]);
    }
}
