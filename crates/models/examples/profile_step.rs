//! Times forward and backward of the reference workload (issue 7) separately:
//! `cargo run --release -p slime-models --example profile_step [iters]`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use slime_models::{CausalLm, LlamaConfig};

fn main() -> slime_models::Result<()> {
    let iters: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut cfg = LlamaConfig::tiny(512, 256, 688, 4, 8, 4);
    cfg.tie_word_embeddings = false;
    cfg.max_position_embeddings = 2048;
    let lm = CausalLm::random(&cfg, 0, &Device::Cpu)?;
    let ids: Vec<u32> = (0..16 * 128).map(|i| ((i * 7919 + 13) % 512) as u32).collect();
    let ids = Tensor::from_vec(ids, (16, 128), &Device::Cpu)?;
    let mask = Tensor::ones((16, 128), DType::U8, &Device::Cpu)?;
    for i in 0..iters {
        let t0 = Instant::now();
        let logps = lm.model().token_logps(&ids, Some(&mask), 128)?;
        let loss = logps.sum_all()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        drop(grads);
        println!(
            "iter {i}: forward {:.1} ms, backward {:.1} ms",
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3
        );
    }
    Ok(())
}
