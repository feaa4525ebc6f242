//! `vramcal measure`: one configuration, two real training steps, a phase table and a row.

use std::process::ExitCode;

use anyhow::Context;

use super::setup::child::{run_point, PointResult};
use super::setup::{check_save_dir, prepare, Prepared};
use crate::cli::MeasureArgs;
use crate::export::measure::Verbosity;
use crate::report::{append_row, Status};

/// Runs `vramcal measure`: checks everything, then measures the point in a child process (or,
/// as that child, measures it here) and prints the result.
///
/// # Errors
/// Bad input (before anything runs) or a failed step; in the latter case the row with the
/// phases measured so far is still written to `--out` (status `error`).
pub fn run(a: &MeasureArgs) -> anyhow::Result<ExitCode> {
    let (batch, seq) = match &a.data.seq_lengths {
        None => (a.batch, a.seq.unwrap_or(0)),
        Some(_) => {
            let (model, _) = super::setup::resolve(&a.model)?;
            let (b, s, data) = super::setup::data_batch(
                &model.config,
                a.model.allow_longer,
                a.batch,
                a.seq,
                &a.data,
                false,
            )?;
            if let (Some(d), false, false) = (&data, a.child, a.quiet) {
                eprintln!("{}", d.describe());
            }
            (b, s)
        }
    };
    let mut p = prepare(
        &a.model,
        (batch, seq),
        a.how.method,
        a.how.checkpointing,
        a.record_command.clone(),
    )?;
    if let Some(shard) = a.shard {
        let s = crate::spec::Sharding {
            rank: a.rank.unwrap_or(0),
            ..crate::spec::Sharding::new(shard, a.world_size.unwrap_or(0))
        };
        crate::measure::sharded::check(&s, &p.setup.model.config, &p.setup.spec, p.device)?;
        p.setup.sharding = Some(s);
        p.ctx.sharding = Some(s);
    }
    if a.child {
        return super::setup::child::child(a, &p.ctx, p.setup, p.device, a.model.budget);
    }
    check_save_dir(&a.model)?;
    // Only now, with all input checked, may the output file be created; a sweep writing the
    // same file holds its lock, and so does this measurement until its row is written.
    let _lock = match &a.out {
        Some(out) => {
            crate::report::csv_out::check_writable(out)?;
            Some(crate::report::csv_out::lock(out)?)
        }
        None => None,
    };
    let PointResult {
        row,
        measurement: m,
    } = measure_in_child(a, &p)?;
    // The row is written before anything is printed: a closed stdout cannot lose it.
    if let Some(out) = &a.out {
        append_row(out, &row)?;
    }
    let verbosity = Verbosity {
        json: a.json,
        quiet: a.quiet,
    };
    let (model, spec) = (&p.setup.model.name, &p.setup.spec);
    crate::export::measure::emit_result(&row, &m, spec, model, verbosity)?;
    if row.status != Some(Status::Ok) {
        anyhow::bail!(
            "measuring {model} at micro-batch {} × seq {}: {}",
            spec.batch,
            spec.seq,
            row.message
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs this command line again as `--child` and collects the point.
fn measure_in_child(a: &MeasureArgs, p: &Prepared) -> anyhow::Result<PointResult> {
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if a.record_command.is_none() {
        args.extend(["--record-command".into(), p.ctx.command.clone().into()]);
    }
    run_point(&exe, &args, &p.ctx, &p.setup.spec, |_| {})
}
