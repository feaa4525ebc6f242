//! `vramcal estimate`: the itemized prediction, reference formulas, and a fits-on verdict with
//! the cheapest changes that make a configuration fit.

use std::process::ExitCode;

use crate::cli::EstimateArgs;
use crate::config::{resolve_model, ModelConfig};
use crate::estimate::{estimate_sharded, multi, references, Coefficients, Estimate};
use crate::size::gib;
use crate::spec::LoraConfig;
use crate::spec::TrainSpec;
use crate::spec::{Adaptation, Checkpointing, Quant};
use crate::spec::{Profile, Shard};
use crate::throughput::gpu;

/// Loads the coefficients for `profile` (a calibration table or the uncalibrated ones).
///
/// # Errors
/// A table that is malformed or for another profile or version.
pub fn coefficients(
    path: Option<&std::path::Path>,
    profile: Profile,
) -> anyhow::Result<Coefficients> {
    Ok(match path {
        Some(p) => crate::calibrate::read_table(p, profile)?,
        None => Coefficients::uncalibrated(profile),
    })
}

fn alternatives(cfg: &ModelConfig, spec: &TrainSpec) -> Vec<(String, TrainSpec)> {
    let mut v = Vec::new();
    if spec.checkpointing == Checkpointing::None {
        let mut s = spec.clone();
        s.checkpointing = Checkpointing::Every(1);
        v.push((
            "activation checkpointing (--checkpointing layers)".to_string(),
            s,
        ));
    }
    let mut mb = spec.batch;
    while mb > 1 {
        mb /= 2;
        let mut s = spec.clone();
        s.accumulate = spec.accumulate * spec.batch / mb;
        s.batch = mb;
        v.push((
            format!(
                "micro-batch {mb} × accumulate {} (same tokens per step)",
                s.accumulate
            ),
            s,
        ));
    }
    if spec.adaptation.lora.is_none() {
        let lora = "r=16,alpha=32,targets=all-linear"
            .parse::<LoraConfig>()
            .expect("valid");
        let mut s = spec.clone();
        s.adaptation = Adaptation {
            lora: Some(lora.clone()),
            quant: Quant::None,
            seed: 0,
        };
        v.push((
            "LoRA r=16 on all linear layers (--method lora)".to_string(),
            s,
        ));
        let mut s = spec.clone();
        s.adaptation = Adaptation {
            lora: Some(lora),
            quant: Quant::Nf4 { double: true },
            seed: 0,
        };
        v.push((
            "QLoRA r=16 on all linear layers (--method qlora --double-quant)".to_string(),
            s,
        ));
    } else if spec.adaptation.quant == Quant::None {
        let mut s = spec.clone();
        s.adaptation.quant = Quant::Nf4 { double: true };
        v.push((
            "4-bit NF4 base (--method qlora --double-quant)".to_string(),
            s,
        ));
    }
    // Combined with checkpointing.
    let with_ckpt: Vec<(String, TrainSpec)> = v
        .iter()
        .filter(|(_, s)| s.checkpointing == Checkpointing::None && s.adaptation != spec.adaptation)
        .map(|(n, s)| {
            let mut s = s.clone();
            s.checkpointing = Checkpointing::Every(1);
            (format!("{n} + checkpointing"), s)
        })
        .collect();
    v.extend(with_ckpt);
    if spec.adaptation.lora.is_none() && spec.state_dtype == candle_core::DType::F32 {
        let mut s = spec.clone();
        s.state_dtype = candle_core::DType::BF16;
        v.push((
            "16-bit AdamW states (--optimizer-state-dtype bf16)".to_string(),
            s,
        ));
    }
    v.retain(|(_, s)| s.validate(cfg).is_ok());
    v
}

/// Data-parallel sharding that would make a full fine-tune fit: ZeRO-2 and ZeRO-3 over 2, 4 and
/// 8 GPUs (labels name the options that give them).
fn sharded_alternatives(spec: &TrainSpec) -> Vec<(String, Shard, usize)> {
    if spec.adaptation.lora.is_some() {
        return vec![];
    }
    let mut v = Vec::new();
    for (name, shard) in [("zero2", Shard::Zero2), ("zero3", Shard::Zero3)] {
        for gpus in [2, 4, 8] {
            v.push((
                format!("{name} over {gpus} GPUs, per GPU (--shard {name} --gpus {gpus})"),
                shard,
                gpus,
            ));
        }
    }
    v
}

/// Runs `vramcal estimate`.
///
/// # Errors
/// Bad input: unknown model, GPU or profile, budget without unit, a calibration table for
/// another profile or version.
pub fn run(a: &EstimateArgs) -> anyhow::Result<ExitCode> {
    let name =
        a.model.model.clone().ok_or_else(|| {
            crate::Error::invalid("--model", "", "vramcal estimate needs --model")
        })?;
    let model = resolve_model(&name)?;
    let cfg = &model.config;
    let mut spec = super::setup::train_spec(
        &a.model,
        a.batch,
        a.seq,
        a.how.method.as_deref(),
        &a.how.checkpointing,
    )?;
    spec.allow_longer = a.model.allow_longer;
    spec.validate(cfg)?;
    let profile = a.profile.parse::<Profile>()?;
    // What attention keeps is the profile's for the torch stacks: a contradicting --attention is
    // refused rather than ignored.
    if profile == Profile::TorchSdpa && spec.attention == crate::spec::Attention::Eager {
        return Err(crate::Error::invalid(
            "--attention",
            "eager",
            "the torch-sdpa profile predicts SDPA attention: give --profile torch-eager for transformers' eager attention",
        )
        .into());
    }
    let c = coefficients(a.calibration.as_deref(), profile)?;
    if a.model.weights != "random" {
        return Err(crate::Error::invalid(
            "--weights",
            &a.model.weights,
            "estimate reads no weights: give --model",
        )
        .into());
    }
    // Options of a measurement (hidden from `estimate --help`) are refused, not ignored.
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
        ("--save", m.save != "none", m.save.clone()),
        ("--merge-save", m.merge_save, "true".into()),
        ("--save-dir", m.save_dir.is_some(), save_dir),
        (
            "--timed-steps",
            m.timed_steps != 0,
            m.timed_steps.to_string(),
        ),
    ] {
        if given {
            return Err(crate::Error::invalid(
                flag,
                value,
                "is an option of a measurement (measure, sweep, max, plan); estimate does not use it",
            )
            .into());
        }
    }
    let budget = match (&a.gpu, super::setup::budget(&a.model)?) {
        (Some(_), Some(_)) => {
            return Err(crate::Error::invalid(
                "--budget",
                "",
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
    };
    let sharding = match &a.shard {
        Some(sh) => Some((sh.parse::<Shard>()?, a.gpus)),
        None if a.gpus != 1 => {
            return Err(crate::Error::invalid(
                "--gpus",
                a.gpus,
                "needs --shard (zero1, zero2, zero3 or fsdp)",
            )
            .into())
        }
        None => None,
    };
    let e = estimate_sharded(cfg, &spec, profile, &c, sharding)?;
    let map = match (a.device_map, &a.max_memory) {
        (true, Some(m)) => Some(multi::device_map(cfg, &spec, &multi::parse_max_memory(m)?)?),
        (true, None) => {
            return Err(crate::Error::invalid(
                "--device-map",
                "",
                "needs --max-memory, e.g. 0=24GiB,1=24GiB",
            )
            .into())
        }
        (false, Some(_)) => {
            return Err(crate::Error::invalid("--max-memory", "", "goes with --device-map").into())
        }
        (false, None) => None,
    };
    let refs = [
        references::seed_rule(cfg, &spec),
        references::korthikanti(cfg, &spec),
    ];
    let alts: Vec<(String, Estimate)> = match &budget {
        Some((_, b)) if e.peak_bytes > *b => {
            let mut alts: Vec<(String, Estimate)> = alternatives(cfg, &spec)
                .into_iter()
                .filter_map(|(n, s)| {
                    estimate_sharded(cfg, &s, profile, &c, sharding)
                        .ok()
                        .map(|x| (n, x))
                })
                .collect();
            if sharding.is_none() {
                // The smallest number of GPUs that fits, per stage.
                let mut fitted: Vec<Shard> = Vec::new();
                for (n, shard, gpus) in sharded_alternatives(&spec) {
                    if fitted.contains(&shard) {
                        continue;
                    }
                    if let Ok(x) = estimate_sharded(cfg, &spec, profile, &c, Some((shard, gpus))) {
                        if x.peak_bytes <= *b {
                            fitted.push(shard);
                        }
                        alts.push((n, x));
                    }
                }
            }
            alts
        }
        _ => vec![],
    };
    if a.json {
        let v = serde_json::json!({
            "profile": profile.name(),
            "stack": profile.stack(),
            "model": model.name,
            "method": spec.adaptation.method(),
            "checkpointing": spec.checkpointing.label(),
            "dtype": spec.dtype.as_str(),
            "micro_batch": spec.batch,
            "accumulate": spec.accumulate,
            "seq": spec.seq,
            "estimate": e,
            "references": refs,
            "budget": budget.as_ref().map(|(n, b)| serde_json::json!({"name": n, "bytes": b, "fits": e.peak_bytes <= *b})),
            "alternatives": alts.iter().map(|(n, x)| serde_json::json!({"change": n, "peak_bytes": x.peak_bytes})).collect::<Vec<_>>(),
            "sharding": a.shard.as_ref().map(|s| serde_json::json!({"shard": s, "gpus": a.gpus})),
            "device_map": map,
        });
        super::emit(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    let lora = spec
        .adaptation
        .lora
        .as_ref()
        .map(|l| format!(" ({l})"))
        .unwrap_or_default();
    let mut t = format!(
        "vramcal estimate for {} (--profile {}; {})\n",
        profile.stack(),
        profile.name(),
        if profile == Profile::Candle {
            "the default, torch-sdpa, predicts a PyTorch + transformers run"
        } else {
            "--profile candle predicts vramcal's own step"
        }
    );
    t += &format!(
        "{} | {}{lora} | quant {} | checkpointing {} | dtype {} | AdamW states {} | micro-batch {} x accumulate {} x seq {} | coefficients {}\n",
        model.name,
        spec.adaptation.method(),
        spec.adaptation.quant.label(),
        spec.checkpointing.label(),
        spec.dtype.as_str(),
        spec.state_dtype.as_str(),
        spec.batch,
        spec.accumulate,
        spec.seq,
        c.source
    );
    t += &format!("{:<32} {:>16} {:>9}  formula\n", "item", "bytes", "GiB");
    for i in &e.items {
        t += &format!(
            "{:<32} {:>16} {:>9}  {}\n",
            i.name,
            i.bytes,
            gib(i.bytes),
            i.formula
        );
    }
    t += &format!(
        "{:<32} {:>16} {:>9}  in {}\n",
        "peak (predicted)",
        e.peak_bytes,
        gib(e.peak_bytes),
        e.peak_phase
    );
    if let Some(sh) = &a.shard {
        t += &format!(
            "(per GPU: {sh} over {} data-parallel GPUs; activations per GPU)\n",
            a.gpus
        );
    }
    if let Some(map) = &map {
        t += "device map (weights only, layers in order):\n";
        let mut dev = usize::MAX;
        for p in map {
            if p.device != dev {
                dev = p.device;
                let on: Vec<&str> = map
                    .iter()
                    .filter(|q| q.device == dev)
                    .map(|q| q.module.as_str())
                    .collect();
                let bytes: u64 = map
                    .iter()
                    .filter(|q| q.device == dev)
                    .map(|q| q.bytes)
                    .sum();
                t += &format!(
                    "  device {dev}: {} .. {} ({} modules, {} GiB)\n",
                    on[0],
                    on[on.len() - 1],
                    on.len(),
                    gib(bytes)
                );
            }
        }
    }
    t += "reference formulas (GiB = 2^30 bytes):\n";
    for r in &refs {
        t += &format!(
            "  {:<26} {:>16} {:>9}  {:+.1} % vs vramcal  [{}]\n",
            r.name,
            r.bytes,
            gib(r.bytes),
            100.0 * (r.bytes as f64 - e.peak_bytes as f64) / e.peak_bytes as f64,
            r.source
        );
    }
    if let Some((name, b)) = &budget {
        if e.peak_bytes <= *b {
            t += &format!(
                "verdict: fits in {name} ({} GiB): headroom {} GiB\n",
                gib(*b),
                gib(b - e.peak_bytes)
            );
        } else {
            t += &format!(
                "verdict: does NOT fit in {name} ({} GiB): {} GiB over\n",
                gib(*b),
                gib(e.peak_bytes - b)
            );
            let mut fit: Vec<&(String, Estimate)> =
                alts.iter().filter(|(_, x)| x.peak_bytes <= *b).collect();
            fit.sort_by_key(|(_, x)| std::cmp::Reverse(x.peak_bytes));
            if fit.is_empty() {
                t += "  none of checkpointing, a smaller micro-batch, 16-bit AdamW states, LoRA, QLoRA or ZeRO-2/3 over up to 8 GPUs makes it fit\n";
            } else {
                t += "  changes that make it fit (least memory saved first):\n";
                for (n, x) in fit {
                    t += &format!("    {n}: {} GiB\n", gib(x.peak_bytes));
                }
            }
        }
    }
    super::emit(&t)?;
    Ok(ExitCode::SUCCESS)
}
