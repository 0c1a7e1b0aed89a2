//! Trainable causal language models for candle that load Hugging Face checkpoints.
//!
//! candle-transformers' models are built for inference (last-position logits, a KV cache in
//! `&mut self`, fused ops without a backward pass). The models here run whole right-padded
//! sequences, record gradients through every weight, and compute per-token log-probs of given
//! labels in chunks so `[batch, seq, vocab]` logits never exist at once.
//!
//! Today: the Llama family ([`LlamaConfig`], Llama 2/3/3.1/3.2 and SmolLM2), safetensors
//! loading and saving (single file and sharded), greedy generation.
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
mod error;
pub mod llama;
pub mod logps;
pub mod ops;
pub mod weights;

pub use causal_lm::{CausalLm, weight_shapes};
pub use config::{LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use llama::Llama;
