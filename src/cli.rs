//! Command-line definitions (clap). One subcommand per verb; the work is in
//! [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// vramcal: will this fine-tuning configuration fit, and how long will a step take?
/// Measures real training steps (forward, loss, backward, AdamW) and records the peak
/// allocator memory of every phase.
#[derive(Debug, Parser)]
#[command(name = "vramcal", version, about, long_about = None)]
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
    /// Measure one training configuration: two real steps, peak memory per phase.
    #[command(
        after_help = "Examples:\n  vramcal measure --model smollm2-135m --batch 1 --seq 256\n  vramcal measure --model smollm2-135m --weights ~/.cache/vramcal/models/SmolLM2-135M-Instruct.Q4_1.gguf --batch 1 --seq 128 --out results/cpu/mine.csv\n  vramcal measure --model path/to/config.json --batch 2 --seq 512 --dtype bf16 --json"
    )]
    Measure(MeasureArgs),
    /// Measure a grid of batch × seq points, each in its own process, one CSV row per point.
    #[command(
        after_help = "Examples:\n  vramcal sweep --model smollm2-135m --batch 1,2 --seq 64,128,256\n  vramcal sweep --model tiny --batch 1,2,4 --seq 16,32 --out /tmp/tiny.csv"
    )]
    Sweep(SweepArgs),
}

/// What to measure, shared by `measure` and `sweep`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a preset (see `vramcal models`), a config.json or a folder holding one, or a
    /// model id in the local Hugging Face cache. May be omitted with GGUF or folder weights.
    #[arg(long)]
    pub model: Option<String>,
    /// Weights: `random`, a .gguf file (llama architecture, dequantized), a .safetensors file,
    /// a folder of safetensors in HF layout, or `hf:<model-id>` from the local HF cache.
    #[arg(long, default_value = "random")]
    pub weights: String,
    /// Weight and compute dtype: f32 or bf16 (f16, f64 also accepted).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// AdamW moment (state) dtype.
    #[arg(long, default_value = "f32")]
    pub optimizer_state_dtype: String,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
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
}

/// `vramcal measure`.
#[derive(Debug, Clone, Args)]
pub struct MeasureArgs {
    /// The model and training setup.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences per step (micro-batch).
    #[arg(long)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq: usize,
    /// Print the result row as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Do not print the table.
    #[arg(long)]
    pub quiet: bool,
    /// Append the result row to this CSV file (created with a header if absent).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Command line to record in the row (set by `sweep` for its children).
    #[arg(long, hide = true)]
    pub record_command: Option<String>,
}

/// `vramcal sweep`.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// The model and training setup.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes, comma-separated, e.g. `1,2,4`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub batch: Vec<String>,
    /// Sequence lengths, comma-separated, e.g. `64,128,256`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub seq: Vec<String>,
    /// Output CSV (default `results/<device>/<model>.csv`); rows are appended.
    #[arg(long)]
    pub out: Option<PathBuf>,
}
