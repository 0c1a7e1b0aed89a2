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

/// PEFT's `LoraConfig` fields this crate uses (others in `adapter_config.json` are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank `r`.
    pub r: usize,
    /// `alpha`; the update is scaled by `alpha / r`.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter input; only 0 is supported (dropout is not applied).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub target_modules: Vec<String>,
    /// Always `LORA` (written for PEFT).
    #[serde(default = "lora_type")]
    pub peft_type: String,
}

fn lora_type() -> String {
    "LORA".into()
}

impl LoraConfig {
    /// Rank `r`, `alpha`, no dropout, the given target modules.
    pub fn new(r: usize, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            lora_alpha: alpha,
            lora_dropout: 0.0,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            peft_type: lora_type(),
        }
    }

    /// The paper's setting: r 64, alpha 128 on q/k/v/o/gate/up/down.
    pub fn paper() -> Self {
        Self::new(64, 128.0, &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    }

    /// Rejects unsupported values.
    pub fn validate(&self) -> Result<()> {
        let err = |field: &'static str, reason: &str| {
            Err(ModelError::Config { file: "adapter_config.json".into(), field, reason: reason.into() })
        };
        if self.r == 0 {
            return err("r", "must be at least 1");
        }
        if self.lora_dropout != 0.0 {
            return err("lora_dropout", "only 0 is supported (dropout is not applied)");
        }
        if self.target_modules.is_empty() {
            return err("target_modules", "name at least one module");
        }
        Ok(())
    }

    /// Whether the projection with full name `module` (`model.layers.0.self_attn.q_proj`) is a target.
    pub fn targets(&self, module: &str) -> bool {
        let last = module.rsplit('.').next().unwrap_or(module);
        self.target_modules.iter().any(|t| t == last)
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }
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

    /// The effective weight `[out, in]` (without the bias): `W` without an active adapter,
    /// `W + scale * B A` with one (differentiable w.r.t. `A` and `B`; the fused kernels apply it
    /// as one product). With `B = 0` this is `W` exactly, so a fresh adapter computes exactly the
    /// base model.
    pub fn effective_weight(&self) -> Result<Tensor> {
        match &self.lora {
            Some((a, b, scale, on)) if on.load(Ordering::Relaxed) => {
                Ok(self.base.weight().add(&(b.matmul(a)? * *scale)?)?)
            }
            _ => Ok(self.base.weight().clone()),
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
