//! `vramcal plan`: measure a step (in a child process, with extra timed steps), then project
//! the whole fine-tune: tokens, optimizer steps, wall time, device-hours, and the MFU when the
//! device's peak FLOP/s is known. Parse (`check`) → compute (`measure_step`, `project`)
//! → render ([`crate::export::plan`]).

use std::process::ExitCode;

use anyhow::Context;

use super::setup::child::run_point;
use super::setup::{check_fits, resolve, row_context, train_spec};
use crate::cli::PlanArgs;
use crate::config::ResolvedModel;
use crate::error::Error;
use crate::report::{Row, Status};
use crate::spec::{TrainSpec, WeightsSpec};
use crate::throughput::{
    gpu, gpu_of_device, measured_mfu, plan, project_on_gpu, Gpu, Plan, DEFAULT_MFU,
};

/// Runs `vramcal plan`.
///
/// # Errors
/// Bad input, or a measurement that did not succeed.
pub fn run(a: &PlanArgs) -> anyhow::Result<ExitCode> {
    let (model, weights) = resolve(&a.model)?;
    // Not a clap conflict: clap then stops enforcing what --seq-lengths' options require.
    if let (Some(n), Some(f)) = (a.examples, &a.data.seq_lengths) {
        return Err(Error::invalid(
            "--examples",
            n,
            format!(
                "conflicts with --seq-lengths (the examples are the sequences of {})",
                f.display()
            ),
        )
        .into());
    }
    let (batch, seq, data) = super::setup::data_batch(
        &model.config,
        a.model.allow_longer,
        a.batch,
        a.seq,
        &a.data,
        false,
    )?;
    if data.is_none() && a.seq.is_none() {
        return Err(
            Error::invalid("--seq", "", "vramcal plan needs --seq or --seq-lengths").into(),
        );
    }
    let epoch = match &data {
        None => None,
        Some(d) => {
            let sampler = a.sampler.unwrap_or_default();
            if a.sampler.is_some() && d.batching != crate::data::Batching::PadLongest {
                return Err(Error::invalid(
                    "--sampler",
                    sampler.label(),
                    format!(
                        "orders sequences padded to the longest; with {} it changes nothing",
                        d.batching.label()
                    ),
                )
                .into());
            }
            Some(d.lengths.epoch(
                a.batch,
                a.model.accumulate,
                a.seq,
                d.batching,
                sampler,
                a.model.data_seed,
            )?)
        }
    };
    let spec = train_spec(&a.model, batch, seq, a.how.method, a.how.checkpointing)?;
    spec.validate(&model.config)?;
    let target = check(a, &model, &spec, epoch.as_ref())?;
    if let Some(d) = &data {
        eprintln!("{}", d.describe());
    }
    let row = measure_step(a, &model, &weights, &spec)?;
    let mut p = project(a, &model, &spec, &row, target.as_ref(), epoch.as_ref())?;
    p.peak_bytes = row.peak_bytes;
    p.batching = data.as_ref().map(|d| match d.batching {
        crate::data::Batching::PadLongest => format!(
            "{} (--sampler {})",
            d.batching.label(),
            a.sampler.unwrap_or_default().label()
        ),
        b => b.label().to_string(),
    });
    let text = if a.json {
        format!("{}\n", serde_json::to_string_pretty(&p)?)
    } else {
        crate::export::plan::text(&model.name, &spec, &row, &p)
    };
    crate::export::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Checks the options before anything is measured; returns the `--gpu` to project onto.
fn check(
    a: &PlanArgs,
    model: &ResolvedModel,
    spec: &TrainSpec,
    epoch: Option<&crate::data::Epoch>,
) -> anyhow::Result<Option<Gpu>> {
    let target = a.gpu.as_deref().map(gpu).transpose()?;
    if let Some(t) = a
        .peak_tflops
        .filter(|t| !(t.is_finite() && (1e-3..=1e6).contains(t)))
    {
        return Err(Error::invalid(
            "--peak-tflops",
            t,
            "must be between 0.001 and 1,000,000 TFLOP/s",
        )
        .into());
    }
    if a.mfu.is_some() && target.is_none() {
        return Err(Error::invalid(
            "--mfu",
            a.mfu.unwrap_or_default(),
            "goes with --gpu (the GPU to project the fine-tune onto)",
        )
        .into());
    }
    if let Some(g) = &target {
        let mfu = a.mfu.unwrap_or(DEFAULT_MFU);
        project_on_gpu(
            &plan(&model.config, spec, 1, 1, 1.0, None, None)?,
            g,
            mfu,
            "",
        )?;
    }
    let device = crate::measure::device::check_device(&a.model.device)?;
    check_fits(spec, model, device)?;
    // Validate the projection's inputs before measuring.
    plan(
        &model.config,
        spec,
        a.examples.unwrap_or(1),
        a.epochs,
        1.0,
        None,
        epoch,
    )?;
    Ok(target)
}

/// Measures the step in a child with `--timed-steps` (default 2) extra timed steps.
///
/// # Errors
/// A measurement that did not succeed.
fn measure_step(
    a: &PlanArgs,
    model: &ResolvedModel,
    weights: &WeightsSpec,
    spec: &TrainSpec,
) -> anyhow::Result<Row> {
    let command = super::command_line();
    let ctx = row_context(&a.model, model, weights, spec, command.clone());
    let timed = if a.model.timed_steps == 0 {
        2
    } else {
        a.model.timed_steps
    };
    let mut args = measure_args();
    args.extend(["--batch".into(), spec.batch.to_string().into()]);
    args.extend(["--seq".into(), spec.seq.to_string().into()]);
    args.extend(["--timed-steps".into(), timed.to_string().into()]);
    args.extend(["--record-command".into(), command.into()]);
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    eprintln!(
        "measuring {} step(s) of {} at micro-batch {} × seq {} ...",
        2 + timed,
        model.name,
        spec.batch,
        spec.seq
    );
    let row = run_point(&exe, &args, &ctx, spec, |_| {})?.row;
    if row.status != Some(Status::Ok) {
        anyhow::bail!("the measurement did not succeed: {}", row.message);
    }
    Ok(row)
}

/// This command line as `measure` arguments: without `plan`'s own options and the sizes.
fn measure_args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["measure".into()];
    // The data options: the child measures the largest micro-batch, given as --batch, --seq.
    let flags = ["--packing", "--padding-free", "--json"];
    let skip = [
        "--seq-lengths",
        "--padding",
        "--sampler",
        "--examples",
        "--epochs",
        "--peak-tflops",
        "--gpu",
        "--mfu",
        "--timed-steps",
        "--batch",
        "--micro-batch",
        "--seq",
    ];
    let mut it = std::env::args_os().skip(2).peekable();
    while let Some(x) = it.next() {
        let s = x.to_string_lossy().to_string();
        let key = s.split('=').next().unwrap_or("").to_string();
        if flags.contains(&s.as_str()) {
            continue;
        }
        if skip.contains(&key.as_str()) {
            if !s.contains('=') {
                it.next();
            }
            continue;
        }
        args.push(x);
    }
    args
}

/// The whole fine-tune projected from the measured step, and onto `target` when it is another
/// device (at `--mfu`, else PyTorch's MFU measured on that GPU kind, else the default).
fn project(
    a: &PlanArgs,
    model: &ResolvedModel,
    spec: &TrainSpec,
    row: &Row,
    target: Option<&Gpu>,
    epoch: Option<&crate::data::Epoch>,
) -> anyhow::Result<Plan> {
    let tps = row.tokens_per_second.unwrap_or(0.0);
    // The measuring device's own kind, if it is a GPU vramcal knows.
    let here = gpu_of_device(&row.device);
    let on_target = matches!((target, &here), (Some(t), Some(h)) if t.name == h.name);
    let peak = match (a.peak_tflops, &here, on_target) {
        (Some(t), _, _) => Some(t * 1e12),
        (None, Some(h), _) => Some(h.peak_bf16_flops),
        (None, None, _) => None,
    };
    let mut p = plan(
        &model.config,
        spec,
        a.examples.unwrap_or(1),
        a.epochs,
        tps,
        peak,
        epoch,
    )?;
    if let (Some(g), false) = (target, on_target) {
        let (mfu, source) = match (a.mfu, measured_mfu(g, spec)) {
            (Some(m), _) => (m, "--mfu".to_string()),
            (None, Some((m, what))) => (m, what),
            (None, None) => (
                DEFAULT_MFU,
                format!(
                    "default {DEFAULT_MFU}: vramcal has no measurement on this GPU kind; set --mfu"
                ),
            ),
        };
        p.on_gpu = Some(project_on_gpu(&p, g, mfu, &source)?);
    } else if on_target && a.mfu.is_some() {
        eprintln!("note: --mfu is not used: the step was measured on this GPU, so its own MFU is reported");
    }
    Ok(p)
}
