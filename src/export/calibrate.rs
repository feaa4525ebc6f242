//! `vramcal calibrate`'s summary: the fitted coefficients and the errors of the fit, of
//! leave-one-out and of the held-out rows.

use std::path::PathBuf;

use crate::calibrate::compare::{abs_max, median};
use crate::calibrate::Holdout;
use crate::estimate::{Reserved, Term, N_TERMS};
use crate::spec::Profile;

/// A finished calibration (errors are signed fractions, `(predicted − measured) / measured`).
#[derive(Debug, Clone)]
pub struct Fitted {
    /// The profile fitted.
    pub profile: Profile,
    /// The devices of the rows, `+`-joined.
    pub device: String,
    /// The coefficients, in [`Term::ALL`] order.
    pub values: [f64; N_TERMS],
    /// Rows fitted.
    pub fitted: usize,
    /// Rows held out.
    pub held: usize,
    /// Errors of the fitted rows.
    pub fit_errors: Vec<f64>,
    /// Leave-one-out errors of the fitted rows.
    pub loo_errors: Vec<f64>,
    /// Errors of the held-out rows.
    pub held_errors: Vec<f64>,
    /// The hold-out rule.
    pub holdout: Holdout,
    /// The caching allocator's reserve, fitted where rows record reserved peaks.
    pub reserved: Option<ReservedFit>,
    /// Where the table was written.
    pub out: PathBuf,
}

/// The fit of the caching allocator's reserve ([`Reserved`]); errors are of the reserved peak.
#[derive(Debug, Clone)]
pub struct ReservedFit {
    /// The fitted fractions.
    pub values: Reserved,
    /// Fitted rows that record a reserved peak.
    pub fitted: usize,
    /// Errors of the fitted rows' reserved peaks.
    pub fit_errors: Vec<f64>,
    /// Errors of the held-out rows' reserved peaks.
    pub held_errors: Vec<f64>,
}

/// The summary `vramcal calibrate` prints (errors in %).
pub fn text(f: &Fitted) -> String {
    let mut t = format!(
        "calibration of profile {} on {}: {} rows fitted, {} held out\n",
        f.profile.name(),
        f.device,
        f.fitted,
        f.held
    );
    for (term, v) in Term::ALL.iter().zip(f.values) {
        t += &format!("  {:<20} {v:.6}\n", term.name());
    }
    let pct = |x: f64| format!("{:.2} %", 100.0 * x);
    let med = |v: &[f64]| pct(median(v.iter().map(|e| e.abs()).collect()));
    t += &format!(
        "fit rows: median |error| {}, max {}\n",
        med(&f.fit_errors),
        pct(abs_max(&f.fit_errors))
    );
    if f.loo_errors.is_empty() {
        t += &format!("leave-one-out: n/a (each fit needs {} rows)\n", N_TERMS);
    } else {
        t += &format!(
            "leave-one-out: median |error| {}, max {}\n",
            med(&f.loo_errors),
            pct(abs_max(&f.loo_errors))
        );
    }
    if f.held > 0 {
        t += &format!(
            "held-out rows ({}): median |error| {}, max {}, under-estimates {}\n",
            f.holdout,
            med(&f.held_errors),
            pct(abs_max(&f.held_errors)),
            f.held_errors.iter().filter(|e| **e < 0.0).count()
        );
    }
    if let Some(r) = &f.reserved {
        t += &format!(
            "reserved (CUDA caching allocator) = allocated + {:.4} × transient + {:.4} × kept activations, fitted on {} rows' peak_reserved_bytes\n",
            r.values.transient, r.values.kept, r.fitted
        );
        t += &format!(
            "reserved, fit rows: median |error| {}, max {}\n",
            med(&r.fit_errors),
            pct(abs_max(&r.fit_errors))
        );
        if !r.held_errors.is_empty() {
            t += &format!(
                "reserved, held-out rows ({}): median |error| {}, max {}, under-estimates {}\n",
                r.held_errors.len(),
                med(&r.held_errors),
                pct(abs_max(&r.held_errors)),
                r.held_errors.iter().filter(|e| **e < 0.0).count()
            );
        }
    }
    t += &format!("wrote {}\n", f.out.display());
    t
}
