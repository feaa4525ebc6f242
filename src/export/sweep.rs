//! `vramcal sweep`'s output: one progress line per point as it finishes, then a Markdown
//! summary table of the points and the file written.

use std::path::Path;

use comfy_table::Table;

use crate::report::{Row, Status};
use crate::size::gib;

/// One finished point, as the sweep reports it.
#[derive(Debug, Clone)]
pub struct Line {
    /// Method (CSV label).
    pub method: String,
    /// Checkpointing (CSV label).
    pub checkpointing: String,
    /// Micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// `ok`, `oom` or `error`.
    pub status: &'static str,
    /// Peak bytes, if measured.
    pub peak_bytes: Option<u64>,
    /// Peak in GiB (2^30 bytes) for display, `-` if none.
    pub peak_gib: String,
    /// Median step seconds for display, `-` if none.
    pub step_seconds: String,
    /// Tokens per second for display, empty if none.
    pub tokens_per_second: String,
    /// The row's message (why it failed), empty when it did not.
    pub message: String,
}

impl Line {
    /// The line of `row`, measured at micro-batch `batch` × `seq`.
    pub fn new(row: &Row, batch: usize, seq: usize) -> Self {
        Line {
            method: row.method.clone(),
            checkpointing: row.checkpointing.clone(),
            batch,
            seq,
            status: match row.status {
                Some(Status::Ok) => "ok",
                Some(Status::Oom) => "oom",
                _ => "error",
            },
            peak_bytes: row.peak_bytes,
            peak_gib: row.peak_bytes.map(gib).unwrap_or_else(|| "-".into()),
            step_seconds: row
                .step_seconds_median
                .map(|t| format!("{t:.2}"))
                .unwrap_or_else(|| "-".into()),
            tokens_per_second: row
                .tokens_per_second
                .map(|t| format!("{t:.1}"))
                .unwrap_or_default(),
            message: row.message.clone(),
        }
    }

    /// `[i/n] label: status peak … GiB, step … s[: message]`.
    pub fn progress(&self, i: usize, n: usize, label: &str) -> String {
        format!(
            "[{i}/{n}] {label}: {} peak {} GiB, step {} s{}",
            self.status,
            self.peak_gib,
            self.step_seconds,
            if self.message.is_empty() {
                String::new()
            } else {
                format!(": {}", self.message)
            }
        )
    }
}

/// The points a sweep measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// One per point, in order.
    pub lines: Vec<Line>,
    /// Points that did not end `ok`.
    pub failed: usize,
}

impl Outcome {
    /// Adds a finished point.
    pub fn push(&mut self, line: Line) {
        if line.status != "ok" {
            self.failed += 1;
        }
        self.lines.push(line);
    }
}

/// The summary printed after the points (to stderr): a Markdown table, the file written, and
/// how many points failed.
pub fn summary(o: &Outcome, out: &Path) -> String {
    let mut s = String::new();
    if !o.lines.is_empty() {
        let mut t = Table::new();
        t.load_style(comfy_table::presets::ASCII_MARKDOWN)
            .set_header([
                "method",
                "ckpt",
                "batch",
                "seq",
                "status",
                "peak_bytes",
                "peak GiB",
                "step s",
                "tokens/s",
            ]);
        for l in &o.lines {
            t.add_row([
                l.method.clone(),
                l.checkpointing.clone(),
                l.batch.to_string(),
                l.seq.to_string(),
                l.status.to_string(),
                l.peak_bytes.map(|b| b.to_string()).unwrap_or_default(),
                l.peak_gib.clone(),
                l.step_seconds.clone(),
                l.tokens_per_second.clone(),
            ]);
        }
        s += &format!("{t}\n");
    }
    s += &format!("wrote {} row(s) to {}\n", o.lines.len(), out.display());
    if o.failed > 0 {
        s += &format!(
            "{} of {} points failed (see status/message in the CSV)\n",
            o.failed,
            o.lines.len()
        );
    }
    s
}
