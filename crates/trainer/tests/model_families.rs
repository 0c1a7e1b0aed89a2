//! A pretrained-model directory of a family other than Llama (Mistral: `config.json` +
//! `model.safetensors`, sliding window 16, shorter than the pairs) loads through the model
//! registry and trains: SFT then a preference stage, LoRA adapters on the preference stage,
//! the saved SFT model is again a Mistral with moved weights.

mod common;

use candle_core::Device;
use slime_models::{CausalLm, MistralConfig, ModelConfig};
use slime_objectives::{Objective, SimpoParams};
use slime_trainer::config::{LoraSpec, RunConfig};
use slime_trainer::model_source::ModelSource;
use slime_trainer::run::run;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn a_mistral_directory_loads_and_trains() -> TestResult {
    let f = common::fixture(40, 31, 7, 4)?;
    // The fixture's tokenizer with a random Mistral in place of its Llama.
    let vocab = ModelSource::new(&f.model).load_model(&Device::Cpu)?.config().vocab_size();
    let mistral = MistralConfig {
        max_position_embeddings: 256,
        sliding_window: Some(16),
        ..MistralConfig::tiny(vocab, 32, 64, 2, 4, 2)
    };
    CausalLm::random(&mistral, 4, &Device::Cpu)?.save_dir(&f.model)?;
    let loaded = ModelSource::new(&f.model).load(&Device::Cpu)?;
    assert!(matches!(loaded.lm.config(), ModelConfig::Mistral(_)), "{:?}", loaded.lm.config());
    assert_eq!(loaded.lm.config().to_hf_json(), ModelConfig::from(mistral).to_hf_json());

    let mut cfg = RunConfig::default();
    cfg.model.path = Some(f.model.clone());
    cfg.model.lora = Some(LoraSpec { r: 4, alpha: 8.0, sft: false, ..LoraSpec::default() });
    cfg.data.parquet = Some(f.data.clone());
    cfg.data.eval_fraction = 0.2;
    cfg.data.eval_pairs = 6;
    cfg.data.max_length = Some(256);
    cfg.data.max_prompt_length = Some(128);
    cfg.sft.steps = 2;
    cfg.sft.batch_size = 4;
    cfg.preference.steps = 2;
    cfg.preference.batch_size = 4;
    cfg.preference.objective = Objective::Simpo(SimpoParams::default());
    cfg.eval.generations = 1;
    cfg.eval.max_new_tokens = 4;
    cfg.eval.every = 100;
    cfg.eval.batch_size = 4;
    cfg.checkpoint.every = 0;
    let dir = f.root.join("run");
    let metrics = run(&cfg, &dir)?;
    for key in ["eval/preference_accuracy", "eval/chosen_logp_drift"] {
        assert!(metrics.get(key).is_some_and(|v| v.is_finite()), "{key}: {metrics:?}");
    }
    assert!(dir.join("adapter/adapter_model.safetensors").is_file());
    let data: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("data.json"))?)?;
    assert_eq!(data["rows"], f.examples.len());
    let sft = CausalLm::from_dir(&dir.join("sft-model"), &Device::Cpu)?;
    assert!(matches!(sft.config(), ModelConfig::Mistral(c) if c.sliding_window == Some(16)), "{:?}", sft.config());
    let start = candle_core::safetensors::load(f.model.join("model.safetensors"), &Device::Cpu)?;
    let name = "model.layers.1.mlp.down_proj.weight";
    let diff = (&start[name] - &sft.weights()[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 0.0, "SFT left {name} unchanged");
    Ok(())
}
