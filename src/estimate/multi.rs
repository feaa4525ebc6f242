//! More than one GPU, on paper: per-GPU memory under ZeRO/FSDP sharding, and a device map that
//! places whole decoder layers on devices for loading or inference.

use serde::Serialize;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::spec::{Shard, TrainSpec};

/// Per-GPU bytes of the sharded parts. Only trainable parameters have gradients and optimizer
/// states, so only they are counted there (DeepSpeed's own estimators also count frozen
/// parameters there, a known complaint); with ZeRO-3 every parameter is sharded and one
/// layer's parameters are gathered at a time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sharded {
    /// Weights held per GPU (bytes), including one gathered layer under ZeRO-3.
    pub weights: u64,
    /// Gradients per GPU (bytes).
    pub gradients: u64,
    /// Optimizer states per GPU (bytes).
    pub optimizer_states: u64,
}

/// Applies `shard` over `gpus` to whole-model `weights`, `gradients`, `states` (bytes).
///
/// # Errors
/// [`Error::InvalidValue`] for zero GPUs.
pub fn shard(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    s: Shard,
    gpus: usize,
    weights: u64,
    gradients: u64,
    states: u64,
) -> Result<Sharded> {
    if gpus == 0 {
        return Err(Error::invalid("--gpus", 0, "must be at least 1"));
    }
    let g = gpus as u64;
    let layer_params: u64 = cfg
        .param_shapes()
        .iter()
        .filter(|p| p.name.starts_with("model.layers.0."))
        .map(|p| p.numel() as u64)
        .sum();
    let gathered = layer_params * spec.dtype.size_in_bytes() as u64;
    Ok(match s {
        Shard::Zero1 => Sharded {
            weights,
            gradients,
            optimizer_states: states.div_ceil(g),
        },
        Shard::Zero2 => Sharded {
            weights,
            gradients: gradients.div_ceil(g),
            optimizer_states: states.div_ceil(g),
        },
        Shard::Zero3 => Sharded {
            weights: weights.div_ceil(g) + if gpus > 1 { gathered } else { 0 },
            gradients: gradients.div_ceil(g),
            optimizer_states: states.div_ceil(g),
        },
    })
}

/// Where each module goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// Module name (`model.embed_tokens`, `model.layers.3`, `model.norm+lm_head`).
    pub module: String,
    /// Device index.
    pub device: usize,
    /// Bytes of its parameters.
    pub bytes: u64,
}

/// Parses `--max-memory 0=24GiB,1=24GiB` into per-device budgets (bytes), in device order.
///
/// # Errors
/// [`Error::InvalidValue`] for malformed entries, sizes, or devices not numbered 0..n.
pub fn parse_max_memory(s: &str) -> Result<Vec<u64>> {
    let mut v: Vec<(usize, u64)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (d, size) = item.split_once('=').ok_or_else(|| {
            Error::invalid("--max-memory", item, "expected DEVICE=SIZE, e.g. 0=24GiB")
        })?;
        let d: usize = d
            .trim()
            .parse()
            .map_err(|_| Error::invalid("--max-memory", item, "the device must be a number"))?;
        v.push((d, crate::size::parse_size("--max-memory", size)?));
    }
    v.sort();
    if v.is_empty() || v.iter().enumerate().any(|(i, (d, _))| *d != i) {
        return Err(Error::invalid(
            "--max-memory",
            s,
            "give every device from 0 up once, e.g. 0=24GiB,1=24GiB",
        ));
    }
    Ok(v.into_iter().map(|(_, b)| b).collect())
}

/// Places the embedding, each decoder layer and the head (final norm + LM head) in order,
/// filling device 0 first, like accelerate's `infer_auto_device_map` for a sequential model.
/// Weights only, in the spec's dtype (NF4 layers at their packed size).
///
/// # Errors
/// [`Error::InvalidValue`] naming the module that does not fit and the bytes missing.
pub fn device_map(cfg: &ModelConfig, spec: &TrainSpec, budgets: &[u64]) -> Result<Vec<Placement>> {
    let shapes = cfg.param_shapes();
    let d = spec.dtype.size_in_bytes() as u64;
    let bytes_of = |prefix: &str| -> u64 {
        shapes
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .map(|p| {
                let n = p.numel() as u64;
                match spec.adaptation.quant {
                    crate::spec::Quant::Nf4 { .. } if p.name.ends_with("_proj.weight") => {
                        n.div_ceil(2) + n.div_ceil(64) * 4
                    }
                    _ => n * d,
                }
            })
            .sum()
    };
    let mut modules = vec![(
        "model.embed_tokens".to_string(),
        bytes_of("model.embed_tokens."),
    )];
    for l in 0..cfg.num_hidden_layers {
        modules.push((
            format!("model.layers.{l}"),
            bytes_of(&format!("model.layers.{l}.")),
        ));
    }
    // A tied head shares the embedding; only the final norm is new.
    modules.push((
        "model.norm+lm_head".to_string(),
        bytes_of("model.norm.") + bytes_of("lm_head."),
    ));
    let mut out = Vec::new();
    let (mut dev, mut used) = (0usize, 0u64);
    for (name, b) in modules {
        while dev < budgets.len() && used + b > budgets[dev] {
            dev += 1;
            used = 0;
        }
        if dev == budgets.len() {
            let total: u64 = budgets.iter().sum();
            return Err(Error::invalid(
                "--max-memory",
                format!("{} GiB in all", crate::size::gib(total)),
                format!("{name} ({b} bytes) does not fit on any remaining device; the weights need {} GiB", crate::size::gib(crate::estimate::weight_bytes(cfg, spec))),
            ));
        }
        used += b;
        out.push(Placement {
            module: name,
            device: dev,
            bytes: b,
        });
    }
    Ok(out)
}
