//! Mistral through the family contract: its `config.json` (transformers' defaults, errors naming
//! the field), a save / load round trip in the Hugging Face layout, packed preference pairs equal
//! to separate rows (values and every weight's gradient) with the window cutting through prompts
//! and branches, and KV-cached, batched decoding equal to the full forward pass with prompts
//! longer than the window. Logits against transformers: `tests/hf_parity.rs`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use slime_models::{CausalLm, FamilyConfig, KvCache, MistralConfig, ModelConfig, ModelError, Result};

mod common;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Every weight redrawn (seeded): norms ~ N(1, 0.2^2), embeddings ~ N(0, 1), projections
/// ~ N(0, 0.15^2), so logits spread over several nats and the window changes them.
fn spread(lm: &CausalLm) -> Result<()> {
    for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
        let (mean, std) = match name.as_str() {
            n if n.contains("norm") => (1.0, 0.2),
            n if n.contains("embed_tokens") => (0.0, 1.0),
            _ => (0.0, 0.15),
        };
        var.set(&common::randn(300 + i as u64, mean, std, var.shape()))?;
    }
    Ok(())
}

fn field(r: Result<MistralConfig>) -> &'static str {
    match r {
        Err(ModelError::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn config_json_takes_transformers_defaults_and_errors_name_the_field() -> Result<()> {
    let base = serde_json::json!({
        "model_type": "mistral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 8
    });
    let cfg = MistralConfig::from_json(&base.to_string(), "c.json")?;
    let got =
        (cfg.num_key_value_heads, cfg.sliding_window, cfg.rms_norm_eps, cfg.head_dim(), cfg.max_position_embeddings);
    assert_eq!(got, (8, Some(4096), 1e-6, 4, 131_072));
    assert!(!cfg.tie_word_embeddings);
    assert!(matches!(ModelConfig::from_json(&base.to_string(), "c.json")?, ModelConfig::Mistral(c) if c == cfg));
    let edit = |key: &str, v: serde_json::Value| {
        let mut j = base.clone();
        j[key] = v;
        MistralConfig::from_json(&j.to_string(), "c.json")
    };
    // `null`: full causal attention on every layer.
    assert_eq!(edit("sliding_window", serde_json::Value::Null)?.layer_windows(), [None, None]);
    assert_eq!(edit("sliding_window", 7.into())?.layer_windows(), [Some(7), Some(7)]);
    assert_eq!(field(edit("sliding_window", 0.into())), "sliding_window");
    assert_eq!(field(edit("hidden_act", "gelu".into())), "hidden_act");
    assert_eq!(field(edit("num_key_value_heads", 3.into())), "num_key_value_heads");
    assert_eq!(field(edit("head_dim", 5.into())), "head_dim");
    assert_eq!(field(edit("rms_norm_eps", 0.0.into())), "rms_norm_eps");
    let yarn = serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0});
    assert_eq!(field(edit("rope_parameters", yarn)), "rope_parameters");
    assert_eq!(field(edit("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0}))), "rope_scaling");
    let rope = serde_json::json!({"rope_type": "default", "rope_theta": 500000.0});
    assert_eq!(edit("rope_parameters", rope)?.rope_theta, 500_000.0);
    let mut missing = base.clone();
    missing.as_object_mut().map(|o| o.remove("hidden_size"));
    assert_eq!(field(MistralConfig::from_json(&missing.to_string(), "c.json")), "(json)");
    Ok(())
}

#[test]
fn save_dir_writes_a_mistral_checkpoint_that_loads_back() -> Result<()> {
    let dev = Device::Cpu;
    for tied in [false, true] {
        let cfg = MistralConfig { tie_word_embeddings: tied, ..MistralConfig::tiny(61, 32, 48, 2, 4, 2) };
        let lm = CausalLm::random(&cfg, 3, &dev)?;
        spread(&lm)?;
        let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
        lm.save_dir(dir.path())?;
        let text = std::fs::read_to_string(dir.path().join("config.json"))
            .map_err(|e| ModelError::Io { path: "config.json".into(), reason: e.to_string() })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Input { input: "json", reason: e.to_string() })?;
        assert_eq!(json["architectures"], serde_json::json!(["MistralForCausalLM"]));
        assert_eq!((json["model_type"].as_str(), json["sliding_window"].as_u64()), (Some("mistral"), Some(4)));
        assert_eq!((json["head_dim"].as_u64(), json["tie_word_embeddings"].as_bool()), (Some(8), Some(tied)));
        let back = CausalLm::from_dir(dir.path(), &dev)?;
        // The same config, `head_dim` now explicit (transformers writes it too).
        assert_eq!(back.config().to_hf_json(), lm.config().to_hf_json());
        assert!(matches!(back.config(), ModelConfig::Mistral(c) if c.head_dim == Some(8)));
        assert_eq!(back.weights().contains_key("lm_head.weight"), !tied);
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 8, 11, 4]], &dev)?;
        let diff = max_abs_diff(&lm.model().last_logits(&ids, None)?, &back.model().last_logits(&ids, None)?)?;
        assert_eq!(diff, 0.0);
    }
    Ok(())
}

/// `(prefix, chosen, rejected)` lengths; the rows of a pair share exactly `prefix` tokens.
const PAIRS: [(usize, usize, usize); 4] = [(9, 20, 14), (3, 12, 19), (0, 10, 10), (6, 6, 11)];

/// `[2 n, seq]` ids (chosen rows, then rejected rows) and the right-padding mask.
fn pair_batch(vocab: u32, dev: &Device) -> Result<(Tensor, Tensor)> {
    let seq = PAIRS.iter().map(|&(_, c, r)| c.max(r)).max().unwrap_or(1);
    let n = PAIRS.len();
    let (mut ids, mut mask) = (vec![0u32; 2 * n * seq], vec![0u8; 2 * n * seq]);
    for (i, &(prefix, chosen, rejected)) in PAIRS.iter().enumerate() {
        for t in 0..seq {
            let shared = (i as u32 * 29 + t as u32 * 11 + 5) % vocab;
            let c = if t < prefix { shared } else { (shared + 1 + t as u32 % 4) % vocab };
            let r = if t < prefix { shared } else { (c + 1 + t as u32 % 3) % vocab };
            if t < chosen {
                (ids[i * seq + t], mask[i * seq + t]) = (c, 1);
            }
            if t < rejected {
                (ids[(n + i) * seq + t], mask[(n + i) * seq + t]) = (r, 1);
            }
        }
    }
    Ok((Tensor::from_vec(ids, (2 * n, seq), dev)?, Tensor::from_vec(mask, (2 * n, seq), dev)?))
}

/// Every weight's gradient of `sum(logps * weights)`.
fn grads(lm: &CausalLm, logps: &Tensor, weights: &Tensor) -> Result<HashMap<String, Tensor>> {
    let store = (logps * weights)?.sum_all()?.backward()?;
    lm.trainable_vars()
        .into_iter()
        .map(|(name, v)| {
            let g = store.get(v.as_tensor()).cloned();
            g.map(|g| (name.clone(), g))
                .ok_or_else(|| ModelError::Input { input: "grads", reason: format!("no gradient for `{name}`") })
        })
        .collect()
}

#[test]
fn packed_pairs_equal_separate_rows_with_the_window_inside_prompts_and_branches() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = MistralConfig { sliding_window: Some(5), ..MistralConfig::tiny(61, 32, 48, 2, 4, 2) };
    let lm = CausalLm::random(&cfg, 7, &dev)?;
    spread(&lm)?;
    let (ids, mask) = pair_batch(61, &dev)?;
    let real = mask.to_dtype(DType::F32)?;
    let separate = (lm.model().token_logps(&ids, Some(&mask), 8)? * &real)?;
    let packed = lm.model().pair_token_logps(&ids, Some(&mask), 8)?;
    let diff = max_abs_diff(&packed, &separate)?;
    assert!(diff < 1e-5, "packed log-probs differ from separate rows by {diff}");
    let weights = common::randn(5, 1.0, 0.5, real.dims());
    let weights = (weights * &real)?;
    let (a, b) = (grads(&lm, &separate, &weights)?, grads(&lm, &packed, &weights)?);
    for (name, g) in &a {
        let diff = max_abs_diff(g, &b[name])?;
        assert!(diff < 1e-5, "{name}: gradients differ by {diff}");
    }
    Ok(())
}

#[test]
fn cached_and_batched_decoding_equal_the_full_forward_past_the_window() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = MistralConfig { sliding_window: Some(3), ..MistralConfig::tiny(61, 32, 48, 2, 4, 2) };
    let lm = CausalLm::random(&cfg, 11, &dev)?;
    spread(&lm)?;
    let m = lm.model();
    let prompts: [Vec<u32>; 3] =
        [vec![4], (0..7).map(|t| (t * 13 + 2) % 61).collect(), (0..12).map(|t| (t * 7 + 1) % 61).collect()];
    for prompt in &prompts {
        let mut cache = KvCache::new(m);
        let mut seq = prompt.clone();
        let mut logits = m.forward_cached(&Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?, &mut cache)?;
        for _ in 0..6 {
            let full = m.last_logits(&Tensor::new(seq.as_slice(), &dev)?.unsqueeze(0)?, None)?;
            let diff = max_abs_diff(&logits, &full)?;
            assert!(diff < 1e-4, "{} tokens: cached logits differ by {diff}", seq.len());
            let next = full.argmax(1)?.to_vec1::<u32>()?[0];
            seq.push(next);
            logits = m.forward_cached(&Tensor::new(&[[next]], &dev)?, &mut cache)?;
        }
    }
    let one_by_one: Vec<Vec<u32>> = prompts.iter().map(|p| m.generate_greedy(p, 8, &[])).collect::<Result<_>>()?;
    assert_eq!(m.generate_greedy_batch(&prompts, 8, &[])?, one_by_one);
    Ok(())
}
