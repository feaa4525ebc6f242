//! Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
//! which decoder-layer inputs are kept, the rest recomputed in backward (transformers'
//! `gradient_checkpointing_enable()` checkpoints every layer).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Activation checkpointing (recompute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Checkpointing {
    /// Keep every activation for backward.
    #[default]
    None,
    /// Keep only the input of every `K`-th decoder layer; backward recomputes segments of `K`
    /// layers from them (`Every(1)` = every layer, transformers' `gradient_checkpointing`).
    Every(usize),
}

impl Checkpointing {
    /// Checks `K` against the number of layers.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] if `K` exceeds the layer count.
    pub fn validate(self, layers: usize) -> Result<()> {
        if let Checkpointing::Every(k) = self {
            if k == 0 || k > layers {
                return Err(Error::invalid(
                    "--checkpointing",
                    format!("every:{k}"),
                    format!("the interval must be between 1 and the layer count ({layers})"),
                ));
            }
        }
        Ok(())
    }

    /// CSV label: `none`, `layers` or `every:K`.
    pub fn label(self) -> String {
        match self {
            Checkpointing::None => "none".into(),
            Checkpointing::Every(1) => "layers".into(),
            Checkpointing::Every(k) => format!("every:{k}"),
        }
    }
}

impl FromStr for Checkpointing {
    type Err = Error;

    /// Parses `none`, `layers` or `every:K`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else or `K = 0`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "off" => Ok(Checkpointing::None),
            "layers" | "on" => Ok(Checkpointing::Every(1)),
            _ => {
                let k = s
                    .strip_prefix("every:")
                    .and_then(|k| k.parse::<usize>().ok())
                    .ok_or_else(|| {
                        Error::invalid("--checkpointing", s, "expected none, layers or every:K")
                    })?;
                if k == 0 {
                    return Err(Error::invalid(
                        "--checkpointing",
                        s,
                        "the interval K must be at least 1",
                    ));
                }
                Ok(Checkpointing::Every(k))
            }
        }
    }
}

impl fmt::Display for Checkpointing {
    /// The label [`FromStr`] reads back: `none`, `layers` or `every:K`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}
