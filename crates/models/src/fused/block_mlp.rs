//! The MLP half of a layer as one op: [`mlp_block`] and [`mlp_block_with`].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, D, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::activations::Saved;
#[cfg(doc)]
use super::attention_block;
use super::low_rank::{Adapter, LowRank};
use super::weight_grads::{BlockWeights, GradBuf, Packing, WeightLayout, route};
use super::{ActivationMeter, Activations, cpu, fusable, norm_linear, rms_norm, swiglu_down_residual};
use slime_kernels::{MatMut, MatRef, Threads, matmul, product};

use crate::Result;
use crate::host::{
    HostF32, ROW_BLOCK, f32_slice, glu_act_bwd_rows_in_place, glu_bwd_rows_in_place, glu_rows, product_stacked,
    product_stacked_t, recycle, rms_norm_bwd_rows, rms_norm_bwd_rows_add, rms_norm_rows, scratch,
};

/// Rows of the MLP block's backward pass (and of its forward pass when it keeps nothing) handled
/// at a time: the gate|up, SwiGLU and gradient buffers exist for this many rows, not for the
/// whole batch (256 rows x 2 x 688 floats = 1.4 MiB at the reference width, against 9.4 MiB for
/// 1,792 rows), while the products stay large enough to run at gemm's full rate.
const MLP_ROWS: usize = 256;

/// Rows of the backward pass of a block that kept its gate|up, for its products with the weights
/// (row by row independent): each chunk packs the weights again (at 256 rows, 4 times for a
/// micro-batch of 896 rows; at 512, twice: 1.6 % of the reference step), and the chunk buffers
/// are small next to what the block kept. The sums over rows (weight and norm gradients) still
/// go [`MLP_ROWS`] rows at a time, in order, so both modes give the same bits.
const MLP_ROWS_KEPT: usize = 2 * MLP_ROWS;

/// The gate activation of a gated MLP: `act(g) * u`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Glu {
    /// SwiGLU, `silu(g) * u` (Llama, Qwen).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU, `gelu_tanh(g) * u` (Gemma's
    /// `gelu_pytorch_tanh`; candle's `gelu`).
    GeluTanh,
}

/// The options of an MLP block beyond Llama's (the default: SwiGLU, no post-norm, no adapters).
#[derive(Debug, Clone, Copy, Default)]
pub struct MlpExtras<'a> {
    /// The gate activation.
    pub act: Glu,
    /// An RMSNorm weight `[hidden]` applied to the MLP's output before the residual add, with
    /// the block's `eps` (Gemma 2/3's post-feedforward norm, given as its effective weight
    /// `1 + w`): `x + rms_norm(mlp(x), post_norm)`.
    pub post_norm: Option<&'a Tensor>,
    /// LoRA adapters of gate_proj, up_proj and down_proj: each adds `scale (x A^T) B^T` to its
    /// projection, trained through these `r`-wide products (see [`LowRank`]).
    pub lora: [Option<LowRank<'a>>; 3],
}

/// `x + post(act(g) * u) w_down^T` with `[g | u] = rms_norm(x) [w_gate | w_up]^T` and `post` the
/// optional post-norm, weights (in [`BlockWeights`]' order) `gate_proj, up_proj, down_proj`, then
/// the post-norm weight when there is one, then `A, B` of each adapter (each projection with one
/// adds `scale (input A^T) B^T`). Saved ([`Activations::Keep`]): `g|u`, and with a
/// post-norm the MLP output `m` before it (`[rows, hidden]`, so its backward need not redo the
/// down projection).
struct MlpBlockOp {
    eps: f64,
    hidden: usize,
    inter: usize,
    act: Glu,
    post_norm: bool,
    saved: Saved,
    /// Where the weights are read and which get gradients.
    layout: WeightLayout,
    /// The adapters of gate_proj, up_proj and down_proj.
    lora: [Option<Adapter>; 3],
}

impl MlpBlockOp {
    /// `(rms_norm(x), gate|up)` of the rows `x`.
    fn gate_up(&self, x: &[f32], nw: &[f32], w: &BlockWeights) -> (Vec<f32>, Vec<f32>) {
        let h = self.hidden;
        let mut normed = vec![0f32; x.len()];
        rms_norm_rows(x, nw, self.eps, &mut normed);
        let rows = x.len() / h;
        let mut gu = product_stacked_t(rows, h, &normed, &w.pieces(0..2));
        let i = self.inter;
        for (p, col) in [(0, 0), (1, i)] {
            if let Some(ad) = &self.lora[p] {
                // `gu` is rows x 2i; the adapter adds to columns col..col + i of each row.
                let y = MatMut::new(&mut gu[col..], rows, i, 2 * i);
                recycle(ad.forward(MatRef::row_major(&normed, rows, h), w, y));
            }
        }
        (normed, gu)
    }

    /// `y += act(g) * u @ w_down^T` (plus down_proj's adapter) for the rows of `gu`; returns the
    /// gated product.
    fn down(&self, gu: &[f32], w: &BlockWeights, y: &mut [f32]) -> Vec<f32> {
        let i = self.inter;
        let rows = gu.len() / (2 * i);
        let mut act = scratch(rows * i);
        glu_rows(self.act, gu, i, &mut act);
        self.project_down(&act, rows, w, y);
        act
    }

    /// `y += act w_down^T (+ scale (act A^T) B^T)` for `rows` rows `act`.
    fn project_down(&self, act: &[f32], rows: usize, w: &BlockWeights, y: &mut [f32]) {
        let (h, i) = (self.hidden, self.inter);
        let (a, wd) = (MatRef::row_major(act, rows, i), MatRef::row_major(w.get(2), h, i));
        matmul(MatMut::row_major(y, rows, h), a, wd.t(), true, Threads::Pool);
        if let Some(ad) = &self.lora[2] {
            recycle(ad.forward(a, w, MatMut::row_major(y, rows, h)));
        }
    }

    /// The post-norm weight, if any.
    fn post<'a>(&self, w: &'a BlockWeights) -> Option<&'a [f32]> {
        self.post_norm.then(|| w.get(3))
    }

    /// `y = x + post(mlp)` for rows whose `y` already holds `x` and whose gate|up is `gu`;
    /// returns the MLP output before the post-norm (empty without one).
    fn finish(&self, gu: &[f32], w: &BlockWeights, y: &mut [f32]) -> Vec<f32> {
        let Some(pw) = self.post(w) else {
            recycle(self.down(gu, w, y));
            return Vec::new();
        };
        let mut m = vec![0f32; y.len()];
        recycle(self.down(gu, w, &mut m));
        let mut normed = vec![0f32; m.len()];
        rms_norm_rows(&m, pw, self.eps, &mut normed);
        let h = self.hidden;
        y.par_chunks_mut(h * ROW_BLOCK).zip(normed.par_chunks(h * ROW_BLOCK)).for_each(|(y, n)| {
            y.iter_mut().zip(n).for_each(|(y, n)| *y += n);
        });
        m
    }
}

impl CustomOp3 for MlpBlockOp {
    fn name(&self) -> &'static str {
        "slime-mlp-block"
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
        let x = f32_slice(s1, l1, "mlp block x")?;
        let nw = f32_slice(s2, l2, "mlp block norm")?;
        let w = BlockWeights::new(&self.layout, f32_slice(s3, l3, "mlp block weights")?)?;
        let w = &w;
        let (h, i) = (self.hidden, self.inter);
        let expected = [i * h, i * h, h * i];
        if nw.len() != h || x.len() % h != 0 || self.layout.lens[..3] != expected {
            candle_core::bail!(
                "mlp block: x {}, norm {}, weights {:?} do not match hidden {h}, intermediate {i}",
                x.len(),
                nw.len(),
                self.layout.lens
            )
        }
        let mut y = x.to_vec();
        match self.saved.policy {
            Activations::Keep => {
                let (_, gu) = self.gate_up(x, nw, w);
                let m = self.finish(&gu, w, &mut y);
                self.saved.put((gu, m, Vec::new()))?;
            }
            Activations::Recompute => {
                for (xc, yc) in x.chunks(MLP_ROWS * h).zip(y.chunks_mut(MLP_ROWS * h)) {
                    self.finish(&self.gate_up(xc, nw, w).1, w, yc);
                }
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// Per chunk of [`MLP_ROWS`] rows ([`MLP_ROWS_KEPT`] when the gate|up was kept; the weight
    /// and norm gradients accumulate over [`MLP_ROWS`]-row slices in order):
    /// `act = act(g) u`; with a post-norm, its backward from the MLP output `m` (saved, or
    /// `act W_down^T` again) turns `dy` into `dm` (without one, `dm = dy`); `dW_down += dm^T act`,
    /// `d[g|u]` from `dact = dm W_down`, `dW_gate|up += d[g|u]^T rms_norm(x)`, then RMSNorm's
    /// backward and the residual `dx += dy`. Only what trains gets a gradient: a frozen weight
    /// no product and no buffer; an adapter `A, B` on a projection with input `z` and output
    /// gradient `dz` gets `dB = dz^T (s z A^T)`, `dA = (s dz B)^T z` and adds `(s dz B) A` to
    /// the input's gradient (see [`Adapter`]).
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
        let (h, i) = (self.hidden, self.inter);
        if x_.is_empty() {
            candle_core::bail!("mlp block: no rows")
        }
        let (want_dx, want_dnw) = (x.track_op(), nw.track_op());
        let through_norm = want_dx || want_dnw;
        // Empty when nothing was kept: each chunk then recomputes its gate|up (and `m`).
        let (mut saved_gu, saved_m, _) = self.saved.take_or(|| Ok((Vec::new(), Vec::new(), Vec::new())))?;
        let wd = w_.get(2);
        let post = self.post(w_);
        let mut grads = GradBuf::new(&self.layout);
        let (t_gate, t_up) = (self.layout.trains(0), self.layout.trains(1));
        // The residual's gradient, to which each chunk adds RMSNorm's backward.
        let mut dx = if through_norm { g_.to_vec() } else { Vec::new() };
        let mut dnw = vec![0f32; h];
        let mut dpost = vec![0f32; if post.is_some() { h } else { 0 }];
        // Row buffers of one chunk, taken once: every chunk overwrites them. The gate|up gradient
        // takes the place of the chunk's gate|up (kept or recomputed).
        let chunk_rows = (x_.len() / h).min(if saved_gu.is_empty() { MLP_ROWS } else { MLP_ROWS_KEPT });
        let mut normed_buf = if saved_gu.is_empty() { Vec::new() } else { scratch(chunk_rows * h) };
        let mut act_buf = scratch(chunk_rows * i);
        let mut dm_buf = if post.is_some() { scratch(chunk_rows * h) } else { Vec::new() };
        for (c, (xc, gc)) in x_.chunks(chunk_rows * h).zip(g_.chunks(chunk_rows * h)).enumerate() {
            let rows = xc.len() / h;
            let mut recomputed;
            let (normed, gu): (&[f32], &mut [f32]) = if saved_gu.is_empty() {
                recomputed = self.gate_up(xc, nw_, w_);
                (&recomputed.0, &mut recomputed.1)
            } else {
                let normed = &mut normed_buf[..xc.len()];
                rms_norm_rows(xc, nw_, self.eps, normed);
                (normed, &mut saved_gu[c * chunk_rows * 2 * i..][..rows * 2 * i])
            };
            let act = &mut act_buf[..rows * i];
            // Only a post-norm's recomputed input needs `act` before `dact` exists; otherwise
            // both come from one pass below.
            let act_first = post.is_some() && saved_m.is_empty();
            if act_first {
                glu_rows(self.act, gu, i, act);
            }
            // The gradient reaching the down projection's output.
            let dm: &[f32] = match post {
                None => gc,
                Some(pw) => {
                    let m_owned;
                    let m: &[f32] = if saved_m.is_empty() {
                        let mut m = vec![0f32; rows * h];
                        self.project_down(act, rows, w_, &mut m);
                        m_owned = m;
                        &m_owned
                    } else {
                        &saved_m[c * chunk_rows * h..][..rows * h]
                    };
                    let d = &mut dm_buf[..rows * h];
                    for ((m, g), d) in
                        m.chunks(MLP_ROWS * h).zip(gc.chunks(MLP_ROWS * h)).zip(d.chunks_mut(MLP_ROWS * h))
                    {
                        let part = rms_norm_bwd_rows(m, pw, g, self.eps, d);
                        dpost.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
                    }
                    d
                }
            };
            let dmr = MatRef::row_major(dm, rows, h);
            let mut dact = product(dmr, MatRef::row_major(wd, h, i), Threads::Pool);
            // down_proj's adapter: `g_down = s dm B`, and `g_down A` joins `dact`.
            let g_down = self.lora[2].map(|ad| {
                let gr = ad.grad_r(dmr, w_);
                ad.add_dx(&gr, w_, MatMut::row_major(&mut dact, rows, i));
                gr
            });
            if act_first {
                glu_bwd_rows_in_place(self.act, gu, &dact, i);
            } else {
                glu_act_bwd_rows_in_place(self.act, gu, &dact, i, act);
            }
            drop(dact);
            let act: &[f32] = act;
            let dgu: &[f32] = gu;
            // The adapters' row products over the whole chunk: `u = s z A^T` of each input `z`
            // and, for gate and up, `g = s dz B` of their slice of `d[g|u]`.
            let u_down = self.lora[2].map(|ad| ad.down(MatRef::row_major(act, rows, i), w_));
            // Columns col..col + i of `d[g|u]`, for `n` rows from row `s0`.
            let dz = |s0: usize, n: usize, col: usize| MatRef::new(&dgu[s0 * 2 * i + col..], n, i, 2 * i);
            let gate_up_lora: Vec<(Adapter, usize, Vec<f32>, Vec<f32>)> = [(0, 0), (1, i)]
                .into_iter()
                .filter_map(|(p, col)| self.lora[p].map(|ad| (ad, col)))
                .map(|(ad, col)| {
                    let u = ad.down(MatRef::row_major(normed, rows, h), w_);
                    (ad, col, u, ad.grad_r(dz(0, rows, col), w_))
                })
                .collect();
            // The weight gradients, MLP_ROWS rows at a time in order. Every gradient region holds
            // its piece's floats; the first products (chunk 0, slice 0) write the whole region
            // (accumulate = false), later ones add to it.
            for s in 0..rows.div_ceil(MLP_ROWS) {
                let (s0, n) = (s * MLP_ROWS, MLP_ROWS.min(rows - s * MLP_ROWS));
                let accumulate = c > 0 || s > 0;
                let (dms, acts) = (MatRef::row_major(&dm[s0 * h..], n, h), MatRef::row_major(&act[s0 * i..], n, i));
                let normeds = MatRef::row_major(&normed[s0 * h..], n, h);
                grads.product(2..3, accumulate, dms.t(), acts);
                if t_gate && t_up {
                    // One product for the stacked [gate; up] gradient.
                    let dgut = MatRef::row_major(&dgu[s0 * 2 * i..], n, 2 * i).t();
                    grads.product(0..2, accumulate, dgut, normeds);
                } else {
                    for (p, col) in [(0, 0), (1, i)] {
                        grads.product(p..p + 1, accumulate, dz(s0, n, col).t(), normeds);
                    }
                }
                if let (Some(ad), Some(u), Some(gr)) = (&self.lora[2], &u_down, &g_down) {
                    let r = ad.rank;
                    ad.weight_grads(dms, acts, (&u[s0 * r..], &gr[s0 * r..]), &mut grads, accumulate);
                }
                for (ad, col, u, gr) in &gate_up_lora {
                    let r = ad.rank;
                    ad.weight_grads(dz(s0, n, *col), normeds, (&u[s0 * r..], &gr[s0 * r..]), &mut grads, accumulate);
                }
            }
            recycle(u_down.unwrap_or_default());
            recycle(g_down.unwrap_or_default());
            if !through_norm {
                continue;
            }
            let mut dnormed = product_stacked(rows, h, dgu, &w_.pieces(0..2));
            for (ad, _, _, gr) in &gate_up_lora {
                ad.add_dx(gr, w_, MatMut::row_major(&mut dnormed, rows, h));
            }
            let dxc = &mut dx[c * chunk_rows * h..][..xc.len()];
            let sub = MLP_ROWS * h;
            for ((xs, dn), dxs) in xc.chunks(sub).zip(dnormed.chunks(sub)).zip(dxc.chunks_mut(sub)) {
                let part = rms_norm_bwd_rows_add(xs, nw_, dn, self.eps, dxs);
                dnw.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
            }
        }
        [normed_buf, act_buf, dm_buf].into_iter().for_each(recycle);
        if post.is_some() {
            grads.put(3, &dpost);
        }
        let dw = grads.finish();
        let dx = if want_dx { Some(cpu(dx, x.shape())?) } else { None };
        let dnw = if want_dnw { Some(cpu(dnw, nw.shape())?) } else { None };
        Ok((dx, dnw, route(&self.layout, dw, w)?))
    }
}

/// The MLP half of a pre-norm Llama layer as one op:
/// `x + (silu(g) * u) w_down^T` with `g = rms_norm(x, norm_weight) w_gate^T` and
/// `u = rms_norm(x, norm_weight) w_up^T`, for the residual stream `x [rows, hidden]`. The
/// gate|up activations live inside the op (freed by its backward pass); the SwiGLU product and
/// the normalised rows are recomputed there. Falls back to the pieces ([`norm_linear`],
/// [`swiglu_down_residual`]) off f32 CPU. `activations` and `meter` as in [`attention_block`].
/// [`mlp_block_with`] adds GeGLU and a post-norm.
pub fn mlp_block(
    x: &Tensor,
    norm_weight: &Tensor,
    weights: [&Tensor; 3],
    eps: f64,
    activations: Activations,
    meter: Option<&Arc<ActivationMeter>>,
) -> Result<Tensor> {
    mlp_block_with(x, norm_weight, weights, MlpExtras::default(), eps, activations, meter)
}

/// [`mlp_block`] with the gate activation and optional post-norm of `extras`:
/// `x + post_norm(act(g) * u w_down^T)` (Gemma 1: GeGLU, no post-norm; Gemma 2/3: GeGLU and the
/// post-feedforward norm; with the default extras, exactly [`mlp_block`]). With a post-norm and
/// [`Activations::Keep`] the op also keeps the MLP output before the norm (`hidden` floats a
/// row). Off f32 CPU, the composition of candle ops.
pub fn mlp_block_with(
    x: &Tensor,
    norm_weight: &Tensor,
    [gate, up, down]: [&Tensor; 3],
    extras: MlpExtras<'_>,
    eps: f64,
    activations: Activations,
    meter: Option<&Arc<ActivationMeter>>,
) -> Result<Tensor> {
    let base = [gate, up, down];
    for ((w, lora), what) in base.iter().zip(&extras.lora).zip(["gate_proj", "up_proj", "down_proj"]) {
        if let Some(l) = lora {
            l.check(w, what)?;
        }
    }
    let mut all = vec![x, norm_weight, gate, up, down];
    all.extend(extras.post_norm);
    all.extend(extras.lora.iter().flatten().flat_map(|l| [l.a, l.b]));
    if !fusable(&all) {
        // The composition, with each adapter folded into its weight.
        let folded = LowRank::fold_all(&base, &extras.lora)?;
        let (gate, up, down) = (&folded[0], &folded[1], &folded[2]);
        let gu = norm_linear(x, norm_weight, &Tensor::cat(&[gate, up], 0)?, eps)?;
        if extras.act == Glu::Silu && extras.post_norm.is_none() {
            return swiglu_down_residual(x, &gu, down);
        }
        let i = down.dim(1)?;
        let g = gu.narrow(D::Minus1, 0, i)?;
        let g = match extras.act {
            Glu::Silu => g.silu()?,
            Glu::GeluTanh => g.gelu()?,
        };
        let m = (g * gu.narrow(D::Minus1, i, i)?)?.broadcast_matmul(&down.t()?)?;
        let m = match extras.post_norm {
            Some(p) => rms_norm(&m, p, eps)?,
            None => m,
        };
        return Ok((x + m)?);
    }
    let (inter, hidden) = gate.dims2()?;
    let mut weights = vec![gate, up, down];
    if let Some(p) = extras.post_norm {
        if p.dims() != [hidden] {
            return Err(crate::ModelError::Input {
                input: "mlp block",
                reason: format!("post norm has shape {:?}, expected [{hidden}]", p.dims()),
            });
        }
        weights.push(p);
    }
    let mut lora = [None; 3];
    for (slot, (w, l)) in lora.iter_mut().zip(base.iter().zip(&extras.lora)) {
        if let Some(l) = l {
            *slot = Some(Adapter::push(l, w, &mut weights)?);
        }
    }
    let Packing { packed, layout } = Packing::new(weights, x.track_op() || norm_weight.track_op())?;
    let op = MlpBlockOp {
        eps,
        hidden,
        inter,
        act: extras.act,
        post_norm: extras.post_norm.is_some(),
        saved: Saved::new(activations, meter),
        layout,
        lora,
    };
    Ok(x.contiguous()?.apply_op3(&norm_weight.contiguous()?, &packed, op)?)
}
