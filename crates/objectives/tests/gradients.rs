//! Autograd gradients against central finite differences (f64), for every objective, including
//! DPO at exactly zero margin; and the signs of SLIME's three terms.

mod common;

use candle_core::{Device, Tensor, Var};
use slime_objectives::{
    CpoParams, CpoVariant, DpoLossType, DpoParams, IpoParams, Loss, Objective, ObjectiveInputs, OrpoParams,
    ReferenceLogps, Result, SequenceLogps, SftParams, SimpoParams, SlimeParams, TokenFilter,
};

const CHOSEN: [[f64; 4]; 3] = [[-0.3, -1.2, -0.05, -2.0], [-0.9, -0.4, -0.7, -0.1], [-2.5, -0.2, -1.1, -0.6]];
const REJECTED: [[f64; 4]; 3] = [[-1.7, -0.6, -3.1, -0.2], [-0.35, -2.2, -1.4, -4.0], [-0.8, -0.5, -1.9, -2.6]];
const MASK: [[u8; 4]; 3] = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]];
const REF_CHOSEN: [f64; 3] = [-2.0, -1.5, -3.0];
const REF_REJECTED: [f64; 3] = [-4.5, -8.0, -1.0];

fn loss_at(
    objective: &Objective,
    chosen: &Tensor,
    rejected: &Tensor,
    reference: Option<(&[f64], &[f64])>,
) -> Result<Tensor> {
    let dev = Device::Cpu;
    let mask = Tensor::new(&MASK, &dev)?;
    let mut inputs = if objective.is_preference() {
        ObjectiveInputs::preference(
            SequenceLogps::from_tokens(chosen, &mask)?,
            SequenceLogps::from_tokens(rejected, &mask)?,
        )
    } else {
        ObjectiveInputs::supervised(SequenceLogps::from_tokens(chosen, &mask)?)
    };
    if let Some((c, r)) = reference {
        inputs = inputs.with_reference(ReferenceLogps::new(&Tensor::new(c, &dev)?, &Tensor::new(r, &dev)?)?);
    }
    Ok(objective.compute(&inputs)?.loss)
}

/// Compares d loss / d token for every counted token of both sides with (f(x+h) - f(x-h)) / 2h.
fn check_gradients(
    objective: &Objective,
    chosen: [[f64; 4]; 3],
    rejected: [[f64; 4]; 3],
    reference: Option<(&[f64], &[f64])>,
) -> Result<()> {
    let dev = Device::Cpu;
    let c = Var::new(&chosen, &dev)?;
    let r = Var::new(&rejected, &dev)?;
    let grads = loss_at(objective, c.as_tensor(), r.as_tensor(), reference)?.backward()?;
    let h = 1e-6;
    for (side, var, base) in [("chosen", &c, chosen), ("rejected", &r, rejected)] {
        let autograd: Vec<Vec<f64>> = match grads.get(var.as_tensor()) {
            Some(g) => g.to_vec2()?,
            None => vec![vec![0.0; 4]; 3],
        };
        for i in 0..3 {
            for j in 0..4 {
                let eval = |delta: f64| -> Result<f64> {
                    let mut x = base;
                    x[i][j] += delta;
                    let t = Tensor::new(&x, &dev)?;
                    let (ct, rt) =
                        if side == "chosen" { (t, r.as_tensor().clone()) } else { (c.as_tensor().clone(), t) };
                    Ok(loss_at(objective, &ct, &rt, reference)?.to_scalar::<f64>()?)
                };
                let numeric = (eval(h)? - eval(-h)?) / (2.0 * h);
                let got = autograd[i][j];
                assert!(
                    (got - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                    "{}: d loss / d {side}[{i}][{j}] autograd {got} vs finite difference {numeric}",
                    objective.name()
                );
                if MASK[i][j] == 0 {
                    assert_eq!(got, 0.0, "padding must get no gradient");
                }
            }
        }
    }
    Ok(())
}

fn all_objectives() -> Vec<(Objective, bool)> {
    vec![
        (Objective::Slime(SlimeParams::paper()), false),
        (Objective::Slime(SlimeParams { p: 1.0, use_hard_margin: false, ..SlimeParams::authors_code() }), false),
        (Objective::Slime(SlimeParams { m_h: 4.0, kappa: 0.7, ..SlimeParams::paper() }), false),
        (Objective::Dpo(DpoParams::default()), true),
        (Objective::Dpo(DpoParams { label_smoothing: 0.25, ..DpoParams::default() }), true),
        (Objective::Dpo(DpoParams { loss: DpoLossType::Robust, label_smoothing: 0.1, beta: 0.5 }), true),
        (Objective::Dpo(DpoParams { loss: DpoLossType::Hinge, label_smoothing: 0.0, beta: 0.05 }), true),
        (Objective::Ipo(IpoParams::default()), true),
        (Objective::Simpo(SimpoParams::default()), false),
        (Objective::Simpo(SimpoParams { label_smoothing: 0.1, ..SimpoParams::default() }), false),
        (Objective::Cpo(CpoParams::default()), false),
        (Objective::Cpo(CpoParams { beta: 2.0, alpha: 0.3, variant: CpoVariant::CpoSimpo, simpo_gamma: 0.7 }), false),
        (Objective::Orpo(OrpoParams::default()), false),
        (Objective::Sft(SftParams::nll()), false),
        (Objective::Sft(SftParams::one_minus_p()), false),
        (Objective::Sft(SftParams { alpha: 0.5, filter: TokenFilter::ProbAtLeast, threshold: 0.3 }), false),
    ]
}

#[test]
fn autograd_matches_finite_differences_for_every_objective() -> Result<()> {
    for (objective, needs_reference) in all_objectives() {
        assert_eq!(objective.needs_reference(), needs_reference, "{}", objective.name());
        let reference = needs_reference.then_some((&REF_CHOSEN[..], &REF_REJECTED[..]));
        check_gradients(&objective, CHOSEN, REJECTED, reference)?;
    }
    Ok(())
}

#[test]
fn dpo_gradient_at_exactly_zero_margin_is_half_beta() -> Result<()> {
    // Policy == reference: d/dS_w [-logsig(beta * Delta)] = -beta * sigmoid(0) / B = -beta / (2B)
    // for every counted chosen token (and +beta / (2B) for rejected). With beta = 0.1, B = 3: -1/60.
    let mask_sum = |rows: [[f64; 4]; 3]| -> Vec<f64> {
        rows.iter().zip(MASK).map(|(r, m)| r.iter().zip(m).map(|(v, k)| v * f64::from(k)).sum()).collect()
    };
    let (ref_c, ref_r) = (mask_sum(CHOSEN), mask_sum(REJECTED));
    let objective = Objective::Dpo(DpoParams::default());
    check_gradients(&objective, CHOSEN, REJECTED, Some((&ref_c, &ref_r)))?;
    let c = Var::new(&CHOSEN, &Device::Cpu)?;
    let r = Var::new(&REJECTED, &Device::Cpu)?;
    let loss = loss_at(&objective, c.as_tensor(), r.as_tensor(), Some((&ref_c, &ref_r)))?;
    assert!((loss.to_scalar::<f64>()? - std::f64::consts::LN_2).abs() < 1e-15);
    let grads = loss.backward()?;
    let gc: Vec<Vec<f64>> = grads.get(c.as_tensor()).expect("chosen grad").to_vec2()?;
    let gr: Vec<Vec<f64>> = grads.get(r.as_tensor()).expect("rejected grad").to_vec2()?;
    assert!((gc[0][0] + 1.0 / 60.0).abs() < 1e-15, "got {}", gc[0][0]);
    assert!((gr[1][3] - 1.0 / 60.0).abs() < 1e-15, "got {}", gr[1][3]);
    Ok(())
}

/// Gradient of SLIME with only one part on, for one pair.
fn slime_grads(params: SlimeParams, chosen: &[f64], rejected: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
    let dev = Device::Cpu;
    let c = Var::from_tensor(&Tensor::new(chosen, &dev)?.unsqueeze(0)?)?;
    let r = Var::from_tensor(&Tensor::new(rejected, &dev)?.unsqueeze(0)?)?;
    let cm = Tensor::ones((1, chosen.len()), candle_core::DType::U8, &dev)?;
    let rm = Tensor::ones((1, rejected.len()), candle_core::DType::U8, &dev)?;
    let inputs =
        ObjectiveInputs::preference(SequenceLogps::from_tokens(&c, &cm)?, SequenceLogps::from_tokens(&r, &rm)?);
    let grads = params.compute(&inputs)?.loss.backward()?;
    let get = |v: &Var| -> Result<Vec<f64>> {
        Ok(match grads.get(v.as_tensor()) {
            Some(g) => g.squeeze(0)?.to_vec1()?,
            None => vec![0.0; v.dims()[1]],
        })
    };
    Ok((get(&c)?, get(&r)?))
}

#[test]
fn slime_gradient_signs() -> Result<()> {
    let off = SlimeParams {
        use_anchor: false,
        use_stabilizer: false,
        use_hard_margin: false,
        use_soft_margin: false,
        lambda_d: 0.0,
        ..SlimeParams::paper()
    };
    let chosen = [-0.4, -1.0];
    let rejected = [-0.3, -6.0];
    // Anchoring alone raises chosen log-probs (negative loss gradient), leaves rejected alone.
    let (gc, gr) = slime_grads(SlimeParams { use_anchor: true, ..off.clone() }, &chosen, &rejected)?;
    assert!(gc.iter().all(|&g| g < 0.0) && gr.iter().all(|&g| g == 0.0), "{gc:?} {gr:?}");
    // The stabiliser alone raises the collapsed rejected token (-6 << -delta) far more than the
    // healthy one, and never touches chosen.
    let (gc, gr) = slime_grads(SlimeParams { use_stabilizer: true, ..off.clone() }, &chosen, &rejected)?;
    assert!(gc.iter().all(|&g| g == 0.0));
    assert!(gr[0] < 0.0 && gr[1] < 0.0 && gr[1] < 50.0 * gr[0], "{gr:?}");
    // The margin term alone raises D: pushes chosen up and rejected down (D = 3.15 - ... below m_h here).
    let (gc, gr) = slime_grads(
        SlimeParams { use_hard_margin: true, use_soft_margin: true, lambda_d: 1.0, ..off.clone() },
        &[-1.0, -1.0],
        &[-1.5, -1.5],
    )?;
    assert!(gc.iter().all(|&g| g < 0.0) && gr.iter().all(|&g| g > 0.0), "{gc:?} {gr:?}");
    // Once D >= m_h the margin term has no gradient at all (D = 1.5 exactly, and beyond).
    for rejected in [[-2.5, -2.5], [-9.0, -9.0]] {
        let (gc, gr) = slime_grads(
            SlimeParams { use_hard_margin: true, use_soft_margin: true, lambda_d: 1.0, ..off.clone() },
            &[-1.0, -1.0],
            &rejected,
        )?;
        assert!(gc.iter().chain(&gr).all(|&g| g == 0.0), "{gc:?} {gr:?}");
    }
    Ok(())
}
