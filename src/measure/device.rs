//! The measuring device: `--device` checked against the build and the machine without opening
//! it (parents only check; the measuring child opens it, so no other process holds a CUDA
//! context that the device-wide counter would see), opened in the child, and its memory probe.

use candle_core::Device;

use super::{HostProbe, MemoryProbe};
use crate::error::Error;
use crate::spec::DeviceChoice;

/// Parses and checks `--device` without opening it: the syntax ([`DeviceChoice`]'s
/// `FromStr`), the `cuda` feature, that the driver sees the device (no context is created),
/// and that the CPU probe can count.
///
/// # Errors
/// [`Error::Device`] for an unknown device, CUDA in a build without the `cuda` feature, an
/// ordinal the machine does not have, or no usable driver; [`Error::Probe`] when the counting
/// allocator is not installed.
pub fn check_device(s: &str) -> Result<DeviceChoice, Error> {
    let choice: DeviceChoice = s.parse()?;
    match choice {
        DeviceChoice::Cpu => {
            HostProbe::new()?;
        }
        DeviceChoice::Cuda(ordinal) => check_cuda(s, ordinal)?,
    }
    Ok(choice)
}

#[cfg(feature = "cuda")]
fn check_cuda(s: &str, ordinal: usize) -> Result<(), Error> {
    let n = super::cuda::device_count().map_err(|e| Error::Device {
        device: s.into(),
        reason: format!(
            "{}; this machine has no usable NVIDIA GPU and driver (`nvidia-smi` should list one): use --device cpu",
            match e {
                Error::Device { reason, .. } => reason,
                other => other.to_string(),
            }
        ),
    })?;
    if ordinal >= n {
        return Err(Error::Device {
            device: s.into(),
            reason: match n {
                0 => "the driver sees no CUDA device: use --device cpu".into(),
                _ => format!(
                    "this machine has {n} CUDA device(s), cuda:0 to cuda:{}",
                    n - 1
                ),
            },
        });
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check_cuda(s: &str, _ordinal: usize) -> Result<(), Error> {
    Err(Error::Device {
        device: s.into(),
        reason: "this vramcal was built without the `cuda` feature: rebuild with `cargo build --release --features cuda` (docs/cuda.md, \"Building\"), or use --device cpu".into(),
    })
}

/// Opens a checked device (in the measuring process only).
///
/// # Errors
/// [`Error::Device`] when CUDA cannot create a context on it.
pub fn open_device(d: DeviceChoice) -> Result<Device, Error> {
    match d {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| Error::Device {
            device: format!("cuda:{n}"),
            reason: format!(
                "cannot open: {e} (check the GPU with nvidia-smi and that its driver supports CUDA 13.0)"
            ),
        }),
    }
}

/// The memory probe for an opened `device`; `blocker_bytes` (the `--budget` blocker on a GPU)
/// are left out of the device counter; on the CPU, `budget` caps the bytes allocated above the
/// baseline (the probe applies it when the measurement begins).
///
/// # Errors
/// [`Error::Probe`] when the counting allocator is not installed or the CUDA driver refuses a
/// query.
pub fn probe_for(
    device: &Device,
    blocker_bytes: u64,
    budget: Option<u64>,
) -> Result<Box<dyn MemoryProbe>, Error> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let _ = budget;
            Ok(Box::new(super::cuda::CudaProbe::new(d, blocker_bytes)?))
        }
        _ => {
            let _ = blocker_bytes;
            Ok(Box::new(HostProbe::with_budget(budget)?))
        }
    }
}

/// Physical memory of this machine in bytes (`MemTotal` of `/proc/meminfo`), if known.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
