//! One memory-probe vocabulary for every device.
//!
//! * `allocated`: live bytes the framework handed out (on CPU: the counting allocator;
//!   on CUDA: the memory pool's used bytes, like `torch.cuda.memory_allocated`).
//! * `reserved`: what the framework's pool holds (CUDA only; `torch.cuda.memory_reserved`).
//! * `device`: what the driver reports as used (CUDA only; includes the context).
//!
//! The CPU has only `allocated`: its probe reports `None` for the others rather than fake them.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::measure::alloc;

/// One reading of a probe. All values in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReading {
    /// Live allocated bytes now.
    pub allocated_bytes: u64,
    /// Highest allocated bytes since the last peak reset.
    pub peak_allocated_bytes: u64,
    /// Bytes held by the framework's pool now, where the device has one.
    pub reserved_bytes: Option<u64>,
    /// Highest reserved bytes since the last peak reset.
    pub peak_reserved_bytes: Option<u64>,
    /// Device memory in use per the driver (total − free), a lower bound of the true peak.
    pub device_used_bytes: Option<u64>,
}

/// A source of memory readings for one device.
pub trait MemoryProbe {
    /// Human-readable device name, e.g. `cpu` or `cuda:0 (NVIDIA H200)`.
    fn device_name(&self) -> String;
    /// Which counter `allocated` comes from, recorded in each row's `memory_counter`
    /// (`host-counting-allocator`, `cuda-mempool`, or the device-counter fallback).
    fn counter(&self) -> &'static str;
    /// Waits until queued device work is done, so a reading covers it.
    ///
    /// # Errors
    /// Device errors.
    fn synchronize(&self) -> Result<()>;
    /// Starts a new peak window at the current value.
    ///
    /// # Errors
    /// Device errors.
    fn reset_peak(&self) -> Result<()>;
    /// Reads the counters.
    ///
    /// # Errors
    /// Device errors.
    fn read(&self) -> Result<MemoryReading>;
}

/// The CPU probe: reads [`alloc::CountingAlloc`]'s exact byte counts.
#[derive(Debug)]
pub struct HostProbe(());

impl HostProbe {
    /// Creates the probe.
    ///
    /// # Errors
    /// [`Error::Probe`] when the counting allocator is not the global allocator of this
    /// process (every reading would be zero).
    pub fn new() -> Result<Self> {
        if !alloc::is_installed() {
            return Err(Error::Probe {
                reason: "vramcal::measure::CountingAlloc is not this program's #[global_allocator]"
                    .into(),
            });
        }
        Ok(HostProbe(()))
    }
}

impl MemoryProbe for HostProbe {
    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn counter(&self) -> &'static str {
        "host-counting-allocator"
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn reset_peak(&self) -> Result<()> {
        alloc::reset_peak();
        Ok(())
    }

    fn read(&self) -> Result<MemoryReading> {
        Ok(MemoryReading {
            allocated_bytes: alloc::current_bytes(),
            peak_allocated_bytes: alloc::peak_bytes(),
            reserved_bytes: None,
            peak_reserved_bytes: None,
            device_used_bytes: None,
        })
    }
}

/// Whether a failure message reports that the device ran out of memory (CUDA driver, cuBLAS
/// or cuRAND allocation failures), so the point is recorded as `status=oom`.
pub fn is_device_oom(message: &str) -> bool {
    [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CURAND_STATUS_ALLOCATION_FAILED",
    ]
    .iter()
    .any(|k| message.contains(k))
}

/// What to do about a device failure whose fix lies outside vramcal (driver or build), if the
/// message shows one.
pub fn failure_hint(message: &str) -> Option<&'static str> {
    if message.contains("CUDA_ERROR_UNSUPPORTED_PTX_VERSION") {
        Some("the GPU driver is older than the CUDA toolkit that compiled vramcal's kernels (13.0): update the driver (nvidia-smi shows the CUDA version it supports) or rebuild with a toolkit no newer than it")
    } else if message.contains("CUDA_ERROR_NO_BINARY_FOR_GPU") {
        Some("vramcal's kernels were compiled for another GPU: rebuild with CUDA_COMPUTE_CAP=80 (PTX that newer GPUs compile) or this GPU's compute capability")
    } else {
        None
    }
}
