//! Key/value-cache decoding: cached logits equal the full-prefix forward at every step (prompt in
//! one piece or in chunks, sequences longer than the sliding window), greedy decoding gives the
//! same tokens as re-running the whole prefix, for Llama (GQA), Gemma 1, Gemma 2 (soft-capping,
//! sliding window shorter than the sequence) and Gemma 3 (QK-norm, local/global layers), with
//! and without LoRA adapters.

use candle_core::{D, Device, Tensor};
use slime_models::{CausalLm, GemmaConfig, KvCache, LlamaConfig, LoraConfig, ModelConfig, ModelError, Result};

fn configs() -> Vec<(&'static str, ModelConfig)> {
    let llama = LlamaConfig { max_position_embeddings: 64, ..LlamaConfig::tiny(97, 32, 80, 2, 4, 2) };
    let mut llama3 = LlamaConfig { num_key_value_heads: Some(1), ..llama.clone() };
    llama3.rope_scaling = Some(slime_models::RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    });
    let gemma1 = GemmaConfig { max_position_embeddings: 64, ..GemmaConfig::tiny(97, 32, 80, 2, 4, 2) };
    let gemma2 = GemmaConfig {
        max_position_embeddings: 64,
        sliding_window: Some(3),
        attn_logit_softcapping: Some(2.0),
        final_logit_softcapping: Some(3.0),
        query_pre_attn_scalar: Some(12.0),
        ..GemmaConfig::tiny2(97, 32, 80, 3, 4, 2)
    };
    let gemma3 = GemmaConfig {
        max_position_embeddings: 64,
        sliding_window: Some(4),
        query_pre_attn_scalar: Some(5.0),
        ..GemmaConfig::tiny3(97, 32, 80, 3, 4, 1)
    };
    vec![
        ("llama", llama.into()),
        ("llama3-mqa", llama3.into()),
        ("gemma", gemma1.into()),
        ("gemma2", gemma2.into()),
        ("gemma3", gemma3.into()),
    ]
}

/// A random model with norm weights away from their neutral value and larger projections, so
/// logits spread out and every part of the layer matters.
fn model(cfg: &ModelConfig, seed: u64) -> Result<CausalLm> {
    let lm = CausalLm::random(cfg, seed, &Device::Cpu)?;
    for (name, var) in lm.trainable_vars() {
        let n = var.elem_count();
        if name.contains("norm") {
            let w: Vec<f32> = (0..n).map(|i| 0.75 + 0.5 * ((i * 7 % 13) as f32 / 13.0)).collect();
            var.set(&Tensor::from_vec(w, n, &Device::Cpu)?)?;
        } else {
            var.set(&(var.as_tensor() * 4.0)?)?;
        }
    }
    Ok(lm)
}

fn row(ids: &[u32]) -> Result<Tensor> {
    Ok(Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn tokens(n: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + seed * 11 + 5) % vocab) as u32).collect()
}

/// Feeds `seq` in pieces of the given sizes and compares each piece's last-position logits with
/// the full forward over the prefix so far.
fn check_pieces(name: &str, lm: &CausalLm, seq: &[u32], pieces: &[usize]) -> Result<()> {
    let model = lm.model();
    let mut cache = KvCache::new(model);
    let mut at = 0;
    for &p in pieces {
        let cached = model.forward_cached(&row(&seq[at..at + p])?, &mut cache)?;
        at += p;
        assert_eq!(cache.len(), at);
        let full = model.last_logits(&row(&seq[..at])?, None)?;
        let diff = max_abs_diff(&cached, &full)?;
        assert!(diff < 1e-4, "{name}: after {at} positions ({pieces:?}) cached logits differ by {diff}");
        let spread = (full.max_keepdim(D::Minus1)? - full.min_keepdim(D::Minus1)?)?.to_vec2::<f32>()?[0][0];
        assert!(spread > 0.1, "{name}: logits too flat ({spread}) for the comparison to mean anything");
    }
    Ok(())
}

#[test]
fn cached_logits_equal_the_full_forward_at_every_step() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 3)?;
        let seq = tokens(14, 97, 1);
        // Prompt at once then one token per step; and chunks crossing the sliding window.
        check_pieces(name, &lm, &seq, &[5, 1, 1, 1, 1, 1, 1, 1, 1, 1])?;
        check_pieces(name, &lm, &seq, &[1, 3, 6, 2, 2])?;
    }
    Ok(())
}

/// Greedy decoding by re-running the whole prefix each step (the path without a cache).
fn greedy_uncached(lm: &CausalLm, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let logits = lm.model().last_logits(&row(&seq)?, None)?;
        let next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
        seq.push(next);
        out.push(next);
    }
    Ok(out)
}

#[test]
fn cached_greedy_decoding_gives_the_uncached_tokens() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 4)?;
        let prompt = tokens(4, 97, 2);
        let want = greedy_uncached(&lm, &prompt, 12)?;
        let have = lm.model().generate_greedy(&prompt, 12, &[])?;
        assert_eq!(have, want, "{name}");
        // Not a constant chain: the test would notice a decoder stuck on one token.
        assert!(want.iter().any(|&t| t != want[0]), "{name}: degenerate chain {want:?}");
        // Stop ids end decoding after the stop token; temperature 0 is greedy.
        let first = want.iter().position(|&t| t == want[5]).map_or(want.len(), |i| i + 1);
        assert_eq!(lm.model().generate_greedy(&prompt, 12, &[want[5]])?, want[..first].to_vec(), "{name}");
        assert_eq!(lm.model().generate_sampled(&prompt, 12, &[], 0.0, 9)?, want, "{name}");
    }
    Ok(())
}

#[test]
fn lora_models_decode_with_the_cache_too() -> Result<()> {
    for (name, cfg) in configs().into_iter().filter(|(n, _)| matches!(*n, "llama" | "gemma3")) {
        let lm = model(&cfg, 5)?
            .with_lora(LoraConfig::new(4, 8.0, &["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]), 6)?;
        for (_, var) in lm.trainable_vars() {
            if var.dims()[1] == 4 {
                let n = var.elem_count();
                let v: Vec<f32> = (0..n).map(|i| 0.05 * ((i % 7) as f32 - 3.0)).collect();
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
            }
        }
        let seq = tokens(10, 97, 3);
        check_pieces(name, &lm, &seq, &[4, 1, 1, 1, 1, 2])?;
        let prompt = tokens(3, 97, 4);
        assert_eq!(lm.model().generate_greedy(&prompt, 8, &[])?, greedy_uncached(&lm, &prompt, 8)?, "{name}");
        lm.set_adapters_enabled(false);
        check_pieces(name, &lm, &seq, &[4, 6])?;
    }
    Ok(())
}

#[test]
fn cache_misuse_is_an_error_and_decoding_stops_at_max_positions() -> Result<()> {
    let cfgs = configs();
    let llama = model(&cfgs[0].1, 1)?;
    let gemma2 = model(&cfgs[3].1, 1)?;
    // A cache built for a 3-layer model does not fit a 2-layer one.
    let mut wrong = KvCache::new(gemma2.model());
    assert!(matches!(llama.model().forward_cached(&row(&[1, 2])?, &mut wrong), Err(ModelError::Input { .. })));
    // Batch changes within one cache are rejected; empty inputs too.
    let mut cache = KvCache::new(llama.model());
    llama.model().forward_cached(&row(&[1, 2])?, &mut cache)?;
    let two_rows = Tensor::new(&[[3u32], [4]], &Device::Cpu)?;
    assert!(matches!(llama.model().forward_cached(&two_rows, &mut cache), Err(ModelError::Input { .. })));
    assert!(llama.model().generate_greedy(&[], 3, &[]).is_err());
    // Positions beyond max_position_embeddings are refused; generation stops before them.
    let long = tokens(63, 97, 0);
    assert_eq!(llama.model().generate_greedy(&long, 10, &[])?.len(), 1);
    let mut cache = KvCache::new(llama.model());
    assert!(llama.model().forward_cached(&row(&tokens(65, 97, 0))?, &mut cache).is_err());
    cache.reset();
    assert!(cache.is_empty());
    Ok(())
}
