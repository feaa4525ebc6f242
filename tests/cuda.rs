//! CUDA: compiled with `--features cuda` everywhere; the tests that need a GPU skip at run time
//! with a message when the driver sees none (CI, or a build machine running against the stub
//! libraries of `scripts/cuda-stubs.py`).
#![cfg(feature = "cuda")]

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use vramcal::config::preset;
use vramcal::model::weights::{RandomWeights, WeightSource};
use vramcal::model::Decoder;
use vramcal::report::Row;

fn gpus() -> usize {
    vramcal::measure::cuda::device_count().unwrap_or(0)
}

/// `true` (and a note) when no GPU is present.
fn skip(test: &str) -> bool {
    if gpus() == 0 {
        eprintln!("SKIPPED {test}: no CUDA device (driver or stub libraries report none)");
        return true;
    }
    false
}

fn vramcal() -> Command {
    Command::cargo_bin("vramcal").unwrap()
}

fn stderr_line(out: &std::process::Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "one error line, got: {e}");
    e
}

#[test]
fn a_machine_without_gpu_gets_one_clear_line() {
    if gpus() > 0 {
        eprintln!("SKIPPED a_machine_without_gpu_gets_one_clear_line: this machine has a GPU");
        return;
    }
    for dev in ["cuda", "cuda:0", "cuda:7"] {
        let out = vramcal()
            .args([
                "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--device", dev,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let e = stderr_line(&out);
        assert!(e.contains("no usable NVIDIA GPU"), "{e}");
        assert!(e.contains("use --device cpu"), "{e}");
    }
    // The CPU path of the same binary is unaffected.
    vramcal()
        .args([
            "measure", "--model", "tiny", "--batch", "1", "--seq", "4", "--quiet",
        ])
        .assert()
        .success();
}

#[test]
fn gpu_ordinal_beyond_the_machine_is_named() {
    if skip("gpu_ordinal_beyond_the_machine_is_named") {
        return;
    }
    let n = gpus();
    let out = vramcal()
        .args([
            "measure",
            "--model",
            "tiny",
            "--batch",
            "1",
            "--seq",
            "4",
            "--device",
            &format!("cuda:{n}"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr_line(&out);
    assert!(e.contains(&format!("has {n} CUDA device(s)")), "{e}");
}

#[test]
fn gpu_measurement_records_the_three_counters() {
    if skip("gpu_measurement_records_the_three_counters") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("gpu.csv");
    vramcal()
        .args([
            "measure",
            "--model",
            "smollm2-135m",
            "--batch",
            "2",
            "--seq",
            "256",
            "--dtype",
            "bf16",
            "--device",
            "cuda:0",
            "--quiet",
            "--out",
            csv.to_str().unwrap(),
        ])
        .assert()
        .success();
    let rows: Vec<Row> = csv::Reader::from_path(&csv)
        .unwrap()
        .deserialize()
        .collect::<Result<_, _>>()
        .unwrap();
    let r = &rows[0];
    assert!(r.device.starts_with("cuda:0 ("), "{}", r.device);
    assert_eq!(r.memory_counter, "cuda-mempool");
    let cfg = preset("smollm2-135m").unwrap().config;
    // bf16 weights: exactly 2 bytes per parameter in the pool after loading.
    assert_eq!(r.param_bytes, Some(2 * cfg.param_count()));
    assert!(r.load_end_bytes.unwrap() >= r.param_bytes.unwrap());
    let peak = r.peak_bytes.unwrap();
    // Weights + gradients + AdamW states (f32 by default) at least.
    assert!(peak >= r.param_bytes.unwrap() * 2 + 8 * cfg.param_count());
    assert!(r.peak_reserved_bytes.unwrap() >= r.step2_backward_peak_bytes.unwrap());
    // The driver's figure includes the context and cuBLAS workspaces on top of the pool.
    assert!(r.peak_device_bytes.unwrap() > r.step2_optimizer_step_end_bytes.unwrap());
    assert!(r.loss_step2.unwrap().is_finite());
}

#[test]
fn gpu_out_of_memory_is_a_row_not_a_crash() {
    if skip("gpu_out_of_memory_is_a_row_not_a_crash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("oom.csv");
    // Far beyond any single GPU: f32 weights, gradients and states of 7B alone are ~116 GB.
    let out = vramcal()
        .args([
            "measure",
            "--model",
            "mistral-7b-v0.1",
            "--batch",
            "64",
            "--seq",
            "4096",
            "--dtype",
            "f32",
            "--device",
            "cuda:0",
            "--quiet",
            "--out",
            csv.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.contains(",oom,"), "{text}");
}

#[test]
fn gpu_logits_match_the_cpu() {
    if skip("gpu_logits_match_the_cpu") {
        return;
    }
    let cfg = preset("tiny").unwrap().config;
    let gpu = Device::new_cuda(0).unwrap();
    let tokens: Vec<u32> = (0..16).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
    let mut logits = Vec::new();
    for dev in [Device::Cpu, gpu] {
        // Same weights on both: drawn on the CPU, then moved.
        let mut src = HostDrawn(RandomWeights::new(3));
        let m = Decoder::new(&cfg, &mut src, DType::F32, &dev).unwrap();
        let ids = Tensor::from_vec(tokens.clone(), (1, 16), &dev).unwrap();
        logits.push(m.forward(&ids).unwrap().to_device(&Device::Cpu).unwrap());
    }
    let diff = (&logits[0] - &logits[1])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-3, "max |cpu − gpu| = {diff}");
}

/// Random weights drawn on the host whatever the target device.
struct HostDrawn(RandomWeights);

impl WeightSource for HostDrawn {
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> vramcal::Result<Tensor> {
        Ok(self
            .0
            .tensor(name, shape, dtype, &Device::Cpu)?
            .to_device(device)?)
    }
}
