//! The fused Llama forward pass equals the reference composition: hidden states, per-token
//! log-probs and the gradient of every weight within 1e-5, with padding.

use candle_core::{DType, Device, Tensor};
use slime_models::{CausalLm, LlamaConfig, Model, Result};

mod common;
use common::randn;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn fused_llama_matches_reference_values_and_every_weight_gradient() -> Result<()> {
    let dev = Device::Cpu;
    // Grouped-query attention, untied embeddings, two layers.
    let mut cfg = LlamaConfig::tiny(61, 32, 48, 2, 4, 2);
    cfg.tie_word_embeddings = false;
    let lm = CausalLm::random(&cfg, 3, &dev)?;
    let Model::Llama(llama) = lm.model() else { unreachable!("a Llama config") };
    let (batch, seq) = (3, 13);
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i * 37 + 11) % 61) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let mut m = vec![1u8; batch * seq];
    for t in 9..seq {
        m[seq + t] = 0;
    }
    m[2 * seq + 12] = 0;
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    for (seed, padding) in [(1, None), (2, Some(&mask))] {
        let h1 = llama.forward_hidden(&ids, padding)?;
        let h0 = llama.forward_hidden_reference(&ids, padding)?;
        assert!(max_abs_diff(&h1, &h0)? < 1e-5, "hidden states differ by {}", max_abs_diff(&h1, &h0)?);
        let coef = randn(seed, 0.0, 1.0, (batch, seq));
        let logps = |h: &Tensor| slime_models::logps::chunked_token_logps(h, llama.lm_head(), &ids, 5);
        let (l1, l0) = (logps(&h1)?, logps(&h0)?);
        assert!(max_abs_diff(&l1, &l0)? < 1e-5, "log-probs differ by {}", max_abs_diff(&l1, &l0)?);
        let g1 = (&l1 * &coef)?.sum_all()?.backward()?;
        let g0 = (&l0 * &coef)?.sum_all()?.backward()?;
        for (name, var) in lm.trainable_vars() {
            let a = g1.get(var.as_tensor()).unwrap_or_else(|| panic!("fused gradient for {name}"));
            let b = g0.get(var.as_tensor()).unwrap_or_else(|| panic!("reference gradient for {name}"));
            let d = max_abs_diff(a, b)?;
            assert!(d < 1e-5, "{name}: gradients differ by {d}");
            assert!(b.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}: zero gradient");
        }
    }
    // The public entry point takes the fused path and still matches.
    let fused = lm.model().token_logps(&ids, Some(&mask), 4)?;
    let reference = slime_models::logps::chunked_token_logps(
        &llama.forward_hidden_reference(&ids, Some(&mask))?,
        llama.lm_head(),
        &ids,
        4,
    )?;
    assert!(max_abs_diff(&fused, &reference)? < 1e-5);
    assert_eq!(fused.dtype(), DType::F32);
    Ok(())
}

#[test]
fn fused_llama_with_lora_matches_reference_and_trains_only_adapters() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = LlamaConfig::tiny(61, 32, 48, 2, 4, 2);
    let lm = CausalLm::random(&cfg, 5, &dev)?
        .with_lora(slime_models::LoraConfig::new(4, 8.0, &["q_proj", "o_proj", "up_proj"]), 6)?;
    for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            var.set(&randn(100 + i as u64, 0.0, 0.05, var.dims()))?;
        }
    }
    let Model::Llama(llama) = lm.model() else { unreachable!("a Llama config") };
    let ids: Vec<u32> = (0..2 * 9).map(|i| ((i * 13 + 5) % 61) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 9), &dev)?;
    let logps = |h: &Tensor| slime_models::logps::chunked_token_logps(h, llama.lm_head(), &ids, 4);
    let (l1, l0) = (logps(&llama.forward_hidden(&ids, None)?)?, logps(&llama.forward_hidden_reference(&ids, None)?)?);
    assert!(max_abs_diff(&l1, &l0)? < 1e-5, "log-probs differ by {}", max_abs_diff(&l1, &l0)?);
    let (g1, g0) = (l1.sum_all()?.backward()?, l0.sum_all()?.backward()?);
    for (name, var) in lm.trainable_vars() {
        let (a, b) =
            (g1.get(var.as_tensor()).expect("fused gradient"), g0.get(var.as_tensor()).expect("reference gradient"));
        assert!(max_abs_diff(a, b)? < 1e-5, "{name}: gradients differ by {}", max_abs_diff(a, b)?);
    }
    Ok(())
}

/// LoRA r 4 on all seven projections of Qwen2 (q/k/v biases), Gemma 3 (q/k norm, post-norms,
/// GeGLU), Gemma 2 (soft-capped scores) and Mistral (sliding window 4 on every layer) with right
/// padding: the fused model's log-probs and
/// every adapter's gradient equal the reference composition's within 1e-5 (relative to the
/// gradient's largest magnitude where that exceeds 1); the frozen lm_head
/// (the tied embedding) gets no gradient.
#[test]
fn fused_qwen2_and_gemma_with_lora_match_reference() -> Result<()> {
    let dev = Device::Cpu;
    let configs: Vec<slime_models::ModelConfig> = vec![
        LlamaConfig::tiny_qwen2(61, 32, 48, 2, 4, 2).into(),
        slime_models::GemmaConfig::tiny3(61, 32, 48, 2, 4, 2).into(),
        slime_models::GemmaConfig::tiny2(61, 32, 48, 2, 4, 2).into(),
        slime_models::MistralConfig::tiny(61, 32, 48, 2, 4, 2).into(),
    ];
    let ids: Vec<u32> = (0..2 * 11).map(|i| ((i * 17 + 3) % 61) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 11), &dev)?;
    let mut m = vec![1u8; 2 * 11];
    m[11 + 8..].fill(0);
    let mask = Tensor::from_vec(m, (2, 11), &dev)?;
    for cfg in configs {
        let lm = CausalLm::random(&cfg, 9, &dev)?;
        common::spread_biases_and_norms(&lm)?;
        let lm = lm.with_lora(slime_models::LoraConfig::new(4, 8.0, &slime_models::lora::ADAPTABLE), 10)?;
        for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
            if name.contains("lora_B") {
                var.set(&randn(400 + i as u64, 0.0, 0.05, var.dims()))?;
            }
        }
        let m = lm.model();
        let (fused, reference) = (m.forward_hidden(&ids, Some(&mask))?, m.forward_hidden_reference(&ids, Some(&mask))?);
        let lm_head = m.lm_head();
        let logps = |h: &Tensor| -> Result<Tensor> {
            let l = slime_models::logps::chunked_token_logps(h, lm_head, &ids, 4)?;
            Ok((l * mask.to_dtype(DType::F32)?)?)
        };
        let (l1, l0) = (logps(&fused)?, logps(&reference)?);
        let what = cfg.model_type().to_string();
        assert!(max_abs_diff(&l1, &l0)? < 1e-5, "{what}: log-probs differ by {}", max_abs_diff(&l1, &l0)?);
        let weights = randn(410, 1.0, 0.5, (2, 11));
        let (g1, g0) = ((&l1 * &weights)?.sum_all()?.backward()?, (&l0 * &weights)?.sum_all()?.backward()?);
        assert!(g1.get(lm_head).is_none(), "{what}: the frozen lm_head got a gradient");
        let vars = lm.trainable_vars();
        assert_eq!(vars.len(), 2 * 7 * 2, "{what}: A and B of 7 projections in 2 layers");
        for (name, var) in vars {
            let (a, b) = (
                g1.get(var.as_tensor()).expect("fused gradient"),
                g0.get(var.as_tensor()).expect("reference gradient"),
            );
            // Within 1e-5 of the largest magnitude when that exceeds 1, as in `tests/fused.rs`
            // (Gemma's `sqrt(hidden)`-scaled embeddings make some adapter gradients O(10)).
            let (d, scale) = (max_abs_diff(a, b)?, b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
            assert!(d < 1e-5 * scale.max(1.0), "{what} {name}: gradients differ by {d} (largest magnitude {scale})");
            assert!(b.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{what} {name}: zero gradient");
        }
    }
    Ok(())
}

/// Gradient checkpointing recomputes exactly what the kept activations held: the same log-probs
/// and the same gradient for every weight, bit for bit, packed pairs and LoRA included.
#[test]
fn gradient_checkpointing_gives_identical_values_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = LlamaConfig::tiny(61, 32, 48, 2, 4, 2);
    let (batch, seq) = (4, 11);
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i * 29 + 5) % 61) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let mut m = vec![1u8; batch * seq];
    m[2 * seq - 1] = 0;
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    let coef = randn(3, 0.0, 1.0, (batch, seq));
    for lora in [false, true] {
        let mut lm = CausalLm::random(&cfg, 5, &dev)?;
        if lora {
            lm = lm
                .with_lora(slime_models::LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "gate_proj", "down_proj"]), 1)?;
            // Non-zero B, so the adapters change the model and get gradients through it.
            for (i, (_, var)) in lm.trainable_vars().into_iter().enumerate() {
                var.set(&randn(200 + i as u64, 0.0, 0.05, var.shape()))?;
            }
        }
        let run = |on: bool| -> Result<(Tensor, Vec<Tensor>)> {
            lm.model().set_gradient_checkpointing(on)?;
            assert_eq!(lm.model().gradient_checkpointing(), on);
            let logps = lm.model().pair_token_logps(&ids, Some(&mask), 4)?;
            let grads = (&logps * &coef)?.sum_all()?.backward()?;
            let per_var = lm
                .trainable_vars()
                .iter()
                .map(|(name, v)| grads.get(v.as_tensor()).cloned().unwrap_or_else(|| panic!("no gradient for {name}")))
                .collect();
            Ok((logps, per_var))
        };
        let (l_keep, g_keep) = run(false)?;
        let (l_rec, g_rec) = run(true)?;
        assert_eq!(max_abs_diff(&l_keep, &l_rec)?, 0.0, "log-probs (lora {lora})");
        for ((name, _), (a, b)) in lm.trainable_vars().iter().zip(g_keep.iter().zip(&g_rec)) {
            assert_eq!(max_abs_diff(a, b)?, 0.0, "{name} (lora {lora})");
        }
        // The flag survives merging the adapters back.
        if lora {
            assert!(lm.merge_lora()?.model().gradient_checkpointing());
        }
    }
    Ok(())
}

/// Gemma's fused blocks take gradient checkpointing too (tested in `tests/gemma.rs`).
#[test]
fn gradient_checkpointing_switches_for_gemma() -> Result<()> {
    let cfg = slime_models::GemmaConfig::tiny3(61, 32, 48, 2, 4, 2);
    let lm = CausalLm::random(&cfg, 0, &Device::Cpu)?;
    assert!(!lm.model().gradient_checkpointing());
    lm.model().set_gradient_checkpointing(true)?;
    assert!(lm.model().gradient_checkpointing());
    lm.model().set_gradient_checkpointing(false)?;
    assert!(!lm.model().gradient_checkpointing());
    Ok(())
}

#[test]
fn activation_meter_counts_what_the_blocks_keep_until_the_backward_pass() -> Result<()> {
    let dev = Device::Cpu;
    let (vocab, hidden, inter, layers, heads, kv_heads) = (61, 32, 48, 3, 4, 2);
    let cfg = LlamaConfig::tiny(vocab, hidden, inter, layers, heads, kv_heads);
    let (batch, seq) = (2, 9);
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i * 13 + 3) % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let lm = CausalLm::random(&cfg, 2, &dev)?;
    let meter = lm.model().activation_meter().expect("a Llama has a meter");
    // Per layer and position: q|k|v (heads + 2 kv heads) x head_dim, the attention output
    // heads x head_dim, and gate|up 2 x intermediate; and the attention probabilities; in f32.
    let head_dim = hidden / heads;
    let per_layer = batch * seq * ((heads + 2 * kv_heads) * head_dim + heads * head_dim + 2 * inter) * 4
        + slime_models::fused::kept_probability_floats(batch, seq, heads) * 4;
    for checkpointing in [false, true] {
        lm.model().set_gradient_checkpointing(checkpointing)?;
        meter.reset_peak();
        let expected = if checkpointing { 0 } else { layers * per_layer };
        let logps = lm.model().token_logps(&ids, None, 4)?;
        assert_eq!(meter.held_bytes(), expected, "after the forward pass (checkpointing {checkpointing})");
        logps.sum_all()?.backward()?;
        assert_eq!(meter.held_bytes(), 0, "after the backward pass (checkpointing {checkpointing})");
        assert_eq!(meter.peak_bytes(), expected, "peak (checkpointing {checkpointing})");
    }
    // A forward pass whose graph is dropped without a backward pass releases its count too.
    lm.model().set_gradient_checkpointing(false)?;
    drop(lm.model().token_logps(&ids, None, 4)?);
    assert_eq!(meter.held_bytes(), 0, "after dropping an un-differentiated graph");
    Ok(())
}
