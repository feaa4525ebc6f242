//! The per-phase breakdown printed by `vramcal measure`.

use std::fmt::Write;

use crate::measure::Measurement;
use crate::size::gib;

/// Renders the phases of `m` as a text table: peak and end allocated bytes (with GiB, 2^30
/// bytes, for reading), seconds; then the totals.
pub fn phase_table(m: &Measurement, tokens_per_step: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:>15} {:>9} {:>15} {:>9} {:>9}",
        "phase", "peak_bytes", "peak_GiB", "end_bytes", "end_GiB", "seconds"
    );
    for p in &m.phases {
        let _ = writeln!(
            s,
            "{:<22} {:>15} {:>9} {:>15} {:>9} {:>9.3}",
            p.name,
            p.peak_allocated_bytes,
            gib(p.peak_allocated_bytes),
            p.end_allocated_bytes,
            gib(p.end_allocated_bytes),
            p.seconds
        );
    }
    if let Some((phase, peak)) = m.peak() {
        let _ = writeln!(
            s,
            "peak allocated: {peak} bytes ({} GiB) in {phase}",
            gib(peak)
        );
    }
    let _ = writeln!(
        s,
        "weights {} B, gradients {} B, AdamW states {} B; params {} (trainable {})",
        m.param_bytes, m.grad_bytes, m.optimizer_state_bytes, m.params, m.trainable_params
    );
    if let Some(t) = m.step_seconds.get(1) {
        let _ = writeln!(
            s,
            "step 2: {:.3} s, {:.1} tokens/s, loss {:.4}",
            t,
            tokens_per_step as f64 / t,
            m.losses.get(1).copied().unwrap_or(f64::NAN)
        );
    }
    s
}
