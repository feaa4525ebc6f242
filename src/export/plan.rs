//! `vramcal plan`'s text: the measured step, the projected fine-tune on this device and on a
//! chosen GPU, the model FLOPs and the MFU.

use crate::report::Row;
use crate::spec::TrainSpec;
use crate::throughput::Plan;

/// The plan as `vramcal plan` prints it (times as hours, minutes and seconds).
pub fn text(model: &str, spec: &TrainSpec, row: &Row, p: &Plan) -> String {
    let tps = row.tokens_per_second.unwrap_or(0.0);
    let hms = |s: f64| {
        let s = s.round() as u64;
        format!("{}h {:02}m {:02}s", s / 3600, (s / 60) % 60, s % 60)
    };
    let mut t = format!(
        "{} on {}: {} {} | micro-batch {} × accumulate {} × seq {} | checkpointing {}\n",
        model,
        row.device,
        row.method,
        row.quant,
        spec.batch,
        spec.accumulate,
        spec.seq,
        row.checkpointing
    );
    t += &format!(
        "measured: {:.1} tokens/s (median of {} steady-state steps, {:.3} s each), peak {} bytes\n",
        tps,
        row.timed_steps + 1,
        row.step_seconds_median.unwrap_or(0.0),
        row.peak_bytes.unwrap_or(0)
    );
    match &p.data {
        None => {
            t += &format!(
                "plan: {} examples × {} epoch(s) × {} tokens = {} tokens in {} optimizer steps\n",
                p.examples, p.epochs, p.seq, p.tokens, p.steps
            )
        }
        Some(d) => {
            t += &format!(
                "plan: {} sequences × {} epoch(s): {} tokens of data, {} computed with padding ({:.1} % padding), in {} optimizer steps; time is the computed tokens at the measured rate (the step measured is the largest micro-batch)\n",
                d.sequences,
                p.epochs,
                p.real_tokens,
                p.tokens,
                100.0 * (p.tokens - p.real_tokens) as f64 / p.tokens.max(1) as f64,
                p.steps
            )
        }
    }
    t += &format!(
        "projected wall time on this device ({}): {} ({:.2} device-hours)\n",
        row.device,
        hms(p.seconds),
        p.device_hours
    );
    if let Some(g) = &p.on_gpu {
        t += &format!(
            "projected on one {}: {} ({:.2} GPU-hours) at MFU {:.2} of its {:.1} TFLOP/s dense bf16 peak (MFU: {}; the time comes from model FLOPs, not from a step measured there)\n",
            g.gpu,
            hms(g.seconds),
            g.device_hours,
            g.mfu,
            g.peak_flops / 1e12,
            g.mfu_source
        );
    }
    t += &format!(
        "model FLOPs: {:.3e} per token (6N + 12·L·H·Q·T, PaLM App. B; LoRA skips frozen weight gradients), achieved {:.3} TFLOP/s\n",
        p.model_flops_per_token,
        p.achieved_flops / 1e12
    );
    match p.mfu {
        Some(m) => {
            t += &format!(
                "MFU: {:.2} % of {:.1} TFLOP/s peak\n",
                100.0 * m,
                p.peak_flops.unwrap_or(0.0) / 1e12
            )
        }
        None => {
            t += "MFU of the measurement: give --peak-tflops (the measuring device's peak) to compute it\n"
        }
    }
    t
}
