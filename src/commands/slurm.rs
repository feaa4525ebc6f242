//! `vramcal slurm`: writes a Slurm job-array script that runs a sweep in `--tasks` parts, one
//! array task per part (`sweep --shard I/N --resume --out DIR/part-I.csv`), and says how to
//! submit it and join the parts (`vramcal merge`). No scheduler of vramcal's own: Slurm runs
//! the tasks, resubmits them (`sbatch --array=I` with the same script resumes task I's part)
//! and keeps their logs (`DIR/slurm-%A_%a.out`).
//!
//! Per task: one CPU core, or with `--device cuda` one GPU (`--gres=gpu:1`; the sweep runs on
//! the GPU Slurm gives the task); memory (`--mem`, host RAM) from the largest estimate among
//! the task's points (the `candle` profile, uncalibrated) plus a quarter and 512 MiB for the
//! process, at least 1 GiB; the wall time from `--time` (vramcal does not predict it before a
//! step is measured: `vramcal plan` projects it from one). Tasks run in the folder the script
//! was written from (`--chdir`), so the sweep's relative paths hold.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, SlurmArgs, SweepArgs};
use crate::error::Error;

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
    let dir_text = a.dir.display().to_string();
    for x in a.sweep.iter().chain(std::iter::once(&dir_text)) {
        if x.chars().any(char::is_control) {
            return Err(Error::invalid(
                "vramcal slurm",
                x.escape_debug(),
                "contains a line break or another control character",
            )
            .into());
        }
    }
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
    let parts: Vec<usize> = (1..=a.tasks)
        .map(|i| {
            super::sweep::GridShard {
                index: i,
                count: a.tasks,
            }
            .select((0..grid.len()).collect())
            .len()
        })
        .collect();
    if parts.contains(&0) {
        return Err(Error::invalid(
            "--tasks",
            a.tasks,
            format!("more tasks than the grid's {} points", grid.len()),
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
    let mem_mib = ((largest + largest / 4) >> 20)
        .saturating_add(512)
        .max(1024);
    let gpu = sweep.model.device.starts_with("cuda");
    std::fs::create_dir_all(&a.dir).map_err(|e| Error::io(&a.dir, e))?;
    let dir = std::fs::canonicalize(&a.dir).map_err(|e| Error::io(&a.dir, e))?;
    let cwd = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    for p in [&dir, &cwd] {
        if p.display().to_string().contains('"') {
            return Err(Error::invalid(
                "--dir",
                p.display(),
                "a path with a double quote cannot be written into #SBATCH lines",
            )
            .into());
        }
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("vramcal", e))?;
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
    writeln!(s, "#SBATCH --time={}", a.time)?;
    if let Some(p) = &a.partition {
        writeln!(s, "#SBATCH --partition={p}")?;
    }
    writeln!(s, "#SBATCH --output=\"{}/slurm-%A_%a.out\"", dir.display())?;
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
    if old.as_deref().is_some_and(|o| o != s) || (old.is_none() && stale) {
        return Err(Error::invalid(
            "--dir",
            dir.display(),
            "holds another sweep's script or parts: use a new folder (or remove them)",
        )
        .into());
    }
    std::fs::write(&script, s).map_err(|e| Error::io(&script, e))?;
    println!(
        "wrote {}: {} point(s) in {} array task(s), each with {} MiB of memory and a time limit of {}{}",
        script.display(),
        grid.len(),
        a.tasks,
        mem_mib,
        a.time,
        if gpu { " and one GPU" } else { "" }
    );
    println!("submit:   sbatch {}", quote(&script.display().to_string())?);
    println!(
        "redo one: sbatch --array=I {} (resumes part I)",
        quote(&script.display().to_string())?
    );
    println!("join:     vramcal merge {d}/part-*.csv --out RESULTS.csv");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::slurm_time;

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
