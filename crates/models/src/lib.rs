//! Trainable causal language models for candle that load Hugging Face checkpoints.
//!
//! candle-transformers' models are built for inference (last-position logits, a KV cache in
//! `&mut self`, fused ops without a backward pass). The models here run whole right-padded
//! sequences, record gradients through every weight, and compute per-token log-probs of given
//! labels in chunks so `[batch, seq, vocab]` logits never exist at once.
//!
//! Supported: the Llama family ([`LlamaConfig`]: Llama 2/3/3.1/3.2, SmolLM2; Qwen2 / Qwen2.5 and
//! Qwen3 dense as Llama variants with attention biases / per-head q/k norm), Gemma 1, 2 and 3
//! text ([`GemmaConfig`]) and Mistral ([`MistralConfig`]: Llama's layers with a sliding window),
//! behind one [`CausalLm`] / [`Model`] with the same contract; safetensors loading and saving
//! (single file and sharded); LoRA adapters in PEFT's layout ([`lora`], [`CausalLm::with_lora`]);
//! GGUF loading with dequantization, the architecture from a config or from the file's metadata
//! ([`gguf`], [`CausalLm::from_gguf_file`]); greedy and sampled generation with a key/value cache
//! ([`generation`], [`KvCache`]). RMSNorm and the log-softmax + gather of the log-prob path are
//! fused CPU kernels with a backward ([`fused`]).
//!
//! A family is a configuration implementing [`FamilyConfig`] and layers implementing [`Family`]
//! (or, for Llama-like layers, a configuration implementing [`llama::LlamaLike`]), listed once in
//! the registry that generates [`ModelConfig`] and [`Model`]; [`Decoder`] adds the rest of the
//! contract.
//!
//! The contract the trainer relies on:
//! - [`Model::forward_hidden`]`(input_ids [B,T] u32, attention_mask Option<[B,T] u8/u32>)` ->
//!   `[B,T,H]`; mask 1 = real token, right padding; real tokens never attend to padding.
//! - [`Model::token_logps`]`(input_ids, attention_mask, chunk)` -> `[B,T]` f32 with
//!   `out[b,t] = log p(ids[b,t] | ids[b,<t])` for `t >= 1` and `out[b,0] = 0`, computed over chunks
//!   of positions so `[B,T,V]` logits never exist; differentiable w.r.t. every weight.
//! - [`CausalLm::trainable_vars`] -> `(Hugging Face name, Var)` pairs, sorted by name;
//!   [`CausalLm::from_dir`] / [`CausalLm::save_dir`] read and write Hugging Face layouts.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use slime_models::{CausalLm, LlamaConfig};
//!
//! # fn main() -> slime_models::Result<()> {
//! let cfg = LlamaConfig::tiny(64, 32, 64, 2, 4, 2);
//! let lm = CausalLm::random(&cfg, 0, &Device::Cpu)?;
//! let ids = Tensor::new(&[[1u32, 5, 9, 3], [2, 7, 0, 0]], &Device::Cpu)?;
//! let mask = Tensor::new(&[[1u8, 1, 1, 1], [1, 1, 0, 0]], &Device::Cpu)?;
//! let logps = lm.model().token_logps(&ids, Some(&mask), 2)?; // [2, 4], column 0 is 0
//! let grads = logps.sum_all()?.backward()?;
//! assert!(lm.trainable_vars().iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
//! # Ok(())
//! # }
//! ```

mod causal_lm;
pub mod config;
mod decoder;
mod error;
pub mod family;
pub mod fused;
pub mod gemma;
pub mod generation;
pub mod gguf;
mod host;
pub mod llama;
pub mod logps;
pub mod lora;
pub mod mistral;
pub mod ops;
pub mod pairs;
mod registry;
pub mod step;
pub mod weights;

pub use causal_lm::{CausalLm, Model, ModelConfig};
pub use config::{LlamaConfig, RopeScaling};
pub use decoder::{CausalDecoder, Decoder};
pub use error::{ModelError, Result};
pub use family::{Family, FamilyConfig};
pub use gemma::{Gemma, GemmaConfig};
pub use generation::KvCache;
pub use llama::Llama;
pub use lora::{LoraConfig, TargetModules};
pub use mistral::{Mistral, MistralConfig};
pub use pairs::{CompletionLogps, PairBatch};
pub use registry::MODEL_TYPES;

/// The candle versions whose tensors, devices, variables and errors this crate's API uses
/// (`Llama::new` takes a `candle_nn::VarBuilder`).
pub use candle_core;
pub use candle_nn;
