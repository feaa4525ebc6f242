//! A counting global allocator: exact live and peak heap bytes of the process.
//!
//! Install it in the binary (or a test/bench binary) with
//! `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc;`.
//! Counts are the `Layout::size()` of every live allocation, so they are exact to the byte
//! for what the program asked for (the C allocator's own padding and arenas are not
//! counted: that is "allocated", not "reserved").

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(true);
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Global allocator that forwards to [`System`] and keeps live and peak byte counts.
///
/// Counting can be switched off with [`set_counting`] (for overhead benchmarks); while off,
/// counts are frozen and become meaningless until [`reset_peak`] after switching it back on,
/// since frees of blocks counted earlier are still subtracted.
pub struct CountingAlloc;

/// Counts `n` more bytes; `false` (and nothing counted) when that would pass the budget.
#[inline]
fn add(n: usize) -> bool {
    if COUNTING.load(Ordering::Relaxed) {
        let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
        if now > LIMIT.load(Ordering::Relaxed) {
            CURRENT.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
    true
}

#[inline]
fn sub(n: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        CURRENT.fetch_sub(n, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the same layout; counting has no effect on
// the returned memory.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !add(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if p.is_null() {
            sub(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !add(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            sub(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grow = new_size.saturating_sub(layout.size());
        if grow > 0 && !add(grow) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            sub(grow);
        } else if new_size < layout.size() {
            sub(layout.size() - new_size);
        }
        p
    }
}

/// Live heap bytes now (bytes).
pub fn current_bytes() -> u64 {
    CURRENT.load(Ordering::SeqCst) as u64
}

/// Highest live heap bytes since the last [`reset_peak`] (bytes).
pub fn peak_bytes() -> u64 {
    PEAK.load(Ordering::SeqCst) as u64
}

/// Sets the peak to the current live bytes, starting a new measuring window.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// Caps the live bytes: an allocation that would pass `bytes` fails (the Rust runtime then
/// reports "memory allocation of N bytes failed" and aborts: run capped work in a child
/// process). `None` removes the cap.
pub fn set_limit(bytes: Option<u64>) {
    let v = bytes.map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX));
    LIMIT.store(v, Ordering::SeqCst);
}

/// The cap set by [`set_limit`], if any (bytes).
pub fn limit() -> Option<u64> {
    let v = LIMIT.load(Ordering::SeqCst);
    (v != usize::MAX).then_some(v as u64)
}

/// Switches counting on or off (on by default). Off is for measuring the counter's overhead.
pub fn set_counting(on: bool) {
    COUNTING.store(on, Ordering::SeqCst);
}

/// Whether [`CountingAlloc`] is this process's global allocator: true once it has counted
/// at least one allocation (this function allocates one to make sure).
pub fn is_installed() -> bool {
    let probe = std::hint::black_box(Box::new(0u64));
    drop(probe);
    PEAK.load(Ordering::SeqCst) > 0
}

/// Makes glibc's `malloc` keep freed memory for reuse instead of returning it to the kernel
/// after every large free: an mmap threshold of 32 MiB (glibc's maximum; blocks below it come
/// from the heap) and a trim threshold of 2 GiB (free heap kept before trimming). Without it a
/// training step spends about a sixth of its time in page faults, zeroing pages that were just
/// returned (measured: 2 × 512 step 8.8 s → 7.2 s). What the counting allocator reports
/// (allocated bytes) is unchanged; what the process holds from the kernel is then more like
/// PyTorch's caching allocator's reserved memory. Call once at start; a no-op elsewhere than
/// glibc.
pub fn tune_host_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before threads allocate much.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Allocates, before anything is measured, the per-thread buffers that CPU matrix
/// multiplications otherwise allocate lazily on whichever thread first runs one, so that a
/// measured peak does not depend on thread scheduling.
///
/// gemm (the crate behind candle's CPU matmuls) packs the left operand into a thread-local
/// buffer of the CPU's L2 size (`gemm_common::gemm::L2_SLAB`, gemm-common 0.19
/// `src/gemm.rs`), created the first time that thread packs. Which rayon worker first gets a
/// packing job is a matter of work stealing: on a 2-core AMD EPYC with 512 KiB of L2 the peaks
/// of identical runs differed by exactly ±524,288 B. Touching the buffer on every worker of
/// rayon's global pool (which starts the pool, whose own per-thread allocations then happen here
/// too) and on the calling thread makes them part of the process's baseline (`(threads + 1) ×
/// L2` bytes), which the CPU probe leaves out of every reading (`HostProbe::begin`).
///
/// Idempotent and cheap after the first call.
pub fn warm_cpu_threads() {
    fn touch() {
        gemm_common::gemm::L2_SLAB.with(|slab| {
            std::hint::black_box(&*slab.borrow());
        });
    }
    rayon::broadcast(|_| touch());
    touch();
}
