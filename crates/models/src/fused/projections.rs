//! The linear layers: [`linear`], [`norm_linear`], [`linear_residual`] and
//! [`swiglu_down_residual`].

use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, Layout, Shape, Tensor};

use super::{Glu, cpu, fusable, rms_norm};
use crate::Result;
use slime_kernels::{MatMut, MatRef, Threads, matmul, product};

use crate::host::{HostF32, f32_slice, glu_bwd_rows, glu_rows, rms_norm_bwd_rows, rms_norm_rows};

// ---------------------------------------------------------------------------------------------
// Linear layers

/// The row-major `rows x cols` matrix in `data`.
fn rows(data: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef::row_major(data, rows, cols)
}

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
        let y = product(rows(x, n, inp), rows(w, out, inp).t(), Threads::Pool);
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
        let (g, w, x) = (rows(gs.slice(), n, out), rows(ws.slice(), out, inp), rows(xs.slice(), n, inp));
        let dx = product(g, w, Threads::Pool);
        let dw = product(g.t(), x, Threads::Pool);
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
        let y = product(rows(&normed, n, inp), rows(w, out, inp).t(), Threads::Pool);
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
        let g = rows(gs.slice(), n, out);
        let dw = product(g.t(), rows(&normed, n, inp), Threads::Pool);
        drop(normed);
        let dh = product(g, rows(ws.slice(), out, inp), Threads::Pool);
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
        matmul(MatMut::row_major(&mut y, n, out), rows(a, n, inp), rows(w, out, inp).t(), true, Threads::Pool);
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
        let g_ = rows(gs.slice(), n, out);
        let da = product(g_, rows(ws.slice(), out, inp), Threads::Pool);
        let dw = product(g_.t(), rows(as_.slice(), n, inp), Threads::Pool);
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
        matmul(MatMut::row_major(&mut y, n, out), rows(&act, n, i), rows(w, out, i).t(), true, Threads::Pool);
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
        let g_ = rows(gs.slice(), n, out);
        let dw = product(g_.t(), rows(&act, n, i), Threads::Pool);
        drop(act);
        let dact = product(g_, rows(ws.slice(), out, i), Threads::Pool);
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
