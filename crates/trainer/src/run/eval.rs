//! Evaluation on the held-out pairs, of a run's model or of a saved model directory, and the
//! decoded generations.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use slime_data::{TextTokenizer, TokenizedPair, collate_pairs};
use slime_models::CausalLm;

use super::model::{device_of, parquet_data};
use super::step::pair_logps;
use crate::Result;
use crate::config::RunConfig;
use crate::corpus::{Example, RunData, repetition};
use crate::task;

/// Evaluation on held-out pairs (log-probs) and prompts (greedy generations, decoded
/// `eval.generation_batch_size` prompts at a time): preference
/// accuracy (mean chosen token log-prob above the rejected one), mean chosen and rejected
/// log-probs, the collapse fraction, format validity and, on the embedded task, task accuracy;
/// on Parquet data, the repetition of the generations ([`repetition`]).
pub fn evaluate(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<BTreeMap<String, f64>> {
    Ok(evaluate_with_generations(lm, data, cfg)?.0)
}

/// An evaluation's metrics and its greedy generations (the new tokens of each prompt).
type Evaluation = (BTreeMap<String, f64>, Vec<Vec<u32>>);

/// [`evaluate`], also returning the greedy generations.
pub(super) fn evaluate_with_generations(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<Evaluation> {
    let device = device_of(lm);
    let (mut correct_pref, mut chosen_sum, mut rejected_sum, mut n) = (0usize, 0.0, 0.0, 0usize);
    let (mut collapsed, mut rejected_tokens) = (0.0, 0.0);
    for chunk in data.eval.chunks(cfg.eval.batch_size) {
        let refs: Vec<&TokenizedPair> = chunk.iter().map(|e| &e.tokens).collect();
        let batch = collate_pairs(&refs, data.pad_id);
        let (chosen, rejected) = pair_logps(lm, &batch, &device)?;
        let a_w: Vec<f32> = chosen.mean("chosen")?.detach().to_dtype(DType::F32)?.to_vec1()?;
        let a_l: Vec<f32> = rejected.mean("rejected")?.detach().to_dtype(DType::F32)?.to_vec1()?;
        correct_pref += a_w.iter().zip(&a_l).filter(|(w, l)| w > l).count();
        chosen_sum += a_w.iter().map(|&v| f64::from(v)).sum::<f64>();
        rejected_sum += a_l.iter().map(|&v| f64::from(v)).sum::<f64>();
        n += a_w.len();
        if let Some(tokens) = rejected.tokens() {
            collapsed += tokens.fraction_below(cfg.eval.collapse_delta)? * tokens.total_count();
            rejected_tokens += tokens.total_count();
        }
    }
    let mut out = BTreeMap::new();
    out.insert("eval/preference_accuracy".into(), correct_pref as f64 / n as f64);
    out.insert("eval/chosen_logp".into(), chosen_sum / n as f64);
    out.insert("eval/rejected_logp".into(), rejected_sum / n as f64);
    out.insert("eval/collapse_fraction".into(), collapsed / rejected_tokens.max(1.0));
    let (mut valid, mut correct, mut repeated) = (0usize, 0usize, 0.0);
    let mut generations = Vec::new();
    let prompts: Vec<&Example> = data.eval.iter().take(cfg.eval.generations).collect();
    let mut completions = Vec::with_capacity(prompts.len());
    for batch in prompts.chunks(cfg.eval.generation_batch_size.max(1)) {
        let ids: Vec<&[u32]> = batch.iter().map(|e| e.tokens.prompt.as_slice()).collect();
        completions.extend(lm.model().generate_greedy_batch(&ids, cfg.eval.max_new_tokens, &data.stop)?);
    }
    for (example, completion) in prompts.iter().zip(completions) {
        match &example.task {
            Some(pair) => {
                let verdict = task::check(pair, &completion);
                valid += usize::from(verdict.format_valid);
                correct += usize::from(verdict.correct);
            }
            None => {
                // Well formed: some content, then the end-of-turn (or EOS) token.
                let ended = completion.last().is_some_and(|t| data.stop.contains(t));
                valid += usize::from(ended && completion.len() > 1);
                repeated += repetition(&completion);
            }
        }
        generations.push(completion);
    }
    let shown = prompts.len().max(1) as f64;
    out.insert("eval/format_validity".into(), valid as f64 / shown);
    if data.eval.first().is_some_and(|e| e.task.is_some()) {
        out.insert("eval/task_accuracy".into(), correct as f64 / shown);
    } else {
        out.insert("eval/repetition".into(), repeated / shown);
    }
    Ok((out, generations))
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
    /// metrics, for both presets (Gemma's sliding window of 16 is shorter than the prompts).
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
            let (one, one_gen) = evaluate_with_generations(&lm, &data, &cfg)?;
            cfg.eval.generation_batch_size = 5;
            let (batched, batched_gen) = evaluate_with_generations(&lm, &data, &cfg)?;
            assert_eq!(batched_gen, one_gen);
            assert_eq!(batched, one);
            for (example, generated) in data.eval.iter().zip(&one_gen) {
                let alone = lm.model().generate_greedy(&example.tokens.prompt, 20, &data.stop)?;
                assert_eq!(&alone, generated);
            }
            assert_eq!(one_gen.len(), 12);
        }
        Ok(())
    }
}
