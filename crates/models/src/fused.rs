//! Fused CPU kernels with a real backward pass (candle `CustomOp`s), each equal to the
//! straightforward differentiable composition in [`crate::ops`] within float rounding
//! (tested in `tests/fused.rs`, values and gradients within 1e-5).
//!
//! | kernel | replaces | saved activations |
//! |---|---|---|
//! | [`rms_norm`] | `x / sqrt(mean(x^2) + eps) * w` (7 ops) | `x` |
//! | [`linear`] | `x.matmul(w.t())` with 2-D gradients (no batched weight-gradient sum) | `x` |
//! | [`norm_linear`] | `rms_norm(x, w_n).matmul(w.t())` | `x` (the normalised rows are recomputed) |
//! | [`attention`] | rope + repeat_kv + `q k^T / sqrt(d)` + mask + softmax + `p v`; per [`AttentionSpec`] also another scale, soft-capped scores `cap * tanh(s / cap)` and a sliding window (Gemma) | `q, k, v` (scores are recomputed, flash-style) |
//! | [`linear_residual`] | `x + a.matmul(w.t())` | `x, a` |
//! | [`swiglu_down_residual`] | `x + (silu(gate) * up).matmul(w.t())` | `x, [gate, up]` (the product is recomputed) |
//! | [`log_softmax_gather`] | `log_softmax(x).gather(labels)` | `x` |
//! | [`attention_block`] | `x + attention(rms_norm(x) [W_q \| W_k \| W_v]^T (+ b_qkv), per-head q/k RMSNorm) W_o^T (+ b_o)`: a Llama layer's attention half, Qwen2's q/k/v biases and Qwen3's q/k norm and optional q/k/v/o biases ([`AttentionExtras`]); with a post-norm `x + rms_norm(o, w_post)` and the spec's scale, soft-capping and window, a Gemma 1/2/3 layer's attention half | `x`, and with [`Activations::Keep`] `q\|k\|v` (after the bias, before the q/k norm) and the attention output (the normalised rows, the normalised q/k heads, the scores and the projection before a post-norm are recomputed) |
//! | [`mlp_block`] | `x + (silu(g) * u) W_down^T` with `[g \| u] = rms_norm(x) [W_gate \| W_up]^T` | `x`, and with [`Activations::Keep`] `g\|u` |
//! | [`mlp_block_with`] | [`mlp_block`] with GeGLU `gelu_tanh(g) * u` ([`Glu`]) and an optional post-norm `x + rms_norm(m, w_post)` of the MLP output `m` ([`MlpExtras`]): Gemma 1's MLP half, and Gemma 2/3's with its post-feedforward norm (the `(1 + w)` norms given as effective weights) | `x`, and with [`Activations::Keep`] `g\|u` and, with a post-norm, `m` |
//!
//! Matrix products use the `gemm` crate (candle's own CPU backend) on strided views, so heads are
//! read straight out of `[tokens, heads * head_dim]` activations; row-wise work runs on rayon's
//! pool (`RAYON_NUM_THREADS`). They run on f32 CPU tensors; every public function falls back to
//! the composition on any other device or dtype, so the `cuda` feature keeps working.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;
use crate::host::{
    HeadNorm, HostF32, Mat, ROW_BLOCK, SendPtr, Threads, add_rows, col_sums, f32_slice, glu_bwd_rows, glu_rows, matmul,
    product, rms_norm_bwd_rows, rms_norm_rows, rope_row, rope_row_bwd, row_lse, u32_slice,
};
use crate::vmath;

/// Whether the fused kernels can run on these tensors (f32 on the CPU).
pub fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn cpu(v: Vec<f32>, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNormOp {
    eps: f64,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "slime-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm x")?;
        let w = f32_slice(s2, l2, "rms_norm weight")?;
        let mut out = vec![0f32; x.len()];
        rms_norm_rows(x, w, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With `r = 1 / sqrt(mean(x^2) + eps)` and `u = g * w`:
    /// `dx = r u - x r^3 mean(u x)`, `dw = sum over rows of g x r`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (xs, ws, gs) = (HostF32::new(x, "rms_norm x")?, HostF32::new(w, "rms_norm w")?, HostF32::new(&g, "grad")?);
        let mut dx = vec![0f32; xs.slice().len()];
        let dw = rms_norm_bwd_rows(xs.slice(), ws.slice(), gs.slice(), self.eps, &mut dx);
        Ok((Some(cpu(dx, x.shape())?), Some(cpu(dw, w.shape())?)))
    }
}

/// RMSNorm `x / sqrt(mean(x^2) + eps) * weight` over the last dimension, fused with a backward
/// pass on f32 CPU tensors, [`crate::ops::rms_norm_composed`] elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !fusable(&[x, weight]) {
        return crate::ops::rms_norm_composed(x, weight, eps);
    }
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormOp { eps })?)
}

// ---------------------------------------------------------------------------------------------
// Linear layers

/// Rows and columns of a 2-D (or flattened) activation with `cols` columns.
fn rows_of(l: &Layout, cols: usize, what: &str) -> candle_core::Result<usize> {
    let n = l.shape().elem_count();
    if cols == 0 || !n.is_multiple_of(cols) {
        candle_core::bail!("{what}: {n} elements are not rows of {cols}")
    }
    Ok(n / cols)
}

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "slime-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "linear x")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let (out, inp) = l2.shape().dims2()?;
        let n = rows_of(l1, inp, "linear x")?;
        let y = product(n, out, inp, Mat::rows(x, inp), Mat::rows_t(w, inp));
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    /// `dx = g w`, `dw = g^T x`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (out, inp) = w.dims2()?;
        let n = x.dim(0)?;
        let (xs, ws, gs) = (HostF32::new(x, "linear x")?, HostF32::new(w, "linear w")?, HostF32::new(&g, "grad")?);
        let dx = product(n, inp, out, Mat::rows(gs.slice(), out), Mat::rows(ws.slice(), inp));
        let dw = product(out, inp, n, Mat::rows_t(gs.slice(), out), Mat::rows(xs.slice(), inp));
        Ok((Some(cpu(dx, (n, inp))?), Some(cpu(dw, (out, inp))?)))
    }
}

/// Flattens every leading dimension: `[.., in] -> [rows, in]` (contiguous).
fn flat2(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let cols = *dims.last().unwrap_or(&1);
    Ok((x.contiguous()?.reshape(((), cols))?, dims))
}

fn unflat(y: Tensor, mut dims: Vec<usize>, cols: usize) -> Result<Tensor> {
    if let Some(last) = dims.last_mut() {
        *last = cols;
    }
    Ok(y.reshape(dims)?)
}

/// `x w^T` for `x [.., in]` and `w [out, in]` (a bias-free `nn.Linear`), with a backward that
/// forms the weight gradient as one `[out, rows] x [rows, in]` product. Falls back to
/// `broadcast_matmul` off f32 CPU.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, w]) {
        return Ok(x.broadcast_matmul(&w.t()?)?);
    }
    let (x2, dims) = flat2(x)?;
    let y = x2.apply_op2(&w.contiguous()?, LinearOp)?;
    unflat(y, dims, w.dim(0)?)
}

struct NormLinearOp {
    eps: f64,
}

impl CustomOp3 for NormLinearOp {
    fn name(&self) -> &'static str {
        "slime-norm-linear"
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
        let x = f32_slice(s1, l1, "norm_linear x")?;
        let nw = f32_slice(s2, l2, "norm_linear norm weight")?;
        let w = f32_slice(s3, l3, "norm_linear weight")?;
        let (out, inp) = l3.shape().dims2()?;
        let n = rows_of(l1, inp, "norm_linear x")?;
        let mut normed = vec![0f32; x.len()];
        rms_norm_rows(x, nw, self.eps, &mut normed);
        let y = product(n, out, inp, Mat::rows(&normed, inp), Mat::rows_t(w, inp));
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    /// Recomputes `h = rms_norm(x)`, then `dw = g^T h`, `dh = g w` and the RMSNorm backward.
    fn bwd(
        &self,
        x: &Tensor,
        nw: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (out, inp) = w.dims2()?;
        let n = x.dim(0)?;
        let xs = HostF32::new(x, "norm_linear x")?;
        let nws = HostF32::new(nw, "norm weight")?;
        let ws = HostF32::new(w, "weight")?;
        let gs = HostF32::new(&g, "grad")?;
        let mut normed = vec![0f32; n * inp];
        rms_norm_rows(xs.slice(), nws.slice(), self.eps, &mut normed);
        let dw = product(out, inp, n, Mat::rows_t(gs.slice(), out), Mat::rows(&normed, inp));
        drop(normed);
        let dh = product(n, inp, out, Mat::rows(gs.slice(), out), Mat::rows(ws.slice(), inp));
        let mut dx = vec![0f32; n * inp];
        let dnw = rms_norm_bwd_rows(xs.slice(), nws.slice(), &dh, self.eps, &mut dx);
        Ok((Some(cpu(dx, (n, inp))?), Some(cpu(dnw, nw.shape())?), Some(cpu(dw, (out, inp))?)))
    }
}

/// `rms_norm(x, norm_weight, eps) w^T` for `x [rows, in]`, `w [out, in]`: one op whose backward
/// recomputes the normalised rows instead of keeping them.
pub fn norm_linear(x: &Tensor, norm_weight: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fusable(&[x, norm_weight, w]) {
        return Ok(rms_norm(x, norm_weight, eps)?.broadcast_matmul(&w.t()?)?);
    }
    let (x2, dims) = flat2(x)?;
    let y = x2.apply_op3(&norm_weight.contiguous()?, &w.contiguous()?, NormLinearOp { eps })?;
    unflat(y, dims, w.dim(0)?)
}

struct LinearResidualOp;

impl CustomOp3 for LinearResidualOp {
    fn name(&self) -> &'static str {
        "slime-linear-residual"
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
        let x = f32_slice(s1, l1, "residual")?;
        let a = f32_slice(s2, l2, "linear_residual input")?;
        let w = f32_slice(s3, l3, "linear_residual weight")?;
        let (out, inp) = l3.shape().dims2()?;
        let n = rows_of(l2, inp, "linear_residual input")?;
        if x.len() != n * out {
            candle_core::bail!("linear_residual: residual has {} elements, expected {n} x {out}", x.len())
        }
        let mut y = x.to_vec();
        // SAFETY: `y` holds n x out elements; `a` and `w` are live slices of n x inp and out x inp.
        unsafe {
            matmul(n, out, inp, y.as_mut_ptr(), out, true, Mat::rows(a, inp), Mat::rows_t(w, inp), Threads::Pool)
        };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        a: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (out, inp) = w.dims2()?;
        let n = a.dim(0)?;
        let (as_, ws, gs) = (HostF32::new(a, "input")?, HostF32::new(w, "weight")?, HostF32::new(&g, "grad")?);
        let da = product(n, inp, out, Mat::rows(gs.slice(), out), Mat::rows(ws.slice(), inp));
        let dw = product(out, inp, n, Mat::rows_t(gs.slice(), out), Mat::rows(as_.slice(), inp));
        drop(gs);
        Ok((Some(g), Some(cpu(da, (n, inp))?), Some(cpu(dw, (out, inp))?)))
    }
}

/// `x + a w^T` for `x [rows, out]`, `a [rows, in]`, `w [out, in]` (a projection added to the
/// residual stream) as one op.
pub fn linear_residual(x: &Tensor, a: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, a, w]) {
        return Ok((x + a.broadcast_matmul(&w.t()?)?)?);
    }
    let (a2, _) = flat2(a)?;
    let (x2, dims) = flat2(x)?;
    let y = x2.apply_op3(&a2, &w.contiguous()?, LinearResidualOp)?;
    Ok(y.reshape(dims)?)
}

struct SwigluDownResidualOp;

impl CustomOp3 for SwigluDownResidualOp {
    fn name(&self) -> &'static str {
        "slime-swiglu-down-residual"
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
        let x = f32_slice(s1, l1, "residual")?;
        let gu = f32_slice(s2, l2, "gate|up")?;
        let w = f32_slice(s3, l3, "down weight")?;
        let (out, i) = l3.shape().dims2()?;
        let n = rows_of(l2, 2 * i, "gate|up")?;
        if x.len() != n * out {
            candle_core::bail!("swiglu_down_residual: residual has {} elements, expected {n} x {out}", x.len())
        }
        let mut act = vec![0f32; n * i];
        glu_rows(Glu::Silu, gu, i, &mut act);
        let mut y = x.to_vec();
        // SAFETY: `y` holds n x out elements; `act` n x i; `w` out x i.
        unsafe { matmul(n, out, i, y.as_mut_ptr(), out, true, Mat::rows(&act, i), Mat::rows_t(w, i), Threads::Pool) };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    /// Recomputes `act = silu(gate) * up`; `dw = g^T act`, `d act = g w`, then the SwiGLU backward.
    fn bwd(
        &self,
        _x: &Tensor,
        gu: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (out, i) = w.dims2()?;
        let n = gu.dim(0)?;
        let (gus, ws, gs) = (HostF32::new(gu, "gate|up")?, HostF32::new(w, "weight")?, HostF32::new(&g, "grad")?);
        let mut act = vec![0f32; n * i];
        glu_rows(Glu::Silu, gus.slice(), i, &mut act);
        let dw = product(out, i, n, Mat::rows_t(gs.slice(), out), Mat::rows(&act, i));
        drop(act);
        let dact = product(n, i, out, Mat::rows(gs.slice(), out), Mat::rows(ws.slice(), i));
        let mut dgu = vec![0f32; n * 2 * i];
        glu_bwd_rows(Glu::Silu, gus.slice(), &dact, i, &mut dgu);
        drop(gs);
        Ok((Some(g), Some(cpu(dgu, (n, 2 * i))?), Some(cpu(dw, (out, i))?)))
    }
}

/// `x + (silu(gate) * up) w^T` for `x [rows, out]`, `gate_up [rows, 2 i]` (gate columns first, as
/// one projection with the gate and up weights stacked) and `w [out, i]`: the SwiGLU MLP's second
/// half and the residual add as one op that never keeps the `[rows, i]` product.
pub fn swiglu_down_residual(x: &Tensor, gate_up: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !fusable(&[x, gate_up, w]) {
        let i = w.dim(1)?;
        let act = (gate_up.narrow(D::Minus1, 0, i)?.silu()? * gate_up.narrow(D::Minus1, i, i)?)?;
        return Ok((x + act.broadcast_matmul(&w.t()?)?)?);
    }
    let (gu2, _) = flat2(gate_up)?;
    let (x2, dims) = flat2(x)?;
    let y = x2.apply_op3(&gu2, &w.contiguous()?, SwigluDownResidualOp)?;
    Ok(y.reshape(dims)?)
}

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

/// The geometry, rotary tables and padding of one attention call, shared by every layer of a
/// forward pass (and by the backward passes, which recompute the scores).
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
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

    fn q_cols(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_cols(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn qkv_cols(&self) -> usize {
        self.q_cols() + 2 * self.kv_cols()
    }

    fn tables(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.head_dim / 2;
        (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half])
    }

    /// Rotated rows of one head of batch row `b`: `out[t] = rope(src[t * rs + col ..][..head_dim])`.
    fn rope_head(&self, b: usize, src: &[f32], rs: usize, col: usize, out: &mut [f32]) {
        let d = self.head_dim;
        for (t, o) in out.chunks_exact_mut(d).enumerate() {
            let (c, s) = self.tables(self.pos(b, t));
            rope_row(o, &src[t * rs + col..t * rs + col + d], c, s);
        }
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
    /// head's rows) and keys `kr`: scores only for the keys the block may see, then `softmax_row`.
    /// With `dcap` (the backward pass of soft-capped scores), also the cap's derivative there.
    fn block_probs(
        &self,
        b: usize,
        (r0, r1): (usize, usize),
        qr: &[f32],
        kr: &[f32],
        pb: &mut [f32],
        mut dcap: Option<&mut [f32]>,
    ) {
        let d = self.head_dim;
        for (k0, k1) in self.key_ranges(b, r0, r1).into_iter().filter(|(k0, k1)| k1 > k0) {
            // SAFETY: `pb` holds (r1 - r0) x r1, `qr` and `kr` seq x d; single-threaded.
            unsafe {
                let (q, k) = (Mat::rows(&qr[r0 * d..], d), Mat::rows_t(&kr[k0 * d..], d));
                matmul(r1 - r0, k1 - k0, d, pb.as_mut_ptr().add(k0), r1, false, q, k, Threads::Single);
            }
        }
        for (i, row) in (r0..r1).zip(pb.chunks_exact_mut(r1)) {
            let d = dcap.as_deref_mut().map(|d| &mut d[(i - r0) * r1..(i - r0 + 1) * r1]);
            self.softmax_row(b, i, row, d);
        }
    }

    fn check(&self, n: usize, cols: usize, what: &str) -> candle_core::Result<()> {
        if n != self.batch * self.seq * cols {
            candle_core::bail!("{what}: {n} elements, expected {} x {} x {cols}", self.batch, self.seq)
        }
        Ok(())
    }

    /// Forward: `out [batch * seq, heads * head_dim]` from `qkv [batch * seq, (heads + 2 kv) * head_dim]`.
    fn forward(&self, qkv: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (s, d, kv) = (self.seq, self.head_dim, self.kv_heads);
        let (cols, qc) = (self.qkv_cols(), self.q_cols());
        self.check(qkv.len(), cols, "attention qkv")?;
        let n_rep = self.heads / kv;
        let mut out = vec![0f32; self.batch * s * qc];
        let dst = SendPtr(out.as_mut_ptr());
        // Per (batch row, key/value head) task, per query head and query block: the block's
        // probabilities (at most QUERY_BLOCK x seq, cache-sized), then `out += P V`.
        (0..self.batch * kv).into_par_iter().for_each_init(
            || (vec![0f32; s * d], vec![0f32; s * d], vec![0f32; QUERY_BLOCK * s]),
            |(kr, qr, pb), task| {
                let (b, g) = (task / kv, task % kv);
                let rows = &qkv[b * s * cols..(b + 1) * s * cols];
                self.rope_head(b, rows, cols, qc + g * d, kr);
                let v = Mat { ptr: rows[qc + self.kv_cols() + g * d..].as_ptr(), rs: cols, cs: 1 };
                for h in g * n_rep..(g + 1) * n_rep {
                    self.rope_head(b, rows, cols, h * d, qr);
                    for (r0, r1) in query_blocks(s) {
                        let pb = &mut pb[..(r1 - r0) * r1];
                        self.block_probs(b, (r0, r1), qr, kr, pb, None);
                        for (k0, k1) in self.key_ranges(b, r0, r1).into_iter().filter(|(k0, k1)| k1 > k0) {
                            // out[r0..r1] += P[.., k0..k1] V[k0..k1] (`out` starts at 0).
                            // SAFETY: task (b, g) alone writes rows b * s.. of the columns of
                            // heads g * n_rep..(g + 1) * n_rep of `out`, which outlives the loop.
                            unsafe {
                                let o = dst.get().add((b * s + r0) * qc + h * d);
                                let pk = Mat::rows(&pb[k0..], r1);
                                matmul(r1 - r0, d, k1 - k0, o, qc, true, pk, v.skip_rows(k0), Threads::Single);
                            }
                        }
                    }
                }
            },
        );
        Ok(out)
    }

    /// Backward: `d qkv` (same layout as `qkv`) from `d out`. Per (batch row, key/value head),
    /// per query head and query block (`P`, `dP` and `dS` at most QUERY_BLOCK x seq): recompute
    /// the block's probabilities `P`, then `dV += P^T dO`, `dP = dO V^T`,
    /// `dS = P (dP - rowsum(P dP)) / sqrt(d)`, `dQ = dS K`, `dK += dS^T Q`, over the key ranges
    /// the block sees; finally rotate `dQ`, `dK` back.
    fn backward(&self, qkv: &[f32], dout: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (s, d, kv) = (self.seq, self.head_dim, self.kv_heads);
        let (cols, qc, kc) = (self.qkv_cols(), self.q_cols(), self.kv_cols());
        self.check(qkv.len(), cols, "attention qkv")?;
        self.check(dout.len(), qc, "attention grad")?;
        let n_rep = self.heads / kv;
        let mut dqkv = vec![0f32; qkv.len()];
        let dst = SendPtr(dqkv.as_mut_ptr());
        (0..self.batch * kv).into_par_iter().for_each_init(
            || {
                let head = || vec![0f32; s * d];
                let block = || vec![0f32; QUERY_BLOCK * s];
                // The soft-cap derivative per score (soft-capped attention only).
                let cap = if self.softcap.is_some() { block() } else { Vec::new() };
                (head(), head(), head(), head(), head(), block(), block(), cap)
            },
            |(kr, qr, dkr, dvv, dqr, pb, dpb, cb), task| {
                let (b, g) = (task / kv, task % kv);
                let rows = &qkv[b * s * cols..(b + 1) * s * cols];
                self.rope_head(b, rows, cols, qc + g * d, kr);
                let v = Mat { ptr: rows[qc + kc + g * d..].as_ptr(), rs: cols, cs: 1 };
                dkr.fill(0.0);
                dvv.fill(0.0);
                for h in g * n_rep..(g + 1) * n_rep {
                    self.rope_head(b, rows, cols, h * d, qr);
                    let dout_h = Mat { ptr: dout[b * s * qc + h * d..].as_ptr(), rs: qc, cs: 1 };
                    // SAFETY (every product below): the scratch buffers are task-local with the
                    // extents given (`pb`, `dpb`: (r1 - r0) x r1, row stride r1); `dout` and
                    // `qkv` are live inputs; products are single-threaded.
                    for (r0, r1) in query_blocks(s) {
                        let (m, pb, dpb) = (r1 - r0, &mut pb[..(r1 - r0) * r1], &mut dpb[..(r1 - r0) * r1]);
                        let capped = self.softcap.is_some();
                        self.block_probs(b, (r0, r1), qr, kr, pb, capped.then(|| &mut cb[..m * r1]));
                        let ranges = self.key_ranges(b, r0, r1);
                        let live = || ranges.into_iter().filter(|(k0, k1)| k1 > k0);
                        let d_o = dout_h.skip_rows(r0);
                        for (k0, k1) in live() {
                            // dV[k0..k1] += P[.., k0..k1]^T dO[r0..r1]
                            let (pt, dv) =
                                (Mat { ptr: pb[k0..].as_ptr(), rs: 1, cs: r1 }, dvv.as_mut_ptr().wrapping_add(k0 * d));
                            unsafe { matmul(k1 - k0, d, m, dv, d, true, pt, d_o, Threads::Single) };
                            // dP[.., k0..k1] = dO[r0..r1] V[k0..k1]^T
                            let dpk = dpb.as_mut_ptr().wrapping_add(k0);
                            unsafe { matmul(m, k1 - k0, d, dpk, r1, false, d_o, v.skip_rows(k0).t(), Threads::Single) };
                        }
                        for (ri, (prow, dprow)) in pb.chunks_exact(r1).zip(dpb.chunks_exact_mut(r1)).enumerate() {
                            // dS = P (dP - rowsum(P dP)) / sqrt(d) over the computed ranges
                            // (soft-capped: times the cap's derivative).
                            let dot: f32 = live()
                                .map(|(k0, k1)| {
                                    prow[k0..k1].iter().zip(&dprow[k0..k1]).map(|(a, b)| a * b).sum::<f32>()
                                })
                                .sum();
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
                                    for (dv, &pv) in dprow[k0..k1].iter_mut().zip(&prow[k0..k1]) {
                                        *dv = pv * (*dv - dot) * self.scale;
                                    }
                                }
                            }
                        }
                        let mut accumulate = false;
                        for (k0, k1) in live() {
                            // dQ[r0..r1] (+)= dS[.., k0..k1] K[k0..k1]
                            let (ds, k) = (Mat::rows(&dpb[k0..], r1), Mat::rows(&kr[k0 * d..], d));
                            let dq = dqr.as_mut_ptr().wrapping_add(r0 * d);
                            unsafe { matmul(m, d, k1 - k0, dq, d, accumulate, ds, k, Threads::Single) };
                            accumulate = true;
                            // dK[k0..k1] += dS[.., k0..k1]^T Q[r0..r1]
                            let (dst_t, q) =
                                (Mat { ptr: dpb[k0..].as_ptr(), rs: 1, cs: r1 }, Mat::rows(&qr[r0 * d..], d));
                            let dk = dkr.as_mut_ptr().wrapping_add(k0 * d);
                            unsafe { matmul(k1 - k0, d, m, dk, d, true, dst_t, q, Threads::Single) };
                        }
                    }
                    for (t, gq) in dqr.chunks_exact(d).enumerate() {
                        let (c, sn) = self.tables(self.pos(b, t));
                        // SAFETY: task (b, g) alone writes rows b * s.. of the query columns of
                        // its heads and of key/value head g; `dqkv` outlives the loop.
                        let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add((b * s + t) * cols + h * d), d) };
                        rope_row_bwd(o, gq, c, sn);
                    }
                }
                for (t, (gk, gv)) in dkr.chunks_exact(d).zip(dvv.chunks_exact(d)).enumerate() {
                    let (c, sn) = self.tables(self.pos(b, t));
                    let base = (b * s + t) * cols + qc + g * d;
                    // SAFETY: as above (key and value columns of head g, rows of batch row b).
                    let (ok, ov) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(dst.get().add(base), d),
                            std::slice::from_raw_parts_mut(dst.get().add(base + kc), d),
                        )
                    };
                    rope_row_bwd(ok, gk, c, sn);
                    ov.copy_from_slice(gv);
                }
            },
        );
        Ok(dqkv)
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

// ---------------------------------------------------------------------------------------------
// log-softmax + gather

struct LogSoftmaxGather;

impl CustomOp2 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "slime-log-softmax-gather"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "logits")?;
        let labels = u32_slice(s2, l2, "labels")?;
        let (n, v) = l1.shape().dims2()?;
        if labels.len() != n {
            candle_core::bail!("labels: {} for {n} rows", labels.len());
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= v) {
            candle_core::bail!("label {bad} >= vocab {v}")
        }
        let mut out = vec![0f32; n];
        out.par_chunks_mut(ROW_BLOCK).zip(x.par_chunks(v * ROW_BLOCK)).zip(labels.par_chunks(ROW_BLOCK)).for_each(
            |((o, x), l)| {
                for ((o, row), &label) in o.iter_mut().zip(x.chunks_exact(v)).zip(l) {
                    *o = row[label as usize] - row_lse(row);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// `d out[n] / d x[n, v] = 1[v = label[n]] - softmax(x[n])[v]`.
    fn bwd(
        &self,
        x: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (_, v) = x.dims2()?;
        let labels_v: Vec<u32> = labels.to_vec1()?;
        let (xs, gs) = (HostF32::new(x, "logits")?, HostF32::new(&g, "grad")?);
        let mut dx = vec![0f32; xs.slice().len()];
        dx.par_chunks_mut(v * ROW_BLOCK)
            .zip(xs.slice().par_chunks(v * ROW_BLOCK))
            .zip(labels_v.par_chunks(ROW_BLOCK))
            .zip(gs.slice().par_chunks(ROW_BLOCK))
            .for_each(|(((d, x), l), g)| {
                for (((d, row), &label), &g) in d.chunks_exact_mut(v).zip(x.chunks_exact(v)).zip(l).zip(g) {
                    let lse = row_lse(row);
                    for (d, &val) in d.iter_mut().zip(row) {
                        *d = -g * (val - lse).exp();
                    }
                    d[label as usize] += g;
                }
            });
        Ok((Some(cpu(dx, x.shape())?), None))
    }
}

/// `out[n] = log_softmax(logits[n])[labels[n]]` for logits `[n, vocab]` and labels `[n]` (u32),
/// fused (one pass, no `[n, vocab]` log-softmax tensor) with a backward pass on f32 CPU tensors,
/// the composition `log_softmax` + `gather` elsewhere.
pub fn log_softmax_gather(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::U32)?.contiguous()?;
    if !fusable(&[logits]) {
        let picked = crate::ops::log_softmax(logits)?.contiguous()?.gather(&labels.unsqueeze(1)?, 1)?;
        return Ok(picked.squeeze(1)?);
    }
    Ok(logits.contiguous()?.apply_op2(&labels, LogSoftmaxGather)?)
}

// ---------------------------------------------------------------------------------------------
// Whole blocks: one op per half-layer, so no intermediate activation or its gradient goes
// through candle's graph (no zero-filled gradient buffers, no accumulation passes).

/// What a fused block keeps from its forward pass for its backward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// Keep the block's intermediate activations (attention: q|k|v and the attention output,
    /// 3 x hidden floats a position at 4 kv heads of 8; MLP: gate|up, 2 x intermediate floats a
    /// position) until the backward pass frees them. The default: fastest.
    #[default]
    Keep,
    /// Keep only the block's inputs and recompute the rest in the backward pass (gradient
    /// checkpointing): the block's forward products run twice, about a third more FLOPs for a
    /// Llama layer, and its activation memory drops to the residual stream.
    Recompute,
}

/// Bytes of activations that fused blocks hold for their backward passes: now, and the most at
/// once since the meter was made or its peak reset. A model owns one
/// ([`crate::Llama::activation_meter`]); a forward pass adds what each block keeps, the backward
/// pass (or dropping the graph) subtracts it, so after `backward()` the count is back to zero and
/// the peak is the activation memory of one step (the residual stream between blocks and
/// candle's own tensors not included).
#[derive(Debug, Default)]
pub struct ActivationMeter {
    held: AtomicUsize,
    peak: AtomicUsize,
}

impl ActivationMeter {
    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since the meter was made or [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak from what is held now.
    pub fn reset_peak(&self) {
        self.peak.store(self.held_bytes(), Ordering::Relaxed);
    }

    fn add(&self, bytes: usize) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The activations a block saved in its forward pass ([`Activations::Keep`]); the first backward
/// pass takes (frees) them, and a backward pass that finds none recomputes them from the inputs
/// (a graph differentiated twice, or [`Activations::Recompute`]). What it holds is counted on
/// its meter.
struct Saved {
    policy: Activations,
    meter: Option<Arc<ActivationMeter>>,
    slot: std::sync::Mutex<Option<Pair>>,
}

/// A block's two saved activation buffers.
type Pair = (Vec<f32>, Vec<f32>);

fn pair_bytes((a, b): &Pair) -> usize {
    (a.len() + b.len()) * std::mem::size_of::<f32>()
}

impl Saved {
    fn new(policy: Activations, meter: Option<&Arc<ActivationMeter>>) -> Self {
        Self { policy, meter: meter.cloned(), slot: std::sync::Mutex::new(None) }
    }

    /// Stores `acts` unless the policy is to recompute them.
    fn put(&self, acts: Pair) -> candle_core::Result<()> {
        if self.policy == Activations::Keep {
            if let Some(m) = &self.meter {
                m.add(pair_bytes(&acts));
            }
            *self.lock()? = Some(acts);
        }
        Ok(())
    }

    /// The saved activations, or `recompute()`'s.
    fn take_or(&self, recompute: impl FnOnce() -> candle_core::Result<Pair>) -> candle_core::Result<Pair> {
        let taken = self.lock()?.take();
        match taken {
            Some(acts) => {
                self.uncount(&acts);
                Ok(acts)
            }
            None => recompute(),
        }
    }

    fn uncount(&self, acts: &Pair) {
        if let Some(m) = &self.meter {
            m.sub(pair_bytes(acts));
        }
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<Pair>>> {
        self.slot.lock().map_err(|_| candle_core::Error::Msg("fused block: saved activations poisoned".into()))
    }
}

impl Drop for Saved {
    /// A graph dropped without a backward pass frees what its blocks kept.
    fn drop(&mut self) {
        if let Ok(Some(acts)) = self.slot.get_mut().map(Option::take) {
            self.uncount(&acts);
        }
    }
}

/// `ptr[offset..]` as an operand.
fn at(data: &[f32], offset: usize) -> &[f32] {
    &data[offset..]
}

/// Which optional parameters an attention block carries after its four projection matrices in
/// the packed weight vector, in this order: q|k|v bias (`qkv_cols`), o_proj bias (`hidden`), q
/// norm weight (`head_dim`), k norm weight (`head_dim`), post-norm weight (`hidden`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct BlockParts {
    qkv_bias: bool,
    o_bias: bool,
    qk_norm: bool,
    post_norm: bool,
}

/// Offsets of the pieces of an attention block's packed weights.
struct PackedAttention {
    /// End of the four matrices (o_proj starts at `qkv_cols * hidden`).
    matrices: usize,
    qkv_bias: Option<usize>,
    o_bias: Option<usize>,
    qk_norm: Option<usize>,
    post_norm: Option<usize>,
    total: usize,
}

/// `x + o(attention(rms_norm(x) [q|k|v]))`, weights packed as
/// `[q_proj (flattened), k_proj, v_proj, o_proj]` (1-D), followed by the optional parts of
/// [`BlockParts`]: `qkv = rms_norm(x) W_qkv^T (+ b_qkv)`, the query and key heads RMS-normalised
/// (with q/k norm), attention, `y = x + attn W_o^T (+ b_o)`. The saved activations are the same
/// with or without the optional parts: `qkv` (after the bias, before the head norm, which the
/// backward pass recomputes: one cheap row pass) and the attention output.
struct AttentionBlockOp {
    spec: Arc<AttentionSpec>,
    eps: f64,
    hidden: usize,
    parts: BlockParts,
    saved: Saved,
}

impl AttentionBlockOp {
    fn packed(&self) -> PackedAttention {
        let (h, cols, qc, d) = (self.hidden, self.spec.qkv_cols(), self.spec.q_cols(), self.spec.head_dim);
        let matrices = cols * h + h * qc;
        let mut end = matrices;
        let mut take = |present: bool, len: usize| {
            present.then(|| {
                end += len;
                end - len
            })
        };
        let qkv_bias = take(self.parts.qkv_bias, cols);
        let o_bias = take(self.parts.o_bias, h);
        let qk_norm = take(self.parts.qk_norm, 2 * d);
        let post_norm = take(self.parts.post_norm, h);
        PackedAttention { matrices, qkv_bias, o_bias, qk_norm, post_norm, total: end }
    }

    /// The q|k|v bias, the o_proj bias and the q/k head norm in the packed weights `w`.
    #[allow(clippy::type_complexity)]
    fn parts<'a>(&self, w: &'a [f32]) -> (Option<&'a [f32]>, Option<&'a [f32]>, Option<HeadNorm<'a>>) {
        let p = self.packed();
        let (cols, d) = (self.spec.qkv_cols(), self.spec.head_dim);
        let norm = p.qk_norm.map(|o| HeadNorm {
            q: &w[o..o + d],
            k: &w[o + d..o + 2 * d],
            heads: self.spec.heads,
            kv_heads: self.spec.kv_heads,
            eps: self.eps,
        });
        (p.qkv_bias.map(|o| &w[o..o + cols]), p.o_bias.map(|o| &w[o..o + self.hidden]), norm)
    }

    /// The post-norm weight in the packed weights `w`, if any.
    fn post<'a>(&self, w: &'a [f32]) -> Option<&'a [f32]> {
        self.packed().post_norm.map(|o| &w[o..o + self.hidden])
    }

    /// The output projection `attn W_o^T (+ b_o)` of `n` rows, before any post-norm.
    fn project_out(&self, attn: &[f32], w: &[f32], n: usize) -> Vec<f32> {
        let (h, qc) = (self.hidden, self.spec.q_cols());
        let mut m = vec![0f32; n * h];
        if let (_, Some(b), _) = self.parts(w) {
            add_rows(&mut m, b);
        }
        let wo = at(w, self.spec.qkv_cols() * h);
        // SAFETY: `m` n x h, `attn` n x qc, `wo` h x qc (inside `w`, length checked).
        unsafe { matmul(n, h, qc, m.as_mut_ptr(), h, true, Mat::rows(attn, qc), Mat::rows_t(wo, qc), Threads::Pool) };
        m
    }

    /// `(qkv, attn)` of the forward pass: `qkv` before the q/k head norm.
    fn activations(&self, x: &[f32], nw: &[f32], w: &[f32]) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let (h, cols) = (self.hidden, self.spec.qkv_cols());
        let n = x.len() / h;
        let mut normed = vec![0f32; x.len()];
        rms_norm_rows(x, nw, self.eps, &mut normed);
        let mut qkv = product(n, cols, h, Mat::rows(&normed, h), Mat::rows_t(w, h));
        drop(normed);
        let (qkv_bias, _, head_norm) = self.parts(w);
        if let Some(b) = qkv_bias {
            add_rows(&mut qkv, b);
        }
        let attn = match head_norm {
            None => self.spec.forward(&qkv)?,
            Some(norm) => self.spec.forward(&Self::head_normed(&qkv, cols, &norm))?,
        };
        Ok((qkv, attn))
    }

    /// A copy of `qkv` with its query and key heads normalised.
    fn head_normed(qkv: &[f32], cols: usize, norm: &HeadNorm) -> Vec<f32> {
        let mut out = qkv.to_vec();
        norm.apply(&mut out, cols);
        out
    }

    fn check(&self, x: usize, nw: usize, w: usize) -> candle_core::Result<()> {
        let h = self.hidden;
        if nw != h || w != self.packed().total || x != self.spec.batch * self.spec.seq * h {
            candle_core::bail!(
                "attention block: x {x}, norm {nw}, packed weights {w} do not match hidden {h} ({:?})",
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
        let w = f32_slice(s3, l3, "attention block weights")?;
        self.check(x.len(), nw.len(), w.len())?;
        let (h, qc) = (self.hidden, self.spec.q_cols());
        let n = x.len() / h;
        let (qkv, attn) = self.activations(x, nw, w)?;
        let wo = at(w, self.spec.qkv_cols() * h);
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
            if let (_, Some(b), _) = self.parts(w) {
                add_rows(&mut y, b);
            }
            // SAFETY: `y` n x h, `attn` n x qc, `wo` h x qc (inside `w`, length checked).
            unsafe {
                matmul(n, h, qc, y.as_mut_ptr(), h, true, Mat::rows(&attn, qc), Mat::rows_t(wo, qc), Threads::Pool)
            };
        }
        self.saved.put((qkv, attn))?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `dW_o = dy^T attn` (`db_o` = column sums of `dy`), `d attn = dy W_o`, the attention
    /// backward to `d qkv` (through the q/k head norm, recomputed from the saved `qkv`, whose
    /// backward also gives the norm weights' gradients), `db_qkv` = column sums of `d qkv`,
    /// `dW_qkv = d qkv^T rms_norm(x)`, then RMSNorm's backward and the residual `dx += dy`.
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
        let (x_, nw_, w_, g_) = (xs.slice(), nws.slice(), ws.slice(), gs.slice());
        let (h, cols, qc) = (self.hidden, self.spec.qkv_cols(), self.spec.q_cols());
        let n = x_.len() / h;
        let (qkv_bias, o_bias, head_norm) = self.parts(w_);
        let (qkv, attn) = self.saved.take_or(|| self.activations(x_, nw_, w_))?;
        let wo = at(w_, cols * h);
        let matrices = self.packed().matrices;
        let mut dw: Vec<f32> = Vec::with_capacity(w_.len());
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
        // SAFETY: `dw` has room for `matrices` = cols * h + h * qc elements; the two products
        // write [0, cols * h) and [cols * h, matrices) completely before `set_len`.
        unsafe {
            let dwo = dw.as_mut_ptr().add(cols * h);
            matmul(h, qc, n, dwo, qc, false, Mat::rows_t(gy, h), Mat::rows(&attn, qc), Threads::Pool);
        }
        drop(attn);
        let d_o_bias = o_bias.map(|_| col_sums(gy, h));
        let dattn = product(n, qc, h, Mat::rows(gy, h), Mat::rows(wo, qc));
        drop(dm);
        let (dqkv, d_norms) = match &head_norm {
            None => (self.spec.backward(&qkv, &dattn)?, None),
            Some(norm) => {
                let mut dqkv = self.spec.backward(&Self::head_normed(&qkv, cols, norm), &dattn)?;
                let d_norms = norm.backward(&qkv, cols, &mut dqkv);
                (dqkv, Some(d_norms))
            }
        };
        drop((qkv, dattn));
        let d_qkv_bias = qkv_bias.map(|_| col_sums(&dqkv, cols));
        let mut normed = vec![0f32; x_.len()];
        rms_norm_rows(x_, nw_, self.eps, &mut normed);
        // SAFETY: as above.
        unsafe {
            matmul(
                cols,
                h,
                n,
                dw.as_mut_ptr(),
                h,
                false,
                Mat::rows_t(&dqkv, cols),
                Mat::rows(&normed, h),
                Threads::Pool,
            );
            dw.set_len(matrices);
        }
        // The optional parts' gradients, in the packed order.
        for part in [d_qkv_bias, d_o_bias].into_iter().flatten() {
            dw.extend_from_slice(&part);
        }
        if let Some((dq, dk)) = d_norms {
            dw.extend_from_slice(&dq);
            dw.extend_from_slice(&dk);
        }
        if let Some(dp) = d_post {
            dw.extend_from_slice(&dp);
        }
        drop(normed);
        let dnormed = product(n, h, cols, Mat::rows(&dqkv, cols), Mat::rows(w_, h));
        drop(dqkv);
        let mut dx = vec![0f32; x_.len()];
        let dnw = rms_norm_bwd_rows(x_, nw_, &dnormed, self.eps, &mut dx);
        dx.par_chunks_mut(h * ROW_BLOCK).zip(g_.par_chunks(h * ROW_BLOCK)).for_each(|(d, g)| {
            d.iter_mut().zip(g).for_each(|(d, g)| *d += g);
        });
        Ok((Some(cpu(dx, x.shape())?), Some(cpu(dnw, nw.shape())?), Some(cpu(dw, w.shape())?)))
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
    let extra = extras.tensors();
    let mut all = vec![x, norm_weight, q, k, v, o];
    all.extend(&extra);
    if !fusable(&all) {
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
    let mut pieces = vec![q.flatten_all()?, k.flatten_all()?, v.flatten_all()?, o.flatten_all()?];
    for t in extra {
        pieces.push(t.flatten_all()?);
    }
    let packed = Tensor::cat(&pieces, 0)?;
    let parts = extras.parts();
    let op = AttentionBlockOp { spec: spec.clone(), eps, hidden, parts, saved: Saved::new(activations, meter) };
    Ok(x.contiguous()?.apply_op3(&norm_weight.contiguous()?, &packed, op)?)
}

/// Rows of the MLP block's backward pass (and of its forward pass when it keeps nothing) handled
/// at a time: the gate|up, SwiGLU and gradient buffers exist for this many rows, not for the
/// whole batch (256 rows x 2 x 688 floats = 1.4 MiB at the reference width, against 9.4 MiB for
/// 1,792 rows), while the products stay large enough to run at gemm's full rate.
const MLP_ROWS: usize = 256;

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

/// The options of an MLP block beyond Llama's (the default: SwiGLU, no post-norm).
#[derive(Debug, Clone, Copy, Default)]
pub struct MlpExtras<'a> {
    /// The gate activation.
    pub act: Glu,
    /// An RMSNorm weight `[hidden]` applied to the MLP's output before the residual add, with
    /// the block's `eps` (Gemma 2/3's post-feedforward norm, given as its effective weight
    /// `1 + w`): `x + rms_norm(mlp(x), post_norm)`.
    pub post_norm: Option<&'a Tensor>,
}

/// `x + post(act(g) * u) w_down^T` with `[g | u] = rms_norm(x) [w_gate | w_up]^T` and `post` the
/// optional post-norm, weights packed as `[gate_proj (flattened), up_proj, down_proj]` (1-D),
/// then the post-norm weight when there is one. Saved ([`Activations::Keep`]): `g|u`, and with a
/// post-norm the MLP output `m` before it (`[rows, hidden]`, so its backward need not redo the
/// down projection).
struct MlpBlockOp {
    eps: f64,
    hidden: usize,
    inter: usize,
    act: Glu,
    post_norm: bool,
    saved: Saved,
}

impl MlpBlockOp {
    /// `(rms_norm(x), gate|up)` of the rows `x`.
    fn gate_up(&self, x: &[f32], nw: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (h, i) = (self.hidden, self.inter);
        let mut normed = vec![0f32; x.len()];
        rms_norm_rows(x, nw, self.eps, &mut normed);
        let gu = product(x.len() / h, 2 * i, h, Mat::rows(&normed, h), Mat::rows_t(w, h));
        (normed, gu)
    }

    /// `y += act(g) * u @ w_down^T` for the rows of `gu`; returns the gated product.
    fn down(&self, gu: &[f32], w: &[f32], y: &mut [f32]) -> Vec<f32> {
        let (h, i) = (self.hidden, self.inter);
        let rows = gu.len() / (2 * i);
        let mut act = vec![0f32; rows * i];
        glu_rows(self.act, gu, i, &mut act);
        let wd = at(w, 2 * i * h);
        // SAFETY: `y` rows x h, `act` rows x i, `wd` h x i (inside `w`, length checked).
        unsafe { matmul(rows, h, i, y.as_mut_ptr(), h, true, Mat::rows(&act, i), Mat::rows_t(wd, i), Threads::Pool) };
        act
    }

    /// The post-norm weight in the packed weights, if any.
    fn post<'a>(&self, w: &'a [f32]) -> Option<&'a [f32]> {
        let (h, i) = (self.hidden, self.inter);
        self.post_norm.then(|| &w[3 * i * h..3 * i * h + h])
    }

    /// `y = x + post(mlp)` for rows whose `y` already holds `x` and whose gate|up is `gu`;
    /// returns the MLP output before the post-norm (empty without one).
    fn finish(&self, gu: &[f32], w: &[f32], y: &mut [f32]) -> Vec<f32> {
        let Some(pw) = self.post(w) else {
            self.down(gu, w, y);
            return Vec::new();
        };
        let mut m = vec![0f32; y.len()];
        self.down(gu, w, &mut m);
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
        let w = f32_slice(s3, l3, "mlp block weights")?;
        let (h, i) = (self.hidden, self.inter);
        let packed = 3 * i * h + if self.post_norm { h } else { 0 };
        if nw.len() != h || w.len() != packed || x.len() % h != 0 {
            candle_core::bail!("mlp block: x {}, norm {}, packed weights {} do not match", x.len(), nw.len(), w.len())
        }
        let mut y = x.to_vec();
        match self.saved.policy {
            Activations::Keep => {
                let (_, gu) = self.gate_up(x, nw, w);
                let m = self.finish(&gu, w, &mut y);
                self.saved.put((gu, m))?;
            }
            Activations::Recompute => {
                for (xc, yc) in x.chunks(MLP_ROWS * h).zip(y.chunks_mut(MLP_ROWS * h)) {
                    self.finish(&self.gate_up(xc, nw, w).1, w, yc);
                }
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// Per chunk of [`MLP_ROWS`] rows (the weight gradients accumulate over the chunks in order):
    /// `act = act(g) u`; with a post-norm, its backward from the MLP output `m` (saved, or
    /// `act W_down^T` again) turns `dy` into `dm` (without one, `dm = dy`); `dW_down += dm^T act`,
    /// `d[g|u]` from `dact = dm W_down`, `dW_gate|up += d[g|u]^T rms_norm(x)`, then RMSNorm's
    /// backward and the residual `dx += dy`.
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
        let (x_, nw_, w_, g_) = (xs.slice(), nws.slice(), ws.slice(), gs.slice());
        let (h, i) = (self.hidden, self.inter);
        if x_.is_empty() {
            candle_core::bail!("mlp block: no rows")
        }
        // Empty when nothing was kept: each chunk then recomputes its gate|up (and `m`).
        let (saved_gu, saved_m) = self.saved.take_or(|| Ok((Vec::new(), Vec::new())))?;
        let wd = at(w_, 2 * i * h);
        let post = self.post(w_);
        let mut dw: Vec<f32> = Vec::with_capacity(w_.len());
        let mut dx = vec![0f32; x_.len()];
        let mut dnw = vec![0f32; h];
        let mut dpost = vec![0f32; if post.is_some() { h } else { 0 }];
        for (c, (xc, gc)) in x_.chunks(MLP_ROWS * h).zip(g_.chunks(MLP_ROWS * h)).enumerate() {
            let rows = xc.len() / h;
            let recomputed;
            let (normed, gu): (Vec<f32>, &[f32]) = if saved_gu.is_empty() {
                let (normed, gu) = self.gate_up(xc, nw_, w_);
                recomputed = gu;
                (normed, &recomputed)
            } else {
                let mut normed = vec![0f32; xc.len()];
                rms_norm_rows(xc, nw_, self.eps, &mut normed);
                (normed, &saved_gu[c * MLP_ROWS * 2 * i..][..rows * 2 * i])
            };
            let mut act = vec![0f32; rows * i];
            glu_rows(self.act, gu, i, &mut act);
            // The gradient reaching the down projection's output.
            let dm_owned;
            let dm: &[f32] = match post {
                None => gc,
                Some(pw) => {
                    let m_owned;
                    let m: &[f32] = if saved_m.is_empty() {
                        m_owned = product(rows, h, i, Mat::rows(&act, i), Mat::rows_t(wd, i));
                        &m_owned
                    } else {
                        &saved_m[c * MLP_ROWS * h..][..rows * h]
                    };
                    let mut d = vec![0f32; rows * h];
                    let part = rms_norm_bwd_rows(m, pw, gc, self.eps, &mut d);
                    dpost.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
                    dm_owned = d;
                    &dm_owned
                }
            };
            let accumulate = c > 0;
            // SAFETY: `dw` has room for 3 i h elements; the first chunk's products write
            // [2 i h, 3 i h) and [0, 2 i h) completely (accumulate = false), later chunks add to
            // them; `set_len` follows the loop, which runs at least once (x is not empty,
            // checked above).
            unsafe {
                matmul(
                    h,
                    i,
                    rows,
                    dw.as_mut_ptr().add(2 * i * h),
                    i,
                    accumulate,
                    Mat::rows_t(dm, h),
                    Mat::rows(&act, i),
                    Threads::Pool,
                );
            }
            drop(act);
            let dact = product(rows, i, h, Mat::rows(dm, h), Mat::rows(wd, i));
            let mut dgu = vec![0f32; rows * 2 * i];
            glu_bwd_rows(self.act, gu, &dact, i, &mut dgu);
            drop(dact);
            // SAFETY: as above.
            unsafe {
                matmul(
                    2 * i,
                    h,
                    rows,
                    dw.as_mut_ptr(),
                    h,
                    accumulate,
                    Mat::rows_t(&dgu, 2 * i),
                    Mat::rows(&normed, h),
                    Threads::Pool,
                );
            }
            drop(normed);
            let dnormed = product(rows, h, 2 * i, Mat::rows(&dgu, 2 * i), Mat::rows(w_, h));
            drop(dgu);
            let dxc = &mut dx[c * MLP_ROWS * h..][..xc.len()];
            let part = rms_norm_bwd_rows(xc, nw_, &dnormed, self.eps, dxc);
            dnw.iter_mut().zip(&part).for_each(|(t, p)| *t += p);
            dxc.par_chunks_mut(h * ROW_BLOCK).zip(gc.par_chunks(h * ROW_BLOCK)).for_each(|(d, g)| {
                d.iter_mut().zip(g).for_each(|(d, g)| *d += g);
            });
        }
        // SAFETY: the first chunk wrote every element of the three matrices (see above).
        unsafe { dw.set_len(3 * i * h) };
        dw.extend_from_slice(&dpost);
        Ok((Some(cpu(dx, x.shape())?), Some(cpu(dnw, nw.shape())?), Some(cpu(dw, w.shape())?)))
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
    let mut all = vec![x, norm_weight, gate, up, down];
    all.extend(extras.post_norm);
    if !fusable(&all) {
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
    let mut pieces = vec![gate.flatten_all()?, up.flatten_all()?, down.flatten_all()?];
    if let Some(p) = extras.post_norm {
        if p.dims() != [hidden] {
            return Err(crate::ModelError::Input {
                input: "mlp block",
                reason: format!("post norm has shape {:?}, expected [{hidden}]", p.dims()),
            });
        }
        pieces.push(p.flatten_all()?);
    }
    let packed = Tensor::cat(&pieces, 0)?;
    let op = MlpBlockOp {
        eps,
        hidden,
        inter,
        act: extras.act,
        post_norm: extras.post_norm.is_some(),
        saved: Saved::new(activations, meter),
    };
    Ok(x.contiguous()?.apply_op3(&norm_weight.contiguous()?, &packed, op)?)
}
