//! Wall time of a standard small grid: `vramcal sweep --model tiny --batch 1,2 --seq 16,32`
//! (4 points, each in its own child process), which measures the sweep's own overhead
//! (process start, weight build, CSV append) rather than the model.
//!
//! Run: `cargo bench --bench sweep_grid`.

use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("grid.csv");
    let mut g = c.benchmark_group("sweep_tiny_2x2");
    g.sample_size(10);
    g.bench_function("wall_time", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&out);
            let st = Command::new(env!("CARGO_BIN_EXE_vramcal"))
                .args([
                    "sweep", "--model", "tiny", "--batch", "1,2", "--seq", "16,32", "--out",
                ])
                .arg(&out)
                .output()
                .expect("vramcal runs");
            assert!(st.status.success());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
