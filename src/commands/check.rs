//! `vramcal check`: predicted vs measured for every row, summary statistics, and thresholds
//! that fail the run (CI keeps the estimator's accuracy this way).

use std::path::Path;
use std::process::ExitCode;

use crate::calibrate::{spec_from_row, training_peak};
use crate::cli::CheckArgs;
use crate::config::resolve_model;
use crate::estimate::estimate;
use crate::report::csv_out::read_rows;
use crate::spec::LoraConfig;
use crate::spec::Profile;
use crate::spec::{parse_dtype, TrainSpec};
use crate::spec::{Adaptation, Checkpointing, Quant};

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
    /// `(predicted − measured) / measured`.
    pub relative_error: f64,
}

/// A published measurement (`../shared/cases/public-measurements.csv`) or a reference row of
/// `scripts/torch_reference.py`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Public {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) method: String,
    lora_r: Option<usize>,
    lora_alpha: Option<f64>,
    lora_targets: String,
    quant: String,
    precision: String,
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    checkpointing: String,
    counter: String,
    /// Median step time (seconds) where the file records one (scripts/torch_reference.py).
    #[serde(default)]
    pub(crate) step_seconds_median: Option<f64>,
    /// Empty in rows that ran out of memory or failed (scripts/torch_reference.py writes them).
    peak_bytes: Option<u64>,
    /// `ok`, `oom` or `error` where the file says (scripts/torch_reference.py); only `ok` rows
    /// (or rows without the column) are checked.
    #[serde(default)]
    pub(crate) status: Option<String>,
}

/// The training setup a published or reference row describes.
///
/// # Errors
/// A checkpointing or method value outside the format's vocabulary; a malformed LoRA setting.
pub(crate) fn public_spec(p: &Public) -> anyhow::Result<TrainSpec> {
    let mut s = TrainSpec::new(p.batch, p.seq);
    let prec = p.precision.to_ascii_lowercase();
    s.dtype = parse_dtype(if prec.contains("fp16") { "f16" } else { "bf16" })?;
    // PyTorch's AdamW keeps its states in the parameters' dtype unless fp32 is stated.
    s.state_dtype = s.dtype;
    s.allow_longer = true;
    s.checkpointing = match p.checkpointing.as_str() {
        "on" => Checkpointing::Every(1),
        "off" | "" => Checkpointing::None,
        other => anyhow::bail!("row {}: checkpointing {other:?}: expected on or off", p.id),
    };
    if !matches!(p.method.as_str(), "full" | "lora" | "qlora") {
        anyhow::bail!(
            "row {}: method {:?}: expected full, lora or qlora",
            p.id,
            p.method
        );
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

/// Whether `path` is a published-measurements file (columns `source` and `counter`).
///
/// # Errors
/// An unreadable file.
pub fn is_public(path: &Path) -> anyhow::Result<bool> {
    let mut r = crate::input::csv_reader(path)?;
    let h = r
        .headers()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(h.iter().any(|c| c == "counter") && h.iter().any(|c| c == "source"))
}

fn median(mut v: Vec<f64>) -> f64 {
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

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// Runs `vramcal check`.
///
/// # Errors
/// Unreadable, empty or malformed measured files; a bad calibration; thresholds exceeded.
pub fn run(a: &CheckArgs) -> anyhow::Result<ExitCode> {
    let profile = a.profile.parse::<Profile>()?;
    for (name, v) in [
        ("--max-error", a.max_error),
        ("--max-median-error", a.max_median_error),
        ("--margin", Some(a.margin)),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(crate::Error::invalid(
                    name,
                    v,
                    "must be a fraction between 0 and 1, e.g. 0.03 for 3 %",
                )
                .into());
            }
        }
    }
    let c = super::estimate::coefficients(a.calibration.as_deref(), profile)?;
    let mut out: Vec<Compared> = Vec::new();
    for f in &a.measured {
        let before = out.len();
        if is_public(f)? {
            let mut r = crate::input::csv_reader(f)?;
            let mut skipped = 0;
            for p in r.deserialize::<Public>() {
                let p = p.map_err(|e| anyhow::anyhow!("{}: malformed row: {e}", f.display()))?;
                let ok = matches!(p.status.as_deref(), None | Some("") | Some("ok"));
                let Some(peak) = p.peak_bytes.filter(|&b| ok && b > 0) else {
                    skipped += 1;
                    continue;
                };
                let cfg = resolve_model(&p.model)?.config;
                let spec = public_spec(&p)?;
                let e = estimate(&cfg, &spec, profile, &c)?;
                out.push(Compared {
                    id: p.id.clone(),
                    config: format!(
                        "{} {} b{} s{} ckpt {} {}",
                        p.model, p.method, p.batch, p.seq, p.checkpointing, p.precision
                    ),
                    counter: p.counter.clone(),
                    measured_bytes: peak,
                    predicted_bytes: e.peak_bytes,
                    relative_error: (e.peak_bytes as f64 - peak as f64) / peak as f64,
                });
            }
            if skipped > 0 {
                eprintln!(
                    "note: {}: skipped {skipped} row(s) without a successful peak (status not ok, or peak_bytes empty or 0)",
                    f.display()
                );
            }
        } else {
            for (i, r) in read_rows(f)?.iter().enumerate() {
                if r.status != Some(crate::report::Status::Ok) {
                    continue;
                }
                let Some(m) = training_peak(r) else { continue };
                let (cfg, spec) = spec_from_row(r)?;
                let e = estimate(&cfg, &spec, profile, &c)?;
                out.push(Compared {
                    id: format!("{}:{}", f.display(), i + 2),
                    config: format!(
                        "{} {} ckpt {} attn {} b{} s{} {}",
                        r.model,
                        r.method,
                        r.checkpointing,
                        r.attention,
                        r.micro_batch,
                        r.seq,
                        r.dtype
                    ),
                    counter: "allocated".into(),
                    measured_bytes: m,
                    predicted_bytes: e.peak_bytes,
                    relative_error: (e.peak_bytes as f64 - m as f64) / m as f64,
                });
            }
        }
        if out.len() == before {
            anyhow::bail!("{}: no successful measured rows to check", f.display());
        }
    }
    let abs: Vec<f64> = out.iter().map(|x| x.relative_error.abs()).collect();
    let (med, p90, max) = (
        median(abs.clone()),
        quantile(abs.clone(), 0.9),
        abs.iter().fold(0f64, |m, x| m.max(*x)),
    );
    let under = out
        .iter()
        .filter(|x| (x.predicted_bytes as f64) * (1.0 + a.margin) < x.measured_bytes as f64)
        .count();
    let mut md = String::from(
        "| row | configuration | counter | measured_bytes | predicted_bytes | error |\n|---|---|---|---:|---:|---:|\n",
    );
    for x in &out {
        md += &format!(
            "| {} | {} | {} | {} | {} | {:+.2} % |\n",
            x.id,
            x.config,
            x.counter,
            x.measured_bytes,
            x.predicted_bytes,
            100.0 * x.relative_error
        );
    }
    let summary = format!(
        "profile {} ({}): {} rows; |error| median {:.2} %, p90 {:.2} %, max {:.2} %; under-estimates {} of {} with a {:.1} % margin\n",
        profile.name(),
        c.source,
        out.len(),
        100.0 * med,
        100.0 * p90,
        100.0 * max,
        under,
        out.len(),
        100.0 * a.margin
    );
    let gates: Vec<String> = [
        a.max_error
            .map(|t| format!("max |error| <= {:.2} %", 100.0 * t)),
        a.max_median_error
            .map(|t| format!("median |error| <= {:.2} %", 100.0 * t)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let summary = format!(
        "{}; {}\n",
        summary.trim_end(),
        if gates.is_empty() {
            "no thresholds given (--max-error, --max-median-error): exit 0 whatever the errors"
                .to_string()
        } else {
            format!("thresholds: {}", gates.join(", "))
        }
    );
    for (flag, p) in [("--out-csv", &a.out_csv), ("--out-md", &a.out_md)] {
        if let Some(p) = p {
            crate::input::refuse_overwriting_measurements(flag, p, &a.measured)?;
        }
    }
    if let Some(p) = &a.out_csv {
        let mut w =
            csv::Writer::from_path(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        for x in &out {
            w.serialize(x)?;
        }
        w.flush()?;
    }
    if let Some(p) = &a.out_md {
        std::fs::write(p, format!("{md}\n{summary}"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    super::emit(&format!("{md}\n{summary}"))?;
    if let Some(t) = a.max_error {
        if max > t {
            anyhow::bail!(
                "accuracy check failed: max |error| {:.2} % exceeds --max-error {:.2} %",
                100.0 * max,
                100.0 * t
            );
        }
    }
    if let Some(t) = a.max_median_error {
        if med > t {
            anyhow::bail!(
                "accuracy check failed: median |error| {:.2} % exceeds --max-median-error {:.2} %",
                100.0 * med,
                100.0 * t
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
