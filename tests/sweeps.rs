//! Sweeps that survive: kill -9 and --resume, crashing and out-of-memory points, locking,
//! unwritable outputs, `max` and `plan`.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vramcal"))
}

fn rows(p: &Path) -> Vec<HashMap<String, String>> {
    let mut r = csv::Reader::from_path(p).unwrap();
    let h = r.headers().unwrap().clone();
    r.records()
        .map(|x| {
            h.iter()
                .zip(x.unwrap().iter())
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        })
        .collect()
}

const GRID: [&str; 8] = [
    "--batch",
    "1,2,3",
    "--seq",
    "4,8,12,16",
    "--method",
    "full,lora",
    "--checkpointing",
    "none",
];

/// kill -9 of the parent at random moments, then --resume, 20 times: every point present
/// exactly once and the CSV always parses.
#[test]
fn kill9_and_resume_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k.csv");
    let o = out.to_str().unwrap();
    // A deterministic spread of kill times (no RNG crate needed): 0 to ~190 ms.
    for cycle in 0..20u64 {
        let mut child = bin()
            .args(["sweep", "--model", "tiny", "--resume", "--out", o])
            .args(GRID)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis((cycle * 37) % 190));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if out.exists() && std::fs::metadata(&out).unwrap().len() > 0 {
            // Parses at every moment (a cut last line is repaired by --resume).
            let _ = bin().args([
                "sweep", "--model", "tiny", "--resume", "--out", o, "--batch", "1", "--seq", "4",
                "--method", "full",
            ]);
        }
    }
    let st = bin()
        .args(["sweep", "--model", "tiny", "--resume", "--out", o])
        .args(GRID)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let r = rows(&out);
    let mut keys: Vec<(String, String, String)> = r
        .iter()
        .map(|x| (x["method"].clone(), x["batch"].clone(), x["seq"].clone()))
        .collect();
    keys.sort();
    let before = keys.len();
    keys.dedup();
    assert_eq!(before, keys.len(), "duplicated rows");
    assert_eq!(keys.len(), 2 * 3 * 4, "missing rows: {keys:?}");
    assert!(r.iter().all(|x| x["status"] == "ok"));
}

/// A point that panics and one that exceeds the budget are recorded; the sweep goes on and its
/// exit code says some points failed.
#[test]
fn crashing_and_oom_points_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.csv");
    let st = bin()
        .env("VRAMCAL_FAULT", "panic:step1_backward")
        .args([
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1,2",
            "--seq",
            "8",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(2));
    let r = rows(&out);
    assert_eq!(r.len(), 2);
    for x in &r {
        assert_eq!(x["status"], "error");
        assert!(
            x["message"].contains("fault injected") && x["message"].contains("step1_backward"),
            "{}",
            x["message"]
        );
        // What was measured before the crash is kept.
        assert!(!x["step1_forward_peak_bytes"].is_empty());
        assert!(x["step1_backward_peak_bytes"].is_empty());
    }

    let out2 = dir.path().join("oom.csv");
    let st = bin()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1,64",
            "--seq",
            "32",
            "--budget",
            "3MiB",
            "--out",
            out2.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        st.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let r = rows(&out2);
    assert_eq!(r[0]["status"], "ok");
    assert_eq!(r[1]["status"], "oom");
    assert!(
        r[1]["message"].contains("needed more than --budget 3145728 bytes (3.0 MiB)"),
        "{}",
        r[1]["message"]
    );
    assert_eq!(r[1]["budget_bytes"], (3u64 << 20).to_string());
    assert!(r[0]["peak_bytes"].parse::<u64>().unwrap() <= 3 << 20);
}

#[test]
fn a_second_sweep_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.csv");
    let lock = std::fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.try_lock().unwrap();
    let st = bin()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr)
        .contains("another vramcal sweep or measurement is writing"));
    drop(lock);
    let st = bin()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(st.status.success());
}

#[test]
fn a_full_disk_is_a_clear_error() {
    let st = bin()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--out",
            "/dev/full",
        ])
        .output()
        .unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        err.lines().any(|l| l.starts_with("error:")
            && l.contains("/dev/full")
            && l.contains("No space left")),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

/// `max` finds a boundary that agrees with single measurements under the same budget.
#[test]
fn max_finds_the_boundary() {
    let st = bin()
        .args([
            "max", "--model", "tiny", "--seq", "32", "--budget", "3MiB", "--limit", "64",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let x: usize = text
        .split("3.00 GiB")
        .next()
        .and_then(|_| text.split("seq 32: ").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no boundary in {text}"));
    let fits = |b: usize| {
        bin()
            .args([
                "measure",
                "--model",
                "tiny",
                "--seq",
                "32",
                "--budget",
                "3MiB",
                "--quiet",
                "--batch",
                &b.to_string(),
            ])
            .status()
            .unwrap()
            .success()
    };
    assert!(fits(x), "{x} should fit: {text}");
    assert!(!fits(x + 1), "{} should not fit: {text}", x + 1);
}

#[test]
fn plan_projects_time_from_measured_throughput() {
    let st = bin()
        .args([
            "plan",
            "--model",
            "tiny",
            "--examples",
            "10000",
            "--seq",
            "32",
            "--batch",
            "4",
            "--peak-tflops",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(p["tokens"], 320_000);
    assert_eq!(p["steps"], 2500);
    let tps = p["tokens_per_second"].as_f64().unwrap();
    assert!(tps > 0.0);
    assert!((p["seconds"].as_f64().unwrap() - 320_000.0 / tps).abs() < 1e-6);
    let mfu = p["mfu"].as_f64().unwrap();
    assert!((mfu - p["model_flops_per_token"].as_f64().unwrap() * tps / 1e12).abs() < 1e-12);
    // --batch is optional for plan (default 1).
    let st = bin()
        .args([
            "plan",
            "--model",
            "tiny",
            "--examples",
            "100",
            "--seq",
            "16",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(p["steps"], 100);
    let bad = bin()
        .args(["plan", "--model", "tiny", "--examples", "0", "--seq", "32"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--examples"));
}

#[test]
fn a_results_file_of_an_earlier_version_takes_new_rows() {
    // A committed results file without the columns added since 0.1.0's first results
    // (`memory_counter`, `attention`), as files written before them are.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/cpu/smollm2-135m.csv");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("old.csv");
    {
        let mut r = csv::Reader::from_path(&src).unwrap();
        let h = r.headers().unwrap().clone();
        let keep: Vec<usize> = (0..h.len())
            .filter(|&i| !["memory_counter", "attention"].contains(&&h[i]))
            .collect();
        let mut w = csv::Writer::from_path(&out).unwrap();
        w.write_record(keep.iter().map(|&i| &h[i])).unwrap();
        for rec in r.records() {
            let rec = rec.unwrap();
            w.write_record(keep.iter().map(|&i| &rec[i])).unwrap();
        }
    }
    let before = rows(&out);
    assert!(!before[0].contains_key("memory_counter"));
    let st = bin()
        .args([
            "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--quiet", "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let after = rows(&out);
    assert_eq!(after.len(), before.len() + 1);
    for (a, b) in after.iter().zip(&before) {
        // Every earlier value kept; the new column empty.
        for (k, v) in b {
            assert_eq!(&a[k], v, "column {k}");
        }
        assert_eq!(a["memory_counter"], "");
        assert_eq!(a["attention"], "");
    }
    assert_eq!(
        after.last().unwrap()["memory_counter"],
        "host-counting-allocator-above-baseline"
    );
    assert!(!dir.path().join("old.csv.upgrade").exists());
}

#[test]
fn a_row_cut_short_is_dropped_before_appending() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cut.csv");
    let measure = |out: &Path| {
        bin()
            .args([
                "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--quiet", "--out",
            ])
            .arg(out)
            .status()
            .unwrap()
    };
    assert!(measure(&out).success());
    assert!(measure(&out).success());
    // Cut the second row in the middle, as a crash during the write would.
    let text = std::fs::read_to_string(&out).unwrap();
    let cut = text.trim_end().rfind('\n').unwrap() + 40;
    std::fs::write(&out, &text[..cut]).unwrap();
    // Appending without --resume drops the cut row, keeps the complete one, adds the new one.
    assert!(measure(&out).success());
    let after = rows(&out);
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|r| r["status"] == "ok"));
    // A complete last row without its newline (a hand edit) is kept.
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, text.trim_end()).unwrap();
    assert!(measure(&out).success());
    assert_eq!(rows(&out).len(), 3);
}

/// `--jobs 3` measures the same grid as one job, each point in its own process: the same
/// configurations with the same peaks to the byte, in any order, and `--resume` then skips
/// them all. Options that would make it lie are refused.
#[test]
fn parallel_jobs_measure_the_same_peaks() {
    let dir = tempfile::tempdir().unwrap();
    let grid = [
        "--model",
        "tiny",
        "--batch",
        "1,2",
        "--seq",
        "8,16",
        "--method",
        "full,lora",
    ];
    let sweep = |out: &Path, extra: &[&str]| {
        let st = bin()
            .arg("sweep")
            .args(grid)
            .arg("--out")
            .arg(out)
            .args(extra)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{extra:?}");
    };
    let (one, three) = (dir.path().join("one.csv"), dir.path().join("three.csv"));
    sweep(&one, &[]);
    sweep(&three, &["--jobs", "3"]);
    let key = |r: &HashMap<String, String>| {
        format!(
            "{} {} {} {}",
            r["method"], r["batch"], r["seq"], r["peak_bytes"]
        )
    };
    let mut a: Vec<String> = rows(&one).iter().map(key).collect();
    let mut b: Vec<String> = rows(&three).iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(a.len(), 8);
    assert_eq!(a, b);
    // Times of points measured in parallel are not kept.
    assert!(rows(&three)
        .iter()
        .all(|r| r["tokens_per_second"].is_empty() && r["point_seconds"].is_empty()));
    assert!(rows(&one)
        .iter()
        .all(|r| !r["tokens_per_second"].is_empty() && !r["point_seconds"].is_empty()));
    sweep(&three, &["--jobs", "3", "--resume"]);
    assert_eq!(rows(&three).len(), 8, "--resume measured again");
    for (extra, want) in [
        (&["--jobs", "0"][..], "invalid --jobs = 0"),
        (
            &["--jobs", "2", "--timed-steps", "1"][..],
            "times of points measured in parallel",
        ),
        (&["--jobs", "2", "--device", "cuda:0"][..], "is for the CPU"),
        (&["--devices", "cpu"][..], "lists GPUs"),
        (&["--devices", "all"][..], "found no CUDA device"),
        (&["--devices", "all", "--jobs", "2"][..], "do not combine"),
        (&["--devices", ",cuda:0"][..], "has an empty entry"),
    ] {
        let out = bin()
            .arg("sweep")
            .args(grid)
            .arg("--out")
            .arg(dir.path().join("x.csv"))
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} accepted");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error")).count(),
            1,
            "{err}"
        );
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    assert!(!dir.path().join("x.csv").exists());
}
