//! `vramcal slurm`: writes a Slurm job-array script that runs a sweep in `--tasks` parts, one
//! array task per part (`sweep --shard I/N --resume --out DIR/part-I.csv`), and says how to
//! submit it and join the parts (`vramcal merge`). No scheduler of vramcal's own: Slurm runs
//! the tasks, resubmits them (`sbatch --array=I` with the same script resumes task I's part)
//! and keeps their logs (`DIR/slurm-%A_%a.out`).
//!
//! Per task: one CPU core, or with `--device cuda` one GPU (`--gres=gpu:1`; the sweep runs on
//! the GPU Slurm gives the task); memory (`--mem`, host RAM) from the largest estimate among
//! the task's points (the `candle` profile, uncalibrated) plus a quarter and 512 MiB for the
//! process, at least 1 GiB; the wall time from `--time`, or with `--time-from` projected from
//! measured rows' `point_seconds` ([`project_point_seconds`]: vramcal does not predict a
//! point's time before one of its model is measured). Tasks run in the folder the script
//! was written from (`--chdir`), so the sweep's relative paths hold.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Parser;

use super::sweep::device_kind;
use crate::cli::{Cli, Command, SlurmArgs, SweepArgs};
use crate::error::Error;
use crate::measure::Measurement;
use crate::report::{Row, Status};

/// Whether `t` is one of the time formats `sbatch --time` reads (`man sbatch`): minutes,
/// minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
/// days-hours:minutes:seconds, or `UNLIMITED`/`INFINITE`.
fn slurm_time(t: &str) -> bool {
    if t == "UNLIMITED" || t == "INFINITE" {
        return true;
    }
    let num = |x: &str| !x.is_empty() && x.len() <= 6 && x.chars().all(|c| c.is_ascii_digit());
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    if !parts.iter().all(|p| num(p)) || days.is_some_and(|d| !num(d)) {
        return false;
    }
    parts.len() <= 3
}

/// The projected wall time of one planned sweep point (`vramcal slurm --time-from`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointTime {
    /// Projected wall seconds of the point's measuring process, start to exit.
    pub seconds: f64,
    /// Whether a measured row of the same configuration gave it; else a row of the same model
    /// scaled by FLOPs per step.
    pub same_configuration: bool,
}

/// A row's recipe: its configuration key on its kind of device
/// ([`super::sweep::resume_key`]) without its batch, sequence length, micro-batch and
/// accumulation.
fn recipe_key(r: &Row) -> String {
    let mut r = r.clone();
    (r.batch, r.seq, r.micro_batch, r.accumulate) = (0, 0, 0, 0);
    super::sweep::resume_key(&r)
}

/// Projects the wall time of the planned point `planned` (a row built before measuring: its
/// configuration columns and `model_flops_per_token`), run with `timed_steps` extra timed
/// steps, from `measured` rows of vramcal. No model of the machine's speed: only what the
/// rows measured.
/// - Basis: rows of the same model on the same kind of device (`cpu`, or any `cuda` GPU)
///   that record `point_seconds`, a step time and `model_flops_per_token`.
/// - A basis row's step time `s_b` is its `step_seconds_median` (else `step2_seconds`); its
///   fixed time `o_b = point_seconds − (2 + timed_steps_b)·s_b`, at least 0, holds what is not
///   a steady step: the process start, loading, optimizer initialization, the first step's
///   warm-up and the save.
/// - Basis rows of the point's configuration (every configuration column but the device):
///   the largest `o_b + (2 + timed_steps)·s_b`.
/// - Else the basis row nearest in work per step `w = model_flops_per_token × micro_batch ×
///   accumulate × seq` (nearest in `ln w`; among the rows of the point's recipe, every
///   configuration column but batch, sequence length, micro-batch and accumulation, where
///   there are some): its step scaled by `w_point / w_b` (the same achieved FLOP/s), plus the
///   largest fixed time among those rows.
///
/// `None` when no row is a basis.
pub fn project_point_seconds(
    planned: &Row,
    timed_steps: usize,
    measured: &[Row],
) -> Option<PointTime> {
    let work = |r: &Row| {
        r.model_flops_per_token
            .map(|f| f * (r.micro_batch * r.accumulate * r.seq) as f64)
            .filter(|w| w.is_finite() && *w > 0.0)
    };
    let w_point = work(planned)?;
    // (row, step seconds, fixed seconds, work per step)
    let basis: Vec<(&Row, f64, f64, f64)> = measured
        .iter()
        .filter(|r| {
            r.model == planned.model && device_kind(&r.device) == device_kind(&planned.device)
        })
        .filter_map(|r| {
            let point = r.point_seconds.filter(|t| t.is_finite() && *t > 0.0)?;
            let step = r
                .step_seconds_median
                .or(r.step2_seconds)
                .filter(|t| t.is_finite() && *t > 0.0)?;
            let fixed = (point - (2.0 + r.timed_steps as f64) * step).max(0.0);
            Some((r, step, fixed, work(r)?))
        })
        .collect();
    let steps = 2.0 + timed_steps as f64;
    let configuration = super::sweep::resume_key(planned);
    let same: Vec<f64> = basis
        .iter()
        .filter(|(r, ..)| super::sweep::resume_key(r) == configuration)
        .map(|(_, s, o, _)| o + steps * s)
        .collect();
    if !same.is_empty() {
        return Some(PointTime {
            seconds: same.iter().copied().fold(0.0, f64::max),
            same_configuration: true,
        });
    }
    let recipe_of_point = recipe_key(planned);
    let recipe: Vec<_> = basis
        .iter()
        .filter(|(r, ..)| recipe_key(r) == recipe_of_point)
        .collect();
    let pool: Vec<_> = if recipe.is_empty() {
        basis.iter().collect()
    } else {
        recipe
    };
    let nearest = pool.iter().min_by(|a, b| {
        let d = |w: f64| (w / w_point).ln().abs();
        d(a.3).total_cmp(&d(b.3))
    })?;
    let fixed = pool.iter().map(|(_, _, o, _)| *o).fold(0.0, f64::max);
    Some(PointTime {
        seconds: fixed + steps * nearest.1 * w_point / nearest.3,
        same_configuration: false,
    })
}

/// Seconds as Slurm's `--time` reads them, whole minutes rounded up: `H:MM:00`, or
/// `D-HH:MM:00` from a day.
fn slurm_duration(seconds: f64) -> String {
    let minutes = (seconds / 60.0).ceil().max(1.0) as u64;
    let (d, h, m) = (minutes / 1440, minutes / 60 % 24, minutes % 60);
    if d > 0 {
        format!("{d}-{h:02}:{m:02}:00")
    } else {
        format!("{h}:{m:02}:00")
    }
}

/// The time limit the script gives each task, and where it came from.
struct TaskTime {
    /// Slurm's `--time` value.
    limit: String,
    /// How `--time-from` projected it (a line for the script and the terminal); `None` for
    /// `--time`.
    basis: Option<String>,
}

/// The limit from `--time-from`: each task's points (`shards`, indices into `grid`) projected ([`project_point_seconds`]) and
/// summed; the longest task's sum twice over plus 5 minutes (a margin for slower nodes, a
/// cold file cache and the rows' spread: a task cut by its limit is resubmitted and resumes,
/// losing only its unfinished point).
///
/// # Errors
/// A file that cannot be read as vramcal rows; a point whose model has no row recording
/// `point_seconds` on the sweep's kind of device.
fn task_time(
    a: &SlurmArgs,
    sweep: &SweepArgs,
    grid: &[super::sweep::Point],
    shards: &[Vec<usize>],
) -> anyhow::Result<TaskTime> {
    let mut measured = Vec::new();
    let mut seen = Vec::new();
    let mut names = Vec::new();
    for f in &a.time_from {
        let name = f.display().to_string();
        // The names go into a comment line of the script: a line break would end it there.
        if f.to_str().is_none() || name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "--time-from",
                name.escape_debug(),
                "contains a line break or another control character, or is not UTF-8",
            )
            .into());
        }
        let real = std::fs::canonicalize(f).map_err(|e| Error::io(f, e))?;
        if seen.contains(&real) {
            continue;
        }
        seen.push(real);
        let bytes = crate::input::read_capped(f)?;
        if !bytes.is_empty() && !crate::report::csv_out::last_record(&bytes).1 {
            return Err(Error::invalid(
                "--time-from",
                &name,
                "its last row is cut short or has another number of fields than the header (a sweep still writing it, or killed?): let the sweep finish or resume it (--resume repairs a cut row)",
            )
            .into());
        }
        measured.extend(crate::report::csv_out::read_rows(f)?);
        names.push(name);
    }
    let files = names.join(", ");
    let mut projected = Vec::with_capacity(grid.len());
    for p in grid {
        let mut ctx = p.ctx.clone();
        ctx.device = sweep.model.device.clone();
        let planned = Row::new(&ctx, &p.spec, &Measurement::default(), Status::Ok, "");
        let Some(t) = project_point_seconds(&planned, sweep.model.timed_steps, &measured) else {
            return Err(Error::invalid(
                "--time-from",
                &files,
                format!(
                    "has no row of {} on {} that records point_seconds, a step time and model FLOPs per token (rows of vramcal before 2026-12-02 lack point_seconds; rows of sweep --jobs keep no times): measure a point of it with vramcal sweep, or give --time",
                    planned.model,
                    device_kind(&planned.device)
                ),
            )
            .into());
        };
        projected.push(t);
    }
    let longest = shards
        .iter()
        .map(|points| points.iter().map(|&j| projected[j].seconds).sum::<f64>())
        .fold(0.0, f64::max);
    let same = projected.iter().filter(|t| t.same_configuration).count();
    let limit_seconds = 2.0 * longest + 300.0;
    // `sbatch --time` reads at most 999999 days in vramcal's check of it (`slurm_time`).
    if !(limit_seconds.is_finite() && limit_seconds <= 999_999.0 * 86_400.0) {
        return Err(Error::invalid(
            "--time-from",
            &files,
            format!(
                "projects {longest:e} s for the longest task, beyond what Slurm's --time takes: check the rows' point_seconds and step times, or give --time"
            ),
        )
        .into());
    }
    let limit = slurm_duration(limit_seconds);
    let scaled = if same == grid.len() {
        String::new()
    } else {
        ", the others scaled by FLOPs per step".to_string()
    };
    Ok(TaskTime {
        basis: Some(format!(
            "{limit}: the longest task's projected {longest:.1} s, twice over plus 5 min ({same} of {} point(s) measured in the same configuration{scaled}; from {files})",
            grid.len()
        )),
        limit,
    })
}

/// Refuses a path the script cannot hold: not UTF-8 (it would be written as another name), a
/// control character (a line break ends a script line), a double quote (it ends the quoted
/// `#SBATCH` paths) or a backslash (sbatch reads it as an escape inside them, and in
/// `--output` it turns off the `%A`/`%a` patterns). `what` names it in the error.
///
/// # Errors
/// [`Error::InvalidValue`] naming `what` and the path.
fn script_path(what: &str, p: &std::path::Path) -> Result<(), Error> {
    let Some(t) = p.to_str() else {
        return Err(Error::invalid(
            what,
            p.to_string_lossy().escape_debug(),
            "is not UTF-8: the script could not name it",
        ));
    };
    if t.chars().any(char::is_control) {
        return Err(Error::invalid(
            what,
            t.escape_debug(),
            "contains a line break or another control character",
        ));
    }
    if t.contains('"') || t.contains('\\') {
        return Err(Error::invalid(
            what,
            t,
            "a path with a double quote or a backslash cannot be written into #SBATCH lines",
        ));
    }
    Ok(())
}

/// Runs `vramcal slurm`.
///
/// # Errors
/// `--tasks 0`; sweep arguments that `vramcal sweep` would refuse, or that set `--out`,
/// `--resume`, `--shard`, `--devices` or `--jobs` (each task sets its own); a `--time` or
/// `--partition` Slurm would not read; an unwritable `--dir`.
pub fn run(a: &SlurmArgs) -> anyhow::Result<ExitCode> {
    if a.tasks == 0 {
        return Err(Error::invalid("--tasks", 0, "must be at least 1").into());
    }
    if !slurm_time(&a.time) {
        return Err(Error::invalid(
            "--time",
            &a.time,
            "expected one of Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED",
        )
        .into());
    }
    if let Some(p) = &a.partition {
        let name = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        };
        if !p.split(',').all(name) {
            return Err(Error::invalid(
                "--partition",
                p,
                "expected a partition name, or several separated by commas",
            )
            .into());
        }
    }
    for (flag, own) in [
        ("--out", "each task writes DIR/part-I.csv"),
        ("--resume", "each task resumes its part"),
        ("--shard", "each task measures its part"),
        ("--devices", "each task runs on the device Slurm gives it"),
        ("--jobs", "each task measures one point at a time"),
    ] {
        if a.sweep
            .iter()
            .any(|x| x == flag || x.starts_with(&format!("{flag}=")))
        {
            return Err(Error::invalid(
                "vramcal slurm -- ...",
                flag,
                format!("is set by the script ({own})"),
            )
            .into());
        }
    }
    // Line breaks would end the script's lines where its arguments are written; quotes would
    // end the quoted #SBATCH paths.
    for x in &a.sweep {
        if x.chars().any(char::is_control) {
            return Err(Error::invalid(
                "vramcal slurm -- ...",
                x.escape_debug(),
                "contains a line break or another control character",
            )
            .into());
        }
    }
    // The folder and the current one go into #SBATCH lines, quoted, and the script: checked
    // before the folder is made, so a refusal leaves nothing behind.
    let cwd = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    script_path("--dir", &a.dir)?;
    script_path("the current folder", &cwd)?;
    // The sweep as `vramcal sweep` reads it: refused here if it would be refused there.
    let argv = ["vramcal", "sweep"]
        .into_iter()
        .map(String::from)
        .chain(a.sweep.iter().cloned());
    let sweep: SweepArgs = match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Sweep(s),
        }) => s,
        Ok(_) => unreachable!("parsed as sweep"),
        Err(e) => {
            let text = e.to_string();
            let reason: Vec<&str> = text
                .lines()
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
                .collect();
            return Err(Error::invalid(
                "vramcal slurm -- ...",
                a.sweep.join(" "),
                reason.join(" "),
            )
            .into());
        }
    };
    let (grid, _) = super::sweep::plan(&sweep)?;
    let (model, _) = super::setup::resolve(&sweep.model)?;
    if a.tasks > grid.len() {
        return Err(Error::invalid(
            "--tasks",
            a.tasks,
            format!("more tasks than the grid's {} point(s)", grid.len()),
        )
        .into());
    }
    // The grid's point indices each task measures (`sweep --shard I/N`).
    let shards: Vec<Vec<usize>> = (1..=a.tasks)
        .map(|i| {
            super::sweep::GridShard {
                index: i,
                count: a.tasks,
            }
            .select((0..grid.len()).collect())
        })
        .collect();
    let parts: Vec<usize> = shards.iter().map(Vec::len).collect();
    if parts.contains(&0) {
        return Err(Error::invalid(
            "--tasks",
            a.tasks,
            format!("more tasks than the grid's {} point(s)", grid.len()),
        )
        .into());
    }
    let c = crate::estimate::Coefficients::uncalibrated(crate::spec::Profile::Candle);
    let mut largest = 0u64;
    for p in &grid {
        let e =
            crate::estimate::estimate(&model.config, &p.spec, crate::spec::Profile::Candle, &c)?;
        largest = largest.max(e.needed_bytes());
    }
    let time = if a.time_from.is_empty() {
        TaskTime {
            limit: a.time.clone(),
            basis: None,
        }
    } else {
        task_time(a, &sweep, &grid, &shards)?
    };
    let mem_mib = ((largest + largest / 4) >> 20)
        .saturating_add(512)
        .max(1024);
    let gpu = sweep.model.device.starts_with("cuda");
    // The binary the tasks run, written (shell-quoted) into the script's last line.
    let exe = std::env::current_exe().map_err(|e| Error::io("vramcal", e))?;
    if exe.to_str().is_none_or(|t| t.chars().any(char::is_control)) {
        return Err(Error::invalid(
            "the vramcal binary's path",
            exe.to_string_lossy().escape_debug(),
            "is not UTF-8 or holds a control character: the script could not name it (run a copy from another folder)",
        )
        .into());
    }
    let existed = a.dir.exists();
    std::fs::create_dir_all(&a.dir).map_err(|e| Error::io(&a.dir, e))?;
    let dir = std::fs::canonicalize(&a.dir).map_err(|e| Error::io(&a.dir, e))?;
    // The folder as resolved (through a link, say) holds what its name did not.
    if let Err(e) = script_path("--dir", &dir) {
        if !existed {
            let _ = std::fs::remove_dir(&a.dir);
        }
        return Err(e.into());
    }
    let quote = |s: &str| -> anyhow::Result<String> {
        Ok(shlex::try_quote(s)
            .map_err(|_| Error::invalid("vramcal slurm -- ...", s, "contains a NUL byte"))?
            .into_owned())
    };
    let mut sweep_args = String::new();
    for x in &a.sweep {
        write!(sweep_args, " {}", quote(x)?)?;
    }
    let d = quote(&dir.display().to_string())?;
    let mut s = String::new();
    writeln!(s, "#!/bin/bash")?;
    writeln!(
        s,
        "# Written by vramcal slurm: {} point(s) in {} part(s) of {} to {} point(s) each;",
        grid.len(),
        a.tasks,
        parts.iter().min().unwrap_or(&0),
        parts.iter().max().unwrap_or(&0),
    )?;
    writeln!(s, "# submit: sbatch {d}/sweep.sbatch")?;
    writeln!(s, "#SBATCH --job-name=vramcal-sweep")?;
    writeln!(s, "#SBATCH --array=1-{}", a.tasks)?;
    writeln!(s, "#SBATCH --ntasks=1")?;
    writeln!(s, "#SBATCH --cpus-per-task=1")?;
    if gpu {
        writeln!(s, "#SBATCH --gres=gpu:1")?;
    }
    writeln!(s, "#SBATCH --mem={mem_mib}M")?;
    if let Some(from) = time.basis.as_deref() {
        writeln!(s, "# --time: {from}")?;
    }
    writeln!(s, "#SBATCH --time={}", time.limit)?;
    if let Some(p) = &a.partition {
        writeln!(s, "#SBATCH --partition={p}")?;
    }
    // sbatch expands `%` in --output's name (`%A`, `%a`): a `%` of the folder's is `%%`.
    writeln!(
        s,
        "#SBATCH --output=\"{}/slurm-%A_%a.out\"",
        dir.display().to_string().replace('%', "%%")
    )?;
    // Relative paths of the sweep (a config.json, weights) as they were written.
    writeln!(s, "#SBATCH --chdir=\"{}\"", cwd.display())?;
    writeln!(s, "set -euo pipefail")?;
    writeln!(
        s,
        "exec {} sweep{} --shard \"${{SLURM_ARRAY_TASK_ID}}/{}\" --resume --out {}/\"part-${{SLURM_ARRAY_TASK_ID}}.csv\"",
        quote(&exe.display().to_string())?,
        sweep_args,
        a.tasks,
        d
    )?;
    let script = dir.join("sweep.sbatch");
    // Another sweep's script or parts in the folder would mix into this one's merge.
    let old = std::fs::read_to_string(&script).ok();
    let stale = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("part-") && n.ends_with(".csv")
        });
    // The same sweep with another time limit is not another sweep: its script is rewritten.
    let untimed = |t: &str| -> String {
        t.lines()
            .filter(|l| !l.starts_with("# --time: ") && !l.starts_with("#SBATCH --time="))
            .collect::<Vec<_>>()
            .join("\n")
    };
    if old.as_deref().is_some_and(|o| untimed(o) != untimed(&s)) || (old.is_none() && stale) {
        return Err(Error::invalid(
            "--dir",
            dir.display(),
            "holds another sweep's script or parts: use a new folder (or remove them)",
        )
        .into());
    }
    std::fs::write(&script, s).map_err(|e| Error::io(&script, e))?;
    let mut out = String::new();
    if let Some(from) = &time.basis {
        writeln!(out, "time limit {from}")?;
    }
    writeln!(
        out,
        "wrote {}: {} point(s) in {} array task(s), each with {} MiB of memory and a time limit of {}{}",
        script.display(),
        grid.len(),
        a.tasks,
        mem_mib,
        time.limit,
        if gpu { " and one GPU" } else { "" }
    )?;
    writeln!(
        out,
        "submit:   sbatch {}",
        quote(&script.display().to_string())?
    )?;
    writeln!(
        out,
        "redo one: sbatch --array=I {} (resumes part I)",
        quote(&script.display().to_string())?
    )?;
    writeln!(
        out,
        "join:     vramcal merge {d}/part-*.csv --out RESULTS.csv"
    )?;
    // A closed pipe (`vramcal slurm … | head -1`) ends the output quietly; the script is written.
    crate::export::emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{project_point_seconds, slurm_duration, slurm_time};
    use crate::report::Row;

    /// A measured row: `point` seconds in all, `step` seconds a step, no timed steps.
    fn row(device: &str, method: &str, seq: usize, flops: f64, point: f64, step: f64) -> Row {
        Row {
            device: device.into(),
            model: "m".into(),
            method: method.into(),
            batch: 1,
            seq,
            micro_batch: 1,
            accumulate: 1,
            model_flops_per_token: Some(flops),
            point_seconds: Some(point),
            step2_seconds: Some(step),
            ..Row::default()
        }
    }

    /// The projection's three cases, computed by hand from the docstring's formulas.
    #[test]
    fn point_time_is_projected_from_measured_rows() {
        let lora64 = row("cuda:0 (NVIDIA H200)", "lora", 64, 100.0, 10.0, 2.0);
        let full64 = row("cuda:0 (NVIDIA H200)", "full", 64, 150.0, 20.0, 1.0);
        let rows = [lora64.clone(), full64.clone()];
        // The same configuration on another GPU of the kind: its fixed 6 s + (2 + 3) steps.
        let mut planned = lora64.clone();
        planned.device = "cuda".into();
        let t = project_point_seconds(&planned, 3, &rows).unwrap();
        assert!(t.same_configuration);
        assert!((t.seconds - (6.0 + 5.0 * 2.0)).abs() < 1e-12, "{t:?}");
        // Twice the tokens of the LoRA recipe: its step doubled, the recipe's fixed time.
        planned.seq = 128;
        let t = project_point_seconds(&planned, 0, &rows).unwrap();
        assert!(!t.same_configuration);
        assert!((t.seconds - (6.0 + 2.0 * 4.0)).abs() < 1e-12, "{t:?}");
        // No row of the recipe (QLoRA): the nearest in work per step (full at 64 × 150 FLOPs
        // against 128 × 100), the largest fixed time of all (18 s).
        planned.method = "qlora".into();
        let t = project_point_seconds(&planned, 0, &rows).unwrap();
        let scaled = 1.0 * (128.0 * 100.0) / (64.0 * 150.0);
        assert!((t.seconds - (18.0 + 2.0 * scaled)).abs() < 1e-12, "{t:?}");
        // Rows of the GPU say nothing of the CPU; nor of another model.
        planned.device = "cpu".into();
        assert_eq!(project_point_seconds(&planned, 0, &rows), None);
        planned.device = "cuda:1".into();
        planned.model = "other".into();
        assert_eq!(project_point_seconds(&planned, 0, &rows), None);
    }

    /// Whole minutes rounded up, in a format `slurm_time` accepts.
    #[test]
    fn durations_are_slurm_times() {
        for (s, want) in [
            (1.0, "0:01:00"),
            (60.0, "0:01:00"),
            (61.0, "0:02:00"),
            (3600.0, "1:00:00"),
            (86_400.0 + 90.0, "1-00:02:00"),
        ] {
            assert_eq!(slurm_duration(s), want);
            assert!(slurm_time(want));
        }
    }

    /// `sbatch --time`'s formats, and a few it refuses.
    #[test]
    fn time_formats_are_slurms() {
        for ok in [
            "30",
            "30:00",
            "02:00:00",
            "1-00",
            "1-12:30",
            "1-00:00:00",
            "UNLIMITED",
            "INFINITE",
        ] {
            assert!(slurm_time(ok), "{ok}");
        }
        for bad in ["", "abc", "1:00:00:00", "1-", "-5", "1-2-3", ":30", "1h"] {
            assert!(!slurm_time(bad), "{bad}");
        }
    }
}
