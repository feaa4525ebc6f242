//! `vramcal sweep`: a batch × seq grid, each point measured by a child process of this binary
//! (a fresh allocator per point; a crash kills only that point), one CSV row per point.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use std::collections::HashSet;
use std::ffi::OsString;

use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{ModelArgs, SweepArgs};
use crate::commands::point::run_point;
use crate::error::Error;
use crate::measure::Measurement;
use crate::report::{append_row, Row, RowContext, Status};
use crate::spec::{Checkpointing, Method, TrainSpec};
use crate::throughput::model_flops_per_token;

/// Parses a comma-separated grid axis: positive integers, no duplicates, not empty.
///
/// # Errors
/// [`Error::InvalidValue`] naming the axis and the bad entry.
pub fn parse_axis(name: &str, items: &[String]) -> Result<Vec<usize>, Error> {
    let mut out: Vec<usize> = Vec::new();
    for t in parse_names(name, items)? {
        let v: usize = t
            .parse()
            .map_err(|_| Error::invalid(name, &t, "expected a positive integer"))?;
        if v == 0 {
            return Err(Error::invalid(name, &t, "must be at least 1"));
        }
        if out.contains(&v) {
            return Err(Error::invalid(name, &t, "listed twice"));
        }
        out.push(v);
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
fn point_args(args: &ModelArgs, method: Option<Method>) -> ModelArgs {
    let mut a = args.clone();
    if method == Some(Method::Full) {
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
    let methods: Vec<Option<Method>> = if a.method.is_empty() {
        vec![None]
    } else {
        parse_names("--method", &a.method)?
            .iter()
            .map(|m| m.parse().map(Some))
            .collect::<Result<_, _>>()?
    };
    let ckpts: Vec<Checkpointing> = parse_names("--checkpointing", &a.checkpointing)?
        .iter()
        .map(|c| c.parse())
        .collect::<Result<_, _>>()?;
    let (model, weights) = super::setup::resolve(&a.model)?;
    let device = crate::measure::device::check_device(&a.model.device)?;
    let budget = a.model.budget;
    let command = super::command_line();
    // Validate every point before running any.
    let mut grid = Vec::new();
    for m in &methods {
        for c in &ckpts {
            for &b in &batches {
                for &s in &seqs {
                    let args = point_args(&a.model, *m);
                    let spec = super::setup::train_spec(&args, b, s, *m, *c)?;
                    spec.validate(&model.config)?;
                    super::setup::check_fits(&spec, &model, device)?;
                    let ctx = RowContext {
                        command: command.clone(),
                        model: model.name.clone(),
                        weights: weights.describe(),
                        device: a.model.device.clone(),
                        budget_bytes: budget,
                        model_flops_per_token: Some(model_flops_per_token(&model.config, &spec)),
                    };
                    grid.push(Point {
                        method: *m,
                        ckpt: *c,
                        batch: b,
                        seq: s,
                        args,
                        spec,
                        ctx,
                    });
                }
            }
        }
    }
    super::setup::check_save_dir(&a.model)?;
    if a.model.lora.is_some()
        && !methods
            .iter()
            .any(|m| matches!(m, Some(Method::Lora | Method::Qlora) | None))
    {
        return Err(crate::Error::invalid(
            "--lora",
            a.model.lora.clone().unwrap_or_default(),
            "needs a lora or qlora method in --method",
        )
        .into());
    }
    let dev = a.model.device.replace(':', "");
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}-{dev}.csv", model.name)));
    crate::report::csv_out::check_writable(&out)?;
    let _lock = crate::report::csv_out::lock(&out)?;
    let total = grid.len();
    if a.resume {
        let done: HashSet<String> = crate::report::csv_out::read_rows_for_resume(&out)?
            .iter()
            .map(config_key)
            .collect();
        grid.retain(|p| {
            !done.contains(&config_key(&Row::new(
                &p.ctx,
                &p.spec,
                &Measurement::default(),
                Status::Ok,
                "",
            )))
        });
        eprintln!(
            "resuming: {} of {total} point(s) already in {}",
            total - grid.len(),
            out.display()
        );
    }
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let bar = ProgressBar::new(grid.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut failed = 0;
    let mut summary = Vec::new();
    let mut last_peak = String::from("-");
    for (i, p) in grid.iter().enumerate() {
        let label = format!(
            "{} ckpt {} batch {} seq {}",
            p.method.unwrap_or(Method::Full),
            p.ckpt,
            p.batch,
            p.seq
        );
        let args = child_args(p, i, &command);
        let res = run_point(&exe, &args, &p.ctx, &p.spec, |phase| {
            bar.set_message(format!("{label}: {phase} (last peak {last_peak} GiB)"));
        })?;
        let row = res.row;
        if row.status != Some(Status::Ok) {
            failed += 1;
        }
        append_row(&out, &row)?;
        let peak = row
            .peak_bytes
            .map(crate::size::gib)
            .unwrap_or_else(|| "-".into());
        let secs = row
            .step_seconds_median
            .map(|t| format!("{t:.2}"))
            .unwrap_or_else(|| "-".into());
        let status = status_label(row.status);
        let line = format!(
            "[{}/{}] {label}: {status} peak {peak} GiB, step {secs} s{}",
            i + 1,
            grid.len(),
            if row.message.is_empty() {
                String::new()
            } else {
                format!(": {}", row.message)
            }
        );
        // (A hidden bar, when stderr is not a terminal, would swallow println.)
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
        bar.inc(1);
        last_peak = peak.clone();
        summary.push([
            row.method.clone(),
            row.checkpointing.clone(),
            p.batch.to_string(),
            p.seq.to_string(),
            status.to_string(),
            row.peak_bytes.map(|b| b.to_string()).unwrap_or_default(),
            peak,
            secs,
            row.tokens_per_second
                .map(|t| format!("{t:.1}"))
                .unwrap_or_default(),
        ]);
    }
    bar.finish_and_clear();
    if !summary.is_empty() {
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
        for r in summary {
            t.add_row(r);
        }
        eprintln!("{t}");
    }
    eprintln!("wrote {} row(s) to {}", grid.len(), out.display());
    if failed > 0 {
        eprintln!(
            "{failed} of {} points failed (see status/message in the CSV)",
            grid.len()
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// One planned point.
struct Point {
    method: Option<Method>,
    ckpt: Checkpointing,
    batch: usize,
    seq: usize,
    args: ModelArgs,
    spec: TrainSpec,
    ctx: RowContext,
}

fn status_label(s: Option<Status>) -> &'static str {
    match s {
        Some(Status::Ok) => "ok",
        Some(Status::Oom) => "oom",
        _ => "error",
    }
}

/// The `measure` arguments of one point.
fn child_args(p: &Point, i: usize, command: &str) -> Vec<OsString> {
    let m = &p.args;
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| v.extend(items.iter().map(OsString::from));
    push(&[
        "measure",
        "--weights",
        &m.weights,
        "--dtype",
        m.dtype.as_str(),
    ]);
    push(&["--optimizer-state-dtype", m.optimizer_state_dtype.as_str()]);
    push(&[
        "--lr",
        &m.lr.to_string(),
        "--weight-decay",
        &m.weight_decay.to_string(),
    ]);
    push(&[
        "--device",
        &m.device,
        "--seed",
        &m.seed.to_string(),
        "--data-seed",
        &m.data_seed.to_string(),
    ]);
    push(&["--accumulate", &m.accumulate.to_string()]);
    push(&["--save", m.save.label(), "--attention", m.attention.label()]);
    if let Some(q) = m.quant {
        push(&["--quant", q.label()]);
    }
    push(&[
        "--timed-steps",
        &m.timed_steps.to_string(),
        "--checkpointing",
        &p.ckpt.label(),
    ]);
    push(&[
        "--batch",
        &p.batch.to_string(),
        "--seq",
        &p.seq.to_string(),
        "--record-command",
        command,
    ]);
    if let Some(name) = &m.model {
        push(&["--model", name]);
    }
    if let Some(method) = p.method {
        push(&["--method", method.label()]);
    }
    if let Some(l) = &m.lora {
        push(&["--lora", &l.to_string()]);
    }
    if let Some(b) = m.budget {
        // With its unit: a plain number below 1 MiB is refused as a likely missing unit.
        push(&["--budget", &format!("{b}B")]);
    }
    if m.double_quant {
        push(&["--double-quant"]);
    }
    if m.merge_save {
        push(&["--merge-save"]);
    }
    if m.allow_longer {
        push(&["--allow-longer"]);
    }
    if let Some(d) = &m.save_dir {
        v.push("--save-dir".into());
        v.push(d.join(format!("point-{}", i + 1)).into_os_string());
    }
    v
}

/// The configuration columns of a row: two rows with the same key measured the same point.
pub fn config_key(r: &Row) -> String {
    let opt = |v: Option<String>| v.unwrap_or_default();
    [
        r.device.clone(),
        r.model.clone(),
        r.weights.clone(),
        r.dtype.clone(),
        r.optimizer.clone(),
        r.optimizer_state_dtype.clone(),
        r.method.clone(),
        opt(r.lora_r.map(|x| x.to_string())),
        opt(r.lora_alpha.map(|x| x.to_string())),
        opt(r.lora_dropout.map(|x| x.to_string())),
        r.lora_targets.clone(),
        r.quant.clone(),
        r.checkpointing.clone(),
        // Empty in rows written before the column existed, by another model: never a match.
        r.attention.clone(),
        r.batch.to_string(),
        r.seq.to_string(),
        r.micro_batch.to_string(),
        r.accumulate.to_string(),
        r.save.clone(),
        opt(r.budget_bytes.map(|x| x.to_string())),
    ]
    .join("|")
}
