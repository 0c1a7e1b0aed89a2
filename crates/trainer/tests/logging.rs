//! The command line's log lines go through `tracing`: shown at `info` by default, filtered by
//! `RUST_LOG`.

use std::process::{Command, Output};

const CONFIG: &str = r#"
[model]
hidden = 16
layers = 1

[data]
pairs = 30
eval_pairs = 4

[sft]
steps = 2
batch_size = 4

[preference]
steps = 0

[eval]
generations = 1
max_new_tokens = 4

[checkpoint]
every = 0
"#;

fn train(rust_log: Option<&str>) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("run.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slime-trainer"));
    cmd.arg("train").arg("--config").arg(&config).arg("--run-dir").arg(dir.path().join("run"));
    cmd.args(["--progress", "lines"]);
    match rust_log {
        Some(filter) => cmd.env("RUST_LOG", filter),
        None => cmd.env_remove("RUST_LOG"),
    };
    let out = cmd.output().expect("spawn slime-trainer");
    assert!(out.status.success(), "slime-trainer failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn progress_lines_are_info_events_filtered_by_rust_log() {
    let default = String::from_utf8_lossy(&train(None).stderr).into_owned();
    let line = default.lines().find(|l| l.contains("[sft] step 2/2")).unwrap_or_else(|| panic!("{default}"));
    assert!(line.contains("INFO") && line.contains("slime_trainer::progress"), "{line}");
    assert!(!line.contains('\u{1b}'), "no colour codes when stderr is not a terminal: {line:?}");

    let quiet = String::from_utf8_lossy(&train(Some("warn")).stderr).into_owned();
    assert!(!quiet.contains("[sft] step"), "RUST_LOG=warn hides info lines:\n{quiet}");

    let targeted = String::from_utf8_lossy(&train(Some("warn,slime_trainer::progress=info")).stderr).into_owned();
    assert!(targeted.contains("[sft] step 2/2"), "a per-target directive shows them again:\n{targeted}");
}
