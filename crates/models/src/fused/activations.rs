//! What the fused blocks keep for their backward passes: the [`Activations`] policy, the
//! [`ActivationMeter`] and the saved buffers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

// ---------------------------------------------------------------------------------------------
// Whole blocks: one op per half-layer, so no intermediate activation or its gradient goes
// through candle's graph (no zero-filled gradient buffers, no accumulation passes).

/// What a fused block keeps from its forward pass for its backward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// Keep the block's intermediate activations (attention: q|k|v and the attention output,
    /// 3 x hidden floats a position at 4 kv heads of 8; MLP: gate|up, 2 x intermediate floats a
    /// position) until the backward pass frees them. The default: fastest.
    #[default]
    Keep,
    /// Keep only the block's inputs and recompute the rest in the backward pass (gradient
    /// checkpointing): the block's forward products run twice, about a third more FLOPs for a
    /// Llama layer, and its activation memory drops to the residual stream.
    Recompute,
}

/// Bytes of activations that fused blocks hold for their backward passes: now, and the most at
/// once since the meter was made or its peak reset. A model owns one
/// ([`crate::Llama::activation_meter`]); a forward pass adds what each block keeps, the backward
/// pass (or dropping the graph) subtracts it, so after `backward()` the count is back to zero and
/// the peak is the activation memory of one step (the residual stream between blocks and
/// candle's own tensors not included).
#[derive(Debug, Default)]
pub struct ActivationMeter {
    held: AtomicUsize,
    peak: AtomicUsize,
}

impl ActivationMeter {
    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since the meter was made or [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak from what is held now.
    pub fn reset_peak(&self) {
        self.peak.store(self.held_bytes(), Ordering::Relaxed);
    }

    fn add(&self, bytes: usize) {
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The activations a block saved in its forward pass ([`Activations::Keep`]); the first backward
/// pass takes (frees) them, and a backward pass that finds none recomputes them from the inputs
/// (a graph differentiated twice, or [`Activations::Recompute`]). What it holds is counted on
/// its meter.
pub(super) struct Saved {
    pub(super) policy: Activations,
    meter: Option<Arc<ActivationMeter>>,
    slot: std::sync::Mutex<Option<Pair>>,
}

/// A block's saved activation buffers (attention: its start, its output and its probabilities;
/// MLP: gate|up and the output before a post-norm, nothing third).
type Pair = (Vec<f32>, Vec<f32>, Vec<f32>);

fn pair_bytes((a, b, c): &Pair) -> usize {
    (a.len() + b.len() + c.len()) * std::mem::size_of::<f32>()
}

impl Saved {
    pub(super) fn new(policy: Activations, meter: Option<&Arc<ActivationMeter>>) -> Self {
        Self { policy, meter: meter.cloned(), slot: std::sync::Mutex::new(None) }
    }

    /// Stores `acts` unless the policy is to recompute them.
    pub(super) fn put(&self, acts: Pair) -> candle_core::Result<()> {
        if self.policy == Activations::Keep {
            if let Some(m) = &self.meter {
                m.add(pair_bytes(&acts));
            }
            *self.lock()? = Some(acts);
        }
        Ok(())
    }

    /// The saved activations, or `recompute()`'s.
    pub(super) fn take_or(&self, recompute: impl FnOnce() -> candle_core::Result<Pair>) -> candle_core::Result<Pair> {
        let taken = self.lock()?.take();
        match taken {
            Some(acts) => {
                self.uncount(&acts);
                Ok(acts)
            }
            None => recompute(),
        }
    }

    fn uncount(&self, acts: &Pair) {
        if let Some(m) = &self.meter {
            m.sub(pair_bytes(acts));
        }
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<Pair>>> {
        self.slot.lock().map_err(|_| candle_core::Error::Msg("fused block: saved activations poisoned".into()))
    }
}

impl Drop for Saved {
    /// A graph dropped without a backward pass frees what its blocks kept.
    fn drop(&mut self) {
        if let Ok(Some(acts)) = self.slot.get_mut().map(Option::take) {
            self.uncount(&acts);
        }
    }
}
