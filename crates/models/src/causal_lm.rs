//! [`CausalLm`]: a model together with the variables that hold its weights; the methods
//! [`ModelConfig`] and [`Model`] (generated from the family list in `registry.rs`) share across
//! families.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::generation::{self, KvCache};
use crate::lora::{Adapters, LoraConfig};
use crate::registry::{MODEL_TYPES, build};
use crate::{ModelError, Result};

pub use crate::registry::{Model, ModelConfig};

impl ModelConfig {
    /// Parses a Hugging Face `config.json`, choosing the family by `model_type` (absent:
    /// `llama`; the registry lists which family reads which type; anything else is an error
    /// naming the supported types).
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let value = crate::config::parse_json(text, file)?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama");
        Self::parse_family(model_type, text, file).unwrap_or_else(|| {
            let expected: Vec<String> = MODEL_TYPES.iter().map(|t| format!("`{t}`")).collect();
            Err(ModelError::Config {
                file: file.into(),
                field: "model_type",
                reason: format!("`{model_type}` is not supported (expected one of {})", expected.join(", ")),
            })
        })
    }

    /// Reads the architecture of a llama.cpp GGUF file from its metadata, without a Hugging Face
    /// `config.json` (`general.architecture` `llama`, `qwen2`, `qwen3`, `gemma`, `gemma2` or
    /// `gemma3`; the keys read are listed at [`crate::gguf::config_from_content`]). Missing,
    /// mistyped or unsupported keys are errors naming the file and the key.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        crate::gguf::read_config(path)
    }

    /// Every weight with its shape, Hugging Face names.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.family().weight_shapes()
    }

    pub(crate) fn validate(&self, file: &str) -> Result<()> {
        self.family().validate(file)
    }

    /// The `model_type` (`llama`, `qwen2`, `qwen3`, `gemma`, `gemma2`, `gemma3_text`, `mistral`;
    /// a config without one is its family's first, as [`Self::from_json`] reads it).
    pub fn model_type(&self) -> &str {
        self.family().model_type()
    }

    /// transformers' class for this config (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
    /// `Gemma3ForCausalLM`, `MistralForCausalLM`, ...).
    pub fn architecture(&self) -> &'static str {
        self.family().architecture()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.family().vocab_size()
    }

    /// The longest sequence the model allows (`max_position_embeddings`).
    pub fn max_position_embeddings(&self) -> usize {
        self.family().max_position_embeddings()
    }

    /// The `config.json` that transformers (4.x with the classic RoPE fields, 5.x with its strict
    /// config classes) loads: the family's fields, each with the JSON type transformers declares
    /// (integers as integers, floats as floats, no `null` where a string is expected), plus
    /// `architectures`, an explicit `model_type` and what the family adds
    /// ([`crate::FamilyConfig::complete_hf_json`]). Token ids and the dtype are added by whoever knows
    /// them ([`CausalLm::save_dir`], the trainer).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        let Some(obj) = value.as_object_mut() else { return value };
        obj.insert("architectures".into(), serde_json::json!([self.architecture()]));
        obj.insert("model_type".into(), self.model_type().into());
        // No attention dropout is applied, in training or not.
        obj.entry("attention_dropout").or_insert(0.0.into());
        obj.retain(|key, v| !(v.is_null() && key == "rope_scaling"));
        self.family().complete_hf_json(obj);
        value
    }
}

impl Model {
    /// The configuration of the family behind the common interface.
    pub fn config(&self) -> &dyn crate::FamilyConfig {
        self.decoder().config()
    }

    /// Final hidden states `[batch, seq, hidden]` (see [`crate::Decoder::forward_hidden`]).
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.decoder().forward_hidden(input_ids, attention_mask)
    }

    /// The composed forward pass the fused one is tested against (see
    /// [`crate::Decoder::forward_hidden_reference`]).
    pub fn forward_hidden_reference(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.decoder().forward_hidden_reference(input_ids, attention_mask)
    }

    /// Hidden states of rows holding two continuations of a shared prefix, `None` off the fused
    /// path (see [`crate::Decoder::forward_hidden_branched`]).
    pub fn forward_hidden_branched(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        branches: &[(usize, usize)],
        rows: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        self.decoder().forward_hidden_branched(input_ids, attention_mask, branches, rows)
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> &Tensor {
        self.decoder().lm_head()
    }

    /// Final logits soft-capping `cap * tanh(logits / cap)` (Gemma 2 / 3), if any.
    pub fn final_logit_softcapping(&self) -> Option<f64> {
        self.decoder().final_logit_softcapping()
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        self.lm_head().device().clone()
    }

    /// Per-token log-probs `[batch, seq]` f32 (see [`crate::Decoder::token_logps`]).
    pub fn token_logps(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, chunk: usize) -> Result<Tensor> {
        self.decoder().token_logps(input_ids, attention_mask, chunk)
    }

    /// Per-token log-probs `[2 n, seq]` of `n` preference pairs (rows `i` and `n + i`), equal to
    /// [`Self::token_logps`] on real tokens, with each pair's common prefix computed once when
    /// the model runs the fused path (see [`crate::pairs`]).
    pub fn pair_token_logps(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        chunk: usize,
    ) -> Result<Tensor> {
        crate::pairs::pair_token_logps(self, input_ids, attention_mask, chunk)
    }

    /// [`Self::pair_token_logps`] at the positions `wanted` `[2 n, seq]` marks (e.g. the
    /// completion mask), 0 elsewhere; the rest is not computed (see
    /// [`crate::pairs::pair_token_logps_at`]).
    pub fn pair_token_logps_at(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        wanted: &Tensor,
        chunk: usize,
    ) -> Result<Tensor> {
        crate::pairs::pair_token_logps_at(self, input_ids, attention_mask, wanted, chunk)
    }

    /// Turns gradient checkpointing on or off (see
    /// [`crate::Decoder::set_gradient_checkpointing`]: the fused blocks keep only their inputs).
    /// Never an error (the `Result` is kept for callers).
    pub fn set_gradient_checkpointing(&self, on: bool) -> Result<()> {
        self.decoder().set_gradient_checkpointing(on);
        Ok(())
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.decoder().gradient_checkpointing()
    }

    /// The activation memory of the fused blocks (see [`crate::Decoder::activation_meter`]).
    /// Always `Some`.
    pub fn activation_meter(&self) -> Option<&crate::fused::ActivationMeter> {
        Some(self.decoder().activation_meter())
    }

    /// Logits `[batch, vocab]` at each row's last real position (soft-capped where the family
    /// caps them).
    pub fn last_logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.decoder().last_logits(input_ids, attention_mask)
    }

    /// Logits `[batch, vocab]` (f32, soft-capped for Gemma 2/3) at the last of `n` new slots
    /// `input_ids` `[batch, n]` that continue the sequences in `cache`, whose keys and values
    /// they append (see [`crate::generation`]; left-padded rows as [`KvCache::left_padded`]
    /// describes). Feeding a prompt and then one token at a time gives the logits
    /// [`Self::last_logits`] gives over the whole prefix, within float rounding. No gradients.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let m = self.decoder();
        generation::last_logits(&m.forward_hidden_cached(input_ids, cache)?, m.lm_head(), m.final_logit_softcapping())
    }

    /// Greedy decoding of one prompt: appends the argmax token until a `stop` id (included in
    /// the output) or `max_new` tokens. Returns only the new tokens. Uses a [`KvCache`]: the
    /// prompt is run once, then one position per new token.
    pub fn generate_greedy(&self, prompt: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>> {
        Ok(self.generate_greedy_batch(&[prompt], max_new, stop)?.pop().unwrap_or_default())
    }

    /// Sampled decoding of one prompt: each new token is drawn from `softmax(logits / temperature)`
    /// with a ChaCha8 generator seeded by `seed` (same seed, same output); `temperature <= 0`
    /// means greedy. Stops after a `stop` id (included) or `max_new` tokens. Returns only the new
    /// tokens. Uses a [`KvCache`] like [`Self::generate_greedy`].
    pub fn generate_sampled(
        &self,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<u32>> {
        Ok(self.generate_sampled_batch(&[prompt], max_new, stop, temperature, &[seed])?.pop().unwrap_or_default())
    }

    /// [`Self::generate_greedy`] for several prompts decoded together: one left-padded batch
    /// (prompts of any lengths), one forward per step for all unfinished rows; each row stops
    /// on its own (a `stop` id, `max_new` tokens or the model's context) and leaves the batch.
    /// Row `i` of the result equals `generate_greedy(prompts[i], ..)` (within float rounding of
    /// the logits, which decides only exact ties).
    pub fn generate_greedy_batch<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        self.decode(prompts, max_new, stop, |logits, _rows| Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?))
    }

    /// [`Self::generate_sampled`] for several prompts decoded together (batched as
    /// [`Self::generate_greedy_batch`]): prompt `i` draws from its own ChaCha8 generator seeded
    /// by `seeds[i]`, one uniform draw per token, so its output does not depend on which other
    /// prompts share the batch and equals `generate_sampled(prompts[i], .., seeds[i])`.
    pub fn generate_sampled_batch<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        max_new: usize,
        stop: &[u32],
        temperature: f64,
        seeds: &[u64],
    ) -> Result<Vec<Vec<u32>>> {
        if seeds.len() != prompts.len() {
            return Err(ModelError::Input {
                input: "seeds",
                reason: format!("{} seeds for {} prompts (one each)", seeds.len(), prompts.len()),
            });
        }
        if temperature <= 0.0 {
            return self.generate_greedy_batch(prompts, max_new, stop);
        }
        let mut rngs: Vec<ChaCha8Rng> = seeds.iter().map(|&s| ChaCha8Rng::seed_from_u64(s)).collect();
        self.decode(prompts, max_new, stop, |logits, rows| {
            rows.iter().enumerate().map(|(k, &i)| sample(&logits.get(k)?, temperature, &mut rngs[i])).collect()
        })
    }

    /// The decoding loop shared by greedy and sampled generation. `pick` chooses the next token
    /// of each unfinished row from the `[rows, vocab]` last-position logits, given the prompt
    /// index of each row. The prompts, left-padded to the longest, fill a fresh [`KvCache`];
    /// each later step feeds only the tokens just chosen. A row finishes after a `stop` id,
    /// `max_new` tokens, or when its sequence fills `max_position_embeddings`; finished rows
    /// leave the batch and the cache.
    fn decode<P: AsRef<[u32]>>(
        &self,
        prompts: &[P],
        max_new: usize,
        stop: &[u32],
        mut pick: impl FnMut(&Tensor, &[usize]) -> Result<Vec<u32>>,
    ) -> Result<Vec<Vec<u32>>> {
        let (device, max_pos) = (self.device(), self.config().max_position_embeddings());
        if let Some(i) = prompts.iter().position(|p| p.as_ref().is_empty()) {
            return Err(ModelError::Input {
                input: "prompt",
                reason: format!("prompt {i} is empty: each must hold at least one token"),
            });
        }
        let mut outs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        // Prompt indices of the rows still decoding, in batch order.
        let mut rows: Vec<usize> = if max_new == 0 {
            Vec::new()
        } else {
            (0..prompts.len()).filter(|&i| prompts[i].as_ref().len() < max_pos).collect()
        };
        if rows.is_empty() {
            return Ok(outs);
        }
        let longest = rows.iter().map(|&i| prompts[i].as_ref().len()).max().unwrap_or(0);
        let pad: Vec<usize> = rows.iter().map(|&i| longest - prompts[i].as_ref().len()).collect();
        let mut ids = Vec::with_capacity(rows.len() * longest);
        for (&i, &p) in rows.iter().zip(&pad) {
            // Filler slots hold token 0: masked as keys, never read as outputs.
            ids.extend(std::iter::repeat_n(0u32, p));
            ids.extend_from_slice(prompts[i].as_ref());
        }
        let mut cache = if pad.iter().all(|&p| p == 0) { KvCache::new(self) } else { KvCache::left_padded(self, pad) };
        let mut input = Tensor::from_vec(ids, (rows.len(), longest), &device)?;
        loop {
            let logits = self.forward_cached(&input, &mut cache)?;
            let next = pick(&logits, &rows)?;
            let mut keep = Vec::with_capacity(rows.len());
            let mut feed = Vec::with_capacity(rows.len());
            for (k, (&i, &token)) in rows.iter().zip(&next).enumerate() {
                outs[i].push(token);
                let done = stop.contains(&token)
                    || outs[i].len() >= max_new
                    || prompts[i].as_ref().len() + outs[i].len() >= max_pos;
                if !done {
                    keep.push(k);
                    feed.push(token);
                }
            }
            if keep.is_empty() {
                return Ok(outs);
            }
            if keep.len() < rows.len() {
                cache.retain_rows(&keep)?;
                rows = keep.iter().map(|&k| rows[k]).collect();
            }
            input = Tensor::from_vec(feed, (rows.len(), 1), &device)?;
        }
    }
}

/// One draw from `softmax(logits / temperature)` for a `[vocab]` row: the first token whose
/// cumulative probability exceeds a uniform `u` in [0, 1) (the last token if rounding leaves
/// the sum below `u`).
fn sample(logits: &Tensor, temperature: f64, rng: &mut ChaCha8Rng) -> Result<u32> {
    let probs = candle_nn::ops::softmax_last_dim(&(logits / temperature)?)?.to_vec1::<f32>()?;
    let u: f32 = rng.random();
    let mut acc = 0f32;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return Ok(i as u32);
        }
    }
    Ok(probs.len().saturating_sub(1) as u32)
}

/// A trainable causal language model: the architecture plus a `VarMap` of its weights under
/// Hugging Face names.
pub struct CausalLm {
    vars: VarMap,
    /// The weights of an [`CausalLm::inference_copy`], which has no variables.
    frozen: Option<HashMap<String, Tensor>>,
    config: ModelConfig,
    model: Model,
    lora: Option<LoraState>,
}

struct LoraState {
    cfg: LoraConfig,
    /// `(module, A, B)`, sorted by module.
    vars: Vec<(String, Var, Var)>,
    enabled: Arc<AtomicBool>,
}

impl CausalLm {
    /// Builds a model from named weights (e.g. read from safetensors); every weight becomes a
    /// trainable `Var`. Missing weights are an error naming them.
    pub fn from_tensors<C: Clone + Into<ModelConfig>>(cfg: &C, weights: HashMap<String, Tensor>) -> Result<Self> {
        let config: ModelConfig = cfg.clone().into();
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
        let model = build(&config, VarBuilder::from_varmap(&vars, dtype, &device), None)?;
        Ok(Self { vars, frozen: None, config, model, lora: None })
    }

    /// A randomly initialised model, deterministic in `seed`: linear and embedding weights
    /// ~ N(0, 0.02^2) (Hugging Face's `initializer_range`), biases 0 (as Hugging Face
    /// initialises them), norm weights of scale 1 ([`crate::FamilyConfig::unit_norm`]: 1, Gemma 0).
    pub fn random<C: Clone + Into<ModelConfig>>(cfg: &C, seed: u64, device: &Device) -> Result<Self> {
        let config: ModelConfig = cfg.clone().into();
        config.validate("config")?;
        let norm_value = config.family().unit_norm();
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
        for (name, shape) in config.weight_shapes() {
            let t = if name.ends_with("norm.weight") {
                (Tensor::ones(shape.as_slice(), DType::F32, device)? * norm_value)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), DType::F32, device)?
            } else {
                Tensor::from_vec(normal(shape.iter().product()), shape.as_slice(), device)?
            };
            weights.insert(name, t);
        }
        Self::from_tensors(&config, weights)
    }

    /// Loads `model.safetensors` (or a sharded `model.safetensors.index.json` set) and
    /// `config.json` from a Hugging Face model directory.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_dir_as(dir, device, None)
    }

    /// [`Self::from_dir`] with every weight converted to `dtype` at load time (e.g. `BF16` to halve
    /// memory; `None` keeps the stored dtypes). Non-f32 models run the reference (unfused) path.
    pub fn from_dir_as(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| ModelError::Io { path: config_path.display().to_string(), reason: e.to_string() })?;
        let cfg = ModelConfig::from_json(&text, &config_path.display().to_string())?;
        let mut weights = HashMap::new();
        for file in crate::weights::safetensors_files(dir)? {
            let loaded = candle_core::safetensors::load(&file, device)
                .map_err(|e| ModelError::Io { path: file.display().to_string(), reason: e.to_string() })?;
            weights.extend(loaded);
        }
        Self::from_tensors(&cfg, convert(weights, dtype)?)
    }

    /// Loads a llama.cpp GGUF checkpoint (any quantization candle reads, dequantized to f32) for
    /// the architecture `cfg` (e.g. from the model's Hugging Face `config.json`); see [`crate::gguf`].
    /// [`Self::from_gguf_file`] reads the architecture from the file instead.
    pub fn from_gguf<C: Clone + Into<ModelConfig>>(path: &Path, cfg: &C, device: &Device) -> Result<Self> {
        Self::from_gguf_as(path, cfg, device, None)
    }

    /// [`Self::from_gguf`] with every dequantized weight converted to `dtype` (e.g. `BF16`) at
    /// load time, one tensor at a time.
    pub fn from_gguf_as<C: Clone + Into<ModelConfig>>(
        path: &Path,
        cfg: &C,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<Self> {
        let config: ModelConfig = cfg.clone().into();
        let weights = crate::gguf::load_gguf(path, &config, device)?;
        Self::from_tensors(&config, convert(weights, dtype)?)
    }

    /// Loads a llama.cpp GGUF checkpoint on its own: the architecture from the file's metadata
    /// ([`ModelConfig::from_gguf`]), the weights as [`Self::from_gguf`] loads them.
    pub fn from_gguf_file(path: &Path, device: &Device) -> Result<Self> {
        Self::from_gguf_file_as(path, device, None)
    }

    /// [`Self::from_gguf_file`] with every dequantized weight converted to `dtype` (e.g. `BF16`).
    pub fn from_gguf_file_as(path: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let (content, mut file) = crate::gguf::open(path)?;
        let config = crate::gguf::config_from_content(&content, &mut file, &path.display().to_string())?;
        let weights = crate::gguf::load_tensors(&content, &mut file, path, &config, device)?;
        Self::from_tensors(&config, convert(weights, dtype)?)
    }

    /// The architecture.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Every trainable variable with its Hugging Face name, sorted by name. With LoRA attached:
    /// only the adapters, named as in PEFT's `adapter_model.safetensors`
    /// (`base_model.model.{module}.lora_A.weight`).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        if let Some(l) = &self.lora {
            let mut out = Vec::new();
            for (m, a, b) in &l.vars {
                out.push((format!("base_model.model.{m}.lora_A.weight"), a.clone()));
                out.push((format!("base_model.model.{m}.lora_B.weight"), b.clone()));
            }
            return out;
        }
        self.base_vars()
    }

    fn base_vars(&self) -> Vec<(String, Var)> {
        let data = self.vars.data().lock().map(|d| d.clone()).unwrap_or_default();
        let mut out: Vec<(String, Var)> = data.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Attaches LoRA adapters to the projections `cfg.target_modules` names: `A` uniform in
    /// `+-1/sqrt(in)` (PEFT's Kaiming-uniform bound), deterministic in `seed`, and `B = 0`, so the
    /// model computes exactly what it did. The base weights are frozen from now on (the model
    /// reads detached views of them: no copy, no gradient); [`Self::trainable_vars`] lists only
    /// the adapters.
    pub fn with_lora(self, cfg: LoraConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        self.attach_lora(cfg, seed, "adapter_config.json")
    }

    /// [`Self::with_lora`] for a config already checked; `file` names it in errors.
    fn attach_lora(self, cfg: LoraConfig, seed: u64, file: &str) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let base = self.weights();
        let device = base.values().next().map_or(Device::Cpu, |t| t.device().clone());
        let dtype = base.values().next().map_or(DType::F32, |t| t.dtype());
        let mut vars = Vec::new();
        for (name, shape) in self.config.weight_shapes() {
            let Some(module) = name.strip_suffix(".weight").filter(|m| cfg.targets(m)) else { continue };
            let last = module.rsplit('.').next().unwrap_or(module);
            let [out, inp] = shape[..] else { continue };
            if !crate::lora::ADAPTABLE.contains(&last) {
                return Err(ModelError::Config {
                    file: file.into(),
                    field: "target_modules",
                    reason: format!(
                        "matches `{module}`, which cannot carry an adapter here (supported: {:?})",
                        crate::lora::ADAPTABLE
                    ),
                });
            }
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.r * inp).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), &device)?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, cfg.r), dtype, &device)?)?;
            vars.push((module.to_string(), a, b));
        }
        if vars.is_empty() {
            return Err(ModelError::Config {
                file: file.into(),
                field: "target_modules",
                reason: format!("{:?} match no projection of this model", cfg.target_modules),
            });
        }
        vars.sort_by(|x, y| x.0.cmp(&y.0));
        let enabled = Arc::new(AtomicBool::new(true));
        let frozen: HashMap<String, Tensor> = base.into_iter().map(|(n, t)| (n, t.detach())).collect();
        let adapters = Adapters {
            map: vars.iter().map(|(m, a, b)| (m.clone(), (a.as_tensor().clone(), b.as_tensor().clone()))).collect(),
            scale: cfg.scale(),
            enabled: enabled.clone(),
        };
        let model = build(&self.config, VarBuilder::from_tensors(frozen, dtype, &device), Some(&adapters))?;
        model.set_gradient_checkpointing(self.model.gradient_checkpointing())?;
        Ok(Self {
            vars: self.vars,
            frozen: self.frozen,
            config: self.config,
            model,
            lora: Some(LoraState { cfg, vars, enabled }),
        })
    }

    /// Folds the adapters into the base weights, `W + (alpha / r) B A`, and returns a plain model
    /// (all weights trainable again, no adapters): what `save_dir` then writes loads in
    /// transformers without PEFT. Without adapters, returns the model unchanged.
    pub fn merge_lora(self) -> Result<Self> {
        if self.lora.is_none() {
            return Ok(self);
        }
        let merged = Self::from_tensors(&self.config, self.merged_weights()?)?;
        merged.model.set_gradient_checkpointing(self.model.gradient_checkpointing())?;
        Ok(merged)
    }

    /// A frozen copy for inference (evaluation, generation): the adapters, when attached and
    /// enabled, folded into the weights as [`Self::merge_lora`] folds them (the same values bit
    /// for bit), every weight detached, nothing trainable. It computes what this model computes,
    /// within float rounding, without the adapters' extra products and with no autograd graph.
    /// [`Self::weights`] lists its weights, [`Self::trainable_vars`] nothing, and
    /// [`Self::set_weights`] refuses. Folding copies the weights; without active adapters the
    /// copy shares this model's storage (an in-place update of this model shows through).
    pub fn inference_copy(&self) -> Result<Self> {
        let weights = match &self.lora {
            Some(l) if l.enabled.load(Ordering::Relaxed) => self.merged_weights()?,
            _ => self.weights(),
        };
        let weights: HashMap<String, Tensor> = weights.into_iter().map(|(n, t)| (n, t.detach())).collect();
        let (device, dtype) =
            weights.values().next().map_or((Device::Cpu, DType::F32), |t| (t.device().clone(), t.dtype()));
        let model = build(&self.config, VarBuilder::from_tensors(weights.clone(), dtype, &device), None)?;
        Ok(Self { vars: VarMap::new(), frozen: Some(weights), config: self.config.clone(), model, lora: None })
    }

    /// Copies of the base weights with every adapter folded in, `W + (alpha / r) B A`.
    fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut weights: HashMap<String, Tensor> =
            self.weights().into_iter().map(|(n, t)| Ok((n, t.copy()?))).collect::<Result<_>>()?;
        let Some(lora) = &self.lora else { return Ok(weights) };
        for (module, a, b) in &lora.vars {
            let name = format!("{module}.weight");
            let w = weights
                .get(&name)
                .ok_or_else(|| ModelError::Input { input: "adapters", reason: format!("no base weight `{name}`") })?;
            let delta = (b.as_tensor().matmul(a.as_tensor())? * lora.cfg.scale())?;
            let merged = (w + delta.to_dtype(w.dtype())?)?;
            weights.insert(name, merged);
        }
        Ok(weights)
    }

    /// Switches LoRA adapters on or off (off: the base model, e.g. DPO's reference, sharing the
    /// weights). No effect without adapters.
    pub fn set_adapters_enabled(&self, on: bool) {
        if let Some(l) = &self.lora {
            l.enabled.store(on, Ordering::Relaxed);
        }
    }

    /// The attached LoRA config, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.cfg)
    }

    /// Writes `adapter_config.json` (every field PEFT saves, see [`LoraConfig::to_peft_json`])
    /// and `adapter_model.safetensors` (PEFT's tensor names) into `dir`.
    pub fn save_adapters(&self, dir: &Path) -> Result<()> {
        let lora = self.lora.as_ref().ok_or_else(|| ModelError::Input {
            input: "adapters",
            reason: "no LoRA adapters attached (call with_lora first)".into(),
        })?;
        let io = |e: std::io::Error| ModelError::Io { path: dir.display().to_string(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(io)?;
        let tensors: HashMap<String, Tensor> =
            self.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let file = dir.join("adapter_model.safetensors");
        candle_core::safetensors::save(&tensors, &file)
            .map_err(|e| ModelError::Io { path: file.display().to_string(), reason: e.to_string() })?;
        let text = serde_json::to_string_pretty(&lora.cfg.to_peft_json())
            .map_err(|e| ModelError::Io { path: dir.display().to_string(), reason: e.to_string() })?;
        std::fs::write(dir.join("adapter_config.json"), text).map_err(io)
    }

    /// Attaches the adapters saved in `dir` (PEFT's layout, by PEFT or [`Self::save_adapters`])
    /// to this (base) model. The config is read by [`LoraConfig::from_peft_json`] (`use_rslora`
    /// honoured, `lora_dropout` ignored, unsupported settings rejected by name); every tensor
    /// of `adapter_model.safetensors` must be one of the adapters the config attaches.
    pub fn load_adapters(self, dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Io { path: path.display().to_string(), reason: e.to_string() })?;
        let cfg = LoraConfig::from_peft_json(&text, &path.display().to_string())?;
        let lm = self.attach_lora(cfg, 0, &path.display().to_string())?;
        let file = dir.join("adapter_model.safetensors");
        let device = lm.trainable_vars().first().map_or(Device::Cpu, |(_, v)| v.device().clone());
        let saved = candle_core::safetensors::load(&file, &device)
            .map_err(|e| ModelError::Io { path: file.display().to_string(), reason: e.to_string() })?;
        let vars = lm.trainable_vars();
        for (name, var) in &vars {
            let t = saved.get(name).ok_or_else(|| ModelError::Io {
                path: file.display().to_string(),
                reason: format!("missing `{name}`"),
            })?;
            if t.dims() != var.dims() {
                return Err(ModelError::Io {
                    path: file.display().to_string(),
                    reason: format!("`{name}` has shape {:?}; expected {:?}", t.dims(), var.dims()),
                });
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        let mut unused: Vec<&String> = saved.keys().filter(|k| !vars.iter().any(|(n, _)| n == *k)).collect();
        unused.sort();
        if let Some(first) = unused.first() {
            return Err(ModelError::Io {
                path: file.display().to_string(),
                reason: format!(
                    "{} tensors the config attaches no adapter for, first `{first}` (expected only the \
                     lora_A / lora_B weights of target_modules)",
                    unused.len()
                ),
            });
        }
        Ok(lm)
    }

    /// Current base weights by name (shared storage; copy before mutating).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        if let Some(frozen) = &self.frozen {
            return frozen.clone();
        }
        self.base_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
    }

    /// Overwrites every weight from `weights` (names and shapes must match).
    pub fn set_weights(&self, weights: &HashMap<String, Tensor>) -> Result<()> {
        if self.frozen.is_some() {
            return Err(ModelError::Input {
                input: "weights",
                reason: "an inference copy's weights are frozen".into(),
            });
        }
        for (name, var) in self.base_vars() {
            let t = weights
                .get(&name)
                .ok_or_else(|| ModelError::Input { input: "weights", reason: format!("missing `{name}`") })?;
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Writes `model.safetensors` and `config.json` ([`ModelConfig::to_hf_json`] with
    /// `torch_dtype`, the weights' dtype) into `dir`: the Hugging Face layout, which
    /// transformers loads once tokenizer files are beside it.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let io = |e: std::io::Error| ModelError::Io { path: dir.display().to_string(), reason: e.to_string() };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut weights = self.weights();
        if self.config.family().tied_embeddings() {
            weights.remove("lm_head.weight");
        }
        let file = dir.join("model.safetensors");
        candle_core::safetensors::save(&weights, &file)
            .map_err(|e| ModelError::Io { path: file.display().to_string(), reason: e.to_string() })?;
        let mut config = self.config.to_hf_json();
        let dtype = weights.values().next().map_or(DType::F32, |t| t.dtype());
        config["torch_dtype"] = torch_dtype(dtype).into();
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| ModelError::Io { path: dir.display().to_string(), reason: e.to_string() })?;
        std::fs::write(dir.join("config.json"), text).map_err(io)
    }
}

/// PyTorch's name of `dtype`, as `config.json`'s `torch_dtype` holds it.
fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Every weight converted to `dtype` (unchanged for `None`).
fn convert(weights: HashMap<String, Tensor>, dtype: Option<DType>) -> Result<HashMap<String, Tensor>> {
    let Some(dtype) = dtype else { return Ok(weights) };
    weights.into_iter().map(|(n, t)| Ok((n, t.to_dtype(dtype)?))).collect()
}
