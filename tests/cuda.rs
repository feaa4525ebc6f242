//! CUDA: compiled with `--features cuda` everywhere; the tests that need a GPU skip at run time
//! with a message when the driver sees none (CI, or a build machine running against the stub
//! libraries of `scripts/cuda-stubs.py`).
#![cfg(feature = "cuda")]

mod common;

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use vramcal::config::preset;
use vramcal::model::Decoder;
use vramcal::report::Row;
use vramcal::weights::{RandomWeights, WeightSource};

use common::stderr_line;

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

/// Deterministic values in [-1, 1) (the tests must not depend on an RNG's device).
fn values(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A fused op under test: inputs (moved to the device and dtype, tracking gradients) → output.
type Op = Box<dyn Fn(&[Tensor], &Device, DType) -> Tensor>;

/// Output and the gradients of `sum(op(inputs) · r)` to every input, as f32 on the CPU.
fn run(op: &Op, inputs: &[Tensor], dev: &Device, dt: DType) -> (Tensor, Vec<Tensor>) {
    use candle_core::Var;
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&ts, dev, dt);
    let r = values(out.dims(), 99).to_device(dev).unwrap();
    let loss = (out.to_dtype(DType::F32).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap();
    let store = loss.backward().unwrap();
    let host = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let grads = vars
        .iter()
        .map(|v| host(store.get(v).expect("a gradient for every input")))
        .collect();
    (host(&out), grads)
}

/// max |a − b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let m = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let num = m((a - b).unwrap()).to_scalar::<f32>().unwrap();
    let den = m(b.clone()).to_scalar::<f32>().unwrap().max(1e-30);
    num / den
}

/// The kernels of `kernels/fused.cu` (which the fused ops use on a CUDA device in f32 and bf16)
/// against the CPU's candle operations: outputs and every input gradient, in both dtypes.
#[test]
fn kernels_match_the_cpu() {
    if skip("kernels_match_the_cpu") {
        return;
    }
    use vramcal::ops;
    let gpu = Device::new_cuda(0).unwrap();
    // Sizes not multiples of the kernels' 256 threads, and rows longer than a block, so every
    // strided loop runs more than once.
    let (b, nh, nkv, s, hd) = (2, 4, 2, 261, 16);
    // Rotation tables (1, 1, s, hd) in the op's dtype, rotate_half layout: made on the CPU and
    // moved, so both devices see the same table.
    let tables = move |dev: &Device, dt: DType| {
        let ang: Vec<f32> = (0..s)
            .flat_map(|p| (0..hd).map(move |i| p as f32 * 0.3f32.powi((i % (hd / 2)) as i32)))
            .collect();
        let a = Tensor::from_vec(ang, (1, 1, s, hd), &Device::Cpu).unwrap();
        let t = |x: Tensor| x.to_dtype(dt).unwrap().to_device(dev).unwrap();
        (t(a.cos().unwrap()), t(a.sin().unwrap()))
    };
    let causal = move |dev: &Device| {
        let m: Vec<f32> = (0..s * s)
            .map(|i| {
                if i % s > i / s {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(m, (1, 1, s, s), dev).unwrap()
    };
    let vocab = 1003u32;
    let targets: Vec<u32> = (0..300u32).map(|i| (i * 617 + 3) % vocab).collect();
    // q (b, heads, s, hd), k and v (b, kv_heads, s, hd), from three seeds.
    let qkv = |seed: u64| {
        vec![
            values(&[b, nh, s, hd], seed),
            values(&[b, nkv, s, hd], seed + 1),
            values(&[b, nkv, s, hd], seed + 2),
        ]
    };
    let cases: Vec<(&str, Vec<Tensor>, Op)> = vec![
        (
            "rms_norm",
            vec![values(&[3, 5, 64], 1), values(&[64], 2)],
            Box::new(|t, _, _| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap()),
        ),
        (
            "rms_norm, wide rows",
            vec![values(&[7, 1000], 14), values(&[1000], 15)],
            Box::new(|t, _, _| ops::rms_norm(&t[0], &t[1], 1e-6).unwrap()),
        ),
        (
            "swiglu",
            vec![values(&[4, 333], 3), values(&[4, 333], 4)],
            Box::new(|t, _, _| ops::swiglu(&t[0], &t[1]).unwrap()),
        ),
        (
            "rope (strided input)",
            vec![values(&[b, s, nh, hd], 5)],
            Box::new(move |t, dev, dt| {
                let (c, si) = tables(dev, dt);
                ops::rope(&t[0].transpose(1, 2).unwrap(), &c, &si).unwrap()
            }),
        ),
        (
            "attention",
            qkv(6),
            Box::new(move |t, dev, _| {
                ops::attention(&t[0], &t[1], &t[2], &causal(dev), 0.3, false).unwrap()
            }),
        ),
        (
            "attention, probabilities kept",
            qkv(9),
            Box::new(move |t, dev, _| {
                ops::attention(&t[0], &t[1], &t[2], &causal(dev), 0.3, true).unwrap()
            }),
        ),
        (
            "lm head + cross-entropy (300 tokens: two chunks)",
            vec![values(&[300, 32], 12), values(&[vocab as usize, 32], 13)],
            Box::new(move |t, dev, _| {
                let tg = Tensor::new(targets.as_slice(), dev).unwrap();
                ops::lm_head_cross_entropy(&t[0], &t[1], &tg).unwrap()
            }),
        ),
    ];
    for dt in [DType::F32, DType::BF16] {
        // bf16: the same rounding points, but reductions in another order can move a value by
        // one bf16 step (2^-8 relative); gradients pass through matmuls in bf16.
        let tol = if dt == DType::F32 { 1e-4 } else { 3e-2 };
        for (name, inputs, op) in &cases {
            let (out_c, grads_c) = run(op, inputs, &Device::Cpu, dt);
            let before = ops::kernel_launches();
            let (out_g, grads_g) = run(op, inputs, &gpu, dt);
            // The GPU side ran vramcal's kernels, not candle's operations.
            assert!(
                ops::kernel_launches() > before,
                "{name} {dt:?}: the fused op did not run vramcal's kernels on the GPU"
            );
            let d = rel_diff(&out_g, &out_c);
            eprintln!("{name} {dt:?}: output {d:.2e}");
            assert!(
                d <= tol,
                "{name} {dt:?}: output differs by {d:e} (max |cpu|)"
            );
            for (i, (gg, gc)) in grads_g.iter().zip(&grads_c).enumerate() {
                let d = rel_diff(gg, gc);
                eprintln!("{name} {dt:?}: gradient {i} {d:.2e}");
                assert!(d <= tol, "{name} {dt:?}: gradient {i} differs by {d:e}");
            }
        }
    }
}
