//! The model and adapter directories a run writes are complete Hugging Face directories: token
//! ids in config.json, generation_config.json as transformers writes it, the run's tokenizer
//! files, and an adapter_config.json naming the base model.

#[allow(dead_code)] // Only the model directory of the shared fixture is used here.
mod common;

use std::path::Path;

use candle_core::Device;
use serde_json::Value;
use slime_data::TextTokenizer;
use slime_models::{CausalLm, LlamaConfig};
use slime_trainer::config::{LoraSpec, RunConfig};
use slime_trainer::hf_export::{save_adapter, save_model};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn json(path: &Path) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// transformers' generation_config.json for a Llama (tests/fixtures of slime-models).
fn reference_generation_config() -> Result<Value, Box<dyn std::error::Error>> {
    json(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/tests/fixtures/interop/transformers/llama/generation_config.json"),
    )
}

/// Whether both values are JSON integers, lists of them, ... of the same shape.
fn same_kind(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.is_f64() == y.is_f64(),
        (Value::Array(_), Value::Array(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::String(_), Value::String(_)) => true,
        _ => false,
    }
}

#[test]
fn a_pretrained_run_writes_token_ids_generation_config_and_tokenizer_files() -> TestResult {
    let fx = common::fixture(12, 0, 6, 1)?;
    let mut cfg = RunConfig::default();
    cfg.model.path = Some(fx.model.clone());
    let lm = CausalLm::from_dir(&fx.model, &Device::Cpu)?;
    let out = fx.root.join("out");
    save_model(&lm, &out, &cfg)?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(out.join(name))?, std::fs::read(fx.model.join(name))?, "{name} copied as it is");
    }
    assert!(!out.join("special_tokens_map.json").exists(), "only files the source has are copied");
    let specials = TextTokenizer::from_dir(&fx.model)?.specials().clone();
    let config = json(&out.join("config.json"))?;
    assert_eq!(config["bos_token_id"], specials.bos.map(|(_, id)| id).ok_or("fixture has a BOS")?);
    assert_eq!(config["eos_token_id"], specials.eos.map(|(_, id)| id).ok_or("fixture has an EOS")?);
    assert_eq!(config["pad_token_id"], specials.pad_id);
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    let generation = json(&out.join("generation_config.json"))?;
    let reference = reference_generation_config()?;
    for key in ["_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id"] {
        assert!(
            same_kind(&generation[key], &reference[key]),
            "{key}: {} vs transformers' {}",
            generation[key],
            reference[key]
        );
        if key != "_from_model_config" {
            assert_eq!(generation[key], config[key], "{key}");
        }
    }
    // The directory loads back as the same model.
    let back = CausalLm::from_dir(&out, &Device::Cpu)?;
    assert_eq!(back.config(), lm.config());

    // The source's own config.json ids and generation_config.json win over the tokenizer's.
    let mut source = json(&fx.model.join("config.json"))?;
    source["bos_token_id"] = 3.into();
    source["eos_token_id"] = serde_json::json!([4, 5]);
    std::fs::write(fx.model.join("config.json"), source.to_string())?;
    let generation = r#"{"bos_token_id": 3, "eos_token_id": [4, 5], "temperature": 0.6, "do_sample": true}"#;
    std::fs::write(fx.model.join("generation_config.json"), generation)?;
    std::fs::write(fx.model.join("special_tokens_map.json"), r#"{"eos_token": "<eos>"}"#)?;
    save_model(&lm, &out, &cfg)?;
    let config = json(&out.join("config.json"))?;
    assert_eq!(config["bos_token_id"], 3);
    assert_eq!(config["eos_token_id"], serde_json::json!([4, 5]));
    assert_eq!(config["pad_token_id"], specials.pad_id, "the tokenizer fills what the source config lacks");
    assert_eq!(std::fs::read_to_string(out.join("generation_config.json"))?, generation);
    assert!(out.join("special_tokens_map.json").is_file());
    Ok(())
}

#[test]
fn an_embedded_task_run_writes_the_task_token_ids() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let lm = CausalLm::random(&LlamaConfig::tiny(40, 32, 64, 1, 4, 2), 0, &Device::Cpu)?;
    save_model(&lm, tmp.path(), &RunConfig::default())?;
    let config = json(&tmp.path().join("config.json"))?;
    use slime_trainer::task::ids;
    assert_eq!(config["bos_token_id"], ids::BOS);
    assert_eq!(config["eos_token_id"], ids::EOT);
    assert_eq!(config["pad_token_id"], ids::PAD);
    let generation = json(&tmp.path().join("generation_config.json"))?;
    assert_eq!(generation["eos_token_id"], ids::EOT);
    assert_eq!(generation["_from_model_config"], true);
    assert!(!tmp.path().join("tokenizer.json").exists());
    Ok(())
}

#[test]
fn the_adapter_names_the_model_it_adapts() -> TestResult {
    let fx = common::fixture(12, 0, 6, 1)?;
    let mut cfg = RunConfig::default();
    cfg.model.path = Some(fx.model.clone());
    cfg.model.lora = Some(LoraSpec { r: 4, alpha: 8.0, ..LoraSpec::default() });
    let lm = CausalLm::from_dir(&fx.model, &Device::Cpu)?
        .with_lora(cfg.model.lora.as_ref().ok_or("lora")?.to_lora_config(), 0)?;
    let run = fx.root.join("run");
    cfg.sft.steps = 0;
    save_adapter(&lm, &run.join("adapter"), &run, &cfg)?;
    let adapter = json(&run.join("adapter/adapter_config.json"))?;
    assert_eq!(adapter["base_model_name_or_path"], std::fs::canonicalize(&fx.model)?.display().to_string());
    assert_eq!(adapter["task_type"], "CAUSAL_LM");
    assert_eq!(adapter["peft_type"], "LORA");
    assert!(run.join("adapter/tokenizer.json").is_file());
    // After an SFT stage the adapters sit on the SFT model.
    cfg.sft.steps = 3;
    std::fs::create_dir_all(run.join("sft-model"))?;
    save_adapter(&lm, &run.join("adapter"), &run, &cfg)?;
    let adapter = json(&run.join("adapter/adapter_config.json"))?;
    assert_eq!(adapter["base_model_name_or_path"], std::fs::canonicalize(run.join("sft-model"))?.display().to_string());
    // The file reads back with the adapter-reading rules.
    let text = std::fs::read_to_string(run.join("adapter/adapter_config.json"))?;
    let back = slime_models::LoraConfig::from_peft_json(&text, "adapter_config.json")?;
    assert_eq!(back.r, 4);
    Ok(())
}
