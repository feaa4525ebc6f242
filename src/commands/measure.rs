//! `vramcal measure`: one configuration, two real training steps, a phase table and a row.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;

use crate::cli::{MeasureArgs, ModelArgs};
use crate::commands::point::{run_point, send, ChildLine, PointResult};
use crate::config::{resolve_model, ConfigSource, ResolvedModel};
use crate::error::Error;
use crate::measure::{
    failure_hint, is_device_oom, measure_with, Event, HostProbe, Measurement, MemoryProbe, Options,
    Setup,
};
use crate::model::gguf::{config_from_gguf, read_content};
use crate::model::lora::LoraConfig;
use crate::model::save::SaveMode;
use crate::model::weights::WeightsSpec;
use crate::model::{Adaptation, Checkpointing, Quant};
use crate::report::{append_row, table::phase_table, Row, RowContext, Status};
use crate::spec::{gib, host_memory_bytes, parse_dtype, TrainSpec};
use crate::throughput::model_flops_per_token;

/// Resolves `--model` and `--weights` into a model configuration and a weights source.
///
/// # Errors
/// Unknown or malformed model, missing weights, a GGUF whose tensors do not fit the model.
pub fn resolve(args: &ModelArgs) -> anyhow::Result<(ResolvedModel, WeightsSpec)> {
    let weights = WeightsSpec::parse(&args.weights, args.seed)?;
    let from_weights = match &weights {
        WeightsSpec::Gguf(p) => {
            let (content, _) = read_content(p)?;
            let config = config_from_gguf(&content, p)?;
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some(ResolvedModel {
                name,
                config,
                source: ConfigSource::File(p.clone()),
            })
        }
        WeightsSpec::Safetensors(dir) if dir.join("config.json").is_file() => {
            Some(resolve_model(&dir.display().to_string())?)
        }
        WeightsSpec::HfCache(id) => {
            crate::model::weights::hf_cache_dir(id)?;
            Some(resolve_model(id)?)
        }
        _ => None,
    };
    let model = match (&args.model, from_weights) {
        (Some(name), Some(w)) => {
            let m = resolve_model(name)?;
            if m.config.param_shapes() != w.config.param_shapes() {
                let diff = m
                    .config
                    .param_shapes()
                    .into_iter()
                    .zip(w.config.param_shapes())
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| {
                        format!(
                            "{} is {:?} in the model, {:?} in the weights",
                            a.name, a.shape, b.shape
                        )
                    })
                    .unwrap_or_else(|| "they have different numbers of tensors".into());
                anyhow::bail!(
                    "--weights {} do not match --model {name}: {diff}",
                    args.weights
                );
            }
            m
        }
        (Some(name), None) => resolve_model(name)?,
        (None, Some(w)) => w,
        (None, None) => anyhow::bail!("--model is required with --weights {}", args.weights),
    };
    // Bad weights are bad input: find them before anything is measured or written.
    let mut src = crate::model::weights::open_source(&weights)?;
    crate::model::weights::check_all(src.as_mut(), &model.config, Path::new(&args.weights))?;
    Ok((model, weights))
}

/// A checked `--device` value, not yet opened. Parents (measure, sweep, max, plan) only
/// check it; the measuring child opens it, so no other process holds a CUDA context that the
/// device-wide counter would see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The host CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl DeviceChoice {
    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        *self == DeviceChoice::Cpu
    }
}

const DEVICE_SYNTAX: &str = "expected `cpu`, `cuda` or `cuda:N` (N a GPU index, 0 to 9999)";

/// Parses and checks `--device` without opening it: the syntax, the `cuda` feature, that the
/// driver sees the device (no context is created), and that the CPU probe can count.
///
/// # Errors
/// [`Error::Device`] for an unknown device, CUDA in a build without the `cuda` feature, an
/// ordinal the machine does not have, or no usable driver; [`Error::Probe`] when the counting
/// allocator is not installed.
pub fn parse_device(s: &str) -> Result<DeviceChoice, Error> {
    if s == "cpu" {
        HostProbe::new()?;
        return Ok(DeviceChoice::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .filter(|n| {
                !n.is_empty()
                    && n.len() <= 4
                    && n.bytes().all(|c| c.is_ascii_digit())
                    && (n.len() == 1 || !n.starts_with('0'))
            })
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Device {
                device: s.into(),
                reason: DEVICE_SYNTAX.into(),
            })?,
        None => {
            return Err(Error::Device {
                device: s.into(),
                reason: DEVICE_SYNTAX.into(),
            })
        }
    };
    check_cuda(s, ordinal)?;
    Ok(DeviceChoice::Cuda(ordinal))
}

#[cfg(feature = "cuda")]
fn check_cuda(s: &str, ordinal: usize) -> Result<(), Error> {
    let n = crate::measure::cuda::device_count().map_err(|e| Error::Device {
        device: s.into(),
        reason: format!(
            "{}; this machine has no usable NVIDIA GPU and driver (`nvidia-smi` should list one): use --device cpu",
            match e {
                Error::Device { reason, .. } => reason,
                other => other.to_string(),
            }
        ),
    })?;
    if ordinal >= n {
        return Err(Error::Device {
            device: s.into(),
            reason: match n {
                0 => "the driver sees no CUDA device: use --device cpu".into(),
                _ => format!(
                    "this machine has {n} CUDA device(s), cuda:0 to cuda:{}",
                    n - 1
                ),
            },
        });
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check_cuda(s: &str, _ordinal: usize) -> Result<(), Error> {
    Err(Error::Device {
        device: s.into(),
        reason: "this vramcal was built without the `cuda` feature: rebuild with `cargo build --release --features cuda` (README, \"Building with CUDA\"), or use --device cpu".into(),
    })
}

/// Opens a checked device (in the measuring process only).
///
/// # Errors
/// [`Error::Device`] when CUDA cannot create a context on it.
pub fn open_device(d: DeviceChoice) -> Result<Device, Error> {
    match d {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| Error::Device {
            device: format!("cuda:{n}"),
            reason: format!(
                "cannot open: {e} (check the GPU with nvidia-smi and that its driver supports CUDA 13.0)"
            ),
        }),
    }
}

/// The memory probe for an opened `device`; `blocker_bytes` (the `--budget` blocker on a GPU)
/// are left out of the device counter; on the CPU, `budget` caps the bytes allocated above the
/// baseline (the probe applies it when the measurement begins).
///
/// # Errors
/// [`Error::Probe`] when the counting allocator is not installed or the CUDA driver refuses a
/// query.
pub fn probe_for(
    device: &Device,
    blocker_bytes: u64,
    budget: Option<u64>,
) -> Result<Box<dyn MemoryProbe>, Error> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let _ = budget;
            Ok(Box::new(crate::measure::cuda::CudaProbe::new(
                d,
                blocker_bytes,
            )?))
        }
        _ => {
            let _ = blocker_bytes;
            Ok(Box::new(HostProbe::with_budget(budget)?))
        }
    }
}

/// Builds the adaptation (full, LoRA, QLoRA) from `--method`, `--lora`, `--quant`,
/// `--double-quant`.
///
/// # Errors
/// Unknown method or quantization, malformed `--lora`, `--lora` with `--method full`.
pub fn adaptation(args: &ModelArgs, method: Option<&str>) -> anyhow::Result<Adaptation> {
    let quant = match args.quant.as_deref() {
        None | Some("none") => Quant::None,
        Some("nf4") => Quant::Nf4 {
            double: args.double_quant,
        },
        Some(q) => return Err(Error::invalid("--quant", q, "expected none or nf4").into()),
    };
    let method = method.unwrap_or(if args.lora.is_some() { "lora" } else { "full" });
    let lora = || -> anyhow::Result<LoraConfig> {
        Ok(match &args.lora {
            Some(s) => LoraConfig::parse(s)?,
            None => LoraConfig::default(),
        })
    };
    let ad = match method {
        "full" => {
            if args.lora.is_some() {
                return Err(Error::invalid(
                    "--lora",
                    args.lora.clone().unwrap_or_default(),
                    "needs --method lora or qlora",
                )
                .into());
            }
            Adaptation {
                lora: None,
                quant,
                seed: args.seed,
            }
        }
        "lora" => Adaptation {
            lora: Some(lora()?),
            quant,
            seed: args.seed,
        },
        "qlora" => {
            if args.quant.as_deref() == Some("none") {
                return Err(Error::invalid(
                    "--quant",
                    "none",
                    "conflicts with --method qlora (a 4-bit base)",
                )
                .into());
            }
            Adaptation {
                lora: Some(lora()?),
                quant: Quant::Nf4 {
                    double: args.double_quant,
                },
                seed: args.seed,
            }
        }
        m => return Err(Error::invalid("--method", m, "expected full, lora or qlora").into()),
    };
    if args.double_quant && !matches!(ad.quant, Quant::Nf4 { .. }) {
        return Err(Error::invalid(
            "--double-quant",
            "",
            "goes with a 4-bit base (--method qlora or --quant nf4)",
        )
        .into());
    }
    Ok(ad)
}

/// Builds the training spec from the CLI arguments.
///
/// # Errors
/// Bad dtype names, method, LoRA, checkpointing or save settings.
pub fn train_spec(
    args: &ModelArgs,
    batch: usize,
    seq: usize,
    method: Option<&str>,
    checkpointing: &str,
) -> anyhow::Result<TrainSpec> {
    let mut spec = TrainSpec::new(batch, seq);
    spec.adaptation = adaptation(args, method)?;
    spec.checkpointing = Checkpointing::parse(checkpointing)?;
    spec.accumulate = args.accumulate;
    spec.save = SaveMode::parse(&args.save)?;
    if args.merge_save {
        if spec.save == SaveMode::Adapter {
            return Err(Error::invalid("--merge-save", "", "conflicts with --save adapter").into());
        }
        spec.save = SaveMode::Merged;
    }
    spec.dtype = parse_dtype(&args.dtype).context("--dtype")?;
    spec.state_dtype =
        parse_dtype(&args.optimizer_state_dtype).context("--optimizer-state-dtype")?;
    spec.adamw.lr = args.lr;
    spec.adamw.weight_decay = args.weight_decay;
    spec.allow_longer = args.allow_longer;
    spec.attention = crate::model::Attention::parse(&args.attention)?;
    spec.data_seed = args.data_seed;
    Ok(spec)
}

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
    let spec = train_spec(
        &a.model,
        a.batch,
        a.seq,
        a.how.method.as_deref(),
        &a.how.checkpointing,
    )?;
    spec.validate(&model.config)?;
    let device = parse_device(&a.model.device)?;
    let budget = budget(&a.model)?;
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
        let device = open_device(device)?;
        // The budget caps the counting allocator on the CPU; on a GPU a blocker allocation
        // leaves only the budget free on the device (held until the child exits).
        #[cfg(feature = "cuda")]
        let blocker = match (&device, budget) {
            (Device::Cuda(d), Some(b)) => Some(crate::measure::cuda::Blocker::leave_free(d, b)?),
            _ => None,
        };
        #[cfg(feature = "cuda")]
        let probe = probe_for(&device, blocker.as_ref().map_or(0, |b| b.bytes), budget)?;
        #[cfg(not(feature = "cuda"))]
        let probe = probe_for(&device, 0, budget)?;
        return run_child(
            a,
            &ctx,
            Setup {
                model,
                weights,
                spec,
                device,
            },
            probe.as_ref(),
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
            super::emit(&head)?;
        }
    }
    if a.json {
        super::emit(&format!("{}\n", serde_json::to_string(&row)?))?;
    } else if !a.quiet {
        let mut w = csv::Writer::from_writer(vec![]);
        w.serialize(&row)?;
        super::emit(&String::from_utf8(w.into_inner()?)?)?;
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

/// The measuring child: runs the protocol in this process under the probe's budget, streaming its
/// progress and then the row as JSON lines on stdout.
fn run_child(
    a: &MeasureArgs,
    ctx: &RowContext,
    setup: Setup,
    probe: &dyn MemoryProbe,
) -> anyhow::Result<ExitCode> {
    die_with_parent();
    let mut m = Measurement::default();
    let mut on_event = |e: Event<'_>| {
        let line = match e {
            Event::Started(p) => ChildLine::Started(p.to_string()),
            Event::Finished(m) => ChildLine::Progress(Box::new(m.clone())),
        };
        let _ = send(&line);
    };
    let opts = Options {
        save_dir: a.model.save_dir.as_deref(),
        timed_steps: a.model.timed_steps,
        on_event: Some(&mut on_event),
    };
    let result = measure_with(&setup, probe, &mut m, opts);
    crate::measure::alloc::set_limit(None);
    let (status, message) = match &result {
        Ok(()) => (Status::Ok, String::new()),
        Err(e) => {
            let msg = e.to_string();
            let status = if is_device_oom(&msg) {
                Status::Oom
            } else {
                Status::Error
            };
            match failure_hint(&msg) {
                Some(h) => (status, format!("{msg} ({h})")),
                None => (status, msg),
            }
        }
    };
    let row = Row::new(ctx, &setup.spec, &m, status, &message);
    // The complete measurement (step times and losses come after the last phase event).
    send(&ChildLine::Progress(Box::new(m)))?;
    send(&ChildLine::Row(Box::new(row)))?;
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Makes the kernel kill this measuring child when its parent dies (`kill -9` of a sweep),
/// so it never keeps a large point running beside a resumed sweep (Linux `PR_SET_PDEATHSIG`).
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl with PR_SET_PDEATHSIG only sets a signal number for this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        // The parent may already be gone (re-parented to init or a subreaper).
        if std::os::unix::process::parent_id() == 1 {
            std::process::exit(3);
        }
    }
}

/// Checks `--save-dir` before anything runs: it needs a save, and must be (or become) a folder.
///
/// # Errors
/// `--save-dir` without `--save`, a path that is a file, or a folder that cannot be created.
pub fn check_save_dir(args: &ModelArgs) -> anyhow::Result<()> {
    let Some(d) = &args.save_dir else {
        return Ok(());
    };
    if args.save == "none" && !args.merge_save {
        return Err(Error::invalid(
            "--save-dir",
            d.display(),
            "needs --save adapter|merged (or --merge-save)",
        )
        .into());
    }
    if d.exists() && !d.is_dir() {
        return Err(Error::invalid("--save-dir", d.display(), "exists and is not a folder").into());
    }
    std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    Ok(())
}

/// Parses `--budget`.
///
/// # Errors
/// A malformed size.
pub fn budget(args: &ModelArgs) -> anyhow::Result<Option<u64>> {
    Ok(match &args.budget {
        Some(b) => Some(crate::size::parse_size("--budget", b)?),
        None => None,
    })
}

/// Rejects a point that cannot fit in this machine's memory (CPU): weights, gradients, AdamW
/// states and logits alone exceed it. Activations come on top, so passing is no promise.
///
/// # Errors
/// When the lower bound exceeds the host memory.
pub fn check_fits(
    spec: &TrainSpec,
    model: &ResolvedModel,
    device: DeviceChoice,
) -> anyhow::Result<()> {
    if device.is_cpu() {
        if let (Some(need), Some(have)) = (spec.min_bytes(&model.config), host_memory_bytes()) {
            if need > have {
                // Name the adapters too: a huge rank can be what does not fit.
                let lora = match &spec.adaptation.lora {
                    Some(l) => format!("LoRA {l} with "),
                    None => String::new(),
                };
                anyhow::bail!(
                    "{lora}micro-batch {} × seq {} of {} needs at least {} GiB (weights, gradients, AdamW states, a logits chunk, one hidden state per layer), more than this machine's {} GiB",
                    spec.batch, spec.seq, model.name, gib(need), gib(have)
                );
            }
        }
    }
    Ok(())
}
