//! The one list of objectives: names, the `type` dispatch and each objective's metric keys.

mod common;

use std::collections::BTreeSet;

use common::{tokens, with_reference};
use slime_objectives::metrics::{self, LOSS};
use slime_objectives::{
    CpoParams, DpoParams, IpoParams, Objective, ObjectiveInputs, ObjectiveKind, OrpoParams, SftParams, SimpoParams,
    SlimeParams,
};

/// The names users write in configs; renaming one breaks every existing config.
#[test]
fn names_are_the_documented_config_names() {
    assert_eq!(Objective::NAMES, ["slime", "dpo", "ipo", "simpo", "cpo", "orpo", "sft"]);
    let by_type: Vec<(&str, Objective)> = vec![
        (SlimeParams::NAME, SlimeParams::default().into()),
        (DpoParams::NAME, DpoParams::default().into()),
        (IpoParams::NAME, IpoParams::default().into()),
        (SimpoParams::NAME, SimpoParams::default().into()),
        (CpoParams::NAME, CpoParams::default().into()),
        (OrpoParams::NAME, OrpoParams::default().into()),
        (SftParams::NAME, SftParams::default().into()),
    ];
    for (name, objective) in by_type {
        assert_eq!(objective.name(), name);
        assert_eq!(name.parse::<Objective>().expect("name"), objective, "{name}: FromStr gives the defaults");
        let table: Objective = toml::from_str(&format!("type = \"{name}\"")).expect("type tag");
        assert_eq!(table, objective, "{name}: the type tag gives the defaults");
        let written = toml::to_string(&objective).expect("serialise");
        assert!(written.starts_with(&format!("type = \"{name}\"\n")), "{name}: {written}");
    }
}

#[test]
fn unknown_names_list_the_known_ones() {
    let err = "kto".parse::<Objective>().expect_err("kto").to_string();
    assert!(err.contains("kto") && err.contains(&Objective::NAMES.join(", ")), "{err}");
    let err = toml::from_str::<Objective>("type = \"kto\"").expect_err("kto").to_string();
    assert!(err.contains("kto") && err.contains("simpo"), "{err}");
    let err = toml::from_str::<Objective>("beta = 0.1").expect_err("no type").to_string();
    assert!(err.contains("type") && err.contains("slime"), "{err}");
}

/// Two pairs with per-token log-probs on both sides and reference sums.
fn inputs(objective: &Objective) -> ObjectiveInputs {
    let chosen = tokens(&[&[-0.4, -0.9, -0.2], &[-1.1, -0.3]]).expect("chosen");
    let rejected = tokens(&[&[-2.5, -0.7], &[-0.6, -3.0, -1.4]]).expect("rejected");
    if !objective.is_preference() {
        return ObjectiveInputs::supervised(chosen);
    }
    with_reference(ObjectiveInputs::preference(chosen, rejected), &[-1.7, -1.2], &[-3.0, -4.5]).expect("reference")
}

/// Each objective records exactly `loss`, its loss terms and its listed metrics, so a training
/// loop can rely on the lists (and a new metric cannot be recorded without being listed).
#[test]
fn each_objective_records_exactly_the_keys_it_lists() {
    let mut variants: Vec<Objective> = Objective::NAMES.iter().map(|n| n.parse().expect("name")).collect();
    variants.push(SftParams::one_minus_p().into());
    variants.push(CpoParams { variant: slime_objectives::CpoVariant::CpoSimpo, ..CpoParams::default() }.into());
    variants.push(SlimeParams { use_stabilizer: false, use_anchor: false, ..SlimeParams::paper() }.into());
    for objective in variants {
        let out = objective.compute(&inputs(&objective)).expect("compute");
        let recorded: BTreeSet<&str> = out.metrics.iter().map(|(k, _)| k).collect();
        let listed: BTreeSet<&str> = [LOSS]
            .into_iter()
            .chain(objective.loss_terms().iter().copied())
            .chain(objective.metric_keys().iter().copied())
            .collect();
        assert_eq!(recorded, listed, "{}", objective.name());
        let terms: BTreeSet<&str> = objective.loss_terms().iter().copied().collect();
        assert_eq!(terms.len(), objective.loss_terms().len(), "{}: a term listed twice", objective.name());
        assert!(
            objective.metric_keys().iter().all(|k| !terms.contains(k)),
            "{}: a key is both a loss term and a metric",
            objective.name()
        );
    }
}

/// SLIME's per-example loss is the sum of its three terms; CPO's and ORPO's terms weigh in as
/// their formulas say. The listed terms are the loss's parts, not diagnostics.
#[test]
fn loss_terms_add_up_to_the_loss() {
    let get = |out: &slime_objectives::LossOutput, key: &str| out.metrics.get(key).unwrap_or_else(|| panic!("{key}"));
    let slime: Objective = SlimeParams::paper().into();
    let out = slime.compute(&inputs(&slime)).expect("slime");
    let sum: f64 = slime.loss_terms().iter().map(|k| get(&out, k)).sum();
    common::assert_close(sum, get(&out, LOSS), 1e-12, "slime terms");

    let cpo = CpoParams { alpha: 0.5, ..CpoParams::default() };
    let out = Objective::from(cpo.clone()).compute(&inputs(&cpo.clone().into())).expect("cpo");
    let [preference, nll] = CpoParams::LOSS_TERMS else { panic!("two CPO terms") };
    common::assert_close(get(&out, preference) + cpo.alpha * get(&out, nll), get(&out, LOSS), 1e-12, "cpo terms");

    let orpo = OrpoParams { beta: 0.3 };
    let out = Objective::from(orpo.clone()).compute(&inputs(&orpo.clone().into())).expect("orpo");
    let [nll, ratio] = OrpoParams::LOSS_TERMS else { panic!("two ORPO terms") };
    common::assert_close(get(&out, nll) - orpo.beta * get(&out, ratio), get(&out, LOSS), 1e-12, "orpo terms");
}

#[test]
fn every_preference_objective_records_the_shared_keys() {
    for name in Objective::NAMES {
        let objective: Objective = name.parse().expect("name");
        let has_all = metrics::PREFERENCE.iter().all(|k| objective.metric_keys().contains(k));
        assert_eq!(has_all, objective.is_preference(), "{name}");
    }
}
