//! Fused CPU kernels with a real backward pass (candle `CustomOp`s), each equal to the
//! straightforward differentiable composition in [`crate::ops`] within float rounding
//! (tested in `tests/fused.rs`, values and gradients within 1e-5).
//!
//! They run on contiguous f32 CPU tensors; [`rms_norm`] and [`log_softmax_gather`] fall back to
//! the composition on any other device or dtype, so the `cuda` feature keeps working.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::Result;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: expected f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(data) = s else { candle_core::bail!("{what}: expected u32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// `1 / sqrt(mean(x^2) + eps)` of one row, accumulated in f64.
fn inv_rms(row: &[f32], eps: f64) -> f32 {
    let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / row.len() as f64;
    (1.0 / (ms + eps).sqrt()) as f32
}

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
        let h = w.len();
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let r = inv_rms(row, self.eps);
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
                *o = v * r * w;
            }
        }
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
        let x = x.contiguous()?;
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormBwd { eps: self.eps })?;
        let h = w.dim(0)?;
        let r = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let dw = (g * x.broadcast_mul(&r)?)?.reshape(((), h))?.sum(0)?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "slime-rms-norm-bwd"
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
        let x = f32_slice(s1, l1, "rms_norm x")?;
        let w = f32_slice(s2, l2, "rms_norm weight")?;
        let g = f32_slice(s3, l3, "rms_norm grad")?;
        let h = w.len();
        let mut dx = vec![0f32; x.len()];
        for ((row, gr), d) in x.chunks_exact(h).zip(g.chunks_exact(h)).zip(dx.chunks_exact_mut(h)) {
            let r = inv_rms(row, self.eps);
            let dot = row.iter().zip(gr).zip(w).map(|((&v, &g), &w)| f64::from(v * g * w)).sum::<f64>();
            let c = (dot / h as f64) as f32 * r * r * r;
            for (((d, &v), &g), &w) in d.iter_mut().zip(row).zip(gr).zip(w) {
                *d = r * g * w - v * c;
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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

struct LogSoftmaxGather;

/// Row maximum and `log sum exp` of one row (max-shifted, accumulated in f64).
fn row_lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s = row.iter().map(|&v| f64::from((v - m).exp())).sum::<f64>();
    m + s.ln() as f32
}

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
        let mut out = Vec::with_capacity(n);
        for (row, &label) in x.chunks_exact(v).zip(labels) {
            let Some(&picked) = row.get(label as usize) else { candle_core::bail!("label {label} >= vocab {v}") };
            out.push(picked - row_lse(row));
        }
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
        let dx = x.contiguous()?.apply_op3_no_bwd(&labels.contiguous()?, &g.contiguous()?, &LogSoftmaxGatherBwd)?;
        Ok((Some(dx), None))
    }
}

struct LogSoftmaxGatherBwd;

impl CustomOp3 for LogSoftmaxGatherBwd {
    fn name(&self) -> &'static str {
        "slime-log-softmax-gather-bwd"
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
        let x = f32_slice(s1, l1, "logits")?;
        let labels = u32_slice(s2, l2, "labels")?;
        let g = f32_slice(s3, l3, "grad")?;
        let (_, v) = l1.shape().dims2()?;
        let mut dx = vec![0f32; x.len()];
        for (((row, &label), &g), d) in x.chunks_exact(v).zip(labels).zip(g).zip(dx.chunks_exact_mut(v)) {
            let lse = row_lse(row);
            for (d, &val) in d.iter_mut().zip(row) {
                *d = -g * (val - lse).exp();
            }
            d[label as usize] += g;
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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
