//! Numerically stable scalar functions and a way to apply them to tensors with exact gradients.
//!
//! candle has no `softplus`, `log_sigmoid` or `log1p`, and composing them from `relu`, `abs`
//! and `minimum` inherits candle's subgradient conventions at 0 (`relu'(0) = 1`,
//! `abs'(0) = 1`, `minimum'(0) = 0.5`): the textbook `min(x, 0) - log(1 + exp(-|x|))` then has
//! gradient 1.0 instead of 0.5 at x = 0, exactly where DPO starts (policy == reference).
//! [`map_with_grad`] instead evaluates value and derivative of a scalar function in f64 and
//! attaches the derivative to the graph, so every function here is exact at every point.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::Result;

/// `log(1 + e^x)`, stable for all finite x (no overflow for x = 1e4, no loss for x = -1e4).
pub fn softplus<T: Float>(x: T) -> T {
    x.max(T::zero()) + log1p((-x.abs()).exp())
}

/// `log(1 + x)` to a few ulps via `x * ln(u) / (u - 1)` with `u = 1 + x` (Goldberg 1991): the
/// rounding of `u` cancels between numerator and denominator. One `ln`, ~3x faster than glibc's
/// `log1pf`, which dominated the per-token stabiliser.
pub fn log1p<T: Float>(x: T) -> T {
    let u = T::one() + x;
    if u == T::one() { x } else { x * u.ln() / (u - T::one()) }
}

/// Logistic sigmoid `1 / (1 + e^-x)`, stable for all finite x.
pub fn sigmoid<T: Float>(x: T) -> T {
    let e = (-x.abs()).exp();
    if x >= T::zero() { T::one() / (T::one() + e) } else { e / (T::one() + e) }
}

/// `log sigmoid(x) = -softplus(-x)`.
pub fn log_sigmoid<T: Float>(x: T) -> T {
    -softplus(-x)
}

/// Largest argument accepted by [`log1mexp`]: `log(1 - e^a)` is `-inf` at a = 0, so a is
/// clamped to at most `-1e-7` (a sequence whose mean token probability rounds to 1).
pub const LOG1MEXP_MAX_ARG: f64 = -1e-7;

/// `log(1 - e^a)` for a < 0 (Mächler 2012): `log(-expm1(a))` near 0, `log1p(-e^a)` below -ln 2.
/// Arguments above [`LOG1MEXP_MAX_ARG`] are clamped to it, so the result is always finite.
pub fn log1mexp<T: Float>(a: T) -> T {
    let a = a.min(constant(LOG1MEXP_MAX_ARG));
    if a > constant(-std::f64::consts::LN_2) { (-a.exp_m1()).ln() } else { (-a.exp()).ln_1p() }
}

/// Derivative of [`log1mexp`]: `-e^a / (1 - e^a) = -1 / expm1(-a)` (0 where the argument is clamped).
pub fn log1mexp_grad<T: Float>(a: T) -> T {
    if a > constant(LOG1MEXP_MAX_ARG) { T::zero() } else { -T::one() / (-a).exp_m1() }
}

/// An f64 constant in the float type `T`.
pub fn constant<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::nan)
}

/// A scalar function with its derivative, evaluable in f32 (the working precision of f32,
/// bf16 and f16 inputs) and f64 (for f64 inputs, e.g. gradient checks).
pub trait ScalarFn: Sync {
    /// `(f(x), f'(x))`.
    fn eval<T: Float>(&self, x: T) -> (T, T);
}

/// `softplus(x)`, derivative `sigmoid(x)`.
pub struct Softplus;
impl ScalarFn for Softplus {
    fn eval<T: Float>(&self, x: T) -> (T, T) {
        (softplus(x), sigmoid(x))
    }
}

/// `log sigmoid(x)`, derivative `sigmoid(-x)`.
pub struct LogSigmoid;
impl ScalarFn for LogSigmoid {
    fn eval<T: Float>(&self, x: T) -> (T, T) {
        (log_sigmoid(x), sigmoid(-x))
    }
}

/// `sigmoid(x)`, derivative `sigmoid(x) sigmoid(-x)`.
pub struct Sigmoid;
impl ScalarFn for Sigmoid {
    fn eval<T: Float>(&self, x: T) -> (T, T) {
        let s = sigmoid(x);
        (s, s * sigmoid(-x))
    }
}

/// `max(x, 0)`, derivative 1 for x > 0 and 0 otherwise (an exactly satisfied hinge has no gradient).
pub struct Relu;
impl ScalarFn for Relu {
    fn eval<T: Float>(&self, x: T) -> (T, T) {
        if x > T::zero() { (x, T::one()) } else { (T::zero(), T::zero()) }
    }
}

/// [`log1mexp`] with its exact derivative.
pub struct Log1mexp;
impl ScalarFn for Log1mexp {
    fn eval<T: Float>(&self, x: T) -> (T, T) {
        (log1mexp(x), log1mexp_grad(x))
    }
}

/// The dtype losses are computed in: f64 stays f64 (for gradient checks), everything else is f32.
pub fn working_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 { DType::F64 } else { DType::F32 }
}

/// Applies a scalar function elementwise, returning `y` with `y = f(x)` in value and
/// `dy/dx = f'(x)` in the backward pass.
///
/// `f` returns `(value, derivative)`, evaluated in the working dtype (f32, or f64). The
/// elementwise loop runs on the host, in parallel for large inputs. On the CPU the derivative is
/// attached by a custom op whose backward is one multiply; on other devices as
/// `value + f'(x) * (x - detach(x))`, whose second term is exactly zero with gradient `f'(x)`.
pub fn map_with_grad(x: &Tensor, f: &impl ScalarFn) -> Result<Tensor> {
    let dtype = working_dtype(x.dtype());
    let x = x.to_dtype(dtype)?;
    let flat = x.flatten_all()?;
    let (values, derivs) = match dtype {
        DType::F64 => {
            let (v, d) = eval_host(&flat.to_vec1::<f64>()?, f);
            (CpuStorage::F64(v), CpuStorage::F64(d))
        }
        _ => {
            let (v, d) = eval_host(&flat.to_vec1::<f32>()?, f);
            (CpuStorage::F32(v), CpuStorage::F32(d))
        }
    };
    let to_tensor = |s: CpuStorage| -> Result<Tensor> {
        let t = match s {
            CpuStorage::F64(v) => Tensor::from_vec(v, x.shape(), x.device())?,
            CpuStorage::F32(v) => Tensor::from_vec(v, x.shape(), x.device())?,
            _ => unreachable!("working dtype is f32 or f64"),
        };
        Ok(t)
    };
    if !x.track_op() {
        return to_tensor(values);
    }
    let derivative = to_tensor(derivs)?;
    if x.device().is_cpu() && cpu_custom_op_enabled() {
        return Ok(x.apply_op1(AttachDerivative { values, derivative })?);
    }
    let zero_with_identity_grad = (&x - x.detach())?;
    Ok((to_tensor(values)? + derivative.mul(&zero_with_identity_grad)?)?)
}

static CPU_CUSTOM_OP: AtomicBool = AtomicBool::new(true);

/// Switches [`map_with_grad`]'s CPU custom op on (the default) or off for the whole process.
/// Off, CPU tensors take the surrogate every other device takes: the same values and
/// gradients, through ordinary candle ops.
pub fn set_cpu_custom_op(enabled: bool) {
    CPU_CUSTOM_OP.store(enabled, Ordering::Relaxed);
}

/// Whether [`map_with_grad`] attaches derivatives with its CPU custom op (see [`set_cpu_custom_op`]).
pub fn cpu_custom_op_enabled() -> bool {
    CPU_CUSTOM_OP.load(Ordering::Relaxed)
}

/// Host values and derivatives, written in place; parallel above 16k elements (the
/// per-token stabiliser).
fn eval_host<T: Float + Send + Sync>(xs: &[T], f: &impl ScalarFn) -> (Vec<T>, Vec<T>) {
    const CHUNK: usize = 16 * 1024;
    let mut values = vec![T::zero(); xs.len()];
    let mut derivs = vec![T::zero(); xs.len()];
    let run = |((x, v), d): ((&[T], &mut [T]), &mut [T])| {
        for ((&x, v), d) in x.iter().zip(v.iter_mut()).zip(d.iter_mut()) {
            (*v, *d) = f.eval(x);
        }
    };
    if xs.len() <= CHUNK {
        run(((xs, &mut values[..]), &mut derivs[..]));
    } else {
        xs.par_chunks(CHUNK).zip(values.par_chunks_mut(CHUNK)).zip(derivs.par_chunks_mut(CHUNK)).for_each(run);
    }
    (values, derivs)
}

/// Custom op whose forward returns precomputed values and whose backward multiplies the
/// incoming gradient by precomputed derivatives.
struct AttachDerivative {
    values: CpuStorage,
    derivative: Tensor,
}

impl CustomOp1 for AttachDerivative {
    fn name(&self) -> &'static str {
        "attach-derivative"
    }

    fn cpu_fwd(&self, _storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((self.values.clone(), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.mul(&self.derivative)?))
    }
}

#[cfg(test)]
pub(crate) fn map_with_grad_surrogate(x: &Tensor, f: &impl ScalarFn) -> Result<Tensor> {
    // The non-CPU path, exercised on the CPU for tests.
    let (values, derivs): (Vec<f64>, Vec<f64>) = eval_host(&x.flatten_all()?.to_vec1::<f64>()?, f);
    let value = Tensor::from_vec(values, x.shape(), x.device())?;
    let derivative = Tensor::from_vec(derivs, x.shape(), x.device())?;
    Ok((value + derivative.mul(&(x - x.detach())?)?)?)
}

/// Elementwise `softplus(x)` with gradient `sigmoid(x)`.
pub fn softplus_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, &Softplus)
}

/// Elementwise `log sigmoid(x)` with gradient `sigmoid(-x)`.
pub fn log_sigmoid_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, &LogSigmoid)
}

/// Elementwise `sigmoid(x)` with gradient `sigmoid(x) * sigmoid(-x)`.
pub fn sigmoid_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, &Sigmoid)
}

/// Elementwise `max(x, 0)` with gradient 1 for x > 0 and 0 otherwise.
pub fn relu_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, &Relu)
}

/// The label-smoothed logistic loss `-(1 - eps) logsig(z) - eps logsig(-z)` (DPO's cDPO, SimPO),
/// elementwise; `eps = 0` is plain `-logsig(z)`.
pub fn smoothed_logistic_loss(z: &Tensor, eps: f64) -> Result<Tensor> {
    let pos = log_sigmoid_t(z)?.affine(-(1.0 - eps), 0.0)?;
    if eps == 0.0 { Ok(pos) } else { Ok((pos - log_sigmoid_t(&z.neg()?)?.affine(eps, 0.0)?)?) }
}

/// Elementwise [`log1mexp`] with its exact gradient.
pub fn log1mexp_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, &Log1mexp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_is_exact_and_finite_at_extremes() {
        // softplus(0) = ln 2; softplus(1e4) = 1e4 (+ e^-1e4, below f64 resolution); softplus(-1e4) = e^-1e4 = 0 in f64.
        assert_eq!(softplus(0.0f64), std::f64::consts::LN_2);
        assert_eq!(softplus(1e4f64), 1e4);
        assert_eq!(softplus(1e4f32), 1e4);
        assert_eq!(softplus(-1e4f64), 0.0);
        // softplus(-30) = ln(1 + e^-30) ~ e^-30 = 9.357622968840175e-14 (relative error ~e^-30).
        assert!((softplus(-30.0f64) / 9.357_622_968_840_175e-14 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn fast_log1p_is_accurate() {
        for x in [1e-30f64, 1e-12, 1e-7, 3e-4, 0.1, 0.5, 1.0] {
            assert!((log1p(x) / x.ln_1p() - 1.0).abs() < 1e-15, "f64 {x}");
            let xf = x as f32;
            assert!((log1p(xf) / xf.ln_1p() - 1.0).abs() < 4.0 * f32::EPSILON, "f32 {x}");
        }
    }

    #[test]
    fn log_sigmoid_matches_definition() {
        // log sigmoid(2) = -ln(1 + e^-2) = -0.12692801104297263
        assert!((log_sigmoid(2.0f64) + 0.126_928_011_042_972_63).abs() < 1e-15);
        assert_eq!(log_sigmoid(-1e4f64), -1e4);
        assert!(log_sigmoid(1e4f64) <= 0.0 && log_sigmoid(1e4f64) > -1e-300);
    }

    #[test]
    fn log1mexp_both_branches() {
        // log(1 - e^-0.1) = log(0.09516258196404048) = -2.3521684610440903
        assert!((log1mexp(-0.1f64) + 2.352_168_461_044_090_3).abs() < 1e-13);
        // log(1 - e^-5) = log1p(-0.006737946999085467) = -0.006760749449488557
        assert!((log1mexp(-5.0f64) + 0.006_760_749_449_488_557).abs() < 1e-15);
        assert!(log1mexp(0.0f64).is_finite() && log1mexp(0.0f32).is_finite());
        assert!(log1mexp(-1e4f64).abs() < 1e-300);
        // d/da log(1 - e^a) at a = -1: -e^-1 / (1 - e^-1) = -0.5819767068693265
        assert!((log1mexp_grad(-1.0f64) + 0.581_976_706_869_326_5).abs() < 1e-14);
    }

    #[test]
    fn map_with_grad_attaches_exact_derivative_at_zero() -> Result<()> {
        let x = candle_core::Var::new(&[0.0f64, 3.0], &candle_core::Device::Cpu)?;
        let y = log_sigmoid_t(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        let g: Vec<f64> = grads.get(x.as_tensor()).expect("grad").to_vec1()?;
        assert_eq!(g[0], 0.5);
        assert!((g[1] - sigmoid(-3.0f64)).abs() < 1e-16);
        let v: Vec<f64> = y.to_vec1()?;
        assert_eq!(v[0], -std::f64::consts::LN_2);
        Ok(())
    }

    #[test]
    fn custom_op_and_surrogate_paths_agree() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let data: Vec<f64> = (0..40_000).map(|i| -((i % 997) as f64) * 0.013).collect();
        let x = candle_core::Var::from_tensor(&Tensor::from_vec(data, (200, 200), &dev)?)?;
        let weights = Tensor::arange(0f64, 40_000.0, &dev)?.reshape((200, 200))?.affine(1e-4, 0.5)?;
        let fast = map_with_grad(x.as_tensor(), &Softplus)?;
        let slow = map_with_grad_surrogate(x.as_tensor(), &Softplus)?;
        assert_eq!(fast.to_vec2::<f64>()?, slow.to_vec2::<f64>()?);
        let gf = (fast * &weights)?.sum_all()?.backward()?;
        let gs = (slow * &weights)?.sum_all()?.backward()?;
        let pick = |g: &candle_core::backprop::GradStore| -> Result<Vec<Vec<f64>>> {
            Ok(g.get(x.as_tensor()).expect("grad").to_vec2()?)
        };
        assert_eq!(pick(&gf)?, pick(&gs)?);
        Ok(())
    }

    #[test]
    fn untracked_input_gives_untracked_output() -> Result<()> {
        let x = Tensor::new(&[0.5f32], &candle_core::Device::Cpu)?;
        let y = softplus_t(&x)?;
        assert!(!y.track_op());
        assert_eq!(y.dtype(), DType::F32);
        Ok(())
    }
}
