//! Sweeps in parts: `sweep --shard I/N`, `vramcal merge`, and `vramcal slurm` submitted for real
//! to a one-node Slurm (`scripts/slurm-local.sh`). The Slurm test runs where `VRAMCAL_SLURM=1`
//! (CI starts the cluster and sets it) and is skipped elsewhere; the rest always runs.

use std::path::Path;
use std::process::Command as Proc;
use std::time::{Duration, Instant};

use assert_cmd::Command;

mod common;

fn vramcal() -> Command {
    Command::cargo_bin("vramcal").unwrap()
}

/// (method, batch, seq, checkpointing, status) of every row of a results file, sorted.
fn configs(f: &Path) -> Vec<(String, String, String, String, String)> {
    let mut r = csv::Reader::from_path(f).unwrap();
    let mut v: Vec<_> = r
        .deserialize::<std::collections::HashMap<String, String>>()
        .map(Result::unwrap)
        .map(|m| {
            (
                m["method"].clone(),
                m["batch"].clone(),
                m["seq"].clone(),
                m["checkpointing"].clone(),
                m["status"].clone(),
            )
        })
        .collect();
    v.sort();
    v
}

fn sweep(dir: &Path, extra: &[&str], out: &str) {
    vramcal()
        .current_dir(dir)
        .args([
            "sweep", "--model", "tiny", "--batch", "1,2", "--seq", "8,16,32",
        ])
        .args(extra)
        .args(["--out", out])
        .assert()
        .success();
}

/// Three parts of a grid hold every point once; merged they are the unsharded sweep's rows;
/// merging again (the result with its parts) changes nothing.
#[test]
fn shards_partition_the_grid_and_merge_back() {
    let d = tempfile::tempdir().unwrap();
    sweep(d.path(), &[], "all.csv");
    for i in 1..=3 {
        sweep(
            d.path(),
            &["--shard", &format!("{i}/3")],
            &format!("part-{i}.csv"),
        );
        assert_eq!(configs(&d.path().join(format!("part-{i}.csv"))).len(), 2);
    }
    let merge = |args: &[&str]| {
        vramcal()
            .current_dir(d.path())
            .arg("merge")
            .args(args)
            .assert()
    };
    merge(&[
        "part-1.csv",
        "part-2.csv",
        "part-3.csv",
        "--out",
        "merged.csv",
    ])
    .success();
    assert_eq!(
        configs(&d.path().join("merged.csv")),
        configs(&d.path().join("all.csv"))
    );
    merge(&["merged.csv", "part-2.csv", "--out", "again.csv"]).success();
    assert_eq!(
        std::fs::read(d.path().join("merged.csv")).unwrap(),
        std::fs::read(d.path().join("again.csv")).unwrap()
    );
}

/// Bad parts get one `error:` line and nothing is written: another header, a cut last row, a
/// configuration measured twice with other values (unless `--keep newest`); bad `--shard`.
#[test]
fn merge_refuses_what_it_cannot_join() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    sweep(p, &["--shard", "1/2"], "a.csv");
    sweep(p, &["--shard", "1/2"], "b.csv"); // the same points again: other times and dates
    let text = std::fs::read_to_string(p.join("a.csv")).unwrap();
    std::fs::write(p.join("other.csv"), text.replacen(",message", ",note", 1)).unwrap();
    std::fs::write(p.join("foreign.csv"), "foo,bar\n1,2\n").unwrap();
    std::fs::write(p.join("cut.csv"), &text[..text.len() - 40]).unwrap();
    let refuses = |args: &[&str], needle: &str| {
        let out = vramcal()
            .current_dir(p)
            .arg("merge")
            .args(args)
            .arg("--out")
            .arg("m.csv")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = common::stderr_line(&out);
        assert!(
            err.starts_with("error:") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!p.join("m.csv").exists(), "{args:?} wrote a file");
    };
    refuses(
        &["a.csv", "other.csv"],
        "columns this vramcal does not write (note)",
    );
    refuses(&["foreign.csv", "a.csv"], "not a vramcal results header");
    refuses(&["a.csv", "cut.csv"], "last row is cut short");
    refuses(&["a.csv", "b.csv"], "measures the configuration");
    // A part of an earlier vramcal (no point_seconds column) joins under today's header, its
    // rows otherwise as they were.
    let mut r = csv::Reader::from_path(p.join("b.csv")).unwrap();
    let h = r.headers().unwrap().clone();
    let k = h.iter().position(|c| c == "point_seconds").unwrap();
    let mut w = csv::Writer::from_path(p.join("old.csv")).unwrap();
    let drop = |rec: &csv::StringRecord| -> Vec<String> {
        rec.iter()
            .enumerate()
            .filter(|(i, _)| *i != k)
            .map(|(_, v)| v.to_string())
            .collect()
    };
    w.write_record(drop(&h)).unwrap();
    for rec in r.records() {
        w.write_record(drop(&rec.unwrap())).unwrap();
    }
    w.flush().unwrap();
    sweep(p, &["--shard", "2/2"], "c.csv");
    vramcal()
        .current_dir(p)
        .args(["merge", "old.csv", "c.csv", "--out", "joined.csv"])
        .assert()
        .success();
    let mut j = csv::Reader::from_path(p.join("joined.csv")).unwrap();
    assert_eq!(j.headers().unwrap(), &h);
    let rows: Vec<csv::StringRecord> = j.records().map(Result::unwrap).collect();
    let old_rows = csv::Reader::from_path(p.join("b.csv"))
        .unwrap()
        .records()
        .count();
    assert!(rows[..old_rows].iter().all(|r| r[k].is_empty()));
    // Merging again, the result with its parts (one of an earlier vramcal), changes nothing.
    vramcal()
        .current_dir(p)
        .args([
            "merge",
            "joined.csv",
            "old.csv",
            "c.csv",
            "--out",
            "again.csv",
        ])
        .assert()
        .success();
    assert_eq!(
        std::fs::read(p.join("again.csv")).unwrap(),
        std::fs::read(p.join("joined.csv")).unwrap()
    );
    assert!(rows[old_rows..].iter().all(|r| !r[k].is_empty()));
    assert_eq!(
        configs(&p.join("joined.csv")).len(),
        configs(&p.join("a.csv")).len() + configs(&p.join("c.csv")).len()
    );
    vramcal()
        .current_dir(p)
        .args([
            "merge", "a.csv", "b.csv", "--out", "m.csv", "--keep", "newest",
        ])
        .assert()
        .success();
    assert_eq!(configs(&p.join("m.csv")), configs(&p.join("b.csv")));
    // Simulated data-parallel ranks are configurations of their own: a file of one-device
    // rows and the ranks of each merges whole.
    let sharded =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("results/cpu/smollm2-135m-sharded.csv");
    vramcal()
        .current_dir(p)
        .arg("merge")
        .arg(&sharded)
        .args(["--out", "ranks.csv"])
        .assert()
        .success();
    assert_eq!(
        std::fs::read_to_string(p.join("ranks.csv"))
            .unwrap()
            .lines()
            .count(),
        std::fs::read_to_string(&sharded).unwrap().lines().count()
    );
    for bad in ["3/2", "0/0", "1", "a/b"] {
        let out = vramcal()
            .current_dir(p)
            .args([
                "sweep", "--model", "tiny", "--batch", "1", "--seq", "8", "--shard", bad,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("expected I/N"),
            "{bad}"
        );
    }
}

/// `vramcal slurm`'s script, submitted unchanged to a one-node Slurm: four array tasks of a
/// `tiny` grid, their time limit projected from a local sweep's rows (`--time-from`); task 2 is cancelled while it runs, resubmitted alone (`--array=2`, which resumes
/// its part), and the merged parts hold the same configurations as a local sweep.
#[test]
fn a_slurm_array_runs_the_sweep_in_parts() {
    if std::env::var("VRAMCAL_SLURM").as_deref() != Ok("1") {
        eprintln!(
            "skipped: VRAMCAL_SLURM=1 not set (bash scripts/slurm-local.sh starts a cluster)"
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let grid = ["--model", "tiny", "--batch", "1,2", "--seq", "8,16,32,64"];
    // The local sweep first: its rows' point_seconds give the tasks' time limit.
    vramcal()
        .current_dir(p)
        .arg("sweep")
        .args(grid)
        .args(["--out", "local.csv"])
        .assert()
        .success();
    vramcal()
        .current_dir(p)
        .args([
            "slurm",
            "--tasks",
            "4",
            "--dir",
            "parts",
            "--time-from",
            "local.csv",
            "--",
        ])
        .args(grid)
        // Slow enough points (a few seconds each) to cancel a task mid-run.
        .args(["--timed-steps", "1500"])
        .assert()
        .success();
    let script = p.join("parts/sweep.sbatch");
    let sbatch = |extra: &[&str]| -> String {
        let out = Proc::new("sbatch")
            .current_dir(p)
            .arg("--parsable")
            .args(extra)
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let wait = |job: &str| {
        let t0 = Instant::now();
        loop {
            let q = Proc::new("squeue")
                .args(["-h", "-j", job])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "job {job} did not finish"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let job = sbatch(&[]);
    // Cancel task 2 once it runs.
    let t0 = Instant::now();
    loop {
        let q = Proc::new("squeue")
            .args(["-h", "-t", "R", "-o", "%i", "-j", &job])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&q.stdout)
            .lines()
            .any(|l| l.trim() == format!("{job}_2"))
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "task 2 never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(Proc::new("scancel")
        .arg(format!("{job}_2"))
        .status()
        .unwrap()
        .success());
    wait(&job);
    let redo = sbatch(&["--array=2"]);
    wait(&redo);
    let parts: Vec<String> = (1..=4).map(|i| format!("parts/part-{i}.csv")).collect();
    vramcal()
        .current_dir(p)
        .arg("merge")
        .args(&parts)
        .args(["--out", "merged.csv"])
        .assert()
        .success();
    let merged = configs(&p.join("merged.csv"));
    assert_eq!(merged.len(), 8);
    assert!(merged.iter().all(|c| c.4 == "ok"), "{merged:?}");
    assert_eq!(merged, configs(&p.join("local.csv")));
}

/// `slurm --time-from`: the time limit from a sweep's measured `point_seconds` (the same
/// configurations: their sum; a new one: scaled), and what it refuses, its files unchanged.
#[test]
fn slurm_time_limit_is_projected_from_measured_points() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let grid = ["--model", "tiny", "--batch", "1", "--seq", "8,32"];
    vramcal()
        .current_dir(p)
        .arg("sweep")
        .args(grid)
        .args(["--timed-steps", "300", "--out", "m.csv"])
        .assert()
        .success();
    let mut r = csv::Reader::from_path(p.join("m.csv")).unwrap();
    let measured: f64 = r
        .deserialize::<std::collections::HashMap<String, String>>()
        .map(|m| m.unwrap()["point_seconds"].parse::<f64>().unwrap())
        .sum();
    assert!(measured > 0.0);
    let projected = |dir: &str, grid: &[&str]| -> (f64, String) {
        vramcal()
            .current_dir(p)
            .args([
                "slurm",
                "--tasks",
                "1",
                "--dir",
                dir,
                "--time-from",
                "m.csv",
                "--",
            ])
            .args(grid)
            .args(["--timed-steps", "300"])
            .assert()
            .success();
        let script = std::fs::read_to_string(p.join(dir).join("sweep.sbatch")).unwrap();
        let line = script
            .lines()
            .find(|l| l.starts_with("# --time: "))
            .expect("the script says where its time came from")
            .to_string();
        let secs = line
            .split("projected ")
            .nth(1)
            .and_then(|x| x.split(" s,").next())
            .unwrap()
            .parse()
            .unwrap();
        (secs, line)
    };
    // The measured configurations again: the sum of their point_seconds (printed to 0.1 s).
    let (secs, line) = projected("a", &grid);
    assert!((secs - measured).abs() <= 0.051, "{line} vs {measured}");
    assert!(line.contains("2 of 2 point(s) measured"), "{line}");
    assert!(!line.contains("scaled"), "{line}");
    // One configuration more (seq 64): its 302 steps projected from seq 32's at twice the
    // tokens (hundreds of milliseconds), beside the two measured.
    let more_grid = ["--model", "tiny", "--batch", "1", "--seq", "8,32,64"];
    let (more, line) = projected("b", &more_grid);
    assert!(more >= secs + 0.2, "{line} vs {secs}");
    assert!(
        line.contains("2 of 3 point(s) measured in the same configuration, the others scaled"),
        "{line}"
    );
    // Again into the same folder: the same sweep, its script rewritten, not refused.
    let (again, _) = projected("b", &more_grid);
    assert!((again - more).abs() <= 0.051);
    // Files read, never changed: rows of smollm2-135m from before the column existed, a file
    // whose last row is cut (a sweep still writing it); and --time beside --time-from.
    let m = std::fs::read(p.join("m.csv")).unwrap();
    std::fs::write(p.join("cut.csv"), &m[..m.len() - 20]).unwrap();
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/cpu/smollm2-135m.csv");
    std::fs::copy(&committed, p.join("old.csv")).unwrap();
    let tiny = ["--model", "tiny", "--batch", "1", "--seq", "8"];
    let smol = ["--model", "smollm2-135m", "--batch", "1", "--seq", "8"];
    for (files, sweep, says) in [
        (
            &["m.csv"][..],
            &smol,
            "has no row of smollm2-135m on cpu that records point_seconds",
        ),
        (
            &["old.csv"][..],
            &smol,
            "has no row of smollm2-135m on cpu that records point_seconds",
        ),
        (&["cut.csv"][..], &tiny, "its last row is cut short"),
        (&["m.csv\ntouch x"][..], &tiny, "contains a line break"),
        (&["nope.csv"][..], &tiny, "nope.csv"),
        (&["m.csv", "--time", "10"][..], &tiny, "cannot be used with"),
    ] {
        let out = vramcal()
            .current_dir(p)
            .args(["slurm", "--tasks", "1", "--dir", "c", "--time-from"])
            .args(files)
            .arg("--")
            .args(sweep)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{files:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(says) && err.starts_with("error: "),
            "{files:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!p.join("c/sweep.sbatch").exists());
    }
    assert_eq!(std::fs::read(p.join("m.csv")).unwrap(), m);
    assert_eq!(
        std::fs::read(p.join("old.csv")).unwrap(),
        std::fs::read(&committed).unwrap()
    );
}

/// What `vramcal slurm` cannot write into a script is refused before anything is made: a
/// double quote or a backslash in `--dir` (no folder left behind), a line break in the current folder, more
/// tasks than points (at once, for any count), a line break in `--partition` (one line of
/// error); a `%` in `--dir` is written `%%` in `--output` (sbatch's patterns); an argument that
/// is not UTF-8 is no panic.
#[test]
fn slurm_refuses_what_a_script_cannot_hold() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let tiny = ["--", "--model", "tiny", "--batch", "1", "--seq", "8"];
    let refused = |dir: &Path, args: &[&str], says: &str| {
        let out = vramcal()
            .current_dir(dir)
            .arg("slurm")
            .args(args)
            .args(tiny)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(says),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    };
    refused(p, &["--tasks", "1", "--dir", "dq\"x"], "double quote");
    refused(p, &["--tasks", "1", "--dir", "bs\\x"], "backslash");
    assert!(!p.join("bs\\x").exists());
    assert!(!p.join("dq\"x").exists());
    for n in ["18446744073709551615", "4294967296", "2"] {
        refused(
            p,
            &["--tasks", n, "--dir", "t"],
            "more tasks than the grid's 1 point(s)",
        );
    }
    refused(
        p,
        &["--tasks", "1", "--dir", "t", "--partition", "p\nq"],
        "partition = p\\nq",
    );
    let nl = p.join("cw\nnl");
    std::fs::create_dir(&nl).unwrap();
    refused(&nl, &["--tasks", "1", "--dir", "t"], "the current folder");
    assert!(!p.join("t").exists() && !nl.join("t").exists());
    vramcal()
        .current_dir(p)
        .args(["slurm", "--tasks", "1", "--dir", "pc%Ax"])
        .args(tiny)
        .assert()
        .success();
    let script = std::fs::read_to_string(p.join("pc%Ax/sweep.sbatch")).unwrap();
    assert!(script.contains("pc%%Ax/slurm-%A_%a.out"), "{script}");
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"o\xff.csv");
        vramcal()
            .current_dir(p)
            .args([
                "sweep", "--model", "tiny", "--batch", "1", "--seq", "8", "--out",
            ])
            .arg(bad)
            .assert()
            .success();
        // The row's command names the file as it can (U+FFFD for the byte).
        let mut r = csv::Reader::from_path(p.join(bad)).unwrap();
        let row: std::collections::HashMap<String, String> =
            r.deserialize().next().unwrap().unwrap();
        assert!(
            row["command"].contains("--out o\u{fffd}.csv"),
            "{}",
            row["command"]
        );
    }
}
