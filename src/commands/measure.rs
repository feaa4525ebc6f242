//! `vramcal measure`: one configuration, two real training steps, a phase table and a row.

use std::process::ExitCode;

use anyhow::Context;

use super::point::{run_point, PointResult};
use super::setup::{check_fits, check_save_dir, resolve, train_spec};
use crate::cli::MeasureArgs;
use crate::measure::device::check_device;
use crate::measure::{Measurement, Setup};
use crate::report::{append_row, table::phase_table, RowContext, Status};
use crate::throughput::model_flops_per_token;

/// PEFT's `print_trainable_parameters` line for a measurement.
fn trainable_line(m: &Measurement) -> String {
    let pct = if m.params > 0 {
        100.0 * m.trainable_params as f64 / m.params as f64
    } else {
        0.0
    };
    format!(
        "trainable params: {} || all params: {} || trainable%: {pct:.4}",
        m.trainable_params, m.params
    )
}

/// Runs `vramcal measure`.
///
/// # Errors
/// Bad input (before anything runs) or a failed step; in the latter case the row with the
/// phases measured so far is still written to `--out` (status `error`).
pub fn run(a: &MeasureArgs) -> anyhow::Result<ExitCode> {
    let (model, weights) = resolve(&a.model)?;
    let spec = train_spec(&a.model, a.batch, a.seq, a.how.method, a.how.checkpointing)?;
    spec.validate(&model.config)?;
    let device = check_device(&a.model.device)?;
    let budget = a.model.budget;
    check_fits(&spec, &model, device)?;
    let ctx = RowContext {
        command: a.record_command.clone().unwrap_or_else(super::command_line),
        model: model.name.clone(),
        weights: weights.describe(),
        device: a.model.device.clone(),
        budget_bytes: budget,
        model_flops_per_token: Some(model_flops_per_token(&model.config, &spec)),
    };
    if a.child {
        return super::point::child(
            a,
            &ctx,
            Setup {
                model,
                weights,
                spec,
                device: candle_core::Device::Cpu,
            },
            device,
            budget,
        );
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
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if a.record_command.is_none() {
        args.extend(["--record-command".into(), ctx.command.clone().into()]);
    }
    let PointResult {
        row,
        measurement: m,
    } = run_point(&exe, &args, &ctx, &spec, |_| {})?;
    // The row is written before anything is printed: a closed stdout cannot lose it.
    if let Some(out) = &a.out {
        append_row(out, &row)?;
    }
    if !a.quiet {
        let lora = spec
            .adaptation
            .lora
            .as_ref()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let head = format!(
            "vramcal {} | {} | {} | weights {} | {}{lora} | quant {} | checkpointing {} | attention {} | dtype {} | AdamW states {} | micro-batch {} x accumulate {} x seq {}\n{}\n{}",
            env!("CARGO_PKG_VERSION"),
            row.device,
            model.name,
            row.weights,
            row.method,
            row.quant,
            row.checkpointing,
            row.attention,
            row.dtype,
            row.optimizer_state_dtype,
            spec.batch,
            spec.accumulate,
            spec.seq,
            trainable_line(&m),
            phase_table(&m, spec.tokens()),
        );
        if a.json {
            eprintln!("{head}");
        } else {
            crate::export::emit(&head)?;
        }
    }
    if a.json {
        crate::export::emit(&format!("{}\n", serde_json::to_string(&row)?))?;
    } else if !a.quiet {
        let mut w = csv::Writer::from_writer(vec![]);
        w.serialize(&row)?;
        crate::export::emit(&String::from_utf8(w.into_inner()?)?)?;
    }
    if row.status != Some(Status::Ok) {
        anyhow::bail!(
            "measuring {} at micro-batch {} × seq {}: {}",
            model.name,
            spec.batch,
            spec.seq,
            row.message
        );
    }
    Ok(ExitCode::SUCCESS)
}
