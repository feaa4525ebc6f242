//! What every verb that names a training setup shares: `--model`/`--weights` resolved into a
//! model config and a weights source, the CLI strings turned into a [`TrainSpec`] (through the
//! `FromStr` of each [`crate::spec`] type: errors come from there), and the checks made before
//! anything runs (`--save-dir`, host memory); and, in [`child`], both ends of the protocol by which
//! a measuring child process reports a point.

pub mod child;

use std::path::Path;

use crate::cli::ModelArgs;
use crate::config::{resolve_model, ConfigSource, ResolvedModel};
use crate::error::Error;
use crate::measure::device::host_memory_bytes;
use crate::measure::Setup;
use crate::report::RowContext;
use crate::size::gib;
use crate::spec::{
    Adaptation, Checkpointing, DeviceChoice, Method, Quant, SaveMode, TrainSpec, WeightsSpec,
};
use crate::throughput::model_flops_per_token;
use crate::weights::gguf::{config_from_gguf, read_content};

/// Resolves `--model` and `--weights` into a model configuration and a weights source.
///
/// # Errors
/// Unknown or malformed model, missing weights, a GGUF whose tensors do not fit the model;
/// `--loss` or `--torch-adamw` (the torch profiles' options: only measuring commands resolve
/// weights).
pub fn resolve(args: &ModelArgs) -> anyhow::Result<(ResolvedModel, WeightsSpec)> {
    // Only the measuring commands resolve weights: --loss is the torch profiles'.
    if let Some(l) = args.loss {
        return Err(Error::invalid(
            "--loss",
            l,
            "vramcal's own step computes the loss with its own chunked head (src/ops/loss.rs); --loss is for estimate's torch profiles",
        )
        .into());
    }
    if let Some(t) = args.torch_adamw {
        return Err(Error::invalid(
            "--torch-adamw",
            t,
            "vramcal's own step runs its own AdamW (src/optim); --torch-adamw is for estimate's torch profiles",
        )
        .into());
    }
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
            crate::weights::hf_cache_dir(id)?;
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
    let mut src = crate::weights::open_source(&weights)?;
    crate::weights::check_all(src.as_mut(), &model.config, Path::new(&args.weights))?;
    Ok((model, weights))
}

/// Builds the adaptation (full, LoRA, QLoRA) from `--method`, `--lora`, `--quant`,
/// `--double-quant`; without `--method`, `lora` when `--lora` is given, else `full`.
///
/// # Errors
/// `--lora` with `--method full`, `--quant none` with `--method qlora`, `--double-quant`
/// without a 4-bit base.
pub fn adaptation(args: &ModelArgs, method: Option<Method>) -> anyhow::Result<Adaptation> {
    let quant = match args.quant {
        Some(Quant::Nf4 { double }) => Quant::Nf4 {
            double: double || args.double_quant,
        },
        _ => Quant::None,
    };
    let method = method.unwrap_or(if args.lora.is_some() {
        Method::Lora
    } else {
        Method::Full
    });
    let lora = args.lora.clone().unwrap_or_default();
    let ad = match method {
        Method::Full => {
            if let Some(l) = &args.lora {
                return Err(Error::invalid("--lora", l, "needs --method lora or qlora").into());
            }
            Adaptation {
                lora: None,
                quant,
                seed: args.seed,
            }
        }
        Method::Lora => Adaptation {
            lora: Some(lora),
            quant,
            seed: args.seed,
        },
        Method::Qlora => {
            if args.quant == Some(Quant::None) {
                return Err(Error::invalid(
                    "--quant",
                    "none",
                    "conflicts with --method qlora (a 4-bit base)",
                )
                .into());
            }
            Adaptation {
                lora: Some(lora),
                quant: Quant::Nf4 {
                    double: matches!(quant, Quant::Nf4 { double: true }) || args.double_quant,
                },
                seed: args.seed,
            }
        }
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

/// The micro-batch to measure or estimate: `(batch, seq)` as given, or with `--seq-lengths`
/// the largest the data can form under its batching ([`crate::data::Lengths::worst_batch`]),
/// with that batch described. `padding_free` says whether the stack has variable-length
/// attention (the torch profiles; not vramcal's own step).
///
/// # Errors
/// An unreadable or invalid lengths file (one line naming file and line); packing or `max`
/// padding without `--seq`; `--padding-free` where `padding_free` is false.
pub fn data_batch(
    cfg: &crate::config::ModelConfig,
    allow_longer: bool,
    batch: usize,
    seq: Option<usize>,
    data: &crate::cli::DataArgs,
    padding_free: bool,
) -> anyhow::Result<(usize, usize, Option<crate::data::WorstBatch>)> {
    let Some(f) = &data.seq_lengths else {
        return Ok((batch, seq.unwrap_or(0), None));
    };
    let lengths = crate::data::Lengths::read(f, cfg.max_position_embeddings, allow_longer)?;
    let batching = data.batching();
    if batching == crate::data::Batching::PaddingFree && !padding_free {
        return Err(Error::invalid(
            "--padding-free",
            f.display(),
            "vramcal's own step has no variable-length attention: estimate padding-free batches with a torch profile",
        )
        .into());
    }
    let (b, s) = lengths.worst_batch(batch, seq, batching)?;
    Ok((
        b,
        s,
        Some(crate::data::WorstBatch {
            lengths,
            batching,
            batch: b,
            seq: s,
        }),
    ))
}

/// Builds the training spec of one point from the CLI arguments, with `method` and
/// `checkpointing` (which a sweep varies).
///
/// # Errors
/// As [`adaptation`]; `--merge-save` with `--save adapter`; `--torch-adamw` with another optimizer
/// than `adamw_torch`.
pub fn train_spec(
    args: &ModelArgs,
    batch: usize,
    seq: usize,
    method: Option<Method>,
    checkpointing: Checkpointing,
) -> anyhow::Result<TrainSpec> {
    let mut spec = TrainSpec::new(batch, seq);
    spec.adaptation = adaptation(args, method)?;
    spec.checkpointing = checkpointing;
    spec.accumulate = args.accumulate;
    spec.save = args.save;
    if args.merge_save {
        if spec.save == SaveMode::Adapter {
            return Err(Error::invalid("--merge-save", "", "conflicts with --save adapter").into());
        }
        spec.save = SaveMode::Merged;
    }
    spec.dtype = args.dtype;
    spec.state_dtype = args.optimizer_state_dtype;
    spec.optimizer = args.optimizer;
    use crate::spec::Optimizer;
    if let Some(m) = args.momentum {
        if spec.optimizer != Optimizer::Sgd {
            return Err(Error::invalid(
                "--momentum",
                m,
                format!("is SGD's; --optimizer is {}", spec.optimizer),
            )
            .into());
        }
        if !(0.0..1.0).contains(&m) {
            return Err(Error::invalid("--momentum", m, "must be in [0, 1)").into());
        }
    }
    // `-0` reads as 0.
    spec.momentum = args.momentum.unwrap_or(0.0) + 0.0;
    // 8-bit AdamW and Adafactor keep states of their own types (f32 where not 8-bit): a state
    // dtype would be ignored, so it is refused.
    let own_states = matches!(
        spec.optimizer,
        Optimizer::AdamwBnb8bit
            | Optimizer::PagedAdamw8bit
            | Optimizer::PagedAdamw32bit
            | Optimizer::Adafactor
    ) || (spec.optimizer == Optimizer::Sgd && spec.momentum == 0.0);
    if own_states
        && args.precision.is_none()
        && args.optimizer_state_dtype != candle_core::DType::F32
    {
        return Err(Error::invalid(
            "--optimizer-state-dtype",
            args.optimizer_state_dtype.as_str(),
            format!(
                "{} keeps states of its own types (or none); only AdamW and SGD with --momentum take a state dtype",
                spec.optimizer
            ),
        )
        .into());
    }
    spec.loss = args.loss.unwrap_or_default();
    if let Some(t) = args.torch_adamw {
        if spec.optimizer != crate::spec::Optimizer::AdamwTorch {
            return Err(Error::invalid(
                "--torch-adamw",
                t,
                format!(
                    "names an implementation of torch's AdamW, --optimizer adamw_torch, not of {}",
                    spec.optimizer
                ),
            )
            .into());
        }
        spec.torch_adamw = Some(t);
    }
    if let Some(p) = args.precision {
        // PyTorch's optimizers keep states in the trainable weights' dtype (fp32 master
        // weights and PEFT's fp32 adapters under +amp: fp32).
        spec.dtype = p.weights();
        let fp32_states =
            p.master_weights() || (p.fp32_adapters() && spec.adaptation.lora.is_some());
        spec.state_dtype = if fp32_states {
            candle_core::DType::F32
        } else {
            p.weights()
        };
        spec.precision = Some(p);
    }
    if own_states {
        // What they keep besides 8-bit codes is f32 (and the row says so).
        spec.state_dtype = candle_core::DType::F32;
    }
    spec.adamw.lr = args.lr;
    spec.adamw.weight_decay = args.weight_decay;
    spec.allow_longer = args.allow_longer;
    spec.attention = args.attention.unwrap_or_default();
    spec.data_seed = args.data_seed;
    Ok(spec)
}

/// Refuses what only the torch profiles describe: vramcal's step has no paged (unified) memory,
/// its own loss, its own AdamW, and one fused attention.
///
/// # Errors
/// `--loss`, `--torch-adamw`, a paged `--optimizer`, `fp16` and full
/// fine-tuning in `fp16+amp` (fp16 AdamW states), `--attention flash-attention-2`.
pub fn check_measurable(spec: &TrainSpec) -> anyhow::Result<()> {
    use crate::spec::Optimizer;
    if matches!(
        spec.optimizer,
        Optimizer::PagedAdamw8bit | Optimizer::PagedAdamw32bit
    ) {
        return Err(Error::invalid(
            "--optimizer",
            spec.optimizer,
            "paged optimizers keep their states in CUDA unified memory, which vramcal's step does not use; estimate them with --profile torch-sdpa",
        )
        .into());
    }
    if spec.loss != crate::spec::Loss::Transformers {
        return Err(Error::invalid(
            "--loss",
            spec.loss,
            "vramcal's own step computes the loss with its own chunked head (src/ops/loss.rs); --loss is for the torch profiles",
        )
        .into());
    }
    if let Some(t) = spec.torch_adamw {
        return Err(Error::invalid(
            "--torch-adamw",
            t,
            "vramcal's own step runs its own AdamW (src/optim); --torch-adamw is for the torch profiles",
        )
        .into());
    }
    if spec.precision == Some(crate::spec::Precision::Fp16Amp) && spec.adaptation.lora.is_none() {
        return Err(Error::invalid(
            "--precision",
            "fp16+amp",
            "full fine-tuning in fp16+amp trains fp16 weights with fp16 gradients and optimizer states (PyTorch's GradScaler refuses fp16 gradients); use amp-fp16 or fp16-master, or fp16+amp with LoRA (fp32 adapters)",
        )
        .into());
    }
    if spec.precision.is_none()
        && spec.adaptation.lora.is_none()
        && spec.dtype == candle_core::DType::F16
        && spec.state_dtype == candle_core::DType::F16
    {
        return Err(Error::invalid(
            "--optimizer-state-dtype",
            "f16",
            "f16 weights with f16 optimizer states (the fp16 recipe) diverge in vramcal's step (non-finite loss); use f32 states or --precision fp16-master",
        )
        .into());
    }
    if spec.precision == Some(crate::spec::Precision::Fp16) {
        return Err(Error::invalid(
            "--precision",
            "fp16",
            "fp16 keeps AdamW's states in fp16, which diverge in vramcal's step (non-finite loss); measure --dtype f16 (f32 states) or fp16-master instead",
        )
        .into());
    }
    if spec.attention == crate::spec::Attention::FlashAttention2 {
        return Err(Error::invalid(
            "--attention",
            spec.attention,
            "vramcal's own step has one fused attention (sdpa) and eager; flash-attention-2 is for estimating PyTorch (--profile torch-sdpa)",
        )
        .into());
    }
    Ok(())
}

/// Checks `--save-dir` before anything runs: it needs a save, and must be (or become) a folder.
///
/// # Errors
/// `--save-dir` without `--save`, a path that is a file, or a folder that cannot be created.
pub fn check_save_dir(args: &ModelArgs) -> anyhow::Result<()> {
    let Some(d) = &args.save_dir else {
        return Ok(());
    };
    if args.save == SaveMode::None && !args.merge_save {
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
    check_measurable(spec)?;
    if device.is_cpu() {
        // A bound past 64 bits cannot fit either.
        let need = crate::estimate::bounds::min_bytes(&model.config, spec).unwrap_or(u64::MAX);
        if let Some(have) = host_memory_bytes() {
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

/// One point to measure, checked: everything a verb that measures needs before it starts a
/// child.
pub struct Prepared {
    /// The model, weights, spec (the device is the CPU until the child opens the real one).
    pub setup: Setup,
    /// The checked `--device`.
    pub device: DeviceChoice,
    /// What the point's row records besides the measurement.
    pub ctx: RowContext,
}

/// Resolves the model and weights, builds and validates the spec, checks the device and that
/// the point can fit in this machine, and builds the row context (`command`: the command line
/// to record, default this process's).
///
/// # Errors
/// As [`resolve`], [`train_spec`], [`TrainSpec::validate`],
/// [`crate::measure::device::check_device`] and [`check_fits`].
pub fn prepare(
    args: &ModelArgs,
    (batch, seq): (usize, usize),
    method: Option<Method>,
    checkpointing: Checkpointing,
    command: Option<String>,
) -> anyhow::Result<Prepared> {
    let (model, weights) = resolve(args)?;
    let spec = train_spec(args, batch, seq, method, checkpointing)?;
    spec.validate(&model.config)?;
    let device = crate::measure::device::check_device(&args.device)?;
    check_fits(&spec, &model, device)?;
    let command = command.unwrap_or_else(super::command_line);
    let ctx = row_context(args, &model, &weights, &spec, command);
    Ok(Prepared {
        setup: Setup {
            model,
            weights,
            spec,
            device: candle_core::Device::Cpu,
            sharding: None,
        },
        device,
        ctx,
    })
}

/// What a point's row records besides the measurement: `command`, the model, weights, device,
/// budget and the model FLOPs per token of `spec`.
pub fn row_context(
    args: &ModelArgs,
    model: &ResolvedModel,
    weights: &WeightsSpec,
    spec: &TrainSpec,
    command: String,
) -> RowContext {
    RowContext {
        command,
        model: model.name.clone(),
        weights: weights.describe(),
        device: args.device.clone(),
        budget_bytes: args.budget,
        model_flops_per_token: Some(model_flops_per_token(&model.config, spec)),
        sharding: None,
        moe: model.config.moe().is_some(),
    }
}
