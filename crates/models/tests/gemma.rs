//! Gemma 1: parity with candle-transformers' inference model (which agrees with transformers
//! for Gemma 1: sqrt(hidden) embedding scale, `(1 + w)` RMSNorm, GeGLU with tanh GELU, tied
//! lm_head), chunked log-probs, padding invariance, gradients, checkpoints, config errors.

use std::collections::HashMap;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::gemma as reference;
use slime_models::{CausalLm, GemmaConfig, Model, ModelConfig, ModelError, Result};

fn configs() -> Vec<(&'static str, GemmaConfig)> {
    let gqa = GemmaConfig::tiny(97, 32, 80, 2, 4, 2);
    // Real Gemma configs have head_dim != hidden / heads (2B: 2048 / 8 heads, head_dim 256).
    let wide_heads = GemmaConfig { head_dim: 12, num_key_value_heads: 1, ..gqa.clone() };
    vec![("gqa", gqa), ("mqa-head-dim-12", wide_heads)]
}

/// Stored norm weights away from 0 (effective scale `1 + w` away from 1) so the test sees them.
fn model(cfg: &GemmaConfig, seed: u64) -> Result<CausalLm> {
    let lm = CausalLm::random(cfg, seed, &Device::Cpu)?;
    for (name, var) in lm.trainable_vars() {
        if name.contains("norm") {
            let n = var.elem_count();
            let w: Vec<f32> = (0..n).map(|i| -0.25 + 0.5 * ((i * 7 % 13) as f32 / 13.0)).collect();
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
        let text =
            serde_json::to_string(&cfg).map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        let ref_cfg: reference::Config =
            serde_json::from_str(&text).map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        let vb = VarBuilder::from_tensors(lm.weights(), DType::F32, &Device::Cpu);
        let mut theirs = reference::Model::new(false, &ref_cfg, vb)?;
        let input = ids(2, 9, cfg.vocab_size, 0)?;
        let want = theirs.forward(&input, 0)?.squeeze(1)?;
        let have = lm.model().last_logits(&input, None)?;
        let diff = max_abs_diff(&have, &want)?;
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
        assert!(want.abs()?.max_keepdim(D::Minus1)?.min_all()?.to_scalar::<f32>()? > 1e-3);
    }
    Ok(())
}

#[test]
fn chunked_logps_equal_full_log_softmax_gather_and_ignore_padding() -> Result<()> {
    let (_, cfg) = &configs()[0];
    let lm = model(cfg, 2)?;
    let input = ids(2, 7, cfg.vocab_size, 1)?;
    let hidden = lm.model().forward_hidden(&input, None)?;
    let lm_head = &lm.weights()["model.embed_tokens.weight"];
    let full = candle_nn::ops::log_softmax(&hidden.broadcast_matmul(&lm_head.t()?)?, D::Minus1)?;
    let got = lm.model().token_logps(&input, None, 3)?;
    for b in 0..2 {
        assert_eq!(got.i((b, 0))?.to_scalar::<f32>()?, 0.0);
        for t in 1..7 {
            let label = input.i((b, t))?.to_scalar::<u32>()? as usize;
            let want = full.i((b, t - 1, label))?.to_scalar::<f32>()?;
            assert!((want - got.i((b, t))?.to_scalar::<f32>()?).abs() < 1e-5, "b {b} t {t}");
        }
    }
    let padded = Tensor::cat(&[&input, &Tensor::zeros((2, 4), DType::U32, &Device::Cpu)?], 1)?;
    let mask = Tensor::cat(
        &[Tensor::ones((2, 7), DType::U8, &Device::Cpu)?, Tensor::zeros((2, 4), DType::U8, &Device::Cpu)?],
        1,
    )?;
    let with_pad = lm.model().token_logps(&padded, Some(&mask), 5)?.narrow(1, 0, 7)?;
    assert!(max_abs_diff(&with_pad, &got)? < 1e-5);
    Ok(())
}

#[test]
fn gradients_reach_every_weight() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 4)?;
        let grads = lm.model().token_logps(&ids(2, 6, cfg.vocab_size, 1)?, None, 4)?.sum_all()?.backward()?;
        let vars = lm.trainable_vars();
        assert_eq!(vars.len(), 2 + 9 * cfg.num_hidden_layers, "{name}: tied lm_head, no extra weights");
        for (weight, var) in vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {weight}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {weight} is {norm}");
        }
    }
    Ok(())
}

#[test]
fn save_and_load_round_trip_bit_exact() -> Result<()> {
    let (_, cfg) = &configs()[1];
    let lm = model(cfg, 5)?;
    let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
    lm.save_dir(dir.path())?;
    let back = CausalLm::from_dir(dir.path(), &Device::Cpu)?;
    // The written config.json spells out what the in-code config leaves to defaults
    // (layer_types, the activation): the same model, compared in that written form.
    assert_eq!(back.config().to_hf_json(), ModelConfig::Gemma(cfg.clone()).to_hf_json());
    let (a, b): (HashMap<_, _>, HashMap<_, _>) = (lm.weights(), back.weights());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, b[name].flatten_all()?.to_vec1::<f32>()?, "{name}");
    }
    let input = ids(1, 5, cfg.vocab_size, 2)?;
    assert_eq!(
        lm.model().token_logps(&input, None, 2)?.to_vec2::<f32>()?,
        back.model().token_logps(&input, None, 2)?.to_vec2::<f32>()?
    );
    Ok(())
}

#[test]
fn invalid_gemma_configs_are_rejected_with_the_field_named() {
    let base = serde_json::to_value(GemmaConfig::tiny(97, 32, 80, 2, 4, 2)).unwrap_or_default();
    for (field, value, needle) in [
        ("hidden_activation", serde_json::json!("relu"), "hidden_activation"),
        ("num_key_value_heads", serde_json::json!(3), "num_key_value_heads"),
        ("head_dim", serde_json::json!(7), "head_dim"),
        ("model_type", serde_json::json!("gemma3"), "model_type"),
        ("sliding_window", serde_json::json!(4), "model_type"),
    ] {
        let mut v = base.clone();
        v[field] = value;
        let err = ModelConfig::from_json(&v.to_string(), "dir/config.json").expect_err(field);
        let text = err.to_string();
        assert!(text.contains(needle) && text.contains("dir/config.json"), "{text}");
    }
    // Above, `gemma3` (not implemented yet) is rejected rather than run as Gemma 1, and Gemma 2
    // fields on a Gemma 1 config are an error; `gemma` and `gemma2` dispatch.
    let mut v = base.clone();
    v["model_type"] = serde_json::json!("gemma");
    assert!(matches!(ModelConfig::from_json(&v.to_string(), "c.json"), Ok(ModelConfig::Gemma(_))));
    let two = serde_json::to_string(&GemmaConfig::tiny2(97, 32, 80, 2, 4, 2)).unwrap_or_default();
    assert!(matches!(ModelConfig::from_json(&two, "c.json"), Ok(ModelConfig::Gemma(c)) if c.is_gemma2()));
}

fn gemma2(window: Option<usize>, layers: usize) -> GemmaConfig {
    GemmaConfig { sliding_window: window, ..GemmaConfig::tiny2(97, 32, 80, layers, 4, 2) }
}

/// Where candle-transformers' Gemma 2 agrees with transformers: `query_pre_attn_scalar = head_dim`
/// (it ignores the field) and sequences no longer than the window (it windows every layer, with
/// `i - j <= w` where transformers uses `i - j < w` on even layers only).
#[test]
fn gemma2_last_logits_match_candle_transformers() -> Result<()> {
    for (cfg, seq) in [(gemma2(None, 3), 9), (gemma2(Some(4), 3), 4)] {
        let lm = model(&cfg, 11)?;
        let mut json =
            serde_json::to_value(&cfg).map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        json["query_pre_attn_scalar"] = serde_json::json!(cfg.head_dim);
        let ref_cfg: candle_transformers::models::gemma2::Config =
            serde_json::from_value(json).map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        let vb = VarBuilder::from_tensors(lm.weights(), DType::F32, &Device::Cpu);
        let mut theirs = candle_transformers::models::gemma2::Model::new(false, &ref_cfg, vb)?;
        let input = ids(2, seq, cfg.vocab_size, 3)?;
        let want = theirs.forward(&input, 0)?.squeeze(1)?;
        let have = lm.model().last_logits(&input, None)?;
        let diff = max_abs_diff(&have, &want)?;
        assert!(diff < 1e-4, "window {:?}: logits differ by {diff}", cfg.sliding_window);
    }
    Ok(())
}

/// transformers: `scores = q k^T * query_pre_attn_scalar^-1/2`. Scaling q_proj by `s` scales the
/// scores by `s` (RoPE is linear), so scalar `X` equals scalar `head_dim` with q_proj scaled by
/// `sqrt(head_dim / X)`.
#[test]
fn gemma2_query_pre_attn_scalar_scales_scores() -> Result<()> {
    let base = gemma2(Some(4), 2);
    let x = 3.0 * base.head_dim as f64;
    let scaled_cfg = GemmaConfig { query_pre_attn_scalar: Some(x), ..base.clone() };
    let a = model(&scaled_cfg, 12)?;
    let b = model(&base, 12)?;
    for (name, var) in b.trainable_vars() {
        if name.contains("q_proj") {
            var.set(&(var.as_tensor() * (base.head_dim as f64 / x).sqrt())?)?;
        }
    }
    let input = ids(2, 7, base.vocab_size, 4)?;
    let (la, lb) = (a.model().token_logps(&input, None, 4)?, b.model().token_logps(&input, None, 4)?);
    assert!(max_abs_diff(&la, &lb)? < 1e-5);
    let unscaled = model(&base, 12)?.model().token_logps(&input, None, 4)?;
    assert!(max_abs_diff(&la, &unscaled)? > 1e-4, "the scalar must matter");
    Ok(())
}

/// transformers: on sliding (even) layers query `i` sees key `j` iff `0 <= i - j < window`;
/// odd layers are global.
#[test]
fn gemma2_sliding_window_only_on_even_layers_with_strict_bound() -> Result<()> {
    let w = 3;
    let (a, b) = (
        ids(1, 8, 97, 5)?,
        Tensor::cat(&[Tensor::new(&[[96u32]], &Device::Cpu)?, ids(1, 8, 97, 5)?.narrow(1, 1, 7)?], 1)?,
    );
    // One (sliding) layer: changing token 0 changes hidden states at positions < w only.
    let one = model(&gemma2(Some(w), 1), 13)?;
    let (ha, hb) = (one.model().forward_hidden(&a, None)?, one.model().forward_hidden(&b, None)?);
    for p in 0..8 {
        let diff = max_abs_diff(&ha.i((0, p))?, &hb.i((0, p))?)?;
        if p < w {
            assert!(diff > 1e-6, "position {p} must see token 0");
        } else {
            assert!(diff == 0.0, "position {p} must not see token 0 (diff {diff})");
        }
    }
    // Two layers: layer 1 is global, so every position sees token 0.
    let two = model(&gemma2(Some(w), 2), 13)?;
    let (ha, hb) = (two.model().forward_hidden(&a, None)?, two.model().forward_hidden(&b, None)?);
    assert!(max_abs_diff(&ha.i((0, 7))?, &hb.i((0, 7))?)? > 1e-6);
    Ok(())
}

#[test]
fn gemma2_softcaps_logits_and_trains_every_weight() -> Result<()> {
    let cfg = GemmaConfig { final_logit_softcapping: Some(0.5), ..gemma2(Some(3), 2) };
    let lm = model(&cfg, 14)?;
    let input = ids(2, 6, cfg.vocab_size, 6)?;
    let logits = lm.model().last_logits(&input, None)?;
    assert!(logits.abs()?.max_all()?.to_scalar::<f32>()? <= 0.5);
    // Chunked log-probs equal a full capped log-softmax gather.
    let hidden = lm.model().forward_hidden(&input, None)?;
    let full = hidden.broadcast_matmul(&lm.weights()["model.embed_tokens.weight"].t()?)?;
    let full = candle_nn::ops::log_softmax(&((full / 0.5)?.tanh()? * 0.5)?, D::Minus1)?;
    let got = lm.model().token_logps(&input, None, 4)?;
    for t in 1..6 {
        let label = input.i((1, t))?.to_scalar::<u32>()? as usize;
        let want = full.i((1, t - 1, label))?.to_scalar::<f32>()?;
        assert!((want - got.i((1, t))?.to_scalar::<f32>()?).abs() < 1e-5);
    }
    let grads = got.sum_all()?.backward()?;
    let vars = lm.trainable_vars();
    assert_eq!(vars.len(), 2 + 11 * 2, "two extra sandwich norms per layer");
    for (weight, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {weight}"));
        assert!(g.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{weight}");
    }
    Ok(())
}

fn gemma3(window: usize, layers: usize) -> GemmaConfig {
    GemmaConfig { sliding_window: Some(window), ..GemmaConfig::tiny3(97, 32, 80, layers, 4, 2) }
}

/// Where candle-transformers' Gemma 3 agrees with transformers: `query_pre_attn_scalar = head_dim`
/// (it ignores the field), no rope scaling, and no window cut inside the sequence (it windows with
/// `i - j <= w`). Covers QK-norm, sandwich norms and the two RoPE bases (pattern 2: local, global).
/// One key/value head: candle-transformers' Gemma 3 appends a non-contiguous value tensor to its
/// KV cache, which candle 0.11.1 rejects on CPU unless the transposed head dimension has size 1.
#[test]
fn gemma3_last_logits_match_candle_transformers() -> Result<()> {
    let mqa = |cfg: GemmaConfig| GemmaConfig { num_key_value_heads: 1, ..cfg };
    for (cfg, seq) in [(mqa(gemma3(16, 4)), 9), (mqa(gemma3(4, 3)), 4)] {
        let lm = model(&cfg, 21)?;
        let mut json =
            serde_json::to_value(&cfg).map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        json["query_pre_attn_scalar"] = serde_json::json!(cfg.head_dim);
        let ref_cfg: candle_transformers::models::gemma3::Config =
            serde_json::from_value(json).map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        let vb = VarBuilder::from_tensors(lm.weights(), DType::F32, &Device::Cpu);
        let mut theirs = candle_transformers::models::gemma3::Model::new(false, &ref_cfg, vb)?;
        let input = ids(2, seq, cfg.vocab_size, 7)?;
        let want = theirs.forward(&input, 0)?.squeeze(1)?;
        let have = lm.model().last_logits(&input, None)?;
        let diff = max_abs_diff(&have, &want)?;
        assert!(diff < 1e-4, "window {:?} seq {seq}: logits differ by {diff}", cfg.sliding_window);
    }
    Ok(())
}

/// Linear rope scaling applies to global layers only: with one (local) layer it changes nothing,
/// with a global layer it does; the local RoPE base matters only for local layers.
#[test]
fn gemma3_rope_scaling_and_local_base_reach_only_their_layers() -> Result<()> {
    let scaling = Some(slime_models::RopeScaling {
        rope_type: "linear".into(),
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let input = ids(1, 9, 97, 8)?;
    let logps = |cfg: &GemmaConfig| -> Result<Tensor> { model(cfg, 22)?.model().token_logps(&input, None, 4) };
    let one = gemma3(16, 1);
    let one_scaled = GemmaConfig { rope_scaling: scaling.clone(), ..one.clone() };
    assert_eq!(logps(&one)?.to_vec2::<f32>()?, logps(&one_scaled)?.to_vec2::<f32>()?);
    let one_local = GemmaConfig { rope_local_base_freq: Some(100.0), ..one.clone() };
    assert!(max_abs_diff(&logps(&one)?, &logps(&one_local)?)? > 1e-5);
    let two = gemma3(16, 2);
    let two_scaled = GemmaConfig { rope_scaling: scaling, ..two.clone() };
    assert!(max_abs_diff(&logps(&two)?, &logps(&two_scaled)?)? > 1e-5);
    Ok(())
}

#[test]
fn gemma3_trains_every_weight_and_round_trips() -> Result<()> {
    let cfg = GemmaConfig { query_pre_attn_scalar: Some(20.0), ..gemma3(3, 2) };
    let lm = model(&cfg, 23)?;
    let input = ids(2, 7, cfg.vocab_size, 9)?;
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], &Device::Cpu)?;
    let got = lm.model().token_logps(&input, Some(&mask), 3)?;
    // Padding invariance with the sliding window and QK-norm.
    let alone = lm.model().token_logps(&input.narrow(0, 1, 1)?.narrow(1, 0, 5)?, None, 3)?;
    assert!(max_abs_diff(&got.narrow(0, 1, 1)?.narrow(1, 0, 5)?, &alone)? < 1e-5);
    let grads = got.sum_all()?.backward()?;
    let vars = lm.trainable_vars();
    assert_eq!(vars.len(), 2 + 13 * 2, "sandwich norms and QK-norms");
    for (weight, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {weight}"));
        assert!(g.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{weight}");
    }
    let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
    lm.save_dir(dir.path())?;
    let back = CausalLm::from_dir(dir.path(), &Device::Cpu)?;
    assert_eq!(back.config().to_hf_json(), ModelConfig::Gemma(cfg).to_hf_json());
    assert_eq!(got.to_vec2::<f32>()?, back.model().token_logps(&input, Some(&mask), 3)?.to_vec2::<f32>()?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The fused path (f32 CPU): each layer as one `fused::attention_block` and one
// `fused::mlp_block_with` op.

fn gemma(lm: &CausalLm) -> &slime_models::Gemma {
    let Model::Gemma(m) = lm.model() else { unreachable!("a Gemma config builds the Gemma model") };
    m
}

/// Gemma 1 (head_dim 12 != hidden / heads), Gemma 2 and Gemma 3 (window 4, three layers: local,
/// global, local; sandwich norms; Gemma 2 with soft-capping at 1 and a query scale of 20^-1/2,
/// Gemma 3 with QK-norm), for fused-against-reference tests.
fn fused_configs() -> Vec<(&'static str, GemmaConfig)> {
    let gemma1 = GemmaConfig { head_dim: 12, ..GemmaConfig::tiny(97, 32, 80, 2, 4, 2) };
    let gemma2 =
        GemmaConfig { attn_logit_softcapping: Some(1.0), query_pre_attn_scalar: Some(20.0), ..gemma2(Some(4), 3) };
    vec![("gemma1", gemma1), ("gemma2", gemma2), ("gemma3", gemma3(4, 3))]
}

/// [`model`] with query and key projections 8x larger, so scores spread out (and soft-capping
/// at 1 bites).
fn fused_model(cfg: &GemmaConfig, seed: u64) -> Result<CausalLm> {
    let lm = model(cfg, seed)?;
    for (name, var) in lm.trainable_vars() {
        if name.contains("q_proj") || name.contains("k_proj") {
            var.set(&(var.as_tensor() * 8.0)?)?;
        }
    }
    Ok(lm)
}

/// Two rows of 11 tokens (longer than the window), the second right-padded after 7.
fn padded_input(vocab: usize) -> Result<(Tensor, Tensor)> {
    let mask: Vec<u8> = (0..22).map(|i| u8::from(i < 11 || i - 11 < 7)).collect();
    Ok((ids(2, 11, vocab, 5)?, Tensor::from_vec(mask, (2, 11), &Device::Cpu)?))
}

/// Bytes the fused blocks keep for a forward pass of `batch` rows of `seq` tokens, per layer:
/// per position q|k|v and the attention output; the attention probabilities (not with
/// soft-capped scores, Gemma 2, nor with the q/k norm, Gemma 3); per position gate|up, and with
/// the post-feedforward norm (Gemma 2/3) the MLP output; in f32.
fn kept_bytes(cfg: &GemmaConfig, batch: usize, seq: usize) -> usize {
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let positions = batch * seq;
    let probs = if cfg.attn_logit_softcapping.is_some() || cfg.is_gemma3() {
        0
    } else {
        slime_models::fused::kept_probability_floats(batch, seq, cfg.num_attention_heads)
    };
    cfg.num_hidden_layers * (positions * ((q + 2 * kv) + q) + probs) * 4
        + cfg.num_hidden_layers * mlp_kept_bytes(cfg, positions)
}

/// What one MLP block keeps for `positions` positions: gate|up, and the post-feed-forward norm's
/// input (Gemma 2/3).
fn mlp_kept_bytes(cfg: &GemmaConfig, positions: usize) -> usize {
    let post = if cfg.is_gemma2() || cfg.is_gemma3() { cfg.hidden_size } else { 0 };
    positions * (2 * cfg.intermediate_size + post) * 4
}

/// `hidden` at real positions (padding zeroed: a padding query whose sliding window holds no real
/// key is defined differently by the two paths, and nothing reads it).
fn real_positions(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(hidden.broadcast_mul(&mask.to_dtype(DType::F32)?.unsqueeze(2)?)?)
}

/// `sum(hidden * coef)` over real positions for a fixed `coef`, and its gradient for every
/// trainable weight.
fn hidden_and_grads(lm: &CausalLm, hidden: &Tensor, mask: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let n = hidden.elem_count();
    let coef: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
    let coef = Tensor::from_vec(coef, hidden.shape(), &Device::Cpu)?;
    let grads = (real_positions(hidden, mask)? * coef)?.sum_all()?.backward()?;
    let mut out = Vec::new();
    for (name, var) in lm.trainable_vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        out.push((name, g.clone()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The fused path equals the composed reference (kept as `forward_hidden_reference`): hidden
/// states at every real position and the gradient of every weight (norm weights away from 0, a
/// padded row, 11 tokens against a window of 4, so local layers cut keys) within 1e-5; the meter
/// shows the fused blocks ran (and the reference keeps nothing in them).
#[test]
fn fused_path_matches_the_reference_values_and_every_weight_gradient() -> Result<()> {
    for (name, cfg) in fused_configs() {
        let lm = fused_model(&cfg, 31)?;
        let m = gemma(&lm);
        let (input, mask) = padded_input(cfg.vocab_size)?;
        let fused = m.forward_hidden(&input, Some(&mask))?;
        assert_eq!(m.activation_meter().held_bytes(), kept_bytes(&cfg, 2, 11), "{name}: the fused blocks ran");
        let fused_grads = hidden_and_grads(&lm, &fused, &mask)?;
        assert_eq!(m.activation_meter().held_bytes(), 0, "{name}: freed by the backward pass");
        let reference = m.forward_hidden_reference(&input, Some(&mask))?;
        assert_eq!(m.activation_meter().held_bytes(), 0, "{name}: the reference keeps nothing in fused blocks");
        let reference_grads = hidden_and_grads(&lm, &reference, &mask)?;
        let d = max_abs_diff(&real_positions(&fused, &mask)?, &real_positions(&reference, &mask)?)?;
        assert!(d < 1e-5, "{name}: hidden states differ by {d}");
        assert_eq!(fused_grads.len(), reference_grads.len());
        for ((weight, a), (_, b)) in fused_grads.iter().zip(&reference_grads) {
            let d = max_abs_diff(a, b)?;
            let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(d < 1e-5 * scale.max(1.0), "{name}: gradient of {weight} differs by {d} (largest {scale})");
            assert!(scale > 0.0, "{name}: gradient of {weight} is zero");
        }
    }
    // The erf GELU keeps the composed path: the same numbers bit for bit, nothing kept.
    let erf = GemmaConfig { hidden_activation: Some("gelu".into()), ..gemma3(4, 2) };
    let lm = model(&erf, 32)?;
    let (input, mask) = padded_input(erf.vocab_size)?;
    let have = gemma(&lm).forward_hidden(&input, Some(&mask))?;
    assert_eq!(gemma(&lm).activation_meter().held_bytes(), 0);
    let want = gemma(&lm).forward_hidden_reference(&input, Some(&mask))?;
    assert_eq!(have.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// Gradient checkpointing changes nothing, bit for bit (log-probs and every weight's gradient,
/// rows and packed pairs); the meter counts exactly what the blocks keep (nothing when
/// checkpointing) until the backward pass, and the peak.
#[test]
fn gradient_checkpointing_is_bit_identical_and_the_meter_exact() -> Result<()> {
    for (name, cfg) in fused_configs() {
        let lm = fused_model(&cfg, 33)?;
        let meter = lm.model().activation_meter().expect("Gemma has a meter");
        let (input, mask) = padded_input(cfg.vocab_size)?;
        let mut runs = Vec::new();
        for checkpointing in [false, true] {
            lm.model().set_gradient_checkpointing(checkpointing)?;
            assert_eq!(lm.model().gradient_checkpointing(), checkpointing);
            meter.reset_peak();
            let expected = if checkpointing { 0 } else { kept_bytes(&cfg, 2, 11) };
            let logps = lm.model().token_logps(&input, Some(&mask), 4)?;
            assert_eq!(meter.held_bytes(), expected, "{name}: after the forward pass ({checkpointing})");
            let grads = logps.sum_all()?.backward()?;
            assert_eq!(meter.held_bytes(), 0, "{name}: after the backward pass ({checkpointing})");
            assert_eq!(meter.peak_bytes(), expected, "{name}: peak ({checkpointing})");
            let mut bits = vec![logps.flatten_all()?.to_vec1::<f32>()?];
            let mut vars = lm.trainable_vars();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, var) in vars {
                bits.push(grads.get(var.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?);
            }
            // One pair packed as one row of 11 + 9 - 5 = 15 positions: the rejected row shares
            // the first 5 tokens and is right-padded after 9.
            let chosen: Vec<u32> = input.narrow(0, 0, 1)?.flatten_all()?.to_vec1()?;
            let rejected: Vec<u32> =
                chosen.iter().enumerate().map(|(t, &v)| if t < 5 { v } else { (v + 1) % 97 }).collect();
            let pair_ids = Tensor::from_vec([chosen, rejected].concat(), (2, 11), &Device::Cpu)?;
            let pair_mask: Vec<u8> = (0..22).map(|i| u8::from(i < 11 || i - 11 < 9)).collect();
            let pair_mask = Tensor::from_vec(pair_mask, (2, 11), &Device::Cpu)?;
            let pair_logps = lm.model().pair_token_logps(&pair_ids, Some(&pair_mask), 4)?;
            // The last layer's MLP block runs on the 13 positions some log-prob is predicted
            // from: not on the two branches' last positions.
            let expected = if checkpointing { 0 } else { kept_bytes(&cfg, 1, 15) - mlp_kept_bytes(&cfg, 2) };
            assert_eq!(meter.held_bytes(), expected, "{name}: after the packed forward pass ({checkpointing})");
            let grads = pair_logps.sum_all()?.backward()?;
            assert_eq!(meter.held_bytes(), 0, "{name}: after the packed backward pass ({checkpointing})");
            bits.push(pair_logps.flatten_all()?.to_vec1::<f32>()?);
            for (_, var) in lm.trainable_vars() {
                bits.push(grads.get(var.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?);
            }
            runs.push(bits);
        }
        assert!(runs[0] == runs[1], "{name}: checkpointing changed values or gradients");
        lm.model().set_gradient_checkpointing(false)?;
    }
    Ok(())
}
