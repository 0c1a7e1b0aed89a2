//! [`CausalLm`]: a model together with the variables that hold its weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::LlamaConfig;
use crate::llama::Llama;
use crate::{ModelError, Result};

/// A trainable causal language model: the architecture plus a `VarMap` of its weights under
/// Hugging Face names.
pub struct CausalLm {
    vars: VarMap,
    model: Llama,
}

impl CausalLm {
    /// Builds a model from named weights (e.g. read from safetensors); every weight becomes a
    /// trainable `Var`. Missing weights are an error naming them.
    pub fn from_tensors(cfg: &LlamaConfig, weights: HashMap<String, Tensor>) -> Result<Self> {
        let vars = VarMap::new();
        {
            let mut data = vars
                .data()
                .lock()
                .map_err(|_| ModelError::Input { input: "weights", reason: "variable map lock poisoned".into() })?;
            for (name, t) in weights {
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let device = vars.all_vars().first().map_or(Device::Cpu, |v| v.device().clone());
        let dtype = vars.all_vars().first().map_or(DType::F32, |v| v.dtype());
        let model = Llama::new(cfg, VarBuilder::from_varmap(&vars, dtype, &device))?;
        Ok(Self { vars, model })
    }

    /// A randomly initialised model, deterministic in `seed`: linear and embedding weights
    /// ~ N(0, 0.02^2) (Hugging Face's `initializer_range`), norm weights 1.
    pub fn random(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate("config")?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    // Box-Muller.
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                    (0.02 * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect()
        };
        let mut weights = HashMap::new();
        for (name, shape) in weight_shapes(cfg) {
            let t = if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else {
                Tensor::from_vec(normal(shape.iter().product()), shape.as_slice(), device)?
            };
            weights.insert(name, t);
        }
        Self::from_tensors(cfg, weights)
    }

    /// Loads `model.safetensors` (or a sharded `model.safetensors.index.json` set) and
    /// `config.json` from a Hugging Face model directory.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| ModelError::Io { path: config_path.display().to_string(), reason: e.to_string() })?;
        let cfg = LlamaConfig::from_json(&text, &config_path.display().to_string())?;
        let mut weights = HashMap::new();
        for file in crate::weights::safetensors_files(dir)? {
            let loaded = candle_core::safetensors::load(&file, device)
                .map_err(|e| ModelError::Io { path: file.display().to_string(), reason: e.to_string() })?;
            weights.extend(loaded);
        }
        Self::from_tensors(&cfg, weights)
    }

    /// The architecture.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        self.model.config()
    }

    /// Every trainable variable with its Hugging Face name, sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.vars.data().lock().map(|d| d.clone()).unwrap_or_default();
        let mut out: Vec<(String, Var)> = data.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Current weights by name (shared storage; copy before mutating).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
    }

    /// Overwrites every weight from `weights` (names and shapes must match).
    pub fn set_weights(&self, weights: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.trainable_vars() {
            let t = weights
                .get(&name)
                .ok_or_else(|| ModelError::Input { input: "weights", reason: format!("missing `{name}`") })?;
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Writes `model.safetensors` and `config.json` into `dir` (the Hugging Face layout).
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let io = |e: std::io::Error| ModelError::Io { path: dir.display().to_string(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut weights = self.weights();
        if self.config().tie_word_embeddings {
            weights.remove("lm_head.weight");
        }
        let file = dir.join("model.safetensors");
        candle_core::safetensors::save(&weights, &file)
            .map_err(|e| ModelError::Io { path: file.display().to_string(), reason: e.to_string() })?;
        let text = serde_json::to_string_pretty(self.config())
            .map_err(|e| ModelError::Io { path: dir.display().to_string(), reason: e.to_string() })?;
        std::fs::write(dir.join("config.json"), text).map_err(io)
    }
}

/// Every weight of a Llama config with its shape, Hugging Face names.
pub fn weight_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![cfg.num_attention_heads * hd, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![cfg.kv_heads() * hd, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![cfg.kv_heads() * hd, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, cfg.num_attention_heads * hd]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    out
}
