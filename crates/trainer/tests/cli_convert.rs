//! `slime-trainer convert`: LLaMA-Factory pairs to Parquet, and its errors, through the binary.

use std::process::{Command, Output};

use serde_json::json;
use slime_data::{PreferenceExample, PreferenceReader};

fn convert(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slime-trainer")).arg("convert").args(args).output().expect("running slime-trainer")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn pairs_become_parquet_with_the_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("demo.json");
    let rows: Vec<_> = (0..12)
        .map(|i| {
            json!({"conversations": [{"from": "human", "value": format!("question {i}")}],
                   "chosen": {"from": "gpt", "value": format!("good {i}")},
                   "rejected": {"from": "gpt", "value": format!("bad {i}")}})
        })
        .collect();
    std::fs::write(&json_path, json!(rows).to_string()).expect("write json");
    let out_dir = dir.path().join("parquet");
    let out = convert(&["pairs".as_ref(), json_path.as_os_str(), "--out-dir".as_ref(), out_dir.as_os_str()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("wrote 12 pairs"), "{}", text(&out.stdout));
    let read = |name: &str| -> Vec<PreferenceExample> {
        PreferenceReader::open(out_dir.join(name), Default::default())
            .expect(name)
            .map(|r| r.expect("row").example)
            .collect()
    };
    let (all, sft, preference) = (read("demo.parquet"), read("demo.sft.parquet"), read("demo.preference.parquet"));
    assert_eq!(all.len(), 12);
    assert_eq!(sft.len() + preference.len(), 12, "the split keeps every pair once");
    assert!(!sft.is_empty() && !preference.is_empty(), "{} / {}", sft.len(), preference.len());
    assert!(sft.iter().all(|p| all.contains(p) && !preference.contains(p)));
}

#[test]
fn bad_input_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("bad.json");
    let out_dir = dir.path().join("out");
    std::fs::write(
        &json_path,
        json!([{"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"}}])
            .to_string(),
    )
    .expect("write");
    let out = convert(&["pairs".as_ref(), json_path.as_os_str(), "--out-dir".as_ref(), out_dir.as_os_str()]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.json row 0") && err.contains("rejected"), "{err}");
    assert!(!out_dir.join("bad.parquet").exists());

    let missing = dir.path().join("missing.gguf");
    let out = convert(&["gguf".as_ref(), missing.as_os_str(), "--out".as_ref(), out_dir.as_os_str()]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("missing.gguf"), "{err}");
    assert!(!out_dir.join("model.safetensors").exists());
}
