//! [`WeightGrads`]: the fused blocks' weight gradients handed over directly, outside candle's
//! graph.
//!
//! A block op takes its weights packed into one tensor (`cat` of the flattened weights), so
//! in candle's backward each weight's gradient passes through the packed tensor, the `cat` and
//! the flattening `reshape`, and candle's gradient store starts every one of those three
//! entries as a zero-filled tensor and adds the incoming gradient to it: three zero fills and
//! three adds over every weight of the model per backward pass. Inside [`WeightGrads::scope`],
//! a block whose weights are all trainable variables packs detached copies instead and, in its
//! backward pass, gives each weight its slice of the packed gradient (a view, no copy) here;
//! [`WeightGrads::merge_into`] then puts them into the [`GradStore`] of `loss.backward()`. The
//! merged store holds the same values as the graph path's (which adds each gradient to zero).

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use candle_core::backprop::GradStore;

use crate::Result;

thread_local! {
    /// The collector of the innermost [`WeightGrads::scope`] running on this thread.
    static ACTIVE: RefCell<Option<WeightGrads>> = const { RefCell::new(None) };
}

/// A collector of weight gradients from the fused blocks (see the module docs). Cloning shares
/// the collector.
///
/// ```no_run
/// # fn demo(model: &slime_models::Model, ids: &candle_core::Tensor) -> slime_models::Result<()> {
/// use slime_models::fused::WeightGrads;
/// let direct = WeightGrads::new();
/// let logps = direct.scope(|| model.token_logps(ids, None, 64))?;
/// let mut grads = logps.sum_all()?.backward()?;
/// direct.merge_into(&mut grads)?; // `grads` now has every weight's gradient
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct WeightGrads(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

/// Puts the previous collector back when a scope ends (also on a panic).
struct Restore(Option<WeightGrads>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        ACTIVE.with(|a| *a.borrow_mut() = previous);
    }
}

impl WeightGrads {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` (a forward pass) with this collector active on the current thread: the fused
    /// blocks it builds on this thread, when all their weights are trainable variables
    /// (`Tensor::is_variable`, as full fine-tuning's are; LoRA's frozen bases are not), send
    /// those weights' gradients here in the backward pass instead of through the graph. Blocks
    /// built outside a scope, or on other threads, use the graph as usual. Scopes nest.
    pub fn scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let previous = ACTIVE.with(|a| a.borrow_mut().replace(self.clone()));
        let _restore = Restore(previous);
        f()
    }

    /// The collector of the scope running on this thread, if any.
    pub(super) fn active() -> Option<Self> {
        ACTIVE.with(|a| a.borrow().clone())
    }

    /// Records `grad` as (a part of) the gradient of the variable `weight`.
    pub(super) fn push(&self, weight: Tensor, grad: Tensor) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((weight, grad));
    }

    /// How many gradients are waiting to be merged.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no gradient is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves the collected gradients into `grads` (added to any gradient it already holds for
    /// the same weight), leaving the collector empty.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let collected = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for (weight, grad) in collected {
            let sum = match grads.get(&weight) {
                Some(existing) => (existing + &grad)?,
                None => grad,
            };
            grads.insert(&weight, sum);
        }
        Ok(())
    }
}

/// The weights a block packs, and where its gradients go: `direct` when a [`WeightGrads`] scope
/// is active and every weight is a variable.
pub(super) struct Packing {
    /// The flattened weights to `cat` (detached in direct mode).
    pub(super) pieces: Vec<Tensor>,
    /// In direct mode: the collector and the original weights, in packed order.
    pub(super) direct: Option<(WeightGrads, Vec<Tensor>)>,
}

impl Packing {
    pub(super) fn new(weights: Vec<&Tensor>) -> Result<Self> {
        let direct = WeightGrads::active().filter(|_| weights.iter().all(|w| w.is_variable()));
        let pieces = weights
            .iter()
            .map(|w| Ok(if direct.is_some() { w.detach().flatten_all()? } else { w.flatten_all()? }))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { pieces, direct: direct.map(|d| (d, weights.into_iter().cloned().collect())) })
    }
}

/// In direct mode, hands each weight its slice of the packed gradient `dw` (views into one
/// buffer) and returns `None` for the packed input; otherwise returns `dw` for candle to route.
pub(super) fn route(direct: &Option<(WeightGrads, Vec<Tensor>)>, dw: Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some((sink, weights)) = direct else { return Ok(Some(dw)) };
    let mut offset = 0;
    for w in weights {
        let n = w.elem_count();
        sink.push(w.clone(), dw.narrow(0, offset, n)?.reshape(w.shape())?);
        offset += n;
    }
    Ok(None)
}
