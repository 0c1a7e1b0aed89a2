//! The fused kernels equal the straightforward differentiable compositions: values and
//! gradients within 1e-5.

use candle_core::{D, DType, Device, Tensor, Var};
use slime_models::{Result, fused, ops};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn fused_rms_norm_matches_composition_values_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&(Tensor::randn(0f32, 1.5, (3, 5, 16), &dev)? + 0.3)?)?;
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 16, &dev)?)?;
    // A non-uniform upstream gradient so every term of the backward formula matters.
    let coef = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev)?;
    let run = |fused_op: bool| -> Result<(Tensor, Tensor, Tensor)> {
        let y = if fused_op { fused::rms_norm(&x, &w, 1e-6)? } else { ops::rms_norm_composed(&x, &w, 1e-6)? };
        let grads = (&y * &coef)?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("gradient for x").clone();
        let gw = grads.get(w.as_tensor()).expect("gradient for weight").clone();
        Ok((y, gx, gw))
    };
    let (y1, gx1, gw1) = run(true)?;
    let (y0, gx0, gw0) = run(false)?;
    assert!(max_abs_diff(&y1, &y0)? < 1e-5, "values differ by {}", max_abs_diff(&y1, &y0)?);
    assert!(max_abs_diff(&gx1, &gx0)? < 1e-5, "dx differs by {}", max_abs_diff(&gx1, &gx0)?);
    assert!(max_abs_diff(&gw1, &gw0)? < 1e-5, "dw differs by {}", max_abs_diff(&gw1, &gw0)?);
    assert!(gx0.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    // Non-contiguous input (a transposed view) gives the same result as its contiguous copy.
    let xt = x.as_tensor().transpose(0, 1)?;
    let a = fused::rms_norm(&xt, &w, 1e-6)?;
    let b = ops::rms_norm_composed(&xt.contiguous()?, &w, 1e-6)?;
    assert!(max_abs_diff(&a, &b)? < 1e-5);
    Ok(())
}

#[test]
fn fused_log_softmax_gather_matches_composition_values_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let (n, v) = (7, 33);
    let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (n, v), &dev)?)?;
    let labels = Tensor::new(&[0u32, 32, 5, 5, 17, 1, 30], &dev)?;
    let coef = Tensor::randn(0f32, 1.0, n, &dev)?;
    let fused_out = fused::log_softmax_gather(&x, &labels)?;
    let composed =
        candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)?.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    assert_eq!(fused_out.dims(), [n]);
    assert!(max_abs_diff(&fused_out, &composed)? < 1e-5);
    let g1 = (&fused_out * &coef)?.sum_all()?.backward()?;
    let g1 = g1.get(x.as_tensor()).expect("gradient for logits").clone();
    let reference = ops::log_softmax(x.as_tensor())?.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    let g0 = (&reference * &coef)?.sum_all()?.backward()?;
    let g0 = g0.get(x.as_tensor()).expect("gradient for logits").clone();
    assert!(max_abs_diff(&g1, &g0)? < 1e-5, "gradients differ by {}", max_abs_diff(&g1, &g0)?);
    // Rows of the gradient sum to 0 (softmax) and the label entry carries +coef.
    let row_sums = g1.sum(1)?.abs()?.max(0)?.to_scalar::<f32>()?;
    assert!(row_sums < 1e-5);
    // An out-of-range label is an error, not a silent read.
    assert!(fused::log_softmax_gather(x.as_tensor(), &Tensor::new(&[40u32, 0, 0, 0, 0, 0, 0], &dev)?).is_err());
    // u8 labels and f64 logits go through the composed fallback with the same values.
    let x64 = x.as_tensor().to_dtype(DType::F64)?;
    let fallback = fused::log_softmax_gather(&x64, &labels.to_dtype(DType::U8)?)?.to_dtype(DType::F32)?;
    assert!(max_abs_diff(&fallback, &fused_out)? < 1e-5);
    Ok(())
}
