//! `vramcal max`: the largest micro-batch (or sequence) that fits in `--budget`, found by
//! measurement: doubling from 1 until a probe runs out of memory, then bisection. Every probe
//! runs in its own child process under the budget. Parse (`search`) → compute (the probes,
//! and the estimator's answer for the same search) → render ([`crate::export::max`]).

use std::process::ExitCode;

use anyhow::Context;

use super::setup::child::run_point;
use super::setup::{resolve, row_context, train_spec};
use crate::cli::MaxArgs;
use crate::config::ResolvedModel;
use crate::error::Error;
use crate::export::max::{Found, Search};
use crate::report::{append_row, Row, Status};
use crate::size::human;
use crate::spec::{Axis, Profile, TrainSpec, WeightsSpec};

/// Runs `vramcal max`.
///
/// # Errors
/// Bad input (before any probe), a probe that fails for another reason than memory, or an
/// unwritable `--out`.
pub fn run(a: &MaxArgs) -> anyhow::Result<ExitCode> {
    let (model, weights) = resolve(&a.model)?;
    let q = search(a, &model)?;
    if let Some(out) = &a.out {
        crate::report::csv_out::check_writable(out)?;
    }
    let found = bisect(q.limit, |x| probe(a, &q, &model, &weights, x))?;
    let estimated = estimated_max(a, &q, &model)?;
    let text = crate::export::max::text(&q, &found, &estimated);
    crate::export::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Checks the search: a budget, one fixed size and a limit, and specs valid at both ends.
fn search(a: &MaxArgs, model: &ResolvedModel) -> anyhow::Result<Search> {
    let budget = a.model.budget.ok_or_else(|| {
        Error::invalid(
            "--budget",
            "",
            "vramcal max needs a --budget, e.g. --budget 80GiB",
        )
    })?;
    crate::measure::device::check_device(&a.model.device)?;
    let fixed = match (a.axis, a.seq) {
        (Axis::Seq, Some(s)) => {
            return Err(Error::invalid(
                "--seq",
                s,
                "is what --axis seq searches: give --batch and --budget",
            )
            .into())
        }
        (Axis::Seq, None) => a.batch,
        (Axis::Batch, Some(_)) if a.batch != 1 => {
            return Err(Error::invalid(
                "--batch",
                a.batch,
                "is what --axis batch searches: give --seq and --budget",
            )
            .into())
        }
        (Axis::Batch, Some(s)) => s,
        (Axis::Batch, None) => {
            return Err(Error::invalid("--seq", "", "searching batch needs a fixed --seq").into())
        }
    };
    let limit = a.limit.unwrap_or(match a.axis {
        Axis::Seq => model.config.max_position_embeddings,
        Axis::Batch => 4096,
    });
    if limit == 0 {
        return Err(Error::invalid("--limit", 0, "must be at least 1").into());
    }
    let q = Search {
        axis: a.axis,
        fixed,
        limit,
        budget,
    };
    // Validate the extremes before any probe.
    for x in [1, limit] {
        let spec = spec_at(a, &q, x)?;
        spec.validate(&model.config)?;
    }
    Ok(q)
}

/// The spec of the point at size `x`.
fn spec_at(a: &MaxArgs, q: &Search, x: usize) -> anyhow::Result<TrainSpec> {
    let (b, s) = q.point(x);
    let spec = train_spec(&a.model, b, s, a.how.method, a.how.checkpointing)?;
    super::setup::check_measurable(&spec)?;
    Ok(spec)
}

/// The largest `x` in `1..=limit` for which `fits(x)` holds, by doubling from 1 and then
/// bisection (`fits` must be monotone): the last size that fit and the first that did not.
///
/// # Errors
/// The first error of `fits`.
fn bisect(
    limit: usize,
    mut fits: impl FnMut(usize) -> anyhow::Result<Row>,
) -> anyhow::Result<Found> {
    let mut found = Found::default();
    let mut x = 1;
    loop {
        let row = fits(x)?;
        if row.status == Some(Status::Ok) {
            found.best = Some((x, row));
            if x >= limit {
                break;
            }
            x = (x * 2).min(limit);
        } else {
            found.fail = Some((x, row));
            break;
        }
    }
    if let (Some((lo, _)), Some((hi, _))) = (&found.best, &found.fail) {
        let (mut lo, mut hi) = (*lo, *hi);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let row = fits(mid)?;
            if row.status == Some(Status::Ok) {
                lo = mid;
                found.best = Some((mid, row));
            } else {
                hi = mid;
                found.fail = Some((mid, row));
            }
        }
    }
    Ok(found)
}

/// Measures size `x` in a child under the budget, appends its row to `--out`, prints one line.
fn probe(
    a: &MaxArgs,
    q: &Search,
    model: &ResolvedModel,
    weights: &WeightsSpec,
    x: usize,
) -> anyhow::Result<Row> {
    let (b, s) = q.point(x);
    let spec = spec_at(a, q, x)?;
    let command = super::command_line();
    let mut ctx = row_context(&a.model, model, weights, &spec, command.clone());
    ctx.budget_bytes = Some(q.budget);
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    strip_max_only(&mut args);
    args.insert(0, "measure".into());
    args.extend(["--batch".into(), b.to_string().into()]);
    args.extend(["--seq".into(), s.to_string().into()]);
    args.extend(["--record-command".into(), command.into()]);
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let row = run_point(&exe, &args, &ctx, &spec, |_| {})?.row;
    if let Some(out) = &a.out {
        append_row(out, &row)?;
    }
    let peak = row.peak_bytes.map(human).unwrap_or_else(|| "-".into());
    let status = match row.status {
        Some(Status::Ok) => "ok",
        Some(Status::Oom) => "oom",
        _ => "error",
    };
    let noun = q.axis.noun();
    eprintln!("probe {noun} {x}: {status} (peak {peak}) {}", row.message);
    match row.status {
        Some(Status::Ok) | Some(Status::Oom) => Ok(row),
        _ => anyhow::bail!("probe {noun} {x} failed: {}", row.message),
    }
}

/// The estimator's answer for the same search (candle profile; calibrated with
/// `--calibration`): the largest size whose estimate fits, `None` when even 1 does not, and
/// the coefficients' source.
fn estimated_max(
    a: &MaxArgs,
    q: &Search,
    model: &ResolvedModel,
) -> anyhow::Result<(Option<usize>, String)> {
    let coeffs = crate::calibrate::coefficients(a.calibration.as_deref(), Profile::Candle)?;
    let fits = |x: usize| -> bool {
        spec_at(a, q, x)
            .ok()
            .and_then(|spec| {
                crate::estimate::estimate(&model.config, &spec, Profile::Candle, &coeffs).ok()
            })
            .is_some_and(|e| e.peak_bytes <= q.budget)
    };
    if !fits(1) {
        return Ok((None, coeffs.source));
    }
    let (mut lo, mut hi) = (1usize, q.limit + 1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid
        } else {
            hi = mid
        }
    }
    Ok((Some(lo), coeffs.source))
}

/// Removes the options of `max` that `measure` does not take.
fn strip_max_only(args: &mut Vec<std::ffi::OsString>) {
    let with_value = [
        "--axis",
        "--limit",
        "--out",
        "--calibration",
        "--batch",
        "--micro-batch",
        "--seq",
    ];
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy().to_string();
        let key = a.split('=').next().unwrap_or("").to_string();
        if with_value.contains(&key.as_str()) {
            let n = if a.contains('=') { 1 } else { 2 };
            args.drain(i..(i + n).min(args.len()));
        } else {
            i += 1;
        }
    }
}
