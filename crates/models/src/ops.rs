//! Differentiable building blocks. candle-nn's fused `softmax_last_dim`, `rms_norm` and
//! `rotary_emb::rope` record no backward pass, so training needs these compositions of
//! differentiable primitives, or fused custom ops with a backward ([`crate::fused`]).

use candle_core::{D, DType, Device, Tensor};

use crate::Result;

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`; the fused kernel
/// ([`crate::fused::rms_norm`]) on f32 CPU tensors, [`rms_norm_composed`] otherwise.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    crate::fused::rms_norm(x, weight, eps)
}

/// RMSNorm `x / sqrt(mean(x^2) + eps) * weight` as a composition of differentiable
/// primitives, computed in f32 (the reference the fused kernel is tested against).
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&scale)?.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// `[seq, head_dim / 2]` cos and sin tables for positions `0..seq`.
pub fn rope_tables(inv_freq: &[f64], seq: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    rope_tables_from(inv_freq, 0, seq, dtype, device)
}

/// `[n, head_dim / 2]` cos and sin tables for positions `start..start + n` (rows `start..` of
/// [`rope_tables`], bit for bit; incremental decoding).
pub fn rope_tables_from(
    inv_freq: &[f64],
    start: usize,
    n: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut angles = Vec::with_capacity(n * half);
    for pos in start..start + n {
        angles.extend(inv_freq.iter().map(|f| (pos as f64 * f) as f32));
    }
    let angles = Tensor::from_vec(angles, (n, half), device)?;
    Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
}

/// Rotary embedding in Hugging Face's `rotate_half` layout on `[batch, heads, seq, head_dim]`:
/// `x * cos + rotate_half(x) * sin`, with `rotate_half([a, b]) = [-b, a]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let a = x.narrow(D::Minus1, 0, half)?;
    let b = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// Additive attention mask `[batch, 1, seq, seq]`: 0 where query i may attend key j
/// (`j <= i` and key j is a real token), a large negative number elsewhere. A query whose
/// allowed set would be empty (a padding row with no real key before it) keeps its diagonal,
/// so softmax never sees a row of only masked entries.
pub fn attention_mask(attention: Option<&[Vec<u8>]>, batch: usize, seq: usize, device: &Device) -> Result<Tensor> {
    const MASKED: f32 = -1e30;
    let mut data = vec![0f32; batch * seq * seq];
    for b in 0..batch {
        for i in 0..seq {
            for j in 0..seq {
                let real = attention.is_none_or(|m| m[b][j] != 0);
                let allowed = j <= i && (real || i == j && attention.is_some_and(|m| (0..=i).all(|k| m[b][k] == 0)));
                if !allowed {
                    data[(b * seq + i) * seq + j] = MASKED;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (batch, 1, seq, seq), device)?)
}

/// The additive attention mask of [`attention_mask`] for `input_ids` `[batch, seq]` and an optional
/// `[batch, seq]` padding mask (1 = real token), after checking that `seq` fits the model.
pub fn input_attention_mask(input_ids: &Tensor, padding: Option<&Tensor>, max_positions: usize) -> Result<Tensor> {
    let (batch, seq) = input_ids.dims2()?;
    check_positions(seq, max_positions)?;
    let rows: Option<Vec<Vec<u8>>> = match padding {
        Some(m) => Some(m.to_dtype(DType::U8)?.to_vec2()?),
        None => None,
    };
    attention_mask(rows.as_deref(), batch, seq, input_ids.device())
}

/// An error unless `seq` positions fit a model with `max_position_embeddings = max_positions`.
pub fn check_positions(seq: usize, max_positions: usize) -> Result<()> {
    if seq > max_positions {
        return Err(crate::ModelError::Input {
            input: "input_ids",
            reason: format!("{seq} positions exceed max_position_embeddings = {max_positions}"),
        });
    }
    Ok(())
}

/// `(batch, seq)` of the fused forward pass's `input_ids`, after checking that the rotary
/// positions fit `max_positions` (branched rows, `(prefix, first)` per row, reuse positions: a
/// row's last slot is at `seq - 1 - first`) and that `attention_mask` is `[batch, seq]`.
pub(crate) fn check_fused_input(
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    branches: Option<&[(usize, usize)]>,
    max_positions: usize,
) -> Result<(usize, usize)> {
    let (batch, seq) = input_ids.dims2()?;
    let positions =
        branches.map_or(seq, |b| b.iter().map(|&(p, f)| (p + f).max(seq.saturating_sub(f))).max().unwrap_or(seq));
    check_positions(positions, max_positions)?;
    if let Some(m) = attention_mask
        && m.dims() != [batch, seq]
    {
        return Err(crate::ModelError::Input {
            input: "attention_mask",
            reason: format!("shape {:?} does not match input_ids {:?}", m.dims(), input_ids.dims()),
        });
    }
    Ok((batch, seq))
}

/// Hidden states `[batch, hidden]` at each row's last real position of `hidden` `[batch, seq,
/// hidden]` (right padding: position `sum(mask) - 1`; the last position without a mask).
pub fn last_positions(hidden: &Tensor, padding: Option<&Tensor>) -> Result<Tensor> {
    let (batch, seq, _) = hidden.dims3()?;
    let lasts: Vec<usize> = match padding {
        Some(m) => m
            .to_dtype(DType::F32)?
            .sum(D::Minus1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|n| (n as usize).clamp(1, seq) - 1)
            .collect(),
        None => vec![seq - 1; batch],
    };
    let rows = (0..batch).map(|b| hidden.get(b)?.get(lasts[b])).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Repeats key/value heads for grouped-query attention: `[b, kv, s, d] -> [b, kv * n, s, d]`.
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.broadcast_as((b, kv, n, s, d))?.reshape((b, kv * n, s, d))?)
}

/// `log_softmax` over the last dimension, differentiable: `x - (m + log sum exp(x - m))` with
/// `m` the detached row maximum.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.detach().max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The composition [`crate::fused::attention`] is equal to (and what other devices and dtypes
/// run): from `qkv [batch * seq, (heads + 2 kv_heads) * head_dim]`, rotary embeddings on q and k
/// ([`rope`]), [`repeat_kv`], scores `q k^T / sqrt(head_dim)` plus [`attention_mask`], softmax and
/// `p v`, heads concatenated: `[batch * seq, heads * head_dim]`.
pub fn attention_composed(
    qkv: &Tensor,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    inv_freq: &[f64],
    padding: Option<&Tensor>,
) -> Result<Tensor> {
    let head_dim = 2 * inv_freq.len();
    let seq = qkv.dim(0)? / batch;
    let qkv = qkv.reshape((batch, seq, (heads + 2 * kv_heads) * head_dim))?;
    let split = |start: usize, n: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(D::Minus1, start * head_dim, n * head_dim)?
            .reshape((batch, seq, n, head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (cos, sin) = rope_tables(inv_freq, seq, qkv.dtype(), qkv.device())?;
    let q = rope(&split(0, heads)?, &cos, &sin)?;
    let k = rope(&split(heads, kv_heads)?, &cos, &sin)?;
    let v = split(heads + kv_heads, kv_heads)?;
    let n = heads / kv_heads;
    let (k, v) = (repeat_kv(&k, n)?, repeat_kv(&v, n)?);
    let mask = input_attention_mask(&Tensor::zeros((batch, seq), DType::U32, qkv.device())?, padding, usize::MAX)?;
    let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
    let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((batch * seq, heads * head_dim))?)
}
