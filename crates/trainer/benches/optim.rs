//! The optimiser on the parameters of the step benchmark's reference model (Llama, vocab 512, hidden 256,
//! intermediate 688, 4 layers, 8 heads, 4 kv heads, untied: 3,164,416 f32 parameters in 39
//! tensors): our fused AdamW step, the gradient norm that clipping needs, and candle-nn's
//! `AdamW` on the same parameters and gradients as the baseline it replaced (it cannot export
//! its moments and updates through tensor ops, one op at a time).
//!
//! `cargo bench -p slime-trainer --bench optim`

use candle_core::{Device, Tensor, Var, backprop::GradStore};
use candle_nn::Optimizer;
use criterion::{Criterion, criterion_group, criterion_main};
use slime_models::{CausalLm, LlamaConfig};
use slime_trainer::optim::{AdamW, AdamWConfig, clip_coefficient};

/// The reference model's parameters (seeded random init) and, as their gradients, seeded values
/// of gradient-like size.
fn params_and_grads() -> (Vec<(String, Var)>, GradStore) {
    let dev = Device::Cpu;
    let mut cfg = LlamaConfig::tiny(512, 256, 688, 4, 8, 4);
    cfg.tie_word_embeddings = false;
    let params = CausalLm::random(&cfg, 0, &dev).expect("reference model").trainable_vars();
    // d/dw sum(w * r) = r: one backward pass gives a GradStore holding r for every parameter.
    let mut loss = Tensor::zeros((), candle_core::DType::F32, &dev).expect("zero");
    for (_, var) in &params {
        let r = Tensor::randn(0f32, 1e-3, var.shape(), &dev).expect("randn");
        loss = (loss + (var.as_tensor() * r).expect("mul").sum_all().expect("sum")).expect("add");
    }
    let grads = loss.backward().expect("backward");
    (params, grads)
}

fn optimiser(c: &mut Criterion) {
    let (params, grads) = params_and_grads();
    let count: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(count, 3_164_416, "the reference model's parameter count");
    let mut group = c.benchmark_group("adamw/reference_3.2M");
    group.sample_size(20);

    let mut ours = AdamW::new(params.clone(), AdamWConfig::default()).expect("adamw");
    group.bench_function("grad_norm", |b| b.iter(|| ours.grad_norm(&grads).expect("norm")));
    group.bench_function("step", |b| b.iter(|| ours.step(&grads, 1e-5, 1.0).expect("step")));
    group.bench_function("grad_norm+clipped_step", |b| {
        b.iter(|| {
            let scale = clip_coefficient(ours.grad_norm(&grads).expect("norm"), Some(1.0));
            ours.step(&grads, 1e-5, scale).expect("step")
        })
    });

    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let config = candle_nn::ParamsAdamW { lr: 1e-5, weight_decay: 0.0, ..Default::default() };
    let mut candle = candle_nn::AdamW::new(vars, config).expect("candle adamw");
    group.bench_function("candle_nn_step", |b| b.iter(|| candle.step(&grads).expect("step")));
    group.finish();
}

criterion_group!(benches, optimiser);
criterion_main!(benches);
