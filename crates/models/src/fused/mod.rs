//! Fused CPU kernels with a real backward pass (candle `CustomOp`s), each equal to the
//! straightforward differentiable composition in [`crate::ops`] within float rounding
//! (tested in `tests/fused.rs`, values and gradients within 1e-5).
//!
//! | kernel | replaces | saved activations |
//! |---|---|---|
//! | [`rms_norm`] | `x / sqrt(mean(x^2) + eps) * w` (7 ops) | `x` |
//! | [`linear`] | `x.matmul(w.t())` with 2-D gradients (no batched weight-gradient sum) | `x` |
//! | [`norm_linear`] | `rms_norm(x, w_n).matmul(w.t())` | `x` (the normalised rows are recomputed) |
//! | [`attention`] | rope + repeat_kv + `q k^T / sqrt(d)` + mask + softmax + `p v`; per [`AttentionSpec`] also another scale, soft-capped scores `cap * tanh(s / cap)` and a sliding window (Gemma) | `q, k, v` (scores are recomputed, flash-style) |
//! | [`linear_residual`] | `x + a.matmul(w.t())` | `x, a` |
//! | [`swiglu_down_residual`] | `x + (silu(gate) * up).matmul(w.t())` | `x, [gate, up]` (the product is recomputed) |
//! | [`log_softmax_gather`] | `log_softmax(x).gather(labels)` | `x` |
//! | [`attention_block`] | `x + attention(rms_norm(x) [W_q \| W_k \| W_v]^T (+ b_qkv), per-head q/k RMSNorm) W_o^T (+ b_o)`: a Llama layer's attention half, Qwen2's q/k/v biases and Qwen3's q/k norm and optional q/k/v/o biases ([`AttentionExtras`]); with a post-norm `x + rms_norm(o, w_post)` and the spec's scale, soft-capping and window, a Gemma 1/2/3 layer's attention half | `x`, and with [`Activations::Keep`] the rotated `q\|k\|v` head-major ([`AttentionSpec`]'s one pass over the rows; with Qwen3's q/k norm, `q\|k\|v` after the bias and before the norm) and the attention output (the normalised rows, the normalised q/k heads, the scores and the projection before a post-norm are recomputed) |
//! | [`mlp_block`] | `x + (silu(g) * u) W_down^T` with `[g \| u] = rms_norm(x) [W_gate \| W_up]^T` | `x`, and with [`Activations::Keep`] `g\|u` |
//! | [`mlp_block_with`] | [`mlp_block`] with GeGLU `gelu_tanh(g) * u` ([`Glu`]) and an optional post-norm `x + rms_norm(m, w_post)` of the MLP output `m` ([`MlpExtras`]): Gemma 1's MLP half, and Gemma 2/3's with its post-feedforward norm (the `(1 + w)` norms given as effective weights) | `x`, and with [`Activations::Keep`] `g\|u` and, with a post-norm, `m` |
//!
//! Both blocks take LoRA adapters on their projections ([`LowRank`], in [`AttentionExtras`] and
//! [`MlpExtras`]): `y = x W^T + s (x A^T) B^T`, with `dA`, `dB` and the adapter's part of `dx`
//! from `r`-wide products. A block computes gradients only for what is part of a graph: a frozen
//! weight (LoRA's base, norms and biases) gets no product and no buffer, and a block whose input
//! is constant (the first layer's, after a frozen embedding) no input gradient.
//!
//! Inside a [`WeightGrads`] scope, a block whose trainable weights are all variables gives their gradients
//! to the scope's collector instead of through candle's graph (merged into the `GradStore`
//! afterwards: the same values, without candle's zero-filled entry and add for the packed
//! tensor, the `cat` and the `reshape` of every weight).
//!
//! Matrix products and the vectorised row math are `slime_kernels`' safe API on strided slice
//! views (`MatRef`, `MatMut`: AVX-512F register tiles or the `gemm` crate, picked there), so heads
//! are read straight out of `[tokens, heads * head_dim]` activations; parallel tasks write
//! disjoint chunks of their outputs (`par_chunks_mut`, split slices), and this module holds no
//! `unsafe` code. Row-wise work runs on rayon's pool (`RAYON_NUM_THREADS`). The kernels run on
//! f32 CPU tensors while [`enabled`]; every public function falls back to the composition on any
//! other device or dtype, so the `cuda` feature keeps working.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Shape, Tensor};

mod activations;
mod attention_kernel;
mod block_attention;
mod block_mlp;
mod low_rank;
mod projections;
mod rows;
mod weight_grads;

pub use activations::{ActivationMeter, Activations};
pub use attention_kernel::{AttentionSpec, KEPT_PROBS_BYTES, attention, kept_probability_floats};
pub use block_attention::{AttentionExtras, attention_block};
pub use block_mlp::{Glu, MlpExtras, mlp_block, mlp_block_with};
pub use low_rank::LowRank;
pub use projections::{linear, linear_residual, norm_linear, swiglu_down_residual};
pub use rows::{log_softmax_gather, rms_norm};
pub use weight_grads::WeightGrads;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches the fused kernels on (the default) or off for the whole process. Off, f32 CPU
/// tensors take the composed candle ops that every other device and dtype takes (the portable
/// path), so that path can be run and compared on a machine without a GPU.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether the fused kernels are switched on (see [`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the fused kernels can run on these tensors (switched on, f32 on the CPU).
pub fn fusable(ts: &[&Tensor]) -> bool {
    enabled() && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn cpu(v: Vec<f32>, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}
