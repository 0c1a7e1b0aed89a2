//! Row-wise kernels: RMSNorm, and log-softmax + gather.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu, fusable};
use crate::Result;
use crate::host::{HostF32, ROW_BLOCK, f32_slice, rms_norm_bwd_rows, rms_norm_rows, row_lse, u32_slice};

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
