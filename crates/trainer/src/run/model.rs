//! The run's model: the tiny presets of the embedded task, and loading the starting model and
//! its data.

use candle_core::Device;
use slime_data::TextTokenizer;
use slime_models::{CausalLm, GemmaConfig, LlamaConfig};

use super::{RunOptions, note, preflight};
use crate::config::{RunConfig, builtin_template};
use crate::corpus::RunData;
use crate::model_source::{has_chat_template, tokenizer_dir};
use crate::task;
use crate::{Result, TrainError};

/// The tiny Llama the embedded task trains.
pub fn tiny_llama(hidden: usize, layers: usize) -> LlamaConfig {
    LlamaConfig {
        max_position_embeddings: 128,
        ..LlamaConfig::tiny(task::vocab_size(), hidden, 2 * hidden, layers, 4, 2)
    }
}

/// The tiny Gemma 3 the embedded task trains with `model.preset = "tiny-gemma"`: QK-norm,
/// alternating sliding-window (16 positions) and global layers.
pub fn tiny_gemma(hidden: usize, layers: usize) -> GemmaConfig {
    GemmaConfig {
        max_position_embeddings: 128,
        sliding_window: Some(16),
        ..GemmaConfig::tiny3(task::vocab_size(), hidden, 2 * hidden, layers, 4, 2)
    }
}

/// The device the model's weights are on.
pub(super) fn device_of(lm: &CausalLm) -> Device {
    lm.model().device()
}

/// The run's starting model and its data: a preset (random init, seeded) on the embedded task,
/// or a pretrained model on a Parquet file; `init` replaces the starting weights. Also returns
/// the tokenizer that decodes generations (Parquet data only).
pub(super) fn load_model_and_data(
    cfg: &RunConfig,
    device: &Device,
    opts: &RunOptions,
) -> Result<(CausalLm, RunData, Option<TextTokenizer>)> {
    let dtype = cfg.model.load_dtype();
    let lm = match (&cfg.init, &cfg.model.path) {
        (Some(dir), _) => CausalLm::from_dir_as(dir, device, dtype)?,
        (None, Some(path)) => {
            note(opts, &format!("loading {}", path.display()));
            crate::model_source::ModelSource::new(path.clone()).load_model_as(device, dtype)?
        }
        (None, None) => {
            let lm = match cfg.model.preset.as_str() {
                "tiny-gemma" => CausalLm::random(&tiny_gemma(cfg.model.hidden, cfg.model.layers), cfg.seed, device)?,
                _ => CausalLm::random(&tiny_llama(cfg.model.hidden, cfg.model.layers), cfg.seed, device)?,
            };
            match dtype {
                Some(dtype) => {
                    let weights =
                        lm.weights().into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect::<Result<_>>()?;
                    CausalLm::from_tensors(lm.config(), weights)?
                }
                None => lm,
            }
        }
    };
    lm.model().set_gradient_checkpointing(cfg.model.gradient_checkpointing)?;
    if cfg.model.path.is_none() {
        let data = RunData::embedded(cfg.data.pairs, cfg.data.eval_pairs, cfg.seed)?;
        preflight::check_context(&data, lm.config(), None)?;
        return Ok((lm, data, None));
    }
    let (data, decoder) = parquet_data(cfg, &lm)?;
    if let Some(s) = &data.summary {
        note(
            opts,
            &format!(
                "{}: {} rows: {} SFT, {} preference, {} held-out pairs; {} truncated; dropped as too long {:?}; \
                 skipped {:?}; lengths {}",
                s.file,
                s.rows,
                s.sft_pairs,
                s.preference_pairs,
                s.eval_pairs,
                s.truncated_pairs,
                s.dropped_overlong,
                s.skipped,
                s.lengths
            ),
        );
        if !s.degenerate.is_clean() {
            super::warn(&format!("{}: {} (kept; counted in data.json)", s.file, s.degenerate));
        }
    }
    Ok((lm, data, Some(decoder)))
}

/// The Parquet data of `cfg` encoded with `model.path`'s tokenizer and chat template (or the
/// built-in `data.template`), checked against `lm`'s vocabulary; and a tokenizer for decoding.
pub(super) fn parquet_data(cfg: &RunConfig, lm: &CausalLm) -> Result<(RunData, TextTokenizer)> {
    let path = cfg.model.path.as_deref().ok_or_else(|| TrainError::Config("model.path: not set".into()))?;
    preflight::check_max_length(cfg, lm.config())?;
    let dir = cfg.model.tokenizer.clone().unwrap_or_else(|| tokenizer_dir(path));
    let tokenizer = TextTokenizer::from_dir(&dir)?;
    let fallback = cfg.data.template.as_deref().and_then(builtin_template);
    let template =
        if has_chat_template(&dir)? || fallback.is_some() { Some(tokenizer.chat_template(fallback)?) } else { None };
    let vocab = crate::model_source::vocab_size(lm.config());
    let data = RunData::from_parquet(&cfg.data, tokenizer, &dir, template, vocab)?;
    if cfg.sft.steps > 0 {
        data.require_sft(cfg.data.parquet.as_deref().unwrap_or(path))?;
    }
    preflight::check_context(&data, lm.config(), cfg.data.parquet.as_deref())?;
    Ok((data, TextTokenizer::from_dir(&dir)?))
}
