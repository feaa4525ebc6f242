//! The `vramcal` binary: success paths and one clear error line (non-zero exit, CSV
//! unchanged) for each class of bad input.

mod common;

use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

fn vramcal() -> Command {
    Command::cargo_bin("vramcal").unwrap()
}

/// Runs `args`, expects failure with exactly one `error:` line containing `needle`, and
/// checks that `csv` (if any) was not modified.
fn fails_with<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    needle: &str,
    csv: Option<&Path>,
) {
    let before = csv.map(|p| std::fs::read(p).unwrap());
    let out = vramcal().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: stderr was {stderr}");
    assert!(
        errors[0].contains(needle),
        "{args:?}: {:?} does not contain {needle:?}",
        errors[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    if let (Some(p), Some(b)) = (csv, before) {
        assert_eq!(std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
}

fn rows(p: &Path) -> Vec<csv::StringRecord> {
    csv::Reader::from_path(p)
        .unwrap()
        .records()
        .map(|r| r.unwrap())
        .collect()
}

#[test]
fn models_lists_exact_counts() {
    vramcal().arg("models").assert().success().stdout(
        predicate::str::contains("7,241,732,096").and(predicate::str::contains("134,515,008")),
    );
}

#[test]
fn help_has_examples() {
    for cmd in ["measure", "sweep", "models"] {
        vramcal()
            .args([cmd, "--help"])
            .assert()
            .success()
            .stdout(predicate::str::contains("Examples"));
    }
}

#[test]
fn measure_appends_rows_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sub/out.csv");
    let c = csv.to_str().unwrap();
    vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "2", "--seq", "8", "--out", c,
        ])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("step2_backward")
                .and(predicate::str::contains("peak allocated")),
        );
    let out = vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "1", "--seq", "16", "--json", "--out", c,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let row: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(row["status"], "ok");
    assert_eq!(row["seq"], 16);
    let r = rows(&csv);
    assert_eq!(r.len(), 2);
    let header = csv::Reader::from_path(&csv)
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(&r[0][col("status")], "ok");
    assert_eq!(&r[0][col("params")], "21664");
    let peak: u64 = r[1][col("peak_bytes")].parse().unwrap();
    assert_eq!(peak, row["peak_bytes"].as_u64().unwrap());
    assert!(r[0][col("command")].contains("measure --model tiny"));
}

#[test]
fn bad_input_gets_one_clear_line_and_keeps_the_csv() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("keep.csv");
    let c = csv.to_str().unwrap();
    vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--out", c,
        ])
        .assert()
        .success();
    let keep = Some(csv.as_path());
    let m = |extra: &[&str]| -> Vec<String> {
        ["measure", "--out", c]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };

    // Config files.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let cfg = bad.join("config.json");
    let cfg_s = cfg.to_str().unwrap();
    std::fs::write(&cfg, "{ \"hidden_size\": ").unwrap();
    fails_with(
        &m(&["--model", cfg_s, "--batch", "1", "--seq", "4"]),
        "malformed model config",
        keep,
    );
    let tiny = serde_json::to_value(vramcal::config::preset("tiny").unwrap().config).unwrap();
    let mut missing = tiny.clone();
    missing.as_object_mut().unwrap().remove("vocab_size");
    std::fs::write(&cfg, missing.to_string()).unwrap();
    fails_with(
        &m(&["--model", cfg_s, "--batch", "1", "--seq", "4"]),
        "vocab_size",
        keep,
    );
    let mut arch = tiny.clone();
    arch["architectures"] = serde_json::json!(["BertModel"]);
    std::fs::write(&cfg, arch.to_string()).unwrap();
    fails_with(
        &m(&["--model", cfg_s, "--batch", "1", "--seq", "4"]),
        "unsupported architecture",
        keep,
    );
    let mut zero = tiny.clone();
    zero["num_attention_heads"] = serde_json::json!(0);
    std::fs::write(&cfg, zero.to_string()).unwrap();
    fails_with(
        &m(&["--model", cfg_s, "--batch", "1", "--seq", "4"]),
        "num_attention_heads must be positive",
        keep,
    );
    fails_with(
        &m(&["--model", "nonexistent-model", "--batch", "1", "--seq", "4"]),
        "unknown model",
        keep,
    );

    // Sizes.
    fails_with(
        &m(&["--model", "tiny", "--batch", "0", "--seq", "4"]),
        "--batch",
        keep,
    );
    fails_with(
        &m(&["--model", "tiny", "--batch", "1", "--seq", "65"]),
        "max_position_embeddings",
        keep,
    );
    fails_with(
        &m(&[
            "--model",
            "tiny",
            "--batch",
            "4611686018427387904",
            "--seq",
            "64",
        ]),
        "overflows",
        keep,
    );
    fails_with(
        &m(&["--model", "tiny", "--batch", "1000000000", "--seq", "64"]),
        "more than this machine",
        keep,
    );
    fails_with(
        &m(&[
            "--model", "tiny", "--batch", "1", "--seq", "4", "--dtype", "int8",
        ]),
        "dtype",
        keep,
    );

    // Weights.
    fails_with(
        &m(&[
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--weights",
            "/no/such.gguf",
        ]),
        "no such file",
        keep,
    );
    let st = dir.path().join("w.safetensors");
    std::fs::write(&st, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    fails_with(
        &m(&[
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--weights",
            st.to_str().unwrap(),
        ]),
        "w.safetensors",
        keep,
    );
    if let Some(g) = common::smollm2_gguf() {
        let cut = dir.path().join("cut.gguf");
        let bytes = std::fs::read(&g).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
        fails_with(
            &m(&[
                "--model",
                "smollm2-135m",
                "--batch",
                "1",
                "--seq",
                "4",
                "--weights",
                cut.to_str().unwrap(),
            ]),
            "cut.gguf",
            keep,
        );
        fails_with(
            &m(&[
                "--model",
                "tiny",
                "--batch",
                "1",
                "--seq",
                "4",
                "--weights",
                g.to_str().unwrap(),
            ]),
            "do not match",
            keep,
        );
    }

    // Devices and outputs.
    if !cfg!(feature = "cuda") {
        fails_with(
            &m(&[
                "--model", "tiny", "--batch", "1", "--seq", "4", "--device", "cuda:0",
            ]),
            "without the `cuda` feature",
            keep,
        );
    }
    fails_with(
        &m(&[
            "--model", "tiny", "--batch", "1", "--seq", "4", "--device", "tpu",
        ]),
        "expected `cpu`",
        keep,
    );
    let other = dir.path().join("other.csv");
    std::fs::write(&other, "a,b\n1,2\n").unwrap();
    fails_with(
        &[
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--out",
            other.to_str().unwrap(),
        ],
        "another header",
        Some(other.as_path()),
    );
    fails_with(
        &[
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--out",
            "/proc/vramcal/x.csv",
        ],
        "/proc/vramcal",
        None,
    );

    assert_eq!(rows(&csv).len(), 1);
}

#[test]
fn allow_longer_lifts_the_context_limit() {
    vramcal()
        .args([
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "70",
            "--allow-longer",
            "--quiet",
        ])
        .assert()
        .success();
}

#[test]
fn sweep_writes_one_row_per_point() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sweep.csv");
    vramcal()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1,2",
            "--seq",
            "8,16",
            "--out",
            csv.to_str().unwrap(),
        ])
        .assert()
        .success();
    let r = rows(&csv);
    assert_eq!(r.len(), 4);
    let header = csv::Reader::from_path(&csv)
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let points: Vec<(String, String)> = r
        .iter()
        .map(|x| (x[col("batch")].to_string(), x[col("seq")].to_string()))
        .collect();
    assert_eq!(
        points,
        [("1", "8"), ("1", "16"), ("2", "8"), ("2", "16")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert!(r.iter().all(|x| &x[col("status")] == "ok"));
    assert!(r
        .iter()
        .all(|x| x[col("command")].contains("sweep --model tiny")));
}

#[test]
fn sweep_rejects_malformed_grids_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("never.csv");
    let c = csv.to_str().unwrap();
    for (b, s, needle) in [
        ("1,0", "8", "at least 1"),
        ("1,x", "8", "positive integer"),
        ("1,1", "8", "listed twice"),
        ("1", "", "empty"),
        ("1", "8,65", "max_position_embeddings"),
    ] {
        fails_with(
            &[
                "sweep", "--model", "tiny", "--batch", b, "--seq", s, "--out", c,
            ],
            needle,
            None,
        );
        assert!(!csv.exists() || std::fs::read_to_string(&csv).unwrap().is_empty());
    }
}

#[test]
fn peft_bad_input_gets_one_clear_line() {
    let base = ["measure", "--model", "tiny", "--batch", "1", "--seq", "8"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    fails_with(&with(&["--lora", "r=0"]), "rank must be at least 1", None);
    fails_with(&with(&["--lora", "r=4,alpha=0"]), "alpha", None);
    fails_with(
        &with(&["--lora", "targets=q_proj,embed"]),
        "unknown target",
        None,
    );
    fails_with(&with(&["--lora", "dropout=1.5"]), "dropout", None);
    fails_with(
        &with(&["--method", "qlora", "--dtype", "f64"]),
        "f32, bf16, f16",
        None,
    );
    fails_with(
        &with(&["--method", "full", "--quant", "nf4"]),
        "qlora",
        None,
    );
    fails_with(
        &with(&["--method", "full", "--lora", "r=4"]),
        "needs --method lora",
        None,
    );
    fails_with(
        &with(&["--method", "dora"]),
        "expected full, lora or qlora",
        None,
    );
    fails_with(
        &with(&["--quant", "int3"]),
        "expected none, nf4 or nf4-dq",
        None,
    );
    fails_with(&with(&["--checkpointing", "every:0"]), "at least 1", None);
    fails_with(
        &with(&["--checkpointing", "every:3"]),
        "between 1 and the layer count (2)",
        None,
    );
    fails_with(
        &with(&["--checkpointing", "sometimes"]),
        "expected none, layers or every:K",
        None,
    );
    fails_with(&with(&["--accumulate", "0"]), "--accumulate", None);
    fails_with(
        &with(&["--save", "everything"]),
        "expected none, adapter or merged",
        None,
    );
}

#[test]
fn sweep_over_methods_and_checkpointing_records_every_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("peft.csv");
    let saves = dir.path().join("saved");
    vramcal()
        .args([
            "sweep",
            "--model",
            "tiny",
            "--method",
            "full,lora,qlora",
            "--lora",
            "r=4,alpha=8,targets=q_proj,v_proj",
        ])
        .args([
            "--checkpointing",
            "none,layers",
            "--batch",
            "2",
            "--seq",
            "16",
            "--save",
            "adapter",
        ])
        .args([
            "--out",
            csv.to_str().unwrap(),
            "--save-dir",
            saves.to_str().unwrap(),
        ])
        .assert()
        .success();
    let r = rows(&csv);
    assert_eq!(r.len(), 6);
    let header = csv::Reader::from_path(&csv)
        .unwrap()
        .headers()
        .unwrap()
        .clone();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let get = |i: usize, name: &str| r[i][col(name)].to_string();
    let methods: Vec<String> = (0..6)
        .map(|i| format!("{}/{}", get(i, "method"), get(i, "checkpointing")))
        .collect();
    assert_eq!(
        methods,
        [
            "full/none",
            "full/layers",
            "lora/none",
            "lora/layers",
            "qlora/none",
            "qlora/layers"
        ]
    );
    for i in 0..6 {
        assert_eq!(get(i, "status"), "ok");
        assert!(get(i, "save_peak_bytes").parse::<u64>().unwrap() > 0);
        assert!(get(i, "saved_file_bytes").parse::<u64>().unwrap() > 0);
    }
    assert_eq!(get(0, "trainable_params"), "21664");
    assert_eq!(get(0, "lora_r"), "");
    assert_eq!(
        get(2, "trainable_params"),
        (2 * (4 * (32 + 32) + 4 * (32 + 16))).to_string()
    );
    assert_eq!(get(2, "lora_targets"), "q_proj;v_proj");
    assert_eq!(get(4, "quant"), "nf4");
    // The saved adapter of point 3 (lora/none) is a PEFT adapter; point 1 (full) a model.
    assert!(saves.join("point-3/adapter_model.safetensors").is_file());
    assert!(saves.join("point-3/adapter_config.json").is_file());
    assert!(saves.join("point-1/model.safetensors").is_file());
    // QLoRA's base weights are smaller than LoRA's.
    assert!(
        get(4, "param_bytes").parse::<u64>().unwrap()
            < get(2, "param_bytes").parse::<u64>().unwrap()
    );
}

/// Findings of a new-user trial: each must stay fixed.
#[test]
fn new_user_findings_stay_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("keep.csv");
    let c = csv.to_str().unwrap();
    vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--out", c, "--quiet",
        ])
        .assert()
        .success();
    let keep = Some(csv.as_path());

    // Optimizer settings are rejected before anything runs; negative numbers are values.
    for (opt, v, needle) in [
        ("--lr", "-1", "--lr"),
        ("--lr", "NaN", "--lr"),
        ("--weight-decay", "-5", "--weight-decay"),
    ] {
        fails_with(
            &[
                "measure", "--model", "tiny", "--batch", "1", "--seq", "4", opt, v, "--out", c,
            ],
            needle,
            keep,
        );
    }
    let out = vramcal()
        .args(["measure", "--model", "tiny", "--batch", "-1", "--seq", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value '-1'"));

    // A rejected device creates no output folder.
    let deep = dir.path().join("new/sub/x.csv");
    fails_with(
        &[
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--device",
            "gpu",
            "--out",
            deep.to_str().unwrap(),
        ],
        "expected `cpu`",
        None,
    );
    assert!(!dir.path().join("new").exists());

    // A missing config path is reported as a missing file, once.
    let out = vramcal()
        .args([
            "measure",
            "--model",
            "./nope/config.json",
            "--batch",
            "1",
            "--seq",
            "4",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("./nope/config.json") && err.contains("not found"),
        "{err}"
    );
    assert_eq!(err.matches("not found").count(), 1, "{err}");

    // Rows are never glued onto a last line without a newline.
    let mut bytes = std::fs::read(&csv).unwrap();
    bytes.pop();
    std::fs::write(&csv, &bytes).unwrap();
    vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--out", c, "--quiet",
        ])
        .assert()
        .success();
    let r = rows(&csv);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|x| x.len() == r[0].len()));

    // Devices can be outputs.
    vramcal()
        .args([
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--out",
            "/dev/null",
            "--quiet",
        ])
        .assert()
        .success();

    // Weights with tensors the config does not describe are refused.
    let cfg = vramcal::config::preset("tiny").unwrap().config;
    let m = vramcal::model::Decoder::new(
        &cfg,
        &mut vramcal::weights::RandomWeights::new(0),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut map: std::collections::HashMap<String, candle_core::Tensor> = m
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    map.insert(
        "model.layers.2.input_layernorm.weight".into(),
        candle_core::Tensor::ones(32, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let st = dir.path().join("extra.safetensors");
    candle_core::safetensors::save(&map, &st).unwrap();
    fails_with(
        &[
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--weights",
            st.to_str().unwrap(),
            "--out",
            c,
        ],
        "model.layers.2.input_layernorm.weight",
        keep,
    );

    // A sweep point that cannot fit is rejected before any point runs.
    fails_with(
        &[
            "sweep",
            "--model",
            "tiny",
            "--batch",
            "1,1000000000",
            "--seq",
            "64",
            "--out",
            c,
        ],
        "more than this machine",
        keep,
    );
}

#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::{Command as Std, Stdio};
    for args in [
        vec!["models", "--json"],
        vec!["measure", "--model", "tiny", "--batch", "1", "--seq", "4"],
    ] {
        let mut child = Std::new(assert_cmd::cargo::cargo_bin("vramcal"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader goes away before anything is written
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn the_table_reports_the_steady_state_step() {
    vramcal()
        .args(["measure", "--model", "tiny", "--batch", "1", "--seq", "8"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("step 2: ").and(predicate::str::contains("tokens/s, loss")),
        );
}

#[test]
fn timed_steps_are_counted_after_step_two() {
    let out = vramcal()
        .args([
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "8",
            "--timed-steps",
            "2",
            "--json",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["timed_steps"], 2);
    let median = row["step_seconds_median"].as_f64().unwrap();
    let tps = row["tokens_per_second"].as_f64().unwrap();
    assert!((tps - 8.0 / median).abs() < 1e-9 * tps);
}

/// Findings of a second new-user trial: each must stay fixed.
#[test]
fn second_trial_findings_stay_fixed() {
    let m = |extra: &[&str]| -> Vec<String> {
        ["measure", "--model", "tiny", "--batch", "1", "--seq", "8"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    fails_with(&m(&["--lora", "r=8,r=4"]), "r is given twice", None);
    fails_with(&m(&["--lora", ",,,"]), "is empty", None);
    fails_with(
        &m(&["--method", "qlora", "--quant", "none"]),
        "conflicts with --method qlora",
        None,
    );
    fails_with(&m(&["--double-quant"]), "goes with a 4-bit base", None);
    fails_with(
        &m(&["--save-dir", "/tmp/vramcal-never"]),
        "needs --save",
        None,
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    fails_with(
        &m(&[
            "--save",
            "adapter",
            "--save-dir",
            f.path().to_str().unwrap(),
        ]),
        "is not a folder",
        None,
    );
    fails_with(
        &[
            "max", "--model", "tiny", "--axis", "seq", "--seq", "8", "--budget", "4MiB",
        ],
        "is what --axis seq searches",
        None,
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "tiny",
            "--seq",
            "8",
            "--budget",
            "1GiB",
            "--gpu",
            "a100-80gb",
        ],
        "either --gpu or --budget",
        None,
    );
    fails_with(
        &[
            "estimate",
            "--model",
            "tiny",
            "--seq",
            "8",
            "--weights",
            "README.md",
        ],
        "reads no weights",
        None,
    );
    fails_with(
        &[
            "check",
            "--measured",
            "results/cpu/smollm2-135m.csv",
            "--max-error=nan",
        ],
        "must be a fraction between 0 and 1",
        None,
    );
    fails_with(
        &[
            "plan",
            "--model",
            "tiny",
            "--seq",
            "8",
            "--examples",
            "2305843009213693952",
        ],
        "overflows",
        None,
    );
    fails_with(
        &[
            "sweep",
            "--model",
            "tiny",
            "--method",
            "full",
            "--lora",
            "r=4",
            "--batch",
            "1",
            "--seq",
            "8",
            "--out",
            "/tmp/vramcal-never.csv",
        ],
        "needs a lora or qlora method",
        None,
    );
    // The estimate reports the optimizer step's items when the peak is there, and they add up.
    let out = vramcal()
        .args(["estimate", "--model", "tiny", "--seq", "8", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The default answers for PyTorch + transformers (SDPA), and says so.
    assert_eq!(v["estimate"]["profile"], "torch-sdpa");
    assert_eq!(v["profile"], "torch-sdpa");
    assert_eq!(v["seq"], 8);
    let items: u64 = v["estimate"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["bytes"].as_u64().unwrap())
        .sum();
    let peak = v["estimate"]["peak_bytes"].as_u64().unwrap();
    assert!(items.abs_diff(peak) <= 8, "items {items} vs peak {peak}");
    // Accumulation keeps the summed gradients alive in vramcal's step: its estimate grows
    // with it.
    let est = |acc: &str| -> u64 {
        let o = vramcal()
            .args([
                "estimate",
                "--profile",
                "candle",
                "--model",
                "smollm2-135m",
                "--seq",
                "64",
                "--accumulate",
                acc,
                "--json",
            ])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["estimate"]["peak_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(est("2") > est("1"));
}

#[test]
fn a_measurement_respects_a_sweeps_lock() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("locked.csv");
    let lock = std::fs::File::create(format!("{}.lock", out.display())).unwrap();
    lock.try_lock().unwrap();
    fails_with(
        &[
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "8",
            "--out",
            out.to_str().unwrap(),
        ],
        "another vramcal sweep",
        None,
    );
}

/// Findings of the third new-user trial (the lean model's options, old result rows).
#[test]
fn third_trial_findings_stay_fixed() {
    let m = |extra: &[&str]| -> Vec<String> {
        ["measure", "--model", "tiny", "--batch", "1", "--seq", "4"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    // An empty or unknown --attention is an error, not sdpa.
    fails_with(&m(&["--attention", ""]), "expected sdpa or eager", None);
    fails_with(
        &m(&["--attention", "flash"]),
        "expected sdpa or eager",
        None,
    );
    // One spelling per GPU index.
    for d in ["cuda:00", "cuda:+1", "cuda:99999"] {
        fails_with(&m(&["--device", d]), "expected `cpu`", None);
    }
    // Rows written before the attention column existed (another model) are not used silently.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.csv");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/cpu/smollm2-135m.csv");
    let mut r = csv::Reader::from_path(src).unwrap();
    let header = r.headers().unwrap().clone();
    let a = header.iter().position(|c| c == "attention").unwrap();
    let mut w = csv::Writer::from_path(&old).unwrap();
    w.write_record(&header).unwrap();
    for rec in r.records() {
        let rec = rec.unwrap();
        let f: Vec<&str> = rec
            .iter()
            .enumerate()
            .map(|(i, v)| if i == a { "" } else { v })
            .collect();
        w.write_record(&f).unwrap();
    }
    drop(w);
    fails_with(
        &["check", "--measured", old.to_str().unwrap()],
        "written before vramcal recorded the attention mode",
        Some(&old),
    );
}

#[test]
fn fourth_trial_findings_stay_fixed() {
    // Values the argument parser refuses: one line on stderr (no blank line, usage or tip), as
    // every other error, and a non-zero exit.
    for bad in [
        &["--batch", "-1"][..],
        &["--batch", "1.5"],
        &["--batch", "1,2"],
        &["--nosuch"],
    ] {
        let out = vramcal()
            .args(["measure", "--model", "tiny", "--seq", "4"])
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?} succeeded");
        let line = common::stderr_line(&out);
        assert!(line.starts_with("error: "), "{bad:?}: {line}");
    }
    // --help still prints whole, on stdout.
    vramcal()
        .args(["measure", "--help"])
        .assert()
        .success()
        .stdout(predicates::str::contains("--batch"));
    // A LoRA rank too large for the machine is named as the cause.
    fails_with(
        &[
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--lora",
            "r=99999999999",
        ],
        "LoRA r=99999999999",
        None,
    );
    // A config with a hundred million layers is refused at once, not built until memory runs
    // out.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    let tiny = vramcal::config::preset("tiny").unwrap().config;
    let mut json = serde_json::to_value(&tiny).unwrap();
    json["num_hidden_layers"] = serde_json::json!(100_000_000u64);
    json["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    std::fs::write(&cfg, json.to_string()).unwrap();
    for verb in ["measure", "estimate"] {
        fails_with(
            &[
                verb,
                "--model",
                cfg.to_str().unwrap(),
                "--batch",
                "1",
                "--seq",
                "4",
            ],
            "num_hidden_layers = 100000000",
            None,
        );
    }
}
