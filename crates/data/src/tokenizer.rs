//! A Hugging Face `tokenizer.json` with the special tokens and BOS rule of its model family,
//! read from `tokenizer_config.json` when there is one.
//!
//! Text is always encoded without the tokenizer's post-processor (`add_special_tokens =
//! false`); the BOS token is added by [`TextTokenizer::with_bos`] exactly once, so a template
//! that writes `bos_token` and a tokenizer that adds it never give two (the Gemma trap).

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{DataError, Result};
use crate::template::{BuiltinTemplate, ChatTemplate};

/// The tokenizer's special tokens and its BOS rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// BOS string and id.
    pub bos: Option<(String, u32)>,
    /// EOS string and id.
    pub eos: Option<(String, u32)>,
    /// Padding id (the pad token, else EOS, else 0).
    pub pad_id: u32,
    /// Whether sequences start with BOS (`add_bos_token`, else what the post-processor does).
    pub add_bos: bool,
}

/// A tokenizer plus its special tokens and (optional) chat template source.
pub struct TextTokenizer {
    inner: Tokenizer,
    source: String,
    specials: SpecialTokens,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("source", &self.source).field("specials", &self.specials).finish()
    }
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, if present, the `tokenizer_config.json` beside it.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = dir.join("tokenizer_config.json");
        Self::from_files(dir.join("tokenizer.json"), config.exists().then_some(config.as_path()))
    }

    /// Loads a `tokenizer.json` and an optional `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: impl AsRef<Path>, config: Option<&Path>) -> Result<Self> {
        let path = tokenizer_json.as_ref();
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
            source_name: source.clone(),
            detail: format!("not a valid tokenizer.json: {e}"),
        })?;
        let config: Value = match config {
            Some(c) => {
                let text =
                    std::fs::read_to_string(c).map_err(|source| DataError::Io { path: c.to_path_buf(), source })?;
                serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
                    source_name: c.display().to_string(),
                    detail: format!("not valid JSON: {e}"),
                })?
            }
            None => Value::Null,
        };
        Self::from_parts(inner, &source, &config)
    }

    /// A tokenizer with settings from a parsed `tokenizer_config.json` (`Value::Null` if none).
    pub fn from_parts(inner: Tokenizer, source: &str, config: &Value) -> Result<Self> {
        let lookup = |field: &str| -> Result<Option<(String, u32)>> {
            let Some(s) = token_string(config.get(field)) else { return Ok(None) };
            let id = inner.token_to_id(&s).ok_or_else(|| DataError::Tokenizer {
                source_name: source.to_string(),
                detail: format!("tokenizer_config.json names {field} `{s}`, which is not in the vocabulary"),
            })?;
            Ok(Some((s, id)))
        };
        let bos = lookup("bos_token")?;
        let eos = lookup("eos_token")?;
        let pad = lookup("pad_token")?;
        let add_bos = match config.get("add_bos_token").and_then(Value::as_bool) {
            Some(b) => b,
            None => bos.as_ref().is_some_and(|(_, id)| post_processor_adds(&inner, *id)),
        };
        let pad_id = pad.or(eos.clone()).map_or(0, |(_, id)| id);
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the one named "default", else the first.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            inner,
            source: source.to_string(),
            specials: SpecialTokens { bos, eos, pad_id, add_bos },
            chat_template,
        })
    }

    /// A tokenizer with explicit special tokens (for tokenizers built in code).
    pub fn with_specials(inner: Tokenizer, source: &str, specials: SpecialTokens) -> Self {
        Self { inner, source: source.to_string(), specials, chat_template: None }
    }

    /// The special tokens.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`, special-token strings in it recognised, nothing added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| DataError::Tokenizer {
            source_name: self.source.clone(),
            detail: format!("encoding failed: {e}"),
        })
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| DataError::Tokenizer {
            source_name: self.source.clone(),
            detail: format!("decoding failed: {e}"),
        })
    }

    /// `ids` with BOS in front when the family uses BOS and it is not there already.
    pub fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let (true, Some((_, bos))) = (self.specials.add_bos, &self.specials.bos)
            && ids.first() != Some(bos)
        {
            ids.insert(0, *bos);
        }
        ids
    }

    /// The chat template from `tokenizer_config.json`, else `fallback`; checks that every
    /// special token the template writes is a single token of this vocabulary.
    pub fn chat_template(&self, fallback: Option<BuiltinTemplate>) -> Result<ChatTemplate> {
        let bos = self.specials.bos.as_ref().map_or("", |(s, _)| s.as_str());
        let eos = self.specials.eos.as_ref().map_or("", |(s, _)| s.as_str());
        let template = match (&self.chat_template, fallback) {
            (Some(source), _) => ChatTemplate::new("tokenizer_config.json chat_template", source, bos, eos)?,
            (None, Some(builtin)) => ChatTemplate::builtin(builtin, bos, eos)?,
            (None, None) => {
                return Err(DataError::Tokenizer {
                    source_name: self.source.clone(),
                    detail: "has no chat_template and no built-in fallback (llama3, gemma, chatml) was chosen".into(),
                });
            }
        };
        self.check_template_tokens(&template)?;
        Ok(template)
    }

    /// Errors unless each special token `template` writes is one token here.
    pub fn check_template_tokens(&self, template: &ChatTemplate) -> Result<()> {
        for token in template.required_tokens() {
            let single = self.encode(&token)?.len() == 1 && self.token_id(&token).is_some();
            if !single {
                return Err(DataError::Tokenizer {
                    source_name: self.source.clone(),
                    detail: format!(
                        "the {} chat template writes `{token}`, which this tokenizer does not have as a special token",
                        template.name()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Whether the tokenizer's post-processor puts `bos` in front of an encoding.
fn post_processor_adds(t: &Tokenizer, bos: u32) -> bool {
    t.encode_fast("a", true).is_ok_and(|e| e.get_ids().first() == Some(&bos))
}
