//! One training step's forward and backward pass as a trainer runs them, without reaching into
//! the kernels: [`DirectGrads`] (the fused blocks' weight gradients handed over outside candle's
//! graph), [`on_this_thread`] (one micro-batch per pool thread) and [`set_fused`] (the fused or
//! the portable path).

use candle_core::Tensor;
use candle_core::backprop::GradStore;

use crate::Result;
use crate::fused::WeightGrads;

/// A forward pass whose fused blocks hand their weights' gradients over directly, and its
/// backward pass: the same gradients as `loss.backward()` through candle's graph, without its
/// zero-fill-and-add per packed weight.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # use slime_models::{CausalLm, LlamaConfig};
/// # fn main() -> slime_models::Result<()> {
/// # let lm = CausalLm::random(&LlamaConfig::tiny(64, 32, 64, 2, 4, 2), 0, &Device::Cpu)?;
/// # let ids = Tensor::new(&[[1u32, 5, 9, 3]], &Device::Cpu)?;
/// use slime_models::step::DirectGrads;
/// let pass = DirectGrads::new();
/// let logps = pass.forward(|| lm.model().token_logps(&ids, None, 4))?;
/// let grads = pass.backward(&logps.sum_all()?)?;
/// assert!(lm.trainable_vars().iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct DirectGrads(WeightGrads);

impl DirectGrads {
    /// A pass with nothing collected yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` (the forward pass) so that the fused blocks it builds on this thread hand their
    /// weights' gradients to this pass.
    pub fn forward<R>(&self, f: impl FnOnce() -> R) -> R {
        self.0.scope(f)
    }

    /// `loss.backward()` with the gradients the blocks handed over merged in: every trainable
    /// variable's gradient.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.0.merge_into(&mut grads)?;
        Ok(grads)
    }
}

/// Runs `f` with the matrix products it starts kept on the calling thread, for work that already
/// runs one task per pool thread (concurrent micro-batches); the same bits either way.
pub fn on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    slime_kernels::products_on_this_thread(f)
}

/// Switches the fused CPU kernels on (the default) or off for the whole process: off, f32 CPU
/// tensors take the composed candle ops every other device takes (see
/// [`crate::fused::set_enabled`]).
pub fn set_fused(enabled: bool) {
    crate::fused::set_enabled(enabled);
}
