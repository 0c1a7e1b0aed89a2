//! Reads a `tokenizers::Tokenizer`'s JSON form and decides whether [`FastBpe`] applies.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::added::{AddedToken, Matcher};
use super::merge::{FxMap, Merges, WordCache};
use super::{FastBpe, NO_ID};

#[derive(Deserialize)]
struct TokenizerJson {
    #[serde(default)]
    truncation: Value,
    #[serde(default)]
    padding: Value,
    #[serde(default)]
    added_tokens: Vec<AddedJson>,
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    model: ModelJson,
}

#[derive(Deserialize)]
struct AddedJson {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: bool,
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeJson>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Pair(String, String),
    Legacy(String),
}

/// GPT-2's byte-to-unicode map: printable Latin-1 bytes map to themselves, the other 68 to
/// U+0100.. in byte order (as `tokenizers`' `bytes_char`).
pub(super) fn bytes_char() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        map[b as usize] = if printable(b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(0x100 + n - 1).unwrap_or('\0')
        };
    }
    map
}

/// `(digits, add_prefix_space, use_regex)` for `ByteLevel` or `Sequence[Digits?, ByteLevel]`.
fn pre_tokenizer(v: &Value) -> Option<(Option<bool>, bool, bool)> {
    let byte_level = |v: &Value| -> Option<(bool, bool)> {
        (v.get("type")?.as_str()? == "ByteLevel").then_some(())?;
        let prefix = v.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true);
        let regex = v.get("use_regex").and_then(Value::as_bool).unwrap_or(true);
        Some((prefix, regex))
    };
    match v.get("type")?.as_str()? {
        "ByteLevel" => byte_level(v).map(|(p, r)| (None, p, r)),
        "Sequence" => match v.get("pretokenizers")?.as_array()?.as_slice() {
            [b] => byte_level(b).map(|(p, r)| (None, p, r)),
            [d, b] if d.get("type")?.as_str()? == "Digits" => {
                let individual = d.get("individual_digits").and_then(Value::as_bool).unwrap_or(false);
                byte_level(b).map(|(p, r)| (Some(individual), p, r))
            }
            _ => None,
        },
        _ => None,
    }
}

/// The fast encoder's tables, or `None` if `t` has something it does not reproduce.
pub(super) fn build(t: &Tokenizer) -> Option<FastBpe> {
    let bpe = matches!(t.get_model(), tokenizers::ModelWrapper::BPE(_));
    if t.get_encode_special_tokens() || t.get_normalizer().is_some() || !bpe {
        return None;
    }
    let json: TokenizerJson = serde_json::from_str(&t.to_string(false).ok()?).ok()?;
    if !json.truncation.is_null() || !json.padding.is_null() || !json.normalizer.is_null() {
        return None;
    }
    let (digits, add_prefix_space, use_regex) = pre_tokenizer(&json.pre_tokenizer)?;
    let m = json.model;
    let no_affix = |a: &Option<String>| a.as_deref().is_none_or(str::is_empty);
    if m.kind.as_deref().is_some_and(|k| k != "BPE")
        || m.dropout.is_some_and(|d| d != 0.0)
        || !no_affix(&m.continuing_subword_prefix)
        || !no_affix(&m.end_of_word_suffix)
    {
        return None;
    }

    let chars = bytes_char();
    // A byte symbol missing from the vocabulary is dropped by `tokenizers` when there is no
    // unknown token and no byte fallback (SmolLM2 lacks bytes never seen in training).
    let mut byte_ids = [NO_ID; 256];
    for (b, c) in chars.iter().enumerate() {
        match m.vocab.get(c.encode_utf8(&mut [0; 4]) as &str) {
            Some(&id) => byte_ids[b] = id,
            None if m.unk_token.is_none() && !m.byte_fallback => {}
            None => return None,
        }
    }
    let mut merges = Merges::default();
    merges.reserve(m.merges.len());
    let legacy = m.merges.iter().filter(|p| !matches!(p, MergeJson::Legacy(s) if s.starts_with("#version")));
    for (rank, p) in legacy.enumerate() {
        let (a, b) = match p {
            MergeJson::Pair(a, b) => (a.as_str(), b.as_str()),
            MergeJson::Legacy(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => return None,
                }
            }
        };
        let key = (u64::from(*m.vocab.get(a)?) << 32) | u64::from(*m.vocab.get(b)?);
        let new_id = *m.vocab.get(&format!("{a}{b}"))?;
        merges.insert(key, (rank as u32, new_id));
    }
    let whole_words = m.ignore_merges.then(|| {
        let char_byte: HashMap<char, u8> = chars.iter().enumerate().map(|(b, c)| (*c, b as u8)).collect();
        let mut map = FxMap::default();
        for (token, id) in &m.vocab {
            if let Some(bytes) = token.chars().map(|c| char_byte.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                map.insert(bytes, *id);
            }
        }
        map
    });

    let (mut raw, mut normalized) = (Vec::new(), Vec::new());
    for a in json.added_tokens {
        let edge_space = a.content.starts_with(char::is_whitespace) || a.content.ends_with(char::is_whitespace);
        if a.single_word || a.content.is_empty() || ((a.lstrip || a.rstrip) && edge_space) {
            return None;
        }
        let token = AddedToken { content: a.content, id: a.id, lstrip: a.lstrip, rstrip: a.rstrip };
        if a.normalized { normalized.push(token) } else { raw.push(token) }
    }
    Some(FastBpe {
        raw_tokens: Matcher::new(raw),
        normalized_tokens: Matcher::new(normalized),
        digits,
        add_prefix_space,
        use_regex,
        byte_ids,
        merges,
        whole_words,
        cache: WordCache::default(),
    })
}

/// A text exercising every branch of the pre-tokenizer, with some added tokens in it.
pub(super) fn probe_text(t: &Tokenizer) -> String {
    let mut added: Vec<String> = t.get_added_tokens_decoder().into_values().map(|a| a.content).collect();
    added.sort();
    let mut s = String::from("Hello world's  end, don't\tx 42!?  \n\n  naïve café 日本語 ١٢٣ Ⅻ x²  ");
    for (i, a) in added.iter().take(8).enumerate() {
        s.push_str(a);
        s.push_str(if i % 2 == 0 { " a " } else { "b\n" });
    }
    s.push_str("end ");
    s
}
