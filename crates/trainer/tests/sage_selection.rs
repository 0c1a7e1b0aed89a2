//! SAGE selection in a real (tiny) run: the objective's own target is used, consecutive
//! refreshes re-score carried pairs and log their stability, and sizes that would shrink the
//! optimiser batch are rejected by name.

use slime_objectives::{DpoParams, Objective, SlimeParams};
use slime_trainer::config::RunConfig;
use slime_trainer::run::{RunOptions, run_with};
use slime_trainer::selection::SelectionKind;

fn sage(objective: Objective) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.hidden = 16;
    cfg.model.layers = 1;
    cfg.data.pairs = 60;
    cfg.data.eval_pairs = 4;
    cfg.sft.steps = 2;
    cfg.sft.batch_size = 4;
    cfg.preference.steps = 4;
    cfg.preference.batch_size = 2;
    cfg.preference.grad_accum = 2;
    cfg.preference.objective = objective;
    cfg.preference.selection = SelectionKind::Sage;
    cfg.preference.sage.pool_size = 8;
    cfg.preference.sage.refresh_every = 2;
    cfg.eval.generations = 1;
    cfg.eval.max_new_tokens = 4;
    cfg.eval.every = 100;
    cfg.checkpoint.every = 0;
    cfg
}

/// The preference lines of metrics.jsonl that carry a refresh.
fn refreshes(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v.get("selection/pool").is_some())
        .collect()
}

fn number(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key).and_then(serde_json::Value::as_f64).unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn refreshes_use_the_objectives_target_and_rescore_carried_pairs() {
    for (objective, target) in
        [(Objective::Slime(SlimeParams::paper()), 1.5), (Objective::Dpo(DpoParams::default()), 0.0)]
    {
        let dir = tempfile::tempdir().expect("tempdir");
        run_with(&sage(objective), dir.path(), &RunOptions::default()).expect("run");
        let r = refreshes(dir.path());
        assert_eq!(r.len(), 2, "refreshes at steps 1 and 3: {r:?}");
        for v in &r {
            assert_eq!(number(v, "selection/pool"), 8.0);
            assert_eq!(number(v, "selection/target"), target);
            let counted = number(v, "selection/informative")
                + number(v, "selection/trivial")
                + number(v, "selection/unstable")
                + number(v, "selection/not_finite");
            assert_eq!(counted, 8.0, "{v}");
        }
        // Half the second pool was scored at the first refresh too.
        assert_eq!(number(&r[0], "selection/rescored"), 0.0);
        assert_eq!(number(&r[1], "selection/rescored"), 4.0);
        assert!(number(&r[1], "selection/mean_abs_margin_change") > 0.0, "training moved the margins");
    }
}

#[test]
fn a_pool_smaller_than_the_optimiser_batch_is_rejected_by_name() {
    let mut cfg = sage(Objective::Slime(SlimeParams::paper()));
    cfg.preference.sage.pool_size = 3;
    let e = cfg.validate().expect_err("pool < batch").to_string();
    assert!(e.contains("preference.sage.pool_size = 3") && e.contains("= 4"), "{e}");
    // A pool larger than the preference split (40 of the 60 pairs) is rejected at the stage.
    let mut cfg = sage(Objective::Slime(SlimeParams::paper()));
    cfg.preference.sage.pool_size = 41;
    let dir = tempfile::tempdir().expect("tempdir");
    let e = run_with(&cfg, dir.path(), &RunOptions::default()).expect_err("pool > split").to_string();
    assert!(e.contains("exceeds the 40 pairs of the preference split"), "{e}");
}
