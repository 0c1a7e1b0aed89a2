//! Trainable Llama (Touvron et al. 2023; Llama 3 / 3.1 / 3.2, SmolLM2): pre-norm decoder with
//! RMSNorm, rotary embeddings (Hugging Face `rotate_half` layout, optional Llama 3 scaling),
//! grouped-query attention and a SwiGLU MLP. Weight names match Hugging Face checkpoints.
//!
//! The same model runs Qwen2 / Qwen2.5 and Qwen3 dense checkpoints ([`LlamaConfig::is_qwen2`],
//! [`LlamaConfig::is_qwen3`]), which differ from Llama only in attention, as in transformers'
//! `Qwen2ForCausalLM` / `Qwen3ForCausalLM`:
//! - Qwen2: `q = x W_q^T + b_q` (likewise k and v; o_proj has no bias);
//! - Qwen3: each query and key head is RMS-normalised over `head_dim` before RoPE,
//!   `q_h = rms_norm(x W_q^T [head h], q_norm)`; biases on q/k/v/o only with `attention_bias`.
//!
//! On f32 CPU both run in the fused attention block ([`fused::attention_block`] with
//! [`AttentionExtras`]), like Llama (see [`Llama::forward_hidden`]).
//!
//! Unlike candle-transformers' inference model, the forward pass covers whole right-padded
//! sequences, keeps no KV cache and records a backward pass through every weight.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::LlamaConfig;
use crate::fused::{self, ActivationMeter, Activations, AttentionExtras, AttentionSpec};
use crate::generation::{self, KvCache};
use crate::lora::{Adapters, Proj};
use crate::ops::{repeat_kv, rope, rope_tables};
use crate::{ModelError, Result};

struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    /// Qwen3's per-head RMSNorm weights `[head_dim]` of queries and keys.
    qk_norm: Option<(Tensor, Tensor)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
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

/// The projection `{name}.weight` `[out, inp]`, with `{name}.bias` `[out]` when `bias`.
fn linear(vb: &VarBuilder, inp: usize, out: usize, name: &str, lora: Option<&Adapters>, bias: bool) -> Result<Proj> {
    let b = if bias { Some(vb.get(out, &format!("{name}.bias"))?) } else { None };
    Ok(Proj::new(vb.get((out, inp), &format!("{name}.weight"))?, name, lora).with_bias(b))
}

impl Llama {
    /// Builds the model, taking every weight from `vb` under Hugging Face names
    /// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...; Qwen:
    /// `self_attn.{q,k,v}_proj.bias`, `self_attn.{q,k}_norm.weight`).
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with_lora(cfg, vb, None)
    }

    /// [`Self::new`] with LoRA adapters on the projections `lora` names.
    pub fn new_with_lora(cfg: &LlamaConfig, vb: VarBuilder, lora: Option<&Adapters>) -> Result<Self> {
        cfg.validate("config")?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nq, nkv, qkv_bias, o_bias) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.qkv_bias(), cfg.o_bias());
        let embed_w = vb.get((cfg.vocab_size, h), "model.embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    input_norm: vb.get(h, &format!("{p}.input_layernorm.weight"))?,
                    attn: Attention {
                        q: linear(&vb, h, nq * hd, &format!("{p}.self_attn.q_proj"), lora, qkv_bias)?,
                        k: linear(&vb, h, nkv * hd, &format!("{p}.self_attn.k_proj"), lora, qkv_bias)?,
                        v: linear(&vb, h, nkv * hd, &format!("{p}.self_attn.v_proj"), lora, qkv_bias)?,
                        o: linear(&vb, nq * hd, h, &format!("{p}.self_attn.o_proj"), lora, o_bias)?,
                        qk_norm: if cfg.qk_norm() {
                            Some((
                                vb.get(hd, &format!("{p}.self_attn.q_norm.weight"))?,
                                vb.get(hd, &format!("{p}.self_attn.k_norm.weight"))?,
                            ))
                        } else {
                            None
                        },
                        heads: nq,
                        kv_heads: nkv,
                        head_dim: hd,
                        eps: cfg.rms_norm_eps,
                    },
                    post_norm: vb.get(h, &format!("{p}.post_attention_layernorm.weight"))?,
                    mlp: Mlp {
                        gate: linear(&vb, h, cfg.intermediate_size, &format!("{p}.mlp.gate_proj"), lora, false)?,
                        up: linear(&vb, h, cfg.intermediate_size, &format!("{p}.mlp.up_proj"), lora, false)?,
                        down: linear(&vb, cfg.intermediate_size, h, &format!("{p}.mlp.down_proj"), lora, false)?,
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
    /// to the fused blocks (f32 CPU, Qwen included); the reference path keeps what candle's graph
    /// keeps.
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
    /// LoRA adapters go into the blocks as low-rank products, [`fused::LowRank`]); other devices
    /// and dtypes run the reference composition. Qwen models take the same fused path, their biases
    /// and q/k norms inside the attention block.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        if !self.fused_path() {
            return self.forward_hidden_reference(input_ids, attention_mask);
        }
        let (batch, seq) = input_ids.dims2()?;
        let x = self.forward_hidden_fused(input_ids, attention_mask, None, None)?;
        Ok(x.reshape((batch, seq, ()))?)
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
        let eps = self.cfg.rms_norm_eps;
        let norm = |x: &Tensor, w: &Tensor| crate::ops::rms_norm_composed(x, w, eps);
        let mut x = self.embed.forward(input_ids)?;
        for layer in &self.layers {
            x = (&x + layer.attn.forward(&norm(&x, &layer.input_norm)?, &mask, &cos, &sin)?)?;
            x = (&x + layer.mlp.forward(&norm(&x, &layer.post_norm)?)?)?;
        }
        norm(&x, &self.norm)
    }

    /// Whether the fused blocks apply (f32 CPU; Llama and Qwen alike, the biases and q/k norms
    /// going in as [`Attention::extras`], active adapters as [`fused::LowRank`]).
    fn fused_path(&self) -> bool {
        crate::fused::fusable(&[self.embed.embeddings(), &self.norm])
    }

    /// Final hidden states of rows that each hold two continuations of a shared prefix,
    /// `[prefix | first | second | padding]` with per-row `(prefix, first)` lengths (see
    /// [`AttentionSpec::with_branches`]): every position gets the hidden state it has in the row
    /// `[prefix | its branch]`. `[batch, seq, hidden]`, or with `rows` (flat positions
    /// `b * seq + t`, u32) `[rows.len(), hidden]` for those positions only: the last layer's MLP
    /// block then runs on them alone (its attention still over every position, whose keys and
    /// values they read). Fused (f32 CPU) models only, Qwen included: `None` on other devices and
    /// dtypes.
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
        let x = self.forward_hidden_fused(input_ids, Some(attention_mask), Some(branches), rows)?;
        Ok(Some(if rows.is_some() { x } else { x.reshape((batch, seq, ()))? }))
    }

    /// The fused forward pass on a `[batch * seq, hidden]` residual stream: per layer one
    /// [`fused::attention_block`] and one [`fused::mlp_block`] op; `[batch * seq, hidden]` out,
    /// or the `keep` rows only (see [`keep_rows`]).
    fn forward_hidden_fused(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        branches: Option<&[(usize, usize)]>,
        keep: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (batch, seq) =
            crate::ops::check_fused_input(input_ids, attention_mask, branches, self.cfg.max_position_embeddings)?;
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
        let last = self.layers.len().checked_sub(1);
        for (idx, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.attn, &layer.mlp);
            let extras = a.extras()?;
            let qkvo = [a.q.weight(), a.k.weight(), a.v.weight(), a.o.weight()];
            x = fused::attention_block(&x, &layer.input_norm, qkvo, extras, &spec, eps, acts, meter)?;
            if Some(idx) == last {
                x = keep_rows(x, keep)?;
            }
            let extras = fused::MlpExtras {
                lora: [m.gate.low_rank(), m.up.low_rank(), m.down.low_rank()],
                ..Default::default()
            };
            x = fused::mlp_block_with(
                &x,
                &layer.post_norm,
                [m.gate.weight(), m.up.weight(), m.down.weight()],
                extras,
                eps,
                acts,
                meter,
            )?;
        }
        if last.is_none() {
            x = keep_rows(x, keep)?;
        }
        fused::rms_norm(&x, &self.norm, eps)
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

/// The rows `keep` (u32 indices) of the residual stream `x`, or all of it without `keep`: taken
/// before the last layer's MLP block, which is per position.
pub(crate) fn keep_rows(x: Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
    let Some(rows) = keep else { return Ok(x) };
    // index_select checks the positions; its error is the caller's bad `rows`.
    x.index_select(rows, 0).map_err(|e| ModelError::Input { input: "rows", reason: e.to_string() })
}

impl Llama {
    /// Hidden states `[batch, n, hidden]` of `n` new slots `input_ids` `[batch, n]` that continue
    /// the sequences held in `cache` (left-padded rows as [`KvCache::left_padded`] describes),
    /// whose keys and values they append.
    /// The incremental-decoding path ([`crate::generation`]); equal to the last `n` positions of
    /// [`Self::forward_hidden`] over the whole sequence within float rounding. No gradients.
    pub fn forward_hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        cache.check(self.layers.len(), input_ids.dim(0)?)?;
        let (_, n) = generation::check_step(input_ids, cache, self.cfg.max_position_embeddings)?;
        let hd = self.cfg.head_dim();
        let eps = self.cfg.rms_norm_eps;
        let mut x = self.embed.forward(input_ids)?.detach();
        let (cos, sin) = generation::rope_tables_at(&self.inv_freq, cache, n, &x)?;
        for (idx, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let h = crate::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let (q, k, v) = a.project(&h, &cos, &sin)?;
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
    /// The fused attention block's optional parameters: Qwen's biases (LoRA leaves them as they
    /// are) and q/k norm weights (none for Llama), and the projections' active adapters.
    fn extras(&self) -> Result<AttentionExtras<'_>> {
        let qkv_bias = match (self.q.bias(), self.k.bias(), self.v.bias()) {
            (Some(q), Some(k), Some(v)) => Some([q, k, v]),
            (None, None, None) => None,
            _ => {
                return Err(crate::ModelError::Input {
                    input: "attention",
                    reason: "q/k/v_proj must all have a bias or none".into(),
                });
            }
        };
        let qk_norm = self.qk_norm.as_ref().map(|(q, k)| [q, k]);
        let lora = [self.q.low_rank(), self.k.low_rank(), self.v.low_rank(), self.o.low_rank()];
        Ok(AttentionExtras { qkv_bias, o_bias: self.o.bias(), qk_norm, post_norm: None, lora })
    }

    /// Queries `[b, heads, s, head_dim]`, keys and values `[b, kv_heads, s, head_dim]` of
    /// `x [b, s, hidden]`: the projections (with their biases), Qwen3's per-head RMSNorm of
    /// queries and keys, then RoPE on queries and keys.
    fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize, norm: Option<&Tensor>| -> Result<Tensor> {
            let t = t.reshape((b, s, heads, self.head_dim))?;
            let t = match norm {
                Some(w) => crate::ops::rms_norm_composed(&t, w, self.eps)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?.contiguous()?)
        };
        let (q_norm, k_norm) = self.qk_norm.as_ref().map_or((None, None), |(q, k)| (Some(q), Some(k)));
        let q = rope(&split(self.q.forward(x)?, self.heads, q_norm)?, cos, sin)?;
        let k = rope(&split(self.k.forward(x)?, self.kv_heads, k_norm)?, cos, sin)?;
        let v = split(self.v.forward(x)?, self.kv_heads, None)?;
        Ok((q, k, v))
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (q, k, v) = self.project(x, cos, sin)?;
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
