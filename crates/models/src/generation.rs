//! Incremental decoding with a key/value cache: the inference path behind
//! [`crate::Model::generate_greedy`], [`crate::Model::generate_sampled`] and their batched forms.
//!
//! The training forward ([`crate::Model::forward_hidden`]) runs whole sequences and keeps no state.
//! Decoding instead feeds the prompt once and then one token per step; each layer's keys (after
//! QK-norm and RoPE) and values are kept in a [`KvCache`] the caller owns and passes by `&mut`,
//! so the model itself stays immutable and shareable. Sliding-window layers (Gemma 2 / 3, Mistral) keep
//! only the last `sliding_window` positions, with the same strict bound as the full forward
//! (query `i` sees key `j` iff `j <= i` and `i - j < window`). Cached tensors are detached, so
//! no autograd graph survives a step.
//!
//! Prompts of different lengths share one batch by left padding ([`KvCache::left_padded`]): row
//! `r` starts with `pad[r]` filler slots, its token in slot `p` sits at position `p - pad[r]`
//! (RoPE per row), and its queries never see keys in slots `< pad[r]` (score `-inf` before
//! softmax; a filler query sees only itself, so no softmax row is empty). Slot distances equal
//! position distances within a row, so causal and sliding-window bounds are unchanged; every
//! real query's keys, positions and values are those of the row decoded alone.

use candle_core::{DType, Tensor};

use crate::{Model, ModelError, Result};

/// One layer's cached keys and values `[batch, kv_heads, len, head_dim]` for slots
/// `start..start + len`.
#[derive(Clone)]
struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    start: usize,
    window: Option<usize>,
}

/// Keys and values of every layer for the slots fed so far (one per model layer; built for
/// one model by [`KvCache::new`] or [`KvCache::left_padded`]). Pass the same cache to successive
/// [`Model::forward_cached`] calls; [`KvCache::reset`] empties it for a new sequence.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Slots fed so far (the slot of the next token).
    pos: usize,
    /// Leading filler slots of each row; empty: no padding, any batch size.
    pad: Vec<usize>,
}

impl KvCache {
    /// An empty cache shaped for `model` (its layer count and sliding windows).
    pub fn new(model: &Model) -> Self {
        Self {
            layers: model
                .config()
                .layer_windows()
                .into_iter()
                .map(|window| LayerCache { kv: None, start: 0, window })
                .collect(),
            pos: 0,
            pad: Vec::new(),
        }
    }

    /// An empty cache for a left-padded batch: row `r`'s first `pad[r]` tokens are filler (any
    /// valid id), masked out as keys and not counted as positions. The first step must give
    /// every row at least one real token (`pad[r] < n`).
    pub fn left_padded(model: &Model, pad: Vec<usize>) -> Self {
        Self { pad, ..Self::new(model) }
    }

    /// Slots fed so far (the slot of the next token; with left padding, a row's position is
    /// this minus its padding).
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// The left padding of each row (empty without padding).
    pub fn padding(&self) -> &[usize] {
        &self.pad
    }

    /// Forgets every position and the padding (keeps the shape, for another sequence).
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.kv = None;
            l.start = 0;
        }
        self.pos = 0;
        self.pad.clear();
    }

    /// Keeps only the batch rows `rows` (indices into the current batch, increasing), e.g. when
    /// the other rows have finished decoding; filler slots no kept row needs any more are
    /// dropped.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        let Some(batch) = self.batch()? else {
            return Err(ModelError::Input { input: "rows", reason: "the cache holds no rows yet".into() });
        };
        if rows.is_empty() || rows.windows(2).any(|w| w[0] >= w[1]) || rows.iter().any(|&r| r >= batch) {
            return Err(ModelError::Input {
                input: "rows",
                reason: format!("{rows:?}: expected increasing row indices below the batch size {batch}"),
            });
        }
        let index = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(), rows.len(), &self.device())?;
        for l in &mut self.layers {
            if let Some((k, v)) = &l.kv {
                l.kv = Some((k.index_select(&index, 0)?, v.index_select(&index, 0)?));
            }
        }
        if !self.pad.is_empty() {
            self.pad = rows.iter().map(|&r| self.pad[r]).collect();
            self.drop_common_padding()?;
        }
        Ok(())
    }

    /// Removes the filler slots every row has (`min(pad)`), renumbering slots so the
    /// shortest-padded row starts at 0. Only masked keys are dropped.
    fn drop_common_padding(&mut self) -> Result<()> {
        let m = self.pad.iter().copied().min().unwrap_or(0).min(self.pos);
        if m == 0 {
            return Ok(());
        }
        for l in &mut self.layers {
            if let Some((k, v)) = &l.kv {
                let drop = m.saturating_sub(l.start);
                if drop > 0 {
                    let len = k.dim(2)?;
                    l.kv = Some((
                        k.narrow(2, drop, len - drop)?.contiguous()?,
                        v.narrow(2, drop, len - drop)?.contiguous()?,
                    ));
                }
            }
            l.start = l.start.max(m) - m;
        }
        self.pos -= m;
        for p in &mut self.pad {
            *p -= m;
        }
        Ok(())
    }

    /// The batch size of the cached tensors (or of the padding), if known yet.
    fn batch(&self) -> Result<Option<usize>> {
        if let Some((k, _)) = self.layers.iter().find_map(|l| l.kv.as_ref()) {
            return Ok(Some(k.dim(0)?));
        }
        Ok((!self.pad.is_empty()).then_some(self.pad.len()))
    }

    fn device(&self) -> candle_core::Device {
        self.layers.iter().find_map(|l| l.kv.as_ref()).map_or(candle_core::Device::Cpu, |(k, _)| k.device().clone())
    }

    /// Checks that the cache fits a model of `layers` layers and a batch of `batch` rows.
    pub(crate) fn check(&self, layers: usize, batch: usize) -> Result<()> {
        if self.layers.len() != layers {
            return Err(ModelError::Input {
                input: "cache",
                reason: format!("built for {} layers, the model has {layers}", self.layers.len()),
            });
        }
        if let Some(cached) = self.batch()?
            && cached != batch
        {
            return Err(ModelError::Input {
                input: "input_ids",
                reason: format!("batch {batch} does not match the cache's batch {cached}"),
            });
        }
        Ok(())
    }

    /// Position of slot `slot` in row `row` (0 for filler slots).
    fn position(&self, row: usize, slot: usize) -> usize {
        slot.saturating_sub(self.pad.get(row).copied().unwrap_or(0))
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.pos += n;
    }
}

/// Attention of `n` new slots `pos..pos + n` of layer `layer`: appends `k`, `v`
/// `[batch, kv_heads, n, head_dim]` (RoPE already applied) to the cache and attends `q`
/// `[batch, heads, n, head_dim]` over every cached key the causal, sliding-window and padding
/// masks allow. Scores are `q k^T / scale`, optionally soft-capped `cap * tanh(s / cap)`, then
/// `-inf` where masked. Returns `[batch, n, heads * head_dim]`.
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
    let pad = &cache.pad;
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
    let window = lc.window;
    // Query slot `i` of a row padded by `p` sees key slot `j`: causal, within the window, and
    // a real key; a filler query (`i < p`) sees only itself.
    let allowed = |p: usize, i: usize, j: usize| {
        if i < p {
            return i == j;
        }
        j <= i && j >= p && window.is_none_or(|w| i - j < w)
    };
    let rows: Vec<usize> = if pad.is_empty() { vec![0] } else { pad.clone() };
    // Keys are slots `start..pos + n`. One real query at `pos` sees them all when they lie in
    // its window and none is filler; several new queries always need the causal mask.
    let all_allowed = n == 1 && window.is_none_or(|w| pos - start < w) && rows.iter().all(|&p| p <= start);
    if !all_allowed {
        let mask: Vec<f32> = rows
            .iter()
            .flat_map(|&p| (0..n).flat_map(move |r| (0..len).map(move |c| (p, r, c))))
            .map(|(p, r, c)| if allowed(p, pos + r, start + c) { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let mask = Tensor::from_vec(mask, (rows.len(), 1, 1, n, len), q.device())?.to_dtype(scores.dtype())?;
        scores =
            scores.reshape((b, kv_heads, rep, n, len))?.broadcast_add(&mask)?.reshape((b, kv_heads, rep * n, len))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v_all.dtype())?;
    let out = probs.matmul(&v_all)?.reshape((b, heads, n, hd))?.transpose(1, 2)?.reshape((b, n, heads * hd))?;
    // Keep only what later queries can see: a sliding layer's last `window` slots.
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

/// RoPE cos/sin tables for the `n` new slots of `cache`: `[n, head_dim / 2]` for positions
/// `pos..pos + n` without padding, else `[batch, 1, n, head_dim / 2]` with each row's own
/// positions (bit for bit the rows of [`crate::ops::rope_tables`] at those positions).
pub(crate) fn rope_tables_at(inv_freq: &[f64], cache: &KvCache, n: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let pos = cache.pos;
    if cache.pad.is_empty() {
        return crate::ops::rope_tables_from(inv_freq, pos, n, x.dtype(), x.device());
    }
    let b = cache.pad.len();
    let positions: Vec<usize> =
        (0..b).flat_map(|r| (pos..pos + n).map(move |s| (r, s))).map(|(r, s)| cache.position(r, s)).collect();
    let lo = positions.iter().copied().min().unwrap_or(0);
    let hi = positions.iter().copied().max().unwrap_or(0);
    let (cos, sin) = crate::ops::rope_tables_from(inv_freq, lo, hi - lo + 1, x.dtype(), x.device())?;
    let index: Vec<u32> = positions.iter().map(|&p| (p - lo) as u32).collect();
    let index = Tensor::from_vec(index, b * n, x.device())?;
    let half = inv_freq.len();
    Ok((cos.index_select(&index, 0)?.reshape((b, 1, n, half))?, sin.index_select(&index, 0)?.reshape((b, 1, n, half))?))
}

/// `[batch, n]` u32 ids of a cached step, checked: at least one position; every row's
/// positions within `max_positions`; with left padding, every row has a real token by the end
/// of the step.
pub(crate) fn check_step(input_ids: &Tensor, cache: &KvCache, max_positions: usize) -> Result<(usize, usize)> {
    let (b, n) = input_ids.dims2()?;
    if b == 0 || n == 0 {
        return Err(ModelError::Input { input: "input_ids", reason: "need at least one row and one token".into() });
    }
    let end = cache.pos + n;
    if let Some(r) = cache.pad.iter().position(|&p| p >= end) {
        return Err(ModelError::Input {
            input: "padding",
            reason: format!("row {r} has {} filler slots but only {end} tokens were fed", cache.pad[r]),
        });
    }
    crate::ops::check_positions(end - cache.pad.iter().copied().min().unwrap_or(0), max_positions)?;
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
