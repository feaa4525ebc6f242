//! The fused ops (`src/ops/`): each against its composed form (forward and gradients through
//! candle's autograd) and against finite differences, in f64; and in bf16 against f32.

use candle_core::{DType, Device, Tensor, Var, D};
use vramcal::ops;

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator: tests must not depend on candle's RNG.
    let n: usize = shape.iter().product();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// `L = sum(f(inputs) · r)` and its gradients with respect to every input.
fn loss_and_grads(
    f: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    r: Option<&Tensor>,
) -> (f64, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let l = match r {
        Some(r) => (out * r).unwrap().sum_all().unwrap(),
        None => out,
    };
    let store = l.backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| store.get(v).expect("gradient").clone())
        .collect();
    (l.to_scalar::<f64>().unwrap(), grads)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Fused against composed (values and gradients), then finite differences on a few entries
/// of every input of the fused op.
fn check(
    name: &str,
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    composed: &dyn Fn(&[Tensor]) -> Tensor,
    inputs: &[Tensor],
    out_shape: Option<&[usize]>,
) {
    let r = out_shape.map(|s| randn(s, 99));
    let (lf, gf) = loss_and_grads(fused, inputs, r.as_ref());
    let (lc, gc) = loss_and_grads(composed, inputs, r.as_ref());
    assert!(
        (lf - lc).abs() < 1e-10 * lc.abs().max(1.0),
        "{name}: {lf} vs {lc}"
    );
    for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < 1e-10, "{name}: input {i} gradient differs by {d}");
    }
    // Finite differences, central, eps 1e-6.
    let eval = |xs: &[Tensor]| -> f64 {
        let out = fused(xs);
        match &r {
            Some(r) => (out * r).unwrap().sum_all().unwrap(),
            None => out,
        }
        .to_scalar::<f64>()
        .unwrap()
    };
    for (i, x) in inputs.iter().enumerate() {
        let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = gf[i].flatten_all().unwrap().to_vec1().unwrap();
        for k in [0, flat.len() / 3, flat.len() - 1] {
            let bump = |e: f64| {
                let mut v = flat.clone();
                v[k] += e;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, x.shape(), &DEV).unwrap();
                eval(&xs)
            };
            let fd = (bump(1e-6) - bump(-1e-6)) / 2e-6;
            assert!(
                (fd - g[k]).abs() < 1e-6 * g[k].abs().max(1.0),
                "{name}: input {i}[{k}]: finite difference {fd}, analytic {}",
                g[k]
            );
        }
    }
}

fn composed_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let inv = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
}

#[test]
fn rms_norm_matches_composed_and_finite_differences() {
    let before = ops::cpu_kernel_calls(ops::CpuKernel::RmsNorm);
    check(
        "rms_norm",
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        &|t| composed_rms_norm(&t[0], &t[1], 1e-5),
        &[randn(&[2, 5, 8], 1), randn(&[8], 2)],
        Some(&[2, 5, 8]),
    );
    assert!(
        ops::cpu_kernel_calls(ops::CpuKernel::RmsNorm) > before + 1,
        "CPU kernel not used"
    );
}

#[test]
fn swiglu_matches_composed_and_finite_differences() {
    let before = ops::cpu_kernel_calls(ops::CpuKernel::Swiglu);
    check(
        "swiglu",
        &|t| ops::swiglu(&t[0], &t[1]).unwrap(),
        &|t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        &[(randn(&[3, 7], 3) * 3.0).unwrap(), randn(&[3, 7], 4)],
        Some(&[3, 7]),
    );
    assert!(
        ops::cpu_kernel_calls(ops::CpuKernel::Swiglu) > before + 1,
        "CPU kernel not used"
    );
}

fn tables(s: usize, hd: usize) -> (Tensor, Tensor) {
    let mut c = vec![0f64; s * hd];
    let mut sn = vec![0f64; s * hd];
    for p in 0..s {
        for i in 0..hd / 2 {
            let a = p as f64 / 10000f64.powf(2.0 * i as f64 / hd as f64);
            for k in [i, i + hd / 2] {
                c[p * hd + k] = a.cos();
                sn[p * hd + k] = a.sin();
            }
        }
    }
    (
        Tensor::from_vec(c, (1, 1, s, hd), &DEV).unwrap(),
        Tensor::from_vec(sn, (1, 1, s, hd), &DEV).unwrap(),
    )
}

fn composed_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hd = x.dim(D::Minus1).unwrap();
    let x1 = x.narrow(D::Minus1, 0, hd / 2).unwrap();
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    (x.broadcast_mul(cos).unwrap() + rot.broadcast_mul(sin).unwrap()).unwrap()
}

#[test]
fn rope_matches_composed_and_finite_differences() {
    let (cos, sin) = tables(5, 8);
    let before = ops::cpu_kernel_calls(ops::CpuKernel::Rope);
    // A transposed view, as the model passes the projection's output.
    check(
        "rope",
        &|t| ops::rope(&t[0].transpose(1, 2).unwrap(), &cos, &sin).unwrap(),
        &|t| composed_rope(&t[0].transpose(1, 2).unwrap(), &cos, &sin),
        &[randn(&[2, 5, 3, 8], 5)],
        Some(&[2, 3, 5, 8]),
    );
    assert!(
        ops::cpu_kernel_calls(ops::CpuKernel::Rope) > before + 1,
        "CPU kernel not used"
    );
}

fn mask(s: usize, window: Option<usize>) -> Tensor {
    let mut m = vec![0f64; s * s];
    for i in 0..s {
        for j in 0..s {
            if j > i || window.is_some_and(|w| i - j >= w) {
                m[i * s + j] = f64::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(m, (1, 1, s, s), &DEV).unwrap()
}

/// transformers' eager attention with K/V repeated per query head.
fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, m: &Tensor, scale: f64) -> Tensor {
    let (b, nh, s, hd) = q.dims4().unwrap();
    let nkv = k.dim(1).unwrap();
    let rep = nh / nkv;
    let repeat = |t: &Tensor| {
        Tensor::cat(&vec![t.unsqueeze(2).unwrap(); rep], 2)
            .unwrap()
            .reshape((b, nh, s, hd))
            .unwrap()
    };
    let (k, v) = (repeat(k), repeat(v));
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(m)
        .unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap().detach();
    let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&v.contiguous().unwrap())
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, s, nh * hd))
        .unwrap()
}

#[test]
fn attention_matches_composed_and_finite_differences() {
    // 4 query heads sharing 2 K/V heads; causal, then with a sliding window of 3.
    let (b, nh, nkv, s, hd) = (2, 4, 2, 6, 4);
    // Probabilities recomputed (sdpa) or kept (eager): the same values and gradients.
    for (window, keep) in [(None, false), (Some(3), false), (Some(3), true)] {
        let m = mask(s, window);
        let scale = 1.0 / (hd as f64).sqrt();
        check(
            "attention",
            &|t| {
                ops::attention(
                    &t[0],
                    &t[1],
                    &t[2].transpose(1, 2).unwrap(),
                    &m,
                    scale,
                    keep,
                )
                .unwrap()
            },
            &|t| composed_attention(&t[0], &t[1], &t[2].transpose(1, 2).unwrap(), &m, scale),
            &[
                randn(&[b, nh, s, hd], 6),
                randn(&[b, nkv, s, hd], 7),
                randn(&[b, s, nkv, hd], 8),
            ],
            Some(&[b, s, nh * hd]),
        );
    }
}

/// The CPU kernel (f32 and bf16): several query blocks, a last partial one, GQA, head sizes
/// that are not a multiple of the 16-column tile, causal and sliding-window masks (whose
/// blocks skip keys), against the composed attention in f64, values and gradients.
#[test]
fn cpu_attention_kernel_matches_composed() {
    let (b, nh, nkv, s, hd) = (2, 6, 2, 150, 20);
    for (dt, tol) in [(DType::F32, 2e-5), (DType::BF16, 3e-2)] {
        for window in [None, Some(70)] {
            let m64 = mask(s, window);
            let m32 = m64.to_dtype(DType::F32).unwrap();
            let scale = 1.0 / (hd as f64).sqrt();
            let inputs = [
                randn(&[b, nh, s, hd], 12),
                randn(&[b, nkv, s, hd], 13),
                randn(&[b, s, nkv, hd], 14),
            ];
            let r = randn(&[b, s, nh * hd], 15);
            let before = ops::cpu_kernel_calls(ops::CpuKernel::Attention);
            let fused = |t: &[Tensor]| {
                let t: Vec<Tensor> = t.iter().map(|x| x.to_dtype(dt).unwrap()).collect();
                ops::attention(
                    &t[0],
                    &t[1],
                    &t[2].transpose(1, 2).unwrap(),
                    &m32,
                    scale,
                    false,
                )
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
            };
            let composed = |t: &[Tensor]| {
                composed_attention(&t[0], &t[1], &t[2].transpose(1, 2).unwrap(), &m64, scale)
            };
            let (lf, gf) = loss_and_grads(&fused, &inputs, Some(&r));
            let (lc, gc) = loss_and_grads(&composed, &inputs, Some(&r));
            assert_eq!(
                ops::cpu_kernel_calls(ops::CpuKernel::Attention),
                before + 2,
                "{dt:?}: kernel not used"
            );
            assert!(
                (lf - lc).abs() < tol * lc.abs().max(1.0),
                "{dt:?} {window:?}: {lf} vs {lc}"
            );
            for (i, (a, c)) in gf.iter().zip(&gc).enumerate() {
                let scale = c
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let d = max_abs_diff(a, c);
                assert!(
                    d < tol * scale.max(1.0),
                    "{dt:?} {window:?}: input {i} gradient differs by {d}"
                );
            }
        }
    }
}

#[test]
fn lm_head_cross_entropy_matches_composed_across_chunks() {
    // More tokens than one chunk, and a last chunk that is not full.
    let n = ops::CE_CHUNK_TOKENS * 2 + 37;
    let (h, v) = (6, 11);
    let targets: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
    let targets = Tensor::from_vec(targets, (1, n), &DEV).unwrap();
    let t2 = targets.clone();
    let before = ops::cpu_kernel_calls(ops::CpuKernel::CrossEntropy);
    check(
        "lm_head_cross_entropy",
        &|t| ops::lm_head_cross_entropy(&t[0], &t[1], &targets.flatten_all().unwrap()).unwrap(),
        &|t| {
            let logits = t[0]
                .matmul(&t[1].t().unwrap())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            vramcal::model::cross_entropy(&logits, &t2).unwrap()
        },
        &[randn(&[n, h], 9), randn(&[v, h], 10)],
        None,
    );
    // Three chunks, forward and backward.
    assert!(
        ops::cpu_kernel_calls(ops::CpuKernel::CrossEntropy) >= before + 6,
        "CPU kernel not used"
    );
}

/// The head with a LoRA adapter: `[x | u]·[w | b]ᵀ` over three chunks, every input's gradient.
#[test]
fn lm_head_lora_cross_entropy_matches_composed_across_chunks() {
    let n = ops::CE_CHUNK_TOKENS * 2 + 37;
    let (h, r, v) = (6, 3, 11);
    let targets: Vec<u32> = (0..n).map(|i| ((i * 5 + 1) % v) as u32).collect();
    let targets = Tensor::from_vec(targets, (1, n), &DEV).unwrap();
    let t2 = targets.clone();
    check(
        "lm_head_lora_cross_entropy",
        &|t| {
            ops::lm_head_lora_cross_entropy(&t[0], &t[1], &t[2], &targets.flatten_all().unwrap())
                .unwrap()
        },
        &|t| {
            let x = t[0].narrow(1, 0, h).unwrap();
            let u = t[0].narrow(1, h, r).unwrap();
            let logits = (x.matmul(&t[1].t().unwrap()).unwrap()
                + u.matmul(&t[2].t().unwrap()).unwrap())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
            vramcal::model::cross_entropy(&logits, &t2).unwrap()
        },
        &[
            randn(&[n, h + r], 19),
            randn(&[v, h], 20),
            randn(&[v, r], 21),
        ],
        None,
    );
}

/// The fused dropout equals `x · mask` with the mask it draws (read off by applying it to ones),
/// values and gradients, and reproduces its mask from the seed.
#[test]
fn dropout_matches_composed() {
    let shape = [3, 7, 5];
    let mask = ops::dropout(
        &Tensor::ones(&shape[..], DType::F64, &DEV).unwrap(),
        0.3,
        42,
    )
    .unwrap()
    .detach();
    let kept = mask
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .filter(|&&m| m != 0.0)
        .count();
    assert!(kept > 0 && kept < 105, "{kept} of 105 kept");
    let m2 = mask.clone();
    check(
        "dropout",
        &|t| ops::dropout(&t[0], 0.3, 42).unwrap(),
        &|t| (&t[0] * &m2).unwrap(),
        &[randn(&shape, 31)],
        Some(&shape),
    );
}

#[test]
fn bf16_fused_ops_stay_close_to_f32() {
    let x = randn(&[2, 5, 3, 8], 11);
    let (cos, sin) = tables(5, 8);
    let f32_out = |dt: DType| {
        let x = x.to_dtype(dt).unwrap().transpose(1, 2).unwrap();
        let y = ops::rope(&x, &cos.to_dtype(dt).unwrap(), &sin.to_dtype(dt).unwrap()).unwrap();
        let w = Tensor::ones(8, dt, &DEV).unwrap();
        let y = ops::rms_norm(&y, &w, 1e-5).unwrap();
        ops::swiglu(&y, &y).unwrap().to_dtype(DType::F32).unwrap()
    };
    let d = max_abs_diff(&f32_out(DType::F32), &f32_out(DType::BF16));
    assert!(d < 0.05, "bf16 vs f32: {d}");
}
