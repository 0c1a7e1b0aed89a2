//! The list of model families. Each line names a family's variant, its configuration, its layers
//! ([`crate::family::Family`]) and the Hugging Face `model_type`s it reads; [`ModelConfig`],
//! [`Model`], the `From` conversions, the `model_type` dispatch of [`ModelConfig::from_json`] and
//! the construction of a model from its configuration are generated from it. A family whose
//! layers do not take its configuration does not compile.

use candle_nn::VarBuilder;

use crate::Result;
use crate::decoder::{CausalDecoder, Decoder};
use crate::family::FamilyConfig;
use crate::lora::Adapters;
use crate::{GemmaConfig, LlamaConfig, MistralConfig, gemma, llama};

macro_rules! families {
    ($($(#[$doc:meta])* $variant:ident($config:ty, $layers:ty) = [$($model_type:literal),+ $(,)?]),+ $(,)?) => {
        /// The configuration of any supported family (serialised as the family's own `config.json`).
        #[derive(Debug, Clone, PartialEq, serde::Serialize)]
        #[serde(untagged)]
        pub enum ModelConfig {
            $($(#[$doc])* $variant($config),)+
        }

        /// One model of any supported family; every method has the same contract across families
        /// ([`crate::CausalDecoder`]).
        pub enum Model {
            $($(#[$doc])* $variant(Decoder<$layers>),)+
        }

        $(impl From<$config> for ModelConfig {
            fn from(c: $config) -> Self {
                Self::$variant(c)
            }
        })+

        /// Every Hugging Face `model_type` a family reads, in registry order.
        pub const MODEL_TYPES: &[&str] = &[$($($model_type),+),+];

        impl ModelConfig {
            /// The config of the family that reads `model_type`, parsed from `text`; `None` when
            /// no family reads it.
            pub(crate) fn parse_family(model_type: &str, text: &str, file: &str) -> Option<Result<Self>> {
                $(if [$($model_type),+].contains(&model_type) {
                    return Some(<$config as FamilyConfig>::from_json(text, file).map(Self::$variant));
                })+
                None
            }

            /// The family's configuration behind the common interface.
            pub fn family(&self) -> &dyn FamilyConfig {
                match self {
                    $(Self::$variant(c) => c,)+
                }
            }
        }

        impl Model {
            /// The model behind the common interface.
            pub fn decoder(&self) -> &dyn CausalDecoder {
                match self {
                    $(Self::$variant(m) => m,)+
                }
            }
        }

        /// The model `config` describes, its weights from `vb`, with `lora` adapters.
        pub(crate) fn build(config: &ModelConfig, vb: VarBuilder, lora: Option<&Adapters>) -> Result<Model> {
            Ok(match config {
                $(ModelConfig::$variant(c) => Model::$variant(Decoder::<$layers>::new_with_lora(c, vb, lora)?),)+
            })
        }
    };
}

families! {
    /// Llama 2/3/3.1/3.2, SmolLM2; Qwen2 / Qwen2.5 and Qwen3 dense.
    Llama(LlamaConfig, llama::LlamaStack<LlamaConfig>) = ["llama", "qwen2", "qwen3"],
    /// Gemma 1, 2 and 3 (text).
    Gemma(GemmaConfig, gemma::GemmaLayers) = ["gemma", "gemma2", "gemma3_text"],
    /// Mistral: Llama with sliding-window attention on every layer.
    Mistral(MistralConfig, llama::LlamaStack<MistralConfig>) = ["mistral"],
}
