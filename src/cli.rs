//! Command-line definitions (clap). One subcommand per verb; the work is in
//! [`crate::commands`]. Options that name the training setup are typed here: clap parses them
//! through the `FromStr` of their [`crate::spec`] type (the one parser per type), and `main`
//! prints that parser's error as the one `error:` line.

use std::path::PathBuf;

use candle_core::DType;
use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::spec::{
    parse_dtype, Attention, Axis, Checkpointing, LoraConfig, Method, Offload, Optimizer, Precision,
    Profile, Quant, SaveMode, Shard,
};

/// `--dtype`: a dtype name ([`parse_dtype`]).
fn dtype_arg(s: &str) -> Result<DType> {
    parse_dtype(s).map_err(|_| Error::invalid("--dtype", s, "expected f32, bf16, f16 or f64"))
}

/// `--optimizer-state-dtype`: a dtype name ([`parse_dtype`]).
fn state_dtype_arg(s: &str) -> Result<DType> {
    parse_dtype(s).map_err(|_| {
        Error::invalid(
            "--optimizer-state-dtype",
            s,
            "expected f32, bf16, f16 or f64",
        )
    })
}

/// A fraction for `check`'s thresholds: `0.03`, or a percentage such as `3%` (= 0.03). The
/// range is checked by `check`.
fn fraction_arg(s: &str) -> std::result::Result<f64, String> {
    let (num, scale) = match s.trim().strip_suffix('%') {
        Some(p) => (p.trim(), 0.01),
        None => (s.trim(), 1.0),
    };
    num.parse::<f64>()
        .map(|v| v * scale)
        .map_err(|_| "expected a fraction such as 0.03 or a percentage such as 3%".to_string())
}

/// `--budget`: a size ([`crate::size::parse_size`]), bytes.
fn budget_arg(s: &str) -> Result<u64> {
    crate::size::parse_size("--budget", s)
}

/// vramcal: will this fine-tuning configuration fit, and how long will a step take?
/// Measures real training steps (forward, loss, backward, AdamW) and records the peak
/// allocator memory of every phase.
#[derive(Debug, Parser)]
#[command(
    name = "vramcal",
    version,
    about = "Measures the peak memory of real LLM fine-tuning steps, phase by phase (full, LoRA, QLoRA, checkpointing; CPU)",
    long_about = None,
    allow_negative_numbers = true
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the built-in model presets with exact parameter counts.
    #[command(after_help = "Examples:\n  vramcal models\n  vramcal models --json")]
    Models {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the GPUs `--gpu` accepts: memory (bytes) and dense 16-bit peak FLOP/s from their
    /// datasheets, with the aliases each answers to.
    #[command(after_help = "Examples:\n  vramcal gpus\n  vramcal gpus --json")]
    Gpus {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure one training configuration: two real steps, peak memory per phase.
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  vramcal measure --model smollm2-135m --batch 1 --seq 256\n  vramcal measure --model smollm2-135m --method qlora --lora r=16,alpha=32,targets=all-linear --checkpointing layers --batch 2 --seq 512 --save adapter\n  vramcal measure --model tiny --batch 2 --accumulate 4 --seq 32\n  vramcal measure --model smollm2-135m --weights ~/.cache/vramcal/models/SmolLM2-135M-Instruct.Q4_1.gguf --batch 1 --seq 128 --out results/cpu/mine.csv\n  vramcal measure --model path/to/config.json --batch 2 --seq 512 --dtype bf16 --json"
    )]
    Measure(MeasureArgs),
    /// Measure a grid of batch × seq points, each in its own process, one CSV row per point.
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  vramcal sweep --model smollm2-135m --batch 1,2 --seq 64,128,256\n  vramcal sweep --model smollm2-135m --method full,lora,qlora --lora r=8,targets=q_proj,v_proj --checkpointing none,layers --batch 1 --seq 128,256 --save adapter\n  vramcal sweep --model tiny --batch 1,2,4 --seq 16,32 --out /tmp/tiny.csv"
    )]
    Sweep(SweepArgs),
    /// Join result CSVs (a sharded sweep's parts) into one, refusing conflicting rows.
    #[command(
        after_help = "Examples:\n  vramcal merge parts/part-*.csv --out results/cpu/mine.csv\n  vramcal merge old.csv new.csv --out all.csv --keep newest"
    )]
    Merge(MergeArgs),
    /// Write a Slurm job-array script that runs a sweep in parts, one array task per part.
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  vramcal slurm --tasks 8 --dir sweep-parts -- --model smollm2-135m --device cuda --batch 1,2,4 --seq 512,1024,2048\n  sbatch sweep-parts/sweep.sbatch\n  vramcal merge sweep-parts/part-*.csv --out results.csv"
    )]
    Slurm(SlurmArgs),
    /// Find the largest micro-batch (or sequence) that fits in a memory budget, by measurement.
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  vramcal max --model smollm2-135m --seq 256 --budget 4GiB\n  vramcal max --model smollm2-135m --axis seq --batch 1 --budget 3GiB --method lora --checkpointing layers"
    )]
    Max(MaxArgs),
    /// Project the time of a whole fine-tune from a measured step (tokens/s, device-hours, MFU).
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  vramcal plan --model smollm2-135m --examples 10000 --seq 1024 --epochs 1\n  vramcal plan --model smollm2-135m --method lora --batch 2 --seq 512 --examples 50000 --peak-tflops 1.5"
    )]
    Plan(PlanArgs),
    /// Predict the peak memory of a configuration, itemized, with reference formulas and a
    /// fits-on verdict.
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  vramcal estimate --model mistral-7b-v0.1 --batch 1 --seq 1024 --dtype bf16 --gpu a100-80gb\n  vramcal estimate --model llama-3-8b --method qlora --lora r=16,targets=all-linear --checkpointing layers --batch 2 --seq 2048 --dtype bf16 --budget 24GiB\n  vramcal estimate --model smollm2-135m --batch 2 --seq 512 --profile candle --calibration results/calibration/cpu-candle.csv --json",
        mut_arg("weights", |a| a.hide(true)),
        mut_arg("lr", |a| a.hide(true)),
        mut_arg("weight_decay", |a| a.hide(true)),
        mut_arg("device", |a| a.hide(true)),
        mut_arg("seed", |a| a.hide(true)),
        mut_arg("data_seed", |a| a.hide(true)),
        mut_arg("save", |a| a.hide(true)),
        mut_arg("merge_save", |a| a.hide(true)),
        mut_arg("save_dir", |a| a.hide(true)),
        mut_arg("timed_steps", |a| a.hide(true)),
        mut_arg("budget", |a| a.help("Verdict against this memory instead of a GPU's, e.g. 24GiB (units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
        mut_arg("model", |a| a.help("Model: a preset (see `vramcal models`), a config.json or a folder holding one, or a Hugging Face model id (org/name), whose config.json alone is read from the local cache or downloaded (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE honoured)"))
    )]
    Estimate(EstimateArgs),
    /// Fit the estimator's coefficients to measured CSVs and write a calibration table.
    #[command(
        after_help = "Examples:\n  vramcal calibrate --measured results/cpu/smollm2-135m.csv results/cpu/smollm2-135m-peft.csv"
    )]
    Calibrate(CalibrateArgs),
    /// Compare estimates with measurements; exit non-zero when accuracy thresholds are exceeded.
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  vramcal check --measured results/cpu/*.csv --calibration results/calibration/cpu-candle.csv --max-error 0.03 --max-median-error 0.01\n  vramcal check --measured ../shared/cases/public-measurements.csv --profile torch-sdpa"
    )]
    Check(CheckArgs),
    /// Plot measured vs estimated peaks and the estimate's components (SVG and PNG) with an
    /// index.md.
    #[command(
        after_help = "Examples:\n  vramcal report --measured results/cpu/smollm2-135m.csv results/cpu/smollm2-135m-peft.csv --calibration results/calibration/cpu-candle.csv --out report"
    )]
    Report(ReportArgs),
}

/// `vramcal report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Measured CSVs made by vramcal.
    #[arg(long, num_args = 1.., required = true)]
    pub measured: Vec<PathBuf>,
    /// Profile of the estimates.
    #[arg(long, default_value = "candle")]
    pub profile: Profile,
    /// Calibration table (default: uncalibrated coefficients).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Output folder.
    #[arg(long, default_value = "report")]
    pub out: PathBuf,
}

/// `vramcal estimate`.
#[derive(Debug, Clone, Args)]
pub struct EstimateArgs {
    /// The model and training setup (--weights is not used).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Micro-batch.
    #[arg(long, visible_alias = "micro-batch", default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sequence; with --seq-lengths the row length (--packing), the padded length
    /// (--padding max) or the truncation length.
    #[arg(long, required_unless_present = "seq_lengths")]
    pub seq: Option<usize>,
    /// Lengths from data: the micro-batch estimated is the largest the data can form.
    #[command(flatten)]
    pub data: DataArgs,
    /// Fine-tuning method and checkpointing.
    #[command(flatten)]
    pub how: MethodArgs,
    /// Which training stack to predict: torch-sdpa (PyTorch + transformers with SDPA
    /// attention, what most fine-tunes run), torch-eager (eager attention) or candle
    /// (vramcal's own step, as `vramcal measure` runs it).
    #[arg(long, default_value = "torch-sdpa")]
    pub profile: Profile,
    /// Calibration table from `vramcal calibrate` (default: uncalibrated coefficients).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Verdict against this GPU's memory (`vramcal gpus` lists the names).
    #[arg(long)]
    pub gpu: Option<String>,
    /// Per-GPU memory of data-parallel training: ddp (DistributedDataParallel, nothing sharded),
    /// zero1, zero2, zero3 (DeepSpeed) or fsdp (FSDP, full sharding).
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Data-parallel GPUs for --shard.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// The same as --gpus (torchrun's word, and `measure --shard`'s).
    #[arg(long, conflicts_with = "gpus")]
    pub world_size: Option<usize>,
    /// With --shard: the rank estimated, from 0 [default: 0, whose partition is the largest].
    #[arg(long, requires = "shard")]
    pub rank: Option<usize>,
    /// With --shard: state moved to host RAM, none, optimizer (DeepSpeed ZeRO-Offload) or
    /// optimizer+params (ZeRO-3 parameter offload, FSDP CPUOffload); the estimate adds the host
    /// RAM per rank and per node.
    #[arg(long)]
    pub offload: Option<Offload>,
    /// With --shard zero1, zero2 or zero3: DeepSpeed's reduce_bucket_size in gradient elements
    /// (DeepSpeed's default 500000000; HF's "auto" is hidden_size²).
    #[arg(long)]
    pub reduce_bucket_size: Option<u64>,
    /// With --offload: GPUs per node, for host RAM per node [default: --gpus, one node].
    #[arg(long)]
    pub gpus_per_node: Option<usize>,
    /// Print a device map placing whole layers on the devices of --max-memory (loading or
    /// inference: weights only), like accelerate's infer_auto_device_map.
    #[arg(long)]
    pub device_map: bool,
    /// Per-device memory for --device-map, e.g. `0=24GiB,1=24GiB`.
    #[arg(long)]
    pub max_memory: Option<String>,
    /// Measured results (vramcal's CSVs for --profile candle, reference rows for the torch
    /// profiles): rows of the same configuration are shown beside the estimate.
    #[arg(long, num_args = 1..)]
    pub measured: Vec<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Sequence lengths from a data set and how they are batched (`src/data.rs`).
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Sequence lengths of the data set (tokens): one count per line, or JSON Lines with an
    /// integer `length` field. The micro-batch estimated or measured is the largest they can
    /// form.
    #[arg(long)]
    pub seq_lengths: Option<PathBuf>,
    /// Pack the sequences into rows of --seq tokens (TRL's packing).
    #[arg(long, requires = "seq_lengths", conflicts_with_all = ["padding", "padding_free"])]
    pub packing: bool,
    /// Pad each micro-batch to its `longest` sequence (the default) or every sequence to `max`
    /// = --seq (transformers' DataCollatorWithPadding).
    #[arg(long, requires = "seq_lengths")]
    pub padding: Option<crate::data::Padding>,
    /// Concatenate a micro-batch's sequences into one row without padding, positions restarting
    /// per sequence (transformers' DataCollatorWithFlattening; the torch profiles only).
    #[arg(long, requires = "seq_lengths", conflicts_with = "padding")]
    pub padding_free: bool,
}

impl DataArgs {
    /// The batching these options select.
    pub fn batching(&self) -> crate::data::Batching {
        use crate::data::{Batching, Padding};
        match (self.packing, self.padding_free, self.padding) {
            (true, _, _) => Batching::Packed,
            (_, true, _) => Batching::PaddingFree,
            (_, _, Some(Padding::Max)) => Batching::PadMax,
            _ => Batching::PadLongest,
        }
    }
}

/// `vramcal calibrate`.
#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// Measured CSVs made by vramcal.
    #[arg(long, num_args = 1.., required = true)]
    pub measured: Vec<PathBuf>,
    /// Profile to fit.
    #[arg(long, default_value = "candle")]
    pub profile: Profile,
    /// Rows to hold out of the fit and report separately: `largest-seq` or `none`.
    #[arg(long, default_value = "largest-seq")]
    pub holdout: crate::calibrate::Holdout,
    /// Output table (default `<device>-<profile>-calibration.csv` in the current folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `vramcal check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Measured CSVs: vramcal's own, or a published-measurements file like
    /// `../shared/cases/public-measurements.csv`.
    #[arg(long, num_args = 1.., required = true)]
    pub measured: Vec<PathBuf>,
    /// Profile to check.
    #[arg(long, default_value = "candle")]
    pub profile: Profile,
    /// Calibration table (default: uncalibrated coefficients).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Fail when any row's absolute relative error exceeds this (e.g. 0.03 or 3%).
    #[arg(long, value_parser = fraction_arg)]
    pub max_error: Option<f64>,
    /// Fail when the median absolute relative error exceeds this (e.g. 0.01 or 1%).
    #[arg(long, value_parser = fraction_arg)]
    pub max_median_error: Option<f64>,
    /// Safety margin added to estimates when counting under-estimates (e.g. 0.03 or 3%).
    #[arg(long, default_value = "0", value_parser = fraction_arg)]
    pub margin: f64,
    /// Write the per-row table as CSV here.
    #[arg(long)]
    pub out_csv: Option<PathBuf>,
    /// Write the per-row table and summary as Markdown here.
    #[arg(long)]
    pub out_md: Option<PathBuf>,
}

/// `vramcal max`.
#[derive(Debug, Clone, Args)]
pub struct MaxArgs {
    /// The model and training setup (--budget is required).
    #[command(flatten)]
    pub model: ModelArgs,
    /// The size to search: `batch` (micro-batch at fixed --seq) or `seq` (at fixed --batch).
    #[arg(long, default_value = "batch")]
    pub axis: Axis,
    /// Micro-batch (fixed when searching seq).
    #[arg(long, visible_alias = "micro-batch", default_value_t = 1)]
    pub batch: usize,
    /// Tokens per sequence (fixed when searching batch).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Fine-tuning method and checkpointing.
    #[command(flatten)]
    pub how: MethodArgs,
    /// Largest size to try (default: 4096 for batch, max_position_embeddings for seq).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Also append every probe's row to this CSV.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Calibration table for the estimator's answer printed beside the measured one.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
}

/// `vramcal plan`.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// The model and training setup.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Micro-batch.
    #[arg(long, visible_alias = "micro-batch", default_value_t = 1)]
    pub batch: usize,
    /// Tokens per example (the measured sequence length); with --seq-lengths the truncation,
    /// padding or packing length.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Fine-tuning method and checkpointing.
    #[command(flatten)]
    pub how: MethodArgs,
    /// Sequence lengths of the data set, and how they are batched: the step measured is the
    /// largest micro-batch they form, the tokens projected those of one epoch.
    #[command(flatten)]
    pub data: DataArgs,
    /// With --seq-lengths padded to the longest: the order sequences share micro-batches in,
    /// `random` (the default, one shuffle seeded by --data-seed) or `length-grouped`
    /// (transformers' `group_by_length`).
    #[arg(long, requires = "seq_lengths")]
    pub sampler: Option<crate::data::Sampler>,
    /// Training examples per epoch (with --seq-lengths: the file's sequences).
    #[arg(long, required_unless_present = "seq_lengths")]
    pub examples: Option<u64>,
    /// Epochs.
    #[arg(long, default_value_t = 1)]
    pub epochs: u64,
    /// Peak FLOP/s of the measuring device, in TFLOP/s, for the measurement's MFU.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// A GPU from `vramcal gpus`. Measuring on that GPU: the MFU against its datasheet peak.
    /// Measuring elsewhere (the CPU): the fine-tune's time on it, from model FLOPs at --mfu.
    #[arg(long)]
    pub gpu: Option<String>,
    /// Model FLOPs utilization to project --gpu's time with when measuring on another device
    /// (fraction; default 0.30).
    #[arg(long)]
    pub mfu: Option<f64>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What to measure, shared by `measure` and `sweep`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a preset (see `vramcal models`), a config.json or a folder holding one, or a
    /// Hugging Face model id (org/name), read from the local cache or downloaded into it
    /// (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`). May be omitted with GGUF or
    /// folder weights.
    #[arg(long)]
    pub model: Option<String>,
    /// Weights: `random`, a .gguf file (llama architecture, dequantized), a .safetensors file,
    /// a folder of safetensors in HF layout, or `hf:<model-id>`: its config.json and
    /// safetensors from the Hugging Face cache, downloaded where missing (resumable).
    #[arg(long, default_value = "random")]
    pub weights: String,
    /// Weight and compute dtype: f32 or bf16 (f16, f64 also accepted).
    #[arg(long, default_value = "f32", value_parser = dtype_arg)]
    pub dtype: DType,
    /// AdamW moment (state) dtype.
    #[arg(long, default_value = "f32", value_parser = state_dtype_arg)]
    pub optimizer_state_dtype: DType,
    /// Precision recipe of `../shared/cases/README.md`: fp32, bf16, fp16, amp-bf16, amp-fp16,
    /// bf16+amp, fp16+amp, bf16-master or fp16-master. Sets the weights' dtype and PyTorch's
    /// state dtype (so it excludes --dtype and --optimizer-state-dtype). The torch profiles
    /// estimate every recipe; vramcal's own step runs all but fp16 (and fp16+amp with full
    /// fine-tuning), whose fp16 AdamW states diverge: autocast as 16-bit products over the
    /// stored weights, master weights as fp32 copies stepped by the optimizer.
    #[arg(long, conflicts_with_all = ["dtype", "optimizer_state_dtype"])]
    pub precision: Option<Precision>,
    /// Optimizer, by Hugging Face `TrainingArguments.optim` name: adamw_torch, adamw_torch_fused,
    /// adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit, adafactor or sgd. vramcal's own
    /// step trains with all but the paged ones; the torch profiles estimate them all.
    #[arg(long, default_value = "adamw_torch")]
    pub optimizer: Optimizer,
    /// Loss implementation (torch profiles): `transformers` (its own: the whole logits, upcast
    /// to fp32) or `fused-linear-ce` (Liger's fused linear cross-entropy: logits one chunk at a
    /// time). vramcal's own step has its own chunked head: `measure`, `sweep`, `max`, `plan` and
    /// `--profile candle` refuse the option.
    #[arg(long)]
    pub loss: Option<crate::spec::Loss>,
    /// torch's AdamW implementation for `--optimizer adamw_torch` (torch profiles): `foreach`
    /// (one buffer of every trainable tensor at the step; torch ≥ 2.0's default for CUDA) or
    /// `for-loop` (two buffers of the largest; torch 1.x, `foreach=False`, and CPU tensors'
    /// default). Without it, torch ≥ 2.0's choice for the device. vramcal's own step has its
    /// own AdamW: `measure`, `sweep`, `max`, `plan` and `--profile candle` refuse the option.
    #[arg(long)]
    pub torch_adamw: Option<crate::spec::TorchAdamw>,
    /// SGD momentum (`torch.optim.SGD`); 0, the Trainer's `optim=sgd`, keeps no state. Only
    /// with --optimizer sgd.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Learning rate (every optimizer; Adafactor's step size, as the Trainer sets it).
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Weight decay: decoupled for AdamW, 8-bit AdamW and Adafactor, L2 (added to the gradient)
    /// for SGD, as each PyTorch original applies it.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Allow --seq above the model's max_position_embeddings.
    #[arg(long)]
    pub allow_longer: bool,
    /// Device: `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the random token batches.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// LoRA settings (implies --method lora unless another method is given), e.g.
    /// `r=16,alpha=32,dropout=0.05,targets=q_proj,k_proj,v_proj,o_proj`. Targets: q,k,v,o,
    /// gate,up,down (with or without `_proj`), `attn`, `mlp`, `all-linear`, and `lm_head`,
    /// `embed_tokens` (PEFT's adapters outside the layers); on Mixtral, `all-linear` also
    /// adapts the router and the experts (PEFT's), and gate/up/down are refused.
    /// `modules_to_save=lm_head,embed_tokens` trains full copies of those modules beside the
    /// adapters (PEFT's `modules_to_save`, e.g. for added tokens). Defaults are PEFT's: r=8,
    /// alpha=8, dropout=0, targets=q_proj,v_proj.
    #[arg(long)]
    pub lora: Option<LoraConfig>,
    /// Quantization of the frozen base: `none`, `nf4` or `nf4-dq` (= `nf4 --double-quant`);
    /// with LoRA: QLoRA (`--method qlora` implies nf4).
    #[arg(long)]
    pub quant: Option<Quant>,
    /// With NF4: quantize the per-block absmax values too (QLoRA's double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// Micro-batches per optimizer step (gradient accumulation); --batch is the micro-batch.
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Save after step 2, measured as the `save` phase: `none`, `adapter` (the trained
    /// tensors: PEFT files for LoRA, model.safetensors for full) or `merged` (adapters merged
    /// into the base, whole model saved).
    #[arg(long, default_value = "none")]
    pub save: SaveMode,
    /// Same as `--save merged`: merge the adapters into the base and save the whole model.
    #[arg(long)]
    pub merge_save: bool,
    /// Folder the save phase writes into (default: a temporary folder, removed afterwards).
    #[arg(long)]
    pub save_dir: Option<PathBuf>,
    /// Cap on allocated memory, e.g. `4GiB` (units B, KiB, MiB, GiB, TiB, KB, MB, GB, TB): a point that
    /// needs more ends as `status=oom` with the phases measured before. Makes "does it fit in
    /// 80 GiB" testable on a smaller machine.
    #[arg(long, value_parser = budget_arg)]
    pub budget: Option<u64>,
    /// Extra training steps after step 2, timed only, for the median step time and tokens/s.
    #[arg(long, default_value_t = 0)]
    pub timed_steps: usize,
    /// What attention keeps for backward: `sdpa` (q, k, v and the output; probabilities
    /// recomputed, as PyTorch's SDPA/FlashAttention) or `eager` (also the (batch, heads, seq,
    /// seq) probabilities, as transformers' eager attention).
    /// Default: `sdpa`.
    #[arg(long)]
    pub attention: Option<Attention>,
}

/// Fine-tuning method and activation checkpointing of one point.
#[derive(Debug, Clone, Args)]
pub struct MethodArgs {
    /// Fine-tuning method: `full`, `lora` or `qlora` (LoRA on an NF4 base). Default: `lora`
    /// when --lora is given, else `full`.
    #[arg(long)]
    pub method: Option<Method>,
    /// Activation checkpointing: `none`, `layers` (every decoder layer) or `every:K`
    /// (segments of K layers).
    #[arg(long, default_value = "none")]
    pub checkpointing: Checkpointing,
}

/// `vramcal measure`.
#[derive(Debug, Clone, Args)]
pub struct MeasureArgs {
    /// The model and training setup.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences per forward/backward pass (the micro-batch).
    #[arg(long, visible_alias = "micro-batch")]
    pub batch: usize,
    /// Tokens per sequence; with --seq-lengths the row length (--packing), the padded length
    /// (--padding max) or the truncation length.
    #[arg(long, required_unless_present = "seq_lengths")]
    pub seq: Option<usize>,
    /// Lengths from data: the micro-batch measured is the largest the data can form
    /// (--padding-free is refused: vramcal's step has no variable-length attention).
    #[command(flatten)]
    pub data: DataArgs,
    /// Fine-tuning method and checkpointing.
    #[command(flatten)]
    pub how: MethodArgs,
    /// Measure one rank of data-parallel training, simulated in this process: ddp
    /// (DistributedDataParallel's gradient buckets), zero1 or zero2 (DeepSpeed's partitions of
    /// the optimizer states, and of the gradients), zero3 (DeepSpeed's partitioned parameters
    /// and its gradient buffers) or fsdp (FSDP2's sharded parameters), these two on the CPU
    /// with --checkpointing layers; with --world-size and --rank.
    #[arg(long, requires = "world_size")]
    pub shard: Option<Shard>,
    /// Data-parallel ranks of the simulated world (with --shard).
    #[arg(long, requires = "shard")]
    pub world_size: Option<usize>,
    /// The rank measured, from 0 (with --shard) [default: 0].
    #[arg(long, requires = "shard")]
    pub rank: Option<usize>,
    /// Print the result row as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Print neither the table nor the CSV row (errors still go to stderr; with --json the
    /// JSON row is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Append the result row to this CSV file (created with a header if absent).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Command line to record in the row (set by `sweep` for its children).
    #[arg(long, hide = true)]
    pub record_command: Option<String>,
    /// Run the measurement in this process and stream its progress as JSON lines (how
    /// `measure`, `sweep` and `max` run each point in a child process).
    #[arg(long, hide = true)]
    pub child: bool,
}

/// `vramcal sweep`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// The model and training setup.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Micro-batch sizes, comma-separated, e.g. `1,2,4`.
    #[arg(
        long,
        visible_alias = "micro-batch",
        value_delimiter = ',',
        required = true
    )]
    pub batch: Vec<String>,
    /// Methods, comma-separated: `full`, `lora`, `qlora`.
    #[arg(long, value_delimiter = ',')]
    pub method: Vec<String>,
    /// Checkpointing settings, comma-separated, e.g. `none,layers`.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    pub checkpointing: Vec<String>,
    /// Sequence lengths, comma-separated, e.g. `64,128,256`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub seq: Vec<String>,
    /// Output CSV (default `<model>-<device>.csv` in the current folder); rows are appended.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip points already in the output CSV (same configuration columns, any status), e.g.
    /// after an interrupted sweep.
    #[arg(long)]
    pub resume: bool,
    /// Measure on these devices at once, one point per device at a time (each in its own
    /// child process; this process the only writer): `cuda:0,cuda:1`, or `all` (every CUDA
    /// device the driver sees). Instead of --device.
    #[arg(long, value_delimiter = ',', conflicts_with = "device")]
    pub devices: Vec<String>,
    /// On the CPU: measure this many points at once. Memory only: each point's peak is exact
    /// (its own process and allocator), but times measured in parallel are not comparable, so
    /// --timed-steps is refused. Points share the host's memory.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Measure only the I-th of N deterministic parts of the grid (`I/N`, 1 ≤ I ≤ N: the
    /// points whose position in grid order is I − 1 modulo N), e.g. one Slurm array task's
    /// (`vramcal slurm`); `vramcal merge` joins the parts.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::commands::sweep::GridShard>,
}

/// `vramcal merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Result CSVs of vramcal (e.g. the parts of a sharded sweep), all with the same header.
    #[arg(required = true)]
    pub parts: Vec<PathBuf>,
    /// The merged CSV, written whole (replaced if it exists; nothing is written on an error).
    #[arg(long)]
    pub out: PathBuf,
    /// Rows of one configuration in two places: keep the newest (`utc_time`; of two in the same
    /// second, the one listed later) instead of refusing. Identical rows are always kept once.
    #[arg(long, value_name = "newest", value_parser = ["newest"])]
    pub keep: Option<String>,
}

/// `vramcal slurm`.
#[derive(Debug, Clone, Args)]
pub struct SlurmArgs {
    /// Array tasks: the grid is split into this many parts (`sweep --shard I/N`).
    #[arg(long)]
    pub tasks: usize,
    /// Folder for the script, the parts (`part-I.csv`) and Slurm's logs; created if missing.
    #[arg(long)]
    pub dir: PathBuf,
    /// Wall-time limit per task (Slurm's `--time`, e.g. `02:00:00`).
    #[arg(long, default_value = "01:00:00")]
    pub time: String,
    /// Results files of vramcal measured on the cluster's kind of device (CPU or GPU) whose
    /// rows record `point_seconds`: the time limit is then the longest task's projected time,
    /// twice over plus 5 minutes, instead of `--time`.
    #[arg(long, num_args = 1.., conflicts_with = "time")]
    pub time_from: Vec<PathBuf>,
    /// Slurm partition (`--partition`); the cluster's default without it.
    #[arg(long)]
    pub partition: Option<String>,
    /// The sweep, as `vramcal sweep` takes it (after `--`), without `--out`, `--resume` and
    /// `--shard`, which each task sets.
    #[arg(last = true, required = true)]
    pub sweep: Vec<String>,
}

/// The one line (without `error: `) that a command line clap refused gets: the setup parser's
/// message where a value went through a [`crate::spec`] `FromStr`, as when the commands parse a
/// value themselves; else clap's first line, with the missing required arguments it lists on
/// the lines after it joined on.
pub fn error_line(e: &clap::Error) -> String {
    if let Some(err) = setup_error(e) {
        return err.to_string();
    }
    let text = e.render().to_string();
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    let mut line = lines.next().unwrap_or("").to_string();
    // "the following required arguments were not provided:" lists them on the indented lines
    // after it: keep them on the one line.
    if line.ends_with(':') {
        let more: Vec<&str> = lines
            .take_while(|l| l.starts_with(' '))
            .map(str::trim)
            .collect();
        line = format!("{line} {}", more.join(", "));
    }
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

/// The error of a [`crate::spec`] parser behind a clap value error, if that is what `e` is.
pub fn setup_error(e: &clap::Error) -> Option<&crate::Error> {
    use std::error::Error as _;
    if e.kind() != clap::error::ErrorKind::ValueValidation {
        return None;
    }
    e.source()?.downcast_ref::<crate::Error>()
}
