//! Loading llama.cpp GGUF checkpoints by dequantizing every tensor to f32 at load time.
//!
//! The architecture comes either from a Hugging Face config ([`crate::CausalLm::from_gguf`]) or
//! from the file's own metadata ([`crate::ModelConfig::from_gguf`],
//! [`crate::CausalLm::from_gguf_file`]; see [`config_from_content`] for the keys read). The weights
//! come from the GGUF file, renamed to Hugging Face names, with llama.cpp's conversion undone
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
use std::io::{Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::causal_lm::ModelConfig;
use crate::config::{LlamaConfig, RopeScaling};
use crate::gemma::GemmaConfig;
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

/// Opens the GGUF file at `path` and reads its header (metadata and tensor directory).
pub(crate) fn open(path: &Path) -> Result<(Content, std::fs::File)> {
    let io = |e: String| ModelError::Io { path: path.display().to_string(), reason: e };
    let mut file = std::fs::File::open(path).map_err(|e| io(e.to_string()))?;
    let content = Content::read(&mut file).map_err(|e| io(format!("not a readable GGUF file: {e}")))?;
    Ok((content, file))
}

/// Reads every weight `cfg` needs from the GGUF file at `path`, dequantized to f32, under Hugging
/// Face names, with llama.cpp's q/k permutation (Llama, not Qwen) and norm `+1` (Gemma) undone.
pub fn load_gguf(path: &Path, cfg: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    let (content, mut file) = open(path)?;
    load_tensors(&content, &mut file, path, cfg, device)
}

/// [`load_gguf`] from a file whose header is already read.
pub(crate) fn load_tensors<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
    path: &Path,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let io = |e: String| ModelError::Io { path: path.display().to_string(), reason: e };
    let layout = cfg.family().gguf_layout();
    let mut out = HashMap::new();
    for (name, shape) in cfg.weight_shapes() {
        let g = gguf_name(&name, layout.sandwich_norms);
        if !content.tensor_infos.contains_key(&g) {
            return Err(io(format!("no tensor `{g}` (for `{name}`)")));
        }
        let mut t = content.tensor(reader, &g, device).map_err(|e| io(e.to_string()))?.dequantize(device)?;
        if t.dims() != shape.as_slice() {
            return Err(io(format!("`{g}` has shape {:?}, expected {shape:?} for `{name}`", t.dims())));
        }
        if let Some((heads, kv_heads)) = layout.permuted_qk {
            if name.ends_with("q_proj.weight") {
                t = unpermute_qk(&t, heads)?;
            } else if name.ends_with("k_proj.weight") {
                t = unpermute_qk(&t, kv_heads)?;
            }
        }
        if layout.norms_plus_one && name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        out.insert(name, t);
    }
    Ok(out)
}

/// The architectures [`config_from_content`] reads, as named in errors.
const ARCHITECTURES: &str = "`llama`, `qwen2`, `qwen3`, `gemma`, `gemma2` or `gemma3`";

/// The original (pre-scaling) context of Llama 3.1 / 3.2, which llama.cpp does not store with a
/// llama3-scaled model; `{arch}.rope.scaling.original_context_length` overrides it.
const LLAMA3_ORIGINAL_CONTEXT: usize = 8192;

/// Reads the architecture of the GGUF file at `path` from its metadata (see
/// [`config_from_content`]); the errors name the file and the metadata key.
pub(crate) fn read_config(path: &Path) -> Result<ModelConfig> {
    let (content, mut file) = open(path)?;
    config_from_content(&content, &mut file, &path.display().to_string())
}

/// The model configuration a GGUF file's metadata describes; `content` is its header, `reader`
/// the file (read only for a Llama's `rope_freqs.weight`), `file` names it in errors.
///
/// `general.architecture` chooses the family: `llama` (Llama 2/3/3.1/3.2, SmolLM2, ...), `qwen2`
/// and `qwen3` give a [`LlamaConfig`] with that `model_type`; `gemma`, `gemma2` and `gemma3` a
/// [`GemmaConfig`] (`gemma3` as `gemma3_text`). Keys read, under the architecture's prefix:
/// - required: `block_count`, `embedding_length`, `feed_forward_length`, `attention.head_count`,
///   `attention.layer_norm_rms_epsilon`, `context_length` (`max_position_embeddings`);
/// - `attention.head_count_kv` (default: `head_count`; a per-layer array must be uniform, as must
///   `feed_forward_length`), `attention.key_length` / `value_length` (`head_dim`; default
///   `embedding_length / head_count`; `rope.dimension_count`, if given, must equal it),
///   `rope.freq_base` (default 10,000; Gemma 3: 1,000,000);
/// - RoPE scaling: `rope.scaling.type` `none` or absent; `linear` with `rope.scaling.factor` for
///   Gemma 3 (global layers); a Llama's llama3 scaling, which llama.cpp stores only as the
///   per-frequency divisors of the tensor `rope_freqs.weight`, is recovered from them (factor,
///   low/high frequency factors, original context 8192 or
///   `rope.scaling.original_context_length`) and checked to reproduce every divisor;
/// - Gemma 2 / 3: `attention.sliding_window` (required), `attn_logit_softcapping` and
///   `final_logit_softcapping` (Gemma 2 defaults 50 and 30, as llama.cpp); Gemma 3:
///   `attention.sliding_window_pattern` (a period, or one bool per layer, `true` = sliding;
///   default 6), `rope.freq_base_swa` (default 10,000). `query_pre_attn_scalar` is not stored: it
///   is `head_dim`, except for the 27B layouts (Gemma 2 with 46 layers, Gemma 3 with 62), where it
///   is `embedding_length / head_count`, as llama.cpp assumes.
///
/// The vocabulary size is the row count of `token_embd.weight` (else `{arch}.vocab_size`, else
/// the length of `tokenizer.ggml.tokens`); the embeddings are tied iff there is no
/// `output.weight` (Gemma must have none). Qwen3 has attention biases iff `blk.0.attn_q.bias`
/// exists; Llama must have none. f32 values are read as the shortest decimal that rounds to them
/// (`1e-5`, not `9.99999974e-6`): the number the Hugging Face config held. Unsupported
/// architectures (including mixture-of-experts files, `{arch}.expert_count > 0`), missing keys,
/// values of the wrong type and unsupported values are errors naming the file and the key.
pub fn config_from_content<R: Read + Seek>(content: &Content, reader: &mut R, file: &str) -> Result<ModelConfig> {
    const ARCH: &str = "general.architecture";
    let err = |reason: String| ModelError::Gguf { file: file.into(), key: ARCH.into(), reason };
    let arch = match content.metadata.get(ARCH) {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => return Err(err(format!("is {}, expected a string: {ARCHITECTURES}", describe(v)))),
        None => return Err(err(format!("missing; expected one of {ARCHITECTURES}"))),
    };
    let meta = Meta { content, file, arch };
    let config: ModelConfig = match arch {
        "llama" | "qwen2" | "qwen3" => llama_config(&meta, reader)?.into(),
        "gemma" | "gemma2" | "gemma3" => gemma_config(&meta)?.into(),
        other => return Err(err(format!("`{other}` is not supported (expected {ARCHITECTURES})"))),
    };
    match config.validate(file) {
        Err(ModelError::Config { field, reason, .. }) => Err(meta.err(&meta.key_of(field), reason)),
        other => other.map(|()| config),
    }
}

/// The metadata of one file, with the architecture's key prefix.
struct Meta<'a> {
    content: &'a Content,
    file: &'a str,
    arch: &'a str,
}

/// A metadata value in words, for errors.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::Bool(b) => format!("the bool {b}"),
        other => format!("{:?}", other),
    }
}

/// A non-negative integer value of any GGUF integer type.
fn as_uint(v: &Value) -> Option<usize> {
    let n: i128 = match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        _ => return None,
    };
    usize::try_from(n).ok()
}

/// A number of any GGUF numeric type; an f32 becomes the shortest decimal that rounds to it.
fn as_float(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => x.to_string().parse().ok(),
        Value::F64(x) => Some(x),
        _ => as_uint(v).map(|n| n as f64),
    }
}

impl Meta<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> ModelError {
        ModelError::Gguf { file: self.file.into(), key: key.into(), reason: reason.into() }
    }

    /// `{arch}.{name}`.
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    fn tensor_dims(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|t| t.shape.dims())
    }

    /// `{arch}.{name}` read with `read`, `None` when absent; `what` says what is expected.
    fn opt<T>(&self, name: &str, what: &str, read: impl Fn(&Value) -> Option<T>) -> Result<Option<T>> {
        let key = self.key(name);
        match self.content.metadata.get(&key) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| self.err(&key, format!("is {}, expected {what}", describe(v)))),
        }
    }

    /// `{arch}.{name}`, required.
    fn req<T>(&self, name: &str, what: &str, read: impl Fn(&Value) -> Option<T>) -> Result<T> {
        self.opt(name, what, read)?.ok_or_else(|| self.err(&self.key(name), format!("missing; expected {what}")))
    }

    fn uint(&self, name: &str, what: &str) -> Result<usize> {
        self.req(name, &format!("{what} (an unsigned integer)"), as_uint)
    }

    fn opt_uint(&self, name: &str, what: &str) -> Result<Option<usize>> {
        self.opt(name, &format!("{what} (an unsigned integer)"), as_uint)
    }

    fn opt_float(&self, name: &str, what: &str) -> Result<Option<f64>> {
        self.opt(name, &format!("{what} (a number)"), as_float)
    }

    /// An unsigned integer stored once or per layer (an array, which must hold one value).
    fn uniform_uint(&self, name: &str, what: &str) -> Result<Option<usize>> {
        let what = format!("{what} (an unsigned integer, or one per layer, all equal)");
        self.opt(name, &what, |v| match v {
            Value::Array(a) => {
                let first = as_uint(a.first()?)?;
                a.iter().all(|x| as_uint(x) == Some(first)).then_some(first)
            }
            v => as_uint(v),
        })
    }

    /// The metadata key (or tensor) a config field comes from, for validation errors.
    fn key_of(&self, field: &str) -> String {
        let name = match field {
            "vocab_size" => return "token_embd.weight".into(),
            "model_type" => return "general.architecture".into(),
            "hidden_size" => "embedding_length",
            "intermediate_size" => "feed_forward_length",
            "num_hidden_layers" => "block_count",
            "num_attention_heads" => "attention.head_count",
            "num_key_value_heads" => "attention.head_count_kv",
            "head_dim" => "attention.key_length",
            "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
            "rope_scaling" => "rope.scaling.type",
            "sliding_window" => "attention.sliding_window",
            "sliding_window_pattern" | "layer_types" => "attention.sliding_window_pattern",
            "max_position_embeddings" => "context_length",
            other => other,
        };
        self.key(name)
    }
}

/// What every supported architecture stores the same way.
struct Dims {
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    /// `attention.key_length`, or `hidden / heads`.
    head_dim: usize,
    /// Whether `attention.key_length` was given.
    explicit_head_dim: bool,
    eps: f64,
    context: usize,
    rope_theta: Option<f64>,
}

fn dims(m: &Meta) -> Result<Dims> {
    if let Some(n) = m.opt_uint("expert_count", "the number of experts")?.filter(|&n| n > 0) {
        return Err(m.err(
            &m.key("expert_count"),
            format!("{n} experts: mixture-of-experts models are not supported (expected 0 or no key)"),
        ));
    }
    let hidden = m.uint("embedding_length", "the model width")?;
    let vocab = match m.tensor_dims("token_embd.weight") {
        Some(&[vocab, width]) if width == hidden => vocab,
        Some(d) => {
            return Err(m.err(
                "token_embd.weight",
                format!("has shape {d:?}, expected [vocab, {hidden}] (`{}` = {hidden})", m.key("embedding_length")),
            ));
        }
        None => match m.opt_uint("vocab_size", "the vocabulary size")? {
            Some(v) => v,
            None => match m.content.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => {
                    return Err(m.err(
                        "token_embd.weight",
                        format!(
                            "missing, as are `{}` and `tokenizer.ggml.tokens`; expected one of them for the vocabulary size",
                            m.key("vocab_size")
                        ),
                    ));
                }
            },
        },
    };
    let heads = m.uint("attention.head_count", "the number of query heads")?;
    let key_length = m.opt_uint("attention.key_length", "the per-head width")?;
    let head_dim = match key_length {
        Some(d) => d,
        None if heads > 0 && hidden.is_multiple_of(heads) => hidden / heads,
        None => {
            return Err(m.err(
                &m.key("attention.key_length"),
                format!(
                    "missing, and `{}` = {hidden} is not a multiple of `{}` = {heads}; expected the per-head width",
                    m.key("embedding_length"),
                    m.key("attention.head_count")
                ),
            ));
        }
    };
    if let Some(v) = m.opt_uint("attention.value_length", "the per-head value width")?.filter(|&v| v != head_dim) {
        return Err(m.err(
            &m.key("attention.value_length"),
            format!("{v} differs from the key width {head_dim}; expected equal key and value widths"),
        ));
    }
    if let Some(r) = m.opt_uint("rope.dimension_count", "the rotated width per head")?.filter(|&r| r != head_dim) {
        return Err(m.err(
            &m.key("rope.dimension_count"),
            format!("{r}: partial rotary embeddings are not supported (expected the head width, {head_dim})"),
        ));
    }
    Ok(Dims {
        vocab,
        hidden,
        intermediate: m.uniform_uint("feed_forward_length", "the MLP width")?.ok_or_else(|| {
            m.err(&m.key("feed_forward_length"), "missing; expected the MLP width (an unsigned integer)")
        })?,
        layers: m.uint("block_count", "the number of decoder layers")?,
        heads,
        kv_heads: m.uniform_uint("attention.head_count_kv", "the number of key/value heads")?.unwrap_or(heads),
        head_dim,
        explicit_head_dim: key_length.is_some(),
        eps: m.req("attention.layer_norm_rms_epsilon", "the RMSNorm epsilon (a number)", as_float)?,
        context: m.uint("context_length", "the longest context (max_position_embeddings)")?,
        rope_theta: m.opt_float("rope.freq_base", "the RoPE base")?,
    })
}

/// `{arch}.rope.scaling.type`, unless absent or `none`.
fn rope_scaling_type(m: &Meta) -> Result<Option<String>> {
    let t = m.opt("rope.scaling.type", "a string (`none` or `linear`)", |v| v.to_string().ok().cloned())?;
    Ok(t.filter(|t| t != "none"))
}

fn llama_config<R: Read + Seek>(m: &Meta, reader: &mut R) -> Result<LlamaConfig> {
    let d = dims(m)?;
    let (qwen, qwen3) = (m.arch != "llama", m.arch == "qwen3");
    let q_bias = m.tensor_dims("blk.0.attn_q.bias").is_some();
    if q_bias && m.arch == "llama" {
        return Err(m.err(
            "blk.0.attn_q.bias",
            "biased attention projections are supported for `qwen2` and `qwen3` only (expected no bias tensors)",
        ));
    }
    if let Some(t) = rope_scaling_type(m)? {
        return Err(m.err(
            &m.key("rope.scaling.type"),
            format!(
                "`{t}` is not supported for `{}` (expected `none`; llama3 scaling comes as `rope_freqs.weight`)",
                m.arch
            ),
        ));
    }
    let default_head_dim = (d.heads > 0 && d.hidden.is_multiple_of(d.heads)).then(|| d.hidden / d.heads);
    let mut cfg = LlamaConfig {
        // Qwen3 names its head width; Llama and Qwen2 only when it is not `hidden / heads`.
        head_dim: (qwen3 || (d.explicit_head_dim && default_head_dim != Some(d.head_dim))).then_some(d.head_dim),
        rms_norm_eps: d.eps,
        rope_theta: d.rope_theta.unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: d.context,
        tie_word_embeddings: m.tensor_dims("output.weight").is_none(),
        hidden_act: "silu".into(),
        attention_bias: qwen3 && q_bias,
        mlp_bias: false,
        model_type: Some(m.arch.into()),
        use_sliding_window: qwen.then_some(false),
        sliding_window: None,
        max_window_layers: None,
        layer_types: None,
        // The sizes; every other field is set above.
        ..LlamaConfig::tiny(d.vocab, d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads)
    };
    if m.arch == "llama" && m.content.tensor_infos.contains_key("rope_freqs.weight") {
        let divisors: Vec<f64> = m
            .content
            .tensor(reader, "rope_freqs.weight", &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| m.err("rope_freqs.weight", format!("unreadable: {e}")))?
            .into_iter()
            .map(f64::from)
            .collect();
        cfg.rope_scaling = llama3_scaling(m, &cfg, &divisors)?;
    }
    Ok(cfg)
}

/// The llama3 RoPE scaling whose per-frequency divisors (`base_freq / scaled_freq`, llama.cpp's
/// `rope_freqs.weight`) are `divisors`; `None` when they are all 1. The divisors fix the factor
/// (the largest) and the two wavelength thresholds `original / low_freq_factor` and
/// `original / high_freq_factor` only as far as frequencies fall between them, so candidates are
/// tried in order (Llama 3's 1 and 4; solved from the frequencies between the thresholds,
/// rounded to three decimals, then unrounded) and the first that reproduces every divisor
/// within 1e-5 is taken.
fn llama3_scaling(m: &Meta, cfg: &LlamaConfig, divisors: &[f64]) -> Result<Option<RopeScaling>> {
    const KEY: &str = "rope_freqs.weight";
    const TOL: f64 = 1e-5;
    let unscaled = LlamaConfig { rope_scaling: None, ..cfg.clone() }.inv_freq();
    if divisors.len() != unscaled.len() {
        return Err(m.err(
            KEY,
            format!("has {} values, expected one per rotated pair (head_dim / 2 = {})", divisors.len(), unscaled.len()),
        ));
    }
    if divisors.iter().all(|&r| (r - 1.0).abs() <= TOL) {
        return Ok(None);
    }
    let original = m
        .opt_uint("rope.scaling.original_context_length", "the pre-scaling context")?
        .unwrap_or(LLAMA3_ORIGINAL_CONTEXT);
    let factor = divisors.iter().copied().fold(f64::MIN, f64::max);
    let wavelen: Vec<f64> = unscaled.iter().map(|f| 2.0 * std::f64::consts::PI / f).collect();
    let is_one = |r: f64| (r - 1.0).abs() <= TOL;
    let is_full = |r: f64| (r - factor).abs() <= TOL * factor;
    // (original / wavelength, position between the thresholds) of the frequencies between them.
    let between: Vec<(f64, f64)> = divisors
        .iter()
        .zip(&wavelen)
        .filter(|&(&r, _)| !is_one(r) && !is_full(r))
        .map(|(&r, &w)| (original as f64 / w, (1.0 / r - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    let solved = match between.as_slice() {
        [] => {
            // No frequency between the thresholds: put them around the step.
            let first_full = divisors.iter().zip(&wavelen).find(|&(&r, _)| is_full(r)).map_or(1.0, |(_, &w)| w);
            let low = original as f64 / first_full;
            let high = divisors
                .iter()
                .zip(&wavelen)
                .filter(|&(&r, _)| is_one(r))
                .map(|(_, &w)| original as f64 / w * (1.0 - 1e-9))
                .fold(4.0 * low, f64::min);
            (low, high)
        }
        // One frequency: assume Llama 3's ratio high = 4 low.
        [(y, s)] => (y / (1.0 + 3.0 * s), 4.0 * y / (1.0 + 3.0 * s)),
        [(ya, sa), .., (yb, sb)] => {
            let span = (yb - ya) / (sb - sa);
            (ya - sa * span, ya - sa * span + span)
        }
    };
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let candidates =
        [(1.0, 4.0, round(factor)), (round(solved.0), round(solved.1), round(factor)), (solved.0, solved.1, factor)];
    for (low_freq_factor, high_freq_factor, factor) in candidates {
        let scaling = RopeScaling {
            rope_type: "llama3".into(),
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: original,
        };
        let scaled = LlamaConfig { rope_scaling: Some(scaling.clone()), ..cfg.clone() }.inv_freq();
        let fits = unscaled.iter().zip(&scaled).zip(divisors).all(|((u, s), r)| ((u / s) - r).abs() <= TOL * r);
        if fits {
            return Ok(Some(scaling));
        }
    }
    Err(m.err(
        KEY,
        format!(
            "the RoPE frequency divisors (largest {factor}) match no llama3 scaling with original context {original}; \
             expected 1 for high frequencies, the factor for low ones and llama3's interpolation between"
        ),
    ))
}

fn gemma_config(m: &Meta) -> Result<GemmaConfig> {
    let d = dims(m)?;
    let (gemma2, gemma3) = (m.arch == "gemma2", m.arch == "gemma3");
    if m.tensor_dims("output.weight").is_some() {
        return Err(m.err(
            "output.weight",
            "Gemma ties lm_head to `token_embd.weight`; a separate output matrix is not supported (expected none)",
        ));
    }
    let rope_scaling = match rope_scaling_type(m)? {
        None => None,
        Some(t) if t == "linear" && gemma3 => Some(RopeScaling {
            rope_type: "linear".into(),
            factor: m.req("rope.scaling.factor", "the linear RoPE scaling factor (a number)", as_float)?,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: LLAMA3_ORIGINAL_CONTEXT,
        }),
        Some(t) => {
            let expected = if gemma3 { "`none` or `linear`" } else { "`none`" };
            return Err(m.err(
                &m.key("rope.scaling.type"),
                format!("`{t}` is not supported for `{}` (expected {expected})", m.arch),
            ));
        }
    };
    let sliding_window =
        if gemma2 || gemma3 { Some(m.uint("attention.sliding_window", "the sliding window width")?) } else { None };
    let (mut pattern, mut layer_types) = (None, None);
    let pattern_key = m.key("attention.sliding_window_pattern");
    match m.content.metadata.get(&pattern_key) {
        None => pattern = gemma3.then_some(6),
        Some(Value::Array(flags)) => {
            let types = flags
                .iter()
                .map(|f| match f {
                    Value::Bool(true) => Some("sliding_attention".to_string()),
                    Value::Bool(false) => Some("full_attention".to_string()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| m.err(&pattern_key, "expected a period (an unsigned integer) or one bool per layer"))?;
            layer_types = Some(types);
        }
        Some(v) => {
            pattern = Some(as_uint(v).ok_or_else(|| {
                m.err(
                    &pattern_key,
                    format!("is {}, expected a period (an unsigned integer) or one bool per layer", describe(v)),
                )
            })?);
        }
    }
    // llama.cpp's assumption: the 27B models scale queries by hidden / heads, the others by head_dim.
    let big = (gemma2 && d.layers == 46) || (gemma3 && d.layers == 62);
    let query_pre_attn_scalar =
        (gemma2 || gemma3).then(|| if big { (d.hidden / d.heads.max(1)) as f64 } else { d.head_dim as f64 });
    let softcap = |name: &str, gemma2_default: f64| -> Result<Option<f64>> {
        Ok(m.opt_float(name, "a soft-capping threshold")?.or(gemma2.then_some(gemma2_default)))
    };
    Ok(GemmaConfig {
        head_dim: d.head_dim,
        rms_norm_eps: d.eps,
        rope_theta: d.rope_theta.unwrap_or(if gemma3 { 1_000_000.0 } else { 10_000.0 }),
        max_position_embeddings: d.context,
        hidden_act: None,
        hidden_activation: Some("gelu_pytorch_tanh".into()),
        attention_bias: false,
        model_type: Some(if gemma3 { "gemma3_text".into() } else { m.arch.into() }),
        final_logit_softcapping: softcap("final_logit_softcapping", 30.0)?,
        attn_logit_softcapping: softcap("attn_logit_softcapping", 50.0)?,
        query_pre_attn_scalar,
        sliding_window,
        sliding_window_pattern: pattern,
        rope_local_base_freq: if gemma3 {
            Some(m.opt_float("rope.freq_base_swa", "the RoPE base of the sliding layers")?.unwrap_or(10_000.0))
        } else {
            None
        },
        rope_scaling,
        layer_types,
        use_bidirectional_attention: None,
        // The sizes; every other field is set above.
        ..GemmaConfig::tiny(d.vocab, d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads)
    })
}
