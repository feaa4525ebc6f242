//! Measuring real training steps: the counting allocator, the memory probes and the step
//! protocol.

pub mod alloc;
pub mod probe;
pub mod step;

pub use alloc::CountingAlloc;
pub use probe::{HostProbe, MemoryProbe, MemoryReading};
pub use step::{measure, measure_with, Event, Measurement, Options, PhaseRecord, Setup};
