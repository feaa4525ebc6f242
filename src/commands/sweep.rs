//! `vramcal sweep`: a batch × seq grid, each point measured by a child process of this binary
//! (a fresh allocator per point; a crash kills only that point), one CSV row per point.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::Context;

use crate::cli::SweepArgs;
use crate::error::Error;
use crate::measure::Measurement;
use crate::report::{append_row, Row, RowContext, Status};

/// Parses a comma-separated grid axis: positive integers, no duplicates, not empty.
///
/// # Errors
/// [`Error::InvalidValue`] naming the axis and the bad entry.
pub fn parse_axis(name: &str, items: &[String]) -> Result<Vec<usize>, Error> {
    let mut out = Vec::new();
    for it in items {
        let t = it.trim();
        if t.is_empty() {
            return Err(Error::invalid(
                name,
                items.join(","),
                "the list is empty or has an empty entry",
            ));
        }
        let v: usize = t
            .parse()
            .map_err(|_| Error::invalid(name, t, "expected a positive integer"))?;
        if v == 0 {
            return Err(Error::invalid(name, t, "must be at least 1"));
        }
        if out.contains(&v) {
            return Err(Error::invalid(name, t, "listed twice"));
        }
        out.push(v);
    }
    if out.is_empty() {
        return Err(Error::invalid(name, "", "the list is empty"));
    }
    Ok(out)
}

/// Runs `vramcal sweep`. Exit code 0 when every point succeeded, 2 when some failed (their
/// rows are recorded with `status` and `message`).
///
/// # Errors
/// Bad grid or model arguments (before anything runs), or an unwritable output file.
pub fn run(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let batches = parse_axis("--batch", &a.batch)?;
    let seqs = parse_axis("--seq", &a.seq)?;
    let (model, weights) = super::measure::resolve(&a.model)?;
    // Validate every point before running any.
    for &b in &batches {
        for &s in &seqs {
            super::measure::train_spec(&a.model, b, s)?.validate(&model.config)?;
        }
    }
    super::measure::parse_device(&a.model.device)?;
    let dev_dir = a.model.device.replace(':', "");
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("results/{dev_dir}/{}.csv", model.name)));
    crate::report::csv_out::check_writable(&out)?;
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let command = super::command_line();
    let total = batches.len() * seqs.len();
    let mut failed = 0;
    let mut i = 0;
    for &b in &batches {
        for &s in &seqs {
            i += 1;
            let m = &a.model;
            let mut cmd = Command::new(&exe);
            cmd.arg("measure")
                .args(["--weights", &m.weights, "--dtype", &m.dtype])
                .args(["--optimizer-state-dtype", &m.optimizer_state_dtype])
                .args([
                    "--lr",
                    &m.lr.to_string(),
                    "--weight-decay",
                    &m.weight_decay.to_string(),
                ])
                .args(["--device", &m.device, "--seed", &m.seed.to_string()])
                .args(["--data-seed", &m.data_seed.to_string()])
                .args(["--batch", &b.to_string(), "--seq", &s.to_string()])
                .args(["--json", "--quiet", "--record-command", &command]);
            if let Some(name) = &m.model {
                cmd.args(["--model", name]);
            }
            if m.allow_longer {
                cmd.arg("--allow-longer");
            }
            let output = cmd
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("starting {}", exe.display()))?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let parsed = stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Row>(l).ok());
            let row = match parsed {
                Some(r) => r,
                None => {
                    let last = stderr
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    let why = match output.status.code() {
                        Some(c) => format!("child exited with code {c}: {last}"),
                        None => format!("child killed by a signal ({:?}): {last}", output.status),
                    };
                    let ctx = RowContext {
                        command: command.clone(),
                        model: model.name.clone(),
                        weights: weights.describe(),
                        device: m.device.clone(),
                    };
                    let spec = super::measure::train_spec(m, b, s)?;
                    Row::new(
                        &ctx,
                        &spec,
                        &Measurement::default(),
                        Status::Error,
                        why.trim(),
                    )
                }
            };
            if row.status != Some(Status::Ok) {
                failed += 1;
            }
            append_row(&out, &row)?;
            let peak = row
                .peak_bytes
                .map(crate::spec::gib)
                .unwrap_or_else(|| "-".into());
            let secs = row
                .step2_seconds
                .map(|t| format!("{t:.2}"))
                .unwrap_or_else(|| "-".into());
            eprintln!(
                "[{i}/{total}] batch {b} seq {s}: {:?} peak {peak} GiB, step2 {secs} s {}",
                row.status.unwrap_or(Status::Error),
                row.message
            );
        }
    }
    eprintln!("wrote {} rows to {}", total, out.display());
    if failed > 0 {
        eprintln!("{failed} of {total} points failed (see status/message in the CSV)");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
