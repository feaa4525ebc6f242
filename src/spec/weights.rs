//! The `--weights` argument: `random`, `hf:<model-id>`, a `.gguf` or `.safetensors` file, or
//! a folder of safetensors in Hugging Face layout.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The `--weights` argument, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSpec {
    /// Random initialization (normal, std 0.02 as transformers' `initializer_range`; norms 1).
    Random {
        /// RNG seed.
        seed: u64,
    },
    /// A folder with `model.safetensors` or `model.safetensors.index.json` (HF layout).
    Safetensors(PathBuf),
    /// A single `.safetensors` file.
    SafetensorsFile(PathBuf),
    /// A GGUF file (llama architecture), dequantized.
    Gguf(PathBuf),
    /// A Hugging Face model id: its files from the local cache, downloaded where missing
    /// ([`crate::hub`]).
    HfCache(String),
}

impl WeightsSpec {
    /// Parses `random`, `hf:<org/name>`, a `.gguf` file, a `.safetensors` file or a folder.
    ///
    /// # Errors
    /// [`Error::Weights`] if a path does not exist or is of an unknown kind.
    pub fn parse(s: &str, seed: u64) -> Result<Self> {
        if s == "random" {
            return Ok(WeightsSpec::Random { seed });
        }
        if let Some(id) = s.strip_prefix("hf:") {
            return Ok(WeightsSpec::HfCache(id.to_string()));
        }
        let p = PathBuf::from(s);
        if !p.exists() {
            return Err(Error::Weights {
                path: p,
                reason: "no such file or folder (expected `random`, `hf:<model-id>`, a .gguf or .safetensors file, or a folder of safetensors)".into(),
            });
        }
        if p.is_dir() {
            return Ok(WeightsSpec::Safetensors(p));
        }
        match p.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Ok(WeightsSpec::Gguf(p)),
            Some("safetensors") => Ok(WeightsSpec::SafetensorsFile(p)),
            _ => Err(Error::Weights {
                path: p,
                reason: "unknown weights file type (expected .gguf or .safetensors)".into(),
            }),
        }
    }

    /// Short description for tables and CSV rows.
    pub fn describe(&self) -> String {
        match self {
            WeightsSpec::Random { seed } => format!("random(seed={seed})"),
            WeightsSpec::Safetensors(p) | WeightsSpec::SafetensorsFile(p) => {
                format!("safetensors:{}", file_label(p))
            }
            WeightsSpec::Gguf(p) => format!("gguf:{}", file_label(p)),
            WeightsSpec::HfCache(id) => format!("hf:{id}"),
        }
    }
}

fn file_label(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
