//! `vramcal estimate`: the itemized prediction, reference formulas, and a fits-on verdict with
//! the cheapest changes that make a configuration fit. Parse ([`query`]) → compute
//! ([`answer`]) → render ([`crate::export::estimate`]).

use std::process::ExitCode;

use crate::calibrate::coefficients;
use crate::cli::EstimateArgs;
use crate::config::{resolve_model, ResolvedModel};
use crate::error::Error;
use crate::estimate::{advice, estimate_sharded, multi, references, Coefficients};
use crate::export::estimate::Answer;
use crate::spec::{Attention, Profile, SaveMode, Sharding, TrainSpec};
use crate::throughput::gpu;

/// One `vramcal estimate` question, checked.
pub struct Query {
    /// The model.
    pub model: ResolvedModel,
    /// The configuration.
    pub spec: TrainSpec,
    /// The stack to predict.
    pub profile: Profile,
    /// Its coefficients.
    pub coefficients: Coefficients,
    /// The memory to fit in: a GPU's name or `--budget`, and bytes.
    pub budget: Option<(String, u64)>,
    /// `--shard` over `--gpus`.
    pub sharding: Option<Sharding>,
    /// `--max-memory` per device (bytes), with `--device-map`.
    pub max_memory: Option<Vec<u64>>,
    /// The largest micro-batch of `--seq-lengths`, where given.
    pub data: Option<crate::data::WorstBatch>,
    /// `--measured`: results files searched for rows of this configuration.
    pub measured: Vec<std::path::PathBuf>,
}

/// Runs `vramcal estimate`.
///
/// # Errors
/// Bad input: unknown model or GPU, budget without unit, a calibration table for another
/// profile or version, options of a measurement, contradicting options.
pub fn run(a: &EstimateArgs) -> anyhow::Result<ExitCode> {
    let q = query(a)?;
    let x = answer(q)?;
    let text = if a.json {
        crate::export::estimate::json(&x)?
    } else {
        crate::export::estimate::text(&x)
    };
    crate::export::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// `vramcal estimate <args> --json` as a function: the JSON text the command prints, or the one
/// line (without `error: `) it prints on failure. `args` are the command's arguments after
/// `estimate` (`["--model", "mistral-7b-v0.1", "--seq", "1024"]`). The Python package's
/// `vramcal.estimate` calls this, so both answer with the same numbers.
///
/// # Errors
/// The line of a refused command line or of a failed estimate.
pub fn json_from_args(args: &[String]) -> Result<String, String> {
    json_for_options(args).map_err(|e| e.message)
}

/// Why [`json_for_options`] refused: the line `vramcal estimate` prints (without `error: `)
/// and, where the error belongs to one option, that option (`--seq`), so that a form can show
/// the message next to its field.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionError {
    /// The option at fault (`--batch`), as the command line spells it; `--model` for a
    /// `config.json` that cannot be used; `None` for errors of the whole setup.
    pub option: Option<String>,
    /// The one-line message.
    pub message: String,
}

/// [`json_from_args`] with the option at fault named ([`OptionError`]): what the web page
/// (`web/`) calls.
///
/// # Errors
/// As [`json_from_args`].
pub fn json_for_options(args: &[String]) -> Result<String, OptionError> {
    use clap::Parser;
    let argv = ["vramcal", "estimate"]
        .into_iter()
        .map(String::from)
        .chain(args.iter().cloned())
        .chain(std::iter::once("--json".to_string()));
    let cli = crate::cli::Cli::try_parse_from(argv).map_err(|e| OptionError {
        option: crate::cli::setup_error(&e).and_then(option_of).or_else(|| {
            match e.get(clap::error::ContextKind::InvalidArg) {
                Some(clap::error::ContextValue::String(s)) => {
                    s.split_whitespace().next().map(str::to_string)
                }
                Some(clap::error::ContextValue::Strings(v)) => v
                    .first()
                    .and_then(|s| s.split_whitespace().next())
                    .map(str::to_string),
                _ => None,
            }
        }),
        message: crate::cli::error_line(&e),
    })?;
    let crate::cli::Command::Estimate(a) = cli.command else {
        return Err(OptionError {
            option: None,
            message: "not an estimate".into(),
        });
    };
    let failed = |e: anyhow::Error| OptionError {
        option: e.downcast_ref::<Error>().and_then(option_of),
        message: format!("{e:#}"),
    };
    let x = query(&a).and_then(answer).map_err(failed)?;
    crate::export::estimate::json(&x).map_err(failed)
}

/// The option a library error belongs to: the one an invalid value names, `--model` for a
/// model configuration that cannot be used, `--seq` for a sequence past the model's context.
fn option_of(e: &Error) -> Option<String> {
    match e {
        Error::InvalidValue { what, .. } if what.starts_with("--") => what
            .split_whitespace()
            .next()
            .map(|s| s.trim_end_matches(':').to_string()),
        Error::Config { .. } | Error::UnknownArchitecture { .. } | Error::UnknownModel { .. } => {
            Some("--model".into())
        }
        Error::SeqTooLong { .. } => Some("--seq".into()),
        _ => None,
    }
}

/// Checks the arguments and builds the question, refusing (never ignoring) options that do not
/// apply.
///
/// # Errors
/// As [`run`].
pub fn query(a: &EstimateArgs) -> anyhow::Result<Query> {
    let name = a
        .model
        .model
        .clone()
        .ok_or_else(|| Error::invalid("--model", "", "vramcal estimate needs --model"))?;
    let model = resolve_model(&name)?;
    let (batch, seq, data) = super::setup::data_batch(
        &model.config,
        a.model.allow_longer,
        a.batch,
        a.seq,
        &a.data,
        a.profile != Profile::Candle,
    )?;
    let mut spec =
        super::setup::train_spec(&a.model, batch, seq, a.how.method, a.how.checkpointing)?;
    spec.allow_longer = a.model.allow_longer
        // Padding-free rows restart their positions at every sequence.
        || data.as_ref().is_some_and(|d| d.batching == crate::data::Batching::PaddingFree);
    spec.validate(&model.config)?;
    // What attention keeps is the profile's for the torch stacks: a contradicting --attention is
    // refused rather than ignored.
    if a.profile == Profile::TorchSdpa && spec.attention == Attention::Eager {
        return Err(Error::invalid(
            "--attention",
            "eager",
            "the torch-sdpa profile predicts SDPA attention: give --profile torch-eager for transformers' eager attention",
        )
        .into());
    }
    if let Some(at) = a.model.attention.filter(|&x| x != Attention::Eager) {
        if a.profile == Profile::TorchEager {
            return Err(Error::invalid(
                "--attention",
                at,
                "the torch-eager profile predicts eager attention: give --profile torch-sdpa for SDPA or flash-attention-2",
            )
            .into());
        }
    }
    // The candle profile is vramcal's own step: what it cannot run, it cannot predict either.
    if a.profile == Profile::Candle {
        super::setup::check_measurable(&spec)?;
    }
    let coefficients = coefficients(a.calibration.as_deref(), a.profile)?;
    // A CPU table's torch profile predicts PyTorch on the CPU (its AdamW steps one tensor at a
    // time by default), as the estimator does with it.
    spec.torch_cpu = coefficients.cpu && a.profile != Profile::Candle;
    refuse_measurement_options(a)?;
    let sharding = {
        let s = sharding(a)?;
        // `--profile candle` estimates vramcal's own step, as a simulated rank runs it:
        // what `measure --shard` refuses is refused here too.
        if let (Some(s), Profile::Candle) = (&s, a.profile) {
            crate::measure::sharded::check(
                s,
                &model.config,
                &spec,
                crate::spec::DeviceChoice::Cpu,
            )?;
        }
        if let (Some(s), true) = (&s, a.device_map) {
            return Err(Error::invalid(
                    "--device-map",
                    format!("with --shard {}", s.shard),
                    "places whole layers for loading or inference, not data-parallel training: give one or the other",
                )
                .into());
        }
        s
    };
    Ok(Query {
        model,
        spec,
        profile: a.profile,
        coefficients,
        budget: budget(a)?,
        sharding,
        max_memory: max_memory(a)?,
        data,
        measured: a.measured.clone(),
    })
}

/// With `--seq-lengths` padded (to the longest or to `--seq`) under a torch profile: the same
/// data in padding-free micro-batches (transformers' `DataCollatorWithFlattening`), whose
/// largest holds only the batch's longest sequences' real tokens, as a fix with its estimate.
/// Packing is not offered: its rows are `--seq` tokens long, as large as max padding's.
///
/// # Errors
/// Estimator errors.
fn padding_free_fix(q: &Query) -> anyhow::Result<Vec<(String, crate::estimate::Estimate)>> {
    use crate::data::Batching;
    let Some(d) = &q.data else { return Ok(vec![]) };
    if q.profile == Profile::Candle
        || !matches!(d.batching, Batching::PadLongest | Batching::PadMax)
    {
        return Ok(vec![]);
    }
    let max_length = match d.batching {
        Batching::PadMax => Some(d.seq),
        _ => None,
    };
    let (b, s) = d
        .lengths
        .worst_batch(q.spec.batch, max_length, Batching::PaddingFree)?;
    let spec = TrainSpec {
        batch: b,
        seq: s,
        allow_longer: true,
        ..q.spec.clone()
    };
    let cfg = &q.model.config;
    let e = estimate_sharded(cfg, &spec, q.profile, &q.coefficients, q.sharding)?;
    Ok(vec![(
        format!("padding-free micro-batches (--padding-free: the largest is 1 × {s} tokens)"),
        e,
    )])
}

/// Computes the answer: the estimate, the reference formulas, the device map and, when it does
/// not fit, the fixes ([`advice::fixes`]).
///
/// # Errors
/// A device map that cannot place the weights; estimator errors.
pub fn answer(q: Query) -> anyhow::Result<Answer> {
    let cfg = &q.model.config;
    let e = estimate_sharded(cfg, &q.spec, q.profile, &q.coefficients, q.sharding)?;
    let device_map = match &q.max_memory {
        Some(m) => Some(multi::device_map(cfg, &q.spec, m)?),
        None => None,
    };
    let fixes = match q.budget {
        Some((_, b)) if e.needed_bytes() > b => {
            let mut f = advice::fixes(cfg, &q.spec, q.profile, &q.coefficients, q.sharding, b);
            f.extend(padding_free_fix(&q)?);
            f
        }
        _ => vec![],
    };
    let measured = crate::calibrate::compare::measured_rows(
        &q.measured,
        cfg,
        &q.spec,
        q.profile,
        q.sharding,
        &e,
        // The estimate is for the CPU with a CPU table (every profile) or a CPU reference row.
        q.coefficients.cpu || q.spec.torch_cpu,
    )?;
    Ok(Answer {
        measured,
        model: q.model.name,
        model_config: cfg.clone(),
        references: {
            let mut r = vec![references::seed_rule(cfg, &q.spec)];
            // Korthikanti et al.'s attention term is one sequence's s²: a padding-free row of
            // many sequences is not one, so the formula is left out there.
            let padding_free = q
                .data
                .as_ref()
                .is_some_and(|d| d.batching == crate::data::Batching::PaddingFree);
            if !padding_free {
                r.push(references::korthikanti(cfg, &q.spec));
            }
            r
        },
        spec: q.spec,
        profile: q.profile,
        coefficients: q.coefficients.source,
        estimate: e,
        budget: q.budget,
        fixes,
        sharding: q.sharding,
        device_map,
        data: q.data,
    })
}

/// Refuses `--weights` and the options of a measurement (hidden from `estimate --help`).
fn refuse_measurement_options(a: &EstimateArgs) -> anyhow::Result<()> {
    if a.model.weights != "random" {
        return Err(Error::invalid(
            "--weights",
            &a.model.weights,
            "estimate reads no weights: give --model",
        )
        .into());
    }
    let m = &a.model;
    let save_dir = m
        .save_dir
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    for (flag, given, value) in [
        ("--lr", m.lr != 5e-5, m.lr.to_string()),
        (
            "--weight-decay",
            m.weight_decay != 0.0,
            m.weight_decay.to_string(),
        ),
        ("--device", m.device != "cpu", m.device.clone()),
        ("--seed", m.seed != 0, m.seed.to_string()),
        ("--data-seed", m.data_seed != 0, m.data_seed.to_string()),
        ("--save", m.save != SaveMode::None, m.save.to_string()),
        ("--merge-save", m.merge_save, "true".into()),
        ("--save-dir", m.save_dir.is_some(), save_dir),
        (
            "--timed-steps",
            m.timed_steps != 0,
            m.timed_steps.to_string(),
        ),
    ] {
        if given {
            return Err(Error::invalid(
                flag,
                value,
                "is an option of a measurement (measure, sweep, max, plan); estimate does not use it",
            )
            .into());
        }
    }
    Ok(())
}

/// The memory to fit in (`--gpu` or `--budget`): its name and bytes.
fn budget(a: &EstimateArgs) -> anyhow::Result<Option<(String, u64)>> {
    Ok(match (&a.gpu, a.model.budget) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "--budget",
                "with --gpu",
                "give either --gpu or --budget, not both",
            )
            .into())
        }
        (Some(g), None) => {
            let g = gpu(g)?;
            Some((g.name.to_string(), g.memory_bytes))
        }
        (None, Some(b)) => Some(("--budget".to_string(), b)),
        (None, None) => None,
    })
}

/// `--shard` over `--gpus`, with `--offload`, `--reduce-bucket-size` and `--gpus-per-node`
/// (each of which needs `--shard`).
fn sharding(a: &EstimateArgs) -> anyhow::Result<Option<Sharding>> {
    let (gpus_flag, gpus) = match a.world_size {
        Some(n) => ("--world-size", n),
        None => ("--gpus", a.gpus),
    };
    let given: [(&str, Option<String>); 4] = [
        (gpus_flag, (gpus != 1).then(|| gpus.to_string())),
        ("--offload", a.offload.map(|o| o.to_string())),
        (
            "--reduce-bucket-size",
            a.reduce_bucket_size.map(|b| b.to_string()),
        ),
        ("--gpus-per-node", a.gpus_per_node.map(|n| n.to_string())),
    ];
    let Some(sh) = a.shard else {
        if let Some((flag, Some(v))) = given.iter().find(|(_, v)| v.is_some()) {
            let shards = match *flag {
                "--offload" => "zero1, zero2, zero3 or fsdp",
                "--reduce-bucket-size" => "zero1, zero2 or zero3",
                _ => "ddp, zero1, zero2, zero3 or fsdp",
            };
            return Err(Error::invalid(*flag, v, format!("needs --shard ({shards})")).into());
        }
        return Ok(None);
    };
    // vramcal's own step (a simulated rank of it: `measure --shard`) offloads nothing, and its
    // ZeRO-3 rank keeps DeepSpeed's default bucket, which `measure` does not change.
    if a.profile == Profile::Candle {
        for (flag, v) in &given[1..] {
            if let Some(v) = v {
                return Err(Error::invalid(
                    *flag,
                    v,
                    if *flag == "--offload" {
                        "describes DeepSpeed's or FSDP's CPU offload, which vramcal's own step (--profile candle) does not run: give --profile torch-sdpa"
                    } else if *flag == "--reduce-bucket-size" {
                        "sets DeepSpeed's bucket, which vramcal's own step (--profile candle) keeps at DeepSpeed's default (5e8 elements, as `measure --shard` runs it): give --profile torch-sdpa to set it"
                    } else {
                        "describes DeepSpeed, which vramcal's own step (--profile candle) does not run: give --profile torch-sdpa"
                    },
                )
                .into());
            }
        }
    }
    let mut s = Sharding::new(sh, gpus);
    s.offload = a.offload.unwrap_or_default();
    if let (Some(t), Some(o)) = (a.model.torch_adamw, a.offload) {
        if o != crate::spec::Offload::None {
            return Err(Error::invalid(
                "--torch-adamw",
                t,
                format!("with --offload {o} the step runs on the host (DeepSpeed's CPU Adam, FSDP's CPU step), not torch's AdamW on the GPU: leave it out"),
            )
            .into());
        }
    }
    if let Some(b) = a.reduce_bucket_size {
        if !s.deepspeed() {
            return Err(Error::invalid(
                "--reduce-bucket-size",
                b,
                format!("is DeepSpeed's bucket: {sh} has none (it is ZeRO's, zero1 to zero3)"),
            )
            .into());
        }
        if !(1..=MAX_REDUCE_BUCKET).contains(&b) {
            return Err(Error::invalid(
                "--reduce-bucket-size",
                b,
                format!("must be between 1 and {MAX_REDUCE_BUCKET} gradient elements"),
            )
            .into());
        }
        s.reduce_bucket_elements = b;
    }
    if let Some(n) = a.gpus_per_node {
        if s.offload == crate::spec::Offload::None {
            return Err(Error::invalid(
                "--gpus-per-node",
                n,
                "counts host RAM per node: give it with --offload",
            )
            .into());
        }
        s.gpus_per_node = n;
    }
    if s.gpus == 0 {
        return Err(Error::invalid(gpus_flag, 0, "must be at least 1").into());
    }
    if s.gpus > MAX_GPUS {
        return Err(Error::invalid(
            gpus_flag,
            s.gpus,
            format!("at most {MAX_GPUS} data-parallel GPUs"),
        )
        .into());
    }
    s.rank = a.rank.unwrap_or(0);
    s.validate()?;
    Ok(Some(s))
}

/// The largest `--reduce-bucket-size` taken (elements): 2^40, far above any GPU's memory in
/// 16-bit gradients.
const MAX_REDUCE_BUCKET: u64 = 1 << 40;

/// The most data-parallel GPUs `--gpus` takes (the largest published training runs use tens of
/// thousands).
const MAX_GPUS: usize = 1 << 20;

/// `--max-memory` for `--device-map` (each needs the other).
fn max_memory(a: &EstimateArgs) -> anyhow::Result<Option<Vec<u64>>> {
    Ok(match (a.device_map, &a.max_memory) {
        (true, Some(m)) => Some(multi::parse_max_memory(m)?),
        (true, None) => {
            return Err(Error::invalid(
                "--device-map",
                "",
                "needs --max-memory, e.g. 0=24GiB,1=24GiB",
            )
            .into())
        }
        (false, Some(_)) => {
            return Err(Error::invalid("--max-memory", "", "goes with --device-map").into())
        }
        (false, None) => None,
    })
}
