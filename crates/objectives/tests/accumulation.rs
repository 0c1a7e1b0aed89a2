//! Gradient accumulation: micro-batches given the full batch's totals sum to exactly the
//! full-batch loss and gradients, for every objective (thresholded SFT excepted, see
//! `BatchTotals`).

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use slime_objectives::{
    BatchTotals, CpoParams, CpoVariant, DpoParams, IpoParams, Objective, ObjectiveInputs, OrpoParams, ReferenceLogps,
    SequenceLogps, SftParams, SimpoParams, SlimeParams,
};

const WIDTH: usize = 6;

fn objectives() -> Vec<Objective> {
    vec![
        Objective::Slime(SlimeParams::paper()),
        Objective::Dpo(DpoParams::default()),
        Objective::Ipo(IpoParams::default()),
        Objective::Simpo(SimpoParams::default()),
        Objective::Cpo(CpoParams::default()),
        Objective::Cpo(CpoParams { variant: CpoVariant::CpoSimpo, beta: 2.0, ..CpoParams::default() }),
        Objective::Orpo(OrpoParams::default()),
        Objective::Sft(SftParams::nll()),
        Objective::Sft(SftParams::one_minus_p()),
    ]
}

/// Rows `[lo, hi)` of the batch as inputs (optionally as a micro-batch of `totals`).
fn inputs(
    objective: &Objective,
    vars: &(Var, Var),
    masks: &(Tensor, Tensor),
    refs: &(Tensor, Tensor),
    range: (usize, usize),
    totals: Option<BatchTotals>,
) -> ObjectiveInputs {
    let (lo, hi) = range;
    let rows = |t: &Tensor| t.narrow(0, lo, hi - lo).expect("narrow");
    let chosen = SequenceLogps::from_tokens(&rows(vars.0.as_tensor()), &rows(&masks.0)).expect("chosen");
    let mut x = if objective.is_preference() {
        let rejected = SequenceLogps::from_tokens(&rows(vars.1.as_tensor()), &rows(&masks.1)).expect("rejected");
        ObjectiveInputs::preference(chosen, rejected)
            .with_reference(ReferenceLogps::new(&rows(&refs.0), &rows(&refs.1)).expect("reference"))
    } else {
        ObjectiveInputs::supervised(chosen)
    };
    if let Some(t) = totals {
        x = x.with_batch_totals(t);
    }
    x
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn micro_batches_sum_to_the_full_batch(
        values in prop::collection::vec(-8.0f64..0.0, 2 * 8 * WIDTH),
        lens in prop::collection::vec((1usize..=WIDTH, 1usize..=WIDTH), 8),
        micro in prop::sample::select(vec![1usize, 2, 4]),
    ) {
        let dev = Device::Cpu;
        let n = 8;
        let tensor = |v: &[f64]| Tensor::from_slice(v, (n, WIDTH), &dev).expect("tensor");
        let vars = (
            Var::from_tensor(&tensor(&values[..n * WIDTH])).expect("var"),
            Var::from_tensor(&tensor(&values[n * WIDTH..])).expect("var"),
        );
        let mask = |pick: fn(&(usize, usize)) -> usize| {
            let m: Vec<u8> = lens.iter().flat_map(|l| (0..WIDTH).map(move |t| u8::from(t < pick(l)))).collect();
            Tensor::from_vec(m, (n, WIDTH), &dev).expect("mask")
        };
        let masks = (mask(|l| l.0), mask(|l| l.1));
        let refs = (
            Tensor::from_vec((0..n).map(|i| -3.0 - i as f64).collect::<Vec<_>>(), n, &dev).expect("ref"),
            Tensor::from_vec((0..n).map(|i| -5.0 + 0.5 * i as f64).collect::<Vec<_>>(), n, &dev).expect("ref"),
        );
        let totals = BatchTotals {
            pairs: n,
            chosen_tokens: lens.iter().map(|l| l.0 as f64).sum(),
            rejected_tokens: lens.iter().map(|l| l.1 as f64).sum(),
        };
        for objective in objectives() {
            let full = objective.compute(&inputs(&objective, &vars, &masks, &refs, (0, n), None)).expect("full");
            let full_grads = full.loss.backward().expect("backward");
            let mut acc_loss = 0.0;
            let mut weighted_metric = 0.0;
            let mut acc_grad = Tensor::zeros((n, WIDTH), DType::F64, &dev).expect("zeros");
            for start in (0..n).step_by(micro) {
                let out = objective
                    .compute(&inputs(&objective, &vars, &masks, &refs, (start, start + micro), Some(totals)))
                    .expect("micro");
                acc_loss += out.loss.to_scalar::<f64>().expect("scalar");
                weighted_metric += out.metrics.get("loss").expect("loss metric") * micro as f64 / n as f64;
                let g = out.loss.backward().expect("backward");
                acc_grad = (acc_grad + g.get(vars.0.as_tensor()).expect("chosen grad")).expect("add");
            }
            let full_loss = full.loss.to_scalar::<f64>().expect("scalar");
            prop_assert!((acc_loss - full_loss).abs() <= 1e-12 * (1.0 + full_loss.abs()), "{}: {acc_loss} vs {full_loss}", objective.name());
            prop_assert!((weighted_metric - full_loss).abs() <= 1e-12 * (1.0 + full_loss.abs()), "{} metric", objective.name());
            let diff = (acc_grad - full_grads.get(vars.0.as_tensor()).expect("full grad"))
                .and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f64>()).expect("diff");
            prop_assert!(diff <= 1e-12, "{}: chosen gradients differ by {diff}", objective.name());
        }
    }
}
