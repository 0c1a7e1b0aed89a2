//! The attention half of a layer as one op: [`attention_block`] and its [`AttentionExtras`].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::activations::Saved;
use super::low_rank::{Adapter, LowRank};
use super::weight_grads::{BlockWeights, GradBuf, Packing, WeightLayout, route};
use super::{
    ActivationMeter, Activations, AttentionSpec, attention, cpu, fusable, linear, linear_residual, norm_linear,
    rms_norm,
};
use slime_kernels::{MatMut, MatRef, Threads, matmul, product};

use crate::Result;
use crate::host::{
    HeadNorm, HostF32, ROW_BLOCK, add_rows, col_sums, f32_slice, product_stacked, product_stacked_t, recycle,
    rms_norm_bwd_rows, rms_norm_bwd_rows_add, rms_norm_rows,
};

/// Which optional parameters an attention block carries after its four projection matrices
/// (q, k, v, o) among its weights, in this order: q, k and v biases, o_proj bias (`hidden`), q
/// norm weight (`head_dim`), k norm weight (`head_dim`), post-norm weight (`hidden`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BlockParts {
    qkv_bias: bool,
    o_bias: bool,
    qk_norm: bool,
    post_norm: bool,
}

/// Indices of an attention block's optional weights among its weights (after q, k, v, o).
struct OptionalWeights {
    /// The q bias; the k and v biases follow.
    qkv_bias: Option<usize>,
    o_bias: Option<usize>,
    /// The q norm weight; the k norm weight follows.
    qk_norm: Option<usize>,
    post_norm: Option<usize>,
}

/// `x + o(attention(rms_norm(x) [q|k|v]))`, weights (in [`BlockWeights`]' order) `q_proj,
/// k_proj, v_proj, o_proj`, followed by the optional parts of [`BlockParts`], then `A, B` of
/// each adapter (a projection with one adds `scale (input A^T) B^T`, before any bias):
/// `qkv = rms_norm(x) W_qkv^T (+ b_qkv)`, the query and key heads RMS-normalised (with q/k norm),
/// attention, `y = x + attn W_o^T (+ b_o)`. The saved activations: `qkv` (after the bias, before
/// the head norm, which the backward pass recomputes: one cheap row pass; without a head norm its
/// rotated head-major copy), the attention output and, without a head norm, the attention
/// probabilities (see [`AttentionSpec::kept_probabilities`]).
struct AttentionBlockOp {
    spec: Arc<AttentionSpec>,
    eps: f64,
    hidden: usize,
    parts: BlockParts,
    saved: Saved,
    /// Where the weights are read and which get gradients.
    layout: WeightLayout,
    /// The adapters of q_proj, k_proj, v_proj and o_proj.
    lora: [Option<Adapter>; 4],
}

impl AttentionBlockOp {
    fn optional(&self) -> OptionalWeights {
        let mut next = 4;
        let mut take = |present: bool, count: usize| {
            present.then(|| {
                next += count;
                next - count
            })
        };
        let qkv_bias = take(self.parts.qkv_bias, 3);
        let o_bias = take(self.parts.o_bias, 1);
        let qk_norm = take(self.parts.qk_norm, 2);
        let post_norm = take(self.parts.post_norm, 1);
        OptionalWeights { qkv_bias, o_bias, qk_norm, post_norm }
    }

    /// The q|k|v bias, concatenated (a copy of `qkv_cols` floats), if any.
    fn qkv_bias(&self, w: &BlockWeights) -> Option<Vec<f32>> {
        self.optional().qkv_bias.map(|i| w.pieces(i..i + 3).concat())
    }

    /// The o_proj bias, if any.
    fn o_bias<'a>(&self, w: &'a BlockWeights) -> Option<&'a [f32]> {
        self.optional().o_bias.map(|i| w.get(i))
    }

    /// The per-head q/k RMSNorm, if any.
    fn head_norm<'a>(&self, w: &'a BlockWeights) -> Option<HeadNorm<'a>> {
        self.optional().qk_norm.map(|i| HeadNorm {
            q: w.get(i),
            k: w.get(i + 1),
            heads: self.spec.heads,
            kv_heads: self.spec.kv_heads,
            eps: self.eps,
        })
    }

    /// The post-norm weight, if any.
    fn post<'a>(&self, w: &'a BlockWeights) -> Option<&'a [f32]> {
        self.optional().post_norm.map(|i| w.get(i))
    }

    /// The output projection `attn W_o^T (+ b_o)` of `n` rows, before any post-norm.
    fn project_out(&self, attn: &[f32], w: &BlockWeights, n: usize) -> Vec<f32> {
        let h = self.hidden;
        let mut m = vec![0f32; n * h];
        if let Some(b) = self.o_bias(w) {
            add_rows(&mut m, b);
        }
        self.add_out(attn, w, n, &mut m);
        m
    }

    /// `y += attn W_o^T (+ scale (attn A^T) B^T)` for `n` rows.
    fn add_out(&self, attn: &[f32], w: &BlockWeights, n: usize, y: &mut [f32]) {
        let (h, qc) = (self.hidden, self.spec.q_cols());
        let wo = w.get(3);
        let a = MatRef::row_major(attn, n, qc);
        matmul(MatMut::row_major(y, n, h), a, MatRef::row_major(wo, h, qc).t(), true, Threads::Pool);
        if let Some(ad) = &self.lora[3] {
            recycle(ad.forward(a, w, MatMut::row_major(y, n, h)));
        }
    }

    /// The first output column of q_proj, k_proj and v_proj in a `q|k|v` row.
    fn qkv_col(&self, p: usize) -> usize {
        let (qc, kc) = (self.spec.q_cols(), self.spec.kv_cols());
        [0, qc, qc + kc][p]
    }

    /// `(kept, attn, probs)` of the forward pass: `kept` is what the backward pass starts from,
    /// the head-major rotated copy ([`AttentionSpec::head_major`]) without a q/k head norm,
    /// `qkv` before the head norm with one (whose backward needs it); `probs` the attention
    /// probabilities when the block keeps its activations and the attention could keep them
    /// (without a q/k head norm or soft-capping, within its budget), else empty.
    fn activations(
        &self,
        x: &[f32],
        nw: &[f32],
        w: &BlockWeights,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (h, cols) = (self.hidden, self.spec.qkv_cols());
        let n = x.len() / h;
        let mut normed = vec![0f32; x.len()];
        rms_norm_rows(x, nw, self.eps, &mut normed);
        let mut qkv = product_stacked_t(n, h, &normed, &w.pieces(0..3));
        for p in 0..3 {
            if let Some(ad) = &self.lora[p] {
                // The adapter adds to its projection's columns of `qkv` (`n x cols`).
                let y = MatMut::new(&mut qkv[self.qkv_col(p)..], n, ad.out, cols);
                recycle(ad.forward(MatRef::row_major(&normed, n, h), w, y));
            }
        }
        drop(normed);
        if let Some(b) = self.qkv_bias(w) {
            add_rows(&mut qkv, &b);
        }
        Ok(match self.head_norm(w) {
            None => {
                let hm = self.spec.head_major(&qkv)?;
                drop(qkv);
                // Gradient checkpointing puts memory first: its backward recomputes them.
                let keep_probs = self.saved.policy == Activations::Keep;
                let (attn, probs) = self.spec.forward_head_major(&hm, keep_probs);
                (hm, attn, probs)
            }
            Some(norm) => {
                let attn = self.spec.forward(&Self::head_normed(&qkv, cols, &norm))?;
                (qkv, attn, Vec::new())
            }
        })
    }

    /// A copy of `qkv` with its query and key heads normalised.
    fn head_normed(qkv: &[f32], cols: usize, norm: &HeadNorm) -> Vec<f32> {
        let mut out = qkv.to_vec();
        norm.apply(&mut out, cols);
        out
    }

    fn check(&self, x: usize, nw: usize) -> candle_core::Result<()> {
        let (h, qc, kc) = (self.hidden, self.spec.q_cols(), self.spec.kv_cols());
        let matrices = [qc * h, kc * h, kc * h, h * qc];
        if nw != h || x != self.spec.batch * self.spec.seq * h || self.layout.lens[..4] != matrices {
            candle_core::bail!(
                "attention block: x {x}, norm {nw}, weights {:?} do not match hidden {h} ({:?})",
                self.layout.lens,
                self.parts
            )
        }
        Ok(())
    }
}

impl CustomOp3 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "slime-attention-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "attention block x")?;
        let nw = f32_slice(s2, l2, "attention block norm")?;
        let w = &BlockWeights::new(&self.layout, f32_slice(s3, l3, "attention block weights")?)?;
        self.check(x.len(), nw.len())?;
        let h = self.hidden;
        let n = x.len() / h;
        let (qkv, attn, probs) = self.activations(x, nw, w)?;
        let mut y = x.to_vec();
        if let Some(pw) = self.post(w) {
            // y = x + rms_norm(attn W_o^T + b_o, post).
            let m = self.project_out(&attn, w, n);
            let mut normed = vec![0f32; m.len()];
            rms_norm_rows(&m, pw, self.eps, &mut normed);
            y.par_chunks_mut(h * ROW_BLOCK).zip(normed.par_chunks(h * ROW_BLOCK)).for_each(|(y, v)| {
                y.iter_mut().zip(v).for_each(|(y, v)| *y += v);
            });
        } else {
            if let Some(b) = self.o_bias(w) {
                add_rows(&mut y, b);
            }
            self.add_out(&attn, w, n, &mut y);
        }
        self.saved.put((qkv, attn, probs))?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `dW_o = dy^T attn` (`db_o` = column sums of `dy`), `d attn = dy W_o`, the attention
    /// backward to `d qkv` (through the q/k head norm, recomputed from the saved `qkv`, whose
    /// backward also gives the norm weights' gradients), `db_qkv` = column sums of `d qkv`,
    /// `dW_qkv = d qkv^T rms_norm(x)`, then RMSNorm's backward and the residual `dx += dy`.
    /// Only what trains gets a gradient: a frozen weight no product and no buffer; an adapter
    /// `A, B` on a projection with input `z` and output gradient `dz` gets
    /// `dB = dz^T (s z A^T)`, `dA = (s dz B)^T z` and adds `(s dz B) A` to the input's gradient
    /// (see [`Adapter`]).
    fn bwd(
        &self,
        x: &Tensor,
        nw: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (xs, nws, ws, gs) =
            (HostF32::new(x, "x")?, HostF32::new(nw, "norm")?, HostF32::new(w, "weights")?, HostF32::new(&g, "grad")?);
        let w_ = &BlockWeights::new(&self.layout, ws.slice())?;
        let (x_, nw_, g_) = (xs.slice(), nws.slice(), gs.slice());
        let (h, cols, qc) = (self.hidden, self.spec.qkv_cols(), self.spec.q_cols());
        let n = x_.len() / h;
        let (want_dx, want_dnw) = (x.track_op(), nw.track_op());
        let head_norm = self.head_norm(w_);
        let (kept, attn, probs) = self.saved.take_or(|| self.activations(x_, nw_, w_))?;
        let wo = w_.get(3);
        let mut grads = GradBuf::new(&self.layout);
        // With a post-norm: its backward from the recomputed projection `m` turns `dy` into `dm`.
        let (dm, d_post) = match self.post(w_) {
            None => (None, None),
            Some(pw) => {
                let m = self.project_out(&attn, w_, n);
                let mut dm = vec![0f32; n * h];
                let d_post = rms_norm_bwd_rows(&m, pw, g_, self.eps, &mut dm);
                (Some(dm), Some(d_post))
            }
        };
        let gy: &[f32] = dm.as_deref().unwrap_or(g_);
        let (dy, z) = (MatRef::row_major(gy, n, h), MatRef::row_major(&attn, n, qc));
        grads.product(3..4, false, dy.t(), z);
        let d_o_bias = self.parts.o_bias.then(|| col_sums(gy, h));
        let mut dattn = product(dy, MatRef::row_major(wo, h, qc), Threads::Pool);
        if let Some(ad) = &self.lora[3] {
            let (u, gr) = (ad.down(z, w_), ad.grad_r(dy, w_));
            ad.weight_grads(dy, z, (&u, &gr), &mut grads, false);
            ad.add_dx(&gr, w_, MatMut::row_major(&mut dattn, n, qc));
        }
        drop(attn);
        drop(dm);
        let (dqkv, d_norms) = match &head_norm {
            None => {
                let dqkv = self.spec.backward_head_major(kept, &probs, &dattn)?;
                recycle(probs);
                (dqkv, None)
            }
            Some(norm) => {
                let mut dqkv = self.spec.backward(&Self::head_normed(&kept, cols, norm), &dattn)?;
                let d_norms = norm.backward(&kept, cols, &mut dqkv);
                drop(kept);
                (dqkv, Some(d_norms))
            }
        };
        drop(dattn);
        let d_qkv_bias = self.parts.qkv_bias.then(|| col_sums(&dqkv, cols));
        let mut normed = vec![0f32; x_.len()];
        rms_norm_rows(x_, nw_, self.eps, &mut normed);
        let (t_q, t_k, t_v) = (self.layout.trains(0), self.layout.trains(1), self.layout.trains(2));
        let z = MatRef::row_major(&normed, n, h);
        // The projection `p`'s columns of `d qkv`, `n x out`.
        let dz = |p: usize| MatRef::new(&dqkv[self.qkv_col(p)..], n, self.layout.lens[p] / h, cols);
        if t_q && t_k && t_v {
            // One product for the stacked [q; k; v] gradient.
            grads.product(0..3, false, MatRef::row_major(&dqkv, n, cols).t(), z);
        } else {
            for p in 0..3 {
                grads.product(p..p + 1, false, dz(p).t(), z);
            }
        }
        // The q/k/v adapters: their weight gradients now, `g = s dz B` kept for `dx`.
        let mut qkv_lora = Vec::new();
        for p in 0..3 {
            if let Some(ad) = &self.lora[p] {
                let (u, gr) = (ad.down(z, w_), ad.grad_r(dz(p), w_));
                ad.weight_grads(dz(p), z, (&u, &gr), &mut grads, false);
                recycle(u);
                qkv_lora.push((ad, gr));
            }
        }
        // The optional parts' gradients, in the packed order.
        let opt = self.optional();
        if let (Some(i), Some(db)) = (opt.qkv_bias, &d_qkv_bias) {
            let (qc, kc) = (self.spec.q_cols(), self.spec.kv_cols());
            grads.put(i, &db[..qc]);
            grads.put(i + 1, &db[qc..qc + kc]);
            grads.put(i + 2, &db[qc + kc..]);
        }
        if let (Some(i), Some(db)) = (opt.o_bias, &d_o_bias) {
            grads.put(i, db);
        }
        if let (Some(i), Some((dq, dk))) = (opt.qk_norm, &d_norms) {
            grads.put(i, dq);
            grads.put(i + 1, dk);
        }
        if let (Some(i), Some(dp)) = (opt.post_norm, &d_post) {
            grads.put(i, dp);
        }
        drop(normed);
        let dw = grads.finish();
        let (mut dx, mut dnw) = (None, None);
        if want_dx || want_dnw {
            let mut dnormed = product_stacked(n, h, &dqkv, &w_.pieces(0..3));
            for (ad, gr) in &qkv_lora {
                ad.add_dx(gr, w_, MatMut::row_major(&mut dnormed, n, h));
            }
            drop(dqkv);
            // The residual's gradient plus RMSNorm's backward.
            let mut dxv = g_.to_vec();
            let d = rms_norm_bwd_rows_add(x_, nw_, &dnormed, self.eps, &mut dxv);
            dx = want_dx.then(|| cpu(dxv, x.shape())).transpose()?;
            dnw = want_dnw.then(|| cpu(d, nw.shape())).transpose()?;
        }
        Ok((dx, dnw, route(&self.layout, dw, w)?))
    }
}

/// The optional parameters of an attention block beyond Llama's (all `None`, the default, for
/// Llama): Qwen2's q/k/v biases, Qwen3's per-head q/k RMSNorm and its optional q/k/v/o biases.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionExtras<'a> {
    /// Biases of q_proj, k_proj and v_proj (`[heads * head_dim]`, `[kv_heads * head_dim]`,
    /// `[kv_heads * head_dim]`), added to the projections.
    pub qkv_bias: Option<[&'a Tensor; 3]>,
    /// Bias of o_proj (`[hidden]`).
    pub o_bias: Option<&'a Tensor>,
    /// RMSNorm weights `[head_dim]` of every query head and of every key head, applied over
    /// `head_dim` after the projection (and its bias) and before the rotary embedding, with the
    /// block's `eps`.
    pub qk_norm: Option<[&'a Tensor; 2]>,
    /// An RMSNorm weight `[hidden]` applied to the attention half's output (after o_proj and
    /// its bias) before the residual add, with the block's `eps`: `x + rms_norm(o, post_norm)`
    /// (Gemma 2/3's post-attention norm, given as its effective weight `1 + w`).
    pub post_norm: Option<&'a Tensor>,
    /// LoRA adapters of q_proj, k_proj, v_proj and o_proj: each adds `scale (x A^T) B^T` to its
    /// projection (before its bias), trained through these `r`-wide products (see [`LowRank`]).
    pub lora: [Option<LowRank<'a>>; 4],
}

impl AttentionExtras<'_> {
    /// The tensors present, in the packed order (q|k|v bias, o bias, q norm, k norm, post norm).
    fn tensors(&self) -> Vec<&Tensor> {
        let mut out: Vec<&Tensor> = self.qkv_bias.map(Vec::from).unwrap_or_default();
        out.extend(self.o_bias);
        out.extend(self.qk_norm.into_iter().flatten());
        out.extend(self.post_norm);
        out
    }

    fn parts(&self) -> BlockParts {
        BlockParts {
            qkv_bias: self.qkv_bias.is_some(),
            o_bias: self.o_bias.is_some(),
            qk_norm: self.qk_norm.is_some(),
            post_norm: self.post_norm.is_some(),
        }
    }

    /// Rejects parameters whose sizes do not fit the block.
    fn check(&self, spec: &AttentionSpec, hidden: usize) -> Result<()> {
        let (qc, kc, d) = (spec.q_cols(), spec.kv_cols(), spec.head_dim);
        let mut expected: Vec<(&Tensor, usize, &str)> = Vec::new();
        if let Some([q, k, v]) = self.qkv_bias {
            expected.extend([(q, qc, "q bias"), (k, kc, "k bias"), (v, kc, "v bias")]);
        }
        if let Some(o) = self.o_bias {
            expected.push((o, hidden, "o bias"));
        }
        if let Some([q, k]) = self.qk_norm {
            expected.extend([(q, d, "q norm"), (k, d, "k norm")]);
        }
        if let Some(p) = self.post_norm {
            expected.push((p, hidden, "post norm"));
        }
        for (t, len, what) in expected {
            if t.dims() != [len] {
                return Err(crate::ModelError::Input {
                    input: "attention block",
                    reason: format!("{what} has shape {:?}, expected [{len}]", t.dims()),
                });
            }
        }
        Ok(())
    }

    /// The composition the fused block replaces from `qkv` (bias and head norm; other devices).
    fn compose_qkv(&self, qkv: Tensor, spec: &AttentionSpec, eps: f64) -> Result<Tensor> {
        let qkv = match self.qkv_bias {
            Some(b) => qkv.broadcast_add(&Tensor::cat(&b, 0)?)?,
            None => qkv,
        };
        let Some([qn, kn]) = self.qk_norm else { return Ok(qkv) };
        let (n, d, (qc, kc)) = (qkv.dim(0)?, spec.head_dim, (spec.q_cols(), spec.kv_cols()));
        let q = rms_norm(&qkv.narrow(1, 0, qc)?.reshape((n, spec.heads, d))?, qn, eps)?.reshape((n, qc))?;
        let k = rms_norm(&qkv.narrow(1, qc, kc)?.reshape((n, spec.kv_heads, d))?, kn, eps)?.reshape((n, kc))?;
        Ok(Tensor::cat(&[q, k, qkv.narrow(1, qc + kc, kc)?], 1)?)
    }
}

/// The attention half of a pre-norm Llama layer as one op:
/// `x + attention(rms_norm(x, norm_weight) [w_q | w_k | w_v]^T) w_o^T` for the residual stream
/// `x [batch * seq, hidden]`, with [`attention`]'s semantics; `extras` adds Qwen's optional
/// biases and per-head q/k RMSNorm (see [`AttentionExtras`]; with none, exactly the Llama block).
/// The q, k, v and attention activations live inside the op (freed by its backward pass), so
/// candle's graph sees one node; the weights, biases and norm weights are packed into one input,
/// whose gradient candle splits back. Falls back to the pieces ([`norm_linear`], [`attention`],
/// [`linear_residual`]) off f32 CPU (which then error in [`attention`]). `activations` says
/// whether the op keeps its intermediate activations or recomputes them in the backward pass;
/// `meter` counts what it keeps.
#[allow(clippy::too_many_arguments)]
pub fn attention_block(
    x: &Tensor,
    norm_weight: &Tensor,
    [q, k, v, o]: [&Tensor; 4],
    extras: AttentionExtras<'_>,
    spec: &Arc<AttentionSpec>,
    eps: f64,
    activations: Activations,
    meter: Option<&Arc<ActivationMeter>>,
) -> Result<Tensor> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    extras.check(spec, hidden)?;
    let base = [q, k, v, o];
    for ((w, lora), what) in base.iter().zip(&extras.lora).zip(["q_proj", "k_proj", "v_proj", "o_proj"]) {
        if let Some(l) = lora {
            l.check(w, what)?;
        }
    }
    let extra = extras.tensors();
    let mut all = vec![x, norm_weight, q, k, v, o];
    all.extend(&extra);
    all.extend(extras.lora.iter().flatten().flat_map(|l| [l.a, l.b]));
    if !fusable(&all) {
        // The composition, with each adapter folded into its weight.
        let folded = LowRank::fold_all(&base, &extras.lora)?;
        let (q, k, v, o) = (&folded[0], &folded[1], &folded[2], &folded[3]);
        let qkv = extras.compose_qkv(norm_linear(x, norm_weight, &Tensor::cat(&[q, k, v], 0)?, eps)?, spec, eps)?;
        if let Some(p) = extras.post_norm {
            let m = linear(&attention(&qkv, spec)?, o)?;
            let m = match extras.o_bias {
                Some(b) => m.broadcast_add(b)?,
                None => m,
            };
            return Ok((x + rms_norm(&m, p, eps)?)?);
        }
        let y = linear_residual(x, &attention(&qkv, spec)?, o)?;
        return Ok(match extras.o_bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let mut weights = vec![q, k, v, o];
    weights.extend(extra);
    let mut lora = [None; 4];
    for (slot, (w, l)) in lora.iter_mut().zip(base.iter().zip(&extras.lora)) {
        if let Some(l) = l {
            *slot = Some(Adapter::push(l, w, &mut weights)?);
        }
    }
    let Packing { packed, layout } = Packing::new(weights, x.track_op() || norm_weight.track_op())?;
    let parts = extras.parts();
    let saved = Saved::new(activations, meter);
    let op = AttentionBlockOp { spec: spec.clone(), eps, hidden, parts, saved, layout, lora };
    Ok(x.contiguous()?.apply_op3(&norm_weight.contiguous()?, &packed, op)?)
}
