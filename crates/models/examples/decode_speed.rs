//! Decoding speed with and without the key/value cache:
//! `cargo run --release -p slime-models --example decode_speed [prompt new]`.
//! The model is the reference workload's Llama (vocab 512, hidden 256, 4 layers, 8 heads, 4
//! key/value heads); "uncached" re-runs the whole prefix for every new token (the path before the
//! cache). Both must produce the same tokens.

use std::time::Instant;

use candle_core::{D, Device, Tensor};
use slime_models::{CausalLm, LlamaConfig};

fn main() -> slime_models::Result<()> {
    let nums: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (prompt_len, new) = (nums.first().copied().unwrap_or(64), nums.get(1).copied().unwrap_or(64));
    let lm = CausalLm::random(&LlamaConfig::bench_reference(), 0, &Device::Cpu)?;
    let prompt: Vec<u32> = (0..prompt_len).map(|i| ((i * 7919 + 13) % 512) as u32).collect();
    let t = Instant::now();
    let cached = lm.model().generate_greedy(&prompt, new, &[])?;
    let cached_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut seq = prompt.clone();
    for _ in 0..new {
        let logits = lm.model().last_logits(&Tensor::new(seq.as_slice(), &Device::Cpu)?.unsqueeze(0)?, None)?;
        seq.push(logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0]);
    }
    let uncached_s = t.elapsed().as_secs_f64();
    println!(
        "prompt {prompt_len}, {new} new tokens: cached {cached_s:.3} s ({:.0} tok/s), uncached {uncached_s:.3} s ({:.0} tok/s), same tokens: {}",
        new as f64 / cached_s,
        new as f64 / uncached_s,
        cached == seq[prompt_len..]
    );
    Ok(())
}
