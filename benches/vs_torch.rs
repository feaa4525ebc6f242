//! The training step of smollm2-135m (f32, AdamW, random weights) at batch 1 × seq 256,
//! 2 × 512 and 1 × 2048, per phase, beside the same step in PyTorch + transformers on the same machine: the
//! ratios that issue "Lean and fast training step" targets (step time ≤ 1.0×, forward
//! activations ≤ 1.1× PyTorch-SDPA's).
//!
//! Run: `cargo bench --bench vs_torch` (vramcal only, about 7 minutes on 2 cores), or with
//! `VRAMCAL_TORCH_PYTHON=/path/to/python` (a Python with torch and transformers) to run
//! `scripts/torch_reference.py` on the same points and print the ratios (about 10 more
//! minutes). Run it on an otherwise idle machine: both sides use every core.
//!
//! With `VRAMCAL_VS_TORCH_OUT=<file.csv>` the figures are also appended to that CSV, one row per
//! side and point, with the time, host, CPU (model name, family/model, and the SIMD level
//! candle's matmuls run: `avx512` or `avx2`), version and command (`results/bench/` holds the
//! runs docs/results.md quotes).
//!
//! vramcal's forward activations are the allocated bytes that step 2's forward adds (end of
//! forward minus end of step 1); PyTorch's are the bytes of the tensors autograd saves for
//! backward, parameters left out (`saved_tensors_hooks`). Step time is the median of step 2
//! and three more steps on both sides.

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use vramcal::config::resolve_model;
use vramcal::measure::{measure_with, HostProbe, Measurement, Options, Setup};
use vramcal::measure::{step::median_step_seconds, CountingAlloc};
use vramcal::spec::TrainSpec;
use vramcal::spec::WeightsSpec;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const POINTS: [(usize, usize); 3] = [(1, 256), (2, 512), (1, 2048)];
const TIMED_STEPS: usize = 3;

/// PyTorch's figures for one point: step seconds (median), forward, backward and optimizer
/// seconds of step 2, saved activation bytes, and the reference's `source` (script and torch
/// version).
struct Torch {
    step: f64,
    phases: [f64; 3],
    saved_bytes: f64,
    source: String,
}

/// One row of the optional CSV (`VRAMCAL_VS_TORCH_OUT`).
#[derive(serde::Serialize)]
struct OutRow<'a> {
    utc_time: &'a str,
    host: &'a str,
    cpu: &'a str,
    tool_version: &'a str,
    command: &'a str,
    device: &'a str,
    model: &'a str,
    dtype: &'a str,
    batch: usize,
    seq: usize,
    side: &'a str,
    source: String,
    step_seconds_median: f64,
    step2_forward_seconds: f64,
    step2_backward_seconds: f64,
    step2_optimizer_step_seconds: f64,
    forward_activation_bytes: u64,
    peak_bytes: Option<u64>,
}

/// Appends `rows` to `path` (header first when the file is new or empty).
fn append(path: &str, rows: &[OutRow]) {
    let fresh = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("VRAMCAL_VS_TORCH_OUT={path}: {e}"));
    let mut w = csv::WriterBuilder::new()
        .has_headers(fresh)
        .from_writer(file);
    for r in rows {
        w.serialize(r).expect("CSV row");
    }
    w.flush().expect("CSV flush");
}

/// The CPU this runs on, from `/proc/cpuinfo` (Linux): model name, family and model, and
/// the SIMD level of candle's matmuls here (`avx512` with the crate's `avx512` feature on a CPU
/// with AVX-512F, else `avx2`; vramcal's own attention kernel runs AVX2 on both).
fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|n| n.trim() == k))
            .and_then(|l| l.split_once(':'))
            .map_or(String::new(), |(_, v)| v.trim().to_string())
    };
    let avx512 = field("flags").split_whitespace().any(|f| f == "avx512f");
    let simd = if avx512 && cfg!(feature = "avx512") {
        "avx512"
    } else {
        "avx2"
    };
    format!(
        "{} (family {} model {}; {} threads; matmul {simd})",
        field("model name"),
        field("cpu family"),
        field("model"),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}

fn torch(python: &str, batch: usize, seq: usize) -> Option<Torch> {
    let dir = tempfile::tempdir().ok()?;
    let out = dir.path().join("torch.csv");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torch_reference.py");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let st = Command::new(python)
        .arg(script)
        .args([
            "--vramcal",
            env!("CARGO_BIN_EXE_vramcal"),
            "--model",
            "smollm2-135m",
        ])
        .args(["--batch", &batch.to_string(), "--seq", &seq.to_string()])
        .args(["--dtype", "f32", "--device", "cpu", "--attn", "sdpa"])
        .args(["--threads", &threads.to_string()])
        .args(["--timed-steps", &TIMED_STEPS.to_string(), "--out"])
        .arg(&out)
        .status()
        .ok()?;
    if !st.success() {
        eprintln!("torch_reference.py failed ({st})");
        return None;
    }
    let mut r = csv::Reader::from_path(&out).ok()?;
    let h = r.headers().ok()?.clone();
    let rec = r.records().next()?.ok()?;
    let get = |k: &str| -> Option<f64> {
        let i = h.iter().position(|c| c == k)?;
        rec.get(i)?.parse().ok()
    };
    let source = h
        .iter()
        .position(|c| c == "source")
        .and_then(|i| rec.get(i))
        .unwrap_or("scripts/torch_reference.py")
        .to_string();
    Some(Torch {
        step: get("step_seconds_median")?,
        phases: [
            get("forward_seconds")?,
            get("backward_seconds")?,
            get("optimizer_seconds")?,
        ],
        saved_bytes: get("saved_activation_bytes")?,
        source,
    })
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported here.
    vramcal::measure::alloc::tune_host_allocator(); // as the vramcal binary does
    let python = std::env::var("VRAMCAL_TORCH_PYTHON").ok();
    let probe = HostProbe::new().expect("the counting allocator is installed");
    let out = std::env::var("VRAMCAL_VS_TORCH_OUT").ok();
    let time = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let cpu = cpu();
    println!("CPU: {cpu}");
    let command = format!(
        "{}VRAMCAL_VS_TORCH_OUT={} cargo bench --bench vs_torch",
        if python.is_some() {
            "VRAMCAL_TORCH_PYTHON=<python> "
        } else {
            ""
        },
        out.as_deref().unwrap_or("")
    );
    let row = |batch, seq, side, source: &str, t: [f64; 4], act: f64, peak| OutRow {
        utc_time: &time,
        host: &host,
        cpu: &cpu,
        tool_version: env!("CARGO_PKG_VERSION"),
        command: &command,
        device: "cpu",
        model: "smollm2-135m",
        dtype: "f32",
        batch,
        seq,
        side,
        source: source.to_string(),
        step_seconds_median: t[0],
        step2_forward_seconds: t[1],
        step2_backward_seconds: t[2],
        step2_optimizer_step_seconds: t[3],
        forward_activation_bytes: act as u64,
        peak_bytes: peak,
    };
    println!(
        "| batch × seq | side | step s (median) | forward s | backward s | optimizer s | forward activations bytes | peak bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (batch, seq) in POINTS {
        let setup = Setup {
            model: resolve_model("smollm2-135m").unwrap(),
            weights: WeightsSpec::Random { seed: 0 },
            spec: TrainSpec::new(batch, seq),
            device: Device::Cpu,
            sharding: None,
        };
        let mut m = Measurement::default();
        measure_with(
            &setup,
            &probe,
            &mut m,
            Options {
                timed_steps: TIMED_STEPS,
                ..Options::default()
            },
        )
        .expect("the step runs");
        let ph = |n: &str| m.phase(n).expect("phase measured");
        let step = median_step_seconds(&m).unwrap();
        let secs = [
            ph("step2_forward").seconds,
            ph("step2_backward").seconds,
            ph("step2_optimizer_step").seconds,
        ];
        let act = ph("step2_forward").end_allocated_bytes as f64
            - ph("step1_optimizer_step").end_allocated_bytes as f64;
        let peak = m.peak().unwrap().1;
        println!(
            "| {batch} × {seq} | vramcal (candle) | {step:.3} | {:.3} | {:.3} | {:.3} | {act:.0} | {peak} |",
            secs[0], secs[1], secs[2]
        );
        let mine = row(
            batch,
            seq,
            "vramcal",
            "benches/vs_torch.rs",
            [step, secs[0], secs[1], secs[2]],
            act,
            Some(peak),
        );
        let t = python.as_deref().and_then(|p| torch(p, batch, seq));
        if let Some(path) = &out {
            let mut rows = vec![mine];
            if let Some(t) = &t {
                rows.push(row(
                    batch,
                    seq,
                    "pytorch-sdpa",
                    &t.source,
                    [t.step, t.phases[0], t.phases[1], t.phases[2]],
                    t.saved_bytes,
                    None,
                ));
            }
            append(path, &rows);
        }
        if let Some(t) = t {
            println!(
                "| {batch} × {seq} | PyTorch SDPA | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | |",
                t.step, t.phases[0], t.phases[1], t.phases[2], t.saved_bytes
            );
            println!(
                "| {batch} × {seq} | ratio vramcal / PyTorch | **{:.2}** | {:.2} | {:.2} | {:.2} | **{:.2}** | |",
                step / t.step,
                secs[0] / t.phases[0],
                secs[1] / t.phases[1],
                secs[2] / t.phases[2],
                act / t.saved_bytes
            );
        }
    }
}
