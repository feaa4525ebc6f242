//! `vramcal gpus`: the GPUs `--gpu` accepts, with memory and dense 16-bit peak FLOP/s from
//! their datasheets (cited in [`crate::throughput::GPUS`]).

use std::process::ExitCode;

use crate::size::gib;
use crate::throughput::GPUS;

/// Prints the GPU table (name, vendor, segment, memory, peak TFLOP/s, aliases, source).
///
/// # Errors
/// JSON serialization errors only.
pub fn run(json: bool) -> anyhow::Result<ExitCode> {
    if json {
        crate::export::emit(&format!("{}\n", serde_json::to_string_pretty(GPUS)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = format!(
        "{:<18} {:<7} {:<12} {:>16} {:>8} {:>11}  {:<28} source\n",
        "gpu", "vendor", "segment", "memory_bytes", "GiB", "dense_TFLOPs", "aliases"
    );
    for g in GPUS {
        t += &format!(
            "{:<18} {:<7} {:<12} {:>16} {:>8} {:>11}  {:<28} {}\n",
            g.name,
            g.vendor,
            g.segment,
            g.memory_bytes,
            gib(g.memory_bytes),
            format!(
                "{:.1}{}",
                g.peak_bf16_flops / 1e12,
                if g.bf16 { "" } else { " fp16" }
            ),
            g.aliases.join(","),
            g.source
        );
    }
    t += "dense_TFLOPs: peak 16-bit tensor FLOP/s without sparsity, bf16 (fp16 where marked), fp32 accumulate; GiB = 2^30 bytes\n";
    crate::export::emit(&t)?;
    Ok(ExitCode::SUCCESS)
}
