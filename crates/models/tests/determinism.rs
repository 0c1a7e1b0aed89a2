//! Same weights and batch give bit-identical log-probs and gradients on every backward pass,
//! also on a multi-threaded pool: no reduction may follow rayon's work-stealing order. (The
//! RMSNorm weight gradient once did, and training runs drifted apart after a few steps.)

use candle_core::{Device, Tensor};
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, Result};

/// Log-probs and every trainable variable's (name, gradient), in `trainable_vars` order.
type Pass = (Vec<f32>, Vec<(String, Vec<f32>)>);

/// One forward and backward pass.
fn logps_and_grads(lm: &CausalLm, ids: &Tensor, mask: &Tensor) -> Result<Pass> {
    let logps = lm.model().token_logps(ids, Some(mask), 128)?;
    let grads = logps.sum_all()?.backward()?;
    let mut out = Vec::new();
    for (name, var) in lm.trainable_vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        out.push((name, g.flatten_all()?.to_vec1()?));
    }
    Ok((logps.flatten_all()?.to_vec1()?, out))
}

fn assert_repeatable(lm: &CausalLm, what: &str) -> Result<()> {
    let (rows, cols) = (32usize, 40usize);
    let ids: Vec<u32> = (0..rows * cols).map(|i| ((i * 7919 + 13) % 60) as u32).collect();
    let ids = Tensor::from_vec(ids, (rows, cols), &Device::Cpu)?;
    // Right padding of different lengths, as in a real batch.
    let mask: Vec<u8> = (0..rows * cols).map(|i| u8::from(i % cols < 30 + (i / cols) % 10)).collect();
    let mask = Tensor::from_vec(mask, (rows, cols), &Device::Cpu)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().expect("thread pool");
    pool.install(|| {
        let (logps, grads) = logps_and_grads(lm, &ids, &mask)?;
        for pass in 1..=20 {
            let (again, grads_again) = logps_and_grads(lm, &ids, &mask)?;
            assert!(again == logps, "{what}: log-probs of pass {pass} differ from pass 0");
            for ((name, g), (_, g2)) in grads.iter().zip(&grads_again) {
                assert!(g == g2, "{what}: gradient of {name} in pass {pass} differs from pass 0");
            }
        }
        Ok(())
    })
}

#[test]
fn llama_gradients_are_bit_identical_across_passes() -> Result<()> {
    let cfg = LlamaConfig::tiny(64, 32, 64, 2, 4, 2);
    assert_repeatable(&CausalLm::random(&cfg, 0, &Device::Cpu)?, "llama")
}

#[test]
fn gemma3_gradients_are_bit_identical_across_passes() -> Result<()> {
    let cfg = GemmaConfig {
        max_position_embeddings: 128,
        sliding_window: Some(16),
        ..GemmaConfig::tiny3(64, 32, 64, 2, 4, 2)
    };
    assert_repeatable(&CausalLm::random(&cfg, 0, &Device::Cpu)?, "gemma3")
}
