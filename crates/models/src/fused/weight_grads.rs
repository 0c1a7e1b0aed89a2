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
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use slime_kernels::{MatMut, MatRef, Threads, matmul, product};

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

/// The gradients of a block's trainable pieces, as products write them: each in a buffer of its
/// own, or several consecutive pieces in one (a stacked product such as `d[q|k|v]^T x`), the
/// first product allocating it (no zero fill) and later ones adding to it.
pub(super) struct GradBuf<'a> {
    layout: &'a WeightLayout,
    /// Buffers holding consecutive trainable pieces: `(first piece, floats)`.
    segments: Vec<(usize, Vec<f32>)>,
    /// Per piece: `(segment, offset in it)` once written.
    at: Vec<Option<(usize, usize)>>,
}

impl<'a> GradBuf<'a> {
    pub(super) fn new(layout: &'a WeightLayout) -> Self {
        Self { layout, segments: Vec::new(), at: vec![None; layout.lens.len()] }
    }

    /// Whether all of pieces `range` train.
    fn trains(&self, range: &Range<usize>) -> bool {
        range.clone().all(|i| self.layout.trains(i))
    }

    /// Sets the gradient of pieces `range` (consecutive, each trainable, none set before) to
    /// `grad`, their floats in order.
    fn set(&mut self, range: Range<usize>, grad: Vec<f32>) {
        let lens = &self.layout.lens[range.clone()];
        assert_eq!(grad.len(), lens.iter().sum::<usize>(), "gradient of block weights {range:?}");
        let mut offset = 0;
        for (i, n) in range.clone().zip(lens) {
            assert!(self.at[i].is_none(), "gradient of block weight {i} set twice");
            self.at[i] = Some((self.segments.len(), offset));
            offset += n;
        }
        self.segments.push((range.start, grad));
    }

    /// The gradient of pieces `range`, consecutive in one buffer (set together before).
    fn get_mut(&mut self, range: Range<usize>) -> &mut [f32] {
        let (seg, offset) = self.at[range.start].expect("gradient written before it is added to");
        let len: usize = self.layout.lens[range.clone()].iter().sum();
        assert!(range.clone().all(|i| self.at[i].is_some_and(|(s, _)| s == seg)), "pieces {range:?} not stacked");
        &mut self.segments[seg].1[offset..offset + len]
    }

    /// When pieces `range` (consecutive; together `dst_rows x dst_cols`, row-major) train: their
    /// gradient `a b`, written (`accumulate` false: the first product for them) or added.
    pub(super) fn product(&mut self, range: Range<usize>, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>) {
        if !self.trains(&range) {
            return;
        }
        if accumulate {
            let (rows, cols) = (a.rows(), b.cols());
            matmul(MatMut::row_major(self.get_mut(range), rows, cols), a, b, true, Threads::Pool);
        } else {
            self.set(range, product(a, b, Threads::Pool));
        }
    }

    /// Copies `grad` in as piece `i`'s gradient when it trains.
    pub(super) fn put(&mut self, i: usize, grad: &[f32]) {
        if self.layout.trains(i) {
            self.set(i..i + 1, grad.to_vec());
        }
    }

    /// The trainable pieces' gradients; a piece no product wrote (an op not computing it) gets
    /// zeros.
    pub(super) fn finish(mut self) -> BlockGrads {
        let layout = self.layout;
        for (i, &n) in layout.lens.iter().enumerate() {
            if layout.trains(i) && self.at[i].is_none() {
                self.set(i..i + 1, vec![0.0; n]);
            }
        }
        BlockGrads { segments: self.segments, at: self.at }
    }
}

/// A block's weight gradients ([`GradBuf::finish`]): every trainable piece's, in buffers of one
/// or more consecutive pieces.
pub(super) struct BlockGrads {
    segments: Vec<(usize, Vec<f32>)>,
    at: Vec<Option<(usize, usize)>>,
}

impl BlockGrads {
    /// The trainable pieces' gradients in packed order, in one buffer (without a copy when one
    /// segment holds them all).
    fn concat(mut self, layout: &WeightLayout) -> Vec<f32> {
        self.segments.sort_by_key(|(first, _)| *first);
        if self.segments.len() == 1 {
            return self.segments.pop().map(|(_, v)| v).unwrap_or_default();
        }
        let mut out = Vec::with_capacity(layout.grad_len());
        self.segments.into_iter().for_each(|(_, v)| out.extend_from_slice(&v));
        out
    }
}

/// The gradient for the op's packed weights input from the trainable pieces' gradients `dw`: in
/// direct mode each trainable piece gets its slice of its buffer (a view, no copy) through the
/// collector and the input gets none; otherwise the gradients in the input's shape, for candle
/// to route (none when nothing is packed).
pub(super) fn route(layout: &WeightLayout, dw: BlockGrads, packed: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(sink) = &layout.sink else {
        if packed.elem_count() == 0 {
            return Ok(None);
        }
        return Ok(Some(Tensor::from_vec(dw.concat(layout), packed.shape(), &Device::Cpu)?));
    };
    let BlockGrads { segments, at } = dw;
    let tensors = segments
        .into_iter()
        .map(|(_, v)| {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    for (w, at) in layout.in_place.iter().zip(&at) {
        if let (Some(w), Some((seg, offset))) = (w, at) {
            sink.push(w.clone(), tensors[*seg].narrow(0, *offset, w.elem_count())?.reshape(w.shape())?);
        }
    }
    Ok(None)
}
