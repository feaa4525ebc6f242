//! What would make a configuration fit: the cheapest changes a user can make (activation
//! checkpointing, a smaller micro-batch with gradient accumulation, LoRA, QLoRA, LoRA on fewer
//! modules, 16-bit AdamW states, for the PyTorch profiles bitsandbytes' 8-bit and paged AdamW
//! and Liger's fused linear cross-entropy, ZeRO-2/3 sharding), each estimated with the same profile and coefficients.

use candle_core::DType;

use super::{estimate_sharded, Coefficients, Estimate};
use crate::config::ModelConfig;
use crate::spec::{
    Adaptation, Checkpointing, LoraConfig, Loss, Optimizer, Profile, Quant, Shard, Sharding,
    Target, TrainSpec,
};

/// The changes to try for `spec` under `profile`, labelled with the options that give them;
/// only changes that validate against `cfg`. The optimizer changes are offered for the torch
/// profiles only (vramcal's own step trains with torch's AdamW).
pub fn alternatives(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    profile: Profile,
) -> Vec<(String, TrainSpec)> {
    let mut v = Vec::new();
    if profile != Profile::Candle
        && matches!(
            spec.optimizer,
            Optimizer::AdamwTorch | Optimizer::AdamwTorchFused
        )
    {
        for (o, what) in [
            (
                Optimizer::AdamwBnb8bit,
                "8-bit AdamW states (--optimizer adamw_bnb_8bit)",
            ),
            (
                Optimizer::PagedAdamw8bit,
                "paged 8-bit AdamW (--optimizer paged_adamw_8bit; its states live in CUDA unified memory, outside the allocated peak, and page to the host under pressure)",
            ),
        ] {
            let mut s = spec.clone();
            s.optimizer = o;
            // bitsandbytes' optimizers have no torch implementation to name.
            s.torch_adamw = None;
            let what = if spec.torch_adamw.is_some() {
                format!("{what}, without --torch-adamw")
            } else {
                what.to_string()
            };
            v.push((what, s));
        }
    }
    if profile != Profile::Candle
        && spec.optimizer == Optimizer::AdamwTorch
        && spec.torch_adamw_for_loop()
    {
        // The foreach step's one buffer of every tensor can be more or less than the
        // for-loop step's two of the largest: offered, and kept only if it fits.
        let mut s = spec.clone();
        s.torch_adamw = Some(crate::spec::TorchAdamw::Foreach);
        v.push((
            "torch's foreach AdamW (--torch-adamw foreach; torch ≥ 2.0's default on CUDA)"
                .to_string(),
            s,
        ));
    }
    if profile != Profile::Candle && spec.loss == Loss::Transformers {
        let mut s = spec.clone();
        s.loss = Loss::FusedLinearCe;
        v.push((
            "Liger's fused linear cross-entropy, no whole logits (--loss fused-linear-ce)"
                .to_string(),
            s,
        ));
    }
    if let Some(l) = &spec.adaptation.lora {
        let fewer = [Target::QProj, Target::VProj];
        let more = l.targets.len() > fewer.len() || l.top_level();
        if more && fewer.iter().all(|t| l.targets.contains(t)) {
            let mut s = spec.clone();
            if let Some(l) = s.adaptation.lora.as_mut() {
                l.targets = fewer.to_vec();
                l.all_linear = false;
                l.lm_head = false;
                l.embed_tokens = false;
            }
            // `modules_to_save` stays: the copies are there for a reason (added tokens). The
            // label gives the whole setting, rank and alpha kept.
            let label = s
                .adaptation
                .lora
                .as_ref()
                .map(|l| l.to_string())
                .unwrap_or_default();
            v.push((
                format!("LoRA on q_proj and v_proj only (--lora {label})"),
                s,
            ));
        }
    }
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
        // Under a `+amp` recipe PEFT keeps the adapters, and so their states, in fp32 (as
        // `--method lora` with that recipe resolves them).
        let fp32_adapters = spec.precision.is_some_and(|p| p.fp32_adapters());
        let mut s = spec.clone();
        s.adaptation = Adaptation {
            lora: Some(lora.clone()),
            quant: Quant::None,
            seed: 0,
        };
        if fp32_adapters {
            s.state_dtype = candle_core::DType::F32;
        }
        v.push((
            "LoRA r=16 on all linear layers (--method lora --lora r=16,alpha=32,targets=all-linear)"
                .to_string(),
            s,
        ));
        let mut s = spec.clone();
        s.adaptation = Adaptation {
            lora: Some(lora),
            quant: Quant::Nf4 { double: true },
            seed: 0,
        };
        if fp32_adapters {
            s.state_dtype = candle_core::DType::F32;
        }
        v.push((
            "QLoRA r=16 on all linear layers (--method qlora --double-quant --lora r=16,alpha=32,targets=all-linear)"
                .to_string(),
            s,
        ));
    } else if spec.adaptation.quant == Quant::None {
        let mut s = spec.clone();
        s.adaptation.quant = Quant::Nf4 { double: true };
        v.push((
            "4-bit NF4 base (--method qlora --double-quant)".to_string(),
            s,
        ));
    } else if profile != Profile::Candle && cfg.moe().is_some() {
        // Under the torch profiles a QLoRA Mixtral keeps its unquantized experts in fp32
        // (`prepare_model_for_kbit_training`): a 16-bit base without 4-bit layers is smaller.
        let mut s = spec.clone();
        s.adaptation.quant = Quant::None;
        v.push((
            "LoRA on a 16-bit base (--method lora): QLoRA leaves Mixtral's experts unquantized, in fp32"
                .to_string(),
            s,
        ));
    }
    // Combined with checkpointing.
    let with_ckpt: Vec<(String, TrainSpec)> = v
        .iter()
        .filter(|(_, s)| {
            s.checkpointing == Checkpointing::None
                && (s.adaptation != spec.adaptation
                    || s.optimizer != spec.optimizer
                    || s.loss != spec.loss)
        })
        .map(|(n, s)| {
            let mut s = s.clone();
            s.checkpointing = Checkpointing::Every(1);
            (format!("{n} + checkpointing (--checkpointing layers)"), s)
        })
        .collect();
    v.extend(with_ckpt);
    // Only where options can say it: a precision recipe fixes the states' dtype.
    if spec.adaptation.lora.is_none() && spec.state_dtype == DType::F32 && spec.precision.is_none()
    {
        let mut s = spec.clone();
        s.state_dtype = DType::BF16;
        v.push((
            "16-bit AdamW states (--optimizer-state-dtype bf16)".to_string(),
            s,
        ));
    }
    v.retain(|(_, s)| s.validate(cfg).is_ok());
    v
}

/// Data-parallel sharding that would make a fine-tune fit: ZeRO-2 and ZeRO-3 over 2, 4 and 8
/// GPUs for full fine-tuning, ZeRO-3 (which shards the frozen base too) for LoRA and QLoRA
/// (labels name the options that give them).
pub fn sharded_alternatives(spec: &TrainSpec) -> Vec<(String, Shard, usize)> {
    let stages: &[(&str, Shard)] = if spec.adaptation.lora.is_some() {
        &[("zero3", Shard::Zero3)]
    } else {
        &[("zero2", Shard::Zero2), ("zero3", Shard::Zero3)]
    };
    let mut v = Vec::new();
    for &(name, shard) in stages {
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

/// The changes of [`alternatives`] (and, without `sharding`, the fewest GPUs of ZeRO-2 and
/// ZeRO-3 that fit `budget` bytes, [`sharded_alternatives`]), each with its estimate under the
/// same `profile`, coefficients `c` and `sharding`, for a `spec` that does not fit.
pub fn fixes(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    profile: Profile,
    c: &Coefficients,
    sharding: Option<Sharding>,
    budget: u64,
) -> Vec<(String, Estimate)> {
    // `--profile candle` estimates vramcal's own step: a sharded fix only where a simulated
    // rank runs it (`measure --shard` refuses, say, QLoRA or Mixtral under ZeRO-3), so that
    // each suggestion can be given back to `estimate`.
    let runs = |s: &TrainSpec, sh: Option<&Sharding>| {
        profile != Profile::Candle
            || sh.is_none_or(|sh| {
                crate::measure::sharded::check(sh, cfg, s, crate::spec::DeviceChoice::Cpu).is_ok()
            })
    };
    let mut alts: Vec<(String, Estimate)> = alternatives(cfg, spec, profile)
        .into_iter()
        .filter(|(_, s)| runs(s, sharding.as_ref()))
        .filter_map(|(n, s)| {
            estimate_sharded(cfg, &s, profile, c, sharding)
                .ok()
                .map(|x| (n, x))
        })
        .collect();
    if let Some(now) = sharding {
        // Already data-parallel: a deeper stage on the same GPUs, more GPUs, or offload.
        let mut tries: Vec<(String, Sharding)> = Vec::new();
        for (name, shard) in [("zero2", Shard::Zero2), ("zero3", Shard::Zero3)] {
            if shard != now.shard && (shard == Shard::Zero3 || spec.adaptation.lora.is_none()) {
                tries.push((
                    format!("{name} on the same {} GPUs (--shard {name})", now.gpus),
                    Sharding {
                        shard,
                        offload: crate::spec::Offload::None,
                        ..Sharding::new(shard, now.gpus)
                    },
                ));
            }
        }
        for gpus in [2 * now.gpus, 4 * now.gpus] {
            if now.shard != Shard::Ddp && gpus <= 64 {
                tries.push((
                    format!("{} over {gpus} GPUs (--gpus {gpus})", now.shard),
                    Sharding {
                        gpus,
                        gpus_per_node: now.gpus_per_node,
                        ..now
                    },
                ));
            }
        }
        if profile != Profile::Candle && now.offload == crate::spec::Offload::None {
            let shard = if now.shard == Shard::Ddp {
                Shard::Zero2
            } else {
                now.shard
            };
            let offload = if shard == Shard::Fsdp {
                crate::spec::Offload::OptimizerParams
            } else {
                crate::spec::Offload::Optimizer
            };
            tries.push((
                format!(
                    "{shard} with the optimizer offloaded (--shard {shard} --offload {offload})"
                ),
                Sharding {
                    shard,
                    offload,
                    ..now
                },
            ));
        }
        for (n, sh) in tries.into_iter().filter(|(_, sh)| runs(spec, Some(sh))) {
            // Offloaded, the step is the host's: `--torch-adamw` does not go with it.
            let (n, s) = without_torch_adamw(n, spec, &sh);
            if let Ok(x) = estimate_sharded(cfg, &s, profile, c, Some(sh)) {
                alts.push((n, x));
            }
        }
    }
    if sharding.is_none() {
        // The smallest number of GPUs that fits, per stage.
        let mut fitted: Vec<Shard> = Vec::new();
        for (n, shard, gpus) in sharded_alternatives(spec) {
            if fitted.contains(&shard) || !runs(spec, Some(&Sharding::new(shard, gpus))) {
                continue;
            }
            if let Ok(x) = estimate_sharded(cfg, spec, profile, c, Some(Sharding::new(shard, gpus)))
            {
                if x.needed_bytes() <= budget {
                    fitted.push(shard);
                }
                alts.push((n, x));
            }
        }
        // ZeRO-Offload on one GPU: the optimizer's states and step on the host (PyTorch stacks
        // with AdamW only; the host RAM it needs is named).
        if profile != Profile::Candle {
            let one = Sharding {
                offload: crate::spec::Offload::Optimizer,
                ..Sharding::new(Shard::Zero2, 1)
            };
            let (_, s) = without_torch_adamw(String::new(), spec, &one);
            if let Ok(x) = estimate_sharded(cfg, &s, profile, c, Some(one)) {
                let host = x.host_bytes_per_rank.unwrap_or(0);
                let (n, _) = without_torch_adamw(
                    format!(
                        "ZeRO-Offload on this GPU, {} GiB of host RAM (--shard zero2 --gpus 1 --offload optimizer)",
                        crate::size::gib(host)
                    ),
                    spec,
                    &one,
                );
                alts.push((n, x));
            }
        }
    }
    alts
}

/// `spec` without `--torch-adamw` where `sh` offloads the optimizer (its step runs on the
/// host, where `estimate` refuses the option), the fix's label `n` saying so.
fn without_torch_adamw(n: String, spec: &TrainSpec, sh: &Sharding) -> (String, TrainSpec) {
    if sh.offload == crate::spec::Offload::None || spec.torch_adamw.is_none() {
        return (n, spec.clone());
    }
    let mut s = spec.clone();
    s.torch_adamw = None;
    (format!("{n}, without --torch-adamw"), s)
}
