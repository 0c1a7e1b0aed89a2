//! A fast encoder for GPT-2-style byte-level BPE tokenizers, giving exactly the ids of
//! `tokenizers`' `encode_fast(text, false)` (checked token for token by property tests).
//!
//! It applies when the `tokenizer.json` has no normalizer, a `ByteLevel` pre-tokenizer (GPT-2
//! regex or none), optionally after `Digits`, a BPE model without dropout, prefixes or suffixes
//! whose 256 byte symbols are all in the vocabulary, no truncation or padding, and added tokens
//! without `single_word`. Otherwise [`FastBpe::from_tokenizer`] gives `None` and `tokenizers` is
//! used. Speed comes from a hand-written pre-tokenizer (no regex engine) and a bounded word
//! cache in front of the merges (most words repeat).

mod added;
mod config;
mod merge;
mod pretokenize;

use tokenizers::Tokenizer;

use added::{Matcher, Part};
use merge::{Merges, WordCache, merge_word};
use pretokenize::{digit_split, gpt2_words};

/// Marks a byte without a symbol in the vocabulary.
const NO_ID: u32 = u32::MAX;

/// The fast encoder (see the module docs for when it applies).
#[derive(Debug)]
pub(crate) struct FastBpe {
    /// Added tokens matched on the raw text (`normalized: false`).
    raw_tokens: Matcher,
    /// Added tokens matched on the rest (`normalized: true`; no normalizer, so the same text).
    normalized_tokens: Matcher,
    /// `Digits` before `ByteLevel`: `Some(individual_digits)`.
    digits: Option<bool>,
    /// `ByteLevel.add_prefix_space`: each piece not starting with `' '` gets one.
    add_prefix_space: bool,
    /// `ByteLevel.use_regex`: split pieces with the GPT-2 regex.
    use_regex: bool,
    /// Id of each byte's symbol (GPT-2's byte-to-unicode mapping), [`NO_ID`] if not in the
    /// vocabulary (then dropped, as `tokenizers` does without an unknown token).
    byte_ids: [u32; 256],
    merges: Merges,
    /// With `ignore_merges`: the vocabulary by byte string, a whole word in it is one token.
    whole_words: Option<merge::FxMap<Vec<u8>, u32>>,
    cache: WordCache,
}

impl FastBpe {
    /// The fast encoder for `t`, or `None` where it would not give `t`'s ids.
    pub fn from_tokenizer(t: &Tokenizer) -> Option<Self> {
        let fast = config::build(t)?;
        // Belt and braces: a probe text must give the same ids both ways.
        let probe = config::probe_text(t);
        let expected = t.encode_fast(probe.as_str(), false).ok()?;
        (fast.encode(&probe) == expected.get_ids()).then_some(fast)
    }

    /// Token ids of `text`, added tokens recognised, nothing added.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        self.raw_tokens.split(text, &mut |part| match part {
            Part::Token(id) => out.push(id),
            Part::Text(s) => self.normalized_tokens.split(s, &mut |part| match part {
                Part::Token(id) => out.push(id),
                Part::Text(s) => match self.digits {
                    Some(individual) => digit_split(s, individual, |p| self.byte_level(p, &mut out)),
                    None => self.byte_level(s, &mut out),
                },
            }),
        });
        out
    }

    /// `ByteLevel` on one piece: prefix space, regex split, BPE per word.
    fn byte_level(&self, piece: &str, out: &mut Vec<u32>) {
        let prefixed;
        let piece = if self.add_prefix_space && !piece.starts_with(' ') {
            prefixed = format!(" {piece}");
            prefixed.as_str()
        } else {
            piece
        };
        if self.use_regex {
            gpt2_words(piece, |w| self.word(w, out));
        } else {
            self.word(piece, out);
        }
    }

    /// BPE ids of one pre-tokenized word, through the cache.
    fn word(&self, w: &str, out: &mut Vec<u32>) {
        if let [b] = w.as_bytes()
            && self.whole_words.is_none()
        {
            let id = self.byte_ids[*b as usize];
            if id != NO_ID {
                out.push(id);
            }
            return;
        }
        if self.cache.get(w, out) {
            return;
        }
        let start = out.len();
        match self.whole_words.as_ref().and_then(|v| v.get(w.as_bytes())) {
            Some(&id) => out.push(id),
            None => {
                let symbols: Vec<u32> =
                    w.bytes().map(|b| self.byte_ids[b as usize]).filter(|&id| id != NO_ID).collect();
                merge_word(&symbols, &self.merges, out);
            }
        }
        self.cache.insert(w, &out[start..]);
    }
}
