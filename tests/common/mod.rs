//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of the real SmolLM2-135M GGUF fetched by `scripts/fetch-smollm2.sh`, or `None` when it
/// is absent and this is not CI. Under CI (`CI` set) a missing file is a test failure: the
/// real-model tests must run there.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = std::env::var_os("VRAMCAL_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("VRAMCAL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/vramcal")
                });
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} is missing: run scripts/fetch-smollm2.sh (CI must test the real model)",
            p.display()
        );
    }
    eprintln!(
        "SKIPPED: {} not found; run scripts/fetch-smollm2.sh",
        p.display()
    );
    None
}

/// The one line a failed command printed on stderr (asserts there is exactly one).
pub fn stderr_line(out: &std::process::Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "one error line, got: {e}");
    e
}

/// The committed PyTorch CPU reference files (`results/torch-cpu/*.csv`, made by
/// `scripts/torch-cpu-grid.sh`), relative to the repository root, sorted.
pub fn torch_cpu_files() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut v: Vec<String> = std::fs::read_dir(root.join("results/torch-cpu"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
