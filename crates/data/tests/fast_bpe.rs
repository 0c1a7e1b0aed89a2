//! The fast byte-level BPE path of `TextTokenizer::encode` against `tokenizers` itself, token for
//! token: random multi-script text with whitespace runs, contractions and special tokens, on a
//! trained fixture BPE in several configurations (prefix space, `Digits`, `ignore_merges`,
//! normalized / lstrip / rstrip added tokens) and on SmolLM2's real tokenizer when present.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{Value, json};
use slime_data::fixtures::{FIXTURE_SPECIAL_TOKENS, synthetic_chat_pairs, texts_of, train_byte_level_bpe};
use slime_data::{BuiltinTemplate, PreferenceExample, SpecialTokens, TextTokenizer};
use tokenizers::{AddedToken, Tokenizer};

/// Words of many scripts, with combining marks, digits of several systems and symbols.
const WORDS: &[&str] = &[
    "hello",
    "World",
    "naïve",
    "café",
    "straße",
    "Ελληνικά",
    "русский",
    "日本語",
    "中文",
    "한국어",
    "العربية",
    "हिन्दी",
    "नमस्ते",
    "ภาษาไทย",
    "עברית",
    "ﬁne",
    "e\u{301}",
    "x²",
    "½",
    "Ⅻ",
    "١٢٣",
    "४२",
    "3.14",
    "2024",
    "😀",
    "👍🏽",
    "—",
    "…",
    "«»",
    "$5",
    "a_b",
    "C++",
    "<tag>",
    "://",
    "\u{200b}",
    "\u{a0}",
    "\u{3000}",
];

/// A fixture BPE trained on multi-script text, so merges cover multi-byte characters, spaces,
/// digits and punctuation.
fn trained() -> Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let mut texts = texts_of(&synthetic_chat_pairs(300, 12, 16, 7));
        for i in 0..600 {
            let mut s = String::new();
            for j in 0..12 {
                s.push_str(WORDS[(i * 7 + j * 13) % WORDS.len()]);
                s.push_str([" ", "  ", ", ", "'s ", "\n", "'ll ", "\t", " 42 "][(i + j) % 8]);
            }
            texts.push(s);
        }
        train_byte_level_bpe(&texts, 3000, FIXTURE_SPECIAL_TOKENS).expect("training")
    })
    .clone()
}

/// `t` with its JSON changed by `edit`.
fn edited(t: &Tokenizer, edit: impl FnOnce(&mut Value)) -> Tokenizer {
    let mut v: Value = serde_json::from_str(&t.to_string(false).expect("json")).expect("parse");
    edit(&mut v);
    v.to_string().parse().expect("edited tokenizer")
}

fn wrap(t: Tokenizer, name: &str) -> TextTokenizer {
    TextTokenizer::with_specials(t, name, SpecialTokens::default())
}

/// The fixture in each configuration the fast path claims to reproduce.
fn variants() -> &'static [TextTokenizer] {
    static V: OnceLock<Vec<TextTokenizer>> = OnceLock::new();
    V.get_or_init(|| {
        let base = trained();
        let byte_level = |prefix: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": true});
        let mut with_added = base.clone();
        with_added
            .add_tokens([
                AddedToken::from("<tool>", false).lstrip(true).rstrip(true),
                AddedToken::from("[x]", false),
                AddedToken::from("[x]y", false),
            ])
            .expect("add tokens");
        with_added.add_special_tokens([AddedToken::from("<|r|>", true).rstrip(true)]).expect("add special");
        vec![
            wrap(base.clone(), "trained"),
            wrap(edited(&base, |v| v["pre_tokenizer"] = byte_level(true)), "prefix space"),
            wrap(
                edited(&base, |v| {
                    v["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": true}, byte_level(false)]})
                }),
                "digits individual",
            ),
            wrap(
                edited(&base, |v| {
                    v["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": false}, byte_level(true)]})
                }),
                "digits contiguous + prefix space",
            ),
            wrap(edited(&base, |v| v["model"]["ignore_merges"] = json!(true)), "ignore_merges"),
            wrap(with_added, "normalized, lstrip and rstrip added tokens"),
            wrap(edited(&base, |v| v["pre_tokenizer"]["use_regex"] = json!(false)), "no regex"),
        ]
    })
}

fn smollm2() -> Option<&'static TextTokenizer> {
    static T: OnceLock<Option<TextTokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/models/smollm2-135m-instruct");
        if !dir.join("tokenizer.json").exists() {
            println!("SKIPPED: SmolLM2 tokenizer not at {} (run `cargo xtask assets`)", dir.display());
            return None;
        }
        Some(TextTokenizer::from_dir(&dir).expect("SmolLM2 tokenizer"))
    })
    .as_ref()
}

/// Errors naming the tokenizer and the first differing token unless both paths agree.
fn check(t: &TextTokenizer, name: &str, text: &str) -> Result<(), TestCaseError> {
    prop_assert!(t.uses_fast_bpe(), "{name}: the fast path does not apply");
    let fast = t.encode(text).expect("fast encode");
    let reference = t.inner().encode_fast(text, false).expect("tokenizers encode");
    prop_assert_eq!(&fast[..], reference.get_ids(), "{}: {:?}", name, text);
    Ok(())
}

fn check_all(text: &str) -> Result<(), TestCaseError> {
    for t in variants() {
        check(t, &format!("{t:?}"), text)?;
    }
    if let Some(t) = smollm2() {
        check(t, "SmolLM2", text)?;
    }
    Ok(())
}

/// Random text: words of many scripts, arbitrary chars, whitespace runs, contractions, special
/// tokens (also half-written ones) and the fixture's added tokens.
fn text() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        4 => prop::sample::select(WORDS).prop_map(str::to_string),
        3 => prop::sample::select(&[" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u{85}", "\u{2028}"][..])
            .prop_map(str::to_string),
        2 => prop::sample::select(&["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''", "'x", "'"][..])
            .prop_map(str::to_string),
        2 => prop::sample::select(FIXTURE_SPECIAL_TOKENS).prop_map(str::to_string),
        1 => prop::sample::select(&["<tool>", "[x]", "[x]y", "<|r|>", "<|im_", "<|im_start|", "<|im_end|>", "<|endoftext|>"][..])
            .prop_map(str::to_string),
        3 => any::<char>().prop_map(String::from),
        2 => "[a-zA-Z0-9 .,!?']{1,8}",
        1 => "\\PC{1,6}",
    ];
    prop::collection::vec(fragment, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn fast_path_ids_equal_tokenizers_ids(s in text()) {
        check_all(&s)?;
    }
}

/// Hand-picked edge cases of the regex and the added-token split.
const CORPUS: &[&str] = &[
    "",
    " ",
    "  ",
    "\n",
    "a",
    "Hello world's end, don't you've I'm we'll he'd they're",
    "trailing spaces   ",
    "  leading spaces",
    "tabs\tand\t\tnewlines\n\n\nhere \n x",
    "numbers 1 22 333 4444 3.14159 1,000,000 x²³ ½ Ⅻ ١٢٣ ४२",
    "mixed ру́сский naïve e\u{301} हिन्दी ภาษาไทย 日本語テキスト",
    "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<|im_start|><|im_start|>x<|im_end|",
    " <tool>  x  <tool>\n<|r|>  y [x]y [x] z",
    "'s's 'll'' '  's",
    "\u{a0}\u{3000}x\u{2028}y\u{85}z\u{200b}w",
    "a  \nb",
    "end\n",
];

#[test]
fn corpus_ids_equal_tokenizers_ids() {
    for s in CORPUS {
        check_all(s).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn rendered_chats_tokenize_the_same_both_ways() {
    let examples = synthetic_chat_pairs(200, 24, 32, 3);
    let mut tokenizers: Vec<(&TextTokenizer, &str)> = vec![(&variants()[0], "trained")];
    if let Some(t) = smollm2() {
        tokenizers.push((t, "SmolLM2"));
    }
    for (t, name) in tokenizers {
        let template = t.chat_template(Some(BuiltinTemplate::Chatml)).expect("template");
        for e in &examples {
            let PreferenceExample::Chat { prompt, chosen, .. } = e else { continue };
            let (p, c) = template.split(prompt, chosen).expect("render").expect("prefix");
            for text in [p, c] {
                check(t, name, &text).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn the_fast_path_can_be_switched_off_and_gives_the_same_ids() {
    let mut t = wrap(trained(), "trained");
    let text = "Hello world's 42 <|im_start|>x";
    let fast = t.encode(text).expect("encode");
    assert!(t.uses_fast_bpe());
    t.set_fast_bpe(false);
    assert!(!t.uses_fast_bpe());
    assert_eq!(t.encode(text).expect("encode"), fast);
}

#[test]
fn unsupported_tokenizers_fall_back_to_tokenizers() {
    let base = trained();
    let cases = [
        ("normalizer", edited(&base, |v| v["normalizer"] = json!({"type": "Lowercase"}))),
        ("dropout", edited(&base, |v| v["model"]["dropout"] = json!(0.5))),
        ("whitespace pre-tokenizer", edited(&base, |v| v["pre_tokenizer"] = json!({"type": "Whitespace"}))),
        ("single_word token", {
            let mut t = base.clone();
            t.add_tokens([AddedToken::from("word", false).single_word(true)]).expect("add token");
            t
        }),
    ];
    for (name, t) in cases {
        let t = wrap(t, name);
        assert!(!t.uses_fast_bpe(), "{name}: should fall back");
        let text = "Hello word words 42";
        if name != "dropout" {
            assert_eq!(t.encode(text).expect("encode"), t.inner().encode_fast(text, false).expect("ref").get_ids());
        }
    }
    // The fixture of the other tests is a byte-level BPE: it takes the fast path.
    assert!(common::tokenizer("<bos>", "<eos>", false).uses_fast_bpe());
}
