//! What the `save` phase writes after step 2: nothing, the trained tensors (PEFT adapter files
//! for LoRA, `model.safetensors` for full fine-tuning), or the merged model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the `save` phase writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SaveMode {
    /// Nothing (no `save` phase).
    #[default]
    None,
    /// The trained tensors: PEFT adapter files for LoRA, `model.safetensors` for full.
    Adapter,
    /// Adapters merged into the base, saved as `model.safetensors`.
    Merged,
}

impl SaveMode {
    /// CSV label.
    pub fn label(self) -> &'static str {
        match self {
            SaveMode::None => "none",
            SaveMode::Adapter => "adapter",
            SaveMode::Merged => "merged",
        }
    }
}

impl FromStr for SaveMode {
    type Err = Error;

    /// Parses `none`, `adapter` or `merged`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(SaveMode::None),
            "adapter" | "trained" => Ok(SaveMode::Adapter),
            "merged" => Ok(SaveMode::Merged),
            _ => Err(Error::invalid(
                "--save",
                s,
                "expected none, adapter or merged",
            )),
        }
    }
}

impl fmt::Display for SaveMode {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
