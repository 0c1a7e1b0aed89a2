//! Evaluation on the held-out pairs, of a run's model or of a saved model directory, and the
//! decoded generations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};
use slime_data::{TextTokenizer, TokenizedPair};
use slime_models::CausalLm;

use super::model::parquet_data;
use super::step::{pair_batch, pair_logps};
use crate::config::RunConfig;
use crate::corpus::{Example, RunData, repetition};
use crate::metrics::eval;
use crate::task;
use crate::{Result, TrainError};

/// Evaluation on held-out pairs (log-probs) and prompts (greedy generations, decoded
/// `eval.generation_batch_size` prompts at a time): preference
/// accuracy (mean chosen token log-prob above the rejected one), mean chosen and rejected
/// log-probs, the collapse fraction, format validity and, on the embedded task, task accuracy;
/// on Parquet data, the repetition of the generations ([`repetition`]).
pub fn evaluate(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<BTreeMap<String, f64>> {
    Ok(evaluate_with_generations(lm, data, cfg)?.0)
}

/// An evaluation's metrics, its greedy generations (the new tokens of each prompt) and the
/// per-item values behind the metrics.
type Evaluation = (BTreeMap<String, f64>, Vec<Vec<u32>>, EvalItems);

/// The per-item values behind an evaluation's metrics, written into `result.json` (`items`) so
/// that a report can bootstrap over held-out items: `values[metric][i]` belongs to held-out
/// pair `pairs[i]`. Pair metrics (`eval/preference_accuracy`: 1 or 0, `eval/chosen_logp`,
/// `eval/rejected_logp`: mean token log-probs, `eval/collapse_fraction`: the pair's share of
/// rejected tokens below `-collapse_delta`) cover every held-out pair; generation metrics
/// (`eval/format_validity`, `eval/task_accuracy`: 1 or 0, `eval/repetition`) the first
/// `eval.generations` of them. The mean of each list is the metric, except the collapse
/// fraction, whose metric weights pairs by their rejected tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalItems {
    /// Held-out pair ids, in evaluation order.
    pub pairs: Vec<u64>,
    /// Per-item values by metric key.
    pub values: BTreeMap<String, Vec<f64>>,
}

impl EvalItems {
    fn push(&mut self, key: &str, value: f64) {
        self.values.entry(key.to_string()).or_default().push(value);
    }
}

/// Each row's masked-in tokens with a log-prob below `-delta`, and its masked-in tokens.
fn row_counts_below(tokens: &slime_objectives::TokenLogps, delta: f64) -> Result<Vec<(usize, usize)>> {
    let logps: Vec<Vec<f32>> = tokens.logps().to_dtype(DType::F32)?.to_vec2()?;
    let mask: Vec<Vec<f32>> = tokens.mask().to_dtype(DType::F32)?.to_vec2()?;
    Ok(logps
        .iter()
        .zip(&mask)
        .map(|(l, m)| {
            let n = m.iter().filter(|&&m| m != 0.0).count();
            let below = l.iter().zip(m).filter(|&(&l, &m)| m != 0.0 && f64::from(l) < -delta).count();
            (below, n)
        })
        .collect())
}

/// The indices of `items` in ascending order of `len` (ties in their order): batches taken in
/// this order hold rows of similar lengths, so little of each batch is padding.
fn by_length<T>(items: &[T], len: impl Fn(&T) -> usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| len(&items[i]));
    order
}

/// One held-out pair's scores: mean chosen and rejected token log-probs, and its rejected
/// tokens below the collapse threshold out of all of them (when the objective's log-probs
/// keep their tokens).
struct PairScores {
    chosen: f64,
    rejected: f64,
    collapsed: Option<(usize, usize)>,
}

/// Scores the held-out pairs `cfg.eval.batch_size` at a time, the batches made of pairs of
/// similar lengths; returned in the order of `data.eval`.
fn score_heldout(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<Vec<PairScores>> {
    let pairs = &data.eval;
    let order = by_length(pairs, |e| e.tokens.prompt.len() + e.tokens.chosen.len() + e.tokens.rejected.len());
    let mut scores: Vec<Option<PairScores>> = (0..pairs.len()).map(|_| None).collect();
    for chunk in order.chunks(cfg.eval.batch_size.max(1)) {
        let refs: Vec<&TokenizedPair> = chunk.iter().map(|&i| &pairs[i].tokens).collect();
        let (chosen, rejected) = pair_logps(lm, &pair_batch(&refs)?)?;
        let a_w: Vec<f32> = chosen.mean("chosen")?.detach().to_dtype(DType::F32)?.to_vec1()?;
        let a_l: Vec<f32> = rejected.mean("rejected")?.detach().to_dtype(DType::F32)?.to_vec1()?;
        let collapsed = match rejected.tokens() {
            Some(tokens) => row_counts_below(tokens, cfg.eval.collapse_delta)?.into_iter().map(Some).collect(),
            None => vec![None; chunk.len()],
        };
        for (k, &i) in chunk.iter().enumerate() {
            scores[i] =
                Some(PairScores { chosen: f64::from(a_w[k]), rejected: f64::from(a_l[k]), collapsed: collapsed[k] });
        }
    }
    Ok(scores.into_iter().flatten().collect())
}

/// Greedy generations for the first `cfg.eval.generations` held-out prompts,
/// `eval.generation_batch_size` at a time, the batches made of prompts of similar lengths (each
/// prompt's tokens do not depend on its batch); returned in prompt order.
fn generate_heldout(lm: &CausalLm, prompts: &[&Example], data: &RunData, cfg: &RunConfig) -> Result<Vec<Vec<u32>>> {
    let order = by_length(prompts, |e| e.tokens.prompt.len());
    let mut completions: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for batch in order.chunks(cfg.eval.generation_batch_size.max(1)) {
        let ids: Vec<&[u32]> = batch.iter().map(|&i| prompts[i].tokens.prompt.as_slice()).collect();
        let generated = lm.model().generate_greedy_batch(&ids, cfg.eval.max_new_tokens, &data.stop)?;
        for (&i, completion) in batch.iter().zip(generated) {
            completions[i] = completion;
        }
    }
    Ok(completions)
}

/// [`evaluate`], also returning the greedy generations.
pub(super) fn evaluate_with_generations(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<Evaluation> {
    // Adapters folded in once, weights frozen: no low-rank products and no autograd graph in
    // any of the passes below.
    let lm = &lm.inference_copy()?;
    let scores = score_heldout(lm, data, cfg)?;
    let mut items = EvalItems::default();
    items.pairs.extend(data.eval.iter().map(|e| e.tokens.id));
    for pair in &scores {
        items.push(eval::PREFERENCE_ACCURACY, if pair.chosen > pair.rejected { 1.0 } else { 0.0 });
        items.push(eval::CHOSEN_LOGP, pair.chosen);
        items.push(eval::REJECTED_LOGP, pair.rejected);
        if let Some((below, n)) = pair.collapsed {
            items.push(eval::COLLAPSE_FRACTION, if n == 0 { 0.0 } else { below as f64 / n as f64 });
        }
    }
    let n = scores.len().max(1) as f64;
    let (collapsed, rejected_tokens) =
        scores.iter().filter_map(|p| p.collapsed).fold((0, 0), |(b, t), (below, n)| (b + below, t + n));
    let mut out = BTreeMap::new();
    out.insert(eval::PREFERENCE_ACCURACY.into(), scores.iter().filter(|p| p.chosen > p.rejected).count() as f64 / n);
    out.insert(eval::CHOSEN_LOGP.into(), scores.iter().map(|p| p.chosen).sum::<f64>() / n);
    out.insert(eval::REJECTED_LOGP.into(), scores.iter().map(|p| p.rejected).sum::<f64>() / n);
    out.insert(eval::COLLAPSE_FRACTION.into(), collapsed as f64 / rejected_tokens.max(1) as f64);
    let (mut valid, mut correct, mut repeated) = (0usize, 0usize, 0.0);
    let mut generations = Vec::new();
    let prompts: Vec<&Example> = data.eval.iter().take(cfg.eval.generations).collect();
    let embedded = data.eval.first().is_some_and(|e| e.task.is_some());
    let answered = data.eval.iter().any(|e| e.answer.is_some());
    let completions = generate_heldout(lm, &prompts, data, cfg)?;
    for (example, completion) in prompts.iter().zip(completions) {
        // Stopped at the end-of-turn (or EOS) token rather than at the token limit.
        let ended = completion.last().is_some_and(|t| data.stop.contains(t));
        let (is_valid, is_correct, repetition_of) = match (&example.task, &example.answer) {
            (Some(pair), _) => {
                let verdict = task::check(pair, &completion);
                (verdict.format_valid, Some(verdict.correct), None)
            }
            (None, Some(answer)) => {
                let decoder = data
                    .decoder
                    .as_ref()
                    .ok_or_else(|| TrainError::Config("held-out answers are set but the data has no decoder".into()))?;
                let body = if ended { &completion[..completion.len() - 1] } else { &completion[..] };
                let verdict = answer.check(&decoder.decode(body, false)?, ended);
                (verdict.format_valid, Some(verdict.correct), Some(verdict.repetition))
            }
            // Well formed: some content, then the end-of-turn (or EOS) token.
            (None, None) => (ended && completion.len() > 1, None, Some(repetition(&completion))),
        };
        valid += usize::from(is_valid);
        items.push(eval::FORMAT_VALIDITY, if is_valid { 1.0 } else { 0.0 });
        if let Some(c) = is_correct {
            correct += usize::from(c);
            items.push(eval::TASK_ACCURACY, if c { 1.0 } else { 0.0 });
        }
        if let Some(r) = repetition_of {
            repeated += r;
            items.push(eval::REPETITION, r);
        }
        generations.push(completion);
    }
    let shown = prompts.len().max(1) as f64;
    out.insert(eval::FORMAT_VALIDITY.into(), valid as f64 / shown);
    if embedded || answered {
        out.insert(eval::TASK_ACCURACY.into(), correct as f64 / shown);
    }
    if !embedded {
        out.insert(eval::REPETITION.into(), repeated / shown);
    }
    Ok((out, generations, items))
}

/// Evaluates a saved model directory (config.json + model.safetensors, e.g. a run's `model/`)
/// on the held-out pairs `cfg` describes: the embedded task's (its `seed`, `data.eval_pairs`)
/// or, with `data.parquet`, that file's held-out split encoded with `model.path`'s tokenizer;
/// with the `[eval]` settings.
pub fn evaluate_dir(cfg: &RunConfig, model_dir: &Path) -> Result<BTreeMap<String, f64>> {
    cfg.validate()?;
    let lm = CausalLm::from_dir(model_dir, &crate::model_source::parse_device(&cfg.model.device)?)?;
    let data = match &cfg.model.path {
        Some(_) => parquet_data(cfg, &lm)?.0,
        None => RunData::embedded(0, cfg.data.eval_pairs, cfg.seed)?,
    };
    evaluate(&lm, &data, cfg)
}

/// The key of `result.json` that holds the SHA-256 of the model an SFT-only run
/// (`preference.steps = 0`) evaluated last: its `sft-model/` (or its `init`), see
/// [`model_sha256`].
pub(super) const MODEL_SHA256: &str = "model_sha256";

/// The model directory whose evaluation an SFT-only run's final evaluation is: `sft-model/`
/// after its own SFT stage, else its `init` (`None`: the configured base model itself).
pub(super) fn evaluated_model_dir(cfg: &RunConfig, run_dir: &Path) -> Option<PathBuf> {
    if cfg.init.is_none() && cfg.sft.steps > 0 { Some(run_dir.join("sft-model")) } else { cfg.init.clone() }
}

/// SHA-256 of a model directory's weights and architecture: of the lines `<file> <sha256>` of
/// its `config.json` and `*.safetensors` files in name order.
pub(super) fn model_sha256(dir: &Path) -> Result<String> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| TrainError::Io { path: dir.display().to_string(), source })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n == "config.json" || n.ends_with(".safetensors"))
        .collect();
    names.sort();
    if !names.iter().any(|n| n.ends_with(".safetensors")) {
        return Err(TrainError::Input(format!("{}: no .safetensors weights", dir.display())));
    }
    let mut lines = String::new();
    for name in names {
        lines += &format!("{name} {}\n", crate::checkpoint::sha256_file(&dir.join(&name))?);
    }
    use sha2::Digest;
    Ok(sha2::Sha256::digest(lines.as_bytes()).iter().map(|b| format!("{b:02x}")).collect())
}

/// The start evaluation `eval.start_from` names: the final evaluation (metrics with the drift
/// set to 0, and per-item values) of a finished SFT-only run of the model this run starts from,
/// with this run's seed, `[model]`, `[data]` and `[eval]` settings (`every`,
/// `generation_batch_size`, which do not change an evaluation, aside) and its held-out pairs.
/// `None` without `eval.start_from`. The same model, items and settings give the same numbers
/// as evaluating again, so the run's step-0 line and drift baseline are those it would compute.
pub(super) fn reused_start(cfg: &RunConfig, data: &RunData) -> Result<Option<(BTreeMap<String, f64>, EvalItems)>> {
    let Some(dir) = &cfg.eval.start_from else { return Ok(None) };
    let bad = |why: String| TrainError::Input(format!("eval.start_from = {}: {why}", dir.display()));
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| bad(format!("{name} cannot be read ({e}); is the run finished?")))
    };
    let source = RunConfig::from_toml(&read("config.toml")?).map_err(|e| bad(format!("config.toml: {e}")))?;
    let result: serde_json::Value =
        serde_json::from_str(&read("result.json")?).map_err(|e| bad(format!("result.json: {e}")))?;
    if source.preference.steps != 0 {
        return Err(bad(format!(
            "a run with a preference stage ({} steps): its final evaluation is not of the model it started from",
            source.preference.steps
        )));
    }
    let comparable = |c: &RunConfig| {
        let mut eval = c.eval.clone();
        (eval.every, eval.generation_batch_size, eval.start_from) = (0, 0, None);
        let mut model = c.model.clone();
        model.gradient_checkpointing = false;
        (c.seed, model, c.data.clone(), eval)
    };
    let (ours, theirs) = (comparable(cfg), comparable(&source));
    for (differs, what) in [
        (ours.0 != theirs.0, "seed"),
        (ours.1 != theirs.1, "[model]"),
        (ours.2 != theirs.2, "[data]"),
        (ours.3 != theirs.3, "[eval]"),
    ] {
        if differs {
            return Err(bad(format!(
                "its {what} settings differ from this run's, so its evaluation is not this run's"
            )));
        }
    }
    let recorded = result[MODEL_SHA256].as_str();
    match (&cfg.init, evaluated_model_dir(&source, dir)) {
        (Some(init), Some(_)) => {
            let actual = model_sha256(init)?;
            if recorded != Some(actual.as_str()) {
                return Err(bad(format!(
                    "it evaluated a model with SHA-256 {}, but init = {} has {actual}",
                    recorded.unwrap_or("(not recorded)"),
                    init.display()
                )));
            }
        }
        (None, None) => {}
        (Some(init), None) => {
            return Err(bad(format!(
                "it evaluated its base model, but this run starts from init = {}",
                init.display()
            )));
        }
        (None, Some(model)) => {
            return Err(bad(format!("it evaluated {}, but this run starts from its base model", model.display())));
        }
    }
    let mut metrics: BTreeMap<String, f64> =
        serde_json::from_value(result["final"].clone()).map_err(|e| bad(format!("result.json `final`: {e}")))?;
    let items: EvalItems =
        serde_json::from_value(result["items"].clone()).map_err(|e| bad(format!("result.json `items`: {e}")))?;
    let ids: Vec<u64> = data.eval.iter().map(|e| e.tokens.id).collect();
    if items.pairs != ids {
        return Err(bad(format!(
            "its {} held-out pairs are not this run's {} (ids or order differ)",
            items.pairs.len(),
            ids.len()
        )));
    }
    if !metrics.contains_key(eval::CHOSEN_LOGP) {
        return Err(bad(format!("result.json `final` has no `{}`", eval::CHOSEN_LOGP)));
    }
    metrics.insert(eval::CHOSEN_LOGP_DRIFT.into(), 0.0);
    Ok(Some((metrics, items)))
}

/// Writes the latest greedy generations, decoded: one JSON object per line with `pair`,
/// `prompt`, `completion` (special tokens kept, so a missing end-of-turn shows) and `tokens`.
pub(super) fn write_generations(
    path: &Path,
    decoder: &TextTokenizer,
    data: &RunData,
    generations: &[Vec<u32>],
) -> Result<()> {
    let mut text = String::new();
    for (example, completion) in data.eval.iter().zip(generations) {
        let line = serde_json::json!({
            "pair": example.tokens.id,
            "prompt": decoder.decode(&example.tokens.prompt, false)?,
            "completion": decoder.decode(completion, false)?,
            "tokens": completion.len(),
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    crate::atomic::write(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::run::model::{tiny_gemma, tiny_llama};

    /// Held-out generations decoded in batches equal one prompt at a time, and so do the
    /// metrics, for both presets (Gemma's sliding window of 16 is shorter than the prompts);
    /// pairs scored in batches keep their held-out order and their log-probs.
    #[test]
    fn batched_eval_generations_equal_one_at_a_time() -> Result<()> {
        let data = RunData::embedded(0, 12, 3)?;
        let lengths: Vec<usize> = data.eval.iter().map(|e| e.tokens.prompt.len()).collect();
        assert!(lengths.iter().any(|&l| l != lengths[0]), "prompts of one length: {lengths:?}");
        assert!(lengths.iter().any(|&l| l > 16), "no prompt beyond the sliding window: {lengths:?}");
        for lm in [
            CausalLm::random(&tiny_llama(32, 2), 5, &Device::Cpu)?,
            CausalLm::random(&tiny_gemma(32, 2), 5, &Device::Cpu)?,
        ] {
            let mut cfg = RunConfig::default();
            cfg.eval.generations = 12;
            cfg.eval.max_new_tokens = 20;
            cfg.eval.generation_batch_size = 1;
            let (one, one_gen, one_items) = evaluate_with_generations(&lm, &data, &cfg)?;
            cfg.eval.generation_batch_size = 5;
            let (batched, batched_gen, batched_items) = evaluate_with_generations(&lm, &data, &cfg)?;
            assert_eq!(batched_gen, one_gen);
            assert_eq!(batched, one);
            assert_eq!(batched_items, one_items);
            for (example, generated) in data.eval.iter().zip(&one_gen) {
                let alone = lm.model().generate_greedy(&example.tokens.prompt, 20, &data.stop)?;
                assert_eq!(&alone, generated);
            }
            assert_eq!(one_gen.len(), 12);
            // Scored in batches of similar lengths, reported in held-out order: each pair's
            // log-probs are those it gets scored alone.
            let ids: Vec<u64> = data.eval.iter().map(|e| e.tokens.id).collect();
            assert_eq!(one_items.pairs, ids);
            cfg.eval.batch_size = 1;
            let (_, _, alone_items) = evaluate_with_generations(&lm, &data, &cfg)?;
            assert_eq!(alone_items.pairs, ids);
            for key in [eval::CHOSEN_LOGP, eval::REJECTED_LOGP] {
                for (a, b) in alone_items.values[key].iter().zip(&one_items.values[key]) {
                    assert!((a - b).abs() < 1e-5, "{key}: {a} alone, {b} in a batch");
                }
            }
        }
        Ok(())
    }
}
