//! Measuring real training steps: the counting allocator, the memory probes and the step
//! protocol.

pub mod alloc;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod fsdp;
pub mod probe;
pub mod sharded;
pub mod step;
pub mod zero3;

pub use alloc::CountingAlloc;
pub use probe::{failure_hint, is_device_oom, HostProbe, MemoryProbe, MemoryReading};
pub use step::{measure, measure_with, Event, Measurement, Options, PhaseRecord, Setup};
