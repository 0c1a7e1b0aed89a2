//! Token log-probs of given labels without materialising `[batch, seq, vocab]` logits.

use candle_core::{DType, Tensor};

use crate::fused::{linear, log_softmax_gather};
use crate::{ModelError, Result};

/// `out[b, t] = log softmax(hidden[b, t-1] W^T)[ids[b, t]]` for `t >= 1`, `out[b, 0] = 0`,
/// `[batch, seq]` f32, computed over chunks of `chunk` positions: each chunk's
/// `[batch, chunk, vocab]` logits are reduced to `[batch, chunk]` before the next is formed.
pub fn chunked_token_logps(hidden: &Tensor, lm_head: &Tensor, ids: &Tensor, chunk: usize) -> Result<Tensor> {
    chunked_token_logps_capped(hidden, lm_head, ids, chunk, None)
}

/// [`chunked_token_logps`] with optional final-logit soft-capping (Gemma 2):
/// logits become `cap * tanh(logits / cap)` before the log-softmax.
pub fn chunked_token_logps_capped(
    hidden: &Tensor,
    lm_head: &Tensor,
    ids: &Tensor,
    chunk: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (batch, seq, _) = hidden.dims3()?;
    if ids.dims() != [batch, seq] {
        return Err(ModelError::Input {
            input: "input_ids",
            reason: format!("shape {:?} does not match hidden states {:?}", ids.dims(), hidden.dims()),
        });
    }
    if chunk == 0 {
        return Err(ModelError::Input { input: "chunk", reason: "must be at least 1".into() });
    }
    let device = hidden.device();
    let mut parts = vec![Tensor::zeros((batch, 1), DType::F32, device)?];
    let mut start = 1;
    while start < seq {
        let len = chunk.min(seq - start);
        let h = hidden.narrow(1, start - 1, len)?.contiguous()?.reshape((batch * len, ()))?;
        let mut logits = linear(&h, lm_head)?.to_dtype(DType::F32)?;
        if let Some(cap) = softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        let labels = ids.narrow(1, start, len)?.contiguous()?.flatten_all()?;
        let picked = log_softmax_gather(&logits, &labels)?;
        parts.push(picked.reshape((batch, len))?);
        start += len;
    }
    Ok(Tensor::cat(&parts, 1)?)
}
