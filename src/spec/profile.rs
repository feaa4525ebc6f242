//! Which training stack an estimate is for: vramcal's own candle step (`candle`) or PyTorch +
//! transformers with SDPA or eager attention (`torch-sdpa`, `torch-eager`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which implementation's memory to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// vramcal's candle model.
    Candle,
    /// PyTorch + transformers with SDPA/flash attention.
    TorchSdpa,
    /// PyTorch + transformers with eager attention.
    TorchEager,
}

impl Profile {
    /// All three, the default (`torch-sdpa`) first.
    pub const ALL: [Profile; 3] = [Profile::TorchSdpa, Profile::TorchEager, Profile::Candle];

    /// The training stack whose peak this profile predicts, in words (first line of
    /// `vramcal estimate`).
    pub fn stack(self) -> &'static str {
        match self {
            Profile::Candle => "vramcal's own candle training step (what `vramcal measure` runs)",
            Profile::TorchSdpa => "PyTorch + transformers, attn_implementation=\"sdpa\"",
            Profile::TorchEager => "PyTorch + transformers, attn_implementation=\"eager\"",
        }
    }

    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Candle => "candle",
            Profile::TorchSdpa => "torch-sdpa",
            Profile::TorchEager => "torch-eager",
        }
    }
}

impl FromStr for Profile {
    type Err = Error;

    /// Parses `candle`, `torch-sdpa` or `torch-eager`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "candle" => Ok(Profile::Candle),
            "torch-sdpa" => Ok(Profile::TorchSdpa),
            "torch-eager" => Ok(Profile::TorchEager),
            _ => Err(Error::invalid(
                "--profile",
                s,
                "expected candle, torch-sdpa or torch-eager",
            )),
        }
    }
}

impl fmt::Display for Profile {
    /// The name [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
