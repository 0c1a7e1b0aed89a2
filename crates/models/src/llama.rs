//! Trainable Llama (Touvron et al. 2023; Llama 3 / 3.1 / 3.2, SmolLM2): pre-norm decoder with
//! RMSNorm, rotary embeddings (Hugging Face `rotate_half` layout, optional Llama 3 scaling),
//! grouped-query attention and a SwiGLU MLP. Weight names match Hugging Face checkpoints.
//!
//! Unlike candle-transformers' inference model, the forward pass covers whole right-padded
//! sequences, keeps no KV cache and records a backward pass through every weight.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Result;
use crate::config::LlamaConfig;
use crate::fused::{self, ActivationMeter, Activations, AttentionSpec};
use crate::generation::{self, KvCache};
use crate::lora::{Adapters, Proj};
use crate::ops::{repeat_kv, rope, rope_tables};

struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
}

struct Layer {
    input_norm: Tensor,
    attn: Attention,
    post_norm: Tensor,
    mlp: Mlp,
}

/// A Llama model whose weights live in the `VarBuilder` it was built from.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f64>,
    /// Gradient checkpointing on the fused path (see [`Self::set_gradient_checkpointing`]).
    recompute: AtomicBool,
    /// What the fused blocks keep for the backward pass (see [`Self::activation_meter`]).
    meter: Arc<ActivationMeter>,
}

fn linear(vb: &VarBuilder, inp: usize, out: usize, name: &str, lora: Option<&Adapters>) -> Result<Proj> {
    Ok(Proj::new(vb.get((out, inp), &format!("{name}.weight"))?, name, lora))
}

impl Llama {
    /// Builds the model, taking every weight from `vb` under Hugging Face names
    /// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with_lora(cfg, vb, None)
    }

    /// [`Self::new`] with LoRA adapters on the projections `lora` names.
    pub fn new_with_lora(cfg: &LlamaConfig, vb: VarBuilder, lora: Option<&Adapters>) -> Result<Self> {
        cfg.validate("config")?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let embed_w = vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    input_norm: vb.get(h, &format!("{p}.input_layernorm.weight"))?,
                    attn: Attention {
                        q: linear(&vb, h, cfg.num_attention_heads * hd, &format!("{p}.self_attn.q_proj"), lora)?,
                        k: linear(&vb, h, cfg.kv_heads() * hd, &format!("{p}.self_attn.k_proj"), lora)?,
                        v: linear(&vb, h, cfg.kv_heads() * hd, &format!("{p}.self_attn.v_proj"), lora)?,
                        o: linear(&vb, cfg.num_attention_heads * hd, h, &format!("{p}.self_attn.o_proj"), lora)?,
                        heads: cfg.num_attention_heads,
                        kv_heads: cfg.kv_heads(),
                        head_dim: hd,
                    },
                    post_norm: vb.get(h, &format!("{p}.post_attention_layernorm.weight"))?,
                    mlp: Mlp {
                        gate: linear(&vb, h, cfg.intermediate_size, &format!("{p}.mlp.gate_proj"), lora)?,
                        up: linear(&vb, h, cfg.intermediate_size, &format!("{p}.mlp.up_proj"), lora)?,
                        down: linear(&vb, cfg.intermediate_size, h, &format!("{p}.mlp.down_proj"), lora)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head =
            if cfg.tie_word_embeddings { embed_w.clone() } else { vb.get((cfg.vocab_size, h), "lm_head.weight")? };
        Ok(Self {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, h),
            layers,
            norm: vb.get(h, "model.norm.weight")?,
            lm_head,
            inv_freq: cfg.inv_freq(),
            recompute: AtomicBool::new(false),
            meter: Arc::default(),
        })
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Gradient checkpointing (Hugging Face's `gradient_checkpointing`): each fused block keeps
    /// only its input and recomputes its activations in the backward pass
    /// ([`Activations::Recompute`]). Same values and gradients, less memory, more time. Applies
    /// to the fused path (f32 CPU); the reference path keeps what candle's graph keeps.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.recompute.store(on, Ordering::Relaxed);
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.recompute.load(Ordering::Relaxed)
    }

    /// The bytes of activations this model's fused blocks hold for the backward pass (q|k|v and
    /// the attention output, gate|up per layer; nothing with gradient checkpointing): now, and
    /// the peak since [`ActivationMeter::reset_peak`]. Zero on the reference path.
    pub fn activation_meter(&self) -> &ActivationMeter {
        &self.meter
    }

    /// Final hidden states `[batch, seq, hidden]` (after the last RMSNorm) for `input_ids`
    /// `[batch, seq]` (u32). `attention_mask` `[batch, seq]` (1 = real token) marks right padding;
    /// real tokens never attend to padding, so appending padding leaves them unchanged.
    ///
    /// f32 CPU models run the fused kernels of [`crate::fused`] (equal to
    /// [`Self::forward_hidden_reference`] within float rounding, values and gradients; active
    /// LoRA adapters are folded into the effective weights `W + scale * B A`); other devices and
    /// dtypes run the reference composition.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        match self.fused_weights() {
            Some(weights) => self.forward_hidden_fused(input_ids, attention_mask, &weights, None),
            None => self.forward_hidden_reference(input_ids, attention_mask),
        }
    }

    /// [`Self::forward_hidden`] as the straightforward composition of differentiable candle ops
    /// (separate projections, [`crate::ops::rope`], [`crate::ops::repeat_kv`], a materialised
    /// additive mask, softmax): the reference the fused path is tested against, and the path of
    /// other devices and dtypes.
    pub fn forward_hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let mask = crate::ops::input_attention_mask(input_ids, attention_mask, self.cfg.max_position_embeddings)?;
        let dtype = self.embed.embeddings().dtype();
        let (cos, sin) = rope_tables(&self.inv_freq, seq, dtype, device)?;
        let mut x = self.embed.forward(input_ids)?;
        for layer in &self.layers {
            let h = crate::ops::rms_norm_composed(&x, &layer.input_norm, self.cfg.rms_norm_eps)?;
            x = (x + layer.attn.forward(&h, &mask, &cos, &sin)?)?;
            let h = crate::ops::rms_norm_composed(&x, &layer.post_norm, self.cfg.rms_norm_eps)?;
            x = (x + layer.mlp.forward(&h)?)?;
        }
        crate::ops::rms_norm_composed(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Per layer `[q, k, v, o, gate, up, down]` effective weights (LoRA folded in, see
    /// [`Proj::effective_weight`]) when the fused path applies (f32 CPU).
    fn fused_weights(&self) -> Option<Vec<[Tensor; 7]>> {
        if !crate::fused::fusable(&[self.embed.embeddings(), &self.norm]) {
            return None;
        }
        self.layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.attn, &l.mlp);
                Some([
                    a.q.effective_weight().ok()?,
                    a.k.effective_weight().ok()?,
                    a.v.effective_weight().ok()?,
                    a.o.effective_weight().ok()?,
                    m.gate.effective_weight().ok()?,
                    m.up.effective_weight().ok()?,
                    m.down.effective_weight().ok()?,
                ])
            })
            .collect()
    }

    /// Final hidden states `[batch, seq, hidden]` of rows that each hold two continuations of a
    /// shared prefix, `[prefix | first | second | padding]` with per-row `(prefix, first)`
    /// lengths (see [`AttentionSpec::with_branches`]): every position gets the hidden state it
    /// has in the row `[prefix | its branch]`. Fused (f32 CPU) models only: `None` otherwise.
    pub fn forward_hidden_branched(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        branches: &[(usize, usize)],
    ) -> Result<Option<Tensor>> {
        match self.fused_weights() {
            Some(weights) => {
                self.forward_hidden_fused(input_ids, Some(attention_mask), &weights, Some(branches)).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The fused forward pass on a `[batch * seq, hidden]` residual stream: per layer one
    /// [`fused::attention_block`] and one [`fused::mlp_block`] op.
    fn forward_hidden_fused(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        weights: &[[Tensor; 7]],
        branches: Option<&[(usize, usize)]>,
    ) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        // Branched rows reuse rotary positions: the last slot of a row is at `seq - 1 - first`.
        let positions =
            branches.map_or(seq, |b| b.iter().map(|&(p, f)| (p + f).max(seq.saturating_sub(f))).max().unwrap_or(seq));
        crate::ops::check_positions(positions, self.cfg.max_position_embeddings)?;
        if let Some(m) = attention_mask
            && m.dims() != [batch, seq]
        {
            return Err(crate::ModelError::Input {
                input: "attention_mask",
                reason: format!("shape {:?} does not match input_ids {:?}", m.dims(), input_ids.dims()),
            });
        }
        let mut spec = AttentionSpec::new(
            batch,
            seq,
            self.cfg.num_attention_heads,
            self.cfg.kv_heads(),
            &self.inv_freq,
            attention_mask,
        )?;
        if let Some(branches) = branches {
            spec = spec.with_branches(branches)?;
        }
        let spec = Arc::new(spec);
        let (h, eps) = (self.cfg.hidden_size, self.cfg.rms_norm_eps);
        let mut x = self.embed.forward(input_ids)?.reshape((batch * seq, h))?;
        let acts = if self.gradient_checkpointing() { Activations::Recompute } else { Activations::Keep };
        let meter = Some(&self.meter);
        for (layer, [q, k, v, o, gate, up, down]) in self.layers.iter().zip(weights) {
            x = fused::attention_block(&x, &layer.input_norm, [q, k, v, o], &spec, eps, acts, meter)?;
            x = fused::mlp_block(&x, &layer.post_norm, [gate, up, down], eps, acts, meter)?;
        }
        Ok(fused::rms_norm(&x, &self.norm, eps)?.reshape((batch, seq, h))?)
    }

    /// Logits `[batch, vocab]` at each row's last real position (greedy decoding, parity checks).
    pub fn last_logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask)?;
        let last = crate::ops::last_positions(&hidden, attention_mask)?;
        Ok(last.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?)
    }

    /// Per-token log-probs `[batch, seq]` (f32): `out[b, t] = log p(ids[b, t] | ids[b, <t])` for
    /// `t >= 1`, `out[b, 0] = 0`. The lm_head, log-softmax and gather run over chunks of
    /// `chunk` positions, so `[batch, seq, vocab]` logits never exist at once in the forward pass.
    pub fn token_logps(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, chunk: usize) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask)?;
        crate::logps::chunked_token_logps(&hidden, &self.lm_head, input_ids, chunk)
    }
}

impl Llama {
    /// Hidden states `[batch, n, hidden]` of `n` new positions `input_ids` `[batch, n]` (no
    /// padding) that continue the sequence held in `cache`, whose keys and values they append.
    /// The incremental-decoding path ([`crate::generation`]); equal to the last `n` positions of
    /// [`Self::forward_hidden`] over the whole sequence within float rounding. No gradients.
    pub fn forward_hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        cache.check(self.layers.len(), input_ids.dim(0)?)?;
        let pos = cache.len();
        let (b, n) = generation::check_step(input_ids, pos, self.cfg.max_position_embeddings)?;
        let (heads, kv_heads, hd) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        let eps = self.cfg.rms_norm_eps;
        let mut x = self.embed.forward(input_ids)?.detach();
        let (cos, sin) = generation::rope_tables_at(&self.inv_freq, pos, n, &x)?;
        for (idx, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let h = crate::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let split = |t: Tensor, nh: usize| -> Result<Tensor> {
                Ok(t.reshape((b, n, nh, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = rope(&split(a.q.forward(&h)?, heads)?, &cos, &sin)?;
            let k = rope(&split(a.k.forward(&h)?, kv_heads)?, &cos, &sin)?;
            let v = split(a.v.forward(&h)?, kv_heads)?;
            let att = generation::cached_attention(cache, idx, &q, &k, &v, (hd as f64).sqrt(), None)?;
            x = (x + a.o.forward(&att)?)?;
            let h = crate::ops::rms_norm(&x, &layer.post_norm, eps)?;
            x = (&x + layer.mlp.forward(&h)?)?.detach();
        }
        cache.advance(n);
        Ok(crate::ops::rms_norm(&x, &self.norm, eps)?.detach())
    }
}

impl Attention {
    fn forward(&self, x: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope(&split(self.q.forward(x)?, self.heads)?, cos, sin)?;
        let k = rope(&split(self.k.forward(x)?, self.kv_heads)?, cos, sin)?;
        let v = split(self.v.forward(x)?, self.kv_heads)?;
        let n = self.heads / self.kv_heads;
        let (k, v) = (repeat_kv(&k, n)?, repeat_kv(&v, n)?);
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, self.heads * self.head_dim))?;
        self.o.forward(&out)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate.forward(x)?.silu()?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}
