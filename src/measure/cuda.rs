//! The CUDA memory probe (`--features cuda`): three counters, as PyTorch users know them.
//!
//! * `allocated`: the device memory pool's `CU_MEMPOOL_ATTR_USED_MEM_CURRENT` /
//!   `USED_MEM_HIGH` (the analogue of `torch.cuda.memory_allocated` /
//!   `max_memory_allocated`). cudarc 0.19 allocates with `cuMemAllocAsync` from the device's
//!   current pool when the device supports memory pools, so every candle tensor is counted.
//!   The pool does not see the CUDA context or cuBLAS workspaces.
//! * `reserved`: the same pool's `RESERVED_MEM_CURRENT` / `RESERVED_MEM_HIGH`
//!   (`torch.cuda.memory_reserved` / `max_memory_reserved`).
//! * `device`: total − free from `cuMemGetInfo` when read (context, cuBLAS workspaces and other
//!   processes included); sampled at phase boundaries, so a lower bound of the true peak, as
//!   `nvidia-smi` sampling is.
//!
//! Without memory-pool support, `allocated` falls back to the device counter (sampled at the
//! peak reset and at the read) and [`MemoryProbe::counter`] says so.
//!
//! Source: CUDA Driver API, "Stream Ordered Memory Allocator" (`cuMemPoolGetAttribute`,
//! `cuMemPoolSetAttribute`: setting a `*_HIGH` attribute to 0 resets it to the current value).

use std::cell::Cell;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext, CudaStream};
use candle_core::cuda_backend::CudaDevice;

use crate::error::{Error, Result};
use crate::measure::probe::{MemoryProbe, MemoryReading};

use sys::CUmemPool_attribute as Attr;

/// Number of CUDA devices the driver sees, without creating a context (no device memory used).
///
/// # Errors
/// [`Error::Device`] when the driver cannot be initialized (no driver, no device, the stub
/// libraries of a machine without a GPU).
pub fn device_count() -> Result<usize> {
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| Error::Device {
            device: "cuda".into(),
            reason: format!("no usable CUDA device: {e:?}"),
        })
}

/// Reads [`CudaDevice`]'s memory pool and the driver's used-memory figure.
pub struct CudaProbe {
    stream: Arc<CudaStream>,
    pool: Option<sys::CUmemoryPool>,
    name: String,
    /// Device-counter fallback: highest used bytes seen since the last reset.
    fallback_peak: Cell<u64>,
    /// Bytes of a [`Blocker`] that the device counter leaves out.
    blocker_bytes: u64,
}

impl std::fmt::Debug for CudaProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaProbe")
            .field("name", &self.name)
            .field("memory_pool", &self.pool.is_some())
            .finish()
    }
}

fn driver(e: result::DriverError, what: &str) -> Error {
    Error::Probe {
        reason: format!("{what}: {e:?}"),
    }
}

impl CudaProbe {
    /// Opens the probe on `dev`'s context and default stream; the device counter leaves out
    /// `blocker_bytes` (a [`Blocker`] standing for a smaller GPU).
    ///
    /// # Errors
    /// [`Error::Probe`] when the driver refuses a query.
    pub fn new(dev: &CudaDevice, blocker_bytes: u64) -> Result<Self> {
        let stream = dev.cuda_stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread()
            .map_err(|e| driver(e, "binding the CUDA context"))?;
        let gpu = ctx.name().map_err(|e| driver(e, "cuDeviceGetName"))?;
        let pool = if ctx.has_async_alloc() {
            // SAFETY: the device handle comes from a live context.
            Some(
                unsafe { result::device::get_mem_pool(ctx.cu_device()) }
                    .map_err(|e| driver(e, "cuDeviceGetMemPool"))?,
            )
        } else {
            None
        };
        Ok(CudaProbe {
            stream,
            pool,
            name: format!("cuda:{} ({gpu})", ctx.ordinal()),
            fallback_peak: Cell::new(0),
            blocker_bytes,
        })
    }

    fn pool_attr(&self, pool: sys::CUmemoryPool, attr: Attr) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the pool is the device's; these four attributes are `cuuint64_t`.
        unsafe {
            result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast())
                .map_err(|e| driver(e, "cuMemPoolGetAttribute"))?;
        }
        Ok(v)
    }

    fn device_used(&self) -> Result<u64> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver(e, "binding the CUDA context"))?;
        let (free, total) = result::mem_get_info().map_err(|e| driver(e, "cuMemGetInfo"))?;
        Ok((total.saturating_sub(free) as u64).saturating_sub(self.blocker_bytes))
    }
}

impl MemoryProbe for CudaProbe {
    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn counter(&self) -> &'static str {
        if self.pool.is_some() {
            "cuda-mempool"
        } else {
            "cuda-device (no memory-pool support: allocated is the driver's used memory sampled at phase boundaries, a lower bound)"
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver(e, "synchronizing the stream"))
    }

    fn reset_peak(&self) -> Result<()> {
        match self.pool {
            Some(pool) => {
                for attr in [
                    Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                ] {
                    let mut zero: u64 = 0;
                    // SAFETY: as in `pool_attr`; 0 resets the high-water mark to the current value.
                    unsafe {
                        result::mem_pool::set_attribute(pool, attr, (&mut zero as *mut u64).cast())
                            .map_err(|e| driver(e, "cuMemPoolSetAttribute"))?;
                    }
                }
            }
            None => self.fallback_peak.set(self.device_used()?),
        }
        Ok(())
    }

    fn read(&self) -> Result<MemoryReading> {
        let device = self.device_used()?;
        Ok(match self.pool {
            Some(pool) => MemoryReading {
                allocated_bytes: self.pool_attr(pool, Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
                peak_allocated_bytes: self.pool_attr(pool, Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                reserved_bytes: Some(
                    self.pool_attr(pool, Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
                ),
                peak_reserved_bytes: Some(
                    self.pool_attr(pool, Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
                ),
                device_used_bytes: Some(device),
            },
            None => {
                let peak = self.fallback_peak.get().max(device);
                MemoryReading {
                    allocated_bytes: device,
                    peak_allocated_bytes: peak,
                    reserved_bytes: None,
                    peak_reserved_bytes: None,
                    device_used_bytes: Some(device),
                }
            }
        })
    }
}

/// A device allocation outside the memory pool that leaves only `--budget` bytes free, so a
/// large GPU can stand in for a smaller one (an H200 measuring whether a run fits an
/// A100-40GB). Whatever the process allocates afterwards (pool, cuBLAS workspaces, context
/// growth) comes out of the budget. Freed on drop.
#[derive(Debug)]
pub struct Blocker {
    ptr: sys::CUdeviceptr,
    /// Bytes taken by the blocker.
    pub bytes: u64,
}

impl Blocker {
    /// Takes all free device memory except `budget` bytes, on the current context of `dev`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] when less than `budget` is free; [`Error::Probe`] when the driver
    /// refuses the allocation.
    pub fn leave_free(dev: &CudaDevice, budget: u64) -> Result<Self> {
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver(e, "binding the CUDA context"))?;
        let (free, _total) = result::mem_get_info().map_err(|e| driver(e, "cuMemGetInfo"))?;
        let free = free as u64;
        if free < budget {
            return Err(Error::invalid(
                "--budget",
                budget,
                format!("the GPU has only {free} bytes free"),
            ));
        }
        let bytes = free - budget;
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: a plain device allocation, never read or written, freed on drop.
            unsafe { result::malloc_sync(bytes as usize) }
                .map_err(|e| driver(e, "cuMemAlloc (the --budget blocker)"))?
        };
        Ok(Blocker { ptr, bytes })
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by `leave_free` and not freed elsewhere.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}
