//! `vramcal max`: the largest micro-batch (or sequence) that fits in `--budget`, found by
//! measurement: doubling from 1 until a probe runs out of memory, then bisection. Every probe
//! runs in its own child process under the budget.

use std::process::ExitCode;

use anyhow::Context;

use super::point::run_point;
use crate::cli::MaxArgs;
use crate::error::Error;
use crate::report::{append_row, Row, RowContext, Status};
use crate::size::human;
use crate::throughput::model_flops_per_token;

/// Runs `vramcal max`.
///
/// # Errors
/// Bad input (before any probe), a probe that fails for another reason than memory, or an
/// unwritable `--out`.
pub fn run(a: &MaxArgs) -> anyhow::Result<ExitCode> {
    let (model, weights) = super::setup::resolve(&a.model)?;
    let budget = a.model.budget.ok_or_else(|| {
        Error::invalid(
            "--budget",
            "",
            "vramcal max needs a --budget, e.g. --budget 80GiB",
        )
    })?;
    crate::measure::device::check_device(&a.model.device)?;
    let by_seq = match a.axis.as_str() {
        "batch" => false,
        "seq" => true,
        other => return Err(Error::invalid("--axis", other, "expected batch or seq").into()),
    };
    if by_seq && a.seq.is_some() {
        return Err(Error::invalid(
            "--seq",
            a.seq.unwrap_or(0),
            "is what --axis seq searches: give --batch and --budget",
        )
        .into());
    }
    let fixed_seq = match (by_seq, a.seq) {
        (false, Some(s)) => s,
        (false, None) => {
            return Err(Error::invalid("--seq", "", "searching batch needs a fixed --seq").into())
        }
        (true, _) => 0,
    };
    let limit = a.limit.unwrap_or(if by_seq {
        model.config.max_position_embeddings
    } else {
        4096
    });
    if limit == 0 {
        return Err(Error::invalid("--limit", 0, "must be at least 1").into());
    }
    let axis_name = if by_seq { "seq" } else { "micro-batch" };
    let point = |x: usize| if by_seq { (a.batch, x) } else { (x, fixed_seq) };
    // Validate the extremes before any probe.
    for x in [1, limit] {
        let (b, s) = point(x);
        super::setup::train_spec(&a.model, b, s, a.how.method, a.how.checkpointing)?
            .validate(&model.config)?;
    }
    if let Some(out) = &a.out {
        crate::report::csv_out::check_writable(out)?;
    }
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let command = super::command_line();
    let probe = |x: usize| -> anyhow::Result<Row> {
        let (b, s) = point(x);
        let spec = super::setup::train_spec(&a.model, b, s, a.how.method, a.how.checkpointing)?;
        let ctx = RowContext {
            command: command.clone(),
            model: model.name.clone(),
            weights: weights.describe(),
            device: a.model.device.clone(),
            budget_bytes: Some(budget),
            model_flops_per_token: Some(model_flops_per_token(&model.config, &spec)),
        };
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
        strip_max_only(&mut args);
        args.insert(0, "measure".into());
        args.extend([
            "--batch".into(),
            b.to_string().into(),
            "--seq".into(),
            s.to_string().into(),
        ]);
        args.extend(["--record-command".into(), command.clone().into()]);
        let row = run_point(&exe, &args, &ctx, &spec, |_| {})?.row;
        if let Some(out) = &a.out {
            append_row(out, &row)?;
        }
        let peak = row.peak_bytes.map(human).unwrap_or_else(|| "-".into());
        eprintln!(
            "probe {axis_name} {x}: {} (peak {peak}) {}",
            if row.status == Some(Status::Ok) {
                "ok"
            } else if row.status == Some(Status::Oom) {
                "oom"
            } else {
                "error"
            },
            row.message
        );
        match row.status {
            Some(Status::Ok) | Some(Status::Oom) => Ok(row),
            _ => anyhow::bail!("probe {axis_name} {x} failed: {}", row.message),
        }
    };
    let mut best: Option<(usize, Row)> = None;
    let mut fail: Option<(usize, Row)> = None;
    let mut x = 1;
    loop {
        let row = probe(x)?;
        if row.status == Some(Status::Ok) {
            best = Some((x, row));
            if x >= limit {
                break;
            }
            x = (x * 2).min(limit);
        } else {
            fail = Some((x, row));
            break;
        }
    }
    if let (Some((lo, _)), Some((hi, _))) = (&best, &fail) {
        let (mut lo, mut hi) = (*lo, *hi);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let row = probe(mid)?;
            if row.status == Some(Status::Ok) {
                lo = mid;
                best = Some((mid, row));
            } else {
                hi = mid;
                fail = Some((mid, row));
            }
        }
    }
    let fixed = if by_seq {
        format!("micro-batch {}", a.batch)
    } else {
        format!("seq {fixed_seq}")
    };
    let text = match (&best, &fail) {
        (None, Some((_, f))) => format!(
            "even {axis_name} 1 does not fit in {} at {fixed} ({})\n",
            human(budget),
            f.message
        ),
        (Some((x, r)), None) => format!(
            "{axis_name} {x} fits in {} at {fixed} (peak {} bytes); it is the --limit, larger was not tried\n",
            human(budget),
            r.peak_bytes.unwrap_or(0)
        ),
        (Some((x, r)), Some((y, f))) => format!(
            "largest {axis_name} that fits in {} at {fixed}: {x} (peak {} bytes = {}); {y} does not ({})\n",
            human(budget),
            r.peak_bytes.unwrap_or(0),
            human(r.peak_bytes.unwrap_or(0)),
            f.message
        ),
        (None, None) => unreachable!("the first probe either fits or not"),
    };
    // The estimator's answer for the same search (candle profile; calibrated when
    // --calibration is given).
    let coeffs =
        crate::calibrate::coefficients(a.calibration.as_deref(), crate::spec::Profile::Candle)?;
    let fits_est = |x: usize| -> bool {
        let (b, s) = point(x);
        super::setup::train_spec(&a.model, b, s, a.how.method, a.how.checkpointing)
            .ok()
            .and_then(|spec| {
                crate::estimate::estimate(
                    &model.config,
                    &spec,
                    crate::spec::Profile::Candle,
                    &coeffs,
                )
                .ok()
            })
            .is_some_and(|e| e.peak_bytes <= budget)
    };
    let est = if !fits_est(1) {
        "estimate: even 1 does not fit".to_string()
    } else {
        let (mut lo, mut hi) = (1usize, limit + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits_est(mid) {
                lo = mid
            } else {
                hi = mid
            }
        }
        format!("estimate ({}): {axis_name} {lo}", coeffs.source)
    };
    crate::export::emit(&(text + &est + "\n"))?;
    Ok(ExitCode::SUCCESS)
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
