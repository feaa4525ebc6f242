//! Estimates held against measurements, row by row: vramcal's own CSVs (the training peak of
//! each successful row) and reference rows ([`super::reference`]); and the statistics `check`
//! and `calibrate` summarize errors with.

use std::path::Path;

use super::reference::{is_reference_file, read_references, Counter};
use super::{spec_from_row, training_peak};
use crate::config::resolve_model;
use crate::error::{Error, Result};
use crate::estimate::{estimate, estimate_sharded, Coefficients};
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
            let e = estimate(&cfg, &spec, profile, c)?;
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
}

/// Whether two setups are the same training configuration for memory: the fields that change
/// no allocation (data seed, learning rate and weight decay, `--allow-longer`, the save mode)
/// are ignored, and so is the device (`torch_cpu`: a row measured on the CPU is the same
/// configuration as one for a GPU, with its device said beside it); a named one-dtype recipe
/// (`fp32`, `bf16`, `fp16`) is the same as the dtypes it names.
pub fn same_configuration(a: &TrainSpec, b: &TrainSpec) -> bool {
    use crate::spec::Precision;
    let plain = |s: &TrainSpec| {
        let mut s = s.clone();
        s.data_seed = 0;
        s.adamw = Default::default();
        s.allow_longer = false;
        s.save = crate::spec::SaveMode::None;
        s.torch_cpu = false;
        if matches!(
            s.precision,
            Some(Precision::Fp32 | Precision::Bf16 | Precision::Fp16)
        ) {
            s.precision = None;
        }
        s
    };
    plain(a) == plain(b)
}

/// The rows of `files` that measured the configuration estimated (`cfg`, `spec`, `sharding`)
/// on the stack `profile` predicts: vramcal's own rows (a successful step, its training peak)
/// for the `candle` profile; PyTorch's reference rows with a peak for the torch profiles (the
/// attention is part of the setup, so `torch-eager` finds eager rows). Rows of another stack
/// are passed over, as are failed rows. `cpu` says whether the estimate is for the CPU.
///
/// # Errors
/// An unreadable or malformed file, a row outside the vocabulary or naming a model that
/// cannot be resolved.
pub fn measured_rows(
    files: &[std::path::PathBuf],
    cfg: &crate::config::ModelConfig,
    spec: &TrainSpec,
    profile: Profile,
    sharding: Option<crate::spec::Sharding>,
    cpu: bool,
) -> Result<Vec<Measured>> {
    let mut out = Vec::new();
    for f in files {
        if is_reference_file(f)? {
            if profile == Profile::Candle {
                continue;
            }
            for p in read_references(f)? {
                let Some(peak) = p.peak_bytes.filter(|_| p.usable) else {
                    continue;
                };
                if p.sharding != sharding || !same_configuration(&p.spec, spec) {
                    continue;
                }
                if resolve_model(&p.model)?.config != *cfg {
                    continue;
                }
                out.push(Measured {
                    id: p.id.clone(),
                    device: p.device.clone(),
                    counter: p.counter.name().to_string(),
                    peak_bytes: peak,
                    same_device_kind: p.spec.torch_cpu == cpu,
                });
            }
        } else {
            if profile != Profile::Candle || sharding.is_some() {
                continue;
            }
            for (i, r) in read_rows(f)?.iter().enumerate() {
                if r.status != Some(crate::report::Status::Ok) {
                    continue;
                }
                let Some(peak) = training_peak(r) else {
                    continue;
                };
                let (row_cfg, row_spec) = spec_from_row(r).map_err(|e| Error::Csv {
                    path: f.to_path_buf(),
                    reason: format!("row {}: {e}", i + 2),
                })?;
                if row_cfg != *cfg || !same_configuration(&row_spec, spec) {
                    continue;
                }
                out.push(Measured {
                    id: format!("{}:{}", f.display(), i + 2),
                    device: r.device.clone(),
                    counter: "allocated".into(),
                    peak_bytes: peak,
                    same_device_kind: (r.device == "cpu") == cpu,
                });
            }
        }
    }
    Ok(out)
}
