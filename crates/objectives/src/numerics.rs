//! Numerically stable scalar functions and a way to apply them to tensors with exact gradients.
//!
//! candle has no `softplus`, `log_sigmoid` or `log1p`, and composing them from `relu`, `abs`
//! and `minimum` inherits candle's subgradient conventions at 0 (`relu'(0) = 1`,
//! `abs'(0) = 1`, `minimum'(0) = 0.5`): the textbook `min(x, 0) - log(1 + exp(-|x|))` then has
//! gradient 1.0 instead of 0.5 at x = 0, exactly where DPO starts (policy == reference).
//! [`map_with_grad`] instead evaluates value and derivative of a scalar function in f64 and
//! attaches the derivative to the graph, so every function here is exact at every point.

use candle_core::{DType, Tensor};

use crate::Result;

/// `log(1 + e^x)`, stable for all finite x (no overflow for x = 1e4, no loss for x = -1e4).
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Logistic sigmoid `1 / (1 + e^-x)`, stable for all finite x.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log sigmoid(x) = -softplus(-x)`.
pub fn log_sigmoid(x: f64) -> f64 {
    -softplus(-x)
}

/// Largest argument accepted by [`log1mexp`]: `log(1 - e^a)` is `-inf` at a = 0, so a is
/// clamped to at most `-1e-7` (a sequence whose mean token probability rounds to 1).
pub const LOG1MEXP_MAX_ARG: f64 = -1e-7;

/// `log(1 - e^a)` for a < 0 (Mächler 2012): `log(-expm1(a))` near 0, `log1p(-e^a)` below -ln 2.
/// Arguments above [`LOG1MEXP_MAX_ARG`] are clamped to it, so the result is always finite.
pub fn log1mexp(a: f64) -> f64 {
    let a = a.min(LOG1MEXP_MAX_ARG);
    if a > -std::f64::consts::LN_2 {
        (-a.exp_m1()).ln()
    } else {
        (-a.exp()).ln_1p()
    }
}

/// Derivative of [`log1mexp`]: `-e^a / (1 - e^a) = -1 / expm1(-a)` (0 where the argument is clamped).
pub fn log1mexp_grad(a: f64) -> f64 {
    if a > LOG1MEXP_MAX_ARG {
        0.0
    } else {
        -1.0 / (-a).exp_m1()
    }
}

/// The dtype losses are computed in: f64 stays f64 (for gradient checks), everything else is f32.
pub fn working_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 { DType::F64 } else { DType::F32 }
}

/// Applies a scalar function elementwise, returning `y` with `y = f(x)` in value and
/// `dy/dx = f'(x)` in the backward pass.
///
/// `f` returns `(value, derivative)` evaluated in f64. The derivative is attached as
/// `y = value + f'(x) * (x - detach(x))`: the second term is exactly zero in value and has
/// gradient `f'(x)`. Works on any device (values round-trip through the host, which is cheap
/// for the per-sequence and per-token vectors losses see).
pub fn map_with_grad(x: &Tensor, f: impl Fn(f64) -> (f64, f64)) -> Result<Tensor> {
    let dtype = working_dtype(x.dtype());
    let x = x.to_dtype(dtype)?;
    let xs: Vec<f64> = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    let mut values = Vec::with_capacity(xs.len());
    let mut derivs = Vec::with_capacity(xs.len());
    for &v in &xs {
        let (y, dy) = f(v);
        values.push(y);
        derivs.push(dy);
    }
    let to_tensor = |v: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(dtype)?)
    };
    let value = to_tensor(values)?;
    if !x.track_op() {
        return Ok(value);
    }
    let derivative = to_tensor(derivs)?;
    let zero_with_identity_grad = (&x - x.detach())?;
    Ok((value + derivative.mul(&zero_with_identity_grad)?)?)
}

/// Elementwise `softplus(x)` with gradient `sigmoid(x)`.
pub fn softplus_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, |v| (softplus(v), sigmoid(v)))
}

/// Elementwise `log sigmoid(x)` with gradient `sigmoid(-x)`.
pub fn log_sigmoid_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, |v| (log_sigmoid(v), sigmoid(-v)))
}

/// Elementwise `sigmoid(x)` with gradient `sigmoid(x) * sigmoid(-x)`.
pub fn sigmoid_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, |v| {
        let s = sigmoid(v);
        (s, s * sigmoid(-v))
    })
}

/// Elementwise `max(x, 0)` with gradient 1 for x > 0 and 0 otherwise (so a hinge that is
/// exactly satisfied contributes no gradient).
pub fn relu_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, |v| if v > 0.0 { (v, 1.0) } else { (0.0, 0.0) })
}

/// Elementwise [`log1mexp`] with its exact gradient.
pub fn log1mexp_t(x: &Tensor) -> Result<Tensor> {
    map_with_grad(x, |v| (log1mexp(v), log1mexp_grad(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_is_exact_and_finite_at_extremes() {
        // softplus(0) = ln 2; softplus(1e4) = 1e4 (+ e^-1e4, below f64 resolution); softplus(-1e4) = e^-1e4 = 0 in f64.
        assert_eq!(softplus(0.0), std::f64::consts::LN_2);
        assert_eq!(softplus(1e4), 1e4);
        assert_eq!(softplus(-1e4), 0.0);
        // softplus(-30) = ln(1 + e^-30) ~ e^-30 = 9.357622968840175e-14 (relative error ~e^-30).
        assert!((softplus(-30.0) / 9.357_622_968_840_175e-14 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn log_sigmoid_matches_definition() {
        // log sigmoid(2) = -ln(1 + e^-2) = -0.12692801104297263
        assert!((log_sigmoid(2.0) + 0.126_928_011_042_972_63).abs() < 1e-15);
        assert_eq!(log_sigmoid(-1e4), -1e4);
        assert!(log_sigmoid(1e4) <= 0.0 && log_sigmoid(1e4) > -1e-300);
    }

    #[test]
    fn log1mexp_both_branches() {
        // log(1 - e^-0.1) = log(0.09516258196404048) = -2.3521684610440903
        assert!((log1mexp(-0.1) + 2.352_168_461_044_090_3).abs() < 1e-13);
        // log(1 - e^-5) = log1p(-0.006737946999085467) = -0.006760749449488557
        assert!((log1mexp(-5.0) + 0.006_760_749_449_488_557).abs() < 1e-15);
        assert!(log1mexp(0.0).is_finite());
        assert!(log1mexp(-1e4) == 0.0 || log1mexp(-1e4).abs() < 1e-300);
        // d/da log(1 - e^a) at a = -1: -e^-1 / (1 - e^-1) = -0.5819767068693265
        assert!((log1mexp_grad(-1.0) + 0.581_976_706_869_326_5).abs() < 1e-14);
    }

    #[test]
    fn map_with_grad_attaches_exact_derivative_at_zero() -> Result<()> {
        let x = candle_core::Var::new(&[0.0f64, 3.0], &candle_core::Device::Cpu)?;
        let y = log_sigmoid_t(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        let g: Vec<f64> = grads.get(x.as_tensor()).expect("grad").to_vec1()?;
        assert_eq!(g[0], 0.5);
        assert!((g[1] - sigmoid(-3.0)).abs() < 1e-16);
        let v: Vec<f64> = y.to_vec1()?;
        assert_eq!(v[0], -std::f64::consts::LN_2);
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
