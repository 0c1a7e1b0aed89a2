//! Per-step losses of a run, for tests that compare two runs step by step.

use std::collections::BTreeMap;
use std::path::Path;

/// The `loss` of every line of a run's metrics.jsonl, keyed by stage and step.
pub fn losses(run_dir: &Path) -> BTreeMap<(String, u64), f64> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("json line"))
        .filter_map(|v| {
            let loss = v.get("loss")?.as_f64()?;
            Some(((v.get("stage")?.as_str()?.to_owned(), v.get("step")?.as_u64()?), loss))
        })
        .collect()
}
