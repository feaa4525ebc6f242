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
    /// Starts a measurement and returns the allocated bytes it starts from (the process's
    /// baseline). The CPU probe counts from there: its later readings are bytes above this
    /// baseline, and its budget applies above it. Device probes count from zero and only report
    /// it (their pool holds nothing of the process but what the measurement allocates).
    ///
    /// # Errors
    /// Device errors.
    fn begin(&self) -> Result<u64> {
        Ok(self.read()?.allocated_bytes)
    }
}

/// The CPU probe: reads [`alloc::CountingAlloc`]'s exact byte counts, above the baseline taken
/// by [`MemoryProbe::begin`].
///
/// Why above a baseline: what the process holds before the measurement (the parsed command
/// line and recorded command, the thread pool, gemm's per-thread packing buffers of the CPU's
/// L2 size, see [`alloc::warm_cpu_threads`]) depends on the arguments' lengths and on the
/// machine, not on the training setup; counted in, `--out a.csv` and `--out b/a.csv` or an
/// added `--budget` gave different peaks for the same point. PyTorch's
/// `torch.cuda.max_memory_allocated` likewise counts only the caching allocator's blocks.
#[derive(Debug)]
pub struct HostProbe {
    origin: std::sync::atomic::AtomicU64,
    budget: Option<u64>,
}

impl HostProbe {
    /// Creates the probe.
    ///
    /// # Errors
    /// [`Error::Probe`] when the counting allocator is not the global allocator of this
    /// process (every reading would be zero).
    pub fn new() -> Result<Self> {
        Self::with_budget(None)
    }

    /// A probe that, from [`MemoryProbe::begin`] on, caps the allocated bytes above the
    /// baseline at `budget` (bytes): an allocation past it fails, as on a device that full.
    ///
    /// # Errors
    /// As [`HostProbe::new`].
    pub fn with_budget(budget: Option<u64>) -> Result<Self> {
        if !alloc::is_installed() {
            return Err(Error::Probe {
                reason: "vramcal::measure::CountingAlloc is not this program's #[global_allocator]"
                    .into(),
            });
        }
        Ok(HostProbe {
            origin: std::sync::atomic::AtomicU64::new(0),
            budget,
        })
    }

    fn origin(&self) -> u64 {
        self.origin.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl MemoryProbe for HostProbe {
    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn counter(&self) -> &'static str {
        HOST_COUNTER
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn reset_peak(&self) -> Result<()> {
        alloc::reset_peak();
        Ok(())
    }

    fn read(&self) -> Result<MemoryReading> {
        let o = self.origin();
        Ok(MemoryReading {
            allocated_bytes: alloc::current_bytes().saturating_sub(o),
            peak_allocated_bytes: alloc::peak_bytes().saturating_sub(o),
            reserved_bytes: None,
            peak_reserved_bytes: None,
            device_used_bytes: None,
        })
    }

    fn begin(&self) -> Result<u64> {
        let base = alloc::current_bytes();
        self.origin.store(base, std::sync::atomic::Ordering::SeqCst);
        if let Some(b) = self.budget {
            alloc::set_limit(Some(base.saturating_add(b)));
        }
        Ok(base)
    }
}

/// The CPU probe's `memory_counter`: live bytes of the counting allocator above the process's
/// baseline at the start of the measurement.
pub const HOST_COUNTER: &str = "host-counting-allocator-above-baseline";

/// The CPU counter of rows made before peaks were taken above the baseline: their
/// `*_peak_bytes`/`*_end_bytes` include `baseline_bytes`.
pub const HOST_COUNTER_ABSOLUTE: &str = "host-counting-allocator";

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
