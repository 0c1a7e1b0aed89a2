//! Loss + backward for every objective on 64 pairs x 512 completion tokens (target: < 1 ms each
//! on a 2-core machine, so the loss is never the bottleneck of a training step).

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use slime_objectives::{Objective, ObjectiveInputs, ReferenceLogps, SequenceLogps, SftParams, SlimeParams};

const PAIRS: usize = 64;
const TOKENS: usize = 512;

/// Deterministic log-probs in roughly [-8, 0] and masks with 0..63 padding positions per row.
fn side(seed: u64) -> (Var, Tensor) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as f32 / (1u64 << 31) as f32
    };
    let values: Vec<f32> = (0..PAIRS * TOKENS).map(|_| -8.0 * next() * next()).collect();
    let mask: Vec<u8> =
        (0..PAIRS).flat_map(|row| (0..TOKENS).map(move |t| u8::from(t < TOKENS - (row * 7) % 64))).collect();
    let dev = Device::Cpu;
    (
        Var::from_tensor(&Tensor::from_vec(values, (PAIRS, TOKENS), &dev).expect("values")).expect("var"),
        Tensor::from_vec(mask, (PAIRS, TOKENS), &dev).expect("mask"),
    )
}

fn bench(c: &mut Criterion) {
    let (chosen, chosen_mask) = side(1);
    let (rejected, rejected_mask) = side(2);
    let reference = ReferenceLogps::new(
        &Tensor::full(-900f32, PAIRS, &Device::Cpu).expect("ref"),
        &Tensor::full(-950f32, PAIRS, &Device::Cpu).expect("ref"),
    )
    .expect("reference");
    let mut objectives: Vec<(String, Objective)> =
        Objective::NAMES.iter().map(|n| (n.to_string(), n.parse().expect("objective"))).collect();
    objectives.push(("sft-one-minus-p".into(), Objective::Sft(SftParams::one_minus_p())));
    objectives.push(("slime-authors-code".into(), Objective::Slime(SlimeParams::authors_code())));
    let mut group = c.benchmark_group("loss+backward/64x512");
    for (name, objective) in objectives {
        group.bench_function(name, |b| {
            b.iter(|| {
                let c = SequenceLogps::from_tokens(chosen.as_tensor(), &chosen_mask).expect("chosen");
                let inputs = if objective.is_preference() {
                    let r = SequenceLogps::from_tokens(rejected.as_tensor(), &rejected_mask).expect("rejected");
                    ObjectiveInputs::preference(c, r).with_reference(reference.clone())
                } else {
                    ObjectiveInputs::supervised(c)
                };
                let out = objective.compute(&inputs).expect("loss");
                let grads = out.loss.backward().expect("backward");
                assert_eq!(out.loss.dtype(), DType::F32);
                grads
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
