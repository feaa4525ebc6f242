//! Data-parallel sharding of training state (ZeRO stages 1–3; FSDP's FULL_SHARD is ZeRO-3).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// How training state is sharded across data-parallel GPUs (Rajbhandari et al. 2020, "ZeRO:
/// Memory Optimizations Toward Training Trillion Parameter Models", §5; PyTorch FSDP's
/// FULL_SHARD is ZeRO-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shard {
    /// Optimizer states sharded.
    Zero1,
    /// Optimizer states and gradients sharded.
    Zero2,
    /// Optimizer states, gradients and parameters sharded.
    Zero3,
}

impl Shard {
    /// Name as on the command line: `zero1`, `zero2` or `zero3` (`fsdp` reads as `zero3`).
    pub fn label(self) -> &'static str {
        match self {
            Shard::Zero1 => "zero1",
            Shard::Zero2 => "zero2",
            Shard::Zero3 => "zero3",
        }
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// Parses `zero1`, `zero2`, `zero3` or `fsdp` (= `zero3`).
    ///
    /// # Errors
    /// [`Error::InvalidValue`].
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zero1" => Ok(Shard::Zero1),
            "zero2" => Ok(Shard::Zero2),
            "zero3" | "fsdp" => Ok(Shard::Zero3),
            _ => Err(Error::invalid(
                "--shard",
                s,
                "expected zero1, zero2, zero3 or fsdp",
            )),
        }
    }
}

impl fmt::Display for Shard {
    /// The label [`FromStr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
