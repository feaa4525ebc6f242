//! Reference rows: measured PyTorch runs in the format of `../shared/cases/README.md`, published
//! (`../shared/cases/public-measurements.csv`) or written by `scripts/torch_reference.py`, and
//! the training setup each describes. `vramcal check`, `calibrate` and `report` read them here.

use std::path::Path;

use crate::error::{Error, Result};
use crate::spec::{parse_dtype, Adaptation, Checkpointing, LoraConfig, Quant, TrainSpec};

/// A published measurement (`../shared/cases/public-measurements.csv`) or a reference row of
/// `scripts/torch_reference.py`.
#[derive(Debug, serde::Deserialize)]
pub struct ReferenceRow {
    /// Row identifier (e.g. `pub-01`).
    pub id: String,
    /// Model: a preset, a config path or a Hub id.
    pub model: String,
    /// `full`, `lora` or `qlora`.
    pub method: String,
    /// LoRA rank.
    pub lora_r: Option<usize>,
    /// LoRA alpha.
    pub lora_alpha: Option<f64>,
    /// LoRA target modules, `;`-separated.
    pub lora_targets: String,
    /// Quantization of the base.
    pub quant: String,
    /// Precision recipe.
    pub precision: String,
    /// Micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Activation checkpointing: `on` or `off`.
    pub checkpointing: String,
    /// Which memory counter `peak_bytes` is (e.g. `allocated`).
    pub counter: String,
    /// Median step time (seconds) where the file records one (scripts/torch_reference.py).
    #[serde(default)]
    pub step_seconds_median: Option<f64>,
    /// Empty in rows that ran out of memory or failed (scripts/torch_reference.py writes them).
    pub peak_bytes: Option<u64>,
    /// `ok`, `oom` or `error` where the file says (scripts/torch_reference.py); only `ok` rows
    /// (or rows without the column) are checked.
    #[serde(default)]
    pub status: Option<String>,
}

/// The training setup a published or reference row describes.
///
/// # Errors
/// A checkpointing or method value outside the format's vocabulary; a malformed LoRA setting.
pub fn reference_spec(p: &ReferenceRow) -> Result<TrainSpec> {
    let mut s = TrainSpec::new(p.batch, p.seq);
    s.dtype = precision_dtype(p)?;
    // PyTorch's AdamW keeps its states in the parameters' dtype unless fp32 is stated.
    s.state_dtype = s.dtype;
    s.allow_longer = true;
    s.checkpointing = match p.checkpointing.as_str() {
        "on" => Checkpointing::Every(1),
        "off" | "" => Checkpointing::None,
        other => {
            return Err(Error::ReferenceRow {
                id: p.id.clone(),
                reason: format!("checkpointing {other:?}: expected on or off"),
            })
        }
    };
    if !matches!(p.method.as_str(), "full" | "lora" | "qlora") {
        return Err(Error::ReferenceRow {
            id: p.id.clone(),
            reason: format!("method {:?}: expected full, lora or qlora", p.method),
        });
    }
    let lora = match p.method.as_str() {
        "lora" | "qlora" => Some(
            format!(
                "r={},alpha={},targets={}",
                p.lora_r.unwrap_or(8),
                p.lora_alpha.unwrap_or(8.0),
                p.lora_targets.replace(';', ",")
            )
            .parse::<LoraConfig>()?,
        ),
        _ => None,
    };
    let quant = if p.quant.starts_with("nf4") {
        Quant::Nf4 { double: false }
    } else {
        Quant::None
    };
    s.adaptation = Adaptation {
        lora,
        quant,
        seed: 0,
    };
    Ok(s)
}

/// Whether `path` is a file of reference rows (columns `source` and `counter`), not vramcal's.
///
/// # Errors
/// An unreadable file.
pub fn is_reference_file(path: &Path) -> Result<bool> {
    let mut r = crate::input::csv_reader(path)?;
    let h = r.headers().map_err(|e| Error::Csv {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(h.iter().any(|c| c == "counter") && h.iter().any(|c| c == "source"))
}

/// The weight dtype a row's `precision` trains in (`../shared/cases/README.md`, "precision"),
/// by exact value: `fp32`; `bf16`/`fp16` and the recipes that keep 16-bit weights (`bf16+amp`,
/// `bf16-master` and their fp16 forms); `amp-bf16`/`amp-fp16`, autocast over fp32 weights, as
/// fp32. Autocast's cast copies and the master copy are not modelled yet: those recipes are
/// estimated by their weight dtype alone. `bf16 weights`/`fp16 weights` are what
/// `scripts/torch_reference.py` wrote before it used the format's names.
///
/// # Errors
/// [`Error::ReferenceRow`] for any other value.
fn precision_dtype(p: &ReferenceRow) -> Result<candle_core::DType> {
    let d = match p.precision.as_str() {
        "fp32" | "amp-bf16" | "amp-fp16" => "f32",
        "bf16" | "bf16+amp" | "bf16-master" | "bf16 weights" => "bf16",
        "fp16" | "fp16+amp" | "fp16-master" | "fp16 weights" => "f16",
        other => {
            return Err(Error::ReferenceRow {
                id: p.id.clone(),
                reason: format!(
                    "precision {other:?}: expected fp32, bf16, fp16, amp-bf16, amp-fp16, bf16+amp, fp16+amp, bf16-master or fp16-master"
                ),
            })
        }
    };
    parse_dtype(d)
}
