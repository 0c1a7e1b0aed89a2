//! The contract of a decoder family: its configuration ([`FamilyConfig`]) and its layers
//! ([`Family`]). [`crate::Decoder`] adds what every family shares (the fused / reference switch,
//! gradient checkpointing, the activation meter, logits and log-probs), and the registry
//! (`registry.rs`) maps Hugging Face `model_type`s to the families and generates
//! [`crate::ModelConfig`] and [`crate::Model`] from its list.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::Result;
use crate::fused::{ActivationMeter, Activations};
use crate::generation::KvCache;
use crate::lora::Adapters;

/// How llama.cpp's converter stored a family's weights in a GGUF file (see [`crate::gguf`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GgufLayout {
    /// Gemma 2 / 3 norm names: `post_attention_norm`, `ffn_norm` is the pre-feed-forward norm.
    pub sandwich_norms: bool,
    /// q / k rows permuted per head to interleaved RoPE pairs: `(heads, kv_heads)` to undo it.
    pub permuted_qk: Option<(usize, usize)>,
    /// Every `*norm.weight` stored as `1 + w` (Gemma's offset norm weights).
    pub norms_plus_one: bool,
}

/// A family's configuration, as read from a Hugging Face `config.json` (object-safe: every
/// [`crate::ModelConfig`] lends its family's as `&dyn FamilyConfig`).
pub trait FamilyConfig: std::fmt::Debug + Send + Sync {
    /// Parses `config.json` text (the registry chose this family by `model_type`) and validates
    /// it; `file` names it in errors, which name the field.
    fn from_json(text: &str, file: &str) -> Result<Self>
    where
        Self: Sized;

    /// Rejects unsupported or inconsistent values, naming the field.
    fn validate(&self, file: &str) -> Result<()>;

    /// Every weight with its shape, under Hugging Face names.
    fn weight_shapes(&self) -> Vec<(String, Vec<usize>)>;

    /// The `model_type` written back (the family's own when the config had none).
    fn model_type(&self) -> &str;

    /// transformers' class, e.g. `LlamaForCausalLM`.
    fn architecture(&self) -> &'static str;

    /// Adds to the serialised config what transformers needs besides the family's fields
    /// (`architectures`, `model_type` and `attention_dropout` are added for every family).
    fn complete_hf_json(&self, obj: &mut serde_json::Map<String, serde_json::Value>);

    /// Vocabulary size.
    fn vocab_size(&self) -> usize;

    /// The longest sequence the RoPE tables cover (`max_position_embeddings`).
    fn max_position_embeddings(&self) -> usize;

    /// The sliding window of each layer (`None`: full causal attention), which the KV cache
    /// keeps.
    fn layer_windows(&self) -> Vec<Option<usize>>;

    /// Whether `lm_head` is the embedding matrix (no `lm_head.weight` is saved).
    fn tied_embeddings(&self) -> bool;

    /// The stored value of a norm weight that scales by 1 (random initialisation): 1, or 0 for
    /// families that store the offset from 1 (Gemma).
    fn unit_norm(&self) -> f64 {
        1.0
    }

    /// How llama.cpp stored this family's weights.
    fn gguf_layout(&self) -> GgufLayout;
}

/// What the fused forward pass of a family receives.
pub struct FusedInput<'a> {
    /// `[batch, seq]` u32 token ids.
    pub input_ids: &'a Tensor,
    /// `[batch, seq]` right-padding mask (1 = real token).
    pub attention_mask: Option<&'a Tensor>,
    /// Two continuations of a shared prefix per row, `(prefix, first)` lengths (see
    /// [`crate::fused::AttentionSpec::with_branches`]).
    pub branches: Option<&'a [(usize, usize)]>,
    /// Flat positions `b * seq + t` (u32) whose hidden states are wanted; the last layer's MLP
    /// block runs on them alone (see [`keep_rows`]).
    pub keep: Option<&'a Tensor>,
    /// What the blocks keep for the backward pass (gradient checkpointing).
    pub acts: Activations,
    /// Where the blocks record the activation memory they hold.
    pub meter: Option<&'a std::sync::Arc<ActivationMeter>>,
}

/// A family's layers and weights: what differs between families. [`crate::Decoder`] wraps it
/// with the shared contract.
pub trait Family: Sized + Send + Sync + 'static {
    /// The family's configuration.
    type Config: FamilyConfig + Clone + 'static;

    /// Builds the model from `vb` under Hugging Face names, with LoRA adapters on the
    /// projections `lora` names (`cfg` is already validated).
    fn build(cfg: &Self::Config, vb: VarBuilder, lora: Option<&Adapters>) -> Result<Self>;

    /// The configuration.
    fn config(&self) -> &Self::Config;

    /// The output projection `[vocab, hidden]`.
    fn lm_head(&self) -> &Tensor;

    /// Final logits become `cap * tanh(logits / cap)` (Gemma 2 / 3).
    fn final_logit_softcapping(&self) -> Option<f64> {
        None
    }

    /// Whether the fused blocks of [`crate::fused`] run this model (f32 CPU weights, plus any
    /// condition of the family's own).
    fn fusable(&self) -> bool;

    /// The fused forward pass: final hidden states `[batch * seq, hidden]`, or the `keep` rows.
    fn hidden_fused(&self, input: FusedInput<'_>) -> Result<Tensor>;

    /// The composed forward pass (differentiable candle ops): final hidden states
    /// `[batch, seq, hidden]`; the reference of the fused path and the path of other devices.
    fn hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor>;

    /// Hidden states `[batch, n, hidden]` of `n` new slots continuing the sequences in `cache`,
    /// whose keys and values they append (no gradients).
    fn hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
}

/// The rows `keep` (u32 indices) of the residual stream `x`, or all of it without `keep`: taken
/// before the last layer's MLP block, which is per position.
pub(crate) fn keep_rows(x: Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
    let Some(rows) = keep else { return Ok(x) };
    // index_select checks the positions; its error is the caller's bad `rows`.
    x.index_select(rows, 0).map_err(|e| crate::ModelError::Input { input: "rows", reason: e.to_string() })
}

/// The fused layer loop every family shares: `attention(layer, x)` then `mlp(layer, x)` per
/// layer, the residual stream cut to the `keep` rows between the last attention and MLP block.
pub(crate) fn fused_layers(
    mut x: Tensor,
    layers: usize,
    keep: Option<&Tensor>,
    mut attention: impl FnMut(usize, &Tensor) -> Result<Tensor>,
    mut mlp: impl FnMut(usize, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if layers == 0 {
        return keep_rows(x, keep);
    }
    for idx in 0..layers {
        x = attention(idx, &x)?;
        if idx + 1 == layers {
            x = keep_rows(x, keep)?;
        }
        x = mlp(idx, &x)?;
    }
    Ok(x)
}
