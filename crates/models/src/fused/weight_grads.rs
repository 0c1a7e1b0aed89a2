//! [`WeightGrads`]: the fused blocks' weight gradients handed over directly, outside candle's
//! graph.
//!
//! A block op takes its weights packed into one tensor (`cat` of the flattened weights), so
//! in candle's backward each weight's gradient passes through the packed tensor, the `cat` and
//! the flattening `reshape`, and candle's gradient store starts every one of those three
//! entries as a zero-filled tensor and adds the incoming gradient to it: three zero fills and
//! three adds over every weight of the model per backward pass; and the graph keeps the packed
//! copy alive from the forward to the backward pass. Inside [`WeightGrads::scope`], a block
//! whose weights are all trainable variables packs nothing (it reads each weight in place, and
//! the graph holds no copy) and, in its backward pass, gives each weight its slice of the packed
//! gradient (a view, no copy) here;
//! [`WeightGrads::merge_into`] then puts them into the [`GradStore`] of `loss.backward()`. The
//! merged store holds the same values as the graph path's (which adds each gradient to zero).

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::Result;
use crate::host::HostF32;

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

/// A block's weights input, and where its weights' gradients go.
pub(super) struct Packing {
    /// The op's third input: the flattened weights concatenated (`cat`), or, in direct mode, an
    /// empty tensor: the op then reads each weight in place from its variable (see [`Direct`]).
    pub(super) packed: Tensor,
    pub(super) direct: Option<Direct>,
    /// Each weight's element count, in packed order.
    pub(super) lens: Vec<usize>,
}

/// Direct mode: the collector and the weights, in packed order. The op reads the weights from
/// the variables' own storage in each pass (no packed copy: the graph holds none from the
/// forward to the backward pass, 11.6 MiB a micro-batch for the reference model); the variables
/// do not change between a step's forward and backward passes.
pub(super) struct Direct {
    sink: WeightGrads,
    weights: Vec<Tensor>,
}

impl Packing {
    /// Direct mode when a [`WeightGrads`] scope is active and every weight is a contiguous
    /// variable (no packed input); the `cat` of the weights in the graph otherwise.
    pub(super) fn new(weights: Vec<&Tensor>) -> Result<Self> {
        let direct = WeightGrads::active().filter(|_| weights.iter().all(|w| w.is_variable() && w.is_contiguous()));
        let lens = weights.iter().map(|w| w.elem_count()).collect();
        Ok(match direct {
            Some(sink) => Self {
                packed: Tensor::zeros(0, DType::F32, &Device::Cpu)?,
                direct: Some(Direct { sink, weights: weights.iter().map(|&w| w.clone()).collect() }),
                lens,
            },
            None => {
                let pieces = weights.iter().map(|w| w.flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
                Self { packed: Tensor::cat(&pieces, 0)?, direct: None, lens }
            }
        })
    }
}

/// A block's weights as the op reads them, piece by piece in packed order: slices of the packed
/// input, or (direct mode) each variable's own storage. Products with several stacked weights
/// (`[gate; up]`, `[q; k; v]`) go piece by piece in both cases, so both give the same bits.
pub(super) enum BlockWeights<'a> {
    Packed(Vec<&'a [f32]>),
    Variables(Vec<HostF32<'a>>),
}

impl<'a> BlockWeights<'a> {
    /// The weights of an op with `direct` (or the packed input `given`), of `lens` elements each.
    pub(super) fn new(direct: &'a Option<Direct>, given: &'a [f32], lens: &[usize]) -> candle_core::Result<Self> {
        let Some(d) = direct else {
            if given.len() != lens.iter().sum::<usize>() {
                candle_core::bail!("packed weights: {} elements, expected {}", given.len(), lens.iter().sum::<usize>())
            }
            let mut rest = given;
            return Ok(Self::Packed(
                lens.iter()
                    .map(|&n| {
                        let (piece, tail) = rest.split_at(n);
                        rest = tail;
                        piece
                    })
                    .collect(),
            ));
        };
        let guards =
            d.weights.iter().map(|w| HostF32::new(w, "block weight")).collect::<candle_core::Result<Vec<_>>>()?;
        if guards.iter().map(|g| g.slice().len()).ne(lens.iter().copied()) {
            candle_core::bail!("block weights: the variables' sizes changed since the forward pass")
        }
        Ok(Self::Variables(guards))
    }

    /// Weight `i` (packed order).
    pub(super) fn get(&self, i: usize) -> &[f32] {
        match self {
            Self::Packed(p) => p[i],
            Self::Variables(g) => g[i].slice(),
        }
    }

    /// Weights `range`, in order.
    pub(super) fn pieces(&self, range: std::ops::Range<usize>) -> Vec<&[f32]> {
        range.map(|i| self.get(i)).collect()
    }
}

/// The gradient for the op's packed weights input from the packed gradient `dw`: in direct mode
/// each weight gets its slice of `dw` (views into one buffer) through the collector and the
/// input gets none; otherwise `dw` in the input's shape, for candle to route.
pub(super) fn route(direct: &Option<Direct>, dw: Vec<f32>, packed: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(Direct { sink, weights, .. }) = direct else {
        return Ok(Some(Tensor::from_vec(dw, packed.shape(), &Device::Cpu)?));
    };
    let n = dw.len();
    let dw = Tensor::from_vec(dw, n, &Device::Cpu)?;
    let mut offset = 0;
    for w in weights {
        let len = w.elem_count();
        sink.push(w.clone(), dw.narrow(0, offset, len)?.reshape(w.shape())?);
        offset += len;
    }
    Ok(None)
}
