//! The output layer: every verb's result turned into text, JSON or CSV here, not in the
//! commands (the pattern of hyperfine's `export/`). A command parses its arguments, computes a
//! result struct, and hands it to one of these renderers; nothing here computes an estimate or
//! measures.

pub mod calibrate;
pub mod check;
pub mod estimate;
pub mod max;
pub mod measure;
pub mod plan;
pub mod sweep;

/// Writes `text` to stdout. A closed pipe (`vramcal models | head`) ends the output quietly
/// instead of panicking as `print!` does.
///
/// # Errors
/// Other write errors.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// ` (r=…,alpha=…,dropout=…,targets=…)` after the method in run headers, empty without LoRA.
pub fn lora_suffix(spec: &crate::spec::TrainSpec) -> String {
    spec.adaptation
        .lora
        .as_ref()
        .map(|l| format!(" ({l})"))
        .unwrap_or_default()
}
