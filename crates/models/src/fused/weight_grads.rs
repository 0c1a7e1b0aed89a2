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
    /// blocks it builds on this thread, when all their trainable weights are variables
    /// (`Tensor::is_variable`: full fine-tuning's weights, LoRA's `A` and `B`; frozen weights get
    /// no gradient at all), send those weights' gradients here in the backward pass instead of
    /// through the graph. Blocks
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
///
/// Each weight ("piece", in packed order) either trains (it is part of a graph:
/// `Tensor::track_op`) or is frozen (a constant, e.g. a LoRA base weight). Frozen pieces are read
/// in place by the op and get no gradient: no product, no buffer. Trainable ones are packed into
/// the op's third input (`cat`), or, in direct mode, read in place as well with their gradients
/// handed to the collector.
pub(super) struct Packing {
    /// The op's third input: the trainable pieces flattened and concatenated (`cat`), or an
    /// empty tensor when none is packed (direct mode, or nothing trains).
    pub(super) packed: Tensor,
    pub(super) layout: WeightLayout,
}

/// Where a block reads each of its weights and which of them get gradients.
pub(super) struct WeightLayout {
    /// Each piece's element count, in packed order.
    pub(super) lens: Vec<usize>,
    /// Per piece: the tensor read in place (frozen pieces, and every piece in direct mode), or
    /// `None` for a piece in the packed input.
    in_place: Vec<Option<Tensor>>,
    /// Per piece: where its gradient starts in the block's gradient buffer, which holds the
    /// trainable pieces only, in order; `None` for a frozen piece.
    grad_offset: Vec<Option<usize>>,
    /// Direct mode: the collector that takes the trainable pieces' gradients.
    sink: Option<WeightGrads>,
}

impl Packing {
    /// Direct mode when a [`WeightGrads`] scope is active, every trainable piece is a contiguous
    /// variable and `recorded` (the op's other inputs are part of a graph, so candle records the
    /// op without a packed input: a LoRA model's first block, after a frozen embedding, needs its
    /// packed adapters for that); otherwise the `cat` of the trainable pieces in the graph.
    /// Frozen pieces are read in place either way.
    pub(super) fn new(weights: Vec<&Tensor>, recorded: bool) -> Result<Self> {
        let trains: Vec<bool> = weights.iter().map(|w| w.track_op()).collect();
        let direct = WeightGrads::active().filter(|_| {
            recorded
                && weights.iter().zip(&trains).filter(|(_, t)| **t).all(|(w, _)| w.is_variable() && w.is_contiguous())
        });
        let lens: Vec<usize> = weights.iter().map(|w| w.elem_count()).collect();
        let mut next = 0;
        let grad_offset = lens
            .iter()
            .zip(&trains)
            .map(|(&n, &t)| {
                t.then(|| {
                    next += n;
                    next - n
                })
            })
            .collect();
        let mut in_place = Vec::with_capacity(weights.len());
        let mut pieces = Vec::new();
        for (w, &t) in weights.iter().zip(&trains) {
            if t && direct.is_none() {
                pieces.push(w.flatten_all()?);
                in_place.push(None);
            } else if w.is_contiguous() {
                in_place.push(Some((*w).clone()))
            } else {
                // A frozen strided view: one contiguous copy, outside any graph.
                in_place.push(Some(w.contiguous()?))
            }
        }
        let packed =
            if pieces.is_empty() { Tensor::zeros(0, DType::F32, &Device::Cpu)? } else { Tensor::cat(&pieces, 0)? };
        Ok(Self { packed, layout: WeightLayout { lens, in_place, grad_offset, sink: direct } })
    }
}

impl WeightLayout {
    /// Whether piece `i` gets a gradient.
    pub(super) fn trains(&self, i: usize) -> bool {
        self.grad_offset[i].is_some()
    }

    /// Elements of the trainable pieces' gradients together.
    fn grad_len(&self) -> usize {
        self.lens.iter().zip(&self.grad_offset).filter(|(_, o)| o.is_some()).map(|(n, _)| n).sum()
    }
}

/// A block's weights as the op reads them, piece by piece in packed order: slices of the packed
/// input, or each tensor's own storage (frozen pieces; every piece in direct mode). Products with
/// several stacked weights (`[gate; up]`, `[q; k; v]`) go piece by piece in every case, so all
/// give the same bits.
pub(super) struct BlockWeights<'a> {
    in_place: Vec<Option<HostF32<'a>>>,
    packed: Vec<&'a [f32]>,
}

impl<'a> BlockWeights<'a> {
    /// The weights of an op with `layout`, the packed input being `given`.
    pub(super) fn new(layout: &'a WeightLayout, given: &'a [f32]) -> candle_core::Result<Self> {
        let packed_len: usize =
            layout.lens.iter().zip(&layout.in_place).filter(|(_, p)| p.is_none()).map(|(n, _)| n).sum();
        if given.len() != packed_len {
            candle_core::bail!("packed weights: {} elements, expected {packed_len}", given.len())
        }
        let mut rest = given;
        let mut in_place = Vec::with_capacity(layout.lens.len());
        let mut packed = Vec::with_capacity(layout.lens.len());
        for (&n, t) in layout.lens.iter().zip(&layout.in_place) {
            match t {
                Some(t) => {
                    let g = HostF32::new(t, "block weight")?;
                    if g.slice().len() != n {
                        candle_core::bail!("block weights: a weight's size changed since the forward pass")
                    }
                    in_place.push(Some(g));
                    packed.push(&[][..]);
                }
                None => {
                    let (piece, tail) = rest.split_at(n);
                    rest = tail;
                    in_place.push(None);
                    packed.push(piece);
                }
            }
        }
        Ok(Self { in_place, packed })
    }

    /// Weight `i` (packed order).
    pub(super) fn get(&self, i: usize) -> &[f32] {
        match &self.in_place[i] {
            Some(g) => g.slice(),
            None => self.packed[i],
        }
    }

    /// Weights `range`, in order.
    pub(super) fn pieces(&self, range: std::ops::Range<usize>) -> Vec<&[f32]> {
        range.map(|i| self.get(i)).collect()
    }
}

/// The gradients of a block's trainable pieces, in packed order, in one buffer that products
/// write into directly (no zero fill: each piece's region is written whole by its first product
/// or copy, see [`Self::ptr`]).
pub(super) struct GradBuf<'a> {
    layout: &'a WeightLayout,
    buf: Vec<f32>,
    /// Per piece: whether its region was handed out for writing.
    written: Vec<bool>,
}

impl<'a> GradBuf<'a> {
    pub(super) fn new(layout: &'a WeightLayout) -> Self {
        Self { layout, buf: Vec::with_capacity(layout.grad_len()), written: vec![false; layout.lens.len()] }
    }

    /// Where piece `i`'s gradient goes (`lens[i]` floats), or `None` when it does not train.
    /// The caller writes the whole region (a product with `accumulate = false` first) before
    /// [`Self::finish`].
    pub(super) fn ptr(&mut self, i: usize) -> Option<*mut f32> {
        let offset = self.layout.grad_offset[i]?;
        self.written[i] = true;
        // SAFETY: `offset + lens[i] <= capacity` (the offsets partition the buffer).
        Some(unsafe { self.buf.as_mut_ptr().add(offset) })
    }

    /// Copies `grad` into piece `i`'s region when it trains.
    pub(super) fn put(&mut self, i: usize, grad: &[f32]) {
        let n = self.layout.lens[i];
        assert_eq!(grad.len(), n, "gradient of block weight {i}");
        if let Some(p) = self.ptr(i) {
            // SAFETY: the region holds `n` floats (see `ptr`); `grad` does not alias it.
            unsafe { std::ptr::copy_nonoverlapping(grad.as_ptr(), p, n) };
        }
    }

    /// The gradient buffer, every trainable piece's region initialised: one that was never
    /// handed out (an op not computing it) is zeroed rather than left unwritten.
    pub(super) fn finish(mut self) -> Vec<f32> {
        let layout = self.layout;
        for (i, &n) in layout.lens.iter().enumerate() {
            if let (Some(offset), false) = (layout.grad_offset[i], self.written[i]) {
                // SAFETY: the region lies within the capacity (see `ptr`).
                unsafe { std::ptr::write_bytes(self.buf.as_mut_ptr().add(offset), 0, n) };
            }
        }
        // SAFETY: every region of the buffer was written, by the op (see `ptr`) or just above.
        unsafe { self.buf.set_len(layout.grad_len()) };
        self.buf
    }
}

/// The gradient for the op's packed weights input from the trainable pieces' gradient `dw`: in
/// direct mode each trainable piece gets its slice of `dw` (views into one buffer) through the
/// collector and the input gets none; otherwise `dw` in the input's shape, for candle to route
/// (none when nothing is packed).
pub(super) fn route(layout: &WeightLayout, dw: Vec<f32>, packed: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(sink) = &layout.sink else {
        if packed.elem_count() == 0 {
            return Ok(None);
        }
        return Ok(Some(Tensor::from_vec(dw, packed.shape(), &Device::Cpu)?));
    };
    let n = dw.len();
    let dw = Tensor::from_vec(dw, n, &Device::Cpu)?;
    for (w, offset) in layout.in_place.iter().zip(&layout.grad_offset) {
        if let (Some(w), Some(offset)) = (w, offset) {
            sink.push(w.clone(), dw.narrow(0, *offset, w.elem_count())?.reshape(w.shape())?);
        }
    }
    Ok(None)
}
