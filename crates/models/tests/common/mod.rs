//! Seeded random inputs shared by the integration tests.

use candle_core::{Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A CPU f32 tensor of `shape` drawn from N(`mean`, `std`^2), the same for the same `seed` on
/// every run (candle's CPU generator cannot be seeded: `Device::Cpu.set_seed` errors, so
/// `Tensor::randn` draws new numbers each run and a failure could not be reproduced).
pub fn randn(seed: u64, mean: f32, std: f32, shape: impl Into<Shape>) -> Tensor {
    let shape = shape.into();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            // Box-Muller (the crate's own draw in `CausalLm::random` is private, at std 0.02).
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (f64::from(mean) + f64::from(std) * z) as f32
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("as many values as the shape holds")
}

/// Gives `lm`'s biases N(0, 0.2^2) values and its norm weights N(1, 0.2^2) ones (seeds
/// `100 + i` by position in `trainable_vars`), so Qwen's biases and q/k norms change the output
/// and a kernel that drops or swaps one is caught.
#[allow(dead_code)] // not every test file that includes `common` has Qwen models
pub fn spread_biases_and_norms(lm: &slime_models::CausalLm) -> slime_models::Result<()> {
    for (i, (name, var)) in lm.trainable_vars().into_iter().enumerate() {
        if name.ends_with(".bias") {
            var.set(&randn(100 + i as u64, 0.0, 0.2, var.shape()))?;
        } else if name.contains("_norm") {
            var.set(&randn(100 + i as u64, 1.0, 0.2, var.shape()))?;
        }
    }
    Ok(())
}
