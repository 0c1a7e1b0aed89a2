//! Trainable Gemma 1 (Gemma Team 2024, "Gemma: Open Models Based on Gemini Research and
//! Technology"): a Llama-like pre-norm decoder with three differences, all following Hugging Face
//! transformers' `GemmaForCausalLM`:
//! - embeddings are scaled by `sqrt(hidden_size)` before the first layer (not the tied lm_head);
//! - RMSNorm multiplies by `(1 + weight)` (checkpoints store the offset from 1);
//! - the MLP is GeGLU, `down(gelu_tanh(gate(x)) * up(x))`;
//!
//! and `lm_head` is always tied to the embedding matrix, `head_dim` is explicit (256 in the real
//! models, not `hidden / heads`). Weight names match Hugging Face checkpoints.
//!
//! Gemma 2 (`model_type = "gemma2"`, Gemma Team 2024, "Gemma 2: Improving Open Language Models at
//! a Practical Size") adds, as in transformers' `Gemma2ForCausalLM`:
//! - sandwich norms: `x + post_attention_norm(attn(input_norm(x)))`, then
//!   `x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))`;
//! - attention scale `query_pre_attn_scalar^-1/2` (candle-transformers uses `head_dim^-1/2`);
//! - soft-capping `cap * tanh(s / cap)` of attention scores (before the mask) and final logits;
//! - sliding-window attention on even layers (0, 2, ...): query `i` sees key `j` iff
//!   `i - j < sliding_window` (candle-transformers windows every layer, with `<=`).
//!
//! Gemma 3 text (`model_type = "gemma3_text"`, Gemma Team 2025, "Gemma 3 Technical Report") keeps
//! Gemma 2's sandwich norms and `query_pre_attn_scalar` (which candle-transformers ignores) and adds:
//! - QK-norm: Gemma RMSNorm over `head_dim` of every query and key head, before RoPE;
//! - local layers (all but every `sliding_window_pattern`-th, i.e. global iff
//!   `(layer + 1) % pattern == 0`) with a sliding window and RoPE base `rope_local_base_freq`;
//!   global layers use `rope_theta` with optional linear `rope_scaling` (`inv_freq / factor`).
//!
//! On f32 CPU (with the tanh GELU) every layer runs as two fused ops with real backward passes,
//! as Llama's: [`fused::attention_block`] and [`fused::mlp_block_with`] (see
//! [`GemmaLayers::hidden_fused`]), so Gemma gets packed preference pairs
//! ([`Decoder::forward_hidden_branched`]), gradient checkpointing and the activation meter;
//! [`Decoder::forward_hidden_reference`] keeps the composed forward pass as the reference.

use std::sync::Arc;

use candle_core::{D, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::config::RopeScaling;
use crate::decoder::Decoder;
use crate::family::{Family, FamilyConfig, FusedInput, GgufLayout, fused_layers};
use crate::fused::{self, AttentionExtras, AttentionSpec, Glu, MlpExtras};
use crate::generation::{self, KvCache};
use crate::llama::window_mask;
use crate::lora::{Adapters, Proj};
use crate::ops::{repeat_kv, rms_norm, rope, rope_tables};
use crate::{ModelError, Result};

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    8192
}

/// A Gemma 1 config (`model_type = "gemma"`), read from a Hugging Face `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GemmaConfig {
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
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Per-head width (explicit in Gemma configs).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Longest position the RoPE tables cover.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Ignored, as transformers ignores it for Gemma (older configs say `gelu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// MLP activation: `gelu_pytorch_tanh` (the default, as in transformers) or `gelu` (erf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Bias in attention projections; only `false` is supported.
    #[serde(default)]
    pub attention_bias: bool,
    /// `model_type`: `gemma` (or absent) for Gemma 1, `gemma2` for Gemma 2.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Gemma 2: final logits become `cap * tanh(logits / cap)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2: attention scores become `cap * tanh(scores / cap)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: attention scale is `query_pre_attn_scalar^-1/2` (default `head_dim`). Written as
    /// an integer when whole (transformers types it `int`).
    #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "crate::config::opt_whole_as_int")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2 / 3: window of the sliding (local) layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Gemma 3: every `sliding_window_pattern`-th layer is global (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: RoPE base of the local layers (default 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: RoPE scaling of the global layers; only `linear` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Per layer `sliding_attention` or `full_attention` (transformers 4.53+); when given, it decides
    /// which layers are sliding instead of the Gemma 2 even-layer rule / Gemma 3 pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3: bidirectional (non-causal) attention; only `false` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
}

impl GemmaConfig {
    /// A small config for tests: `head_dim = hidden / heads`, eps 1e-6, theta 10,000.
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
            head_dim: hidden / heads.max(1),
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 2048,
            hidden_act: None,
            hidden_activation: Some("gelu_pytorch_tanh".into()),
            attention_bias: false,
            model_type: Some("gemma".into()),
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            query_pre_attn_scalar: None,
            sliding_window: None,
            sliding_window_pattern: None,
            rope_local_base_freq: None,
            rope_scaling: None,
            layer_types: None,
            use_bidirectional_attention: None,
        }
    }

    /// A small Gemma 3 text config: [`GemmaConfig::tiny`] plus `query_pre_attn_scalar = head_dim`,
    /// sliding window 4, pattern 2 (layers 0, 2, ... local; 1, 3, ... global), global RoPE base
    /// 1,000,000, local base 10,000.
    pub fn tiny3(
        vocab: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let base = Self::tiny(vocab, hidden, intermediate, layers, heads, kv_heads);
        Self {
            model_type: Some("gemma3_text".into()),
            query_pre_attn_scalar: Some(base.head_dim as f64),
            sliding_window: Some(4),
            sliding_window_pattern: Some(2),
            rope_theta: 1_000_000.0,
            rope_local_base_freq: Some(10_000.0),
            ..base
        }
    }

    /// Whether this is a Gemma 3 text config.
    pub fn is_gemma3(&self) -> bool {
        self.model_type.as_deref() == Some("gemma3_text")
    }

    /// Gemma 2 and 3 have sandwich norms (pre/post attention and feed-forward).
    fn sandwich(&self) -> bool {
        self.is_gemma2() || self.is_gemma3()
    }

    /// A small Gemma 2 config: [`GemmaConfig::tiny`] plus soft-capping (attention 50, final 30, as
    /// in the released models), `query_pre_attn_scalar = head_dim` and a sliding window of 4.
    pub fn tiny2(
        vocab: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let base = Self::tiny(vocab, hidden, intermediate, layers, heads, kv_heads);
        Self {
            model_type: Some("gemma2".into()),
            final_logit_softcapping: Some(30.0),
            attn_logit_softcapping: Some(50.0),
            query_pre_attn_scalar: Some(base.head_dim as f64),
            sliding_window: Some(4),
            ..base
        }
    }

    /// Whether this is a Gemma 2 config.
    pub fn is_gemma2(&self) -> bool {
        self.model_type.as_deref() == Some("gemma2")
    }

    /// Whether layer `layer` uses sliding-window attention (Gemma 2's even layers; Gemma 3's
    /// local layers, all but every `sliding_window_pattern`-th).
    pub fn is_sliding(&self, layer: usize) -> bool {
        if self.sliding_window.is_none() {
            return false;
        }
        if let Some(types) = &self.layer_types {
            return types.get(layer).is_some_and(|t| t == "sliding_attention");
        }
        if self.is_gemma3() {
            return !(layer + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(6).max(1));
        }
        self.is_gemma2() && layer.is_multiple_of(2)
    }

    /// Parses `config.json` text; `file` names it in errors. Reads both layouts: the classic one
    /// (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) and the one
    /// transformers 5 writes (`rope_parameters`, per layer type for Gemma 3;
    /// `_sliding_window_pattern`; `layer_types`).
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let mut value = crate::config::parse_json(text, file)?;
        crate::config::lift_rope_parameters(&mut value, file, true)?;
        if let Some(obj) = value.as_object_mut()
            && !obj.contains_key("sliding_window_pattern")
            && obj.get("model_type").and_then(|t| t.as_str()) == Some("gemma3_text")
            && let Some(p) = obj.remove("_sliding_window_pattern")
        {
            obj.insert("sliding_window_pattern".into(), p);
        }
        let cfg: Self = serde_json::from_value(value).map_err(|e| ModelError::Config {
            file: file.into(),
            field: "(json)",
            reason: e.to_string(),
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn activation(&self) -> &str {
        self.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh")
    }

    /// Rejects unsupported or inconsistent values.
    pub fn validate(&self, file: &str) -> Result<()> {
        let err = |field: &'static str, reason: String| Err(ModelError::Config { file: file.into(), field, reason });
        if let Some(t) = self.model_type.as_deref().filter(|t| !matches!(*t, "gemma" | "gemma2" | "gemma3_text")) {
            return err("model_type", format!("`{t}` is not supported (expected `gemma`, `gemma2` or `gemma3_text`)"));
        }
        if !self.is_gemma3()
            && (self.rope_scaling.is_some()
                || self.rope_local_base_freq.is_some()
                || self.sliding_window_pattern.is_some())
        {
            return err(
                "model_type",
                "rope_scaling, rope_local_base_freq and sliding_window_pattern need `gemma3_text`".into(),
            );
        }
        if let Some(r) = self.rope_scaling.as_ref().filter(|r| r.rope_type != "linear" && r.rope_type != "default") {
            return err(
                "rope_scaling",
                format!("type `{}` is not supported for Gemma 3 (expected `linear`)", r.rope_type),
            );
        }
        if self.rope_scaling.as_ref().is_some_and(|r| r.factor.is_nan() || r.factor <= 0.0)
            || self.sliding_window_pattern == Some(0)
        {
            return err("rope_scaling", "factor and sliding_window_pattern must be > 0".into());
        }
        if !self.sandwich()
            && (self.final_logit_softcapping.is_some()
                || self.attn_logit_softcapping.is_some()
                || self.sliding_window.is_some())
        {
            return err("model_type", "soft-capping and sliding windows need `gemma2`".into());
        }
        for (field, v) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
        ] {
            if v.is_some_and(|v| v.is_nan() || v <= 0.0) {
                return err(field, "must be > 0".into());
            }
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return err(
                    "layer_types",
                    format!("{} entries for num_hidden_layers = {}", types.len(), self.num_hidden_layers),
                );
            }
            if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "sliding_attention" | "full_attention")) {
                return err("layer_types", format!("`{t}` is not `sliding_attention` or `full_attention`"));
            }
            if types.iter().any(|t| t == "sliding_attention") && !self.sandwich() {
                return err("layer_types", "sliding layers need `gemma2` or `gemma3_text`".into());
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return err("use_bidirectional_attention", "only causal attention (false) is supported".into());
        }
        if self.sliding_window == Some(0) {
            return err("sliding_window", "must be at least 1".into());
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
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return err(
                "num_key_value_heads",
                format!("{} must divide num_attention_heads = {}", self.num_key_value_heads, self.num_attention_heads),
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return err("head_dim", format!("{} must be even and positive (RoPE rotates pairs)", self.head_dim));
        }
        if !matches!(self.activation(), "gelu_pytorch_tanh" | "gelu") {
            return err(
                "hidden_activation",
                format!("`{}` is not supported (expected `gelu_pytorch_tanh` or `gelu`)", self.activation()),
            );
        }
        if self.attention_bias {
            return err("attention_bias", "biased projections are not supported".into());
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return err("rms_norm_eps", "rms_norm_eps and rope_theta must be > 0".into());
        }
        Ok(())
    }

    /// RoPE inverse frequencies `theta^(-2i/d)` of the global layers (Gemma 3: divided by a
    /// linear `rope_scaling` factor).
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let factor = match &self.rope_scaling {
            Some(r) if r.rope_type == "linear" => r.factor,
            _ => 1.0,
        };
        (0..d).step_by(2).map(|i| 1.0 / self.rope_theta.powf(i as f64 / d as f64) / factor).collect()
    }

    /// RoPE inverse frequencies of the local layers (Gemma 3: base `rope_local_base_freq`,
    /// unscaled); the global ones otherwise.
    pub fn local_inv_freq(&self) -> Vec<f64> {
        if !self.is_gemma3() {
            return self.inv_freq();
        }
        let (d, base) = (self.head_dim, self.rope_local_base_freq.unwrap_or(10_000.0));
        (0..d).step_by(2).map(|i| 1.0 / base.powf(i as f64 / d as f64)).collect()
    }

    /// Every weight with its shape, Hugging Face names (no `lm_head`: it is tied).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, hd, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![self.num_attention_heads * hd, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![self.num_key_value_heads * hd, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![self.num_key_value_heads * hd, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, self.num_attention_heads * hd]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            ]);
            if self.sandwich() {
                out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![h]));
                out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![h]));
            }
            if self.is_gemma3() {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
        }
        out
    }
}

impl FamilyConfig for GemmaConfig {
    fn from_json(text: &str, file: &str) -> Result<Self> {
        GemmaConfig::from_json(text, file)
    }

    fn validate(&self, file: &str) -> Result<()> {
        GemmaConfig::validate(self, file)
    }

    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        GemmaConfig::weight_shapes(self)
    }

    fn model_type(&self) -> &str {
        self.model_type.as_deref().unwrap_or("gemma")
    }

    fn architecture(&self) -> &'static str {
        match FamilyConfig::model_type(self) {
            "gemma2" => "Gemma2ForCausalLM",
            "gemma3_text" => "Gemma3ForCausalLM",
            _ => "GemmaForCausalLM",
        }
    }

    fn complete_hf_json(&self, obj: &mut serde_json::Map<String, serde_json::Value>) {
        // transformers 5 reads Gemma 1's activation from `hidden_act`, Gemma 2 / 3's from
        // `hidden_activation`; both name the one this crate computes.
        let act = self.activation().to_string();
        if self.model_type.as_deref().is_none_or(|t| t == "gemma") {
            obj.insert("hidden_act".into(), act.clone().into());
        }
        obj.insert("hidden_activation".into(), act.into());
        // Gemma's lm_head is always the embedding matrix; attention is always causal.
        obj.insert("tie_word_embeddings".into(), true.into());
        if self.is_gemma3() {
            obj.entry("use_bidirectional_attention").or_insert(false.into());
        }
        // Which layers slide, spelled out, so no version's default rule can differ.
        if self.sandwich() && self.layer_types.is_none() {
            let types: Vec<&str> = (0..self.num_hidden_layers)
                .map(|l| if self.is_sliding(l) { "sliding_attention" } else { "full_attention" })
                .collect();
            obj.insert("layer_types".into(), types.into());
        }
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    fn layer_windows(&self) -> Vec<Option<usize>> {
        (0..self.num_hidden_layers).map(|l| if self.is_sliding(l) { self.sliding_window } else { None }).collect()
    }

    fn tied_embeddings(&self) -> bool {
        true
    }

    /// Norm weights are stored as the offset from 1.
    fn unit_norm(&self) -> f64 {
        0.0
    }

    /// llama.cpp stores every norm weight as `1 + w`; Gemma 2 / 3 name the sandwich norms.
    fn gguf_layout(&self) -> GgufLayout {
        GgufLayout { sandwich_norms: self.sandwich(), permuted_qk: None, norms_plus_one: true }
    }
}

struct Layer {
    input_norm: Tensor,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    post_norm: Tensor,
    /// Gemma 2's sandwich norms around the MLP.
    ff_norms: Option<(Tensor, Tensor)>,
    /// Gemma 3's QK-norm weights `[head_dim]`.
    qk_norms: Option<(Tensor, Tensor)>,
    gate: Proj,
    up: Proj,
    down: Proj,
}

/// A Gemma 1, 2 or 3 (text) model (see [`Decoder`] for its methods).
pub type Gemma = Decoder<GemmaLayers>;

/// The layers and weights of a Gemma 1, 2 or 3 (text) model.
pub struct GemmaLayers {
    cfg: GemmaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    inv_freq: Vec<f64>,
    local_inv_freq: Vec<f64>,
}

fn linear(vb: &VarBuilder, inp: usize, out: usize, name: &str, lora: Option<&Adapters>) -> Result<Proj> {
    Ok(Proj::new(vb.get((out, inp), &format!("{name}.weight"))?, name, lora))
}

/// Gemma's RMSNorm: `x / sqrt(mean(x^2) + eps) * (1 + weight)`.
fn gemma_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    rms_norm(x, &(weight + 1.0)?, eps)
}

impl Family for GemmaLayers {
    type Config = GemmaConfig;

    /// Every weight under Hugging Face names (no `lm_head`: it is the embedding matrix).
    fn build(cfg: &GemmaConfig, vb: VarBuilder, lora: Option<&Adapters>) -> Result<Self> {
        let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(Layer {
                    input_norm: vb.get(h, &format!("{p}.input_layernorm.weight"))?,
                    q: linear(&vb, h, nq * hd, &format!("{p}.self_attn.q_proj"), lora)?,
                    k: linear(&vb, h, nkv * hd, &format!("{p}.self_attn.k_proj"), lora)?,
                    v: linear(&vb, h, nkv * hd, &format!("{p}.self_attn.v_proj"), lora)?,
                    o: linear(&vb, nq * hd, h, &format!("{p}.self_attn.o_proj"), lora)?,
                    post_norm: vb.get(h, &format!("{p}.post_attention_layernorm.weight"))?,
                    qk_norms: if cfg.is_gemma3() {
                        Some((
                            vb.get(hd, &format!("{p}.self_attn.q_norm.weight"))?,
                            vb.get(hd, &format!("{p}.self_attn.k_norm.weight"))?,
                        ))
                    } else {
                        None
                    },
                    ff_norms: if cfg.sandwich() {
                        Some((
                            vb.get(h, &format!("{p}.pre_feedforward_layernorm.weight"))?,
                            vb.get(h, &format!("{p}.post_feedforward_layernorm.weight"))?,
                        ))
                    } else {
                        None
                    },
                    gate: linear(&vb, h, i, &format!("{p}.mlp.gate_proj"), lora)?,
                    up: linear(&vb, h, i, &format!("{p}.mlp.up_proj"), lora)?,
                    down: linear(&vb, i, h, &format!("{p}.mlp.down_proj"), lora)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embed: Embedding::new(vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?, h),
            layers,
            norm: vb.get(h, "model.norm.weight")?,
            inv_freq: cfg.inv_freq(),
            local_inv_freq: cfg.local_inv_freq(),
        })
    }

    fn config(&self) -> &GemmaConfig {
        &self.cfg
    }

    /// The (tied) output projection: the embedding matrix.
    fn lm_head(&self) -> &Tensor {
        self.embed.embeddings()
    }

    fn final_logit_softcapping(&self) -> Option<f64> {
        self.cfg.final_logit_softcapping
    }

    /// f32 CPU weights and the tanh GELU (`gelu_pytorch_tanh`, the default; the erf `gelu`
    /// keeps the composed path).
    fn fusable(&self) -> bool {
        fused::fusable(&[self.embed.embeddings(), &self.norm]) && self.cfg.activation() == "gelu_pytorch_tanh"
    }

    /// Per layer [`fused::attention_block`] (Gemma's `(1 + w)` norm weights passed as effective
    /// weights, the `query_pre_attn_scalar` scale, Gemma 2's score soft-capping, the local
    /// layers' sliding window and RoPE base in their [`AttentionSpec`], Gemma 3's QK-norm, Gemma
    /// 2/3's post-attention norm inside) and [`fused::mlp_block_with`] (GeGLU, Gemma 2/3's
    /// post-feedforward norm inside). A padding position, whose value nothing reads, may differ
    /// from the reference where a sliding window leaves its query no real key.
    fn hidden_fused(&self, input: FusedInput<'_>) -> Result<Tensor> {
        let FusedInput { input_ids, attention_mask, branches, keep, acts, meter } = input;
        let (batch, seq) =
            crate::ops::check_fused_input(input_ids, attention_mask, branches, self.cfg.max_position_embeddings)?;
        let (h, hd, eps) = (self.cfg.hidden_size, self.cfg.head_dim, self.cfg.rms_norm_eps);
        let scale = 1.0 / self.cfg.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt();
        let spec = |inv_freq: &[f64], window: Option<usize>| -> Result<Arc<AttentionSpec>> {
            let (nq, nkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
            let mut spec = AttentionSpec::new(batch, seq, nq, nkv, inv_freq, attention_mask)?
                .with_scale(scale)
                .with_softcap(self.cfg.attn_logit_softcapping)
                .with_window(window);
            if let Some(branches) = branches {
                spec = spec.with_branches(branches)?;
            }
            Ok(Arc::new(spec))
        };
        let global = spec(&self.inv_freq, None)?;
        let local = match (0..self.layers.len()).any(|l| self.cfg.is_sliding(l)) {
            true => Some(spec(&self.local_inv_freq, self.cfg.sliding_window)?),
            false => None,
        };
        let plus_one = |w: &Tensor| -> Result<Tensor> { Ok((w + 1.0)?) };
        let x = (self.embed.forward(input_ids)? * (h as f64).sqrt())?.reshape((batch * seq, h))?;
        // Gemma 2/3: the post-attention norm inside the attention block, the pre/post
        // feed-forward norms around the MLP; Gemma 1: `post_attention_layernorm` is the MLP's
        // pre-norm.
        let attention = |idx: usize, x: &Tensor| -> Result<Tensor> {
            let l = &self.layers[idx];
            let spec = match &local {
                Some(local) if self.cfg.is_sliding(idx) => local,
                _ => &global,
            };
            let qk_norm = match &l.qk_norms {
                Some((qn, kn)) => Some([plus_one(qn)?, plus_one(kn)?]),
                None => None,
            };
            let post_attention = match &l.ff_norms {
                Some(_) => Some(plus_one(&l.post_norm)?),
                None => None,
            };
            let extras = AttentionExtras {
                qkv_bias: None,
                o_bias: None,
                qk_norm: qk_norm.as_ref().map(|[a, b]| [a, b]),
                post_norm: post_attention.as_ref(),
                lora: [l.q.low_rank(), l.k.low_rank(), l.v.low_rank(), l.o.low_rank()],
            };
            let input_norm = plus_one(&l.input_norm)?;
            let qkvo = [l.q.weight(), l.k.weight(), l.v.weight(), l.o.weight()];
            fused::attention_block(x, &input_norm, qkvo, extras, spec, eps, acts, meter)
        };
        let mlp = |idx: usize, x: &Tensor| -> Result<Tensor> {
            let l = &self.layers[idx];
            let (pre_mlp, post_mlp) = match &l.ff_norms {
                Some((pre_ff, post_ff)) => (plus_one(pre_ff)?, Some(plus_one(post_ff)?)),
                None => (plus_one(&l.post_norm)?, None),
            };
            let lora = [l.gate.low_rank(), l.up.low_rank(), l.down.low_rank()];
            let extras = MlpExtras { act: Glu::GeluTanh, post_norm: post_mlp.as_ref(), lora };
            let weights = [l.gate.weight(), l.up.weight(), l.down.weight()];
            fused::mlp_block_with(x, &pre_mlp, weights, extras, eps, acts, meter)
        };
        let x = fused_layers(x, self.layers.len(), keep, attention, mlp)?;
        fused::rms_norm(&x, &plus_one(&self.norm)?, eps)
    }

    /// The composed forward pass; also the path of the erf `gelu` activation.
    fn hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let mask = crate::ops::input_attention_mask(input_ids, attention_mask, self.cfg.max_position_embeddings)?;
        let dtype = self.embed.embeddings().dtype();
        let global_rope = rope_tables(&self.inv_freq, seq, dtype, device)?;
        let local_rope = rope_tables(&self.local_inv_freq, seq, dtype, device)?;
        let mask = mask.to_dtype(dtype)?;
        let sliding_mask = match self.cfg.sliding_window {
            Some(w) if self.cfg.sandwich() => Some(mask.broadcast_add(&window_mask(seq, w, dtype, device)?)?),
            _ => None,
        };
        let mut x = (self.embed.forward(input_ids)? * (self.cfg.hidden_size as f64).sqrt())?;
        let eps = self.cfg.rms_norm_eps;
        let (hd, nq, nkv) = (self.cfg.head_dim, self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let scale = self.cfg.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt();
        for (idx, l) in self.layers.iter().enumerate() {
            let sliding = self.cfg.is_sliding(idx);
            let layer_mask = match &sliding_mask {
                Some(m) if sliding => m,
                _ => &mask,
            };
            let (cos, sin) = if sliding { &local_rope } else { &global_rope };
            let h = gemma_norm(&x, &l.input_norm, eps)?;
            let split = |t: Tensor, heads: usize, norm: Option<&Tensor>| -> Result<Tensor> {
                let t = t.reshape((batch, seq, heads, hd))?;
                let t = match norm {
                    Some(w) => gemma_norm(&t, w, eps)?,
                    None => t,
                };
                Ok(t.transpose(1, 2)?.contiguous()?)
            };
            let (qn, kn) = match &l.qk_norms {
                Some((q, k)) => (Some(q), Some(k)),
                None => (None, None),
            };
            let q = rope(&split(l.q.forward(&h)?, nq, qn)?, cos, sin)?;
            let k = repeat_kv(&rope(&split(l.k.forward(&h)?, nkv, kn)?, cos, sin)?, nq / nkv)?;
            let v = repeat_kv(&split(l.v.forward(&h)?, nkv, None)?, nq / nkv)?;
            let mut scores = (q.matmul(&k.t()?)? / scale)?;
            if let Some(cap) = self.cfg.attn_logit_softcapping {
                scores = ((scores / cap)?.tanh()? * cap)?;
            }
            let scores = scores.broadcast_add(layer_mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, seq, nq * hd))?;
            let attn = l.o.forward(&attn)?;
            x = self.mlp_residual(l, x, &attn)?;
        }
        gemma_norm(&x, &self.norm, eps)
    }

    /// Same QK-norm, local/global RoPE, score soft-capping and sliding windows (kept by the
    /// cache) as the full forward pass.
    fn hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        cache.check(self.layers.len(), input_ids.dim(0)?)?;
        let (batch, n) = generation::check_step(input_ids, cache, self.cfg.max_position_embeddings)?;
        let mut x = (self.embed.forward(input_ids)? * (self.cfg.hidden_size as f64).sqrt())?.detach();
        let global_rope = generation::rope_tables_at(&self.inv_freq, cache, n, &x)?;
        let local_rope = generation::rope_tables_at(&self.local_inv_freq, cache, n, &x)?;
        let eps = self.cfg.rms_norm_eps;
        let (hd, nq, nkv) = (self.cfg.head_dim, self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let scale = self.cfg.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt();
        for (idx, l) in self.layers.iter().enumerate() {
            let (cos, sin) = if self.cfg.is_sliding(idx) { &local_rope } else { &global_rope };
            let h = gemma_norm(&x, &l.input_norm, eps)?;
            let split = |t: Tensor, heads: usize, norm: Option<&Tensor>| -> Result<Tensor> {
                let t = t.reshape((batch, n, heads, hd))?;
                let t = match norm {
                    Some(w) => gemma_norm(&t, w, eps)?,
                    None => t,
                };
                Ok(t.transpose(1, 2)?.contiguous()?)
            };
            let (qn, kn) = match &l.qk_norms {
                Some((q, k)) => (Some(q), Some(k)),
                None => (None, None),
            };
            let q = rope(&split(l.q.forward(&h)?, nq, qn)?, cos, sin)?;
            let k = rope(&split(l.k.forward(&h)?, nkv, kn)?, cos, sin)?;
            let v = split(l.v.forward(&h)?, nkv, None)?;
            let att = generation::cached_attention(cache, idx, &q, &k, &v, scale, self.cfg.attn_logit_softcapping)?;
            let attn = l.o.forward(&att)?;
            x = self.mlp_residual(l, x, &attn)?.detach();
        }
        cache.advance(n);
        Ok(gemma_norm(&x, &self.norm, eps)?.detach())
    }
}

impl GemmaLayers {
    /// The rest of a layer after attention: residual (with Gemma 2/3's sandwich norms) and MLP.
    fn mlp_residual(&self, l: &Layer, x: Tensor, attn: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let mlp = |h: &Tensor| -> Result<Tensor> {
            let gate = l.gate.forward(h)?;
            let gate = if self.cfg.activation() == "gelu" { gate.gelu_erf()? } else { gate.gelu()? };
            l.down.forward(&(gate * l.up.forward(h)?)?)
        };
        Ok(match &l.ff_norms {
            Some((pre_ff, post_ff)) => {
                let x = (x + gemma_norm(attn, &l.post_norm, eps)?)?;
                let m = mlp(&gemma_norm(&x, pre_ff, eps)?)?;
                (&x + gemma_norm(&m, post_ff, eps)?)?
            }
            None => {
                let x = (x + attn)?;
                let m = mlp(&gemma_norm(&x, &l.post_norm, eps)?)?;
                (x + m)?
            }
        })
    }
}
