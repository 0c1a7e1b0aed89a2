//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a target
//! projection `y = x W^T` becomes `y = x W^T + (alpha / r) * (x A^T) B^T` with `A [r, in]`,
//! `B [out, r]`; only `A` and `B` train, `W` is frozen (a detached view sharing the base weights'
//! storage, so no copy and no gradient). `B = 0` at initialisation (PEFT's default), so a fresh
//! adapter computes exactly the base model; switching adapters off gives DPO's reference model
//! without a second copy of the weights. Saved in PEFT's layout: `adapter_config.json` and
//! `adapter_model.safetensors` with `base_model.model.{module}.lora_{A,B}.weight`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use candle_nn::Linear;
use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

fn default_alpha() -> f64 {
    8.0
}

fn lora_type() -> String {
    "LORA".into()
}

fn no_bias() -> String {
    "none".into()
}

/// The projections this crate can adapt (their last module-name component).
pub const ADAPTABLE: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// PEFT's `target_modules`: a list of module names, or one regular expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches when its full name equals an entry or ends with `.` + the entry
    /// (`q_proj` matches `model.layers.0.self_attn.q_proj`).
    Names(Vec<String>),
    /// A module matches when the regular expression matches its whole full name (PEFT's
    /// `re.fullmatch`), e.g. `.*\.(q|v)_proj`.
    Pattern(String),
}

/// A LoRA adapter's configuration: PEFT's `LoraConfig` fields this crate computes with, plus the
/// ones it writes so PEFT and transformers load the adapter directory.
///
/// Read from a PEFT `adapter_config.json` by [`LoraConfig::from_peft_json`]: `use_rslora` is
/// honoured (scale `alpha / sqrt(r)`); `lora_dropout` is kept but never applied (dropout only
/// acts in training, and loaded adapters are not trained further with it); a string
/// `target_modules` is a regular expression matched against whole module names; any setting
/// that would change the computation and is not supported (DoRA, `modules_to_save`, rank or
/// alpha patterns, `bias` other than `none`, `fan_in_fan_out`, `layers_to_transform`, ...)
/// is an error naming the field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r`.
    pub r: usize,
    /// `alpha`; the update is scaled by [`LoraConfig::scale`].
    #[serde(default = "default_alpha", serialize_with = "crate::config::whole_as_int")]
    pub lora_alpha: f64,
    /// Dropout on the adapter input: must be 0 to train ([`LoraConfig::validate`]); in a loaded
    /// adapter it is kept and ignored, as dropout has no effect at inference.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which projections get an adapter.
    pub target_modules: TargetModules,
    /// Always `LORA`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// Rank-stabilised LoRA (Kalajdzievski 2023): scale `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The model the adapter applies to (a directory or Hub id), written for PEFT's
    /// `AutoPeftModelForCausalLM`; not used for computation.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    /// Rank `r`, `alpha`, no dropout, the given target modules, scale `alpha / r`.
    pub fn new(r: usize, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(targets.iter().map(|s| s.to_string()).collect()),
            peft_type: lora_type(),
            use_rslora: false,
            base_model_name_or_path: None,
        }
    }

    /// The paper's setting: r 64, alpha 128 on q/k/v/o/gate/up/down.
    pub fn paper() -> Self {
        Self::new(64, 128.0, &ADAPTABLE)
    }

    /// Rejects values that cannot be trained or loaded (`file` names the config in errors).
    pub fn validate(&self) -> Result<()> {
        self.check("adapter_config.json", true)
    }

    /// Checks the config; `training` also rejects dropout, which this crate does not apply.
    pub(crate) fn check(&self, file: &str, training: bool) -> Result<()> {
        let err = |field: &'static str, reason: String| Err(ModelError::Config { file: file.into(), field, reason });
        if self.r == 0 {
            return err("r", "must be at least 1".into());
        }
        if self.peft_type != "LORA" {
            return err("peft_type", format!("`{}` is not supported (expected `LORA`)", self.peft_type));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return err("lora_dropout", format!("{} is not a probability in [0, 1)", self.lora_dropout));
        }
        if training && self.lora_dropout != 0.0 {
            return err("lora_dropout", "only 0 is supported for training (dropout is not applied)".into());
        }
        match &self.target_modules {
            TargetModules::Names(names) if names.is_empty() => {
                return err("target_modules", "name at least one module".into());
            }
            TargetModules::Pattern(p) => {
                if let Err(e) = full_match(p) {
                    return err("target_modules", format!("`{p}` is not a valid regular expression: {e}"));
                }
            }
            TargetModules::Names(_) => {}
        }
        Ok(())
    }

    /// Reads a PEFT `adapter_config.json` (`file` names it in errors): the fields above, every
    /// other PEFT field checked to be one this crate can honour (see the type's doc).
    pub fn from_peft_json(text: &str, file: &str) -> Result<Self> {
        let value = crate::config::parse_json(text, file)?;
        let Some(map) = value.as_object() else {
            return Err(ModelError::Config { file: file.into(), field: "(json)", reason: "expected an object".into() });
        };
        reject_unsupported(map, file)?;
        let cfg: Self = serde_json::from_value(value.clone()).map_err(|e| ModelError::Config {
            file: file.into(),
            field: "(json)",
            reason: e.to_string(),
        })?;
        cfg.check(file, false)?;
        Ok(cfg)
    }

    /// The `adapter_config.json` PEFT writes for this adapter: every `LoraConfig` field PEFT
    /// (0.22) saves except `peft_version`, with this adapter's values and PEFT's defaults for the
    /// features it does not use, `task_type = "CAUSAL_LM"` and `inference_mode = true` (as a
    /// saved PEFT model has).
    pub fn to_peft_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "alora_invocation_tokens": null,
            "alpha_pattern": {},
            "arrow_config": null,
            "astra_config": null,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": no_bias(),
            "corda_config": null,
            "ensure_weight_tying": false,
            "eva_config": null,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "kasa_config": null,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": serde_json::Value::Null,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout,
            "lora_ga_config": null,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "monteclora_config": null,
            "peft_type": self.peft_type,
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.target_modules,
            "target_parameters": null,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": null,
            "use_bdlora": null,
            "use_dora": false,
            "use_qalora": false,
            "use_rslora": self.use_rslora,
            "velora_config": null,
        });
        let alpha = crate::config::whole_as_int(&self.lora_alpha, serde_json::value::Serializer).unwrap_or_default();
        v["lora_alpha"] = alpha;
        v
    }

    /// Whether the projection with full name `module` (`model.layers.0.self_attn.q_proj`) is a
    /// target (an invalid pattern, which [`Self::validate`] rejects, matches nothing).
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            TargetModules::Names(names) => names
                .iter()
                .any(|t| module == t || module.strip_suffix(t.as_str()).is_some_and(|head| head.ends_with('.'))),
            TargetModules::Pattern(p) => full_match(p).is_ok_and(|re| re.is_match(module)),
        }
    }

    /// The update's scale: `alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }
}

/// `pattern` anchored at both ends, as Python's `re.fullmatch`.
fn full_match(pattern: &str) -> std::result::Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

/// PEFT fields that describe the adapter without changing what it computes here.
const DESCRIPTIVE: [&str; 16] = [
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
    "layers_pattern",
    "loftq_config",
    "eva_config",
    "corda_config",
    "astra_config",
    "lora_ga_config",
    "runtime_config",
    "lora_dropout",
    "use_rslora",
];

/// Every field of PEFT's `LoraConfig` (0.22), so errors can name the field as a `&'static str`.
const PEFT_FIELDS: [&str; 43] = [
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "target_modules",
    "exclude_modules",
    "lora_alpha",
    "lora_dropout",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "megatron_config",
    "megatron_core",
    "trainable_token_indices",
    "loftq_config",
    "eva_config",
    "corda_config",
    "astra_config",
    "lora_ga_config",
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "use_qalora",
    "qalora_group_size",
    "monteclora_config",
    "layer_replication",
    "runtime_config",
    "lora_bias",
    "target_parameters",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "ensure_weight_tying",
];

/// Rejects, by name, every PEFT setting this crate cannot compute: a field not read by
/// [`LoraConfig`] nor [`DESCRIPTIVE`] must hold its inactive value (null, false, `{}`, `[]`), and
/// `task_type`, `bias`, `init_lora_weights` must be the values a plain LoRA has.
fn reject_unsupported(map: &serde_json::Map<String, serde_json::Value>, file: &str) -> Result<()> {
    use serde_json::Value;
    let unsupported = |key: &str, v: &Value, expected: &str| ModelError::Config {
        file: file.into(),
        field: PEFT_FIELDS.iter().find(|k| **k == key).copied().unwrap_or("(a PEFT field this crate does not know)"),
        reason: format!("`{key}` = {v} is not supported (expected {expected})"),
    };
    for (key, v) in map {
        let ok = match key.as_str() {
            "r" | "lora_alpha" | "target_modules" | "peft_type" => true,
            k if DESCRIPTIVE.contains(&k) => true,
            "task_type" => matches!(v, Value::Null) || v == "CAUSAL_LM",
            "bias" => v == "none",
            // `gaussian` and the default differ only in how `A` started; the others change the base weights.
            "init_lora_weights" => matches!(v, Value::Bool(_)) || v == "gaussian",
            _ => match v {
                Value::Null | Value::Bool(false) => true,
                Value::Object(o) => o.is_empty(),
                Value::Array(a) => a.is_empty(),
                _ => false,
            },
        };
        if !ok {
            let expected = match key.as_str() {
                "task_type" => "`CAUSAL_LM`",
                "bias" => "`none`",
                "init_lora_weights" => "true, false or `gaussian`: other schemes change the base model's weights",
                _ => "it unset: null, false or empty",
            };
            return Err(unsupported(key, v, expected));
        }
    }
    Ok(())
}

/// Adapter tensors by module name, shared switch and scale; handed to model constructors.
pub struct Adapters {
    /// `module -> (A [r, in], B [out, r])`.
    pub map: HashMap<String, (Tensor, Tensor)>,
    /// `alpha / r`.
    pub scale: f64,
    /// Adapters are applied while this is true.
    pub enabled: Arc<AtomicBool>,
}

/// A projection `x W^T (+ b)` with an optional LoRA adapter (on `W`; the bias stays as it is).
pub struct Proj {
    base: Linear,
    lora: Option<(Tensor, Tensor, f64, Arc<AtomicBool>)>,
}

impl Proj {
    /// `weight [out, in]` under module name `module`, with its adapter if `adapters` has one.
    pub fn new(weight: Tensor, module: &str, adapters: Option<&Adapters>) -> Self {
        let lora =
            adapters.and_then(|a| a.map.get(module).map(|(x, y)| (x.clone(), y.clone(), a.scale, a.enabled.clone())));
        Self { base: Linear::new(weight, None), lora }
    }

    /// The same projection with a bias `[out]` added to its output (`None`: bias-free).
    pub fn with_bias(self, bias: Option<Tensor>) -> Self {
        Self { base: Linear::new(self.base.weight().clone(), bias), lora: self.lora }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }

    /// The base weight `W [out, in]` (frozen under an adapter).
    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    /// The adapter while it is on, as the fused blocks take it (`y = x W^T + scale (x A^T) B^T`,
    /// trained through the `r`-wide products); `None` without one or while adapters are off.
    pub fn low_rank(&self) -> Option<crate::fused::LowRank<'_>> {
        match &self.lora {
            Some((a, b, scale, on)) if on.load(Ordering::Relaxed) => {
                Some(crate::fused::LowRank { a, b, scale: *scale })
            }
            _ => None,
        }
    }

    /// `x W^T (+ b) (+ scale * (x A^T) B^T when the adapter is on)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::fused::linear(x, self.base.weight())?;
        let y = match self.base.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some((a, b, scale, on)) if on.load(Ordering::Relaxed) => {
                let delta = x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
                Ok((y + (delta * *scale)?)?)
            }
            _ => Ok(y),
        }
    }
}
