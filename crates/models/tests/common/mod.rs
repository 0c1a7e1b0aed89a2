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
