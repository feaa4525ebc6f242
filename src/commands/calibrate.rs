//! `vramcal calibrate`: fit the estimator's coefficients to measured rows, report the fit and
//! held-out errors, and write the calibration table. Parse (the measured files, the rows to
//! hold out) → compute ([`crate::calibrate`]) → render ([`crate::export::calibrate`]).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::calibrate::compare::{abs_max, median};
use crate::calibrate::{
    device_slug, errors, fit, fit_reserved, leave_one_out, points, reserved_errors, split,
    write_table, CalibrationRow, Point, RESERVED_TERMS, RESERVED_UNIT,
};
use crate::cli::CalibrateArgs;
use crate::estimate::{Coefficients, Term};
use crate::export::calibrate::{Fitted, ReservedFit};
use crate::report::csv_out::read_rows;
use crate::report::Row;
use crate::spec::Profile;

/// Runs `vramcal calibrate`.
///
/// # Errors
/// Unreadable or empty measurements, a file of reference rows, too few successful rows.
pub fn run(a: &CalibrateArgs) -> anyhow::Result<ExitCode> {
    let pts = measured_points(a)?;
    let mut devices: Vec<String> = pts.iter().map(|p| p.device.clone()).collect();
    devices.sort();
    devices.dedup();
    let device = devices.join("+");
    let mut kinds: Vec<String> = devices.iter().map(|d| device_slug(d)).collect();
    kinds.dedup();
    if kinds.len() > 1 {
        return Err(crate::Error::invalid(
            "--measured",
            &device,
            "rows from more than one device kind: a calibration table describes one (fit each kind on its own rows)",
        )
        .into());
    }
    let (train, held) = split(&pts, a.holdout);
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}-calibration.csv",
            device_slug(&device),
            a.profile.name()
        ))
    });
    crate::input::refuse_overwriting_measurements("--out", &out, &a.measured)?;

    let c = fit(&train, a.profile, &out.display().to_string()).map_err(|e| {
        anyhow::anyhow!(
            "{e} ({} of {} rows fitted; --holdout {} keeps the others out)",
            train.len(),
            pts.len(),
            a.holdout
        )
    })?;
    note_unexercised(&train, &c);
    let mut c = c;
    c.reserved = fit_reserved(&train, &c);
    let reserved = c.reserved.map(|r| ReservedFit {
        values: r,
        fitted: train.iter().filter(|p| p.reserved.is_some()).count(),
        fit_errors: reserved_errors(&train, &c),
        held_errors: reserved_errors(&held, &c),
    });
    let fitted = Fitted {
        profile: a.profile,
        device,
        values: c.values,
        fitted: train.len(),
        held: held.len(),
        fit_errors: errors(&train, &c),
        loo_errors: leave_one_out(&train, a.profile),
        held_errors: errors(&held, &c),
        holdout: a.holdout,
        reserved,
        out,
    };
    write_table(&fitted.out, &table(a, &fitted))?;
    crate::export::emit(&crate::export::calibrate::text(&fitted))?;
    Ok(ExitCode::SUCCESS)
}

/// The points of the measured files: vramcal's own rows, or for a torch profile the rows of
/// `scripts/torch_reference.py` (PyTorch measured by this project). Published reference rows
/// are refused: they check, never fit. The two kinds are not mixed.
fn measured_points(a: &CalibrateArgs) -> anyhow::Result<Vec<Point>> {
    let (mut refs, mut rows) = (Vec::new(), Vec::new());
    for f in &a.measured {
        if crate::calibrate::reference::is_reference_file(f)? {
            let r = crate::calibrate::reference::read_references(f)?;
            if r.iter().any(|p| !p.ours) {
                anyhow::bail!(
                    "{}: a published-measurements file: use it with `vramcal check`, never to fit (only rows of scripts/torch_reference.py calibrate a torch profile)",
                    f.display()
                );
            }
            if a.profile == Profile::Candle {
                anyhow::bail!(
                    "{}: PyTorch's measurements calibrate a torch profile (--profile torch-sdpa or torch-eager), not candle",
                    f.display()
                );
            }
            refs.extend(r);
        } else {
            rows.extend(measured_rows(f)?);
        }
    }
    if !refs.is_empty() && !rows.is_empty() {
        anyhow::bail!(
            "--measured mixes vramcal's own rows with PyTorch's: a table describes one of them"
        );
    }
    if !rows.is_empty() && a.profile != Profile::Candle {
        eprintln!(
            "note: fitting the {} profile to vramcal's own measurements, which measure the candle model",
            a.profile.name()
        );
    }
    if refs.is_empty() {
        Ok(points(&rows, a.profile)?)
    } else {
        Ok(crate::calibrate::reference_points(&refs, a.profile)?)
    }
}

/// The rows of vramcal's measured file `f`, each checked against the vocabulary.
fn measured_rows(f: &std::path::Path) -> anyhow::Result<Vec<Row>> {
    let rows = read_rows(f)?;
    if rows.is_empty() {
        anyhow::bail!("{}: no measured rows", f.display());
    }
    for (i, row) in rows.iter().enumerate() {
        crate::calibrate::spec_from_row(row).map_err(|e| crate::Error::Csv {
            path: f.to_path_buf(),
            reason: format!("row {}: {e}", i + 2),
        })?;
    }
    Ok(rows)
}

/// Says which fitted terms no fitted row exercises: they keep their counted coefficient.
fn note_unexercised(train: &[&Point], c: &Coefficients) {
    let fixed = crate::calibrate::fixed_coefficients(c.profile);
    for i in crate::calibrate::unexercised(train) {
        let term = Term::ALL[i];
        if !fixed.iter().any(|(j, _)| *j == i) && term != Term::Constant {
            eprintln!(
                "note: no fitted row exercises the term {}: it keeps its counted coefficient {} (not fitted)",
                term.name(),
                c.values[i]
            );
        }
    }
}

/// The calibration table: one row per term, with the fit's provenance.
fn table(a: &CalibrateArgs, f: &Fitted) -> Vec<CalibrationRow> {
    let files = a
        .measured
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(";");
    let mut rows: Vec<CalibrationRow> = Term::ALL
        .iter()
        .zip(f.values)
        .map(|(term, v)| CalibrationRow {
            profile: f.profile.name().into(),
            device: f.device.clone(),
            term: term.name().into(),
            coefficient: v,
            unit: term.coefficient_unit().into(),
            points_used: f.fitted,
            fit_median_abs_error: median(f.fit_errors.iter().map(|e| e.abs()).collect()),
            heldout_max_abs_error: (!f.held_errors.is_empty()).then(|| abs_max(&f.held_errors)),
            source_files: files.clone(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            command: super::command_line(),
        })
        .collect();
    if let Some(r) = &f.reserved {
        for (name, v) in RESERVED_TERMS
            .iter()
            .zip([r.values.transient, r.values.kept])
        {
            rows.push(CalibrationRow {
                profile: f.profile.name().into(),
                device: f.device.clone(),
                term: (*name).into(),
                coefficient: v,
                unit: RESERVED_UNIT.into(),
                points_used: r.fitted,
                fit_median_abs_error: median(r.fit_errors.iter().map(|e| e.abs()).collect()),
                heldout_max_abs_error: (!r.held_errors.is_empty()).then(|| abs_max(&r.held_errors)),
                source_files: files.clone(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
                command: super::command_line(),
            });
        }
    }
    rows
}
