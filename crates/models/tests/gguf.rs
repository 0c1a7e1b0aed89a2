//! GGUF: a checkpoint written the way llama.cpp's `convert_hf_to_gguf.py` writes it (q/k rows
//! permuted for Llama but not for Qwen, norms stored as `1 + w` for Gemma, llama.cpp names,
//! Qwen's attention biases as `attn_{q,k,v,output}.bias`) loads back to the original weights; a
//! Q8_0 file dequantizes close to them.

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use slime_models::gguf::gguf_name;
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, ModelConfig, ModelError, Result};

/// convert_hf_to_gguf.py `LlamaModel.permute`:
/// `w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)`.
fn llama_cpp_permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

fn write_gguf(lm: &CausalLm, dtype: GgmlDType, path: &std::path::Path) -> Result<()> {
    let cfg = lm.config().clone();
    let (sandwich, gemma) = match &cfg {
        ModelConfig::Gemma(c) => (c.is_gemma2() || c.is_gemma3(), true),
        ModelConfig::Llama(_) => (false, false),
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
        if gemma && name.ends_with("norm.weight") {
            t = (t + 1.0)?;
        }
        // llama.cpp keeps 1-D tensors in f32.
        let q = if t.rank() == 1 { QTensor::quantize(&t, GgmlDType::F32)? } else { QTensor::quantize(&t, dtype)? };
        tensors.push((gguf_name(&name, sandwich), q));
    }
    // An extra tensor the model does not use is ignored.
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?, GgmlDType::F32)?,
    ));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f =
        std::fs::File::create(path).map_err(|e| ModelError::Io { path: "gguf".into(), reason: e.to_string() })?;
    gguf_file::write(&mut f, &[], &refs)?;
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
