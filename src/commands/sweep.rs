//! `vramcal sweep`: a batch × seq grid, each point measured by a child process of this binary
//! (a fresh allocator per point; a crash kills only that point), one CSV row per point. Parse
//! (the grid, every point checked before any runs) → compute (the points, one child each, rows
//! appended as they finish) → render ([`crate::export::sweep`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{ModelArgs, SweepArgs};
use crate::commands::setup::child::run_point;
use crate::error::Error;
use crate::export::sweep::{Line, Outcome};
use crate::measure::Measurement;
use crate::report::{append_row, Row, RowContext, Status};
use crate::spec::{Checkpointing, Method, TrainSpec};

/// Parses a comma-separated grid axis: positive integers, no duplicates, not empty.
///
/// # Errors
/// [`Error::InvalidValue`] naming the axis and the bad entry.
pub fn parse_axis(name: &str, items: &[String]) -> Result<Vec<usize>, Error> {
    let mut out: Vec<usize> = Vec::new();
    for t in parse_names(name, items)? {
        let v: usize = t
            .parse()
            .map_err(|_| Error::invalid(name, &t, "expected a positive integer"))?;
        if v == 0 {
            return Err(Error::invalid(name, &t, "must be at least 1"));
        }
        if out.contains(&v) {
            return Err(Error::invalid(name, &t, "listed twice"));
        }
        out.push(v);
    }
    Ok(out)
}

/// Parses a comma-separated list of names: not empty, no duplicates.
///
/// # Errors
/// [`Error::InvalidValue`].
pub fn parse_names(name: &str, items: &[String]) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = Vec::new();
    for it in items {
        let t = it.trim();
        if t.is_empty() {
            return Err(Error::invalid(
                name,
                items.join(","),
                "the list is empty or has an empty entry",
            ));
        }
        if out.iter().any(|o| o == t) {
            return Err(Error::invalid(name, t, "listed twice"));
        }
        out.push(t.to_string());
    }
    if out.is_empty() {
        return Err(Error::invalid(name, "", "the list is empty"));
    }
    Ok(out)
}

/// The arguments of one point: LoRA settings apply to the LoRA methods only.
fn point_args(args: &ModelArgs, method: Option<Method>) -> ModelArgs {
    let mut a = args.clone();
    if method == Some(Method::Full) {
        a.lora = None;
    }
    a
}

/// Runs `vramcal sweep`. Exit code 0 when every point succeeded, 2 when some failed (their
/// rows are recorded with `status` and `message`).
///
/// # Errors
/// Bad grid or model arguments (before anything runs), or an unwritable output file.
pub fn run(a: &SweepArgs) -> anyhow::Result<ExitCode> {
    let slots = slots(a)?;
    let (mut grid, model_name) = plan(a)?;
    super::setup::check_save_dir(&a.model)?;
    let dev = if a.devices.is_empty() {
        a.model.device.replace(':', "")
    } else {
        "cuda".to_string()
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{model_name}-{dev}.csv")));
    crate::report::csv_out::check_writable(&out)?;
    let _lock = crate::report::csv_out::lock(&out)?;
    if let Some(s) = a.shard {
        grid = s.select(grid);
    }
    if a.resume {
        skip_done(&mut grid, &out)?;
    }
    let outcome = measure_all(&grid, &out, &slots)?;
    eprint!("{}", crate::export::sweep::summary(&outcome, &out));
    Ok(if outcome.failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// One of `count` deterministic parts of a grid (`--shard I/N`), `index` from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridShard {
    /// Which part, 1 ≤ `index` ≤ `count`.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

impl std::str::FromStr for GridShard {
    type Err = Error;

    /// `I/N` with 1 ≤ I ≤ N.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for anything else (`3/2`, `0/0`, `1`).
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::invalid(
                "--shard",
                s,
                "expected I/N with 1 <= I <= N, e.g. 2/4 (a part of the grid; one data-parallel rank is `vramcal measure --shard zero2 --world-size N --rank R`)",
            )
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<usize>().map_err(|_| bad())?,
            n.trim().parse::<usize>().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(GridShard { index, count })
    }
}

impl GridShard {
    /// The points of this part: those at positions `index − 1`, `index − 1 + count`, … of the
    /// grid (round robin, so parts of a grid ordered by size get similar work).
    pub fn select<T>(self, grid: Vec<T>) -> Vec<T> {
        grid.into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index - 1)
            .map(|(_, p)| p)
            .collect()
    }
}

/// The devices points run on at once, one point per entry at a time: `--devices` (each
/// checked; `all` = every CUDA device), or `--jobs` copies of `--device cpu`, or `--device`.
///
/// # Errors
/// `--jobs 0`; `--jobs` above 1 off the CPU, with `--devices` or with `--timed-steps`; an
/// unknown, unusable or repeated device; `all` without CUDA devices.
fn slots(a: &SweepArgs) -> anyhow::Result<Vec<String>> {
    if a.jobs == 0 {
        return Err(Error::invalid("--jobs", 0, "must be at least 1").into());
    }
    if a.jobs > 1 && !a.devices.is_empty() {
        return Err(Error::invalid(
            "--jobs",
            a.jobs,
            "and --devices do not combine: --jobs runs CPU points, --devices one point per GPU",
        )
        .into());
    }
    if a.jobs > 1 {
        if !a.devices.is_empty() || a.model.device != "cpu" {
            return Err(Error::invalid(
                "--jobs",
                a.jobs,
                "is for the CPU; on GPUs give --devices (one point per device at a time)",
            )
            .into());
        }
        if a.model.timed_steps > 0 {
            return Err(Error::invalid(
                "--jobs",
                a.jobs,
                "measures memory only: times of points measured in parallel are not comparable, so --timed-steps is refused with it",
            )
            .into());
        }
        crate::measure::device::check_device("cpu")?;
        return Ok(vec!["cpu".to_string(); a.jobs]);
    }
    if a.devices.is_empty() {
        return Ok(vec![a.model.device.clone()]);
    }
    let devices = if a.devices == ["all"] {
        all_cuda_devices()?
    } else {
        a.devices.clone()
    };
    let mut seen = HashSet::new();
    for d in &devices {
        if d.trim().is_empty() {
            return Err(Error::invalid(
                "--devices",
                a.devices.join(","),
                "has an empty entry (e.g. cuda:0,cuda:1)",
            )
            .into());
        }
        let choice = crate::measure::device::check_device(d)?;
        if choice.is_cpu() {
            return Err(Error::invalid(
                "--devices",
                d,
                "lists GPUs; for several CPU points at once give --jobs N",
            )
            .into());
        }
        if !seen.insert(choice) {
            return Err(Error::invalid("--devices", d, "is listed twice").into());
        }
    }
    Ok(devices)
}

/// `cuda:0` … `cuda:N-1` for the devices the driver sees.
///
/// # Errors
/// No CUDA device, or a build without the `cuda` feature.
fn all_cuda_devices() -> anyhow::Result<Vec<String>> {
    #[cfg(feature = "cuda")]
    {
        let n = crate::measure::cuda::device_count().unwrap_or(0);
        if n > 0 {
            return Ok((0..n).map(|i| format!("cuda:{i}")).collect());
        }
    }
    Err(Error::invalid(
        "--devices",
        "all",
        "found no CUDA device (a build with --features cuda on a machine whose driver sees GPUs)",
    )
    .into())
}

/// The grid's points, every one checked (spec, sizes, host memory) before any runs, and the
/// model's name.
///
/// # Errors
/// A malformed axis or list, bad model arguments, a point that cannot be valid.
pub(crate) fn plan(a: &SweepArgs) -> anyhow::Result<(Vec<Point>, String)> {
    let batches = parse_axis("--batch", &a.batch)?;
    let seqs = parse_axis("--seq", &a.seq)?;
    let methods: Vec<Option<Method>> = if a.method.is_empty() {
        vec![None]
    } else {
        parse_names("--method", &a.method)?
            .iter()
            .map(|m| m.parse().map(Some))
            .collect::<Result<_, _>>()?
    };
    let ckpts: Vec<Checkpointing> = parse_names("--checkpointing", &a.checkpointing)?
        .iter()
        .map(|c| c.parse())
        .collect::<Result<_, _>>()?;
    let (model, weights) = super::setup::resolve(&a.model)?;
    let device = crate::measure::device::check_device(&a.model.device)?;
    let command = super::command_line();
    let mut grid = Vec::new();
    for (m, c) in methods
        .iter()
        .flat_map(|m| ckpts.iter().map(move |c| (*m, *c)))
    {
        for (b, s) in batches
            .iter()
            .flat_map(|b| seqs.iter().map(move |s| (*b, *s)))
        {
            let args = point_args(&a.model, m);
            let spec = super::setup::train_spec(&args, b, s, m, c)?;
            spec.validate(&model.config)?;
            super::setup::check_fits(&spec, &model, device)?;
            let ctx = super::setup::row_context(&args, &model, &weights, &spec, command.clone());
            grid.push(Point {
                method: m,
                ckpt: c,
                batch: b,
                seq: s,
                args,
                spec,
                ctx,
            });
        }
    }
    refuse_repeats(&grid)?;
    if a.model.lora.is_some()
        && !methods
            .iter()
            .any(|m| matches!(m, Some(Method::Lora | Method::Qlora) | None))
    {
        return Err(Error::invalid(
            "--lora",
            a.model.lora.clone().unwrap_or_default(),
            "needs a lora or qlora method in --method",
        )
        .into());
    }
    Ok((grid, model.name))
}

/// Refuses a grid in which two points are one configuration (`every:1` is `layers`; `lora`
/// with `--quant nf4` is `qlora`): it would measure it twice.
fn refuse_repeats(grid: &[Point]) -> anyhow::Result<()> {
    let key = |p: &Point| {
        config_key(&Row::new(
            &p.ctx,
            &p.spec,
            &Measurement::default(),
            Status::Ok,
            "",
        ))
    };
    let label = |p: &Point| {
        format!(
            "{} ckpt {}",
            p.method.map_or("default method".into(), |m| m.to_string()),
            p.ckpt
        )
    };
    for (i, p) in grid.iter().enumerate() {
        if let Some(q) = grid[..i].iter().find(|q| key(q) == key(p)) {
            return Err(Error::invalid(
                "sweep grid",
                format!("{} and {}", label(q), label(p)),
                "are the same configuration (every:1 is layers, on is layers, lora with --quant nf4 is qlora): list it once",
            )
            .into());
        }
    }
    Ok(())
}

/// Drops the points whose configuration `out` already has a row for (`--resume`).
fn skip_done(grid: &mut Vec<Point>, out: &std::path::Path) -> anyhow::Result<()> {
    let total = grid.len();
    let rows = crate::report::csv_out::read_rows_for_resume(out)?;
    // A row whose simulated rank no run could make (a rank not below its world size, a world
    // size without a shard) means the file was edited or damaged: refused, not resumed.
    for (i, r) in rows.iter().enumerate() {
        crate::calibrate::sharding_from_row(r).map_err(|e| {
            Error::invalid(
                "--resume",
                format!("{} row {}", out.display(), i + 2),
                e.to_string(),
            )
        })?;
    }
    let done: HashSet<String> = rows.iter().map(resume_key).collect();
    grid.retain(|p| {
        !done.contains(&resume_key(&Row::new(
            &p.ctx,
            &p.spec,
            &Measurement::default(),
            Status::Ok,
            "",
        )))
    });
    eprintln!(
        "resuming: {} of {total} point(s) already in {}",
        total - grid.len(),
        out.display()
    );
    Ok(())
}

/// Measures the points, each in a child, `slots.len()` at a time (point `i` goes to the next
/// free slot, its child measuring on that slot's device), appending each row to `out` as it
/// finishes (this thread the only writer) and printing one line per point.
fn measure_all(grid: &[Point], out: &std::path::Path, slots: &[String]) -> anyhow::Result<Outcome> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let exe = std::env::current_exe().context("locating the vramcal binary")?;
    let bar = ProgressBar::new(grid.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let label = |p: &Point| {
        format!(
            "{} ckpt {} batch {} seq {}",
            p.method.unwrap_or(Method::Full),
            p.ckpt,
            p.batch,
            p.seq
        )
    };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let cpu_jobs = slots.len() > 1 && slots.iter().all(|d| d == "cpu");
    let last_peak = std::sync::Mutex::new(String::from("-"));
    let mut outcome = Outcome::default();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, anyhow::Result<Row>)>();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        for device in slots {
            let tx = tx.clone();
            let (exe, next, stop, bar, last_peak) = (&exe, &next, &stop, &bar, &last_peak);
            scope.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = grid.get(i) else { return };
                let name = label(p);
                let mut ctx = p.ctx.clone();
                ctx.device = device.clone();
                let args = child_args(p, i, &p.ctx.command, device);
                let row = run_point(exe, &args, &ctx, &p.spec, |phase| {
                    let last = last_peak.lock().map(|l| l.clone()).unwrap_or_default();
                    bar.set_message(format!("{name}: {phase} (last peak {last} GiB)"));
                })
                .map(|r| {
                    let mut row = r.row;
                    if cpu_jobs {
                        // Points measured in parallel on the CPU share its cores: their times
                        // are not comparable, so the row keeps none.
                        row.step1_seconds = None;
                        row.step2_seconds = None;
                        row.step_seconds_median = None;
                        row.tokens_per_second = None;
                        row.point_seconds = None;
                    }
                    row
                });
                if tx.send((i, row)).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        for (done, (i, row)) in rx.into_iter().enumerate() {
            let row = match row {
                Ok(r) => r,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let p = &grid[i];
            if let Err(e) = append_row(out, &row) {
                stop.store(true, Ordering::Relaxed);
                return Err(e.into());
            }
            let line = Line::new(&row, p.batch, p.seq);
            let text = line.progress(done + 1, grid.len(), &label(p));
            // (A hidden bar, when stderr is not a terminal, would swallow println.)
            if bar.is_hidden() {
                eprintln!("{text}");
            } else {
                bar.println(text);
            }
            bar.inc(1);
            if let Ok(mut l) = last_peak.lock() {
                *l = line.peak_gib.clone();
            }
            outcome.push(line);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(outcome)
}

/// One planned point.
pub(crate) struct Point {
    method: Option<Method>,
    ckpt: Checkpointing,
    batch: usize,
    seq: usize,
    args: ModelArgs,
    pub(crate) spec: TrainSpec,
    pub(crate) ctx: RowContext,
}

/// The `measure` arguments of one point.
fn child_args(p: &Point, i: usize, command: &str, device: &str) -> Vec<OsString> {
    let mut v = setup_args(&p.args, device);
    let mut push = |items: &[&str]| v.extend(items.iter().map(OsString::from));
    push(&["--checkpointing", &p.ckpt.label()]);
    push(&["--batch", &p.batch.to_string(), "--seq", &p.seq.to_string()]);
    push(&["--record-command", command]);
    if let Some(method) = p.method {
        push(&["--method", method.label()]);
    }
    if let Some(d) = &p.args.save_dir {
        v.push("--save-dir".into());
        v.push(d.join(format!("point-{}", i + 1)).into_os_string());
    }
    v
}

/// `measure` and the options of `m` every point shares, on `device`.
fn setup_args(m: &ModelArgs, device: &str) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| v.extend(items.iter().map(OsString::from));
    push(&["measure", "--weights", &m.weights]);
    match m.precision {
        // --precision sets both dtypes and excludes --dtype and --optimizer-state-dtype.
        Some(p) => push(&["--precision", p.name()]),
        None => {
            push(&["--dtype", m.dtype.as_str()]);
            push(&["--optimizer-state-dtype", m.optimizer_state_dtype.as_str()]);
        }
    }
    push(&["--optimizer", m.optimizer.name()]);
    if let Some(mu) = m.momentum {
        push(&["--momentum", &mu.to_string()]);
    }
    push(&["--lr", &m.lr.to_string()]);
    push(&["--weight-decay", &m.weight_decay.to_string()]);
    push(&["--device", device, "--seed", &m.seed.to_string()]);
    push(&["--data-seed", &m.data_seed.to_string()]);
    push(&["--accumulate", &m.accumulate.to_string()]);
    push(&["--save", m.save.label()]);
    if let Some(at) = m.attention {
        push(&["--attention", at.label()]);
    }
    push(&["--timed-steps", &m.timed_steps.to_string()]);
    if let Some(q) = m.quant {
        push(&["--quant", q.label()]);
    }
    if let Some(name) = &m.model {
        push(&["--model", name]);
    }
    if let Some(l) = &m.lora {
        push(&["--lora", &l.to_string()]);
    }
    if let Some(b) = m.budget {
        // With its unit: a plain number below 1 MiB is refused as a likely missing unit.
        push(&["--budget", &format!("{b}B")]);
    }
    for (on, flag) in [
        (m.double_quant, "--double-quant"),
        (m.merge_save, "--merge-save"),
        (m.allow_longer, "--allow-longer"),
    ] {
        if on {
            push(&[flag]);
        }
    }
    v
}

/// What `--resume` matches: [`config_key`] with the device's kind for the device. A row names
/// the GPU its probe found (`cuda:0 (NVIDIA H200)`), a planned point the device asked for
/// (`cuda`, `cuda:1`): a resumed sweep may be handed any GPU (Slurm, `--devices`).
pub(crate) fn resume_key(r: &Row) -> String {
    let mut r = r.clone();
    r.device = device_kind(&r.device).to_string();
    config_key(&r)
}

/// The device kind a row or a `--device` names: `cpu`, or `cuda` for any GPU
/// (`cuda:0 (NVIDIA H200)`, `cuda`, `cuda:1`).
pub(crate) fn device_kind(device: &str) -> &str {
    device.split([':', ' ']).next().unwrap_or(device)
}

/// The configuration columns of a row: two rows with the same key measured the same point.
pub fn config_key(r: &Row) -> String {
    let opt = |v: Option<String>| v.unwrap_or_default();
    [
        r.device.clone(),
        r.model.clone(),
        r.weights.clone(),
        r.dtype.clone(),
        // Rows written before vramcal had other optimizers say `adamw`.
        if r.optimizer == "adamw" {
            crate::spec::Optimizer::AdamwTorch.name().to_string()
        } else {
            r.optimizer.clone()
        },
        r.optimizer_state_dtype.clone(),
        r.precision.clone(),
        opt(r.momentum.map(|x| x.to_string())),
        r.method.clone(),
        opt(r.lora_r.map(|x| x.to_string())),
        opt(r.lora_alpha.map(|x| x.to_string())),
        opt(r.lora_dropout.map(|x| x.to_string())),
        r.lora_targets.clone(),
        r.modules_to_save.clone(),
        r.quant.clone(),
        r.checkpointing.clone(),
        // Empty in rows written before the column existed, by another model: never a match.
        r.attention.clone(),
        r.batch.to_string(),
        r.seq.to_string(),
        r.micro_batch.to_string(),
        r.accumulate.to_string(),
        r.save.clone(),
        opt(r.budget_bytes.map(|x| x.to_string())),
        // A simulated data-parallel rank is its own configuration.
        r.shard.clone(),
        opt(r.world_size.map(|x| x.to_string())),
        opt(r.rank.map(|x| x.to_string())),
    ]
    .join("|")
}

#[cfg(test)]
mod tests {
    use super::{config_key, resume_key};
    use crate::report::Row;

    /// A row of a GPU (named by its probe) is the planned point of `--device cuda` or
    /// `cuda:1` for `--resume`, not of the CPU; for `merge` (`config_key`) two GPUs differ.
    #[test]
    fn resume_matches_rows_by_the_kind_of_device() {
        let row = |device: &str| Row {
            device: device.into(),
            model: "m".into(),
            batch: 1,
            seq: 8,
            ..Row::default()
        };
        let h200 = row("cuda:0 (NVIDIA H200)");
        for planned in ["cuda", "cuda:0", "cuda:1"] {
            assert_eq!(resume_key(&h200), resume_key(&row(planned)), "{planned}");
        }
        assert_ne!(resume_key(&h200), resume_key(&row("cpu")));
        assert_ne!(config_key(&h200), config_key(&row("cuda:1 (NVIDIA A100)")));
    }
}
