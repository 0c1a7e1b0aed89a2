//! Llama-family configuration, read from a Hugging Face `config.json`: Llama itself and the
//! Qwen2 / Qwen3 dense models, which are Llama with attention biases (Qwen2) or per-head q/k
//! RMSNorm (Qwen3) and are told apart by `model_type`.
//!
//! Fields this crate does not use (`architectures`, `torch_dtype`, ...) are ignored; fields that
//! would change the computation and are not supported (`attention_bias = true` on Llama, another
//! `hidden_act`, an unknown `rope_scaling` type, `use_sliding_window = true`) are rejected by
//! [`LlamaConfig::validate`].

use serde::{Deserialize, Serialize};

use crate::family::{FamilyConfig, GgufLayout};
use crate::llama::{LlamaLike, StackSpec};
use crate::{ModelError, Result};

/// Llama 3.1/3.2 frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"llama3"` (or `"default"`, meaning no scaling).
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Scaling factor for low frequencies.
    #[serde(default = "one")]
    pub factor: f64,
    /// Low-frequency factor.
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// High-frequency factor.
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// Context length the model was pretrained with.
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    4096
}

/// transformers' `Qwen3Config` default `head_dim` (Qwen3 does not derive it from the width).
const QWEN3_DEFAULT_HEAD_DIM: usize = 128;

/// A Llama-architecture config (Llama 2/3/3.1/3.2, SmolLM2, TinyLlama...), also the config of
/// Qwen2 / Qwen2.5 (`model_type = "qwen2"`) and Qwen3 dense (`model_type = "qwen3"`) models, which
/// the [`crate::Llama`] model runs with the differences [`Self::qkv_bias`], [`Self::o_bias`] and
/// [`Self::qk_norm`] name. Serialised back with its `model_type`, so a saved Qwen checkpoint is a
/// Qwen checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads` (Qwen3: required in code,
    /// 128 when a `config.json` leaves it out, as in transformers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Optional RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest position the RoPE tables cover.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Bias in the q/k/v/o projections: supported for Qwen3 only (Llama: only `false`). Qwen2
    /// ignores it, as transformers does: its q/k/v projections always have a bias, o_proj never.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias in MLP projections; only `false` is supported.
    #[serde(default)]
    pub mlp_bias: bool,
    /// `llama` (or absent), `qwen2` or `qwen3`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Qwen: sliding-window attention; only `false` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen: the window `use_sliding_window` would use; kept for the round trip, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen: the first layer `use_sliding_window` would window; kept for the round trip, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Per layer attention type (transformers 5); only `full_attention` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
}

impl LlamaConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether this is a Qwen2 / Qwen2.5 config (`model_type = "qwen2"`).
    pub fn is_qwen2(&self) -> bool {
        self.model_type.as_deref() == Some("qwen2")
    }

    /// Whether this is a Qwen3 (dense) config (`model_type = "qwen3"`).
    pub fn is_qwen3(&self) -> bool {
        self.model_type.as_deref() == Some("qwen3")
    }

    /// Whether q/k/v_proj carry a bias (`y = x W^T + b`): always for Qwen2, with
    /// `attention_bias` for Qwen3.
    pub fn qkv_bias(&self) -> bool {
        self.is_qwen2() || (self.is_qwen3() && self.attention_bias)
    }

    /// Whether o_proj carries a bias: Qwen3 with `attention_bias` (never for Qwen2).
    pub fn o_bias(&self) -> bool {
        self.is_qwen3() && self.attention_bias
    }

    /// Whether every query and key head is RMS-normalised over `head_dim` (weights `q_norm`,
    /// `k_norm` of shape `[head_dim]`) after the projection and before RoPE: Qwen3.
    pub fn qk_norm(&self) -> bool {
        self.is_qwen3()
    }

    /// Whether attention is plain Llama attention (no biases, no q/k norm), which the fused
    /// attention block of [`crate::fused`] computes.
    pub fn plain_attention(&self) -> bool {
        !(self.qkv_bias() || self.o_bias() || self.qk_norm())
    }

    /// Parses `config.json` text; `file` names it in errors. Reads both the classic layout
    /// (`rope_theta`, `rope_scaling`) and the one transformers 5 writes (`rope_parameters`).
    /// Fields a Qwen `config.json` leaves out take transformers' Qwen defaults (`rms_norm_eps`
    /// 1e-6, `max_position_embeddings` 32768; Qwen3 `head_dim` 128).
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let mut value = parse_json(text, file)?;
        let rope_parameters = value.get("rope_parameters").is_some_and(|p| !p.is_null());
        lift_rope_parameters(&mut value, file, false)?;
        if let Some(obj) = value.as_object_mut() {
            let model_type = obj.get("model_type").and_then(|t| t.as_str()).unwrap_or("llama").to_string();
            let mut defaults = Vec::new();
            if matches!(model_type.as_str(), "qwen2" | "qwen3") {
                defaults.extend([("rms_norm_eps", serde_json::json!(1e-6)), ("max_position_embeddings", 32768.into())]);
            }
            if model_type == "qwen3" {
                defaults.push(("head_dim", QWEN3_DEFAULT_HEAD_DIM.into()));
            }
            for (key, v) in defaults {
                obj.entry(key).or_insert(v);
            }
        }
        let cfg: Self = serde_json::from_value(value).map_err(|e| ModelError::Config {
            file: file.into(),
            field: "(json)",
            reason: e.to_string(),
        })?;
        match cfg.validate(file) {
            // The scaling came from `rope_parameters`: name the field the file has.
            Err(ModelError::Config { file, field: "rope_scaling", reason }) if rope_parameters => {
                Err(ModelError::Config { file, field: "rope_parameters", reason })
            }
            other => other.map(|()| cfg),
        }
    }

    /// Rejects unsupported or inconsistent values.
    pub fn validate(&self, file: &str) -> Result<()> {
        let err = |field: &'static str, reason: String| Err(ModelError::Config { file: file.into(), field, reason });
        if let Some(t) = self.model_type.as_deref().filter(|t| !matches!(*t, "llama" | "qwen2" | "qwen3")) {
            return err(
                "model_type",
                format!("`{t}` is not a Llama-architecture model (expected `llama`, `qwen2` or `qwen3`)"),
            );
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ] {
            if v == 0 {
                return err(field, "must be at least 1".into());
            }
        }
        if self.kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return err(
                "num_key_value_heads",
                format!("{} must divide num_attention_heads = {}", self.kv_heads(), self.num_attention_heads),
            );
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return err("head_dim", format!("{} must be even and positive (RoPE rotates pairs)", self.head_dim()));
        }
        if self.hidden_act != "silu" {
            return err("hidden_act", format!("`{}` is not supported (expected `silu`)", self.hidden_act));
        }
        if self.is_qwen3() && self.head_dim.is_none() {
            return err(
                "head_dim",
                "Qwen3 configs name it (transformers' default is 128, not hidden_size / num_attention_heads)".into(),
            );
        }
        if self.attention_bias && !(self.is_qwen2() || self.is_qwen3()) {
            return err("attention_bias", "biased projections are supported for `qwen2` and `qwen3` only".into());
        }
        if self.mlp_bias {
            return err("mlp_bias", "biased MLP projections are not supported".into());
        }
        if self.use_sliding_window == Some(true) {
            return err("use_sliding_window", "sliding-window attention is not supported (expected false)".into());
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return err(
                    "layer_types",
                    format!("{} entries for num_hidden_layers = {}", types.len(), self.num_hidden_layers),
                );
            }
            if let Some(t) = types.iter().find(|t| *t != "full_attention") {
                return err("layer_types", format!("`{t}` is not supported (expected `full_attention`)"));
            }
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| s.rope_type != "llama3" && s.rope_type != "default") {
            return err("rope_scaling", format!("type `{}` is not supported (expected `llama3`)", s.rope_type));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return err("rms_norm_eps", "rms_norm_eps and rope_theta must be > 0".into());
        }
        Ok(())
    }

    /// RoPE inverse frequencies `theta^(-2i/d)`, with Llama 3 scaling applied if configured.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim();
        let base: Vec<f64> = (0..d).step_by(2).map(|i| 1.0 / self.rope_theta.powf(i as f64 / d as f64)).collect();
        match &self.rope_scaling {
            Some(s) if s.rope_type == "llama3" => {
                let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings as f64 / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * freq / s.factor + smooth * freq
                        }
                    })
                    .collect()
            }
            _ => base,
        }
    }

    /// The reference workload's model (issue 7): vocab 512, hidden 256, intermediate 688,
    /// 4 layers, 8 heads, 4 key/value heads, untied embeddings.
    pub fn bench_reference() -> Self {
        Self::tiny(512, 256, 688, 4, 8, 4)
    }

    /// A small config for tests and the embedded task.
    pub fn tiny(
        vocab: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            model_type: Some("llama".into()),
            use_sliding_window: None,
            sliding_window: None,
            max_window_layers: None,
            layer_types: None,
        }
    }

    /// A small Qwen2 config: [`Self::tiny`] with `model_type = "qwen2"` (biased q/k/v), RoPE base
    /// 1,000,000 and eps 1e-6, as in the released models.
    pub fn tiny_qwen2(
        vocab: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        Self {
            model_type: Some("qwen2".into()),
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            use_sliding_window: Some(false),
            ..Self::tiny(vocab, hidden, intermediate, layers, heads, kv_heads)
        }
    }

    /// A small Qwen3 config: [`Self::tiny_qwen2`] with `model_type = "qwen3"` (q/k norm, no
    /// biases) and an explicit `head_dim`.
    pub fn tiny_qwen3(
        vocab: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            model_type: Some("qwen3".into()),
            head_dim: Some(head_dim),
            ..Self::tiny_qwen2(vocab, hidden, intermediate, layers, heads, kv_heads)
        }
    }
}

impl FamilyConfig for LlamaConfig {
    fn from_json(text: &str, file: &str) -> Result<Self> {
        LlamaConfig::from_json(text, file)
    }

    fn validate(&self, file: &str) -> Result<()> {
        LlamaConfig::validate(self, file)
    }

    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.stack_spec().weight_shapes()
    }

    fn model_type(&self) -> &str {
        self.model_type.as_deref().unwrap_or("llama")
    }

    fn architecture(&self) -> &'static str {
        match FamilyConfig::model_type(self) {
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => "LlamaForCausalLM",
        }
    }

    fn complete_hf_json(&self, obj: &mut serde_json::Map<String, serde_json::Value>) {
        obj.insert("num_key_value_heads".into(), self.kv_heads().into());
        obj.insert("head_dim".into(), self.head_dim().into());
        if self.is_qwen2() || self.is_qwen3() {
            obj.entry("use_sliding_window").or_insert(false.into());
            // Every layer attends fully (sliding windows are rejected when read).
            obj.entry("layer_types").or_insert(vec!["full_attention"; self.num_hidden_layers].into());
        }
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    fn layer_windows(&self) -> Vec<Option<usize>> {
        vec![None; self.num_hidden_layers]
    }

    fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }

    /// llama.cpp permutes a Llama's q/k rows for its interleaved RoPE; Qwen's are left as they are.
    fn gguf_layout(&self) -> GgufLayout {
        let permuted = !(self.is_qwen2() || self.is_qwen3());
        GgufLayout {
            permuted_qk: permuted.then(|| (self.num_attention_heads, self.kv_heads())),
            ..GgufLayout::default()
        }
    }
}

impl LlamaLike for LlamaConfig {
    fn stack_spec(&self) -> StackSpec {
        StackSpec {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            eps: self.rms_norm_eps,
            inv_freq: self.inv_freq(),
            max_positions: self.max_position_embeddings,
            tied: self.tie_word_embeddings,
            qkv_bias: self.qkv_bias(),
            o_bias: self.o_bias(),
            qk_norm: self.qk_norm(),
            window: None,
        }
    }
}

/// Serialises an `f64` that is a whole number as a JSON integer, any other value as a float:
/// for fields transformers or PEFT type as `int` (their strict config classes reject `256.0`).
pub(crate) fn whole_as_int<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 { s.serialize_i64(*v as i64) } else { s.serialize_f64(*v) }
}

/// [`whole_as_int`] for an optional field (`None` is `null`).
pub(crate) fn opt_whole_as_int<S: serde::Serializer>(v: &Option<f64>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(v) => whole_as_int(v, s),
        None => s.serialize_none(),
    }
}

/// `config.json` text as a JSON value (an error naming `file` if it is not JSON).
pub(crate) fn parse_json(text: &str, file: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| ModelError::Config {
        file: file.into(),
        field: "(json)",
        reason: e.to_string(),
    })
}

/// Rewrites transformers 5's `rope_parameters` into the classic fields this crate's configs hold:
/// `{rope_type, rope_theta, factor, ...}` becomes `rope_theta` plus `rope_scaling` (unless the
/// type is `default`). With `per_layer_type` (Gemma 3), `{full_attention: {...},
/// sliding_attention: {...}}` becomes the global `rope_theta` / `rope_scaling` and
/// `rope_local_base_freq`; a scaled local RoPE is rejected. `rope_parameters` overrides the
/// classic fields when both are present (as in transformers 5).
pub(crate) fn lift_rope_parameters(value: &mut serde_json::Value, file: &str, per_layer_type: bool) -> Result<()> {
    use serde_json::Value;
    let err = |reason: String| ModelError::Config { file: file.into(), field: "rope_parameters", reason };
    let Some(obj) = value.as_object_mut() else { return Ok(()) };
    let Some(params) = obj.remove("rope_parameters") else { return Ok(()) };
    if params.is_null() {
        return Ok(());
    }
    let Value::Object(params) = params else { return Err(err("must be an object".into())) };
    let kind = |p: &serde_json::Map<String, Value>| -> String {
        p.get("rope_type").or_else(|| p.get("type")).and_then(|t| t.as_str()).unwrap_or("default").to_string()
    };
    let apply = |p: &serde_json::Map<String, Value>, obj: &mut serde_json::Map<String, Value>| {
        if let Some(theta) = p.get("rope_theta") {
            obj.insert("rope_theta".into(), theta.clone());
        }
        if kind(p) == "default" {
            obj.remove("rope_scaling");
        } else {
            let mut scaling = p.clone();
            scaling.remove("rope_theta");
            scaling.insert("rope_type".into(), Value::String(kind(p)));
            scaling.remove("type");
            obj.insert("rope_scaling".into(), Value::Object(scaling));
        }
    };
    let nested = params.contains_key("full_attention") || params.contains_key("sliding_attention");
    if !nested {
        apply(&params, obj);
        return Ok(());
    }
    if !per_layer_type {
        return Err(err("per-layer-type RoPE parameters are only supported for Gemma 3".into()));
    }
    if let Some(Value::Object(full)) = params.get("full_attention") {
        apply(full, obj);
    }
    if let Some(Value::Object(local)) = params.get("sliding_attention") {
        if kind(local) != "default" {
            return Err(err(format!(
                "sliding_attention: type `{}` is not supported (expected `default`)",
                kind(local)
            )));
        }
        if let Some(theta) = local.get("rope_theta") {
            obj.insert("rope_local_base_freq".into(), theta.clone());
        }
    }
    Ok(())
}
