//! The size `vramcal max` searches: the micro-batch at a fixed sequence length, or the
//! sequence length at a fixed micro-batch.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Which size a search varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// The micro-batch, at a fixed `--seq`.
    Batch,
    /// The sequence length, at a fixed `--batch`.
    Seq,
}

impl Axis {
    /// Name in messages: `micro-batch` or `seq`.
    pub fn noun(self) -> &'static str {
        match self {
            Axis::Batch => "micro-batch",
            Axis::Seq => "seq",
        }
    }
}

impl FromStr for Axis {
    type Err = Error;

    /// Parses `batch` or `seq`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "batch" => Ok(Axis::Batch),
            "seq" => Ok(Axis::Seq),
            _ => Err(Error::invalid("--axis", s, "expected batch or seq")),
        }
    }
}

impl fmt::Display for Axis {
    /// `batch` or `seq` ([`FromStr`] reads it back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Batch => "batch",
            Axis::Seq => "seq",
        })
    }
}
