//! vramcal's other optimizers (`src/optim/`): SGD against torch's update written out in f64,
//! Adafactor's in-place CPU path against its candle-operations path, 8-bit AdamW's exact state
//! bytes and its update against f32 AdamW (and against bitsandbytes itself where a Python with
//! it is in `VRAMCAL_TORCH_PYTHON`), and fp32 master weights.

use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use vramcal::optim::{Adafactor, AdamW, AdamW8bit, Master, Optim, Sgd};
use vramcal::spec::AdamWConfig;

/// Deterministic values `sin(0.37·i + phase)·scale`, as the Python side below builds them.
fn wave(n: usize, phase: f64, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|i| ((0.37 * i as f64 + phase).sin() * scale) as f32)
        .collect()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

/// One [`wave`] tensor per shape, in `dt`.
fn waves(shapes: &[&[usize]], phase: f64, scale: f64, dt: DType) -> Vec<Tensor> {
    shapes
        .iter()
        .map(|s| {
            let n = s.iter().product();
            tensor(&wave(n, phase, scale), s).to_dtype(dt).unwrap()
        })
        .collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `torch.optim.SGD` (dampening 0, not Nesterov), written out in f64, for both paths and
/// momentum 0 and 0.9, with weight decay.
#[test]
fn sgd_follows_torch_sgd() {
    let (lr, wd) = (0.1, 0.01);
    let n = 300;
    let init = wave(n, 0.0, 1.0);
    let grads: Vec<Vec<f32>> = (0..4).map(|s| wave(n, 1.0 + s as f64, 0.5)).collect();
    for mu in [0.0, 0.9] {
        // The expected values, step by step.
        let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
        let mut buf = vec![0f64; n];
        for (step, g) in grads.iter().enumerate() {
            for j in 0..n {
                let d = g[j] as f64 + wd * p[j];
                let d = if mu > 0.0 {
                    buf[j] = if step == 0 { d } else { mu * buf[j] + d };
                    buf[j]
                } else {
                    d
                };
                p[j] -= lr * d;
            }
        }
        for in_place in [true, false] {
            let v = Var::from_tensor(&tensor(&init, &[30, 10])).unwrap();
            let mut o = Sgd::new(vec![v.clone()], lr, wd, mu, DType::F32).unwrap();
            o.in_place = in_place;
            for g in &grads {
                o.step(&[tensor(g, &[30, 10])]).unwrap();
            }
            let d = max_abs_diff(&values(v.as_tensor()), &p);
            assert!(d < 1e-5, "momentum {mu}, in place {in_place}: {d}");
            let state = if mu > 0.0 { 4 * n as u64 } else { 0 };
            assert_eq!(o.state_bytes(), state);
            assert_eq!(o.steps(), 4);
        }
    }
    let v = vec![Var::zeros(3, DType::F32, &Device::Cpu).unwrap()];
    assert!(Sgd::new(v.clone(), 0.1, 0.0, 1.0, DType::F32).is_err());
    assert!(Sgd::new(v, -0.1, 0.0, 0.0, DType::F32).is_err());
}

/// Adafactor's two implementations (loops over the CPU storage; candle operations on whole
/// tensors) agree on a matrix and a vector, in f32 and bf16; its states are a row and a
/// column vector per matrix; and the clipped update moves no parameter's RMS by more than
/// `lr` (`clip_threshold` 1).
#[test]
fn adafactor_paths_agree() {
    let lr = 1e-2;
    let shapes: [&[usize]; 2] = [&[40, 25], &[25]];
    for dt in [DType::F32, DType::BF16] {
        let init: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let n = s.iter().product();
                tensor(&wave(n, k as f64, 1.0), s).to_dtype(dt).unwrap()
            })
            .collect();
        let run = |in_place: bool| {
            let vars: Vec<Var> = init
                .iter()
                .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
                .collect();
            let mut o = Adafactor::new(vars.clone(), lr, 0.01).unwrap();
            o.in_place = in_place;
            for step in 0..3 {
                o.step(&waves(&shapes, 2.0 + step as f64, 0.3, dt)).unwrap();
            }
            assert_eq!(o.state_bytes(), 4 * (40 + 25 + 25));
            vars.iter()
                .map(|v| values(v.as_tensor()))
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(true), run(false));
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            let d = max_abs_diff(x, y);
            assert!(d < tol, "{dt:?} tensor {k}: paths differ by {d}");
            let moved = max_abs_diff(x, &values(&init[k]));
            assert!(moved > 0.0, "{dt:?} tensor {k}: no update");
            let rms = (x
                .iter()
                .zip(values(&init[k]))
                .map(|(p, q)| (p - q).powi(2))
                .sum::<f64>()
                / x.len() as f64)
                .sqrt();
            // Three clipped steps plus weight decay of ≈ lr·0.01·|p|.
            assert!(rms < 3.0 * lr * 1.05, "{dt:?} tensor {k}: rms move {rms}");
        }
    }
}

/// Adafactor against transformers' `Adafactor.step` written out in f64 (no first moment,
/// `scale_parameter=False, relative_step=False`, clip 1, eps 1e-30, decay −0.8) for a matrix
/// over three steps, both paths.
#[test]
fn adafactor_follows_transformers() {
    let (lr, wd) = (1e-2, 0.01);
    let (rows, cols) = (6usize, 5usize);
    let init = wave(rows * cols, 0.3, 1.0);
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|s| wave(rows * cols, 1.0 + s as f64, 0.4))
        .collect();
    let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
    let (mut r, mut c) = (vec![0f64; rows], vec![0f64; cols]);
    for (step, g) in grads.iter().enumerate() {
        let beta = 1.0 - ((step + 1) as f64).powf(-0.8);
        let u = |i: usize, j: usize| (g[i * cols + j] as f64).powi(2) + 1e-30;
        for (i, ri) in r.iter_mut().enumerate() {
            let m = (0..cols).map(|j| u(i, j)).sum::<f64>() / cols as f64;
            *ri = beta * *ri + (1.0 - beta) * m;
        }
        for (j, cj) in c.iter_mut().enumerate() {
            let m = (0..rows).map(|i| u(i, j)).sum::<f64>() / rows as f64;
            *cj = beta * *cj + (1.0 - beta) * m;
        }
        let rm = r.iter().sum::<f64>() / rows as f64;
        let upd: Vec<f64> = (0..rows * cols)
            .map(|k| {
                let (i, j) = (k / cols, k % cols);
                g[k] as f64 / ((r[i] / rm) * c[j]).sqrt()
            })
            .collect();
        let rms = (upd.iter().map(|x| x * x).sum::<f64>() / upd.len() as f64).sqrt();
        let scale = rms.max(1.0);
        for k in 0..p.len() {
            p[k] = p[k] - wd * lr * p[k] - lr * upd[k] / scale;
        }
    }
    for in_place in [true, false] {
        let v = Var::from_tensor(&tensor(&init, &[rows, cols])).unwrap();
        let mut o = Adafactor::new(vec![v.clone()], lr, wd).unwrap();
        o.in_place = in_place;
        for g in &grads {
            o.step(&[tensor(g, &[rows, cols])]).unwrap();
        }
        let d = max_abs_diff(&values(v.as_tensor()), &p);
        assert!(d < 1e-6, "in place {in_place}: {d}");
    }
}

/// bitsandbytes' memory, exactly: one byte per value and one f32 absmax per 256 values for
/// each moment of a tensor of at least 4096 values, f32 moments below; and the update stays
/// close to f32 AdamW's over several steps.
#[test]
fn adamw_8bit_keeps_blockwise_states_and_tracks_adamw() {
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let big = 70 * 100; // 27.3 blocks: the last one partial
    let init = [wave(big, 0.0, 1.0), wave(5, 0.5, 1.0)];
    let shapes: [&[usize]; 2] = [&[70, 100], &[5]];
    let vars = |_: ()| -> Vec<Var> {
        init.iter()
            .zip(shapes)
            .map(|(v, s)| Var::from_tensor(&tensor(v, s)).unwrap())
            .collect()
    };
    let (q, f) = (vars(()), vars(()));
    let mut a = AdamW8bit::new(q.clone(), cfg).unwrap();
    let mut b = AdamW::new(f.clone(), cfg, DType::F32).unwrap();
    assert_eq!(a.state_bytes(), 0, "states appear at the first step");
    for step in 0..5 {
        let grads = waves(&shapes, 3.0 + step as f64, 0.2, DType::F32);
        a.step(&grads).unwrap();
        b.step(&grads).unwrap();
    }
    assert_eq!(
        a.state_bytes(),
        2 * (big as u64 + 28 * 4) + 2 * 5 * 4,
        "codes + absmax per block for the matrix, f32 moments for the vector"
    );
    for (k, (x, y)) in q.iter().zip(&f).enumerate() {
        let (x, y) = (values(x.as_tensor()), values(y.as_tensor()));
        let moved = max_abs_diff(&y, &init[k].iter().map(|&v| v as f64).collect::<Vec<_>>());
        let d = max_abs_diff(&x, &y);
        // The vector has f32 moments: the same update to rounding.
        let tol = if k == 1 { 1e-6 } else { 0.05 * moved };
        assert!(
            d <= tol,
            "tensor {k}: 8-bit differs from f32 AdamW by {d} (moved {moved})"
        );
    }
    let v = vec![Var::zeros(3, DType::F32, &Device::Cpu).unwrap()];
    let bad = AdamWConfig {
        beta2: 1.0,
        ..Default::default()
    };
    assert!(AdamW8bit::new(v, bad).is_err());
}

/// 8-bit AdamW's two implementations (the CPU loop; candle operations over chunks of blocks,
/// what other devices run) agree after five steps, in f32 and bf16, with the same state bytes;
/// they round a few products differently (candle divides by multiplying with the reciprocal),
/// so a value at a midpoint may take the neighbouring code.
#[test]
fn adamw_8bit_paths_agree() {
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let big = 130 * 150; // more than one chunk of 64 blocks, the last block partial
    let shapes: [&[usize]; 2] = [&[130, 150], &[7]];
    for dt in [DType::F32, DType::BF16] {
        let run = |in_place: bool| {
            let vars: Vec<Var> = shapes
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let n = s.iter().product();
                    Var::from_tensor(&tensor(&wave(n, k as f64, 1.0), s).to_dtype(dt).unwrap())
                        .unwrap()
                })
                .collect();
            let mut o = AdamW8bit::new(vars.clone(), cfg).unwrap();
            o.in_place = in_place;
            for step in 0..5 {
                o.step(&waves(&shapes, 3.0 + step as f64, 0.2, dt)).unwrap();
            }
            assert_eq!(o.state_bytes(), 2 * (big as u64 + 77 * 4) + 2 * 7 * 4);
            vars.iter()
                .map(|v| values(v.as_tensor()))
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(true), run(false));
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            let d = max_abs_diff(x, y);
            // Measured: 1.2e-7 (one f32 ulp) in f32, 0 in bf16.
            let tol = if dt == DType::F32 { 1e-6 } else { 8e-3 };
            assert!(d < tol, "{dt:?} tensor {k}: paths differ by {d}");
        }
    }
}

/// fp32 master weights: a bf16 parameter ends each step as its fp32 copy rounded, and the
/// copy moves as f32 AdamW moves an f32 parameter with the same (bf16) gradients.
#[test]
fn master_weights_step_fp32_copies() {
    let cfg = AdamWConfig {
        lr: 1e-3,
        ..AdamWConfig::default()
    };
    let n = 500;
    let init = tensor(&wave(n, 0.0, 1.0), &[n])
        .to_dtype(DType::BF16)
        .unwrap();
    let p = Var::from_tensor(&init.copy().unwrap()).unwrap();
    let reference = Var::from_tensor(&init.to_dtype(DType::F32).unwrap()).unwrap();
    let mut m = Master::new(vec![p.clone()], |vars| {
        Ok(Box::new(AdamW::new(vars, cfg, DType::F32)?) as Box<dyn Optim>)
    })
    .unwrap();
    let mut r = AdamW::new(vec![reference.clone()], cfg, DType::F32).unwrap();
    assert_eq!(
        m.state_bytes(),
        4 * n as u64,
        "the fp32 copy exists before the first step"
    );
    for step in 0..6 {
        let g = tensor(&wave(n, step as f64, 0.1), &[n])
            .to_dtype(DType::BF16)
            .unwrap();
        m.step(std::slice::from_ref(&g)).unwrap();
        r.step(std::slice::from_ref(&g)).unwrap();
    }
    // Six steps of lr 1e-3 are below bf16's resolution near 1: only the copy keeps them.
    let rounded = values(&reference.as_tensor().to_dtype(DType::BF16).unwrap());
    assert_eq!(values(p.as_tensor()), rounded);
    assert_ne!(
        values(p.as_tensor()),
        values(&init),
        "no update reached the bf16 weights"
    );
    assert_eq!(m.state_bytes(), 4 * n as u64 + 2 * 4 * n as u64);
}

fn python() -> Option<String> {
    let p = std::env::var("VRAMCAL_TORCH_PYTHON")
        .ok()
        .filter(|p| !p.is_empty());
    if p.is_none() {
        eprintln!("SKIPPED: set VRAMCAL_TORCH_PYTHON to a Python with torch and bitsandbytes");
    }
    p
}

/// Runs `code` under `py` and returns its stdout's whitespace-separated numbers.
fn python_numbers(py: &str, code: &str) -> Vec<f64> {
    let out = Command::new(py).arg("-c").arg(code).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// The quantization maps are bitsandbytes' own, value for value: both maps against the values
/// bitsandbytes 0.50.2 printed (`tests/data/bitsandbytes-0.50.2-dynamic-maps.txt`, its command in
/// the file's header).
#[test]
fn dynamic_maps_are_bitsandbytes() {
    let text = include_str!("data/bitsandbytes-0.50.2-dynamic-maps.txt");
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 2);
    for (line, signed) in lines.iter().zip([true, false]) {
        let want: Vec<f64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let ours = vramcal::optim::dynamic_map(signed);
        assert_eq!(want.len(), 256);
        for (j, (&x, &w)) in ours.iter().zip(&want).enumerate() {
            assert_eq!(x as f64, w, "map signed={signed} entry {j}");
        }
    }
}

/// The quantization maps are bitsandbytes' own, value for value, and the 8-bit AdamW's
/// parameters after three steps match `bnb.optim.AdamW8bit` stepping on the CPU.
#[test]
fn adamw_8bit_matches_bitsandbytes() {
    let Some(py) = python() else { return };
    let maps = python_numbers(
        &py,
        "import bitsandbytes.functional as F\n\
         for s in (True, False): print(' '.join(repr(float(x)) for x in F.create_dynamic_map(signed=s).tolist()))",
    );
    for (k, signed) in [true, false].into_iter().enumerate() {
        let ours = vramcal::optim::dynamic_map(signed);
        for (j, &x) in ours.iter().enumerate() {
            assert_eq!(x as f64, maps[256 * k + j], "map signed={signed} entry {j}");
        }
    }
    let n = 64 * 80;
    let theirs = python_numbers(
        &py,
        &format!(
            "import math, torch, bitsandbytes as bnb\n\
             w = lambda n, ph, sc: torch.tensor([math.sin(0.37 * i + ph) * sc for i in range({n})], dtype=torch.float32)\n\
             p = torch.nn.Parameter(w({n}, 0.0, 1.0))\n\
             o = bnb.optim.AdamW8bit([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)\n\
             for s in range(3):\n    p.grad = w({n}, 3.0 + s, 0.2)\n    o.step()\n\
             print(' '.join(repr(float(x)) for x in p.detach().tolist()))"
        ),
    );
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let v = Var::from_tensor(&tensor(&wave(n, 0.0, 1.0), &[n])).unwrap();
    let mut o = AdamW8bit::new(vec![v.clone()], cfg).unwrap();
    for s in 0..3 {
        o.step(&[tensor(&wave(n, 3.0 + s as f64, 0.2), &[n])])
            .unwrap();
    }
    let ours = values(v.as_tensor());
    let d = max_abs_diff(&ours, &theirs);
    let same = ours
        .iter()
        .zip(&theirs)
        .filter(|(x, y)| (*x - *y).abs() <= 1e-6)
        .count();
    // Three steps move each value by up to 3e-2. bitsandbytes' native CPU quantizer takes the
    // other neighbour at near-ties (19 of 10,240 normal values in a check with torch's
    // `bucketize` over the same midpoints, which vramcal follows), so a few moments differ by
    // one code from the second step on (here 252 of 5,120 values end more than 1e-6 apart,
    // at most 2.5e-4).
    eprintln!("8-bit vs bitsandbytes: max {d}, {same} of {n} within 1e-6");
    assert!(d < 1e-3, "max difference from bitsandbytes {d}");
    assert!(
        same as f64 >= 0.9 * n as f64,
        "{same} of {n} values within 1e-6 of bitsandbytes'"
    );
}

/// What vramcal's step cannot run is refused before anything runs: the paged optimizers
/// anywhere, Liger's loss; 8-bit AdamW passes on any device (its candle-operations path).
#[test]
fn unmeasurable_setups_are_refused() {
    use vramcal::commands::setup::check_measurable;
    use vramcal::spec::{Loss, Optimizer, TrainSpec};
    let mut spec = TrainSpec::new(1, 8);
    spec.optimizer = Optimizer::AdamwBnb8bit;
    assert!(check_measurable(&spec).is_ok());
    spec.optimizer = Optimizer::PagedAdamw32bit;
    assert!(check_measurable(&spec).is_err());
    spec.optimizer = Optimizer::AdamwTorch;
    spec.loss = Loss::FusedLinearCe;
    assert!(check_measurable(&spec).is_err());
}
