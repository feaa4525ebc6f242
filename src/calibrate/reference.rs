//! Reference rows: measured PyTorch runs in the format of `../shared/cases/README.md`, published
//! (`../shared/cases/public-measurements.csv`) or written by `scripts/torch_reference.py`, and
//! the training setup each describes. `vramcal check`, `calibrate` and `report` read them here.
//!
//! One strict parser: every column of the format has a closed vocabulary, and a value outside
//! it is refused with one line naming the file, the row (line and id), the column and the
//! value. Nothing is guessed from a substring or read as a default. The only other spellings
//! accepted are the exact values older versions of `scripts/torch_reference.py` wrote in the
//! committed `results/h200/torch-*.csv` ([`LEGACY`]).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::spec::{
    parse_dtype, Adaptation, Attention, Checkpointing, LoraConfig, Offload, Optimizer, Precision,
    Quant, Shard, Sharding, Target, TrainSpec,
};

/// One row as read: every cell as text, parsed by [`Reference::parse`]. Optional columns may
/// be absent from a file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReferenceRow {
    /// Row identifier (e.g. `pub-01`), unique in its file.
    pub id: String,
    /// Where the measurement comes from.
    pub source: String,
    /// Model: a vramcal preset (or, beyond the shared format, a config.json path or a Hugging
    /// Face model id).
    pub model: String,
    /// `full`, `lora` or `qlora`.
    pub method: String,
    /// LoRA rank.
    #[serde(default)]
    pub lora_r: String,
    /// LoRA alpha.
    #[serde(default)]
    pub lora_alpha: String,
    /// LoRA dropout (empty: 0).
    #[serde(default)]
    pub lora_dropout: String,
    /// LoRA target modules, `;`-separated, or `all-linear`.
    #[serde(default)]
    pub lora_targets: String,
    /// PEFT's `modules_to_save`, `;`-separated `lm_head`, `embed_tokens`; empty: none. A column
    /// of vramcal's reference files beyond the shared format (absent there: none).
    #[serde(default)]
    pub modules_to_save: String,
    /// torch's AdamW implementation of an `adamw_torch` row, `for-loop` or `foreach`
    /// ([`crate::spec::TorchAdamw`]); empty: torch ≥ 2.0's default for the device. A column of
    /// vramcal's reference files beyond the shared format (absent there: the default).
    #[serde(default)]
    pub torch_adamw: String,
    /// Quantization of the base: `none`, `nf4`, `nf4-dq`.
    pub quant: String,
    /// Precision recipe ([`Precision`]).
    pub precision: String,
    /// HF `optim` name ([`Optimizer`]).
    pub optimizer: String,
    /// `fp32`, `bf16`, `fp16` or empty (the optimizer's default).
    #[serde(default)]
    pub optimizer_state_dtype: String,
    /// Micro-batch per GPU.
    pub batch: String,
    /// Gradient-accumulation steps (empty: 1).
    #[serde(default)]
    pub accumulate: String,
    /// Tokens per sequence (the longest for `max`/`padded`).
    pub seq: String,
    /// `packed`, `fixed`, `max` or `padded`.
    pub seq_kind: String,
    /// `off`, `on` or `every:K`.
    pub checkpointing: String,
    /// `eager`, `sdpa` or `flash-attention-2`.
    pub attention: String,
    /// Empty or `fused-linear-ce`.
    #[serde(default)]
    pub loss: String,
    /// Data-parallel GPUs (empty: 1).
    #[serde(default)]
    pub gpus: String,
    /// `none`/empty, `ddp`, `zero1`, `zero2`, `zero3`, `fsdp`.
    #[serde(default)]
    pub shard: String,
    /// `none`/empty, `optimizer`, `optimizer+params`.
    #[serde(default)]
    pub offload: String,
    /// The GPU (free text); `cpu` for PyTorch on the CPU.
    pub gpu: String,
    /// The card's memory (bytes); required for `oom` rows.
    #[serde(default)]
    pub gpu_memory_bytes: String,
    /// `allocated`, `reserved`, `active`, `smi` or `oom`.
    pub counter: String,
    /// Peak bytes (empty for `oom` rows and failed runs).
    #[serde(default)]
    pub peak_bytes: String,
    /// `ok`, `oom` or `error` in files of `scripts/torch_reference.py`; absent in published ones.
    #[serde(default)]
    pub status: String,
    /// Median step time (seconds) in files of `scripts/torch_reference.py`.
    #[serde(default)]
    pub step_seconds_median: String,
    /// The reserved peak (bytes, `torch.cuda.max_memory_reserved`) beside an `allocated`
    /// peak, in CUDA files of `scripts/torch_reference.py`; empty or absent elsewhere.
    #[serde(default)]
    pub peak_reserved_bytes: String,
}

/// Columns every reference file must have (`../shared/cases/README.md`).
pub const REQUIRED: [&str; 16] = [
    "id",
    "source",
    "model",
    "method",
    "quant",
    "precision",
    "optimizer",
    "batch",
    "seq",
    "seq_kind",
    "checkpointing",
    "attention",
    "gpu",
    "counter",
    "peak_bytes",
    "lora_targets",
];

/// Exact spellings older versions of `scripts/torch_reference.py` wrote (column, old value,
/// value of the format): the committed `results/h200/torch-*.csv` and
/// `results/torch-cpu/` files before the script wrote the format's names.
pub const LEGACY: [(&str, &str, &str); 5] = [
    ("precision", "bf16 weights", "bf16"),
    ("precision", "fp16 weights", "fp16"),
    (
        "optimizer",
        "torch.optim.AdamW (states in the parameters' dtype)",
        "adamw_torch",
    ),
    ("seq_kind", "random tokens", "fixed"),
    ("counter", "none (CPU: see saved_activation_bytes)", "none"),
];

/// Which memory counter a row's `peak_bytes` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// `torch.cuda.max_memory_allocated` (or PyTorch's exact live CPU tensor bytes).
    Allocated,
    /// `torch.cuda.max_memory_reserved`.
    Reserved,
    /// Peak active bytes.
    Active,
    /// `nvidia-smi` used memory.
    Smi,
    /// The run ran out of memory: the prediction must exceed `gpu_memory_bytes`.
    Oom,
    /// No counter (legacy CPU rows of `scripts/torch_reference.py` without
    /// `--count-cpu-memory`): nothing to compare.
    None,
}

impl Counter {
    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Allocated => "allocated",
            Counter::Reserved => "reserved",
            Counter::Active => "active",
            Counter::Smi => "smi",
            Counter::Oom => "oom",
            Counter::None => "none",
        }
    }
}

/// A parsed reference row.
#[derive(Debug, Clone)]
pub struct Reference {
    /// The row's `id`.
    pub id: String,
    /// The model preset.
    pub model: String,
    /// The training setup it describes (`torch_cpu` set for `gpu` = `cpu`).
    pub spec: TrainSpec,
    /// The device as vramcal's rows name it: `cpu`, or `cuda:0 (<gpu>)` (PyTorch's default device).
    pub device: String,
    /// Whether `scripts/torch_reference.py` wrote the row (its `source`): such rows may be
    /// fitted; published ones only checked.
    pub ours: bool,
    /// Data-parallel sharding (scheme, GPUs) where the row names one.
    pub sharding: Option<Sharding>,
    /// Which counter `peak_bytes` is.
    pub counter: Counter,
    /// The measured peak (bytes); `None` for `oom` rows and failed runs.
    pub peak_bytes: Option<u64>,
    /// The card's memory (bytes), where given.
    pub gpu_memory_bytes: Option<u64>,
    /// The reserved peak beside an `allocated` one (`peak_reserved_bytes`), where recorded.
    pub reserved_bytes: Option<u64>,
    /// Whether the run succeeded (`status` `ok` or absent, and a peak or an `oom` counter).
    pub usable: bool,
    /// Median step time (seconds), where recorded.
    pub step_seconds_median: Option<f64>,
    /// Short configuration summary for tables.
    pub summary: String,
}

/// A cell outside its column's vocabulary.
fn bad(path: &Path, line: usize, id: &str, column: &str, value: &str, expected: &str) -> Error {
    Error::ReferenceCell {
        path: path.to_path_buf(),
        cell: Box::new(crate::error::Cell {
            line,
            id: id.to_string(),
            column: column.to_string(),
            value: value.to_string(),
            reason: expected.to_string(),
        }),
    }
}

/// The value of the format for `value` in `column`: itself, or its [`LEGACY`] spelling's.
fn modern<'a>(column: &str, value: &'a str) -> &'a str {
    LEGACY
        .iter()
        .find(|(c, old, _)| *c == column && *old == value)
        .map_or(value, |(_, _, new)| new)
}

struct Cells<'a> {
    path: &'a Path,
    line: usize,
    id: &'a str,
}

impl Cells<'_> {
    fn err(&self, column: &str, value: &str, expected: &str) -> Error {
        bad(self.path, self.line, self.id, column, value, expected)
    }

    /// A positive integer, or `default` when empty and `default` is given.
    fn count(&self, column: &str, v: &str, default: Option<usize>) -> Result<usize> {
        match (v, default) {
            ("", Some(d)) => Ok(d),
            _ => v
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| self.err(column, v, "expected a positive integer")),
        }
    }

    /// Integer bytes, or `None` when empty.
    fn bytes(&self, column: &str, v: &str) -> Result<Option<u64>> {
        if v.is_empty() {
            return Ok(None);
        }
        v.parse::<u64>()
            .map(Some)
            .map_err(|_| self.err(column, v, "expected integer bytes"))
    }

    /// A value of a closed vocabulary through its `FromStr`, the parser's reason kept.
    fn vocab<T: std::str::FromStr<Err = Error>>(&self, column: &str, v: &str) -> Result<T> {
        v.parse::<T>().map_err(|e| {
            let reason = match e {
                Error::InvalidValue { reason, .. } => reason,
                other => other.to_string(),
            };
            self.err(column, v, &reason)
        })
    }
}

impl Reference {
    /// Parses row `raw` at `line` of `path` (line 1 is the header).
    ///
    /// # Errors
    /// [`Error::ReferenceCell`] naming the file, line, id, column and value for any cell
    /// outside its vocabulary, a LoRA row without rank, alpha or targets, an `oom` row without
    /// `gpu_memory_bytes`, a successful non-`oom` row without an integer `peak_bytes`, an
    /// `offload` without a ZeRO/FSDP `shard` or in a combination no stack runs
    /// ([`Sharding::validate`]).
    pub fn parse(path: &Path, line: usize, raw: &ReferenceRow) -> Result<Reference> {
        let c = Cells {
            path,
            line,
            id: &raw.id,
        };
        if raw.id.is_empty() {
            return Err(c.err("id", "", "every row needs an id"));
        }
        // A preset (the shared format's vocabulary), or, for rows `vramcal.MemoryRecorder`
        // writes from users' runs, the run's own config.json (a path, relative to the file or
        // to the current folder) or a Hugging Face model id already in the local cache: reading
        // a file never reaches the network.
        let preset = match crate::config::preset(&raw.model) {
            Some(p) => p.config,
            None if raw.model.contains('/') => user_model(path, &raw.model)
                .map_err(|e| c.err("model", &raw.model, &e))?,
            None => {
                return Err(c.err(
                    "model",
                    &raw.model,
                    "expected a vramcal preset (`vramcal models`), a config.json path or a Hugging Face model id",
                ))
            }
        };
        for (col, v) in [("source", &raw.source), ("gpu", &raw.gpu)] {
            if v.trim().is_empty() {
                return Err(c.err(col, v, "every row names it"));
            }
        }
        let method = raw.method.as_str();
        if !matches!(method, "full" | "lora" | "qlora") {
            return Err(c.err("method", method, "expected full, lora or qlora"));
        }
        let quant: Quant = c.vocab("quant", &raw.quant)?;
        if (method == "qlora") != (quant != Quant::None) {
            return Err(c.err(
                "quant",
                &raw.quant,
                "qlora rows have an nf4 or nf4-dq base, full and lora rows none",
            ));
        }
        let precision: Precision = c.vocab("precision", modern("precision", &raw.precision))?;
        // The format's names only: vramcal's CLI aliases (`adamw`, `adamw-8bit`) are not in it.
        let opt_name = modern("optimizer", &raw.optimizer);
        if Optimizer::ALIASES.iter().any(|(a, _)| *a == opt_name) {
            let names: Vec<&str> = Optimizer::ALL.iter().map(|o| o.name()).collect();
            return Err(c.err(
                "optimizer",
                opt_name,
                &format!("expected one of {}", names.join(", ")),
            ));
        }
        let optimizer: Optimizer = c.vocab("optimizer", opt_name)?;
        let mut spec = TrainSpec::new(
            c.count("batch", &raw.batch, None)?,
            c.count("seq", &raw.seq, None)?,
        );
        spec.accumulate = c.count("accumulate", &raw.accumulate, Some(1))?;
        spec.dtype = precision.weights();
        spec.precision = Some(precision);
        spec.optimizer = optimizer;
        spec.allow_longer = true;
        spec.torch_cpu = raw.gpu == "cpu";
        spec.torch_adamw = match raw.torch_adamw.as_str() {
            "" => None,
            v => {
                let t: crate::spec::TorchAdamw = v
                    .parse()
                    .map_err(|_| c.err("torch_adamw", v, "expected for-loop, foreach or empty"))?;
                if optimizer != Optimizer::AdamwTorch {
                    return Err(c.err(
                        "torch_adamw",
                        v,
                        "names an implementation of adamw_torch, not of this row's optimizer (empty)",
                    ));
                }
                Some(t)
            }
        };
        // torch's optimizers keep states in the parameters' dtype; fp32 adapters under +amp.
        let torch_adamw = matches!(
            optimizer,
            Optimizer::AdamwTorch | Optimizer::AdamwTorchFused
        );
        spec.state_dtype = match raw.optimizer_state_dtype.as_str() {
            "" if precision.master_weights() => candle_core::DType::F32,
            "" if precision.fp32_adapters() && method != "full" => candle_core::DType::F32,
            "" => spec.dtype,
            v @ ("fp32" | "bf16" | "fp16") if torch_adamw => parse_dtype(v)?,
            v @ ("fp32" | "bf16" | "fp16") => {
                return Err(c.err(
                    "optimizer_state_dtype",
                    v,
                    "only torch's AdamW (adamw_torch, adamw_torch_fused) takes a state dtype; the others keep their own",
                ))
            }
            v => {
                return Err(c.err(
                    "optimizer_state_dtype",
                    v,
                    "expected fp32, bf16, fp16 or empty",
                ))
            }
        };
        let seq_kind = modern("seq_kind", &raw.seq_kind);
        if !matches!(seq_kind, "packed" | "fixed" | "max" | "padded") {
            return Err(c.err(
                "seq_kind",
                &raw.seq_kind,
                "expected packed, fixed, max or padded",
            ));
        }
        spec.checkpointing = match raw.checkpointing.as_str() {
            "off" => Checkpointing::None,
            "on" => Checkpointing::Every(1),
            v if v.starts_with("every:") => c.vocab("checkpointing", v)?,
            v => return Err(c.err("checkpointing", v, "expected off, on or every:K")),
        };
        spec.attention = c.vocab::<Attention>("attention", &raw.attention)?;
        spec.loss = match raw.loss.as_str() {
            "" => crate::spec::Loss::Transformers,
            "fused-linear-ce" => crate::spec::Loss::FusedLinearCe,
            v => return Err(c.err("loss", v, "expected empty or fused-linear-ce")),
        };
        let offload = match raw.offload.as_str() {
            "" => Offload::None,
            v => c.vocab::<Offload>("offload", v)?,
        };
        let gpus = c.count("gpus", &raw.gpus, Some(1))?;
        let sharding = match raw.shard.as_str() {
            "" | "none" if offload != Offload::None => {
                return Err(c.err(
                    "offload",
                    offload.label(),
                    "offload needs shard zero1, zero2, zero3 or fsdp",
                ))
            }
            "" | "none" if gpus > 1 => {
                return Err(c.err(
                    "gpus",
                    &raw.gpus,
                    "more than one GPU needs a shard (ddp, zero1, zero2, zero3 or fsdp)",
                ))
            }
            "" | "none" => None,
            v => {
                let s = Sharding {
                    offload,
                    ..Sharding::new(c.vocab::<Shard>("shard", v)?, gpus)
                };
                if s.gpus < 2 && (offload == Offload::None || s.shard == Shard::Ddp) {
                    return Err(c.err(
                        "gpus",
                        &raw.gpus,
                        if s.shard == Shard::Ddp {
                            "a ddp row needs gpus of 2 or more"
                        } else {
                            "a sharded row needs gpus of 2 or more (or one GPU with an offload)"
                        },
                    ));
                }
                s.validate().map_err(|e| match e {
                    Error::InvalidValue {
                        what,
                        value,
                        reason,
                    } => c.err(
                        what.trim_start_matches("--").replace('-', "_").as_str(),
                        &value,
                        &reason,
                    ),
                    e => e,
                })?;
                Some(s)
            }
        };
        if method == "full" {
            for (col, v) in [
                ("lora_r", &raw.lora_r),
                ("lora_alpha", &raw.lora_alpha),
                ("lora_dropout", &raw.lora_dropout),
                ("lora_targets", &raw.lora_targets),
                ("modules_to_save", &raw.modules_to_save),
            ] {
                if !v.is_empty() {
                    return Err(c.err(
                        col,
                        v,
                        "a full fine-tuning row has no LoRA setting (empty)",
                    ));
                }
            }
        }
        spec.adaptation = Adaptation {
            lora: if method == "full" {
                None
            } else {
                Some(lora(&c, raw)?)
            },
            quant,
            seed: 0,
        };
        // Sizes the estimator cannot count (bytes past 64 bits) are refused here, by row.
        spec.validate(&preset)
            .map_err(|e| c.err("batch", &raw.batch, &format!("with seq {}: {e}", raw.seq)))?;
        // `none` only as the legacy spelling of a row without a counter.
        let counter = match modern("counter", &raw.counter) {
            "none" if raw.counter == "none" => {
                return Err(c.err(
                    "counter",
                    "none",
                    "expected allocated, reserved, active, smi or oom",
                ))
            }
            "allocated" => Counter::Allocated,
            "reserved" => Counter::Reserved,
            "active" => Counter::Active,
            "smi" => Counter::Smi,
            "oom" => Counter::Oom,
            "none" => Counter::None,
            v => {
                return Err(c.err(
                    "counter",
                    v,
                    "expected allocated, reserved, active, smi or oom",
                ))
            }
        };
        let status = raw.status.as_str();
        if !matches!(status, "" | "ok" | "oom" | "error") {
            return Err(c.err("status", status, "expected ok, oom, error or empty"));
        }
        let peak_bytes = c.bytes("peak_bytes", &raw.peak_bytes)?;
        let gpu_memory_bytes = c.bytes("gpu_memory_bytes", &raw.gpu_memory_bytes)?;
        let reserved_bytes = c.bytes("peak_reserved_bytes", &raw.peak_reserved_bytes)?;
        if reserved_bytes.is_some() && counter != Counter::Allocated {
            return Err(c.err(
                "peak_reserved_bytes",
                &raw.peak_reserved_bytes,
                "goes beside an allocated peak (counter allocated); a reserved peak alone is counter reserved",
            ));
        }
        if let (Some(r), Some(a)) = (reserved_bytes, peak_bytes) {
            if r < a {
                return Err(c.err(
                    "peak_reserved_bytes",
                    &raw.peak_reserved_bytes,
                    "is below peak_bytes: the allocator reserves at least what it allocates",
                ));
            }
        }
        let ran = matches!(status, "" | "ok");
        if gpu_memory_bytes == Some(0) {
            return Err(c.err(
                "gpu_memory_bytes",
                "0",
                "expected the card's memory in bytes",
            ));
        }
        if ran && counter != Counter::Oom && counter != Counter::None && peak_bytes == Some(0) {
            return Err(c.err(
                "peak_bytes",
                "0",
                "a successful row needs its peak in bytes",
            ));
        }
        if counter == Counter::Oom {
            if gpu_memory_bytes.is_none() {
                return Err(c.err(
                    "gpu_memory_bytes",
                    "",
                    "an oom row needs the card's memory in bytes",
                ));
            }
            if peak_bytes.is_some() {
                return Err(c.err(
                    "peak_bytes",
                    &raw.peak_bytes,
                    "an oom row has no peak (empty)",
                ));
            }
        } else if ran && counter != Counter::None && peak_bytes.is_none() {
            return Err(c.err("peak_bytes", "", "a successful row needs integer bytes"));
        }
        let step_seconds_median = match raw.step_seconds_median.as_str() {
            "" => None,
            v => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .ok_or_else(|| c.err("step_seconds_median", v, "expected seconds"))?,
            ),
        };
        // `scripts/torch_reference.py` writes a run that ran out of memory as `status` = `oom`
        // with `counter` = `oom` and the card's memory: checked like a published oom row.
        let usable = (ran || (status == "oom" && counter == Counter::Oom))
            && match counter {
                Counter::Oom => true,
                Counter::None => false,
                _ => peak_bytes.is_some_and(|b| b > 0),
            };
        Ok(Reference {
            id: raw.id.clone(),
            model: raw.model.clone(),
            device: if raw.gpu == "cpu" {
                "cpu".to_string()
            } else {
                format!("cuda:0 ({})", raw.gpu)
            },
            ours: raw.source.starts_with("scripts/torch_reference.py"),
            summary: format!(
                "{} {} b{} s{} ckpt {} {} {}{} {}{}",
                raw.model,
                spec.method_label(),
                spec.batch,
                spec.seq,
                raw.checkpointing,
                precision,
                optimizer,
                spec.torch_adamw.map_or(String::new(), |t| format!(" {t}")),
                raw.attention,
                match &sharding {
                    Some(s) if s.offload != Offload::None => {
                        format!(" {}×{} offload {}", s.shard, s.gpus, s.offload)
                    }
                    Some(s) => format!(" {}×{}", s.shard, s.gpus),
                    None => String::new(),
                }
            ),
            spec,
            sharding,
            counter,
            peak_bytes,
            gpu_memory_bytes,
            reserved_bytes,
            usable,
            step_seconds_median,
        })
    }
}

/// The config of a user's model named by a reference row in file `file`: an existing path
/// (relative to the file's folder, then to the current folder) to a config.json or its folder,
/// or a Hugging Face model id whose config.json the local cache holds (never downloaded here).
///
/// # Errors
/// What the user should do, as text.
fn user_model(file: &Path, model: &str) -> std::result::Result<crate::config::ModelConfig, String> {
    let beside = file.parent().map(|d| d.join(model));
    for p in beside
        .into_iter()
        .chain(std::iter::once(PathBuf::from(model)))
    {
        if p.exists() {
            return crate::config::resolve_model(&p.to_string_lossy())
                .map(|m| m.config)
                .map_err(|e| e.to_string());
        }
    }
    cached_config(model)
}

/// The `config.json` of Hub id `model` from the local Hugging Face cache (never downloaded).
#[cfg(not(target_arch = "wasm32"))]
fn cached_config(model: &str) -> std::result::Result<crate::config::ModelConfig, String> {
    crate::hub::check_id(model).map_err(|_| {
        "no such file or folder (relative to this file or the current folder), and not a Hugging Face model id".to_string()
    })?;
    match crate::hub::Hub::from_env().cached(model, "config.json") {
        Some(f) => crate::config::ModelConfig::from_json_file(&f).map_err(|e| e.to_string()),
        None => Err(format!(
            "not a file or folder, and {model}'s config.json is not in the local Hugging Face cache (`vramcal estimate --model {model}` fetches it; reading reference rows never downloads)"
        )),
    }
}

/// The browser build (`web/`) has no Hugging Face cache.
#[cfg(target_arch = "wasm32")]
fn cached_config(model: &str) -> std::result::Result<crate::config::ModelConfig, String> {
    Err(format!(
        "no such file or folder, and {model}'s config.json cannot be read from a Hugging Face cache in the browser"
    ))
}

/// The LoRA setting of a `lora`/`qlora` row: rank, alpha, dropout and targets, each required
/// but dropout.
fn lora(c: &Cells, raw: &ReferenceRow) -> Result<LoraConfig> {
    let r = c.count("lora_r", &raw.lora_r, None)?;
    let alpha = raw
        .lora_alpha
        .parse::<f64>()
        .ok()
        .filter(|a| a.is_finite() && *a > 0.0)
        .ok_or_else(|| c.err("lora_alpha", &raw.lora_alpha, "expected a positive number"))?;
    let dropout = match raw.lora_dropout.as_str() {
        "" => 0.0,
        v => v
            .parse::<f64>()
            .ok()
            .filter(|d| (0.0..1.0).contains(d))
            .ok_or_else(|| c.err("lora_dropout", v, "expected a number in [0, 1)"))?,
    };
    let (mut lm_head, mut embed_tokens) = (false, false);
    let all_linear = raw.lora_targets == "all-linear";
    let mut targets = match raw.lora_targets.as_str() {
        "all-linear" => Target::ALL.to_vec(),
        "" => return Err(c.err("lora_targets", "", "a LoRA row needs its target modules")),
        v => {
            let mut names = Vec::new();
            for t in v.split(';') {
                match Target::ALL.into_iter().find(|x| x.name() == t) {
                    Some(x) => names.push(x),
                    None if t == "lm_head" => lm_head = true,
                    None if t == "embed_tokens" => embed_tokens = true,
                    None => {
                        return Err(c.err(
                            "lora_targets",
                            v,
                            "expected ';'-separated q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head, embed_tokens, or all-linear",
                        ))
                    }
                }
            }
            names
        }
    };
    targets.sort();
    targets.dedup();
    let (mut save_lm_head, mut save_embed_tokens) = (false, false);
    if !raw.modules_to_save.is_empty() {
        for m in raw.modules_to_save.split(';') {
            match m {
                "lm_head" => save_lm_head = true,
                "embed_tokens" => save_embed_tokens = true,
                _ => {
                    return Err(c.err(
                        "modules_to_save",
                        &raw.modules_to_save,
                        "expected ';'-separated lm_head, embed_tokens, or empty",
                    ))
                }
            }
        }
    }
    let l = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        lm_head,
        embed_tokens,
        all_linear,
        save_lm_head,
        save_embed_tokens,
    };
    if (l.lm_head && l.save_lm_head) || (l.embed_tokens && l.save_embed_tokens) {
        return Err(c.err(
            "modules_to_save",
            &raw.modules_to_save,
            "a module in lora_targets cannot also be in modules_to_save (PEFT trains it one way)",
        ));
    }
    Ok(l)
}

/// Every row of reference file `path`, parsed, in file order.
///
/// # Errors
/// An unreadable file, a missing required column (naming it), a malformed row, a duplicate
/// id (naming both lines) and any cell [`Reference::parse`] refuses.
pub fn read_references(path: &Path) -> Result<Vec<Reference>> {
    let csv_err = |reason: String| Error::Csv {
        path: PathBuf::from(path),
        reason,
    };
    let mut r = crate::input::csv_reader(path)?;
    let headers = r.headers().map_err(|e| csv_err(e.to_string()))?.clone();
    for col in REQUIRED {
        if !headers.iter().any(|h| h == col) {
            return Err(csv_err(format!(
                "missing required column {col:?} of the reference-row format"
            )));
        }
    }
    let mut seen = std::collections::HashMap::new();
    let mut out = Vec::new();
    for (i, raw) in r.deserialize::<ReferenceRow>().enumerate() {
        let line = i + 2;
        let raw = raw.map_err(|e| csv_err(format!("line {line}: malformed row: {e}")))?;
        if let Some(first) = seen.insert(raw.id.clone(), line) {
            return Err(bad(
                path,
                line,
                &raw.id,
                "id",
                &raw.id,
                &format!("duplicate id (first at line {first})"),
            ));
        }
        out.push(Reference::parse(path, line, &raw)?);
    }
    Ok(out)
}

/// Whether `path` is a file of reference rows (a `source` or a `counter` column, which
/// vramcal's own files never have), not vramcal's.
///
/// # Errors
/// An unreadable file.
pub fn is_reference_file(path: &Path) -> Result<bool> {
    let mut r = crate::input::csv_reader(path)?;
    let h = r.headers().map_err(|e| Error::Csv {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(h.iter().any(|c| c == "counter" || c == "source"))
}
