//! Shared fixture of the tests that run pretrained-model code paths without downloads: a model
//! directory with a random tiny Llama and a fixture byte-level BPE tokenizer, and a
//! conversational Parquet file.

use std::path::PathBuf;

use candle_core::Device;
use slime_data::fixtures::{FIXTURE_SPECIAL_TOKENS, synthetic_chat_pairs, texts_of, train_byte_level_bpe};
use slime_data::{BuiltinTemplate, ColumnNames, Layout, PreferenceExample, write_preferences};
use slime_models::{CausalLm, LlamaConfig};

/// A model directory and a Parquet file in a temporary directory.
pub struct Fixture {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub model: PathBuf,
    pub data: PathBuf,
    pub examples: Vec<PreferenceExample>,
}

/// `pairs` synthetic chat pairs (seeded by `data_seed`) in a conversational Parquet file with
/// `rows_per_group`-row row groups, and a model directory: a random tiny Llama (seeded by
/// `model_seed`) with a 320-token BPE trained on the pairs, the Llama 3 chat template and `<eos>`
/// as EOS.
pub fn fixture(
    pairs: usize,
    data_seed: u64,
    rows_per_group: usize,
    model_seed: u64,
) -> Result<Fixture, Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    let model = root.join("model");
    std::fs::create_dir_all(&model)?;
    let examples = synthetic_chat_pairs(pairs, 8, 6, data_seed);
    let mut texts = texts_of(&examples);
    texts.extend(["system", "user", "assistant"].map(String::from));
    let tokenizer = train_byte_level_bpe(&texts, 320, FIXTURE_SPECIAL_TOKENS)?;
    tokenizer.save(model.join("tokenizer.json"), false).map_err(|e| e.to_string())?;
    let config = serde_json::json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "add_bos_token": true,
        "chat_template": BuiltinTemplate::Llama3.source(),
    });
    std::fs::write(model.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?)?;
    let vocab = tokenizer.get_vocab_size(true);
    let cfg = LlamaConfig { max_position_embeddings: 256, ..LlamaConfig::tiny(vocab, 32, 64, 2, 4, 2) };
    CausalLm::random(&cfg, model_seed, &Device::Cpu)?.save_dir(&model)?;
    let data = root.join("pairs.parquet");
    write_preferences(&data, &examples, Layout::Conversational, &ColumnNames::default(), rows_per_group)?;
    Ok(Fixture { _tmp: tmp, root, model, data, examples })
}
