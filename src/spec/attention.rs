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
    /// transformers' `flash_attention_2` (the flash-attn package): as `sdpa`, and never a
    /// materialised mask or repeated K/V (sliding windows and GQA inside the kernel). The torch
    /// profiles tell it apart; vramcal's own step has one fused attention and refuses it.
    FlashAttention2,
}

impl Attention {
    /// CSV and CLI label: `sdpa` or `eager`.
    pub fn label(self) -> &'static str {
        match self {
            Attention::Sdpa => "sdpa",
            Attention::Eager => "eager",
            Attention::FlashAttention2 => "flash-attention-2",
        }
    }
}

impl FromStr for Attention {
    type Err = Error;

    /// Parses `sdpa`, `eager` or `flash-attention-2`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else, the empty string included.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sdpa" => Ok(Attention::Sdpa),
            "eager" => Ok(Attention::Eager),
            "flash-attention-2" => Ok(Attention::FlashAttention2),
            _ => Err(Error::invalid(
                "--attention",
                s,
                "expected sdpa, eager or flash-attention-2",
            )),
        }
    }
}

impl fmt::Display for Attention {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
