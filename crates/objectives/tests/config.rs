//! Configuration: the `type` tag, presets, defaults, unknown fields and invalid values.

use slime_objectives::{
    Aggregation, CpoParams, DpoLossType, DpoParams, Objective, ObjectiveError, SftParams, SlimeParams, TokenFilter,
};

fn parse(s: &str) -> Result<Objective, String> {
    let objective: Objective = toml::from_str(s).map_err(|e| e.to_string())?;
    objective.validate().map_err(|e| e.to_string())?;
    Ok(objective)
}

#[test]
fn slime_presets_and_overrides() {
    assert_eq!(parse("type = \"slime\"").expect("default"), Objective::Slime(SlimeParams::paper()));
    let code = parse("type = \"slime\"\npreset = \"authors-code\"").expect("authors-code");
    assert_eq!(code, Objective::Slime(SlimeParams::authors_code()));
    let Objective::Slime(p) =
        parse("type = \"slime\"\npreset = \"authors-code\"\np = 1.5\nuse_soft_margin = false").expect("override")
    else {
        panic!("not slime")
    };
    assert_eq!((p.lambda_l, p.p, p.use_soft_margin, p.use_hard_margin), (0.0005, 1.5, false, true));
}

#[test]
fn resolved_config_round_trips_without_the_preset() {
    let original = Objective::Slime(SlimeParams { p: 3.0, ..SlimeParams::authors_code() });
    let written = toml::to_string(&original).expect("serialise");
    assert!(written.contains("lambda_l = 0.0005") && !written.contains("preset"), "{written}");
    assert_eq!(parse(&written).expect("re-read"), original);
    for objective in Objective::NAMES.map(|n| n.parse::<Objective>().expect("name")) {
        let json = serde_json::to_string(&objective).expect("json");
        assert_eq!(serde_json::from_str::<Objective>(&json).expect("json back"), objective);
    }
}

#[test]
fn defaults_are_the_papers() {
    assert_eq!(parse("type = \"dpo\"").expect("dpo"), Objective::Dpo(DpoParams::default()));
    let Objective::Dpo(d) = parse("type = \"dpo\"\nloss = \"robust\"\nlabel_smoothing = 0.1").expect("robust") else {
        panic!()
    };
    assert_eq!((d.beta, d.loss, d.label_smoothing), (0.1, DpoLossType::Robust, 0.1));
    let Objective::Simpo(s) = parse("type = \"simpo\"").expect("simpo") else { panic!() };
    assert_eq!((s.beta, s.gamma_beta_ratio, s.gamma()), (2.0, 0.5, 1.0));
    assert_eq!(parse("type = \"cpo\"").expect("cpo"), Objective::Cpo(CpoParams::default()));
    let Objective::Sft(f) =
        parse("type = \"sft\"\nalpha = 1.0\nfilter = \"prob-at-least\"\nthreshold = 0.1").expect("sft")
    else {
        panic!()
    };
    assert_eq!(f, SftParams { alpha: 1.0, filter: TokenFilter::ProbAtLeast, threshold: 0.1 });
}

#[test]
fn unknown_fields_and_types_are_rejected() {
    for (text, needle) in [
        ("type = \"slime\"\nlambda = 0.1", "lambda"),
        ("type = \"dpo\"\ngamma = 0.1", "gamma"),
        ("type = \"simpo\"\nbeta = \"two\"", "beta"),
        ("type = \"slime\"\npreset = \"fast\"", "fast"),
        ("type = \"kto\"", "kto"),
    ] {
        let err = parse(text).expect_err(text);
        assert!(err.contains(needle), "{text}: error `{err}` should mention `{needle}`");
    }
}

#[test]
fn invalid_values_name_the_field_and_range() {
    for (text, field) in [
        ("type = \"slime\"\nlambda_w = -0.1", "lambda_w"),
        ("type = \"slime\"\np = 0.0", "`p`"),
        ("type = \"slime\"\nkappa = -1.0", "kappa"),
        ("type = \"slime\"\ndelta = nan", "delta"),
        ("type = \"dpo\"\nlabel_smoothing = 0.5", "label_smoothing"),
        ("type = \"dpo\"\nlabel_smoothing = -0.1", "label_smoothing"),
        ("type = \"dpo\"\nbeta = 0.0", "beta"),
        ("type = \"ipo\"\nbeta = inf", "beta"),
        ("type = \"simpo\"\ngamma_beta_ratio = -1.0", "gamma_beta_ratio"),
        ("type = \"cpo\"\nalpha = -1.0", "alpha"),
        ("type = \"sft\"\nthreshold = 0.5", "threshold"),
        ("type = \"sft\"\nfilter = \"prob-at-most\"\nthreshold = 1.5", "threshold"),
        ("type = \"dpo\"\nloss = \"hinge\"\nlabel_smoothing = 0.1", "hinge"),
    ] {
        let err = parse(text).expect_err(text);
        assert!(err.contains(field), "{text}: `{err}` should name `{field}`");
    }
    // compute() also refuses invalid parameters, so an unvalidated struct never silently runs.
    let bad = Objective::Slime(SlimeParams { p: -1.0, ..SlimeParams::paper() });
    let dev = candle_core::Device::Cpu;
    let t = candle_core::Tensor::new(&[[-1.0f32]], &dev).expect("t");
    let m = candle_core::Tensor::new(&[[1u8]], &dev).expect("m");
    let side = slime_objectives::SequenceLogps::from_tokens(&t, &m).expect("side");
    let inputs = slime_objectives::ObjectiveInputs::preference(side.clone(), side);
    assert!(matches!(bad.compute(&inputs), Err(ObjectiveError::InvalidParam { field: "p", .. })));
}

#[test]
fn requirements_answer_the_trainers_questions() {
    let get = |name: &str| name.parse::<Objective>().expect("name");
    assert!(get("dpo").needs_reference() && get("ipo").needs_reference());
    for name in ["slime", "simpo", "cpo", "orpo", "sft"] {
        assert!(!get(name).needs_reference(), "{name}");
    }
    assert_eq!(get("dpo").aggregation(), Aggregation::Sum);
    assert_eq!(get("simpo").aggregation(), Aggregation::Mean);
    assert_eq!(get("sft").aggregation(), Aggregation::PooledTokens);
    assert!(!get("sft").is_preference() && get("orpo").is_preference());
    assert!(get("slime").requirements().rejected_tokens);
    let no_stab = Objective::Slime(SlimeParams { use_stabilizer: false, ..SlimeParams::paper() });
    assert!(!no_stab.requirements().rejected_tokens);
    assert!(!get("sft").requirements().chosen_tokens);
    assert!(Objective::Sft(SftParams::one_minus_p()).requirements().chosen_tokens);
    assert!("kto".parse::<Objective>().is_err());
}

#[test]
fn missing_inputs_are_named() {
    let dev = candle_core::Device::Cpu;
    let sums = |v: f32| {
        slime_objectives::SequenceLogps::from_sums(
            &candle_core::Tensor::new(&[v], &dev).expect("s"),
            &candle_core::Tensor::new(&[2f32], &dev).expect("n"),
        )
        .expect("sums")
    };
    let inputs = slime_objectives::ObjectiveInputs::preference(sums(-1.0), sums(-2.0));
    let err = get_err(&"dpo".parse::<Objective>().expect("dpo"), &inputs);
    assert!(err.contains("reference"), "{err}");
    let err = get_err(&"slime".parse::<Objective>().expect("slime"), &inputs);
    assert!(err.contains("per-token rejected"), "{err}");
    let err = get_err(
        &"simpo".parse::<Objective>().expect("simpo"),
        &slime_objectives::ObjectiveInputs::supervised(sums(-1.0)),
    );
    assert!(err.contains("rejected"), "{err}");
    // A sequence without completion tokens is named by index.
    let zero = slime_objectives::SequenceLogps::from_sums(
        &candle_core::Tensor::new(&[-1f32, -2.0], &dev).expect("s"),
        &candle_core::Tensor::new(&[3f32, 0.0], &dev).expect("n"),
    )
    .expect("sums");
    let err = get_err(
        &"simpo".parse::<Objective>().expect("simpo"),
        &slime_objectives::ObjectiveInputs::preference(zero.clone(), zero),
    );
    assert!(err.contains("sequence 1"), "{err}");
}

fn get_err(objective: &Objective, inputs: &slime_objectives::ObjectiveInputs) -> String {
    objective.compute(inputs).expect_err("should fail").to_string()
}
