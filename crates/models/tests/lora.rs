//! LoRA: a fresh adapter (B = 0) equals the base model exactly, only adapters train, switching
//! adapters off gives the base model, PEFT-layout save/load is bit-exact, merged and inference
//! copies keep the function.

use candle_core::{Device, Tensor};
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, LoraConfig, ModelConfig, ModelError, Result};

fn ids() -> Result<Tensor> {
    let v: Vec<u32> = (0..2 * 7).map(|i| ((i * 31 + 3) % 97) as u32).collect();
    Ok(Tensor::from_vec(v, (2, 7), &Device::Cpu)?)
}

fn configs() -> Vec<ModelConfig> {
    vec![LlamaConfig::tiny(97, 32, 80, 2, 4, 2).into(), GemmaConfig::tiny3(97, 32, 80, 2, 4, 2).into()]
}

fn targets() -> LoraConfig {
    LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"])
}

/// Sets every B to a deterministic non-zero value so adapters change the output.
fn perturb_b(lm: &CausalLm) -> Result<()> {
    for (name, var) in lm.trainable_vars() {
        if name.contains("lora_B") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|i| 0.01 * ((i % 7) as f32 - 3.0)).collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}

#[test]
fn fresh_adapters_equal_base_exactly_and_off_means_base() -> Result<()> {
    for cfg in configs() {
        let base = CausalLm::random(&cfg, 1, &Device::Cpu)?;
        let want = base.model().token_logps(&ids()?, None, 4)?.to_vec2::<f32>()?;
        let lm = base.with_lora(targets(), 2)?;
        assert_eq!(lm.model().token_logps(&ids()?, None, 4)?.to_vec2::<f32>()?, want);
        perturb_b(&lm)?;
        let on = lm.model().token_logps(&ids()?, None, 4)?.to_vec2::<f32>()?;
        assert_ne!(on, want, "a non-zero B must change the model");
        lm.set_adapters_enabled(false);
        assert_eq!(lm.model().token_logps(&ids()?, None, 4)?.to_vec2::<f32>()?, want);
        lm.set_adapters_enabled(true);
        assert_eq!(lm.model().token_logps(&ids()?, None, 4)?.to_vec2::<f32>()?, on);
    }
    Ok(())
}

#[test]
fn only_adapters_receive_gradients() -> Result<()> {
    for cfg in configs() {
        let lm = CausalLm::random(&cfg, 3, &Device::Cpu)?.with_lora(targets(), 4)?;
        let base = lm.weights();
        perturb_b(&lm)?;
        let vars = lm.trainable_vars();
        // 3 targets x 2 layers x (A, B).
        assert_eq!(vars.len(), 12);
        assert!(vars.iter().all(|(n, _)| n.starts_with("base_model.model.model.layers.")));
        let grads = lm.model().token_logps(&ids()?, None, 4)?.sum_all()?.backward()?;
        for (name, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(g.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}");
        }
        for (name, t) in &base {
            assert!(grads.get(t).is_none(), "frozen {name} got a gradient");
        }
    }
    Ok(())
}

#[test]
fn peft_layout_round_trip_is_bit_exact() -> Result<()> {
    let cfg = &configs()[0];
    let lm = CausalLm::random(cfg, 5, &Device::Cpu)?.with_lora(targets(), 6)?;
    perturb_b(&lm)?;
    let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
    lm.save_adapters(dir.path())?;
    let config = std::fs::read_to_string(dir.path().join("adapter_config.json"))
        .map_err(|e| ModelError::Io { path: "adapter_config.json".into(), reason: e.to_string() })?;
    for needle in ["\"r\": 4", "\"lora_alpha\": 8,", "\"peft_type\": \"LORA\"", "down_proj"] {
        assert!(config.contains(needle), "{needle} in {config}");
    }
    let back = CausalLm::random(cfg, 5, &Device::Cpu)?.load_adapters(dir.path())?;
    assert_eq!(back.lora_config(), lm.lora_config());
    let (a, b) = (lm.trainable_vars(), back.trainable_vars());
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(va.flatten_all()?.to_vec1::<f32>()?, vb.flatten_all()?.to_vec1::<f32>()?, "{na}");
    }
    assert_eq!(
        lm.model().token_logps(&ids()?, None, 3)?.to_vec2::<f32>()?,
        back.model().token_logps(&ids()?, None, 3)?.to_vec2::<f32>()?
    );
    Ok(())
}

#[test]
fn invalid_lora_configs_are_rejected() -> Result<()> {
    let cfg = &configs()[0];
    let lm = || CausalLm::random(cfg, 7, &Device::Cpu);
    assert!(lm()?.with_lora(LoraConfig::new(0, 8.0, &["q_proj"]), 0).is_err());
    assert!(lm()?.with_lora(LoraConfig { lora_dropout: 0.1, ..targets() }, 0).is_err());
    let err = lm()?.with_lora(LoraConfig::new(4, 8.0, &["qkv"]), 0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("target_modules"), "{err}");
    Ok(())
}

#[test]
fn merging_adapters_keeps_the_function() -> Result<()> {
    for cfg in configs() {
        let lm = CausalLm::random(&cfg, 8, &Device::Cpu)?.with_lora(targets(), 9)?;
        perturb_b(&lm)?;
        let want = lm.model().token_logps(&ids()?, None, 4)?;
        let base_before = lm.weights()["model.layers.0.self_attn.q_proj.weight"].flatten_all()?.to_vec1::<f32>()?;
        let merged = lm.merge_lora()?;
        assert!(merged.lora_config().is_none());
        assert_eq!(merged.trainable_vars().len(), merged.weights().len());
        let got = merged.model().token_logps(&ids()?, None, 4)?;
        let diff = (&got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "merged model differs by {diff}");
        let after = merged.weights()["model.layers.0.self_attn.q_proj.weight"].flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(base_before, after, "q_proj must absorb its adapter");
    }
    Ok(())
}

#[test]
fn an_inference_copy_folds_enabled_adapters_and_trains_nothing() -> Result<()> {
    for cfg in configs() {
        let lm = CausalLm::random(&cfg, 10, &Device::Cpu)?.with_lora(targets(), 11)?;
        perturb_b(&lm)?;
        let want = lm.model().token_logps(&ids()?, None, 4)?;
        let copy = lm.inference_copy()?;
        assert!(copy.trainable_vars().is_empty() && copy.lora_config().is_none());
        let got = copy.model().token_logps(&ids()?, None, 4)?;
        assert!(!got.track_op(), "an inference copy builds no autograd graph");
        let diff = (&got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "inference copy differs by {diff}");
        // The same folded weights as `merge_lora`, bit for bit.
        let name = "model.layers.0.self_attn.q_proj.weight";
        let folded = copy.weights()[name].flatten_all()?.to_vec1::<f32>()?;
        let merged = CausalLm::random(&cfg, 10, &Device::Cpu)?.with_lora(targets(), 11)?;
        perturb_b(&merged)?;
        assert_eq!(merged.merge_lora()?.weights()[name].flatten_all()?.to_vec1::<f32>()?, folded);
        assert!(copy.set_weights(&copy.weights()).is_err(), "an inference copy's weights are frozen");
        // Adapters switched off: the base model.
        lm.set_adapters_enabled(false);
        let base = lm.model().token_logps(&ids()?, None, 4)?.to_vec2::<f32>()?;
        assert_eq!(lm.inference_copy()?.model().token_logps(&ids()?, None, 4)?.to_vec2::<f32>()?, base);
    }
    Ok(())
}
