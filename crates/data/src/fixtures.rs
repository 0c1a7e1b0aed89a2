//! Generated tokenizers and data for tests, benchmarks and examples (no downloads): a
//! byte-level BPE tokenizer trained in-process, and seeded synthetic preference pairs.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::error::{DataError, Result};
use crate::example::{Message, PreferenceExample};

/// Special tokens of every built-in template plus BOS/EOS/PAD, for fixture tokenizers.
pub const FIXTURE_SPECIAL_TOKENS: &[&str] = &[
    "<pad>",
    "<bos>",
    "<eos>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|im_start|>",
    "<|im_end|>",
];

/// Trains a GPT-2-style byte-level BPE tokenizer of (up to) `vocab_size` tokens on `texts`,
/// with `special_tokens` as special added tokens (ids 0.. in order).
pub fn train_byte_level_bpe(texts: &[String], vocab_size: usize, special_tokens: &[&str]) -> Result<Tokenizer> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| DataError::Tokenizer {
        source_name: "fixture BPE".into(),
        detail: e.to_string(),
    };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(special_tokens.iter().map(|s| AddedToken::from(s.to_string(), true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(err)?;
    tokenizer.train(&mut trainer, texts.iter()).map_err(err)?;
    Ok(Tokenizer::from(tokenizer))
}

const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "dan", "tor", "el", "is", "an", "or", "ex", "qu", "um",
    "ber", "sta", "pre", "con", "ly", "ing", "ed", "tion", "al", "ment", "ous", "ive",
];

fn word(rng: &mut ChaCha8Rng) -> String {
    let n = 1 + rng.random_range(0..3);
    (0..n).map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())]).collect()
}

/// A sentence-like string of `words` pseudo-words with punctuation.
pub fn sentence(rng: &mut ChaCha8Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(if rng.random_range(0..12) == 0 { ',' } else { ' ' });
            if s.ends_with(',') {
                s.push(' ');
            }
        }
        s.push_str(&word(rng));
    }
    s.push('.');
    s
}

/// `n` seeded synthetic conversational pairs: a user prompt of about `prompt_words` words and
/// answers of about `answer_words` words (a system turn in one pair of four).
pub fn synthetic_chat_pairs(n: usize, prompt_words: usize, answer_words: usize, seed: u64) -> Vec<PreferenceExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut prompt = Vec::new();
            if rng.random_range(0..4) == 0 {
                prompt.push(Message::new("system", &sentence(&mut rng, 8)));
            }
            let jitter = |rng: &mut ChaCha8Rng, w: usize| (w / 2 + rng.random_range(0..=w)).max(1);
            let pw = jitter(&mut rng, prompt_words);
            prompt.push(Message::new("user", &sentence(&mut rng, pw)));
            let (cw, rw) = (jitter(&mut rng, answer_words), jitter(&mut rng, answer_words));
            PreferenceExample::Chat {
                prompt,
                chosen: Message::new("assistant", &sentence(&mut rng, cw)),
                rejected: Message::new("assistant", &sentence(&mut rng, rw)),
            }
        })
        .collect()
}

/// The texts of `examples` (for training a fixture tokenizer on them).
pub fn texts_of(examples: &[PreferenceExample]) -> Vec<String> {
    examples
        .iter()
        .flat_map(|e| match e {
            PreferenceExample::Text { prompt, chosen, rejected } => {
                vec![prompt.clone(), chosen.clone(), rejected.clone()]
            }
            PreferenceExample::Chat { prompt, chosen, rejected } => {
                prompt.iter().chain([chosen, rejected]).map(|m| m.content.clone()).collect()
            }
        })
        .collect()
}
