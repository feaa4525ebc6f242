//! What a new user tripped over (issue "Exact and fast on every machine"): damaged results files
//! are refused before anything is appended, endless inputs are read with a size limit, the
//! estimate says which stack it answers for, the GPU table, `plan --gpu` from the CPU, default
//! outputs in the current folder, fixes that include 16-bit states and sharding, and `check`'s
//! summary saying whether it gated anything.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::stderr_line;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vramcal"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A failed command: non-zero exit and its one `error:` line.
fn refused(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let line = stderr_line(&out);
    assert!(line.starts_with("error: "), "{line}");
    line
}

/// Measures `tiny` at 1 × 8 and 1 × 12 with `extra` options into `out`: two real rows.
fn two_rows(out: &Path, extra: &[&str]) {
    for seq in ["8", "12"] {
        let base = [
            "measure", "--model", "tiny", "--batch", "1", "--seq", seq, "--quiet",
        ];
        ok(&[&base[..], extra, &["--out", out.to_str().unwrap()]].concat());
    }
}

/// Two real rows of `tiny`, then the first cut inside its quoted `command` field and followed by
/// the second: a file damaged before its last line.
fn damaged_file(dir: &Path) -> std::path::PathBuf {
    let good = dir.join("good.csv");
    // A comma in the command makes the CSV quote it.
    two_rows(&good, &["--lora", "r=4,targets=q_proj,v_proj"]);
    let text = std::fs::read_to_string(&good).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let cut = lines[1].find("\"vramcal measure").unwrap() + 20;
    let bad = dir.join("bad.csv");
    std::fs::write(
        &bad,
        format!("{}\n{}\n{}\n", lines[0], &lines[1][..cut], lines[2]),
    )
    .unwrap();
    bad
}

#[test]
fn a_file_damaged_before_its_last_line_takes_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let bad = damaged_file(dir.path());
    let before = std::fs::read(&bad).unwrap();
    let b = bad.to_str().unwrap();
    let tiny = ["--model", "tiny", "--batch", "1", "--seq", "8"];
    let line = refused(&[&["measure"][..], &tiny, &["--quiet", "--out", b]].concat());
    assert!(line.contains("damaged before its last line"), "{line}");
    let line = refused(&[&["sweep"][..], &tiny, &["--out", b]].concat());
    assert!(line.contains("damaged before its last line"), "{line}");
    for verb in ["check", "calibrate"] {
        refused(&[verb, "--measured", b]);
    }
    assert_eq!(std::fs::read(&bad).unwrap(), before, "the file was changed");
}

/// A last row cut inside a multi-line quoted field (a write cut short while recording an
/// error's message) is removed whole, so its open quote cannot swallow the next row.
#[test]
fn a_last_row_cut_inside_a_multi_line_field_is_removed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.csv");
    let g = good.to_str().unwrap();
    let tiny = ["--model", "tiny", "--batch", "1", "--seq", "8", "--quiet"];
    ok(&[&["measure"][..], &tiny, &["--out", g]].concat());
    let text = std::fs::read_to_string(&good).unwrap();
    let row = text.lines().nth(1).unwrap();
    // The same row with a two-line message, cut inside it.
    assert!(row.ends_with(",ok,"), "{row}");
    let cut = format!("{row}\"first line\nsecond li");
    let path = dir.path().join("cut.csv");
    std::fs::write(&path, format!("{text}{cut}")).unwrap();
    let p = path.to_str().unwrap();
    ok(&[&["measure"][..], &tiny, &["--out", p]].concat());
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(&path)
        .unwrap()
        .records()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{}", std::fs::read_to_string(&path).unwrap());
    assert!(rows.iter().all(|r| r.get(r.len() - 1) == Some("")));
}

#[test]
fn endless_inputs_are_refused_and_files_read_with_a_limit() {
    for args in [
        &["check", "--measured", "/dev/zero"][..],
        &["calibrate", "--measured", "/dev/zero"],
        &["report", "--measured", "/dev/zero"],
        &["estimate", "--model", "/dev/zero", "--seq", "8"],
    ] {
        let line = refused(args);
        assert!(line.contains("not a regular file"), "{args:?}: {line}");
    }
    let dir = tempfile::tempdir().unwrap();
    // A FIFO nobody writes to would block a reader forever, and a writer too.
    let fifo = dir.path().join("fifo.csv");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let f = fifo.to_str().unwrap();
    let line = refused(&["check", "--measured", f]);
    assert!(line.contains("not a regular file"), "{line}");
    let line = refused(&[
        "measure", "--model", "tiny", "--batch", "1", "--seq", "8", "--out", f,
    ]);
    assert!(line.contains("FIFO"), "{line}");
    // A regular file past 64 MiB (sparse: no disk used).
    let big = dir.path().join("big.csv");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let line = refused(&["check", "--measured", big.to_str().unwrap()]);
    assert!(line.contains("longer than 64 MiB"), "{line}");
}

/// Tables are never written over measurements: not over an input, not over a results file.
#[test]
fn outputs_never_replace_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.csv");
    two_rows(&rows, &[]);
    let before = std::fs::read(&rows).unwrap();
    let r = rows.to_str().unwrap();
    for args in [
        &[
            "check",
            "--measured",
            r,
            "--profile",
            "candle",
            "--out-csv",
            r,
        ][..],
        &[
            "check",
            "--measured",
            r,
            "--profile",
            "candle",
            "--out-md",
            r,
        ],
        &[
            "calibrate",
            "--measured",
            r,
            "--holdout",
            "none",
            "--out",
            r,
        ],
    ] {
        let line = refused(args);
        assert!(line.contains("choose another output"), "{args:?}: {line}");
    }
    let other = dir.path().join("other.csv");
    std::fs::copy(&rows, &other).unwrap();
    let line = refused(&[
        "calibrate",
        "--measured",
        r,
        "--holdout",
        "none",
        "--out",
        other.to_str().unwrap(),
    ]);
    assert!(line.contains("holds measurements"), "{line}");
    assert_eq!(std::fs::read(&rows).unwrap(), before);
    assert_eq!(std::fs::read(&other).unwrap(), before);
}

#[test]
fn estimate_says_which_stack_it_answers_for() {
    let torch = ok(&["estimate", "--model", "mistral-7b-v0.1", "--seq", "1024"]);
    let first = torch.lines().next().unwrap();
    assert!(
        first.contains("PyTorch + transformers") && first.contains("--profile torch-sdpa"),
        "{first}"
    );
    let candle = ok(&[
        "estimate",
        "--model",
        "mistral-7b-v0.1",
        "--seq",
        "1024",
        "--profile",
        "candle",
    ]);
    assert!(
        candle
            .lines()
            .next()
            .unwrap()
            .contains("vramcal's own candle"),
        "{candle}"
    );
    // Options of a measurement are refused by estimate, not ignored; and hidden from its help.
    let tiny = |extra: &[&str]| {
        refused(&[&["estimate", "--model", "tiny", "--seq", "8"][..], extra].concat())
    };
    let line = tiny(&["--lr", "0.1"]);
    assert!(line.contains("--lr = 0.1"), "{line}");
    // A setting the profile contradicts is refused, not ignored; `torch` is not a profile.
    let line = tiny(&["--attention", "eager"]);
    assert!(line.contains("--profile torch-eager"), "{line}");
    let line = tiny(&["--profile", "torch"]);
    assert!(
        line.contains("expected candle, torch-sdpa or torch-eager"),
        "{line}"
    );
    // A missing required argument is named on the one error line.
    let line = refused(&["estimate", "--model", "tiny"]);
    assert!(line.contains("--seq"), "{line}");
    let help = ok(&["estimate", "--help"]);
    for measure_only in ["--weights", "--timed-steps", "--save-dir", "--data-seed"] {
        assert!(!help.contains(measure_only), "{measure_only} in:\n{help}");
    }
}

#[test]
fn the_fixes_for_a_full_fine_tune_include_16_bit_states_and_sharding() {
    let out = ok(&[
        "estimate",
        "--model",
        "mistral-7b-v0.1",
        "--seq",
        "1024",
        "--dtype",
        "bf16",
        "--gpu",
        "a100-80gb",
    ]);
    assert!(out.contains("does NOT fit"), "{out}");
    assert!(out.contains("--optimizer-state-dtype bf16"), "{out}");
    assert!(out.contains("--shard zero3 --gpus"), "{out}");
}

#[test]
fn the_gpu_table_and_its_names() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["gpus", "--json"])).unwrap();
    let gpus = v.as_array().unwrap();
    assert!(gpus.len() >= 20, "{} GPUs", gpus.len());
    for vendor in ["nvidia", "amd"] {
        assert!(gpus.iter().any(|g| g["vendor"] == vendor), "{vendor}");
    }
    for segment in ["consumer", "workstation", "data-centre"] {
        assert!(gpus.iter().any(|g| g["segment"] == segment), "{segment}");
    }
    for g in gpus {
        assert!(g["memory_bytes"].as_u64().unwrap() >= 8 << 30, "{g}");
        let flops = g["peak_bf16_flops"].as_f64().unwrap();
        assert!((1e13..1e16).contains(&flops), "{g}");
        assert!(!g["source"].as_str().unwrap().is_empty(), "{g}");
    }
    let verdict = |gpu: &str| {
        ok(&[
            "estimate",
            "--model",
            "smollm2-135m",
            "--seq",
            "128",
            "--gpu",
            gpu,
        ])
        .lines()
        .find(|l| l.starts_with("verdict"))
        .unwrap()
        .to_string()
    };
    let a = verdict("rtx4090-24gb");
    for alias in ["4090", "rtx-4090", "RTX_4090", "nvidia-geforce-rtx-4090"] {
        assert_eq!(verdict(alias), a, "{alias}");
    }
    assert!(verdict("l40s").contains("l40s-48gb"));
    assert!(verdict("t4").contains("t4-16gb"));
    let line = refused(&["estimate", "--model", "tiny", "--seq", "8", "--gpu", "a100"]);
    assert!(line.contains("a100-40gb or a100-80gb"), "{line}");
    // No prefix guessing: `h1` is not `h100`.
    let line = refused(&["estimate", "--model", "tiny", "--seq", "8", "--gpu", "h1"]);
    assert!(line.contains("vramcal gpus"), "{line}");
}

#[test]
fn plan_for_a_gpu_from_the_cpu_projects_its_time_from_flops() {
    let args = [
        "plan",
        "--model",
        "tiny",
        "--seq",
        "16",
        "--examples",
        "1000",
        "--gpu",
        "a100-80gb",
    ];
    let text = ok(&args);
    assert!(text.contains("on this device (cpu)"), "{text}");
    assert!(
        text.contains("projected on one a100-80gb") && text.contains("MFU 0.30"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&[&args[..], &["--json", "--mfu", "0.5"]].concat())).unwrap();
    let g = &v["on_gpu"];
    assert_eq!(g["gpu"], "a100-80gb");
    assert_eq!(g["mfu"], 0.5);
    let expect = v["tokens"].as_f64().unwrap() * v["model_flops_per_token"].as_f64().unwrap()
        / (0.5 * 312e12);
    assert!((g["seconds"].as_f64().unwrap() - expect).abs() < 1e-9 * expect.max(1.0));
    // The CPU's measured MFU is not computed against the A100's peak.
    assert!(v["mfu"].is_null(), "{v}");
    // On a GPU kind vramcal measured PyTorch on (the H200), that MFU is used and named.
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "plan",
        "--model",
        "tiny",
        "--seq",
        "16",
        "--examples",
        "1000",
        "--gpu",
        "h200",
        "--json",
    ]))
    .unwrap();
    let g = &v["on_gpu"];
    assert_eq!(g["gpu"], "h200-141gb");
    let mfu = g["mfu"].as_f64().unwrap();
    assert!(mfu > 0.05 && mfu < 0.9, "{mfu}");
    assert!(
        g["mfu_source"]
            .as_str()
            .unwrap()
            .contains("PyTorch full fine-tuning runs"),
        "{g}"
    );
    let line = refused(&[&args[..], &["--mfu", "1.5"]].concat());
    assert!(line.contains("--mfu"), "{line}");
    let line = refused(&[
        "plan",
        "--model",
        "tiny",
        "--seq",
        "16",
        "--examples",
        "10",
        "--mfu",
        "0.3",
    ]);
    assert!(line.contains("goes with --gpu"), "{line}");
}

#[test]
fn default_outputs_go_to_the_current_folder() {
    let dir = tempfile::tempdir().unwrap();
    let st = bin()
        .current_dir(dir.path())
        .args(["sweep", "--model", "tiny", "--batch", "1", "--seq", "8"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let rows = dir.path().join("tiny-cpu.csv");
    assert!(rows.is_file());
    assert!(!dir.path().join("results").exists());
    let st = bin()
        .current_dir(dir.path())
        .args([
            "calibrate",
            "--measured",
            "tiny-cpu.csv",
            "--holdout",
            "none",
        ])
        .output()
        .unwrap();
    // One row cannot fit every term; whatever calibrate says, it writes nowhere but here.
    let _ = st;
    assert!(!dir.path().join("results").exists());
}

#[test]
fn check_says_when_it_gates_nothing() {
    let root = env!("CARGO_MANIFEST_DIR");
    let measured = format!("{root}/results/cpu/smollm2-135m.csv");
    let out = ok(&["check", "--measured", &measured, "--profile", "candle"]);
    assert!(out.contains("no thresholds given"), "{out}");
    let out = ok(&[
        "check",
        "--measured",
        &measured,
        "--profile",
        "candle",
        "--max-error",
        "0.5",
    ]);
    assert!(out.contains("thresholds: max |error| <= 50.00 %"), "{out}");
}

/// The driver's names of common cards (as `nvidia-smi` and `torch.cuda.get_device_name` print
/// them) resolve to the table's entries, so `plan` on a GPU knows its peak.
#[test]
fn driver_names_resolve() {
    use vramcal::throughput::gpu_of_device;
    for (device, name) in [
        ("cuda:0 (NVIDIA H200)", "h200-141gb"),
        ("cuda:0 (NVIDIA H100 80GB HBM3)", "h100-80gb"),
        ("cuda:1 (NVIDIA A100-SXM4-80GB)", "a100-80gb"),
        ("cuda:0 (NVIDIA A100-PCIE-40GB)", "a100-40gb"),
        ("cuda:0 (Tesla T4)", "t4-16gb"),
        ("cuda:0 (NVIDIA GeForce RTX 4090)", "rtx4090-24gb"),
        ("cuda:0 (NVIDIA L40S)", "l40s-48gb"),
        (
            "cuda:0 (NVIDIA RTX 6000 Ada Generation)",
            "rtx-6000-ada-48gb",
        ),
    ] {
        assert_eq!(
            gpu_of_device(device).map(|g| g.name),
            Some(name),
            "{device}"
        );
    }
    assert!(gpu_of_device("cpu").is_none());
    assert!(gpu_of_device("cuda:0 (NVIDIA Some Future GPU)").is_none());
}
