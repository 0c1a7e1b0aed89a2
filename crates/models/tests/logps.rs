//! The fused lm_head + soft-cap + log-softmax + gather op: values and gradients (w.r.t. the hidden
//! states and the lm_head) equal the plain composition, with and without soft-capping, for block
//! sizes that do and do not divide the rows; frozen inputs get no gradient.

use candle_core::{D, DType, Device, Tensor, Var};
use slime_models::Result;
use slime_models::logps::{chunked_token_logps_capped, lm_head_logps};

mod common;
use common::randn;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn composed(h: &Tensor, w: &Tensor, labels: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    let mut logits = h.matmul(&w.t()?)?;
    if let Some(c) = cap {
        logits = ((logits / c)?.tanh()? * c)?;
    }
    let lp = slime_models::ops::log_softmax(&logits)?;
    Ok(lp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?)
}

#[test]
fn fused_lm_head_logps_matches_composition_values_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let (n, hd, v) = (11, 16, 37);
    let h = Var::from_tensor(&randn(1, 0.0, 1.0, (n, hd)))?;
    let w = Var::from_tensor(&randn(2, 0.0, 0.5, (v, hd)))?;
    let labels = Tensor::from_vec((0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect::<Vec<_>>(), n, &dev)?;
    // A per-row weight so the gradient is not symmetric in the rows.
    let g = Tensor::from_vec((0..n).map(|i| 0.5 + i as f32 / 7.0).collect::<Vec<_>>(), n, &dev)?;
    for cap in [None, Some(2.0)] {
        let want = composed(h.as_tensor(), w.as_tensor(), &labels, cap)?;
        let want_grads = (&want * &g)?.sum_all()?.backward()?;
        for rows in [1, 4, 11, 64] {
            let have = lm_head_logps(h.as_tensor(), w.as_tensor(), &labels, cap, rows)?;
            assert!(max_abs_diff(&have, &want)? < 1e-5, "cap {cap:?} rows {rows}: values");
            let grads = (&have * &g)?.sum_all()?.backward()?;
            for (name, var) in [("hidden", &h), ("lm_head", &w)] {
                let (a, b) = (grads.get(var.as_tensor()), want_grads.get(var.as_tensor()));
                let (Some(a), Some(b)) = (a, b) else { panic!("cap {cap:?} rows {rows}: no gradient for {name}") };
                let diff = max_abs_diff(a, b)?;
                let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(
                    scale > 1e-2 && diff < 1e-5,
                    "cap {cap:?} rows {rows}: d{name} differs by {diff} (scale {scale})"
                );
            }
        }
    }
    // A frozen lm_head (LoRA) gets no gradient; the hidden states still do.
    let frozen = w.as_tensor().detach();
    let grads = lm_head_logps(h.as_tensor(), &frozen, &labels, None, 4)?.sum_all()?.backward()?;
    assert!(grads.get(&frozen).is_none() && grads.get(h.as_tensor()).is_some());
    Ok(())
}

/// Logits small enough to fit one block are kept from the forward pass; a second backward pass
/// over the same graph finds them taken and recomputes them: the same gradients, bit for bit.
#[test]
fn kept_and_recomputed_logits_give_the_same_gradient_bits() -> Result<()> {
    let dev = Device::Cpu;
    let (n, hd, v) = (9, 16, 29);
    let h = Var::from_tensor(&randn(5, 0.0, 1.0, (n, hd)))?;
    let w = Var::from_tensor(&randn(6, 0.0, 0.5, (v, hd)))?;
    let labels = Tensor::from_vec((0..n as u32).map(|i| (i * 5 + 2) % v as u32).collect::<Vec<_>>(), n, &dev)?;
    for cap in [None, Some(2.0)] {
        let loss = lm_head_logps(h.as_tensor(), w.as_tensor(), &labels, cap, n)?.sum_all()?;
        let (kept, recomputed) = (loss.backward()?, loss.backward()?);
        for var in [&h, &w] {
            let bits = |g: &candle_core::backprop::GradStore| -> Result<Vec<u32>> {
                let g = g.get(var.as_tensor()).expect("a gradient");
                Ok(g.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
            };
            assert_eq!(bits(&kept)?, bits(&recomputed)?, "cap {cap:?}");
        }
    }
    Ok(())
}

#[test]
fn chunked_logps_with_softcap_equal_full_logits() -> Result<()> {
    let dev = Device::Cpu;
    let (b, s, hd, v) = (2, 9, 8, 23);
    let hidden = randn(3, 0.0, 1.0, (b, s, hd));
    let w = randn(4, 0.0, 1.0, (v, hd));
    let ids = Tensor::from_vec((0..(b * s) as u32).map(|i| (i * 5 + 1) % v as u32).collect::<Vec<_>>(), (b, s), &dev)?;
    let logits = ((hidden.broadcast_matmul(&w.t()?)? / 3.0)?.tanh()? * 3.0)?;
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let want = lp
        .narrow(1, 0, s - 1)?
        .contiguous()?
        .gather(&ids.narrow(1, 1, s - 1)?.contiguous()?.unsqueeze(2)?, 2)?
        .squeeze(2)?;
    for chunk in [1, 3, 100] {
        let have = chunked_token_logps_capped(&hidden, &w, &ids, chunk, Some(3.0))?;
        assert_eq!(have.narrow(1, 0, 1)?.flatten_all()?.to_vec1::<f32>()?, vec![0.0; b]);
        assert!(max_abs_diff(&have.narrow(1, 1, s - 1)?, &want)? < 1e-5, "chunk {chunk}");
    }
    // Off the fused path (f64) the composition gives the same numbers.
    let have64 =
        chunked_token_logps_capped(&hidden.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?, &ids, 4, Some(3.0))?;
    assert!(max_abs_diff(&have64.narrow(1, 1, s - 1)?, &want)? < 1e-5);
    Ok(())
}
