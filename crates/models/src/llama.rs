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
//! Any family whose layers are Llama's (plus these options and a sliding window on every layer)
//! is a configuration implementing [`LlamaLike`], run by [`LlamaStack`] (Mistral is one). On f32
//! CPU every layer is one [`fused::attention_block`] (biases, q/k norms and the window inside) and
//! one [`fused::mlp_block_with`] op; other devices and dtypes run the composed reference.
//!
//! Unlike candle-transformers' inference model, the forward pass covers whole right-padded
//! sequences, keeps no KV cache and records a backward pass through every weight.

use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::Result;
use crate::config::LlamaConfig;
use crate::decoder::Decoder;
use crate::family::{Family, FamilyConfig, FusedInput, fused_layers};
use crate::fused::{self, AttentionExtras, AttentionSpec};
use crate::generation::{self, KvCache};
use crate::lora::{Adapters, Proj};
use crate::ops::{repeat_kv, rope, rope_tables};

/// A Llama, Qwen2 or Qwen3 model (see [`Decoder`] for its methods).
pub type Llama = Decoder<LlamaStack<LlamaConfig>>;

/// The shape and options of a Llama-architecture stack, as a [`LlamaLike`] configuration gives
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct StackSpec {
    /// Vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE inverse frequencies (`head_dim / 2`).
    pub inv_freq: Vec<f64>,
    /// Longest sequence (`max_position_embeddings`).
    pub max_positions: usize,
    /// Whether `lm_head` is the embedding matrix.
    pub tied: bool,
    /// Bias on q/k/v_proj (Qwen2; Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Every layer attends only to the last `window` positions, `i - j < window` (Mistral).
    pub window: Option<usize>,
}

impl StackSpec {
    /// Every weight with its shape, Hugging Face names (with the attention biases and q/k norm
    /// weights the options ask for; no `lm_head` when tied).
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, hd, i) = (self.hidden, self.head_dim, self.intermediate);
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![self.vocab, h]),
            ("model.norm.weight".to_string(), vec![h]),
        ];
        if !self.tied {
            out.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            ]);
            if self.qkv_bias {
                out.extend([
                    (format!("{p}.self_attn.q_proj.bias"), vec![q]),
                    (format!("{p}.self_attn.k_proj.bias"), vec![kv]),
                    (format!("{p}.self_attn.v_proj.bias"), vec![kv]),
                ]);
            }
            if self.o_bias {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            if self.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
        }
        out
    }
}

/// A configuration whose model is a Llama-architecture stack: its family is [`LlamaStack`]
/// over it, with no model code of its own.
pub trait LlamaLike: FamilyConfig + Clone + 'static {
    /// The stack this configuration describes.
    fn stack_spec(&self) -> StackSpec;
}

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

/// The layers and weights of a Llama-architecture model with configuration `C`.
pub struct LlamaStack<C> {
    cfg: C,
    spec: StackSpec,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

/// The projection `{name}.weight` `[out, inp]`, with `{name}.bias` `[out]` when `bias`.
fn linear(vb: &VarBuilder, inp: usize, out: usize, name: &str, lora: Option<&Adapters>, bias: bool) -> Result<Proj> {
    let b = if bias { Some(vb.get(out, &format!("{name}.bias"))?) } else { None };
    Ok(Proj::new(vb.get((out, inp), &format!("{name}.weight"))?, name, lora).with_bias(b))
}

/// The additive sliding-window mask `[seq, seq]`: `-1e30` where `i - j >= window` (the causal
/// part is the caller's).
pub(crate) fn window_mask(seq: usize, window: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> =
        (0..seq).flat_map(|i| (0..seq).map(move |j| if i >= j + window { -1e30 } else { 0.0 })).collect();
    Ok(Tensor::from_vec(data, (seq, seq), device)?.to_dtype(dtype)?)
}

impl<C: LlamaLike> Family for LlamaStack<C> {
    type Config = C;

    /// Every weight under Hugging Face names (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.q_proj.weight`, ...; Qwen: `self_attn.{q,k,v}_proj.bias`,
    /// `self_attn.{q,k}_norm.weight`).
    fn build(cfg: &C, vb: VarBuilder, lora: Option<&Adapters>) -> Result<Self> {
        let spec = cfg.stack_spec();
        let (h, hd, i) = (spec.hidden, spec.head_dim, spec.intermediate);
        let (nq, nkv) = (spec.heads, spec.kv_heads);
        let embed_w = vb.get((spec.vocab, h), "model.embed_tokens.weight")?;
        let layers = (0..spec.layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let proj = |inp, out, name: &str, bias| linear(&vb, inp, out, &format!("{p}.{name}"), lora, bias);
                Ok(Layer {
                    input_norm: vb.get(h, &format!("{p}.input_layernorm.weight"))?,
                    attn: Attention {
                        q: proj(h, nq * hd, "self_attn.q_proj", spec.qkv_bias)?,
                        k: proj(h, nkv * hd, "self_attn.k_proj", spec.qkv_bias)?,
                        v: proj(h, nkv * hd, "self_attn.v_proj", spec.qkv_bias)?,
                        o: proj(nq * hd, h, "self_attn.o_proj", spec.o_bias)?,
                        qk_norm: if spec.qk_norm {
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
                        eps: spec.eps,
                    },
                    post_norm: vb.get(h, &format!("{p}.post_attention_layernorm.weight"))?,
                    mlp: Mlp {
                        gate: proj(h, i, "mlp.gate_proj", false)?,
                        up: proj(h, i, "mlp.up_proj", false)?,
                        down: proj(i, h, "mlp.down_proj", false)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if spec.tied { embed_w.clone() } else { vb.get((spec.vocab, h), "lm_head.weight")? };
        Ok(Self {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, h),
            layers,
            norm: vb.get(h, "model.norm.weight")?,
            lm_head,
            spec,
        })
    }

    fn config(&self) -> &C {
        &self.cfg
    }

    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// f32 CPU weights (Llama and Qwen alike: biases and q/k norms go in as
    /// [`AttentionExtras`], active adapters as [`fused::LowRank`]).
    fn fusable(&self) -> bool {
        fused::fusable(&[self.embed.embeddings(), &self.norm])
    }

    /// Per layer one [`fused::attention_block`] (the window, if any, in its [`AttentionSpec`])
    /// and one [`fused::mlp_block_with`] op on the `[batch * seq, hidden]` residual stream.
    fn hidden_fused(&self, input: FusedInput<'_>) -> Result<Tensor> {
        let s = &self.spec;
        let (batch, seq) =
            crate::ops::check_fused_input(input.input_ids, input.attention_mask, input.branches, s.max_positions)?;
        let mut spec = AttentionSpec::new(batch, seq, s.heads, s.kv_heads, &s.inv_freq, input.attention_mask)?
            .with_window(s.window);
        if let Some(branches) = input.branches {
            spec = spec.with_branches(branches)?;
        }
        let spec = Arc::new(spec);
        let (eps, acts, meter) = (s.eps, input.acts, input.meter);
        let x = self.embed.forward(input.input_ids)?.reshape((batch * seq, s.hidden))?;
        let attention = |l: usize, x: &Tensor| -> Result<Tensor> {
            let (layer, a) = (&self.layers[l], &self.layers[l].attn);
            let qkvo = [a.q.weight(), a.k.weight(), a.v.weight(), a.o.weight()];
            fused::attention_block(x, &layer.input_norm, qkvo, a.extras()?, &spec, eps, acts, meter)
        };
        let mlp = |l: usize, x: &Tensor| -> Result<Tensor> {
            let (layer, m) = (&self.layers[l], &self.layers[l].mlp);
            let extras = fused::MlpExtras {
                lora: [m.gate.low_rank(), m.up.low_rank(), m.down.low_rank()],
                ..Default::default()
            };
            let weights = [m.gate.weight(), m.up.weight(), m.down.weight()];
            fused::mlp_block_with(x, &layer.post_norm, weights, extras, eps, acts, meter)
        };
        let x = fused_layers(x, self.layers.len(), input.keep, attention, mlp)?;
        fused::rms_norm(&x, &self.norm, eps)
    }

    fn hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut mask = crate::ops::input_attention_mask(input_ids, attention_mask, self.spec.max_positions)?;
        if let Some(w) = self.spec.window {
            mask = mask.broadcast_add(&window_mask(seq, w, mask.dtype(), device)?)?;
        }
        let dtype = self.embed.embeddings().dtype();
        let (cos, sin) = rope_tables(&self.spec.inv_freq, seq, dtype, device)?;
        let eps = self.spec.eps;
        let norm = |x: &Tensor, w: &Tensor| crate::ops::rms_norm_composed(x, w, eps);
        let mut x = self.embed.forward(input_ids)?;
        for layer in &self.layers {
            x = (&x + layer.attn.forward(&norm(&x, &layer.input_norm)?, &mask, &cos, &sin)?)?;
            x = (&x + layer.mlp.forward(&norm(&x, &layer.post_norm)?)?)?;
        }
        norm(&x, &self.norm)
    }

    fn hidden_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        cache.check(self.layers.len(), input_ids.dim(0)?)?;
        let (_, n) = generation::check_step(input_ids, cache, self.spec.max_positions)?;
        let (hd, eps) = (self.spec.head_dim, self.spec.eps);
        let mut x = self.embed.forward(input_ids)?.detach();
        let (cos, sin) = generation::rope_tables_at(&self.spec.inv_freq, cache, n, &x)?;
        for (idx, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let h = crate::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let (q, k, v) = a.project(&h, &cos, &sin)?;
            // The cache applies the layer's window (`KvCache::new` reads it from the config).
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
