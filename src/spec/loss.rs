//! Which loss implementation computes the LM head's cross-entropy in the torch profiles
//! (`../shared/cases/README.md`, column `loss`).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The loss implementation of a PyTorch fine-tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Loss {
    /// transformers' own (`ForCausalLMLoss`): the whole `(N, V)` logits, upcast to fp32, a
    /// saved log-softmax and its gradients. The reference rows' empty `loss`.
    #[default]
    Transformers,
    /// Liger-Kernel's fused linear cross-entropy (`LigerFusedLinearCrossEntropyFunction`,
    /// liger-kernel 0.8.5 `ops/fused_linear_cross_entropy.py`): logits formed one chunk of
    /// tokens at a time and never whole; the input's (and a trained head's) gradient computed
    /// in forward and kept for backward. `use_liger_kernel=True` also swaps RMSNorm, RoPE and
    /// SwiGLU, which vramcal does not model: only the loss changes.
    FusedLinearCe,
}

impl Loss {
    /// CLI and reference-row label: `transformers` (empty in reference rows) or
    /// `fused-linear-ce`.
    pub fn label(self) -> &'static str {
        match self {
            Loss::Transformers => "transformers",
            Loss::FusedLinearCe => "fused-linear-ce",
        }
    }
}

impl FromStr for Loss {
    type Err = Error;

    /// Parses `transformers` or `fused-linear-ce`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "transformers" => Ok(Loss::Transformers),
            "fused-linear-ce" => Ok(Loss::FusedLinearCe),
            _ => Err(Error::invalid(
                "--loss",
                s,
                "expected transformers or fused-linear-ce",
            )),
        }
    }
}

impl fmt::Display for Loss {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
