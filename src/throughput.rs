//! Model FLOPs per token, a table of common GPUs, and time-to-train projections from measured
//! throughput.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::spec::{lora_param_count, TrainSpec};

/// A GPU vramcal knows: memory and dense bf16 tensor throughput from the vendor's datasheet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    /// Short name used on the command line, e.g. `a100-80gb`.
    pub name: &'static str,
    /// Memory on the card (bytes; what `nvidia-smi` reports as total).
    pub memory_bytes: u64,
    /// Peak dense bf16 tensor-core throughput (FLOP/s), without sparsity.
    pub peak_bf16_flops: f64,
    /// Where the figures come from.
    pub source: &'static str,
}

const GIB: u64 = 1 << 30;

/// Common cards (datasheet figures, dense bf16, no sparsity).
pub const GPUS: [Gpu; 8] = [
    Gpu {
        name: "a100-40gb",
        memory_bytes: 40 * GIB,
        peak_bf16_flops: 312e12,
        source: "NVIDIA A100 datasheet (2021)",
    },
    Gpu {
        name: "a100-80gb",
        memory_bytes: 80 * GIB,
        peak_bf16_flops: 312e12,
        source: "NVIDIA A100 datasheet (2021)",
    },
    Gpu {
        name: "h100-80gb",
        memory_bytes: 80 * GIB,
        peak_bf16_flops: 989e12,
        source: "NVIDIA H100 SXM datasheet (2023)",
    },
    Gpu {
        name: "h200-141gb",
        memory_bytes: 141 * 1_000_000_000,
        peak_bf16_flops: 989e12,
        source: "NVIDIA H200 SXM datasheet (2024)",
    },
    Gpu {
        name: "l4-24gb",
        memory_bytes: 24 * GIB,
        peak_bf16_flops: 121e12,
        source: "NVIDIA L4 datasheet (2023)",
    },
    Gpu {
        name: "a10g-24gb",
        memory_bytes: 24 * GIB,
        peak_bf16_flops: 70e12,
        source: "NVIDIA A10 datasheet (2021)",
    },
    Gpu {
        name: "rtx4090-24gb",
        memory_bytes: 24 * GIB,
        peak_bf16_flops: 165e12,
        source: "NVIDIA Ada GPU architecture whitepaper (RTX 4090, FP32 accumulate: 165 TFLOPS)",
    },
    Gpu {
        name: "rtx3090-24gb",
        memory_bytes: 24 * GIB,
        peak_bf16_flops: 71e12,
        source: "NVIDIA Ampere GA102 whitepaper (RTX 3090)",
    },
];

/// Looks up a GPU by name (`a100-80gb`, `h100`, …: a unique prefix is enough).
///
/// # Errors
/// [`Error::InvalidValue`] listing the known names.
pub fn gpu(name: &str) -> Result<Gpu> {
    let n = name.to_ascii_lowercase();
    let hits: Vec<&Gpu> = GPUS
        .iter()
        .filter(|g| g.name == n || g.name.starts_with(&n))
        .collect();
    match hits.as_slice() {
        [g] => Ok(**g),
        _ => Err(Error::invalid(
            "--gpu",
            name,
            format!(
                "unknown or ambiguous GPU (known: {})",
                GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Parameters that take part in matmuls: every linear weight of the layers plus the LM head
/// (the embedding lookup does no arithmetic; a tied head is counted once, as the head).
pub fn matmul_params(cfg: &ModelConfig) -> u64 {
    let per_layer: u64 = cfg
        .param_shapes()
        .iter()
        .filter(|p| p.name.starts_with("model.layers.0.") && p.shape.len() == 2)
        .map(|p| p.numel() as u64)
        .sum();
    per_layer * cfg.num_hidden_layers as u64 + (cfg.vocab_size * cfg.hidden_size) as u64
}

/// Model FLOPs per trained token, without recomputation (the convention MFU uses).
///
/// Full fine-tuning: `6·N + 12·L·H·Q·T` (Chowdhery et al. 2022, PaLM, Appendix B: `N` matmul
/// parameters, `L` layers, `H` heads, `Q` head width, `T` sequence; the attention term counts
/// the full score matrix, as the eager implementation computes it). LoRA: the weight-gradient
/// matmuls of the frozen weights are skipped, so `4·N + 6·N_lora + 12·L·H·Q·T` (forward 2·N,
/// input gradients 2·N; adapters trained in full).
pub fn model_flops_per_token(cfg: &ModelConfig, spec: &TrainSpec) -> f64 {
    let n = matmul_params(cfg) as f64;
    let attn =
        12.0 * (cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim() * spec.seq) as f64;
    match &spec.adaptation.lora {
        None => 6.0 * n + attn,
        Some(l) => 4.0 * n + 6.0 * lora_param_count(cfg, l) as f64 + attn,
    }
}

/// A projection of a whole fine-tune from measured throughput.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Plan {
    /// Examples per epoch.
    pub examples: u64,
    /// Epochs.
    pub epochs: u64,
    /// Tokens per example (the measured `seq`).
    pub seq: usize,
    /// Tokens trained in total.
    pub tokens: u64,
    /// Optimizer steps (`ceil(examples / (micro_batch·accumulate))·epochs`).
    pub steps: u64,
    /// Measured throughput (tokens/s).
    pub tokens_per_second: f64,
    /// Projected wall time (seconds).
    pub seconds: f64,
    /// Projected device-hours (one device).
    pub device_hours: f64,
    /// Model FLOPs per token.
    pub model_flops_per_token: f64,
    /// Achieved model FLOP/s.
    pub achieved_flops: f64,
    /// Model FLOPs utilization against `peak_flops`, when a peak is known.
    pub mfu: Option<f64>,
    /// Peak FLOP/s used for the MFU.
    pub peak_flops: Option<f64>,
}

/// Projects `examples × epochs` sequences of `spec.seq` tokens at `tokens_per_second`.
///
/// # Errors
/// [`Error::InvalidValue`] for zero examples or epochs or a non-positive throughput.
pub fn plan(
    cfg: &ModelConfig,
    spec: &TrainSpec,
    examples: u64,
    epochs: u64,
    tokens_per_second: f64,
    peak_flops: Option<f64>,
) -> Result<Plan> {
    if examples == 0 {
        return Err(Error::invalid("--examples", 0, "must be at least 1"));
    }
    if epochs == 0 {
        return Err(Error::invalid("--epochs", 0, "must be at least 1"));
    }
    if !(tokens_per_second.is_finite() && tokens_per_second > 0.0) {
        return Err(Error::invalid(
            "throughput",
            tokens_per_second,
            "the measurement gave no positive tokens/s",
        ));
    }
    let per_step = (spec.batch * spec.accumulate) as u64;
    let too_big = || {
        Error::invalid(
            "--examples × --epochs × --seq",
            format!("{examples} × {epochs} × {}", spec.seq),
            "overflows 64 bits",
        )
    };
    let steps = examples
        .div_ceil(per_step)
        .checked_mul(epochs)
        .ok_or_else(too_big)?;
    let tokens = examples
        .checked_mul(epochs)
        .and_then(|x| x.checked_mul(spec.seq as u64))
        .ok_or_else(too_big)?;
    let seconds = tokens as f64 / tokens_per_second;
    let f = model_flops_per_token(cfg, spec);
    let achieved = f * tokens_per_second;
    Ok(Plan {
        examples,
        epochs,
        seq: spec.seq,
        tokens,
        steps,
        tokens_per_second,
        seconds,
        device_hours: seconds / 3600.0,
        model_flops_per_token: f,
        achieved_flops: achieved,
        mfu: peak_flops.map(|p| achieved / p),
        peak_flops,
    })
}
