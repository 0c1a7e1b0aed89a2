//! A run on the embedded task: SFT on one split, then a preference objective on the disjoint
//! split, with evaluation of preference accuracy, task quality, format validity, chosen
//! log-prob drift (unlearning) and rejected-token collapse.
//!
//! Files written into the run directory: `config.toml` (the resolved config), `metrics.jsonl`
//! (one line per optimiser step), `eval.jsonl` (one line per evaluation), `model/`
//! (config.json + model.safetensors of the final weights; after SFT also `sft-model/`) and
//! `result.json` (the final evaluation, for `cargo xtask report`).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slime_data::{Batch, Cursor, EpochSampler, TokenizedPair, collate_pairs, collate_sft};
use slime_models::{CausalLm, LlamaConfig};
use slime_objectives::{Objective, ObjectiveInputs, ReferenceLogps, SequenceLogps, SftParams};

use crate::config::{RunConfig, StageSpec};
use crate::metrics_log::MetricsLog;
use crate::optim::{AdamW, AdamWConfig, clip_coefficient};
use crate::selection::{SelectionKind, draw_weighted};
use crate::task::{self, TaskPair, TaskTokenizer, ids};
use crate::{Result, TrainError};

/// Positions per chunk of the log-prob computation.
const LOGP_CHUNK: usize = 64;

/// The embedded task's splits, as text and tokens.
pub struct TaskData {
    /// SFT split.
    pub sft: Vec<(TaskPair, TokenizedPair)>,
    /// Preference split (disjoint from SFT).
    pub preference: Vec<(TaskPair, TokenizedPair)>,
    /// Held-out evaluation pairs.
    pub eval: Vec<(TaskPair, TokenizedPair)>,
}

fn tokenize(pairs: Vec<TaskPair>, first_id: u64) -> Result<Vec<(TaskPair, TokenizedPair)>> {
    let t = TaskTokenizer;
    pairs
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let enc = |s: String| t.encode(&s).ok_or_else(|| TrainError::Config(format!("untokenizable text `{s}`")));
            let tok = TokenizedPair {
                id: first_id + i as u64,
                prompt: enc(p.prompt())?,
                chosen: enc(p.chosen())?,
                rejected: enc(p.rejected())?,
            };
            Ok((p, tok))
        })
        .collect()
}

impl TaskData {
    /// Generates `pairs` training pairs (every third to SFT, the rest to the preference stage)
    /// and `eval_pairs` held-out pairs from an independent stream of the same seed.
    pub fn generate(pairs: usize, eval_pairs: usize, seed: u64) -> Result<Self> {
        let all = tokenize(task::generate(pairs, seed), 0)?;
        let (sft, preference) = all.into_iter().partition(|(_, t)| t.id % 3 == 0);
        let eval = tokenize(task::generate(eval_pairs, seed ^ 0x5EED_E7A1), 1 << 40)?;
        Ok(Self { sft, preference, eval })
    }
}

/// The tiny Llama the embedded task trains.
pub fn tiny_llama(hidden: usize, layers: usize) -> LlamaConfig {
    LlamaConfig {
        max_position_embeddings: 128,
        ..LlamaConfig::tiny(task::vocab_size(), hidden, 2 * hidden, layers, 4, 2)
    }
}

struct Tensors {
    ids: Tensor,
    attention: Tensor,
    completion: Tensor,
}

fn to_tensors(batch: &Batch, device: &Device) -> Result<Tensors> {
    let shape = (batch.rows, batch.seq_len);
    Ok(Tensors {
        ids: Tensor::from_slice(&batch.input_ids, shape, device)?,
        attention: Tensor::from_slice(&batch.attention_mask, shape, device)?,
        completion: Tensor::from_slice(&batch.completion_mask, shape, device)?,
    })
}

/// Per-token log-probs of a batch, split into its chosen and rejected halves.
fn pair_logps(lm: &CausalLm, batch: &Batch, device: &Device) -> Result<(SequenceLogps, SequenceLogps)> {
    let t = to_tensors(batch, device)?;
    let logps = lm.model().token_logps(&t.ids, Some(&t.attention), LOGP_CHUNK)?;
    let n = batch.rows / 2;
    Ok((
        SequenceLogps::from_tokens(&logps.narrow(0, 0, n)?, &t.completion.narrow(0, 0, n)?)?,
        SequenceLogps::from_tokens(&logps.narrow(0, n, n)?, &t.completion.narrow(0, n, n)?)?,
    ))
}

/// Stops the run on a non-finite value, naming the step and the quantity.
fn ensure_finite(step: u64, what: &str, value: f64) -> Result<()> {
    if value.is_finite() { Ok(()) } else { Err(TrainError::NonFinite { step, what: what.into(), value }) }
}

/// One optimiser step on `loss`: backward, global norm, clipping, AdamW. Returns the norm.
fn optimise(opt: &mut AdamW, loss: &Tensor, step: u64, lr: f64, max_norm: Option<f64>) -> Result<f64> {
    let grads = loss.backward()?;
    let norm = opt.grad_norm(&grads)?;
    ensure_finite(step, "gradient norm", norm)?;
    opt.step(&grads, lr, clip_coefficient(norm, max_norm))?;
    Ok(norm)
}

fn record(
    log: &mut MetricsLog,
    stage: &str,
    step: u64,
    metrics: &slime_objectives::Metrics,
    extra: &[(&str, f64)],
) -> Result<()> {
    let mut values: BTreeMap<String, f64> = metrics.iter().map(|(k, v)| (k.to_string(), v)).collect();
    for &(k, v) in extra {
        values.insert(k.into(), v);
    }
    log.write(stage, step, &values)
}

/// The SFT stage: NLL on prompt + chosen of the SFT split.
fn sft_stage(
    lm: &CausalLm,
    data: &[(TaskPair, TokenizedPair)],
    spec: &StageSpec,
    seed: u64,
    log: &mut MetricsLog,
) -> Result<()> {
    let device = Device::Cpu;
    let cfg = AdamWConfig { weight_decay: spec.weight_decay, ..AdamWConfig::default() };
    let mut opt = AdamW::new(lm.trainable_vars(), cfg)?;
    let mut sampler = EpochSampler::new(data.len(), seed, Cursor::default());
    let objective = Objective::Sft(SftParams::nll());
    for step in 0..spec.steps {
        let started = Instant::now();
        let picked: Vec<&TokenizedPair> = sampler.next_batch(spec.batch_size).into_iter().map(|i| &data[i].1).collect();
        let batch = collate_sft(&picked, ids::PAD);
        let t = to_tensors(&batch, &device)?;
        let logps = lm.model().token_logps(&t.ids, Some(&t.attention), LOGP_CHUNK)?;
        let out =
            objective.compute(&ObjectiveInputs::supervised(SequenceLogps::from_tokens(&logps, &t.completion)?))?;
        let loss = out.metrics.get("loss").unwrap_or(f64::NAN);
        ensure_finite(step + 1, "SFT loss", loss)?;
        let lr = spec.schedule.lr_at(step, spec.steps);
        let norm = optimise(&mut opt, &out.loss, step + 1, lr, spec.max_grad_norm)?;
        let tps = batch.real_tokens() as f64 / started.elapsed().as_secs_f64();
        record(
            log,
            "sft",
            step + 1,
            &out.metrics,
            &[("learning_rate", lr), ("grad_norm", norm), ("tokens_per_second", tps)],
        )?;
    }
    Ok(())
}

/// Evaluation on held-out pairs (log-probs) and prompts (greedy generations).
pub fn evaluate(lm: &CausalLm, eval: &[(TaskPair, TokenizedPair)], cfg: &RunConfig) -> Result<BTreeMap<String, f64>> {
    let device = Device::Cpu;
    let (mut correct_pref, mut chosen_sum, mut rejected_sum, mut n) = (0usize, 0.0, 0.0, 0usize);
    let (mut collapsed, mut rejected_tokens) = (0.0, 0.0);
    for chunk in eval.chunks(64) {
        let refs: Vec<&TokenizedPair> = chunk.iter().map(|(_, t)| t).collect();
        let batch = collate_pairs(&refs, ids::PAD);
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
    let (mut valid, mut correct, mut shown) = (0usize, 0usize, 0usize);
    for (pair, tok) in eval.iter().take(cfg.eval.generations) {
        let completion = lm.model().generate_greedy(&tok.prompt, cfg.eval.max_new_tokens, &[ids::EOT])?;
        let verdict = task::check(pair, &completion);
        valid += usize::from(verdict.format_valid);
        correct += usize::from(verdict.correct);
        shown += 1;
    }
    out.insert("eval/format_validity".into(), valid as f64 / shown.max(1) as f64);
    out.insert("eval/task_accuracy".into(), correct as f64 / shown.max(1) as f64);
    Ok(out)
}

/// Reference sums `(S_w, S_l)` of every pair under the current (starting) model, computed once
/// before the preference stage so no second model is kept in memory.
fn reference_sums(lm: &CausalLm, pairs: &[(TaskPair, TokenizedPair)]) -> Result<HashMap<u64, (f64, f64)>> {
    let mut out = HashMap::new();
    for chunk in pairs.chunks(64) {
        let refs: Vec<&TokenizedPair> = chunk.iter().map(|(_, t)| t).collect();
        let batch = collate_pairs(&refs, ids::PAD);
        let (c, r) = pair_logps(lm, &batch, &Device::Cpu)?;
        let cs: Vec<f64> = c.sum().detach().to_dtype(DType::F64)?.to_vec1()?;
        let rs: Vec<f64> = r.sum().detach().to_dtype(DType::F64)?.to_vec1()?;
        for (i, t) in refs.iter().enumerate() {
            out.insert(t.id, (cs[i], rs[i]));
        }
    }
    Ok(out)
}

/// Reference-free margins `A_w - A_l` of `pairs` under the current policy (SAGE re-scoring).
fn margins(lm: &CausalLm, pairs: &[&TokenizedPair]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(64) {
        let (c, r) = pair_logps(lm, &collate_pairs(chunk, ids::PAD), &Device::Cpu)?;
        let d = (c.mean("chosen")? - r.mean("rejected")?)?.detach().to_dtype(DType::F64)?;
        out.extend(d.to_vec1::<f64>()?);
    }
    Ok(out)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    fs::write(path, text).map_err(|source| TrainError::Io { path: path.display().to_string(), source })
}

/// Runs `cfg` into `run_dir` and returns the final evaluation.
pub fn run(cfg: &RunConfig, run_dir: &Path) -> Result<BTreeMap<String, f64>> {
    cfg.validate()?;
    let io = |source| TrainError::Io { path: run_dir.display().to_string(), source };
    fs::create_dir_all(run_dir).map_err(io)?;
    let resolved = toml::to_string(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    fs::write(run_dir.join("config.toml"), resolved).map_err(io)?;
    let mut log = MetricsLog::open(&run_dir.join("metrics.jsonl"))?;
    let mut eval_log = MetricsLog::open(&run_dir.join("eval.jsonl"))?;
    let data = TaskData::generate(cfg.data.pairs, cfg.data.eval_pairs, cfg.seed)?;
    let device = Device::Cpu;

    let lm = match &cfg.init {
        Some(dir) => CausalLm::from_dir(dir, &device)?,
        None => CausalLm::random(&tiny_llama(cfg.model.hidden, cfg.model.layers), cfg.seed, &device)?,
    };
    if cfg.init.is_none() && cfg.sft.steps > 0 {
        sft_stage(&lm, &data.sft, &cfg.sft, cfg.seed, &mut log)?;
        lm.save_dir(&run_dir.join("sft-model"))?;
    }

    let start = evaluate(&lm, &data.eval, cfg)?;
    let start_chosen = start["eval/chosen_logp"];
    let with_drift = |mut m: BTreeMap<String, f64>| {
        let drift = m["eval/chosen_logp"] - start_chosen;
        m.insert("eval/chosen_logp_drift".into(), drift);
        m
    };
    eval_log.write("preference", 0, &with_drift(start.clone()))?;

    let spec = &cfg.preference;
    let mut final_eval = with_drift(start);
    if spec.steps > 0 {
        let objective = &spec.objective;
        let reference = if objective.needs_reference() { Some(reference_sums(&lm, &data.preference)?) } else { None };
        let mut opt = AdamW::new(lm.trainable_vars(), AdamWConfig::default())?;
        let mut sampler = EpochSampler::new(data.preference.len(), cfg.seed ^ 0xBEEF, Cursor::default());
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5A6E);
        let mut pool: Vec<usize> = Vec::new();
        let mut pool_weights: Vec<f64> = Vec::new();
        let mut previous: HashMap<u64, f64> = HashMap::new();
        for step in 0..spec.steps {
            let started = Instant::now();
            let mut uniform_fill = 0usize;
            let picked: Vec<usize> = match spec.selection {
                SelectionKind::Uniform => sampler.next_batch(spec.batch_size),
                SelectionKind::Sage => {
                    if step % spec.sage.refresh_every == 0 {
                        pool = sampler.next_batch(spec.sage.pool_size.min(data.preference.len()));
                        let toks: Vec<&TokenizedPair> = pool.iter().map(|&i| &data.preference[i].1).collect();
                        let m = margins(&lm, &toks)?;
                        let prev: Vec<Option<f64>> = toks.iter().map(|t| previous.get(&t.id).copied()).collect();
                        pool_weights = spec.sage.scores(&m, &prev);
                        for (t, v) in toks.iter().zip(m) {
                            previous.insert(t.id, v);
                        }
                    }
                    let (chosen, uniform) = draw_weighted(&pool_weights, spec.batch_size, &mut rng);
                    uniform_fill = uniform;
                    chosen.into_iter().map(|i| pool[i]).collect()
                }
            };
            let refs: Vec<&TokenizedPair> = picked.iter().map(|&i| &data.preference[i].1).collect();
            let batch = collate_pairs(&refs, ids::PAD);
            let (chosen, rejected) = pair_logps(&lm, &batch, &device)?;
            let mut inputs = ObjectiveInputs::preference(chosen, rejected).with_collapse_delta(cfg.eval.collapse_delta);
            if let Some(reference) = &reference {
                let (c, r): (Vec<f64>, Vec<f64>) = batch.pair_ids.iter().map(|id| reference[id]).unzip();
                inputs =
                    inputs.with_reference(ReferenceLogps::new(&Tensor::new(c, &device)?, &Tensor::new(r, &device)?)?);
            }
            let out = objective.compute(&inputs)?;
            for (name, value) in out.metrics.iter() {
                ensure_finite(step + 1, &format!("{} `{name}`", objective.name()), value)?;
            }
            let lr = spec.schedule.lr_at(step, spec.steps);
            let norm = optimise(&mut opt, &out.loss, step + 1, lr, spec.max_grad_norm)?;
            let tps = batch.real_tokens() as f64 / started.elapsed().as_secs_f64();
            record(
                &mut log,
                "preference",
                step + 1,
                &out.metrics,
                &[
                    ("learning_rate", lr),
                    ("grad_norm", norm),
                    ("tokens_per_second", tps),
                    ("selection/uniform_fill", uniform_fill as f64),
                ],
            )?;
            if (step + 1) % cfg.eval.every == 0 || step + 1 == spec.steps {
                final_eval = with_drift(evaluate(&lm, &data.eval, cfg)?);
                eval_log.write("preference", step + 1, &final_eval)?;
            }
        }
    }
    lm.save_dir(&run_dir.join("model"))?;
    let result = serde_json::json!({
        "variant": cfg.name,
        "seed": cfg.seed,
        "model": cfg.model.preset,
        "final": final_eval,
    });
    write_json(&run_dir.join("result.json"), &result)?;
    Ok(final_eval)
}
