//! `vramcal max`'s answer: the largest size that fits the budget by measurement, the first
//! that does not, and the estimator's answer beside it.

use crate::report::Row;
use crate::size::human;
use crate::spec::Axis;

/// A `vramcal max` search.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    /// The size searched.
    pub axis: Axis,
    /// The other size, fixed: the sequence length when searching the micro-batch, else the
    /// micro-batch.
    pub fixed: usize,
    /// The largest size tried.
    pub limit: usize,
    /// The memory budget (bytes).
    pub budget: u64,
}

impl Search {
    /// `(micro-batch, seq)` of the point at size `x`.
    pub fn point(&self, x: usize) -> (usize, usize) {
        match self.axis {
            Axis::Seq => (self.fixed, x),
            Axis::Batch => (x, self.fixed),
        }
    }
}

/// What the probes found: the largest size that fit and the smallest that did not, with their
/// rows.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The largest size measured to fit.
    pub best: Option<(usize, Row)>,
    /// The smallest size measured not to fit.
    pub fail: Option<(usize, Row)>,
}

/// The answer (sizes in bytes and MiB/GiB) and the estimator's: `estimated` is its largest size
/// that fits (`None`: not even 1) and the coefficients' source.
pub fn text(q: &Search, found: &Found, estimated: &(Option<usize>, String)) -> String {
    let axis_name = q.axis.noun();
    let fixed = match q.axis {
        Axis::Seq => format!("micro-batch {}", q.fixed),
        Axis::Batch => format!("seq {}", q.fixed),
    };
    let budget = human(q.budget);
    let mut t = match (&found.best, &found.fail) {
        (None, Some((_, f))) => format!(
            "even {axis_name} 1 does not fit in {budget} at {fixed} ({})\n",
            f.message
        ),
        (Some((x, r)), None) => format!(
            "{axis_name} {x} fits in {budget} at {fixed} (peak {} bytes); it is the --limit, larger was not tried\n",
            r.peak_bytes.unwrap_or(0)
        ),
        (Some((x, r)), Some((y, f))) => format!(
            "largest {axis_name} that fits in {budget} at {fixed}: {x} (peak {} bytes = {}); {y} does not ({})\n",
            r.peak_bytes.unwrap_or(0),
            human(r.peak_bytes.unwrap_or(0)),
            f.message
        ),
        (None, None) => String::from("no size was probed\n"),
    };
    t += &match estimated {
        (None, _) => "estimate: even 1 does not fit\n".to_string(),
        (Some(lo), source) => format!("estimate ({source}): {axis_name} {lo}\n"),
    };
    t
}
