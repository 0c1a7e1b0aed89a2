//! Mistral (Jiang et al. 2023, "Mistral 7B"), as transformers' `MistralForCausalLM`: Llama's
//! layers (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases) with sliding-window
//! attention on every layer: query `i` sees key `j` iff `j <= i` and `i - j < sliding_window`
//! (`sliding_window = null`: full causal attention). The model is [`LlamaStack`] over
//! [`MistralConfig`], so it runs the fused blocks on f32 CPU (the window in the attention
//! kernel's [`crate::fused::AttentionSpec`]), the composed reference elsewhere, and decodes with
//! a [`crate::KvCache`] that keeps each layer's last `sliding_window` positions.

use serde::{Deserialize, Serialize};

use crate::config::{lift_rope_parameters, parse_json};
use crate::decoder::Decoder;
use crate::family::{FamilyConfig, GgufLayout};
use crate::llama::{LlamaLike, LlamaStack, StackSpec};
use crate::{ModelError, Result};

/// A Mistral model (see [`Decoder`] for its methods).
pub type Mistral = Decoder<LlamaStack<MistralConfig>>;

fn default_kv_heads() -> usize {
    8
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096 * 32
}
fn default_act() -> String {
    "silu".into()
}
fn default_window() -> Option<usize> {
    Some(4096)
}

/// A Mistral config (`model_type = "mistral"`), read from a Hugging Face `config.json`; absent
/// fields take transformers' `MistralConfig` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MistralConfig {
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
    /// Key/value heads (GQA; transformers' default 8).
    #[serde(default = "default_kv_heads")]
    pub num_key_value_heads: usize,
    /// Per-head width; `hidden_size / num_attention_heads` when absent (Mistral Nemo names 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 5 writes it inside `rope_parameters`).
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest position the RoPE tables cover.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// MLP activation; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// The window of every layer (4096 when absent; `null`: full causal attention).
    #[serde(default = "default_window")]
    pub sliding_window: Option<usize>,
    /// `mistral` (or absent).
    #[serde(default)]
    pub model_type: Option<String>,
}

impl MistralConfig {
    /// A small config for tests: `head_dim = hidden / heads`, eps 1e-6, RoPE base 10,000,
    /// sliding window 4, untied embeddings.
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
            num_key_value_heads: kv_heads,
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
            sliding_window: Some(4),
            model_type: Some("mistral".into()),
        }
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

impl FamilyConfig for MistralConfig {
    /// Reads the classic layout (`rope_theta`) and transformers 5's (`rope_parameters`); a RoPE
    /// scaling other than `default` is rejected.
    fn from_json(text: &str, file: &str) -> Result<Self> {
        let err = |field: &'static str, reason: String| ModelError::Config { file: file.into(), field, reason };
        let mut value = parse_json(text, file)?;
        let rope_parameters = value.get("rope_parameters").is_some_and(|p| !p.is_null());
        lift_rope_parameters(&mut value, file, false)?;
        if let Some(scaling) = value.get("rope_scaling").filter(|s| !s.is_null()) {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str());
            if kind != Some("default") {
                let field = if rope_parameters { "rope_parameters" } else { "rope_scaling" };
                return Err(err(field, format!("type {kind:?} is not supported for Mistral (expected `default`)")));
            }
        }
        let cfg: Self = serde_json::from_value(value).map_err(|e| err("(json)", e.to_string()))?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let err = |field: &'static str, reason: String| Err(ModelError::Config { file: file.into(), field, reason });
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "mistral") {
            return err("model_type", format!("`{t}` is not a Mistral model (expected `mistral`)"));
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
        let kv = self.num_key_value_heads;
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return err(
                "num_key_value_heads",
                format!("{kv} must divide num_attention_heads = {}", self.num_attention_heads),
            );
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return err("head_dim", format!("{} must be even and positive (RoPE rotates pairs)", self.head_dim()));
        }
        if self.hidden_act != "silu" {
            return err("hidden_act", format!("`{}` is not supported (expected `silu`)", self.hidden_act));
        }
        if self.sliding_window == Some(0) {
            return err("sliding_window", "must be at least 1 (or null for full attention)".into());
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return err("rms_norm_eps", format!("{} must be > 0", self.rms_norm_eps));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return err("rope_theta", format!("{} must be > 0", self.rope_theta));
        }
        Ok(())
    }

    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.stack_spec().weight_shapes()
    }

    fn model_type(&self) -> &str {
        "mistral"
    }

    fn architecture(&self) -> &'static str {
        "MistralForCausalLM"
    }

    fn complete_hf_json(&self, obj: &mut serde_json::Map<String, serde_json::Value>) {
        obj.insert("head_dim".into(), self.head_dim().into());
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    fn layer_windows(&self) -> Vec<Option<usize>> {
        vec![self.sliding_window; self.num_hidden_layers]
    }

    fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }

    /// llama.cpp converts Mistral as a Llama: q/k rows permuted per head.
    fn gguf_layout(&self) -> GgufLayout {
        GgufLayout { permuted_qk: Some((self.num_attention_heads, self.num_key_value_heads)), ..GgufLayout::default() }
    }
}

impl LlamaLike for MistralConfig {
    fn stack_spec(&self) -> StackSpec {
        let (hd, theta) = (self.head_dim(), self.rope_theta);
        StackSpec {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: hd,
            eps: self.rms_norm_eps,
            // RoPE `theta^(-2i/d)`, unscaled.
            inv_freq: (0..hd).step_by(2).map(|i| 1.0 / theta.powf(i as f64 / hd as f64)).collect(),
            max_positions: self.max_position_embeddings,
            tied: self.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            window: self.sliding_window,
        }
    }
}
