//! `vramcal check`: predicted vs measured for every row, summary statistics, and thresholds
//! that fail the run (CI keeps the estimator's accuracy this way). Parse (the thresholds) →
//! compute ([`crate::calibrate::compare`]) → render ([`crate::export::check`]).

use std::process::ExitCode;

use crate::calibrate::compare::{compare_file, median, quantile, Compared};
use crate::cli::CheckArgs;
use crate::error::Error;
use crate::export::check::Summary;

/// Runs `vramcal check`.
///
/// # Errors
/// Unreadable, empty or malformed measured files; a bad calibration; thresholds exceeded.
pub fn run(a: &CheckArgs) -> anyhow::Result<ExitCode> {
    check_thresholds(a)?;
    let c = crate::calibrate::coefficients(a.calibration.as_deref(), a.profile)?;
    // One file given twice would count its rows twice.
    let mut seen = std::collections::HashSet::new();
    for f in &a.measured {
        let key = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        if !seen.insert(key) {
            return Err(Error::invalid(
                "--measured",
                f.display(),
                "given twice: its rows would count twice",
            )
            .into());
        }
    }
    let mut rows: Vec<Compared> = Vec::new();
    for f in &a.measured {
        let (r, skipped) = compare_file(f, a.profile, &c)?;
        if skipped > 0 {
            eprintln!(
                "note: {}: skipped {skipped} row(s) without a successful peak (status not ok, or peak_bytes empty or 0)",
                f.display()
            );
        }
        if r.is_empty() {
            return Err(Error::Csv {
                path: f.to_path_buf(),
                reason: "no successful measured rows to check".into(),
            }
            .into());
        }
        rows.extend(r);
    }
    let summary = summarize(a, &rows, c.source);
    let text = crate::export::check::markdown(&rows, &summary);
    write_outputs(a, &rows, &text)?;
    crate::export::emit(&text)?;
    gate(a, &summary)?;
    Ok(ExitCode::SUCCESS)
}

/// Refuses thresholds and margins that are not fractions in [0, 1].
fn check_thresholds(a: &CheckArgs) -> anyhow::Result<()> {
    for (name, v) in [
        ("--max-error", a.max_error),
        ("--max-median-error", a.max_median_error),
        ("--margin", Some(a.margin)),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(Error::invalid(
                    name,
                    v,
                    "must be a fraction between 0 and 1, e.g. 0.03 for 3 %",
                )
                .into());
            }
        }
    }
    Ok(())
}

/// The statistics of `rows` and the thresholds in force.
fn summarize(a: &CheckArgs, rows: &[Compared], coefficients: String) -> Summary {
    let (oom, rows): (Vec<&Compared>, Vec<&Compared>) = rows.iter().partition(|x| x.oom);
    let abs: Vec<f64> = rows.iter().map(|x| x.relative_error.abs()).collect();
    Summary {
        oom_rows: oom.len(),
        oom_missed: oom
            .iter()
            .filter(|x| x.predicted_bytes <= x.measured_bytes)
            .count(),
        profile: a.profile,
        coefficients,
        rows: rows.len(),
        median: median(abs.clone()),
        p90: quantile(abs.clone(), 0.9),
        max: abs.iter().fold(0f64, |m, x| m.max(*x)),
        under: rows
            .iter()
            .filter(|x| (x.predicted_bytes as f64) * (1.0 + a.margin) < x.measured_bytes as f64)
            .count(),
        margin: a.margin,
        max_error: a.max_error,
        max_median_error: a.max_median_error,
    }
}

/// Writes `--out-csv` (the rows) and `--out-md` (`text`), never over a measured file.
fn write_outputs(a: &CheckArgs, rows: &[Compared], text: &str) -> anyhow::Result<()> {
    for (flag, p) in [("--out-csv", &a.out_csv), ("--out-md", &a.out_md)] {
        if let Some(p) = p {
            crate::input::refuse_overwriting_measurements(flag, p, &a.measured)?;
            crate::input::refuse_overwriting_calibration(flag, p)?;
        }
    }
    if let (Some(c), Some(m)) = (&a.out_csv, &a.out_md) {
        if c == m {
            return Err(Error::invalid(
                "--out-md",
                m.display(),
                "is also --out-csv: give two files",
            )
            .into());
        }
    }
    if let Some(p) = &a.out_csv {
        let mut w =
            csv::Writer::from_path(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        for x in rows {
            w.serialize(x)?;
        }
        w.flush()?;
    }
    if let Some(p) = &a.out_md {
        std::fs::write(p, text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// Fails when a threshold is exceeded.
fn gate(a: &CheckArgs, s: &Summary) -> anyhow::Result<()> {
    if s.oom_missed > 0 && (a.max_error.is_some() || a.max_median_error.is_some()) {
        anyhow::bail!(
            "accuracy check failed: {} of {} rows that ran out of memory predicted to fit on their card",
            s.oom_missed,
            s.oom_rows
        );
    }
    for (what, value, flag, threshold) in [
        ("max", s.max, "--max-error", a.max_error),
        ("median", s.median, "--max-median-error", a.max_median_error),
    ] {
        if let Some(t) = threshold.filter(|t| value > *t) {
            anyhow::bail!(
                "accuracy check failed: {what} |error| {:.2} % exceeds {flag} {:.2} %",
                100.0 * value,
                100.0 * t
            );
        }
    }
    Ok(())
}
