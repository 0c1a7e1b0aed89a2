//! LoRA adapters inside the fused blocks, trained through their low-rank products.
//!
//! A projection `y = x W^T` with an adapter (`A [r, in]`, `B [out, r]`, scale `s`) computes
//! `y = x W^T + s (x A^T) B^T` and, from the output gradient `dy`,
//! `dB = s dy^T (x A^T)`, `dA = s (dy B)^T x` and `dx = dy W + s (dy B) A`: every product with an
//! adapter is `r` wide, and the frozen `W` only enters `dy W`. Folding `W + s B A` into an
//! effective weight instead would make the backward pass form the dense `[out, in]` gradient
//! `dy^T x` (as much work as the forward product) only to reduce it to `A` and `B`.

use candle_core::Tensor;

use slime_kernels::{MatMut, MatRef, Threads, matmul, product};

use super::weight_grads::{BlockWeights, GradBuf};

/// A LoRA adapter on a projection of a fused block ([`super::AttentionExtras::lora`],
/// [`super::MlpExtras::lora`]): `y = x W^T + scale (x A^T) B^T` with `a` = `A [r, in]` and
/// `b` = `B [out, r]`. Gradients go to `A` and `B` when they are part of a graph (LoRA's
/// variables); the base weight `W` gets one only when it is too (full fine-tuning).
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// `A [r, in]`.
    pub a: &'a Tensor,
    /// `B [out, r]`.
    pub b: &'a Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

impl LowRank<'_> {
    /// `W + scale B A`, for the composed path of other devices and dtypes (differentiable
    /// w.r.t. `A` and `B`).
    pub(super) fn fold(&self, w: &Tensor) -> crate::Result<Tensor> {
        Ok(w.add(&(self.b.matmul(self.a)? * self.scale)?.to_dtype(w.dtype())?)?)
    }

    /// Each weight of `base` with its adapter in `lora` (same order) folded in, for the
    /// composed path.
    pub(super) fn fold_all(base: &[&Tensor], lora: &[Option<LowRank<'_>>]) -> crate::Result<Vec<Tensor>> {
        base.iter()
            .zip(lora)
            .map(|(w, l)| match l {
                Some(l) => l.fold(w),
                None => Ok((*w).clone()),
            })
            .collect()
    }

    /// Rejects an adapter whose shapes do not fit `w [out, in]`.
    pub(super) fn check(&self, w: &Tensor, what: &str) -> crate::Result<()> {
        let (out, inp) = w.dims2()?;
        let ok = match (self.a.dims(), self.b.dims()) {
            (&[r, i], &[o, r2]) => r > 0 && r == r2 && i == inp && o == out,
            _ => false,
        };
        if !ok {
            return Err(crate::ModelError::Input {
                input: "lora",
                reason: format!(
                    "{what}: A {:?} and B {:?} do not fit a [{out}, {inp}] weight (expected [r, {inp}] and [{out}, r])",
                    self.a.dims(),
                    self.b.dims()
                ),
            });
        }
        Ok(())
    }
}

/// An adapter as a block op reads it: the pieces (packed order) holding `A` and `B`, the rank,
/// the input and output widths and the scale.
#[derive(Debug, Clone, Copy)]
pub(super) struct Adapter {
    pub a: usize,
    pub b: usize,
    pub rank: usize,
    pub inp: usize,
    pub out: usize,
    pub scale: f32,
}

impl Adapter {
    /// The adapter of `lora` on a `[out, in]` weight, its `A` and `B` appended to `weights`.
    pub(super) fn push<'t>(lora: &LowRank<'t>, w: &Tensor, weights: &mut Vec<&'t Tensor>) -> crate::Result<Self> {
        let (out, inp) = w.dims2()?;
        let rank = lora.a.dim(0)?;
        weights.extend([lora.a, lora.b]);
        let n = weights.len();
        Ok(Self { a: n - 2, b: n - 1, rank, inp, out, scale: lora.scale as f32 })
    }

    /// `A [r, in]`.
    fn a<'w>(&self, w: &'w BlockWeights) -> MatRef<'w> {
        MatRef::row_major(w.get(self.a), self.rank, self.inp)
    }

    /// `B [out, r]`.
    fn b<'w>(&self, w: &'w BlockWeights) -> MatRef<'w> {
        MatRef::row_major(w.get(self.b), self.out, self.rank)
    }

    /// `u = scale x A^T`, `[n, r]`, for the rows `x` (`[n, in]`).
    pub(super) fn down(&self, x: MatRef<'_>, w: &BlockWeights) -> Vec<f32> {
        let mut u = product(x, self.a(w).t(), Threads::Pool);
        scale(&mut u, self.scale);
        u
    }

    /// `y += scale (x A^T) B^T` for the rows `x`; `y` is `[n, out]`. Returns `u = scale x A^T`.
    pub(super) fn forward(&self, x: MatRef<'_>, w: &BlockWeights, y: MatMut<'_>) -> Vec<f32> {
        let u = self.down(x, w);
        matmul(y, MatRef::row_major(&u, x.rows(), self.rank), self.b(w).t(), true, Threads::Pool);
        u
    }

    /// `g = scale dy B`, `[n, r]`, from the output gradient `dy` (`[n, out]`): the adapter's
    /// part of the input gradient is `g A` ([`Self::add_dx`]).
    pub(super) fn grad_r(&self, dy: MatRef<'_>, w: &BlockWeights) -> Vec<f32> {
        let mut g = product(dy, self.b(w), Threads::Pool);
        scale(&mut g, self.scale);
        g
    }

    /// Adds (`accumulate`, else writes) `dB = dy^T u` and `dA = g^T x` of `n` rows into `grads`
    /// (each when it trains), from the output gradient `dy` (`[n, out]`), the input rows `x`
    /// (`[n, in]`), `u = scale x A^T` ([`Self::down`]) and `g = scale dy B` ([`Self::grad_r`]),
    /// both `[n, r]` at row stride `r` (longer slices: their first `n` rows).
    pub(super) fn weight_grads(
        &self,
        dy: MatRef<'_>,
        x: MatRef<'_>,
        (u, g): (&[f32], &[f32]),
        grads: &mut GradBuf,
        accumulate: bool,
    ) {
        let (n, r) = (dy.rows(), self.rank);
        grads.product(self.b..self.b + 1, accumulate, dy.t(), MatRef::row_major(u, n, r));
        grads.product(self.a..self.a + 1, accumulate, MatRef::row_major(g, n, r).t(), x);
    }

    /// `dx += g A` for the `dx.rows()` rows of `g` (`[n, r]`); `dx` is `[n, in]`.
    pub(super) fn add_dx(&self, g: &[f32], w: &BlockWeights, dx: MatMut<'_>) {
        let g = MatRef::row_major(g, dx.rows(), self.rank);
        matmul(dx, g, self.a(w), true, Threads::Pool);
    }
}

fn scale(v: &mut [f32], s: f32) {
    v.iter_mut().for_each(|x| *x *= s);
}
