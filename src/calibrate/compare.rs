//! Estimates held against measurements, row by row: vramcal's own CSVs (the training peak of
//! each successful row) and reference rows ([`super::reference`]); and the statistics `check`
//! and `calibrate` summarize errors with.

use std::path::Path;

use super::reference::{is_reference_file, read_references, Counter};
use super::{spec_from_row, training_peak};
use crate::config::resolve_model;
use crate::error::{Error, Result};
use crate::estimate::{estimate_sharded, Coefficients};
use crate::report::csv_out::read_rows;
use crate::spec::{Profile, TrainSpec};

/// One compared row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Compared {
    /// Row label (file:line or the published id).
    pub id: String,
    /// Configuration summary.
    pub config: String,
    /// Which counter the measurement read.
    pub counter: String,
    /// Measured peak (bytes).
    pub measured_bytes: u64,
    /// Predicted peak (bytes).
    pub predicted_bytes: u64,
    /// `(predicted − measured) / measured`; for an `oom` row `(predicted − card) / card`.
    pub relative_error: f64,
    /// Whether the row ran out of memory: `measured_bytes` is then the card's memory, and the
    /// prediction is right when above it.
    pub oom: bool,
}

/// Every successful row of measured file `f` beside its estimate under `profile` and `c` (none
/// when the file has no successful row), and how many reference rows were skipped (no
/// successful peak).
///
/// # Errors
/// An unreadable or malformed file, a row outside the vocabulary, estimator errors.
pub fn compare_file(
    f: &Path,
    profile: Profile,
    c: &Coefficients,
) -> Result<(Vec<Compared>, usize)> {
    let mut out = Vec::new();
    let mut skipped = 0;
    if is_reference_file(f)? {
        // PyTorch's rows are one stack with their own attention and device: the torch-sdpa
        // profile reads both from each row.
        if profile != Profile::TorchSdpa {
            return Err(Error::invalid(
                "--profile",
                profile.name(),
                format!(
                    "{}: reference rows are PyTorch runs that name their own attention (eager rows are estimated as eager): check them with --profile torch-sdpa",
                    f.display()
                ),
            ));
        }
        for p in read_references(f)? {
            if !p.usable {
                skipped += 1;
                continue;
            }
            if c.source != "uncalibrated" && c.cpu != p.spec.torch_cpu {
                return Err(Error::Csv {
                    path: f.to_path_buf(),
                    reason: format!(
                        "row {:?} ran on {}, but the calibration table {} describes {}: give a table of the row's device kind",
                        p.id,
                        p.device,
                        c.source,
                        if c.cpu { "the CPU" } else { "a GPU" }
                    ),
                });
            }
            let cfg = resolve_model(&p.model)?.config;
            let e = estimate_sharded(&cfg, &p.spec, profile, c, p.sharding).map_err(|e| {
                Error::Csv {
                    path: f.to_path_buf(),
                    reason: format!("row {:?}: {e}", p.id),
                }
            })?;
            let oom = p.counter == Counter::Oom;
            let m = if oom {
                p.gpu_memory_bytes.unwrap_or(0)
            } else {
                p.peak_bytes.unwrap_or(0)
            };
            let (predicted, counter) = predicted_for(&e, p.counter);
            out.push(Compared {
                id: p.id.clone(),
                config: p.summary.clone(),
                counter,
                measured_bytes: m,
                predicted_bytes: predicted,
                relative_error: (predicted as f64 - m as f64) / m.max(1) as f64,
                oom,
            });
        }
    } else {
        for (i, r) in read_rows(f)?.iter().enumerate() {
            if r.status != Some(crate::report::Status::Ok) {
                continue;
            }
            let Some(m) = training_peak(r) else { continue };
            let (cfg, spec) = spec_from_row(r).map_err(|e| Error::Csv {
                path: f.to_path_buf(),
                reason: format!("row {}: {e}", i + 2),
            })?;
            let sharding = super::sharding_from_row(r).map_err(|e| Error::Csv {
                path: f.to_path_buf(),
                reason: format!("row {}: {e}", i + 2),
            })?;
            // A table describes one kind of device, as for reference rows above.
            let row_cpu = r.device == "cpu";
            if c.source != "uncalibrated" && c.cpu != row_cpu {
                return Err(Error::Csv {
                    path: f.to_path_buf(),
                    reason: format!(
                        "row {} ran on {}, but the calibration table {} describes {}: give a table of the row's device kind",
                        i + 2,
                        r.device,
                        c.source,
                        if c.cpu { "the CPU" } else { "a GPU" }
                    ),
                });
            }
            let e =
                estimate_sharded(&cfg, &spec, profile, c, sharding).map_err(|e| Error::Csv {
                    path: f.to_path_buf(),
                    reason: format!("row {}: {e}", i + 2),
                })?;
            out.push(Compared {
                id: format!("{}:{}", f.display(), i + 2),
                config: {
                    let mut c = format!(
                        "{} {} ckpt {} attn {} b{} s{} {}",
                        r.model,
                        spec.method_label(),
                        r.checkpointing,
                        r.attention,
                        r.micro_batch,
                        r.seq,
                        spec.precision.map_or(r.dtype.as_str(), |p| p.name())
                    );
                    if let Some(s) = sharding {
                        c.push_str(&format!(" {} rank {}/{}", s.shard, s.rank, s.gpus));
                    }
                    // The optimizer where it is not the default AdamW.
                    if spec.optimizer != crate::spec::Optimizer::AdamwTorch {
                        c.push(' ');
                        c.push_str(spec.optimizer.name());
                        if spec.momentum > 0.0 {
                            c.push_str(&format!(" μ{}", spec.momentum));
                        }
                    }
                    c
                },
                counter: "allocated".into(),
                measured_bytes: m,
                predicted_bytes: e.peak_bytes,
                relative_error: (e.peak_bytes as f64 - m as f64) / m as f64,
                oom: false,
            });
        }
    }
    Ok((out, skipped))
}

/// The prediction a row of `counter` is held against, and the counter as the comparison
/// shows it: the allocated peak for `allocated` and `active` (the caching allocator's active
/// blocks are its allocated ones rounded to 512 bytes); the predicted reserved peak for
/// `reserved`, for `smi` (nvidia-smi adds the CUDA context, which vramcal does not model: said
/// in the label) and for `oom` (what must fit on the card). Without a reserved model in the
/// coefficients ([`crate::estimate::Reserved`], fitted on CUDA rows) those fall back to the
/// allocated peak, and the label says so.
pub fn predicted_for(e: &crate::estimate::Estimate, counter: Counter) -> (u64, String) {
    let name = counter.name();
    match (counter, e.reserved_bytes) {
        (Counter::Allocated | Counter::Active | Counter::None, _) => (e.peak_bytes, name.into()),
        (Counter::Reserved, Some(r)) => (r, name.into()),
        (Counter::Smi, Some(r)) => (r, "smi vs reserved (no CUDA context)".into()),
        (Counter::Oom, Some(r)) => (r, name.into()),
        (Counter::Oom, None) => (e.peak_bytes, "oom vs allocated".into()),
        (_, None) => (
            e.peak_bytes,
            format!("{name} vs allocated (no reserved model)"),
        ),
    }
}

/// The median of `v` (the mean of the two middle values for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q`-quantile of `v` (nearest rank, `q` in [0, 1]); NaN when empty.
pub fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// The largest absolute value of `v` (0 when empty).
pub fn abs_max(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, x| a.max(x.abs()))
}

/// A measured row of the configuration an estimate is for (`vramcal estimate --measured`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Measured {
    /// The row: `file:line` for vramcal's rows, the reference id for PyTorch's.
    pub id: String,
    /// Where it ran, as the row says (`cpu`, a GPU's name).
    pub device: String,
    /// The counter read: `allocated` for vramcal's rows (peak allocator memory), the row's
    /// `counter` for reference rows.
    pub counter: String,
    /// The measured training peak (bytes).
    pub peak_bytes: u64,
    /// Whether the row ran on the kind of device the estimate is for (the CPU, or a GPU):
    /// where not, the two differ by more than the estimate's error (PyTorch's AdamW steps one
    /// tensor at a time on the CPU, vramcal's own step runs other attention kernels there).
    pub same_device_kind: bool,
    /// The estimate of the row's counter (bytes): the allocated peak, or the predicted reserved
    /// peak for `reserved`/`smi` rows, as `check` holds them ([`predicted_for`]).
    pub predicted_bytes: u64,
    /// `(predicted − measured) / measured`, where `same_device_kind`.
    pub relative_error: Option<f64>,
}

/// Whether two setups are the same training configuration for memory: the fields that change
/// no allocation (data seed, learning rate and weight decay, `--allow-longer`, the save mode,
/// LoRA's alpha, the host RAM's GPUs per node) are ignored, and so is the device (`torch_cpu`:
/// a row measured on the CPU is the same configuration as one for a GPU, with its device said
/// beside it; where either names torch's AdamW implementation, the ones that run on each's
/// device must agree); a named one-dtype recipe (`fp32`, `bf16`, `fp16`) is the same as the dtypes it
/// names, and an optimizer that keeps states of its own types (8-bit and paged AdamW,
/// Adafactor, SGD without momentum) has no state dtype.
pub fn same_configuration(a: &TrainSpec, b: &TrainSpec) -> bool {
    use crate::spec::{Optimizer, Precision};
    let plain = |s: &TrainSpec| {
        let mut s = s.clone();
        s.data_seed = 0;
        s.adamw = Default::default();
        s.allow_longer = false;
        s.save = crate::spec::SaveMode::None;
        // torch's AdamW implementation: compared below.
        s.torch_adamw = None;
        s.torch_cpu = false;
        if let Some(l) = s.adaptation.lora.as_mut() {
            l.alpha = 1.0;
        }
        if matches!(
            s.precision,
            Some(Precision::Fp32 | Precision::Bf16 | Precision::Fp16)
        ) {
            s.precision = None;
        }
        let own_states = matches!(
            s.optimizer,
            Optimizer::AdamwBnb8bit
                | Optimizer::PagedAdamw8bit
                | Optimizer::PagedAdamw32bit
                | Optimizer::Adafactor
        ) || (s.optimizer == Optimizer::Sgd && s.momentum == 0.0);
        if own_states {
            s.state_dtype = candle_core::DType::F32;
        }
        s
    };
    // Where either names torch's AdamW implementation, the implementations that run (each on
    // its device) must be one; else, as with the device, the default of each.
    let explicit = a.torch_adamw.is_some() || b.torch_adamw.is_some();
    if explicit
        && a.optimizer == Optimizer::AdamwTorch
        && a.torch_adamw_for_loop() != b.torch_adamw_for_loop()
    {
        return false;
    }
    plain(a) == plain(b)
}

/// What [`measured_rows`] found: the rows of the configuration, and how many files were
/// searched (each once) and passed over as the other stack's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeasuredRows {
    /// The rows of the configuration.
    pub rows: Vec<Measured>,
    /// Files searched.
    pub files: usize,
    /// Files of the other stack (reference rows for `candle`, vramcal's rows for the torch
    /// profiles), read and passed over.
    pub other_stack: usize,
}

/// The rows of `files` that measured the configuration estimated (`cfg`, `spec`, `sharding`)
/// on the stack `profile` predicts: vramcal's own rows (a successful step, its training peak)
/// for the `candle` profile; PyTorch's reference rows with a peak for the torch profiles
/// (`torch-eager` finds the eager rows). Each is held against estimate `e` for its counter;
/// `cpu` says whether the estimate is for the CPU. A file named twice is read once.
///
/// # Errors
/// A file that cannot be read or is neither vramcal's results nor reference rows, a row
/// outside the vocabulary or naming a model that cannot be resolved.
pub fn measured_rows(
    files: &[std::path::PathBuf],
    cfg: &crate::config::ModelConfig,
    spec: &TrainSpec,
    profile: Profile,
    sharding: Option<crate::spec::Sharding>,
    e: &crate::estimate::Estimate,
    cpu: bool,
) -> Result<MeasuredRows> {
    let mut want = spec.clone();
    // torch's AdamW implementation that runs depends on the device the table is of.
    want.torch_cpu = want.torch_cpu || (cpu && profile != Profile::Candle);
    if profile == Profile::TorchEager {
        want.attention = crate::spec::Attention::Eager;
    }
    let same_sharding = |s: Option<crate::spec::Sharding>| match (s, sharding) {
        (Some(mut a), Some(b)) => {
            a.gpus_per_node = b.gpus_per_node;
            a == b
        }
        (a, b) => a == b,
    };
    let mut out = MeasuredRows::default();
    let mut seen = std::collections::HashSet::new();
    for f in files {
        if !seen.insert(f.clone()) {
            continue;
        }
        out.files += 1;
        let mut push = |id: String, device: String, counter: Counter, peak: u64, same: bool| {
            let (predicted, label) = predicted_for(e, counter);
            out.rows.push(Measured {
                id,
                device,
                counter: label,
                peak_bytes: peak,
                same_device_kind: same,
                predicted_bytes: predicted,
                relative_error: same.then(|| (predicted as f64 - peak as f64) / peak.max(1) as f64),
            });
        };
        // What the file is: reference rows, vramcal's rows, or neither (refused).
        let neither = |e: Error| match e {
            Error::Csv { path, reason } => Error::Csv {
                path,
                reason: format!("is neither vramcal's results nor reference rows: {reason}"),
            },
            e => e,
        };
        if is_reference_file(f).map_err(neither)? {
            let refs = read_references(f)?;
            if profile == Profile::Candle {
                out.other_stack += 1;
                continue;
            }
            for p in refs {
                let Some(peak) = p.peak_bytes.filter(|_| p.usable) else {
                    continue;
                };
                if !same_sharding(p.sharding) || !same_configuration(&p.spec, &want) {
                    continue;
                }
                if resolve_model(&p.model)?.config != *cfg {
                    continue;
                }
                push(
                    p.id.clone(),
                    p.device.clone(),
                    p.counter,
                    peak,
                    p.spec.torch_cpu == cpu,
                );
            }
        } else {
            results_header(f).map_err(neither)?;
            let rows = read_rows(f).map_err(neither)?;
            if profile != Profile::Candle {
                out.other_stack += 1;
                continue;
            }
            for (i, r) in rows.iter().enumerate() {
                if r.status != Some(crate::report::Status::Ok) {
                    continue;
                }
                let row_sharding = super::sharding_from_row(r).map_err(|e| Error::Csv {
                    path: f.to_path_buf(),
                    reason: format!("row {}: {e}", i + 2),
                })?;
                if !same_sharding(row_sharding) {
                    continue;
                }
                let Some(peak) = training_peak(r) else {
                    continue;
                };
                let (row_cfg, row_spec) = spec_from_row(r).map_err(|e| Error::Csv {
                    path: f.to_path_buf(),
                    reason: format!("row {}: {e}", i + 2),
                })?;
                if row_cfg != *cfg || !same_configuration(&row_spec, &want) {
                    continue;
                }
                push(
                    format!("{}:{}", f.display(), i + 2),
                    r.device.clone(),
                    Counter::Allocated,
                    peak,
                    (r.device == "cpu") == cpu,
                );
            }
        }
    }
    Ok(out)
}

/// Checks that `f` has the header of vramcal's results (this version's columns, or an earlier
/// version's subset with `tool_version`): an empty file or another CSV without rows would
/// otherwise read as results without a row.
///
/// # Errors
/// [`Error::Csv`] naming what is wrong; the errors of [`crate::input::csv_reader`].
fn results_header(f: &Path) -> Result<()> {
    let mut r = crate::input::csv_reader(f)?;
    let have = r.headers().cloned().unwrap_or_default();
    let now = crate::report::Row::header();
    let known =
        have.iter().any(|c| c == "tool_version") && have.iter().all(|c| now.iter().any(|n| n == c));
    if known {
        Ok(())
    } else {
        Err(Error::Csv {
            path: f.to_path_buf(),
            reason: if have.is_empty() {
                "empty".into()
            } else {
                "its header is not vramcal's results header".into()
            },
        })
    }
}
