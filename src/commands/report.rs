//! `vramcal report`: plots of measured vs estimated peaks against sequence length (one chart
//! per model, method and checkpointing, one series per micro-batch) and a stacked bar of the
//! estimate's components for each chart's largest point, with an index.md. Parse (the measured
//! rows, the output folder) → compute and render, chart by chart ([`crate::report::plots`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use crate::calibrate::{sharding_from_row, spec_from_row, training_peak};
use crate::cli::ReportArgs;
use crate::estimate::{estimate_sharded, Coefficients};
use crate::report::csv_out::read_rows;
use crate::report::plots::{line_chart, stacked_bar, Series};
use crate::report::{Row, Status};

/// What one chart holds fixed: every configuration column but the micro-batch (one series each)
/// and the sequence length (the x axis).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Chart {
    model: String,
    method: String,
    ckpt: String,
    attention: String,
    dtype: String,
    /// Everything else that sets the configuration apart (LoRA settings, quantization, state
    /// dtype, accumulation, save, weights, device, budget), in file-name form; empty when it
    /// is the plain case.
    rest: String,
}

impl Chart {
    /// The chart of row `r`.
    fn of(r: &Row) -> Self {
        let mut rest = Vec::new();
        if let (Some(rank), Some(alpha)) = (r.lora_r, r.lora_alpha) {
            rest.push(format!(
                "r{rank}-a{alpha}-{}",
                r.lora_targets.replace(';', "+")
            ));
            if let Some(d) = r.lora_dropout.filter(|d| *d > 0.0) {
                rest.push(format!("dropout{d}"));
            }
        }
        if r.quant != "none" {
            rest.push(r.quant.clone());
        }
        if r.optimizer_state_dtype != r.dtype {
            rest.push(format!("states-{}", r.optimizer_state_dtype));
        }
        if r.accumulate > 1 {
            rest.push(format!("acc{}", r.accumulate));
        }
        if r.save != "none" {
            rest.push(format!("save-{}", r.save));
        }
        if !r.shard.is_empty() {
            rest.push(format!(
                "{}-rank{}of{}",
                r.shard,
                r.rank.unwrap_or(0),
                r.world_size.unwrap_or(0)
            ));
        }
        rest.push(r.weights.clone());
        rest.push(r.device.clone());
        if let Some(b) = r.budget_bytes {
            rest.push(format!("budget{b}"));
        }
        Chart {
            model: r.model.clone(),
            method: r.method.clone(),
            ckpt: r.checkpointing.clone(),
            attention: r.attention.clone(),
            dtype: r.dtype.clone(),
            rest: rest.join("-"),
        }
    }
}

impl Chart {
    /// The chart's title: model, method, checkpointing, attention, dtype, then `extra`.
    fn title(&self, extra: &str) -> String {
        format!(
            "{}, {}, checkpointing {}, attention {}, {}{extra}",
            self.model, self.method, self.ckpt, self.attention, self.dtype
        )
    }

    /// The same as a file-name part.
    fn slug(&self, extra: &str) -> String {
        file_stem(&format!(
            "{}-{}-ckpt-{}-attn-{}-{}{}",
            self.model,
            self.method,
            self.ckpt,
            self.attention,
            self.dtype,
            suffix(extra)
        ))
    }
}

/// Rows grouped by chart.
type Groups<'a> = BTreeMap<Chart, Vec<&'a Row>>;

/// Runs `vramcal report`.
///
/// # Errors
/// Unreadable or empty measurements, a bad calibration, an unwritable output folder.
pub fn run(a: &ReportArgs) -> anyhow::Result<ExitCode> {
    let c = crate::calibrate::coefficients(a.calibration.as_deref(), a.profile)?;
    let rows = successful_rows(a)?;
    if a.out.exists() && !a.out.is_dir() {
        return Err(crate::Error::invalid(
            "--out",
            a.out.display(),
            "exists and is not a folder (report writes a folder of plots and index.md)",
        )
        .into());
    }
    std::fs::create_dir_all(&a.out).map_err(|e| crate::Error::io(&a.out, e))?;
    let mut groups: Groups = BTreeMap::new();
    for r in &rows {
        groups.entry(Chart::of(r)).or_default().push(r);
    }
    // Charts whose readable names coincide get the file name of their full configuration.
    let plain = |k: &Chart| Chart {
        rest: String::new(),
        ..k.clone()
    };
    let mut names: BTreeMap<Chart, usize> = BTreeMap::new();
    for k in groups.keys() {
        *names.entry(plain(k)).or_default() += 1;
    }
    let mut index = format!(
        "# vramcal report\n\nMade by `{}` (vramcal {}, {}), profile {} with coefficients from {}.\n\n",
        super::command_line(),
        env!("CARGO_PKG_VERSION"),
        chrono::Utc::now().format("%Y-%m-%d"),
        a.profile.name(),
        c.source
    );
    let mut errors = Vec::new();
    for (key, g) in &groups {
        let extra = if names[&plain(key)] > 1 {
            format!(" ({})", key.rest)
        } else {
            String::new()
        };
        index += &peak_chart(&a.out, key, &extra, g, &c, &mut errors)?;
        index += &components_chart(&a.out, key, &extra, g, &c)?;
    }
    index += &error_line(&errors);
    let idx = a.out.join("index.md");
    std::fs::write(&idx, index).map_err(|e| crate::Error::io(&idx, e))?;
    crate::export::emit(&format!(
        "wrote {} charts and {}\n",
        2 * groups.len(),
        idx.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// The successful rows of the measured files (vramcal's own; reference rows are refused).
fn successful_rows(a: &ReportArgs) -> anyhow::Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    for f in &a.measured {
        if crate::calibrate::reference::is_reference_file(f)? {
            anyhow::bail!(
                "{}: a published-measurements file: report plots vramcal's own measurements; use it with `vramcal check`",
                f.display()
            );
        }
        let mut r = Vec::new();
        for (i, row) in read_rows(f)?.into_iter().enumerate() {
            if row.status != Some(Status::Ok) {
                continue;
            }
            // A row outside the vocabulary is refused here, before the output folder exists.
            spec_from_row(&row).map_err(|e| crate::Error::Csv {
                path: f.clone(),
                reason: format!("row {}: {e}", i + 2),
            })?;
            r.push(row);
        }
        if r.is_empty() {
            anyhow::bail!("{}: no successful measured rows", f.display());
        }
        rows.extend(r);
    }
    Ok(rows)
}

/// Draws one group's measured and estimated peaks against sequence length (one series pair per
/// micro-batch), pushes each point's relative error to `errors`, and returns its index.md part.
fn peak_chart(
    out: &Path,
    key: &Chart,
    extra: &str,
    g: &[&Row],
    c: &Coefficients,
    errors: &mut Vec<f64>,
) -> anyhow::Result<String> {
    let mut by_batch: BTreeMap<usize, Vec<&Row>> = BTreeMap::new();
    for r in g {
        by_batch.entry(r.micro_batch).or_default().push(r);
    }
    let mut series = Vec::new();
    for (i, (b, rs)) in by_batch.iter_mut().enumerate() {
        rs.sort_by_key(|r| r.seq);
        rs.dedup_by_key(|r| r.seq);
        let mut measured = Vec::new();
        let mut est = Vec::new();
        for r in rs.iter() {
            let (cfg, spec) = spec_from_row(r)?;
            let e = estimate_sharded(&cfg, &spec, c.profile, c, sharding_from_row(r)?)?;
            let m = training_peak(r).unwrap_or(0);
            measured.push((r.seq as f64, m as f64));
            est.push((r.seq as f64, e.peak_bytes as f64));
            errors.push((e.peak_bytes as f64 - m as f64) / m as f64);
        }
        series.push(Series {
            label: format!("measured, micro-batch {b}"),
            points: measured,
            line: false,
            colour: i,
        });
        series.push(Series {
            label: format!("estimated, micro-batch {b}"),
            points: est,
            line: true,
            colour: i,
        });
    }
    let stem = format!("peak-{}", key.slug(extra));
    let title = key.title(extra);
    line_chart(
        &out.join(format!("{stem}.svg")),
        &title,
        "sequence length (tokens)",
        &series,
    )?;
    Ok(format!(
        "## {title}\n\nMeasured (crosses) and estimated (lines) peak against sequence length.\n\n![{stem}]({stem}.svg) ([PNG]({stem}.png))\n\n"
    ))
}

/// Draws the components of the estimate at the group's largest point; returns its index.md
/// part.
fn components_chart(
    out: &Path,
    key: &Chart,
    extra: &str,
    g: &[&Row],
    c: &Coefficients,
) -> anyhow::Result<String> {
    let Some(big) = g.iter().max_by_key(|r| (r.seq, r.micro_batch)) else {
        return Ok(String::new());
    };
    let (cfg, spec) = spec_from_row(big)?;
    let e = estimate_sharded(&cfg, &spec, c.profile, c, sharding_from_row(big)?)?;
    let parts: Vec<(String, u64)> = e.items.iter().map(|i| (i.name.clone(), i.bytes)).collect();
    let cstem = format!(
        "components-{}-b{}-s{}",
        key.slug(extra),
        big.micro_batch,
        big.seq
    );
    stacked_bar(
        &out.join(format!("{cstem}.svg")),
        &format!(
            "estimate for micro-batch {} x seq {} (measured {:.2} GiB)",
            big.micro_batch,
            big.seq,
            training_peak(big).unwrap_or(0) as f64 / (1u64 << 30) as f64
        ),
        &parts,
    )?;
    Ok(format!(
        "Components of the estimate at micro-batch {} × seq {}:\n\n![{cstem}]({cstem}.svg) ([PNG]({cstem}.png))\n\n",
        big.micro_batch, big.seq
    ))
}

/// The closing line of index.md: the median and largest |relative error| over the points.
fn error_line(errors: &[f64]) -> String {
    let mut abs: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
    abs.sort_by(f64::total_cmp);
    let med = if abs.is_empty() {
        f64::NAN
    } else {
        abs[abs.len() / 2]
    };
    format!(
        "Over {} measured points: median |error| {:.2} %, max {:.2} %.\n",
        abs.len(),
        100.0 * med,
        100.0 * abs.last().copied().unwrap_or(f64::NAN)
    )
}

/// ` (…)` of a chart's title as a file-name part: `-…`, or empty.
fn suffix(extra: &str) -> String {
    let t = extra.trim().trim_start_matches('(').trim_end_matches(')');
    if t.is_empty() {
        String::new()
    } else {
        format!("-{t}")
    }
}

/// `s` with the characters that do not belong in a file name replaced by `_`.
fn file_stem(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
