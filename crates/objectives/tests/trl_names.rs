//! TRL's names for objective parameters: accepted where they mean the same as ours, converted
//! where only the scale differs (SimPO's `simpo_gamma`), rejected by name where they mean
//! something else.

use slime_objectives::{CpoParams, CpoVariant, DpoLossType, DpoParams, Objective, SimpoParams};

fn toml_objective(s: &str) -> Result<Objective, String> {
    let objective: Objective = toml::from_str(s).map_err(|e| e.to_string())?;
    objective.validate().map_err(|e| e.to_string())?;
    Ok(objective)
}

fn json_objective(s: &str) -> Result<Objective, String> {
    serde_json::from_str(s).map_err(|e| e.to_string())
}

#[test]
fn dpo_loss_type_is_our_loss() {
    let ours = toml_objective("type = \"dpo\"\nbeta = 0.2\nloss = \"robust\"\nlabel_smoothing = 0.1").expect("ours");
    let trl = toml_objective("type = \"dpo\"\nbeta = 0.2\nloss_type = \"robust\"\nlabel_smoothing = 0.1").expect("trl");
    assert_eq!(trl, ours);
    let json = json_objective(r#"{"type": "dpo", "beta": 0.2, "loss_type": "robust", "label_smoothing": 0.1}"#);
    assert_eq!(json.expect("json"), ours);
    for (trl_name, ours) in [("sigmoid", DpoLossType::Sigmoid), ("hinge", DpoLossType::Hinge)] {
        let params: DpoParams = toml::from_str(&format!("loss_type = \"{trl_name}\"")).expect(trl_name);
        assert_eq!(params.loss, ours);
    }
    // Writing uses our name, and reads back.
    let written = toml::to_string(&ours).expect("write");
    assert!(written.contains("loss = \"robust\"") && !written.contains("loss_type"), "{written}");
}

#[test]
fn dpo_loss_types_with_another_meaning_are_rejected_by_name() {
    let err = toml_objective("type = \"dpo\"\nloss_type = \"ipo\"").expect_err("ipo");
    assert!(err.contains("type = \"ipo\""), "points to the IPO objective: {err}");
    let err = toml_objective("type = \"dpo\"\nloss_type = \"nca_pair\"").expect_err("nca_pair");
    assert!(err.contains("nca_pair") && err.contains("sigmoid, robust or hinge"), "{err}");
    let err = toml_objective("type = \"dpo\"\nloss = \"sigmoid\"\nloss_type = \"hinge\"").expect_err("both");
    assert!(err.contains("loss"), "ours and TRL's name together are a duplicate: {err}");
}

#[test]
fn cpo_alpha_and_loss_type_are_ours() {
    let ours = toml_objective("type = \"cpo\"\nbeta = 0.5\nalpha = 0.25\nvariant = \"cpo-simpo\"\nsimpo_gamma = 0.3")
        .expect("ours");
    let trl = toml_objective("type = \"cpo\"\nbeta = 0.5\ncpo_alpha = 0.25\nloss_type = \"simpo\"\nsimpo_gamma = 0.3")
        .expect("trl");
    assert_eq!(trl, ours);
    assert_eq!(
        ours,
        Objective::Cpo(CpoParams { beta: 0.5, alpha: 0.25, variant: CpoVariant::CpoSimpo, simpo_gamma: 0.3 })
    );
    let sigmoid: CpoParams = toml::from_str("loss_type = \"sigmoid\"").expect("sigmoid");
    assert_eq!(sigmoid.variant, CpoVariant::Cpo);
    for unsupported in ["hinge", "ipo", "alphapo"] {
        let err = toml_objective(&format!("type = \"cpo\"\nloss_type = \"{unsupported}\"")).expect_err(unsupported);
        assert!(err.contains(unsupported) && err.contains("cpo-simpo"), "{err}");
    }
}

#[test]
fn simpo_gamma_is_converted_to_gamma_beta_ratio() {
    // TRL's simpo_gamma is the margin gamma itself; ours is gamma / beta.
    let trl = toml_objective("type = \"simpo\"\nbeta = 2.5\nsimpo_gamma = 1.5").expect("trl");
    let Objective::Simpo(p) = &trl else { panic!("not simpo: {trl:?}") };
    assert_eq!(p.gamma_beta_ratio, 0.6);
    assert_eq!(p.gamma(), 1.5);
    assert_eq!(trl, toml_objective("type = \"simpo\"\nbeta = 2.5\ngamma_beta_ratio = 0.6").expect("ours"));
    // Without beta, the default beta (2.0) divides.
    let p: SimpoParams = toml::from_str("simpo_gamma = 0.5").expect("default beta");
    assert_eq!((p.beta, p.gamma_beta_ratio, p.gamma()), (2.0, 0.25, 0.5));
    // A translated CPOConfig(loss_type = "simpo", cpo_alpha = 0) pastes as is, also as JSON.
    let pasted =
        json_objective(r#"{"type": "simpo", "loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.5, "simpo_gamma": 1.5}"#);
    assert_eq!(pasted.expect("pasted"), trl);
    // Written back with our name only.
    let written = toml::to_string(&trl).expect("write");
    assert!(written.contains("gamma_beta_ratio = 0.6") && !written.contains("simpo_gamma"), "{written}");
}

#[test]
fn simpo_rejects_trl_settings_that_are_not_simpo() {
    for (text, needle) in [
        ("type = \"simpo\"\ngamma_beta_ratio = 0.5\nsimpo_gamma = 1.0", "not both"),
        ("type = \"simpo\"\ncpo_alpha = 1.0", "type = \"cpo\""),
        ("type = \"simpo\"\nloss_type = \"sigmoid\"", "sigmoid"),
        ("type = \"simpo\"\nsimpo_gamma = -1.0", "simpo_gamma = -1"),
        ("type = \"simpo\"\ngama = 1.0", "gama"),
    ] {
        let err = toml_objective(text).expect_err(text);
        assert!(err.contains(needle), "{text}: `{err}` should mention `{needle}`");
    }
}
