//! `vramcal check`'s table of compared rows and its summary line, as Markdown.

use crate::calibrate::compare::Compared;
use crate::spec::Profile;

/// The statistics of one `vramcal check` (errors are fractions: 0.01 is 1 %).
#[derive(Debug, Clone)]
pub struct Summary {
    /// The profile checked.
    pub profile: Profile,
    /// Where its coefficients come from.
    pub coefficients: String,
    /// Rows compared.
    pub rows: usize,
    /// Median |relative error|.
    pub median: f64,
    /// 90th percentile of |relative error|.
    pub p90: f64,
    /// Largest |relative error|.
    pub max: f64,
    /// Rows under-estimated even with `margin` added.
    pub under: usize,
    /// Safety margin added to estimates when counting under-estimates.
    pub margin: f64,
    /// `--max-error`.
    pub max_error: Option<f64>,
    /// `--max-median-error`.
    pub max_median_error: Option<f64>,
    /// Rows that ran out of memory (`counter` = `oom`; not in the error statistics).
    pub oom_rows: usize,
    /// Of those, the ones predicted to fit on their card (at or below its memory).
    pub oom_missed: usize,
}

/// The rows as a Markdown table, then the summary line (what `check` prints and `--out-md`
/// writes).
pub fn markdown(rows: &[Compared], s: &Summary) -> String {
    let mut md = String::from(
        "| row | configuration | counter | measured_bytes | predicted_bytes | error |\n|---|---|---|---:|---:|---:|\n",
    );
    for x in rows {
        if x.oom {
            md += &format!(
                "| {} | {} | oom (card {} B) | — | {} | {} |\n",
                x.id,
                x.config,
                x.measured_bytes,
                x.predicted_bytes,
                if x.predicted_bytes > x.measured_bytes {
                    "above the card: right"
                } else {
                    "fits the card: WRONG"
                }
            );
            continue;
        }
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
    format!("{md}\n{}", summary(s))
}

/// One line: the profile, the errors, the under-estimates and the thresholds in force.
pub fn summary(s: &Summary) -> String {
    let gates: Vec<String> = [
        s.max_error
            .map(|t| format!("max |error| <= {:.2} %", 100.0 * t)),
        s.max_median_error
            .map(|t| format!("median |error| <= {:.2} %", 100.0 * t)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let oom = if s.oom_rows > 0 {
        format!(
            " rows that ran out of memory: {} of {} predicted above their card;",
            s.oom_rows - s.oom_missed,
            s.oom_rows
        )
    } else {
        String::new()
    };
    if s.rows == 0 {
        return format!(
            "profile {} ({}): no row with a measured peak;{oom}\n",
            s.profile.name(),
            s.coefficients,
        );
    }
    format!(
        "profile {} ({}): {} rows; |error| median {:.2} %, p90 {:.2} %, max {:.2} %; under-estimates {} of {} with a {:.1} % margin;{} {}\n",
        s.profile.name(),
        s.coefficients,
        s.rows,
        100.0 * s.median,
        100.0 * s.p90,
        100.0 * s.max,
        s.under,
        s.rows,
        100.0 * s.margin,
        oom,
        if gates.is_empty() {
            "no thresholds given (--max-error, --max-median-error): exit 0 whatever the errors"
                .to_string()
        } else {
            format!("thresholds: {}", gates.join(", "))
        }
    )
}
