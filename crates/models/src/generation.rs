//! Incremental decoding with a key/value cache: the inference path behind
//! [`crate::Model::generate_greedy`] and [`crate::Model::generate_sampled`].
//!
//! The training forward ([`crate::Model::forward_hidden`]) runs whole sequences and keeps no state.
//! Decoding instead feeds the prompt once and then one token per step; each layer's keys (after
//! QK-norm and RoPE) and values are kept in a [`KvCache`] the caller owns and passes by `&mut`,
//! so the model itself stays immutable and shareable. Sliding-window layers (Gemma 2 / 3) keep
//! only the last `sliding_window` positions, with the same strict bound as the full forward
//! (query `i` sees key `j` iff `j <= i` and `i - j < window`). Cached tensors are detached, so
//! no autograd graph survives a step.

use candle_core::{D, DType, Tensor};

use crate::{Model, ModelError, Result};

/// One layer's cached keys and values `[batch, kv_heads, len, head_dim]` for positions
/// `start..start + len`.
#[derive(Clone)]
struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    start: usize,
    window: Option<usize>,
}

/// Keys and values of every layer for the positions fed so far (one per model layer; built for
/// one model by [`KvCache::new`]). Pass the same cache to successive
/// [`Model::forward_cached`] calls; [`KvCache::reset`] empties it for a new sequence.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    pos: usize,
}

impl KvCache {
    /// An empty cache shaped for `model` (its layer count and sliding windows).
    pub fn new(model: &Model) -> Self {
        let windows: Vec<Option<usize>> = match model {
            Model::Llama(m) => vec![None; m.config().num_hidden_layers],
            Model::Gemma(m) => {
                let c = m.config();
                (0..c.num_hidden_layers).map(|l| if c.is_sliding(l) { c.sliding_window } else { None }).collect()
            }
        };
        Self { layers: windows.into_iter().map(|window| LayerCache { kv: None, start: 0, window }).collect(), pos: 0 }
    }

    /// Positions fed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Forgets every position (keeps the shape, for another sequence).
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.kv = None;
            l.start = 0;
        }
        self.pos = 0;
    }

    /// Checks that the cache fits a model of `layers` layers and a batch of `batch` rows.
    pub(crate) fn check(&self, layers: usize, batch: usize) -> Result<()> {
        if self.layers.len() != layers {
            return Err(ModelError::Input {
                input: "cache",
                reason: format!("built for {} layers, the model has {layers}", self.layers.len()),
            });
        }
        if let Some((k, _)) = self.layers.iter().find_map(|l| l.kv.as_ref())
            && k.dim(0)? != batch
        {
            return Err(ModelError::Input {
                input: "input_ids",
                reason: format!("batch {batch} does not match the cache's batch {}", k.dim(0)?),
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.pos += n;
    }
}

/// Attention of `n` new positions `pos..pos + n` of layer `layer`: appends `k`, `v`
/// `[batch, kv_heads, n, head_dim]` (RoPE already applied) to the cache and attends `q`
/// `[batch, heads, n, head_dim]` over every cached key the causal and sliding-window masks allow.
/// Scores are `q k^T / scale`, optionally soft-capped `cap * tanh(s / cap)` before masking.
/// Returns `[batch, n, heads * head_dim]`.
pub(crate) fn cached_attention(
    cache: &mut KvCache,
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let pos = cache.pos;
    let lc = &mut cache.layers[layer];
    let (b, heads, n, hd) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let (k_all, v_all) = match &lc.kv {
        Some((kc, vc)) => (Tensor::cat(&[kc, &k.detach()], 2)?, Tensor::cat(&[vc, &v.detach()], 2)?),
        None => (k.detach(), v.detach()),
    };
    let len = k_all.dim(2)?;
    let start = lc.start;
    // Grouped-query attention without repeating keys: the `rep` query heads of a key/value head
    // are adjacent, so `[b, heads, n, hd]` reads as `[b, kv_heads, rep * n, hd]`.
    let rep = heads / kv_heads;
    let qg = q.contiguous()?.reshape((b, kv_heads, rep * n, hd))?;
    let mut scores = (qg.matmul(&k_all.t()?)? / scale)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let allowed = |i: usize, j: usize| j <= i && lc.window.is_none_or(|w| i - j < w);
    let all_allowed = (0..n).all(|r| (0..len).all(|c| allowed(pos + r, start + c)));
    if !all_allowed {
        let mask: Vec<f32> = (0..n)
            .flat_map(|r| (0..len).map(move |c| (r, c)))
            .map(|(r, c)| if allowed(pos + r, start + c) { 0.0 } else { -1e30 })
            .collect();
        let mask = Tensor::from_vec(mask, (n, len), q.device())?.to_dtype(scores.dtype())?;
        scores =
            scores.reshape((b, kv_heads, rep, n, len))?.broadcast_add(&mask)?.reshape((b, kv_heads, rep * n, len))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v_all.dtype())?;
    let out = probs.matmul(&v_all)?.reshape((b, heads, n, hd))?.transpose(1, 2)?.reshape((b, n, heads * hd))?;
    // Keep only what later queries can see: a sliding layer's last `window` positions.
    let (k_keep, v_keep, start) = match lc.window {
        Some(w) if len > w => {
            (k_all.narrow(2, len - w, w)?.contiguous()?, v_all.narrow(2, len - w, w)?.contiguous()?, start + len - w)
        }
        _ => (k_all, v_all, start),
    };
    lc.kv = Some((k_keep, v_keep));
    lc.start = start;
    Ok(out)
}

/// RoPE cos/sin tables `[n, head_dim / 2]` for positions `start..start + n` (the same values as
/// rows `start..` of [`crate::ops::rope_tables`]).
pub(crate) fn rope_tables_at(inv_freq: &[f64], start: usize, n: usize, q: &Tensor) -> Result<(Tensor, Tensor)> {
    crate::ops::rope_tables_from(inv_freq, start, n, q.dtype(), q.device())
}

/// `[batch, n]` u32 ids of a cached step, checked: at least one position, within
/// `max_positions` after the `pos` positions already cached.
pub(crate) fn check_step(input_ids: &Tensor, pos: usize, max_positions: usize) -> Result<(usize, usize)> {
    let (b, n) = input_ids.dims2()?;
    if b == 0 || n == 0 {
        return Err(ModelError::Input { input: "input_ids", reason: "need at least one row and one token".into() });
    }
    crate::ops::check_positions(pos + n, max_positions)?;
    Ok((b, n))
}

/// Last-position logits `[batch, vocab]` f32 from hidden states `[batch, n, hidden]`.
pub(crate) fn last_logits(hidden: &Tensor, lm_head: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    let n = hidden.dim(1)?;
    let last = hidden.narrow(1, n - 1, 1)?.squeeze(1)?;
    let logits = last.matmul(&lm_head.t()?)?.to_dtype(DType::F32)?;
    Ok(match softcap {
        Some(cap) => ((logits / cap)?.tanh()? * cap)?,
        None => logits,
    }
    .detach())
}

/// Index of the largest logit in a `[1, vocab]` row.
pub(crate) fn argmax(logits: &Tensor) -> Result<u32> {
    logits
        .argmax(D::Minus1)?
        .flatten_all()?
        .to_vec1::<u32>()?
        .first()
        .copied()
        .ok_or_else(|| ModelError::Input { input: "logits", reason: "empty vocabulary".into() })
}
