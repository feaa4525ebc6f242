//! What `vramcal measure` prints: the run header, PEFT's trainable-parameters line, the
//! per-phase table, and the row as CSV or JSON.

use std::fmt::Write;

use crate::measure::Measurement;
use crate::report::Row;
use crate::size::gib;
use crate::spec::TrainSpec;

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
        "weights {} B, gradients {} B, optimizer states {} B; params {} (trainable {})",
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

/// How much `vramcal measure` prints.
#[derive(Debug, Clone, Copy)]
pub struct Verbosity {
    /// The row as JSON on stdout (the table goes to stderr).
    pub json: bool,
    /// Neither the table nor the CSV row (the JSON row still, with `json`).
    pub quiet: bool,
}

/// Prints a measured point: the header line (version, device, model, weights, method with its
/// LoRA settings, quant, checkpointing, attention, dtypes, sizes), the trainable-parameters
/// line, the phase table, then the row as CSV (or JSON).
///
/// # Errors
/// Write and serialization errors.
pub fn emit_result(
    row: &Row,
    m: &Measurement,
    spec: &TrainSpec,
    model: &str,
    v: Verbosity,
) -> anyhow::Result<()> {
    if !v.quiet {
        let lora = super::lora_suffix(spec);
        let head = format!(
            "vramcal {} | {} | {} | weights {} | {}{lora} | quant {} | checkpointing {} | attention {} | {} | {} | micro-batch {} x accumulate {} x seq {}\n{}\n{}",
            env!("CARGO_PKG_VERSION"),
            row.device,
            model,
            row.weights,
            row.method,
            row.quant,
            row.checkpointing,
            row.attention,
            match spec.precision {
                Some(p) => format!("precision {p} (weights {})", row.dtype),
                None => format!("dtype {}", row.dtype),
            },
            match spec.optimizer {
                crate::spec::Optimizer::AdamwTorch | crate::spec::Optimizer::AdamwTorchFused => {
                    format!("{} states {}", spec.optimizer, row.optimizer_state_dtype)
                }
                crate::spec::Optimizer::Sgd if spec.momentum > 0.0 => {
                    format!("sgd momentum {} ({})", spec.momentum, row.optimizer_state_dtype)
                }
                o => o.to_string(),
            },
            spec.batch,
            spec.accumulate,
            spec.seq,
            trainable_line(m),
            phase_table(m, spec.tokens()),
        );
        let head = if row.shard.is_empty() {
            head
        } else {
            let zero3 = if row.shard == "zero3" {
                format!(
                    "ZeRO-3 (DeepSpeed's defaults): from optimizer_init on the rank holds its partition of every tensor (⌈numel/{n}⌉ elements), the flat gradient partition and a gradient bucket of {} elements in the gradients' dtype; tensors of at most {} elements and those used again within {} elements stay gathered from the second forward on\n",
                    crate::spec::DEEPSPEED_REDUCE_BUCKET_SIZE,
                    crate::spec::zero3::PERSISTENCE_THRESHOLD,
                    crate::spec::zero3::MAX_REUSE_DISTANCE,
                    n = row.world_size.unwrap_or(0),
                )
            } else {
                String::new()
            };
            format!(
                "{head}simulated data-parallel rank {} of {} ({}): weights and gradients above are the whole model's, optimizer states this rank's\n{zero3}",
                row.rank.unwrap_or(0),
                row.world_size.unwrap_or(0),
                row.shard
            )
        };
        if v.json {
            eprintln!("{head}");
        } else {
            super::emit(&head)?;
        }
    }
    if v.json {
        super::emit(&format!("{}\n", serde_json::to_string(row)?))?;
    } else if !v.quiet {
        let mut w = csv::Writer::from_writer(vec![]);
        w.serialize(row)?;
        super::emit(&String::from_utf8(w.into_inner()?)?)?;
    }
    Ok(())
}

/// PEFT's `print_trainable_parameters` line for a measurement.
pub fn trainable_line(m: &Measurement) -> String {
    let pct = if m.params > 0 {
        100.0 * m.trainable_params as f64 / m.params as f64
    } else {
        0.0
    };
    format!(
        "trainable params: {} || all params: {} || trainable%: {pct:.4}",
        m.trainable_params, m.params
    )
}
