//! Fitting the estimator's coefficients to measured rows, and calibration tables.
//!
//! The fit minimizes the squared *relative* error of the predicted training peak over the
//! measured rows, with every coefficient ≥ 0 (non-negative least squares, solved exactly by
//! trying every set of active terms: there are five).

pub mod compare;
pub mod reference;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{resolve_model, ModelConfig};
use crate::error::{Error, Result};
use crate::estimate::{
    predicted_backward_peak, terms, Coefficients, Moment, Reserved, ReservedBasis, Term, MOMENTS,
    N_TERMS,
};
use crate::report::Row;
use crate::spec::{parse_dtype, TrainSpec};
use crate::spec::{Adaptation, LoraConfig, Method, Profile, Quant};

/// The training peak of a measured row: the highest peak of the step phases (load and save
/// excluded), bytes.
pub fn training_peak(r: &Row) -> Option<u64> {
    [
        r.step1_forward_peak_bytes,
        r.step1_backward_peak_bytes,
        r.step1_optimizer_step_peak_bytes,
        r.step2_forward_peak_bytes,
        r.step2_backward_peak_bytes,
        r.step2_optimizer_step_peak_bytes,
    ]
    .into_iter()
    .flatten()
    .max()
    .map(|p| p.saturating_sub(baseline_included(r)))
}

/// Bytes of the process's own baseline that a row's peaks include: its `baseline_bytes` for a
/// CPU row made before peaks were taken above the baseline (`memory_counter`
/// `host-counting-allocator`, or empty in still older files), else 0. Subtracting it puts rows
/// of every vramcal version on one footing.
pub fn baseline_included(r: &Row) -> u64 {
    let absolute = r.device == "cpu"
        && (r.memory_counter.is_empty()
            || r.memory_counter == crate::measure::probe::HOST_COUNTER_ABSOLUTE);
    if absolute {
        r.baseline_bytes.unwrap_or(0)
    } else {
        0
    }
}

/// The simulated data-parallel rank a row measured (`shard`, `world_size`, `rank` columns),
/// `None` for a one-device row.
///
/// # Errors
/// [`Error::InvalidValue`] for a shard outside the vocabulary, a missing world size, a world
/// size or rank without a shard, or a rank or world size [`crate::spec::Sharding::validate`]
/// refuses.
pub fn sharding_from_row(r: &Row) -> Result<Option<crate::spec::Sharding>> {
    if r.shard.is_empty() {
        if let Some(n) = r.world_size.or(r.rank) {
            return Err(Error::invalid(
                "shard",
                "",
                format!("a row with a world size or rank ({n}) names its shard (ddp, zero1, zero2, zero3 or fsdp)"),
            ));
        }
        return Ok(None);
    }
    let shard: crate::spec::Shard = r.shard.parse()?;
    let gpus = r.world_size.ok_or_else(|| {
        Error::invalid("world_size", "", "a row with a shard needs its world size")
    })?;
    let s = crate::spec::Sharding {
        rank: r.rank.unwrap_or(0),
        ..crate::spec::Sharding::new(shard, gpus)
    };
    s.validate()?;
    Ok(Some(s))
}

/// Rebuilds the model config and training spec a row was measured with.
///
/// # Errors
/// Unknown model, or columns that do not parse.
pub fn spec_from_row(r: &Row) -> Result<(ModelConfig, TrainSpec)> {
    let cfg = resolve_model(&r.model)?.config;
    let mut spec = TrainSpec::new(r.micro_batch, r.seq);
    spec.dtype = parse_dtype(&r.dtype)?;
    spec.state_dtype = parse_dtype(&r.optimizer_state_dtype)?;
    // Rows written before vramcal had other optimizers say `adamw`.
    // The HF names only (not the CLI's aliases); rows written before vramcal had other
    // optimizers say `adamw`.
    spec.optimizer = match r.optimizer.as_str() {
        "adamw" => crate::spec::Optimizer::AdamwTorch,
        o => crate::spec::Optimizer::ALL
            .into_iter()
            .find(|x| x.name() == o)
            .ok_or_else(|| {
                Error::invalid(
                    "optimizer",
                    o,
                    "expected an HF optim name (adamw_torch, adamw_bnb_8bit, adafactor, sgd, …)",
                )
            })?,
    };
    spec.momentum = r.momentum.unwrap_or(0.0);
    if !r.precision.is_empty() {
        spec.precision = Some(r.precision.parse()?);
    }
    spec.accumulate = r.accumulate.max(1);
    spec.allow_longer = true;
    spec.checkpointing = r.checkpointing.parse()?;
    if r.attention.is_empty() {
        return Err(Error::invalid(
            "attention",
            "",
            format!(
                "row of {} written before vramcal recorded the attention mode, by a model that kept every intermediate (tool {}): re-measure it",
                r.model, r.tool_version
            ),
        ));
    }
    spec.attention = r.attention.parse()?;
    let quant: Quant = r.quant.parse()?;
    let lora = match r.method.parse::<Method>()? {
        Method::Lora | Method::Qlora => Some(
            format!(
                "r={},alpha={},dropout={},targets={}{}",
                r.lora_r.unwrap_or(8),
                r.lora_alpha.unwrap_or(8.0),
                r.lora_dropout.unwrap_or(0.0),
                r.lora_targets.replace(';', ","),
                if r.modules_to_save.is_empty() {
                    String::new()
                } else {
                    format!(",modules_to_save={}", r.modules_to_save.replace(';', ","))
                }
            )
            .parse::<LoraConfig>()?,
        ),
        Method::Full if !r.modules_to_save.is_empty() => {
            return Err(Error::invalid(
                "modules_to_save",
                &r.modules_to_save,
                format!(
                    "row of {} is full fine-tuning, which has no modules_to_save (a LoRA setting)",
                    r.model
                ),
            ))
        }
        Method::Full => None,
    };
    spec.adaptation = Adaptation {
        lora,
        quant,
        seed: 0,
    };
    Ok((cfg, spec))
}

/// Solves `min ‖A·c − y‖²` subject to `c ≥ 0` for a few columns by trying every active set.
fn nnls(a: &[Vec<f64>], y: &[f64]) -> Vec<f64> {
    let k = a.first().map_or(0, Vec::len);
    let mut best = (f64::INFINITY, vec![0.0; k]);
    for mask in 0u32..(1 << k) {
        let cols: Vec<usize> = (0..k).filter(|j| mask & (1 << j) != 0).collect();
        let Some(sol) = least_squares(a, y, &cols) else {
            continue;
        };
        if sol.iter().any(|&v| v < 0.0) {
            continue;
        }
        let mut c = vec![0.0; k];
        for (j, v) in cols.iter().zip(&sol) {
            c[*j] = *v;
        }
        let r: f64 = a
            .iter()
            .zip(y)
            .map(|(row, yi)| (row.iter().zip(&c).map(|(x, w)| x * w).sum::<f64>() - yi).powi(2))
            .sum();
        if r < best.0 {
            best = (r, c);
        }
    }
    best.1
}

/// Unconstrained least squares on the columns `cols` (normal equations, Gaussian elimination
/// with partial pivoting); `None` if singular. Each column is scaled to unit norm first, so a
/// column of tiny values (the constant term over peaks of gigabytes) is not taken for zero.
fn least_squares(a: &[Vec<f64>], y: &[f64], cols: &[usize]) -> Option<Vec<f64>> {
    let m = cols.len();
    if m == 0 {
        return Some(vec![]);
    }
    let norms: Vec<f64> = cols
        .iter()
        .map(|&c| a.iter().map(|row| row[c] * row[c]).sum::<f64>().sqrt())
        .collect();
    if norms.contains(&0.0) {
        return None;
    }
    let mut g = vec![vec![0.0; m + 1]; m];
    for (row, yi) in a.iter().zip(y) {
        for (p, &cp) in cols.iter().enumerate() {
            for (q, &cq) in cols.iter().enumerate() {
                g[p][q] += row[cp] / norms[p] * row[cq] / norms[q];
            }
            g[p][m] += row[cp] / norms[p] * yi;
        }
    }
    for i in 0..m {
        let piv = (i..m).max_by(|&x, &z| g[x][i].abs().total_cmp(&g[z][i].abs()))?;
        if g[piv][i].abs() < 1e-12 {
            return None;
        }
        g.swap(i, piv);
        let pivot_row = g[i].clone();
        for (r, row) in g.iter_mut().enumerate() {
            if r != i {
                let f = row[i] / pivot_row[i];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(i) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..m).map(|i| g[i][m] / g[i][i] / norms[i]).collect())
}

/// A measured point ready for fitting.
pub struct Point {
    /// The device it was measured on (`cpu`, `cuda:0 (NVIDIA H200)`).
    pub device: String,
    /// Tokens per sequence (the hold-out splits on it).
    pub seq: usize,
    /// Its training peak (bytes).
    pub measured: u64,
    /// Its terms.
    pub terms: crate::estimate::Terms,
    /// The optimizer step's transient (bytes), as `estimate` counts it.
    pub optimizer_transient: u64,
    /// The load phase's peak (bytes) where the profile counts one (torch profiles), else 0.
    pub load: u64,
    /// Its reserved peak (bytes, `torch.cuda.max_memory_reserved`), where the row records one
    /// (`peak_reserved_bytes` of `scripts/torch_reference.py`'s CUDA rows).
    pub reserved: Option<u64>,
}

/// Turns successful rows into points for `profile`.
///
/// # Errors
/// Rows whose model or settings cannot be rebuilt.
pub fn points(rows: &[Row], profile: Profile) -> Result<Vec<Point>> {
    let mut out = Vec::new();
    // Simulated data-parallel ranks are checked (`check`), never fitted: their sharded terms
    // are counted, not calibrated.
    for r in rows
        .iter()
        .filter(|r| r.status == Some(crate::report::Status::Ok) && r.shard.is_empty())
    {
        let Some(measured) = training_peak(r) else {
            continue;
        };
        let (cfg, spec) = spec_from_row(r)?;
        let t = terms(&cfg, &spec, profile, r.device == "cpu");
        out.push(Point {
            device: r.device.clone(),
            seq: r.seq,
            load: 0,
            reserved: None,
            measured,
            optimizer_transient: crate::estimate::optimizer_transient(
                &cfg,
                &spec,
                profile,
                t.gradients,
                r.device == "cpu",
            ),
            terms: t,
        });
    }
    Ok(out)
}

/// Turns PyTorch reference rows (`scripts/torch_reference.py`'s, counter `allocated`) into
/// points for a torch profile: the row's own setup (its optimizer, precision and device).
///
/// # Errors
/// A row whose model is not a preset; estimator errors.
pub fn reference_points(refs: &[reference::Reference], profile: Profile) -> Result<Vec<Point>> {
    let mut out = Vec::new();
    for p in refs
        .iter()
        .filter(|p| p.usable && p.counter == reference::Counter::Allocated && p.sharding.is_none())
    {
        let Some(measured) = p.peak_bytes else {
            continue;
        };
        let cfg = crate::config::resolve_model(&p.model)?.config;
        let t = terms(&cfg, &p.spec, profile, p.spec.torch_cpu);
        out.push(Point {
            device: p.device.clone(),
            seq: p.spec.seq,
            measured,
            optimizer_transient: t.step_transient,
            load: crate::estimate::torch::load_bytes(&cfg, &p.spec),
            reserved: p.reserved_bytes,
            terms: t,
        });
    }
    Ok(out)
}

/// Fits the coefficients of `profile` to `pts` (relative least squares, non-negative), leaving
/// out points whose peak loading explains. A
/// point's peak is in one of three moments of backward (see [`Term`]); the fit alternates
/// between assigning each point to the moment its current coefficients put the peak in and
/// solving the non-negative least squares for that assignment, until the assignment is stable.
/// The alternation can settle in a local optimum, so it starts from several assignments (the
/// uncalibrated coefficients', then every point at each moment) and keeps the coefficients whose predicted
/// peaks (the larger moment, as `estimate` computes them) have the least squared relative
/// error.
///
/// # Errors
/// [`Error::InvalidValue`] with fewer points than terms.
pub fn fit(pts: &[&Point], profile: Profile, source: &str) -> Result<Coefficients> {
    // A point whose peak loading already explains (to 0.1 %) says nothing about the fitted
    // terms: fitting them to it would pull them towards another phase.
    let kept: Vec<&Point> = pts
        .iter()
        .copied()
        .filter(|p| (p.load as f64) < 0.999 * p.measured as f64)
        .collect();
    let pts = &kept[..];
    // Terms no row exercises cannot be fitted: they keep their counted coefficient (a fitted 0
    // would make every estimate that needs them low), as the counted ones do.
    let start = Coefficients::uncalibrated(profile).values;
    let mut fixed = fixed_coefficients(profile);
    for i in unexercised(pts) {
        if !fixed.iter().any(|(j, _)| *j == i) {
            fixed.push((i, start[i]));
        }
    }
    let k = N_TERMS - fixed.len();
    if pts.len() < k.max(1) {
        return Err(Error::invalid(
            "measured rows",
            pts.len(),
            if pts.is_empty() {
                "no row is left to fit (rows whose peak is loading say nothing of the terms, and the hold-out keeps the longest sequence out): give rows at more than one sequence length, or --holdout none".to_string()
            } else {
                format!("at least {k} successful rows are needed to fit {k} terms")
            },
        ));
    }
    let mut starts: Vec<Vec<Moment>> = vec![pts.iter().map(|p| best_moment(p, &start)).collect()];
    starts.extend(MOMENTS.iter().map(|&m| vec![m; pts.len()]));
    let mut best: Option<(f64, [f64; N_TERMS])> = None;
    for branches in starts {
        let c = alternate(pts, branches, &fixed);
        let cand = Coefficients {
            profile,
            values: c,
            source: String::new(),
            cpu: false, // unused: each point's terms already hold its device's features
            reserved: None,
        };
        let sse: f64 = errors(pts, &cand).iter().map(|e| e * e).sum();
        if best.as_ref().is_none_or(|(b, _)| sse < *b) {
            best = Some((sse, c));
        }
    }
    let (_, c) = best.expect("four starts");
    Ok(Coefficients {
        profile,
        values: c,
        source: source.into(),
        cpu: !pts.is_empty() && pts.iter().all(|p| p.device == "cpu"),
        reserved: None,
    })
}

/// Fits the caching allocator's reserve ([`Reserved`]) to the points that record a reserved
/// peak, given the fitted allocated coefficients `c`: non-negative least squares of
/// `reserved − predicted allocated` on the peak's transient and kept parts, relative to the
/// reserved peak. `None` when fewer than two points record one (CPU rows never do).
pub fn fit_reserved(pts: &[&Point], c: &Coefficients) -> Option<Reserved> {
    let with: Vec<(&Point, u64)> = pts
        .iter()
        .filter_map(|p| p.reserved.map(|r| (*p, r)))
        .collect();
    if with.len() < 2 {
        return None;
    }
    let (mut a, mut y) = (Vec::new(), Vec::new());
    for (p, r) in &with {
        let (alloc, basis) = predicted(p, c);
        let r = *r as f64;
        a.push(vec![basis.transient / r, basis.kept / r]);
        y.push((r - alloc) / r);
    }
    let v = nnls(&a, &y);
    Some(Reserved {
        transient: v[0],
        kept: v[1],
    })
}

/// Relative errors `(predicted − measured) / measured` of the reserved peak of each point
/// that records one, under `c` with its [`Reserved`] (empty without).
pub fn reserved_errors(pts: &[&Point], c: &Coefficients) -> Vec<f64> {
    let Some(r) = &c.reserved else {
        return vec![];
    };
    pts.iter()
        .filter_map(|p| {
            p.reserved.map(|m| {
                let (alloc, basis) = predicted(p, c);
                (alloc + basis.extra(r) - m as f64) / m as f64
            })
        })
        .collect()
}

/// The terms (indices into [`Term`]) that are zero in every point at every moment.
pub fn unexercised(pts: &[&Point]) -> Vec<usize> {
    (0..N_TERMS)
        .filter(|&i| {
            !pts.iter()
                .any(|p| MOMENTS.iter().any(|&m| p.terms.design(m)[i] != 0.0))
        })
        .collect()
}

/// Coefficients that are counted, not fitted:
/// * `gradients_live` = 1 for every profile: gradient bytes are exact (the trainable
///   parameters in the model dtype); fitted, the constant gradients of full fine-tuning trade
///   places with other constants of the same rows, which would not carry over to other models;
/// * `largest_trainable` = 1 for `candle`: the bytes of a gradient being summed into candle's
///   `GradStore` (candle-core 0.11.1 `backprop.rs`: the old buffer, the part, their sum), or a
///   tied embedding's two contributions at the end of a checkpointed backward, are exact.
///   Fitted (0.94 on the CPU rows, 1.32 on the H200's), it traded places with
///   `checkpoint_inputs` and the constant, which then counted the segments' inputs at the end of
///   backward where none is alive: the one-device rows came out right, and vramcal's simulated
///   ranks, whose smaller peaks fall at the head's moment or give the same bytes more weight, up
///   to 1.8 % off (`results/cpu/smollm2-135m-sharded.csv`; within 0.55 % counted);
/// * `attention_transient` = 4 for `candle`: the fused attention's backward (`src/ops/
///   attention.rs`) holds four `(batch, heads, seq, seq)` compute-dtype tensors at once (`P`,
///   `dP`, `dP − rowsum`, `dS`). Short sequences, where it is small, cannot pin it down, and a
///   fit on them extrapolates it wrongly to long ones.
pub fn fixed_coefficients(profile: Profile) -> Vec<(usize, f64)> {
    Term::ALL
        .iter()
        .filter_map(|t| t.counted(profile).map(|v| (t.index(), v)))
        .collect()
}

/// The alternation of [`fit`] from one branch assignment, with `fixed` coefficients held.
fn alternate(pts: &[&Point], mut branches: Vec<Moment>, fixed: &[(usize, f64)]) -> [f64; N_TERMS] {
    let is_fixed = |i: usize| fixed.iter().find(|(j, _)| *j == i).map(|(_, v)| *v);
    let mut c = [0.0; N_TERMS];
    for _ in 0..20 {
        let mut yk = Vec::with_capacity(pts.len());
        let a: Vec<Vec<f64>> = pts
            .iter()
            .zip(&branches)
            .map(|(p, &h)| {
                let d = p.terms.design(h);
                let m = p.measured as f64;
                let yi = (m - static_at(p, h)) / m;
                let held: f64 = fixed.iter().map(|&(i, v)| v * d[i]).sum();
                yk.push(yi - held / m);
                d.iter()
                    .enumerate()
                    .filter(|(i, _)| is_fixed(*i).is_none())
                    .map(|(_, x)| x / m)
                    .collect()
            })
            .collect();
        let sol = nnls(&a, &yk);
        let mut j = 0;
        for (i, ci) in c.iter_mut().enumerate() {
            if let Some(v) = is_fixed(i) {
                *ci = v;
            } else {
                *ci = sol[j];
                j += 1;
            }
        }
        let next: Vec<Moment> = pts.iter().map(|p| best_moment(p, &c)).collect();
        if next == branches {
            break;
        }
        branches = next;
    }
    c
}

/// The moments a point's peak may be at: backward's three, and for the torch profiles the
/// optimizer step (see [`Moment::Step`]).
fn moments_of(p: &Point) -> &'static [Moment] {
    if p.terms.torch {
        &[Moment::Head, Moment::Layer, Moment::End, Moment::Step]
    } else {
        &MOMENTS
    }
}

/// The bytes counted, not fitted, at moment `m` of point `p`.
fn static_at(p: &Point, m: Moment) -> f64 {
    let step = if m == Moment::Step {
        p.terms.gradients + p.terms.step_transient
    } else {
        0
    };
    let head = if m == Moment::Step {
        0
    } else {
        p.terms.static_at(m)
    };
    (p.terms.weights + p.terms.optimizer_states + p.terms.workspace + step + head) as f64
}

/// The predicted peak of `p` at moment `m` under coefficients `c`.
fn predicted_at(p: &Point, m: Moment, c: &[f64; N_TERMS]) -> f64 {
    static_at(p, m)
        + p.terms
            .design(m)
            .iter()
            .zip(c)
            .map(|(x, k)| x * k)
            .sum::<f64>()
}

/// The moment of `p` with the largest predicted peak under `c` (the first of equal ones).
fn best_moment(p: &Point, c: &[f64; N_TERMS]) -> Moment {
    let mut best = (Moment::Head, f64::NEG_INFINITY);
    for &m in moments_of(p) {
        let v = predicted_at(p, m, c);
        if v > best.1 {
            best = (m, v);
        }
    }
    best.0
}

/// Relative error `(predicted − measured) / measured` of each point.
pub fn errors(pts: &[&Point], c: &Coefficients) -> Vec<f64> {
    pts.iter()
        .map(|p| (predicted(p, c).0 - p.measured as f64) / p.measured as f64)
        .collect()
}

/// The predicted allocated peak of `p` under `c` (bytes), as `estimate` computes it, and the
/// parts of it the caching allocator's reserve grows with.
fn predicted(p: &Point, c: &Coefficients) -> (f64, ReservedBasis) {
    let moment = best_moment(p, &c.values);
    let bwd = predicted_backward_peak(&p.terms, c);
    let peak = bwd
        .max(predicted_at(p, moment, &c.values))
        .max(optimizer_peak(p))
        .max(p.load as f64);
    let basis = if peak == p.load as f64 && peak > bwd {
        ReservedBasis::default()
    } else if peak > bwd {
        ReservedBasis {
            transient: p.optimizer_transient as f64,
            kept: 0.0,
        }
    } else {
        p.terms
            .reserved_basis(p.terms.peak_moment(&c.values), &c.values)
    };
    (peak, basis)
}

/// The optimizer step's predicted peak, as `estimate` computes it.
fn optimizer_peak(p: &Point) -> f64 {
    (p.terms.weights
        + p.terms.gradients
        + p.terms.optimizer_states
        + p.optimizer_transient
        + p.terms.workspace) as f64
}

/// One row of a calibration table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRow {
    /// Profile the coefficients belong to.
    pub profile: String,
    /// Device the measurements were made on.
    pub device: String,
    /// Term name (see [`Term`]).
    pub term: String,
    /// Fitted coefficient.
    pub coefficient: f64,
    /// Unit of the coefficient.
    pub unit: String,
    /// Measured rows used for the fit.
    pub points_used: usize,
    /// Median absolute relative error on the fitted rows.
    pub fit_median_abs_error: f64,
    /// Largest absolute relative error on the held-out rows (empty if none).
    pub heldout_max_abs_error: Option<f64>,
    /// Measured CSVs the fit read.
    pub source_files: String,
    /// vramcal version that made the table.
    pub tool_version: String,
    /// The command that made the table.
    pub command: String,
}

/// Writes a calibration table (one row per term), after checking every coefficient is one
/// [`read_table`] accepts.
///
/// # Errors
/// [`Error::InvalidValue`] for a coefficient outside those bounds (nothing is written);
/// [`Error::Io`]/[`Error::Csv`].
pub fn write_table(path: &Path, rows: &[CalibrationRow]) -> Result<()> {
    for r in rows {
        let max = if RESERVED_TERMS.contains(&r.term.as_str()) {
            MAX_MULTIPLIER
        } else {
            let term = Term::from_name(&r.term).ok_or_else(|| {
                Error::invalid(
                    "calibration term",
                    &r.term,
                    "is not a term of the estimator",
                )
            })?;
            coefficient_bound(term).0
        };
        if !(r.coefficient.is_finite() && (0.0..=max).contains(&r.coefficient)) {
            return Err(Error::invalid(
                format!("fitted coefficient of {}", r.term),
                r.coefficient,
                format!("outside 0..={max:e}: the measured rows do not pin this term down; add rows that exercise it"),
            ));
        }
    }
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut w = csv::Writer::from_path(path).map_err(|e| Error::Csv {
        path: path.into(),
        reason: e.to_string(),
    })?;
    for r in rows {
        w.serialize(r).map_err(|e| Error::Csv {
            path: path.into(),
            reason: e.to_string(),
        })?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// The table's names of the caching allocator's reserve ([`Reserved`]): `transient`, then
/// `kept`. A table has both or neither.
pub const RESERVED_TERMS: [&str; 2] = ["reserved_transient", "reserved_kept"];

/// The unit of [`RESERVED_TERMS`]' coefficients.
pub const RESERVED_UNIT: &str = "reserved bytes per allocated byte of the part";

/// Largest coefficient a calibration table may give a term counted in bytes per byte (a
/// transient a few tensors wide is 3–4; the fit never needs more than a few).
pub const MAX_MULTIPLIER: f64 = 100.0;

/// Largest `constant` term a calibration table may give (bytes): 16 GiB, far above any fixed
/// overhead seen (0 on the CPU and on the H200).
pub const MAX_CONSTANT_BYTES: f64 = (16u64 << 30) as f64;

/// The largest coefficient a table may give `term`, and its unit: [`MAX_CONSTANT_BYTES`] bytes
/// for `constant`, [`MAX_MULTIPLIER`] bytes per byte of the term for the others.
fn coefficient_bound(term: Term) -> (f64, &'static str) {
    let max = match term {
        Term::Constant => MAX_CONSTANT_BYTES,
        _ => MAX_MULTIPLIER,
    };
    (max, term.coefficient_unit())
}

/// Loads the coefficients for `profile`: a calibration table ([`read_table`]) or, without
/// one, the uncalibrated ones.
///
/// # Errors
/// As [`read_table`].
pub fn coefficients(path: Option<&Path>, profile: Profile) -> Result<Coefficients> {
    Ok(match path {
        Some(p) => read_table(p, profile)?,
        None => Coefficients::uncalibrated(profile),
    })
}

/// Reads a calibration table for `profile`.
///
/// # Errors
/// [`Error::Csv`] if unreadable or longer than [`crate::input::MAX_INPUT_BYTES`], malformed,
/// for another profile, made by another vramcal version, lacking a term or naming one twice, or
/// with a coefficient that is negative, not finite, or above [`MAX_MULTIPLIER`]
/// ([`MAX_CONSTANT_BYTES`] for `constant`).
pub fn read_table(path: &Path, profile: Profile) -> Result<Coefficients> {
    let bad = |reason: String| Error::Csv {
        path: PathBuf::from(path),
        reason,
    };
    let mut r = crate::input::csv_reader(path)?;
    let rows: Vec<CalibrationRow> = r
        .deserialize()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("not a vramcal calibration table: {e}")))?;
    let mut values = [f64::NAN; N_TERMS];
    let mut reserved = [None::<f64>; 2];
    for row in &rows {
        if row.profile != profile.name() {
            return Err(bad(format!(
                "is a calibration for profile {}, not {} (give --profile {} to use it)",
                row.profile,
                profile.name(),
                row.profile
            )));
        }
        if !(row.device == "cpu" || row.device.starts_with("cuda:")) {
            return Err(bad(format!(
                "device {:?}: expected cpu or a CUDA device (cuda:N …), as `vramcal calibrate` writes",
                row.device
            )));
        }
        if row.device != rows[0].device {
            return Err(bad(format!(
                "rows for two devices ({} and {}): a table describes one",
                rows[0].device, row.device
            )));
        }
        if row.tool_version != env!("CARGO_PKG_VERSION") {
            return Err(bad(format!(
                "was made by vramcal {}, this is {}: recalibrate with `vramcal calibrate`",
                row.tool_version,
                env!("CARGO_PKG_VERSION")
            )));
        }
        if let Some(k) = RESERVED_TERMS.iter().position(|n| *n == row.term) {
            let c = row.coefficient;
            if !c.is_finite() || !(0.0..=MAX_MULTIPLIER).contains(&c) {
                return Err(bad(format!(
                    "coefficient {c} for term {} is not a finite number in 0..={MAX_MULTIPLIER} ({RESERVED_UNIT}): the table is damaged or not made by `vramcal calibrate`",
                    row.term
                )));
            }
            if reserved[k].replace(c).is_some() {
                return Err(bad(format!("has two coefficients for term {}", row.term)));
            }
            continue;
        }
        let term =
            Term::from_name(&row.term).ok_or_else(|| bad(format!("unknown term {}", row.term)))?;
        let i = term.index();
        let (max, unit) = coefficient_bound(term);
        let c = row.coefficient;
        if !c.is_finite() || c < 0.0 || c > max {
            let shown = if c.is_finite() && c.abs() >= 1e6 {
                format!("{c:e}")
            } else {
                c.to_string()
            };
            return Err(bad(format!(
                "coefficient {shown} for term {} is not a finite number in 0..={max:e} ({unit}): the table is damaged or not made by `vramcal calibrate`",
                row.term
            )));
        }
        if !values[i].is_nan() {
            return Err(bad(format!("has two coefficients for term {}", row.term)));
        }
        if let Some((_, counted)) = fixed_coefficients(profile)
            .into_iter()
            .find(|(j, _)| *j == i)
        {
            if c != counted {
                return Err(bad(format!(
                    "gives term {} the coefficient {c}, but it is counted, not fitted ({counted}): the table was edited, or made by an older vramcal (remake it with `vramcal calibrate`)",
                    row.term
                )));
            }
        }
        values[i] = c;
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "has no coefficient for term {} (a table made before vramcal had that term, or cut short): recalibrate with `vramcal calibrate`",
            Term::ALL[i].name()
        )));
    }
    let reserved = match reserved {
        [Some(transient), Some(kept)] => Some(Reserved { transient, kept }),
        [None, None] => None,
        _ => {
            return Err(bad(format!(
                "has only one of the terms {} and {}: a table has both or neither",
                RESERVED_TERMS[0], RESERVED_TERMS[1]
            )))
        }
    };
    Ok(Coefficients {
        profile,
        values,
        source: path.display().to_string(),
        cpu: !rows.is_empty() && rows.iter().all(|r| r.device == "cpu"),
        reserved,
    })
}

/// Which measured rows `vramcal calibrate` holds out of the fit and reports separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holdout {
    /// The rows at the largest sequence length (the fit must extrapolate to them).
    LargestSeq,
    /// None: every row is fitted.
    None,
}

impl std::str::FromStr for Holdout {
    type Err = Error;

    /// Parses `largest-seq` or `none`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "largest-seq" => Ok(Holdout::LargestSeq),
            "none" => Ok(Holdout::None),
            _ => Err(Error::invalid(
                "--holdout",
                s,
                "expected largest-seq or none",
            )),
        }
    }
}

impl std::fmt::Display for Holdout {
    /// The name [`std::str::FromStr`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Holdout::LargestSeq => "largest-seq",
            Holdout::None => "none",
        })
    }
}

/// Splits `pts` into the rows to fit and the rows held out by `holdout`.
pub fn split(pts: &[Point], holdout: Holdout) -> (Vec<&Point>, Vec<&Point>) {
    match holdout {
        Holdout::None => (pts.iter().collect(), vec![]),
        Holdout::LargestSeq => {
            let max_seq = pts.iter().map(|p| p.seq).max().unwrap_or(0);
            pts.iter().partition(|p| p.seq < max_seq)
        }
    }
}

/// Leave-one-out errors over `train`: each row predicted by a fit to the others (rows whose
/// fit fails are left out).
pub fn leave_one_out(train: &[&Point], profile: Profile) -> Vec<f64> {
    let mut loo = Vec::new();
    for i in 0..train.len() {
        let rest: Vec<&Point> = train
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| *p)
            .collect();
        if let Ok(ci) = fit(&rest, profile, "loo") {
            loo.extend(errors(&[train[i]], &ci));
        }
    }
    loo
}

/// A file-name form of a row's device: the GPU's name when the row records one
/// (`cuda:0 (NVIDIA H200)` → `h200`), else the device (`cpu`); lowercase letters, digits and
/// dashes only.
pub fn device_slug(device: &str) -> String {
    let name = match (device.find('('), device.rfind(')')) {
        (Some(a), Some(b)) if b > a + 1 => &device[a + 1..b],
        _ => device,
    };
    let mut slug = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_end_matches('-');
    slug.strip_prefix("nvidia-").unwrap_or(slug).to_string()
}

#[cfg(test)]
mod tests {
    use super::device_slug;

    #[test]
    fn device_slugs_are_file_names() {
        assert_eq!(device_slug("cpu"), "cpu");
        assert_eq!(device_slug("cuda:0 (NVIDIA H200)"), "h200");
        assert_eq!(
            device_slug("cuda:1 (NVIDIA A100-SXM4-80GB)"),
            "a100-sxm4-80gb"
        );
        assert_eq!(device_slug("cuda:0"), "cuda-0");
    }
}
