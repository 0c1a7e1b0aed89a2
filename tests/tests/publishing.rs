//! What `cargo publish` and crates.io need from the published crates, and the types their
//! users must name, reachable through the crates themselves.

use std::path::{Path, PathBuf};

const PUBLISHED: [&str; 5] = ["kernels", "objectives", "data", "models", "trainer"];

fn crate_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("crates").join(name)
}

fn manifest(name: &str) -> toml::Table {
    let path = crate_dir(name).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn keywords_and_categories_fit_crates_io() {
    for name in PUBLISHED {
        let package = manifest(name)["package"].as_table().cloned().expect("[package]");
        let keywords = package["keywords"].as_array().expect("keywords");
        assert!(keywords.len() <= 5, "{name}: at most 5 keywords");
        for k in keywords {
            let k = k.as_str().expect("a string");
            // crates.io: at most 20 characters, ASCII alphanumerics, `-` or `_`, starting with a letter.
            let ok = k.len() <= 20
                && k.starts_with(|c: char| c.is_ascii_alphabetic())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            assert!(ok, "{name}: keyword `{k}` is not accepted by crates.io");
        }
        assert!(package.contains_key("description") && package.contains_key("readme"), "{name}");
    }
}

#[test]
fn readmes_link_absolutely_and_tell_how_to_build_fast() {
    for name in PUBLISHED {
        let path = crate_dir(name).join("README.md");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (i, _) in text.match_indices("](") {
            let target = &text[i + 2..];
            assert!(
                target.starts_with("https://") || target.starts_with('#'),
                "{name}/README.md: a relative link breaks on crates.io and docs.rs: {}",
                target.lines().next().unwrap_or_default()
            );
        }
        assert!(text.contains("[profile.dev.package.\"*\"]\nopt-level = 3"), "{name}/README.md: fast-build snippet");
    }
}

#[test]
fn cargo_install_gets_only_the_trainer_command() {
    let manifest = manifest("trainer");
    let bins = manifest["bin"].as_array().expect("[[bin]]");
    let bench = bins.iter().find(|b| b["name"].as_str() == Some("slime-step-bench")).expect("the benchmark binary");
    let features = bench["required-features"].as_array().expect("required-features");
    assert!(features.iter().any(|f| f.as_str() == Some("bench")), "{bench:?}");
    let default = manifest["features"]["default"].as_array().expect("default features");
    assert!(!default.iter().any(|f| f.as_str() == Some("bench")), "bench is not a default feature");
}

/// Compiles only if the types in the crates' signatures are reachable through the crates.
#[test]
fn foreign_types_of_the_public_api_are_re_exported() {
    let schema: slime_data::arrow::datatypes::Schema = slime_data::standard_schema(&slime_data::ColumnNames::default());
    assert!(schema.fields().len() >= 2);
    let tokenizer: fn(&slime_data::TextTokenizer) -> &slime_data::tokenizers::Tokenizer =
        slime_data::TextTokenizer::inner;
    let _ = tokenizer;
    let device = slime_objectives::candle_core::Device::Cpu;
    let t = slime_models::candle_core::Tensor::zeros(2, slime_models::candle_core::DType::F32, &device).expect("zeros");
    assert_eq!(t.dims(), [2]);
    let _: Option<slime_models::candle_nn::VarMap> = None;
    let objective: slime_trainer::slime_objectives::Objective = "dpo".parse().expect("dpo");
    assert!(objective.needs_reference());
    let _: Option<slime_trainer::slime_models::CausalLm> = None;
    let _: Option<slime_trainer::slime_data::TextTokenizer> = None;
    let _: Option<slime_trainer::candle_core::DType> = None;
}
