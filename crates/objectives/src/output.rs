//! What an objective returns: the loss to differentiate and detached metrics.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::Result;

/// Detached scalar metrics keyed by name (TRL's names where TRL has one, e.g. `rewards/margins`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`.
    pub fn insert(&mut self, name: impl Into<String>, value: f64) {
        self.0.insert(name.into(), value);
    }

    /// Sets `name` to the mean of a tensor's elements (detached, read in f64).
    pub fn insert_mean(&mut self, name: impl Into<String>, values: &Tensor) -> Result<()> {
        let mean = values.detach().to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
        self.insert(name, mean);
        Ok(())
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    /// Iterates over `(name, value)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Number of metrics.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no metrics.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The result of evaluating an objective on a batch.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Scalar batch loss to call `backward` on (f32, or f64 for f64 inputs).
    pub loss: Tensor,
    /// `[batch]` per-example losses; `loss = sum(per_example) / pairs`, where `pairs` is the
    /// batch size (or [`crate::BatchTotals::pairs`] for a micro-batch), so without accumulation
    /// `loss` is their mean. Terms pooled over the tokens of the whole batch (SLIME's
    /// stabiliser, the NLL of CPO/ORPO/SFT) are attributed to each example in proportion to its
    /// own tokens' share, so the sum is still exact.
    pub per_example: Tensor,
    /// Detached metrics: `loss`, each loss term, rewards, log-probs, collapse; means over this
    /// (micro-)batch.
    pub metrics: Metrics,
}

impl LossOutput {
    /// Builds the output from per-example losses: `loss = sum(per_example) / pairs`, and
    /// records the `loss` metric as the mean of `per_example` over this batch, like every other
    /// metric. Under gradient accumulation, metrics averaged over micro-batches weighted by their
    /// pairs give the full batch's values.
    pub(crate) fn from_per_example(per_example: Tensor, pairs: f64, mut metrics: Metrics) -> Result<Self> {
        let loss = (per_example.sum_all()? / pairs)?;
        metrics.insert_mean(crate::metrics::LOSS, &per_example)?;
        Ok(Self { loss, per_example, metrics })
    }
}
