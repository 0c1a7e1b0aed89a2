//! [`Decoder`]: a family's layers ([`Family`]) with the contract every family shares, and
//! [`CausalDecoder`], the same contract as an object-safe trait ([`crate::Model::decoder`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::Result;
use crate::family::{Family, FamilyConfig, FusedInput};
use crate::fused::{ActivationMeter, Activations};
use crate::generation::KvCache;
use crate::lora::Adapters;

/// A model of family `F` whose weights live in the `VarBuilder` it was built from.
pub struct Decoder<F: Family> {
    family: F,
    /// Gradient checkpointing on the fused path (see [`Self::set_gradient_checkpointing`]).
    recompute: AtomicBool,
    /// What the fused blocks keep for the backward pass (see [`Self::activation_meter`]).
    meter: Arc<ActivationMeter>,
}

impl<F: Family> Decoder<F> {
    /// Builds the model, taking every weight from `vb` under Hugging Face names
    /// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
    pub fn new(cfg: &F::Config, vb: VarBuilder) -> Result<Self> {
        Self::new_with_lora(cfg, vb, None)
    }

    /// [`Self::new`] with LoRA adapters on the projections `lora` names.
    pub fn new_with_lora(cfg: &F::Config, vb: VarBuilder, lora: Option<&Adapters>) -> Result<Self> {
        cfg.validate("config")?;
        Ok(Self { family: F::build(cfg, vb, lora)?, recompute: AtomicBool::new(false), meter: Arc::default() })
    }

    /// The family's layers and weights.
    pub fn family(&self) -> &F {
        &self.family
    }

    /// The configuration.
    pub fn config(&self) -> &F::Config {
        self.family.config()
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> &Tensor {
        self.family.lm_head()
    }

    /// Final logits soft-capping `cap * tanh(logits / cap)`, if the family has one.
    pub fn final_logit_softcapping(&self) -> Option<f64> {
        self.family.final_logit_softcapping()
    }

    /// Gradient checkpointing (Hugging Face's `gradient_checkpointing`): each fused block keeps
    /// only its input and recomputes its activations in the backward pass
    /// ([`Activations::Recompute`]). Same values and gradients, less memory, more time. Applies
    /// to the fused blocks; the reference path keeps what candle's graph keeps.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.recompute.store(on, Ordering::Relaxed);
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.recompute.load(Ordering::Relaxed)
    }

    /// The bytes of activations the fused blocks hold for the backward pass (per layer and
    /// position q|k|v and the attention output, gate|up, and a post-feed-forward norm's input
    /// where the family has one; nothing with gradient checkpointing): now, and the peak since
    /// [`ActivationMeter::reset_peak`]. Zero on the reference path.
    pub fn activation_meter(&self) -> &ActivationMeter {
        &self.meter
    }

    /// Whether the fused blocks apply (see [`Family::fusable`]).
    pub fn fused_path(&self) -> bool {
        self.family.fusable()
    }

    fn fused(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        branches: Option<&[(usize, usize)]>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let acts = if self.gradient_checkpointing() { Activations::Recompute } else { Activations::Keep };
        let input = FusedInput { input_ids, attention_mask, branches, keep, acts, meter: Some(&self.meter) };
        self.family.hidden_fused(input)
    }

    /// Final hidden states `[batch, seq, hidden]` (after the last norm) for `input_ids`
    /// `[batch, seq]` (u32). `attention_mask` `[batch, seq]` (1 = real token) marks right padding;
    /// real tokens never attend to padding, so appending padding leaves them unchanged.
    ///
    /// Where [`Family::fusable`] holds (f32 CPU) the fused kernels of [`crate::fused`] run (equal
    /// to [`Self::forward_hidden_reference`] within float rounding, values and gradients, at every
    /// real position; active LoRA adapters go into the blocks as low-rank products); other
    /// devices and dtypes run the reference composition.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        if !self.fused_path() {
            return self.forward_hidden_reference(input_ids, attention_mask);
        }
        let (batch, seq) = input_ids.dims2()?;
        Ok(self.fused(input_ids, attention_mask, None, None)?.reshape((batch, seq, ()))?)
    }

    /// [`Self::forward_hidden`] as the straightforward composition of differentiable candle ops
    /// (separate projections, [`crate::ops::rope`], [`crate::ops::repeat_kv`], a materialised
    /// additive mask, softmax): the reference the fused path is tested against, and the path of
    /// other devices and dtypes.
    pub fn forward_hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.family.hidden_reference(input_ids, attention_mask)
    }

    /// Final hidden states of rows that each hold two continuations of a shared prefix,
    /// `[prefix | first | second | padding]` with per-row `(prefix, first)` lengths (see
    /// [`crate::fused::AttentionSpec::with_branches`]): every position gets the hidden state it
    /// has in the row `[prefix | its branch]` (sliding windows counted in those rows' positions).
    /// `[batch, seq, hidden]`, or with `rows` (flat positions `b * seq + t`, u32)
    /// `[rows.len(), hidden]` for those positions only: the last layer's MLP block then runs on
    /// them alone (its attention still over every position, whose keys and values they read).
    /// Fused models only: `None` where [`Family::fusable`] does not hold.
    pub fn forward_hidden_branched(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        branches: &[(usize, usize)],
        rows: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        if !self.fused_path() {
            return Ok(None);
        }
        let (batch, seq) = input_ids.dims2()?;
        let x = self.fused(input_ids, Some(attention_mask), Some(branches), rows)?;
        Ok(Some(if rows.is_some() { x } else { x.reshape((batch, seq, ()))? }))
    }

    /// Hidden states `[batch, n, hidden]` of `n` new slots `input_ids` `[batch, n]` that continue
    /// the sequences held in `cache` (left-padded rows as [`KvCache::left_padded`] describes),
    /// whose keys and values they append: the incremental-decoding path ([`crate::generation`]),
    /// equal to the last `n` positions of [`Self::forward_hidden`] within float rounding. No
    /// gradients.
    pub fn forward_hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.family.hidden_cached(input_ids, cache)
    }

    /// Logits `[batch, vocab]` (f32, soft-capped where the family caps them) at each row's last
    /// real position (greedy decoding, parity checks).
    pub fn last_logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask)?;
        let last = crate::ops::last_positions(&hidden, attention_mask)?;
        let logits = last.matmul(&self.lm_head().t()?)?.to_dtype(DType::F32)?;
        Ok(match self.final_logit_softcapping() {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// Per-token log-probs `[batch, seq]` (f32): `out[b, t] = log p(ids[b, t] | ids[b, <t])` for
    /// `t >= 1`, `out[b, 0] = 0`. The lm_head, (soft-capping,) log-softmax and gather run over
    /// chunks of `chunk` positions, so `[batch, seq, vocab]` logits never exist at once.
    pub fn token_logps(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, chunk: usize) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask)?;
        let cap = self.final_logit_softcapping();
        crate::logps::chunked_token_logps_capped(&hidden, self.lm_head(), input_ids, chunk, cap)
    }
}

/// The contract of [`Decoder`] as an object-safe trait, so [`crate::Model`] dispatches without a
/// `match` per method. Every method is the [`Decoder`] method of the same name.
pub trait CausalDecoder: Send + Sync {
    /// See [`Decoder::config`].
    fn config(&self) -> &dyn FamilyConfig;
    /// See [`Decoder::lm_head`].
    fn lm_head(&self) -> &Tensor;
    /// See [`Decoder::final_logit_softcapping`].
    fn final_logit_softcapping(&self) -> Option<f64>;
    /// See [`Decoder::forward_hidden`].
    fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor>;
    /// See [`Decoder::forward_hidden_reference`].
    fn forward_hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor>;
    /// See [`Decoder::forward_hidden_branched`].
    fn forward_hidden_branched(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        branches: &[(usize, usize)],
        rows: Option<&Tensor>,
    ) -> Result<Option<Tensor>>;
    /// See [`Decoder::forward_hidden_cached`].
    fn forward_hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// See [`Decoder::last_logits`].
    fn last_logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor>;
    /// See [`Decoder::token_logps`].
    fn token_logps(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, chunk: usize) -> Result<Tensor>;
    /// See [`Decoder::set_gradient_checkpointing`].
    fn set_gradient_checkpointing(&self, on: bool);
    /// See [`Decoder::gradient_checkpointing`].
    fn gradient_checkpointing(&self) -> bool;
    /// See [`Decoder::activation_meter`].
    fn activation_meter(&self) -> &ActivationMeter;
}

impl<F: Family> CausalDecoder for Decoder<F> {
    fn config(&self) -> &dyn FamilyConfig {
        Decoder::config(self)
    }
    fn lm_head(&self) -> &Tensor {
        Decoder::lm_head(self)
    }
    fn final_logit_softcapping(&self) -> Option<f64> {
        Decoder::final_logit_softcapping(self)
    }
    fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        Decoder::forward_hidden(self, input_ids, attention_mask)
    }
    fn forward_hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        Decoder::forward_hidden_reference(self, input_ids, attention_mask)
    }
    fn forward_hidden_branched(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        branches: &[(usize, usize)],
        rows: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        Decoder::forward_hidden_branched(self, input_ids, attention_mask, branches, rows)
    }
    fn forward_hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Decoder::forward_hidden_cached(self, input_ids, cache)
    }
    fn last_logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        Decoder::last_logits(self, input_ids, attention_mask)
    }
    fn token_logps(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, chunk: usize) -> Result<Tensor> {
        Decoder::token_logps(self, input_ids, attention_mask, chunk)
    }
    fn set_gradient_checkpointing(&self, on: bool) {
        Decoder::set_gradient_checkpointing(self, on)
    }
    fn gradient_checkpointing(&self) -> bool {
        Decoder::gradient_checkpointing(self)
    }
    fn activation_meter(&self) -> &ActivationMeter {
        Decoder::activation_meter(self)
    }
}
