//! `vramcal calibrate`: fit the estimator's coefficients to measured rows, report the fit and
//! held-out errors, and write the calibration table.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::calibrate::{errors, fit, points, write_table, CalibrationRow, Point};
use crate::cli::CalibrateArgs;
use crate::estimate::{Term, N_TERMS};
use crate::report::csv_out::read_rows;
use crate::spec::Profile;

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn abs_max(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, x| a.max(x.abs()))
}

/// Runs `vramcal calibrate`.
///
/// # Errors
/// Unreadable or empty measurements, too few successful rows, an unknown hold-out rule.
pub fn run(a: &CalibrateArgs) -> anyhow::Result<ExitCode> {
    let profile = a.profile;
    let mut rows = Vec::new();
    for f in &a.measured {
        if crate::calibrate::reference::is_reference_file(f)? {
            anyhow::bail!(
                "{}: a published-measurements file: use it with `vramcal check`, never to fit",
                f.display()
            );
        }
        let r = read_rows(f)?;
        if r.is_empty() {
            anyhow::bail!("{}: no measured rows", f.display());
        }
        rows.extend(r);
    }
    let pts = points(&rows, profile)?;
    let mut devices: Vec<String> = pts.iter().map(|p| p.row.device.clone()).collect();
    devices.sort();
    devices.dedup();
    let device = devices.join("+");
    let (train, held): (Vec<&Point>, Vec<&Point>) = match a.holdout.as_str() {
        "none" => (pts.iter().collect(), vec![]),
        "largest-seq" => {
            let max_seq = pts.iter().map(|p| p.row.seq).max().unwrap_or(0);
            pts.iter().partition(|p| p.row.seq < max_seq)
        }
        other => {
            return Err(
                crate::Error::invalid("--holdout", other, "expected largest-seq or none").into(),
            )
        }
    };
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}-calibration.csv",
            device_slug(&device),
            profile.name()
        ))
    });
    crate::input::refuse_overwriting_measurements("--out", &out, &a.measured)?;
    if profile != Profile::Candle {
        eprintln!(
            "note: fitting the {} profile to vramcal's own measurements, which measure the candle model",
            profile.name()
        );
    }
    let c = fit(&train, profile, &out.display().to_string()).map_err(|e| {
        anyhow::anyhow!(
            "{e} ({} of {} rows fitted; --holdout {} keeps the others out)",
            train.len(),
            pts.len(),
            a.holdout
        )
    })?;
    // Terms that no fitted row exercises keep their counted coefficient: say so.
    let fixed = crate::calibrate::fixed_coefficients(profile);
    for i in crate::calibrate::unexercised(&train) {
        let term = Term::ALL[i];
        let name = term.name();
        if !fixed.iter().any(|(j, _)| *j == i) && term != Term::Constant {
            eprintln!(
                "note: no fitted row exercises the term {name}: it keeps its counted coefficient {} (not fitted)",
                c.values[i]
            );
        }
    }
    let fit_err = errors(&train, &c);
    let held_err = errors(&held, &c);
    // Leave-one-out over the fitted rows.
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
    let files = a
        .measured
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(";");
    let table: Vec<CalibrationRow> = Term::ALL
        .iter()
        .zip(c.values)
        .map(|(term, v)| CalibrationRow {
            profile: profile.name().into(),
            device: device.clone(),
            term: term.name().into(),
            coefficient: v,
            unit: term.coefficient_unit().into(),
            points_used: train.len(),
            fit_median_abs_error: median(fit_err.iter().map(|e| e.abs()).collect()),
            heldout_max_abs_error: (!held_err.is_empty()).then(|| abs_max(&held_err)),
            source_files: files.clone(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            command: super::command_line(),
        })
        .collect();
    write_table(&out, &table)?;
    let mut t = format!(
        "calibration of profile {} on {device}: {} rows fitted, {} held out\n",
        profile.name(),
        train.len(),
        held.len()
    );
    for (term, v) in Term::ALL.iter().zip(c.values) {
        t += &format!("  {:<20} {v:.6}\n", term.name());
    }
    let pct = |x: f64| format!("{:.2} %", 100.0 * x);
    t += &format!(
        "fit rows: median |error| {}, max {}\n",
        pct(median(fit_err.iter().map(|e| e.abs()).collect())),
        pct(abs_max(&fit_err))
    );
    if loo.is_empty() {
        t += &format!("leave-one-out: n/a (each fit needs {} rows)\n", N_TERMS);
    } else {
        t += &format!(
            "leave-one-out: median |error| {}, max {}\n",
            pct(median(loo.iter().map(|e| e.abs()).collect())),
            pct(abs_max(&loo))
        );
    }
    if !held.is_empty() {
        t += &format!(
            "held-out rows ({}): median |error| {}, max {}, under-estimates {}\n",
            a.holdout,
            pct(median(held_err.iter().map(|e| e.abs()).collect())),
            pct(abs_max(&held_err)),
            held_err.iter().filter(|e| **e < 0.0).count()
        );
    }
    t += &format!("wrote {}\n", out.display());
    crate::export::emit(&t)?;
    Ok(ExitCode::SUCCESS)
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
