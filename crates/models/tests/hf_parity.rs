//! Parity with Hugging Face transformers (the reference implementation) on committed fixtures
//! written by `scripts/make_model_fixtures.py` (transformers 5.23, Qwen 5.24; fp32, eager
//! attention): tiny random Llama with "llama3" RoPE scaling, Gemma 2 (soft-capping, sliding window
//! 6 < 24 tokens, query_pre_attn_scalar != head_dim), Gemma 3 text (QK-norm, local/global layers
//! with their own RoPE bases, linear scaling on global layers, sliding window 5), Qwen2 (q/k/v
//! biases, untied) and Qwen3 (per-head q/k RMSNorm, head_dim != hidden / heads, tied), Mistral
//! (transformers 5.25: sliding window 5 on every layer, head_dim != hidden / heads, untied),
//! non-trivial norm weights and biases, one right-padded row. Loaded with `CausalLm::from_dir` from
//! the config.json / model.safetensors transformers saved (its `rope_parameters` / `layer_types`
//! layout); no Python at test time.

use std::path::PathBuf;

use candle_core::{D, DType, Device, Tensor};
use slime_models::{CausalLm, KvCache, ModelConfig, ModelError, Result};

const FIXTURES: [&str; 6] = ["llama3", "gemma2", "gemma3", "qwen2", "qwen3", "mistral"];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

struct Expected {
    ids: Tensor,
    mask: Tensor,
    last_logits: Tensor,
    token_logps: Tensor,
}

fn load(name: &str) -> Result<(CausalLm, Expected)> {
    let lm = CausalLm::from_dir(&dir(name), &Device::Cpu)?;
    let file = dir(name).join("expected.safetensors");
    let mut t = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let mut take = |k: &str| {
        t.remove(k).ok_or_else(|| ModelError::Io { path: file.display().to_string(), reason: format!("no `{k}`") })
    };
    let expected = Expected {
        ids: take("input_ids")?.to_dtype(DType::U32)?,
        mask: take("attention_mask")?.to_dtype(DType::U8)?,
        last_logits: take("last_logits")?,
        token_logps: take("token_logps")?,
    };
    Ok((lm, expected))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn last_position_logits_match_transformers() -> Result<()> {
    for name in FIXTURES {
        let (lm, want) = load(name)?;
        let have = lm.model().last_logits(&want.ids, Some(&want.mask))?;
        let diff = max_abs_diff(&have, &want.last_logits)?;
        eprintln!("{name}: last-position logits max |diff| {diff:.2e}");
        assert!(diff < 1e-4, "{name}: last-position logits differ from transformers by {diff}");
        let spread = (want.last_logits.max(D::Minus1)? - want.last_logits.min(D::Minus1)?)?.min(0)?;
        assert!(spread.to_scalar::<f32>()? > 1.0, "{name}: fixture logits too flat to compare");
    }
    Ok(())
}

#[test]
fn chunked_token_logps_match_transformers() -> Result<()> {
    for name in FIXTURES {
        let (lm, want) = load(name)?;
        for chunk in [5, 64] {
            let have = lm.model().token_logps(&want.ids, Some(&want.mask), chunk)?;
            // Padding positions carry no meaning; the fixture holds 0 there.
            let have = (have * want.mask.to_dtype(DType::F32)?)?;
            let diff = max_abs_diff(&have, &want.token_logps)?;
            eprintln!("{name}: token log-probs (chunk {chunk}) max |diff| {diff:.2e}");
            assert!(diff < 1e-4, "{name}: token log-probs (chunk {chunk}) differ from transformers by {diff}");
        }
    }
    Ok(())
}

#[test]
fn cached_decoding_reaches_the_transformers_logits() -> Result<()> {
    for name in FIXTURES {
        let (lm, want) = load(name)?;
        let row = want.ids.get(0)?.unsqueeze(0)?;
        let seq = row.dim(1)?;
        let mut cache = KvCache::new(lm.model());
        let mut logits = lm.model().forward_cached(&row.narrow(1, 0, 10)?, &mut cache)?;
        for t in 10..seq {
            logits = lm.model().forward_cached(&row.narrow(1, t, 1)?, &mut cache)?;
        }
        let diff = max_abs_diff(&logits, &want.last_logits.get(0)?.unsqueeze(0)?)?;
        eprintln!("{name}: cached logits max |diff| {diff:.2e}");
        assert!(diff < 1e-4, "{name}: cached logits after {seq} tokens differ from transformers by {diff}");
    }
    Ok(())
}

#[test]
fn transformers_5_config_layout_is_read_and_round_trips() -> Result<()> {
    for name in FIXTURES {
        let (lm, _) = load(name)?;
        match (name, lm.config()) {
            ("llama3", ModelConfig::Llama(c)) => {
                let s = c.rope_scaling.as_ref().map(|s| (s.rope_type.as_str(), s.factor));
                assert_eq!(s, Some(("llama3", 8.0)));
                assert_eq!(c.rope_theta, 10_000.0);
            }
            ("gemma2", ModelConfig::Gemma(c)) => {
                assert!(c.is_gemma2() && c.sliding_window == Some(6));
                assert_eq!((0..3).map(|l| c.is_sliding(l)).collect::<Vec<_>>(), [true, false, true]);
            }
            ("gemma3", ModelConfig::Gemma(c)) => {
                assert_eq!((c.rope_theta, c.rope_local_base_freq), (1_000_000.0, Some(10_000.0)));
                assert_eq!(c.rope_scaling.as_ref().map(|s| (s.rope_type.as_str(), s.factor)), Some(("linear", 2.0)));
                assert_eq!((0..4).map(|l| c.is_sliding(l)).collect::<Vec<_>>(), [true, false, true, false]);
            }
            ("qwen2", ModelConfig::Llama(c)) => {
                assert!(c.is_qwen2() && c.qkv_bias() && !c.o_bias() && !c.qk_norm());
                assert_eq!((c.rope_theta, c.head_dim(), c.use_sliding_window), (1_000_000.0, 8, Some(false)));
            }
            ("qwen3", ModelConfig::Llama(c)) => {
                assert!(c.is_qwen3() && c.qk_norm() && !c.qkv_bias() && c.tie_word_embeddings);
                assert_eq!((c.rope_theta, c.head_dim), (1_000_000.0, Some(16)));
            }
            ("mistral", ModelConfig::Mistral(c)) => {
                assert_eq!((c.sliding_window, c.rope_theta, c.head_dim()), (Some(5), 10_000.0, 16));
                assert!(!c.tie_word_embeddings);
                assert_eq!(lm.config().family().layer_windows(), [Some(5), Some(5)]);
            }
            (n, c) => panic!("{n}: unexpected family {c:?}"),
        }
        // What we write (the classic layout) reads back as the same config.
        let text = serde_json::to_string(lm.config())
            .map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        assert_eq!(&ModelConfig::from_json(&text, "roundtrip")?, lm.config(), "{name}");
    }
    Ok(())
}

#[test]
fn unsupported_transformers_5_fields_are_rejected() -> Result<()> {
    let text = std::fs::read_to_string(dir("gemma3").join("config.json"))
        .map_err(|e| ModelError::Io { path: "gemma3/config.json".into(), reason: e.to_string() })?;
    let edit = |from: &str, to: &str| {
        assert!(text.contains(from), "fixture lacks {from}");
        ModelConfig::from_json(&text.replacen(from, to, 1), "config.json")
    };
    let field = |r: Result<ModelConfig>| match r {
        Err(ModelError::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert_eq!(
        field(edit("\"use_bidirectional_attention\": false", "\"use_bidirectional_attention\": true")),
        "use_bidirectional_attention"
    );
    assert_eq!(field(edit("\"full_attention\"\n  ],", "\"global\"\n  ],")), "layer_types");
    assert_eq!(
        field(edit(
            "\"rope_theta\": 10000.0,\n      \"rope_type\": \"default\"",
            "\"rope_theta\": 10000.0,\n      \"rope_type\": \"yarn\""
        )),
        "rope_parameters"
    );
    Ok(())
}

/// Before this crate read transformers 5's layout it ignored `rope_parameters` (falling back to
/// RoPE base 10,000 without llama3 / linear scaling and Gemma 3's local base) and `layer_types`;
/// the fixtures see that: the logits move far beyond the tolerance.
#[test]
fn ignoring_rope_parameters_would_break_parity() -> Result<()> {
    for name in ["llama3", "gemma3"] {
        let (lm, want) = load(name)?;
        let path = dir(name).join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Io { path: path.display().to_string(), reason: e.to_string() })?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Input { input: "json", reason: e.to_string() })?;
        if let Some(o) = value.as_object_mut() {
            o.remove("rope_parameters");
            o.remove("layer_types");
        }
        let cfg = ModelConfig::from_json(&value.to_string(), "config.json")?;
        let old = CausalLm::from_tensors(&cfg, lm.weights())?;
        let diff = max_abs_diff(&old.model().last_logits(&want.ids, Some(&want.mask))?, &want.last_logits)?;
        eprintln!("{name}: logits with rope_parameters / layer_types ignored: max |diff| {diff:.2e}");
        assert!(diff > 1e-2, "{name}: dropping rope_parameters changes logits by only {diff}");
    }
    Ok(())
}

/// The Mistral fixture's window (5) is shorter than both rows (24 and 17 tokens): the same
/// weights with full causal attention (`sliding_window: null`) give other logits, so the window
/// is what parity checks there; and the fused and composed paths agree on it.
#[test]
fn mistral_sliding_window_matters_and_both_paths_apply_it() -> Result<()> {
    let (lm, want) = load("mistral")?;
    let path = dir("mistral").join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ModelError::Io { path: path.display().to_string(), reason: e.to_string() })?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Input { input: "json", reason: e.to_string() })?;
    value["sliding_window"] = serde_json::Value::Null;
    let full = CausalLm::from_tensors(&ModelConfig::from_json(&value.to_string(), "config.json")?, lm.weights())?;
    let diff = max_abs_diff(&full.model().last_logits(&want.ids, Some(&want.mask))?, &want.last_logits)?;
    eprintln!("mistral: logits without the sliding window: max |diff| {diff:.2e}");
    assert!(diff > 1e-2, "dropping the window changes logits by only {diff}");
    let m = lm.model();
    let fused = m.forward_hidden(&want.ids, Some(&want.mask))?;
    let composed = m.forward_hidden_reference(&want.ids, Some(&want.mask))?;
    let real = want.mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let diff = max_abs_diff(&fused.broadcast_mul(&real)?, &composed.broadcast_mul(&real)?)?;
    assert!(diff < 1e-4, "fused and composed hidden states differ by {diff}");
    Ok(())
}
