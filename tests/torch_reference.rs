//! `scripts/torch_reference.py`'s exact count of PyTorch's CPU tensor bytes
//! (`--count-cpu-memory`): its self-test on tensors of known size, and a real step of `tiny`
//! whose load and training peaks it must bound by the parameter bytes. Needs a Python with
//! torch and transformers in `VRAMCAL_TORCH_PYTHON` (as `benches/vs_torch.rs` does); skipped
//! without one.

use std::path::Path;
use std::process::Command;

fn python() -> Option<String> {
    let p = std::env::var("VRAMCAL_TORCH_PYTHON")
        .ok()
        .filter(|p| !p.is_empty());
    if p.is_none() {
        eprintln!("SKIPPED: set VRAMCAL_TORCH_PYTHON to a Python with torch and transformers");
    }
    p
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torch_reference.py")
}

/// The reference script under `py`, pointed at this build's vramcal, for preset `tiny`.
fn tiny(py: &str) -> Command {
    let mut c = Command::new(py);
    c.arg(script()).args([
        "--vramcal",
        env!("CARGO_BIN_EXE_vramcal"),
        "--model",
        "tiny",
    ]);
    c
}

/// The count adds up on tensors whose bytes are known (4000 B, 2000 B, 30 B and a 64 × 64
/// product with its two operands), phase by phase.
#[test]
fn the_cpu_count_adds_up_on_known_tensors() {
    let Some(py) = python() else { return };
    let out = Command::new(py)
        .arg(script())
        .arg("--self-test")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("(51182, {'a': 6000, 'b': 51182}, 0, 0)"),
        "{text}"
    );
}

/// A full fine-tuning step of `tiny` in f32: the load phase holds the parameters (4 bytes each)
/// and the rotary buffers, and the peak at least weights, gradients and two AdamW states. The
/// same point with PEFT's LoRA (r 4 on q_proj, v_proj; when PEFT is installed) needs less.
#[test]
fn a_real_step_is_counted_from_its_parameters_up() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("torch.csv");
    let st = tiny(&py)
        .args([
            "--batch", "1", "--seq", "16", "--dtype", "f32", "--device", "cpu",
        ])
        .args([
            "--count-cpu-memory",
            "--threads",
            "1",
            "--method",
            "full,lora",
        ])
        .args([
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-targets",
            "q_proj,v_proj",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let mut r = csv::Reader::from_path(&out).unwrap();
    let rows: Vec<std::collections::HashMap<String, String>> =
        r.deserialize().map(Result::unwrap).collect();
    let row = &rows[0];
    assert_eq!(row["status"], "ok");
    assert_eq!(row["counter"], "allocated");
    let n = vramcal::config::preset("tiny")
        .unwrap()
        .config
        .param_count();
    let load: u64 = row["load_peak_bytes"].parse().unwrap();
    let peak: u64 = row["peak_bytes"].parse().unwrap();
    assert!(
        (4 * n..4 * n + 1024).contains(&load),
        "load {load} B for {n} f32 parameters"
    );
    assert!(
        peak >= 16 * n,
        "peak {peak} B below weights, gradients and states"
    );
    assert!(!row["notes"].contains("WARNING"), "{}", row["notes"]);
    let lora = &rows[1];
    if lora["status"] == "error" && lora["notes"].contains("need PEFT") {
        eprintln!("SKIPPED the LoRA row: {}", lora["notes"]);
        return;
    }
    assert_eq!(lora["status"], "ok", "{}", lora["notes"]);
    assert!(!lora["peft_version"].is_empty());
    let lora_peak: u64 = lora["peak_bytes"].parse().unwrap();
    assert!(lora_peak < peak, "LoRA {lora_peak} B, full {peak} B");
}

/// A grid value outside the script's vocabulary (an optimizer, a precision recipe, a LoRA
/// target) is refused with one line before anything runs, and no file is written.
#[test]
fn the_script_refuses_values_outside_its_vocabulary() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never-made.csv");
    for (flag, value) in [
        ("--optimizer", "adamw"),
        ("--precision", "mixed"),
        ("--lora-targets", "q,v"),
        ("--checkpointing", "sometimes"),
    ] {
        let st = tiny(&py)
            .args(["--device", "cpu", "--method", "lora", flag, value, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&st.stderr);
        assert!(!st.status.success(), "{flag} {value} accepted");
        assert!(
            err.trim().lines().count() == 1 && err.starts_with("error: ") && err.contains(value),
            "{flag} {value}: {err}"
        );
        assert!(!out.exists(), "{flag} {value} wrote {}", out.display());
    }
}
