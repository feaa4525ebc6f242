//! The `--device` value: the host CPU or a CUDA device by ordinal.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A checked `--device` value, not yet opened. Parents (measure, sweep, max, plan) only
/// check it; the measuring child opens it, so no other process holds a CUDA context that the
/// device-wide counter would see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    /// The host CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceChoice {
    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        *self == DeviceChoice::Cpu
    }
}

const DEVICE_SYNTAX: &str = "expected `cpu`, `cuda` or `cuda:N` (N a GPU index, 0 to 9999)";

impl FromStr for DeviceChoice {
    type Err = Error;

    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N` (N a GPU index, 0 to 9999, no leading
    /// zeros). Only the syntax: [`crate::measure::device::check_device`] checks the build and
    /// the machine.
    ///
    /// # Errors
    /// [`Error::Device`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        if s == "cpu" {
            return Ok(DeviceChoice::Cpu);
        }
        let ordinal = match s.strip_prefix("cuda") {
            Some("") => 0,
            Some(rest) => rest
                .strip_prefix(':')
                .filter(|n| {
                    !n.is_empty()
                        && n.len() <= 4
                        && n.bytes().all(|c| c.is_ascii_digit())
                        && (n.len() == 1 || !n.starts_with('0'))
                })
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| Error::Device {
                    device: s.into(),
                    reason: DEVICE_SYNTAX.into(),
                })?,
            None => {
                return Err(Error::Device {
                    device: s.into(),
                    reason: DEVICE_SYNTAX.into(),
                })
            }
        };
        Ok(DeviceChoice::Cuda(ordinal))
    }
}

impl fmt::Display for DeviceChoice {
    /// `cpu` or `cuda:N` ([`FromStr`] reads it back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
