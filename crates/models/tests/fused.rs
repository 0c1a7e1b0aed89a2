//! The fused kernels equal the straightforward differentiable compositions: values and
//! gradients within 1e-5.

use candle_core::{D, DType, Device, Tensor, Var};
use slime_models::fused::Activations;
use slime_models::{Result, fused, ops};

mod common;
use common::randn;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(a.sub(b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn fused_rms_norm_matches_composition_values_and_gradients() -> Result<()> {
    let x = Var::from_tensor(&(randn(1, 0.0, 1.5, (3, 5, 16)) + 0.3)?)?;
    let w = Var::from_tensor(&randn(2, 1.0, 0.5, 16))?;
    // A non-uniform upstream gradient so every term of the backward formula matters.
    let coef = randn(3, 0.0, 1.0, (3, 5, 16));
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
    let x = Var::from_tensor(&randn(11, 0.0, 3.0, (n, v)))?;
    let labels = Tensor::new(&[0u32, 32, 5, 5, 17, 1, 30], &dev)?;
    let coef = randn(12, 0.0, 1.0, n);
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

/// Values and the gradients of `sum(y * coef)` (`coef` drawn with `coef_seed`) w.r.t. `vars`, for
/// `f` run on the fused path and on the reference composition; asserts they agree within `tol`
/// (gradients: within `tol` times their largest magnitude when that exceeds 1, since f32 rounding
/// scales with the values; the 150-token attention's gradients reach ~10).
fn check_grads(
    what: &str,
    vars: &[&Var],
    fused_f: impl Fn() -> Result<Tensor>,
    reference_f: impl Fn() -> Result<Tensor>,
    tol: f32,
    coef_seed: u64,
) -> Result<()> {
    let y1 = fused_f()?;
    let y0 = reference_f()?;
    assert_eq!(y1.dims(), y0.dims(), "{what}: shapes");
    let d = max_abs_diff(&y1, &y0)?;
    assert!(d < tol, "{what}: values differ by {d}");
    let coef = randn(coef_seed, 0.0, 1.0, y1.shape());
    let g1 = (&y1 * &coef)?.sum_all()?.backward()?;
    let g0 = (&y0 * &coef)?.sum_all()?.backward()?;
    for (i, v) in vars.iter().enumerate() {
        let a = g1.get(v.as_tensor()).expect("fused gradient");
        let b = g0.get(v.as_tensor()).expect("reference gradient");
        let d = max_abs_diff(a, b)?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < tol * scale.max(1.0), "{what}: gradient of input {i} differs by {d} (largest magnitude {scale})");
        assert!(b.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{what}: gradient of input {i} is zero");
    }
    Ok(())
}

#[test]
fn fused_linears_match_composition_values_and_gradients() -> Result<()> {
    let x = Var::from_tensor(&randn(21, 0.0, 1.0, (2, 9, 24)))?;
    let w = Var::from_tensor(&randn(22, 0.0, 0.2, (40, 24)))?;
    let nw = Var::from_tensor(&randn(23, 1.0, 0.3, 24))?;
    let (xt, wt, nwt) = (x.as_tensor(), w.as_tensor(), nw.as_tensor());
    check_grads("linear", &[&x, &w], || fused::linear(xt, wt), || Ok(xt.broadcast_matmul(&wt.t()?)?), 1e-5, 201)?;
    check_grads(
        "norm_linear",
        &[&x, &nw, &w],
        || fused::norm_linear(xt, nwt, wt, 1e-6),
        || Ok(ops::rms_norm_composed(xt, nwt, 1e-6)?.broadcast_matmul(&wt.t()?)?),
        1e-5,
        202,
    )?;
    // Residual forms on a [rows, features] stream.
    let r = Var::from_tensor(&randn(24, 0.0, 1.0, (18, 40)))?;
    let a = Var::from_tensor(&randn(25, 0.0, 1.0, (18, 24)))?;
    let (rt, at) = (r.as_tensor(), a.as_tensor());
    check_grads(
        "linear_residual",
        &[&r, &a, &w],
        || fused::linear_residual(rt, at, wt),
        || Ok((rt + at.matmul(&wt.t()?)?)?),
        1e-5,
        203,
    )?;
    let gu = Var::from_tensor(&randn(26, 0.0, 2.0, (18, 48)))?;
    let down = Var::from_tensor(&randn(27, 0.0, 0.2, (40, 24)))?;
    let (gut, dt) = (gu.as_tensor(), down.as_tensor());
    check_grads(
        "swiglu_down_residual",
        &[&r, &gu, &down],
        || fused::swiglu_down_residual(rt, gut, dt),
        || {
            let act = (gut.narrow(1, 0, 24)?.silu()? * gut.narrow(1, 24, 24)?)?;
            Ok((rt + act.matmul(&dt.t()?)?)?)
        },
        1e-5,
        204,
    )?;
    Ok(())
}

#[test]
fn fused_attention_matches_composition_values_and_gradients() -> Result<()> {
    // 11 tokens: one query block; 75 and 150: several 64-row blocks, the last one partial, so
    // the skipped upper-triangle blocks and the block-wise dV / dK sums are exercised.
    for seq in [11, 75, 150] {
        attention_matches_composition(seq)?;
    }
    // Multi-head attention without grouping, too.
    let qkv1 = Var::from_tensor(&randn(31, 0.0, 1.0, (2 * 5, 3 * 2 * 4)))?;
    let freq = [1.0, 0.01];
    let spec = std::sync::Arc::new(fused::AttentionSpec::new(2, 5, 2, 2, &freq, None)?);
    check_grads(
        "attention (no grouping)",
        &[&qkv1],
        || fused::attention(qkv1.as_tensor(), &spec),
        || ops::attention_composed(qkv1.as_tensor(), 2, 2, 2, &freq, None),
        1e-5,
        205,
    )?;
    Ok(())
}

fn attention_matches_composition(seq: usize) -> Result<()> {
    let dev = Device::Cpu;
    let (batch, heads, kv_heads, head_dim) = (3, 4, 2, 8);
    let inv_freq: Vec<f64> =
        (0..head_dim / 2).map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / head_dim as f64)).collect();
    let cols = (heads + 2 * kv_heads) * head_dim;
    let qkv = Var::from_tensor(&randn(41, 0.0, 1.5, (batch * seq, cols)))?;
    // Row 0: no padding; row 1: right padding; row 2: leading padding (queries with no real
    // key up to themselves keep only their own position) and holes.
    let mut m = vec![1u8; batch * seq];
    for t in (2 * seq / 3)..seq {
        m[seq + t] = 0;
    }
    for t in [0, 1, 2, 6, seq - 3] {
        m[2 * seq + t] = 0;
    }
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    for padding in [None, Some(&mask)] {
        let spec = std::sync::Arc::new(fused::AttentionSpec::new(batch, seq, heads, kv_heads, &inv_freq, padding)?);
        check_grads(
            &format!("attention ({seq} tokens)"),
            &[&qkv],
            || fused::attention(qkv.as_tensor(), &spec),
            || ops::attention_composed(qkv.as_tensor(), batch, heads, kv_heads, &inv_freq, padding),
            1e-5,
            206,
        )?;
    }
    Ok(())
}

/// Gemma's attention, composed: [`ops::attention_composed`] with scores scaled by `scale`,
/// soft-capped (`cap * tanh(s / cap)`) before the mask, and keys `i - j >= window` masked.
#[allow(clippy::too_many_arguments)]
fn gemma_attention_composed(
    qkv: &Tensor,
    (batch, heads, kv_heads): (usize, usize, usize),
    inv_freq: &[f64],
    padding: Option<&Tensor>,
    scale: f64,
    cap: Option<f64>,
    window: Option<usize>,
) -> Result<Tensor> {
    let head_dim = 2 * inv_freq.len();
    let seq = qkv.dim(0)? / batch;
    let dev = qkv.device();
    let qkv = qkv.reshape((batch, seq, (heads + 2 * kv_heads) * head_dim))?;
    let split = |start: usize, n: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(D::Minus1, start * head_dim, n * head_dim)?
            .reshape((batch, seq, n, head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (cos, sin) = ops::rope_tables(inv_freq, seq, DType::F32, dev)?;
    let q = ops::rope(&split(0, heads)?, &cos, &sin)?;
    let k = ops::rope(&split(heads, kv_heads)?, &cos, &sin)?;
    let v = split(heads + kv_heads, kv_heads)?;
    let n = heads / kv_heads;
    let (k, v) = (ops::repeat_kv(&k, n)?, ops::repeat_kv(&v, n)?);
    let mut mask = ops::input_attention_mask(&Tensor::zeros((batch, seq), DType::U32, dev)?, padding, usize::MAX)?;
    if let Some(w) = window {
        let data: Vec<f32> =
            (0..seq).flat_map(|i| (0..seq).map(move |j| if i >= j + w { -1e30 } else { 0.0 })).collect();
        mask = mask.broadcast_add(&Tensor::from_vec(data, (seq, seq), dev)?)?;
    }
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(cap) = cap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((batch * seq, heads * head_dim))?)
}

/// Gemma's attention variants (a query scale other than `1 / sqrt(head_dim)`, soft-capped scores,
/// a sliding window, and both) equal the composition in value and gradient, over 75 tokens (two
/// query blocks) with a right-padded row and a row with leading padding and holes; rows of
/// padding queries are left out (multiplied by 0: with a window, a padding query may see no key
/// at all, where the composition averages over every masked key).
#[test]
fn attention_with_scale_softcap_and_window_matches_composition() -> Result<()> {
    let dev = Device::Cpu;
    let (batch, seq, heads, kv_heads, head_dim) = (3, 75, 4, 2, 8);
    let inv_freq: Vec<f64> =
        (0..head_dim / 2).map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / head_dim as f64)).collect();
    let cols = (heads + 2 * kv_heads) * head_dim;
    let qkv = Var::from_tensor(&randn(51, 0.0, 1.5, (batch * seq, cols)))?;
    let mut m = vec![1u8; batch * seq];
    for t in 50..seq {
        m[seq + t] = 0;
    }
    for t in [0, 1, 2, 6, 40] {
        m[2 * seq + t] = 0;
    }
    let rows = Tensor::from_vec(m.iter().map(|&v| f32::from(v)).collect::<Vec<_>>(), (batch * seq, 1), &dev)?;
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    for (cap, window) in [(None, Some(5)), (Some(4.0), None), (Some(4.0), Some(5)), (Some(4.0), Some(70))] {
        let spec = fused::AttentionSpec::new(batch, seq, heads, kv_heads, &inv_freq, Some(&mask))?;
        let spec = std::sync::Arc::new(spec.with_scale(0.3).with_softcap(cap).with_window(window));
        check_grads(
            &format!("attention (scale 0.3, cap {cap:?}, window {window:?})"),
            &[&qkv],
            || Ok(fused::attention(qkv.as_tensor(), &spec)?.broadcast_mul(&rows)?),
            || {
                let y = gemma_attention_composed(
                    qkv.as_tensor(),
                    (batch, heads, kv_heads),
                    &inv_freq,
                    Some(&mask),
                    0.3,
                    cap,
                    window,
                )?;
                Ok(y.broadcast_mul(&rows)?)
            },
            1e-5,
            207,
        )?;
    }
    Ok(())
}

/// A window much shorter than the sequence (8 keys of 200 tokens, 64-row query blocks), so the
/// kernels skip whole key blocks and cut ranges inside them: values and every gradient equal the
/// composition, (a) with right padding, leading padding, holes and a hole longer than the window
/// (padding queries that see no real key), and (b) with packed pairs whose second branch sees
/// the prefix partly (a block wholly in the second branch, blocks straddling the branch point) or
/// not at all, against each branch composed as its own row `[prefix | branch]`. The windowed
/// attention block checkpoints bit-identically.
#[test]
fn attention_with_a_short_window_skips_keys_and_matches_composition() -> Result<()> {
    let dev = Device::Cpu;
    let (batch, seq, heads, kv_heads, head_dim, window) = (3, 200, 4, 2, 8, 8);
    let inv_freq: Vec<f64> =
        (0..head_dim / 2).map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / head_dim as f64)).collect();
    let (qc, cols) = (heads * head_dim, (heads + 2 * kv_heads) * head_dim);
    let qkv = Var::from_tensor(&randn(53, 0.0, 1.5, (batch * seq, cols)))?;
    let row_mask = |m: &[u8]| Tensor::from_vec(m.iter().map(|&v| f32::from(v)).collect::<Vec<_>>(), (m.len(), 1), &dev);

    // (a) Padding.
    let mut m = vec![1u8; batch * seq];
    m[seq + 150..2 * seq].fill(0);
    for t in [0, 1, 2, 6, 70] {
        m[2 * seq + t] = 0;
    }
    m[2 * seq + 100..2 * seq + 112].fill(0);
    let rows = row_mask(&m)?;
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    for cap in [None, Some(4.0)] {
        let spec = fused::AttentionSpec::new(batch, seq, heads, kv_heads, &inv_freq, Some(&mask))?;
        let spec = std::sync::Arc::new(spec.with_scale(0.3).with_softcap(cap).with_window(Some(window)));
        check_grads(
            &format!("attention (200 tokens, window {window}, cap {cap:?}, padding)"),
            &[&qkv],
            || Ok(fused::attention(qkv.as_tensor(), &spec)?.broadcast_mul(&rows)?),
            || {
                let y = gemma_attention_composed(
                    qkv.as_tensor(),
                    (batch, heads, kv_heads),
                    &inv_freq,
                    Some(&mask),
                    0.3,
                    cap,
                    Some(window),
                )?;
                Ok(y.broadcast_mul(&rows)?)
            },
            1e-5,
            208,
        )?;
    }

    // (b) Packed pairs `(prefix, first, second)`: row 0's block 64..128 lies wholly in the second
    // branch and sees the prefix's last keys; row 1's block 64..128 straddles the branch point;
    // row 2's block 128..192 is in the second branch with its prefix wholly out of the window.
    let pairs = [(60, 4, 136), (5, 60, 70), (70, 3, 100)];
    let mut m = vec![0u8; batch * seq];
    for (b, &(p, f, s2)) in pairs.iter().enumerate() {
        m[b * seq..b * seq + p + f + s2].fill(1);
    }
    let rows = row_mask(&m)?;
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    // Reference rows `[prefix | first]` and `[prefix | second]` (right-padded to `seq`, padding
    // reading token 0), and where each packed token's output is found among them.
    let (mut src, mut ref_mask, mut gather) = (Vec::new(), vec![0u8; 2 * batch * seq], vec![0u32; batch * seq]);
    for (b, &(p, f, s2)) in pairs.iter().enumerate() {
        let toks = [(0..p + f).collect::<Vec<_>>(), (0..p).chain(p + f..p + f + s2).collect()];
        for (r, toks) in toks.iter().enumerate() {
            let row = 2 * b + r;
            for t in 0..seq {
                src.push(toks.get(t).map_or(0, |&i| (b * seq + i) as u32));
            }
            ref_mask[row * seq..row * seq + toks.len()].fill(1);
            for (t, &i) in toks.iter().enumerate() {
                if r == 0 || t >= p {
                    gather[b * seq + i] = (row * seq + t) as u32;
                }
            }
        }
    }
    let src = Tensor::from_vec(src, 2 * batch * seq, &dev)?;
    let gather = Tensor::from_vec(gather, batch * seq, &dev)?;
    let ref_mask = Tensor::from_vec(ref_mask, (2 * batch, seq), &dev)?;
    let branches: Vec<(usize, usize)> = pairs.iter().map(|&(p, f, _)| (p, f)).collect();
    for cap in [None, Some(4.0)] {
        let spec = fused::AttentionSpec::new(batch, seq, heads, kv_heads, &inv_freq, Some(&mask))?;
        let spec = spec.with_branches(&branches)?.with_scale(0.3).with_softcap(cap).with_window(Some(window));
        let spec = std::sync::Arc::new(spec);
        check_grads(
            &format!("attention (200 tokens, window {window}, cap {cap:?}, packed pairs)"),
            &[&qkv],
            || Ok(fused::attention(qkv.as_tensor(), &spec)?.broadcast_mul(&rows)?),
            || {
                let y = gemma_attention_composed(
                    &qkv.as_tensor().index_select(&src, 0)?,
                    (2 * batch, heads, kv_heads),
                    &inv_freq,
                    Some(&ref_mask),
                    0.3,
                    cap,
                    Some(window),
                )?;
                Ok(y.index_select(&gather, 0)?.broadcast_mul(&rows)?)
            },
            1e-5,
            209,
        )?;

        // The windowed, packed attention block: Keep and Recompute agree to the bit.
        let hidden = 24;
        let x = Var::from_tensor(&randn(54, 0.0, 1.0, (batch * seq, hidden)))?;
        let nw = randn(55, 1.0, 0.3, hidden);
        let w = [
            randn(56, 0.0, 0.1, (qc, hidden)),
            randn(57, 0.0, 0.1, (kv_heads * head_dim, hidden)),
            randn(58, 0.0, 0.1, (kv_heads * head_dim, hidden)),
            randn(59, 0.0, 0.1, (hidden, qc)),
        ];
        let coef = randn(60, 0.0, 1.0, (batch * seq, hidden));
        let run = |acts: Activations| -> Result<(Vec<f32>, Vec<f32>)> {
            let extras = fused::AttentionExtras::default();
            let y = fused::attention_block(
                x.as_tensor(),
                &nw,
                [&w[0], &w[1], &w[2], &w[3]],
                extras,
                &spec,
                1e-6,
                acts,
                None,
            )?;
            let g = (&y * &coef)?.sum_all()?.backward()?;
            let gx = g.get(x.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
            Ok((y.flatten_all()?.to_vec1::<f32>()?, gx))
        };
        let (keep, recompute) = (run(Activations::Keep)?, run(Activations::Recompute)?);
        assert_eq!(keep.0, recompute.0, "windowed attention block (cap {cap:?}): values");
        assert_eq!(keep.1, recompute.1, "windowed attention block (cap {cap:?}): gradient");
    }
    Ok(())
}

#[test]
fn fused_blocks_match_composition_values_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let (batch, seq, heads, kv_heads, head_dim, hidden, inter) = (2, 9, 4, 2, 8, 24, 40);
    let inv_freq: Vec<f64> =
        (0..head_dim / 2).map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / head_dim as f64)).collect();
    let x = Var::from_tensor(&randn(61, 0.0, 1.0, (batch * seq, hidden)))?;
    let nw = Var::from_tensor(&randn(62, 1.0, 0.3, hidden))?;
    // Weights at a realistic scale (models initialise at 0.02), so gradients are O(1) and an
    // absolute 1e-5 bound is meaningful in f32.
    let w = |seed: u64, rows: usize, cols: usize| Var::from_tensor(&randn(seed, 0.0, 0.1, (rows, cols)));
    let (q, k, v, o) = (
        w(63, heads * head_dim, hidden)?,
        w(64, kv_heads * head_dim, hidden)?,
        w(65, kv_heads * head_dim, hidden)?,
        w(66, hidden, heads * head_dim)?,
    );
    let mut m = vec![1u8; batch * seq];
    m[seq + 7] = 0;
    m[seq + 8] = 0;
    let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
    let spec = std::sync::Arc::new(fused::AttentionSpec::new(batch, seq, heads, kv_heads, &inv_freq, Some(&mask))?);
    let (xt, nwt) = (x.as_tensor(), nw.as_tensor());
    let (g, u, d) = (w(67, inter, hidden)?, w(68, inter, hidden)?, w(69, hidden, inter)?);
    for acts in [Activations::Keep, Activations::Recompute] {
        let attn_block = || {
            fused::attention_block(
                xt,
                nwt,
                [q.as_tensor(), k.as_tensor(), v.as_tensor(), o.as_tensor()],
                fused::AttentionExtras::default(),
                &spec,
                1e-6,
                acts,
                None,
            )
        };
        check_grads(
            &format!("attention_block ({acts:?})"),
            &[&x, &nw, &q, &k, &v, &o],
            attn_block,
            || {
                let h = ops::rms_norm_composed(xt, nwt, 1e-6)?;
                let qkv = Tensor::cat(
                    &[h.matmul(&q.as_tensor().t()?)?, h.matmul(&k.as_tensor().t()?)?, h.matmul(&v.as_tensor().t()?)?],
                    1,
                )?;
                let a = ops::attention_composed(&qkv, batch, heads, kv_heads, &inv_freq, Some(&mask))?;
                Ok((xt + a.matmul(&o.as_tensor().t()?)?)?)
            },
            1e-5,
            208,
        )?;
        let mlp_block = || fused::mlp_block(xt, nwt, [g.as_tensor(), u.as_tensor(), d.as_tensor()], 1e-6, acts, None);
        check_grads(
            &format!("mlp_block ({acts:?})"),
            &[&x, &nw, &g, &u, &d],
            mlp_block,
            || {
                let h = ops::rms_norm_composed(xt, nwt, 1e-6)?;
                let act = (h.matmul(&g.as_tensor().t()?)?.silu()? * h.matmul(&u.as_tensor().t()?)?)?;
                Ok((xt + act.matmul(&d.as_tensor().t()?)?)?)
            },
            1e-5,
            209,
        )?;
        // A graph differentiated twice: the second backward recomputes the activations the first
        // one freed, with the same result.
        for f in [&attn_block as &dyn Fn() -> Result<Tensor>, &mlp_block] {
            let y = f()?.sqr()?.sum_all()?;
            let (g1, g2) = (y.backward()?, y.backward()?);
            for var in [&x, &nw] {
                let (a, b) = (g1.get(var.as_tensor()).expect("grad"), g2.get(var.as_tensor()).expect("grad"));
                assert_eq!(max_abs_diff(a, b)?, 0.0);
            }
        }
    }
    Ok(())
}

/// The MLP block's backward pass works 256 rows at a time (512 for the products with the weights
/// when it kept its gate|up): over 600 rows (two full chunks and a partial one) its values and
/// gradients still equal the composition, in both modes.
#[test]
fn mlp_block_over_several_row_chunks_matches_composition() -> Result<()> {
    let (rows, hidden, inter) = (600, 24, 40);
    let x = Var::from_tensor(&randn(71, 0.0, 1.0, (rows, hidden)))?;
    let nw = Var::from_tensor(&randn(72, 1.0, 0.3, hidden))?;
    let w = |seed: u64, r: usize, c: usize| Var::from_tensor(&randn(seed, 0.0, 0.1, (r, c)));
    let (g, u, d) = (w(73, inter, hidden)?, w(74, inter, hidden)?, w(75, hidden, inter)?);
    let (xt, nwt) = (x.as_tensor(), nw.as_tensor());
    for acts in [Activations::Keep, Activations::Recompute] {
        check_grads(
            &format!("mlp_block, {rows} rows ({acts:?})"),
            &[&x, &nw, &g, &u, &d],
            || fused::mlp_block(xt, nwt, [g.as_tensor(), u.as_tensor(), d.as_tensor()], 1e-6, acts, None),
            || {
                let h = ops::rms_norm_composed(xt, nwt, 1e-6)?;
                let act = (h.matmul(&g.as_tensor().t()?)?.silu()? * h.matmul(&u.as_tensor().t()?)?)?;
                Ok((xt + act.matmul(&d.as_tensor().t()?)?)?)
            },
            1e-5,
            210,
        )?;
    }
    Ok(())
}

/// Kept and recomputed activations give the MLP block the same gradients bit for bit over 1,100
/// rows (kept: 512-row chunks for the products with the weights; both: the weight and norm
/// gradients summed over the same 256-row slices in the same order), with and without a
/// post-norm.
#[test]
fn mlp_block_gradients_are_the_same_bits_kept_or_recomputed() -> Result<()> {
    let (rows, hidden, inter) = (1100, 16, 24);
    let x = Var::from_tensor(&randn(91, 0.0, 1.0, (rows, hidden)))?;
    let nw = Var::from_tensor(&randn(92, 1.0, 0.3, hidden))?;
    let pw = Var::from_tensor(&randn(93, 1.0, 0.3, hidden))?;
    let w = |seed: u64, r: usize, c: usize| Var::from_tensor(&randn(seed, 0.0, 0.2, (r, c)));
    let (g, u, d) = (w(94, inter, hidden)?, w(95, inter, hidden)?, w(96, hidden, inter)?);
    let scale = randn(97, 0.0, 1.0, (rows, hidden));
    for post in [false, true] {
        let grads = |acts: Activations| -> Result<Vec<Vec<u32>>> {
            let extras = fused::MlpExtras {
                act: fused::Glu::Silu,
                post_norm: post.then_some(pw.as_tensor()),
                ..Default::default()
            };
            let weights = [g.as_tensor(), u.as_tensor(), d.as_tensor()];
            let y = fused::mlp_block_with(x.as_tensor(), nw.as_tensor(), weights, extras, 1e-6, acts, None)?;
            let store = (y * &scale)?.sum_all()?.backward()?;
            [&x, &nw, &pw, &g, &u, &d]
                .iter()
                .filter(|v| post || v.as_tensor().id() != pw.as_tensor().id())
                .map(|v| {
                    let t = store.get(v.as_tensor()).expect("a gradient");
                    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|f| f.to_bits()).collect())
                })
                .collect()
        };
        assert_eq!(grads(Activations::Keep)?, grads(Activations::Recompute)?, "post-norm {post}");
    }
    Ok(())
}

/// Gemma's MLP block: GeGLU (candle's tanh `gelu`) and, for Gemma 2/3, a post-norm of the MLP
/// output before the residual add, over 600 rows (several row chunks) in both modes; values and
/// gradients (the post-norm weight's included) equal the composition; off f32 CPU the fallback
/// gives the same values.
#[test]
fn geglu_mlp_block_with_post_norm_matches_composition() -> Result<()> {
    let (rows, hidden, inter) = (600, 24, 40);
    let x = Var::from_tensor(&randn(81, 0.0, 1.0, (rows, hidden)))?;
    let nw = Var::from_tensor(&randn(82, 1.0, 0.3, hidden))?;
    let pw = Var::from_tensor(&randn(83, 1.0, 0.3, hidden))?;
    // Gate pre-activations of a few units, wide enough to reach both tails of the GELU.
    let w = |seed: u64, r: usize, c: usize, s: f32| Var::from_tensor(&randn(seed, 0.0, s, (r, c)));
    let (g, u, d) = (w(84, inter, hidden, 0.6)?, w(85, inter, hidden, 0.1)?, w(86, hidden, inter, 0.1)?);
    let (xt, nwt, pwt) = (x.as_tensor(), nw.as_tensor(), pw.as_tensor());
    let weights = [g.as_tensor(), u.as_tensor(), d.as_tensor()];
    for post in [false, true] {
        let extras =
            fused::MlpExtras { act: fused::Glu::GeluTanh, post_norm: post.then_some(pwt), ..Default::default() };
        let composed = |x: &Tensor, nw: &Tensor, pw: &Tensor, [g, u, d]: [&Tensor; 3]| -> Result<Tensor> {
            let h = ops::rms_norm_composed(x, nw, 1e-6)?;
            let m = (h.matmul(&g.t()?)?.gelu()? * h.matmul(&u.t()?)?)?.matmul(&d.t()?)?;
            let m = if post { ops::rms_norm_composed(&m, pw, 1e-6)? } else { m };
            Ok((x + m)?)
        };
        let mut vars = vec![&x, &nw, &g, &u, &d];
        if post {
            vars.push(&pw);
        }
        for acts in [Activations::Keep, Activations::Recompute] {
            check_grads(
                &format!("GeGLU mlp block, post-norm {post}, {rows} rows ({acts:?})"),
                &vars,
                || fused::mlp_block_with(xt, nwt, weights, extras, 1e-6, acts, None),
                || composed(xt, nwt, pwt, weights),
                1e-5,
                211,
            )?;
        }
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).expect("f64");
        let (x64, nw64, pw64) = (f64s(xt), f64s(nwt), f64s(pwt));
        let w64 = weights.map(f64s);
        let extras64 = fused::MlpExtras { post_norm: post.then_some(&pw64), ..extras };
        let fallback =
            fused::mlp_block_with(&x64, &nw64, [&w64[0], &w64[1], &w64[2]], extras64, 1e-6, Activations::Keep, None)?;
        let want = composed(xt, nwt, pwt, weights)?;
        assert!(max_abs_diff(&fallback.to_dtype(DType::F32)?, &want)? < 1e-5, "fallback, post-norm {post}");
    }
    Ok(())
}

/// Which of Qwen's optional attention parameters a block test uses.
#[derive(Debug, Clone, Copy)]
struct Parts {
    qkv_bias: bool,
    o_bias: bool,
    qk_norm: bool,
    post_norm: bool,
}

/// Qwen2 (q/k/v biases), Qwen3 (q/k norm), Qwen3 with `attention_bias` (both, and the o_proj
/// bias), an o_proj bias alone; Gemma 3's q/k norm with a post-attention norm, and a post-norm
/// after an o_proj bias.
const QWEN_PARTS: [Parts; 6] = [
    Parts { qkv_bias: true, o_bias: false, qk_norm: false, post_norm: false },
    Parts { qkv_bias: false, o_bias: false, qk_norm: true, post_norm: false },
    Parts { qkv_bias: true, o_bias: true, qk_norm: true, post_norm: false },
    Parts { qkv_bias: false, o_bias: true, qk_norm: false, post_norm: false },
    Parts { qkv_bias: false, o_bias: false, qk_norm: true, post_norm: true },
    Parts { qkv_bias: true, o_bias: true, qk_norm: false, post_norm: true },
];

/// An attention block with head_dim 8 != hidden / heads (o_proj is 24 x 32), grouped heads, a
/// padded row and 70 tokens (two query blocks, the second partial); every parameter a `Var`.
struct QwenBlock {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inv_freq: Vec<f64>,
    mask: Tensor,
    spec: std::sync::Arc<fused::AttentionSpec>,
    x: Var,
    nw: Var,
    /// q, k, v, o.
    w: [Var; 4],
    /// q, k, v biases, o bias, q norm, k norm.
    b: [Var; 3],
    bo: Var,
    qk: [Var; 2],
    /// Post-norm weight.
    post: Var,
}

impl QwenBlock {
    fn new() -> Result<Self> {
        let dev = Device::Cpu;
        let (batch, seq, heads, kv_heads, head_dim, hidden) = (2, 70, 4, 2, 8, 24);
        let inv_freq: Vec<f64> =
            (0..head_dim / 2).map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / head_dim as f64)).collect();
        let mut m = vec![1u8; batch * seq];
        m[seq + 50..].fill(0);
        let mask = Tensor::from_vec(m, (batch, seq), &dev)?;
        let spec = std::sync::Arc::new(fused::AttentionSpec::new(batch, seq, heads, kv_heads, &inv_freq, Some(&mask))?);
        let var = |t: Tensor| Var::from_tensor(&t).expect("var");
        let (qc, kc) = (heads * head_dim, kv_heads * head_dim);
        Ok(Self {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            inv_freq,
            mask,
            spec,
            x: var(randn(91, 0.0, 1.0, (batch * seq, hidden))),
            nw: var(randn(92, 1.0, 0.3, hidden)),
            w: [
                var(randn(93, 0.0, 0.1, (qc, hidden))),
                var(randn(94, 0.0, 0.1, (kc, hidden))),
                var(randn(95, 0.0, 0.1, (kc, hidden))),
                var(randn(96, 0.0, 0.1, (hidden, qc))),
            ],
            b: [var(randn(97, 0.0, 0.3, qc)), var(randn(98, 0.0, 0.3, kc)), var(randn(99, 0.0, 0.3, kc))],
            bo: var(randn(100, 0.0, 0.3, hidden)),
            qk: [var(randn(101, 1.0, 0.3, head_dim)), var(randn(102, 1.0, 0.3, head_dim))],
            post: var(randn(103, 1.0, 0.3, hidden)),
        })
    }

    /// The variables the block with `parts` reads.
    fn vars(&self, parts: Parts) -> Vec<&Var> {
        let mut vars = vec![&self.x, &self.nw];
        vars.extend(&self.w);
        if parts.qkv_bias {
            vars.extend(&self.b);
        }
        if parts.o_bias {
            vars.push(&self.bo);
        }
        if parts.qk_norm {
            vars.extend(&self.qk);
        }
        if parts.post_norm {
            vars.push(&self.post);
        }
        vars
    }

    fn fused(
        &self,
        parts: Parts,
        acts: Activations,
        meter: Option<&std::sync::Arc<fused::ActivationMeter>>,
    ) -> Result<Tensor> {
        self.fused_lora(parts, acts, meter, false, &[None, None, None, None], 0.0)
    }

    /// Piece `t` of the block as it enters: the variable, or (`frozen`) a constant view of it.
    fn piece(t: &Var, frozen: bool) -> Tensor {
        if frozen { t.as_tensor().detach() } else { t.as_tensor().clone() }
    }

    /// The fused block with `lora[p]` = `(A, B)` on projection `p` (q, k, v, o), scale `s`;
    /// `frozen`: every parameter but the adapters and `x` enters as a constant (LoRA's setting).
    fn fused_lora(
        &self,
        parts: Parts,
        acts: Activations,
        meter: Option<&std::sync::Arc<fused::ActivationMeter>>,
        frozen: bool,
        lora: &[Option<&(Var, Var)>; 4],
        s: f64,
    ) -> Result<Tensor> {
        let f = |t: &Var| Self::piece(t, frozen);
        let [q, k, v, o] = self.w.each_ref().map(f);
        let [bq, bk, bv] = self.b.each_ref().map(f);
        let [qn, kn] = self.qk.each_ref().map(f);
        let (bo, post, nw) = (f(&self.bo), f(&self.post), f(&self.nw));
        let extras = fused::AttentionExtras {
            qkv_bias: parts.qkv_bias.then_some([&bq, &bk, &bv]),
            o_bias: parts.o_bias.then_some(&bo),
            qk_norm: parts.qk_norm.then_some([&qn, &kn]),
            post_norm: parts.post_norm.then_some(&post),
            lora: lora.map(|l| l.map(|(a, b)| fused::LowRank { a: a.as_tensor(), b: b.as_tensor(), scale: s })),
        };
        fused::attention_block(self.x.as_tensor(), &nw, [&q, &k, &v, &o], extras, &self.spec, 1e-6, acts, meter)
    }

    /// The composition of candle ops, as the reference Qwen attention: projections plus biases,
    /// per-head RMSNorm of q and k, rotary attention, o_proj plus bias, residual.
    fn composed(&self, parts: Parts) -> Result<Tensor> {
        self.composed_lora(parts, false, &[None, None, None, None], 0.0)
    }

    /// [`Self::composed`] with the adapters of [`Self::fused_lora`]: each adapted projection
    /// `h W^T + s (h A^T) B^T`.
    fn composed_lora(&self, parts: Parts, frozen: bool, lora: &[Option<&(Var, Var)>; 4], s: f64) -> Result<Tensor> {
        let f = |t: &Var| Self::piece(t, frozen);
        let n = self.batch * self.seq;
        let h = ops::rms_norm_composed(self.x.as_tensor(), &f(&self.nw), 1e-6)?;
        let project = |z: &Tensor, p: usize| -> Result<Tensor> {
            let y = z.matmul(&f(&self.w[p]).t()?)?;
            Ok(match lora[p] {
                Some((a, b)) => (y + (z.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * s)?)?,
                None => y,
            })
        };
        let proj = |p: usize, bias: bool| -> Result<Tensor> {
            let y = project(&h, p)?;
            Ok(if bias { y.broadcast_add(&f(&self.b[p]))? } else { y })
        };
        let head_norm = |t: Tensor, heads: usize, w: &Var| -> Result<Tensor> {
            if !parts.qk_norm {
                return Ok(t);
            }
            let normed = ops::rms_norm_composed(&t.reshape((n, heads, self.head_dim))?, &f(w), 1e-6)?;
            Ok(normed.reshape((n, heads * self.head_dim))?)
        };
        let q = head_norm(proj(0, parts.qkv_bias)?, self.heads, &self.qk[0])?;
        let k = head_norm(proj(1, parts.qkv_bias)?, self.kv_heads, &self.qk[1])?;
        let v = proj(2, parts.qkv_bias)?;
        let qkv = Tensor::cat(&[q, k, v], 1)?;
        let a = ops::attention_composed(&qkv, self.batch, self.heads, self.kv_heads, &self.inv_freq, Some(&self.mask))?;
        let out = project(&a, 3)?;
        let out = if parts.o_bias { out.broadcast_add(&f(&self.bo))? } else { out };
        let out = if parts.post_norm { ops::rms_norm_composed(&out, &f(&self.post), 1e-6)? } else { out };
        Ok((self.x.as_tensor() + out)?)
    }
}

/// With Qwen's q/k/v and o_proj biases and per-head q/k RMSNorm, and Gemma's post-attention norm,
/// the fused attention block equals the composition in value and in the gradient of every input
/// (x, norm weight, q/k/v/o weights, biases, q/k norm weights, post-norm weight) within 1e-5, in
/// both activation modes.
#[test]
fn attention_block_with_biases_and_qk_norm_matches_composition() -> Result<()> {
    let block = QwenBlock::new()?;
    for parts in QWEN_PARTS {
        for acts in [Activations::Keep, Activations::Recompute] {
            check_grads(
                &format!("attention_block {parts:?} ({acts:?})"),
                &block.vars(parts),
                || block.fused(parts, acts, None),
                || block.composed(parts),
                1e-5,
                212,
            )?;
        }
    }
    // An ill-sized optional parameter is an error naming it.
    let err = fused::attention_block(
        block.x.as_tensor(),
        block.nw.as_tensor(),
        [block.w[0].as_tensor(), block.w[1].as_tensor(), block.w[2].as_tensor(), block.w[3].as_tensor()],
        fused::AttentionExtras { o_bias: Some(block.b[0].as_tensor()), ..Default::default() },
        &block.spec,
        1e-6,
        Activations::Keep,
        None,
    )
    .expect_err("a 32-wide o bias on a 24-wide block");
    assert!(err.to_string().contains("o bias"), "{err}");
    Ok(())
}

/// Gradient checkpointing of the extended block changes no bit of the value or of any gradient;
/// the meter counts exactly what the block keeps (q|k|v and the attention output, as without the
/// optional parts, and the probabilities without a q/k head norm) until the backward pass; a
/// graph differentiated twice recomputes the same.
#[test]
fn attention_block_with_biases_and_qk_norm_checkpoints_bit_identically() -> Result<()> {
    let block = QwenBlock::new()?;
    let coef = randn(104, 0.0, 1.0, block.x.shape());
    let n = block.batch * block.seq;
    let (qc, kc) = (block.heads * block.head_dim, block.kv_heads * block.head_dim);
    for parts in QWEN_PARTS {
        let meter = std::sync::Arc::new(fused::ActivationMeter::default());
        let run = |acts: Activations| -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
            let y = block.fused(parts, acts, Some(&meter))?;
            // With a q/k head norm the attention recomputes its probabilities; without, it keeps them.
            let probs = if parts.qk_norm { 0 } else { block.spec.kept_probabilities() };
            let kept = if acts == Activations::Keep { (n * (qc + 2 * kc + qc) + probs) * 4 } else { 0 };
            assert_eq!(meter.held_bytes(), kept, "{parts:?} ({acts:?}): after the forward pass");
            let loss = (&y * &coef)?.sum_all()?;
            let grads = loss.backward()?;
            assert_eq!(meter.held_bytes(), 0, "{parts:?} ({acts:?}): after the backward pass");
            // Differentiated again, the block recomputes what the first backward pass freed.
            let again = loss.backward()?;
            let mut out = Vec::new();
            for v in block.vars(parts) {
                let g = grads.get(v.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
                let g2 = again.get(v.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(g, g2, "{parts:?} ({acts:?}): second backward pass");
                out.push(g);
            }
            Ok((y.flatten_all()?.to_vec1::<f32>()?, out))
        };
        let (y_keep, g_keep) = run(Activations::Keep)?;
        let (y_rec, g_rec) = run(Activations::Recompute)?;
        assert_eq!(y_keep, y_rec, "{parts:?}: values");
        for (i, (a, b)) in g_keep.iter().zip(&g_rec).enumerate() {
            assert_eq!(a, b, "{parts:?}: gradient of input {i}");
        }
        let probs = if parts.qk_norm { 0 } else { block.spec.kept_probabilities() };
        assert_eq!(meter.peak_bytes(), (n * (2 * qc + 2 * kc) + probs) * 4, "{parts:?}: peak");
    }
    Ok(())
}

/// The attention keeps its probabilities for the backward pass only while they are small (they
/// grow with the square of the sequence) and its scores are not soft-capped.
#[test]
fn attention_keeps_probabilities_only_within_the_budget() -> Result<()> {
    let inv_freq: Vec<f64> = (0..16).map(|i| 1.0 / 10_000f64.powf(i as f64 / 16.0)).collect();
    let spec = |seq: usize| fused::AttentionSpec::new(4, seq, 8, 4, &inv_freq, None);
    let reference = spec(224)?.kept_probabilities();
    assert_eq!(reference, fused::kept_probability_floats(4, 224, 8));
    assert!(reference > 0 && reference * 4 <= fused::KEPT_PROBS_BYTES);
    assert!(fused::kept_probability_floats(4, 512, 8) * 4 > fused::KEPT_PROBS_BYTES);
    assert_eq!(spec(512)?.kept_probabilities(), 0, "4 x 512 positions: over the budget");
    assert_eq!(spec(224)?.with_softcap(Some(50.0)).kept_probabilities(), 0, "soft-capped scores");
    Ok(())
}

/// LoRA adapters `(A [r, in], B [out, r])` as variables for the `[out, in]` weights `ws`, with a
/// non-zero `B` (a fresh adapter's `B = 0` would leave `dA` zero and hide a wrong one).
fn adapters(seed: u64, ws: &[&Tensor], r: usize) -> Result<Vec<(Var, Var)>> {
    ws.iter()
        .enumerate()
        .map(|(i, w)| {
            let (out, inp) = w.dims2()?;
            let s = 2 * (seed + i as u64);
            Ok((Var::from_tensor(&randn(s, 0.0, 0.3, (r, inp)))?, Var::from_tensor(&randn(s + 1, 0.0, 0.1, (out, r)))?))
        })
        .collect()
}

/// The adapters' variables, `A` then `B` of each.
fn adapter_vars<'a>(ads: &[Option<&'a (Var, Var)>]) -> Vec<&'a Var> {
    ads.iter().flatten().flat_map(|(a, b)| [a, b]).collect()
}

/// Llama's attention block (no optional parts), Qwen2's with q/k/v and o_proj biases, Gemma 3's
/// with q/k norm and a post-norm.
const LORA_PARTS: [Parts; 3] = [
    Parts { qkv_bias: false, o_bias: false, qk_norm: false, post_norm: false },
    Parts { qkv_bias: true, o_bias: true, qk_norm: false, post_norm: false },
    Parts { qkv_bias: false, o_bias: false, qk_norm: true, post_norm: true },
];

/// LoRA adapters on the attention block's projections (all four, or q and v only) equal the
/// composition `h W^T + s (h A^T) B^T`: values, and the gradients of `x` and of every `A` and
/// `B` within 1e-5, with frozen base weights, biases and norms (LoRA's setting) and with all of
/// them trainable too (their gradients then checked as well), for Llama's, Qwen2's and Gemma 3's
/// block, in both activation modes.
#[test]
fn attention_block_with_lora_matches_composition() -> Result<()> {
    let block = QwenBlock::new()?;
    let ws: Vec<&Tensor> = block.w.iter().map(Var::as_tensor).collect();
    let ads = adapters(300, &ws, 3)?;
    let all = [Some(&ads[0]), Some(&ads[1]), Some(&ads[2]), Some(&ads[3])];
    let q_v = [Some(&ads[0]), None, Some(&ads[2]), None];
    for parts in LORA_PARTS {
        for (targets, lora) in [("q, k, v, o", &all), ("q, v", &q_v)] {
            for frozen in [true, false] {
                let mut vars = if frozen { vec![&block.x] } else { block.vars(parts) };
                vars.extend(adapter_vars(lora));
                for acts in [Activations::Keep, Activations::Recompute] {
                    check_grads(
                        &format!("attention block {parts:?}, LoRA on {targets}, frozen base {frozen} ({acts:?})"),
                        &vars,
                        || block.fused_lora(parts, acts, None, frozen, lora, 2.0),
                        || block.composed_lora(parts, frozen, lora, 2.0),
                        1e-5,
                        301,
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// A block computes no gradient for what is frozen: constant base weights, norm weights and a
/// constant input get none (no entry in the store), the adapters get theirs; and the same with
/// the whole block frozen but its input trainable (LoRA off: only `dx`).
#[test]
fn lora_blocks_give_frozen_inputs_no_gradient() -> Result<()> {
    let block = QwenBlock::new()?;
    let ws: Vec<&Tensor> = block.w.iter().map(Var::as_tensor).collect();
    let ads = adapters(310, &ws, 2)?;
    let lora = [Some(&ads[0]), Some(&ads[1]), Some(&ads[2]), Some(&ads[3])];
    let x = block.x.as_tensor().detach();
    let nw = block.nw.as_tensor().detach();
    let frozen: Vec<Tensor> = ws.iter().map(|w| w.detach()).collect();
    let extras = fused::AttentionExtras {
        lora: lora.map(|l| l.map(|(a, b)| fused::LowRank { a: a.as_tensor(), b: b.as_tensor(), scale: 2.0 })),
        ..Default::default()
    };
    let weights = [&frozen[0], &frozen[1], &frozen[2], &frozen[3]];
    let y = fused::attention_block(&x, &nw, weights, extras, &block.spec, 1e-6, Activations::Keep, None)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    for t in [&x, &nw].into_iter().chain(&frozen) {
        assert!(grads.get(t).is_none(), "a frozen input got a gradient");
    }
    for v in adapter_vars(&lora) {
        assert!(grads.get(v.as_tensor()).is_some(), "an adapter got no gradient");
    }
    // Nothing trains but the input: only `dx`.
    let y = fused::attention_block(
        block.x.as_tensor(),
        &nw,
        weights,
        fused::AttentionExtras::default(),
        &block.spec,
        1e-6,
        Activations::Keep,
        None,
    )?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    assert!(grads.get(block.x.as_tensor()).is_some());
    assert!([&nw].into_iter().chain(&frozen).all(|t| grads.get(t).is_none()));
    // The same for the MLP block.
    let (hidden, inter) = (24, 40);
    let mw: Vec<Tensor> = [(inter, hidden), (inter, hidden), (hidden, inter)]
        .iter()
        .enumerate()
        .map(|(i, &s)| randn(320 + i as u64, 0.0, 0.1, s))
        .collect();
    let mads = adapters(330, &mw.iter().collect::<Vec<_>>(), 2)?;
    let mlora = [Some(&mads[0]), Some(&mads[1]), Some(&mads[2])];
    let extras = fused::MlpExtras {
        lora: mlora.map(|l| l.map(|(a, b)| fused::LowRank { a: a.as_tensor(), b: b.as_tensor(), scale: 2.0 })),
        ..Default::default()
    };
    let y = fused::mlp_block_with(&x, &nw, [&mw[0], &mw[1], &mw[2]], extras, 1e-6, Activations::Keep, None)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    assert!([&x, &nw].into_iter().chain(&mw).all(|t| grads.get(t).is_none()), "mlp: a frozen input got a gradient");
    assert!(adapter_vars(&mlora).iter().all(|v| grads.get(v.as_tensor()).is_some()), "mlp: an adapter got no gradient");
    Ok(())
}

/// LoRA adapters on the MLP block's projections (all three, or up only) equal the composition:
/// SwiGLU (Llama) and GeGLU with a post-norm (Gemma 2/3), over 600 rows (several row chunks,
/// whose adapter gradients add up), frozen and trainable base weights, both activation modes;
/// and kept and recomputed activations give the adapters the same gradients bit for bit.
#[test]
fn mlp_block_with_lora_matches_composition() -> Result<()> {
    let (rows, hidden, inter) = (600, 24, 40);
    let x = Var::from_tensor(&randn(341, 0.0, 1.0, (rows, hidden)))?;
    let nw = Var::from_tensor(&randn(342, 1.0, 0.3, hidden))?;
    let pw = Var::from_tensor(&randn(343, 1.0, 0.3, hidden))?;
    let w = |seed: u64, r: usize, c: usize, s: f32| Var::from_tensor(&randn(seed, 0.0, s, (r, c)));
    let ws = [w(344, inter, hidden, 0.5)?, w(345, inter, hidden, 0.1)?, w(346, hidden, inter, 0.1)?];
    let ads = adapters(350, &ws.iter().map(Var::as_tensor).collect::<Vec<_>>(), 4)?;
    let all = [Some(&ads[0]), Some(&ads[1]), Some(&ads[2])];
    let up = [None, Some(&ads[1]), None];
    let s = 0.5;
    for (act, post) in [(fused::Glu::Silu, false), (fused::Glu::GeluTanh, true)] {
        for (targets, lora) in [("gate, up, down", &all), ("up", &up)] {
            for frozen in [true, false] {
                let f = |t: &Var| if frozen { t.as_tensor().detach() } else { t.as_tensor().clone() };
                let (nwt, pwt) = (f(&nw), f(&pw));
                let [g, u, d] = ws.each_ref().map(f);
                let fused_f = |acts: Activations| {
                    let extras = fused::MlpExtras {
                        act,
                        post_norm: post.then_some(&pwt),
                        lora: lora
                            .map(|l| l.map(|(a, b)| fused::LowRank { a: a.as_tensor(), b: b.as_tensor(), scale: s })),
                    };
                    fused::mlp_block_with(x.as_tensor(), &nwt, [&g, &u, &d], extras, 1e-6, acts, None)
                };
                let composed = || -> Result<Tensor> {
                    let project = |z: &Tensor, w: &Tensor, p: usize| -> Result<Tensor> {
                        let y = z.matmul(&w.t()?)?;
                        Ok(match lora[p] {
                            Some((a, b)) => (y + (z.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * s)?)?,
                            None => y,
                        })
                    };
                    let h = ops::rms_norm_composed(x.as_tensor(), &nwt, 1e-6)?;
                    let gate = project(&h, &g, 0)?;
                    let gate = if act == fused::Glu::Silu { gate.silu()? } else { gate.gelu()? };
                    let m = project(&(gate * project(&h, &u, 1)?)?, &d, 2)?;
                    let m = if post { ops::rms_norm_composed(&m, &pwt, 1e-6)? } else { m };
                    Ok((x.as_tensor() + m)?)
                };
                let mut vars = vec![&x];
                if !frozen {
                    vars.extend([&nw, &ws[0], &ws[1], &ws[2]]);
                    if post {
                        vars.push(&pw);
                    }
                }
                vars.extend(adapter_vars(lora));
                for acts in [Activations::Keep, Activations::Recompute] {
                    check_grads(
                        &format!("mlp block {act:?}, post-norm {post}, LoRA on {targets}, frozen {frozen} ({acts:?})"),
                        &vars,
                        || fused_f(acts),
                        composed,
                        1e-5,
                        351,
                    )?;
                }
                let coef = randn(352, 0.0, 1.0, (rows, hidden));
                let bits = |acts: Activations| -> Result<Vec<Vec<u32>>> {
                    let store = (fused_f(acts)? * &coef)?.sum_all()?.backward()?;
                    vars.iter()
                        .map(|v| {
                            let t = store.get(v.as_tensor()).expect("a gradient");
                            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|f| f.to_bits()).collect())
                        })
                        .collect()
                };
                assert_eq!(
                    bits(Activations::Keep)?,
                    bits(Activations::Recompute)?,
                    "{act:?} {targets} {frozen}: kept vs recomputed"
                );
            }
        }
    }
    Ok(())
}
