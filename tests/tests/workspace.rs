//! Workspace-level invariants: which crate may depend on which, and the ablation grid of
//! `cargo xtask ablate` against the objectives and run configs it feeds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use slime_objectives::Objective;
use xtask::ablate::{ModelChoice, Options, PRESETS, cell_config};
use xtask::grid::Grid;

/// The crates that know nothing of each other.
const INDEPENDENT: [&str; 3] = ["slime-objectives", "slime-data", "slime-models"];
/// The CPU kernels every model crate may use: they depend on no workspace crate.
const KERNELS: &str = "slime-kernels";
/// What xtask must not link, directly or through a workspace crate.
const MODEL_CODE: [&str; 3] = ["candle-core", "candle-nn", "candle-transformers"];

/// Every broken rule of the dependency direction in `cargo metadata --no-deps` output: the
/// independent crates depend on none of each other (any dependency kind), the kernels on no
/// workspace crate, and xtask reaches no candle crate through its own dependencies or the
/// workspace crates it depends on.
fn violations(metadata: &Value) -> Vec<String> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default().to_string();
        let list = package["dependencies"].as_array().into_iter().flatten();
        deps.insert(name, list.filter_map(|d| d["name"].as_str().map(String::from)).collect());
    }
    let mut found = Vec::new();
    for a in INDEPENDENT {
        for b in deps.get(a).into_iter().flatten() {
            if INDEPENDENT.contains(&b.as_str()) {
                found.push(format!("{a} depends on {b}"));
            }
        }
    }
    for b in deps.get(KERNELS).into_iter().flatten() {
        if b.starts_with("slime-") || b == "xtask" {
            found.push(format!("{KERNELS} depends on {b}"));
        }
    }
    // Walk xtask's dependencies through the workspace's own crates.
    let mut path_to: BTreeMap<String, String> = BTreeMap::from([("xtask".to_string(), "xtask".to_string())]);
    let mut todo = vec!["xtask".to_string()];
    while let Some(crate_name) = todo.pop() {
        for dep in deps.get(&crate_name).into_iter().flatten() {
            let path = format!("{} -> {dep}", path_to[&crate_name]);
            if MODEL_CODE.contains(&dep.as_str()) {
                found.push(format!("xtask links model code: {path}"));
            } else if deps.contains_key(dep) && !path_to.contains_key(dep) {
                path_to.insert(dep.clone(), path);
                todo.push(dep.clone());
            }
        }
    }
    found
}

#[test]
fn dependencies_point_one_way() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(&root)
        .output()
        .expect("running cargo metadata");
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    let names: BTreeSet<&str> =
        metadata["packages"].as_array().expect("packages").iter().filter_map(|p| p["name"].as_str()).collect();
    for name in INDEPENDENT.iter().chain(&[KERNELS, "slime-trainer", "xtask"]) {
        assert!(names.contains(name), "{name} is a workspace member");
    }
    assert_eq!(violations(&metadata), Vec::<String>::new());
}

/// `cargo tree` of `args` as `package version -> features` (host target).
fn resolved_features(args: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(&cargo)
        .args(["tree", "--offline", "--prefix", "none", "-f", "{p}|{f}"])
        .args(args)
        .current_dir(&root)
        .output()
        .expect("running cargo tree");
    assert!(output.status.success(), "cargo tree: {}", String::from_utf8_lossy(&output.stderr));
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let line = line.trim_end_matches(" (*)");
        let Some((package, features)) = line.split_once('|') else { continue };
        let package = package.split(" (").next().unwrap_or(package).to_string();
        out.entry(package).or_default().extend(features.split(',').filter(|f| !f.is_empty()).map(String::from));
    }
    out
}

/// `cargo xtask ablate` builds the trainer alone in release; `cargo test --workspace --release`
/// builds every member with its dev-dependencies. Cargo shares a compiled crate between the two
/// only where both resolve it with the same features, so a feature that a test-only dependency
/// turns on must also be named by slime-trainer (see its manifest), or candle and arrow compile
/// twice.
#[test]
fn the_trainer_alone_resolves_the_features_of_the_test_build() {
    let trainer = resolved_features(&["-p", "slime-trainer", "-e", "normal,build"]);
    let workspace = resolved_features(&["--workspace", "-e", "normal,build,dev"]);
    let differing: Vec<String> = trainer
        .iter()
        .filter_map(|(package, features)| {
            let all = workspace.get(package)?;
            (all != features)
                .then(|| format!("{package}: the tests add {:?}", all.difference(features).collect::<Vec<_>>()))
        })
        .collect();
    assert!(trainer.keys().any(|k| k.starts_with("candle-core ")), "the trainer resolves candle-core");
    assert_eq!(differing, Vec::<String>::new());
}

#[test]
fn the_dependency_check_finds_each_kind_of_violation() {
    let package = |name: &str, deps: &[&str]| json!({"name": name, "dependencies": deps.iter().map(|d| json!({"name": d})).collect::<Vec<_>>()});
    let metadata = json!({"packages": [
        package("slime-objectives", &["candle-core", "slime-data"]),
        package("slime-data", &["arrow"]),
        package("slime-models", &["candle-nn", "slime-objectives"]),
        package("slime-trainer", &["slime-models", "slime-data", "slime-objectives"]),
        package("slime-kernels", &["gemm", "slime-models"]),
        package("xtask", &["serde", "slime-trainer"]),
    ]});
    let found = violations(&metadata);
    assert!(found.contains(&"slime-kernels depends on slime-models".to_string()), "{found:?}");
    assert!(found.contains(&"slime-objectives depends on slime-data".to_string()), "{found:?}");
    assert!(found.contains(&"slime-models depends on slime-objectives".to_string()), "{found:?}");
    assert!(
        found.iter().any(|v| v.contains("xtask -> slime-trainer -> slime-models -> candle-nn")),
        "a workspace crate in between is followed: {found:?}"
    );
    let clean = json!({"packages": [package("slime-data", &["arrow"]), package("xtask", &["serde", "toml"])]});
    assert!(violations(&clean).is_empty());
}

#[test]
fn every_grid_objective_is_a_valid_objective() {
    let grid = Grid::default_grid().expect("default grid");
    let mut used = BTreeSet::new();
    for variant in &grid.variants {
        let Some(table) = &variant.objective else {
            assert!(variant.is_sft(), "{}", variant.name);
            continue;
        };
        let objective: Objective = table.clone().try_into().unwrap_or_else(|e| panic!("variant {}: {e}", variant.name));
        objective.validate().unwrap_or_else(|e| panic!("variant {}: {e}", variant.name));
        assert_eq!(Some(objective.name()), table["type"].as_str());
        // The inline form a cell config gets reads back as the same objective.
        let inline: Objective = toml::from_str::<toml::Table>(&format!("o = {}", variant.objective_inline()))
            .expect("inline table")["o"]
            .clone()
            .try_into()
            .expect("inline objective");
        assert_eq!(inline, objective, "{}", variant.name);
        used.insert(objective.name());
    }
    // The grid compares SLIME against every preference baseline.
    let preference: BTreeSet<&str> = Objective::NAMES.into_iter().filter(|n| *n != "sft").collect();
    assert_eq!(used, preference);
}

#[test]
fn every_cell_config_is_a_valid_run_config() {
    // Every grid cell, for the embedded task and for every preset, is a config the trainer
    // accepts (parsed and validated by the trainer's own code).
    let grid = Grid::default_grid().expect("default grid");
    let mut setups = vec![Options::default(), xtask::ablate::parse(["--model", "tiny-gemma"]).expect("tiny-gemma")];
    for p in PRESETS {
        setups.push(xtask::ablate::parse(["--preset", p.name]).expect("preset"));
    }
    setups.push(
        xtask::ablate::parse(["--preset", "smollm2-dpo-en", "--device", "cuda:1", "--steps", "200"]).expect("cuda"),
    );
    for opts in &setups {
        for variant in &grid.variants {
            let tiny = match &opts.model {
                ModelChoice::Tiny(names) => names.last().map(String::as_str),
                ModelChoice::Pretrained { .. } => None,
            };
            let name = variant.name.as_str();
            let start = (!variant.is_sft()).then(|| Path::new("/tmp/grid").join(format!("{}-seed1", variant.start())));
            let text = cell_config(tiny, variant, 1, opts, start.as_deref());
            let cfg =
                slime_trainer::config::RunConfig::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
            assert_eq!(cfg.name, name);
            assert_eq!(cfg.init.is_some(), !variant.is_sft(), "{text}");
            assert_eq!(cfg.eval.start_from, start, "a preference cell takes its SFT cell's evaluation");
            assert_eq!(cfg.preference.steps == 0, variant.is_sft());
            if variant.is_sft() {
                let expected = match variant.sft.as_ref().and_then(|t| t.get("objective")) {
                    Some(o) => o.clone().try_into().expect("SFT objective"),
                    None => Objective::Sft(slime_objectives::SftParams::nll()),
                };
                assert_eq!(cfg.sft.objective, expected, "{name}");
            }
            if variant.preference.as_ref().is_some_and(|p| p.contains_key("selection")) {
                assert_eq!(cfg.preference.selection, slime_trainer::selection::SelectionKind::Sage, "{name}");
            }
            if let Some(model) = tiny {
                assert_eq!(cfg.model.preset, model);
            }
            assert_eq!(cfg.model.device, opts.device.as_deref().unwrap_or("cpu"));
            if !variant.is_sft() {
                let expected: Objective = variant.objective.clone().expect("objective").try_into().expect("objective");
                assert_eq!(cfg.preference.objective, expected, "{name}");
            }
            if let ModelChoice::Pretrained { .. } = opts.model {
                assert!(cfg.model.lora.as_ref().is_some_and(|l| l.sft), "{text}");
                if !variant.is_sft() {
                    assert_eq!(cfg.eval.every, opts.steps);
                }
            }
        }
    }
}

/// The report reads the evaluation keys the trainer writes: xtask cannot link the objectives
/// crate (it holds no model code), so its copies are checked against the shared constants here.
#[test]
fn the_report_reads_the_keys_the_trainer_writes() {
    use slime_trainer::metrics::eval;
    let read = xtask::report::COLUMNS.iter().map(|c| c.0).chain(xtask::report::CURVES.iter().map(|c| c.0));
    for key in read {
        assert!(eval::ALL.contains(&key), "xtask report reads `{key}`, which no evaluation writes");
    }
    assert!(xtask::report::COLUMNS.iter().any(|c| c.0 == eval::CHOSEN_LOGP_DRIFT));
}
