//! `vramcal plan`: measure a step (in a child process, with extra timed steps), then project
//! the whole fine-tune: tokens, optimizer steps, wall time, device-hours, and the MFU when the
//! device's peak FLOP/s is known.

use std::process::ExitCode;

use anyhow::Context;

use super::point::run_point;
use crate::cli::PlanArgs;
use crate::report::{RowContext, Status};
use crate::throughput::{
    gpu, gpu_of_device, model_flops_per_token, plan, project_on_gpu, DEFAULT_MFU,
};

/// PyTorch runs vramcal measured on a GPU kind (`scripts/torch_reference.py` under
/// `scripts/gpu-check.sh`: PyTorch + transformers, SDPA, bf16, `torch.optim.AdamW`), built in so
/// that an installed binary has them: (GPU, file, contents).
const TORCH_RUNS: [(&str, &str, &str); 2] = [
    (
        "h200-141gb",
        "results/h200/torch-mistral-7b-v0.1.csv",
        include_str!("../../results/h200/torch-mistral-7b-v0.1.csv"),
    ),
    (
        "h200-141gb",
        "results/h200/torch-smollm2-135m.csv",
        include_str!("../../results/h200/torch-smollm2-135m.csv"),
    ),
];

/// The MFU PyTorch reached on `g` in vramcal's reference runs of the largest model measured
/// there, for full fine-tuning or for LoRA/QLoRA as `spec` is: the median over those runs of
/// model FLOPs per token × tokens/s ÷ the datasheet peak, and a sentence saying so. `None` where
/// vramcal has no such run.
fn measured_mfu(
    g: &crate::throughput::Gpu,
    spec: &crate::spec::TrainSpec,
) -> Option<(f64, String)> {
    let lora = spec.adaptation.lora.is_some();
    let mut best: Option<(u64, String, &str, Vec<f64>)> = None;
    for (gpu, file, text) in TORCH_RUNS {
        if gpu != g.name {
            continue;
        }
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        for p in rdr
            .deserialize::<crate::calibrate::reference::ReferenceRow>()
            .flatten()
        {
            let ok = p.status.as_deref() == Some("ok");
            let Some(step) = p.step_seconds_median.filter(|&t| ok && t > 0.0) else {
                continue;
            };
            if (p.method != "full") != lora {
                continue;
            }
            let (Ok(m), Ok(s)) = (
                crate::config::resolve_model(&p.model),
                crate::calibrate::reference::reference_spec(&p),
            ) else {
                continue;
            };
            let params = m.config.param_count();
            let mfu = model_flops_per_token(&m.config, &s) * (p.batch * p.seq) as f64
                / step
                / g.peak_bf16_flops;
            match &mut best {
                Some((n, name, _, v)) if *n == params && *name == p.model => v.push(mfu),
                Some((n, _, _, _)) if *n >= params => {}
                _ => best = Some((params, p.model.clone(), file, vec![mfu])),
            }
        }
    }
    let (_, model, file, mut v) = best?;
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    Some((
        median,
        format!(
            "median of {} PyTorch {} runs of {model} that vramcal measured on this GPU kind ({file})",
            v.len(),
            if lora { "LoRA" } else { "full fine-tuning" }
        ),
    ))
}

/// Runs `vramcal plan`.
///
/// # Errors
/// Bad input, or a measurement that did not succeed.
pub fn run(a: &PlanArgs) -> anyhow::Result<ExitCode> {
    let (model, weights) = super::setup::resolve(&a.model)?;
    let spec =
        super::setup::train_spec(&a.model, a.batch, a.seq, a.how.method, a.how.checkpointing)?;
    spec.validate(&model.config)?;
    let target = a.gpu.as_deref().map(gpu).transpose()?;
    if let Some(t) = a
        .peak_tflops
        .filter(|t| !(t.is_finite() && (1e-3..=1e6).contains(t)))
    {
        return Err(crate::Error::invalid(
            "--peak-tflops",
            t,
            "must be between 0.001 and 1,000,000 TFLOP/s",
        )
        .into());
    }
    if a.mfu.is_some() && target.is_none() {
        return Err(crate::Error::invalid(
            "--mfu",
            a.mfu.unwrap_or_default(),
            "goes with --gpu (the GPU to project the fine-tune onto)",
        )
        .into());
    }
    let mfu = a.mfu.unwrap_or(DEFAULT_MFU);
    if let Some(g) = &target {
        // Validated before measuring.
        project_on_gpu(&plan(&model.config, &spec, 1, 1, 1.0, None)?, g, mfu, "")?;
    }
    let device = crate::measure::device::check_device(&a.model.device)?;
    super::setup::check_fits(&spec, &model, device)?;
    // Validate the projection's inputs before measuring.
    plan(&model.config, &spec, a.examples, a.epochs, 1.0, None)?;
    let command = super::command_line();
    let ctx = RowContext {
        command: command.clone(),
        model: model.name.clone(),
        weights: weights.describe(),
        device: a.model.device.clone(),
        budget_bytes: a.model.budget,
        model_flops_per_token: Some(model_flops_per_token(&model.config, &spec)),
    };
    let timed = if a.model.timed_steps == 0 {
        2
    } else {
        a.model.timed_steps
    };
    let mut args: Vec<std::ffi::OsString> = vec!["measure".into()];
    let skip = [
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
        if s == "--json" {
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
    args.extend([
        "--batch".into(),
        a.batch.to_string().into(),
        "--seq".into(),
        a.seq.to_string().into(),
        "--timed-steps".into(),
        timed.to_string().into(),
        "--record-command".into(),
        command.into(),
    ]);
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    eprintln!(
        "measuring {} step(s) of {} at micro-batch {} × seq {} ...",
        2 + timed,
        model.name,
        a.batch,
        a.seq
    );
    let row = run_point(&exe, &args, &ctx, &spec, |_| {})?.row;
    if row.status != Some(Status::Ok) {
        anyhow::bail!("the measurement did not succeed: {}", row.message);
    }
    let tps = row.tokens_per_second.unwrap_or(0.0);
    // The measuring device's own kind, if it is a GPU vramcal knows.
    let here = gpu_of_device(&row.device);
    let on_target = matches!((&target, &here), (Some(t), Some(h)) if t.name == h.name);
    let peak = match (a.peak_tflops, &here, on_target) {
        (Some(t), _, _) => Some(t * 1e12),
        (None, Some(h), _) => Some(h.peak_bf16_flops),
        (None, None, _) => None,
    };
    let mut p = plan(&model.config, &spec, a.examples, a.epochs, tps, peak)?;
    if let (Some(g), false) = (&target, on_target) {
        let (mfu, source) = match (a.mfu, measured_mfu(g, &spec)) {
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
    if a.json {
        crate::export::emit(&format!("{}\n", serde_json::to_string_pretty(&p)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let hms = |s: f64| {
        let s = s.round() as u64;
        format!("{}h {:02}m {:02}s", s / 3600, (s / 60) % 60, s % 60)
    };
    let mut t = format!(
        "{} on {}: {} {} | micro-batch {} × accumulate {} × seq {} | checkpointing {}\n",
        model.name,
        row.device,
        row.method,
        row.quant,
        spec.batch,
        spec.accumulate,
        spec.seq,
        row.checkpointing
    );
    t += &format!(
        "measured: {:.1} tokens/s (median of {} steady-state steps, {:.3} s each), peak {} bytes\n",
        tps,
        row.timed_steps + 1,
        row.step_seconds_median.unwrap_or(0.0),
        row.peak_bytes.unwrap_or(0)
    );
    t += &format!(
        "plan: {} examples × {} epoch(s) × {} tokens = {} tokens in {} optimizer steps\n",
        p.examples, p.epochs, p.seq, p.tokens, p.steps
    );
    t += &format!(
        "projected wall time on this device ({}): {} ({:.2} device-hours)\n",
        row.device,
        hms(p.seconds),
        p.device_hours
    );
    if let Some(g) = &p.on_gpu {
        t += &format!(
            "projected on one {}: {} ({:.2} GPU-hours) at MFU {:.2} of its {:.1} TFLOP/s dense bf16 peak (MFU: {}; the time comes from model FLOPs, not from a step measured there)\n",
            g.gpu,
            hms(g.seconds),
            g.device_hours,
            g.mfu,
            g.peak_flops / 1e12,
            g.mfu_source
        );
    }
    t += &format!(
        "model FLOPs: {:.3e} per token (6N + 12·L·H·Q·T, PaLM App. B; LoRA skips frozen weight gradients), achieved {:.3} TFLOP/s\n",
        p.model_flops_per_token,
        p.achieved_flops / 1e12
    );
    match p.mfu {
        Some(m) => {
            t += &format!(
                "MFU: {:.2} % of {:.1} TFLOP/s peak\n",
                100.0 * m,
                p.peak_flops.unwrap_or(0.0) / 1e12
            )
        }
        None => {
            t += "MFU of the measurement: give --peak-tflops (the measuring device's peak) to compute it\n"
        }
    }
    crate::export::emit(&t)?;
    Ok(ExitCode::SUCCESS)
}
