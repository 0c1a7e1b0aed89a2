//! Llama: parity with candle-transformers' inference model, chunked log-probs, padding
//! invariance, gradients, checkpoints and config errors.

use std::collections::HashMap;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use slime_models::{CausalLm, LlamaConfig, ModelError, Result, RopeScaling};

fn configs() -> Vec<(&'static str, LlamaConfig)> {
    let gqa = LlamaConfig::tiny(97, 32, 80, 2, 4, 2);
    let tied = LlamaConfig { tie_word_embeddings: true, num_key_value_heads: Some(4), ..gqa.clone() };
    let llama3 = LlamaConfig {
        rope_theta: 500_000.0,
        rope_scaling: Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8,
        }),
        num_key_value_heads: Some(1),
        ..gqa.clone()
    };
    vec![("gqa-untied", gqa), ("mha-tied", tied), ("llama3-rope-mqa", llama3)]
}

/// Perturbs norm weights away from 1 so the test sees them.
fn model(cfg: &LlamaConfig, seed: u64) -> Result<CausalLm> {
    let lm = CausalLm::random(cfg, seed, &Device::Cpu)?;
    for (name, var) in lm.trainable_vars() {
        if name.contains("norm") {
            let n = var.elem_count();
            let w: Vec<f32> = (0..n).map(|i| 0.75 + 0.5 * ((i * 7 % 13) as f32 / 13.0)).collect();
            var.set(&Tensor::from_vec(w, n, &Device::Cpu)?)?;
        }
    }
    Ok(lm)
}

fn ids(batch: usize, seq: usize, vocab: usize, seed: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..batch * seq).map(|i| ((i * 31 + seed * 17 + 3) % vocab) as u32).collect();
    Ok(Tensor::from_vec(v, (batch, seq), &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn last_logits_match_candle_transformers() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 1)?;
        let ref_cfg: reference::LlamaConfig =
            serde_json::from_value(serde_json::to_value(&cfg).expect("json")).expect("reference config");
        let ref_cfg = ref_cfg.into_config(false);
        let vb = VarBuilder::from_tensors(lm.weights(), DType::F32, &Device::Cpu);
        let ref_model = reference::Llama::load(vb, &ref_cfg)?;
        for seq in [1, 5, 13] {
            let input = ids(1, seq, cfg.vocab_size, seq)?;
            let mut cache = reference::Cache::new(false, DType::F32, &ref_cfg, &Device::Cpu)?;
            let want = ref_model.forward(&input, 0, &mut cache)?;
            let got = lm.model().last_logits(&input, None)?;
            let diff = max_abs_diff(&got, &want)?;
            assert!(diff < 1e-4, "{name}, seq {seq}: max |diff| = {diff}");
        }
    }
    Ok(())
}

#[test]
fn chunked_logps_equal_full_log_softmax_gather() -> Result<()> {
    let (_, cfg) = &configs()[0];
    let lm = model(cfg, 2)?;
    let input = ids(3, 11, cfg.vocab_size, 0)?;
    let hidden = lm.model().forward_hidden(&input, None)?;
    let lm_head = &lm.weights()["lm_head.weight"];
    let logits = hidden.broadcast_matmul(&lm_head.t()?)?;
    let full = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    for chunk in [1, 3, 4, 10, 64] {
        let got = lm.model().token_logps(&input, None, chunk)?;
        assert_eq!(got.dims(), [3, 11]);
        for b in 0..3 {
            assert_eq!(got.i((b, 0))?.to_scalar::<f32>()?, 0.0);
            for t in 1..11 {
                let label = input.i((b, t))?.to_scalar::<u32>()? as usize;
                let want = full.i((b, t - 1, label))?.to_scalar::<f32>()?;
                let have = got.i((b, t))?.to_scalar::<f32>()?;
                assert!((want - have).abs() < 1e-5, "chunk {chunk} b {b} t {t}: {have} vs {want}");
            }
        }
    }
    Ok(())
}

#[test]
fn appending_padding_never_changes_real_token_logps() -> Result<()> {
    let (_, cfg) = &configs()[0];
    let lm = model(cfg, 3)?;
    let input = ids(2, 7, cfg.vocab_size, 5)?;
    let base = lm.model().token_logps(&input, None, 4)?;
    let pad = Tensor::zeros((2, 5), DType::U32, &Device::Cpu)?;
    let padded = Tensor::cat(&[&input, &pad], 1)?;
    let mask = Tensor::cat(
        &[Tensor::ones((2, 7), DType::U8, &Device::Cpu)?, Tensor::zeros((2, 5), DType::U8, &Device::Cpu)?],
        1,
    )?;
    let got = lm.model().token_logps(&padded, Some(&mask), 4)?.narrow(1, 0, 7)?;
    let diff = max_abs_diff(&got, &base)?;
    assert!(diff < 1e-5, "padding changed real log-probs by {diff}");
    // A shorter row in the same batch: its real tokens equal its unpadded run.
    let short = input.i((1..2, 0..4))?;
    let alone = lm.model().token_logps(&short, None, 4)?;
    let mixed_mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], &Device::Cpu)?;
    let mixed = lm.model().token_logps(&input, Some(&mixed_mask), 4)?.i((1..2, 0..4))?;
    assert!(max_abs_diff(&mixed, &alone)? < 1e-5);
    Ok(())
}

#[test]
fn gradients_reach_every_weight() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 4)?;
        let input = ids(2, 6, cfg.vocab_size, 1)?;
        let grads = lm.model().token_logps(&input, None, 4)?.sum_all()?.backward()?;
        for (weight, var) in lm.trainable_vars() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {weight}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {weight} is {norm}");
        }
    }
    Ok(())
}

#[test]
fn greedy_generation_is_the_argmax_chain_and_stops() -> Result<()> {
    let (_, cfg) = &configs()[0];
    let lm = model(cfg, 5)?;
    let prompt = [1u32, 2, 3];
    let out = lm.model().generate_greedy(&prompt, 4, &[])?;
    assert_eq!(out.len(), 4);
    // Each token is the argmax after the prompt plus the tokens before it.
    let mut seqs = prompt.to_vec();
    for &tok in &out {
        let logits = lm.model().last_logits(&Tensor::new(seqs.as_slice(), &Device::Cpu)?.unsqueeze(0)?, None)?;
        assert_eq!(logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0], tok);
        seqs.push(tok);
    }
    let stopped = lm.model().generate_greedy(&prompt, 4, &[out[0]])?;
    assert_eq!(stopped, vec![out[0]]);
    Ok(())
}

#[test]
fn save_and_load_round_trip_bit_exact_single_and_sharded() -> Result<()> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cfg) = &configs()[1];
    let lm = model(cfg, 6)?;
    lm.save_dir(dir.path())?;
    let back = CausalLm::from_dir(dir.path(), &Device::Cpu)?;
    let (a, b) = (lm.weights(), back.weights());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, b[name].flatten_all()?.to_vec1::<f32>()?, "{name}");
    }
    // Sharded: split the weights over two files with an index.
    let sharded = tempfile::tempdir().expect("tempdir");
    let (mut first, mut second) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in a.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut first, "model-00001-of-00002.safetensors")
        } else {
            (&mut second, "model-00002-of-00002.safetensors")
        };
        shard.insert(name.clone(), t.clone());
        map.insert(name.clone(), file.into());
    }
    candle_core::safetensors::save(&first, sharded.path().join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&second, sharded.path().join("model-00002-of-00002.safetensors"))?;
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .expect("index");
    std::fs::copy(dir.path().join("config.json"), sharded.path().join("config.json")).expect("config");
    let from_shards = CausalLm::from_dir(sharded.path(), &Device::Cpu)?;
    let input = ids(1, 5, cfg.vocab_size, 2)?;
    let (x, y) = (lm.model().last_logits(&input, None)?, from_shards.model().last_logits(&input, None)?);
    assert_eq!(x.to_vec2::<f32>()?, y.to_vec2::<f32>()?);
    Ok(())
}

#[test]
fn invalid_configs_are_rejected_with_the_field_named() {
    let base = serde_json::to_value(LlamaConfig::tiny(10, 8, 16, 1, 2, 1)).expect("json");
    for (field, value, needle) in [
        ("num_key_value_heads", serde_json::json!(3), "num_key_value_heads"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
        ("model_type", serde_json::json!("gemma"), "model_type"),
        ("vocab_size", serde_json::json!(0), "vocab_size"),
        ("attention_bias", serde_json::json!(true), "attention_bias"),
        ("rope_scaling", serde_json::json!({"rope_type": "yarn"}), "rope_scaling"),
    ] {
        let mut v = base.clone();
        v[field] = value;
        let err = LlamaConfig::from_json(&v.to_string(), "dir/config.json").expect_err(field);
        let text = err.to_string();
        assert!(text.contains(needle) && text.contains("dir/config.json"), "{text}");
        assert!(matches!(err, ModelError::Config { .. }));
    }
    let err = LlamaConfig::from_json("{\"hidden_size\": 4}", "c.json").expect_err("missing fields");
    assert!(err.to_string().contains("vocab_size"), "{err}");
}

#[test]
fn sampled_generation_is_seeded_and_follows_the_distribution() -> Result<()> {
    let (_, cfg) = &configs()[0];
    let lm = model(cfg, 9)?;
    let prompt = [3u32, 8, 1];
    let a = lm.model().generate_sampled(&prompt, 6, &[], 1.0, 42)?;
    assert_eq!(a, lm.model().generate_sampled(&prompt, 6, &[], 1.0, 42)?);
    assert_eq!(a.len(), 6);
    // Temperature 0 is greedy; a very low temperature samples the argmax too.
    let greedy = lm.model().generate_greedy(&prompt, 4, &[])?;
    assert_eq!(lm.model().generate_sampled(&prompt, 4, &[], 0.0, 1)?, greedy);
    assert_eq!(lm.model().generate_sampled(&prompt, 4, &[], 1e-4, 1)?, greedy);
    // With near-uniform random weights, temperature 1 explores: different seeds differ somewhere.
    let outs: std::collections::HashSet<Vec<u32>> =
        (0..5).map(|s| lm.model().generate_sampled(&prompt, 6, &[], 1.0, s)).collect::<Result<_>>()?;
    assert!(outs.len() > 1);
    // Stops after the first stop id.
    let first = a[0];
    assert_eq!(lm.model().generate_sampled(&prompt, 6, &[first], 1.0, 42)?, vec![first]);
    Ok(())
}
