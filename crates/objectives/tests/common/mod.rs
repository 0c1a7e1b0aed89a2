//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use slime_objectives::{ObjectiveInputs, ReferenceLogps, Result, SequenceLogps};

/// `[batch, seq]` f64 log-probs, all tokens counted.
pub fn tokens(rows: &[&[f64]]) -> Result<SequenceLogps> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut values = Vec::new();
    let mut mask = Vec::new();
    for r in rows {
        for i in 0..width {
            values.push(r.get(i).copied().unwrap_or(0.0));
            mask.push(u8::from(i < r.len()));
        }
    }
    let dev = Device::Cpu;
    SequenceLogps::from_tokens(
        &Tensor::from_vec(values, (rows.len(), width), &dev)?,
        &Tensor::from_vec(mask, (rows.len(), width), &dev)?,
    )
}

/// Sums and counts only.
pub fn sums(sum: &[f64], count: &[f64]) -> Result<SequenceLogps> {
    let dev = Device::Cpu;
    SequenceLogps::from_sums(&Tensor::new(sum, &dev)?, &Tensor::new(count, &dev)?)
}

/// Preference inputs with a reference.
pub fn with_reference(inputs: ObjectiveInputs, chosen: &[f64], rejected: &[f64]) -> Result<ObjectiveInputs> {
    let dev = Device::Cpu;
    Ok(inputs.with_reference(ReferenceLogps::new(&Tensor::new(chosen, &dev)?, &Tensor::new(rejected, &dev)?)?))
}

/// The scalar loss in f64.
pub fn loss_of(out: &slime_objectives::LossOutput) -> f64 {
    out.loss.to_dtype(candle_core::DType::F64).and_then(|t| t.to_scalar::<f64>()).expect("scalar loss")
}

pub fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want} (tol {tol})");
}
