//! Hand-derived loss values: each expected number is worked out in the comment beside it.

mod common;

use common::{assert_close, loss_of, sums, tokens, with_reference};
use slime_objectives::{
    CpoParams, CpoVariant, DpoLossType, DpoParams, IpoParams, Loss, ObjectiveInputs, OrpoParams, Result, SftParams,
    SimpoParams, SlimeParams, TokenFilter,
};

const LN2: f64 = std::f64::consts::LN_2;

#[test]
fn dpo_policy_equal_to_reference_is_ln2_for_every_beta_and_variant() -> Result<()> {
    // Delta = 0: -logsig(0) = ln 2; cDPO: -(1-e) logsig(0) - e logsig(0) = ln 2;
    // robust: [(1-e) ln2 - e ln2] / (1 - 2e) = ln 2.
    let inputs = with_reference(
        ObjectiveInputs::preference(sums(&[-12.0, -3.5], &[4.0, 2.0])?, sums(&[-20.0, -1.0], &[5.0, 1.0])?),
        &[-12.0, -3.5],
        &[-20.0, -1.0],
    )?;
    for beta in [0.01, 0.1, 1.0, 10.0] {
        for (loss, eps) in [(DpoLossType::Sigmoid, 0.0), (DpoLossType::Sigmoid, 0.3), (DpoLossType::Robust, 0.2)] {
            let out = DpoParams { beta, loss, label_smoothing: eps }.compute(&inputs)?;
            assert_close(loss_of(&out), LN2, 1e-12, &format!("dpo {loss:?} beta {beta} eps {eps}"));
            assert_eq!(out.metrics.get("rewards/margins"), Some(0.0));
        }
        // hinge: relu(1 - 0) = 1.
        let out = DpoParams { beta, loss: DpoLossType::Hinge, label_smoothing: 0.0 }.compute(&inputs)?;
        assert_close(loss_of(&out), 1.0, 1e-12, "hinge at zero margin");
    }
    Ok(())
}

#[test]
fn dpo_variants_at_a_known_margin() -> Result<()> {
    // chosen: S = -10, S_ref = -12 -> +2; rejected: S = -15, S_ref = -11 -> -4; Delta = 6, z = 0.6.
    let inputs = with_reference(
        ObjectiveInputs::preference(sums(&[-10.0], &[3.0])?, sums(&[-15.0], &[3.0])?),
        &[-12.0],
        &[-11.0],
    )?;
    let case = |loss, eps| DpoParams { beta: 0.1, loss, label_smoothing: eps }.compute(&inputs);
    // sigmoid: softplus(-0.6) = ln(1 + e^-0.6) = 0.4374879504858856
    assert_close(loss_of(&case(DpoLossType::Sigmoid, 0.0)?), 0.437_487_950_485_885_6, 1e-12, "sigmoid");
    // cDPO eps 0.2: 0.8 softplus(-0.6) + 0.2 softplus(0.6) = 0.5574879504858856
    assert_close(loss_of(&case(DpoLossType::Sigmoid, 0.2)?), 0.557_487_950_485_885_6, 1e-12, "cdpo");
    // robust eps 0.2: (0.8 softplus(-0.6) - 0.2 softplus(0.6)) / 0.6 = 0.23748795048588564
    assert_close(loss_of(&case(DpoLossType::Robust, 0.2)?), 0.237_487_950_485_885_64, 1e-12, "robust");
    // hinge: relu(1 - 0.6) = 0.4
    assert_close(loss_of(&case(DpoLossType::Hinge, 0.0)?), 0.4, 1e-12, "hinge");
    let out = case(DpoLossType::Sigmoid, 0.0)?;
    // rewards: 0.1 * 2 = 0.2 and 0.1 * -4 = -0.4; logps/chosen is the sum, per_token the mean.
    assert_close(out.metrics.get("rewards/chosen").unwrap_or(f64::NAN), 0.2, 1e-12, "rewards/chosen");
    assert_close(out.metrics.get("rewards/rejected").unwrap_or(f64::NAN), -0.4, 1e-12, "rewards/rejected");
    assert_eq!(out.metrics.get("rewards/accuracies"), Some(1.0));
    assert_eq!(out.metrics.get("logps/chosen"), Some(-10.0));
    assert_close(out.metrics.get("logps/chosen_per_token").unwrap_or(f64::NAN), -10.0 / 3.0, 1e-12, "per token");
    Ok(())
}

#[test]
fn ipo_at_zero_log_ratio_is_inverse_two_beta_squared() -> Result<()> {
    // h = 0: (0 - 1/(2 * 0.1))^2 = 25.
    let inputs =
        with_reference(ObjectiveInputs::preference(sums(&[-6.0], &[3.0])?, sums(&[-8.0], &[2.0])?), &[-6.0], &[-8.0])?;
    assert_close(loss_of(&IpoParams { beta: 0.1 }.compute(&inputs)?), 25.0, 1e-12, "ipo h=0");
    // Policy chosen +3 over 3 tokens (+1/token), rejected -2 over 2 tokens (-1/token): h = 2;
    // beta = 0.25: (2 - 2)^2 = 0.
    let inputs =
        with_reference(ObjectiveInputs::preference(sums(&[-3.0], &[3.0])?, sums(&[-10.0], &[2.0])?), &[-6.0], &[-8.0])?;
    assert_close(loss_of(&IpoParams { beta: 0.25 }.compute(&inputs)?), 0.0, 1e-12, "ipo at target");
    Ok(())
}

#[test]
fn simpo_known_value() -> Result<()> {
    // A_w = -1, A_l = -2, beta 2, ratio 0.5: z = 2 * 1 - 1 = 1; softplus(-1) = 0.31326168751822286.
    let inputs = ObjectiveInputs::preference(sums(&[-4.0], &[4.0])?, sums(&[-6.0], &[3.0])?);
    let out = SimpoParams::default().compute(&inputs)?;
    assert_close(loss_of(&out), 0.313_261_687_518_222_86, 1e-12, "simpo");
    // rewards are beta * A.
    assert_close(out.metrics.get("rewards/chosen").unwrap_or(f64::NAN), -2.0, 1e-12, "simpo reward");
    Ok(())
}

#[test]
fn slime_margin_term_vanishes_once_d_reaches_hard_margin() -> Result<()> {
    // A_w = -0.1, A_l = -2.5, D = 2.4 >= m_h = 1.5: margin term 0.
    // anchor = -0.1 * -0.1 = 0.01; stabiliser = 0.1 * (g(-2) + g(-3)) / 2 with
    // g(l) = softplus(-l - 1.25)^2.5: g(-2) = softplus(0.75)^2.5 = 1.3780912549030686,
    // g(-3) = softplus(1.75)^2.5 = 5.0432538481299565 -> 0.3210672551516513. Total 0.3310672551516513.
    let inputs = ObjectiveInputs::preference(tokens(&[&[-0.1, -0.1]])?, tokens(&[&[-2.0, -3.0]])?);
    let out = SlimeParams::paper().compute(&inputs)?;
    assert_eq!(out.metrics.get("slime/margin"), Some(0.0));
    assert_close(out.metrics.get("slime/anchor").unwrap_or(f64::NAN), 0.01, 1e-15, "anchor");
    assert_close(out.metrics.get("slime/stabilizer").unwrap_or(f64::NAN), 0.321_067_255_151_651_3, 1e-12, "stab");
    assert_close(loss_of(&out), 0.331_067_255_151_651_3, 1e-12, "slime total");
    // The collapse metric: both rejected tokens are below -1.25.
    assert_eq!(out.metrics.get("collapse/rejected_fraction"), Some(1.0));
    Ok(())
}

#[test]
fn slime_at_soft_margin_centre() -> Result<()> {
    // A_w = -0.5, A_l = -1.5, D = 1 = m_s: soft = sigmoid(0) = 0.5, hard = relu(1.5 - 1) = 0.5,
    // margin = 1.0 * 0.25. anchor = 0.05. stabiliser = 0.1 * softplus(0.25)^2.5 = 0.1 * 0.6199697302857804.
    // Total 0.36199697302857803.
    let inputs = ObjectiveInputs::preference(tokens(&[&[-0.5, -0.5]])?, tokens(&[&[-1.5]])?);
    let out = SlimeParams::paper().compute(&inputs)?;
    assert_close(out.metrics.get("slime/margin").unwrap_or(f64::NAN), 0.25, 1e-15, "margin");
    assert_close(loss_of(&out), 0.361_996_973_028_578_03, 1e-12, "slime total");
    // Soft factor off: margin = 1.0 * 0.5 * 1 = 0.5; hard off: 1 * 0.5 = 0.5.
    let no_soft = SlimeParams { use_soft_margin: false, ..SlimeParams::paper() }.compute(&inputs)?;
    assert_close(no_soft.metrics.get("slime/margin").unwrap_or(f64::NAN), 0.5, 1e-15, "no soft");
    let no_hard = SlimeParams { use_hard_margin: false, ..SlimeParams::paper() }.compute(&inputs)?;
    assert_close(no_hard.metrics.get("slime/margin").unwrap_or(f64::NAN), 0.5, 1e-15, "no hard");
    // Authors' code preset: lambda_l = 0.0005 -> 0.05 + 0.0005 * 0.6199697302857804 + 0.25.
    let code = SlimeParams::authors_code().compute(&inputs)?;
    assert_close(loss_of(&code), 0.3 + 0.0005 * 0.619_969_730_285_780_4, 1e-12, "authors-code");
    Ok(())
}

#[test]
fn cpo_and_cpo_simpo_known_values() -> Result<()> {
    // S_w = -4 over 2 tokens, S_l = -6: z = 0.1 * 2 = 0.2; softplus(-0.2) = 0.5981388693815917;
    // NLL = 4 / 2 = 2; alpha 1: 2.5981388693815917.
    let inputs = ObjectiveInputs::preference(sums(&[-4.0], &[2.0])?, sums(&[-6.0], &[3.0])?);
    assert_close(loss_of(&CpoParams::default().compute(&inputs)?), 2.598_138_869_381_591_7, 1e-12, "cpo");
    // CPO-SimPO, beta 2, gamma 0.5, alpha 0: z = 2 * (-2 - -2) - 0.5 = -0.5; softplus(0.5) = 0.9740769841801067.
    let p = CpoParams { beta: 2.0, alpha: 0.0, variant: CpoVariant::CpoSimpo, simpo_gamma: 0.5 };
    assert_close(loss_of(&p.compute(&inputs)?), 0.974_076_984_180_106_7, 1e-12, "cpo-simpo");
    Ok(())
}

#[test]
fn orpo_known_value() -> Result<()> {
    // A_w = ln 0.5: odds 1, log-odds 0. A_l = ln 0.25: log-odds ln(1/3). log_odds = ln 3,
    // logsig(ln 3) = ln(3/4). loss = -ln 0.5 - 0.1 ln 0.75 = 0.7219153878051234.
    let inputs = ObjectiveInputs::preference(sums(&[0.5f64.ln()], &[1.0])?, sums(&[0.25f64.ln() * 2.0], &[2.0])?);
    let out = OrpoParams::default().compute(&inputs)?;
    assert_close(loss_of(&out), 0.721_915_387_805_123_4, 1e-12, "orpo");
    assert_close(out.metrics.get("log_odds_chosen").unwrap_or(f64::NAN), 3f64.ln(), 1e-12, "log odds");
    Ok(())
}

#[test]
fn sft_family_known_values() -> Result<()> {
    // Tokens -1, -2, -3. NLL = 2. f_1 = mean(1 - e^l) = 0.8156660690746936.
    let target = tokens(&[&[-1.0, -2.0, -3.0]])?;
    let inputs = ObjectiveInputs::supervised(target);
    assert_close(loss_of(&SftParams::nll().compute(&inputs)?), 2.0, 1e-12, "nll");
    assert_close(loss_of(&SftParams::one_minus_p().compute(&inputs)?), 0.815_666_069_074_693_6, 1e-12, "1-p");
    // f_alpha -> NLL as alpha -> 0: alpha = 1e-6 gives 2 within ~1e-5.
    let tiny = SftParams { alpha: 1e-6, ..SftParams::nll() };
    assert_close(loss_of(&tiny.compute(&inputs)?), 2.0, 1e-5, "alpha -> 0");
    // p >= 0.2 keeps only e^-1 = 0.368: 1 - e^-1 = 0.6321205588285577, kept 1/3.
    let at_least = SftParams { alpha: 1.0, filter: TokenFilter::ProbAtLeast, threshold: 0.2 };
    let out = at_least.compute(&inputs)?;
    assert_close(loss_of(&out), 0.632_120_558_828_557_7, 1e-12, "thresholded 1-p");
    assert_close(out.metrics.get("sft/kept_fraction").unwrap_or(f64::NAN), 1.0 / 3.0, 1e-12, "kept");
    // p <= 0.2 keeps -2 and -3: NLL = 2.5.
    let at_most = SftParams { alpha: 0.0, filter: TokenFilter::ProbAtMost, threshold: 0.2 };
    assert_close(loss_of(&at_most.compute(&inputs)?), 2.5, 1e-12, "thresholded nll");
    Ok(())
}

#[test]
fn f32_and_bf16_inputs_compute_in_f32() -> Result<()> {
    use candle_core::{DType, Device, Tensor};
    use slime_objectives::SequenceLogps;
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let c = Tensor::new(&[[-0.5f32, -0.5]], &dev)?.to_dtype(dtype)?;
        let r = Tensor::new(&[[-1.5f32, 0.0]], &dev)?.to_dtype(dtype)?;
        let m = Tensor::new(&[[1u8, 1]], &dev)?;
        let rm = Tensor::new(&[[1u8, 0]], &dev)?;
        let inputs =
            ObjectiveInputs::preference(SequenceLogps::from_tokens(&c, &m)?, SequenceLogps::from_tokens(&r, &rm)?);
        let out = SlimeParams::paper().compute(&inputs)?;
        assert_eq!(out.loss.dtype(), DType::F32);
        // Same value as the f64 case above (all inputs exactly representable in bf16).
        assert_close(loss_of(&out), 0.361_996_973_028_578_03, 1e-6, "f32 slime");
    }
    Ok(())
}
