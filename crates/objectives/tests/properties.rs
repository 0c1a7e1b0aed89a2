//! Property tests of the loss terms' invariants.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use slime_objectives::{
    CpoParams, DpoLossType, DpoParams, IpoParams, Loss, LossOutput, Objective, ObjectiveInputs, OrpoParams,
    ReferenceLogps, SequenceLogps, SftParams, SimpoParams, SlimeParams,
};

/// A batch of pairs of per-token log-probs (ragged; each row has at least one token).
#[derive(Debug, Clone)]
struct Batch {
    chosen: Vec<Vec<f64>>,
    rejected: Vec<Vec<f64>>,
    ref_chosen: Vec<f64>,
    ref_rejected: Vec<f64>,
}

fn rows(n: usize, low: f64) -> impl Strategy<Value = Vec<Vec<f64>>> {
    prop::collection::vec(prop::collection::vec(low..=0.0f64, 1..8), n)
}

fn batch_with(low: f64) -> impl Strategy<Value = Batch> {
    (1usize..6).prop_flat_map(move |n| {
        (rows(n, low), rows(n, low), prop::collection::vec(-200.0..0.0f64, n), prop::collection::vec(-200.0..0.0f64, n))
            .prop_map(|(chosen, rejected, ref_chosen, ref_rejected)| Batch {
                chosen,
                rejected,
                ref_chosen,
                ref_rejected,
            })
    })
}

fn batch() -> impl Strategy<Value = Batch> {
    batch_with(-20.0)
}

/// Right-padded `[n, width]` tensors; padding positions hold `pad` (which must never matter).
fn padded(rows: &[Vec<f64>], extra: usize, pad: f64, dtype: DType) -> (Tensor, Tensor) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(1) + extra;
    let mut values = Vec::new();
    let mut mask = Vec::new();
    for r in rows {
        for i in 0..width {
            values.push(r.get(i).copied().unwrap_or(pad));
            mask.push(u8::from(i < r.len()));
        }
    }
    let dev = Device::Cpu;
    let v = Tensor::from_vec(values, (rows.len(), width), &dev).and_then(|t| t.to_dtype(dtype)).expect("values");
    (v, Tensor::from_vec(mask, (rows.len(), width), &dev).expect("mask"))
}

fn inputs(b: &Batch, extra: usize, pad: f64, dtype: DType) -> ObjectiveInputs {
    let (c, cm) = padded(&b.chosen, extra, pad, dtype);
    let (r, rm) = padded(&b.rejected, extra, pad, dtype);
    let dev = Device::Cpu;
    ObjectiveInputs::preference(
        SequenceLogps::from_tokens(&c, &cm).expect("chosen"),
        SequenceLogps::from_tokens(&r, &rm).expect("rejected"),
    )
    .with_reference(
        ReferenceLogps::new(
            &Tensor::new(b.ref_chosen.as_slice(), &dev).expect("ref").to_dtype(dtype).expect("ref"),
            &Tensor::new(b.ref_rejected.as_slice(), &dev).expect("ref").to_dtype(dtype).expect("ref"),
        )
        .expect("reference"),
    )
}

fn run(objective: &Objective, inputs: &ObjectiveInputs) -> LossOutput {
    objective.compute(inputs).unwrap_or_else(|e| panic!("{}: {e}", objective.name()))
}

fn scalar(out: &LossOutput) -> f64 {
    out.loss.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()).expect("scalar")
}

fn every_objective() -> Vec<Objective> {
    vec![
        Objective::Slime(SlimeParams::paper()),
        Objective::Slime(SlimeParams { p: 1.0, ..SlimeParams::authors_code() }),
        Objective::Dpo(DpoParams::default()),
        Objective::Dpo(DpoParams { label_smoothing: 0.2, ..DpoParams::default() }),
        Objective::Dpo(DpoParams { loss: DpoLossType::Robust, label_smoothing: 0.2, beta: 0.1 }),
        Objective::Dpo(DpoParams { loss: DpoLossType::Hinge, label_smoothing: 0.0, beta: 0.1 }),
        Objective::Ipo(IpoParams::default()),
        Objective::Simpo(SimpoParams::default()),
        Objective::Cpo(CpoParams::default()),
        Objective::Orpo(OrpoParams::default()),
        Objective::Sft(SftParams::nll()),
        Objective::Sft(SftParams::one_minus_p()),
    ]
}

fn non_negative(objective: &Objective) -> bool {
    // Robust DPO can be negative by construction (it subtracts eps * -logsig(-z)).
    !matches!(objective, Objective::Dpo(DpoParams { loss: DpoLossType::Robust, .. }))
}

fn metric(out: &LossOutput, name: &str) -> f64 {
    out.metrics.get(name).unwrap_or_else(|| panic!("metric {name} missing"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn losses_are_finite_and_nonnegative_in_f32_and_bf16_down_to_minus_1e4(b in batch_with(-1e4)) {
        for dtype in [DType::F32, DType::BF16] {
            let inputs = inputs(&b, 0, 0.0, dtype);
            for objective in every_objective() {
                let out = run(&objective, &inputs);
                let loss = scalar(&out);
                prop_assert!(loss.is_finite(), "{} loss {loss} not finite", objective.name());
                if non_negative(&objective) {
                    prop_assert!(loss >= 0.0, "{} loss {loss} negative", objective.name());
                }
                for (name, value) in out.metrics.iter() {
                    prop_assert!(value.is_finite(), "{} metric {name} = {value}", objective.name());
                }
                out.loss.backward().expect("backward must succeed on extreme inputs");
            }
            let slime = run(&Objective::Slime(SlimeParams::paper()), &inputs);
            for term in ["slime/stabilizer", "slime/margin", "slime/hard_factor", "slime/soft_factor"] {
                prop_assert!(metric(&slime, term) >= 0.0);
            }
        }
    }

    #[test]
    fn margins_of_plus_minus_1e4_stay_finite(sign in prop::bool::ANY, beta in 0.01f64..10.0) {
        // Delta = +-1e4 for DPO; A_w - A_l = +-1e4 for SimPO / SLIME.
        let (w, l) = if sign { (0.0, -1e4) } else { (-1e4, 0.0) };
        let b = Batch { chosen: vec![vec![w]], rejected: vec![vec![l]], ref_chosen: vec![0.0], ref_rejected: vec![0.0] };
        let inputs = inputs(&b, 0, 0.0, DType::F32);
        for objective in [
            Objective::Dpo(DpoParams { beta, ..DpoParams::default() }),
            Objective::Simpo(SimpoParams { beta, ..SimpoParams::default() }),
            Objective::Slime(SlimeParams::paper()),
            Objective::Orpo(OrpoParams { beta }),
        ] {
            let out = run(&objective, &inputs);
            prop_assert!(scalar(&out).is_finite());
            for (name, value) in out.metrics.iter() {
                prop_assert!(value.is_finite(), "{} metric {name} = {value}", objective.name());
            }
        }
    }

    #[test]
    fn dpo_invariant_to_shifting_policy_and_reference_together(b in batch(), shift in -50.0f64..50.0) {
        // Shift each sequence's first token and its reference sum by the same constant.
        let mut shifted = b.clone();
        for (row, r) in shifted.chosen.iter_mut().zip(shifted.ref_chosen.iter_mut()) { row[0] += shift; *r += shift; }
        for (row, r) in shifted.rejected.iter_mut().zip(shifted.ref_rejected.iter_mut()) { row[0] -= shift; *r -= shift; }
        for objective in [Objective::Dpo(DpoParams::default()), Objective::Ipo(IpoParams::default())] {
            let a = scalar(&run(&objective, &inputs(&b, 0, 0.0, DType::F64)));
            let c = scalar(&run(&objective, &inputs(&shifted, 0, 0.0, DType::F64)));
            prop_assert!((a - c).abs() <= 1e-9 * (1.0 + a.abs()), "{} {a} vs {c}", objective.name());
        }
    }

    #[test]
    fn simpo_invariant_to_scaling_sum_and_count_together(
        sums in prop::collection::vec((-50.0f64..-0.01, 1.0f64..50.0, -50.0f64..-0.01, 1.0f64..50.0), 1..6),
        k in 1u32..8,
    ) {
        let k = f64::from(k);
        let build = |scale: f64| {
            let dev = Device::Cpu;
            let side = |s: Vec<f64>, n: Vec<f64>| {
                SequenceLogps::from_sums(&Tensor::new(s.as_slice(), &dev).expect("s"), &Tensor::new(n.as_slice(), &dev).expect("n"))
                    .expect("sums")
            };
            ObjectiveInputs::preference(
                side(sums.iter().map(|x| x.0 * x.1 * scale).collect(), sums.iter().map(|x| x.1 * scale).collect()),
                side(sums.iter().map(|x| x.2 * x.3 * scale).collect(), sums.iter().map(|x| x.3 * scale).collect()),
            )
        };
        let objective = Objective::Simpo(SimpoParams::default());
        let a = scalar(&run(&objective, &build(1.0)));
        let c = scalar(&run(&objective, &build(k)));
        prop_assert!((a - c).abs() <= 1e-12 * (1.0 + a.abs()), "{a} vs {c}");
    }

    #[test]
    fn slime_margin_term_is_monotone_in_d_and_zero_past_hard_margin(
        a_w in -10.0f64..0.0, mut d in prop::collection::vec(-5.0f64..5.0, 2..20),
        soft in prop::bool::ANY, hard in prop::bool::ANY,
    ) {
        d.sort_by(f64::total_cmp);
        let params = SlimeParams { use_stabilizer: false, use_anchor: false, use_soft_margin: soft, use_hard_margin: hard, ..SlimeParams::paper() };
        let mut previous = f64::INFINITY;
        for &dv in &d {
            let b = Batch { chosen: vec![vec![a_w]], rejected: vec![vec![a_w - dv]], ref_chosen: vec![0.0], ref_rejected: vec![0.0] };
            let term = metric(&params.compute(&inputs(&b, 0, 0.0, DType::F64)).expect("slime"), "slime/margin");
            prop_assert!(term <= previous + 1e-15, "margin term rose from {previous} to {term} at D = {dv}");
            if hard && dv >= params.m_h {
                prop_assert_eq!(term, 0.0);
            }
            previous = term;
        }
    }

    #[test]
    fn slime_stabilizer_non_increasing_in_each_rejected_token(b in batch(), row in 0usize..6, col in 0usize..8, up in 0.0f64..5.0) {
        let params = SlimeParams::paper();
        let row = row % b.rejected.len();
        let col = col % b.rejected[row].len();
        let mut raised = b.clone();
        raised.rejected[row][col] = (raised.rejected[row][col] + up).min(0.0);
        let before = metric(&params.compute(&inputs(&b, 0, 0.0, DType::F64)).expect("slime"), "slime/stabilizer");
        let after = metric(&params.compute(&inputs(&raised, 0, 0.0, DType::F64)).expect("slime"), "slime/stabilizer");
        prop_assert!(after <= before + 1e-12, "{before} -> {after}");
    }

    #[test]
    fn switching_a_slime_term_off_removes_exactly_that_term(b in batch()) {
        let full = SlimeParams::paper();
        let x = inputs(&b, 0, 0.0, DType::F64);
        let out = full.compute(&x).expect("full");
        for (off, term) in [
            (SlimeParams { use_anchor: false, ..full.clone() }, "slime/anchor"),
            (SlimeParams { use_stabilizer: false, ..full.clone() }, "slime/stabilizer"),
        ] {
            let without = off.compute(&x).expect("ablation");
            let diff = scalar(&out) - scalar(&without);
            prop_assert!((diff - metric(&out, term)).abs() <= 1e-9 * (1.0 + scalar(&out).abs()), "{term}: {diff} vs {}", metric(&out, term));
            prop_assert_eq!(metric(&without, term), 0.0);
        }
        // A margin factor switched off becomes exactly 1.
        let no_soft = SlimeParams { use_soft_margin: false, ..full.clone() }.compute(&x).expect("no soft");
        prop_assert_eq!(metric(&no_soft, "slime/soft_factor"), 1.0);
        let no_hard = SlimeParams { use_hard_margin: false, ..full.clone() }.compute(&x).expect("no hard");
        prop_assert_eq!(metric(&no_hard, "slime/hard_factor"), 1.0);
    }

    #[test]
    fn losses_are_permutation_invariant(b in batch(), seed in 0u64..1000) {
        let n = b.chosen.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (i as u64).wrapping_mul(2654435761).wrapping_add(seed) % 1009);
        let p = Batch {
            chosen: order.iter().map(|&i| b.chosen[i].clone()).collect(),
            rejected: order.iter().map(|&i| b.rejected[i].clone()).collect(),
            ref_chosen: order.iter().map(|&i| b.ref_chosen[i]).collect(),
            ref_rejected: order.iter().map(|&i| b.ref_rejected[i]).collect(),
        };
        for objective in every_objective() {
            let a = run(&objective, &inputs(&b, 0, 0.0, DType::F64));
            let c = run(&objective, &inputs(&p, 0, 0.0, DType::F64));
            prop_assert!((scalar(&a) - scalar(&c)).abs() <= 1e-9 * (1.0 + scalar(&a).abs()), "{}", objective.name());
            let per_a: Vec<f64> = a.per_example.to_vec1().expect("per example");
            let per_c: Vec<f64> = c.per_example.to_vec1().expect("per example");
            for (k, &i) in order.iter().enumerate() {
                prop_assert!((per_a[i] - per_c[k]).abs() <= 1e-9 * (1.0 + per_a[i].abs()));
            }
        }
    }

    #[test]
    fn padding_never_changes_any_value(b in batch(), extra in 1usize..5, pad in prop::sample::select(vec![0.0, -1e30, f64::NAN, f64::NEG_INFINITY, 7.0])) {
        for objective in every_objective() {
            let clean = run(&objective, &inputs(&b, 0, 0.0, DType::F64));
            let padded = run(&objective, &inputs(&b, extra, pad, DType::F64));
            prop_assert_eq!(scalar(&clean), scalar(&padded), "{} loss", objective.name());
            prop_assert_eq!(&clean.metrics, &padded.metrics, "{} metrics", objective.name());
        }
    }
}
