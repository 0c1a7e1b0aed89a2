//! Criterion benches: forward + backward of the reference model (issue 7's workload: Llama,
//! vocab 512, hidden 256, intermediate 688, 4 layers, 8 heads, 4 kv heads, untied, 16 x 128
//! tokens, f32) on the fused path (one pass, or two halves at once as the trainer's
//! `parallel_micro_batches = 2` runs them) and on the reference composition; the same sizes as a
//! Gemma 3 (`gemma3/`), fused and composed; each fused piece at that workload's sizes (attention, MLP, RMSNorm + projection, rope, log-prob gather), forward and
//! forward + backward; and the chunked log-prob path at a Gemma-sized vocabulary (262,144) on
//! 1 x 512 positions (full logits would be 512 MiB; each chunk of 128 holds 128 MiB).
//!
//! `cargo bench -p slime-models --bench step` (`-- pieces/` for the pieces only).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use slime_models::{CausalLm, GemmaConfig, LlamaConfig, Model, fused, ops};

const BATCH: usize = 16;
const SEQ: usize = 128;
const HIDDEN: usize = 256;
const INTER: usize = 688;
const HEADS: usize = 8;
const KV: usize = 4;
const HEAD_DIM: usize = 32;
const VOCAB: usize = 512;

fn reference_config() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(VOCAB, HIDDEN, INTER, 4, HEADS, KV);
    cfg.tie_word_embeddings = false;
    cfg.max_position_embeddings = 2048;
    cfg
}

fn reference_step(c: &mut Criterion) {
    let lm = CausalLm::random(&reference_config(), 0, &Device::Cpu).expect("model");
    let Model::Llama(llama) = lm.model() else { unreachable!("a Llama config") };
    let ids: Vec<u32> = (0..BATCH * SEQ).map(|i| ((i * 7919 + 13) % VOCAB) as u32).collect();
    let ids = Tensor::from_vec(ids, (BATCH, SEQ), &Device::Cpu).expect("ids");
    let mask = Tensor::ones((BATCH, SEQ), DType::U8, &Device::Cpu).expect("mask");
    let mut group = c.benchmark_group("reference");
    group.sample_size(10);
    group.bench_function("forward_backward_16x128", |b| {
        b.iter(|| {
            let logps = lm.model().token_logps(&ids, Some(&mask), 128).expect("logps");
            logps.sum_all().expect("sum").backward().expect("backward")
        })
    });
    // The trainer's `parallel_micro_batches = 2`: two halves of the batch, each forward and
    // backward on its own pool thread (run with `CANDLE_NUM_THREADS=1`, as the binaries set it:
    // candle's own element-wise pool serialises concurrent callers).
    let halves = [ids.narrow(0, 0, BATCH / 2).expect("half"), ids.narrow(0, BATCH / 2, BATCH / 2).expect("half")];
    let half_mask = mask.narrow(0, 0, BATCH / 2).expect("mask");
    group.bench_function("forward_backward_16x128_as_2_concurrent_8x128", |b| {
        b.iter(|| {
            let run = |ids: &Tensor| {
                let logps = lm.model().token_logps(ids, Some(&half_mask), 128).expect("logps");
                logps.sum_all().expect("sum").backward().expect("backward")
            };
            rayon::join(|| run(&halves[0]), || run(&halves[1]))
        })
    });
    group.bench_function("forward_backward_16x128_composed", |b| {
        b.iter(|| {
            let hidden = llama.forward_hidden_reference(&ids, Some(&mask)).expect("hidden");
            let logps = slime_models::logps::chunked_token_logps(&hidden, llama.lm_head(), &ids, 128).expect("logps");
            logps.sum_all().expect("sum").backward().expect("backward")
        })
    });
    group.finish();
}

/// The reference workload's sizes as a Gemma 3 (QK-norm, sandwich norms, GeGLU, local layers with
/// a 64-token window and global ones every third layer): the fused blocks against the composed
/// reference path, forward + backward of 16 x 128 tokens.
fn gemma_step(c: &mut Criterion) {
    let mut cfg = GemmaConfig::tiny3(VOCAB, HIDDEN, INTER, 4, HEADS, KV);
    cfg.sliding_window = Some(64);
    cfg.sliding_window_pattern = Some(3);
    cfg.max_position_embeddings = 2048;
    let lm = CausalLm::random(&cfg, 0, &Device::Cpu).expect("model");
    let Model::Gemma(gemma) = lm.model() else { unreachable!("a Gemma config") };
    let ids: Vec<u32> = (0..BATCH * SEQ).map(|i| ((i * 7919 + 13) % VOCAB) as u32).collect();
    let ids = Tensor::from_vec(ids, (BATCH, SEQ), &Device::Cpu).expect("ids");
    let mask = Tensor::ones((BATCH, SEQ), DType::U8, &Device::Cpu).expect("mask");
    let mut group = c.benchmark_group("gemma3");
    group.sample_size(10);
    group.bench_function("forward_backward_16x128", |b| {
        b.iter(|| {
            let logps = lm.model().token_logps(&ids, Some(&mask), 128).expect("logps");
            logps.sum_all().expect("sum").backward().expect("backward")
        })
    });
    group.bench_function("forward_backward_16x128_composed", |b| {
        b.iter(|| {
            let hidden = gemma.forward_hidden_reference(&ids, Some(&mask)).expect("hidden");
            let logps = slime_models::logps::chunked_token_logps(&hidden, gemma.lm_head(), &ids, 128).expect("logps");
            logps.sum_all().expect("sum").backward().expect("backward")
        })
    });
    group.finish();
}

fn randn(shape: &[usize], std: f32) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu).expect("randn")).expect("var")
}

/// Forward and forward + backward (`sum(y * coef)`) of `f`.
fn bench_piece(c: &mut Criterion, name: &str, f: impl Fn() -> Tensor) {
    let mut group = c.benchmark_group("pieces");
    group.sample_size(20);
    group.bench_function(format!("{name}/forward"), |b| b.iter(&f));
    let coef = f().ones_like().expect("coef");
    group.bench_function(format!("{name}/forward_backward"), |b| {
        b.iter(|| (f() * &coef).expect("mul").sum_all().expect("sum").backward().expect("backward"))
    });
    group.finish();
}

fn pieces(c: &mut Criterion) {
    let rows = BATCH * SEQ;
    let inv_freq = reference_config().inv_freq();
    let mask = Tensor::ones((BATCH, SEQ), DType::U8, &Device::Cpu).expect("mask");
    let spec = Arc::new(fused::AttentionSpec::new(BATCH, SEQ, HEADS, KV, &inv_freq, Some(&mask)).expect("spec"));
    let qkv = randn(&[rows, (HEADS + 2 * KV) * HEAD_DIM], 1.0);
    bench_piece(c, "attention_fused", || fused::attention(qkv.as_tensor(), &spec).expect("attention"));
    bench_piece(c, "attention_composed", || {
        ops::attention_composed(qkv.as_tensor(), BATCH, HEADS, KV, &inv_freq, Some(&mask)).expect("attention")
    });
    let x = randn(&[rows, HIDDEN], 1.0);
    let norm_w = Var::from_tensor(&Tensor::ones(HIDDEN, DType::F32, &Device::Cpu).expect("ones")).expect("var");
    let w_gu = randn(&[2 * INTER, HIDDEN], 0.02);
    let w_down = randn(&[HIDDEN, INTER], 0.02);
    bench_piece(c, "mlp_fused", || {
        let gu = fused::norm_linear(x.as_tensor(), norm_w.as_tensor(), w_gu.as_tensor(), 1e-5).expect("gate|up");
        fused::swiglu_down_residual(x.as_tensor(), &gu, w_down.as_tensor()).expect("mlp")
    });
    bench_piece(c, "mlp_composed", || {
        let h = ops::rms_norm_composed(x.as_tensor(), norm_w.as_tensor(), 1e-5).expect("norm");
        let gate = h.matmul(&w_gu.as_tensor().narrow(0, 0, INTER).expect("g").t().expect("t")).expect("gate");
        let up = h.matmul(&w_gu.as_tensor().narrow(0, INTER, INTER).expect("u").t().expect("t")).expect("up");
        let act = (gate.silu().expect("silu") * up).expect("act");
        (x.as_tensor() + act.matmul(&w_down.as_tensor().t().expect("t")).expect("down")).expect("residual")
    });
    bench_piece(c, "rms_norm_fused", || fused::rms_norm(x.as_tensor(), norm_w.as_tensor(), 1e-5).expect("norm"));
    bench_piece(c, "rms_norm_composed", || {
        ops::rms_norm_composed(x.as_tensor(), norm_w.as_tensor(), 1e-5).expect("norm")
    });
    let q = randn(&[BATCH, HEADS, SEQ, HEAD_DIM], 1.0);
    let (cos, sin) = ops::rope_tables(&inv_freq, SEQ, DType::F32, &Device::Cpu).expect("tables");
    bench_piece(c, "rope_composed", || ops::rope(q.as_tensor(), &cos, &sin).expect("rope"));
    let logits = randn(&[rows, VOCAB], 1.0);
    let labels: Vec<u32> = (0..rows).map(|i| ((i * 31) % VOCAB) as u32).collect();
    let labels = Tensor::from_vec(labels, rows, &Device::Cpu).expect("labels");
    bench_piece(c, "log_softmax_gather_fused", || {
        fused::log_softmax_gather(logits.as_tensor(), &labels).expect("gather")
    });
    bench_piece(c, "log_softmax_gather_composed", || {
        ops::log_softmax(logits.as_tensor())
            .expect("log_softmax")
            .gather(&labels.unsqueeze(1).expect("unsqueeze"), 1)
            .expect("gather")
    });
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

criterion_group!(benches, reference_step, gemma_step, pieces, logps_memory);
criterion_main!(benches);
