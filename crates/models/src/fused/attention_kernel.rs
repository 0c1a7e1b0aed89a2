//! Causal self-attention with rotary embeddings: [`AttentionSpec`] (geometry, rotary tables,
//! masking, the forward and backward kernels) and the [`attention`] op.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu, fusable};
use slime_kernels::{MatMut, MatRef, Threads, matmul, vmath};

use crate::Result;
use crate::host::{HostF32, f32_slice, recycle, rope_row_bwd, scratch};

// ---------------------------------------------------------------------------------------------
// Attention

/// Query rows per block of the attention kernels. A block's rows `r0..r1` attend to keys
/// `0..r1` only, so the products skip the masked blocks above the diagonal (at 64 rows: 3 of 4
/// block pairs computed at 128 tokens, 52% at 2,048), and with a sliding window also the keys
/// before the block's window; a block's scores (at most 64 x seq) stay in cache instead of a
/// seq x seq matrix per head.
const QUERY_BLOCK: usize = 64;

/// `(r0, r1)`: the query-row blocks of a sequence of `seq` tokens.
fn query_blocks(seq: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq).step_by(QUERY_BLOCK).map(move |r0| (r0, (r0 + QUERY_BLOCK).min(seq)))
}

/// Most bytes of attention probabilities one attention call keeps from its forward to its
/// backward pass (8 MiB: 4 rows of 224 positions at 8 heads take 4 MiB; 4 rows of 512, 18 MiB,
/// recompute them as longer sequences do).
pub const KEPT_PROBS_BYTES: usize = 8 << 20;

/// Floats of attention probabilities the fused attention keeps from its forward to its backward
/// pass, when it keeps them (activations kept, no soft-capping, no q/k head norm, and this count
/// at most a quarter of [`KEPT_PROBS_BYTES`]), for `batch` rows of `seq` positions and `heads`
/// query heads: per row and head, each query block's `(r1 - r0) x r1` scores (the keys up to the
/// block's end).
pub fn kept_probability_floats(batch: usize, seq: usize, heads: usize) -> usize {
    batch * heads * query_blocks(seq).map(|(r0, r1)| (r1 - r0) * r1).sum::<usize>()
}

/// The geometry, rotary tables and padding of one attention call, shared by every layer of a
/// forward pass (and by the backward passes, which recompute the scores).
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    scale: f32,
    /// `[seq, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `[batch, seq]`, non-zero = real token; `None` = every token is real.
    real: Option<Vec<u8>>,
    /// Per batch row: the first real position (`seq` if none).
    first_real: Vec<usize>,
    /// Per batch row: the first padding position (`seq` if none).
    first_masked: Vec<usize>,
    /// Per batch row `(g0, g1)`: queries at `g1..` do not see keys `g0..g1`, and their rotary
    /// positions are `g1 - g0` lower (two branches sharing a prefix, see [`Self::with_branches`]);
    /// `(seq, seq)` for an ordinary row.
    gap: Vec<(usize, usize)>,
    /// Soft-capping of the scaled scores, `cap * tanh(s / cap)`, before the mask (Gemma 2).
    softcap: Option<f32>,
    /// Sliding window: a query at rotary position `p` sees keys at positions `> p - window`
    /// (Gemma's local layers).
    window: Option<usize>,
}

impl AttentionSpec {
    /// `batch x seq` tokens, `heads` query heads sharing `kv_heads` key/value heads (grouped-query
    /// attention: query head `h` reads key/value head `h / (heads / kv_heads)`), rotary
    /// inverse frequencies `inv_freq` (`head_dim / 2` of them) and an optional `[batch, seq]`
    /// padding mask (1 = real token).
    pub fn new(
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        inv_freq: &[f64],
        padding: Option<&Tensor>,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let head_dim = 2 * half;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || half == 0 {
            return Err(crate::ModelError::Input {
                input: "attention",
                reason: format!("{heads} heads, {kv_heads} key/value heads, head_dim {head_dim}"),
            });
        }
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for pos in 0..seq {
            for f in inv_freq {
                // The same f32 angle as `ops::rope_tables`.
                let a = (pos as f64 * f) as f32;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let real: Option<Vec<u8>> = match padding {
            Some(m) => Some(m.to_dtype(DType::U8)?.flatten_all()?.to_vec1()?),
            None => None,
        };
        if let Some(r) = &real
            && r.len() != batch * seq
        {
            return Err(crate::ModelError::Input {
                input: "attention_mask",
                reason: format!("{} elements for {batch} x {seq} tokens", r.len()),
            });
        }
        let first_real = (0..batch)
            .map(|b| match &real {
                Some(r) => r[b * seq..(b + 1) * seq].iter().position(|&v| v != 0).unwrap_or(seq),
                None => 0,
            })
            .collect();
        let first_masked = (0..batch)
            .map(|b| match &real {
                Some(r) => r[b * seq..(b + 1) * seq].iter().position(|&v| v == 0).unwrap_or(seq),
                None => seq,
            })
            .collect();
        let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
        let gap = vec![(seq, seq); batch];
        Ok(Self {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            scale,
            cos,
            sin,
            real,
            first_real,
            first_masked,
            gap,
            softcap: None,
            window: None,
        })
    }

    /// Scores scaled by `scale` instead of `1 / sqrt(head_dim)` (Gemma 2/3:
    /// `query_pre_attn_scalar^-1/2`).
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale as f32;
        self
    }

    /// Soft-capped scores: `cap * tanh(s / cap)` of the scaled scores `s`, before the mask and
    /// the softmax (Gemma 2's `attn_logit_softcapping`); `None` leaves them as they are.
    pub fn with_softcap(mut self, cap: Option<f64>) -> Self {
        self.softcap = cap.map(|c| c as f32);
        self
    }

    /// A sliding window of `window` keys: a query sees key `j` only if `i - j < window` in
    /// rotary positions (transformers' sliding-window layers: itself and the `window - 1` keys
    /// before it; in a second branch, distances count through the prefix as in the row
    /// `[prefix | branch]`). A padding query that sees no real key keeps only its own position.
    /// `None`: no window.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window.map(|w| w.max(1));
        self
    }

    /// Rows holding two continuations of one prefix, `[prefix | first | second | padding]`
    /// (a preference pair with its prompt once): per batch row `(prefix, first)` lengths. The
    /// second branch does not attend to the first, and its rotary positions continue from the
    /// prefix, so every position computes exactly what it would in a row `[prefix | branch]`.
    /// Rows must be right-padded (no padding before the end of the second branch).
    pub fn with_branches(mut self, branches: &[(usize, usize)]) -> Result<Self> {
        if branches.len() != self.batch {
            return Err(crate::ModelError::Input {
                input: "branches",
                reason: format!("{} rows for a batch of {}", branches.len(), self.batch),
            });
        }
        for (b, &(prefix, first)) in branches.iter().enumerate() {
            if prefix + first > self.first_masked[b] || self.first_real[b] != 0 {
                return Err(crate::ModelError::Input {
                    input: "branches",
                    reason: format!(
                        "row {b}: prefix {prefix} + first branch {first} tokens, but padding at {} (rows must be right-padded)",
                        self.first_masked[b]
                    ),
                });
            }
            self.gap[b] = (prefix, prefix + first);
        }
        Ok(self)
    }

    /// The rotary position of token `t` of batch row `b`.
    fn pos(&self, b: usize, t: usize) -> usize {
        let (g0, g1) = self.gap[b];
        if t >= g1 { t - (g1 - g0) } else { t }
    }

    /// The key ranges the query block `r0..r1` of row `b` needs scores for (either may be
    /// empty): keys `0..r1`, minus the hidden first branch when the whole block is in the second,
    /// and with a window minus the keys before the lowest one any query of the block sees (each
    /// range cut on its own: a second-branch query at rotary position `p` sees prefix keys from
    /// `p + 1 - window` and branch keys from its own index `+ 1 - window`). Rows still mask
    /// per query inside them ([`Self::softmax_row`]); every query's own key is in them.
    fn key_ranges(&self, b: usize, r0: usize, r1: usize) -> [(usize, usize); 2] {
        let (g0, g1) = self.gap[b];
        let Some(w) = self.window else {
            return if r0 >= g1 { [(0, g0), (g1, r1)] } else { [(0, r1), (r1, r1)] };
        };
        // Within a region (before `g1`, or the second branch) the lowest visible key grows with
        // the query, so the block's first query in each region bounds it.
        let from = |p: usize| (p + 1).saturating_sub(w);
        if r0 >= g1 {
            // Prefix keys `j` (position `j`) and branch keys `j` (position `j - (g1 - g0)`).
            [(from(self.pos(b, r0)).min(g0), g0), (from(r0).max(g1), r1)]
        } else {
            // Queries before `g1` see keys from `r0 + 1 - window`; second-branch queries of a
            // block straddling `g1` (the first at position `g0`) see prefix keys from
            // `g0 + 1 - window` and their own branch's keys, all at `g1..r1`.
            let lo = if r1 > g1 { from(r0).min(from(g0)) } else { from(r0) };
            [(lo, r1), (r1, r1)]
        }
    }

    pub(super) fn q_cols(&self) -> usize {
        self.heads * self.head_dim
    }

    pub(super) fn kv_cols(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    pub(super) fn qkv_cols(&self) -> usize {
        self.q_cols() + 2 * self.kv_cols()
    }

    fn tables(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.head_dim / 2;
        (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half])
    }

    /// `qkv` rearranged head-major, with the rotary embedding applied to queries and keys: per
    /// batch row, `[heads + 2 kv_heads, seq, head_dim]` (rotated query heads, rotated key heads,
    /// value heads), so every head the kernels read is one contiguous `[seq, head_dim]` block.
    /// One pass over the rows in order (each `qkv` row read once, whole), instead of a strided
    /// column read per head, which missed the cache on every row.
    pub(super) fn head_major(&self, qkv: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (s, d, heads, kv) = (self.seq, self.head_dim, self.heads, self.kv_heads);
        let (cols, qc, kc) = (self.qkv_cols(), self.q_cols(), self.kv_cols());
        self.check(qkv.len(), cols, "attention qkv")?;
        let mut out = vec![0f32; qkv.len()];
        out.par_chunks_mut(s * cols).enumerate().for_each(|(b, ob)| {
            for (t, row) in qkv[b * s * cols..(b + 1) * s * cols].chunks_exact(cols).enumerate() {
                let (c, sn) = self.tables(self.pos(b, t));
                vmath::rope_heads(&mut ob[t * d..], s * d, &row[..qc], heads, c, sn);
                vmath::rope_heads(&mut ob[(heads * s + t) * d..], s * d, &row[qc..qc + kc], kv, c, sn);
                for (g, v) in row[qc + kc..].chunks_exact(d).enumerate() {
                    ob[((heads + kv + g) * s + t) * d..][..d].copy_from_slice(v);
                }
            }
        });
        Ok(out)
    }

    /// Turns the raw scores of query `i` of batch row `b` (`row`: keys `0..row.len()`, at least
    /// `i + 1` of them) into attention probabilities: scaled, causal and padding-masked (a query
    /// with no real key up to itself keeps only its own position, as
    /// [`crate::ops::attention_mask`]; a second branch does not see the first), softmax over the
    /// allowed keys, 0 elsewhere. Only the allowed scores are read.
    fn softmax_row(&self, b: usize, i: usize, row: &mut [f32], dcap: Option<&mut [f32]>) {
        if self.softcap.is_some() || self.window.is_some() {
            return self.softmax_row_gemma(b, i, row, dcap);
        }
        let s = self.seq;
        if i < self.first_real[b] {
            row.fill(0.0);
            row[i] = 1.0;
            return;
        }
        let (g0, g1) = self.gap[b];
        let hidden = |j: usize| i >= g1 && (g0..g1).contains(&j);
        let (live, dead) = row.split_at_mut(i + 1);
        dead.fill(0.0);
        if i < self.first_masked[b] {
            // Every key up to the query is real (but a hidden first branch): the vectorised row
            // kernels on the one or two allowed ranges.
            let (a, rest) = live.split_at_mut(if i >= g1 { g0 } else { i + 1 });
            let (gap, c) = rest.split_at_mut(if i >= g1 { g1 - g0 } else { 0 });
            gap.fill(0.0);
            let m = vmath::scale_max(a, self.scale).max(vmath::scale_max(c, self.scale));
            let sum = vmath::exp_shifted_sum(a, m) + vmath::exp_shifted_sum(c, m);
            a.iter_mut().chain(c.iter_mut()).for_each(|v| *v /= sum);
            return;
        }
        let real = self.real.as_ref().map(|r| &r[b * s..(b + 1) * s]);
        let allowed = |j: usize| real.is_none_or(|r| r[j] != 0) && !hidden(j);
        let mut m = f32::NEG_INFINITY;
        for (j, v) in live.iter_mut().enumerate() {
            if allowed(j) {
                *v *= self.scale;
                m = m.max(*v);
            }
        }
        let mut sum = 0f32;
        for (j, v) in live.iter_mut().enumerate() {
            if allowed(j) {
                *v = vmath::exp(*v - m);
                sum += *v;
            } else {
                *v = 0.0;
            }
        }
        for v in live.iter_mut() {
            *v /= sum;
        }
    }

    /// [`Self::softmax_row`] with soft-capping and/or a sliding window: the scaled scores of the
    /// allowed keys are capped (`cap * tanh(s / cap)`), then the softmax over them. With `dcap`
    /// (the backward pass, soft-capping only), `dcap[j]` receives the cap's derivative
    /// `1 - tanh^2` at each allowed key and 0 elsewhere (over `row`'s length).
    fn softmax_row_gemma(&self, b: usize, i: usize, row: &mut [f32], mut dcap: Option<&mut [f32]>) {
        let s = self.seq;
        if let Some(d) = dcap.as_deref_mut() {
            d[..row.len()].fill(0.0);
        }
        let own_only = |row: &mut [f32]| {
            row.fill(0.0);
            row[i] = 1.0;
        };
        if i < self.first_real[b] {
            return own_only(row);
        }
        let (g0, g1) = self.gap[b];
        let p = self.pos(b, i);
        let in_window = |j: usize| self.window.is_none_or(|w| p - self.pos(b, j) < w);
        let (live, dead) = row.split_at_mut(i + 1);
        dead.fill(0.0);
        // The allowed keys as at most two ranges (prefix / first part, second branch) when every
        // key up to the query is real; key by key otherwise.
        let real = self.real.as_ref().map(|r| &r[b * s..(b + 1) * s]);
        let allowed = |j: usize| real.is_none_or(|r| r[j] != 0) && !(i >= g1 && (g0..g1).contains(&j)) && in_window(j);
        let ranges: Vec<(usize, usize)> = if i < self.first_masked[b] {
            let (a1, c0) = if i >= g1 { (g0, g1) } else { (i + 1, i + 1) };
            let lo = |end: usize, start: usize| (start..end).find(|&j| in_window(j)).unwrap_or(end);
            vec![(lo(a1, 0), a1), (lo(i + 1, c0), i + 1)]
        } else {
            let mut out: Vec<(usize, usize)> = Vec::new();
            for j in (0..=i).filter(|&j| allowed(j)) {
                match out.last_mut() {
                    Some((_, e)) if *e == j => *e = j + 1,
                    _ => out.push((j, j + 1)),
                }
            }
            out
        };
        let ranges: Vec<(usize, usize)> = ranges.into_iter().filter(|(a, e)| e > a).collect();
        if ranges.is_empty() {
            return own_only(row);
        }
        let mut m = f32::NEG_INFINITY;
        for &(a, e) in &ranges {
            m = m.max(match self.softcap {
                Some(cap) => vmath::scale_cap_max(&mut live[a..e], self.scale, cap),
                None => vmath::scale_max(&mut live[a..e], self.scale),
            });
        }
        if let (Some(cap), Some(d)) = (self.softcap, dcap) {
            for &(a, e) in &ranges {
                for (d, &v) in d[a..e].iter_mut().zip(&live[a..e]) {
                    let t = v / cap;
                    *d = 1.0 - t * t;
                }
            }
        }
        let mut sum = 0f32;
        let mut next = 0;
        for &(a, e) in &ranges {
            live[next..a].fill(0.0);
            sum += vmath::exp_shifted_sum(&mut live[a..e], m);
            next = e;
        }
        live[next..].fill(0.0);
        for &(a, e) in &ranges {
            live[a..e].iter_mut().for_each(|v| *v /= sum);
        }
    }

    /// The probabilities of the query block `r0..r1` of head `h`, batch row `b`, into `pb`
    /// (`r1 - r0` rows of `r1` keys, row stride `r1`), from its rotated queries `qr` (all of the
    /// head's rows) and keys, transposed, `kt` (`[head_dim, seq]`: the product then packs its
    /// operand by plain copies): scores only for the keys the block may see, then `softmax_row`.
    /// With `dcap` (the backward pass of soft-capped scores), also the cap's derivative there.
    fn block_probs(
        &self,
        b: usize,
        (r0, r1): (usize, usize),
        qr: &[f32],
        kt: &[f32],
        pb: &mut [f32],
        mut dcap: Option<&mut [f32]>,
    ) {
        let d = self.head_dim;
        for (k0, k1) in self.key_ranges(b, r0, r1).into_iter().filter(|(k0, k1)| k1 > k0) {
            // Scores of the block's queries (`qr`: seq x d) and keys k0..k1 (`kt`: d x seq).
            let (q, k) = (MatRef::row_major(&qr[r0 * d..], r1 - r0, d), MatRef::new(&kt[k0..], d, k1 - k0, self.seq));
            matmul(MatMut::new(&mut pb[k0..], r1 - r0, k1 - k0, r1), q, k, false, Threads::Single);
        }
        for (i, row) in (r0..r1).zip(pb.chunks_exact_mut(r1)) {
            let d = dcap.as_deref_mut().map(|d| &mut d[(i - r0) * r1..(i - r0 + 1) * r1]);
            self.softmax_row(b, i, row, d);
        }
    }

    /// Floats of one query head's kept probabilities ([`Self::forward_head_major`]): every query
    /// block's `(r1 - r0) x r1` block, in order.
    fn probs_per_head(&self) -> usize {
        kept_probability_floats(1, self.seq, 1)
    }

    /// Floats of attention probabilities a fused attention block with kept activations holds
    /// from its forward to its backward pass: [`kept_probability_floats`] of its geometry, or 0
    /// with soft-capped scores or over [`KEPT_PROBS_BYTES`] (and a block with a q/k head norm
    /// recomputes them too).
    pub fn kept_probabilities(&self) -> usize {
        if self.can_keep_probs() { kept_probability_floats(self.batch, self.seq, self.heads) } else { 0 }
    }

    /// Whether the forward pass can keep the probabilities for the backward pass: not soft-capped
    /// scores (they also need the cap's derivative, which the backward recomputes with them), and
    /// at most [`KEPT_PROBS_BYTES`] of them (they grow with the square of the sequence).
    pub(super) fn can_keep_probs(&self) -> bool {
        self.softcap.is_none() && kept_probability_floats(self.batch, self.seq, self.heads) * 4 <= KEPT_PROBS_BYTES
    }

    fn check(&self, n: usize, cols: usize, what: &str) -> candle_core::Result<()> {
        if n != self.batch * self.seq * cols {
            candle_core::bail!("{what}: {n} elements, expected {} x {} x {cols}", self.batch, self.seq)
        }
        Ok(())
    }

    /// Forward: `out [batch * seq, heads * head_dim]` from `qkv [batch * seq, (heads + 2 kv) * head_dim]`.
    pub(super) fn forward(&self, qkv: &[f32]) -> candle_core::Result<Vec<f32>> {
        Ok(self.forward_head_major(&self.head_major(qkv)?, false).0)
    }

    /// [`Self::forward`] from the head-major copy `hm` of `qkv` ([`Self::head_major`]); with
    /// `keep_probs` (and [`Self::can_keep_probs`]) also the attention probabilities, for
    /// [`Self::backward_head_major`] (per batch row, query head and query block the
    /// `(r1 - r0) x r1` block: about 4 MiB a layer for 4 rows of 224 positions and 8 heads),
    /// which then need not recompute them; otherwise an empty vector.
    pub(super) fn forward_head_major(&self, hm: &[f32], keep_probs: bool) -> (Vec<f32>, Vec<f32>) {
        let (s, d, kv) = (self.seq, self.head_dim, self.kv_heads);
        let (cols, qc) = (self.qkv_cols(), self.q_cols());
        let n_rep = self.heads / kv;
        let per_head = if keep_probs && self.can_keep_probs() { self.probs_per_head() } else { 0 };
        // Every element is written below (`block_probs` fills whole rows).
        let mut probs = if per_head > 0 { scratch(self.batch * self.heads * per_head) } else { Vec::new() };
        // Per (batch row, key/value head) task: its query heads' blocks of the kept probabilities
        // (in task order), if kept.
        let kept: Vec<Option<&mut [f32]>> = if per_head > 0 {
            probs.chunks_mut(n_rep * per_head).map(Some).collect()
        } else {
            (0..self.batch * kv).map(|_| None).collect()
        };
        // The output head-major, `[batch, heads, seq, head_dim]`: each task's query heads are one
        // contiguous block; products add into it from 0.
        let mut ohm = scratch(self.batch * s * qc);
        ohm.fill(0.0);
        // Per (batch row, key/value head) task, per query head and query block: the block's
        // probabilities (at most QUERY_BLOCK x seq, cache-sized, or in `probs`), then `out += P V`.
        ohm.par_chunks_mut(n_rep * s * d).zip(kept).enumerate().for_each_init(
            || (vec![0f32; s * d], vec![0f32; if per_head > 0 { 0 } else { QUERY_BLOCK * s }]),
            |(kt, scratch), (task, (out, mut kept))| {
                let (b, g) = (task / kv, task % kv);
                let head = |i: usize| &hm[(b * cols + i * d) * s..][..s * d];
                transpose(head(self.heads + g), d, kt);
                let v = head(self.heads + kv + g);
                for (j, out) in out.chunks_exact_mut(s * d).enumerate() {
                    let qr = head(g * n_rep + j);
                    let mut at = j * per_head;
                    for (r0, r1) in query_blocks(s) {
                        let len = (r1 - r0) * r1;
                        let pb = match kept.as_deref_mut() {
                            Some(kept) => {
                                at += len;
                                &mut kept[at - len..at]
                            }
                            None => &mut scratch[..len],
                        };
                        self.block_probs(b, (r0, r1), qr, kt, pb, None);
                        for (k0, k1) in self.key_ranges(b, r0, r1).into_iter().filter(|(k0, k1)| k1 > k0) {
                            // out[r0..r1] += P[.., k0..k1] V[k0..k1]
                            let pk = MatRef::new(&pb[k0..], r1 - r0, k1 - k0, r1);
                            let vk = MatRef::row_major(&v[k0 * d..], k1 - k0, d);
                            let o = MatMut::row_major(&mut out[r0 * d..], r1 - r0, d);
                            matmul(o, pk, vk, true, Threads::Single);
                        }
                    }
                }
            },
        );
        // Heads side by side again: `[batch * seq, heads * head_dim]`.
        let heads = self.heads;
        let mut out = scratch(self.batch * s * qc);
        out.par_chunks_mut(s * qc).enumerate().for_each(|(b, rows)| {
            for (t, row) in rows.chunks_exact_mut(qc).enumerate() {
                for (h, o) in row.chunks_exact_mut(d).enumerate() {
                    o.copy_from_slice(&ohm[((b * heads + h) * s + t) * d..][..d]);
                }
            }
        });
        recycle(ohm);
        (out, probs)
    }

    /// Backward: `d qkv` (same layout as `qkv`) from `d out`. Per (batch row, key/value head),
    /// per query head and query block (`P`, `dP` and `dS` at most QUERY_BLOCK x seq): recompute
    /// the block's probabilities `P`, then `dV += P^T dO`, `dP = dO V^T`,
    /// `dS = P (dP - rowsum(P dP)) / sqrt(d)`, `dQ = dS K`, `dK += dS^T Q`, over the key ranges
    /// the block sees; finally rotate `dQ`, `dK` back.
    pub(super) fn backward(&self, qkv: &[f32], dout: &[f32]) -> candle_core::Result<Vec<f32>> {
        self.backward_head_major(self.head_major(qkv)?, &[], dout)
    }

    /// [`Self::backward`] from the head-major copy `hm` of `qkv` ([`Self::head_major`]), whose
    /// buffer becomes `d qkv`, and the probabilities the forward pass kept (empty: recompute
    /// them).
    pub(super) fn backward_head_major(
        &self,
        hm: Vec<f32>,
        probs: &[f32],
        dout: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let (s, d, kv) = (self.seq, self.head_dim, self.kv_heads);
        let (cols, qc, kc) = (self.qkv_cols(), self.q_cols(), self.kv_cols());
        self.check(hm.len(), cols, "attention qkv")?;
        self.check(dout.len(), qc, "attention grad")?;
        let n_rep = self.heads / kv;
        let per_head = if probs.is_empty() { 0 } else { self.probs_per_head() };
        if per_head > 0 && (probs.len() != self.batch * self.heads * per_head || !self.can_keep_probs()) {
            candle_core::bail!("attention: {} kept probabilities do not fit this attention", probs.len())
        }
        // The gradients head-major as `hm` (unrotated back at the end, row by row), split into
        // each (batch row, key/value head) task's blocks: its query heads', its key head's and
        // its value head's.
        let mut dhm = vec![0f32; hm.len()];
        let mut tasks = Vec::with_capacity(self.batch * kv);
        for (b, row) in dhm.chunks_mut(cols * s).enumerate() {
            let (dq, rest) = row.split_at_mut(self.heads * s * d);
            let (dk, dv) = rest.split_at_mut(kv * s * d);
            let groups = dq.chunks_mut(n_rep * s * d).zip(dk.chunks_mut(s * d)).zip(dv.chunks_mut(s * d));
            tasks.extend(groups.enumerate().map(|(g, ((dq, dk), dv))| (b, g, dq, dk, dv)));
        }
        tasks.into_par_iter().for_each_init(
            || {
                let block = || vec![0f32; QUERY_BLOCK * s];
                // The soft-cap derivative per score (soft-capped attention only).
                let cap = if self.softcap.is_some() { block() } else { Vec::new() };
                let probs = if per_head > 0 { Vec::new() } else { block() };
                ([vec![0f32; s * d], vec![0f32; s * d]], probs, block(), cap)
            },
            |([kt, vt], pb, dpb, cb), (b, g, dq_heads, dkr, dvv)| {
                let head = |i: usize| &hm[(b * cols + i * d) * s..][..s * d];
                let kr = head(self.heads + g);
                transpose(kr, d, kt);
                // V^T ([head_dim, seq]) for `dP = dO V^T`.
                transpose(head(self.heads + kv + g), d, vt);
                for (j, dqr) in dq_heads.chunks_exact_mut(s * d).enumerate() {
                    let h = g * n_rep + j;
                    let qr = head(h);
                    // Head h's columns of `d out` from batch row b's row `r`.
                    let dout_h = |r: usize, rows: usize| MatRef::new(&dout[(b * s + r) * qc + h * d..], rows, d, qc);
                    let mut at_p = (b * self.heads + h) * per_head;
                    for (r0, r1) in query_blocks(s) {
                        let (m, dpb) = (r1 - r0, &mut dpb[..(r1 - r0) * r1]);
                        let capped = self.softcap.is_some();
                        let pb: &[f32] = if per_head > 0 {
                            at_p += m * r1;
                            &probs[at_p - m * r1..at_p]
                        } else {
                            let pb = &mut pb[..m * r1];
                            self.block_probs(b, (r0, r1), qr, kt, pb, capped.then(|| &mut cb[..m * r1]));
                            pb
                        };
                        let ranges = self.key_ranges(b, r0, r1);
                        let live = || ranges.into_iter().filter(|(k0, k1)| k1 > k0);
                        let d_o = dout_h(r0, m);
                        for (k0, k1) in live() {
                            // dV[k0..k1] += P[.., k0..k1]^T dO[r0..r1]
                            let pt = MatRef::new(&pb[k0..], m, k1 - k0, r1).t();
                            matmul(MatMut::row_major(&mut dvv[k0 * d..], k1 - k0, d), pt, d_o, true, Threads::Single);
                            // dP[.., k0..k1] = dO[r0..r1] V[k0..k1]^T
                            let vtk = MatRef::new(&vt[k0..], d, k1 - k0, s);
                            matmul(MatMut::new(&mut dpb[k0..], m, k1 - k0, r1), d_o, vtk, false, Threads::Single);
                        }
                        for (ri, (prow, dprow)) in pb.chunks_exact(r1).zip(dpb.chunks_exact_mut(r1)).enumerate() {
                            // dS = P (dP - rowsum(P dP)) / sqrt(d) over the computed ranges
                            // (soft-capped: times the cap's derivative).
                            let dot: f32 = live().map(|(k0, k1)| vmath::dot(&prow[k0..k1], &dprow[k0..k1])).sum();
                            if capped {
                                let crow = &cb[ri * r1..(ri + 1) * r1];
                                for (k0, k1) in live() {
                                    let cs = &crow[k0..k1];
                                    for ((dv, &pv), &c) in dprow[k0..k1].iter_mut().zip(&prow[k0..k1]).zip(cs) {
                                        *dv = pv * (*dv - dot) * c * self.scale;
                                    }
                                }
                            } else {
                                for (k0, k1) in live() {
                                    vmath::softmax_bwd_row(&mut dprow[k0..k1], &prow[k0..k1], dot, self.scale);
                                }
                            }
                        }
                        let mut accumulate = false;
                        for (k0, k1) in live() {
                            // dQ[r0..r1] (+)= dS[.., k0..k1] K[k0..k1]
                            let ds = MatRef::new(&dpb[k0..], m, k1 - k0, r1);
                            let k = MatRef::row_major(&kr[k0 * d..], k1 - k0, d);
                            matmul(MatMut::row_major(&mut dqr[r0 * d..], m, d), ds, k, accumulate, Threads::Single);
                            accumulate = true;
                            // dK[k0..k1] += dS[.., k0..k1]^T Q[r0..r1]
                            let q = MatRef::row_major(&qr[r0 * d..], m, d);
                            matmul(MatMut::row_major(&mut dkr[k0 * d..], k1 - k0, d), ds.t(), q, true, Threads::Single);
                        }
                    }
                }
            },
        );
        // Back to `qkv`'s layout, rotating the query and key gradients back, into `hm`'s buffer
        // (the same size; every element is written below).
        let heads = self.heads;
        let mut dqkv = hm;
        dqkv.par_chunks_mut(s * cols).enumerate().for_each(|(b, rows)| {
            for (t, row) in rows.chunks_exact_mut(cols).enumerate() {
                let (c, sn) = self.tables(self.pos(b, t));
                let (rotated, values) = row.split_at_mut(qc + kc);
                for (i, o) in rotated.chunks_exact_mut(d).enumerate() {
                    rope_row_bwd(o, &dhm[(b * cols + i * d) * s + t * d..][..d], c, sn);
                }
                for (g, o) in values.chunks_exact_mut(d).enumerate() {
                    o.copy_from_slice(&dhm[(b * cols + (heads + kv + g) * d) * s + t * d..][..d]);
                }
            }
        });
        Ok(dqkv)
    }
}

/// `dst [cols, rows] = src^T` for the row-major `src [rows, cols]` (`rows = dst.len() / cols`).
fn transpose(src: &[f32], cols: usize, dst: &mut [f32]) {
    let rows = dst.len() / cols;
    for (t, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            dst[j * rows + t] = x;
        }
    }
}

struct AttentionOp(Arc<AttentionSpec>);

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "slime-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, l, "attention qkv")?;
        let out = self.0.forward(qkv)?;
        Ok((CpuStorage::F32(out), Shape::from((self.0.batch * self.0.seq, self.0.q_cols()))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let (xs, gs) = (HostF32::new(qkv, "attention qkv")?, HostF32::new(&g, "grad")?);
        let d = self.0.backward(xs.slice(), gs.slice())?;
        Ok(Some(cpu(d, qkv.shape())?))
    }
}

/// Causal self-attention with rotary embeddings and grouped-query heads, from the fused
/// projection `qkv [batch * seq, (heads + 2 kv_heads) * head_dim]` (queries, then keys, then
/// values, each head-major as the Hugging Face projections) to `[batch * seq, heads * head_dim]`
/// (heads concatenated, ready for the output projection). Equal to [`crate::ops::rope`] on q and
/// k, [`crate::ops::repeat_kv`], scores `q k^T / sqrt(head_dim)` plus
/// [`crate::ops::attention_mask`], softmax and `p v`; no `[batch, heads, seq, seq]` tensor or
/// mask is kept (the backward recomputes the scores per head). With [`AttentionSpec::with_scale`],
/// [`AttentionSpec::with_softcap`] and [`AttentionSpec::with_window`], Gemma's attention: scores
/// `cap * tanh(scale q k^T / cap)` and keys at most `window - 1` positions back; with a window,
/// each query block computes scores (and the backward's products) only over the keys some of its
/// queries can see, so a local layer's products grow with `window` plus the block's rows, not
/// with the sequence (the per-row masking still passes over every key up to the query). f32 CPU
/// only; see [`crate::ops::attention_composed`] for the composition the other devices use.
pub fn attention(qkv: &Tensor, spec: &Arc<AttentionSpec>) -> Result<Tensor> {
    if !fusable(&[qkv]) {
        return Err(crate::ModelError::Input {
            input: "qkv",
            reason: "the fused attention runs on f32 CPU tensors; use ops::attention_composed".into(),
        });
    }
    Ok(qkv.contiguous()?.apply_op1(AttentionOp(spec.clone()))?)
}
