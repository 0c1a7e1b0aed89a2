//! Criterion benches: forward + backward of the reference model (issue 7's workload: Llama,
//! vocab 512, hidden 256, intermediate 688, 4 layers, 8 heads, 4 kv heads, untied, 16 x 128
//! tokens, f32), and the chunked log-prob path at a Gemma-sized vocabulary (262,144) on
//! 1 x 512 positions (full logits would be 512 MiB; each chunk of 128 holds 128 MiB).
//!
//! `cargo bench -p slime-models --bench step`

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use slime_models::{CausalLm, LlamaConfig};

fn reference_step(c: &mut Criterion) {
    let mut cfg = LlamaConfig::tiny(512, 256, 688, 4, 8, 4);
    cfg.tie_word_embeddings = false;
    cfg.max_position_embeddings = 2048;
    let lm = CausalLm::random(&cfg, 0, &Device::Cpu).expect("model");
    let ids: Vec<u32> = (0..16 * 128).map(|i| ((i * 7919 + 13) % 512) as u32).collect();
    let ids = Tensor::from_vec(ids, (16, 128), &Device::Cpu).expect("ids");
    let mask = Tensor::ones((16, 128), DType::U8, &Device::Cpu).expect("mask");
    let mut group = c.benchmark_group("reference");
    group.sample_size(10);
    group.bench_function("forward_backward_16x128", |b| {
        b.iter(|| {
            let logps = lm.model().token_logps(&ids, Some(&mask), 128).expect("logps");
            logps.sum_all().expect("sum").backward().expect("backward")
        })
    });
    group.finish();
}

fn logps_memory(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (batch, seq, hidden, vocab) = (1, 512, 64, 262_144);
    let h = Tensor::randn(0f32, 1.0, (batch, seq, hidden), &dev).expect("hidden");
    let w = Tensor::randn(0f32, 0.02, (vocab, hidden), &dev).expect("lm_head");
    let ids: Vec<u32> = (0..batch * seq).map(|i| ((i * 104_729) % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev).expect("ids");
    let mut group = c.benchmark_group("logps");
    group.sample_size(10);
    group.bench_function("1x512_vocab262144_chunk128", |b| {
        b.iter(|| slime_models::logps::chunked_token_logps(&h, &w, &ids, 128).expect("logps"))
    });
    group.finish();
}

criterion_group!(benches, reference_step, logps_memory);
criterion_main!(benches);
