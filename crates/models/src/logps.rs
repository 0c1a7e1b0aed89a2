//! Token log-probs of given labels without materialising `[batch, seq, vocab]` logits.
//!
//! On f32 CPU tensors the lm_head product, optional soft-capping, log-softmax and gather run as
//! one custom op ([`lm_head_logps`]) over blocks of rows whose logits take at most
//! [`BLOCK_BYTES`]; its backward recomputes each block's logits instead of keeping them, so
//! neither pass ever holds more than one block of logits (a graph of per-chunk ops would keep
//! every chunk's logits alive until the backward pass: 16 GiB for 8 x 2048 tokens of a
//! 262,144-token vocabulary); only logits of at most [`KEPT_BYTES`] in all (one block) are kept
//! from the forward pass for the backward pass instead. Other devices and dtypes run the
//! composition chunk by chunk.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use slime_kernels::{MatMut, MatRef, Threads, matmul, product, vmath};

use crate::fused::{fusable, linear, log_softmax_gather};
use crate::host::{HostF32, f32_slice, row_lse, u32_slice};
use crate::{ModelError, Result};

/// Upper bound on the logits one block of [`lm_head_logps`] holds (64 MiB: 64 rows of a
/// 262,144-token vocabulary).
pub const BLOCK_BYTES: usize = 64 << 20;

/// Largest logits [`lm_head_logps`] keeps from its forward pass for its backward pass when all
/// its rows fit one block (4 MiB; 1.5 MiB on the reference benchmark): small enough to hold
/// through the backward pass of the whole model, and it saves recomputing the product.
pub const KEPT_BYTES: usize = 4 << 20;

/// `log softmax(cap(h W^T))[label]` per row of `hidden [n, h]`, `lm_head [v, h]`, `labels [n]`.
struct LmHeadLogps {
    softcap: Option<f64>,
    block: usize,
    /// Whether the forward pass keeps its logits (one block of at most [`KEPT_BYTES`]).
    keep: bool,
    /// The kept logits, taken (freed) by the first backward pass.
    kept: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LmHeadLogps {
    /// Logits of rows `r0..r0 + rows` (soft-capped), row-major `[rows, v]`.
    fn logits(&self, h: &[f32], w: &[f32], r0: usize, rows: usize, v: usize, hd: usize) -> Vec<f32> {
        let (x, w) = (MatRef::row_major(&h[r0 * hd..], rows, hd), MatRef::row_major(w, v, hd).t());
        let mut z = product(x, w, Threads::Pool);
        if let Some(cap) = self.softcap {
            let cap = cap as f32;
            z.par_chunks_mut(v).for_each(|row| row.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh()));
        }
        z
    }
}

impl CustomOp3 for LmHeadLogps {
    fn name(&self) -> &'static str {
        "slime-lm-head-logps"
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
        let h = f32_slice(s1, l1, "hidden")?;
        let w = f32_slice(s2, l2, "lm_head")?;
        let labels = u32_slice(s3, l3, "labels")?;
        let (n, hd) = l1.shape().dims2()?;
        let (v, hd2) = l2.shape().dims2()?;
        if hd != hd2 || labels.len() != n {
            candle_core::bail!(
                "lm_head logps: hidden {:?}, lm_head {:?}, labels {}",
                l1.dims(),
                l2.dims(),
                labels.len()
            )
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= v) {
            candle_core::bail!("label {bad} >= vocab {v}")
        }
        let mut out = vec![0f32; n];
        for r0 in (0..n).step_by(self.block) {
            let rows = self.block.min(n - r0);
            let z = self.logits(h, w, r0, rows, v, hd);
            out[r0..r0 + rows]
                .par_iter_mut()
                .zip(z.par_chunks(v))
                .zip(&labels[r0..r0 + rows])
                .for_each(|((o, row), &label)| *o = row[label as usize] - row_lse(row));
            if self.keep {
                *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(z);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    /// With `d z = g (onehot(label) - softmax(z))` and `d l = d z (1 - (z / cap)^2)` under
    /// soft-capping: `d hidden = d l W`, `d W = d l^T hidden`, block by block (logits kept or
    /// recomputed), each only when that input is part of a graph.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        if !want_dx && !want_dw {
            return Ok((None, None, None));
        }
        let g = g.contiguous()?;
        let (n, hd) = x.dims2()?;
        let v = w.dim(0)?;
        let labels: Vec<u32> = labels.to_vec1()?;
        let (xs, ws, gs) = (HostF32::new(x, "hidden")?, HostF32::new(w, "lm_head")?, HostF32::new(&g, "grad")?);
        let (h, wt, gv) = (xs.slice(), ws.slice(), gs.slice());
        let mut dx = if want_dx { vec![0f32; n * hd] } else { Vec::new() };
        let mut dw = if want_dw { vec![0f32; v * hd] } else { Vec::new() };
        let cap = self.softcap.map(|c| c as f32);
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take();
        for r0 in (0..n).step_by(self.block) {
            let rows = self.block.min(n - r0);
            let mut d = match kept.take() {
                Some(z) if z.len() == rows * v => z,
                _ => self.logits(h, wt, r0, rows, v, hd),
            };
            let dcap = |z: f32| cap.map_or(1.0, |c| 1.0 - (z / c) * (z / c));
            d.par_chunks_mut(v).zip(&labels[r0..r0 + rows]).zip(&gv[r0..r0 + rows]).for_each(|((row, &label), &g)| {
                let lse = row_lse(row);
                let z_label = row[label as usize];
                vmath::neg_scaled_softmax_row(row, lse, g, cap.unwrap_or(f32::INFINITY));
                row[label as usize] += g * dcap(z_label);
            });
            let dz = MatRef::row_major(&d, rows, v);
            if want_dx {
                // Rows r0..r0 + rows of `dx` = d W.
                let dst = MatMut::row_major(&mut dx[r0 * hd..], rows, hd);
                matmul(dst, dz, MatRef::row_major(wt, v, hd), false, Threads::Pool);
            }
            if want_dw {
                // d^T h: the first block initialises, later ones accumulate.
                let hb = MatRef::row_major(&h[r0 * hd..], rows, hd);
                matmul(MatMut::row_major(&mut dw, v, hd), dz.t(), hb, r0 > 0, Threads::Pool);
            }
        }
        let dx = if want_dx { Some(Tensor::from_vec(dx, (n, hd), x.device())?) } else { None };
        let dw = if want_dw { Some(Tensor::from_vec(dw, (v, hd), w.device())?) } else { None };
        Ok((dx, dw, None))
    }
}

/// `out[b, t] = log softmax(hidden[b, t-1] W^T)[ids[b, t]]` for `t >= 1`, `out[b, 0] = 0`,
/// `[batch, seq]` f32, computed over chunks of at most `chunk` positions (`batch * chunk` rows,
/// and at most [`BLOCK_BYTES`] of logits on the fused CPU path): each chunk's logits are reduced
/// to log-probs before the next is formed, in the forward and (fused path) the backward pass.
pub fn chunked_token_logps(hidden: &Tensor, lm_head: &Tensor, ids: &Tensor, chunk: usize) -> Result<Tensor> {
    chunked_token_logps_capped(hidden, lm_head, ids, chunk, None)
}

/// [`chunked_token_logps`] with optional final-logit soft-capping (Gemma 2):
/// logits become `cap * tanh(logits / cap)` before the log-softmax.
pub fn chunked_token_logps_capped(
    hidden: &Tensor,
    lm_head: &Tensor,
    ids: &Tensor,
    chunk: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (batch, seq, _) = hidden.dims3()?;
    if ids.dims() != [batch, seq] {
        return Err(ModelError::Input {
            input: "input_ids",
            reason: format!("shape {:?} does not match hidden states {:?}", ids.dims(), hidden.dims()),
        });
    }
    if chunk == 0 {
        return Err(ModelError::Input { input: "chunk", reason: "must be at least 1".into() });
    }
    let device = hidden.device();
    if seq > 1 && fusable(&[hidden, lm_head]) {
        let h = hidden.narrow(1, 0, seq - 1)?.contiguous()?.reshape((batch * (seq - 1), ()))?;
        let labels = ids.narrow(1, 1, seq - 1)?.contiguous()?.flatten_all()?;
        let picked =
            lm_head_logps(&h, lm_head, &labels, softcap, batch.saturating_mul(chunk))?.reshape((batch, seq - 1))?;
        return Ok(Tensor::cat(&[&Tensor::zeros((batch, 1), DType::F32, device)?, &picked], 1)?);
    }
    let mut parts = vec![Tensor::zeros((batch, 1), DType::F32, device)?];
    let mut start = 1;
    while start < seq {
        let len = chunk.min(seq - start);
        let h = hidden.narrow(1, start - 1, len)?.contiguous()?.reshape((batch * len, ()))?;
        let mut logits = linear(&h, lm_head)?.to_dtype(DType::F32)?;
        if let Some(cap) = softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        let labels = ids.narrow(1, start, len)?.contiguous()?.flatten_all()?;
        let picked = log_softmax_gather(&logits, &labels)?;
        parts.push(picked.reshape((batch, len))?);
        start += len;
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// `out[r] = log softmax(cap(hidden[r] lm_head^T))[labels[r]]` for `hidden [n, h]`, `lm_head
/// [v, h]`, `labels [n]` (u32), `cap(z) = softcap * tanh(z / softcap)` when given: one op on f32
/// CPU tensors whose forward and backward each hold the logits of at most `max_rows` rows (and
/// never more than [`BLOCK_BYTES`]) at a time; differentiable w.r.t. `hidden` and `lm_head`.
/// Elsewhere: `linear`, soft-capping and [`log_softmax_gather`] over blocks of `max_rows` rows.
pub fn lm_head_logps(
    hidden: &Tensor,
    lm_head: &Tensor,
    labels: &Tensor,
    softcap: Option<f64>,
    max_rows: usize,
) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    let v = lm_head.dim(0)?;
    let labels = labels.to_dtype(DType::U32)?.contiguous()?;
    let block = max_rows.min(BLOCK_BYTES / (4 * v.max(1))).max(1);
    if n == 0 {
        return Ok(Tensor::zeros(0, DType::F32, hidden.device())?);
    }
    if fusable(&[hidden, lm_head]) {
        let keep = n <= block && n.saturating_mul(v).saturating_mul(4) <= KEPT_BYTES;
        let op = LmHeadLogps { softcap, block, keep, kept: std::sync::Mutex::new(None) };
        return Ok(hidden.contiguous()?.apply_op3(&lm_head.contiguous()?, &labels, op)?);
    }
    let mut parts = Vec::new();
    for r0 in (0..n).step_by(block) {
        let rows = block.min(n - r0);
        let mut logits = linear(&hidden.narrow(0, r0, rows)?, lm_head)?.to_dtype(DType::F32)?;
        if let Some(cap) = softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        parts.push(log_softmax_gather(&logits, &labels.narrow(0, r0, rows)?)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
