//! Key/value-cache decoding: cached logits equal the full-prefix forward at every step (prompt in
//! one piece or in chunks, sequences longer than the sliding window), greedy decoding gives the
//! same tokens as re-running the whole prefix, for Llama (GQA), Gemma 1, Gemma 2 (soft-capping,
//! sliding window shorter than the sequence) and Gemma 3 (QK-norm, local/global layers), with
//! and without LoRA adapters; left-padded batches give each row's own logits and tokens, greedy
//! and sampled (per-row seeds), whatever the batch.

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

/// Prompts of different lengths, the longest beyond every sliding window of [`configs`].
fn ragged_prompts(vocab: usize) -> Vec<Vec<u32>> {
    [9, 2, 5, 1, 12].iter().enumerate().map(|(i, &n)| tokens(n, vocab, i + 7)).collect()
}

/// Left-padded rows through the cache give each row's logits alone (the full forward over the
/// row's prefix), at the prompt, at later steps, and after rows leave the batch (including the
/// longest one, which drops filler slots every remaining row has).
#[test]
fn left_padded_rows_give_each_rows_logits_alone() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 7)?;
        let model = lm.model();
        let mut seqs = ragged_prompts(97);
        let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let pad: Vec<usize> = seqs.iter().map(|s| longest - s.len()).collect();
        let ids: Vec<u32> =
            seqs.iter().flat_map(|s| std::iter::repeat_n(0u32, longest - s.len()).chain(s.iter().copied())).collect();
        let mut cache = KvCache::left_padded(model, pad);
        let mut logits =
            model.forward_cached(&Tensor::from_vec(ids, (seqs.len(), longest), &Device::Cpu)?, &mut cache)?;
        // Batch row k holds sequence alive[k].
        let mut alive: Vec<usize> = (0..seqs.len()).collect();
        for step in 0..8 {
            for (k, &i) in alive.iter().enumerate() {
                let want = model.last_logits(&row(&seqs[i])?, None)?;
                let diff = max_abs_diff(&logits.narrow(0, k, 1)?, &want)?;
                assert!(diff < 1e-4, "{name}: step {step}, sequence {i} (length {}) differs by {diff}", seqs[i].len());
            }
            // Sequence 1 (short) leaves after step 2, sequence 4 (the longest) after step 4.
            let leaving: &[usize] = match step {
                2 => &[1],
                4 => &[4],
                _ => &[],
            };
            if !leaving.is_empty() {
                let keep: Vec<usize> = (0..alive.len()).filter(|&k| !leaving.contains(&alive[k])).collect();
                cache.retain_rows(&keep)?;
                alive = keep.iter().map(|&k| alive[k]).collect();
            }
            let next: Vec<u32> = alive.iter().map(|&i| ((i * 13 + step * 5 + 3) % 97) as u32).collect();
            for (&i, &t) in alive.iter().zip(&next) {
                seqs[i].push(t);
            }
            logits = model.forward_cached(&Tensor::from_vec(next, (alive.len(), 1), &Device::Cpu)?, &mut cache)?;
        }
        // The longest row left, so the others' common filler slots are gone.
        assert_eq!(cache.padding().iter().min(), Some(&0), "{name}");
        assert_eq!(alive, vec![0, 2, 3], "{name}");
    }
    Ok(())
}

/// Cuts `tokens` after the first stop id.
fn until_stop(tokens: &[u32], stop: &[u32]) -> Vec<u32> {
    tokens.iter().position(|t| stop.contains(t)).map_or(tokens.to_vec(), |i| tokens[..=i].to_vec())
}

#[test]
fn batched_greedy_decoding_equals_one_prompt_at_a_time() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 8)?;
        let prompts = ragged_prompts(97);
        let max_new = 10;
        // The reference: each prompt alone, re-running its whole prefix at every step.
        let alone: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_uncached(&lm, p, max_new)).collect::<Result<_>>()?;
        assert_eq!(lm.model().generate_greedy_batch(&prompts, max_new, &[])?, alone, "{name}");
        // A stop id from one row's output: rows stop at different steps, the rest run to max_new.
        let stop = [alone[0][3]];
        let want: Vec<Vec<u32>> = alone.iter().map(|a| until_stop(a, &stop)).collect();
        let lens: Vec<usize> = want.iter().map(Vec::len).collect();
        assert!(lens.iter().any(|&l| l < max_new) && lens.contains(&max_new), "{name}: lengths {lens:?}");
        let batched = lm.model().generate_greedy_batch(&prompts, max_new, &stop)?;
        assert_eq!(batched, want, "{name}");
        for (p, w) in prompts.iter().zip(&want) {
            assert_eq!(&lm.model().generate_greedy(p, max_new, &stop)?, w, "{name}");
        }
        // Any batch composition and order gives the same rows.
        let picked = [&prompts[4], &prompts[1], &prompts[2]];
        let sub = lm.model().generate_greedy_batch(&picked, max_new, &stop)?;
        assert_eq!(sub, vec![want[4].clone(), want[1].clone(), want[2].clone()], "{name}");
    }
    Ok(())
}

#[test]
fn batched_sampling_draws_per_row_streams_independent_of_the_batch() -> Result<()> {
    for (name, cfg) in configs().into_iter().filter(|(n, _)| matches!(*n, "llama" | "gemma2" | "gemma3")) {
        let lm = model(&cfg, 9)?;
        let m = lm.model();
        let prompts = ragged_prompts(97);
        let seeds = [11u64, 12, 13, 14, 15];
        let (max_new, temperature) = (12, 8.0);
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .zip(seeds)
            .map(|(p, s)| m.generate_sampled(p, max_new, &[], temperature, s))
            .collect::<Result<_>>()?;
        assert_eq!(m.generate_sampled_batch(&prompts, max_new, &[], temperature, &seeds)?, alone, "{name}");
        // Another composition and order: each row follows its own seed.
        let sub = m.generate_sampled_batch(&[&prompts[3], &prompts[0]], max_new, &[], temperature, &[14, 11])?;
        assert_eq!(sub, vec![alone[3].clone(), alone[0].clone()], "{name}");
        // Rows that stop at different steps leave the others' streams as they were.
        let stop = [alone[2][4]];
        let want: Vec<Vec<u32>> = alone.iter().map(|a| until_stop(a, &stop)).collect();
        assert!(want.iter().any(|w| w.len() < max_new), "{name}");
        assert_eq!(m.generate_sampled_batch(&prompts, max_new, &stop, temperature, &seeds)?, want, "{name}");
        // It samples: the same prompt under other seeds, and greedy, give other tokens.
        let same = vec![prompts[0].clone(); 4];
        let draws = m.generate_sampled_batch(&same, max_new, &[], temperature, &[1, 2, 3, 4])?;
        assert!(draws.iter().any(|d| *d != draws[0]), "{name}: seeds made no difference");
        let greedy = m.generate_greedy(&prompts[0], max_new, &[])?;
        assert!(draws.iter().any(|d| *d != greedy), "{name}: sampling gave the greedy tokens");
    }
    Ok(())
}

#[test]
fn batched_decoding_limits_and_bad_input() -> Result<()> {
    let cfgs = configs();
    let lm = model(&cfgs[0].1, 2)?;
    let m = lm.model();
    // max_position_embeddings = 64: a full prompt gets nothing, a 63-token one one token, the
    // others decode on.
    let (full, long, short) = (tokens(64, 97, 0), tokens(63, 97, 1), tokens(3, 97, 2));
    let out = m.generate_greedy_batch(&[&full, &long, &short], 5, &[])?;
    assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![0, 1, 5]);
    assert_eq!(out[1], m.generate_greedy(&long, 5, &[])?);
    assert_eq!(out[2], m.generate_greedy(&short, 5, &[])?);
    assert_eq!(m.generate_greedy_batch(&[&short], 0, &[])?, vec![Vec::<u32>::new()]);
    assert!(m.generate_greedy_batch::<Vec<u32>>(&[], 5, &[])?.is_empty());
    // An empty prompt, or a seed count that does not match, is an error naming the input.
    let err = m.generate_greedy_batch(&[&short, &vec![]], 5, &[]).err();
    assert!(
        matches!(&err, Some(ModelError::Input { input: "prompt", reason }) if reason.contains("prompt 1")),
        "{err:?}"
    );
    let err = m.generate_sampled_batch(&[&short, &long], 5, &[], 1.0, &[1]).err();
    assert!(matches!(err, Some(ModelError::Input { input: "seeds", .. })), "{err:?}");
    // A row with only filler slots, or rows outside the batch, are refused.
    let mut cache = KvCache::left_padded(m, vec![0, 2]);
    let two = Tensor::new(&[[1u32, 2], [0, 0]], &Device::Cpu)?;
    assert!(matches!(m.forward_cached(&two, &mut cache), Err(ModelError::Input { input: "padding", .. })));
    let mut cache = KvCache::left_padded(m, vec![0, 1]);
    m.forward_cached(&Tensor::new(&[[1u32, 2], [0, 3]], &Device::Cpu)?, &mut cache)?;
    for bad in [vec![], vec![2], vec![1, 0], vec![0, 0]] {
        assert!(matches!(cache.retain_rows(&bad), Err(ModelError::Input { input: "rows", .. })), "{bad:?}");
    }
    let three = Tensor::new(&[[1u32], [2], [3]], &Device::Cpu)?;
    assert!(matches!(m.forward_cached(&three, &mut cache), Err(ModelError::Input { .. })));
    Ok(())
}
