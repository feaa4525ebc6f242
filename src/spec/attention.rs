//! What attention keeps for backward: PyTorch's SDPA (FlashAttention / memory-efficient
//! kernels recompute the probabilities) or transformers' eager attention (keeps them).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What attention keeps for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Attention {
    /// `q`, `k`, `v` and the output; probabilities recomputed in backward (PyTorch's SDPA /
    /// FlashAttention).
    #[default]
    Sdpa,
    /// Also the `(batch, heads, seq, seq)` probabilities (transformers' eager attention).
    Eager,
}

impl Attention {
    /// CSV and CLI label: `sdpa` or `eager`.
    pub fn label(self) -> &'static str {
        match self {
            Attention::Sdpa => "sdpa",
            Attention::Eager => "eager",
        }
    }
}

impl FromStr for Attention {
    type Err = Error;

    /// Parses `sdpa` or `eager`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else, the empty string included.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sdpa" => Ok(Attention::Sdpa),
            "eager" => Ok(Attention::Eager),
            _ => Err(Error::invalid("--attention", s, "expected sdpa or eager")),
        }
    }
}

impl fmt::Display for Attention {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
