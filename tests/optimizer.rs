//! vramcal's AdamW (the in-place CPU path and the chunked path other devices take) against
//! candle-nn's reference AdamW on random data, and the two paths against each other.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use vramcal::optim::AdamW;
use vramcal::spec::AdamWConfig;

#[test]
fn matches_candle_nn_adamw() {
    for in_place in [true, false] {
        matches_candle_nn(in_place);
    }
}

fn matches_candle_nn(in_place: bool) {
    let dev = Device::Cpu;
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let shapes: [&[usize]; 3] = [&[37, 11], &[5], &[300, 7]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap())
        .collect();
    let ours: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let theirs: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let mut a = AdamW::new(ours.clone(), cfg, DType::F32).unwrap();
    a.chunk_elems = 64; // force many chunks, including partial ones
    a.in_place = in_place;
    let mut b = candle_nn::AdamW::new(
        theirs.clone(),
        candle_nn::ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )
    .unwrap();
    for _ in 0..5 {
        let grads: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(0f32, 1.0, *s, &dev).unwrap())
            .collect();
        a.step(&grads).unwrap();
        // candle-nn takes a GradStore; build one from a loss whose gradient is `grads`.
        let loss = theirs
            .iter()
            .zip(&grads)
            .map(|(v, g)| (v.as_tensor() * g).unwrap().sum_all().unwrap())
            .reduce(|x, y| (x + y).unwrap())
            .unwrap();
        b.backward_step(&loss).unwrap();
    }
    for (x, y) in ours.iter().zip(&theirs) {
        let d = (x.as_tensor() - y.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "in place {in_place}: max abs difference {d}");
    }
    assert_eq!(a.state_bytes(), 2 * (37 * 11 + 5 + 300 * 7) * 4);
}

/// The in-place CPU update rounds as the chunked path does: the same bits after several steps
/// for f32 and bf16 parameters with f32 states, with weight decay. With 16-bit states the
/// in-place path updates the parameter from the stored (rounded) moments, as
/// `torch.optim.AdamW` does with bf16 states, where the chunked path uses them before
/// rounding: the two then agree to within a few units of the parameter's last place.
#[test]
fn in_place_and_chunked_paths_agree_to_the_bit() {
    let dev = Device::Cpu;
    let cfg = AdamWConfig {
        lr: 3e-3,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    for (pd, sd) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F32, DType::BF16),
    ] {
        let shape = (203, 9);
        let init = Tensor::randn(0f32, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(pd)
            .unwrap();
        let grads: Vec<Tensor> = (0..4)
            .map(|s| {
                Tensor::randn(0f32, 1.0 + s as f32, shape, &dev)
                    .unwrap()
                    .to_dtype(pd)
                    .unwrap()
            })
            .collect();
        let run = |in_place: bool| {
            let v = Var::from_tensor(&init.copy().unwrap()).unwrap();
            let mut a = AdamW::new(vec![v.clone()], cfg, sd).unwrap();
            a.in_place = in_place;
            a.chunk_elems = 100;
            for g in &grads {
                a.step(std::slice::from_ref(g)).unwrap();
            }
            values(v.as_tensor())
        };
        let (a, b) = (run(true), run(false));

        assert_ne!(a, values(&init), "{pd:?}: no update");
        if sd == DType::F32 {
            assert_eq!(a, b, "{pd:?} params, {sd:?} states");
        } else {
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f64, f64::max);
            assert!(d < 0.05, "{pd:?} params, {sd:?} states: {d}");
        }
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn rejects_bad_hyper_parameters() {
    let v = vec![Var::zeros(3, DType::F32, &Device::Cpu).unwrap()];
    let bad = AdamWConfig {
        beta1: 1.0,
        ..Default::default()
    };
    assert!(AdamW::new(v.clone(), bad, DType::F32).is_err());
    assert!(AdamW::new(v, AdamWConfig::default(), DType::U32).is_err());
}
