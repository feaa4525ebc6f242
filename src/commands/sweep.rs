//! `vramcal sweep`: a batch × seq grid, each point measured by a child process of this binary
//! (a fresh allocator per point; a crash kills only that point), one CSV row per point.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::Context;

use crate::cli::{ModelArgs, SweepArgs};
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

/// Parses a comma-separated list of names: not empty, no duplicates.
///
/// # Errors
/// [`Error::InvalidValue`].
pub fn parse_names(name: &str, items: &[String]) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = Vec::new();
    for it in items {
        let t = it.trim();
        if t.is_empty() {
            return Err(Error::invalid(
                name,
                items.join(","),
                "the list is empty or has an empty entry",
            ));
        }
        if out.iter().any(|o| o == t) {
            return Err(Error::invalid(name, t, "listed twice"));
        }
        out.push(t.to_string());
    }
    if out.is_empty() {
        return Err(Error::invalid(name, "", "the list is empty"));
    }
    Ok(out)
}

/// The arguments of one point: LoRA settings apply to the LoRA methods only.
fn point_args(args: &ModelArgs, method: Option<&str>) -> ModelArgs {
    let mut a = args.clone();
    if method == Some("full") {
        a.lora = None;
    }
    a
}

/// Runs `vramcal sweep`. Exit code 0 when every point succeeded, 2 when some failed (their
/// rows are recorded with `status` and `message`).
///
/// # Errors
/// Bad grid or model arguments (before anything runs), or an unwritable output file.
pub fn run(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let batches = parse_axis("--batch", &a.batch)?;
    let seqs = parse_axis("--seq", &a.seq)?;
    let methods: Vec<Option<String>> = if a.method.is_empty() {
        vec![None]
    } else {
        parse_names("--method", &a.method)?
            .into_iter()
            .map(Some)
            .collect()
    };
    let ckpts = parse_names("--checkpointing", &a.checkpointing)?;
    let (model, weights) = super::measure::resolve(&a.model)?;
    let device = super::measure::parse_device(&a.model.device)?;
    // Validate every point before running any.
    let mut grid = Vec::new();
    for m in &methods {
        for c in &ckpts {
            for &b in &batches {
                for &s in &seqs {
                    let spec = super::measure::train_spec(
                        &point_args(&a.model, m.as_deref()),
                        b,
                        s,
                        m.as_deref(),
                        c,
                    )?;
                    spec.validate(&model.config)?;
                    super::measure::check_fits(&spec, &model, &device)?;
                    grid.push((m.clone(), c.clone(), b, s));
                }
            }
        }
    }
    super::measure::probe_for(&device, &a.model.device)?;
    let dev_dir = a.model.device.replace(':', "");
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("results/{dev_dir}/{}.csv", model.name)));
    crate::report::csv_out::check_writable(&out)?;
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let command = super::command_line();
    let total = grid.len();
    let mut failed = 0;
    for (i, (method, ckpt, b, s)) in grid.into_iter().enumerate() {
        let m = &point_args(&a.model, method.as_deref());
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
            .args([
                "--quant",
                &m.quant,
                "--accumulate",
                &m.accumulate.to_string(),
                "--save",
                &m.save,
            ])
            .args(["--checkpointing", &ckpt])
            .args(["--batch", &b.to_string(), "--seq", &s.to_string()])
            .args(["--json", "--quiet", "--record-command", &command]);
        if let Some(name) = &m.model {
            cmd.args(["--model", name]);
        }
        if let Some(method) = &method {
            cmd.args(["--method", method]);
        }
        if let Some(l) = &m.lora {
            cmd.args(["--lora", l]);
        }
        if m.double_quant {
            cmd.arg("--double-quant");
        }
        if m.allow_longer {
            cmd.arg("--allow-longer");
        }
        if let Some(d) = &m.save_dir {
            cmd.arg("--save-dir")
                .arg(d.join(format!("point-{}", i + 1)));
        }
        let output = cmd
            .env("RUST_BACKTRACE", "0")
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
                    .find(|l| !l.trim().is_empty() && !l.starts_with("note:"))
                    .unwrap_or("");
                let signal = signal_name(&output.status);
                let why = match output.status.code() {
                    Some(c) => format!("child exited with code {c}: {last}"),
                    None => format!("child killed by {signal}: {last}"),
                };
                // Rust's allocation-failure message, or SIGKILL (the kernel's OOM killer).
                let oom = stderr.contains("memory allocation of") || signal == "SIGKILL";
                let ctx = RowContext {
                    command: command.clone(),
                    model: model.name.clone(),
                    weights: weights.describe(),
                    device: m.device.clone(),
                };
                let spec = super::measure::train_spec(m, b, s, method.as_deref(), &ckpt)?;
                let status = if oom { Status::Oom } else { Status::Error };
                Row::new(&ctx, &spec, &Measurement::default(), status, why.trim())
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
        let status = serde_json::to_value(row.status.unwrap_or(Status::Error)).unwrap_or_default();
        eprintln!(
            "[{}/{total}] {} ckpt {} batch {b} seq {s}: {} peak {peak} GiB, step2 {secs} s{}",
            i + 1,
            row.method,
            row.checkpointing,
            status.as_str().unwrap_or("error"),
            if row.message.is_empty() {
                String::new()
            } else {
                format!(": {}", row.message)
            }
        );
    }
    eprintln!("wrote {total} row(s) to {}", out.display());
    if failed > 0 {
        eprintln!("{failed} of {total} points failed (see status/message in the CSV)");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn signal_name(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(6) => "SIGABRT".into(),
        Some(9) => "SIGKILL".into(),
        Some(11) => "SIGSEGV".into(),
        Some(n) => format!("signal {n}"),
        None => "no signal".into(),
    }
}
