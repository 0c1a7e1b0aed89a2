//! One TOML file per run. Every field has a default and a doc comment; unknown fields are
//! rejected; [`RunConfig::validate`] rejects out-of-range values before any work starts.
//!
//! ```toml
//! name = "slime"            # the variant's name in reports
//! seed = 0
//! init = "results/sft-seed0/model"   # start from these weights (skip SFT); optional
//!
//! [model]
//! preset = "tiny-llama"     # or: dir = "path/to/hf-model-dir"
//!
//! [data]
//! pairs = 3000              # embedded task: pairs generated (1/3 SFT, 2/3 preference, disjoint)
//! eval_pairs = 128
//!
//! [sft]
//! steps = 400
//!
//! [preference]
//! steps = 200
//! objective = { type = "slime", preset = "paper" }
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use slime_objectives::{Objective, SlimeParams};

use crate::schedule::{Decay, Schedule};
use crate::selection::{SageParams, SelectionKind};
use crate::{Result, TrainError};

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Variant name written into `result.json` (default "run").
    pub name: String,
    /// Seed for model init, data generation, shuffling (default 0).
    pub seed: u64,
    /// Start from this model directory (config.json + model.safetensors) and skip SFT.
    pub init: Option<PathBuf>,
    /// The model.
    pub model: ModelSpec,
    /// The data.
    pub data: DataSpec,
    /// The SFT stage.
    pub sft: StageSpec,
    /// The preference stage.
    pub preference: PreferenceSpec,
    /// Evaluation.
    pub eval: EvalSpec,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            seed: 0,
            init: None,
            model: ModelSpec::default(),
            data: DataSpec::default(),
            sft: StageSpec::default(),
            preference: PreferenceSpec::default(),
            eval: EvalSpec::default(),
        }
    }
}

/// Which model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// A built-in random-init model sized for the embedded task: `tiny-llama` (default).
    pub preset: String,
    /// Hidden size of the preset (default 96).
    pub hidden: usize,
    /// Decoder layers of the preset (default 2).
    pub layers: usize,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self { preset: "tiny-llama".into(), hidden: 96, layers: 2 }
    }
}

/// The embedded task's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// Training pairs generated: the first third is the SFT split, the rest the disjoint
    /// preference split, as in the paper (default 3000).
    pub pairs: usize,
    /// Held-out pairs for evaluation (default 128).
    pub eval_pairs: usize,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self { pairs: 3000, eval_pairs: 128 }
    }
}

/// An optimisation stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageSpec {
    /// Optimiser steps (0 skips the stage).
    pub steps: u64,
    /// Pairs (SFT: sequences) per optimiser step.
    pub batch_size: usize,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Gradient-norm clipping (PyTorch's `clip_grad_norm_`); none if absent.
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: f64,
}

impl Default for StageSpec {
    fn default() -> Self {
        Self {
            steps: 600,
            batch_size: 32,
            schedule: Schedule { lr: 3e-3, decay: Decay::Cosine, warmup_ratio: 0.05 },
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
        }
    }
}

/// The preference stage: a stage plus its objective and data selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreferenceSpec {
    /// Optimiser steps (0 skips the stage).
    pub steps: u64,
    /// Pairs per optimiser step.
    pub batch_size: usize,
    /// Learning-rate schedule (the paper: linear decay).
    pub schedule: Schedule,
    /// Gradient-norm clipping.
    pub max_grad_norm: Option<f64>,
    /// The objective (default SLIME, paper preset).
    pub objective: Objective,
    /// `uniform` (default) or `sage`.
    pub selection: SelectionKind,
    /// SAGE parameters (used with `selection = "sage"`).
    pub sage: SageParams,
}

impl Default for PreferenceSpec {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 32,
            schedule: Schedule { lr: 1e-3, decay: Decay::Linear, warmup_ratio: 0.0 },
            max_grad_norm: Some(1.0),
            objective: Objective::Slime(SlimeParams::paper()),
            selection: SelectionKind::Uniform,
            sage: SageParams::default(),
        }
    }
}

/// Evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate every this many preference steps (and at the start and end; default 25).
    pub every: u64,
    /// Held-out prompts decoded greedily per evaluation (default 64).
    pub generations: usize,
    /// Longest generation (default 24 tokens).
    pub max_new_tokens: usize,
    /// Collapse threshold delta: rejected tokens with log-prob below -delta (default 1.25).
    pub collapse_delta: f64,
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self { every: 25, generations: 64, max_new_tokens: 24, collapse_delta: 1.25 }
    }
}

impl RunConfig {
    /// Parses TOML; unknown fields and type errors name the field.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects out-of-range values.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TrainError::Config(what));
        if self.model.preset != "tiny-llama" {
            return bad(format!("model.preset = `{}`: expected `tiny-llama`", self.model.preset));
        }
        if self.model.hidden == 0 || !self.model.hidden.is_multiple_of(4) || self.model.layers == 0 {
            return bad(format!("model.hidden = {} must be a positive multiple of 4, layers >= 1", self.model.hidden));
        }
        if self.data.pairs < 3 || self.data.eval_pairs == 0 {
            return bad(format!("data.pairs = {} must be >= 3 and eval_pairs >= 1", self.data.pairs));
        }
        if self.sft.batch_size == 0 || self.preference.batch_size == 0 {
            return bad("sft.batch_size and preference.batch_size must be >= 1".into());
        }
        self.sft.schedule.validate()?;
        self.preference.schedule.validate()?;
        for (stage, clip) in [("sft", self.sft.max_grad_norm), ("preference", self.preference.max_grad_norm)] {
            if clip.is_some_and(|c| c <= 0.0 || c.is_nan()) {
                return bad(format!("{stage}.max_grad_norm must be > 0"));
            }
        }
        self.preference.objective.validate()?;
        if !self.preference.objective.is_preference() && self.preference.steps > 0 {
            return bad("preference.objective must be a preference objective (not sft)".into());
        }
        self.preference.sage.validate()?;
        if self.eval.every == 0 {
            return bad("eval.every must be >= 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_round_trip() -> Result<()> {
        let cfg = RunConfig::from_toml("")?;
        assert_eq!(cfg, RunConfig::default());
        let text = toml::to_string(&cfg).map_err(|e| TrainError::Config(e.to_string()))?;
        assert_eq!(RunConfig::from_toml(&text)?, cfg);
        let dpo = RunConfig::from_toml("[preference]\nobjective = { type = \"dpo\", beta = 0.5 }")?;
        assert!(dpo.preference.objective.needs_reference());
        Ok(())
    }

    #[test]
    fn bad_values_are_rejected_before_work() {
        for (text, needle) in [
            ("seeed = 1", "seeed"),
            ("[sft]\nbatch_size = 0", "batch_size"),
            ("[preference]\nobjective = { type = \"slime\", p = -1.0 }", "`p`"),
            ("[preference.schedule]\nlr = -1.0", "lr"),
            ("[model]\npreset = \"gpt5\"", "gpt5"),
            ("[preference]\nmax_grad_norm = 0.0", "max_grad_norm"),
        ] {
            let err = RunConfig::from_toml(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
