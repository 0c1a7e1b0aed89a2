//! A model and its tokenizer from disk, for the `logps` and `generate` commands: a Hugging Face
//! model directory (`config.json`, `model.safetensors` or a sharded set, `tokenizer.json`,
//! optionally `tokenizer_config.json`), or a llama.cpp `.gguf` file with a tokenizer directory;
//! a GGUF file's architecture comes from a Hugging Face `config.json` when one is given or lies
//! beside the file, otherwise from the file's own metadata ([`CausalLm::from_gguf_file_as`]).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use candle_core::Device;
use slime_data::{BuiltinTemplate, ChatTemplate, TextTokenizer};
use slime_models::{CausalLm, ModelConfig};

use crate::{Result, TrainError};

/// Where a model and its tokenizer are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// A model directory or a `.gguf` file.
    pub model: PathBuf,
    /// For a `.gguf` file: the `config.json` (or a directory holding it); default: the
    /// `config.json` beside the file.
    pub config: Option<PathBuf>,
    /// The directory with `tokenizer.json` (and `tokenizer_config.json`); default: the model
    /// directory, or the directory of the `.gguf` file.
    pub tokenizer: Option<PathBuf>,
}

/// A loaded model and tokenizer.
pub struct LoadedModel {
    /// The model.
    pub lm: CausalLm,
    /// The tokenizer (special tokens and chat template from `tokenizer_config.json`).
    pub tokenizer: TextTokenizer,
    /// The directory the tokenizer was read from.
    pub tokenizer_dir: PathBuf,
    /// Whether `tokenizer_config.json` has a `chat_template`.
    pub has_chat_template: bool,
}

fn not_found(path: &Path, detail: &str) -> TrainError {
    TrainError::Io { path: path.display().to_string(), source: std::io::Error::new(ErrorKind::NotFound, detail) }
}

fn invalid(path: &Path, detail: String) -> TrainError {
    TrainError::Io { path: path.display().to_string(), source: std::io::Error::new(ErrorKind::InvalidInput, detail) }
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The vocabulary size of a model configuration.
pub fn vocab_size(config: &ModelConfig) -> usize {
    config.vocab_size()
}

/// The longest sequence a model configuration allows.
pub fn max_positions(config: &ModelConfig) -> usize {
    config.max_position_embeddings()
}

/// `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature).
pub fn parse_device(text: &str) -> Result<Device> {
    let ordinal = match text {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(TrainError::Config(format!("device `{text}`: expected cpu, cuda or cuda:N"))),
        },
    };
    // Without the feature candle refuses every CUDA device; with it, the driver's error stands alone.
    let hint = if cfg!(feature = "cuda") { "" } else { " (CUDA needs a build with --features cuda)" };
    Device::new_cuda(ordinal).map_err(|e| TrainError::Config(format!("device `{text}`: {e}{hint}")))
}

impl ModelSource {
    /// A model directory or `.gguf` file with the default config and tokenizer locations.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self { model: model.into(), config: None, tokenizer: None }
    }

    /// Loads the model onto `device` and the tokenizer. Errors name the file and what was
    /// expected (a missing directory, no `config.json`, no weights, no `tokenizer.json`, GGUF
    /// metadata that does not describe a supported architecture).
    pub fn load(&self, device: &Device) -> Result<LoadedModel> {
        let lm = self.load_model(device)?;
        let tokenizer_dir = self.tokenizer.clone().unwrap_or_else(|| tokenizer_dir(&self.model));
        if !tokenizer_dir.join("tokenizer.json").is_file() {
            return Err(not_found(
                &tokenizer_dir,
                "no tokenizer.json; pass --tokenizer with a directory holding tokenizer.json \
                 (and tokenizer_config.json)",
            ));
        }
        let tokenizer = TextTokenizer::from_dir(&tokenizer_dir)?;
        let has_chat_template = has_chat_template(&tokenizer_dir)?;
        Ok(LoadedModel { lm, tokenizer, tokenizer_dir, has_chat_template })
    }

    /// Loads only the model (see [`ModelSource::load`]).
    pub fn load_model(&self, device: &Device) -> Result<CausalLm> {
        self.load_model_as(device, None)
    }

    /// [`ModelSource::load_model`] with every weight converted to `dtype` (`None`: as stored).
    pub fn load_model_as(&self, device: &Device, dtype: Option<candle_core::DType>) -> Result<CausalLm> {
        let path = &self.model;
        if !path.exists() {
            return Err(not_found(
                path,
                "no such file or directory; expected a model directory (config.json, model.safetensors, \
                 tokenizer.json) or a .gguf file",
            ));
        }
        if path.is_dir() {
            if self.config.is_some() {
                return Err(invalid(
                    path,
                    "--config is for .gguf models; a model directory has its own config.json".into(),
                ));
            }
            if !path.join("config.json").is_file() {
                return Err(not_found(
                    path,
                    "no config.json; expected a Hugging Face model directory (config.json, model.safetensors \
                     or model.safetensors.index.json, tokenizer.json)",
                ));
            }
            Ok(CausalLm::from_dir_as(path, device, dtype)?)
        } else if is_gguf(path) {
            let dir = tokenizer_dir(path);
            let config = match &self.config {
                Some(c) if c.is_dir() => c.join("config.json"),
                Some(c) => c.clone(),
                None if dir.join("config.json").is_file() => dir.join("config.json"),
                // No Hugging Face config: the architecture from the file's metadata.
                None => return Ok(CausalLm::from_gguf_file_as(path, device, dtype)?),
            };
            let text = std::fs::read_to_string(&config)
                .map_err(|source| TrainError::Io { path: config.display().to_string(), source })?;
            let cfg = ModelConfig::from_json(&text, &config.display().to_string())?;
            Ok(CausalLm::from_gguf_as(path, &cfg, device, dtype)?)
        } else {
            Err(invalid(path, "expected a model directory or a .gguf file".into()))
        }
    }
}

/// Where a model's tokenizer is by default: the model directory itself, or the directory of a
/// `.gguf` file.
pub fn tokenizer_dir(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.to_path_buf()
    } else {
        model.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

/// Whether the `tokenizer_config.json` in `dir` (if any) has a `chat_template`.
pub fn has_chat_template(dir: &Path) -> Result<bool> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(false);
    }
    let text =
        std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(&path, format!("not valid JSON: {e}")))?;
    Ok(value.get("chat_template").is_some_and(|t| !t.is_null()))
}

impl LoadedModel {
    /// The chat template: the tokenizer's, else `fallback`; `None` when there is neither.
    pub fn template(&self, fallback: Option<BuiltinTemplate>) -> Result<Option<ChatTemplate>> {
        if self.has_chat_template || fallback.is_some() {
            Ok(Some(self.tokenizer.chat_template(fallback)?))
        } else {
            Ok(None)
        }
    }

    /// The model's vocabulary size.
    pub fn vocab_size(&self) -> usize {
        vocab_size(self.lm.config())
    }

    /// Errors unless every id in `ids` is inside the model's vocabulary; `what` names the input.
    pub fn check_ids(&self, ids: &[u32], what: &dyn Fn() -> String) -> Result<()> {
        check_ids(ids, self.vocab_size(), &self.tokenizer_dir, what)
    }
}

/// Errors unless every id in `ids` is below `vocab`; `what` names the input and `tokenizer_dir`
/// the tokenizer that produced the ids.
pub fn check_ids(ids: &[u32], vocab: usize, tokenizer_dir: &Path, what: &dyn Fn() -> String) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(TrainError::Config(format!(
            "{}: token id {id} is outside the model's vocabulary of {vocab}; the tokenizer in {} does not \
             match the model",
            what(),
            tokenizer_dir.display()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: TrainError) -> String {
        e.to_string()
    }

    #[test]
    fn devices_parse_and_cuda_needs_the_feature() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        let bad = parse_device("gpu").err().map(message).unwrap_or_default();
        assert!(bad.contains("expected cpu, cuda or cuda:N"), "{bad}");
        if !candle_core::utils::cuda_is_available() {
            let no_cuda = parse_device("cuda:0").err().map(message).unwrap_or_default();
            assert!(no_cuda.contains("cuda:0"), "{no_cuda}");
        }
    }

    #[test]
    fn unreadable_gguf_and_missing_paths_are_named() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let gguf = dir.path().join("m.Q4_0.GGUF");
        std::fs::write(&gguf, b"")?;
        assert!(is_gguf(&gguf));
        // No config.json: the architecture is read from the file's metadata, and this file has none.
        let e = ModelSource::new(&gguf).load(&Device::Cpu).err().map(message).unwrap_or_default();
        assert!(e.contains("m.Q4_0.GGUF") && e.contains("not a readable GGUF file"), "{e}");

        let missing = dir.path().join("absent");
        let e = ModelSource::new(&missing).load(&Device::Cpu).err().map(message).unwrap_or_default();
        assert!(e.contains("absent") && e.contains("no such file or directory"), "{e}");

        let e = ModelSource::new(dir.path()).load(&Device::Cpu).err().map(message).unwrap_or_default();
        assert!(e.contains("no config.json"), "{e}");

        let other = dir.path().join("weights.bin");
        std::fs::write(&other, b"")?;
        let e = ModelSource::new(&other).load(&Device::Cpu).err().map(message).unwrap_or_default();
        assert!(e.contains("expected a model directory or a .gguf file"), "{e}");

        let with_config = ModelSource { config: Some(dir.path().join("config.json")), ..ModelSource::new(dir.path()) };
        let e = with_config.load(&Device::Cpu).err().map(message).unwrap_or_default();
        assert!(e.contains("--config is for .gguf models"), "{e}");
        Ok(())
    }
}
