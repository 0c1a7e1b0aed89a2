//! Qwen2 / Qwen2.5 and Qwen3 (dense), run by the Llama model with attention biases (Qwen2:
//! q/k/v; Qwen3 with `attention_bias`: q/k/v/o) and per-head q/k RMSNorm (Qwen3): last-position
//! logits equal candle-transformers' qwen2 / qwen3 models with identical weights; the released
//! configs parse to the published parameter counts; the f32 CPU path (fused attention block with
//! the biases and q/k norm, fused MLP block) equals the reference composition in values and
//! gradients, and checkpoints bit-identically; chunked log-probs,
//! padding invariance, gradients (biases and q/k norms included), LoRA, save/load, the KV cache,
//! packed pairs, GGUF-free loading of the transformers fixtures and config errors.
//! transformers parity itself is in `tests/hf_parity.rs` (fixtures `qwen2`, `qwen3`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::{qwen2, qwen3};
use slime_models::{CausalLm, KvCache, LlamaConfig, LoraConfig, Model, ModelConfig, ModelError, Result};

mod common;
use common::randn;

const VOCAB: usize = 97;

/// Qwen2 GQA untied (head_dim = hidden / heads, as Qwen2 configs have no head_dim), Qwen2 MHA tied,
/// Qwen3 GQA untied with head_dim 16 != hidden / heads = 8, Qwen3 MQA tied with `attention_bias`.
fn configs() -> Vec<(&'static str, LlamaConfig)> {
    let qwen2 = LlamaConfig::tiny_qwen2(VOCAB, 32, 80, 2, 4, 2);
    let qwen2_tied = LlamaConfig { tie_word_embeddings: true, num_key_value_heads: Some(4), ..qwen2.clone() };
    let qwen3 = LlamaConfig::tiny_qwen3(VOCAB, 32, 80, 2, 4, 2, 16);
    let qwen3_bias =
        LlamaConfig { attention_bias: true, tie_word_embeddings: true, num_key_value_heads: Some(1), ..qwen3.clone() };
    vec![
        ("qwen2-gqa-untied", qwen2),
        ("qwen2-mha-tied", qwen2_tied),
        ("qwen3-gqa", qwen3),
        ("qwen3-bias-mqa-tied", qwen3_bias),
    ]
}

/// A random model whose every weight matters: norm weights (q/k norms included) away from 1,
/// non-zero biases (both different per weight, so swapping two is seen), projections and
/// embeddings 4x larger than the N(0, 0.02^2) init so logits spread out.
fn model(cfg: &LlamaConfig, seed: u64) -> Result<CausalLm> {
    let lm = CausalLm::random(cfg, seed, &Device::Cpu)?;
    for (name, var) in lm.trainable_vars() {
        let n = var.elem_count();
        let salt: usize = name.bytes().map(usize::from).sum();
        if name.contains("norm") {
            let w: Vec<f32> = (0..n).map(|i| 0.75 + 0.5 * ((i * 7 + salt) % 13) as f32 / 13.0).collect();
            var.set(&Tensor::from_vec(w, n, &Device::Cpu)?)?;
        } else if name.ends_with(".bias") {
            let b: Vec<f32> = (0..n).map(|i| 0.3 * (((i * 5 + salt) % 11) as f32 / 11.0 - 0.5)).collect();
            var.set(&Tensor::from_vec(b, n, &Device::Cpu)?)?;
        } else {
            var.set(&(var.as_tensor() * 4.0)?)?;
        }
    }
    Ok(lm)
}

fn ids(batch: usize, seq: usize, seed: usize) -> Result<Tensor> {
    let v: Vec<u32> = (0..batch * seq).map(|i| ((i * 31 + seed * 17 + 3) % VOCAB) as u32).collect();
    Ok(Tensor::from_vec(v, (batch, seq), &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn llama(lm: &CausalLm) -> &slime_models::Llama {
    let Model::Llama(m) = lm.model() else { unreachable!("a Qwen config builds the Llama model") };
    m
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn read(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| ModelError::Io { path: path.display().to_string(), reason: e.to_string() })
}

/// candle-transformers' logits at the last position of every row of `input` (no padding).
fn candle_logits(cfg: &LlamaConfig, weights: HashMap<String, Tensor>, input: &Tensor) -> Result<Tensor> {
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let logits = if cfg.is_qwen2() {
        let c = qwen2::Config {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.kv_heads(),
            max_position_embeddings: cfg.max_position_embeddings,
            sliding_window: cfg.max_position_embeddings,
            max_window_layers: cfg.num_hidden_layers,
            tie_word_embeddings: cfg.tie_word_embeddings,
            rope_theta: cfg.rope_theta,
            rms_norm_eps: cfg.rms_norm_eps,
            use_sliding_window: false,
            hidden_act: Activation::Silu,
        };
        qwen2::ModelForCausalLM::new(&c, vb)?.forward(input, 0)?
    } else {
        let c = qwen3::Config {
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            attention_bias: cfg.attention_bias,
            num_key_value_heads: cfg.kv_heads(),
            max_position_embeddings: cfg.max_position_embeddings,
            sliding_window: None,
            max_window_layers: cfg.num_hidden_layers,
            tie_word_embeddings: cfg.tie_word_embeddings,
            rope_theta: cfg.rope_theta,
            rms_norm_eps: cfg.rms_norm_eps,
            use_sliding_window: false,
            hidden_act: Activation::Silu,
        };
        qwen3::ModelForCausalLM::new(&c, vb)?.forward(input, 0)?
    };
    Ok(logits.squeeze(1)?)
}

#[test]
fn last_logits_match_candle_transformers() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 1)?;
        for seq in [1, 5, 13] {
            let input = ids(2, seq, seq)?;
            let want = candle_logits(&cfg, lm.weights(), &input)?;
            let got = lm.model().last_logits(&input, None)?;
            let diff = max_abs_diff(&got, &want)?;
            assert!(diff < 1e-4, "{name}, seq {seq}: max |diff| = {diff}");
            let spread = (want.max(D::Minus1)? - want.min(D::Minus1)?)?.min(0)?.to_scalar::<f32>()?;
            assert!(spread > 0.5, "{name}: logits too flat ({spread}) for the comparison to mean anything");
        }
    }
    Ok(())
}

/// The transformers fixtures lose parity when read as plain Llama (no biases, no q/k norm): the
/// parity tests of `hf_parity.rs` see what makes Qwen Qwen.
#[test]
fn reading_qwen_fixtures_as_llama_breaks_parity() -> Result<()> {
    for name in ["qwen2", "qwen3"] {
        let dir = fixture(name);
        let lm = CausalLm::from_dir(&dir, &Device::Cpu)?;
        let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
        let (ids, mask) =
            (expected["input_ids"].to_dtype(DType::U32)?, expected["attention_mask"].to_dtype(DType::U8)?);
        let want = &expected["last_logits"];
        assert!(max_abs_diff(&lm.model().last_logits(&ids, Some(&mask))?, want)? < 1e-4, "{name}");
        let text = read(&dir.join("config.json"))?
            .replace(&format!("\"model_type\": \"{name}\""), "\"model_type\": \"llama\"");
        let as_llama = ModelConfig::from_json(&text, "config.json")?;
        let ModelConfig::Llama(c) = &as_llama else { unreachable!("llama") };
        assert!(c.plain_attention(), "{name}: edited config is still Qwen");
        let wrong = CausalLm::from_tensors(&as_llama, lm.weights())?;
        let diff = max_abs_diff(&wrong.model().last_logits(&ids, Some(&mask))?, want)?;
        eprintln!("{name} read as Llama: max |diff| {diff:.2e}");
        assert!(diff > 1e-2, "{name}: dropping the Qwen parts changes logits by only {diff}");
    }
    Ok(())
}

#[test]
fn weight_names_and_shapes_are_the_transformers_state_dict() -> Result<()> {
    for name in ["qwen2", "qwen3"] {
        let dir = fixture(name);
        let cfg = ModelConfig::from_json(&read(&dir.join("config.json"))?, "config.json")?;
        let saved = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        let mut have: Vec<(String, Vec<usize>)> = cfg.weight_shapes();
        let mut want: Vec<(String, Vec<usize>)> = saved.iter().map(|(n, t)| (n.clone(), t.dims().to_vec())).collect();
        have.sort();
        want.sort();
        assert_eq!(have, want, "{name}");
    }
    Ok(())
}

/// The released configs (classic layout, as on the Hugging Face hub) parse to the published
/// shapes and parameter counts: Qwen3-4B 4,022,468,096 (head_dim 128 != 2560 / 32, q/k norms, no
/// biases, tied), Qwen2.5-0.5B 494,032,768 (q/k/v biases, tied).
#[test]
fn released_configs_have_the_published_shapes_and_sizes() -> Result<()> {
    let qwen3_4b = r#"{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
        "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 40960,
        "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000,
        "sliding_window": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}"#;
    let qwen25_05b = r#"{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}"#;
    for (text, params, shapes) in [
        (
            qwen3_4b,
            4_022_468_096usize,
            vec![
                ("model.layers.0.self_attn.q_proj.weight", vec![4096, 2560]),
                ("model.layers.0.self_attn.k_proj.weight", vec![1024, 2560]),
                ("model.layers.0.self_attn.o_proj.weight", vec![2560, 4096]),
                ("model.layers.35.self_attn.q_norm.weight", vec![128]),
                ("model.layers.35.self_attn.k_norm.weight", vec![128]),
            ],
        ),
        (
            qwen25_05b,
            494_032_768,
            vec![
                ("model.layers.0.self_attn.q_proj.bias", vec![896]),
                ("model.layers.0.self_attn.k_proj.bias", vec![128]),
                ("model.layers.23.self_attn.v_proj.bias", vec![128]),
            ],
        ),
    ] {
        let cfg = ModelConfig::from_json(text, "config.json")?;
        let all: HashMap<String, Vec<usize>> = cfg.weight_shapes().into_iter().collect();
        for (name, shape) in shapes {
            assert_eq!(all.get(name), Some(&shape), "{name}");
        }
        assert_eq!(all.values().map(|s| s.iter().product::<usize>()).sum::<usize>(), params);
        assert!(!all.contains_key("lm_head.weight"), "tied");
        let qwen3 = matches!(&cfg, ModelConfig::Llama(c) if c.is_qwen3());
        assert_eq!(all.keys().any(|n| n.ends_with(".bias")), !qwen3);
        assert_eq!(all.keys().any(|n| n.contains("q_norm")), qwen3);
        // Serialised back as the family's own config.json.
        let json = serde_json::to_value(&cfg).map_err(|e| ModelError::Input { input: "cfg", reason: e.to_string() })?;
        assert_eq!(json["model_type"], if qwen3 { "qwen3" } else { "qwen2" });
        assert_eq!(ModelConfig::from_json(&json.to_string(), "again")?, cfg);
    }
    Ok(())
}

#[test]
fn chunked_logps_equal_full_log_softmax_gather() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 2)?;
        let input = ids(3, 11, 0)?;
        let hidden = lm.model().forward_hidden(&input, None)?;
        let logits = hidden.broadcast_matmul(&llama(&lm).lm_head().t()?)?;
        let full = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        for chunk in [1, 3, 4, 64] {
            let got = lm.model().token_logps(&input, None, chunk)?;
            assert_eq!(got.dims(), [3, 11]);
            for b in 0..3 {
                assert_eq!(got.i((b, 0))?.to_scalar::<f32>()?, 0.0);
                for t in 1..11 {
                    let label = input.i((b, t))?.to_scalar::<u32>()? as usize;
                    let want = full.i((b, t - 1, label))?.to_scalar::<f32>()?;
                    let have = got.i((b, t))?.to_scalar::<f32>()?;
                    assert!((want - have).abs() < 1e-5, "{name} chunk {chunk} b {b} t {t}: {have} vs {want}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn appending_padding_never_changes_real_token_logps() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 3)?;
        let input = ids(2, 7, 5)?;
        let base = lm.model().token_logps(&input, None, 4)?;
        let padded = Tensor::cat(&[&input, &Tensor::zeros((2, 5), DType::U32, &Device::Cpu)?], 1)?;
        let mask = Tensor::cat(
            &[Tensor::ones((2, 7), DType::U8, &Device::Cpu)?, Tensor::zeros((2, 5), DType::U8, &Device::Cpu)?],
            1,
        )?;
        let got = lm.model().token_logps(&padded, Some(&mask), 4)?.narrow(1, 0, 7)?;
        let diff = max_abs_diff(&got, &base)?;
        assert!(diff < 1e-5, "{name}: padding changed real log-probs by {diff}");
        // A shorter row in a mixed batch equals its unpadded run.
        let alone = lm.model().token_logps(&input.i((1..2, 0..4))?, None, 4)?;
        let mixed_mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], &Device::Cpu)?;
        let mixed = lm.model().token_logps(&input, Some(&mixed_mask), 4)?.i((1..2, 0..4))?;
        assert!(max_abs_diff(&mixed, &alone)? < 1e-5, "{name}");
    }
    Ok(())
}

#[test]
fn gradients_reach_every_weight_biases_and_qk_norms_included() -> Result<()> {
    for (name, cfg) in configs() {
        let lm = model(&cfg, 4)?;
        let vars = lm.trainable_vars();
        let has = |suffix: &str| vars.iter().any(|(n, _)| n.ends_with(suffix));
        assert_eq!(has("self_attn.q_proj.bias"), cfg.qkv_bias(), "{name}");
        assert_eq!(has("self_attn.v_proj.bias"), cfg.qkv_bias(), "{name}");
        assert_eq!(has("self_attn.o_proj.bias"), cfg.o_bias(), "{name}");
        assert_eq!(has("self_attn.q_norm.weight") && has("self_attn.k_norm.weight"), cfg.qk_norm(), "{name}");
        let grads = lm.model().token_logps(&ids(2, 6, 1)?, None, 4)?.sum_all()?.backward()?;
        for (weight, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {weight}"));
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {weight} is {norm}");
        }
    }
    Ok(())
}

/// Per-token log-probs and every trainable variable's gradient, flattened.
type LogpsAndGrads = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Bytes the fused blocks of `cfg` keep per position (f32): per layer q|k|v, the attention output
/// and the MLP's gate|up.
fn kept_per_position(cfg: &LlamaConfig) -> usize {
    let (hd, heads, kv) = (cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
    cfg.num_hidden_layers * ((heads + 2 * kv) * hd + heads * hd + 2 * cfg.intermediate_size) * 4
}

/// Bytes of attention probabilities the fused attention blocks keep for `batch` rows of `seq`
/// positions: none with a q/k head norm (Qwen3), which recomputes them.
fn kept_probs(cfg: &LlamaConfig, batch: usize, seq: usize) -> usize {
    let floats = slime_models::fused::kept_probability_floats(batch, seq, cfg.num_attention_heads);
    if cfg.qk_norm() { 0 } else { cfg.num_hidden_layers * floats * 4 }
}

/// On f32 CPU a Qwen model runs the fused attention block (biases and q/k norm inside) and the
/// fused MLP block; it equals the plain composition in hidden states, log-probs and every
/// weight's gradient, the activation meter counts exactly what both blocks keep, and gradient
/// checkpointing changes no bit (packed pairs included).
#[test]
fn fused_path_matches_the_reference_composition() -> Result<()> {
    let dev = Device::Cpu;
    let (batch, seq) = (3, 11);
    let mut m = vec![1u8; batch * seq];
    m[seq + 8..2 * seq].fill(0);
    m[3 * seq - 1] = 0;
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    for (name, cfg) in configs() {
        let lm = model(&cfg, 7)?;
        let qwen = llama(&lm);
        let input = ids(batch, seq, 4)?;
        let coef = randn(1, 0.0, 1.0, (batch, seq));
        let logps = |h: &Tensor| slime_models::logps::chunked_token_logps(h, qwen.lm_head(), &input, 5);
        let meter = lm.model().activation_meter().expect("a meter");
        meter.reset_peak();
        let (h1, h0) = (qwen.forward_hidden(&input, Some(&mask))?, qwen.forward_hidden_reference(&input, Some(&mask))?);
        let kept = batch * seq * kept_per_position(&cfg) + kept_probs(&cfg, batch, seq);
        assert_eq!(meter.held_bytes(), kept, "{name}: the fused blocks keep q|k|v, attention and gate|up");
        assert!(max_abs_diff(&h1, &h0)? < 1e-5, "{name}: hidden states differ by {}", max_abs_diff(&h1, &h0)?);
        let (l1, l0) = (logps(&h1)?, logps(&h0)?);
        let (g1, g0) = ((&l1 * &coef)?.sum_all()?.backward()?, (&l0 * &coef)?.sum_all()?.backward()?);
        for (weight, var) in lm.trainable_vars() {
            let a = g1.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: fused-path gradient for {weight}"));
            let b = g0.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: reference gradient for {weight}"));
            let d = max_abs_diff(a, b)?;
            assert!(d < 1e-5, "{name}: {weight} gradients differ by {d}");
        }
        assert_eq!(meter.held_bytes(), 0, "{name}: the backward pass frees what the blocks kept");
        drop((h1, l1, g1));
        // Checkpointing: the blocks keep nothing and recompute; identical values and gradients,
        // for separate rows and for packed pairs (rows 0 and 1 share a 4-token prompt, as pairs).
        let mut paired = input.to_vec2::<u32>()?;
        paired.truncate(2);
        let shared = paired[0][..4].to_vec();
        paired[1][..4].copy_from_slice(&shared);
        let paired = Tensor::new(paired, &dev)?;
        let paired_mask = mask.narrow(0, 1, 2)?;
        let run = |on: bool, pairs: bool| -> Result<LogpsAndGrads> {
            lm.model().set_gradient_checkpointing(on)?;
            let l = if pairs {
                lm.model().pair_token_logps(&paired, Some(&paired_mask), 4)?
            } else {
                lm.model().token_logps(&input, Some(&mask), 4)?
            };
            if on {
                assert_eq!(meter.held_bytes(), 0, "{name}: checkpointed blocks keep nothing");
            }
            let g = (&l * &coef.narrow(0, 0, l.dim(0)?)?)?.sum_all()?.backward()?;
            let grads = lm
                .trainable_vars()
                .iter()
                .map(|(_, v)| Ok(g.get(v.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?))
                .collect::<Result<_>>()?;
            Ok((l.to_vec2::<f32>()?, grads))
        };
        for pairs in [false, true] {
            assert_eq!(run(false, pairs)?, run(true, pairs)?, "{name} (pairs {pairs}): checkpointing changed a bit");
        }
        lm.model().set_gradient_checkpointing(false)?;
    }
    Ok(())
}

fn lora_targets() -> LoraConfig {
    LoraConfig::new(4, 8.0, &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
}

/// Sets every B to a deterministic non-zero value so adapters change the output.
fn perturb_b(lm: &CausalLm) -> Result<()> {
    for (name, var) in lm.trainable_vars() {
        if name.contains("lora_B") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|i| 0.02 * ((i % 7) as f32 - 3.0)).collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}

#[test]
fn lora_zero_b_is_the_base_model_and_only_adapters_train() -> Result<()> {
    let input = ids(2, 7, 2)?;
    for (name, cfg) in configs() {
        let base = model(&cfg, 5)?;
        let want = base.model().token_logps(&input, None, 4)?.to_vec2::<f32>()?;
        let frozen = base.weights();
        let lm = base.with_lora(lora_targets(), 6)?;
        assert_eq!(lm.model().token_logps(&input, None, 4)?.to_vec2::<f32>()?, want, "{name}: fresh adapters");
        perturb_b(&lm)?;
        let on = lm.model().token_logps(&input, None, 4)?;
        assert_ne!(on.to_vec2::<f32>()?, want, "{name}: a non-zero B must change the model");
        // Only the adapters train: 7 targets x layers x (A, B); biases and q/k norms are frozen.
        let vars = lm.trainable_vars();
        assert_eq!(vars.len(), 7 * cfg.num_hidden_layers * 2, "{name}");
        assert!(vars.iter().all(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B.")), "{name}");
        let grads = on.sum_all()?.backward()?;
        for (weight, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {weight}"));
            assert!(g.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}: {weight}");
        }
        for (weight, t) in &frozen {
            assert!(grads.get(t).is_none(), "{name}: frozen {weight} got a gradient");
        }
        lm.set_adapters_enabled(false);
        assert_eq!(lm.model().token_logps(&input, None, 4)?.to_vec2::<f32>()?, want, "{name}: adapters off");
        lm.set_adapters_enabled(true);
        // Merging keeps the function and the biases / q/k norms.
        let merged = lm.merge_lora()?;
        let again = merged.model().token_logps(&input, None, 4)?;
        let diff = max_abs_diff(&again, &on.detach())?;
        assert!(diff < 1e-5, "{name}: merged adapters differ by {diff}");
        assert_eq!(merged.weights().len(), frozen.len(), "{name}");
    }
    Ok(())
}

#[test]
fn save_and_load_round_trip_bit_exact_with_model_type() -> Result<()> {
    for (name, cfg) in configs() {
        let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
        let lm = model(&cfg, 6)?;
        lm.save_dir(dir.path())?;
        let text = read(&dir.path().join("config.json"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Input { input: "json", reason: e.to_string() })?;
        assert_eq!(json["model_type"], cfg.model_type.as_deref().unwrap_or_default(), "{name}");
        assert!(!text.contains("\"head_dim\": null"), "{name}: transformers would read head_dim as None: {text}");
        let back = CausalLm::from_dir(dir.path(), &Device::Cpu)?;
        // The written config.json spells out defaults (head_dim, layer_types): compared as written.
        assert_eq!(back.config().to_hf_json(), lm.config().to_hf_json(), "{name}");
        assert_eq!(back.config().weight_shapes(), lm.config().weight_shapes(), "{name}");
        let saved = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)?;
        assert_eq!(saved.contains_key("lm_head.weight"), !cfg.tie_word_embeddings, "{name}");
        assert_eq!(saved.contains_key("model.layers.1.self_attn.k_proj.bias"), cfg.qkv_bias(), "{name}");
        assert_eq!(saved.contains_key("model.layers.1.self_attn.k_norm.weight"), cfg.qk_norm(), "{name}");
        let (a, b) = (lm.weights(), back.weights());
        assert_eq!(a.len(), b.len(), "{name}");
        for (weight, t) in &a {
            assert_eq!(
                t.flatten_all()?.to_vec1::<f32>()?,
                b[weight].flatten_all()?.to_vec1::<f32>()?,
                "{name} {weight}"
            );
        }
        let input = ids(2, 5, 3)?;
        let (x, y) = (lm.model().token_logps(&input, None, 4)?, back.model().token_logps(&input, None, 4)?);
        assert_eq!(x.to_vec2::<f32>()?, y.to_vec2::<f32>()?, "{name}");
    }
    Ok(())
}

fn row(ids: &[u32]) -> Result<Tensor> {
    Ok(Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)
}

/// Prompt once, then one token per step: the cached logits equal the full-prefix forward at
/// every step, and greedy decoding equals the argmax chain without a cache; with LoRA too.
#[test]
fn cached_decoding_equals_the_full_forward() -> Result<()> {
    let seq: Vec<u32> = (0..12).map(|i| ((i * 37 + 5) % VOCAB) as u32).collect();
    for (name, cfg) in configs() {
        for lora in [false, true] {
            let mut lm = model(&cfg, 8)?;
            if lora {
                lm = lm.with_lora(lora_targets(), 9)?;
                perturb_b(&lm)?;
            }
            let m = lm.model();
            let mut cache = KvCache::new(m);
            let mut at = 5;
            let mut cached = m.forward_cached(&row(&seq[..at])?, &mut cache)?;
            loop {
                let full = m.last_logits(&row(&seq[..at])?, None)?;
                let diff = max_abs_diff(&cached, &full)?;
                assert!(diff < 1e-4, "{name} (lora {lora}): after {at} positions cached logits differ by {diff}");
                if at == seq.len() {
                    break;
                }
                cached = m.forward_cached(&row(&seq[at..at + 1])?, &mut cache)?;
                at += 1;
            }
            let prompt = &seq[..3];
            let mut chain = prompt.to_vec();
            for _ in 0..6 {
                let logits = m.last_logits(&row(&chain)?, None)?;
                chain.push(logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0]);
            }
            assert_eq!(m.generate_greedy(prompt, 6, &[])?, chain[3..].to_vec(), "{name} (lora {lora})");
        }
    }
    Ok(())
}

/// Qwen packs pairs around their shared prompt like Llama (the fused attention block branches):
/// `pair_token_logps` equals `token_logps` on every real token, log-probs and every weight's
/// gradient within 1e-5, and the activation meter shows that the model ran the packed rows (each
/// pair's prompt once), not the separate ones.
#[test]
fn pair_logps_equal_row_logps_and_pack_the_pairs() -> Result<()> {
    let (n, seq, prompt) = (2, 9, 4);
    let mut v = Vec::new();
    for r in 0..2 * n {
        // Pairs i and n + i share a 4-token prompt and then differ.
        v.extend(
            (0..seq).map(|t| if t < prompt { (r % n * 7 + t + 1) as u32 } else { ((r * 13 + t * 5) % VOCAB) as u32 }),
        );
    }
    let input = Tensor::from_vec(v, (2 * n, seq), &Device::Cpu)?;
    let mut m = vec![1u8; 2 * n * seq];
    m[seq + 7..2 * seq].fill(0);
    let mask = Tensor::from_vec(m, (2 * n, seq), &Device::Cpu)?;
    let maskf = mask.to_dtype(DType::F32)?;
    // Chosen rows of 9 and 7 real tokens, rejected rows of 9: packed rows of 9 + 9 - 4 = 14 and
    // 7 + 9 - 4 = 12 tokens, padded to 14.
    let (packed_positions, separate_positions) = (n * 14, 2 * n * seq);
    let coef = (randn(2, 0.0, 1.0, (2 * n, seq)) * &maskf)?;
    for (name, cfg) in configs() {
        let lm = model(&cfg, 10)?;
        let meter = lm.model().activation_meter().expect("a meter");
        let pairs = lm.model().pair_token_logps(&input, Some(&mask), 4)?;
        // The last layer's MLP block (gate|up kept) runs on the 22 packed positions some log-prob
        // is predicted from: not on each branch's last position nor on pair 1's 2 padding slots.
        let packed =
            packed_positions * kept_per_position(&cfg) - 6 * 2 * cfg.intermediate_size * 4 + kept_probs(&cfg, n, 14);
        assert_eq!(meter.held_bytes(), packed, "{name}: pairs were not packed");
        let rows = lm.model().token_logps(&input, Some(&mask), 4)?;
        let both = packed + separate_positions * kept_per_position(&cfg) + kept_probs(&cfg, 2 * n, seq);
        assert_eq!(meter.held_bytes(), both, "{name}: separate rows");
        let diff = max_abs_diff(&(&pairs * &maskf)?, &(&rows * &maskf)?)?;
        assert!(diff < 1e-5, "{name}: log-probs differ by {diff}");
        let (g_pairs, g_rows) = ((&pairs * &coef)?.sum_all()?.backward()?, (&rows * &coef)?.sum_all()?.backward()?);
        for (weight, var) in lm.trainable_vars() {
            let a = g_pairs.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: packed gradient for {weight}"));
            let b = g_rows.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: gradient for {weight}"));
            let d = max_abs_diff(a, b)?;
            assert!(d < 1e-5, "{name}: gradients of {weight} differ by {d}");
        }
        assert_eq!(meter.held_bytes(), 0, "{name}");
    }
    Ok(())
}

#[test]
fn bf16_loading_runs_the_reference_path_close_to_f32() -> Result<()> {
    for name in ["qwen2", "qwen3"] {
        let dir = fixture(name);
        let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
        let (ids, mask) =
            (expected["input_ids"].to_dtype(DType::U32)?, expected["attention_mask"].to_dtype(DType::U8)?);
        let want = &expected["last_logits"];
        let lm = CausalLm::from_dir_as(&dir, &Device::Cpu, Some(DType::BF16))?;
        assert!(lm.weights().values().all(|t| t.dtype() == DType::BF16));
        let got = lm.model().last_logits(&ids, Some(&mask))?;
        let spread = (want.max(D::Minus1)? - want.min(D::Minus1)?)?.min(0)?.to_scalar::<f32>()?;
        let diff = max_abs_diff(&got, want)?;
        assert!(diff < 0.05 * spread, "{name}: bf16 logits off by {diff} (spread {spread})");
    }
    Ok(())
}

#[test]
fn unsupported_config_values_name_the_file_and_field() -> Result<()> {
    let qwen3 = read(&fixture("qwen3").join("config.json"))?;
    let qwen2 = read(&fixture("qwen2").join("config.json"))?;
    let llama = read(&fixture("llama3").join("config.json"))?;
    let edit = |text: &str, from: &str, to: &str| {
        assert!(text.contains(from), "fixture lacks {from}");
        ModelConfig::from_json(&text.replacen(from, to, 1), "some/dir/config.json")
    };
    let field = |r: Result<ModelConfig>| match r {
        Err(e @ ModelError::Config { .. }) => {
            let text = e.to_string();
            assert!(text.contains("some/dir/config.json"), "{text}");
            let ModelError::Config { field, .. } = e else { unreachable!() };
            field
        }
        other => panic!("expected a config error, got {other:?}"),
    };
    let sliding = "\"use_sliding_window\": false";
    assert_eq!(field(edit(&qwen3, sliding, "\"use_sliding_window\": true")), "use_sliding_window");
    assert_eq!(field(edit(&qwen2, sliding, "\"use_sliding_window\": true")), "use_sliding_window");
    let full = "\"full_attention\",\n    \"full_attention\"";
    assert_eq!(field(edit(&qwen3, full, "\"full_attention\",\n    \"sliding_attention\"")), "layer_types");
    assert_eq!(field(edit(&qwen3, full, "\"full_attention\"")), "layer_types");
    let rope = "\"rope_type\": \"default\"";
    assert_eq!(field(edit(&qwen2, rope, "\"rope_type\": \"yarn\", \"factor\": 4.0")), "rope_parameters");
    // The classic layout names `rope_scaling`.
    let params = "\"rope_parameters\": {\n    \"rope_theta\": 1000000.0,\n    \"rope_type\": \"default\"\n  }";
    let yarn = r#""rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_theta": 1000000.0"#;
    assert_eq!(field(edit(&qwen2, params, yarn)), "rope_scaling");
    assert_eq!(field(edit(&qwen3, "\"head_dim\": 16", "\"head_dim\": null")), "head_dim");
    assert_eq!(field(edit(&qwen3, "\"model_type\": \"qwen3\"", "\"model_type\": \"qwen3_moe\"")), "model_type");
    let err = edit(&qwen3, "\"model_type\": \"qwen3\"", "\"model_type\": \"qwen2_vl\"").expect_err("unsupported");
    assert!(err.to_string().contains("`qwen2`") && err.to_string().contains("`qwen3`"), "{err}");
    // Biases: q/k/v/o with attention_bias on Qwen3, never on Llama; MLP biases nowhere.
    assert_eq!(field(edit(&llama, "\"attention_bias\": false", "\"attention_bias\": true")), "attention_bias");
    assert_eq!(
        field(edit(&qwen3, "\"attention_bias\": false", "\"attention_bias\": false, \"mlp_bias\": true")),
        "mlp_bias"
    );
    let ModelConfig::Llama(c) = edit(&qwen3, "\"attention_bias\": false", "\"attention_bias\": true")? else {
        unreachable!("qwen3")
    };
    assert!(c.qkv_bias() && c.o_bias());
    // transformers' defaults for fields a Qwen config leaves out.
    let ModelConfig::Llama(c) = edit(&qwen3, "\"head_dim\": 16,", "")? else { unreachable!("qwen3") };
    assert_eq!(c.head_dim(), 128);
    let ModelConfig::Llama(c) = edit(&qwen2, "\"rms_norm_eps\": 1e-06,", "")? else { unreachable!("qwen2") };
    assert_eq!((c.rms_norm_eps, c.head_dim()), (1e-6, 8));
    // In code, a Qwen3 config names its head_dim.
    let cfg = LlamaConfig { head_dim: None, ..LlamaConfig::tiny_qwen3(VOCAB, 32, 64, 1, 4, 2, 8) };
    let err = CausalLm::random(&cfg, 0, &Device::Cpu).err().expect("no head_dim");
    assert!(err.to_string().contains("head_dim"), "{err}");
    Ok(())
}
