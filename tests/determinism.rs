//! Peaks reproduce to the byte: the same point measured again in a fresh process gives the same
//! `peak_bytes` and the same peak of every phase, whatever thread first runs a matmul, and a
//! `--budget` the point stays under changes nothing; `max` answers the same every time.
//!
//! This exercises whichever CPU matmul kernels this machine runs (AVX2, or AVX-512 in a default
//! build on a CPU that has it); `cargo test --no-default-features` forces the AVX2 kernels on an
//! AVX-512 machine.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vramcal"))
}

/// Measures `tiny` at 8 × 32 (256 tokens: its matmuls are large enough for gemm to spread
/// them over threads, which is where the per-thread buffers came from) with `extra` options; returns every `*_peak_bytes` column and
/// `peak_bytes`, in column order.
fn peaks(extra: &[&str]) -> Vec<(String, u64)> {
    let out = bin()
        .args([
            "measure", "--model", "tiny", "--batch", "8", "--seq", "32", "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let obj = v.as_object().unwrap();
    let p: Vec<(String, u64)> = obj
        .iter()
        .filter(|(k, _)| k.ends_with("peak_bytes") && !k.contains("reserved"))
        .filter_map(|(k, v)| v.as_u64().map(|b| (k.clone(), b)))
        .collect();
    assert!(p.len() >= 9, "{extra:?}: peaks {p:?}");
    p
}

const SETUPS: [&[&str]; 6] = [
    &["--method", "full"],
    &["--method", "lora", "--lora", "targets=all-linear"],
    &["--method", "qlora"],
    &["--method", "full", "--checkpointing", "layers"],
    &["--method", "lora", "--checkpointing", "layers"],
    &["--method", "qlora", "--checkpointing", "every:1"],
];

/// Ten fresh processes per setup, f32 and bf16: identical peaks, phase by phase; then the same
/// point with a budget of exactly its peak, and of its peak plus 4 MiB: still identical.
#[test]
fn peaks_reproduce_to_the_byte() {
    for dtype in ["f32", "bf16"] {
        for setup in SETUPS {
            let mut args: Vec<&str> = setup.to_vec();
            args.extend(["--dtype", dtype]);
            let first = peaks(&args);
            for run in 1..10 {
                assert_eq!(
                    peaks(&args),
                    first,
                    "{args:?}: run {run} differs from run 0"
                );
            }
            let peak = first
                .iter()
                .find(|(k, _)| k == "peak_bytes")
                .map(|(_, b)| *b)
                .unwrap();
            for budget in [peak, peak + (4 << 20)] {
                let b = format!("{budget}B");
                let mut with = args.clone();
                with.extend(["--budget", &b]);
                assert_eq!(
                    peaks(&with),
                    first,
                    "{args:?}: --budget {budget} (peak {peak}) changed what was measured"
                );
            }
        }
    }
}

/// `max` finds the same boundary every time.
#[test]
fn max_is_deterministic() {
    let answer = || {
        let out = bin()
            .args([
                "max", "--model", "tiny", "--seq", "32", "--budget", "3MiB", "--limit", "64",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = answer();
    for _ in 0..9 {
        assert_eq!(answer(), first);
    }
}
