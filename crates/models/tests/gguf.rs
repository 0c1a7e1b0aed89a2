//! GGUF: a checkpoint written the way llama.cpp's `convert_hf_to_gguf.py` writes it (q/k rows
//! permuted for Llama but not for Qwen, norms stored as `1 + w` for Gemma, llama.cpp names,
//! Qwen's attention biases as `attn_{q,k,v,output}.bias`, the architecture as metadata, a
//! llama3-scaled Llama's RoPE divisors as `rope_freqs.weight`) loads back to the original weights;
//! its metadata alone gives back the original config (every family and variant) and a model whose
//! logits equal the safetensors checkpoint's; a Q8_0 file dequantizes close to the original; bad or
//! unsupported metadata is an error naming the file and the key.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use slime_models::gguf::gguf_name;
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, MistralConfig, ModelConfig, ModelError, Result, RopeScaling};

/// convert_hf_to_gguf.py `LlamaModel.permute`:
/// `w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)`.
fn llama_cpp_permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The metadata llama.cpp's converter writes for `cfg`: counts as u32, reals as f32, the
/// architecture's key prefix, a token list; Gemma 3's sliding pattern as a period or one bool per
/// layer, its local RoPE base only when it is not 10,000.
fn gguf_metadata(cfg: &ModelConfig) -> Vec<(String, Value)> {
    let u = |n: usize| Value::U32(n as u32);
    let f = |x: f64| Value::F32(x as f32);
    let (arch, vocab) = match cfg {
        ModelConfig::Llama(c) => (c.model_type.clone().unwrap_or_else(|| "llama".into()), c.vocab_size),
        ModelConfig::Gemma(c) if c.is_gemma3() => ("gemma3".to_string(), c.vocab_size),
        ModelConfig::Gemma(c) => (c.model_type.clone().unwrap_or_else(|| "gemma".into()), c.vocab_size),
        // llama.cpp converts Mistral as a Llama (the sliding window is not stored).
        ModelConfig::Mistral(c) => ("llama".to_string(), c.vocab_size),
    };
    let mut md: Vec<(String, Value)> = vec![("general.architecture".into(), Value::String(arch.clone()))];
    let mut put = |name: &str, v: Value| md.push((format!("{arch}.{name}"), v));
    match cfg {
        ModelConfig::Llama(c) => {
            put("context_length", u(c.max_position_embeddings));
            put("embedding_length", u(c.hidden_size));
            put("block_count", u(c.num_hidden_layers));
            put("feed_forward_length", u(c.intermediate_size));
            put("attention.head_count", u(c.num_attention_heads));
            put("attention.head_count_kv", u(c.kv_heads()));
            put("attention.layer_norm_rms_epsilon", f(c.rms_norm_eps));
            put("rope.freq_base", f(c.rope_theta));
            if let Some(d) = c.head_dim {
                put("attention.key_length", u(d));
                put("attention.value_length", u(d));
            }
            if arch == "llama" {
                put("vocab_size", u(c.vocab_size));
                put("rope.dimension_count", u(c.head_dim()));
            }
        }
        ModelConfig::Gemma(c) => {
            put("context_length", u(c.max_position_embeddings));
            put("embedding_length", u(c.hidden_size));
            put("block_count", u(c.num_hidden_layers));
            put("feed_forward_length", u(c.intermediate_size));
            put("attention.head_count", u(c.num_attention_heads));
            put("attention.head_count_kv", u(c.num_key_value_heads));
            put("attention.key_length", u(c.head_dim));
            put("attention.value_length", u(c.head_dim));
            put("attention.layer_norm_rms_epsilon", f(c.rms_norm_eps));
            if c.is_gemma2() || c.is_gemma3() {
                put("rope.freq_base", f(c.rope_theta));
            }
            if let Some(w) = c.sliding_window {
                put("attention.sliding_window", u(w));
            }
            if let Some(cap) = c.attn_logit_softcapping {
                put("attn_logit_softcapping", f(cap));
            }
            if let Some(cap) = c.final_logit_softcapping {
                put("final_logit_softcapping", f(cap));
            }
            if let Some(p) = c.sliding_window_pattern.filter(|&p| p != 6) {
                put("attention.sliding_window_pattern", u(p));
            }
            if let Some(types) = &c.layer_types {
                let flags = types.iter().map(|t| Value::Bool(t == "sliding_attention")).collect();
                put("attention.sliding_window_pattern", Value::Array(flags));
            }
            if let Some(base) = c.rope_local_base_freq.filter(|&b| b != 10_000.0) {
                put("rope.freq_base_swa", f(base));
            }
            if let Some(s) = &c.rope_scaling {
                put("rope.scaling.type", Value::String(s.rope_type.clone()));
                put("rope.scaling.factor", f(s.factor));
            }
        }
        ModelConfig::Mistral(c) => {
            put("context_length", u(c.max_position_embeddings));
            put("embedding_length", u(c.hidden_size));
            put("block_count", u(c.num_hidden_layers));
            put("feed_forward_length", u(c.intermediate_size));
            put("attention.head_count", u(c.num_attention_heads));
            put("attention.head_count_kv", u(c.num_key_value_heads));
            put("attention.layer_norm_rms_epsilon", f(c.rms_norm_eps));
            put("rope.freq_base", f(c.rope_theta));
            put("vocab_size", u(c.vocab_size));
            put("rope.dimension_count", u(c.head_dim()));
        }
    }
    let tokens = (0..vocab).map(|i| Value::String(format!("<t{i}>"))).collect();
    md.push(("tokenizer.ggml.tokens".into(), Value::Array(tokens)));
    md
}

/// convert_hf_to_gguf.py's `rope_freqs.weight` for a llama3-scaled Llama: per frequency, the
/// divisor `base_freq / scaled_freq` (1 above the high-frequency wavelength threshold, `factor`
/// below the low one, the reciprocal of the interpolation between); ones without scaling.
fn rope_freqs(c: &LlamaConfig) -> Vec<f32> {
    let d = c.head_dim();
    (0..d / 2)
        .map(|i| {
            let Some(s) = &c.rope_scaling else { return 1.0 };
            let wavelen = 2.0 * std::f64::consts::PI * c.rope_theta.powf(2.0 * i as f64 / d as f64);
            let orig = s.original_max_position_embeddings as f64;
            let (low, high) = (orig / s.low_freq_factor, orig / s.high_freq_factor);
            let r = if wavelen < high {
                1.0
            } else if wavelen > low {
                s.factor
            } else {
                let smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / s.factor + smooth)
            };
            r as f32
        })
        .collect()
}

fn write_gguf(lm: &CausalLm, dtype: GgmlDType, path: &std::path::Path) -> Result<()> {
    write_gguf_edited(lm, dtype, path, |_, _| {})
}

/// [`write_gguf`] with `edit` applied to the metadata and tensors before writing.
fn write_gguf_edited(
    lm: &CausalLm,
    dtype: GgmlDType,
    path: &std::path::Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) -> Result<()> {
    let cfg = lm.config().clone();
    let (sandwich, gemma) = match &cfg {
        ModelConfig::Gemma(c) => (c.is_gemma2() || c.is_gemma3(), true),
        ModelConfig::Llama(_) | ModelConfig::Mistral(_) => (false, false),
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in lm.weights() {
        let mut t = t.copy()?;
        if let ModelConfig::Llama(c) = &cfg
            && !(c.is_qwen2() || c.is_qwen3())
        {
            if name.ends_with("q_proj.weight") {
                t = llama_cpp_permute(&t, c.num_attention_heads)?;
            } else if name.ends_with("k_proj.weight") {
                t = llama_cpp_permute(&t, c.kv_heads())?;
            }
        }
        if let ModelConfig::Mistral(c) = &cfg {
            if name.ends_with("q_proj.weight") {
                t = llama_cpp_permute(&t, c.num_attention_heads)?;
            } else if name.ends_with("k_proj.weight") {
                t = llama_cpp_permute(&t, c.num_key_value_heads)?;
            }
        }
        if gemma && name.ends_with("norm.weight") {
            t = (t + 1.0)?;
        }
        // llama.cpp keeps 1-D tensors in f32.
        let q = if t.rank() == 1 { QTensor::quantize(&t, GgmlDType::F32)? } else { QTensor::quantize(&t, dtype)? };
        tensors.push((gguf_name(&name, sandwich), q));
    }
    // A Llama's RoPE divisors (ones unless llama3-scaled); an extra tensor elsewhere, which the
    // model does not use and which is ignored.
    let freqs = match &cfg {
        ModelConfig::Llama(c) => rope_freqs(c),
        ModelConfig::Gemma(_) | ModelConfig::Mistral(_) => vec![1.0; 4],
    };
    let n = freqs.len();
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&Tensor::from_vec(freqs, n, &Device::Cpu)?, GgmlDType::F32)?,
    ));
    let mut metadata = gguf_metadata(&cfg);
    edit(&mut metadata, &mut tensors);
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f =
        std::fs::File::create(path).map_err(|e| ModelError::Io { path: "gguf".into(), reason: e.to_string() })?;
    gguf_file::write(&mut f, &md, &refs)?;
    Ok(())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Norm weights and biases (zero at initialisation) away from their initial values.
fn perturb_norms(lm: &CausalLm) -> Result<()> {
    for (name, var) in lm.trainable_vars() {
        if name.contains("norm") || name.ends_with(".bias") {
            let n = var.elem_count();
            let salt: usize = name.bytes().map(usize::from).sum();
            let w: Vec<f32> = (0..n).map(|i| -0.25 + 0.5 * ((i * 7 + salt) % 13) as f32 / 13.0).collect();
            var.set(&Tensor::from_vec(w, n, &Device::Cpu)?)?;
        }
    }
    Ok(())
}

#[test]
fn f32_gguf_loads_back_to_the_hugging_face_weights() -> Result<()> {
    let configs: Vec<ModelConfig> = vec![
        LlamaConfig::tiny(97, 32, 64, 2, 4, 2).into(),
        GemmaConfig::tiny(97, 32, 64, 2, 4, 2).into(),
        GemmaConfig::tiny3(97, 32, 64, 2, 4, 2).into(),
        LlamaConfig::tiny_qwen2(97, 32, 64, 2, 4, 2).into(),
        LlamaConfig { attention_bias: true, ..LlamaConfig::tiny_qwen3(97, 32, 64, 2, 4, 2, 16) }.into(),
        MistralConfig::tiny(97, 32, 64, 2, 4, 2).into(),
    ];
    for cfg in configs {
        let lm = CausalLm::random(&cfg, 1, &Device::Cpu)?;
        perturb_norms(&lm)?;
        let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
        let path = dir.path().join("model.gguf");
        write_gguf(&lm, GgmlDType::F32, &path)?;
        let back = CausalLm::from_gguf(&path, &cfg, &Device::Cpu)?;
        let (a, b): (HashMap<_, _>, HashMap<_, _>) = (lm.weights(), back.weights());
        assert_eq!(a.len(), b.len());
        for (name, t) in &a {
            let diff = max_abs_diff(t, &b[name])?;
            // Permutations are exact; Gemma's (w + 1) - 1 rounds.
            let tol = if name.contains("norm") { 1e-6 } else { 0.0 };
            assert!(diff <= tol, "{name}: {diff}");
        }
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu)?;
        let diff = max_abs_diff(&lm.model().token_logps(&ids, None, 4)?, &back.model().token_logps(&ids, None, 4)?)?;
        assert!(diff < 1e-5, "{diff}");
    }
    Ok(())
}

#[test]
fn q8_0_gguf_dequantizes_close_and_missing_tensors_are_named() -> Result<()> {
    let cfg = LlamaConfig::tiny(97, 32, 64, 2, 4, 2);
    let lm = CausalLm::random(&cfg, 2, &Device::Cpu)?;
    let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
    let path = dir.path().join("model.gguf");
    write_gguf(&lm, GgmlDType::Q8_0, &path)?;
    let back = CausalLm::from_gguf(&path, &cfg, &Device::Cpu)?;
    for (name, t) in lm.weights() {
        let scale = t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        // Q8_0: 8-bit per 32-value block, error <= half a step of the block's max / 127.
        assert!(max_abs_diff(&t, &back.weights()[&name])? <= scale / 127.0, "{name}");
    }
    // A config with more layers than the file: the missing tensor is named.
    let bigger = LlamaConfig { num_hidden_layers: 3, ..cfg };
    let err = CausalLm::from_gguf(&path, &bigger, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("blk.2.") && err.contains("model.layers.2."), "{err}");
    Ok(())
}

#[test]
fn gguf_loads_as_bf16_on_request() -> Result<()> {
    let cfg = GemmaConfig::tiny3(97, 32, 64, 2, 4, 2);
    let lm = CausalLm::random(&cfg, 3, &Device::Cpu)?;
    perturb_norms(&lm)?;
    let dir = tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })?;
    let path = dir.path().join("model.gguf");
    write_gguf(&lm, GgmlDType::F32, &path)?;
    let f32_back = CausalLm::from_gguf(&path, &cfg, &Device::Cpu)?.weights();
    let bf16 = CausalLm::from_gguf_as(&path, &cfg, &Device::Cpu, Some(candle_core::DType::BF16))?;
    for (name, t) in bf16.weights() {
        assert_eq!(t.dtype(), candle_core::DType::BF16, "{name}");
        let want = f32_back[&name].to_dtype(candle_core::DType::BF16)?;
        assert_eq!(max_abs_diff(&t.to_dtype(candle_core::DType::F32)?, &want.to_dtype(candle_core::DType::F32)?)?, 0.0);
    }
    let out = bf16.model().generate_greedy(&[1, 5, 9], 3, &[])?;
    assert_eq!(out.len(), 3);
    Ok(())
}

fn tmp() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| ModelError::Io { path: "tmp".into(), reason: e.to_string() })
}

fn llama3(factor: f64, low: f64, high: f64) -> Option<RopeScaling> {
    Some(RopeScaling {
        rope_type: "llama3".into(),
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: 8192,
    })
}

/// Tiny configs of every family and the variants GGUF metadata has to tell apart.
fn family_configs() -> Vec<(&'static str, ModelConfig)> {
    // head_dim 64 at RoPE base 500,000: several frequencies fall between llama3's thresholds.
    let wide = LlamaConfig {
        rope_theta: 500_000.0,
        max_position_embeddings: 16_384,
        ..LlamaConfig::tiny(97, 128, 64, 2, 2, 1)
    };
    let narrow = LlamaConfig { rope_theta: 500_000.0, ..LlamaConfig::tiny(97, 32, 64, 2, 2, 1) };
    let sliding3 = ["sliding_attention", "full_attention", "sliding_attention"].map(String::from).to_vec();
    vec![
        ("llama-gqa-untied", LlamaConfig::tiny(97, 32, 64, 2, 4, 2).into()),
        (
            "llama-mha-tied",
            LlamaConfig {
                tie_word_embeddings: true,
                rope_theta: 100_000.0,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 8192,
                ..LlamaConfig::tiny(101, 32, 48, 3, 4, 4)
            }
            .into(),
        ),
        (
            "llama-explicit-head-dim",
            LlamaConfig { head_dim: Some(16), ..LlamaConfig::tiny(97, 32, 64, 2, 4, 2) }.into(),
        ),
        ("llama3-rope-defaults", LlamaConfig { rope_scaling: llama3(8.0, 1.0, 4.0), ..wide.clone() }.into()),
        ("llama3-rope-solved", LlamaConfig { rope_scaling: llama3(32.0, 2.0, 8.0), ..wide }.into()),
        // head_dim 16: one frequency between the thresholds (solved assuming high = 4 low).
        ("llama3-rope-one-between", LlamaConfig { rope_scaling: llama3(4.0, 0.25, 1.0), ..narrow }.into()),
        ("qwen2-gqa-untied", LlamaConfig::tiny_qwen2(97, 32, 64, 2, 4, 2).into()),
        (
            "qwen2-mha-tied",
            LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny_qwen2(97, 32, 64, 2, 4, 4) }.into(),
        ),
        (
            "qwen3-bias-untied",
            LlamaConfig { attention_bias: true, ..LlamaConfig::tiny_qwen3(97, 32, 64, 2, 4, 2, 16) }.into(),
        ),
        (
            "qwen3-mqa-tied",
            LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny_qwen3(97, 32, 64, 2, 4, 1, 8) }.into(),
        ),
        ("gemma1", GemmaConfig::tiny(97, 32, 64, 2, 4, 2).into()),
        ("gemma1-head-dim-16", GemmaConfig { head_dim: 16, ..GemmaConfig::tiny(97, 32, 64, 2, 4, 1) }.into()),
        ("gemma2", GemmaConfig::tiny2(97, 32, 64, 2, 4, 2).into()),
        ("gemma3-pattern-2", GemmaConfig::tiny3(97, 32, 64, 2, 4, 2).into()),
        (
            "gemma3-layer-flags-linear-rope",
            GemmaConfig {
                sliding_window_pattern: None,
                layer_types: Some(sliding3),
                rope_local_base_freq: Some(20_000.0),
                rope_scaling: Some(RopeScaling {
                    rope_type: "linear".into(),
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                ..GemmaConfig::tiny3(97, 32, 64, 3, 4, 1)
            }
            .into(),
        ),
        (
            "gemma3-default-pattern",
            GemmaConfig { sliding_window_pattern: Some(6), ..GemmaConfig::tiny3(97, 32, 64, 2, 4, 2) }.into(),
        ),
    ]
}

#[test]
fn gguf_metadata_gives_back_the_config_and_the_model_of_the_safetensors_checkpoint() -> Result<()> {
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 11, 4, 8], [6, 2, 9, 9, 1, 0, 0, 0, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0]], &Device::Cpu)?;
    for (name, cfg) in family_configs() {
        let lm = CausalLm::random(&cfg, 7, &Device::Cpu)?;
        perturb_norms(&lm)?;
        let dir = tmp()?;
        let path = dir.path().join("model.gguf");
        write_gguf(&lm, GgmlDType::F32, &path)?;
        assert_eq!(ModelConfig::from_gguf(&path)?, cfg, "{name}");
        let from_gguf = CausalLm::from_gguf_file(&path, &Device::Cpu)?;
        assert_eq!(from_gguf.config(), &cfg, "{name}");
        lm.save_dir(&dir.path().join("hf"))?;
        let from_safetensors = CausalLm::from_dir(&dir.path().join("hf"), &Device::Cpu)?;
        // Llama and Qwen weights come back bit for bit; Gemma's (w + 1) - 1 rounds.
        let tol = if matches!(cfg, ModelConfig::Gemma(_)) { 1e-5 } else { 0.0 };
        let (a, b) = (from_gguf.model(), from_safetensors.model());
        let last = max_abs_diff(&a.last_logits(&ids, Some(&mask))?, &b.last_logits(&ids, Some(&mask))?)?;
        assert!(last <= tol, "{name}: last logits differ by {last}");
        let logps = max_abs_diff(
            &(a.token_logps(&ids, Some(&mask), 4)? * mask.to_dtype(candle_core::DType::F32)?)?,
            &(b.token_logps(&ids, Some(&mask), 4)? * mask.to_dtype(candle_core::DType::F32)?)?,
        )?;
        assert!(logps <= tol, "{name}: log-probs differ by {logps}");
    }
    Ok(())
}

#[test]
fn llama3_scaling_without_a_frequency_between_its_thresholds_keeps_the_frequencies() -> Result<()> {
    // head_dim 16, thresholds at wavelengths 1024 and 4096: no frequency between them, so the
    // divisors fix the scaling only up to where the thresholds lie in the gap.
    let cfg = LlamaConfig {
        rope_theta: 500_000.0,
        rope_scaling: llama3(8.0, 2.0, 8.0),
        ..LlamaConfig::tiny(97, 32, 64, 2, 2, 1)
    };
    let lm = CausalLm::random(&cfg, 8, &Device::Cpu)?;
    let dir = tmp()?;
    let path = dir.path().join("model.gguf");
    write_gguf(&lm, GgmlDType::F32, &path)?;
    let ModelConfig::Llama(read) = ModelConfig::from_gguf(&path)? else { panic!("not a Llama config") };
    for (a, b) in read.inv_freq().iter().zip(cfg.inv_freq()) {
        assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
    }
    assert_eq!(LlamaConfig { rope_scaling: cfg.rope_scaling.clone(), ..read }, cfg);
    Ok(())
}

#[test]
fn gguf_metadata_without_tensors_and_quantized_files() -> Result<()> {
    let dir = tmp()?;
    let path = dir.path().join("meta.gguf");
    let write_meta = |md: &[(String, Value)]| -> Result<()> {
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f =
            std::fs::File::create(&path).map_err(|e| ModelError::Io { path: "gguf".into(), reason: e.to_string() })?;
        Ok(gguf_file::write(&mut f, &refs, &[])?)
    };
    // Gemma 2 27B's layout (46 layers) scales queries by hidden / heads, as llama.cpp assumes; the
    // vocabulary comes from the token list when there is no embedding tensor.
    let big2 = GemmaConfig { query_pre_attn_scalar: Some(32.0), ..GemmaConfig::tiny2(50, 64, 32, 46, 2, 1) };
    let cfg: ModelConfig = GemmaConfig { head_dim: 16, ..big2 }.into();
    write_meta(&gguf_metadata(&cfg))?;
    assert_eq!(ModelConfig::from_gguf(&path)?, cfg);
    // `{arch}.vocab_size` wins over the token list; no `output.weight`: tied.
    let llama: ModelConfig =
        LlamaConfig { tie_word_embeddings: true, ..LlamaConfig::tiny(300, 32, 64, 2, 4, 2) }.into();
    let mut md = gguf_metadata(&llama);
    md.retain(|(k, _)| k != "tokenizer.ggml.tokens");
    md.push(("tokenizer.ggml.tokens".into(), Value::Array(vec![Value::String("a".into()); 7])));
    write_meta(&md)?;
    assert_eq!(ModelConfig::from_gguf(&path)?, llama);
    // A Q8_0 Qwen3 file loads from its metadata alone, close to the original.
    let qwen: ModelConfig =
        LlamaConfig { attention_bias: true, ..LlamaConfig::tiny_qwen3(97, 32, 64, 2, 4, 2, 16) }.into();
    let lm = CausalLm::random(&qwen, 4, &Device::Cpu)?;
    perturb_norms(&lm)?;
    let q8 = dir.path().join("q8.gguf");
    write_gguf(&lm, GgmlDType::Q8_0, &q8)?;
    let back = CausalLm::from_gguf_file_as(&q8, &Device::Cpu, Some(candle_core::DType::BF16))?;
    assert_eq!(back.config(), &qwen);
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu)?;
    let diff = max_abs_diff(&lm.model().token_logps(&ids, None, 4)?, &back.model().token_logps(&ids, None, 4)?)?;
    assert!(diff < 0.05, "{diff}");
    Ok(())
}

/// A change to a GGUF file's metadata or tensors.
enum Edit {
    /// Sets (or adds) a metadata key.
    Set(&'static str, Value),
    /// Removes a metadata key.
    Remove(&'static str),
    /// Sets (or adds) an f32 tensor of this shape, filled with these values (repeated).
    Tensor(&'static str, Vec<usize>, Vec<f32>),
}

/// The error of reading the config of `cfg`'s GGUF file after `edit` (the same through
/// `ModelConfig::from_gguf` and `CausalLm::from_gguf_file`), with the file's path.
fn config_error(cfg: &ModelConfig, edit: Edit) -> Result<(String, String)> {
    let lm = CausalLm::random(cfg, 5, &Device::Cpu)?;
    let dir = tmp()?;
    let path = dir.path().join("edited.gguf");
    let tensor = match &edit {
        Edit::Tensor(name, shape, values) => {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = values.iter().copied().cycle().take(n).collect();
            Some((
                name.to_string(),
                QTensor::quantize(&Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?, GgmlDType::F32)?,
            ))
        }
        _ => None,
    };
    write_gguf_edited(&lm, GgmlDType::F32, &path, |md, tensors| match edit {
        Edit::Set(key, v) => {
            md.retain(|(k, _)| k != key);
            md.push((key.into(), v));
        }
        Edit::Remove(key) => md.retain(|(k, _)| k != key),
        Edit::Tensor(..) => {
            if let Some((name, t)) = tensor {
                tensors.retain(|(n, _)| *n != name);
                tensors.push((name, t));
            }
        }
    })?;
    let from_config = ModelConfig::from_gguf(&path).err().map(|e| e.to_string()).unwrap_or_default();
    let from_model = CausalLm::from_gguf_file(&path, &Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert_eq!(from_config, from_model);
    Ok((from_config, path.display().to_string()))
}

#[test]
fn unsupported_or_missing_gguf_metadata_is_named() -> Result<()> {
    let llama: ModelConfig = LlamaConfig::tiny(97, 32, 64, 2, 4, 2).into();
    let qwen2: ModelConfig = LlamaConfig::tiny_qwen2(97, 32, 64, 2, 4, 2).into();
    let (gemma, gemma2, gemma3): (ModelConfig, ModelConfig, ModelConfig) = (
        GemmaConfig::tiny(97, 32, 64, 2, 4, 2).into(),
        GemmaConfig::tiny2(97, 32, 64, 2, 4, 2).into(),
        GemmaConfig::tiny3(97, 32, 64, 2, 4, 2).into(),
    );
    let text = |s: &str| Value::String(s.into());
    let cases: Vec<(&str, &ModelConfig, Edit, &[&str])> = vec![
        (
            "missing key",
            &llama,
            Edit::Remove("llama.block_count"),
            &["`llama.block_count`", "missing", "expected", "decoder layers"],
        ),
        (
            "no architecture",
            &llama,
            Edit::Remove("general.architecture"),
            &["`general.architecture`", "missing", "`qwen3`"],
        ),
        (
            "unsupported architecture",
            &llama,
            Edit::Set("general.architecture", text("qwen3moe")),
            &["`general.architecture`", "`qwen3moe` is not supported", "expected"],
        ),
        (
            "wrong type",
            &llama,
            Edit::Set("llama.attention.head_count", text("four")),
            &["`llama.attention.head_count`", "the string \"four\"", "expected", "unsigned integer"],
        ),
        (
            "invalid value",
            &llama,
            Edit::Set("llama.attention.head_count_kv", Value::U32(3)),
            &["`llama.attention.head_count_kv`", "must divide"],
        ),
        (
            "per-layer values differ",
            &llama,
            Edit::Set("llama.feed_forward_length", Value::Array(vec![Value::U32(64), Value::U32(32)])),
            &["`llama.feed_forward_length`", "all equal"],
        ),
        (
            "yarn on qwen2",
            &qwen2,
            Edit::Set("qwen2.rope.scaling.type", text("yarn")),
            &["`qwen2.rope.scaling.type`", "`yarn` is not supported", "expected `none`"],
        ),
        (
            "linear on gemma2",
            &gemma2,
            Edit::Set("gemma2.rope.scaling.type", text("linear")),
            &["`gemma2.rope.scaling.type`", "expected `none`"],
        ),
        (
            "mixture of experts",
            &llama,
            Edit::Set("llama.expert_count", Value::U32(8)),
            &["`llama.expert_count`", "mixture-of-experts"],
        ),
        (
            "partial rotary",
            &llama,
            Edit::Set("llama.rope.dimension_count", Value::U32(4)),
            &["`llama.rope.dimension_count`", "partial rotary", "expected the head width, 8"],
        ),
        (
            "embedding width",
            &llama,
            Edit::Set("llama.embedding_length", Value::U32(48)),
            &["`token_embd.weight`", "[97, 32]", "`llama.embedding_length` = 48"],
        ),
        (
            "missing sliding window",
            &gemma3,
            Edit::Remove("gemma3.attention.sliding_window"),
            &["`gemma3.attention.sliding_window`", "missing"],
        ),
        (
            "untied gemma",
            &gemma,
            Edit::Tensor("output.weight", vec![97, 32], vec![0.01]),
            &["`output.weight`", "ties lm_head"],
        ),
        (
            "biased llama",
            &llama,
            Edit::Tensor("blk.0.attn_q.bias", vec![32], vec![0.0]),
            &["`blk.0.attn_q.bias`", "`qwen2` and `qwen3` only"],
        ),
        (
            "rope divisors of no llama3 scaling",
            &llama,
            Edit::Tensor("rope_freqs.weight", vec![4], vec![1.0, 3.0, 2.0, 8.0]),
            &["`rope_freqs.weight`", "match no llama3 scaling"],
        ),
        (
            "rope divisors of the wrong length",
            &llama,
            Edit::Tensor("rope_freqs.weight", vec![3], vec![1.0]),
            &["`rope_freqs.weight`", "has 3 values, expected", "= 4"],
        ),
    ];
    for (what, cfg, edit, needles) in cases {
        let (err, path) = config_error(cfg, edit)?;
        assert!(err.starts_with(&path), "{what}: the file is not named: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
        }
    }
    Ok(())
}
