//! Model FLOPs per token, a table of common GPUs, and time-to-train projections from measured
//! throughput.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::spec::{lora_param_count, TrainSpec};

/// A GPU vramcal knows: memory and dense 16-bit tensor throughput from the vendor's datasheet.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Gpu {
    /// Name used on the command line and in output, e.g. `a100-80gb`.
    pub name: &'static str,
    /// Other spellings accepted for it (exact matches, case-insensitive; never prefixes).
    pub aliases: &'static [&'static str],
    /// `nvidia` or `amd`.
    pub vendor: &'static str,
    /// Market segment: `data-centre`, `workstation` or `consumer`.
    pub segment: &'static str,
    /// Memory a program can use (bytes): the total `nvidia-smi` reports where it is below the
    /// datasheet's capacity (ECC reserves part of the GDDR of data-centre cards: a T4 shows
    /// 15,360 MiB, an H100 81,559 MiB), else the capacity, in binary units where the memory is
    /// built of power-of-two chips (a "24 GB" GeForce holds 24 GiB).
    pub memory_bytes: u64,
    /// Peak dense (no sparsity) 16-bit tensor throughput (FLOP/s): bf16 where the card has it,
    /// fp16 otherwise (`bf16: false`), with fp32 accumulation (GeForce cards run fp16
    /// accumulation at twice this rate; training accumulates in fp32).
    pub peak_bf16_flops: f64,
    /// Whether the card computes bf16 (V100 and T4 have fp16 tensor cores only).
    pub bf16: bool,
    /// Where the figures come from.
    pub source: &'static str,
}

const GIB: u64 = 1 << 30;

/// Common cards, consumer to data centre (datasheet figures, dense 16-bit tensor FLOP/s, no
/// sparsity: half of the "with sparsity" figure datasheets lead with).
pub const GPUS: &[Gpu] = &[
    // NVIDIA data centre.
    Gpu {
        name: "v100-16gb",
        aliases: &["v100-16g", "tesla-v100-sxm2-16gb", "tesla-v100-pcie-16gb"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 16 * GIB,
        peak_bf16_flops: 125.0e12,
        bf16: false,
        source: "NVIDIA V100 Tensor Core GPU datasheet (2020): deep learning 125 TFLOPS (fp16 tensor, SXM2)",
    },
    Gpu {
        name: "v100-32gb",
        aliases: &["v100-32g", "tesla-v100-sxm2-32gb", "tesla-v100-pcie-32gb"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 32 * GIB,
        peak_bf16_flops: 125.0e12,
        bf16: false,
        source: "NVIDIA V100 Tensor Core GPU datasheet (2020): deep learning 125 TFLOPS (fp16 tensor, SXM2)",
    },
    Gpu {
        name: "t4-16gb",
        aliases: &["t4", "tesla-t4"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 15_360 << 20,
        peak_bf16_flops: 65.0e12,
        bf16: false,
        source: "NVIDIA T4 datasheet (2019): mixed precision (fp16/fp32) 65 TFLOPS; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "a10-24gb",
        aliases: &["a10"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 23_028 << 20,
        peak_bf16_flops: 125.0e12,
        bf16: true,
        source: "NVIDIA A10 datasheet (2021): BF16 tensor core 125 TF (250 TF with sparsity); memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "a10g-24gb",
        aliases: &["a10g"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 23_028 << 20,
        peak_bf16_flops: 70.0e12,
        bf16: true,
        source: "AWS EC2 G5 (A10G, a cloud variant of the A10 at lower tensor clocks): 70 TFLOPS bf16 as quoted by AWS; not an NVIDIA datasheet figure; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "l4-24gb",
        aliases: &["l4"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 23_034 << 20,
        peak_bf16_flops: 121.0e12,
        bf16: true,
        source: "NVIDIA L4 datasheet (2023): BF16 tensor core 242 TFLOPS with sparsity; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "l40-48gb",
        aliases: &["l40"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 46_068 << 20,
        peak_bf16_flops: 181.05e12,
        bf16: true,
        source: "NVIDIA L40 datasheet (2022): BF16 tensor core 362.1 TFLOPS with sparsity; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "l40s-48gb",
        aliases: &["l40s"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 46_068 << 20,
        peak_bf16_flops: 362.05e12,
        bf16: true,
        source: "NVIDIA L40S datasheet (2023): BF16 tensor core 362.05 TFLOPS dense (733 with sparsity); memory: nvidia-smi total (ECC on)",
    },
    Gpu {
        name: "a100-40gb",
        aliases: &["a100-40g", "a100-sxm4-40gb", "a100-pcie-40gb"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 40 * GIB,
        peak_bf16_flops: 312.0e12,
        bf16: true,
        source: "NVIDIA A100 datasheet (2021): BF16 tensor core 312 TFLOPS (624 with sparsity)",
    },
    Gpu {
        name: "a100-80gb",
        aliases: &["a100-80g", "a100-sxm4-80gb", "a100-80gb-pcie"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 80 * GIB,
        peak_bf16_flops: 312.0e12,
        bf16: true,
        source: "NVIDIA A100 datasheet (2021): BF16 tensor core 312 TFLOPS (624 with sparsity)",
    },
    Gpu {
        name: "h100-pcie-80gb",
        aliases: &["h100-pcie", "h100-pcie-80gb"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 81_559 << 20,
        peak_bf16_flops: 756.0e12,
        bf16: true,
        source: "NVIDIA H100 datasheet (2023), PCIe: BF16 tensor core 1,513 TFLOPS with sparsity; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "h100-80gb",
        aliases: &["h100-sxm", "h100-sxm-80gb", "h100-80gb-hbm3", "h100-sxm5-80gb"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 81_559 << 20,
        peak_bf16_flops: 989.0e12,
        bf16: true,
        source: "NVIDIA H100 datasheet (2023), SXM: BF16 tensor core 1,979 TFLOPS with sparsity; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "h100-nvl-94gb",
        aliases: &["h100-nvl"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 95_830 << 20,
        peak_bf16_flops: 835.0e12,
        bf16: true,
        source: "NVIDIA H100 datasheet (2023), NVL: BF16 tensor core 1,671 TFLOPS with sparsity, 94 GB; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "h200-141gb",
        aliases: &["h200", "h200-sxm"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 143_771 << 20,
        peak_bf16_flops: 989.0e12,
        bf16: true,
        source: "NVIDIA H200 datasheet (2024), SXM: BF16 tensor core 1,979 TFLOPS with sparsity; memory as nvidia-smi reported it on a lent H200 (143,771 MiB, results/h200/gpu-check.log)",
    },
    Gpu {
        name: "b200-180gb",
        aliases: &["b200"],
        vendor: "nvidia",
        segment: "data-centre",
        memory_bytes: 180 * 1_000_000_000,
        peak_bf16_flops: 2250.0e12,
        bf16: true,
        source: "NVIDIA DGX B200 datasheet (2024): 8 GPUs, 1,440 GB; HGX B200 FP16/BF16 tensor 36 PFLOPS with sparsity for 8",
    },
    // NVIDIA workstation.
    Gpu {
        name: "rtx-a6000-48gb",
        aliases: &["a6000", "rtx-a6000"],
        vendor: "nvidia",
        segment: "workstation",
        memory_bytes: 49_140 << 20,
        peak_bf16_flops: 154.8e12,
        bf16: true,
        source: "NVIDIA RTX A6000 datasheet (2021): tensor performance 309.7 TFLOPS with sparsity; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "rtx-6000-ada-48gb",
        aliases: &["rtx-6000-ada", "6000-ada", "rtx-6000-ada-generation"],
        vendor: "nvidia",
        segment: "workstation",
        memory_bytes: 49_140 << 20,
        peak_bf16_flops: 364.2e12,
        bf16: true,
        source: "NVIDIA RTX 6000 Ada Generation datasheet (2023): 1,457 TFLOPS FP8 with sparsity, i.e. 364.2 dense bf16; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    // NVIDIA consumer (fp32 accumulate).
    Gpu {
        name: "rtx3090-24gb",
        aliases: &["3090", "rtx-3090", "rtx3090"],
        vendor: "nvidia",
        segment: "consumer",
        memory_bytes: 24 * GIB,
        peak_bf16_flops: 71.0e12,
        bf16: true,
        source: "NVIDIA Ampere GA102 whitepaper (2020), RTX 3090: peak FP16/BF16 tensor with FP32 accumulate 71 TFLOPS",
    },
    Gpu {
        name: "rtx4080-16gb",
        aliases: &["4080", "rtx-4080", "rtx4080"],
        vendor: "nvidia",
        segment: "consumer",
        memory_bytes: 16 * GIB,
        peak_bf16_flops: 97.5e12,
        bf16: true,
        source: "NVIDIA Ada Lovelace architecture whitepaper (2022), RTX 4080 16GB: peak FP16/BF16 tensor with FP32 accumulate 97.5 TFLOPS",
    },
    Gpu {
        name: "rtx4090-24gb",
        aliases: &["4090", "rtx-4090", "rtx4090"],
        vendor: "nvidia",
        segment: "consumer",
        memory_bytes: 24_564 << 20,
        peak_bf16_flops: 165.2e12,
        bf16: true,
        source: "NVIDIA Ada Lovelace architecture whitepaper (2022), RTX 4090: peak FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS; memory: the nvidia-smi total users report (ECC reserve or driver share excluded)",
    },
    Gpu {
        name: "rtx5090-32gb",
        aliases: &["5090", "rtx-5090", "rtx5090"],
        vendor: "nvidia",
        segment: "consumer",
        memory_bytes: 32 * GIB,
        peak_bf16_flops: 209.5e12,
        bf16: true,
        source: "NVIDIA RTX Blackwell GPU architecture whitepaper (2025), RTX 5090: peak FP16/BF16 tensor with FP32 accumulate 209.5 TFLOPS",
    },
    // AMD.
    Gpu {
        name: "mi210-64gb",
        aliases: &["mi210"],
        vendor: "amd",
        segment: "data-centre",
        memory_bytes: 64 * GIB,
        peak_bf16_flops: 181.0e12,
        bf16: true,
        source: "AMD Instinct MI210 datasheet (2022): peak BF16 181 TFLOPs",
    },
    Gpu {
        name: "mi250x-gcd-64gb",
        aliases: &["mi250x", "mi250x-gcd"],
        vendor: "amd",
        segment: "data-centre",
        memory_bytes: 64 * GIB,
        peak_bf16_flops: 191.5e12,
        bf16: true,
        source: "AMD Instinct MI250X datasheet (2021): peak BF16 383 TFLOPs and 128 GB for the two dies (GCDs), each of which PyTorch sees as one device: per GCD 191.5 and 64 GB",
    },
    Gpu {
        name: "mi300x-192gb",
        aliases: &["mi300x"],
        vendor: "amd",
        segment: "data-centre",
        memory_bytes: 192 * GIB,
        peak_bf16_flops: 1307.4e12,
        bf16: true,
        source: "AMD Instinct MI300X datasheet (2023): peak BF16 1,307.4 TFLOPs dense",
    },
    Gpu {
        name: "mi325x-256gb",
        aliases: &["mi325x"],
        vendor: "amd",
        segment: "data-centre",
        memory_bytes: 256 * GIB,
        peak_bf16_flops: 1307.4e12,
        bf16: true,
        source: "AMD Instinct MI325X datasheet (2024): peak BF16 1,307.4 TFLOPs dense",
    },
    Gpu {
        name: "w7900-48gb",
        aliases: &["w7900", "radeon-pro-w7900"],
        vendor: "amd",
        segment: "workstation",
        memory_bytes: 48 * GIB,
        peak_bf16_flops: 122.6e12,
        bf16: true,
        source: "AMD Radeon PRO W7900 specifications (2023): peak half precision 122.6 TFLOPs",
    },
    Gpu {
        name: "rx7900xtx-24gb",
        aliases: &["7900xtx", "rx-7900-xtx", "rx7900xtx"],
        vendor: "amd",
        segment: "consumer",
        memory_bytes: 24 * GIB,
        peak_bf16_flops: 122.8e12,
        bf16: true,
        source: "AMD Radeon RX 7900 XTX specifications (2022): peak half precision 122.8 TFLOPs",
    },
];

/// Names that stand for several cards: the user must say which.
const AMBIGUOUS: &[(&str, &[&str])] = &[
    ("a100", &["a100-40gb", "a100-80gb"]),
    (
        "h100",
        &["h100-80gb (SXM)", "h100-pcie-80gb", "h100-nvl-94gb"],
    ),
    ("v100", &["v100-16gb", "v100-32gb"]),
    ("rtx-6000", &["rtx-a6000-48gb", "rtx-6000-ada-48gb"]),
];

/// Looks up a GPU by its name or one of its aliases (case-insensitive, `_` and spaces read as
/// `-`, an optional `nvidia-`/`amd-`/`geforce-` prefix ignored). A name that stands for several
/// cards (`a100`) is answered with the choices; nothing is matched by prefix or substring.
///
/// # Errors
/// [`Error::InvalidValue`] for an ambiguous or unknown name (pointing at `vramcal gpus`).
pub fn gpu(name: &str) -> Result<Gpu> {
    let mut n = name.trim().to_ascii_lowercase().replace(['_', ' '], "-");
    for prefix in ["nvidia-", "amd-", "geforce-"] {
        if let Some(rest) = n.strip_prefix(prefix) {
            n = rest.to_string();
        }
    }
    if let Some(g) = GPUS
        .iter()
        .find(|g| g.name == n || g.aliases.contains(&n.as_str()))
    {
        return Ok(*g);
    }
    if let Some((_, which)) = AMBIGUOUS.iter().find(|(a, _)| *a == n) {
        return Err(Error::invalid(
            "--gpu",
            name,
            format!(
                "several cards go by that name: say which ({})",
                which.join(" or ")
            ),
        ));
    }
    Err(Error::invalid(
        "--gpu",
        name,
        "unknown GPU: `vramcal gpus` lists the known ones; for another card give its memory as --budget (e.g. 24GiB) to estimate, and its peak as --peak-tflops to plan",
    ))
}

/// The GPU kind a measuring device is, if vramcal knows it: `cuda:0 (NVIDIA H200)` → `h200`
/// (the driver's name between the parentheses, looked up as [`gpu`] does); `None` for the CPU
/// or an unknown card.
pub fn gpu_of_device(device: &str) -> Option<Gpu> {
    let inner = device.split_once('(')?.1.strip_suffix(')')?;
    gpu(inner).ok()
}

/// Model FLOPs utilization assumed when projecting a fine-tune onto a GPU vramcal has not
/// measured it on (`plan --gpu X` from another device): 0.30, within the 25–45 % that
/// transformers' Trainer fine-tunes of 1–8B models commonly report on A100/H100 (PyTorch,
/// bf16, SDPA). `--mfu` replaces it with the user's own figure.
pub const DEFAULT_MFU: f64 = 0.30;

/// A fine-tune's time projected onto a GPU from model FLOPs: `tokens · flops_per_token /
/// (mfu · peak)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GpuProjection {
    /// The GPU projected onto.
    pub gpu: &'static str,
    /// Its dense 16-bit peak (FLOP/s).
    pub peak_flops: f64,
    /// The MFU assumed (fraction of the peak).
    pub mfu: f64,
    /// Where the MFU comes from (`--mfu` or the default).
    pub mfu_source: String,
    /// Projected wall time on one such GPU (seconds).
    pub seconds: f64,
    /// Projected GPU-hours.
    pub device_hours: f64,
}

/// Projects `plan`'s tokens onto `g` at `mfu`.
///
/// # Errors
/// [`Error::InvalidValue`] for an MFU outside (0, 1].
pub fn project_on_gpu(p: &Plan, g: &Gpu, mfu: f64, mfu_source: &str) -> Result<GpuProjection> {
    if !(mfu.is_finite() && (0.001..=1.0).contains(&mfu)) {
        return Err(Error::invalid(
            "--mfu",
            mfu,
            "must be a fraction of the peak between 0.001 and 1, e.g. 0.35",
        ));
    }
    let seconds = p.tokens as f64 * p.model_flops_per_token / (mfu * g.peak_bf16_flops);
    Ok(GpuProjection {
        gpu: g.name,
        peak_flops: g.peak_bf16_flops,
        mfu,
        mfu_source: mfu_source.to_string(),
        seconds,
        device_hours: seconds / 3600.0,
    })
}

/// Parameters that take part in matmuls for one token: every linear weight of the layers plus
/// the LM head (the embedding lookup does no arithmetic; a tied head is counted once, as the
/// head); of a mixture of experts the router and the `k` experts a token is routed to
/// (`k·3·h·i` per layer: Mixtral's active parameters).
pub fn matmul_params(cfg: &ModelConfig) -> u64 {
    let experts = cfg.moe().map_or(0, |m| {
        m.top_k as u64 * 3 * cfg.hidden_size as u64 * cfg.intermediate_size as u64
    });
    let per_layer: u64 = experts
        + cfg
            .param_shapes()
            .iter()
            .filter(|p| p.name.starts_with("model.layers.0.") && p.shape.len() == 2)
            .map(|p| p.numel())
            .sum::<u64>();
    per_layer * cfg.num_hidden_layers as u64 + (cfg.vocab_size as u64 * cfg.hidden_size as u64)
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
    /// Tokens the device computes in total (with `--seq-lengths`: real tokens plus padding).
    pub tokens: u64,
    /// Tokens of the data trained on in total (without padding); `tokens` without
    /// `--seq-lengths`.
    pub real_tokens: u64,
    /// One epoch of the data set, with `--seq-lengths`.
    pub data: Option<crate::data::Epoch>,
    /// How the data set was batched (`--packing`, `--padding longest`, …) and, padded to the
    /// longest, the sampler; with `--seq-lengths`.
    pub batching: Option<String>,
    /// The measured step's peak (bytes), set by `plan`.
    pub peak_bytes: Option<u64>,
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
    /// The same tokens projected onto another GPU than the measuring device (`plan --gpu`).
    pub on_gpu: Option<GpuProjection>,
}

/// Projects `examples × epochs` sequences of `spec.seq` tokens at `tokens_per_second`, or,
/// with `data` (one epoch of `--seq-lengths`), `epochs` of its processed tokens and optimizer
/// steps (`examples` is then its sequence count).
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
    data: Option<&crate::data::Epoch>,
) -> Result<Plan> {
    let examples = data.map_or(examples, |d| d.sequences);
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
    let per_step = spec.batch as u64 * spec.accumulate as u64;
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
    let (steps, tokens, real_tokens) = match data {
        None => {
            let tokens = examples
                .checked_mul(epochs)
                .and_then(|x| x.checked_mul(spec.seq as u64))
                .ok_or_else(too_big)?;
            (steps, tokens, tokens)
        }
        Some(d) => (
            d.optimizer_steps.checked_mul(epochs).ok_or_else(too_big)?,
            d.processed_tokens.checked_mul(epochs).ok_or_else(too_big)?,
            d.real_tokens.checked_mul(epochs).ok_or_else(too_big)?,
        ),
    };
    let seconds = tokens as f64 / tokens_per_second;
    let f = model_flops_per_token(cfg, spec);
    let achieved = f * tokens_per_second;
    Ok(Plan {
        examples,
        epochs,
        seq: spec.seq,
        tokens,
        real_tokens,
        data: data.copied(),
        batching: None,
        peak_bytes: None,
        steps,
        tokens_per_second,
        seconds,
        device_hours: seconds / 3600.0,
        model_flops_per_token: f,
        achieved_flops: achieved,
        mfu: peak_flops.map(|p| achieved / p),
        peak_flops,
        on_gpu: None,
    })
}

/// PyTorch runs vramcal measured on a GPU kind (`scripts/torch_reference.py` under
/// `scripts/gpu-check.sh`: PyTorch + transformers, SDPA, bf16, `torch.optim.AdamW`), built in so
/// that an installed binary has them: (GPU, file, contents).
const TORCH_RUNS: [(&str, &str, &str); 2] = [
    (
        "h200-141gb",
        "results/h200/torch-mistral-7b-v0.1.csv",
        include_str!("../results/h200/torch-mistral-7b-v0.1.csv"),
    ),
    (
        "h200-141gb",
        "results/h200/torch-smollm2-135m.csv",
        include_str!("../results/h200/torch-smollm2-135m.csv"),
    ),
];

/// The MFU PyTorch reached on `g` in vramcal's reference runs of the largest model measured
/// there, for full fine-tuning or for LoRA/QLoRA as `spec` is: the median over those runs of
/// model FLOPs per token × tokens/s ÷ the datasheet peak, and a sentence saying so. `None` where
/// vramcal has no such run.
pub fn measured_mfu(g: &Gpu, spec: &crate::spec::TrainSpec) -> Option<(f64, String)> {
    let lora = spec.adaptation.lora.is_some();
    let mut best: Option<(u64, String, &str, Vec<f64>)> = None;
    for (gpu, file, text) in TORCH_RUNS {
        if gpu != g.name {
            continue;
        }
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        for (i, raw) in rdr
            .deserialize::<crate::calibrate::reference::ReferenceRow>()
            .enumerate()
        {
            let Ok(raw) = raw else { continue };
            let Ok(p) = crate::calibrate::reference::Reference::parse(
                std::path::Path::new(file),
                i + 2,
                &raw,
            ) else {
                continue;
            };
            let Some(step) = p.step_seconds_median.filter(|&t| p.usable && t > 0.0) else {
                continue;
            };
            if p.spec.adaptation.lora.is_some() != lora {
                continue;
            }
            let (Ok(m), s) = (crate::config::resolve_model(&p.model), &p.spec) else {
                continue;
            };
            let params = m.config.param_count();
            let mfu = model_flops_per_token(&m.config, s) * (s.batch * s.seq) as f64
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Mixtral-8x7B's matmul parameters per token are its active parameters: with the
    /// embedding (131,072,000) they make Mistral AI's 12.9 billion ("Mixtral of experts",
    /// 2024: "13B active parameters"), not the 46.7 billion it holds.
    #[test]
    fn mixtral_counts_its_active_parameters() {
        let cfg = crate::config::preset("mixtral-8x7b-v0.1").unwrap().config;
        let per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 4096 + 2 * 3 * 4096 * 14336;
        assert_eq!(matmul_params(&cfg), 32 * per_layer + 32000 * 4096);
        let active = matmul_params(&cfg) + 32000 * 4096;
        assert!((12.8e9..13.0e9).contains(&(active as f64)), "{active}");
    }
}
