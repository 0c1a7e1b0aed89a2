//! Checks made before a run touches its directory: every input path exists and has the right
//! kind, the sizes fit in the machine's memory, and (once the model and data are loaded) every
//! sequence fits in the model's context.

use std::path::Path;

use slime_models::ModelConfig;

use crate::config::RunConfig;
use crate::corpus::RunData;
use crate::model_source::max_positions;
use crate::paths::{expect_dir_with, expect_file};
use crate::{Result, TrainError};

/// Upper estimate of the memory one embedded-task pair takes once generated and tokenized
/// (its text, three token vectors, and their headers), in bytes.
const EMBEDDED_PAIR_BYTES: u64 = 1024;

/// Bytes per parameter of a fully fine-tuned preset: f32 weights, gradients and two AdamW
/// moments.
const TRAINED_PARAM_BYTES: u64 = 16;

/// Errors unless every path the config names exists with the right kind, the run directory is a
/// directory (or absent), and the sizes fit in memory.
pub(super) fn check_inputs(cfg: &RunConfig, run_dir: &Path) -> Result<()> {
    if run_dir.exists() && !run_dir.is_dir() {
        return Err(TrainError::Input(format!("--run-dir {}: is a file; expected a directory", run_dir.display())));
    }
    if let Some(init) = &cfg.init {
        expect_dir_with(init, "init", "a model directory (config.json, model.safetensors)", &["config.json"])?;
    }
    if let Some(path) = &cfg.model.path {
        if path.is_dir() {
            expect_dir_with(path, "model.path", "a Hugging Face model directory", &["config.json"])?;
        } else {
            expect_file(path, "model.path", "a Hugging Face model directory or a .gguf file")?;
        }
    }
    if let Some(dir) = &cfg.model.tokenizer {
        expect_dir_with(dir, "model.tokenizer", "a directory with tokenizer.json", &["tokenizer.json"])?;
    }
    if let Some(path) = &cfg.data.parquet {
        for file in slime_data::parquet_files(path)? {
            expect_file(&file, "data.parquet", "a Parquet preference file, a directory or a glob of them")?;
        }
    }
    if let Some(path) = &cfg.data.heldout {
        expect_file(path, "data.heldout", "a held-out Parquet preference file")?;
    }
    if let Some(path) = &cfg.data.heldout_answers {
        expect_file(path, "data.heldout_answers", "a JSONL file of held-out answers (heldout.jsonl)")?;
    }
    if let Some(path) = &cfg.preference.reference_logps {
        expect_file(path, "preference.reference_logps", "a Parquet file written by `slime-trainer logps`")?;
    }
    check_memory(cfg, available_memory())
}

/// Errors when the embedded task's pairs or a preset model clearly cannot fit in `available`
/// bytes (unknown: no check).
fn check_memory(cfg: &RunConfig, available: Option<u64>) -> Result<()> {
    let Some(available) = available else { return Ok(()) };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if cfg.data.parquet.is_none() {
        let pairs = (cfg.data.pairs as u64).saturating_add(cfg.data.eval_pairs as u64);
        let need = pairs.saturating_mul(EMBEDDED_PAIR_BYTES);
        if need > available {
            return Err(TrainError::Config(format!(
                "data.pairs = {} and data.eval_pairs = {}: about {:.1} GiB of pairs, but {:.1} GiB of memory is \
                 available; expected at most {} pairs in all",
                cfg.data.pairs,
                cfg.data.eval_pairs,
                gib(need),
                gib(available),
                available / EMBEDDED_PAIR_BYTES
            )));
        }
    }
    if cfg.model.path.is_none() && cfg.init.is_none() {
        let (h, layers, vocab) = (cfg.model.hidden as u64, cfg.model.layers as u64, crate::task::vocab_size() as u64);
        // Attention (q, o: h x h; k, v: h x h/2) and the MLP (3 x h x 2h) per layer, plus the
        // embedding and the head.
        let params = layers * (3 * h * h + 6 * h * h) + 2 * vocab * h;
        let need = params.saturating_mul(TRAINED_PARAM_BYTES);
        if need > available {
            return Err(TrainError::Config(format!(
                "model.hidden = {h}, model.layers = {layers}: training this preset needs about {:.1} GiB, but {:.1} GiB \
                 of memory is available",
                gib(need),
                gib(available)
            )));
        }
    }
    Ok(())
}

/// Memory the system can give a new process, in bytes (Linux: `MemAvailable` of
/// `/proc/meminfo`); `None` where unknown.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Errors when `data.max_length` exceeds the model's context (checked before the data is
/// encoded).
pub(super) fn check_max_length(cfg: &RunConfig, model: &ModelConfig) -> Result<()> {
    let context = max_positions(model);
    if let Some(max_length) = cfg.data.max_length
        && cfg.data.parquet.is_some()
        && max_length > context
    {
        return Err(TrainError::Config(format!(
            "data.max_length = {max_length} exceeds the model's context of {context} positions \
             (max_position_embeddings); set data.max_length to at most {context}"
        )));
    }
    Ok(())
}

/// Errors when a pair's prompt and longer completion do not fit in the model's context,
/// naming the pair (for Parquet data: its row in `file`) and the setting that fixes it.
pub(super) fn check_context(data: &RunData, model: &ModelConfig, file: Option<&Path>) -> Result<()> {
    let context = max_positions(model);
    for example in data.sft.iter().chain(&data.preference).chain(&data.eval) {
        let t = &example.tokens;
        let len = t.prompt.len() + t.chosen.len().max(t.rejected.len());
        if len > context {
            let (which, hint) = match file {
                Some(file) => {
                    (format!("{} row {}", file.display(), t.id), format!("set data.max_length to at most {context}"))
                }
                None => (format!("embedded task pair {}", t.id), "use a model with a longer context".into()),
            };
            return Err(TrainError::Config(format!(
                "{which}: {} prompt + {} completion tokens = {len} positions exceed the model's context of \
                 {context} (max_position_embeddings); {hint}",
                t.prompt.len(),
                t.chosen.len().max(t.rejected.len())
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_the_memory_are_refused_naming_the_field() {
        let mut cfg = RunConfig::default();
        cfg.data.pairs = 1_000_000_000_000;
        let err = check_memory(&cfg, Some(64 << 30)).expect_err("too many pairs").to_string();
        assert!(err.contains("data.pairs = 1000000000000") && err.contains("GiB"), "{err}");
        assert!(check_memory(&cfg, None).is_ok());
        let cfg = RunConfig::default();
        assert!(check_memory(&cfg, Some(1 << 30)).is_ok());
        let mut big = RunConfig::default();
        (big.model.hidden, big.model.layers) = (4096, 64);
        let err = check_memory(&big, Some(64 << 30)).expect_err("too big a preset").to_string();
        assert!(err.contains("model.hidden = 4096"), "{err}");
    }
}
