//! The directories slime-models writes, checked against what transformers and PEFT write, from
//! committed fixtures (`scripts/make_interop_fixtures.py`: transformers 5.25, PEFT 0.22):
//! `config.json` per family and `adapter_config.json` carry every key those libraries read with
//! the JSON type their (strict) config classes declare, and a real PEFT adapter (rsLoRA, dropout,
//! a regular-expression `target_modules`) loads and reproduces PEFT's log-probs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::Value;
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, LoraConfig, ModelConfig, ModelError, Result, TargetModules};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON type as the Python side sees it: integers and floats are different types.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every key of `reference` whose value is not null (null: optional) and that is not in `skip`
/// is in `ours` with the same JSON type; returns the mismatches.
fn missing_or_mistyped(reference: &Value, ours: &Value, skip: &[&str]) -> Vec<String> {
    let (Some(reference), Some(ours)) = (reference.as_object(), ours.as_object()) else {
        return vec!["not JSON objects".into()];
    };
    let mut out = Vec::new();
    for (key, want) in reference {
        if want.is_null() || skip.contains(&key.as_str()) {
            continue;
        }
        match ours.get(key) {
            None => out.push(format!("`{key}` missing (reference: {want})")),
            Some(have) if kind(have) != kind(want) => {
                out.push(format!("`{key}` is {} {have}, reference {} {want}", kind(have), kind(want)))
            }
            Some(_) => {}
        }
    }
    out
}

/// Keys transformers writes that do not bear on loading a trained checkpoint, with the reason.
const NOT_FOR_LOADING: [(&str, &str); 10] = [
    ("_sliding_window_pattern", "transformers 5's private copy of sliding_window_pattern; layer_types is written"),
    ("transformers_version", "the writer's version"),
    ("initializer_range", "initialises new weights only"),
    ("use_cache", "a generation-time default"),
    ("pretraining_tp", "1 (the default) means no tensor-parallel emulation"),
    ("rope_parameters", "transformers 5's spelling of rope_theta / rope_scaling, which are written instead"),
    ("max_window_layers", "read only with use_sliding_window = true, which is not supported"),
    ("bos_token_id", "token ids come from the tokenizer: added by the trainer's export"),
    ("eos_token_id", "token ids come from the tokenizer: added by the trainer's export"),
    ("pad_token_id", "token ids come from the tokenizer: added by the trainer's export"),
];

fn families() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("llama", LlamaConfig::tiny(128, 32, 64, 2, 4, 2).into()),
        ("qwen2", LlamaConfig::tiny_qwen2(128, 32, 64, 2, 4, 2).into()),
        ("qwen3", LlamaConfig::tiny_qwen3(128, 32, 64, 2, 4, 2, 16).into()),
        ("gemma", GemmaConfig::tiny(128, 32, 64, 2, 4, 2).into()),
        ("gemma2", GemmaConfig::tiny2(128, 32, 64, 2, 4, 2).into()),
        ("gemma3_text", GemmaConfig::tiny3(128, 32, 64, 3, 4, 2).into()),
    ]
}

fn tmp() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })
}

#[test]
fn saved_config_json_has_every_key_transformers_reads_with_its_type() -> Result<()> {
    let skip: Vec<&str> = NOT_FOR_LOADING.iter().map(|(k, _)| *k).collect();
    for (model_type, cfg) in families() {
        let dir = tmp()?;
        CausalLm::random(&cfg, 0, &Device::Cpu)?.save_dir(dir.path())?;
        let ours = read_json(&dir.path().join("config.json"));
        let reference = read_json(&fixtures().join("interop/transformers").join(model_type).join("config.json"));
        let problems = missing_or_mistyped(&reference, &ours, &skip);
        assert!(problems.is_empty(), "{model_type}: {problems:#?}\nours: {ours:#}");
        assert_eq!(ours["model_type"], model_type);
        assert_eq!(ours["architectures"], reference["architectures"], "{model_type}");
        assert_eq!(ours["torch_dtype"], "float32", "{model_type}");
        assert_eq!(kind(&ours["rope_theta"]), "float", "{model_type}: rope_theta, the classic RoPE field");
        // No string-typed field is written as null (transformers 5 rejects a null `hidden_act`).
        for (key, v) in ours.as_object().into_iter().flatten() {
            assert!(!v.is_null(), "{model_type}: `{key}` is null");
        }
        // And it reads back as the same model.
        let back = ModelConfig::from_json(&ours.to_string(), "config.json")?;
        assert_eq!(back.to_hf_json(), cfg.to_hf_json(), "{model_type}");
        assert_eq!(back.weight_shapes(), cfg.weight_shapes(), "{model_type}");
    }
    Ok(())
}

#[test]
fn gemma3_270m_config_is_written_with_transformers_types() -> Result<()> {
    // The shape of google/gemma-3-270m's text config: query_pre_attn_scalar 256, no hidden_act.
    let text = r#"{"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
        "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06, "max_position_embeddings": 32768, "hidden_activation": "gelu_pytorch_tanh",
        "_sliding_window_pattern": 6, "final_logit_softcapping": null, "attn_logit_softcapping": null}"#;
    let cfg = ModelConfig::from_json(text, "gemma-3-270m/config.json")?;
    let json = cfg.to_hf_json();
    assert_eq!(json["query_pre_attn_scalar"], Value::from(256), "an integer, not 256.0: {json}");
    assert!(json.get("hidden_act").is_none(), "{json}");
    let types = json["layer_types"].as_array().map(Vec::len);
    assert_eq!(types, Some(18));
    assert_eq!(json["layer_types"][5], "full_attention");
    assert_eq!(json["layer_types"][4], "sliding_attention");
    let reference = read_json(&fixtures().join("interop/transformers/gemma3_text/config.json"));
    let skip: Vec<&str> = NOT_FOR_LOADING.iter().map(|(k, _)| *k).collect();
    // attention_dropout is added on save; everything else is already in the config.
    let problems = missing_or_mistyped(&reference, &json, &skip);
    assert!(problems.is_empty(), "{problems:#?}");
    Ok(())
}

fn lora_lm() -> Result<CausalLm> {
    CausalLm::random(&LlamaConfig::tiny(64, 32, 64, 2, 4, 2), 1, &Device::Cpu)?
        .with_lora(LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]), 2)
}

#[test]
fn saved_adapter_config_has_every_key_peft_writes_with_its_type() -> Result<()> {
    let dir = tmp()?;
    lora_lm()?.save_adapters(dir.path())?;
    let ours = read_json(&dir.path().join("adapter_config.json"));
    let reference = read_json(&fixtures().join("interop/peft/adapter_config.json"));
    // peft_version: PEFT fills in its own when it loads a config without one.
    let problems = missing_or_mistyped(&reference, &ours, &["peft_version", "base_model_name_or_path"]);
    assert!(problems.is_empty(), "{problems:#?}\nours: {ours:#}");
    // The keys PEFT writes as null are written too, so the file has PEFT's full key set.
    let mut missing: Vec<&String> = reference
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| ours.get(k.as_str()).is_none())
        .collect();
    missing.retain(|k| *k != "peft_version");
    assert!(missing.is_empty(), "{missing:?}");
    assert_eq!(ours["task_type"], "CAUSAL_LM");
    assert_eq!(ours["inference_mode"], true);
    assert_eq!(ours["lora_alpha"], Value::from(8), "an integer, as PEFT writes it");
    Ok(())
}

#[test]
fn a_peft_adapter_with_rslora_dropout_and_a_regex_reproduces_peft() -> Result<()> {
    let base = fixtures().join("hf/llama3");
    let adapter = fixtures().join("interop/peft-llama3-rslora");
    let lm = CausalLm::from_dir(&base, &Device::Cpu)?.load_adapters(&adapter)?;
    let cfg = lm.lora_config().cloned().ok_or_else(|| ModelError::Input { input: "lora", reason: "none".into() })?;
    assert!(cfg.use_rslora);
    assert_eq!(cfg.lora_dropout, 0.1, "kept as read, not applied");
    assert_eq!(cfg.target_modules, TargetModules::Pattern(r".*\.(q_proj|v_proj|down_proj)".into()));
    assert_eq!(cfg.scale(), 6.0 / 2.0, "alpha / sqrt(r)");
    assert_eq!(lm.trainable_vars().len(), 2 * 3 * 2, "q, v and down of 2 layers, A and B each");
    let mut want = candle_core::safetensors::load(base.join("expected.safetensors"), &Device::Cpu)?;
    let ids = want.remove("input_ids").map(|t| t.to_dtype(DType::U32)).transpose()?;
    let mask = want.remove("attention_mask").map(|t| t.to_dtype(DType::U8)).transpose()?;
    let expected = candle_core::safetensors::load(adapter.join("expected.safetensors"), &Device::Cpu)?;
    let (Some(ids), Some(mask), Some(expected)) = (ids, mask, expected.get("token_logps")) else {
        panic!("fixture tensors missing")
    };
    let have = (lm.model().token_logps(&ids, Some(&mask), 8)? * mask.to_dtype(DType::F32)?)?;
    let diff = (have - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "token log-probs differ from PEFT's by {diff}");
    // Without the adapter the log-probs are far from PEFT's: the fixture does test the adapter.
    lm.set_adapters_enabled(false);
    let off = (lm.model().token_logps(&ids, Some(&mask), 8)? * mask.to_dtype(DType::F32)?)?;
    let moved = (off - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(moved > 0.1, "{moved}");
    Ok(())
}

fn peft_config_with(key: &str, value: Value) -> String {
    let mut v = read_json(&fixtures().join("interop/peft/adapter_config.json"));
    v[key] = value;
    v.to_string()
}

#[test]
fn unsupported_peft_settings_are_rejected_by_name() {
    let plain = LoraConfig::from_peft_json(&peft_config_with("r", 8.into()), "a.json").expect("PEFT's own file reads");
    assert_eq!((plain.r, plain.lora_alpha, plain.scale()), (8, 16.0, 2.0));
    let cases: Vec<(&str, Value)> = vec![
        ("use_dora", true.into()),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("rank_pattern", serde_json::json!({"q_proj": 4})),
        ("alpha_pattern", serde_json::json!({"q_proj": 32})),
        ("bias", "all".into()),
        ("fan_in_fan_out", true.into()),
        ("layers_to_transform", serde_json::json!([0])),
        ("task_type", "SEQ_CLS".into()),
        ("init_lora_weights", "pissa".into()),
        ("lora_bias", true.into()),
        ("exclude_modules", serde_json::json!(["v_proj"])),
        ("trainable_token_indices", serde_json::json!([5])),
        ("peft_type", "IA3".into()),
        ("some_future_setting", 3.into()),
    ];
    for (key, value) in cases {
        let err = LoraConfig::from_peft_json(&peft_config_with(key, value.clone()), "a.json")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| panic!("{key} = {value} was accepted"));
        assert!(err.contains(&format!("`{key}`")) && err.contains("a.json"), "{key}: {err}");
    }
    // Dropout only acts in training: a loaded adapter keeps it and ignores it.
    let dropout = LoraConfig::from_peft_json(&peft_config_with("lora_dropout", 0.05.into()), "a.json");
    assert_eq!(dropout.map(|c| c.lora_dropout).ok(), Some(0.05));
    let regex = LoraConfig::from_peft_json(&peft_config_with("target_modules", "(".into()), "a.json");
    assert!(regex.err().is_some_and(|e| e.to_string().contains("regular expression")));
}

#[test]
fn target_modules_match_as_in_peft() -> Result<()> {
    let names = LoraConfig::new(4, 8.0, &["self_attn.q_proj", "down_proj"]);
    assert!(names.targets("model.layers.0.self_attn.q_proj"));
    assert!(names.targets("model.layers.1.mlp.down_proj"));
    assert!(!names.targets("model.layers.0.self_attn.k_proj"));
    let suffix_only = LoraConfig::new(4, 8.0, &["proj"]);
    assert!(!suffix_only.targets("model.layers.0.self_attn.q_proj"), "a name matches whole components");
    let pattern = LoraConfig { target_modules: TargetModules::Pattern(r".*layers\.1\..*_proj".into()), ..names };
    assert!(pattern.targets("model.layers.1.self_attn.o_proj"));
    assert!(!pattern.targets("model.layers.0.self_attn.o_proj"));
    assert!(!pattern.targets("xmodel.layers.1.self_attn.o_proj.lora"), "full match, not search");
    // Layer 1 only: 7 projections, A and B each.
    let lm = CausalLm::random(&LlamaConfig::tiny(64, 32, 64, 2, 4, 2), 1, &Device::Cpu)?.with_lora(pattern, 0)?;
    assert_eq!(lm.trainable_vars().len(), 14);
    // A pattern that reaches a weight no adapter can sit on is an error naming it.
    let everything = LoraConfig { target_modules: TargetModules::Pattern(".*".into()), ..LoraConfig::new(4, 8.0, &[]) };
    let err = CausalLm::random(&LlamaConfig::tiny(64, 32, 64, 2, 4, 2), 1, &Device::Cpu)?
        .with_lora(everything, 0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("target_modules") && err.contains("cannot carry an adapter"), "{err}");
    Ok(())
}

#[test]
fn rslora_scales_by_the_square_root_of_the_rank() -> Result<()> {
    let plain = LoraConfig::new(16, 32.0, &["q_proj"]);
    let rs = LoraConfig { use_rslora: true, ..plain.clone() };
    assert_eq!((plain.scale(), rs.scale()), (2.0, 8.0));
    // Merged weights use the same scale as the forward pass.
    let lm = CausalLm::random(&LlamaConfig::tiny(64, 32, 64, 1, 4, 2), 1, &Device::Cpu)?.with_lora(rs, 3)?;
    for (name, var) in lm.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            var.set(&(var.as_tensor().ones_like()? * 0.01)?)?;
        }
    }
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 3, 7]], &Device::Cpu)?;
    let with_adapter = lm.model().token_logps(&ids, None, 8)?;
    let merged = lm.merge_lora()?.model().token_logps(&ids, None, 8)?;
    let diff = (with_adapter - merged)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "{diff}");
    Ok(())
}
