//! Loading llama.cpp GGUF checkpoints by dequantizing every tensor to f32 at load time.
//!
//! The architecture comes from a Hugging Face config (GGUF metadata is not parsed), the weights
//! from the GGUF file, renamed to Hugging Face names, with llama.cpp's conversion undone
//! (`convert_hf_to_gguf.py`):
//! - Llama: q/k rows were permuted per head from the `rotate_half` layout to interleaved pairs,
//!   `w.reshape(heads, 2, d/2, in).swapaxes(1, 2)`; the inverse is
//!   `w.reshape(heads, d/2, 2, in).swapaxes(1, 2)`. Qwen2 / Qwen3 are not permuted (llama.cpp runs
//!   them with `rotate_half` RoPE); their attention biases are `attn_{q,k,v,output}.bias`.
//! - Gemma 1/2/3: every `*norm.weight` was stored as `1 + w`; `1` is subtracted.
//!
//! Tensors the model does not use (`rope_freqs.weight`, `output.weight` of a tied model) are
//! ignored; a missing one is an error naming both names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use crate::causal_lm::ModelConfig;
use crate::{ModelError, Result};

/// The GGUF name of a Hugging Face weight name (`sandwich`: Gemma 2/3 norm naming).
pub fn gguf_name(hf: &str, sandwich: bool) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else { return hf.into() };
    let Some((layer, module)) = rest.split_once('.') else { return hf.into() };
    let short = match module {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" if sandwich => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => other,
    };
    format!("blk.{layer}.{short}")
}

/// Undoes llama.cpp's per-head q/k row permutation of a `[heads * d, in]` weight.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Reads every weight `cfg` needs from the GGUF file at `path`, dequantized to f32, under Hugging
/// Face names, with llama.cpp's q/k permutation (Llama, not Qwen) and norm `+1` (Gemma) undone.
pub fn load_gguf(path: &Path, cfg: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    let io = |e: String| ModelError::Io { path: path.display().to_string(), reason: e };
    let mut file = std::fs::File::open(path).map_err(|e| io(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| io(e.to_string()))?;
    let (sandwich, gemma) = match cfg {
        ModelConfig::Llama(_) => (false, false),
        ModelConfig::Gemma(c) => (c.is_gemma2() || c.is_gemma3(), true),
    };
    let mut out = HashMap::new();
    for (name, shape) in cfg.weight_shapes() {
        let g = gguf_name(&name, sandwich);
        if !content.tensor_infos.contains_key(&g) {
            return Err(io(format!("no tensor `{g}` (for `{name}`)")));
        }
        let mut t = content.tensor(&mut file, &g, device).map_err(|e| io(e.to_string()))?.dequantize(device)?;
        if t.dims() != shape.as_slice() {
            return Err(io(format!("`{g}` has shape {:?}, expected {shape:?} for `{name}`", t.dims())));
        }
        if let ModelConfig::Llama(c) = cfg
            && !(c.is_qwen2() || c.is_qwen3())
        {
            if name.ends_with("q_proj.weight") {
                t = unpermute_qk(&t, c.num_attention_heads)?;
            } else if name.ends_with("k_proj.weight") {
                t = unpermute_qk(&t, c.kv_heads())?;
            }
        }
        if gemma && name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        out.insert(name, t);
    }
    Ok(out)
}
