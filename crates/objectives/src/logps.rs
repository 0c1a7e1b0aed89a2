//! Log-prob inputs: per-token log-probs with masks, and per-sequence sums and counts.
//!
//! Every objective works on per-sequence statistics of completion tokens only:
//! `S(y) = sum_t l_t` and `A(y) = S(y) / |y|`. Prompt and padding positions never count:
//! masked positions are *selected away* (not multiplied by zero), so even a NaN or -inf at a
//! padding position cannot change any value or gradient.

use candle_core::{D, DType, Tensor};

use crate::numerics::working_dtype;
use crate::{ObjectiveError, Result};

/// Per-token log-probs `l_t` of a batch of sequences and the mask of the tokens that count.
#[derive(Debug, Clone)]
pub struct TokenLogps {
    /// `[batch, seq]` log-probs in the working dtype (f32, or f64 if given f64).
    logps: Tensor,
    /// `[batch, seq]` u8 mask, 1 where a completion token counts.
    mask: Tensor,
    /// `[batch]` counted tokens per sequence, in the working dtype.
    counts: Tensor,
    /// Counted tokens in the whole batch.
    total: f64,
}

impl TokenLogps {
    /// Wraps `[batch, seq]` log-probs (any float dtype) and a `[batch, seq]` mask (any dtype;
    /// non-zero = counted). Masked-out values are replaced by 0 so they can never leak.
    pub fn new(logps: &Tensor, mask: &Tensor) -> Result<Self> {
        if logps.rank() != 2 || logps.dims() != mask.dims() {
            return Err(ObjectiveError::InvalidInput {
                input: "token log-probs",
                reason: format!(
                    "expected log-probs and mask of the same [batch, seq] shape, got {:?} and {:?}",
                    logps.dims(),
                    mask.dims()
                ),
            });
        }
        let logps = logps.to_dtype(working_dtype(logps.dtype()))?;
        let mask = mask.ne(0u32)?;
        let logps = mask.where_cond(&logps, &logps.zeros_like()?)?;
        let counts = mask.to_dtype(logps.dtype())?.sum(D::Minus1)?;
        let total = counts.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        Ok(Self { logps, mask, counts, total })
    }

    /// Masked per-token log-probs (0 at positions that do not count), `[batch, seq]`.
    pub fn logps(&self) -> &Tensor {
        &self.logps
    }

    /// The u8 mask, `[batch, seq]`.
    pub fn mask(&self) -> &Tensor {
        &self.mask
    }

    /// Batch size.
    pub fn batch_size(&self) -> usize {
        self.logps.dims()[0]
    }

    /// Applies `f` to every counted token and returns the masked result (0 elsewhere).
    pub fn map_counted(&self, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mapped = f(&self.logps)?;
        Ok(self.mask.where_cond(&mapped, &mapped.zeros_like()?)?)
    }

    /// Total number of counted tokens in the batch.
    pub fn total_count(&self) -> f64 {
        self.total
    }

    /// Fraction of counted tokens with `l_t < -delta` (the collapse metric), detached.
    /// Counted on the host: one pass instead of four tensor ops.
    pub fn fraction_below(&self, delta: f64) -> Result<f64> {
        if self.total == 0.0 {
            return Ok(0.0);
        }
        let mask: Vec<u8> = self.mask.flatten_all()?.to_vec1()?;
        let flat = self.logps.flatten_all()?;
        let below = match flat.dtype() {
            DType::F64 => count_below(&flat.to_vec1::<f64>()?, &mask, -delta),
            _ => count_below(&flat.to_vec1::<f32>()?, &mask, -delta),
        };
        Ok(below as f64 / self.total)
    }
}

fn count_below<T: Copy + Into<f64>>(values: &[T], mask: &[u8], threshold: f64) -> usize {
    values.iter().zip(mask).filter(|&(&l, &m)| m != 0 && l.into() < threshold).count()
}

/// Per-sequence log-prob sum and completion-token count for one side of a batch
/// (chosen or rejected), optionally with the per-token values behind them.
#[derive(Debug, Clone)]
pub struct SequenceLogps {
    /// `[batch]` sums `S(y)`.
    sum: Tensor,
    /// `[batch]` completion-token counts `|y|` (in the working dtype).
    count: Tensor,
    tokens: Option<TokenLogps>,
}

impl SequenceLogps {
    /// From per-token log-probs and mask: `sum = sum_t mask * l_t`, `count = sum_t mask`.
    pub fn from_tokens(logps: &Tensor, mask: &Tensor) -> Result<Self> {
        let tokens = TokenLogps::new(logps, mask)?;
        let sum = tokens.logps.sum(D::Minus1)?;
        let count = tokens.counts.clone();
        Ok(Self { sum, count, tokens: Some(tokens) })
    }

    /// From precomputed `[batch]` sums and `[batch]` token counts (no per-token values:
    /// objectives that need them will report a missing input).
    pub fn from_sums(sum: &Tensor, count: &Tensor) -> Result<Self> {
        if sum.rank() != 1 || sum.dims() != count.dims() {
            return Err(ObjectiveError::InvalidInput {
                input: "sequence log-prob sums",
                reason: format!(
                    "expected sum and count of the same [batch] shape, got {:?} and {:?}",
                    sum.dims(),
                    count.dims()
                ),
            });
        }
        let sum = sum.to_dtype(working_dtype(sum.dtype()))?;
        let count = count.to_dtype(sum.dtype())?;
        Ok(Self { sum, count, tokens: None })
    }

    /// `[batch]` sums `S(y)`.
    pub fn sum(&self) -> &Tensor {
        &self.sum
    }

    /// `[batch]` token counts `|y|`.
    pub fn count(&self) -> &Tensor {
        &self.count
    }

    /// `[batch]` length-normalised log-probs `A(y) = S(y) / |y|`. Every sequence must have at
    /// least one counted token; the error names the first that has none.
    pub fn mean(&self, side: &'static str) -> Result<Tensor> {
        let counts: Vec<f64> = self.count.to_dtype(DType::F64)?.to_vec1()?;
        if let Some(i) = counts.iter().position(|&c| c < 1.0 || c.is_nan()) {
            return Err(ObjectiveError::InvalidInput {
                input: side,
                reason: format!("sequence {i} has {} completion tokens, expected at least 1", counts[i]),
            });
        }
        Ok(self.sum.div(&self.count)?)
    }

    /// The per-token values, if these statistics were built from them.
    pub fn tokens(&self) -> Option<&TokenLogps> {
        self.tokens.as_ref()
    }

    /// Batch size.
    pub fn batch_size(&self) -> usize {
        self.sum.dims()[0]
    }

    /// Pooled token mean `sum_i S_i / N` over a batch of `pairs` sequences with `N` counted
    /// tokens (what a token-averaged cross-entropy over the whole batch gives), attributed per
    /// sequence as `pairs * S_i / N`, so that `sum_i / pairs` of the result is the pooled value.
    pub(crate) fn pooled_mean_per_example(&self, side: &'static str, pairs: f64, tokens: f64) -> Result<Tensor> {
        if tokens < 1.0 || tokens.is_nan() {
            return Err(ObjectiveError::InvalidInput {
                input: side,
                reason: "the batch has no completion tokens".into(),
            });
        }
        Ok(self.sum.affine(pairs / tokens, 0.0)?)
    }
}

/// Sequence log-prob sums of the frozen reference model (detached; counts are the policy's).
#[derive(Debug, Clone)]
pub struct ReferenceLogps {
    /// `[batch]` reference sums of the chosen completions.
    pub chosen_sum: Tensor,
    /// `[batch]` reference sums of the rejected completions.
    pub rejected_sum: Tensor,
}

impl ReferenceLogps {
    /// Wraps `[batch]` reference sums; they are detached (no gradient ever reaches the reference).
    pub fn new(chosen_sum: &Tensor, rejected_sum: &Tensor) -> Result<Self> {
        let dtype = working_dtype(chosen_sum.dtype());
        Ok(Self {
            chosen_sum: chosen_sum.detach().to_dtype(dtype)?,
            rejected_sum: rejected_sum.detach().to_dtype(dtype)?,
        })
    }

    /// Both sums in `dtype` (the policy's working dtype).
    pub(crate) fn in_dtype(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((self.chosen_sum.to_dtype(dtype)?, self.rejected_sum.to_dtype(dtype)?))
    }
}

/// Sizes of the full optimisation batch, for inputs that are one micro-batch of it (gradient
/// accumulation). With them, each micro-batch's `loss` is its exact share of the full-batch loss:
/// summing `loss` (and gradients) over the micro-batches gives what one pass over the whole
/// batch would, also for terms pooled over tokens (SLIME's stabiliser, the NLL of CPO, ORPO and
/// SFT). Thresholded SFT is the exception: its kept-token count is only known per micro-batch,
/// so there the micro-batch means are averaged, weighted by pairs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchTotals {
    /// Pairs (or SFT sequences) in the full batch.
    pub pairs: usize,
    /// Counted chosen (SFT: target) tokens in the full batch.
    pub chosen_tokens: f64,
    /// Counted rejected tokens in the full batch (0 for SFT).
    pub rejected_tokens: f64,
}

/// The denominators an objective normalises by: the micro-batch's own sizes, or the full
/// batch's [`BatchTotals`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale {
    /// Pairs in this micro-batch.
    pub micro_pairs: usize,
    /// Pairs to average over.
    pub pairs: f64,
    /// Chosen tokens to pool over.
    pub chosen_tokens: f64,
    /// Rejected tokens to pool over.
    pub rejected_tokens: f64,
}

/// Everything an objective may read. Preference objectives need `rejected`; DPO-style
/// objectives also need `reference` (see [`crate::Requirements`]).
#[derive(Debug, Clone)]
pub struct ObjectiveInputs {
    /// Chosen (or, for SFT, target) completions.
    pub chosen: SequenceLogps,
    /// Rejected completions.
    pub rejected: Option<SequenceLogps>,
    /// Reference-model sums for the same pairs.
    pub reference: Option<ReferenceLogps>,
    /// Threshold for the collapse metric: fraction of rejected tokens with `l_t < -delta`.
    pub collapse_delta: f64,
    /// Full-batch sizes when these inputs are a micro-batch (see [`BatchTotals`]).
    pub batch_totals: Option<BatchTotals>,
}

/// Default collapse threshold: the SLIME paper's delta = 1.25 (token probability below ~0.29).
pub const DEFAULT_COLLAPSE_DELTA: f64 = 1.25;

impl ObjectiveInputs {
    /// Inputs for a preference objective.
    pub fn preference(chosen: SequenceLogps, rejected: SequenceLogps) -> Self {
        Self {
            chosen,
            rejected: Some(rejected),
            reference: None,
            collapse_delta: DEFAULT_COLLAPSE_DELTA,
            batch_totals: None,
        }
    }

    /// Inputs for a supervised (SFT) objective: only the target completions.
    pub fn supervised(target: SequenceLogps) -> Self {
        Self {
            chosen: target,
            rejected: None,
            reference: None,
            collapse_delta: DEFAULT_COLLAPSE_DELTA,
            batch_totals: None,
        }
    }

    /// Adds reference-model sums.
    pub fn with_reference(mut self, reference: ReferenceLogps) -> Self {
        self.reference = Some(reference);
        self
    }

    /// Marks these inputs as one micro-batch of a larger batch (gradient accumulation).
    pub fn with_batch_totals(mut self, totals: BatchTotals) -> Self {
        self.batch_totals = Some(totals);
        self
    }

    /// The normalisers for this batch (see [`BatchTotals`]); validates batch sizes first.
    pub(crate) fn scale(&self) -> Result<Scale> {
        let micro_pairs = self.validate_batch()?;
        let total =
            |s: &SequenceLogps| -> Result<f64> { Ok(s.count.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
        match self.batch_totals {
            Some(t) => {
                if t.pairs < micro_pairs || !(t.chosen_tokens >= 0.0 && t.rejected_tokens >= 0.0) {
                    return Err(ObjectiveError::InvalidInput {
                        input: "batch_totals",
                        reason: format!("{t:?} is smaller than the micro-batch of {micro_pairs} pairs"),
                    });
                }
                Ok(Scale {
                    micro_pairs,
                    pairs: t.pairs as f64,
                    chosen_tokens: t.chosen_tokens,
                    rejected_tokens: t.rejected_tokens,
                })
            }
            None => Ok(Scale {
                micro_pairs,
                pairs: micro_pairs as f64,
                chosen_tokens: total(&self.chosen)?,
                rejected_tokens: match &self.rejected {
                    Some(r) => total(r)?,
                    None => 0.0,
                },
            }),
        }
    }

    /// Sets the collapse-metric threshold.
    pub fn with_collapse_delta(mut self, delta: f64) -> Self {
        self.collapse_delta = delta;
        self
    }

    /// Checks that every present tensor has the same batch size.
    pub(crate) fn validate_batch(&self) -> Result<usize> {
        let b = self.chosen.batch_size();
        let mismatch = |what: &'static str, got: usize| ObjectiveError::InvalidInput {
            input: what,
            reason: format!("batch size {got} differs from chosen's {b}"),
        };
        if let Some(r) = self.rejected.as_ref().filter(|r| r.batch_size() != b) {
            return Err(mismatch("rejected", r.batch_size()));
        }
        if let Some(r) = &self.reference {
            for (name, t) in [("reference.chosen_sum", &r.chosen_sum), ("reference.rejected_sum", &r.rejected_sum)] {
                if t.dims() != [b] {
                    return Err(ObjectiveError::InvalidInput {
                        input: name,
                        reason: format!("expected shape [{b}], got {:?}", t.dims()),
                    });
                }
            }
        }
        if b == 0 {
            return Err(ObjectiveError::InvalidInput { input: "chosen", reason: "empty batch".into() });
        }
        Ok(b)
    }

    pub(crate) fn require_rejected(&self, objective: &'static str) -> Result<&SequenceLogps> {
        self.rejected.as_ref().ok_or(ObjectiveError::MissingInput { objective, input: "rejected log-probs" })
    }

    pub(crate) fn require_reference(&self, objective: &'static str) -> Result<&ReferenceLogps> {
        self.reference.as_ref().ok_or(ObjectiveError::MissingInput { objective, input: "reference log-probs" })
    }
}
