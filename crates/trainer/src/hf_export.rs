//! The directories a run writes, complete for the Hugging Face tools: `model/` and `sft-model/`
//! load with transformers' `AutoModelForCausalLM` / `AutoTokenizer` (config.json,
//! generation_config.json, model.safetensors, the tokenizer files of the run's tokenizer), and
//! `adapter/` with PEFT's `AutoPeftModelForCausalLM` (adapter_config.json naming its base model).
//!
//! Token ids (`bos_token_id`, `eos_token_id`, `pad_token_id`) come from the source model's
//! `config.json` when it has them, else from its tokenizer; the embedded task uses its own ids.
//! A source `generation_config.json` is copied as it is (it may hold sampling defaults and
//! several end-of-turn ids); otherwise one is written the way transformers derives it from
//! `config.json`.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use slime_data::TextTokenizer;
use slime_models::CausalLm;

use crate::config::RunConfig;
use crate::model_source::tokenizer_dir;
use crate::{Result, TrainError};

/// The tokenizer files copied next to the weights when the tokenizer directory has them.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

const TOKEN_ID_KEYS: [&str; 3] = ["bos_token_id", "eos_token_id", "pad_token_id"];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Config(format!("{}: not valid JSON: {e}", path.display())))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Config(e.to_string()))?;
    fs::write(path, text + "\n").map_err(io(path))
}

/// The directory of the run's pretrained model (holding its config.json), if it has one.
fn source_dir(cfg: &RunConfig) -> Option<PathBuf> {
    cfg.model.path.as_deref().map(tokenizer_dir)
}

/// The directory the run's tokenizer was read from, if the run used one.
fn tokenizer_source(cfg: &RunConfig) -> Option<PathBuf> {
    cfg.model.tokenizer.clone().or_else(|| source_dir(cfg))
}

/// `bos_token_id`, `eos_token_id` and `pad_token_id` for the run's model: the source
/// config.json's values, the tokenizer's for the ones it lacks; the embedded task's ids
/// without a pretrained model.
pub fn token_ids(cfg: &RunConfig) -> Result<Map<String, Value>> {
    let mut ids = Map::new();
    let Some(dir) = source_dir(cfg) else {
        use crate::task::ids as task;
        ids.insert("bos_token_id".into(), task::BOS.into());
        ids.insert("eos_token_id".into(), task::EOT.into());
        ids.insert("pad_token_id".into(), task::PAD.into());
        return Ok(ids);
    };
    let config = dir.join("config.json");
    if config.is_file() {
        let source = read_json(&config)?;
        for key in TOKEN_ID_KEYS {
            if let Some(v) = source.get(key).filter(|v| !v.is_null()) {
                ids.insert(key.into(), v.clone());
            }
        }
    }
    if TOKEN_ID_KEYS.iter().any(|k| !ids.contains_key(*k))
        && let Some(tok) = tokenizer_source(cfg).filter(|d| d.join("tokenizer.json").is_file())
    {
        let specials = TextTokenizer::from_dir(&tok)?.specials().clone();
        let from_tokenizer = [
            ("bos_token_id", specials.bos.map(|(_, id)| id)),
            ("eos_token_id", specials.eos.map(|(_, id)| id)),
            ("pad_token_id", Some(specials.pad_id)),
        ];
        for (key, id) in from_tokenizer {
            if let Some(id) = id {
                ids.entry(key).or_insert(id.into());
            }
        }
    }
    Ok(ids)
}

/// Writes `lm` into `dir` as a complete Hugging Face model directory: what
/// [`CausalLm::save_dir`] writes, the token ids added to `config.json`, `generation_config.json`,
/// and the tokenizer files ([`TOKENIZER_FILES`]) of the run's tokenizer directory.
pub fn save_model(lm: &CausalLm, dir: &Path, cfg: &RunConfig) -> Result<()> {
    lm.save_dir(dir)?;
    let ids = token_ids(cfg)?;
    let config_path = dir.join("config.json");
    let mut config = read_json(&config_path)?;
    if let Some(obj) = config.as_object_mut() {
        obj.extend(ids.clone());
    }
    write_json(&config_path, &config)?;
    let source_generation = source_dir(cfg).map(|d| d.join("generation_config.json")).filter(|p| p.is_file());
    let generation = dir.join("generation_config.json");
    match source_generation {
        Some(source) => {
            fs::copy(&source, &generation).map_err(io(&source))?;
        }
        None => {
            let mut value = json!({"_from_model_config": true});
            if let Some(obj) = value.as_object_mut() {
                obj.extend(ids);
            }
            write_json(&generation, &value)?;
        }
    }
    copy_tokenizer_files(cfg, dir)
}

/// Writes `lm`'s LoRA adapters into `run_dir/adapter` ([`CausalLm::save_adapters`]) with
/// `base_model_name_or_path` set to the model they adapt: the run's `sft-model/` when an SFT
/// stage ran, else the pretrained model directory (absolute paths; none for the embedded task,
/// whose base model is not saved unmerged).
pub fn save_adapter(lm: &CausalLm, dir: &Path, run_dir: &Path, cfg: &RunConfig) -> Result<()> {
    lm.save_adapters(dir)?;
    let sft_ran = cfg.init.is_none() && cfg.sft.steps > 0;
    let base = match cfg.model.path.as_deref() {
        Some(_) if sft_ran => Some(run_dir.join("sft-model")),
        Some(path) if path.is_dir() => Some(path.to_path_buf()),
        _ => None,
    };
    let base = base.map(|b| fs::canonicalize(&b).map_err(io(&b))).transpose()?;
    let path = dir.join("adapter_config.json");
    let mut config = read_json(&path)?;
    config["base_model_name_or_path"] = base.map(|b| b.display().to_string()).into();
    write_json(&path, &config)?;
    copy_tokenizer_files(cfg, dir)
}

/// Copies the run's tokenizer files (those of [`TOKENIZER_FILES`] its tokenizer directory has) into `dir`.
fn copy_tokenizer_files(cfg: &RunConfig, dir: &Path) -> Result<()> {
    if let Some(tok) = tokenizer_source(cfg) {
        for name in TOKENIZER_FILES {
            let source = tok.join(name);
            if source.is_file() {
                fs::copy(&source, dir.join(name)).map_err(io(&source))?;
            }
        }
    }
    Ok(())
}
